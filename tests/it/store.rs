//! The store on both engines: every test here runs once on a SQLite file and once on a real
//! PostgreSQL server (`support::db`), with the same assertions; the tests at the end compare the
//! engines with each other (schemas in step, the same export and the same retrieval from the
//! same content).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;

use crate::support::db::{Engine, TestDb};
use kaiwa::bot::event::{ChannelRef, ChatKind, Platform};
use kaiwa::corpus::import::Format;
use kaiwa::corpus::ingest::{import_file, ImportOptions};
use kaiwa::store::{
    AccessKind, AccessList, AccessRule, DocKind, Insert, NewMessage, ReplyProvenance, SharePolicy,
    Store, StoredAccess, TurnedAway,
};

/// Each listed `async fn(Engine)` as a test on each engine: `store::sqlite::<name>` and
/// `store::postgres::<name>`.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Engine::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Engine::Postgres).await
            })*
        }
    };
}

on_both_engines!(
    a_redelivered_message_is_one_row_and_one_claim,
    two_processes_racing_for_one_message_store_and_claim_it_once,
    edits_deletions_and_forgetting_reach_the_retrieval_index,
    channel_state_and_consent_are_read_from_the_store,
    recovery_finds_pending_replies_and_recent_channels,
    imports_are_one_transaction_and_export_with_consent,
    a_claim_is_taken_over_only_from_a_daemon_that_is_gone,
    access_rules_and_daily_counts_hold_across_processes,
);

fn message(chat: &str, id: &str, author: &str, text: &str, at: i64) -> NewMessage {
    NewMessage {
        channel: ChannelRef::new(Platform::Telegram, chat),
        kind: ChatKind::Group,
        message_id: id.into(),
        author_id: author.into(),
        author_name: format!("name-{author}"),
        author_is_bot: false,
        from_self: false,
        is_notice: false,
        text: text.into(),
        reply_to: None,
        sent_at_ms: at,
        source: "live".into(),
    }
}

fn provenance() -> ReplyProvenance {
    ReplyProvenance {
        model: "m".into(),
        settings: "{}".into(),
        prompt_tokens: 3,
        new_tokens: 4,
        latency_ms: 5,
        engine_source: "generated".into(),
        source_doc: None,
        source_message: None,
        scores: None,
    }
}

fn terms(text: &str) -> Vec<String> {
    kaiwa::text::retrieval_terms(text)
}

const SHARED: SharePolicy = SharePolicy {
    groups: true,
    direct: false,
};

async fn a_redelivered_message_is_one_row_and_one_claim(engine: Engine) {
    let db = TestDb::new(engine).await;
    let store = db.open().await;
    let m = message("c1", "1", "alice", "hello there", 1_000);
    let first = store.insert_message_and_claim(&m, true).await.unwrap();
    assert!(matches!(first, Insert::Stored(_)));
    assert_eq!(
        store.insert_message_and_claim(&m, true).await.unwrap(),
        Insert::Duplicate
    );
    assert!(
        !store.claim_reply(&m.channel, "1").await.unwrap(),
        "claimed already"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.messages, 1);
    assert_eq!(stats.channels, 1);
    assert_eq!(stats.users, 1);
    // The claim closes once: a second close leaves the first state.
    store
        .finish_reply(&m.channel, "1", &provenance())
        .await
        .unwrap();
    store.fail_reply(&m.channel, "1", "late").await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.replies_sent, stats.replies_failed), (1, 0));
    assert_eq!(stats.replies_generated, 1);
    assert_eq!(stats.per_platform, vec![("telegram".to_string(), 1)]);
    store.close().await;
}

/// Two pools on one database stand for two daemons: they race to store and claim the same
/// platform message (a redelivery to another replica), many times over.
async fn two_processes_racing_for_one_message_store_and_claim_it_once(engine: Engine) {
    let db = TestDb::new(engine).await;
    let stores = [db.open().await, db.open().await];
    for round in 0..20 {
        let m = Arc::new(message(
            "race",
            &round.to_string(),
            "bob",
            "who wins the race",
            round,
        ));
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let store = stores[i % 2].clone();
                let m = m.clone();
                tokio::spawn(async move { store.insert_message_and_claim(&m, true).await })
            })
            .collect();
        let mut stored = 0;
        for t in tasks {
            if let Insert::Stored(_) = t.await.unwrap().unwrap() {
                stored += 1;
            }
        }
        assert_eq!(stored, 1, "round {round}: one writer stores the message");
        assert!(!stores[round as usize % 2]
            .claim_reply(&m.channel, &m.message_id)
            .await
            .unwrap());
    }
    let stats = stores[0].stats().await.unwrap();
    assert_eq!(stats.messages, 20);
    let pending = stores[1].pending_replies(Platform::Telegram).await.unwrap();
    assert_eq!(pending.len(), 20, "one claim per message");
}

/// Three pools stand for daemons on one store: a pending claim stays with the daemon that made
/// it while that daemon is alive, and is taken over by exactly one other once it left; a claim
/// made by a store that never said it was alive (a kaiwa before the lease, a crashed process
/// long gone) is taken at once.
/// `/allow` and `/block` rules and the per-day counts are the store's, so every process on it
/// sees one process's change, and two processes cannot both take a person's last reply.
async fn access_rules_and_daily_counts_hold_across_processes(engine: Engine) {
    let db = TestDb::new(engine).await;
    let (a, b) = (db.open().await, db.open().await);
    let rule = |list, kind, id: &str| AccessRule {
        list,
        platform: Platform::Telegram,
        kind,
        id: id.into(),
    };
    let allow_7 = rule(AccessList::Allow, AccessKind::User, "7");
    assert!(a
        .set_access_rule(&allow_7, true, "telegram:admin")
        .await
        .unwrap());
    assert!(!a
        .set_access_rule(&allow_7, true, "telegram:admin")
        .await
        .unwrap());
    a.set_access_rule(
        &rule(AccessList::Block, AccessKind::User, "8"),
        true,
        "telegram:admin",
    )
    .await
    .unwrap();
    a.set_access_rule(
        &rule(AccessList::Allow, AccessKind::Chat, "-1"),
        true,
        "telegram:admin",
    )
    .await
    .unwrap();
    let seen = b
        .stored_access(Platform::Telegram, "7", "-1")
        .await
        .unwrap();
    assert_eq!(
        seen,
        StoredAccess {
            user_allowed: true,
            user_blocked: false,
            chat_allowed: true,
            chat_blocked: false,
            any_allowed_users: true,
            any_allowed_chats: true,
        }
    );
    let blocked = b.stored_access(Platform::Telegram, "8", "8").await.unwrap();
    assert!(blocked.user_blocked && !blocked.user_allowed && !blocked.chat_allowed);
    // Another platform's rules say nothing about this one.
    let discord = b.stored_access(Platform::Discord, "7", "-1").await.unwrap();
    assert_eq!(discord, StoredAccess::default());
    assert!(b
        .set_access_rule(&allow_7, false, "telegram:admin")
        .await
        .unwrap());
    assert_eq!(a.access_rules().await.unwrap().len(), 2);

    // Ten takes at once from two processes: exactly the quota's three succeed.
    let takes = (0..10).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { s.take_daily_reply(Platform::Telegram, "7", 100, 3).await })
    });
    let mut taken = 0;
    for t in takes {
        taken += usize::from(t.await.unwrap().unwrap());
    }
    assert_eq!(taken, 3);
    b.give_back_daily_reply(Platform::Telegram, "7", 100)
        .await
        .unwrap();
    assert!(a
        .take_daily_reply(Platform::Telegram, "7", 100, 3)
        .await
        .unwrap());
    assert!(!a
        .take_daily_reply(Platform::Telegram, "7", 100, 3)
        .await
        .unwrap());
    // The next day is a new day.
    assert!(a
        .take_daily_reply(Platform::Telegram, "7", 101, 3)
        .await
        .unwrap());

    // The day's first refusal and quota hit are each noticed once; all are counted.
    let turned = |s: &Store, day, why| {
        let s = s.clone();
        async move {
            s.record_turned_away(Platform::Telegram, "9", day, why)
                .await
                .unwrap()
        }
    };
    assert!(turned(&a, 100, TurnedAway::Refused).await);
    assert!(!turned(&b, 100, TurnedAway::Refused).await);
    assert!(turned(&b, 100, TurnedAway::OverQuota).await);
    assert!(turned(&a, 101, TurnedAway::Refused).await);
    let stats = b.stats().await.unwrap();
    assert_eq!((stats.refusals, stats.quota_hits), (3, 1));
}

async fn a_claim_is_taken_over_only_from_a_daemon_that_is_gone(engine: Engine) {
    let db = TestDb::new(engine).await;
    let (a, b, c) = (db.open().await, db.open().await, db.open().await);
    for s in [&a, &b, &c] {
        s.announce().await.unwrap();
    }
    let m = message("lease", "1", "bob", "still thinking about it", 1);
    let stored = a.insert_message_and_claim(&m, true).await.unwrap();
    assert!(matches!(stored, Insert::Stored(_)));
    assert!(a.take_over_claim(&m.channel, "1").await.unwrap(), "its own");
    for other in [&b, &c] {
        assert!(!other.take_over_claim(&m.channel, "1").await.unwrap());
    }
    a.leave().await.unwrap();
    let (by_b, by_c) = tokio::join!(
        b.take_over_claim(&m.channel, "1"),
        c.take_over_claim(&m.channel, "1")
    );
    assert!(
        by_b.unwrap() ^ by_c.unwrap(),
        "exactly one daemon takes a claim over"
    );
    // A sent reply is nobody's to take.
    b.mark_reply_sent(&m.channel, "1", "sent").await.unwrap();
    c.mark_reply_sent(&m.channel, "1", "sent").await.unwrap();
    assert!(!b.take_over_claim(&m.channel, "1").await.unwrap());

    let silent = db.open().await;
    let m = message(
        "lease",
        "2",
        "bob",
        "claimed by a store that never announced",
        2,
    );
    silent.insert_message_and_claim(&m, true).await.unwrap();
    assert!(b.take_over_claim(&m.channel, "2").await.unwrap());
    assert!(
        !c.take_over_claim(&m.channel, "2").await.unwrap(),
        "b is alive"
    );
}

async fn edits_deletions_and_forgetting_reach_the_retrieval_index(engine: Engine) {
    let db = TestDb::new(engine).await;
    let store = db.open().await;
    let c = ChannelRef::new(Platform::Telegram, "g");
    store
        .insert_message(&message("g", "1", "alice", "what about volcanoes", 1_000))
        .await
        .unwrap();
    store
        .insert_message(&message("g", "2", "bob", "volcanoes erupt lava", 2_000))
        .await
        .unwrap();
    let found = store
        .retrieve(DocKind::Pair, &terms("volcanoes"), SHARED, 5)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].text, "volcanoes erupt lava");
    assert_eq!(found[0].matched, "what about volcanoes");
    assert!(
        found[0].bm25 < 0.0,
        "bm25 as FTS5 gives it: lower is better"
    );
    // Not shared: a group that said /share off.
    store.set_shared(&c, false).await.unwrap();
    assert_eq!(store.shared(&c).await.unwrap(), Some(false));
    assert!(store
        .retrieve(DocKind::Pair, &terms("volcanoes"), SHARED, 5)
        .await
        .unwrap()
        .is_empty());
    store.set_shared(&c, true).await.unwrap();
    // An edit of the context moves the pair to its new terms.
    assert!(store
        .edit_message(&c, "1", "what about glaciers", 3_000)
        .await
        .unwrap());
    assert!(store
        .retrieve(DocKind::Pair, &terms("volcanoes"), SHARED, 5)
        .await
        .unwrap()
        .is_empty());
    let found = store
        .retrieve(DocKind::Pair, &terms("glaciers"), SHARED, 5)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    // The reply deleted: the pair is gone, the row stays as a tombstone.
    assert!(store.delete_message(&c, "2", 4_000).await.unwrap());
    assert!(store
        .retrieve(DocKind::Pair, &terms("glaciers"), SHARED, 5)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.stats().await.unwrap().deleted, 1);
    // A late redelivery does not bring it back.
    assert_eq!(
        store
            .insert_message(&message("g", "2", "bob", "volcanoes erupt lava", 2_000))
            .await
            .unwrap(),
        Insert::Duplicate
    );
    // A new pair, then its author forgotten.
    store
        .insert_message(&message("g", "3", "carol", "tell me about deserts", 5_000))
        .await
        .unwrap();
    store
        .insert_message(&message("g", "4", "dave", "deserts are dry", 6_000))
        .await
        .unwrap();
    assert_eq!(
        store
            .retrieval_counts()
            .await
            .unwrap()
            .get(&DocKind::Pair)
            .copied(),
        Some(2),
        "glaciers→(deleted) is gone, alice→… never paired with a deleted reply; carol→dave"
    );
    assert_eq!(
        store.forget_user(Platform::Telegram, "dave").await.unwrap(),
        1
    );
    assert!(store
        .retrieve(DocKind::Pair, &terms("deserts"), SHARED, 5)
        .await
        .unwrap()
        .is_empty());
    let (df, _) = store.term_frequencies(&terms("deserts")).await.unwrap();
    assert!(df.is_empty(), "the forgotten pair left the index: {df:?}");
}

async fn channel_state_and_consent_are_read_from_the_store(engine: Engine) {
    let db = TestDb::new(engine).await;
    // Two handles: what one process sets, the other reads.
    let (a, b) = (db.open().await, db.open().await);
    let c = ChannelRef::new(Platform::Discord, "chan").with_thread("t");
    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        let mut m = message("chan", &i.to_string(), "erin", text, 1_000 * (i as i64 + 1));
        m.channel = c.clone();
        a.insert_message(&m).await.unwrap();
    }
    let texts = |ms: Vec<kaiwa::store::StoredMessage>| -> Vec<String> {
        ms.into_iter().filter_map(|m| m.text).collect()
    };
    assert_eq!(
        texts(b.channel_context(&c, 0, 2).await.unwrap()),
        ["two", "three"]
    );
    a.reset_channel(&c, 2_500).await.unwrap();
    assert_eq!(
        texts(b.channel_context(&c, 0, 10).await.unwrap()),
        ["three"]
    );
    assert_eq!(b.channel_messages(&c).await.unwrap().len(), 3);
    assert!(!b.answers_all(&c).await.unwrap());
    a.set_answers_all(&c, true).await.unwrap();
    assert!(b.answers_all(&c).await.unwrap());
    assert_eq!(b.shared(&c).await.unwrap(), None);
    assert!(!b.is_opted_out(Platform::Discord, "erin").await.unwrap());
    a.set_opted_out(Platform::Discord, "erin", true)
        .await
        .unwrap();
    a.set_opted_out(Platform::Discord, "erin", true)
        .await
        .unwrap();
    assert!(b.is_opted_out(Platform::Discord, "erin").await.unwrap());
    assert_eq!(b.stats().await.unwrap().opted_out_users, 1);
    a.set_opted_out(Platform::Discord, "erin", false)
        .await
        .unwrap();
    assert!(!b.is_opted_out(Platform::Discord, "erin").await.unwrap());
    // Reactions and the store's settings.
    a.record_reaction(&c, "2", "frank", "👍", true)
        .await
        .unwrap();
    assert_eq!(
        b.reactions_by(&c, "frank").await.unwrap(),
        vec![("2".to_string(), "👍".to_string())]
    );
    a.record_reaction(&c, "2", "frank", "👍", false)
        .await
        .unwrap();
    assert!(b.reactions_by(&c, "frank").await.unwrap().is_empty());
    let salt = a.meta_or_insert("salt", || "first".into()).await.unwrap();
    assert_eq!(salt, "first");
    assert_eq!(
        b.meta_or_insert("salt", || "second".into()).await.unwrap(),
        "first"
    );
}

async fn recovery_finds_pending_replies_and_recent_channels(engine: Engine) {
    let db = TestDb::new(engine).await;
    let store = db.open().await;
    let mut dm = message("dm", "1", "gina", "hi", 1_000);
    dm.kind = ChatKind::Direct;
    store.insert_message_and_claim(&dm, true).await.unwrap();
    store
        .insert_message(&message("grp", "5", "hank", "older", 2_000))
        .await
        .unwrap();
    store
        .insert_message(&message("grp", "6", "hank", "newest", 3_000))
        .await
        .unwrap();
    store
        .insert_message(&message("old", "1", "ivan", "long ago", 10))
        .await
        .unwrap();
    let pending = store.pending_replies(Platform::Telegram).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].chat_kind, ChatKind::Direct);
    let mut recent = store
        .recent_channels(Platform::Telegram, 500)
        .await
        .unwrap();
    recent.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        recent,
        vec![
            ("dm".to_string(), ChatKind::Direct, "1".to_string()),
            ("grp".to_string(), ChatKind::Group, "6".to_string()),
        ]
    );
    // The reply goes out: its last part and the claim's close in one transaction.
    let mut last = message("dm", "r1", "kaiwa", "hello!", 1_500);
    last.kind = ChatKind::Direct;
    last.from_self = true;
    last.reply_to = Some("1".into());
    store
        .finish_reply_with_last_part(&last, "1", &provenance())
        .await
        .unwrap();
    assert!(store
        .pending_replies(Platform::Telegram)
        .await
        .unwrap()
        .is_empty());
    assert!(store.has_own_answer(&dm.channel, "1").await.unwrap());
    assert!(store.is_own_reply(&dm.channel, "r1").await.unwrap());
    assert!(!store.is_own_reply(&dm.channel, "1").await.unwrap());
}

async fn imports_are_one_transaction_and_export_with_consent(engine: Engine) {
    let db = TestDb::new(engine).await;
    let store = db.open().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chats.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for (u, a) in [
        ("how do tides work", "the moon pulls the sea"),
        ("潮の満ち引きはなぜ起きるの", "月の引力のせいです"),
    ] {
        let line = serde_json::json!({"messages": [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": u},
            {"role": "assistant", "content": a},
        ]});
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    let options = ImportOptions::new(Format::Openai);
    import_file(&store, &path, &options).await.unwrap();
    // Importing again stores nothing twice.
    import_file(&store, &path, &options).await.unwrap();
    let imports = store.imports().await.unwrap();
    assert_eq!(imports.len(), 2);
    assert_eq!(imports[0].messages, 6);
    assert_eq!(imports[1].duplicates, 6);
    assert!(store.has_source(&imports[0].source).await.unwrap());
    assert!(!store.has_source("nothing-like-it").await.unwrap());
    for (query, want) in [
        ("tides", "the moon pulls the sea"),
        ("潮の満ち引き", "月の引力のせいです"),
    ] {
        let found = store
            .retrieve(DocKind::Pair, &terms(query), SharePolicy::default(), 3)
            .await
            .unwrap();
        assert_eq!(
            found.first().map(|r| r.text.as_str()),
            Some(want),
            "{query}"
        );
    }
    let n = store.count_corpus_rows(&Default::default()).await.unwrap();
    assert_eq!(n, 6);
    let out = tempfile::tempdir().unwrap();
    kaiwa::corpus::export::export(&store, out.path(), &Default::default())
        .await
        .unwrap();
    let train = std::fs::read_to_string(out.path().join("train.jsonl")).unwrap_or_default();
    let valid = std::fs::read_to_string(out.path().join("valid.jsonl")).unwrap_or_default();
    assert_eq!(
        train.lines().count() + valid.lines().count(),
        2,
        "two conversations"
    );
}

/// Tables and their columns as `(name, kind, nullable)`, kinds as SQLite declares them
/// (PostgreSQL's BIGINT and BOOLEAN are SQLite's INTEGER), without what one engine has for
/// itself: SQLite's FTS5 tables, PostgreSQL's posting table and documents' term counts.
async fn schema(db: &TestDb) -> BTreeMap<String, Vec<(String, String, bool)>> {
    let store_rows: Vec<(String, String, String, bool)> = match db.engine {
        Engine::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            // A primary key column counts as NOT NULL: PostgreSQL makes it so, and SQLite's
            // NULL in a non-integer key is a known quirk kaiwa never writes.
            let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
                "SELECT t.name, c.name, c.type, c.\"notnull\" OR c.pk > 0 FROM sqlite_master t
                 JOIN pragma_table_info(t.name) c
                 WHERE t.type = 'table' AND t.name NOT LIKE 'sqlite_%'
                   AND t.name NOT LIKE 'retrieval_%_index%' AND t.name NOT LIKE 'retrieval_%_vocab'
                 ORDER BY t.name, c.cid",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows.into_iter()
                .map(|(t, c, k, nn)| (t, c, k.to_uppercase(), nn == 0))
                .collect()
        }
        Engine::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            let rows: Vec<(String, String, String, String)> = sqlx::query_as(
                "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text
                 FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name <> 'retrieval_postings'
                   AND NOT (table_name = 'retrieval_docs' AND column_name = 'term_count')
                 ORDER BY table_name, ordinal_position",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows.into_iter()
                .map(|(t, c, k, n)| {
                    let kind = match k.as_str() {
                        "bigint" | "boolean" => "INTEGER".to_string(),
                        "text" => "TEXT".to_string(),
                        other => other.to_uppercase(),
                    };
                    (t, c, kind, n == "YES")
                })
                .collect()
        }
    };
    let mut out: BTreeMap<String, Vec<(String, String, bool)>> = BTreeMap::new();
    for (table, column, kind, nullable) in store_rows {
        // sqlx's own bookkeeping differs by engine; its versions are compared below.
        if table == "_sqlx_migrations" {
            continue;
        }
        out.entry(table).or_default().push((column, kind, nullable));
    }
    out
}

async fn migrations(db: &TestDb) -> Vec<(i64, String)> {
    let q = "SELECT version, description FROM _sqlx_migrations ORDER BY version";
    match db.engine {
        Engine::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            sqlx::query_as(q).fetch_all(&pool).await.unwrap()
        }
        Engine::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            sqlx::query_as(q).fetch_all(&pool).await.unwrap()
        }
    }
}

#[tokio::test]
async fn the_two_engines_migrations_are_in_step() {
    let (lite, pg) = (
        TestDb::new(Engine::Sqlite).await,
        TestDb::new(Engine::Postgres).await,
    );
    lite.open().await.close().await;
    pg.open().await.close().await;
    assert_eq!(migrations(&lite).await, migrations(&pg).await);
    let (a, b) = (schema(&lite).await, schema(&pg).await);
    assert!(a.contains_key("messages") && a.len() >= 8, "{a:?}");
    assert_eq!(a, b, "migrations/sqlite and migrations/postgres disagree");
    // Opening again (another process starting) applies nothing twice.
    pg.open().await.close().await;
    assert_eq!(migrations(&pg).await.len(), migrations(&lite).await.len());
}

/// The same corpus in both engines gives the same candidates, in the same order, with the same
/// bm25 (to rounding), and the same export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_retrieve_and_export_the_same_from_the_same_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chats.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    let topics = [
        ("weather", "天気"),
        ("cooking", "料理"),
        ("trains", "電車"),
        ("music", "音楽"),
        ("books", "本屋"),
    ];
    for i in 0..60 {
        let (en, ja) = topics[i % topics.len()];
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("question {i} about {en} and more {en} talk")},
            {"role": "assistant", "content": format!("answer {i}: {en} is fun")},
            {"role": "user", "content": format!("{ja}について{i}番目の質問です")},
            {"role": "assistant", "content": format!("{ja}の答え{i}")},
        ]});
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    let mut results = Vec::new();
    let mut exports = Vec::new();
    for engine in [Engine::Sqlite, Engine::Postgres] {
        let db = TestDb::new(engine).await;
        let store: Store = db.open().await;
        import_file(&store, &path, &ImportOptions::new(Format::Openai))
            .await
            .unwrap();
        store
            .add_sentences(
                "sentences",
                [
                    "the weather is sunny today",
                    "今日の天気は晴れです",
                    "books and trains",
                ],
            )
            .await
            .unwrap();
        let mut found = Vec::new();
        for q in [
            "what about the weather",
            "cooking and music talk",
            "天気について",
            "電車の質問",
            "books trains",
        ] {
            for kind in [DocKind::Pair, DocKind::Sentence] {
                let rows = store
                    .retrieve(kind, &terms(q), SharePolicy::default(), 8)
                    .await
                    .unwrap();
                found.push(
                    rows.into_iter()
                        .map(|r| (r.text, r.matched, (r.bm25 * 1e9).round() as i64))
                        .collect::<Vec<_>>(),
                );
            }
            let (df, _) = store.term_frequencies(&terms(q)).await.unwrap();
            found.push(
                df.into_iter()
                    .map(|(t, n)| (t, String::new(), n))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            );
        }
        assert!(
            found.iter().any(|f| f.len() >= 8),
            "retrieval found too little: {found:?}"
        );
        results.push(found);
        let out = tempfile::tempdir().unwrap();
        kaiwa::corpus::export::export(&store, out.path(), &Default::default())
            .await
            .unwrap();
        exports.push(
            ["train.jsonl", "valid.jsonl"]
                .map(|n| std::fs::read_to_string(out.path().join(n)).unwrap_or_default()),
        );
    }
    assert_eq!(
        results[0], results[1],
        "SQLite and PostgreSQL retrieve differently"
    );
    assert_eq!(
        exports[0], exports[1],
        "SQLite and PostgreSQL export differently"
    );
}
