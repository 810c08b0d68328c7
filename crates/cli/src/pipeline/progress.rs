//! One progress bar per stage: steps done, live loss and tokens/s, and indicatif's ETA.

use std::collections::BTreeMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// A stage's bar.
#[derive(Debug, Clone)]
pub struct JobBar {
    bar: ProgressBar,
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
    JobBar { bar }
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
    JobBar { bar }
}

impl JobBar {
    pub fn set_progress(&self, step: u64, total: Option<u64>) {
        if let Some(total) = total {
            self.bar.set_length(total.max(step));
        }
        self.bar.set_position(step);
    }

    pub fn set_metrics(&self, latest: &BTreeMap<String, f64>, state: &str) {
        self.bar.set_message(describe(latest, state));
    }

    pub fn message(&self, text: &str) {
        self.bar.set_message(text.to_owned());
    }

    pub fn finish(&self, text: &str) {
        self.bar.finish_with_message(format!("done: {text}"));
    }

    pub fn fail(&self, text: &str) {
        self.bar.abandon_with_message(format!("FAILED: {text}"));
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
