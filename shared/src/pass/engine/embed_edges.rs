//! Edges from the token embedding (docs/MATH.md, "Embed and unembed connections"): each
//! position's token is an upstream feature of value 1 whose decoder column is `W_E[token]`.
//! A module with such edges reads only the positional part of `r0` densely. `W_E` is frozen,
//! so the edges send gradient to the encoder `E` only.
//!
//! mlp targets: `w[i, c] = E_i · W_E[v_c]` and `a[t, i] += w[i, c] / s2[t]` where
//! `tok_t = v_c`. Attention targets share the attention edge terms' buffers and mixing
//! (`attn_edges.rs`, its `embed` arguments); their weights are `ev[i, h] · (W_E[v] W_V)[h]`,
//! formed here for the tokens present in the batch. Dimensions: N tokens, D = d_model, F
//! features, C_e embed slots per feature, V vocabulary.

use rayon::prelude::*;

use super::{ActiveRows, Engine, PreGrad};
use crate::data::FlatBatch;
use crate::pass::plan::EmbedPlan;
use crate::pass::plan::EMPTY;
use crate::util::blas::{axpy, dot, fold_rows};

/// The model constants embed edges read: `W_E (V, D)` and `W_pos (n_ctx, D)` (empty for rotary
/// models).
pub(super) struct EmbedConsts {
    pub w_e: Vec<f32>,
    pub w_pos: Vec<f32>,
}

/// The embed columns read at flat positions `t0 .. t0 + len`: `(column, position − t0,
/// 1 / scale[t])` for each position whose token some edge reads.
pub(super) fn embed_values<'a>(
    fb: &'a FlatBatch,
    ep: &'a EmbedPlan,
    scale: &'a [f32],
    t0: usize,
    len: usize,
) -> impl Iterator<Item = (u32, u32, f32)> + 'a {
    (0..len).filter_map(move |pl| {
        let t = t0 + pl;
        ep.col(fb.tokens[t]).map(|c| (c as u32, pl as u32, 1.0 / scale[t]))
    })
}

impl Engine<'_> {
    fn embed_consts(&self) -> &EmbedConsts {
        self.embed.as_ref().expect("embed constants loaded for a plan with embed edges")
    }

    /// `W_E[token]` (D floats).
    fn token_row(&self, token: u32) -> &[f32] {
        let d = self.d;
        &self.embed_consts().w_e[token as usize * d..(token as usize + 1) * d]
    }

    /// The positional part of `r0 (N, D)`: `W_pos[pos]`, or zeros on a rotary model.
    pub(super) fn positional_input(&self, fb: &FlatBatch) -> Vec<f32> {
        let d = self.d;
        let w_pos = &self.embed_consts().w_pos;
        let mut x = vec![0f32; fb.b * fb.s * d];
        if !w_pos.is_empty() {
            x.par_chunks_mut(d).enumerate().for_each(|(t, row)| {
                let p = t % fb.s;
                row.copy_from_slice(&w_pos[p * d..(p + 1) * d]);
            });
        }
        x
    }

    /// mlp targets: `w[i, c] = E_i · W_E[v_c]`, in slot order.
    pub(super) fn mlp_embed_weights(&self, di: usize, ep: &EmbedPlan) -> Vec<f32> {
        let d = self.d;
        let ix = &ep.index;
        let enc = &self.params[di].enc;
        let mut w = vec![0f32; ix.slot_col.len()];
        w.par_chunks_mut(ix.width).enumerate().for_each(|(i, wrow)| {
            for (c, wv) in wrow.iter_mut().enumerate() {
                let col = ix.slot_col[i * ix.width + c];
                if col != EMPTY {
                    *wv = dot(&enc[i * d..(i + 1) * d], self.token_row(ep.tokens[col as usize]));
                }
            }
        });
        w
    }

    /// `a[t, i] += w[i, c] / s2[t]` for the edges reading the token at t.
    pub(super) fn mlp_embed_forward(&self, fb: &FlatBatch, di: usize, ep: &EmbedPlan, w_col: &[f32], a: &mut [f32]) {
        let sc = &fb.s2[self.suite.modules[di].layer];
        a.par_chunks_mut(self.f).enumerate().for_each(|(t, arow)| {
            for (col, _, x) in embed_values(fb, ep, sc, t, 1) {
                let r = ep.index.col_range(col as usize);
                for (&wv, &i) in w_col[r.clone()].iter().zip(&ep.index.rev_down[r]) {
                    arow[i as usize] += wv * x;
                }
            }
        });
    }

    /// mlp targets: `∂w[i, c] = Σ_{t : tok_t = v_c} g[t, i] / s2[t]`, in column order.
    pub(super) fn mlp_embed_backward(&self, fb: &FlatBatch, di: usize, ep: &EmbedPlan, pg: &PreGrad) -> Vec<f32> {
        let (n, f) = (fb.b * fb.s, self.f);
        let sc = &fb.s2[self.suite.modules[di].layer];
        let mut rows = vec![0f32; n];
        fold_rows(&mut rows, 1, ep.index.rev_slots.len(), |first, block, gw| {
            let mut dense = vec![0f32; f];
            for t in first..first + block.len() {
                for kk in 0..pg.kb {
                    dense[pg.idx[t * pg.kb + kk] as usize] += pg.g[t * pg.kb + kk];
                }
                for (col, _, x) in embed_values(fb, ep, sc, t, 1) {
                    let r = ep.index.col_range(col as usize);
                    for (j, &i) in r.clone().zip(&ep.index.rev_down[r]) {
                        gw[j] += dense[i as usize] * x;
                    }
                }
                for kk in 0..pg.kb {
                    dense[pg.idx[t * pg.kb + kk] as usize] = 0.0;
                }
            }
        })
    }

    /// Backward of [`mlp_embed_weights`](Self::mlp_embed_weights): `∂E_i += Σ_c ∂w[i, c] W_E[v_c]`
    /// (`gw` in slot order).
    pub(super) fn mlp_embed_weights_backward(&self, ep: &EmbedPlan, gw: &[f32], g_enc: &mut [f32]) {
        let (d, ix) = (self.d, &ep.index);
        g_enc.par_chunks_mut(d).enumerate().for_each(|(i, ge)| {
            for c in 0..ix.width {
                let slot = i * ix.width + c;
                let col = ix.slot_col[slot];
                if col != EMPTY && gw[slot] != 0.0 {
                    axpy(gw[slot], self.token_row(ep.tokens[col as usize]), ge);
                }
            }
        });
    }

    /// Attention targets: `W_E[v] W_V` for the referenced tokens present in the batch, and the
    /// weights `w_h[i, c] = ev[i, h] · (W_E[v_c] W_V)[h]` in slot order, given `ev = E W_Oᵀ`.
    pub(super) fn attn_embed_weights(
        &self,
        fb: &FlatBatch,
        layer: usize,
        ep: &EmbedPlan,
        ev: &[f32],
    ) -> (Vec<f32>, ActiveRows) {
        let (d, h, dh) = (self.d, self.n_heads, self.d_head);
        let hd = h * dh;
        let ix = &ep.index;
        let mut present = vec![false; ep.tokens.len()];
        for &tok in &fb.tokens {
            if let Some(c) = ep.col(tok) {
                present[c] = true;
            }
        }
        let rows: Vec<u32> = (0..ep.tokens.len() as u32).filter(|&c| present[c as usize]).collect();
        let dv = ActiveRows::build(
            rows,
            ep.tokens.len(),
            |c| self.token_row(ep.tokens[c as usize]),
            &self.layers[layer].w_v,
            d,
            hd,
        );
        let mut w = vec![0f32; ix.slot_col.len() * h];
        w.par_chunks_mut(ix.width * h).enumerate().for_each(|(i, wrow)| {
            for c in 0..ix.width {
                let col = ix.slot_col[i * ix.width + c];
                if col == EMPTY {
                    continue;
                }
                let Some(dvr) = dv.row(col as usize, hd) else { continue };
                for hh in 0..h {
                    wrow[c * h + hh] = dot(&ev[i * hd + hh * dh..i * hd + (hh + 1) * dh], &dvr[hh * dh..(hh + 1) * dh]);
                }
            }
        });
        (w, dv)
    }
}
