//! `kaiwa export-corpus`: the stored conversations → training files that kaiwa's trainer and the
//! wider ecosystem read directly.
//!
//! The store is read as one stream of messages, channel by channel in time order; a channel's
//! history is cut into sessions at silences longer than the gap and at a maximum number of turns;
//! each session becomes training examples through [`crate::conversation::render_indexed`], the
//! same renderer the bot builds its prompts with. Two modes:
//!
//! - `bot`: the conversations people had with the bot; the bot is the `assistant`.
//! - `all`: all human dialogue; each example makes one speaker the `assistant` and the others
//!   `user` (with their names in group chats), so community chat becomes training data too.
//!
//! Then: filters (turns, characters, language), redaction and pseudonyms, exact and normalised
//! duplicate removal, and a deterministic train/validation split by conversation (a hash of the
//! conversation's key and the seed), so no conversation is on both sides. Consent is applied by
//! the store ([`Store::for_each_corpus_row`]): opted-out users and deleted messages never appear.
//! Memory stays flat: one session is held at a time, plus 16 bytes per example for duplicates.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::clean::{self, Dedup, Duplicate, Pseudonyms, Redactor};
use crate::conversation::{self, Speakers, Turn};
use crate::domain::ChatKind;
use crate::fsio;
use crate::model::ChatMessage;
use crate::store::{CorpusFilter, CorpusRow, Store, StoreError};
use crate::text::hash::stable_hash;
use crate::text::lang;

/// The file formats of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// JSONL `{"messages": [{"role", "content"}, …], "meta": {…}}`: TRL's SFTTrainer, axolotl.
    Openai,
    /// JSONL `{"conversations": [{"from": "human"|"gpt"|"system", "value"}, …], "meta": {…}}`.
    Sharegpt,
    /// Plain transcripts (`Name: line`), one per session, separated by a blank line: text for
    /// pre-training.
    Text,
}

impl ExportFormat {
    fn extension(self) -> &'static str {
        match self {
            ExportFormat::Openai | ExportFormat::Sharegpt => "jsonl",
            ExportFormat::Text => "txt",
        }
    }
}

/// Whose side the examples take (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportMode {
    Bot,
    All,
}

/// Settings of an export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: ExportFormat,
    pub mode: ExportMode,
    /// A silence longer than this starts a new session.
    pub gap_ms: i64,
    /// A session is cut after this many messages.
    pub max_turns: usize,
    /// Which stored messages are read.
    pub filter: CorpusFilter,
    /// Examples with fewer messages (system prompt not counted) are dropped.
    pub min_turns: usize,
    /// Examples with fewer characters of content are dropped.
    pub min_chars: usize,
    /// Keep only examples in these languages (ISO 639-1 codes); empty keeps all.
    pub languages: Vec<String>,
    /// The share of conversations that go to the validation file.
    pub val_fraction: f64,
    /// Seeds the split: another seed, another (equally deterministic) split.
    pub seed: u64,
    /// Drop exact and normalised duplicates.
    pub dedup: bool,
    /// Replace e-mail addresses, phone numbers, URLs with secrets and mentions.
    pub redact: bool,
    /// Replace speaker names with stable pseudonyms.
    pub anonymize: bool,
    /// A system prompt put first in every chat example that has none.
    pub system: Option<String>,
    /// Draw a progress bar on standard error (when it is a terminal).
    pub progress: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            format: ExportFormat::Openai,
            mode: ExportMode::Bot,
            gap_ms: 30 * 60 * 1000,
            max_turns: 64,
            filter: CorpusFilter::default(),
            min_turns: 2,
            min_chars: 1,
            languages: Vec::new(),
            val_fraction: 0.0,
            seed: 0,
            dedup: true,
            redact: false,
            anonymize: false,
            system: None,
            progress: false,
        }
    }
}

/// A time given to [`CorpusFilter`]'s bounds that is not one.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a time: expected 2024-05-01, 2024-05-01T12:00:00Z or milliseconds")]
pub struct NotATime(pub String);

/// A bound of [`CorpusFilter`] as people write it (`--since`, `--until`): a date (midnight
/// UTC), an RFC 3339 time, or milliseconds since the epoch; in milliseconds.
pub fn parse_time(s: &str) -> Result<i64, NotATime> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp_millis());
    }
    Err(NotATime(s.to_string()))
}

/// Counts for one slice of the corpus (a language, a platform, a split).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    pub examples: u64,
    /// Messages, system prompts not counted.
    pub turns: u64,
    pub characters: u64,
}

impl Figures {
    fn add(&mut self, turns: u64, characters: u64) {
        self.examples += 1;
        self.turns += turns;
        self.characters += characters;
    }
}

/// What an export read and wrote; also written as `summary.json` and `data_card.md`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExportSummary {
    pub messages_read: u64,
    /// Sessions that gave at least one example.
    pub conversations: u64,
    pub train: Figures,
    pub validation: Figures,
    pub per_language: BTreeMap<String, Figures>,
    pub per_platform: BTreeMap<String, Figures>,
    /// Per `source` tag: `live`, or an import's.
    pub per_source: BTreeMap<String, Figures>,
    pub dropped_exact_duplicates: u64,
    pub dropped_normalized_duplicates: u64,
    pub dropped_too_short: u64,
    pub dropped_other_language: u64,
    /// Examples with at least one reply that people reacted to.
    pub with_feedback: u64,
    /// The files written, relative to the output directory.
    pub files: Vec<String>,
}

impl ExportSummary {
    pub fn examples(&self) -> u64 {
        self.train.examples + self.validation.examples
    }
}

/// Errors of an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--val-fraction must be in [0, 1), not {0}")]
    ValFraction(f64),
}

/// Where an example came from, and the feedback on it. The per-message lists are as long as
/// `messages` (so every line has the same shape, which columnar readers such as `datasets`
/// need): thumbs up and down on each message, and every reaction on it, space-separated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Meta {
    /// Stable id of the example.
    pub id: String,
    /// Stable id of the conversation it was cut from (the split is by this).
    pub conversation: String,
    pub platform: String,
    pub source: String,
    pub language: String,
    pub up: Vec<u32>,
    pub down: Vec<u32>,
    pub reactions: Vec<String>,
    /// How each of the bot's messages was made (`generated`, `retrieved` — a copy of text a
    /// person wrote elsewhere, which a trainer may want to leave out — or `fallback`); empty
    /// for people's messages and for replies from before the reply engine.
    pub made_by: Vec<String>,
}

/// One training example.
#[derive(Debug, Clone, PartialEq)]
struct Example {
    messages: Vec<ChatMessage>,
    meta: Meta,
    /// The turns in it (a transcript's lines; a chat's messages, system prompt not counted).
    turns: u64,
}

/// Writes the corpus into `out_dir` (created if needed): `train.<ext>`, `validation.<ext>` when
/// `val_fraction > 0`, `summary.json` and `data_card.md`. Files appear under their names only
/// when complete.
pub async fn export(
    store: &Store,
    out_dir: &Path,
    options: &ExportOptions,
) -> Result<ExportSummary, ExportError> {
    if !(0.0..1.0).contains(&options.val_fraction) {
        return Err(ExportError::ValFraction(options.val_fraction));
    }
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let pseudonyms = if options.anonymize {
        Some(Pseudonyms::new(
            store
                .meta_or_insert("pseudonym_salt", clean::new_salt)
                .await?,
        ))
    } else {
        None
    };
    let bar = if options.progress {
        let total = store.count_corpus_rows(&options.filter).await?;
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {human_pos}/{human_len} messages ({per_sec}, {eta} left)",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_message("exporting");
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let ext = options.format.extension();
    let train = Output::create(out_dir, &format!("train.{ext}"))?;
    let validation = if options.val_fraction > 0.0 {
        Some(Output::create(out_dir, &format!("validation.{ext}"))?)
    } else {
        None
    };
    let mut exporter = Exporter {
        options,
        redactor: options.redact.then(Redactor::new),
        pseudonyms,
        dedup: Dedup::default(),
        train,
        validation,
        session: Vec::new(),
        session_key: String::new(),
        chunk: 0,
        summary: ExportSummary::default(),
        error: None,
    };
    store
        .for_each_corpus_row(&options.filter, |row| {
            bar.inc(1);
            exporter.push(row);
            exporter.error.is_none()
        })
        .await?;
    exporter.end_session();
    bar.finish_and_clear();
    if let Some(e) = exporter.error.take() {
        return Err(e);
    }
    let mut summary = exporter.summary;
    summary.files.push(exporter.train.finish()?);
    if let Some(v) = exporter.validation {
        summary.files.push(v.finish()?);
    }
    let json_path = out_dir.join("summary.json");
    let json = serde_json::to_string_pretty(&summary).expect("the summary serialises");
    fsio::write_atomic(&json_path, (json + "\n").as_bytes()).map_err(io(&json_path))?;
    let card_path = out_dir.join("data_card.md");
    fsio::write_atomic(&card_path, data_card(&summary, options).as_bytes())
        .map_err(io(&card_path))?;
    Ok(summary)
}

/// An I/O error on `path`, for `map_err`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.to_path_buf();
    move |source| ExportError::Io { path, source }
}

/// An output file, put in place whole when complete ([`fsio::AtomicFile`]).
struct Output {
    name: String,
    path: PathBuf,
    file: fsio::AtomicFile,
}

impl Output {
    fn create(dir: &Path, name: &str) -> Result<Self, ExportError> {
        let path = dir.join(name);
        let file = fsio::AtomicFile::create(&path).map_err(io(&path))?;
        Ok(Output {
            name: name.to_string(),
            path,
            file,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ExportError> {
        self.file.write_all(bytes).map_err(io(&self.path))
    }

    fn finish(self) -> Result<String, ExportError> {
        self.file.commit().map_err(io(&self.path))?;
        Ok(self.name)
    }
}

/// The state of an export between rows.
struct Exporter<'o> {
    options: &'o ExportOptions,
    redactor: Option<Redactor>,
    pseudonyms: Option<Pseudonyms>,
    dedup: Dedup,
    train: Output,
    validation: Option<Output>,
    /// The session being read.
    session: Vec<CorpusRow>,
    /// The conversation the session belongs to: its channel and the first message after a
    /// silence. Sessions cut by `max_turns` keep the key, so they stay on one side of the split.
    session_key: String,
    chunk: usize,
    summary: ExportSummary,
    error: Option<ExportError>,
}

impl Exporter<'_> {
    fn push(&mut self, row: CorpusRow) {
        self.summary.messages_read += 1;
        let m = &row.message;
        let continues = self.session.last().map(|l| &l.message).is_some_and(|l| {
            l.platform == m.platform
                && l.chat_id == m.chat_id
                && l.thread_id == m.thread_id
                && m.sent_at_ms - l.sent_at_ms <= self.options.gap_ms
        });
        if !continues {
            self.end_session();
            self.session_key = format!(
                "{}:{}:{}:{}",
                m.platform, m.chat_id, m.thread_id, m.message_id
            );
            self.chunk = 0;
        } else if self.session.len() >= self.options.max_turns.max(2) {
            self.end_session();
            self.chunk += 1;
        }
        self.session.push(row);
    }

    fn end_session(&mut self) {
        if self.session.is_empty() || self.error.is_some() {
            self.session.clear();
            return;
        }
        let session = std::mem::take(&mut self.session);
        let validation = self.validation.is_some() && {
            let h = stable_hash(&[&self.options.seed.to_string(), &self.session_key]);
            (h as f64 / u64::MAX as f64) < self.options.val_fraction
        };
        let mut wrote = false;
        for example in self.examples(&session) {
            if let Err(e) = self.write(example, validation) {
                self.error = Some(e);
                return;
            }
            wrote = true;
        }
        if wrote {
            self.summary.conversations += 1;
        }
    }

    /// The examples a session gives, before filters.
    fn examples(&self, session: &[CorpusRow]) -> Vec<Example> {
        let first = &session[0].message;
        let speakers = if first.chat_kind == ChatKind::Direct {
            Speakers::One
        } else {
            Speakers::Many
        };
        let system = session
            .iter()
            .find(|r| r.message.is_system)
            .and_then(|r| r.message.text.clone())
            .or_else(|| self.options.system.clone());
        let conversation_id = format!(
            "{:016x}",
            stable_hash(&[&self.session_key, &self.chunk.to_string()])
        );
        let new_meta = |id: String, language: &str, messages: &[ChatMessage]| Meta {
            id,
            conversation: conversation_id.clone(),
            platform: first.platform.to_string(),
            source: first.source.clone(),
            language: language.to_string(),
            up: vec![0; messages.len()],
            down: vec![0; messages.len()],
            reactions: vec![String::new(); messages.len()],
            made_by: vec![String::new(); messages.len()],
        };
        // The turns with the row each came from; in `all` mode other bots (kaiwa included)
        // are left out: that mode is about human dialogue.
        let rows: Vec<(&CorpusRow, Turn)> = session
            .iter()
            .filter(|r| self.options.mode == ExportMode::Bot || !r.message.author_is_bot)
            .filter_map(|r| {
                let mut t = conversation::turn_of(&r.message)?;
                if let Some(red) = &self.redactor {
                    t.text = red.redact(&t.text);
                }
                if let Some(p) = &self.pseudonyms {
                    if !r.message.from_self || self.options.mode == ExportMode::All {
                        t.speaker = p.of(r.message.platform.as_str(), &r.message.author_id);
                    }
                }
                Some((r, t))
            })
            .collect();
        let language = lang::detect(
            &rows
                .iter()
                .map(|(_, t)| t.text.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        );

        if self.options.format == ExportFormat::Text {
            if self.options.mode == ExportMode::Bot
                && !rows.iter().any(|(r, _)| r.message.from_self)
            {
                return Vec::new();
            }
            // Everybody is a named speaker in a transcript.
            let turns: Vec<Turn> = rows
                .iter()
                .map(|(_, t)| Turn {
                    is_assistant: false,
                    ..t.clone()
                })
                .collect();
            let messages = conversation::render(None, &turns, Speakers::Many);
            return vec![Example {
                meta: new_meta(conversation_id.clone(), language, &messages),
                turns: turns.iter().filter(|t| !t.text.trim().is_empty()).count() as u64,
                messages,
            }];
        }

        let perspectives: Vec<Option<String>> = match self.options.mode {
            ExportMode::Bot => vec![None],
            ExportMode::All => {
                let mut seen = HashSet::new();
                rows.iter()
                    .filter(|(r, _)| seen.insert(r.message.author_id.clone()))
                    .map(|(r, _)| Some(r.message.author_id.clone()))
                    .collect()
            }
        };
        let mut out = Vec::new();
        for perspective in perspectives {
            let turns: Vec<Turn> = rows
                .iter()
                .map(|(r, t)| Turn {
                    is_assistant: match &perspective {
                        None => r.message.from_self,
                        Some(id) => &r.message.author_id == id,
                    },
                    ..t.clone()
                })
                .collect();
            let (mut messages, index) = conversation::render_indexed(None, &turns, speakers);
            let lead = messages.iter().take_while(|m| m.role != "user").count();
            messages.drain(..lead);
            while messages.last().is_some_and(|m| m.role != "assistant") {
                messages.pop();
            }
            if messages.is_empty() {
                continue;
            }
            let offset = usize::from(system.as_deref().is_some_and(|s| !s.trim().is_empty()));
            if offset == 1 {
                messages.insert(
                    0,
                    ChatMessage::system(system.as_deref().unwrap_or_default()),
                );
            }
            let id = match &perspective {
                None => conversation_id.clone(),
                Some(p) => format!("{:016x}", stable_hash(&[&conversation_id, p])),
            };
            let mut meta = new_meta(id, language, &messages);
            for ((r, _), i) in rows.iter().zip(&index) {
                let Some(i) = i.and_then(|i| i.checked_sub(lead)).map(|i| i + offset) else {
                    continue;
                };
                if i < messages.len() && messages[i].role == "assistant" {
                    add_feedback(&mut meta, i, r);
                }
            }
            out.push(Example {
                turns: messages.iter().filter(|m| m.role != "system").count() as u64,
                messages,
                meta,
            });
        }
        out
    }

    fn write(&mut self, example: Example, validation: bool) -> Result<(), ExportError> {
        let o = self.options;
        let turns = example.turns;
        let characters: u64 = example
            .messages
            .iter()
            .filter(|m| m.role != "system")
            .map(|m| m.content.chars().count() as u64)
            .sum();
        if (turns as usize) < o.min_turns || (characters as usize) < o.min_chars {
            self.summary.dropped_too_short += 1;
            return Ok(());
        }
        if !o.languages.is_empty() && !o.languages.contains(&example.meta.language) {
            self.summary.dropped_other_language += 1;
            return Ok(());
        }
        if o.dedup {
            let key = example
                .messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str()));
            match self.dedup.check(key) {
                Some(Duplicate::Exact) => {
                    self.summary.dropped_exact_duplicates += 1;
                    return Ok(());
                }
                Some(Duplicate::Normalized) => {
                    self.summary.dropped_normalized_duplicates += 1;
                    return Ok(());
                }
                None => {}
            }
        }
        let line = match o.format {
            ExportFormat::Openai => json_line(&OpenaiLine {
                messages: &example.messages,
                meta: &example.meta,
            }),
            ExportFormat::Sharegpt => json_line(&SharegptLine {
                conversations: example
                    .messages
                    .iter()
                    .map(|m| SharegptTurn {
                        from: match m.role.as_str() {
                            "system" => "system",
                            "assistant" => "gpt",
                            _ => "human",
                        },
                        value: &m.content,
                    })
                    .collect(),
                meta: &example.meta,
            }),
            ExportFormat::Text => transcript(&example.messages),
        };
        let out = match (&mut self.validation, validation) {
            (Some(v), true) => v,
            _ => &mut self.train,
        };
        out.write(line.as_bytes())?;
        let s = &mut self.summary;
        if validation {
            s.validation.add(turns, characters);
        } else {
            s.train.add(turns, characters);
        }
        s.per_language
            .entry(example.meta.language.clone())
            .or_default()
            .add(turns, characters);
        s.per_platform
            .entry(example.meta.platform.clone())
            .or_default()
            .add(turns, characters);
        s.per_source
            .entry(example.meta.source.clone())
            .or_default()
            .add(turns, characters);
        if example.meta.reactions.iter().any(|r| !r.is_empty()) {
            s.with_feedback += 1;
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct OpenaiLine<'a> {
    messages: &'a [ChatMessage],
    meta: &'a Meta,
}

#[derive(Serialize)]
struct SharegptTurn<'a> {
    from: &'static str,
    value: &'a str,
}

#[derive(Serialize)]
struct SharegptLine<'a> {
    conversations: Vec<SharegptTurn<'a>>,
    meta: &'a Meta,
}

fn json_line(v: &impl Serialize) -> String {
    let mut s = serde_json::to_string(v).expect("examples serialise");
    s.push('\n');
    s
}

/// A session as plain text: its lines, blank lines inside removed (a blank line separates
/// sessions), and a blank line after.
fn transcript(messages: &[ChatMessage]) -> String {
    let mut s = String::new();
    for m in messages {
        for line in m.content.lines().filter(|l| !l.trim().is_empty()) {
            s.push_str(line);
            s.push('\n');
        }
    }
    s.push('\n');
    s
}

/// Adds the reactions on `row` to message `i` of an example: thumbs up and down (in the forms
/// Discord and Telegram send them, skin tones and variation selectors ignored) and the emoji.
fn add_feedback(meta: &mut Meta, i: usize, row: &CorpusRow) {
    if let Some(made_by) = row.engine_source() {
        meta.made_by[i] = made_by.to_string();
    }
    for e in row.reactions() {
        match crate::text::reaction_sign(e) {
            1 => meta.up[i] += 1,
            -1 => meta.down[i] += 1,
            _ => {}
        }
        if !meta.reactions[i].is_empty() {
            meta.reactions[i].push(' ');
        }
        meta.reactions[i].push_str(e);
    }
}

/// The data card written next to an export.
fn data_card(s: &ExportSummary, o: &ExportOptions) -> String {
    let mut c = String::new();
    let table = |title: &str, rows: &BTreeMap<String, Figures>| {
        let mut t =
            format!("\n## {title}\n\n| | examples | turns | characters |\n|---|---:|---:|---:|\n");
        for (k, f) in rows {
            t.push_str(&format!(
                "| {k} | {} | {} | {} |\n",
                f.examples, f.turns, f.characters
            ));
        }
        t
    };
    c.push_str("# Corpus exported by kaiwa\n\n");
    c.push_str(&format!(
        "Format `{:?}`, mode `{:?}`, session gap {} min, at most {} turns per session, \
         validation fraction {} (seed {}).\n",
        o.format,
        o.mode,
        o.gap_ms / 60_000,
        o.max_turns,
        o.val_fraction,
        o.seed
    ));
    c.push_str(&format!(
        "Filters: platforms {:?}, channels {:?}, sources {:?}, from {:?} to {:?} (ms), \
         languages {:?}, at least {} turns and {} characters. Duplicates removed: {}. \
         Redacted: {}. Pseudonyms: {}.\n",
        o.filter.platforms,
        o.filter.channels,
        o.filter.sources,
        o.filter.since_ms,
        o.filter.until_ms,
        o.languages,
        o.min_turns,
        o.min_chars,
        o.dedup,
        o.redact,
        o.anonymize
    ));
    c.push_str(
        "\nConsent: messages of users who opted out and deleted messages are not included.\n",
    );
    c.push_str(&format!(
        "\n## Size\n\n| split | examples | turns | characters |\n|---|---:|---:|---:|\n\
         | train | {} | {} | {} |\n| validation | {} | {} | {} |\n",
        s.train.examples,
        s.train.turns,
        s.train.characters,
        s.validation.examples,
        s.validation.turns,
        s.validation.characters
    ));
    c.push_str(&format!(
        "\n{} messages read, {} conversations used. Dropped: {} exact duplicates, {} normalised \
         duplicates, {} too short, {} in other languages. {} examples carry feedback.\n",
        s.messages_read,
        s.conversations,
        s.dropped_exact_duplicates,
        s.dropped_normalized_duplicates,
        s.dropped_too_short,
        s.dropped_other_language,
        s.with_feedback
    ));
    c.push_str(&table("Per language", &s.per_language));
    c.push_str(&table("Per platform", &s.per_platform));
    c.push_str(&table("Per source", &s.per_source));
    c.push_str(&format!("\nFiles: {}\n", s.files.join(", ")));
    c
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_are_dates_rfc3339_or_milliseconds() {
        assert_eq!(parse_time("1714564800000").unwrap(), 1_714_564_800_000);
        assert_eq!(parse_time("2024-05-01").unwrap(), 1_714_521_600_000);
        assert_eq!(
            parse_time("2024-05-01T12:00:00Z").unwrap(),
            1_714_564_800_000
        );
        let e = parse_time("yesterday").unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"yesterday\" is not a time: expected 2024-05-01, 2024-05-01T12:00:00Z or milliseconds"
        );
    }
}
