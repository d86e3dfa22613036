//! Dialogue derived from a Japanese–English sentence-pair corpus (`japanese<TAB>english`, one
//! pair a line: the Tanaka corpus of `data/starter/tanaka_ja_en.tsv.gz`), for the everyday
//! topics (weather, meals, trains, shopping, thanks) that the starter dialogue lacks in
//! Japanese. Two kinds, written to separate files so that a recipe weighs them apart:
//!
//! - **Written exchanges** ([`written_exchanges`]): pairs whose Japanese is nothing but two or
//!   more quoted turns (`「…」「…」`) and whose English quotes as many (`"…" "…"`). These are
//!   real dialogue, written by people, in both languages: `「君の鉛筆を使ってもよいですか」「ええ、どうぞ」`.
//! - **Retrieved replies** ([`retrieved_replies`]), synthetic: each question is paired with the
//!   statement that shares the most rare content with it: TF-IDF cosine over the English content
//!   words and the Japanese kanji/katakana bigrams of both sides of a pair, so the pairing is the
//!   same in both languages. `朝食に何を食べましたか。` → `君は、朝食を食べる必要がある。` is typical:
//!   on the topic, not an answer anyone wrote to that question. They are meant to teach a small
//!   model to stay on the user's topic; their replies are often non sequiturs, which is why they
//!   are kept out of the written exchanges' file and out of any validation split.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::ChatMessage;
use crate::text;

/// Errors deriving dialogue.
#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path} line {line}: {source}")]
    Line {
        path: PathBuf,
        line: usize,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Options(String),
}

/// One line of the sentence-pair file.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePair {
    /// 1-based line number in the file.
    pub line: usize,
    pub ja: String,
    pub en: String,
}

impl SentencePair {
    /// A question in either language.
    fn is_question(&self) -> bool {
        self.en.trim_end().ends_with('?') || self.ja.trim_end().ends_with(['？', '?'])
    }

    /// Quoted speech: a written exchange or a reported saying, not a plain sentence.
    fn is_quoted(&self) -> bool {
        self.ja.contains(['「', '」', '『', '』']) || self.en.contains('"')
    }

    /// A question that gets a retrieved reply.
    fn asks(&self) -> bool {
        self.is_question() && !self.is_quoted()
    }

    /// A statement that may be a retrieved reply.
    fn states(&self) -> bool {
        !self.is_question() && !self.is_quoted()
    }

    /// The sentence in `language` (`ja`, else English).
    fn text(&self, language: &str) -> &str {
        if language == "ja" {
            &self.ja
        } else {
            &self.en
        }
    }
}

/// The sentence pairs of `path` (`.gz` read compressed), and how many lines were not a pair
/// (not exactly two non-empty tab-separated fields) and were skipped.
pub fn read_pairs(path: &Path) -> Result<(Vec<SentencePair>, usize), DeriveError> {
    let reader = crate::dataset::open(path).map_err(|source| DeriveError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut pairs = Vec::new();
    let mut skipped = 0;
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| DeriveError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        let mut fields = line.split('\t');
        match (fields.next(), fields.next(), fields.next()) {
            (Some(ja), Some(en), None) if !ja.trim().is_empty() && !en.trim().is_empty() => {
                pairs.push(SentencePair {
                    line: i + 1,
                    ja: ja.trim().to_string(),
                    en: en.trim().to_string(),
                });
            }
            _ if line.trim().is_empty() => {}
            _ => skipped += 1,
        }
    }
    Ok((pairs, skipped))
}

/// A dialogue written inside one sentence pair: user, assistant, user, … with an even number of
/// turns (a trailing question without its answer is dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub line: usize,
    pub ja: Vec<String>,
    pub en: Vec<String>,
}

/// The quoted turns of a Japanese sentence made only of `「…」` quotes, with nothing but
/// whitespace between them; `None` for anything else.
fn japanese_turns(ja: &str) -> Option<Vec<String>> {
    let mut turns = Vec::new();
    let mut rest = ja.trim();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('「')?;
        let end = inner.find('」')?;
        let turn = &inner[..end];
        if turn.contains('「') || turn.trim().is_empty() {
            return None;
        }
        turns.push(turn.trim().to_string());
        rest = inner[end + '」'.len_utf8()..].trim_start();
    }
    Some(turns)
}

/// The `"…"` quotes of an English sentence, in order; `None` if its quote marks are unpaired.
fn english_turns(en: &str) -> Option<Vec<String>> {
    let parts: Vec<&str> = en.split('"').collect();
    if parts.len().is_multiple_of(2) {
        return None;
    }
    let turns: Vec<String> = parts
        .iter()
        .skip(1)
        .step_by(2)
        .map(|t| t.trim().to_string())
        .collect();
    (!turns.iter().any(String::is_empty)).then_some(turns)
}

/// The dialogues written inside the sentence pairs, in file order.
pub fn written_exchanges(pairs: &[SentencePair]) -> Vec<Exchange> {
    pairs
        .iter()
        .filter_map(|p| {
            let ja = japanese_turns(&p.ja)?;
            let en = english_turns(&p.en)?;
            if ja.len() < 2 || ja.len() != en.len() {
                return None;
            }
            let even = ja.len() / 2 * 2;
            Some(Exchange {
                line: p.line,
                ja: ja[..even].to_vec(),
                en: en[..even].to_vec(),
            })
        })
        .collect()
}

/// How questions are paired with statements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrievalOptions {
    /// The least cosine similarity a reply needs.
    pub min_score: f64,
    /// Statements at least this similar are near-copies of the question, not replies.
    pub max_score: f64,
    /// How many questions one statement may answer.
    pub max_reuse: usize,
    /// Features in more than this fraction of the pairs are too common to tell topics apart.
    pub max_df_fraction: f64,
}

impl Default for RetrievalOptions {
    fn default() -> Self {
        RetrievalOptions {
            min_score: 0.3,
            max_score: 0.85,
            max_reuse: 2,
            max_df_fraction: 0.02,
        }
    }
}

/// A question and the statement chosen as its reply: indices into the pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reply {
    pub question: usize,
    pub answer: usize,
    pub score: f64,
}

/// A pair's topic features: its English content words (lower case, three letters or more, no
/// stop words) and the bigrams of its Japanese kanji/katakana runs (a lone character as itself).
fn features(pair: &SentencePair) -> Vec<String> {
    let mut out: Vec<String> = text::english_words(&pair.en, 3).collect();
    text::japanese_content_bigrams(&pair.ja, &mut out);
    out.sort();
    out.dedup();
    out
}

/// Pairs each question (a pair whose English ends in `?` or whose Japanese ends in `？`, not
/// quoted speech) with the most similar statement (not a question, not quoted), in file order;
/// ties go to the earlier statement. Deterministic.
pub fn retrieved_replies(
    pairs: &[SentencePair],
    options: &RetrievalOptions,
) -> Result<Vec<Reply>, DeriveError> {
    if !(0.0..=1.0).contains(&options.min_score) || options.min_score > options.max_score {
        return Err(DeriveError::Options(format!(
            "the scores must satisfy 0 <= min ({}) <= max ({}) and min <= 1",
            options.min_score, options.max_score
        )));
    }
    if options.max_reuse == 0 {
        return Err(DeriveError::Options(
            "--max-reuse must be at least 1".into(),
        ));
    }
    let n = pairs.len();
    let mut ids: HashMap<String, u32> = HashMap::new();
    let docs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| {
            let mut f: Vec<u32> = features(p)
                .into_iter()
                .map(|s| {
                    let next = ids.len() as u32;
                    *ids.entry(s).or_insert(next)
                })
                .collect();
            f.sort_unstable();
            f
        })
        .collect();
    let mut df = vec![0u32; ids.len()];
    for f in docs.iter().flatten() {
        df[*f as usize] += 1;
    }
    let max_df = (options.max_df_fraction * n as f64).max(1.0);
    // Squared IDF, the weight a shared feature adds to a dot product; common features are
    // dropped from both the products and the norms.
    let weight: Vec<f64> = df
        .iter()
        .map(|&d| {
            if f64::from(d) > max_df {
                0.0
            } else {
                (n as f64 / (1.0 + f64::from(d))).ln().max(0.0).powi(2)
            }
        })
        .collect();
    let norm: Vec<f64> = docs
        .iter()
        .map(|f| f.iter().map(|&x| weight[x as usize]).sum::<f64>().sqrt())
        .collect();
    let answerable: Vec<bool> = pairs.iter().map(SentencePair::states).collect();
    let mut postings: Vec<Vec<u32>> = vec![Vec::new(); ids.len()];
    for (i, f) in docs.iter().enumerate() {
        if answerable[i] {
            for &x in f {
                if weight[x as usize] > 0.0 {
                    postings[x as usize].push(i as u32);
                }
            }
        }
    }
    let mut uses = vec![0usize; n];
    let mut score = vec![0f64; n];
    let mut touched: Vec<u32> = Vec::new();
    let mut replies = Vec::new();
    for (q, pair) in pairs.iter().enumerate() {
        if !pair.asks() || norm[q] == 0.0 {
            continue;
        }
        for &x in &docs[q] {
            for &j in &postings[x as usize] {
                if score[j as usize] == 0.0 {
                    touched.push(j);
                }
                score[j as usize] += weight[x as usize];
            }
        }
        let mut best: Option<(f64, usize)> = None;
        for &j in &touched {
            let j = j as usize;
            let cosine = score[j] / (norm[q] * norm[j]);
            score[j] = 0.0;
            if cosine > options.max_score || uses[j] >= options.max_reuse || pairs[j].ja == pair.ja
            {
                continue;
            }
            let better = match best {
                None => true,
                Some((s, b)) => cosine > s || (cosine == s && j < b),
            };
            if better {
                best = Some((cosine, j));
            }
        }
        touched.clear();
        if let Some((cosine, answer)) = best.filter(|(s, _)| *s >= options.min_score) {
            uses[answer] += 1;
            replies.push(Reply {
                question: q,
                answer,
                score: cosine,
            });
        }
    }
    Ok(replies)
}

/// What [`derive`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeriveSummary {
    pub source: String,
    pub pairs: usize,
    pub skipped_lines: usize,
    pub written_exchanges: usize,
    pub retrieved_replies: usize,
    pub questions: usize,
    pub retrieval: RetrievalOptions,
    pub system: Option<String>,
    pub files: Vec<String>,
}

#[derive(Serialize)]
struct Meta<'a> {
    id: String,
    source: &'a str,
    language: &'a str,
    kind: &'a str,
    lines: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f64>,
}

#[derive(Serialize)]
struct Line<'a> {
    messages: Vec<ChatMessage>,
    meta: Meta<'a>,
}

/// `turns` as user, assistant, user, … after the system prompt, if any.
fn conversation<'a>(system: Option<&str>, turns: &[&str], meta: Meta<'a>) -> Line<'a> {
    let mut messages: Vec<ChatMessage> = system.map(ChatMessage::system).into_iter().collect();
    messages.extend(turns.iter().enumerate().map(|(i, content)| {
        ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, *content)
    }));
    Line { messages, meta }
}

fn write_jsonl(path: &Path, lines: &[Line]) -> Result<(), DeriveError> {
    let io = |source| DeriveError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    for line in lines {
        serde_json::to_writer(&mut out, line).map_err(|e| io(e.into()))?;
        out.write_all(b"\n").map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Derives both kinds of dialogue from the sentence-pair file `source` and writes them to
/// `out`: `exchanges_ja.jsonl`, `exchanges_en.jsonl`, `replies_ja.jsonl`, `replies_en.jsonl`
/// (OpenAI `messages` JSONL with a `meta` object, under the system prompt `system` if given)
/// and `summary.json`.
pub fn derive(
    source: &Path,
    out: &Path,
    options: &RetrievalOptions,
    system: Option<&str>,
) -> Result<DeriveSummary, DeriveError> {
    let (pairs, skipped_lines) = read_pairs(source)?;
    let exchanges = written_exchanges(&pairs);
    let replies = retrieved_replies(&pairs, options)?;
    std::fs::create_dir_all(out).map_err(|source| DeriveError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let tag = format!(
        "derived:{}",
        source.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut files = Vec::new();
    for language in ["ja", "en"] {
        let written: Vec<Line> = exchanges
            .iter()
            .map(|e| {
                let turns = if language == "ja" { &e.ja } else { &e.en };
                let turns: Vec<&str> = turns.iter().map(String::as_str).collect();
                let meta = Meta {
                    id: format!("exchange-{language}-{}", e.line),
                    source: &tag,
                    language,
                    kind: "written exchange",
                    lines: vec![e.line],
                    score: None,
                };
                conversation(system, &turns, meta)
            })
            .collect();
        let name = format!("exchanges_{language}.jsonl");
        write_jsonl(&out.join(&name), &written)?;
        files.push(name);

        let retrieved: Vec<Line> = replies
            .iter()
            .map(|r| {
                let (q, a) = (&pairs[r.question], &pairs[r.answer]);
                let (lq, la) = (q.line, a.line);
                let meta = Meta {
                    id: format!("reply-{language}-{lq}-{la}"),
                    source: &tag,
                    language,
                    kind: "retrieved reply",
                    lines: vec![lq, la],
                    score: Some((r.score * 1e4).round() / 1e4),
                };
                conversation(system, &[q.text(language), a.text(language)], meta)
            })
            .collect();
        let name = format!("replies_{language}.jsonl");
        write_jsonl(&out.join(&name), &retrieved)?;
        files.push(name);
    }
    let summary = DeriveSummary {
        source: source.display().to_string(),
        pairs: pairs.len(),
        skipped_lines,
        written_exchanges: exchanges.len(),
        retrieved_replies: replies.len(),
        questions: pairs.iter().filter(|p| p.asks()).count(),
        retrieval: options.clone(),
        system: system.map(str::to_string),
        files,
    };
    let path = out.join("summary.json");
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| DeriveError::Write {
        path: path.clone(),
        source: e.into(),
    })?;
    std::fs::write(&path, json).map_err(|source| DeriveError::Write { path, source })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(lines: &[(&str, &str)]) -> Vec<SentencePair> {
        lines
            .iter()
            .enumerate()
            .map(|(i, (ja, en))| SentencePair {
                line: i + 1,
                ja: ja.to_string(),
                en: en.to_string(),
            })
            .collect()
    }

    #[test]
    fn quoted_turns_in_both_languages_make_an_exchange() {
        let p = pairs(&[
            (
                "「ありがとう」「どう致しまして」",
                "\"Thank you.\" \"You're welcome.\"",
            ),
            // Three turns: the last question has no answer and is dropped.
            (
                "「行く？」 「うん」「いつ？」",
                "\"Going?\" \"Yes.\" \"When?\"",
            ),
            // Text outside the quotes: a reported saying, not an exchange.
            (
                "彼は「はい」と言った。「いいえ」",
                "He said \"yes\". \"No\"",
            ),
            // The English quotes another number of turns.
            ("「はい」「いいえ」", "\"Yes or no?\""),
            // One turn only.
            ("「はい」", "\"Yes.\""),
            // Unpaired quote mark.
            ("「はい」「いいえ」", "\"Yes.\" \"No."),
            ("猫が好きです。", "I like cats."),
        ]);
        assert_eq!(
            written_exchanges(&p),
            vec![
                Exchange {
                    line: 1,
                    ja: vec!["ありがとう".into(), "どう致しまして".into()],
                    en: vec!["Thank you.".into(), "You're welcome.".into()],
                },
                Exchange {
                    line: 2,
                    ja: vec!["行く？".into(), "うん".into()],
                    en: vec!["Going?".into(), "Yes.".into()],
                },
            ]
        );
    }

    /// A corpus where the weather question has one good reply and the other lines are filler
    /// (enough of them that the shared words are rare).
    fn weather_corpus() -> Vec<(String, String)> {
        let mut lines: Vec<(String, String)> = vec![
            (
                "今日の天気はどうですか。".into(),
                "What's the weather like today?".into(),
            ),
            (
                "好きな果物は何ですか。".into(),
                "What fruit do you like?".into(),
            ),
            (
                "今日は天気が悪い。".into(),
                "The weather is bad today.".into(),
            ),
            (
                "私は林檎の果物が好きです。".into(),
                "Apples are my favourite fruit.".into(),
            ),
            (
                "今日の天気はどうですか？".into(),
                "What's the weather like today?".into(),
            ),
            (
                "宇宙船は何色ですか。".into(),
                "What colour is the spaceship?".into(),
            ),
        ];
        for i in 0..200 {
            lines.push((
                format!("番号{i}の箱です。"),
                format!("This is box number{i}."),
            ));
        }
        lines
    }

    fn as_pairs(lines: &[(String, String)]) -> Vec<SentencePair> {
        let refs: Vec<(&str, &str)> = lines.iter().map(|(a, b)| (&a[..], &b[..])).collect();
        pairs(&refs)
    }

    #[test]
    fn each_question_gets_the_statement_that_shares_its_topic() {
        let p = as_pairs(&weather_corpus());
        let options = RetrievalOptions {
            max_reuse: 1,
            ..RetrievalOptions::default()
        };
        let replies = retrieved_replies(&p, &options).unwrap();
        let found: Vec<(usize, usize)> = replies.iter().map(|r| (r.question, r.answer)).collect();
        // The weather question takes the forecast, the fruit question the apples; the second
        // weather question finds the forecast used up (max_reuse 1) and nothing else on topic;
        // the spaceship question shares nothing. Questions are never replies.
        assert_eq!(found, vec![(0, 2), (1, 3)]);
        assert!(replies.iter().all(|r| r.score >= 0.3 && r.score <= 0.85));

        let twice = retrieved_replies(&p, &RetrievalOptions::default()).unwrap();
        let found: Vec<(usize, usize)> = twice.iter().map(|r| (r.question, r.answer)).collect();
        assert_eq!(found, vec![(0, 2), (1, 3), (4, 2)]);
    }

    #[test]
    fn near_copies_and_weak_matches_are_not_replies() {
        let mut lines = weather_corpus();
        // A statement almost identical to the question.
        lines[2] = (
            "今日の天気はどうですか".into(),
            "The weather like today".into(),
        );
        let p = as_pairs(&lines);
        let replies = retrieved_replies(&p, &RetrievalOptions::default()).unwrap();
        assert!(replies.iter().all(|r| r.answer != 2), "{replies:?}");

        let strict = RetrievalOptions {
            min_score: 0.99,
            max_score: 1.0,
            ..RetrievalOptions::default()
        };
        let p = as_pairs(&weather_corpus());
        assert!(retrieved_replies(&p, &strict).unwrap().is_empty());
        let bad = RetrievalOptions {
            max_reuse: 0,
            ..RetrievalOptions::default()
        };
        assert!(matches!(
            retrieved_replies(&p, &bad),
            Err(DeriveError::Options(_))
        ));
    }

    #[test]
    fn quoted_speech_and_questions_are_never_replies() {
        let corpus = |statement: (&str, &str)| {
            let mut lines: Vec<(String, String)> = [
                ("今日の天気はどうですか。", "What's the weather like today?"),
                statement,
                ("今日は天気が悪いですか。", "Is the weather bad today?"),
            ]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
            lines.extend(weather_corpus().into_iter().skip(6));
            as_pairs(&lines)
        };
        let found = |p: &[SentencePair]| -> Vec<(usize, usize)> {
            retrieved_replies(p, &RetrievalOptions::default())
                .unwrap()
                .iter()
                .map(|r| (r.question, r.answer))
                .collect()
        };
        let quoted = corpus((
            "彼は「今日は天気が悪い」と言った。",
            "He said, \"The weather is bad today.\"",
        ));
        assert_eq!(found(&quoted), []);
        // Unquoted, the statement answers the first question; the second question is a
        // near-copy of it (all its features shared) and gets nothing.
        let plain = corpus(("今日は天気が悪い。", "The weather is bad today."));
        assert_eq!(found(&plain), [(0, 1)]);
    }

    #[test]
    fn features_are_english_content_words_and_japanese_content_bigrams() {
        let p = SentencePair {
            line: 1,
            ja: "明日は雨が降るでしょう。".into(),
            en: "It will rain tomorrow, won't it?".into(),
        };
        assert_eq!(features(&p), ["rain", "tomorrow", "明日", "降", "雨"]);
    }

    #[test]
    fn derive_writes_both_kinds_in_both_languages_as_chat_files() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("pairs.tsv");
        let mut text = String::new();
        for (ja, en) in weather_corpus() {
            text.push_str(&format!("{ja}\t{en}\n"));
        }
        text.push_str("「ありがとう」「どう致しまして」\t\"Thank you.\" \"You're welcome.\"\n");
        text.push_str("a line without a tab\n\n");
        std::fs::write(&source, text).unwrap();
        let out = dir.path().join("out");
        let summary = derive(
            &source,
            &out,
            &RetrievalOptions::default(),
            Some("Be kind."),
        )
        .unwrap();
        assert_eq!(summary.pairs, 207);
        assert_eq!(summary.skipped_lines, 1);
        assert_eq!(summary.written_exchanges, 1);
        assert_eq!(summary.retrieved_replies, 3);
        assert_eq!(summary.questions, 4);

        let read = |name: &str| {
            crate::dataset::Dataset::read(&out.join(name), None)
                .unwrap()
                .examples
        };
        let ja = read("exchanges_ja.jsonl");
        assert_eq!(ja.len(), 1);
        let crate::dataset::ExampleContent::Chat(messages) = &ja[0].content else {
            panic!("not chat")
        };
        let turns: Vec<(&str, &str)> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            turns,
            [
                ("system", "Be kind."),
                ("user", "ありがとう"),
                ("assistant", "どう致しまして")
            ]
        );
        assert_eq!(ja[0].language.as_deref(), Some("ja"));
        let en = read("replies_en.jsonl");
        assert_eq!(en.len(), 3);
        let crate::dataset::ExampleContent::Chat(messages) = &en[0].content else {
            panic!("not chat")
        };
        assert_eq!(messages[1].content, "What's the weather like today?");
        assert_eq!(messages[2].content, "The weather is bad today.");
        assert_eq!(read("replies_ja.jsonl").len(), 3);
        assert_eq!(read("exchanges_en.jsonl").len(), 1);
        assert!(out.join("summary.json").exists());
    }
}
