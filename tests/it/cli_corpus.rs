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
        // Nothing half-written is left beside the files (fsio::AtomicFile's temporary names).
        let left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") || n.ends_with(".partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
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

#[test]
fn derive_dialogue_reads_compressed_pairs_and_refuses_bad_options_with_an_error() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.tsv.gz");
    let mut text = String::from(
        "今日の天気はどうですか。\tWhat's the weather like today?\n\
         今日は天気が悪い。\tThe weather is bad today.\n\
         「ありがとう」「どう致しまして」\t\"Thank you.\" \"You're welcome.\"\n\
         not a pair\n",
    );
    for i in 0..100 {
        text.push_str(&format!("番号{i}の箱です。\tThis is box number {i}.\n"));
    }
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&pairs).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
    let db = dir.path().join("unused.db");
    let out = dir.path().join("derived");
    let pairs_arg = pairs.to_str().unwrap();
    let out_arg = out.to_str().unwrap();
    let o = kaiwa(
        &db,
        &[
            "derive-dialogue",
            "--pairs",
            pairs_arg,
            "--out",
            out_arg,
            "--system",
            "Be kind.",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 written exchanges and 1 retrieved replies (of 1 questions)")
            && stderr(&o).contains("(1 malformed lines skipped)"),
        "{}",
        stderr(&o)
    );
    let lines = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join(name))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let replies = lines("replies_ja.jsonl");
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["messages"][0]["content"], "Be kind.");
    assert_eq!(
        replies[0]["messages"][1]["content"],
        "今日の天気はどうですか。"
    );
    assert_eq!(replies[0]["messages"][2]["content"], "今日は天気が悪い。");
    assert_eq!(replies[0]["meta"]["lines"], serde_json::json!([1, 2]));
    assert_eq!(
        lines("exchanges_en.jsonl")[0]["messages"][2]["content"],
        "You're welcome."
    );

    for bad in [
        vec!["--max-reuse", "0"],
        vec!["--min-score", "0.9", "--max-score", "0.5"],
    ] {
        let mut args = vec!["derive-dialogue", "--pairs", pairs_arg, "--out", out_arg];
        args.extend(bad.iter().copied());
        let o = kaiwa(&db, &args);
        assert_eq!(o.status.code(), Some(1), "{bad:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("deriving dialogue from"),
            "{}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let missing = dir.path().join("missing.tsv");
    let o = kaiwa(
        &db,
        &[
            "derive-dialogue",
            "--pairs",
            missing.to_str().unwrap(),
            "--out",
            out_arg,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("missing.tsv"), "{}", stderr(&o));
}
