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

use std::io::Write;
use std::path::{Path, PathBuf};

use tract_onnx::pb::{
    self,
    attribute_proto::AttributeType,
    tensor_proto::DataType,
    tensor_shape_proto::{dimension, Dimension},
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::config::LlamaConfig;
use super::reference::rope_tables;
use super::weights::{LlamaWeights, Param};
use super::ModelError;

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
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            position_ids: true,
            external_data: false,
            attention_op: true,
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
    let mut g = GraphBuilder::default();
    let (heads, kv_heads, head_dim) = (
        config.num_attention_heads,
        config.kv_heads(),
        config.head_dim(),
    );
    let layers = config.num_hidden_layers;

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
    let kv_dims = |past: &str| [d("batch_size"), n(kv_heads), d(past), n(head_dim)];
    let mut outputs = vec![value_info(
        "logits",
        DataType::Float,
        &[d("batch_size"), d("sequence_length"), n(config.vocab_size)],
    )];
    for l in 0..layers {
        for kind in ["key", "value"] {
            inputs.push(value_info(
                &format!("past_key_values.{l}.{kind}"),
                DataType::Float,
                &kv_dims("past_sequence_length"),
            ));
            outputs.push(value_info(
                &format!("present.{l}.{kind}"),
                DataType::Float,
                &kv_dims("past_sequence_length + sequence_length"),
            ));
        }
    }

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
    let max_pos = config.max_position_embeddings;
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
    let scale = 1.0 / (head_dim as f32).sqrt();
    let scale_q = (!options.attention_op).then(|| g.const_f32_scalar("attn_scale", scale));
    let to_heads = |g: &mut GraphBuilder, x: &str, h: usize| {
        let shape = g.const_i64(
            &format!("shape_heads{h}"),
            &[0, 0, h as i64, head_dim as i64],
            &[4],
        );
        let r = g.node("Reshape", &[x, &shape], vec![]);
        g.node("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])])
    };
    let rope = |g: &mut GraphBuilder, x: &str| {
        let lo = g.node("Slice", &[x, &s_lo, &s_mid, &ax3], vec![]);
        let hi = g.node("Slice", &[x, &s_mid, &s_hi, &ax3], vec![]);
        let neg_hi = g.node("Neg", &[&hi], vec![]);
        let rotated = g.node("Concat", &[&neg_hi, &lo], vec![attr_int("axis", 3)]);
        let a = g.node("Mul", &[x, &cos4], vec![]);
        let b = g.node("Mul", &[&rotated, &sin4], vec![]);
        g.node("Add", &[&a, &b], vec![])
    };

    let embed = g.init_f32(
        "model.embed_tokens.weight",
        &weights.embed_tokens.shape,
        &weights.embed_tokens.data,
    );
    let mut x = g.node("Gather", &[&embed, "input_ids"], vec![attr_int("axis", 0)]);
    let eps = g.const_f32_scalar("rms_eps", config.rms_norm_eps as f32);
    let rms_norm = |g: &mut GraphBuilder, x: &str, w: &Param, name: &str| {
        let weight = g.init_f32(name, &w.shape, &w.data);
        let sq = g.node("Mul", &[x, x], vec![]);
        // Since opset 18 the axes of a reduction are an input.
        let mean = if options.attention_op {
            let axes = g.const_i64("axes_last", &[-1], &[1]);
            g.node("ReduceMean", &[&sq, &axes], vec![attr_int("keepdims", 1)])
        } else {
            g.node(
                "ReduceMean",
                &[&sq],
                vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
            )
        };
        let shifted = g.node("Add", &[&mean, &eps], vec![]);
        let rms = g.node("Sqrt", &[&shifted], vec![]);
        let normed = g.node("Div", &[x, &rms], vec![]);
        g.node("Mul", &[&normed, &weight], vec![])
    };
    let linear = |g: &mut GraphBuilder, x: &str, w: &Param, name: &str| {
        let wt = w.transposed();
        let weight = g.init_f32(name, &wt.shape, &wt.data);
        g.node("MatMul", &[x, &weight], vec![])
    };

    let groups = heads / kv_heads;
    let merged_hidden = g.const_i64("shape_hidden", &[0, 0, (heads * head_dim) as i64], &[3]);

    for (l, w) in weights.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let h = rms_norm(
            &mut g,
            &x,
            &w.input_layernorm,
            &format!("{p}.input_layernorm.weight"),
        );
        let q = linear(
            &mut g,
            &h,
            &w.q_proj,
            &format!("{p}.self_attn.q_proj.weight.T"),
        );
        let k = linear(
            &mut g,
            &h,
            &w.k_proj,
            &format!("{p}.self_attn.k_proj.weight.T"),
        );
        let v = linear(
            &mut g,
            &h,
            &w.v_proj,
            &format!("{p}.self_attn.v_proj.weight.T"),
        );
        let q = to_heads(&mut g, &q, heads);
        let k = to_heads(&mut g, &k, kv_heads);
        let v = to_heads(&mut g, &v, kv_heads);
        let q = rope(&mut g, &q);
        let k = rope(&mut g, &k);
        let present_k = format!("present.{l}.key");
        let present_v = format!("present.{l}.value");
        let past_k = format!("past_key_values.{l}.key");
        let past_v = format!("past_key_values.{l}.value");
        let ctx = if let Some(bias) = &bias {
            // Grouped-query attention is native to the operator (fewer K/V heads than Q heads).
            let ctx = format!("/attention_{l}");
            g.node_outputs(
                "Attention",
                &[&q, &k, &v, bias, &past_k, &past_v],
                &[&ctx, &present_k, &present_v],
                vec![attr_float("scale", scale)],
            );
            ctx
        } else {
            let scale_q = scale_q.as_deref().expect("made for this layout");
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
                (repeat(&mut g, &present_k), repeat(&mut g, &present_v))
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
            let masked = g.node("Where", &[&mask, &scores, &neg], vec![]);
            let probs = g.node("Softmax", &[&masked], vec![attr_int("axis", -1)]);
            g.node("MatMul", &[&probs, &values], vec![])
        };
        let ctx = g.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let ctx = g.node("Reshape", &[&ctx, &merged_hidden], vec![]);
        let attn = linear(
            &mut g,
            &ctx,
            &w.o_proj,
            &format!("{p}.self_attn.o_proj.weight.T"),
        );
        x = g.node("Add", &[&x, &attn], vec![]);

        let h = rms_norm(
            &mut g,
            &x,
            &w.post_attention_layernorm,
            &format!("{p}.post_attention_layernorm.weight"),
        );
        let gate = linear(
            &mut g,
            &h,
            &w.gate_proj,
            &format!("{p}.mlp.gate_proj.weight.T"),
        );
        let up = linear(&mut g, &h, &w.up_proj, &format!("{p}.mlp.up_proj.weight.T"));
        let sig = g.node("Sigmoid", &[&gate], vec![]);
        let act = g.node("Mul", &[&gate, &sig], vec![]);
        let prod = g.node("Mul", &[&act, &up], vec![]);
        let down = linear(
            &mut g,
            &prod,
            &w.down_proj,
            &format!("{p}.mlp.down_proj.weight.T"),
        );
        x = g.node("Add", &[&x, &down], vec![]);
    }
    let h = rms_norm(&mut g, &x, &weights.norm, "model.norm.weight");
    match &weights.lm_head {
        Some(head) => {
            let wt = head.transposed();
            let weight = g.init_f32("lm_head.weight.T", &wt.shape, &wt.data);
            g.node_to("MatMul", &[&h, &weight], "logits", vec![]);
        }
        None => {
            // Tied embeddings: the output projection is the embedding table, transposed once.
            let wt = g.node("Transpose", &[&embed], vec![attr_ints("perm", &[1, 0])]);
            g.node_to("MatMul", &[&h, &wt], "logits", vec![]);
        }
    }

    let graph = GraphProto {
        name: "kaiwa_llama".into(),
        node: g.nodes,
        initializer: g.initializers,
        input: inputs,
        output: outputs,
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

/// Moves every initializer larger than a few values into `data_path` (ONNX external data).
fn move_initializers_to_file(model: &mut ModelProto, data_path: &Path) -> Result<(), ModelError> {
    let location = data_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            ModelError::Export(format!("bad external data path {}", data_path.display()))
        })?
        .to_string();
    let file = std::fs::File::create(data_path).map_err(|e| ModelError::io(data_path, e))?;
    let mut out = std::io::BufWriter::new(file);
    let mut offset = 0usize;
    let graph = model.graph.as_mut().expect("built above");
    for t in graph
        .initializer
        .iter_mut()
        .filter(|t| t.raw_data.len() > 64)
    {
        // Keep offsets aligned so readers may map the file.
        let pad = offset.next_multiple_of(64) - offset;
        out.write_all(&vec![0u8; pad])
            .map_err(|e| ModelError::io(data_path, e))?;
        offset += pad;
        out.write_all(&t.raw_data)
            .map_err(|e| ModelError::io(data_path, e))?;
        let length = t.raw_data.len();
        t.raw_data = Vec::new();
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        t.external_data = vec![
            entry("location", &location),
            entry("offset", &offset.to_string()),
            entry("length", &length.to_string()),
        ];
        offset += length;
    }
    out.flush().map_err(|e| ModelError::io(data_path, e))
}

fn entry(key: &str, value: &str) -> pb::StringStringEntryProto {
    pb::StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

/// Accumulates nodes and initializers with unique names.
#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
}

impl GraphBuilder {
    /// Adds a node with one fresh output and returns the output's name.
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.counter += 1;
        let out = format!("/{}_{}", op.to_lowercase(), self.counter);
        self.node_to(op, inputs, &out, attrs);
        out
    }

    fn node_to(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) {
        self.node_outputs(op, inputs, &[output], attrs)
    }

    fn node_outputs(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        });
    }

    fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.initializers.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&x| x as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.to_string()
    }

    fn const_f32_scalar(&mut self, name: &str, value: f32) -> String {
        self.init_f32(&format!("/const/{name}"), &[], &[value])
    }

    fn const_i64(&mut self, name: &str, values: &[i64], dims: &[usize]) -> String {
        let name = format!("/const/{name}");
        if !self.initializers.iter().any(|t| t.name == name) {
            self.initializers.push(TensorProto {
                name: name.clone(),
                dims: dims.iter().map(|&x| x as i64).collect(),
                data_type: DataType::Int64 as i32,
                raw_data: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ..Default::default()
            });
        }
        name
    }

    fn const_i64_scalar(&mut self, value: i64) -> String {
        self.const_i64(&format!("scalar{value}"), &[value], &[])
    }
}

fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

enum Dim {
    Param(String),
    Value(i64),
}

fn d(name: &str) -> Dim {
    Dim::Param(name.into())
}

fn n(value: usize) -> Dim {
    Dim::Value(value as i64)
}

fn value_info(name: &str, dtype: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|x| Dimension {
            value: Some(match x {
                Dim::Param(p) => dimension::Value::DimParam(p.clone()),
                Dim::Value(v) => dimension::Value::DimValue(*v),
            }),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The path `kaiwa export-onnx DIR` writes.
pub fn default_output(dir: &Path) -> PathBuf {
    dir.join(super::ONNX_FILE)
}
