//! `model.safetensors`: the weights of a Llama decoder under the Hugging Face tensor names.
//!
//! Linear weights are stored as Hugging Face stores them, `[out_features, in_features]`. Every
//! consumer (the ONNX export, the reference forward pass, the trainer) reads them through
//! [`LlamaWeights`], which checks each tensor's presence and shape against `config.json` once.
//! A model directory's weights are read by [`LlamaWeights::load_dir`]: one file, or the shards
//! `model.safetensors.index.json` names, in f32, f16 or bf16 (converted exactly to f32).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde::Deserialize;

use super::config::LlamaConfig;
use super::{read_json, ModelError, WEIGHTS_FILE, WEIGHTS_INDEX_FILE};

/// A dense f32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Param {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Param { shape, data }
    }

    /// The transpose of a 2-D tensor: `[rows, cols]` becomes `[cols, rows]`.
    pub fn transposed(&self) -> Param {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut data = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        Param::new(vec![cols, rows], data)
    }
}

/// The weights of one decoder block.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    pub input_layernorm: Param,
    pub q_proj: Param,
    pub k_proj: Param,
    pub v_proj: Param,
    pub o_proj: Param,
    pub post_attention_layernorm: Param,
    pub gate_proj: Param,
    pub up_proj: Param,
    pub down_proj: Param,
    /// The biases of the q, k and v projections, in the families that have them (Qwen2).
    pub qkv_bias: Option<QkvBias>,
}

/// The biases of a layer's query, key and value projections.
#[derive(Debug, Clone, PartialEq)]
pub struct QkvBias {
    pub q: Param,
    pub k: Param,
    pub v: Param,
}

/// All weights of a `LlamaForCausalLM`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaWeights {
    pub embed_tokens: Param,
    pub layers: Vec<LayerWeights>,
    pub norm: Param,
    /// `None` when `tie_word_embeddings` is set: the output projection is `embed_tokens`.
    pub lm_head: Option<Param>,
}

/// The Hugging Face name and expected shape of every tensor of a config, in a stable order.
pub fn tensor_specs(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q = config.num_attention_heads * config.head_dim();
    let kv = config.kv_heads() * config.head_dim();
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        specs.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
        if config.qkv_bias() {
            specs.extend([
                (format!("{p}.self_attn.q_proj.bias"), vec![q]),
                (format!("{p}.self_attn.k_proj.bias"), vec![kv]),
                (format!("{p}.self_attn.v_proj.bias"), vec![kv]),
            ]);
        }
    }
    specs.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    specs
}

impl LlamaWeights {
    /// Builds the weights from named tensors, checking names and shapes against the config.
    pub fn from_named(
        config: &LlamaConfig,
        mut named: HashMap<String, Param>,
        source: &Path,
    ) -> Result<Self, ModelError> {
        for (name, shape) in tensor_specs(config) {
            match named.get(&name) {
                None => {
                    return Err(ModelError::Weights {
                        path: source.to_path_buf(),
                        reason: format!("tensor {name} is missing"),
                    })
                }
                Some(p) if p.shape != shape => {
                    return Err(ModelError::Weights {
                        path: source.to_path_buf(),
                        reason: format!(
                            "tensor {name} has shape {:?}, config.json implies {shape:?}",
                            p.shape
                        ),
                    })
                }
                Some(_) => {}
            }
        }
        let mut take = |name: String| named.remove(&name).expect("checked above");
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                LayerWeights {
                    input_layernorm: take(format!("{p}.input_layernorm.weight")),
                    q_proj: take(format!("{p}.self_attn.q_proj.weight")),
                    k_proj: take(format!("{p}.self_attn.k_proj.weight")),
                    v_proj: take(format!("{p}.self_attn.v_proj.weight")),
                    o_proj: take(format!("{p}.self_attn.o_proj.weight")),
                    post_attention_layernorm: take(format!("{p}.post_attention_layernorm.weight")),
                    gate_proj: take(format!("{p}.mlp.gate_proj.weight")),
                    up_proj: take(format!("{p}.mlp.up_proj.weight")),
                    down_proj: take(format!("{p}.mlp.down_proj.weight")),
                    qkv_bias: if config.qkv_bias() {
                        Some(QkvBias {
                            q: take(format!("{p}.self_attn.q_proj.bias")),
                            k: take(format!("{p}.self_attn.k_proj.bias")),
                            v: take(format!("{p}.self_attn.v_proj.bias")),
                        })
                    } else {
                        None
                    },
                }
            })
            .collect();
        Ok(LlamaWeights {
            embed_tokens: take("model.embed_tokens.weight".into()),
            layers,
            norm: take("model.norm.weight".into()),
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(take("lm_head.weight".into()))
            },
        })
    }

    /// Every tensor with its Hugging Face name, in the order of [`tensor_specs`].
    pub fn named(&self) -> Vec<(String, &Param)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (l, w) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.extend([
                (format!("{p}.input_layernorm.weight"), &w.input_layernorm),
                (format!("{p}.self_attn.q_proj.weight"), &w.q_proj),
                (format!("{p}.self_attn.k_proj.weight"), &w.k_proj),
                (format!("{p}.self_attn.v_proj.weight"), &w.v_proj),
                (format!("{p}.self_attn.o_proj.weight"), &w.o_proj),
                (
                    format!("{p}.post_attention_layernorm.weight"),
                    &w.post_attention_layernorm,
                ),
                (format!("{p}.mlp.gate_proj.weight"), &w.gate_proj),
                (format!("{p}.mlp.up_proj.weight"), &w.up_proj),
                (format!("{p}.mlp.down_proj.weight"), &w.down_proj),
            ]);
            if let Some(b) = &w.qkv_bias {
                out.extend([
                    (format!("{p}.self_attn.q_proj.bias"), &b.q),
                    (format!("{p}.self_attn.k_proj.bias"), &b.k),
                    (format!("{p}.self_attn.v_proj.bias"), &b.v),
                ]);
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head));
        }
        out
    }

    /// The output projection `[vocab, hidden]`: `lm_head`, or the embedding when tied.
    pub fn output_projection(&self) -> &Param {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Reads the weights of a model directory: `model.safetensors`, or, as `save_pretrained`
    /// writes a model larger than its shard size, the shards `model.safetensors.index.json`
    /// names. The one reader of a directory's weights (`export-onnx`, the export on first
    /// load, fine-tuning).
    pub fn load_dir(config: &LlamaConfig, dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join(WEIGHTS_FILE);
        if single.is_file() {
            return Self::load(config, &single);
        }
        let index_path = dir.join(WEIGHTS_INDEX_FILE);
        if !index_path.is_file() {
            return Err(ModelError::NotAModelDir {
                path: dir.to_path_buf(),
                reason: format!("no weights: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}"),
            });
        }
        let index: ShardIndex = read_json(&index_path)?;
        let shards: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
        let mut named = HashMap::new();
        for shard in shards {
            // A shard is a file beside the index, never a path elsewhere.
            if shard.is_empty() || Path::new(shard).file_name() != Some(shard.as_ref()) {
                return Err(ModelError::Weights {
                    path: index_path.clone(),
                    reason: format!("shard {shard:?} is not a file name in {}", dir.display()),
                });
            }
            let path = dir.join(shard);
            let mut tensors = read_safetensors(&path)?;
            for (name, _) in index.weight_map.iter().filter(|(_, s)| *s == shard) {
                let tensor = tensors.remove(name).ok_or_else(|| ModelError::Weights {
                    path: path.clone(),
                    reason: format!(
                        "tensor {name}, which {WEIGHTS_INDEX_FILE} puts here, is missing"
                    ),
                })?;
                named.insert(name.clone(), tensor);
            }
        }
        let left_out = check_nothing_left_out(config, &named, &index_path);
        // A missing or misshapen tensor is the clearer error; stray ones come after.
        let weights = Self::from_named(config, named, &index_path)?;
        left_out.map(|()| weights)
    }

    /// Reads one safetensors file (f32, f16 or bf16 tensors; converted exactly to f32).
    pub fn load(config: &LlamaConfig, path: &Path) -> Result<Self, ModelError> {
        let named = read_safetensors(path)?;
        let left_out = check_nothing_left_out(config, &named, path);
        let weights = Self::from_named(config, named, path)?;
        left_out.map(|()| weights)
    }

    /// Writes `model.safetensors` in f32.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .named()
            .into_iter()
            .map(|(name, p)| {
                let raw = p.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                (name, raw, p.shape.clone())
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, raw, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), raw).map(|v| (name.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ModelError::Weights {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| ModelError::Weights {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    pub fn parameter_count(&self) -> usize {
        self.named().iter().map(|(_, p)| p.data.len()).sum()
    }
}

/// `model.safetensors.index.json`: which shard holds each tensor.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// Every tensor of a safetensors file, converted to f32.
fn read_safetensors(path: &Path) -> Result<HashMap<String, Param>, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let tensors =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Weights {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut named = HashMap::new();
    for (name, view) in tensors.iter() {
        let data = to_f32(&view).map_err(|reason| ModelError::Weights {
            path: path.to_path_buf(),
            reason: format!("tensor {name}: {reason}"),
        })?;
        named.insert(name.to_string(), Param::new(view.shape().to_vec(), data));
    }
    Ok(named)
}

/// Refuses a file with tensors the config does not account for: kaiwa would leave them out
/// of the computation (a bias config.json does not announce, say) and run silently wrong.
/// What `transformers` itself ignores is let through: rotary `inv_freq` buffers some
/// checkpoints carry, and a copy of the embeddings as `lm_head.weight` when they are tied.
fn check_nothing_left_out(
    config: &LlamaConfig,
    named: &HashMap<String, Param>,
    path: &Path,
) -> Result<(), ModelError> {
    let expected: BTreeSet<String> = tensor_specs(config).into_iter().map(|(n, _)| n).collect();
    let mut stray: Vec<&String> = named
        .keys()
        .filter(|n| !expected.contains(*n))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(config.tie_word_embeddings && *n == "lm_head.weight"))
        .collect();
    stray.sort();
    match stray.first() {
        None => Ok(()),
        Some(first) => Err(ModelError::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "{} tensor(s) that a {} with this config.json does not have, first {first}: \
                 kaiwa would leave them out of the computation",
                stray.len(),
                config
                    .architectures
                    .first()
                    .map_or(config.model_type.as_str(), String::as_str),
            ),
        }),
    }
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let raw = view.data();
    let out = match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(format!("dtype {other:?} is not supported (f32, f16, bf16)")),
    };
    Ok(out)
}
