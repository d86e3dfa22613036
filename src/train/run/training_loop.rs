//! The training loop of a run, new or resumed: the packed data, the steps in their fixed order,
//! the time budget's calibration, validation, checkpoints, and at the end the model directory's
//! weights and ONNX graph and `summary.json`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Device;

use super::checkpoint::{self, RunState, OPTIMIZER_FILE};
use super::metrics::{plot, Metric, MetricsFile, Progress};
use super::{
    write_json_atomic, DataFile, RunSpec, TrainError, TrainSummary, CALIBRATION_STEPS,
    CHECKPOINT_DIR, METRICS_FILE, MODEL_DIR, RUN_FILE, SUMMARY_FILE,
};
use crate::dataset::sequence::SequenceBuilder;
use crate::dataset::Dataset;
use crate::model::onnx_export::{export_onnx, ExportOptions};
use crate::model::{
    LlamaConfig, LlamaWeights, TextTokenizer, ONNX_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
};
use crate::train::convert::to_weights;
use crate::train::data::{epoch_order, pack, PackedData};
use crate::train::model::Llama;
use crate::train::step::{batch_loss, parameter_count, retain_freed_memory, Batch, Trainer};

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

/// Trains from `weights` (and, on resume, the checkpoint's progress `resumed` and optimizer
/// state) until the budget is spent or `stop` is set, then writes the model directory's weights
/// and graph and the summary.
pub(super) fn run(
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
            checkpoint::save(out, &trainer, &config, &state)?;
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
    checkpoint::save(out, &trainer, &config, &state)?;
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
