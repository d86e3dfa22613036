//! `kaiwa retrain`: the learning loop as one command, safe to run from a timer.
//!
//! A *model home* keeps every installed version and says which one is deployed:
//!
//! ```text
//! HOME/current -> versions/0003      the deployed version (a relative symbolic link)
//! HOME/versions/0001/                a whole model directory, with version.json and eval/
//! HOME/runs/<started>/               one retraining run: retrain.json (its state), data/,
//!                                    train/ (the training run), eval/, report.json
//! HOME/retrain.lock                  held while a run goes on
//! ```
//!
//! A run exports what the store received since the deployed version's data was taken (by the
//! time messages were *stored*, so an import of old chats counts as new), with a replay sample
//! of the earlier data so the model does not forget it; fine-tunes the deployed version within a
//! time budget; evaluates the candidate and the deployed version on the same held-out data (the
//! new conversations' validation split) and suites; and installs the candidate as the next
//! version only when the gate passes: copied whole under a temporary name, renamed into
//! `versions/`, then `current` swapped by renaming a new link over it. Running daemons load
//! `current` again when the store's reload generation rises (raised here) or on SIGHUP.
//!
//! Every step records itself in `retrain.json` before the next starts, so a run that is killed
//! continues where it stopped when `kaiwa retrain` is started again (training from its last
//! checkpoint). Each run ends with a `report.json`, installed or not.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::corpus::export::{export, ExportError, ExportMode, ExportOptions};
use crate::eval::{EvalError, EvalOptions, GateReport, GateRules};
use crate::model::{ModelError, CURRENT_LINK};
use crate::store::{now_ms, CorpusFilter, Store, StoreError};
use crate::train::run::{LogProgress, RunSpec, Start, TrainError, TrainSummary};

/// The link to the deployed version, inside a model home.
const CURRENT: &str = CURRENT_LINK;
const VERSIONS: &str = "versions";
const RUNS: &str = "runs";
const LOCK_FILE: &str = "retrain.lock";
/// A version's own record, inside its directory.
pub const VERSION_FILE: &str = "version.json";
const STATE_FILE: &str = "retrain.json";
const REPORT_FILE: &str = "report.json";
/// What a version directory holds that is the record of one run, not part of the model: it is
/// not carried from one version to the next.
const NOT_CARRIED: [&str; 5] = [
    VERSION_FILE,
    "eval",
    "training",
    "model.onnx",
    "model.onnx.data",
];

/// Errors of a retraining run or of managing versions.
#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error("another `kaiwa retrain` is running on {0} (it holds {LOCK_FILE})")]
    Locked(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("exporting the new conversations: {0}")]
    Export(#[from] ExportError),
    #[error("training: {0}")]
    Train(#[from] TrainError),
    #[error("evaluating: {0}")]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RetrainError + '_ {
    move |source| RetrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The settings of `kaiwa retrain`.
#[derive(Debug, Clone)]
pub struct RetrainOptions {
    /// The model home (see the module docs).
    pub home: PathBuf,
    /// The model the home starts from when it has no version yet (it becomes version 1).
    pub base: PathBuf,
    /// Training time, in seconds (a hard stop that also sizes the schedule).
    pub time_s: f64,
    /// Optimizer steps instead of (or within) the time budget.
    pub steps: Option<usize>,
    /// Fewer new examples than this and the run ends without training.
    pub min_new: u64,
    /// Replayed earlier examples per new training example.
    pub replay: f64,
    /// The share of the new conversations held out for the gate.
    pub val_fraction: f64,
    pub mode: ExportMode,
    /// Suite files or directories the candidate and the deployed version are asked.
    pub suites: Vec<PathBuf>,
    pub rules: GateRules,
    pub lr: f64,
    pub seed: u64,
    /// Evaluation threads (0: one per core).
    pub threads: usize,
    /// Training checkpoints every this many steps (a killed run continues from the last).
    pub checkpoint_every: usize,
    /// Installed versions kept; older ones are removed (never the deployed one or its parent).
    pub keep_versions: usize,
}

impl RetrainOptions {
    pub fn new(home: impl Into<PathBuf>, base: impl Into<PathBuf>) -> Self {
        RetrainOptions {
            home: home.into(),
            base: base.into(),
            time_s: 20.0 * 60.0,
            steps: None,
            min_new: 20,
            replay: 1.0,
            val_fraction: 0.1,
            mode: ExportMode::All,
            suites: Vec::new(),
            rules: GateRules::default(),
            lr: 2e-4,
            seed: 0,
            threads: 0,
            checkpoint_every: 50,
            keep_versions: 10,
        }
    }
}

/// A version's record (`version.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u32,
    /// The version it was fine-tuned from; none for the first.
    pub parent: Option<u32>,
    pub installed_at_ms: i64,
    /// Messages stored before this time were in its training data (or in its parent's); none
    /// for a first version, whose data is unknown.
    pub data_until_ms: Option<i64>,
    /// The model the first version was copied from.
    pub base: Option<String>,
    /// The retraining run that made it.
    pub run: Option<String>,
    pub new_examples: u64,
    pub replay_examples: u64,
    /// The gate's comparisons with the parent.
    pub gate: Option<GateReport>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// A new version is deployed.
    Installed,
    /// The candidate was worse than the deployed version; nothing changed.
    Rejected,
    /// Too little new data to train on; nothing changed.
    NothingNew,
    /// Stopped by a signal; the next start continues it.
    Interrupted,
}

/// Where a run is; saved in `retrain.json` after every step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunState {
    run: String,
    parent: u32,
    /// Messages stored from this time on are new to the parent.
    since_ms: Option<i64>,
    /// And before this one (fixed when the run starts, so a resumed run reads the same data).
    until_ms: i64,
    step: Step,
    new_examples: u64,
    replay_examples: u64,
    validation_examples: u64,
    outcome: Option<Outcome>,
    installed: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Step {
    Export,
    Train,
    Evaluate,
    Install,
    Done,
}

/// What a run did (`report.json`, and what `kaiwa retrain` prints).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrainReport {
    pub run: String,
    pub outcome: Outcome,
    /// The deployed version the run started from.
    pub parent: u32,
    /// The version installed, when one was.
    pub installed: Option<u32>,
    pub resumed: bool,
    pub new_examples: u64,
    pub replay_examples: u64,
    pub validation_examples: u64,
    pub training: Option<TrainFigures>,
    pub gate: Option<GateReport>,
    pub report_dir: PathBuf,
}

/// The training figures of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainFigures {
    pub steps: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub final_loss: Option<f32>,
    pub validation_loss: Option<f32>,
}

impl From<&TrainSummary> for TrainFigures {
    fn from(s: &TrainSummary) -> Self {
        TrainFigures {
            steps: s.steps_done,
            tokens: s.tokens_seen,
            seconds: s.elapsed_s,
            final_loss: s.final_loss,
            validation_loss: s.val_loss,
        }
    }
}

/// Runs (or continues) one retraining run on the store `database_url` names. Not inside an
/// async runtime: it starts its own for the store, and training and evaluation block.
pub fn run(
    database_url: &str,
    options: &RetrainOptions,
    stop: &AtomicBool,
) -> Result<RetrainReport, RetrainError> {
    let home = &options.home;
    std::fs::create_dir_all(home.join(RUNS)).map_err(io(home))?;
    let _lock = lock(home)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io(home))?;
    let store = rt.block_on(Store::open(database_url))?;
    let result = run_locked(&rt, &store, options, stop);
    rt.block_on(store.close());
    result
}

fn run_locked(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    options: &RetrainOptions,
    stop: &AtomicBool,
) -> Result<RetrainReport, RetrainError> {
    let home = &options.home;
    if current(home)?.is_none() {
        install_base(home, &options.base)?;
    }
    let (mut state, resumed) = match unfinished_run(home)? {
        Some(state) => {
            tracing::info!(run = %state.run, step = ?state.step, "continuing an interrupted run");
            (state, true)
        }
        None => (new_run(home)?, false),
    };
    let run_dir = home.join(RUNS).join(&state.run);
    let parent_dir = version_dir(home, state.parent);
    let data = run_dir.join("data");
    let mut training = None;
    let mut gate = None;

    if state.step == Step::Export {
        export_data(rt, store, options, &mut state, &data)?;
        state.step = if state.new_examples < options.min_new || state.validation_examples == 0 {
            tracing::info!(
                new = state.new_examples,
                validation = state.validation_examples,
                min_new = options.min_new,
                "too little new conversation to retrain on"
            );
            state.outcome = Some(Outcome::NothingNew);
            Step::Done
        } else {
            Step::Train
        };
        save_state(&run_dir, &state)?;
    }
    if state.step == Step::Train {
        let train_dir = run_dir.join("train");
        let mut progress = LogProgress;
        let summary = if train_dir.join(crate::train::run::RUN_FILE).exists() {
            crate::train::run::resume(&train_dir, stop, &mut progress)?
        } else {
            let mut files = vec![data.join("new/train.jsonl")];
            if state.replay_examples > 0 {
                files.push(data.join("replay.jsonl"));
            }
            let spec = train_spec(options, &parent_dir, files, &data)?;
            crate::train::run::train(spec, &train_dir, stop, &mut progress)?
        };
        training = Some(TrainFigures::from(&summary));
        if summary.interrupted {
            let report = report(
                &run_dir,
                &state,
                resumed,
                training,
                None,
                Outcome::Interrupted,
            );
            write_report(&run_dir, &report)?;
            return Ok(report);
        }
        state.step = Step::Evaluate;
        save_state(&run_dir, &state)?;
    }
    if state.step == Step::Evaluate {
        // The candidate answers with the deployed version's retrieval data, as it will once
        // installed: both are asked the suites on the same footing.
        let candidate = run_dir.join("train/model");
        copy_model_files(&parent_dir, &parent_dir, &candidate)?;
        let mut eval = EvalOptions::new(run_dir.join("train/model"));
        eval.data = Some(data.join("new/validation.jsonl"));
        eval.train = Some(data.join("new/train.jsonl"));
        eval.suites = options.suites.clone();
        eval.baseline = Some(parent_dir.clone());
        eval.rules = options.rules;
        eval.threads = options.threads;
        eval.report_dir = Some(run_dir.join("eval"));
        let outcome = crate::eval::run(&eval)?;
        let passed = outcome.report.gate.as_ref().is_some_and(|g| g.passed);
        gate = outcome.report.gate.clone();
        tracing::info!(
            verdict = %gate.as_ref().map(GateReport::verdict).unwrap_or_default(),
            "gate"
        );
        if passed {
            state.step = Step::Install;
        } else {
            state.outcome = Some(Outcome::Rejected);
            state.step = Step::Done;
        }
        save_state(&run_dir, &state)?;
    }
    if state.step == Step::Install {
        let gate = match &gate {
            Some(g) => Some(g.clone()),
            None => read_gate(&run_dir)?,
        };
        let version = install_candidate(home, &run_dir, &state, gate)?;
        state.installed = Some(version);
        state.outcome = Some(Outcome::Installed);
        state.step = Step::Done;
        save_state(&run_dir, &state)?;
        // Every daemon on this store loads `current` again within seconds.
        rt.block_on(store.request_reload())?;
        tracing::info!(version, "installed and announced");
    }
    if gate.is_none() && state.outcome != Some(Outcome::NothingNew) {
        gate = read_gate(&run_dir)?;
    }
    if training.is_none() {
        training = read_training(&run_dir);
    }
    let outcome = state.outcome.unwrap_or(Outcome::Interrupted);
    let report = report(&run_dir, &state, resumed, training, gate, outcome);
    write_report(&run_dir, &report)?;
    // A timer runs this every night for years: what is no longer needed goes.
    if let Err(e) = prune(home, options.keep_versions) {
        tracing::warn!(error = %e, "could not remove old versions and run files");
    }
    Ok(report)
}

/// Runs kept whole (their exported data, training folder and candidate) after they are done;
/// older ones keep only their records (`retrain.json`, `report.json`, `eval/`).
const RUNS_KEPT_WHOLE: usize = 3;

/// Removes the versions beyond the newest `keep` (never the deployed one, nor the one it was
/// made from, so a rollback always has somewhere to go), and the bulky files of finished runs
/// but the last [`RUNS_KEPT_WHOLE`].
fn prune(home: &Path, keep: usize) -> Result<(), RetrainError> {
    let current = current(home)?;
    let all = versions(home)?;
    let parent = all
        .iter()
        .find(|v| Some(v.version) == current)
        .and_then(|v| v.parent);
    let surplus = all.len().saturating_sub(keep.max(1));
    for v in all.iter().take(surplus) {
        if Some(v.version) == current || Some(v.version) == parent {
            continue;
        }
        let dir = version_dir(home, v.version);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        tracing::info!(version = v.version, "old version removed");
    }
    let runs = home.join(RUNS);
    let mut done: Vec<PathBuf> = std::fs::read_dir(&runs)
        .map_err(io(&runs))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            crate::model::read_json::<RunState>(&p.join(STATE_FILE))
                .is_ok_and(|s| s.step == Step::Done)
        })
        .collect();
    done.sort();
    for run in done.iter().rev().skip(RUNS_KEPT_WHOLE) {
        for bulky in ["data", "train"] {
            let path = run.join(bulky);
            if path.exists() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
    }
    Ok(())
}

fn report(
    run_dir: &Path,
    state: &RunState,
    resumed: bool,
    training: Option<TrainFigures>,
    gate: Option<GateReport>,
    outcome: Outcome,
) -> RetrainReport {
    RetrainReport {
        run: state.run.clone(),
        outcome,
        parent: state.parent,
        installed: state.installed,
        resumed,
        new_examples: state.new_examples,
        replay_examples: state.replay_examples,
        validation_examples: state.validation_examples,
        training,
        gate,
        report_dir: run_dir.to_path_buf(),
    }
}

fn write_report(run_dir: &Path, report: &RetrainReport) -> Result<(), RetrainError> {
    write_json(&run_dir.join(REPORT_FILE), report)
}

/// The gate of an evaluation that already ran (a run continued after it).
fn read_gate(run_dir: &Path) -> Result<Option<GateReport>, RetrainError> {
    let path = run_dir.join("eval").join(crate::eval::report::REPORT_JSON);
    if !path.is_file() {
        return Ok(None);
    }
    Ok(crate::eval::Report::read(&path)?.gate)
}

fn read_training(run_dir: &Path) -> Option<TrainFigures> {
    let path = run_dir.join("train").join(crate::train::run::SUMMARY_FILE);
    let summary: TrainSummary = crate::model::read_json(&path).ok()?;
    Some(TrainFigures::from(&summary))
}

/// Holds `HOME/retrain.lock` for the life of the returned file; a second run is refused.
fn lock(home: &Path) -> Result<std::fs::File, RetrainError> {
    let path = home.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RetrainError::Locked(home.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(RetrainError::Io { path, source: e }),
    }
}

fn version_dir(home: &Path, version: u32) -> PathBuf {
    home.join(VERSIONS).join(format!("{version:04}"))
}

/// The deployed version of a home, if it has one.
pub fn current(home: &Path) -> Result<Option<u32>, RetrainError> {
    let link = home.join(CURRENT);
    let target = match std::fs::read_link(&link) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RetrainError::Io {
                path: link,
                source: e,
            })
        }
    };
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            RetrainError::Invalid(format!(
                "{} points at {}, which is not a version of this home",
                link.display(),
                target.display()
            ))
        })
}

/// Every installed version, oldest first.
pub fn versions(home: &Path) -> Result<Vec<VersionInfo>, RetrainError> {
    let dir = home.join(VERSIONS);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(RetrainError::Io {
                path: dir,
                source: e,
            })
        }
    };
    for entry in entries {
        let entry = entry.map_err(io(&dir))?;
        let record = entry.path().join(VERSION_FILE);
        // A version being copied in has no record yet and a temporary name: not a version.
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok())
            && record.is_file()
        {
            out.push(crate::model::read_json::<VersionInfo>(&record)?);
        }
    }
    out.sort_by_key(|v| v.version);
    Ok(out)
}

/// Points `current` at `version` (atomically: a new link renamed over the old one) and says
/// so to every daemon on the store (`kaiwa rollback`).
pub fn set_current(home: &Path, version: u32) -> Result<(), RetrainError> {
    let dir = version_dir(home, version);
    if !dir.join(VERSION_FILE).is_file() {
        let known: Vec<String> = versions(home)?
            .iter()
            .map(|v| v.version.to_string())
            .collect();
        return Err(RetrainError::Invalid(format!(
            "{} has no version {version} (it has {})",
            home.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    let tmp = home.join(format!(".{CURRENT}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let target = Path::new(VERSIONS).join(format!("{version:04}"));
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, &tmp).map_err(io(&tmp))?;
    #[cfg(not(unix))]
    return Err(RetrainError::Invalid(
        "model homes need symbolic links (Unix)".into(),
    ));
    let link = home.join(CURRENT);
    std::fs::rename(&tmp, &link).map_err(io(&link))?;
    crate::fsio::sync_dir(home).map_err(io(home))?;
    Ok(())
}

/// Version 1 of a new home: a copy of `base`, so a rollback can always return to it.
fn install_base(home: &Path, base: &Path) -> Result<(), RetrainError> {
    crate::model::load_config(base)?;
    let info = VersionInfo {
        version: 1,
        parent: None,
        installed_at_ms: now_ms(),
        data_until_ms: None,
        base: Some(base.display().to_string()),
        run: None,
        new_examples: 0,
        replay_examples: 0,
        gate: None,
    };
    install_dir(home, base, None, &info)?;
    set_current(home, 1)?;
    tracing::info!(home = %home.display(), base = %base.display(), "model home started: version 1 is a copy of the base model");
    Ok(())
}

/// Copies the model in `model` (and what `carry_from` has that it lacks: retrieval data, say)
/// into the home as `info.version`, under a temporary name first.
fn install_dir(
    home: &Path,
    model: &Path,
    carry_from: Option<&Path>,
    info: &VersionInfo,
) -> Result<PathBuf, RetrainError> {
    let dir = version_dir(home, info.version);
    if dir.exists() {
        return Err(RetrainError::Invalid(format!(
            "{} exists already",
            dir.display()
        )));
    }
    let tmp = home
        .join(VERSIONS)
        .join(format!(".{:04}.tmp", info.version));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    copy_model_files(model, model, &tmp)?;
    if let Some(parent) = carry_from {
        copy_model_files(parent, parent, &tmp)?;
    }
    write_json(&tmp.join(VERSION_FILE), info)?;
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    crate::fsio::sync_dir(&home.join(VERSIONS)).map_err(io(home))?;
    Ok(dir)
}

/// Copies the files of the model directory `from` into `to` that `to` does not have yet,
/// leaving out a run's records ([`NOT_CARRIED`]). `retrieval.json` is rewritten so that its
/// corpus paths (relative to the model directory) still point at the same files.
fn copy_model_files(root: &Path, from: &Path, to: &Path) -> Result<(), RetrainError> {
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let name = entry.file_name();
        let target = to.join(&name);
        if NOT_CARRIED.iter().any(|n| name == *n) || target.exists() {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            std::fs::create_dir_all(&target).map_err(io(&target))?;
            copy_model_files(root, &path, &target)?;
        } else if name == crate::engine::corpora::MANIFEST && from == root {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let mut manifest: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| RetrainError::Invalid(format!("{}: {e}", path.display())))?;
            let base = std::fs::canonicalize(root).map_err(io(root))?;
            if let Some(corpora) = manifest["corpora"].as_array_mut() {
                for corpus in corpora {
                    if let Some(p) = corpus["path"].as_str().map(PathBuf::from) {
                        if p.is_relative() {
                            let absolute = base.join(&p);
                            let absolute = std::fs::canonicalize(&absolute).unwrap_or(absolute);
                            corpus["path"] = absolute.display().to_string().into();
                        }
                    }
                }
            }
            write_json(&target, &manifest)?;
        } else {
            std::fs::copy(&path, &target).map_err(io(&target))?;
        }
    }
    Ok(())
}

/// The unfinished run of a home, if one was cut short.
fn unfinished_run(home: &Path) -> Result<Option<RunState>, RetrainError> {
    let runs = home.join(RUNS);
    let mut names: Vec<String> = std::fs::read_dir(&runs)
        .map_err(io(&runs))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names.iter().rev() {
        let path = runs.join(name).join(STATE_FILE);
        if path.is_file() {
            let state: RunState = crate::model::read_json(&path)?;
            if state.step != Step::Done {
                return Ok(Some(state));
            }
        }
    }
    Ok(None)
}

fn new_run(home: &Path) -> Result<RunState, RetrainError> {
    let parent = current(home)?
        .ok_or_else(|| RetrainError::Invalid(format!("{} has no version", home.display())))?;
    let info: VersionInfo = crate::model::read_json(&version_dir(home, parent).join(VERSION_FILE))?;
    let until_ms = now_ms();
    let run = chrono::DateTime::from_timestamp_millis(until_ms)
        .map(|t| t.format("%Y%m%dT%H%M%S%3fZ").to_string())
        .unwrap_or_else(|| until_ms.to_string());
    let state = RunState {
        run,
        parent,
        since_ms: info.data_until_ms,
        until_ms,
        step: Step::Export,
        new_examples: 0,
        replay_examples: 0,
        validation_examples: 0,
        outcome: None,
        installed: None,
    };
    let dir = home.join(RUNS).join(&state.run);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    save_state(&dir, &state)?;
    Ok(state)
}

fn save_state(run_dir: &Path, state: &RunState) -> Result<(), RetrainError> {
    write_json(&run_dir.join(STATE_FILE), state)
}

/// Exports the new conversations (train and validation) into `data/new`, and the earlier
/// ones into `data/old`, sampled into `data/replay.jsonl`.
fn export_data(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    options: &RetrainOptions,
    state: &mut RunState,
    data: &Path,
) -> Result<(), RetrainError> {
    let export_options = |filter: CorpusFilter, val_fraction: f64| ExportOptions {
        mode: options.mode,
        filter,
        val_fraction,
        seed: options.seed,
        ..ExportOptions::default()
    };
    let new = rt.block_on(export(
        store,
        &data.join("new"),
        &export_options(
            CorpusFilter {
                stored_since_ms: state.since_ms,
                stored_until_ms: Some(state.until_ms),
                ..CorpusFilter::default()
            },
            options.val_fraction,
        ),
    ))?;
    state.new_examples = new.examples();
    state.validation_examples = new.validation.examples;
    state.replay_examples = 0;
    if let Some(since) = state.since_ms {
        let old = rt.block_on(export(
            store,
            &data.join("old"),
            &export_options(
                CorpusFilter {
                    stored_until_ms: Some(since),
                    ..CorpusFilter::default()
                },
                0.0,
            ),
        ))?;
        let wanted = (new.train.examples as f64 * options.replay).round() as u64;
        state.replay_examples = sample_lines(
            &data.join("old/train.jsonl"),
            old.train.examples,
            wanted,
            options.seed,
            &data.join("replay.jsonl"),
        )?;
    }
    tracing::info!(
        new = state.new_examples,
        validation = state.validation_examples,
        replay = state.replay_examples,
        "conversations exported"
    );
    Ok(())
}

/// Writes `wanted` of the `total` lines of `from` (all of them when there are fewer), chosen
/// evenly by a hash of each line's number and `seed`, to `to`. Returns how many were written.
fn sample_lines(
    from: &Path,
    total: u64,
    wanted: u64,
    seed: u64,
    to: &Path,
) -> Result<u64, RetrainError> {
    let mut out = crate::fsio::AtomicFile::create(to).map_err(io(to))?;
    let mut written = 0;
    if total > 0 && wanted > 0 {
        let file = std::fs::File::open(from).map_err(io(from))?;
        // Keep a line when its hash falls under the share wanted: about `wanted` lines, the
        // same ones for the same seed.
        let share = (wanted as f64 / total as f64).min(1.0);
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(io(from))?;
            let h = splitmix(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if (h >> 11) as f64 / (1u64 << 53) as f64 <= share {
                writeln!(out, "{line}").map_err(io(to))?;
                written += 1;
            }
        }
    }
    out.commit().map_err(io(to))?;
    Ok(written)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The fine-tuning run: the deployed version on the new data and the replay, validated on the
/// new conversations' held-out split.
fn train_spec(
    options: &RetrainOptions,
    parent: &Path,
    files: Vec<PathBuf>,
    data: &Path,
) -> Result<RunSpec, RetrainError> {
    let config = crate::model::load_config(parent)?;
    let mut spec = RunSpec::new(Start::From(parent.to_path_buf()), files);
    spec.validation = Some(crate::train::run::DataFile {
        path: data.join("new/validation.jsonl"),
        sha256: String::new(),
    });
    spec.context = spec.context.min(config.context_len());
    spec.time_s = Some(options.time_s);
    spec.steps = options.steps;
    spec.peak_lr = options.lr;
    spec.min_lr = options.lr / 10.0;
    spec.warmup_steps = match options.steps {
        Some(steps) => (steps / 10).min(50),
        None => 20,
    };
    spec.seed = options.seed;
    spec.eval_every = 0;
    spec.checkpoint_every = options.checkpoint_every;
    Ok(spec)
}

/// Installs the candidate of a run whose gate passed as the next version, and deploys it.
fn install_candidate(
    home: &Path,
    run_dir: &Path,
    state: &RunState,
    gate: Option<GateReport>,
) -> Result<u32, RetrainError> {
    // A run cut short between the copy and the record of it installed it already.
    if let Some(v) = versions(home)?
        .iter()
        .find(|v| v.run.as_deref() == Some(state.run.as_str()))
    {
        set_current(home, v.version)?;
        return Ok(v.version);
    }
    let version = versions(home)?.last().map_or(1, |v| v.version + 1);
    let info = VersionInfo {
        version,
        parent: Some(state.parent),
        installed_at_ms: now_ms(),
        data_until_ms: Some(state.until_ms),
        base: None,
        run: Some(state.run.clone()),
        new_examples: state.new_examples,
        replay_examples: state.replay_examples,
        gate,
    };
    let parent_dir = version_dir(home, state.parent);
    let dir = install_dir(home, &run_dir.join("train/model"), Some(&parent_dir), &info)?;
    // The evaluation goes with the version, so `kaiwa models` shows it.
    let eval = run_dir.join("eval");
    if eval.is_dir() {
        let to = dir.join("eval");
        std::fs::create_dir_all(&to).map_err(io(&to))?;
        copy_model_files(&eval, &eval, &to)?;
    }
    set_current(home, version)?;
    Ok(version)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RetrainError> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| RetrainError::Invalid(format!("{}: {e}", path.display())))?;
    bytes.push(b'\n');
    crate::fsio::write_atomic(path, &bytes).map_err(io(path))
}

/// One line per version for `kaiwa models`: number, deployed mark, date, parent, data and the
/// gate's figures.
pub fn describe(home: &Path) -> Result<Vec<String>, RetrainError> {
    let current = current(home)?;
    let mut lines = Vec::new();
    for v in versions(home)? {
        let when = chrono::DateTime::from_timestamp_millis(v.installed_at_ms)
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default();
        let origin = match (&v.base, v.parent) {
            (Some(base), _) => format!("copy of {base}"),
            (None, Some(p)) => format!(
                "from {p}: {} new examples, {} replayed",
                v.new_examples, v.replay_examples
            ),
            (None, None) => String::new(),
        };
        let figures: BTreeMap<&str, String> = v
            .gate
            .iter()
            .flat_map(|g| &g.comparisons)
            .map(|c| {
                (
                    c.figure.as_str(),
                    format!("{:.4} (was {:.4})", c.candidate, c.baseline),
                )
            })
            .collect();
        let figures: Vec<String> = figures.iter().map(|(k, v)| format!("{k} {v}")).collect();
        lines.push(format!(
            "{} {:>4}  {when}  {origin}{}{}",
            if Some(v.version) == current { "*" } else { " " },
            v.version,
            if figures.is_empty() { "" } else { "  " },
            figures.join(", ")
        ));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(home: &Path, n: u32, parent: Option<u32>) {
        let dir = version_dir(home, n);
        std::fs::create_dir_all(&dir).unwrap();
        let info = VersionInfo {
            version: n,
            parent,
            installed_at_ms: 0,
            data_until_ms: None,
            base: None,
            run: None,
            new_examples: 0,
            replay_examples: 0,
            gate: None,
        };
        write_json(&dir.join(VERSION_FILE), &info).unwrap();
    }

    fn run(home: &Path, name: &str, step: Step) -> PathBuf {
        let dir = home.join(RUNS).join(name);
        for sub in ["data", "train", "eval"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let state = RunState {
            run: name.into(),
            parent: 1,
            since_ms: None,
            until_ms: 0,
            step,
            new_examples: 0,
            replay_examples: 0,
            validation_examples: 0,
            outcome: None,
            installed: None,
        };
        save_state(&dir, &state).unwrap();
        dir
    }

    #[test]
    fn pruning_keeps_the_deployed_version_its_parent_and_the_records_of_every_run() {
        let home = tempfile::tempdir().unwrap();
        let home = home.path();
        // 4 was made from 2 (a rollback to 2, then a run), and 4 is deployed.
        version(home, 1, None);
        version(home, 2, Some(1));
        version(home, 3, Some(2));
        version(home, 4, Some(2));
        set_current(home, 4).unwrap();
        let runs: Vec<PathBuf> = (1..=5)
            .map(|i| run(home, &format!("2026120{i}T000000000Z"), Step::Done))
            .collect();
        let unfinished = run(home, "20261206T000000000Z", Step::Train);

        prune(home, 1).unwrap();
        let kept: Vec<u32> = versions(home).unwrap().iter().map(|v| v.version).collect();
        assert_eq!(kept, [2, 4]);
        assert_eq!(current(home).unwrap(), Some(4));
        for (i, dir) in runs.iter().enumerate() {
            let whole = i >= 2;
            assert_eq!(dir.join("train").exists(), whole, "{}", dir.display());
            assert_eq!(dir.join("data").exists(), whole, "{}", dir.display());
            assert!(dir.join("eval").is_dir() && dir.join(STATE_FILE).is_file());
        }
        // A run still going keeps everything.
        assert!(unfinished.join("train").is_dir() && unfinished.join("data").is_dir());
    }

    #[test]
    fn a_second_run_on_the_same_home_is_refused_while_the_first_holds_the_lock() {
        let home = tempfile::tempdir().unwrap();
        let held = lock(home.path()).unwrap();
        assert!(matches!(lock(home.path()), Err(RetrainError::Locked(_))));
        drop(held);
        lock(home.path()).unwrap();
    }

    #[test]
    fn a_replay_sample_is_the_same_for_the_same_seed_and_about_the_size_asked() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("old.jsonl");
        let lines: String = (0..1000).map(|i| format!("{{\"n\": {i}}}\n")).collect();
        std::fs::write(&from, lines).unwrap();
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        let n = sample_lines(&from, 1000, 200, 7, &a).unwrap();
        assert_eq!(sample_lines(&from, 1000, 200, 7, &b).unwrap(), n);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!((150..=250).contains(&n), "{n}");
        assert_eq!(sample_lines(&from, 1000, 5000, 7, &b).unwrap(), 1000);
        assert_eq!(sample_lines(&from, 1000, 0, 7, &b).unwrap(), 0);
    }
}
