//! `kaiwa bench reply`: the reply engine as the store grows. A scratch store is filled with
//! (message → reply) pairs in steps (10k, 100k, 1M by default) through the import path, so the
//! index is built as it is in use (timed: pairs indexed per second); after each step every
//! prompt of the everyday suites is answered (retrieval alone and the whole reply — retrieval,
//! a generated candidate and the ranker — timed, p50 and p99), with the process's memory.
//!
//! The pairs are real sentences (the Tanaka corpus, both languages, paired at random), so the
//! index has the vocabulary and term frequencies of everyday text.

use std::path::Path;
use std::time::Instant;

use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::{peak_rss_mib, percentile, rss_mib};
use crate::domain::Platform;
use crate::engine::{EngineError, ReplyEngine, Request};
use crate::model::{ChatMessage, Generator};
use crate::store::{ImportRecord, ImportedRow, Store, StoreError};

/// Errors of the reply benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ReplyBenchError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The figures at one store size.
#[derive(Debug, Clone, Serialize)]
pub struct ReplyStep {
    /// Pairs in the store (more than asked for when a kept store was larger).
    pub pairs: u64,
    /// Pairs indexed per second while growing to this size (none when the store had them).
    pub index_pairs_per_s: Option<f64>,
    pub retrieve_p50_ms: f64,
    pub retrieve_p99_ms: f64,
    pub reply_p50_ms: f64,
    pub reply_p99_ms: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub store_mib: f64,
}

/// Runs the benchmark for the cumulative `sizes` on a scratch store: a SQLite file in `dir`
/// (grown, not refilled, when kept from an earlier run) or, with `postgres`, a fresh schema on
/// that server ([`super::open_bench_store`]).
pub async fn bench_reply(
    dir: &Path,
    postgres: Option<&str>,
    generator: &Generator,
    engine: &ReplyEngine,
    sentences_file: &Path,
    prompts: &[String],
    sizes: &[u64],
) -> Result<Vec<ReplyStep>, ReplyBenchError> {
    let sentences = read_sentences(sentences_file)?;
    let store: Store = super::open_bench_store(dir, postgres, "bench-reply").await?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    // A store kept from an earlier run (`--dir`) is grown, not refilled.
    let mut have = store
        .retrieval_counts()
        .await?
        .get(&crate::store::DocKind::Pair)
        .copied()
        .unwrap_or(0) as u64;
    let mut steps = Vec::new();
    for &size in sizes {
        let started = Instant::now();
        let grown = size > have;
        let added = size.saturating_sub(have);
        if grown {
            let mut tx = store.begin_import("bench:reply").await?;
            for i in have..size {
                let pick = |rng: &mut rand_chacha::ChaCha8Rng| {
                    sentences.choose(rng).cloned().unwrap_or_default()
                };
                for (j, text) in [pick(&mut rng), pick(&mut rng)].into_iter().enumerate() {
                    tx.insert(&ImportedRow {
                        platform: Platform::Import,
                        chat_id: format!("bench-{i}"),
                        direct: false,
                        message_id: j.to_string(),
                        author_id: format!("speaker-{j}"),
                        author_name: format!("speaker-{j}"),
                        author_is_bot: false,
                        from_self: j == 1,
                        is_system: false,
                        text,
                        reply_to: None,
                        sent_at_ms: 1_000 * j as i64,
                    })
                    .await?;
                }
            }
            tx.commit(&ImportRecord {
                source: "bench:reply".into(),
                format: "bench".into(),
                path: String::new(),
                conversations: added,
                messages: 2 * added,
                duplicates: 0,
                skipped: 0,
            })
            .await?;
        }
        let index_seconds = started.elapsed().as_secs_f64();
        have = have.max(size);
        let (mut retrieve_ms, mut reply_ms) = (Vec::new(), Vec::new());
        let options = generator.default_options();
        for prompt in prompts {
            let started = Instant::now();
            let retrieval = engine.retrieve(&store, prompt).await?;
            retrieve_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let messages = [ChatMessage::user(prompt.clone())];
            let request = Request {
                messages: &messages,
                user_text: prompt,
                recent_replies: &[],
                options: &options,
            };
            tokio::task::block_in_place(|| engine.reply(generator, &request, retrieval, &|| true))?;
            reply_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let store_mib = store.size_bytes().await? as f64 / 1048576.0;
        let step = ReplyStep {
            pairs: have,
            index_pairs_per_s: grown.then(|| added as f64 / index_seconds.max(1e-9)),
            retrieve_p50_ms: percentile(&mut retrieve_ms, 0.50),
            retrieve_p99_ms: percentile(&mut retrieve_ms, 0.99),
            reply_p50_ms: percentile(&mut reply_ms, 0.50),
            reply_p99_ms: percentile(&mut reply_ms, 0.99),
            rss_mib: rss_mib(),
            peak_rss_mib: peak_rss_mib(),
            store_mib,
        };
        tracing::info!(?step, "reply benchmark step");
        steps.push(step);
    }
    super::close_bench_store(store).await?;
    Ok(steps)
}

/// Both sides of every sentence pair of a `japanese<TAB>english` file.
fn read_sentences(path: &Path) -> Result<Vec<String>, ReplyBenchError> {
    let err = |reason: String| ReplyBenchError::Read {
        path: path.display().to_string(),
        reason,
    };
    let (pairs, _) = crate::corpus::derive::read_pairs(path).map_err(|e| err(e.to_string()))?;
    if pairs.is_empty() {
        return Err(err("no sentence pairs".into()));
    }
    Ok(pairs.into_iter().flat_map(|p| [p.ja, p.en]).collect())
}
