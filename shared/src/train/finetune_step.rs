//! One finetuning step, in each of its forms side by side: on the CPU engine (host buffers,
//! hand-written backward, host optimizer) and through candle autograd on any device (the GPU
//! path), whole batch or micro-batched. All three compute the same loss, described by one
//! [`LossSpec`] (docs/MATH.md, "FVU", "AuxK", "Spliced CE"):
//!
//! `loss = Σ_m scale_m · FVU_m + α · Σ_m AuxK_m + w · CE`
//!
//! with `scale_m` the stagger factor of module m (0 during its delay), α the AuxK weight over
//! the latents dead as of the previous step, and w the CE weight; [`LossSpec::total`] is that
//! sum on the host (the engine step's), the autograd forms build the same terms as tensors for
//! the backward and report their own sum of them.
//!
//! Autograd: everything stays on the parameters' device; per step only scalars (losses) and
//! one `modules × F` firing mask come back to the host. Mixed precision (`--dtype bf16`):
//! parameters, gradients and losses stay f32; the pass runs on bf16 casts of the parameters
//! and the cached inputs, as PyTorch autocast would.

use candle_core::{DType, Tensor, Var};

use super::dead::DeadTracker;
use super::optim::{clip_module, Optimizer, OptimizerKind};
use super::StepReport;
use crate::data::{Batch, FlatBatch};
use crate::error::Result;
use crate::formats::suite::Suite;
use crate::model::Runtime;
use crate::pass::engine::{Engine, GradSink, SlotValues};
use crate::pass::objective::{ce_loss_and_grad_over, ce_loss_planned, mse_per_module};
use crate::pass::{forward, PassOptions, Plan};
use crate::sae::loss::{auxk_t, centered_sq_over_t, centered_sq_t, fvu_ref_and_grad_t};
use crate::sae::{fired_t, AeParams};
use crate::util::collective::Collective;
use crate::util::scalar;

/// What every form of the step reads: the suite (its variables: the autograd forms' parameters),
/// the model, the pass's wiring and options, and the ranks the step's batch is spread over
/// (data-parallel training; [`Single`](crate::util::collective::Single) for one process).
pub struct StepInputs<'a> {
    pub suite: &'a Suite,
    pub rt: &'a Runtime,
    pub plan: &'a Plan,
    pub opts: PassOptions,
    pub coll: &'a dyn Collective,
    /// The CPU engine's host parameters hold their decoders decoder-major, `(F, D)` (finetune's
    /// do; [`Engine::with_params`]), and so do their gradients.
    pub decoder_major: bool,
}

/// What a finetuning loss is made of.
#[derive(Debug, Clone)]
pub struct LossSpec {
    /// Weight of each module's FVU term (0 during its stagger delay); `None`: no MSE term.
    pub fvu_scales: Option<Vec<f32>>,
    /// Weight of the CE term; `None`: no CE term.
    pub ce_weight: Option<f64>,
    /// AuxK weight and each module's dead latents (empty or all-false: no AuxK term).
    pub auxk: Option<(f64, Vec<Vec<bool>>)>,
}

impl LossSpec {
    /// The loss of a step at stagger factors `scales`: FVU terms unless the loss is CE only, the
    /// CE term with weight `ce_weight`, and AuxK (weight `auxk_alpha` > 0) on the latents `dead`
    /// as of the previous step in the modules whose FVU term is on.
    pub fn new(
        mse: bool,
        ce_weight: Option<f64>,
        auxk_alpha: f64,
        scales: &[f32],
        dead: &DeadTracker,
        n_features: usize,
    ) -> LossSpec {
        let auxk = (auxk_alpha > 0.0).then(|| {
            let masks = (0..scales.len())
                .map(|m| if scales[m] != 0.0 { dead.dead(m) } else { vec![false; n_features] })
                .collect();
            (auxk_alpha, masks)
        });
        LossSpec { fvu_scales: mse.then(|| scales.to_vec()), ce_weight, auxk }
    }

    /// The loss from its parts' values (each module's FVU and AuxK, the CE), added in this
    /// order: `Σ_m scale_m · FVU_m`, then `α · Σ_m AuxK_m`, then `w · CE`.
    pub fn total(&self, fvu: Option<&[f64]>, auxk: Option<&[f64]>, ce: Option<f64>) -> f64 {
        let mut loss = 0.0;
        if let (Some(scales), Some(fvu)) = (&self.fvu_scales, fvu) {
            for (s, v) in scales.iter().zip(fvu) {
                loss += *s as f64 * v;
            }
        }
        if let (Some((alpha, _)), Some(aux)) = (&self.auxk, auxk) {
            loss += alpha * aux.iter().sum::<f64>();
        }
        if let (Some(w), Some(ce)) = (self.ce_weight, ce) {
            loss += w * ce;
        }
        loss
    }
}

/// `W_decᵀ` of a module in the pass dtype of `pre`.
fn dec_t(ae: &AeParams<Var>, pre: &Tensor) -> Result<Tensor> {
    Ok(ae.w_dec.as_tensor().to_dtype(pre.dtype())?.t()?)
}

/// One step on the CPU engine: forward, losses and their gradients w.r.t. the
/// reconstructions, backward, clipping (`clip`, per module), host optimizer step on `params`
/// (the suite's variables are left as they were: the runner copies `params` into them before
/// it saves).
///
/// Data-parallel (`si.coll` has several ranks, `batch` is this rank's slice): the losses'
/// whole-batch statistics are added over the ranks before any gradient is formed, each rank
/// backpropagates its slice, the gradients are added over the ranks, and every rank clips and
/// updates the same sums, so the replicas stay identical; the firing masks are OR-ed.
pub fn engine_step(
    si: &StepInputs,
    batch: &Batch,
    spec: &LossSpec,
    params: &mut [AeParams<Vec<f32>>],
    opt: &mut Optimizer,
    clip: Option<f64>,
    lr: f64,
) -> Result<StepReport> {
    let mut prof = crate::util::profile::Profile::new();
    if opt.kind == OptimizerKind::Adam {
        // Each module's gradients, once final, are added over the ranks, clipped and folded into
        // its Adam moments, then dropped: the suite's gradients never exist all at once (3.6 GB
        // at GPT-2 small, F 24,576); the parameters move from the moments after the backward.
        let mut sink = |m: usize, mut g: AeParams<Vec<f32>>| -> Result<()> {
            super::parallel::sum_grads(si.coll, std::slice::from_mut(&mut g))?;
            if let Some(c) = clip {
                clip_module(&mut g, c);
            }
            opt.fold_moments(m, &g);
            Ok(())
        };
        let (report, done) = engine_grads(si, batch, spec, params, None, Some(&mut sink), &mut prof)?;
        if done.is_some() {
            opt.step_from_moments(params, lr);
        }
        prof.mark("optimizer");
        prof.report("step");
        return Ok(report);
    }
    let (report, grads) = engine_grads(si, batch, spec, params, None, None, &mut prof)?;
    let Some((mut grads, _)) = grads else { return Ok(report) };
    super::parallel::sum_grads(si.coll, &mut grads)?;
    prof.mark("all-reduce");
    if let Some(c) = clip {
        grads.iter_mut().for_each(|g| clip_module(g, c));
    }
    opt.step(params, &grads, lr);
    prof.mark("clip, optimizer");
    prof.report("step");
    Ok(report)
}

/// Every module's gradients and the gates' (empty without gates).
pub(super) type EngineGrads = (Vec<AeParams<Vec<f32>>>, SlotValues);

/// The forward, losses and backward of [`engine_step`] on `params` (this rank's gradients, not
/// yet added over the ranks); with `gates`, of the gated pass ([`Engine::gated`]), also
/// returning the gates' gradients (else empty); with `sink` (no gates), each module's gradients
/// go to it as soon as they are final and none are returned. No gradients (and nothing sunk)
/// when the loss is not finite.
pub(super) fn engine_grads(
    si: &StepInputs,
    batch: &Batch,
    spec: &LossSpec,
    params: &[AeParams<Vec<f32>>],
    gates: Option<&SlotValues>,
    sink: Option<GradSink>,
    prof: &mut crate::util::profile::Profile,
) -> Result<(StepReport, Option<EngineGrads>)> {
    let (suite, rt) = (si.suite, si.rt);
    let fb = FlatBatch::new(batch, &suite.modules)?;
    prof.mark("batch");
    let mut eng = Engine::with_params(suite, rt, si.plan, si.opts, params, si.decoder_major)?;
    if let Some(z) = gates {
        eng = eng.gated(z)?;
    }
    prof.mark("engine");
    let mut state = match &spec.auxk {
        Some((_, masks)) => eng.forward_with_dead(&fb, Some(masks))?,
        None => eng.forward(&fb)?,
    };
    let d = suite.d_model;
    let mut report = StepReport {
        fired: super::parallel::any_fired(si.coll, state.modules.iter().map(|st| st.fired.clone()).collect())?,
        ..StepReport::default()
    };
    let mut g_recon: Vec<Vec<f32>> = vec![vec![0f32; fb.b * fb.s * d]; suite.modules.len()];
    if let Some(scales) = &spec.fvu_scales {
        let (fvus, grads) = mse_per_module(si.coll, &fb, &state.recons(), d)?;
        for (m, g) in grads.iter().enumerate() {
            g_recon[m].iter_mut().zip(g).for_each(|(a, b)| *a += scales[m] * b);
        }
        report.fvu = Some(fvus);
        if let Some((alpha, _)) = &spec.auxk {
            report.auxk = Some(eng.auxk_loss_and_grad(si.coll, &fb, &mut state, *alpha)?);
        }
    }
    let mut extra = None;
    if let Some(w) = spec.ce_weight {
        let (ce, rest) = add_ce_term(si, &eng, &fb, &state, w, &mut g_recon)?;
        (report.ce, extra) = (Some(ce), rest);
    }
    report.loss = spec.total(report.fvu.as_deref(), report.auxk.as_deref(), report.ce);
    prof.mark("forward, loss");
    if !report.loss.is_finite() {
        return Ok((report, None));
    }
    let grads = match (gates, sink) {
        (Some(_), _) => eng.backward_gated(&fb, &state, g_recon, extra)?,
        (None, Some(sink)) => {
            eng.backward_each(&fb, &state, g_recon, extra, sink)?;
            (Vec::new(), SlotValues::default())
        }
        (None, None) => (eng.backward_with(&fb, &state, g_recon, extra)?, SlotValues::default()),
    };
    prof.mark("backward");
    Ok((report, Some(grads)))
}

/// The engine's spliced CE term with weight `w`: its value; `w ×` its gradient added into every
/// reconstruction's `g_recon`, and with unembed edges, the rest of its gradient (into the
/// selected values, decoders, biases and unembed gates) for [`Engine::backward_with`].
fn add_ce_term(
    si: &StepInputs,
    eng: &Engine,
    fb: &FlatBatch,
    state: &crate::pass::engine::State,
    w: f64,
    g_recon: &mut [Vec<f32>],
) -> Result<(f64, Option<crate::pass::engine::UnembedGrads>)> {
    let mut extra = None;
    let (ce, g) = match eng.unembed_ce_loss_and_grad(si.coll, fb, state)? {
        Some((ce, g, rest)) => {
            extra = Some(rest.scaled(w as f32));
            (ce, g)
        }
        None => ce_loss_and_grad_over(si.coll, si.rt, fb, &state.recons(), si.suite.d_model)?,
    };
    for gr in g_recon.iter_mut() {
        gr.iter_mut().zip(&g).for_each(|(a, b)| *a += w as f32 * b);
    }
    Ok((ce, extra))
}

/// Forward and backward of the pruned pass through autograd on `batch` (already in the pass
/// dtype, see [`Batch::with_pass_dtype`]): the loss values and every module's gradients.
///
/// With `micro` below the batch size the graph is built for `micro` sequences at a time
/// (`micro_batch_grads`), so memory follows `micro`, not the batch, and the gradients are
/// those of the whole batch's loss.
///
/// Data-parallel (`si.coll` has several ranks, `batch` is this rank's slice) the step is
/// always micro-batched (at most the slice at a time): its two passes are where the ranks add
/// the losses' statistics (after the first) and the gradients (after the second, through host
/// buffers).
pub fn autograd_grads(
    si: &StepInputs,
    batch: &Batch,
    spec: &LossSpec,
    micro: Option<usize>,
) -> Result<(StepReport, Vec<AeParams<Tensor>>)> {
    let b = batch.tokens.dim(0)?;
    match micro.unwrap_or(b).clamp(1, b) {
        m if m < b || si.coll.size() > 1 => micro_batch_grads(si, batch, spec, m),
        _ => whole_batch_grads(si, batch, spec),
    }
}

/// [`autograd_grads`] with the whole batch in one graph.
fn whole_batch_grads(si: &StepInputs, batch: &Batch, spec: &LossSpec) -> Result<(StepReport, Vec<AeParams<Tensor>>)> {
    let (suite, rt, vars) = (si.suite, si.rt, &si.suite.aes);
    let out = forward(suite, rt, si.plan, batch, si.opts)?;
    let mut terms: Vec<Tensor> = Vec::new();
    let mut fvu = None;
    if let Some(scales) = &spec.fvu_scales {
        let stacked = crate::pass::objective::fvu_per_module(suite, batch, &out)?;
        let w = Tensor::from_slice(scales, scales.len(), stacked.device())?;
        terms.push((&stacked * &w)?.sum_all()?);
        fvu = Some(stacked);
    }
    let mut ce = None;
    if let Some(w) = spec.ce_weight {
        let c = ce_loss_planned(suite, rt, si.plan, batch, &out)?;
        terms.push((&c * w)?);
        ce = Some(c);
    }
    let mut auxk = None;
    if let Some((alpha, dead)) = &spec.auxk {
        let mut vals = vec![0f64; suite.modules.len()];
        for (m, module) in suite.modules.iter().enumerate() {
            let d = suite.d_model;
            let resid = (batch.target(module).to_dtype(DType::F32)? - out.recon[m].to_dtype(DType::F32)?)?
                .detach()
                .reshape(((), d))?;
            if let Some(a) =
                auxk_t(&out.pre[m], &dead[m], &dec_t(&vars[m], &out.pre[m])?, &resid, &centered_sq_t(&resid)?)?
            {
                vals[m] = scalar(&a)?;
                terms.push((a * *alpha)?);
            }
        }
        auxk = Some(vals);
    }
    let loss = sum_terms(terms)?;
    let store = loss.backward()?;
    let grads = vars.iter().map(|v| v.grads(&store)).collect::<Result<Vec<_>>>()?;
    let values = StepReport {
        loss: scalar(&loss)?,
        fvu: fvu.map(|t| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) }).transpose()?,
        ce: ce.as_ref().map(scalar).transpose()?,
        auxk,
        fired: fired_t(&out.feats)?,
    };
    Ok((values, grads))
}

/// [`autograd_grads`] `micro` sequences at a time: a first pass without gradients gives every
/// module's reconstruction; the batch-level FVU (whose batch-axis variance couples the
/// sequences) is differentiated with respect to them; a second pass per chunk backpropagates
/// those fixed reconstruction gradients (`Σ ⟨∂L/∂R, R⟩`) plus the chunk's share of the CE and
/// its AuxK terms, and the chunks' gradients are summed.
fn micro_batch_grads(
    si: &StepInputs,
    batch: &Batch,
    spec: &LossSpec,
    micro: usize,
) -> Result<(StepReport, Vec<AeParams<Tensor>>)> {
    let (suite, rt, vars) = (si.suite, si.rt, &si.suite.aes);
    let b = batch.tokens.dim(0)?;
    let b_all = b * si.coll.size();
    let chunks: Vec<(usize, usize)> = (0..b).step_by(micro).map(|s| (s, micro.min(b - s))).collect();
    // Pass 1, no graph kept: reconstructions and firing.
    let n_mod = suite.modules.len();
    let mut recons: Vec<Vec<Tensor>> = vec![Vec::new(); n_mod];
    let mut fired_any: Vec<Vec<bool>> = vec![vec![false; suite.n_features]; n_mod];
    for &(start, len) in &chunks {
        let part = batch.narrow(start, len)?;
        let out = forward(suite, rt, si.plan, &part, si.opts)?;
        for (m, r) in out.recon.iter().enumerate() {
            recons[m].push(r.detach().to_dtype(DType::F32)?);
        }
        for (acc, f) in fired_any.iter_mut().zip(fired_t(&out.feats)?) {
            acc.iter_mut().zip(f).for_each(|(a, x)| *a |= x);
        }
    }
    let fired_any = super::parallel::any_fired(si.coll, fired_any)?;
    let recons: Vec<Tensor> = recons.iter().map(|r| Tensor::cat(r, 0)).collect::<candle_core::Result<_>>()?;
    // ∂(Σ_m scale_m · FVU_m)/∂R_m over the whole batch, its statistics in f64 on the device
    // (the ranks add them on the host).
    let (coll, d) = (si.coll, suite.d_model);
    let mut terms: Vec<f64> = Vec::new();
    let mut fvu = None;
    let mut g_recon: Vec<Option<Tensor>> = vec![None; n_mod];
    if let Some(scales) = &spec.fvu_scales {
        let mut vals = Vec::with_capacity(n_mod);
        for (m, module) in suite.modules.iter().enumerate() {
            let (v, g) = fvu_ref_and_grad_t(coll, batch.target(module), &recons[m])?;
            g_recon[m] = Some((g * scales[m] as f64)?);
            vals.push(v);
            terms.push(v * scales[m] as f64);
        }
        fvu = Some(vals);
    }
    // AuxK: the detached residual of the whole batch and its centered sum of squares (over
    // every rank's tokens).
    let mut aux_resid: Vec<Option<(Tensor, Tensor)>> = vec![None; n_mod];
    if let Some((_, dead)) = &spec.auxk {
        for (m, module) in suite.modules.iter().enumerate() {
            if dead[m].iter().any(|&x| x) {
                let r = (batch.target(module).to_dtype(DType::F32)? - &recons[m])?;
                let den = centered_sq_over_t(coll, &r.reshape(((), d))?)? as f32;
                aux_resid[m] = Some((r, Tensor::new(den, recons[m].device())?));
            }
        }
    }
    let mut auxk_vals = vec![0f64; n_mod];
    // Pass 2, per chunk: backpropagate the fixed reconstruction gradients, the chunk's CE and
    // the chunk's AuxK terms.
    let mut ce_sum = 0f64;
    let mut grads: Option<Vec<AeParams<Tensor>>> = None;
    for &(start, len) in &chunks {
        let part = batch.narrow(start, len)?;
        let out = forward(suite, rt, si.plan, &part, si.opts)?;
        let mut sur: Vec<Tensor> = Vec::new();
        if let Some((alpha, dead)) = &spec.auxk {
            for (m, ar) in aux_resid.iter().enumerate() {
                if let Some((r, den)) = ar {
                    let resid = r.narrow(0, start, len)?.reshape(((), suite.d_model))?;
                    if let Some(a) = auxk_t(&out.pre[m], &dead[m], &dec_t(&vars[m], &out.pre[m])?, &resid, den)? {
                        auxk_vals[m] += scalar(&a)?;
                        sur.push((a * *alpha)?);
                    }
                }
            }
        }
        for (m, g) in g_recon.iter().enumerate() {
            if let Some(g) = g {
                let r = out.recon[m].to_dtype(DType::F32)?;
                sur.push((r * g.narrow(0, start, len)?)?.sum_all()?);
            }
        }
        if let Some(w) = spec.ce_weight {
            let c = ce_loss_planned(suite, rt, si.plan, &part, &out)?;
            ce_sum += scalar(&c)? * len as f64;
            sur.push((c * (w * len as f64 / b_all as f64))?);
        }
        let store = sum_terms(sur)?.backward()?;
        let g = vars.iter().map(|v| v.grads(&store)).collect::<Result<Vec<_>>>()?;
        grads = Some(match grads {
            None => g,
            Some(acc) => {
                acc.into_iter().zip(g).map(|(a, x)| a.try_zip(&x, |a, x| Ok(a.add(x)?))).collect::<Result<Vec<_>>>()?
            }
        });
    }
    // The whole batch's CE and AuxK: every rank's sums added.
    let mut sums = auxk_vals;
    sums.push(ce_sum);
    coll.sum_f64(&mut sums)?;
    let ce_sum = sums.pop().expect("pushed");
    let auxk_vals = sums;
    let ce = spec.ce_weight.map(|_| ce_sum / b_all as f64);
    let alpha = spec.auxk.as_ref().map_or(0.0, |(a, _)| *a);
    let loss = terms.iter().sum::<f64>()
        + ce.map_or(0.0, |c| c * spec.ce_weight.unwrap_or(0.0))
        + alpha * auxk_vals.iter().sum::<f64>();
    let auxk = spec.auxk.as_ref().map(|_| auxk_vals);
    let values = StepReport { loss, fvu, ce, auxk, fired: fired_any };
    Ok((values, super::parallel::sum_device_grads(coll, grads.expect("at least one chunk"))?))
}

fn sum_terms(terms: Vec<Tensor>) -> Result<Tensor> {
    let mut it = terms.into_iter();
    let first = it.next().ok_or_else(|| crate::error::Error::Usage("a loss needs an mse or a ce term".into()))?;
    it.try_fold(first, |acc, t| Ok((acc + t)?))
}
