//! The reply engine on a real store (SQLite in a temp dir) and a tiny real model through tract:
//! retrieval in both languages, what may never be retrieved, the ranker's choice, and what the
//! bot records of it.

use std::io::Write;

use crate::support::core::{harness, message, Harness};
use kaiwa::bot::event::{ChannelRef, ChatKind, Incoming, Platform};
use kaiwa::corpus::import::Format;
use kaiwa::corpus::ingest::{import_file, ImportOptions};
use kaiwa::engine::{EngineSettings, ReplyEngine, ReplySource, Request};
use kaiwa::model::{ChatMessage, GenerateOptions, Generator};
use kaiwa::store::{DocKind, SharePolicy, Store};

/// A fresh store in a temp dir.
async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kaiwa.db").display());
    let store = Store::open(&url).await.unwrap();
    (dir, store)
}

/// Imports `(user, assistant)` exchanges as OpenAI chat JSONL.
async fn import_pairs(store: &Store, dir: &std::path::Path, pairs: &[(&str, &str)]) {
    let path = dir.join("pairs.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for (user, assistant) in pairs {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ]});
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    import_file(store, &path, &ImportOptions::new(Format::Openai))
        .await
        .unwrap();
}

fn engine() -> ReplyEngine {
    ReplyEngine::new(EngineSettings::default())
}

async fn retrieved_texts(store: &Store, query: &str) -> Vec<String> {
    engine()
        .retrieve(store, query)
        .await
        .unwrap()
        .candidates
        .into_iter()
        .map(|c| c.text)
        .collect()
}

#[tokio::test]
async fn retrieval_finds_paired_replies_in_japanese_and_english() {
    let (dir, store) = store().await;
    import_pairs(
        &store,
        dir.path(),
        &[
            ("今日の天気は？", "晴れていて暖かいですよ。"),
            ("お寿司は好きですか？", "はい、特にサーモンが好きです。"),
            (
                "Is it raining where you are?",
                "Yes, it has rained all morning.",
            ),
            ("Do you like pizza?", "I love pizza with mushrooms."),
        ],
    )
    .await;
    // 天気 is a two-character word: found although the user wrote a different sentence.
    let ja = retrieved_texts(&store, "明日の天気はどうかな").await;
    assert_eq!(
        ja.first().map(String::as_str),
        Some("晴れていて暖かいですよ。"),
        "{ja:?}"
    );
    assert!(!ja.iter().any(|t| t.contains("サーモン")), "{ja:?}");
    // Light stemming: "rains" finds "raining".
    let en = retrieved_texts(&store, "It rains a lot here").await;
    assert_eq!(
        en.first().map(String::as_str),
        Some("Yes, it has rained all morning."),
        "{en:?}"
    );
    // Unpaired sentences are found by their own words.
    store
        .add_sentences(
            "test:sentences",
            ["猫はかわいい動物です。", "Cats sleep a lot."],
        )
        .await
        .unwrap();
    let retrieval = engine().retrieve(&store, "猫を飼っています").await.unwrap();
    let sentence = retrieval
        .candidates
        .iter()
        .find(|c| c.source == ReplySource::Sentence)
        .expect("a sentence");
    assert_eq!(sentence.text, "猫はかわいい動物です。");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ranker_prefers_the_on_topic_reply_to_a_generic_one() {
    let (dir, store) = store().await;
    // Both replies answer the same message, so retrieval cannot tell them apart.
    import_pairs(
        &store,
        dir.path(),
        &[
            ("I love cats.", "I don't know."),
            ("I love cats!", "Cats are great pets, I have two cats."),
        ],
    )
    .await;
    let generator = Generator::load(&crate::support::model::tiny_model_dir()).unwrap();
    let engine = engine();
    let user = "I really love cats";
    let retrieval = engine.retrieve(&store, user).await.unwrap();
    assert_eq!(retrieval.candidates.len(), 2);
    let messages = [ChatMessage::user(user)];
    let reply = tokio::task::block_in_place(|| {
        engine.reply(
            &generator,
            &Request {
                messages: &messages,
                user_text: user,
                recent_replies: &[],
                options: &GenerateOptions {
                    max_new_tokens: 8,
                    ..GenerateOptions::default()
                },
            },
            retrieval,
            &|| true,
        )
    })
    .unwrap();
    assert_eq!(reply.text, "Cats are great pets, I have two cats.");
    assert_eq!(reply.source, ReplySource::Pair);
    assert!(reply.doc.is_some() && reply.message.is_some());
    let generic = reply
        .ranked
        .iter()
        .find(|r| r.text == "I don't know.")
        .unwrap();
    assert!(
        generic.scores.total < reply.scores.total,
        "{:?}",
        reply.ranked
    );
    // The tiny random model writes no English: its candidate is screened out, not sent.
    assert!(reply
        .ranked
        .iter()
        .filter(|r| r.source == ReplySource::Generated)
        .all(|r| r.rejected.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_and_the_bots_own_recent_replies_are_never_chosen() {
    let (dir, store) = store().await;
    import_pairs(
        &store,
        dir.path(),
        &[
            (
                "What is your favourite season?",
                "What is your favourite season?",
            ),
            ("Which season do you like?", "Autumn, for the colours."),
        ],
    )
    .await;
    let generator = Generator::load(&crate::support::model::tiny_model_dir()).unwrap();
    let engine = engine();
    let user = "What is your favourite season?";
    let messages = [ChatMessage::user(user)];
    let options = GenerateOptions {
        max_new_tokens: 4,
        ..GenerateOptions::default()
    };
    let ask = |recent: Vec<String>, retrieval| {
        tokio::task::block_in_place(|| {
            engine.reply(
                &generator,
                &Request {
                    messages: &messages,
                    user_text: user,
                    recent_replies: &recent,
                    options: &options,
                },
                retrieval,
                &|| true,
            )
        })
        .unwrap()
    };
    let reply = ask(Vec::new(), engine.retrieve(&store, user).await.unwrap());
    assert_eq!(reply.text, "Autumn, for the colours.", "{:?}", reply.ranked);
    // Said already in this conversation: not again; nothing else is good, so the engine says
    // so in the user's language.
    let reply = ask(
        vec!["Autumn, for the colours".into()],
        engine.retrieve(&store, user).await.unwrap(),
    );
    assert_eq!(reply.source, ReplySource::Fallback, "{:?}", reply.ranked);
    assert_eq!(reply.text, kaiwa::engine::fallback_text("en"));
}

/// A sent reply's message id, engine source, source doc and scores.
type ReplyRow = (String, Option<String>, Option<i64>, Option<String>);

impl Harness {
    /// What retrieval would offer for `text` under the daemon's sharing settings.
    async fn retrievable(&self, text: &str, share: SharePolicy) -> Vec<String> {
        let terms = kaiwa::text::retrieval_terms(text);
        self.store
            .retrieve(DocKind::Pair, &terms, share, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.text)
            .collect()
    }

    /// The sent replies' rows, once the reply to `message_id` is among them: the platform gets
    /// a reply just before the daemon records it as sent, so this waits (bounded) for that.
    async fn sent_reply_rows(&self, message_id: &str) -> Vec<ReplyRow> {
        let url = format!("sqlite://{}", self.dir.path().join("kaiwa.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let rows: Vec<ReplyRow> = sqlx::query_as(
                "SELECT message_id, engine_source, source_doc, scores FROM replies
                     WHERE state = 'sent' ORDER BY claimed_at_ms",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            if rows.iter().any(|r| r.0 == message_id) {
                return rows;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reply to {message_id} was not recorded as sent within 20 s: {rows:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_conversation_answers_elsewhere_at_once_and_its_provenance_is_recorded() {
    let d = harness(&[]).await;
    // Two people talk in a group that an admin shared.
    d.send(message("g", ChatKind::Group, "1", "admin", "/share on"))
        .await;
    d.outbox.wait_for(1).await;
    d.send(message(
        "g",
        ChatKind::Group,
        "2",
        "alice",
        "Anyone been to the aquarium lately?",
    ))
    .await;
    d.send(message(
        "g",
        ChatKind::Group,
        "3",
        "bob",
        "Yes! The jellyfish tank is amazing.",
    ))
    .await;
    // Right away, without a restart, someone else gets Bob's reply.
    d.send(message(
        "dm",
        ChatKind::Direct,
        "4",
        "carol",
        "I want to visit an aquarium",
    ))
    .await;
    let sent = d.outbox.wait_for(2).await;
    assert_eq!(sent[1].1, "Yes! The jellyfish tank is amazing.");
    let rows = d.sent_reply_rows("4").await;
    let (id, source, doc, scores) = rows.iter().find(|r| r.0 == "4").unwrap();
    assert_eq!((id.as_str(), source.as_deref()), ("4", Some("retrieved")));
    assert!(doc.is_some());
    let scores: serde_json::Value = serde_json::from_str(scores.as_deref().unwrap()).unwrap();
    assert_eq!(scores["source"], "pair");
    assert!(scores["scores"]["similarity"].as_f64().unwrap() > 0.0);

    // /share off takes effect at once.
    d.send(message("g", ChatKind::Group, "5", "admin", "/share off"))
        .await;
    d.outbox.wait_for(3).await;
    let share = SharePolicy::default();
    assert!(d.retrievable("aquarium", share).await.is_empty());
    // And the export says how the bot's reply was made.
    let out = d.dir.path().join("export");
    kaiwa::corpus::export::export(
        &d.store,
        &out,
        &kaiwa::corpus::export::ExportOptions::default(),
    )
    .await
    .unwrap();
    let train = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
    let carol = train
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["messages"][0]["content"] == "I want to visit an aquarium")
        .expect("carol's conversation is exported");
    assert_eq!(
        carol["meta"]["made_by"],
        serde_json::json!(["", "retrieved"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_take_effect_in_the_index_at_once() {
    let d = harness(&[("SHARE_GROUPS", "true")]).await;
    let share = SharePolicy {
        groups: true,
        direct: false,
    };
    d.send(message(
        "grp",
        ChatKind::Group,
        "30",
        "erin",
        "Do you like kayaking?",
    ))
    .await;
    d.send(message(
        "grp",
        ChatKind::Group,
        "31",
        "frank",
        "Yes, on the lake every summer.",
    ))
    .await;
    assert_eq!(
        d.retrievable("kayaking", share).await,
        ["Yes, on the lake every summer."]
    );
    let edit = |id: &str, text: &str| Incoming::Edited {
        channel: ChannelRef::new(Platform::Telegram, "grp"),
        message_id: id.into(),
        text: text.into(),
        edited_at_ms: kaiwa::store::now_ms(),
    };
    // The message answered is found by its new words, not its old ones.
    d.bot
        .handle(edit("30", "Do you like canoeing?"), d.outbox.clone())
        .await;
    assert!(d.retrievable("kayaking", share).await.is_empty());
    assert_eq!(d.retrievable("canoeing", share).await.len(), 1);
    // An edited reply is retrieved as it reads now.
    d.bot
        .handle(edit("31", "Only on the river."), d.outbox.clone())
        .await;
    assert_eq!(
        d.retrievable("canoeing", share).await,
        ["Only on the river."]
    );
    // So is its language, which the ranker screens candidates by.
    d.bot
        .handle(edit("31", "川の上だけです。"), d.outbox.clone())
        .await;
    let terms = kaiwa::text::retrieval_terms("canoeing");
    let found = d
        .store
        .retrieve(DocKind::Pair, &terms, share, 10)
        .await
        .unwrap();
    assert_eq!(
        found
            .iter()
            .map(|r| (r.text.as_str(), r.language.as_str()))
            .collect::<Vec<_>>(),
        [("川の上だけです。", "ja")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_deleted_and_forgotten_messages_never_come_back_as_replies() {
    // Groups are shared by default here; direct messages never are.
    let d = harness(&[("SHARE_GROUPS", "true")]).await;
    let share = SharePolicy {
        groups: true,
        direct: false,
    };
    // A private conversation (the bot's reply in between is not a person's reply).
    d.send(message(
        "dm1",
        ChatKind::Direct,
        "1",
        "dave",
        "My secret recipe uses saffron",
    ))
    .await;
    d.outbox.wait_for(1).await;
    d.send(message(
        "dm1",
        ChatKind::Direct,
        "2",
        "dave",
        "saffron and honey, do not tell",
    ))
    .await;
    d.outbox.wait_for(2).await;
    // Group talk: one reply deleted, one author forgotten, one opted out.
    for (id, author, text) in [
        ("10", "erin", "What do you cook with saffron?"),
        ("11", "frank", "Saffron rice, deleted later"),
        ("12", "erin", "Any other saffron dishes?"),
        ("13", "gina", "Saffron buns, but forget me"),
        ("14", "erin", "More saffron ideas?"),
        ("15", "hank", "Saffron tea, before I opt out"),
    ] {
        d.send(message("grp", ChatKind::Group, id, author, text))
            .await;
    }
    // Each group message is the reply to the one before it: five pairs.
    assert_eq!(d.retrievable("saffron", share).await.len(), 5);
    d.bot
        .handle(
            Incoming::Deleted {
                channel: ChannelRef::new(Platform::Telegram, "grp"),
                message_id: "11".into(),
            },
            d.outbox.clone(),
        )
        .await;
    d.store
        .forget_user(Platform::Telegram, "gina")
        .await
        .unwrap();
    d.store
        .set_opted_out(Platform::Telegram, "hank", true)
        .await
        .unwrap();
    assert!(d.retrievable("saffron", share).await.is_empty());
    // Another user asks about saffron: nothing private, deleted or forgotten comes back.
    d.send(message(
        "dm2",
        ChatKind::Direct,
        "20",
        "ivy",
        "Tell me about saffron",
    ))
    .await;
    let sent = d.outbox.wait_for(3).await;
    for secret in ["honey", "rice", "buns", "tea"] {
        assert!(!sent[2].1.contains(secret), "{}", sent[2].1);
    }
    // Dave's second message answers the bot's first reply: retrievable by that reply's words
    // only where the operator shares direct messages (RETRIEVE_DIRECT), never by default.
    let bot_said = &sent[0].1;
    assert!(d.retrievable(bot_said, share).await.is_empty());
    let direct = SharePolicy {
        groups: true,
        direct: true,
    };
    assert_eq!(
        d.retrievable(bot_said, direct).await,
        ["saffron and honey, do not tell"]
    );
}

#[test]
fn chat_answers_a_pipe_one_line_each_from_the_models_retrieval_data() {
    let model = crate::support::model::tiny_model_with_retrieval_data();
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("kaiwa.db");
    let chat = |input: &str| {
        let out = crate::support::model::chat_through_pipe(model.path(), &db, input, 6);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = chat("Pizza tonight?\n明日の天気はどうかな\n\nI walk my dog every day\n");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "I love pizza with mushrooms.",
            "晴れていて暖かいですよ。",
            "",
            "I like walking the dog."
        ]
    );
    // The corpora went into the store once: a second run adds nothing and answers the same.
    let again = chat("Pizza tonight?\n");
    assert_eq!(again.trim_end(), "I love pizza with mushrooms.");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counts = rt.block_on(async {
        let store = Store::open(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        store.retrieval_counts().await.unwrap()
    });
    assert_eq!(counts.get(&DocKind::Pair), Some(&2));
    assert_eq!(counts.get(&DocKind::Sentence), Some(&2));
    // The model alone, on request.
    let generated = std::process::Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args([
            "chat",
            "--engine",
            "generate",
            "--max-new-tokens",
            "4",
            "--model",
        ])
        .arg(model.path())
        .env("DATABASE_URL", format!("sqlite://{}", db.display()))
        .current_dir(work.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(generated.status.success());
}
