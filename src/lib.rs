//! kaiwa: build and run your own ChatGPT-style bot, end to end, on your own machine.
//!
//! The pipeline, and where each step lives:
//!
//! 1. **Collect**: a bot daemon on Discord and Telegram stores every conversation in SQLite
//!    ([`platform`] adapters, the [`bot`] core, the [`store`]).
//! 2. **Corpus**: existing dialogue is imported into the same store and everything stored
//!    becomes training files ([`corpus`]).
//! 3. **Train**: a tokenizer ([`train::tokenizer`]) and the transformer, trained with burn on
//!    the CPU ([`train::run`] is the loop: packed data from [`train::data`], checkpoints, exact
//!    resume, metrics and a loss curve).
//! 4. **Test**: held-out loss, bits per byte against an n-gram baseline and a conversation
//!    suite gate a model ([`eval`]).
//! 5. **Deploy**: the model is exported to ONNX and replies are generated through tract with a
//!    KV cache ([`model`]); the [`engine`] retrieves, generates and ranks replies for the bots
//!    and for the [`web`] server (an OpenAI-compatible API and a chat page).
//!
//! A model is a directory in the Hugging Face layout (see [`model`]), so what kaiwa trains is
//! readable by the wider ecosystem, and ONNX causal LMs exported by Hugging Face Optimum run in
//! kaiwa's runtime.

pub mod app;
pub mod backoff;
pub mod bench;
pub mod bot;
pub mod chat;
pub mod clock;
pub mod config;
pub mod conversation;
pub mod corpus;
pub mod dataset;
pub mod domain;
pub mod engine;
pub mod eval;
pub mod fsio;
mod kernels;
#[cfg(test)]
mod layers;
pub mod metrics;
pub mod model;
pub mod platform;
pub mod retrain;
pub mod shutdown;
pub mod store;
pub mod text;
pub mod train;
pub mod web;
