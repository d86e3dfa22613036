//! Graphs with int8 weights in tract: the blocked `DequantizeLinear` of `kaiwa export-onnx
//! --quantize int8` read into [`Q8Matrix`] blocks, and each product with such a weight run by
//! [`Q8Linear`] on those blocks.
//!
//! tract 0.23 refuses blocked `DequantizeLinear` (opset 21's `block_size`). [`register`] gives
//! the parser a reading of it for the one case int8 weights need: a constant int8 matrix
//! `[out, in]` with f32 scales `[out, ⌈in / block⌉]` along axis 1 and no zero point (or zeros).
//! The weight becomes a [`Q8Weight`] node that keeps the blocks; [`fuse_q8`] then puts a
//! [`Q8Linear`] in place of every product of activations with such a weight. A weight that no
//! product takes over (or blocks of another size) is dequantized to an f32 constant once, at
//! load: always correct, only not faster. Every other `DequantizeLinear` goes to tract's own
//! reading.

use std::sync::{Arc, OnceLock};

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_hir::internal::*;

use super::q8::{Q8Linear, Q8Matrix, BLOCK};

type Builder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own reading of `DequantizeLinear`, for the forms this module leaves to it.
static TRACT_DEQUANTIZE: OnceLock<Builder> = OnceLock::new();

/// Makes `onnx` read blocked `DequantizeLinear` nodes (see the module docs).
pub fn register(onnx: &mut tract_onnx::Onnx) {
    let register: &mut OnnxOpRegister = &mut onnx.op_register;
    if let Some(&original) = register.0.get("DequantizeLinear") {
        let _ = TRACT_DEQUANTIZE.set(original);
    }
    register.insert("DequantizeLinear", dequantize_linear);
}

fn dequantize_linear(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let block = node.get_attr_opt::<i64>("block_size")?.unwrap_or(0);
    if block == 0 {
        let original = TRACT_DEQUANTIZE
            .get()
            .context("tract's DequantizeLinear was not registered")?;
        return original(ctx, node);
    }
    ensure!(block > 0, "{}: block_size {block} is negative", node.name);
    let axis = node.get_attr_opt::<i64>("axis")?.unwrap_or(1);
    let zero_point = node.input.len() > 2 && !node.input[2].is_empty();
    Ok((
        expand(BlockDequantize {
            axis,
            block: block as usize,
            zero_point,
        }),
        vec![],
    ))
}

/// A blocked `DequantizeLinear`, as the parser sees it.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct BlockDequantize {
    axis: i64,
    block: usize,
    zero_point: bool,
}

impl Expansion for BlockDequantize {
    fn name(&self) -> StaticName {
        "BlockDequantizeLinear".into()
    }

    // Never folded into an f32 constant while the graph is read: the blocks must reach
    // `wire`, and then `fuse_q8`.
    fn runs_out_of_plan(&self) -> bool {
        false
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2 + usize::from(self.zero_point))?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |ix: usize, what: &str| -> TractResult<Arc<Tensor>> {
            model
                .outlet_fact(inputs[ix])?
                .konst
                .clone()
                .with_context(|| {
                    format!("{prefix}: blocked DequantizeLinear needs a constant {what}")
                })
        };
        let quants = konst(0, "input")?;
        let scales = konst(1, "scale")?.cast_to::<f32>()?.into_owned();
        let shape = quants.shape().to_vec();
        let [rows, cols] = shape[..] else {
            bail!(
                "{prefix}: blocked DequantizeLinear of a rank-{} tensor: kaiwa reads matrices only",
                shape.len()
            );
        };
        ensure!(
            self.axis == 1 || self.axis == -1,
            "{prefix}: blocks along axis {}: kaiwa reads blocks along the last axis only",
            self.axis
        );
        ensure!(
            quants.datum_type() == i8::datum_type(),
            "{prefix}: {:?} blocks: kaiwa reads int8 blocks only",
            quants.datum_type()
        );
        if self.zero_point {
            let zeros = konst(2, "zero point")?.cast_to::<i32>()?.into_owned();
            ensure!(
                zeros
                    .try_as_plain_ram()?
                    .as_slice::<i32>()?
                    .iter()
                    .all(|&z| z == 0),
                "{prefix}: a non-zero zero point: kaiwa reads symmetric blocks only"
            );
        }
        let blocks = cols.div_ceil(self.block);
        ensure!(
            scales.shape() == [rows, blocks],
            "{prefix}: scales of shape {:?} for a {rows}×{cols} matrix in blocks of {}: expected \
             [{rows}, {blocks}]",
            scales.shape(),
            self.block
        );
        let q = quants.try_as_plain_ram()?.as_slice::<i8>()?.to_vec();
        let s = scales.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        if self.block == BLOCK {
            let matrix = Q8Matrix::from_parts_padded(rows, cols, q, s)?;
            return model.wire_node(prefix, Q8Weight(Arc::new(matrix), cols), &[]);
        }
        // Blocks of another size: the f32 matrix they stand for.
        let mut w = vec![0f32; rows * cols];
        for (r, row) in w.chunks_exact_mut(cols).enumerate() {
            for (c, x) in row.iter_mut().enumerate() {
                *x = q[r * cols + c] as f32 * s[r * blocks + c / self.block];
            }
        }
        let tensor = Tensor::from_shape(&[rows, cols], &w)?;
        Ok(tvec!(model.add_const(prefix, tensor)?))
    }
}

/// An int8 weight matrix in the graph, `[out, in]` f32 to whatever reads it: the blocks (their
/// rows padded to whole blocks) and `in`. [`fuse_q8`] hands it to the products that read it; it
/// is never folded into a constant before that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Q8Weight(pub Arc<Q8Matrix>, pub usize);

impl Op for Q8Weight {
    fn name(&self) -> StaticName {
        "KaiwaQ8Weight".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{}×{} int8", self.0.rows(), self.1)])
    }

    op_as_typed_op!();
}

impl EvalOp for Q8Weight {
    // Not folded while the graph is optimised, so that `fuse_q8` still finds the blocks.
    not_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.dequantized()?.into_tvalue()))
    }
}

impl Q8Weight {
    fn dequantized(&self) -> TractResult<Tensor> {
        let m = &self.0;
        Tensor::from_shape(&[m.rows(), self.1], &m.unpadded(&m.dequantize(), self.1))
    }
}

impl TypedOp for Q8Weight {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact([self.0.rows(), self.1])))
    }

    as_op!();
}

/// Puts a [`Q8Linear`] in place of every product `x · Wᵀ` whose `W` is a [`Q8Weight`] (a typed,
/// decluttered model), and turns the int8 weights left over into f32 constants. Returns how
/// many products run on int8 blocks.
pub fn fuse_q8(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    let products: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<EinSum>())
        .map(|n| n.id)
        .collect();
    for id in products {
        let node = model.node(id).clone();
        let einsum = node.op_as::<EinSum>().expect("selected above");
        if node.inputs.len() != 2 || einsum.q_params.is_some() {
            continue;
        }
        if let Some(weight) = model.node(node.inputs[1].node).op_as::<Q8Weight>() {
            let x_fact = model.outlet_fact(node.inputs[0])?;
            let out_fact = model.outlet_fact(id.into())?;
            let Some(reshape) = transposed_product(einsum, &x_fact.shape, &out_fact.shape) else {
                continue;
            };
            let op = Q8Linear {
                weight: Arc::clone(&weight.0),
                k: weight.1,
            };
            let mut patch = TypedModelPatch::default();
            let x = patch.tap_model(model, node.inputs[0])?;
            let mut y = patch.wire_node(&node.name, op, &[x])?;
            if let Some(reshape) = reshape {
                y = patch.wire_node(format!("{}.shape", node.name), reshape, &y)?;
            }
            patch.shunt_outside(model, node.id.into(), y[0])?;
            patch.apply(model)?;
            fused += 1;
        } else if let Some((weight, heads)) = per_head_weight(model, node.inputs[1]) {
            // The output projection of attention: tract folded the attention output's
            // `[batch, heads, seq, head_dim] → [batch, seq, heads·head_dim]` into the product and
            // split the weight per head. Undo that: the same layout change, then the product.
            if !reads_per_head(einsum, model.outlet_fact(node.inputs[0])?.rank()) {
                continue;
            }
            let fact = model.outlet_fact(node.inputs[0])?;
            let head_dim = fact.shape[3].clone();
            let mut patch = TypedModelPatch::default();
            let x = patch.tap_model(model, node.inputs[0])?;
            let x = patch.wire_node(
                format!("{}.heads_last", node.name),
                AxisOp::Move(1, 2),
                &[x],
            )?;
            let merge = AxisOp::Reshape(
                2,
                tvec![heads.to_dim(), head_dim.clone()],
                tvec![head_dim * heads],
            );
            let x = patch.wire_node(format!("{}.merge_heads", node.name), merge, &x)?;
            let op = Q8Linear {
                weight: Arc::clone(&weight.0),
                k: weight.1,
            };
            let y = patch.wire_node(&node.name, op, &x)?;
            patch.shunt_outside(model, node.id.into(), y[0])?;
            patch.apply(model)?;
            fused += 1;
        }
    }
    // Weights no product took: their f32 values, computed once.
    let left: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<Q8Weight>() && !n.outputs[0].successors.is_empty())
        .map(|n| n.id)
        .collect();
    for id in left {
        let node = model.node(id).clone();
        let tensor = node
            .op_as::<Q8Weight>()
            .expect("selected above")
            .dequantized()?;
        let patch = TypedModelPatch::replace_single_op(
            model,
            &node,
            &[],
            Const::new(tensor.into_arc_tensor())?,
        )?;
        patch.apply(model)?;
    }
    model.compact()?;
    Ok(fused)
}

/// When `einsum` computes `x · Wᵀ` for `x` of shape `x_shape` `[..., in]` and `W` `[out, in]`
/// (`x`'s last axis contracted with `W`'s axis 1, `W`'s axis 0 the output's last, `x`'s other
/// axes kept in order, give or take axes of length 1, which tract moves about): `Some` of the
/// reshape that turns [`Q8Linear`]'s output (`x`'s leading axes, then `out`) into the product's
/// `out_shape`, or `Some(None)` when none is needed.
fn transposed_product(
    einsum: &EinSum,
    x_shape: &ShapeFact,
    out_shape: &ShapeFact,
) -> Option<Option<AxisOp>> {
    let axes = &einsum.axes;
    let (x_rank, out_rank) = (x_shape.rank(), out_shape.rank());
    if x_rank == 0 || out_rank == 0 || axes.rank(InOut::In(1)) != 2 {
        return None;
    }
    let k = axes.axis((InOut::In(0), x_rank - 1)).ok()?;
    let n = axes.axis((InOut::In(1), 0)).ok()?;
    if k.inputs[1].as_slice() != [1]
        || !k.outputs[0].is_empty()
        || n.outputs[0].as_slice() != [out_rank - 1]
        || !n.inputs[0].is_empty()
    {
        return None;
    }
    // The leading axes: each of x's goes to the output in order or has length 1; each of the
    // output's comes from x or has length 1.
    let mut last_out = None;
    for i in 0..x_rank - 1 {
        let a = axes.axis((InOut::In(0), i)).ok()?;
        if !a.inputs[1].is_empty() {
            return None;
        }
        match a.outputs[0].as_slice() {
            [o] if last_out.is_none_or(|l| *o > l) => last_out = Some(*o),
            [] if x_shape[i].is_one() => {}
            _ => return None,
        }
    }
    for o in 0..out_rank - 1 {
        let a = axes.axis((InOut::Out(0), o)).ok()?;
        if a.inputs[0].is_empty() && !out_shape[o].is_one() {
            return None;
        }
    }
    let from: TVec<TDim> = x_shape.iter().take(x_rank - 1).cloned().collect();
    let to: TVec<TDim> = out_shape.iter().take(out_rank - 1).cloned().collect();
    Some((from != to).then(|| AxisOp::Reshape(0, from, to)))
}

/// The int8 weight and the number of heads when `outlet` is a [`Q8Weight`] `[n, heads·d]`
/// transposed and split per head, `[heads, d, n]`: what tract makes of attention's output
/// projection.
fn per_head_weight(model: &TypedModel, outlet: OutletId) -> Option<(&Q8Weight, usize)> {
    let reshape = model.node(outlet.node);
    let AxisOp::Reshape(0, from, to) = reshape.op_as::<AxisOp>()? else {
        return None;
    };
    let moved = model.node(reshape.inputs.first()?.node);
    if moved.op_as::<AxisOp>()? != &AxisOp::Move(0, 1)
        && moved.op_as::<AxisOp>()? != &AxisOp::Move(1, 0)
    {
        return None;
    }
    let weight = model.node(moved.inputs.first()?.node).op_as::<Q8Weight>()?;
    let heads = to.first()?.to_usize().ok()?;
    let d = to.get(1)?.to_usize().ok()?;
    let whole = from.first()?.to_usize().ok()?;
    (from.len() == 1 && to.len() == 2 && heads * d == whole && whole == weight.1)
        .then_some((weight, heads))
}

/// Whether `einsum` computes `out[a, m, n] = Σ_{b, k} x[a, b, m, k] · w[b, k, n]`.
fn reads_per_head(einsum: &EinSum, x_rank: usize) -> bool {
    let axes = &einsum.axes;
    let check = || -> TractResult<bool> {
        if x_rank != 4 || axes.rank(InOut::In(1)) != 3 || axes.rank(InOut::Out(0)) != 3 {
            return Ok(false);
        }
        let at = |io: InOut, p: usize| axes.axis((io, p));
        let same = |a: &Axis, x: &[usize], w: &[usize], o: &[usize]| {
            a.inputs[0].as_slice() == x
                && a.inputs[1].as_slice() == w
                && a.outputs[0].as_slice() == o
        };
        Ok(same(at(InOut::In(0), 0)?, &[0], &[], &[0])
            && same(at(InOut::In(0), 1)?, &[1], &[0], &[])
            && same(at(InOut::In(0), 2)?, &[2], &[], &[1])
            && same(at(InOut::In(0), 3)?, &[3], &[1], &[])
            && same(at(InOut::In(1), 2)?, &[], &[2], &[2]))
    };
    check().unwrap_or(false)
}
