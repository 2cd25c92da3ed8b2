//! The objectives of a pruned pass (what finetuning trains on and evaluation reports), each in
//! its tensor form (autograd) and its host form
//! (flat buffers with the gradient w.r.t. every reconstruction, for the CPU engine):
//! `Σ_m FVU_m` with the reference's FVU (docs/MATH.md, "FVU"), and the CE with the suite
//! spliced into the residual stream (docs/MATH.md, "Spliced CE").
//!
//! Dimensions: B sequences of S positions, N = B·S tokens, D = d_model, V vocabulary.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::plan::UnembedPlan;
use super::{PassOutput, Plan};
use crate::data::{Batch, FlatBatch};
use crate::error::{Error, Result};
use crate::formats::suite::Suite;
use crate::model::Runtime;
use crate::sae::loss::{fvu_ref, fvu_ref_and_grad};
use crate::util::blas::{add_into, sgemm};
use crate::util::collective::{Collective, Single};
use crate::util::to_vec;

/// `Σ_m FVU_m` (reference definition), the MSE-mode training loss.
pub fn mse_loss(suite: &Suite, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (m, r) in suite.modules.iter().zip(&out.recon) {
        let v = fvu_ref(batch.target(m), r)?;
        total = Some(match total {
            Some(t) => (t + v)?,
            None => v,
        });
    }
    total.ok_or_else(|| Error::Usage("empty suite".into()))
}

/// Each module's FVU (reference definition) as one tensor `(modules)`, for weighted sums.
pub fn fvu_per_module(suite: &Suite, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    let per =
        suite.modules.iter().zip(&out.recon).map(|(m, r)| fvu_ref(batch.target(m), r)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&per, 0)?)
}

/// [`mse_loss`] and its gradient w.r.t. every reconstruction `recon[m] (N, D)`, on host buffers.
pub fn mse_loss_and_grad(fb: &FlatBatch, recon: &[&[f32]], d: usize) -> (f64, Vec<Vec<f32>>) {
    let (fvus, grads) = mse_per_module(&Single, fb, recon, d).expect("one process");
    (fvus.iter().sum(), grads)
}

/// Each module's reference FVU and its gradient w.r.t. the module's reconstruction, given
/// `recon[m] (N, D)` (host form of [`mse_loss`]'s terms), of the batch whose sequences are
/// spread over the ranks of `coll` (`fb` is this rank's part).
pub fn mse_per_module(
    coll: &dyn Collective,
    fb: &FlatBatch,
    recon: &[&[f32]],
    d: usize,
) -> Result<(Vec<f64>, Vec<Vec<f32>>)> {
    let sd = fb.s * d;
    recon
        .iter()
        .zip(&fb.targets)
        .map(|(r, t)| fvu_ref_and_grad(coll, t, r, fb.b, sd))
        .collect::<Result<Vec<_>>>()
        .map(|v| v.into_iter().unzip())
}

/// The residual stream the suite implies: `Σ_m R_m + hook_resid_pre[0]`.
pub fn spliced_resid(batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let mut resid = f32(&out.recon[0])?;
    for r in &out.recon[1..] {
        resid = (resid + f32(r)?)?;
    }
    Ok((resid + f32(&batch.resid_pre0)?)?)
}

/// CE with the suite spliced in (per token, `(batch, pos-1)`): final LN and unembed of
/// [`spliced_resid`], next-token targets.
pub fn ce_per_token(rt: &Runtime, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    rt.ce_from_resid(&spliced_resid(batch, out)?, &batch.tokens)
}

/// The reference's CE loss: mean over batch·(pos−1).
pub fn ce_loss(rt: &Runtime, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    Ok(ce_per_token(rt, batch, out)?.mean_all()?)
}

/// [`ce_per_token`] for a plan: with unembed edges each output token reads only its connected
/// features (docs/MATH.md, "Embed and unembed connections"), else the plain spliced CE.
pub fn ce_per_token_planned(
    suite: &Suite,
    rt: &Runtime,
    plan: &Plan,
    batch: &Batch,
    out: &PassOutput,
) -> Result<Tensor> {
    ce_per_token_gated(suite, rt, plan, batch, out, None)
}

/// [`ce_per_token_planned`] with each unembed edge's term times its gate in `gate`
/// `(V_n, C_u)` (the plan's unembed slots; learned connections).
pub fn ce_per_token_gated(
    suite: &Suite,
    rt: &Runtime,
    plan: &Plan,
    batch: &Batch,
    out: &PassOutput,
    gate: Option<&Tensor>,
) -> Result<Tensor> {
    match &plan.unembed {
        None => ce_per_token(rt, batch, out),
        Some(up) => {
            let tokens = &batch.tokens;
            let (b, s) = tokens.dims2()?;
            let logits = unembed_logits(suite, rt, up, plan.composed, batch, out, gate)?; // (N, V)
            let v = logits.dim(1)?;
            crate::model::token_ce(&logits.reshape((b, s, v))?, tokens)
        }
    }
}

/// The logits `(N, V)` of the spliced residual for a plan: with unembed edges each output token
/// reads only its connected features, else the model's final LN and unembedding.
pub fn logits_planned(suite: &Suite, rt: &Runtime, plan: &Plan, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    match &plan.unembed {
        None => {
            let logits = rt.unembed(&spliced_resid(batch, out)?)?;
            let v = logits.dim(candle_core::D::Minus1)?;
            Ok(logits.reshape((logits.elem_count() / v, v))?)
        }
        Some(up) => unembed_logits(suite, rt, up, plan.composed, batch, out, None),
    }
}

/// [`ce_loss`] for a plan (see [`ce_per_token_planned`]).
pub fn ce_loss_planned(suite: &Suite, rt: &Runtime, plan: &Plan, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    Ok(ce_per_token_planned(suite, rt, plan, batch, out)?.mean_all()?)
}

/// Logits `(N, V)` with unembed edges: `(dense + Σ_{(m,j) ∈ U(v)} f_m[t,j] W_dec^m[:,j]) ·
/// W_U[:,v] / s[t] + b_U[v]`, `dense = r0 + Σ_m b_dec^m`, `s` LNPre's scale of the whole
/// spliced residual; the edge terms through the sparse edge product (weights
/// `W_dec^m[:,j] · W_U[:,v]` per edge, times its gate in `gate (V_n, C_u)` if any), never an
/// `F × V` matrix.
fn unembed_logits(
    suite: &Suite,
    rt: &Runtime,
    up: &UnembedPlan,
    composed: bool,
    batch: &Batch,
    out: &PassOutput,
    gate: Option<&Tensor>,
) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let resid = spliced_resid(batch, out)?;
    let (b, s, d) = resid.dims3()?;
    let n = b * s;
    let resid = resid.reshape((n, d))?;
    let centred = resid.broadcast_sub(&resid.mean_keepdim(1)?)?;
    let scale = (centred.sqr()?.mean_keepdim(1)? + rt.cfg.ln_eps)?.sqrt()?; // (N, 1)
    let mut dense = f32(&batch.resid_pre0)?.reshape((n, d))?;
    for ae in &suite.aes {
        dense = dense.broadcast_add(ae.b_dec.as_tensor())?;
    }
    let (w_u, b_u) = (&rt.weights.w_u, &rt.weights.b_u); // (D, V), (V)
    let vocab = w_u.dim(1)?;
    let (vn, width) = (up.index.n_down, up.index.width);
    let dec_t =
        Tensor::cat(&suite.aes.iter().map(|ae| ae.w_dec.as_tensor().t()).collect::<candle_core::Result<Vec<_>>>()?, 0)?
            .contiguous()?; // (modules·F, D)
    let rows = dec_t.index_select(&up.cols, 0)?.reshape((vn, width, d))?;
    let w_ut = w_u.t()?.narrow(0, 0, vn)?.contiguous()?; // (V_n, D)
    let mut w = rows.broadcast_mul(&w_ut.unsqueeze(1)?)?.sum(2)?.unsqueeze(2)?; // (V_n, C_u, 1)
    if let Some(z) = gate {
        w = w.broadcast_mul(&z.unsqueeze(2)?)?;
    }
    let x = Tensor::cat(&out.feats.iter().map(f32).collect::<candle_core::Result<Vec<_>>>()?, 1)?;
    let wires = super::autograd::Wires { index: &up.index, cols: &up.cols, slot_mask: &up.slot_mask };
    let y = super::autograd::apply_edges(&x, &w, wires, 1, s, composed)?;
    let mut y = y.reshape((n, vn))?;
    if vn < vocab {
        y = Tensor::cat(&[&y, &Tensor::zeros((n, vocab - vn), DType::F32, y.device())?], 1)?;
    }
    Ok((dense.matmul(w_u)? + y)?.broadcast_div(&scale)?.broadcast_add(b_u)?)
}

/// LNPre of one residual row on the host: its mean and `σ = sqrt(var + eps)` (the row
/// normalises to `(x − μ) / σ`; docs/MATH.md, "Spliced CE"). Every host CE (the dense one below,
/// the engine's with unembed edges) reads its rows through this.
pub(crate) fn ln_pre_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mu = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d;
    (mu, (var + eps).sqrt())
}

/// The host CE of `rows` flat positions from `t0` (each with a next token in its sequence;
/// the last position of a sequence has none), from their logits without the bias `pre` (rows ×
/// V) and `b_u`: returns the sum of `CE / count` and writes its gradient w.r.t. the logits into
/// `glog` (rows × V; rows without a target stay 0).
pub(crate) fn ce_rows(fb: &FlatBatch, t0: usize, pre: &[f32], b_u: &[f32], count: f64, glog: &mut [f32]) -> f64 {
    let v = b_u.len();
    let mut loss = 0f64;
    let mut logits = vec![0f32; v];
    for (r, row) in pre.chunks_exact(v).enumerate() {
        let t = t0 + r;
        if t % fb.s == fb.s - 1 {
            continue; // the last position has no target
        }
        logits.iter_mut().zip(row).zip(b_u).for_each(|((o, p), bb)| *o = p + bb);
        loss += softmax_ce_row(&logits, fb.tokens[t + 1] as usize, count, &mut glog[r * v..(r + 1) * v]);
    }
    loss
}

/// One position's CE term `lse(logits) − logits[target]` (f64) and its gradient
/// `(softmax − onehot) / count` into `g`.
pub(crate) fn softmax_ce_row(logits: &[f32], target: usize, count: f64, g: &mut [f32]) -> f64 {
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|x| ((x - mx) as f64).exp()).sum();
    let lse = mx as f64 + z.ln();
    for (gj, &x) in g.iter_mut().zip(logits) {
        *gj = ((((x as f64) - lse).exp()) / count) as f32;
    }
    g[target] -= (1.0 / count) as f32;
    lse - logits[target] as f64
}

/// CE with the suite spliced in and its gradient w.r.t. the spliced residual, which is also
/// the gradient w.r.t. every reconstruction (the residual is their sum). Returns (mean CE over
/// batch·(pos−1), gradient `(N, D)`).
pub fn ce_loss_and_grad(rt: &Runtime, fb: &FlatBatch, recon: &[&[f32]], d: usize) -> Result<(f64, Vec<f32>)> {
    ce_loss_and_grad_over(&Single, rt, fb, recon, d)
}

/// [`ce_loss_and_grad`] of a batch whose sequences are spread over the ranks of `coll` (`fb`
/// is this rank's part): the mean over the whole batch's positions, and the gradient w.r.t.
/// this rank's rows.
pub fn ce_loss_and_grad_over(
    coll: &dyn Collective,
    rt: &Runtime,
    fb: &FlatBatch,
    recon: &[&[f32]],
    d: usize,
) -> Result<(f64, Vec<f32>)> {
    let (b, s) = (fb.b, fb.s);
    let n = b * s;
    let mut resid = fb.r0.clone();
    for r in recon {
        add_into(&mut resid, r);
    }
    let w_u = to_vec(&rt.weights.w_u)?; // (D, V)
    let b_u = to_vec(&rt.weights.b_u)?;
    let v = b_u.len();
    let eps = rt.cfg.ln_eps as f32;
    let count = (b * coll.size() * (s - 1)) as f64;
    let mut g_resid = vec![0f32; n * d];
    // Rows in chunks so the logits never exist for the whole batch.
    let chunk = 64usize;
    let losses: Vec<f64> = g_resid
        .par_chunks_mut(chunk * d)
        .enumerate()
        .map(|(ci, gchunk)| {
            let rows = gchunk.len() / d;
            let t0 = ci * chunk;
            let mut normed = vec![0f32; rows * d];
            let mut sig = vec![0f32; rows];
            for r in 0..rows {
                let x = &resid[(t0 + r) * d..(t0 + r + 1) * d];
                let (mu, sd) = ln_pre_stats(x, eps);
                sig[r] = sd;
                for j in 0..d {
                    normed[r * d + j] = (x[j] - mu) / sd;
                }
            }
            let mut logits = vec![0f32; rows * v];
            sgemm(rows, v, d, &normed, d, 1, &w_u, v, 1, &mut logits, false, false);
            let mut glog = vec![0f32; rows * v];
            let loss = ce_rows(fb, t0, &logits, &b_u, count, &mut glog);
            // g_normed = glog W_Uᵀ; LNPre backward: gx = (gn − mean(gn) − n·mean(gn·n)) / σ
            let mut gn = vec![0f32; rows * d];
            sgemm(rows, d, v, &glog, v, 1, &w_u, 1, v, &mut gn, false, false);
            for r in 0..rows {
                let gnr = &gn[r * d..(r + 1) * d];
                let nr = &normed[r * d..(r + 1) * d];
                let mg = gnr.iter().sum::<f32>() / d as f32;
                let mgn = gnr.iter().zip(nr).map(|(a, b)| a * b).sum::<f32>() / d as f32;
                for j in 0..d {
                    gchunk[r * d + j] = (gnr[j] - mg - nr[j] * mgn) / sig[r];
                }
            }
            loss
        })
        .collect();
    let mut sum = [losses.iter().sum::<f64>()];
    coll.sum_f64(&mut sum)?;
    Ok((sum[0] / count, g_resid))
}
