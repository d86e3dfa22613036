//! The reply engine's retrieval index (`retrieval_docs`, full-text `retrieval_pair_index` and
//! `retrieval_sentence_index`): pairs of a message and the reply a person wrote after it,
//! indexed as they are stored (live or imported), and unpaired corpus sentences. Deletions reach the index through triggers
//! (`migrations/0003_retrieval.sql`); consent and sharing are applied when retrieving, so an
//! opt-out or `/share off` takes effect at once.

use std::collections::HashMap;

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{NewRow, Store, StoreError};
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
    /// The full-text index of this kind's docs.
    fn index(self) -> &'static str {
        match self {
            DocKind::Pair => "retrieval_pair_index",
            DocKind::Sentence => "retrieval_sentence_index",
        }
    }
}

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
pub(super) async fn index_reply(
    conn: &mut SqliteConnection,
    id: i64,
    row: &NewRow<'_>,
) -> Result<(), StoreError> {
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
    let previous: Option<(i64, String, String, i64, String)> = sqlx::query_as(
        "SELECT id, author_id, text, sent_at_ms, source FROM messages
         WHERE platform = ? AND chat_id = ? AND thread_id = ? AND id <> ?
           AND (sent_at_ms < ? OR (sent_at_ms = ? AND id < ?))
           AND is_notice = 0 AND is_system = 0 AND text IS NOT NULL
         ORDER BY sent_at_ms DESC, id DESC LIMIT 1",
    )
    .bind(row.platform)
    .bind(row.chat_id)
    .bind(row.thread_id)
    .bind(id)
    .bind(row.sent_at_ms)
    .bind(row.sent_at_ms)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
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
    let doc: Option<i64> = sqlx::query_scalar(
        "INSERT INTO retrieval_docs (kind, context_id, reply_id, source, language)
         VALUES ('pair', ?, ?, ?, ?) ON CONFLICT (reply_id) DO NOTHING RETURNING id",
    )
    .bind(context_id)
    .bind(id)
    .bind(row.source)
    .bind(lang::detect(text))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(doc) = doc {
        insert_terms(conn, DocKind::Pair, doc, &terms).await?;
    }
    Ok(())
}

/// Re-indexes after the message `id` was edited: the pairs it is the context of, and the
/// language of the pair it is the reply of.
pub(super) async fn reindex_edited(
    conn: &mut SqliteConnection,
    id: i64,
    text: &str,
) -> Result<(), StoreError> {
    let docs: Vec<i64> = sqlx::query_scalar("SELECT id FROM retrieval_docs WHERE context_id = ?")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    // The message may be the reply of a pair: its language is the candidate's.
    sqlx::query("UPDATE retrieval_docs SET language = ? WHERE reply_id = ?")
        .bind(lang::detect(text))
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let terms = retrieval_terms(text);
    for doc in docs {
        sqlx::query("DELETE FROM retrieval_pair_index WHERE rowid = ?")
            .bind(doc)
            .execute(&mut *conn)
            .await?;
        insert_terms(conn, DocKind::Pair, doc, &terms).await?;
    }
    Ok(())
}

async fn insert_terms(
    conn: &mut SqliteConnection,
    kind: DocKind,
    doc: i64,
    terms: &[String],
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO {} (rowid, terms) VALUES (?, ?)",
        kind.index()
    ))
    .bind(doc)
    .bind(terms.join(" "))
    .execute(conn)
    .await?;
    Ok(())
}

/// Quotes a term for an FTS5 query (terms are letters, but a stray quote must not become
/// syntax).
fn fts_phrase(term: &str) -> String {
    format!("\"{}\"", term.replace('"', "\"\""))
}

impl Store {
    /// Adds corpus sentences as unpaired retrieval docs tagged `source`, in one transaction;
    /// sentences already indexed under that source are skipped. Returns how many were added.
    pub async fn add_sentences<'a>(
        &self,
        source: &str,
        sentences: impl IntoIterator<Item = &'a str>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut added = 0;
        for s in sentences {
            let s = s.trim();
            let terms = retrieval_terms(s);
            if terms.is_empty() {
                continue;
            }
            let doc: i64 = sqlx::query_scalar(
                "INSERT INTO retrieval_docs (kind, text, source, language)
                 VALUES ('sentence', ?, ?, ?) RETURNING id",
            )
            .bind(s)
            .bind(source)
            .bind(lang::detect(s))
            .fetch_one(&mut *tx)
            .await?;
            insert_terms(&mut tx, DocKind::Sentence, doc, &terms).await?;
            added += 1;
        }
        tx.commit().await?;
        Ok(added)
    }

    /// How many retrieval docs of each kind are indexed.
    pub async fn retrieval_counts(&self) -> Result<HashMap<DocKind, i64>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT kind, COUNT(*) FROM retrieval_docs GROUP BY kind")
                .fetch_all(&self.pool)
                .await?;
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
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM imports WHERE source = ?
             UNION ALL SELECT 1 FROM retrieval_docs WHERE source = ? AND kind = 'sentence'
             LIMIT 1",
        )
        .bind(source)
        .bind(source)
        .fetch_optional(&self.pool)
        .await?;
        Ok(n.is_some())
    }

    /// The number of docs containing each of `terms`, and the number of docs in all (an upper
    /// bound: the largest doc id).
    pub async fn term_frequencies(
        &self,
        terms: &[String],
    ) -> Result<(HashMap<String, i64>, i64), StoreError> {
        let total: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM retrieval_docs")
            .fetch_one(&self.pool)
            .await?;
        let mut df = HashMap::new();
        if !terms.is_empty() {
            for vocab in ["retrieval_pair_vocab", "retrieval_sentence_vocab"] {
                // One equality per term: fts5vocab looks a term up only for `term = ?` (with
                // `IN` it reads the whole vocabulary, which grows with the store).
                // (SQLite allows 500 terms in a compound SELECT.)
                for chunk in terms.chunks(400) {
                    let mut q = QueryBuilder::<Sqlite>::new("");
                    for (i, t) in chunk.iter().enumerate() {
                        if i > 0 {
                            q.push(" UNION ALL ");
                        }
                        q.push(format!("SELECT term, doc FROM {vocab} WHERE term = "));
                        q.push_bind(t.clone());
                    }
                    let rows: Vec<(String, i64)> = q.build_query_as().fetch_all(&self.pool).await?;
                    for (term, n) in rows {
                        *df.entry(term).or_insert(0) += n;
                    }
                }
            }
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
        let query = terms
            .iter()
            .map(|t| fts_phrase(t))
            .collect::<Vec<_>>()
            .join(" OR ");
        // The best matches by bm25, found inside FTS5, then the conditions on those alone.
        let best = format!(
            "SELECT rowid AS id, rank FROM {index} WHERE {index} MATCH ? ORDER BY rank LIMIT ?",
            index = kind.index()
        );
        let fetched = (limit * OVERFETCH) as i64;
        let rows = match kind {
            DocKind::Sentence => {
                sqlx::query(&format!(
                    "SELECT d.id, d.text, d.text, NULL, d.source, d.language, m.rank
                     FROM ({best}) m JOIN retrieval_docs d ON d.id = m.id
                     ORDER BY m.rank LIMIT ?"
                ))
                .bind(&query)
                .bind(fetched)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
            DocKind::Pair => {
                sqlx::query(&format!(
                    "SELECT d.id, r.text, c.text, r.id, d.source, d.language, m.rank
                     FROM ({best}) m
                     JOIN retrieval_docs d ON d.id = m.id
                     JOIN messages r ON r.id = d.reply_id
                     JOIN messages c ON c.id = d.context_id
                     WHERE r.text IS NOT NULL AND c.text IS NOT NULL
                       AND NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.platform = r.platform
                                       AND o.user_id IN (r.author_id, c.author_id))
                       AND (r.source <> 'live' OR CASE WHEN r.chat_kind = 'direct' THEN ?
                            ELSE COALESCE((SELECT ch.shared FROM channels ch
                                           WHERE ch.platform = r.platform AND ch.chat_id = r.chat_id
                                             AND ch.thread_id = r.thread_id), ?) END)
                     ORDER BY m.rank LIMIT ?"
                ))
                .bind(&query)
                .bind(fetched)
                .bind(share.direct)
                .bind(share.groups)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| Retrieved {
                doc: r.get(0),
                kind,
                text: r.get(1),
                matched: r.get(2),
                message: r.get(3),
                source: r.get(4),
                language: r.get(5),
                bm25: r.get(6),
            })
            .collect())
    }

    /// 👍 and 👎 that people put on the bot's replies made from each of `docs`.
    pub async fn doc_feedback(&self, docs: &[i64]) -> Result<HashMap<i64, Feedback>, StoreError> {
        let mut out = HashMap::new();
        if docs.is_empty() {
            return Ok(out);
        }
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT rp.source_doc, x.emoji, COUNT(*) FROM replies rp
             JOIN messages b ON b.platform = rp.platform AND b.chat_id = rp.chat_id
                AND b.reply_to = rp.message_id AND b.from_self = 1 AND b.is_notice = 0
             JOIN reactions x ON x.platform = b.platform AND x.chat_id = b.chat_id
                AND x.message_id = b.message_id
             WHERE rp.source_doc IN (",
        );
        let mut list = q.separated(", ");
        for d in docs {
            list.push_bind(*d);
        }
        q.push(") GROUP BY rp.source_doc, x.emoji");
        let rows: Vec<(i64, String, i64)> = q.build_query_as().fetch_all(&self.pool).await?;
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
        let v: Option<Option<bool>> = sqlx::query_scalar(
            "SELECT shared FROM channels WHERE platform = ? AND chat_id = ? AND thread_id = ?",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(v.flatten())
    }

    pub async fn set_shared(&self, channel: &ChannelRef, on: bool) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO channels (platform, chat_id, thread_id, shared) VALUES (?, ?, ?, ?)
             ON CONFLICT (platform, chat_id, thread_id) DO UPDATE SET shared = excluded.shared",
        )
        .bind(channel.platform.as_str())
        .bind(&channel.chat_id)
        .bind(&channel.thread_id)
        .bind(on)
        .execute(&self.pool)
        .await?;
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
