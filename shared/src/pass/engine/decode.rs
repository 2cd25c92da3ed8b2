//! Top-k, ReLU and decoding of a module's pre-activation, forward and backward side by side
//! (docs/MATH.md, "Top-k selection and ties", "Edge terms"): `f = ReLU(top-k(a))`,
//! `R = f W_decᵀ + b_dec`; gradients pass only to the selected positive values (and, with
//! AuxK, to the AuxK latents). Dimensions: N tokens, D = d_model, F features, K = k.

use rayon::prelude::*;

use super::{Engine, ModuleState, PreGrad};
use crate::sae::topk::{relu_at, topk_indices};
use crate::util::blas::{add_into, axpy, by_feature, dot, dots_of_slots};
use crate::util::profile::Profile;

impl Engine<'_> {
    /// Top-k indices, ReLU'd values `(N, K)` and the reconstruction `(N, D)` of module `di`.
    pub(super) fn decode(&self, di: usize, a: &[f32], prof: &mut Profile) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
        let (d, f, k) = (self.d, self.f, self.k);
        let pd = &self.params[di];
        let idx = topk_indices(a, f, k);
        prof.mark("top-k");
        let val = relu_at(a, f, &idx, k);
        let recon = crate::sae::decode(&idx, &val, k, &pd.dec_t, d, Some(&pd.b_dec));
        (idx, val, recon)
    }

    /// Backward of the decoding given `g_rec (N, D)` (w.r.t. the reconstruction with bias) and
    /// `g_rec_nb` (without bias; empty when none): adds into `g_val (N, K)` and returns
    /// `(g W_decᵀ (F, D), g b_dec)`.
    pub(super) fn decode_backward(
        &self,
        di: usize,
        st: &ModuleState,
        mut g_rec: Vec<f32>,
        g_rec_nb: &[f32],
        g_val: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (d, f, k) = (self.d, self.f, self.k);
        let pd = &self.params[di];
        // b_dec gets the gradient of the reconstruction with bias only; the decoder gets both.
        let mut g_bdec: Vec<f32> = vec![0f32; d];
        for row in g_rec.chunks(d) {
            add_into(&mut g_bdec, row);
        }
        if !g_rec_nb.is_empty() {
            add_into(&mut g_rec, g_rec_nb);
        }
        g_val.par_chunks_mut(k).enumerate().for_each(|(t, gvr)| {
            let (gr, val) = (&g_rec[t * d..(t + 1) * d], &st.val[t * k..(t + 1) * k]);
            dots_of_slots(gr, &pd.dec_t, &st.idx[t * k..(t + 1) * k], |kk| val[kk] != 0.0, |kk, g| gvr[kk] += g);
        });
        let g_dec_t = by_feature(&st.idx, k, f, d, |j| st.val[j], &g_rec);
        (g_dec_t, g_bdec)
    }

    /// Through ReLU + top-k: the sparse gradient of the pre-activation from `g_val (N, K)`;
    /// with AuxK, `k_aux` more entries per token (the AuxK latents), whose decoder gradient is
    /// added into `g_dec_t`.
    pub(super) fn pre_grad(&self, di: usize, st: &ModuleState, g_val: &[f32], g_dec_t: &mut [f32]) -> PreGrad {
        let (d, k) = (self.d, self.k);
        let n = st.idx.len() / k;
        let pd = &self.params[di];
        let aux = match &st.aux {
            Some(aux) if !st.aux_g.is_empty() => aux,
            _ => {
                let g = (0..n * k).map(|j| if st.val[j] > 0.0 { g_val[j] } else { 0.0 }).collect();
                return PreGrad { idx: st.idx.clone(), g, kb: k };
            }
        };
        let ka = aux.k_aux;
        let kb = k + ka;
        let (mut idx, mut g) = (vec![0u32; n * kb], vec![0f32; n * kb]);
        for t in 0..n {
            for kk in 0..k {
                idx[t * kb + kk] = st.idx[t * k + kk];
                g[t * kb + kk] = if st.val[t * k + kk] > 0.0 { g_val[t * k + kk] } else { 0.0 };
            }
            let ag = &st.aux_g[t * d..(t + 1) * d];
            for j in 0..ka {
                let (i, v) = (aux.idx[t * ka + j] as usize, aux.val[t * ka + j]);
                idx[t * kb + k + j] = i as u32;
                if v > 0.0 {
                    g[t * kb + k + j] = dot(ag, &pd.dec_t[i * d..(i + 1) * d]);
                    axpy(v, ag, &mut g_dec_t[i * d..(i + 1) * d]);
                }
            }
        }
        PreGrad { idx, g, kb }
    }
}
