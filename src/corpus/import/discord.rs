//! The JSON that DiscordChatExporter writes for one channel:
//! `{"guild": {…}, "channel": {"id", "type", "name", …}, "messages": [{"id", "type",
//! "timestamp", "content", "author": {"id", "name", "nickname", "isBot"}, "reference"?}, …]}`.
//!
//! The channel becomes one conversation on platform `discord` under its own id (a thread's id
//! for a thread), so an export of a channel the bot is in merges with what it collected live.
//! Only what people wrote is kept: messages of type `Default` and `Reply`, and the responses to
//! slash and context-menu commands (types 20 and 23, which the exporter writes as bare numbers).
//! System notifications (joins, pins, calls) are skipped even though the exporter gives them a
//! text ("Joined the server."), and so are messages without text (an attachment, a forward).
//! The author's name is the display name the exporter wrote (`nickname`), else the user name.
//! Only `DirectTextChat` (a DM) is one-to-one; a group DM is not.

use serde::{Deserialize, Deserializer};

use super::input::{typed, Source};
use super::{Conversation, ImportError, Message, RecordError, Records, Role};
use crate::domain::Platform;

#[derive(Deserialize)]
struct Export {
    #[serde(default)]
    guild: Option<Guild>,
    channel: Channel,
    messages: Vec<Entry>,
}

#[derive(Deserialize)]
struct Guild {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct Channel {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

/// One element of `messages`, sorted by type before it is typed (see [`wanted_kind`]).
enum Entry {
    Message(DceMessage),
    Other,
    Bad(String),
}

/// Message types that carry what someone wrote.
fn wanted_kind(kind: &str) -> bool {
    matches!(kind, "Default" | "Reply" | "20" | "23")
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let wanted = match value.get("type") {
            _ if !value.is_object() => return Ok(Entry::Bad("not a JSON object".to_string())),
            None => return Ok(Entry::Bad("no `type`".to_string())),
            Some(serde_json::Value::String(kind)) => wanted_kind(kind),
            Some(_) => return Ok(Entry::Bad("type: not a string".to_string())),
        };
        if !wanted {
            return Ok(Entry::Other);
        }
        Ok(match typed::<DceMessage>(value) {
            Ok(message) => Entry::Message(message),
            Err(reason) => Entry::Bad(reason),
        })
    }
}

#[derive(Deserialize)]
struct DceMessage {
    id: String,
    timestamp: String,
    #[serde(default)]
    content: String,
    author: Author,
    #[serde(default)]
    reference: Option<Reference>,
}

#[derive(Deserialize)]
struct Author {
    id: String,
    name: String,
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default, rename = "isBot")]
    is_bot: bool,
}

#[derive(Deserialize)]
struct Reference {
    #[serde(default, rename = "messageId")]
    message_id: Option<String>,
    #[serde(default, rename = "channelId")]
    channel_id: Option<String>,
    /// `Default` for a reply, `Forward` for a forward; absent in older exports.
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// Reads a DiscordChatExporter JSON file.
pub(super) fn read(source: Source) -> Result<Records, ImportError> {
    let (export, _name) = source.json::<Export>()?;
    let channel = export.channel;
    let direct = channel.kind == "DirectTextChat";
    let guild_name = export.guild.and_then(|g| g.name);
    let title = match (&channel.name, guild_name) {
        (Some(channel_name), Some(guild)) if !direct => Some(format!("{guild} #{channel_name}")),
        (channel_name, _) => channel_name.clone(),
    };

    let mut records = Vec::new();
    let mut messages = Vec::with_capacity(export.messages.len());
    for (i, entry) in export.messages.into_iter().enumerate() {
        let result = match entry {
            Entry::Message(message) => convert_message(message, &channel.id),
            Entry::Other => continue,
            Entry::Bad(reason) => Err(reason),
        };
        match result {
            Ok(Some(message)) => messages.push(message),
            Ok(None) => {}
            Err(reason) => records.push(Err(RecordError::new(format!("messages[{i}]"), reason))),
        }
    }
    if !messages.is_empty() {
        records.push(Ok(Conversation {
            platform: Platform::Discord,
            chat_id: Some(channel.id),
            direct,
            title,
            messages,
        }));
    }
    Ok(Box::new(records.into_iter()))
}

fn convert_message(message: DceMessage, channel_id: &str) -> Result<Option<Message>, String> {
    if message.content.trim().is_empty() {
        return Ok(None);
    }
    let sent_at = chrono::DateTime::parse_from_rfc3339(&message.timestamp).map_err(|e| {
        format!(
            "timestamp: `{}` is not an ISO 8601 time with offset: {e}",
            message.timestamp
        )
    })?;
    let reply_to = message.reference.and_then(|reference| {
        let is_reply = reference
            .kind
            .as_deref()
            .is_none_or(|kind| kind == "Default");
        let same_channel = reference
            .channel_id
            .as_deref()
            .is_none_or(|c| c == channel_id);
        if is_reply && same_channel {
            reference.message_id
        } else {
            None
        }
    });
    let author_is_bot = message.author.is_bot;
    let author_name = message
        .author
        .nickname
        .filter(|nickname| !nickname.trim().is_empty())
        .unwrap_or(message.author.name);
    Ok(Some(Message {
        id: Some(message.id),
        author_id: message.author.id,
        author_name,
        author_is_bot,
        role: Role::User,
        text: message.content,
        sent_at_ms: Some(sent_at.timestamp_millis()),
        reply_to,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{read_plain_and_gz, read_text};
    use super::super::{Format, ImportError, Role};
    use crate::domain::Platform;

    #[test]
    fn sample_keeps_what_people_wrote() {
        let (conversations, errors) = read_plain_and_gz("discord_export.json", Format::Discord);
        assert_eq!(conversations.len(), 1);
        let channel = &conversations[0];
        assert_eq!(channel.platform, Platform::Discord);
        assert_eq!(channel.chat_id.as_deref(), Some("1200000000000000001"));
        assert!(!channel.direct);
        assert_eq!(channel.title.as_deref(), Some("カイワ研究所 #general"));

        let got: Vec<(&str, &str, &str, &str)> = channel
            .messages
            .iter()
            .map(|m| {
                (
                    m.id.as_deref().unwrap_or(""),
                    m.author_id.as_str(),
                    m.author_name.as_str(),
                    m.text.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "1300000000000000001",
                    "1000000000000000001",
                    "田中",
                    "こんにちは、カイワ！"
                ),
                (
                    "1300000000000000002",
                    "1000000000000000002",
                    "Kaiwa",
                    "こんにちは、田中さん。"
                ),
                (
                    "1300000000000000008",
                    "1000000000000000002",
                    "Kaiwa",
                    "🎲 サイコロ: 4"
                ),
                (
                    "1300000000000000010",
                    "1000000000000000003",
                    "suzuki",
                    "また明日"
                ),
            ]
        );
        assert!(channel.messages.iter().all(|m| m.role == Role::User));
        // 09:15:30.123 at +09:00 is 00:15:30.123 UTC.
        assert_eq!(channel.messages[0].sent_at_ms, Some(1_682_900_130_123));
        assert_eq!(channel.messages[3].sent_at_ms, Some(1_682_900_400_000));
        assert_eq!(
            channel.messages[1].reply_to.as_deref(),
            Some("1300000000000000001")
        );
        assert_eq!(channel.messages[0].reply_to, None);

        let got: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.position.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "messages[5]");
        assert!(got[0].1.starts_with("timestamp:"), "{}", got[0].1);
        assert_eq!(got[1].0, "messages[6]");
        assert!(got[1].1.contains("author"), "{}", got[1].1);
    }

    #[test]
    fn a_dm_is_direct_and_titled_by_the_channel() {
        let text = r#"{"guild": {"id": "0", "name": "Direct Messages"},
            "channel": {"id": "42", "type": "DirectTextChat", "name": "tanaka"},
            "messages": [{"id": "1", "type": "Default", "timestamp": "2024-01-01T00:00:00+00:00",
                "content": "hi", "author": {"id": "7", "name": "tanaka", "nickname": "田中"}}]}"#;
        let (conversations, errors) = read_text("dm.json", text, Format::Discord).expect("reads");
        assert!(errors.is_empty(), "{errors:?}");
        assert!(conversations[0].direct);
        assert_eq!(conversations[0].title.as_deref(), Some("tanaka"));
    }

    #[test]
    fn json_that_is_not_an_export_is_malformed() {
        let result = read_text("x.json", r#"{"messages": []}"#, Format::Discord);
        assert!(
            matches!(result, Err(ImportError::Malformed { ref reason, .. }) if reason.contains("channel")),
            "{result:?}"
        );
        let result = read_text("x.json", "<html></html>", Format::Discord);
        assert!(
            matches!(result, Err(ImportError::Malformed { .. })),
            "{result:?}"
        );
    }
}
