//! The bot's own view of the platforms: what comes in ([`Incoming`]) and how a reply goes out
//! ([`Outbox`]). Platform adapters translate Discord and Telegram events into these types, so the
//! core never knows which platform it talks to.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// The platforms kaiwa speaks to. Stored as text in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Discord,
    Telegram,
    /// The web server's API and chat page (`kaiwa serve`).
    Web,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Discord => "discord",
            Platform::Telegram => "telegram",
            Platform::Web => "web",
        }
    }

    pub fn parse(s: &str) -> Option<Platform> {
        match s {
            "discord" => Some(Platform::Discord),
            "telegram" => Some(Platform::Telegram),
            "web" => Some(Platform::Web),
            _ => None,
        }
    }

    /// The longest message the platform accepts, in characters.
    pub fn message_limit(self) -> usize {
        match self {
            Platform::Discord => 2000,
            Platform::Telegram => 4096,
            // The web takes a reply whole.
            Platform::Web => usize::MAX,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a message lives: a chat (Telegram chat, Discord channel) and optionally a thread inside
/// it (Telegram forum topic; Discord threads are channels of their own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelRef {
    pub platform: Platform,
    pub chat_id: String,
    /// Empty when the chat has no threads.
    pub thread_id: String,
}

impl ChannelRef {
    pub fn new(platform: Platform, chat_id: impl Into<String>) -> Self {
        ChannelRef {
            platform,
            chat_id: chat_id.into(),
            thread_id: String::new(),
        }
    }

    pub fn with_thread(mut self, thread_id: impl Into<String>) -> Self {
        self.thread_id = thread_id.into();
        self
    }
}

impl fmt::Display for ChannelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.thread_id.is_empty() {
            write!(f, "{}:{}", self.platform, self.chat_id)
        } else {
            write!(f, "{}:{}/{}", self.platform, self.chat_id, self.thread_id)
        }
    }
}

/// Whether a chat is a one-to-one conversation with the bot or shared with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatKind {
    Direct,
    Group,
}

/// A message the bot saw, already parsed from the platform's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingMessage {
    pub channel: ChannelRef,
    pub kind: ChatKind,
    /// The platform's id of the message, unique within the chat.
    pub message_id: String,
    pub author_id: String,
    pub author_name: String,
    pub author_is_bot: bool,
    pub text: String,
    /// The message this one answers, if any.
    pub reply_to: Option<String>,
    /// It answers one of the bot's own messages.
    pub replies_to_bot: bool,
    /// It mentions the bot by name or @handle.
    pub mentions_bot: bool,
    /// Unix time in milliseconds, from the platform.
    pub sent_at_ms: i64,
}

/// Everything the platforms tell the bot about.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Message(IncomingMessage),
    Edited {
        channel: ChannelRef,
        message_id: String,
        text: String,
        edited_at_ms: i64,
    },
    Deleted {
        channel: ChannelRef,
        message_id: String,
    },
    /// Someone changed their reactions on a message (👍 / 👎 on a reply is feedback on it).
    Reaction {
        channel: ChannelRef,
        message_id: String,
        user_id: String,
        added: Vec<String>,
        removed: Vec<String>,
    },
}

/// A message the bot sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    pub message_id: String,
    pub sent_at_ms: i64,
}

/// Why sending failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The platform refused the formatting; the same text as plain text may pass.
    #[error("formatting rejected: {0}")]
    Formatting(String),
    /// The platform could not be reached or failed inside (network, 5xx): the same send may
    /// pass later.
    #[error("platform unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How the core sends on a platform. Each adapter implements it on its API client; rate limits
/// (HTTP 429, `retry_after`) are waited out inside the adapter.
pub trait Outbox: Send + Sync {
    /// Sends `text` to the channel, as a reply to `reply_to` when given.
    fn send<'a>(
        &'a self,
        channel: &'a ChannelRef,
        text: &'a str,
        reply_to: Option<&'a str>,
    ) -> BoxFuture<'a, Result<SentMessage, SendError>>;

    /// Shows "typing…" in the channel for a few seconds.
    fn typing<'a>(&'a self, channel: &'a ChannelRef) -> BoxFuture<'a, Result<(), SendError>>;
}
