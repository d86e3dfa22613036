//! Next-token cross-entropy with a mask: only chosen positions count.
//!
//! Assistant-only fine-tuning trains on the reply tokens of a conversation while still feeding
//! the prompt through the model; pre-training on plain text uses an all-ones mask. The loss is
//! the mean over the masked-in positions, so a batch's loss does not depend on how much of it is
//! prompt.

use burn::tensor::{Int, Tensor};

use super::fused;

/// Mean of `-log softmax(logits)[target]` over the positions where `mask` is 1.
///
/// `logits` is `[n, vocab]`, `targets` `[n]` (token ids), `mask` `[n]` of 0.0 / 1.0, and
/// `masked_in` the number of ones in `mask` (known on the host where the batch is built, which
/// saves reading it back from the device). A batch with no position masked in has loss zero.
pub fn masked_cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    mask: Tensor<1>,
    masked_in: usize,
) -> Tensor<1> {
    let nll = token_nll(logits, targets);
    nll.mul(mask).sum().div_scalar(masked_in.max(1) as f64)
}

/// The summed cross-entropy of a set of rows.
pub struct SummedLoss {
    /// `Σ -log softmax(logits)[target]`, with no autodiff graph: the number to report.
    pub value: Tensor<1>,
    /// The same sum, tracked: `backward()` on it gives the gradients.
    pub for_backward: Tensor<1>,
}

/// The sum of `-log softmax(logits)[target]` over all rows: the trainer's loss after it has
/// kept only the masked-in rows (cheaper than masking, as the output projection and the
/// softmax then skip the prompt tokens).
///
/// One fused op ([`super::fused::cross_entropy_sum`]): a single parallel pass over the
/// `[n, vocab]` logits gives the loss and its gradient `softmax(logits) − onehot`, which the
/// backward pass only scales. Written with autodiff's element-wise ops, the loss took about ten
/// single-threaded passes over the largest tensor of the step. `masked_cross_entropy` is the
/// plain formulation and the test reference.
pub fn cross_entropy_sum(logits: Tensor<2>, targets: Tensor<1, Int>) -> SummedLoss {
    let loss = fused::cross_entropy_sum(logits, targets);
    SummedLoss {
        value: loss.clone().detach(),
        for_backward: loss,
    }
}

/// Per-row negative log-likelihood `[n]`.
fn token_nll(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [n, _] = logits.dims();
    // log Σ exp(x) = m + log Σ exp(x - m), with the row maximum m held constant.
    let max = logits.clone().max_dim(1).detach();
    let log_sum_exp = logits
        .clone()
        .sub(max.clone())
        .exp()
        .sum_dim(1)
        .log()
        .add(max);
    let picked = logits.gather(1, targets.reshape([n, 1]));
    log_sum_exp.sub(picked).reshape([n])
}
