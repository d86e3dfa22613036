//! kaiwa's integration tests, one module per area, all in this one test binary: one link of the
//! library and its dependencies instead of one per file. `support` holds what they share: the
//! daemon in-process, loopback fakes of Telegram and Discord, the core with a recording outbox,
//! tiny random models.
//!
//! The tests of all modules run as threads of this one process, so none may change
//! process-wide state (environment variables, the current directory): settings go to the
//! daemon through `Settings::from_lookup`, and to the real binary through `Command::env`. A port
//! is held from the moment it is chosen (`support::web::Web`, `reserved_port`), never picked
//! free and bound later. Each test daemon runs on a runtime of its own and keeps its own logs
//! (`support::logs`); the process-wide tracing subscriber keeps nothing.

mod support;

mod access;
mod bot_core;
mod cli_corpus;
mod cli_train;
mod corpus;
mod discord;
mod engine;
mod eval;
mod hf_models;
mod model_dir;
mod onnx_runtime;
mod poison;
mod recipes;
mod replicas;
mod retrain;
mod signals;
mod store;
mod telegram;
mod train_run;
mod training;
mod web;
