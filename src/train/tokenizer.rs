//! `kaiwa train-tokenizer`: a byte-level BPE tokenizer trained on a corpus, with Japanese
//! handling, and a report of how well it tokenizes held-out Japanese and English.
//!
//! Japanese handling is two things, both measured against a tokenizer trained without them:
//!
//! - **Balance.** A Japanese character is three UTF-8 bytes and needs two merges before it is
//!   one token, and the corpora that exist hold far more English than Japanese; trained on the
//!   raw mix, BPE spends its vocabulary on English. Japanese texts are repeated (at most 8×) until
//!   they are about half of the training bytes.
//! - **Chunks.** Japanese has no spaces, so GPT-2's pre-tokenizer hands BPE whole clauses; kaiwa
//!   first cuts Japanese into bunsetsu-like chunks ([`JAPANESE_CHUNKS`]) so merges learn words and
//!   their endings.
//!
//! Characters per token (higher is better: more text in the same context and compute) are
//! reported per language on texts held out from training (every 50th text by a stable hash, or
//! `--heldout FILE`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::bpe::{train_bpe, JAPANESE_CHUNKS};
use crate::dataset::{for_each_text, DatasetError};
use crate::model::chat_template::TokenizerConfig;
use crate::model::tokenizer::TextTokenizer;
use crate::model::{ModelError, TOKENIZER_FILE};
use crate::text::hash::stable_hash;
use crate::text::lang;

/// Settings of `kaiwa train-tokenizer`.
#[derive(Debug, Clone)]
pub struct TokenizerOptions {
    pub corpus: Vec<PathBuf>,
    pub vocab_size: usize,
    /// Held-out texts; default: every 50th corpus text, left out of training.
    pub heldout: Option<PathBuf>,
    /// Japanese handling (balance and chunks) for the tokenizer that is written.
    pub japanese: bool,
    /// Train at most this many bytes (a deterministic sample of the corpus).
    pub max_bytes: usize,
    /// Also train the tokenizers without Japanese handling, for the comparison in the report.
    pub compare: bool,
}

/// Errors of tokenizer training.
#[derive(Debug, thiserror::Error)]
pub enum TrainTokenizerError {
    #[error(transparent)]
    Text(#[from] DatasetError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the corpus has no text to train on")]
    Empty,
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held-out figures for one language.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LanguageFigures {
    pub texts: u64,
    pub chars: u64,
    pub tokens: u64,
    pub chars_per_token: f64,
}

/// One trained tokenizer and how it does on the held-out texts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variant {
    pub name: String,
    pub balanced: bool,
    pub japanese_chunks: bool,
    pub vocab_size: usize,
    pub heldout: BTreeMap<String, LanguageFigures>,
}

/// What `kaiwa train-tokenizer` did, also written as `tokenizer_report.json` / `.md`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenizerReport {
    /// Training bytes per language, before balancing.
    pub training_bytes: BTreeMap<String, u64>,
    /// How many times each Japanese text was repeated to balance the mix.
    pub japanese_repeat: usize,
    pub variants: Vec<Variant>,
    /// The variant written to `tokenizer.json`.
    pub written: String,
}

/// A text with its language.
struct Text {
    lang: &'static str,
    text: String,
}

/// Trains the tokenizer(s), writes `tokenizer.json`, `tokenizer_config.json` (ChatML template)
/// and the report into `out`.
pub fn train_tokenizer(
    options: &TokenizerOptions,
    out: &Path,
) -> Result<TokenizerReport, TrainTokenizerError> {
    let (train, heldout) = read_corpus(options)?;
    if train.is_empty() {
        return Err(TrainTokenizerError::Empty);
    }
    let mut training_bytes: BTreeMap<String, u64> = BTreeMap::new();
    for t in &train {
        *training_bytes.entry(t.lang.to_string()).or_default() += t.text.len() as u64;
    }
    let ja = training_bytes.get("ja").copied().unwrap_or(0);
    let other: u64 = training_bytes.values().sum::<u64>() - ja;
    let japanese_repeat = if ja == 0 {
        1
    } else {
        (other as f64 / ja as f64).round().clamp(1.0, 8.0) as usize
    };

    let mut wanted = vec![("kaiwa", true, true)];
    if options.compare {
        wanted.push(("balanced only", true, false));
        wanted.push(("plain", false, false));
    }
    if !options.japanese {
        wanted.retain(|w| w.0 == "plain");
        if wanted.is_empty() {
            wanted.push(("plain", false, false));
        }
    }
    let mut variants = Vec::new();
    let mut written = None;
    for (name, balanced, chunks) in wanted {
        let repeat = if balanced { japanese_repeat } else { 1 };
        let texts = train.iter().flat_map(|t| {
            let n = if t.lang == "ja" { repeat } else { 1 };
            std::iter::repeat_n(t.text.as_str(), n)
        });
        tracing::info!(variant = name, "training a tokenizer");
        let tokenizer = train_bpe(texts, options.vocab_size, chunks)?;
        variants.push(Variant {
            name: name.to_string(),
            balanced,
            japanese_chunks: chunks,
            vocab_size: tokenizer.vocab_size(),
            heldout: heldout_figures(&tokenizer, &heldout)?,
        });
        if written.is_none() {
            written = Some((name.to_string(), tokenizer));
        }
    }
    let (written, tokenizer) = written.expect("at least one variant is trained");

    let io = |path: PathBuf| move |source| TrainTokenizerError::Io { path, source };
    std::fs::create_dir_all(out).map_err(io(out.to_path_buf()))?;
    tokenizer.save(&out.join(TOKENIZER_FILE))?;
    TokenizerConfig::chatml().save(out)?;
    let report = TokenizerReport {
        training_bytes,
        japanese_repeat,
        variants,
        written,
    };
    let json = serde_json::to_string_pretty(&report).expect("the report serialises") + "\n";
    let path = out.join("tokenizer_report.json");
    std::fs::write(&path, json).map_err(io(path.clone()))?;
    let path = out.join("tokenizer_report.md");
    std::fs::write(&path, report_markdown(&report)).map_err(io(path.clone()))?;
    Ok(report)
}

/// The corpus texts, split into training and held-out ones, training sampled down to
/// `max_bytes` (deterministically, by a stable hash of each text).
fn read_corpus(o: &TokenizerOptions) -> Result<(Vec<Text>, Vec<Text>), TrainTokenizerError> {
    let mut all = Vec::new();
    for path in &o.corpus {
        for_each_text(path, |t| {
            all.push(Text {
                lang: lang::detect(t),
                text: t.to_string(),
            })
        })?;
    }
    let mut heldout = Vec::new();
    if let Some(path) = &o.heldout {
        for_each_text(path, |t| {
            heldout.push(Text {
                lang: lang::detect(t),
                text: t.to_string(),
            })
        })?;
    } else {
        let (h, rest): (Vec<Text>, Vec<Text>) = all
            .into_iter()
            .partition(|t| stable_hash(&["heldout", &t.text]).is_multiple_of(50));
        heldout = h;
        all = rest;
    }
    let total: usize = all.iter().map(|t| t.text.len()).sum();
    if total > o.max_bytes {
        let keep = o.max_bytes as f64 / total as f64;
        all.retain(|t| (stable_hash(&["sample", &t.text]) as f64 / u64::MAX as f64) < keep);
    }
    Ok((all, heldout))
}

fn heldout_figures(
    tokenizer: &TextTokenizer,
    heldout: &[Text],
) -> Result<BTreeMap<String, LanguageFigures>, ModelError> {
    let mut out: BTreeMap<String, LanguageFigures> = BTreeMap::new();
    for t in heldout {
        let f = out.entry(t.lang.to_string()).or_default();
        f.texts += 1;
        f.chars += t.text.chars().count() as u64;
        f.tokens += tokenizer.encode(&t.text, false)?.len() as u64;
    }
    for f in out.values_mut() {
        f.chars_per_token = f.chars as f64 / f.tokens.max(1) as f64;
    }
    Ok(out)
}

fn report_markdown(r: &TokenizerReport) -> String {
    let mut s = String::from("# Tokenizer report\n\n");
    s.push_str(&format!(
        "Written: `{}`. Training bytes per language: {:?}; Japanese texts repeated {}× when \
         balanced. Japanese chunks: `{JAPANESE_CHUNKS}`.\n\n",
        r.written, r.training_bytes, r.japanese_repeat
    ));
    s.push_str("Characters per token on held-out texts (higher is better):\n\n");
    s.push_str("| tokenizer | vocab | ja | en |\n|---|---:|---:|---:|\n");
    for v in &r.variants {
        let cpt = |l: &str| {
            v.heldout
                .get(l)
                .map(|f| format!("{:.2}", f.chars_per_token))
                .unwrap_or_else(|| "–".into())
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            v.name,
            v.vocab_size,
            cpt("ja"),
            cpt("en")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::bpe::builtin_text;

    #[test]
    fn japanese_is_cut_into_bunsetsu_like_chunks() {
        let re = regex::Regex::new(JAPANESE_CHUNKS).unwrap();
        let chunks: Vec<&str> = re
            .find_iter("今日は天気がいいですね。ラーメンを食べたい！OK")
            .map(|m| m.as_str())
            .collect();
        assert_eq!(
            chunks,
            ["今日は", "天気がいいですね", "ラーメンを", "食べたい"]
        );
    }

    #[test]
    fn trains_reports_both_languages_and_stays_lossless() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, builtin_text()).unwrap();
        let options = TokenizerOptions {
            corpus: vec![corpus],
            vocab_size: 1000,
            heldout: None,
            japanese: true,
            max_bytes: usize::MAX,
            compare: true,
        };
        let report = train_tokenizer(&options, &dir.path().join("tok")).unwrap();
        assert_eq!(report.written, "kaiwa");
        assert_eq!(report.variants.len(), 3);
        assert!(report.japanese_repeat >= 1);
        for v in &report.variants {
            for lang in ["ja", "en"] {
                let f = &v.heldout[lang];
                assert!(f.texts > 0 && f.chars_per_token > 0.5, "{v:?}");
            }
        }
        eprintln!("{}", report_markdown(&report));
        let tok = TextTokenizer::load(&dir.path().join("tok").join(TOKENIZER_FILE)).unwrap();
        let text = "今日の天気はどうですか？ 晴れです。Let's go 🍜";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert!(dir.path().join("tok/tokenizer_config.json").exists());
        assert!(
            std::fs::read_to_string(dir.path().join("tok/tokenizer_report.md"))
                .unwrap()
                .contains("| plain |")
        );
    }
}
