//! ONNX export: writes `model.onnx` from `config.json` + `model.safetensors`.
//!
//! The graph follows the decoder-with-past convention of Hugging Face Optimum
//! (`text-generation-with-past`), so one runtime serves kaiwa's models and the ecosystem's:
//!
//! - inputs `input_ids` `[batch, seq]` i64, `attention_mask` `[batch, past + seq]` i64,
//!   `position_ids` `[batch, seq]` i64 (optional), `past_key_values.N.key|value`
//!   `[batch, kv_heads, past, head_dim]` f32;
//! - outputs `logits` `[batch, seq, vocab]` and `present.N.key|value`.
//!
//! One graph serves prefill (past = 0) and decode. The causal mask is derived from the past
//! length (`Shape(past.0.key)[2]`) so it stays symbolic in tract.
//!
//! Each layer's attention is one standard `Attention` node (opset 23) taking the past keys and
//! values and giving the present ones, which kaiwa's runtime runs with its own kernel
//! (`model::attention`); ONNX Runtime 1.23 and later read it too. The other layout
//! ([`ExportOptions::attention_op`] off, opset 17) writes attention out the way Optimum's Llama
//! exports do, shaped for tract's general path: the 1/√d scale on Q (not on the growing K
//! cache), `Softmax(Where(mask, QKᵀ, min))`, and each `present` output the `Concat(past, new)`
//! itself. The runtime is tested on both.

mod attention;
mod embedding;
mod external_data;
mod graph;
mod interface;
mod layer;
mod sequence;

use std::path::{Path, PathBuf};

use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto};

use super::config::LlamaConfig;
use super::weights::LlamaWeights;
use super::ModelError;
use attention::Attention;
use external_data::move_initializers_to_file;
use graph::GraphBuilder;
use layer::{DecoderLayer, RmsNorm};
use sequence::Sequence;

/// The ONNX operator set the export targets: 23, the first with a standard `Attention` operator.
pub const OPSET: i64 = 23;
/// The operator set of the decomposed layout ([`ExportOptions::attention_op`] off), which older
/// runtimes read too.
pub const OPSET_DECOMPOSED: i64 = 17;
/// The ONNX IR version that goes with [`OPSET`] (ONNX 1.18).
const IR_VERSION: i64 = 11;
/// The IR version that goes with [`OPSET_DECOMPOSED`] (ONNX 1.12).
const IR_VERSION_DECOMPOSED: i64 = 8;
/// The file the weights go to when they are stored outside the graph.
pub const EXTERNAL_DATA_FILE: &str = "model.onnx_data";

/// Variations of the export. The defaults are what `kaiwa export-onnx` writes; the others
/// reproduce what other exporters do, so the runtime is tested against them.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Take `position_ids` as an input (Optimum's Llama convention). Without it, positions are
    /// computed in the graph from the past length, as some exporters do.
    pub position_ids: bool,
    /// Store the weights in `model.onnx_data` beside the graph (ONNX external data), as
    /// Optimum does for large models.
    pub external_data: bool,
    /// Attention as one standard `Attention` node per layer (ONNX opset 23), taking the past
    /// keys and values and giving the present ones; kaiwa's runtime runs it with its own kernel
    /// (`model::attention`). Off: attention written out in `MatMul`, `Softmax` and `Concat`
    /// (opset 17), the way Optimum exports Llama.
    pub attention_op: bool,
    /// Store the weights of every matrix product (the layers' projections and the output
    /// projection) as 8-bit integers with one scale per block of
    /// [`BLOCK`](crate::model::q8::BLOCK) inputs, read
    /// through a standard blocked `DequantizeLinear` (opset 21 and later, so only with
    /// `attention_op`). kaiwa runs those products with int8 kernels (`model::q8`); ONNX Runtime
    /// reads the same file. The token embedding and the norms stay f32.
    pub int8: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            position_ids: true,
            external_data: false,
            attention_op: true,
            int8: false,
        }
    }
}

/// Writes the ONNX graph of `weights` to `path` (and `model.onnx_data` beside it when asked).
pub fn export_onnx(
    config: &LlamaConfig,
    weights: &LlamaWeights,
    path: &Path,
    options: &ExportOptions,
) -> Result<(), ModelError> {
    config.validate()?;
    if options.int8 && !options.attention_op {
        return Err(ModelError::Invalid(
            "int8 weights need the Attention layout (opset 23): blocked DequantizeLinear is an \
             opset 21 operator, newer than the decomposed layout's opset 17"
                .into(),
        ));
    }
    let mut model = build_model(config, weights, options);
    if options.external_data {
        let data_path = path.with_file_name(EXTERNAL_DATA_FILE);
        move_initializers_to_file(&mut model, &data_path)?;
    }
    let bytes = prost::Message::encode_to_vec(&model);
    // Never half a graph, and two processes exporting the same model at once (two commands
    // loading a model directory without `model.onnx`) each rename a whole file over the other's.
    crate::fsio::write_atomic(path, &bytes).map_err(|e| ModelError::io(path, e))
}

/// Builds the `ModelProto` of a Llama decoder with its weights inline.
pub fn build_model(
    config: &LlamaConfig,
    weights: &LlamaWeights,
    options: &ExportOptions,
) -> ModelProto {
    let mut g = GraphBuilder {
        int8: options.int8,
        ..Default::default()
    };
    // The parts are made in this order because node names count up and initializers are stored
    // in the order they are made: the order is part of the exported bytes.
    let sequence = Sequence::build(&mut g, config, options);
    let scale_q = attention::query_scale(&mut g, config, options);
    let (embed, mut x) = embedding::embed_tokens(&mut g, weights);
    let norm = RmsNorm::new(&mut g, config, options);
    let attention = Attention::new(&mut g, config, sequence, scale_q);
    let layer = DecoderLayer::new(norm, attention);
    for (l, w) in weights.layers.iter().enumerate() {
        x = layer.build(&mut g, l, w, &x);
    }
    let h = layer
        .norm
        .apply(&mut g, &x, &weights.norm, "model.norm.weight");
    embedding::logits(
        &mut g,
        &h,
        &embed,
        &weights.embed_tokens,
        weights.lm_head.as_ref(),
    );

    let graph = GraphProto {
        name: "kaiwa_llama".into(),
        node: g.nodes,
        initializer: g.initializers,
        input: interface::inputs(config, options),
        output: interface::outputs(config),
        ..Default::default()
    };
    ModelProto {
        ir_version: if options.attention_op {
            IR_VERSION
        } else {
            IR_VERSION_DECOMPOSED
        },
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: if options.attention_op {
                OPSET
            } else {
                OPSET_DECOMPOSED
            },
        }],
        producer_name: "kaiwa".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    }
}

/// The path `kaiwa export-onnx DIR` writes.
pub fn default_output(dir: &Path) -> PathBuf {
    dir.join(super::ONNX_FILE)
}
