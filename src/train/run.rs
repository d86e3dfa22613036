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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::convert::to_weights;
use super::data::{epoch_order, pack, Objective, PackedData};
use super::model::Llama;
use super::optim::{AdamWSettings, Schedule};
use super::plot::{write_svg, Series};
use super::step::{batch_loss, parameter_count, retain_freed_memory, Batch, StepReport, Trainer};
use crate::dataset::sequence::SequenceBuilder;
use crate::dataset::{Dataset, DatasetError};
use crate::model::chat_template::TokenizerConfig;
use crate::model::init::{random_weights, write_model_files};
use crate::model::onnx_export::{export_onnx, ExportOptions};
use crate::model::{
    load_config, LlamaConfig, LlamaWeights, ModelError, TextTokenizer, CHAT_TEMPLATE_FILE,
    CONFIG_FILE, GENERATION_CONFIG_FILE, ONNX_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
    WEIGHTS_FILE,
};

/// File and folder names inside a run folder.
pub const RUN_FILE: &str = "run.json";
pub const MODEL_DIR: &str = "model";
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.svg";
pub const SUMMARY_FILE: &str = "summary.json";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";

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

/// The progress a checkpoint records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub steps_done: usize,
    /// Input tokens processed (rows × context).
    pub tokens_seen: u64,
    /// Training time spent, summed over resumes.
    pub elapsed_s: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Metric {
    Step {
        step: usize,
        loss: f32,
        lr: f64,
        grad_norm: f32,
        tokens: u64,
        tokens_per_s: f64,
        elapsed_s: f64,
    },
    Validation {
        step: usize,
        val_loss: f32,
    },
}

impl Metric {
    fn step(&self) -> usize {
        match self {
            Metric::Step { step, .. } | Metric::Validation { step, .. } => *step,
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

/// What the caller sees while a run goes on.
pub trait Progress {
    /// Called once the total is known.
    fn start(&mut self, done: usize, total: usize);
    /// Called after every step.
    fn step(&mut self, report: &StepReport, done: usize, total: usize, tokens_per_s: f64);
    /// A line worth showing (validation, checkpoint).
    fn note(&mut self, line: &str);
    fn finish(&mut self);
}

/// Progress that only logs (every 10 % of the run and the notes).
pub struct LogProgress;

impl Progress for LogProgress {
    fn start(&mut self, _done: usize, _total: usize) {}

    fn step(&mut self, report: &StepReport, done: usize, total: usize, tokens_per_s: f64) {
        let every = (total / 10).max(1);
        if done.is_multiple_of(every) || done == total {
            tracing::info!(
                step = done,
                total,
                loss = format!("{:.4}", report.loss),
                tokens_per_s = format!("{tokens_per_s:.0}"),
                "training"
            );
        }
    }

    fn note(&mut self, line: &str) {
        tracing::info!("{line}");
    }

    fn finish(&mut self) {}
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
    if spec.context > config.max_position_embeddings {
        return Err(TrainError::Invalid(format!(
            "--context {} is longer than the model's {} positions",
            spec.context, config.max_position_embeddings
        )));
    }
    write_json_atomic(&out.join(RUN_FILE), &spec)?;
    let _ = std::fs::remove_file(out.join(METRICS_FILE));
    run(spec, out, config, weights, None, stop, progress)
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
    let checkpoint = out.join(CHECKPOINT_DIR);
    // A run killed while swapping its checkpoint in left the previous one set aside.
    crate::fsio::recover_dir(&checkpoint).map_err(io(&checkpoint))?;
    if !checkpoint.join(STATE_FILE).exists() {
        return Err(TrainError::Invalid(format!(
            "{} has no checkpoint to resume from",
            out.display()
        )));
    }
    let state: RunState = read_json(&checkpoint.join(STATE_FILE))?;
    let weights = LlamaWeights::load(&config, &checkpoint.join(WEIGHTS_FILE))?;
    run(spec, out, config, weights, Some(state), stop, progress)
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
            let weights = LlamaWeights::load(&config, &dir.join(WEIGHTS_FILE))?;
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

/// The packed rows of every data file, in the run's seeded order.
fn load_rows(
    spec: &RunSpec,
    files: &[DataFile],
    builder: &SequenceBuilder,
    eos: u32,
) -> Result<PackedData, TrainError> {
    let mut examples = Vec::new();
    for file in files {
        let dataset = Dataset::read(&file.path, None)?;
        tracing::info!(
            file = %file.path.display(),
            format = dataset.format.name(),
            examples = dataset.examples.len(),
            "read"
        );
        examples.extend(dataset.examples);
    }
    Ok(pack(
        builder,
        &examples,
        spec.objective,
        eos,
        spec.context,
        spec.seed,
    )?)
}

fn run(
    mut spec: RunSpec,
    out: &Path,
    config: LlamaConfig,
    weights: LlamaWeights,
    resumed: Option<RunState>,
    stop: &AtomicBool,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    retain_freed_memory();
    let model_dir = out.join(MODEL_DIR);
    let tokenizer = TextTokenizer::load(&model_dir.join(TOKENIZER_FILE))?;
    let builder = SequenceBuilder::for_model(&model_dir, &tokenizer)?;
    let eos = config.eos_ids().first().copied().ok_or_else(|| {
        TrainError::Invalid("the model's config.json names no eos_token_id".into())
    })?;
    let train_data = load_rows(&spec, &spec.data, &builder, eos)?;
    if train_data.rows.is_empty() {
        return Err(TrainError::Invalid(format!(
            "no training rows: {} examples used, {} skipped{}",
            train_data.examples,
            train_data.skipped,
            train_data
                .first_skip_reason
                .as_deref()
                .map(|r| format!(" (first: {r})"))
                .unwrap_or_default()
        )));
    }
    let validation = match &spec.validation {
        Some(file) => {
            let mut rows = load_rows(&spec, std::slice::from_ref(file), &builder, eos)?;
            rows.rows.truncate(spec.eval_rows);
            rows.masks.truncate(spec.eval_rows);
            Some(rows)
        }
        None => None,
    };
    tracing::info!(
        rows = train_data.rows.len(),
        examples = train_data.examples,
        skipped = train_data.skipped,
        tokens = train_data.rows.len() * spec.context,
        "training data packed"
    );

    let device = Device::flex().autodiff();
    let model = Llama::from_weights(&config, &weights, &device);
    drop(weights);
    let parameters = parameter_count(&model);
    let mut state = resumed.clone().unwrap_or_default();
    // Before the total is known, any value past the warm-up gives the same learning rates.
    let provisional = spec.total_steps.or(spec.steps).unwrap_or(usize::MAX / 2);
    let mut trainer = match &resumed {
        Some(s) => Trainer::resume(
            model,
            spec.adamw.clone(),
            spec.schedule(provisional),
            device.clone(),
            &out.join(CHECKPOINT_DIR).join(OPTIMIZER_FILE),
            s.steps_done,
        )?,
        None => Trainer::new(
            model,
            spec.adamw.clone(),
            spec.schedule(provisional),
            device.clone(),
        ),
    };
    let mut metrics = MetricsFile::open(&out.join(METRICS_FILE), state.steps_done)?;

    let time_budget = spec.time_s.map(Duration::from_secs_f64);
    let mut total = spec.total_steps.or(spec.steps).unwrap_or(usize::MAX);
    if total != usize::MAX {
        progress.start(state.steps_done, total);
    }
    let session_start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let elapsed = |now: Instant| elapsed_before + (now - session_start).as_secs_f64();
    let mut calibration: Vec<f64> = Vec::new();
    let mut recent: Vec<f32> = Vec::new();
    let mut last_val = None;
    let mut interrupted = false;
    let tokens_per_step = (spec.batch_rows * spec.context) as u64;

    while state.steps_done < total {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        if time_budget.is_some_and(|b| elapsed(Instant::now()) >= b.as_secs_f64()) {
            progress.note("the time budget is spent");
            break;
        }
        let step_start = Instant::now();
        let micro = step_batches(&spec, &train_data, state.steps_done);
        let report = trainer.step(&micro);
        let step_s = step_start.elapsed().as_secs_f64();
        if !report.loss.is_finite() {
            return Err(TrainError::Invalid(format!(
                "the loss is {} at step {}: lower --lr",
                report.loss, state.steps_done
            )));
        }
        state.steps_done += 1;
        state.tokens_seen += tokens_per_step;
        state.elapsed_s = elapsed(Instant::now());
        let tokens_per_s = tokens_per_step as f64 / step_s.max(1e-9);
        recent.push(report.loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        metrics.write(&Metric::Step {
            step: state.steps_done,
            loss: report.loss,
            lr: report.lr,
            grad_norm: report.grad_norm,
            tokens: state.tokens_seen,
            tokens_per_s,
            elapsed_s: state.elapsed_s,
        })?;

        if total == usize::MAX {
            // The first step pays for warming caches up; time the ones after it.
            if state.steps_done > 1 {
                calibration.push(step_s);
            }
            // Up to 10 steps, all within the warm-up.
            if calibration.len() + 1 >= spec.warmup_steps.clamp(CALIBRATION_STEPS, 10) {
                let budget = time_budget.map_or(0.0, |b| b.as_secs_f64());
                let mean = calibration.iter().sum::<f64>() / calibration.len() as f64;
                // 5 % of the time is left for validation and checkpoints.
                let remaining = ((budget - state.elapsed_s) / (mean * 1.05))
                    .floor()
                    .max(0.0) as usize;
                total = (state.steps_done + remaining).max(spec.warmup_steps + 1);
                spec.total_steps = Some(total);
                write_json_atomic(&out.join(RUN_FILE), &spec)?;
                trainer.set_total_steps(total);
                progress.start(state.steps_done, total);
                progress.note(&format!(
                    "{:.2} s a step: the schedule runs {total} steps",
                    mean
                ));
            }
        }
        progress.step(
            &report,
            state.steps_done,
            total.min(usize::MAX / 2),
            tokens_per_s,
        );

        if let (true, Some(val)) = (at_step(spec.eval_every, state.steps_done), &validation) {
            let loss = validate(
                &trainer,
                val,
                &spec,
                &device,
                state.steps_done,
                &mut metrics,
            )?;
            progress.note(&format!(
                "step {}: validation loss {loss:.4}",
                state.steps_done
            ));
            last_val = Some(loss);
        }
        if at_step(spec.checkpoint_every, state.steps_done) {
            save_checkpoint(out, &trainer, &config, &state)?;
            metrics.sync()?;
            plot(out, &metrics)?;
        }
    }

    // A final validation, unless the last step had one; a stopped run gets none, so its
    // metrics read as the first part of the uninterrupted run's.
    if let (Some(val), false) = (&validation, interrupted) {
        if last_val.is_none() || !at_step(spec.eval_every, state.steps_done) {
            let loss = validate(
                &trainer,
                val,
                &spec,
                &device,
                state.steps_done,
                &mut metrics,
            )?;
            last_val = Some(loss);
        }
    }
    save_checkpoint(out, &trainer, &config, &state)?;
    metrics.sync()?;
    plot(out, &metrics)?;
    progress.finish();

    // The model directory gets the weights and the ONNX graph: ready for `eval`, `chat`, the bot.
    let weights = to_weights(trainer.model(), &config)?;
    weights.save(&model_dir.join(WEIGHTS_FILE))?;
    export_onnx(
        &config,
        &weights,
        &model_dir.join(ONNX_FILE),
        &ExportOptions::default(),
    )?;

    let summary = TrainSummary {
        steps_done: state.steps_done,
        total_steps: if total == usize::MAX {
            state.steps_done
        } else {
            total
        },
        tokens_seen: state.tokens_seen,
        elapsed_s: state.elapsed_s,
        tokens_per_s: state.tokens_seen as f64 / state.elapsed_s.max(1e-9),
        final_loss: (!recent.is_empty()).then(|| recent.iter().sum::<f32>() / recent.len() as f32),
        val_loss: last_val,
        parameters,
        train_rows: train_data.rows.len(),
        examples: train_data.examples,
        skipped_examples: train_data.skipped,
        interrupted,
        model_dir,
    };
    write_json_atomic(&out.join(SUMMARY_FILE), &summary)?;
    Ok(summary)
}

fn at_step(every: usize, step: usize) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// The validation loss after `step`, written to the metrics.
fn validate(
    trainer: &Trainer,
    data: &PackedData,
    spec: &RunSpec,
    device: &Device,
    step: usize,
    metrics: &mut MetricsFile,
) -> Result<f32, TrainError> {
    let loss = validation_loss(trainer.model(), data, spec.micro_batch_rows, device);
    metrics.write(&Metric::Validation {
        step,
        val_loss: loss,
    })?;
    Ok(loss)
}

/// The micro-batches of optimizer step `step`: the next `batch_rows` rows of the epoch
/// permutations laid end to end.
pub fn step_batches(spec: &RunSpec, data: &PackedData, step: usize) -> Vec<Batch> {
    let rows = data.rows.len();
    let first = step * spec.batch_rows;
    let mut order_epoch = u64::MAX;
    let mut order = Vec::new();
    let picked: Vec<usize> = (first..first + spec.batch_rows)
        .map(|global| {
            let epoch = (global / rows) as u64;
            if epoch != order_epoch {
                order = epoch_order(rows, spec.seed, epoch);
                order_epoch = epoch;
            }
            order[global % rows]
        })
        .collect();
    picked
        .chunks(spec.micro_batch_rows)
        .map(|chunk| {
            let rows: Vec<(&[u32], &[bool])> = chunk
                .iter()
                .map(|&r| (data.rows[r].as_slice(), data.masks[r].as_slice()))
                .collect();
            Batch::from_masked(&rows)
        })
        .collect()
}

/// The mean loss over the masked-in targets of the validation rows.
fn validation_loss(model: &Llama, data: &PackedData, chunk: usize, device: &Device) -> f32 {
    let (mut sum, mut count) = (0.0f64, 0usize);
    let all: Vec<(&[u32], &[bool])> = data
        .rows
        .iter()
        .zip(&data.masks)
        .map(|(r, m)| (r.as_slice(), m.as_slice()))
        .collect();
    for rows in all.chunks(chunk.max(1)) {
        let batch = Batch::from_masked(rows);
        let n = batch.masked_in();
        if n > 0 {
            sum += f64::from(batch_loss(model, &batch, device)) * n as f64;
            count += n;
        }
    }
    (sum / count.max(1) as f64) as f32
}

fn save_checkpoint(
    out: &Path,
    trainer: &Trainer,
    config: &LlamaConfig,
    state: &RunState,
) -> Result<(), TrainError> {
    let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    to_weights(trainer.model(), config)?.save(&tmp.join(WEIGHTS_FILE))?;
    trainer.save_optimizer(&tmp.join(OPTIMIZER_FILE))?;
    write_json_atomic(&tmp.join(STATE_FILE), state)?;
    // Swap it in: the old checkpoint is removed only once the new one is complete on disk.
    let dir = out.join(CHECKPOINT_DIR);
    crate::fsio::replace_dir(&tmp, &dir).map_err(io(&dir))?;
    tracing::debug!(step = state.steps_done, "checkpoint saved");
    Ok(())
}

/// `metrics.jsonl`, appended to; on resume, the lines past the checkpoint are dropped so the
/// file reads as one uninterrupted run.
struct MetricsFile {
    path: PathBuf,
    file: std::fs::File,
    lines: Vec<Metric>,
}

impl MetricsFile {
    fn open(path: &Path, keep_through: usize) -> Result<Self, TrainError> {
        let mut lines = Vec::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                // A line cut short by a crash is dropped with everything after it.
                let Ok(metric) = serde_json::from_str::<Metric>(line) else {
                    break;
                };
                if metric.step() > keep_through {
                    break;
                }
                lines.push(metric);
            }
        }
        let mut text = String::new();
        for metric in &lines {
            text.push_str(&serde_json::to_string(metric).unwrap_or_default());
            text.push('\n');
        }
        std::fs::write(path, text).map_err(io(path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(MetricsFile {
            path: path.to_path_buf(),
            file,
            lines,
        })
    }

    fn write(&mut self, metric: &Metric) -> Result<(), TrainError> {
        let mut line = serde_json::to_string(metric)
            .map_err(|e| TrainError::Invalid(format!("metrics: {e}")))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io(&self.path))?;
        self.lines.push(metric.clone());
        Ok(())
    }

    fn sync(&self) -> Result<(), TrainError> {
        self.file.sync_data().map_err(io(&self.path))
    }
}

/// Redraws `loss.svg` from the metrics so far.
fn plot(out: &Path, metrics: &MetricsFile) -> Result<(), TrainError> {
    let mut train = Vec::new();
    let mut val = Vec::new();
    for m in &metrics.lines {
        match m {
            Metric::Step { step, loss, .. } => train.push((*step as f64, f64::from(*loss))),
            Metric::Validation { step, val_loss } => val.push((*step as f64, f64::from(*val_loss))),
        }
    }
    let mut series = vec![Series {
        label: "training loss (mean of 10 steps)".into(),
        points: smooth(&train, 10),
        color: [31, 119, 180],
        markers: false,
    }];
    if !val.is_empty() {
        series.push(Series {
            label: "validation loss".into(),
            points: val,
            color: [214, 39, 40],
            markers: true,
        });
    }
    let path = out.join(PLOT_FILE);
    write_svg(&path, "kaiwa train", "step", "loss (nats/token)", &series)
        .map_err(|e| TrainError::Invalid(format!("drawing {}: {e}", path.display())))
}

/// A trailing moving average over `window` points, for a readable curve.
fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
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

    #[test]
    fn smoothing_averages_a_trailing_window() {
        let pts = [(1.0, 4.0), (2.0, 2.0), (3.0, 0.0)];
        assert_eq!(smooth(&pts, 2), vec![(1.0, 4.0), (2.0, 3.0), (3.0, 1.0)]);
    }
}
