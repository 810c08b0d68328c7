//! One progress bar per stage: steps done, live loss and tokens/s, and indicatif's ETA.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// A stage's bar.
#[derive(Debug, Clone)]
pub struct JobBar {
    bar: ProgressBar,
    /// Without a terminal: the step of the last plain progress line.
    logged_step: Arc<AtomicU64>,
}

/// A bar for a stage that counts steps.
pub fn job_bar(bars: &MultiProgress, stage: &str, kind: &str) -> JobBar {
    let bar = bars.add(ProgressBar::new(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>14} [{bar:30}] {pos:>5}/{len:<5} eta {eta:<4} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{stage} ({kind})"));
    bar.enable_steady_tick(Duration::from_millis(500));
    JobBar {
        bar,
        logged_step: Arc::default(),
    }
}

/// A spinner for a stage without steps (register, deploy, uploads).
pub fn spinner(bars: &MultiProgress, label: &str) -> JobBar {
    let bar = bars.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{prefix:>14} {spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    JobBar {
        bar,
        logged_step: Arc::default(),
    }
}

impl JobBar {
    pub fn set_progress(&self, step: u64, total: Option<u64>) {
        if let Some(total) = total {
            self.bar.set_length(total.max(step));
        }
        self.bar.set_position(step);
    }

    pub fn set_metrics(&self, latest: &BTreeMap<String, f64>, state: &str) {
        let message = describe(latest, state);
        // Without a terminal, a plain line about every tenth of the run stands in for the bar.
        let (step, total) = (self.bar.position(), self.bar.length().unwrap_or(0));
        let logged = self.logged_step.load(Ordering::Relaxed);
        if self.bar.is_hidden() && total > 0 && step >= logged + total.div_ceil(10) {
            self.logged_step.store(step, Ordering::Relaxed);
            eprintln!("{:>14} step {step}/{total}  {message}", self.bar.prefix());
        }
        self.bar.set_message(message);
    }

    pub fn message(&self, text: &str) {
        self.bar.set_message(text.to_owned());
    }

    pub fn finish(&self, text: &str) {
        self.end(format!("done: {text}"));
    }

    pub fn fail(&self, text: &str) {
        self.end(format!("FAILED: {text}"));
    }

    /// Leaves the bar with its last message; without a terminal (CI, a log file) the bar
    /// draws nothing, so the outcome is printed as a plain line instead.
    fn end(&self, message: String) {
        if self.bar.is_hidden() {
            eprintln!("{:>14} {message}", self.bar.prefix());
        }
        self.bar.abandon_with_message(message);
    }
}

/// `loss 3.214 eval 3.402 1.2k tok/s`, or the job's state before any metric.
pub fn describe(latest: &BTreeMap<String, f64>, state: &str) -> String {
    let mut parts = Vec::new();
    if let Some(loss) = latest.get("loss") {
        parts.push(format!("loss {loss:.3}"));
    }
    if let Some(eval) = latest.get("eval_loss") {
        parts.push(format!("eval {eval:.3}"));
    }
    if let Some(rate) = latest.get("tokens_per_second") {
        parts.push(if *rate >= 1000.0 {
            format!("{:.1}k tok/s", rate / 1000.0)
        } else {
            format!("{rate:.0} tok/s")
        });
    }
    if parts.is_empty() {
        state.to_owned()
    } else {
        parts.join("  ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_shows_loss_eval_and_throughput() {
        let latest = BTreeMap::from([
            ("loss".to_owned(), 3.21449),
            ("eval_loss".to_owned(), 3.4),
            ("tokens_per_second".to_owned(), 1234.0),
        ]);
        assert_eq!(
            describe(&latest, "running"),
            "loss 3.214  eval 3.400  1.2k tok/s"
        );
        assert_eq!(describe(&BTreeMap::new(), "queued"), "queued");
    }
}
