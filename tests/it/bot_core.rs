//! The platform-neutral core with a recording outbox: what is stored, what is answered, and
//! what the corpus export makes of it.

use std::time::Duration;

use crate::support::core::{harness, harness_on, message, Harness};
use kaiwa::bot::event::{ChannelRef, ChatKind, Incoming, Platform};

#[tokio::test]
async fn a_direct_message_is_stored_then_answered_and_redelivery_adds_nothing() {
    let h = harness(&[]).await;
    let m = message("1", ChatKind::Direct, "10", "u1", "こんにちは");
    h.send(m.clone()).await;
    let sent = h.outbox.wait_for(1).await;
    assert_eq!(sent[0].0, m.channel);
    assert_eq!(sent[0].2.as_deref(), Some("10"), "answers as a reply");
    assert!(!sent[0].1.trim().is_empty());
    // Redelivered (Telegram after a crash): no new row, no new reply.
    h.send(m.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.outbox.sent().len(), 1);
    let rows = h.store.channel_messages(&m.channel).await.unwrap();
    assert_eq!(rows.iter().filter(|r| !r.from_self).count(), 1);
    assert_eq!(
        rows.iter().filter(|r| r.from_self).count(),
        1,
        "the reply is stored too"
    );
    assert_eq!(rows[1].reply_to.as_deref(), Some("10"));
    assert_eq!(rows[0].chat_kind, ChatKind::Direct);
}

/// The generation settings recorded with the bot's sent replies.
async fn reply_settings(h: &Harness) -> Vec<String> {
    let url = format!("sqlite://{}", h.dir.path().join("kaiwa.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    for _ in 0..200 {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT settings FROM replies WHERE state = 'sent'")
                .fetch_all(&pool)
                .await
                .unwrap();
        if !rows.is_empty() {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no sent reply recorded")
}

#[tokio::test]
async fn replies_take_the_model_settings_unless_the_environment_sets_them() {
    // A model whose generation_config.json differs from kaiwa's defaults.
    let model = crate::support::model::copy_of_tiny_model();
    let config = model.path().join("generation_config.json");
    let mut g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    g["max_new_tokens"] = 5.into();
    g["temperature"] = 0.4.into();
    std::fs::write(&config, g.to_string()).unwrap();

    // MAX_NEW_TOKENS unset: the model's 5 applies, and its temperature; GUIDANCE_SCALE comes
    // from the environment.
    let h = harness_on(
        &[("MAX_NEW_TOKENS", ""), ("GUIDANCE_SCALE", "1.5")],
        model.path(),
    )
    .await;
    h.send(message("1", ChatKind::Direct, "10", "u1", "hello"))
        .await;
    h.outbox.wait_for(1).await;
    let settings = reply_settings(&h).await;
    assert!(settings[0].contains("temperature=0.4 "), "{settings:?}");
    assert!(
        settings[0].contains("max_new_tokens=5 guidance_scale=1.5 "),
        "{settings:?}"
    );

    let h = harness(&[]).await;
    h.send(message("1", ChatKind::Direct, "10", "u1", "hello"))
        .await;
    h.outbox.wait_for(1).await;
    let settings = reply_settings(&h).await;
    assert!(
        settings[0].contains("max_new_tokens=8 guidance_scale=1 "),
        "{settings:?}"
    );
}

#[tokio::test]
async fn in_groups_only_mentions_replies_and_enabled_channels_are_answered() {
    let h = harness(&[]).await;
    h.send(message("g", ChatKind::Group, "1", "u1", "just chatting"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        h.outbox.sent().is_empty(),
        "plain group talk is not answered"
    );
    let mut mention = message("g", ChatKind::Group, "2", "u2", "@kaiwa hi");
    mention.mentions_bot = true;
    h.send(mention).await;
    h.outbox.wait_for(1).await;
    let mut reply = message("g", ChatKind::Group, "3", "u1", "thanks");
    reply.replies_to_bot = true;
    h.send(reply).await;
    h.outbox.wait_for(2).await;
    // Every message was stored, answered or not.
    let channel = ChannelRef::new(Platform::Telegram, "g");
    assert_eq!(
        h.store
            .channel_messages(&channel)
            .await
            .unwrap()
            .iter()
            .filter(|r| !r.from_self)
            .count(),
        3
    );

    // An admin turns on answering everything in this channel.
    h.send(message("g", ChatKind::Group, "4", "admin", "/answerall on"))
        .await;
    h.outbox.wait_for(3).await;
    h.send(message("g", ChatKind::Group, "5", "u1", "anyone there?"))
        .await;
    h.outbox.wait_for(4).await;
    // Not for non-admins.
    h.send(message("g", ChatKind::Group, "6", "u1", "/answerall off"))
        .await;
    let sent = h.outbox.wait_for(5).await;
    assert!(sent[4].1.contains("admins"), "{}", sent[4].1);
}

#[tokio::test]
async fn channels_never_see_each_others_messages() {
    let h = harness(&[]).await;
    for i in 0..3 {
        h.send(message(
            "a",
            ChatKind::Direct,
            &format!("a{i}"),
            "ua",
            &format!("secret-a-{i}"),
        ))
        .await;
        h.send(message(
            "b",
            ChatKind::Direct,
            &format!("b{i}"),
            "ub",
            &format!("secret-b-{i}"),
        ))
        .await;
    }
    h.outbox.wait_for(6).await;
    let since = 0;
    let a = h
        .store
        .channel_context(&ChannelRef::new(Platform::Telegram, "a"), since, 100)
        .await
        .unwrap();
    assert!(a.iter().all(|m| m.chat_id == "a"));
    assert!(a.iter().any(|m| m.text.as_deref() == Some("secret-a-2")));
    assert!(!a
        .iter()
        .any(|m| m.text.as_deref().is_some_and(|t| t.contains("secret-b"))));
    // Replies went to the channel they answer, in order.
    let sent = h.outbox.sent();
    for (channel, _, reply_to) in &sent {
        assert!(reply_to
            .as_deref()
            .unwrap()
            .starts_with(channel.chat_id.as_str()));
    }
}

#[tokio::test]
async fn reset_optout_and_forgetme_do_what_they_say() {
    let h = harness(&[]).await;
    let channel = ChannelRef::new(Platform::Telegram, "c");
    h.send(message(
        "c",
        ChatKind::Direct,
        "1",
        "u",
        "remember the blue house",
    ))
    .await;
    h.outbox.wait_for(1).await;
    h.send(message("c", ChatKind::Direct, "2", "u", "/reset"))
        .await;
    h.outbox.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let context = h.store.channel_context(&channel, 0, 100).await.unwrap();
    assert!(
        context
            .iter()
            .all(|m| m.text.as_deref() != Some("remember the blue house")),
        "{context:?}"
    );

    h.send(message("c", ChatKind::Direct, "3", "u", "/optout"))
        .await;
    h.outbox.wait_for(3).await;
    h.send(message("c", ChatKind::Direct, "4", "u", "not stored"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.outbox.sent().len(), 3, "opted-out users are not answered");
    let rows = h.store.channel_messages(&channel).await.unwrap();
    assert!(
        rows.iter().all(|r| r.message_id != "4"),
        "opted-out messages are not stored"
    );

    h.send(message("c", ChatKind::Direct, "5", "u", "/optin"))
        .await;
    h.outbox.wait_for(4).await;
    h.send(message("c", ChatKind::Direct, "6", "u", "/forgetme"))
        .await;
    let sent = h.outbox.wait_for(5).await;
    assert!(sent[4].1.starts_with("Deleted"), "{}", sent[4].1);
    let rows = h.store.channel_messages(&channel).await.unwrap();
    assert!(
        rows.iter().all(|r| r.from_self),
        "only the bot's own messages remain: {rows:?}"
    );
}

#[tokio::test]
async fn edits_and_deletions_reach_the_store() {
    let h = harness(&[]).await;
    let channel = ChannelRef::new(Platform::Telegram, "e");
    h.send(message("e", ChatKind::Group, "1", "u", "tyop"))
        .await;
    let edit = Incoming::Edited {
        channel: channel.clone(),
        message_id: "1".into(),
        text: "typo".into(),
        edited_at_ms: 5,
    };
    h.bot.handle(edit, h.outbox.clone()).await;
    assert_eq!(
        h.store.channel_messages(&channel).await.unwrap()[0]
            .text
            .as_deref(),
        Some("typo")
    );
    h.bot
        .handle(
            Incoming::Deleted {
                channel: channel.clone(),
                message_id: "1".into(),
            },
            h.outbox.clone(),
        )
        .await;
    assert_eq!(
        h.store.channel_messages(&channel).await.unwrap()[0].text,
        None
    );
}

#[tokio::test]
async fn a_full_queue_says_so_instead_of_piling_up() {
    let h = harness(&[("QUEUE_CAPACITY", "1"), ("MAX_NEW_TOKENS", "200")]).await;
    for i in 0..4 {
        h.send(message(
            &format!("q{i}"),
            ChatKind::Direct,
            "1",
            &format!("u{i}"),
            "hello",
        ))
        .await;
    }
    let sent = h.outbox.wait_for(4).await;
    assert!(
        sent.iter().any(|(_, t, _)| t == kaiwa::bot::commands::BUSY),
        "{sent:?}"
    );
}

/// Forty people writing at once are all answered: admission follows the expected wait, not a
/// fixed count, and this burst takes seconds.
#[tokio::test]
async fn a_burst_is_answered_not_turned_away() {
    let h = harness(&[]).await;
    for i in 0..40 {
        h.send(message(
            &format!("chat{i}"),
            ChatKind::Direct,
            "1",
            &format!("u{i}"),
            "hello there",
        ))
        .await;
    }
    let sent = h.outbox.wait_for(40).await;
    assert!(
        sent.iter().all(|(_, t, _)| t != kaiwa::bot::commands::BUSY),
        "{sent:?}"
    );
}

/// When a reply would come too late, the person is told so, in their language.
#[tokio::test]
async fn busy_is_said_in_the_language_of_the_message() {
    let h = harness(&[("MAX_REPLY_WAIT_SECS", "0")]).await;
    h.send(message(
        "a",
        ChatKind::Direct,
        "1",
        "u1",
        "今日はとても忙しいですか？",
    ))
    .await;
    h.send(message("b", ChatKind::Direct, "1", "u2", "Are you there?"))
        .await;
    let sent = h.outbox.wait_for(2).await;
    let texts: Vec<&str> = sent.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(
        texts,
        [
            kaiwa::bot::commands::busy("今日はとても忙しいですか？"),
            kaiwa::bot::commands::BUSY
        ]
    );
    assert!(texts[0].contains("混み合って"));
}

#[tokio::test]
async fn the_corpus_export_writes_valid_alternating_chat_examples_without_opted_out_users() {
    let h = harness(&[]).await;
    h.send(message("x", ChatKind::Direct, "1", "u1", "good morning"))
        .await;
    h.outbox.wait_for(1).await;
    h.send(message("y", ChatKind::Direct, "1", "u2", "I will opt out"))
        .await;
    h.outbox.wait_for(2).await;
    h.send(message("y", ChatKind::Direct, "2", "u2", "/optout"))
        .await;
    h.outbox.wait_for(3).await;
    let dir = tempfile::tempdir().unwrap();
    let summary = kaiwa::corpus::export::export(&h.store, dir.path(), &Default::default())
        .await
        .unwrap();
    let text = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
    assert_eq!(summary.examples(), 1, "{text}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let roles: Vec<&str> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles.first(), Some(&"user"));
        assert_eq!(roles.last(), Some(&"assistant"));
        assert!(roles.windows(2).all(|w| w[0] != w[1]), "{roles:?}");
    }
    assert!(text.contains("good morning"));
    assert!(
        !text.contains("opt out"),
        "an opted-out user's messages were exported"
    );
}

/// `kaiwa bench bot` through the Telegram adapter and its loopback Bot API: every message is
/// answered over HTTP and stored, in both modes, with figures that add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_benchmark_answers_everything_through_telegram_and_in_process() {
    use kaiwa::bench::bot::{bench_bot, Through};
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kaiwa.db").display());
    let mut settings = kaiwa::config::Settings::from_lookup(|k| match k {
        "MAX_NEW_TOKENS" => Some("8".into()),
        _ => None,
    })
    .unwrap();
    settings.database_url = db.clone();
    let generator = std::sync::Arc::new(
        kaiwa::model::Generator::load(&crate::support::model::tiny_model_dir()).unwrap(),
    );
    let prompts = vec!["hello".to_string(), "今日の天気は？".to_string()];
    for through in [Through::Telegram, Through::Outbox] {
        let store = kaiwa::store::Store::open(&db).await.unwrap();
        let steps = bench_bot(
            settings.clone(),
            store,
            std::sync::Arc::clone(&generator),
            &prompts,
            &[1, 3],
            2,
            through,
        )
        .await
        .unwrap();
        assert_eq!(steps.len(), 2, "{through:?}");
        for (s, n) in steps.iter().zip([1, 3]) {
            assert_eq!(
                (s.channels, s.messages, s.not_answered),
                (n, n * 2, 0),
                "{through:?}"
            );
            assert!(s.p50_ms > 0.0 && s.p99_ms >= s.p50_ms && s.replies_per_s > 0.0);
        }
    }
    let store = kaiwa::store::Store::open(&db).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.replies_sent, stats.bot_messages),
        (16, 16),
        "every message answered once, the reply stored"
    );
}

/// A redelivered message (a platform replaying after a crash) does not use up its author's
/// cooldown: their next new message is answered.
#[tokio::test]
async fn a_redelivery_does_not_use_up_the_cooldown() {
    let h = harness(&[("USER_COOLDOWN_MS", "300")]).await;
    let first = message("c", ChatKind::Direct, "1", "u1", "hello");
    h.send(first.clone()).await;
    h.outbox.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.send(first).await;
    h.send(message("c", ChatKind::Direct, "2", "u1", "are you there?"))
        .await;
    let sent = h.outbox.wait_for(2).await;
    assert_eq!(sent[1].2.as_deref(), Some("2"), "{sent:?}");
}
