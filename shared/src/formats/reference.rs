//! The Python reference's own artifacts (FORMATS.md, "The reference's files"):
//! - a suite folder (a Hugging Face repo such as `jacobcd52/TinyStories-33M_suite_4`):
//!   `config.json` (`k`, `n_features`, older repos `"connections": null`) and `checkpoint.pt`,
//!   `torch.save` of `SCAESuite.state_dict()` with keys `aes.<m>.{encoder.weight,
//!   encoder.bias, decoder.weight, b_dec}` (later branches: `module_dict.<m>.ae.<...>`), the
//!   language model under `model.*` (ignored), and an optional `connections` entry
//!   (`dict[down][up] -> int64 [F, C]`, `-1` padded). Training checkpoints wrap the state dict
//!   as `{"suite_state": ..., "step": ...}`.
//! - connection files: `top_connections_{C}.pkl` (`pickle.dump` of the same dict, storages as
//!   legacy `torch.save` blobs, usually tagged `cuda:0`) and `connections.pt`.
//!
//! And writing a `checkpoint.pt` in the reference's layout ([`write_checkpoint`]).
//!
//! A leaf over [`super::torch`]: it turns these files into named tensors and index tables
//! ([`RawSuite`], [`Table`]) and back; `formats::suite` and `formats::connections` build
//! their own types from them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::torch::pickle::Value;
use super::torch::{Dense, Dtype, Item, TorchFile};
use crate::error::{Error, Result};

/// Name of the checkpoint in a reference suite folder.
pub const CHECKPOINT: &str = "checkpoint.pt";
/// Key under which scae keeps its own suite config inside a reference `config.json` (so a
/// round trip scae -> reference -> scae is exact); the reference reads only `k` and `n_features`.
pub const SCAE_KEY: &str = "scae";

/// One `[F_down, C]` index table of the reference's layout (`-1` padded), for module pair
/// (down, up).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub down: String,
    pub up: String,
    pub shape: Vec<usize>,
    pub values: Vec<i64>,
}

/// Whether `dir` is a reference suite folder (a `checkpoint.pt`, and a config.json that is not scae's).
pub fn is_suite_dir(dir: &Path) -> bool {
    dir.join(CHECKPOINT).is_file() && !dir.join("suite.safetensors").is_file()
}

/// A reference suite folder as read: its parameters under scae's state-dict keys
/// (`aes.<m>.<p>`), `k` and `n_features` from its config, and what else it held.
#[derive(Debug)]
pub struct RawSuite {
    /// The checkpoint the tensors came from (named in errors).
    pub checkpoint: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub k: usize,
    pub n_features: usize,
    /// The checkpoint's `connections` entry, when it is not `None`.
    pub connections: Option<Vec<Table>>,
    /// scae's own suite config under [`SCAE_KEY`] in `config.json` (a folder convert-suite wrote).
    pub scae: Option<serde_json::Value>,
    pub report: LoadReport,
}

/// What loading a reference suite found besides the suite.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Key layout: `aes.*`, `module_dict.*.ae.*`, or a training checkpoint of either.
    pub layout: String,
    /// Entries under `model.*` (the language model), ignored.
    pub model_keys: usize,
    /// Other entries that are not suite parameters, ignored.
    pub other_keys: usize,
    /// The training step of a training checkpoint.
    pub step: Option<i64>,
}

fn positive(cfg: &serde_json::Value, key: &str, path: &Path) -> Result<usize> {
    match cfg.get(key) {
        None => Err(Error::input(path, format!("missing field `{key}` (a positive integer)"))),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| Error::input(path, format!("field `{key}`: expected a positive integer, found {v}"))),
    }
}

/// Candle tensor of a floating-point dense torch tensor (the caller refuses other dtypes).
fn to_candle(d: &Dense, device: &Device) -> candle_core::Result<Tensor> {
    let dtype = match d.dtype {
        Dtype::F64 => DType::F64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        _ => DType::F32,
    };
    Tensor::from_raw_buffer(&d.bytes, dtype, &d.shape, device)
}

/// The `dict[down][up] -> LongTensor` of a `connections` entry or file as tables.
fn tables_of(file: &mut TorchFile, v: &Value, what: &str) -> Result<Vec<Table>> {
    let path = file.path.clone();
    let Value::Dict(downs) = v else {
        return Err(Error::input(&path, format!("{what}: expected dict[down][up] -> tensor, found {}", v.kind())));
    };
    let mut tables = Vec::new();
    for (dk, ups) in downs {
        let down = dk
            .as_str()
            .ok_or_else(|| Error::input(&path, format!("{what}: a key is {}, not a module name", dk.kind())))?;
        let Value::Dict(ups) = ups else {
            return Err(Error::input(
                &path,
                format!("{what}[{down}]: expected a dict of tensors, found {}", ups.kind()),
            ));
        };
        for (uk, t) in ups {
            let up = uk.as_str().ok_or_else(|| {
                Error::input(&path, format!("{what}[{down}]: a key is {}, not a module name", uk.kind()))
            })?;
            let Value::Tensor(t) = t else {
                return Err(Error::input(
                    &path,
                    format!("{what}[{down}][{up}]: expected a tensor, found {}", t.kind()),
                ));
            };
            let dense = file.tensor(t)?;
            let values = dense.to_i64().ok_or_else(|| {
                Error::input(
                    &path,
                    format!("{what}[{down}][{up}]: expected int64 feature indices, found {:?}", dense.dtype),
                )
            })?;
            tables.push(Table { down: down.to_string(), up: up.to_string(), shape: dense.shape.clone(), values });
        }
    }
    Ok(tables)
}

/// The tables of a `.pkl` / `.pt` connections file.
pub fn read_connection_file(path: &Path) -> Result<Vec<Table>> {
    let mut file = TorchFile::open(path)?;
    let root = std::mem::replace(&mut file.root, Value::None);
    tables_of(&mut file, &root, "connections")
}

/// Read a reference suite folder: its parameters, embedded connections (if any) and what else
/// the checkpoint held.
pub fn load_suite(dir: &Path, device: &Device) -> Result<RawSuite> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        Error::input(
            &cfg_path,
            format!(
                "cannot read the suite's config: {e}; hint: the reference's training checkpoints (step_N/) have none: \
                 write {{\"k\": K, \"n_features\": F}} with the run's values there"
            ),
        )
    })?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::input(&cfg_path, format!("not valid JSON: {e}")))?;
    let k = positive(&cfg, "k", &cfg_path)?;
    let n_features = positive(&cfg, "n_features", &cfg_path)?;
    let ckpt = dir.join(CHECKPOINT);
    let mut file = TorchFile::open(&ckpt)?;
    let mut report = LoadReport::default();
    let root = std::mem::replace(&mut file.root, Value::None);
    // A training checkpoint wraps the state dict: take it out (no copy of the tree).
    let state = match root {
        Value::Dict(mut kv) if kv.iter().any(|(k, _)| k.as_str() == Some("suite_state")) => {
            report.step = kv.iter().find(|(k, _)| k.as_str() == Some("step")).and_then(|(_, v)| v.as_int());
            report.layout = "training checkpoint (suite_state), ".into();
            let at = kv.iter().position(|(k, _)| k.as_str() == Some("suite_state")).expect("present");
            kv.swap_remove(at).1
        }
        other => other,
    };
    let Value::Dict(entries) = &state else {
        return Err(Error::input(&ckpt, format!("expected a state dict, found {}", state.kind())));
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut embedded = None;
    let (mut flat, mut nested) = (0, 0);
    for (key, value) in entries {
        let Some(key) = key.as_str() else {
            report.other_keys += 1;
            continue;
        };
        if key == "connections" {
            if *value != Value::None {
                embedded = Some(tables_of(&mut file, value, "connections")?);
            }
            continue;
        }
        // `aes.<m>.<p>` or `module_dict.<m>.ae.<p>`.
        let name = if let Some(rest) = key.strip_prefix("aes.") {
            flat += 1;
            Some(format!("aes.{rest}"))
        } else if let Some(rest) = key.strip_prefix("module_dict.") {
            rest.split_once(".ae.").map(|(m, p)| {
                nested += 1;
                format!("aes.{m}.{p}")
            })
        } else {
            None
        };
        match (name, value) {
            (Some(name), Value::Tensor(t)) => {
                let dense = file.tensor(t)?;
                if !dense.dtype.is_float() {
                    return Err(Error::input(
                        &ckpt,
                        format!("tensor `{key}`: expected floating-point values, found {:?}", dense.dtype),
                    ));
                }
                tensors.insert(name, to_candle(&dense, device)?);
            }
            _ if key.starts_with("model.") || key.contains(".model.") => report.model_keys += 1,
            _ => report.other_keys += 1,
        }
    }
    if flat > 0 && nested > 0 {
        return Err(Error::input(&ckpt, "holds both `aes.*` and `module_dict.*.ae.*` parameters: which suite is it?"));
    }
    report.layout += if nested > 0 { "module_dict.<m>.ae.*" } else { "aes.<m>.*" };
    if let Some(w) = tensors.get("aes.attn_0.encoder.weight") {
        if w.dims().first() != Some(&n_features) {
            return Err(Error::input(
                &cfg_path,
                format!(
                    "field `n_features`: {n_features} disagrees with {} (aes.attn_0.encoder.weight is {:?})",
                    ckpt.display(),
                    w.dims()
                ),
            ));
        }
    }
    let scae = cfg.get(SCAE_KEY).cloned();
    Ok(RawSuite { checkpoint: ckpt, tensors, k, n_features, connections: embedded, scae, report })
}

fn dense_f32(t: &Tensor) -> Result<Dense> {
    let v = crate::util::to_vec(t)?;
    Ok(Dense { dtype: Dtype::F32, shape: t.dims().to_vec(), bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() })
}

/// Write `params` (state-dict key and tensor, in `SCAESuite`'s state-dict order: per module
/// `b_dec`, encoder weight and bias, decoder weight) and `tables` (grouped by down module in
/// the order of `downs`) as a reference suite folder's `checkpoint.pt`, `connections` last,
/// via a `.tmp` file.
pub fn write_checkpoint(
    path: &Path,
    params: &[(String, Tensor)],
    downs: &[String],
    tables: Option<&[Table]>,
) -> Result<()> {
    let mut entries = Vec::new();
    for (name, t) in params {
        entries.push((name.clone(), Item::Tensor(dense_f32(t)?)));
    }
    let conns = match tables {
        None => Item::None,
        Some(ts) => {
            let mut out: Vec<(String, Item)> = Vec::new();
            for down in downs {
                let ups: Vec<(String, Item)> = ts
                    .iter()
                    .filter(|t| &t.down == down)
                    .map(|t| {
                        let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                        (t.up.clone(), Item::Tensor(Dense { dtype: Dtype::I64, shape: t.shape.clone(), bytes }))
                    })
                    .collect();
                out.push((down.clone(), Item::Dict(ups, false)));
            }
            Item::Dict(out, false)
        }
    };
    entries.push(("connections".to_string(), conns));
    super::torch::save(path, &Item::Dict(entries, true))
}

/// The connections parquet a reference folder written by scae carries beside its checkpoint,
/// so that converting back restores it exactly (order, scores, metadata).
pub const SIDECAR: &str = "scae-connections.parquet";

/// The scae suite config stored under [`SCAE_KEY`] in a reference folder's `config.json`, if any.
pub fn scae_config(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get(SCAE_KEY).cloned()
}
