//! `kaiwa eval`: the "test before deploy" step. A model is measured on held-out data and on a
//! conversation suite, beside a baseline that needs no training, and can be compared with the
//! deployed model so that promotion can be scripted.
//!
//! - [`data`]: the held-out and training files (chat JSONL or plain text).
//! - [`heldout`]: loss, perplexity and bits per byte through tract.
//! - [`ngram`]: the byte-level n-gram baseline, scored on the same bytes.
//! - [`suite`]: the YAML conversation suite in `evals/` and the checks on each reply.
//! - [`report`]: `report.md` and `report.json`, and the gate that says whether a candidate is
//!   worse than a baseline.
//!
//! [`run`] is the whole command: it reads the inputs once, evaluates the candidate (and the
//! baseline, when given as a model directory) and writes the report.

pub mod heldout;
pub mod ngram;
pub mod report;
pub mod suite;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::model::{Generator, ModelError, TOKENIZER_FILE};

pub use crate::dataset::{DataFormat, Dataset};
pub use heldout::{HeldoutReport, NgramBaseline};
pub use ngram::ByteNgram;
pub use report::{compare, GateReport, GateRules, Report, EXIT_GATE_FAILED};
pub use suite::{SamplingOverrides, Suite, SuiteReport};

use crate::engine::{EngineMode, EngineSettings, ReplyEngine};
use crate::store::Store;

/// Everything that can go wrong in an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {reason}", path.display(), line_suffix(*line))]
    Data {
        path: PathBuf,
        /// 1-based; 0 when the problem is the whole file.
        line: usize,
        reason: String,
    },
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    #[error("suite {}: {reason}", path.display())]
    Suite { path: PathBuf, reason: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("the reply engine's store: {0}")]
    Store(String),
    #[error("cannot compare with the baseline: {0}")]
    NotComparable(String),
    #[error("{0}")]
    Invalid(String),
}

fn line_suffix(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

impl EvalError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The settings of `kaiwa eval`.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The candidate model directory.
    pub model: PathBuf,
    /// Held-out data; none skips the held-out figures.
    pub data: Option<PathBuf>,
    /// The data's format; by default from its extension.
    pub format: Option<DataFormat>,
    /// Training data for the n-gram baseline; by default `train.<ext>` beside `data`, if there.
    pub train: Option<PathBuf>,
    pub ngram_order: usize,
    /// Suite files or directories; empty skips the suite.
    pub suites: Vec<PathBuf>,
    pub overrides: SamplingOverrides,
    /// Score only the first this many examples.
    pub max_examples: Option<usize>,
    /// Where the report goes; by default `<model>/eval`.
    pub report_dir: Option<PathBuf>,
    /// A model directory to evaluate the same way, or a directory holding (or the path of) the
    /// `report.json` of an earlier evaluation on the same data and suite.
    pub baseline: Option<PathBuf>,
    pub rules: GateRules,
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    /// The reply engine the suite's replies come from.
    pub engine: EngineSettings,
    /// The store the engine retrieves from; by default a fresh one in a temporary directory
    /// holding the model's retrieval data (`engine::corpora`), so the figures do not depend on
    /// what a local store collected.
    pub store: Option<String>,
    /// Candidates kept per suite case in the report, best first (0: all of them, which is
    /// what `research/ranker/tune.py` replays).
    pub candidates: usize,
}

/// Candidates kept per case in a report by default: what competed, without making the report
/// megabytes long.
pub const REPORT_CANDIDATES: usize = 3;

impl EvalOptions {
    /// Options that evaluate `model` on nothing yet; fill in data and suites.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EvalOptions {
            model: model.into(),
            data: None,
            format: None,
            train: None,
            ngram_order: ngram::DEFAULT_ORDER,
            suites: Vec::new(),
            overrides: SamplingOverrides::default(),
            max_examples: None,
            report_dir: None,
            baseline: None,
            rules: GateRules::default(),
            threads: 0,
            engine: EngineSettings::default(),
            store: None,
            candidates: REPORT_CANDIDATES,
        }
    }

    /// The report directory: the one given, else `<model>/eval`.
    pub fn report_dir(&self) -> PathBuf {
        self.report_dir
            .clone()
            .unwrap_or_else(|| self.model.join("eval"))
    }
}

/// The inputs of an evaluation, read once and shared by the candidate and the baseline.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub data: Option<Dataset>,
    pub ngram: Option<NgramBaseline>,
    pub suites: Vec<Suite>,
    pub overrides: SamplingOverrides,
    pub threads: usize,
    pub engine: EngineSettings,
    pub store: Option<String>,
    pub candidates: usize,
}

impl Inputs {
    /// Reads the data, trains the n-gram and parses the suites.
    pub fn load(options: &EvalOptions) -> Result<Self, EvalError> {
        if !(1..=ngram::MAX_ORDER).contains(&options.ngram_order) {
            return Err(EvalError::Invalid(format!(
                "the n-gram order must be 1 to {}, not {}",
                ngram::MAX_ORDER,
                options.ngram_order
            )));
        }
        let data = match &options.data {
            Some(path) => {
                let mut d = Dataset::read(path, options.format)?;
                if let Some(max) = options.max_examples {
                    d.examples.truncate(max);
                }
                Some(d)
            }
            None => None,
        };
        let train = match (&options.train, &data) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(d)) => sibling_train_file(&d.path),
            (None, None) => None,
        };
        let ngram = match (&train, &data) {
            (Some(path), Some(d)) => {
                let train_data = Dataset::read(path, Some(d.format))?;
                let texts = train_data.examples.iter().flat_map(|e| e.scored_texts());
                let model = ByteNgram::train(texts.map(str::as_bytes), options.ngram_order);
                tracing::info!(
                    train = %path.display(),
                    bytes = model.trained_bytes(),
                    order = model.order(),
                    "n-gram baseline trained"
                );
                Some(NgramBaseline {
                    model,
                    train: path.display().to_string(),
                })
            }
            (None, Some(_)) => {
                tracing::warn!("no training file: the n-gram baseline is left out (give --train)");
                None
            }
            _ => None,
        };
        let suites = suite::load_suites(&options.suites)?;
        if data.is_none() && suites.is_empty() {
            return Err(EvalError::Invalid(
                "nothing to evaluate: give held-out data (--data) or a suite (--suite)".into(),
            ));
        }
        Ok(Inputs {
            data,
            ngram,
            suites,
            overrides: options.overrides.clone(),
            threads: options.threads,
            engine: options.engine.clone(),
            store: options.store.clone(),
            candidates: options.candidates,
        })
    }
}

/// `train.jsonl` beside `validation.jsonl` (the layout `kaiwa export-corpus` writes).
fn sibling_train_file(data: &Path) -> Option<PathBuf> {
    let ext = data.extension()?;
    let candidate = data.with_file_name("train").with_extension(ext);
    (candidate.is_file() && candidate != data).then_some(candidate)
}

/// Evaluates the model in `dir` on `inputs`.
pub fn evaluate(dir: &Path, inputs: &Inputs) -> Result<Report, EvalError> {
    // The evaluation already keeps `threads` workers busy (one window or suite case each); a
    // model with a thread pool of its own would only add a spinning thread to them.
    let model_threads = match worker_count(inputs.threads) {
        1 => crate::model::threads::default_threads(),
        _ => 1,
    };
    let generator = Generator::load_with_threads(dir, model_threads)?;
    let heldout = match &inputs.data {
        Some(data) => Some(heldout::evaluate(
            &generator,
            data,
            inputs.ngram.as_ref(),
            inputs.threads,
        )?),
        None => None,
    };
    let suite = if inputs.suites.is_empty() {
        None
    } else {
        Some(run_engine_suites(dir, &generator, inputs)?)
    };
    Ok(Report {
        kaiwa_version: env!("CARGO_PKG_VERSION").into(),
        model: dir.display().to_string(),
        heldout,
        suite,
        gate: None,
    })
}

/// Runs the suites through the reply engine, retrieving from the store of `inputs` (by
/// default a scratch store with the model's retrieval data).
fn run_engine_suites(
    dir: &Path,
    generator: &Generator,
    inputs: &Inputs,
) -> Result<suite::SuiteReport, EvalError> {
    inputs.engine.validate()?;
    let engine = ReplyEngine::new(inputs.engine.clone());
    if inputs.engine.mode == EngineMode::Generate {
        let none = |_: &str| Ok(crate::engine::Retrieval::default());
        return suite::run_suites(
            generator,
            &engine,
            &none,
            &inputs.suites,
            &inputs.overrides,
            inputs.threads,
        );
    }
    let store_err = |e: String| EvalError::Store(e);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| store_err(e.to_string()))?;
    let scratch;
    let url = match &inputs.store {
        Some(url) => url.clone(),
        None => {
            scratch = tempfile::tempdir().map_err(|e| store_err(e.to_string()))?;
            scratch.path().join("retrieval.db").display().to_string()
        }
    };
    let store = rt
        .block_on(Store::open(&url))
        .map_err(|e| store_err(e.to_string()))?;
    let started = std::time::Instant::now();
    rt.block_on(crate::engine::corpora::ensure_corpora(&store, dir))
        .map_err(|e| store_err(e.to_string()))?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f32(),
        store = %crate::store::display_url(&url),
        "retrieval data ready"
    );
    let handle = rt.handle().clone();
    let retrieve = |text: &str| handle.block_on(engine.retrieve(&store, text));
    let report = suite::run_suites(
        generator,
        &engine,
        &retrieve,
        &inputs.suites,
        &inputs.overrides,
        inputs.threads,
    );
    rt.block_on(store.close());
    let mut report = report?;
    if inputs.candidates > 0 {
        for case in report.files.iter_mut().flat_map(|f| f.cases.iter_mut()) {
            case.candidates.truncate(inputs.candidates);
        }
    }
    Ok(report)
}

/// What [`run`] did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub report: Report,
    pub report_dir: PathBuf,
    pub baseline: Option<Report>,
}

impl Outcome {
    /// Whether a gate was asked for (a baseline given) and failed.
    pub fn gate_failed(&self) -> bool {
        self.report.gate.as_ref().is_some_and(|g| !g.passed)
    }
}

/// `kaiwa eval`: evaluates the candidate and, when given, the baseline on the same inputs,
/// compares them, and writes `report.json` and `report.md` (the baseline's own report goes to
/// `baseline/` inside the report directory when it was evaluated here).
pub fn run(options: &EvalOptions) -> Result<Outcome, EvalError> {
    let inputs = Inputs::load(options)?;
    let report_dir = options.report_dir();
    let mut report = evaluate(&options.model, &inputs)?;
    let mut baseline = None;
    if let Some(path) = &options.baseline {
        let base = if path.join(TOKENIZER_FILE).is_file() {
            let base = evaluate(path, &inputs)?;
            base.write(&report_dir.join("baseline"))?;
            base
        } else if path.is_dir() {
            Report::read(&path.join(report::REPORT_JSON))?
        } else {
            Report::read(path)?
        };
        report.gate = Some(compare(&report, &base, &options.rules)?);
        baseline = Some(base);
    }
    report.write(&report_dir)?;
    Ok(Outcome {
        report,
        report_dir,
        baseline,
    })
}

/// The number of worker threads `threads` asks for: 0 means one per core.
fn worker_count(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Maps `f` over `items` on `threads` threads (0: one per core), each thread with its own
/// state from `init`. Results come back in the order of `items`; the first error (in that
/// order) is returned, and workers stop taking new items once one has failed.
///
/// Not rayon, on purpose: the state is a model session, loaded once per thread (rayon's
/// `map_init` may call `init` once per split), and `f` runs the model, whose decoder itself
/// joins on rayon's pool; inside a rayon worker such a join may steal another item of this map
/// onto the same thread while its state is in use.
fn parallel_map<T, S, R, E>(
    items: &[T],
    threads: usize,
    init: impl Fn() -> Result<S, E> + Sync,
    f: impl Fn(&mut S, &T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E>
where
    T: Sync,
    R: Send,
    E: Send,
{
    let threads = worker_count(threads).min(items.len().max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<(usize, Result<R, E>)>> = Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut state = match init() {
                    Ok(s) => s,
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut r) = results.lock() {
                            r.push((0, Err(e)));
                        }
                        return;
                    }
                };
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let result = f(&mut state, item);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    if let Ok(mut r) = results.lock() {
                        r.push((i, result));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    let mut out = Vec::with_capacity(results.len());
    for (_, result) in results {
        out.push(result?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_map_keeps_order_and_returns_the_first_error() {
        let items: Vec<u32> = (0..100).collect();
        for threads in [0, 1, 3, 200] {
            let out: Result<Vec<u32>, String> = parallel_map(
                &items,
                threads,
                || Ok(0u32),
                |n, &x| {
                    *n += 1;
                    Ok(x * 2)
                },
            );
            assert_eq!(
                out.unwrap(),
                items.iter().map(|x| x * 2).collect::<Vec<_>>()
            );
        }
        let out: Result<Vec<u32>, String> = parallel_map(
            &items,
            1,
            || Ok(()),
            |_, &x| {
                if x >= 10 {
                    Err(format!("bad {x}"))
                } else {
                    Ok(x)
                }
            },
        );
        assert_eq!(out.unwrap_err(), "bad 10");
        let none: Result<Vec<u32>, String> = parallel_map(&[], 4, || Ok(()), |_, &x: &u32| Ok(x));
        assert!(none.unwrap().is_empty());
    }

    #[test]
    fn the_train_file_beside_the_validation_file_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let val = dir.path().join("validation.jsonl");
        assert_eq!(sibling_train_file(&val), None);
        std::fs::write(dir.path().join("train.jsonl"), "").unwrap();
        assert_eq!(
            sibling_train_file(&val),
            Some(dir.path().join("train.jsonl"))
        );
        assert_eq!(sibling_train_file(&dir.path().join("train.jsonl")), None);
    }
}
