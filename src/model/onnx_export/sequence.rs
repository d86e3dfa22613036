//! What every layer reads that depends on the input sequence and not on the layer, made once
//! before the layers: the lengths and positions, the causal and padding mask, and the rotary
//! tables gathered at the query positions.

use tract_onnx::pb::tensor_proto::DataType;

use super::graph::{attr_int, GraphBuilder};
use super::ExportOptions;
use crate::model::config::LlamaConfig;
use crate::model::reference::rope_tables;

/// The mask and the rotary positions of the sequence being run.
pub(super) struct Sequence {
    /// `[batch, 1, seq, past + seq]` bool: `t <= past + s` and `attention_mask[b, t] != 0`.
    pub(super) mask: String,
    /// The score a masked-out key gets (`f32::MIN`).
    pub(super) neg: String,
    /// The mask as the additive bias the `Attention` operator takes (that layout only).
    pub(super) bias: Option<String>,
    pub(super) rope: Rope,
}

impl Sequence {
    pub(super) fn build(
        g: &mut GraphBuilder,
        config: &LlamaConfig,
        options: &ExportOptions,
    ) -> Self {
        let head_dim = config.head_dim();

        // Lengths: past from the first cache input, new from input_ids, both as 0-d tensors.
        let idx1 = g.const_i64_scalar(1);
        let idx2 = g.const_i64_scalar(2);
        let past_shape = g.node("Shape", &["past_key_values.0.key"], vec![]);
        let past_len = g.node("Gather", &[&past_shape, &idx2], vec![attr_int("axis", 0)]);
        let ids_shape = g.node("Shape", &["input_ids"], vec![]);
        let seq_len = g.node("Gather", &[&ids_shape, &idx1], vec![attr_int("axis", 0)]);
        let total_len = g.node("Add", &[&past_len, &seq_len], vec![]);
        let zero = g.const_i64_scalar(0);
        let one = g.const_i64_scalar(1);
        let key_pos = g.node("Range", &[&zero, &total_len, &one], vec![]);
        let query_pos = g.node("Range", &[&past_len, &total_len, &one], vec![]);

        // mask[b, 0, s, t] = t <= past + s  and  attention_mask[b, t] != 0
        let ax0 = g.const_i64("axes0", &[0], &[1]);
        let ax1 = g.const_i64("axes1", &[1], &[1]);
        let key_row = g.node("Unsqueeze", &[&key_pos, &ax0], vec![]);
        let query_col = g.node("Unsqueeze", &[&query_pos, &ax1], vec![]);
        let causal = g.node("LessOrEqual", &[&key_row, &query_col], vec![]);
        let ax01 = g.const_i64("axes01", &[0, 1], &[2]);
        let causal4 = g.node("Unsqueeze", &[&causal, &ax01], vec![]);
        let pad = g.node(
            "Cast",
            &["attention_mask"],
            vec![attr_int("to", DataType::Bool as i64)],
        );
        let ax12 = g.const_i64("axes12", &[1, 2], &[2]);
        let pad4 = g.node("Unsqueeze", &[&pad, &ax12], vec![]);
        let mask = g.node("And", &[&causal4, &pad4], vec![]);
        let neg = g.const_f32_scalar("mask_min", f32::MIN);
        // The `Attention` operator takes the mask as an additive bias.
        let bias = options.attention_op.then(|| {
            let zero = g.const_f32_scalar("mask_zero", 0.0);
            g.node("Where", &[&mask, &zero, &neg], vec![])
        });

        // Rotary tables gathered at the positions: [batch, 1, seq, head_dim].
        let (cos, sin) = rope_tables(config);
        // Only the positions kaiwa computes exactly: past them the graph fails rather than
        // attending past a sliding window.
        let max_pos = config.context_len();
        let cos_table = g.init_f32("rope.cos", &[max_pos, head_dim], &cos);
        let sin_table = g.init_f32("rope.sin", &[max_pos, head_dim], &sin);
        let positions = if options.position_ids {
            "position_ids".to_string()
        } else {
            g.node("Unsqueeze", &[&query_pos, &ax0], vec![])
        };
        let cos_g = g.node(
            "Gather",
            &[&cos_table, &positions],
            vec![attr_int("axis", 0)],
        );
        let sin_g = g.node(
            "Gather",
            &[&sin_table, &positions],
            vec![attr_int("axis", 0)],
        );
        let cos4 = g.node("Unsqueeze", &[&cos_g, &ax1], vec![]);
        let sin4 = g.node("Unsqueeze", &[&sin_g, &ax1], vec![]);

        let half = (head_dim / 2) as i64;
        let s_lo = g.const_i64("half_lo", &[0], &[1]);
        let s_mid = g.const_i64("half_mid", &[half], &[1]);
        let s_hi = g.const_i64("half_hi", &[head_dim as i64], &[1]);
        let ax3 = g.const_i64("axis3", &[3], &[1]);
        Sequence {
            mask,
            neg,
            bias,
            rope: Rope {
                cos: cos4,
                sin: sin4,
                lo: s_lo,
                mid: s_mid,
                hi: s_hi,
                axis: ax3,
            },
        }
    }
}

/// Rotate-half rotary positions: the gathered tables and the bounds of the two halves of a head.
pub(super) struct Rope {
    cos: String,
    sin: String,
    lo: String,
    mid: String,
    hi: String,
    axis: String,
}

impl Rope {
    /// `x·cos + rot(x)·sin` with `rot(x) = (−x₂, x₁)`, for `x` `[batch, heads, seq, head_dim]`.
    pub(super) fn apply(&self, g: &mut GraphBuilder, x: &str) -> String {
        let lo = g.node("Slice", &[x, &self.lo, &self.mid, &self.axis], vec![]);
        let hi = g.node("Slice", &[x, &self.mid, &self.hi, &self.axis], vec![]);
        let neg_hi = g.node("Neg", &[&hi], vec![]);
        let rotated = g.node("Concat", &[&neg_hi, &lo], vec![attr_int("axis", 3)]);
        let a = g.node("Mul", &[x, &self.cos], vec![]);
        let b = g.node("Mul", &[&rotated, &self.sin], vec![]);
        g.node("Add", &[&a, &b], vec![])
    }
}
