//! The evaluation report (`report.json` for scripts, `report.md` for people) and the gate that
//! compares a candidate model with a baseline.
//!
//! **When a candidate is worse.** The gate compares the figures both models were measured on:
//!
//! - held-out **bits per byte**: worse if the candidate's is higher than the baseline's by more
//!   than `bpb_tolerance` (0.01 bits per byte by default). Bits per byte, not loss or
//!   perplexity, because they do not depend on the tokenizer: a candidate with a new tokenizer
//!   is judged on the same bytes.
//! - **suite cases passed**: worse if the candidate passes fewer cases than the baseline minus
//!   `case_tolerance` (0 by default). The cases that passed before and fail now are listed.
//!
//! The two must have been evaluated on the same data file (same SHA-256) and the same suite
//! cases with the same sampling settings; otherwise there is no verdict but an error. `kaiwa eval --gate` exits with
//! [`EXIT_GATE_FAILED`] when the candidate is worse.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::heldout::HeldoutReport;
use super::suite::{SuiteReport, REPETITION_NGRAM};
use super::EvalError;
use crate::engine::EngineMode;

/// The exit status of `kaiwa eval --gate` when the candidate is worse than the baseline
/// (1 is any other error, 2 a usage error).
pub const EXIT_GATE_FAILED: u8 = 3;

/// File names inside the report directory.
pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";

/// Everything one evaluation of one model found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub kaiwa_version: String,
    pub model: String,
    pub heldout: Option<HeldoutReport>,
    pub suite: Option<SuiteReport>,
    /// The comparison with a baseline, when one was given.
    pub gate: Option<GateReport>,
}

/// How much worse a candidate may be before the gate fails.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateRules {
    /// Bits per byte the candidate may lose.
    pub bpb_tolerance: f64,
    /// Suite cases the candidate may pass fewer of.
    pub case_tolerance: u64,
}

impl Default for GateRules {
    fn default() -> Self {
        GateRules {
            bpb_tolerance: 0.01,
            case_tolerance: 0,
        }
    }
}

/// The gate's verdict, figure by figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub baseline: String,
    pub rules: GateRules,
    pub comparisons: Vec<Comparison>,
    /// Suite cases the baseline passed and the candidate fails.
    pub regressions: Vec<String>,
    pub passed: bool,
}

/// One figure of the candidate against the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub figure: String,
    pub candidate: f64,
    pub baseline: f64,
    /// What counts as worse, in words.
    pub rule: String,
    pub worse: bool,
}

impl GateReport {
    /// One line per worse figure, or a line saying the candidate passed.
    pub fn verdict(&self) -> String {
        if self.passed {
            return format!(
                "the candidate is not worse than the baseline {}",
                self.baseline
            );
        }
        let worse: Vec<String> = self
            .comparisons
            .iter()
            .filter(|c| c.worse)
            .map(|c| {
                format!(
                    "{}: {} against the baseline's {} ({})",
                    c.figure,
                    figure(c.candidate),
                    figure(c.baseline),
                    c.rule
                )
            })
            .collect();
        format!(
            "the candidate is worse than the baseline {}: {}",
            self.baseline,
            worse.join("; ")
        )
    }
}

fn figure(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// Compares `candidate` with `baseline` under `rules` (see the module docs).
pub fn compare(
    candidate: &Report,
    baseline: &Report,
    rules: &GateRules,
) -> Result<GateReport, EvalError> {
    let mut comparisons = Vec::new();
    let mut regressions = Vec::new();
    match (&candidate.heldout, &baseline.heldout) {
        (Some(c), Some(b)) => {
            if c.data_sha256 != b.data_sha256 || c.format != b.format {
                return Err(EvalError::NotComparable(format!(
                    "the candidate was scored on {} (sha256 {}) and the baseline on {} \
                     (sha256 {})",
                    c.data,
                    short(&c.data_sha256),
                    b.data,
                    short(&b.data_sha256)
                )));
            }
            // NaN (a broken candidate) counts as worse.
            let limit = b.bits_per_byte + rules.bpb_tolerance;
            let worse = c.bits_per_byte.is_nan() || c.bits_per_byte > limit;
            comparisons.push(Comparison {
                figure: "held-out bits per byte".into(),
                candidate: c.bits_per_byte,
                baseline: b.bits_per_byte,
                rule: format!(
                    "worse if higher than the baseline's + {}",
                    rules.bpb_tolerance
                ),
                worse,
            });
        }
        (None, None) => {}
        (c, _) => {
            return Err(EvalError::NotComparable(format!(
                "only the {} was evaluated on held-out data",
                if c.is_some() { "candidate" } else { "baseline" }
            )))
        }
    }
    match (&candidate.suite, &baseline.suite) {
        (Some(c), Some(b)) => {
            if c.case_keys() != b.case_keys() {
                return Err(EvalError::NotComparable(
                    "the candidate and the baseline ran different suite cases".into(),
                ));
            }
            for (cf, bf) in c.files.iter().zip(&b.files) {
                if cf.sampling != bf.sampling {
                    return Err(EvalError::NotComparable(format!(
                        "suite {} was sampled with other settings for the candidate ({:?}) \
                         than for the baseline ({:?}); fix them in the suite file",
                        cf.name, cf.sampling, bf.sampling
                    )));
                }
            }
            let now = c.passed_keys();
            regressions = b
                .passed_keys()
                .into_iter()
                .filter(|k| !now.contains(k))
                .collect();
            comparisons.push(Comparison {
                figure: "suite cases passed".into(),
                candidate: c.passed as f64,
                baseline: b.passed as f64,
                rule: format!(
                    "worse if fewer than the baseline's − {} (of {})",
                    rules.case_tolerance, c.cases
                ),
                worse: c.passed + rules.case_tolerance < b.passed,
            });
            // On topic per language, where both reports measured it: this is where engines
            // (or a model with and without the engine) differ most.
            let engine = |r: &SuiteReport| r.engine.map_or("model alone", EngineMode::as_str);
            for cf in c.figures.iter().filter(|f| f.split == "all") {
                let Some(bf) = b
                    .figures
                    .iter()
                    .find(|f| f.split == "all" && f.language == cf.language)
                else {
                    continue;
                };
                comparisons.push(Comparison {
                    figure: format!(
                        "on topic, {} ({} against {})",
                        cf.language,
                        engine(c),
                        engine(b)
                    ),
                    candidate: cf.on_topic as f64,
                    baseline: bf.on_topic as f64,
                    rule: format!(
                        "worse if fewer than the baseline's − {} (of {})",
                        rules.case_tolerance, cf.cases
                    ),
                    worse: cf.on_topic + rules.case_tolerance < bf.on_topic,
                });
            }
        }
        (None, None) => {}
        (c, _) => {
            return Err(EvalError::NotComparable(format!(
                "only the {} ran the conversation suite",
                if c.is_some() { "candidate" } else { "baseline" }
            )))
        }
    }
    if comparisons.is_empty() {
        return Err(EvalError::NotComparable(
            "neither held-out data nor a suite was evaluated".into(),
        ));
    }
    Ok(GateReport {
        baseline: baseline.model.clone(),
        rules: *rules,
        passed: comparisons.iter().all(|c| !c.worse),
        comparisons,
        regressions,
    })
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

impl Report {
    /// Writes `report.json` and `report.md` into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), EvalError> {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let json = dir.join(REPORT_JSON);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| EvalError::Invalid(format!("cannot serialise the report: {e}")))?;
        std::fs::write(&json, text + "\n").map_err(|e| EvalError::io(&json, e))?;
        let md = dir.join(REPORT_MD);
        std::fs::write(&md, self.markdown()).map_err(|e| EvalError::io(&md, e))?;
        Ok((json, md))
    }

    /// Reads a `report.json`.
    pub fn read(path: &Path) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| EvalError::Data {
            path: path.to_path_buf(),
            line: e.line(),
            reason: format!("not a kaiwa eval report: {e}"),
        })
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if let Some(h) = &self.heldout {
            let _ = write!(
                out,
                "held-out: loss {:.4} nats/token, perplexity {:.2}, {:.4} bits per byte \
                 ({} examples, {} tokens, {} bytes",
                h.loss, h.perplexity, h.bits_per_byte, h.examples, h.tokens, h.bytes
            );
            if h.skipped > 0 {
                let _ = write!(out, ", {} skipped", h.skipped);
            }
            out.push_str(")\n");
            if let Some(n) = &h.ngram {
                let _ = writeln!(
                    out,
                    "byte {}-gram baseline: {:.4} bits per byte",
                    n.order, n.bits_per_byte
                );
            }
            if let Some(g) = &h.prompt_gain {
                let _ = writeln!(
                    out,
                    "prompt dependence: replies cost {:.4} nats/token after their own prompt, \
                     {:.4} after another's (gain {:.4}, {} exchanges)",
                    g.loss_own, g.loss_other, g.gain, g.exchanges
                );
            }
        }
        if let Some(s) = &self.suite {
            let _ = writeln!(out, "suite: {}/{} cases passed", s.passed, s.cases);
            for f in &s.figures {
                let _ = writeln!(
                    out,
                    "  {} {}: on topic {}/{} ({:.0} %, by chance {:.1} %), right language {}, \
                     echoes {}, loops {}, fallbacks {}",
                    f.language,
                    f.split,
                    f.on_topic,
                    f.cases,
                    100.0 * f.on_topic_share(),
                    100.0 * f.chance,
                    f.right_language,
                    f.echoes,
                    f.loops,
                    f.fallbacks
                );
            }
        }
        if let Some(g) = &self.gate {
            let _ = writeln!(
                out,
                "gate: {} — {}",
                if g.passed { "PASSED" } else { "FAILED" },
                g.verdict()
            );
        }
        out
    }

    /// The report as Markdown: figures, every suite answer with its checks, the gate.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Evaluation of `{}`\n", self.model);
        let _ = writeln!(md, "kaiwa {}\n", self.kaiwa_version);
        if let Some(g) = &self.gate {
            self.gate_markdown(&mut md, g);
        }
        if let Some(h) = &self.heldout {
            heldout_markdown(&mut md, h);
        }
        if let Some(s) = &self.suite {
            suite_markdown(&mut md, s);
        }
        md
    }

    fn gate_markdown(&self, md: &mut String, g: &GateReport) {
        let _ = writeln!(
            md,
            "## Gate against `{}`: {}\n",
            g.baseline,
            if g.passed { "PASSED" } else { "FAILED" }
        );
        let _ = writeln!(md, "| figure | candidate | baseline | rule | verdict |");
        let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
        for c in &g.comparisons {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                c.figure,
                figure(c.candidate),
                figure(c.baseline),
                c.rule,
                if c.worse { "worse" } else { "ok" }
            );
        }
        if !g.regressions.is_empty() {
            let _ = writeln!(
                md,
                "\nPassed by the baseline, failed now: {}",
                g.regressions
                    .iter()
                    .map(|r| format!("`{r}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        md.push('\n');
    }
}

fn heldout_markdown(md: &mut String, h: &HeldoutReport) {
    let _ = writeln!(md, "## Held-out data\n");
    let _ = writeln!(
        md,
        "`{}` ({}, sha256 `{}`): {} examples scored, {} skipped; {} tokens, {} bytes; \
         context {} tokens, sliding window stride {}, {} forward passes, {:.1} s.\n",
        h.data,
        h.format.name(),
        short(&h.data_sha256),
        h.examples,
        h.skipped,
        h.tokens,
        h.bytes,
        h.context,
        h.stride,
        h.windows,
        h.seconds
    );
    let ngram_header = h
        .ngram
        .as_ref()
        .map(|n| format!("byte {}-gram ({})", n.order, n.smoothing));
    match &ngram_header {
        Some(name) => {
            let _ = writeln!(md, "| figure | model | {name} |\n| --- | --- | --- |");
        }
        None => {
            let _ = writeln!(md, "| figure | model |\n| --- | --- |");
        }
    }
    let ngram_cell = |v: Option<String>| match &ngram_header {
        Some(_) => format!(" {} |", v.unwrap_or_else(|| "—".into())),
        None => String::new(),
    };
    let _ = writeln!(
        md,
        "| loss (nats/token) | {:.4} |{}",
        h.loss,
        ngram_cell(None)
    );
    let _ = writeln!(
        md,
        "| perplexity | {:.2} |{}",
        h.perplexity,
        ngram_cell(None)
    );
    let _ = writeln!(
        md,
        "| bits per byte | {:.4} |{}",
        h.bits_per_byte,
        ngram_cell(h.ngram.as_ref().map(|n| format!("{:.4}", n.bits_per_byte)))
    );
    if let Some(n) = &h.ngram {
        let _ = writeln!(
            md,
            "\nThe n-gram was trained on `{}` ({} bytes; discounts {}).",
            n.train,
            n.train_bytes,
            n.discounts
                .iter()
                .map(|d| format!("{d:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !h.per_language.is_empty() {
        let _ = writeln!(
            md,
            "\n| language | examples | tokens | bytes | loss | bits per byte | n-gram bits per byte |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
        for (lang, f) in &h.per_language {
            let _ = writeln!(
                md,
                "| {lang} | {} | {} | {} | {:.4} | {:.4} | {} |",
                f.examples,
                f.tokens,
                f.bytes,
                f.loss,
                f.bits_per_byte,
                f.ngram_bits_per_byte
                    .map(|b| format!("{b:.4}"))
                    .unwrap_or_else(|| "—".into())
            );
        }
    }
    if let Some(g) = &h.prompt_gain {
        let _ = writeln!(
            md,
            "\nPrompt dependence: the first reply of {} examples ({} tokens) costs {:.4} nats per \
             token after its own prompt and {:.4} after the previous example's, a gain of \
             **{:.4}** nats per token. A model that ignores what it is answering gains about 0.",
            g.exchanges, g.tokens, g.loss_own, g.loss_other, g.gain
        );
    }
    if h.tokenization_mismatches > 0 {
        let _ = writeln!(
            md,
            "\n{} examples tokenize differently piece by piece than whole; they were scored \
             piece by piece.",
            h.tokenization_mismatches
        );
    }
    if !h.skipped_reasons.is_empty() {
        let _ = writeln!(md, "\nSkipped:\n");
        for r in &h.skipped_reasons {
            let _ = writeln!(md, "- {r}");
        }
    }
    md.push('\n');
}

fn suite_markdown(md: &mut String, s: &SuiteReport) {
    let _ = writeln!(
        md,
        "## Conversation suite: {}/{} cases passed\n",
        s.passed, s.cases
    );
    if let Some(engine) = s.engine {
        let _ = writeln!(md, "Replies from the reply engine in {engine:?} mode.\n");
    }
    if !s.figures.is_empty() {
        let _ = writeln!(
            md,
            "On topic: the reply has one of its case's keywords; by chance: how often a reply \
             has one of another case's (same language).\n\n\
             | language | split | cases | on topic | by chance | right language | echoes | loops | \
             repeated | fallbacks | sources |\n\
             | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for f in &s.figures {
            let sources: Vec<String> = f.sources.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} ({:.0} %) | {:.1} % | {} | {} | {} | {} | {} | {} |",
                f.language,
                f.split,
                f.cases,
                f.on_topic,
                100.0 * f.on_topic_share(),
                100.0 * f.chance,
                f.right_language,
                f.echoes,
                f.loops,
                f.repeated,
                f.fallbacks,
                sources.join(", ")
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "Repetition is the share of repeated character {REPETITION_NGRAM}-grams and the most \
         repeated line.\n"
    );
    for f in &s.files {
        let p = &f.sampling;
        let passed = f.cases.iter().filter(|c| c.passed).count();
        let _ = writeln!(
            md,
            "### {} ({}/{} passed)\n\n`{}`: seed {}, temperature {}, top-k {}, top-p {}, \
             repetition penalty {}{}, at most {} new tokens.\n",
            f.name,
            passed,
            f.cases.len(),
            f.path,
            p.seed,
            p.sampling.temperature,
            p.sampling.top_k,
            p.sampling.top_p,
            p.sampling.repetition_penalty,
            if p.guidance_scale == 1.0 {
                String::new()
            } else {
                format!(", guidance scale {}", p.guidance_scale)
            },
            p.max_new_tokens
        );
        let _ = writeln!(md, "| case | language | result | failed checks |");
        let _ = writeln!(md, "| --- | --- | --- | --- |");
        for c in &f.cases {
            let failed: Vec<&str> = c
                .checks
                .iter()
                .filter(|k| !k.passed)
                .map(|k| k.name.as_str())
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                c.id,
                c.language,
                if c.passed { "pass" } else { "FAIL" },
                failed.join(", ")
            );
        }
        md.push('\n');
        for c in &f.cases {
            let _ = writeln!(
                md,
                "#### {} — {}\n",
                c.id,
                if c.passed { "pass" } else { "FAIL" }
            );
            let _ = writeln!(md, "Prompt:\n\n{}", fenced(&c.prompt));
            let how = match c.source {
                Some(source) => {
                    format!(
                        "source {}, {} tokens generated",
                        source.as_str(),
                        c.new_tokens
                    )
                }
                None => format!("{} tokens, stopped by {}", c.new_tokens, c.stop),
            };
            let _ = writeln!(md, "Answer ({how}):\n\n{}", fenced(&c.answer));
            for k in &c.checks {
                let _ = writeln!(
                    md,
                    "- {} `{}`: {}",
                    if k.passed { "pass" } else { "FAIL" },
                    k.name,
                    k.detail
                );
            }
            md.push('\n');
        }
    }
}

/// `text` in a fenced block longer than any run of backticks inside it.
fn fenced(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat((longest + 1).max(3));
    format!("{fence}text\n{text}\n{fence}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_is_longer_than_the_backticks_inside() {
        assert!(fenced("plain").starts_with("```text\n"));
        assert!(fenced("a ```` b").starts_with("`````text\n"));
    }
}
