//! `question,answer` rows: each row is a two-message dialogue, the question the user's and the
//! answer the assistant's. RFC 4180 quoting applies, so a field may hold commas, quotes (`""`)
//! and newlines. A first row whose cells are both column names (`question,answer`,
//! `prompt,response`, `input,output`, …) is a header and skipped.

use std::io::{self, BufRead, Read};
use std::sync::{Arc, Mutex, MutexGuard};

use super::input::{SkipBom, Source};
use super::{corpus_conversation, corpus_message, Conversation, ImportError, Records};
use super::{RecordError, Role};

/// Reads a question,answer CSV file.
pub(super) fn read(source: Source) -> Result<Records, ImportError> {
    let consumed = Arc::new(Mutex::new(Consumed::default()));
    let recorder = Recorder {
        inner: SkipBom::new(source.reader),
        consumed: Arc::clone(&consumed),
    };
    let reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        // Rows of the wrong width are reported one by one, not as the end of the file.
        .flexible(true)
        .from_reader(recorder);
    Ok(Box::new(Rows {
        reader,
        consumed,
        record: ::csv::ByteRecord::new(),
        first: true,
        ended: false,
    }))
}

struct Rows {
    reader: ::csv::Reader<Recorder<SkipBom<Box<dyn BufRead + Send>>>>,
    consumed: Arc<Mutex<Consumed>>,
    record: ::csv::ByteRecord,
    first: bool,
    ended: bool,
}

impl Iterator for Rows {
    type Item = Result<Conversation, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.ended {
            let read = self.reader.read_byte_record(&mut self.record);
            let line = lock(&self.consumed).start_line(self.reader.position().byte());
            match read {
                Ok(false) => self.ended = true,
                Err(e) => {
                    // A failing read (a truncated .gz) leaves nothing to trust after it.
                    self.ended = matches!(e.kind(), ::csv::ErrorKind::Io(_));
                    return Some(Err(RecordError::new(
                        format!("line {line}"),
                        csv_reason(&e),
                    )));
                }
                Ok(true) => {
                    let fields: Option<Vec<&str>> = self
                        .record
                        .iter()
                        .map(|field| std::str::from_utf8(field).ok())
                        .collect();
                    let Some(fields) = fields else {
                        return Some(Err(RecordError::new(
                            format!("line {line}"),
                            "not UTF-8 text",
                        )));
                    };
                    if std::mem::replace(&mut self.first, false) && is_header(&fields) {
                        continue;
                    }
                    return Some(convert(&fields, line));
                }
            }
        }
        None
    }
}

/// The bytes the CSV reader has taken but that no record has been accounted for yet.
///
/// The csv crate positions a record where the reader stood before it skipped blank lines, and
/// counts a `\r\n` line end with the next record; so the line a record starts on is counted
/// here from the bytes themselves.
#[derive(Default)]
struct Consumed {
    /// From the end of the last record on.
    bytes: Vec<u8>,
    /// The byte offset (as the csv reader counts, after the BOM) of `bytes[0]`.
    base: u64,
    /// Line ends before `base`.
    newlines_before: usize,
}

impl Consumed {
    /// The line of the first byte of the record that ends at `end`, which becomes the new base.
    fn start_line(&mut self, end: u64) -> usize {
        let mut line = self.newlines_before + 1;
        for &byte in &self.bytes {
            match byte {
                b'\n' => line += 1,
                b'\r' => {}
                _ => break,
            }
        }
        let used = usize::try_from(end.saturating_sub(self.base))
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        self.newlines_before += self
            .bytes
            .drain(..used)
            .filter(|&byte| byte == b'\n')
            .count();
        self.base = end;
        line
    }
}

fn lock(consumed: &Mutex<Consumed>) -> MutexGuard<'_, Consumed> {
    consumed
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Hands the file to the csv reader, keeping a copy of what it took for [`Consumed`].
struct Recorder<R> {
    inner: R,
    consumed: Arc<Mutex<Consumed>>,
}

impl<R: Read> Read for Recorder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        lock(&self.consumed)
            .bytes
            .extend_from_slice(out.get(..n).unwrap_or(out));
        Ok(n)
    }
}

const HEADER_NAMES: &[&str] = &[
    "question",
    "answer",
    "q",
    "a",
    "prompt",
    "response",
    "completion",
    "input",
    "output",
    "query",
    "reply",
    "instruction",
    "user",
    "assistant",
    "bot",
    "質問",
    "回答",
    "答え",
];

fn is_header(fields: &[&str]) -> bool {
    fields.len() == 2
        && fields
            .iter()
            .all(|cell| HEADER_NAMES.contains(&cell.trim().to_lowercase().as_str()))
}

fn convert(fields: &[&str], line: usize) -> Result<Conversation, RecordError> {
    let position = format!("line {line}");
    let [question, answer] = fields else {
        return Err(RecordError::new(
            position,
            format!(
                "expected 2 fields (question,answer), found {}; quote fields that contain commas",
                fields.len()
            ),
        ));
    };
    let (question, answer) = (question.trim(), answer.trim());
    if question.is_empty() || answer.is_empty() {
        let which = if question.is_empty() {
            "question"
        } else {
            "answer"
        };
        return Err(RecordError::new(position, format!("the {which} is empty")));
    }
    Ok(corpus_conversation(
        None,
        vec![
            corpus_message(Role::User, question.to_string()),
            corpus_message(Role::Assistant, answer.to_string()),
        ],
    ))
}

fn csv_reason(error: &::csv::Error) -> String {
    match error.kind() {
        ::csv::ErrorKind::Io(e) => format!("cannot read further: {e}"),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::input::tests::{read_plain_and_gz, read_text};
    use super::super::{Format, Role};
    use crate::domain::Platform;

    #[test]
    fn sample_skips_the_header_and_keeps_quoted_fields_whole() {
        let (conversations, errors) = read_plain_and_gz("qa.csv", Format::Csv);
        let pairs: Vec<(&str, &str)> = conversations
            .iter()
            .map(|c| (c.messages[0].text.as_str(), c.messages[1].text.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("お名前は？", "かいわです。"),
                ("Where, exactly, are you?", "In a \"server\", somewhere."),
                ("好きな食べ物は？", "電気です。\nあと、少しだけ光も。"),
                ("最後の質問", "さようなら"),
            ]
        );
        let first = &conversations[0];
        assert_eq!(first.messages[0].role, Role::User);
        assert_eq!(first.messages[1].role, Role::Assistant);
        assert_eq!(first.messages[1].author_id, "assistant");
        assert!(first.direct);
        assert_eq!(first.platform, Platform::Import);

        let got: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.position.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "line 7");
        assert!(got[0].1.contains("found 3"), "{}", got[0].1);
        assert_eq!(got[1].0, "line 8");
        assert!(got[1].1.contains("answer is empty"), "{}", got[1].1);
    }

    #[test]
    fn lines_are_counted_across_blank_lines_quoted_newlines_and_crlf() {
        let text = "a,b\r\n\r\n\r\nc\r\n\"d\r\ne\",f\r\n\r\ng,h,i\r\nj,";
        let (conversations, errors) = read_text("crlf.csv", text, Format::Csv).expect("reads");
        assert_eq!(conversations.len(), 2);
        assert_eq!(conversations[1].messages[0].text, "d\r\ne");
        let positions: Vec<&str> = errors.iter().map(|e| e.position.as_str()).collect();
        assert_eq!(positions, vec!["line 4", "line 8", "line 9"]);
    }

    #[test]
    fn a_first_row_of_data_is_not_a_header() {
        let (conversations, errors) =
            read_text("qa.csv", "\u{feff}hi,hello\nbye,see you\n", Format::Csv).expect("reads");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(conversations.len(), 2);
        assert_eq!(conversations[0].messages[0].text, "hi");
    }
}
