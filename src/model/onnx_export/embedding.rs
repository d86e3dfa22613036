//! The two ends of the decoder: the token embedding at the bottom, and at the top the output
//! projection to `logits` (the embedding table itself, transposed, when the embeddings are
//! tied).

use super::graph::{attr_int, attr_ints, GraphBuilder};
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
pub(super) fn logits(g: &mut GraphBuilder, h: &str, embed: &str, lm_head: Option<&Param>) {
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
