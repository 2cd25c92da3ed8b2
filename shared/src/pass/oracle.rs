//! A straightforward dense-masked pruned pass: the reference's algorithm transcribed (virtual
//! weight matrices `E·W_dec` of shape `F×F`, per head for attention, multiplied by a 0/1 mask).
//! It exists as the oracle the sparse pass is tested against, and as the baseline of the
//! benchmark; it costs O(F²) per module pair and must not be used for real runs. With embed and
//! unembed edges ([`forward_with_ends`], [`logits_with_ends`]) it also states those ends.

use candle_core::{DType, Tensor};

use crate::data::Batch;
use crate::error::Result;
use crate::formats::connections::Connections;
use crate::formats::suite::Suite;
use crate::model::Kind;
use crate::model::Runtime;
use crate::pass::{PassOptions, PassOutput};
use crate::sae::topk::topk_relu;

/// The 0/1 mask `M[i, j]` of edges from module `u` into module `d` (`F×F`).
fn mask(conns: &Connections, d: usize, u: usize, f: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let mut m = vec![0f32; f * f];
    for (i, es) in conns.edges[d].iter().enumerate() {
        for e in es.iter().filter(|e| e.up == u) {
            m[i * f + e.feature as usize] = 1.0;
        }
    }
    Ok(Tensor::from_vec(m, (f, f), dev)?)
}

/// Embed edges for the oracle (docs/MATH.md, "Embed and unembed connections"): per module, the
/// token ids wired into each of its features, or `None` for a module that keeps the dense `r0`
/// term.
pub type EmbedEdges = Vec<Option<Vec<Vec<u32>>>>;

/// Unembed edges for the oracle: per output token, the `(module, feature)` pairs it reads.
pub type UnembedEdges = Vec<Vec<(usize, u32)>>;

/// The pruned pass computed densely; `conns = None` means all connections (a connection set's
/// embed edges are read as [`forward_with_ends`] reads them).
pub fn forward(
    suite: &Suite,
    rt: &Runtime,
    parallel: bool,
    conns: Option<&Connections>,
    batch: &Batch,
    opts: PassOptions,
) -> Result<PassOutput> {
    let embed: Option<EmbedEdges> = conns.filter(|c| c.n_embed_edges() > 0).map(|c| {
        (0..c.modules.len())
            .map(|d| c.has_embed(d).then(|| c.embed[d].iter().map(|es| es.iter().map(|e| e.token).collect()).collect()))
            .collect()
    });
    forward_with_ends(suite, rt, parallel, conns, embed.as_ref(), batch, opts)
}

/// `x (n, V)`: 1 where token `t` holds vocabulary item v.
fn one_hot(tokens: &Tensor, v: usize) -> Result<Tensor> {
    let ids = tokens.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mut x = vec![0f32; ids.len() * v];
    for (t, &id) in ids.iter().enumerate() {
        x[t * v + id as usize] = 1.0;
    }
    Ok(Tensor::from_vec(x, (ids.len(), v), tokens.device())?)
}

/// `M (rows, cols)`: 1 at `(r, c)` for each `c` in `lists[r]`.
fn list_mask(lists: &[Vec<u32>], cols: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let mut m = vec![0f32; lists.len() * cols];
    for (r, cs) in lists.iter().enumerate() {
        for &c in cs {
            m[r * cols + c as usize] = 1.0;
        }
    }
    Ok(Tensor::from_vec(m, (lists.len(), cols), dev)?)
}

/// The pruned pass computed densely with embed edges (`embed = None`: every module keeps the
/// dense `r0` term, as [`forward`]). A module with embed edges reads the positional part of
/// `r0` densely and each token through its edges: mlp `[tok_t ∈ E(i)] E_i·W_E[tok_t] / s2[t]`,
/// attention the same through `W_OV[h]`, mixed by the pattern over key positions.
pub fn forward_with_ends(
    suite: &Suite,
    rt: &Runtime,
    parallel: bool,
    conns: Option<&Connections>,
    embed: Option<&EmbedEdges>,
    batch: &Batch,
    opts: PassOptions,
) -> Result<PassOutput> {
    let dev = batch.resid_pre0.device();
    let (f, vocab) = (suite.n_features, rt.weights.w_e.dim(0)?);
    let masks = Masks {
        up: &|d, u| conns.map(|c| mask(c, d, u, f, dev)).transpose(),
        embed: &|d| embed.and_then(|e| e[d].as_ref()).map(|lists| list_mask(lists, vocab, dev)).transpose(),
    };
    forward_masked(suite, rt, parallel, &masks, batch, opts)
}

/// The masks of a dense pass: `up(d, u)` the `F×F` mask of edges from module u into d
/// (`None`: all connections), `embed(d)` the `F×V` mask of d's embed edges (`None`: the dense
/// `r0` term). Masks may hold any values (gates) and be variables (their gradients).
pub struct Masks<'a> {
    pub up: &'a dyn Fn(usize, usize) -> Result<Option<Tensor>>,
    pub embed: &'a dyn Fn(usize) -> Result<Option<Tensor>>,
}

/// The pruned pass computed densely with any edge masks (see [`Masks`]).
pub fn forward_masked(
    suite: &Suite,
    rt: &Runtime,
    parallel: bool,
    masks: &Masks,
    batch: &Batch,
    opts: PassOptions,
) -> Result<PassOutput> {
    let (b, s, dm) = batch.resid_pre0.dims3()?;
    let (n, f) = (b * s, suite.n_features);
    let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
    let dev = batch.resid_pre0.device();
    let vocab = rt.weights.w_e.dim(0)?;
    // r0 = W_E[tok] + r_pos, r_pos = W_pos[pos] (learned positions) or 0 (rotary).
    let r_pos = match &rt.weights.w_pos {
        Some(w_pos) => w_pos.narrow(0, 0, s)?.unsqueeze(0)?.broadcast_as((b, s, dm))?.contiguous()?,
        None => Tensor::zeros((b, s, dm), DType::F32, dev)?,
    };
    let (mut feats, mut recon): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
    let mut pres = Vec::new();
    for (d, module) in suite.modules.iter().enumerate() {
        let ae = &suite.aes[d];
        let enc = ae.w_enc.as_tensor();
        let l = module.layer;
        let embed_d = (masks.embed)(d)?;
        let r0 = if embed_d.is_some() { &r_pos } else { &batch.resid_pre0 };
        let ups: Vec<usize> =
            (0..suite.modules.len()).filter(|&u| suite.modules[u].precedes(module, parallel)).collect();
        let mut ub = Tensor::zeros(dm, DType::F32, dev)?;
        let (w_v, w_o) = rt.flat_vo(l);
        // W_OV[h] = W_V[h] W_O[h], (D, D) per head
        let w_ov: Vec<Tensor> = (0..h)
            .map(|hh| Ok(w_v.narrow(1, hh * dh, dh)?.matmul(&w_o.narrow(0, hh * dh, dh)?)?))
            .collect::<Result<_>>()?;
        let mut pre = match module.kind {
            Kind::Mlp => (r0.broadcast_div(&batch.ln2_scale[l])?.reshape((n, dm))?).matmul(&enc.t()?)?,
            Kind::Attn => {
                let x = r0.broadcast_div(&batch.ln1_scale[l])?;
                let mut acc = Tensor::zeros((b, s, f), DType::F32, dev)?;
                for (hh, wov) in w_ov.iter().enumerate() {
                    let pre_mix = x.reshape((n, dm))?.matmul(wov)?.matmul(&enc.t()?)?.reshape((b, s, f))?;
                    let p = batch.pattern[l].narrow(1, hh, 1)?.squeeze(1)?; // (B, q, k)
                    acc = (acc + p.matmul(&pre_mix)?)?;
                }
                acc.reshape((n, f))?
            }
        };
        if let Some(m) = embed_d {
            // The token edges, densely: V_e = (E W_Eᵀ) ⊙ M_e (F, V), per head through W_OV[h].
            let x = one_hot(&batch.tokens, vocab)?;
            let w_e = &rt.weights.w_e;
            let contrib = match module.kind {
                Kind::Mlp => {
                    let v = (enc.matmul(&w_e.t()?)? * &m)?;
                    x.broadcast_div(&batch.ln2_scale[l].reshape((n, 1))?)?.matmul(&v.t()?)?
                }
                Kind::Attn => {
                    let xs = x.broadcast_div(&batch.ln1_scale[l].reshape((n, 1))?)?;
                    let mut acc = Tensor::zeros((b, s, f), DType::F32, dev)?;
                    for (hh, wov) in w_ov.iter().enumerate() {
                        let v = (enc.matmul(&wov.t()?)?.matmul(&w_e.t()?)? * &m)?;
                        let c = xs.matmul(&v.t()?)?.reshape((b, s, f))?;
                        let p = batch.pattern[l].narrow(1, hh, 1)?.squeeze(1)?;
                        acc = (acc + p.matmul(&c)?)?;
                    }
                    acc.reshape((n, f))?
                }
            };
            pre = (pre + contrib)?;
        }
        for &u in &ups {
            ub = (ub + suite.aes[u].b_dec.as_tensor())?;
            let dec = suite.aes[u].w_dec.as_tensor();
            let m = (masks.up)(d, u)?;
            let contrib = match module.kind {
                Kind::Mlp => {
                    let mut v = enc.matmul(dec)?; // (F_down, F_up)
                    if let Some(m) = &m {
                        v = (v * m)?;
                    }
                    let fu = feats[u].broadcast_div(&batch.ln2_scale[l].reshape((n, 1))?)?;
                    fu.matmul(&v.t()?)?
                }
                Kind::Attn => {
                    let fu = feats[u].broadcast_div(&batch.ln1_scale[l].reshape((n, 1))?)?;
                    let mut acc = Tensor::zeros((b, s, f), DType::F32, dev)?;
                    for (hh, wov) in w_ov.iter().enumerate() {
                        // V_h[f, g] = Σ_{i,o} E[f,o] W_OV[h][i,o] W_dec[i,g]
                        let mut v = enc.matmul(&wov.t()?)?.matmul(dec)?;
                        if let Some(m) = &m {
                            v = (v * m)?;
                        }
                        let c = fu.matmul(&v.t()?)?.reshape((b, s, f))?;
                        let p = batch.pattern[l].narrow(1, hh, 1)?.squeeze(1)?;
                        acc = (acc + p.matmul(&c)?)?;
                    }
                    acc.reshape((n, f))?
                }
            };
            pre = (pre + contrib)?;
        }
        if module.kind == Kind::Attn {
            let b_o = &rt.weights.blocks[l].b_o;
            pre = pre.broadcast_add(&b_o.unsqueeze(0)?.matmul(&enc.t()?)?.squeeze(0)?)?;
        }
        pre = pre.broadcast_add(ae.b_enc.as_tensor())?;
        pre = pre.broadcast_sub(&enc.matmul(&ae.b_dec.as_tensor().unsqueeze(1)?)?.squeeze(1)?)?;
        let bias_term = match module.kind {
            Kind::Mlp => ub.unsqueeze(0)?.broadcast_div(&batch.ln2_scale[l].reshape((n, 1))?)?.matmul(&enc.t()?)?,
            Kind::Attn if opts.consistent_attn_bias => {
                let per_key = ub.unsqueeze(0)?.broadcast_div(&batch.ln1_scale[l].reshape((n, 1))?)?;
                let mut acc = Tensor::zeros((b, s, f), DType::F32, dev)?;
                for (hh, wov) in w_ov.iter().enumerate() {
                    let c = per_key.matmul(wov)?.matmul(&enc.t()?)?.reshape((b, s, f))?;
                    let p = batch.pattern[l].narrow(1, hh, 1)?.squeeze(1)?;
                    acc = (acc + p.matmul(&c)?)?;
                }
                acc.reshape((n, f))?
            }
            Kind::Attn => {
                let sum_ov = w_ov.iter().skip(1).try_fold(w_ov[0].clone(), |a, w| a + w)?;
                ub.unsqueeze(0)?
                    .broadcast_div(&batch.ln1_scale[l].reshape((n, 1))?)?
                    .matmul(&sum_ov)?
                    .matmul(&enc.t()?)?
            }
        };
        pre = (pre + bias_term)?;
        let feat = topk_relu(&pre, suite.k)?;
        let rec = feat.matmul(&ae.w_dec.as_tensor().t()?)?.broadcast_add(ae.b_dec.as_tensor())?;
        recon.push(rec.reshape((b, s, dm))?);
        feats.push(feat);
        pres.push(pre);
    }
    Ok(PassOutput { feats, recon, pre: pres })
}

/// Logits `(N, V)` of the spliced residual with unembed edges (docs/MATH.md, "Embed and
/// unembed connections"): token v reads `r0 + Σ_m b_dec^m` and, of the features, only those in
/// `unembed[v]`; `s` is LNPre's scale of the whole spliced residual (every feature), so with
/// every feature wired into every token these are `LNPre(resid) W_U + b_U`.
pub fn logits_with_ends(
    suite: &Suite,
    rt: &Runtime,
    batch: &Batch,
    out: &PassOutput,
    unembed: &UnembedEdges,
) -> Result<Tensor> {
    let (b, s, dm) = batch.resid_pre0.dims3()?;
    let n = b * s;
    let dev = batch.resid_pre0.device();
    let (w_u, b_u) = (&rt.weights.w_u, &rt.weights.b_u);
    let vocab = w_u.dim(1)?;
    let resid = crate::pass::objective::spliced_resid(batch, out)?.reshape((n, dm))?;
    let centred = resid.broadcast_sub(&resid.mean_keepdim(1)?)?;
    let scale = (centred.sqr()?.mean_keepdim(1)? + rt.cfg.ln_eps)?.sqrt()?; // (N, 1)
    let mut dense = batch.resid_pre0.reshape((n, dm))?;
    for ae in &suite.aes {
        dense = dense.broadcast_add(ae.b_dec.as_tensor())?;
    }
    let mut logits = dense.matmul(w_u)?;
    for (m, ae) in suite.aes.iter().enumerate() {
        // Mask (F, V): 1 where feature j of module m is wired into token v.
        let mut mask = vec![0f32; suite.n_features * vocab];
        for (v, edges) in unembed.iter().enumerate() {
            for &(_, j) in edges.iter().filter(|e| e.0 == m) {
                mask[j as usize * vocab + v] = 1.0;
            }
        }
        let mask = Tensor::from_vec(mask, (suite.n_features, vocab), dev)?;
        let weights = (ae.w_dec.as_tensor().t()?.matmul(w_u)? * mask)?; // (F, V)
        logits = (logits + out.feats[m].matmul(&weights)?)?;
    }
    Ok(logits.broadcast_div(&scale)?.broadcast_add(b_u)?)
}
