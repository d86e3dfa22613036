//! `kaiwa bench corpus`: import and export throughput at the scale of a busy community.
//!
//! A synthetic Telegram Desktop full export (`result.json`, many group chats, bilingual small
//! talk, one speaker named `kaiwa` taken as the assistant side) is written, imported into a
//! fresh store (timed), and the store is then exported in both modes (timed). Peak memory is
//! measured per phase, so an export whose memory grows with the store shows up here.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::{peak_rss_mib, reset_peak_rss, rss_mib};
use crate::corpus::export::{export, ExportError, ExportMode, ExportOptions};
use crate::corpus::import::Format;
use crate::corpus::ingest::{import_file, ImportOptions, IngestError};
use crate::store::{Store, StoreError};

/// Errors of the corpus benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("writing the synthetic export: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Import(#[from] IngestError),
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// What the corpus benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct CorpusReport {
    /// The store's engine: `sqlite` or `postgres`.
    pub engine: &'static str,
    pub messages: u64,
    pub chats: u64,
    pub export_file_mib: f64,
    pub import_seconds: f64,
    pub import_messages_per_s: f64,
    pub import_peak_rss_mib: f64,
    pub exports: Vec<ExportFigures>,
    /// The store's size after the import (file pages, or tables and indexes).
    pub store_mib: f64,
}

/// One timed export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportFigures {
    pub mode: ExportMode,
    pub seconds: f64,
    pub messages_per_s: f64,
    pub examples: u64,
    /// Resident memory when the export started (what the import left allocated) and the peak
    /// during it: the difference is what the export itself needed.
    pub rss_before_mib: f64,
    pub peak_rss_mib: f64,
}

/// Lines people say in the synthetic chats (the number appended keeps them distinct).
const LINES: &[&str] = &[
    "おはよう！今日はいい天気だね",
    "昨日のラーメン屋さん、すごく美味しかった",
    "週末は京都に旅行する予定です",
    "サッカーの試合見た？最後のゴールすごかった",
    "Good morning! Did you sleep well?",
    "I tried that new curry place last night",
    "We're planning a trip to Hokkaido in winter",
    "Did you watch the baseball game yesterday?",
    "今日は雨が降りそうだから傘を持っていこう",
    "What are you cooking for dinner tonight?",
];

/// Writes a Telegram Desktop full export of `messages` messages in chats of `per_chat`.
pub fn write_telegram_export(path: &Path, messages: u64, per_chat: u64) -> std::io::Result<u64> {
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    let chats = messages.div_ceil(per_chat);
    writeln!(
        w,
        r#"{{"about": "synthetic export for kaiwa bench corpus","#
    )?;
    writeln!(w, r#" "chats": {{"about": "", "list": ["#)?;
    let names = ["Aki", "Ben", "kaiwa"];
    let mut n = 0u64;
    for chat in 0..chats {
        if chat > 0 {
            writeln!(w, ",")?;
        }
        write!(
            w,
            r#"{{"name": "chat {chat}", "type": "private_supergroup", "id": {}, "messages": ["#,
            1_000_000 + chat
        )?;
        let count = per_chat.min(messages - n);
        for i in 0..count {
            // A message a minute, and a two-hour silence every 20 messages.
            let t = 1_700_000_000 + i * 60 + (i / 20) * 7200;
            let speaker = (i % 3) as usize;
            let text = LINES[((i * 7 + chat) % LINES.len() as u64) as usize];
            if i > 0 {
                w.write_all(b",")?;
            }
            write!(
                w,
                r#"{{"id": {}, "type": "message", "date": "2023-11-14T22:13:20", "date_unixtime": "{t}", "from": "{}", "from_id": "user{}", "text": "{text} ({n})"}}"#,
                i + 1,
                names[speaker],
                speaker + 1,
            )?;
            n += 1;
        }
        write!(w, "]}}")?;
    }
    writeln!(w, "]}}}}")?;
    w.flush()?;
    Ok(chats)
}

/// Runs the benchmark in `dir` (a scratch directory) with `messages` messages, on a SQLite
/// store there or, with `postgres`, in a scratch schema on that server
/// ([`super::open_bench_store`]).
pub async fn bench_corpus(
    dir: &Path,
    postgres: Option<&str>,
    messages: u64,
) -> Result<CorpusReport, BenchError> {
    let json = dir.join("result.json");
    let chats = write_telegram_export(&json, messages, 1000)?;
    let export_file_mib = std::fs::metadata(&json)?.len() as f64 / (1024.0 * 1024.0);
    let store: Store = super::open_bench_store(dir, postgres, "bench").await?;

    reset_peak_rss();
    let t = Instant::now();
    let options = ImportOptions {
        assistant: Some("kaiwa".into()),
        ..ImportOptions::new(Format::Telegram)
    };
    let imported = import_file(&store, &json, &options).await?;
    let import_seconds = t.elapsed().as_secs_f64();
    let import_peak_rss_mib = peak_rss_mib();

    let mut exports = Vec::new();
    for mode in [ExportMode::Bot, ExportMode::All] {
        reset_peak_rss();
        let rss_before_mib = rss_mib();
        let t = Instant::now();
        let summary = export(
            &store,
            &dir.join(format!("export-{mode:?}")),
            &ExportOptions {
                mode,
                val_fraction: 0.01,
                ..Default::default()
            },
        )
        .await?;
        let seconds = t.elapsed().as_secs_f64();
        exports.push(ExportFigures {
            mode,
            seconds,
            messages_per_s: summary.messages_read as f64 / seconds,
            examples: summary.examples(),
            rss_before_mib,
            peak_rss_mib: peak_rss_mib(),
        });
    }
    let store_mib = store.size_bytes().await? as f64 / (1024.0 * 1024.0);
    let engine = store.engine();
    super::close_bench_store(store).await?;
    Ok(CorpusReport {
        engine,
        store_mib,
        messages: imported.messages,
        chats,
        export_file_mib,
        import_seconds,
        import_messages_per_s: imported.messages as f64 / import_seconds,
        import_peak_rss_mib,
        exports,
    })
}
