//! Training: the two stage loops as library runners — [`pretrain`] (standard TopK training of
//! every module, `train-suite`) and [`finetune`] (through the pruned pass) — and what they
//! share: optimizers and clipping ([`optim`]), the learning-rate schedule ([`schedule`]),
//! dead-feature counters ([`dead`]), checkpoints with bit-identical resume ([`checkpoints`]),
//! the data position ([`data`]), and the output folder, metrics and progress of a run
//! ([`Session`]). The autograd finetuning step (the GPU path) is in [`autograd`].
//!
//! Each step is computed by one of two backends: the hand-written CPU engine (f32 on the CPU)
//! or candle autograd with the optimizer on the device (any device and dtype); both report a
//! [`StepReport`] and write the same checkpoints.

pub mod autograd;
pub mod checkpoints;
pub mod data;
pub mod dead;
pub mod finetune;
pub mod optim;
pub mod pretrain;
pub mod schedule;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::error::{Error, IoContext, Result};
use crate::model::Module;
use checkpoints::{CheckpointPolicy, Checkpoints};
use dead::DeadTracker;

/// What one training step produced, whichever backend and tool ran it.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// The loss that was differentiated.
    pub loss: f64,
    /// Per-module FVU, when the loss has an FVU term.
    pub fvu: Option<Vec<f64>>,
    /// The spliced CE, when the loss has a CE term.
    pub ce: Option<f64>,
    /// Per-module AuxK (without its weight), when the loss has an AuxK term.
    pub auxk: Option<Vec<f64>>,
    /// Which features had a non-zero value, per module.
    pub fired: Vec<Vec<bool>>,
}

/// Settings both training loops share (checked by the tools' flags).
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Steps of the whole run.
    pub steps: u64,
    /// Learning rate before the schedule's factor (already scaled by F when asked).
    pub lr: f64,
    pub warmup: f64,
    pub decay_start: f64,
    /// Per-module gradient-norm clip.
    pub clip: Option<f64>,
}

impl Schedule {
    /// The learning rate of step `t`.
    pub fn lr_at(&self, t: u64) -> f64 {
        self.lr * schedule::lr_factor(t, self.steps, self.warmup, self.decay_start)
    }
}

/// `--steps`, or `--n-tokens` over sequences of `tokens_per_step` tokens (at least one step).
pub fn steps_for(steps: Option<u64>, tokens: Option<u64>, tokens_per_step: u64) -> Result<u64> {
    match (steps, tokens) {
        (Some(s), _) => Ok(s),
        (None, Some(t)) => Ok((t / tokens_per_step.max(1)).max(1)),
        (None, None) => Err(Error::Usage("one of --steps or --n-tokens is required".into())),
    }
}

/// A module's FVU above this stops a run as diverged. FVU 1 is the error of predicting the
/// activations' mean; healthy runs stay below ~1 after their first steps (the toy default
/// spikes to ~11 at step 1 and recovers), and a run whose lr is far too large passes 1e3
/// within a few steps on its way to overflow.
pub const DIVERGED_FVU: f64 = 1e3;

/// The end of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Steps of the whole run.
    pub steps: u64,
    /// Training tokens per second over this invocation.
    pub tokens_per_s: f64,
    /// The last metrics record written.
    pub last: Option<serde_json::Value>,
    /// Stopped early by `--halt-after` (a checkpoint was kept).
    pub halted: bool,
}

/// The parts of one training run that do not depend on what is trained: `metrics.jsonl`
/// (one JSON object per step, appended; a resumed run first drops the lines at or after its
/// checkpoint), the progress bar, the checkpoints, and tokens per second.
pub struct Session {
    pub ckpt: Checkpoints,
    metrics: File,
    metrics_path: PathBuf,
    bar: indicatif::ProgressBar,
    start: Instant,
    start_step: u64,
    tokens_per_step: u64,
    last: Option<serde_json::Value>,
}

impl Session {
    /// Start (or continue at `start_step`) a run of `steps` steps in `dir`.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        dir: crate::util::io::RunDir,
        tool: &'static str,
        digest: String,
        policy: CheckpointPolicy,
        start_step: u64,
        steps: u64,
        tokens_per_step: u64,
        what: &str,
    ) -> Result<Session> {
        let path = dir.path().join("metrics.jsonl");
        if policy.resume {
            checkpoints::trim_metrics(&path, start_step)?;
        }
        let metrics = std::fs::OpenOptions::new().create(true).append(true).open(&path).at(&path)?;
        let bar = crate::util::token_bar(Some(steps * tokens_per_step), what);
        bar.set_position(start_step * tokens_per_step);
        Ok(Session {
            ckpt: Checkpoints::new(dir, tool, digest, policy, start_step),
            metrics,
            metrics_path: path,
            bar,
            start: Instant::now(),
            start_step,
            tokens_per_step,
            last: None,
        })
    }

    /// Append one step's metrics record.
    pub fn log(&mut self, record: serde_json::Value) -> Result<()> {
        writeln!(self.metrics, "{record}").at(&self.metrics_path)?;
        self.bar.inc(self.tokens_per_step);
        self.last = Some(record);
        Ok(())
    }

    /// After `step` of `steps` steps: checkpoint when due (`save` writes it) and say whether
    /// the run halts here (`--halt-after`).
    pub fn after_step(
        &mut self,
        step: u64,
        steps: u64,
        save: impl FnOnce(&mut Checkpoints) -> Result<()>,
    ) -> Result<bool> {
        let due = self.ckpt.due(step, steps);
        if due.save {
            self.metrics.flush().at(&self.metrics_path)?;
            save(&mut self.ckpt)?;
        }
        if due.halt {
            self.bar.finish_and_clear();
            self.ckpt.report_halt(step);
        }
        Ok(due.halt)
    }

    /// Stop the run when step `step`'s loss is not finite or a module's FVU shows that the
    /// run diverged (above [`DIVERGED_FVU`]); the error names the last checkpoint kept.
    pub fn check_step(&self, step: u64, report: &StepReport, modules: &[Module]) -> Result<()> {
        if !report.loss.is_finite() {
            return Err(Error::Usage(format!(
                "step {step}: loss is {}; stopping ({}); hint: lower --lr, or check the inputs",
                report.loss,
                self.ckpt.kept()
            )));
        }
        let fvu = report.fvu.as_deref().unwrap_or(&[]);
        if let Some((m, v)) = modules.iter().zip(fvu).find(|(_, v)| **v > DIVERGED_FVU) {
            return Err(Error::Usage(format!(
                "step {step}: module {m} has FVU {v:.3e}, over {DIVERGED_FVU} times the error of predicting its mean: \
                 the run diverged; stopping ({}); hint: lower --lr",
                self.ckpt.kept()
            )));
        }
        Ok(())
    }

    /// The run stopped at `--halt-after`.
    pub fn halted(self, steps: u64) -> RunSummary {
        RunSummary { steps, tokens_per_s: self.tokens_per_s(steps), last: self.last.clone(), halted: true }
    }

    fn tokens_per_s(&self, step: u64) -> f64 {
        let secs = self.start.elapsed().as_secs_f64();
        ((step.saturating_sub(self.start_step)) * self.tokens_per_step) as f64 / secs.max(1e-9)
    }

    /// The run is done and `write` has written its result into `out`: keep the folder.
    pub fn finish(mut self, steps: u64, write: impl FnOnce() -> Result<()>) -> Result<RunSummary> {
        self.bar.finish_and_clear();
        self.metrics.flush().at(&self.metrics_path)?;
        write()?;
        let summary =
            RunSummary { steps, tokens_per_s: self.tokens_per_s(steps), last: self.last.take(), halted: false };
        self.ckpt.finish();
        Ok(summary)
    }
}

/// `{module: value}` for per-module metrics, in suite order.
pub fn per_module<T: serde::Serialize>(modules: &[Module], values: &[T]) -> serde_json::Value {
    modules.iter().zip(values).map(|(m, v)| (m.name(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>().into()
}

/// The metrics record of a step: `step`, `loss`, `lr`, `dead` (per module) and, when present,
/// `fvu`, `auxk` (per module), `ce`.
pub fn metrics_record(
    step: u64,
    lr: f64,
    report: &StepReport,
    modules: &[Module],
    dead: &DeadTracker,
) -> serde_json::Value {
    let mut rec = serde_json::Map::new();
    if let Some(f) = &report.fvu {
        rec.insert("fvu".into(), per_module(modules, f));
    }
    if let Some(a) = &report.auxk {
        rec.insert("auxk".into(), per_module(modules, a));
    }
    if let Some(ce) = report.ce {
        rec.insert("ce".into(), serde_json::json!(ce));
    }
    let dead_counts: Vec<usize> = (0..modules.len()).map(|m| dead.n_dead(m)).collect();
    rec.insert("step".into(), serde_json::json!(step));
    rec.insert("loss".into(), serde_json::json!(report.loss));
    rec.insert("lr".into(), serde_json::json!(lr));
    rec.insert("dead".into(), per_module(modules, &dead_counts));
    rec.into()
}
