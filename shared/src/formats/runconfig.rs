//! A training run's configuration as one serialisable value ([`RunConfig`]): every flag that
//! changes the run, taken from the tool's parsed arguments as a whole (so a new flag is part of
//! it without anyone listing it; flags that do not change the run — `--out`, `--resume`,
//! `--overwrite`, `--checkpoint-every`, `--halt-after`, `--threads` — are marked
//! `#[serde(skip)]` where they are declared), the contents of its input files, and its length
//! in steps. Checkpoints record it; `--resume` compares it flag by flag and names what differs.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// What determines a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Every flag that changes the run, by flag name (`--auxk-alpha`), as parsed (defaults
    /// included). Input files are in `inputs` instead.
    pub flags: BTreeMap<String, Value>,
    /// Each input file or folder by its flag: a fingerprint of its contents (see
    /// [`fingerprint`]), so a moved file is the same input and an edited one is not.
    pub inputs: BTreeMap<String, String>,
    /// The run's length in steps (`--steps`, or `--n-tokens` over the batch).
    pub steps: u64,
}

/// `--auxk-alpha` for the field `auxk_alpha`.
pub fn flag_name(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

/// A fingerprint of an input: a file by [`crate::util::fingerprint::file_fingerprint`]; a folder
/// by the names and fingerprints of the regular files directly in it (not its subfolders, such
/// as a training run's `checkpoint/`, nor dotfiles such as make's `.done`).
pub fn fingerprint(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return crate::util::fingerprint::file_fingerprint(path);
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in &files {
        h.update(f.file_name().expect("a file").to_string_lossy().as_bytes());
        h.update(crate::util::fingerprint::file_fingerprint(f)?.as_bytes());
    }
    Ok(format!("blake3:{}", h.finalize().to_hex()))
}

impl RunConfig {
    /// The run that `args` (a tool's parsed arguments: each serialised field is a flag) describe,
    /// with `inputs` (flag, path) read by content and `steps` steps. A path that does not exist
    /// (a hub id) stays a flag value.
    pub fn new(args: &impl Serialize, inputs: &[(&str, Option<&Path>)], steps: u64) -> Result<RunConfig> {
        let Value::Object(map) = serde_json::to_value(args).expect("arguments serialize") else {
            panic!("a tool's arguments serialize to a JSON object");
        };
        let mut flags: BTreeMap<String, Value> = map.into_iter().map(|(k, v)| (flag_name(&k), v)).collect();
        let mut files = BTreeMap::new();
        for (flag, path) in inputs {
            let Some(p) = path.filter(|p| p.exists()) else { continue };
            flags.remove(*flag);
            files.insert(flag.to_string(), fingerprint(p)?);
        }
        Ok(RunConfig { flags, inputs: files, steps })
    }

    /// What differs between `saved` (a checkpoint's run) and this run, besides the length:
    /// one phrase per flag, e.g. ``--auxk-alpha is 0.5, the checkpoint's run used 0``.
    pub fn differences(&self, saved: &RunConfig) -> Vec<String> {
        let mut out = Vec::new();
        let show = |v: Option<&Value>| match v {
            None | Some(Value::Null) => "(not given)".to_string(),
            Some(v) => v.to_string(),
        };
        let names: std::collections::BTreeSet<&String> = self.flags.keys().chain(saved.flags.keys()).collect();
        for k in names {
            let (now, then) = (self.flags.get(k), saved.flags.get(k));
            let same = match (now, then) {
                (Some(Value::Number(a)), Some(Value::Number(b))) => a.as_f64() == b.as_f64(),
                (a, b) => a.unwrap_or(&Value::Null) == b.unwrap_or(&Value::Null),
            };
            if !same {
                out.push(format!("{k} is {}, the checkpoint's run used {}", show(now), show(then)));
            }
        }
        let names: std::collections::BTreeSet<&String> = self.inputs.keys().chain(saved.inputs.keys()).collect();
        for k in names {
            match (self.inputs.get(k), saved.inputs.get(k)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(_), Some(_)) => out.push(format!("{k} names other contents than the checkpoint's run read")),
                (Some(_), None) => out.push(format!("{k} is given, the checkpoint's run had none")),
                (None, _) => out.push(format!("{k} is not given, the checkpoint's run had one")),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Args {
        lr: f64,
        auxk_alpha: f64,
        #[serde(skip)]
        #[allow(dead_code)]
        out: String,
        acts: Option<std::path::PathBuf>,
    }

    #[test]
    fn differences_name_each_changed_flag_and_input() {
        let dir = std::env::temp_dir().join(format!("scae-runcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("acts.bin");
        std::fs::write(&f, b"one").unwrap();
        let a = Args { lr: 1e-3, auxk_alpha: 0.0, out: "x".into(), acts: Some(f.clone()) };
        let saved = RunConfig::new(&a, &[("--acts", a.acts.as_deref())], 10).unwrap();
        assert!(!saved.flags.contains_key("--out") && !saved.flags.contains_key("--acts"));
        assert_eq!(saved.flags["--lr"], serde_json::json!(1e-3));
        // Another output folder and another spelling of the same number: the same run.
        let b = Args { lr: 0.001, auxk_alpha: 0.0, out: "y".into(), acts: Some(f.clone()) };
        assert!(RunConfig::new(&b, &[("--acts", b.acts.as_deref())], 20).unwrap().differences(&saved).is_empty());
        let c = Args { lr: 1e-3, auxk_alpha: 0.5, out: "x".into(), acts: Some(f.clone()) };
        let d = RunConfig::new(&c, &[("--acts", c.acts.as_deref())], 10).unwrap().differences(&saved);
        assert_eq!(d, ["--auxk-alpha is 0.5, the checkpoint's run used 0.0"]);
        std::fs::write(&f, b"two").unwrap();
        let d = RunConfig::new(&a, &[("--acts", a.acts.as_deref())], 10).unwrap().differences(&saved);
        assert_eq!(d, ["--acts names other contents than the checkpoint's run read"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
