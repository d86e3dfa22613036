//! The corpus path end to end, on SQLite files in temp dirs: `kaiwa import` into the store,
//! `kaiwa export-corpus` out of it, and the properties a training set must have (valid lines,
//! alternating roles, consent, a split by conversation, duplicates, redaction, pseudonyms,
//! feedback, round trips). An independent reader (Python `datasets`) loads an export in CI.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use kaiwa::bot::event::{ChannelRef, ChatKind, Platform};
use kaiwa::corpus::export::{export, ExportFormat, ExportMode, ExportOptions};
use kaiwa::corpus::import::Format;
use kaiwa::corpus::ingest::{import_file, ImportOptions};
use kaiwa::store::{NewMessage, Store};
use serde_json::Value;

async fn store(dir: &Path) -> Store {
    Store::open(dir.join("kaiwa.db").to_str().unwrap())
        .await
        .unwrap()
}

fn write(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The (role, content) pairs of an example.
fn turns(example: &Value) -> Vec<(String, String)> {
    example["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The roles of a chat example are valid for chat templates and trainers: an optional system
/// prompt, then user and assistant alternating, starting with user, ending with assistant.
fn assert_valid_chat(example: &Value) {
    let t = turns(example);
    let body: Vec<&str> = t
        .iter()
        .map(|(r, _)| r.as_str())
        .skip_while(|r| *r == "system")
        .collect();
    assert!(!body.is_empty(), "{example}");
    assert_eq!(body[0], "user", "{example}");
    assert_eq!(*body.last().unwrap(), "assistant", "{example}");
    assert!(body.windows(2).all(|w| w[0] != w[1]), "{example}");
    assert!(t.iter().all(|(_, c)| !c.trim().is_empty()), "{example}");
}

const OPENAI: &str = r#"{"messages":[{"role":"system","content":"あなたは親切なアシスタントです。"},{"role":"user","content":"今日の天気はどうですか？"},{"role":"assistant","content":"晴れていて気持ちがいいですよ。"},{"role":"user","content":"散歩に行こうかな"},{"role":"assistant","content":"いいですね！"}]}
{"messages":[{"role":"user","content":"What's a good breakfast?"},{"role":"assistant","content":"Eggs and toast, or natto and rice."}]}
{"messages":[{"role":"user","content":"Do you like football?"},{"role":"assistant","content":"I do! Who is your team?"},{"role":"user","content":"Kawasaki Frontale."}]}
"#;

#[tokio::test]
async fn importing_the_same_file_twice_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).await;
    let file = write(dir.path(), "chat.jsonl", OPENAI);
    let first = import_file(&s, &file, &ImportOptions::new(Format::Openai))
        .await
        .unwrap();
    assert_eq!(
        (first.conversations, first.messages, first.skipped),
        (3, 10, 0)
    );
    assert_eq!(first.source, "import:openai:chat.jsonl");
    let again = import_file(&s, &file, &ImportOptions::new(Format::Openai))
        .await
        .unwrap();
    assert_eq!(
        (again.conversations, again.messages, again.duplicates),
        (0, 0, 10)
    );
    // The same dialogue through another format is the same conversation, too.
    let sharegpt = write(
        dir.path(),
        "same.json",
        r#"[{"conversations":[{"from":"human","value":"What's a good breakfast?"},{"from":"gpt","value":"Eggs and toast, or natto and rice."}]}]"#,
    );
    let third = import_file(&s, &sharegpt, &ImportOptions::new(Format::Sharegpt))
        .await
        .unwrap();
    assert_eq!((third.messages, third.duplicates), (0, 2));
    assert_eq!(s.stats().await.unwrap().messages, 10);
    assert_eq!(s.imports().await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_malformed_record_is_reported_and_skipped_and_strict_mode_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).await;
    let bad = format!("{OPENAI}{{\"messages\": [{{\"role\": \"user\", \"content\": \"cut off\n");
    let file = write(dir.path(), "bad.jsonl", &bad);

    let strict = ImportOptions {
        strict: true,
        ..ImportOptions::new(Format::Openai)
    };
    let err = import_file(&s, &file, &strict)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 4"), "{err}");
    assert_eq!(
        s.stats().await.unwrap().messages,
        0,
        "a failed import changed the store"
    );
    assert!(s.imports().await.unwrap().is_empty());

    let lenient = import_file(&s, &file, &ImportOptions::new(Format::Openai))
        .await
        .unwrap();
    assert_eq!((lenient.messages, lenient.skipped), (10, 1));
    assert!(
        lenient.errors[0].starts_with("line 4"),
        "{:?}",
        lenient.errors
    );
}

#[tokio::test]
async fn import_export_import_gives_the_same_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let source = write(dir.path(), "chat.jsonl", OPENAI);
    let options = ExportOptions::default();

    let first = store(&a).await;
    import_file(&first, &source, &ImportOptions::new(Format::Openai))
        .await
        .unwrap();
    export(&first, &a.join("out"), &options).await.unwrap();
    let exported = lines(&a.join("out/train.jsonl"));

    let second = store(&b).await;
    import_file(
        &second,
        &a.join("out/train.jsonl"),
        &ImportOptions::new(Format::Openai),
    )
    .await
    .unwrap();
    export(&second, &b.join("out"), &options).await.unwrap();
    let again = lines(&b.join("out/train.jsonl"));

    let set = |v: &[Value]| -> BTreeSet<Vec<(String, String)>> { v.iter().map(turns).collect() };
    assert_eq!(set(&exported), set(&again));
    // And both are the original file's dialogues (the last one without its unanswered turn).
    let original: Vec<Value> = OPENAI
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut expected = set(&original);
    let unanswered = expected.iter().find(|t| t.len() == 3).unwrap().clone();
    expected.remove(&unanswered);
    expected.insert(unanswered[..2].to_vec());
    assert_eq!(set(&exported), expected);
    for e in &exported {
        assert_valid_chat(e);
    }
}

/// A group chat with three people and the bot, collected live.
async fn group_chat(s: &Store) -> ChannelRef {
    let channel = ChannelRef::new(Platform::Discord, "900");
    let rows: [(&str, &str, &str, bool, &str, i64); 8] = [
        ("1", "u1", "Aki", false, "おはよう！今日は寒いね", 0),
        ("2", "u2", "Ben", false, "morning! yes, so cold", 10),
        ("3", "u1", "Aki", false, "/reset", 20),
        (
            "4",
            "kaiwa",
            "kaiwa",
            true,
            "温かいお茶はいかがですか？",
            30,
        ),
        (
            "5",
            "u3",
            "Chie",
            false,
            "I opted out, do not keep this",
            40,
        ),
        (
            "6",
            "u2",
            "Ben",
            false,
            "tea sounds great, mail me at ben@example.com",
            50,
        ),
        ("7", "u1", "Aki", false, "this one gets deleted", 60),
        ("8", "u1", "Aki", false, "じゃあ緑茶にしよう", 70),
    ];
    for (id, author, name, from_self, text, t) in rows {
        s.insert_message(&NewMessage {
            channel: channel.clone(),
            kind: ChatKind::Group,
            message_id: id.into(),
            author_id: author.into(),
            author_name: name.into(),
            author_is_bot: from_self,
            from_self,
            is_notice: false,
            text: text.into(),
            reply_to: None,
            sent_at_ms: 1_700_000_000_000 + t * 1000,
            source: "live".into(),
        })
        .await
        .unwrap();
    }
    s.set_opted_out(Platform::Discord, "u3", true)
        .await
        .unwrap();
    s.delete_message(&channel, "7", 0).await.unwrap();
    channel
}

#[tokio::test]
async fn bot_and_all_modes_write_alternating_examples_without_opted_out_or_deleted_words() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).await;
    let channel = group_chat(&s).await;
    s.record_reaction(&channel, "4", "u1", "👍", true)
        .await
        .unwrap();
    s.record_reaction(&channel, "4", "u2", "👍", true)
        .await
        .unwrap();
    s.record_reaction(&channel, "4", "u3", "👎", true)
        .await
        .unwrap(); // u3 opted out: not counted
    s.record_reaction(&channel, "4", "u2", "👍", false)
        .await
        .unwrap();

    export(&s, &dir.path().join("bot"), &ExportOptions::default())
        .await
        .unwrap();
    let bot = lines(&dir.path().join("bot/train.jsonl"));
    assert_eq!(bot.len(), 1);
    assert_valid_chat(&bot[0]);
    assert_eq!(
        turns(&bot[0]),
        [
            (
                "user".to_string(),
                "Aki: おはよう！今日は寒いね\nBen: morning! yes, so cold".to_string()
            ),
            ("assistant".into(), "温かいお茶はいかがですか？".into()),
        ]
    );
    let meta = &bot[0]["meta"];
    assert_eq!(meta["up"], serde_json::json!([0, 1]), "{meta}");
    assert_eq!(meta["down"], serde_json::json!([0, 0]), "{meta}");
    assert_eq!(meta["reactions"], serde_json::json!(["", "👍"]), "{meta}");

    let all_dir = dir.path().join("all");
    let summary = export(
        &s,
        &all_dir,
        &ExportOptions {
            mode: ExportMode::All,
            redact: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let all = lines(&all_dir.join("train.jsonl"));
    let text = std::fs::read_to_string(all_dir.join("train.jsonl")).unwrap();
    for banned in [
        "opted out",
        "deleted",
        "/reset",
        "ben@example.com",
        "お茶はいかが",
    ] {
        assert!(!text.contains(banned), "{banned:?} in {text}");
    }
    assert!(text.contains("<email>"));
    // Aki and Ben each take the assistant's side once; names stay in the users' lines.
    assert_eq!(all.len(), 2, "{text}");
    assert_eq!(summary.examples(), 2);
    for e in &all {
        assert_valid_chat(e);
    }
    let assistant_lines: HashSet<String> = all
        .iter()
        .flat_map(turns)
        .filter(|(r, _)| r == "assistant")
        .map(|(_, c)| c)
        .collect();
    assert!(assistant_lines
        .iter()
        .any(|c| c.contains("tea sounds great")));
    assert!(assistant_lines.iter().any(|c| c.contains("緑茶")));
    assert!(text.contains("Aki: おはよう"));
    let card = std::fs::read_to_string(all_dir.join("data_card.md")).unwrap();
    assert!(card.contains("| train | 2 |"), "{card}");
}

/// `n` small dialogues as OpenAI JSONL: every tenth (9, 19, …) is an exact copy of the one
/// before, and every tenth from 10 on a copy of the one two before differing only in case and
/// punctuation.
fn many_dialogues(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let (q, a) = match i % 10 {
            9 => (
                format!("Tell me about topic {}", i - 1),
                format!("Topic {} is fun.", i - 1),
            ),
            0 if i > 0 => (
                format!("TELL me about topic {}!!", i - 2),
                format!("topic {} is fun", i - 2),
            ),
            _ => (
                format!("Tell me about topic {i}"),
                format!("Topic {i} is fun."),
            ),
        };
        s.push_str(
            &serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a}
            ]})
            .to_string(),
        );
        s.push('\n');
    }
    s
}

#[tokio::test]
async fn the_split_is_by_conversation_deterministic_and_duplicates_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).await;
    let file = write(dir.path(), "many.jsonl", &many_dialogues(400));
    let imported = import_file(&s, &file, &ImportOptions::new(Format::Openai))
        .await
        .unwrap();
    // Exact copies are one conversation in the store already.
    assert_eq!(imported.conversations, 360);
    let options = ExportOptions {
        val_fraction: 0.25,
        seed: 7,
        ..Default::default()
    };
    let summary = export(&s, &dir.path().join("x"), &options).await.unwrap();
    assert_eq!(summary.dropped_normalized_duplicates, 39, "{summary:?}");
    assert_eq!(summary.examples(), 321);
    let train = lines(&dir.path().join("x/train.jsonl"));
    let val = lines(&dir.path().join("x/validation.jsonl"));
    assert!(
        (50..110).contains(&val.len()),
        "{} validation examples",
        val.len()
    );
    let ids = |v: &[Value]| -> HashSet<String> {
        v.iter()
            .map(|e| e["meta"]["conversation"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(ids(&train).is_disjoint(&ids(&val)));

    export(&s, &dir.path().join("y"), &options).await.unwrap();
    for f in ["train.jsonl", "validation.jsonl", "summary.json"] {
        assert_eq!(
            std::fs::read(dir.path().join("x").join(f)).unwrap(),
            std::fs::read(dir.path().join("y").join(f)).unwrap(),
            "{f} differs between two runs"
        );
    }
    let other_seed = ExportOptions { seed: 8, ..options };
    export(&s, &dir.path().join("z"), &other_seed)
        .await
        .unwrap();
    assert_ne!(
        ids(&val),
        ids(&lines(&dir.path().join("z/validation.jsonl")))
    );
}

#[tokio::test]
async fn filters_pseudonyms_and_the_other_formats() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).await;
    group_chat(&s).await;
    let file = write(dir.path(), "chat.jsonl", OPENAI);
    import_file(&s, &file, &ImportOptions::new(Format::Openai))
        .await
        .unwrap();

    // Language and platform filters.
    let ja = export(
        &s,
        &dir.path().join("ja"),
        &ExportOptions {
            languages: vec!["ja".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ja.per_language.keys().collect::<Vec<_>>(), ["ja"]);
    assert_eq!(ja.examples(), 2, "{ja:?}");
    let discord_only = export(
        &s,
        &dir.path().join("d"),
        &ExportOptions {
            filter: kaiwa::store::CorpusFilter {
                platforms: vec!["discord".into()],
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        discord_only.per_platform.keys().collect::<Vec<_>>(),
        ["discord"]
    );
    let later = export(
        &s,
        &dir.path().join("t"),
        &ExportOptions {
            filter: kaiwa::store::CorpusFilter {
                platforms: vec!["discord".into()],
                since_ms: Some(1_700_000_000_000 + 35_000),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(later.examples(), 0, "the bot's reply is before the window");

    // Pseudonyms: stable across exports, and the names are gone.
    let anon = |name: &'static str| {
        let s = s.clone();
        let out = dir.path().join(name);
        async move {
            export(
                &s,
                &out,
                &ExportOptions {
                    anonymize: true,
                    filter: kaiwa::store::CorpusFilter {
                        platforms: vec!["discord".into()],
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            std::fs::read_to_string(out.join("train.jsonl")).unwrap()
        }
    };
    let (one, two) = (anon("a1").await, anon("a2").await);
    assert_eq!(one, two);
    assert!(!one.contains("Aki") && !one.contains("Ben"), "{one}");
    assert!(one.contains("user-"), "{one}");

    // ShareGPT and plain text.
    export(
        &s,
        &dir.path().join("sg"),
        &ExportOptions {
            format: ExportFormat::Sharegpt,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for e in lines(&dir.path().join("sg/train.jsonl")) {
        let from: Vec<&str> = e["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["from"].as_str().unwrap())
            .collect();
        assert!(from.iter().all(|f| ["system", "human", "gpt"].contains(f)));
        assert_eq!(*from.last().unwrap(), "gpt");
    }
    export(
        &s,
        &dir.path().join("txt"),
        &ExportOptions {
            format: ExportFormat::Text,
            mode: ExportMode::All,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("txt/train.txt")).unwrap();
    assert!(
        text.contains("Aki: おはよう！今日は寒いね\nBen: morning! yes, so cold\n"),
        "{text}"
    );
    assert!(
        text.contains("\n\nuser: What's a good breakfast?\nassistant: Eggs"),
        "{text}"
    );
}

#[tokio::test]
async fn a_chat_export_merges_with_what_the_bot_collected_live() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).await;
    let channel = ChannelRef::new(Platform::Telegram, "-1001234567890");
    s.insert_message(&NewMessage {
        channel: channel.clone(),
        kind: ChatKind::Group,
        message_id: "11".into(),
        author_id: "111".into(),
        author_name: "Aki".into(),
        author_is_bot: false,
        from_self: false,
        is_notice: false,
        text: "ラーメン食べに行かない？".into(),
        reply_to: None,
        sent_at_ms: 1_700_000_000_000,
        source: "live".into(),
    })
    .await
    .unwrap();
    let export_json = r#"{
      "name": "ごはん部", "type": "private_supergroup", "id": 1234567890,
      "messages": [
        {"id": 11, "type": "message", "date": "2023-11-14T22:13:20", "date_unixtime": "1700000000",
         "from": "Aki", "from_id": "user111", "text": "ラーメン食べに行かない？"},
        {"id": 12, "type": "message", "date": "2023-11-14T22:14:00", "date_unixtime": "1700000040",
         "from": "Ben", "from_id": "user222", "reply_to_message_id": 11,
         "text": ["いいね！", {"type": "bold", "text": "味噌"}, "がいい"]}
      ]
    }"#;
    let file = write(dir.path(), "result.json", export_json);
    let summary = import_file(&s, &file, &ImportOptions::new(Format::Telegram))
        .await
        .unwrap();
    assert_eq!((summary.messages, summary.duplicates), (1, 1));
    let stored = s.channel_messages(&channel).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].text.as_deref(), Some("いいね！味噌がいい"));
    assert_eq!(stored[1].reply_to.as_deref(), Some("11"));
}

/// The Python `datasets` library, an independent reader, loads an export with the right number
/// of rows and roles. Skipped where Python or `datasets` is missing, except in CI.
#[tokio::test]
async fn the_datasets_library_reads_an_export() {
    let Some(python) = crate::support::python_with("datasets", "pip install datasets") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).await;
    let channel = group_chat(&s).await;
    s.record_reaction(&channel, "4", "u1", "👍", true)
        .await
        .unwrap();
    let file = write(dir.path(), "many.jsonl", &many_dialogues(60));
    import_file(&s, &file, &ImportOptions::new(Format::Openai))
        .await
        .unwrap();
    let out = dir.path().join("out");
    let summary = export(
        &s,
        &out,
        &ExportOptions {
            val_fraction: 0.2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/datasets_check.py"
    );
    let result = std::process::Command::new(&python)
        .arg(script)
        .arg(&out)
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", dir.path().join("hf"))
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(report["train"], summary.train.examples);
    assert_eq!(report["validation"], summary.validation.examples);
    assert_eq!(report["bad_roles"], 0, "{report}");
}

/// The corpus benchmark's own workload, small, on both engines as `kaiwa bench corpus
/// --postgres` runs it: the synthetic Telegram export imports in full and both export modes
/// give the same examples on each, and the PostgreSQL scratch schema is gone afterwards (the
/// figures themselves are for `kaiwa bench corpus`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corpus_benchmark_workload_imports_and_exports_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let server = crate::support::db::database().await;
    let mut examples = Vec::new();
    for postgres in [None, Some(server.as_str())] {
        let report = kaiwa::bench::corpus::bench_corpus(dir.path(), postgres, 2500)
            .await
            .unwrap();
        let engine = if postgres.is_some() {
            "postgres"
        } else {
            "sqlite"
        };
        assert_eq!(report.engine, engine);
        assert_eq!((report.messages, report.chats), (2500, 3));
        assert_eq!(report.exports.len(), 2);
        assert!(report.store_mib > 0.0, "{report:?}");
        // Sessions of 20 messages, three speakers taking turns, `kaiwa` the assistant.
        assert!(
            report.exports.iter().all(|e| e.examples > 100),
            "{report:?}"
        );
        examples.push(
            report
                .exports
                .iter()
                .map(|e| e.examples)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(examples[0], examples[1]);
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server)
        .await
        .unwrap();
    let left: Vec<String> =
        sqlx::query_scalar("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'kaiwa_scratch_%'")
            .fetch_all(&mut admin)
            .await
            .unwrap();
    assert!(left.is_empty(), "scratch schemas left behind: {left:?}");
}
