//! The data files kaiwa reads, and the only reader of them: chat JSONL, plain text and
//! tab-separated pairs, `.gz` or not. `kaiwa import` (the chat JSONL formats), `train`,
//! `train-tokenizer`, `derive` and `eval` all read through here, with one set of rules
//! ([`chat`] for the chat lines), so the same line is accepted, or refused with the same
//! message, by every command.
//!
//! Three formats, chosen by extension (`.gz` files are read compressed) or `--format`:
//!
//! - **chat**: JSONL as `kaiwa export-corpus` writes it, one conversation per line, either
//!   OpenAI `{"messages": [{"role", "content"}, …], "meta": {…}}` or ShareGPT
//!   `{"conversations": [{"from", "value"}, …]}`; a `{"text": "…"}` line is a document. The
//!   model learns, and is scored on, what the assistant says.
//! - **text**: plain text whose documents are separated by blank lines (the `--format text`
//!   export, or any pre-training text). The model is scored on every token of a document.
//! - **pairs**: tab-separated lines such as the starter corpus's Tanaka sentence pairs
//!   (`japanese<TAB>english`); every field is a short document of its own.
//!
//! A malformed line is an error naming the file and the line: training or an evaluation on
//! silently shortened data would give figures that are not comparable. (`kaiwa import`, which
//! reads records one by one, reports and skips it instead.)

pub mod chat;
pub mod sequence;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::ChatMessage;

/// A data file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {reason}", path.display(), line_suffix(*line))]
    Data {
        path: PathBuf,
        /// 1-based; 0 when the problem is the whole file.
        line: usize,
        reason: String,
    },
}

fn line_suffix(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

/// Opens a file for reading, through a gzip decoder when its name ends in `.gz` (multi-member,
/// as `gzip -c a b > ab.gz` and some tools write). The one place a data file is opened.
pub fn open(path: &Path) -> std::io::Result<Box<dyn BufRead + Send>> {
    let file = std::fs::File::open(path)?;
    Ok(if is_gz(path) {
        let decoder = flate2::read::MultiGzDecoder::new(BufReader::new(file));
        Box::new(BufReader::with_capacity(64 * 1024, decoder))
    } else {
        Box::new(BufReader::with_capacity(64 * 1024, file))
    })
}

fn is_gz(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("gz"))
}

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
    pub fn read(path: &Path, format: Option<DataFormat>) -> Result<Self, DatasetError> {
        let data = |line: usize, reason: String| DatasetError::Data {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let Some(format) = format.or_else(|| DataFormat::from_path(path)) else {
            return Err(data(
                0,
                "cannot tell the format from the extension (.jsonl for chat, .txt for text, \
                 .tsv for pairs): pass --format"
                    .into(),
            ));
        };
        let mut bytes = std::fs::read(path).map_err(|source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        if is_gz(path) {
            let mut plain = Vec::new();
            flate2::read::MultiGzDecoder::new(bytes.as_slice())
                .read_to_end(&mut plain)
                .map_err(|e| data(0, format!("not a readable gzip file: {e}")))?;
            bytes = plain;
        }
        let text = String::from_utf8(bytes).map_err(|e| data(0, format!("not UTF-8: {e}")))?;
        let examples = match format {
            DataFormat::Chat => parse_chat(&text).map_err(|(line, reason)| data(line, reason))?,
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

/// Parses JSONL conversations ([`chat`]'s rules); an error is `(line, reason)`.
fn parse_chat(text: &str) -> Result<Vec<Example>, (usize, String)> {
    let mut examples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record = chat::parse_line(raw, chat::Kind::Any).map_err(|reason| (line, reason))?;
        examples.push(match record {
            chat::Record::Dialogue(d) => Example {
                line,
                content: ExampleContent::Chat(
                    d.turns
                        .into_iter()
                        .map(|t| ChatMessage::new(t.role.as_str(), t.text))
                        .collect(),
                ),
                language: d.language,
            },
            chat::Record::Text(text) => document(line, &[&text]),
        });
    }
    Ok(examples)
}

/// Calls `each` with every text of a data file, whatever its format: each message's content of
/// a chat file (the user's too) and each `{"text"}` document, each field of a `.tsv` line, each
/// non-empty line of any other file. What a tokenizer is trained on.
pub fn for_each_text(path: &Path, mut each: impl FnMut(&str)) -> Result<(), DatasetError> {
    let format = DataFormat::from_path(path);
    let io = |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    };
    for (i, line) in open(path).map_err(io)?.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        match format {
            Some(DataFormat::Chat) => {
                let record = chat::parse_line(&line, chat::Kind::Any).map_err(|reason| {
                    DatasetError::Data {
                        path: path.to_path_buf(),
                        line: i + 1,
                        reason,
                    }
                })?;
                match record {
                    chat::Record::Dialogue(d) => d.turns.iter().for_each(|t| each(&t.text)),
                    chat::Record::Text(text) => each(&text),
                }
            }
            Some(DataFormat::Pairs) => line
                .split('\t')
                .filter(|f| !f.trim().is_empty())
                .for_each(&mut each),
            _ => each(&line),
        }
    }
    Ok(())
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
    use std::io::Write;

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
            ("{not json", "not JSON"),
            (r#"{"prompt":"hi"}"#, "\"messages\""),
            (
                r#"{"messages":[{"role":"user"}]}"#,
                "no user or assistant message with text",
            ),
            (
                r#"{"conversations":[{"from":"bot","value":"x"}]}"#,
                "unknown speaker",
            ),
        ] {
            let text = format!(
                "{}\n{bad}\n",
                r#"{"messages":[{"role":"user","content":"hi"}]}"#
            );
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

    fn texts(path: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for_each_text(path, |t| out.push(t.to_string())).unwrap();
        out
    }

    #[test]
    fn chat_jsonl_tsv_and_plain_text_give_their_texts_compressed_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let chat = dir.path().join("c.jsonl");
        std::fs::write(
            &chat,
            concat!(
                r#"{"messages":[{"role":"user","content":"こんにちは"},{"role":"assistant","content":"やあ"}]}"#,
                "\n\n",
                r#"{"conversations":[{"from":"human","value":"hi"}]}"#,
                "\n",
                r#"{"text":"a document"}"#,
                "\n"
            ),
        )
        .unwrap();
        assert_eq!(texts(&chat), ["こんにちは", "やあ", "hi", "a document"]);

        let tsv = dir.path().join("pairs.tsv.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&tsv).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all("猫が好きです。\tI like cats.\n".as_bytes())
            .unwrap();
        gz.finish().unwrap();
        assert_eq!(texts(&tsv), ["猫が好きです。", "I like cats."]);

        let txt = dir.path().join("t.txt");
        std::fs::write(&txt, "one\n\n  \ntwo\n").unwrap();
        assert_eq!(texts(&txt), ["one", "two"]);

        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"messages\": [\n").unwrap();
        let err = for_each_text(&bad, |_| {}).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:1"), "{err}");
        let missing = for_each_text(&dir.path().join("none.txt"), |_| {}).unwrap_err();
        assert!(missing.to_string().contains("none.txt"));
    }
}
