//! OpenAI chat fine-tuning JSONL: one dialogue per line,
//! `{"messages": [{"role": "system" | "user" | "assistant", "content": "…"}, …]}`.
//!
//! What a line holds, and when it is refused, is [`crate::dataset::chat`]'s to say (the rules
//! `kaiwa train` and `kaiwa eval` read the same lines by): text parts kept, tool traffic and
//! empty messages dropped, a line with no user or assistant text left reported.

use super::input::{jsonl_records, NumberedLines, Source};
use super::{Conversation, ImportError, RecordError, Records};

/// Reads an OpenAI chat JSONL file.
pub(super) fn read(source: Source) -> Result<Records, ImportError> {
    let name = source.name();
    let mut lines = NumberedLines::new(source.reader);
    if let Some(Ok((number, line))) = lines.first_content() {
        if !line.trim_start().starts_with('{') {
            return Err(name.malformed(format!(
                "line {number} is not a JSON object; expected one {{\"messages\": […]}} per line"
            )));
        }
    }
    Ok(jsonl_records(lines, parse_line))
}

fn parse_line(number: usize, line: &str) -> Result<Conversation, RecordError> {
    super::dialogue(line, crate::dataset::chat::Kind::Openai)
        .map_err(|reason| RecordError::new(format!("line {number}"), reason))
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{read_plain_and_gz, read_text};
    use super::super::{Format, ImportError, Role};
    use crate::domain::Platform;

    #[test]
    fn sample_reads_dialogues_and_reports_the_bad_lines() {
        let (conversations, errors) = read_plain_and_gz("openai.jsonl", Format::Openai);
        assert_eq!(conversations.len(), 3, "{conversations:?}");

        let first = &conversations[0];
        assert_eq!(first.platform, Platform::Import);
        assert!(first.direct);
        assert_eq!(first.chat_id, None);
        let got: Vec<(Role, &str, &str)> = first
            .messages
            .iter()
            .map(|m| (m.role, m.author_id.as_str(), m.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Role::System, "system", "あなたは親切なアシスタントです。"),
                (Role::User, "user", "東京の天気は？"),
                (Role::Assistant, "assistant", "今日は晴れです。"),
            ]
        );

        // Text parts joined, the image part dropped.
        assert_eq!(conversations[1].messages[0].text, "この写真は\n何ですか？");
        // The tool call and the tool result are gone; the answer stays.
        let third: Vec<&str> = conversations[2]
            .messages
            .iter()
            .map(|m| m.text.as_str())
            .collect();
        assert_eq!(
            third,
            vec!["What time is it in Osaka?", "It is 15:00 in Osaka."]
        );

        let positions: Vec<&str> = errors.iter().map(|e| e.position.as_str()).collect();
        assert_eq!(positions, vec!["line 4", "line 6", "line 7"], "{errors:?}");
        assert!(
            errors[0].reason.starts_with("not JSON"),
            "{}",
            errors[0].reason
        );
        assert!(
            errors[1].reason.contains("messages"),
            "{}",
            errors[1].reason
        );
        assert!(
            errors[2].reason.contains("unknown role `narrator`"),
            "{}",
            errors[2].reason
        );
    }

    #[test]
    fn a_json_array_is_not_jsonl() {
        let result = read_text("chat.jsonl", "\n[{\"messages\": []}]\n", Format::Openai);
        assert!(
            matches!(result, Err(ImportError::Malformed { ref reason, .. }) if reason.starts_with("line 2")),
            "{result:?}"
        );
    }

    #[test]
    fn a_line_with_only_a_system_prompt_is_reported() {
        let (conversations, errors) = read_text(
            "sys.jsonl",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}]}\n",
            Format::Openai,
        )
        .expect("reads");
        assert!(conversations.is_empty());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].position, "line 1");
    }
}
