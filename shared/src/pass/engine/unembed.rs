//! The spliced CE with unembed edges on host buffers (docs/MATH.md, "Embed and unembed
//! connections"): output token v reads `dense + Σ_{(m,j) ∈ U(v)} f_m[t,j] W_dec^m[:,j]`, with
//! `dense = r0 + Σ_m b_dec^m`, divided by LNPre's scale `s[t]` of the whole spliced residual.
//! Its gradient reaches the reconstructions through `s` (every module alike), each module's
//! selected values and decoder through the edges, and every `b_dec` through the dense term.
//!
//! Dimensions: N tokens, D = d_model, V vocabulary, F features, K = k, E unembed edges.

use rayon::prelude::*;

use super::{Engine, State};
use crate::data::FlatBatch;
use crate::error::Result;
use crate::pass::objective::{ce_rows, ln_pre_stats};
use crate::util::blas::{add_into, axpy, dot, sgemm};
use crate::util::collective::Collective;

/// `W_U (D, V)`, its transpose and `b_U`, when the plan has unembed edges.
pub(super) struct UnembedConsts {
    pub w_u: Vec<f32>,
    pub w_u_t: Vec<f32>,
    pub b_u: Vec<f32>,
}

/// What the spliced CE with unembed edges sends past the reconstructions: into each module's
/// selected values `(N, K)` and `W_decᵀ (F, D)`, and into every module's `b_dec (D)`; with
/// gates on the unembed edges ([`Engine::gated`]), into the gates (the plan's unembed slots,
/// `(V_n, C_u)`; empty without).
pub struct UnembedGrads {
    pub g_val: Vec<Vec<f32>>,
    pub g_dec_t: Vec<Vec<f32>>,
    pub g_bdec: Vec<f32>,
    pub g_gates: Vec<f32>,
}

impl UnembedGrads {
    /// Every gradient times `w` (the CE's weight in the loss).
    pub fn scaled(mut self, w: f32) -> UnembedGrads {
        self.g_val.iter_mut().chain(self.g_dec_t.iter_mut()).flatten().for_each(|x| *x *= w);
        self.g_bdec.iter_mut().chain(self.g_gates.iter_mut()).for_each(|x| *x *= w);
        self
    }
}

/// One chunk of rows: its loss sum, the edges' weight gradients, the dense term's gradient
/// and the selected values' gradients `(rows, modules, K)`.
type ChunkGrads = (f64, Vec<f32>, Vec<f32>, Vec<f32>);

impl Engine<'_> {
    /// The spliced CE (mean over B·(S−1)) with the plan's unembed edges, its gradient w.r.t.
    /// every reconstruction `(N, D)` (the same for all modules) and the rest of its gradient;
    /// `None` when the plan has no unembed edges. The mean is over the whole batch when its
    /// sequences are spread over the ranks of `coll` (`fb`: this rank's).
    pub fn unembed_ce_loss_and_grad(
        &self,
        coll: &dyn Collective,
        fb: &FlatBatch,
        state: &State,
    ) -> Result<Option<(f64, Vec<f32>, UnembedGrads)>> {
        let (Some(up), Some(uc)) = (&self.plan.unembed, &self.unembed) else { return Ok(None) };
        let ix = &up.index;
        let (b, s, d, f, k) = (fb.b, fb.s, self.d, self.f, self.k);
        let (n, n_mod, v) = (b * s, state.modules.len(), uc.b_u.len());
        let eps = self.ln_eps;
        let mut resid = fb.r0.clone();
        for st in &state.modules {
            add_into(&mut resid, &st.recon);
        }
        let mut ub = vec![0f32; d];
        for p in &self.params {
            add_into(&mut ub, &p.b_dec);
        }
        // u[e] = W_dec^m[:, j] · W_U[:, v] per edge, in column order (times its gate, if any).
        let u_raw: Vec<f32> = (0..ix.rev_slots.len())
            .into_par_iter()
            .map(|e| {
                let col = ix.slot_col[ix.rev_slots[e] as usize] as usize;
                let tok = ix.rev_down[e] as usize;
                dot(&self.params[col / f].dec_t[(col % f) * d..(col % f + 1) * d], &uc.w_u_t[tok * d..(tok + 1) * d])
            })
            .collect();
        let gates = self.gates.and_then(|g| g.unembed.as_deref());
        let u_gated: Option<Vec<f32>> =
            gates.map(|z| u_raw.iter().zip(&ix.rev_slots).map(|(x, &slot)| x * z[slot as usize]).collect());
        let u = u_gated.as_deref().unwrap_or(&u_raw);
        let count = (b * coll.size() * (s - 1)) as f64;
        // Each active selected value at token t: (module, slot, value, column).
        let active = |t: usize| {
            state.modules.iter().enumerate().flat_map(move |(m, st)| {
                (0..k).filter_map(move |kk| {
                    let val = st.val[t * k + kk];
                    (val != 0.0).then(|| (m, kk, val, m * f + st.idx[t * k + kk] as usize))
                })
            })
        };
        let chunk = 64usize;
        let mut g_resid = vec![0f32; n * d];
        let parts: Vec<ChunkGrads> = g_resid
            .par_chunks_mut(chunk * d)
            .enumerate()
            .map(|(ci, gchunk)| {
                let rows = gchunk.len() / d;
                let t0 = ci * chunk;
                let (mut cen, mut dn, mut sig) = (vec![0f32; rows * d], vec![0f32; rows * d], vec![0f32; rows]);
                for r in 0..rows {
                    let t = t0 + r;
                    let x = &resid[t * d..(t + 1) * d];
                    let (mu, sd) = ln_pre_stats(x, eps);
                    sig[r] = sd;
                    for j in 0..d {
                        cen[r * d + j] = x[j] - mu;
                        dn[r * d + j] = (fb.r0[t * d + j] + ub[j]) / sig[r];
                    }
                }
                // pre[r, v] = logit − b_U: the dense term, then the edges.
                let mut pre = vec![0f32; rows * v];
                sgemm(rows, v, d, &dn, d, 1, &uc.w_u, v, 1, &mut pre, false, false);
                for r in 0..rows {
                    let inv = 1.0 / sig[r];
                    for (_, _, val, col) in active(t0 + r) {
                        let range = ix.col_range(col);
                        for (e, &tok) in range.clone().zip(&ix.rev_down[range]) {
                            pre[r * v + tok as usize] += val * u[e] * inv;
                        }
                    }
                }
                let mut glog = vec![0f32; rows * v];
                let loss = ce_rows(fb, t0, &pre, &uc.b_u, count, &mut glog);
                // Through the scale: ∂s/∂resid = (resid − μ) / (D s), ∂logit_v/∂s = −pre_v / s.
                for r in 0..rows {
                    let gs: f32 =
                        -glog[r * v..(r + 1) * v].iter().zip(&pre[r * v..(r + 1) * v]).map(|(g, p)| g * p).sum::<f32>()
                            / sig[r];
                    let c = gs / (d as f32 * sig[r]);
                    gchunk[r * d..(r + 1) * d].iter_mut().zip(&cen[r * d..(r + 1) * d]).for_each(|(o, x)| *o = c * x);
                }
                // The dense term: g b_dec = Σ_t (g_logit W_Uᵀ) / s.
                let mut gn = vec![0f32; rows * d];
                sgemm(rows, d, v, &glog, v, 1, &uc.w_u, 1, v, &mut gn, false, false);
                let mut g_bdec = vec![0f32; d];
                for r in 0..rows {
                    axpy(1.0 / sig[r], &gn[r * d..(r + 1) * d], &mut g_bdec);
                }
                // The edges: values and weights.
                let mut gu = vec![0f32; u.len()];
                let mut gval = vec![0f32; rows * n_mod * k];
                for r in 0..rows {
                    let inv = 1.0 / sig[r];
                    for (m, kk, val, col) in active(t0 + r) {
                        let range = ix.col_range(col);
                        let mut acc = 0f32;
                        for (e, &tok) in range.clone().zip(&ix.rev_down[range]) {
                            let g = glog[r * v + tok as usize];
                            acc += g * u[e];
                            gu[e] += g * val * inv;
                        }
                        gval[(r * n_mod + m) * k + kk] = acc * inv;
                    }
                }
                (loss, gu, g_bdec, gval)
            })
            .collect();
        let mut loss = 0f64;
        let mut gu = vec![0f32; u.len()];
        let mut g_bdec = vec![0f32; d];
        let mut g_val: Vec<Vec<f32>> = (0..n_mod).map(|_| vec![0f32; n * k]).collect();
        for (ci, (l, gu_c, gb_c, gval_c)) in parts.into_iter().enumerate() {
            loss += l;
            add_into(&mut gu, &gu_c);
            add_into(&mut g_bdec, &gb_c);
            for (r, row) in gval_c.chunks(n_mod * k).enumerate() {
                let t = ci * chunk + r;
                for (m, gm) in g_val.iter_mut().enumerate() {
                    add_into(&mut gm[t * k..(t + 1) * k], &row[m * k..(m + 1) * k]);
                }
            }
        }
        // The gates' gradient gu·u and the raw weights' gu·z (docs/MATH.md, "Learned connections").
        let mut g_gates = Vec::new();
        if let Some(z) = gates {
            g_gates = vec![0f32; ix.slot_col.len()];
            for ((g, &raw), &slot) in gu.iter_mut().zip(&u_raw).zip(&ix.rev_slots) {
                g_gates[slot as usize] = *g * raw;
                *g *= z[slot as usize];
            }
        }
        // g W_decᵀ_m[j] += Σ_{edges (m, j) -> v} gu[e] W_U[:, v].
        let mut g_dec_t: Vec<Vec<f32>> = (0..n_mod).map(|_| vec![0f32; f * d]).collect();
        g_dec_t.par_iter_mut().enumerate().for_each(|(m, gd)| {
            for j in 0..f {
                let range = ix.col_range(m * f + j);
                for (e, &tok) in range.clone().zip(&ix.rev_down[range]) {
                    if gu[e] != 0.0 {
                        axpy(gu[e], &uc.w_u_t[tok as usize * d..(tok as usize + 1) * d], &mut gd[j * d..(j + 1) * d]);
                    }
                }
            }
        });
        let mut sum = [loss];
        coll.sum_f64(&mut sum)?;
        Ok(Some((sum[0] / count, g_resid, UnembedGrads { g_val, g_dec_t, g_bdec, g_gates })))
    }
}
