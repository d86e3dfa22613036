//! ShareGPT-style corpora: a JSON array (or JSONL) of
//! `{"conversations": [{"from": "human", "value": "…"}, {"from": "gpt", "value": "…"}, …]}`.
//!
//! What an item holds, and when it is refused, is [`crate::dataset::chat`]'s to say (the rules
//! `kaiwa train` and `kaiwa eval` read the same lines by: one table of speakers, `chatgpt`
//! included, an item-level `"system"` prompt, tool traffic dropped). An item is positioned by
//! its index in the array (`[12]`) or its line (`line 12`).

use super::input::{json_from_reader, jsonl_records, NumberedLines, Source};
use super::{Conversation, ImportError, RecordError, Records};
use crate::dataset::chat::{self, Kind};

/// Reads a ShareGPT JSON array or JSONL file.
pub(super) fn read(source: Source) -> Result<Records, ImportError> {
    let name = source.name();
    let mut lines = NumberedLines::new(source.reader);
    let first = match lines.first_content() {
        Some(Ok((number, line))) => Some((*number, line.trim_start().chars().next())),
        // A read error on the first line: let the iterator report it.
        Some(Err(_)) | None => None,
    };
    match first {
        Some((_, Some('['))) => {
            let (items, _) =
                json_from_reader::<Vec<serde_json::Value>>(lines.into_reader(), &name)?;
            let records: Vec<Result<Conversation, RecordError>> = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    super::conversation(chat::parse_value(item, Kind::Sharegpt))
                        .map_err(|reason| RecordError::new(format!("[{i}]"), reason))
                })
                .collect();
            Ok(Box::new(records.into_iter()))
        }
        Some((number, Some(first))) if first != '{' => Err(name.malformed(format!(
            "line {number} starts with `{first}`; expected a JSON array of \
             {{\"conversations\": […]}} objects, or one such object per line"
        ))),
        _ => Ok(jsonl_records(lines, |number, line| {
            super::dialogue(line, Kind::Sharegpt)
                .map_err(|reason| RecordError::new(format!("line {number}"), reason))
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{read_plain_and_gz, read_text};
    use super::super::{Format, ImportError, Role};
    use crate::domain::Platform;

    #[test]
    fn array_sample_reads_items_and_reports_bad_ones() {
        let (conversations, errors) = read_plain_and_gz("sharegpt.json", Format::Sharegpt);
        assert_eq!(conversations.len(), 3, "{conversations:?}");
        let first: Vec<(Role, &str, &str)> = conversations[0]
            .messages
            .iter()
            .map(|m| (m.role, m.author_name.as_str(), m.text.as_str()))
            .collect();
        assert_eq!(
            first,
            vec![
                (Role::User, "user", "日本の首都はどこですか？"),
                (Role::Assistant, "assistant", "東京です。"),
                (Role::User, "user", "人口は？"),
                (Role::Assistant, "assistant", "約1400万人です。"),
            ]
        );
        assert!(conversations[0].direct);
        assert_eq!(conversations[0].platform, Platform::Import);
        // The item-level system prompt comes first; `chatgpt` is the assistant.
        let second: Vec<Role> = conversations[1].messages.iter().map(|m| m.role).collect();
        assert_eq!(second, vec![Role::System, Role::User, Role::Assistant]);
        assert_eq!(conversations[1].messages[0].text, "Answer in haiku.");
        // The function call and its observation are dropped.
        assert_eq!(conversations[2].messages.len(), 2);

        let got: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.position.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].0, "[2]");
        assert!(got[0].1.contains("conversations"), "{}", got[0].1);
        assert_eq!(got[1].0, "[3]");
        assert!(
            got[1].1.contains("unknown speaker `narrator`"),
            "{}",
            got[1].1
        );
        assert_eq!(got[2].0, "[5]");
        assert!(
            got[2].1.starts_with("conversations[0].from"),
            "{}",
            got[2].1
        );
    }

    #[test]
    fn jsonl_reads_line_by_line() {
        let text = concat!(
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"こんにちは\"}, {\"from\": \"gpt\", \"value\": \"こんにちは！\"}]}\n",
            "\n",
            "{\"conversations\": [{\"from\": \"human\"}]}\n",
            "not json\n",
        );
        let (conversations, errors) =
            read_text("chat.jsonl", text, Format::Sharegpt).expect("reads");
        assert_eq!(conversations.len(), 1);
        assert_eq!(conversations[0].messages[1].text, "こんにちは！");
        let positions: Vec<&str> = errors.iter().map(|e| e.position.as_str()).collect();
        assert_eq!(positions, vec!["line 3", "line 4"]);
    }

    #[test]
    fn a_truncated_array_is_malformed() {
        let result = read_text(
            "cut.json",
            "[{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}]},\n{\"conv",
            Format::Sharegpt,
        );
        assert!(
            matches!(result, Err(ImportError::Malformed { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn csv_is_not_sharegpt() {
        let result = read_text("qa.csv", "question,answer\nhi,hello\n", Format::Sharegpt);
        assert!(
            matches!(result, Err(ImportError::Malformed { .. })),
            "{result:?}"
        );
    }
}
