//! What a run reports: `metrics.jsonl` (one line per step and per validation), the progress the
//! caller sees, and the loss curve (`loss.svg`) drawn from the metrics.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io, TrainError, PLOT_FILE};
use crate::train::plot::{write_svg, Series};
use crate::train::step::StepReport;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Metric {
    Step {
        step: usize,
        loss: f32,
        lr: f64,
        grad_norm: f32,
        tokens: u64,
        tokens_per_s: f64,
        elapsed_s: f64,
    },
    Validation {
        step: usize,
        val_loss: f32,
    },
}

impl Metric {
    fn step(&self) -> usize {
        match self {
            Metric::Step { step, .. } | Metric::Validation { step, .. } => *step,
        }
    }
}

/// What the caller sees while a run goes on.
pub trait Progress {
    /// Called once the total is known.
    fn start(&mut self, done: usize, total: usize);
    /// Called after every step.
    fn step(&mut self, report: &StepReport, done: usize, total: usize, tokens_per_s: f64);
    /// A line worth showing (validation, checkpoint).
    fn note(&mut self, line: &str);
    fn finish(&mut self);
}

/// Progress that only logs (every 10 % of the run and the notes).
pub struct LogProgress;

impl Progress for LogProgress {
    fn start(&mut self, _done: usize, _total: usize) {}

    fn step(&mut self, report: &StepReport, done: usize, total: usize, tokens_per_s: f64) {
        let every = (total / 10).max(1);
        if done.is_multiple_of(every) || done == total {
            tracing::info!(
                step = done,
                total,
                loss = format!("{:.4}", report.loss),
                tokens_per_s = format!("{tokens_per_s:.0}"),
                "training"
            );
        }
    }

    fn note(&mut self, line: &str) {
        tracing::info!("{line}");
    }

    fn finish(&mut self) {}
}

/// `metrics.jsonl`, appended to; on resume, the lines past the checkpoint are dropped so the
/// file reads as one uninterrupted run.
pub(super) struct MetricsFile {
    path: PathBuf,
    file: std::fs::File,
    lines: Vec<Metric>,
}

impl MetricsFile {
    pub(super) fn open(path: &Path, keep_through: usize) -> Result<Self, TrainError> {
        let mut lines = Vec::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                // A line cut short by a crash is dropped with everything after it.
                let Ok(metric) = serde_json::from_str::<Metric>(line) else {
                    break;
                };
                if metric.step() > keep_through {
                    break;
                }
                lines.push(metric);
            }
        }
        let mut text = String::new();
        for metric in &lines {
            text.push_str(&serde_json::to_string(metric).unwrap_or_default());
            text.push('\n');
        }
        std::fs::write(path, text).map_err(io(path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(MetricsFile {
            path: path.to_path_buf(),
            file,
            lines,
        })
    }

    pub(super) fn write(&mut self, metric: &Metric) -> Result<(), TrainError> {
        let mut line = serde_json::to_string(metric)
            .map_err(|e| TrainError::Invalid(format!("metrics: {e}")))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io(&self.path))?;
        self.lines.push(metric.clone());
        Ok(())
    }

    pub(super) fn sync(&self) -> Result<(), TrainError> {
        self.file.sync_data().map_err(io(&self.path))
    }
}

/// Redraws `loss.svg` from the metrics so far.
pub(super) fn plot(out: &Path, metrics: &MetricsFile) -> Result<(), TrainError> {
    let mut train = Vec::new();
    let mut val = Vec::new();
    for m in &metrics.lines {
        match m {
            Metric::Step { step, loss, .. } => train.push((*step as f64, f64::from(*loss))),
            Metric::Validation { step, val_loss } => val.push((*step as f64, f64::from(*val_loss))),
        }
    }
    let mut series = vec![Series {
        label: "training loss (mean of 10 steps)".into(),
        points: smooth(&train, 10),
        color: [31, 119, 180],
        markers: false,
    }];
    if !val.is_empty() {
        series.push(Series {
            label: "validation loss".into(),
            points: val,
            color: [214, 39, 40],
            markers: true,
        });
    }
    let path = out.join(PLOT_FILE);
    write_svg(&path, "kaiwa train", "step", "loss (nats/token)", &series)
        .map_err(|e| TrainError::Invalid(format!("drawing {}: {e}", path.display())))
}

/// A trailing moving average over `window` points, for a readable curve.
fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_averages_a_trailing_window() {
        let pts = [(1.0, 4.0), (2.0, 2.0), (3.0, 0.0)];
        assert_eq!(smooth(&pts, 2), vec![(1.0, 4.0), (2.0, 3.0), (3.0, 1.0)]);
    }
}
