//! A training loop's checkpoints: when one is due (every `--checkpoint-every` steps and after
//! the last step when checkpointing, or to stop at `--halt-after`), writing and resuming one
//! (the file format is [`crate::formats::checkpoint`]), and what a failed step says about the
//! last one written. A resumed run ends bit-identical to an uninterrupted one.

use std::path::Path;

use crate::error::Result;
use crate::formats::checkpoint::{self, RunState};
use crate::formats::suite::Suite;
use crate::train::dead::DeadTracker;
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::util::io::RunDir;

/// When to checkpoint (the `--checkpoint-every`, `--halt-after` and `--resume` flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckpointPolicy {
    /// Write a checkpoint every N steps (and after the last).
    pub every: Option<u64>,
    /// Stop after this many steps of this run, keeping the checkpoint.
    pub halt_after: Option<u64>,
    /// The run continues from the checkpoint in its output folder.
    pub resume: bool,
}

/// The checkpoints of one run.
pub struct Checkpoints {
    dir: RunDir,
    tool: &'static str,
    digest: String,
    policy: CheckpointPolicy,
    start_step: u64,
    last: Option<u64>,
}

/// What a training loop does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Write a checkpoint now.
    pub save: bool,
    /// Then stop, before the last step (`--halt-after`).
    pub halt: bool,
}

impl Checkpoints {
    /// For a run of `tool` into `dir` that starts (or resumed) at `start_step`.
    pub fn new(dir: RunDir, tool: &'static str, digest: String, policy: CheckpointPolicy, start_step: u64) -> Self {
        Checkpoints { dir, tool, digest, policy, start_step, last: policy.resume.then_some(start_step) }
    }

    /// What to do once `step` of `steps` steps are done.
    pub fn due(&self, step: u64, steps: u64) -> Due {
        let halt = self.policy.halt_after.is_some_and(|h| step - self.start_step >= h);
        let every = self.policy.every;
        Due { save: halt || every.is_some_and(|n| step % n == 0 || step == steps), halt: halt && step < steps }
    }

    /// Write the checkpoint after `step` steps and `seqs_seen` sequences.
    pub fn save(
        &mut self,
        suite: &Suite,
        opt: &Optimizer,
        dead: &DeadTracker,
        step: u64,
        seqs_seen: u64,
    ) -> Result<()> {
        // A checkpoint is only ever a good one: parameters the last update made non-finite
        // stop the run here, before they replace the previous checkpoint.
        if let Some(name) = suite.first_non_finite()? {
            return Err(crate::error::Error::Usage(format!(
                "step {step}: parameter `{name}` is not finite after the update; stopping ({}); hint: lower --lr",
                self.kept()
            )));
        }
        let state = RunState {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            tool: self.tool.into(),
            step,
            seqs_seen,
            opt_t: opt.t,
            args_digest: self.digest.clone(),
        };
        let moments = (opt.kind == OptimizerKind::Adam).then_some((opt.m.as_slice(), opt.v.as_slice()));
        checkpoint::write(self.dir.path(), suite, moments, &dead.since, &state)?;
        self.last = Some(step);
        self.dir.keep();
        Ok(())
    }

    /// The run's result is written: keep its folder.
    pub fn finish(mut self) {
        self.dir.keep();
    }

    /// Which checkpoint a stopped run leaves, for its error message.
    pub fn kept(&self) -> String {
        match self.last {
            Some(s) => {
                format!(
                    "the last checkpoint with finite parameters ({}, step {s}) is kept",
                    self.dir.path().join("checkpoint").display()
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

/// Resume from `dir/checkpoint` (written by `tool` with arguments of digest `digest`) for a run
/// of `steps` steps of `batch_size` sequences: the parameters go into `params`, the optimizer
/// state into `opt`, the counters into `dead`. A state that no such run can have written (a
/// step past the end, a data position or optimizer count that disagrees with its step) is
/// refused, naming the file.
#[allow(clippy::too_many_arguments)]
pub fn resume(
    dir: &Path,
    tool: &str,
    digest: &str,
    suite: &Suite,
    steps: u64,
    batch_size: u64,
    params: &mut Vec<crate::sae::AeParams<Vec<f32>>>,
    opt: &mut Optimizer,
    dead: &mut DeadTracker,
) -> Result<RunState> {
    let ck = checkpoint::read(dir, &suite.modules, opt.kind == OptimizerKind::Adam, tool, digest)?;
    let st = &ck.state;
    let state_path = dir.join("checkpoint").join("state.json");
    let bad = |what: String| Err(crate::error::Error::input(&state_path, what));
    if st.step == 0 || st.step > steps {
        return bad(format!("field `step`: expected 1..={steps} (the run's steps), found {}", st.step));
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
    *params = ck.params;
    if let Some((m, v)) = ck.moments {
        opt.m = m;
        opt.v = v;
    }
    opt.t = ck.state.opt_t;
    dead.since = ck.since;
    Ok(ck.state)
}

/// Fingerprints of a run's input files, for its resume digest: a resumed run whose cache,
/// connections or data changed at the same path is refused. A folder (a cache) stands for its
/// `manifest.json` and shards; each file is hashed by `hash_file`. Absent paths give null.
pub fn fingerprints(paths: &[Option<&Path>]) -> serde_json::Value {
    paths
        .iter()
        .map(|p| {
            let p = p.map(|p| if p.is_dir() { p.join("manifest.json") } else { p.to_path_buf() });
            p.and_then(|p| fingerprint(&p).ok()).map_or(serde_json::Value::Null, serde_json::Value::String)
        })
        .collect()
}

fn fingerprint(path: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    hash_file(path, &mut h)?;
    // A cache's shards (listed in the folder), each sampled.
    if path.file_name().is_some_and(|n| n == "manifest.json") {
        if let Some(dir) = path.parent() {
            let mut shards: Vec<std::path::PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            shards.sort();
            for s in &shards {
                hash_file(s, &mut h)?;
            }
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Hash a file into `h`: whole up to 64 MiB; a larger one by its size and 64 blocks of 64 KiB
/// spread evenly over it (first and last included), which a bulk change of its values hits.
fn hash_file(path: &Path, h: &mut blake3::Hasher) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    const WHOLE: u64 = 64 << 20;
    const BLOCK: u64 = 64 << 10;
    const BLOCKS: u64 = 64;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    h.update(&len.to_le_bytes());
    if len <= WHOLE {
        std::io::copy(&mut f, h)?;
        return Ok(());
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..BLOCKS {
        f.seek(SeekFrom::Start(i * (len - BLOCK) / (BLOCKS - 1)))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
    }
    Ok(())
}

/// A stable digest of a JSON value (for [`RunState::args_digest`]).
pub fn digest(v: &serde_json::Value) -> String {
    blake3::hash(v.to_string().as_bytes()).to_hex().to_string()
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
