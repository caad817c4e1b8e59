//! Progress display: bars (overall runs and the current run's steps, with ETAs) on a terminal,
//! plain log lines otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::study::{PlainProgress, Progress};

/// Two progress bars: runs of the study, and steps of the current training stage.
pub struct TerminalProgress {
    multi: MultiProgress,
    overall: ProgressBar,
    run: ProgressBar,
}

impl TerminalProgress {
    pub fn new() -> Self {
        let multi = MultiProgress::new();
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template(
                "study {pos}/{len} runs [{bar:30}] elapsed {elapsed} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let run = multi.add(ProgressBar::new(0));
        run.set_style(
            ProgressStyle::with_template("  {msg} {pos}/{len} [{bar:30}] eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        overall.enable_steady_tick(std::time::Duration::from_millis(500));
        Self {
            multi,
            overall,
            run,
        }
    }
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for TerminalProgress {
    fn line(&mut self, text: &str) {
        // Step lines are what the bars show; keep the log to run-level lines.
        if !text.starts_with("    ") {
            let _ = self.multi.println(text);
        }
    }
    fn set_total(&mut self, runs: usize) {
        self.overall.set_length(runs as u64);
    }
    fn run_started(&mut self, run_id: &str) {
        self.run.set_message(run_id.to_string());
        self.run.set_position(0);
    }
    fn step(&mut self, stage: &str, step: u64, total: u64) {
        if self.run.length() != Some(total) {
            self.run.set_length(total);
            self.run.reset_eta();
        }
        self.run.set_message(stage.to_string());
        self.run.set_position(step);
    }
    fn run_done(&mut self) {
        self.overall.inc(1);
    }
}

/// Bars when stderr is a terminal, plain lines otherwise.
pub fn for_stderr() -> Box<dyn Progress> {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Box::new(TerminalProgress::new())
    } else {
        Box::new(PlainProgress)
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.run.finish_and_clear();
        self.overall.finish();
    }
}
