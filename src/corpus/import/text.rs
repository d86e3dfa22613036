//! Plain-text transcripts:
//!
//! ```text
//! 田中: おはよう
//! Bot: おはようございます。
//! 今日もよろしくお願いします。
//!
//! Alice: next conversation…
//! ```
//!
//! A line `Name: text` (or with the full-width `：`) starts a turn; a line without a name
//! continues the turn before it; a blank line, or a line of dashes (`---`), ends the
//! conversation. What counts as a name is deliberately narrow, so that ordinary text with a
//! colon in it continues a turn: at most 40 characters, at least one letter, nothing URL-like
//! (`See https://…`), not a time (`12:30`).
//!
//! Everyone is a [`Role::User`] whose id and name are the name as written; which speaker is the
//! bot is for the import to decide. A conversation whose first line has no name is reported and
//! skipped up to the next blank line.

use super::input::{NumberedLines, Source};
use super::{Conversation, ImportError, Message, RecordError, Records, Role};
use crate::domain::Platform;

/// The longest name a speaker prefix may have, in characters.
const MAX_NAME_CHARS: usize = 40;

/// Reads a transcript file.
pub(super) fn read(source: Source) -> Result<Records, ImportError> {
    Ok(Box::new(Transcripts {
        lines: NumberedLines::new(source.reader),
        turns: Vec::new(),
        skipping: false,
        ended: false,
    }))
}

struct Transcripts {
    lines: NumberedLines,
    /// The conversation being read: `(speaker, text)` turns.
    turns: Vec<(String, String)>,
    /// After a conversation that started without a speaker, until the next blank line.
    skipping: bool,
    ended: bool,
}

impl Iterator for Transcripts {
    type Item = Result<Conversation, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.ended {
            let (number, line) = match self.lines.next() {
                None => {
                    self.ended = true;
                    break;
                }
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(numbered)) => numbered,
            };
            let trimmed = line.trim();
            if trimmed.is_empty() || is_separator(trimmed) {
                self.skipping = false;
                if let Some(conversation) = self.finish() {
                    return Some(Ok(conversation));
                }
                continue;
            }
            if self.skipping {
                continue;
            }
            match speaker(&line) {
                Some((name, text)) => self.turns.push((name.to_string(), text.to_string())),
                None => match self.turns.last_mut() {
                    Some((_, text)) => {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(line.trim_end());
                    }
                    None => {
                        self.skipping = true;
                        return Some(Err(RecordError::new(
                            format!("line {number}"),
                            format!(
                                "a conversation must start with `Name: text`, found `{}`; \
                                 skipped up to the next blank line",
                                preview(trimmed)
                            ),
                        )));
                    }
                },
            }
        }
        self.finish().map(Ok)
    }
}

impl Transcripts {
    /// The conversation read so far, if it has any text.
    fn finish(&mut self) -> Option<Conversation> {
        let turns = std::mem::take(&mut self.turns);
        let messages: Vec<Message> = turns
            .into_iter()
            .filter(|(_, text)| !text.trim().is_empty())
            .map(|(name, text)| Message {
                id: None,
                author_id: name.clone(),
                author_name: name,
                author_is_bot: false,
                role: Role::User,
                text,
                sent_at_ms: None,
                reply_to: None,
            })
            .collect();
        if messages.is_empty() {
            return None;
        }
        let mut speakers: Vec<&str> = messages.iter().map(|m| m.author_id.as_str()).collect();
        speakers.sort_unstable();
        speakers.dedup();
        let direct = speakers.len() == 2;
        Some(Conversation {
            platform: Platform::Import,
            chat_id: None,
            direct,
            title: None,
            messages,
        })
    }
}

fn is_separator(trimmed: &str) -> bool {
    trimmed.len() >= 3 && trimmed.chars().all(|c| c == '-')
}

/// `Name: text` → `(Name, text)`, when what precedes the first colon looks like a name.
fn speaker(line: &str) -> Option<(&str, &str)> {
    let (at, colon) = line.char_indices().find(|&(_, c)| c == ':' || c == '：')?;
    let before = line.get(..at)?;
    let after = line.get(at + colon.len_utf8()..)?;
    let is_time = before.ends_with(|c: char| c.is_ascii_digit())
        && after.starts_with(|c: char| c.is_ascii_digit());
    let (name, text) = (before.trim(), after.trim());
    let looks_like_a_name = !is_time
        && !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name.chars().any(char::is_alphabetic)
        && !name.to_lowercase().contains("http");
    looks_like_a_name.then_some((name, text))
}

/// The start of a line, for messages.
fn preview(text: &str) -> String {
    let mut shown: String = text.chars().take(40).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{read_plain_and_gz, read_text};
    use super::super::{Format, Role};
    use super::speaker;
    use crate::domain::Platform;

    #[test]
    fn sample_reads_turns_continuations_and_separators() {
        let (conversations, errors) = read_plain_and_gz("transcript.txt", Format::Text);
        assert_eq!(conversations.len(), 3, "{conversations:?}");

        let first = &conversations[0];
        let turns: Vec<(&str, &str)> = first
            .messages
            .iter()
            .map(|m| (m.author_id.as_str(), m.text.as_str()))
            .collect();
        assert_eq!(
            turns,
            vec![
                ("田中", "おはよう"),
                ("Bot", "おはようございます。\n今日の会議は 10:30 からです。"),
                (
                    "田中",
                    "ありがとう。See https://example.com/agenda for the agenda."
                ),
            ]
        );
        assert!(first.direct);
        assert!(first.messages.iter().all(|m| m.role == Role::User));
        assert_eq!(first.messages[1].author_name, "Bot");
        assert_eq!(first.platform, Platform::Import);

        // Ended by `---`, three speakers: not direct.
        let second = &conversations[1];
        assert_eq!(second.messages.len(), 3);
        assert!(!second.direct);
        assert_eq!(second.messages[2].author_id, "Carol");

        assert_eq!(conversations[2].messages[0].text, "最後の会話です");

        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].position, "line 12");
        assert!(
            errors[0].reason.contains("Name: text"),
            "{}",
            errors[0].reason
        );
    }

    #[test]
    fn names_are_narrow() {
        assert_eq!(speaker("Alice: hi"), Some(("Alice", "hi")));
        assert_eq!(
            speaker("山田　太郎：こんにちは"),
            Some(("山田　太郎", "こんにちは"))
        );
        assert_eq!(speaker("12:30 lunch"), None);
        assert_eq!(speaker("会議は 10:30 から"), None);
        assert_eq!(speaker("https://example.com"), None);
        assert_eq!(speaker(": no name"), None);
        assert_eq!(speaker(&format!("{}: long", "x".repeat(41))), None);
    }

    #[test]
    fn a_file_without_a_final_blank_line_keeps_its_last_conversation() {
        let (conversations, errors) =
            read_text("t.txt", "A: one\nB: two", Format::Text).expect("reads");
        assert!(errors.is_empty());
        assert_eq!(conversations.len(), 1);
        assert_eq!(conversations[0].messages.len(), 2);
    }
}
