//! The terminal progress bar of `kaiwa train`: steps done, the loss (averaged over the last
//! steps), tokens per second and the time left. Where stderr is not a terminal the bar is
//! hidden and progress goes to the log instead (every tenth of the run).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::run::{LogProgress, Progress};
use super::step::StepReport;

/// A bar on a terminal, log lines elsewhere.
pub struct BarProgress {
    bar: Option<ProgressBar>,
    log: LogProgress,
    recent: Vec<f32>,
}

impl BarProgress {
    pub fn new() -> Self {
        let draw = ProgressDrawTarget::stderr();
        let bar = (!draw.is_hidden()).then(|| {
            let bar = ProgressBar::with_draw_target(None, draw);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} steps · {msg} · {eta} left",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        BarProgress {
            bar,
            log: LogProgress,
            recent: Vec::new(),
        }
    }
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for BarProgress {
    fn start(&mut self, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.reset_eta();
        }
    }

    fn step(&mut self, report: &StepReport, done: usize, total: usize, tokens_per_s: f64) {
        let Some(bar) = &self.bar else {
            self.log.step(report, done, total, tokens_per_s);
            return;
        };
        self.recent.push(report.loss);
        if self.recent.len() > 20 {
            self.recent.remove(0);
        }
        let loss = self.recent.iter().sum::<f32>() / self.recent.len() as f32;
        bar.set_message(format!(
            "loss {loss:.3} · {tokens_per_s:.0} tok/s · lr {:.1e}",
            report.lr
        ));
        bar.set_position(done as u64);
    }

    fn note(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => self.log.note(line),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
