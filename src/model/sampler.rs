//! Choosing the next token from the logits: greedy, or sampled with temperature, top-k, top-p
//! and a repetition penalty, from a seeded generator so that a seed reproduces a reply.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_linalg::reduce::MapReduce;
use tract_linalg::Func;

use super::ModelError;

/// How the next token is picked. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1.0 keeps all.
    pub top_p: f32,
    /// Hugging Face's (CTRL) penalty on tokens already in the sequence; 1.0 is none.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.1,
        }
    }
}

impl SamplingParams {
    /// Checks that every setting is in its range.
    pub fn validate(&self) -> Result<(), ModelError> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(ModelError::Invalid(format!(
                "temperature must be 0 or more, got {t}"
            )));
        }
        let p = self.top_p;
        if !p.is_finite() || p <= 0.0 || p > 1.0 {
            return Err(ModelError::Invalid(format!(
                "top_p must be in (0, 1], got {p}"
            )));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(ModelError::Invalid(format!(
                "repetition_penalty must be positive, got {r}"
            )));
        }
        Ok(())
    }

    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }
}

/// A seeded sampler. Equal seeds, parameters and logits give equal tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` is modified in place; `previous` are the tokens so far
    /// (prompt and reply), for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], previous: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in previous {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[t as usize];
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, most likely first, then cut by top-k.
        let mut order: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        if order.is_empty() {
            return argmax(logits);
        }
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&i| ((logits[i] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                cumulative += x;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (&i, &x) in order.iter().zip(&probs) {
            if r < x {
                return i as u32;
            }
            r -= x;
        }
        order[order.len() - 1] as u32
    }
}

/// `log Σ exp(logits)`, accumulated in f64 with the maximum taken out first: exact to f64's
/// rounding, for the held-out figures and guidance. [`fast_log_sum_exp`] is for ranking.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scalar_log_sum_exp(logits, f64::from(max))
}

/// `log Σ exp(logits)` by tract's vector softmax kernel (exp and sum in one pass, chosen at run
/// time for the CPU: AVX-512, AVX2 or portable), within about 1e-5 of [`log_sum_exp`] (the
/// kernel's `exp` is a polynomial, summed in f32). Scoring a reply takes one per token over the
/// whole vocabulary, and libm's scalar `exp` there was a quarter of the bot's time under load;
/// the ranker compares such scores with each other, where 1e-5 decides nothing. Where tract has
/// no kernel, or the logits hold no finite maximum, it is [`log_sum_exp`].
pub fn fast_log_sum_exp(logits: &[f32]) -> f64 {
    static EXP_SUM: std::sync::OnceLock<Option<Box<dyn MapReduce<f32, f32>>>> =
        std::sync::OnceLock::new();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max.is_finite() {
        if let Some(kernel) = EXP_SUM.get_or_init(|| Func::Softmax2.map_reduce_f32().ok()) {
            // On a buffer aligned for every kernel, so the kernel sums in the same order
            // whatever the logits' address (a seed must give the same scores, to the last bit);
            // one buffer per thread, reused for every row.
            thread_local! {
                static SHIFTED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            let summed = SHIFTED.with_borrow_mut(|buf| {
                buf.resize(logits.len() + 16, 0.0);
                let skip = buf.as_ptr().align_offset(64).min(16);
                let shifted = &mut buf[skip..skip + logits.len()];
                shifted.copy_from_slice(logits);
                kernel.run_with_params(shifted, max)
            });
            if let Ok(sum) = summed {
                return f64::from(max) + f64::from(sum).ln();
            }
        }
    }
    scalar_log_sum_exp(logits, f64::from(max))
}

fn scalar_log_sum_exp(logits: &[f32], max: f64) -> f64 {
    max + logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// The index of the largest logit (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if x > best_value {
            best = i;
            best_value = x;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_log_sum_exp_agrees_with_f64_on_logits_of_every_scale() {
        // tract has a portable kernel, so the vector path is the one tested on every machine.
        assert!(Func::Softmax2.map_reduce_f32().is_ok());
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (n, scale) in [(1, 1.0), (7, 3.0), (100, 10.0), (8192, 8.0), (32_000, 30.0)] {
            let logits: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale)
                .collect();
            let want = log_sum_exp(&logits);
            let got = fast_log_sum_exp(&logits);
            assert!((got - want).abs() < 1e-5, "n={n}: {got} vs {want}");
        }
        // The same logits at another address give the same bits.
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 7.0).collect();
        for offset in 1..8 {
            let mut shifted = vec![0.0; offset];
            shifted.extend_from_slice(&logits);
            assert_eq!(
                fast_log_sum_exp(&shifted[offset..]).to_bits(),
                fast_log_sum_exp(&logits).to_bits()
            );
        }
        // Masked positions, and logits with no finite maximum.
        let masked = [0.5, f32::NEG_INFINITY, -1e30, 2.0];
        let want = (0.5f64.exp() + 2.0f64.exp()).ln();
        assert!((fast_log_sum_exp(&masked) - want).abs() < 1e-5);
        assert!(fast_log_sum_exp(&[f32::NEG_INFINITY; 3]).is_nan());
        assert!(fast_log_sum_exp(&[1.0, f32::NAN]).is_nan());
    }

    #[test]
    fn out_of_range_settings_are_rejected() {
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        for bad in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::greedy(), 0);
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params, 0);
        // 3.0 / 2 = 1.5 < 2.9, so token 3 wins once token 1 was seen.
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[1, 1]), 3);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            top_p: 1.0,
            repetition_penalty: 1.0,
        };
        let mut s = Sampler::new(params, 42);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5, 0.9], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities after softmax: token 0 holds almost all the mass.
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            repetition_penalty: 1.0,
        };
        let mut s = Sampler::new(params, 7);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn same_seed_same_tokens_and_sampling_follows_the_distribution() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        };
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let draw = |seed| {
            let mut s = Sampler::new(params.clone(), seed);
            (0..4000)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        assert!(!a.contains(&2), "a token with -inf logit was sampled");
        // Token 1 has probability 3/4.
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "frequency {ones}");
    }
}
