//! The retrieval data a model directory comes with: `retrieval.json` lists corpus files (paths
//! relative to the model directory) that are put into the store the first time the model is
//! used with it, each tagged with its file name and content hash, so a fresh machine answers
//! from real dialogue from its first start and an updated file is added again under a new tag.
//!
//! ```json
//! {"corpora": [
//!   {"path": "../../data/starter/chitchat_en.jsonl.gz", "format": "openai"},
//!   {"path": "../../data/starter/tanaka_ja_en.tsv.gz", "format": "sentences"}
//! ]}
//! ```
//!
//! `format` is any `kaiwa import` format (the dialogue becomes conversations in the store, and
//! retrievable pairs), or `sentences`: text or TSV whose every field is a sentence, indexed as
//! unpaired candidates only (they are not conversations and never reach a training export).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::corpus::import::Format;
use crate::corpus::ingest::{import_file, ImportOptions};
use crate::store::Store;

/// The manifest's file name in a model directory.
pub const MANIFEST: &str = "retrieval.json";
/// Sentences longer than this (in characters) are not indexed: they are not chat replies.
const MAX_SENTENCE_CHARS: usize = 140;

/// Errors loading a model's retrieval data.
#[derive(Debug, thiserror::Error)]
pub enum CorporaError {
    #[error("{path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("importing {path}: {source}")]
    Import {
        path: PathBuf,
        source: crate::corpus::ingest::IngestError,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    corpora: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    path: PathBuf,
    format: String,
}

/// What [`ensure_corpora`] did for one file.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusLoad {
    pub source: String,
    /// Messages or sentences added; 0 when the store already had the file.
    pub added: u64,
}

/// Puts every corpus of `model_dir`'s `retrieval.json` into `store` unless it is there already.
/// A model directory without the manifest has no retrieval data (nothing to do); a model home
/// (`kaiwa retrain`) gives its deployed version's.
pub async fn ensure_corpora(
    store: &Store,
    model_dir: &Path,
) -> Result<Vec<CorpusLoad>, CorporaError> {
    let model_dir = &crate::model::resolve_dir(model_dir);
    let path = model_dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let manifest_err = |reason: String| CorporaError::Manifest {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|source| CorporaError::Read {
        path: path.clone(),
        source,
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| manifest_err(e.to_string()))?;
    let mut loads = Vec::new();
    for entry in manifest.corpora {
        let file = model_dir.join(&entry.path);
        let source = source_tag(&file)?;
        if store.has_source(&source).await? {
            loads.push(CorpusLoad { source, added: 0 });
            continue;
        }
        let started = std::time::Instant::now();
        let added = if entry.format == "sentences" {
            let sentences = read_sentences(&file)?;
            store
                .add_sentences(&source, sentences.iter().map(String::as_str))
                .await?
        } else {
            let format = <Format as clap::ValueEnum>::from_str(&entry.format, true)
                .map_err(|e| manifest_err(format!("corpus {}: {e}", entry.path.display())))?;
            let options = ImportOptions {
                source: Some(source.clone()),
                ..ImportOptions::new(format)
            };
            import_file(store, &file, &options)
                .await
                .map_err(|source| CorporaError::Import {
                    path: file.clone(),
                    source,
                })?
                .messages
        };
        tracing::info!(
            source,
            added,
            seconds = started.elapsed().as_secs_f32(),
            "retrieval corpus added to the store"
        );
        loads.push(CorpusLoad { source, added });
    }
    Ok(loads)
}

/// `model:<file name>:<the first 12 hex digits of its SHA-256>`.
fn source_tag(file: &Path) -> Result<String, CorporaError> {
    let bytes = std::fs::read(file).map_err(|source| CorporaError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let hex = format!("{:x}", Sha256::digest(&bytes));
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(format!("model:{name}:{}", &hex[..12]))
}

/// Every tab-separated field of every line (`.gz` read compressed) as a sentence, without
/// repeats, quoted speech or sentences too long to be a chat reply.
fn read_sentences(file: &Path) -> Result<Vec<String>, CorporaError> {
    let reader = crate::dataset::open(file).map_err(|source| CorporaError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.map_err(|source| CorporaError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        for field in line.split('\t').map(str::trim) {
            let quoted = field.contains(['「', '」', '『', '』', '"']);
            if field.is_empty() || quoted || field.chars().count() > MAX_SENTENCE_CHARS {
                continue;
            }
            if seen.insert(field.to_string()) {
                out.push(field.to_string());
            }
        }
    }
    Ok(out)
}
