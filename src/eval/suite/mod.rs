//! The conversation suite: everyday prompts in Japanese and English, each with checks a reply
//! must pass, read from YAML files in `evals/`.
//!
//! A suite file:
//!
//! ```yaml
//! name: everyday            # optional; the file name without extension by default
//! seed: 42                  # every case is generated with this seed
//! sampling:                 # optional; unset values come from the model's generation_config.json
//!   temperature: 0.7
//!   top_k: 40
//!   top_p: 0.9
//!   repetition_penalty: 1.1
//!   max_new_tokens: 96
//!   guidance_scale: 1.5     # classifier-free guidance (GenerateOptions::guidance_scale)
//! system: …                 # optional system prompt for every case
//! checks:                   # defaults for every case (these are kaiwa's own defaults)
//!   min_chars: 1
//!   max_chars: 600
//!   same_language: true
//!   max_repeated_ngram_ratio: 0.5
//!   max_line_repeats: 2
//! cases:
//!   - id: weather-ja
//!     prompt: 今日の天気はどうですか？
//!     language: ja          # optional; detected from the prompt by default
//!     keywords_any: [天気, 晴れ, 雨]
//!     max_chars: 300        # any check above may be set per case
//! ```
//!
//! The checks on a reply (all on the reply with surrounding whitespace removed):
//!
//! - `non_empty`: it has a character that is not whitespace;
//! - `length`: its number of characters (Unicode scalar values) is within `min_chars..=max_chars`;
//! - `language`: [`crate::text::lang::detect`] gives the case's language (a reply too short
//!   or too mixed to tell fails);
//! - `repetition`: not degenerate, measured two ways: the **repeated n-gram ratio**, `1 −
//!   distinct / total` over the reply's character 4-grams (whitespace runs counted as one
//!   space), at most `max_repeated_ngram_ratio`; and no line (trimmed, non-empty) appearing more
//!   than `max_line_repeats` times. "ははははははは" has ratio 0.75; ordinary prose is near 0.
//! - `keywords`: when `keywords_any` is given, the reply contains at least one of them (compared
//!   after NFKC normalisation and lowercasing, so `ＯＫ` matches `ok`). A keyword that starts
//!   with an ASCII letter or digit must start a word (`rain` matches "raining", `hi` does not
//!   match "this"); other keywords (Japanese) match anywhere.
//!
//! Unknown keys are errors, so a misspelt check is not silently ignored; so is a second YAML
//! document (`---`) in a file. An error names the file, the key (`cases[2].max_chars`) and its
//! line and column.
//!
//! The format (the types a file becomes, how it is read and checked) is in `format`; running
//! the cases through the reply engine, the checks on each reply and the report are in `runner`.

mod format;
mod runner;

pub use crate::text::{repetition, Repetition, REPETITION_NGRAM};
pub use format::{load_suites, parse_suite, Case, Checks, Suite};
pub use runner::{
    check_answer, options_for, run_suites, topic_figures, CaseReport, CheckOutcome, Retrieve,
    SamplingOverrides, SuiteFileReport, SuiteReport, TopicFigures, UsedSampling,
};
