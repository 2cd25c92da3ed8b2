//! `train-suite`'s loop: standard TopK training of every module on its own input and target
//! (`attn_L`: SAE on `hook_attn_out`; `mlp_L`: transcoder `ln2.hook_normalized ->
//! hook_mlp_out`), from the reference's initialisation with `b_dec` = the geometric median of
//! the first batch's targets. Per step: unit-norm decoder columns, forward and backward
//! ([`crate::sae::step`]), per-module clipping, removal of the decoder-gradient component
//! parallel to each column, one Adam step.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use super::checkpoints::{resume, CheckpointPolicy, TrainRun};
use super::data::TrainData;
use super::dead::DeadTracker;
use super::optim::{clip_module, clip_module_t, DeviceOptimizer, Optimizer, OptimizerKind};
use super::{metrics_record, After, RunSummary, Schedule, Session, StepReport};
use crate::data::Batch;
use crate::error::Result;
use crate::formats::suite::Suite;
use crate::model::{Kind, Module};
use crate::sae::decoder::{
    normalize_decoder, normalize_decoder_t, remove_parallel_component, remove_parallel_component_t,
};
use crate::sae::init::{geometric_median, init_params};
use crate::sae::step::{step, step_t};
use crate::sae::{fired, AeParams};
use crate::util::rng::SplitMix;
use crate::util::to_vec;

/// What the suite is trained for.
#[derive(Debug, Clone)]
pub struct SuiteShape {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_features: usize,
    pub k: usize,
    pub model_id: String,
    pub model_hash: String,
}

/// Estimated peak bytes of pretraining `2·n_layers` modules of `n_features` features on
/// `d_model` dimensions over `tokens` tokens per step on the CPU: parameters, gradients and
/// both Adam moments per module, plus about three (tokens × features) buffers per module
/// (pre-activations, codes, their gradient). In f64 so that absurd sizes cannot overflow.
pub fn footprint(n_layers: usize, d_model: usize, n_features: f64, tokens: f64) -> f64 {
    let (d, f) = (d_model as f64, n_features);
    let per_module = 4.0 * (2.0 * f * d + f + d) + 3.0 * tokens * f;
    4.0 * 2.0 * n_layers as f64 * per_module
}

/// A validated `train-suite` run.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    pub out: PathBuf,
    pub shape: SuiteShape,
    pub batch_size: usize,
    pub schedule: Schedule,
    pub auxk_alpha: f64,
    pub dead_threshold: u64,
    /// The CPU engine (host buffers), else autograd on `device` in `dtype`.
    pub use_engine: bool,
    pub dtype: DType,
    pub seed: u64,
    pub checkpoints: CheckpointPolicy,
    pub overwrite: bool,
    /// What a resume must repeat (recorded in checkpoints and in the suite's config.json).
    pub run: crate::formats::runconfig::RunConfig,
    /// The suite's lineage (the data it is trained on).
    pub lineage: crate::formats::suite::Lineage,
    /// Recorded in the suite's config.json.
    pub created_by: String,
    pub args: serde_json::Value,
}

impl PretrainConfig {
    /// The run's plumbing: folder, checkpoints, what a resume must repeat.
    pub fn train_run(&self) -> TrainRun {
        TrainRun {
            out: self.out.clone(),
            tool: "train-suite",
            run: self.run.clone(),
            policy: self.checkpoints,
            schedule: self.schedule.clone(),
            batch_size: self.batch_size as u64,
            overwrite: self.overwrite,
        }
    }
}

/// Each module's (input, target) of a batch: `attn_L` reconstructs its input, `mlp_L` maps
/// `ln2.hook_normalized` to `hook_mlp_out`.
fn module_pair<'b>(b: &'b Batch, m: &Module) -> (&'b Tensor, &'b Tensor) {
    match m.kind {
        Kind::Attn => (&b.attn_out[m.layer], &b.attn_out[m.layer]),
        Kind::Mlp => (&b.ln2_normalized[m.layer], &b.mlp_out[m.layer]),
    }
}

/// The settings of one pretraining step.
#[derive(Debug, Clone, Copy)]
pub struct UpdateConfig {
    pub d: usize,
    pub f: usize,
    pub k: usize,
    pub auxk_alpha: f64,
    /// Per-module gradient-norm clip (`None`: no clipping).
    pub clip: Option<f64>,
}

/// One host training step of every module on its `(x, y)` pair `(N, D)` (the CPU path): unit-norm
/// decoders, forward and backward, clipping, removal of the decoder-gradient component parallel
/// to each column, one optimizer step with `lr`. `loss` is left 0.
pub fn update_host(
    params: &mut [AeParams<Vec<f32>>],
    opt: &mut Optimizer,
    data: &[(&[f32], &[f32])],
    dead: &[Vec<bool>],
    cfg: UpdateConfig,
    lr: f64,
) -> StepReport {
    let UpdateConfig { d, f, k, .. } = cfg;
    // Modules are independent: their steps run side by side (each also parallel inside), so
    // their serial parts overlap; every result is the same as one module at a time.
    let outs: Vec<_> = params
        .par_iter_mut()
        .enumerate()
        .map(|(m, p)| {
            normalize_decoder(&mut p.w_dec, d, f);
            let (x, y) = data[m];
            let mut s = step(p, x, y, d, f, k, &dead[m], cfg.auxk_alpha);
            if let Some(c) = cfg.clip {
                clip_module(&mut s.grads, c);
            }
            remove_parallel_component(&p.w_dec, &mut s.grads.w_dec, d, f);
            s
        })
        .collect();
    let mut report = StepReport { fvu: Some(Vec::new()), auxk: Some(Vec::new()), ..StepReport::default() };
    let mut grads = Vec::with_capacity(params.len());
    for s in outs {
        report.fvu.as_mut().expect("set").push(s.fvu);
        report.auxk.as_mut().expect("set").push(s.auxk);
        report.fired.push(fired(&s.idx, &s.val, f));
        grads.push(s.grads);
    }
    opt.step(params, &grads, lr);
    report
}

/// [`update_host`] on the device (the autograd path), the pass in `dtype`.
pub fn update_device(
    vars: &[AeParams<Var>],
    opt: &mut DeviceOptimizer,
    data: &[(Tensor, Tensor)],
    dead: &[Vec<bool>],
    cfg: UpdateConfig,
    lr: f64,
    dtype: DType,
) -> Result<StepReport> {
    for v in vars {
        normalize_decoder_t(&v.w_dec)?;
    }
    let (values, mut grads) = step_t(vars, data, dead, cfg.k, cfg.auxk_alpha, dtype)?;
    for (vs, g) in vars.iter().zip(grads.iter_mut()) {
        if let Some(c) = cfg.clip {
            clip_module_t(g, c)?;
        }
        g.w_dec = remove_parallel_component_t(vs.w_dec.as_tensor(), &g.w_dec)?;
    }
    opt.step(vars, &grads, lr)?;
    Ok(StepReport { fvu: Some(values.fvu), auxk: Some(values.auxk), fired: values.fired, ..StepReport::default() })
}

/// Train a suite on `data` as `cfg` says and write it to `cfg.out`.
pub fn run(data: &mut TrainData, cfg: &PretrainConfig, device: &Device) -> Result<RunSummary> {
    let SuiteShape { d_model: d, n_layers, n_features: f, k, .. } = cfg.shape;
    let ctx = data.ctx_len();
    let modules = Module::all(n_layers);
    let tr = cfg.train_run();
    let dir = tr.prepare_dir()?;
    let mut rng = SplitMix(cfg.seed);
    let mut params: Vec<AeParams<Vec<f32>>> = modules.iter().map(|_| init_params(d, f, &mut rng)).collect();
    let mut opt = Optimizer::new(OptimizerKind::Adam, &params);
    let mut dead = DeadTracker::new(modules.len(), f, cfg.dead_threshold);
    let (mut step, mut seqs_seen) = (0u64, 0u64);
    let steps = cfg.schedule.steps;
    // A fresh run reads its first batch before the loop (for b_dec) and trains on it first.
    let mut first_batch = None;
    if cfg.checkpoints.resume {
        let suite = Suite::from_params(&params, &modules, k, d, f)?;
        let st = resume(&tr, &suite, &mut params, &mut opt, &mut dead)?;
        step = st.step;
        seqs_seen = st.seqs_seen;
        crate::note!("train-suite: resuming at step {step} of {steps}");
    } else {
        // b_dec = geometric median of the first batch's targets (up to 4096 tokens).
        let batch0 = data.batch(0, cfg.batch_size)?;
        for (p, m) in params.iter_mut().zip(&modules) {
            let y = to_vec(module_pair(&batch0, m).1)?;
            let take = (4096 * d).min(y.len());
            p.b_dec = geometric_median(&y[..take], d);
        }
        first_batch = Some(batch0);
    }
    let tokens_per_step = (cfg.batch_size * ctx) as u64;
    let mut session = Session::open(dir, &tr, step, tokens_per_step)?;
    // The autograd path keeps parameters and optimizer state on the device.
    let (vars, mut dopt) = if cfg.use_engine {
        (Vec::new(), None)
    } else {
        let vars = params.iter().map(|p| AeParams::<Var>::from_host(p, d, f, device)).collect::<Result<Vec<_>>>()?;
        let dopt = DeviceOptimizer::from_host(&opt, &vars)?;
        (vars, Some(dopt))
    };
    while step < steps {
        let batch = match first_batch.take() {
            Some(b) => b,
            None => data.batch(seqs_seen, cfg.batch_size)?,
        };
        let masks: Vec<Vec<bool>> = (0..modules.len()).map(|mi| dead.dead(mi)).collect();
        let lr_t = cfg.schedule.lr_at(step);
        let ucfg = UpdateConfig { d, f, k, auxk_alpha: cfg.auxk_alpha, clip: cfg.schedule.clip };
        let mut report = match dopt.as_mut() {
            Some(dopt) => {
                let n = batch.tokens.elem_count();
                let data = modules
                    .iter()
                    .map(|m| {
                        let (x, y) = module_pair(&batch, m);
                        Ok((x.reshape((n, d))?, y.reshape((n, d))?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                update_device(&vars, dopt, &data, &masks, ucfg, lr_t, cfg.dtype)?
            }
            None => {
                // An SAE's input is its target: one host copy serves both.
                let data = modules
                    .iter()
                    .map(|m| {
                        let (x, y) = module_pair(&batch, m);
                        Ok((to_vec(x)?, if m.kind == Kind::Attn { None } else { Some(to_vec(y)?) }))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<(&[f32], &[f32])> =
                    data.iter().map(|(x, y)| (x.as_slice(), y.as_deref().unwrap_or(x))).collect();
                update_host(&mut params, &mut opt, &refs, &masks, ucfg, lr_t)
            }
        };
        for (mi, fired) in report.fired.iter().enumerate() {
            dead.update(mi, tokens_per_step, fired);
        }
        let (fvu, auxk) = (report.fvu.as_deref().unwrap_or(&[]), report.auxk.as_deref().unwrap_or(&[]));
        report.loss = fvu.iter().zip(auxk).map(|(fv, ax)| fv + cfg.auxk_alpha * ax).sum();
        session.check_step(step, &report, &modules)?;
        session.log(metrics_record(step, lr_t, &report, &modules, &dead), &report)?;
        step += 1;
        seqs_seen += cfg.batch_size as u64;
        let next = session.after_step(step, &cfg.schedule, |ckpt| {
            if let Some(dopt) = &dopt {
                params = vars.iter().map(AeParams::to_host).collect::<Result<Vec<_>>>()?;
                opt = dopt.to_host()?;
            }
            ckpt.save(&Suite::from_params(&params, &modules, k, d, f)?, &opt, &dead, step, seqs_seen)
        })?;
        match next {
            After::Continue => {}
            After::Halt => return Ok(session.halted(steps)),
            After::Interrupted => return Err(session.interrupted(step)),
        }
    }
    session.finish(steps, || {
        if dopt.is_some() {
            params = vars.iter().map(AeParams::to_host).collect::<Result<Vec<_>>>()?;
        }
        // The saved decoder has unit-norm columns, as every forward pass saw it.
        for p in params.iter_mut() {
            normalize_decoder(&mut p.w_dec, d, f);
        }
        let mut suite = Suite::from_params(&params, &modules, k, d, f)?;
        suite.model_id = Some(cfg.shape.model_id.clone());
        suite.model_hash = Some(cfg.shape.model_hash.clone());
        suite.lineage = cfg.lineage.clone();
        suite.save(&cfg.out, &cfg.created_by, cfg.args.clone())
    })
}
