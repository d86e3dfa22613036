//! One optimizer step: forward, masked loss, backward over one or more micro-batches, global-norm
//! clipping, AdamW. The loop around it (data, evaluation, checkpoints) belongs to the caller.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use std::path::Path;

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Device, Tensor, TensorData};

use super::convert::{number_params, renumber};
use super::loss::{cross_entropy_sum, SummedLoss};
use super::model::Llama;
use super::optim::{adamw, clip_global_norm, AdamWSettings, Schedule};
use crate::model::ModelError;

/// `batch` sequences of `time` tokens, with the next-token targets and a loss mask, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub time: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// Whether each target counts toward the loss (e.g. assistant tokens).
    pub mask: Vec<bool>,
}

impl Batch {
    /// Language-model batch from rows of `time + 1` tokens: every next token counts.
    pub fn from_rows(rows: &[Vec<u32>]) -> Self {
        let masks: Vec<Vec<bool>> = rows
            .iter()
            .map(|r| vec![true; r.len().saturating_sub(1)])
            .collect();
        let refs: Vec<(&[u32], &[bool])> = rows
            .iter()
            .zip(&masks)
            .map(|(r, m)| (r.as_slice(), m.as_slice()))
            .collect();
        Self::from_masked(&refs)
    }

    /// A batch from rows of `time + 1` tokens, each with the `time` flags saying which targets
    /// count (what [`super::data::pack`] makes). Every row must have the length of the first.
    pub fn from_masked(rows: &[(&[u32], &[bool])]) -> Self {
        let time = rows.first().map_or(0, |(r, _)| r.len().saturating_sub(1));
        let mut inputs = Vec::with_capacity(rows.len() * time);
        let mut targets = Vec::with_capacity(rows.len() * time);
        let mut mask = Vec::with_capacity(rows.len() * time);
        for (row, flags) in rows {
            debug_assert!(row.len() == time + 1 && flags.len() == time, "ragged rows");
            inputs.extend_from_slice(&row[..time]);
            targets.extend_from_slice(&row[1..]);
            mask.extend_from_slice(&flags[..time]);
        }
        Batch {
            batch: rows.len(),
            time,
            inputs,
            targets,
            mask,
        }
    }

    pub fn masked_in(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }

    /// The summed next-token loss over the masked-in positions. Only those rows go through the
    /// output projection and the softmax.
    fn loss_sum(&self, model: &Llama, device: &Device) -> SummedLoss {
        let inputs = Tensor::from_data(
            TensorData::new(ids(&self.inputs), [self.batch, self.time]),
            device,
        );
        let mut hidden = model.forward_hidden(inputs);
        let masked_in = self.masked_in();
        let targets: Vec<u32> = if masked_in == self.mask.len() {
            self.targets.clone()
        } else {
            let rows: Vec<i64> = (0..self.mask.len())
                .filter(|&i| self.mask[i])
                .map(|i| i as i64)
                .collect();
            hidden = hidden.select(
                0,
                Tensor::from_data(TensorData::new(rows, [masked_in]), device),
            );
            self.targets
                .iter()
                .zip(&self.mask)
                .filter_map(|(&t, &m)| m.then_some(t))
                .collect()
        };
        let targets = Tensor::from_data(TensorData::new(ids(&targets), [masked_in]), device);
        cross_entropy_sum(model.project(hidden), targets)
    }
}

fn ids(tokens: &[u32]) -> Vec<i64> {
    tokens.iter().map(|&t| i64::from(t)).collect()
}

/// The loss of `model` on `batch`, without gradients (for evaluation and tests).
///
/// Runs on an inference copy (`Module::valid`): on an autodiff device a forward pass that is never
/// followed by `backward` keeps its whole graph, activations included, until the next backward
/// (about 600 MB per batch of 16 × 256 on the small preset).
pub fn batch_loss(model: &Llama, batch: &Batch, device: &Device) -> f32 {
    let model = model.valid();
    let sum = batch.loss_sum(&model, &device.clone().without_autodiff());
    sum.value.into_scalar::<f32>() / batch.masked_in().max(1) as f32
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean loss over the masked-in tokens of all micro-batches, before the update.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f64,
}

/// The model with its optimizer state and schedule: call [`Trainer::step`] once per optimizer step.
pub struct Trainer {
    /// Taken out while the optimizer consumes and returns it; always `Some` between steps.
    model: Option<Llama>,
    optimizer: ModuleOptimizer,
    settings: AdamWSettings,
    schedule: Schedule,
    step: usize,
    device: Device,
    parallel: bool,
}

impl Trainer {
    /// `device` must be an autodiff device (`Device::flex().autodiff()`), the one `model` is on.
    /// The parameters are renumbered (see [`number_params`]) so the optimizer state can be saved
    /// and attached again.
    pub fn new(model: Llama, settings: AdamWSettings, schedule: Schedule, device: Device) -> Self {
        let model = number_params(model);
        let optimizer = adamw(&settings, &model);
        Trainer {
            model: Some(model),
            optimizer,
            settings,
            schedule,
            step: 0,
            device,
            parallel: true,
        }
    }

    /// A trainer continuing from a checkpoint: `model` holds the saved weights, `optimizer`
    /// the file [`Trainer::save_optimizer`] wrote after `steps_done` steps.
    pub fn resume(
        model: Llama,
        settings: AdamWSettings,
        schedule: Schedule,
        device: Device,
        optimizer: &Path,
        steps_done: usize,
    ) -> Result<Self, ModelError> {
        let record = OptimizerRecord::load(optimizer).map_err(|e| ModelError::Weights {
            path: optimizer.to_path_buf(),
            reason: format!("optimizer state: {e}"),
        })?;
        if record.is_empty() && steps_done > 0 {
            return Err(ModelError::Weights {
                path: optimizer.to_path_buf(),
                reason: "the optimizer state is empty".into(),
            });
        }
        let model = number_params(model);
        let optimizer = adamw(&settings, &model).load_record(record);
        Ok(Trainer {
            model: Some(model),
            optimizer,
            settings,
            schedule,
            step: steps_done,
            device,
            parallel: true,
        })
    }

    /// Writes the optimizer state (AdamW moments and step counts, burn's burnpack format).
    pub fn save_optimizer(&self, path: &Path) -> Result<(), ModelError> {
        self.optimizer.save(path).map_err(|e| ModelError::Weights {
            path: path.to_path_buf(),
            reason: format!("optimizer state: {e}"),
        })
    }

    /// Fixes the length of the schedule (for a time budget, once the step time is known).
    pub fn set_total_steps(&mut self, total_steps: usize) {
        self.schedule.total_steps = total_steps;
    }

    /// The learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.schedule.lr(self.step)
    }

    pub fn model(&self) -> &Llama {
        self.model.as_ref().expect("present between steps")
    }

    pub fn into_model(self) -> Llama {
        self.model.expect("present between steps")
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// One optimizer step over `micro_batches` (gradient accumulation when there are several).
    /// Each micro-batch's loss is weighted by its share of the masked-in tokens, so the update
    /// is the one a single batch holding all of them would give.
    pub fn step(&mut self, micro_batches: &[Batch]) -> StepReport {
        let model = self.model.take().expect("present between steps");
        let total: usize = micro_batches.iter().map(Batch::masked_in).sum();
        let mut accumulator = GradientsAccumulator::new();
        let mut loss_sum = 0.0f32;
        // Micro-batches go through in pairs, the second of each pair on its own thread with a
        // shadow of the model (see `shadow`). The results are added in micro-batch order, so
        // the step is bit for bit the one a single thread computes.
        let shadow = (self.parallel && micro_batches.len() > 1).then(|| shadow(&model));
        for pair in micro_batches.chunks(if shadow.is_some() { 2 } else { 1 }) {
            let device = &self.device;
            let (first, second) = std::thread::scope(|scope| {
                let second = match (pair.get(1), &shadow) {
                    (Some(batch), Some(shadow)) => {
                        Some(scope.spawn(move || micro_step(shadow, batch, total, device)))
                    }
                    _ => None,
                };
                let first = micro_step(&model, &pair[0], total, device);
                (first, second.map(|h| h.join()))
            });
            if let Some((loss, grads)) = first {
                loss_sum += loss;
                accumulator.accumulate(&model, grads);
            }
            match (second, &shadow) {
                (Some(Ok(Some((loss, grads)))), Some(shadow)) => {
                    loss_sum += loss;
                    accumulator.accumulate(&model, rekey(shadow, &model, grads));
                }
                (Some(Err(panic)), _) => std::panic::resume_unwind(panic),
                _ => {}
            }
        }
        let (grads, grad_norm) =
            clip_global_norm(&model, accumulator.grads(), self.settings.clip_norm);
        let lr = self.schedule.lr(self.step);
        self.model = Some(self.optimizer.step(lr, model, grads));
        self.step += 1;
        StepReport {
            loss: loss_sum,
            grad_norm,
            lr,
        }
    }

    /// Runs micro-batches two at a time on two threads (on by default): about 1.2–1.4× faster
    /// on two cores, since one pass leaves a core idle between and inside its smaller ops
    /// (burn's element-wise ops and the optimizer are mostly single-threaded). The results are
    /// identical either way.
    pub fn set_parallel(&mut self, parallel: bool) {
        self.parallel = parallel;
    }
}

/// Forward and backward of one micro-batch: its share of the step's loss and its gradients,
/// keyed by `model`'s parameter ids. `None` when nothing in it is masked in.
fn micro_step(
    model: &Llama,
    batch: &Batch,
    total: usize,
    device: &Device,
) -> Option<(f32, GradientsParams)> {
    if batch.masked_in() == 0 {
        return None;
    }
    // Divide by the step's total instead of the micro-batch's count: sums add up.
    let loss = batch.loss_sum(model, device);
    let grads = loss.for_backward.div_scalar(total as f64).backward();
    let value = loss.value.into_scalar::<f32>() / total as f32;
    Some((value, GradientsParams::from_grads(grads, model)))
}

/// Parameter ids of a shadow start here (the model's are 1, 2, …).
const SHADOW_IDS: u64 = 1 << 40;

/// A copy of `model` whose parameters share its tensors' memory but are new autodiff leaves
/// with their own ids. burn keeps the graphs of passes that share a leaf under one lock, so two
/// passes over the same model would run their backward passes one after the other; over the
/// model and its shadow they run side by side.
fn shadow(model: &Llama) -> Llama {
    renumber(model.clone(), SHADOW_IDS + 1, true)
}

/// The shadow's gradients under the ids of the model's parameters (same module order).
fn rekey(shadow: &Llama, model: &Llama, mut grads: GradientsParams) -> GradientsParams {
    struct Ids(Vec<ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id);
        }
    }
    struct Move<'a> {
        from: std::slice::Iter<'a, ParamId>,
        grads: &'a mut GradientsParams,
        out: GradientsParams,
    }
    impl ModuleVisitor for Move<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(from) = self.from.next() {
                if let Some(grad) = self.grads.remove::<D>(*from) {
                    self.out.register::<D>(param.id, grad);
                }
            }
        }
    }
    let mut ids = Ids(Vec::new());
    shadow.visit(&mut ids);
    let mut mover = Move {
        from: ids.0.iter(),
        grads: &mut grads,
        out: GradientsParams::new(),
    };
    model.visit(&mut mover);
    mover.out
}

/// The number of parameters actually held by `model` (a check on `Config::parameter_count`).
pub fn parameter_count(model: &Llama) -> usize {
    model.num_params()
}

/// Tells glibc's allocator to keep freed memory instead of handing it back to the kernel.
///
/// A training step allocates and frees the same few hundred MB of activations every time. By
/// default glibc serves blocks over 32 MiB with fresh `mmap`s and returns them on `free`, so
/// every step pays for page faults and zeroing (about 20% of CPU time in a profile of the small
/// preset). Called once at the start of training; the process then holds its peak footprint.
/// Does nothing on other C libraries.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
