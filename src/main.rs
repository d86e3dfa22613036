//! The `kaiwa` command line: parses arguments, calls the library, reports errors.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kaiwa::model::{
    self, onnx_export::ExportOptions, ChatMessage, GenerateOptions, GenerationConfig, Generator,
    LlamaConfig, LlamaWeights, Preset,
};

#[derive(Parser)]
#[command(
    name = "kaiwa",
    version,
    about = "Build and run your own ChatGPT-style bot"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bot daemon (Discord and/or Telegram, as configured in the environment or .env).
    Run,
    /// Write the stored conversations as training files (OpenAI `messages` JSONL for TRL and
    /// axolotl, ShareGPT, or plain transcripts) with a train/validation split and a data card.
    ExportCorpus(ExportArgs),
    /// Bring existing dialogue into the store (idempotent: importing a file twice adds nothing).
    Import {
        /// The file to import (`.gz` is read compressed).
        path: PathBuf,
        #[arg(long, value_enum)]
        format: kaiwa::corpus::import::Format,
        /// The tag stored with every message [default: import:FORMAT:FILE NAME].
        #[arg(long)]
        source: Option<String>,
        /// In chat exports and transcripts, the speaker (name or id) who is the assistant side.
        #[arg(long)]
        assistant: Option<String>,
        /// Import nothing if any record is malformed (default: skip it and report).
        #[arg(long)]
        strict: bool,
    },
    /// Delete everything stored of a user.
    Forget {
        #[arg(long)]
        platform: String,
        #[arg(long)]
        user: String,
    },
    /// Figures about the conversation store.
    Stats,
    /// Train a byte-level BPE tokenizer on corpus files (JSONL chat, .txt, .tsv; .gz too) with
    /// Japanese handling, and report characters per token on held-out Japanese and English.
    TrainTokenizer {
        /// Corpus files (repeatable).
        #[arg(long, required = true)]
        corpus: Vec<PathBuf>,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Output directory: tokenizer.json, tokenizer_config.json, tokenizer_report.{json,md}.
        #[arg(long)]
        out: PathBuf,
        /// Held-out texts [default: every 50th corpus text].
        #[arg(long)]
        heldout: Option<PathBuf>,
        /// Train without the Japanese handling (balance and chunks).
        #[arg(long)]
        plain: bool,
        /// Train on at most this many MB of text (a deterministic sample).
        #[arg(long, default_value_t = 24)]
        max_mb: usize,
        /// Do not train the comparison tokenizers.
        #[arg(long)]
        no_compare: bool,
    },
    /// Write a randomly initialised model directory (tokenizer, config, weights, ONNX).
    InitModel {
        #[arg(long, value_enum, default_value = "small")]
        preset: Preset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write DIR/model.onnx from DIR/config.json and DIR/model.safetensors.
    ExportOnnx {
        dir: PathBuf,
        /// Store the weights in model.onnx_data beside the graph (ONNX external data).
        #[arg(long)]
        external_data: bool,
        /// Compute positions inside the graph instead of taking a position_ids input.
        #[arg(long)]
        no_position_ids: bool,
    },
    /// Talk to a model in the terminal.
    Chat {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Reply once to a prompt and print only the reply.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Test a model before deploying it: held-out loss, perplexity and bits per byte beside a
    /// byte n-gram baseline, a Japanese/English conversation suite, and a gate against the
    /// deployed model (exit status 3 when the candidate is worse).
    Eval {
        #[command(flatten)]
        model: ModelArg,
        /// Held-out data: chat JSONL (scored on the assistant's content) or .txt documents
        /// separated by blank lines (scored on every token).
        #[arg(long)]
        data: Option<PathBuf>,
        /// The format of --data and --train [default: from the extension].
        #[arg(long, value_enum)]
        format: Option<kaiwa::eval::DataFormat>,
        /// Training data for the n-gram baseline [default: train.<ext> beside --data, if any].
        #[arg(long)]
        train: Option<PathBuf>,
        /// Order of the byte n-gram baseline (1 to 7).
        #[arg(long, default_value_t = kaiwa::eval::ngram::DEFAULT_ORDER)]
        ngram_order: usize,
        /// Suite files or directories (repeatable) [default: evals/ if it exists].
        #[arg(long)]
        suite: Vec<PathBuf>,
        /// Skip the conversation suite.
        #[arg(long, conflicts_with = "suite")]
        no_suite: bool,
        /// Sampling seed of every suite case [default: the suite file's].
        #[arg(long)]
        seed: Option<u64>,
        /// Suite sampling temperature, 0 for greedy [default: the suite file's].
        #[arg(long)]
        temperature: Option<f32>,
        /// Suite reply length limit [default: the suite file's].
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Score only the first N held-out examples.
        #[arg(long)]
        max_examples: Option<usize>,
        /// Where report.md and report.json go [default: MODEL/eval].
        #[arg(long)]
        report: Option<PathBuf>,
        /// The deployed model to compare with: a model directory (evaluated the same way) or an
        /// earlier report (a directory holding report.json, or the file).
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Exit with status 3 if the candidate is worse than --baseline.
        #[arg(long, requires = "baseline")]
        gate: bool,
        /// Held-out bits per byte the candidate may lose before it counts as worse.
        #[arg(long, default_value_t = 0.01)]
        bpb_tolerance: f64,
        /// Suite cases the candidate may pass fewer of before it counts as worse.
        #[arg(long, default_value_t = 0)]
        case_tolerance: u64,
        /// Worker threads [default: one per core].
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode speed of a model through tract (and ONNX Runtime with --ort).
    Infer {
        #[command(flatten)]
        model: ModelArg,
        #[arg(long, default_value_t = 256)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also run bench/onnxruntime_decode.py on the same file and print the ratio.
        #[arg(long)]
        ort: bool,
        /// Intra-op threads for ONNX Runtime; 0 keeps its default (all cores).
        #[arg(long, default_value_t = 0)]
        ort_threads: usize,
        /// Print the reports as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Import a large synthetic Telegram export, then export the store in both modes: messages
    /// per second and peak memory of each phase.
    Corpus {
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Scratch directory [default: a temporary one, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ModelArg {
    /// Model directory [default: $MODEL_DIR or models/kaiwa].
    #[arg(long)]
    model: Option<PathBuf>,
}

impl ModelArg {
    fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(kaiwa::default_model_dir)
    }

    fn load(&self) -> Result<Generator> {
        let dir = self.dir();
        Generator::load(&dir).with_context(|| {
            if dir.exists() {
                format!("loading the model in {}", dir.display())
            } else {
                format!(
                    "no model in {}: make one with `kaiwa init-model --preset small --out {}`",
                    dir.display(),
                    dir.display()
                )
            }
        })
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// 0 for greedy decoding [default: the model's generation_config.json].
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args)]
struct ExportArgs {
    /// The output directory: train.*, validation.*, summary.json, data_card.md.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "openai")]
    format: kaiwa::corpus::export::ExportFormat,
    /// `bot`: conversations with the bot (it is the assistant); `all`: all human dialogue, each
    /// speaker in turn the assistant.
    #[arg(long, value_enum, default_value = "bot")]
    mode: kaiwa::corpus::export::ExportMode,
    /// A silence longer than this many minutes starts a new conversation.
    #[arg(long, default_value_t = 30)]
    gap_minutes: i64,
    /// Cut conversations after this many messages.
    #[arg(long, default_value_t = 64)]
    max_turns: usize,
    /// Only these platforms (repeatable): discord, telegram, import.
    #[arg(long)]
    platform: Vec<String>,
    /// Only these chat / channel ids (repeatable).
    #[arg(long)]
    channel: Vec<String>,
    /// Only rows with this source tag (repeatable): `live`, or an import's tag.
    #[arg(long)]
    source: Vec<String>,
    /// Only messages sent at or after this time (2024-05-01, 2024-05-01T12:00:00Z, or ms).
    #[arg(long)]
    since: Option<String>,
    /// Only messages sent before this time.
    #[arg(long)]
    until: Option<String>,
    /// Drop examples with fewer messages than this.
    #[arg(long, default_value_t = 2)]
    min_turns: usize,
    /// Drop examples with fewer characters than this.
    #[arg(long, default_value_t = 1)]
    min_chars: usize,
    /// Keep only examples in these languages (repeatable; ISO 639-1: ja, en, …).
    #[arg(long)]
    language: Vec<String>,
    /// The share of conversations written to the validation file.
    #[arg(long, default_value_t = 0.0)]
    val_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep duplicate examples.
    #[arg(long)]
    keep_duplicates: bool,
    /// Replace e-mail addresses, phone numbers, URLs with secrets and mentions.
    #[arg(long)]
    redact: bool,
    /// Replace speaker names with stable pseudonyms.
    #[arg(long)]
    anonymize: bool,
    /// A system prompt to put first in every example that has none.
    #[arg(long)]
    system: Option<String>,
}

impl ExportArgs {
    fn options(&self) -> Result<kaiwa::corpus::export::ExportOptions> {
        Ok(kaiwa::corpus::export::ExportOptions {
            format: self.format,
            mode: self.mode,
            gap_ms: self.gap_minutes * 60_000,
            max_turns: self.max_turns,
            filter: kaiwa::store::CorpusFilter {
                platforms: self.platform.clone(),
                channels: self.channel.clone(),
                sources: self.source.clone(),
                since_ms: self.since.as_deref().map(parse_time).transpose()?,
                until_ms: self.until.as_deref().map(parse_time).transpose()?,
            },
            min_turns: self.min_turns,
            min_chars: self.min_chars,
            languages: self.language.clone(),
            val_fraction: self.val_fraction,
            seed: self.seed,
            dedup: !self.keep_duplicates,
            redact: self.redact,
            anonymize: self.anonymize,
            system: self.system.clone(),
            progress: true,
        })
    }
}

/// A time on the command line: a date (midnight UTC), an RFC 3339 time, or milliseconds.
fn parse_time(s: &str) -> Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp_millis());
    }
    bail!("{s:?} is not a time: expected 2024-05-01, 2024-05-01T12:00:00Z or milliseconds")
}

impl SamplingArgs {
    fn options(&self, generator: &Generator) -> Result<GenerateOptions> {
        let overrides = GenerationConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            ..Default::default()
        };
        let mut o = generator.default_options().overridden_by(&overrides);
        o.seed = self.seed;
        o.stop = self.stop.clone();
        o.sampling.validate()?;
        Ok(o)
    }
}

/// `kaiwa eval --gate` found the candidate worse than the baseline: its own exit status, so a
/// promotion script can tell it from an error.
#[derive(Debug, thiserror::Error)]
#[error("gate failed: {0}")]
struct GateFailed(String);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kaiwa=info,warn".into()),
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
            if err.is::<GateFailed>() {
                ExitCode::from(kaiwa::eval::EXIT_GATE_FAILED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => {
            let settings = kaiwa::config::Settings::from_env()?;
            let (trigger, shutdown) = kaiwa::shutdown::shutdown_channel();
            runtime()?.block_on(async move {
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("signal received: shutting down");
                    trigger.trigger();
                });
                kaiwa::app::run(settings, shutdown).await
            })?;
        }
        Command::ExportCorpus(args) => {
            let options = args.options()?;
            let (rt, store) = open_store()?;
            let summary = rt
                .block_on(kaiwa::corpus::export::export(&store, &args.out, &options))
                .with_context(|| format!("exporting the corpus to {}", args.out.display()))?;
            eprintln!(
                "wrote {}: {} examples ({} train, {} validation) from {} conversations, \
                 {} messages read; dropped {} duplicates, {} too short, {} in other languages",
                args.out.display(),
                summary.examples(),
                summary.train.examples,
                summary.validation.examples,
                summary.conversations,
                summary.messages_read,
                summary.dropped_exact_duplicates + summary.dropped_normalized_duplicates,
                summary.dropped_too_short,
                summary.dropped_other_language,
            );
            for (lang, f) in &summary.per_language {
                eprintln!(
                    "  {lang}: {} examples, {} turns, {} characters",
                    f.examples, f.turns, f.characters
                );
            }
        }
        Command::Import {
            path,
            format,
            source,
            assistant,
            strict,
        } => {
            let (rt, store) = open_store()?;
            let options = kaiwa::corpus::ingest::ImportOptions {
                source,
                strict,
                assistant,
                progress: true,
                ..kaiwa::corpus::ingest::ImportOptions::new(format)
            };
            let summary = rt
                .block_on(kaiwa::corpus::ingest::import_file(&store, &path, &options))
                .with_context(|| format!("importing {} as {format}", path.display()))?;
            for e in &summary.errors {
                eprintln!("skipped {}: {e}", path.display());
            }
            if summary.skipped as usize > summary.errors.len() {
                eprintln!(
                    "… and {} more malformed records",
                    summary.skipped as usize - summary.errors.len()
                );
            }
            eprintln!(
                "imported {} as {}: {} messages in {} conversations; {} already stored, \
                 {} of opted-out users left out, {} malformed records skipped",
                path.display(),
                summary.source,
                summary.messages,
                summary.conversations,
                summary.duplicates,
                summary.opted_out,
                summary.skipped
            );
        }
        Command::Forget { platform, user } => {
            let p = kaiwa::bot::event::Platform::parse(&platform)
                .with_context(|| format!("unknown platform {platform:?} (discord or telegram)"))?;
            let (rt, store) = open_store()?;
            let n = rt.block_on(store.forget_user(p, &user))?;
            eprintln!("deleted {n} messages of {platform} user {user}");
        }
        Command::Stats => {
            let (rt, store) = open_store()?;
            let stats = rt.block_on(store.stats())?;
            println!("{}", serde_json::to_string_pretty(&stats)?);
        }
        Command::TrainTokenizer {
            corpus,
            vocab_size,
            out,
            heldout,
            plain,
            max_mb,
            no_compare,
        } => {
            let options = kaiwa::train::tokenizer::TokenizerOptions {
                corpus,
                vocab_size,
                heldout,
                japanese: !plain,
                max_bytes: max_mb * 1_000_000,
                compare: !no_compare,
            };
            let report = kaiwa::train::tokenizer::train_tokenizer(&options, &out)
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
        }
        Command::InitModel { preset, seed, out } => {
            let config = model::init::init_model_dir(LlamaConfig::preset(preset), seed, &out)
                .with_context(|| format!("writing a new model to {}", out.display()))?;
            eprintln!(
                "wrote {} ({} layers, hidden {}, vocab {})",
                out.display(),
                config.num_hidden_layers,
                config.hidden_size,
                config.vocab_size
            );
        }
        Command::ExportOnnx {
            dir,
            external_data,
            no_position_ids,
        } => {
            let config = model::load_config(&dir)?;
            let weights = LlamaWeights::load(&config, &dir.join(model::WEIGHTS_FILE))?;
            let options = ExportOptions {
                position_ids: !no_position_ids,
                external_data,
            };
            let out = model::onnx_export::default_output(&dir);
            model::onnx_export::export_onnx(&config, &weights, &out, &options)
                .with_context(|| format!("exporting {}", out.display()))?;
            eprintln!(
                "wrote {} ({} parameters)",
                out.display(),
                weights.parameter_count()
            );
        }
        Command::Chat {
            model,
            system,
            sampling,
        } => {
            let generator = model.load()?;
            let options = sampling.options(&generator)?;
            let stdin = std::io::stdin();
            let stdout = std::io::stdout();
            kaiwa::chat::run_chat(
                &generator,
                system.as_deref(),
                &options,
                &mut stdin.lock(),
                &mut stdout.lock(),
            )?;
        }
        Command::Generate {
            model,
            prompt,
            system,
            sampling,
        } => {
            let generator = model.load()?;
            let options = sampling.options(&generator)?;
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(ChatMessage::system(s));
            }
            messages.push(ChatMessage::user(prompt));
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let generation = generator.generate(&messages, &options, &mut |delta| {
                out.write_all(delta.as_bytes())
                    .and_then(|_| out.flush())
                    .is_ok()
            })?;
            writeln!(out)?;
            tracing::info!(
                prompt_tokens = generation.prompt_tokens,
                new_tokens = generation.new_tokens,
                stop = ?generation.stop,
                prefill_ms = generation.prefill.as_millis() as u64,
                decode_tok_s = generation.new_tokens as f64 / generation.decode.as_secs_f64().max(1e-9),
                "generated"
            );
        }
        Command::Eval {
            model,
            data,
            format,
            train,
            ngram_order,
            suite,
            no_suite,
            seed,
            temperature,
            max_new_tokens,
            max_examples,
            report,
            baseline,
            gate,
            bpb_tolerance,
            case_tolerance,
            threads,
        } => {
            let suites = match (no_suite, suite.is_empty()) {
                (true, _) => Vec::new(),
                (false, false) => suite,
                (false, true) if std::path::Path::new("evals").is_dir() => vec!["evals".into()],
                (false, true) => {
                    tracing::warn!("no --suite and no evals/ directory here: suite skipped");
                    Vec::new()
                }
            };
            let options = kaiwa::eval::EvalOptions {
                data,
                format,
                train,
                ngram_order,
                suites,
                overrides: kaiwa::eval::SamplingOverrides {
                    seed,
                    temperature,
                    max_new_tokens,
                },
                max_examples,
                report_dir: report,
                baseline,
                rules: kaiwa::eval::GateRules {
                    bpb_tolerance,
                    case_tolerance,
                },
                threads,
                ..kaiwa::eval::EvalOptions::new(model.dir())
            };
            let outcome = kaiwa::eval::run(&options)
                .with_context(|| format!("evaluating {}", options.model.display()))?;
            eprint!("{}", outcome.report.summary());
            eprintln!(
                "wrote {} and {}",
                outcome
                    .report_dir
                    .join(kaiwa::eval::report::REPORT_MD)
                    .display(),
                outcome
                    .report_dir
                    .join(kaiwa::eval::report::REPORT_JSON)
                    .display()
            );
            if gate && outcome.gate_failed() {
                let verdict = outcome.report.gate.as_ref().map(|g| g.verdict());
                return Err(GateFailed(verdict.unwrap_or_default()).into());
            }
        }
        Command::Bench {
            what: BenchCommand::Corpus { messages, dir },
        } => {
            let scratch = tempfile_dir(dir)?;
            let report = runtime()?
                .block_on(kaiwa::bench::corpus::bench_corpus(scratch.path(), messages))
                .context("running the corpus benchmark")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            println!(
                "import: {:.0} messages/s ({:.1} MiB Telegram export, peak RSS {:.0} MiB)",
                report.import_messages_per_s, report.export_file_mib, report.import_peak_rss_mib
            );
            for e in &report.exports {
                println!(
                    "export --mode {:?}: {:.0} messages/s, {} examples, RSS {:.0} MiB before, \
                     peak {:.0} MiB",
                    e.mode, e.messages_per_s, e.examples, e.rss_before_mib, e.peak_rss_mib
                );
            }
        }
        Command::Bench {
            what:
                BenchCommand::Infer {
                    model,
                    prompt_tokens,
                    new_tokens,
                    repeats,
                    ort,
                    ort_threads,
                    json,
                },
        } => {
            let dir = model.dir();
            let report = kaiwa::bench::bench_infer(&dir, prompt_tokens, new_tokens, repeats)
                .with_context(|| format!("benchmarking {}", dir.display()))?;
            print_report(&report, json)?;
            if ort {
                let ort = run_ort_bench(&dir, prompt_tokens, new_tokens, repeats, ort_threads)?;
                print_report(&ort, json)?;
                let agree = ort.tokens == report.tokens;
                println!(
                    "tract/onnxruntime: decode {:.2}x, prefill {:.2}x (tokens agree: {agree})",
                    report.decode_tokens_per_s / ort.decode_tokens_per_s,
                    ort.prefill_ms / report.prefill_ms,
                );
            }
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The store `DATABASE_URL` names (default `kaiwa.db`), with a runtime to use it on.
/// A scratch directory: the one given (kept), or a temporary one (removed when dropped).
enum Scratch {
    Kept(PathBuf),
    Temp(tempfile::TempDir),
}

impl Scratch {
    fn path(&self) -> &std::path::Path {
        match self {
            Scratch::Kept(p) => p,
            Scratch::Temp(t) => t.path(),
        }
    }
}

fn tempfile_dir(dir: Option<PathBuf>) -> Result<Scratch> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            Scratch::Kept(d)
        }
        None => Scratch::Temp(tempfile::tempdir().context("creating a temporary directory")?),
    })
}

fn open_store() -> Result<(tokio::runtime::Runtime, kaiwa::store::Store)> {
    let _ = dotenvy::dotenv();
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://kaiwa.db".into());
    let rt = runtime()?;
    let store = rt.block_on(kaiwa::store::Store::open(&url))?;
    Ok((rt, store))
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn print_report(r: &kaiwa::bench::InferReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "{:<12} prefill {} tokens: {:8.1} ms | decode {} tokens: {:7.1} tokens/s | peak RSS {:.0} MiB",
            r.runtime, r.prompt_tokens, r.prefill_ms, r.new_tokens, r.decode_tokens_per_s, r.peak_rss_mib
        );
    }
    Ok(())
}

/// Runs the ONNX Runtime reference script on the same model and workload.
fn run_ort_bench(
    dir: &std::path::Path,
    prompt_tokens: usize,
    new_tokens: usize,
    repeats: usize,
    threads: usize,
) -> Result<kaiwa::bench::InferReport> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/onnxruntime_decode.py");
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg("--model")
        .arg(dir)
        .args(["--prompt-tokens", &prompt_tokens.to_string()])
        .args(["--new-tokens", &new_tokens.to_string()])
        .args(["--repeats", &repeats.to_string()])
        .args(["--threads", &threads.to_string()])
        .output()
        .with_context(|| format!("running python3 {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .last()
        .context("the ONNX Runtime script printed nothing")?;
    let report: kaiwa::bench::InferReport =
        serde_json::from_str(last).context("parsing the ONNX Runtime script's report")?;
    Ok(report)
}
