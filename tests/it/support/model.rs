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

/// `kaiwa chat --model MODEL` as a user pipes lines into it, on the SQLite store `db` (in the
/// directory it runs in), replies at most `max_new_tokens` long; what it printed and said.
pub fn chat_through_pipe(
    model: &Path,
    db: &Path,
    input: &str,
    max_new_tokens: usize,
) -> std::process::Output {
    use std::process::Stdio;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args(["chat", "--model"])
        .arg(model)
        .args(["--max-new-tokens", &max_new_tokens.to_string()])
        .env("DATABASE_URL", format!("sqlite://{}", db.display()))
        .env("RUST_LOG", "warn")
        .current_dir(db.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The logits the trainable (burn) model computes for `tokens`, one row per position.
pub fn burn_logits(
    model: &kaiwa::train::model::Llama,
    tokens: &[u32],
    device: &burn::tensor::Device,
) -> Vec<Vec<f32>> {
    use burn::module::Module;
    use burn::tensor::{Int, Tensor, TensorData};
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), device);
    let flat: Vec<f32> = model
        .valid()
        .forward(input)
        .into_data()
        .try_to_vec()
        .unwrap();
    flat.chunks(model.vocab()).map(<[f32]>::to_vec).collect()
}
