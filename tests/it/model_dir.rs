//! A model directory from `kaiwa init-model` loads, replies reproducibly and streams valid text;
//! broken directories and foreign graphs give clear errors, never a panic.

use std::path::Path;
use std::process::Command;

use crate::support::model::*;
use kaiwa::chat::{Chat, ChatStyle};
use kaiwa::engine::{EngineError, EngineMode, EngineSettings, ReplyEngine, Retrieval};
use kaiwa::model::onnx_export::{build_model, ExportOptions};
use kaiwa::model::{
    ChatMessage, GenerateOptions, Generator, LlamaConfig, LlamaWeights, ModelError, Preset,
    SamplingParams, StopReason,
};
use kaiwa::train::init::init_model_dir;

fn init_tiny(dir: &Path) -> LlamaConfig {
    init_model_dir(LlamaConfig::preset(Preset::Tiny), 7, dir).expect("init-model")
}

fn sampled(seed: u64) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
            repetition_penalty: 1.1,
        },
        max_new_tokens: 24,
        seed,
        stop: vec![],
        guidance_scale: 1.0,
    }
}

#[test]
fn init_model_writes_the_hugging_face_layout() {
    let dir = tempfile::tempdir().unwrap();
    let config = init_tiny(dir.path());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.onnx",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["architectures"][0], "LlamaForCausalLM");
    assert_eq!(json["model_type"], "llama");
    assert_eq!(json["num_key_value_heads"], 2);
    assert_eq!(json["torch_dtype"], "float32");
    assert!(json["bos_token_id"].is_u64() && json["eos_token_id"].is_u64());
    // The weights reload under their Hugging Face names with the shapes config.json implies.
    let weights = LlamaWeights::load(&config, &dir.path().join("model.safetensors")).unwrap();
    assert_eq!(weights.layers.len(), config.num_hidden_layers);
    assert!(weights.lm_head.is_none(), "tiny ties its embeddings");
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    // Same seed, same weights.
    let again = tempfile::tempdir().unwrap();
    init_tiny(again.path());
    assert_eq!(
        std::fs::read(dir.path().join("model.safetensors")).unwrap(),
        std::fs::read(again.path().join("model.safetensors")).unwrap()
    );
}

/// A directory shipped without `model.onnx` (as `models/kaiwa` is) gets it exported on first
/// load; several loads racing for it all succeed, see a whole graph, and leave no temporary file.
#[test]
fn a_missing_graph_is_exported_on_first_load_even_by_several_loaders_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = init_tiny(dir.path());
    let graph = dir.path().join("model.onnx");
    let original = std::fs::read(&graph).unwrap();
    for _ in 0..2 {
        std::fs::remove_file(&graph).unwrap();
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    barrier.wait();
                    let generator = Generator::load_with_threads(dir.path(), 1).unwrap();
                    assert_eq!(generator.decoder().vocab_size(), config.vocab_size);
                });
            }
        });
        assert_eq!(
            std::fs::read(&graph).unwrap(),
            original,
            "same weights, same graph"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("tmp")),
            "temporary files left: {names:?}"
        );
    }
}

#[test]
fn generation_is_reproducible_and_streams_whole_characters() {
    let dir = tempfile::tempdir().unwrap();
    init_tiny(dir.path());
    let generator = Generator::load(dir.path()).unwrap();
    let messages = [
        ChatMessage::system("あなたは親切なアシスタントです。"),
        ChatMessage::user("今日の天気はどうですか？"),
    ];
    let run = |seed| {
        let mut deltas = Vec::new();
        let g = generator
            .generate(&messages, &sampled(seed), &mut |d| {
                deltas.push(d.to_string());
                true
            })
            .unwrap();
        (g, deltas)
    };
    // A random model may end its reply at once; take the first seed that says something.
    let seed = (1..50)
        .find(|&s| run(s).0.new_tokens > 0)
        .expect("some seed gives a non-empty reply");
    let (a, deltas) = run(seed);
    let (b, _) = run(seed);
    assert_eq!(a.text, b.text, "same seed, same reply");
    assert_eq!(deltas.concat(), a.text, "the stream is the reply");
    // Streaming never splits a character: the deltas add up to decoding all tokens at once (a
    // split character would show as U+FFFD in a delta and differ from the whole decode).
    assert_eq!(
        a.text,
        generator.tokenizer().decode(&a.tokens, true).unwrap()
    );
    assert_eq!(a.tokens.len(), a.new_tokens);
    assert!(a.new_tokens > 0 && a.prompt_tokens > 10);
    let texts: Vec<String> = (seed + 1..seed + 5).map(|s| run(s).0.text).collect();
    assert!(
        texts.iter().any(|t| *t != a.text),
        "different seeds should differ"
    );

    let greedy = GenerateOptions {
        sampling: SamplingParams::greedy(),
        ..sampled(0)
    };
    let g1 = generator
        .generate(&messages, &greedy, &mut |_| true)
        .unwrap();
    let g2 = generator
        .generate(
            &messages,
            &GenerateOptions {
                seed: 99,
                ..greedy.clone()
            },
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(g1.text, g2.text, "greedy ignores the seed");
    assert!(matches!(g1.stop, StopReason::Eos | StopReason::Length));
}

/// Greedy decoding with classifier-free guidance, done by hand: one session on the prompt, one
/// on the unconditional prompt, log-softmaxes combined as `u + scale (c - u)` in f64, padding
/// rows and UTF-8-breaking tokens ruled out as the generator does.
fn guided_by_hand(
    generator: &Generator,
    cond: &[u32],
    uncond: &[u32],
    scale: f64,
    n: usize,
) -> Vec<u32> {
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        x.iter().map(|&v| v as f64 - max - sum.ln()).collect()
    };
    let guard = kaiwa::model::utf8::Utf8Guard::new(generator.tokenizer());
    let text_vocab = generator.tokenizer().vocab_size();
    let mut a = generator.decoder().session().unwrap();
    let mut b = generator.decoder().session().unwrap();
    let (mut la, mut lb) = (a.forward(cond).unwrap(), b.forward(uncond).unwrap());
    let (mut out, mut owed) = (Vec::new(), 0);
    for _ in 0..n {
        let (c, u) = (log_softmax(&la), log_softmax(&lb));
        let mut mixed: Vec<f32> = c
            .iter()
            .zip(&u)
            .enumerate()
            .map(|(i, (&c, &u))| {
                if i < text_vocab {
                    (u + scale * (c - u)) as f32
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        guard.mask(owed, &mut mixed);
        let token = kaiwa::model::sampler::argmax(&mixed);
        owed = guard.advance(owed, token);
        out.push(token);
        la = a.forward(&[token]).unwrap();
        lb = b.forward(&[token]).unwrap();
    }
    out
}

#[test]
fn guidance_contrasts_the_conversation_with_its_last_user_message_emptied() {
    let dir = tempfile::tempdir().unwrap();
    // Weights 25× the usual scale, so that a random model's next token depends on the prompt
    // (at 0.02 every position predicts about the same).
    let config = LlamaConfig {
        initializer_range: Some(0.5),
        ..LlamaConfig::preset(Preset::Tiny)
    };
    init_model_dir(config, 7, dir.path()).unwrap();
    let generator = Generator::load(dir.path()).unwrap();
    let messages = vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("hello"),
        ChatMessage::assistant("hi!"),
        ChatMessage::user("今日の天気はどうですか？"),
    ];
    let options = |guidance_scale| GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_new_tokens: 16,
        guidance_scale,
        ..Default::default()
    };
    let run = |messages: &[ChatMessage], scale| {
        generator
            .generate(messages, &options(scale), &mut |_| true)
            .unwrap()
    };
    let mut emptied = messages.clone();
    emptied[3].content.clear();
    let (cond, _) = generator.prompt_tokens(&messages, 16).unwrap();
    let (uncond, _) = generator.prompt_tokens(&emptied, 16).unwrap();

    let plain = run(&messages, 1.0);
    let guided = run(&messages, 3.0);
    let expected = guided_by_hand(&generator, &cond, &uncond, 3.0, 16);
    assert_eq!(guided.tokens[..], expected[..guided.tokens.len()]);
    assert!(guided.tokens.len() == 16 || guided.stop == StopReason::Eos);
    assert_eq!(
        guided.prompt_tokens,
        cond.len(),
        "the reply follows the real prompt"
    );
    assert_ne!(
        guided.tokens, plain.tokens,
        "guidance changes this model's greedy reply"
    );

    // Contrasting with another prompt (the last user turn dropped) would decode differently.
    let dropped = &messages[..3];
    let (other, _) = generator.prompt_tokens(dropped, 16).unwrap();
    assert_ne!(guided_by_hand(&generator, &cond, &other, 3.0, 16), expected);

    // Scale 1 is no guidance, and a conversation without a user message has nothing to
    // contrast, so both give the plain reply.
    let system_only = [ChatMessage::system("Say something.")];
    assert_eq!(run(&system_only, 3.0).tokens, run(&system_only, 1.0).tokens);
    let bad = GenerateOptions {
        guidance_scale: f32::NAN,
        ..options(1.0)
    };
    assert!(generator.generate(&messages, &bad, &mut |_| true).is_err());
}

#[test]
fn the_callback_can_cancel_generation() {
    let dir = tempfile::tempdir().unwrap();
    init_tiny(dir.path());
    let generator = Generator::load(dir.path()).unwrap();
    let mut calls = 0;
    let g = generator
        .generate(
            &[ChatMessage::user("hello there")],
            &GenerateOptions {
                max_new_tokens: 64,
                ..sampled(3)
            },
            &mut |_| {
                calls += 1;
                false
            },
        )
        .unwrap();
    // Seed 3 makes this model emit text before any end-of-sequence token.
    assert_eq!(g.stop, StopReason::Cancelled);
    assert_eq!(calls, 1, "no text after the callback said stop");
}

#[test]
fn a_long_conversation_is_cut_from_the_oldest_turns_keeping_the_system_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LlamaConfig::preset(Preset::Tiny);
    config.max_position_embeddings = 96;
    init_model_dir(config, 1, dir.path()).unwrap();
    let generator = Generator::load(dir.path()).unwrap();
    assert_eq!(generator.context_len(), 96);
    let mut messages = vec![ChatMessage::system("SYSTEM-RULES")];
    for i in 0..30 {
        messages.push(ChatMessage::user(format!(
            "question number {i} about the weather"
        )));
        messages.push(ChatMessage::assistant(format!(
            "answer number {i}: it is sunny"
        )));
    }
    messages.push(ChatMessage::user("LAST-QUESTION"));
    let (ids, dropped) = generator.prompt_tokens(&messages, 16).unwrap();
    assert!(dropped > 0);
    assert!(ids.len() <= 96 - 16);
    let text = generator.tokenizer().decode(&ids, false).unwrap();
    assert!(text.contains("SYSTEM-RULES"), "{text}");
    assert!(text.contains("LAST-QUESTION"), "{text}");
    assert!(!text.contains("question number 0 "), "{text}");
    let g = generator
        .generate(
            &messages,
            &GenerateOptions {
                max_new_tokens: 16,
                ..sampled(1)
            },
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(g.dropped_messages, dropped);
    assert!(g.prompt_tokens + g.new_tokens <= 96);

    // A single message longer than the context keeps its end.
    let huge = "天気 ".repeat(400) + "END";
    let (ids, _) = generator
        .prompt_tokens(&[ChatMessage::user(huge)], 16)
        .unwrap();
    assert!(ids.len() <= 80);
    assert!(generator
        .tokenizer()
        .decode(&ids, false)
        .unwrap()
        .contains("END"));
}

#[test]
fn missing_or_corrupt_files_are_clear_errors() {
    let missing = Generator::load(Path::new("/nonexistent/kaiwa-model")).unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/kaiwa-model"),
        "{missing}"
    );

    let dir = tempfile::tempdir().unwrap();
    init_tiny(dir.path());

    std::fs::write(dir.path().join("model.onnx"), b"not a protobuf at all").unwrap();
    let err = Generator::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::OnnxLoad { .. }), "{err}");
    assert!(err.to_string().contains("model.onnx"), "{err}");

    std::fs::write(dir.path().join("tokenizer.json"), b"{ broken").unwrap();
    let err = Generator::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::write(
        dir.path().join("config.json"),
        b"{\"vocab_size\": \"many\"}",
    )
    .unwrap();
    let err = kaiwa::model::load_config(dir.path()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");

    let config = tiny_config();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    let err = LlamaWeights::load(&config, &dir.path().join("model.safetensors")).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // Weights of the wrong shape name the tensor.
    let other = tempfile::tempdir().unwrap();
    kaiwa::train::init::random_weights(&mha_untied_config(), 1)
        .save(&other.path().join("w.safetensors"))
        .unwrap();
    let err = LlamaWeights::load(&config, &other.path().join("w.safetensors")).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.0.self_attn.k_proj.weight"),
        "{err}"
    );
}

#[test]
fn a_graph_outside_the_convention_lists_what_was_expected_and_found() {
    let config = tiny_config();
    let weights = kaiwa::train::init::random_weights(&config, 1);
    let mut proto = build_model(&config, &weights, &ExportOptions::default());
    let graph = proto.graph.as_mut().unwrap();
    // Rename the token input, as a graph from another convention would have it.
    graph.input[0].name = "tokens".into();
    for node in &mut graph.node {
        for i in &mut node.input {
            if i == "input_ids" {
                *i = "tokens".into();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, prost::Message::encode_to_vec(&proto)).unwrap();
    let err = kaiwa::model::OnnxDecoder::load(&path, None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::OnnxInterface { .. }), "{msg}");
    assert!(
        msg.contains("no `input_ids` input") && msg.contains("\"tokens\""),
        "{msg}"
    );
    assert!(msg.contains("unexpected inputs"), "{msg}");
}

#[test]
fn generate_command_prints_only_the_reply_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    init_tiny(dir.path());
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_kaiwa"))
            .args(["generate", "--model"])
            .arg(dir.path())
            .args([
                "--prompt",
                "こんにちは",
                "--seed",
                "5",
                "--temperature",
                "0.8",
                "--max-new-tokens",
                "12",
            ])
            .output()
            .unwrap()
    };
    let a = run();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let stdout = String::from_utf8(a.stdout.clone()).unwrap();
    assert!(
        !stdout.contains("<|im_start|>") && !stdout.contains("INFO"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&a.stderr).contains("generated"),
        "the log line goes to stderr"
    );
    assert_eq!(a.stdout, run().stdout, "--seed reproduces the reply");

    let bad = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args(["generate", "--model", "/nonexistent/dir", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/dir"));
}

#[test]
fn chat_command_keeps_memory_resets_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    init_tiny(dir.path());
    let generator = Generator::load(dir.path()).unwrap();
    let mut input = "hello\nhow are you?\n/reset\n元気？\n/exit\nnever read\n".as_bytes();
    let mut output = Vec::new();
    let options = GenerateOptions {
        max_new_tokens: 8,
        ..sampled(2)
    };
    // The model's reply alone: the engine in generate mode, with nothing to retrieve.
    let engine = ReplyEngine::new(EngineSettings {
        mode: EngineMode::Generate,
        ..EngineSettings::default()
    });
    let mut nothing = |_: &str| -> Result<Retrieval, EngineError> { Ok(Retrieval::default()) };
    let history = Chat {
        generator: &generator,
        engine: &engine,
        retrieve: &mut nothing,
        system: Some("be brief"),
        options: &options,
        style: ChatStyle::Terminal,
    }
    .run(&mut input, &mut output)
    .unwrap();
    let out = String::from_utf8(output).unwrap();
    assert!(out.contains("(conversation cleared)"), "{out}");
    assert_eq!(input, b"never read\n", "/exit stops reading");
    let roles: Vec<&str> = history.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(
        roles,
        ["system", "user", "assistant"],
        "/reset kept only the system prompt"
    );
    assert_eq!(history[1].content, "元気？");

    // Without /reset, every turn stays in memory until end of input.
    let mut input = "hello\nhow are you?\n".as_bytes();
    let history = Chat {
        generator: &generator,
        engine: &engine,
        retrieve: &mut nothing,
        system: None,
        options: &options,
        style: ChatStyle::Terminal,
    }
    .run(&mut input, &mut Vec::new())
    .unwrap();
    let roles: Vec<&str> = history.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
}

/// A directory laid out as Hugging Face Optimum and newer `transformers` write it: the graph in
/// `onnx/model.onnx` with its inputs in another order (Optimum's GPT-2 export puts the past
/// between `input_ids` and `attention_mask`) and no `position_ids`, the chat template in
/// `chat_template.jinja`, and no `config.json` or `generation_config.json`.
#[test]
fn an_optimum_style_directory_runs() {
    let source = tempfile::tempdir().unwrap();
    init_tiny(source.path());
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        source.path().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let mut tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(source.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let template = tc.as_object_mut().unwrap().remove("chat_template").unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        template.as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), tc.to_string()).unwrap();

    let config = kaiwa::model::load_config(source.path()).unwrap();
    let weights = LlamaWeights::load(&config, &source.path().join("model.safetensors")).unwrap();
    let mut proto = build_model(
        &config,
        &weights,
        &ExportOptions {
            position_ids: false,
            ..Default::default()
        },
    );
    let inputs = &mut proto.graph.as_mut().unwrap().input;
    let mask = inputs.remove(1);
    inputs.push(mask);
    assert_eq!(inputs[1].name, "past_key_values.0.key");
    std::fs::create_dir(dir.path().join("onnx")).unwrap();
    std::fs::write(
        dir.path().join("onnx/model.onnx"),
        prost::Message::encode_to_vec(&proto),
    )
    .unwrap();

    let generator = Generator::load(dir.path()).unwrap();
    assert!(!generator.decoder().takes_position_ids());
    assert_eq!(
        generator.context_len(),
        config.max_position_embeddings,
        "from tokenizer_config.json"
    );
    // Bound by name, the reordered graph computes what the reference computes.
    let toks = tokens(12, 200, 4);
    let expected = kaiwa::model::reference::ReferenceModel::new(&config, &weights).forward(&toks);
    let mut session = generator.decoder().session().unwrap();
    let got = session.forward_all(&toks).unwrap();
    for (g, e) in got.iter().zip(&expected) {
        assert!(max_abs_diff(g, e) < 1e-4);
    }
    let greedy = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_new_tokens: 10,
        ..Default::default()
    };
    let reply = generator
        .generate(&[ChatMessage::user("hello")], &greedy, &mut |_| true)
        .unwrap();
    let original = Generator::load(source.path()).unwrap();
    let expected_reply = original
        .generate(&[ChatMessage::user("hello")], &greedy, &mut |_| true)
        .unwrap();
    assert_eq!(
        reply.tokens, expected_reply.tokens,
        "same weights, same template, same reply"
    );
}
