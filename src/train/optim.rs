//! AdamW, its learning-rate schedule, and global-norm gradient clipping.
//!
//! burn's `AdamWConfig` defaults differ from the usual language-model settings (eps 1e-5,
//! weight decay 1e-4, beta2 0.999) and its built-in clipping is per tensor, so every setting is
//! spelled out here and clipping is done over all gradients together, as PyTorch's
//! `clip_grad_norm_` does. Weight decay applies to matrices only (rank ≥ 2: projections and
//! embeddings, as nanoGPT does), never to norm gains.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;

/// Optimizer settings; `Default` is the GPT-style recipe.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWSettings {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled decay, applied to matrices only.
    pub weight_decay: f32,
    /// Clip the global L2 norm of all gradients to this; `None` disables clipping.
    pub clip_norm: Option<f32>,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip_norm: Some(1.0),
        }
    }
}

/// Linear warm-up from zero to `peak_lr` over `warmup_steps`, then a cosine decay to `min_lr`
/// at `total_steps`, flat after that.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.peak_lr - self.min_lr) * cosine
    }
}

/// AdamW over `model`'s parameters: decay on matrices, none on vectors.
pub fn adamw(settings: &AdamWSettings, model: &impl Module) -> ModuleOptimizer {
    let config = |weight_decay: f32| {
        AdamWConfig::new()
            .with_beta_1(settings.beta1)
            .with_beta_2(settings.beta2)
            .with_epsilon(settings.eps)
            .with_weight_decay(weight_decay)
    };
    let mut ranks = ParamRanks::default();
    model.visit(&mut ranks);
    let vectors = ParamGroup::from_ids(ranks.vectors);
    config(settings.weight_decay)
        .init()
        .with_group(vectors, config(0.0).build(), None)
}

/// Scales `grads` so their global L2 norm is at most `max_norm`, and returns the norm before
/// clipping. Reads one scalar back from the device.
pub fn clip_global_norm(
    model: &impl Module,
    grads: GradientsParams,
    max_norm: Option<f32>,
) -> (GradientsParams, f32) {
    let mut squares = SquaredNorm {
        grads: &grads,
        total: None,
    };
    model.visit(&mut squares);
    let norm = squares
        .total
        .map(|t| t.into_scalar::<f32>().sqrt())
        .unwrap_or(0.0);
    let Some(max_norm) = max_norm else {
        return (grads, norm);
    };
    // The same epsilon as torch.nn.utils.clip_grad_norm_.
    let scale = max_norm / (norm + 1e-6);
    if scale >= 1.0 {
        return (grads, norm);
    }
    let mut scaler = Scale {
        grads,
        factor: scale,
    };
    model.visit(&mut scaler);
    (scaler.grads, norm)
}

#[derive(Default)]
struct ParamRanks {
    vectors: Vec<ParamId>,
}

impl ModuleVisitor for ParamRanks {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if D < 2 {
            self.vectors.push(param.id);
        }
    }
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let sum = grad.square().sum();
            self.total = Some(match self.total.take() {
                Some(total) => total.add(sum),
                None => sum,
            });
        }
    }
}

struct Scale {
    grads: GradientsParams,
    factor: f32,
}

impl ModuleVisitor for Scale {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads
                .register::<D>(param.id, grad.mul_scalar(self.factor));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_the_floor() {
        let s = Schedule {
            peak_lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-12, "half way is the mean");
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        assert!((s.lr(500) - 1e-4).abs() < 1e-12);
    }
}
