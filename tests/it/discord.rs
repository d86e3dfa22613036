//! End to end on Discord: the whole daemon (store, tiny random model, adapter) talks through the
//! real serenity client to a fake Discord (REST and WebSocket gateway) on 127.0.0.1. Replies come
//! from a random model, so the tests check where a reply went and what was stored, never its
//! wording. Every wait is bounded.

use std::time::Duration;

use crate::support::daemon::{last_lines, spawn_daemon, spawn_daemon_on, TestDaemon, WAIT};
use crate::support::discord::{
    rfc3339, shard_of, snowflake, unix_ms, FakeDiscord, FakeUser, MessageBuilder, SentMessage,
    INTENT_DIRECT_MESSAGES, INTENT_GUILDS, INTENT_GUILD_MESSAGES, INTENT_MESSAGE_CONTENT, TOKEN,
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

/// Two guilds of a bot with two shards: the first on shard 0, the second on shard 1
/// (`(guild_id >> 22) % 2`), each with one text channel.
const GUILD_ON_0: &str = "1100000000004194305";
const CHANNEL_ON_0: &str = "1200000000000000010";
const GUILD_ON_1: &str = "1100000000000000001";
const CHANNEL_ON_1: &str = "1200000000000000011";

/// The fake with two shards and a guild on each.
async fn two_shard_discord() -> FakeDiscord {
    assert_eq!((shard_of(GUILD_ON_0, 2), shard_of(GUILD_ON_1, 2)), (0, 1));
    let fake = FakeDiscord::start_with_shards(TOKEN, 2).await;
    fake.add_guild(GUILD_ON_0, &[CHANNEL_ON_0]);
    fake.add_guild(GUILD_ON_1, &[CHANNEL_ON_1]);
    fake
}

/// The store sharded daemons share: a fresh database on the test PostgreSQL server, as shard
/// processes on several machines would share one.
async fn shared_store() -> String {
    crate::support::db::database().await
}

/// A daemon on the store at `database_url` that runs `shards` (`DISCORD_SHARDS`) of `fake`'s.
async fn sharded_daemon(fake: &FakeDiscord, database_url: &str, shards: &str) -> TestDaemon {
    spawn_daemon_on(
        fake,
        &[("DATABASE_URL", database_url), ("DISCORD_SHARDS", shards)],
    )
    .await
}

/// A mention of the bot in a guild channel.
fn mention(fake: &FakeDiscord, guild: &str, chat: &str, text: &str) -> Value {
    MessageBuilder::in_guild(guild, chat, &bob(), text)
        .mentioning(fake.bot_user())
        .build()
}

/// The replies in `sent` to `message`.
fn replies_to<'a>(sent: &'a [SentMessage], message: &Value) -> Vec<&'a SentMessage> {
    sent.iter()
        .filter(|s| s.reply_to.as_deref() == Some(id_of(message)))
        .collect()
}

/// The shards of `fake` that `message`'s MESSAGE_CREATE was sent on.
fn delivered_on(fake: &FakeDiscord, message: &Value) -> Vec<usize> {
    fake.deliveries()
        .iter()
        .filter(|d| d.event == "MESSAGE_CREATE" && d.id.as_deref() == Some(id_of(message)))
        .map(|d| d.shard)
        .collect()
}

/// Two processes on one store, one running shard 0 of 2 and one shard 1: each guild's message
/// reaches only the process of its guild's shard and is answered once, and a direct message goes
/// to the process of shard 0 only, as Discord sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_each_answer_only_the_guilds_of_their_shard_and_shard_0_the_dms() {
    let fake = two_shard_discord().await;
    let store = shared_store().await;
    let zero = sharded_daemon(&fake, &store, "0/2").await;
    let one = sharded_daemon(&fake, &store, "1/2").await;
    for shard in [0, 1] {
        assert!(
            fake.shard_connected_within(Some(shard), WAIT).await,
            "shard {shard} did not connect; {}",
            fake.summary()
        );
    }
    let on_0 = mention(&fake, GUILD_ON_0, CHANNEL_ON_0, "which shard am I on?");
    let on_1 = mention(&fake, GUILD_ON_1, CHANNEL_ON_1, "and I?");
    let dm = MessageBuilder::direct(DM_ALICE, &alice(), "and a direct message?").build();
    for m in [&on_0, &on_1, &dm] {
        fake.dispatch_message_create(m.clone());
    }
    fake.wait_for_sent(3, WAIT).await;
    // Stopping drains the reply queues: a second reply would be sent by now.
    let (zero_logs, one_logs) = (zero.logs(), one.logs());
    zero.stop().await.unwrap();
    one.stop().await.unwrap();

    let sent = fake.sent();
    assert_eq!(sent.len(), 3, "{sent:#?}");
    for (m, chat, shard) in [
        (&on_0, CHANNEL_ON_0, 0),
        (&on_1, CHANNEL_ON_1, 1),
        (&dm, DM_ALICE, 0),
    ] {
        let replies = replies_to(&sent, m);
        assert_eq!(replies.len(), 1, "{sent:#?}");
        assert_eq!(replies[0].channel_id, chat);
        assert_eq!(
            delivered_on(&fake, m),
            vec![shard],
            "{:?}",
            fake.deliveries()
        );
    }
    // One IDENTIFY per shard, each asking for the guilds (GUILDS) to learn its channels.
    let mut identified: Vec<(u64, u64)> =
        fake.identifies().iter().filter_map(|i| i.shard).collect();
    identified.sort();
    assert_eq!(identified, vec![(0, 2), (1, 2)], "{}", fake.summary());
    assert!(fake
        .identifies()
        .iter()
        .all(|i| i.intents & INTENT_GUILDS != 0));
    for (logs, shards) in [(&zero_logs, "shards=0/2"), (&one_logs, "shards=1/2")] {
        assert!(logs.contains(shards), "{}", last_lines(logs, 40));
        assert!(
            !logs.contains("Err deserializing"),
            "{}",
            last_lines(logs, 40)
        );
    }
}

/// `DISCORD_SHARDS=auto`: one process runs as many shards as `GET /gateway/bot` recommends, and
/// answers in the guilds of all of them and in direct messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_runs_every_recommended_shard_in_one_process() {
    let fake = two_shard_discord().await;
    let daemon = spawn_daemon_on(&fake, &[("DISCORD_SHARDS", "auto")]).await;
    for shard in [0, 1] {
        // Serenity starts a process's shards 5 s apart.
        assert!(
            fake.shard_connected_within(Some(shard), WAIT).await,
            "shard {shard} did not connect; {}",
            fake.summary()
        );
    }
    let on_0 = mention(&fake, GUILD_ON_0, CHANNEL_ON_0, "shard zero here");
    let on_1 = mention(&fake, GUILD_ON_1, CHANNEL_ON_1, "shard one here");
    let dm = MessageBuilder::direct(DM_BOB, &bob(), "and a direct message").build();
    for m in [&on_0, &on_1, &dm] {
        fake.dispatch_message_create(m.clone());
    }
    fake.wait_for_sent(3, WAIT).await;
    let logs = daemon.logs();
    daemon.stop().await.unwrap();

    let sent = fake.sent();
    assert_eq!(sent.len(), 3, "{sent:#?}");
    for m in [&on_0, &on_1, &dm] {
        assert_eq!(replies_to(&sent, m).len(), 1, "{sent:#?}");
    }
    let mut identified: Vec<(u64, u64)> =
        fake.identifies().iter().filter_map(|i| i.shard).collect();
    identified.sort();
    assert_eq!(identified, vec![(0, 2), (1, 2)], "{}", fake.summary());
    assert!(logs.contains("shards=0-1/2"), "{}", last_lines(&logs, 40));
}

/// After both processes of a bot with two shards went down, each one, started again alone,
/// answers only what was left in its own shards' guilds (direct messages with shard 0): the
/// replies a crash left unsent, and the mentions written while down. Nothing is answered twice,
/// and the other process's part stays pending until it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_each_process_takes_up_only_what_its_shards_left() {
    let fake = two_shard_discord().await;
    let store = shared_store().await;
    // A first run, so each channel has a recent stored message to catch up after.
    let zero = sharded_daemon(&fake, &store, "0/2").await;
    let one = sharded_daemon(&fake, &store, "1/2").await;
    let first = [
        mention(&fake, GUILD_ON_0, CHANNEL_ON_0, "hello shard zero"),
        mention(&fake, GUILD_ON_1, CHANNEL_ON_1, "hello shard one"),
        MessageBuilder::direct(DM_ALICE, &alice(), "hello in private").build(),
    ];
    for m in &first {
        fake.dispatch_message_create(m.clone());
    }
    fake.wait_for_sent(3, WAIT).await;
    zero.stop().await.unwrap();
    let store_handle = one.store().clone();
    one.stop().await.unwrap();

    // What the crash left (claimed, never sent), then what was written while down.
    let now = kaiwa::store::now_ms();
    let mut left = Vec::new();
    for (chat, kind) in [
        (CHANNEL_ON_0, ChatKind::Group),
        (CHANNEL_ON_1, ChatKind::Group),
        (DM_ALICE, ChatKind::Direct),
    ] {
        let id = snowflake();
        let row = kaiwa::store::NewMessage {
            channel: channel(chat),
            kind,
            message_id: id.clone(),
            author_id: alice().id,
            author_name: "Alice".into(),
            author_is_bot: false,
            from_self: false,
            is_notice: false,
            text: "are you still there?".into(),
            reply_to: None,
            sent_at_ms: now,
            source: "live".into(),
        };
        store_handle.insert_message(&row).await.unwrap();
        assert!(store_handle.claim_reply(&channel(chat), &id).await.unwrap());
        left.push(json!({ "id": id }));
    }
    let missed = [
        mention(
            &fake,
            GUILD_ON_0,
            CHANNEL_ON_0,
            "written while down, shard zero",
        ),
        mention(
            &fake,
            GUILD_ON_1,
            CHANNEL_ON_1,
            "written while down, shard one",
        ),
        MessageBuilder::direct(DM_ALICE, &alice(), "written while down, in private").build(),
    ];
    for m in &missed {
        fake.add_history(m.clone());
    }

    // Shard 1's process alone: its guild's part only.
    let one = sharded_daemon(&fake, &store, "1/2").await;
    fake.wait_for_sent(5, WAIT).await;
    one.stop().await.unwrap();
    let sent = fake.sent();
    assert_eq!(sent.len(), 5, "{sent:#?}");
    for m in [&left[1], &missed[1]] {
        let replies = replies_to(&sent, m);
        assert_eq!(replies.len(), 1, "{sent:#?}");
        assert_eq!(replies[0].channel_id, CHANNEL_ON_1);
    }
    let pending = |rows: Vec<kaiwa::store::StoredMessage>| -> Vec<String> {
        rows.into_iter().map(|r| r.message_id).collect()
    };
    let still_pending = pending(
        store_handle
            .pending_replies(Platform::Discord)
            .await
            .unwrap(),
    );
    assert_eq!(
        still_pending,
        vec![id_of(&left[0]).to_string(), id_of(&left[2]).to_string()],
        "the other shard's replies are left to its process"
    );
    let read = |chat: &str| {
        let get = format!("GET /api/v10/channels/{chat}/messages -> 200");
        fake.requests().iter().filter(|r| **r == get).count()
    };
    assert_eq!(
        (read(CHANNEL_ON_0), read(DM_ALICE), read(CHANNEL_ON_1)),
        (0, 0, 1)
    );

    // Shard 0's process: its guild's part and the direct messages.
    let zero = sharded_daemon(&fake, &store, "0/2").await;
    fake.wait_for_sent(9, WAIT).await;
    zero.stop().await.unwrap();
    let sent = fake.sent();
    assert_eq!(sent.len(), 9, "{sent:#?}");
    for (m, chat) in [
        (&left[0], CHANNEL_ON_0),
        (&missed[0], CHANNEL_ON_0),
        (&left[2], DM_ALICE),
        (&missed[2], DM_ALICE),
        (&left[1], CHANNEL_ON_1),
        (&missed[1], CHANNEL_ON_1),
    ] {
        let replies = replies_to(&sent, m);
        assert_eq!(replies.len(), 1, "{sent:#?}");
        assert_eq!(replies[0].channel_id, chat);
    }
    assert!(store_handle
        .pending_replies(Platform::Discord)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        (read(CHANNEL_ON_0), read(DM_ALICE), read(CHANNEL_ON_1)),
        (1, 1, 1)
    );
}
