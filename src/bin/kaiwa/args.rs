//! The command line's shape: every command and flag with its default and help text (clap), and
//! the conversion of a command's flags into the options the library takes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kaiwa::config::Settings;
use kaiwa::corpus::derive::RetrievalOptions;
use kaiwa::corpus::export::{parse_time, ExportMode, ExportOptions};
use kaiwa::corpus::ingest::ImportOptions;
use kaiwa::domain::Platform;
use kaiwa::engine::{EngineMode, EngineSettings};
use kaiwa::eval::{EvalOptions, GateRules, SamplingOverrides};
use kaiwa::model::onnx_export::ExportOptions as OnnxExportOptions;
use kaiwa::model::{GenerateOptions, Generator, LlamaConfig, Preset, Sampling};
use kaiwa::store::CorpusFilter;
use kaiwa::train::run::{DataFile, RunSpec, Start};
use kaiwa::train::tokenizer::TokenizerOptions;

#[derive(Parser)]
#[command(
    name = "kaiwa",
    version,
    about = "Build and run your own ChatGPT-style bot"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the bot daemon (Discord and/or Telegram, as configured in the environment or .env;
    /// with HTTP_ADDR set, the web server too).
    Run,
    /// Serve the chat page and the OpenAI-compatible API (http://127.0.0.1:8080/ unless
    /// HTTP_ADDR or --addr says otherwise), with the same reply engine and store as the bots.
    Serve(ServeArgs),
    /// Write the stored conversations as training files (OpenAI `messages` JSONL for TRL and
    /// axolotl, ShareGPT, or plain transcripts) with a train/validation split and a data card.
    ExportCorpus(ExportCorpusArgs),
    /// Bring existing dialogue into the store (idempotent: importing a file twice adds nothing).
    Import(ImportArgs),
    /// Derive training dialogue from a Japanese–English sentence-pair file (`japanese<TAB>
    /// english`, like data/starter/tanaka_ja_en.tsv.gz): the exchanges written inside it
    /// (「…」「…」) and synthetic replies (each question paired with the statement closest to
    /// its topic), in both languages, as OpenAI `messages` JSONL.
    DeriveDialogue(DeriveDialogueArgs),
    /// Delete everything stored of a user.
    Forget(ForgetArgs),
    /// Figures about the conversation store.
    Stats,
    /// Train a byte-level BPE tokenizer on corpus files (JSONL chat, .txt, .tsv; .gz too) with
    /// Japanese handling, and report characters per token on held-out Japanese and English.
    TrainTokenizer(TrainTokenizerArgs),
    /// Train a model on corpus files (or continue training one), with checkpoints, `--resume`,
    /// metrics and a loss curve; the result is a model directory in OUT/model.
    Train(Box<TrainArgs>),
    /// Write a randomly initialised model directory (tokenizer, config, weights, ONNX).
    InitModel(InitModelArgs),
    /// Write DIR/model.onnx from DIR/config.json and DIR/model.safetensors.
    ExportOnnx(ExportOnnxArgs),
    /// Talk to the reply engine in the terminal; with a pipe as input, one reply a line for
    /// each line read. Retrieves from the store DATABASE_URL names (default kaiwa.db), which
    /// gets the model's retrieval data on first use.
    Chat(ChatArgs),
    /// Reply once to a prompt and print only the reply.
    Generate(GenerateArgs),
    /// Test a model before deploying it: held-out loss, perplexity and bits per byte beside a
    /// byte n-gram baseline, a Japanese/English conversation suite, and a gate against the
    /// deployed model (exit status 3 when the candidate is worse).
    Eval(EvalArgs),
    /// The learning loop, safe to run from a timer: export what the store received since the
    /// deployed model's data (with a replay of earlier data), fine-tune the deployed model
    /// within a time budget, evaluate it against the deployed one, and install it as a new
    /// version only if it is not worse; running daemons load it without a restart. A killed
    /// run continues where it stopped; two at once are refused.
    Retrain(Box<RetrainArgs>),
    /// The versions `kaiwa retrain` installed in a model home, with their gates' figures (the
    /// deployed one marked `*`).
    Models(HomeArg),
    /// Deploy an earlier version of a model home (the previous one, or --to N); running daemons
    /// load it within seconds.
    Rollback(RollbackArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode speed of a model through tract (and ONNX Runtime with --ort).
    Infer(InferBenchArgs),
    /// Training speed of a preset (tokens/s and the share of the CPU's measured peak FLOP/s),
    /// and with --pytorch the same steps in PyTorch eager (bench/pytorch_train.py).
    Train(TrainBenchArgs),
    /// Import a large synthetic Telegram export, then export the store in both modes: messages
    /// per second and peak memory of each phase.
    Corpus(CorpusBenchArgs),
    /// The reply engine as the store grows: pairs indexed per second, then retrieval and
    /// whole-reply latency (p50/p99) over the everyday suites' prompts, and memory, at each
    /// size.
    Reply(ReplyBenchArgs),
    /// The bot's whole path for a message (stored, queued, context, reply engine, sent and
    /// stored) at several numbers of channels talking at once, each person waiting for the
    /// answer before writing again: replies a second, p50/p99 latency, memory. Messages go
    /// through kaiwa's Telegram adapter to a loopback Bot API on 127.0.0.1 (or, with `--through
    /// outbox`, straight to the bot). The store is DATABASE_URL's.
    Bot(BotBenchArgs),
    /// Streamed chat completions over HTTP (`kaiwa serve` in-process on 127.0.0.1) at several
    /// numbers of concurrent clients: requests a second, time to the first piece and to the
    /// end (p50/p99), failures; beside the same prompts made in-process through the bots' path.
    /// The store is DATABASE_URL's (the model's retrieval data is added on first use).
    Serve(ServeBenchArgs),
}

// Flags several commands share.

#[derive(Args)]
pub struct ModelArg {
    /// Model directory [default: $MODEL_DIR or models/kaiwa].
    #[arg(long)]
    pub model: Option<PathBuf>,
}

impl ModelArg {
    /// `--model`, else `MODEL_DIR` (environment or `.env`), else `models/kaiwa`.
    pub fn dir(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(kaiwa::config::model_dir_from_env)
    }

    /// The daemon's settings (environment and `.env`) with this model directory.
    pub fn settings(&self) -> Result<Settings> {
        let mut settings = Settings::from_env()?;
        if let Some(dir) = &self.model {
            settings.model_dir = dir.clone();
        }
        Ok(settings)
    }

    /// The model, its products on `threads`; a missing one is named with how to make it.
    pub fn load(&self, threads: &ThreadsArg) -> Result<Generator> {
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
pub struct ThreadsArg {
    /// Threads a reply's matrix products are split over [default: the cores, at most 4].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
}

impl ThreadsArg {
    pub fn get(&self) -> usize {
        self.threads
            .map_or_else(kaiwa::model::threads::default_threads, usize::from)
    }
}

#[derive(Args)]
pub struct EngineArg {
    /// hybrid (retrieve, generate and rank) or generate (the model alone) [default:
    /// REPLY_ENGINE, else hybrid]. The ranker's knobs are read from the environment
    /// (.env.example).
    #[arg(long)]
    pub engine: Option<EngineMode>,
}

impl EngineArg {
    /// The engine settings of the environment (and `.env`), with `--engine` over them.
    pub fn settings(&self) -> Result<EngineSettings> {
        let mut settings = kaiwa::config::engine_settings_from_env()?;
        if let Some(mode) = self.engine {
            settings.mode = mode;
        }
        Ok(settings)
    }
}

#[derive(Args)]
pub struct SamplingArgs {
    /// 0 for greedy decoding [default: the model's generation_config.json].
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Classifier-free guidance towards the last user message; 1 is none.
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The model's own sampling settings with these flags over them.
    pub fn options(&self, generator: &Generator) -> Result<GenerateOptions> {
        let overrides = Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            guidance_scale: self.guidance_scale,
        };
        let mut o = generator.default_options().overridden_by(&overrides);
        o.seed = self.seed;
        o.stop = self.stop.clone();
        o.validate()?;
        Ok(o)
    }
}

// The daemon and the web server.

#[derive(Args)]
pub struct ServeArgs {
    /// Where to listen [default: HTTP_ADDR, else 127.0.0.1:8080]; an address other machines
    /// can reach needs API_KEYS (or HTTP_ALLOW_NO_KEYS=true).
    #[arg(long)]
    pub addr: Option<std::net::SocketAddr>,
}

impl ServeArgs {
    /// The daemon's settings (environment and `.env`), with `--addr` over `HTTP_ADDR`.
    pub fn settings(&self) -> Result<Settings> {
        let mut settings = Settings::from_env()?;
        if self.addr.is_some() {
            settings.web.addr = self.addr;
        }
        Ok(settings)
    }
}

// The store and corpora.

#[derive(Args)]
pub struct ExportCorpusArgs {
    /// The output directory: train.*, validation.*, summary.json, data_card.md.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "openai")]
    pub format: kaiwa::corpus::export::ExportFormat,
    /// `bot`: conversations with the bot (it is the assistant); `all`: all human dialogue, each
    /// speaker in turn the assistant.
    #[arg(long, value_enum, default_value = "bot")]
    pub mode: kaiwa::corpus::export::ExportMode,
    /// A silence longer than this many minutes starts a new conversation.
    #[arg(long, default_value_t = 30)]
    pub gap_minutes: i64,
    /// Cut conversations after this many messages.
    #[arg(long, default_value_t = 64)]
    pub max_turns: usize,
    /// Only these platforms (repeatable): discord, telegram, import.
    #[arg(long)]
    pub platform: Vec<String>,
    /// Only these chat / channel ids (repeatable).
    #[arg(long)]
    pub channel: Vec<String>,
    /// Only rows with this source tag (repeatable): `live`, or an import's tag.
    #[arg(long)]
    pub source: Vec<String>,
    /// Only messages sent at or after this time (2024-05-01, 2024-05-01T12:00:00Z, or ms).
    #[arg(long)]
    pub since: Option<String>,
    /// Only messages sent before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Drop examples with fewer messages than this.
    #[arg(long, default_value_t = 2)]
    pub min_turns: usize,
    /// Drop examples with fewer characters than this.
    #[arg(long, default_value_t = 1)]
    pub min_chars: usize,
    /// Keep only examples in these languages (repeatable; ISO 639-1: ja, en, …).
    #[arg(long)]
    pub language: Vec<String>,
    /// The share of conversations written to the validation file.
    #[arg(long, default_value_t = 0.0)]
    pub val_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep duplicate examples.
    #[arg(long)]
    pub keep_duplicates: bool,
    /// Replace e-mail addresses, phone numbers, URLs with secrets and mentions.
    #[arg(long)]
    pub redact: bool,
    /// Replace speaker names with stable pseudonyms.
    #[arg(long)]
    pub anonymize: bool,
    /// A system prompt to put first in every example that has none.
    #[arg(long)]
    pub system: Option<String>,
}

impl ExportCorpusArgs {
    pub fn options(&self) -> Result<ExportOptions> {
        Ok(ExportOptions {
            format: self.format,
            mode: self.mode,
            gap_ms: self.gap_minutes * 60_000,
            max_turns: self.max_turns,
            filter: CorpusFilter {
                platforms: self.platform.clone(),
                channels: self.channel.clone(),
                sources: self.source.clone(),
                since_ms: self.since.as_deref().map(parse_time).transpose()?,
                until_ms: self.until.as_deref().map(parse_time).transpose()?,
                ..CorpusFilter::default()
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

#[derive(Args)]
pub struct ImportArgs {
    /// The file to import (`.gz` is read compressed).
    pub path: PathBuf,
    #[arg(long, value_enum)]
    pub format: kaiwa::corpus::import::Format,
    /// The tag stored with every message [default: import:FORMAT:FILE NAME].
    #[arg(long)]
    pub source: Option<String>,
    /// In chat exports and transcripts, the speaker (name or id) who is the assistant side.
    #[arg(long)]
    pub assistant: Option<String>,
    /// Import nothing if any record is malformed (default: skip it and report).
    #[arg(long)]
    pub strict: bool,
}

impl ImportArgs {
    pub fn options(&self) -> ImportOptions {
        ImportOptions {
            source: self.source.clone(),
            strict: self.strict,
            assistant: self.assistant.clone(),
            progress: true,
            ..ImportOptions::new(self.format)
        }
    }
}

#[derive(Args)]
pub struct DeriveDialogueArgs {
    /// The sentence-pair file (`.gz` is read compressed).
    #[arg(long)]
    pub pairs: PathBuf,
    /// Output directory: exchanges_{ja,en}.jsonl, replies_{ja,en}.jsonl, summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// A system prompt put first in every conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// The least topic similarity (TF-IDF cosine) of a reply to its question.
    #[arg(long, default_value_t = 0.3)]
    pub min_score: f64,
    /// Statements at least this similar to a question are near-copies, not replies.
    #[arg(long, default_value_t = 0.85)]
    pub max_score: f64,
    /// How many questions one statement may answer.
    #[arg(long, default_value_t = 2)]
    pub max_reuse: usize,
}

impl DeriveDialogueArgs {
    pub fn options(&self) -> RetrievalOptions {
        RetrievalOptions {
            min_score: self.min_score,
            max_score: self.max_score,
            max_reuse: self.max_reuse,
            ..Default::default()
        }
    }
}

#[derive(Args)]
pub struct ForgetArgs {
    #[arg(long)]
    pub platform: String,
    #[arg(long)]
    pub user: String,
}

impl ForgetArgs {
    pub fn platform(&self) -> Result<Platform> {
        let platform = &self.platform;
        Platform::parse(platform)
            .with_context(|| format!("unknown platform {platform:?} (discord, telegram or web)"))
    }
}

// Training.

#[derive(Args)]
pub struct TrainTokenizerArgs {
    /// Corpus files (repeatable).
    #[arg(long, required = true)]
    pub corpus: Vec<PathBuf>,
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Output directory: tokenizer.json, tokenizer_config.json, tokenizer_report.{json,md}.
    #[arg(long)]
    pub out: PathBuf,
    /// Held-out texts [default: every 50th corpus text].
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    /// Train without the Japanese handling (balance and chunks).
    #[arg(long)]
    pub plain: bool,
    /// Train on at most this many MB of text (a deterministic sample).
    #[arg(long, default_value_t = 24)]
    pub max_mb: usize,
    /// Do not train the comparison tokenizers.
    #[arg(long)]
    pub no_compare: bool,
}

impl TrainTokenizerArgs {
    pub fn options(&self) -> TokenizerOptions {
        TokenizerOptions {
            corpus: self.corpus.clone(),
            vocab_size: self.vocab_size,
            heldout: self.heldout.clone(),
            japanese: !self.plain,
            max_bytes: self.max_mb * 1_000_000,
            compare: !self.no_compare,
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Run folder: run.json, checkpoint/, metrics.jsonl, loss.svg, and the model in OUT/model.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint (every other option comes from its
    /// run.json).
    #[arg(long)]
    pub resume: bool,
    /// Training files: chat JSONL as export-corpus writes it, text (.txt, documents separated by
    /// blank lines) or sentence pairs (.tsv); .gz too. Repeatable; repeat a file to weight it.
    #[arg(long, required_unless_present = "resume")]
    pub data: Vec<PathBuf>,
    /// Held-out file for the validation loss (e.g. export-corpus's validation.jsonl).
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// Fine-tune this model directory (keeps its tokenizer and architecture) instead of
    /// starting a new model.
    #[arg(long, conflicts_with_all = ["tokenizer", "preset"])]
    pub init: Option<PathBuf>,
    /// For a new model: the folder `kaiwa train-tokenizer` wrote.
    #[arg(long, required_unless_present_any = ["init", "resume"])]
    pub tokenizer: Option<PathBuf>,
    /// For a new model: the architecture to start from (each size can be overridden below).
    #[arg(long, value_enum, default_value = "small")]
    pub preset: Preset,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub intermediate: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Positions the model supports (max_position_embeddings).
    #[arg(long)]
    pub max_positions: Option<usize>,
    /// Share the embedding matrix with the output projection.
    #[arg(long)]
    pub tie_embeddings: Option<bool>,
    #[arg(long, value_enum, default_value = "chat")]
    pub objective: kaiwa::train::data::Objective,
    /// Tokens per training row.
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Rows per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Rows per forward/backward pass (gradient accumulation when smaller than --batch)
    /// [default: half the batch: two passes, run side by side on two threads].
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Training time, e.g. 90s, 20m, 1h30m (a hard stop; alone, it also sizes the schedule).
    #[arg(long, value_parser = kaiwa::train::run::parse_duration)]
    pub time: Option<std::time::Duration>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Validate every N steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Validation rows (at most).
    #[arg(long, default_value_t = 64)]
    pub eval_rows: usize,
    /// Checkpoint every N steps (and always at the end, and on Ctrl-C).
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: usize,
}

impl TrainArgs {
    pub fn spec(&self) -> Result<RunSpec> {
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

// Models: make one, export it, talk to it.

#[derive(Args)]
pub struct InitModelArgs {
    #[arg(long, value_enum, default_value = "small")]
    pub preset: Preset,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct ExportOnnxArgs {
    pub dir: PathBuf,
    /// Store the weights in model.onnx_data beside the graph (ONNX external data).
    #[arg(long)]
    pub external_data: bool,
    /// Compute positions inside the graph instead of taking a position_ids input.
    #[arg(long)]
    pub no_position_ids: bool,
    /// Write attention out in MatMul/Softmax/Concat (opset 17, as Optimum does) instead of
    /// one standard Attention node per layer (opset 23, ONNX Runtime 1.23 or later).
    /// kaiwa runs both; the default decodes faster.
    #[arg(long)]
    pub decomposed_attention: bool,
    /// Store the matrix products' weights in 8 bits (one scale per block of 32 inputs, a
    /// standard blocked DequantizeLinear): a file about a quarter of the size, and int8 kernels
    /// in kaiwa's runtime. The embedding and the norms stay f32.
    #[arg(long, value_enum)]
    pub quantize: Option<Quantize>,
}

/// The weight formats `export-onnx --quantize` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    Int8,
}

impl ExportOnnxArgs {
    pub fn options(&self) -> OnnxExportOptions {
        OnnxExportOptions {
            position_ids: !self.no_position_ids,
            external_data: self.external_data,
            attention_op: !self.decomposed_attention,
            int8: self.quantize == Some(Quantize::Int8),
        }
    }
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub threads: ThreadsArg,
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub engine: EngineArg,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub threads: ThreadsArg,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

// Evaluation.

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Held-out data: chat JSONL (scored on the assistant's content) or .txt documents
    /// separated by blank lines (scored on every token).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The format of --data and --train [default: from the extension].
    #[arg(long, value_enum)]
    pub format: Option<kaiwa::eval::DataFormat>,
    /// Training data for the n-gram baseline [default: train.<ext> beside --data, if any].
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Order of the byte n-gram baseline (1 to 7).
    #[arg(long, default_value_t = kaiwa::eval::ngram::DEFAULT_ORDER)]
    pub ngram_order: usize,
    /// Suite files or directories (repeatable) [default: evals/ if it exists].
    #[arg(long)]
    pub suite: Vec<PathBuf>,
    /// Skip the conversation suite.
    #[arg(long, conflicts_with = "suite")]
    pub no_suite: bool,
    /// Sampling seed of every suite case [default: the suite file's].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Suite sampling temperature, 0 for greedy [default: the suite file's].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Suite reply length limit [default: the suite file's].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Suite classifier-free guidance, 1 for none [default: the suite file's, else the
    /// model's].
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    /// Score only the first N held-out examples.
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Where report.md and report.json go [default: MODEL/eval].
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The deployed model to compare with: a model directory (evaluated the same way) or an
    /// earlier report (a directory holding report.json, or the file).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Exit with status 3 if the candidate is worse than --baseline.
    #[arg(long, requires = "baseline")]
    pub gate: bool,
    /// Held-out bits per byte the candidate may lose before it counts as worse.
    #[arg(long, default_value_t = 0.01)]
    pub bpb_tolerance: f64,
    /// Suite cases the candidate may pass fewer of before it counts as worse.
    #[arg(long, default_value_t = 0)]
    pub case_tolerance: u64,
    /// Worker threads [default: one per core].
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub engine: EngineArg,
    /// The store the engine retrieves from [default: a scratch store with the model's
    /// retrieval data, so the figures do not depend on what a local store collected].
    #[arg(long)]
    pub store: Option<String>,
    /// Candidates kept per suite case in report.json, best first (0: every one, for
    /// research/ranker/tune.py).
    #[arg(long, default_value_t = kaiwa::eval::REPORT_CANDIDATES)]
    pub candidates: usize,
}

impl EvalArgs {
    /// The evaluation these flags ask for; without `--suite`, the suites in `evals/` if there
    /// is such a directory here.
    pub fn options(&self) -> Result<EvalOptions> {
        let suites = match (self.no_suite, self.suite.is_empty()) {
            (true, _) => Vec::new(),
            (false, false) => self.suite.clone(),
            (false, true) if Path::new("evals").is_dir() => vec!["evals".into()],
            (false, true) => {
                tracing::warn!("no --suite and no evals/ directory here: suite skipped");
                Vec::new()
            }
        };
        Ok(EvalOptions {
            data: self.data.clone(),
            format: self.format,
            train: self.train.clone(),
            ngram_order: self.ngram_order,
            suites,
            overrides: SamplingOverrides {
                seed: self.seed,
                sampling: Sampling {
                    temperature: self.temperature,
                    max_new_tokens: self.max_new_tokens,
                    guidance_scale: self.guidance_scale,
                    ..Sampling::default()
                },
            },
            max_examples: self.max_examples,
            report_dir: self.report.clone(),
            baseline: self.baseline.clone(),
            rules: GateRules {
                bpb_tolerance: self.bpb_tolerance,
                case_tolerance: self.case_tolerance,
            },
            threads: self.threads,
            engine: self.engine.settings()?,
            store: self.store.clone(),
            candidates: self.candidates,
            ..EvalOptions::new(self.model.dir())
        })
    }
}

// Benchmarks.

#[derive(Args)]
pub struct InferBenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub threads: ThreadsArg,
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also run bench/onnxruntime_decode.py on the same file and print the ratio.
    #[arg(long)]
    pub ort: bool,
    /// Intra-op threads for ONNX Runtime; 0 keeps its default (all cores).
    #[arg(long, default_value_t = 0)]
    pub ort_threads: usize,
    /// Also run llama.cpp (bench/llama_cpp.py) on the same model, with these weights, on the
    /// same number of threads as kaiwa, and print the ratios. The first run builds llama.cpp
    /// from PyPI's llama-cpp-python source (needs the package index and a few minutes).
    #[arg(long, value_enum, value_delimiter = ',', num_args = 0.., default_missing_value = "f32,q8_0")]
    pub llama_cpp: Vec<kaiwa::bench::LlamaCppWeights>,
    /// Print the reports as JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TrainBenchArgs {
    #[arg(long, value_enum, default_value = "small")]
    pub preset: Preset,
    /// Vocabulary size of the benchmark model.
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// The architecture (and vocabulary) of this model directory's config.json instead of a
    /// preset, e.g. a SmolLM2-135M or Qwen2.5 directory (weights are drawn at random).
    #[arg(long, conflicts_with_all = ["preset", "vocab"])]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Forward/backward passes per step (gradient accumulation; two at a time run side by
    /// side on two threads).
    #[arg(long, default_value_t = 2)]
    pub micro_batches: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Also run bench/pytorch_train.py with the same shapes and print the ratio.
    #[arg(long)]
    pub pytorch: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl TrainBenchArgs {
    /// The preset with the benchmark's vocabulary, and positions for its context; or the
    /// architecture of `--model`, whose context must hold the benchmark's.
    pub fn config(&self) -> Result<LlamaConfig> {
        if let Some(dir) = &self.model {
            let config = kaiwa::model::load_config(dir)
                .with_context(|| format!("reading the architecture of {}", dir.display()))?;
            if config.context_len() < self.context {
                bail!(
                    "--context {} is longer than the {} positions of {}",
                    self.context,
                    config.context_len(),
                    dir.display()
                );
            }
            return Ok(config);
        }
        let mut config = LlamaConfig::preset(self.preset);
        config.vocab_size = self.vocab;
        config.max_position_embeddings = config.max_position_embeddings.max(self.context);
        Ok(config)
    }
}

#[derive(Args)]
pub struct CorpusBenchArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Also run it on this PostgreSQL server (postgres://USER:PASSWORD@HOST/DATABASE, a role
    /// that may create schemas), in a schema of its own that is dropped afterwards: both
    /// engines are reported, from one run on this machine, with their ratio.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Scratch directory [default: a temporary one, removed afterwards].
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ReplyBenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub threads: ThreadsArg,
    #[command(flatten)]
    pub engine: EngineArg,
    /// Store sizes in pairs, cumulative (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u64, 100_000, 1_000_000])]
    pub pairs: Vec<u64>,
    /// Sentence pairs the synthetic dialogue is drawn from.
    #[arg(long, default_value = "data/starter/tanaka_ja_en.tsv.gz")]
    pub sentences: PathBuf,
    /// Suite files or directories whose prompts are asked.
    #[arg(long, default_value = "evals")]
    pub suite: Vec<PathBuf>,
    /// Also run it on this PostgreSQL server (postgres://USER:PASSWORD@HOST/DATABASE, a role
    /// that may create schemas), in a schema of its own that is dropped afterwards: both
    /// engines are reported, from one run on this machine, with their ratio.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Scratch directory [default: a temporary one, removed afterwards].
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct BotBenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Channels talking at once (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 20, 100])]
    pub channels: Vec<usize>,
    /// Messages each person writes in turn.
    #[arg(long, default_value_t = 3)]
    pub per_channel: usize,
    /// Suite files or directories whose prompts are written.
    #[arg(long, default_value = "evals")]
    pub suite: Vec<PathBuf>,
    /// telegram (the real adapter over HTTP, against a loopback Bot API) or outbox (in
    /// process, no HTTP).
    #[arg(long, default_value = "telegram")]
    pub through: kaiwa::bench::bot::Through,
}

#[derive(Args)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Concurrent clients (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    pub clients: Vec<usize>,
    /// Requests each client makes in turn.
    #[arg(long, default_value_t = 4)]
    pub per_client: usize,
    /// Store every exchange, as in use (by default the HTTP requests say "store": false,
    /// so both paths do the same work).
    #[arg(long)]
    pub stored: bool,
    /// Suite files or directories whose prompts are asked.
    #[arg(long, default_value = "evals")]
    pub suite: Vec<PathBuf>,
}

// Retraining and versions.

#[derive(Args)]
pub struct HomeArg {
    /// The model home: versions/, runs/ and `current`, the link to the deployed version. Point
    /// MODEL_DIR at it and daemons load `current` [default: models/home].
    #[arg(long, default_value = "models/home")]
    pub home: PathBuf,
}

#[derive(Args)]
pub struct RetrainArgs {
    #[command(flatten)]
    pub home: HomeArg,
    /// The model a new home starts from (its version 1) [default: $MODEL_DIR or models/kaiwa].
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Training time, e.g. 90s, 20m, 1h30m.
    #[arg(long, value_parser = kaiwa::train::run::parse_duration, default_value = "20m")]
    pub time: std::time::Duration,
    /// Optimizer steps (within the time budget).
    #[arg(long)]
    pub steps: Option<usize>,
    /// With fewer new examples than this, stop without training.
    #[arg(long, default_value_t = 20)]
    pub min_new: u64,
    /// Earlier examples replayed per new one, so the model does not forget them.
    #[arg(long, default_value_t = 1.0)]
    pub replay: f64,
    /// The share of new conversations held out for the gate.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Which conversations are training data (see export-corpus).
    #[arg(long, value_enum, default_value_t = ExportMode::All)]
    pub mode: ExportMode,
    /// Suite files or directories [default: evals/ if there is one here].
    #[arg(long)]
    pub suite: Vec<PathBuf>,
    #[arg(long)]
    pub no_suite: bool,
    /// Held-out bits per byte the candidate may lose.
    #[arg(long, default_value_t = 0.01)]
    pub bpb_tolerance: f64,
    /// Suite cases the candidate may pass fewer of.
    #[arg(long, default_value_t = 0)]
    pub case_tolerance: u64,
    /// Peak learning rate of the fine-tuning.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluation threads [default: one per core].
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Checkpoint the training every N steps (a killed run continues from the last one).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Installed versions to keep; older ones are removed (never the deployed one or the one
    /// it was made from). Runs older than the last three keep only their reports.
    #[arg(long, default_value_t = 10)]
    pub keep_versions: usize,
}

impl RetrainArgs {
    pub fn options(&self) -> kaiwa::retrain::RetrainOptions {
        let base = self
            .base
            .clone()
            .unwrap_or_else(kaiwa::config::model_dir_from_env);
        let suites = match (self.no_suite, self.suite.is_empty()) {
            (true, _) => Vec::new(),
            (false, false) => self.suite.clone(),
            (false, true) if Path::new("evals").is_dir() => vec!["evals".into()],
            (false, true) => Vec::new(),
        };
        kaiwa::retrain::RetrainOptions {
            time_s: self.time.as_secs_f64(),
            steps: self.steps,
            min_new: self.min_new,
            replay: self.replay,
            val_fraction: self.val_fraction,
            mode: self.mode,
            suites,
            rules: GateRules {
                bpb_tolerance: self.bpb_tolerance,
                case_tolerance: self.case_tolerance,
            },
            lr: self.lr,
            seed: self.seed,
            threads: self.threads,
            checkpoint_every: self.checkpoint_every,
            keep_versions: self.keep_versions,
            ..kaiwa::retrain::RetrainOptions::new(&self.home.home, base)
        }
    }
}

#[derive(Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub home: HomeArg,
    /// The version to deploy [default: the one the deployed version was made from].
    #[arg(long)]
    pub to: Option<u32>,
}
