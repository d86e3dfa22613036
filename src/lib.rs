//! kaiwa: build and run your own ChatGPT-style bot, end to end, on your own machine.
//!
//! The pipeline, and where each step lives:
//!
//! 1. **Collect**: a bot daemon on Discord and Telegram stores every conversation in SQLite
//!    (planned: `platform/`, `bot/`, `store/`).
//! 2. **Corpus**: stored conversations become training files (planned: `corpus/`).
//! 3. **Train**: a tokenizer and a small Llama-style decoder trained in Rust (planned: `train/`).
//! 4. **Test**: held-out loss, bits per byte against an n-gram baseline and a conversation
//!    suite gate a model ([`eval`]).
//! 5. **Deploy**: the model is exported to ONNX and replies are generated through tract with a
//!    KV cache ([`model`]).
//!
//! A model is a directory in the Hugging Face layout (see [`model`]), so what kaiwa trains is
//! readable by the wider ecosystem, and ONNX causal LMs exported by Hugging Face Optimum run in
//! kaiwa's runtime.

pub mod app;
pub mod bench;
pub mod bot;
pub mod chat;
pub mod config;
pub mod conversation;
pub mod corpus;
pub mod eval;
pub mod model;
pub mod platform;
pub mod shutdown;
pub mod store;
pub mod train;

/// The model directory used when none is given: `$MODEL_DIR`, else `models/kaiwa`.
pub fn default_model_dir() -> std::path::PathBuf {
    std::env::var_os("MODEL_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::path::PathBuf::from("models/kaiwa"))
}
