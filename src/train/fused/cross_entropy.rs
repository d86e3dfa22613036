//! The summed next-token cross-entropy: per row of `logits` `[n, vocab]`,
//! `logsumexp(row) − row[target]`, summed over the rows. The forward pass computes the gradient
//! in the same pass, `softmax(row) − onehot(target)` per row, and keeps it; the backward pass
//! only scales it by the upstream gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::DType;
use burn::backend::{Dispatch, Flex};
use burn::tensor::{Int, Tensor};
use rayon::prelude::*;

use super::{contiguous, dims, tensor, values, FusedOps, ELEMENTS_PER_TASK, ROWS_PER_TASK};
use crate::kernels::exp_sum_in_place;

/// The summed next-token cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (see
/// [`FusedOps::fused_cross_entropy_sum`]).
pub fn cross_entropy_sum(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    Tensor::from_dispatch(Dispatch::fused_cross_entropy_sum(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// Token ids of an int tensor.
fn token_ids(targets: &FlexTensor) -> Vec<usize> {
    let targets = contiguous(targets.clone());
    match targets.dtype() {
        DType::I64 => targets
            .as_slice::<i64>()
            .map(|t| t.iter().map(|&t| t as usize).collect()),
        DType::I32 => targets
            .as_slice::<i32>()
            .map(|t| t.iter().map(|&t| t as usize).collect()),
        DType::U32 => targets
            .as_slice::<u32>()
            .map(|t| t.iter().map(|&t| t as usize).collect()),
        _ => None,
    }
    .expect("cross-entropy targets are i64, i32 or u32 token ids")
}

/// `(Σ loss, gradient)`: per row, `loss = logsumexp(x) − x[target]` and the gradient of that
/// loss with respect to the row, `softmax(x) − onehot(target)`.
fn cross_entropy_forward(logits: &[f32], targets: &[usize]) -> (f32, Vec<f32>) {
    let vocab = logits.len() / targets.len().max(1);
    assert!(
        targets.iter().all(|&t| t < vocab),
        "cross-entropy: a target id is not below the vocabulary size {vocab}"
    );
    let mut grad = logits.to_vec();
    let partial: Vec<f64> = grad
        .par_chunks_mut(vocab * ROWS_PER_TASK)
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .map(|(rows, targets)| {
            let mut loss = 0.0f64;
            for (row, &target) in rows.chunks_mut(vocab).zip(targets) {
                let picked = row[target];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = exp_sum_in_place(row, max);
                loss += f64::from(sum.ln() + max - picked);
                let inv = sum.recip();
                row.iter_mut().for_each(|p| *p *= inv);
                row[target] -= 1.0;
            }
            loss
        })
        .collect();
    // Summed in task order, so the result does not depend on the number of threads.
    (partial.iter().sum::<f64>() as f32, grad)
}

/// [`FusedOps::fused_cross_entropy_sum`] on Flex: the forward pass alone.
pub(super) fn on_flex(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
    let logits = contiguous(logits);
    let (loss, _) = cross_entropy_forward(values(&logits), &token_ids(&targets));
    tensor(vec![loss], &[1])
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// The gradient of the summed loss with respect to the logits.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let upstream = contiguous(grads.consume::<Flex>(&ops.node));
        let scale = values(&upstream)[0];
        let Some(node) = node else { return };
        let mut grad = ops.state;
        if scale != 1.0 {
            grad.storage_mut::<f32>()
                .par_chunks_mut(ELEMENTS_PER_TASK)
                .for_each(|chunk| chunk.iter_mut().for_each(|g| *g *= scale));
        }
        grads.register::<Flex>(node.id, grad);
    }
}

/// [`FusedOps::fused_cross_entropy_sum`] on `Autodiff<Flex>`: the forward pass, and what
/// the backward pass needs kept when an input is tracked.
pub(super) fn on_autodiff<C: CheckpointStrategy>(
    logits: FloatTensor<Autodiff<Flex, C>>,
    targets: IntTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match CrossEntropyBackward
        .prepare::<C>([logits.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let logits = contiguous(logits.into_primitive());
            let shape = dims(&logits);
            let (loss, grad) = cross_entropy_forward(values(&logits), &token_ids(&targets));
            prep.finish(tensor(grad, &shape), tensor(vec![loss], &[1]))
        }
        OpsKind::UnTracked(prep) => prep.finish(Flex::fused_cross_entropy_sum(
            logits.into_primitive(),
            targets,
        )),
    }
}
