//! The suite file format (see [the suite's docs](super)): the types a file becomes, and the
//! reader that checks it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::eval::EvalError;
use crate::model::Sampling;
use crate::text::lang;

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

/// The limits a reply is held to (see [the suite's docs](super)).
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

/// Parses one suite file (see [the suite's docs](super) for the format).
pub fn parse_suite(text: &str, path: &Path) -> Result<Suite, EvalError> {
    let err = |reason: String| EvalError::Suite {
        path: path.to_path_buf(),
        reason,
    };
    let file = read_yaml(text)
        .map_err(&err)?
        .ok_or_else(|| err("an empty file".into()))?;
    let default_name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("suite")
        .to_string();
    let name = file.name.unwrap_or(default_name);
    let seed = file.seed.unwrap_or(0);
    let sampling = file.sampling.map_or_else(Sampling::default, |s| s.sampling);
    for (key, value) in [
        ("temperature", sampling.temperature),
        ("top_p", sampling.top_p),
        ("repetition_penalty", sampling.repetition_penalty),
        ("guidance_scale", sampling.guidance_scale),
    ] {
        if let Some(v) = value.filter(|v| !v.is_finite()) {
            return Err(err(format!("sampling: `{key}` must be a number, not {v}")));
        }
    }
    let mut defaults = Checks::default();
    if let Some(checks) = file.checks {
        checks.apply(&mut defaults).map_err(&err)?;
    }
    let list = file.cases.ok_or_else(|| err("no `cases` list".into()))?;
    if list.is_empty() {
        return Err(err("`cases` is empty".into()));
    }
    let mut cases = Vec::with_capacity(list.len());
    let mut ids = BTreeSet::new();
    for (i, case) in list.into_iter().enumerate() {
        let CaseFields {
            id,
            prompt,
            system,
            language,
            split,
            min_chars,
            max_chars,
            same_language,
            keywords_any,
            max_repeated_ngram_ratio,
            max_line_repeats,
        } = case;
        let id = id.ok_or_else(|| err(format!("case {}: no `id`", i + 1)))?;
        if !ids.insert(id.clone()) {
            return Err(err(format!("case id {id:?} appears twice")));
        }
        let prompt = prompt
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| err(format!("case {id:?}: no `prompt`")))?;
        let mut checks = defaults.clone();
        let overrides = CheckFields {
            min_chars,
            max_chars,
            same_language,
            keywords_any,
            max_repeated_ngram_ratio,
            max_line_repeats,
        };
        overrides
            .apply(&mut checks)
            .map_err(|e| err(format!("case {id:?}: {e}")))?;
        if checks.min_chars > checks.max_chars {
            return Err(err(format!(
                "case {id:?}: min_chars {} is above max_chars {}",
                checks.min_chars, checks.max_chars
            )));
        }
        let language = match language {
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
        if let Some(sp) = split.as_deref().filter(|s| !["dev", "test"].contains(s)) {
            return Err(err(format!(
                "case {id:?}: split must be dev or test, not {sp:?}"
            )));
        }
        cases.push(Case {
            split,
            id,
            prompt,
            system: system.or_else(|| file.system.clone()),
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

/// Reads the YAML of a suite file into [`SuiteFile`]: `None` for a file with no document. An
/// error names the key it is about (`cases[2].max_chars`) and its line and column.
fn read_yaml(text: &str) -> Result<Option<SuiteFile>, String> {
    let options = serde_saphyr::options! {
        // Plain text, no source excerpt: the message is one line of an error.
        with_snippet: false,
        // `yes`, `on` and the like are text, not booleans (YAML 1.2).
        strict_booleans: true,
        // `<<` is an unknown key like any other, not a merge.
        merge_keys: serde_saphyr::MergeKeyPolicy::AsOrdinary,
    };
    let mut path = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = Some(e.path().to_string());
            e.into_inner()
        })
    })
    .map_err(|e| {
        // The wording meant for the people who write the files (not the developers' one,
        // which names serde-saphyr's options).
        let message = e.render_with_formatter(&serde_saphyr::UserMessageFormatter);
        let key = path
            .as_deref()
            .map(|p| p.trim_end_matches(".?"))
            .filter(|p| !p.is_empty() && *p != ".");
        match (e.without_snippet(), key) {
            (serde_saphyr::Error::ExternalMessage { source, .. }, _)
                if matches!(**source, serde_saphyr::ExternalMessageSource::Parser(_)) =>
            {
                format!("not YAML: {message}")
            }
            (serde_saphyr::Error::MultipleDocuments { location, .. }, _) => format!(
                "a second YAML document at line {}: a suite file is one document",
                location.line()
            ),
            (_, Some(key)) => format!("{key}: {message}"),
            (_, None) => message,
        }
    })
}

/// A suite file as written: every key optional here, the rules checked in [`parse_suite`].
/// Unknown keys are errors, at every level.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    name: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    seed: Option<u64>,
    sampling: Option<SamplingSection>,
    system: Option<String>,
    checks: Option<CheckFields>,
    cases: Option<Vec<CaseFields>>,
}

/// `sampling:`, the model's [`Sampling`] settings and no other key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplingSection {
    #[serde(flatten)]
    sampling: Sampling,
}

/// The checks a file or a case sets; the rest come from the level above.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckFields {
    #[serde(default, deserialize_with = "whole")]
    min_chars: Option<usize>,
    #[serde(default, deserialize_with = "whole")]
    max_chars: Option<usize>,
    same_language: Option<bool>,
    keywords_any: Option<Vec<String>>,
    max_repeated_ngram_ratio: Option<f64>,
    #[serde(default, deserialize_with = "whole")]
    max_line_repeats: Option<usize>,
}

impl CheckFields {
    fn apply(self, c: &mut Checks) -> Result<(), String> {
        if let Some(v) = self.max_repeated_ngram_ratio {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!(
                    "max_repeated_ngram_ratio must be in [0, 1], not {v}"
                ));
            }
            c.max_repeated_ngram_ratio = v;
        }
        c.min_chars = self.min_chars.unwrap_or(c.min_chars);
        c.max_chars = self.max_chars.unwrap_or(c.max_chars);
        c.same_language = self.same_language.unwrap_or(c.same_language);
        if let Some(v) = self.keywords_any {
            c.keywords_any = v;
        }
        c.max_line_repeats = self.max_line_repeats.unwrap_or(c.max_line_repeats);
        Ok(())
    }
}

/// One entry of `cases:`: the case's own keys, then those of [`CheckFields`] for this case alone.
/// (Listed again, not `#[serde(flatten)]`: serde reads a flattened field through its untyped
/// buffer, where `keywords_any: [2024]` is a number and no longer the text "2024".)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFields {
    id: Option<String>,
    prompt: Option<String>,
    system: Option<String>,
    language: Option<String>,
    split: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    min_chars: Option<usize>,
    #[serde(default, deserialize_with = "whole")]
    max_chars: Option<usize>,
    same_language: Option<bool>,
    keywords_any: Option<Vec<String>>,
    max_repeated_ngram_ratio: Option<f64>,
    #[serde(default, deserialize_with = "whole")]
    max_line_repeats: Option<usize>,
}

/// A whole number of 0 or more, or null; an error says that is what was expected.
fn whole<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Whole(u64);

    impl<'de> Deserialize<'de> for Whole {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(WholeVisitor).map(Whole)
        }
    }

    struct WholeVisitor;

    impl Visitor<'_> for WholeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number of 0 or more")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
    }

    Option::<Whole>::deserialize(deserializer)?
        .map(|Whole(n)| T::try_from(n).map_err(|_| de::Error::custom(format!("{n} is too large"))))
        .transpose()
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
}
