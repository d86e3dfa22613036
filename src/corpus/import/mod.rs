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

/// The side of a conversation a message is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A system prompt (OpenAI / ShareGPT `system`).
    System,
    /// A person (or the `user` role).
    User,
    /// The assistant side: the bot the corpus was written for. Stored like kaiwa's own replies,
    /// so `export-corpus --mode bot` makes it the `assistant` again.
    Assistant,
}

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
    pub platform: String,
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

/// The author id and name of a corpus speaker: the role's own name (`user`, `assistant`,
/// `system`), as the corpora have no people in them.
fn corpus_speaker(role: Role) -> (String, String) {
    let name = match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    (name.to_string(), name.to_string())
}

/// A message of a corpus dialogue (no ids, no times).
fn corpus_message(role: Role, text: String) -> Message {
    let (author_id, author_name) = corpus_speaker(role);
    Message {
        id: None,
        author_id,
        author_name,
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
        platform: "import".to_string(),
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
