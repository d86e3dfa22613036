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
//! Unknown keys are errors, so a misspelt check is not silently ignored.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use yaml_rust2::{Yaml, YamlLoader};

use super::{parallel_map, EvalError};
use crate::engine::{
    rank::is_echo, EngineError, EngineMode, Ranked, ReplyEngine, ReplySource, Request, Retrieval,
};
use crate::model::{ChatMessage, GenerateOptions, Generator, Sampling, SamplingParams};
use crate::text::lang;

pub use crate::text::{repetition, Repetition, REPETITION_NGRAM};

/// One suite file, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    pub name: String,
    pub path: PathBuf,
    pub seed: u64,
    /// `None`s leave the model's own defaults.
    pub sampling: Sampling,
    pub cases: Vec<Case>,
}

/// Settings given on the command line, over every suite file's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOverrides {
    pub seed: Option<u64>,
    pub sampling: Sampling,
}

/// One prompt and what its reply must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub id: String,
    pub prompt: String,
    pub system: Option<String>,
    /// ISO 639-1 code of the expected reply language.
    pub language: String,
    /// `dev` (what the engine's defaults are tuned on) or `test` (held out); none for cases
    /// outside that split.
    pub split: Option<String>,
    pub checks: Checks,
}

/// The limits a reply is held to (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checks {
    pub min_chars: usize,
    pub max_chars: usize,
    pub same_language: bool,
    pub keywords_any: Vec<String>,
    pub max_repeated_ngram_ratio: f64,
    pub max_line_repeats: usize,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            min_chars: 1,
            max_chars: 600,
            same_language: true,
            keywords_any: Vec::new(),
            max_repeated_ngram_ratio: 0.5,
            max_line_repeats: 2,
        }
    }
}

/// The result of one check on one reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckOutcome {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// Runs every check of `case` on `answer`.
pub fn check_answer(case: &Case, answer: &str) -> Vec<CheckOutcome> {
    let c = &case.checks;
    let text = answer.trim();
    let chars = text.chars().count();
    let outcome = |name: &str, passed: bool, detail: String| CheckOutcome {
        name: name.into(),
        passed,
        detail,
    };
    let mut out = vec![
        outcome(
            "non_empty",
            !text.is_empty(),
            if text.is_empty() {
                "the reply is empty".into()
            } else {
                "the reply has text".into()
            },
        ),
        outcome(
            "length",
            (c.min_chars..=c.max_chars).contains(&chars),
            format!(
                "{chars} characters (allowed {}..={})",
                c.min_chars, c.max_chars
            ),
        ),
    ];
    if c.same_language {
        let got = lang::detect(text);
        out.push(outcome(
            "language",
            got == case.language,
            format!("expected {}, detected {got}", case.language),
        ));
    }
    let r = repetition(text);
    let ratio_ok = r.repeated_ngram_ratio <= c.max_repeated_ngram_ratio;
    let lines_ok = r.max_line_repeats <= c.max_line_repeats;
    out.push(outcome(
        "repetition",
        ratio_ok && lines_ok,
        format!(
            "repeated {REPETITION_NGRAM}-gram ratio {:.2} (max {:.2}), most repeated line \
             {} times (max {})",
            r.repeated_ngram_ratio,
            c.max_repeated_ngram_ratio,
            r.max_line_repeats,
            c.max_line_repeats
        ),
    ));
    if !c.keywords_any.is_empty() {
        let haystack = normalize(text);
        let found: Vec<&String> = c
            .keywords_any
            .iter()
            .filter(|k| contains_keyword(&haystack, &normalize(k)))
            .collect();
        out.push(outcome(
            "keywords",
            !found.is_empty(),
            if found.is_empty() {
                format!("none of {:?}", c.keywords_any)
            } else {
                format!("found {found:?}")
            },
        ));
    }
    out
}

fn normalize(text: &str) -> String {
    text.nfkc().collect::<String>().to_lowercase()
}

/// Whether `keyword` occurs in `text`. A keyword that starts with an ASCII letter or digit must
/// start a word (`rain` is in "raining", `hi` is not in "this"); Japanese has no spaces between
/// words, so other keywords match anywhere.
fn contains_keyword(text: &str, keyword: &str) -> bool {
    if keyword.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !word(keyword.chars().next()) {
        return text.contains(keyword);
    }
    text.match_indices(keyword)
        .any(|(at, _)| !word(text[..at].chars().next_back()))
}

/// Reads suite files: each path is a YAML file or a directory whose `*.yaml` / `*.yml` files
/// are read in name order.
pub fn load_suites(paths: &[PathBuf]) -> Result<Vec<Suite>, EvalError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| EvalError::io(path, e))?;
            let mut found = Vec::new();
            for entry in entries {
                let p = entry.map_err(|e| EvalError::io(path, e))?.path();
                let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
                if yaml && p.is_file() {
                    found.push(p);
                }
            }
            if found.is_empty() {
                return Err(EvalError::Suite {
                    path: path.clone(),
                    reason: "no .yaml suite files in this directory".into(),
                });
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut suites = Vec::new();
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| EvalError::io(&file, e))?;
        let suite = parse_suite(&text, &file)?;
        if !names.insert(suite.name.clone()) {
            return Err(EvalError::Suite {
                path: file,
                reason: format!("a second suite named {:?}", suite.name),
            });
        }
        suites.push(suite);
    }
    Ok(suites)
}

/// Parses one suite file (see the module docs for the format).
pub fn parse_suite(text: &str, path: &Path) -> Result<Suite, EvalError> {
    let err = |reason: String| EvalError::Suite {
        path: path.to_path_buf(),
        reason,
    };
    let docs = YamlLoader::load_from_str(text).map_err(|e| err(format!("not YAML: {e}")))?;
    let root = docs.first().ok_or_else(|| err("an empty file".into()))?;
    let top = Fields::new(root, "the file").map_err(&err)?;
    top.only(&["name", "seed", "sampling", "system", "checks", "cases"])
        .map_err(&err)?;
    let default_name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("suite")
        .to_string();
    let name = top.string("name").map_err(&err)?.unwrap_or(default_name);
    let seed = top.integer("seed").map_err(&err)?.unwrap_or(0);
    let sampling = match top.get("sampling") {
        None => Sampling::default(),
        Some(node) => {
            let s = Fields::new(node, "sampling").map_err(&err)?;
            s.only(&[
                "temperature",
                "top_k",
                "top_p",
                "repetition_penalty",
                "max_new_tokens",
                "guidance_scale",
            ])
            .map_err(&err)?;
            Sampling {
                temperature: s.number("temperature").map_err(&err)?.map(|v| v as f32),
                top_k: s.integer("top_k").map_err(&err)?.map(|v| v as usize),
                top_p: s.number("top_p").map_err(&err)?.map(|v| v as f32),
                repetition_penalty: s
                    .number("repetition_penalty")
                    .map_err(&err)?
                    .map(|v| v as f32),
                max_new_tokens: s
                    .integer("max_new_tokens")
                    .map_err(&err)?
                    .map(|v| v as usize),
                guidance_scale: s.number("guidance_scale").map_err(&err)?.map(|v| v as f32),
            }
        }
    };
    let system = top.string("system").map_err(&err)?;
    let mut defaults = Checks::default();
    if let Some(node) = top.get("checks") {
        let f = Fields::new(node, "checks").map_err(&err)?;
        f.only(CHECK_KEYS).map_err(&err)?;
        apply_checks(&f, &mut defaults).map_err(&err)?;
    }
    let cases_node = top
        .get("cases")
        .ok_or_else(|| err("no `cases` list".into()))?;
    let list = cases_node
        .as_vec()
        .ok_or_else(|| err("`cases` is not a list".into()))?;
    if list.is_empty() {
        return Err(err("`cases` is empty".into()));
    }
    let mut cases = Vec::with_capacity(list.len());
    let mut ids = BTreeSet::new();
    for (i, node) in list.iter().enumerate() {
        let where_ = format!("case {}", i + 1);
        let f = Fields::new(node, &where_).map_err(&err)?;
        let mut keys = vec!["id", "prompt", "system", "language", "split"];
        keys.extend_from_slice(CHECK_KEYS);
        f.only(&keys).map_err(&err)?;
        let id = f
            .string("id")
            .map_err(&err)?
            .ok_or_else(|| err(format!("{where_}: no `id`")))?;
        if !ids.insert(id.clone()) {
            return Err(err(format!("case id {id:?} appears twice")));
        }
        let prompt = f
            .string("prompt")
            .map_err(&err)?
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| err(format!("case {id:?}: no `prompt`")))?;
        let mut checks = defaults.clone();
        apply_checks(&f, &mut checks).map_err(|e| err(format!("case {id:?}: {e}")))?;
        if checks.min_chars > checks.max_chars {
            return Err(err(format!(
                "case {id:?}: min_chars {} is above max_chars {}",
                checks.min_chars, checks.max_chars
            )));
        }
        let language = match f.string("language").map_err(&err)? {
            Some(l) => l,
            None => {
                let detected = lang::detect(&prompt);
                if detected == lang::UNKNOWN && checks.same_language {
                    return Err(err(format!(
                        "case {id:?}: cannot tell the language of the prompt; set `language`"
                    )));
                }
                detected.to_string()
            }
        };
        let split = f.string("split").map_err(&err)?;
        if let Some(sp) = split.as_deref().filter(|s| !["dev", "test"].contains(s)) {
            return Err(err(format!(
                "case {id:?}: split must be dev or test, not {sp:?}"
            )));
        }
        cases.push(Case {
            split,
            id,
            prompt,
            system: f.string("system").map_err(&err)?.or_else(|| system.clone()),
            language,
            checks,
        });
    }
    Ok(Suite {
        name,
        path: path.to_path_buf(),
        seed,
        sampling,
        cases,
    })
}

const CHECK_KEYS: &[&str] = &[
    "min_chars",
    "max_chars",
    "same_language",
    "keywords_any",
    "max_repeated_ngram_ratio",
    "max_line_repeats",
];

fn apply_checks(f: &Fields, c: &mut Checks) -> Result<(), String> {
    if let Some(v) = f.integer("min_chars")? {
        c.min_chars = v as usize;
    }
    if let Some(v) = f.integer("max_chars")? {
        c.max_chars = v as usize;
    }
    if let Some(v) = f.boolean("same_language")? {
        c.same_language = v;
    }
    if let Some(v) = f.strings("keywords_any")? {
        c.keywords_any = v;
    }
    if let Some(v) = f.number("max_repeated_ngram_ratio")? {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!(
                "max_repeated_ngram_ratio must be in [0, 1], not {v}"
            ));
        }
        c.max_repeated_ngram_ratio = v;
    }
    if let Some(v) = f.integer("max_line_repeats")? {
        c.max_line_repeats = v as usize;
    }
    Ok(())
}

/// The keys of a YAML mapping, read with errors that say where and what was expected.
struct Fields<'a> {
    pairs: Vec<(&'a str, &'a Yaml)>,
    place: String,
}

impl<'a> Fields<'a> {
    fn new(node: &'a Yaml, place: &str) -> Result<Self, String> {
        let hash = node
            .as_hash()
            .ok_or_else(|| format!("{place} is not a mapping of keys to values"))?;
        let mut pairs = Vec::with_capacity(hash.len());
        for (k, v) in hash {
            let key = k
                .as_str()
                .ok_or_else(|| format!("{place}: a key that is not text: {k:?}"))?;
            pairs.push((key, v));
        }
        Ok(Fields {
            pairs,
            place: place.to_string(),
        })
    }

    fn only(&self, allowed: &[&str]) -> Result<(), String> {
        for (key, _) in &self.pairs {
            if !allowed.contains(key) {
                return Err(format!(
                    "{}: unknown key `{key}` (expected one of {})",
                    self.place,
                    allowed.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&'a Yaml> {
        self.pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_null())
    }

    fn expected(&self, key: &str, what: &str, got: &Yaml) -> String {
        format!("{}: `{key}` must be {what}, not {got:?}", self.place)
    }

    fn string(&self, key: &str) -> Result<Option<String>, String> {
        self.get(key)
            .map(|v| scalar_text(v).ok_or_else(|| self.expected(key, "text", v)))
            .transpose()
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = v
            .as_vec()
            .ok_or_else(|| self.expected(key, "a list of text", v))?;
        list.iter()
            .map(|item| scalar_text(item).ok_or_else(|| self.expected(key, "a list of text", v)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn integer(&self, key: &str) -> Result<Option<u64>, String> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| self.expected(key, "a whole number of 0 or more", v))
            })
            .transpose()
    }

    fn number(&self, key: &str) -> Result<Option<f64>, String> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .or_else(|| v.as_i64().map(|n| n as f64))
                    .filter(|n| n.is_finite())
                    .ok_or_else(|| self.expected(key, "a number", v))
            })
            .transpose()
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, String> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.expected(key, "true or false", v))
            })
            .transpose()
    }
}

/// A scalar as text (`keywords_any: [2024]` means the text "2024").
fn scalar_text(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The report of a suite run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    pub files: Vec<SuiteFileReport>,
    pub cases: u64,
    pub passed: u64,
    /// The reply engine that answered (reports from before it: none, the model alone).
    #[serde(default)]
    pub engine: Option<EngineMode>,
    /// On-topic figures per language and split.
    #[serde(default)]
    pub figures: Vec<TopicFigures>,
}

impl SuiteReport {
    /// `suite/case` for every case, in order: two reports compare only over the same cases.
    pub fn case_keys(&self) -> Vec<String> {
        self.files
            .iter()
            .flat_map(|f| f.cases.iter().map(move |c| format!("{}/{}", f.name, c.id)))
            .collect()
    }

    /// `suite/case` of the cases that passed.
    pub fn passed_keys(&self) -> BTreeSet<String> {
        self.files
            .iter()
            .flat_map(|f| {
                f.cases
                    .iter()
                    .filter(|c| c.passed)
                    .map(move |c| format!("{}/{}", f.name, c.id))
            })
            .collect()
    }
}

/// One suite file's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteFileReport {
    pub name: String,
    pub path: String,
    pub sampling: UsedSampling,
    pub cases: Vec<CaseReport>,
}

/// The settings the replies were generated with, after overrides and model defaults: the
/// resolved [`GenerateOptions`] as a report records them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsedSampling {
    pub seed: u64,
    #[serde(flatten)]
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Classifier-free guidance; 1 is none (reports written before it existed read as 1).
    #[serde(default = "no_guidance")]
    pub guidance_scale: f32,
}

fn no_guidance() -> f32 {
    1.0
}

impl From<&GenerateOptions> for UsedSampling {
    fn from(o: &GenerateOptions) -> Self {
        UsedSampling {
            seed: o.seed,
            sampling: o.sampling.clone(),
            max_new_tokens: o.max_new_tokens,
            guidance_scale: o.guidance_scale,
        }
    }
}

/// One prompt, its reply, and the checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseReport {
    pub id: String,
    pub prompt: String,
    pub language: String,
    pub answer: String,
    /// Where the reply came from (`pair`, `sentence`, `generated`, `fallback`); in reports from
    /// before the reply engine, why generation ended (`eos`, `length`, …).
    pub stop: String,
    pub new_tokens: usize,
    pub checks: Vec<CheckOutcome>,
    pub passed: bool,
    /// `dev` or `test` (see [`Case::split`]).
    #[serde(default)]
    pub split: Option<String>,
    /// Where the reply came from (reports from before the reply engine: none).
    #[serde(default)]
    pub source: Option<ReplySource>,
    /// Every candidate the engine considered, with its scores: what the ranker's weights are
    /// tuned on.
    #[serde(default)]
    pub candidates: Vec<Ranked>,
}

/// The generation options of `suite` for `generator`: the model's defaults, then the suite's
/// settings, then the command line's.
pub fn options_for(
    generator: &Generator,
    suite: &Suite,
    overrides: &SamplingOverrides,
) -> Result<GenerateOptions, EvalError> {
    let mut o = generator
        .default_options()
        .overridden_by(&overrides.sampling.over(suite.sampling));
    o.seed = overrides.seed.unwrap_or(suite.seed);
    o.stop = Vec::new();
    o.validate().map_err(|e| EvalError::Suite {
        path: suite.path.clone(),
        reason: e.to_string(),
    })?;
    Ok(o)
}

/// Looks up retrieval candidates for a message (in `kaiwa eval`: the model's retrieval data in
/// a store of its own).
pub type Retrieve<'a> = dyn Fn(&str) -> Result<Retrieval, EngineError> + Sync + 'a;

/// Asks the reply engine to answer every case of `suites` and checks the reply, on `threads`
/// threads. Each case is answered on its own with the suite's seed, so replies do not depend
/// on the order or on the number of threads.
pub fn run_suites(
    generator: &Generator,
    engine: &ReplyEngine,
    retrieve: &Retrieve<'_>,
    suites: &[Suite],
    overrides: &SamplingOverrides,
    threads: usize,
) -> Result<SuiteReport, EvalError> {
    let mut files = Vec::with_capacity(suites.len());
    for suite in suites {
        let options = options_for(generator, suite, overrides)?;
        let cases = parallel_map(
            &suite.cases,
            threads,
            || Ok(()),
            |_, case| -> Result<CaseReport, EvalError> {
                let mut messages = Vec::new();
                if let Some(system) = &case.system {
                    messages.push(ChatMessage::system(system.clone()));
                }
                messages.push(ChatMessage::user(case.prompt.clone()));
                let request = Request {
                    messages: &messages,
                    user_text: &case.prompt,
                    recent_replies: &[],
                    options: &options,
                };
                let reply = engine.reply(generator, &request, retrieve(&case.prompt)?, &|| true)?;
                let checks = check_answer(case, &reply.text);
                Ok(CaseReport {
                    id: case.id.clone(),
                    prompt: case.prompt.clone(),
                    language: case.language.clone(),
                    passed: checks.iter().all(|c| c.passed),
                    answer: reply.text,
                    stop: reply.source.as_str().into(),
                    new_tokens: reply.new_tokens,
                    checks,
                    split: case.split.clone(),
                    source: Some(reply.source),
                    candidates: reply.ranked,
                })
            },
        )?;
        files.push(SuiteFileReport {
            name: suite.name.clone(),
            path: suite.path.display().to_string(),
            sampling: UsedSampling::from(&options),
            cases,
        });
    }
    let figures = topic_figures(suites, &files);
    let all = files.iter().flat_map(|f| &f.cases);
    let cases = all.clone().count() as u64;
    let passed = all.filter(|c| c.passed).count() as u64;
    Ok(SuiteReport {
        files,
        cases,
        passed,
        engine: Some(engine.settings().mode),
        figures,
    })
}

/// What the engine's replies did in one language and split (see [`topic_figures`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopicFigures {
    pub language: String,
    /// `dev`, `test`, or `all` (every case with keywords, whatever its split).
    pub split: String,
    /// Cases with keywords.
    pub cases: u64,
    /// Replies that contain one of their case's keywords.
    pub on_topic: u64,
    /// The share of (reply, other case) pairs where the reply contains one of the other case's
    /// keywords: how often a reply is "on topic" by chance.
    pub chance: f64,
    pub right_language: u64,
    /// Replies that repeat the prompt.
    pub echoes: u64,
    /// Replies that fail the repetition check (loops).
    pub loops: u64,
    /// Replies given to more than one case.
    pub repeated: u64,
    pub fallbacks: u64,
    /// Cases won by each source.
    pub sources: std::collections::BTreeMap<String, u64>,
}

impl TopicFigures {
    pub fn on_topic_share(&self) -> f64 {
        self.on_topic as f64 / self.cases.max(1) as f64
    }
}

/// On topic, on topic by chance, right language, echoes, loops, repeated replies, fallbacks
/// and winning sources, per language and split, over the cases that have keywords.
pub fn topic_figures(suites: &[Suite], files: &[SuiteFileReport]) -> Vec<TopicFigures> {
    let mut rows: Vec<(&Case, &CaseReport)> = Vec::new();
    for (suite, file) in suites.iter().zip(files) {
        rows.extend(
            suite
                .cases
                .iter()
                .zip(&file.cases)
                .filter(|(c, _)| !c.checks.keywords_any.is_empty()),
        );
    }
    let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
    for (c, _) in &rows {
        keys.insert((c.language.clone(), "all".into()));
        if let Some(split) = &c.split {
            keys.insert((c.language.clone(), split.clone()));
        }
    }
    let mut answers: HashMap<String, usize> = HashMap::new();
    for (_, r) in &rows {
        *answers.entry(normalize(&r.answer)).or_default() += 1;
    }
    keys.into_iter()
        .map(|(language, split)| {
            let mine: Vec<&(&Case, &CaseReport)> = rows
                .iter()
                .filter(|(c, _)| {
                    c.language == language && (split == "all" || c.split.as_deref() == Some(&split))
                })
                .collect();
            let others: Vec<&Case> = rows
                .iter()
                .map(|(c, _)| *c)
                .filter(|c| c.language == language)
                .collect();
            let mut f = TopicFigures {
                language: language.clone(),
                split: split.clone(),
                cases: mine.len() as u64,
                ..TopicFigures::default()
            };
            let (mut chance_hits, mut chance_pairs) = (0u64, 0u64);
            for (case, r) in &mine {
                let passed = |name: &str| r.checks.iter().any(|k| k.name == name && k.passed);
                f.on_topic += u64::from(passed("keywords"));
                f.right_language += u64::from(passed("language"));
                f.loops += u64::from(!passed("repetition"));
                f.echoes += u64::from(is_echo(&r.answer, &r.prompt));
                f.repeated +=
                    u64::from(answers.get(&normalize(&r.answer)).copied().unwrap_or(0) > 1);
                f.fallbacks += u64::from(r.source == Some(ReplySource::Fallback));
                let source = r.source.map_or("generated", ReplySource::as_str);
                *f.sources.entry(source.to_string()).or_default() += 1;
                let haystack = normalize(&r.answer);
                for other in others.iter().filter(|o| o.id != case.id) {
                    chance_pairs += 1;
                    chance_hits += u64::from(
                        other
                            .checks
                            .keywords_any
                            .iter()
                            .any(|k| contains_keyword(&haystack, &normalize(k))),
                    );
                }
            }
            f.chance = chance_hits as f64 / chance_pairs.max(1) as f64;
            f
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Suite, EvalError> {
        parse_suite(text, Path::new("evals/test.yaml"))
    }

    #[test]
    fn a_full_suite_file_parses_with_defaults_and_overrides() {
        let suite = parse(
            "seed: 7\nsampling: {temperature: 0.5, max_new_tokens: 32, guidance_scale: 1.5}\n\
             checks: {max_chars: 100}\n\
             cases:\n\
             \x20 - id: weather-ja\n    prompt: 今日の天気はどうですか？\n    keywords_any: [天気, 晴れ]\n\
             \x20 - id: food-en\n    prompt: What did you eat today?\n    max_chars: 50\n    same_language: false\n",
        )
        .unwrap();
        assert_eq!(suite.name, "test");
        assert_eq!(suite.seed, 7);
        assert_eq!(suite.sampling.temperature, Some(0.5));
        assert_eq!(suite.sampling.max_new_tokens, Some(32));
        assert_eq!(suite.sampling.top_k, None);
        assert_eq!(suite.sampling.guidance_scale, Some(1.5));
        let [ja, en] = &suite.cases[..] else { panic!() };
        assert_eq!(ja.language, "ja");
        assert_eq!(ja.checks.max_chars, 100);
        assert_eq!(ja.checks.keywords_any, vec!["天気", "晴れ"]);
        assert_eq!(en.language, "en");
        assert_eq!(en.checks.max_chars, 50);
        assert!(!en.checks.same_language);
        assert!(en.checks.keywords_any.is_empty());
    }

    #[test]
    fn mistakes_in_a_suite_file_are_errors_that_say_what() {
        for (text, needle) in [
            ("cases: []", "empty"),
            ("seed: 1", "no `cases`"),
            (
                "cases:\n  - id: a\n    prompt: hi there\n    keyword_any: [x]\n",
                "keyword_any",
            ),
            ("cases:\n  - id: a\n", "no `prompt`"),
            ("cases:\n  - prompt: hello you\n", "no `id`"),
            (
                "cases:\n  - {id: a, prompt: hi you}\n  - {id: a, prompt: hi you}\n",
                "twice",
            ),
            (
                "cases:\n  - {id: a, prompt: '👍'}\n",
                "language of the prompt",
            ),
            (
                "seed: -3\ncases:\n  - {id: a, prompt: hello you}\n",
                "whole number",
            ),
            (
                "cases:\n  - {id: a, prompt: hi you, min_chars: 9, max_chars: 3}\n",
                "min_chars",
            ),
            ("cases: [\n", "not YAML"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.contains("evals/test.yaml"), "{err}");
        }
    }

    #[test]
    fn ascii_keywords_match_whole_words_and_japanese_ones_anywhere() {
        assert!(contains_keyword("hi there", "hi"));
        assert!(contains_keyword("oh, hi!", "hi"));
        assert!(!contains_keyword("this is it", "hi"));
        assert!(contains_keyword("it's raining", "rain"));
        assert!(!contains_keyword("a brain", "rain"));
        assert!(contains_keyword("today it will rain", "rain"));
        assert!(contains_keyword("just in case, take it", "just in case"));
        assert!(contains_keyword("明日は雨が降ります", "雨"));
        assert!(
            contains_keyword("東京tokyoへ", "tokyo"),
            "kana and kanji are not word letters"
        );
        assert!(!contains_keyword("anything", ""));
    }

    #[test]
    fn repetition_counts_repeated_character_ngrams_and_lines() {
        let r = repetition("ははははははは");
        assert!((r.repeated_ngram_ratio - 0.75).abs() < 1e-9);
        assert_eq!(repetition("はい").repeated_ngram_ratio, 0.0);
        let prose = "今日はとてもいい天気ですね。公園を散歩して、おいしいコーヒーを飲みました。";
        assert!(repetition(prose).repeated_ngram_ratio < 0.05);
        let english = "The weather is lovely today: sunny, warm and calm. Perfect for a walk \
                       in the park, and maybe an ice cream by the river afterwards.";
        assert!(repetition(english).repeated_ngram_ratio < 0.2);
        assert_eq!(repetition("a\nb\n a \n\na").max_line_repeats, 3);
        // Whitespace runs count as one space.
        assert_eq!(
            repetition("ab  cd").repeated_ngram_ratio,
            repetition("ab cd").repeated_ngram_ratio
        );
    }
}
