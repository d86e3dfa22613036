//! Causal self-attention with rotary positions and grouped-query heads: per head,
//! `softmax(scale · Q·Kᵀ, causally masked) · V`, Q and K rotated by their positions while the
//! heads are gathered, each block of 64 query rows scored only against the keys it can see.
//! Backward, from the rotated Q and K, V and the probabilities P saved by the forward pass:
//! `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale`, `dV = Pᵀ·dO`, `dQ = dS·K`,
//! `dK = dSᵀ·Q`, then dQ and dK rotated back.

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

use super::rope::{rotate, unrotate, RopeTables};
use super::{contiguous, dims, tensor, values, FusedOps};
use crate::kernels::{exp_sum_in_place, product};

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

/// [`FusedOps::fused_attention`] on Flex: the forward pass alone.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_flex(
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

/// [`FusedOps::fused_attention`] on `Autodiff<Flex>`: the forward pass, and what
/// the backward pass needs kept when an input is tracked.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_autodiff<C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<Flex, C>>,
    k: FloatTensor<Autodiff<Flex, C>>,
    v: FloatTensor<Autodiff<Flex, C>>,
    cos: FloatTensor<Autodiff<Flex, C>>,
    sin: FloatTensor<Autodiff<Flex, C>>,
    batch: usize,
    heads: usize,
    kv_heads: usize,
) -> FloatTensor<Autodiff<Flex, C>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::fused::test_support::{assert_close, check, device, flat, random};
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution, TensorData};

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
