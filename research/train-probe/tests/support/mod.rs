//! Shared helpers for the training tests: devices, tiny models, a plain-Rust reference forward.

#![allow(dead_code)]

pub mod reference;

use burn::tensor::Device;
use train_probe::model::{Config, Llama};

/// The autodiff Flex device, seeded so parameter draws repeat.
pub fn seeded_device(seed: u64) -> Device {
    let device = Device::flex().autodiff();
    device.seed(seed);
    device
}

/// `tiny` (grouped-query attention, tied embeddings) and a tiny untied variant, so both output
/// projections are exercised.
pub fn tiny_configs() -> Vec<Config> {
    let tied = Config::tiny();
    let untied = Config {
        tie_embeddings: false,
        kv_heads: 4,
        ..Config::tiny()
    };
    vec![tied, untied]
}

/// A freshly initialised model. The Flex RNG is one global, so seeding and drawing happen under a
/// lock: tests run in parallel and would otherwise draw from each other's seeds.
pub fn model(config: &Config, seed: u64) -> (Llama, Device) {
    let _guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let device = seeded_device(seed);
    (Llama::init(config, &device), device)
}

static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Deterministic pseudo-random token rows of `time + 1` tokens (a small LCG: no extra crate).
pub fn token_rows(rows: usize, time: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..rows)
        .map(|_| {
            (0..=time)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}
