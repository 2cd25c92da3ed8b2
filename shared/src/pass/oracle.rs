//! A straightforward dense-masked pruned pass: the reference's algorithm transcribed (virtual
//! weight matrices `E·W_dec` of shape `F×F`, per head for attention, multiplied by a 0/1 mask).
//! It exists as the oracle the sparse pass is tested against, and as the baseline of the
//! benchmark; it costs O(F²) per module pair and must not be used for real runs.

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

/// The pruned pass computed densely; `conns = None` means all connections.
pub fn forward(
    suite: &Suite,
    rt: &Runtime,
    parallel: bool,
    conns: Option<&Connections>,
    batch: &Batch,
    opts: PassOptions,
) -> Result<PassOutput> {
    let (b, s, dm) = batch.resid_pre0.dims3()?;
    let (n, f) = (b * s, suite.n_features);
    let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
    let dev = batch.resid_pre0.device();
    let r0 = &batch.resid_pre0;
    let (mut feats, mut recon): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
    let mut pres = Vec::new();
    for (d, module) in suite.modules.iter().enumerate() {
        let ae = &suite.aes[d];
        let enc = ae.w_enc.as_tensor();
        let l = module.layer;
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
        for &u in &ups {
            ub = (ub + suite.aes[u].b_dec.as_tensor())?;
            let dec = suite.aes[u].w_dec.as_tensor();
            let m = conns.map(|c| mask(c, d, u, f, dev)).transpose()?;
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
