//! A decoder layer: RMSNorm, self-attention ([`super::attention`]) and a residual, then
//! RMSNorm, the SwiGLU MLP and a residual; and the two primitives every part uses, RMSNorm and
//! the linear projection.

use super::attention::Attention;
use super::graph::{attr_int, attr_ints, GraphBuilder};
use super::ExportOptions;
use crate::model::config::LlamaConfig;
use crate::model::q8::{Q8Matrix, BLOCK};
use crate::model::weights::{LayerWeights, Param};

/// RMSNorm with its epsilon, made once: `x / √(mean(x²) + eps) · weight` over the last axis.
pub(super) struct RmsNorm {
    eps: String,
    /// Since opset 18 the axes of a reduction are an input (the `Attention` layout's opset).
    axes_as_input: bool,
}

impl RmsNorm {
    pub(super) fn new(g: &mut GraphBuilder, config: &LlamaConfig, options: &ExportOptions) -> Self {
        RmsNorm {
            eps: g.const_f32_scalar("rms_eps", config.rms_norm_eps as f32),
            axes_as_input: options.attention_op,
        }
    }

    /// `x` normed, with the learned weight `w` stored as the initializer `name`.
    pub(super) fn apply(&self, g: &mut GraphBuilder, x: &str, w: &Param, name: &str) -> String {
        let weight = g.init_f32(name, &w.shape, &w.data);
        let sq = g.node("Mul", &[x, x], vec![]);
        // Since opset 18 the axes of a reduction are an input.
        let mean = if self.axes_as_input {
            let axes = g.const_i64("axes_last", &[-1], &[1]);
            g.node("ReduceMean", &[&sq, &axes], vec![attr_int("keepdims", 1)])
        } else {
            g.node(
                "ReduceMean",
                &[&sq],
                vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
            )
        };
        let shifted = g.node("Add", &[&mean, &self.eps], vec![]);
        let rms = g.node("Sqrt", &[&shifted], vec![]);
        let normed = g.node("Div", &[x, &rms], vec![]);
        g.node("Mul", &[&normed, &weight], vec![])
    }
}

/// `x · wᵀ` for a weight `w` `[out, in]`: stored transposed as the initializer `name` (which
/// ends in `.T`), or, when the graph is int8, as `w`'s 8-bit blocks ([`q8::Q8Matrix`]) and their
/// scales dequantized by a blocked `DequantizeLinear` and transposed.
pub(super) fn linear(g: &mut GraphBuilder, x: &str, w: &Param, name: &str) -> String {
    if g.int8 {
        let base = name.strip_suffix(".T").unwrap_or(name);
        let weight = dequantized(g, w, base);
        let wt = g.node("Transpose", &[&weight], vec![attr_ints("perm", &[1, 0])]);
        return g.node("MatMul", &[x, &wt], vec![]);
    }
    let wt = w.transposed();
    let weight = g.init_f32(name, &wt.shape, &wt.data);
    g.node("MatMul", &[x, &weight], vec![])
}

/// `w` `[out, in]` quantized to 8-bit blocks along `in`, stored as `{base}.int8` with the
/// blocks' scales as `{base}.scale` `[out, ⌈in / BLOCK⌉]`, and the `DequantizeLinear` that
/// turns them back into `w`'s f32 approximation (the runtime runs the product on the blocks).
pub(super) fn dequantized(g: &mut GraphBuilder, w: &Param, base: &str) -> String {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let q = Q8Matrix::quantize_padded(&w.data, rows, cols)
        .expect("a weight's values match its shape (checked when the weights were read)");
    let quants = g.init_i8(
        &format!("{base}.int8"),
        &[rows, cols],
        &q.unpadded(q.quants(), cols),
    );
    let scales = g.init_f32(&format!("{base}.scale"), &[rows, q.blocks()], q.scales());
    g.node(
        "DequantizeLinear",
        &[&quants, &scales],
        vec![attr_int("axis", 1), attr_int("block_size", BLOCK as i64)],
    )
}

/// `x · wᵀ + b` for the projection whose Hugging Face weight is `{name}.weight`: the weight
/// stored transposed as `{name}.weight.T`, the bias, when there is one, as `{name}.bias`.
pub(super) fn affine(
    g: &mut GraphBuilder,
    x: &str,
    w: &Param,
    b: Option<&Param>,
    name: &str,
) -> String {
    let y = linear(g, x, w, &format!("{name}.weight.T"));
    match b {
        None => y,
        Some(b) => {
            let bias = g.init_f32(&format!("{name}.bias"), &b.shape, &b.data);
            g.node("Add", &[&y, &bias], vec![])
        }
    }
}

/// The parts every decoder layer is built of.
pub(super) struct DecoderLayer {
    pub(super) norm: RmsNorm,
    attention: Attention,
}

impl DecoderLayer {
    pub(super) fn new(norm: RmsNorm, attention: Attention) -> Self {
        DecoderLayer { norm, attention }
    }

    /// Layer `l` with weights `w` on the hidden states `x`: the hidden states after it.
    pub(super) fn build(
        &self,
        g: &mut GraphBuilder,
        l: usize,
        w: &LayerWeights,
        x: &str,
    ) -> String {
        let p = format!("model.layers.{l}");
        let h = self.norm.apply(
            g,
            x,
            &w.input_layernorm,
            &format!("{p}.input_layernorm.weight"),
        );
        let attn = self.attention.block(g, l, w, &h);
        let x = g.node("Add", &[x, &attn], vec![]);

        let h = self.norm.apply(
            g,
            &x,
            &w.post_attention_layernorm,
            &format!("{p}.post_attention_layernorm.weight"),
        );
        let down = mlp(g, &p, w, &h);
        g.node("Add", &[&x, &down], vec![])
    }
}

/// The SwiGLU MLP: `down(silu(gate(h)) · up(h))`, silu written as `x · σ(x)`.
fn mlp(g: &mut GraphBuilder, p: &str, w: &LayerWeights, h: &str) -> String {
    let gate = linear(g, h, &w.gate_proj, &format!("{p}.mlp.gate_proj.weight.T"));
    let up = linear(g, h, &w.up_proj, &format!("{p}.mlp.up_proj.weight.T"));
    let sig = g.node("Sigmoid", &[&gate], vec![]);
    let act = g.node("Mul", &[&gate, &sig], vec![]);
    let prod = g.node("Mul", &[&act, &up], vec![]);
    linear(
        g,
        &prod,
        &w.down_proj,
        &format!("{p}.mlp.down_proj.weight.T"),
    )
}
