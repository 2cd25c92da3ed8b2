//! Training through candle autograd on any device — the GPU path of `finetune` and
//! `train-suite`, also selectable on the CPU (`--backend autograd`) where it is tested against
//! the hand-written engine and the reference.
//!
//! Everything in the step stays on the parameters' device: the loss graph, the backward,
//! per-module gradient clipping and the Adam/SGD update are tensor ops. Per step only scalars
//! (losses) and one `modules × F` firing mask (dead-feature counters) come back to the host.
//! The optimizer state converts to and from the host [`Optimizer`] for checkpoints, so both
//! backends write the same checkpoint format.
//!
//! Mixed precision (`--dtype bf16`): parameters, gradients, optimizer moments and losses stay
//! f32 (master weights); the pass itself runs on bf16 casts of the parameters and the cached
//! inputs, as PyTorch autocast would.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::Result;
use crate::model::Runtime;
use crate::pruned::{self, Batch, PassOptions, Plan};
use crate::suite::Suite;
use crate::train::{Optimizer, OptimizerKind};

/// Every module's variables in the [`crate::train::Params`] layout `[w_enc, b_enc, w_dec, b_dec]`.
pub fn module_vars(suite: &Suite) -> Vec<[Var; 4]> {
    suite.aes.iter().map(|ae| [ae.w_enc.clone(), ae.b_enc.clone(), ae.w_dec.clone(), ae.b_dec.clone()]).collect()
}

/// The gradients of `vars` in `store` (zeros for a variable the loss does not reach).
pub fn module_grads(vars: &[[Var; 4]], store: &GradStore) -> Result<Vec<[Tensor; 4]>> {
    vars.iter()
        .map(|vs| {
            let g = |v: &Var| -> Result<Tensor> {
                Ok(match store.get(v.as_tensor()) {
                    Some(g) => g.clone(),
                    None => v.as_tensor().zeros_like()?,
                })
            };
            Ok([g(&vs[0])?, g(&vs[1])?, g(&vs[2])?, g(&vs[3])?])
        })
        .collect()
}

/// `g ← g · min(1, max_norm / (‖g‖₂ + 1e-6))` over one module's gradients, on their device
/// (as [`crate::train::clip_module`]).
pub fn clip_module(g: &mut [Tensor; 4], max_norm: f64) -> Result<()> {
    // The norm in f64, as the host's.
    let sq64 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?) };
    let mut sq = sq64(&g[0])?;
    for t in &g[1..] {
        sq = (sq + sq64(t)?)?;
    }
    let coef = ((sq.sqrt()? + 1e-6)?.recip()? * max_norm)?.minimum(1f64)?.to_dtype(DType::F32)?;
    for t in g.iter_mut() {
        *t = t.broadcast_mul(&coef)?;
    }
    Ok(())
}

/// `G[:, i] −= (G[:, i] · W[:, i]) W[:, i]` for every decoder column, on the device (as
/// [`crate::sae::remove_parallel_component`]).
pub fn remove_parallel_component(w_dec: &Tensor, g_dec: &Tensor) -> Result<Tensor> {
    let dots = (g_dec * w_dec)?.sum_keepdim(0)?;
    Ok((g_dec - w_dec.broadcast_mul(&dots)?)?)
}

/// Divide every decoder column by its norm + f32 eps (as [`crate::sae::normalize_decoder`]).
pub fn normalize_decoder(w_dec: &Var) -> Result<()> {
    let w = w_dec.as_tensor();
    let norms = (w.sqr()?.sum_keepdim(0)?.sqrt()? + f32::EPSILON as f64)?;
    w_dec.set(&w.broadcast_div(&norms)?)?;
    Ok(())
}

/// Which features fired (a non-zero value on some token), per module: one `modules × F`
/// transfer.
pub fn fired(feats: &[Tensor]) -> Result<Vec<Vec<bool>>> {
    let counts = feats.iter().map(|f| Ok(f.ne(0f32)?.to_dtype(DType::F32)?.sum(0)?)).collect::<Result<Vec<_>>>()?;
    let all = Tensor::stack(&counts, 0)?.to_device(&candle_core::Device::Cpu)?.to_vec2::<f32>()?;
    Ok(all.into_iter().map(|r| r.into_iter().map(|c| c > 0.0).collect()).collect())
}

/// Adam/SGD state on the parameters' device.
pub struct DeviceOptimizer {
    kind: OptimizerKind,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Optimizer steps taken.
    pub t: u64,
    m: Vec<[Tensor; 4]>,
    v: Vec<[Tensor; 4]>,
}

impl DeviceOptimizer {
    /// Upload a host optimizer's state for `vars`.
    pub fn from_host(opt: &Optimizer, vars: &[[Var; 4]]) -> Result<DeviceOptimizer> {
        let up = |state: &[[Vec<f32>; 4]]| -> Result<Vec<[Tensor; 4]>> {
            state
                .iter()
                .zip(vars)
                .map(|(s, vs)| {
                    let t = |i: usize| -> Result<Tensor> {
                        let like = vs[i].as_tensor();
                        Ok(Tensor::from_slice(&s[i], like.shape(), like.device())?)
                    };
                    Ok([t(0)?, t(1)?, t(2)?, t(3)?])
                })
                .collect()
        };
        Ok(DeviceOptimizer {
            kind: opt.kind,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            t: opt.t,
            m: up(&opt.m)?,
            v: up(&opt.v)?,
        })
    }

    /// Download the state (for a checkpoint).
    pub fn to_host(&self) -> Result<Optimizer> {
        let down = |state: &[[Tensor; 4]]| -> Result<Vec<[Vec<f32>; 4]>> {
            state
                .iter()
                .map(|s| {
                    let v = |i: usize| -> Result<Vec<f32>> {
                        Ok(s[i].flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()?)
                    };
                    Ok([v(0)?, v(1)?, v(2)?, v(3)?])
                })
                .collect()
        };
        Ok(Optimizer {
            kind: self.kind,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            t: self.t,
            m: down(&self.m)?,
            v: down(&self.v)?,
        })
    }

    /// One update of every variable with learning rate `lr`, in torch's order of operations.
    pub fn step(&mut self, vars: &[[Var; 4]], grads: &[[Tensor; 4]], lr: f64) -> Result<()> {
        self.t += 1;
        match self.kind {
            OptimizerKind::Sgd => {
                for (vs, gs) in vars.iter().zip(grads) {
                    for (v, g) in vs.iter().zip(gs) {
                        v.set(&(v.as_tensor() - (g * lr)?)?)?;
                    }
                }
            }
            OptimizerKind::Adam => {
                let (b1, b2) = (self.beta1, self.beta2);
                let bc1 = 1.0 - b1.powi(self.t as i32);
                let bc2_sqrt = (1.0 - b2.powi(self.t as i32)).sqrt();
                let step_size = lr / bc1;
                let Some(first) = vars.first() else { return Ok(()) };
                let bc2 = Tensor::new(bc2_sqrt as f32, first[0].as_tensor().device())?;
                for (mi, (vs, gs)) in vars.iter().zip(grads).enumerate() {
                    for j in 0..4 {
                        // The host optimizer's (torch's) order of operations.
                        let g = &gs[j];
                        let m = (&self.m[mi][j] + ((g - &self.m[mi][j])? * (1.0 - b1))?)?;
                        let v = ((&self.v[mi][j] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                        let denom = (v.sqrt()?.broadcast_div(&bc2)? + self.eps)?;
                        let x = (vs[j].as_tensor() - ((&m / denom)? * step_size)?)?;
                        vs[j].set(&x)?;
                        self.m[mi][j] = m;
                        self.v[mi][j] = v;
                    }
                }
            }
        }
        Ok(())
    }
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

/// The values of one finetuning step's loss.
#[derive(Debug, Clone)]
pub struct StepValues {
    pub loss: f64,
    /// Per-module FVU (reference definition), when the loss has an MSE term.
    pub fvu: Option<Vec<f64>>,
    pub ce: Option<f64>,
    /// Per-module AuxK (without its weight), when the loss has an AuxK term.
    pub auxk: Option<Vec<f64>>,
    /// Which features fired, per module.
    pub fired: Vec<Vec<bool>>,
}

/// A scalar tensor's value.
fn to_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `Σ (r − mean_tokens r)²` over all tokens of `r (.., d)`, floored away from 0.
fn centered_sq(r: &Tensor) -> Result<Tensor> {
    let d = r.dim(candle_core::D::Minus1)?;
    let r = r.reshape(((), d))?;
    Ok(r.broadcast_sub(&r.mean_keepdim(0)?)?.sqr()?.sum_all()?.maximum(1e-30f32)?)
}

/// AuxK's data term for one module (SPEC B5 decision, as [`crate::sae`]): the
/// `min(D/2, n_dead)` largest ReLU'd pre-top-k activations `pre (N, F)` among `dead` latents
/// reconstruct the detached residual `resid (N, D)` through `dec_t (F, D)`, without bias.
/// Returns `(Σ (ê − r)², scale)` with `scale = min(n_dead / (D/2), 1)`, or `None` when no
/// latent is dead; AuxK is `scale · Σ (ê − r)² / Σ (r − r̄)²`.
fn auxk_numerator(pre: &Tensor, dead: &[bool], dec_t: &Tensor, resid: &Tensor) -> Result<Option<(Tensor, f64)>> {
    let n_dead = dead.iter().filter(|&&x| x).count();
    if n_dead == 0 {
        return Ok(None);
    }
    let d = resid.dim(1)?;
    let k_aux = (d / 2).min(n_dead).max(1);
    let scale = (n_dead as f64 / (d / 2).max(1) as f64).min(1.0);
    let mask: Vec<u8> = dead.iter().map(|&x| u8::from(x)).collect();
    let mask = Tensor::from_vec(mask, (1, dead.len()), pre.device())?.broadcast_as(pre.shape())?;
    let neg = Tensor::full(f32::NEG_INFINITY, pre.shape(), pre.device())?.to_dtype(pre.dtype())?;
    let masked = mask.where_cond(&pre.relu()?, &neg)?;
    let fa = pruned::topk_relu_device(&masked, k_aux)?;
    let ehat = fa.matmul(dec_t)?.to_dtype(DType::F32)?;
    Ok(Some(((ehat - resid)?.sqr()?.sum_all()?, scale)))
}

/// One module's AuxK term of the pruned pass, `scale · Σ (ê − r)² / den`, with the module's
/// decoder `w_dec` cast to the pass dtype (see [`auxk_numerator`]).
fn auxk_term(pre: &Tensor, dead: &[bool], w_dec: &Var, resid: &Tensor, den: &Tensor) -> Result<Option<Tensor>> {
    let dec_t = w_dec.as_tensor().to_dtype(pre.dtype())?.t()?;
    Ok(match auxk_numerator(pre, dead, &dec_t, resid)? {
        Some((num, scale)) => Some(((num / den)? * scale)?),
        None => None,
    })
}

/// Forward and backward of the pruned pass on `batch` (already in the pass dtype, see
/// [`Batch::with_pass_dtype`]): the loss values and every module's gradients.
///
/// With `micro` below the batch size the graph is built for `micro` sequences at a time, so
/// memory follows `micro`, not the batch, and the gradients are those of the whole batch's
/// loss: a first pass without gradients gives every module's reconstruction; the batch-level
/// FVU (whose batch-axis variance couples the sequences) is differentiated with respect to
/// them; a second pass per chunk backpropagates those fixed reconstruction gradients
/// (`Σ ⟨∂L/∂R, R⟩`) plus the chunk's share of the CE, and the chunks' gradients are summed.
pub fn finetune_grads(
    suite: &Suite,
    rt: &Runtime,
    plan: &Plan,
    batch: &Batch,
    opts: PassOptions,
    spec: &LossSpec,
    micro: Option<usize>,
) -> Result<(StepValues, Vec<[Tensor; 4]>)> {
    let b = batch.tokens.dim(0)?;
    let vars = module_vars(suite);
    let scalar = to_f64;
    let micro = micro.unwrap_or(b).clamp(1, b);
    if micro == b {
        let out = pruned::forward(suite, rt, plan, batch, opts)?;
        let mut terms: Vec<Tensor> = Vec::new();
        let mut fvu = None;
        if let Some(scales) = &spec.fvu_scales {
            let per = suite
                .modules
                .iter()
                .zip(&out.recon)
                .map(|(m, r)| pruned::fvu_ref(batch.target(m), r))
                .collect::<Result<Vec<_>>>()?;
            let stacked = Tensor::stack(&per, 0)?;
            let w = Tensor::from_slice(scales, scales.len(), stacked.device())?;
            terms.push((&stacked * &w)?.sum_all()?);
            fvu = Some(stacked);
        }
        let mut ce = None;
        if let Some(w) = spec.ce_weight {
            let c = pruned::ce_loss(rt, batch, &out)?;
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
                if let Some(a) = auxk_term(&out.pre[m], &dead[m], &vars[m][2], &resid, &centered_sq(&resid)?)? {
                    vals[m] = scalar(&a)?;
                    terms.push((a * *alpha)?);
                }
            }
            auxk = Some(vals);
        }
        let loss = sum_terms(terms)?;
        let grads = module_grads(&vars, &loss.backward()?)?;
        let values = StepValues {
            loss: scalar(&loss)?,
            fvu: fvu.map(|t| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) }).transpose()?,
            ce: ce.as_ref().map(scalar).transpose()?,
            auxk,
            fired: fired(&out.feats)?,
        };
        return Ok((values, grads));
    }
    let chunks: Vec<(usize, usize)> = (0..b).step_by(micro).map(|s| (s, micro.min(b - s))).collect();
    // Pass 1, no graph kept: reconstructions and firing.
    let n_mod = suite.modules.len();
    let mut recons: Vec<Vec<Tensor>> = vec![Vec::new(); n_mod];
    let mut fired_any: Vec<Vec<bool>> = vec![vec![false; suite.n_features]; n_mod];
    for &(start, len) in &chunks {
        let part = batch.narrow(start, len)?;
        let out = pruned::forward(suite, rt, plan, &part, opts)?;
        for (m, r) in out.recon.iter().enumerate() {
            recons[m].push(r.detach().to_dtype(DType::F32)?);
        }
        for (acc, f) in fired_any.iter_mut().zip(fired(&out.feats)?) {
            acc.iter_mut().zip(f).for_each(|(a, x)| *a |= x);
        }
    }
    let recons: Vec<Tensor> = recons.iter().map(|r| Tensor::cat(r, 0)).collect::<candle_core::Result<_>>()?;
    // ∂(Σ_m scale_m · FVU_m)/∂R_m over the whole batch.
    let mut terms: Vec<Tensor> = Vec::new();
    let mut fvu = None;
    let mut g_recon: Vec<Option<Tensor>> = vec![None; n_mod];
    if let Some(scales) = &spec.fvu_scales {
        let mut vals = Vec::with_capacity(n_mod);
        for (m, module) in suite.modules.iter().enumerate() {
            let r = Var::from_tensor(&recons[m])?;
            let v = pruned::fvu_ref(batch.target(module), r.as_tensor())?;
            let weighted = (&v * scales[m] as f64)?;
            g_recon[m] = weighted.backward()?.get(r.as_tensor()).cloned();
            vals.push(scalar(&v)?);
            terms.push(weighted.detach());
        }
        fvu = Some(vals);
    }
    // AuxK: the detached residual of the whole batch and its centered sum of squares.
    let mut aux_resid: Vec<Option<(Tensor, Tensor)>> = vec![None; n_mod];
    if let Some((_, dead)) = &spec.auxk {
        for (m, module) in suite.modules.iter().enumerate() {
            if dead[m].iter().any(|&x| x) {
                let r = (batch.target(module).to_dtype(DType::F32)? - &recons[m])?;
                let den = centered_sq(&r)?;
                aux_resid[m] = Some((r, den));
            }
        }
    }
    let mut auxk_vals = vec![0f64; n_mod];
    // Pass 2, per chunk: backpropagate the fixed reconstruction gradients, the chunk's CE and
    // the chunk's AuxK terms.
    let mut ce_sum = 0f64;
    let mut grads: Option<Vec<[Tensor; 4]>> = None;
    for &(start, len) in &chunks {
        let part = batch.narrow(start, len)?;
        let out = pruned::forward(suite, rt, plan, &part, opts)?;
        let mut sur: Vec<Tensor> = Vec::new();
        if let Some((alpha, dead)) = &spec.auxk {
            for (m, ar) in aux_resid.iter().enumerate() {
                if let Some((r, den)) = ar {
                    let resid = r.narrow(0, start, len)?.reshape(((), suite.d_model))?;
                    if let Some(a) = auxk_term(&out.pre[m], &dead[m], &vars[m][2], &resid, den)? {
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
            let c = pruned::ce_loss(rt, &part, &out)?;
            ce_sum += scalar(&c)? * len as f64;
            sur.push((c * (w * len as f64 / b as f64))?);
        }
        let g = module_grads(&vars, &sum_terms(sur)?.backward()?)?;
        grads = Some(match grads {
            None => g,
            Some(acc) => acc
                .into_iter()
                .zip(g)
                .map(|(a, x)| -> Result<[Tensor; 4]> {
                    Ok([(&a[0] + &x[0])?, (&a[1] + &x[1])?, (&a[2] + &x[2])?, (&a[3] + &x[3])?])
                })
                .collect::<Result<Vec<_>>>()?,
        });
    }
    let ce = spec.ce_weight.map(|_| ce_sum / b as f64);
    let alpha = spec.auxk.as_ref().map_or(0.0, |(a, _)| *a);
    let loss = terms.iter().map(scalar).sum::<Result<f64>>()?
        + ce.map_or(0.0, |c| c * spec.ce_weight.unwrap_or(0.0))
        + alpha * auxk_vals.iter().sum::<f64>();
    let auxk = spec.auxk.as_ref().map(|_| auxk_vals);
    let values = StepValues { loss, fvu, ce, auxk, fired: fired_any };
    Ok((values, grads.expect("at least one chunk")))
}

fn sum_terms(terms: Vec<Tensor>) -> Result<Tensor> {
    let mut it = terms.into_iter();
    let first = it.next().ok_or_else(|| crate::Error::Usage("a loss needs an mse or a ce term".into()))?;
    it.try_fold(first, |acc, t| Ok((acc + t)?))
}

/// What [`sae_update`] reports per module.
#[derive(Debug, Clone)]
pub struct SaeStepValues {
    pub fvu: Vec<f64>,
    pub auxk: Vec<f64>,
    /// Which latents fired, per module.
    pub fired: Vec<Vec<bool>>,
}

/// One TopK training step of every module on its `(x, y)` `(tokens, d_model)` pair, as
/// [`crate::sae::update`] on the host: unit-norm decoder columns, FVU (variance over all
/// tokens) + `auxk_alpha` · AuxK on dead latents' pre-top-k activations, per-module clipping,
/// decoder-gradient component parallel to each column removed, one optimizer step. The pass
/// runs in `dtype` (bf16: mixed precision on f32 master weights).
#[allow(clippy::too_many_arguments)]
pub fn sae_update(
    vars: &[[Var; 4]],
    opt: &mut DeviceOptimizer,
    data: &[(Tensor, Tensor)],
    dead: &[Vec<bool>],
    k: usize,
    auxk_alpha: f64,
    clip: Option<f64>,
    lr: f64,
    dtype: DType,
) -> Result<SaeStepValues> {
    let mut total: Option<Tensor> = None;
    let (mut fvus, mut auxks, mut feats) = (Vec::new(), Vec::new(), Vec::new());
    for (m, (vs, (x, y))) in vars.iter().zip(data).enumerate() {
        normalize_decoder(&vs[2])?;
        let cast = |t: &Tensor| t.to_dtype(dtype);
        let [enc, b_enc, dec, b_dec] =
            [cast(vs[0].as_tensor())?, cast(vs[1].as_tensor())?, cast(vs[2].as_tensor())?, cast(vs[3].as_tensor())?];
        let (x, y) = (cast(x)?, y.to_dtype(DType::F32)?);
        let pre = x.broadcast_sub(&b_dec)?.matmul(&enc.t()?)?.broadcast_add(&b_enc)?;
        let f = pruned::topk_relu_device(&pre, k)?;
        let dec_t = dec.t()?.contiguous()?;
        let yhat = f.matmul(&dec_t)?.broadcast_add(&b_dec)?.to_dtype(DType::F32)?;
        let den = centered_sq(&y)?;
        let fvu = ((&yhat - &y)?.sqr()?.sum_all()? / &den)?;
        let mut loss = fvu.clone();
        let mut auxk = None;
        if auxk_alpha > 0.0 {
            let resid = (&y - &yhat)?.detach();
            if let Some((num, scale)) = auxk_numerator(&pre, &dead[m], &dec_t, &resid)? {
                let a = ((num / centered_sq(&resid)?)? * scale)?;
                loss = (loss + (&a * auxk_alpha)?)?;
                auxk = Some(a);
            }
        }
        total = Some(match total {
            Some(t) => (t + loss)?,
            None => loss,
        });
        fvus.push(fvu);
        auxks.push(auxk);
        feats.push(f);
    }
    let total = total.ok_or_else(|| crate::Error::Usage("no modules to train".into()))?;
    let mut grads = module_grads(vars, &total.backward()?)?;
    for (vs, g) in vars.iter().zip(grads.iter_mut()) {
        if let Some(c) = clip {
            clip_module(g, c)?;
        }
        g[2] = remove_parallel_component(vs[2].as_tensor(), &g[2])?;
    }
    let scalar = to_f64;
    let values = SaeStepValues {
        fvu: fvus.iter().map(scalar).collect::<Result<_>>()?,
        auxk: auxks.iter().map(|a| a.as_ref().map_or(Ok(0.0), scalar)).collect::<Result<_>>()?,
        fired: fired(&feats)?,
    };
    opt.step(vars, &grads, lr)?;
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Params;
    use candle_core::Device;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::sae::SplitMix(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The device optimizer and clipping against the host ones (the CPU engine's), over a few
    /// steps with changing gradients and learning rates.
    #[test]
    fn device_adam_sgd_and_clipping_match_the_host() {
        let shapes: [&[usize]; 4] = [&[3, 2], &[3], &[2, 3], &[2]];
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let init: [Vec<f32>; 4] = [0, 1, 2, 3].map(|i| random(shapes[i].iter().product(), i as u64));
            let mut host = Params { modules: vec![init.clone()] };
            let vars = vec![[0, 1, 2, 3]
                .map(|i| Var::from_tensor(&Tensor::from_slice(&init[i], shapes[i], &Device::Cpu).unwrap()).unwrap())];
            let mut hopt = Optimizer::new(kind, &host);
            let mut dopt = DeviceOptimizer::from_host(&hopt, &vars).unwrap();
            for step in 0..4u64 {
                let g: [Vec<f32>; 4] =
                    [0, 1, 2, 3].map(|i| random(shapes[i].iter().product(), 10 + step * 4 + i as u64));
                let mut dg = [0, 1, 2, 3].map(|i| Tensor::from_slice(&g[i], shapes[i], &Device::Cpu).unwrap());
                let mut hg = vec![g];
                crate::train::clip_module(&mut hg[0], 1.5);
                clip_module(&mut dg, 1.5).unwrap();
                let lr = 0.01 * (step + 1) as f64;
                hopt.step(&mut host, &hg, lr);
                dopt.step(&vars, &[dg], lr).unwrap();
            }
            for i in 0..4 {
                let d = vars[0][i].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (a, b) in d.iter().zip(&host.modules[0][i]) {
                    assert!((a - b).abs() <= 1e-7 * (1.0 + b.abs()), "{kind:?} param {i}: {a} vs {b}");
                }
            }
            // and the state survives a round trip through the host format
            let back = dopt.to_host().unwrap();
            assert_eq!(back.t, hopt.t);
            let (dm, hm) = (back.m.iter().flatten().flatten(), hopt.m.iter().flatten().flatten());
            let (dv, hv) = (back.v.iter().flatten().flatten(), hopt.v.iter().flatten().flatten());
            for (x, y) in dm.zip(hm).chain(dv.zip(hv)) {
                assert!((x - y).abs() <= 1e-6 * y.abs(), "{kind:?} moment {x} vs {y}");
            }
        }
    }

    #[test]
    fn decoder_helpers_match_the_host() {
        let (d, f) = (3, 4);
        let mut w = random(d * f, 1);
        let mut g = random(d * f, 2);
        let var = Var::from_tensor(&Tensor::from_slice(&w, (d, f), &Device::Cpu).unwrap()).unwrap();
        normalize_decoder(&var).unwrap();
        crate::sae::normalize_decoder(&mut w, d, f);
        let dev_g =
            remove_parallel_component(var.as_tensor(), &Tensor::from_slice(&g, (d, f), &Device::Cpu).unwrap()).unwrap();
        crate::sae::remove_parallel_component(&w, &mut g, d, f);
        let close = |a: &Tensor, b: &[f32]| {
            for (x, y) in a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(b) {
                assert!((x - y).abs() < 1e-6, "{x} vs {y}");
            }
        };
        close(var.as_tensor(), &w);
        close(&dev_g, &g);
    }
}
