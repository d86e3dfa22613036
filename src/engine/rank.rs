//! The ranker: screens candidates for what must never be sent, then scores the rest.
//!
//! A candidate's score is a weighted sum ([`Weights::total`]) of:
//!
//! - `similarity`: how well what retrieval matched (the message a pair's reply answered, or
//!   the sentence) fits the user's message: cosine of their retrieval terms weighted by inverse
//!   document frequency, hiragana bigrams (particles, endings) less (0 for generated text);
//! - `topic`: the same cosine between the user's message and the candidate itself, for every
//!   source, so generated text on the topic counts too;
//! - `coverage`: how much of the user's message the candidate covers: the weight of the terms
//!   they share over the weight of the message's terms (the cosine also counts what the
//!   candidate says besides);
//! - `mmi`: the model's mean log-probability per token of the candidate after the conversation,
//!   minus `lambda` times that after an empty message (Li et al. 2016): replies the
//!   conversation makes likely, not replies likely anywhere ("I don't know");
//! - `likelihood`: the first term alone (fluency);
//! - `feedback`: 👍 minus 👎 that earlier replies from the same doc got, squashed to (−1, 1);
//! - `length`: 0 for 4–200 characters, falling off as the log of the distance outside.
//!
//! The defaults were chosen on the development half of the everyday suites
//! (`research/README.md`, "The reply engine") and are settable (`.env.example`).

use std::collections::{BTreeSet, HashSet};

use unicode_normalization::UnicodeNormalization;

use super::{Candidate, Ranked, ReplySource, Request, Retrieval};
use crate::text::lang;
use crate::text::repetition;

/// A candidate longer than this many characters is not sent.
const MAX_CHARS: usize = 400;
/// A candidate whose character bigrams overlap the user's this much (Dice) echoes the user.
const ECHO_DICE: f64 = 0.5;
/// Degenerate text: the suite's repetition limits.
const MAX_REPEATED_NGRAM_RATIO: f64 = 0.5;
const MAX_LINE_REPEATS: usize = 2;

/// Why a candidate is never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    Empty,
    TooLong,
    /// Not in the user's language (or too short to tell).
    WrongLanguage,
    /// Repeats the user's own message.
    Echo,
    /// The bot said it lately in this conversation.
    Repeat,
    /// Loops or repeats itself.
    Degenerate,
}

/// The ranker's weights (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Weights {
    pub similarity: f64,
    pub topic: f64,
    pub coverage: f64,
    pub mmi: f64,
    /// MMI's λ: how much the likelihood after an empty message is taken off.
    pub lambda: f64,
    pub likelihood: f64,
    pub feedback: f64,
    pub length: f64,
    /// The reply is the fallback when the best total is below this.
    pub min_score: f64,
}

impl Default for Weights {
    /// Chosen on the development half of the everyday suites (`research/ranker/tune.py`; see
    /// `research/README.md`, "The reply engine").
    fn default() -> Self {
        Weights {
            similarity: 0.25,
            topic: 4.0,
            coverage: 2.0,
            mmi: 0.2,
            lambda: 1.0,
            likelihood: 0.0,
            feedback: 0.3,
            length: 0.3,
            min_score: -0.25,
        }
    }
}

impl Weights {
    pub fn validate(&self) -> Result<(), String> {
        let all = [
            ("similarity", self.similarity),
            ("topic", self.topic),
            ("coverage", self.coverage),
            ("mmi", self.mmi),
            ("lambda", self.lambda),
            ("likelihood", self.likelihood),
            ("feedback", self.feedback),
            ("length", self.length),
            ("min_score", self.min_score),
        ];
        for (name, v) in all {
            if !v.is_finite() {
                return Err(format!(
                    "ranker weight {name} must be a finite number, got {v}"
                ));
            }
        }
        Ok(())
    }

    /// The weighted sum of a candidate's scores.
    pub fn total(&self, s: &Scores) -> f64 {
        self.similarity * s.similarity
            + self.topic * s.topic
            + self.coverage * s.coverage
            + self.mmi * s.mmi
            + self.likelihood * s.likelihood
            + self.feedback * s.feedback
            + self.length * s.length
    }
}

/// A candidate's scores (see the module docs); `likelihood` and `mmi` are 0 for candidates the
/// model did not score.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    pub similarity: f64,
    pub topic: f64,
    #[serde(default)]
    pub coverage: f64,
    pub likelihood: f64,
    /// The mean log-probability after an empty message.
    pub unconditional: f64,
    pub mmi: f64,
    pub feedback: f64,
    pub length: f64,
    pub total: f64,
}

impl Scores {
    pub(super) fn set_likelihoods(&mut self, conditional: f64, unconditional: f64, w: &Weights) {
        self.likelihood = conditional;
        self.unconditional = unconditional;
        self.mmi = conditional - w.lambda * unconditional;
    }
}

/// Screens every candidate and gives the survivors their cheap scores (all but the model's),
/// best first by those; rejected ones keep their scores for the report.
pub(super) fn screen_and_score(
    candidates: &[Candidate],
    request: &Request<'_>,
    retrieval: &Retrieval,
    language: &str,
    weights: &Weights,
) -> Vec<Ranked> {
    let query = Query::new(retrieval);
    let user = bigrams(request.user_text);
    let recent: HashSet<String> = request
        .recent_replies
        .iter()
        .map(|r| normalize(r))
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut out: Vec<Ranked> = candidates
        .iter()
        .map(|c| {
            let text = c.text.trim();
            let key = normalize(text);
            let chars = text.chars().count();
            let (topic, coverage) = query.overlap(&c.terms, retrieval);
            let similarity = match c.source {
                ReplySource::Pair => query.overlap(&c.matched_terms, retrieval).0,
                ReplySource::Sentence => topic,
                ReplySource::Generated | ReplySource::Fallback => 0.0,
            };
            let net = (c.feedback.up - c.feedback.down) as f64;
            let scores = Scores {
                similarity,
                topic,
                coverage,
                feedback: (net / 2.0).tanh(),
                length: length_score(chars),
                ..Scores::default()
            };
            let rejected = if key.is_empty() {
                Some(Rejection::Empty)
            } else if chars > MAX_CHARS {
                Some(Rejection::TooLong)
            } else if language != lang::UNKNOWN
                && c.language.as_deref().unwrap_or_else(|| lang::detect(text)) != language
            {
                Some(Rejection::WrongLanguage)
            } else if key == normalize(request.user_text)
                || dice(&bigrams(text), &user) >= ECHO_DICE
            {
                Some(Rejection::Echo)
            } else if recent.contains(&key) || !seen.insert(key) {
                Some(Rejection::Repeat)
            } else if degenerate(text) {
                Some(Rejection::Degenerate)
            } else {
                None
            };
            Ranked {
                text: text.to_string(),
                source: c.source,
                doc: c.doc,
                scores,
                rejected,
            }
        })
        .collect();
    for r in &mut out {
        r.scores.total = weights.total(&r.scores);
    }
    out.sort_by(|a, b| {
        a.rejected
            .is_some()
            .cmp(&b.rejected.is_some())
            .then(b.scores.total.total_cmp(&a.scores.total))
    });
    out
}

/// Whether `reply` repeats `user`'s message (the same text, or most of its character bigrams).
pub fn is_echo(reply: &str, user: &str) -> bool {
    normalize(reply) == normalize(user) || dice(&bigrams(reply), &bigrams(user)) >= ECHO_DICE
}

/// The user's message as weighted terms (each [`Retrieval::weight`], squared and summed).
struct Query<'a> {
    terms: BTreeSet<&'a str>,
    squared: f64,
}

impl<'a> Query<'a> {
    fn new(r: &'a Retrieval) -> Self {
        // Summed in the terms' order, not a hash set's (which changes from run to run and, with
        // it, the last bit of every score: a seed must give the same report).
        let terms: BTreeSet<&str> = r.query.iter().map(String::as_str).collect();
        let squared = terms.iter().map(|t| r.weight(t).powi(2)).sum();
        Query { terms, squared }
    }

    /// How `terms` (without repeats) overlap the message: the cosine of the two weighted term
    /// sets, and the coverage (the weight of the message's terms that `terms` has, over all of
    /// the message's).
    fn overlap(&self, terms: &[String], r: &Retrieval) -> (f64, f64) {
        let (mut shared, mut all) = (0.0, 0.0);
        for t in terms {
            let w = r.weight(t).powi(2);
            all += w;
            if self.terms.contains(t.as_str()) {
                shared += w;
            }
        }
        if self.squared == 0.0 || all == 0.0 {
            return (0.0, 0.0);
        }
        (shared / (self.squared * all).sqrt(), shared / self.squared)
    }
}

fn length_score(chars: usize) -> f64 {
    let c = chars.max(1) as f64;
    -(c / 200.0).ln().max(0.0) - (4.0 / c).ln().max(0.0)
}

fn degenerate(text: &str) -> bool {
    let r = repetition(text);
    r.repeated_ngram_ratio > MAX_REPEATED_NGRAM_RATIO || r.max_line_repeats > MAX_LINE_REPEATS
}

/// NFKC, lower case, letters and digits only: two texts that differ in punctuation, spacing or
/// case are the same reply.
fn normalize(text: &str) -> String {
    text.nfkc()
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric())
        .collect()
}

fn bigrams(text: &str) -> HashSet<(char, char)> {
    let chars: Vec<char> = normalize(text).chars().collect();
    chars.windows(2).map(|w| (w[0], w[1])).collect()
}

/// Dice coefficient of two bigram sets.
fn dice(a: &HashSet<(char, char)>, b: &HashSet<(char, char)>) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    2.0 * a.intersection(b).count() as f64 / (a.len() + b.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_are_near_copies_of_the_user_message() {
        let user = bigrams("今日の天気はどうですか？");
        assert!(dice(&bigrams("今日の天気はどうですか"), &user) >= ECHO_DICE);
        assert!(dice(&bigrams("今日はいい天気ですね。"), &user) < ECHO_DICE);
        let user = bigrams("What's the weather like today?");
        assert!(dice(&bigrams("what is the weather like today"), &user) >= ECHO_DICE);
        assert!(dice(&bigrams("It's sunny and warm here."), &user) < ECHO_DICE);
    }

    #[test]
    fn length_is_free_between_four_and_two_hundred_characters() {
        assert_eq!(length_score(4), 0.0);
        assert_eq!(length_score(200), 0.0);
        assert!(length_score(1) < -1.0);
        assert!(length_score(400) < -0.6);
    }
}
