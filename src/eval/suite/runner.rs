//! Running a suite (see [the suite's docs](super)): each case through the reply engine, the
//! checks on its reply, and the report.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use super::{Case, Suite};
use crate::engine::{
    rank::is_echo, EngineError, EngineMode, Ranked, ReplyEngine, ReplySource, Request, Retrieval,
};
use crate::eval::{parallel_map, EvalError};
use crate::model::{ChatMessage, GenerateOptions, Generator, Sampling, SamplingParams};
use crate::text::lang;
use crate::text::{repetition, REPETITION_NGRAM};

/// Settings given on the command line, over every suite file's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOverrides {
    pub seed: Option<u64>,
    pub sampling: Sampling,
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
