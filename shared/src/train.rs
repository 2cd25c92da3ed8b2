//! Training machinery shared by `train-suite` and `finetune`: parameters as flat buffers,
//! Adam/SGD with PyTorch's update order, the reference's learning-rate schedule and per-module
//! gradient clipping, dead-feature counters, and checkpoints that make a resumed run end
//! bit-identical to an uninterrupted one.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::engine::ModuleGrads;
use crate::error::{Error, IoContext, Result};
use crate::suite::Suite;

/// `format` of a checkpoint's state.json.
pub const CHECKPOINT_FORMAT: &str = "scae-checkpoint";
/// Current checkpoint version.
pub const CHECKPOINT_VERSION: u32 = 1;

/// The suite's parameters as flat buffers, per module: `[w_enc (F·D), b_enc (F), w_dec (D·F),
/// b_dec (D)]` — the layouts of the suite's tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub modules: Vec<[Vec<f32>; 4]>,
}

impl Params {
    /// Copy the suite's current values.
    pub fn from_suite(suite: &Suite) -> Result<Params> {
        let v = crate::engine::to_vec;
        let modules = suite
            .aes
            .iter()
            .map(|ae| {
                Ok([
                    v(ae.w_enc.as_tensor())?,
                    v(ae.b_enc.as_tensor())?,
                    v(ae.w_dec.as_tensor())?,
                    v(ae.b_dec.as_tensor())?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Params { modules })
    }

    /// Write these values into the suite's variables.
    pub fn store(&self, suite: &Suite) -> Result<()> {
        for (ae, p) in suite.aes.iter().zip(&self.modules) {
            for (var, vals) in [(&ae.w_enc, &p[0]), (&ae.b_enc, &p[1]), (&ae.w_dec, &p[2]), (&ae.b_dec, &p[3])] {
                let t = Tensor::from_vec(vals.clone(), var.as_tensor().shape(), var.as_tensor().device())?;
                var.set(&t)?;
            }
        }
        Ok(())
    }
}

/// Gradients in the same layout as [`Params`].
pub fn grads_layout(grads: Vec<ModuleGrads>) -> Vec<[Vec<f32>; 4]> {
    grads.into_iter().map(|g| [g.w_enc, g.b_enc, g.w_dec, g.b_dec]).collect()
}

/// `g ← g · min(1, max_norm / (‖g‖₂ + 1e-6))` over all of one module's gradients
/// (`torch.nn.utils.clip_grad_norm_` on `ae.parameters()`).
pub fn clip_module(g: &mut [Vec<f32>; 4], max_norm: f64) {
    let norm = g.iter().flatten().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        g.iter_mut().flatten().for_each(|x| *x *= coef);
    }
}

/// The reference's LambdaLR factor for step `t` (0-based): linear warmup to `warmup·steps`,
/// constant until `decay_start·steps`, then linear to 0 at `steps` (SPEC §6).
pub fn lr_factor(t: u64, steps: u64, warmup: f64, decay_start: f64) -> f64 {
    let w = warmup * steps as f64;
    let dc = decay_start * steps as f64;
    let t = t as f64;
    if t < w {
        t / w
    } else if t < dc {
        1.0
    } else {
        ((steps as f64 - t) / (steps as f64 - dc)).max(0.0)
    }
}

/// `base / sqrt(F / 2^14)`: the reference's feature-count scaling of the learning rate.
pub fn scaled_lr(base: f64, n_features: usize) -> f64 {
    base / (n_features as f64 / 16384.0).sqrt()
}

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Sgd,
}

/// Optimizer state for every parameter (Adam moments; nothing for SGD).
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Optimizer steps taken.
    pub t: u64,
    pub m: Vec<[Vec<f32>; 4]>,
    pub v: Vec<[Vec<f32>; 4]>,
}

impl Optimizer {
    /// Fresh state for `params` (Adam: β = (0.9, 0.999), ε = 1e-8, as torch's defaults).
    pub fn new(kind: OptimizerKind, params: &Params) -> Optimizer {
        let zeros = |p: &[Vec<f32>; 4]| -> [Vec<f32>; 4] { [0, 1, 2, 3].map(|i| vec![0f32; p[i].len()]) };
        let (m, v) = match kind {
            OptimizerKind::Adam => {
                (params.modules.iter().map(zeros).collect(), params.modules.iter().map(zeros).collect())
            }
            OptimizerKind::Sgd => (Vec::new(), Vec::new()),
        };
        Optimizer { kind, beta1: 0.9, beta2: 0.999, eps: 1e-8, t: 0, m, v }
    }

    /// One update of every parameter with learning rate `lr` (torch.optim.Adam / SGD order
    /// of operations).
    pub fn step(&mut self, params: &mut Params, grads: &[[Vec<f32>; 4]], lr: f64) {
        self.t += 1;
        match self.kind {
            OptimizerKind::Sgd => {
                for (p, g) in params.modules.iter_mut().zip(grads) {
                    for (pv, gv) in p.iter_mut().zip(g) {
                        pv.iter_mut().zip(gv).for_each(|(x, d)| *x -= (lr as f32) * d);
                    }
                }
            }
            OptimizerKind::Adam => {
                // torch.optim.Adam (single-tensor): m.lerp_(g, 1 − β1); v.mul_(β2).addcmul_(g, g,
                // 1 − β2); denom = sqrt(v) / sqrt(bc2) + eps; p.addcdiv_(m, denom, −lr / bc1),
                // with the scalars formed in f64 and applied in f32.
                let b2 = self.beta2 as f32;
                let (c1, c2) = ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
                let bc1 = 1.0 - self.beta1.powi(self.t as i32);
                let bc2 = 1.0 - self.beta2.powi(self.t as i32);
                let step_size = (lr / bc1) as f32;
                let bc2_sqrt = bc2.sqrt() as f32;
                let eps = self.eps as f32;
                for (mi, (p, g)) in params.modules.iter_mut().zip(grads).enumerate() {
                    for j in 0..4 {
                        let (m, v) = (&mut self.m[mi][j], &mut self.v[mi][j]);
                        for (((x, &d), mm), vv) in p[j].iter_mut().zip(&g[j]).zip(m.iter_mut()).zip(v.iter_mut()) {
                            *mm += c1 * (d - *mm);
                            *vv = *vv * b2 + c2 * (d * d);
                            let denom = vv.sqrt() / bc2_sqrt + eps;
                            *x -= step_size * (*mm / denom);
                        }
                    }
                }
            }
        }
    }
}

/// Tokens since each feature last fired, per module (SPEC B6 decision: tokens counted in
/// every mode; a feature fires only with a non-zero value).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadTracker {
    pub since: Vec<Vec<u64>>,
    pub threshold: u64,
}

impl DeadTracker {
    /// Counters for `n_modules` modules of `n_features`.
    pub fn new(n_modules: usize, n_features: usize, threshold: u64) -> DeadTracker {
        DeadTracker { since: vec![vec![0; n_features]; n_modules], threshold }
    }

    /// Add a batch of `n_tokens` whose firing features (non-zero values) are `idx[j]` where
    /// `val[j] != 0`.
    pub fn update(&mut self, module: usize, n_tokens: u64, idx: &[u32], val: &[f32]) {
        let s = &mut self.since[module];
        s.iter_mut().for_each(|x| *x += n_tokens);
        for (&i, &v) in idx.iter().zip(val) {
            if v != 0.0 {
                s[i as usize] = 0;
            }
        }
    }

    /// Add a batch of `n_tokens` in which the features marked in `fired` had a non-zero value.
    pub fn update_fired(&mut self, module: usize, n_tokens: u64, fired: &[bool]) {
        for (s, &f) in self.since[module].iter_mut().zip(fired) {
            *s = if f { 0 } else { *s + n_tokens };
        }
    }

    /// Features of `module` dead now (`since > threshold`).
    pub fn dead(&self, module: usize) -> Vec<bool> {
        self.since[module].iter().map(|&s| s > self.threshold).collect()
    }

    /// Number of dead features of `module`.
    pub fn n_dead(&self, module: usize) -> usize {
        self.since[module].iter().filter(|&&s| s > self.threshold).count()
    }
}

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
    /// Digest of the arguments that must not change across a resume.
    pub args_digest: String,
}

/// A training loop's checkpoints: when one is due (every `--checkpoint-every` steps and after
/// the last step when checkpointing, or to stop at `--halt-after`), writing it, and what a
/// failed step says about the last one written.
pub struct Checkpoints {
    dir: RunDir,
    tool: &'static str,
    digest: String,
    every: Option<u64>,
    halt_after: Option<u64>,
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
    pub fn new(
        dir: RunDir,
        tool: &'static str,
        digest: String,
        run: &crate::cli::RunArgs,
        start_step: u64,
    ) -> Checkpoints {
        Checkpoints {
            dir,
            tool,
            digest,
            every: run.checkpoint_every,
            halt_after: run.halt_after,
            start_step,
            last: run.resume.then_some(start_step),
        }
    }

    /// What to do once `step` of `steps` steps are done.
    pub fn due(&self, step: u64, steps: u64) -> Due {
        let halt = self.halt_after.is_some_and(|h| step - self.start_step >= h);
        Due { save: halt || self.every.is_some_and(|n| step % n == 0 || step == steps), halt: halt && step < steps }
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
        let state = RunState {
            format: CHECKPOINT_FORMAT.into(),
            version: CHECKPOINT_VERSION,
            tool: self.tool.into(),
            step,
            seqs_seen,
            opt_t: opt.t,
            args_digest: self.digest.clone(),
        };
        save_checkpoint(&self.dir.out, suite, opt, dead, &state)?;
        self.last = Some(step);
        self.dir.keep();
        Ok(())
    }

    /// The run's result is written: keep its folder.
    pub fn finish(mut self) {
        self.dir.keep();
    }

    /// The one-line error of step `step` whose loss is not finite.
    pub fn non_finite(&self, step: u64, loss: f64) -> String {
        let keep = match self.last {
            Some(s) => {
                format!("the last good checkpoint ({}, step {s}) is kept", self.dir.out.join("checkpoint").display())
            }
            None => "no checkpoint was written".to_string(),
        };
        format!("step {step}: loss is {loss}; stopping ({keep}); hint: lower --lr")
    }

    /// Tell the user how to go on after a halt at `step`.
    pub fn report_halt(&self, step: u64) {
        eprintln!("{}: halted after step {step} (checkpoint kept); continue with --resume", self.tool);
    }
}

/// Write a checkpoint into `dir/checkpoint` atomically: build `checkpoint.tmp`, then swap it in,
/// keeping the previous one until the new one is complete.
pub fn save_checkpoint(
    dir: &Path,
    suite: &Suite,
    opt: &Optimizer,
    dead: &DeadTracker,
    state: &RunState,
) -> Result<PathBuf> {
    let final_dir = dir.join("checkpoint");
    let tmp = dir.join("checkpoint.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    suite.save(&tmp, &state.tool, serde_json::json!({"checkpoint_step": state.step}))?;
    let dev = Device::Cpu;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let names: Vec<String> = suite.named_vars().into_iter().map(|(k, _)| k).collect();
    // named_vars order per module: b_dec, encoder.weight, encoder.bias, decoder.weight
    let order = [3usize, 0, 1, 2];
    for (mi, chunk) in names.chunks(4).enumerate() {
        for (slot, name) in order.iter().zip(chunk) {
            if opt.kind == OptimizerKind::Adam {
                tensors.push((
                    format!("m.{name}"),
                    Tensor::from_vec(opt.m[mi][*slot].clone(), opt.m[mi][*slot].len(), &dev)?,
                ));
                tensors.push((
                    format!("v.{name}"),
                    Tensor::from_vec(opt.v[mi][*slot].clone(), opt.v[mi][*slot].len(), &dev)?,
                ));
            }
        }
        let since: Vec<i64> = dead.since[mi].iter().map(|&s| s as i64).collect();
        tensors.push((format!("dead.{}", suite.modules[mi]), Tensor::from_vec(since, dead.since[mi].len(), &dev)?));
    }
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    crate::io::write_atomic(&tmp.join("state.json"), json.as_bytes())?;
    let old = dir.join("checkpoint.old");
    if final_dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        std::fs::rename(&final_dir, &old).at(&old)?;
    }
    std::fs::rename(&tmp, &final_dir).at(&final_dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    Ok(final_dir)
}

/// Read a checkpoint written by [`save_checkpoint`] into `suite`, `opt` and `dead`.
pub fn load_checkpoint(
    dir: &Path,
    suite: &Suite,
    opt: &mut Optimizer,
    dead: &mut DeadTracker,
    tool: &str,
    args_digest: &str,
) -> Result<RunState> {
    let ck = dir.join("checkpoint");
    let state_path = ck.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        Error::input(&state_path, format!("cannot read checkpoint state: {e}; hint: run without --resume"))
    })?;
    let state: RunState = serde_json::from_str(&text)
        .map_err(|e| Error::input(&state_path, format!("malformed checkpoint state: {e}")))?;
    if state.format != CHECKPOINT_FORMAT || state.version != CHECKPOINT_VERSION || state.tool != tool {
        return Err(Error::input(
            &state_path,
            format!(
                "{} v{} from {}, expected {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} from {tool}",
                state.format, state.version, state.tool
            ),
        ));
    }
    if state.args_digest != args_digest {
        return Err(Error::input(
            &state_path,
            "written with different arguments (data, suite, connections, loss, optimizer, schedule or sizes); hint: resume with the same arguments",
        ));
    }
    let saved = Suite::load(&ck, &Device::Cpu)?;
    Params::from_suite(&saved)?.store(suite)?;
    let opt_path = ck.join("optimizer.safetensors");
    let t = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .map_err(|e| Error::input(&opt_path, format!("not readable: {e}")))?;
    let get = |k: &str| -> Result<Tensor> {
        t.get(k).cloned().ok_or_else(|| Error::input(&opt_path, format!("missing tensor `{k}`")))
    };
    let names: Vec<String> = suite.named_vars().into_iter().map(|(k, _)| k).collect();
    let order = [3usize, 0, 1, 2];
    for (mi, chunk) in names.chunks(4).enumerate() {
        if opt.kind == OptimizerKind::Adam {
            for (slot, name) in order.iter().zip(chunk) {
                opt.m[mi][*slot] = get(&format!("m.{name}"))?.to_vec1::<f32>()?;
                opt.v[mi][*slot] = get(&format!("v.{name}"))?.to_vec1::<f32>()?;
            }
        }
        dead.since[mi] =
            get(&format!("dead.{}", suite.modules[mi]))?.to_vec1::<i64>()?.into_iter().map(|v| v as u64).collect();
    }
    opt.t = state.opt_t;
    Ok(state)
}

/// A stable digest of a JSON value (for [`RunState::args_digest`]).
pub fn digest(v: &serde_json::Value) -> String {
    blake3::hash(v.to_string().as_bytes()).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_the_reference_lambda() {
        // python: [lr_fn(t) for t in (0, 5, 10, 79, 80, 90, 99)] with steps=100, warm=0.1, decay=0.8
        let f = |t| lr_factor(t, 100, 0.1, 0.8);
        assert_eq!(f(0), 0.0);
        assert!((f(5) - 0.5).abs() < 1e-12);
        assert_eq!(f(10), 1.0);
        assert_eq!(f(79), 1.0);
        assert!((f(80) - 1.0).abs() < 1e-12);
        assert!((f(90) - 0.5).abs() < 1e-12);
        assert!((f(99) - 0.05).abs() < 1e-12);
        assert!((scaled_lr(1e-3, 3072) - 1e-3 * 2.309401).abs() < 1e-8);
    }

    #[test]
    fn adam_matches_closed_form_first_steps() {
        // First Adam step moves every parameter by lr·sign(g) (m̂ = g, v̂ = g²).
        let mut p = Params { modules: vec![[vec![1.0, -2.0], vec![0.5], vec![3.0], vec![0.0]]] };
        let g = vec![[vec![0.3, -4.0], vec![1e-3], vec![-2.0], vec![0.0]]];
        let mut opt = Optimizer::new(OptimizerKind::Adam, &p);
        opt.step(&mut p, &g, 0.1);
        let want = [0.9f32, -1.9, 0.4, 3.1, 0.0];
        let got: Vec<f32> = p.modules[0].iter().flatten().copied().collect();
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
        // torch forms 1 − β in f64 and applies it in f32: m = 0.1f32·g, v = 0.001f32·g² exactly
        let gs: Vec<f32> = g[0].iter().flatten().copied().collect();
        let (ms, vs): (Vec<f32>, Vec<f32>) =
            (opt.m[0].iter().flatten().copied().collect(), opt.v[0].iter().flatten().copied().collect());
        for ((x, m), v) in gs.iter().zip(&ms).zip(&vs) {
            assert_eq!(*m, 0.1f32 * x);
            assert_eq!(*v, 0.001f32 * (x * x));
        }
    }

    #[test]
    fn clipping_scales_the_whole_module() {
        let mut g = [vec![3.0f32], vec![4.0], vec![], vec![]];
        clip_module(&mut g, 1.0);
        assert!((g[0][0] - 0.6).abs() < 1e-5 && (g[1][0] - 0.8).abs() < 1e-5);
        let mut small = [vec![0.1f32], vec![], vec![], vec![]];
        clip_module(&mut small, 1.0);
        assert_eq!(small[0][0], 0.1);
    }
}

/// Prepare a training output folder: with `resume`, it must hold a checkpoint; otherwise it
/// must be absent or empty (or `overwrite`), and is created. On resume, metrics lines of steps
/// at or after the checkpoint's step are dropped by [`trim_metrics`].
pub fn prepare_run_dir(out: &Path, resume: bool, overwrite: bool) -> Result<RunDir> {
    if resume {
        if !out.join("checkpoint").join("state.json").is_file() {
            return Err(Error::input(out, "--resume: no checkpoint to resume from; hint: run without --resume"));
        }
        return Ok(RunDir { out: out.to_path_buf(), replaced: None, existed: true, kept: true });
    }
    let mut replaced = None;
    let mut existed = false;
    if out.exists() {
        if !out.is_dir() {
            return Err(Error::input(out, "--out: expected a folder, found a file"));
        }
        let non_empty = std::fs::read_dir(out).at(out)?.next().is_some();
        if non_empty && !overwrite {
            return Err(Error::input(
                out,
                "--out: folder exists and is not empty; hint: pass --overwrite, or --resume to continue",
            ));
        }
        if non_empty {
            // Moved aside until this run has something to show for itself.
            let aside = crate::io::sibling(out, ".replaced");
            if aside.exists() {
                std::fs::remove_dir_all(&aside).at(&aside)?;
            }
            std::fs::rename(out, &aside).at(&aside)?;
            replaced = Some(aside);
        } else {
            existed = true;
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::input(out, format!("--out: cannot create output folder: {e}")))?;
    Ok(RunDir { out: out.to_path_buf(), replaced, existed, kept: false })
}

/// The output folder of a training run. A fresh run that fails before it writes a checkpoint
/// or its result leaves nothing behind: dropping an unkept `RunDir` removes the folder's
/// contents and puts back the folder that `--overwrite` replaced. Once kept (a checkpoint to
/// resume from, or the final output), the folder stays.
#[must_use]
pub struct RunDir {
    out: PathBuf,
    /// The previous contents (`--overwrite`), until the run is kept.
    replaced: Option<PathBuf>,
    /// The folder existed (empty) before the run.
    existed: bool,
    kept: bool,
}

impl RunDir {
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

/// Keep only the metrics lines of steps before `step` (after a resume).
pub fn trim_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s < step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::write_atomic(path, kept.as_bytes())
}

/// A suite holding `params` (layout of [`Params`]).
pub fn suite_from_params(
    params: &Params,
    modules: &[crate::suite::Module],
    k: usize,
    d: usize,
    f: usize,
) -> Result<Suite> {
    let dev = Device::Cpu;
    let mut map = std::collections::HashMap::new();
    for (m, p) in modules.iter().zip(&params.modules) {
        let name = m.name();
        map.insert(format!("aes.{name}.encoder.weight"), Tensor::from_vec(p[0].clone(), (f, d), &dev)?);
        map.insert(format!("aes.{name}.encoder.bias"), Tensor::from_vec(p[1].clone(), f, &dev)?);
        map.insert(format!("aes.{name}.decoder.weight"), Tensor::from_vec(p[2].clone(), (d, f), &dev)?);
        map.insert(format!("aes.{name}.b_dec"), Tensor::from_vec(p[3].clone(), d, &dev)?);
    }
    Suite::from_tensors(Path::new("(training)"), map, k, f, None, None)
}
