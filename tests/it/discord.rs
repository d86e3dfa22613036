//! End to end on Discord: the whole daemon (store, tiny random model, adapter) talks through the
//! real serenity client to a fake Discord (REST and WebSocket gateway) on 127.0.0.1. Replies come
//! from a random model, so the tests check where a reply went and what was stored, never its
//! wording. Every wait is bounded.

use std::time::Duration;

use crate::support::daemon::{spawn_daemon, spawn_daemon_on, WAIT};
use crate::support::discord::{
    rfc3339, unix_ms, FakeDiscord, FakeUser, MessageBuilder, INTENT_DIRECT_MESSAGES,
    INTENT_GUILD_MESSAGES, INTENT_MESSAGE_CONTENT, TOKEN,
};
use kaiwa::bot::event::{ChannelRef, Outbox, Platform};
use kaiwa::config::{PlatformSettings, Secret};
use kaiwa::domain::ChatKind;
use kaiwa::platform::discord::DiscordOutbox;
use kaiwa::store::StoredMessage;
use serde_json::{json, Value};

const GUILD: &str = "1100000000000000001";
const GENERAL: &str = "1200000000000000001";
const RANDOM: &str = "1200000000000000002";
const DM_ALICE: &str = "1300000000000000001";
const DM_BOB: &str = "1300000000000000002";

fn alice() -> FakeUser {
    FakeUser::person("2000000000000000001", "alice").with_global_name("Alice")
}

fn bob() -> FakeUser {
    FakeUser::person("2000000000000000002", "bob")
}

fn channel(id: &str) -> ChannelRef {
    ChannelRef::new(Platform::Discord, id)
}

fn id_of(message: &Value) -> &str {
    message["id"].as_str().expect("message id")
}

fn has_message(rows: &[StoredMessage], id: &str) -> bool {
    rows.iter().any(|m| m.message_id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_connection_uses_api_v10_json_and_the_message_content_intent() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    let identify = &fake.identifies()[0];
    assert_eq!(identify.token, format!("Bot {TOKEN}"));
    for intent in [
        INTENT_GUILD_MESSAGES,
        INTENT_DIRECT_MESSAGES,
        INTENT_MESSAGE_CONTENT,
    ] {
        assert_ne!(
            identify.intents & intent,
            0,
            "intents {:#b} lack {intent:#b}",
            identify.intents
        );
    }
    let query = &fake.gateway_queries()[0];
    assert_eq!(query.get("v").map(String::as_str), Some("10"));
    assert!(!query.contains_key("compress"), "{query:?}");
    assert!(
        fake.requests()
            .iter()
            .any(|r| r == "GET /api/v10/gateway/bot -> 200"),
        "{:?}",
        fake.requests()
    );
    daemon.stop().await.unwrap();
}

/// Messages written while kaiwa was not connected (a new gateway session does not replay them)
/// are read through REST at the next start: stored, and the recent one answered; an old one is
/// stored but not answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_missed_while_down_are_caught_up_at_the_next_start() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    let dm = MessageBuilder::direct(DM_ALICE, &alice(), "hello there").build();
    fake.dispatch_message_create(dm);
    fake.wait_for_sent(1, WAIT).await;
    let old = MessageBuilder::direct(DM_ALICE, &alice(), "an old question").build();
    let mut old = old;
    old["timestamp"] = rfc3339(unix_ms() - 2 * 3_600_000).into();
    fake.add_history(old.clone());
    let missed = MessageBuilder::direct(DM_ALICE, &alice(), "are you there?").build();
    fake.add_history(missed.clone());

    let daemon = daemon.restart().await;
    let sent = fake.wait_for_sent(2, WAIT).await;
    assert_eq!(
        sent[1].reply_to.as_deref(),
        Some(id_of(&missed)),
        "{sent:#?}"
    );
    let rows = daemon
        .wait_for_rows(&channel(DM_ALICE), "the missed messages", |r| {
            r.iter().any(|m| m.message_id == id_of(&old))
                && r.iter().filter(|m| m.from_self).count() == 2
        })
        .await;
    let stored = |id: &str| rows.iter().find(|m| m.message_id == id).unwrap();
    assert_eq!(stored(id_of(&missed)).chat_kind, ChatKind::Direct);
    assert_eq!(stored(id_of(&old)).text.as_deref(), Some("an old question"));
    assert!(!sent
        .iter()
        .any(|s| s.reply_to.as_deref() == Some(id_of(&old))));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_message_is_stored_and_answered_in_the_same_channel() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    let dm = MessageBuilder::direct(DM_ALICE, &alice(), "hello there").build();
    fake.dispatch_message_create(dm.clone());

    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].channel_id, DM_ALICE);
    assert_eq!(sent[0].reply_to.as_deref(), Some(id_of(&dm)));
    assert!(!sent[0].content.is_empty());
    // A reply does not ping its author, and generated text pings no one.
    assert_eq!(sent[0].allowed_mentions["replied_user"], json!(false));
    assert_eq!(sent[0].allowed_mentions["parse"], json!([]));

    let rows = daemon
        .wait_for_rows(&channel(DM_ALICE), "stored reply", |r| {
            r.iter().any(|m| m.from_self)
        })
        .await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let theirs = rows.iter().find(|m| !m.from_self).unwrap();
    assert_eq!(theirs.message_id, id_of(&dm));
    assert_eq!(theirs.author_id, alice().id);
    assert_eq!(theirs.author_name, "Alice");
    assert_eq!(theirs.text.as_deref(), Some("hello there"));
    assert_eq!(theirs.chat_kind, ChatKind::Direct);
    let ours = rows.iter().find(|m| m.from_self).unwrap();
    assert_eq!(ours.message_id, sent[0].id);
    assert_eq!(ours.reply_to.as_deref(), Some(id_of(&dm)));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_message_is_stored_but_only_a_mention_is_answered() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    let plain = MessageBuilder::in_guild(GUILD, GENERAL, &alice(), "just chatting").build();
    fake.dispatch_message_create(plain.clone());
    daemon
        .wait_for_rows(&channel(GENERAL), "plain message", |r| {
            has_message(r, id_of(&plain))
        })
        .await;

    let mention = MessageBuilder::in_guild(GUILD, GENERAL, &bob(), "what do you think?")
        .mentioning(fake.bot_user())
        .nick("Bobby")
        .build();
    fake.dispatch_message_create(mention.clone());
    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].channel_id, GENERAL);
    assert_eq!(sent[0].reply_to.as_deref(), Some(id_of(&mention)));

    // The plain message was stored first and never queued; nothing else follows.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.sent().len(), 1, "{}", fake.summary());
    let rows = daemon
        .wait_for_rows(&channel(GENERAL), "stored reply", |r| {
            r.iter().any(|m| m.from_self)
        })
        .await;
    let plain_row = rows.iter().find(|m| m.message_id == id_of(&plain)).unwrap();
    assert_eq!(
        (plain_row.chat_kind.as_str(), plain_row.text.as_deref()),
        ("group", Some("just chatting"))
    );
    let mention_row = rows
        .iter()
        .find(|m| m.message_id == id_of(&mention))
        .unwrap();
    assert_eq!(mention_row.author_name, "Bobby", "the guild nickname wins");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_channels_each_get_their_own_reply_and_rows() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    let to_alice = MessageBuilder::direct(DM_ALICE, &alice(), "hi from alice").build();
    let to_bob = MessageBuilder::direct(DM_BOB, &bob(), "hi from bob").build();
    fake.dispatch_message_create(to_alice.clone());
    fake.dispatch_message_create(to_bob.clone());

    let sent = fake.wait_for_sent(2, WAIT).await;
    for (chat, asked) in [(DM_ALICE, &to_alice), (DM_BOB, &to_bob)] {
        let replies: Vec<_> = sent.iter().filter(|m| m.channel_id == chat).collect();
        assert_eq!(replies.len(), 1, "{sent:#?}");
        assert_eq!(replies[0].reply_to.as_deref(), Some(id_of(asked)));
        let rows = daemon
            .wait_for_rows(&channel(chat), "stored reply", |r| {
                r.iter().any(|m| m.from_self)
            })
            .await;
        let ids: Vec<&str> = rows.iter().map(|m| m.message_id.as_str()).collect();
        assert_eq!(ids.len(), 2, "{rows:#?}");
        assert!(
            ids.contains(&id_of(asked)) && ids.contains(&replies[0].id.as_str()),
            "{rows:#?}"
        );
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_message_create_is_stored_once_and_answered_once() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    let dm = MessageBuilder::direct(DM_ALICE, &alice(), "say it once").build();
    fake.dispatch_message_create(dm.clone());
    fake.dispatch_message_create(dm.clone());

    fake.wait_for_sent(1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.sent().len(), 1, "{}", fake.summary());
    let rows = daemon
        .wait_for_rows(&channel(DM_ALICE), "stored reply", |r| {
            r.iter().any(|m| m.from_self)
        })
        .await;
    assert_eq!(
        rows.iter().filter(|m| m.message_id == id_of(&dm)).count(),
        1,
        "{rows:#?}"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_reply_is_sent_after_waiting() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    fake.fail_next_send_with_429(1.0);
    let dm = MessageBuilder::direct(DM_ALICE, &alice(), "are you there?").build();
    fake.dispatch_message_create(dm.clone());

    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].reply_to.as_deref(), Some(id_of(&dm)));
    let limited = fake.rate_limited();
    assert_eq!(limited.len(), 1);
    let waited = sent[0].at.duration_since(limited[0]);
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}, before retry_after"
    );
    daemon.stop().await.unwrap();
}

/// Through `DISCORD_API_URL`, a 429's own `retry_after` is what is waited (not a fixed
/// backoff), and a run of 429s still delivers every reply once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_a_429_storm_delivers_every_reply_once() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    fake.fail_next_send_with_429(2.5);
    let dm = MessageBuilder::direct(DM_ALICE, &alice(), "are you there?").build();
    fake.dispatch_message_create(dm.clone());
    let sent = fake.wait_for_sent(1, WAIT).await;
    let waited = sent[0].at.duration_since(fake.rate_limited()[0]);
    assert!(
        waited >= Duration::from_millis(2_400),
        "retried after {waited:?}, before retry_after"
    );

    let dms: Vec<Value> = (0..6)
        .map(|i| MessageBuilder::direct(DM_BOB, &bob(), &format!("message {i}")).build())
        .collect();
    for _ in 0..4 {
        fake.fail_next_send_with_429(0.2);
    }
    for dm in &dms {
        fake.dispatch_message_create(dm.clone());
    }
    let sent = fake.wait_for_sent(7, WAIT).await;
    for dm in &dms {
        let replies = sent
            .iter()
            .filter(|s| s.reply_to.as_deref() == Some(id_of(dm)))
            .count();
        assert_eq!(replies, 1, "{sent:#?}");
    }
    assert_eq!(fake.rate_limited().len(), 5);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_gateway_connection_is_resumed_and_the_bot_keeps_answering() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    fake.dispatch_message_create(MessageBuilder::direct(DM_ALICE, &alice(), "before").build());
    fake.wait_for_sent(1, WAIT).await;

    fake.drop_connection();
    // Sent while the connection is down: the resumed session must replay it.
    let during = MessageBuilder::direct(DM_BOB, &bob(), "during").build();
    fake.dispatch_message_create(during.clone());
    let sent = fake.wait_for_sent(2, WAIT).await;
    assert_eq!(sent[1].reply_to.as_deref(), Some(id_of(&during)));
    assert_eq!(
        fake.resume_count(),
        1,
        "{:?}; {}",
        fake.resumes(),
        fake.summary()
    );
    assert_eq!(fake.resumes()[0].session_id, "fake-session-1");
    assert_eq!(fake.identify_count(), 1, "resumed, not identified again");

    let after = MessageBuilder::direct(DM_ALICE, &alice(), "after").build();
    fake.dispatch_message_create(after.clone());
    let sent = fake.wait_for_sent(3, WAIT).await;
    assert_eq!(sent[2].reply_to.as_deref(), Some(id_of(&after)));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_dispatches_and_an_oversized_message_do_not_stop_the_bot() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    fake.send_raw_text("this is not JSON {");
    fake.dispatch_raw(json!({"op": 0, "t": "MESSAGE_CREATE", "s": null, "d": null}));
    fake.dispatch_raw(json!({"op": 42, "d": {"surprise": true}}));
    fake.dispatch_raw(json!({"hello": "world"}));
    fake.dispatch(
        "MESSAGE_CREATE",
        json!({"id": "not a snowflake", "channel_id": GENERAL}),
    );
    fake.dispatch(
        "MESSAGE_CREATE",
        json!({"id": "1", "channel_id": GENERAL, "author": null, "content": 7}),
    );
    fake.dispatch(
        "SOMETHING_DISCORD_ADDED_LATER",
        json!({"whatever": [1, 2, 3]}),
    );
    let long_text = "ä".repeat(10_000);
    let oversized = MessageBuilder::in_guild(GUILD, RANDOM, &alice(), &long_text).build();
    fake.dispatch_message_create(oversized.clone());

    let dm = MessageBuilder::direct(DM_ALICE, &alice(), "still there?").build();
    fake.dispatch_message_create(dm.clone());
    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].reply_to.as_deref(), Some(id_of(&dm)));
    let rows = daemon
        .wait_for_rows(&channel(RANDOM), "oversized message", |r| {
            has_message(r, id_of(&oversized))
        })
        .await;
    assert_eq!(
        rows[0].text.as_deref().map(|t| t.chars().count()),
        Some(10_000)
    );
    assert_eq!(fake.identify_count(), 1, "no reconnect was needed");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_updates_the_stored_text_and_delete_removes_it() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    let message = MessageBuilder::in_guild(GUILD, GENERAL, &alice(), "first draft").build();
    fake.dispatch_message_create(message.clone());
    daemon
        .wait_for_rows(&channel(GENERAL), "message", |r| {
            has_message(r, id_of(&message))
        })
        .await;

    fake.dispatch_message_edit(&message, "second draft");
    daemon
        .wait_for_rows(&channel(GENERAL), "edited text", |r| {
            r.iter().any(|m| {
                m.message_id == id_of(&message) && m.text.as_deref() == Some("second draft")
            })
        })
        .await;

    fake.dispatch_message_delete(&message);
    let rows = daemon
        .wait_for_rows(&channel(GENERAL), "deleted text", |r| {
            r.iter()
                .any(|m| m.message_id == id_of(&message) && m.text.is_none())
        })
        .await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_messages_without_content_warn_once_about_the_message_content_intent() {
    const WARNING: &str = "Discord is sending guild messages without their text";
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    // What Discord sends when the intent is missing: everything but the text.
    let withheld: Vec<Value> = (0..2)
        .map(|_| MessageBuilder::in_guild(GUILD, RANDOM, &alice(), "").build())
        .collect();
    for m in &withheld {
        fake.dispatch_message_create(m.clone());
    }
    let mention = MessageBuilder::in_guild(GUILD, RANDOM, &bob(), "hello")
        .mentioning(fake.bot_user())
        .build();
    fake.dispatch_message_create(mention.clone());
    fake.wait_for_sent(1, WAIT).await;

    let logs = daemon.wait_for_log(WARNING).await;
    assert_eq!(logs.matches(WARNING).count(), 1);
    assert!(logs.contains("Message Content Intent"));
    let rows = daemon
        .wait_for_rows(&channel(RANDOM), "mention", |r| {
            has_message(r, id_of(&mention))
        })
        .await;
    assert!(
        withheld.iter().all(|m| !has_message(&rows, id_of(m))),
        "{rows:#?}"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_message_content_intent_is_reported_with_what_to_do() {
    let fake = FakeDiscord::start(TOKEN).await;
    fake.refuse_message_content_intent();
    let daemon = spawn_daemon_on(&fake, &[]).await;
    daemon
        .wait_for_log("Privileged Gateway Intents), then restart")
        .await;
    assert_eq!(fake.identify_count(), 1);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_token_is_reported_without_showing_it() {
    const WRONG: &str = "MTA0NjAwMDAwMDAwMDAwMDAwMQ.Wr0nGx.ThisTokenWasRevokedLongAgoXyZ0123456789";
    let fake = FakeDiscord::start(TOKEN).await;
    let daemon = spawn_daemon_on(&fake, &[("DISCORD_TOKEN", WRONG)]).await;
    let logs = daemon
        .wait_for_log("Discord rejected the bot token (DISCORD_TOKEN)")
        .await;
    assert!(
        !logs.contains("ThisTokenWasRevokedLongAgo"),
        "the token is in the logs"
    );
    assert_eq!(
        fake.identify_count(),
        0,
        "no gateway connection with a rejected token"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_sends_replies_and_typing_and_reports_errors() {
    let fake = FakeDiscord::start(TOKEN).await;
    let outbox = DiscordOutbox::new(&PlatformSettings {
        token: Secret::from(TOKEN),
        api_url: Some(fake.url()),
    });
    let chat = channel(GENERAL);

    outbox.typing(&chat).await.unwrap();
    assert_eq!(fake.typing(), vec![GENERAL.to_string()]);

    let replied = outbox
        .send(&chat, "an answer", Some("1400000000000000001"))
        .await
        .unwrap();
    let sent = fake.sent();
    assert_eq!(sent[0].id, replied.message_id);
    assert_eq!(sent[0].reply_to.as_deref(), Some("1400000000000000001"));
    assert!(replied.sent_at_ms > 1_700_000_000_000, "{replied:?}");

    fake.fail_next_send_with_global_429(0.5);
    outbox
        .send(&chat, "after a global limit", None)
        .await
        .unwrap();
    assert_eq!((fake.rate_limited().len(), fake.sent().len()), (1, 2));

    let not_a_channel = outbox
        .send(&channel("general"), "hi", None)
        .await
        .unwrap_err();
    assert!(
        not_a_channel
            .to_string()
            .contains("not a Discord snowflake"),
        "{not_a_channel}"
    );
    let wrong_token = DiscordOutbox::new(&PlatformSettings {
        token: Secret::from("wrong"),
        api_url: Some(fake.url()),
    });
    let refused = wrong_token
        .send(&chat, "hi", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("401"), "{refused}");
    for error in [not_a_channel.to_string(), refused] {
        assert!(!error.contains(TOKEN), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_token_never_appears_in_the_logs() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    fake.fail_next_send_with_429(0.2);
    fake.dispatch_message_create(MessageBuilder::direct(DM_ALICE, &alice(), "one").build());
    fake.wait_for_sent(1, WAIT).await;
    fake.send_raw_text("{ not json");
    fake.drop_connection();
    fake.dispatch_message_create(MessageBuilder::direct(DM_BOB, &bob(), "two").build());
    fake.wait_for_sent(2, WAIT).await;

    // The daemon logs at debug level here, serenity included.
    let logs = daemon.logs();
    assert!(
        logs.contains("Discord: connected"),
        "the Discord adapter logged nothing?"
    );
    let secret_part = TOKEN.rsplit('.').next().unwrap();
    assert!(
        !logs.contains(TOKEN) && !logs.contains(secret_part),
        "the bot token is in the logs"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactions_on_a_reply_are_recorded_as_feedback() {
    let (fake, daemon) = spawn_daemon::<FakeDiscord>(&[]).await;
    let intents = fake.identifies()[0].intents;
    for intent in [1 << 10, 1 << 13] {
        assert_ne!(
            intents & intent,
            0,
            "reaction intents missing: {intents:#b}"
        );
    }
    let dm = MessageBuilder::direct(DM_ALICE, &alice(), "what should I cook tonight?").build();
    fake.dispatch_message_create(dm.clone());
    let sent = fake.wait_for_sent(1, WAIT).await;
    daemon
        .wait_for_rows(&channel(DM_ALICE), "stored reply", |r| {
            r.iter().any(|m| m.from_self)
        })
        .await;

    let reaction = |user: &str, emoji: Value| {
        json!({"user_id": user, "channel_id": DM_ALICE, "message_id": sent[0].id,
               "emoji": emoji, "burst": false, "burst_colors": [], "type": 0})
    };
    let thumbs = |e: &str| json!({"id": null, "name": e});
    fake.dispatch("MESSAGE_REACTION_ADD", reaction(&alice().id, thumbs("👍")));
    fake.dispatch("MESSAGE_REACTION_ADD", reaction(&alice().id, thumbs("👎")));
    // Serenity handles each event in a task of its own, so their order is not guaranteed:
    // wait for both before taking one back.
    crate::support::wait_for_feedback(daemon.store(), |m| {
        m.first()
            .is_some_and(|m| m["up"][1] == json!(1) && m["down"][1] == json!(1))
    })
    .await;
    fake.dispatch(
        "MESSAGE_REACTION_REMOVE",
        reaction(&alice().id, thumbs("👎")),
    );
    // The bot's own reactions are not feedback.
    fake.dispatch(
        "MESSAGE_REACTION_ADD",
        reaction(&fake.bot_user().id, thumbs("👎")),
    );
    fake.dispatch(
        "MESSAGE_REACTION_ADD",
        reaction(
            &bob().id,
            json!({"id": "3300000000000000001", "name": "kaiwa_love"}),
        ),
    );
    let metas = crate::support::wait_for_feedback(daemon.store(), |m| {
        m.first().is_some_and(|m| {
            let r = m["reactions"][1].as_str().unwrap_or("");
            r.contains("kaiwa_love") && !r.contains('👎')
        })
    })
    .await;
    assert_eq!(metas[0]["up"], json!([0, 1]), "{metas:?}");
    assert_eq!(metas[0]["down"], json!([0, 0]), "{metas:?}");
    daemon.stop().await.unwrap();
}
