//! Edge terms into attention targets: weights, forward, and backward side by side.
//!
//! Dimensions: B sequences of S positions (q query, p key), N = B·S, D = d_model, H heads of
//! d_h, F features, C slots per downstream feature, K = k. Per head,
//! `w_h[i, c] = (E W_Oᵀ)[i, h] · (W_decᵀ W_V)[j, h]` (a d_h dot product), and
//! `a[q, i] += Σ_h Σ_{p ≤ q} P[h, q, p] · w_h[i, c] · f_u[p, j] / s1[p]`
//! (docs/MATH.md, "Edge terms").

use rayon::prelude::*;

use super::attn_mix::pattern_qph;
use super::embed_edges::embed_values;
use super::pair_kernels::{pull_column, push_column, BlockValue};
use super::{active_ups, add_up_value_grads, EdgeState, Engine, ModuleState, PreGrad, State};
use crate::data::FlatBatch;
use crate::pass::kernels::{EdgeIndex, EMPTY};
use crate::pass::plan::EmbedPlan;
use crate::util::blas::{add_into, axpy, dot, fold_rows, sgemm};

/// Key positions per block of the attention edge forward's mixing product (its inner dimension
/// is `KEY_BLOCK · H`).
const KEY_BLOCK: usize = 8;

/// One (edge, active upstream value) pair of the attention edge backward: the edge weight's
/// gradient `gw += gY · v / s1` and, into `acc`, `gY ⊙ w` (summed over heads later).
#[inline]
fn edge_grad_update(gy: &[f32], w: &[f32], vinv: f32, gw: &mut [f32], acc: &mut [f32]) {
    for (((o, a), &g), &wv) in gw.iter_mut().zip(acc.iter_mut()).zip(gy).zip(w) {
        *o += g * vinv;
        *a += g * wv;
    }
}

impl Engine<'_> {
    /// Attention edge weights `w_h[i,c] = (E W_Oᵀ)[i, h] · (W_decᵀ W_V)[j, h]` (d_head dots),
    /// with the two factors. `W_decᵀ W_V` is formed only for the upstream features that have
    /// an edge into this module and are active somewhere in the batch (`states`): an edge from
    /// a silent feature adds nothing to the pass and gets no gradient, so its weight (left 0)
    /// is never read.
    pub(super) fn attn_edge_weights(
        &self,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        states: &[ModuleState],
    ) -> (Vec<f32>, Vec<f32>, Vec<ActiveRows>) {
        let (d, f, h, dh) = (self.d, self.f, self.n_heads, self.d_head);
        let hd = h * dh;
        let lc = &self.layers[layer];
        let ups = &self.plan.down(di).ups;
        let mut ev = vec![0f32; f * hd];
        sgemm(f, hd, d, &self.params[di].enc, d, 1, &lc.w_o, 1, d, &mut ev, false, true);
        let dv: Vec<ActiveRows> = ups
            .iter()
            .enumerate()
            .map(|(pu, &u)| {
                let rows: Vec<u32> = (0..f as u32)
                    .filter(|&j| states[u].fired[j as usize] && !index.col_range(pu * f + j as usize).is_empty())
                    .collect();
                let dec_t = &self.params[u].dec_t;
                ActiveRows::build(rows, f, |j| &dec_t[j as usize * d..(j as usize + 1) * d], &lc.w_v, d, hd)
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
                let Some(dvr) = dv[pu].row(j, hd) else { continue };
                for hh in 0..h {
                    wrow[c * h + hh] = dot(&ev[i * hd + hh * dh..i * hd + (hh + 1) * dh], &dvr[hh * dh..(hh + 1) * dh]);
                }
            }
        });
        (w, ev, dv)
    }

    /// Per sequence, `Y[p, h, i] = Σ_c w_h[i, c] · f_u[p, j] / s1[p]` pushed from the active
    /// upstream features (and, with `embed`, from each position's token through the embed
    /// edges' weights, value 1), then `a[q] += Σ_{p ≤ q} Σ_h P_h[q, p] Y[p, h]` in one causal
    /// product.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_edges_forward(
        &self,
        fb: &FlatBatch,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        w_col: &[f32],
        states: &[ModuleState],
        embed: Option<(&EmbedPlan, &[f32])>,
        a: &mut [f32],
    ) {
        let (s, f, k, h) = (fb.s, self.f, self.k, self.n_heads);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s1[layer];
        let p = &fb.pattern[layer];
        // Per-thread buffers, reused across sequences and key blocks. One key block of Y is laid
        // out [i][key in block][h], so that one edge's H head values are contiguous and the block
        // is one (KB·H, F) operand of the mixing product; at F·KB·H floats it stays in cache
        // between being filled and being mixed.
        let nblk = s.div_ceil(KEY_BLOCK);
        let init = || (vec![0f32; f * KEY_BLOCK * h], vec![0f32; s * s * h], Vec::new(), Vec::new());
        a.par_chunks_mut(s * f).enumerate().for_each_init(init, |(y, pq, act, vals), (bi, ab)| {
            // The pattern as [q][p][h] (zero above the diagonal): a key block's rows for the
            // queries at or after it are the left operand of its mixing product.
            pattern_qph(&p[bi * h * s * s..(bi + 1) * h * s * s], s, h, pq);
            for blk in 0..nblk {
                let p0 = blk * KEY_BLOCK;
                // Y[p, i, h] = Σ_edges w_h · f_u[p, j] / s1[p] over the block's keys, one upstream
                // column at a time: the column's edge weights are read once for all its active keys.
                y.fill(0.0);
                act.clear();
                for pp in p0..(p0 + KEY_BLOCK).min(s) {
                    let t = bi * s + pp;
                    let inv = 1.0 / sc[t];
                    act.extend(
                        active_ups(states, ups, t, k, f).map(|(_, _, v, col)| (col as u32, (pp - p0) as u32, v * inv)),
                    );
                }
                act.sort_unstable_by_key(|e| (e.0, e.1));
                for group in act.chunk_by(|x, z| x.0 == z.0) {
                    let r = index.col_range(group[0].0 as usize);
                    vals.clear();
                    vals.extend(group.iter().map(|&(_, pos, x)| BlockValue { pos, x }));
                    push_column(h, KEY_BLOCK * h, &w_col[r.start * h..r.end * h], &index.rev_down[r], &vals, y);
                }
                if let Some((ep, ew)) = embed {
                    act.clear();
                    act.extend(embed_values(fb, ep, sc, bi * s + p0, KEY_BLOCK.min(s - p0)));
                    act.sort_unstable_by_key(|e| (e.0, e.1));
                    for group in act.chunk_by(|x, z| x.0 == z.0) {
                        let r = ep.index.col_range(group[0].0 as usize);
                        vals.clear();
                        vals.extend(group.iter().map(|&(_, pos, x)| BlockValue { pos, x }));
                        push_column(h, KEY_BLOCK * h, &ew[r.start * h..r.end * h], &ep.index.rev_down[r], &vals, y);
                    }
                }
                // a[q] += Σ_{p in block} Σ_h P_h[q, p] Y[p, h] for the queries at or after the block.
                let kn = KEY_BLOCK.min(s - p0) * h;
                let pa = &pq[(p0 * s + p0) * h..];
                sgemm(s - p0, f, kn, pa, s * h, 1, y, 1, KEY_BLOCK * h, &mut ab[p0 * f..], true, false);
            }
        });
    }

    /// Edge-term backward for an attention target, given the edge weights in column order
    /// (and the embed edges' with `embed`); returns their gradients in column order (the embed
    /// edges' second, empty without).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_edges_backward(
        &self,
        fb: &FlatBatch,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        w_col: &[f32],
        pg: &PreGrad,
        state: &State,
        embed: Option<(&EmbedPlan, &[f32])>,
        g_val_up: &mut [Vec<f32>],
    ) -> (Vec<f32>, Vec<f32>) {
        let (s, f, k, h) = (fb.s, self.f, self.k, self.n_heads);
        let n = fb.b * s;
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s1[layer];
        let p = &fb.pattern[layer];
        // One row of upstream value gradients per sequence (at least one float, so that
        // sequences are visited also when only embed edges feed the module).
        let seq_len = (s * ups.len() * k).max(1);
        let mut scratch = vec![0f32; fb.b * seq_len];
        // The dense strategy pushes all of gY, one key block (F·8·H floats) at a time, from gA's k
        // non-zeros per query; the sparse one forms gY only at the (p, i) that edges read, from
        // the gA entries of feature i. Measured at TinyStories-33M shape (d_model 768, 16 heads,
        // S 128, C 16, 8 sequences, 2 threads; attention edge backward per step, dense /
        // sparse): F 3072 292 / 347 ms, F 12,288 1142 / 1332 ms, and dense was cheaper at every
        // toy size too, so it is the default; both give identical gradients (`SCAE_ATTN_GRAD`
        // forces one).
        // Embed edges are handled by the dense strategy only.
        let dense = self.dense_attn_grad.unwrap_or(true) || embed.is_some();
        let n_feat = w_col.len();
        let n_embed = embed.map_or(0, |(_, ew)| ew.len());
        let gw_all = fold_rows(&mut scratch, seq_len, n_feat + n_embed, |first, block, gw_all| {
            let (gw, gw_embed) = gw_all.split_at_mut(n_feat);
            // Buffers reused by the block's sequences: the pattern as [q][p][h]; for the dense
            // strategy one key block of gY and its active upstream values, for the sparse one
            // the cache of gY rows at one key position.
            let mut pq = vec![0f32; s * s * h];
            let (mut gy, mut act) = if dense { (vec![0f32; f * KEY_BLOCK * h], Vec::new()) } else { (vec![], vec![]) };
            let (mut stamp, mut cache) = if dense { (vec![], vec![]) } else { (vec![u32::MAX; f], vec![0f32; f * h]) };
            // Per active value of one column, Σ over the column's edges of gY ⊙ w (reduced over
            // heads once per value).
            let mut acc = vec![0f32; KEY_BLOCK * h];
            let mut vals = Vec::with_capacity(KEY_BLOCK);
            let mut eact: Vec<(u32, u32, f32)> = Vec::new();
            for (r, sb) in block.chunks_mut(seq_len).enumerate() {
                let bi = first + r;
                // gY_h[p, i] = Σ_{q ≥ p} P[h, q, p] g_pre[q, i], g_pre having k entries per row.
                let kb = pg.kb;
                let pb = &p[bi * h * s * s..(bi + 1) * h * s * s];
                if dense {
                    pattern_qph(pb, s, h, &mut pq);
                    for blk in 0..s.div_ceil(KEY_BLOCK) {
                        let p0 = blk * KEY_BLOCK;
                        let kl = KEY_BLOCK.min(s - p0);
                        // gY of the block as [i][key in block][h]: every non-zero gA[q, i] (k per
                        // query, q ≥ p0) adds gA[q, i] · P[q, p0..=min(q, p0 + kl − 1), ·].
                        gy.fill(0.0);
                        for q in p0..s {
                            let len = kl.min(q + 1 - p0) * h;
                            let prow = &pq[(q * s + p0) * h..(q * s + p0) * h + len];
                            for kk in 0..kb {
                                let g = pg.g[(bi * s + q) * kb + kk];
                                if g != 0.0 {
                                    let i = pg.idx[(bi * s + q) * kb + kk] as usize;
                                    let o = i * KEY_BLOCK * h;
                                    axpy(g, prow, &mut gy[o..o + len]);
                                }
                            }
                        }
                        // The block's active upstream values by column, keys ascending; for each
                        // edge reading the column (column order: its weights and gradients are
                        // contiguous), gw += gY[i, p] · v / s1[p] and the value's gradient +=
                        // (gY[i, p] · w) / s1[p].
                        act.clear();
                        for pp in p0..p0 + kl {
                            let t = bi * s + pp;
                            let inv = 1.0 / sc[t];
                            act.extend(active_ups(&state.modules, ups, t, k, f).map(|(pu, kk, v, col)| {
                                (col as u32, (pp - p0) as u32, ((pp * ups.len() + pu) * k + kk) as u32, v * inv, inv)
                            }));
                        }
                        act.sort_unstable_by_key(|e| (e.0, e.1));
                        for group in act.chunk_by(|x, z| x.0 == z.0) {
                            let r = index.col_range(group[0].0 as usize);
                            let acc = &mut acc[..group.len() * h];
                            acc.fill(0.0);
                            vals.clear();
                            vals.extend(group.iter().map(|&(_, pos, _, x, _)| BlockValue { pos, x }));
                            let (wr, gr) = (&w_col[r.start * h..r.end * h], &mut gw[r.start * h..r.end * h]);
                            pull_column(h, KEY_BLOCK * h, wr, gr, &index.rev_down[r], &vals, &gy, acc);
                            for (&(_, _, e, _, inv), ac) in group.iter().zip(acc.chunks_exact(h)) {
                                sb[e as usize] += ac.iter().sum::<f32>() * inv;
                            }
                        }
                        // The embed edges of the block's positions (their values are constants:
                        // only the weights get a gradient).
                        if let Some((ep, ew)) = embed {
                            eact.clear();
                            eact.extend(embed_values(fb, ep, sc, bi * s + p0, kl));
                            eact.sort_unstable_by_key(|e| (e.0, e.1));
                            for group in eact.chunk_by(|x, z| x.0 == z.0) {
                                let r = ep.index.col_range(group[0].0 as usize);
                                let acc = &mut acc[..group.len() * h];
                                acc.fill(0.0);
                                vals.clear();
                                vals.extend(group.iter().map(|&(_, pos, x)| BlockValue { pos, x }));
                                let (wr, gr) = (&ew[r.start * h..r.end * h], &mut gw_embed[r.start * h..r.end * h]);
                                pull_column(h, KEY_BLOCK * h, wr, gr, &ep.index.rev_down[r], &vals, &gy, acc);
                            }
                        }
                    }
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
                // Per key position, gY[i, p, ·] for the i that the position's active upstream
                // values reach, each computed once (`stamp`) from the pattern as [q][p][h] (the
                // H heads of one (q, p) contiguous); then the same updates as the dense path, in
                // the same order (both strategies give identical results).
                pattern_qph(pb, s, h, &mut pq);
                stamp.fill(u32::MAX);
                for pp in 0..s {
                    let t = bi * s + pp;
                    let inv = 1.0 / sc[t];
                    for (pu, kk, v, col) in active_ups(&state.modules, ups, t, k, f) {
                        let (e, vinv) = ((pp * ups.len() + pu) * k + kk, v * inv);
                        let acc = &mut acc[..h];
                        acc.fill(0.0);
                        let r = index.col_range(col);
                        for (e_pos, &i) in r.clone().zip(&index.rev_down[r]) {
                            let i = i as usize;
                            let gyi = &mut cache[i * h..(i + 1) * h];
                            if stamp[i] != pp as u32 {
                                stamp[i] = pp as u32;
                                gyi.fill(0.0);
                                for &(q, g) in &entries[col_ptr[i] as usize..col_ptr[i + 1] as usize] {
                                    let q = q as usize;
                                    if q >= pp {
                                        axpy(g, &pq[(q * s + pp) * h..(q * s + pp + 1) * h], gyi);
                                    }
                                }
                            }
                            let (wv, gws) = (&w_col[e_pos * h..(e_pos + 1) * h], &mut gw[e_pos * h..(e_pos + 1) * h]);
                            edge_grad_update(&cache[i * h..(i + 1) * h], wv, vinv, gws, acc);
                        }
                        sb[e] += acc.iter().sum::<f32>() * inv;
                    }
                }
            }
        });
        add_up_value_grads(ups, &scratch, n, k, g_val_up);
        let gw_embed = gw_all[n_feat..].to_vec();
        let mut gw = gw_all;
        gw.truncate(n_feat);
        (gw, gw_embed)
    }

    /// Backward of [`attn_edge_weights`](Self::attn_edge_weights) through its two factors,
    /// given the edge weights' gradients in column order: `E W_Oᵀ` into `gE`, `W_decᵀ W_V`
    /// into each upstream decoder's gradient.
    /// With `embed` (its plan and its edges' gradients in column order), the embed edges'
    /// weights `ev[i, h] · (W_E[token] W_V)[h]` add into `g_ev` too (`W_E` is frozen).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_edge_weights_backward(
        &self,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        gw_col: &[f32],
        st: &EdgeState,
        embed: Option<(&EmbedPlan, &[f32])>,
        g_enc: &mut [f32],
        g_dec_t_in: &mut [Vec<f32>],
    ) {
        let (d, f, h, dh) = (self.d, self.f, self.n_heads, self.d_head);
        let hd = h * dh;
        let ups = &self.plan.down(di).ups;
        let lc = &self.layers[layer];
        // g_ev[i, h] = Σ_c gw[i, c, h] · dv[j, h], parallel over downstream features i; g_dv[u][j, h] =
        // Σ_{slots reading (u, j)} gw[slot, h] · ev[i, h], parallel over the active upstream
        // columns (u, j), each column's slots in index order (deterministic). Edges from silent
        // upstream features have no gradient.
        let gw = index.to_slot_order(gw_col, h);
        let gw_e = embed.map(|(ep, g)| ep.index.to_slot_order(g, h));
        let mut g_ev = vec![0f32; f * hd];
        // gev += Σ_h g[slot, h] · dv_row[h] over one index's slots of feature i.
        fn add_slots<'r>(
            gev: &mut [f32],
            i: usize,
            ix: &EdgeIndex,
            g: &[f32],
            (h, dh): (usize, usize),
            row: impl Fn(u32) -> Option<&'r [f32]>,
        ) {
            for c in 0..ix.width {
                let slot = i * ix.width + c;
                let col = ix.slot_col[slot];
                if col == EMPTY {
                    continue;
                }
                let Some(dvr) = row(col) else { continue };
                for hh in 0..h {
                    let gv = g[slot * h + hh];
                    if gv != 0.0 {
                        let r = hh * dh..(hh + 1) * dh;
                        axpy(gv, &dvr[r.clone()], &mut gev[r]);
                    }
                }
            }
        }
        g_ev.par_chunks_mut(hd).enumerate().for_each(|(i, gev)| {
            add_slots(gev, i, index, &gw, (h, dh), |col| st.dv[col as usize / f].row(col as usize % f, hd));
            if let (Some((ep, _)), Some(g)) = (embed, &gw_e) {
                add_slots(gev, i, &ep.index, g, (h, dh), |col| st.embed_dv.row(col as usize, hd));
            }
        });
        // ev = E W_Oᵀ -> gE += g_ev W_O
        sgemm(f, d, hd, &g_ev, hd, 1, &lc.w_o, d, 1, g_enc, true, true);
        // dv_u = W_decᵀ_u W_V -> g W_decᵀ_u += g_dv W_Vᵀ, on the active rows only
        for (pu, &u) in ups.iter().enumerate() {
            let rows = &st.dv[pu].rows;
            let mut g_dv = vec![0f32; rows.len() * hd];
            g_dv.par_chunks_mut(hd).zip(rows.par_iter()).for_each(|(gdv, &j)| {
                let r = index.col_range(pu * f + j as usize);
                for (e_pos, &i) in r.clone().zip(&index.rev_down[r]) {
                    let i = i as usize;
                    for hh in 0..h {
                        let g = gw_col[e_pos * h + hh];
                        if g != 0.0 {
                            let r = hh * dh..(hh + 1) * dh;
                            axpy(g, &st.ev[i * hd + r.start..i * hd + r.end], &mut gdv[r]);
                        }
                    }
                }
            });
            let mut g_dec = vec![0f32; rows.len() * d];
            sgemm(rows.len(), d, hd, &g_dv, hd, 1, &lc.w_v, 1, hd, &mut g_dec, false, true);
            let total = &mut g_dec_t_in[u];
            if total.is_empty() {
                *total = vec![0f32; f * d];
            }
            for (g, &j) in g_dec.chunks_exact(d).zip(rows) {
                add_into(&mut total[j as usize * d..(j as usize + 1) * d], g);
            }
        }
    }
}

/// `W_decᵀ W_V (·, H·dh)` of one upstream module on the rows of its features active in the
/// batch.
#[derive(Default)]
pub(super) struct ActiveRows {
    /// The active features, ascending.
    rows: Vec<u32>,
    /// Feature -> its row in `vals`, or EMPTY.
    map: Vec<u32>,
    vals: Vec<f32>,
}

impl ActiveRows {
    /// `dec_row(j) · W_V (D, H·dh)` for each of `rows` (ascending, below `n_cols`).
    pub(super) fn build<'r>(
        rows: Vec<u32>,
        n_cols: usize,
        dec_row: impl Fn(u32) -> &'r [f32],
        w_v: &[f32],
        d: usize,
        hd: usize,
    ) -> ActiveRows {
        let mut map = vec![EMPTY; n_cols];
        let mut dec = Vec::with_capacity(rows.len() * d);
        for (m, &j) in rows.iter().enumerate() {
            map[j as usize] = m as u32;
            dec.extend_from_slice(dec_row(j));
        }
        let mut vals = vec![0f32; rows.len() * hd];
        sgemm(rows.len(), hd, d, &dec, d, 1, w_v, hd, 1, &mut vals, false, true);
        ActiveRows { rows, map, vals }
    }

    /// Feature `j`'s row (`width` values), if it is active.
    pub(super) fn row(&self, j: usize, width: usize) -> Option<&[f32]> {
        let m = self.map[j];
        (m != EMPTY).then(|| &self.vals[m as usize * width..(m as usize + 1) * width])
    }
}
