//! The baseline a transformer has to beat: a byte-level n-gram model with interpolated
//! Kneser–Ney smoothing.
//!
//! It predicts the next UTF-8 byte from the previous `order - 1` bytes, so it needs no tokenizer
//! and its bits per byte compare directly with a model's, whatever that model's tokenizer. It is
//! trained on the same text portions the model is scored on (the assistant's messages of the
//! training file, or its documents) and scored on exactly the bytes the model is scored on.
//!
//! Each text starts with a start symbol (not a byte, never predicted), so the first bytes of a
//! reply are predicted from "start of text" rather than from the end of another reply.
//!
//! Smoothing (Chen & Goodman's interpolated Kneser–Ney, with one discount per order):
//!
//! ```text
//! p(w | h) = max(a(h w) − D, 0) / A(h)  +  D · T(h) / A(h) · p(w | h′)
//! ```
//!
//! where `h′` is `h` without its oldest byte, `A(h)` is the sum of `a(h ·)`, `T(h)` the number of
//! bytes `w` with `a(h w) > 0`, and the recursion ends in the uniform distribution over the 256
//! bytes. `a` is the raw count for the highest order and for n-grams that begin with the start
//! symbol (they cannot be extended to the left), and otherwise the continuation count: the
//! number of distinct symbols seen before the n-gram. Unseen contexts pass `p(w | h′)` through.
//! `D = n1 / (n1 + 2 n2)` from the numbers of n-grams with adjusted count one and two, kept in
//! `[0.05, 0.95]`. The model is deterministic: counts do not depend on hash order.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The start-of-text symbol; bytes are 0..=255.
const START: u16 = 256;
/// Bits per symbol in a packed n-gram (257 symbols).
const SYMBOL_BITS: u32 = 9;
/// The highest order that packs into a `u64`.
pub const MAX_ORDER: usize = 7;
/// The order `kaiwa eval` uses unless told otherwise.
pub const DEFAULT_ORDER: usize = 5;

/// A byte-level n-gram model (see the module docs).
#[derive(Debug, Clone)]
pub struct ByteNgram {
    order: usize,
    /// Per order `m` (index `m - 1`): the adjusted count of every m-gram seen, by packed gram.
    grams: Vec<GramMap<u32>>,
    /// Per order `m`: for each context (the m-gram without its last byte), `(A(h), T(h))`.
    contexts: Vec<GramMap<(u64, u32)>>,
    discounts: Vec<f64>,
    trained_bytes: u64,
}

impl ByteNgram {
    /// Trains a model of `order` (1 to [`MAX_ORDER`]) on `texts`, each a separate text.
    pub fn train<'a>(texts: impl IntoIterator<Item = &'a [u8]>, order: usize) -> Self {
        let order = order.clamp(1, MAX_ORDER);
        // Raw counts of every m-gram ending in a byte, for m = 1..=order.
        let mut raw: Vec<GramMap<u32>> = vec![GramMap::default(); order];
        let mut trained_bytes = 0u64;
        let mut symbols: Vec<u16> = Vec::new();
        for text in texts {
            symbols.clear();
            symbols.push(START);
            symbols.extend(text.iter().map(|&b| u16::from(b)));
            trained_bytes += text.len() as u64;
            for end in 1..symbols.len() {
                for m in 1..=order.min(end + 1) {
                    *raw[m - 1]
                        .entry(pack(&symbols[end + 1 - m..=end]))
                        .or_default() += 1;
                }
            }
        }

        // Adjusted counts: continuation counts below the highest order, except for n-grams that
        // begin with the start symbol.
        let mut grams: Vec<GramMap<u32>> = Vec::with_capacity(order);
        for m in 1..=order {
            if m == order {
                grams.push(std::mem::take(&mut raw[m - 1]));
                continue;
            }
            let mut continuation = GramMap::<u32>::default();
            let suffix_mask = mask(m);
            for &longer in raw[m].keys() {
                *continuation.entry(longer & suffix_mask).or_default() += 1;
            }
            let mut adjusted = GramMap::<u32>::default();
            for (&gram, &count) in &raw[m - 1] {
                let a = if first_symbol(gram, m) == START {
                    count
                } else {
                    continuation.get(&gram).copied().unwrap_or(0)
                };
                if a > 0 {
                    adjusted.insert(gram, a);
                }
            }
            grams.push(adjusted);
        }
        drop(raw);

        let mut contexts = Vec::with_capacity(order);
        let mut discounts = Vec::with_capacity(order);
        for adjusted in &grams {
            let mut ctx = GramMap::<(u64, u32)>::default();
            let (mut n1, mut n2) = (0u64, 0u64);
            for (&gram, &a) in adjusted {
                let entry = ctx.entry(gram >> SYMBOL_BITS).or_default();
                entry.0 += u64::from(a);
                entry.1 += 1;
                match a {
                    1 => n1 += 1,
                    2 => n2 += 1,
                    _ => {}
                }
            }
            let d = if n1 == 0 {
                0.5
            } else {
                n1 as f64 / (n1 + 2 * n2) as f64
            };
            discounts.push(d.clamp(0.05, 0.95));
            contexts.push(ctx);
        }
        ByteNgram {
            order,
            grams,
            contexts,
            discounts,
            trained_bytes,
        }
    }

    pub fn order(&self) -> usize {
        self.order
    }

    /// The discount of each order, lowest first.
    pub fn discounts(&self) -> &[f64] {
        &self.discounts
    }

    /// Bytes of text it was trained on.
    pub fn trained_bytes(&self) -> u64 {
        self.trained_bytes
    }

    /// The probability of `byte` after `text` (the bytes of the current text so far; only the
    /// last `order - 1` matter, and "start of text" is part of the context when `text` is
    /// shorter than that).
    pub fn probability(&self, text: &[u8], byte: u8) -> f64 {
        let mut history = History::new(self.order);
        for &b in text {
            history.push(u16::from(b));
        }
        self.probability_after(&history, byte)
    }

    /// Bits needed to code `text[skip..]`, each byte predicted from the text before it (the
    /// first `skip` bytes are context only).
    pub fn bits(&self, text: &[u8], skip: usize) -> f64 {
        let mut history = History::new(self.order);
        let mut bits = 0.0;
        for (i, &b) in text.iter().enumerate() {
            if i >= skip {
                bits -= self.probability_after(&history, b).log2();
            }
            history.push(u16::from(b));
        }
        bits
    }

    /// Interpolation from the uniform distribution up through the longest known context.
    fn probability_after(&self, history: &History, byte: u8) -> f64 {
        let mut p = 1.0 / 256.0;
        let recent = history.symbols();
        for m in 1..=self.order {
            let Some(context) = recent.len().checked_sub(m - 1).map(|at| &recent[at..]) else {
                break;
            };
            let key = pack(context);
            // A context never seen at this order is never seen at a higher one either.
            let Some(&(total, types)) = self.contexts[m - 1].get(&key) else {
                break;
            };
            let gram = (key << SYMBOL_BITS) | u64::from(byte);
            let a = self.grams[m - 1].get(&gram).copied().unwrap_or(0);
            let d = self.discounts[m - 1];
            p = ((f64::from(a) - d).max(0.0) + d * f64::from(types) * p) / total as f64;
        }
        p
    }
}

/// The last `order - 1` symbols of a text, starting with the start symbol.
struct History {
    symbols: Vec<u16>,
    keep: usize,
}

impl History {
    fn new(order: usize) -> Self {
        let keep = order.saturating_sub(1);
        let mut symbols = Vec::with_capacity(keep + 1);
        if keep > 0 {
            symbols.push(START);
        }
        History { symbols, keep }
    }

    fn push(&mut self, symbol: u16) {
        if self.keep == 0 {
            return;
        }
        if self.symbols.len() == self.keep {
            self.symbols.remove(0);
        }
        self.symbols.push(symbol);
    }

    fn symbols(&self) -> &[u16] {
        &self.symbols
    }
}

/// Symbols packed 9 bits each, oldest in the high bits. Lengths differ per map, never within one.
fn pack(symbols: &[u16]) -> u64 {
    symbols
        .iter()
        .fold(0u64, |key, &s| (key << SYMBOL_BITS) | u64::from(s))
}

/// The mask of the last `m` symbols of a packed gram.
fn mask(m: usize) -> u64 {
    (1u64 << (SYMBOL_BITS as usize * m)) - 1
}

fn first_symbol(gram: u64, m: usize) -> u16 {
    ((gram >> (SYMBOL_BITS as usize * (m - 1))) & 0x1ff) as u16
}

type GramMap<V> = HashMap<u64, V, BuildHasherDefault<GramHasher>>;

/// SplitMix64's finaliser: packed grams differ in high or low bits alike, and std's SipHash
/// would make training several times slower for no benefit (keys are not attacker-chosen in a
/// way that matters for an offline evaluation).
#[derive(Default)]
struct GramHasher(u64);

impl Hasher for GramHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let mut z = (self.0 ^ n).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORPUS: &[&str] = &[
        "今日はいい天気ですね。散歩に行きましょう。",
        "今日は雨ですね。家でゆっくりしましょう。",
        "Good morning! The weather is nice today.",
        "Good evening! The weather was nice today, wasn't it?",
    ];

    fn model(order: usize) -> ByteNgram {
        ByteNgram::train(CORPUS.iter().map(|t| t.as_bytes()), order)
    }

    fn total_probability(m: &ByteNgram, context: &[u8]) -> f64 {
        (0..=255u8).map(|b| m.probability(context, b)).sum()
    }

    #[test]
    fn probabilities_sum_to_one_over_the_byte_alphabet() {
        for order in [1, 2, 3, 5, MAX_ORDER] {
            let m = model(order);
            for context in [
                &b""[..],
                b"Good",
                b"The weather is ",
                "今日は".as_bytes(),
                "今日".as_bytes(),
                b"zzzz never seen",
                &[0xff, 0xfe, 0x00],
            ] {
                let total = total_probability(&m, context);
                assert!(
                    (total - 1.0).abs() < 1e-9,
                    "order {order}, context {context:?}: {total}"
                );
                for b in 0..=255u8 {
                    assert!(m.probability(context, b) > 0.0, "zero probability for {b}");
                }
            }
        }
    }

    #[test]
    fn an_empty_model_is_uniform() {
        let m = ByteNgram::train(std::iter::empty(), 5);
        assert_eq!(m.probability(b"abc", b'd'), 1.0 / 256.0);
        assert!((m.bits(b"hello", 0) - 40.0).abs() < 1e-9);
    }

    #[test]
    fn seen_continuations_are_likely_and_text_it_was_trained_on_is_cheap() {
        let m = model(5);
        // After "The weather ", the corpus always continues with "i" or "w".
        assert!(m.probability(b"The weather ", b'i') > 0.3);
        assert!(m.probability(b"The weather ", b'q') < 0.01);
        for text in CORPUS {
            let bpb = m.bits(text.as_bytes(), 0) / text.len() as f64;
            assert!(bpb < 3.0, "{text}: {bpb} bits per byte");
        }
        // The first byte of a text comes from "start of text".
        assert!(m.probability(b"", b'G') > 0.2);
    }

    #[test]
    fn repetitive_text_beats_a_uniform_model_by_far() {
        let text = "はい、そうです。".repeat(50) + &"ok, thanks! ".repeat(50);
        let m = ByteNgram::train([text.as_bytes()], 5);
        let held_out = "はい、そうです。ok, thanks! はい、そうです。";
        let bpb = m.bits(held_out.as_bytes(), 0) / held_out.len() as f64;
        assert!(bpb < 1.5, "{bpb} bits per byte (uniform is 8)");
    }

    #[test]
    fn skipped_bytes_are_context_only() {
        let m = model(3);
        let text = b"Good morning";
        let skipped = m.bits(text, 5);
        let by_hand: f64 = (5..text.len())
            .map(|i| -m.probability(&text[..i], text[i]).log2())
            .sum();
        assert!((skipped - by_hand).abs() < 1e-9);
        assert!(m.bits(text, 0) > skipped);
    }

    #[test]
    fn training_is_deterministic() {
        let a = model(5);
        let b = model(5);
        assert_eq!(a.discounts(), b.discounts());
        assert_eq!(a.bits(b"Good day", 0), b.bits(b"Good day", 0));
        assert!(a.discounts().iter().all(|d| (0.05..=0.95).contains(d)));
    }
}
