//! Training checkpoints (format `scae-checkpoint`, version 2; FORMATS.md): `<out>/checkpoint/`
//! (and `<out>/checkpoint-decay/`, the state where the learning rate starts to decay) holds the
//! suite as it stood (`suite.safetensors` + `config.json`), `optimizer.safetensors` (Adam
//! moments `m.<key>` / `v.<key>` per state-dict key, dead-feature counters `dead.<module>`),
//! and `state.json` ([`RunState`], with the run's configuration). A checkpoint is built in
//! `<name>.tmp` and swapped in, keeping the previous one until the new one is complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::formats::suite::Suite;
use crate::model::Module;
use crate::sae::AeParams;
use crate::util::io::HostArray;

/// `format` of a checkpoint's state.json.
pub const FORMAT: &str = "scae-checkpoint";
/// Current checkpoint version (2: the run's configuration replaced a digest of its arguments).
pub const VERSION: u32 = 2;
/// The latest checkpoint of a run.
pub const LATEST: &str = "checkpoint";
/// The checkpoint at the step where the learning rate starts to decay (kept so that a finished
/// run can be extended: see [`super::resume`]).
pub const DECAY: &str = "checkpoint-decay";

/// Everything besides parameters and optimizer moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub format: String,
    pub version: u32,
    /// Tool that wrote the checkpoint.
    pub tool: String,
    /// Steps completed.
    pub step: u64,
    /// Sequences consumed from the data so far (the data position).
    pub seqs_seen: u64,
    /// Optimizer steps taken (Adam bias correction).
    pub opt_t: u64,
    /// The run's configuration: what a resumed run must repeat.
    pub run: crate::formats::runconfig::RunConfig,
    /// A data-parallel run's ranks and the hash of the state every replica agreed on (absent
    /// for one process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Replicas>,
}

/// The replicas of a data-parallel run when a checkpoint was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replicas {
    /// Ranks of the job.
    pub ranks: usize,
    /// `train::parallel::replica_hash` of the state, equal on every rank (16 hex digits).
    pub state_hash: String,
}

/// Adam's first and second moments, per module.
pub type Moments<'a> = (&'a [AeParams<Vec<f32>>], &'a [AeParams<Vec<f32>>]);

/// What a checkpoint holds.
pub struct Checkpoint {
    pub state: RunState,
    /// The suite's parameters, per module.
    pub params: Vec<AeParams<Vec<f32>>>,
    /// Adam's moments (`None` for SGD).
    pub moments: Option<(Vec<AeParams<Vec<f32>>>, Vec<AeParams<Vec<f32>>>)>,
    /// Tokens since each feature last fired, per module.
    pub since: Vec<Vec<u64>>,
}

fn key(m: &Module, suffix: &str) -> String {
    format!("aes.{m}.{suffix}")
}

/// Write `dir/<name>` (`checkpoint` or `checkpoint-decay`) atomically (build `<name>.tmp`,
/// then swap it in).
pub fn write(
    dir: &Path,
    name: &str,
    suite: &Suite,
    moments: Option<Moments>,
    since: &[Vec<u64>],
    state: &RunState,
) -> Result<PathBuf> {
    let final_dir = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    // Finish a swap a crash cut short, so the newest complete checkpoint is `checkpoint`
    // while this one is built.
    crate::util::io::recover_swap(&tmp, &final_dir, super::complete_checkpoint)?;
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    suite.save(&tmp, &state.tool, serde_json::json!({"checkpoint_step": state.step}))?;
    // The moments are written from where they are (no copy).
    let mut tensors: HashMap<String, HostArray> = HashMap::new();
    for (mi, module) in suite.modules.iter().enumerate() {
        if let Some((m, v)) = moments {
            for ((name, mt), (_, vt)) in m[mi].named().into_iter().zip(v[mi].named()) {
                tensors.insert(format!("m.{}", key(module, name)), HostArray::F32(mt, vec![mt.len()]));
                tensors.insert(format!("v.{}", key(module, name)), HostArray::F32(vt, vec![vt.len()]));
            }
        }
        let s: Vec<i64> = since[mi].iter().map(|&s| s as i64).collect();
        tensors.insert(format!("dead.{module}"), HostArray::I64(s, vec![since[mi].len()]));
    }
    crate::util::io::write_safetensors(&tmp.join("optimizer.safetensors"), tensors, &Default::default())?;
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    crate::util::io::write_atomic(&tmp.join("state.json"), json.as_bytes())?;
    crate::util::io::fault_point("checkpoint:staged");
    crate::util::io::swap_in(&tmp, &final_dir)?;
    Ok(final_dir)
}

/// Read the state of checkpoint `dir/<name>`, written by `tool`.
pub fn read_state(dir: &Path, name: &str, tool: &str) -> Result<RunState> {
    let state_path = dir.join(name).join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        Error::input(&state_path, format!("cannot read checkpoint state: {e}; hint: run without --resume"))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(&state_path, format!("malformed checkpoint state: {e}")))?;
    let (format, version, by) = (v["format"].as_str(), v["version"].as_u64(), v["tool"].as_str());
    if format != Some(FORMAT) || version != Some(VERSION as u64) || by != Some(tool) {
        let old = if format == Some(FORMAT) && version.is_some_and(|v| v < VERSION as u64) {
            "; hint: written by an earlier scae, whose checkpoints cannot be checked against this run's flags: start the run anew (--overwrite)"
        } else {
            ""
        };
        return Err(Error::input(
            &state_path,
            format!(
                "{} v{} from {}, expected {FORMAT} v{VERSION} from {tool}{old}",
                format.unwrap_or("?"),
                version.unwrap_or(0),
                by.unwrap_or("?")
            ),
        ));
    }
    serde_json::from_value(v).map_err(|e| Error::input(&state_path, format!("malformed checkpoint state: {e}")))
}

/// Read checkpoint `dir/<name>` written by `tool` for a suite of `modules`, with Adam moments
/// when `with_moments`.
pub fn read(dir: &Path, name: &str, modules: &[Module], with_moments: bool, tool: &str) -> Result<Checkpoint> {
    let ck = dir.join(name);
    let state = read_state(dir, name, tool)?;
    let saved = Suite::load(&ck, &Device::Cpu)?;
    let params = saved.host_params()?;
    let opt_path = ck.join("optimizer.safetensors");
    let t = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .map_err(|e| Error::input(&opt_path, format!("not readable: {e}")))?;
    let get = |k: &str| -> Result<Tensor> {
        t.get(k).cloned().ok_or_else(|| Error::input(&opt_path, format!("missing tensor `{k}`")))
    };
    let mut since = Vec::with_capacity(modules.len());
    let (mut ms, mut vs) = (Vec::new(), Vec::new());
    let bad = |k: &str, what: String| Error::input(&opt_path, format!("tensor `{k}`: {what}"));
    // A tensor of `len` values of `dtype`, checked.
    let vector = |k: &str, dtype: DType, len: usize| -> Result<Tensor> {
        let t = get(k)?;
        if t.dtype() != dtype {
            return Err(bad(k, format!("expected {dtype:?}, found {:?}", t.dtype())));
        }
        if t.dims() != [len] {
            return Err(bad(k, format!("expected shape [{len}], found {:?}", t.dims())));
        }
        Ok(t)
    };
    for (mi, module) in modules.iter().enumerate() {
        if with_moments {
            let (mut m, mut v) = (params[mi].zeros_like(), params[mi].zeros_like());
            for ((name, mt), (_, vt)) in m.named_mut().into_iter().zip(v.named_mut()) {
                let (mk, vk) = (format!("m.{}", key(module, name)), format!("v.{}", key(module, name)));
                *mt = vector(&mk, DType::F32, mt.len())?.to_vec1::<f32>()?;
                *vt = vector(&vk, DType::F32, vt.len())?.to_vec1::<f32>()?;
                if !mt.iter().all(|x| x.is_finite()) {
                    return Err(bad(&mk, "expected finite Adam moments, found NaN or infinite ones".into()));
                }
                if !vt.iter().all(|x| x.is_finite() && *x >= 0.0) {
                    return Err(bad(&vk, "expected finite second moments >= 0".into()));
                }
            }
            ms.push(m);
            vs.push(v);
        }
        let dk = format!("dead.{module}");
        let counts = vector(&dk, DType::I64, params[mi].b_enc.len())?.to_vec1::<i64>()?;
        if let Some(c) = counts.iter().find(|c| **c < 0) {
            return Err(bad(&dk, format!("expected token counts >= 0, found {c}")));
        }
        since.push(counts.into_iter().map(|v| v as u64).collect());
    }
    Ok(Checkpoint { state, params, moments: with_moments.then_some((ms, vs)), since })
}
