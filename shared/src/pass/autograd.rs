//! The pruned forward pass as composed candle ops with autograd: the GPU path, and the
//! reference implementation the CPU engine is tested against (docs/MATH.md, "Pruned pass: mlp
//! targets", "Pruned pass: attention targets", "Edge terms").
//!
//! Each downstream module's pre-activation is built from cached clean-run quantities (layer-0
//! residual, LN scales, attention patterns) plus the contributions of its connected upstream
//! features, then ReLU + top-k. With all connections ([`Wiring::All`]) the upstream sum is just
//! the upstream reconstructions pushed through the encoder (dense d_model-space products); with
//! a connection set ([`Wiring::Sparse`]) the per-edge virtual weights `w[i,c] = E[i]·W_dec[:,j]`
//! (attention: `Σ` over a d_head factorisation of `W_OV`) are formed only for the F·C edges and
//! applied through [`super::kernels::EdgeMatmul`] — no `F×F` or `heads×F×F` matrix exists.
//! Gradients flow to every suite parameter through candle autograd.
//!
//! Dimensions: B sequences of S positions, N = B·S tokens, D = d_model, H heads of d_h, F
//! features, C slots per downstream feature, k active features per token.

use candle_core::{DType, Tensor};

use super::kernels::{EdgeMatmul, SparseDecode};
use super::plan::DownPlan;
use super::{PassOptions, PassOutput, Plan};
use crate::data::Batch;
use crate::error::Result;
use crate::formats::suite::Suite;
use crate::model::{Kind, Runtime};
use crate::sae::topk::{topk_relu, topk_relu_device};
use crate::sae::AeParams;

/// One layer's attention constants in the pass dtype.
struct AttnConsts {
    w_v: Tensor,      // (D, H·dh)
    w_o: Tensor,      // (H·dh, D)
    w_ov_sum: Tensor, // (D, D) = Σ_h W_OV[h]
    b_o: Tensor,      // (D)
}

/// What every edge contribution reads: the suite, the model, the pass's weights (in its dtype)
/// and whether the composed ops run (any device) instead of the CPU custom ops.
#[derive(Clone, Copy)]
struct EdgeCtx<'a> {
    suite: &'a Suite,
    rt: &'a Runtime,
    wt: &'a Weights,
    composed: bool,
    gates: Option<&'a Gates>,
}

/// Per-edge multipliers of a sparse pass (learned connections, docs/MATH.md, "Learned
/// connections"): per downstream module, `(F, C)` over the plan's upstream slots and `(F, C_e)`
/// over its embed slots (slot c of feature i is the c-th edge the connection set lists for i);
/// `None` where a module has no such slots. An attention edge's one gate scales all its heads.
/// With unembed edges, `(V_n, C_u)` over the plan's unembed slots (they act in the spliced CE,
/// [`crate::pass::objective::ce_per_token_gated`]).
#[derive(Debug, Clone)]
pub struct Gates {
    pub up: Vec<Option<Tensor>>,
    pub embed: Vec<Option<Tensor>>,
    pub unembed: Option<Tensor>,
}

/// `w (F, C, H)` times the gates `(F, C)` of its slots, if any.
fn gated(w: Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
    Ok(match gate {
        Some(z) => w.broadcast_mul(&z.to_dtype(w.dtype())?.unsqueeze(2)?)?,
        None => w,
    })
}

/// The wiring [`apply_edges`] walks: the edge index, its slots' columns and the mask of used
/// slots (the plan's tensors for one downstream module, its embed edges or the unembedding).
pub(crate) struct Wires<'a> {
    pub index: &'a std::sync::Arc<super::plan::EdgeIndex>,
    pub cols: &'a Tensor,
    pub slot_mask: &'a Tensor,
}

/// The tensors the pass reads, in its compute dtype: every module's parameters (casts of the
/// suite's variables, so gradients reach them) and every layer's attention constants.
struct Weights {
    aes: Vec<AeParams<Tensor>>,
    attn: Vec<AttnConsts>,
    /// `W_E (V, D)`, when some module has embed edges.
    w_e: Option<Tensor>,
}

impl Weights {
    fn new(suite: &Suite, rt: &Runtime, dtype: DType, embed: bool) -> Result<Weights> {
        let cast =
            |t: &Tensor| -> Result<Tensor> { Ok(if t.dtype() == dtype { t.clone() } else { t.to_dtype(dtype)? }) };
        let aes = suite.aes.iter().map(|ae| ae.try_map(|v| cast(v.as_tensor()))).collect::<Result<Vec<_>>>()?;
        let attn = (0..rt.cfg.n_layers)
            .map(|l| {
                let (w_v, w_o) = rt.flat_vo(l);
                Ok(AttnConsts {
                    w_v: cast(w_v)?,
                    w_o: cast(w_o)?,
                    w_ov_sum: cast(rt.w_ov_sum(l))?,
                    b_o: cast(&rt.weights.blocks[l].b_o)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let w_e = if embed { Some(cast(&rt.weights.w_e)?) } else { None };
        Ok(Weights { aes, attn, w_e })
    }
}

/// Σ_h P_h (x W_V[h]) W_O[h] for `x (B, S, D)`: attention mixing with the cached pattern.
fn attn_mix(rt: &Runtime, attn: &AttnConsts, x: &Tensor, pattern: &Tensor) -> Result<Tensor> {
    let (b, s, d) = x.dims3()?;
    let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
    let v = x.reshape((b * s, d))?.matmul(&attn.w_v)?.reshape((b, s, h, dh))?.transpose(1, 2)?.contiguous()?;
    let z = pattern.matmul(&v)?.transpose(1, 2)?.reshape((b * s, h * dh))?;
    Ok(z.matmul(&attn.w_o)?.reshape((b, s, d))?)
}

/// Run the pruned pass of `suite` on `batch`, in [`Batch::pass_dtype`] (f32, or bf16/f16
/// through the composed ops with the suite's f32 variables cast on the way in — see
/// [`Batch::with_pass_dtype`]).
pub fn forward(suite: &Suite, rt: &Runtime, plan: &Plan, batch: &Batch, opts: PassOptions) -> Result<PassOutput> {
    forward_gated(suite, rt, plan, batch, opts, None)
}

/// [`forward`] with each sparse edge's term multiplied by its gate (a sparse plan; gradients
/// reach the gates through autograd).
pub fn forward_gated(
    suite: &Suite,
    rt: &Runtime,
    plan: &Plan,
    batch: &Batch,
    opts: PassOptions,
    gates: Option<&Gates>,
) -> Result<PassOutput> {
    let (b, s, dm) = batch.resid_pre0.dims3()?;
    let (n, f, k) = (b * s, suite.n_features, suite.k);
    let dtype = batch.pass_dtype();
    let r0 = &batch.resid_pre0.to_dtype(dtype)?;
    // The CPU custom ops are f32 only.
    let composed = plan.composed || dtype != DType::F32;
    let any_embed = (0..suite.modules.len()).any(|d| plan.down(d).embed.is_some());
    let w = Weights::new(suite, rt, dtype, any_embed)?;
    let cx = EdgeCtx { suite, rt, wt: &w, composed, gates };
    // A module with embed edges reads r0's positional part densely: W_pos[0..S) (learned
    // positions) or 0 (rotary); docs/MATH.md, "Embed and unembed connections".
    let r_pos = match (&rt.weights.w_pos, any_embed) {
        (_, false) => None,
        (Some(p), true) => Some(p.narrow(0, 0, s)?.unsqueeze(0)?.broadcast_as((b, s, dm))?.to_dtype(dtype)?),
        (None, true) => Some(Tensor::zeros((b, s, dm), dtype, r0.device())?),
    };
    let mut feats: Vec<Tensor> = Vec::with_capacity(suite.modules.len());
    let mut recon: Vec<Tensor> = Vec::with_capacity(suite.modules.len());
    let mut recon_nobias: Vec<Tensor> = Vec::with_capacity(suite.modules.len());
    let mut pres = Vec::with_capacity(suite.modules.len());
    for (d, module) in suite.modules.iter().enumerate() {
        let AeParams { w_enc: enc, b_enc, w_dec, b_dec } = &w.aes[d];
        let enc_t = enc.t()?;
        let plan_d = plan.down(d);
        let ups = &plan_d.ups;
        let mut ub = Tensor::zeros(dm, dtype, r0.device())?;
        for &u in ups {
            ub = (ub + &w.aes[u].b_dec)?;
        }
        let l = module.layer;
        let r_in = match (&plan_d.embed, &r_pos) {
            (Some(_), Some(p)) => p,
            _ => r0,
        };
        let edges = plan.sparse && (!ups.is_empty() || plan_d.embed.is_some());
        let mut pre = match module.kind {
            Kind::Mlp => {
                let scale = &batch.ln2_scale[l];
                let mut x = r_in.clone();
                if plan.sparse {
                    x = x.broadcast_add(&ub)?;
                } else {
                    for &u in ups {
                        x = (x + &recon[u])?;
                    }
                }
                let x = x.broadcast_div(scale)?;
                let mut a = x.reshape((n, dm))?.matmul(&enc_t)?;
                if edges {
                    let y = sparse_contrib(cx, plan_d, &feats, d, None, batch)?; // (B, 1, S, F)
                    a = (a + y.reshape((n, f))?.broadcast_div(&scale.reshape((n, 1))?)?)?;
                }
                a
            }
            Kind::Attn => {
                let scale = &batch.ln1_scale[l];
                let pattern = &batch.pattern[l];
                let mut x = r_in.clone();
                if !plan.sparse {
                    for &u in ups {
                        x = (x + &recon_nobias[u])?;
                    }
                }
                if opts.consistent_attn_bias {
                    x = x.broadcast_add(&ub)?;
                }
                let mixed = attn_mix(rt, &w.attn[l], &x.broadcast_div(scale)?, pattern)?;
                let mut a = mixed.reshape((n, dm))?.matmul(&enc_t)?;
                if edges {
                    let y = sparse_contrib(cx, plan_d, &feats, d, Some(l), batch)?; // (B, H, S, F)
                    let y = y.broadcast_div(&scale.reshape((b, 1, s, 1))?)?;
                    let mixed = pattern.matmul(&y)?.sum(1)?; // (B, S, F)
                    a = (a + mixed.reshape((n, f))?)?;
                }
                let b_o = &w.attn[l].b_o;
                a = a.broadcast_add(&b_o.unsqueeze(0)?.matmul(&enc_t)?.squeeze(0)?)?;
                if !opts.consistent_attn_bias && !ups.is_empty() {
                    // Reference form (B3): (ub / s1[q]) (Σ_h W_OV[h]) Eᵀ.
                    let projected = ub.unsqueeze(0)?.matmul(&w.attn[l].w_ov_sum)?; // (1, D)
                    let per_tok = projected.broadcast_div(&scale.reshape((n, 1))?)?; // (N, D)
                    a = (a + per_tok.matmul(&enc_t)?)?;
                }
                a
            }
        };
        // + b_enc − E b_dec (the encoder subtracts the module's own b_dec)
        let own = enc.matmul(&b_dec.unsqueeze(1)?)?.squeeze(1)?;
        pre = pre.broadcast_add(&(b_enc - own)?)?;
        let feat = if composed { topk_relu_device(&pre, k)? } else { topk_relu(&pre, k)? };
        let w_dec_t = w_dec.t()?.contiguous()?;
        let rec_nb = if composed { feat.matmul(&w_dec_t)? } else { feat.apply_op2(&w_dec_t, SparseDecode)? };
        let rec = rec_nb.broadcast_add(b_dec)?.reshape((b, s, dm))?;
        recon_nobias.push(rec_nb.reshape((b, s, dm))?);
        recon.push(rec);
        feats.push(feat);
        pres.push(pre);
    }
    Ok(PassOutput { feats, recon, pre: pres })
}

/// Every sparse contribution of module `d`'s edges `(B, H, S, F)` (H = 1 for mlp targets):
/// from upstream features and from the token embedding.
fn sparse_contrib(
    cx: EdgeCtx,
    plan_d: &DownPlan,
    feats: &[Tensor],
    d: usize,
    attn_layer: Option<usize>,
    batch: &Batch,
) -> Result<Tensor> {
    let s = batch.resid_pre0.dim(1)?;
    let from_ups = match plan_d.ups.is_empty() {
        true => None,
        false => Some(edge_contrib(cx, plan_d, feats, d, attn_layer, s)?),
    };
    let from_embed = match &plan_d.embed {
        Some(ep) => {
            let gate = cx.gates.and_then(|g| g.embed[d].as_ref());
            Some(embed_contrib(cx, ep, &cx.wt.aes[d].w_enc, &batch.tokens, attn_layer, s, gate)?)
        }
        None => None,
    };
    Ok(match (from_ups, from_embed) {
        (Some(a), Some(b)) => (a + b)?,
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => unreachable!("called with edges"),
    })
}

/// The contribution of the embed edges `(B, H, S, F)`: each position's token is an upstream
/// feature of value 1 whose decoder column is `W_E[token]`; `W_E` is a constant (no gradient).
fn embed_contrib(
    cx: EdgeCtx,
    ep: &super::plan::EmbedPlan,
    enc: &Tensor,
    tokens: &Tensor,
    attn_layer: Option<usize>,
    seq_len: usize,
    gate: Option<&Tensor>,
) -> Result<Tensor> {
    let (rt, wt) = (cx.rt, cx.wt);
    let (f, dm) = enc.dims2()?;
    let width = ep.index.width;
    let rows = wt.w_e.as_ref().expect("W_E loaded for embed edges").index_select(&ep.slot_tokens, 0)?; // (F·C_e, D)
    let (w, heads) = match attn_layer {
        None => (rows.reshape((f, width, dm))?.broadcast_mul(&enc.unsqueeze(1)?)?.sum(2)?.unsqueeze(2)?, 1),
        Some(l) => {
            let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
            let AttnConsts { w_v, w_o, .. } = &wt.attn[l];
            let ev = enc.matmul(&w_o.t()?)?.reshape((f, 1, h, dh))?;
            let dv = rows.matmul(w_v)?.reshape((f, width, h, dh))?;
            (dv.broadcast_mul(&ev)?.sum(3)?, h)
        }
    };
    // x (N, columns): 1 at the column of each position's token (if an edge reads it).
    let ids = tokens.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let m = ep.tokens.len();
    let mut x = vec![0f32; ids.len() * m];
    for (t, &id) in ids.iter().enumerate() {
        if let Some(c) = ep.col(id) {
            x[t * m + c] = 1.0;
        }
    }
    let x = Tensor::from_vec(x, (ids.len(), m), enc.device())?.to_dtype(enc.dtype())?;
    let wires = Wires { index: &ep.index, cols: &ep.cols, slot_mask: &ep.slot_mask };
    apply_edges(&x, &gated(w, gate)?, wires, heads, seq_len, cx.composed)
}

/// The sparse upstream contribution `(B, H, S, F)` (H = 1 for mlp targets).
fn edge_contrib(
    cx: EdgeCtx,
    plan_d: &DownPlan,
    feats: &[Tensor],
    d: usize,
    attn_layer: Option<usize>,
    seq_len: usize,
) -> Result<Tensor> {
    let (suite, rt, wt) = (cx.suite, cx.rt, cx.wt);
    let index = plan_d.index.as_ref().expect("sparse plan");
    let cols = plan_d.cols.as_ref().expect("sparse plan");
    let f = suite.n_features;
    let enc = &wt.aes[d].w_enc;
    let x = Tensor::cat(&plan_d.ups.iter().map(|&u| &feats[u]).collect::<Vec<_>>(), 1)?;
    let dec_t =
        Tensor::cat(&plan_d.ups.iter().map(|&u| wt.aes[u].w_dec.t()).collect::<candle_core::Result<Vec<_>>>()?, 0)?
            .contiguous()?;
    let width = index.width;
    let (w, heads) = match attn_layer {
        None => {
            // w[i,c] = E[i] · W_dec^{u}[:, j]
            let g = dec_t.index_select(cols, 0)?.reshape((f, width, suite.d_model))?;
            (g.broadcast_mul(&enc.unsqueeze(1)?)?.sum(2)?.unsqueeze(2)?, 1)
        }
        Some(l) => {
            // w_h[i,c] = (W_O[h] E[i]ᵀ) · (W_dec[:,j]ᵀ W_V[h]), a d_head dot product per head.
            let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
            let AttnConsts { w_v, w_o, .. } = &wt.attn[l];
            let ev = enc.matmul(&w_o.t()?)?.reshape((f, 1, h, dh))?;
            let dv = dec_t.matmul(w_v)?.index_select(cols, 0)?.reshape((f, width, h, dh))?;
            (dv.broadcast_mul(&ev)?.sum(3)?, h)
        }
    };
    let slot_mask = plan_d.slot_mask.as_ref().expect("sparse plan");
    let w = gated(w, cx.gates.and_then(|g| g.up[d].as_ref()))?;
    apply_edges(&x, &w, Wires { index, cols, slot_mask }, heads, seq_len, cx.composed)
}

/// `Y (B, H, S, F)` from the upstream values `x (N, M)` and the edge weights `w (F, C, H)`
/// over `wires`: the CPU custom op, or composed ops on any device.
pub(crate) fn apply_edges(
    x: &Tensor,
    w: &Tensor,
    wires: Wires,
    heads: usize,
    seq_len: usize,
    composed: bool,
) -> Result<Tensor> {
    let Wires { index, cols, slot_mask } = wires;
    let (f, width) = (index.n_down, index.width);
    if composed {
        // Composed (any device): gather each slot's upstream feature row (tokens along the
        // row), then one small batched product per downstream feature:
        // y[f] (H, N) = w[f]ᵀ (H, C) · x_g[f] (C, N). Memory F·C·N, no F·C·N·H intermediate.
        let n = x.dim(0)?;
        let w = w.broadcast_mul(&slot_mask.to_dtype(w.dtype())?)?; // (F, C, H); empty slots contribute nothing
        let g = x.t()?.contiguous()?.index_select(cols, 0)?.reshape((f, width, n))?; // (F, C, N)
        let y = w.transpose(1, 2)?.contiguous()?.matmul(&g)?; // (F, H, N)
        let b = n / seq_len;
        return Ok(y.reshape((f, heads, b, seq_len))?.permute((2, 1, 3, 0))?.contiguous()?);
    }
    let op = EdgeMatmul { index: index.clone(), heads, seq_len };
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}
