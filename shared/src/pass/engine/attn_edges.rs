//! Edge terms into attention targets: weights, forward, and backward side by side.
//!
//! Dimensions: B sequences of S positions (q query, p key), N = B·S, D = d_model, H heads of
//! d_h, F features, C slots per downstream feature, K = k. Per head,
//! `w_h[i, c] = (E W_Oᵀ)[i, h] · (W_decᵀ W_V)[j, h]` (a d_h dot product), and
//! `a[q, i] += Σ_h Σ_{p ≤ q} P[h, q, p] · w_h[i, c] · f_u[p, j] / s1[p]`
//! (docs/MATH.md, "Edge terms").

use rayon::prelude::*;

use super::attn_mix::pattern_qph;
use super::{active_ups, add_dec_t_grads, add_up_value_grads, EdgeState, Engine, ModuleState, PreGrad, State};
use crate::data::FlatBatch;
use crate::pass::kernels::{EdgeIndex, EMPTY};
use crate::util::blas::{axpy, dot, fold_rows, sgemm};

/// Key positions per block of the attention edge forward's mixing product (its inner dimension
/// is `KEY_BLOCK · H`).
const KEY_BLOCK: usize = 8;

impl Engine<'_> {
    /// Attention edge weights `w_h[i,c] = (E W_Oᵀ)[i, h] · (W_decᵀ W_V)[j, h]` (d_head dots),
    /// with the two factors.
    pub(super) fn attn_edge_weights(
        &self,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
    ) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let (d, f, h, dh) = (self.d, self.f, self.n_heads, self.d_head);
        let hd = h * dh;
        let lc = &self.layers[layer];
        let ups = &self.plan.down(di).ups;
        let mut ev = vec![0f32; f * hd];
        sgemm(f, hd, d, &self.params[di].enc, d, 1, &lc.w_o, 1, d, &mut ev, false, true);
        let dv: Vec<Vec<f32>> = ups
            .iter()
            .map(|&u| {
                let mut o = vec![0f32; f * hd];
                sgemm(f, hd, d, &self.params[u].dec_t, d, 1, &lc.w_v, hd, 1, &mut o, false, true);
                o
            })
            .collect();
        let width = index.width;
        let mut w = vec![0f32; f * width * h];
        w.par_chunks_mut(width * h).enumerate().for_each(|(i, wrow)| {
            for c in 0..width {
                let col = index.slot_col[i * width + c];
                if col == EMPTY {
                    continue;
                }
                let (pu, j) = (col as usize / f, col as usize % f);
                for hh in 0..h {
                    wrow[c * h + hh] = dot(
                        &ev[i * hd + hh * dh..i * hd + (hh + 1) * dh],
                        &dv[pu][j * hd + hh * dh..j * hd + (hh + 1) * dh],
                    );
                }
            }
        });
        (w, ev, dv)
    }

    /// Per sequence, `Y[p, h, i] = Σ_c w_h[i, c] · f_u[p, j] / s1[p]` pushed from the active
    /// upstream features, then `a[q] += Σ_{p ≤ q} Σ_h P_h[q, p] Y[p, h]` in one causal product.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_edges_forward(
        &self,
        fb: &FlatBatch,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        w_col: &[f32],
        states: &[ModuleState],
        a: &mut [f32],
    ) {
        let (s, f, k, h) = (fb.s, self.f, self.k, self.n_heads);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s1[layer];
        let p = &fb.pattern[layer];
        // Per-thread buffers, reused across sequences (no fresh pages per sequence). Y is laid out
        // [key block][i][key in block][h], so that one edge's H head values are contiguous and
        // each key block is one (KB·H, F) operand of the mixing product.
        let nblk = s.div_ceil(KEY_BLOCK);
        let blk_len = f * KEY_BLOCK * h;
        let init = || (vec![0f32; nblk * blk_len], vec![0f32; s * s * h], Vec::new());
        a.par_chunks_mut(s * f).enumerate().for_each_init(init, |(y, pq, act), (bi, ab)| {
            // Y[p, i, h] = Σ_edges w_h · f_u[p, j] / s1[p], one key block at a time and, within
            // it, one upstream column at a time: the column's edge weights are read once for
            // all its active keys, and the block of Y (F·KB·H) stays in cache.
            y.fill(0.0);
            for blk in 0..nblk {
                let p0 = blk * KEY_BLOCK;
                act.clear();
                for pp in p0..(p0 + KEY_BLOCK).min(s) {
                    let t = bi * s + pp;
                    let inv = 1.0 / sc[t];
                    act.extend(
                        active_ups(states, ups, t, k, f).map(|(_, _, v, col)| (col as u32, (pp - p0) as u32, v * inv)),
                    );
                }
                act.sort_unstable_by_key(|e| (e.0, e.1));
                let yb = &mut y[blk * blk_len..(blk + 1) * blk_len];
                for group in act.chunk_by(|x, z| x.0 == z.0) {
                    let r = index.col_range(group[0].0 as usize);
                    for (ws, &i) in w_col[r.start * h..r.end * h].chunks_exact(h).zip(&index.rev_down[r]) {
                        let row = &mut yb[i as usize * KEY_BLOCK * h..(i as usize + 1) * KEY_BLOCK * h];
                        for &(_, pl, x) in group {
                            let o = pl as usize * h;
                            row[o..o + h].iter_mut().zip(ws).for_each(|(d, &wv)| *d += wv * x);
                        }
                    }
                }
            }
            // a[q] += Σ_{p ≤ q} Σ_h P_h[q, p] Y[p, h], one product per key block over its
            // (key, head) pairs for the queries at or after the block (the pattern, laid out as
            // [q][p][h], is zero above the diagonal).
            pattern_qph(&p[bi * h * s * s..(bi + 1) * h * s * s], s, h, pq);
            for blk in 0..nblk {
                let p0 = blk * KEY_BLOCK;
                let kn = KEY_BLOCK.min(s - p0) * h;
                let pa = &pq[(p0 * s + p0) * h..];
                sgemm(
                    s - p0,
                    f,
                    kn,
                    pa,
                    s * h,
                    1,
                    &y[blk * blk_len..],
                    1,
                    KEY_BLOCK * h,
                    &mut ab[p0 * f..],
                    true,
                    false,
                );
            }
        });
    }

    /// Edge-term backward for an attention target.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_edges_backward(
        &self,
        fb: &FlatBatch,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        w: &[f32],
        pg: &PreGrad,
        state: &State,
        g_val_up: &mut [Vec<f32>],
    ) -> Vec<f32> {
        let (s, f, k, h) = (fb.s, self.f, self.k, self.n_heads);
        let n = fb.b * s;
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s1[layer];
        let p = &fb.pattern[layer];
        let mut scratch = vec![0f32; n * ups.len() * k];
        let seq_len = s * ups.len() * k;
        let dense = self.dense_attn_grad.unwrap_or(f * s * h <= 1 << 24);
        let gw = fold_rows(&mut scratch, seq_len, w.len(), |first, block, gw| {
            // Buffers of the dense strategy, reused by the block's sequences.
            let (mut pq, mut gy) =
                if dense { (vec![0f32; s * s * h], vec![0f32; f * s * h]) } else { (vec![], vec![]) };
            for (r, sb) in block.chunks_mut(seq_len).enumerate() {
                let bi = first + r;
                // gY_h[p, i] = Σ_{q ≥ p} P[h, q, p] g_pre[q, i], g_pre having k entries per row.
                let kb = pg.kb;
                let pb = &p[bi * h * s * s..(bi + 1) * h * s * s];
                // All of gY, pushed from gA's k non-zeros per query, unless its F·S·H buffer is
                // large (then the per-(p, i) sums below). Measured at d_model 768, 16 heads,
                // S 128, C 16 (backward attention edges per step, dense / sparse): F 3072
                // 405 / 393 ms, F 12,288 1503 / 1420 ms; below 2^24 entries dense was cheaper
                // at every toy size (d_model 64–128, F 256–2048). `SCAE_ATTN_GRAD` forces one.
                if dense {
                    // gY as [i][p][h]: every non-zero gA[q, i] (k per query) adds
                    // gA[q, i] · P[q, 0..=q, ·] — one contiguous row of the [q][p][h] pattern.
                    pattern_qph(pb, s, h, &mut pq);
                    gy.fill(0.0);
                    for q in 0..s {
                        let prow = &pq[q * s * h..q * s * h + (q + 1) * h];
                        for kk in 0..kb {
                            let g = pg.g[(bi * s + q) * kb + kk];
                            if g != 0.0 {
                                let i = pg.idx[(bi * s + q) * kb + kk] as usize;
                                axpy(g, prow, &mut gy[i * s * h..i * s * h + (q + 1) * h]);
                            }
                        }
                    }
                    self.attn_edge_grads_by_feature(fb, bi, index, w, &gy, state, ups, sc, sb, gw);
                    continue;
                }
                // Sparse: gY_h[p, i] = Σ_{q ≥ p} P[h, q, p] g_pre[q, i] only for the (p, i)
                // that an active upstream feature at p connects to. g_pre has k entries per row:
                // index it by column (feature i -> its (q, g) entries, q ascending).
                let mut col_ptr = vec![0u32; f + 1];
                for q in 0..s {
                    for kk in 0..kb {
                        if pg.g[(bi * s + q) * kb + kk] != 0.0 {
                            col_ptr[pg.idx[(bi * s + q) * kb + kk] as usize + 1] += 1;
                        }
                    }
                }
                for i in 0..f {
                    col_ptr[i + 1] += col_ptr[i];
                }
                let mut fill = col_ptr.clone();
                let mut entries = vec![(0u32, 0f32); col_ptr[f] as usize];
                for q in 0..s {
                    for kk in 0..kb {
                        let g = pg.g[(bi * s + q) * kb + kk];
                        if g != 0.0 {
                            let i = pg.idx[(bi * s + q) * kb + kk] as usize;
                            entries[fill[i] as usize] = (q as u32, g);
                            fill[i] += 1;
                        }
                    }
                }
                // Otherwise, per key position, a cache of gY_h[p, i] for the i touched at p.
                let mut stamp = vec![u32::MAX; f];
                let mut cache = vec![0f32; f * h];
                for pp in 0..s {
                    let t = bi * s + pp;
                    let inv = 1.0 / sc[t];
                    for (pu, kk, v, col) in active_ups(&state.modules, ups, t, k, f) {
                        let mut acc = 0f32;
                        for (slot, i) in index.edges(col) {
                            if stamp[i] != pp as u32 {
                                stamp[i] = pp as u32;
                                let gyi = &mut cache[i * h..(i + 1) * h];
                                gyi.iter_mut().for_each(|x| *x = 0.0);
                                for &(q, g) in &entries[col_ptr[i] as usize..col_ptr[i + 1] as usize] {
                                    let q = q as usize;
                                    if q < pp {
                                        continue;
                                    }
                                    for (hh, gy) in gyi.iter_mut().enumerate() {
                                        *gy += pb[(hh * s + q) * s + pp] * g;
                                    }
                                }
                            }
                            let gyi = &cache[i * h..(i + 1) * h];
                            for (hh, &g) in gyi.iter().enumerate() {
                                gw[slot as usize * h + hh] += g * v * inv;
                                acc += g * w[slot as usize * h + hh];
                            }
                        }
                        sb[(pp * ups.len() + pu) * k + kk] = acc * inv;
                    }
                }
            }
        });
        add_up_value_grads(ups, &scratch, n, k, g_val_up);
        gw
    }

    /// The attention edge gradients of one sequence `bi` given all of `gY [i][p][h]`, visited
    /// by downstream feature so that `gY[i]`, the edge weights and their gradients are read in
    /// order: `gw[slot] += gY[i, p] · v / s1[p]` and, for the upstream value at `(p, u, kk)`,
    /// `sb += (gY[i, p] · w[slot]) / s1[p]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_edge_grads_by_feature(
        &self,
        fb: &FlatBatch,
        bi: usize,
        index: &EdgeIndex,
        w: &[f32],
        gy: &[f32],
        state: &State,
        ups: &[usize],
        sc: &[f32],
        sb: &mut [f32],
        gw: &mut [f32],
    ) {
        let (s, f, k, h) = (fb.s, self.f, self.k, self.n_heads);
        let width = index.width;
        // Active upstream values of this sequence by upstream column: (position in sb, key
        // position, v / s1).
        let n_cols = ups.len() * f;
        let mut ptr = vec![0u32; n_cols + 1];
        for pp in 0..s {
            for (_, _, _, col) in active_ups(&state.modules, ups, bi * s + pp, k, f) {
                ptr[col + 1] += 1;
            }
        }
        for c in 0..n_cols {
            ptr[c + 1] += ptr[c];
        }
        let mut fill = ptr.clone();
        let mut act = vec![(0u32, 0u32, 0f32); ptr[n_cols] as usize];
        let inv: Vec<f32> = (0..s).map(|pp| 1.0 / sc[bi * s + pp]).collect();
        for pp in 0..s {
            for (pu, kk, v, col) in active_ups(&state.modules, ups, bi * s + pp, k, f) {
                act[fill[col] as usize] = (((pp * ups.len() + pu) * k + kk) as u32, pp as u32, v * inv[pp]);
                fill[col] += 1;
            }
        }
        for i in 0..f {
            let gyi = &gy[i * s * h..(i + 1) * s * h];
            for c in 0..width {
                let slot = i * width + c;
                let col = index.slot_col[slot];
                if col == EMPTY {
                    continue;
                }
                let col = col as usize;
                let wv = &w[slot * h..(slot + 1) * h];
                let gws = &mut gw[slot * h..(slot + 1) * h];
                for &(e, pp, vinv) in &act[ptr[col] as usize..ptr[col + 1] as usize] {
                    let g = &gyi[pp as usize * h..(pp as usize + 1) * h];
                    gws.iter_mut().zip(g).for_each(|(o, &gv)| *o += gv * vinv);
                    sb[e as usize] += dot(g, wv) * inv[pp as usize];
                }
            }
        }
    }

    /// Backward of [`attn_edge_weights`](Self::attn_edge_weights) through its two factors:
    /// `E W_Oᵀ` into `gE`, `W_decᵀ W_V` into each upstream decoder's gradient.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_edge_weights_backward(
        &self,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        gw: &[f32],
        st: &EdgeState,
        g_enc: &mut [f32],
        g_dec_t_in: &mut [Vec<f32>],
    ) {
        let (d, f, h, dh) = (self.d, self.f, self.n_heads, self.d_head);
        let hd = h * dh;
        let ups = &self.plan.down(di).ups;
        let lc = &self.layers[layer];
        let width = index.width;
        let mut g_ev = vec![0f32; f * hd];
        let mut g_dv: Vec<Vec<f32>> = ups.iter().map(|_| vec![0f32; f * hd]).collect();
        for i in 0..f {
            for c in 0..width {
                let slot = i * width + c;
                let col = index.slot_col[slot];
                if col == EMPTY {
                    continue;
                }
                let (pu, j) = (col as usize / f, col as usize % f);
                for hh in 0..h {
                    let g = gw[slot * h + hh];
                    if g == 0.0 {
                        continue;
                    }
                    let r = hh * dh..(hh + 1) * dh;
                    let (evr, dvr) = (i * hd + r.start..i * hd + r.end, j * hd + r.start..j * hd + r.end);
                    axpy(g, &st.dv[pu][dvr.clone()], &mut g_ev[evr.clone()]);
                    axpy(g, &st.ev[evr], &mut g_dv[pu][dvr]);
                }
            }
        }
        // ev = E W_Oᵀ -> gE += g_ev W_O ; dv_u = W_decᵀ_u W_V -> g W_decᵀ_u += g_dv W_Vᵀ
        sgemm(f, d, hd, &g_ev, hd, 1, &lc.w_o, d, 1, g_enc, true, true);
        let g_dec_t_up: Vec<Vec<f32>> = g_dv
            .iter()
            .map(|gdv| {
                let mut o = vec![0f32; f * d];
                sgemm(f, d, hd, gdv, hd, 1, &lc.w_v, 1, hd, &mut o, false, true);
                o
            })
            .collect();
        add_dec_t_grads(ups, g_dec_t_up, g_dec_t_in);
    }
}
