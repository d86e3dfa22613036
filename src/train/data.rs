//! Training data: the examples of a corpus file → fixed-length token rows with a loss mask,
//! packed without padding, and the batches a training run walks through.
//!
//! **What is learned.** A chat example (what `kaiwa export-corpus` writes) is rendered with the
//! model's own chat template, exactly as the eval scores it and the bot prompts it
//! ([`SequenceBuilder`]), and the loss is on the assistant's message contents *and the
//! end-of-turn token after each*, so the model learns when to stop. A text document (plain
//! text, sentence pairs) is learned whole, after the BOS token, so chat data and text can be
//! mixed in one run. With `pretrain`, chat examples are learned whole too (every token after
//! the first, the user's turns and the template's markup included).
//!
//! **Packing.** Examples are concatenated in a seeded order and cut into rows of `context + 1`
//! tokens (inputs are the first `context`, targets the last `context`), so no compute goes to
//! padding; an example longer than a row continues on the next. Attention is not masked at
//! example boundaries (the usual packing trade-off: a little cross-talk for no waste).
//!
//! **Order.** Epoch `e` visits the rows in a permutation seeded by `(seed, e)`; a position in the
//! run is `(epoch, index)`, which a checkpoint records so that a resumed run sees the same
//! batches as an uninterrupted one.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dataset::sequence::{Prepared, SequenceBuilder};
use crate::dataset::{Example, ExampleContent};
use crate::model::ModelError;

/// What the loss is taken on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Chat fine-tuning: the assistant's contents and end-of-turn tokens (text documents whole).
    Chat,
    /// Every token of every example.
    Pretrain,
}

/// Rows of `context + 1` tokens with a mask over their targets.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedData {
    pub context: usize,
    /// Every row holds `context + 1` tokens.
    pub rows: Vec<Vec<u32>>,
    /// `masks[r][i]`: the target `rows[r][i + 1]` counts in the loss (`context` entries).
    pub masks: Vec<Vec<bool>>,
    /// Examples used, and skipped with the reason of the first one.
    pub examples: usize,
    pub skipped: usize,
    pub first_skip_reason: Option<String>,
}

/// One example as tokens and which of them are targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// `learn[i]`: token `i` is a target (predicted from the ones before it).
    pub learn: Vec<bool>,
}

/// Tokenizes one example for `objective`; `Ok(None)` with nothing to learn. `eos` is the
/// end-of-turn token learned after each assistant message.
pub fn tokens_of(
    builder: &SequenceBuilder,
    example: &Example,
    objective: Objective,
    eos: u32,
) -> Result<Result<Tokens, String>, ModelError> {
    let is_chat = matches!(example.content, ExampleContent::Chat(_));
    let seq = match builder.prepare(example)? {
        Prepared::Ready(seq) => seq,
        Prepared::Skipped(reason) => return Ok(Err(reason)),
    };
    let mut ids = seq.tokens;
    let mut learn = seq.scored;
    if objective == Objective::Pretrain {
        for (i, flag) in learn.iter_mut().enumerate() {
            *flag = i > 0;
        }
    }
    if is_chat {
        // The end-of-turn token after every assistant message is learned too; the rendering
        // stops at the last content, so its end-of-turn token is appended.
        for segment in &seq.segments {
            let after = segment.tokens.end;
            if after < ids.len() && ids[after] == eos {
                learn[after] = true;
            }
        }
        ids.push(eos);
        learn.push(true);
    }
    Ok(Ok(Tokens { ids, learn }))
}

/// Tokenizes every example and packs them into rows of `context + 1` tokens, in an order
/// seeded by `seed`.
pub fn pack(
    builder: &SequenceBuilder,
    examples: &[Example],
    objective: Objective,
    eos: u32,
    context: usize,
    seed: u64,
) -> Result<PackedData, ModelError> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut stream: Vec<u32> = Vec::new();
    let mut learn: Vec<bool> = Vec::new();
    let mut out = PackedData {
        context,
        rows: Vec::new(),
        masks: Vec::new(),
        examples: 0,
        skipped: 0,
        first_skip_reason: None,
    };
    for i in order {
        match tokens_of(builder, &examples[i], objective, eos)? {
            Ok(t) => {
                out.examples += 1;
                stream.extend(t.ids);
                learn.extend(t.learn);
            }
            Err(reason) => {
                out.skipped += 1;
                out.first_skip_reason.get_or_insert(reason);
            }
        }
    }
    // Rows overlap by one token: the last token of a row is the first input of the next, so
    // every token after the first is a target exactly once.
    let mut start = 0;
    while start + 1 < stream.len() {
        let end = (start + context + 1).min(stream.len());
        let mut row = stream[start..end].to_vec();
        let mut mask: Vec<bool> = learn[start + 1..end].to_vec();
        // The tail row is padded with masked-out tokens.
        row.resize(context + 1, eos);
        mask.resize(context, false);
        if mask.iter().any(|&m| m) {
            out.rows.push(row);
            out.masks.push(mask);
        }
        start = end - 1;
    }
    Ok(out)
}

/// The rows of epoch `epoch` in their seeded order.
pub fn epoch_order(rows: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    let mixed = seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mixed));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::chat_template::ChatTemplate;
    use crate::model::tokenizer::IM_END;
    use crate::model::ChatMessage;
    use crate::train::bpe::{builtin_text, train_byte_level_bpe};

    fn builder() -> (SequenceBuilder, u32, crate::model::TextTokenizer) {
        let tok = train_byte_level_bpe(builtin_text().lines(), 600).unwrap();
        let template = ChatTemplate::new(
            crate::model::chat_template::TokenizerConfig::chatml()
                .chat_template()
                .unwrap(),
            None,
            Some(IM_END.into()),
        )
        .unwrap();
        let eos = tok.token_to_id(IM_END).unwrap();
        (
            SequenceBuilder::new(tok.clone(), Some(template), None),
            eos,
            tok,
        )
    }

    fn chat(line: usize, turns: &[(&str, &str)]) -> Example {
        Example {
            line,
            content: ExampleContent::Chat(
                turns
                    .iter()
                    .map(|(r, c)| ChatMessage::new(*r, *c))
                    .collect(),
            ),
            language: None,
        }
    }

    #[test]
    fn the_assistant_contents_and_their_end_of_turn_are_learned_and_nothing_else() {
        let (b, eos, tok) = builder();
        let ex = chat(
            1,
            &[
                ("system", "やさしく答えて"),
                ("user", "今日の天気は？"),
                ("assistant", "晴れです。"),
                ("user", "ありがとう"),
                ("assistant", "どういたしまして！"),
            ],
        );
        let t = tokens_of(&b, &ex, Objective::Chat, eos).unwrap().unwrap();
        let learned: Vec<u32> = t
            .ids
            .iter()
            .zip(&t.learn)
            .filter(|(_, &l)| l)
            .map(|(&id, _)| id)
            .collect();
        let text = tok.decode(&learned, false).unwrap();
        assert_eq!(
            text,
            format!("晴れです。{IM_END}どういたしまして！{IM_END}")
        );
        assert_eq!(*t.ids.last().unwrap(), eos);
    }

    #[test]
    fn packing_fills_rows_without_padding_and_learns_every_target_once() {
        let (b, eos, _) = builder();
        let examples: Vec<Example> = (0..30)
            .map(|i| {
                chat(
                    i,
                    &[
                        ("user", &format!("question number {i}?")),
                        (
                            "assistant",
                            &format!("answer {i}, with some words to learn."),
                        ),
                    ],
                )
            })
            .collect();
        let total_learned: usize = examples
            .iter()
            .map(|e| {
                let t = tokens_of(&b, e, Objective::Chat, eos).unwrap().unwrap();
                t.learn.iter().skip(1).filter(|&&l| l).count()
            })
            .sum();
        let packed = pack(&b, &examples, Objective::Chat, eos, 32, 7).unwrap();
        assert_eq!(packed.examples, 30);
        assert!(packed.rows.iter().all(|r| r.len() == 33));
        assert!(packed.masks.iter().all(|m| m.len() == 32));
        let packed_learned: usize = packed
            .masks
            .iter()
            .map(|m| m.iter().filter(|&&x| x).count())
            .sum();
        // Each example's first token is not a target on its own but may be one after packing
        // (it follows the previous example): at least every per-example target is learned.
        assert!(
            packed_learned >= total_learned,
            "{packed_learned} < {total_learned}"
        );
        // No padding but in the last row: the rows cover the token stream once.
        let stream: usize = examples
            .iter()
            .map(|e| {
                tokens_of(&b, e, Objective::Chat, eos)
                    .unwrap()
                    .unwrap()
                    .ids
                    .len()
            })
            .sum();
        assert_eq!(packed.rows.len(), (stream - 1).div_ceil(32));
        assert_eq!(
            packed,
            pack(&b, &examples, Objective::Chat, eos, 32, 7).unwrap()
        );
        assert_ne!(
            packed.rows,
            pack(&b, &examples, Objective::Chat, eos, 32, 8)
                .unwrap()
                .rows
        );
        assert_eq!(epoch_order(10, 1, 0), epoch_order(10, 1, 0));
        assert_ne!(epoch_order(10, 1, 0), epoch_order(10, 1, 1));
    }

    #[test]
    fn text_documents_are_learned_whole_under_both_objectives() {
        let (b, eos, _) = builder();
        let doc = Example {
            line: 1,
            content: ExampleContent::Text("今日はいい天気ですね。".into()),
            language: None,
        };
        for objective in [Objective::Chat, Objective::Pretrain] {
            let t = tokens_of(&b, &doc, objective, eos).unwrap().unwrap();
            assert!(t.learn.iter().skip(1).all(|&l| l));
            assert_ne!(t.ids.last(), Some(&eos), "no end-of-turn after a document");
        }
    }

    #[test]
    fn pretraining_on_a_conversation_learns_every_token_but_the_first() {
        let (b, eos, _) = builder();
        let ex = chat(1, &[("user", "こんにちは"), ("assistant", "どうも")]);
        let chat_only = tokens_of(&b, &ex, Objective::Chat, eos).unwrap().unwrap();
        let whole = tokens_of(&b, &ex, Objective::Pretrain, eos)
            .unwrap()
            .unwrap();
        assert_eq!(chat_only.ids, whole.ids);
        assert!(!whole.learn[0]);
        assert!(whole.learn.iter().skip(1).all(|&l| l));
        assert!(chat_only.learn.iter().filter(|&&l| l).count() < whole.ids.len() - 1);
    }
}
