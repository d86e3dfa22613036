//! Models: `init-model` and `export-onnx` make and export one; `chat` and `generate` talk to it.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};
use kaiwa::engine::{EngineMode, ReplyEngine};
use kaiwa::model::{self, ChatMessage, LlamaConfig, LlamaWeights};

use crate::args::{ChatArgs, ExportOnnxArgs, GenerateArgs, InitModelArgs};

pub fn init_model(args: &InitModelArgs) -> Result<()> {
    let out = &args.out;
    let config =
        kaiwa::train::init::init_model_dir(LlamaConfig::preset(args.preset), args.seed, out)
            .with_context(|| format!("writing a new model to {}", out.display()))?;
    eprintln!(
        "wrote {} ({} layers, hidden {}, vocab {})",
        out.display(),
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size
    );
    Ok(())
}

pub fn export_onnx(args: &ExportOnnxArgs) -> Result<()> {
    let dir = &args.dir;
    let config = model::load_config(dir)?;
    let weights = LlamaWeights::load_dir(&config, dir)?;
    let out = model::onnx_export::default_output(dir);
    model::onnx_export::export_onnx(&config, &weights, &out, &args.options())
        .with_context(|| format!("exporting {}", out.display()))?;
    eprintln!(
        "wrote {} ({} parameters)",
        out.display(),
        weights.parameter_count()
    );
    Ok(())
}

pub fn chat(args: &ChatArgs) -> Result<()> {
    let engine = ReplyEngine::new(args.engine.settings()?);
    let generator = args.model.load(&args.threads)?;
    let options = args.sampling.options(&generator)?;
    let (rt, store) = crate::open_store()?;
    if engine.settings().mode == EngineMode::Hybrid {
        rt.block_on(kaiwa::engine::corpora::ensure_corpora(
            &store,
            generator.dir(),
        ))
        .context("adding the model's retrieval data to the store")?;
    }
    let stdin = std::io::stdin();
    let style = if stdin.is_terminal() {
        kaiwa::chat::ChatStyle::Terminal
    } else {
        kaiwa::chat::ChatStyle::Lines
    };
    kaiwa::chat::Chat {
        generator: &generator,
        engine: &engine,
        retrieve: &mut |text| rt.block_on(engine.retrieve(&store, text)),
        system: args.system.as_deref(),
        options: &options,
        style,
    }
    .run(&mut stdin.lock(), &mut std::io::stdout().lock())?;
    rt.block_on(store.close());
    Ok(())
}

pub fn generate(args: &GenerateArgs) -> Result<()> {
    let generator = args.model.load(&args.threads)?;
    let options = args.sampling.options(&generator)?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    messages.push(ChatMessage::user(args.prompt.clone()));
    let mut out = std::io::stdout();
    let generation = generator.generate(&messages, &options, &mut |delta| {
        out.write_all(delta.as_bytes())
            .and_then(|_| out.flush())
            .is_ok()
    })?;
    writeln!(out)?;
    tracing::info!(
        prompt_tokens = generation.prompt_tokens,
        new_tokens = generation.new_tokens,
        stop = ?generation.stop,
        prefill_ms = generation.prefill.as_millis() as u64,
        decode_tok_s = generation.new_tokens as f64 / generation.decode.as_secs_f64().max(1e-9),
        "generated"
    );
    Ok(())
}
