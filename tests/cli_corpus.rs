//! `kaiwa import` and `kaiwa export-corpus` as a user runs them: the real binary on a store that
//! `DATABASE_URL` names, with the hand-written sample of every import format in
//! `tests/data/import/`.

use std::path::Path;
use std::process::{Command, Output};

fn kaiwa(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args(args)
        .env("DATABASE_URL", format!("sqlite://{}", db.display()))
        .env("RUST_LOG", "warn")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kaiwa")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SAMPLES: [(&str, &str); 8] = [
    ("chatterbot_food.yml", "chatterbot"),
    ("openai.jsonl", "openai"),
    ("sharegpt.json", "sharegpt"),
    ("telegram_result.json", "telegram"),
    ("telegram_full_export.json", "telegram"),
    ("discord_export.json", "discord"),
    ("qa.csv", "csv"),
    ("transcript.txt", "text"),
];

#[test]
fn every_sample_imports_once_and_the_store_exports_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kaiwa.db");
    for (file, format) in SAMPLES {
        let path = format!("tests/data/import/{file}");
        let first = kaiwa(&db, &["import", &path, "--format", format]);
        assert!(first.status.success(), "{file}: {}", stderr(&first));
        assert!(stderr(&first).contains("imported"), "{}", stderr(&first));
        let again = kaiwa(&db, &["import", &path, "--format", format]);
        assert!(again.status.success(), "{file}: {}", stderr(&again));
        assert!(
            stderr(&again).contains(": 0 messages in 0 conversations"),
            "{file} imported twice: {}",
            stderr(&again)
        );
    }
    let stats = kaiwa(&db, &["stats"]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert!(stats["messages"].as_i64().unwrap() > 30, "{stats}");

    for (format, mode, file) in [
        ("openai", "bot", "train.jsonl"),
        ("sharegpt", "all", "train.jsonl"),
        ("text", "all", "train.txt"),
    ] {
        let out = dir.path().join(format!("{format}-{mode}"));
        let o = kaiwa(
            &db,
            &[
                "export-corpus",
                "--out",
                out.to_str().unwrap(),
                "--format",
                format,
                "--mode",
                mode,
                "--redact",
                "--anonymize",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let written = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(!written.trim().is_empty(), "{format} {mode}: empty");
        assert!(out.join("data_card.md").exists() && out.join("summary.json").exists());
        assert!(!out.join(format!("{file}.partial")).exists());
    }
}

#[test]
fn a_malformed_record_is_reported_with_its_line_and_strict_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kaiwa.db");
    let path = "tests/data/import/openai.jsonl";
    let strict = kaiwa(&db, &["import", path, "--format", "openai", "--strict"]);
    assert!(!strict.status.success());
    assert!(stderr(&strict).contains("line 4"), "{}", stderr(&strict));
    let stats = kaiwa(&db, &["stats"]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["messages"], 0, "a failed import left rows behind");

    let lenient = kaiwa(&db, &["import", path, "--format", "openai"]);
    assert!(lenient.status.success(), "{}", stderr(&lenient));
    assert!(stderr(&lenient).contains("skipped"), "{}", stderr(&lenient));
    assert!(stderr(&lenient).contains("line 4"), "{}", stderr(&lenient));

    let missing = kaiwa(&db, &["import", "no/such/file.jsonl", "--format", "openai"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no/such/file.jsonl"),
        "{}",
        stderr(&missing)
    );
    let wrong = kaiwa(
        &db,
        &["import", "tests/data/import/qa.csv", "--format", "telegram"],
    );
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("qa.csv"), "{}", stderr(&wrong));
}
