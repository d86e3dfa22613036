//! The conversation store: all SQL of kaiwa lives here (sqlx), on SQLite (the embedded default)
//! or PostgreSQL (one store for several processes), by the database URL.
//!
//! Every message the bot sees is written here before anything else happens to it, so the
//! store is both the bot's memory (contexts are built from it, so they survive restarts) and the
//! source of the training corpus. Writes are idempotent on the platform's message id, so a
//! redelivered message never becomes a second row or a second reply, whichever process sees it.
//!
//! Both engines run the same SQL wherever it can be the same (`$1` placeholders, `ON CONFLICT`,
//! `RETURNING`, window functions, booleans as `TRUE`/`NOT x`); [`on_engine!`] compiles one query
//! for each. What differs is said where it does: the migrations (`migrations/sqlite`,
//! `migrations/postgres`, kept in step by a test), the retrieval index (FTS5 in SQLite, a
//! posting table in PostgreSQL, both scored with bm25) and one aggregate of the export.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::ConnectOptions;
use sqlx::{Postgres, Sqlite, SqlitePool};

use crate::domain::{ChannelRef, ChatKind, Platform};

/// The columns of a [`StoredMessage`], from `messages` aliased as `m`: one list for every query
/// that reads messages, so a new column cannot be forgotten in one of them.
macro_rules! message_columns {
    () => {
        "m.id, m.platform, m.chat_id, m.thread_id, m.chat_kind, m.message_id, m.author_id,
         m.author_name, m.author_is_bot, m.from_self, m.is_notice, m.text, m.reply_to,
         m.sent_at_ms, m.edited_at_ms, m.source, m.is_system"
    };
}

/// Something of each engine: a pool, a transaction.
#[derive(Debug, Clone)]
enum Engine<S, P> {
    Sqlite(S),
    Postgres(P),
}

/// The store's connections.
type Pool = Engine<SqlitePool, PgPool>;

/// A transaction on either engine.
type Tx = Engine<sqlx::Transaction<'static, Sqlite>, sqlx::Transaction<'static, Postgres>>;

/// Evaluates `$body` with `$c` bound to what `$on` (an [`Engine`]: a pool, a transaction, or a
/// reference to one) holds for the engine the store is on: one query, written once, compiled
/// for each engine.
macro_rules! on_engine {
    ($on:expr, |$c:ident| $body:expr) => {
        match $on {
            $crate::store::Engine::Sqlite($c) => $body,
            $crate::store::Engine::Postgres($c) => $body,
        }
    };
}

impl Tx {
    async fn commit(self) -> Result<(), StoreError> {
        on_engine!(self, |t| t.commit().await?);
        Ok(())
    }
}

mod access;
mod corpus;
mod retrieval;
pub use access::{AccessKind, AccessList, AccessRule, StoredAccess, TurnedAway};
pub use corpus::{CorpusFilter, CorpusRow, ImportInsert, ImportRecord, ImportTx, ImportedRow};
pub use retrieval::{DocKind, Feedback, Retrieved, SharePolicy};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `url` is shown without its password.
    #[error("cannot open database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("unsupported database URL {0}: use sqlite://PATH (or a plain path) or postgres://USER:PASSWORD@HOST/DATABASE")]
    Scheme(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// A scratch schema ([`Store::open_scratch`]) that cannot be made or dropped.
    #[error("scratch schema: {0}")]
    Scratch(String),
}

/// A message to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub channel: ChannelRef,
    pub kind: ChatKind,
    pub message_id: String,
    pub author_id: String,
    pub author_name: String,
    pub author_is_bot: bool,
    pub from_self: bool,
    /// An answer to a command or a notice, not conversation.
    pub is_notice: bool,
    pub text: String,
    pub reply_to: Option<String>,
    pub sent_at_ms: i64,
    pub source: String,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredMessage {
    pub id: i64,
    #[sqlx(try_from = "String")]
    pub platform: Platform,
    pub chat_id: String,
    pub thread_id: String,
    #[sqlx(try_from = "String")]
    pub chat_kind: ChatKind,
    pub message_id: String,
    pub author_id: String,
    pub author_name: String,
    pub author_is_bot: bool,
    pub from_self: bool,
    pub is_notice: bool,
    /// `None` once deleted.
    pub text: Option<String>,
    pub reply_to: Option<String>,
    pub sent_at_ms: i64,
    pub edited_at_ms: Option<i64>,
    pub source: String,
    /// A system prompt of an imported conversation.
    pub is_system: bool,
}

/// What inserting a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    Stored(i64),
    /// The same platform message was stored before (a redelivery).
    Duplicate,
}

/// How a reply was produced, recorded with it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyProvenance {
    pub model: String,
    pub settings: String,
    pub prompt_tokens: i64,
    pub new_tokens: i64,
    pub latency_ms: i64,
    /// `generated`, `retrieved` or `fallback` (the reply engine's `ReplySource`).
    pub engine_source: String,
    /// The retrieval doc a retrieved reply came from, and its row in `messages` for a pair.
    pub source_doc: Option<i64>,
    pub source_message: Option<i64>,
    /// The ranker's scores of the reply, as JSON.
    pub scores: Option<String>,
}

/// Figures for `/stats` and `kaiwa stats`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stats {
    pub messages: i64,
    pub deleted: i64,
    pub bot_messages: i64,
    pub channels: i64,
    pub users: i64,
    pub replies_sent: i64,
    pub replies_failed: i64,
    pub opted_out_users: i64,
    /// Messages of people not allowed to talk to the bot that were addressed to it.
    pub refusals: i64,
    /// Messages not answered because their author had used up `DAILY_QUOTA` for the day.
    pub quota_hits: i64,
    /// Sent replies by how the engine made them.
    pub replies_retrieved: i64,
    pub replies_generated: i64,
    pub replies_fallback: i64,
    /// Retrieval docs indexed.
    pub retrieval_pairs: i64,
    pub retrieval_sentences: i64,
    pub per_platform: Vec<(String, i64)>,
}

/// The columns of a row to insert, borrowed; shared by live messages and imports.
struct NewRow<'a> {
    platform: &'a str,
    chat_id: &'a str,
    thread_id: &'a str,
    direct: bool,
    message_id: &'a str,
    author_id: &'a str,
    author_name: &'a str,
    author_is_bot: bool,
    from_self: bool,
    is_notice: bool,
    is_system: bool,
    text: &'a str,
    reply_to: Option<&'a str>,
    sent_at_ms: i64,
    source: &'a str,
}

/// Stores a message (and its place in the retrieval index, so it is retrievable as soon as it
/// is stored) within `tx`, unless the same platform message is already there.
async fn insert_message_in(tx: &mut Tx, m: &NewMessage) -> Result<Insert, StoreError> {
    let row = NewRow {
        platform: m.channel.platform.as_str(),
        chat_id: &m.channel.chat_id,
        thread_id: &m.channel.thread_id,
        direct: m.kind == ChatKind::Direct,
        message_id: &m.message_id,
        author_id: &m.author_id,
        author_name: &m.author_name,
        author_is_bot: m.author_is_bot,
        from_self: m.from_self,
        is_notice: m.is_notice,
        is_system: false,
        text: &m.text,
        reply_to: m.reply_to.as_deref(),
        sent_at_ms: m.sent_at_ms,
        source: &m.source,
    };
    if let Engine::Postgres(t) = tx {
        // SQLite runs one writer at a time; PostgreSQL runs them side by side. Messages of one
        // channel are stored one at a time here too, so that pairing a message with the one
        // before it (the retrieval index) sees what an earlier writer stored, as on SQLite.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!(
                "{}\u{1f}{}\u{1f}{}",
                row.platform, row.chat_id, row.thread_id
            ))
            .execute(&mut **t)
            .await?;
    }
    let inserted = insert_row(tx, &row).await?;
    if let Insert::Stored(id) = inserted {
        retrieval::index_reply(tx, id, &row).await?;
    }
    Ok(inserted)
}

/// Claims the right to answer a message (see [`Store::claim_reply`]).
async fn claim_reply_in(
    tx: &mut Tx,
    channel: &ChannelRef,
    message_id: &str,
    owner: &str,
) -> Result<bool, StoreError> {
    let claimed = on_engine!(tx, |t| sqlx::query(
        "INSERT INTO replies (platform, chat_id, message_id, state, claimed_at_ms, owner)
         VALUES ($1, $2, $3, 'pending', $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(channel.platform.as_str())
    .bind(&channel.chat_id)
    .bind(message_id)
    .bind(now_ms())
    .bind(owner)
    .execute(&mut **t)
    .await?
    .rows_affected());
    Ok(claimed == 1)
}

/// Marks the reply to `message_id` sent within `tx`, with how it was made.
async fn finish_reply_in(
    tx: &mut Tx,
    channel: &ChannelRef,
    message_id: &str,
    p: &ReplyProvenance,
) -> Result<(), StoreError> {
    on_engine!(tx, |t| sqlx::query(
        "UPDATE replies SET state = 'sent', finished_at_ms = $1, model = $2, settings = $3,
            prompt_tokens = $4, new_tokens = $5, latency_ms = $6, engine_source = $7,
            source_doc = $8, source_message = $9, scores = $10
         WHERE platform = $11 AND chat_id = $12 AND message_id = $13",
    )
    .bind(now_ms())
    .bind(&p.model)
    .bind(&p.settings)
    .bind(p.prompt_tokens)
    .bind(p.new_tokens)
    .bind(p.latency_ms)
    .bind(&p.engine_source)
    .bind(p.source_doc)
    .bind(p.source_message)
    .bind(&p.scores)
    .bind(channel.platform.as_str())
    .bind(&channel.chat_id)
    .bind(message_id)
    .execute(&mut **t)
    .await?
    .rows_affected());
    Ok(())
}

/// Inserts a message row unless `(platform, chat_id, message_id)` is already stored.
async fn insert_row(tx: &mut Tx, r: &NewRow<'_>) -> Result<Insert, StoreError> {
    let id: Option<i64> = on_engine!(tx, |t| sqlx::query_scalar(
        "INSERT INTO messages (platform, chat_id, thread_id, chat_kind, message_id, author_id,
            author_name, author_is_bot, from_self, is_notice, is_system, text, reply_to,
            sent_at_ms, stored_at_ms, source)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
         ON CONFLICT (platform, chat_id, message_id) DO NOTHING
         RETURNING id",
    )
    .bind(r.platform)
    .bind(r.chat_id)
    .bind(r.thread_id)
    .bind(if r.direct { "direct" } else { "group" })
    .bind(r.message_id)
    .bind(r.author_id)
    .bind(r.author_name)
    .bind(r.author_is_bot)
    .bind(r.from_self)
    .bind(r.is_notice)
    .bind(r.is_system)
    .bind(r.text)
    .bind(r.reply_to)
    .bind(r.sent_at_ms)
    .bind(now_ms())
    .bind(r.source)
    .fetch_optional(&mut **t)
    .await?);
    Ok(match id {
        Some(id) => Insert::Stored(id),
        None => Insert::Duplicate,
    })
}

/// `url` as it may be shown (errors, logs): without the password of a PostgreSQL URL, whether
/// in its user part or a `password=` parameter.
pub fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (address, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority_end = address.find('/').unwrap_or(address.len());
    let address = match address[..authority_end].rfind('@') {
        Some(at) => match address[..at].split_once(':') {
            Some((user, _)) => format!("{user}:***@{}", &address[at + 1..]),
            None => address.to_string(),
        },
        None => address.to_string(),
    };
    let query = query.map(|q| {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        format!("?{}", params.join("&"))
    });
    format!("{scheme}://{address}{}", query.unwrap_or_default())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The database behind a pool: SQLite or PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// Who this opening of the store is, in `processes` and in the claims it makes.
    owner: Arc<str>,
}

/// A daemon not seen in `processes` for this long is gone: a starting daemon answers the
/// replies it claimed. Several times [`Store::announce`]'s period, with room for clocks that
/// differ a little between machines.
pub const PROCESS_GONE_AFTER: Duration = Duration::from_secs(30);

/// A name for one opening of the store, unique across processes and machines:
/// `host:pid:start:n`.
fn owner_id() -> Arc<str> {
    static OPENED: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}:{}:{}:{}",
        host_name(),
        std::process::id(),
        now_ms(),
        OPENED.fetch_add(1, Ordering::Relaxed)
    )
    .into()
}

/// The stores of this process that [`Store::announce`]d and have not left: the daemons running
/// here (tests run several in one process).
static ANNOUNCED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Whether the daemon `owner`, which said it runs as `pid` on `host`, may still be running: on
/// another machine, yes (its last word in the store decides); in this process, when it is one
/// of [`ANNOUNCED`]; in another process here, when that process exists (`/proc`; without
/// `/proc`, yes).
fn process_alive(owner: &str, host: &str, pid: i64) -> bool {
    if host != host_name() {
        return true;
    }
    if pid == i64::from(std::process::id()) {
        return ANNOUNCED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(owner);
    }
    !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{pid}")).exists()
}

/// This machine's name (Linux), for people reading `processes`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Connections a PostgreSQL store keeps open per process: the daemon's handlers, the reply
/// engine's retrieval and a streaming export at once, well under a server's default
/// `max_connections` (100) for a handful of processes.
const POSTGRES_CONNECTIONS: u32 = 8;

/// Statements slower than this are logged, at debug level only: streaming a whole corpus out is
/// one long statement by design.
const SLOW_STATEMENT: Duration = Duration::from_secs(1);

impl Store {
    /// Opens the database at `url` and applies the migrations of its engine:
    /// - `sqlite://PATH` or a plain path: created if needed, in WAL mode with full
    ///   synchronisation, so a stored message survives a crash (`migrations/sqlite`);
    /// - `postgres://` or `postgresql://` (libpq's URL form, `sslmode` included): a database
    ///   that already exists (`migrations/postgres`; concurrent openers wait on sqlx's
    ///   migration lock, so several daemons may start at once).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            url: display_url(url),
            source,
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = Store::open_postgres_pool(url, None).await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            return Ok(Store {
                pool: Engine::Postgres(pool),
                owner: owner_id(),
            });
        }
        let url_form = if url.starts_with("sqlite:") {
            url.to_string()
        } else if url.contains("://") {
            return Err(StoreError::Scheme(display_url(url)));
        } else {
            format!("sqlite://{url}")
        };
        let options = SqliteConnectOptions::from_str(&url_form)
            .map_err(open_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // Streaming a whole corpus out is one long statement by design: not worth a warning.
            .log_slow_statements(log::LevelFilter::Debug, SLOW_STATEMENT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Store {
            pool: Engine::Sqlite(pool),
            owner: owner_id(),
        })
    }

    /// Opens a new, empty schema of its own on the PostgreSQL server at `url`, named
    /// `kaiwa_scratch_<name>`, and the store in it: for benchmarks that measure PostgreSQL
    /// beside SQLite without touching the database's own tables. [`Store::drop_scratch`]
    /// removes it. The role in `url` must be allowed to create schemas.
    pub async fn open_scratch(url: &str, name: &str) -> Result<Self, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Scratch(format!(
                "{} is not a postgres:// URL",
                display_url(url)
            )));
        }
        let schema = format!("kaiwa_scratch_{name}");
        if !schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(StoreError::Scratch(format!(
                "{schema:?} is not a plain lower-case name"
            )));
        }
        let admin = Store::open_postgres_pool(url, None).await?;
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let pool = Store::open_postgres_pool(url, Some(&schema)).await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Store {
            pool: Engine::Postgres(pool),
            owner: owner_id(),
        })
    }

    /// Drops the schema [`Store::open_scratch`] made, with everything in it, and closes the
    /// store. Refuses any other store.
    pub async fn drop_scratch(self) -> Result<(), StoreError> {
        let Engine::Postgres(pool) = &self.pool else {
            return Err(StoreError::Scratch(
                "a SQLite store has no scratch schema".into(),
            ));
        };
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(pool)
            .await?;
        if !schema.starts_with("kaiwa_scratch_") {
            return Err(StoreError::Scratch(format!(
                "the store is in schema {schema:?}, not one open_scratch made"
            )));
        }
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(pool)
            .await?;
        self.close().await;
        Ok(())
    }

    /// The pool of a PostgreSQL store at `url`, its tables in `schema` when given.
    async fn open_postgres_pool(url: &str, schema: Option<&str>) -> Result<PgPool, StoreError> {
        let open_err = |source| StoreError::Open {
            url: display_url(url),
            source,
        };
        let mut options = PgConnectOptions::from_str(url)
            .map_err(open_err)?
            .application_name("kaiwa")
            .log_slow_statements(log::LevelFilter::Debug, SLOW_STATEMENT);
        if let Some(schema) = schema {
            options = options.options([("search_path", schema)]);
        }
        PgPoolOptions::new()
            .max_connections(POSTGRES_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(open_err)
    }

    /// What the store takes on disk, in bytes: the SQLite file's pages, or the PostgreSQL
    /// tables (with their indexes) of the store's schema.
    pub async fn size_bytes(&self) -> Result<u64, StoreError> {
        let bytes: i64 =
            match &self.pool {
                Engine::Sqlite(p) => sqlx::query_scalar(
                    "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                )
                .fetch_one(p)
                .await?,
                Engine::Postgres(p) => {
                    sqlx::query_scalar(
                        "SELECT CAST(COALESCE(SUM(pg_total_relation_size(c.oid)), 0) AS BIGINT)
                     FROM pg_class c
                     WHERE c.relnamespace = CAST(current_schema() AS regnamespace)
                       AND c.relkind IN ('r', 'm')",
                    )
                    .fetch_one(p)
                    .await?
                }
            };
        Ok(bytes.max(0) as u64)
    }

    /// Which engine the store is on: `"sqlite"` or `"postgres"`.
    pub fn engine(&self) -> &'static str {
        match self.pool {
            Engine::Sqlite(_) => "sqlite",
            Engine::Postgres(_) => "postgres",
        }
    }

    /// Starts a transaction.
    async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match &self.pool {
            Engine::Sqlite(p) => Engine::Sqlite(p.begin().await?),
            Engine::Postgres(p) => Engine::Postgres(p.begin().await?),
        })
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        on_engine!(&self.pool, |p| p.close().await);
    }

    /// Stores a message unless the same platform message is already there.
    pub async fn insert_message(&self, m: &NewMessage) -> Result<Insert, StoreError> {
        let mut tx = self.begin().await?;
        let inserted = insert_message_in(&mut tx, m).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// Replaces the text of a stored message (an edit). Returns whether a row changed.
    pub async fn edit_message(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        text: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let id: Option<i64> = on_engine!(&mut tx, |t| sqlx::query_scalar(
            "UPDATE messages SET text = $1, edited_at_ms = $2
             WHERE platform = $3 AND chat_id = $4 AND message_id = $5 AND text IS NOT NULL
             RETURNING id",
        )
        .bind(text)
        .bind(at_ms)
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .fetch_optional(&mut **t)
        .await?);
        if let Some(id) = id {
            retrieval::reindex_edited(&mut tx, id, text).await?;
        }
        tx.commit().await?;
        Ok(id.is_some())
    }

    /// Removes the text of a deleted message; the row stays as a tombstone so a late
    /// redelivery cannot bring the text back.
    pub async fn delete_message(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let r = on_engine!(&self.pool, |p| sqlx::query(
            "UPDATE messages SET text = NULL, deleted_at_ms = $1
             WHERE platform = $2 AND chat_id = $3 AND message_id = $4",
        )
        .bind(at_ms)
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(r > 0)
    }

    /// Stores a message unless the same platform message is already there and, when `claim`,
    /// claims the right to answer it, in one transaction: a crash never leaves a message stored
    /// that was to be answered without its claim (a redelivery would be a duplicate, and the
    /// start-up recovery finds claims). Returns `Duplicate` without claiming for a message
    /// already stored.
    pub async fn insert_message_and_claim(
        &self,
        m: &NewMessage,
        claim: bool,
    ) -> Result<Insert, StoreError> {
        let mut tx = self.begin().await?;
        let inserted = insert_message_in(&mut tx, m).await?;
        if claim && inserted != Insert::Duplicate {
            claim_reply_in(&mut tx, &m.channel, &m.message_id, &self.owner).await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Claims the right to answer a message. Only the first claim for a message succeeds.
    pub async fn claim_reply(
        &self,
        channel: &ChannelRef,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let claimed = claim_reply_in(&mut tx, channel, message_id, &self.owner).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    /// Records that the reply to `message_id` was sent, and how it was made.
    pub async fn finish_reply(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        p: &ReplyProvenance,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        finish_reply_in(&mut tx, channel, message_id, p).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores the bot's message that ends a reply (its last part, as the platform took it) and
    /// records the reply to `message_id` as sent, in one transaction: the time in which a crash
    /// would leave a delivered reply pending (and sent again at the next start) is one commit.
    pub async fn finish_reply_with_last_part(
        &self,
        last: &NewMessage,
        message_id: &str,
        p: &ReplyProvenance,
    ) -> Result<Insert, StoreError> {
        let mut tx = self.begin().await?;
        let inserted = insert_message_in(&mut tx, last).await?;
        finish_reply_in(&mut tx, &last.channel, message_id, p).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// Records that the reply to `message_id` was sent only in part (the client went away):
    /// as [`Store::finish_reply`], marked cut, with the reason.
    pub async fn cut_reply(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        p: &ReplyProvenance,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.finish_reply(channel, message_id, p).await?;
        on_engine!(&self.pool, |p| sqlx::query(
            "UPDATE replies SET cut = TRUE, error = $1
             WHERE platform = $2 AND chat_id = $3 AND message_id = $4",
        )
        .bind(reason)
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Who wrote `message_id` in `channel` (its platform's user id), if it is stored.
    pub async fn message_author(
        &self,
        channel: &ChannelRef,
        message_id: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(on_engine!(&self.pool, |p| {
            sqlx::query_scalar(
            "SELECT author_id FROM messages WHERE platform = $1 AND chat_id = $2 AND message_id = $3
               AND NOT from_self",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .fetch_optional(p)
        .await?
        }))
    }

    /// Whether `message_id` is one of kaiwa's own replies in `channel` (not deleted).
    pub async fn is_own_reply(
        &self,
        channel: &ChannelRef,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        let found: Option<bool> = on_engine!(&self.pool, |p| sqlx::query_scalar(
            "SELECT TRUE FROM messages WHERE platform = $1 AND chat_id = $2 AND message_id = $3
               AND from_self AND NOT is_notice AND text IS NOT NULL",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .fetch_optional(p)
        .await?);
        Ok(found.is_some())
    }

    /// The reactions `user_id` has on the messages of `channel`: `(message id, emoji)`.
    pub async fn reactions_by(
        &self,
        channel: &ChannelRef,
        user_id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(on_engine!(&self.pool, |p| sqlx::query_as(
            "SELECT message_id, emoji FROM reactions
             WHERE platform = $1 AND chat_id = $2 AND user_id = $3",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(user_id)
        .fetch_all(p)
        .await?))
    }

    /// The messages whose reply was claimed but never sent nor failed on `platform` (a crash
    /// left them), oldest first.
    pub async fn pending_replies(
        &self,
        platform: Platform,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(on_engine!(&self.pool, |p| sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM replies r JOIN messages m
                ON m.platform = r.platform AND m.chat_id = r.chat_id AND m.message_id = r.message_id
              WHERE r.platform = $1 AND r.state = 'pending'
              ORDER BY m.sent_at_ms, m.id"
        ))
        .bind(platform.as_str())
        .fetch_all(p)
        .await?))
    }

    /// Says that the daemon on this store is alive (call it every few seconds, well within
    /// [`PROCESS_GONE_AFTER`]): the replies it claimed are its own to answer.
    pub async fn announce(&self) -> Result<(), StoreError> {
        ANNOUNCED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.owner.to_string());
        let now = now_ms();
        on_engine!(&self.pool, |p| sqlx::query(
            "INSERT INTO processes (id, host, pid, started_at_ms, seen_at_ms)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (id) DO UPDATE SET seen_at_ms = excluded.seen_at_ms"
        )
        .bind(&*self.owner)
        .bind(host_name())
        .bind(i64::from(std::process::id()))
        .bind(now)
        .execute(p)
        .await?
        .rows_affected());
        // Daemons gone for a day are of no interest to anyone.
        on_engine!(&self.pool, |p| sqlx::query(
            "DELETE FROM processes WHERE seen_at_ms < $1"
        )
        .bind(now - 86_400_000)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Says that the daemon on this store stopped: another may take over what it left pending
    /// at once, without waiting [`PROCESS_GONE_AFTER`].
    pub async fn leave(&self) -> Result<(), StoreError> {
        ANNOUNCED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&*self.owner);
        on_engine!(&self.pool, |p| sqlx::query(
            "DELETE FROM processes WHERE id = $1"
        )
        .bind(&*self.owner)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Takes a pending claim over for this daemon, unless a daemon still running holds it:
    /// whether it is now this daemon's to answer. The holder is alive when it
    /// [`Store::announce`]d within [`PROCESS_GONE_AFTER`] and, on this machine, its process
    /// still exists (a crashed daemon restarted at once is not waited for); claims of stores
    /// that never announced (an older kaiwa, a command) are taken. Of two daemons taking the
    /// same claim at once, one gets it.
    pub async fn take_over_claim(
        &self,
        channel: &ChannelRef,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        type Holder = (Option<String>, Option<String>, Option<i64>, Option<i64>);
        let holder: Option<Holder> = on_engine!(&self.pool, |p| sqlx::query_as(
            "SELECT r.owner, p.host, p.pid, p.seen_at_ms
             FROM replies r LEFT JOIN processes p ON p.id = r.owner
             WHERE r.platform = $1 AND r.chat_id = $2 AND r.message_id = $3
               AND r.state = 'pending'"
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .fetch_optional(p)
        .await?);
        let Some((owner, host, pid, seen_at_ms)) = holder else {
            return Ok(false);
        };
        if owner.as_deref() == Some(&*self.owner) {
            return Ok(true);
        }
        let alive = match (&owner, host, pid, seen_at_ms) {
            (Some(owner), Some(host), Some(pid), Some(seen)) => {
                seen >= now_ms() - PROCESS_GONE_AFTER.as_millis() as i64
                    && process_alive(owner, &host, pid)
            }
            _ => false,
        };
        if alive {
            return Ok(false);
        }
        let taken = on_engine!(&self.pool, |p| sqlx::query(
            "UPDATE replies SET owner = $1
             WHERE platform = $2 AND chat_id = $3 AND message_id = $4 AND state = 'pending'
               AND owner IS NOT DISTINCT FROM $5"
        )
        .bind(&*self.owner)
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .bind(owner.as_deref())
        .execute(p)
        .await?
        .rows_affected());
        Ok(taken == 1)
    }

    /// The channels of `platform` with a message since `since_ms`, each with its kind and the id
    /// of its latest stored message: where to catch up on what was missed while down.
    pub async fn recent_channels(
        &self,
        platform: Platform,
        since_ms: i64,
    ) -> Result<Vec<(String, ChatKind, String)>, StoreError> {
        let rows: Vec<(String, String, String)> = on_engine!(&self.pool, |p| sqlx::query_as(
            "SELECT chat_id, chat_kind, message_id FROM (
                 SELECT chat_id, chat_kind, message_id, sent_at_ms, ROW_NUMBER() OVER (
                     PARTITION BY chat_id ORDER BY sent_at_ms DESC, id DESC) AS latest
                 FROM messages WHERE platform = $1) AS m
             WHERE latest = 1 AND sent_at_ms >= $2",
        )
        .bind(platform.as_str())
        .bind(since_ms)
        .fetch_all(p)
        .await?);
        // An unknown kind is a decode error, as it is for a whole `StoredMessage`.
        rows.into_iter()
            .map(|(chat, kind, id)| {
                let kind = ChatKind::try_from(kind)
                    .map_err(|e| StoreError::Sql(sqlx::Error::Decode(e.into())))?;
                Ok((chat, kind, id))
            })
            .collect()
    }

    /// Whether kaiwa stored a message of its own in answer to `message_id`.
    pub async fn has_own_answer(
        &self,
        channel: &ChannelRef,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        let found: Option<bool> = on_engine!(&self.pool, |p| sqlx::query_scalar(
            "SELECT TRUE FROM messages WHERE platform = $1 AND chat_id = $2 AND reply_to = $3
               AND from_self LIMIT 1",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .fetch_optional(p)
        .await?);
        Ok(found.is_some())
    }

    /// Records that a claimed answer went out (a command's, or one a crash left unrecorded),
    /// with a note.
    pub async fn mark_reply_sent(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        note: &str,
    ) -> Result<(), StoreError> {
        self.close_reply(channel, message_id, "sent", note).await
    }

    /// Records that answering `message_id` failed.
    pub async fn fail_reply(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        self.close_reply(channel, message_id, "failed", error).await
    }

    /// Closes a pending claim on answering `message_id` as `state`, with a note; a claim
    /// already closed is left as it is.
    async fn close_reply(
        &self,
        channel: &ChannelRef,
        message_id: &str,
        state: &str,
        note: &str,
    ) -> Result<(), StoreError> {
        on_engine!(&self.pool, |p| sqlx::query(
            "UPDATE replies SET state = $1, finished_at_ms = $2, error = $3
             WHERE platform = $4 AND chat_id = $5 AND message_id = $6 AND state = 'pending'",
        )
        .bind(state)
        .bind(now_ms())
        .bind(note)
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(message_id)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// The latest `limit` messages of a channel with text, newer than `since_ms` and than its
    /// last `/reset`, oldest first: the bot's memory of that channel.
    pub async fn channel_context(
        &self,
        channel: &ChannelRef,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut rows: Vec<StoredMessage> = on_engine!(&self.pool, |p| {
            sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m
                 WHERE m.platform = $1 AND m.chat_id = $2 AND m.thread_id = $3 AND m.text IS NOT NULL
                   AND NOT m.is_notice AND m.sent_at_ms >= $4
                   AND m.sent_at_ms >= COALESCE((SELECT reset_at_ms FROM channels c
                        WHERE c.platform = m.platform AND c.chat_id = m.chat_id
                          AND c.thread_id = m.thread_id), 0)
                 ORDER BY m.sent_at_ms DESC, m.id DESC
                 LIMIT $5"
        ))
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .bind(since_ms)
        .bind(limit as i64)
        .fetch_all(p)
        .await?
        });
        rows.reverse();
        Ok(rows)
    }

    /// Every stored message of a channel (deleted ones included, with no text), oldest first.
    pub async fn channel_messages(
        &self,
        channel: &ChannelRef,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(on_engine!(&self.pool, |p| sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m WHERE m.platform = $1 AND m.chat_id = $2 AND m.thread_id = $3
                 ORDER BY m.sent_at_ms, m.id"
        ))
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .fetch_all(p)
        .await?))
    }

    /// Starts the channel's memory afresh from `at_ms`.
    pub async fn reset_channel(&self, channel: &ChannelRef, at_ms: i64) -> Result<(), StoreError> {
        on_engine!(&self.pool, |p| {
            sqlx::query(
            "INSERT INTO channels (platform, chat_id, thread_id, reset_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (platform, chat_id, thread_id) DO UPDATE SET reset_at_ms = excluded.reset_at_ms",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .bind(at_ms)
        .execute(p)
        .await?.rows_affected()
        });
        Ok(())
    }

    /// Whether the bot answers every message in this channel.
    pub async fn answers_all(&self, channel: &ChannelRef) -> Result<bool, StoreError> {
        let v: Option<bool> = on_engine!(&self.pool, |p| {
            sqlx::query_scalar(
            "SELECT answer_all FROM channels WHERE platform = $1 AND chat_id = $2 AND thread_id = $3",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .fetch_optional(p)
        .await?
        });
        Ok(v.unwrap_or(false))
    }

    pub async fn set_answers_all(&self, channel: &ChannelRef, on: bool) -> Result<(), StoreError> {
        on_engine!(&self.pool, |p| {
            sqlx::query(
            "INSERT INTO channels (platform, chat_id, thread_id, answer_all) VALUES ($1, $2, $3, $4)
             ON CONFLICT (platform, chat_id, thread_id) DO UPDATE SET answer_all = excluded.answer_all",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .bind(on)
        .execute(p)
        .await?.rows_affected()
        });
        Ok(())
    }

    pub async fn is_opted_out(
        &self,
        platform: Platform,
        user_id: &str,
    ) -> Result<bool, StoreError> {
        let v: Option<bool> = on_engine!(&self.pool, |p| sqlx::query_scalar(
            "SELECT TRUE FROM opt_outs WHERE platform = $1 AND user_id = $2"
        )
        .bind(platform.as_str())
        .bind(user_id)
        .fetch_optional(p)
        .await?);
        Ok(v.is_some())
    }

    pub async fn set_opted_out(
        &self,
        platform: Platform,
        user_id: &str,
        out: bool,
    ) -> Result<(), StoreError> {
        if out {
            on_engine!(&self.pool, |p| {
                sqlx::query("INSERT INTO opt_outs (platform, user_id, opted_out_at_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(platform.as_str())
                .bind(user_id)
                .bind(now_ms())
                .execute(p)
                .await?.rows_affected()
            });
        } else {
            on_engine!(&self.pool, |p| sqlx::query(
                "DELETE FROM opt_outs WHERE platform = $1 AND user_id = $2"
            )
            .bind(platform.as_str())
            .bind(user_id)
            .execute(p)
            .await?
            .rows_affected());
        }
        Ok(())
    }

    /// Deletes every message a user wrote on a platform. Returns how many were deleted.
    /// Deletes every message and reaction of a user on a platform (in one transaction).
    /// Returns how many messages were deleted.
    pub async fn forget_user(&self, platform: Platform, user_id: &str) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let r = on_engine!(&mut tx, |t| sqlx::query(
            "DELETE FROM messages WHERE platform = $1 AND author_id = $2 AND NOT from_self",
        )
        .bind(platform.as_str())
        .bind(user_id)
        .execute(&mut **t)
        .await?
        .rows_affected());
        on_engine!(&mut tx, |t| sqlx::query(
            "DELETE FROM reactions WHERE platform = $1 AND user_id = $2"
        )
        .bind(platform.as_str())
        .bind(user_id)
        .execute(&mut **t)
        .await?
        .rows_affected());
        tx.commit().await?;
        Ok(r)
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let count = |sql: &'static str| async move {
            Ok::<i64, StoreError>(on_engine!(&self.pool, |p| sqlx::query_scalar(sql)
                .fetch_one(p)
                .await?))
        };
        let per_platform: Vec<(String, i64)> = on_engine!(&self.pool, |p| sqlx::query_as(
            "SELECT platform, COUNT(*) FROM messages GROUP BY platform ORDER BY platform",
        )
        .fetch_all(p)
        .await?);
        let docs = self.retrieval_counts().await?;
        Ok(Stats {
            messages: count("SELECT COUNT(*) FROM messages").await?,
            deleted: count("SELECT COUNT(*) FROM messages WHERE text IS NULL").await?,
            bot_messages: count("SELECT COUNT(*) FROM messages WHERE from_self").await?,
            channels: count("SELECT COUNT(*) FROM (SELECT DISTINCT platform, chat_id, thread_id FROM messages) AS c").await?,
            users: count("SELECT COUNT(*) FROM (SELECT DISTINCT platform, author_id FROM messages WHERE NOT from_self) AS u").await?,
            replies_sent: count("SELECT COUNT(*) FROM replies WHERE state = 'sent'").await?,
            replies_failed: count("SELECT COUNT(*) FROM replies WHERE state = 'failed'").await?,
            opted_out_users: count("SELECT COUNT(*) FROM opt_outs").await?,
            refusals: count("SELECT CAST(COALESCE(SUM(refusals), 0) AS BIGINT) FROM user_days")
                .await?,
            quota_hits: count("SELECT CAST(COALESCE(SUM(quota_hits), 0) AS BIGINT) FROM user_days")
                .await?,
            replies_retrieved: count("SELECT COUNT(*) FROM replies WHERE state = 'sent' AND engine_source = 'retrieved'").await?,
            replies_generated: count("SELECT COUNT(*) FROM replies WHERE state = 'sent' AND engine_source = 'generated'").await?,
            replies_fallback: count("SELECT COUNT(*) FROM replies WHERE state = 'sent' AND engine_source = 'fallback'").await?,
            retrieval_pairs: docs.get(&DocKind::Pair).copied().unwrap_or(0),
            retrieval_sentences: docs.get(&DocKind::Sentence).copied().unwrap_or(0),
            per_platform,
        })
    }
}
