//! How an import file is opened and read, whatever its format: `.gz` decompressed on the fly, a
//! leading byte-order mark dropped, lines numbered as an editor numbers them, and JSON array
//! elements read one at a time so that one malformed element is reported instead of failing the
//! whole file.

use std::io::{self, BufRead, BufReader, Cursor, Read};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::{Conversation, Format, ImportError, RecordError, Records};

/// An opened import file.
pub(super) struct Source {
    /// The path as the user gave it, for messages.
    pub path: String,
    pub format: Format,
    pub reader: Box<dyn BufRead + Send>,
}

impl Source {
    /// Opens `path`; a name ending in `.gz` is read through a gzip decoder.
    pub fn open(path: &Path, format: Format) -> Result<Source, ImportError> {
        let shown = path.display().to_string();
        let reader = crate::dataset::open(path).map_err(|source| ImportError::Io {
            path: shown.clone(),
            source,
        })?;
        Ok(Source {
            path: shown,
            format,
            reader,
        })
    }

    /// The file could not be read (a failing disk, a corrupt gzip stream).
    pub fn io_error(&self, source: io::Error) -> ImportError {
        ImportError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The whole file as text, without a byte-order mark.
    pub fn read_to_string(mut self) -> Result<(String, SourceName), ImportError> {
        let mut bytes = Vec::new();
        if let Err(e) = self.reader.read_to_end(&mut bytes) {
            return Err(self.io_error(e));
        }
        let name = self.name();
        match String::from_utf8(bytes) {
            Ok(mut text) => {
                if text.starts_with(BOM) {
                    text.drain(..BOM.len());
                }
                Ok((text, name))
            }
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let line = e.as_bytes().get(..at).map_or(0, count_newlines) + 1;
                Err(name.malformed(format!("line {line} is not UTF-8 text")))
            }
        }
    }

    /// Parses the whole file as one JSON document of type `T`. A syntax error, or a document of
    /// another shape, makes the file malformed.
    pub fn json<T: DeserializeOwned>(self) -> Result<(T, SourceName), ImportError> {
        let name = self.name();
        let reader = SkipBom::new(self.reader);
        json_from_reader(reader, &name)
    }

    /// The names this source reports errors under, once the reader has been handed on.
    pub fn name(&self) -> SourceName {
        SourceName {
            path: self.path.clone(),
            format: self.format,
        }
    }
}

/// What is needed to report a file-level error once the [`Source`]'s reader is in use.
#[derive(Debug, Clone)]
pub(super) struct SourceName {
    path: String,
    format: Format,
}

impl SourceName {
    pub fn malformed(&self, reason: impl Into<String>) -> ImportError {
        ImportError::Malformed {
            path: self.path.clone(),
            format: self.format,
            reason: reason.into(),
        }
    }

    pub fn io_error(&self, source: io::Error) -> ImportError {
        ImportError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// Parses a JSON document from `reader`; an I/O failure is [`ImportError::Io`], anything else
/// (syntax, shape) [`ImportError::Malformed`] with serde_json's line and column.
pub(super) fn json_from_reader<T: DeserializeOwned>(
    reader: impl Read,
    name: &SourceName,
) -> Result<(T, SourceName), ImportError> {
    // serde_json reads a byte at a time; through a BufReader that is a slice access.
    let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(64 * 1024, reader));
    let value = match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => value,
        Err(e) => {
            let path = e.path().to_string();
            return Err(json_error(name, &path, e.into_inner()));
        }
    };
    // Trailing garbage after the document (a second document, a truncated copy).
    match de.end() {
        Ok(()) => Ok((value, name.clone())),
        Err(e) => Err(json_error(name, "", e)),
    }
}

fn json_error(name: &SourceName, path: &str, error: serde_json::Error) -> ImportError {
    if error.is_io() {
        name.io_error(io::Error::from(error))
    } else if path.is_empty() || path == "." {
        name.malformed(error.to_string())
    } else {
        name.malformed(format!("{path}: {error}"))
    }
}

const BOM: &str = "\u{feff}";

fn count_newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

/// A reader that drops a UTF-8 byte-order mark at the start (Windows tools write one).
pub(super) struct SkipBom<R> {
    inner: R,
    checked: bool,
}

impl<R: BufRead> SkipBom<R> {
    pub fn new(inner: R) -> Self {
        SkipBom {
            inner,
            checked: false,
        }
    }

    fn skip(&mut self) -> io::Result<()> {
        if !self.checked {
            self.checked = true;
            // A BOM split across two buffer fills is not worth handling: buffers are 64 KiB.
            if self.inner.fill_buf()?.starts_with(BOM.as_bytes()) {
                self.inner.consume(BOM.len());
            }
        }
        Ok(())
    }
}

impl<R: BufRead> Read for SkipBom<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.skip()?;
        self.inner.read(out)
    }
}

impl<R: BufRead> BufRead for SkipBom<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.skip()?;
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        self.inner.consume(amount);
    }
}

/// The lines of a text file, numbered from 1, without their `\n` / `\r\n`.
///
/// A line that is not UTF-8 is reported and skipped; a read error (a truncated `.gz`) is
/// reported once and ends the file, since nothing after it can be trusted.
pub(super) struct NumberedLines {
    reader: Box<dyn BufRead + Send>,
    number: usize,
    ended: bool,
    buffer: Vec<u8>,
    /// A line read ahead by [`NumberedLines::first_content`], handed out again.
    peeked: Option<Result<(usize, String), RecordError>>,
}

impl NumberedLines {
    pub fn new(reader: Box<dyn BufRead + Send>) -> Self {
        NumberedLines {
            reader,
            number: 0,
            ended: false,
            buffer: Vec::new(),
            peeked: None,
        }
    }

    /// The first line with something other than white space on it (or the error that came
    /// first), left in place so that iteration still yields it. `None` for a file of blank lines.
    pub fn first_content(&mut self) -> Option<&Result<(usize, String), RecordError>> {
        loop {
            match self.next()? {
                Ok((_, line)) if line.trim().is_empty() => continue,
                item => {
                    self.peeked = Some(item);
                    return self.peeked.as_ref();
                }
            }
        }
    }

    /// The rest of the file as one reader, starting with the line read ahead, and with as many
    /// newlines before it as preceded it, so that parsers count lines as an editor does.
    pub fn into_reader(self) -> Box<dyn BufRead + Send> {
        let mut head = String::new();
        if let Some(Ok((number, line))) = self.peeked {
            head = "\n".repeat(number.saturating_sub(1));
            head.push_str(&line);
            head.push('\n');
        }
        Box::new(Cursor::new(head.into_bytes()).chain(self.reader))
    }
}

impl Iterator for NumberedLines {
    type Item = Result<(usize, String), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(peeked) = self.peeked.take() {
            return Some(peeked);
        }
        if self.ended {
            return None;
        }
        self.buffer.clear();
        let number = self.number + 1;
        match self.reader.read_until(b'\n', &mut self.buffer) {
            Ok(0) => {
                self.ended = true;
                None
            }
            Ok(_) => {
                self.number = number;
                if self.buffer.last() == Some(&b'\n') {
                    self.buffer.pop();
                    if self.buffer.last() == Some(&b'\r') {
                        self.buffer.pop();
                    }
                }
                let mut bytes = self.buffer.as_slice();
                if number == 1 {
                    bytes = bytes.strip_prefix(BOM.as_bytes()).unwrap_or(bytes);
                }
                Some(match std::str::from_utf8(bytes) {
                    Ok(text) => Ok((number, text.to_string())),
                    Err(_) => Err(RecordError {
                        position: format!("line {number}"),
                        reason: "not UTF-8 text".to_string(),
                    }),
                })
            }
            Err(e) => {
                self.ended = true;
                Some(Err(RecordError {
                    position: format!("line {number}"),
                    reason: format!("cannot read further: {e}"),
                }))
            }
        }
    }
}

/// The records of a JSONL file: each non-blank line parsed by `parse` (given its number).
pub(super) fn jsonl_records(
    lines: NumberedLines,
    parse: impl Fn(usize, &str) -> Result<Conversation, RecordError> + Send + 'static,
) -> Records {
    Box::new(lines.filter_map(move |item| match item {
        Err(e) => Some(Err(e)),
        Ok((_, line)) if line.trim().is_empty() => None,
        Ok((number, line)) => Some(parse(number, &line)),
    }))
}

pub(super) use crate::dataset::chat::typed;

/// A `Deserialize` that accepts anything and keeps nothing, for fields whose presence is all
/// that matters.
#[derive(Debug, Clone, Copy)]
pub(super) struct Present;

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(Present)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use super::super::{read, Conversation, Format, RecordError};

    /// A sample file under `tests/data/import/`.
    pub fn sample(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/import")
            .join(name)
    }

    /// Everything `read` yields for a file, split into conversations and errors.
    pub fn read_all(path: &Path, format: Format) -> (Vec<Conversation>, Vec<RecordError>) {
        let mut conversations = Vec::new();
        let mut errors = Vec::new();
        let records = match read(path, format) {
            Ok(records) => records,
            Err(e) => panic!("{} should open as {format}: {e}", path.display()),
        };
        for record in records {
            match record {
                Ok(c) => conversations.push(c),
                Err(e) => errors.push(e),
            }
        }
        (conversations, errors)
    }

    /// Reads the sample both as it is and gzipped into a temp dir; both must give the same.
    pub fn read_plain_and_gz(name: &str, format: Format) -> (Vec<Conversation>, Vec<RecordError>) {
        let plain = sample(name);
        let from_plain = read_all(&plain, format);
        let dir = tempfile::tempdir().expect("temp dir");
        let gz_path = dir.path().join(format!("{name}.gz"));
        let bytes = std::fs::read(&plain).expect("sample file");
        let file = std::fs::File::create(&gz_path).expect("gz file");
        let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        encoder.write_all(&bytes).expect("gzip");
        encoder.finish().expect("gzip");
        let from_gz = read_all(&gz_path, format);
        assert_eq!(from_plain, from_gz, "{name}.gz reads differently");
        from_plain
    }

    /// Writes `contents` to a temp file named `name` and reads it.
    pub fn read_text(
        name: &str,
        contents: &str,
        format: Format,
    ) -> Result<(Vec<Conversation>, Vec<RecordError>), super::ImportError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("temp file");
        let records = read(&path, format)?;
        let mut conversations = Vec::new();
        let mut errors = Vec::new();
        for record in records {
            match record {
                Ok(c) => conversations.push(c),
                Err(e) => errors.push(e),
            }
        }
        Ok((conversations, errors))
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let result = read(Path::new("/nonexistent/kaiwa/import.jsonl"), Format::Openai);
        assert!(matches!(result, Err(super::ImportError::Io { .. })));
    }

    #[test]
    fn crlf_and_bom_are_dropped_from_lines() {
        let lines = super::NumberedLines::new(Box::new(std::io::Cursor::new(
            "\u{feff}a\r\nb\n\nc".as_bytes().to_vec(),
        )));
        let got: Vec<_> = lines.map(|l| l.expect("line")).collect();
        assert_eq!(
            got,
            vec![
                (1, "a".to_string()),
                (2, "b".to_string()),
                (3, String::new()),
                (4, "c".to_string())
            ]
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_reported_and_skipped() {
        let lines = super::NumberedLines::new(Box::new(std::io::Cursor::new(
            b"ok\n\xff\xfe\nok again\n".to_vec(),
        )));
        let got: Vec<_> = lines.collect();
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[1], Err(e) if e.position == "line 2"));
        assert!(matches!(&got[2], Ok((3, t)) if t == "ok again"));
    }
}
