//! The Llama decoder as a trainable burn module.
//!
//! The same architecture as [`crate::model::reference`] (RMSNorm, rotate-half RoPE, grouped-query causal
//! attention with Qwen2's q/k/v biases where the family has them, SwiGLU MLP, optionally tied
//! embeddings), written with differentiable tensor ops so
//! burn's autodiff can train it. The struct fields are named like the Hugging Face modules, so a
//! parameter's module path *is* its tensor name in `model.safetensors`
//! (`model.layers.0.self_attn.q_proj.weight`); [`super::convert`] relies on that.
//!
//! Linear weights are kept in the Hugging Face layout `[out_features, in_features]` and applied
//! as `x · Wᵀ` by the fused linear op, which reads the weight transposed without copying it.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::fused;
use crate::model::reference::rope_tables;
use crate::model::weights::{LayerWeights, Param as WeightParam, QkvBias};
use crate::model::{LlamaConfig, LlamaWeights};

/// A weight applied as `x · Wᵀ`, stored `[out_features, in_features]` like `torch.nn.Linear`,
/// plus a bias in the families that have one (Qwen2's q, k and v projections).
#[derive(Module, Debug)]
pub struct Projection {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Projection {
    fn new(weight: &WeightParam, device: &Device) -> Self {
        Self::with_bias(weight, None, device)
    }

    fn with_bias(weight: &WeightParam, bias: Option<&WeightParam>, device: &Device) -> Self {
        Projection {
            weight: param(weight, device),
            bias: bias.map(|b| param(b, device)),
        }
    }

    /// `[n, in] → [n, out]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = fused::linear(x, self.weight.val());
        match &self.bias {
            Some(b) => y.add(b.val().unsqueeze_dim(0)),
            None => y,
        }
    }
}

/// Root-mean-square normalisation with a learned gain: `x / sqrt(mean(x²) + eps) · g`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    eps: f64,
}

impl RmsNorm {
    fn new(gain: &WeightParam, eps: f64, device: &Device) -> Self {
        RmsNorm {
            weight: param(gain, device),
            eps,
        }
    }

    /// `[n, hidden] → [n, hidden]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        fused::rms_norm(x, self.weight.val(), self.eps as f32)
    }
}

#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    /// `[batch·time, hidden] → [batch·time, hidden]`, causal within each sequence.
    fn forward(&self, x: Tensor<2>, batch: usize, rope: &Rope) -> Tensor<2> {
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        let context = fused::causal_attention(
            q,
            k,
            v,
            rope.cos.clone(),
            rope.sin.clone(),
            batch,
            self.heads,
            self.kv_heads,
        );
        self.o_proj.forward(context)
    }
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
}

impl Mlp {
    /// SwiGLU: `down(silu(gate(x)) · up(x))`.
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward(fused::swiglu(gate, self.up_proj.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn forward(&self, x: Tensor<2>, batch: usize, rope: &Rope) -> Tensor<2> {
        let attended = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), batch, rope);
        let x = x.add(attended);
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x.add(mlp)
    }
}

/// Hugging Face's `LlamaModel`: embedding, decoder layers, final norm.
#[derive(Module, Debug)]
pub struct Decoder {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

/// Rotary position tables `[max_pos, head_dim]` in the rotate-half layout (frequencies repeated
/// over both halves), from [`rope_tables`].
#[derive(Module, Debug)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    fn new(config: &LlamaConfig, device: &Device) -> Self {
        let (dim, max_pos) = (config.head_dim(), config.context_len());
        let (cos, sin) = rope_tables(config);
        let table = |data| Tensor::from_data(TensorData::new(data, [max_pos, dim]), device);
        Rope {
            cos: table(cos),
            sin: table(sin),
        }
    }
}

/// Hugging Face's `LlamaForCausalLM`. Module paths equal the Hugging Face tensor names.
#[derive(Module, Debug)]
pub struct Llama {
    pub model: Decoder,
    /// `None` when the embeddings are tied: the output projection is `model.embed_tokens`.
    pub lm_head: Option<Projection>,
    rope: Rope,
}

impl Llama {
    /// The model holding `weights` (validated against `config` when they were built), with
    /// every parameter trainable. A fresh run starts from [`crate::train::init::random_weights`],
    /// the seeded initialisation `kaiwa init-model` uses; fine-tuning starts from a model
    /// directory's `model.safetensors`.
    pub fn from_weights(config: &LlamaConfig, weights: &LlamaWeights, device: &Device) -> Self {
        let eps = config.rms_norm_eps;
        let layers = weights
            .layers
            .iter()
            .map(|w| DecoderLayer {
                input_layernorm: RmsNorm::new(&w.input_layernorm, eps, device),
                self_attn: Attention {
                    q_proj: Projection::with_bias(&w.q_proj, bias(w, |b| &b.q), device),
                    k_proj: Projection::with_bias(&w.k_proj, bias(w, |b| &b.k), device),
                    v_proj: Projection::with_bias(&w.v_proj, bias(w, |b| &b.v), device),
                    o_proj: Projection::new(&w.o_proj, device),
                    heads: config.num_attention_heads,
                    kv_heads: config.kv_heads(),
                },
                post_attention_layernorm: RmsNorm::new(&w.post_attention_layernorm, eps, device),
                mlp: Mlp {
                    gate_proj: Projection::new(&w.gate_proj, device),
                    up_proj: Projection::new(&w.up_proj, device),
                    down_proj: Projection::new(&w.down_proj, device),
                },
            })
            .collect();
        Llama {
            model: Decoder {
                embed_tokens: Embedding {
                    weight: param(&weights.embed_tokens, device),
                },
                layers,
                norm: RmsNorm::new(&weights.norm, eps, device),
            },
            lm_head: weights.lm_head.as_ref().map(|w| Projection::new(w, device)),
            rope: Rope::new(config, device),
        }
    }

    /// Logits `[batch, time, vocab]` for token ids `[batch, time]` at positions `0..time`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [batch, time] = tokens.dims();
        let hidden = self.forward_hidden(tokens);
        let vocab = self.vocab();
        self.project(hidden).reshape([batch, time, vocab])
    }

    /// Logits flattened to `[batch·time, vocab]`, the shape the loss wants.
    pub fn forward_flat(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        self.project(self.forward_hidden(tokens))
    }

    /// The final-norm hidden states `[batch·time, hidden]`, before the output projection.
    pub fn forward_hidden(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [batch, time] = tokens.dims();
        let embed = self.model.embed_tokens.weight.val();
        let hidden = embed.dims()[1];
        let ids = tokens.reshape([batch * time]);
        let mut x = embed.select(0, ids);
        for layer in &self.model.layers {
            x = layer.forward(x, batch, &self.rope);
        }
        debug_assert_eq!(x.dims(), [batch * time, hidden]);
        self.model.norm.forward(x)
    }

    /// Hidden states `[n, hidden]` to logits `[n, vocab]`.
    pub fn project(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => fused::linear(x, self.model.embed_tokens.weight.val()),
        }
    }

    pub fn vocab(&self) -> usize {
        self.model.embed_tokens.weight.dims()[0]
    }
}

/// One of a layer's q/k/v biases, in the families that have them.
fn bias(layer: &LayerWeights, which: impl Fn(&QkvBias) -> &WeightParam) -> Option<&WeightParam> {
    layer.qkv_bias.as_ref().map(which)
}

/// A trainable parameter holding a copy of `weight`. Its id is provisional:
/// [`super::convert::number_params`] renumbers every parameter in module order.
fn param<const D: usize>(weight: &WeightParam, device: &Device) -> Param<Tensor<D>> {
    let data = TensorData::new(weight.data.clone(), weight.shape.clone());
    Param::from_tensor(Tensor::from_data(data, device))
}
