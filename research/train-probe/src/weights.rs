//! `model.safetensors` ⇄ the burn model, under the Hugging Face tensor names.
//!
//! The model's module paths are the Hugging Face names (see `model.rs`), so saving is a walk over
//! the parameters and loading is a walk that swaps each parameter's value for the tensor of the
//! same name. Tensors are written in f32, `[out_features, in_features]` for linear weights, which
//! is what kaiwa's `LlamaWeights::load` and `transformers` read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{bf16, f16, Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};

use crate::model::{Config, Llama};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// A named f32 tensor read from or written to `model.safetensors`.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Every parameter of `model` with its Hugging Face name, in module order.
pub fn named_tensors(model: &Llama) -> Vec<NamedTensor> {
    let mut collector = Collector::default();
    model.visit(&mut collector);
    collector.tensors
}

/// Writes `model.safetensors` (f32, metadata `format: pt` as `transformers` writes it).
pub fn save(model: &Llama, path: &Path) -> Result<(), WeightsError> {
    let tensors = named_tensors(model);
    let raw: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let format = |reason: String| WeightsError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let views = tensors
        .iter()
        .zip(&raw)
        .map(|(t, bytes)| {
            TensorView::new(Dtype::F32, t.shape.clone(), bytes).map(|v| (t.name.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format(e.to_string()))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| format(e.to_string()))
}

/// Reads `model.safetensors` (f32, f16 or bf16) into a model of `config` on `device`. Every
/// parameter must be present with the shape `config` implies; extra tensors (such as an
/// `lm_head.weight` written beside tied embeddings) are ignored.
pub fn load(config: &Config, path: &Path, device: &Device) -> Result<Llama, WeightsError> {
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let format = |reason: String| WeightsError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
    let mut named = HashMap::new();
    for (name, view) in file.iter() {
        let data = to_f32(&view).map_err(|reason| format(format!("tensor {name}: {reason}")))?;
        named.insert(name.to_string(), (view.shape().to_vec(), data));
    }

    // Check every name and shape before building anything, so the error names the tensor.
    let skeleton = Llama::init(config, device);
    for expected in named_shapes(&skeleton) {
        match named.get(&expected.0) {
            None => return Err(format(format!("tensor {} is missing", expected.0))),
            Some((shape, _)) if *shape != expected.1 => {
                return Err(format(format!(
                    "tensor {} has shape {shape:?}, the config implies {:?}",
                    expected.0, expected.1
                )))
            }
            Some(_) => {}
        }
    }
    let mut loader = Loader {
        path: Vec::new(),
        named,
        device: device.clone(),
    };
    Ok(skeleton.map(&mut loader))
}

/// The Hugging Face name and shape of every parameter of `model`.
pub fn named_shapes(model: &Llama) -> Vec<(String, Vec<usize>)> {
    let mut shapes = ShapeCollector::default();
    model.visit(&mut shapes);
    shapes.shapes
}

/// The `config.json` `transformers`' `LlamaForCausalLM` (and kaiwa's `LlamaConfig`) reads.
pub fn hf_config_json(config: &Config) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab,
        "hidden_size": config.hidden,
        "intermediate_size": config.intermediate,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "max_position_embeddings": config.max_pos,
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
    })
}

#[derive(Default)]
struct Collector {
    path: Vec<String>,
    tensors: Vec<NamedTensor>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data();
        let shape = data.shape().to_vec();
        let data = data
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("converted to f32");
        self.tensors.push(NamedTensor {
            name: self.path.join("."),
            shape,
            data,
        });
    }
}

#[derive(Default)]
struct ShapeCollector {
    path: Vec<String>,
    shapes: Vec<(String, Vec<usize>)>,
}

impl ModuleVisitor for ShapeCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.shapes
            .push((self.path.join("."), param.lazy_shape().to_vec()));
    }
}

struct Loader {
    path: Vec<String>,
    named: HashMap<String, (Vec<usize>, Vec<f32>)>,
    device: Device,
}

impl ModuleMapper for Loader {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let (shape, data) = self.named.remove(&name).expect("checked before mapping");
        let tensor = Tensor::from_data(TensorData::new(data, shape), &self.device);
        param.map(|_| tensor).set_require_grad(true)
    }
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let raw = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(format!("dtype {other:?} is not supported (f32, f16, bf16)")),
    })
}
