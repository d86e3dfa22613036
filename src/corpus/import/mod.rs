//! `kaiwa import`: existing dialogue (other bots' corpora, chat exports) → conversations that the
//! store keeps beside what the bot collected live.
//!
//! Each format has its own file here; every one of them turns a file into a stream of
//! [`Conversation`]s or [`RecordError`]s (a malformed record is reported with its position and
//! skipped, the rest goes on). Writing them into the store, in one transaction, is
//! [`crate::store::Store::import`]'s job, so a failed import leaves the store as it was.

use std::fmt;
use std::path::Path;

mod chatterbot;
mod csv;
mod discord;
mod input;
mod openai;
mod sharegpt;
mod telegram;
mod text;

/// The formats `kaiwa import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The YAML files of the `chatterbot-corpus` package (`conversations:` lists).
    Chatterbot,
    /// JSONL, one `{"messages": [{"role", "content"}, …]}` per line.
    Openai,
    /// JSON array or JSONL of `{"conversations": [{"from", "value"}, …]}`.
    Sharegpt,
    /// `result.json` from Telegram Desktop's "Export chat history" (one chat or a full export).
    Telegram,
    /// The JSON written by DiscordChatExporter.
    Discord,
    /// `question,answer` rows (a header row is recognised and skipped).
    Csv,
    /// Transcripts of `Name: line` turns; a blank line ends a conversation.
    Text,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Chatterbot => "chatterbot",
            Format::Openai => "openai",
            Format::Sharegpt => "sharegpt",
            Format::Telegram => "telegram",
            Format::Discord => "discord",
            Format::Csv => "csv",
            Format::Text => "text",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

use crate::domain::Platform;
pub use crate::domain::Role;

/// One message of an imported conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The source's own id when it has one (Telegram, Discord); otherwise `None` and the
    /// message's index in the conversation is used.
    pub id: Option<String>,
    pub author_id: String,
    pub author_name: String,
    /// The author is a bot account (other bots are left out of `export-corpus --mode all`).
    pub author_is_bot: bool,
    pub role: Role,
    pub text: String,
    /// Milliseconds since the Unix epoch, when the source says.
    pub sent_at_ms: Option<i64>,
    /// The id of the message this one answers, when the source says.
    pub reply_to: Option<String>,
}

/// One conversation (a chat export, or one dialogue of a corpus).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// `telegram` or `discord` for chat exports, whose ids are the platform's own (so an export
    /// of a chat the bot is in merges with what it collected live); `import` otherwise.
    pub platform: Platform,
    /// The platform's chat / channel id when the source has one; otherwise `None` and the store
    /// derives a stable id from the content, so importing the same dialogue twice adds nothing.
    pub chat_id: Option<String>,
    /// `true` for a one-to-one chat (a private Telegram chat, a Discord DM, a corpus dialogue).
    pub direct: bool,
    pub title: Option<String>,
    pub messages: Vec<Message>,
}

/// A record that could not be read; it is skipped and reported.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordError {
    /// Where in the file, in the user's terms: `line 12`, `conversation 3`, `messages[41]`.
    pub position: String,
    pub reason: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.position, self.reason)
    }
}

/// A file that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a {format} file: {reason}")]
    Malformed {
        path: String,
        format: Format,
        reason: String,
    },
}

/// What a file yields, in order.
pub type Records = Box<dyn Iterator<Item = Result<Conversation, RecordError>> + Send>;

/// Opens `path` as `format`. Files ending in `.gz` are decompressed on the fly.
///
/// File-level problems (cannot open, not this format at all) are returned here; problems with
/// single records come out of the iterator as [`RecordError`]s. Formats that are one JSON or
/// YAML document (chatterbot, sharegpt as an array, telegram, discord) are parsed here in full,
/// so a truncated file is an error before anything is imported; line-based formats (openai,
/// sharegpt as JSONL, csv, text) are read as they are consumed.
pub fn read(path: &Path, format: Format) -> Result<Records, ImportError> {
    let source = input::Source::open(path, format)?;
    match format {
        Format::Chatterbot => chatterbot::read(source),
        Format::Openai => openai::read(source),
        Format::Sharegpt => sharegpt::read(source),
        Format::Telegram => telegram::read(source),
        Format::Discord => discord::read(source),
        Format::Csv => csv::read(source),
        Format::Text => text::read(source),
    }
}

/// A dialogue of a corpus read from one JSONL line by [`crate::dataset::chat`]'s rules.
fn dialogue(line: &str, kind: crate::dataset::chat::Kind) -> Result<Conversation, String> {
    conversation(crate::dataset::chat::parse_line(line, kind))
}

/// A dialogue of a corpus: no platform chat behind it, so the store derives its id; the
/// speakers are the roles' own names (`user`, `assistant`, `system`), as the corpora have no
/// people in them.
fn conversation(
    record: Result<crate::dataset::chat::Record, String>,
) -> Result<Conversation, String> {
    let dialogue = match record? {
        crate::dataset::chat::Record::Dialogue(d) => d,
        crate::dataset::chat::Record::Text(_) => {
            return Err("a {\"text\"} document, not a conversation".into())
        }
    };
    Ok(corpus_conversation(
        None,
        dialogue
            .turns
            .into_iter()
            .map(|t| corpus_message(t.role, t.text))
            .collect(),
    ))
}

/// A message of a corpus dialogue (no ids, no times), its author the role's own name.
fn corpus_message(role: Role, text: String) -> Message {
    Message {
        id: None,
        author_id: role.as_str().to_string(),
        author_name: role.as_str().to_string(),
        author_is_bot: false,
        role,
        text,
        sent_at_ms: None,
        reply_to: None,
    }
}

/// A dialogue of a corpus: no platform chat behind it, so the store derives its id.
fn corpus_conversation(title: Option<String>, messages: Vec<Message>) -> Conversation {
    Conversation {
        platform: Platform::Import,
        chat_id: None,
        direct: true,
        title,
        messages,
    }
}

impl RecordError {
    fn new(position: impl Into<String>, reason: impl Into<String>) -> Self {
        RecordError {
            position: position.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::input::tests::read_text;
    use super::Format;
    use crate::dataset::{for_each_text, Dataset, DatasetError};

    /// Every command reads a chat line by one set of rules: `kaiwa import` (which reports and
    /// skips), `kaiwa train` / `kaiwa eval` ([`Dataset::read`]) and `kaiwa train-tokenizer`
    /// ([`for_each_text`]) accept the same lines and refuse the same ones with the same reason.
    #[test]
    fn every_command_accepts_or_refuses_a_chat_line_alike() {
        let valid = r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;
        let cases: &[(&str, Format, Option<&str>)] = &[
            (valid, Format::Openai, None),
            (
                r#"{"conversations":[{"from":"human","value":"hi"},{"from":"chatgpt","value":"yo"}]}"#,
                Format::Sharegpt,
                None,
            ),
            (
                r#"{"messages":[{"role":"developer","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
                Format::Openai,
                None,
            ),
            ("{not json", Format::Openai, Some("not JSON")),
            (
                r#"{"messages":[{"role":"narrator","content":"x"}]}"#,
                Format::Openai,
                Some("unknown role `narrator`"),
            ),
            (
                r#"{"conversations":[{"from":"bot","value":"x"}]}"#,
                Format::Sharegpt,
                Some("unknown speaker `bot`"),
            ),
            (
                r#"{"messages":[{"role":"system","content":"only a prompt"}]}"#,
                Format::Openai,
                Some("no user or assistant message with text"),
            ),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                Format::Openai,
                Some("messages[0].content"),
            ),
        ];
        let valid_sharegpt = r#"{"conversations":[{"from":"human","value":"hi"}]}"#;
        for &(line, format, refused) in cases {
            // A file of the format's own kind: `import --format sharegpt` takes ShareGPT only.
            let first = if format == Format::Sharegpt {
                valid_sharegpt
            } else {
                valid
            };
            let contents = format!("{first}\n{line}\n");
            let (conversations, errors) = read_text("c.jsonl", &contents, format).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.jsonl");
            std::fs::write(&path, &contents).unwrap();
            let dataset = Dataset::read(&path, None);
            let mut texts = 0;
            let tokenizer = for_each_text(&path, |_| texts += 1);
            match refused {
                None => {
                    assert_eq!((conversations.len(), errors.len()), (2, 0), "{line}");
                    assert_eq!(dataset.unwrap().examples.len(), 2, "{line}");
                    assert!(tokenizer.is_ok() && texts >= 2, "{line}");
                }
                Some(reason) => {
                    assert_eq!(conversations.len(), 1, "{line}");
                    assert_eq!(errors[0].position, "line 2");
                    assert!(errors[0].reason.contains(reason), "{errors:?}");
                    for e in [dataset.unwrap_err(), tokenizer.unwrap_err()] {
                        let DatasetError::Data {
                            line: 2, reason: r, ..
                        } = &e
                        else {
                            panic!("{line}: {e}")
                        };
                        assert_eq!(r, &errors[0].reason, "{line}");
                    }
                }
            }
        }
    }
}
