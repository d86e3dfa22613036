//! The held-out and training files `kaiwa eval` reads: what a model is scored on.
//!
//! Three formats, chosen by extension (`.gz` files are read compressed) or `--format`:
//!
//! - **chat**: JSONL as `kaiwa export-corpus` writes it, one conversation per line, either
//!   OpenAI `{"messages": [{"role", "content"}, …], "meta": {…}}` or ShareGPT
//!   `{"conversations": [{"from", "value"}, …]}`. The model is scored on what the assistant says.
//! - **text**: plain text whose documents are separated by blank lines (the `--format text`
//!   export, or any pre-training text). The model is scored on every token of a document.
//! - **pairs**: tab-separated lines such as the starter corpus's Tanaka sentence pairs
//!   (`japanese<TAB>english`); every field is a short document of its own.
//!
//! A malformed line is an error naming the file and the line: an evaluation on silently
//! shortened data would compare figures that are not comparable.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::EvalError;
use crate::model::ChatMessage;

/// How a data file is laid out (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// JSONL conversations; loss on the assistant's content.
    Chat,
    /// Blank-line separated documents; loss on every token.
    Text,
    /// Tab-separated lines (`.tsv`), each field a document; loss on every token.
    Pairs,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Chat => "chat",
            DataFormat::Text => "text",
            DataFormat::Pairs => "pairs",
        }
    }

    /// The format a file name implies: `.jsonl` / `.json` are chat, `.txt` is text, `.tsv`
    /// is pairs, each also with `.gz` after it.
    pub fn from_path(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?;
        let name = name.strip_suffix(".gz").unwrap_or(name);
        match name.rsplit_once('.')?.1 {
            "jsonl" | "json" => Some(DataFormat::Chat),
            "txt" => Some(DataFormat::Text),
            "tsv" => Some(DataFormat::Pairs),
            _ => None,
        }
    }
}

/// One example of a data file.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The line it is on (chat) or starts at (text), 1-based, for messages.
    pub line: usize,
    pub content: ExampleContent,
    /// The language `meta.language` gives, if any.
    pub language: Option<String>,
}

/// What an example holds.
#[derive(Debug, Clone, PartialEq)]
pub enum ExampleContent {
    Chat(Vec<ChatMessage>),
    Text(String),
}

impl Example {
    /// The texts the model is scored on: the assistant's messages, or the whole document.
    pub fn scored_texts(&self) -> Vec<&str> {
        match &self.content {
            ExampleContent::Chat(messages) => messages
                .iter()
                .filter(|m| m.role == "assistant")
                .map(|m| m.content.as_str())
                .collect(),
            ExampleContent::Text(text) => vec![text.as_str()],
        }
    }
}

/// A data file, read whole.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: DataFormat,
    /// SHA-256 of the file's bytes: two reports are comparable only on the same data.
    pub sha256: String,
    pub examples: Vec<Example>,
}

impl Dataset {
    /// Reads `path` in `format`, or in the format its extension implies.
    pub fn read(path: &Path, format: Option<DataFormat>) -> Result<Self, EvalError> {
        let format = match format.or_else(|| DataFormat::from_path(path)) {
            Some(f) => f,
            None => {
                return Err(EvalError::Data {
                    path: path.to_path_buf(),
                    line: 0,
                    reason: "cannot tell the format from the extension (.jsonl for chat, .txt \
                             for text, .tsv for pairs): pass --format"
                        .into(),
                })
            }
        };
        let mut bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        if path.extension().is_some_and(|e| e == "gz") {
            let mut plain = Vec::new();
            flate2::read::MultiGzDecoder::new(bytes.as_slice())
                .read_to_end(&mut plain)
                .map_err(|e| EvalError::Data {
                    path: path.to_path_buf(),
                    line: 0,
                    reason: format!("not a readable gzip file: {e}"),
                })?;
            bytes = plain;
        }
        let text = String::from_utf8(bytes).map_err(|e| EvalError::Data {
            path: path.to_path_buf(),
            line: 0,
            reason: format!("not UTF-8: {e}"),
        })?;
        let examples = match format {
            DataFormat::Chat => parse_chat(&text).map_err(|(line, reason)| EvalError::Data {
                path: path.to_path_buf(),
                line,
                reason,
            })?,
            DataFormat::Text => parse_text(&text),
            DataFormat::Pairs => parse_pairs(&text),
        };
        Ok(Dataset {
            path: path.to_path_buf(),
            format,
            sha256,
            examples,
        })
    }
}

/// Parses JSONL conversations; an error is `(line, reason)`.
fn parse_chat(text: &str) -> Result<Vec<Example>, (usize, String)> {
    let mut examples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| (line, format!("invalid JSON: {e}")))?;
        let messages = if let Some(list) = value.get("messages") {
            messages_of(list, "role", "content", |r| Some(r.to_string()))
        } else if let Some(list) = value.get("conversations") {
            messages_of(list, "from", "value", sharegpt_role)
        } else {
            Err("expected a \"messages\" (OpenAI) or \"conversations\" (ShareGPT) list".into())
        }
        .map_err(|reason| (line, reason))?;
        let language = value
            .get("meta")
            .and_then(|m| m.get("language"))
            .and_then(|l| l.as_str())
            .map(str::to_string);
        examples.push(Example {
            line,
            content: ExampleContent::Chat(messages),
            language,
        });
    }
    Ok(examples)
}

/// ShareGPT's speaker names as chat roles.
fn sharegpt_role(from: &str) -> Option<String> {
    match from {
        "human" | "user" => Some("user".into()),
        "gpt" | "assistant" => Some("assistant".into()),
        "system" => Some("system".into()),
        _ => None,
    }
}

fn messages_of(
    list: &serde_json::Value,
    role_key: &str,
    content_key: &str,
    role: impl Fn(&str) -> Option<String>,
) -> Result<Vec<ChatMessage>, String> {
    let items = list
        .as_array()
        .ok_or_else(|| "the message list is not a JSON array".to_string())?;
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = |key: &str| {
            item.get(key)
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("message {i}: no string \"{key}\""))
        };
        let name = field(role_key)?;
        let role = role(name).ok_or_else(|| format!("message {i}: unknown speaker {name:?}"))?;
        messages.push(ChatMessage::new(role, field(content_key)?));
    }
    Ok(messages)
}

/// Splits text into documents at blank lines (lines that are empty or only whitespace).
fn parse_text(text: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                examples.push(document(start, &current));
                current.clear();
            }
        } else {
            if current.is_empty() {
                start = i + 1;
            }
            current.push(line);
        }
    }
    if !current.is_empty() {
        examples.push(document(start, &current));
    }
    examples
}

/// Every non-empty field of every line, as a document of its own.
fn parse_pairs(text: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for field in line.split('\t').map(str::trim).filter(|f| !f.is_empty()) {
            examples.push(document(i + 1, &[field]));
        }
    }
    examples
}

fn document(line: usize, lines: &[&str]) -> Example {
    Example {
        line,
        content: ExampleContent::Text(lines.join("\n")),
        language: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_and_sharegpt_lines_become_the_same_messages() {
        let text = concat!(
            r#"{"messages":[{"role":"user","content":"こんにちは"},{"role":"assistant","content":"どうも"}],"meta":{"language":"ja"}}"#,
            "\n\n",
            r#"{"conversations":[{"from":"human","value":"こんにちは"},{"from":"gpt","value":"どうも"}]}"#,
            "\n"
        );
        let examples = parse_chat(text).unwrap();
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[0].content, examples[1].content);
        assert_eq!(examples[0].language.as_deref(), Some("ja"));
        assert_eq!(examples[1].line, 3);
        assert_eq!(examples[0].scored_texts(), vec!["どうも"]);
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        for (bad, needle) in [
            ("{not json", "invalid JSON"),
            (r#"{"text":"hi"}"#, "\"messages\""),
            (r#"{"messages":[{"role":"user"}]}"#, "\"content\""),
            (
                r#"{"conversations":[{"from":"bot","value":"x"}]}"#,
                "unknown speaker",
            ),
        ] {
            let text = format!("{}\n{bad}\n", r#"{"messages":[]}"#);
            let (line, reason) = parse_chat(&text).unwrap_err();
            assert_eq!(line, 2, "{bad}");
            assert!(reason.contains(needle), "{reason}");
        }
    }

    #[test]
    fn documents_are_separated_by_blank_lines() {
        let docs = parse_text("a\nb\n\n  \n\nc\n");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].content, ExampleContent::Text("a\nb".into()));
        assert_eq!(docs[1].content, ExampleContent::Text("c".into()));
        assert_eq!(docs[1].line, 6);
        assert!(parse_text("\n\n").is_empty());
    }
}
