//! Training kaiwa's byte-level BPE tokenizers (the GPT-2 / Llama 3 / Qwen family), in the
//! `tokenizers` library's format that [`crate::model::tokenizer::TextTokenizer`] loads; with
//! optional Japanese handling in the pre-tokenizer. `kaiwa train-tokenizer` and a model made
//! from scratch (`kaiwa init-model`, `kaiwa train` without a base) train theirs here.

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::model::tokenizer::{TextTokenizer, SPECIAL_TOKENS};
use crate::model::ModelError;

/// The smallest vocabulary a byte-level BPE can have: every byte plus the special tokens.
pub const MIN_VOCAB: usize = 256 + SPECIAL_TOKENS.len();

/// A small bilingual (Japanese and English) everyday text, used to train the tokenizer of
/// randomly initialised models before real training data exists.
pub fn builtin_text() -> &'static str {
    include_str!("builtin_text.txt")
}

/// Trains a byte-level BPE tokenizer (the GPT-2 / Llama 3 / Qwen family of tokenizers) on
/// `texts`, with [`SPECIAL_TOKENS`] as ids 0, 1, 2 and at most `vocab_size` tokens.
///
/// The result is deterministic: the same texts give the same `tokenizer.json`. A pair is merged
/// only if it occurs at least twice, so a small text gives fewer than `vocab_size` tokens rather
/// than tokens that memorise single sentences.
pub fn train_byte_level_bpe<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
) -> Result<TextTokenizer, ModelError> {
    train_bpe(texts, vocab_size, false)
}

/// The pre-tokenizer regex of [`train_bpe`]'s Japanese handling: a run of kanji or katakana
/// with the hiragana after it (okurigana, particles), or a run of hiragana alone — roughly a
/// bunsetsu (今日は / 天気がいいですね / ラーメンを / 食べたい), so merges learn words and their
/// endings instead of arbitrary spans of a sentence that has no spaces.
pub const JAPANESE_CHUNKS: &str = r"[\p{Han}\p{Katakana}ー々〆ヶ]+\p{Hiragana}*|\p{Hiragana}+";

/// [`train_byte_level_bpe`], optionally with Japanese handling in the pre-tokenizer: Japanese
/// text is first cut into [`JAPANESE_CHUNKS`] (everything else goes to the GPT-2 split as
/// before). The tokenizer stays lossless: no normalisation, and decoding gives the text back.
pub fn train_bpe<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
    japanese_chunks: bool,
) -> Result<TextTokenizer, ModelError> {
    if vocab_size < MIN_VOCAB {
        return Err(ModelError::Invalid(format!(
            "a byte-level tokenizer needs a vocabulary of at least {MIN_VOCAB} \
             (256 bytes and {} special tokens), got {vocab_size}",
            SPECIAL_TOKENS.len()
        )));
    }
    // The same ByteLevel component serves as pre-tokenizer (bytes to printable characters, GPT-2
    // regex split), post-processor and decoder. No prefix space: kaiwa's prompts are ChatML
    // where a leading space would change the text. Offsets are not trimmed so they stay exact.
    let byte_level = ByteLevel::new(false, false, true);
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        // All 256 byte characters, even those absent from the text, so nothing is unknown.
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(specials)
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(if japanese_chunks {
        let split = Split::new(
            SplitPattern::Regex(JAPANESE_CHUNKS.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ModelError::Tokenize(format!("the Japanese pre-tokenizer: {e}")))?;
        PreTokenizerWrapper::Sequence(Sequence::new(vec![split.into(), byte_level.into()]))
    } else {
        byte_level.into()
    }))
    .with_post_processor(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(|e| ModelError::Tokenize(format!("cannot build the tokenizer to train: {e}")))?;
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| ModelError::Tokenize(format!("tokenizer training failed: {e}")))?;
    Ok(TextTokenizer::from(Tokenizer::from(tokenizer)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(vocab: usize) -> TextTokenizer {
        train_byte_level_bpe(builtin_text().lines(), vocab).unwrap()
    }

    #[test]
    fn builtin_text_is_bilingual_and_sized() {
        let text = builtin_text();
        assert!(
            (30_000..=60_000).contains(&text.len()),
            "{} bytes",
            text.len()
        );
        let japanese = text
            .chars()
            .filter(|c| ('\u{3040}'..='\u{9fff}').contains(c))
            .count();
        let ascii_letters = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
        assert!(
            japanese > 5_000 && ascii_letters > 10_000,
            "{japanese} {ascii_letters}"
        );
    }

    #[test]
    fn training_is_deterministic() {
        let a = builtin(1000);
        let b = builtin(1000);
        assert_eq!(
            a.inner().to_string(false).unwrap(),
            b.inner().to_string(false).unwrap()
        );
        assert!(
            a.vocab_size() > 500 && a.vocab_size() <= 1000,
            "{}",
            a.vocab_size()
        );
    }

    #[test]
    fn too_small_vocabulary_is_an_error() {
        assert!(matches!(
            train_byte_level_bpe(["a"].into_iter(), 100),
            Err(ModelError::Invalid(_))
        ));
    }
}
