//! The two ends of the decoder: the token embedding at the bottom, and at the top the output
//! projection to `logits` (the embedding table itself, transposed, when the embeddings are
//! tied).

use super::graph::{attr_int, attr_ints, GraphBuilder};
use super::layer::dequantized;
use crate::model::weights::{LlamaWeights, Param};

/// The embedding table (its initializer's name) and the embedded `input_ids`.
pub(super) fn embed_tokens(g: &mut GraphBuilder, weights: &LlamaWeights) -> (String, String) {
    let embed = g.init_f32(
        "model.embed_tokens.weight",
        &weights.embed_tokens.shape,
        &weights.embed_tokens.data,
    );
    let x = g.node("Gather", &[&embed, "input_ids"], vec![attr_int("axis", 0)]);
    (embed, x)
}

/// The `logits` output from the final normed hidden states `h`: through `lm_head`, or through
/// the embedding table `embed` when there is none.
pub(super) fn logits(
    g: &mut GraphBuilder,
    h: &str,
    embed: &str,
    embed_weights: &Param,
    lm_head: Option<&Param>,
) {
    if g.int8 {
        // The output projection in int8 blocks; with tied embeddings, a quantized copy of the
        // table (the lookup keeps the f32 table).
        let (head, base) = match lm_head {
            Some(head) => (head, "lm_head.weight"),
            None => (embed_weights, "lm_head.weight.tied"),
        };
        let weight = dequantized(g, head, base);
        let wt = g.node("Transpose", &[&weight], vec![attr_ints("perm", &[1, 0])]);
        g.node_to("MatMul", &[h, &wt], "logits", vec![]);
        return;
    }
    match lm_head {
        Some(head) => {
            let wt = head.transposed();
            let weight = g.init_f32("lm_head.weight.T", &wt.shape, &wt.data);
            g.node_to("MatMul", &[h, &weight], "logits", vec![]);
        }
        None => {
            // Tied embeddings: the output projection is the embedding table, transposed once.
            let wt = g.node("Transpose", &[embed], vec![attr_ints("perm", &[1, 0])]);
            g.node_to("MatMul", &[h, &wt], "logits", vec![]);
        }
    }
}
