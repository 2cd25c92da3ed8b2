//! The dense part of a module's pre-activation, forward and backward side by side:
//! the d_model-space encoder input `Z (N, D)` and the encoder product
//! `a = Z Eᵀ + b_enc − E b_dec` (docs/MATH.md, "Pruned pass: mlp targets", "Pruned pass:
//! attention targets").
//!
//! `Z` for an mlp target (layer L): `(r0 + Σ_u b_dec^u) / s2` with a connection set, else
//! `(r0 + Σ_u R_u) / s2`. For an attention target: `mix(x / s1) + b_O + (ub W_OVsum) / s1[q]`
//! with `x = r0` (plus `Σ_u (R_u − b_dec^u)` under all connections; plus `ub` with the
//! consistent bias option, which then drops the last term). Dimensions: N tokens, D = d_model,
//! F features, U upstream modules.

use rayon::prelude::*;

use super::{Engine, ModuleState, PreGrad};
use crate::data::FlatBatch;
use crate::model::Kind;
use crate::util::blas::{add_into, axpy, by_feature, dot, sgemm};

impl Engine<'_> {
    /// `Σ_u b_dec^u` over the upstream modules of `di`.
    fn upstream_bias(&self, di: usize) -> Vec<f32> {
        let mut ub = vec![0f32; self.d];
        for &u in &self.plan.down(di).ups {
            add_into(&mut ub, &self.params[u].b_dec);
        }
        ub
    }

    /// `Z (N, D)` of module `di`, given the upstream modules' forward states.
    pub(super) fn encoder_input(&self, fb: &FlatBatch, di: usize, states: &[ModuleState]) -> Vec<f32> {
        let d = self.d;
        let module = self.suite.modules[di];
        let ups = &self.plan.down(di).ups;
        let l = module.layer;
        let ub = self.upstream_bias(di);
        // With embed edges the tokens arrive through them; the dense term keeps r0's
        // positional part.
        let r_in = match &self.plan.down(di).embed {
            Some(_) => self.positional_input(fb),
            None => fb.r0.clone(),
        };
        match module.kind {
            Kind::Mlp => {
                let sc = &fb.s2[l];
                let mut z = r_in;
                if self.plan.sparse {
                    z.par_chunks_mut(d).for_each(|row| add_into(row, &ub));
                } else {
                    for &u in ups {
                        add_into(&mut z, &states[u].recon);
                    }
                }
                z.par_chunks_mut(d).zip(sc.par_iter()).for_each(|(row, &sv)| row.iter_mut().for_each(|x| *x /= sv));
                z
            }
            Kind::Attn => {
                let sc = &fb.s1[l];
                let mut x = r_in;
                if !self.plan.sparse {
                    for &u in ups {
                        add_into(&mut x, &states[u].recon);
                        for row in x.chunks_mut(d) {
                            axpy(-1.0, &self.params[u].b_dec, row);
                        }
                    }
                }
                if self.opts.consistent_attn_bias {
                    x.par_chunks_mut(d).for_each(|row| add_into(row, &ub));
                }
                x.par_chunks_mut(d).zip(sc.par_iter()).for_each(|(row, &sv)| row.iter_mut().for_each(|v| *v /= sv));
                let mut z = self.attn_mix(fb, l, &x);
                let b_o = &self.layers[l].b_o;
                let mut c = vec![0f32; d];
                if !self.opts.consistent_attn_bias && !ups.is_empty() {
                    sgemm(1, d, d, &ub, d, 1, &self.layers[l].w_ov_sum, d, 1, &mut c, false, false);
                }
                z.par_chunks_mut(d).zip(sc.par_iter()).for_each(|(row, &sv)| {
                    add_into(row, b_o);
                    axpy(1.0 / sv, &c, row);
                });
                z
            }
        }
    }

    /// `a (N, F) = Z Eᵀ + b_enc − E b_dec` of module `di`.
    pub(super) fn encode(&self, di: usize, z: &[f32]) -> Vec<f32> {
        let (d, f) = (self.d, self.f);
        let n = z.len() / d;
        let pd = &self.params[di];
        let mut a = vec![0f32; n * f];
        sgemm(n, f, d, z, d, 1, &pd.enc, 1, d, &mut a, false, true);
        let bias: Vec<f32> = (0..f).map(|i| pd.b_enc[i] - dot(&pd.enc[i * d..(i + 1) * d], &pd.b_dec)).collect();
        a.par_chunks_mut(f).for_each(|row| add_into(row, &bias));
        a
    }

    /// Backward of [`encode`](Self::encode) given the sparse pre-activation gradient: returns
    /// `(g E, g b_enc, g Z)` and adds the own-`b_dec` term into `g_bdec`.
    pub(super) fn encode_backward(
        &self,
        di: usize,
        st: &ModuleState,
        pg: &PreGrad,
        g_bdec: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (d, f) = (self.d, self.f);
        let n = st.z.len() / d;
        let pd = &self.params[di];
        let mut g_benc = vec![0f32; f];
        for (j, &g) in pg.g.iter().enumerate() {
            if g != 0.0 {
                g_benc[pg.idx[j] as usize] += g;
            }
        }
        // gE += g_preᵀ Z, gZ = g_pre E  (sparse: k per row)
        let mut g_z = vec![0f32; n * d];
        g_z.par_chunks_mut(d).enumerate().for_each(|(t, gzr)| {
            for kk in 0..pg.kb {
                let g = pg.g[t * pg.kb + kk];
                if g != 0.0 {
                    let i = pg.idx[t * pg.kb + kk] as usize;
                    axpy(g, &pd.enc[i * d..(i + 1) * d], gzr);
                }
            }
        });
        let mut g_enc = by_feature(&pg.idx, pg.kb, f, d, |j| pg.g[j], &st.z);
        // − E b_dec: gE[i] −= g_benc[i] b_dec; g b_dec −= Σ_i g_benc[i] E[i]
        for i in 0..f {
            if g_benc[i] != 0.0 {
                axpy(-g_benc[i], &pd.b_dec, &mut g_enc[i * d..(i + 1) * d]);
                axpy(-g_benc[i], &pd.enc[i * d..(i + 1) * d], g_bdec);
            }
        }
        (g_enc, g_benc, g_z)
    }

    /// Backward of [`encoder_input`](Self::encoder_input) given `g_z (N, D)`: into the upstream
    /// reconstructions (`g_recon`, with bias; `g_recon_nb`, without) under all connections, and
    /// into the upstream decoder biases (`g_bdec_extra`).
    pub(super) fn encoder_input_backward(
        &self,
        fb: &FlatBatch,
        di: usize,
        g_z: &[f32],
        g_recon: &mut [Vec<f32>],
        g_recon_nb: &mut [Vec<f32>],
        g_bdec_extra: &mut [Vec<f32>],
    ) {
        let d = self.d;
        let n = g_z.len() / d;
        let module = self.suite.modules[di];
        let ups = &self.plan.down(di).ups;
        let l = module.layer;
        let mut g_ub = vec![0f32; d];
        match module.kind {
            Kind::Mlp => {
                let sc = &fb.s2[l];
                let gx: Vec<f32> = g_z.chunks(d).zip(sc).flat_map(|(r, &sv)| r.iter().map(move |x| x / sv)).collect();
                if self.plan.sparse {
                    for row in gx.chunks(d) {
                        add_into(&mut g_ub, row);
                    }
                } else {
                    for &u in ups {
                        add_into(&mut g_recon[u], &gx);
                    }
                }
            }
            Kind::Attn => {
                let sc = &fb.s1[l];
                if !self.opts.consistent_attn_bias && !ups.is_empty() {
                    // Z[t] += (ub W_OVsum) / s1[t]
                    let mut gc = vec![0f32; d];
                    for (row, &sv) in g_z.chunks(d).zip(sc) {
                        axpy(1.0 / sv, row, &mut gc);
                    }
                    let mut gub = vec![0f32; d];
                    sgemm(1, d, d, &gc, d, 1, &self.layers[l].w_ov_sum, 1, d, &mut gub, false, false);
                    add_into(&mut g_ub, &gub);
                }
                if !self.plan.sparse || self.opts.consistent_attn_bias {
                    let gx = self.attn_mix_back(fb, l, g_z);
                    let gx: Vec<f32> =
                        gx.chunks(d).zip(sc).flat_map(|(r, &sv)| r.iter().map(move |x| x / sv)).collect();
                    if self.opts.consistent_attn_bias {
                        for row in gx.chunks(d) {
                            add_into(&mut g_ub, row);
                        }
                    }
                    if !self.plan.sparse {
                        for &u in ups {
                            if g_recon_nb[u].is_empty() {
                                g_recon_nb[u] = vec![0f32; n * d];
                            }
                            add_into(&mut g_recon_nb[u], &gx);
                        }
                    }
                }
            }
        }
        for &u in ups {
            add_into(&mut g_bdec_extra[u], &g_ub);
        }
    }
}
