//! The words every layer shares: which platform a message belongs to, where it lives
//! ([`ChannelRef`]), what kind of chat that is, and a conversation's turns ([`Role`],
//! [`ChatMessage`]). The store, the settings, the corpus, the datasets, the model, the bot and
//! the platform adapters all speak in these; nothing here depends on any of them.

use std::fmt;

/// The platforms kaiwa speaks to. Stored as text in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Discord,
    Telegram,
    /// The web server's API and chat page (`kaiwa serve`).
    Web,
    /// Conversations `kaiwa import` brought in with no platform chat behind them (corpora); a
    /// Telegram or Discord export keeps its own platform.
    Import,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Discord => "discord",
            Platform::Telegram => "telegram",
            Platform::Web => "web",
            Platform::Import => "import",
        }
    }

    pub fn parse(s: &str) -> Option<Platform> {
        match s {
            "discord" => Some(Platform::Discord),
            "telegram" => Some(Platform::Telegram),
            "web" => Some(Platform::Web),
            "import" => Some(Platform::Import),
            _ => None,
        }
    }

    /// The longest message the platform accepts, in characters.
    pub fn message_limit(self) -> usize {
        match self {
            Platform::Discord => 2000,
            Platform::Telegram => 4096,
            // The web takes a reply whole; nothing is sent to an import.
            Platform::Web | Platform::Import => usize::MAX,
        }
    }
}

/// A platform as stored (`messages.platform`): the text must be one of [`Platform::as_str`].
impl TryFrom<String> for Platform {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Platform::parse(&s).ok_or_else(|| format!("unknown platform `{s}`"))
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

impl ChatKind {
    /// As stored (`messages.chat_kind`): `direct` or `group`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChatKind::Direct => "direct",
            ChatKind::Group => "group",
        }
    }
}

/// A chat kind as stored: `direct` or `group`.
impl TryFrom<String> for ChatKind {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "direct" => Ok(ChatKind::Direct),
            "group" => Ok(ChatKind::Group),
            _ => Err(format!("unknown chat kind `{s}`")),
        }
    }
}

/// The side of a conversation a message is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A system prompt.
    System,
    /// A person.
    User,
    /// The bot (kaiwa's replies, or the assistant side of an imported corpus).
    Assistant,
}

impl Role {
    /// The chat-template name: `system`, `user` or `assistant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a conversation. `role` is `system`, `user` or `assistant` for ChatML; other
/// templates may accept more (e.g. `tool`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}
