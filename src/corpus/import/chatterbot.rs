//! The YAML files of the `chatterbot-corpus` package:
//!
//! ```yaml
//! categories:
//! - food
//! conversations:
//! - - Do you drink?
//!   - My brain does not require any beverages.
//! ```
//!
//! Each inner list is one dialogue; its 1st, 3rd, … lines are the user's, its 2nd, 4th, … the
//! bot's. The files are hand-written, and the published ones have two recurring mistakes this
//! reader has to live with:
//! - a line indented one level too little (`- - Question?` then `- Answer`), which YAML reads as
//!   a bare string after a one-line dialogue. Such a string is taken as the next line of the
//!   dialogue before it, which is what its author meant.
//! - an unquoted line with `: ` in it (`- Five: Dopey, Grumpy, …`), which YAML reads as a
//!   mapping. Its text cannot be recovered exactly, so the dialogue is reported and skipped.
//!
//! Numbers and booleans (`- 1984`, `- yes`) are kept as written, which is why the document is read
//! from the YAML events rather than through a loader that would turn `007` into `7`.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::input::Source;
use super::{corpus_conversation, corpus_message, Conversation, ImportError, Records};
use super::{RecordError, Role};

/// Reads a chatterbot-corpus YAML file.
pub(super) fn read(source: Source) -> Result<Records, ImportError> {
    let (text, name) = source.read_to_string()?;
    let root = parse_yaml(&text).map_err(|reason| name.malformed(reason))?;
    let Some(entries) = root.get("conversations") else {
        return Err(name.malformed(
            "no `conversations:` list at the top (expected `categories:` and `conversations:`)",
        ));
    };
    let Value::Seq(entries) = &entries.value else {
        return Err(name.malformed(format!(
            "`conversations:` (line {}) is not a list of dialogues",
            entries.line
        )));
    };
    let title = root.get("categories").and_then(categories_title);

    let records: Vec<Result<Conversation, RecordError>> = group_dialogues(entries)
        .into_iter()
        .map(|dialogue| dialogue.into_conversation(title.clone()))
        .collect();
    Ok(Box::new(records.into_iter()))
}

/// One entry of `conversations:` with the bare lines that follow it (see the module doc).
struct Dialogue<'a> {
    index: usize,
    line: usize,
    items: Vec<&'a Node>,
    /// The entry itself is not a list (a bare line with no dialogue before it, a mapping).
    problem: Option<String>,
}

fn group_dialogues(entries: &[Node]) -> Vec<Dialogue<'_>> {
    let mut dialogues: Vec<Dialogue<'_>> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        match &entry.value {
            Value::Seq(items) => dialogues.push(Dialogue {
                index,
                line: entry.line,
                items: items.iter().collect(),
                problem: None,
            }),
            _ => match dialogues.last_mut() {
                // An under-indented line: the next line of the dialogue above.
                Some(previous) => previous.items.push(entry),
                None => dialogues.push(Dialogue {
                    index,
                    line: entry.line,
                    items: Vec::new(),
                    problem: Some(format!(
                        "{} where a dialogue (a list of lines) was expected",
                        entry.value.describe()
                    )),
                }),
            },
        }
    }
    dialogues
}

impl Dialogue<'_> {
    fn into_conversation(self, title: Option<String>) -> Result<Conversation, RecordError> {
        let position = format!("conversations[{}] (line {})", self.index, self.line);
        if let Some(problem) = self.problem {
            return Err(RecordError::new(position, problem));
        }
        if self.items.is_empty() {
            return Err(RecordError::new(position, "an empty dialogue"));
        }
        let mut messages = Vec::with_capacity(self.items.len());
        for (i, item) in self.items.iter().enumerate() {
            let text = match &item.value {
                Value::Scalar { text, plain } if !(*plain && is_null(text)) => text.trim(),
                Value::Scalar { .. } => "",
                other => {
                    let hint = if matches!(other, Value::Map(_)) {
                        " (an unquoted line containing `: `? quote it)"
                    } else {
                        ""
                    };
                    return Err(RecordError::new(
                        position,
                        format!(
                            "line {} of the dialogue (file line {}) is {}, not text{hint}",
                            i + 1,
                            item.line,
                            other.describe()
                        ),
                    ));
                }
            };
            if text.is_empty() {
                return Err(RecordError::new(
                    position,
                    format!(
                        "line {} of the dialogue (file line {}) is empty",
                        i + 1,
                        item.line
                    ),
                ));
            }
            let role = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            messages.push(corpus_message(role, text.to_string()));
        }
        Ok(corpus_conversation(title, messages))
    }
}

/// `categories: [food, 食物]` → `food, 食物`.
fn categories_title(node: &Node) -> Option<String> {
    let names: Vec<&str> = match &node.value {
        Value::Seq(items) => items
            .iter()
            .filter_map(|item| match &item.value {
                Value::Scalar { text, .. } if !text.trim().is_empty() => Some(text.trim()),
                _ => None,
            })
            .collect(),
        Value::Scalar { text, .. } if !text.trim().is_empty() => vec![text.trim()],
        _ => Vec::new(),
    };
    (!names.is_empty()).then(|| names.join(", "))
}

/// YAML 1.2 core schema nulls, as a plain scalar.
fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// A YAML node with the line it starts on. Scalars keep their text as written.
#[derive(Debug)]
struct Node {
    line: usize,
    value: Value,
}

#[derive(Debug)]
enum Value {
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    /// `*anchor`: not expanded (expanding can blow up), and never used by the corpus.
    Alias,
}

impl Value {
    fn describe(&self) -> &'static str {
        match self {
            Value::Scalar { .. } => "a line of text",
            Value::Seq(_) => "a nested list",
            Value::Map(_) => "a mapping",
            Value::Alias => "a YAML alias",
        }
    }
}

impl Node {
    /// The value of a plain-text key of a mapping (the last one, when repeated).
    fn get(&self, key: &str) -> Option<&Node> {
        let Value::Map(pairs) = &self.value else {
            return None;
        };
        pairs
            .iter()
            .rev()
            .find(|(k, _)| matches!(&k.value, Value::Scalar { text, .. } if text == key))
            .map(|(_, v)| v)
    }
}

/// Deeper nesting than any corpus needs; refusing it keeps a hostile file from exhausting the
/// stack when the tree is dropped.
const MAX_DEPTH: usize = 64;

/// Parses the first YAML document of `text` into a [`Node`] tree.
fn parse_yaml(text: &str) -> Result<Node, String> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|e| format!("not YAML: {e}"))?;
    if let Some(error) = builder.error {
        return Err(error);
    }
    builder
        .root
        .ok_or_else(|| "an empty YAML document".to_string())
}

/// Collects parser events into a tree.
#[derive(Default)]
struct TreeBuilder {
    /// Open sequences and mappings, innermost last.
    stack: Vec<Open>,
    root: Option<Node>,
    error: Option<String>,
}

enum Open {
    Seq(Node),
    /// A mapping and, when its next key has been read but not its value, that key.
    Map(Node, Option<Node>),
}

impl TreeBuilder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                // Only the first document counts.
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Open::Seq(seq)) => {
                if let Value::Seq(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some(Open::Map(map, pending_key)) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => {
                    if let Value::Map(pairs) = &mut map.value {
                        pairs.push((key, node));
                    }
                }
            },
        }
    }

    fn open(&mut self, open: Open, mark: &Marker) {
        if self.stack.len() >= MAX_DEPTH {
            self.error = Some(format!(
                "nested deeper than {MAX_DEPTH} levels at line {}",
                mark.line()
            ));
        } else {
            self.stack.push(open);
        }
    }

    fn close(&mut self) {
        if let Some(open) = self.stack.pop() {
            let node = match open {
                Open::Seq(node) | Open::Map(node, _) => node,
            };
            self.push_node(node);
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let line = mark.line();
        match event {
            Event::Scalar(text, style, _anchor, _tag) => self.push_node(Node {
                line,
                value: Value::Scalar {
                    text,
                    plain: style == TScalarStyle::Plain,
                },
            }),
            Event::SequenceStart(..) => self.open(
                Open::Seq(Node {
                    line,
                    value: Value::Seq(Vec::new()),
                }),
                &mark,
            ),
            Event::MappingStart(..) => self.open(
                Open::Map(
                    Node {
                        line,
                        value: Value::Map(Vec::new()),
                    },
                    None,
                ),
                &mark,
            ),
            Event::SequenceEnd | Event::MappingEnd => self.close(),
            Event::Alias(_) => self.push_node(Node {
                line,
                value: Value::Alias,
            }),
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{read_plain_and_gz, read_text};
    use super::super::{Format, ImportError, Role};
    use crate::domain::Platform;

    #[test]
    fn food_sample_reads_as_alternating_user_and_assistant() {
        let (conversations, errors) = read_plain_and_gz("chatterbot_food.yml", Format::Chatterbot);
        let first = &conversations[0];
        assert_eq!(first.platform, Platform::Import);
        assert_eq!(first.chat_id, None);
        assert!(first.direct);
        assert_eq!(first.title.as_deref(), Some("food, 食べ物"));
        let lines: Vec<(Role, &str, &str)> = first
            .messages
            .iter()
            .map(|m| (m.role, m.author_id.as_str(), m.text.as_str()))
            .collect();
        assert_eq!(
            lines,
            vec![
                (Role::User, "user", "何か飲みますか？"),
                (
                    Role::Assistant,
                    "assistant",
                    "私の脳は飲み物を必要としません。"
                ),
                (Role::User, "user", "じゃあ何を食べるの？"),
                (Role::Assistant, "assistant", "電気です。"),
            ]
        );
        assert!(first.messages.iter().all(|m| m.id.is_none()));

        let texts: Vec<Vec<&str>> = conversations
            .iter()
            .map(|c| c.messages.iter().map(|m| m.text.as_str()).collect())
            .collect();
        // Numbers and booleans as written, not as YAML would convert them.
        assert!(texts.contains(&vec!["What year was sushi first sold in Edo?", "1824"]));
        assert!(texts.contains(&vec!["Is sushi Japanese?", "True"]));
        assert!(texts.contains(&vec!["How many grams of rice in a bowl?", "0150"]));
        // The under-indented answer is joined to its question.
        assert!(texts.contains(&vec!["Which country eats the most rice?", "China"]));
        // A folded multi-line scalar is one line of text.
        assert!(texts.contains(&vec![
            "Is a tomato a fruit or a vegetable? Botanists and cooks disagree.",
            "Both, depending on whom you ask."
        ]));
        assert!(texts.contains(&vec![
            "How many kinds of onigiri are there?",
            "Many: salmon, tuna, umeboshi"
        ]));
        assert_eq!(conversations.len(), 8);

        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].position, "conversations[9] (line 24)");
        assert!(
            errors[0].reason.contains("a mapping"),
            "{}",
            errors[0].reason
        );
        assert!(
            errors[0].reason.contains("file line 25"),
            "{}",
            errors[0].reason
        );
        assert_eq!(errors[1].position, "conversations[11] (line 26)");
        assert!(errors[1].reason.contains("empty"), "{}", errors[1].reason);
    }

    #[test]
    fn a_file_that_is_not_yaml_is_malformed() {
        let result = read_text(
            "bad.yml",
            "conversations:\n- - \"unterminated\n",
            Format::Chatterbot,
        );
        assert!(
            matches!(result, Err(ImportError::Malformed { ref reason, .. }) if reason.contains("not YAML")),
            "{result:?}"
        );
    }

    #[test]
    fn yaml_without_conversations_is_malformed() {
        let result = read_text("other.yml", "name: kaiwa\nversion: 1\n", Format::Chatterbot);
        assert!(
            matches!(result, Err(ImportError::Malformed { ref reason, .. }) if reason.contains("conversations")),
            "{result:?}"
        );
    }

    #[test]
    fn a_bare_line_before_any_dialogue_is_reported() {
        let (conversations, errors) = read_text(
            "bare.yml",
            "conversations:\n- lonely line\n- - Hi\n  - Hello\n",
            Format::Chatterbot,
        )
        .expect("reads");
        assert_eq!(conversations.len(), 1);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].position, "conversations[0] (line 2)");
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let deep = format!(
            "conversations: {}{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let result = read_text("deep.yml", &deep, Format::Chatterbot);
        assert!(
            matches!(result, Err(ImportError::Malformed { .. })),
            "{result:?}"
        );
    }
}
