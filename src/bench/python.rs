//! The Python reference runs in `bench/`: a script run with `python3` on the same workload as a
//! kaiwa benchmark, its output read back (ONNX Runtime in `infer`, PyTorch in `train`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// A reference script that could not be run, or whose output could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("running python3 {}", script.display())]
    Spawn {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} failed: {stderr}", script.display())]
    Failed { script: PathBuf, stderr: String },
    #[error("the ONNX Runtime script printed nothing")]
    NoReport,
    #[error("parsing the ONNX Runtime script's report")]
    Report(#[source] serde_json::Error),
    #[error("the PyTorch script printed no tokens_per_s line")]
    NoTokensPerS,
    #[error("bench/pytorch_train.py has no {0}: it would time another model")]
    Unsupported(&'static str),
}

/// Runs `python3 SCRIPT ARGS…` and gives back what it printed on standard output; a failed run
/// is an error with its standard error.
pub(super) fn run_script<I, S>(script: &Path, args: I) -> Result<String, ScriptError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .map_err(|source| ScriptError::Spawn {
            script: script.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(ScriptError::Failed {
            script: script.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
