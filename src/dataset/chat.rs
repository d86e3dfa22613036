//! Chat JSONL, the one set of rules: what an OpenAI `{"messages": […]}` line or a ShareGPT
//! `{"conversations": […]}` item holds, which speakers are which side (one table,
//! [`speaker`]), and the message that refuses a line. `kaiwa import`, `train`, `eval`,
//! `train-tokenizer` and `derive` all read chat lines through here, so a line one of them
//! accepts the others accept, and one they refuse they refuse with the same words.
//!
//! - **OpenAI**: `content` is a string, or a list of parts of which the
//!   `{"type": "text", "text": "…"}` ones are kept (joined by newlines; images and audio are
//!   dropped).
//! - **ShareGPT**: `value` is the text; an item-level `"system": "…"` field (which some datasets
//!   use) is a system prompt before the turns.
//! - Tool traffic (a `tool` message, an assistant turn that only calls a tool and so has no
//!   text) is dropped, and so is any message without text: what remains is the dialogue the
//!   people saw. A line with no user or assistant text left is refused.
//! - `meta.language`, when present, is kept (what `kaiwa export-corpus` writes).

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::domain::Role;

/// What a speaker name stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    Role(Role),
    /// Tool calls and their results: dropped.
    Tool,
}

/// The one table of speaker names, for OpenAI `role` and ShareGPT `from` alike (case does not
/// matter): `system` / `developer` (the newer name); `user` / `human`; `assistant`, `gpt`,
/// `chatgpt`, `bard`, `bing`, `model`; and the tool names. `None` for anything else.
pub fn speaker(name: &str) -> Option<Speaker> {
    Some(match name.to_ascii_lowercase().as_str() {
        "system" | "developer" => Speaker::Role(Role::System),
        "user" | "human" => Speaker::Role(Role::User),
        "assistant" | "gpt" | "chatgpt" | "bard" | "bing" | "model" => {
            Speaker::Role(Role::Assistant)
        }
        "tool" | "function" | "function_call" | "function_response" | "observation" | "ipython" => {
            Speaker::Tool
        }
        _ => return None,
    })
}

/// One message with text.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

/// A conversation read from one line (or one item of a ShareGPT array).
#[derive(Debug, Clone, PartialEq)]
pub struct Dialogue {
    pub turns: Vec<Turn>,
    /// `meta.language`, if the line has one.
    pub language: Option<String>,
}

/// What a line of a chat JSONL file is.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Dialogue(Dialogue),
    /// A `{"text": "…"}` line: a document, not a conversation (pre-training JSONL).
    Text(String),
}

/// Which kind of chat line a reader expects: `kaiwa import --format openai|sharegpt` says;
/// every other command takes either, line by line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Openai,
    Sharegpt,
    Any,
}

/// Reads one non-blank line of a chat JSONL file; the error is the reason it is refused.
pub fn parse_line(line: &str, kind: Kind) -> Result<Record, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    parse_value(value, kind)
}

/// Reads one parsed line or array item (see [`parse_line`]).
pub fn parse_value(value: serde_json::Value, kind: Kind) -> Result<Record, String> {
    let has = |key: &str| value.get(key).is_some();
    let kind = match kind {
        Kind::Any if has("messages") => Kind::Openai,
        Kind::Any if has("conversations") => Kind::Sharegpt,
        Kind::Any => {
            return match value.get("text").and_then(|t| t.as_str()) {
                Some(text) => Ok(Record::Text(text.to_string())),
                None => Err(
                    "expected a \"messages\" (OpenAI) or \"conversations\" (ShareGPT) list".into(),
                ),
            }
        }
        kind => kind,
    };
    let language = value
        .get("meta")
        .and_then(|m| m.get("language"))
        .and_then(|l| l.as_str())
        .map(str::to_string);
    let turns = match kind {
        Kind::Sharegpt => sharegpt_turns(typed(value)?)?,
        _ => openai_turns(typed(value)?)?,
    };
    Ok(Record::Dialogue(Dialogue { turns, language }))
}

#[derive(Deserialize)]
struct OpenaiLine {
    messages: Vec<OpenaiMessage>,
}

#[derive(Deserialize)]
struct OpenaiMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

fn openai_turns(line: OpenaiLine) -> Result<Vec<Turn>, String> {
    let mut turns = Vec::with_capacity(line.messages.len());
    for (i, message) in line.messages.into_iter().enumerate() {
        let role = match speaker(&message.role) {
            Some(Speaker::Role(role)) => role,
            Some(Speaker::Tool) => continue,
            None => {
                return Err(format!(
                    "messages[{i}].role: unknown role `{}` \
                     (expected system, developer, user, assistant or tool)",
                    message.role
                ))
            }
        };
        let text = match message.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .filter(|part| part.kind == "text")
                .filter_map(|part| part.text)
                .collect::<Vec<_>>()
                .join("\n"),
        };
        push_text(&mut turns, role, text);
    }
    if !turns.iter().any(|t| t.role != Role::System) {
        return Err("no user or assistant message with text".into());
    }
    Ok(turns)
}

#[derive(Deserialize)]
struct SharegptItem {
    conversations: Vec<SharegptTurn>,
    #[serde(default)]
    system: Option<String>,
}

#[derive(Deserialize)]
struct SharegptTurn {
    from: String,
    #[serde(default)]
    value: Option<String>,
}

fn sharegpt_turns(item: SharegptItem) -> Result<Vec<Turn>, String> {
    let mut turns = Vec::with_capacity(item.conversations.len() + 1);
    push_text(&mut turns, Role::System, item.system.unwrap_or_default());
    for (i, turn) in item.conversations.into_iter().enumerate() {
        let role = match speaker(&turn.from) {
            Some(Speaker::Role(role)) => role,
            Some(Speaker::Tool) => continue,
            None => {
                return Err(format!(
                    "conversations[{i}].from: unknown speaker `{}` \
                     (expected human/user, gpt/assistant or system)",
                    turn.from
                ))
            }
        };
        push_text(&mut turns, role, turn.value.unwrap_or_default());
    }
    if !turns.iter().any(|t| t.role != Role::System) {
        return Err("no human or gpt turn with text".into());
    }
    Ok(turns)
}

/// Keeps a message that has text (not only white space).
fn push_text(turns: &mut Vec<Turn>, role: Role, text: String) {
    if !text.trim().is_empty() {
        turns.push(Turn { role, text });
    }
}

/// Converts a JSON value to a `T`; the reason names the field that did not fit
/// (`author.id: invalid type: integer `5`, expected a string`).
pub fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialogue(line: &str) -> Dialogue {
        match parse_line(line, Kind::Any) {
            Ok(Record::Dialogue(d)) => d,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn openai_and_sharegpt_lines_become_the_same_turns() {
        let openai = dialogue(
            r#"{"messages":[{"role":"user","content":"こんにちは"},{"role":"assistant","content":"どうも"}],"meta":{"language":"ja"}}"#,
        );
        let sharegpt = dialogue(
            r#"{"conversations":[{"from":"human","value":"こんにちは"},{"from":"chatgpt","value":"どうも"}]}"#,
        );
        assert_eq!(openai.turns, sharegpt.turns);
        assert_eq!(openai.language.as_deref(), Some("ja"));
        assert_eq!(openai.turns[1].role, Role::Assistant);
    }

    #[test]
    fn the_kind_a_reader_expects_is_the_kind_it_takes() {
        let sharegpt = r#"{"conversations":[{"from":"human","value":"hi"}]}"#;
        assert!(parse_line(sharegpt, Kind::Sharegpt).is_ok());
        let e = parse_line(sharegpt, Kind::Openai).unwrap_err();
        assert!(e.contains("messages"), "{e}");
        assert_eq!(
            parse_line(r#"{"text":"a document"}"#, Kind::Any),
            Ok(Record::Text("a document".into()))
        );
    }
}
