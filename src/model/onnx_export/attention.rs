//! A layer's self-attention block: the Q/K/V projections (with Qwen2's biases), the heads, rotary positions, the KV
//! cache (the layer's `past_key_values.N.*` in, `present.N.*` out) and the output projection.
//!
//! Two layouts ([`ExportOptions::attention_op`]): one standard `Attention` node (opset 23) that
//! takes the past keys and values and gives the present ones, or attention written out the way
//! Optimum's Llama exports do, shaped for tract's general path.

use super::graph::{attr_float, attr_int, attr_ints, GraphBuilder};
use super::layer::{affine, linear};
use super::sequence::Sequence;
use super::ExportOptions;
use crate::model::config::LlamaConfig;
use crate::model::weights::LayerWeights;

/// The 1/√d scale on Q, as a constant, in the written-out layout (not on the growing K cache);
/// the `Attention` operator takes it as an attribute instead.
pub(super) fn query_scale(
    g: &mut GraphBuilder,
    config: &LlamaConfig,
    options: &ExportOptions,
) -> Option<String> {
    let scale = 1.0 / (config.head_dim() as f32).sqrt();
    (!options.attention_op).then(|| g.const_f32_scalar("attn_scale", scale))
}

/// What the attention of every layer shares: the head counts, the sequence's mask and rotary
/// positions, and the constants made once.
pub(super) struct Attention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    sequence: Sequence,
    /// The 1/√d scale on Q of the written-out layout ([`query_scale`]).
    scale_q: Option<String>,
    /// The shape `[0, 0, heads·head_dim]` the heads are merged back into.
    merged_hidden: String,
}

impl Attention {
    pub(super) fn new(
        g: &mut GraphBuilder,
        config: &LlamaConfig,
        sequence: Sequence,
        scale_q: Option<String>,
    ) -> Self {
        let (heads, head_dim) = (config.num_attention_heads, config.head_dim());
        let merged_hidden = g.const_i64("shape_hidden", &[0, 0, (heads * head_dim) as i64], &[3]);
        Attention {
            heads,
            kv_heads: config.kv_heads(),
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            sequence,
            scale_q,
            merged_hidden,
        }
    }

    /// Rows `[batch, seq, h·head_dim]` to heads `[batch, h, seq, head_dim]`.
    fn to_heads(&self, g: &mut GraphBuilder, x: &str, h: usize) -> String {
        let shape = g.const_i64(
            &format!("shape_heads{h}"),
            &[0, 0, h as i64, self.head_dim as i64],
            &[4],
        );
        let r = g.node("Reshape", &[x, &shape], vec![]);
        g.node("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])])
    }

    /// The attention output of layer `l` for the normed hidden states `h`, projected back to
    /// `[batch, seq, hidden]`; writes the layer's `present.{l}.key|value`.
    pub(super) fn block(
        &self,
        g: &mut GraphBuilder,
        l: usize,
        w: &LayerWeights,
        h: &str,
    ) -> String {
        let (heads, kv_heads, head_dim) = (self.heads, self.kv_heads, self.head_dim);
        let p = format!("model.layers.{l}");
        let bias = w.qkv_bias.as_ref();
        let q = affine(
            g,
            h,
            &w.q_proj,
            bias.map(|b| &b.q),
            &format!("{p}.self_attn.q_proj"),
        );
        let k = affine(
            g,
            h,
            &w.k_proj,
            bias.map(|b| &b.k),
            &format!("{p}.self_attn.k_proj"),
        );
        let v = affine(
            g,
            h,
            &w.v_proj,
            bias.map(|b| &b.v),
            &format!("{p}.self_attn.v_proj"),
        );
        let q = self.to_heads(g, &q, heads);
        let k = self.to_heads(g, &k, kv_heads);
        let v = self.to_heads(g, &v, kv_heads);
        let q = self.sequence.rope.apply(g, &q);
        let k = self.sequence.rope.apply(g, &k);
        let present_k = format!("present.{l}.key");
        let present_v = format!("present.{l}.value");
        let past_k = format!("past_key_values.{l}.key");
        let past_v = format!("past_key_values.{l}.value");
        let ctx = if let Some(bias) = &self.sequence.bias {
            // Grouped-query attention is native to the operator (fewer K/V heads than Q heads).
            let ctx = format!("/attention_{l}");
            g.node_outputs(
                "Attention",
                &[&q, &k, &v, bias, &past_k, &past_v],
                &[&ctx, &present_k, &present_v],
                vec![attr_float("scale", self.scale)],
            );
            ctx
        } else {
            let scale_q = self.scale_q.as_deref().expect("made for this layout");
            let q = g.node("Mul", &[&q, scale_q], vec![]);
            g.node_to(
                "Concat",
                &[&past_k, &k],
                &present_k,
                vec![attr_int("axis", 2)],
            );
            g.node_to(
                "Concat",
                &[&past_v, &v],
                &present_v,
                vec![attr_int("axis", 2)],
            );
            // Grouped-query attention: each K/V head serves `groups` query heads.
            let groups = heads / kv_heads;
            let (keys, values) = if groups == 1 {
                (present_k, present_v)
            } else {
                let repeat = |g: &mut GraphBuilder, t: &str| {
                    // [b, kv, t, d] -> [b, kv, groups, t, d] -> [b, heads, t, d]
                    let ax2 = g.const_i64("axis2", &[2], &[1]);
                    let expand = g.const_i64("kv_expand", &[1, 1, groups as i64, 1, 1], &[5]);
                    let merged = g.const_i64(
                        "shape_merge_kv",
                        &[0, heads as i64, -1, head_dim as i64],
                        &[4],
                    );
                    let u = g.node("Unsqueeze", &[t, &ax2], vec![]);
                    let e = g.node("Expand", &[&u, &expand], vec![]);
                    g.node("Reshape", &[&e, &merged], vec![])
                };
                (repeat(g, &present_k), repeat(g, &present_v))
            };
            // Scores as (K·qᵀ)ᵀ rather than q·Kᵀ: while decoding q is one row, and tract's matmul
            // kernels are much faster with the long side (the cache) as rows. Measured: decode
            // of the small preset went from about 530 to 640 tokens/s.
            let qt = g.node("Transpose", &[&q], vec![attr_ints("perm", &[0, 1, 3, 2])]);
            let scores_t = g.node("MatMul", &[&keys, &qt], vec![]);
            let scores = g.node(
                "Transpose",
                &[&scores_t],
                vec![attr_ints("perm", &[0, 1, 3, 2])],
            );
            let masked = g.node(
                "Where",
                &[&self.sequence.mask, &scores, &self.sequence.neg],
                vec![],
            );
            let probs = g.node("Softmax", &[&masked], vec![attr_int("axis", -1)]);
            g.node("MatMul", &[&probs, &values], vec![])
        };
        let ctx = g.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let ctx = g.node("Reshape", &[&ctx, &self.merged_hidden], vec![]);
        linear(
            g,
            &ctx,
            &w.o_proj,
            &format!("{p}.self_attn.o_proj.weight.T"),
        )
    }
}
