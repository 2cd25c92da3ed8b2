//! Edge terms into mlp targets: weights, forward, and backward side by side.
//!
//! Dimensions: N tokens, D = d_model, F features, C slots per downstream feature, K = k.
//! Edge `(i, c)` connects downstream feature i to upstream feature `j` of module `u`:
//! `w[i, c] = E[i] · W_dec^u[:, j]`, and `a[t, i] += w[i, c] · f_u[t, j] / s2[t]`
//! (docs/MATH.md, "Edge terms").

use rayon::prelude::*;

use super::{active_ups, add_up_value_grads, Engine, ModuleState, PreGrad, State, Target};
use crate::data::FlatBatch;
use crate::pass::plan::{EdgeIndex, EMPTY};
use crate::util::blas::{add_into, axpy, dot, fold_rows};

impl Engine<'_> {
    /// `w[i,c] = E[i] · W_dec^{u}[:, j]` for every slot whose upstream feature fires somewhere
    /// in the batch (`states`); the others are never read and get no gradient (left 0).
    pub(super) fn mlp_edge_weights(&self, di: usize, index: &EdgeIndex, states: &[ModuleState]) -> Vec<f32> {
        let (d, f) = (self.d, self.f);
        let ups = &self.plan.down(di).ups;
        let enc = &self.params[di].enc;
        let width = index.width;
        let mut w = vec![0f32; f * width];
        w.par_chunks_mut(width).enumerate().for_each(|(i, wrow)| {
            for (c, wv) in wrow.iter_mut().enumerate() {
                let col = index.slot_col[i * width + c];
                if col != EMPTY {
                    let (pu, j) = (col as usize / f, col as usize % f);
                    if !states[ups[pu]].fired[j] {
                        continue;
                    }
                    *wv = dot(&enc[i * d..(i + 1) * d], &self.params[ups[pu]].dec_t[j * d..(j + 1) * d]);
                }
            }
        });
        w
    }

    /// `a[t, i] += Σ_c w[i, c] · f_u[t, j] / s2[t]`, pushed from each token's active upstream
    /// features through the column-ordered weights `w_col`.
    pub(super) fn mlp_edges_forward(
        &self,
        fb: &FlatBatch,
        di: usize,
        index: &EdgeIndex,
        w_col: &[f32],
        states: &[ModuleState],
        a: &mut [f32],
    ) {
        let (f, k) = (self.f, self.k);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s2[self.suite.modules[di].layer];
        a.par_chunks_mut(f).enumerate().for_each(|(t, arow)| {
            let inv = 1.0 / sc[t];
            for (_, _, v, col) in active_ups(states, ups, t, k, f) {
                let x = v * inv;
                let r = index.col_range(col);
                for (&wv, &i) in w_col[r.clone()].iter().zip(&index.rev_down[r]) {
                    arow[i as usize] += wv * x;
                }
            }
        });
    }

    /// Edge-term backward for an mlp target: returns `g w (F·C)`, adds into upstream `g_val`.
    pub(super) fn mlp_edges_backward(
        &self,
        fb: &FlatBatch,
        tg: Target,
        w_col: &[f32],
        pg: &PreGrad,
        state: &State,
        g_val_up: &mut [Vec<f32>],
    ) -> Vec<f32> {
        let (di, index) = (tg.di, tg.index);
        let (n, f, k) = (fb.b * fb.s, self.f, self.k);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s2[self.suite.modules[di].layer];
        // Per token: (g val of every up at t). Collect per-up row slices mutably in parallel by
        // computing into a scratch (N, |U|·K) buffer, then scattering.
        let mut scratch = vec![0f32; n * ups.len() * k];
        let row_len = ups.len() * k;
        let gw_col = fold_rows(&mut scratch, row_len, w_col.len(), |first, block, gw| {
            let mut dense = vec![0f32; f];
            for (r, srow) in block.chunks_mut(row_len).enumerate() {
                let t = first + r;
                for kk in 0..pg.kb {
                    dense[pg.idx[t * pg.kb + kk] as usize] += pg.g[t * pg.kb + kk];
                }
                let inv = 1.0 / sc[t];
                for (pu, kk, v, col) in active_ups(&state.modules, ups, t, k, f) {
                    let x = v * inv;
                    let mut acc = 0f32;
                    let r = index.col_range(col);
                    for (j, &i) in r.clone().zip(&index.rev_down[r]) {
                        let g = dense[i as usize];
                        gw[j] += g * x;
                        acc += g * w_col[j];
                    }
                    srow[pu * k + kk] = acc * inv;
                }
                for kk in 0..pg.kb {
                    dense[pg.idx[t * pg.kb + kk] as usize] = 0.0;
                }
            }
        });
        add_up_value_grads(ups, &scratch, n, k, g_val_up);
        index.to_slot_order(&gw_col, 1)
    }

    /// Backward of [`mlp_edge_weights`](Self::mlp_edge_weights): `gE[i] += g w · W_dec^u[:, j]`,
    /// `g W_decᵀ_u[j] += g w · E[i]`.
    pub(super) fn mlp_edge_weights_backward(
        &self,
        di: usize,
        index: &EdgeIndex,
        gw: &[f32],
        g_enc: &mut [f32],
        g_dec_t_in: &mut [Vec<f32>],
    ) {
        let (d, f) = (self.d, self.f);
        let ups = &self.plan.down(di).ups;
        let enc = &self.params[di].enc;
        let width = index.width;
        // gE, parallel over downstream features (each row's slots in order).
        g_enc.par_chunks_mut(d).enumerate().for_each(|(i, ge)| {
            for c in 0..width {
                let slot = i * width + c;
                let col = index.slot_col[slot];
                if col == EMPTY || gw[slot] == 0.0 {
                    continue;
                }
                let (pu, j) = (col as usize / f, col as usize % f);
                axpy(gw[slot], &self.params[ups[pu]].dec_t[j * d..(j + 1) * d], ge);
            }
        });
        // g W_decᵀ_u, parallel over upstream features j (the slots reading (u, j) in order, summed
        // in a row buffer, then added to the running total).
        for (pu, &u) in ups.iter().enumerate() {
            let total = &mut g_dec_t_in[u];
            if total.is_empty() {
                *total = vec![0f32; f * d];
            }
            total.par_chunks_mut(d).enumerate().for_each_init(
                || vec![0f32; d],
                |acc, (j, row)| {
                    let r = index.col_range(pu * f + j);
                    let mut any = false;
                    for (&slot, &i) in index.rev_slots[r.clone()].iter().zip(&index.rev_down[r]) {
                        let g = gw[slot as usize];
                        if g != 0.0 {
                            if !any {
                                acc.fill(0.0);
                                any = true;
                            }
                            axpy(g, &enc[i as usize * d..(i as usize + 1) * d], acc);
                        }
                    }
                    if any {
                        add_into(row, acc);
                    }
                },
            );
        }
    }
}
