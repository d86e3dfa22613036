//! Reply generation: chat messages in, streamed text out.
//!
//! [`Generator`] ties a model directory together (tokenizer, chat template, ONNX graph,
//! generation defaults). A reply is one prefill of the rendered prompt followed by one token at
//! a time with the KV cache carried between steps. Text is streamed as deltas that never split a
//! UTF-8 character and never show the beginning of a stop string that is then cut.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::chat_template::{ChatMessage, ChatTemplate, TokenizerConfig};
use super::config::{GenerationConfig, LlamaConfig, Sampling};
use super::runtime::OnnxDecoder;
use super::sampler::{fast_log_sum_exp, log_sum_exp, Sampler, SamplingParams};
use super::threads::default_threads;
use super::tokenizer::{StreamDecoder, TextTokenizer};
use super::utf8::Utf8Guard;
use super::{
    ensure_onnx, read_json, ModelError, CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE,
};

/// Context length assumed when a model directory does not state one.
const DEFAULT_CONTEXT: usize = 2048;

/// Settings of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Generation stops before any of these strings; the string itself is not returned.
    pub stop: Vec<String>,
    /// Classifier-free guidance ("Stay on topic with Classifier-Free Guidance", Sanchez et
    /// al. 2023; Hugging Face's `guidance_scale`): each step's log-probabilities are taken as
    /// `u + scale × (c − u)`, where `c` are the model's with the conversation and `u` its
    /// log-probabilities with the last user message emptied, so what that message adds is
    /// amplified. 1 is none; above 1 costs a second decoder pass per token.
    pub guidance_scale: f32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            sampling: SamplingParams::default(),
            max_new_tokens: 256,
            seed: 0,
            stop: Vec::new(),
            guidance_scale: 1.0,
        }
    }
}

impl GenerateOptions {
    /// Checks the sampling settings and the guidance scale.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.sampling.validate()?;
        let g = self.guidance_scale;
        if !g.is_finite() || g < 0.0 {
            return Err(ModelError::Invalid(format!(
                "guidance_scale must be 0 or more, got {g}"
            )));
        }
        Ok(())
    }

    /// The defaults of a model's `generation_config.json`, over kaiwa's own.
    pub fn from_generation_config(g: &GenerationConfig) -> Self {
        GenerateOptions::default().overridden_by(&g.sampling())
    }

    /// The settings as `key=value` pairs (`temperature=0.7 top_k=40 … seed=0`), as a reply's
    /// provenance records them.
    pub fn describe(&self) -> String {
        let s = &self.sampling;
        format!(
            "temperature={} top_k={} top_p={} repetition_penalty={} max_new_tokens={} \
             guidance_scale={} seed={}",
            s.temperature,
            s.top_k,
            s.top_p,
            s.repetition_penalty,
            self.max_new_tokens,
            self.guidance_scale,
            self.seed
        )
    }

    /// These options with every setting that `g` gives replaced.
    pub fn overridden_by(mut self, g: &Sampling) -> Self {
        let s = &mut self.sampling;
        s.temperature = g.temperature.unwrap_or(s.temperature);
        s.top_k = g.top_k.unwrap_or(s.top_k);
        s.top_p = g.top_p.unwrap_or(s.top_p);
        s.repetition_penalty = g.repetition_penalty.unwrap_or(s.repetition_penalty);
        self.max_new_tokens = g.max_new_tokens.unwrap_or(self.max_new_tokens);
        self.guidance_scale = g.guidance_scale.unwrap_or(self.guidance_scale);
        self
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` was reached, or the model's context is full.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// A finished reply and how it was made.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    /// The generated token ids (without the end-of-sequence token).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub stop: StopReason,
    /// Older messages left out so the prompt fits the context.
    pub dropped_messages: usize,
    pub prefill: Duration,
    pub decode: Duration,
}

/// A loaded model directory, ready to reply. Share it between threads with `Arc`.
#[derive(Debug)]
pub struct Generator {
    dir: PathBuf,
    decoder: Arc<OnnxDecoder>,
    tokenizer: Arc<TextTokenizer>,
    template: ChatTemplate,
    eos_ids: Vec<u32>,
    context_len: usize,
    defaults: GenerateOptions,
    utf8: Utf8Guard,
    /// The token that ends a turn in the chat template (`<|im_end|>`), when the model names one.
    end_of_turn: Option<u32>,
}

impl Generator {
    /// Loads a model directory: `tokenizer.json`, the chat template, the ONNX graph, and
    /// `config.json` / `generation_config.json` when present. Generations run on
    /// [`default_threads`] threads.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_with_threads(dir, default_threads())
    }

    /// [`Generator::load`], with generations on `threads` threads (1: on the calling thread).
    /// A model home (`kaiwa retrain`) loads the version its `current` link points at.
    pub fn load_with_threads(dir: &Path, threads: usize) -> Result<Self, ModelError> {
        let resolved = super::resolve_dir(dir);
        let dir = resolved.as_path();
        if !dir.is_dir() {
            return Err(ModelError::NotAModelDir {
                path: dir.to_path_buf(),
                reason: "no such directory".into(),
            });
        }
        let config: Option<LlamaConfig> = optional_json(&dir.join(CONFIG_FILE))?;
        let generation: GenerationConfig =
            optional_json(&dir.join(GENERATION_CONFIG_FILE))?.unwrap_or_default();
        let tokenizer = Arc::new(TextTokenizer::load(&dir.join(TOKENIZER_FILE))?);
        let tokenizer_config = TokenizerConfig::load(dir)?;
        let source = tokenizer_config.chat_template().ok_or_else(|| {
            ModelError::Template(format!("{}: the model has no chat template", dir.display()))
        })?;
        let template = ChatTemplate::new(
            source,
            tokenizer_config.bos_token().map(str::to_string),
            tokenizer_config.eos_token().map(str::to_string),
        )?;
        let onnx = ensure_onnx(dir)?;
        let fallback = config.as_ref().map(|c| (c.kv_heads(), c.head_dim()));
        let mut decoder = OnnxDecoder::load_with_threads(&onnx, fallback, threads)?;
        if let Some(config) = &config {
            decoder = decoder.with_positions(config.context_len());
        }
        let decoder = Arc::new(decoder);

        let mut eos_ids: Vec<u32> = generation
            .eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .or_else(|| config.as_ref().map(LlamaConfig::eos_ids))
            .unwrap_or_default();
        if let Some(id) = tokenizer_config
            .eos_token()
            .and_then(|t| tokenizer.token_to_id(t))
        {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        if eos_ids.is_empty() {
            tracing::warn!(dir = %dir.display(), "the model names no end-of-sequence token; replies end only at max_new_tokens");
        }
        let context_len = config
            .as_ref()
            .map(LlamaConfig::context_len)
            .or(tokenizer_config.model_max_length())
            .unwrap_or(DEFAULT_CONTEXT);
        let end_of_turn = tokenizer_config
            .eos_token()
            .and_then(|t| tokenizer.token_to_id(t))
            .or_else(|| eos_ids.first().copied());
        Ok(Generator {
            end_of_turn,
            dir: dir.to_path_buf(),
            decoder,
            utf8: Utf8Guard::new(&tokenizer),
            tokenizer,
            template,
            eos_ids,
            context_len,
            defaults: GenerateOptions::from_generation_config(&generation),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn decoder(&self) -> &Arc<OnnxDecoder> {
        &self.decoder
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// The model's own generation settings (from `generation_config.json`).
    pub fn default_options(&self) -> GenerateOptions {
        self.defaults.clone()
    }

    /// Renders messages through the chat template (with the assistant prompt) and tokenizes
    /// them, dropping the oldest turns (never the system prompt) until the prompt leaves room
    /// for `reserve` new tokens. Returns the tokens and how many messages were left out.
    pub fn prompt_tokens(
        &self,
        messages: &[ChatMessage],
        reserve: usize,
    ) -> Result<(Vec<u32>, usize), ModelError> {
        let budget = self.context_len - reserve.min(self.context_len / 2);
        let mut kept: Vec<ChatMessage> = messages.to_vec();
        let mut dropped = 0;
        let mut trimmed_chars = 0;
        loop {
            let text = self.template.render(&kept, true)?;
            let ids = self.tokenizer.encode(&text, false)?;
            if ids.len() <= budget {
                if dropped > 0 || trimmed_chars > 0 {
                    tracing::warn!(
                        dropped_messages = dropped,
                        trimmed_chars,
                        prompt_tokens = ids.len(),
                        context = self.context_len,
                        "prompt longer than the model's context: cut from the oldest turns"
                    );
                }
                return Ok((ids, dropped));
            }
            let first_turn = kept.iter().position(|m| m.role != "system");
            let turns = kept.iter().filter(|m| m.role != "system").count();
            match first_turn {
                Some(i) if turns > 1 => {
                    kept.remove(i);
                    dropped += 1;
                }
                Some(i) => {
                    // One turn left and still too long: keep its end, which is what is answered.
                    let chars = kept[i].content.chars().count();
                    let excess = ids.len() - budget;
                    // Tokens and characters differ in number: cut in proportion, then re-check.
                    let cut = (excess * chars).div_ceil(ids.len()).max(1).min(chars);
                    if cut == 0 {
                        return Err(ModelError::Invalid(format!(
                            "the system prompt alone ({} tokens) does not fit the context of {}",
                            ids.len(),
                            self.context_len
                        )));
                    }
                    kept[i].content = kept[i].content.chars().skip(cut).collect();
                    trimmed_chars += cut;
                }
                None => {
                    return Err(ModelError::Invalid(format!(
                        "the system prompt alone ({} tokens) does not fit the context of {}",
                        ids.len(),
                        self.context_len
                    )))
                }
            }
        }
    }

    /// Generates a reply to `messages`, calling `on_delta` with each new piece of text.
    /// `on_delta` returns `false` to stop early. The model's matrix products run on the
    /// decoder's threads ([`OnnxDecoder::parallel`]), so `on_delta` may be called from one of
    /// them.
    pub fn generate(
        &self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_delta: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, ModelError> {
        options.validate()?;
        self.decoder
            .parallel(|| self.generate_here(messages, options, on_delta))
    }

    fn generate_here(
        &self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_delta: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, ModelError> {
        let (prompt, dropped) = self.prompt_tokens(messages, options.max_new_tokens)?;
        let room = self.context_len.saturating_sub(prompt.len());
        let max_new = options.max_new_tokens.min(room);
        let text_vocab = self.tokenizer.vocab_size();

        let started = Instant::now();
        let mut session = self.decoder.session()?;
        let mut logits = session.forward(&prompt)?;
        // With guidance, a second session follows the same reply after the unconditional prompt.
        let mut guide = match self.unconditional(messages, options)? {
            Some(tokens) => {
                let mut unconditional = self.decoder.session()?;
                let logits = unconditional.forward(&tokens)?;
                Some((unconditional, logits))
            }
            None => None,
        };
        let prefill = started.elapsed();
        let decode_started = Instant::now();

        let mut sampler = Sampler::new(options.sampling.clone(), options.seed);
        let mut history = prompt.clone();
        let mut stream = StreamDecoder::new(Arc::clone(&self.tokenizer), true);
        let mut out = StopText::new(&options.stop);
        let mut new_tokens = 0;
        let mut stop = StopReason::Length;
        let mut owed = 0;
        while new_tokens < max_new {
            if let Some((_, unconditional)) = &guide {
                guided(&mut logits, unconditional, options.guidance_scale);
            }
            // Rows past the tokenizer's vocabulary are padding: never pick them.
            for l in logits.iter_mut().skip(text_vocab) {
                *l = f32::NEG_INFINITY;
            }
            self.utf8.mask(owed, &mut logits);
            let token = sampler.sample(&mut logits, &history);
            if self.eos_ids.contains(&token) {
                stop = StopReason::Eos;
                break;
            }
            owed = self.utf8.advance(owed, token);
            history.push(token);
            new_tokens += 1;
            if let Some(delta) = stream.push(token)? {
                match out.push(&delta) {
                    Push::Emit(text) if !text.is_empty() && !on_delta(&text) => {
                        stop = StopReason::Cancelled;
                        break;
                    }
                    Push::Stopped(text) => {
                        if !text.is_empty() {
                            on_delta(&text);
                        }
                        stop = StopReason::StopString;
                        break;
                    }
                    _ => {}
                }
            }
            if new_tokens < max_new {
                logits = session.forward(&[token])?;
                if let Some((unconditional, logits)) = &mut guide {
                    *logits = unconditional.forward(&[token])?;
                }
            }
        }
        if stop != StopReason::StopString && stop != StopReason::Cancelled {
            let rest = stream.finish()?.unwrap_or_default();
            let tail = match out.push(&rest) {
                Push::Stopped(text) => {
                    stop = StopReason::StopString;
                    text
                }
                Push::Emit(text) => text + &out.flush(),
            };
            if !tail.is_empty() {
                on_delta(&tail);
            }
        }
        Ok(Generation {
            text: out.into_text(),
            tokens: history.split_off(prompt.len()),
            prompt_tokens: prompt.len(),
            new_tokens,
            stop,
            dropped_messages: dropped,
            prefill,
            decode: decode_started.elapsed(),
        })
    }

    /// How likely the model finds each of `replies` as its next message after `messages`: per
    /// reply, the sum of the log-probabilities of its tokens and of the end of its turn, and how
    /// many tokens that is. The prompt is fed once and each reply continues from its cache.
    /// Replies are cut to what fits the context.
    pub fn score_replies(
        &self,
        messages: &[ChatMessage],
        replies: &[&str],
    ) -> Result<Vec<ReplyLikelihood>, ModelError> {
        let end = self.end_of_turn.ok_or_else(|| {
            ModelError::Invalid("the model names no end-of-turn token to score replies by".into())
        })?;
        let reserve = self.context_len / 4;
        let (prompt, _) = self.prompt_tokens(messages, reserve)?;
        self.decoder.parallel(|| {
            let mut session = self.decoder.session()?;
            let first = session.forward(&prompt)?;
            let room = self.context_len.saturating_sub(prompt.len()).max(1);
            replies
                .iter()
                .map(|reply| {
                    let mut ids = self.tokenizer.encode(reply, false)?;
                    ids.truncate(room - 1);
                    let mut log_prob = log_prob_of(&first, ids.first().copied().unwrap_or(end));
                    if !ids.is_empty() {
                        let rows = session.fork()?.forward_all(&ids)?;
                        let next = ids[1..].iter().copied().chain([end]);
                        log_prob += rows
                            .iter()
                            .zip(next)
                            .map(|(l, t)| log_prob_of(l, t))
                            .sum::<f64>();
                    }
                    Ok(ReplyLikelihood {
                        log_prob,
                        tokens: ids.len() + 1,
                    })
                })
                .collect()
        })
    }

    /// The prompt that guidance contrasts with: the same conversation with the last user
    /// message's content emptied (its turn kept, so the template renders as usual). `None`
    /// without guidance or without a user message.
    fn unconditional(
        &self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
    ) -> Result<Option<Vec<u32>>, ModelError> {
        if options.guidance_scale == 1.0 {
            return Ok(None);
        }
        let Some(last) = messages.iter().rposition(|m| m.role == "user") else {
            return Ok(None);
        };
        let mut kept = messages.to_vec();
        kept[last].content.clear();
        let (ids, _) = self.prompt_tokens(&kept, options.max_new_tokens)?;
        Ok(Some(ids))
    }
}

/// The log-probability of `token` under one step's logits, for ranking replies (see
/// [`fast_log_sum_exp`]).
fn log_prob_of(logits: &[f32], token: u32) -> f64 {
    logits.get(token as usize).map_or(f64::NEG_INFINITY, |&l| {
        f64::from(l) - fast_log_sum_exp(logits)
    })
}

/// How likely a reply is after a conversation ([`Generator::score_replies`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplyLikelihood {
    /// Natural log.
    pub log_prob: f64,
    /// The reply's tokens and the end of its turn.
    pub tokens: usize,
}

impl ReplyLikelihood {
    /// Log-probability per token.
    pub fn mean(&self) -> f64 {
        self.log_prob / self.tokens.max(1) as f64
    }
}

/// Classifier-free guidance on one step's logits, in log-probability space:
/// `u + scale * (c - u)` for conditional `c` and unconditional `u` log-softmaxes.
fn guided(logits: &mut [f32], unconditional: &[f32], scale: f32) {
    let c = log_sum_exp(logits) as f32;
    let u = log_sum_exp(unconditional) as f32;
    for (l, &v) in logits.iter_mut().zip(unconditional) {
        let (lc, lu) = (*l - c, v - u);
        *l = lu + scale * (lc - lu);
    }
}

fn optional_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ModelError> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// What [`StopText::push`] lets out.
#[derive(Debug, PartialEq)]
enum Push {
    /// Text safe to show now.
    Emit(String),
    /// A stop string was found: the last text to show, and generation ends.
    Stopped(String),
}

/// The reply text so far, watching for stop strings. Text that could be the beginning of a stop
/// string is held back until it is known not to be one.
#[derive(Debug)]
struct StopText<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

impl<'a> StopText<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopText {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    fn push(&mut self, delta: &str) -> Push {
        self.text.push_str(delta);
        let pending = &self.text[self.emitted..];
        if let Some(at) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| pending.find(s.as_str()))
            .min()
        {
            let end = self.emitted + at;
            let out = self.text[self.emitted..end].to_string();
            self.text.truncate(end);
            self.emitted = end;
            return Push::Stopped(out);
        }
        let held = self
            .stops
            .iter()
            .map(|s| partial_suffix(pending, s))
            .max()
            .unwrap_or(0);
        let safe = self.text.len() - held;
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Push::Emit(out)
    }

    /// Lets out whatever was held back (generation ended without completing a stop string).
    fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    fn into_text(self) -> String {
        self.text
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&k| stop.is_char_boundary(k))
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(x: &[f32]) -> Vec<f32> {
        let l = log_sum_exp(x) as f32;
        x.iter().map(|&v| (v - l).exp()).collect()
    }

    #[test]
    fn guidance_mixes_log_probabilities() {
        let cond = [2.0, 1.0, 0.0];
        let uncond = [0.0, 3.0, 0.0];
        let mixed = |scale| {
            let mut l = cond;
            guided(&mut l, &uncond, scale);
            softmax(&l)
        };
        // Scale 1 keeps the conditional distribution, 0 gives the unconditional one.
        for (a, b) in mixed(1.0).iter().zip(softmax(&cond)) {
            assert!((a - b).abs() < 1e-6);
        }
        for (a, b) in mixed(0.0).iter().zip(softmax(&uncond)) {
            assert!((a - b).abs() < 1e-6);
        }
        // Above 1, what the prompt adds is amplified: token 0 (favoured by the prompt) gains,
        // token 1 (likely without it) loses, and the log-probabilities stay those of
        // u + s(c - u), whatever constant the logits carry.
        let (p1, p2) = (mixed(1.0), mixed(2.0));
        assert!(p2[0] > p1[0] && p2[1] < p1[1]);
        let mut shifted = [102.0, 101.0, 100.0];
        guided(&mut shifted, &uncond, 2.0);
        for (a, b) in softmax(&shifted).iter().zip(&p2) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn guidance_scale_is_checked() {
        let with = |guidance_scale| GenerateOptions {
            guidance_scale,
            ..GenerateOptions::default()
        };
        assert!(with(1.0).validate().is_ok());
        assert!(with(0.0).validate().is_ok());
        for bad in [-0.5, f32::NAN, f32::INFINITY] {
            assert!(with(bad).validate().is_err(), "{bad}");
        }
        let g = GenerationConfig {
            sampling: Sampling {
                guidance_scale: Some(1.5),
                ..Sampling::default()
            },
            ..GenerationConfig::default()
        };
        assert_eq!(
            GenerateOptions::from_generation_config(&g).guidance_scale,
            1.5
        );
        assert_eq!(GenerateOptions::default().guidance_scale, 1.0);
    }

    #[test]
    fn stop_string_split_across_deltas_is_never_shown() {
        let stops = vec!["User:".to_string()];
        let mut s = StopText::new(&stops);
        assert_eq!(s.push("Hello U"), Push::Emit("Hello ".into()));
        assert_eq!(s.push("se"), Push::Emit(String::new()));
        assert_eq!(s.push("r: next"), Push::Stopped(String::new()));
        assert_eq!(s.into_text(), "Hello ");
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let stops = vec!["。\n\n".to_string()];
        let mut s = StopText::new(&stops);
        assert_eq!(s.push("晴れです。"), Push::Emit("晴れです".into()));
        assert_eq!(s.push("明日も"), Push::Emit("。明日も".into()));
        assert_eq!(s.push("。"), Push::Emit(String::new()));
        assert_eq!(s.flush(), "。");
        assert_eq!(s.into_text(), "晴れです。明日も。");
    }
}
