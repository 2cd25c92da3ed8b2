//! The fast CPU pruned pass: forward and hand-written backward over flat `f32` buffers.
//!
//! Computes exactly what [`crate::pass::autograd::forward`] computes (that version, built from
//! candle ops with autograd, is checked against the reference; this one is checked against it):
//! - features are kept sparse (`k` indices and values per token), so decoding, the edge terms
//!   and every backward step cost `k` (or `k·C`) per token instead of `F`;
//! - gradients are computed only where they exist: top-k selects `k` entries per row, so the
//!   gradient of each pre-activation row has `k` non-zeros, and constants (cached scales,
//!   patterns, model weights) get no gradient work at all.
//!
//! Per downstream module d the pre-activation is `a = Z Eᵀ + b_enc − E b_dec + edges`, where
//! `Z (N, D)` gathers every d_model-space term (layer-0 residual, upstream decoder biases, with
//! all connections the upstream reconstructions, and for attention the mixing by the cached
//! pattern and `b_O`), and `edges` is the sparse sum over connected upstream features
//! (docs/MATH.md, "Pruned pass: mlp targets", "Pruned pass: attention targets", "Edge terms").
//! The only dense products are `Z Eᵀ` (`N·D·F`), per-step weight products of size `F·D·D`, and
//! the attention mixing of edge terms (`B·H·S²·F`).
//!
//! Dimensions: B sequences of S positions (q query, p key), N = B·S tokens, D = d_model, H heads
//! of d_h, F features per module, K = k active per token, C edge slots per downstream feature,
//! U = the upstream modules of a downstream one.
//!
//! Files: [`encoder`] (Z and the encoder product, forward and backward), [`decode`] (top-k,
//! ReLU and decoding, forward and backward), [`mlp_edges`] and [`attn_edges`] (each edge
//! kind's weights, forward and backward), [`attn_mix`] (attention mixing); this file holds the
//! state and runs the modules in order.

mod attn_edges;
mod attn_mix;
mod decode;
mod embed_edges;
mod encoder;
mod gated;
mod mlp_edges;
mod pair_kernels;
mod unembed;
mod upstream;

pub use super::dense_features;
pub use gated::SlotValues;
pub use unembed::UnembedGrads;
use upstream::{active_ups, add_up_value_grads, ActiveRows};

use std::borrow::Cow;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::data::FlatBatch;
use crate::error::{Error, Result};
use crate::formats::suite::Suite;
use crate::model::{Kind, Runtime};
use crate::pass::plan::{EdgeIndex, EmbedPlan};
use crate::pass::{PassOptions, Plan};
use crate::sae::loss::{auxk_and_grad, auxk_select, AuxLatents};
use crate::sae::AeParams;
use crate::util::blas::{add_into, transpose};
use crate::util::collective::Collective;
use crate::util::profile::Profile;
use crate::util::to_vec;

/// One module's parameters as the engine reads them: the decoder transposed, so that a
/// feature's decoder column is a contiguous row.
struct FlatAe<'a> {
    enc: Cow<'a, [f32]>, // (F, D); a training loop's own buffer, not copied

    b_enc: Vec<f32>,       // (F)
    dec_t: Cow<'a, [f32]>, // (F, D) = W_decᵀ; a decoder-major training loop's own buffer
    b_dec: Vec<f32>,       // (D)
}

/// Model constants of one layer.
struct LayerConsts {
    w_v: Vec<f32>,      // (D, H·dh)
    w_o: Vec<f32>,      // (H·dh, D)
    b_o: Vec<f32>,      // (D)
    w_ov_sum: Vec<f32>, // (D, D)
}

/// The downstream module an edge term writes into, and its wiring: module `di` of layer
/// `layer`, its edge index (slots per feature, columns `pu·F + j` over its upstream modules)
/// and, with embed edges, their plan.
#[derive(Clone, Copy)]
struct Target<'a> {
    di: usize,
    layer: usize,
    index: &'a EdgeIndex,
    embed: Option<&'a EmbedPlan>,
}

/// The output gradients of one module's edge terms: upstream values `val[u] (N, K)`, this
/// module's encoder `enc (F, D)`, and the upstream decoders `dec_t_in[u] (F, D)`.
struct EdgeGrads<'a> {
    val: &'a mut [Vec<f32>],
    enc: &'a mut [f32],
    dec_t_in: &'a mut [Vec<f32>],
}

/// What the edge terms' forward keeps for their backward (sparse wiring only).
#[derive(Default)]
struct EdgeState {
    /// Edge weights: for mlp targets in column order
    /// ([`crate::pass::plan::EdgeIndex::to_col_order`]: the edges reading one upstream column
    /// are contiguous, as their loops walk upstream values), for attention targets in slot
    /// order `(F, C, H)` (their loops walk downstream features).
    w: Vec<f32>,
    /// Attention targets: `E W_Oᵀ (F, H·dh)` and per up `W_decᵀ W_V` on its active rows.
    ev: Vec<f32>,
    dv: Vec<ActiveRows>,
    /// Embed edges: their weights (in the order of `w`), and for attention targets `W_E W_V`
    /// on the referenced tokens present in the batch.
    embed_w: Vec<f32>,
    embed_dv: ActiveRows,
    /// With gates: the weights before gating, in slot order (upstream, embed).
    raw: Vec<f32>,
    embed_raw: Vec<f32>,
    /// `ev` and `dv`'s values were let go of after the forward (their rows kept), to be formed
    /// again by the backward ([`EdgeState::fit_budget`]).
    factors_dropped: bool,
}

/// What the forward pass keeps for the backward pass, per module.
pub struct ModuleState {
    /// Top-k indices `(N, K)` and ReLU'd values `(N, K)`.
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
    /// Which features fire (a non-zero value) on some token of the batch `(F)`.
    pub fired: Vec<bool>,
    /// Reconstruction `(N, D)` including `b_dec`.
    pub recon: Vec<f32>,
    /// The d_model-space encoder input `Z (N, D)`.
    z: Vec<f32>,
    edges: EdgeState,
    /// AuxK latents (with dead latents), and the loss gradient w.r.t. their reconstruction of
    /// the residual `(N, D)` (set by [`Engine::auxk_loss_and_grad`]).
    pub aux: Option<AuxLatents>,
    aux_g: Vec<f32>,
}

/// The gradient of a module's pre-activation: `kb` (index, value) entries per token.
struct PreGrad {
    idx: Vec<u32>,
    g: Vec<f32>,
    kb: usize,
}

/// Forward state of a whole suite.
pub struct State {
    pub modules: Vec<ModuleState>,
}

impl State {
    /// Every module's reconstruction `(N, D)`.
    pub fn recons(&self) -> Vec<&[f32]> {
        self.modules.iter().map(|m| m.recon.as_slice()).collect()
    }
}

/// Gradients of one module's parameters (shapes as the suite's).
pub type ModuleGrads = AeParams<Vec<f32>>;

/// Where [`Engine::backward_each`] hands each module's final gradients (module index, grads).
pub type GradSink<'s> = &'s mut dyn FnMut(usize, ModuleGrads) -> Result<()>;

/// The fast pruned pass of a suite for one model and wiring.
pub struct Engine<'a> {
    suite: &'a Suite,
    plan: &'a Plan,
    opts: PassOptions,
    params: Vec<FlatAe<'a>>,
    layers: Vec<LayerConsts>,
    /// `W_E` and `W_pos`, when some module has embed edges.
    embed: Option<embed_edges::EmbedConsts>,
    /// `W_U` (and its transpose) and `b_U`, when the plan has unembed edges.
    unembed: Option<unembed::UnembedConsts>,
    /// Gate values of the edge slots ([`Engine::gated`]).
    gates: Option<&'a SlotValues>,
    /// The parameters came decoder-major ([`Engine::with_params`]): so do the decoder gradients.
    decoder_major: bool,
    /// Bytes of attention edge factors a forward keeps for the backward ([`attn_edges::FACTOR_BUDGET`]).
    factor_budget: usize,
    ln_eps: f32,
    n_heads: usize,
    d_head: usize,
    d: usize,
    f: usize,
    k: usize,
}

impl<'a> Engine<'a> {
    /// Snapshot the suite's parameters and the model's constants.
    pub fn new(suite: &'a Suite, rt: &Runtime, plan: &'a Plan, opts: PassOptions) -> Result<Engine<'a>> {
        let (d, f) = (suite.d_model, suite.n_features);
        let params = suite
            .aes
            .par_iter()
            .map(|ae| {
                // Each decoder transposed from the suite's host values in place (no copy first).
                Ok(FlatAe {
                    dec_t: Cow::Owned(transpose(crate::util::HostF32::of(ae.w_dec.as_tensor())?.as_slice(), d, f)),
                    enc: Cow::Owned(to_vec(ae.w_enc.as_tensor())?),
                    b_enc: to_vec(ae.b_enc.as_tensor())?,
                    b_dec: to_vec(ae.b_dec.as_tensor())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::build(suite, rt, plan, opts, params)
    }

    /// As [`new`](Self::new), with the suite's parameter values given as host buffers (a
    /// training loop's current ones; the suite's own variables are not read). The encoders
    /// are read in place, not copied (at GPT-2 small, F 24,576 that is 1.8 GB), and so are the
    /// decoders when `decoder_major` (each `w_dec` held `(F, D)`, as
    /// [`AeParams::decoder_to_major`] makes it; then the backward's decoder gradients are
    /// decoder-major too), else transposed into a copy.
    pub fn with_params(
        suite: &'a Suite,
        rt: &Runtime,
        plan: &'a Plan,
        opts: PassOptions,
        host: &'a [AeParams<Vec<f32>>],
        decoder_major: bool,
    ) -> Result<Engine<'a>> {
        let (d, f) = (suite.d_model, suite.n_features);
        let params = host
            .par_iter()
            .map(|p| FlatAe {
                enc: Cow::Borrowed(&p.w_enc[..]),
                b_enc: p.b_enc.clone(),
                dec_t: match decoder_major {
                    true => Cow::Borrowed(&p.w_dec[..]),
                    false => Cow::Owned(transpose(&p.w_dec, d, f)),
                },
                b_dec: p.b_dec.clone(),
            })
            .collect();
        let mut eng = Self::build(suite, rt, plan, opts, params)?;
        eng.decoder_major = decoder_major;
        Ok(eng)
    }

    fn build(
        suite: &'a Suite,
        rt: &Runtime,
        plan: &'a Plan,
        opts: PassOptions,
        params: Vec<FlatAe<'a>>,
    ) -> Result<Engine<'a>> {
        let layers = (0..rt.cfg.n_layers)
            .map(|l| {
                let (w_v, w_o) = rt.flat_vo(l);
                Ok(LayerConsts {
                    w_v: to_vec(w_v)?,
                    w_o: to_vec(w_o)?,
                    b_o: to_vec(&rt.weights.blocks[l].b_o)?,
                    w_ov_sum: to_vec(rt.w_ov_sum(l))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if plan.sparse && suite.modules.iter().enumerate().any(|(d, _)| plan.down(d).index.is_none()) {
            return Err(Error::Usage("sparse plan without edge index".into()));
        }
        let embed = match (0..suite.modules.len()).any(|d| plan.down(d).embed.is_some()) {
            true => Some(embed_edges::EmbedConsts {
                w_e: to_vec(&rt.weights.w_e)?,
                w_pos: rt.weights.w_pos.as_ref().map(to_vec).transpose()?.unwrap_or_default(),
            }),
            false => None,
        };
        let unembed = match &plan.unembed {
            Some(_) => Some(unembed::UnembedConsts {
                w_u: to_vec(&rt.weights.w_u)?,
                w_u_t: to_vec(&rt.weights.w_u.t()?.contiguous()?)?,
                b_u: to_vec(&rt.weights.b_u)?,
            }),
            None => None,
        };
        Ok(Engine {
            suite,
            plan,
            opts,
            params,
            layers,
            embed,
            unembed,
            gates: None,
            decoder_major: false,
            factor_budget: attn_edges::FACTOR_BUDGET,
            ln_eps: rt.cfg.ln_eps as f32,
            n_heads: rt.cfg.n_heads,
            d_head: rt.cfg.d_head,
            d: suite.d_model,
            f: suite.n_features,
            k: suite.k,
        })
    }

    /// Run the pruned pass on a batch.
    pub fn forward(&self, fb: &FlatBatch) -> Result<State> {
        self.forward_with_dead(fb, None)
    }

    /// Run the pruned pass; with `dead` masks (per module), also select each module's AuxK
    /// latents (docs/MATH.md, "AuxK").
    pub fn forward_with_dead(&self, fb: &FlatBatch, dead: Option<&[Vec<bool>]>) -> Result<State> {
        let mut prof = Profile::new();
        let mut states: Vec<ModuleState> = Vec::with_capacity(self.suite.modules.len());
        let mut factors_kept = 0;
        for di in 0..self.suite.modules.len() {
            let z = self.encoder_input(fb, di, &states);
            prof.mark("Z");
            let mut a = self.encode(di, &z);
            prof.mark("Z·Eᵀ");
            let mut edges = self.edges_forward(fb, di, &states, &mut a, &mut prof);
            edges.fit_budget(&mut factors_kept, self.factor_budget);
            let (idx, val, recon) = self.decode(di, &a, &mut prof);
            let fired = crate::sae::fired(&idx, &val, self.f);
            let aux = dead.and_then(|m| auxk_select(&a, self.f, &m[di], self.d));
            states.push(ModuleState { idx, val, fired, recon, z, edges, aux, aux_g: Vec::new() });
            prof.mark("decode, AuxK");
        }
        prof.report("forward");
        Ok(State { modules: states })
    }

    /// The sparse edge terms into module `di`, added into its pre-activation `a (N, F)`.
    fn edges_forward(
        &self,
        fb: &FlatBatch,
        di: usize,
        states: &[ModuleState],
        a: &mut [f32],
        prof: &mut Profile,
    ) -> EdgeState {
        let plan_d = self.plan.down(di);
        let embed = plan_d.embed.as_ref();
        if !self.plan.sparse || (plan_d.ups.is_empty() && embed.is_none()) {
            return EdgeState::default();
        }
        let index = plan_d.index.as_ref().expect("sparse plan");
        let l = self.suite.modules[di].layer;
        match self.suite.modules[di].kind {
            Kind::Mlp => {
                let mut w = self.mlp_edge_weights(di, index, states);
                let raw = self.gate(di, false, &mut w, 1);
                let w_col = index.to_col_order(&w, 1);
                let (embed_w_col, embed_raw) = match embed {
                    Some(ep) => {
                        let mut ew = self.mlp_embed_weights(di, ep);
                        let raw = self.gate(di, true, &mut ew, 1);
                        (ep.index.to_col_order(&ew, 1), raw)
                    }
                    None => Default::default(),
                };
                prof.mark("mlp w");
                self.mlp_edges_forward(fb, di, index, &w_col, states, a);
                if let Some(ep) = embed {
                    self.mlp_embed_forward(fb, di, ep, &embed_w_col, a);
                }
                prof.mark("mlp edges");
                EdgeState { w: w_col, embed_w: embed_w_col, raw, embed_raw, ..EdgeState::default() }
            }
            Kind::Attn => {
                let (mut w, ev, dv) = self.attn_edge_weights(di, l, index, states);
                let h = self.n_heads;
                let raw = self.gate(di, false, &mut w, h);
                let (embed_w, embed_dv, embed_raw) = match embed {
                    Some(ep) => {
                        let (mut ew, edv) = self.attn_embed_weights(fb, l, ep, &ev);
                        let raw = self.gate(di, true, &mut ew, h);
                        (ew, edv, raw)
                    }
                    None => Default::default(),
                };
                prof.mark("attn w");
                let es = EdgeState { w, ev, dv, embed_w, embed_dv, raw, embed_raw, factors_dropped: false };
                self.attn_edges_forward(fb, Target { di, layer: l, index, embed }, &es, states, a);
                prof.mark("attn edges");
                es
            }
        }
    }

    /// AuxK of every module with AuxK latents, storing `alpha ×` its gradient for
    /// [`backward`](Self::backward). Returns AuxK per module (0 when no latent is dead), of the
    /// whole batch when its sequences are spread over the ranks of `coll` (`fb`: this rank's).
    pub fn auxk_loss_and_grad(
        &self,
        coll: &dyn Collective,
        fb: &FlatBatch,
        state: &mut State,
        alpha: f64,
    ) -> Result<Vec<f64>> {
        let d = self.d;
        let mut out = Vec::with_capacity(state.modules.len());
        for (m, st) in state.modules.iter_mut().enumerate() {
            let Some(aux) = &st.aux else {
                out.push(0.0);
                continue;
            };
            let ehat = crate::sae::decode(&aux.idx, &aux.val, aux.k_aux, &self.params[m].dec_t, d, None);
            let r: Vec<f32> = fb.targets[m].iter().zip(&st.recon).map(|(t, x)| t - x).collect();
            let (value, g) = auxk_and_grad(coll, &ehat, &r, d, aux.n_dead, alpha)?;
            out.push(value);
            st.aux_g = g;
        }
        Ok(out)
    }

    /// Backpropagate `g_recon[m] (N, D)` (the loss gradient w.r.t. every reconstruction)
    /// through the pass; returns the gradient of every parameter.
    pub fn backward(&self, fb: &FlatBatch, state: &State, g_recon: Vec<Vec<f32>>) -> Result<Vec<ModuleGrads>> {
        self.backward_with(fb, state, g_recon, None)
    }

    /// [`backward`](Self::backward) with the gradients a loss sends past the reconstructions
    /// (the spliced CE with unembed edges, [`Engine::unembed_ce_loss_and_grad`]).
    pub fn backward_with(
        &self,
        fb: &FlatBatch,
        state: &State,
        g_recon: Vec<Vec<f32>>,
        extra: Option<UnembedGrads>,
    ) -> Result<Vec<ModuleGrads>> {
        self.backward_impl(fb, state, g_recon, extra, None, None)
    }

    /// [`backward_with`](Self::backward_with) handing each module's gradients to `sink` as soon
    /// as they are final — once the backward has passed the module (downstream modules come
    /// first, and a module only sends gradients upstream) — instead of holding every module's
    /// until the end.
    pub fn backward_each(
        &self,
        fb: &FlatBatch,
        state: &State,
        g_recon: Vec<Vec<f32>>,
        extra: Option<UnembedGrads>,
        sink: GradSink,
    ) -> Result<()> {
        self.backward_impl(fb, state, g_recon, extra, None, Some(sink)).map(|_| ())
    }

    /// [`backward_with`](Self::backward_with) of the gated pass ([`gated`](Self::gated)), also
    /// returning the gates' gradients (zeros without gates; the unembed gates' from `extra`,
    /// [`unembed_ce_loss_and_grad`](Self::unembed_ce_loss_and_grad)'s).
    pub fn backward_gated(
        &self,
        fb: &FlatBatch,
        state: &State,
        g_recon: Vec<Vec<f32>>,
        mut extra: Option<UnembedGrads>,
    ) -> Result<(Vec<ModuleGrads>, SlotValues)> {
        let mut gz = SlotValues::zeros(self.plan, self.suite.modules.len(), self.f);
        if let Some(x) = extra.as_mut().filter(|x| !x.g_gates.is_empty()) {
            gz.unembed = Some(std::mem::take(&mut x.g_gates));
        }
        let grads = self.backward_impl(fb, state, g_recon, extra, Some(&mut gz), None)?;
        Ok((grads, gz))
    }

    fn backward_impl(
        &self,
        fb: &FlatBatch,
        state: &State,
        mut g_recon: Vec<Vec<f32>>,
        extra: Option<UnembedGrads>,
        mut gz: Option<&mut SlotValues>,
        mut sink: Option<GradSink>,
    ) -> Result<Vec<ModuleGrads>> {
        let mut prof = Profile::new();
        let (n, d, f, k) = (fb.b * fb.s, self.d, self.f, self.k);
        let n_mod = self.suite.modules.len();
        // Gradient w.r.t. reconstructions without b_dec (attention inputs under all connections).
        let mut g_recon_nb: Vec<Vec<f32>> = vec![Vec::new(); n_mod];
        // Gradient w.r.t. each module's selected feature values (N, K); gradients w.r.t.
        // W_decᵀ (F, D) that downstream edge weights send to each module; and extra b_dec ones.
        let (mut g_val, mut g_dec_t_in, mut g_bdec_extra) = match extra {
            Some(x) => (x.g_val, x.g_dec_t, vec![x.g_bdec; n_mod]),
            None => {
                ((0..n_mod).map(|_| vec![0f32; n * k]).collect(), vec![Vec::new(); n_mod], vec![vec![0f32; d]; n_mod])
            }
        };
        let mut grads: Vec<Option<ModuleGrads>> = vec![None; n_mod];
        for di in (0..n_mod).rev() {
            let st = &state.modules[di];
            let g_rec = std::mem::take(&mut g_recon[di]);
            let (mut g_dec_t, mut g_bdec) = self.decode_backward(di, st, g_rec, &g_recon_nb[di], &mut g_val[di]);
            let pg = self.pre_grad(di, st, &g_val[di], &mut g_dec_t);
            prof.mark("decode");
            let (mut g_enc, g_benc, g_z) = self.encode_backward(di, st, &pg, &mut g_bdec);
            self.encoder_input_backward(fb, di, &g_z, &mut g_recon, &mut g_recon_nb, &mut g_bdec_extra);
            prof.mark("encoder");
            let g = EdgeGrads { val: &mut g_val, enc: &mut g_enc, dec_t_in: &mut g_dec_t_in };
            self.edges_backward(fb, di, state, &pg, g, gz.as_deref_mut(), &mut prof);
            // Assemble this module's gradients (W_dec from its transpose). What downstream
            // modules sent (all they send) is let go of once added.
            let sent = std::mem::take(&mut g_dec_t_in[di]);
            if !sent.is_empty() {
                add_into(&mut g_dec_t, &sent);
            }
            drop(sent);
            drop(std::mem::take(&mut g_recon_nb[di]));
            let g_wdec = if self.decoder_major { g_dec_t } else { transpose(&g_dec_t, f, d) };
            // Downstream modules have sent this one all they send (into ups only).
            add_into(&mut g_bdec, &g_bdec_extra[di]);
            prof.mark("assemble");
            let g = AeParams { w_enc: g_enc, b_enc: g_benc, w_dec: g_wdec, b_dec: g_bdec };
            match sink.as_mut() {
                Some(s) => s(di, g)?,
                None => grads[di] = Some(g),
            }
        }
        prof.mark("assemble");
        prof.report("backward");
        match sink {
            Some(_) => Ok(Vec::new()),
            None => Ok(grads.into_iter().map(|g| g.expect("every module visited")).collect()),
        }
    }

    /// The edge terms' backward into module `di`: the upstream values' gradients, the edge
    /// weights' into this module's encoder and the upstream decoders (all into `g`).
    /// With gates, the gated weights' gradients become the raw weights' ones and the gates'
    /// (into `gz`).
    #[allow(clippy::too_many_arguments)]
    fn edges_backward(
        &self,
        fb: &FlatBatch,
        di: usize,
        state: &State,
        pg: &PreGrad,
        g: EdgeGrads,
        mut gz: Option<&mut SlotValues>,
        prof: &mut Profile,
    ) {
        let plan_d = self.plan.down(di);
        let embed = plan_d.embed.as_ref();
        if !self.plan.sparse || (plan_d.ups.is_empty() && embed.is_none()) {
            return;
        }
        let index = plan_d.index.as_ref().expect("sparse plan");
        let st = &state.modules[di];
        let (before, _) = g.val.split_at_mut(di);
        let tg = Target { di, layer: self.suite.modules[di].layer, index, embed };
        match self.suite.modules[di].kind {
            Kind::Mlp => {
                let has_ups = !plan_d.ups.is_empty();
                let mut gw = match has_ups {
                    true => self.mlp_edges_backward(fb, tg, &st.edges.w, pg, state, before),
                    false => Vec::new(),
                };
                let mut gw_embed = embed.map(|ep| ep.index.to_slot_order(&self.mlp_embed_backward(fb, di, ep, pg), 1));
                if has_ups {
                    self.ungate(di, false, &mut gw, &st.edges.raw, 1, gz.as_deref_mut());
                }
                if let Some(gwe) = gw_embed.as_mut() {
                    self.ungate(di, true, gwe, &st.edges.embed_raw, 1, gz.as_deref_mut());
                }
                prof.mark("mlp edges");
                if has_ups {
                    self.mlp_edge_weights_backward(di, index, &gw, g.enc, g.dec_t_in);
                }
                if let (Some(ep), Some(gwe)) = (embed, &gw_embed) {
                    self.mlp_embed_weights_backward(ep, gwe, g.enc);
                }
                prof.mark("mlp w");
            }
            Kind::Attn => {
                let (mut gw, mut gw_embed) = self.attn_edges_backward(fb, tg, &st.edges, pg, state, before);
                let h = self.n_heads;
                self.ungate(di, false, &mut gw, &st.edges.raw, h, gz.as_deref_mut());
                if embed.is_some() {
                    self.ungate(di, true, &mut gw_embed, &st.edges.embed_raw, h, gz);
                }
                prof.mark("attn edges");
                self.attn_edge_weights_backward(tg, &gw, &st.edges, &gw_embed, g.enc, g.dec_t_in);
                prof.mark("attn w");
            }
        }
    }
}

/// Gradients as candle tensors shaped like the suite's variables (in `named_vars` order).
pub fn grads_to_tensors(suite: &Suite, grads: &[ModuleGrads], device: &Device) -> Result<Vec<Tensor>> {
    let shapes = AeParams::shapes(suite.d_model, suite.n_features);
    let mut out = Vec::new();
    for g in grads {
        for ((_, v), (_, shape)) in g.named().into_iter().zip(shapes.named()) {
            out.push(Tensor::from_slice(v, shape.as_slice(), device)?);
        }
    }
    Ok(out)
}
