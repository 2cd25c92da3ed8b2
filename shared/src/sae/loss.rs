//! The losses of one autoencoder's reconstruction — both FVU definitions and AuxK — in their
//! host form (flat `f32` slices, hand-written gradients; the CPU engine and the host
//! pretraining step) and their device form (candle tensors, autograd; the GPU path), side by
//! side (docs/MATH.md, "FVU" and "AuxK").

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use super::topk::{topk_indices, topk_relu_device};
use crate::error::Result;
use crate::util::collective::{Collective, Single};

// ---- FVU, the reference's definition (batch-axis variance) --------------------------------

/// The reference's FVU of one module, `Σ var_b(T − R) / Σ var_b(T)` with the unbiased variance
/// over the batch axis per (position, dim), and its gradient w.r.t. the reconstruction.
/// `target` and `recon` are `(B, S·D)` row-major with `sd = S·D`; sums in f64.
///
/// Over the ranks of `coll` (data-parallel training; one process: [`Single`]) each rank holds
/// `b` sequences of the batch and the statistics are the whole batch's: the per-(position,
/// dim) sums, then the two sums of squares, are added over the ranks, so every rank gets the
/// batch's FVU and the gradient w.r.t. its own rows of the reconstruction.
pub fn fvu_ref_and_grad(
    coll: &dyn Collective,
    target: &[f32],
    recon: &[f32],
    b: usize,
    sd: usize,
) -> Result<(f64, Vec<f32>)> {
    let e: Vec<f32> = target.iter().zip(recon).map(|(a, r)| a - r).collect();
    let b_all = b * coll.size();
    // Per-(position, dim) sums of the error and of the target, added over the ranks.
    let mut sums = vec![0f64; 2 * sd];
    for bi in 0..b {
        for j in 0..sd {
            sums[j] += e[bi * sd + j] as f64;
            sums[sd + j] += target[bi * sd + j] as f64;
        }
    }
    coll.sum_f64(&mut sums)?;
    sums.iter_mut().for_each(|v| *v /= b_all as f64);
    let (me, mt) = sums.split_at(sd);
    let mut nd = [0f64; 2];
    for bi in 0..b {
        for j in 0..sd {
            nd[0] += (e[bi * sd + j] as f64 - me[j]).powi(2);
            nd[1] += (target[bi * sd + j] as f64 - mt[j]).powi(2);
        }
    }
    coll.sum_f64(&mut nd)?;
    let [num, den] = nd;
    // FVU = num/den (the (B−1) factors cancel); dFVU/dR = −2 (e − ē) / den
    let grad = (0..b * sd).map(|x| (-2.0 * (e[x] as f64 - me[x % sd]) / den) as f32).collect();
    Ok((num / den, grad))
}

/// [`fvu_ref_and_grad`]'s value on tensors `(B, S, D)` (any float dtype; computed in f32).
pub fn fvu_ref(target: &Tensor, recon: &Tensor) -> Result<Tensor> {
    let (target, recon) = (&target.to_dtype(DType::F32)?, &recon.to_dtype(DType::F32)?);
    let var_b = |x: &Tensor| -> Result<Tensor> {
        let nb = x.dim(0)?;
        let c = x.broadcast_sub(&x.mean_keepdim(0)?)?;
        Ok((c.sqr()?.sum_all()? / (nb as f64 - 1.0).max(1.0))?)
    };
    Ok((var_b(&(target - recon)?)? / var_b(target)?)?)
}

/// [`fvu_ref_and_grad`] on the tensors' device, in f64: `target` and `recon` `(B, S, D)` (this
/// rank's sequences), the per-(position, dim) sums and the two sums of squares added over the
/// ranks of `coll` on the host (S·D and 2 values). Returns the batch's FVU and its gradient
/// w.r.t. `recon` (f32, `recon`'s shape).
pub fn fvu_ref_and_grad_t(coll: &dyn Collective, target: &Tensor, recon: &Tensor) -> Result<(f64, Tensor)> {
    let t = target.to_dtype(DType::F64)?;
    let e = (&t - recon.to_dtype(DType::F64)?)?;
    let b_all = (e.dim(0)? * coll.size()) as f64;
    // The mean over the batch axis of the error and of the target.
    let mean = |x: &Tensor| -> Result<Tensor> {
        let s = x.sum_keepdim(0)?;
        if coll.size() == 1 {
            return Ok((s / b_all)?);
        }
        let mut v: Vec<f64> = s.flatten_all()?.to_vec1()?;
        coll.sum_f64(&mut v)?;
        Ok((Tensor::from_vec(v, s.shape(), s.device())? / b_all)?)
    };
    let ec = e.broadcast_sub(&mean(&e)?)?;
    let mut nd =
        [ec.sqr()?.sum_all()?.to_scalar::<f64>()?, t.broadcast_sub(&mean(&t)?)?.sqr()?.sum_all()?.to_scalar::<f64>()?];
    coll.sum_f64(&mut nd)?;
    let [num, den] = nd;
    Ok((num / den, (ec * (-2.0 / den))?.to_dtype(DType::F32)?))
}

// ---- Variance over all tokens: pretraining FVU, AuxK's normaliser, evaluation ---------------

/// `Σ_{t,d} (x − mean_t x)²` of `x (N, D)` in f64, floored at 1e-30 (so a constant target
/// cannot divide by zero).
pub fn centered_sq(x: &[f32], d: usize) -> f64 {
    centered_sq_over(&Single, x, d).expect("one process")
}

/// [`centered_sq`] of the tokens spread over the ranks of `coll`, each holding as many rows
/// as `x`: the mean and the sum of squares are the whole batch's, on every rank.
pub fn centered_sq_over(coll: &dyn Collective, x: &[f32], d: usize) -> Result<f64> {
    let n = x.len() / d * coll.size();
    // Each dimension's mean summed over the rows in order, blocks of dimensions in parallel;
    // each row's squares summed in order, eight rows side by side, rows in parallel, and the
    // rows' sums added in order: the sums of one pass over the rows, on any number of threads.
    let mut mean = vec![0f64; d];
    const COLS: usize = 64;
    mean.par_chunks_mut(COLS).enumerate().for_each(|(c, m)| column_means(x, d, c * COLS, n as f64, m));
    coll.sum_f64(&mut mean)?;
    let mut rows = vec![0f64; x.len() / d.max(1)];
    rows.par_chunks_mut(8).with_min_len(8).enumerate().for_each(|(c, o)| row_squares(&x[c * 8 * d..], &mean, d, o));
    let mut sq = [rows.iter().sum::<f64>()];
    coll.sum_f64(&mut sq)?;
    Ok(sq[0].max(1e-30))
}

crate::widest! {
    /// `m[j] += x[r, start + j] / n` over the rows `r` of `x (.., d)` in order.
    fn column_means(x: &[f32], d: usize, start: usize, n: f64, m: &mut [f64]) {
        let w = m.len();
        for r in x.chunks_exact(d) {
            m.iter_mut().zip(&r[start..start + w]).for_each(|(m, v)| *m += *v as f64 / n);
        }
    }
}

crate::widest! {
    /// `o[r] = Σ_j (x[r, j] − mean[j])²` in `j` order for the first `o.len()` rows of `x (.., d)`.
    fn row_squares(x: &[f32], mean: &[f64], d: usize, o: &mut [f64]) {
        for (j, &m) in mean.iter().enumerate() {
            for (r, s) in o.iter_mut().enumerate() {
                *s += (x[r * d + j] as f64 - m).powi(2);
            }
        }
    }
}

/// [`centered_sq`] on a tensor `(.., D)` (f32 floor).
pub fn centered_sq_t(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x = x.reshape(((), d))?;
    Ok(x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.sum_all()?.maximum(1e-30f32)?)
}

/// [`centered_sq_over`] of a tensor `(tokens, D)` on its device, in f64: the per-dimension sums
/// and then the sum of squares come to the host (D + 1 values) to be added over the ranks.
pub fn centered_sq_over_t(coll: &dyn Collective, x: &Tensor) -> Result<f64> {
    let (n, d) = x.dims2()?;
    let x = x.to_dtype(DType::F64)?;
    let mut mean: Vec<f64> = (x.sum(0)? / (n * coll.size()) as f64)?.to_vec1()?;
    coll.sum_f64(&mut mean)?;
    let mean = Tensor::from_vec(mean, d, x.device())?;
    let mut sq = [x.broadcast_sub(&mean)?.sqr()?.sum_all()?.to_scalar::<f64>()?];
    coll.sum_f64(&mut sq)?;
    Ok(sq[0].max(1e-30))
}

/// Streaming per-dimension sums for the evaluation FVU over all tokens,
/// `Σ_{t,d} (e − ē)² / Σ_{t,d} (T − T̄)²` (error and target both centred), accumulated batch by
/// batch in f64.
#[derive(Debug, Clone, Default)]
pub struct Moments {
    sum: Vec<f64>,
    sq: Vec<f64>,
}

impl Moments {
    /// Add the sums of every rank of `coll` (each over its own rows, `d` dimensions), in rank
    /// order, so that every rank holds the sums over all rows.
    pub fn reduce(&mut self, coll: &dyn Collective, d: usize) -> Result<()> {
        if self.sum.is_empty() {
            self.sum = vec![0.0; d];
            self.sq = vec![0.0; d];
        }
        coll.sum_f64(&mut self.sum)?;
        coll.sum_f64(&mut self.sq)
    }

    /// Add the rows of `x (.., D)`.
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let d = x.dim(D::Minus1)?;
        // One pass over the rows on the host, in f64 (candle's f64 cast, square and two
        // reductions were ~10 whole-array passes per call, 2 calls per module per batch).
        let (mut s, mut q) = (vec![0f64; d], vec![0f64; d]);
        for row in crate::util::to_vec(x)?.chunks(d.max(1)) {
            for ((a, b), &v) in s.iter_mut().zip(q.iter_mut()).zip(row) {
                let v = v as f64;
                *a += v;
                *b += v * v;
            }
        }
        if self.sum.is_empty() {
            self.sum = vec![0.0; d];
            self.sq = vec![0.0; d];
        }
        self.sum.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
        self.sq.iter_mut().zip(&q).for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// `Σ_d (Σ x² − (Σ x)² / n)` over the `n` rows added.
    pub fn total_variance(&self, n: f64) -> f64 {
        self.sum.iter().zip(&self.sq).map(|(s, q)| q - s * s / n).sum()
    }
}

// ---- AuxK -----------------------------------------------------------------------------------

/// `min(n_dead / (D/2), 1)`: AuxK's weight when fewer than D/2 latents are dead.
pub fn auxk_scale(n_dead: usize, d: usize) -> f64 {
    (n_dead as f64 / (d / 2).max(1) as f64).min(1.0)
}

/// The AuxK latents of one module: per token the `k_aux = min(D/2, n_dead)` largest ReLU'd
/// pre-top-k activations among dead latents.
#[derive(Debug, Clone, Default)]
pub struct AuxLatents {
    /// `(N, k_aux)` latent indices and their ReLU'd activations.
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
    pub k_aux: usize,
    pub n_dead: usize,
}

/// Select the AuxK latents from the pre-activations `pre (N, F)`; `None` when no latent is dead.
pub fn auxk_select(pre: &[f32], f: usize, dead: &[bool], d: usize) -> Option<AuxLatents> {
    let n_dead = dead.iter().filter(|&&x| x).count();
    if n_dead == 0 {
        return None;
    }
    let k_aux = (d / 2).min(n_dead).max(1);
    let masked: Vec<f32> = pre
        .par_chunks(f)
        .flat_map_iter(|r| r.iter().zip(dead).map(|(v, &dd)| if dd { v.max(0.0) } else { f32::NEG_INFINITY }))
        .collect();
    let idx = topk_indices(&masked, f, k_aux);
    let val = idx.iter().enumerate().map(|(j, &i)| masked[(j / k_aux) * f + i as usize].max(0.0)).collect();
    Some(AuxLatents { idx, val, k_aux, n_dead })
}

/// AuxK and `alpha ×` its gradient w.r.t. the AuxK reconstruction `ehat (N, D)` (the AuxK
/// latents decoded without bias) of the detached residual `resid = T − R (N, D)`:
/// `AuxK = scale · Σ (ê − r)² / Σ (r − r̄)²`, the sums over the whole batch when its tokens are
/// spread over the ranks of `coll`.
pub fn auxk_and_grad(
    coll: &dyn Collective,
    ehat: &[f32],
    resid: &[f32],
    d: usize,
    n_dead: usize,
    alpha: f64,
) -> Result<(f64, Vec<f32>)> {
    let den = centered_sq_over(coll, resid, d)?;
    let mut num = [ehat.iter().zip(resid).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>()];
    coll.sum_f64(&mut num)?;
    let scale = auxk_scale(n_dead, d);
    let coef = alpha * scale * 2.0 / den;
    let g = ehat.iter().zip(resid).map(|(a, b)| (coef * (a - b) as f64) as f32).collect();
    Ok((scale * num[0] / den, g))
}

/// AuxK on tensors: `pre (N, F)` pre-activations, `dead` latents, the module's `W_decᵀ (F, D)`
/// in `pre`'s dtype, the detached residual `resid (N, D)` and its [`centered_sq_t`] `den`.
/// `None` when no latent is dead.
pub fn auxk_t(pre: &Tensor, dead: &[bool], dec_t: &Tensor, resid: &Tensor, den: &Tensor) -> Result<Option<Tensor>> {
    let n_dead = dead.iter().filter(|&&x| x).count();
    if n_dead == 0 {
        return Ok(None);
    }
    let d = resid.dim(1)?;
    let k_aux = (d / 2).min(n_dead).max(1);
    let mask: Vec<u8> = dead.iter().map(|&x| u8::from(x)).collect();
    let mask = Tensor::from_vec(mask, (1, dead.len()), pre.device())?.broadcast_as(pre.shape())?;
    let neg = Tensor::full(f32::NEG_INFINITY, pre.shape(), pre.device())?.to_dtype(pre.dtype())?;
    let masked = mask.where_cond(&pre.relu()?, &neg)?;
    let fa = topk_relu_device(&masked, k_aux)?;
    let ehat = fa.matmul(dec_t)?.to_dtype(DType::F32)?;
    let num = (ehat - resid)?.sqr()?.sum_all()?;
    Ok(Some(((num / den)? * auxk_scale(n_dead, d))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::collective::Single;
    use crate::util::rng::SplitMix;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        SplitMix::normals(n, seed)
    }

    /// The parallel, vectorized sum of squares is the one-pass definition bit for bit (means
    /// summed over the rows in order, each row's squares in order, the rows' sums in order).
    #[test]
    fn centered_sq_is_the_ordered_definition() {
        for (n, d) in [(1, 5), (13, 70), (40, 129), (9, 1)] {
            let x: Vec<f32> = random(n * d, n as u64).iter().map(|v| v * 3.0 + 1.5).collect();
            let mut mean = vec![0f64; d];
            for r in x.chunks(d) {
                mean.iter_mut().zip(r).for_each(|(m, v)| *m += *v as f64 / n as f64);
            }
            let want = x
                .chunks(d)
                .map(|r| r.iter().zip(&mean).map(|(v, m)| (*v as f64 - m).powi(2)).sum::<f64>())
                .sum::<f64>()
                .max(1e-30);
            assert_eq!(centered_sq(&x, d).to_bits(), want.to_bits(), "{n} x {d}");
        }
    }

    /// The device forms (f64 on the tensors' device) equal the host forms they replace in the
    /// micro-batched step and the autograd pretraining step.
    #[test]
    fn device_statistics_equal_the_host_ones() {
        let (b, s, d) = (5, 3, 7);
        let dev = candle_core::Device::Cpu;
        let (t, r) = (random(b * s * d, 1), random(b * s * d, 2));
        let (tt, rt) = (
            Tensor::from_vec(t.clone(), (b, s, d), &dev).unwrap(),
            Tensor::from_vec(r.clone(), (b, s, d), &dev).unwrap(),
        );
        let (v_host, g_host) = fvu_ref_and_grad(&Single, &t, &r, b, s * d).unwrap();
        let (v_dev, g_dev) = fvu_ref_and_grad_t(&Single, &tt, &rt).unwrap();
        assert!((v_host - v_dev).abs() < 1e-6 * v_host, "{v_host} vs {v_dev}");
        let g_dev = g_dev.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = g_host.iter().zip(&g_dev).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let largest = g_host.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5 * largest && largest > 0.0, "gradients differ by {worst} (largest {largest})");
        let v_f32 = fvu_ref(&tt, &rt).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((v_f32 - v_dev).abs() < 1e-5 * v_dev);
        let x = Tensor::from_vec(t.clone(), (b * s, d), &dev).unwrap();
        let (host, device) = (centered_sq_over(&Single, &t, d).unwrap(), centered_sq_over_t(&Single, &x).unwrap());
        assert!((host - device).abs() < 1e-9 * host, "{host} vs {device}");
    }
}
