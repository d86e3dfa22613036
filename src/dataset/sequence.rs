//! An example as the model sees it: tokens, and which of them are learned or scored. Training
//! ([`crate::train`]) and the held-out figures ([`crate::eval`]) both build their sequences
//! here, so a model is scored on exactly what it was trained on.
//!
//! **What is scored.** A chat example is rendered whole with the model's own chat template and
//! only the tokens of the assistant's message contents are scored (the role markers, the user's
//! turns and the end-of-turn token are context). A text document is scored on every token, after
//! the model's BOS token when it has one.
//!
//! **Finding the assistant's content.** For assistant message `i`, the template renders the
//! messages before it with the generation prompt (`…<|im_start|>assistant\n`) and the messages
//! through it without. Both must be prefixes of the whole rendering (true of ChatML and of every
//! template that renders a conversation message by message); the content is then found right
//! after the first of them, as written or, for templates that strip it, trimmed. Templates that
//! rewrite earlier turns make the example be skipped, with the reason.
//!
//! **Tokens.** The rendering is cut at the content spans and each piece is tokenized on its own,
//! so the scored tokens decode to exactly the content. With a byte-level tokenizer and ChatML
//! this is the same as tokenizing the whole text (every span starts after a newline or a special
//! token and ends before one); examples where it is not are counted.

use std::ops::Range;
use std::path::Path;

use super::{Example, ExampleContent};
use crate::model::chat_template::TokenizerConfig;
use crate::model::token_bytes::TokenBytes;
use crate::model::{ChatMessage, ChatTemplate, ModelError, TextTokenizer};

/// An example tokenized and marked for scoring.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSequence {
    pub tokens: Vec<u32>,
    /// Whether each token is scored (predicted from the ones before it, and counted).
    pub scored: Vec<bool>,
    /// The scored stretches of text, for byte counts and the n-gram.
    pub segments: Vec<Segment>,
    /// Tokenizing the whole rendering would have given other tokens.
    pub tokenization_differs: bool,
}

/// One scored stretch of text (an assistant message, a document).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Its token positions in the sequence.
    pub tokens: Range<usize>,
    /// The bytes its tokens decode to.
    pub bytes: Vec<u8>,
    /// Leading bytes that belong to unscored tokens (context only).
    pub skip: usize,
}

impl ScoredSequence {
    /// Bytes of the scored tokens.
    pub fn scored_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.bytes.len() - s.skip).sum()
    }

    pub fn scored_tokens(&self) -> usize {
        self.scored.iter().filter(|&&s| s).count()
    }
}

/// What [`SequenceBuilder::prepare`] makes of an example.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    Ready(ScoredSequence),
    /// Nothing to score, or the template cannot render it: the reason.
    Skipped(String),
}

/// Turns examples into scored token sequences the way a model directory's tokenizer and chat
/// template see them.
#[derive(Debug, Clone)]
pub struct SequenceBuilder {
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    bos: Option<u32>,
    bytes: TokenBytes,
}

impl SequenceBuilder {
    /// The builder of a model directory: its tokenizer, chat template (if any) and BOS token
    /// (`bos_token` of `tokenizer_config.json`, else `bos_token_id` of `config.json`).
    pub fn for_model(dir: &Path, tokenizer: &TextTokenizer) -> Result<Self, ModelError> {
        let config = TokenizerConfig::load(dir)?;
        let template = match config.chat_template() {
            Some(source) => Some(ChatTemplate::new(
                source,
                config.bos_token().map(str::to_string),
                config.eos_token().map(str::to_string),
            )?),
            None => None,
        };
        let bos = config
            .bos_token()
            .and_then(|t| tokenizer.token_to_id(t))
            .or_else(|| {
                crate::model::load_config(dir)
                    .ok()
                    .and_then(|c| c.bos_token_id)
            });
        Ok(Self::new(tokenizer.clone(), template, bos))
    }

    pub fn new(tokenizer: TextTokenizer, template: Option<ChatTemplate>, bos: Option<u32>) -> Self {
        let bytes = TokenBytes::new(&tokenizer);
        SequenceBuilder {
            tokenizer,
            template,
            bos,
            bytes,
        }
    }

    /// Tokenizes `example` and marks what is scored (see the module docs).
    pub fn prepare(&self, example: &Example) -> Result<Prepared, ModelError> {
        match &example.content {
            ExampleContent::Chat(messages) => self.prepare_chat(messages),
            ExampleContent::Text(text) => self.prepare_text(text),
        }
    }

    fn prepare_text(&self, text: &str) -> Result<Prepared, ModelError> {
        let mut out = Pieces::default();
        if let Some(bos) = self.bos {
            out.push(&[bos], false, &self.bytes);
        }
        let ids = self.tokenizer.encode(text, false)?;
        out.push(&ids, true, &self.bytes);
        Ok(out.finish(false))
    }

    fn prepare_chat(&self, messages: &[ChatMessage]) -> Result<Prepared, ModelError> {
        let Some(template) = &self.template else {
            return Err(ModelError::Template(
                "the model has no chat template: chat data cannot be scored (use text data)".into(),
            ));
        };
        let (full, spans) = match assistant_spans(template, messages) {
            Ok(found) => found,
            Err(reason) => return Ok(Prepared::Skipped(reason)),
        };
        let Some(last) = spans.last() else {
            return Ok(Prepared::Skipped(
                "no assistant message with content".into(),
            ));
        };
        let mut out = Pieces::default();
        let mut at = 0;
        for span in &spans {
            let context = self.tokenizer.encode(&full[at..span.start], false)?;
            out.push(&context, false, &self.bytes);
            let content = self.tokenizer.encode(&full[span.clone()], false)?;
            out.push(&content, true, &self.bytes);
            at = span.end;
        }
        let whole = self.tokenizer.encode(&full[..last.end], false)?;
        let differs = whole != out.tokens;
        Ok(out.finish(differs))
    }
}

/// A sequence being assembled from pieces.
#[derive(Default)]
struct Pieces {
    tokens: Vec<u32>,
    scored: Vec<bool>,
    segments: Vec<Segment>,
}

impl Pieces {
    fn push(&mut self, ids: &[u32], content: bool, bytes: &TokenBytes) {
        let start = self.tokens.len();
        self.tokens.extend_from_slice(ids);
        if !content {
            self.scored.extend(ids.iter().map(|_| false));
            return;
        }
        let mut segment = Segment {
            tokens: start..start + ids.len(),
            bytes: Vec::new(),
            skip: 0,
        };
        for (i, &id) in ids.iter().enumerate() {
            // The first token of a sequence has nothing to be predicted from.
            let scored = start + i > 0;
            self.scored.push(scored);
            let token_bytes = bytes.of(id);
            if !scored {
                segment.skip += token_bytes.len();
            }
            segment.bytes.extend_from_slice(token_bytes);
        }
        if !ids.is_empty() {
            self.segments.push(segment);
        }
    }

    fn finish(self, tokenization_differs: bool) -> Prepared {
        if !self.scored.iter().any(|&s| s) {
            return Prepared::Skipped("nothing to score".into());
        }
        Prepared::Ready(ScoredSequence {
            tokens: self.tokens,
            scored: self.scored,
            segments: self.segments,
            tokenization_differs,
        })
    }
}

/// The whole rendering of `messages` and the byte ranges of the assistant's contents in it,
/// found by rendering prefixes (see the module docs). An error is the reason to skip.
pub fn assistant_spans(
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<(String, Vec<Range<usize>>), String> {
    let render = |messages: &[ChatMessage], prompt: bool| {
        template
            .render(messages, prompt)
            .map_err(|e| format!("the chat template cannot render it: {e}"))
    };
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len()
        {
            return Err(format!(
                "the chat template does not render the conversation message by message \
                 (message {i} changes what comes before it)"
            ));
        }
        let rendered = &through[before.len()..];
        let content = if rendered.contains(message.content.as_str()) {
            message.content.as_str()
        } else {
            message.content.trim()
        };
        if content.is_empty() {
            continue;
        }
        let at = rendered.find(content).ok_or_else(|| {
            format!("the content of message {i} does not appear in its rendering")
        })?;
        let start = before.len() + at;
        spans.push(start..start + content.len());
    }
    Ok((full, spans))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::chat_template::CHATML_TEMPLATE;
    use crate::train::bpe::{builtin_text, train_byte_level_bpe};

    pub(crate) fn builder() -> SequenceBuilder {
        let tokenizer = train_byte_level_bpe(builtin_text().lines(), 600).unwrap();
        let template = ChatTemplate::new(CHATML_TEMPLATE, None, None).unwrap();
        SequenceBuilder::new(tokenizer, Some(template), Some(0))
    }

    pub(crate) fn chat(messages: Vec<ChatMessage>) -> Example {
        Example {
            line: 1,
            content: ExampleContent::Chat(messages),
            language: None,
        }
    }

    #[test]
    fn only_the_assistant_content_is_scored_and_its_bytes_are_exact() {
        let b = builder();
        let example = chat(vec![
            ChatMessage::system("あなたは親切なアシスタントです。"),
            ChatMessage::user("今日の天気はどうですか？"),
            ChatMessage::assistant("晴れです。🌸 散歩日和ですね！"),
            ChatMessage::user("What about tomorrow?"),
            ChatMessage::assistant("  Rain, I'm afraid.\n"),
        ]);
        let Prepared::Ready(seq) = b.prepare(&example).unwrap() else {
            panic!("skipped")
        };
        assert!(!seq.tokenization_differs);
        assert_eq!(seq.segments.len(), 2);
        let scored: Vec<u32> = seq
            .tokens
            .iter()
            .zip(&seq.scored)
            .filter(|(_, &s)| s)
            .map(|(&t, _)| t)
            .collect();
        let text = b.tokenizer.decode(&scored, false).unwrap();
        assert_eq!(text, "晴れです。🌸 散歩日和ですね！  Rain, I'm afraid.\n");
        assert_eq!(seq.scored_bytes(), text.len());
        for s in &seq.segments {
            assert_eq!(s.skip, 0);
            let ids = &seq.tokens[s.tokens.clone()];
            assert_eq!(
                s.bytes,
                b.tokenizer.decode(ids, false).unwrap().into_bytes(),
                "the byte table agrees with decoding"
            );
        }
    }

    #[test]
    fn examples_without_assistant_content_are_skipped_with_a_reason() {
        let b = builder();
        for messages in [
            vec![ChatMessage::user("hi")],
            vec![ChatMessage::user("hi"), ChatMessage::assistant("")],
        ] {
            match b.prepare(&chat(messages)).unwrap() {
                Prepared::Skipped(reason) => assert!(reason.contains("no assistant"), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_detected() {
        // Puts a count of all messages in front: every prefix renders differently.
        let template = ChatTemplate::new(
            "{{ messages|length }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let err = assistant_spans(
            &template,
            &[ChatMessage::user("a"), ChatMessage::assistant("b")],
        )
        .unwrap_err();
        assert!(err.contains("message by message"), "{err}");
    }

    #[test]
    fn text_documents_are_scored_after_bos_and_without_it_skip_the_first_token() {
        let mut b = builder();
        let doc = Example {
            line: 1,
            content: ExampleContent::Text("こんにちは、世界。".into()),
            language: None,
        };
        let Prepared::Ready(seq) = b.prepare(&doc).unwrap() else {
            panic!()
        };
        assert_eq!(seq.tokens[0], 0);
        assert_eq!(seq.scored_tokens(), seq.tokens.len() - 1);
        assert_eq!(seq.scored_bytes(), "こんにちは、世界。".len());

        b.bos = None;
        let Prepared::Ready(seq) = b.prepare(&doc).unwrap() else {
            panic!()
        };
        let first = b.bytes.of(seq.tokens[0]).len();
        assert!(first > 0);
        assert_eq!(seq.segments[0].skip, first);
        assert_eq!(seq.scored_bytes(), "こんにちは、世界。".len() - first);
    }
}
