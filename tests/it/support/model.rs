//! Tiny random models written to temp dirs: configs and ONNX graphs for the runtime tests, and
//! one whole model directory shared by every test that only needs a model to load.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kaiwa::model::onnx_export::{export_onnx, ExportOptions};
use kaiwa::model::{LlamaConfig, LlamaWeights, Preset};
use kaiwa::train::init::random_weights;

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

static MODEL: OnceLock<tempfile::TempDir> = OnceLock::new();

/// A tiny random model, made once per test process, in a directory named `kaiwa` (the model id
/// the web API answers to).
pub fn tiny_model_dir() -> PathBuf {
    MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            kaiwa::train::init::init_model_dir(
                kaiwa::model::LlamaConfig::preset(kaiwa::model::Preset::Tiny),
                7,
                &dir.path().join("kaiwa"),
            )
            .unwrap();
            dir
        })
        .path()
        .join("kaiwa")
}

/// A copy of the tiny model's weights and settings, to change: the graph is exported again on
/// load (another test may be exporting the shared one right now).
pub fn copy_of_tiny_model() -> tempfile::TempDir {
    let model = tempfile::tempdir().unwrap();
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let from = tiny_model_dir().join(file);
        std::fs::copy(from, model.path().join(file)).unwrap();
    }
    model
}

/// A copy of the tiny model whose `retrieval.json` ships a small dialogue corpus and sentences.
pub fn tiny_model_with_retrieval_data() -> tempfile::TempDir {
    let model = copy_of_tiny_model();
    let mut corpus = std::fs::File::create(model.path().join("corpus.jsonl")).unwrap();
    for (user, assistant) in [
        ("Do you like pizza?", "I love pizza with mushrooms."),
        ("今日の天気は？", "晴れていて暖かいですよ。"),
    ] {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ]});
        writeln!(corpus, "{line}").unwrap();
    }
    std::fs::write(
        model.path().join("sentences.tsv"),
        "犬と散歩するのが好きです。\tI like walking the dog.\n",
    )
    .unwrap();
    std::fs::write(
        model.path().join("retrieval.json"),
        r#"{"corpora": [{"path": "corpus.jsonl", "format": "openai"},
                        {"path": "sentences.tsv", "format": "sentences"}]}"#,
    )
    .unwrap();
    model
}
