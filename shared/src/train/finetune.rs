//! `finetune`'s loop: train a suite through the pruned forward pass on local reconstruction
//! (`Σ_m FVU_m`), downstream CE with the suite spliced in, or both, with optional AuxK, stagger,
//! checkpoints and bit-identical resume. Each step runs on the CPU engine (f32 on the CPU) or
//! through autograd ([`super::finetune_step`], both forms side by side).

use std::path::PathBuf;

use candle_core::DType;

use super::checkpoints::file::Replicas;
use super::checkpoints::{resume, CheckpointPolicy, TrainRun};
use super::data::TrainData;
use super::dead::DeadTracker;
use super::finetune_step::{autograd_grads, engine_step, LossSpec, StepInputs};
use super::optim::{clip_module_t, DeviceOptimizer, Optimizer, OptimizerKind};
use super::parallel::{agreed_hash, share_state};
use super::schedule::stagger_scale;
use super::{metrics_record, After, RunSummary, Schedule, Session};
use crate::error::Result;
use crate::formats::edges_meta::Key;
use crate::formats::suite::Suite;
use crate::inputs::{Chosen, Inputs};
use crate::model::Model;
use crate::pass::{PassOptions, Plan, Wiring};
use crate::util::collective::{my_slice, Collective};

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
}

impl FinetuneConfig {
    /// The run's plumbing: folder, checkpoints, what a resume must repeat.
    pub fn train_run(&self) -> TrainRun {
        TrainRun {
            out: self.out.clone(),
            tool: "finetune",
            run: self.run.clone(),
            policy: self.checkpoints,
            schedule: self.schedule.clone(),
            batch_size: self.batch_size as u64,
            overwrite: self.overwrite,
        }
    }
}

impl Loss {
    /// The weight of the CE term, if the loss has one (`ce_weight`: its weight in `mse+ce`).
    pub fn ce_weight(self, ce_weight: f64) -> Option<f64> {
        match self {
            Loss::Mse => None,
            Loss::Ce => Some(1.0),
            Loss::MseCe => Some(ce_weight),
        }
    }

    /// Whether the loss has the modules' FVU terms.
    pub fn has_mse(self) -> bool {
        self != Loss::Ce
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

/// The whole batch's rows of `part` (this rank's rows `(b, ..)` of a batch spread evenly over
/// the ranks of `coll`), in rank order, on every rank: each rank's rows placed in a zero buffer
/// and summed (adding zeros is exact).
fn gather_rows(coll: &dyn Collective, part: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    if coll.size() == 1 {
        return Ok(part.clone());
    }
    let rows = crate::util::to_vec(part)?;
    let mut all = vec![0f32; rows.len() * coll.size()];
    all[coll.rank() * rows.len()..][..rows.len()].copy_from_slice(&rows);
    coll.sum_f32(&mut all)?;
    let mut dims = part.dims().to_vec();
    dims[0] *= coll.size();
    Ok(candle_core::Tensor::from_vec(all, dims, part.device())?)
}

/// Finetune `suite` (opened for `model`, as [`Inputs`] opens them) on `data` with the connections
/// `chosen` (all when it holds no set) and write it to `cfg.out`.
///
/// On the CPU engine the run reads and updates host parameters of its own: `suite`'s variables
/// are emptied for the run (at GPT-2 small, F 24,576, a 3.6 GB copy) and each checkpoint and the
/// result are saved from a suite rebuilt from those parameters ([`Suite::with_params`]); the
/// autograd path trains `suite`'s variables in place.
///
/// Data-parallel over the ranks of `coll` (`mpirun -n N finetune ...`): `cfg.batch_size` is the
/// global batch, rank r computes its r-th slice of every step's sequences; the losses'
/// statistics and the gradients are added over the ranks inside the step, so the replicas stay
/// identical and the run is the one-process run up to the order of floating-point sums. Rank 0
/// owns the output folder; on resume it reads the checkpoint and sends the state to the others.
pub fn run(
    model: &Model,
    suite: &mut Suite,
    data: &mut TrainData,
    chosen: &Chosen,
    cfg: &FinetuneConfig,
    device: &candle_core::Device,
    coll: &dyn Collective,
) -> Result<RunSummary> {
    let rt = &model.runtime;
    let parallel = model.cfg().parallel_attn_mlp;
    let ctx = data.ctx_len();
    let (first, local) = my_slice(coll, cfg.batch_size, "--batch-size")?;
    let conns = chosen.set.as_ref();
    let wiring = match conns {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let mut plan = Plan::new(suite, wiring, parallel, device)?;
    if !cfg.use_engine {
        // The device-agnostic ops everywhere: on the CPU this runs exactly the GPU path's ops
        // (and deterministically, unlike the CPU custom ops' parallel backward).
        plan.force_composed(true);
    }
    let tr = cfg.train_run();
    let dir = if coll.rank() == 0 { Some(tr.prepare_dir()?) } else { None };
    let mut params = suite.host_params()?;
    let mut opt = Optimizer::new(cfg.optimizer, &params);
    let mut dead = DeadTracker::new(suite.modules.len(), suite.n_features, cfg.dead_threshold);
    let (mut step, mut seqs_seen) = (0u64, 0u64);
    let steps = cfg.schedule.steps;
    if cfg.checkpoints.resume {
        let mut position = [0u64; 2];
        if coll.rank() == 0 {
            let st = resume(&tr, suite, &mut params, &mut opt, &mut dead)?;
            position = [st.step, st.seqs_seen];
        }
        share_state(coll, &mut params, &mut opt, &mut dead, &mut position)?;
        if !cfg.use_engine {
            suite.set_params(&params)?;
        }
        [step, seqs_seen] = position;
        crate::note!("finetune: resuming at step {step} of {steps}");
    }
    let (d, f) = (suite.d_model, suite.n_features);
    if cfg.use_engine {
        suite.aes = Vec::new();
        // The engine reads the decoders in place, decoder-major (no per-step transposed copy).
        crate::util::release_freed_memory();
        super::pretrain::decoders_to_major(&mut params, &mut opt, d, f, true);
    }
    let suite = &*suite;
    let vars = &suite.aes;
    let mut dopt = if cfg.use_engine { None } else { Some(DeviceOptimizer::from_host(&opt, vars)?) };
    let tokens_per_step = (cfg.batch_size * ctx) as u64;
    let mut session = Session::open(dir, &tr, step, tokens_per_step, coll)?;
    let si = StepInputs { suite, rt, plan: &plan, opts: cfg.pass, coll, decoder_major: cfg.use_engine };
    while step < steps {
        // Next batch in data order (wrapping over epochs): this rank's slice of it.
        let batch = data.batch_part(seqs_seen, cfg.batch_size, first, local)?;
        let scales: Vec<f32> = suite.modules.iter().map(|&m| stagger_scale(m, step, cfg.stagger_steps)).collect();
        let lr_t = cfg.schedule.lr_at(step);
        let spec = LossSpec::new(
            cfg.loss.has_mse(),
            cfg.loss.ce_weight(cfg.ce_weight),
            cfg.auxk_alpha,
            &scales,
            &dead,
            suite.n_features,
        );
        let report = match dopt.as_mut() {
            Some(dopt) => {
                let pass_batch = batch.with_pass_dtype(cfg.dtype)?;
                let (report, mut grads) = autograd_grads(&si, &pass_batch, &spec, cfg.micro_batch)?;
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
            None => engine_step(&si, &batch, &spec, &mut params, &mut opt, cfg.schedule.clip, lr_t)?,
        };
        for (m, fired) in report.fired.iter().enumerate() {
            if scales[m] != 0.0 {
                dead.update(m, tokens_per_step, fired);
            }
        }
        session.check_step(step, &report, &suite.modules)?;
        let mut record = metrics_record(step, lr_t, &report, &suite.modules, &dead);
        if let Some(ce) = report.ce {
            // The clean CE of the whole batch, its mean formed as one process forms it.
            // (Stored in the cache by collect-acts, else computed.)
            let clean = match &batch.clean_ce {
                Some(c) => c.clone(),
                None => rt.forward(&batch.tokens, false, false)?.ce,
            };
            let per_token = gather_rows(coll, &clean)?;
            let clean = per_token.mean_all()?.to_scalar::<f32>()? as f64;
            record["ce_diff"] = serde_json::json!(ce - clean);
        }
        session.log(record, &report)?;
        step += 1;
        seqs_seen += cfg.batch_size as u64;
        let next = session.after_step(step, &cfg.schedule, |ckpt| {
            if let Some(d) = &dopt {
                opt = d.to_host()?;
            }
            // Saved (and hashed) in the standard layout, in place, and turned back after.
            let engine = dopt.is_none();
            if engine {
                super::pretrain::decoders_to_major(&mut params, &mut opt, d, f, false);
            }
            let rebuilt = if engine { Some(suite.with_params(&params)?) } else { None };
            let replicas = match coll.size() {
                1 => None,
                ranks => {
                    let hash = agreed_hash(coll, &params, &opt, &dead, step)?;
                    Some(Replicas { ranks, state_hash: format!("{hash:016x}") })
                }
            };
            ckpt.save(rebuilt.as_ref().unwrap_or(suite), &opt, &dead, step, seqs_seen, replicas)?;
            if engine {
                super::pretrain::decoders_to_major(&mut params, &mut opt, d, f, true);
            }
            Ok(())
        })?;
        match next {
            After::Continue => {}
            After::Halt => return Ok(session.halted(steps)),
            After::Interrupted => return Err(session.interrupted(step)),
        }
    }
    // Adam's moments (twice the suite) are not saved with the result: gone before the suite to
    // save is built (at GPT-2 small, F 24,576: 7.2 GB).
    drop(opt);
    if dopt.is_none() {
        params.iter_mut().for_each(|p| p.decoder_to_standard(d, f));
    }
    session.finish(steps, || {
        let mut out_suite = if dopt.is_none() { suite.with_params(&params)? } else { suite.clone() };
        out_suite.model_id = Some(model.id.clone());
        out_suite.model_hash = Some(model.hash.clone());
        out_suite.lineage = cfg.lineage.clone();
        out_suite.save(&cfg.out, &cfg.created_by, cfg.args.clone())?;
        // The suite carries the connections it was trained with: tools use them by default.
        let stored = cfg.out.join(crate::formats::suite::CONNECTIONS_FILE);
        match conns {
            Some(c) => {
                let mut meta = chosen.meta.without(&Key::OWN);
                if let Some(p) = &chosen.file {
                    meta.set(Key::Source, p.display());
                }
                meta.set(Key::ParallelAttnMlp, parallel);
                c.write_parquet(&stored, crate::formats::connections::FORMAT, &meta)
            }
            None if stored.exists() => std::fs::remove_file(&stored).map_err(|e| crate::error::Error::io(&stored, e)),
            None => Ok(()),
        }
    })
}
