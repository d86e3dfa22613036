//! A linear layer in the `torch.nn.Linear` layout: `y = x · Wᵀ` for `x` `[n, in]` and `W`
//! `[out, in]`, one `gemm`. Backward: `dx = dy · W` and `dW = dyᵀ · x`, each only when its input
//! needs a gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, Flex};
use burn::tensor::Tensor;

use super::{contiguous, dims, tensor, values, FusedOps};
use crate::kernels::product_new;

/// `x · weightᵀ` (see [`FusedOps::fused_linear`]).
pub fn linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::fused_linear(
        x.into_dispatch(),
        weight.into_dispatch(),
    ))
}

/// `(rows, in, out)` of a linear layer, checked.
fn linear_dims(x: &FlexTensor, weight: &FlexTensor) -> (usize, usize, usize) {
    let (x, w) = (dims(x), dims(weight));
    assert!(
        x.len() == 2 && w.len() == 2 && x[1] == w[1],
        "linear: input {x:?} does not fit weight {w:?}"
    );
    (x[0], x[1], w[0])
}

/// `y = x · Wᵀ`.
fn linear_forward(x: &FlexTensor, weight: &FlexTensor) -> FlexTensor {
    let (rows, inputs, outputs) = linear_dims(x, weight);
    let y = product_new(
        (rows, outputs, inputs),
        values(x),
        (inputs, 1),
        values(weight),
        (1, inputs),
    );
    tensor(y, &[rows, outputs])
}

/// `(dx, dW) = (dy · W, dyᵀ · x)`.
fn linear_backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    dy: &FlexTensor,
    need: (bool, bool),
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let (rows, inputs, outputs) = linear_dims(x, weight);
    let dx = need.0.then(|| {
        let dx = product_new(
            (rows, inputs, outputs),
            values(dy),
            (outputs, 1),
            values(weight),
            (inputs, 1),
        );
        tensor(dx, &[rows, inputs])
    });
    let dw = need.1.then(|| {
        let dw = product_new(
            (outputs, inputs, rows),
            values(dy),
            (1, outputs),
            values(x),
            (inputs, 1),
        );
        tensor(dw, &[outputs, inputs])
    });
    (dx, dw)
}

/// [`FusedOps::fused_linear`] on Flex: the forward pass alone.
pub(super) fn on_flex(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
    linear_forward(&contiguous(x), &contiguous(weight))
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 2> for LinearBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, weight) = ops.state;
        let need = (node_x.is_some(), node_weight.is_some());
        let (dx, dw) = linear_backward(&x, &weight, &dy, need);
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, dx);
        }
        if let (Some(node), Some(dw)) = (node_weight, dw) {
            grads.register::<Flex>(node.id, dw);
        }
    }
}

/// [`FusedOps::fused_linear`] on `Autodiff<Flex>`: the forward pass, and what
/// the backward pass needs kept when an input is tracked.
pub(super) fn on_autodiff<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    weight: FloatTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match LinearBackward
        .prepare::<C>([x.node(), weight.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let x = contiguous(x.into_primitive());
            let weight = contiguous(weight.into_primitive());
            let y = linear_forward(&x, &weight);
            prep.finish((x, weight), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(Flex::fused_linear(
            x.into_primitive(),
            weight.into_primitive(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::fused::test_support::{check, device, random};

    #[test]
    fn linear_matches_burn_ops() {
        let device = device();
        let x = random([130, 48], &device);
        let weight = random([20, 48], &device);
        check(
            "linear",
            [x, weight],
            |[x, w]| linear(x, w),
            |[x, w]| x.matmul(w.transpose()),
            1e-5,
        );
    }
}
