//! The reply engine's retrieval index (`retrieval_docs` and the terms of each): pairs of a
//! message and the reply a person wrote after it, indexed as they are stored (live or imported),
//! and unpaired corpus sentences. Deletions reach the index through triggers
//! (`migrations/*/0003_retrieval.sql`); consent and sharing are applied when retrieving, so an
//! opt-out or `/share off` takes effect at once.
//!
//! The terms are indexed by each engine's own means, scored alike: SQLite's FTS5 (one table per
//! kind, `retrieval_pair_index` and `retrieval_sentence_index`) ranks by its bm25; on
//! PostgreSQL a posting table (`retrieval_postings`) and the same bm25 formula in SQL, so the
//! same store content gives the same candidates in the same order on either engine.

use std::collections::HashMap;

use sqlx::{QueryBuilder, Row};

use super::{Engine, NewRow, Store, StoreError, Tx};
use crate::domain::ChannelRef;
use crate::text::lang;
use crate::text::retrieval_terms;

/// The longest silence between a live message and the reply after it for the two to be a pair.
const LIVE_PAIR_GAP_MS: i64 = 60 * 60 * 1000;

/// The kinds of retrievable text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DocKind {
    /// A reply a person wrote to a message like the user's.
    Pair,
    /// A corpus sentence on the user's topic.
    Sentence,
}

impl DocKind {
    /// The kind as stored (`retrieval_docs.kind`, `retrieval_postings.kind`).
    fn as_str(self) -> &'static str {
        match self {
            DocKind::Pair => "pair",
            DocKind::Sentence => "sentence",
        }
    }

    /// The SQLite full-text index of this kind's docs.
    fn index(self) -> &'static str {
        match self {
            DocKind::Pair => "retrieval_pair_index",
            DocKind::Sentence => "retrieval_sentence_index",
        }
    }
}

/// FTS5's bm25 constants, which the PostgreSQL scoring uses too.
const BM25_K1: f64 = 1.2;
const BM25_B: f64 = 0.75;

/// Matches fetched from the full-text index per candidate wanted: the rest of the conditions
/// (text still there, consent, sharing) are checked on these only, so a reply costs the same
/// however large the store grows. When most of the best matches may not be used, fewer
/// candidates come back.
const OVERFETCH: usize = 4;

/// What live messages may be retrieved from, besides shipped and imported corpora.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SharePolicy {
    /// Groups whose admins did not say `/share on|off` are shared.
    pub groups: bool,
    /// Direct messages are shared.
    pub direct: bool,
}

impl SharePolicy {
    /// Whether a live channel's messages may be retrieved elsewhere, given its `/share`
    /// setting (`None`: never said): a direct message only when the operator shares them
    /// (`/share` does not apply), a group by its `/share` or else the daemon's setting. The
    /// retrieval query applies the same rule.
    pub fn shares(&self, direct: bool, channel: Option<bool>) -> bool {
        if direct {
            self.direct
        } else {
            channel.unwrap_or(self.groups)
        }
    }
}

/// One retrieved candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    pub doc: i64,
    pub kind: DocKind,
    /// The candidate reply.
    pub text: String,
    /// What was matched: the message a pair's reply answered, or the sentence itself.
    pub matched: String,
    /// The row in `messages` of a pair's reply.
    pub message: Option<i64>,
    pub source: String,
    pub language: String,
    /// FTS5's bm25 (lower is better).
    pub bm25: f64,
}

/// Thumbs on replies that came from a doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Feedback {
    pub up: i64,
    pub down: i64,
}

/// Indexes the message just stored as `id` (`row`) as the reply to the message before it in
/// its channel, when both are conversation between two different people (or a person answering
/// the bot). The daemon's own text, other bots', notices, system prompts and commands are never
/// replies to retrieve.
pub(super) async fn index_reply(tx: &mut Tx, id: i64, row: &NewRow<'_>) -> Result<(), StoreError> {
    let text = row.text.trim();
    let live = row.source == "live";
    // An imported conversation's assistant side is a reply written for it (and what the
    // corpus is for); the daemon's own replies are not.
    if (live && row.from_self)
        || row.author_is_bot
        || row.is_notice
        || row.is_system
        || text.is_empty()
        || text.starts_with('/')
    {
        return Ok(());
    }
    let previous: Option<(i64, String, String, i64, String)> = on_engine!(tx, |t| sqlx::query_as(
        "SELECT id, author_id, text, sent_at_ms, source FROM messages
         WHERE platform = $1 AND chat_id = $2 AND thread_id = $3 AND id <> $4
           AND (sent_at_ms < $5 OR (sent_at_ms = $5 AND id < $4))
           AND NOT is_notice AND NOT is_system AND text IS NOT NULL
         ORDER BY sent_at_ms DESC, id DESC LIMIT 1",
    )
    .bind(row.platform)
    .bind(row.chat_id)
    .bind(row.thread_id)
    .bind(id)
    .bind(row.sent_at_ms)
    .fetch_optional(&mut **t)
    .await?);
    let Some((context_id, context_author, context_text, context_at, _)) = previous else {
        return Ok(());
    };
    if context_author == row.author_id
        || context_text.trim().starts_with('/')
        || (live && row.sent_at_ms - context_at > LIVE_PAIR_GAP_MS)
    {
        return Ok(());
    }
    let terms = retrieval_terms(&context_text);
    if terms.is_empty() {
        return Ok(());
    }
    let doc: Option<i64> = on_engine!(tx, |t| sqlx::query_scalar(
        "INSERT INTO retrieval_docs (kind, context_id, reply_id, source, language)
         VALUES ('pair', $1, $2, $3, $4) ON CONFLICT (reply_id) DO NOTHING RETURNING id",
    )
    .bind(context_id)
    .bind(id)
    .bind(row.source)
    .bind(lang::detect(text))
    .fetch_optional(&mut **t)
    .await?);
    if let Some(doc) = doc {
        insert_terms(tx, DocKind::Pair, doc, &terms).await?;
    }
    Ok(())
}

/// Re-indexes after the message `id` was edited: the pairs it is the context of, and the
/// language of the pair it is the reply of.
pub(super) async fn reindex_edited(tx: &mut Tx, id: i64, text: &str) -> Result<(), StoreError> {
    let docs: Vec<i64> = on_engine!(tx, |t| sqlx::query_scalar(
        "SELECT id FROM retrieval_docs WHERE context_id = $1"
    )
    .bind(id)
    .fetch_all(&mut **t)
    .await?);
    // The message may be the reply of a pair: its language is the candidate's.
    on_engine!(tx, |t| sqlx::query(
        "UPDATE retrieval_docs SET language = $1 WHERE reply_id = $2"
    )
    .bind(lang::detect(text))
    .bind(id)
    .execute(&mut **t)
    .await?
    .rows_affected());
    let terms = retrieval_terms(text);
    for doc in docs {
        match tx {
            Engine::Sqlite(t) => {
                sqlx::query("DELETE FROM retrieval_pair_index WHERE rowid = $1")
                    .bind(doc)
                    .execute(&mut **t)
                    .await?;
            }
            Engine::Postgres(t) => {
                sqlx::query("DELETE FROM retrieval_postings WHERE doc = $1")
                    .bind(doc)
                    .execute(&mut **t)
                    .await?;
            }
        }
        insert_terms(tx, DocKind::Pair, doc, &terms).await?;
    }
    Ok(())
}

/// Indexes `doc` under `terms` (distinct, as [`retrieval_terms`] makes them).
async fn insert_terms(
    tx: &mut Tx,
    kind: DocKind,
    doc: i64,
    terms: &[String],
) -> Result<(), StoreError> {
    match tx {
        Engine::Sqlite(t) => {
            sqlx::query(&format!(
                "INSERT INTO {} (rowid, terms) VALUES ($1, $2)",
                kind.index()
            ))
            .bind(doc)
            .bind(terms.join(" "))
            .execute(&mut **t)
            .await?;
        }
        Engine::Postgres(t) => {
            sqlx::query(
                "INSERT INTO retrieval_postings (kind, term, doc)
                 SELECT $1, term, $2 FROM unnest($3::text[]) AS q(term)
                 ON CONFLICT DO NOTHING",
            )
            .bind(kind.as_str())
            .bind(doc)
            .bind(terms)
            .execute(&mut **t)
            .await?;
            sqlx::query("UPDATE retrieval_docs SET term_count = $1 WHERE id = $2")
                .bind(terms.len() as i64)
                .bind(doc)
                .execute(&mut **t)
                .await?;
        }
    }
    Ok(())
}

/// A row of [`Store::retrieve`]'s query, on either engine.
fn retrieved<'r, R: Row>(r: &'r R, kind: DocKind) -> Result<Retrieved, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Retrieved {
        doc: r.try_get(0)?,
        kind,
        text: r.try_get(1)?,
        matched: r.try_get(2)?,
        message: r.try_get(3)?,
        source: r.try_get(4)?,
        language: r.try_get(5)?,
        bm25: r.try_get(6)?,
    })
}

/// Quotes a term for an FTS5 query (terms are letters, but a stray quote must not become
/// syntax).
fn fts_phrase(term: &str) -> String {
    format!("\"{}\"", term.replace('"', "\"\""))
}

/// The best `$2` docs of a kind for the terms `$1` on PostgreSQL, as `(id, rank)`: FTS5's bm25
/// (`-Σ idf · (k1 + 1) / (1 + k1 · (1 − b + b · len / avglen))` over the doc's matching terms,
/// each once, with `idf = ln((N − n + 0.5) / (n + 0.5))` floored at 1e-6 as FTS5 does), the
/// best (lowest) first and ties by id. `{kind}` is a [`DocKind::as_str`].
const POSTGRES_BEST: &str = "
    SELECT p.doc AS id,
           -SUM(w.idf * ({k1} + 1) / (1 + {k1} * (1 - {b} + {b} * d.term_count / c.avglen))) AS rank
    FROM (SELECT COUNT(*)::float8 AS n,
                 GREATEST(SUM(term_count)::float8 / GREATEST(COUNT(*), 1), 1e-9) AS avglen
          FROM retrieval_docs WHERE kind = '{kind}') AS c
    CROSS JOIN LATERAL (
          SELECT q.term, GREATEST(ln((c.n - COUNT(*) + 0.5) / (COUNT(*) + 0.5)), 1e-6) AS idf
          FROM unnest($1::text[]) AS q(term)
          JOIN retrieval_postings x ON x.kind = '{kind}' AND x.term = q.term
          GROUP BY q.term) AS w
    JOIN retrieval_postings p ON p.kind = '{kind}' AND p.term = w.term
    JOIN retrieval_docs d ON d.id = p.doc
    GROUP BY p.doc
    ORDER BY rank, p.doc
    LIMIT $2";

impl Store {
    /// Adds corpus sentences as unpaired retrieval docs tagged `source`, in one transaction;
    /// sentences already indexed under that source are skipped. Returns how many were added.
    pub async fn add_sentences<'a>(
        &self,
        source: &str,
        sentences: impl IntoIterator<Item = &'a str>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let mut added = 0;
        for s in sentences {
            let s = s.trim();
            let terms = retrieval_terms(s);
            if terms.is_empty() {
                continue;
            }
            let doc: i64 = on_engine!(&mut tx, |t| sqlx::query_scalar(
                "INSERT INTO retrieval_docs (kind, text, source, language)
                 VALUES ('sentence', $1, $2, $3) RETURNING id",
            )
            .bind(s)
            .bind(source)
            .bind(lang::detect(s))
            .fetch_one(&mut **t)
            .await?);
            insert_terms(&mut tx, DocKind::Sentence, doc, &terms).await?;
            added += 1;
        }
        tx.commit().await?;
        Ok(added)
    }

    /// How many retrieval docs of each kind are indexed.
    pub async fn retrieval_counts(&self) -> Result<HashMap<DocKind, i64>, StoreError> {
        let rows: Vec<(String, i64)> = on_engine!(&self.pool, |p| sqlx::query_as(
            "SELECT kind, COUNT(*) FROM retrieval_docs GROUP BY kind"
        )
        .fetch_all(p)
        .await?);
        Ok(rows
            .into_iter()
            .map(|(k, n)| {
                let kind = if k == "pair" {
                    DocKind::Pair
                } else {
                    DocKind::Sentence
                };
                (kind, n)
            })
            .collect())
    }

    /// Whether an import or corpus tagged `source` is in the store.
    pub async fn has_source(&self, source: &str) -> Result<bool, StoreError> {
        Ok(on_engine!(&self.pool, |p| sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM imports WHERE source = $1)
                 OR EXISTS (SELECT 1 FROM retrieval_docs WHERE source = $1 AND kind = 'sentence')",
        )
        .bind(source)
        .fetch_one(p)
        .await?))
    }

    /// The number of docs containing each of `terms`, and the number of docs in all (an upper
    /// bound: the largest doc id).
    pub async fn term_frequencies(
        &self,
        terms: &[String],
    ) -> Result<(HashMap<String, i64>, i64), StoreError> {
        let total: Option<i64> = on_engine!(&self.pool, |p| sqlx::query_scalar(
            "SELECT MAX(id) FROM retrieval_docs"
        )
        .fetch_one(p)
        .await?);
        let mut df = HashMap::new();
        if terms.is_empty() {
            return Ok((df, total.unwrap_or(0)));
        }
        let rows: Vec<(String, i64)> = match &self.pool {
            Engine::Sqlite(pool) => {
                let mut rows = Vec::new();
                for vocab in ["retrieval_pair_vocab", "retrieval_sentence_vocab"] {
                    // One equality per term: fts5vocab looks a term up only for `term = ?`
                    // (with `IN` it reads the whole vocabulary, which grows with the store).
                    // (SQLite allows 500 terms in a compound SELECT.)
                    for chunk in terms.chunks(400) {
                        let mut q = QueryBuilder::new("");
                        for (i, t) in chunk.iter().enumerate() {
                            if i > 0 {
                                q.push(" UNION ALL ");
                            }
                            q.push(format!("SELECT term, doc FROM {vocab} WHERE term = "));
                            q.push_bind(t.clone());
                        }
                        rows.extend(q.build_query_as().fetch_all(pool).await?);
                    }
                }
                rows
            }
            Engine::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT term, COUNT(*) FROM retrieval_postings
                     WHERE kind IN ('pair', 'sentence') AND term = ANY($1)
                     GROUP BY term",
                )
                .bind(terms)
                .fetch_all(pool)
                .await?
            }
        };
        for (term, n) in rows {
            *df.entry(term).or_insert(0) += n;
        }
        Ok((df, total.unwrap_or(0)))
    }

    /// The best `limit` docs of `kind` for `terms` by bm25 that may be retrieved under `share`:
    /// a pair only while both its messages have text and neither author opted out, and a live
    /// one only from a channel that shares (see [`SharePolicy`]).
    pub async fn retrieve(
        &self,
        kind: DocKind,
        terms: &[String],
        share: SharePolicy,
        limit: usize,
    ) -> Result<Vec<Retrieved>, StoreError> {
        if terms.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        // The best matches by bm25, found by the index (`$1` the terms, `$2` how many), then the
        // conditions on those alone.
        let best = match self.pool {
            Engine::Sqlite(_) => format!(
                "SELECT rowid AS id, rank FROM {index} WHERE {index} MATCH $1 ORDER BY rank LIMIT $2",
                index = kind.index()
            ),
            Engine::Postgres(_) => POSTGRES_BEST
                .replace("{kind}", kind.as_str())
                .replace("{k1}", &BM25_K1.to_string())
                .replace("{b}", &BM25_B.to_string()),
        };
        let sql = match kind {
            DocKind::Sentence => format!(
                "SELECT d.id, d.text, d.text, NULL, d.source, d.language, m.rank
                 FROM ({best}) m JOIN retrieval_docs d ON d.id = m.id
                 ORDER BY m.rank, d.id LIMIT $3"
            ),
            DocKind::Pair => format!(
                "SELECT d.id, r.text, c.text, r.id, d.source, d.language, m.rank
                 FROM ({best}) m
                 JOIN retrieval_docs d ON d.id = m.id
                 JOIN messages r ON r.id = d.reply_id
                 JOIN messages c ON c.id = d.context_id
                 WHERE r.text IS NOT NULL AND c.text IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.platform = r.platform
                                   AND o.user_id IN (r.author_id, c.author_id))
                   AND (r.source <> 'live' OR CASE WHEN r.chat_kind = 'direct' THEN $4
                        ELSE COALESCE((SELECT ch.shared FROM channels ch
                                       WHERE ch.platform = r.platform AND ch.chat_id = r.chat_id
                                         AND ch.thread_id = r.thread_id), $5) END)
                 ORDER BY m.rank, d.id LIMIT $3"
            ),
        };
        let fetched = (limit * OVERFETCH) as i64;
        Ok(match &self.pool {
            Engine::Sqlite(p) => {
                let query = terms
                    .iter()
                    .map(|t| fts_phrase(t))
                    .collect::<Vec<_>>()
                    .join(" OR ");
                let mut q = sqlx::query(&sql)
                    .bind(query)
                    .bind(fetched)
                    .bind(limit as i64);
                if kind == DocKind::Pair {
                    q = q.bind(share.direct).bind(share.groups);
                }
                let rows = q.fetch_all(p).await?;
                rows.iter()
                    .map(|r| retrieved(r, kind))
                    .collect::<Result<_, _>>()?
            }
            Engine::Postgres(p) => {
                let mut q = sqlx::query(&sql)
                    .bind(terms)
                    .bind(fetched)
                    .bind(limit as i64);
                if kind == DocKind::Pair {
                    q = q.bind(share.direct).bind(share.groups);
                }
                let rows = q.fetch_all(p).await?;
                rows.iter()
                    .map(|r| retrieved(r, kind))
                    .collect::<Result<_, _>>()?
            }
        })
    }

    /// 👍 and 👎 that people put on the bot's replies made from each of `docs`.
    pub async fn doc_feedback(&self, docs: &[i64]) -> Result<HashMap<i64, Feedback>, StoreError> {
        let mut out = HashMap::new();
        if docs.is_empty() {
            return Ok(out);
        }
        let rows: Vec<(i64, String, i64)> = on_engine!(&self.pool, |p| {
            let mut q = QueryBuilder::new(
                "SELECT rp.source_doc, x.emoji, COUNT(*) FROM replies rp
             JOIN messages b ON b.platform = rp.platform AND b.chat_id = rp.chat_id
                AND b.reply_to = rp.message_id AND b.from_self AND NOT b.is_notice
             JOIN reactions x ON x.platform = b.platform AND x.chat_id = b.chat_id
                AND x.message_id = b.message_id
             WHERE rp.source_doc IN (",
            );
            let mut list = q.separated(", ");
            for d in docs {
                list.push_bind(*d);
            }
            q.push(") GROUP BY rp.source_doc, x.emoji");
            q.build_query_as().fetch_all(p).await?
        });
        for (doc, emoji, n) in rows {
            let f: &mut Feedback = out.entry(doc).or_default();
            match crate::text::reaction_sign(&emoji) {
                1 => f.up += n,
                -1 => f.down += n,
                _ => {}
            }
        }
        Ok(out)
    }

    /// Whether the channel's messages may be retrieved elsewhere: `Some` after `/share on|off`,
    /// `None` when it follows the daemon's setting.
    pub async fn shared(&self, channel: &ChannelRef) -> Result<Option<bool>, StoreError> {
        let v: Option<Option<bool>> = on_engine!(&self.pool, |p| {
            sqlx::query_scalar(
            "SELECT shared FROM channels WHERE platform = $1 AND chat_id = $2 AND thread_id = $3",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .fetch_optional(p)
        .await?
        });
        Ok(v.flatten())
    }

    pub async fn set_shared(&self, channel: &ChannelRef, on: bool) -> Result<(), StoreError> {
        on_engine!(&self.pool, |p| sqlx::query(
            "INSERT INTO channels (platform, chat_id, thread_id, shared) VALUES ($1, $2, $3, $4)
             ON CONFLICT (platform, chat_id, thread_id) DO UPDATE SET shared = excluded.shared",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .bind(on)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SharePolicy;

    #[test]
    fn direct_messages_follow_the_operator_and_groups_their_share_setting() {
        let default = SharePolicy::default();
        assert!(!default.shares(true, Some(true)), "/share cannot open a DM");
        assert!(default.shares(false, Some(true)));
        assert!(!default.shares(false, None));
        let open = SharePolicy {
            groups: true,
            direct: true,
        };
        assert!(open.shares(true, None));
        assert!(open.shares(false, None));
        assert!(!open.shares(false, Some(false)));
    }
}
