//! A plain-Rust forward pass of the Llama decoder, written to read like the paper.
//!
//! It is the independent check of everything else: the ONNX export run through tract (or ONNX
//! Runtime) must give the same logits as this code on the same weights. It is slow (no cache,
//! no SIMD) and meant for tests and small models only.

use super::config::LlamaConfig;
use super::weights::{LlamaWeights, Param};

/// Rotary position tables `cos` and `sin`, each `[context_len, head_dim]` (the positions
/// [`LlamaConfig::context_len`] allows), in the rotate-half layout Hugging Face Llama uses (the
/// frequencies repeated over both halves).
pub fn rope_tables(config: &LlamaConfig) -> (Vec<f32>, Vec<f32>) {
    let dim = config.head_dim();
    let half = dim / 2;
    let positions = config.context_len();
    let base = config.rope_base();
    let mut cos = vec![0.0; positions * dim];
    let mut sin = vec![0.0; positions * dim];
    for pos in 0..positions {
        for i in 0..half {
            let inv_freq = 1.0 / base.powf((2 * i) as f64 / dim as f64);
            let angle = pos as f64 * inv_freq;
            for j in [i, i + half] {
                cos[pos * dim + j] = angle.cos() as f32;
                sin[pos * dim + j] = angle.sin() as f32;
            }
        }
    }
    (cos, sin)
}

/// The decoder evaluated directly from its weights.
pub struct ReferenceModel<'a> {
    config: &'a LlamaConfig,
    weights: &'a LlamaWeights,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl<'a> ReferenceModel<'a> {
    pub fn new(config: &'a LlamaConfig, weights: &'a LlamaWeights) -> Self {
        let (cos, sin) = rope_tables(config);
        ReferenceModel {
            config,
            weights,
            cos,
            sin,
        }
    }

    /// Logits `[tokens.len()][vocab]` for a sequence at positions `0..tokens.len()`.
    pub fn forward(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let c = self.config;
        let (hidden, heads, kv_heads, dim) = (
            c.hidden_size,
            c.num_attention_heads,
            c.kv_heads(),
            c.head_dim(),
        );
        let groups = heads / kv_heads;
        let eps = c.rms_norm_eps as f32;
        let embed = &self.weights.embed_tokens;
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| embed.data[t as usize * hidden..(t as usize + 1) * hidden].to_vec())
            .collect();

        for layer in &self.weights.layers {
            let normed: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| rms_norm(x, &layer.input_layernorm, eps))
                .collect();
            let bias = layer.qkv_bias.as_ref();
            let qs: Vec<Vec<f32>> = normed
                .iter()
                .enumerate()
                .map(|(pos, h)| {
                    let q = affine(&layer.q_proj, bias.map(|b| &b.q), h);
                    self.rope(&q, pos, heads)
                })
                .collect();
            let ks: Vec<Vec<f32>> = normed
                .iter()
                .enumerate()
                .map(|(pos, h)| {
                    let k = affine(&layer.k_proj, bias.map(|b| &b.k), h);
                    self.rope(&k, pos, kv_heads)
                })
                .collect();
            let vs: Vec<Vec<f32>> = normed
                .iter()
                .map(|h| affine(&layer.v_proj, bias.map(|b| &b.v), h))
                .collect();

            for (t, x) in xs.iter_mut().enumerate() {
                let mut context = vec![0.0f32; heads * dim];
                for head in 0..heads {
                    let kv = head / groups;
                    let q = &qs[t][head * dim..(head + 1) * dim];
                    let scores: Vec<f64> = (0..=t)
                        .map(|s| dot(q, &ks[s][kv * dim..(kv + 1) * dim]) / (dim as f64).sqrt())
                        .collect();
                    let weights = softmax(&scores);
                    for (s, w) in weights.iter().enumerate() {
                        let v = &vs[s][kv * dim..(kv + 1) * dim];
                        for j in 0..dim {
                            context[head * dim + j] += (*w * v[j] as f64) as f32;
                        }
                    }
                }
                let out = linear(&layer.o_proj, &context);
                x.iter_mut().zip(out).for_each(|(a, b)| *a += b);
            }

            for x in xs.iter_mut() {
                let h = rms_norm(x, &layer.post_attention_layernorm, eps);
                let gate = linear(&layer.gate_proj, &h);
                let up = linear(&layer.up_proj, &h);
                let act: Vec<f32> = gate
                    .iter()
                    .zip(&up)
                    .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let down = linear(&layer.down_proj, &act);
                x.iter_mut().zip(down).for_each(|(a, b)| *a += b);
            }
        }

        let head = self.weights.output_projection();
        xs.iter()
            .map(|x| linear(head, &rms_norm(x, &self.weights.norm, eps)))
            .collect()
    }

    /// Applies rotate-half rotary embedding to every head of one position.
    fn rope(&self, x: &[f32], pos: usize, heads: usize) -> Vec<f32> {
        let dim = self.config.head_dim();
        let half = dim / 2;
        let cos = &self.cos[pos * dim..(pos + 1) * dim];
        let sin = &self.sin[pos * dim..(pos + 1) * dim];
        let mut out = vec![0.0; x.len()];
        for h in 0..heads {
            let v = &x[h * dim..(h + 1) * dim];
            for j in 0..dim {
                let rotated = if j < half { -v[j + half] } else { v[j - half] };
                out[h * dim + j] = v[j] * cos[j] + rotated * sin[j];
            }
        }
        out
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// `W x` for a Hugging Face linear weight `W` of shape `[out, in]`.
fn linear(w: &Param, x: &[f32]) -> Vec<f32> {
    let cols = w.shape[1];
    w.data
        .chunks_exact(cols)
        .map(|row| dot(row, x) as f32)
        .collect()
}

/// `W x + b`, with the bias `b` when there is one.
fn affine(w: &Param, b: Option<&Param>, x: &[f32]) -> Vec<f32> {
    let mut y = linear(w, x);
    if let Some(b) = b {
        y.iter_mut().zip(&b.data).for_each(|(y, b)| *y += b);
    }
    y
}

fn rms_norm(x: &[f32], w: &Param, eps: f32) -> Vec<f32> {
    let mean = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (mean + eps as f64).sqrt();
    x.iter()
        .zip(&w.data)
        .map(|(&v, &g)| (v as f64 * scale) as f32 * g)
        .collect()
}

fn softmax(xs: &[f64]) -> Vec<f64> {
    let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = xs.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}
