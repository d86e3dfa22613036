//! `kaiwa run` as a user starts it: the real binary, settings from the environment, stopped by
//! SIGTERM. It must answer, then exit cleanly with what it stored intact.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::telegram::{private_chat, user, FakeTelegram, TOKEN};
use kaiwa::bot::event::{ChannelRef, Platform};

#[cfg(unix)]
#[tokio::test]
async fn sigterm_stops_the_daemon_cleanly_after_it_answered() {
    let fake = FakeTelegram::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kaiwa.db").display());
    let model = crate::support::model::tiny_model_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .arg("run")
        .current_dir(dir.path())
        .env_clear()
        .env("TELEGRAM_TOKEN", TOKEN)
        .env("TELEGRAM_API_URL", fake.url())
        .env("DATABASE_URL", &db)
        .env("MODEL_DIR", &model)
        .env("MAX_NEW_TOKENS", "8")
        .env("RUST_LOG", "kaiwa=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let alice = user(7, "Alice");
    fake.push_message(&fake.message(&private_chat(&alice), &alice, "こんにちは"));
    fake.wait_for_sent(1, Duration::from_secs(30)).await;

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "kaiwa run did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    assert!(
        !stderr.contains("AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw7"),
        "the token was logged"
    );

    let store = kaiwa::store::Store::open(&db).await.unwrap();
    let rows = store
        .channel_messages(&ChannelRef::new(Platform::Telegram, "7"))
        .await
        .unwrap();
    assert_eq!(rows.iter().filter(|r| !r.from_self).count(), 1, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r.from_self).count(), 1, "{rows:?}");
}

/// Replies composed at once. Sends are not bounded by it: each chat sends its own reply once
/// composed, so a kill can catch one reply per chat between the platform's answer and its row.
const WORKERS: usize = 2;
/// The chats of the burst; each answers one message at a time.
const CHATS: usize = 10;

/// `kaiwa run` on `db`, talking to `fake`, with no cooldown and room in the queue for a burst.
fn spawn_run(fake: &FakeTelegram, dir: &std::path::Path, db: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .arg("run")
        .current_dir(dir)
        .env_clear()
        .env("TELEGRAM_TOKEN", TOKEN)
        .env("TELEGRAM_API_URL", fake.url())
        .env("DATABASE_URL", db)
        .env("MODEL_DIR", crate::support::model::tiny_model_dir())
        .env("MAX_NEW_TOKENS", "24")
        .env("USER_COOLDOWN_MS", "0")
        .env("QUEUE_CAPACITY", "1000")
        .env("WORKERS", WORKERS.to_string())
        .env("RUST_LOG", "kaiwa=info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGKILL under load, twice, and a restart each time: every message is stored once and
/// answered, with at most one duplicate reply per reply in flight at a kill (one per chat).
#[cfg(unix)]
#[tokio::test]
async fn sigkill_under_load_loses_nothing_and_leaves_nothing_unanswered() {
    let fake = FakeTelegram::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kaiwa.db").display());
    let mut ids = Vec::new();
    for chat in 0..CHATS as i64 {
        let person = user(100 + chat, &format!("User {chat}"));
        for i in 0..6 {
            let m = fake.message(
                &private_chat(&person),
                &person,
                &format!("message {i}, please"),
            );
            ids.push((100 + chat, m["message_id"].as_i64().unwrap()));
            fake.push_message(&m);
        }
    }
    let answered = |fake: &FakeTelegram| {
        let sent = fake.sent();
        ids.iter()
            .filter(|(_, id)| sent.iter().any(|s| s.reply_to_message_id == Some(*id)))
            .count()
    };
    let kills = 2;
    for round in 0..kills {
        let mut child = spawn_run(&fake, dir.path(), &db);
        // Kill it in the middle of the burst.
        let before = answered(&fake);
        let started = Instant::now();
        while answered(&fake) < before + 5 && started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            answered(&fake) < ids.len(),
            "round {round}: nothing was left in flight"
        );
    }
    let mut child = spawn_run(&fake, dir.path(), &db);
    let started = Instant::now();
    while answered(&fake) < ids.len() && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
    assert_eq!(answered(&fake), ids.len(), "messages left unanswered");
    let sent = fake.sent();
    let duplicates: usize = ids
        .iter()
        .map(|(_, id)| {
            sent.iter()
                .filter(|s| s.reply_to_message_id == Some(*id))
                .count()
                .saturating_sub(1)
        })
        .sum();
    assert!(
        duplicates <= kills * CHATS,
        "{duplicates} duplicate replies after {kills} kills in {CHATS} chats"
    );
    let store = kaiwa::store::Store::open(&db).await.unwrap();
    for chat in 0..CHATS as i64 {
        let rows = store
            .channel_messages(&ChannelRef::new(
                Platform::Telegram,
                (100 + chat).to_string(),
            ))
            .await
            .unwrap();
        assert_eq!(rows.iter().filter(|r| !r.from_self).count(), 6, "{rows:?}");
    }
}

#[test]
fn run_without_any_token_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kaiwa"))
        .arg("run")
        .current_dir(dir.path())
        .env_clear()
        .env("MODEL_DIR", crate::support::model::tiny_model_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("DISCORD_TOKEN") && stderr.contains("TELEGRAM_TOKEN"),
        "{stderr}"
    );
}
