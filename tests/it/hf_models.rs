//! Models saved by Hugging Face `transformers` (`tests/data/hf`, written by `make_fixtures.py`)
//! export with `kaiwa export-onnx` and run through tract, with the KV cache, to the logits
//! `transformers` computed; what kaiwa cannot express is refused by name.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use crate::support::model::max_abs_diff;
use kaiwa::model::reference::ReferenceModel;
use kaiwa::model::{
    load_config, ChatMessage, ChatTemplate, GenerateOptions, Generator, LlamaWeights, OnnxDecoder,
    SamplingParams,
};

const TOLERANCE: f32 = 1e-4;

/// `reference.json`: the inputs and what `transformers` computed for them.
#[derive(serde::Deserialize)]
struct Reference {
    prefill_ids: Vec<u32>,
    decode_ids: Vec<u32>,
    /// One row per prefill position.
    prefill_logits: Vec<Vec<f32>>,
    /// One row per decode step, each after the prefill and the steps before it in the cache.
    decode_logits: Vec<Vec<f32>>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf")
}

/// A copy of the fixture `name` in a temp dir, so the export writes nothing into the tree.
fn fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn export(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .arg("export-onnx")
        .arg(dir)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn reference(dir: &Path) -> Reference {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

/// Exports the fixture with `kaiwa export-onnx`, runs the prefill and then each decode step
/// through tract with the cache, and compares every position with `transformers`' logits.
/// The plain-Rust reference forward pass must agree too.
fn matches_transformers(name: &str) {
    let dir = fixture(name);
    let out = export(dir.path());
    assert!(
        out.status.success(),
        "{name}: export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = reference(dir.path());
    let config = load_config(dir.path()).unwrap();
    let decoder = Arc::new(
        OnnxDecoder::load_with_threads(
            &dir.path().join("model.onnx"),
            Some((config.kv_heads(), config.head_dim())),
            1,
        )
        .unwrap(),
    );
    assert_eq!(decoder.vocab_size(), config.vocab_size);

    let mut session = decoder.session().unwrap();
    let mut got = session.forward_all(&expected.prefill_ids).unwrap();
    for &t in &expected.decode_ids {
        got.extend(session.forward_all(&[t]).unwrap());
    }
    let want: Vec<&Vec<f32>> = expected
        .prefill_logits
        .iter()
        .chain(&expected.decode_logits)
        .collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(
        want.len(),
        expected.prefill_ids.len() + expected.decode_ids.len()
    );
    let mut worst = 0.0f32;
    for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= TOLERANCE, "{name}: position {pos}: max |Δ| {d}");
        worst = worst.max(d);
    }
    // Logits that barely vary would make the comparison prove nothing.
    let spread = want[0].iter().cloned().fold(f32::MIN, f32::max)
        - want[0].iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 1.0, "{name}: logit spread {spread} is too small");

    let weights = LlamaWeights::load_dir(&config, dir.path()).unwrap();
    let ids: Vec<u32> = expected
        .prefill_ids
        .iter()
        .chain(&expected.decode_ids)
        .copied()
        .collect();
    let plain = ReferenceModel::new(&config, &weights).forward(&ids);
    for (pos, (p, w)) in plain.iter().zip(&want).enumerate() {
        let d = max_abs_diff(p, w);
        assert!(
            d <= TOLERANCE,
            "{name}: reference pass, position {pos}: {d}"
        );
    }
    eprintln!("{name}: worst |Δ| {worst:e} over {} positions", want.len());
}

#[test]
fn hf_llama_with_transformers_5_rope_parameters_matches_transformers() {
    matches_transformers("llama_rope_parameters");
}

#[test]
fn hf_llama_with_head_dim_and_tied_head_matches_transformers() {
    matches_transformers("llama_head_dim");
}

#[test]
fn hf_qwen2_with_qkv_biases_matches_transformers() {
    matches_transformers("qwen2");
}

#[test]
fn hf_mistral_in_bf16_matches_transformers_in_f32() {
    matches_transformers("mistral_bf16");
}

#[test]
fn hf_llama_in_shards_matches_transformers() {
    matches_transformers("llama_sharded");
}

#[test]
fn hf_llama_in_f16_matches_transformers_in_f32() {
    matches_transformers("llama_f16");
}

/// Had the nested `rope_parameters.rope_theta` been ignored (as it once was), the logits would
/// differ: the fixture tells the RoPE bases apart.
#[test]
fn hf_llama_rope_base_changes_the_logits() {
    let dir = fixture("llama_rope_parameters");
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["rope_parameters"]["rope_theta"] = 10_000.0.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let config = load_config(dir.path()).unwrap();
    let weights = LlamaWeights::load_dir(&config, dir.path()).unwrap();
    let expected = reference(dir.path());
    let plain = ReferenceModel::new(&config, &weights).forward(&expected.prefill_ids);
    let d = max_abs_diff(
        plain.last().unwrap(),
        expected.prefill_logits.last().unwrap(),
    );
    assert!(d > 1e-2, "RoPE base 10 000 is only {d} away from 500 000");
}

/// The Mistral fixture's `sliding_window` (16) is shorter than its `max_position_embeddings`
/// (64): kaiwa runs it on 16 positions, where the window masks nothing, and all 16 agree with
/// the plain forward pass.
#[test]
fn hf_mistral_context_is_bounded_by_its_sliding_window() {
    let dir = fixture("mistral_bf16");
    let config = load_config(dir.path()).unwrap();
    assert_eq!(config.max_position_embeddings, 64);
    assert_eq!(config.context_len(), 16);
    assert!(export(dir.path()).status.success());
    let decoder = Arc::new(
        OnnxDecoder::load_with_threads(
            &dir.path().join("model.onnx"),
            Some((config.kv_heads(), config.head_dim())),
            1,
        )
        .unwrap()
        .with_positions(config.context_len()),
    );
    let ids: Vec<u32> = (0..16).map(|i| (i * 37 + 5) % 96).collect();
    let mut session = decoder.session().unwrap();
    let mut got = session.forward_all(&ids[..12]).unwrap();
    for &t in &ids[12..] {
        got.extend(session.forward_all(&[t]).unwrap());
    }
    let weights = LlamaWeights::load_dir(&config, dir.path()).unwrap();
    let plain = ReferenceModel::new(&config, &weights).forward(&ids);
    for (pos, (g, p)) in got.iter().zip(&plain).enumerate() {
        let d = max_abs_diff(g, p);
        assert!(d <= TOLERANCE, "position {pos}: {d}");
    }
    // One token past the window is an error, not a read past the rotary tables.
    let err = session.forward(&[1]).unwrap_err();
    assert!(err.to_string().contains("16 positions"), "{err}");
    let err = decoder
        .session()
        .unwrap()
        .forward(&ids.repeat(2))
        .unwrap_err();
    assert!(err.to_string().contains("32 tokens"), "{err}");
}

/// The weights of a sharded directory are found on first load too (the path `Generator::load`
/// takes), not only by `export-onnx`.
#[test]
fn hf_sharded_weights_are_exported_on_first_load() {
    let dir = fixture("llama_sharded");
    assert!(!dir.path().join("model.safetensors").exists());
    let graph = kaiwa::model::ensure_onnx(dir.path()).unwrap();
    assert_eq!(graph, dir.path().join("model.onnx"));
    assert!(graph.is_file());
}

#[test]
fn hf_yarn_rope_scaling_is_refused_by_name() {
    let dir = fixture("llama_rope_scaling_yarn");
    let out = export(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a YaRN model was exported: {stderr}");
    assert!(
        stderr.contains("rope_scaling") && stderr.contains("yarn"),
        "{stderr}"
    );
    assert!(
        stderr.contains("config.json"),
        "the file is named: {stderr}"
    );
    assert!(!dir.path().join("model.onnx").exists());
}

#[test]
fn hf_family_kaiwa_does_not_run_is_refused_by_name() {
    let dir = fixture("qwen2");
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["model_type"] = "qwen3".into();
    json["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
    std::fs::write(&path, json.to_string()).unwrap();
    let out = export(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("model_type \"qwen3\""), "{stderr}");
}

/// Weights the config does not account for would be left out of the computation: a Qwen2's
/// biases under a config that says Llama are refused, not dropped.
#[test]
fn hf_tensors_the_config_does_not_account_for_are_refused() {
    let dir = fixture("qwen2");
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["model_type"] = "llama".into();
    json["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    std::fs::write(&path, json.to_string()).unwrap();
    let out = export(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("self_attn.k_proj.bias"), "{stderr}");
}

#[test]
fn hf_a_broken_shard_index_is_an_error_not_a_panic() {
    let dir = fixture("llama_sharded");
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}"#,
    )
    .unwrap();
    let out = export(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("elsewhere.safetensors"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    std::fs::write(&index, "{\"weight_map\": 3}").unwrap();
    let out = export(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !stderr.contains("panicked"));
    assert!(stderr.contains("model.safetensors.index.json"), "{stderr}");
}

/// `chat_reference.json` (`make_chat_fixtures.py`): conversations and what `transformers` made
/// of them with the directory's own tokenizer and chat template.
#[derive(serde::Deserialize)]
struct ChatReference {
    cases: Vec<ChatCase>,
}

#[derive(serde::Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    /// `apply_chat_template(…, add_generation_prompt=True, tokenize=False)`.
    text: String,
    /// The same, tokenized.
    ids: Vec<u32>,
    /// `tokenizer.decode(ids)`.
    decoded: String,
    /// Six tokens of greedy `generate` after the prompt, ignoring end-of-sequence.
    greedy: Vec<u32>,
}

/// A model brought from the ecosystem is talked to with its own tokenizer and chat template:
/// kaiwa's prompt is token for token the one `transformers` builds (English, Japanese, a system
/// prompt or the template's default one, characters the vocabulary lacks), and greedy replies
/// pick the same tokens, through `Generator` as the bot, the web and eval use it.
fn chats_like_transformers(name: &str) {
    let dir = fixture(name);
    let reference: ChatReference = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("chat_reference.json")).unwrap(),
    )
    .unwrap();
    let generator = Generator::load_with_threads(dir.path(), 1).unwrap();
    let template = ChatTemplate::from_dir(dir.path()).unwrap();
    let eos = load_config(dir.path()).unwrap().eos_ids();
    let greedy = GenerateOptions {
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        },
        max_new_tokens: 6,
        ..GenerateOptions::default()
    };
    for (i, case) in reference.cases.iter().enumerate() {
        let text = template.render(&case.messages, true).unwrap();
        assert_eq!(text, case.text, "{name} case {i}: prompt text");
        let (ids, dropped) = generator.prompt_tokens(&case.messages, 0).unwrap();
        assert_eq!(dropped, 0);
        assert_eq!(ids, case.ids, "{name} case {i}: prompt ids");
        let decoded = generator.tokenizer().decode(&ids, false).unwrap();
        assert_eq!(decoded, case.decoded, "{name} case {i}: decoded prompt");

        // Greedy decoding through the cache picks what transformers picks, step by step.
        let mut session = generator.decoder().session().unwrap();
        let mut logits = session.forward(&ids).unwrap();
        let mut picked = Vec::new();
        for _ in 0..case.greedy.len() {
            let best = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap() as u32;
            picked.push(best);
            logits = session.forward(&[best]).unwrap();
        }
        assert_eq!(picked, case.greedy, "{name} case {i}: greedy tokens");

        // And a reply through the generator, as the bot and the web ask for one. (Its tokens
        // may part from the reference: kaiwa never lets a reply end inside a character, and a
        // random model's bytes often would.)
        let reply = generator
            .generate(&case.messages, &greedy, &mut |_| true)
            .unwrap();
        assert!(reply.tokens.len() <= 6 && !reply.tokens.iter().any(|t| eos.contains(t)));
        assert_eq!(reply.prompt_tokens, case.ids.len());
        assert_eq!(
            reply.text,
            generator.tokenizer().decode(&reply.tokens, true).unwrap(),
            "{name} case {i}"
        );
    }
}

#[test]
fn hf_chat_smollm2_style_byte_level_bpe_and_chatml_in_tokenizer_config() {
    chats_like_transformers("chat_smollm2");
}

#[test]
fn hf_chat_qwen2_style_template_in_chat_template_jinja() {
    chats_like_transformers("chat_qwen2");
}

#[test]
fn hf_chat_tinyllama_style_sentencepiece_bpe_with_byte_fallback_and_zephyr() {
    chats_like_transformers("chat_tinyllama");
}

/// `kaiwa chat` (the reply engine: retrieval, generation and ranking, as in the bots) answers
/// through a model brought from the ecosystem, in its own template, one reply a line.
#[test]
fn hf_chat_model_answers_through_the_reply_engine() {
    let dir = fixture("chat_qwen2");
    let store = tempfile::tempdir().unwrap();
    let out = crate::support::model::chat_through_pipe(
        dir.path(),
        &store.path().join("kaiwa.db"),
        "今日の天気はどうですか？\nWhat is the weather like today?\n",
        8,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2, "{stdout:?} {stderr}");
}

/// The trainer's model (burn) computes what `transformers` computes for each family, Qwen2's
/// biases included, and gives back exactly the tensors it was given: `kaiwa train --init` on
/// such a directory fine-tunes that model, not another one.
#[test]
fn hf_trainable_model_matches_transformers_for_every_family() {
    let device = burn::tensor::Device::flex().autodiff();
    for name in [
        "llama_rope_parameters",
        "llama_head_dim",
        "qwen2",
        "mistral_bf16",
    ] {
        let dir = fixtures().join(name);
        let config = load_config(&dir).unwrap();
        let weights = LlamaWeights::load_dir(&config, &dir).unwrap();
        let model = kaiwa::train::model::Llama::from_weights(&config, &weights, &device);
        assert!(
            kaiwa::train::convert::to_weights(&model, &config).unwrap() == weights,
            "{name}: weights changed on the way through burn"
        );
        let expected = reference(&dir);
        let rows = crate::support::model::burn_logits(&model, &expected.prefill_ids, &device);
        for (pos, (got, want)) in rows.iter().zip(&expected.prefill_logits).enumerate() {
            let d = max_abs_diff(got, want);
            assert!(d <= TOLERANCE, "{name}: position {pos}: {d}");
        }
    }
}

/// `kaiwa train --init` on a Qwen2 chat model: its biases are trained with the rest, and the
/// result keeps its tokenizer and chat template, exports and answers.
#[test]
fn hf_qwen2_fine_tunes_with_its_biases_tokenizer_and_template() {
    let base = fixture("chat_qwen2");
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("train.jsonl");
    let mut lines = String::new();
    for i in 0..16 {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("今日の天気はどうですか？ ({i})")},
            {"role": "assistant", "content": "晴れていて暖かいですよ。"},
        ]});
        lines.push_str(&format!("{line}\n"));
    }
    std::fs::write(&data, lines).unwrap();
    let run = work.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args([
            "train",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--batch",
            "4",
            "--context",
            "64",
        ])
        .arg("--init")
        .arg(base.path())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = run.join("model");
    let config = load_config(&model).unwrap();
    assert_eq!(config.family().unwrap(), kaiwa::model::Family::Qwen2);
    let before = LlamaWeights::load_dir(&config, base.path()).unwrap();
    let after = LlamaWeights::load_dir(&config, &model).unwrap();
    let (b, a) = (
        before.layers[0].qkv_bias.as_ref().unwrap(),
        after.layers[0].qkv_bias.as_ref().unwrap(),
    );
    assert_ne!(b.q, a.q, "the q bias was not trained");
    assert_ne!(b.v, a.v, "the v bias was not trained");
    for file in ["tokenizer.json", "chat_template.jinja"] {
        assert_eq!(
            std::fs::read(base.path().join(file)).unwrap(),
            std::fs::read(model.join(file)).unwrap(),
            "{file}"
        );
    }
    // The trained model, exported with its biases, computes what the reference pass does.
    let generator = Generator::load_with_threads(&model, 1).unwrap();
    let messages = [ChatMessage {
        role: "user".into(),
        content: "今日の天気はどうですか？".into(),
    }];
    let (ids, _) = generator.prompt_tokens(&messages, 0).unwrap();
    let mut session = generator.decoder().session().unwrap();
    let got = session.forward_all(&ids).unwrap();
    let plain = ReferenceModel::new(&config, &after).forward(&ids);
    for (pos, (g, p)) in got.iter().zip(&plain).enumerate() {
        let d = max_abs_diff(g, p);
        assert!(d <= TOLERANCE, "position {pos}: {d}");
    }
}
