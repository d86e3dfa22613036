//! One AdamW update of a flat parameter: the parameter, its gradient and both moments in one
//! parallel pass. An optimizer step, not differentiated: it has no backward pass.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, Flex};
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{contiguous, tensor, values, FusedOps, ELEMENTS_PER_TASK};

/// The hyper-parameters of one AdamW update (see [`adamw_update`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    /// The factor the parameter is multiplied by before the update: `1 − lr · weight_decay`.
    pub decay: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    /// The bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ` of step `t`.
    pub bias_1: f32,
    pub bias_2: f32,
    pub epsilon: f32,
}

/// One AdamW update of the flat parameter `param` `[n]`: `(param, moment_1, moment_2)` after
/// it, in one parallel pass. Per element, in burn's order of operations:
/// `m ← β₁m + (1−β₁)g`, `v ← β₂v + g²(1−β₂)`, `p ← p·decay − lr · (m/b₁) / (√(v/b₂) + ε)`.
pub fn adamw_update(
    param: Tensor<1>,
    grad: Tensor<1>,
    moment_1: Tensor<1>,
    moment_2: Tensor<1>,
    step: AdamWStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let [n] = param.dims();
    let out = Tensor::<2>::from_dispatch(Dispatch::fused_adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        step.lr,
        step.decay,
        step.beta_1,
        step.beta_2,
        step.bias_1,
        step.bias_2,
        step.epsilon,
    ));
    let row = |i| out.clone().narrow(0, i, 1).reshape([n]);
    (row(0), row(1), row(2))
}

/// `[param, moment_1, moment_2]` after one update, concatenated.
fn adamw_forward(param: &[f32], grad: &[f32], m: &[f32], v: &[f32], s: &AdamWStep) -> Vec<f32> {
    let n = param.len();
    assert!(
        grad.len() == n && m.len() == n && v.len() == n,
        "adamw: the parameter, gradient and moments differ in size"
    );
    let (factor_1, factor_2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
    let mut out = vec![0.0; 3 * n];
    let (new_param, moments) = out.split_at_mut(n);
    let (new_m, new_v) = moments.split_at_mut(n);
    new_param
        .par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(new_m.par_chunks_mut(ELEMENTS_PER_TASK))
        .zip(new_v.par_chunks_mut(ELEMENTS_PER_TASK))
        .enumerate()
        .for_each(|(chunk, ((new_param, new_m), new_v))| {
            let start = chunk * ELEMENTS_PER_TASK;
            for (i, ((p, mo), vo)) in new_param
                .iter_mut()
                .zip(new_m.iter_mut())
                .zip(new_v.iter_mut())
                .enumerate()
            {
                let j = start + i;
                let g = grad[j];
                *mo = m[j] * s.beta_1 + g * factor_1;
                *vo = v[j] * s.beta_2 + g * g * factor_2;
                let delta = (*mo / s.bias_1) / ((*vo / s.bias_2).sqrt() + s.epsilon);
                *p = param[j] * s.decay - delta * s.lr;
            }
        });
    out
}

/// [`FusedOps::fused_adamw`] on Flex: the forward pass alone.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_flex(
    param: FlexTensor,
    grad: FlexTensor,
    moment_1: FlexTensor,
    moment_2: FlexTensor,
    lr: f32,
    decay: f32,
    beta_1: f32,
    beta_2: f32,
    bias_1: f32,
    bias_2: f32,
    epsilon: f32,
) -> FlexTensor {
    let step = AdamWStep {
        lr,
        decay,
        beta_1,
        beta_2,
        bias_1,
        bias_2,
        epsilon,
    };
    let [p, g, m, v] = [param, grad, moment_1, moment_2].map(contiguous);
    let n = values(&p).len();
    let out = adamw_forward(values(&p), values(&g), values(&m), values(&v), &step);
    tensor(out, &[3, n])
}

/// [`FusedOps::fused_adamw`] on `Autodiff<Flex>`: the update on the inner tensors.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_autodiff<C: CheckpointStrategy>(
    param: FloatTensor<Autodiff<Flex, C>>,
    grad: FloatTensor<Autodiff<Flex, C>>,
    moment_1: FloatTensor<Autodiff<Flex, C>>,
    moment_2: FloatTensor<Autodiff<Flex, C>>,
    lr: f32,
    decay: f32,
    beta_1: f32,
    beta_2: f32,
    bias_1: f32,
    bias_2: f32,
    epsilon: f32,
) -> FloatTensor<Autodiff<Flex, C>> {
    // An update is not differentiated: the result is a new, untracked tensor.
    FloatTensor::<Autodiff<Flex, C>>::new(Flex::fused_adamw(
        param.into_primitive(),
        grad.into_primitive(),
        moment_1.into_primitive(),
        moment_2.into_primitive(),
        lr,
        decay,
        beta_1,
        beta_2,
        bias_1,
        bias_2,
        epsilon,
    ))
}
