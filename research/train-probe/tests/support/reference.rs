//! A plain-Rust Llama forward pass (kaiwa's `model::reference`, condensed) over the tensors of a
//! saved model: the independent check of the burn model's logits.

use std::collections::HashMap;

use train_probe::model::Config;
use train_probe::weights::NamedTensor;

pub struct Reference {
    config: Config,
    tensors: HashMap<String, NamedTensor>,
}

impl Reference {
    pub fn new(config: &Config, tensors: Vec<NamedTensor>) -> Self {
        Reference {
            config: config.clone(),
            tensors: tensors.into_iter().map(|t| (t.name.clone(), t)).collect(),
        }
    }

    fn w(&self, name: &str) -> &NamedTensor {
        &self.tensors[name]
    }

    /// Logits `[tokens.len()][vocab]` at positions `0..tokens.len()`.
    pub fn forward(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (hidden, heads, kv_heads, dim) = (c.hidden, c.heads, c.kv_heads, c.head_dim());
        let groups = heads / kv_heads;
        let eps = c.rms_eps;
        let embed = self.w("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| embed.data[t as usize * hidden..(t as usize + 1) * hidden].to_vec())
            .collect();
        for l in 0..c.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let normed: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| rms_norm(x, self.w(&p("input_layernorm.weight")), eps))
                .collect();
            let proj = |name: &str, h: &[f32]| linear(self.w(&p(name)), h);
            let qs: Vec<Vec<f32>> = normed
                .iter()
                .enumerate()
                .map(|(pos, h)| self.rope(&proj("self_attn.q_proj.weight", h), pos, heads))
                .collect();
            let ks: Vec<Vec<f32>> = normed
                .iter()
                .enumerate()
                .map(|(pos, h)| self.rope(&proj("self_attn.k_proj.weight", h), pos, kv_heads))
                .collect();
            let vs: Vec<Vec<f32>> = normed
                .iter()
                .map(|h| proj("self_attn.v_proj.weight", h))
                .collect();
            for (t, x) in xs.iter_mut().enumerate() {
                let mut context = vec![0.0f32; heads * dim];
                for head in 0..heads {
                    let kv = head / groups;
                    let q = &qs[t][head * dim..(head + 1) * dim];
                    let scores: Vec<f64> = (0..=t)
                        .map(|s| dot(q, &ks[s][kv * dim..(kv + 1) * dim]) / (dim as f64).sqrt())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    for (s, e) in exps.iter().enumerate() {
                        let v = &vs[s][kv * dim..(kv + 1) * dim];
                        for j in 0..dim {
                            context[head * dim + j] += (e / sum * v[j] as f64) as f32;
                        }
                    }
                }
                let out = proj("self_attn.o_proj.weight", &context);
                x.iter_mut().zip(out).for_each(|(a, b)| *a += b);
            }
            for x in xs.iter_mut() {
                let h = rms_norm(x, self.w(&p("post_attention_layernorm.weight")), eps);
                let gate = proj("mlp.gate_proj.weight", &h);
                let up = proj("mlp.up_proj.weight", &h);
                let act: Vec<f32> = gate
                    .iter()
                    .zip(&up)
                    .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let down = proj("mlp.down_proj.weight", &act);
                x.iter_mut().zip(down).for_each(|(a, b)| *a += b);
            }
        }
        let head = if c.tie_embeddings {
            embed
        } else {
            self.w("lm_head.weight")
        };
        xs.iter()
            .map(|x| linear(head, &rms_norm(x, self.w("model.norm.weight"), eps)))
            .collect()
    }

    fn rope(&self, x: &[f32], pos: usize, heads: usize) -> Vec<f32> {
        let dim = self.config.head_dim();
        let half = dim / 2;
        let mut out = vec![0.0; x.len()];
        for h in 0..heads {
            let v = &x[h * dim..(h + 1) * dim];
            for j in 0..dim {
                let i = j % half;
                let inv_freq = 1.0 / self.config.rope_theta.powf((2 * i) as f64 / dim as f64);
                let angle = pos as f64 * inv_freq;
                let (cos, sin) = (angle.cos() as f32, angle.sin() as f32);
                let rotated = if j < half { -v[j + half] } else { v[j - half] };
                out[h * dim + j] = v[j] * cos + rotated * sin;
            }
        }
        out
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn linear(w: &NamedTensor, x: &[f32]) -> Vec<f32> {
    w.data
        .chunks_exact(w.shape[1])
        .map(|row| dot(row, x) as f32)
        .collect()
}

fn rms_norm(x: &[f32], w: &NamedTensor, eps: f64) -> Vec<f32> {
    let mean = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (mean + eps).sqrt();
    x.iter()
        .zip(&w.data)
        .map(|(&v, &g)| (v as f64 * scale) as f32 * g)
        .collect()
}
