//! `finetune`'s loop: train a suite through the pruned forward pass on local reconstruction
//! (`Σ_m FVU_m`), downstream CE with the suite spliced in, or both, with optional AuxK, stagger,
//! checkpoints and bit-identical resume. Each step runs on the CPU engine (f32 on the CPU) or
//! through autograd ([`super::autograd`]).

use std::path::PathBuf;

use candle_core::DType;

use super::autograd::{finetune_grads, LossSpec};
use super::checkpoints::{resume, CheckpointPolicy};
use super::data::TrainData;
use super::dead::DeadTracker;
use super::optim::{clip_module, clip_module_t, DeviceOptimizer, Optimizer, OptimizerKind};
use super::schedule::stagger_scale;
use super::{metrics_record, After, RunSummary, Schedule, Session, SessionSpec, StepReport};
use crate::data::{Batch, FlatBatch};
use crate::error::Result;
use crate::formats::connections::Connections;
use crate::inputs::Inputs;
use crate::pass::engine::Engine;
use crate::pass::loss::{ce_loss_and_grad, mse_per_module};
use crate::pass::{PassOptions, Plan, Wiring};
use crate::sae::AeParams;
use crate::util::io::RunDir;

/// Which loss to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Loss {
    /// Σ over modules of the reference's FVU (batch-axis variance).
    #[serde(rename = "mse")]
    Mse,
    /// Next-token CE with the suite spliced in.
    #[serde(rename = "ce")]
    Ce,
    /// mse + ce_weight · ce.
    #[value(name = "mse+ce")]
    #[serde(rename = "mse+ce")]
    MseCe,
}

/// A validated `finetune` run.
#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    pub out: PathBuf,
    pub loss: Loss,
    /// Weight of CE in `mse+ce`.
    pub ce_weight: f64,
    pub optimizer: OptimizerKind,
    pub batch_size: usize,
    /// Build the autograd graph this many sequences at a time.
    pub micro_batch: Option<usize>,
    pub schedule: Schedule,
    pub stagger_steps: Option<u64>,
    pub auxk_alpha: f64,
    pub dead_threshold: u64,
    /// The CPU engine, else autograd on the device in `dtype`.
    pub use_engine: bool,
    pub dtype: DType,
    pub pass: PassOptions,
    pub checkpoints: CheckpointPolicy,
    pub overwrite: bool,
    /// What a resume must repeat (recorded in checkpoints and in the suite's config.json).
    pub run: crate::formats::runconfig::RunConfig,
    /// Recorded in the suite's config.json.
    pub created_by: String,
    pub args: serde_json::Value,
    /// The finetuned suite's lineage (its parent, data, connections).
    pub lineage: crate::formats::suite::Lineage,
    /// The connections file's metadata (kept in the copy stored with the suite) and its path.
    pub connections_meta: Vec<(String, String)>,
    pub connections_source: Option<PathBuf>,
}

impl FinetuneConfig {
    /// The weight of the CE term, if the loss has one.
    fn ce_weight(&self) -> Option<f64> {
        match self.loss {
            Loss::Mse => None,
            Loss::Ce => Some(1.0),
            Loss::MseCe => Some(self.ce_weight),
        }
    }
}

/// Estimated peak bytes of one finetuning step over `seqs` sequences of `ctx` tokens (in f64,
/// so absurd sizes cannot overflow): per token, about four F-wide buffers per module (codes,
/// edge terms, their gradients), the model's activations (ten d_model-wide vectors and two
/// attention rows per layer) and one row of logits.
pub fn footprint(inputs: &Inputs, seqs: f64, ctx: f64) -> f64 {
    let cfg = &inputs.model.runtime.cfg;
    let (f, modules) = (inputs.suite.n_features as f64, inputs.suite.modules.len() as f64);
    let (d, l, h, v) = (cfg.d_model as f64, cfg.n_layers as f64, cfg.n_heads as f64, cfg.d_vocab as f64);
    4.0 * seqs * ctx * (4.0 * modules * f + l * (10.0 * d + 2.0 * h * ctx) + v)
}

/// One step on the CPU engine: forward, losses and their gradients w.r.t. the
/// reconstructions, backward, clipping, host optimizer step on `params` (the suite's variables
/// are left as they were: [`run`] copies `params` into them before it saves).
#[allow(clippy::too_many_arguments)]
fn engine_step(
    inputs: &Inputs,
    plan: &Plan,
    batch: &Batch,
    cfg: &FinetuneConfig,
    scales: &[f32],
    dead: &DeadTracker,
    params: &mut [AeParams<Vec<f32>>],
    opt: &mut Optimizer,
    lr: f64,
) -> Result<StepReport> {
    let (suite, rt) = (&inputs.suite, &inputs.model.runtime);
    let mut prof = crate::util::profile::Profile::new();
    let fb = FlatBatch::new(batch, &suite.modules)?;
    prof.mark("batch");
    let eng = Engine::with_params(suite, rt, plan, cfg.pass, params)?;
    prof.mark("engine");
    let dead_masks = aux_masks(cfg, scales, dead, suite.n_features);
    let mut state = match &dead_masks {
        Some(m) => eng.forward_with_dead(&fb, Some(m))?,
        None => eng.forward(&fb)?,
    };
    let d = suite.d_model;
    let mut report =
        StepReport { fired: state.modules.iter().map(|st| st.fired.clone()).collect(), ..StepReport::default() };
    let mut g_recon: Vec<Vec<f32>> = vec![vec![0f32; fb.b * fb.s * d]; suite.modules.len()];
    if cfg.loss != Loss::Ce {
        let (fvus, grads) = mse_per_module(&fb, &state.recons(), d);
        for (m, (fvu, g)) in fvus.iter().zip(grads).enumerate() {
            report.loss += scales[m] as f64 * fvu;
            g_recon[m].iter_mut().zip(&g).for_each(|(a, b)| *a += scales[m] * b);
        }
        report.fvu = Some(fvus);
        if cfg.auxk_alpha > 0.0 {
            let aux = eng.auxk_loss_and_grad(&fb, &mut state, cfg.auxk_alpha);
            report.loss += cfg.auxk_alpha * aux.iter().sum::<f64>();
            report.auxk = Some(aux);
        }
    }
    let mut extra = None;
    if let Some(w) = cfg.ce_weight() {
        // With unembed edges the CE also sends gradient past the reconstructions.
        let (ce, g) = match eng.unembed_ce_loss_and_grad(&fb, &state)? {
            Some((ce, g, rest)) => {
                extra = Some(rest.scaled(w as f32));
                (ce, g)
            }
            None => ce_loss_and_grad(rt, &fb, &state.recons(), d)?,
        };
        report.loss += w * ce;
        for gr in g_recon.iter_mut() {
            gr.iter_mut().zip(&g).for_each(|(a, b)| *a += w as f32 * b);
        }
        report.ce = Some(ce);
    }
    prof.mark("forward, loss");
    if !report.loss.is_finite() {
        return Ok(report);
    }
    let mut grads = eng.backward_with(&fb, &state, g_recon, extra)?;
    prof.mark("backward");
    if let Some(c) = cfg.schedule.clip {
        grads.iter_mut().for_each(|g| clip_module(g, c));
    }
    drop(eng); // it reads `params` in place
    opt.step(params, &grads, lr);
    prof.mark("clip, optimizer");
    prof.report("step");
    Ok(report)
}

/// AuxK's latents: dead as of the previous step, in modules whose loss term is on (`None`
/// without AuxK).
fn aux_masks(cfg: &FinetuneConfig, scales: &[f32], dead: &DeadTracker, f: usize) -> Option<Vec<Vec<bool>>> {
    (cfg.auxk_alpha > 0.0)
        .then(|| (0..scales.len()).map(|m| if scales[m] != 0.0 { dead.dead(m) } else { vec![false; f] }).collect())
}

/// Finetune `inputs.suite` on `data` with the connections `conns` (all when `None`) and write
/// it to `cfg.out`.
pub fn run(
    inputs: &Inputs,
    data: &mut TrainData,
    conns: Option<&Connections>,
    cfg: &FinetuneConfig,
    device: &candle_core::Device,
) -> Result<RunSummary> {
    let (suite, rt) = (&inputs.suite, &inputs.model.runtime);
    let ctx = data.ctx_len();
    let wiring = match conns {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let mut plan = Plan::new(suite, wiring, inputs.parallel(), device)?;
    if !cfg.use_engine {
        // The device-agnostic ops everywhere: on the CPU this runs exactly the GPU path's ops
        // (and deterministically, unlike the CPU custom ops' parallel backward).
        plan.force_composed(true);
    }
    let dir = RunDir::prepare(&cfg.out, cfg.checkpoints.resume, cfg.overwrite)?;
    let mut params = suite.host_params()?;
    let mut opt = Optimizer::new(cfg.optimizer, &params);
    let mut dead = DeadTracker::new(suite.modules.len(), suite.n_features, cfg.dead_threshold);
    let (mut step, mut seqs_seen) = (0u64, 0u64);
    let steps = cfg.schedule.steps;
    if cfg.checkpoints.resume {
        let st = resume(
            &cfg.out,
            "finetune",
            &cfg.run,
            &cfg.schedule,
            suite,
            cfg.batch_size as u64,
            &mut params,
            &mut opt,
            &mut dead,
        )?;
        suite.set_params(&params)?;
        step = st.step;
        seqs_seen = st.seqs_seen;
        crate::note!("finetune: resuming at step {step} of {steps}");
    }
    let vars = &suite.aes;
    let mut dopt = if cfg.use_engine { None } else { Some(DeviceOptimizer::from_host(&opt, vars)?) };
    let tokens_per_step = (cfg.batch_size * ctx) as u64;
    let spec = SessionSpec {
        tool: "finetune",
        run: cfg.run.clone(),
        policy: cfg.checkpoints,
        start_step: step,
        tokens_per_step,
    };
    let mut session = Session::open(dir, spec)?;
    while step < steps {
        // Next batch in data order (wrapping over epochs).
        let batch = data.batch(seqs_seen, cfg.batch_size)?;
        let scales: Vec<f32> = suite.modules.iter().map(|&m| stagger_scale(m, step, cfg.stagger_steps)).collect();
        let lr_t = cfg.schedule.lr_at(step);
        let report = match dopt.as_mut() {
            Some(dopt) => {
                let pass_batch = batch.with_pass_dtype(cfg.dtype)?;
                let spec = LossSpec {
                    fvu_scales: (cfg.loss != Loss::Ce).then(|| scales.clone()),
                    ce_weight: cfg.ce_weight(),
                    auxk: aux_masks(cfg, &scales, &dead, suite.n_features).map(|m| (cfg.auxk_alpha, m)),
                };
                let (report, mut grads) =
                    finetune_grads(suite, rt, &plan, &pass_batch, cfg.pass, &spec, cfg.micro_batch)?;
                if report.loss.is_finite() {
                    if let Some(c) = cfg.schedule.clip {
                        for g in grads.iter_mut() {
                            clip_module_t(g, c)?;
                        }
                    }
                    dopt.step(vars, &grads, lr_t)?;
                }
                report
            }
            None => engine_step(inputs, &plan, &batch, cfg, &scales, &dead, &mut params, &mut opt, lr_t)?,
        };
        for (m, fired) in report.fired.iter().enumerate() {
            if scales[m] != 0.0 {
                dead.update(m, tokens_per_step, fired);
            }
        }
        session.check_step(step, &report, &suite.modules)?;
        let mut record = metrics_record(step, lr_t, &report, &suite.modules, &dead);
        if let Some(ce) = report.ce {
            let clean = rt.forward(&batch.tokens, false, false)?.ce.mean_all()?.to_scalar::<f32>()? as f64;
            record["ce_diff"] = serde_json::json!(ce - clean);
        }
        session.log(record, &report)?;
        step += 1;
        seqs_seen += cfg.batch_size as u64;
        let next = session.after_step(step, &cfg.schedule, |ckpt| {
            if let Some(d) = &dopt {
                opt = d.to_host()?;
            }
            if dopt.is_none() {
                suite.set_params(&params)?;
            }
            ckpt.save(suite, &opt, &dead, step, seqs_seen)
        })?;
        match next {
            After::Continue => {}
            After::Halt => return Ok(session.halted(steps)),
            After::Interrupted => return Err(session.interrupted(step)),
        }
    }
    if dopt.is_none() {
        suite.set_params(&params)?;
    }
    session.finish(steps, || {
        let mut out_suite = suite.clone();
        out_suite.model_id = Some(inputs.model.id.clone());
        out_suite.model_hash = Some(inputs.model.hash.clone());
        out_suite.lineage = cfg.lineage.clone();
        out_suite.save(&cfg.out, &cfg.created_by, cfg.args.clone())?;
        // The suite carries the connections it was trained with: tools use them by default.
        let stored = cfg.out.join(crate::formats::suite::CONNECTIONS_FILE);
        match conns {
            Some(c) => {
                let keep = |k: &str| {
                    !["format", "version", "n_features", "modules", "source", "parallel_attn_mlp"].contains(&k)
                };
                let mut meta: Vec<(&str, String)> = cfg
                    .connections_meta
                    .iter()
                    .filter(|(k, _)| keep(k))
                    .map(|(k, v)| (k.as_str(), v.clone()))
                    .collect();
                if let Some(p) = &cfg.connections_source {
                    meta.push(("source", p.display().to_string()));
                }
                meta.push(("parallel_attn_mlp", inputs.parallel().to_string()));
                c.write_parquet(&stored, crate::formats::connections::FORMAT, &meta)
            }
            None if stored.exists() => std::fs::remove_file(&stored).map_err(|e| crate::error::Error::io(&stored, e)),
            None => Ok(()),
        }
    })
}
