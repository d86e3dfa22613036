//! Who may talk to the bot: allow and block lists (the settings' and `/allow`/`/block` at run
//! time, held in the store), what a refused person gets and what is kept of them, the daily
//! quota on an injected clock, and Discord servers not on `ALLOWED_GUILDS`. The core runs with
//! a recording outbox (`support::core`); Telegram and Discord through their loopback fakes.

use std::time::Duration;

use crate::support::core::{harness, harness_with_clock, message, Harness};
use crate::support::daemon::{spawn_daemon, spawn_daemon_on, Peer, WAIT};
use crate::support::db::{Engine, TestDb};
use crate::support::discord::{FakeDiscord, FakeUser, MessageBuilder, TOKEN};
use crate::support::telegram::{group_chat, private_chat, user, FakeTelegram};
use kaiwa::bot::event::{ChannelRef, ChatKind, IncomingMessage, Platform};
use kaiwa::clock::Clock;

fn telegram(chat: &str) -> ChannelRef {
    ChannelRef::new(Platform::Telegram, chat)
}

/// A direct message from `author` (Telegram: the chat is the person).
fn dm(author: &str, id: &str, text: &str) -> IncomingMessage {
    message(author, ChatKind::Direct, id, author, text)
}

/// A message in group `-1` mentioning the bot.
fn mention(author: &str, id: &str, text: &str) -> IncomingMessage {
    let mut m = message("-1", ChatKind::Group, id, author, text);
    m.mentions_bot = true;
    m
}

/// What the bot sent to `chat`.
fn sent_to(h: &Harness, chat: &str) -> Vec<String> {
    h.outbox
        .sent()
        .into_iter()
        .filter(|(c, _, _)| c.chat_id == chat)
        .map(|(_, text, _)| text)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_message_from_an_allowed_user_is_stored_and_answered_and_from_anyone_else_neither()
{
    let h = harness(&[("ALLOWED_USERS", "telegram:7")]).await;
    h.send(dm("8", "s1", "hello, who are you?")).await;
    h.send(dm("7", "a1", "hello, who are you?")).await;
    h.outbox.wait_for(1).await;
    let rows = h.store.channel_messages(&telegram("7")).await.unwrap();
    assert!(rows.iter().any(|r| r.message_id == "a1") && rows.iter().any(|r| r.from_self));
    // The stranger's words were never stored, and they got no reply (no notice by default).
    assert!(h
        .store
        .channel_messages(&telegram("8"))
        .await
        .unwrap()
        .is_empty());
    assert!(sent_to(&h, "8").is_empty(), "{:?}", h.outbox.sent());
    // Admins are always allowed.
    h.send(dm("admin", "ad1", "hello")).await;
    h.outbox.wait_for(2).await;
    let stats = h.store.stats().await.unwrap();
    assert_eq!((stats.refusals, stats.quota_hits), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_user_in_an_allowed_group_is_stored_but_not_answered() {
    let h = harness(&[("BLOCKED_USERS", "telegram:8")]).await;
    h.send(mention("8", "g1", "bot, what do you think?")).await;
    h.send(mention("7", "g2", "and you, bot?")).await;
    let sent = h.outbox.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.outbox.sent().len(), 1, "{sent:?}");
    assert_eq!(sent[0].2.as_deref(), Some("g2"));
    let rows = h.store.channel_messages(&telegram("-1")).await.unwrap();
    let blocked = rows.iter().find(|r| r.message_id == "g1").expect("stored");
    assert_eq!(blocked.text.as_deref(), Some("bot, what do you think?"));
    // Never claimed for a reply: nothing for a restart to answer.
    assert!(h
        .store
        .pending_replies(Platform::Telegram)
        .await
        .unwrap()
        .is_empty());
    // Their privacy commands still work.
    h.send(message("-1", ChatKind::Group, "g3", "8", "/forgetme"))
        .await;
    let rows = h.store.channel_messages(&telegram("-1")).await.unwrap();
    assert!(!rows.iter().any(|r| r.author_id == "8"), "{rows:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_outside_the_allow_list_are_listened_to_in_groups_but_not_answered() {
    let h = harness(&[("ALLOWED_USERS", "telegram:7")]).await;
    h.send(message("-1", ChatKind::Group, "p1", "8", "just chatting"))
        .await;
    h.send(mention("8", "p2", "bot?")).await;
    h.send(mention("7", "p3", "bot!")).await;
    let sent = h.outbox.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.outbox.sent().len(), 1);
    assert_eq!(sent[0].2.as_deref(), Some("p3"));
    let rows = h.store.channel_messages(&telegram("-1")).await.unwrap();
    for id in ["p1", "p2", "p3"] {
        assert!(rows.iter().any(|r| r.message_id == id), "{id} not stored");
    }
    // Only the message addressed to the bot counts as a refusal.
    assert_eq!(h.store.stats().await.unwrap().refusals, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_person_gets_one_notice_a_day_in_their_language_when_the_operator_asks() {
    let clock = Clock::manual(1_800_000_000_000);
    let h = harness_with_clock(
        &[("ALLOWED_USERS", "telegram:7"), ("REFUSAL_NOTICE", "1")],
        clock.clone(),
    )
    .await;
    h.send(dm("8", "n1", "こんにちは、元気ですか？")).await;
    h.send(dm("8", "n2", "もしもし")).await;
    let notices = sent_to(&h, "8");
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains("許可"), "{notices:?}");
    // The notice is stored as a notice (out of the corpus); the stranger's words are not.
    let rows = h.store.channel_messages(&telegram("8")).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert!(rows[0].from_self && rows[0].is_notice);
    clock.advance(Duration::from_secs(24 * 60 * 60));
    h.send(dm("8", "n3", "hello again")).await;
    let notices = sent_to(&h, "8");
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert!(notices[1].starts_with("Sorry"), "{notices:?}");
    assert_eq!(h.store.stats().await.unwrap().refusals, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_quota_stops_the_next_reply_and_resets_the_next_day() {
    let clock = Clock::manual(1_800_000_000_000);
    let h = harness_with_clock(&[("DAILY_QUOTA", "2")], clock.clone()).await;
    h.send(dm("7", "q1", "hello there")).await;
    h.send(dm("7", "q2", "how are you?")).await;
    h.outbox.wait_for(2).await;
    h.send(dm("7", "q3", "one more?")).await;
    h.send(dm("7", "q4", "and another?")).await;
    let sent = h.outbox.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.outbox.sent().len(), 3, "{:?}", h.outbox.sent());
    assert_eq!(sent[2].2.as_deref(), Some("q3"));
    assert!(sent[2].1.contains("2 replies"), "{sent:?}");
    // Admins have no quota.
    for i in 0..3 {
        h.send(dm("admin", &format!("ad{i}"), "hello")).await;
    }
    h.outbox.wait_for(6).await;
    // The next UTC day the person is answered again.
    clock.advance(Duration::from_secs(24 * 60 * 60));
    h.send(dm("7", "q5", "good morning")).await;
    let sent = h.outbox.wait_for(7).await;
    assert_eq!(sent[6].2.as_deref(), Some("q5"));
    assert_eq!(h.store.stats().await.unwrap().quota_hits, 2);
    // A redelivered message does not use up a reply of the day.
    h.send(dm("7", "q5", "good morning")).await;
    h.send(dm("7", "q6", "still there?")).await;
    let sent = h.outbox.wait_for(8).await;
    assert_eq!(sent[7].2.as_deref(), Some("q6"));
}

/// `/allow` and `/block` at run time hold in every process on the store at once, and after a
/// restart; `/unallow` undoes it. On both engines.
async fn allow_and_block_at_run_time_hold_everywhere_and_survive_a_restart(engine: Engine) {
    let db = TestDb::new(engine).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("ALLOWED_USERS", "telegram:7"),
    ];
    let a = harness(&env).await;
    let b = harness(&env).await;
    a.send(dm("9", "x1", "hello?")).await;
    assert!(sent_to(&a, "9").is_empty());
    a.send(dm("admin", "c1", "/allow telegram:9")).await;
    let answer = a.outbox.wait_for(1).await;
    assert!(
        answer[0].1.contains("telegram:9 may talk to me"),
        "{answer:?}"
    );
    // Another process on the store follows at once.
    b.send(dm("9", "x2", "hello now?")).await;
    let sent = b.outbox.wait_for(1).await;
    assert_eq!(sent[0].2.as_deref(), Some("x2"));
    // …and a restart keeps it.
    drop(a);
    let c = harness(&env).await;
    c.send(dm("9", "x3", "still?")).await;
    assert_eq!(c.outbox.wait_for(1).await[0].2.as_deref(), Some("x3"));
    // /block in reply to someone's message blocks its author.
    c.send(mention("7", "g1", "hi bot")).await;
    c.outbox.wait_for(2).await;
    let mut block = message("-1", ChatKind::Group, "g2", "admin", "/block");
    block.reply_to = Some("g1".into());
    c.send(block).await;
    let answer = c.outbox.wait_for(3).await;
    assert!(answer[2].1.contains("telegram:7 is blocked"), "{answer:?}");
    b.send(mention("7", "g3", "hi again bot")).await;
    b.send(dm("admin", "c2", "/unallow telegram:9")).await;
    b.send(dm("9", "x4", "and now?")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replied: Vec<_> = b.outbox.sent().into_iter().filter_map(|s| s.2).collect();
    assert_eq!(replied, ["x2", "c2"], "{:?}", b.outbox.sent());
    let rows = c.store.access_rules().await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allow_and_block_at_run_time_hold_everywhere_and_survive_a_restart() {
        super::allow_and_block_at_run_time_hold_everywhere_and_survive_a_restart(
            super::Engine::Sqlite,
        )
        .await
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allow_and_block_at_run_time_hold_everywhere_and_survive_a_restart() {
        super::allow_and_block_at_run_time_hold_everywhere_and_survive_a_restart(
            super::Engine::Postgres,
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_lists_cannot_be_undone_from_the_chat() {
    let h = harness(&[("BLOCKED_USERS", "telegram:8")]).await;
    h.send(dm("admin", "c1", "/unblock telegram:8")).await;
    h.send(dm("admin", "c2", "/allow")).await;
    h.send(dm("7", "c3", "/allow telegram:7")).await;
    let sent = h.outbox.wait_for(3).await;
    assert!(sent[0].1.contains("BLOCKED_USERS"), "{sent:?}");
    assert!(sent[1].1.contains("blocked: telegram:8"), "{sent:?}");
    assert!(sent[2].1.contains("for admins"), "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_telegram_a_private_bot_answers_its_owner_only() {
    let (fake, daemon) = spawn_daemon::<FakeTelegram>(&[("ALLOWED_USERS", "telegram:1001")]).await;
    let (ann, bob) = (user(1001, "Ann"), user(1002, "Bob"));
    fake.push_message(&fake.message(&private_chat(&bob), &bob, "hello, anyone there?"));
    let group = group_chat(-500, "friends");
    fake.push_message(&fake.message(&group, &bob, "just chatting"));
    fake.push_message(&fake.message(&private_chat(&ann), &ann, "hello there"));
    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].chat_id, 1001);
    daemon
        .wait_for_rows(&telegram("-500"), "the group message", |r| !r.is_empty())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.sent().len(), 1);
    let bobs = daemon
        .store()
        .channel_messages(&telegram("1002"))
        .await
        .unwrap();
    assert!(bobs.is_empty(), "{bobs:#?}");
    daemon.stop().await.unwrap();
}

const LISTED: &str = "1100000000000000001";
const LISTED_CHANNEL: &str = "1200000000000000001";
const UNLISTED: &str = "1100000000000000002";
const UNLISTED_CHANNEL: &str = "1200000000000000002";

fn alice() -> FakeUser {
    FakeUser::person("2000000000000000001", "alice")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discord_server_not_on_allowed_guilds_is_not_served() {
    let fake = FakeDiscord::start(TOKEN).await;
    fake.add_guild(LISTED, &[LISTED_CHANNEL]);
    fake.add_guild(UNLISTED, &[UNLISTED_CHANNEL]);
    let allowed = format!("discord:{LISTED}");
    let daemon = spawn_daemon_on(&fake, &[("ALLOWED_GUILDS", allowed.as_str())]).await;
    fake.connected(&daemon).await;
    daemon
        .wait_for_log("server not on ALLOWED_GUILDS; ignoring it")
        .await;
    let elsewhere = MessageBuilder::in_guild(UNLISTED, UNLISTED_CHANNEL, &alice(), "hi bot")
        .mentioning(fake.bot_user())
        .build();
    fake.dispatch_message_create(elsewhere);
    let here = MessageBuilder::in_guild(LISTED, LISTED_CHANNEL, &alice(), "hi bot")
        .mentioning(fake.bot_user())
        .build();
    fake.dispatch_message_create(here);
    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].channel_id, LISTED_CHANNEL);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.sent().len(), 1, "{}", fake.summary());
    let channel = ChannelRef::new(Platform::Discord, UNLISTED_CHANNEL);
    assert!(daemon
        .store()
        .channel_messages(&channel)
        .await
        .unwrap()
        .is_empty());
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discord_server_not_on_allowed_guilds_is_left_when_the_operator_says_so() {
    let fake = FakeDiscord::start(TOKEN).await;
    fake.add_guild(LISTED, &[LISTED_CHANNEL]);
    fake.add_guild(UNLISTED, &[UNLISTED_CHANNEL]);
    let allowed = format!("discord:{LISTED}");
    let daemon = spawn_daemon_on(
        &fake,
        &[
            ("ALLOWED_GUILDS", allowed.as_str()),
            ("DISCORD_UNLISTED_GUILDS", "leave"),
        ],
    )
    .await;
    fake.connected(&daemon).await;
    daemon
        .wait_for_log("server not on ALLOWED_GUILDS; left it")
        .await;
    let requests = fake.requests();
    let leave = format!("DELETE /api/v10/users/@me/guilds/{UNLISTED} -> 204");
    assert!(requests.contains(&leave), "{requests:?}");
    assert!(!requests
        .iter()
        .any(|r| r.contains(&format!("guilds/{LISTED}"))));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_discord_allowed_roles_pick_who_is_answered() {
    let role = "3000000000000000001";
    let (fake, daemon) =
        spawn_daemon::<FakeDiscord>(&[("ALLOWED_ROLES", &format!("discord:{role}"))]).await;
    let bob = FakeUser::person("2000000000000000002", "bob");
    let without = MessageBuilder::in_guild(LISTED, LISTED_CHANNEL, &bob, "hi bot")
        .mentioning(fake.bot_user())
        .build();
    fake.dispatch_message_create(without.clone());
    let mut with = MessageBuilder::in_guild(LISTED, LISTED_CHANNEL, &alice(), "hi bot")
        .mentioning(fake.bot_user())
        .build();
    with["member"]["roles"] = serde_json::json!([role]);
    fake.dispatch_message_create(with.clone());
    let sent = fake.wait_for_sent(1, WAIT).await;
    assert_eq!(sent[0].reply_to.as_deref(), with["id"].as_str());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.sent().len(), 1, "{}", fake.summary());
    let channel = ChannelRef::new(Platform::Discord, LISTED_CHANNEL);
    let rows = daemon.store().channel_messages(&channel).await.unwrap();
    assert!(rows
        .iter()
        .any(|r| Some(r.message_id.as_str()) == without["id"].as_str()));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_here_serves_only_the_chats_allowed() {
    let h = harness(&[]).await;
    h.send(message("-1", ChatKind::Group, "c1", "admin", "/allow here"))
        .await;
    let answer = h.outbox.wait_for(1).await;
    assert!(answer[0].1.contains("only the chats"), "{answer:?}");
    let mut elsewhere = mention("7", "e1", "hello bot");
    elsewhere.channel = telegram("-2");
    h.send(elsewhere).await;
    h.send(mention("7", "h1", "hello bot")).await;
    let sent = h.outbox.wait_for(2).await;
    assert_eq!(sent[1].2.as_deref(), Some("h1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.outbox.sent().len(), 2);
    assert!(h
        .store
        .channel_messages(&telegram("-2"))
        .await
        .unwrap()
        .is_empty());
    // A stranger's direct message is no longer answered either.
    h.send(dm("7", "d1", "hello")).await;
    assert!(h
        .store
        .channel_messages(&telegram("7"))
        .await
        .unwrap()
        .is_empty());
}
