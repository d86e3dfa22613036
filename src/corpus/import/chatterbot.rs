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
//! Numbers and booleans (`- 1984`, `- yes`) are kept as written: YAML would turn `007` into `7`
//! and `True` into `true`, so the text of such a line is taken from the file at the line's span.
//! Only the first YAML document of a file is read. An alias (`*anchor`) where a line or a
//! dialogue should be is reported, as no corpus uses one.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::{Span, Spanned};

use super::input::Source;
use super::{corpus_conversation, corpus_message, Conversation, ImportError, Records};
use super::{RecordError, Role};

/// Reads a chatterbot-corpus YAML file.
pub(super) fn read(source: Source) -> Result<Records, ImportError> {
    let (text, name) = source.read_to_string()?;
    let corpus = parse_yaml(&text).map_err(|reason| name.malformed(reason))?;
    let Some(conversations) = corpus.conversations else {
        return Err(name.malformed(
            "no `conversations:` list at the top (expected `categories:` and `conversations:`)",
        ));
    };
    let entries = match &conversations.value {
        Node::List(entries) if !is_alias(&conversations) => entries,
        _ => {
            return Err(name.malformed(format!(
                "`conversations:` (line {}) is not a list of dialogues",
                line_of(&conversations)
            )))
        }
    };
    let mut as_written = AsWritten::new(&text);
    let title = corpus
        .categories
        .as_ref()
        .and_then(|c| categories_title(c, &mut as_written));

    let records: Vec<Result<Conversation, RecordError>> = group_dialogues(entries, &mut as_written)
        .into_iter()
        .map(|dialogue| dialogue.into_conversation(title.clone()))
        .collect();
    Ok(Box::new(records.into_iter()))
}

/// One entry of `conversations:` with the bare lines that follow it (see the module doc).
struct Dialogue<'a> {
    index: usize,
    line: usize,
    /// Each line's line in the file, and its text.
    items: Vec<(usize, Result<&'a str, NotText>)>,
    /// The entry itself is not a list (a bare line with no dialogue before it, a mapping).
    problem: Option<String>,
}

fn group_dialogues<'a>(
    entries: &'a [Spanned<Entry>],
    as_written: &mut AsWritten<'a>,
) -> Vec<Dialogue<'a>> {
    let mut dialogues: Vec<Dialogue<'a>> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        match &entry.value {
            Node::List(items) if !is_alias(entry) => dialogues.push(Dialogue {
                index,
                line: line_of(entry),
                items: items
                    .iter()
                    .map(|i| (line_of(i), text_of(i, as_written)))
                    .collect(),
                problem: None,
            }),
            _ => match dialogues.last_mut() {
                // An under-indented line: the next line of the dialogue above.
                Some(previous) => previous
                    .items
                    .push((line_of(entry), text_of(entry, as_written))),
                None => dialogues.push(Dialogue {
                    index,
                    line: line_of(entry),
                    items: Vec::new(),
                    problem: Some(format!(
                        "{} where a dialogue (a list of lines) was expected",
                        text_of(entry, as_written)
                            .map_or_else(NotText::describe, |_| "a line of text")
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
        for (i, (line, item)) in self.items.iter().enumerate() {
            let text = match item {
                Ok(text) => text.trim(),
                Err(what) => {
                    let hint = if *what == NotText::Mapping {
                        " (an unquoted line containing `: `? quote it)"
                    } else {
                        ""
                    };
                    return Err(RecordError::new(
                        position,
                        format!(
                            "line {} of the dialogue (file line {line}) is {}, not text{hint}",
                            i + 1,
                            what.describe()
                        ),
                    ));
                }
            };
            if text.is_empty() {
                return Err(RecordError::new(
                    position,
                    format!("line {} of the dialogue (file line {line}) is empty", i + 1),
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
fn categories_title<'a>(
    node: &'a Spanned<Entry>,
    as_written: &mut AsWritten<'a>,
) -> Option<String> {
    let names: Vec<String> = match &node.value {
        Node::List(items) if !is_alias(node) => items
            .iter()
            .filter_map(|item| category(item, as_written))
            .collect(),
        _ => category(node, as_written).into_iter().collect(),
    };
    (!names.is_empty()).then(|| names.join(", "))
}

/// The text of one category: a scalar's, not empty (a null is none).
fn category<'a, T, M>(
    node: &'a Spanned<Node<T, M>>,
    as_written: &mut AsWritten<'a>,
) -> Option<String> {
    let text = text_of(node, as_written).ok()?.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// The line a node starts on.
fn line_of<T>(node: &Spanned<T>) -> usize {
    usize::try_from(node.referenced.line()).unwrap_or(usize::MAX)
}

/// An alias (`*anchor`) is used where it is referenced, away from where its value is defined.
fn is_alias<T>(node: &Spanned<T>) -> bool {
    node.referenced != node.defined
}

/// A YAML node, as far as this reader looks into it: the items of a list are read as `T`, a
/// mapping as `M`.
#[derive(Debug)]
enum Node<T, M = Skipped> {
    /// A string scalar, as YAML reads it (quotes, escapes and folding resolved).
    Text(String),
    /// A plain scalar YAML reads as a number or a boolean: its text is the file's, as written.
    AsWritten,
    Null,
    List(Vec<Spanned<T>>),
    Mapping(M),
}

/// A line of a dialogue; only its kind matters when it is not text.
type Line = Node<IgnoredAny>;
/// An entry of `conversations:`: a dialogue, or a bare line.
type Entry = Node<Line>;

/// A mapping whose content does not matter.
#[derive(Debug)]
struct Skipped;

/// The top of a file: only `categories:` and `conversations:` are read (the last of each, when
/// repeated); other keys, and keys that are not text, are skipped.
#[derive(Debug, Default)]
struct Corpus {
    categories: Option<Spanned<Entry>>,
    conversations: Option<Spanned<Node<Entry>>>,
}

/// How a mapping is read.
trait FromMap: Sized {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

impl FromMap for Skipped {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Skipped)
    }
}

impl FromMap for Corpus {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut corpus = Corpus::default();
        while let Some(key) = map.next_key::<Line>()? {
            match key {
                Node::Text(k) if k == "categories" => corpus.categories = Some(map.next_value()?),
                Node::Text(k) if k == "conversations" => {
                    corpus.conversations = Some(map.next_value()?)
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(corpus)
    }
}

impl<'de, T: Deserialize<'de>, M: FromMap> Deserialize<'de> for Node<T, M> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor(PhantomData))
    }
}

struct NodeVisitor<T, M>(PhantomData<(T, M)>);

impl<'de, T: Deserialize<'de>, M: FromMap> Visitor<'de> for NodeVisitor<T, M> {
    type Value = Node<T, M>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Node::Text(v.to_string()))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Node::AsWritten)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Node::AsWritten)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Node::AsWritten)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Node::AsWritten)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Node::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::List(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        M::from_map(map).map(Node::Mapping)
    }
}

/// What a line is when it is not text.
#[derive(Clone, Copy, PartialEq)]
enum NotText {
    Alias,
    List,
    Mapping,
}

impl NotText {
    fn describe(self) -> &'static str {
        match self {
            NotText::Alias => "a YAML alias",
            NotText::List => "a nested list",
            NotText::Mapping => "a mapping",
        }
    }
}

/// The text of a scalar ("" for a null), or what the node is instead.
fn text_of<'a, T, M>(
    node: &'a Spanned<Node<T, M>>,
    as_written: &mut AsWritten<'a>,
) -> Result<&'a str, NotText> {
    if is_alias(node) {
        return Err(NotText::Alias);
    }
    match &node.value {
        Node::Text(text) => Ok(text),
        Node::AsWritten => Ok(as_written.get(node.defined.span()).unwrap_or_default()),
        Node::Null => Ok(""),
        Node::List(_) => Err(NotText::List),
        Node::Mapping(_) => Err(NotText::Mapping),
    }
}

/// The file's text at a [`Span`], whose offsets count characters: found walking forward from
/// the last one asked for, as the lines are asked for in file order.
struct AsWritten<'a> {
    text: &'a str,
    /// A character offset and its byte offset.
    at: (usize, usize),
}

impl<'a> AsWritten<'a> {
    fn new(text: &'a str) -> Self {
        AsWritten { text, at: (0, 0) }
    }

    fn get(&mut self, span: Span) -> Option<&'a str> {
        let offset = usize::try_from(span.offset()).ok()?;
        let len = usize::try_from(span.len()).ok()?;
        let start = self.byte(offset)?;
        let end = self.byte(offset.checked_add(len)?)?;
        self.text.get(start..end)
    }

    fn byte(&mut self, chars: usize) -> Option<usize> {
        if chars < self.at.0 {
            self.at = (0, 0);
        }
        let (mut c, mut b) = self.at;
        let mut rest = self.text.get(b..)?.chars();
        while c < chars {
            b += rest.next()?.len_utf8();
            c += 1;
        }
        self.at = (c, b);
        Some(b)
    }
}

/// Deeper nesting than any corpus needs; refusing it keeps a hostile file from exhausting the
/// stack.
const MAX_DEPTH: usize = 64;

/// Parses the first YAML document of `text`.
fn parse_yaml(text: &str) -> Result<Corpus, String> {
    let options = serde_saphyr::options! {
        with_snippet: false,
        budget: serde_saphyr::budget! {
            // The whole file is already in memory.
            max_reader_input_bytes: None,
            // The top mapping is a level.
            max_depth: MAX_DEPTH,
        },
        // A repeated key: the visitor keeps the last one.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
        merge_keys: serde_saphyr::MergeKeyPolicy::AsOrdinary,
        // `.inf` is a line like `1984`, kept as written.
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::PassThrough,
    };
    // The reader API reads one document at a time (a string is read as a single document).
    let mut reader = text.as_bytes();
    let first =
        serde_saphyr::read_with_options::<_, Node<IgnoredAny, Corpus>>(&mut reader, options).next();
    match first {
        None => Err("an empty YAML document".to_string()),
        Some(Err(e)) => match e.without_snippet() {
            serde_saphyr::Error::Budget {
                breach: BudgetBreach::Depth { .. },
                location,
            } => Err(format!(
                "nested deeper than {MAX_DEPTH} levels at line {}",
                location.line()
            )),
            _ => Err(format!(
                "not YAML: {}",
                e.render_with_formatter(&serde_saphyr::UserMessageFormatter)
            )),
        },
        Some(Ok(Node::Mapping(corpus))) => Ok(corpus),
        Some(Ok(_)) => Ok(Corpus::default()),
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
    fn nesting_up_to_64_levels_with_the_top_mapping_is_read() {
        let nested = |n: usize| {
            let text = format!("conversations: {}{}\n", "[".repeat(n), "]".repeat(n));
            read_text("nested.yml", &text, Format::Chatterbot)
        };
        let (conversations, errors) = nested(63).expect("reads");
        assert!(conversations.is_empty());
        assert!(errors[0].reason.contains("a nested list"), "{errors:?}");
        assert!(
            matches!(nested(64), Err(ImportError::Malformed { ref reason, .. }) if reason.contains("nested deeper than 64 levels at line 1")),
            "{:?}",
            nested(64)
        );
    }

    #[test]
    fn numbers_and_booleans_keep_their_spelling_and_aliases_are_reported() {
        let (conversations, errors) = read_text(
            "typed.yml",
            "categories: [2024, ~]\nconversations:\n- - yes\n  - -007\n  - 1.50\n  - 0x1F\n  - .INF\n  - !!int 12\n- - &a 食べ物\n  - *a\n",
            Format::Chatterbot,
        )
        .expect("reads");
        let texts: Vec<&str> = conversations[0]
            .messages
            .iter()
            .map(|m| m.text.as_str())
            .collect();
        assert_eq!(texts, ["yes", "-007", "1.50", "0x1F", ".INF", "12"]);
        assert_eq!(conversations[0].title.as_deref(), Some("2024"));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].position, "conversations[1] (line 9)");
        assert!(
            errors[0].reason.contains("file line 10) is a YAML alias"),
            "{errors:?}"
        );
    }

    #[test]
    fn only_the_first_document_and_the_last_of_a_repeated_key_count() {
        let (conversations, _) = read_text(
            "docs.yml",
            "conversations:\n- - a\n  - b\nconversations:\n- - c\n  - d\n---\nconversations: [\n",
            Format::Chatterbot,
        )
        .expect("reads");
        let texts: Vec<Vec<&str>> = conversations
            .iter()
            .map(|c| c.messages.iter().map(|m| m.text.as_str()).collect())
            .collect();
        assert_eq!(texts, [["c", "d"]]);
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
