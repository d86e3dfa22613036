//! `result.json` from Telegram Desktop's export, in JSON: either one chat ("Export chat
//! history": `{"name", "type", "id", "messages": […]}`) or a full export ("Export Telegram
//! data": `{"chats": {"list": [chat, …]}, "left_chats": {"list": […]}, …}`).
//!
//! Every chat becomes one conversation on platform `telegram` under the id the Bot API uses for
//! it (the export writes bare ids: `-{id}` for a basic group, `-100…` for supergroups and
//! channels), so an export of a chat the bot is in merges with what it collected live. Authors
//! get the same treatment: `from_id` `user42` is `42`, `channel7` is the channel's Bot API id,
//! and a message without `from_id` is the chat's own, as the live bot attributes it.
//!
//! Only `"type": "message"` entries count (`service` and `unsupported` are skipped), and of them
//! only those with text: `text` is a string, or a list mixing strings and entity objects
//! (`{"type": "bold", "text": "…"}`) whose texts are joined. A photo without caption has empty
//! text and is skipped quietly. A malformed message is reported with its chat and index and the
//! rest of the chat imported.
//!
//! Telegram Desktop escapes control characters as `\xNN`, which is not JSON; the file is read
//! through [`HexEscapes`], which turns them into `\u00NN`.

use std::io::{self, BufRead, Read};

use serde::{Deserialize, Deserializer};

use super::input::{json_from_reader, typed, Present, SkipBom, Source};
use super::{Conversation, ImportError, Message, RecordError, Records, Role};
use crate::domain::Platform;

/// The top level of `result.json`: the fields of a single-chat export and of a full export.
#[derive(Deserialize)]
struct ResultJson {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    messages: Option<Vec<Entry>>,
    #[serde(default)]
    chats: Option<ChatList>,
    #[serde(default)]
    left_chats: Option<ChatList>,
}

#[derive(Deserialize)]
struct ChatList {
    #[serde(default)]
    list: Vec<Chat>,
}

#[derive(Deserialize)]
struct Chat {
    /// Absent for "Saved Messages", `null` for a deleted account.
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    messages: Vec<Entry>,
}

/// One element of `messages`, sorted before it is typed so that service entries, whose fields
/// differ, are never reported.
enum Entry {
    Message(TgMessage),
    /// `service`, `unsupported`: not something anyone said.
    Other,
    Bad(String),
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let is_message = match value.get("type") {
            _ if !value.is_object() => return Ok(Entry::Bad("not a JSON object".to_string())),
            None => return Ok(Entry::Bad("no `type`".to_string())),
            Some(serde_json::Value::String(kind)) => kind == "message",
            Some(_) => return Ok(Entry::Bad("type: not a string".to_string())),
        };
        if !is_message {
            return Ok(Entry::Other);
        }
        Ok(match typed::<TgMessage>(value) {
            Ok(message) => Entry::Message(message),
            Err(reason) => Entry::Bad(reason),
        })
    }
}

#[derive(Deserialize)]
struct TgMessage {
    id: i64,
    #[serde(default)]
    date: Option<String>,
    #[serde(default)]
    date_unixtime: Option<String>,
    /// `null` when the sender has no name (a deleted account).
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    from_id: Option<String>,
    #[serde(default)]
    text: Option<Text>,
    #[serde(default)]
    reply_to_message_id: Option<i64>,
    /// Set when the reply is to a message in another chat, whose id means nothing here.
    #[serde(default)]
    reply_to_peer_id: Option<Present>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    Plain(String),
    Parts(Vec<TextPart>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextPart {
    Plain(String),
    Entity { text: String },
}

impl Text {
    fn into_string(self) -> String {
        match self {
            Text::Plain(text) => text,
            Text::Parts(parts) => parts
                .into_iter()
                .map(|part| match part {
                    TextPart::Plain(text) | TextPart::Entity { text } => text,
                })
                .collect(),
        }
    }
}

/// Reads a Telegram Desktop `result.json`.
pub(super) fn read(source: Source) -> Result<Records, ImportError> {
    let name = source.name();
    let reader = HexEscapes::new(SkipBom::new(source.reader));
    let (result, name) = json_from_reader::<ResultJson>(reader, &name)?;
    let chats = if let Some(messages) = result.messages {
        vec![Chat {
            name: result.name,
            kind: result.kind,
            id: result.id,
            messages,
        }]
    } else if result.chats.is_some() || result.left_chats.is_some() {
        result
            .chats
            .into_iter()
            .chain(result.left_chats)
            .flat_map(|list| list.list)
            .collect()
    } else {
        return Err(name.malformed(
            "neither one chat (`messages`) nor a full export (`chats.list`); \
             export with Telegram Desktop and choose the JSON format",
        ));
    };
    Ok(Box::new(chats.into_iter().flat_map(convert_chat)))
}

/// A chat's bad messages, then the chat itself (when it has any text).
fn convert_chat(chat: Chat) -> Vec<Result<Conversation, RecordError>> {
    let label = match (&chat.name, chat.id) {
        (Some(name), _) => format!("chat '{name}'"),
        (None, Some(id)) => format!("chat {id}"),
        (None, None) => "chat".to_string(),
    };
    let Some(id) = chat.id else {
        return vec![Err(RecordError::new(label, "no `id`"))];
    };
    let kind = chat.kind.as_deref().unwrap_or("");
    let Some((chat_id, direct)) = bot_api_chat_id(kind, id) else {
        return vec![Err(RecordError::new(
            label,
            format!(
                "unknown chat type `{kind}` (expected personal_chat, bot_chat, saved_messages, \
                 private_group, private_supergroup, public_supergroup, private_channel or \
                 public_channel)"
            ),
        ))];
    };
    let chat_name = chat.name.clone().unwrap_or_else(|| chat_id.clone());

    let mut records = Vec::new();
    let mut messages = Vec::with_capacity(chat.messages.len());
    for (i, entry) in chat.messages.into_iter().enumerate() {
        let message = match entry {
            Entry::Message(message) => message,
            Entry::Other => continue,
            Entry::Bad(reason) => {
                records.push(Err(RecordError::new(
                    format!("{label} messages[{i}]"),
                    reason,
                )));
                continue;
            }
        };
        match convert_message(message, &chat_id, &chat_name) {
            Ok(Some(message)) => messages.push(message),
            Ok(None) => {}
            Err(reason) => records.push(Err(RecordError::new(
                format!("{label} messages[{i}]"),
                reason,
            ))),
        }
    }
    if !messages.is_empty() {
        records.push(Ok(Conversation {
            platform: Platform::Telegram,
            chat_id: Some(chat_id),
            direct,
            title: chat.name,
            messages,
        }));
    }
    records
}

/// A message with text, `None` for one without (a photo, a sticker), or why it is unreadable.
fn convert_message(
    message: TgMessage,
    chat_id: &str,
    chat_name: &str,
) -> Result<Option<Message>, String> {
    let text = message.text.map(Text::into_string).unwrap_or_default();
    if text.trim().is_empty() {
        return Ok(None);
    }
    let sent_at_ms = sent_at_ms(message.date_unixtime.as_deref(), message.date.as_deref())?;
    let (author_id, author_name) = match message.from_id {
        Some(from_id) => (
            bot_api_sender_id(&from_id),
            message.from.unwrap_or_else(|| "someone".to_string()),
        ),
        None => (
            chat_id.to_string(),
            message.from.unwrap_or_else(|| chat_name.to_string()),
        ),
    };
    let reply_to = match message.reply_to_peer_id {
        Some(_) => None,
        None => message.reply_to_message_id.map(|id| id.to_string()),
    };
    Ok(Some(Message {
        id: Some(message.id.to_string()),
        author_id,
        author_name,
        author_is_bot: false,
        role: Role::User,
        text,
        sent_at_ms: Some(sent_at_ms),
        reply_to,
    }))
}

/// `date_unixtime` (seconds, as a string) when the export has it; before 2021 it had only
/// `date`, the exporting computer's local time, which is taken as UTC.
fn sent_at_ms(unixtime: Option<&str>, date: Option<&str>) -> Result<i64, String> {
    if let Some(seconds) = unixtime {
        return seconds
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .ok_or_else(|| format!("date_unixtime: `{seconds}` is not a number of seconds"));
    }
    match date {
        Some(date) => date
            .parse::<chrono::NaiveDateTime>()
            .map(|local| local.and_utc().timestamp_millis())
            .map_err(|e| format!("date: `{date}` is not a date like 2023-01-02T03:04:05: {e}")),
        None => Err("neither `date_unixtime` nor `date`".to_string()),
    }
}

/// What the Bot API adds to a channel or supergroup's bare id: `-100` followed by 10 digits.
const CHANNEL_OFFSET: i64 = 1_000_000_000_000;

/// The chat's id as the Bot API (and so the live bot) writes it, and whether it is one-to-one.
fn bot_api_chat_id(kind: &str, id: i64) -> Option<(String, bool)> {
    match kind {
        "personal_chat" | "bot_chat" => Some((id.to_string(), true)),
        // Chats with oneself and the "Replies" service chat are user ids too.
        "saved_messages" | "replies" => Some((id.to_string(), false)),
        "private_group" => Some(((-id).to_string(), false)),
        "private_supergroup" | "public_supergroup" | "private_channel" | "public_channel" => {
            let bot_api = CHANNEL_OFFSET.checked_add(id)?.checked_neg()?;
            Some((bot_api.to_string(), false))
        }
        _ => None,
    }
}

/// `user42` → `42`, `channel7` → `-1000000000007`, `chat5` → `-5`; anything else as written.
fn bot_api_sender_id(from_id: &str) -> String {
    let numeric = |rest: &str| rest.parse::<i64>().ok();
    if let Some(id) = from_id.strip_prefix("user").and_then(numeric) {
        id.to_string()
    } else if let Some(id) = from_id.strip_prefix("channel").and_then(numeric) {
        CHANNEL_OFFSET
            .checked_add(id)
            .and_then(i64::checked_neg)
            .map_or_else(|| from_id.to_string(), |id| id.to_string())
    } else if let Some(id) = from_id.strip_prefix("chat").and_then(numeric) {
        (-id).to_string()
    } else {
        from_id.to_string()
    }
}

/// Rewrites Telegram Desktop's `\xNN` string escapes (for control characters) to JSON's
/// `\u00NN`, leaving everything else, including an escaped backslash before an `x`, alone.
struct HexEscapes<R> {
    inner: R,
    state: EscapeState,
    /// Bytes of a rewritten escape still to hand out.
    pending: &'static [u8],
}

#[derive(Default)]
struct EscapeState {
    in_string: bool,
    after_backslash: bool,
}

impl EscapeState {
    /// The byte to hand out for `byte`, and what must follow it.
    fn scan(&mut self, byte: u8) -> (u8, &'static [u8]) {
        if !self.in_string {
            self.in_string = byte == b'"';
            return (byte, b"");
        }
        if self.after_backslash {
            self.after_backslash = false;
            return if byte == b'x' {
                (b'u', b"00")
            } else {
                (byte, b"")
            };
        }
        match byte {
            b'\\' => self.after_backslash = true,
            b'"' => self.in_string = false,
            _ => {}
        }
        (byte, b"")
    }
}

impl<R: BufRead> HexEscapes<R> {
    fn new(inner: R) -> Self {
        HexEscapes {
            inner,
            state: EscapeState::default(),
            pending: b"",
        }
    }
}

impl<R: BufRead> Read for HexEscapes<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut written = 0;
        loop {
            while let Some((&byte, rest)) = self.pending.split_first() {
                let Some(slot) = out.get_mut(written) else {
                    return Ok(written);
                };
                *slot = byte;
                written += 1;
                self.pending = rest;
            }
            if written >= out.len() {
                return Ok(written);
            }
            let input = match self.inner.fill_buf() {
                Ok(input) => input,
                // Hand out what is there; the error comes back on the next call.
                Err(_) if written > 0 => return Ok(written),
                Err(e) => return Err(e),
            };
            if input.is_empty() {
                return Ok(written);
            }
            let mut used = 0;
            for (&byte, slot) in input.iter().zip(out.iter_mut().skip(written)) {
                used += 1;
                let (byte, pending) = self.state.scan(byte);
                *slot = byte;
                written += 1;
                if !pending.is_empty() {
                    self.pending = pending;
                    break;
                }
            }
            self.inner.consume(used);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::Platform;
    use std::io::Read;

    use super::super::input::tests::{read_plain_and_gz, read_text};
    use super::super::{Format, ImportError, Role};
    use super::HexEscapes;

    #[test]
    fn single_chat_sample_reads_texts_authors_times_and_replies() {
        let (conversations, errors) = read_plain_and_gz("telegram_result.json", Format::Telegram);
        assert_eq!(conversations.len(), 1, "{conversations:?}");
        let chat = &conversations[0];
        assert_eq!(chat.platform, Platform::Telegram);
        assert_eq!(chat.chat_id.as_deref(), Some("-1001234567890"));
        assert!(!chat.direct);
        assert_eq!(chat.title.as_deref(), Some("カイワ開発"));

        let got: Vec<(&str, &str, &str, &str)> = chat
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
                ("2", "111111111", "田中 太郎", "おはようございます！"),
                (
                    "3",
                    "222222222",
                    "Kaiwa Bot",
                    "おはよう、田中さん。今日は 晴れ です。"
                ),
                ("6", "111111111", "田中 太郎", "写真の説明：富士山"),
                (
                    "7",
                    "-1009876543210",
                    "お知らせチャンネル",
                    "メンテナンスは\u{1}今夜です"
                ),
                ("8", "333333333", "someone", "Thanks!"),
                ("10", "222222222", "Kaiwa Bot", "どういたしまして"),
            ]
        );
        assert!(chat.messages.iter().all(|m| m.role == Role::User));
        // date_unixtime wins; the old `date` alone is read as UTC.
        assert_eq!(chat.messages[0].sent_at_ms, Some(1_672_628_645_000));
        assert_eq!(chat.messages[5].sent_at_ms, Some(1_672_629_000_000));
        assert_eq!(chat.messages[1].reply_to.as_deref(), Some("2"));
        // A reply to a message in another chat has no id here.
        assert_eq!(chat.messages[4].reply_to, None);

        let got: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.position.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "chat 'カイワ開発' messages[8]");
        assert!(got[0].1.contains("date_unixtime"), "{}", got[0].1);
        assert_eq!(got[1].0, "chat 'カイワ開発' messages[10]");
        assert!(got[1].1.starts_with("id:"), "{}", got[1].1);
    }

    #[test]
    fn full_export_reads_every_chat_with_bot_api_ids() {
        let (conversations, errors) =
            read_plain_and_gz("telegram_full_export.json", Format::Telegram);
        let chats: Vec<(Option<&str>, Option<&str>, bool, usize)> = conversations
            .iter()
            .map(|c| {
                (
                    c.chat_id.as_deref(),
                    c.title.as_deref(),
                    c.direct,
                    c.messages.len(),
                )
            })
            .collect();
        assert_eq!(
            chats,
            vec![
                (Some("222222222"), Some("Kaiwa Bot"), true, 2),
                (Some("-444444444"), Some("家族"), false, 1),
                (Some("111111111"), None, false, 1),
                (Some("-1005555555555"), Some("Old group"), false, 1),
            ]
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].position, "chat 'Mystery'");
        assert!(errors[0].reason.contains("unknown chat type `secret_chat`"));
    }

    #[test]
    fn json_that_is_not_an_export_is_malformed() {
        let result = read_text(
            "result.json",
            "{\"about\": \"nothing here\"}",
            Format::Telegram,
        );
        assert!(
            matches!(result, Err(ImportError::Malformed { ref reason, .. }) if reason.contains("chats.list")),
            "{result:?}"
        );
        let result = read_text("result.json", "{\"name\": \"cut", Format::Telegram);
        assert!(
            matches!(result, Err(ImportError::Malformed { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn hex_escapes_become_unicode_escapes_only_inside_strings() {
        let input = br#"{"a\x01b": "c\\x41\x0B", "d": 1}"#;
        let mut out = String::new();
        HexEscapes::new(&input[..])
            .read_to_string(&mut out)
            .expect("reads");
        assert_eq!(out, r#"{"a\u0001b": "c\\x41\u000B", "d": 1}"#);
    }
}
