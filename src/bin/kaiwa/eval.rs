//! `kaiwa eval`: evaluates a model, writes its report, and with `--gate` fails when the
//! candidate is worse than the baseline.

use anyhow::{Context, Result};
use kaiwa::eval::report::{REPORT_JSON, REPORT_MD};

use crate::args::EvalArgs;

/// `kaiwa eval --gate` found the candidate worse than the baseline: its own exit status, so a
/// promotion script can tell it from an error.
#[derive(Debug, thiserror::Error)]
#[error("gate failed: {0}")]
pub struct GateFailed(String);

pub fn eval(args: &EvalArgs) -> Result<()> {
    let options = args.options()?;
    let outcome = kaiwa::eval::run(&options)
        .with_context(|| format!("evaluating {}", options.model.display()))?;
    eprint!("{}", outcome.report.summary());
    eprintln!(
        "wrote {} and {}",
        outcome.report_dir.join(REPORT_MD).display(),
        outcome.report_dir.join(REPORT_JSON).display()
    );
    if args.gate && outcome.gate_failed() {
        let verdict = outcome.report.gate.as_ref().map(|g| g.verdict());
        return Err(GateFailed(verdict.unwrap_or_default()).into());
    }
    Ok(())
}
