//! RMSNorm over the rows of `x`: `y = x̂ · gain` with `x̂ = x · r`, `r = 1/√(mean(x²) + eps)`.
//! Backward, from `x`, the gain and each row's `r` saved by the forward pass:
//! `dx = r · (dy·g − x̂ · mean(dy·g·x̂))`, `dgain = Σ_rows dy · x̂`.

use std::fmt;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, Flex};
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{contiguous, dims, tensor, values, FusedOps, ROWS_PER_TASK};

/// RMSNorm of the rows of `x` with the learned `gain` (see [`FusedOps::fused_rms_norm`]).
pub fn rms_norm(x: Tensor<2>, gain: Tensor<1>, eps: f32) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::fused_rms_norm(
        x.into_dispatch(),
        gain.into_dispatch(),
        eps,
    ))
}

/// `(y, inv_rms)` for rows of `gain.len()` values.
fn rms_norm_forward(x: &[f32], gain: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = gain.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms_norm: {} values are not rows of the gain's {d}",
        x.len()
    );
    let mut y = vec![0.0; x.len()];
    let mut inv_rms = vec![0.0; x.len() / d];
    y.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(inv_rms.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|((y, inv_rms), x)| {
            for ((y, r), x) in y.chunks_mut(d).zip(inv_rms).zip(x.chunks(d)) {
                let mean_square = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                *r = (mean_square + eps).sqrt().recip();
                for ((y, &x), &g) in y.iter_mut().zip(x).zip(gain) {
                    *y = x * *r * g;
                }
            }
        });
    (y, inv_rms)
}

/// `(dx, dgain)` from the output gradient `dy`, with `x̂ = x · r`:
/// `dx = r · (dy·g − x̂ · mean(dy·g·x̂))`, `dgain = Σ_rows dy · x̂`.
fn rms_norm_backward(x: &[f32], gain: &[f32], inv_rms: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = gain.len();
    let mut dx = vec![0.0; x.len()];
    let partial_gains: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .zip(dy.par_chunks(d * ROWS_PER_TASK))
        .zip(inv_rms.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, x), dy), inv_rms)| {
            let mut dgain = vec![0.0f32; d];
            for (((dx, x), dy), &r) in dx
                .chunks_mut(d)
                .zip(x.chunks(d))
                .zip(dy.chunks(d))
                .zip(inv_rms)
            {
                let mut dot = 0.0f32;
                for ((&x, &dy), &g) in x.iter().zip(dy).zip(gain) {
                    dot += dy * g * x * r;
                }
                let mean = dot / d as f32;
                for ((((dx, &x), &dy), &g), dg) in
                    dx.iter_mut().zip(x).zip(dy).zip(gain).zip(&mut dgain)
                {
                    let normed = x * r;
                    *dx = r * (dy * g - normed * mean);
                    *dg += dy * normed;
                }
            }
            dgain
        })
        .collect();
    // Summed in task order, so the result does not depend on the number of threads.
    let mut dgain = vec![0.0f32; d];
    for partial in &partial_gains {
        for (total, &p) in dgain.iter_mut().zip(partial) {
            *total += p;
        }
    }
    (dx, dgain)
}

/// [`FusedOps::fused_rms_norm`] on Flex: the forward pass alone.
pub(super) fn on_flex(x: FlexTensor, gain: FlexTensor, eps: f32) -> FlexTensor {
    let (x, gain) = (contiguous(x), contiguous(gain));
    let shape = dims(&x);
    let (y, _) = rms_norm_forward(values(&x), values(&gain), eps);
    tensor(y, &shape)
}

#[derive(Debug)]
struct RmsNormBackward;

#[derive(Clone)]
struct RmsNormState {
    x: FlexTensor,
    gain: FlexTensor,
    inv_rms: Arc<Vec<f32>>,
}

impl fmt::Debug for RmsNormState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RmsNormState").finish_non_exhaustive()
    }
}

impl Backward<Flex, 2> for RmsNormBackward {
    type State = RmsNormState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gain] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let state = ops.state;
        let (dx, dgain) = rms_norm_backward(
            values(&state.x),
            values(&state.gain),
            &state.inv_rms,
            values(&dy),
        );
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, tensor(dx, &dims(&state.x)));
        }
        if let Some(node) = node_gain {
            grads.register::<Flex>(node.id, tensor(dgain, &dims(&state.gain)));
        }
    }
}

/// [`FusedOps::fused_rms_norm`] on `Autodiff<Flex>`: the forward pass, and what
/// the backward pass needs kept when an input is tracked.
pub(super) fn on_autodiff<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    gain: FloatTensor<Autodiff<Flex, C>>,
    eps: f32,
) -> FloatTensor<Autodiff<Flex, C>> {
    match RmsNormBackward
        .prepare::<C>([x.node(), gain.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let x = contiguous(x.into_primitive());
            let gain = contiguous(gain.into_primitive());
            let (y, inv_rms) = rms_norm_forward(values(&x), values(&gain), eps);
            let y = tensor(y, &dims(&x));
            let state = RmsNormState {
                x,
                gain,
                inv_rms: Arc::new(inv_rms),
            };
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(Flex::fused_rms_norm(
            x.into_primitive(),
            gain.into_primitive(),
            eps,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::fused::test_support::{check, device, random};

    #[test]
    fn rms_norm_matches_burn_ops() {
        let device = device();
        let x = random([130, 48], &device);
        let gain = random([1, 48], &device);
        check(
            "rms_norm",
            [x, gain],
            |[x, g]| rms_norm(x, g.reshape([48]), 1e-5),
            |[x, g]| {
                let inv_rms = x
                    .clone()
                    .square()
                    .mean_dim(1)
                    .add_scalar(1e-5)
                    .sqrt()
                    .recip();
                x.mul(inv_rms).mul(g)
            },
            1e-5,
        );
    }
}
