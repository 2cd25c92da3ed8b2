//! A training run's output folder ([`RunDir`]): created fresh (or resumed from its checkpoint),
//! removed again when a fresh run fails before it has anything to keep, and the check that
//! tells a finished checkpoint folder from a damaged one.

use std::path::{Path, PathBuf};

use super::file::{DECAY, LATEST};
use crate::error::{Error, IoContext, Result};
use crate::util::io::{recover_swap, sibling, OutputLock};

/// The output folder of a training run. A fresh run that fails before it writes a checkpoint
/// or its result leaves nothing behind: dropping an unkept `RunDir` removes the folder's
/// contents and puts back the folder that `--overwrite` replaced. Once kept (a checkpoint to
/// resume from, or the final output), the folder stays.
#[must_use]
pub struct RunDir {
    out: PathBuf,
    _lock: OutputLock,
    /// The previous contents (`--overwrite`), until the run is kept.
    replaced: Option<PathBuf>,
    /// The folder existed (empty) before the run.
    existed: bool,
    kept: bool,
}

impl RunDir {
    /// Prepare a training output folder: with `resume`, it must hold a checkpoint; otherwise it
    /// must be absent or empty (or `overwrite`), and is created.
    pub fn prepare(out: &Path, resume: bool, overwrite: bool) -> Result<RunDir> {
        let lock = OutputLock::take(out, "--out")?;
        if resume {
            // Checkpoint swaps cut short by a crash: finish them (see [`super::file`]).
            for name in [LATEST, DECAY] {
                recover_swap(&out.join(format!("{name}.tmp")), &out.join(name), complete_checkpoint)?;
            }
            if !out.join(LATEST).join("state.json").is_file() {
                return Err(Error::input(out, "--resume: no checkpoint to resume from; hint: run without --resume"));
            }
            return Ok(RunDir { out: out.to_path_buf(), _lock: lock, replaced: None, existed: true, kept: true });
        }
        let mut replaced = None;
        let mut existed = false;
        if out.exists() {
            if !out.is_dir() {
                return Err(Error::input(out, "--out: expected a folder, found a file"));
            }
            let mut non_empty = std::fs::read_dir(out).at(out)?.next().is_some();
            if non_empty && !overwrite && only_leftovers(out)? {
                // A run killed before its first checkpoint: nothing in it can be resumed.
                crate::note!("{}: removing what a run that stopped before its first checkpoint left", out.display());
                for e in std::fs::read_dir(out).at(out)? {
                    let p = e.at(out)?.path();
                    if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) }.at(&p)?;
                }
                non_empty = false;
            }
            if non_empty && !overwrite {
                return Err(Error::input(
                    out,
                    "--out: folder exists and is not empty; hint: pass --overwrite, or --resume to continue",
                ));
            }
            if non_empty {
                // Moved aside until this run has something to show for itself.
                let aside = sibling(out, ".replaced");
                if aside.exists() {
                    std::fs::remove_dir_all(&aside).at(&aside)?;
                }
                std::fs::rename(out, &aside).at(&aside)?;
                replaced = Some(aside);
            } else {
                existed = true;
            }
        }
        std::fs::create_dir_all(out)
            .map_err(|e| Error::input(out, format!("--out: cannot create output folder: {e}")))?;
        Ok(RunDir { out: out.to_path_buf(), _lock: lock, replaced, existed, kept: false })
    }

    /// The output folder.
    pub fn path(&self) -> &Path {
        &self.out
    }

    /// The run has written something worth keeping: the folder stays from now on.
    pub fn keep(&mut self) {
        if self.kept {
            return;
        }
        self.kept = true;
        if let Some(old) = self.replaced.take() {
            let _ = std::fs::remove_dir_all(old);
        }
    }
}

/// Whether `dir` is a finished checkpoint folder: its `state.json` (written last, by a rename)
/// is a JSON object with a `step`. A damaged one never replaces a good checkpoint.
pub fn complete_checkpoint(dir: &Path) -> bool {
    std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("step").is_some_and(|s| s.is_u64()))
}

/// Whether a training output folder holds only what a run writes before its first checkpoint:
/// `metrics.jsonl` and `*.tmp` entries, none of them a complete checkpoint.
fn only_leftovers(out: &Path) -> Result<bool> {
    for e in std::fs::read_dir(out).at(out)? {
        let e = e.at(out)?;
        let name = e.file_name().to_string_lossy().to_string();
        if !(name == "metrics.jsonl" || name.ends_with(".tmp")) || complete_checkpoint(&e.path()) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.out);
        if let Some(old) = &self.replaced {
            let _ = std::fs::rename(old, &self.out);
        } else if self.existed {
            let _ = std::fs::create_dir(&self.out);
        }
    }
}
