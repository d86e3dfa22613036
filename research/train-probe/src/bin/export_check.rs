//! Writes model directories for the cross-check against `transformers` (bench/check_export.py).
//!
//! `cargo run --release --bin export_check -- OUT_DIR [TRAIN_STEPS]`: for the `tiny` (grouped-query,
//! tied) and `small` presets, trains a few steps (so the weights are no longer the initial draw and
//! the norm gains differ from one), then writes `OUT_DIR/<preset>/{config.json,
//! model.safetensors}` and `expected.safetensors` holding the token ids and the burn logits.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};
use train_probe::model::{Config, Llama};
use train_probe::optim::{AdamWSettings, Schedule};
use train_probe::train::{Batch, Trainer};
use train_probe::weights;

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .expect("usage: export_check OUT_DIR [TRAIN_STEPS]");
    let steps: usize = args.next().map(|s| s.parse().expect("steps")).unwrap_or(5);
    for (name, config) in [("tiny", Config::tiny()), ("small", Config::small())] {
        let dir = Path::new(&out).join(name);
        std::fs::create_dir_all(&dir).expect("create output directory");
        let device = Device::flex().autodiff();
        device.seed(3);
        let model = trained(Llama::init(&config, &device), &config, &device, steps);
        weights::save(&model, &dir.join("model.safetensors")).expect("save weights");
        let json = serde_json::to_string_pretty(&weights::hf_config_json(&config)).unwrap();
        std::fs::write(dir.join("config.json"), json).expect("write config.json");

        let (batch, time) = (2, 64);
        let tokens = tokens(batch * time, config.vocab, 99);
        let input =
            Tensor::<2, Int>::from_data(TensorData::new(tokens.clone(), [batch, time]), &device);
        let logits: Vec<f32> = model.forward(input).into_data().try_to_vec().unwrap();
        let token_bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let logit_bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![
            (
                "tokens",
                TensorView::new(Dtype::I64, vec![batch, time], &token_bytes).unwrap(),
            ),
            (
                "logits",
                TensorView::new(Dtype::F32, vec![batch, time, config.vocab], &logit_bytes).unwrap(),
            ),
        ];
        safetensors::serialize_to_file(
            views,
            None::<HashMap<String, String>>,
            &dir.join("expected.safetensors"),
        )
        .expect("write expected.safetensors");
        println!("wrote {}", dir.display());
    }
}

fn trained(model: Llama, config: &Config, device: &Device, steps: usize) -> Llama {
    let schedule = Schedule {
        peak_lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 1,
        total_steps: steps.max(1),
    };
    let mut trainer = Trainer::new(model, AdamWSettings::default(), schedule, device.clone());
    let rows: Vec<Vec<u32>> = (0..4)
        .map(|r| {
            tokens(65, config.vocab, r)
                .iter()
                .map(|&t| t as u32)
                .collect()
        })
        .collect();
    let batch = Batch::from_rows(&rows);
    for _ in 0..steps {
        trainer.step(std::slice::from_ref(&batch));
    }
    trainer.into_model()
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<i64> {
    let mut state = seed.wrapping_add(12345);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as i64
        })
        .collect()
}
