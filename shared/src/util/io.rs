//! Writing outputs so that a crash never leaves something that looks finished.
//!
//! Files are written to `<path>.tmp` and renamed. Output folders are built in a staging
//! folder `<dir>.tmp` beside the target and renamed into place by [`StagedDir::commit`];
//! dropping an uncommitted stage deletes it.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Write `bytes` to `path` via `<path>.tmp` and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_via_tmp(path, |tmp| std::fs::write(tmp, bytes).at(tmp))
}

/// Create `path` by `write(<path>.tmp)` and a rename; on any failure the `.tmp` file is
/// removed, so nothing partial is left behind.
pub fn write_via_tmp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if path.is_dir() {
        return Err(Error::input(path, "expected a file to write, found a folder"));
    }
    // The rename would replace a device, pipe or socket node with a plain file.
    if path.exists() && !path.is_file() {
        return Err(Error::input(path, "expected a regular file to write, found a device, pipe or socket"));
    }
    let tmp = tmp_path(path);
    let res = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).at(path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Write a safetensors file at `path` (via `<path>.tmp` and a rename) whose bytes depend only
/// on its contents: the header's keys, `__metadata__` included, are sorted (the safetensors
/// crate writes its metadata map in hash order). Sorting keeps the header's length, so the
/// header is rewritten in place and the tensor data is streamed once.
pub fn write_safetensors<V: safetensors::View>(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, V)>,
    meta: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    write_via_tmp(path, |tmp| {
        let meta: Option<std::collections::HashMap<String, String>> =
            (!meta.is_empty()).then(|| meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        safetensors::serialize_to_file(tensors, meta, tmp)
            .map_err(|e| Error::input(tmp, format!("cannot write safetensors file: {e}")))?;
        sort_safetensors_header(tmp)
    })
}

/// A host array to write with [`write_safetensors`], f32 values borrowed (no copy on
/// little-endian machines: a checkpoint of GPT-2 small at F 24,576 writes 7.2 GB of Adam
/// moments) or i64 values owned.
pub enum HostArray<'a> {
    F32(&'a [f32], Vec<usize>),
    I64(Vec<i64>, Vec<usize>),
}

impl safetensors::View for HostArray<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            HostArray::F32(..) => safetensors::Dtype::F32,
            HostArray::I64(..) => safetensors::Dtype::I64,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            HostArray::F32(_, s) | HostArray::I64(_, s) => s,
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            #[cfg(target_endian = "little")]
            // SAFETY: f32 has no padding and u8 no alignment; the bytes are the values' own, in
            // the little-endian order safetensors stores.
            HostArray::F32(v, _) => {
                std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4) })
            }
            #[cfg(not(target_endian = "little"))]
            HostArray::F32(v, _) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostArray::I64(v, _) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            HostArray::F32(v, _) => v.len() * 4,
            HostArray::I64(v, _) => v.len() * 8,
        }
    }
}

fn sort_safetensors_header(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).at(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).at(path)?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header).at(path)?;
    // serde_json's maps are ordered by key.
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::input(path, format!("safetensors header just written is not JSON: {e}")))?;
    let mut sorted = serde_json::to_vec(&v).expect("JSON value serializes");
    if sorted.len() > header.len() {
        return Err(Error::input(path, "safetensors header grew when sorted"));
    }
    sorted.resize(header.len(), b' ');
    f.seek(std::io::SeekFrom::Start(8)).at(path)?;
    f.write_all(&sorted).at(path)
}

/// Move the finished folder `staged` to `target`, replacing a folder there: the old one is
/// renamed to `<target>.old` first and removed last, so at every instant a complete folder
/// exists under one of the three names. [`recover_swap`] finishes a swap a crash cut short.
pub fn swap_in(staged: &Path, target: &Path) -> Result<()> {
    let old = sibling(target, ".old");
    if target.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        std::fs::rename(target, &old).at(&old)?;
        fault_point("swap:moved-aside");
    }
    std::fs::rename(staged, target).at(target)?;
    fault_point("swap:staged-in");
    if old.exists() {
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    Ok(())
}

/// Finish a [`swap_in`] of `staged` into `target` that a crash interrupted: a `staged` folder
/// that `complete` accepts is the newest and is swapped in; an incomplete one is removed; and
/// `<target>.old` comes back when `target` is missing (it is removed when `target` exists).
pub fn recover_swap(staged: &Path, target: &Path, complete: impl Fn(&Path) -> bool) -> Result<()> {
    if staged.is_dir() && complete(staged) {
        return swap_in(staged, target);
    }
    if staged.exists() {
        std::fs::remove_dir_all(staged).at(staged)?;
    }
    let old = sibling(target, ".old");
    if old.is_dir() {
        if target.exists() {
            std::fs::remove_dir_all(&old).at(&old)?;
        } else {
            std::fs::rename(&old, target).at(target)?;
        }
    }
    Ok(())
}

/// Fault injection for the crash tests: when the environment variable `SCAE_FAULT` equals
/// `name`, the process aborts here at once (no destructors run, as under `kill -9`).
pub fn fault_point(name: &str) {
    if std::env::var_os("SCAE_FAULT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

/// Refuse an output path `out` (flag `out_flag`) that is one of the run's inputs or holds one
/// (replacing it would delete the input before it is read), comparing paths with symbolic links
/// and `..` resolved. `inputs` are (flag, path) pairs; a path that does not exist (a hub model
/// id, an absent option) is skipped.
pub fn refuse_overlap(out: &Path, out_flag: &str, inputs: &[(&str, Option<&Path>)]) -> Result<()> {
    let out_c = resolved(out);
    for (flag, inp) in inputs {
        let Some(inp) = inp else { continue };
        let Ok(inp_c) = inp.canonicalize() else { continue };
        if inp_c == out_c || inp_c.starts_with(&out_c) {
            let how = if inp_c == out_c { "is" } else { "holds" };
            return Err(Error::input(
                out,
                format!("{out_flag}: {how} the input {flag} {}; replacing it would delete that input; hint: choose another {out_flag}", inp.display()),
            ));
        }
    }
    Ok(())
}

/// `path` with symbolic links and `..` resolved, also when it does not exist yet (its nearest
/// existing ancestor is resolved and the rest appended).
fn resolved(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            return rest.iter().rev().fold(c, |acc: PathBuf, part| match *part {
                std::path::Component::ParentDir => acc.parent().map(Path::to_path_buf).unwrap_or(acc),
                std::path::Component::CurDir => acc,
                other => acc.join(other),
            });
        }
        match (cur.parent(), cur.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// `<path>.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// `<path><suffix>` beside `path` (a trailing slash ignored), e.g. a folder's staging copy.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.strip_suffix_slash().into_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// An exclusive claim on an output path for one run: `<out>.lock`, locked with the OS's
/// advisory file lock (released when the process dies, so a crash leaves no stale claim) and
/// removed when the run ends. A second run into the same output is refused instead of the two
/// clobbering each other's staging folder.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: std::fs::File,
}

impl OutputLock {
    /// Claim `out` (named `flag` in messages). The lock sits beside the resolved path, so
    /// two spellings of one output (a symbolic link, `./x/`) share it.
    pub fn take(out: &Path, flag: &str) -> Result<OutputLock> {
        let path = sibling(&resolved(out), ".lock");
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::input(out, format!("{flag}: cannot create output folder: {e}")))?;
        }
        loop {
            let file =
                std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| {
                    Error::input(
                        out,
                        format!("{flag}: cannot write beside the output (its lock {}): {e}", path.display()),
                    )
                })?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::input(
                        out,
                        format!("{flag}: another run is writing this output (it holds {}); hint: wait for it, or choose another {flag}", path.display()),
                    ))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // The previous holder may have removed the file between our open and lock: then
            // the lock is on an unlinked file and we start over.
            if same_file(&file, &path) {
                return Ok(OutputLock { path, file });
            }
        }
    }
}

#[cfg(unix)]
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::File, path: &Path) -> bool {
    path.exists()
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held, so that no one locks a file that is about to go.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// An output folder under construction.
#[derive(Debug)]
pub struct StagedDir {
    target: PathBuf,
    stage: PathBuf,
    committed: bool,
    _lock: OutputLock,
}

impl StagedDir {
    /// Check that `target` may be written (absent, an empty folder, or `overwrite`) and create
    /// the staging folder beside it. `flag` names the option in messages (e.g. `--out`).
    pub fn create(target: &Path, overwrite: bool, flag: &str) -> Result<StagedDir> {
        let lock = OutputLock::take(target, flag)?;
        // A stage left by a crashed run never became an output, so it is ours to remove; an
        // output moved aside by a crashed commit comes back first (and is then checked like
        // any existing output).
        let stage = sibling(target, ".tmp");
        recover_swap(&stage, target, |_| false)?;
        if target.exists() {
            if !target.is_dir() {
                return Err(Error::input(target, format!("{flag}: expected a folder, found a file")));
            }
            let non_empty = std::fs::read_dir(target).at(target)?.next().is_some();
            if non_empty && !overwrite {
                return Err(Error::input(
                    target,
                    format!("{flag}: folder exists and is not empty; hint: pass --overwrite to replace it"),
                ));
            }
        }
        std::fs::create_dir_all(&stage)
            .map_err(|e| Error::input(target, format!("{flag}: cannot create output folder: {e}")))?;
        Ok(StagedDir { target: target.to_path_buf(), stage, committed: false, _lock: lock })
    }

    /// Where files go until [`commit`](Self::commit).
    pub fn path(&self) -> &Path {
        &self.stage
    }

    /// Move the finished folder into place (replacing an old one; see [`swap_in`]).
    pub fn commit(mut self) -> Result<PathBuf> {
        swap_in(&self.stage, &self.target)?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.stage);
        }
    }
}

trait StripSlash {
    fn strip_suffix_slash(&self) -> PathBuf;
}

impl StripSlash for Path {
    fn strip_suffix_slash(&self) -> PathBuf {
        self.components().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_dir_is_removed_unless_committed() {
        let base = std::env::temp_dir().join(format!("scae-io-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let target = base.join("out");
        {
            let s = StagedDir::create(&target, false, "--out").unwrap();
            std::fs::write(s.path().join("a"), b"x").unwrap();
        }
        assert!(!target.exists() && !tmp_path(&target).exists());
        let s = StagedDir::create(&target, false, "--out").unwrap();
        std::fs::write(s.path().join("a"), b"x").unwrap();
        s.commit().unwrap();
        assert!(target.join("a").is_file());
        let err = StagedDir::create(&target, false, "--out").unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
