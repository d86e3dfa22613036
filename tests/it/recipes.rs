//! The round trip `recipes/README.md` describes, at toy size on the CPU: `kaiwa import` →
//! `kaiwa export-corpus --format openai` → `recipes/sft_trl.py` (TRL's `SFTTrainer`) →
//! `kaiwa export-onnx` → `kaiwa chat`. TRL pulls in torch (about 5 GB installed), so the test is
//! skipped where `trl` is missing, and fails for it only with `KAIWA_TEST_TRL=1`.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::model::max_abs_diff;
use kaiwa::model::{ChatMessage, ChatTemplate, Generator};

fn kaiwa(db: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args(args)
        .env("DATABASE_URL", format!("sqlite://{}", db.display()))
        .env("RUST_LOG", "warn")
        .current_dir(db.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kaiwa {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Short English and Japanese dialogues as OpenAI JSONL, as a chat export might hold them.
fn dialogues(n: usize) -> String {
    (0..n)
        .map(|i| {
            let (q, a) = if i % 2 == 0 {
                (
                    format!("Tell me about topic {i}."),
                    format!("Topic {i} is fun."),
                )
            } else {
                (format!("{i}番の話をして。"), format!("{i}番は楽しいです。"))
            };
            serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a}
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// Every tensor of a safetensors file, by name: (dtype, shape, bytes).
fn tensors(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = format!("{:?}", view.dtype());
            (name, dtype, view.shape().to_vec(), view.data().to_vec())
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// A chat model fine-tuned by the recipe on kaiwa's export (three steps, a tiny Llama with
/// SmolLM2's tokenizer layout) comes back with changed weights and the same tokenizer and chat
/// template, exports, computes what `transformers` computes for it, and answers in `kaiwa chat`.
#[test]
fn a_model_fine_tuned_by_the_trl_recipe_exports_and_chats() {
    let Some(python) = crate::support::python_with_opt_in(
        "trl",
        "pip install -r recipes/requirements.txt",
        "KAIWA_TEST_TRL",
    ) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kaiwa.db");
    let chats = dir.path().join("chats.jsonl");
    std::fs::write(&chats, dialogues(24)).unwrap();
    kaiwa(
        &db,
        &["import", chats.to_str().unwrap(), "--format", "openai"],
    );
    let corpus = dir.path().join("corpus");
    kaiwa(
        &db,
        &[
            "export-corpus",
            "--format",
            "openai",
            "--val-fraction",
            "0.25",
            "--out",
            corpus.to_str().unwrap(),
        ],
    );
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(corpus.join("summary.json")).unwrap())
            .unwrap();
    assert!(
        split["validation"]["examples"].as_u64().unwrap() > 0,
        "{split}"
    );

    // The fixture without its test reference, as a user's download would be.
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    let fixture = root.join("tests/data/hf/chat_smollm2");
    for name in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture.join(name), base.join(name)).unwrap();
    }
    let tuned = dir.path().join("tuned");
    let started = std::time::Instant::now();
    let trained = Command::new(&python)
        .arg(root.join("recipes/sft_trl.py"))
        .args(["--model", base.to_str().unwrap()])
        .args(["--data", corpus.to_str().unwrap()])
        .args(["--out", tuned.to_str().unwrap()])
        .args(["--max-steps", "3", "--lr", "1e-2", "--batch-size", "4"])
        .args(["--no-bf16", "--seed", "7", "--logging-steps", "1"])
        // The CPU, one thread, nothing from the network: the same steps on every machine.
        .env("CUDA_VISIBLE_DEVICES", "")
        .env("OMP_NUM_THREADS", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.path().join("hf"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&trained.stderr);
    assert!(trained.status.success(), "sft_trl.py: {stderr}");
    eprintln!("sft_trl.py: {:.1} s", started.elapsed().as_secs_f64());
    let stdout = String::from_utf8(trained.stdout).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(summary["steps"], 3, "{summary}");
    assert_eq!(summary["examples"]["train"], split["train"]["examples"]);
    assert_eq!(
        summary["examples"]["validation"],
        split["validation"]["examples"]
    );
    assert!(summary["validation_loss"].as_f64().unwrap().is_finite());

    // Training moved every weight, and nothing was added, dropped or retyped.
    let before = tensors(&base.join("model.safetensors"));
    let after = tensors(&tuned.join("model.safetensors"));
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&b.0, &b.1, &b.2), (&a.0, &a.1, &a.2));
        assert_ne!(b.3, a.3, "{} did not change", b.0);
    }

    // The tokenizer and chat template came along: the same prompt as the base model's.
    assert!(tuned.join("tokenizer.json").is_file());
    let messages = [
        ChatMessage::user("Tell me about topic 30."),
        ChatMessage::assistant("Topic 30 is fun."),
        ChatMessage::user("31番の話をして。"),
    ];
    let prompt = ChatTemplate::from_dir(&tuned)
        .unwrap()
        .render(&messages, true)
        .unwrap();
    let base_prompt = ChatTemplate::from_dir(&base)
        .unwrap()
        .render(&messages, true)
        .unwrap();
    assert_eq!(prompt, base_prompt);

    // kaiwa exports what TRL saved and computes what transformers computes for it.
    let exported = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .arg("export-onnx")
        .arg(&tuned)
        .output()
        .unwrap();
    assert!(
        exported.status.success(),
        "export-onnx: {}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let generator = Generator::load_with_threads(&tuned, 1).unwrap();
    let (ids, dropped) = generator.prompt_tokens(&messages, 0).unwrap();
    assert_eq!(dropped, 0);
    let got = generator
        .decoder()
        .session()
        .unwrap()
        .forward_all(&ids)
        .unwrap();
    let reference = Command::new(&python)
        .arg(root.join("tests/python/hf_logits.py"))
        .arg(&tuned)
        .args(ids.iter().map(u32::to_string))
        .env("CUDA_VISIBLE_DEVICES", "")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        reference.status.success(),
        "hf_logits.py: {}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let want: Vec<Vec<f32>> = serde_json::from_slice(&reference.stdout).unwrap();
    assert_eq!(got.len(), want.len());
    for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= 1e-4, "position {pos}: max |Δ| {d}");
    }

    // And it answers, one reply a line, through the reply engine (on an empty store, where
    // nothing can be retrieved: the replies are the model's).
    let out = crate::support::model::chat_through_pipe(
        &tuned,
        &dir.path().join("chat.db"),
        "Tell me about topic 4.\n4番の話をして。\n",
        8,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2, "{stdout:?} {stderr}");
}
