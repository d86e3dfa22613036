//! Scaled dot-product attention over a KV cache, as one tract op.
//!
//! A graph that states its attention as one standard ONNX `Attention` node (opset 23, with
//! `past_key`/`past_value` inputs; kaiwa's own export does) reaches tract as a `Concat` of past
//! and new keys (and values), which is also the `present` output, feeding an `Sdpa` node.
//! tract lowers `Sdpa` either to its decomposed path (the cache re-packed for two matrix
//! products every step) or to its flash kernel (blocks of 32 keys, allocating as it goes);
//! both measured slower than a plain `MatMul`/`Softmax` graph while decoding.
//!
//! [`fuse_attention`] runs [`CacheAttention`] in their place: for each KV head, on one thread
//! of the decoder's pool, it copies that head's past and new rows into `present`, then computes
//! the scores of all the head's query rows in one product straight over the cache, a softmax,
//! and one product with the values. The copy, which tract's `Concat` does on one thread, is
//! split over the pool with the rest. Graphs that write attention out in `MatMul`s (Optimum's
//! exports) are left as they are.

use std::sync::Arc;

use tract_linalg::multithread::{current_tract_executor, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_transformers::ops::sdpa::Sdpa;

use crate::kernels::product;

/// `softmax(q·kᵀ·scale + mask)·v` for `q` `[batch, heads, seq, head_dim]` and keys and values
/// `[batch, kv_heads, keys, head_dim]` (grouped-query: `heads` a multiple of `kv_heads`), with
/// an optional mask broadcastable to `[batch, heads, seq, keys]`: additive when f32, "may
/// attend" when bool. `causal` hides key `t` from query `s` when `t > s + keys - seq` (aligned
/// to the end, as a KV cache needs).
///
/// Inputs `q, k, v [, mask]` with one output, or with `concat`:
/// `q, past_k, new_k, past_v, new_v [, mask]`, the keys being `past ++ new` along axis 2, and
/// three outputs: the attention, then the concatenated keys and values (`present`).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheAttention {
    /// `None`: 1/√head_dim.
    pub scale: Option<f32>,
    pub causal: bool,
    pub concat: bool,
}

impl Eq for CacheAttention {}

impl CacheAttention {
    fn kv_inputs(&self) -> usize {
        if self.concat {
            5
        } else {
            3
        }
    }
}

impl Op for CacheAttention {
    fn name(&self) -> StaticName {
        "KaiwaCacheAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "scale={:?}, causal={}, concat={}",
            self.scale, self.causal, self.concat
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for CacheAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let n = self.kv_inputs();
        ensure!(
            inputs.len() == n || inputs.len() == n + 1,
            "attention takes {n} inputs and an optional mask, got {}",
            inputs.len()
        );
        let (past_k, new_k, past_v, new_v) = if self.concat {
            (Some(&inputs[1]), &inputs[2], Some(&inputs[3]), &inputs[4])
        } else {
            (None, &inputs[1], None, &inputs[2])
        };
        let dims = Dims::of(&inputs[0], past_k, new_k, past_v, new_v)?;
        let (q, new_k_view, new_v_view) = (
            inputs[0].try_as_plain_ram()?,
            new_k.try_as_plain_ram()?,
            new_v.try_as_plain_ram()?,
        );
        let past_k_view = past_k.map(|t| t.try_as_plain_ram()).transpose()?;
        let past_v_view = past_v.map(|t| t.try_as_plain_ram()).transpose()?;
        let mask = match inputs.get(n) {
            Some(m) => Some(Mask::new(m, &dims)?),
            None => None,
        };
        let job = Job {
            dims,
            q: q.as_slice::<f32>()?,
            past_k: or_empty(&past_k_view)?,
            new_k: new_k_view.as_slice::<f32>()?,
            past_v: or_empty(&past_v_view)?,
            new_v: new_v_view.as_slice::<f32>()?,
            mask: mask.as_ref(),
            scale: self
                .scale
                .unwrap_or_else(|| (dims.head_dim as f32).sqrt().recip()),
            causal: self.causal,
        };
        let d = dims;
        let mut out = Tensor::zero::<f32>(&[d.batch, d.heads, d.seq, d.head_dim])?;
        let kv_shape = [d.batch, d.kv_heads, d.keys(), d.head_dim];
        // SAFETY: every value of the two caches is written by `Job::run` (one head per task).
        let mut present = if self.concat {
            unsafe {
                Some((
                    Tensor::uninitialized::<f32>(&kv_shape)?,
                    Tensor::uninitialized::<f32>(&kv_shape)?,
                ))
            }
        } else {
            None
        };
        {
            let mut out_view = out.try_as_plain_ram_mut()?;
            match &mut present {
                Some((k, v)) => {
                    let mut k_view = k.try_as_plain_ram_mut()?;
                    let mut v_view = v.try_as_plain_ram_mut()?;
                    job.run(
                        out_view.as_slice_mut::<f32>()?,
                        Some((k_view.as_slice_mut::<f32>()?, v_view.as_slice_mut::<f32>()?)),
                    );
                }
                None => job.run(out_view.as_slice_mut::<f32>()?, None),
            }
        }
        let mut outputs = tvec!(out.into_tvalue());
        if let Some((k, v)) = present {
            outputs.push(k.into_tvalue());
            outputs.push(v.into_tvalue());
        }
        Ok(outputs)
    }
}

/// The values of an optional f32 input, or none.
fn or_empty<'a>(view: &Option<PlainView<'a>>) -> TractResult<&'a [f32]> {
    match view {
        Some(view) => view.as_slice::<f32>(),
        None => Ok(&[]),
    }
}

impl TypedOp for CacheAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = self.kv_inputs();
        ensure!(inputs.len() == n || inputs.len() == n + 1);
        for fact in &inputs[..n] {
            ensure!(
                fact.datum_type == f32::datum_type(),
                "attention runs on f32"
            );
            ensure!(fact.rank() == 4, "attention takes rank-4 q, k and v");
        }
        if let Some(mask) = inputs.get(n) {
            ensure!(mask.rank() == 4, "attention takes a rank-4 mask");
            ensure!(
                mask.datum_type == f32::datum_type() || mask.datum_type == bool::datum_type(),
                "attention takes an f32 or bool mask"
            );
        }
        let q = &inputs[0].shape;
        let v = &inputs[n - 1].shape;
        let mut facts = tvec!(f32::fact([
            q[0].clone(),
            q[1].clone(),
            q[2].clone(),
            v[3].clone()
        ]));
        if self.concat {
            for (past, new) in [(inputs[1], inputs[2]), (inputs[3], inputs[4])] {
                let (p, c) = (&past.shape, &new.shape);
                let keys = p[2].clone() + &c[2];
                facts.push(f32::fact([c[0].clone(), c[1].clone(), keys, c[3].clone()]));
            }
        }
        Ok(facts)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let q = &inputs[0].shape;
        let keys = if self.concat {
            inputs[1].shape[2].clone() + &inputs[2].shape[2]
        } else {
            inputs[1].shape[2].clone()
        };
        let fma = q[0].clone() * &q[1] * &q[2] * keys * (q[3].clone() * 2);
        Ok(tvec!((Cost::FMA(f32::datum_type()), fma)))
    }

    as_op!();
}

/// Puts [`CacheAttention`] in place of every f32, rank-4 `Sdpa` node of `model` (a typed,
/// decluttered model), taking over the `Concat`s of past and new keys and values that feed it
/// when nothing else but the graph's outputs reads them. Returns how many nodes it replaced.
pub fn fuse_attention(model: &mut TypedModel) -> TractResult<usize> {
    // What the op accepts, in its plain form, decides: f32 rank-4 q, k, v and an optional
    // rank-4 f32 or bool mask (tract's `Sdpa` never has both a mask and `is_causal`).
    let accepts = |node: &TypedNode| -> bool {
        let Some(sdpa) = node.op_as::<Sdpa>() else {
            return false;
        };
        let Ok(facts) = model.node_input_facts(node.id) else {
            return false;
        };
        let op = CacheAttention {
            scale: None,
            causal: sdpa.is_causal,
            concat: false,
        };
        sdpa.datum_type == f32::datum_type()
            && !(sdpa.is_causal && facts.len() == 4)
            && op.output_facts(&facts).is_ok()
    };
    let targets: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|node| accepts(node))
        .map(|node| node.id)
        .collect();
    for &id in &targets {
        let node = model.node(id).clone();
        let sdpa = node.op_as::<Sdpa>().expect("selected above");
        let scale = match &sdpa.scale {
            Some(t) => Some(t.cast_to_scalar::<f32>()?),
            None => None,
        };
        let mask = node.inputs.get(3).copied();
        let mut patch = TypedModelPatch::default();
        match (
            cache_concat(model, node.inputs[1], id),
            cache_concat(model, node.inputs[2], id),
        ) {
            (Some((past_k, new_k)), Some((past_v, new_v))) => {
                let mut inputs = vec![node.inputs[0], past_k, new_k, past_v, new_v];
                inputs.extend(mask);
                let taps = patch.taps(model, &inputs)?;
                let op = CacheAttention {
                    scale,
                    causal: sdpa.is_causal,
                    concat: true,
                };
                let outs = patch.wire_node(&node.name, op, &taps)?;
                patch.shunt_outside(model, node.id.into(), outs[0])?;
                patch.shunt_outside(model, node.inputs[1], outs[1])?;
                patch.shunt_outside(model, node.inputs[2], outs[2])?;
            }
            _ => {
                let op = CacheAttention {
                    scale,
                    causal: sdpa.is_causal,
                    concat: false,
                };
                patch = TypedModelPatch::replace_single_op(model, &node, &node.inputs, op)?;
            }
        }
        patch.apply(model)?;
    }
    if !targets.is_empty() {
        model.compact()?;
    }
    Ok(targets.len())
}

/// `(past, new)` when `outlet` is a two-input `Concat` on axis 2 that only `attention` (and
/// the graph's outputs) read.
fn cache_concat(
    model: &TypedModel,
    outlet: OutletId,
    attention: usize,
) -> Option<(OutletId, OutletId)> {
    let node = model.node(outlet.node);
    let concat = node.op_as::<TypedConcat>()?;
    if concat.axis != 2 || node.inputs.len() != 2 || node.outputs.len() != 1 {
        return None;
    }
    let only_attention = node.outputs[0]
        .successors
        .iter()
        .all(|inlet| inlet.node == attention);
    only_attention.then(|| (node.inputs[0], node.inputs[1]))
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    /// Rows of the cache before this call (0 without `concat`).
    past: usize,
    /// Rows of keys and values passed in this call.
    new: usize,
    head_dim: usize,
}

impl Dims {
    fn of(
        q: &TValue,
        past_k: Option<&TValue>,
        new_k: &TValue,
        past_v: Option<&TValue>,
        new_v: &TValue,
    ) -> TractResult<Self> {
        let (qs, ks, vs) = (q.shape(), new_k.shape(), new_v.shape());
        ensure!(
            qs.len() == 4 && ks.len() == 4 && vs.len() == 4,
            "attention takes rank-4 q, k and v"
        );
        ensure!(ks == vs, "k {ks:?} and v {vs:?} differ in shape");
        let past = match (past_k.map(|t| t.shape()), past_v.map(|t| t.shape())) {
            (Some(pk), Some(pv)) => {
                ensure!(pk == pv, "past k {pk:?} and past v {pv:?} differ in shape");
                ensure!(
                    pk.len() == 4 && pk[0] == ks[0] && pk[1] == ks[1] && pk[3] == ks[3],
                    "past {pk:?} does not match the new keys {ks:?}"
                );
                pk[2]
            }
            _ => 0,
        };
        ensure!(
            qs[0] == ks[0] && qs[3] == ks[3] && qs[3] > 0,
            "q {qs:?} does not match k {ks:?} (batch, head size)"
        );
        ensure!(
            ks[1] > 0 && qs[1] % ks[1] == 0,
            "{} query heads cannot share {} KV heads",
            qs[1],
            ks[1]
        );
        let dims = Dims {
            batch: qs[0],
            heads: qs[1],
            kv_heads: ks[1],
            seq: qs[2],
            past,
            new: ks[2],
            head_dim: qs[3],
        };
        ensure!(
            dims.keys() >= dims.seq,
            "{} keys for {} queries: the keys must include the queries' own",
            dims.keys(),
            dims.seq
        );
        Ok(dims)
    }

    fn keys(&self) -> usize {
        self.past + self.new
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// The mask input, broadcast over `[batch, heads, seq, keys]`.
struct Mask<'a> {
    values: MaskValues<'a>,
    /// Element strides per axis, 0 where the mask has length 1.
    strides: [usize; 4],
}

enum MaskValues<'a> {
    Additive(&'a [f32]),
    Allowed(&'a [bool]),
}

impl<'a> Mask<'a> {
    fn new(tensor: &'a TValue, dims: &Dims) -> TractResult<Self> {
        let shape = tensor.shape();
        let full = [dims.batch, dims.heads, dims.seq, dims.keys()];
        ensure!(
            shape.len() == 4 && shape.iter().zip(full).all(|(&m, f)| m == 1 || m == f),
            "mask {shape:?} does not broadcast to {full:?}"
        );
        let mut strides = [0; 4];
        let mut stride = 1;
        for axis in (0..4).rev() {
            strides[axis] = if shape[axis] == 1 { 0 } else { stride };
            stride *= shape[axis];
        }
        let values = if tensor.datum_type() == bool::datum_type() {
            MaskValues::Allowed(plain_slice(tensor)?)
        } else {
            ensure!(
                tensor.datum_type() == f32::datum_type(),
                "mask must be f32 or bool"
            );
            MaskValues::Additive(plain_slice(tensor)?)
        };
        Ok(Mask { values, strides })
    }
}

fn plain_slice<T: Datum>(tensor: &TValue) -> TractResult<&[T]> {
    tensor.try_as_plain_ram()?.as_slice::<T>()
}

struct Job<'a> {
    dims: Dims,
    q: &'a [f32],
    past_k: &'a [f32],
    new_k: &'a [f32],
    past_v: &'a [f32],
    new_v: &'a [f32],
    mask: Option<&'a Mask<'a>>,
    scale: f32,
    causal: bool,
}

/// One KV head's work: its query rows `first..` (the output rows `out`), and, for the task
/// holding the head's first rows, its slices of the two `present` outputs to fill.
struct Task<'o> {
    b: usize,
    kvh: usize,
    first: usize,
    out: &'o mut [f32],
    present: Option<(&'o mut [f32], &'o mut [f32])>,
}

/// Query rows per task: enough to amortise a task, few enough to spread a prefill.
const ROWS_PER_TASK: usize = 64;

impl Job<'_> {
    fn run(&self, out: &mut [f32], present: Option<(&mut [f32], &mut [f32])>) {
        let d = self.dims;
        let rows_per_head = d.group() * d.seq;
        let block = rows_per_head.clamp(1, ROWS_PER_TASK);
        let cache = d.keys() * d.head_dim;
        let mut present = present.map(|(k, v)| (k.chunks_mut(cache), v.chunks_mut(cache)));
        // Tasks in output order: (batch, KV head, block of that head's query rows). The query
        // rows of one KV head (its `group` query heads, each `seq` rows) are contiguous.
        let mut tasks = Vec::new();
        let mut rest = out;
        for b in 0..d.batch {
            for kvh in 0..d.kv_heads {
                // At least one task per head, even with no query rows: it writes `present`.
                let mut first = 0;
                loop {
                    let rows = block.min(rows_per_head - first);
                    let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(rows * d.head_dim);
                    let present = match &mut present {
                        Some((k, v)) if first == 0 => k.next().zip(v.next()),
                        _ => None,
                    };
                    tasks.push(Task {
                        b,
                        kvh,
                        first,
                        out: chunk,
                        present,
                    });
                    rest = tail;
                    first += rows;
                    if first >= rows_per_head {
                        break;
                    }
                }
            }
        }
        let run = |task: Task| self.task(task);
        match current_tract_executor() {
            Executor::MultiThread(pool) if pool.current_num_threads() > 1 && tasks.len() > 1 => {
                use rayon::prelude::*;
                let pool: Arc<rayon::ThreadPool> = pool;
                pool.install(|| tasks.into_par_iter().for_each(run));
            }
            _ => tasks.into_iter().for_each(run),
        }
    }

    fn task(&self, task: Task) {
        let d = self.dims;
        let hd = d.head_dim;
        let (past, new) = (d.past * hd, d.new * hd);
        let head = task.b * d.kv_heads + task.kvh;
        let past_k = &self.past_k[head * past..][..past];
        let past_v = &self.past_v[head * past..][..past];
        let new_k = &self.new_k[head * new..][..new];
        let new_v = &self.new_v[head * new..][..new];
        if let Some((k, v)) = task.present {
            k[..past].copy_from_slice(past_k);
            k[past..].copy_from_slice(new_k);
            v[..past].copy_from_slice(past_v);
            v[past..].copy_from_slice(new_v);
        }

        let m = task.out.len() / hd;
        if m == 0 {
            return;
        }
        let t = d.keys();
        let q_start = ((task.b * d.heads + task.kvh * d.group()) * d.seq + task.first) * hd;
        let q = &self.q[q_start..][..m * hd];
        let mut scores = vec![0f32; m * t];
        // Scores over the past rows, then over the new ones, into one m × t matrix.
        for (keys, rows, column) in [(past_k, d.past, 0), (new_k, d.new, d.past)] {
            // q (m × hd) times keys (rows × hd) read as its transpose (hd × rows).
            let dst = &mut scores[column..];
            product(
                m,
                rows,
                hd,
                dst,
                t,
                false,
                q,
                (hd, 1),
                keys,
                (1, hd),
                self.scale,
            );
        }
        for (i, row) in scores.chunks_exact_mut(t).enumerate() {
            let r = task.first + i;
            let (qh, s) = (task.kvh * d.group() + r / d.seq, r % d.seq);
            if self.causal {
                let visible = (s + t - d.seq + 1).min(t);
                row[visible..].fill(f32::NEG_INFINITY);
            }
            if let Some(mask) = self.mask {
                mask.apply(task.b, qh, s, row);
            }
            softmax_in_place(row);
        }
        // out = P[:, past] · past_v + P[:, new] · new_v
        let mut accumulate = false;
        for (values, rows, column) in [(past_v, d.past, 0), (new_v, d.new, d.past)] {
            let probs = &scores[column..];
            product(
                m,
                hd,
                rows,
                task.out,
                hd,
                accumulate,
                probs,
                (t, 1),
                values,
                (hd, 1),
                1.0,
            );
            accumulate |= rows > 0;
        }
    }
}

impl Mask<'_> {
    /// Applies the mask of query `s` of head `qh` in batch `b` to its row of scores.
    fn apply(&self, b: usize, qh: usize, s: usize, row: &mut [f32]) {
        let base = b * self.strides[0] + qh * self.strides[1] + s * self.strides[2];
        let step = self.strides[3];
        match self.values {
            MaskValues::Additive(values) if step == 1 => {
                let len = row.len();
                for (x, &m) in row.iter_mut().zip(&values[base..base + len]) {
                    *x += m;
                }
            }
            MaskValues::Additive(values) => {
                let m = values[base];
                row.iter_mut().for_each(|x| *x += m);
            }
            MaskValues::Allowed(allowed) => {
                for (j, x) in row.iter_mut().enumerate() {
                    if !allowed[base + j * step] {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

/// Softmax of one row, as tract's own `Softmax` computes it (max subtracted first). A row
/// with every entry at −∞ comes out as NaN, like the reference.
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = sum.recip();
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;

    fn tensor(shape: [usize; 4], seed: u64) -> Tensor {
        Tensor::from_shape(&shape, &values(shape.iter().product(), seed)).unwrap()
    }

    fn data(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    /// Attention written out the slow, obvious way, over the concatenated keys and values.
    /// `allowed(b, h, s, t)` says whether query `s` of head `h` may see key `t`; `bias` adds to
    /// the scores.
    fn naive(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        allowed: &dyn Fn(usize, usize, usize, usize) -> bool,
        bias: &dyn Fn(usize, usize, usize, usize) -> f32,
    ) -> Vec<f32> {
        let (qs, ks) = (q.shape(), k.shape());
        let (batch, heads, seq, hd) = (qs[0], qs[1], qs[2], qs[3]);
        let (kv_heads, keys) = (ks[1], ks[2]);
        let (q, k, v) = (data(q), data(k), data(v));
        let mut out = vec![0f32; batch * heads * seq * hd];
        for b in 0..batch {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                for s in 0..seq {
                    let qrow = &q[((b * heads + h) * seq + s) * hd..][..hd];
                    let mut scores: Vec<f32> = (0..keys)
                        .map(|t| {
                            if !allowed(b, h, s, t) {
                                return f32::NEG_INFINITY;
                            }
                            let krow = &k[((b * kv_heads + kvh) * keys + t) * hd..][..hd];
                            let dot: f32 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                            dot * scale + bias(b, h, s, t)
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = scores
                        .iter_mut()
                        .map(|x| {
                            *x = (*x - max).exp();
                            *x
                        })
                        .sum();
                    for t in 0..keys {
                        let vrow = &v[((b * kv_heads + kvh) * keys + t) * hd..][..hd];
                        for (o, x) in out[((b * heads + h) * seq + s) * hd..][..hd]
                            .iter_mut()
                            .zip(vrow)
                        {
                            *o += scores[t] / sum * x;
                        }
                    }
                }
            }
        }
        out
    }

    fn concat(past: &Tensor, new: &Tensor) -> Tensor {
        Tensor::stack_tensors(2, &[past.clone(), new.clone()]).unwrap()
    }

    fn eval(op: &CacheAttention, inputs: Vec<Tensor>) -> TVec<Tensor> {
        let inputs = inputs.into_iter().map(Tensor::into_tvalue).collect();
        op.eval(&EvalContext::out_of_plan(), inputs)
            .unwrap()
            .into_iter()
            .map(|v| v.into_tensor())
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "max abs diff {worst}");
    }

    /// Decode-like and prefill-like shapes, grouped-query heads, a batch of two, query blocks
    /// split over several tasks (more than `ROWS_PER_TASK` rows per KV head), and no new rows
    /// at all (the caches are still written).
    #[test]
    fn concat_mode_with_a_bias_mask_matches_the_naive_computation() {
        for (batch, heads, kv_heads, past, seq) in [
            (1, 4, 4, 9, 1),
            (2, 4, 2, 3, 5),
            (1, 2, 1, 0, 70),
            (1, 6, 3, 40, 50),
            (1, 2, 2, 5, 0),
        ] {
            let hd = 8;
            let q = tensor([batch, heads, seq, hd], 1);
            let (pk, nk) = (
                tensor([batch, kv_heads, past, hd], 2),
                tensor([batch, kv_heads, seq, hd], 3),
            );
            let (pv, nv) = (
                tensor([batch, kv_heads, past, hd], 4),
                tensor([batch, kv_heads, seq, hd], 5),
            );
            let keys = past + seq;
            // A causal additive mask with the first key of batch 1 hidden (left padding).
            let bias: Vec<f32> = (0..batch * seq * keys)
                .map(|i| {
                    let (b, s, t) = (i / (seq * keys), i / keys % seq, i % keys);
                    if t > past + s || (b == 1 && t == 0) {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_shape(&[batch, 1, seq, keys], &bias).unwrap();
            let op = CacheAttention {
                scale: Some(0.3),
                causal: false,
                concat: true,
            };
            let out = eval(
                &op,
                vec![
                    q.clone(),
                    pk.clone(),
                    nk.clone(),
                    pv.clone(),
                    nv.clone(),
                    mask,
                ],
            );
            let (k, v) = (concat(&pk, &nk), concat(&pv, &nv));
            let want = naive(
                &q,
                &k,
                &v,
                0.3,
                &|b, _, s, t| !(t > past + s || (b == 1 && t == 0)),
                &|_, _, _, _| 0.0,
            );
            assert_close(&data(&out[0]), &want);
            assert_eq!(out[1], k, "present keys");
            assert_eq!(out[2], v, "present values");
        }
    }

    #[test]
    fn plain_mode_with_the_causal_flag_and_a_bool_mask_matches_the_naive_computation() {
        let (heads, kv_heads, seq, keys, hd) = (4, 2, 3, 7, 16);
        let (q, k, v) = (
            tensor([1, heads, seq, hd], 7),
            tensor([1, kv_heads, keys, hd], 8),
            tensor([1, kv_heads, keys, hd], 9),
        );
        // Causal alone: query s sees keys up to s + keys - seq.
        let causal = CacheAttention {
            scale: None,
            causal: true,
            concat: false,
        };
        let out = eval(&causal, vec![q.clone(), k.clone(), v.clone()]);
        assert_eq!(out.len(), 1);
        let scale = (hd as f32).sqrt().recip();
        let want = naive(
            &q,
            &k,
            &v,
            scale,
            &|_, _, s, t| t <= s + keys - seq,
            &|_, _, _, _| 0.0,
        );
        assert_close(&data(&out[0]), &want);

        // A bool mask per head ("may attend"), broadcast over batch.
        let allowed = |h: usize, s: usize, t: usize| !(h + s + t).is_multiple_of(3) || t == 0;
        let flags: Vec<bool> = (0..heads * seq * keys)
            .map(|i| allowed(i / (seq * keys), i / keys % seq, i % keys))
            .collect();
        let mask = Tensor::from_shape(&[1, heads, seq, keys], &flags).unwrap();
        let plain = CacheAttention {
            scale: Some(0.5),
            causal: false,
            concat: false,
        };
        let out = eval(&plain, vec![q.clone(), k.clone(), v.clone(), mask]);
        let want = naive(
            &q,
            &k,
            &v,
            0.5,
            &|_, h, s, t| allowed(h, s, t),
            &|_, _, _, _| 0.0,
        );
        assert_close(&data(&out[0]), &want);
    }

    #[test]
    fn inputs_that_do_not_fit_are_errors() {
        let op = CacheAttention {
            scale: None,
            causal: false,
            concat: false,
        };
        let q = tensor([1, 3, 2, 8], 1).into_tvalue();
        let kv = tensor([1, 2, 4, 8], 2).into_tvalue();
        let err = op
            .eval(&EvalContext::out_of_plan(), tvec![q, kv.clone(), kv])
            .unwrap_err();
        assert!(format!("{err:#}").contains("query heads"), "{err:#}");
        let q = tensor([1, 2, 5, 8], 1).into_tvalue();
        let short = tensor([1, 2, 4, 8], 2).into_tvalue();
        assert!(op
            .eval(&EvalContext::out_of_plan(), tvec![q, short.clone(), short])
            .is_err());
    }
}
