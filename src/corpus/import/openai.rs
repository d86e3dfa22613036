//! OpenAI chat fine-tuning JSONL: one dialogue per line,
//! `{"messages": [{"role": "system" | "user" | "assistant", "content": "…"}, …]}`.
//!
//! `content` is a string, or a list of parts of which the `{"type": "text", "text": "…"}` ones
//! are kept (joined by newlines; images and audio are dropped). `developer` is the newer name of
//! `system`. Tool traffic (`tool` / `function` messages, an assistant turn that only calls a tool
//! and so has no text) is dropped: what remains is the dialogue the people saw. A line with no
//! user or assistant text left is reported.

use serde::Deserialize;

use super::input::{jsonl_records, NumberedLines, Source};
use super::{corpus_conversation, corpus_message, Conversation, ImportError, Records};
use super::{RecordError, Role};

#[derive(Deserialize)]
struct Line {
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
struct ChatMessage {
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
    let position = format!("line {number}");
    let parsed: Line =
        super::input::json_line(line).map_err(|reason| RecordError::new(&position, reason))?;
    let mut messages = Vec::with_capacity(parsed.messages.len());
    for (i, message) in parsed.messages.into_iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" | "ipython" => continue,
            other => {
                return Err(RecordError::new(
                    position,
                    format!(
                        "messages[{i}].role: unknown role `{other}` \
                         (expected system, developer, user, assistant or tool)"
                    ),
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
        if !text.trim().is_empty() {
            messages.push(corpus_message(role, text));
        }
    }
    if !messages.iter().any(|m| m.role != Role::System) {
        return Err(RecordError::new(
            position,
            "no user or assistant message with text",
        ));
    }
    Ok(corpus_conversation(None, messages))
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{read_plain_and_gz, read_text};
    use super::super::{Format, ImportError, Role};

    #[test]
    fn sample_reads_dialogues_and_reports_the_bad_lines() {
        let (conversations, errors) = read_plain_and_gz("openai.jsonl", Format::Openai);
        assert_eq!(conversations.len(), 3, "{conversations:?}");

        let first = &conversations[0];
        assert_eq!(first.platform, "import");
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
