//! The store's side of the corpus: imported conversations come in through one transaction
//! ([`ImportTx`]), and the export reads every conversation back out as a stream of rows
//! ([`Store::for_each_corpus_row`]) with consent applied in SQL, so an opted-out user's words
//! or a deleted message can never reach a training file. Reactions (feedback on replies) and the
//! store's own settings live here too.

use std::collections::{HashMap, HashSet};

use futures_util::TryStreamExt;
use sqlx::{Database, Encode, QueryBuilder, Type};

use super::{insert_row, now_ms, Engine, Insert, NewRow, Store, StoreError, StoredMessage, Tx};
use crate::domain::{ChannelRef, Platform};

/// A message of an imported conversation, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedRow {
    pub platform: Platform,
    pub chat_id: String,
    pub direct: bool,
    pub message_id: String,
    pub author_id: String,
    pub author_name: String,
    pub author_is_bot: bool,
    /// On the assistant side of the conversation (stored like kaiwa's own replies).
    pub from_self: bool,
    pub is_system: bool,
    pub text: String,
    pub reply_to: Option<String>,
    pub sent_at_ms: i64,
}

/// What an import did, recorded in the `imports` table when it commits.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ImportRecord {
    pub source: String,
    pub format: String,
    pub path: String,
    pub conversations: u64,
    pub messages: u64,
    pub duplicates: u64,
    pub skipped: u64,
}

/// What inserting an imported message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportInsert {
    Stored,
    /// Already in the store (imported before, or collected live).
    Duplicate,
    /// Its author opted out on that platform: not stored.
    OptedOut,
}

/// An import in progress: everything it writes becomes visible at [`ImportTx::commit`], and
/// nothing does if it is dropped before (an error, an interrupted run).
pub struct ImportTx {
    tx: Tx,
    source: String,
    /// Opted-out user ids by platform.
    opted_out: HashMap<String, HashSet<String>>,
}

impl Store {
    /// Starts an import whose rows are tagged with `source`.
    pub async fn begin_import(&self, source: &str) -> Result<ImportTx, StoreError> {
        let mut tx = self.begin().await?;
        let opted_out: Vec<(String, String)> = on_engine!(&mut tx, |t| sqlx::query_as(
            "SELECT platform, user_id FROM opt_outs"
        )
        .fetch_all(&mut **t)
        .await?);
        let mut by_platform: HashMap<String, HashSet<String>> = HashMap::new();
        for (platform, user) in opted_out {
            by_platform.entry(platform).or_default().insert(user);
        }
        Ok(ImportTx {
            tx,
            source: source.to_string(),
            opted_out: by_platform,
        })
    }

    /// The imports that committed, oldest first.
    pub async fn imports(&self) -> Result<Vec<ImportRecord>, StoreError> {
        let rows: Vec<(String, String, String, i64, i64, i64, i64)> =
            on_engine!(&self.pool, |p| sqlx::query_as(
                "SELECT source, format, path, conversations, messages, duplicates, skipped
                 FROM imports ORDER BY id",
            )
            .fetch_all(p)
            .await?);
        Ok(rows
            .into_iter()
            .map(|r| ImportRecord {
                source: r.0,
                format: r.1,
                path: r.2,
                conversations: r.3 as u64,
                messages: r.4 as u64,
                duplicates: r.5 as u64,
                skipped: r.6 as u64,
            })
            .collect())
    }
}

impl ImportTx {
    /// Stores one message unless it is already stored or its author opted out.
    pub async fn insert(&mut self, r: &ImportedRow) -> Result<ImportInsert, StoreError> {
        if self
            .opted_out
            .get(r.platform.as_str())
            .is_some_and(|users| users.contains(&r.author_id))
        {
            return Ok(ImportInsert::OptedOut);
        }
        let row = NewRow {
            platform: r.platform.as_str(),
            chat_id: &r.chat_id,
            thread_id: "",
            direct: r.direct,
            message_id: &r.message_id,
            author_id: &r.author_id,
            author_name: &r.author_name,
            author_is_bot: r.author_is_bot,
            from_self: r.from_self,
            is_notice: false,
            is_system: r.is_system,
            text: &r.text,
            reply_to: r.reply_to.as_deref(),
            sent_at_ms: r.sent_at_ms,
            source: &self.source,
        };
        Ok(match insert_row(&mut self.tx, &row).await? {
            Insert::Stored(id) => {
                super::retrieval::index_reply(&mut self.tx, id, &row).await?;
                ImportInsert::Stored
            }
            Insert::Duplicate => ImportInsert::Duplicate,
        })
    }

    /// Makes the import visible, recording it in the `imports` table.
    pub async fn commit(mut self, record: &ImportRecord) -> Result<(), StoreError> {
        on_engine!(&mut self.tx, |t| sqlx::query(
            "INSERT INTO imports (source, format, path, at_ms, conversations, messages,
                duplicates, skipped)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&record.source)
        .bind(&record.format)
        .bind(&record.path)
        .bind(now_ms())
        .bind(record.conversations as i64)
        .bind(record.messages as i64)
        .bind(record.duplicates as i64)
        .bind(record.skipped as i64)
        .execute(&mut **t)
        .await?
        .rows_affected());
        self.tx.commit().await?;
        Ok(())
    }
}

/// Which stored conversations an export reads. Empty lists mean "all".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CorpusFilter {
    pub platforms: Vec<String>,
    pub channels: Vec<String>,
    pub sources: Vec<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Bounds on when messages were stored (not sent): an import of old chats is new to the
    /// store (`kaiwa retrain` reads what arrived since the deployed model's data).
    pub stored_since_ms: Option<i64>,
    pub stored_until_ms: Option<i64>,
}

/// A message as the export reads it, with the reactions people left on it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CorpusRow {
    #[sqlx(flatten)]
    pub message: StoredMessage,
    /// The emoji of every reaction on the message (one entry per user and emoji), from users
    /// who have not opted out; separated by U+001F.
    reactions: Option<String>,
    /// For the bot's replies, how the reply engine made it (`replies.engine_source`).
    engine_source: Option<String>,
}

impl CorpusRow {
    /// The emoji of every reaction on the message, one entry per user and emoji.
    pub fn reactions(&self) -> impl Iterator<Item = &str> {
        self.reactions
            .as_deref()
            .unwrap_or("")
            .split('\u{1f}')
            .filter(|s| !s.is_empty())
    }

    /// How the reply engine made this message of the bot's (`generated`, `retrieved`,
    /// `fallback`; with `+cut` when a web client left before it was complete), when it is one.
    pub fn engine_source(&self) -> Option<&str> {
        self.engine_source.as_deref()
    }
}

impl Store {
    /// How many messages [`Store::for_each_corpus_row`] would read (for a progress bar).
    pub async fn count_corpus_rows(&self, filter: &CorpusFilter) -> Result<u64, StoreError> {
        let n: i64 = on_engine!(&self.pool, |p| {
            let mut q = QueryBuilder::new("SELECT COUNT(*) FROM messages m");
            push_corpus_where(&mut q, filter);
            q.build_query_scalar().fetch_one(p).await?
        });
        Ok(n as u64)
    }

    /// Calls `each` with every message that may go into a corpus, channel by channel in time
    /// order, streamed (memory does not grow with the store). Deleted messages, notices and the
    /// words of opted-out users are left out here, in SQL. `each` returns `false` to stop.
    pub async fn for_each_corpus_row<F>(
        &self,
        filter: &CorpusFilter,
        mut each: F,
    ) -> Result<(), StoreError>
    where
        F: FnMut(CorpusRow) -> bool,
    {
        // The one expression the engines spell differently: a list of a message's reactions.
        let reactions = match self.pool {
            Engine::Sqlite(_) => "group_concat(r.emoji, char(31))",
            Engine::Postgres(_) => "string_agg(r.emoji, chr(31))",
        };
        let select = format!(
            concat!(
                "SELECT ",
                message_columns!(),
                ",
                    (SELECT {reactions} FROM reactions r
                     WHERE r.platform = m.platform AND r.chat_id = m.chat_id
                       AND r.message_id = m.message_id
                       AND NOT EXISTS (SELECT 1 FROM opt_outs o
                                       WHERE o.platform = r.platform AND o.user_id = r.user_id)
                    ) AS reactions,
                    (SELECT rp.engine_source || CASE WHEN rp.cut THEN '+cut' ELSE '' END
                     FROM replies rp
                     WHERE m.from_self AND rp.platform = m.platform
                       AND rp.chat_id = m.chat_id AND rp.message_id = m.reply_to
                    ) AS engine_source
             FROM messages m"
            ),
            reactions = reactions
        );
        on_engine!(&self.pool, |p| {
            let mut q = QueryBuilder::new(&select);
            push_corpus_where(&mut q, filter);
            q.push(" ORDER BY m.platform, m.chat_id, m.thread_id, m.sent_at_ms, m.id");
            let mut rows = q.build_query_as::<CorpusRow>().fetch(p);
            while let Some(row) = rows.try_next().await? {
                if !each(row) {
                    break;
                }
            }
        });
        Ok(())
    }

    /// Records a reaction being added or removed by `user_id` on a message.
    pub async fn record_reaction(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        user_id: &str,
        emoji: &str,
        added: bool,
    ) -> Result<(), StoreError> {
        let (platform, chat) = (channel.platform.as_str(), channel.chat_id.as_str());
        if added {
            on_engine!(&self.pool, |p| sqlx::query(
                "INSERT INTO reactions (platform, chat_id, message_id, user_id, emoji, at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(platform)
            .bind(chat)
            .bind(message_id)
            .bind(user_id)
            .bind(emoji)
            .bind(now_ms())
            .execute(p)
            .await?
            .rows_affected());
        } else {
            on_engine!(&self.pool, |p| sqlx::query(
                "DELETE FROM reactions WHERE platform = $1 AND chat_id = $2 AND message_id = $3
                   AND user_id = $4 AND emoji = $5",
            )
            .bind(platform)
            .bind(chat)
            .bind(message_id)
            .bind(user_id)
            .bind(emoji)
            .execute(p)
            .await?
            .rows_affected());
        }
        Ok(())
    }

    /// The store's setting `key`, set to `make()` first if it has none. Concurrent callers
    /// agree on one value.
    pub async fn meta_or_insert(
        &self,
        key: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        let value = make();
        on_engine!(&self.pool, |p| sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        )
        .bind(key)
        .bind(&value)
        .execute(p)
        .await?
        .rows_affected());
        Ok(on_engine!(&self.pool, |p| sqlx::query_scalar(
            "SELECT value FROM meta WHERE key = $1"
        )
        .bind(key)
        .fetch_one(p)
        .await?))
    }
}

/// The `meta` key of the model reload generation: `/reload` in any process raises it, and every
/// process on the store reloads its model when it sees it rise.
const RELOAD_GENERATION: &str = "model_reload_generation";

impl Store {
    /// Asks every process on this store to reload its model: raises the reload generation and
    /// returns the new one.
    pub async fn request_reload(&self) -> Result<i64, StoreError> {
        Ok(on_engine!(&self.pool, |p| sqlx::query_scalar(
            "INSERT INTO meta (key, value) VALUES ($1, '1')
             ON CONFLICT (key) DO UPDATE
                 SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT)
             RETURNING CAST(value AS BIGINT)"
        )
        .bind(RELOAD_GENERATION)
        .fetch_one(p)
        .await?))
    }

    /// The reload generation: 0 until the first `/reload` on this store.
    pub async fn reload_generation(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = on_engine!(&self.pool, |p| sqlx::query_scalar(
            "SELECT CAST(value AS BIGINT) FROM meta WHERE key = $1"
        )
        .bind(RELOAD_GENERATION)
        .fetch_optional(p)
        .await?);
        Ok(v.unwrap_or(0))
    }
}

fn push_corpus_where<'a, DB>(q: &mut QueryBuilder<'a, DB>, f: &CorpusFilter)
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
{
    q.push(
        " WHERE m.text IS NOT NULL AND NOT m.is_notice
           AND NOT EXISTS (SELECT 1 FROM opt_outs o
                           WHERE o.platform = m.platform AND o.user_id = m.author_id)",
    );
    for (column, values) in [
        ("m.platform", &f.platforms),
        ("m.chat_id", &f.channels),
        ("m.source", &f.sources),
    ] {
        if values.is_empty() {
            continue;
        }
        q.push(format!(" AND {column} IN ("));
        let mut list = q.separated(", ");
        for v in values {
            list.push_bind(v.clone());
        }
        q.push(")");
    }
    if let Some(since) = f.since_ms {
        q.push(" AND m.sent_at_ms >= ").push_bind(since);
    }
    if let Some(until) = f.until_ms {
        q.push(" AND m.sent_at_ms < ").push_bind(until);
    }
    if let Some(since) = f.stored_since_ms {
        q.push(" AND m.stored_at_ms >= ").push_bind(since);
    }
    if let Some(until) = f.stored_until_ms {
        q.push(" AND m.stored_at_ms < ").push_bind(until);
    }
}
