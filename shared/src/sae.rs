//! Standard TopK autoencoder training (SPEC §8): one module at a time, on its own input and
//! target (`attn_L`: SAE on `hook_attn_out`; `mlp_L`: transcoder `ln2.hook_normalized ->
//! hook_mlp_out`), with a hand-written backward.
//!
//! Step (as `TrainerTopK`, with scae's decisions): decoder columns set to unit norm; forward
//! `f = TopK(ReLU((x − b_dec) W_encᵀ + b_enc))`, `ŷ = f W_decᵀ + b_dec`; loss
//! `FVU = Σ (ŷ − y)² / Σ (y − ȳ)²` (variance over all tokens of the batch) plus `α·AuxK`;
//! backward; the caller clips, removes the decoder-gradient component parallel to each column
//! and takes an Adam step.
//!
//! AuxK (SPEC B5 decision: a working one): the `k_aux = min(D/2, n_dead)` largest
//! *pre-top-k* ReLU activations among dead latents reconstruct the residual `r = y − ŷ`
//! (detached): `AuxK = scale · Σ (ê − r)² / Σ (r − r̄)²`, `ê = Σ a·W_dec[:, i]` (no bias),
//! `scale = min(n_dead / (D/2), 1)`. Its gradient reaches only the dead latents, which is what
//! revives them; the reference applied AuxK after top-k, where dead latents are exactly zero.

use rayon::prelude::*;

use crate::sparse_ops::topk_indices;

/// Parameters of one module: `[w_enc (F·D), b_enc (F), w_dec (D·F), b_dec (D)]`.
pub type ModuleParams = [Vec<f32>; 4];

/// A small seeded generator (splitmix64) for reproducible initialisation.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// The reference's initialisation at HEAD: `W_enc ~ U(−1/√D, 1/√D) / 10` (nn.Linear's default,
/// then /10), `b_enc = 0`, `W_dec = W_encᵀ` with unit columns, `b_dec = 0`.
pub fn init_params(d: usize, f: usize, rng: &mut SplitMix) -> ModuleParams {
    let bound = 1.0 / (d as f64).sqrt();
    let enc: Vec<f32> = (0..f * d).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound / 10.0) as f32).collect();
    let mut dec = vec![0f32; d * f];
    for i in 0..f {
        for j in 0..d {
            dec[j * f + i] = enc[i * d + j];
        }
    }
    normalize_decoder(&mut dec, d, f);
    [enc, vec![0f32; f], dec, vec![0f32; d]]
}

/// Divide every decoder column by its norm (+ f32 eps, as the reference).
pub fn normalize_decoder(w_dec: &mut [f32], d: usize, f: usize) {
    let mut norms = vec![0f64; f];
    for j in 0..d {
        for i in 0..f {
            norms[i] += (w_dec[j * f + i] as f64).powi(2);
        }
    }
    for j in 0..d {
        for i in 0..f {
            w_dec[j * f + i] /= (norms[i].sqrt() as f32) + f32::EPSILON;
        }
    }
}

/// `G[:, i] −= (G[:, i] · W[:, i]) W[:, i]` for every column (unit-norm columns assumed).
pub fn remove_parallel_component(w_dec: &[f32], g_dec: &mut [f32], d: usize, f: usize) {
    let mut dots = vec![0f32; f];
    for j in 0..d {
        for i in 0..f {
            dots[i] += g_dec[j * f + i] * w_dec[j * f + i];
        }
    }
    for j in 0..d {
        for i in 0..f {
            g_dec[j * f + i] -= dots[i] * w_dec[j * f + i];
        }
    }
}

/// Weiszfeld's geometric median of `points (n, d)`: start at the mean, reweight by inverse
/// distance up to 100 times, stop when the move is below 1e-5 (the reference's; distances are
/// floored at 1e-12 so a point equal to the estimate cannot divide by zero).
pub fn geometric_median(points: &[f32], d: usize) -> Vec<f32> {
    let n = points.len() / d;
    let mut guess = vec![0f64; d];
    for p in points.chunks(d) {
        guess.iter_mut().zip(p).for_each(|(g, v)| *g += *v as f64 / n as f64);
    }
    for _ in 0..100 {
        let prev = guess.clone();
        let w: Vec<f64> = points
            .chunks(d)
            .map(|p| 1.0 / p.iter().zip(&prev).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt().max(1e-12))
            .collect();
        let total: f64 = w.iter().sum();
        guess = vec![0f64; d];
        for (p, wi) in points.chunks(d).zip(&w) {
            guess.iter_mut().zip(p).for_each(|(g, v)| *g += wi / total * *v as f64);
        }
        let moved = guess.iter().zip(&prev).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        if moved < 1e-5 {
            break;
        }
    }
    guess.into_iter().map(|v| v as f32).collect()
}

/// What one training step of one module produced.
pub struct StepOut {
    pub fvu: f64,
    pub auxk: f64,
    /// Gradients in the [`ModuleParams`] layout.
    pub grads: ModuleParams,
    /// Top-k indices and ReLU'd values `(N, K)` (for dead-feature tracking).
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

/// Forward and backward of one module on `x (n, d)` -> `y (n, d)`; `dead` marks dead latents
/// (AuxK applies when `auxk_alpha > 0` and some are dead).
#[allow(clippy::too_many_arguments)]
pub fn step(
    p: &ModuleParams,
    x: &[f32],
    y: &[f32],
    d: usize,
    f: usize,
    k: usize,
    dead: &[bool],
    auxk_alpha: f64,
) -> StepOut {
    let n = x.len() / d;
    let [enc, b_enc, dec, b_dec] = p;
    let mut dec_t = vec![0f32; f * d];
    for j in 0..d {
        for i in 0..f {
            dec_t[i * d + j] = dec[j * f + i];
        }
    }
    let xc: Vec<f32> = x.chunks(d).flat_map(|r| r.iter().zip(b_dec.iter()).map(|(a, b)| a - b)).collect();
    let mut pre = vec![0f32; n * f];
    crate::engine::gemm_nt(n, f, d, &xc, enc, &mut pre);
    pre.par_chunks_mut(f).for_each(|r| r.iter_mut().zip(b_enc.iter()).for_each(|(a, b)| *a += b));
    let idx = topk_indices(&pre, f, k);
    let val: Vec<f32> = idx.iter().enumerate().map(|(j, &i)| pre[(j / k) * f + i as usize].max(0.0)).collect();
    let mut yhat = vec![0f32; n * d];
    yhat.par_chunks_mut(d).enumerate().for_each(|(t, r)| {
        r.copy_from_slice(b_dec);
        for kk in 0..k {
            let v = val[t * k + kk];
            if v != 0.0 {
                let i = idx[t * k + kk] as usize;
                r.iter_mut().zip(&dec_t[i * d..(i + 1) * d]).for_each(|(o, w)| *o += v * w);
            }
        }
    });
    // FVU over all tokens of the batch.
    let mut mean = vec![0f64; d];
    for r in y.chunks(d) {
        mean.iter_mut().zip(r).for_each(|(m, v)| *m += *v as f64 / n as f64);
    }
    let den: f64 = y
        .chunks(d)
        .map(|r| r.iter().zip(&mean).map(|(v, m)| (*v as f64 - m).powi(2)).sum::<f64>())
        .sum::<f64>()
        .max(1e-30);
    let num: f64 = yhat.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let fvu = num / den;
    // Gradient of FVU w.r.t. ŷ.
    let g_y: Vec<f32> = yhat.iter().zip(y).map(|(a, b)| (2.0 * (a - b) as f64 / den) as f32).collect();
    // AuxK on dead latents' pre-top-k activations.
    let n_dead = dead.iter().filter(|&&x| x).count();
    let mut auxk = 0f64;
    let mut aux: Option<(Vec<u32>, Vec<f32>, Vec<f32>)> = None; // (idx, act, g_ehat)
    if auxk_alpha > 0.0 && n_dead > 0 {
        let k_aux = (d / 2).min(n_dead).max(1);
        let scale = (n_dead as f64 / (d / 2).max(1) as f64).min(1.0);
        let masked: Vec<f32> = pre
            .par_chunks(f)
            .flat_map_iter(|r| r.iter().zip(dead).map(|(v, &dd)| if dd { v.max(0.0) } else { f32::NEG_INFINITY }))
            .collect();
        let aidx = topk_indices(&masked, f, k_aux);
        let aval: Vec<f32> =
            aidx.iter().enumerate().map(|(j, &i)| masked[(j / k_aux) * f + i as usize].max(0.0)).collect();
        let resid: Vec<f32> = y.iter().zip(&yhat).map(|(a, b)| a - b).collect();
        let mut rmean = vec![0f64; d];
        for r in resid.chunks(d) {
            rmean.iter_mut().zip(r).for_each(|(m, v)| *m += *v as f64 / n as f64);
        }
        let rden: f64 = resid
            .chunks(d)
            .map(|r| r.iter().zip(&rmean).map(|(v, m)| (*v as f64 - m).powi(2)).sum::<f64>())
            .sum::<f64>()
            .max(1e-30);
        let mut ehat = vec![0f32; n * d];
        for t in 0..n {
            for kk in 0..k_aux {
                let v = aval[t * k_aux + kk];
                if v != 0.0 {
                    let i = aidx[t * k_aux + kk] as usize;
                    ehat[t * d..(t + 1) * d].iter_mut().zip(&dec_t[i * d..(i + 1) * d]).for_each(|(o, w)| *o += v * w);
                }
            }
        }
        let anum: f64 = ehat.iter().zip(&resid).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        auxk = scale * anum / rden;
        let coef = auxk_alpha * scale * 2.0 / rden;
        let g_e: Vec<f32> = ehat.iter().zip(&resid).map(|(a, b)| (coef * (a - b) as f64) as f32).collect();
        // Kept for the backward; the residual target is detached.
        aux = Some((aidx, aval, g_e));
    }
    // Backward.
    let mut g_dec_t = vec![0f32; f * d];
    let mut g_pre_sparse: Vec<(usize, u32, f32)> = Vec::new(); // (t, i, g)
    let mut g_bdec = vec![0f32; d];
    for gy in g_y.chunks(d) {
        g_bdec.iter_mut().zip(gy).for_each(|(a, b)| *a += b);
    }
    decode_backward(&g_y, &idx, &val, &dec_t, d, &mut g_dec_t, &mut g_pre_sparse);
    if let Some((aidx, aval, g_e)) = &aux {
        decode_backward(g_e, aidx, aval, &dec_t, d, &mut g_dec_t, &mut g_pre_sparse);
    }
    let mut g_enc = vec![0f32; f * d];
    let mut g_benc = vec![0f32; f];
    for &(t, i, g) in &g_pre_sparse {
        let i = i as usize;
        g_benc[i] += g;
        let xr = &xc[t * d..(t + 1) * d];
        g_enc[i * d..(i + 1) * d].iter_mut().zip(xr).for_each(|(o, v)| *o += g * v);
        // pre depends on x − b_dec: g b_dec −= g E[i]
        g_bdec.iter_mut().zip(&enc[i * d..(i + 1) * d]).for_each(|(o, e)| *o -= g * e);
    }
    let mut g_dec = vec![0f32; d * f];
    for i in 0..f {
        for j in 0..d {
            g_dec[j * f + i] = g_dec_t[i * d + j];
        }
    }
    StepOut { fvu, auxk, grads: [g_enc, g_benc, g_dec, g_bdec], idx, val }
}

/// Backward of `y = Σ_j val[t, j] · dec_t[idx[t, j]]` given `g_y (n, d)`: adds into the decoder
/// gradient and records the gradient of every positive value as a `(t, latent, g)` triple.
fn decode_backward(
    g_y: &[f32],
    idx: &[u32],
    val: &[f32],
    dec_t: &[f32],
    d: usize,
    g_dec_t: &mut [f32],
    g_pre: &mut Vec<(usize, u32, f32)>,
) {
    let n = g_y.len() / d;
    let width = idx.len() / n.max(1);
    for t in 0..n {
        let gy = &g_y[t * d..(t + 1) * d];
        for j in 0..width {
            let v = val[t * width + j];
            if v > 0.0 {
                let i = idx[t * width + j] as usize;
                let g: f32 = gy.iter().zip(&dec_t[i * d..(i + 1) * d]).map(|(a, b)| a * b).sum();
                g_dec_t[i * d..(i + 1) * d].iter_mut().zip(gy).for_each(|(o, gg)| *o += v * gg);
                g_pre.push((t, i as u32, g));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_median_of_a_symmetric_cloud_is_its_centre() {
        // Four corners of a square around (1, 2) and one far outlier: the median barely moves
        // toward the outlier, the mean moves a lot.
        let pts = [0.0, 1.0, 2.0, 1.0, 0.0, 3.0, 2.0, 3.0, 1.0, 2.0, 100.0, 2.0];
        let m = geometric_median(&pts, 2);
        assert!((m[0] - 1.0).abs() < 0.3 && (m[1] - 2.0).abs() < 1e-3, "{m:?}");
    }

    /// The hand-written gradients against central finite differences of the loss: all
    /// parameters without AuxK; with AuxK, the parameters of dead latents that the main top-k
    /// never selects (the only ones AuxK's detached residual target leaves it depending on).
    #[test]
    fn step_gradients_match_finite_differences() {
        let (d, f, k, n) = (4, 6, 2, 5);
        let mut rng = SplitMix(3);
        let mut p = init_params(d, f, &mut rng);
        for v in p.iter_mut().flatten() {
            *v += (rng.normal() * 0.3) as f32;
        }
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let y: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let h = 1e-3f32;
        for alpha in [0.0, 0.5] {
            let base = step(&p, &x, &y, d, f, k, &vec![false; f], 0.0);
            let selected: Vec<bool> = (0..f).map(|i| base.idx.iter().any(|&j| j as usize == i)).collect();
            let dead: Vec<bool> = if alpha > 0.0 { selected.iter().map(|s| !s).collect() } else { vec![false; f] };
            assert!(alpha == 0.0 || dead.iter().any(|&x| x), "need a dead latent");
            let loss = |p: &ModuleParams| {
                let o = step(p, &x, &y, d, f, k, &dead, alpha);
                o.fvu + alpha * o.auxk
            };
            let out = step(&p, &x, &y, d, f, k, &dead, alpha);
            let mut worst = 0f64;
            let mut checked = 0;
            for which in 0..4 {
                for j in 0..p[which].len() {
                    let latent = match which {
                        0 => Some(j / d),
                        1 => Some(j),
                        2 => Some(j % f),
                        _ => None,
                    };
                    if alpha > 0.0 && !latent.is_some_and(|i| dead[i]) {
                        continue;
                    }
                    let mut pp = p.clone();
                    pp[which][j] += h;
                    let up = loss(&pp);
                    pp[which][j] -= 2.0 * h;
                    let down = loss(&pp);
                    let fd = (up - down) / (2.0 * h as f64);
                    let an = out.grads[which][j] as f64;
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

/// Settings of [`update`].
#[derive(Debug, Clone, Copy)]
pub struct UpdateConfig {
    pub d: usize,
    pub f: usize,
    pub k: usize,
    pub auxk_alpha: f64,
    /// Per-module gradient-norm clip (`None`: no clipping).
    pub clip: Option<f64>,
}

/// One training step of every module: unit-norm decoders, forward/backward on each module's
/// `(x, y)`, clipping, removal of the decoder-gradient component parallel to each column, one
/// optimizer step with `lr`. Returns each module's (FVU, AuxK, idx, val).
pub fn update(
    params: &mut crate::train::Params,
    opt: &mut crate::train::Optimizer,
    data: &[(&[f32], &[f32])],
    dead: &[Vec<bool>],
    cfg: UpdateConfig,
    lr: f64,
) -> Vec<(f64, f64, Vec<u32>, Vec<f32>)> {
    let mut grads = Vec::with_capacity(params.modules.len());
    let mut out = Vec::with_capacity(params.modules.len());
    for (m, p) in params.modules.iter_mut().enumerate() {
        normalize_decoder(&mut p[2], cfg.d, cfg.f);
        let (x, y) = data[m];
        let mut s = step(p, x, y, cfg.d, cfg.f, cfg.k, &dead[m], cfg.auxk_alpha);
        if let Some(c) = cfg.clip {
            crate::train::clip_module(&mut s.grads, c);
        }
        remove_parallel_component(&p[2], &mut s.grads[2], cfg.d, cfg.f);
        grads.push(s.grads);
        out.push((s.fvu, s.auxk, s.idx, s.val));
    }
    opt.step(params, &grads, lr);
    out
}
