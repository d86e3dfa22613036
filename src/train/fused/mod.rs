//! Fused training ops for burn's Flex backend, each with a hand-written backward pass: RMSNorm,
//! the SwiGLU gate, and causal self-attention with rotary positions.
//!
//! Written with burn's tensor ops, these layers cost far more than their arithmetic: Flex runs
//! most element-wise ops as single-threaded passes that each allocate, RMSNorm is seven of them
//! forward and about a dozen backward, and autodiff's attention is a chain of ops over the
//! `[batch, heads, time, time]` scores (causal mask built and applied, a softmax in five steps,
//! rotary positions as slices, a negation and a concatenation, and copies between the row and
//! head layouts). Here each layer is one op over plain `f32` slices: rows split over rayon's
//! threads, a vectorised `exp`, the attention products as one small `gemm` per head and block
//! of 64 query rows (only the causal part of the scores is computed), and rotary positions
//! applied while the heads are gathered.
//!
//! The ops are a burn backend extension ([`FusedOps`]): the Flex implementation is the forward
//! pass, the `Autodiff<Flex>` one saves what the backward pass needs and registers it. The
//! tests check values and gradients against the same layers written with burn's own ops.
//!
//! Each op has its own file: the function to call, its passes over slices, the state its
//! backward pass keeps, and its Flex and `Autodiff<Flex>` implementations, to which the trait's
//! implementations here hand each call on. The helpers the ops share are here.

mod adamw;
mod attention;
mod cross_entropy;
mod linear;
mod rms_norm;
mod rope;
mod swiglu;
#[cfg(test)]
mod test_support;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend, Flex, TensorMetadata};
use burn::tensor::TensorData;

pub use adamw::{adamw_update, AdamWStep};
pub use attention::causal_attention;
pub use cross_entropy::cross_entropy_sum;
pub use linear::linear;
pub use rms_norm::rms_norm;
pub use swiglu::swiglu;

/// The fused ops, on Flex and on `Autodiff<Flex>`. Call them through [`rms_norm`], [`swiglu`]
/// and [`causal_attention`].
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// `x / sqrt(mean(x²) + eps) · gain` over the rows of `x` `[n, hidden]`; `gain` is `[hidden]`.
    fn fused_rms_norm(x: FloatTensor<Self>, gain: FloatTensor<Self>, eps: f32)
        -> FloatTensor<Self>;

    /// `x · weightᵀ` for `x` `[n, in]` and `weight` `[out, in]` (a linear layer in the
    /// `torch.nn.Linear` layout): `[n, out]`.
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `silu(gate) · up`, element-wise, for two tensors of one shape.
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `Σ_rows -log softmax(logits)[target]` for `logits` `[n, vocab]` and `targets` `[n]`
    /// (token ids below `vocab`), as a one-element tensor. Its gradient, `softmax − onehot`
    /// per row, is computed in the same pass and kept for the backward pass.
    fn fused_cross_entropy_sum(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// One AdamW update of a flat parameter `[n]` with its gradient and moments: `[3, n]`,
    /// the new parameter, first moment and second moment. Not differentiable.
    #[allow(clippy::too_many_arguments)]
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        lr: f32,
        decay: f32,
        beta_1: f32,
        beta_2: f32,
        bias_1: f32,
        bias_2: f32,
        epsilon: f32,
    ) -> FloatTensor<Self>;

    /// Causal self-attention within each of `batch` sequences. `q` is `[batch·time,
    /// heads·dim]`, `k` and `v` are `[batch·time, kv_heads·dim]` (rows of one sequence
    /// consecutive, heads side by side in a row, as the projections give them); `cos` and `sin`
    /// are the rotary tables `[positions, dim]`, applied to `q` and `k` at positions
    /// `0..time`. Query head `h` reads key/value head `h / (heads / kv_heads)`. The result is
    /// `[batch·time, heads·dim]`, ready for the output projection.
    #[allow(clippy::too_many_arguments)]
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        batch: usize,
        heads: usize,
        kv_heads: usize,
    ) -> FloatTensor<Self>;
}

// ---------------------------------------------------------------------------------------------
// Tensors in and out.

/// `t` in row-major order, without a copy when it already is.
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of a contiguous `f32` tensor. The fused ops are only built for `f32` models.
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused ops take contiguous f32 tensors")
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.shape().iter().copied().collect()
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape.to_vec()))
}

/// Rows handled by one rayon task in the row-wise ops.
const ROWS_PER_TASK: usize = 64;
/// Elements handled by one rayon task in the element-wise ops.
const ELEMENTS_PER_TASK: usize = 1 << 14;

// ---------------------------------------------------------------------------------------------
// The backend implementations, each handing the call on to its op's file.

impl FusedOps for Flex {
    fn fused_rms_norm(x: FlexTensor, gain: FlexTensor, eps: f32) -> FlexTensor {
        rms_norm::on_flex(x, gain, eps)
    }

    fn fused_linear(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        linear::on_flex(x, weight)
    }

    fn fused_swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        swiglu::on_flex(gate, up)
    }

    fn fused_cross_entropy_sum(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        cross_entropy::on_flex(logits, targets)
    }

    fn fused_adamw(
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
        adamw::on_flex(
            param, grad, moment_1, moment_2, lr, decay, beta_1, beta_2, bias_1, bias_2, epsilon,
        )
    }

    fn fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        batch: usize,
        heads: usize,
        kv_heads: usize,
    ) -> FlexTensor {
        attention::on_flex(q, k, v, cos, sin, batch, heads, kv_heads)
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gain: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        rms_norm::on_autodiff::<C>(x, gain, eps)
    }

    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        linear::on_autodiff::<C>(x, weight)
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu::on_autodiff::<C>(gate, up)
    }

    fn fused_cross_entropy_sum(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        cross_entropy::on_autodiff::<C>(logits, targets)
    }

    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        lr: f32,
        decay: f32,
        beta_1: f32,
        beta_2: f32,
        bias_1: f32,
        bias_2: f32,
        epsilon: f32,
    ) -> FloatTensor<Self> {
        adamw::on_autodiff::<C>(
            param, grad, moment_1, moment_2, lr, decay, beta_1, beta_2, bias_1, bias_2, epsilon,
        )
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        batch: usize,
        heads: usize,
        kv_heads: usize,
    ) -> FloatTensor<Self> {
        attention::on_autodiff::<C>(q, k, v, cos, sin, batch, heads, kv_heads)
    }
}
