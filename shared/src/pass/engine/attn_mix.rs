//! Attention mixing with the cached pattern in d_model space (the dense attention terms and
//! their transpose), and the pattern's `[q][p][h]` layout that the edge terms' mixing reads.
//!
//! Dimensions: B sequences of S positions, N = B·S tokens, D = d_model, H heads of d_h,
//! F features; patterns are `(B, H, S_q, S_k)`.

use rayon::prelude::*;

use super::Engine;
use crate::data::FlatBatch;
use crate::util::blas::sgemm;

impl Engine<'_> {
    /// `M = mix(X W_V)` then `out = M W_O`: attention mixing of `x (N, D)` with the cached
    /// pattern of `layer`; returns `(N, D)`.
    pub(super) fn attn_mix(&self, fb: &FlatBatch, layer: usize, x: &[f32]) -> Vec<f32> {
        let (b, s, d, h, dh) = (fb.b, fb.s, self.d, self.n_heads, self.d_head);
        let hd = h * dh;
        let n = b * s;
        let lc = &self.layers[layer];
        let mut v = vec![0f32; n * hd];
        sgemm(n, hd, d, x, d, 1, &lc.w_v, hd, 1, &mut v, false, true);
        let mut m = vec![0f32; n * hd];
        let p = &fb.pattern[layer];
        m.par_chunks_mut(s * hd).enumerate().for_each(|(bi, mb)| {
            for hh in 0..h {
                // M[b, :, h, :] = P[b, h] (S, S) · V[b, :, h, :] (S, dh)
                let pb = &p[(bi * h + hh) * s * s..(bi * h + hh + 1) * s * s];
                let vb = &v[bi * s * hd + hh * dh..];
                let mut out = vec![0f32; s * dh];
                sgemm(s, dh, s, pb, s, 1, vb, hd, 1, &mut out, false, false);
                for q in 0..s {
                    mb[q * hd + hh * dh..q * hd + (hh + 1) * dh].copy_from_slice(&out[q * dh..(q + 1) * dh]);
                }
            }
        });
        let mut out = vec![0f32; n * d];
        sgemm(n, d, hd, &m, hd, 1, &lc.w_o, d, 1, &mut out, false, true);
        out
    }

    /// Transpose of [`attn_mix`](Self::attn_mix): `gX` from `g_out (N, D)`.
    pub(super) fn attn_mix_back(&self, fb: &FlatBatch, layer: usize, g_out: &[f32]) -> Vec<f32> {
        let (b, s, d, h, dh) = (fb.b, fb.s, self.d, self.n_heads, self.d_head);
        let hd = h * dh;
        let n = b * s;
        let lc = &self.layers[layer];
        // gM = g_out W_Oᵀ
        let mut gm = vec![0f32; n * hd];
        sgemm(n, hd, d, g_out, d, 1, &lc.w_o, 1, d, &mut gm, false, true);
        let p = &fb.pattern[layer];
        let mut gv = vec![0f32; n * hd];
        gv.par_chunks_mut(s * hd).enumerate().for_each(|(bi, gvb)| {
            for hh in 0..h {
                // gV[b, :, h, :] = P[b, h]ᵀ · gM[b, :, h, :]
                let pb = &p[(bi * h + hh) * s * s..(bi * h + hh + 1) * s * s];
                let gmb = &gm[bi * s * hd + hh * dh..];
                let mut out = vec![0f32; s * dh];
                sgemm(s, dh, s, pb, 1, s, gmb, hd, 1, &mut out, false, false);
                for p_ in 0..s {
                    gvb[p_ * hd + hh * dh..p_ * hd + (hh + 1) * dh].copy_from_slice(&out[p_ * dh..(p_ + 1) * dh]);
                }
            }
        });
        // gX = gV W_Vᵀ
        let mut gx = vec![0f32; n * d];
        sgemm(n, d, hd, &gv, hd, 1, &lc.w_v, 1, hd, &mut gx, false, true);
        gx
    }
}

/// One sequence's pattern `(H, S_q, S_k)` re-laid as `[q][p][h]` (zeros above the diagonal),
/// the layout of the edge forward's mixing product and of the pushed gradient.
pub(super) fn pattern_qph(pb: &[f32], s: usize, h: usize, pq: &mut [f32]) {
    pq.fill(0.0);
    for hh in 0..h {
        for q in 0..s {
            for pp in 0..=q {
                pq[(q * s + pp) * h + hh] = pb[(hh * s + q) * s + pp];
            }
        }
    }
}
