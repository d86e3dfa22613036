//! The SwiGLU gate: `silu(gate) · up`, element-wise, with `silu(a) = a · σ(a)`. Backward, with
//! `s = σ(gate)`: `dgate = dout · up · s · (1 + gate · (1 − s))`, `dup = dout · silu(gate)`.

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

use super::{contiguous, dims, tensor, values, FusedOps, ELEMENTS_PER_TASK};
use crate::kernels::sigmoid_into;

/// `silu(gate) · up` (see [`FusedOps::fused_swiglu`]).
pub fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::fused_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

fn swiglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in size");
    let mut out = vec![0.0; gate.len()];
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(gate.par_chunks(ELEMENTS_PER_TASK))
        .zip(up.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|((out, gate), up)| {
            sigmoid_into(gate, out);
            for ((o, &a), &b) in out.iter_mut().zip(gate).zip(up) {
                *o *= a * b;
            }
        });
    out
}

/// `(dgate, dup)`: with `s = σ(a)`, `d silu(a)/da = s · (1 + a · (1 − s))`.
fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dgate = vec![0.0; gate.len()];
    let mut dup = vec![0.0; gate.len()];
    dgate
        .par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(dup.par_chunks_mut(ELEMENTS_PER_TASK))
        .zip(gate.par_chunks(ELEMENTS_PER_TASK))
        .zip(up.par_chunks(ELEMENTS_PER_TASK))
        .zip(dout.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|((((dgate, dup), gate), up), dout)| {
            // The sigmoid goes into `dup` first, then each element is finished in place.
            sigmoid_into(gate, dup);
            for ((((dg, du), &a), &b), &g) in dgate
                .iter_mut()
                .zip(dup.iter_mut())
                .zip(gate)
                .zip(up)
                .zip(dout)
            {
                let s = *du;
                *dg = g * b * s * (1.0 + a * (1.0 - s));
                *du = g * a * s;
            }
        });
    (dgate, dup)
}

/// [`FusedOps::fused_swiglu`] on Flex: the forward pass alone.
pub(super) fn on_flex(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
    let (gate, up) = (contiguous(gate), contiguous(up));
    let shape = dims(&gate);
    tensor(swiglu_forward(values(&gate), values(&up)), &shape)
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dout = contiguous(grads.consume::<Flex>(&ops.node));
        let (gate, up) = ops.state;
        let (dgate, dup) = swiglu_backward(values(&gate), values(&up), values(&dout));
        let shape = dims(&gate);
        if let Some(node) = node_gate {
            grads.register::<Flex>(node.id, tensor(dgate, &shape));
        }
        if let Some(node) = node_up {
            grads.register::<Flex>(node.id, tensor(dup, &shape));
        }
    }
}

/// [`FusedOps::fused_swiglu`] on `Autodiff<Flex>`: the forward pass, and what
/// the backward pass needs kept when an input is tracked.
pub(super) fn on_autodiff<C: CheckpointStrategy>(
    gate: FloatTensor<Autodiff<Flex, C>>,
    up: FloatTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match SwigluBackward
        .prepare::<C>([gate.node(), up.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let gate = contiguous(gate.into_primitive());
            let up = contiguous(up.into_primitive());
            let out = Flex::fused_swiglu(gate.clone(), up.clone());
            prep.finish((gate, up), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(Flex::fused_swiglu(
            gate.into_primitive(),
            up.into_primitive(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::fused::test_support::{check, device, random};
    use burn::tensor::activation::silu;

    #[test]
    fn swiglu_matches_burn_ops() {
        let device = device();
        let gate = random([70, 300], &device).mul_scalar(4.0);
        let up = random([70, 300], &device);
        check(
            "swiglu",
            [gate, up],
            |[a, b]| swiglu(a, b),
            |[a, b]| silu(a).mul(b),
            1e-5,
        );
    }
}
