//! One pretraining forward and backward of every module on its own input and target
//! (`attn_L`: SAE on `hook_attn_out`; `mlp_L`: transcoder `ln2.hook_normalized -> hook_mlp_out`):
//! [`step`] on host buffers with a hand-written backward (the CPU path), [`step_t`] on tensors
//! through autograd (the GPU path, and `--backend autograd` on the CPU).
//!
//! Forward `f = ReLU(top-k((x − b_dec) W_encᵀ + b_enc))`, `ŷ = f W_decᵀ + b_dec`; loss the
//! all-token FVU plus `α·AuxK` on dead latents' pre-top-k activations (docs/MATH.md, "FVU",
//! "AuxK"). Decoder normalisation before, clipping and the parallel-gradient projection after,
//! are the training loop's (`train::pretrain`).

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

use super::loss::{auxk_and_grad, auxk_select, auxk_t, centered_sq_over, centered_sq_over_t};
use super::params::AeParams;
use super::topk::{topk_relu_biased, topk_relu_device};
use super::{decode, fired_t};
use crate::error::Result;
use crate::util::blas::{add_into, by_feature, dots_of_slots, sgemm, FeatureIndex};
use crate::util::collective::Collective;
use crate::util::mem::{recycle, scratch};
use crate::util::rows8::axpy_columns;

/// What one host step of one module produced.
pub struct StepOut {
    pub fvu: f64,
    pub auxk: f64,
    pub grads: AeParams<Vec<f32>>,
    /// Each row's [`crate::util::blas::sq_sum`] of the weights' gradients `(w_enc's, w_dec's)`,
    /// taken as the backward wrote them (for the clipping norm); `None` when AuxK added to them
    /// afterwards.
    pub row_sq: Option<[Vec<f64>; 2]>,
    /// Top-k indices and ReLU'd values `(N, K)` (for dead-feature tracking).
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

/// Forward and backward of one module on `x (n, d)` -> `y (n, d)`; `dead` marks dead latents
/// (AuxK applies when `auxk_alpha > 0` and some are dead). The tokens may be one rank's part of
/// a batch spread over the ranks of `coll` (the losses are the whole batch's).
///
/// `p` is held in the host pretraining layout ([`AeParams::to_host_layout`]): `w_enc`
/// input-major `(D, F)`, as the encoder product reads it fastest, and `w_dec` decoder-major
/// `(F, D)`, as the decoding and the backward by feature read it. The returned gradients are
/// by feature: `w_enc`'s `(F, D)` (the standard layout), `w_dec`'s decoder-major.
#[allow(clippy::too_many_arguments)]
pub fn step(
    coll: &dyn Collective,
    p: &AeParams<Vec<f32>>,
    x: &[f32],
    y: &[f32],
    d: usize,
    f: usize,
    k: usize,
    dead: &[bool],
    auxk_alpha: f64,
) -> Result<StepOut> {
    assert!(k > 0, "sae::step: k is at least 1 (the tools refuse 0)");
    let n = x.len() / d;
    let mut prof = crate::util::profile::Profile::new();
    let dec_t = &p.w_dec;
    // Buffers written whole before they are read come from this thread's scratch.
    let mut xc = scratch(n * d);
    xc.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, r)| {
        o.iter_mut().zip(r.iter().zip(&p.b_dec)).for_each(|(o, (a, b))| *o = a - b);
    });
    let mut pre = scratch(n * f);
    prof.mark("center");
    sgemm(n, f, d, &xc, d, 1, &p.w_enc, f, 1, &mut pre, false, true);
    prof.mark("encoder product");
    // The biased pre-activations are kept only for AuxK's dead latents.
    let auxk_on = auxk_alpha > 0.0 && dead.iter().any(|&x| x);
    let (idx, val) = topk_relu_biased(&mut pre, &p.b_enc, k, auxk_on);
    prof.mark("bias, top-k");
    let Decoded { yhat, g_y, g_val, den } = decode_with_grads(coll, &idx, &val, k, p, y, d)?;
    prof.mark("decode, value grads");
    // AuxK on dead latents' pre-top-k activations; its residual target is detached.
    let mut auxk = 0f64;
    let mut aux: Option<AuxCodes> = None;
    if auxk_on {
        if let Some(sel) = auxk_select(&pre, f, dead, d) {
            let resid: Vec<f32> = y.iter().zip(&yhat).map(|(a, b)| a - b).collect();
            let ehat = decode(&sel.idx, &sel.val, sel.k_aux, dec_t, d, None);
            let (a, g_e) = auxk_and_grad(coll, &ehat, &resid, d, sel.n_dead, auxk_alpha)?;
            auxk = a;
            let g_aux = value_grads(&g_e, &sel.idx, &sel.val, sel.k_aux, dec_t, d);
            aux = Some(AuxCodes { idx: sel.idx, val: sel.val, g_ehat: g_e, g_val: g_aux });
        }
    }
    prof.mark("AuxK");
    // Backward: the parameters' gradients by feature (through a column index of the sparse
    // codes), in parallel; beside them on one thread the ordered sums (the FVU's numerator, the
    // biases' gradients), so that they do not leave the other thread idle.
    // (The buffers are this thread's: allocated on a pool thread they would come from its own
    // heap, and train-suite's peak grew by ~0.2 GB at TinyStories-33M shape. The caller may
    // give the gradients back to this thread's scratch once it has applied them.)
    let (mut g_dec_t, mut g_enc) = (scratch(f * d), scratch(f * d));
    let (mut g_bdec, mut g_benc) = (vec![0f32; d], vec![0f32; f]);
    let serial = || {
        for gy in g_y.chunks(d) {
            g_bdec.iter_mut().zip(gy).for_each(|(a, b)| *a += b);
        }
        for (&i, &g) in idx.iter().zip(&g_val) {
            g_benc[i as usize] += g;
        }
        if let Some(a) = &aux {
            for (&i, &g) in a.idx.iter().zip(&a.g_val) {
                g_benc[i as usize] += g;
            }
        }
        // pre depends on x − b_dec: g b_dec −= Σ_i g_benc[i] E[i] (E's rows are w_enc's columns)
        let minus: Vec<f32> = g_benc.iter().map(|g| -g).collect();
        axpy_columns(&mut g_bdec, &p.w_enc, &minus);
        sq_error(&yhat, y)
    };
    let mut row_sq = aux.is_none().then(|| [vec![0f64; f], vec![0f64; f]]);
    let by_feat = || {
        let (sq_enc, sq_dec) = match row_sq.as_mut() {
            Some([e, dd]) => (Some(&mut e[..]), Some(&mut dd[..])),
            None => (None, None),
        };
        // One index for both sums: a value of zero has a zero gradient.
        let index = FeatureIndex::new(&idx, k, f, |j| val[j] != 0.0);
        index.sum_into(&mut g_dec_t, sq_dec, d, |j| val[j], &g_y);
        index.sum_into(&mut g_enc, sq_enc, d, |j| g_val[j], &xc);
        if let Some(a) = &aux {
            let k_aux = a.idx.len() / n.max(1);
            add_into(&mut g_dec_t, &by_feature(&a.idx, k_aux, f, d, |j| a.val[j], &a.g_ehat));
            add_into(&mut g_enc, &by_feature(&a.idx, k_aux, f, d, |j| a.g_val[j], &xc));
        }
    };
    let ((), num) = rayon::join(by_feat, serial);
    let mut num = [num];
    coll.sum_f64(&mut num)?;
    let fvu = num[0] / den;
    for v in [xc, pre, yhat, g_y] {
        recycle(v);
    }
    prof.mark("backward");
    prof.report("sae step");
    let grads = AeParams { w_enc: g_enc, b_enc: g_benc, w_dec: g_dec_t, b_dec: g_bdec };
    Ok(StepOut { fvu, auxk, grads, row_sq, idx, val })
}

/// The AuxK latents of a step: their codes `(N, k_aux)`, the gradient of their decoding
/// `(N, D)` and their values' gradients.
struct AuxCodes {
    idx: Vec<u32>,
    val: Vec<f32>,
    g_ehat: Vec<f32>,
    g_val: Vec<f32>,
}

/// What [`decode_with_grads`] gives.
struct Decoded {
    yhat: Vec<f32>,
    g_y: Vec<f32>,
    g_val: Vec<f32>,
    /// The FVU's denominator (the whole batch's).
    den: f64,
}

/// The decoding `ŷ = f W_decᵀ + b_dec` of the codes `(idx, val) (N, K)`, the pretraining FVU's
/// denominator (`Σ (ŷ − y)² / Σ (y − ȳ)²`, all tokens; the error is not centred), its gradient
/// `g_y = 2 (ŷ − y) / den`, and the decoded values' gradients ([`value_grads`]), token by token:
/// a token's decoder rows are read once for its decoding and its values' gradients (the
/// denominator depends on `y` alone). The rows may be one rank's part of a batch spread over
/// the ranks of `coll` (sums over the whole batch). `p.w_dec` decoder-major.
fn decode_with_grads(
    coll: &dyn Collective,
    idx: &[u32],
    val: &[f32],
    k: usize,
    p: &AeParams<Vec<f32>>,
    y: &[f32],
    d: usize,
) -> Result<Decoded> {
    let den = centered_sq_over(coll, y, d)?;
    let n = y.len() / d;
    let (mut yhat, mut g_y, mut g_val) = (scratch(n * d), scratch(n * d), vec![0f32; n * k]);
    let rows = yhat.par_chunks_mut(d).zip(g_y.par_chunks_mut(d)).zip(g_val.par_chunks_mut(k.max(1)));
    rows.enumerate().for_each(|(t, ((yh, gy), gv))| {
        let (idx, val) = (&idx[t * k..(t + 1) * k], &val[t * k..(t + 1) * k]);
        decode_token(idx, val, p, &y[t * d..(t + 1) * d], den, yh, gy, gv);
    });
    Ok(Decoded { den, yhat, g_y, g_val })
}

crate::widest! {
    /// One token of [`decode_with_grads`]: its decoding `yh`, `g_y` and its values' gradients.
    fn decode_token(
        idx: &[u32],
        val: &[f32],
        p: &AeParams<Vec<f32>>,
        y: &[f32],
        den: f64,
        yh: &mut [f32],
        gy: &mut [f32],
        gv: &mut [f32],
    ) {
        super::decode_row(idx, val, &p.w_dec, Some(&p.b_dec), yh);
        for ((g, a), b) in gy.iter_mut().zip(yh.iter()).zip(y) {
            *g = (2.0 * (a - b) as f64 / den) as f32;
        }
        row_value_grads(gy, idx, val, &p.w_dec, gv);
    }
}

crate::widest! {
    /// `Σ (ŷ − y)²` in f64 (the FVU's numerator): eight interleaved lanes (element `j` in lane
    /// `j mod 8`, each summed in order), the lanes added in order, then the tail in order: a
    /// fixed order, and not bound by the latency of one chain (0.65 → ~0.1 ms per module at
    /// TinyStories-33M shape, on the thread beside the backward's sums).
    fn sq_error(yhat: &[f32], y: &[f32]) -> f64 {
        let mut lanes = [0f64; 8];
        let (a, b) = (yhat.chunks_exact(8), y.chunks_exact(8));
        let tail: f64 = a.remainder().iter().zip(b.remainder()).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        for (p, q) in a.zip(b) {
            for l in 0..8 {
                lanes[l] += ((p[l] - q[l]) as f64).powi(2);
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

/// The gradient `(N, width)` of each decoded value `val[t, j]` (zero where it is not positive)
/// given the gradient `g_y (N, D)` of `y[t] = Σ_j val[t, j] · dec_t[idx[t, j]]`.
fn value_grads(g_y: &[f32], idx: &[u32], val: &[f32], width: usize, dec_t: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; idx.len()];
    out.par_chunks_mut(width.max(1)).enumerate().for_each(|(t, o)| {
        let slots = t * width..(t + 1) * width;
        row_value_grads(&g_y[t * d..(t + 1) * d], &idx[slots.clone()], &val[slots], dec_t, o);
    });
    out
}

/// [`value_grads`] of one token: `out[j] = g_y · dec_t[idx[j]]` where `val[j] > 0` (rows of
/// `gy.len()`).
fn row_value_grads(gy: &[f32], idx: &[u32], val: &[f32], dec_t: &[f32], out: &mut [f32]) {
    dots_of_slots(gy, dec_t, idx, |j| val[j] > 0.0, |j, g| out[j] = g);
}

/// What [`step_t`] reports, per module.
#[derive(Debug, Clone)]
pub struct StepValues {
    pub fvu: Vec<f64>,
    pub auxk: Vec<f64>,
    /// Which latents fired.
    pub fired: Vec<Vec<bool>>,
}

/// [`step`] of every module at once through autograd, on the variables' device: each module's
/// `(x, y)` pair `(tokens, d_model)`, the pass in `dtype` (bf16: mixed precision on f32
/// master weights). Returns the values and every module's gradients.
///
/// On several ranks of `coll` (the pairs are this rank's tokens of the batch) the FVU's and
/// AuxK's denominators are the whole batch's (from host sums over the ranks), the values are
/// added over the ranks, and the gradients are this rank's share (the caller adds them).
pub fn step_t(
    coll: &dyn Collective,
    vars: &[AeParams<Var>],
    data: &[(Tensor, Tensor)],
    dead: &[Vec<bool>],
    k: usize,
    auxk_alpha: f64,
    dtype: DType,
) -> Result<(StepValues, Vec<AeParams<Tensor>>)> {
    let mut total: Option<Tensor> = None;
    // Per module: the FVU's value (f64, this rank's part), AuxK's tensor, the codes.
    let (mut fvus, mut auxks, mut feats) = (Vec::new(), Vec::new(), Vec::new());
    for (m, (vs, (x, y))) in vars.iter().zip(data).enumerate() {
        let p = vs.try_map(|v| v.as_tensor().to_dtype(dtype))?;
        let (x, y) = (x.to_dtype(dtype)?, y.to_dtype(DType::F32)?);
        let pre = x.broadcast_sub(&p.b_dec)?.matmul(&p.w_enc.t()?)?.broadcast_add(&p.b_enc)?;
        let f = topk_relu_device(&pre, k)?;
        let dec_t = p.w_dec.t()?.contiguous()?;
        let yhat = f.matmul(&dec_t)?.broadcast_add(&p.b_dec)?.to_dtype(DType::F32)?;
        let den = centered_sq_over_t(coll, &y)?;
        let fvu = ((&yhat - &y)?.sqr()?.sum_all()? / den)?;
        let num = (yhat.to_dtype(DType::F64)? - y.to_dtype(DType::F64)?)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        fvus.push(num / den);
        let mut loss = fvu;
        let mut auxk = None;
        if auxk_alpha > 0.0 {
            let resid = (&y - &yhat)?.detach();
            let den = Tensor::new(centered_sq_over_t(coll, &resid)? as f32, resid.device())?;
            if let Some(a) = auxk_t(&pre, &dead[m], &dec_t, &resid, &den)? {
                loss = (loss + (&a * auxk_alpha)?)?;
                auxk = Some(a);
            }
        }
        total = Some(match total {
            Some(t) => (t + loss)?,
            None => loss,
        });
        auxks.push(auxk);
        feats.push(f);
    }
    let total = total.ok_or_else(|| crate::error::Error::Usage("no modules to train".into()))?;
    let store = total.backward()?;
    let grads = vars.iter().map(|v| v.grads(&store)).collect::<Result<Vec<_>>>()?;
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let n = fvus.len();
    let mut sums = fvus;
    sums.extend(auxks.iter().map(|a| a.as_ref().map_or(Ok(0.0), scalar)).collect::<Result<Vec<_>>>()?);
    coll.sum_f64(&mut sums)?;
    let values = StepValues { auxk: sums.split_off(n), fvu: sums, fired: fired_t(&feats)? };
    Ok((values, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sae::init::init_params;
    use crate::util::blas::{axpy, dot};
    use crate::util::collective::Single;
    use crate::util::rng::SplitMix;

    /// The decoding in column blocks is the plain row-by-row decoding bit for bit, and the
    /// values' gradients are the dots with its rows (a width of one block and a tail; zero values).
    #[test]
    fn blocked_decoding_is_row_by_row() {
        let (d, f, k, n) = (200, 30, 6, 5);
        let mut rng = SplitMix(5);
        let mut p = init_params(d, f, &mut rng);
        p.decoder_to_major(d, f);
        p.b_dec = (0..d).map(|_| rng.normal() as f32).collect();
        let idx: Vec<u32> = (0..n * k).map(|j| ((j * 7 + j / k) % f) as u32).collect();
        let val: Vec<f32> = (0..n * k).map(|j| if j % 4 == 1 { 0.0 } else { rng.normal().abs() as f32 }).collect();
        let y: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let out = decode_with_grads(&Single, &idx, &val, k, &p, &y, d).unwrap();
        for t in 0..n {
            let mut yh = p.b_dec.clone();
            for j in t * k..(t + 1) * k {
                if val[j] != 0.0 {
                    axpy(val[j], &p.w_dec[idx[j] as usize * d..(idx[j] as usize + 1) * d], &mut yh);
                }
            }
            assert_eq!(&out.yhat[t * d..(t + 1) * d], &yh[..], "token {t}");
            let gy = &out.g_y[t * d..(t + 1) * d];
            for j in t * k..(t + 1) * k {
                let want =
                    if val[j] > 0.0 { dot(gy, &p.w_dec[idx[j] as usize * d..(idx[j] as usize + 1) * d]) } else { 0.0 };
                assert_eq!(out.g_val[j].to_bits(), want.to_bits(), "value {j}");
            }
        }
    }

    /// The hand-written gradients against central finite differences of the loss: all
    /// parameters without AuxK; with AuxK, the parameters of dead latents that the main top-k
    /// never selects (the only ones AuxK's detached residual target leaves it depending on).
    #[test]
    fn step_gradients_match_finite_differences() {
        let (d, f, k, n) = (4, 6, 2, 5);
        let mut rng = SplitMix(3);
        let mut p = init_params(d, f, &mut rng);
        for v in p.each_mut().into_iter().flatten() {
            *v += (rng.normal() * 0.3) as f32;
        }
        p.to_host_layout(d, f);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let y: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let h = 1e-3f32;
        for alpha in [0.0, 0.5] {
            let base = step(&Single, &p, &x, &y, d, f, k, &vec![false; f], 0.0).unwrap();
            let selected: Vec<bool> = (0..f).map(|i| base.idx.iter().any(|&j| j as usize == i)).collect();
            let dead: Vec<bool> = if alpha > 0.0 { selected.iter().map(|s| !s).collect() } else { vec![false; f] };
            assert!(alpha == 0.0 || dead.iter().any(|&x| x), "need a dead latent");
            let loss = |p: &AeParams<Vec<f32>>| {
                let o = step(&Single, p, &x, &y, d, f, k, &dead, alpha).unwrap();
                o.fvu + alpha * o.auxk
            };
            let out = step(&Single, &p, &x, &y, d, f, k, &dead, alpha).unwrap();
            let mut worst = 0f64;
            let mut checked = 0;
            for which in 0..4 {
                for j in 0..p.each()[which].len() {
                    let latent = match which {
                        0 => Some(j / d),
                        1 => Some(j),
                        2 => Some(j / d),
                        _ => None,
                    };
                    if alpha > 0.0 && !latent.is_some_and(|i| dead[i]) {
                        continue;
                    }
                    // (w_enc is held (D, F), its gradient (F, D).)
                    let pj = if which == 0 { (j % d) * f + j / d } else { j };
                    let mut pp = p.clone();
                    pp.each_mut()[which][pj] += h;
                    let up = loss(&pp);
                    pp.each_mut()[which][pj] -= 2.0 * h;
                    let down = loss(&pp);
                    let fd = (up - down) / (2.0 * h as f64);
                    let an = out.grads.each()[which][j] as f64;
                    worst = worst.max((fd - an).abs() / (1e-2 + fd.abs()));
                    checked += 1;
                }
            }
            assert!(checked > 0);
            // f32 arithmetic around a piecewise-linear top-k: loose but meaningful.
            assert!(worst < 2e-2, "alpha {alpha}: worst relative gradient error {worst}");
        }
    }
}
