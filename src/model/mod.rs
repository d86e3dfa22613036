//! The model: a Llama-family decoder in the Hugging Face directory layout, its ONNX export, and
//! reply generation through tract.
//!
//! A model directory holds `config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json` (with the chat template), `generation_config.json` and `model.onnx`.
//! The runtime needs only the tokenizer files and an ONNX graph in the decoder-with-past
//! convention of Hugging Face Optimum, so models exported by the wider ecosystem run too.

pub mod attention;
pub mod chat_template;
pub mod config;
pub mod generate;
pub mod onnx_export;
pub mod q8;
pub mod quantized;
pub mod reference;
pub mod runtime;
pub mod sampler;
pub mod threads;
pub mod token_bytes;
pub mod tokenizer;
pub mod utf8;
pub mod weights;

use std::path::{Path, PathBuf};

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{Family, GenerationConfig, LlamaConfig, Preset, Sampling};
pub use generate::{GenerateOptions, Generation, Generator, ReplyLikelihood, StopReason};
pub use runtime::{DecoderSession, OnnxDecoder};
pub use sampler::{Sampler, SamplingParams};
pub use tokenizer::TextTokenizer;
pub use weights::{LlamaWeights, Param};

/// Everything that can go wrong while loading, exporting or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a model directory: {reason}", path.display())]
    NotAModelDir { path: PathBuf, reason: String },
    #[error("{}: invalid JSON: {reason}", path.display())]
    Json { path: PathBuf, reason: String },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("{}: bad weights: {reason}", path.display())]
    Weights { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{}: ONNX graph does not follow the causal-LM convention: {reason}", path.display())]
    OnnxInterface { path: PathBuf, reason: String },
    #[error("{}: cannot load ONNX graph: {reason}", path.display())]
    OnnxLoad { path: PathBuf, reason: String },
    #[error("ONNX export: {0}")]
    Export(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// File names inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a model saved in several safetensors shards (`save_pretrained`'s
/// `max_shard_size`), read instead of [`WEIGHTS_FILE`] when that is absent.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const ONNX_FILE: &str = "model.onnx";

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes a value as pretty JSON.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}

/// The ONNX graph of a model directory: `model.onnx`, or `onnx/model.onnx` as some Hugging
/// Face repositories lay it out. Only looks; [`ensure_onnx`] exports a missing one.
pub fn find_onnx(dir: &Path) -> Result<PathBuf, ModelError> {
    let candidates = [ONNX_FILE, "onnx/model.onnx"];
    if let Some(found) = candidates.iter().map(|c| dir.join(c)).find(|p| p.is_file()) {
        return Ok(found);
    }
    Err(ModelError::NotAModelDir {
        path: dir.to_path_buf(),
        reason: if dir.is_dir() {
            format!(
                "no ONNX graph found (looked for {}); run `kaiwa export-onnx {}` first",
                candidates.join(", "),
                dir.display()
            )
        } else {
            "no such directory".into()
        },
    })
}

/// The ONNX graph of a model directory ([`find_onnx`]), exported from the weights first when
/// the directory has `config.json` and weights (`model.safetensors`, or shards and their index)
/// but no graph: the default model in the repository ships only its weights, since the graph
/// would hold a second copy of them.
pub fn ensure_onnx(dir: &Path) -> Result<PathBuf, ModelError> {
    let missing = match find_onnx(dir) {
        Ok(found) => return Ok(found),
        Err(e) => e,
    };
    let has_weights = [WEIGHTS_FILE, WEIGHTS_INDEX_FILE]
        .iter()
        .any(|f| dir.join(f).is_file());
    if !(dir.join(CONFIG_FILE).is_file() && has_weights) {
        return Err(missing);
    }
    let config = load_config(dir)?;
    let weights = LlamaWeights::load_dir(&config, dir)?;
    let path = dir.join(ONNX_FILE);
    tracing::info!(path = %path.display(), "no ONNX graph yet: exporting it from the weights");
    onnx_export::export_onnx(
        &config,
        &weights,
        &path,
        &onnx_export::ExportOptions::default(),
    )?;
    Ok(path)
}

/// In a model home (`kaiwa retrain`), the link to the deployed version.
pub const CURRENT_LINK: &str = "current";

/// The model directory to load for `dir`: `dir` itself, or, for a model home that `kaiwa
/// retrain` keeps, the version its `current` link points at, resolved now (so a reload after
/// an install or a rollback loads the new one, and the path names the version).
pub fn resolve_dir(dir: &Path) -> PathBuf {
    let link = dir.join(CURRENT_LINK);
    if !dir.join(CONFIG_FILE).exists() && link.exists() {
        if let Ok(resolved) = std::fs::canonicalize(&link) {
            return resolved;
        }
    }
    dir.to_path_buf()
}

/// Reads `config.json` of a model directory and checks it ([`LlamaConfig::validate`]); a
/// refusal names the file.
pub fn load_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let config: LlamaConfig = read_json(&path)?;
    config.validate().map_err(|e| match e {
        ModelError::InvalidConfig(reason) => {
            ModelError::InvalidConfig(format!("{}: {reason}", path.display()))
        }
        other => other,
    })?;
    Ok(config)
}
