//! Training: `train-tokenizer` and `train` (with its Ctrl-C: a checkpoint first, then a quit).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use kaiwa::shutdown::wait_for_signal;

use crate::args::{TrainArgs, TrainTokenizerArgs};

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

pub fn train(args: &TrainArgs) -> Result<()> {
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
