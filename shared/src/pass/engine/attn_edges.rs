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
use super::pair_kernels::{pull_slots, push_slots, ColValue, ColValues};
use super::{active_ups, add_up_value_grads, ActiveRows, EdgeState, Engine, ModuleState, PreGrad, State, Target};
use crate::data::FlatBatch;
use crate::pass::plan::EmbedPlan;
use crate::pass::plan::{EdgeIndex, EMPTY};
use crate::util::blas::{add_into, axpy, dot, sgemm, sgemm_ld, transpose_strided};

/// Key positions per block of the attention edge forward's mixing product (its inner dimension
/// is `KEY_BLOCK · H`; the product covers the queries at or after the block, so a block wastes
/// on average `KEY_BLOCK / 2` of its rows' keys on zeros above the diagonal).
const KEY_BLOCK: usize = 8;

/// Downstream features per tile of the attention edge forward: a tile's rows of `Y`
/// (`FEATURE_TILE · S · H` floats, 512 KB at S 128 and 16 heads) are filled, then mixed.
const FEATURE_TILE: usize = 64;

/// Fixed blocks of downstream features of the attention edge backward (fixed, so that its
/// sums do not depend on the thread count).
const FEATURE_BLOCKS: usize = 16;

/// Bytes of attention edge factors (`ev`, `dv`) a forward pass keeps for the backward; beyond
/// them, a module's factors are let go of and formed again in its backward — the same bits, one
/// more product per module. 2 GiB keeps every factor at TinyStories-33M (F ≤ 12,288),
/// Pythia-70M (F ≤ 8192) and GPT-2 small at F 3072 (≤ 1.3 GB); at GPT-2 small F 24,576 they
/// come to ~6 GB.
pub(super) const FACTOR_BUDGET: usize = 2 << 30;

impl EdgeState {
    /// Keep this module's attention factors if they fit in what is left of the budget (`kept`:
    /// bytes kept so far), else let go of their values.
    pub(super) fn fit_budget(&mut self, kept: &mut usize, budget: usize) {
        let bytes = self.ev.len() * std::mem::size_of::<f32>() + self.dv.iter().map(|a| a.value_bytes()).sum::<usize>();
        if bytes == 0 {
            return;
        }
        if *kept + bytes <= budget {
            *kept += bytes;
        } else {
            self.ev = Vec::new();
            self.dv.iter_mut().for_each(|a| a.drop_values());
            self.factors_dropped = true;
        }
    }
}

/// The embed columns read in sequence `bi` (value 1, so only `x = 1 / s1[p]`).
fn fill_embed_values(fb: &FlatBatch, ep: &EmbedPlan, scale: &[f32], bi: usize, table: &mut ColValues) {
    let items =
        embed_values(fb, ep, scale, bi * fb.s, fb.s).map(|(c, pos, x)| (c, ColValue { pos, vid: 0, x, inv: 0.0 }));
    table.fill(ep.tokens.len(), items);
}

/// `buf` cut into `n` consecutive pieces of `len` floats (the last ones shorter or empty).
fn row_blocks(buf: &mut [f32], len: usize, n: usize) -> Vec<&mut [f32]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = buf;
    for _ in 0..n {
        let take = len.min(rest.len());
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(take);
        out.push(piece);
        rest = tail;
    }
    out
}

impl Engine<'_> {
    /// Keep at most `bytes` of attention edge factors from a forward for its backward (default
    /// `FACTOR_BUDGET`, 2 GiB); the gradients do not depend on it.
    pub fn with_factor_budget(mut self, bytes: usize) -> Self {
        self.factor_budget = bytes;
        self
    }

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
        let (f, h, dh) = (self.f, self.n_heads, self.d_head);
        let hd = h * dh;
        let ups = &self.plan.down(di).ups;
        let ev = self.attn_ev(di, layer);
        let rows = ups
            .iter()
            .enumerate()
            .map(|(pu, &u)| {
                (0..f as u32)
                    .filter(|&j| states[u].fired[j as usize] && !index.col_range(pu * f + j as usize).is_empty())
                    .collect()
            })
            .collect();
        let dv = self.attn_dv(di, layer, rows);
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

    /// `E W_Oᵀ (F, H·dh)` of attention module `di` (at `layer`).
    fn attn_ev(&self, di: usize, layer: usize) -> Vec<f32> {
        let (d, f, hd) = (self.d, self.f, self.n_heads * self.d_head);
        let mut ev = vec![0f32; f * hd];
        sgemm(f, hd, d, &self.params[di].enc, d, 1, &self.layers[layer].w_o, 1, d, &mut ev, false, true);
        ev
    }

    /// `W_decᵀ W_V` of each upstream module of `di` (at `layer`) on its `rows`.
    fn attn_dv(&self, di: usize, layer: usize, rows: Vec<Vec<u32>>) -> Vec<ActiveRows> {
        let (d, f, hd) = (self.d, self.f, self.n_heads * self.d_head);
        let w_v = &self.layers[layer].w_v;
        rows.into_iter()
            .zip(&self.plan.down(di).ups)
            .map(|(rows, &u)| {
                let dec_t = &self.params[u].dec_t;
                ActiveRows::build(rows, f, |j| &dec_t[j as usize * d..(j as usize + 1) * d], w_v, d, hd)
            })
            .collect()
    }

    /// The values of the upstream columns of module `di` in sequence `bi` (value ids index the
    /// sequence's `(S, |U|, K)` block of value gradients).
    fn fill_up_values(
        &self,
        fb: &FlatBatch,
        di: usize,
        layer: usize,
        bi: usize,
        states: &[ModuleState],
        table: &mut ColValues,
    ) {
        let (s, f, k) = (fb.s, self.f, self.k);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s1[layer];
        table.fill(
            ups.len() * f,
            (0..s).flat_map(|pp| {
                let t = bi * s + pp;
                let inv = 1.0 / sc[t];
                active_ups(states, ups, t, k, f).map(move |(pu, kk, v, col)| {
                    let vid = ((pp * ups.len() + pu) * k + kk) as u32;
                    (col as u32, ColValue { pos: pp as u32, vid, x: v * inv, inv })
                })
            }),
        );
    }

    /// Per sequence and tile of downstream features, `Y[i][p][h] = Σ_c w_h[i, c] · f_u[p, j] /
    /// s1[p]` from each slot's upstream values in the sequence (and, with `embed`, from each
    /// position's token through the embed edges' weights, value 1), then `a[q, i] += Σ_{p ≤ q}
    /// Σ_h P_h[q, p] Y[i][p][h]` in one causal product per key block. Weights are in slot
    /// order (`(F, C, H)`, the embed edges' `(F, C_e, H)`).
    pub(super) fn attn_edges_forward(
        &self,
        fb: &FlatBatch,
        tg: Target,
        es: &EdgeState,
        states: &[ModuleState],
        a: &mut [f32],
    ) {
        let (di, layer, index, w) = (tg.di, tg.layer, tg.index, &es.w[..]);
        let embed = tg.embed.map(|ep| (ep, &es.embed_w[..]));
        let (s, f, h) = (fb.s, self.f, self.n_heads);
        let sh = s * h;
        let width = index.width;
        let sc = &fb.s1[layer];
        let p = &fb.pattern[layer];
        // Per-thread buffers, reused across sequences: a tile's rows of Y and a key block's part
        // of their transpose (the right operand of a mixing product: [p][h] rows of the tile's
        // features, which the kernel packs 3x faster than feature rows 8 KB apart; formed just
        // before its product, from the nearest caches), the pattern as [q][p][h]
        // (zero above the diagonal; a key block's rows for the queries at or after it are the
        // left operand of its mixing product), the sequence's value tables.
        let init = || {
            let y = vec![0f32; FEATURE_TILE * sh];
            let y_t = vec![0f32; KEY_BLOCK * h * FEATURE_TILE];
            (y, y_t, vec![0f32; s * sh], (ColValues::default(), ColValues::default()))
        };
        a.par_chunks_mut(s * f).enumerate().for_each_init(init, |(y, y_t, pq, (table, etable)), (bi, ab)| {
            pattern_qph(&p[bi * h * s * s..(bi + 1) * h * s * s], s, h, pq);
            self.fill_up_values(fb, di, layer, bi, states, table);
            if let Some((ep, _)) = embed {
                fill_embed_values(fb, ep, sc, bi, etable);
            }
            for i0 in (0..f).step_by(FEATURE_TILE) {
                let ft = FEATURE_TILE.min(f - i0);
                let yt = &mut y[..ft * sh];
                yt.fill(0.0);
                for (i, yi) in (i0..).zip(yt.chunks_exact_mut(sh)) {
                    push_slots(
                        h,
                        &w[i * width * h..(i + 1) * width * h],
                        &index.slot_col[i * width..(i + 1) * width],
                        table,
                        yi,
                    );
                    if let Some((ep, ew)) = embed {
                        let ewd = ep.index.width;
                        push_slots(
                            h,
                            &ew[i * ewd * h..(i + 1) * ewd * h],
                            &ep.index.slot_col[i * ewd..(i + 1) * ewd],
                            etable,
                            yi,
                        );
                    }
                }
                // a[q, tile] += Σ_{p in block} Σ_h P_h[q, p] Y[tile][p][h] for the queries at or
                // after each key block.
                for p0 in (0..s).step_by(KEY_BLOCK) {
                    let kn = KEY_BLOCK.min(s - p0) * h;
                    let (pa, c) = (&pq[(p0 * s + p0) * h..], &mut ab[p0 * f + i0..]);
                    // A product of at most 256 outputs takes the kernel's small-product paths,
                    // whose order of additions depends on the operands' layout: those few keep
                    // the untransposed one (the bits of earlier versions at every shape).
                    if (s - p0) * ft <= 256 {
                        sgemm_ld(s - p0, ft, kn, pa, sh, 1, &yt[p0 * h..], 1, sh, c, f, true);
                    } else {
                        transpose_strided(&yt[p0 * h..], sh, ft, kn, y_t, ft);
                        sgemm_ld(s - p0, ft, kn, pa, sh, 1, y_t, ft, 1, c, f, true);
                    }
                }
            }
        });
    }

    /// Edge-term backward for an attention target, given the edge weights in slot order (and
    /// the embed edges' with `embed`); returns their gradients in slot order (the embed edges'
    /// second, empty without), and adds the upstream values' gradients into `g_val_up`.
    ///
    /// Per downstream feature i and sequence, `gY[i][p][h] = Σ_{q ≥ p} P[h, q, p] gA[q, i]`
    /// from gA's few entries in column i (S·H floats, from the pattern rows as [q][p][h]), then
    /// for each slot and each value of its column, `gw += gY[i][p] · v / s1[p]` and the value's
    /// gradient `+= (Σ_h gY[i][p][h] · w_h) / s1[p]`. Parallel over fixed blocks of features,
    /// each owning its rows of gw; the value gradients are summed over blocks in order.
    pub(super) fn attn_edges_backward(
        &self,
        fb: &FlatBatch,
        tg: Target,
        es: &EdgeState,
        pg: &PreGrad,
        state: &State,
        g_val_up: &mut [Vec<f32>],
    ) -> (Vec<f32>, Vec<f32>) {
        let (di, layer, index, w) = (tg.di, tg.layer, tg.index, &es.w[..]);
        let embed = tg.embed.map(|ep| (ep, &es.embed_w[..]));
        let (b, s, f, k, h) = (fb.b, fb.s, self.f, self.k, self.n_heads);
        let (n, sh) = (b * s, s * h);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s1[layer];
        let p = &fb.pattern[layer];
        let (width, ewidth) = (index.width, embed.map_or(0, |(ep, _)| ep.index.width));
        // Per sequence: the pattern as [q][p][h] and the value tables.
        let mut pqs = vec![0f32; b * s * sh];
        pqs.par_chunks_mut(s * sh)
            .enumerate()
            .for_each(|(bi, pq)| pattern_qph(&p[bi * h * s * s..(bi + 1) * h * s * s], s, h, pq));
        let per_seq = |fill: &(dyn Fn(usize, &mut ColValues) + Sync)| -> Vec<ColValues> {
            (0..b)
                .into_par_iter()
                .map(|bi| {
                    let mut t = ColValues::default();
                    fill(bi, &mut t);
                    t
                })
                .collect()
        };
        let tables = per_seq(&|bi, t| self.fill_up_values(fb, di, layer, bi, &state.modules, t));
        let etables = match embed {
            Some((ep, _)) => per_seq(&|bi, t| fill_embed_values(fb, ep, sc, bi, t)),
            None => Vec::new(),
        };
        // gA by feature: its non-zero entries as (token, g) values, tokens ascending.
        let mut g_by_feature = ColValues::default();
        g_by_feature.fill(
            f,
            pg.idx
                .iter()
                .zip(&pg.g)
                .enumerate()
                .filter(|&(_, (_, &g))| g != 0.0)
                .map(|(j, (&i, &g))| (i, ColValue { pos: (j / pg.kb) as u32, vid: 0, x: g, inv: 0.0 })),
        );
        let seq_vals = s * ups.len() * k;
        let mut gw = vec![0f32; f * width * h];
        let mut gw_e = vec![0f32; f * ewidth * h];
        let per = f.div_ceil(FEATURE_BLOCKS);
        let blocks: Vec<_> = row_blocks(&mut gw, per * width * h, FEATURE_BLOCKS)
            .into_iter()
            .zip(row_blocks(&mut gw_e, per * ewidth * h, FEATURE_BLOCKS))
            .collect();
        let vgs: Vec<Vec<f32>> = blocks
            .into_par_iter()
            .enumerate()
            .map(|(blk, (gwb, gweb))| {
                let (ia, ib) = ((blk * per).min(f), ((blk + 1) * per).min(f));
                let mut vg = vec![0f32; n * ups.len() * k];
                let mut gy = vec![0f32; sh];
                // Per feature, its next entry of gA (entries are in token order).
                let mut cursor = vec![0usize; ib - ia];
                for bi in 0..b {
                    let pq = &pqs[bi * s * sh..(bi + 1) * s * sh];
                    let vgb = &mut vg[bi * seq_vals..(bi + 1) * seq_vals];
                    for i in ia..ib {
                        let ents = g_by_feature.col(i as u32);
                        let first = cursor[i - ia];
                        let mut end = first;
                        while end < ents.len() && (ents[end].pos as usize) < (bi + 1) * s {
                            end += 1;
                        }
                        cursor[i - ia] = end;
                        if end == first {
                            continue;
                        }
                        let q_max = ents[end - 1].pos as usize - bi * s;
                        gy[..(q_max + 1) * h].fill(0.0);
                        for e in &ents[first..end] {
                            let q = e.pos as usize - bi * s;
                            axpy(e.x, &pq[q * sh..q * sh + (q + 1) * h], &mut gy[..(q + 1) * h]);
                        }
                        let r = i - ia;
                        pull_slots(
                            h,
                            &w[i * width * h..(i + 1) * width * h],
                            &mut gwb[r * width * h..(r + 1) * width * h],
                            &index.slot_col[i * width..(i + 1) * width],
                            &tables[bi],
                            &gy,
                            q_max as u32,
                            Some(&mut *vgb),
                        );
                        if let Some((ep, ew)) = embed {
                            pull_slots(
                                h,
                                &ew[i * ewidth * h..(i + 1) * ewidth * h],
                                &mut gweb[r * ewidth * h..(r + 1) * ewidth * h],
                                &ep.index.slot_col[i * ewidth..(i + 1) * ewidth],
                                &etables[bi],
                                &gy,
                                q_max as u32,
                                None,
                            );
                        }
                    }
                }
                vg
            })
            .collect();
        let mut scratch = vec![0f32; n * ups.len() * k];
        for vg in &vgs {
            add_into(&mut scratch, vg);
        }
        add_up_value_grads(ups, &scratch, n, k, g_val_up);
        (gw, gw_e)
    }

    /// Backward of [`attn_edge_weights`](Self::attn_edge_weights) through its two factors,
    /// given the edge weights' gradients in slot order: `E W_Oᵀ` into `gE`, `W_decᵀ W_V`
    /// into each upstream decoder's gradient.
    /// With embed edges (`gw_embed`: their gradients in slot order), the embed edges' weights
    /// `ev[i, h] · (W_E[token] W_V)[h]` add into `g_ev` too (`W_E` is frozen).
    pub(super) fn attn_edge_weights_backward(
        &self,
        tg: Target,
        gw: &[f32],
        st: &EdgeState,
        gw_embed: &[f32],
        g_enc: &mut [f32],
        g_dec_t_in: &mut [Vec<f32>],
    ) {
        let (di, layer, index) = (tg.di, tg.layer, tg.index);
        let embed = tg.embed.map(|ep| (ep, gw_embed));
        let (d, f, h, dh) = (self.d, self.f, self.n_heads, self.d_head);
        let hd = h * dh;
        let ups = &self.plan.down(di).ups;
        let lc = &self.layers[layer];
        // Factors the forward let go of (EdgeState::fit_budget) are formed again, the same bits.
        let again = st.factors_dropped.then(|| {
            let rows = st.dv.iter().map(|a| a.rows.clone()).collect();
            (self.attn_ev(di, layer), self.attn_dv(di, layer, rows))
        });
        let (ev, dv) = match &again {
            Some((ev, dv)) => (ev.as_slice(), dv.as_slice()),
            None => (st.ev.as_slice(), st.dv.as_slice()),
        };
        // g_ev[i, h] = Σ_c gw[i, c, h] · dv[j, h], parallel over downstream features i; g_dv[u][j, h] =
        // Σ_{slots reading (u, j)} gw[slot, h] · ev[i, h], parallel over the active upstream
        // columns (u, j), each column's slots in index order (deterministic). Edges from silent
        // upstream features have no gradient.
        let gw_e = embed.map(|(_, g)| g);
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
            add_slots(gev, i, index, gw, (h, dh), |col| dv[col as usize / f].row(col as usize % f, hd));
            if let (Some((ep, _)), Some(g)) = (embed, gw_e) {
                add_slots(gev, i, &ep.index, g, (h, dh), |col| st.embed_dv.row(col as usize, hd));
            }
        });
        // ev = E W_Oᵀ -> gE += g_ev W_O
        sgemm(f, d, hd, &g_ev, hd, 1, &lc.w_o, d, 1, g_enc, true, true);
        // dv_u = W_decᵀ_u W_V -> g W_decᵀ_u += g_dv W_Vᵀ, on the active rows only
        for (pu, &u) in ups.iter().enumerate() {
            let rows = &dv[pu].rows;
            let mut g_dv = vec![0f32; rows.len() * hd];
            g_dv.par_chunks_mut(hd).zip(rows.par_iter()).for_each(|(gdv, &j)| {
                let r = index.col_range(pu * f + j as usize);
                for (&slot, &i) in index.rev_slots[r.clone()].iter().zip(&index.rev_down[r]) {
                    let (slot, i) = (slot as usize, i as usize);
                    for hh in 0..h {
                        let g = gw[slot * h + hh];
                        if g != 0.0 {
                            let r = hh * dh..(hh + 1) * dh;
                            axpy(g, &ev[i * hd + r.start..i * hd + r.end], &mut gdv[r]);
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
