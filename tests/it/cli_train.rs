//! `kaiwa train` as a user runs it: the real binary, Ctrl-C (SIGINT) part-way through, then
//! `--resume`; and the command's refusals.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kaiwa::model::chat_template::TokenizerConfig;
use kaiwa::train::bpe::{builtin_text, train_byte_level_bpe};

fn kaiwa() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kaiwa"));
    c.env("RUST_LOG", "warn");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tokenizer folder and a chat file in a temporary directory.
fn inputs(root: &Path) {
    let tok_dir = root.join("tok");
    std::fs::create_dir_all(&tok_dir).unwrap();
    train_byte_level_bpe(builtin_text().lines(), 512)
        .unwrap()
        .save(&tok_dir.join("tokenizer.json"))
        .unwrap();
    TokenizerConfig::chatml().save(&tok_dir).unwrap();
    let mut chat = String::new();
    for i in 0..40 {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("おはよう {i}")},
            {"role": "assistant", "content": "おはようございます。今日も一日がんばりましょう。"},
        ]});
        chat.push_str(&format!("{line}\n"));
    }
    std::fs::write(root.join("chat.jsonl"), chat).unwrap();
}

fn step_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
        .unwrap_or(0)
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run() {
    let root = tempfile::tempdir().unwrap();
    inputs(root.path());
    let out = root.path().join("run");
    let mut child = kaiwa()
        .args(["train", "--out"])
        .arg(&out)
        .args(["--tokenizer"])
        .arg(root.path().join("tok"))
        .args(["--data"])
        .arg(root.path().join("chat.jsonl"))
        .args([
            "--preset",
            "tiny",
            "--max-positions",
            "64",
            "--context",
            "32",
            "--batch",
            "4",
            "--steps",
            "200",
            "--warmup",
            "5",
            "--checkpoint-every",
            "1000",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once a few steps are done (well before the 200th).
    let deadline = Instant::now() + Duration::from_secs(120);
    while step_lines(&out) < 3 {
        assert!(Instant::now() < deadline, "no training steps within 120 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "kaiwa train exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill only sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let first = child.wait_with_output().unwrap();
    let log = stderr(&first);
    assert!(first.status.success(), "{log}");
    assert!(
        log.contains("stopped after") && log.contains("--resume"),
        "{log}"
    );
    let stopped_at = step_lines(&out);
    assert!((3..200).contains(&stopped_at), "stopped at {stopped_at}");
    assert!(out.join("checkpoint/state.json").exists());
    assert!(out.join("model/model.safetensors").exists());

    let resumed = kaiwa()
        .args(["train", "--resume", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stderr(&resumed).contains("trained 200/200 steps"),
        "{}",
        stderr(&resumed)
    );
    assert_eq!(step_lines(&out), 200);

    // The finished model answers through the normal runtime.
    let reply = kaiwa()
        .args(["generate", "--model"])
        .arg(out.join("model"))
        .args([
            "--prompt",
            "おはよう",
            "--max-new-tokens",
            "12",
            "--seed",
            "1",
        ])
        .output()
        .unwrap();
    assert!(reply.status.success(), "{}", stderr(&reply));
}

#[test]
fn train_refuses_a_run_without_budget_or_tokenizer() {
    let root = tempfile::tempdir().unwrap();
    inputs(root.path());
    let no_budget = kaiwa()
        .args(["train", "--out"])
        .arg(root.path().join("a"))
        .args(["--tokenizer"])
        .arg(root.path().join("tok"))
        .args(["--data"])
        .arg(root.path().join("chat.jsonl"))
        .output()
        .unwrap();
    assert!(!no_budget.status.success());
    assert!(
        stderr(&no_budget).contains("--steps"),
        "{}",
        stderr(&no_budget)
    );

    let no_tokenizer = kaiwa()
        .args(["train", "--out"])
        .arg(root.path().join("b"))
        .args(["--steps", "3", "--data"])
        .arg(root.path().join("chat.jsonl"))
        .output()
        .unwrap();
    assert!(!no_tokenizer.status.success());
    assert!(
        stderr(&no_tokenizer).contains("--tokenizer"),
        "{}",
        stderr(&no_tokenizer)
    );
}
