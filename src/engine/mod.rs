//! The reply engine: what the bot, `kaiwa chat` and `kaiwa eval` answer with, so what the suite
//! measures is what users get.
//!
//! A reply is chosen among candidates, after XiaoIce (Zhou et al. 2020) and ChatterBot's
//! BestMatch: replies people wrote to messages like the user's (retrieved *pairs*), corpus
//! sentences on the user's topic (retrieved *sentences*, XiaoIce's unpaired data), and a few
//! sampled generations of the model. The [`rank`] module scores each against the conversation
//! (retrieval similarity, the model's likelihood of it after the conversation against its
//! likelihood after an empty message — MMI, Li et al. 2016 — feedback, length) after screening
//! out what must never be sent (the wrong language, an echo of the user, a repeat of the bot,
//! degenerate text). When nothing is good enough the engine says so in the user's language.
//!
//! Retrieval reads the store (async); generation and scoring run the model (blocking), so a
//! reply is two calls: [`ReplyEngine::retrieve`], then [`ReplyEngine::reply`] on a blocking
//! thread. The engine knows nothing about platforms.

pub mod corpora;
pub mod rank;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;

use crate::model::{ChatMessage, GenerateOptions, Generator, ModelError, StopReason};
use crate::store::{DocKind, Feedback, SharePolicy, Store, StoreError};
use crate::text::lang;
use crate::text::{is_weak_term, retrieval_terms};
pub use rank::{Rejection, Scores, Weights};

/// Query terms at most, the rarest first.
const MAX_QUERY_TERMS: usize = 16;
/// Postings (docs per term, summed over the terms searched for) one search reads at most; the
/// rarest term is searched for even when it alone has more.
const MAX_POSTINGS: i64 = 40_000;
/// Terms in at most this many docs are always searched for, however large the share of the
/// index (a small index is cheap to search whole).
const ALWAYS_SEARCHED_DF: i64 = 1_000;
/// Document frequencies remembered.
const FREQUENCY_CACHE: usize = 200_000;
/// Unconditional likelihoods remembered (they depend on the candidate alone).
const UNCONDITIONAL_CACHE: usize = 50_000;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Settings(String),
}

/// How replies are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineMode {
    /// Retrieve, generate and rank (the default).
    Hybrid,
    /// The model's sampled reply alone, as kaiwa did before the engine.
    Generate,
}

impl EngineMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineMode::Hybrid => "hybrid",
            EngineMode::Generate => "generate",
        }
    }
}

impl FromStr for EngineMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hybrid" => Ok(EngineMode::Hybrid),
            "generate" => Ok(EngineMode::Generate),
            other => Err(format!("expected hybrid or generate, got {other:?}")),
        }
    }
}

/// Where a reply came from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ReplySource {
    /// A reply a person wrote to a message like the user's.
    Pair,
    /// A corpus sentence on the user's topic.
    Sentence,
    /// The model's own text.
    Generated,
    /// Nothing was good enough: the engine said so.
    Fallback,
}

impl ReplySource {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplySource::Pair => "pair",
            ReplySource::Sentence => "sentence",
            ReplySource::Generated => "generated",
            ReplySource::Fallback => "fallback",
        }
    }

    /// How the reply row records it: `retrieved`, `generated` or `fallback`.
    pub fn provenance(self) -> &'static str {
        match self {
            ReplySource::Pair | ReplySource::Sentence => "retrieved",
            ReplySource::Generated => "generated",
            ReplySource::Fallback => "fallback",
        }
    }
}

impl From<DocKind> for ReplySource {
    fn from(k: DocKind) -> Self {
        match k {
            DocKind::Pair => ReplySource::Pair,
            DocKind::Sentence => ReplySource::Sentence,
        }
    }
}

/// The default [`EngineSettings::generate_below`]: see `research/README.md`, "Generating only
/// when retrieval has nothing good".
pub const GENERATE_BELOW: f64 = 1.0;

/// The engine's settings (`REPLY_ENGINE` and the ranker's knobs, documented in `.env.example`).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub mode: EngineMode,
    /// Retrieved pairs considered.
    pub pairs: usize,
    /// Retrieved sentences considered.
    pub sentences: usize,
    /// Sampled generations considered (hybrid mode).
    pub generated: usize,
    /// The longest generated candidate, in tokens (hybrid mode).
    pub generated_max_tokens: usize,
    /// Hybrid mode generates only when no retrieved candidate reaches this score by the cheap
    /// features (`f64::INFINITY`: always): the model writes when retrieval has nothing good.
    pub generate_below: f64,
    /// Candidates, best by the cheap scores first, that the model scores.
    pub scored: usize,
    /// Query terms found in more than this share of the index are not searched for.
    pub max_df_fraction: f64,
    pub weights: Weights,
    /// Which live channels may be retrieved from.
    pub share: SharePolicy,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            mode: EngineMode::Hybrid,
            pairs: 24,
            sentences: 24,
            generated: 1,
            generated_max_tokens: 32,
            generate_below: GENERATE_BELOW,
            scored: 2,
            max_df_fraction: 0.05,
            weights: Weights::default(),
            share: SharePolicy::default(),
        }
    }
}

impl EngineSettings {
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.mode == EngineMode::Hybrid && self.pairs + self.sentences + self.generated == 0 {
            return Err(EngineError::Settings(
                "the hybrid engine needs candidates: retrieved pairs, sentences or generations"
                    .into(),
            ));
        }
        if !(self.max_df_fraction > 0.0 && self.max_df_fraction <= 1.0) {
            return Err(EngineError::Settings(format!(
                "max_df_fraction must be in (0, 1], got {}",
                self.max_df_fraction
            )));
        }
        self.weights.validate().map_err(EngineError::Settings)
    }
}

/// A possible reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub text: String,
    pub source: ReplySource,
    /// The retrieval doc, and its reply's row in `messages` for a pair.
    pub doc: Option<i64>,
    pub message: Option<i64>,
    /// The candidate's retrieval terms.
    pub terms: Vec<String>,
    /// The retrieval terms of the message a pair's reply answered (empty for other sources).
    pub matched_terms: Vec<String>,
    pub feedback: Feedback,
    /// The language the index recorded for a retrieved candidate (detected when it was indexed
    /// and when its text was edited); `None` for the model's, which are detected when screened.
    pub language: Option<String>,
}

/// What retrieval found for one message: the candidates, and the inverse document frequencies
/// of their terms and the query's.
#[derive(Debug, Clone, Default)]
pub struct Retrieval {
    pub candidates: Vec<Candidate>,
    pub query: Vec<String>,
    idf: HashMap<String, f64>,
    /// Docs in the index (for terms not in `idf`).
    docs: i64,
}

/// How much a weak term ([`is_weak_term`]: a hiragana bigram, a word of time) counts beside a
/// content term of the same document frequency when texts are compared.
const WEAK_TERM_WEIGHT: f64 = 0.5;

impl Retrieval {
    /// The inverse document frequency of a term: `ln(1 + N / (df + 1))`.
    pub fn idf(&self, term: &str) -> f64 {
        self.idf
            .get(term)
            .copied()
            .unwrap_or_else(|| (1.0 + self.docs as f64).ln())
    }

    /// A term's weight when texts are compared: its [`Retrieval::idf`], less for weak terms.
    pub fn weight(&self, term: &str) -> f64 {
        let w = self.idf(term);
        if is_weak_term(term) {
            w * WEAK_TERM_WEIGHT
        } else {
            w
        }
    }
}

/// What a reply answers.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The conversation as the model sees it (system prompt, turns), ending with the user's.
    pub messages: &'a [ChatMessage],
    /// The text of the message being answered, as its author wrote it.
    pub user_text: &'a str,
    /// What the bot said lately in this conversation, newest last: never said again.
    pub recent_replies: &'a [String],
    /// Sampling settings for generated candidates.
    pub options: &'a GenerateOptions,
}

/// A candidate with its scores, or why it was screened out.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ranked {
    pub text: String,
    pub source: ReplySource,
    pub doc: Option<i64>,
    pub scores: Scores,
    pub rejected: Option<Rejection>,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub source: ReplySource,
    pub doc: Option<i64>,
    pub message: Option<i64>,
    pub scores: Scores,
    /// Every candidate, best first, the rejected ones last.
    pub ranked: Vec<Ranked>,
    /// Tokens the model read and wrote for generated candidates.
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// The caller asked to stop (shutdown).
    pub cancelled: bool,
}

/// The reply engine. Share it with `Arc`; it caches what does not depend on the conversation.
#[derive(Debug)]
pub struct ReplyEngine {
    settings: EngineSettings,
    /// The model's mean log-probability of a candidate after an empty message, by model
    /// directory and text.
    unconditional: Mutex<HashMap<(String, String), f64>>,
    frequencies: Mutex<Frequencies>,
}

/// Cached document frequencies (see [`ReplyEngine::frequencies`]).
#[derive(Debug, Default)]
struct Frequencies {
    /// Docs in the index when the cache was filled.
    docs: i64,
    terms: HashMap<String, i64>,
}

impl ReplyEngine {
    /// An engine with `settings` (checked with [`EngineSettings::validate`] where they are
    /// read).
    pub fn new(settings: EngineSettings) -> Self {
        ReplyEngine {
            settings,
            unconditional: Mutex::new(HashMap::new()),
            frequencies: Mutex::new(Frequencies::default()),
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Retrieves candidates for `user_text` from `store` (nothing in generate mode).
    pub async fn retrieve(&self, store: &Store, user_text: &str) -> Result<Retrieval, EngineError> {
        let s = &self.settings;
        if s.mode == EngineMode::Generate || s.pairs + s.sentences == 0 {
            return Ok(Retrieval::default());
        }
        let query = retrieval_terms(user_text);
        let (df, docs) = self.frequencies(store, &query).await?;
        // Search for the rarest terms that say what the message is about; weak ones ("です",
        // "tomorrow") are searched only when there is nothing else. They still count in the
        // similarity.
        let content = query.iter().any(|t| !is_weak_term(t) && df.contains_key(t));
        let mut searched: Vec<(&String, i64)> = query
            .iter()
            .filter(|t| !(content && is_weak_term(t)))
            .filter_map(|t| df.get(t).map(|&n| (t, n)))
            .collect();
        searched.sort_by_key(|&(t, n)| (n, t.clone()));
        let common = ((s.max_df_fraction * docs as f64) as i64).max(ALWAYS_SEARCHED_DF);
        // Rarest first, within a budget of postings: the cost of a search follows the postings
        // read, so it stays bounded however large the index grows.
        let mut postings = 0;
        let rare: Vec<String> = searched
            .iter()
            .filter(|&&(_, n)| n <= common)
            .take_while(|&&(_, n)| {
                postings += n;
                postings <= MAX_POSTINGS || postings == n
            })
            .map(|(t, _)| (*t).clone())
            .take(MAX_QUERY_TERMS)
            .collect();
        let terms = if rare.is_empty() {
            // Only common terms: search for the two rarest of them.
            searched.iter().take(2).map(|(t, _)| (*t).clone()).collect()
        } else {
            rare
        };
        // Pairs and sentences are searched at once, on two of the store's connections.
        let (mut found, sentences) = tokio::try_join!(
            store.retrieve(DocKind::Pair, &terms, s.share, s.pairs),
            store.retrieve(DocKind::Sentence, &terms, s.share, s.sentences),
        )?;
        found.extend(sentences);
        let feedback = store
            .doc_feedback(&found.iter().map(|r| r.doc).collect::<Vec<_>>())
            .await?;
        let candidates: Vec<Candidate> = found
            .into_iter()
            .map(|r| {
                let source = ReplySource::from(r.kind);
                let matched_terms = match source {
                    ReplySource::Pair => retrieval_terms(&r.matched),
                    _ => Vec::new(),
                };
                Candidate {
                    feedback: feedback.get(&r.doc).copied().unwrap_or_default(),
                    language: Some(r.language),
                    source,
                    doc: Some(r.doc),
                    message: r.message,
                    terms: retrieval_terms(&r.text),
                    matched_terms,
                    text: r.text,
                }
            })
            .collect();
        let mut all_terms: Vec<String> = query.clone();
        for c in &candidates {
            all_terms.extend(c.terms.iter().chain(&c.matched_terms).cloned());
        }
        all_terms.sort();
        all_terms.dedup();
        let (df, docs) = self.frequencies(store, &all_terms).await?;
        let idf = all_terms
            .into_iter()
            .map(|t| {
                let n = df.get(&t).copied().unwrap_or(0);
                let w = (1.0 + docs as f64 / (n as f64 + 1.0)).ln();
                (t, w)
            })
            .collect();
        Ok(Retrieval {
            candidates,
            query,
            idf,
            docs,
        })
    }

    /// Document frequencies of `terms` and the docs in the index, from the cache where it can:
    /// counting a common term's docs reads its whole posting list, and frequencies move slowly,
    /// so the cache is dropped only when the index has grown or shrunk by 1 %.
    async fn frequencies(
        &self,
        store: &Store,
        terms: &[String],
    ) -> Result<(HashMap<String, i64>, i64), EngineError> {
        let missing: Vec<String> = {
            let cache = self.frequencies.lock().unwrap_or_else(|e| e.into_inner());
            terms
                .iter()
                .filter(|t| !cache.terms.contains_key(*t))
                .cloned()
                .collect()
        };
        let (mut fresh, docs) = store.term_frequencies(&missing).await?;
        let stale = {
            let cache = self.frequencies.lock().unwrap_or_else(|e| e.into_inner());
            (docs - cache.docs).abs() * 100 > cache.docs || cache.terms.len() > FREQUENCY_CACHE
        };
        let counted = if stale && missing.len() < terms.len() {
            // The cached counts are out of date: count every term afresh.
            fresh = store.term_frequencies(terms).await?.0;
            terms
        } else {
            &missing[..]
        };
        let mut cache = self.frequencies.lock().unwrap_or_else(|e| e.into_inner());
        if stale {
            cache.terms.clear();
            cache.docs = docs;
        }
        for t in counted {
            cache
                .terms
                .insert(t.clone(), fresh.get(t).copied().unwrap_or(0));
        }
        let df = terms
            .iter()
            .filter_map(|t| {
                let n = cache.terms.get(t).copied().unwrap_or(0);
                (n > 0).then(|| (t.clone(), n))
            })
            .collect();
        Ok((df, docs))
    }

    /// Generates candidates, ranks them with what `retrieval` found and returns the best (a
    /// blocking call: it runs the model). `keep_going` is polled while generating; when it
    /// returns `false` the reply comes back with `cancelled` set.
    pub fn reply(
        &self,
        generator: &Generator,
        request: &Request<'_>,
        retrieval: Retrieval,
        keep_going: &(dyn Fn() -> bool + Sync),
    ) -> Result<Reply, EngineError> {
        self.reply_streaming(generator, request, retrieval, &mut |_| keep_going())
    }

    /// [`ReplyEngine::reply`], calling `on_delta` as text is made: in generate mode with each
    /// piece of the reply as the model writes it (the reply is its text); in hybrid mode with
    /// `""` only (a candidate is not the reply until it is ranked), as a chance to stop.
    /// `on_delta` returns `false` to stop; the reply then comes back with `cancelled` set.
    pub fn reply_streaming(
        &self,
        generator: &Generator,
        request: &Request<'_>,
        retrieval: Retrieval,
        on_delta: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Reply, EngineError> {
        let s = &self.settings;
        let mut candidates = retrieval.candidates.clone();
        let (mut prompt_tokens, mut new_tokens) = (0, 0);
        let language = lang::detect(request.user_text);
        let generations = match s.mode {
            EngineMode::Generate => 1,
            EngineMode::Hybrid if self.retrieved_is_enough(request, &retrieval, language) => 0,
            EngineMode::Hybrid => s.generated,
        };
        for i in 0..generations {
            let mut options = request.options.clone();
            options.seed = options.seed.wrapping_add(i as u64);
            if s.mode == EngineMode::Hybrid {
                options.max_new_tokens = options.max_new_tokens.min(s.generated_max_tokens);
            }
            let streams = s.mode == EngineMode::Generate;
            let g = generator.generate(request.messages, &options, &mut |delta| {
                on_delta(if streams { delta } else { "" })
            })?;
            prompt_tokens = g.prompt_tokens;
            new_tokens += g.new_tokens;
            if g.stop == StopReason::Cancelled {
                return Ok(Reply::cancelled());
            }
            let text = g.text.trim().to_string();
            candidates.push(Candidate {
                terms: retrieval_terms(&text),
                text,
                source: ReplySource::Generated,
                doc: None,
                message: None,
                matched_terms: Vec::new(),
                feedback: Feedback::default(),
                language: None,
            });
        }
        if s.mode == EngineMode::Generate {
            let c = candidates.pop().expect("one generation");
            let text = if c.text.is_empty() {
                "…".to_string()
            } else {
                c.text
            };
            return Ok(Reply {
                text,
                source: ReplySource::Generated,
                doc: None,
                message: None,
                scores: Scores::default(),
                ranked: Vec::new(),
                prompt_tokens,
                new_tokens,
                cancelled: false,
            });
        }
        let mut ranked =
            rank::screen_and_score(&candidates, request, &retrieval, language, &s.weights);
        // The model scores the best candidates by the cheap features.
        let scored: Vec<usize> = ranked
            .iter()
            .enumerate()
            .filter(|(_, r)| r.rejected.is_none())
            .map(|(i, _)| i)
            .take(s.scored)
            .collect();
        if !scored.is_empty() && (s.weights.likelihood != 0.0 || s.weights.mmi != 0.0) {
            let texts: Vec<&str> = scored.iter().map(|&i| ranked[i].text.as_str()).collect();
            let conditional = generator.score_replies(request.messages, &texts)?;
            let unconditional = self.unconditional(generator, request.messages, &texts)?;
            for ((&i, c), u) in scored.iter().zip(conditional).zip(unconditional) {
                ranked[i].scores.set_likelihoods(c.mean(), u, &s.weights);
            }
        }
        for r in ranked.iter_mut().filter(|r| r.rejected.is_none()) {
            r.scores.total = s.weights.total(&r.scores);
        }
        // Only candidates the model scored compete (the others were behind them already).
        let mut order: Vec<usize> = (0..ranked.len()).collect();
        order.sort_by(|&a, &b| {
            let key = |i: usize| {
                let r = &ranked[i];
                (r.rejected.is_some(), !scored.contains(&i))
            };
            key(a)
                .cmp(&key(b))
                .then(ranked[b].scores.total.total_cmp(&ranked[a].scores.total))
        });
        let ranked: Vec<Ranked> = order.into_iter().map(|i| ranked[i].clone()).collect();
        let best = ranked
            .first()
            .filter(|r| r.rejected.is_none() && r.scores.total >= s.weights.min_score);
        let Some(best) = best else {
            return Ok(Reply {
                text: fallback_text(language).to_string(),
                source: ReplySource::Fallback,
                doc: None,
                message: None,
                scores: Scores::default(),
                ranked,
                prompt_tokens,
                new_tokens,
                cancelled: false,
            });
        };
        let message = candidates
            .iter()
            .find(|c| c.doc.is_some() && c.doc == best.doc)
            .and_then(|c| c.message);
        Ok(Reply {
            text: best.text.clone(),
            source: best.source,
            doc: best.doc,
            message,
            scores: best.scores.clone(),
            ranked: ranked.clone(),
            prompt_tokens,
            new_tokens,
            cancelled: false,
        })
    }

    /// Whether a retrieved candidate passes the screens and reaches `generate_below` by the
    /// cheap features, so the model need not write one.
    fn retrieved_is_enough(
        &self,
        request: &Request<'_>,
        retrieval: &Retrieval,
        language: &str,
    ) -> bool {
        let s = &self.settings;
        if s.generate_below == f64::INFINITY || retrieval.candidates.is_empty() {
            return false;
        }
        rank::screen_and_score(
            &retrieval.candidates,
            request,
            retrieval,
            language,
            &s.weights,
        )
        .iter()
        .filter(|r| r.rejected.is_none())
        .any(|r| s.weights.total(&r.scores) >= s.generate_below)
    }

    /// Mean log-probabilities of `texts` after the conversation with the last user message
    /// emptied (the `p(reply)` of MMI), from the cache where it can.
    fn unconditional(
        &self,
        generator: &Generator,
        messages: &[ChatMessage],
        texts: &[&str],
    ) -> Result<Vec<f64>, EngineError> {
        let model = generator.dir().display().to_string();
        let mut empty: Vec<ChatMessage> = messages
            .iter()
            .filter(|m| m.role == "system")
            .cloned()
            .collect();
        empty.push(ChatMessage::user(""));
        let system = empty
            .first()
            .filter(|m| m.role == "system")
            .map_or("", |m| m.content.as_str());
        let key = |t: &str| (model.clone(), format!("{system}\u{1f}{t}"));
        let mut out: Vec<Option<f64>> = {
            let cache = self.unconditional.lock().unwrap_or_else(|e| e.into_inner());
            texts.iter().map(|t| cache.get(&key(t)).copied()).collect()
        };
        let missing: Vec<&str> = texts
            .iter()
            .zip(&out)
            .filter(|(_, v)| v.is_none())
            .map(|(t, _)| *t)
            .collect();
        if !missing.is_empty() {
            let scores = generator.score_replies(&empty, &missing)?;
            let mut cache = self.unconditional.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() > UNCONDITIONAL_CACHE {
                cache.clear();
            }
            let mut fresh = missing.iter().zip(scores);
            for (t, v) in texts.iter().zip(out.iter_mut()) {
                if v.is_none() {
                    let (_, s) = fresh.next().expect("one score per missing text");
                    cache.insert(key(t), s.mean());
                    *v = Some(s.mean());
                }
            }
        }
        Ok(out.into_iter().map(|v| v.unwrap_or(0.0)).collect())
    }
}

impl Reply {
    /// The reply of a request stopped before it was made.
    pub fn cancelled() -> Self {
        Reply {
            text: String::new(),
            source: ReplySource::Generated,
            doc: None,
            message: None,
            scores: Scores::default(),
            ranked: Vec::new(),
            prompt_tokens: 0,
            new_tokens: 0,
            cancelled: true,
        }
    }
}

/// What the engine says when no candidate is good enough, in the user's language.
pub fn fallback_text(language: &str) -> &'static str {
    match language {
        "ja" => "ごめんなさい、それにはうまく答えられません。",
        _ => "Sorry, I don't have a good answer to that.",
    }
}
