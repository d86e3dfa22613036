//! `kaiwa import`'s second half: conversations parsed by [`super::import`] → rows in the store,
//! all in one transaction, so a failed or interrupted import leaves the store as it was.
//!
//! Importing is idempotent. A message keeps the source's own id when it has one (Telegram and
//! Discord exports, which then merge with what the bot collected live in the same chat);
//! otherwise its conversation gets an id derived from its content and the message its index, so
//! the same dialogue imported twice — from the same file or another — adds nothing.
//! Messages of users who opted out are not stored.

use std::path::Path;

use super::import::{self, Conversation, Format, ImportError, RecordError, Role};
use crate::store::{ImportInsert, ImportRecord, ImportedRow, Store, StoreError};
use crate::text::hash::stable_hash;

/// Settings of an import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub format: Format,
    /// The tag stored with every row; defaults to `import:<format>:<file name>`.
    pub source: Option<String>,
    /// Abort (storing nothing) if any record is malformed, instead of skipping it.
    pub strict: bool,
    /// In chat exports and transcripts, the speaker whose messages are the assistant side.
    pub assistant: Option<String>,
    /// Draw a progress spinner on standard error (when it is a terminal).
    pub progress: bool,
}

impl ImportOptions {
    pub fn new(format: Format) -> Self {
        ImportOptions {
            format,
            source: None,
            strict: false,
            assistant: None,
            progress: false,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ImportSummary {
    pub source: String,
    /// Conversations of which at least one message was new.
    pub conversations: u64,
    /// Messages stored.
    pub messages: u64,
    /// Messages already in the store.
    pub duplicates: u64,
    /// Messages not stored because their author opted out.
    pub opted_out: u64,
    /// Malformed records skipped, with where and why (the first 100).
    pub skipped: u64,
    pub errors: Vec<String>,
}

/// Errors of an import. The store is unchanged after any of them.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Read(#[from] ImportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{count} malformed records (nothing imported, as --strict asks):\n  {}", first.join("\n  "))]
    Strict { count: u64, first: Vec<String> },
}

const MAX_LISTED_ERRORS: usize = 100;

/// Imports `path` into the store.
pub async fn import_file(
    store: &Store,
    path: &Path,
    options: &ImportOptions,
) -> Result<ImportSummary, IngestError> {
    let records = import::read(path, options.format)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let source = options
        .source
        .clone()
        .unwrap_or_else(|| format!("import:{}:{file_name}", options.format));

    // Parse on a blocking thread while rows are written, a bounded channel between the two.
    let (send, mut receive) = tokio::sync::mpsc::channel::<Result<Conversation, RecordError>>(64);
    let parser = tokio::task::spawn_blocking(move || {
        for record in records {
            if send.blocking_send(record).is_err() {
                break;
            }
        }
    });

    let spinner = if options.progress {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} importing: {human_pos} messages ({per_sec})",
            )
            .expect("the template is valid"),
        );
        s
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut summary = ImportSummary {
        source: source.clone(),
        ..Default::default()
    };
    let base_ms = crate::store::now_ms();
    let mut tx = store.begin_import(&source).await?;
    while let Some(record) = receive.recv().await {
        let conversation = match record {
            Ok(c) => c,
            Err(e) => {
                summary.skipped += 1;
                if summary.errors.len() < MAX_LISTED_ERRORS {
                    summary.errors.push(e.to_string());
                }
                continue;
            }
        };
        let mut new = false;
        for row in rows(&conversation, options.assistant.as_deref(), base_ms) {
            match tx.insert(&row).await? {
                ImportInsert::Stored => {
                    summary.messages += 1;
                    new = true;
                }
                ImportInsert::Duplicate => summary.duplicates += 1,
                ImportInsert::OptedOut => summary.opted_out += 1,
            }
            spinner.inc(1);
        }
        summary.conversations += u64::from(new);
    }
    // The parser only stops early if the receiver is gone, which it is not here.
    let _ = parser.await;
    spinner.finish_and_clear();
    if options.strict && summary.skipped > 0 {
        return Err(IngestError::Strict {
            count: summary.skipped,
            first: summary.errors,
        });
    }
    tx.commit(&ImportRecord {
        source,
        format: options.format.to_string(),
        path: path.display().to_string(),
        conversations: summary.conversations,
        messages: summary.messages,
        duplicates: summary.duplicates,
        skipped: summary.skipped,
    })
    .await?;
    Ok(summary)
}

/// A conversation's rows. Messages without a time are put a second apart after the previous
/// one (or after `base_ms`, the start of the import), so they stay one session.
pub fn rows(c: &Conversation, assistant: Option<&str>, base_ms: i64) -> Vec<ImportedRow> {
    let chat_id = c.chat_id.clone().unwrap_or_else(|| content_id(c));
    let mut at = base_ms;
    c.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            at = m.sent_at_ms.unwrap_or(at + 1000);
            ImportedRow {
                platform: c.platform,
                chat_id: chat_id.clone(),
                direct: c.direct,
                message_id: m.id.clone().unwrap_or_else(|| i.to_string()),
                author_id: m.author_id.clone(),
                author_name: m.author_name.clone(),
                author_is_bot: m.author_is_bot,
                from_self: m.role == Role::Assistant
                    || assistant.is_some_and(|a| a == m.author_name || a == m.author_id),
                is_system: m.role == Role::System,
                text: m.text.clone(),
                reply_to: m.reply_to.clone(),
                sent_at_ms: at,
            }
        })
        .collect()
}

/// An id for a conversation without one: a hash of its roles and texts, so the same dialogue gets
/// the same id whatever file or format it comes from.
fn content_id(c: &Conversation) -> String {
    let mut parts: Vec<&str> = Vec::with_capacity(c.messages.len() * 2);
    for m in &c.messages {
        parts.push(match m.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        });
        parts.push(&m.text);
    }
    format!("{:016x}", stable_hash(&parts))
}
