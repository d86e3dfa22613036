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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

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
        assert!(err.contains("bad.jsonl line 1"), "{err}");
        let missing = for_each_text(&dir.path().join("none.txt"), |_| {}).unwrap_err();
        assert!(missing.to_string().contains("none.txt"));
    }
}
