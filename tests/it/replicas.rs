//! Several kaiwa processes on one PostgreSQL store, as a deployment that outgrew one machine
//! runs them: what one process imports, learns, forgets or reloads, every other one acts on.
//! The processes are the real `kaiwa` binary (import, chat, stats, export-corpus, forget) and
//! bots in this test process, each with a pool of its own, on the test PostgreSQL server.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::support::core::{harness_on, message, Harness};
use crate::support::db::database;
use crate::support::model::{copy_of_tiny_model, tiny_model_dir};
use kaiwa::bot::event::{ChannelRef, ChatKind, Platform};

/// Runs `kaiwa args` on the store at `url` with the tiny model, `stdin` as its input.
fn kaiwa(url: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("MODEL_DIR", tiny_model_dir())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kaiwa");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kaiwa {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A bot in this process on the store at `url`, with `extra` settings.
async fn bot_on(url: &str, extra: &[(&str, &str)]) -> Harness {
    let mut env = vec![("DATABASE_URL", url)];
    env.extend_from_slice(extra);
    harness_on(&env, &tiny_model_dir()).await
}

/// The text `h` answered its `n`th sent message with (1-based), once sent.
async fn nth_reply(h: &Harness, n: usize) -> String {
    h.outbox.wait_for(n).await[n - 1].1.clone()
}

const QUESTION: &str = "Anyone been to the aquarium lately?";
const ANSWER: &str = "Yes! The jellyfish tank is amazing.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_in_one_process_is_answered_from_by_every_other() {
    let url = database().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pairs.jsonl");
    let line = serde_json::json!({"messages": [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "今日の天気はどうですか？"},
        {"role": "assistant", "content": "晴れていて暖かいですよ。"},
    ]});
    std::fs::write(&file, format!("{line}\n")).unwrap();
    let import = kaiwa(
        &url,
        &["import", file.to_str().unwrap(), "--format", "openai"],
        "",
    );
    assert!(
        String::from_utf8_lossy(&import.stderr).contains("imported"),
        "{import:?}"
    );

    // The commands that read the store read the same one.
    let stats: serde_json::Value =
        serde_json::from_slice(&kaiwa(&url, &["stats"], "").stdout).unwrap();
    assert_eq!(stats["messages"], 4, "{stats}");
    let out = dir.path().join("export");
    kaiwa(
        &url,
        &[
            "export-corpus",
            "--out",
            out.to_str().unwrap(),
            "--mode",
            "all",
        ],
        "",
    );
    let train = std::fs::read_to_string(out.join("train.jsonl")).unwrap()
        + &std::fs::read_to_string(out.join("validation.jsonl")).unwrap_or_default();
    assert!(train.contains(ANSWER), "{train}");

    // Another process's reply engine: `kaiwa chat`, one reply a line.
    let chat = kaiwa(
        &url,
        &["chat"],
        "I want to visit an aquarium\n明日の天気はどうかな\n",
    );
    let replies: Vec<String> = String::from_utf8_lossy(&chat.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(replies, [ANSWER, "晴れていて暖かいですよ。"]);

    // A running bot, with its own pool on the store.
    let bot = bot_on(&url, &[]).await;
    bot.send(message(
        "dm",
        ChatKind::Direct,
        "1",
        "carol",
        "I would love to see an aquarium",
    ))
    .await;
    assert_eq!(nth_reply(&bot, 1).await, ANSWER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_and_channel_settings_made_in_one_process_hold_in_the_others() {
    let url = database().await;
    let (a, b) = (bot_on(&url, &[]).await, bot_on(&url, &[]).await);
    // An admin shares a group through process A; Alice and Bob talk there.
    a.send(message("g", ChatKind::Group, "1", "admin", "/share on"))
        .await;
    a.outbox.wait_for(1).await;
    a.send(message("g", ChatKind::Group, "2", "alice", QUESTION))
        .await;
    a.send(message("g", ChatKind::Group, "3", "bob", ANSWER))
        .await;
    // Process B answers Carol with Bob's words at once.
    b.send(message(
        "dm-carol",
        ChatKind::Direct,
        "4",
        "carol",
        "I want to visit an aquarium",
    ))
    .await;
    assert_eq!(nth_reply(&b, 1).await, ANSWER);

    // Bob asks process B to forget him: process A never uses his words again.
    b.send(message("dm-bob", ChatKind::Direct, "5", "bob", "/forgetme"))
        .await;
    assert!(nth_reply(&b, 2).await.starts_with("Deleted"));
    a.send(message(
        "dm-dave",
        ChatKind::Direct,
        "6",
        "dave",
        "I want to visit an aquarium",
    ))
    .await;
    assert_ne!(nth_reply(&a, 2).await, ANSWER);
    let group = ChannelRef::new(Platform::Telegram, "g");
    let rows = a.store.channel_messages(&group).await.unwrap();
    assert!(rows.iter().all(|r| r.author_id != "bob"), "{rows:?}");

    // Erin opts out through A: B neither stores nor answers her.
    a.send(message("dm-erin", ChatKind::Direct, "7", "erin", "/optout"))
        .await;
    a.outbox.wait_for(3).await;
    b.send(message(
        "dm-erin",
        ChatKind::Direct,
        "8",
        "erin",
        "do not keep this",
    ))
    .await;
    let erin = ChannelRef::new(Platform::Telegram, "dm-erin");
    let rows = b.store.channel_messages(&erin).await.unwrap();
    assert!(rows.iter().all(|r| r.message_id != "8"), "{rows:?}");

    // /share off through B: A retrieves nothing from the group any more.
    b.send(message("g", ChatKind::Group, "9", "admin", "/share off"))
        .await;
    b.outbox.wait_for(3).await;
    a.send(message(
        "g",
        ChatKind::Group,
        "11",
        "frank",
        "The sharks were great too",
    ))
    .await;
    a.send(message(
        "dm-gina",
        ChatKind::Direct,
        "12",
        "gina",
        "were the sharks great",
    ))
    .await;
    assert_ne!(nth_reply(&a, 4).await, "The sharks were great too");

    // /reset through A: B's memory of the channel starts after it.
    a.send(message(
        "dm-carol",
        ChatKind::Direct,
        "13",
        "carol",
        "/reset",
    ))
    .await;
    a.outbox.wait_for(5).await;
    let carol = ChannelRef::new(Platform::Telegram, "dm-carol");
    let context = b.store.channel_context(&carol, 0, 100).await.unwrap();
    assert!(context.iter().all(|m| m.message_id != "4"), "{context:?}");
    let sent = b.outbox.sent();
    assert_eq!(sent.len(), 3, "Erin, opted out, was answered: {sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_from_the_command_line_holds_in_every_running_bot() {
    let url = database().await;
    let (a, b) = (
        bot_on(&url, &[("SHARE_GROUPS", "true")]).await,
        bot_on(&url, &[("SHARE_GROUPS", "true")]).await,
    );
    a.send(message("g", ChatKind::Group, "1", "alice", QUESTION))
        .await;
    a.send(message("g", ChatKind::Group, "2", "bob", ANSWER))
        .await;
    b.send(message(
        "dm",
        ChatKind::Direct,
        "3",
        "carol",
        "an aquarium visit?",
    ))
    .await;
    assert_eq!(nth_reply(&b, 1).await, ANSWER);
    let forget = kaiwa(
        &url,
        &["forget", "--platform", "telegram", "--user", "bob"],
        "",
    );
    assert!(forget.status.success());
    for (h, id) in [(&a, "4"), (&b, "5")] {
        h.send(message(
            "dm2",
            ChatKind::Direct,
            id,
            "dave",
            "an aquarium visit?",
        ))
        .await;
    }
    assert_ne!(nth_reply(&a, 1).await, ANSWER);
    assert_ne!(nth_reply(&b, 2).await, ANSWER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_in_one_process_reloads_the_model_in_every_other() {
    let url = database().await;
    let model = copy_of_tiny_model();
    let dir = model.path().to_str().unwrap().to_string();
    let env = [("DATABASE_URL", url.as_str()), ("MODEL_DIR", dir.as_str())];
    let a = harness_on(&env, model.path()).await;
    let b = harness_on(&env, model.path()).await;
    let in_step = tokio::spawn(Arc::clone(&b.bot).keep_in_step(Duration::from_millis(50)));
    // Let B take the store's reload generation as its starting point.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = b.bot.model();
    assert_ne!(before.default_options().max_new_tokens, 3);

    // The model directory changes, and an admin reloads it through A.
    let config = model.path().join("generation_config.json");
    let mut g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    g["max_new_tokens"] = 3.into();
    std::fs::write(&config, g.to_string()).unwrap();
    a.send(message(
        "admin-dm",
        ChatKind::Direct,
        "1",
        "admin",
        "/reload",
    ))
    .await;
    let said = nth_reply(&a, 1).await;
    assert!(
        said.contains("other processes on this store follow"),
        "{said}"
    );
    assert_eq!(a.bot.model().default_options().max_new_tokens, 3);

    // B follows without being told anything but the store.
    let mut reloaded = false;
    for _ in 0..200 {
        if !Arc::ptr_eq(&before, &b.bot.model()) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reloaded, "process B did not reload the model");
    assert_eq!(b.bot.model().default_options().max_new_tokens, 3);
    // Once: B does not reload again for the same /reload.
    let after = b.bot.model();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Arc::ptr_eq(&after, &b.bot.model()));
    in_step.abort();
}

/// A daemon that starts while another is still answering a message (a second replica, a
/// rolling restart) leaves that reply to it; once the other one has stopped without answering,
/// the next recovery answers it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_daemon_leaves_a_running_ones_replies_alone() {
    let url = database().await;
    let (a, b) = (bot_on(&url, &[]).await, bot_on(&url, &[]).await);
    a.store.announce().await.unwrap();
    b.store.announce().await.unwrap();
    // A stored and claimed a message and is still generating its reply.
    let m = message("dm", ChatKind::Direct, "1", "carol", "are you there?");
    let row = kaiwa::store::NewMessage {
        channel: m.channel.clone(),
        kind: m.kind,
        message_id: m.message_id.clone(),
        author_id: m.author_id.clone(),
        author_name: m.author_name.clone(),
        author_is_bot: false,
        from_self: false,
        is_notice: false,
        text: m.text.clone(),
        reply_to: None,
        sent_at_ms: m.sent_at_ms,
        source: "live".into(),
    };
    a.store.insert_message_and_claim(&row, true).await.unwrap();
    let outbox = b.outbox.clone() as Arc<dyn kaiwa::bot::event::Outbox>;
    b.bot
        .recover(Platform::Telegram, Some(outbox.clone()))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.outbox.sent().is_empty(), "{:?}", b.outbox.sent());
    let pending = b.store.pending_replies(Platform::Telegram).await.unwrap();
    assert_eq!(pending.len(), 1);

    // A stops without answering: the next start answers it.
    a.store.leave().await.unwrap();
    b.bot
        .recover(Platform::Telegram, Some(outbox.clone()))
        .await;
    let sent = b.outbox.wait_for(1).await;
    assert_eq!(sent[0].2.as_deref(), Some("1"));
    b.bot.recover(Platform::Telegram, Some(outbox)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.outbox.sent().len(), 1, "answered once");
}
