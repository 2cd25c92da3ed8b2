//! A training loop's checkpoints: when one is due (every `--checkpoint-every` steps, after the
//! last step, at the step where the learning rate starts to decay, on Ctrl-C, or to stop at
//! `--halt-after`), writing and resuming one (the file format is
//! [`file`]; the run's folder, [`run_dir`]), and what a failed step says about the last one written. A
//! resumed run ends bit-identical to an uninterrupted one; a finished run extended with a larger
//! `--steps` ends bit-identical to a run of that length from the start (without warmup; see
//! [`resume`]).

pub mod file;
pub mod run_dir;

use std::path::{Path, PathBuf};

pub use run_dir::{complete_checkpoint, RunDir};

use self::file::{RunState, DECAY, LATEST};
use crate::error::{Error, Result};
use crate::formats::runconfig::RunConfig;
use crate::formats::suite::Suite;
use crate::train::dead::DeadTracker;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::schedule::lr_factor;
use crate::train::Schedule;

/// When to checkpoint (the `--checkpoint-every`, `--halt-after` and `--resume` flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckpointPolicy {
    /// Write a checkpoint every N steps (and after the last, and where the decay starts).
    pub every: Option<u64>,
    /// Stop after this many steps of this run, keeping the checkpoint.
    pub halt_after: Option<u64>,
    /// The run continues from the checkpoint in its output folder.
    pub resume: bool,
}

/// One training run as its plumbing sees it (whichever runner: pretraining or finetuning):
/// where it writes, which tool it is, what a resume must repeat, when it checkpoints, its
/// schedule and batch size.
#[derive(Debug, Clone)]
pub struct TrainRun {
    pub out: PathBuf,
    pub tool: &'static str,
    /// The run's configuration (recorded in checkpoints; `--resume` compares it).
    pub run: RunConfig,
    pub policy: CheckpointPolicy,
    pub schedule: Schedule,
    /// Sequences per step.
    pub batch_size: u64,
    /// `--overwrite`: replace a non-empty output folder.
    pub overwrite: bool,
}

impl TrainRun {
    /// The run's output folder, prepared for a fresh or a resumed run ([`RunDir::prepare`]).
    pub fn prepare_dir(&self) -> Result<RunDir> {
        RunDir::prepare(&self.out, self.policy.resume, self.overwrite)
    }
}

/// The checkpoints of one run. In a data-parallel run only rank 0 holds the folder (`dir`) and
/// writes; the other ranks keep the same account of what was written.
pub struct Checkpoints {
    dir: Option<RunDir>,
    /// The run's output folder (for messages on every rank).
    out: PathBuf,
    tool: &'static str,
    run: RunConfig,
    policy: CheckpointPolicy,
    start_step: u64,
    last: Option<u64>,
    /// The checkpoint folders the next [`save`](Self::save) writes.
    targets: Vec<&'static str>,
}

/// What a training loop does after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// Write these checkpoints now (`checkpoint`, `checkpoint-decay`).
    pub save: Vec<&'static str>,
    /// Then stop, before the last step (`--halt-after`).
    pub halt: bool,
}

/// The first step whose learning rate is below the schedule's plateau: steps before it have
/// the same rate in a longer run with the same `--warmup` and `--decay-start` (when there is
/// no warmup). `None` when the run never decays before its end.
pub fn decay_point(schedule: &Schedule) -> Option<u64> {
    let s = (schedule.decay_start * schedule.steps as f64).ceil() as u64;
    (s > 0 && s < schedule.steps).then_some(s)
}

impl Checkpoints {
    /// For a run of `tool` into `out` that starts (or resumed) at `start_step`; `dir` is the
    /// prepared folder (`None` on the ranks of a job other than rank 0: they write nothing).
    pub fn new(
        dir: Option<RunDir>,
        out: PathBuf,
        tool: &'static str,
        run: RunConfig,
        policy: CheckpointPolicy,
        start_step: u64,
    ) -> Self {
        Checkpoints {
            dir,
            out,
            tool,
            run,
            policy,
            start_step,
            last: policy.resume.then_some(start_step),
            targets: Vec::new(),
        }
    }

    /// What to do once `step` steps of the run `schedule` are done.
    pub fn due(&self, step: u64, schedule: &Schedule) -> Due {
        let steps = schedule.steps;
        let halt = self.policy.halt_after.is_some_and(|h| step - self.start_step >= h);
        let mut save = Vec::new();
        if let Some(n) = self.policy.every {
            if halt || step % n == 0 || step == steps {
                save.push(LATEST);
            }
            if decay_point(schedule) == Some(step) {
                save.push(DECAY);
            }
        } else if halt {
            save.push(LATEST);
        }
        Due { save, halt: halt && step < steps }
    }

    /// Write the checkpoints due after `step` steps and `seqs_seen` sequences (see
    /// [`Session::after_step`](super::Session::after_step)); a data-parallel run records its
    /// `replicas` (ranks and the state hash they agreed on).
    pub fn save(
        &mut self,
        suite: &Suite,
        opt: &Optimizer,
        dead: &DeadTracker,
        step: u64,
        seqs_seen: u64,
        replicas: Option<file::Replicas>,
    ) -> Result<()> {
        // A checkpoint is only ever a good one: parameters the last update made non-finite
        // stop the run here, before they replace the previous checkpoint.
        if let Some(name) = suite.first_non_finite()? {
            return Err(Error::Usage(format!(
                "step {step}: parameter `{name}` is not finite after the update; stopping ({}); hint: lower --lr",
                self.kept()
            )));
        }
        let state = RunState {
            format: file::FORMAT.into(),
            version: file::VERSION,
            tool: self.tool.into(),
            step,
            seqs_seen,
            opt_t: opt.t,
            run: self.run.clone(),
            replicas,
        };
        let moments = (opt.kind == OptimizerKind::Adam).then_some((opt.m.as_slice(), opt.v.as_slice()));
        for name in std::mem::take(&mut self.targets) {
            if let Some(dir) = &self.dir {
                file::write(dir.path(), name, suite, moments, &dead.since, &state)?;
            }
            if name == LATEST {
                self.last = Some(step);
            }
        }
        if let Some(dir) = &mut self.dir {
            dir.keep();
        }
        Ok(())
    }

    /// The checkpoint folders the next [`save`](Self::save) writes.
    pub fn targets(&self) -> &[&'static str] {
        &self.targets
    }

    /// The prepared output folder (rank 0 of a job, or the only process).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// Ask the next [`save`](Self::save) to write these folders.
    pub fn set_targets(&mut self, targets: Vec<&'static str>) {
        self.targets = targets;
    }

    /// The run's result is written: keep its folder.
    pub fn finish(mut self) {
        if let Some(dir) = &mut self.dir {
            dir.keep();
        }
    }

    /// Whether this process writes the run's files (rank 0 of a job, or the only process).
    pub fn writes(&self) -> bool {
        self.dir.is_some()
    }

    /// The step of the last checkpoint written or resumed from.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// The output folder.
    pub fn path(&self) -> &Path {
        &self.out
    }

    /// Which checkpoint a stopped run leaves, for its error message.
    pub fn kept(&self) -> String {
        match self.last {
            Some(s) => {
                format!(
                    "the last checkpoint with finite parameters ({}, step {s}) is kept",
                    self.out.join(LATEST).display()
                )
            }
            None => "no checkpoint was written".to_string(),
        }
    }

    /// Tell the user how to go on after a halt at `step`.
    pub fn report_halt(&self, step: u64) {
        crate::note!("{}: halted after step {step} (checkpoint kept); continue with --resume", self.tool);
    }
}

/// Whether a run of `schedule` and a run of the same schedule over `saved_steps` steps use the
/// same learning rate at every step before `step` (so the state after `step` steps of one is
/// the state after `step` steps of the other).
fn same_rates_before(step: u64, saved_steps: u64, schedule: &Schedule) -> bool {
    step <= schedule.steps
        && (0..step).all(|t| {
            lr_factor(t, saved_steps, schedule.warmup, schedule.decay_start)
                == lr_factor(t, schedule.steps, schedule.warmup, schedule.decay_start)
        })
}

/// Resume into `params`, `opt` and `dead` the run of `tool` in `dir` that `run` describes
/// (`schedule` over `run.steps` steps of `batch_size` sequences).
///
/// The checkpoint's run must have the same flags and inputs (each difference is named). Its
/// length may differ (`--steps`): a checkpoint serves a run of another length when every step
/// before it had the same learning rate in both, which holds for the state where the decay
/// starts (`checkpoint-decay`, kept when checkpointing) as long as the schedule has no warmup
/// (whose length is a proportion of the steps). So a finished run extends exactly: from the
/// start of its decay, the longer schedule follows. The latest checkpoint that serves is used.
/// A state no such run could have written (a step past the end, a data position or optimizer
/// count that disagrees with its step) is refused, naming the file.
pub fn resume(
    tr: &TrainRun,
    suite: &Suite,
    params: &mut Vec<crate::sae::AeParams<Vec<f32>>>,
    opt: &mut Optimizer,
    dead: &mut DeadTracker,
) -> Result<RunState> {
    let (dir, tool, run, schedule, batch_size) = (tr.out.as_path(), tr.tool, &tr.run, &tr.schedule, tr.batch_size);
    // Swaps cut short by a crash were finished when the folder was prepared (`RunDir::prepare`).
    let latest = file::read_state(dir, LATEST, tool)?;
    let state_path = dir.join(LATEST).join("state.json");
    let diffs = run.differences(&latest.run);
    if !diffs.is_empty() {
        return Err(Error::input(
            &state_path,
            format!(
                "--resume: {}; hint: resume with the run's flags and files, or start anew with --overwrite",
                diffs.join("; ")
            ),
        ));
    }
    check_state(&latest, &state_path, batch_size)?;
    let mut candidates = vec![(LATEST, latest)];
    if dir.join(DECAY).join("state.json").is_file() {
        let st = file::read_state(dir, DECAY, tool)?;
        if run.differences(&st.run).is_empty() {
            candidates.push((DECAY, st));
        }
    }
    let serves = |st: &RunState| same_rates_before(st.step, st.run.steps, schedule);
    let Some((name, _)) = candidates.iter().filter(|(_, st)| serves(st)).max_by_key(|(_, st)| st.step) else {
        let st = &candidates[0].1;
        let old = Schedule { steps: st.run.steps, ..schedule.clone() };
        let kept = candidates.iter().map(|(_, st)| st.step).min().unwrap_or(st.step);
        let why = match (decay_point(&old), decay_point(schedule), schedule.warmup > 0.0) {
            (_, _, true) => "the warmup's length is a proportion of --steps, so no step of it carries over".to_string(),
            (_, Some(new), false) if schedule.steps < st.run.steps && new < kept => format!(
                "the {}-step schedule starts its decay at step {new}, before every kept checkpoint (the earliest is at step {kept})",
                schedule.steps
            ),
            (Some(d), _, false) => format!(
                "its decay started at step {d}, and no checkpoint from before it was kept (checkpoint-decay/ is written when checkpointing, --checkpoint-every)"
            ),
            _ => "its learning rate differs before that step".to_string(),
        };
        return Err(Error::input(
            &state_path,
            format!(
                "--steps {}: the checkpoint is at step {} of a {}-step run; {why}; hint: resume with --steps {}, or start anew with --overwrite",
                schedule.steps, st.step, st.run.steps, st.run.steps
            ),
        ));
    };
    let ck = file::read(dir, name, &suite.modules, opt.kind == OptimizerKind::Adam, tool)?;
    let st = &ck.state;
    check_state(st, &dir.join(name).join("state.json"), batch_size)?;
    if st.run.steps != schedule.steps {
        // The old run's result does not belong to the new one: gone before the first new step.
        Suite::remove_files(dir)?;
        crate::note!(
            "{tool}: the checkpoint's run had {} steps; continuing from its state at step {} ({}) on the {}-step schedule",
            st.run.steps,
            st.step,
            dir.join(name).display(),
            schedule.steps
        );
    }
    *params = ck.params;
    if let Some((m, v)) = ck.moments {
        opt.m = m;
        opt.v = v;
    }
    opt.t = ck.state.opt_t;
    dead.since = ck.since;
    Ok(ck.state)
}

/// Refuse a checkpoint state no run could have written: a step past the run's end, a data
/// position or optimizer count that disagrees with its step.
fn check_state(st: &RunState, state_path: &Path, batch_size: u64) -> Result<()> {
    let bad = |what: String| Err(Error::input(state_path, what));
    if st.step == 0 || st.step > st.run.steps {
        return bad(format!("field `step`: expected 1..={} (the run's steps), found {}", st.run.steps, st.step));
    }
    if st.seqs_seen != st.step * batch_size {
        return bad(format!(
            "field `seqs_seen`: expected {} ({} steps of {batch_size} sequences), found {}",
            st.step * batch_size,
            st.step,
            st.seqs_seen
        ));
    }
    // One optimizer step per training step (a step whose loss is not finite stops the run).
    if st.opt_t != st.step {
        return bad(format!("field `opt_t`: expected the step, {}, found {}", st.step, st.opt_t));
    }
    Ok(())
}

/// Keep only the metrics lines of steps before `step` (after a resume).
pub fn trim_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        crate::note!("warning: {} is missing; the resumed run starts it at step {step}", path.display());
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s < step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let n = kept.lines().count() as u64;
    if n != step {
        crate::note!(
            "warning: {} holds {n} records of the {step} steps before the checkpoint; the resumed run appends after them",
            path.display()
        );
    }
    crate::util::io::write_atomic(path, kept.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_before_the_decay_serves_a_longer_run() {
        let s = |steps, warmup| Schedule { steps, lr: 1.0, warmup, decay_start: 0.8, clip: None };
        assert_eq!(decay_point(&s(300, 0.0)), Some(240));
        assert_eq!(decay_point(&s(10, 0.0)), Some(8));
        assert_eq!(decay_point(&Schedule { decay_start: 1.0, ..s(10, 0.0) }), None);
        // step 240 of 300 carries over to 400 (decay from 320); so does 241 (the factor at
        // t = 240 is still 1), 242 does not
        assert!(same_rates_before(240, 300, &s(400, 0.0)));
        assert!(same_rates_before(241, 300, &s(400, 0.0)));
        assert!(!same_rates_before(242, 300, &s(400, 0.0)));
        assert!(!same_rates_before(300, 300, &s(400, 0.0)));
        // a shorter run: only up to its own decay start
        assert!(same_rates_before(160, 300, &s(200, 0.0)));
        assert!(!same_rates_before(200, 300, &s(200, 0.0)));
        // warmup is a proportion of the steps: nothing after step 0 carries over
        assert!(!same_rates_before(240, 300, &s(400, 0.1)));
        assert!(same_rates_before(300, 300, &s(300, 0.1)));
    }
}
