//! The texts of a corpus file, whatever its format: what `kaiwa export-corpus` writes (OpenAI
//! `messages` or ShareGPT JSONL, plain text), the starter corpus (`data/starter/*.jsonl.gz`, the
//! Tanaka `*.tsv.gz` sentence pairs), or any UTF-8 text. `.gz` files are read compressed.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Errors reading a corpus file.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Malformed {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Opens a file, decompressing `.gz`.
pub fn open(path: &Path) -> Result<Box<dyn BufRead + Send>, TextError> {
    let file = std::fs::File::open(path).map_err(|source| TextError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let reader: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 16, reader)))
}

/// Calls `each` with every text of a corpus file: each message's content in a JSONL chat file,
/// each field of a `.tsv` line, each non-empty line of any other file.
pub fn for_each_text(path: &Path, mut each: impl FnMut(&str)) -> Result<(), TextError> {
    let name = path.display().to_string();
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gz").to_string())
        .unwrap_or_default();
    let jsonl = stem.ends_with(".jsonl") || stem.ends_with(".json");
    let tsv = stem.ends_with(".tsv");
    for (i, line) in open(path)?.lines().enumerate() {
        let line = line.map_err(|source| TextError::Io {
            path: name.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| TextError::Malformed {
                    path: name.clone(),
                    line: i + 1,
                    reason: e.to_string(),
                })?;
            for turn in chat_turns(&v) {
                each(turn);
            }
        } else if tsv {
            line.split('\t')
                .filter(|f| !f.trim().is_empty())
                .for_each(&mut each);
        } else {
            each(&line);
        }
    }
    Ok(())
}

/// The contents of an OpenAI (`messages` / `content`) or ShareGPT (`conversations` / `value`)
/// example, or the `text` of a `{"text": …}` line.
fn chat_turns(v: &serde_json::Value) -> Vec<&str> {
    if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
        return vec![t];
    }
    let (list, field) = match (v.get("messages"), v.get("conversations")) {
        (Some(m), _) => (m, "content"),
        (None, Some(c)) => (c, "value"),
        _ => return Vec::new(),
    };
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.get(field).and_then(|c| c.as_str()))
                .collect()
        })
        .unwrap_or_default()
}
