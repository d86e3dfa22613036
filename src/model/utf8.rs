//! Keeps generated text valid UTF-8.
//!
//! A byte-level vocabulary has tokens for single bytes and for pieces of characters, so a model
//! can sample a sequence that is not UTF-8: a continuation byte with no character to continue, a
//! new character before the last one is complete, or the end of the reply in the middle of a
//! character. Decoded, such a sequence shows U+FFFD (`�`). Small models do it often in Japanese,
//! whose characters are three bytes. The guard follows how many continuation bytes the text so
//! far still owes and, before each sample, rules out every token that would break the encoding
//! (special tokens, the end of the reply included, only when no character is open). The model's
//! choice among the tokens that remain is untouched.

use super::token_bytes::TokenBytes;
use super::tokenizer::TextTokenizer;

/// Continuation bytes still owed by the text so far (0–3).
pub type Pending = u8;

/// A byte the guard cannot accept.
const INVALID: u8 = u8::MAX;

/// For every token, what it does from each state: `next[id][owed]` is the number of
/// continuation bytes owed after it, or [`INVALID`].
#[derive(Debug, Clone)]
pub struct Utf8Guard {
    next: Vec<[u8; 4]>,
}

impl Utf8Guard {
    /// The guard of `tokenizer`'s vocabulary. Special tokens (`<|im_end|>`, …) count as text
    /// boundaries: allowed only between characters.
    pub fn new(tokenizer: &TextTokenizer) -> Self {
        let bytes = TokenBytes::new(tokenizer);
        let special: Vec<u32> = tokenizer
            .inner()
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let next = (0..tokenizer.vocab_size() as u32)
            .map(|id| {
                let piece: &[u8] = if special.contains(&id) {
                    &[]
                } else {
                    bytes.of(id)
                };
                let mut row = [INVALID; 4];
                for (owed, slot) in row.iter_mut().enumerate() {
                    *slot = feed(owed as Pending, piece).unwrap_or(INVALID);
                }
                // A boundary token (special, or empty) needs a finished character.
                if piece.is_empty() {
                    row = [0, INVALID, INVALID, INVALID];
                }
                row
            })
            .collect();
        Utf8Guard { next }
    }

    /// Sets the logits of the tokens that would break the encoding to −∞. Ids past the table
    /// (padding rows of the embedding) are left alone; the caller masks those. Does nothing
    /// if no token would be left, so sampling always has a choice.
    pub fn mask(&self, owed: Pending, logits: &mut [f32]) {
        let state = usize::from(owed.min(3));
        let allowed = |id: usize| self.next.get(id).is_none_or(|row| row[state] != INVALID);
        let any = logits
            .iter()
            .enumerate()
            .any(|(id, l)| allowed(id) && *l > f32::NEG_INFINITY);
        if !any {
            return;
        }
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed(id) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// The continuation bytes owed after `token` (0 for a token the guard does not know, or one
    /// that breaks the encoding: the decoder shows it as U+FFFD and the text starts afresh).
    pub fn advance(&self, owed: Pending, token: u32) -> Pending {
        match self.next.get(token as usize) {
            Some(row) if row[usize::from(owed.min(3))] != INVALID => row[usize::from(owed.min(3))],
            _ => 0,
        }
    }
}

/// Feeds `bytes` to a UTF-8 decoder that owes `owed` continuation bytes; the bytes owed after
/// them, or `None` if they are not UTF-8 from there.
fn feed(mut owed: Pending, bytes: &[u8]) -> Option<Pending> {
    for &b in bytes {
        if owed > 0 {
            if b & 0xC0 != 0x80 {
                return None;
            }
            owed -= 1;
            continue;
        }
        owed = match b {
            0x00..=0x7F => 0,
            0xC2..=0xDF => 1,
            0xE0..=0xEF => 2,
            0xF0..=0xF4 => 3,
            _ => return None,
        };
    }
    Some(owed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::IM_END;
    use crate::train::bpe::{builtin_text, train_byte_level_bpe};

    #[test]
    fn feeding_follows_utf8() {
        assert_eq!(feed(0, "a".as_bytes()), Some(0));
        assert_eq!(feed(0, "日".as_bytes()), Some(0));
        assert_eq!(feed(0, &"日".as_bytes()[..1]), Some(2));
        assert_eq!(feed(2, &"日".as_bytes()[1..]), Some(0));
        assert_eq!(feed(0, &[0x80]), None, "a stray continuation byte");
        assert_eq!(
            feed(1, b"a"),
            None,
            "a new character before the last is done"
        );
        assert_eq!(feed(0, &[0xFF]), None);
        assert_eq!(feed(0, &[0xC0]), None, "an overlong lead byte");
    }

    #[test]
    fn only_tokens_that_keep_the_text_valid_survive_the_mask() {
        let tok = train_byte_level_bpe(builtin_text().lines(), 400).unwrap();
        let guard = Utf8Guard::new(&tok);
        let bytes = TokenBytes::new(&tok);
        let eos = tok.token_to_id(IM_END).unwrap();
        // The lead byte of a three-byte character: it leaves two bytes owed.
        let lead = (0..tok.vocab_size() as u32)
            .find(|&id| bytes.of(id) == [0xE6])
            .expect("byte-level vocabularies hold every byte");
        assert_eq!(guard.advance(0, lead), 2);

        let mut logits = vec![0.0f32; tok.vocab_size()];
        guard.mask(2, &mut logits);
        for (id, &l) in logits.iter().enumerate() {
            let ok = feed(2, bytes.of(id as u32)).is_some()
                && !bytes.of(id as u32).is_empty()
                && id as u32 != eos;
            let kept = l > f32::NEG_INFINITY;
            if kept {
                assert!(
                    ok,
                    "token {id} ({:?}) kept while two bytes are owed",
                    bytes.of(id as u32)
                );
            }
        }
        assert_eq!(
            logits[eos as usize],
            f32::NEG_INFINITY,
            "no end mid-character"
        );
        assert!(logits.contains(&0.0), "continuation bytes remain");

        let mut free = vec![0.0f32; tok.vocab_size()];
        guard.mask(0, &mut free);
        assert_eq!(
            free[eos as usize], 0.0,
            "the end is allowed between characters"
        );
        assert_eq!(free[lead as usize], 0.0);
    }

    #[test]
    fn a_mask_that_would_leave_nothing_leaves_the_logits_alone() {
        let tok = train_byte_level_bpe(builtin_text().lines(), 400).unwrap();
        let guard = Utf8Guard::new(&tok);
        let eos = tok.token_to_id(IM_END).unwrap() as usize;
        let mut logits = vec![f32::NEG_INFINITY; tok.vocab_size()];
        logits[eos] = 1.0;
        guard.mask(2, &mut logits);
        assert_eq!(logits[eos], 1.0);
    }
}
