//! The clean forward pass, with TransformerLens hook values (docs/MATH.md, "Model side").
//!
//! Every LayerNorm is `LNPre` (weights folded by [`super::weights`]): center over d_model,
//! divide by `sqrt(mean(x_c²) + eps)`. The hooks returned are exactly the tensors TL's
//! `run_with_cache` records under the same names, with the same shapes.

use candle_core::{DType, Device, Tensor, D};

use super::config::{Activation, ModelConfig};
use super::weights::Weights;
use crate::error::Result;

/// Hook values of one layer (TL names in the comments).
#[derive(Debug, Clone)]
pub struct LayerHooks {
    pub ln1_scale: Tensor,      // blocks.L.ln1.hook_scale       (batch, pos, 1)
    pub ln2_scale: Tensor,      // blocks.L.ln2.hook_scale       (batch, pos, 1)
    pub ln1_normalized: Tensor, // blocks.L.ln1.hook_normalized  (batch, pos, d_model)
    pub ln2_normalized: Tensor, // blocks.L.ln2.hook_normalized  (batch, pos, d_model)
    pub attn_out: Tensor,       // blocks.L.hook_attn_out        (batch, pos, d_model)
    pub mlp_out: Tensor,        // blocks.L.hook_mlp_out         (batch, pos, d_model)
    pub pattern: Tensor,        // blocks.L.attn.hook_pattern    (batch, head, q, k)
}

impl LayerHooks {
    /// `(suffix, tensor)` pairs in the reference buffer's order (docs/MATH.md, "Model side").
    pub fn named(&self) -> [(&'static str, &Tensor); 7] {
        [
            ("ln1.hook_scale", &self.ln1_scale),
            ("ln2.hook_scale", &self.ln2_scale),
            ("ln1.hook_normalized", &self.ln1_normalized),
            ("ln2.hook_normalized", &self.ln2_normalized),
            ("hook_attn_out", &self.attn_out),
            ("hook_mlp_out", &self.mlp_out),
            ("attn.hook_pattern", &self.pattern),
        ]
    }
}

/// What one forward pass produced.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `blocks.0.hook_resid_pre` (batch, pos, d_model).
    pub resid_pre0: Tensor,
    /// One entry per layer; empty unless hooks were requested.
    pub layers: Vec<LayerHooks>,
    /// Logits (batch, pos, d_vocab), if requested.
    pub logits: Option<Tensor>,
    /// Next-token cross-entropy per position (batch, pos-1); TL's `loss_per_token`.
    pub ce: Tensor,
}

/// Per-block weights in the layouts the forward pass multiplies with.
#[derive(Debug, Clone)]
struct FlatBlock {
    w_q: Tensor, // (d_model, n_heads*d_head); column i*d_head+h is TL W_Q[i,:,h]
    b_q: Tensor, // (n_heads*d_head)
    w_k: Tensor,
    b_k: Tensor,
    w_v: Tensor,
    b_v: Tensor,
    w_o: Tensor, // (n_heads*d_head, d_model)
}

/// A loaded, processed model ready to run.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub cfg: ModelConfig,
    pub weights: Weights,
    flat: Vec<FlatBlock>,
    /// Rotary (cos, sin) tables (n_ctx, rotary_dim), for GPT-NeoX.
    rotary: Option<(Tensor, Tensor)>,
    w_ov_sum: Vec<Tensor>,
    device: Device,
}

/// `LNPre`: returns `(scale (.., 1), normalized (.., d))` for `x (.., d)`.
pub fn ln_pre(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let scale = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let normalized = centered.broadcast_div(&scale)?;
    Ok((scale, normalized))
}

/// Multiply `x (.., k)` by `w (k, n)` and add `b (n)`, flattening the leading axes.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k;
    let mut y = x.reshape((rows, k))?.matmul(w)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    let mut out_dims = dims;
    *out_dims.last_mut().expect("non-empty shape") = w.dim(1)?;
    Ok(y.reshape(out_dims)?)
}

/// `act(pre + b)` for `pre (.., n)`, `b (n)`. Candle's activations run on one thread; on the
/// host (contiguous f32, outside an autograd graph) the bias and the activation are applied in
/// one pass over rows in parallel, with candle's own per-value formulas (the same bits) — except
/// GELU's tanh form, whose `tanh` is [`tanh_f32`] in vector lanes instead of libm's, one value
/// at a time (within 3·10⁻⁷ of it: 6.7% of a `collect-acts` run went to libm's `tanhf`).
fn bias_act(pre: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    use crate::util::with_host_f32;
    use rayon::prelude::*;
    let n = b.elem_count();
    // Candle's per-value formula where the host pass keeps candle's bits; GELU's tanh form has
    // its own vector kernel.
    let f: Option<fn(f32) -> f32> = match act {
        Activation::Gelu => Some(gelu_erf_f32),
        Activation::GeluNew => None,
        Activation::Relu => Some(|v| v.max(0f32)),
    };
    if !pre.track_op() {
        let host = with_host_f32(b, |bv| {
            with_host_f32(pre, |p| {
                let mut out = vec![0f32; p.len()];
                out.par_chunks_mut(n * 64).zip(p.par_chunks(n * 64)).for_each(|(o, x)| match f {
                    None => bias_gelu_new(o, x, bv),
                    Some(f) => {
                        for (orow, xrow) in o.chunks_mut(n).zip(x.chunks(n)) {
                            for ((o, &x), &b) in orow.iter_mut().zip(xrow).zip(bv) {
                                *o = f(x + b);
                            }
                        }
                    }
                });
                out
            })
        });
        if let Some(Some(out)) = host {
            return Ok(Tensor::from_vec(out, pre.shape(), pre.device())?);
        }
    }
    let y = pre.broadcast_add(b)?;
    Ok(match act {
        Activation::Gelu => y.gelu_erf()?,
        Activation::GeluNew => y.gelu()?,
        Activation::Relu => y.relu()?,
    })
}

/// The f32 of candle's `sqrt(2/π)` = 0.79788456080286535….
const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

crate::widest! {
    /// `o = gelu(x + b)` (tanh form, as candle writes it, with [`tanh_f32`] for libm's `tanh`)
    /// for rows of `b.len()`.
    fn bias_gelu_new(o: &mut [f32], x: &[f32], b: &[f32]) {
        for (orow, xrow) in o.chunks_mut(b.len().max(1)).zip(x.chunks(b.len().max(1))) {
            for ((o, &x), &b) in orow.iter_mut().zip(xrow).zip(b) {
                let v = x + b;
                *o = 0.5 * v * (1.0 + tanh_f32(SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)));
            }
        }
    }
}

/// `tanh(x)` in plain arithmetic the compiler vectorizes, within 3·10⁻⁷ relative of the exact
/// value: below |x| = 0.625 Cephes' odd polynomial `x + x·z·P(z)`, `z = x²`; above,
/// `(1 − t) / (1 + t)` with `t = exp(−2|x|)` ([`super::ce::exp_le0`], ≤ 0.29 there) and x's sign;
/// ±1 for |x| beyond 43, NaN through.
#[inline(always)]
fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_909e-2) * z - 5.373_971_6e-2) * z + 0.133_314_42) * z - 0.333_332_8) * z * x
            + x;
    let t = super::ce::exp_le0(-2.0 * a);
    let large = (1.0 - t) / (1.0 + t);
    // x's sign on both sides (the polynomial's sum would turn −0 into +0)
    if a < 0.625 { small } else { large }.copysign(x)
}

/// Candle's `gelu_erf` of one value, written as candle writes it.
fn gelu_erf_f32(v: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v
}

/// TL's GPT-NeoX rotary tables: `θ_j = p / base^(j/(r/2))`, duplicated as `[θ, θ]` (half split).
fn rotary_tables(n_ctx: usize, rotary_dim: usize, base: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = rotary_dim / 2;
    let mut cos = Vec::with_capacity(n_ctx * rotary_dim);
    let mut sin = Vec::with_capacity(n_ctx * rotary_dim);
    for p in 0..n_ctx {
        for j in 0..rotary_dim {
            // TL computes these in f32.
            let freq = (base as f32).powf((j % half) as f32 / half as f32);
            let angle = p as f32 / freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((Tensor::from_vec(cos, (n_ctx, rotary_dim), device)?, Tensor::from_vec(sin, (n_ctx, rotary_dim), device)?))
}

impl Runtime {
    /// Wrap processed weights for running on `device`.
    pub fn new(cfg: ModelConfig, weights: Weights, device: &Device) -> Result<Runtime> {
        let weights = weights.to_device(device)?;
        let (d, hd) = (cfg.d_model, cfg.n_heads * cfg.d_head);
        let flat_w = |w: &Tensor| -> Result<Tensor> { Ok(w.permute((1, 0, 2))?.reshape((d, hd))?.contiguous()?) };
        let flat = weights
            .blocks
            .iter()
            .map(|b| {
                Ok(FlatBlock {
                    w_q: flat_w(&b.w_q)?,
                    b_q: b.b_q.flatten_all()?,
                    w_k: flat_w(&b.w_k)?,
                    b_k: b.b_k.flatten_all()?,
                    w_v: flat_w(&b.w_v)?,
                    b_v: b.b_v.flatten_all()?,
                    w_o: b.w_o.reshape((hd, d))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rotary = match cfg.rotary_dim {
            Some(r) if r > 0 => Some(rotary_tables(cfg.n_ctx, r, cfg.rotary_base, device)?),
            _ => None,
        };
        let w_ov_sum = flat.iter().map(|fb| Ok(fb.w_v.matmul(&fb.w_o)?)).collect::<Result<Vec<_>>>()?;
        Ok(Runtime { cfg, weights, flat, rotary, w_ov_sum, device: device.clone() })
    }

    /// `(W_V (d_model, H·d_head), W_O (H·d_head, d_model))` of `layer`, flattened over heads.
    pub fn flat_vo(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.flat[layer].w_v, &self.flat[layer].w_o)
    }

    /// `Σ_h W_OV[h] = Σ_h W_V[h] W_O[h]` of `layer`, `(d_model, d_model)`.
    pub fn w_ov_sum(&self, layer: usize) -> &Tensor {
        &self.w_ov_sum[layer]
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `blocks.0.hook_resid_pre` for `tokens (batch, pos)` (u32).
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, s) = tokens.dims2()?;
        let mut x = self.weights.w_e.index_select(&tokens.flatten_all()?, 0)?.reshape((b, s, self.cfg.d_model))?;
        if let Some(w_pos) = &self.weights.w_pos {
            x = x.broadcast_add(&w_pos.narrow(0, 0, s)?)?;
        }
        Ok(x)
    }

    /// Additive attention mask (q, k): 0 where allowed, -inf elsewhere.
    fn mask(&self, s: usize, window: Option<usize>) -> Result<Tensor> {
        let mut m = vec![0f32; s * s];
        for q in 0..s {
            for p in 0..s {
                let allowed = p <= q && window.is_none_or(|w| q - p < w);
                if !allowed {
                    m[q * s + p] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Tensor::from_vec(m, (s, s), &self.device)?)
    }

    fn apply_rotary(&self, x: &Tensor) -> Result<Tensor> {
        // x: (batch, head, pos, d_head)
        let Some((cos, sin)) = &self.rotary else { return Ok(x.clone()) };
        let (_, _, s, dh) = x.dims4()?;
        let r = cos.dim(1)?;
        let half = r / 2;
        let (cos, sin) = (cos.narrow(0, 0, s)?, sin.narrow(0, 0, s)?);
        let x_rot = x.narrow(3, 0, r)?;
        let flipped = Tensor::cat(&[x_rot.narrow(3, half, half)?.neg()?, x_rot.narrow(3, 0, half)?], 3)?;
        let rotated = (x_rot.broadcast_mul(&cos)? + flipped.broadcast_mul(&sin)?)?;
        if r == dh {
            Ok(rotated)
        } else {
            Ok(Tensor::cat(&[rotated, x.narrow(3, r, dh - r)?], 3)?)
        }
    }

    /// Attention of layer `l` on `x̂ (batch, pos, d)`; returns `(pattern, attn_out)`.
    fn attention(&self, l: usize, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let fb = &self.flat[l];
        let heads = |w: &Tensor, bias: &Tensor| -> Result<Tensor> {
            Ok(linear(x, w, Some(bias))?.reshape((b, s, h, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let q = self.apply_rotary(&heads(&fb.w_q, &fb.b_q)?)?;
        let k = self.apply_rotary(&heads(&fb.w_k, &fb.b_k)?)?;
        let v = heads(&fb.w_v, &fb.b_v)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / self.cfg.attn_scale)?;
        let scores = scores.broadcast_add(&self.mask(s, self.cfg.windows[l])?)?;
        let pattern = candle_nn::ops::softmax_last_dim(&scores)?;
        let z = pattern.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h * dh))?;
        let out = linear(&z, &fb.w_o, Some(&self.weights.blocks[l].b_o))?;
        Ok((pattern, out))
    }

    fn mlp(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let bw = &self.weights.blocks[l];
        let post = bias_act(&linear(x, &bw.w_in, None)?, &bw.b_in, self.cfg.act)?;
        linear(&post, &bw.w_out, Some(&bw.b_out))
    }

    /// Logits `(batch, pos, d_vocab)` from a final residual stream: `LNPre(r) W_U + b_U`.
    pub fn unembed(&self, resid: &Tensor) -> Result<Tensor> {
        let (_, normalized) = ln_pre(resid, self.cfg.ln_eps)?;
        linear(&normalized, &self.weights.w_u, Some(&self.weights.b_u))
    }

    /// Next-token CE per position `(batch, pos-1)` of a final residual stream, computed one
    /// sequence at a time so the logits never exist for the whole batch.
    /// On the host (f32, outside an autograd graph) the unembedding and the CE are fused
    /// ([`super::ce::host_ce`]).
    pub fn ce_from_resid(&self, resid: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        if resid.device().is_cpu() && resid.dtype() == DType::F32 && !resid.track_op() {
            let (_, normalized) = ln_pre(resid, self.cfg.ln_eps)?;
            let w = &self.weights;
            if let Some(ce) = super::ce::host_ce(&normalized, &w.w_u, &w.b_u, tokens)? {
                return Ok(ce);
            }
        }
        let b = resid.dim(0)?;
        let rows = (0..b)
            .map(|i| token_ce(&self.unembed(&resid.narrow(0, i, 1)?)?, &tokens.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Run the model on `tokens (batch, pos)` (u32). With `hooks`, record every cached hook;
    /// with `logits`, keep the logits.
    pub fn forward(&self, tokens: &Tensor, hooks: bool, logits: bool) -> Result<ForwardOutput> {
        let tokens = tokens.to_dtype(DType::U32)?.to_device(&self.device)?;
        let resid_pre0 = self.embed(&tokens)?;
        let eps = self.cfg.ln_eps;
        let mut resid = resid_pre0.clone();
        let mut layers = Vec::new();
        for l in 0..self.cfg.n_layers {
            let (ln1_scale, ln1_normalized) = ln_pre(&resid, eps)?;
            let (pattern, attn_out) = self.attention(l, &ln1_normalized)?;
            let (ln2_scale, ln2_normalized, next) = if self.cfg.parallel_attn_mlp {
                let (sc, n) = ln_pre(&resid, eps)?;
                let mlp_out = self.mlp(l, &n)?;
                let next = ((&resid + &attn_out)? + &mlp_out)?;
                (sc, n, (next, mlp_out))
            } else {
                let mid = (&resid + &attn_out)?;
                let (sc, n) = ln_pre(&mid, eps)?;
                let mlp_out = self.mlp(l, &n)?;
                let next = (mid + &mlp_out)?;
                (sc, n, (next, mlp_out))
            };
            let (next, mlp_out) = next;
            resid = next;
            if hooks {
                layers.push(LayerHooks {
                    ln1_scale,
                    ln2_scale,
                    ln1_normalized,
                    ln2_normalized,
                    attn_out,
                    mlp_out,
                    pattern,
                });
            }
        }
        let (ce, logits) = if logits {
            let lg = self.unembed(&resid)?;
            (token_ce(&lg, &tokens)?, Some(lg))
        } else {
            (self.ce_from_resid(&resid, &tokens)?, None)
        };
        Ok(ForwardOutput { resid_pre0, layers, logits, ce })
    }
}

/// `-log softmax(logits[:, :-1])[tokens[:, 1:]]`, shape (batch, pos-1). Composed from
/// differentiable ops so training can backpropagate through it.
pub fn token_ce(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let pred = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let log_probs = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    let targets = tokens.narrow(1, 1, s - 1)?.to_dtype(DType::U32)?.reshape((b * (s - 1), 1))?;
    let picked = log_probs.gather(&targets.contiguous()?, 1)?;
    Ok(picked.neg()?.reshape((b, s - 1))?)
}

impl Weights {
    /// Move every tensor to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Weights> {
        let mv = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(super::weights::BlockWeights {
                    w_q: mv(&b.w_q)?,
                    b_q: mv(&b.b_q)?,
                    w_k: mv(&b.w_k)?,
                    b_k: mv(&b.b_k)?,
                    w_v: mv(&b.w_v)?,
                    b_v: mv(&b.b_v)?,
                    w_o: mv(&b.w_o)?,
                    b_o: mv(&b.b_o)?,
                    w_in: mv(&b.w_in)?,
                    b_in: mv(&b.b_in)?,
                    w_out: mv(&b.w_out)?,
                    b_out: mv(&b.b_out)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights {
            w_e: mv(&self.w_e)?,
            w_pos: self.w_pos.as_ref().map(mv).transpose()?,
            blocks,
            w_u: mv(&self.w_u)?,
            b_u: mv(&self.b_u)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorizable tanh against f64's: within 3e-7 relative over [−12, 12] (both branches
    /// and the switch between them), ±1 beyond, signed zeros, infinities and NaN through.
    #[test]
    fn tanh_f32_is_within_3e_7() {
        let mut worst = 0f64;
        for i in -120_000..=120_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (tanh_f32(x) as f64, (x as f64).tanh());
            if want != 0.0 {
                worst = worst.max((got - want).abs() / want.abs());
            }
        }
        for x in [0.624_999_9f32, 0.625, 0.625_000_06, 1e-30, 1e-8, 3e-4] {
            for x in [x, -x] {
                worst = worst.max((tanh_f32(x) as f64 - (x as f64).tanh()).abs() / (x as f64).tanh().abs());
            }
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(tanh_f32(0.0).to_bits(), 0f32.to_bits());
        assert_eq!(tanh_f32(-0.0).to_bits(), (-0f32).to_bits());
        assert_eq!((tanh_f32(50.0), tanh_f32(-50.0)), (1.0, -1.0));
        assert_eq!((tanh_f32(f32::INFINITY), tanh_f32(f32::NEG_INFINITY)), (1.0, -1.0));
        assert!(tanh_f32(f32::NAN).is_nan());
    }

    /// The host bias + activation pass gives candle's bits for ReLU and GELU's erf form, and for
    /// GELU's tanh form candle's values within 4e-7·|v| (its tanh in vector lanes), on values
    /// that reach the activations' tails (a strided input takes candle's path, its bits).
    #[test]
    fn host_bias_act_is_candles() {
        let dev = Device::Cpu;
        let (rows, n) = (130, 7);
        let pre: Vec<f32> = crate::util::rng::SplitMix::normals(rows * n, 4).iter().map(|z| 6.0 * z).collect();
        let pre = Tensor::from_vec(pre, (2, rows / 2, n), &dev).unwrap();
        let b = Tensor::from_vec(crate::util::rng::SplitMix::normals(n, 5), n, &dev).unwrap();
        for act in [Activation::Gelu, Activation::GeluNew, Activation::Relu] {
            let y = pre.broadcast_add(&b).unwrap();
            let want = match act {
                Activation::Gelu => y.gelu_erf(),
                Activation::GeluNew => y.gelu(),
                Activation::Relu => y.relu(),
            }
            .unwrap();
            let got = bias_act(&pre, &b, act).unwrap();
            assert_eq!(got.dims(), want.dims());
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
            };
            let strided = bias_act(&pre.transpose(0, 1).unwrap(), &b, act).unwrap();
            assert_eq!(bits(&strided.transpose(0, 1).unwrap()), bits(&want), "{act:?} strided");
            if act == Activation::GeluNew {
                // tanh in vector lanes: within 3e-7 of libm's, so gelu within 2e-7·|v| + its rounding
                let tv = |t: &Tensor| crate::util::to_vec(t).unwrap();
                let (g, w, v) = (tv(&got), tv(&want), tv(&y));
                let worst =
                    g.iter().zip(&w).zip(&v).map(|((g, w), v)| (g - w).abs() / (v.abs() + 1e-3)).fold(0f32, f32::max);
                assert!(worst < 4e-7, "gelu (tanh form) off by {worst}·|v|");
                assert!(bits(&got) != bits(&want), "the host path should be the vector one");
                continue;
            }
            assert_eq!(bits(&got), bits(&want), "{act:?}");
        }
    }
}
