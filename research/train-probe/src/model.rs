//! The Llama decoder as a trainable burn module.
//!
//! The same architecture as `model::reference` (RMSNorm, rotate-half RoPE, grouped-query causal
//! attention, SwiGLU MLP, optionally tied embeddings), written with differentiable tensor ops so
//! burn's autodiff can train it. The struct fields are named like the Hugging Face modules, so a
//! parameter's module path *is* its tensor name in `model.safetensors`
//! (`model.layers.0.self_attn.q_proj.weight`); `weights.rs` relies on that.
//!
//! Linear weights are kept in the Hugging Face layout `[out_features, in_features]` and applied
//! as `x · Wᵀ`; the Flex backend multiplies the transposed view without copying it.

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

/// The architecture of a Llama-family decoder: the fields of `config.json` the forward pass uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub max_pos: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
}

impl Config {
    /// kaiwa's `small` preset: 256 wide, 4 layers, 4 heads, vocab 8192 (about 7 M parameters).
    pub fn small() -> Self {
        Config {
            vocab: 8192,
            hidden: 256,
            intermediate: 688,
            layers: 4,
            heads: 4,
            kv_heads: 4,
            max_pos: 512,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_embeddings: false,
        }
    }

    /// kaiwa's `tiny` preset: grouped-query attention and tied embeddings, for tests.
    pub fn tiny() -> Self {
        Config {
            vocab: 512,
            hidden: 64,
            intermediate: 176,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            max_pos: 256,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_embeddings: true,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The number of trainable parameters (a tied head counts once).
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let kv = self.kv_heads * self.head_dim();
        let per_layer = 2 * h + 2 * h * h + 2 * kv * h + 3 * h * i;
        let head = if self.tie_embeddings { 0 } else { v * h };
        v * h + self.layers * per_layer + h + head
    }

    /// Training FLOPs for one token of a `context`-long sequence: 6 per weight multiply (forward
    /// and backward; the embedding lookup is not a multiply) plus causal attention, where the
    /// two `T×T` products cost `6 · 2 · layers · hidden · T/2` averaged over the positions.
    pub fn train_flops_per_token(&self, context: usize) -> f64 {
        let matmul_params = self.parameter_count()
            - if self.tie_embeddings {
                0
            } else {
                self.vocab * self.hidden
            };
        let attention = 6.0 * self.layers as f64 * self.hidden as f64 * context as f64;
        6.0 * matmul_params as f64 + attention
    }
}

/// A weight applied as `x · Wᵀ`, stored `[out_features, in_features]` like `torch.nn.Linear`.
#[derive(Module, Debug)]
pub struct Projection {
    pub weight: Param<Tensor<2>>,
}

impl Projection {
    fn init(out_features: usize, in_features: usize, device: &Device) -> Self {
        Projection {
            weight: normal_param([out_features, in_features], device),
        }
    }

    /// `[n, in] → [n, out]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.weight.val().transpose())
    }
}

/// Root-mean-square normalisation with a learned gain: `x / sqrt(mean(x²) + eps) · g`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    eps: f64,
}

impl RmsNorm {
    fn init(hidden: usize, eps: f64, device: &Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([hidden], device)),
            eps,
        }
    }

    /// `[n, hidden] → [n, hidden]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let inv_rms = x
            .clone()
            .square()
            .mean_dim(1)
            .add_scalar(self.eps)
            .sqrt()
            .recip();
        x.mul(inv_rms).mul(self.weight.val().unsqueeze_dim(0))
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
        let [rows, hidden] = x.dims();
        let time = rows / batch;
        let dim = self.q_proj.weight.dims()[0] / self.heads;
        // [b·t, heads·dim] → [b, heads, t, dim]
        let split =
            |y: Tensor<2>, heads: usize| y.reshape([batch, time, heads, dim]).swap_dims(1, 2);
        let q = rope.apply(split(self.q_proj.forward(x.clone()), self.heads));
        let k = rope.apply(split(self.k_proj.forward(x.clone()), self.kv_heads));
        let v = split(self.v_proj.forward(x), self.kv_heads);
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let context = attention(q, k, v, None, None, options);
        self.o_proj
            .forward(context.swap_dims(1, 2).reshape([rows, hidden]))
    }

    /// Shares each key/value head with `heads / kv_heads` query heads (grouped-query attention).
    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let groups = self.heads / self.kv_heads;
        if groups == 1 {
            return x;
        }
        let [b, kv, t, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, groups, t, d])
            .reshape([b, kv * groups, t, d])
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
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate.mul(self.up_proj.forward(x)))
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
/// over both halves), as `model::reference::rope_tables` computes them.
#[derive(Module, Debug)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    fn new(config: &Config, device: &Device) -> Self {
        let dim = config.head_dim();
        let half = dim / 2;
        let mut cos = vec![0.0f32; config.max_pos * dim];
        let mut sin = vec![0.0f32; config.max_pos * dim];
        for pos in 0..config.max_pos {
            for i in 0..half {
                let inv_freq = 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64);
                let angle = pos as f64 * inv_freq;
                for j in [i, i + half] {
                    cos[pos * dim + j] = angle.cos() as f32;
                    sin[pos * dim + j] = angle.sin() as f32;
                }
            }
        }
        let table = |data| Tensor::from_data(TensorData::new(data, [config.max_pos, dim]), device);
        Rope {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// Rotates `[batch, heads, time, dim]` by the positions `0..time`.
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, time, dim] = x.dims();
        let half = dim / 2;
        let cos = self.cos.clone().narrow(0, 0, time).unsqueeze::<4>();
        let sin = self.sin.clone().narrow(0, 0, time).unsqueeze::<4>();
        let first = x.clone().narrow(3, 0, half);
        let second = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x.mul(cos).add(rotated.mul(sin))
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
    /// A freshly initialised model: every matrix drawn from N(0, 0.02²) (Hugging Face's
    /// `initializer_range`), norm gains one. Seed the device first (`device.seed(..)`) for a
    /// reproducible draw.
    pub fn init(config: &Config, device: &Device) -> Self {
        assert!(
            config.heads.is_multiple_of(config.kv_heads)
                && config.hidden.is_multiple_of(config.heads),
            "heads must divide hidden and be a multiple of kv_heads"
        );
        let (h, i) = (config.hidden, config.intermediate);
        let dim = config.head_dim();
        let layers = (0..config.layers)
            .map(|_| DecoderLayer {
                input_layernorm: RmsNorm::init(h, config.rms_eps, device),
                self_attn: Attention {
                    q_proj: Projection::init(config.heads * dim, h, device),
                    k_proj: Projection::init(config.kv_heads * dim, h, device),
                    v_proj: Projection::init(config.kv_heads * dim, h, device),
                    o_proj: Projection::init(h, config.heads * dim, device),
                    heads: config.heads,
                    kv_heads: config.kv_heads,
                },
                post_attention_layernorm: RmsNorm::init(h, config.rms_eps, device),
                mlp: Mlp {
                    gate_proj: Projection::init(i, h, device),
                    up_proj: Projection::init(i, h, device),
                    down_proj: Projection::init(h, i, device),
                },
            })
            .collect();
        Llama {
            model: Decoder {
                embed_tokens: Embedding {
                    weight: normal_param([config.vocab, h], device),
                },
                layers,
                norm: RmsNorm::init(h, config.rms_eps, device),
            },
            lm_head: (!config.tie_embeddings).then(|| Projection::init(config.vocab, h, device)),
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
            None => x.matmul(self.model.embed_tokens.weight.val().transpose()),
        }
    }

    pub fn vocab(&self) -> usize {
        self.model.embed_tokens.weight.dims()[0]
    }
}

fn normal_param(shape: [usize; 2], device: &Device) -> Param<Tensor<2>> {
    Param::from_tensor(Tensor::random(
        shape,
        Distribution::Normal(0.0, 0.02),
        device,
    ))
}
