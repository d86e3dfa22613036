//! `kaiwa export-corpus`: the conversations users had with the bot, one JSON line per session:
//! `{"messages": [{"role": "user", "content": …}, {"role": "assistant", "content": …}, …]}`.
//!
//! A channel's history is cut into sessions at silences longer than the gap; each session is
//! rendered with the same function the bot uses for its prompts. Opted-out users and deleted
//! messages never appear (the store leaves them out).

use std::io::Write;

use crate::conversation::{self, Speakers};
use crate::model::ChatMessage;
use crate::store::{Store, StoreError, StoredMessage};

/// Settings of an export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// A silence longer than this starts a new session.
    pub gap_ms: i64,
    /// A system prompt put first in every example, if any.
    pub system: Option<String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            gap_ms: 30 * 60 * 1000,
            system: None,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ExportSummary {
    pub examples: usize,
    pub messages: usize,
    pub channels: usize,
}

/// Errors of an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the corpus: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(serde::Serialize)]
struct Example<'a> {
    messages: &'a [ChatMessage],
}

/// Writes every session that contains a bot reply as one JSONL line.
pub async fn export_openai(
    store: &Store,
    out: &mut dyn Write,
    options: &ExportOptions,
) -> Result<ExportSummary, ExportError> {
    let mut summary = ExportSummary::default();
    let mut io_error = None;
    store
        .for_each_channel(|history| {
            if io_error.is_some() {
                return;
            }
            summary.channels += 1;
            for session in sessions(&history, options.gap_ms) {
                if let Some(messages) = bot_example(session, options.system.as_deref()) {
                    let line = serde_json::to_string(&Example {
                        messages: &messages,
                    })
                    .expect("messages serialise");
                    if let Err(e) = writeln!(out, "{line}") {
                        io_error = Some(e);
                        return;
                    }
                    summary.examples += 1;
                    summary.messages += messages.len();
                }
            }
        })
        .await?;
    if let Some(e) = io_error {
        return Err(e.into());
    }
    out.flush()?;
    Ok(summary)
}

/// Cuts a channel's messages (in time order) at silences longer than `gap_ms`.
pub fn sessions(history: &[StoredMessage], gap_ms: i64) -> Vec<&[StoredMessage]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..history.len() {
        if history[i].sent_at_ms - history[i - 1].sent_at_ms > gap_ms {
            out.push(&history[start..i]);
            start = i;
        }
    }
    if start < history.len() {
        out.push(&history[start..]);
    }
    out
}

/// A session as a training example: it must start with a user turn and end with an assistant
/// turn, and contain at least one of each.
fn bot_example(session: &[StoredMessage], system: Option<&str>) -> Option<Vec<ChatMessage>> {
    let speakers = match session.first()?.chat_kind.as_str() {
        "direct" => Speakers::One,
        _ => Speakers::Many,
    };
    let mut messages = conversation::render(None, &conversation::turns(session), speakers);
    while messages.first().is_some_and(|m| m.role != "user") {
        messages.remove(0);
    }
    while messages.last().is_some_and(|m| m.role != "assistant") {
        messages.pop();
    }
    if messages.is_empty() {
        return None;
    }
    if let Some(s) = system.filter(|s| !s.trim().is_empty()) {
        messages.insert(0, ChatMessage::system(s));
    }
    Some(messages)
}
