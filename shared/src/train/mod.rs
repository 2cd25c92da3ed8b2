//! Training: the two stage loops as library runners — [`pretrain`] (standard TopK training of
//! every module, `train-suite`) and [`finetune`] (through the pruned pass) — and what they
//! share: optimizers and clipping ([`optim`]), the learning-rate schedule ([`schedule`]),
//! dead-feature counters ([`dead`]), checkpoints with bit-identical resume ([`checkpoints`]),
//! the data position ([`data`]), and the output folder, metrics and progress of a run
//! ([`Session`]). The finetuning step's forms (CPU engine, autograd) are in [`finetune_step`].
//!
//! Each step is computed by one of two backends: the hand-written CPU engine (f32 on the CPU)
//! or candle autograd with the optimizer on the device (any device and dtype); both report a
//! [`StepReport`] and write the same checkpoints.

mod adam_enc;
pub mod checkpoints;
pub mod data;
pub mod dead;
pub mod finetune;
pub mod finetune_step;
pub mod gates;
pub mod learn;
pub mod optim;
pub mod parallel;
pub mod pretrain;
pub mod schedule;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use crate::error::{Error, IoContext, Result};
use crate::model::Module;
use crate::util::collective::Collective;
use checkpoints::{Checkpoints, RunDir, TrainRun};
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
    /// Whether this invocation trained any step (a resumed finished run trains none).
    pub trained: bool,
}

/// What a training loop does after a step (see [`Session::after_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Go on.
    Continue,
    /// `--halt-after`: stop here, the checkpoint kept.
    Halt,
    /// Ctrl-C or SIGTERM: a checkpoint was written; stop with [`Session::interrupted`].
    Interrupted,
}

/// The parts of one training run that do not depend on what is trained: `metrics.jsonl`
/// (one JSON object per step, appended; a resumed run first drops the lines at or after its
/// checkpoint), progress on stderr, the checkpoints (also on Ctrl-C), and tokens per second.
///
/// In a data-parallel run every rank holds a session, but only rank 0's has the folder: it
/// alone writes metrics, checkpoints and the result; the decisions (checkpoint now, stop on
/// Ctrl-C) are taken together, so every rank leaves the loop at the same step.
pub struct Session<'c> {
    pub ckpt: Checkpoints,
    tool: &'static str,
    /// `metrics.jsonl` (rank 0 only).
    metrics: Option<File>,
    metrics_path: PathBuf,
    progress: crate::util::progress::Progress,
    last: Option<serde_json::Value>,
    coll: &'c dyn Collective,
}

impl<'c> Session<'c> {
    /// Start (or continue at `start_step`) the run `tr` in `dir` (`None` on the ranks of a job
    /// other than rank 0), `tokens_per_step` tokens a step over the ranks of `coll`; Ctrl-C and
    /// SIGTERM now stop it at the next step boundary.
    pub fn open(
        dir: Option<RunDir>,
        tr: &TrainRun,
        start_step: u64,
        tokens_per_step: u64,
        coll: &'c dyn Collective,
    ) -> Result<Session<'c>> {
        let path = tr.out.join("metrics.jsonl");
        let metrics = match &dir {
            Some(_) => {
                if tr.policy.resume {
                    checkpoints::trim_metrics(&path, start_step)?;
                }
                Some(std::fs::OpenOptions::new().create(true).append(true).open(&path).at(&path)?)
            }
            None => None,
        };
        let unit = crate::util::progress::Unit::Steps { tokens_per_step };
        let progress = crate::util::progress::Progress::new(tr.tool, unit, Some(tr.run.steps), start_step);
        crate::util::interrupt::install();
        Ok(Session {
            ckpt: Checkpoints::new(dir, tr.out.clone(), tr.tool, tr.run.clone(), tr.policy, start_step),
            tool: tr.tool,
            metrics,
            metrics_path: path,
            progress,
            last: None,
            coll,
        })
    }

    /// Append one step's metrics record; the progress shows the step's loss and mean FVU (or CE).
    pub fn log(&mut self, record: serde_json::Value, report: &StepReport) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            writeln!(m, "{record}").at(&self.metrics_path)?;
        }
        let mut msg = format!("loss {:.4}", report.loss);
        if let Some(f) = report.fvu.as_ref().filter(|f| !f.is_empty()) {
            msg.push_str(&format!(", FVU {:.4}", f.iter().sum::<f64>() / f.len() as f64));
        }
        if let Some(ce) = report.ce {
            msg.push_str(&format!(", CE {ce:.4}"));
        }
        self.progress.set_message(msg);
        self.progress.inc(1);
        self.last = Some(record);
        // For tests of stopping a run: slow each step down (SCAE_STEP_DELAY_MS).
        if let Some(ms) = std::env::var("SCAE_STEP_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Ok(())
    }

    /// After `step` steps of `schedule`: checkpoint when due (`save` writes it: it calls
    /// [`Checkpoints::save`], on every rank: rank 0's writes) or when Ctrl-C / SIGTERM asked
    /// any rank to stop, and say what the loop does next.
    pub fn after_step(
        &mut self,
        step: u64,
        schedule: &Schedule,
        save: impl FnOnce(&mut Checkpoints) -> Result<()>,
    ) -> Result<After> {
        let mut due = self.ckpt.due(step, schedule);
        let mut stop = [crate::util::interrupt::requested()];
        self.coll.any(&mut stop)?;
        let interrupted = stop[0] && step < schedule.steps;
        if interrupted && !due.save.contains(&checkpoints::file::LATEST) {
            due.save.push(checkpoints::file::LATEST);
        }
        if !due.save.is_empty() {
            self.flush_metrics()?;
            self.ckpt.set_targets(due.save);
            save(&mut self.ckpt)?;
        }
        if interrupted {
            self.progress.finish();
            return Ok(After::Interrupted);
        }
        if due.halt {
            self.progress.finish();
            self.ckpt.report_halt(step);
            return Ok(After::Halt);
        }
        Ok(After::Continue)
    }

    /// The error that ends a run stopped by Ctrl-C or SIGTERM after `step` steps.
    pub fn interrupted(&self, step: u64) -> Error {
        let last = self.ckpt.last().map_or("none".to_string(), |s| s.to_string());
        Error::Interrupted(format!(
            "interrupted at step {step}; last checkpoint at step {last} ({}); rerun the same command with --resume",
            self.ckpt.path().join(checkpoints::file::LATEST).display()
        ))
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
        RunSummary {
            steps,
            tokens_per_s: self.progress.tokens_per_s(),
            last: self.last.clone(),
            halted: true,
            trained: self.last.is_some(),
        }
    }

    fn flush_metrics(&mut self) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.flush().at(&self.metrics_path),
            None => Ok(()),
        }
    }

    /// The run is done: `write` writes its result into `out` (on rank 0 only), and the folder
    /// is kept.
    pub fn finish(mut self, steps: u64, write: impl FnOnce() -> Result<()>) -> Result<RunSummary> {
        self.progress.finish();
        self.flush_metrics()?;
        if self.ckpt.writes() {
            write()?;
        }
        let summary = RunSummary {
            steps,
            tokens_per_s: self.progress.tokens_per_s(),
            trained: self.last.is_some(),
            last: self.last.take(),
            halted: false,
        };
        if !summary.trained {
            crate::note!("{}: the run had already done all its {steps} steps; its result is written anew", self.tool);
        }
        self.ckpt.finish();
        Ok(summary)
    }
}

/// The line a training tool ends with: steps, where the result went, the last step's loss, mean
/// FVU (or CE) and dead features, and the speed of this invocation.
pub fn summary_line(tool: &str, done: &RunSummary, out: &std::path::Path) -> String {
    if !done.trained {
        return format!("{tool}: {} steps -> {} (already complete; nothing trained)", done.steps, out.display());
    }
    let mut parts = Vec::new();
    if let Some(last) = &done.last {
        if let Some(l) = last["loss"].as_f64() {
            parts.push(format!("loss {l:.4}"));
        }
        let mean = |key: &str| -> Option<f64> {
            let m = last[key].as_object()?;
            (!m.is_empty()).then(|| m.values().filter_map(|v| v.as_f64()).sum::<f64>() / m.len() as f64)
        };
        if let Some(f) = mean("fvu") {
            parts.push(format!("mean FVU {f:.4}"));
        }
        if let Some(ce) = last["ce"].as_f64() {
            parts.push(format!("CE {ce:.4}"));
        }
        if let Some(d) = last["dead"].as_object() {
            let n: u64 = d.values().filter_map(|v| v.as_u64()).sum();
            parts.push(format!("{n} dead features"));
        }
    }
    format!(
        "{tool}: {} steps -> {} (last step: {}; {} tokens/s)",
        done.steps,
        out.display(),
        parts.join(", "),
        crate::util::progress::thousands(done.tokens_per_s as u64)
    )
}

/// `{module: value}` for per-module metrics, in suite order.
pub fn per_module<T: serde::Serialize>(modules: &[Module], values: &[T]) -> serde_json::Value {
    modules.iter().zip(values).map(|(m, v)| (m.name(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>().into()
}

/// The metrics record of a step: `step`, `loss`, `lr_applied` (the learning rate of this step:
/// `--lr` scaled by F and by the schedule), `dead` (per module: features without a non-zero
/// value in the last `--dead-threshold` tokens) and, when present, `fvu`, `auxk` (per module),
/// `ce`.
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
    rec.insert("lr_applied".into(), serde_json::json!(lr));
    rec.insert("dead".into(), per_module(modules, &dead_counts));
    rec.into()
}
