//! `kaiwa bench infer`: how fast a model prefills and decodes through tract on this machine.
//!
//! The workload is fixed so that `bench/onnxruntime_decode.py` can replay it exactly in ONNX
//! Runtime: batch 1, a prompt of `prompt_tokens` ids `(i * 7919 + 13) % vocab`, then greedy
//! decoding of `new_tokens` tokens, one at a time with the KV cache. Both run inside
//! [`OnnxDecoder::parallel`], as a generation does. [`onnxruntime_decode`] runs the script.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::peak_rss_mib;
use super::python::{run_script, ScriptError};
use crate::model::runtime::OnnxDecoder;
use crate::model::sampler::argmax;
use crate::model::{ensure_onnx, load_config, ModelError};

/// What one inference benchmark measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InferReport {
    pub runtime: String,
    pub model: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Median prefill time of the prompt, in milliseconds.
    pub prefill_ms: f64,
    /// Decode speed: new tokens per second after the prefill.
    pub decode_tokens_per_s: f64,
    /// Peak resident memory of the process, in MiB (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
    /// The greedy tokens, so two runtimes can be checked to agree.
    pub tokens: Vec<u32>,
}

/// The benchmark prompt: deterministic ids spread over the vocabulary.
pub fn bench_prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// Runs the benchmark on the ONNX graph of a model directory, with tract's products on
/// `threads` threads.
pub fn bench_infer(
    dir: &Path,
    prompt_tokens: usize,
    new_tokens: usize,
    repeats: usize,
    threads: usize,
) -> Result<InferReport, ModelError> {
    let onnx = ensure_onnx(dir)?;
    let fallback = load_config(dir).ok().map(|c| (c.kv_heads(), c.head_dim()));
    let decoder = Arc::new(OnnxDecoder::load_with_threads(&onnx, fallback, threads)?);
    if let Some(ctx) = load_config(dir).ok().map(|c| c.context_len()) {
        if prompt_tokens + new_tokens > ctx {
            return Err(ModelError::Invalid(format!(
                "a {prompt_tokens}-token prompt and {new_tokens} new tokens do not fit the \
                 model's context of {ctx} tokens"
            )));
        }
    }
    let prompt = bench_prompt(prompt_tokens, decoder.vocab_size());

    // Warm-up, then the median of `repeats` prefills.
    decoder.session()?.forward(&prompt)?;
    let mut prefills = Vec::new();
    for _ in 0..repeats.max(1) {
        let mut session = decoder.session()?;
        let t = Instant::now();
        decoder.parallel(|| session.forward(&prompt))?;
        prefills.push(t.elapsed().as_secs_f64() * 1e3);
    }
    prefills.sort_by(f64::total_cmp);
    let prefill_ms = prefills[prefills.len() / 2];

    let mut best_rate: f64 = 0.0;
    let mut tokens = Vec::new();
    for _ in 0..repeats.max(1) {
        let mut session = decoder.session()?;
        let (rate, greedy) = decoder.parallel(|| -> Result<_, ModelError> {
            let mut logits = session.forward(&prompt)?;
            let mut greedy = Vec::with_capacity(new_tokens);
            let t = Instant::now();
            for _ in 0..new_tokens {
                let next = argmax(&logits);
                greedy.push(next);
                logits = session.forward(&[next])?;
            }
            Ok((new_tokens as f64 / t.elapsed().as_secs_f64(), greedy))
        })?;
        best_rate = best_rate.max(rate);
        tokens = greedy;
    }
    Ok(InferReport {
        runtime: format!(
            "tract(threads={}, attention={})",
            decoder.threads(),
            if decoder.fused_attention() > 0 {
                "kaiwa"
            } else {
                "graph"
            }
        ),
        model: onnx.display().to_string(),
        prompt_tokens,
        new_tokens,
        prefill_ms,
        decode_tokens_per_s: best_rate,
        peak_rss_mib: peak_rss_mib(),
        tokens,
    })
}

/// Runs `bench/onnxruntime_decode.py` (of kaiwa's source tree) on the same model and workload as
/// [`bench_infer`], with `threads` intra-op threads (0: ONNX Runtime's default); its report.
pub fn onnxruntime_decode(
    dir: &Path,
    prompt_tokens: usize,
    new_tokens: usize,
    repeats: usize,
    threads: usize,
) -> Result<InferReport, ScriptError> {
    let workload = [prompt_tokens, new_tokens, repeats, threads];
    yardstick("onnxruntime_decode.py", dir, workload, &[])
}

/// The weights llama.cpp runs the model with in [`llama_cpp_decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LlamaCppWeights {
    F32,
    #[value(name = "q8_0")]
    Q8_0,
}

impl LlamaCppWeights {
    fn name(self) -> &'static str {
        match self {
            LlamaCppWeights::F32 => "f32",
            LlamaCppWeights::Q8_0 => "q8_0",
        }
    }
}

/// Runs `bench/llama_cpp.py` on the same model and workload as [`bench_infer`]: the model
/// converted to GGUF with `weights`, run by llama.cpp on `threads` threads. The script builds
/// llama.cpp from the `llama-cpp-python` source distribution on PyPI the first time (minutes;
/// see bench/README.md); never used by the product.
pub fn llama_cpp_decode(
    dir: &Path,
    prompt_tokens: usize,
    new_tokens: usize,
    repeats: usize,
    threads: usize,
    weights: LlamaCppWeights,
) -> Result<InferReport, ScriptError> {
    let workload = [prompt_tokens, new_tokens, repeats, threads];
    yardstick("llama_cpp.py", dir, workload, &["--quant", weights.name()])
}

/// Runs one of the `bench/` scripts that replay [`bench_infer`]'s workload in another runtime
/// and print an [`InferReport`] as their last line.
fn yardstick(
    script: &str,
    dir: &Path,
    [prompt_tokens, new_tokens, repeats, threads]: [usize; 4],
    extra: &[&str],
) -> Result<InferReport, ScriptError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join(script);
    let mut args = vec![OsString::from("--model"), dir.as_os_str().to_owned()];
    for (flag, value) in [
        ("--prompt-tokens", prompt_tokens),
        ("--new-tokens", new_tokens),
        ("--repeats", repeats),
        ("--threads", threads),
    ] {
        args.extend([flag.into(), value.to_string().into()]);
    }
    args.extend(extra.iter().map(OsString::from));
    let stdout = run_script(&script, args)?;
    let last = stdout.lines().last().ok_or(ScriptError::NoReport)?;
    serde_json::from_str(last).map_err(ScriptError::Report)
}
