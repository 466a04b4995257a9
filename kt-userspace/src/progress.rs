//! Progress for long waits: a spinner on a terminal; on anything else (CI logs, pipes), one log
//! line per change of state.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with a message.
pub struct Progress {
    bar: ProgressBar,
    last: String,
}

impl Progress {
    pub fn new(msg: impl Into<String>) -> Progress {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        let mut p = Progress {
            bar,
            last: String::new(),
        };
        p.set(msg);
        p
    }

    /// Shows a new state; logged once when there is no terminal.
    pub fn set(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        if msg == self.last {
            return;
        }
        if self.bar.is_hidden() {
            tracing::info!("{msg}");
        }
        self.bar.set_message(msg.clone());
        self.last = msg;
    }

    /// Clears the spinner.
    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
