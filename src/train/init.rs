//! `kaiwa init-model`: a randomly initialised model directory, complete and runnable.
//!
//! Before any training exists, everything downstream (export, runtime, bot, evaluation) needs a
//! real model to work on. This writes one in the final format: a tokenizer trained on a small
//! built-in bilingual text, weights drawn from a seeded normal distribution, and the ONNX graph.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::bpe::{builtin_text, train_byte_level_bpe};
use crate::model::chat_template::TokenizerConfig;
use crate::model::config::{GenerationConfig, LlamaConfig, Sampling, TokenIds};
use crate::model::onnx_export::{export_onnx, ExportOptions};
use crate::model::tokenizer::{TextTokenizer, BOS_TOKEN, IM_END};
use crate::model::weights::{tensor_specs, LlamaWeights, Param};
use crate::model::{
    write_json, ModelError, CONFIG_FILE, GENERATION_CONFIG_FILE, ONNX_FILE, TOKENIZER_FILE,
};

/// Weights for `config` drawn from N(0, initializer_range²) (norm gains one, biases zero), the same
/// for the same seed on every machine.
pub fn random_weights(config: &LlamaConfig, seed: u64) -> LlamaWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let std = config.initializer_range.unwrap_or(0.02) as f32;
    let named = tensor_specs(config)
        .into_iter()
        .map(|(name, shape)| {
            let len = shape.iter().product();
            let data = if name.ends_with(".bias") {
                vec![0.0; len]
            } else if shape.len() == 1 {
                vec![1.0; len]
            } else {
                (0..len).map(|_| std * standard_normal(&mut rng)).collect()
            };
            (name, Param::new(shape, data))
        })
        .collect();
    LlamaWeights::from_named(config, named, Path::new("<random>")).expect("specs match the config")
}

/// A standard normal sample (Box–Muller).
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Writes a complete model directory with random weights to `out`. `config.vocab_size` is the
/// size of the embedding; the tokenizer trained on the built-in text may be smaller, in which
/// case the extra rows are padding that generation never picks.
pub fn init_model_dir(
    config: LlamaConfig,
    seed: u64,
    out: &Path,
) -> Result<LlamaConfig, ModelError> {
    let tokenizer = train_byte_level_bpe(builtin_text().lines(), config.vocab_size)?;
    let config = write_model_files(config, &tokenizer, TokenizerConfig::chatml(), out)?;
    let weights = random_weights(&config, seed);
    weights.save(&out.join(crate::model::WEIGHTS_FILE))?;
    export_onnx(
        &config,
        &weights,
        &out.join(ONNX_FILE),
        &ExportOptions::default(),
    )?;
    Ok(config)
}

/// Writes everything of a model directory but the weights: `tokenizer.json`,
/// `tokenizer_config.json` (with the context length as `model_max_length`), `config.json` and
/// `generation_config.json`. `config` is completed for `tokenizer` first: the vocabulary is at
/// least the tokenizer's, and the BOS and end-of-turn (`<|im_end|>`) ids are the tokenizer's.
/// Returns the completed config.
pub fn write_model_files(
    mut config: LlamaConfig,
    tokenizer: &TextTokenizer,
    mut tokenizer_config: TokenizerConfig,
    out: &Path,
) -> Result<LlamaConfig, ModelError> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    config.vocab_size = config.vocab_size.max(tokenizer.vocab_size());
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| ModelError::Tokenize(format!("the tokenizer has no special token {t}")))
    };
    let (bos, eos) = (id(BOS_TOKEN)?, id(IM_END)?);
    config.bos_token_id = Some(bos);
    config.eos_token_id = Some(TokenIds::One(eos));
    config.validate()?;

    tokenizer.save(&out.join(TOKENIZER_FILE))?;
    tokenizer_config.set_model_max_length(config.max_position_embeddings);
    tokenizer_config.save(out)?;
    write_json(&out.join(CONFIG_FILE), &config)?;
    write_json(
        &out.join(GENERATION_CONFIG_FILE),
        &default_generation_config(bos, eos),
    )?;
    Ok(config)
}

/// The sampling defaults a new model directory gets: stop at the end of the turn (or a stray
/// BOS), moderate temperature with top-k / top-p, and a mild repetition penalty.
pub fn default_generation_config(bos: u32, eos: u32) -> GenerationConfig {
    GenerationConfig {
        bos_token_id: Some(bos),
        eos_token_id: Some(TokenIds::Many(vec![eos, bos])),
        do_sample: Some(true),
        sampling: Sampling {
            temperature: Some(0.7),
            top_k: Some(40),
            top_p: Some(0.9),
            repetition_penalty: Some(1.1),
            max_new_tokens: Some(256),
            guidance_scale: None,
        },
    }
}
