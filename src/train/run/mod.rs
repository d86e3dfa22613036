//! `kaiwa train`: a training run from corpus files to a model directory, with checkpoints, an
//! exact resume, metrics and a loss curve.
//!
//! A run lives in one folder (`--out`):
//!
//! ```text
//! run.json        what the run is: data files (with their SHA-256), architecture, schedule,
//!                 batch, budget — everything `--resume` needs, so it takes no other option
//! model/          the model directory: tokenizer, chat template, config, generation config;
//!                 model.safetensors and model.onnx are written when the run ends or stops
//! checkpoint/     the latest checkpoint: model.safetensors, optimizer.bpk (AdamW moments and
//!                 step counts), state.json (steps done, tokens seen, time spent)
//! metrics.jsonl   one line per step (loss, learning rate, gradient norm, tokens/s) and one per
//!                 validation (validation loss)
//! loss.svg        the loss curve, redrawn at every checkpoint
//! summary.json    the figures of the finished (or stopped) run
//! ```
//!
//! **Exact resume.** Which rows a step trains on is a function of the step number alone (the
//! rows of epoch `e` in the permutation seeded by `(seed, e)`, taken in batch-sized slices), the
//! parameters are numbered so the saved optimizer state attaches to them again, and weights and
//! moments are saved in f32, so a run stopped after a checkpoint and resumed computes the very
//! same steps as one that was never stopped. There is no other random state: the model has no
//! dropout, and the initial weights are a pure function of the seed.
//!
//! **Budgets.** `--steps N` fixes the schedule. `--time 20m` alone times the first steps (still
//! in warm-up, whose learning rates do not depend on the total) and fixes the total from that;
//! the total is then stored in `run.json`, so a resumed run keeps the same schedule. With both,
//! the schedule follows `--steps` and the time is a hard stop. Time spent is summed across
//! resumes.
//!
//! The entry points and what defines a run are here; `training_loop.rs` is the loop,
//! `checkpoint.rs` saves and restores the state a resume needs, and `metrics.rs` writes
//! `metrics.jsonl`, reports progress and redraws the loss curve.

mod checkpoint;
mod metrics;
mod training_loop;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::Objective;
use super::optim::{AdamWSettings, Schedule};
use crate::dataset::DatasetError;
use crate::model::chat_template::TokenizerConfig;
use crate::model::{
    load_config, LlamaConfig, LlamaWeights, ModelError, TextTokenizer, CHAT_TEMPLATE_FILE,
    CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
};
use crate::train::init::{random_weights, write_model_files};

pub use checkpoint::RunState;
pub use metrics::{LogProgress, Metric, Progress};
pub use training_loop::step_batches;

/// File and folder names inside a run folder.
pub const RUN_FILE: &str = "run.json";
pub const MODEL_DIR: &str = "model";
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.svg";
pub const SUMMARY_FILE: &str = "summary.json";

/// The fewest steps timed to fix the total under a time budget (more, up to 10, when the
/// warm-up is longer).
const CALIBRATION_STEPS: usize = 5;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DatasetError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0} already holds a training run: resume it with --resume, or choose another --out")]
    RunExists(PathBuf),
    #[error("{path} changed since the run started (SHA-256 {now}, was {was}): a resumed run must see the same data")]
    DataChanged {
        path: PathBuf,
        was: String,
        now: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the weights of a new run come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// A new model of this architecture (`vocab_size` and the special ids are taken from the
    /// tokenizer), initialised from `seed`, with the tokenizer in this folder (what
    /// `kaiwa train-tokenizer` writes: `tokenizer.json`, optionally `tokenizer_config.json`).
    Fresh {
        architecture: Box<LlamaConfig>,
        tokenizer: PathBuf,
    },
    /// Continue training an existing model directory (fine-tuning), keeping its tokenizer,
    /// chat template and architecture.
    From(PathBuf),
}

/// A data file of the run, with the hash that `--resume` checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    pub path: PathBuf,
    #[serde(default)]
    pub sha256: String,
}

/// Everything that defines a run; stored as `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub start: Start,
    /// Training files: chat JSONL (`export-corpus`), text, or sentence pairs (`.gz` too).
    pub data: Vec<DataFile>,
    /// Held-out file for the validation loss; none means no validation.
    pub validation: Option<DataFile>,
    pub objective: Objective,
    /// Tokens per row (at most the model's `max_position_embeddings`).
    pub context: usize,
    /// Rows per optimizer step.
    pub batch_rows: usize,
    /// Rows per forward/backward pass; `batch_rows / micro_batch_rows` passes are accumulated,
    /// two at a time side by side on two threads.
    pub micro_batch_rows: usize,
    pub steps: Option<usize>,
    pub time_s: Option<f64>,
    /// The total steps of the schedule, once known (see the module docs).
    pub total_steps: Option<usize>,
    pub peak_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub adamw: AdamWSettings,
    pub seed: u64,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Validation rows (at most).
    pub eval_rows: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
}

impl RunSpec {
    /// A run with the usual settings for `start` on `data`.
    pub fn new(start: Start, data: Vec<PathBuf>) -> Self {
        RunSpec {
            start,
            data: data
                .into_iter()
                .map(|path| DataFile {
                    path,
                    sha256: String::new(),
                })
                .collect(),
            validation: None,
            objective: Objective::Chat,
            context: 256,
            batch_rows: 16,
            micro_batch_rows: 8,
            steps: None,
            time_s: None,
            total_steps: None,
            peak_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 50,
            adamw: AdamWSettings::default(),
            seed: 0,
            eval_every: 100,
            eval_rows: 64,
            checkpoint_every: 200,
        }
    }

    fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Invalid(m.to_string()));
        if self.data.is_empty() {
            return bad("no training data (--data FILE)");
        }
        if self.steps.is_none() && self.time_s.is_none() {
            return bad("give a budget: --steps N and/or --time 20m");
        }
        if self.steps == Some(0) || self.time_s.is_some_and(|t| t.is_nan() || t <= 0.0) {
            return bad("the budget must be positive");
        }
        if self.steps.is_none() && self.warmup_steps < CALIBRATION_STEPS {
            return bad("a time budget without --steps needs --warmup 5 or more");
        }
        if self.context < 2 || self.batch_rows == 0 || self.micro_batch_rows == 0 {
            return bad("--context must be at least 2 and the batch sizes positive");
        }
        if !self.batch_rows.is_multiple_of(self.micro_batch_rows) {
            return bad("--batch must be a multiple of --micro-batch");
        }
        if !(self.peak_lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.peak_lr) {
            return bad("learning rates must satisfy 0 <= --min-lr <= --lr, --lr > 0");
        }
        Ok(())
    }

    fn schedule(&self, total_steps: usize) -> Schedule {
        Schedule {
            peak_lr: self.peak_lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            total_steps,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps_done: usize,
    pub total_steps: usize,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    /// Mean training loss of the last steps (up to 20).
    pub final_loss: Option<f32>,
    pub val_loss: Option<f32>,
    pub parameters: usize,
    pub train_rows: usize,
    pub examples: usize,
    pub skipped_examples: usize,
    /// Stopped by a signal before the budget ran out (resume with `--resume`).
    pub interrupted: bool,
    pub model_dir: PathBuf,
}

/// Starts a new run in `out`, which must not already hold one.
pub fn train(
    mut spec: RunSpec,
    out: &Path,
    stop: &AtomicBool,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    spec.validate()?;
    if out.join(RUN_FILE).exists() {
        return Err(TrainError::RunExists(out.to_path_buf()));
    }
    for file in spec.data.iter_mut().chain(spec.validation.as_mut()) {
        file.sha256 = file_sha256(&file.path)?;
    }
    let model_dir = out.join(MODEL_DIR);
    let (config, weights) = prepare_model_dir(&spec, &model_dir)?;
    if spec.context > config.context_len() {
        return Err(TrainError::Invalid(format!(
            "--context {} is longer than the model's {} positions",
            spec.context,
            config.context_len()
        )));
    }
    write_json_atomic(&out.join(RUN_FILE), &spec)?;
    let _ = std::fs::remove_file(out.join(METRICS_FILE));
    training_loop::run(spec, out, config, weights, None, stop, progress)
}

/// Continues the run in `out` from its last checkpoint.
pub fn resume(
    out: &Path,
    stop: &AtomicBool,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    let spec: RunSpec = read_json(&out.join(RUN_FILE))?;
    for file in spec.data.iter().chain(spec.validation.as_ref()) {
        let now = file_sha256(&file.path)?;
        if now != file.sha256 {
            return Err(TrainError::DataChanged {
                path: file.path.clone(),
                was: file.sha256.clone(),
                now,
            });
        }
    }
    let model_dir = out.join(MODEL_DIR);
    let config = load_config(&model_dir)?;
    let (state, weights) = checkpoint::load(out, &config)?;
    training_loop::run(spec, out, config, weights, Some(state), stop, progress)
}

/// Writes the model directory's files but the weights, and returns the config and the starting
/// weights.
fn prepare_model_dir(
    spec: &RunSpec,
    model_dir: &Path,
) -> Result<(LlamaConfig, LlamaWeights), TrainError> {
    std::fs::create_dir_all(model_dir).map_err(io(model_dir))?;
    match &spec.start {
        Start::Fresh {
            architecture,
            tokenizer,
        } => {
            let tok = TextTokenizer::load(&tokenizer.join(TOKENIZER_FILE))?;
            let tokenizer_config = if tokenizer.join(TOKENIZER_CONFIG_FILE).exists() {
                TokenizerConfig::load(tokenizer)?
            } else {
                TokenizerConfig::chatml()
            };
            let mut architecture = LlamaConfig::clone(architecture);
            architecture.vocab_size = tok.vocab_size();
            let config = write_model_files(architecture, &tok, tokenizer_config, model_dir)?;
            let weights = random_weights(&config, spec.seed);
            Ok((config, weights))
        }
        Start::From(dir) => {
            let config = load_config(dir)?;
            let weights = LlamaWeights::load_dir(&config, dir)?;
            for name in [
                CONFIG_FILE,
                TOKENIZER_FILE,
                TOKENIZER_CONFIG_FILE,
                CHAT_TEMPLATE_FILE,
                GENERATION_CONFIG_FILE,
            ] {
                let from = dir.join(name);
                if from.exists() {
                    let to = model_dir.join(name);
                    std::fs::copy(&from, &to).map_err(io(&to))?;
                }
            }
            Ok((config, weights))
        }
    }
}

fn file_sha256(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TrainError> {
    Ok(crate::model::read_json(path)?)
}

/// Writes JSON (as [`crate::model::write_json`] does) durably over `path`.
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| crate::model::ModelError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::fsio::write_atomic(path, (text + "\n").as_bytes()).map_err(io(path))
}

/// Parses a duration such as `90s`, `20m`, `1h30m` or `45` (seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds_to_duration(seconds, text);
    }
    let mut total = 0.0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => {
                return Err(format!(
                    "{text:?}: use a number with h, m or s (e.g. 20m, 1h30m)"
                ))
            }
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: a unit needs a number before it"))?;
        total += value * unit;
        number.clear();
    }
    if !number.is_empty() {
        return Err(format!("{text:?}: the last number has no unit"));
    }
    seconds_to_duration(total, text)
}

fn seconds_to_duration(seconds: f64, text: &str) -> Result<Duration, String> {
    if seconds.is_finite() && seconds > 0.0 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(format!("{text:?}: the duration must be positive"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_without() {
        let s = |t: &str| parse_duration(t).map(|d| d.as_secs_f64());
        assert_eq!(s("90"), Ok(90.0));
        assert_eq!(s("90s"), Ok(90.0));
        assert_eq!(s("20m"), Ok(1200.0));
        assert_eq!(s("1h30m"), Ok(5400.0));
        assert_eq!(s("1.5m"), Ok(90.0));
        for bad in ["", "0", "-3", "20x", "m", "1h30", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
