//! Held-out loss, perplexity and bits per byte of a model, through tract.
//!
//! **What is scored** is what [`crate::dataset::sequence`] makes of an example: the
//! assistant's message contents of a chat example, every token of a text document.
//!
//! **Long examples** use a sliding window over the model's context `C`
//! (`max_position_embeddings`): windows start every `C / 2` tokens, and each token is scored
//! once, in the first window that has it past its first position, so every token is predicted
//! from at least `C / 2` tokens of context (or all it has). Each window is one `forward_all` over
//! a fresh KV cache.
//!
//! **Figures.** loss = mean negative log-likelihood in nats per scored token, perplexity =
//! e^loss, bits per byte = total NLL / ln 2 / the number of UTF-8 bytes the scored tokens decode
//! to. Bytes are counted per token from the tokenizer's vocabulary (exact for byte-level BPE;
//! for other tokenizers from the token's text, `▁` counting as a space and `<0xNN>` as one
//! byte), so bits per byte compare across tokenizers and with the byte-level n-gram, which is
//! scored on exactly these bytes.
//!
//! **Prompt dependence.** For the first [`PROMPT_GAIN_EXCHANGES`] chat examples, the first
//! assistant reply is scored twice: after the messages that came before it, and after those of
//! the previous such example (the prompts rotated by one). The difference in nats per reply
//! token ([`PromptGain`]) says how much the model's replies depend on what they answer; a model
//! that ignores the user scores about 0 whatever its loss.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use crate::model::token_bytes::TokenBytes;

use super::ngram::ByteNgram;
use super::{parallel_map, EvalError};
use crate::dataset::sequence::{Prepared, ScoredSequence, SequenceBuilder};
use crate::dataset::{DataFormat, Dataset, Example, ExampleContent};
use crate::model::{ChatMessage, DecoderSession, Generator, ModelError, OnnxDecoder};
use crate::text::lang;

/// The figures of a model on a held-out file (written into the report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldoutReport {
    pub data: String,
    pub data_sha256: String,
    pub format: DataFormat,
    /// Examples scored.
    pub examples: u64,
    /// Examples with nothing to score or that the template cannot render.
    pub skipped: u64,
    /// Why, for the first few of them (`line N: reason`).
    pub skipped_reasons: Vec<String>,
    /// The model's context, and the stride of the sliding window.
    pub context: usize,
    pub stride: usize,
    /// Forward passes run.
    pub windows: u64,
    pub tokens: u64,
    pub bytes: u64,
    /// Total negative log-likelihood, in nats.
    pub nll_nats: f64,
    /// Mean negative log-likelihood per token, in nats.
    pub loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
    /// Examples whose piece-wise tokenization differs from tokenizing the whole rendering.
    pub tokenization_mismatches: u64,
    pub ngram: Option<NgramFigures>,
    /// The same figures per language (`meta.language`, else detected from the scored text).
    pub per_language: BTreeMap<String, LanguageFigures>,
    /// How much the replies depend on their prompt (chat data with two exchanges or more).
    #[serde(default)]
    pub prompt_gain: Option<PromptGain>,
    pub seconds: f64,
}

/// How many exchanges the prompt dependence is measured on.
pub const PROMPT_GAIN_EXCHANGES: usize = 200;

/// The loss of replies after their own prompt and after another exchange's prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptGain {
    /// Exchanges (an example's messages up to its first assistant reply) and reply tokens.
    pub exchanges: u64,
    pub tokens: u64,
    /// Nats per reply token after the reply's own prompt.
    pub loss_own: f64,
    /// Nats per reply token after the previous exchange's prompt.
    pub loss_other: f64,
    /// `loss_other − loss_own`.
    pub gain: f64,
}

/// The n-gram baseline on the same bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NgramFigures {
    /// The file it was trained on.
    pub train: String,
    pub order: usize,
    pub smoothing: String,
    pub train_bytes: u64,
    pub discounts: Vec<f64>,
    pub bits: f64,
    pub bits_per_byte: f64,
}

/// Figures for the examples of one language.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LanguageFigures {
    pub examples: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub loss: f64,
    pub bits_per_byte: f64,
    pub ngram_bits_per_byte: Option<f64>,
}

/// A trained n-gram and where it came from.
#[derive(Debug, Clone)]
pub struct NgramBaseline {
    pub model: ByteNgram,
    pub train: String,
}

/// Whatever gives logits for a sequence at positions `0..n`: tract in `kaiwa eval`, the
/// plain-Rust reference (or a fake) in tests.
pub trait LogitsSource {
    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError>;
}

/// Logits from an ONNX graph through tract; one KV cache, emptied before every window.
pub struct TractLogits {
    session: DecoderSession,
}

impl TractLogits {
    pub fn new(decoder: &Arc<OnnxDecoder>) -> Result<Self, ModelError> {
        Ok(TractLogits {
            session: decoder.session()?,
        })
    }
}

impl LogitsSource for TractLogits {
    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.session.reset()?;
        self.session.forward_all(tokens)
    }
}

/// One forward pass of the sliding window: feeds `tokens[start..last_target]` and scores the
/// targets `first_target..=last_target` that are marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub first_target: usize,
    pub last_target: usize,
}

/// The windows that score every marked token of a sequence of `scored.len()` tokens exactly once
/// within a context of `context` tokens (see the module docs). Windows with nothing to score
/// are left out.
pub fn plan_windows(scored: &[bool], context: usize) -> Vec<Window> {
    let context = context.max(2);
    let stride = context / 2;
    let len = scored.len();
    let mut windows = Vec::new();
    let mut next_target = 1;
    let mut start = 0;
    while next_target < len {
        let end = (start + context).min(len);
        let targets = next_target..end;
        let first = targets.clone().find(|&j| scored[j]);
        let last = targets.clone().rev().find(|&j| scored[j]);
        if let (Some(first_target), Some(last_target)) = (first, last) {
            windows.push(Window {
                start,
                first_target,
                last_target,
            });
        }
        next_target = end;
        start += stride;
    }
    windows
}

/// The negative log-likelihood of one sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SequenceScore {
    /// Summed over the scored tokens, in nats.
    pub nll: f64,
    pub tokens: u64,
    pub windows: u64,
}

/// Scores `sequence` with `source` in windows of `context` tokens.
pub fn score_sequence(
    source: &mut dyn LogitsSource,
    sequence: &ScoredSequence,
    context: usize,
) -> Result<SequenceScore, ModelError> {
    let mut score = SequenceScore::default();
    for w in plan_windows(&sequence.scored, context) {
        let logits = source.logits(&sequence.tokens[w.start..w.last_target])?;
        for target in w.first_target..=w.last_target {
            if !sequence.scored[target] {
                continue;
            }
            let row = logits.get(target - 1 - w.start).ok_or_else(|| {
                ModelError::Inference(format!(
                    "{} rows of logits for a window of {} tokens",
                    logits.len(),
                    w.last_target - w.start
                ))
            })?;
            score.nll += negative_log_likelihood(row, sequence.tokens[target])?;
            score.tokens += 1;
        }
        score.windows += 1;
    }
    Ok(score)
}

/// `−log softmax(logits)[token]`, in f64.
pub fn negative_log_likelihood(logits: &[f32], token: u32) -> Result<f64, ModelError> {
    let Some(&target) = logits.get(token as usize) else {
        return Err(ModelError::Inference(format!(
            "token {token} is outside the model's {} logits",
            logits.len()
        )));
    };
    Ok(crate::model::sampler::log_sum_exp(logits) - target as f64)
}

/// The figures of one example.
#[derive(Debug, Clone, Default)]
struct ExampleScore {
    language: String,
    tokens: u64,
    bytes: u64,
    nll: f64,
    ngram_bits: Option<f64>,
    windows: u64,
    tokenization_differs: bool,
}

/// Scores every example of `data` with the model `generator` holds, and the n-gram on the same
/// bytes, on `threads` threads (each with its own KV cache). The sums run in file order, so
/// the figures do not depend on the number of threads.
pub fn evaluate(
    generator: &Generator,
    data: &Dataset,
    ngram: Option<&NgramBaseline>,
    threads: usize,
) -> Result<HeldoutReport, EvalError> {
    let started = Instant::now();
    let builder = SequenceBuilder::for_model(generator.dir(), generator.tokenizer())?;
    let context = generator.context_len();
    let decoder = generator.decoder();
    let outcomes = parallel_map(
        &data.examples,
        threads,
        || Ok(TractLogits::new(decoder)?),
        |source: &mut TractLogits,
         example: &Example|
         -> Result<Result<ExampleScore, String>, EvalError> {
            let sequence = match builder.prepare(example)? {
                Prepared::Ready(s) => s,
                Prepared::Skipped(reason) => return Ok(Err(reason)),
            };
            let score = score_sequence(source, &sequence, context)?;
            let ngram_bits = ngram.map(|n| {
                sequence
                    .segments
                    .iter()
                    .map(|s| n.model.bits(&s.bytes, s.skip))
                    .sum()
            });
            let language = match &example.language {
                Some(l) => l.clone(),
                None => lang::detect(&example.scored_texts().join("\n")).to_string(),
            };
            Ok(Ok(ExampleScore {
                language,
                tokens: score.tokens,
                bytes: sequence.scored_bytes() as u64,
                nll: score.nll,
                ngram_bits,
                windows: score.windows,
                tokenization_differs: sequence.tokenization_differs,
            }))
        },
    )?;

    let mut total = ExampleScore::default();
    let mut per_language: BTreeMap<String, (u64, ExampleScore)> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut mismatches = 0;
    for (example, outcome) in data.examples.iter().zip(outcomes) {
        let score = match outcome {
            Ok(score) => score,
            Err(reason) => {
                skipped.push(format!("line {}: {reason}", example.line));
                continue;
            }
        };
        mismatches += u64::from(score.tokenization_differs);
        let (n, lang) = per_language.entry(score.language.clone()).or_default();
        *n += 1;
        for sum in [&mut total, lang] {
            sum.tokens += score.tokens;
            sum.bytes += score.bytes;
            sum.nll += score.nll;
            sum.windows += score.windows;
            sum.ngram_bits = match (sum.ngram_bits, score.ngram_bits) {
                (Some(a), Some(b)) => Some(a + b),
                (None, b) => b,
                (a, None) => a,
            };
        }
    }
    if total.tokens == 0 || total.bytes == 0 {
        return Err(EvalError::Data {
            path: data.path.clone(),
            line: 0,
            reason: format!(
                "nothing to score in {} examples{}",
                data.examples.len(),
                skipped
                    .first()
                    .map(|r| format!(" (first skipped: {r})"))
                    .unwrap_or_default()
            ),
        });
    }
    let exchanges = first_exchanges(&data.examples, PROMPT_GAIN_EXCHANGES);
    // Each exchange with the prompt of the one before it (none to compare with alone).
    let n = exchanges.len();
    let pairs: Vec<(&[ChatMessage], &[ChatMessage])> = if n < 2 {
        Vec::new()
    } else {
        (0..n)
            .map(|i| (exchanges[i], exchanges[(i + n - 1) % n]))
            .collect()
    };
    let gains = parallel_map(
        &pairs,
        threads,
        || Ok(TractLogits::new(decoder)?),
        |source: &mut TractLogits, &(own, other)| -> Result<_, EvalError> {
            Ok(exchange_scores(&builder, own, other, |seq| {
                score_sequence(source, seq, context)
            })?)
        },
    )?;
    let prompt_gain = prompt_gain(gains.into_iter().flatten());
    let bits_per_byte = |nll: f64, bytes: u64| nll / std::f64::consts::LN_2 / bytes as f64;
    let loss = total.nll / total.tokens as f64;
    let scored = (data.examples.len() - skipped.len()) as u64;
    Ok(HeldoutReport {
        data: data.path.display().to_string(),
        data_sha256: data.sha256.clone(),
        format: data.format,
        examples: scored,
        skipped: skipped.len() as u64,
        skipped_reasons: skipped.into_iter().take(10).collect(),
        context,
        stride: context.max(2) / 2,
        windows: total.windows,
        tokens: total.tokens,
        bytes: total.bytes,
        nll_nats: total.nll,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: bits_per_byte(total.nll, total.bytes),
        tokenization_mismatches: mismatches,
        ngram: ngram.map(|n| {
            let bits = total.ngram_bits.unwrap_or(0.0);
            NgramFigures {
                train: n.train.clone(),
                order: n.model.order(),
                smoothing: "interpolated Kneser-Ney".into(),
                train_bytes: n.model.trained_bytes(),
                discounts: n.model.discounts().to_vec(),
                bits,
                bits_per_byte: bits / total.bytes as f64,
            }
        }),
        per_language: per_language
            .into_iter()
            .filter(|(_, (_, s))| s.tokens > 0 && s.bytes > 0)
            .map(|(language, (examples, s))| {
                let figures = LanguageFigures {
                    examples,
                    tokens: s.tokens,
                    bytes: s.bytes,
                    loss: s.nll / s.tokens as f64,
                    bits_per_byte: bits_per_byte(s.nll, s.bytes),
                    ngram_bits_per_byte: s.ngram_bits.map(|b| b / s.bytes as f64),
                };
                (language, figures)
            })
            .collect(),
        prompt_gain,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The messages of the first `limit` chat examples up to and including their first assistant
/// reply with content, for those that have a user message before it.
fn first_exchanges(examples: &[Example], limit: usize) -> Vec<&[ChatMessage]> {
    examples
        .iter()
        .filter_map(|e| {
            let ExampleContent::Chat(messages) = &e.content else {
                return None;
            };
            let reply = messages
                .iter()
                .position(|m| m.role == "assistant" && !m.content.trim().is_empty())?;
            messages[..reply]
                .iter()
                .any(|m| m.role == "user")
                .then(|| &messages[..=reply])
        })
        .take(limit)
        .collect()
}

/// The reply of `own` (its last message) scored after its own prompt and after the prompt of
/// `other`: `(nll own, nll other, tokens)`, or `None` when either cannot be rendered or scores
/// a different number of tokens.
fn exchange_scores(
    builder: &SequenceBuilder,
    own: &[ChatMessage],
    other: &[ChatMessage],
    mut score: impl FnMut(&ScoredSequence) -> Result<SequenceScore, ModelError>,
) -> Result<Option<(f64, f64, u64)>, ModelError> {
    let (Some((reply, own_prompt)), Some((_, other_prompt))) =
        (own.split_last(), other.split_last())
    else {
        return Ok(None);
    };
    let mut scores = Vec::with_capacity(2);
    for prompt in [own_prompt, other_prompt] {
        let mut messages = prompt.to_vec();
        messages.push(reply.clone());
        let example = Example {
            line: 0,
            content: ExampleContent::Chat(messages),
            language: None,
        };
        let Prepared::Ready(sequence) = builder.prepare(&example)? else {
            return Ok(None);
        };
        scores.push(score(&sequence)?);
    }
    if scores[0].tokens != scores[1].tokens || scores[0].tokens == 0 {
        return Ok(None);
    }
    Ok(Some((scores[0].nll, scores[1].nll, scores[0].tokens)))
}

/// Sums the exchanges' scores; `None` with fewer than two exchanges.
fn prompt_gain(scores: impl Iterator<Item = (f64, f64, u64)>) -> Option<PromptGain> {
    let (mut own, mut other, mut tokens, mut exchanges) = (0.0, 0.0, 0u64, 0u64);
    for (o, x, t) in scores {
        own += o;
        other += x;
        tokens += t;
        exchanges += 1;
    }
    (exchanges >= 2 && tokens > 0).then(|| {
        let (loss_own, loss_other) = (own / tokens as f64, other / tokens as f64);
        PromptGain {
            exchanges,
            tokens,
            loss_own,
            loss_other,
            gain: loss_other - loss_own,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::sequence::tests::{builder, chat};

    #[test]
    fn windows_score_each_marked_token_once_with_half_the_context() {
        for (len, context) in [(5, 16), (16, 16), (17, 16), (100, 16), (101, 7), (3, 2)] {
            let scored: Vec<bool> = (0..len).map(|i| i > 0 && i % 5 != 3).collect();
            let mut count = vec![0; len];
            for w in plan_windows(&scored, context) {
                assert!(w.last_target - w.start < context, "window too long: {w:?}");
                for (t, c) in count
                    .iter_mut()
                    .enumerate()
                    .take(w.last_target + 1)
                    .skip(w.first_target)
                {
                    if scored[t] {
                        *c += 1;
                        let seen = t - w.start;
                        assert!(seen >= (context / 2).min(t), "{t} sees {seen} in {w:?}");
                    }
                }
            }
            for t in 0..len {
                assert_eq!(
                    count[t],
                    usize::from(scored[t]),
                    "len {len} ctx {context} t {t}"
                );
            }
        }
        // Nothing marked: no forward pass at all.
        assert!(plan_windows(&[false; 40], 8).is_empty());
    }

    /// Logits that put all weight on "previous token + 1": checks the bookkeeping of windows.
    struct Successor {
        vocab: usize,
        calls: Vec<usize>,
    }

    impl LogitsSource for Successor {
        fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
            self.calls.push(tokens.len());
            Ok(tokens
                .iter()
                .map(|&t| {
                    let mut row = vec![0.0; self.vocab];
                    row[(t as usize + 1) % self.vocab] = 30.0;
                    row
                })
                .collect())
        }
    }

    #[test]
    fn scoring_uses_the_logits_of_the_previous_position() {
        let tokens: Vec<u32> = (0..50).map(|i| i % 10).collect();
        let mut scored = vec![true; 50];
        scored[0] = false;
        let seq = ScoredSequence {
            tokens,
            scored,
            segments: Vec::new(),
            tokenization_differs: false,
        };
        let mut source = Successor {
            vocab: 10,
            calls: Vec::new(),
        };
        let score = score_sequence(&mut source, &seq, 8).unwrap();
        assert_eq!(score.tokens, 49);
        assert!(score.nll < 1e-9, "{}", score.nll);
        assert!(source.calls.iter().all(|&n| n < 8));
        assert_eq!(score.windows as usize, source.calls.len());
        // A sequence that breaks the pattern once costs about 30 nats there.
        let mut broken = seq.clone();
        broken.tokens[20] = 7;
        let score = score_sequence(&mut source, &broken, 8).unwrap();
        assert!((score.nll - 60.0).abs() < 1.0, "{}", score.nll);
    }

    /// Logits that favour every token already in the window: a model that copies from its
    /// prompt. With `copy` false, the same logits for every position: a model that ignores it.
    struct Copier {
        vocab: usize,
        copy: bool,
    }

    impl LogitsSource for Copier {
        fn logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
            let mut row = vec![0.0; self.vocab];
            Ok(tokens
                .iter()
                .map(|&t| {
                    if self.copy {
                        row[t as usize % self.vocab] = 5.0;
                    }
                    row.clone()
                })
                .collect())
        }
    }

    fn exchange(user: &str, assistant: &str) -> Example {
        chat(vec![
            ChatMessage::new("user", user),
            ChatMessage::new("assistant", assistant),
        ])
    }

    #[test]
    fn prompt_gain_is_what_the_own_prompt_saves_over_another() {
        let builder = builder();
        let examples = vec![
            exchange("the weather is nice", "the weather is nice"),
            chat(vec![ChatMessage::new("assistant", "no user before me")]),
            Example {
                line: 9,
                content: ExampleContent::Text("a document".into()),
                language: None,
            },
            exchange("what a lovely cat", "a lovely cat"),
            exchange("trains are late", "trains are late today"),
        ];
        let exchanges = first_exchanges(&examples, 10);
        assert_eq!(
            exchanges.len(),
            3,
            "only chat examples with a user turn first"
        );
        assert_eq!(first_exchanges(&examples, 2).len(), 2);
        let gain = |copy: bool| {
            let n = exchanges.len();
            let scores = (0..n).map(|i| {
                let mut source = Copier { vocab: 600, copy };
                exchange_scores(&builder, exchanges[i], exchanges[(i + n - 1) % n], |seq| {
                    score_sequence(&mut source, seq, 64)
                })
                .unwrap()
                .unwrap()
            });
            prompt_gain(scores).unwrap()
        };
        let ignores = gain(false);
        assert_eq!(ignores.exchanges, 3);
        assert!(ignores.gain.abs() < 1e-9, "{ignores:?}");
        let copies = gain(true);
        assert!(copies.gain > 1.0, "{copies:?}");
        assert!(copies.loss_own < ignores.loss_own);
        assert_eq!(copies.tokens, ignores.tokens);
        // One exchange has no other prompt to compare with.
        assert_eq!(prompt_gain([(1.0, 2.0, 3)].into_iter()), None);
    }

    #[test]
    fn negative_log_likelihood_is_log_softmax() {
        let nll = negative_log_likelihood(&[0.0, 0.0, 0.0, 0.0], 2).unwrap();
        assert!((nll - 4f64.ln()).abs() < 1e-12);
        assert!(negative_log_likelihood(&[0.0], 3).is_err());
    }
}
