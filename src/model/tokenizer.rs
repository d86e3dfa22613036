//! The text tokenizer: text to token ids and back, in the Hugging Face `tokenizer.json` format.
//!
//! A model only ever sees integers, so every prompt goes through [`TextTokenizer::encode`] and
//! every generated token back through [`TextTokenizer::decode`] or, while a reply is being
//! streamed, a [`StreamDecoder`]. The file format is the one of the `tokenizers` library, so
//! tokenizers of models from the wider ecosystem (Llama, Qwen, ...) load unchanged, and the ones
//! kaiwa trains load in `transformers`.
//!
//! kaiwa's own tokenizers are byte-level BPE (trained by [`crate::train::bpe`]): every byte has a token,
//! so any text (Japanese, emoji, anything) is encodable without an unknown token. The price is
//! that a token may end in the middle of a multi-byte UTF-8 character, which is why streaming
//! needs [`StreamDecoder`] rather than decoding token by token.

use std::borrow::Borrow;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use tokenizers::Tokenizer;

use super::ModelError;

/// Marks the start of a document, and pads; id 0 in kaiwa's tokenizers.
pub const BOS_TOKEN: &str = "<|endoftext|>";
/// Opens a ChatML turn (`<|im_start|>user\n...`); id 1 in kaiwa's tokenizers.
pub const IM_START: &str = "<|im_start|>";
/// Closes a ChatML turn, and is the end-of-sequence token of replies; id 2 in kaiwa's tokenizers.
pub const IM_END: &str = "<|im_end|>";
/// The special tokens of kaiwa's tokenizers, in id order.
pub const SPECIAL_TOKENS: [&str; 3] = [BOS_TOKEN, IM_START, IM_END];

/// A loaded `tokenizer.json`. Cloning is cheap (the tokenizer is shared), which lets a
/// [`StreamDecoder`] own its tokenizer for the length of a generation.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Tokenizer>,
    /// One past the highest token id, computed once: `get_vocab_size` rebuilds the whole
    /// vocabulary map on every call.
    vocab_size: usize,
}

/// Not derived: the derived form would print the whole vocabulary (150 000 entries for some
/// models) wherever a structure holding a tokenizer is debug-printed.
impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let added = self.inner.get_added_vocabulary().len();
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("added_tokens", &added)
            .finish_non_exhaustive()
    }
}

impl From<Tokenizer> for TextTokenizer {
    fn from(mut tokenizer: Tokenizer) -> Self {
        // Some published tokenizer.json files carry truncation or padding settings (e.g. a
        // 512-token limit from a classification fine-tune). A chat prompt must never be cut or
        // padded silently, so they are switched off, as `transformers` does when encoding.
        if tokenizer.get_truncation().is_some() {
            // Removing truncation cannot fail: only setting a too-short limit can.
            let _ = tokenizer.with_truncation(None);
        }
        tokenizer.with_padding(None);
        let vocab_size = tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max as usize + 1);
        TextTokenizer {
            inner: Arc::new(tokenizer),
            vocab_size,
        }
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let tokenizer = Tokenizer::from_str(&text).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("not a valid tokenizer.json (Hugging Face tokenizers format): {e}"),
        })?;
        Ok(Self::from(tokenizer))
    }

    /// Writes the tokenizer as `tokenizer.json` (pretty-printed, like `transformers` does).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_path_buf(),
                reason: format!("cannot serialise the tokenizer: {e}"),
            })?;
        std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>` in a rendered
    /// chat prompt) become their single special id whatever `add_special_tokens` says;
    /// `add_special_tokens` only controls what the post-processor adds around the text (a BOS
    /// for Llama-style tokenizers, nothing for kaiwa's).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        // `encode_fast` skips the character offsets `encode` computes and nobody here needs.
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenize(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`. Ids the tokenizer does not know (padding rows of a larger embedding)
    /// are left out, as in `transformers`. Bytes that do not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenize(format!("cannot decode {} tokens: {e}", ids.len())))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id`, in the tokenizer's own alphabet (for byte-level BPE, bytes are
    /// shown as printable characters, e.g. `Ġ` for a space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// One past the highest token id, added tokens included: ids at or above it are not text.
    /// This is the number of tokens when ids are contiguous, as they are in kaiwa's tokenizers.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Turns generated token ids into text deltas as they arrive.
///
/// Decoding each token on its own is wrong twice over: a byte-level token can hold half of a
/// UTF-8 character, and some decoders (SentencePiece-style `▁` spaces) decode a token
/// differently at the start of a text. So, like `tokenizers`' `DecodeStream` and
/// `transformers`' `TextStreamer`, this decodes a short window of recent tokens, compares it
/// with what that window's already-shown part decodes to, and emits only the growth, and only
/// when it does not end in U+FFFD (an incomplete character). The window restarts at each
/// emitted chunk, so a long generation costs O(n), not O(n²).
///
/// It owns a (cheap) clone of the tokenizer, so a generation loop can keep it as long as it
/// needs, unlike `DecodeStream`, which borrows the tokenizer.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    tokenizer: TextTokenizer,
    skip_special_tokens: bool,
    /// The window: the tokens of the last emitted chunk, then the tokens not yet emitted.
    ids: Vec<u32>,
    /// What `ids[..prefix_len]` decodes to; the window's decoding starts with it.
    prefix: String,
    prefix_len: usize,
}

impl StreamDecoder {
    /// A decoder for one generation. Takes `&TextTokenizer` or `Arc<TextTokenizer>`.
    pub fn new(tokenizer: impl Borrow<TextTokenizer>, skip_special_tokens: bool) -> Self {
        StreamDecoder {
            tokenizer: tokenizer.borrow().clone(),
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_len: 0,
        }
    }

    /// Adds one generated token; returns the new text, if there is a complete piece of it.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, ModelError> {
        if self.prefix.is_empty() && self.prefix_len < self.ids.len() {
            // Nothing shown from this window yet: if the tokens so far decode to nothing at all
            // (skipped special tokens), count them as shown so the window does not grow.
            let text = self.decode_window()?;
            if text.is_empty() {
                self.prefix_len = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = self.decode_window()?;
        if text.len() <= self.prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        let delta = self.delta(&text, id)?;
        // Restart the window at the chunk just emitted: it is the context the next token needs.
        self.ids.drain(..self.prefix_len);
        self.prefix = self.decode_window()?;
        self.prefix_len = self.ids.len();
        Ok(Some(delta))
    }

    /// Ends the stream: returns any text still held back (an incomplete character at the very
    /// end decodes to U+FFFD, as in a full decode) and resets the decoder.
    pub fn finish(&mut self) -> Result<Option<String>, ModelError> {
        let rest = match self.ids.last() {
            Some(&last) => {
                let text = self.decode_window()?;
                if text.len() > self.prefix.len() {
                    Some(self.delta(&text, last)?)
                } else {
                    None
                }
            }
            None => None,
        };
        self.ids.clear();
        self.prefix.clear();
        self.prefix_len = 0;
        Ok(rest)
    }

    fn decode_window(&self) -> Result<String, ModelError> {
        self.tokenizer.decode(&self.ids, self.skip_special_tokens)
    }

    /// The part of the window's text after the already emitted prefix.
    fn delta(&self, text: &str, id: u32) -> Result<String, ModelError> {
        match text.strip_prefix(self.prefix.as_str()) {
            Some(new) => Ok(new.to_string()),
            // Only a decoder that rewrites earlier text when later tokens arrive could do this.
            None => Err(ModelError::Tokenize(format!(
                "streaming decode: after token {id} the text {text:?} no longer starts with \
                 the already shown {:?}",
                self.prefix
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The tokenizers under test are trained by `train::bpe`, as kaiwa's own are.
    use crate::train::bpe::{builtin_text, train_byte_level_bpe, MIN_VOCAB};

    /// A tokenizer trained once on the built-in text; training takes a moment even optimised.
    fn builtin(vocab: usize) -> TextTokenizer {
        train_byte_level_bpe(builtin_text().lines(), vocab).unwrap()
    }

    const MIXED: &str =
        "今日の天気はどうですか？晴れです。🌸 The weather is nice today, isn't it?\n\
                         「カタカナ」とひらがな、漢字！ Emoji: 👍🏽 ✓ ünïcödé";

    #[test]
    fn round_trip_japanese_english_emoji() {
        for vocab in [MIN_VOCAB, 600, 4000] {
            let tok = builtin(vocab);
            let ids = tok.encode(MIXED, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), MIXED);
            // Characters never seen in training still encode, byte by byte.
            let rare = "龘𠮷\u{0}\t\r\n";
            assert_eq!(
                tok.decode(&tok.encode(rare, true).unwrap(), true).unwrap(),
                rare
            );
        }
        // Merges were learned for Japanese too: fewer tokens than bytes.
        let tok = builtin(4000);
        let jp = "ありがとうございます。今日はいい天気ですね。";
        assert!(tok.encode(jp, false).unwrap().len() * 2 < jp.len());
    }

    #[test]
    fn special_tokens_have_fixed_ids_and_encode_whole_inside_text() {
        let tok = builtin(600);
        for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(t), Some(i as u32));
            assert_eq!(tok.id_to_token(i as u32).as_deref(), Some(*t));
        }
        let prompt = "<|im_start|>user\nこんにちは<|im_end|>\n<|im_start|>assistant\n";
        for add in [false, true] {
            let ids = tok.encode(prompt, add).unwrap();
            assert_eq!(ids[0], 1);
            assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2);
            assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
            assert!(ids.iter().filter(|&&i| i < 3).count() == 3);
            assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
            assert_eq!(
                tok.decode(&ids, true).unwrap(),
                "user\nこんにちは\nassistant\n"
            );
        }
        // Nothing is added around the text, and a lone special token is one id.
        assert_eq!(tok.encode("<|endoftext|>", true).unwrap(), vec![0]);
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tok = builtin(600);
        tok.save(&path).unwrap();
        let loaded = TextTokenizer::load(&path).unwrap();
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        assert_eq!(
            loaded.encode(MIXED, false).unwrap(),
            tok.encode(MIXED, false).unwrap()
        );
        assert_eq!(
            loaded.inner().to_string(false).unwrap(),
            tok.inner().to_string(false).unwrap()
        );
    }

    #[test]
    fn corrupt_or_missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        for bad in ["{not json", "", "{\"model\": 3}", "[1, 2, 3]"] {
            std::fs::write(&path, bad).unwrap();
            let err = TextTokenizer::load(&path).unwrap_err();
            assert!(matches!(err, ModelError::Tokenizer { .. }), "{err:?}");
            assert!(err.to_string().contains("tokenizer.json"), "{err}");
        }
        let missing = dir.path().join("nope").join("tokenizer.json");
        let err = TextTokenizer::load(&missing).unwrap_err();
        assert!(
            matches!(err, ModelError::Io { .. }) && err.to_string().contains("nope"),
            "{err}"
        );
    }

    /// Streams `ids` and checks the deltas against a full decode.
    fn stream_all(tok: &TextTokenizer, ids: &[u32], skip: bool) -> Vec<String> {
        let mut stream = StreamDecoder::new(tok, skip);
        let mut deltas = Vec::new();
        for &id in ids {
            if let Some(d) = stream.push(id).unwrap() {
                assert!(!d.is_empty());
                assert!(
                    !d.contains(char::REPLACEMENT_CHARACTER),
                    "half a character: {d:?}"
                );
                deltas.push(d);
            }
        }
        if let Some(d) = stream.finish().unwrap() {
            deltas.push(d);
        }
        assert_eq!(deltas.concat(), tok.decode(ids, skip).unwrap());
        deltas
    }

    #[test]
    fn stream_decoder_never_splits_a_character() {
        let jp = "今日の天気はどうですか？晴れです。🌸";
        for vocab in [MIN_VOCAB, 600, 4000] {
            let tok = builtin(vocab);
            let ids = tok.encode(jp, false).unwrap();
            // The test is only meaningful if some token really ends mid-character.
            let split = ids.iter().any(|&id| {
                tok.decode(&[id], false)
                    .unwrap()
                    .contains(char::REPLACEMENT_CHARACTER)
            });
            assert!(split, "vocab {vocab}: no token splits a character");
            let deltas = stream_all(&tok, &ids, false);
            assert_eq!(deltas.concat(), jp);
            assert!(deltas.len() > 3);

            for text in [MIXED, "Hello, how are you? I'm fine, thanks.", ""] {
                stream_all(&tok, &tok.encode(text, false).unwrap(), false);
            }
            let chat = "<|im_start|>assistant\nはい、元気です！<|im_end|>\n<|endoftext|>";
            let ids = tok.encode(chat, false).unwrap();
            assert_eq!(
                stream_all(&tok, &ids, true).concat(),
                "assistant\nはい、元気です！\n"
            );
            stream_all(&tok, &ids, false);
        }
    }

    #[test]
    fn stream_decoder_window_stays_short_and_finish_flushes() {
        let tok = builtin(600);
        let long = "こんにちは、世界。Hello world! ".repeat(200);
        let ids = tok.encode(&long, false).unwrap();
        let mut stream = StreamDecoder::new(Arc::new(tok.clone()), false);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&stream.push(id).unwrap().unwrap_or_default());
            assert!(stream.ids.len() < 16, "window grew to {}", stream.ids.len());
        }
        out.push_str(&stream.finish().unwrap().unwrap_or_default());
        assert_eq!(out, long);

        // A generation cut in the middle of a character: the rest comes out of finish() as
        // U+FFFD, exactly like a full decode, and nothing before it was held back.
        let bytes = builtin(MIN_VOCAB);
        let mut cut = bytes.encode("晴れあ", false).unwrap();
        assert_eq!(cut.len(), 9, "no merges: one token per byte");
        cut.pop();
        let full = bytes.decode(&cut, false).unwrap();
        assert_eq!(full, "晴れ\u{FFFD}");
        let mut stream = StreamDecoder::new(&bytes, false);
        let mut out = String::new();
        for &id in &cut {
            out.push_str(&stream.push(id).unwrap().unwrap_or_default());
        }
        assert_eq!(out, "晴れ");
        out.push_str(&stream.finish().unwrap().unwrap_or_default());
        assert_eq!(out, full);
        assert_eq!(stream.finish().unwrap(), None);
    }

    #[test]
    fn stream_decoder_matches_full_decode_on_random_tokens() {
        // What an untrained model produces: arbitrary tokens, many of them lone bytes that are
        // not valid UTF-8. Such bytes are U+FFFD in the full decode too, so deltas may contain
        // it, but the stream must still be exactly the full decode, and the window short.
        let tok = builtin(MIN_VOCAB + 100);
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as u32
        };
        for _ in 0..50 {
            let ids: Vec<u32> = (0..200).map(|_| next(tok.vocab_size())).collect();
            let mut stream = StreamDecoder::new(&tok, true);
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&stream.push(id).unwrap().unwrap_or_default());
                assert!(stream.ids.len() < 40, "window grew to {}", stream.ids.len());
            }
            out.push_str(&stream.finish().unwrap().unwrap_or_default());
            assert_eq!(out, tok.decode(&ids, true).unwrap());
        }
    }
}
