//! The checkpoint of a run (`checkpoint/`): the weights, the optimizer state (AdamW moments and
//! step counts) and the progress, saved together and swapped in whole, so a run killed at any
//! moment resumes from the last complete one.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io, read_json, write_json_atomic, TrainError, CHECKPOINT_DIR};
use crate::model::{LlamaConfig, LlamaWeights, WEIGHTS_FILE};
use crate::train::convert::to_weights;
use crate::train::step::Trainer;

pub(super) const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";

/// The progress a checkpoint records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub steps_done: usize,
    /// Input tokens processed (rows × context).
    pub tokens_seen: u64,
    /// Training time spent, summed over resumes.
    pub elapsed_s: f64,
}

/// The progress and the weights of the run in `out`'s checkpoint, which the optimizer state
/// ([`OPTIMIZER_FILE`]) goes with.
pub(super) fn load(
    out: &Path,
    config: &LlamaConfig,
) -> Result<(RunState, LlamaWeights), TrainError> {
    let checkpoint = out.join(CHECKPOINT_DIR);
    // A run killed while swapping its checkpoint in left the previous one set aside.
    crate::fsio::recover_dir(&checkpoint).map_err(io(&checkpoint))?;
    if !checkpoint.join(STATE_FILE).exists() {
        return Err(TrainError::Invalid(format!(
            "{} has no checkpoint to resume from",
            out.display()
        )));
    }
    let state: RunState = read_json(&checkpoint.join(STATE_FILE))?;
    let weights = LlamaWeights::load(config, &checkpoint.join(WEIGHTS_FILE))?;
    Ok((state, weights))
}

/// Saves the weights, the optimizer state and `state` as the checkpoint of the run in `out`.
pub(super) fn save(
    out: &Path,
    trainer: &Trainer,
    config: &LlamaConfig,
    state: &RunState,
) -> Result<(), TrainError> {
    let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    to_weights(trainer.model(), config)?.save(&tmp.join(WEIGHTS_FILE))?;
    trainer.save_optimizer(&tmp.join(OPTIMIZER_FILE))?;
    write_json_atomic(&tmp.join(STATE_FILE), state)?;
    // Swap it in: the old checkpoint is removed only once the new one is complete on disk.
    let dir = out.join(CHECKPOINT_DIR);
    crate::fsio::replace_dir(&tmp, &dir).map_err(io(&dir))?;
    tracing::debug!(step = state.steps_done, "checkpoint saved");
    Ok(())
}
