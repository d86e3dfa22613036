//! `kaiwa bench`: the speed goals of kaiwa, measured on the machine at hand (never asserted in
//! tests). `infer` times prefill and decoding through tract (with ONNX Runtime beside it);
//! `train` times training steps (with PyTorch beside it); `corpus` times importing a large chat
//! export and exporting a million stored messages; `reply` times the reply engine as its store
//! grows to a million pairs; `serve` times streamed replies over HTTP beside the same replies
//! made in-process; `bot` times the bot's whole path for a message at many channels at once.
//! Here too: what they share (memory figures, percentiles, a scratch directory, the suites'
//! prompts).

use std::path::{Path, PathBuf};

pub mod bot;
pub mod corpus;
mod infer;
mod python;
pub mod reply;
pub mod serve;
pub mod telegram_loop;
pub mod train;

pub use infer::{
    bench_infer, bench_prompt, llama_cpp_decode, onnxruntime_decode, InferReport, LlamaCppWeights,
};
pub use python::ScriptError;

use crate::eval::EvalError;

/// A scratch directory: the one given (kept), or a temporary one (removed when dropped).
pub enum Scratch {
    Kept(PathBuf),
    Temp(tempfile::TempDir),
}

/// A scratch directory that could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct ScratchError {
    what: String,
    #[source]
    source: std::io::Error,
}

impl Scratch {
    /// `dir` (created if missing, and kept), or a new temporary directory.
    pub fn new(dir: Option<PathBuf>) -> Result<Scratch, ScratchError> {
        Ok(match dir {
            Some(d) => {
                std::fs::create_dir_all(&d).map_err(|source| ScratchError {
                    what: format!("creating {}", d.display()),
                    source,
                })?;
                Scratch::Kept(d)
            }
            None => Scratch::Temp(tempfile::tempdir().map_err(|source| ScratchError {
                what: "creating a temporary directory".into(),
                source,
            })?),
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Scratch::Kept(p) => p,
            Scratch::Temp(t) => t.path(),
        }
    }
}

/// Suites that give a benchmark no prompts.
#[derive(Debug, thiserror::Error)]
pub enum PromptsError {
    #[error(transparent)]
    Suite(#[from] EvalError),
    #[error("the suites have no prompts")]
    Empty,
}

/// The prompts of the given suite files or directories, in order; suites without any are
/// refused.
pub fn suite_prompts(suites: &[PathBuf]) -> Result<Vec<String>, PromptsError> {
    let prompts: Vec<String> = crate::eval::suite::load_suites(suites)?
        .iter()
        .flat_map(|s| s.cases.iter().map(|c| c.prompt.clone()))
        .collect();
    if prompts.is_empty() {
        return Err(PromptsError::Empty);
    }
    Ok(prompts)
}

/// Opens the scratch store a store benchmark runs on: a SQLite file `NAME.db` in `dir`, or, with
/// `postgres` (a server URL), a schema of its own there (`kaiwa_scratch_NAME_PID`), so that both
/// engines are measured in one run on the same machine. Give it back with
/// [`close_bench_store`].
pub async fn open_bench_store(
    dir: &Path,
    postgres: Option<&str>,
    name: &str,
) -> Result<crate::store::Store, crate::store::StoreError> {
    match postgres {
        Some(url) => {
            let schema = format!("{name}_{}", std::process::id()).replace('-', "_");
            crate::store::Store::open_scratch(url, &schema).await
        }
        None => {
            let file = dir.join(format!("{name}.db"));
            crate::store::Store::open(&file.display().to_string()).await
        }
    }
}

/// Closes a store of [`open_bench_store`], dropping a PostgreSQL scratch schema (a SQLite file
/// stays in the scratch directory, which `--dir` keeps).
pub async fn close_bench_store(store: crate::store::Store) -> Result<(), crate::store::StoreError> {
    if store.engine() == "postgres" {
        store.drop_scratch().await
    } else {
        store.close().await;
        Ok(())
    }
}

/// Peak resident set size of this process (`VmHWM`), in MiB (0 where it cannot be read).
pub fn peak_rss_mib() -> f64 {
    proc_status_kib("VmHWM:") / 1024.0
}

/// Resident set size of this process now (`VmRSS`), in MiB (0 where it cannot be read).
pub fn rss_mib() -> f64 {
    proc_status_kib("VmRSS:") / 1024.0
}

fn proc_status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0)
}

/// Starts a new peak-memory window: the next [`peak_rss_mib`] reports the peak since now
/// (Linux; elsewhere the peak stays the process's).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The value below which `q` of the samples fall (nearest rank).
pub fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [3.0], 0.99), 3.0);
    }
}
