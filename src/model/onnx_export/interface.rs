//! The graph's inputs and outputs, in the decoder-with-past convention of Hugging Face Optimum
//! (see the module docs of [`super`]): the token ids, the attention mask, the positions when
//! asked, and per layer the past keys and values in and the present ones out.

use tract_onnx::pb::{tensor_proto::DataType, ValueInfoProto};

use super::graph::{d, n, value_info, Dim};
use super::ExportOptions;
use crate::model::config::LlamaConfig;

/// The cache of one layer's keys or values, `[batch, kv_heads, past, head_dim]`.
fn kv_dims(config: &LlamaConfig, past: &str) -> [Dim; 4] {
    [
        d("batch_size"),
        n(config.kv_heads()),
        d(past),
        n(config.head_dim()),
    ]
}

/// `input_ids`, `attention_mask`, `position_ids` (when asked) and `past_key_values.N.key|value`.
pub(super) fn inputs(config: &LlamaConfig, options: &ExportOptions) -> Vec<ValueInfoProto> {
    let mut inputs = vec![
        value_info(
            "input_ids",
            DataType::Int64,
            &[d("batch_size"), d("sequence_length")],
        ),
        value_info(
            "attention_mask",
            DataType::Int64,
            &[d("batch_size"), d("past_sequence_length + sequence_length")],
        ),
    ];
    if options.position_ids {
        inputs.push(value_info(
            "position_ids",
            DataType::Int64,
            &[d("batch_size"), d("sequence_length")],
        ));
    }
    for l in 0..config.num_hidden_layers {
        for kind in ["key", "value"] {
            inputs.push(value_info(
                &format!("past_key_values.{l}.{kind}"),
                DataType::Float,
                &kv_dims(config, "past_sequence_length"),
            ));
        }
    }
    inputs
}

/// `logits` and `present.N.key|value`.
pub(super) fn outputs(config: &LlamaConfig) -> Vec<ValueInfoProto> {
    let mut outputs = vec![value_info(
        "logits",
        DataType::Float,
        &[d("batch_size"), d("sequence_length"), n(config.vocab_size)],
    )];
    for l in 0..config.num_hidden_layers {
        for kind in ["key", "value"] {
            outputs.push(value_info(
                &format!("present.{l}.{kind}"),
                DataType::Float,
                &kv_dims(config, "past_sequence_length + sequence_length"),
            ));
        }
    }
    outputs
}
