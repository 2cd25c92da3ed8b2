//! Finetuning gradients through candle autograd on any device — the GPU path of `finetune`,
//! also selectable on the CPU (`--backend autograd`), where it is tested against the
//! hand-written engine and the reference.
//!
//! Everything stays on the parameters' device: the loss graph and the backward. Per step only
//! scalars (losses) and one `modules × F` firing mask come back to the host.
//!
//! Mixed precision (`--dtype bf16`): parameters, gradients and losses stay f32; the pass runs on
//! bf16 casts of the parameters and the cached inputs, as PyTorch autocast would.

use candle_core::{DType, Tensor, Var};

use super::StepReport;
use crate::data::Batch;
use crate::error::Result;
use crate::formats::suite::Suite;
use crate::model::Runtime;
use crate::pass::loss::ce_loss_planned;
use crate::pass::{forward, PassOptions, Plan};
use crate::sae::loss::{auxk_t, centered_sq_t, fvu_ref};
use crate::sae::{fired_t, AeParams};
use crate::util::scalar;

/// `W_decᵀ` of a module in the pass dtype of `pre`.
fn dec_t(ae: &AeParams<Var>, pre: &Tensor) -> Result<Tensor> {
    Ok(ae.w_dec.as_tensor().to_dtype(pre.dtype())?.t()?)
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
) -> Result<(StepReport, Vec<AeParams<Tensor>>)> {
    let b = batch.tokens.dim(0)?;
    let vars = &suite.aes;
    let micro = micro.unwrap_or(b).clamp(1, b);
    if micro == b {
        let out = forward(suite, rt, plan, batch, opts)?;
        let mut terms: Vec<Tensor> = Vec::new();
        let mut fvu = None;
        if let Some(scales) = &spec.fvu_scales {
            let per = suite
                .modules
                .iter()
                .zip(&out.recon)
                .map(|(m, r)| fvu_ref(batch.target(m), r))
                .collect::<Result<Vec<_>>>()?;
            let stacked = Tensor::stack(&per, 0)?;
            let w = Tensor::from_slice(scales, scales.len(), stacked.device())?;
            terms.push((&stacked * &w)?.sum_all()?);
            fvu = Some(stacked);
        }
        let mut ce = None;
        if let Some(w) = spec.ce_weight {
            let c = ce_loss_planned(suite, rt, plan, batch, &out)?;
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
        return Ok((values, grads));
    }
    let chunks: Vec<(usize, usize)> = (0..b).step_by(micro).map(|s| (s, micro.min(b - s))).collect();
    // Pass 1, no graph kept: reconstructions and firing.
    let n_mod = suite.modules.len();
    let mut recons: Vec<Vec<Tensor>> = vec![Vec::new(); n_mod];
    let mut fired_any: Vec<Vec<bool>> = vec![vec![false; suite.n_features]; n_mod];
    for &(start, len) in &chunks {
        let part = batch.narrow(start, len)?;
        let out = forward(suite, rt, plan, &part, opts)?;
        for (m, r) in out.recon.iter().enumerate() {
            recons[m].push(r.detach().to_dtype(DType::F32)?);
        }
        for (acc, f) in fired_any.iter_mut().zip(fired_t(&out.feats)?) {
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
            let v = fvu_ref(batch.target(module), r.as_tensor())?;
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
                let den = centered_sq_t(&r)?;
                aux_resid[m] = Some((r, den));
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
        let out = forward(suite, rt, plan, &part, opts)?;
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
            let c = ce_loss_planned(suite, rt, plan, &part, &out)?;
            ce_sum += scalar(&c)? * len as f64;
            sur.push((c * (w * len as f64 / b as f64))?);
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
    let ce = spec.ce_weight.map(|_| ce_sum / b as f64);
    let alpha = spec.auxk.as_ref().map_or(0.0, |(a, _)| *a);
    let loss = terms.iter().map(scalar).sum::<Result<f64>>()?
        + ce.map_or(0.0, |c| c * spec.ce_weight.unwrap_or(0.0))
        + alpha * auxk_vals.iter().sum::<f64>();
    let auxk = spec.auxk.as_ref().map(|_| auxk_vals);
    let values = StepReport { loss, fvu, ce, auxk, fired: fired_any };
    Ok((values, grads.expect("at least one chunk")))
}

fn sum_terms(terms: Vec<Tensor>) -> Result<Tensor> {
    let mut it = terms.into_iter();
    let first = it.next().ok_or_else(|| crate::error::Error::Usage("a loss needs an mse or a ce term".into()))?;
    it.try_fold(first, |acc, t| Ok((acc + t)?))
}
