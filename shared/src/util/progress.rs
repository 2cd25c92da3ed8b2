//! Progress on stderr for long runs. On a terminal: a bar that redraws in place. Otherwise
//! (nohup, Slurm, a pipe): a plain line each time the run passes another tenth of its length,
//! and at least once a minute, so that a log shows where the run is, how fast it goes and when
//! it will end. Lines look like
//! `finetune: step 120/1000 (12%), loss 0.1234, FVU 0.0567, 1,234 tokens/s, ETA 5m12s`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// What a run counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Training steps (each of a fixed number of tokens).
    Steps { tokens_per_step: u64 },
    /// Tokens.
    Tokens,
}

/// Progress of one run on stderr (a bar on a terminal, else plain lines).
pub struct Progress {
    what: String,
    unit: Unit,
    total: Option<u64>,
    pos: u64,
    start_pos: u64,
    start: Instant,
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
    last_tenth: u64,
    every: Duration,
    message: String,
}

/// Seconds between plain lines when no tenth of the run was passed (`SCAE_PROGRESS_SECS`
/// changes it; 60 by default).
fn line_interval() -> Duration {
    let secs = std::env::var("SCAE_PROGRESS_SECS").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(60.0);
    Duration::from_secs_f64(secs.max(0.0))
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration as `1h02m`, `5m12s` or `42s`.
pub fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    /// A run named `what` (e.g. `finetune`) of `total` units (unknown: `None`) that starts at
    /// `start` (a resumed run).
    pub fn new(what: &str, unit: Unit, total: Option<u64>, start: u64) -> Progress {
        let bar = (std::io::stderr().is_terminal() && !super::quiet()).then(|| {
            let bar = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let counted = match unit {
                Unit::Steps { .. } => "step {pos}/{len}",
                Unit::Tokens => "{human_pos}/{human_len} tokens",
            };
            let template = format!("{what} {{elapsed_precise}} [{{wide_bar}}] {counted} {{msg}} (eta {{eta}})");
            bar.set_style(indicatif::ProgressStyle::with_template(&template).expect("valid template"));
            bar.set_position(start);
            bar
        });
        let first_tenth = total.filter(|&t| t > 0).map_or(0, |t| start * 10 / t);
        Progress {
            what: what.to_string(),
            unit,
            total,
            pos: start,
            start_pos: start,
            start: Instant::now(),
            bar,
            last_line: Instant::now(),
            last_tenth: first_tenth,
            every: line_interval(),
            message: String::new(),
        }
    }

    /// Tokens per second since this invocation started.
    pub fn tokens_per_s(&self) -> f64 {
        let done = self.pos.saturating_sub(self.start_pos);
        let tokens = match self.unit {
            Unit::Steps { tokens_per_step } => done * tokens_per_step,
            Unit::Tokens => done,
        };
        tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Seconds left at the current rate, when the total is known.
    fn eta(&self) -> Option<f64> {
        let total = self.total?;
        let done = self.pos.saturating_sub(self.start_pos);
        (done > 0).then(|| self.start.elapsed().as_secs_f64() / done as f64 * total.saturating_sub(self.pos) as f64)
    }

    /// Set the text shown after the count (e.g. `loss 0.1234, FVU 0.0567`).
    pub fn set_message(&mut self, msg: String) {
        self.message = msg;
    }

    /// Advance by `n` units.
    pub fn inc(&mut self, n: u64) {
        self.pos += n;
        let rate = self.tokens_per_s();
        if let Some(bar) = &self.bar {
            let msg = if self.message.is_empty() {
                format!("{} tokens/s", thousands(rate as u64))
            } else {
                format!("{}, {} tokens/s", self.message, thousands(rate as u64))
            };
            bar.set_message(msg);
            bar.set_position(self.pos);
            return;
        }
        let tenth = self.total.filter(|&t| t > 0).map_or(0, |t| self.pos * 10 / t);
        if tenth > self.last_tenth || self.last_line.elapsed() >= self.every {
            self.last_tenth = tenth;
            self.last_line = Instant::now();
            crate::note!("{}", self.line());
        }
    }

    /// The plain progress line for the current position.
    pub fn line(&self) -> String {
        let count = match (self.unit, self.total) {
            (Unit::Steps { .. }, Some(t)) => format!("step {}/{t} ({}%)", self.pos, self.pos * 100 / t.max(1)),
            (Unit::Steps { .. }, None) => format!("step {}", self.pos),
            (Unit::Tokens, Some(t)) => {
                format!("{}/{} tokens ({}%)", thousands(self.pos), thousands(t), self.pos * 100 / t.max(1))
            }
            (Unit::Tokens, None) => format!("{} tokens", thousands(self.pos)),
        };
        let mut parts = vec![count];
        if !self.message.is_empty() {
            parts.push(self.message.clone());
        }
        parts.push(format!("{} tokens/s", thousands(self.tokens_per_s() as u64)));
        if let Some(eta) = self.eta() {
            parts.push(format!("ETA {}", human_duration(eta)));
        }
        format!("{}: {}", self.what, parts.join(", "))
    }

    /// The run is over: clear the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_read_plainly() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1234), "1,234");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(human_duration(42.4), "42s");
        assert_eq!(human_duration(312.0), "5m12s");
        assert_eq!(human_duration(3720.0), "1h02m");
        let mut p = Progress::new("finetune", Unit::Steps { tokens_per_step: 1024 }, Some(1000), 0);
        p.bar = None;
        p.pos = 120;
        p.set_message("loss 0.1234".into());
        let line = p.line();
        assert!(line.starts_with("finetune: step 120/1000 (12%), loss 0.1234, "), "{line}");
        assert!(line.contains(" tokens/s, ETA "), "{line}");
    }
}
