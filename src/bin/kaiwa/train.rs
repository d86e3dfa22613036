//! Training: `train-tokenizer` and `train` (with its Ctrl-C: a checkpoint first, then a quit).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use kaiwa::shutdown::wait_for_signal;

use crate::args::{HomeArg, RetrainArgs, RollbackArgs, TrainArgs, TrainTokenizerArgs};

pub fn train_tokenizer(args: &TrainTokenizerArgs) -> Result<()> {
    let out = &args.out;
    let report = kaiwa::train::tokenizer::train_tokenizer(&args.options(), out)
        .with_context(|| format!("training a tokenizer into {}", out.display()))?;
    for v in &report.variants {
        let cpt = |l: &str| v.heldout.get(l).map_or(0.0, |f| f.chars_per_token);
        eprintln!(
            "{:>14}: vocab {}, held-out characters per token: ja {:.2}, en {:.2}",
            v.name,
            v.vocab_size,
            cpt("ja"),
            cpt("en")
        );
    }
    eprintln!(
        "wrote {} ({})",
        out.join("tokenizer.json").display(),
        report.written
    );
    Ok(())
}

/// Set by the first Ctrl-C (or SIGTERM) during `kaiwa train`; a second one exits at once.
static STOP_TRAINING: AtomicBool = AtomicBool::new(false);

/// Sets [`STOP_TRAINING`] on the first Ctrl-C or SIGTERM; exits at once on the second.
fn stop_training_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            wait_for_signal().await;
            eprintln!("\nstopping: saving a checkpoint (Ctrl-C again to quit at once)");
            STOP_TRAINING.store(true, Ordering::SeqCst);
            wait_for_signal().await;
            std::process::exit(130);
        });
    });
}

pub fn train(args: &TrainArgs) -> Result<()> {
    stop_training_on_signal();
    let mut progress = kaiwa::train::progress::BarProgress::new();
    let summary = if args.resume {
        kaiwa::train::run::resume(&args.out, &STOP_TRAINING, &mut progress)
            .with_context(|| format!("resuming the run in {}", args.out.display()))?
    } else {
        kaiwa::train::run::train(args.spec()?, &args.out, &STOP_TRAINING, &mut progress)
            .with_context(|| format!("training into {}", args.out.display()))?
    };
    eprintln!(
        "{} {}/{} steps, {} tokens in {:.0} s ({:.0} tokens/s); loss {}{}",
        if summary.interrupted {
            "stopped after"
        } else {
            "trained"
        },
        summary.steps_done,
        summary.total_steps,
        summary.tokens_seen,
        summary.elapsed_s,
        summary.tokens_per_s,
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary
            .val_loss
            .map_or(String::new(), |l| format!(", validation {l:.4}")),
    );
    eprintln!(
        "model: {}   curve: {}",
        summary.model_dir.display(),
        args.out.join(kaiwa::train::run::PLOT_FILE).display()
    );
    if summary.interrupted {
        eprintln!(
            "resume with: kaiwa train --resume --out {}",
            args.out.display()
        );
    }
    Ok(())
}

pub fn retrain(args: &RetrainArgs) -> Result<()> {
    stop_training_on_signal();
    let options = args.options();
    let url = kaiwa::config::database_url_from_env();
    let report = kaiwa::retrain::run(&url, &options, &STOP_TRAINING)
        .with_context(|| format!("retraining in {}", options.home.display()))?;
    let verdict = report
        .gate
        .as_ref()
        .map(kaiwa::eval::GateReport::verdict)
        .unwrap_or_default();
    use kaiwa::retrain::Outcome;
    match report.outcome {
        Outcome::Installed => eprintln!(
            "installed version {} (from {}): {} new examples, {} replayed; {verdict}",
            report.installed.unwrap_or_default(),
            report.parent,
            report.new_examples,
            report.replay_examples
        ),
        Outcome::Rejected => eprintln!(
            "not installed: {verdict}; version {} stays deployed",
            report.parent
        ),
        Outcome::NothingNew => eprintln!(
            "nothing to do: {} new examples ({} held out) since version {}'s data (--min-new {})",
            report.new_examples, report.validation_examples, report.parent, options.min_new
        ),
        Outcome::Interrupted => eprintln!("stopped: `kaiwa retrain` again continues this run"),
    }
    eprintln!(
        "report: {}",
        report.report_dir.join("report.json").display()
    );
    Ok(())
}

pub fn models(args: &HomeArg) -> Result<()> {
    let lines = kaiwa::retrain::describe(&args.home)
        .with_context(|| format!("reading {}", args.home.display()))?;
    if lines.is_empty() {
        println!(
            "{} has no versions yet (`kaiwa retrain --home {}` starts it)",
            args.home.display(),
            args.home.display()
        );
    }
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

pub fn rollback(args: &RollbackArgs) -> Result<()> {
    let home = &args.home.home;
    let to = match args.to {
        Some(v) => v,
        None => {
            let current = kaiwa::retrain::current(home)?
                .with_context(|| format!("{} has no deployed version", home.display()))?;
            kaiwa::retrain::versions(home)?
                .into_iter()
                .find(|v| v.version == current)
                .and_then(|v| v.parent)
                .with_context(|| {
                    format!("version {current} is the first: there is nothing to roll back to")
                })?
        }
    };
    kaiwa::retrain::set_current(home, to)?;
    let (rt, store) = crate::open_store()?;
    rt.block_on(store.request_reload())?;
    rt.block_on(store.close());
    println!("deployed version {to}; running daemons load it within seconds");
    Ok(())
}
