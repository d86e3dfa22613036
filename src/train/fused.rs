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

use std::fmt;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::DType;
use burn::backend::{backend_extension, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::kernels::{exp_sum_in_place, product, product_new, sigmoid_into};

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

/// RMSNorm of the rows of `x` with the learned `gain` (see [`FusedOps::fused_rms_norm`]).
pub fn rms_norm(x: Tensor<2>, gain: Tensor<1>, eps: f32) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::fused_rms_norm(
        x.into_dispatch(),
        gain.into_dispatch(),
        eps,
    ))
}

/// `x · weightᵀ` (see [`FusedOps::fused_linear`]).
pub fn linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::fused_linear(
        x.into_dispatch(),
        weight.into_dispatch(),
    ))
}

/// `silu(gate) · up` (see [`FusedOps::fused_swiglu`]).
pub fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::fused_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// The summed next-token cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (see
/// [`FusedOps::fused_cross_entropy_sum`]).
pub fn cross_entropy_sum(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    Tensor::from_dispatch(Dispatch::fused_cross_entropy_sum(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

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

/// Causal attention with rotary positions (see [`FusedOps::fused_attention`]).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: Tensor<2>,
    k: Tensor<2>,
    v: Tensor<2>,
    cos: Tensor<2>,
    sin: Tensor<2>,
    batch: usize,
    heads: usize,
    kv_heads: usize,
) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        batch,
        heads,
        kv_heads,
    ))
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
// RMSNorm.

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

// ---------------------------------------------------------------------------------------------
// Linear layers.

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

// ---------------------------------------------------------------------------------------------
// SwiGLU.

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

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

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

// ---------------------------------------------------------------------------------------------
// AdamW.

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

// ---------------------------------------------------------------------------------------------
// Causal attention.

/// Query rows per block: a block's scores are computed against the keys up to its last row.
const QUERY_BLOCK: usize = 64;

/// The query blocks of a sequence of `time` rows: `(first row, rows, keys it sees)`.
fn query_blocks(time: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..time)
        .step_by(QUERY_BLOCK)
        .map(move |r0| (r0, QUERY_BLOCK.min(time - r0), (r0 + QUERY_BLOCK).min(time)))
}

#[derive(Debug, Clone, Copy)]
struct AttentionShape {
    batch: usize,
    time: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
}

impl AttentionShape {
    fn new(
        q: &[usize],
        k: &[usize],
        v: &[usize],
        batch: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        assert!(
            q.len() == 2 && batch > 0 && heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "fused attention: bad shape {q:?} for batch {batch}, {heads} heads, {kv_heads} kv heads"
        );
        let (time, dim) = (q[0] / batch, q[1] / heads);
        assert!(
            time * batch == q[0]
                && dim * heads == q[1]
                && dim.is_multiple_of(2)
                && k == [q[0], kv_heads * dim]
                && v == k,
            "fused attention: shapes q {q:?}, k {k:?}, v {v:?} do not fit batch {batch}, {heads} heads, {kv_heads} kv heads"
        );
        AttentionShape {
            batch,
            time,
            heads,
            kv_heads,
            dim,
        }
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        (self.dim as f32).sqrt().recip()
    }
}

/// Rotary tables for positions `0..time`, `[time, dim]` each.
struct RopeTables<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
}

impl RopeTables<'_> {
    fn row(&self, pos: usize, dim: usize) -> (&[f32], &[f32]) {
        (&self.cos[pos * dim..][..dim], &self.sin[pos * dim..][..dim])
    }
}

/// Rotate-half rotary embedding of one head's row: `x·cos + rot(x)·sin`, `rot(x) = (−x₂, x₁)`.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (out1, out2) = out.split_at_mut(half);
    for i in 0..half {
        out1[i] = x1[i] * cos[i] - x2[i] * sin[i];
        out2[i] = x2[i] * cos[half + i] + x1[i] * sin[half + i];
    }
}

/// The transpose of [`rotate`] (its gradient): `g·cos + rotᵀ(g·sin)`, `rotᵀ(z) = (z₂, −z₁)`.
fn unrotate(g: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = g.len() / 2;
    let (g1, g2) = g.split_at(half);
    let (out1, out2) = out.split_at_mut(half);
    for i in 0..half {
        out1[i] = g1[i] * cos[i] + g2[i] * sin[half + i];
        out2[i] = g2[i] * cos[half + i] - g1[i] * sin[i];
    }
}

/// Rows `[batch·time, heads·dim]` to head-major `[batch, heads, time, dim]`, each row rotated
/// by its position when `rope` is given.
fn to_heads(x: &[f32], s: &AttentionShape, heads: usize, rope: Option<&RopeTables>) -> Vec<f32> {
    let (t, d) = (s.time, s.dim);
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, dst)| {
        let (b, h) = (bh / heads, bh % heads);
        for (pos, row) in dst.chunks_mut(d).enumerate() {
            let src = &x[(b * t + pos) * heads * d + h * d..][..d];
            match rope {
                Some(rope) => {
                    let (cos, sin) = rope.row(pos, d);
                    rotate(src, cos, sin, row);
                }
                None => row.copy_from_slice(src),
            }
        }
    });
    out
}

/// Head-major `[batch, heads, time, dim]` back to rows `[batch·time, heads·dim]`, each row
/// rotated back (the gradient of the rotation) when `rope` is given.
fn from_heads(x: &[f32], s: &AttentionShape, heads: usize, rope: Option<&RopeTables>) -> Vec<f32> {
    let (t, d) = (s.time, s.dim);
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(t * heads * d)
        .enumerate()
        .for_each(|(b, dst)| {
            for (pos, row) in dst.chunks_mut(heads * d).enumerate() {
                for (h, dst) in row.chunks_mut(d).enumerate() {
                    let src = &x[((b * heads + h) * t + pos) * d..][..d];
                    match rope {
                        Some(rope) => {
                            let (cos, sin) = rope.row(pos, d);
                            unrotate(src, cos, sin, dst);
                        }
                        None => dst.copy_from_slice(src),
                    }
                }
            }
        });
    out
}

/// What the backward pass of an attention needs: the rotated queries and keys and the values,
/// head-major, and the attention probabilities `[batch, heads, time, time]` (zero above the
/// diagonal).
struct AttentionSaved {
    shape: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    cos: FlexTensor,
    sin: FlexTensor,
}

impl fmt::Debug for AttentionSaved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttentionSaved")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// The rotary tables cut to `time` positions, contiguous.
fn rope_tables(cos: FlexTensor, sin: FlexTensor, s: &AttentionShape) -> (FlexTensor, FlexTensor) {
    let cut = |t: FlexTensor| {
        let shape = dims(&t);
        assert!(
            shape.len() == 2 && shape[0] >= s.time && shape[1] == s.dim,
            "fused attention: rotary table {shape:?} too small for {} positions of {}",
            s.time,
            s.dim
        );
        contiguous(t.narrow(0, 0, s.time))
    };
    (cut(cos), cut(sin))
}

/// The forward pass: the output `[batch·time, heads·dim]` and what the backward pass needs.
fn attention_forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    (cos, sin): (FlexTensor, FlexTensor),
    batch: usize,
    heads: usize,
    kv_heads: usize,
) -> (FlexTensor, AttentionSaved) {
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let s = AttentionShape::new(&dims(&q), &dims(&k), &dims(&v), batch, heads, kv_heads);
    let (cos, sin) = rope_tables(cos, sin, &s);
    let rope = RopeTables {
        cos: values(&cos),
        sin: values(&sin),
    };
    let (t, d, group, scale) = (s.time, s.dim, s.group(), s.scale());
    let qh = to_heads(values(&q), &s, s.heads, Some(&rope));
    let kh = to_heads(values(&k), &s, s.kv_heads, Some(&rope));
    let vh = to_heads(values(&v), &s, s.kv_heads, None);
    let mut probs = vec![0.0; s.batch * s.heads * t * t];
    let mut out = vec![0.0; qh.len()];
    // One task per (sequence, key/value head): the query heads of its group, one after another.
    probs
        .par_chunks_mut(group * t * t)
        .zip(out.par_chunks_mut(group * t * d))
        .enumerate()
        .for_each(|(bg, (probs, out))| {
            let keys = &kh[bg * t * d..][..t * d];
            let vals = &vh[bg * t * d..][..t * d];
            for (i, (probs, out)) in probs
                .chunks_mut(t * t)
                .zip(out.chunks_mut(t * d))
                .enumerate()
            {
                let query = &qh[(bg * group + i) * t * d..][..t * d];
                for (r0, m, cols) in query_blocks(t) {
                    // scores = scale · Q[block] · K[..cols]ᵀ
                    product(
                        m,
                        cols,
                        d,
                        &mut probs[r0 * t..],
                        t,
                        false,
                        &query[r0 * d..],
                        (d, 1),
                        keys,
                        (1, d),
                        scale,
                    );
                    for r in r0..r0 + m {
                        let row = &mut probs[r * t..][..cols];
                        let (live, future) = row.split_at_mut(r + 1);
                        let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let inv = exp_sum_in_place(live, max).recip();
                        live.iter_mut().for_each(|p| *p *= inv);
                        future.fill(0.0);
                    }
                    // out[block] = P[block, ..cols] · V[..cols]
                    product(
                        m,
                        d,
                        cols,
                        &mut out[r0 * d..],
                        d,
                        false,
                        &probs[r0 * t..],
                        (t, 1),
                        vals,
                        (d, 1),
                        1.0,
                    );
                }
            }
        });
    let out = from_heads(&out, &s, s.heads, None);
    let out = tensor(out, &[s.batch * t, s.heads * d]);
    let saved = AttentionSaved {
        shape: s,
        q: qh,
        k: kh,
        v: vh,
        probs,
        cos,
        sin,
    };
    (out, saved)
}

/// The backward pass: `(dq, dk, dv)` in the layouts of `q`, `k` and `v`.
fn attention_backward(
    saved: &AttentionSaved,
    dout: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let s = saved.shape;
    let dout = contiguous(dout);
    let rope = RopeTables {
        cos: values(&saved.cos),
        sin: values(&saved.sin),
    };
    let (t, d, group, scale) = (s.time, s.dim, s.group(), s.scale());
    let dout_h = to_heads(values(&dout), &s, s.heads, None);
    let mut dq = vec![0.0; saved.q.len()];
    let mut dk = vec![0.0; saved.k.len()];
    let mut dv = vec![0.0; saved.v.len()];
    dq.par_chunks_mut(group * t * d)
        .zip(dk.par_chunks_mut(t * d))
        .zip(dv.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(bg, ((dq, dk), dv))| {
            let keys = &saved.k[bg * t * d..][..t * d];
            let vals = &saved.v[bg * t * d..][..t * d];
            // dS for one head; only the causal part of each row is ever read.
            let mut dscores = vec![0.0f32; t * t];
            for (i, dq) in dq.chunks_mut(t * d).enumerate() {
                let head = bg * group + i;
                let query = &saved.q[head * t * d..][..t * d];
                let probs = &saved.probs[head * t * t..][..t * t];
                let dout = &dout_h[head * t * d..][..t * d];
                for (r0, m, cols) in query_blocks(t) {
                    // dP = dO[block] · V[..cols]ᵀ
                    product(
                        m,
                        cols,
                        d,
                        &mut dscores[r0 * t..],
                        t,
                        false,
                        &dout[r0 * d..],
                        (d, 1),
                        vals,
                        (1, d),
                        1.0,
                    );
                    // dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale, zero above the diagonal.
                    for r in r0..r0 + m {
                        let p = &probs[r * t..][..=r];
                        let row = &mut dscores[r * t..][..cols];
                        let (live, future) = row.split_at_mut(r + 1);
                        let dot: f32 = p.iter().zip(live.iter()).map(|(p, g)| p * g).sum();
                        for (g, &p) in live.iter_mut().zip(p) {
                            *g = p * (*g - dot) * scale;
                        }
                        future.fill(0.0);
                    }
                    // dV[..cols] += P[block, ..cols]ᵀ · dO[block]
                    product(
                        cols,
                        d,
                        m,
                        dv,
                        d,
                        true,
                        &probs[r0 * t..],
                        (1, t),
                        &dout[r0 * d..],
                        (d, 1),
                        1.0,
                    );
                    // dQ[block] = dS[block, ..cols] · K[..cols]
                    product(
                        m,
                        d,
                        cols,
                        &mut dq[r0 * d..],
                        d,
                        false,
                        &dscores[r0 * t..],
                        (t, 1),
                        keys,
                        (d, 1),
                        1.0,
                    );
                    // dK[..cols] += dS[block, ..cols]ᵀ · Q[block]
                    product(
                        cols,
                        d,
                        m,
                        dk,
                        d,
                        true,
                        &dscores[r0 * t..],
                        (1, t),
                        &query[r0 * d..],
                        (d, 1),
                        1.0,
                    );
                }
            }
        });
    let rows = s.batch * t;
    let dq = from_heads(&dq, &s, s.heads, Some(&rope));
    let dk = from_heads(&dk, &s, s.kv_heads, Some(&rope));
    let dv = from_heads(&dv, &s, s.kv_heads, None);
    (
        tensor(dq, &[rows, s.heads * d]),
        tensor(dk, &[rows, s.kv_heads * d]),
        tensor(dv, &[rows, s.kv_heads * d]),
    )
}

// ---------------------------------------------------------------------------------------------
// The backend implementations.

impl FusedOps for Flex {
    fn fused_rms_norm(x: FlexTensor, gain: FlexTensor, eps: f32) -> FlexTensor {
        let (x, gain) = (contiguous(x), contiguous(gain));
        let shape = dims(&x);
        let (y, _) = rms_norm_forward(values(&x), values(&gain), eps);
        tensor(y, &shape)
    }

    fn fused_linear(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        linear_forward(&contiguous(x), &contiguous(weight))
    }

    fn fused_swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let (gate, up) = (contiguous(gate), contiguous(up));
        let shape = dims(&gate);
        tensor(swiglu_forward(values(&gate), values(&up)), &shape)
    }

    fn fused_cross_entropy_sum(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        let logits = contiguous(logits);
        let (loss, _) = cross_entropy_forward(values(&logits), &token_ids(&targets));
        tensor(vec![loss], &[1])
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
        attention_forward(q, k, v, (cos, sin), batch, heads, kv_heads).0
    }
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

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = Arc<AttentionSaved>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let dout = grads.consume::<Flex>(&ops.node);
        let (dq, dk, dv) = attention_backward(&ops.state, dout);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gain: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
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

    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
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

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
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

    fn fused_cross_entropy_sum(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
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
        // An update is not differentiated: the result is a new, untracked tensor.
        FloatTensor::<Self>::new(Flex::fused_adamw(
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
        // The rotary tables are constants: no gradient flows to them.
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, saved) = attention_forward(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    (cos, sin),
                    batch,
                    heads,
                    kv_heads,
                );
                prep.finish(Arc::new(saved), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::fused_attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                cos,
                sin,
                batch,
                heads,
                kv_heads,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::silu;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution};

    fn device() -> Device {
        Device::flex().autodiff()
    }

    fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device).require_grad()
    }

    fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>, tolerance: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1.0f32, |m, w| m.max(w.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= tolerance * scale,
            "{what}: worst difference {worst} (largest value {scale})"
        );
    }

    /// Values of `fused(inputs)` and `reference(inputs)`, and the gradients of a random linear
    /// function of each output with respect to every input, agree.
    fn check<const N: usize, const D: usize>(
        what: &str,
        inputs: [Tensor<2>; N],
        fused: impl Fn([Tensor<2>; N]) -> Tensor<D>,
        reference: impl Fn([Tensor<2>; N]) -> Tensor<D>,
        tolerance: f32,
    ) {
        let device = inputs[0].device();
        let leaves = || inputs.clone().map(|t| t.detach().require_grad());
        let (fused_in, reference_in) = (leaves(), leaves());
        let out_fused = fused(fused_in.clone());
        let out_reference = reference(reference_in.clone());
        let weights =
            Tensor::<D>::random(out_fused.dims(), Distribution::Normal(0.0, 1.0), &device);
        assert_close(
            &format!("{what} values"),
            flat(out_fused.clone()),
            flat(out_reference.clone()),
            tolerance,
        );
        let grads_fused = out_fused.mul(weights.clone()).sum().backward();
        let grads_reference = out_reference.mul(weights).sum().backward();
        for (i, (a, b)) in fused_in.iter().zip(&reference_in).enumerate() {
            let (Some(ga), Some(gb)) = (a.grad(&grads_fused), b.grad(&grads_reference)) else {
                panic!("{what}: input {i} got no gradient");
            };
            assert_close(
                &format!("{what} gradient {i}"),
                flat(ga),
                flat(gb),
                tolerance,
            );
        }
    }

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

    /// The attention the trainable model computed before the fused op: heads split with
    /// reshapes, rotate-half rotary positions from slices, keys and values repeated for
    /// grouped-query attention, and burn's own causal attention.
    fn reference_attention(
        [q, k, v, cos, sin]: [Tensor<2>; 5],
        batch: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Tensor<2> {
        let [rows, width] = q.dims();
        let (time, dim) = (rows / batch, width / heads);
        let split = |y: Tensor<2>, h: usize| y.reshape([batch, time, h, dim]).swap_dims(1, 2);
        let rope = |x: Tensor<4>| {
            let half = dim / 2;
            let cos = cos.clone().narrow(0, 0, time).unsqueeze::<4>();
            let sin = sin.clone().narrow(0, 0, time).unsqueeze::<4>();
            let first = x.clone().narrow(3, 0, half);
            let second = x.clone().narrow(3, half, half);
            let rotated = Tensor::cat(vec![second.neg(), first], 3);
            x.mul(cos).add(rotated.mul(sin))
        };
        let repeat = |x: Tensor<4>| {
            let groups = heads / kv_heads;
            let [b, kv, t, d] = x.dims();
            x.unsqueeze_dim::<5>(2)
                .expand([b, kv, groups, t, d])
                .reshape([b, kv * groups, t, d])
        };
        let q = rope(split(q, heads));
        let k = repeat(rope(split(k, kv_heads)));
        let v = repeat(split(v, kv_heads));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        attention(q, k, v, None, None, options)
            .swap_dims(1, 2)
            .reshape([rows, heads * dim])
    }

    fn check_attention(batch: usize, time: usize, heads: usize, kv_heads: usize, dim: usize) {
        let device = device();
        let config = crate::model::LlamaConfig {
            hidden_size: heads * dim,
            num_attention_heads: heads,
            max_position_embeddings: time + 5,
            ..crate::model::LlamaConfig::preset(crate::model::Preset::Tiny)
        };
        let (cos, sin) = crate::model::reference::rope_tables(&config);
        let table = |data| Tensor::<2>::from_data(TensorData::new(data, [time + 5, dim]), &device);
        let rows = batch * time;
        let inputs = [
            random([rows, heads * dim], &device),
            random([rows, kv_heads * dim], &device),
            random([rows, kv_heads * dim], &device),
        ];
        let (cos, sin) = (table(cos), table(sin));
        let fused_inputs = {
            let (cos, sin) = (cos.clone(), sin.clone());
            move |[q, k, v]: [Tensor<2>; 3]| {
                causal_attention(q, k, v, cos.clone(), sin.clone(), batch, heads, kv_heads)
            }
        };
        check(
            &format!("attention b{batch} t{time} h{heads}/{kv_heads} d{dim}"),
            inputs,
            fused_inputs,
            move |[q, k, v]| {
                reference_attention([q, k, v, cos.clone(), sin.clone()], batch, heads, kv_heads)
            },
            2e-5,
        );
    }

    #[test]
    fn attention_matches_burn_ops() {
        check_attention(1, 5, 2, 2, 4);
        // Two query blocks, the second partial; grouped-query heads; two sequences.
        check_attention(2, 70, 4, 2, 8);
        check_attention(3, 64, 3, 1, 6);
    }

    #[test]
    fn attention_runs_without_autodiff() {
        let device = Device::flex();
        let q = Tensor::<2>::random([8, 8], Distribution::Normal(0.0, 1.0), &device);
        let ones = Tensor::<2>::ones([10, 4], &device);
        let zeros = Tensor::<2>::zeros([10, 4], &device);
        // cos 1, sin 0: no rotation; one position attends only to itself, so the first row of
        // each sequence is its own value row.
        let out = causal_attention(q.clone(), q.clone(), q.clone(), ones, zeros, 2, 2, 2);
        let (out, q) = (flat(out), flat(q));
        for b in 0..2 {
            let row = b * 4 * 8;
            assert_close(
                "first row",
                out[row..row + 8].to_vec(),
                q[row..row + 8].to_vec(),
                1e-6,
            );
        }
    }

    #[test]
    #[should_panic(expected = "do not fit")]
    fn attention_rejects_shapes_that_do_not_fit() {
        let device = Device::flex();
        let q = Tensor::<2>::zeros([6, 8], &device);
        let k = Tensor::<2>::zeros([6, 6], &device);
        let table = Tensor::<2>::zeros([8, 4], &device);
        causal_attention(q, k.clone(), k, table.clone(), table, 2, 2, 1);
    }
}
