//! `kaiwa bench train`: training speed of a preset on this machine, and the share of the CPU's
//! measured peak it reaches.
//!
//! The workload is the one `bench/pytorch_train.py` replays in PyTorch: the preset's
//! architecture initialised from a seed, a fixed batch of `batch × context` pseudo-random
//! tokens, and full optimizer steps (forward, cross-entropy on every target, backward,
//! global-norm clipping to 1.0, AdamW with weight decay on matrices). A few warm-up steps are
//! not timed. The peak is a large f32 matrix product through the same backend on all threads,
//! so the fraction says how much of what this CPU can do in practice a training step uses.
//! [`run_pytorch`] runs the PyTorch script.

use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::peak_rss_mib;
use super::python::{run_script, ScriptError};
use crate::model::LlamaConfig;
use crate::train::init::random_weights;
use crate::train::model::Llama;
use crate::train::optim::{AdamWSettings, Schedule};
use crate::train::step::{retain_freed_memory, Batch, Trainer};

/// What one training benchmark measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub parameters: usize,
    pub batch: usize,
    pub context: usize,
    pub micro_batches: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub step_median_ms: f64,
    /// Training FLOPs per token (6 per weight multiply, plus causal attention).
    pub flops_per_token: f64,
    pub achieved_gflops: f64,
    /// A 2048³ f32 matrix product through the same backend.
    pub peak_gflops: f64,
    /// `achieved_gflops / peak_gflops`.
    pub peak_fraction: f64,
    /// CPU seconds per wall second during the timed steps.
    pub cores_busy: f64,
    pub peak_rss_mib: f64,
    pub last_loss: f32,
}

/// Training FLOPs for one token of a `context`-long sequence: 6 per weight multiply (forward
/// and backward; the embedding lookup is not a multiply, the output projection is) plus causal
/// attention, whose two `T×T` products cost `6 · 2 · layers · q_width · T/2` averaged over the
/// positions.
pub fn train_flops_per_token(config: &LlamaConfig, context: usize) -> f64 {
    let (h, i, v) = (
        config.hidden_size as f64,
        config.intermediate_size as f64,
        config.vocab_size as f64,
    );
    let q = (config.num_attention_heads * config.head_dim()) as f64;
    let kv = (config.kv_heads() * config.head_dim()) as f64;
    let per_layer = 2.0 * h * q + 2.0 * h * kv + 3.0 * h * i;
    let matmul_weights = config.num_hidden_layers as f64 * per_layer + v * h;
    let attention = 6.0 * config.num_hidden_layers as f64 * q * context as f64;
    6.0 * matmul_weights + attention
}

/// Times `steps` optimizer steps of `config` on a `batch × context` batch split into
/// `micro_batches` passes, after `warmup` untimed steps.
pub fn bench_train(
    config: &LlamaConfig,
    batch: usize,
    context: usize,
    micro_batches: usize,
    warmup: usize,
    steps: usize,
) -> TrainReport {
    retain_freed_memory();
    let peak_gflops = peak_matmul_gflops();
    let device = Device::flex().autodiff();
    let weights = random_weights(config, 0);
    let model = Llama::from_weights(config, &weights, &device);
    let parameters = weights.parameter_count();
    drop(weights);
    let schedule = Schedule {
        peak_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 2,
        total_steps: 1000,
    };
    let mut trainer = Trainer::new(model, AdamWSettings::default(), schedule, device);
    let rows = random_token_rows(batch, context, config.vocab_size, 1);
    let micro = micro_batches.clamp(1, batch.max(1));
    let per = batch.div_ceil(micro);
    let batches: Vec<Batch> = rows.chunks(per).map(Batch::from_rows).collect();
    for _ in 0..warmup {
        trainer.step(&batches);
    }
    let cpu_before = cpu_seconds();
    let mut times = Vec::with_capacity(steps);
    let mut last_loss = f32::NAN;
    for _ in 0..steps.max(1) {
        let t = Instant::now();
        last_loss = trainer.step(&batches).loss;
        times.push(t.elapsed().as_secs_f64());
    }
    let wall: f64 = times.iter().sum();
    let cores_busy = (cpu_seconds() - cpu_before) / wall.max(1e-9);
    times.sort_by(f64::total_cmp);
    let tokens_per_s = (batch * context * times.len()) as f64 / wall.max(1e-9);
    let flops_per_token = train_flops_per_token(config, context);
    let achieved_gflops = flops_per_token * tokens_per_s / 1e9;
    TrainReport {
        parameters,
        batch,
        context,
        micro_batches: batches.len(),
        steps: times.len(),
        tokens_per_s,
        step_median_ms: times[times.len() / 2] * 1e3,
        flops_per_token,
        achieved_gflops,
        peak_gflops,
        peak_fraction: achieved_gflops / peak_gflops.max(1e-9),
        cores_busy,
        peak_rss_mib: peak_rss_mib(),
        last_loss,
    }
}

/// GFLOP/s of a 2048³ f32 matrix product on the Flex backend (best of five, after a warm-up).
pub fn peak_matmul_gflops() -> f64 {
    let device = Device::flex();
    let n: usize = 2048;
    let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
    let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
    let _ = a.clone().matmul(b.clone()).into_data();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let _ = a.clone().matmul(b.clone()).into_data();
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// `rows` rows of `len + 1` pseudo-random token ids below `vocab`, the same for the same `seed`
/// (a 64-bit LCG): the benchmark's batch, where only the shapes matter for speed, and the
/// training tests' inputs.
pub fn random_token_rows(rows: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let next = |state: u64| {
        state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    };
    let mut state = next(seed);
    (0..rows)
        .map(|_| {
            (0..=len)
                .map(|_| {
                    state = next(state);
                    ((state >> 33) % vocab.max(1) as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// User plus system CPU time of this process so far, in seconds (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command name (in parentheses), utime and stime are the 12th and 13th fields.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// The script that replays [`bench_train`]'s workload in PyTorch eager, relative to the working
/// directory.
pub const PYTORCH_SCRIPT: &str = "bench/pytorch_train.py";

/// Runs [`PYTORCH_SCRIPT`] with the shapes of `config` and the same batch, context, warm-up and
/// steps as [`bench_train`]; what it printed (read its speed with [`pytorch_tokens_per_s`]).
pub fn run_pytorch(
    config: &LlamaConfig,
    batch: usize,
    context: usize,
    warmup: usize,
    steps: usize,
) -> Result<String, ScriptError> {
    let c = config;
    if c.qkv_bias() {
        return Err(ScriptError::Unsupported("q/k/v biases (Qwen2)"));
    }
    if c.head_dim() * c.num_attention_heads != c.hidden_size {
        return Err(ScriptError::Unsupported(
            "head_dim other than hidden / heads",
        ));
    }
    let args = [
        ("--vocab", c.vocab_size.to_string()),
        ("--hidden", c.hidden_size.to_string()),
        ("--intermediate", c.intermediate_size.to_string()),
        ("--layers", c.num_hidden_layers.to_string()),
        ("--heads", c.num_attention_heads.to_string()),
        ("--kv-heads", c.kv_heads().to_string()),
        ("--tie", c.tie_word_embeddings.to_string()),
        ("--batch", batch.to_string()),
        ("--context", context.to_string()),
        ("--warmup", warmup.to_string()),
        ("--steps", steps.to_string()),
    ];
    run_script(
        Path::new(PYTORCH_SCRIPT),
        args.iter()
            .flat_map(|(flag, value)| [flag.to_string(), value.clone()]),
    )
}

/// The tokens a second in what [`run_pytorch`] printed (its `tokens_per_s` line).
pub fn pytorch_tokens_per_s(output: &str) -> Result<f64, ScriptError> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("tokens_per_s "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or(ScriptError::NoTokensPerS)
}
