//! The `kaiwa` command line: parses arguments, calls the library, reports errors.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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
    /// Run the bot daemon (Discord and/or Telegram, as configured in the environment or .env;
    /// with HTTP_ADDR set, the web server too).
    Run,
    /// Serve the chat page and the OpenAI-compatible API (http://127.0.0.1:8080/ unless
    /// HTTP_ADDR or --addr says otherwise), with the same reply engine and store as the bots.
    Serve {
        /// Where to listen [default: HTTP_ADDR, else 127.0.0.1:8080]; an address other machines
        /// can reach needs API_KEYS (or HTTP_ALLOW_NO_KEYS=true).
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
    },
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
    /// Derive training dialogue from a Japanese–English sentence-pair file (`japanese<TAB>
    /// english`, like data/starter/tanaka_ja_en.tsv.gz): the exchanges written inside it
    /// (「…」「…」) and synthetic replies (each question paired with the statement closest to
    /// its topic), in both languages, as OpenAI `messages` JSONL.
    DeriveDialogue {
        /// The sentence-pair file (`.gz` is read compressed).
        #[arg(long)]
        pairs: PathBuf,
        /// Output directory: exchanges_{ja,en}.jsonl, replies_{ja,en}.jsonl, summary.json.
        #[arg(long)]
        out: PathBuf,
        /// A system prompt put first in every conversation.
        #[arg(long)]
        system: Option<String>,
        /// The least topic similarity (TF-IDF cosine) of a reply to its question.
        #[arg(long, default_value_t = 0.3)]
        min_score: f64,
        /// Statements at least this similar to a question are near-copies, not replies.
        #[arg(long, default_value_t = 0.85)]
        max_score: f64,
        /// How many questions one statement may answer.
        #[arg(long, default_value_t = 2)]
        max_reuse: usize,
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
    /// Train a model on corpus files (or continue training one), with checkpoints, `--resume`,
    /// metrics and a loss curve; the result is a model directory in OUT/model.
    Train(Box<TrainArgs>),
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
        /// Write attention out in MatMul/Softmax/Concat (opset 17, as Optimum does) instead of
        /// one standard Attention node per layer (opset 23, ONNX Runtime 1.23 or later).
        /// kaiwa runs both; the default decodes faster.
        #[arg(long)]
        decomposed_attention: bool,
    },
    /// Talk to the reply engine in the terminal; with a pipe as input, one reply a line for
    /// each line read. Retrieves from the store DATABASE_URL names (default kaiwa.db), which
    /// gets the model's retrieval data on first use.
    Chat {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        threads: ThreadsArg,
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        engine: EngineArg,
    },
    /// Reply once to a prompt and print only the reply.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        threads: ThreadsArg,
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
        /// Suite classifier-free guidance, 1 for none [default: the suite file's, else the
        /// model's].
        #[arg(long)]
        guidance_scale: Option<f32>,
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
        #[command(flatten)]
        engine: EngineArg,
        /// The store the engine retrieves from [default: a scratch store with the model's
        /// retrieval data, so the figures do not depend on what a local store collected].
        #[arg(long)]
        store: Option<String>,
        /// Candidates kept per suite case in report.json, best first (0: every one, for
        /// research/ranker/tune.py).
        #[arg(long, default_value_t = kaiwa::eval::REPORT_CANDIDATES)]
        candidates: usize,
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
        #[command(flatten)]
        threads: ThreadsArg,
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
    /// Training speed of a preset (tokens/s and the share of the CPU's measured peak FLOP/s),
    /// and with --pytorch the same steps in PyTorch eager (bench/pytorch_train.py).
    Train(TrainBenchArgs),
    /// Import a large synthetic Telegram export, then export the store in both modes: messages
    /// per second and peak memory of each phase.
    Corpus {
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Scratch directory [default: a temporary one, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The reply engine as the store grows: pairs indexed per second, then retrieval and
    /// whole-reply latency (p50/p99) over the everyday suites' prompts, and memory, at each
    /// size.
    Reply {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        threads: ThreadsArg,
        #[command(flatten)]
        engine: EngineArg,
        /// Store sizes in pairs, cumulative (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [10_000u64, 100_000, 1_000_000])]
        pairs: Vec<u64>,
        /// Sentence pairs the synthetic dialogue is drawn from.
        #[arg(long, default_value = "data/starter/tanaka_ja_en.tsv.gz")]
        sentences: PathBuf,
        /// Suite files or directories whose prompts are asked.
        #[arg(long, default_value = "evals")]
        suite: Vec<PathBuf>,
        /// Scratch directory [default: a temporary one, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The bot's whole path for a message (stored, queued, context, reply engine, sent and
    /// stored) at several numbers of channels talking at once, each person waiting for the
    /// answer before writing again: replies a second, p50/p99 latency, memory. Messages go
    /// through kaiwa's Telegram adapter to a loopback Bot API on 127.0.0.1 (or, with `--through
    /// outbox`, straight to the bot). The store is DATABASE_URL's.
    Bot {
        #[command(flatten)]
        model: ModelArg,
        /// Channels talking at once (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 20, 100])]
        channels: Vec<usize>,
        /// Messages each person writes in turn.
        #[arg(long, default_value_t = 3)]
        per_channel: usize,
        /// Suite files or directories whose prompts are written.
        #[arg(long, default_value = "evals")]
        suite: Vec<PathBuf>,
        /// telegram (the real adapter over HTTP, against a loopback Bot API) or outbox (in
        /// process, no HTTP).
        #[arg(long, default_value = "telegram")]
        through: kaiwa::bench::bot::Through,
    },
    /// Streamed chat completions over HTTP (`kaiwa serve` in-process on 127.0.0.1) at several
    /// numbers of concurrent clients: requests a second, time to the first piece and to the
    /// end (p50/p99), failures; beside the same prompts made in-process through the bots' path.
    /// The store is DATABASE_URL's (the model's retrieval data is added on first use).
    Serve {
        #[command(flatten)]
        model: ModelArg,
        /// Concurrent clients (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
        clients: Vec<usize>,
        /// Requests each client makes in turn.
        #[arg(long, default_value_t = 4)]
        per_client: usize,
        /// Store every exchange, as in use (by default the HTTP requests say "store": false,
        /// so both paths do the same work).
        #[arg(long)]
        stored: bool,
        /// Suite files or directories whose prompts are asked.
        #[arg(long, default_value = "evals")]
        suite: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct TrainBenchArgs {
    #[arg(long, value_enum, default_value = "small")]
    preset: Preset,
    /// Vocabulary size of the benchmark model.
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Forward/backward passes per step (gradient accumulation; two at a time run side by
    /// side on two threads).
    #[arg(long, default_value_t = 2)]
    micro_batches: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Also run bench/pytorch_train.py with the same shapes and print the ratio.
    #[arg(long)]
    pytorch: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// Run folder: run.json, checkpoint/, metrics.jsonl, loss.svg, and the model in OUT/model.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint (every other option comes from its
    /// run.json).
    #[arg(long)]
    resume: bool,
    /// Training files: chat JSONL as export-corpus writes it, text (.txt, documents separated by
    /// blank lines) or sentence pairs (.tsv); .gz too. Repeatable; repeat a file to weight it.
    #[arg(long, required_unless_present = "resume")]
    data: Vec<PathBuf>,
    /// Held-out file for the validation loss (e.g. export-corpus's validation.jsonl).
    #[arg(long)]
    validation: Option<PathBuf>,
    /// Fine-tune this model directory (keeps its tokenizer and architecture) instead of
    /// starting a new model.
    #[arg(long, conflicts_with_all = ["tokenizer", "preset"])]
    init: Option<PathBuf>,
    /// For a new model: the folder `kaiwa train-tokenizer` wrote.
    #[arg(long, required_unless_present_any = ["init", "resume"])]
    tokenizer: Option<PathBuf>,
    /// For a new model: the architecture to start from (each size can be overridden below).
    #[arg(long, value_enum, default_value = "small")]
    preset: Preset,
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    intermediate: Option<usize>,
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Positions the model supports (max_position_embeddings).
    #[arg(long)]
    max_positions: Option<usize>,
    /// Share the embedding matrix with the output projection.
    #[arg(long)]
    tie_embeddings: Option<bool>,
    #[arg(long, value_enum, default_value = "chat")]
    objective: kaiwa::train::data::Objective,
    /// Tokens per training row.
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Rows per optimizer step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Rows per forward/backward pass (gradient accumulation when smaller than --batch)
    /// [default: half the batch: two passes, run side by side on two threads].
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Training time, e.g. 90s, 20m, 1h30m (a hard stop; alone, it also sizes the schedule).
    #[arg(long, value_parser = kaiwa::train::run::parse_duration)]
    time: Option<std::time::Duration>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    min_lr: f64,
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validate every N steps.
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Validation rows (at most).
    #[arg(long, default_value_t = 64)]
    eval_rows: usize,
    /// Checkpoint every N steps (and always at the end, and on Ctrl-C).
    #[arg(long, default_value_t = 200)]
    checkpoint_every: usize,
}

impl TrainArgs {
    fn spec(&self) -> Result<kaiwa::train::run::RunSpec> {
        use kaiwa::train::run::{DataFile, RunSpec, Start};
        let start = match (&self.init, &self.tokenizer) {
            (Some(dir), _) => Start::From(dir.clone()),
            (None, Some(tokenizer)) => {
                let mut a = LlamaConfig::preset(self.preset);
                a.hidden_size = self.hidden.unwrap_or(a.hidden_size);
                a.intermediate_size = self.intermediate.unwrap_or(a.intermediate_size);
                a.num_hidden_layers = self.layers.unwrap_or(a.num_hidden_layers);
                a.num_attention_heads = self.heads.unwrap_or(a.num_attention_heads);
                a.num_key_value_heads = self.kv_heads.or(a.num_key_value_heads);
                a.max_position_embeddings = self.max_positions.unwrap_or(a.max_position_embeddings);
                a.tie_word_embeddings = self.tie_embeddings.unwrap_or(a.tie_word_embeddings);
                Start::Fresh {
                    architecture: Box::new(a),
                    tokenizer: tokenizer.clone(),
                }
            }
            (None, None) => bail!("give --tokenizer DIR for a new model, or --init DIR"),
        };
        let mut spec = RunSpec::new(start, self.data.clone());
        spec.validation = self.validation.clone().map(|path| DataFile {
            path,
            sha256: String::new(),
        });
        spec.objective = self.objective;
        spec.context = self.context;
        spec.batch_rows = self.batch;
        spec.micro_batch_rows = self.micro_batch.unwrap_or(if self.batch.is_multiple_of(2) {
            self.batch / 2
        } else {
            self.batch
        });
        spec.steps = self.steps;
        spec.time_s = self.time.map(|t| t.as_secs_f64());
        spec.peak_lr = self.lr;
        spec.min_lr = self.min_lr;
        spec.warmup_steps = self.warmup;
        spec.adamw.weight_decay = self.weight_decay;
        spec.adamw.clip_norm = (self.clip > 0.0).then_some(self.clip);
        spec.seed = self.seed;
        spec.eval_every = self.eval_every;
        spec.eval_rows = self.eval_rows;
        spec.checkpoint_every = self.checkpoint_every;
        Ok(spec)
    }
}

/// Set by the first Ctrl-C (or SIGTERM) during `kaiwa train`; a second one exits at once.
static STOP_TRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn train(args: &TrainArgs) -> Result<()> {
    use std::sync::atomic::Ordering;
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

#[derive(Args)]
struct ModelArg {
    /// Model directory [default: $MODEL_DIR or models/kaiwa].
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct ThreadsArg {
    /// Threads a reply's matrix products are split over [default: the cores, at most 4].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

impl ThreadsArg {
    fn get(&self) -> usize {
        self.threads
            .map_or_else(kaiwa::model::threads::default_threads, usize::from)
    }
}

impl ModelArg {
    fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(kaiwa::default_model_dir)
    }

    /// The daemon's settings (environment and `.env`) with this model directory.
    fn settings(&self) -> Result<kaiwa::config::Settings> {
        let mut settings = kaiwa::config::Settings::from_env()?;
        settings.model_dir = self.dir();
        Ok(settings)
    }

    fn load(&self, threads: &ThreadsArg) -> Result<Generator> {
        let dir = self.dir();
        Generator::load_with_threads(&dir, threads.get()).with_context(|| {
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
struct EngineArg {
    /// hybrid (retrieve, generate and rank) or generate (the model alone) [default:
    /// REPLY_ENGINE, else hybrid]. The ranker's knobs are read from the environment
    /// (.env.example).
    #[arg(long)]
    engine: Option<kaiwa::engine::EngineMode>,
}

impl EngineArg {
    /// The engine settings of the environment (and `.env`), with `--engine` over them.
    fn settings(&self) -> Result<kaiwa::engine::EngineSettings> {
        let mut settings = kaiwa::config::engine_settings_from_env()?;
        if let Some(mode) = self.engine {
            settings.mode = mode;
        }
        Ok(settings)
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
    /// Classifier-free guidance towards the last user message; 1 is none.
    #[arg(long)]
    guidance_scale: Option<f32>,
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
            guidance_scale: self.guidance_scale,
            ..Default::default()
        };
        let mut o = generator.default_options().overridden_by(&overrides);
        o.seed = self.seed;
        o.stop = self.stop.clone();
        o.validate()?;
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
            if err.is::<GateFailed>() {
                ExitCode::from(kaiwa::eval::EXIT_GATE_FAILED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs a daemon made by `daemon` until it ends; SIGINT or SIGTERM triggers its shutdown.
fn until_signal<F>(daemon: impl FnOnce(kaiwa::shutdown::Shutdown) -> F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let (trigger, shutdown) = kaiwa::shutdown::shutdown_channel();
    runtime()?.block_on(async move {
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: shutting down");
            trigger.trigger();
        });
        daemon(shutdown).await
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => {
            let settings = kaiwa::config::Settings::from_env()?;
            until_signal(|shutdown| kaiwa::app::run(settings, shutdown))?;
        }
        Command::Serve { addr } => {
            let mut settings = kaiwa::config::Settings::from_env()?;
            if addr.is_some() {
                settings.web.addr = addr;
            }
            until_signal(|shutdown| kaiwa::app::serve(settings, shutdown))?;
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
        Command::DeriveDialogue {
            pairs,
            out,
            system,
            min_score,
            max_score,
            max_reuse,
        } => {
            let options = kaiwa::corpus::derive::RetrievalOptions {
                min_score,
                max_score,
                max_reuse,
                ..Default::default()
            };
            let summary = kaiwa::corpus::derive::derive(&pairs, &out, &options, system.as_deref())
                .with_context(|| format!("deriving dialogue from {}", pairs.display()))?;
            eprintln!(
                "wrote {}: {} written exchanges and {} retrieved replies (of {} questions) \
                 in Japanese and English, from {} sentence pairs ({} malformed lines skipped)",
                out.display(),
                summary.written_exchanges,
                summary.retrieved_replies,
                summary.questions,
                summary.pairs,
                summary.skipped_lines
            );
        }
        Command::Forget { platform, user } => {
            let p = kaiwa::domain::Platform::parse(&platform).with_context(|| {
                format!("unknown platform {platform:?} (discord, telegram or web)")
            })?;
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
        Command::Train(args) => train(&args)?,
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
            decomposed_attention,
        } => {
            let config = model::load_config(&dir)?;
            let weights = LlamaWeights::load(&config, &dir.join(model::WEIGHTS_FILE))?;
            let options = ExportOptions {
                position_ids: !no_position_ids,
                external_data,
                attention_op: !decomposed_attention,
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
            threads,
            system,
            sampling,
            engine,
        } => {
            let engine = kaiwa::engine::ReplyEngine::new(engine.settings()?);
            let generator = model.load(&threads)?;
            let options = sampling.options(&generator)?;
            let (rt, store) = open_store()?;
            if engine.settings().mode == kaiwa::engine::EngineMode::Hybrid {
                rt.block_on(kaiwa::engine::corpora::ensure_corpora(
                    &store,
                    generator.dir(),
                ))
                .context("adding the model's retrieval data to the store")?;
            }
            let stdin = std::io::stdin();
            let style = if stdin.is_terminal() {
                kaiwa::chat::ChatStyle::Terminal
            } else {
                kaiwa::chat::ChatStyle::Lines
            };
            kaiwa::chat::Chat {
                generator: &generator,
                engine: &engine,
                retrieve: &mut |text| rt.block_on(engine.retrieve(&store, text)),
                system: system.as_deref(),
                options: &options,
                style,
            }
            .run(&mut stdin.lock(), &mut std::io::stdout().lock())?;
            rt.block_on(store.close());
        }
        Command::Generate {
            model,
            threads,
            prompt,
            system,
            sampling,
        } => {
            let generator = model.load(&threads)?;
            let options = sampling.options(&generator)?;
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(ChatMessage::system(s));
            }
            messages.push(ChatMessage::user(prompt));
            let mut out = std::io::stdout();
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
            guidance_scale,
            max_examples,
            report,
            baseline,
            gate,
            bpb_tolerance,
            case_tolerance,
            threads,
            engine,
            store,
            candidates,
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
                    guidance_scale,
                },
                max_examples,
                report_dir: report,
                baseline,
                rules: kaiwa::eval::GateRules {
                    bpb_tolerance,
                    case_tolerance,
                },
                threads,
                engine: engine.settings()?,
                store,
                candidates,
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
            what: BenchCommand::Train(args),
        } => bench_train(&args)?,
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
                BenchCommand::Reply {
                    model,
                    threads,
                    engine,
                    pairs,
                    sentences,
                    suite,
                    dir,
                },
        } => {
            let engine = kaiwa::engine::ReplyEngine::new(engine.settings()?);
            let generator = model.load(&threads)?;
            let prompts = suite_prompts(&suite)?;
            let scratch = tempfile_dir(dir)?;
            let steps = runtime()?
                .block_on(kaiwa::bench::reply::bench_reply(
                    scratch.path(),
                    &generator,
                    &engine,
                    &sentences,
                    &prompts,
                    &pairs,
                ))
                .context("running the reply benchmark")?;
            println!("{}", serde_json::to_string_pretty(&steps)?);
            println!("| pairs | indexed/s | retrieve p50 / p99 ms | reply p50 / p99 ms | RSS MiB (peak) | store MiB |");
            println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
            for s in &steps {
                println!(
                    "| {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} ({:.0}) | {:.0} |",
                    s.pairs,
                    s.index_pairs_per_s
                        .map_or("(kept)".to_string(), |r| format!("{r:.0}")),
                    s.retrieve_p50_ms,
                    s.retrieve_p99_ms,
                    s.reply_p50_ms,
                    s.reply_p99_ms,
                    s.rss_mib,
                    s.peak_rss_mib,
                    s.store_mib
                );
            }
        }
        Command::Bench {
            what:
                BenchCommand::Bot {
                    model,
                    channels,
                    per_channel,
                    suite,
                    through,
                },
        } => {
            let settings = model.settings()?;
            let prompts = suite_prompts(&suite)?;
            let steps = runtime()?.block_on(async {
                let store = kaiwa::store::Store::open(&settings.database_url).await?;
                kaiwa::engine::corpora::ensure_corpora(&store, &settings.model_dir)
                    .await
                    .context("adding the model's retrieval data to the store")?;
                let generator = load_bot_model(&settings).await?;
                kaiwa::bench::bot::bench_bot(
                    settings,
                    store,
                    generator,
                    &prompts,
                    &channels,
                    per_channel,
                    through,
                )
                .await
                .context("running the bot benchmark")
            })?;
            println!("{}", serde_json::to_string_pretty(&steps)?);
            println!("| channels | messages (not answered) | replies/s | latency p50 / p99 ms | peak RSS MiB |");
            println!("| ---: | ---: | ---: | ---: | ---: |");
            for s in &steps {
                println!(
                    "| {} | {} ({}) | {:.1} | {:.0} / {:.0} | {:.0} |",
                    s.channels,
                    s.messages,
                    s.not_answered,
                    s.replies_per_s,
                    s.p50_ms,
                    s.p99_ms,
                    s.peak_rss_mib
                );
            }
        }
        Command::Bench {
            what:
                BenchCommand::Serve {
                    model,
                    clients,
                    per_client,
                    stored,
                    suite,
                },
        } => {
            let settings = model.settings()?;
            let prompts = suite_prompts(&suite)?;
            let steps = runtime()?.block_on(async {
                let generator = load_bot_model(&settings).await?;
                kaiwa::bench::serve::bench_serve(
                    settings, generator, &prompts, &clients, per_client, stored,
                )
                .await
                .context("running the serving benchmark")
            })?;
            println!("{}", serde_json::to_string_pretty(&steps)?);
            println!("| clients | requests (failed) | HTTP req/s | first piece p50 / p99 ms | whole reply p50 / p99 ms | in-process req/s | in-process p50 / p99 ms | peak RSS MiB |");
            println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            for s in &steps {
                println!(
                    "| {} | {} ({}) | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {:.0} / {:.0} | {:.0} |",
                    s.clients,
                    s.requests,
                    s.failed,
                    s.http_rps,
                    s.http_first_p50_ms,
                    s.http_first_p99_ms,
                    s.http_total_p50_ms,
                    s.http_total_p99_ms,
                    s.direct_rps,
                    s.direct_p50_ms,
                    s.direct_p99_ms,
                    s.peak_rss_mib
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
                    threads,
                    ort_threads,
                    json,
                },
        } => {
            let dir = model.dir();
            let threads = threads.get();
            let report =
                kaiwa::bench::bench_infer(&dir, prompt_tokens, new_tokens, repeats, threads)
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

fn bench_train(args: &TrainBenchArgs) -> Result<()> {
    let TrainBenchArgs {
        preset,
        vocab,
        batch,
        context,
        micro_batches,
        warmup,
        steps,
        pytorch,
        json,
    } = *args;
    let mut config = LlamaConfig::preset(preset);
    config.vocab_size = vocab;
    config.max_position_embeddings = config.max_position_embeddings.max(context);
    let r = kaiwa::bench::train::bench_train(&config, batch, context, micro_batches, warmup, steps);
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "kaiwa (burn/Flex) {} parameters, batch {}x{} in {} pass(es): {:.0} tokens/s, step {:.0} ms, \
             {:.1} GFLOP/s = {:.1}% of the measured peak {:.1} GFLOP/s, {:.2} cores busy, peak RSS {:.0} MiB",
            r.parameters,
            r.batch,
            r.context,
            r.micro_batches,
            r.tokens_per_s,
            r.step_median_ms,
            r.achieved_gflops,
            100.0 * r.peak_fraction,
            r.peak_gflops,
            r.cores_busy,
            r.peak_rss_mib
        );
    }
    if pytorch {
        let script = std::path::Path::new("bench/pytorch_train.py");
        let c = &config;
        let output = std::process::Command::new("python3")
            .arg(script)
            .args(["--vocab", &c.vocab_size.to_string()])
            .args(["--hidden", &c.hidden_size.to_string()])
            .args(["--intermediate", &c.intermediate_size.to_string()])
            .args(["--layers", &c.num_hidden_layers.to_string()])
            .args(["--heads", &c.num_attention_heads.to_string()])
            .args(["--kv-heads", &c.kv_heads().to_string()])
            .args(["--tie", &c.tie_word_embeddings.to_string()])
            .args(["--batch", &batch.to_string()])
            .args(["--context", &context.to_string()])
            .args(["--warmup", &warmup.to_string()])
            .args(["--steps", &steps.to_string()])
            .output()
            .with_context(|| format!("running python3 {}", script.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        print!("{stdout}");
        let theirs = stdout
            .lines()
            .find_map(|l| l.strip_prefix("tokens_per_s "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .context("the PyTorch script printed no tokens_per_s line")?;
        println!(
            "kaiwa/pytorch: {:.2}x ({:.0} vs {:.0} tokens/s)",
            r.tokens_per_s / theirs,
            r.tokens_per_s,
            theirs
        );
    }
    Ok(())
}

/// The prompts of the given suites, in order; suites without any are refused.
fn suite_prompts(suites: &[PathBuf]) -> Result<Vec<String>> {
    let prompts: Vec<String> = kaiwa::eval::suite::load_suites(suites)?
        .iter()
        .flat_map(|s| s.cases.iter().map(|c| c.prompt.clone()))
        .collect();
    anyhow::ensure!(!prompts.is_empty(), "the suites have no prompts");
    Ok(prompts)
}

/// The model the bots use (with its tokenizer and settings), as `settings` names it.
async fn load_bot_model(settings: &kaiwa::config::Settings) -> Result<Arc<Generator>> {
    let loaded = kaiwa::bot::load_model(settings)
        .await
        .with_context(|| format!("loading {}", settings.model_dir.display()))?;
    Ok(Arc::new(loaded))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

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

/// The store `DATABASE_URL` names (default `kaiwa.db`), with a runtime to use it on.
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
