//! The bot's own view of the platforms: what comes in ([`Incoming`]) and how a reply goes out
//! ([`Outbox`]). Platform adapters translate Discord and Telegram events into these types, so the
//! core never knows which platform it talks to.

pub use crate::domain::{ChannelRef, ChatKind, Platform};

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
    /// The Discord server the message was written in (`None` elsewhere, and in DMs).
    pub guild_id: Option<String>,
    /// The author's roles in that server (Discord), for `ALLOWED_ROLES`.
    pub roles: Vec<String>,
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

/// The future an [`Outbox`] method returns (a boxed, sendable future).
pub use futures_util::future::BoxFuture;

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
