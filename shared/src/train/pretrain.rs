//! `train-suite`'s loop: standard TopK training of every module on its own input and target
//! (`attn_L`: SAE on `hook_attn_out`; `mlp_L`: transcoder `ln2.hook_normalized ->
//! hook_mlp_out`), from the reference's initialisation with `b_dec` = the geometric median of
//! the first batch's targets. Per step: unit-norm decoder columns, forward and backward
//! ([`crate::sae::step`]), per-module clipping, removal of the decoder-gradient component
//! parallel to each column, one Adam step.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use super::checkpoints::file::Replicas;
use super::checkpoints::{resume, CheckpointPolicy, TrainRun};
use super::data::TrainData;
use super::dead::DeadTracker;
use super::optim::{clip_module_t, grad_sq_of_rows, DeviceOptimizer, Optimizer, OptimizerKind};
use super::parallel::{agreed_hash, share_modules, share_state};
use super::{metrics_record, After, RunSummary, Schedule, Session, StepReport};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::formats::suite::Suite;
use crate::model::{Kind, Module};
use crate::sae::decoder::{
    normalize_decoder, normalize_decoder_rows, normalize_decoder_t, remove_parallel_component_t,
};
use crate::sae::init::{geometric_median, init_params};
use crate::sae::step::{step, step_t};
use crate::sae::{fired, AeParams};
use crate::util::collective::{my_slice, Collective, Single};
use crate::util::mem::{drop_scratch, recycle};
use crate::util::rng::SplitMix;
use crate::util::{to_vec, HostF32};

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
    /// On several ranks: each rank trains its share of the modules on whole batches
    /// (`--shard-modules`) instead of its share of every batch.
    pub shard_modules: bool,
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

/// The largest working set of one module's host step (pre-activations, encoder, decoder and
/// their gradients) at which [`update_host`] runs the modules side by side.
const SIDE_BY_SIDE_BYTES: usize = 8 << 20;

/// One host training step of every module on its `(x, y)` pair `(N, D)` (the CPU path): unit-norm
/// decoders, forward and backward, clipping, removal of the decoder-gradient component parallel
/// to each column, one optimizer step with `lr`. `loss` is left 0.
///
/// The parameters and their Adam moments are held in the host layout ([`host_layout`]: encoders
/// input-major `(D, F)`, decoders decoder-major `(F, D)`): the run keeps them so and turns them
/// back only to save.
///
/// Data-parallel over the ranks of `coll` (the pairs are this rank's tokens of the batch): the
/// modules run one after the other, each adding its losses' whole-batch statistics over the
/// ranks; the gradients are added over the ranks before they are clipped.
pub fn update_host(
    coll: &dyn Collective,
    params: &mut [AeParams<Vec<f32>>],
    opt: &mut Optimizer,
    data: &[(&[f32], &[f32])],
    dead: &[Vec<bool>],
    cfg: UpdateConfig,
    lr: f64,
) -> Result<StepReport> {
    let UpdateConfig { d, f, k, .. } = cfg;
    let mut prof = crate::util::profile::Profile::new();
    let one = |m: usize, p: &mut AeParams<Vec<f32>>, c: &dyn Collective| {
        normalize_decoder_rows(&mut p.w_dec, d);
        let (x, y) = data[m];
        step(c, p, x, y, d, f, k, &dead[m], cfg.auxk_alpha)
    };
    // Modules are independent: every result is the same in either order. Small modules run side
    // by side (each also parallel inside), so that their serial parts overlap; large ones one
    // after the other, each parallel inside: side by side, two working sets of ~50 MB (F 3072,
    // 1,024 tokens) overflow the shared cache and the step took 1.4x as long (TinyStories-33M
    // shape, 2 threads), while at the toy's size one at a time took 1.4x as long. On several
    // ranks they run one after the other: each meets the ranks in its losses.
    let n_tokens = data.first().map_or(0, |(x, _)| x.len() / d.max(1));
    let working_set = 4 * (n_tokens * f + 4 * f * d);
    let side_by_side = coll.size() == 1 && working_set <= SIDE_BY_SIDE_BYTES;
    // One process, modules one after the other, Adam: each module's update follows its
    // backward, while its gradients are still partly in cache (the same operations per
    // element: the same bits); its weights' gradients then go back to this thread's scratch,
    // for the next module's. (An error in a later module leaves the earlier ones updated and
    // the step counted; the run then stops without saving them.)
    let each = !side_by_side && coll.size() == 1 && opt.kind == OptimizerKind::Adam;
    let outs: Vec<_> = if side_by_side {
        params.par_iter_mut().enumerate().map(|(m, p)| one(m, p, &Single)).collect::<Result<_>>()?
    } else if each {
        opt.begin_step();
        let mut outs = Vec::with_capacity(params.len());
        for (m, p) in params.iter_mut().enumerate() {
            let mut s = one(m, p, coll)?;
            prof.mark("modules' forward and backward");
            let sq = s.row_sq.as_ref().map(|[e, dd]| grad_sq_of_rows(&s.grads, e, dd));
            opt.step_clipped_module(m, p, &s.grads, lr, cfg.clip, sq, d);
            recycle(std::mem::take(&mut s.grads.w_enc));
            recycle(std::mem::take(&mut s.grads.w_dec));
            outs.push(s);
            prof.mark("clip, projection, optimizer");
        }
        outs
    } else {
        params.iter_mut().enumerate().map(|(m, p)| one(m, p, coll)).collect::<Result<_>>()?
    };
    prof.mark("modules' forward and backward");
    let mut report = StepReport { fvu: Some(Vec::new()), auxk: Some(Vec::new()), ..StepReport::default() };
    let mut grads = Vec::with_capacity(params.len());
    for s in outs {
        report.fvu.as_mut().expect("set").push(s.fvu);
        report.auxk.as_mut().expect("set").push(s.auxk);
        report.fired.push(fired(&s.idx, &s.val, f));
        if !each {
            grads.push(s.grads);
        }
    }
    if !each {
        super::parallel::sum_grads(coll, &mut grads)?;
    }
    report.fired = super::parallel::any_fired(coll, std::mem::take(&mut report.fired))?;
    if !each {
        // (The gradients are freed, not kept in the scratch: kept, every module's would sit
        // outside the allocator until the next step, ~3.6 GB at GPT-2 small F 24,576.)
        opt.step_clipped(params, &mut grads, lr, cfg.clip, d);
        prof.mark("clip, projection, optimizer");
    }
    prof.report("train-suite step");
    Ok(report)
}

/// Turn the host loop's decoders and their Adam moments decoder-major `(F, D)` (`major`), or
/// back to the standard `(D, F)`. Exact either way (transposes), so a checkpoint written between
/// the two is the one the standard layout would have written.
/// One tensor at a time (each transpose is parallel inside): nested in a parallel loop, waiting
/// threads start further transposes and their buffers pile up (+1.1 GB at GPT-2 small, F 24,576).
pub fn decoders_to_major(params: &mut [AeParams<Vec<f32>>], opt: &mut Optimizer, d: usize, f: usize, major: bool) {
    relayout(params, opt, |p| if major { p.decoder_to_major(d, f) } else { p.decoder_to_standard(d, f) });
}

/// [`decoders_to_major`] for the host pretraining layout ([`AeParams::to_host_layout`]: also
/// the encoders input-major, `(D, F)`), or back to the standard one.
pub fn host_layout(params: &mut [AeParams<Vec<f32>>], opt: &mut Optimizer, d: usize, f: usize, host: bool) {
    relayout(params, opt, |p| if host { p.to_host_layout(d, f) } else { p.to_standard_layout(d, f) });
}

/// `each` on every module's parameters and Adam moments, one at a time.
fn relayout(params: &mut [AeParams<Vec<f32>>], opt: &mut Optimizer, each: impl Fn(&mut AeParams<Vec<f32>>)) {
    params.iter_mut().chain(opt.m.iter_mut()).chain(opt.v.iter_mut()).for_each(each);
}

/// [`update_host`] on the device (the autograd path), the pass in `dtype`; on several ranks
/// the gradients are added over them through host buffers.
#[allow(clippy::too_many_arguments)]
pub fn update_device(
    coll: &dyn Collective,
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
    let (mut values, mut grads) = step_t(coll, vars, data, dead, cfg.k, cfg.auxk_alpha, dtype)?;
    grads = super::parallel::sum_device_grads(coll, grads)?;
    values.fired = super::parallel::any_fired(coll, values.fired)?;
    for (vs, g) in vars.iter().zip(grads.iter_mut()) {
        if let Some(c) = cfg.clip {
            clip_module_t(g, c)?;
        }
        g.w_dec = remove_parallel_component_t(vs.w_dec.as_tensor(), &g.w_dec)?;
    }
    opt.step(vars, &grads, lr)?;
    Ok(StepReport { fvu: Some(values.fvu), auxk: Some(values.auxk), fired: values.fired, ..StepReport::default() })
}

/// How the ranks of a job share a `train-suite` run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Split {
    /// One process.
    One,
    /// Data-parallel: this rank computes sequences `first..first + len` of every batch.
    Data { first: usize, len: usize },
    /// `--shard-modules`: this rank trains the modules `owned` (m with m mod N = rank) on whole
    /// batches.
    Modules { owned: Vec<usize> },
}

impl Split {
    fn of(coll: &dyn Collective, cfg: &PretrainConfig, n_modules: usize) -> Result<Split> {
        let n = coll.size();
        if n == 1 {
            return Ok(Split::One);
        }
        if !cfg.shard_modules {
            let (first, len) = my_slice(coll, cfg.batch_size, "--batch-size")?;
            return Ok(Split::Data { first, len });
        }
        if !cfg.use_engine {
            return Err(Error::Usage(format!(
                "--shard-modules on {n} ranks runs on the CPU engine; hint: --backend engine, or data-parallel (without --shard-modules) for the autograd path"
            )));
        }
        if n > n_modules {
            return Err(Error::Usage(format!(
                "--shard-modules: {n} ranks for {n_modules} modules would leave ranks idle; hint: launch at most {n_modules} ranks"
            )));
        }
        Ok(Split::Modules { owned: (coll.rank()..n_modules).step_by(n).collect() })
    }

    /// The batch this rank trains on, from the whole batch `b`.
    fn part(&self, b: Batch) -> Result<Batch> {
        match self {
            Split::Data { first, len } => b.narrow(*first, *len),
            _ => Ok(b),
        }
    }
}

/// One host step of the modules `owned` only (`--shard-modules`): their parameters and Adam
/// moments are moved out, stepped as a suite of their own and moved back, so each module's
/// update is the one a single process makes. The report covers every module (the others'
/// values 0, their features not fired) until [`merge_shards`] adds the ranks' reports.
#[allow(clippy::too_many_arguments)]
fn update_owned(
    owned: &[usize],
    params: &mut [AeParams<Vec<f32>>],
    opt: &mut Optimizer,
    data: &[(&[f32], &[f32])],
    masks: &[Vec<bool>],
    cfg: UpdateConfig,
    lr: f64,
) -> Result<StepReport> {
    let mut sub_p: Vec<_> = owned.iter().map(|&m| std::mem::take(&mut params[m])).collect();
    // (SGD has no moments: nothing to move.)
    let take = |v: &mut Vec<AeParams<Vec<f32>>>| -> Vec<_> {
        owned.iter().filter_map(|&m| v.get_mut(m).map(std::mem::take)).collect()
    };
    let mut sub_opt = Optimizer { m: take(&mut opt.m), v: take(&mut opt.v), ..opt.clone_settings() };
    let sub_data: Vec<_> = owned.iter().map(|&m| data[m]).collect();
    let sub_masks: Vec<_> = owned.iter().map(|&m| masks[m].clone()).collect();
    let sub = update_host(&Single, &mut sub_p, &mut sub_opt, &sub_data, &sub_masks, cfg, lr)?;
    opt.t = sub_opt.t;
    let n = params.len();
    let mut report = StepReport {
        fvu: Some(vec![0.0; n]),
        auxk: Some(vec![0.0; n]),
        fired: vec![vec![false; cfg.f]; n],
        ..StepReport::default()
    };
    for (j, &m) in owned.iter().enumerate() {
        params[m] = std::mem::take(&mut sub_p[j]);
        if let (Some(a), Some(b)) = (opt.m.get_mut(m), sub_opt.m.get_mut(j)) {
            *a = std::mem::take(b);
        }
        if let (Some(a), Some(b)) = (opt.v.get_mut(m), sub_opt.v.get_mut(j)) {
            *a = std::mem::take(b);
        }
        report.fvu.as_mut().expect("set")[m] = sub.fvu.as_ref().expect("set")[j];
        report.auxk.as_mut().expect("set")[m] = sub.auxk.as_ref().expect("set")[j];
        report.fired[m] = sub.fired[j].clone();
    }
    Ok(report)
}

/// Add the ranks' reports of a module-sharded step (each module's values come from its rank,
/// the others add zeros, which is exact) and OR their firing masks.
fn merge_shards(coll: &dyn Collective, report: &mut StepReport) -> Result<()> {
    let fvu = report.fvu.take().unwrap_or_default();
    let n = fvu.len();
    let mut values = [fvu, report.auxk.take().unwrap_or_default()].concat();
    coll.sum_f64(&mut values)?;
    report.auxk = Some(values.split_off(n));
    report.fvu = Some(values);
    report.fired = super::parallel::any_fired(coll, std::mem::take(&mut report.fired))?;
    Ok(())
}

/// Train a suite on `data` as `cfg` says and write it to `cfg.out`.
///
/// On several ranks (`mpirun -n N train-suite ...`, CPU engine): data-parallel by default —
/// `cfg.batch_size` is the global batch, each rank computes its slice, the losses' statistics
/// and the gradients are added over the ranks (the result equals one process's up to the
/// order of floating-point sums); with `cfg.shard_modules` rank r trains modules r, r+N, ...
/// on whole batches, exchanging only each step's losses and firing masks, and the result is
/// byte-identical to one process's. Rank 0 owns the output folder.
pub fn run(data: &mut TrainData, cfg: &PretrainConfig, device: &Device, coll: &dyn Collective) -> Result<RunSummary> {
    let SuiteShape { d_model: d, n_layers, n_features: f, k, .. } = cfg.shape;
    let ctx = data.ctx_len();
    let modules = Module::all(n_layers);
    let split = Split::of(coll, cfg, modules.len())?;
    let tr = cfg.train_run();
    let dir = if coll.rank() == 0 { Some(tr.prepare_dir()?) } else { None };
    let mut rng = SplitMix(cfg.seed);
    let mut params: Vec<AeParams<Vec<f32>>> = modules.iter().map(|_| init_params(d, f, &mut rng)).collect();
    let mut opt = Optimizer::new(OptimizerKind::Adam, &params);
    let mut dead = DeadTracker::new(modules.len(), f, cfg.dead_threshold);
    let (mut step, mut seqs_seen) = (0u64, 0u64);
    let steps = cfg.schedule.steps;
    // A fresh run reads its first batch before the loop (for b_dec) and trains on it first.
    let mut first_batch = None;
    if cfg.checkpoints.resume {
        let mut position = [0u64; 2];
        if coll.rank() == 0 {
            let suite = Suite::from_params(&params, &modules, k, d, f)?;
            let st = resume(&tr, &suite, &mut params, &mut opt, &mut dead)?;
            position = [st.step, st.seqs_seen];
        }
        share_state(coll, &mut params, &mut opt, &mut dead, &mut position)?;
        [step, seqs_seen] = position;
        crate::note!("train-suite: resuming at step {step} of {steps}");
    } else {
        // b_dec = geometric median of the first batch's targets (up to 4096 tokens); every rank
        // reads the whole first batch for it.
        let batch0 = data.batch(0, cfg.batch_size)?;
        for (p, m) in params.iter_mut().zip(&modules) {
            let y = to_vec(module_pair(&batch0, m).1)?;
            let take = (4096 * d).min(y.len());
            p.b_dec = geometric_median(&y[..take], d);
        }
        first_batch = Some(split.part(batch0)?);
    }
    if cfg.use_engine {
        host_layout(&mut params, &mut opt, d, f, true);
    }
    let tokens_per_step = (cfg.batch_size * ctx) as u64;
    let mut session = Session::open(dir, &tr, step, tokens_per_step, coll)?;
    // The autograd path keeps parameters and optimizer state on the device.
    let (vars, mut dopt) = if cfg.use_engine {
        (Vec::new(), None)
    } else {
        let vars = params.iter().map(|p| AeParams::<Var>::from_host(p, d, f, device)).collect::<Result<Vec<_>>>()?;
        let dopt = DeviceOptimizer::from_host(&opt, &vars)?;
        (vars, Some(dopt))
    };
    while step < steps {
        let batch = match (first_batch.take(), &split) {
            (Some(b), _) => b,
            (None, Split::Data { first, len }) => data.batch_part(seqs_seen, cfg.batch_size, *first, *len)?,
            (None, _) => data.batch(seqs_seen, cfg.batch_size)?,
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
                update_device(coll, &vars, dopt, &data, &masks, ucfg, lr_t, cfg.dtype)?
            }
            None => {
                // Read in place where the batch is on the host in f32 (else copied); an SAE's
                // input is its target (a module-sharded rank reads only its modules').
                let mine = |m: usize| match &split {
                    Split::Modules { owned } => owned.contains(&m),
                    _ => true,
                };
                let data = modules
                    .iter()
                    .enumerate()
                    .map(|(mi, m)| {
                        if !mine(mi) {
                            return Ok((HostF32::Copied(Vec::new()), None));
                        }
                        let (x, y) = module_pair(&batch, m);
                        Ok((HostF32::of(x)?, if m.kind == Kind::Attn { None } else { Some(HostF32::of(y)?) }))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<(&[f32], &[f32])> =
                    data.iter().map(|(x, y)| (x.as_slice(), y.as_ref().unwrap_or(x).as_slice())).collect();
                match &split {
                    Split::Modules { owned } => {
                        let mut r = update_owned(owned, &mut params, &mut opt, &refs, &masks, ucfg, lr_t)?;
                        merge_shards(coll, &mut r)?;
                        r
                    }
                    _ => update_host(coll, &mut params, &mut opt, &refs, &masks, ucfg, lr_t)?,
                }
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
            drop_scratch();
            match &dopt {
                Some(dopt) => {
                    params = vars.iter().map(AeParams::to_host).collect::<Result<Vec<_>>>()?;
                    opt = dopt.to_host()?;
                }
                // Saved (and hashed) in the standard layout, in place, and turned back after.
                None => host_layout(&mut params, &mut opt, d, f, false),
            }
            let replicas = match &split {
                Split::One => None,
                Split::Data { .. } => {
                    let hash = agreed_hash(coll, &params, &opt, &dead, step)?;
                    Some(Replicas { ranks: coll.size(), state_hash: format!("{hash:016x}") })
                }
                Split::Modules { .. } => {
                    // The checkpoint is the one a single process writes: every module's state
                    // from the rank that trains it.
                    share_modules(coll, &mut params, &mut opt)?;
                    None
                }
            };
            ckpt.save(&Suite::from_params(&params, &modules, k, d, f)?, &opt, &dead, step, seqs_seen, replicas)?;
            if dopt.is_none() {
                host_layout(&mut params, &mut opt, d, f, true);
            }
            Ok(())
        })?;
        match next {
            After::Continue => {}
            After::Halt => return Ok(session.halted(steps)),
            After::Interrupted => return Err(session.interrupted(step)),
        }
    }
    if matches!(split, Split::Modules { .. }) {
        share_modules(coll, &mut params, &mut opt)?;
    }
    drop_scratch();
    session.finish(steps, || {
        if dopt.is_some() {
            params = vars.iter().map(AeParams::to_host).collect::<Result<Vec<_>>>()?;
        } else {
            // (The moments are not saved here: only the parameters are turned back.)
            params.iter_mut().for_each(|p| p.to_standard_layout(d, f));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Above the side-by-side bound, one process, Adam: each module's update follows its
    /// backward and its gradients' buffers serve the next module (from the scratch, their old
    /// values in place). The same bits as every module's step followed by the whole-step
    /// update, over several steps, with clipping binding: one module with AuxK, one without
    /// (whose clipping norm comes from the backward's row sums).
    #[test]
    fn module_by_module_update_is_the_whole_step() {
        let (d, f, k, n) = (64, 8192, 8, 64);
        assert!(4 * (n * f + 4 * f * d) > SIDE_BY_SIDE_BYTES, "the test must take the sequential path");
        let mut rng = SplitMix(9);
        let mut a: Vec<_> = (0..2)
            .map(|_| {
                let mut p = init_params(d, f, &mut rng);
                p.to_host_layout(d, f);
                p
            })
            .collect();
        let mut b = a.clone();
        let (mut oa, mut ob) = (Optimizer::new(OptimizerKind::Adam, &a), Optimizer::new(OptimizerKind::Adam, &b));
        let cfg = UpdateConfig { d, f, k, auxk_alpha: 1.0 / 32.0, clip: Some(1e-3) };
        let dead: Vec<Vec<bool>> = (0..2).map(|m| (0..f).map(|i| m == 0 && i % 3 == 0).collect()).collect();
        for s in 0..3u64 {
            let data: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
                .map(|m| (SplitMix::normals(n * d, 100 * s + m), SplitMix::normals(n * d, 100 * s + m + 50)))
                .collect();
            let refs: Vec<(&[f32], &[f32])> = data.iter().map(|(x, y)| (x.as_slice(), y.as_slice())).collect();
            let report = update_host(&Single, &mut a, &mut oa, &refs, &dead, cfg, 1e-3).unwrap();
            let (mut grads, mut fvu, mut auxk) = (Vec::new(), Vec::new(), Vec::new());
            for (m, p) in b.iter_mut().enumerate() {
                normalize_decoder_rows(&mut p.w_dec, d);
                let out = step(&Single, p, refs[m].0, refs[m].1, d, f, k, &dead[m], cfg.auxk_alpha).unwrap();
                let sq = super::super::optim::grad_sq(&out.grads);
                assert!(sq.sqrt() > 1e-3, "the clip binds");
                match &out.row_sq {
                    Some([e, dd]) => assert_eq!(grad_sq_of_rows(&out.grads, e, dd).to_bits(), sq.to_bits()),
                    None => assert!(m == 0, "row sums without AuxK"),
                }
                fvu.push(out.fvu);
                auxk.push(out.auxk);
                grads.push(out.grads);
            }
            assert!(auxk[0] > 0.0 && auxk[1] == 0.0, "AuxK applies to module 0 only");
            ob.step_clipped(&mut b, &mut grads, 1e-3, cfg.clip, d);
            assert_eq!(a, b, "parameters, step {s}");
            assert_eq!(oa, ob, "moments, step {s}");
            assert_eq!((report.fvu.unwrap(), report.auxk.unwrap()), (fvu, auxk), "losses, step {s}");
        }
    }
}
