//! The suite file format (see [the suite's docs](super)): the types a file becomes, and the
//! reader that checks it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use yaml_rust2::{Yaml, YamlLoader};

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
