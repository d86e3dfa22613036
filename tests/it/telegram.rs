//! End to end on Telegram: the whole daemon (store, tiny random model, adapter) talks through the
//! real teloxide client to a fake Bot API on 127.0.0.1. Replies come from a random model, so the
//! tests check where a reply went and what was stored, never its wording. Every wait is bounded.

use std::time::Duration;

use crate::support::daemon::{last_lines, spawn_daemon, spawn_daemon_on, WAIT};
use crate::support::telegram::{
    group_chat, private_chat, replying_to, user, FakeTelegram, BOT_USERNAME, LONE_SURROGATE, TOKEN,
};
use crate::support::web::{http, reserved_port};
use kaiwa::bot::event::{ChannelRef, Outbox, Platform, SendError};
use kaiwa::config::{PlatformSettings, Secret};
use kaiwa::platform::telegram::TelegramOutbox;
use kaiwa::store::StoredMessage;
use serde_json::{json, Value};

/// The secret part of [`TOKEN`], which must never be logged.
const TOKEN_SECRET: &str = "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw7";

fn channel(chat_id: i64) -> ChannelRef {
    ChannelRef::new(Platform::Telegram, chat_id.to_string())
}

fn id_of(message: &Value) -> i64 {
    message["message_id"].as_i64().unwrap()
}

fn has_message(rows: &[StoredMessage], message_id: i64) -> bool {
    rows.iter().any(|r| r.message_id == message_id.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_message_is_stored_and_answered() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(1001, "Ann");
    let message = fake.message(&private_chat(&ann), &ann, "hello there, how are you?");
    fake.push_message(&message);

    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].chat_id, 1001);
    assert!(
        !sent[0].text.trim().is_empty(),
        "empty reply: {:?}",
        sent[0]
    );
    assert_eq!(sent[0].reply_to_message_id, Some(id_of(&message)));

    let reply_id = sent[0].message_id();
    let rows = daemon
        .wait_for_rows(&channel(1001), "the message and the reply", |rows| {
            has_message(rows, id_of(&message)) && has_message(rows, reply_id)
        })
        .await;
    let incoming = rows
        .iter()
        .find(|r| r.message_id == id_of(&message).to_string())
        .unwrap();
    assert_eq!(incoming.author_id, "1001");
    assert_eq!(incoming.author_name, "Ann");
    assert_eq!(incoming.text.as_deref(), Some("hello there, how are you?"));
    assert!(!incoming.from_self);
    let reply = rows
        .iter()
        .find(|r| r.message_id == reply_id.to_string())
        .unwrap();
    assert!(reply.from_self);
    assert_eq!(reply.reply_to, Some(id_of(&message).to_string()));

    assert_eq!(fake.unauthorized_requests(), 0);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_answers_mentions_and_replies_to_the_bot_only() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let group = group_chat(-100_200_300, "Friends");
    let (ann, bob) = (user(11, "Ann"), user(12, "Bob"));

    let plain = fake.message(&group, &ann, "just chatting among ourselves");
    let mention = fake.message(
        &group,
        &bob,
        &format!("@{} what do you think?", BOT_USERNAME.to_uppercase()),
    );
    fake.push_message(&plain);
    fake.push_message(&mention);
    // Replies in a chat go out in order, so had the plain message been answered, it would be first.
    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].chat_id, -100_200_300);
    assert_eq!(sent[0].reply_to_message_id, Some(id_of(&mention)));

    let reply = replying_to(
        &fake.message(&group, &ann, "thanks, that helps"),
        &sent[0].message,
    );
    fake.push_message(&reply);
    let sent = fake.wait_for_sent(2, WAIT).await;
    assert_eq!(sent[1].reply_to_message_id, Some(id_of(&reply)));

    let rows = daemon
        .wait_for_rows(&channel(-100_200_300), "all three messages", |rows| {
            [&plain, &mention, &reply]
                .iter()
                .all(|m| has_message(rows, id_of(m)))
        })
        .await;
    let stored_reply = rows
        .iter()
        .find(|r| r.message_id == id_of(&reply).to_string())
        .unwrap();
    assert_eq!(
        stored_reply.reply_to,
        Some(sent[0].message_id().to_string())
    );
    let answered: Vec<_> = fake.sent().iter().map(|s| s.reply_to_message_id).collect();
    assert_eq!(
        answered,
        vec![Some(id_of(&mention)), Some(id_of(&reply))],
        "the plain message was answered"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forum_topic_reply_stays_in_its_topic() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let forum = json!({"id": -100_900, "type": "supergroup", "title": "Forum", "is_forum": true});
    let ann = user(21, "Ann");
    let mut message = fake.message(&forum, &ann, &format!("@{BOT_USERNAME} hello topic"));
    message["message_thread_id"] = json!(77);
    message["is_topic_message"] = json!(true);
    fake.push_message(&message);

    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].chat_id, -100_900);
    assert_eq!(sent[0].message_thread_id, Some(77));
    let topic = channel(-100_900).with_thread("77");
    daemon
        .wait_for_rows(&topic, "the topic message", |rows| {
            has_message(rows, id_of(&message))
        })
        .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chats_get_their_own_replies() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let (ann, bob) = (user(31, "Ann"), user(32, "Bob"));
    let to_ann = fake.message(&private_chat(&ann), &ann, "Ann asks about apples");
    let to_bob = fake.message(&private_chat(&bob), &bob, "Bob asks about boats");
    // One getUpdates answer carries both, so both chats are in flight at once.
    fake.push_updates(vec![
        fake.message_update(&to_ann),
        fake.message_update(&to_bob),
    ]);

    fake.wait_for_sent(2, WAIT).await;
    for (chat, message, other) in [(31, &to_ann, &to_bob), (32, &to_bob, &to_ann)] {
        let sent = fake.sent_to(chat);
        assert_eq!(sent.len(), 1, "chat {chat}: {sent:?}");
        assert_eq!(sent[0].reply_to_message_id, Some(id_of(message)));
        let rows = daemon
            .wait_for_rows(&channel(chat), "the message and its reply", |rows| {
                has_message(rows, id_of(message)) && has_message(rows, sent[0].message_id())
            })
            .await;
        assert!(
            rows.iter().all(|r| r.chat_id == chat.to_string()),
            "{rows:#?}"
        );
        assert!(
            !has_message(&rows, id_of(other)),
            "chat {chat} holds the other chat's message: {rows:#?}"
        );
        assert_eq!(rows.len(), 2, "{rows:#?}");
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_update_yields_one_reply() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(41, "Ann");
    let chat = private_chat(&ann);
    let message = fake.message(&chat, &ann, "say something once");
    let update = fake.message_update(&message);
    // The same update twice in one answer, then the same message redelivered under a new update
    // id (what Telegram does after a crash before the offset was confirmed).
    fake.push_updates(vec![update.clone(), update]);
    fake.push_message(&message);
    // A later message: once it is answered, anything queued before it has been too.
    let later = fake.message(&chat, &ann, "and now something else");
    fake.push_message(&later);

    let sent = fake.wait_for_sent(2, WAIT).await;
    let answered: Vec<_> = sent.iter().map(|s| s.reply_to_message_id).collect();
    assert_eq!(answered, vec![Some(id_of(&message)), Some(id_of(&later))]);
    let rows = daemon
        .wait_for_rows(&channel(41), "both messages", |rows| {
            has_message(rows, id_of(&later))
        })
        .await;
    let copies = rows
        .iter()
        .filter(|r| r.message_id == id_of(&message).to_string())
        .count();
    assert_eq!(copies, 1, "{rows:#?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_reply_is_retried_after_the_wait() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    fake.fail_next_send_with_429(1);
    let ann = user(51, "Ann");
    let message = fake.message(&private_chat(&ann), &ann, "are you there?");
    fake.push_message(&message);

    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].reply_to_message_id, Some(id_of(&message)));
    assert_eq!(fake.send_attempts(), 2, "one refused attempt, one accepted");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markdown_rejection_is_resent_as_plain_text() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    fake.reject_markdown_next();
    let ann = user(61, "Ann");
    let message = fake.message(&private_chat(&ann), &ann, "format this please");
    fake.push_message(&message);

    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(fake.markdown_rejections(), 1);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].parse_mode, None, "the resend must be plain text");
    assert_eq!(sent[0].reply_to_message_id, Some(id_of(&message)));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_updates_do_not_stop_the_bot() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(71, "Ann");
    let chat = private_chat(&ann);
    let garbage = fake.message_update(&json!({"garbage": true}));
    let garbage_id = garbage["update_id"].as_i64().unwrap();
    // A message teloxide cannot parse, and an update without a usable id, which makes teloxide
    // refuse the whole answer.
    fake.push_updates(vec![garbage, json!({"update_id": "oops", "message": {}})]);
    let huge = fake.message(&chat, &ann, &"word ".repeat(4_000));
    fake.push_message(&huge);
    let normal = fake.message(&chat, &ann, "still there?");
    fake.push_message(&normal);

    fake.wait_until(WAIT, "a reply to the normal message", |f| {
        f.sent()
            .iter()
            .any(|s| s.reply_to_message_id == Some(id_of(&normal)))
    })
    .await;
    assert!(
        fake.last_offset().unwrap_or(0) > garbage_id,
        "the malformed update was never confirmed"
    );
    let rows = daemon
        .wait_for_rows(&channel(71), "the oversized message", |rows| {
            has_message(rows, id_of(&huge))
        })
        .await;
    let stored = rows
        .iter()
        .find(|r| r.message_id == id_of(&huge).to_string())
        .unwrap();
    assert!(
        stored.text.as_deref().is_some_and(|t| t.len() >= 4096),
        "oversized text was not stored"
    );
    daemon.stop().await.unwrap();
}

/// A getUpdates answer that is not valid JSON as a whole (a lone surrogate escape in one text)
/// is salvaged update by update: the bad text is stored with U+FFFD in place of the surrogate,
/// and the messages behind it are stored and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_update_does_not_stall_the_messages_behind_it() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(91, "Ann");
    let chat = private_chat(&ann);
    let poison = fake.message(
        &chat,
        &ann,
        &format!("bad {} text", crate::support::telegram::LONE_SURROGATE),
    );
    let after: Vec<Value> = (0..3)
        .map(|i| fake.message(&chat, &ann, &format!("message {i} behind it")))
        .collect();
    let mut batch = vec![fake.message_update(&poison)];
    batch.extend(after.iter().map(|m| fake.message_update(m)));
    fake.push_updates(batch);
    fake.wait_until(WAIT, "replies to the messages behind the poison", |f| {
        after.iter().all(|m| {
            f.sent()
                .iter()
                .any(|s| s.reply_to_message_id == Some(id_of(m)))
        })
    })
    .await;
    let rows = daemon
        .wait_for_rows(&channel(91), "the poisoned message", |rows| {
            has_message(rows, id_of(&poison))
        })
        .await;
    let stored = rows
        .iter()
        .find(|r| r.message_id == id_of(&poison).to_string())
        .unwrap();
    assert_eq!(stored.text.as_deref(), Some("bad \u{fffd} text"));
    daemon.stop().await.unwrap();
}

/// What a crash leaves: messages stored and claimed, never answered. At the next start the
/// recent one is answered, one whose answer went out (but was not recorded) is not sent again,
/// and an old one and a command are marked failed with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_a_crash_left_pending_are_made_at_the_next_start() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(97, "Ann");
    let chat = private_chat(&ann);
    let first = fake.message(&chat, &ann, "hello");
    fake.push_message(&first);
    fake.wait_for_sent(1, WAIT).await;
    let store = daemon.store();
    let now = kaiwa::store::now_ms();
    let left = |id: &str, text: &str, sent_at_ms: i64| kaiwa::store::NewMessage {
        channel: channel(97),
        kind: kaiwa::bot::event::ChatKind::Direct,
        message_id: id.into(),
        author_id: "97".into(),
        author_name: "Ann".into(),
        author_is_bot: false,
        from_self: false,
        is_notice: false,
        text: text.into(),
        reply_to: None,
        sent_at_ms,
        source: "live".into(),
    };
    for (id, text, at) in [
        ("9001", "are you still there?", now),
        ("9002", "an old question", now - 2 * 3_600_000),
        ("9003", "/stats", now),
        ("9004", "answered, not recorded", now),
    ] {
        store.insert_message(&left(id, text, at)).await.unwrap();
        assert!(store.claim_reply(&channel(97), id).await.unwrap());
    }
    let mut answer = left("b-9004", "the answer that went out", now);
    answer.from_self = true;
    answer.author_id = "kaiwa".into();
    answer.reply_to = Some("9004".into());
    store.insert_message(&answer).await.unwrap();

    let daemon = daemon.restart().await;
    fake.wait_until(WAIT, "the reply a crash left unsent", |f| {
        f.sent().iter().any(|s| s.reply_to_message_id == Some(9001))
    })
    .await;
    let pool = sqlx::SqlitePool::connect(&daemon.database_url())
        .await
        .unwrap();
    let mut states: Vec<(String, String, Option<String>)> = Vec::new();
    for _ in 0..100 {
        states = sqlx::query_as(
            "SELECT message_id, state, error FROM replies WHERE chat_id = '97' \
             AND message_id LIKE '900%' ORDER BY message_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if states.iter().all(|(_, s, _)| s != "pending") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = |id: &str| states.iter().find(|s| s.0 == id).cloned().unwrap();
    assert_eq!(state("9001").1, "sent", "{states:?}");
    assert_eq!(state("9002").1, "failed");
    assert!(state("9002").2.unwrap().contains("RECOVER_MAX_AGE_MINUTES"));
    assert_eq!(state("9003").1, "failed");
    assert_eq!(state("9004").1, "sent");
    let sent_to = |id: i64| {
        fake.sent()
            .iter()
            .filter(|s| s.reply_to_message_id == Some(id))
            .count()
    };
    assert_eq!(
        (sent_to(9001), sent_to(9002), sent_to(9003), sent_to(9004)),
        (1, 0, 0, 0)
    );
    daemon.stop().await.unwrap();
}

/// With `HTTP_ADDR` set, `kaiwa run` serves `/health` and `/metrics` beside the bots, and the
/// metrics count what the bots do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reports_its_health_and_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Held until the daemon binds it too, so no other test can take it meanwhile.
    let port = reserved_port();
    let addr = port.local_addr().unwrap().to_string();
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[("HTTP_ADDR", &addr)]).await;
    let ann = user(99, "Ann");
    fake.push_message(&fake.message(&private_chat(&ann), &ann, "hello"));
    fake.wait_for_sent(1, WAIT).await;
    let get = |path: &'static str| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    assert!(get("/health").await.starts_with("HTTP/1.0 200"));
    let wants = [
        "kaiwa_messages_received_total{platform=\"telegram\"} 1",
        "kaiwa_replies_total{platform=\"telegram\",outcome=\"sent\"} 1",
        "kaiwa_bot_reply_duration_seconds_count 1",
        "kaiwa_queue_depth 0",
    ];
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = get("/metrics").await;
        if wants.iter().all(|w| metrics.contains(w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for want in wants {
        assert!(metrics.contains(want), "{want} in\n{metrics}");
    }
    daemon.stop().await.unwrap();
}

/// A database that cannot be written (locked by another process past the store's 10 s busy
/// timeout) confirms nothing to Telegram: the update stays unconfirmed, and once the lock is
/// gone it is stored and answered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_confirms_nothing_it_did_not_store() {
    use sqlx::Connection;
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    // Locked once the daemon is up and polling (its start writes to the store too).
    fake.wait_until(WAIT, "the daemon polling", |f| f.calls("getUpdates") > 0)
        .await;
    let mut lock = sqlx::SqliteConnection::connect(&daemon.database_url())
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .unwrap();
    let ann = user(98, "Ann");
    let message = fake.message(&private_chat(&ann), &ann, "are you there?");
    let update = fake.push_message(&message);
    let id = update["update_id"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        fake.last_offset().unwrap_or(0) <= id,
        "an update that could not be stored was confirmed"
    );
    assert!(fake.sent().is_empty());
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    drop(lock);
    fake.wait_until(WAIT, "the reply once the database is writable", |f| {
        f.sent()
            .iter()
            .any(|s| s.reply_to_message_id == Some(id_of(&message)))
    })
    .await;
    let rows = daemon
        .wait_for_rows(&channel(98), "the message", |rows| {
            has_message(rows, id_of(&message))
        })
        .await;
    assert_eq!(rows.iter().filter(|r| !r.from_self).count(), 1);
    assert!(daemon
        .logs()
        .contains("stays unconfirmed and is fetched again"));
    daemon.stop().await.unwrap();
}

/// A 429 storm (3 of every 10 sends refused, `retry_after` 1 s) still delivers every reply,
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_storm_delivers_every_reply_once() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    fake.rate_limit_storm(1);
    let messages: Vec<Value> = (0..12)
        .map(|i| {
            let person = user(200 + i, "Ann");
            fake.message(&private_chat(&person), &person, "hello")
        })
        .collect();
    for m in &messages {
        fake.push_message(m);
    }
    fake.wait_until(Duration::from_secs(60), "a reply to every message", |f| {
        messages.iter().all(|m| {
            f.sent()
                .iter()
                .any(|s| s.reply_to_message_id == Some(id_of(m)))
        })
    })
    .await;
    let sent = fake.sent();
    for m in &messages {
        let n = sent
            .iter()
            .filter(|s| s.reply_to_message_id == Some(id_of(m)))
            .count();
        assert_eq!(n, 1, "{} replies to one message", n);
    }
    assert!(fake.send_attempts() > sent.len(), "no 429 was sent");
    daemon.stop().await.unwrap();
}

/// The Bot API unavailable (a proxy in front of it answering 502 pages): a reply that cannot go
/// out is sent again with backoff until it does, and messages written while the whole API is down
/// are fetched, stored and answered once it is back. Nothing is lost or sent twice, and the
/// daemon does not hammer the API while it is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_bot_api_loses_no_message_and_no_reply() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(301, "Ann");
    fake.fail_next_sends_with_502(1);
    let first = fake.push_message(&fake.message(&private_chat(&ann), &ann, "hello"));
    let first_id = first["message"]["message_id"].as_i64().unwrap();
    fake.wait_until(Duration::from_secs(60), "the reply after a 502", |f| {
        f.sent()
            .iter()
            .any(|s| s.reply_to_message_id == Some(first_id))
    })
    .await;
    assert!(
        daemon
            .logs()
            .contains("platform unavailable; the reply is sent again later"),
        "{}",
        last_lines(&daemon.logs(), 60)
    );

    fake.set_down(true);
    let bob = user(302, "Bob");
    let during: Vec<Value> = ["are you there?", "何時ですか？"]
        .iter()
        .map(|text| fake.message(&private_chat(&bob), &bob, text))
        .collect();
    for m in &during {
        fake.push_message(m);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_down = fake.requests_while_down();
    fake.set_down(false);
    // teloxide itself waits 10 s after a 5xx; kaiwa's backoff comes on top: a handful of
    // requests in 3 s, not a busy loop.
    assert!(while_down <= 6, "{while_down} requests in 3 s while down");
    fake.wait_until(
        Duration::from_secs(90),
        "replies to what was written while down",
        |f| {
            during.iter().all(|m| {
                f.sent()
                    .iter()
                    .any(|s| s.reply_to_message_id == Some(id_of(m)))
            })
        },
    )
    .await;
    let sent = fake.sent();
    for id in during.iter().map(id_of).chain([first_id]) {
        let n = sent
            .iter()
            .filter(|s| s.reply_to_message_id == Some(id))
            .count();
        assert_eq!(n, 1, "{n} replies to message {id}");
    }
    let rows = daemon
        .store()
        .channel_messages(&channel(302))
        .await
        .unwrap();
    for m in &during {
        assert_eq!(
            rows.iter()
                .filter(|r| r.message_id == id_of(m).to_string())
                .count(),
            1
        );
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_confirms_handled_updates() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(81, "Ann");
    let update = fake.push_message(&fake.message(&private_chat(&ann), &ann, "hello"));
    fake.wait_for_sent(1, WAIT).await;
    daemon.stop().await.unwrap();
    // Confirmed, so a restart does not receive it again.
    assert_eq!(
        fake.last_offset(),
        Some(update["update_id"].as_i64().unwrap() + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_survives_a_restart() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(91, "Ann");
    let chat = private_chat(&ann);
    let first = fake.message(&chat, &ann, "remember that my cat is called Miso");
    fake.push_message(&first);
    let first_reply = fake.wait_for_sent(1, WAIT).await[0].message_id();
    daemon
        .wait_for_rows(&channel(91), "the first exchange", |rows| {
            has_message(rows, first_reply)
        })
        .await;

    let daemon = daemon.restart().await;
    let second = fake.message(&chat, &ann, "what is my cat called?");
    fake.push_message(&second);
    let sent = fake.wait_for_sent(2, WAIT).await;
    assert_eq!(
        sent.len(),
        2,
        "the first message was answered again after the restart: {sent:?}"
    );
    assert_eq!(sent[1].reply_to_message_id, Some(id_of(&second)));
    let rows = daemon
        .wait_for_rows(&channel(91), "both exchanges", |rows| {
            [
                id_of(&first),
                first_reply,
                id_of(&second),
                sent[1].message_id(),
            ]
            .iter()
            .all(|&id| has_message(rows, id))
        })
        .await;
    assert_eq!(rows.len(), 4, "{rows:#?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_token_never_appears_in_the_logs() {
    // Nothing listens on this port (held, so no other test can take it): every request fails,
    // and the HTTP client's error quotes the URL, which holds the token.
    let closed = reserved_port();
    let url = format!("http://{}/", closed.local_addr().unwrap());
    let daemon = spawn_daemon_on(
        &(),
        &[("TELEGRAM_TOKEN", TOKEN), ("TELEGRAM_API_URL", &url)],
    )
    .await;
    daemon.wait_for_log("cannot reach the Bot API").await;

    // And after errors on a working connection: a rate limit and a refused format.
    let (fake, other) = spawn_daemon::<FakeTelegram>(&[]).await;
    fake.fail_next_send_with_429(1);
    fake.reject_markdown_next();
    let ann = user(99, "Ann");
    fake.push_message(&fake.message(&private_chat(&ann), &ann, "hi"));
    fake.wait_for_sent(1, WAIT).await;
    // What both daemons logged, up to their last line.
    let (first_logs, other_logs) = (daemon.log_capture(), other.log_capture());
    other.stop().await.unwrap();
    daemon.stop().await.unwrap();
    let logs = first_logs.text() + &other_logs.text();

    assert!(
        logs.to_lowercase().contains("connection refused"),
        "the connection error was logged without its cause:\n{}",
        last_lines(&logs, 60)
    );
    assert!(
        !logs.contains(TOKEN_SECRET),
        "the token leaked into the logs:\n{}",
        logs.lines()
            .filter(|l| l.contains(TOKEN_SECRET))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The adapter's outbox alone, against the fake: no daemon.
fn outbox_for(fake: &FakeTelegram, token: &str) -> TelegramOutbox {
    TelegramOutbox::new(&PlatformSettings {
        token: Secret::from(token),
        api_url: Some(fake.url()),
    })
    .unwrap()
}

#[tokio::test]
async fn outbox_sends_into_topics_and_replies_to_deleted_messages() {
    let fake = FakeTelegram::start(TOKEN).await;
    let outbox = outbox_for(&fake, TOKEN);
    let topic = channel(-100_555).with_thread("12");

    outbox.typing(&topic).await.unwrap();
    // Message 999 does not exist (deleted meanwhile): the reply is still delivered.
    let sent = outbox.send(&topic, "*hello*", Some("999")).await.unwrap();

    let calls = fake.sent();
    assert_eq!(calls.len(), 1);
    assert_eq!(sent.message_id, calls[0].message_id().to_string());
    assert!(sent.sent_at_ms > 0);
    assert_eq!(calls[0].message_thread_id, Some(12));
    assert_eq!(calls[0].reply_to_message_id, Some(999));
    assert_eq!(calls[0].parse_mode.as_deref(), Some("Markdown"));
    let actions = fake.chat_actions();
    assert_eq!(actions.len(), 1);
    assert_eq!(
        (actions[0].action.as_str(), actions[0].message_thread_id),
        ("typing", Some(12))
    );
}

#[tokio::test]
async fn outbox_gives_up_on_a_lasting_rate_limit() {
    let fake = FakeTelegram::start(TOKEN).await;
    for _ in 0..10 {
        fake.fail_next_send_with_429(0);
    }
    let result = outbox_for(&fake, TOKEN).send(&channel(5), "hi", None).await;
    assert!(matches!(result, Err(SendError::Other(_))), "{result:?}");
    assert_eq!(fake.send_attempts(), 5, "attempts are bounded");
}

#[tokio::test]
async fn outbox_errors_never_quote_the_token() {
    let fake = FakeTelegram::start(TOKEN).await;
    // The fake knows another token, so it answers 401 as Telegram would.
    let wrong = "987654321:ZZHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw7";
    let result = outbox_for(&fake, wrong).send(&channel(5), "hi", None).await;
    assert_eq!(fake.unauthorized_requests(), 1);
    let Err(SendError::Other(text)) = result else {
        panic!("expected an error, got {result:?}")
    };
    assert!(
        !text.contains("ZZHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw7"),
        "{text}"
    );

    // A network error quotes the request URL (teloxide redacts it; so do we).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let outbox = TelegramOutbox::new(&PlatformSettings {
        token: Secret::from(TOKEN),
        api_url: Some(url),
    })
    .unwrap();
    // Unreachable is "unavailable": the bot sends it again later.
    let Err(SendError::Unavailable(text)) = outbox.send(&channel(5), "hi", None).await else {
        panic!("expected a network error")
    };
    assert!(!text.contains(TOKEN_SECRET), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactions_on_a_reply_are_recorded_as_feedback() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[]).await;
    let ann = user(1001, "Ann");
    let message = fake.message(&private_chat(&ann), &ann, "おすすめの朝ごはんは？");
    fake.push_message(&message);
    let sent = fake.wait_for_sent(1, WAIT).await;
    daemon
        .wait_for_rows(&channel(1001), "stored reply", |r| {
            r.iter().any(|m| m.from_self)
        })
        .await;

    // Ann reacts 👍 then changes it to ❤ and 🔥 (the update carries old and new lists); an
    // anonymous reaction (on behalf of a chat) is no one's feedback.
    let reaction = |update_id: i64, old: Value, new: Value| {
        json!({"update_id": update_id, "message_reaction": {
            "chat": private_chat(&ann), "message_id": sent[0].message_id(), "user": ann,
            "date": 1_700_000_000, "old_reaction": old, "new_reaction": new}})
    };
    let emoji = |e: &str| json!({"type": "emoji", "emoji": e});
    fake.push_update(reaction(9000, json!([]), json!([emoji("👍")])));
    fake.push_update(reaction(
        9001,
        json!([emoji("👍")]),
        json!([emoji("❤"), emoji("🔥")]),
    ));
    fake.push_update(json!({"update_id": 9002, "message_reaction": {
        "chat": private_chat(&ann), "message_id": sent[0].message_id(),
        "actor_chat": group_chat(-100500, "channel"), "date": 1_700_000_000,
        "old_reaction": [], "new_reaction": [emoji("👎")]}}));
    let metas = crate::support::wait_for_feedback(daemon.store(), |m| {
        m.first()
            .is_some_and(|m| m["reactions"][1].as_str().unwrap_or("").contains('🔥'))
    })
    .await;
    assert_eq!(metas[0]["reactions"], json!(["", "❤ 🔥"]), "{metas:?}");
    assert_eq!(metas[0]["up"], json!([0, 2]));
    assert_eq!(metas[0]["down"], json!([0, 0]));
    daemon.stop().await.unwrap();
}

/// Where the webhook replicas of a test tell Telegram to post; they serve its path.
const WEBHOOK_URL: &str = "https://bot.example.test/telegram/hook";
const WEBHOOK_PATH: &str = "/telegram/hook";
/// The secret every replica of a test shares.
const WEBHOOK_SECRET: &str = "replica-Secret_42";

/// The store several replicas share: a fresh database on the test PostgreSQL server, as replicas
/// on several machines would share one.
async fn shared_store_url() -> String {
    crate::support::db::database().await
}

/// The settings of a replica in webhook mode on the store at `store_url`, listening on `port`
/// (held by the test until the replica listens there).
fn replica_settings(store_url: &str, port: &tokio::net::TcpSocket) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", store_url.to_string()),
        ("TELEGRAM_WEBHOOK_URL", WEBHOOK_URL.to_string()),
        ("TELEGRAM_WEBHOOK_SECRET", WEBHOOK_SECRET.to_string()),
        (
            "TELEGRAM_WEBHOOK_LISTEN",
            port.local_addr().unwrap().to_string(),
        ),
    ]
}

fn as_env<'a>(settings: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    settings.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// POSTs `body` to the webhook listener on `port` as Telegram does, with `secret` in its header
/// (none: no header); the answer's status.
async fn post_update(port: &tokio::net::TcpSocket, secret: Option<&str>, body: &str) -> u16 {
    let base = format!("http://{}", port.local_addr().unwrap());
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(secret) = secret {
        headers.push(("X-Telegram-Bot-Api-Secret-Token", secret));
    }
    let line = format!("POST {WEBHOOK_PATH}");
    let (status, _, _) = http(&base, &line, &headers, body).await.unwrap();
    status
}

/// The rows of `channel` for the message `message_id` received (not the bot's own).
fn received(rows: &[StoredMessage], message_id: i64) -> usize {
    rows.iter()
        .filter(|r| r.message_id == message_id.to_string() && !r.from_self)
        .count()
}

/// Two replicas on one store are given the same update, as a load balancer retrying it on
/// another replica gives it: it is stored once and answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_replicas_on_one_store_answer_a_redelivered_update_once() {
    let store_url = shared_store_url().await;
    let (port_a, port_b) = (reserved_port(), reserved_port());
    let settings_a = replica_settings(&store_url, &port_a);
    let (fake, a) = spawn_daemon::<FakeTelegram>(&as_env(&settings_a)).await;
    let settings_b = replica_settings(&store_url, &port_b);
    let b = spawn_daemon_on(&fake, &as_env(&settings_b)).await;
    a.wait_for_log("telegram webhook set").await;
    b.wait_for_log("telegram webhook set").await;

    let ann = user(4242, "Ann");
    let message = fake.message(&private_chat(&ann), &ann, "hello, is anyone there?");
    let update = fake.message_update(&message).to_string();
    // The 2xx comes once the update is stored: the second replica finds it in the store.
    assert_eq!(
        post_update(&port_a, Some(WEBHOOK_SECRET), &update).await,
        200
    );
    assert_eq!(
        post_update(&port_b, Some(WEBHOOK_SECRET), &update).await,
        200
    );

    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].reply_to_message_id, Some(id_of(&message)));
    let rows = a
        .wait_for_rows(&channel(4242), "the message and its reply", |rows| {
            has_message(rows, id_of(&message)) && has_message(rows, sent[0].message_id())
        })
        .await;
    assert_eq!(received(&rows, id_of(&message)), 1, "{rows:#?}");
    assert_eq!(rows.len(), 2, "{rows:#?}");

    // Stopped, both have finished every reply they queued: still one.
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(fake.send_attempts(), 1, "{:?}", fake.sent());

    let allowed = [
        "message",
        "edited_message",
        "channel_post",
        "edited_channel_post",
        "message_reaction",
    ]
    .map(String::from)
    .to_vec();
    let calls = fake.set_webhooks();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for call in calls {
        assert_eq!(call.url, WEBHOOK_URL);
        assert_eq!(call.secret_token.as_deref(), Some(WEBHOOK_SECRET));
        assert_eq!(call.allowed_updates.as_ref(), Some(&allowed));
        assert_ne!(call.drop_pending_updates, Some(true));
    }
    // The webhook stays for the replicas still serving; nobody polls.
    assert_eq!(fake.delete_webhooks(), 0);
    assert_eq!(fake.calls("getUpdates"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_requests_without_the_right_secret_are_refused_and_not_stored() {
    let port = reserved_port();
    let settings = replica_settings(&shared_store_url().await, &port);
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&as_env(&settings)).await;
    daemon.wait_for_log("telegram webhook set").await;

    let ann = user(5151, "Ann");
    let message = fake.message(&private_chat(&ann), &ann, "let me in");
    let update = fake.message_update(&message).to_string();
    assert_eq!(post_update(&port, None, &update).await, 401);
    assert_eq!(
        post_update(&port, Some("replica-Secret_4"), &update).await,
        403
    );
    assert_eq!(post_update(&port, Some("wrong"), &update).await, 403);
    // A refusal comes before anything is read, so nothing can be stored after it either.
    let rows = daemon
        .store()
        .channel_messages(&channel(5151))
        .await
        .unwrap();
    assert!(rows.is_empty(), "{rows:#?}");

    // The same update with the secret is taken.
    assert_eq!(post_update(&port, Some(WEBHOOK_SECRET), &update).await, 200);
    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].chat_id, 5151);
    let logs = daemon.log_capture();
    daemon.stop().await.unwrap();
    assert_eq!(fake.send_attempts(), 1);
    let logs = logs.text();
    assert!(
        logs.contains("refused a request with a wrong secret"),
        "{}",
        last_lines(&logs, 40)
    );
    assert!(!logs.contains(WEBHOOK_SECRET), "the secret was logged");
}

/// What a request with the right secret carries but kaiwa cannot use is confirmed (200), so that
/// Telegram does not send it again and again; the updates after it are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_confirms_unreadable_updates_and_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = reserved_port();
    let settings = replica_settings(&shared_store_url().await, &port);
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&as_env(&settings)).await;
    daemon.wait_for_log("telegram webhook set").await;

    let secret = Some(WEBHOOK_SECRET);
    let not_json = "<html>not an update</html>";
    assert_eq!(post_update(&port, secret, not_json).await, 200);
    let unreadable = json!({"update_id": 70, "message": {"garbage": true}}).to_string();
    assert_eq!(post_update(&port, secret, &unreadable).await, 200);
    let unused_kind = json!({"update_id": 71, "poll": {"id": "1"}}).to_string();
    assert_eq!(post_update(&port, secret, &unused_kind).await, 200);
    let ann = user(6161, "Ann");
    let spoiled = fake.message(
        &private_chat(&ann),
        &ann,
        &format!("a lone {LONE_SURROGATE} here"),
    );
    let spoiled = fake
        .message_update(&spoiled)
        .to_string()
        .replace(LONE_SURROGATE, "\\ud800");
    assert_eq!(post_update(&port, secret, &spoiled).await, 200);
    // Said to be longer than any update: refused unread (so none is sent).
    let mut stream = tokio::net::TcpStream::connect(port.local_addr().unwrap())
        .await
        .unwrap();
    let head = format!(
        "POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: kaiwa\r\nConnection: close\r\n\
         X-Telegram-Bot-Api-Secret-Token: {WEBHOOK_SECRET}\r\nContent-Length: 2000000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    let message = fake.message(&private_chat(&ann), &ann, "still there?");
    let update = fake.message_update(&message).to_string();
    assert_eq!(post_update(&port, secret, &update).await, 200);
    let rows = daemon
        .wait_for_rows(&channel(6161), "the spoiled and the good message", |rows| {
            rows.len() >= 2
        })
        .await;
    let texts: Vec<_> = rows.iter().filter_map(|r| r.text.clone()).collect();
    assert!(
        texts.contains(&"a lone \u{fffd} here".to_string()),
        "{texts:?}"
    );
    let logs = daemon.wait_for_log("without a readable update").await;
    assert!(
        logs.contains("skipping unreadable update 70"),
        "{}",
        last_lines(&logs, 40)
    );
    daemon.stop().await.unwrap();
}

/// A process started to long-poll a bot whose updates go to a webhook stops and says what to do;
/// it does not delete the webhook the replicas serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_stops_with_advice_when_a_webhook_is_set() {
    let fake = FakeTelegram::start(TOKEN).await;
    fake.set_webhook_elsewhere(WEBHOOK_URL);
    let daemon = spawn_daemon_on(&fake, &[]).await;
    let logs = daemon.wait_for_log("platform connection failed").await;
    assert!(
        logs.contains("a webhook is set") && logs.contains("deleteWebhook"),
        "{}",
        last_lines(&logs, 20)
    );
    assert!(
        logs.contains("TELEGRAM_WEBHOOK_URL"),
        "{}",
        last_lines(&logs, 20)
    );
    assert!(!logs.contains(TOKEN_SECRET), "the token was logged");
    daemon.stop().await.unwrap();
    assert_eq!(fake.calls("getUpdates"), 1);
    assert_eq!(fake.delete_webhooks(), 0);
}
