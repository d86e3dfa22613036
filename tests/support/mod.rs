//! Shared helpers for the integration tests: tiny random models written to temp dirs.
#![allow(dead_code)]

use std::path::Path;

use kaiwa::model::init::random_weights;
use kaiwa::model::onnx_export::{export_onnx, ExportOptions};
use kaiwa::model::{LlamaConfig, LlamaWeights, Preset};

/// The tiny preset (grouped-query attention, tied embeddings) with weights large enough that
/// logits are of order one, so a 1e-4 tolerance means something.
pub fn tiny_config() -> LlamaConfig {
    let mut c = LlamaConfig::preset(Preset::Tiny);
    c.vocab_size = 300;
    c.initializer_range = Some(0.15);
    c
}

/// Multi-head attention with a separate output projection.
pub fn mha_untied_config() -> LlamaConfig {
    let mut c = tiny_config();
    c.num_key_value_heads = Some(c.num_attention_heads);
    c.tie_word_embeddings = false;
    c.num_hidden_layers = 3;
    c
}

/// Writes `model.onnx` for random weights of `config` into `dir` and returns the weights.
pub fn write_onnx(
    dir: &Path,
    config: &LlamaConfig,
    seed: u64,
    options: &ExportOptions,
) -> LlamaWeights {
    let weights = random_weights(config, seed);
    export_onnx(config, &weights, &dir.join("model.onnx"), options).expect("export");
    weights
}

/// Deterministic token ids below `vocab`.
pub fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 101 + 5) % vocab) as u32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
pub mod core;
pub mod daemon;

/// The `meta` of every example `export-corpus --mode bot` writes from `store` (where the
/// feedback on replies is carried).
pub async fn exported_meta(store: &kaiwa::store::Store) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    kaiwa::corpus::export::export(store, dir.path(), &Default::default())
        .await
        .expect("export");
    std::fs::read_to_string(dir.path().join("train.jsonl"))
        .expect("train.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line")["meta"].clone())
        .collect()
}

/// Waits (bounded) until the exported feedback satisfies `done`; returns the metas.
pub async fn wait_for_feedback(
    store: &kaiwa::store::Store,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let metas = exported_meta(store).await;
        if done(&metas) {
            return metas;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "feedback not recorded within 20 s: {metas:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The Python interpreter (`$PYTHON`, else `python3`) if it can import `module`. Where it cannot,
/// the test is skipped with a line saying so, except in CI (`CI` set), where that fails.
pub fn python_with(module: &str, install: &str) -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output();
    if probe.map(|o| o.status.success()).unwrap_or(false) {
        return Some(python);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{module} is not installed for {python}; .ci/run installs it"
    );
    eprintln!("skipping: {python} cannot import {module} ({install})");
    None
}
