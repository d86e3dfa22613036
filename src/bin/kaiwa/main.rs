//! The `kaiwa` command line: parses the arguments, runs the command through the library, and
//! turns its error into a message and an exit status. Each group of commands has its own file;
//! the flags are in `args.rs`.

mod args;
mod bench;
mod bot;
mod corpus;
mod eval;
mod model;
mod train;

use std::process::ExitCode;

use anyhow::{Context, Result};
use args::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // tract-onnx warns on every load of an opset-23 graph (kaiwa's own export) that
                // it is tested up to opset 18; kaiwa's tests run that graph against a reference.
                .unwrap_or_else(|_| "kaiwa=info,warn,tract_onnx::model=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if err.is::<eval::GateFailed>() {
                ExitCode::from(kaiwa::eval::EXIT_GATE_FAILED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => bot::run(),
        Command::Serve(args) => bot::serve(&args),
        Command::ExportCorpus(args) => corpus::export(&args),
        Command::Import(args) => corpus::import(&args),
        Command::DeriveDialogue(args) => corpus::derive_dialogue(&args),
        Command::Forget(args) => corpus::forget(&args),
        Command::Stats => corpus::stats(),
        Command::TrainTokenizer(args) => train::train_tokenizer(&args),
        Command::Train(args) => train::train(&args),
        Command::InitModel(args) => model::init_model(&args),
        Command::ExportOnnx(args) => model::export_onnx(&args),
        Command::Chat(args) => model::chat(&args),
        Command::Generate(args) => model::generate(&args),
        Command::Eval(args) => eval::eval(&args),
        Command::Retrain(args) => train::retrain(&args),
        Command::Models(args) => train::models(&args),
        Command::Rollback(args) => train::rollback(&args),
        Command::Bench { what } => bench::run(what),
    }
}

/// The async runtime a command runs the library's async parts on.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The store `DATABASE_URL` names (default `kaiwa.db`), with a runtime to use it on.
fn open_store() -> Result<(tokio::runtime::Runtime, kaiwa::store::Store)> {
    let url = kaiwa::config::database_url_from_env();
    let rt = runtime()?;
    let store = rt.block_on(kaiwa::store::Store::open(&url))?;
    Ok((rt, store))
}
