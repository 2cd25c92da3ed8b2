//! The pruned forward pass of a suite (SPEC §4), its losses (SPEC §6) and a dense-masked
//! oracle for tests.
//!
//! Each downstream module's pre-activation is built from cached clean-run quantities (layer-0
//! residual, LN scales, attention patterns) plus the contributions of its connected upstream
//! features, then ReLU + top-k. With all connections ([`Wiring::All`]) the upstream sum is just
//! the upstream reconstructions pushed through the encoder (dense d_model-space products); with
//! a connection set ([`Wiring::Sparse`]) the per-edge virtual weights `w[i,c] = E[i]·W_dec[:,j]`
//! (attention: `Σ` over a d_head factorisation of `W_OV`) are formed only for the F·C edges and
//! applied through [`crate::sparse_ops::EdgeMatmul`] — no `F×F` or `heads×F×F` matrix exists.
//! Gradients flow to every suite parameter through candle autograd.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::connections::Connections;
use crate::error::{Error, Result};
use crate::model::Runtime;
use crate::sparse_ops::{topk_indices, EdgeIndex, EdgeMatmul, SparseDecode};
use crate::suite::{Kind, Module, Suite};

/// One batch of cached clean-run tensors (all f32, on the compute device).
#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Tensor,              // (batch, pos) u32
    pub resid_pre0: Tensor,          // (batch, pos, d_model)
    pub ln1_scale: Vec<Tensor>,      // per layer (batch, pos, 1)
    pub ln2_scale: Vec<Tensor>,      // per layer (batch, pos, 1)
    pub ln2_normalized: Vec<Tensor>, // per layer (batch, pos, d_model): transcoder inputs
    pub pattern: Vec<Tensor>,        // per layer (batch, head, q, k)
    pub attn_out: Vec<Tensor>,       // per layer (batch, pos, d_model)
    pub mlp_out: Vec<Tensor>,        // per layer (batch, pos, d_model)
}

impl Batch {
    /// Take a batch out of a cache shard map (`Cache::load_shard`), sequences `start..start+n`.
    pub fn from_shard(
        map: &std::collections::HashMap<String, Tensor>,
        n_layers: usize,
        start: usize,
        n: usize,
        device: &Device,
    ) -> Result<Batch> {
        let get = |k: &str| -> Result<Tensor> {
            let t = map.get(k).ok_or_else(|| Error::Usage(format!("cache shard lacks `{k}`")))?;
            Ok(t.narrow(0, start, n)?.to_device(device)?.contiguous()?)
        };
        let per_layer = |suffix: &str| -> Result<Vec<Tensor>> {
            (0..n_layers).map(|l| get(&format!("blocks.{l}.{suffix}"))).collect()
        };
        Ok(Batch {
            tokens: get("tokens")?.to_dtype(DType::U32)?,
            resid_pre0: get("blocks.0.hook_resid_pre")?,
            ln1_scale: per_layer("ln1.hook_scale")?,
            ln2_scale: per_layer("ln2.hook_scale")?,
            ln2_normalized: per_layer("ln2.hook_normalized")?,
            pattern: per_layer("attn.hook_pattern")?,
            attn_out: per_layer("hook_attn_out")?,
            mlp_out: per_layer("hook_mlp_out")?,
        })
    }

    /// Concatenate batches along the sequence axis.
    pub fn concat(parts: &[Batch]) -> Result<Batch> {
        if parts.len() == 1 {
            return Ok(parts[0].clone());
        }
        let cat = |f: &dyn Fn(&Batch) -> &Tensor| -> Result<Tensor> {
            Ok(Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)?)
        };
        let n_layers = parts[0].ln1_scale.len();
        let per_layer = |f: &dyn Fn(&Batch, usize) -> &Tensor| -> Result<Vec<Tensor>> {
            (0..n_layers).map(|l| Ok(Tensor::cat(&parts.iter().map(|p| f(p, l)).collect::<Vec<_>>(), 0)?)).collect()
        };
        Ok(Batch {
            tokens: cat(&|b| &b.tokens)?,
            resid_pre0: cat(&|b| &b.resid_pre0)?,
            ln1_scale: per_layer(&|b, l| &b.ln1_scale[l])?,
            ln2_scale: per_layer(&|b, l| &b.ln2_scale[l])?,
            ln2_normalized: per_layer(&|b, l| &b.ln2_normalized[l])?,
            pattern: per_layer(&|b, l| &b.pattern[l])?,
            attn_out: per_layer(&|b, l| &b.attn_out[l])?,
            mlp_out: per_layer(&|b, l| &b.mlp_out[l])?,
        })
    }

    /// Build from a clean forward pass run with hooks.
    pub fn from_forward(tokens: &Tensor, out: &crate::model::ForwardOutput) -> Result<Batch> {
        Ok(Batch {
            tokens: tokens.to_dtype(DType::U32)?,
            resid_pre0: out.resid_pre0.clone(),
            ln1_scale: out.layers.iter().map(|l| l.ln1_scale.clone()).collect(),
            ln2_scale: out.layers.iter().map(|l| l.ln2_scale.clone()).collect(),
            ln2_normalized: out.layers.iter().map(|l| l.ln2_normalized.clone()).collect(),
            pattern: out.layers.iter().map(|l| l.pattern.clone()).collect(),
            attn_out: out.layers.iter().map(|l| l.attn_out.clone()).collect(),
            mlp_out: out.layers.iter().map(|l| l.mlp_out.clone()).collect(),
        })
    }

    /// Sequences `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Batch> {
        let cut = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, start, len)?) };
        let cut_all = |v: &[Tensor]| -> Result<Vec<Tensor>> { v.iter().map(cut).collect() };
        Ok(Batch {
            tokens: cut(&self.tokens)?,
            resid_pre0: cut(&self.resid_pre0)?,
            ln1_scale: cut_all(&self.ln1_scale)?,
            ln2_scale: cut_all(&self.ln2_scale)?,
            ln2_normalized: cut_all(&self.ln2_normalized)?,
            pattern: cut_all(&self.pattern)?,
            attn_out: cut_all(&self.attn_out)?,
            mlp_out: cut_all(&self.mlp_out)?,
        })
    }

    /// The pass inputs (LN scales, patterns) in `dtype`: [`forward`] computes in the dtype of
    /// the LN scales ([`Batch::pass_dtype`]). The layer-0 residual stays as it is (the pass casts
    /// its own copy; the spliced residual of the CE keeps full precision), as do tokens,
    /// transcoder inputs and targets.
    pub fn with_pass_dtype(&self, dtype: DType) -> Result<Batch> {
        let cast = |v: &[Tensor]| -> Result<Vec<Tensor>> { v.iter().map(|t| Ok(t.to_dtype(dtype)?)).collect() };
        Ok(Batch {
            ln1_scale: cast(&self.ln1_scale)?,
            ln2_scale: cast(&self.ln2_scale)?,
            pattern: cast(&self.pattern)?,
            ..self.clone()
        })
    }

    /// The dtype the pruned pass computes in: that of the LN scales.
    pub fn pass_dtype(&self) -> DType {
        self.ln1_scale.first().map_or(DType::F32, Tensor::dtype)
    }

    /// The hook a module reconstructs.
    pub fn target(&self, m: &Module) -> &Tensor {
        match m.kind {
            Kind::Attn => &self.attn_out[m.layer],
            Kind::Mlp => &self.mlp_out[m.layer],
        }
    }
}

/// Which upstream features feed each downstream feature.
#[derive(Debug, Clone, Copy)]
pub enum Wiring<'a> {
    /// Every preceding module's every feature (the reference's `connections=None`).
    All,
    /// Only the listed edges.
    Sparse(&'a Connections),
}

/// Options of the pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassOptions {
    /// Use the consistent attention b_dec term (mixed by the pattern with key-position
    /// scales) instead of the reference's query-position form (SPEC B3).
    pub consistent_attn_bias: bool,
}

/// Per-downstream-module wiring, built once per connection set.
#[derive(Debug, Clone)]
pub struct DownPlan {
    /// Preceding modules (suite indices) in suite order.
    pub ups: Vec<usize>,
    /// Edge index over the concatenation of `ups`' features (Sparse wiring only).
    pub index: Option<Arc<EdgeIndex>>,
    /// `index.gather_cols()` as a tensor (F·C) u32.
    cols: Option<Tensor>,
    /// 1 for used slots, 0 for empty ones, `(F, C, 1)` (composed path).
    slot_mask: Option<Tensor>,
}

/// A suite wired for a model: the plan of every module.
#[derive(Debug, Clone)]
pub struct Plan {
    downs: Vec<DownPlan>,
    /// Whether a connection set restricts the edges (else all connections).
    pub sparse: bool,
    /// Use composed candle ops instead of the CPU custom ops (any device; the default off the
    /// CPU).
    pub composed: bool,
}

impl Plan {
    /// Use the composed ops (the GPU path) on any device, e.g. to test them on the CPU.
    pub fn force_composed(&mut self, composed: bool) {
        self.composed = composed;
    }

    /// The wiring of module `d`.
    pub fn down(&self, d: usize) -> &DownPlan {
        &self.downs[d]
    }

    /// Wire `suite` for a model with (`parallel`) or without parallel blocks.
    pub fn new(suite: &Suite, wiring: Wiring, parallel: bool, device: &Device) -> Result<Plan> {
        let f = suite.n_features;
        check_topk_size(device, f)?;
        let mut downs = Vec::new();
        for (d, dm) in suite.modules.iter().enumerate() {
            let ups: Vec<usize> =
                (0..suite.modules.len()).filter(|&u| suite.modules[u].precedes(dm, parallel)).collect();
            let index = match wiring {
                Wiring::All => (None, None, None),
                Wiring::Sparse(conns) => {
                    let pos = |u: usize| ups.iter().position(|&x| x == u);
                    let mut lists = Vec::with_capacity(f);
                    for edges in &conns.edges[d] {
                        let mut l = Vec::with_capacity(edges.len());
                        for e in edges {
                            let p = pos(e.up).ok_or_else(|| {
                                Error::Usage(format!(
                                    "edge {}:{} -> {dm} from a module that does not precede it",
                                    suite.modules[e.up], e.feature
                                ))
                            })?;
                            l.push((p * f) as u32 + e.feature);
                        }
                        lists.push(l);
                    }
                    let width = lists.iter().map(Vec::len).max().unwrap_or(0).max(1);
                    let ix = EdgeIndex::new(&lists, width, ups.len() * f);
                    let cols = Tensor::from_vec(ix.gather_cols(), ix.slot_col.len(), device)?;
                    let mask: Vec<f32> =
                        ix.slot_col.iter().map(|&c| if c == crate::sparse_ops::EMPTY { 0.0 } else { 1.0 }).collect();
                    let mask = Tensor::from_vec(mask, (f, width, 1), device)?;
                    (Some(Arc::new(ix)), Some(cols), Some(mask))
                }
            };
            let (index, cols, slot_mask) = index;
            downs.push(DownPlan { ups, index, cols, slot_mask });
        }
        let sparse = matches!(wiring, Wiring::Sparse(_));
        Ok(Plan { downs, sparse, composed: !device.is_cpu() })
    }
}

/// Features and reconstructions of every module.
#[derive(Debug, Clone)]
pub struct PassOutput {
    /// `(batch·pos, n_features)`: ReLU'd top-k values scattered into zeros.
    pub feats: Vec<Tensor>,
    /// `(batch, pos, d_model)`: `f W_decᵀ + b_dec`.
    pub recon: Vec<Tensor>,
    /// `(batch·pos, n_features)`: the pre-activations before ReLU and top-k (for AuxK).
    pub pre: Vec<Tensor>,
}

/// The tensors the pass reads, in its compute dtype: per module `[w_enc, b_enc, w_dec, b_dec]`
/// (casts of the suite's variables, so gradients reach them) and per layer the attention's
/// `(W_V, W_O, Σ_h W_OV[h], b_O)`.
struct Weights {
    aes: Vec<[Tensor; 4]>,
    attn: Vec<[Tensor; 4]>,
}

impl Weights {
    fn new(suite: &Suite, rt: &Runtime, dtype: DType) -> Result<Weights> {
        let cast =
            |t: &Tensor| -> Result<Tensor> { Ok(if t.dtype() == dtype { t.clone() } else { t.to_dtype(dtype)? }) };
        let aes = suite
            .aes
            .iter()
            .map(|ae| {
                Ok([
                    cast(ae.w_enc.as_tensor())?,
                    cast(ae.b_enc.as_tensor())?,
                    cast(ae.w_dec.as_tensor())?,
                    cast(ae.b_dec.as_tensor())?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let attn = (0..rt.cfg.n_layers)
            .map(|l| {
                let (w_v, w_o) = rt.flat_vo(l);
                Ok([cast(w_v)?, cast(w_o)?, cast(rt.w_ov_sum(l))?, cast(&rt.weights.blocks[l].b_o)?])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights { aes, attn })
    }
}

/// Σ_h P_h (x W_V[h]) W_O[h] for `x (B, S, D)`: attention mixing with the cached pattern.
fn attn_mix(rt: &Runtime, attn: &[Tensor; 4], x: &Tensor, pattern: &Tensor) -> Result<Tensor> {
    let (b, s, d) = x.dims3()?;
    let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
    let [w_v, w_o, _, _] = attn;
    let v = x.reshape((b * s, d))?.matmul(w_v)?.reshape((b, s, h, dh))?.transpose(1, 2)?.contiguous()?;
    let z = pattern.matmul(&v)?.transpose(1, 2)?.reshape((b * s, h * dh))?;
    Ok(z.matmul(w_o)?.reshape((b, s, d))?)
}

/// Run the pruned pass of `suite` on `batch`, in [`Batch::pass_dtype`] (f32, or bf16/f16
/// through the composed ops with the suite's f32 variables cast on the way in — see
/// [`Batch::with_pass_dtype`]).
pub fn forward(suite: &Suite, rt: &Runtime, plan: &Plan, batch: &Batch, opts: PassOptions) -> Result<PassOutput> {
    let (b, s, dm) = batch.resid_pre0.dims3()?;
    let (n, f, k) = (b * s, suite.n_features, suite.k);
    let dtype = batch.pass_dtype();
    let r0 = &batch.resid_pre0.to_dtype(dtype)?;
    // The CPU custom ops are f32 only.
    let composed = plan.composed || dtype != DType::F32;
    let w = Weights::new(suite, rt, dtype)?;
    let mut feats: Vec<Tensor> = Vec::with_capacity(suite.modules.len());
    let mut recon: Vec<Tensor> = Vec::with_capacity(suite.modules.len());
    let mut recon_nobias: Vec<Tensor> = Vec::with_capacity(suite.modules.len());
    let mut pres = Vec::with_capacity(suite.modules.len());
    for (d, module) in suite.modules.iter().enumerate() {
        let [enc, b_enc, w_dec, b_dec] = &w.aes[d];
        let enc_t = enc.t()?;
        let plan_d = &plan.downs[d];
        let ups = &plan_d.ups;
        let mut ub = Tensor::zeros(dm, dtype, r0.device())?;
        for &u in ups {
            ub = (ub + &w.aes[u][3])?;
        }
        let l = module.layer;
        let mut pre = match module.kind {
            Kind::Mlp => {
                let scale = &batch.ln2_scale[l];
                let mut x = r0.clone();
                if plan.sparse {
                    x = x.broadcast_add(&ub)?;
                } else {
                    for &u in ups {
                        x = (x + &recon[u])?;
                    }
                }
                let x = x.broadcast_div(scale)?;
                let mut a = x.reshape((n, dm))?.matmul(&enc_t)?;
                if plan.sparse && !ups.is_empty() {
                    let y = edge_contrib(suite, rt, &w, plan_d, composed, &feats, d, None, s)?; // (B, 1, S, F)
                    a = (a + y.reshape((n, f))?.broadcast_div(&scale.reshape((n, 1))?)?)?;
                }
                a
            }
            Kind::Attn => {
                let scale = &batch.ln1_scale[l];
                let pattern = &batch.pattern[l];
                let mut x = r0.clone();
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
                if plan.sparse && !ups.is_empty() {
                    let y = edge_contrib(suite, rt, &w, plan_d, composed, &feats, d, Some(l), s)?; // (B, H, S, F)
                    let y = y.broadcast_div(&scale.reshape((b, 1, s, 1))?)?;
                    let mixed = pattern.matmul(&y)?.sum(1)?; // (B, S, F)
                    a = (a + mixed.reshape((n, f))?)?;
                }
                let b_o = &w.attn[l][3];
                a = a.broadcast_add(&b_o.unsqueeze(0)?.matmul(&enc_t)?.squeeze(0)?)?;
                if !opts.consistent_attn_bias && !ups.is_empty() {
                    // Reference form (B3): (ub / s1[q]) (Σ_h W_OV[h]) Eᵀ.
                    let projected = ub.unsqueeze(0)?.matmul(&w.attn[l][2])?; // (1, D)
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

/// `f = scatter(topk_idx(a), ReLU(gather(a, idx)))`: gradients reach the selected positive
/// values only. Returns the features `(N, F)`.
pub fn topk_relu(pre: &Tensor, k: usize) -> Result<Tensor> {
    let (n, f) = pre.dims2()?;
    let values = pre.detach().to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let idx = topk_indices(&values, f, k);
    let idx_t = Tensor::from_vec(idx, (n, k), pre.device())?;
    let vals = pre.gather(&idx_t, D::Minus1)?.relu()?;
    Ok(pre.zeros_like()?.scatter(&idx_t, &vals, D::Minus1)?)
}

/// Refuse, before any compute, a feature count the device's top-k cannot sort: candle's CUDA
/// sort keeps a whole row in shared memory, at most 8192 features.
pub fn check_topk_size(device: &Device, n_features: usize) -> Result<()> {
    if device.is_cuda() && n_features > 8192 {
        return Err(Error::Usage(format!(
            "{n_features} features per module: top-k on the GPU sorts rows of at most 8192 features (candle's sort kernel keeps a row in shared memory); hint: a smaller --expansion, or the CPU"
        )));
    }
    Ok(())
}

/// [`topk_relu`] without leaving the device: indices from a descending arg-sort (candle's
/// CUDA sort handles rows up to 8192 features; ties are not guaranteed toward the lower
/// index there).
pub fn topk_relu_device(pre: &Tensor, k: usize) -> Result<Tensor> {
    check_topk_size(pre.device(), pre.dim(D::Minus1)?)?;
    let idx_t = pre.detach().arg_sort_last_dim(false)?.narrow(D::Minus1, 0, k)?.contiguous()?;
    let vals = pre.gather(&idx_t, D::Minus1)?.relu()?;
    Ok(pre.zeros_like()?.scatter(&idx_t, &vals, D::Minus1)?)
}

/// The sparse upstream contribution `(B, H, S, F)` (H = 1 for mlp targets).
#[allow(clippy::too_many_arguments)]
fn edge_contrib(
    suite: &Suite,
    rt: &Runtime,
    wt: &Weights,
    plan_d: &DownPlan,
    composed: bool,
    feats: &[Tensor],
    d: usize,
    attn_layer: Option<usize>,
    seq_len: usize,
) -> Result<Tensor> {
    let index = plan_d.index.as_ref().expect("sparse plan");
    let cols = plan_d.cols.as_ref().expect("sparse plan");
    let f = suite.n_features;
    let enc = &wt.aes[d][0];
    let x = Tensor::cat(&plan_d.ups.iter().map(|&u| &feats[u]).collect::<Vec<_>>(), 1)?;
    let dec_t =
        Tensor::cat(&plan_d.ups.iter().map(|&u| wt.aes[u][2].t()).collect::<candle_core::Result<Vec<_>>>()?, 0)?
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
            let [w_v, w_o, _, _] = &wt.attn[l];
            let ev = enc.matmul(&w_o.t()?)?.reshape((f, 1, h, dh))?;
            let dv = dec_t.matmul(w_v)?.index_select(cols, 0)?.reshape((f, width, h, dh))?;
            (dv.broadcast_mul(&ev)?.sum(3)?, h)
        }
    };
    if composed {
        // Composed (any device): gather each slot's upstream feature row (tokens along the
        // row), then one small batched product per downstream feature:
        // y[f] (H, N) = w[f]ᵀ (H, C) · x_g[f] (C, N). Memory F·C·N, no F·C·N·H intermediate.
        let n = x.dim(0)?;
        let mask = plan_d.slot_mask.as_ref().expect("sparse plan").to_dtype(w.dtype())?;
        let w = w.broadcast_mul(&mask)?; // (F, C, H); empty slots contribute nothing
        let g = x.t()?.contiguous()?.index_select(cols, 0)?.reshape((f, width, n))?; // (F, C, N)
        let y = w.transpose(1, 2)?.contiguous()?.matmul(&g)?; // (F, H, N)
        let b = n / seq_len;
        return Ok(y.reshape((f, heads, b, seq_len))?.permute((2, 1, 3, 0))?.contiguous()?);
    }
    let op = EdgeMatmul { index: index.clone(), heads, seq_len };
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

/// The reference's FVU: `Σ var_b(T−R) / Σ var_b(T)` with the unbiased variance over the batch
/// axis only, per (position, dim) (SPEC §6, B12).
pub fn fvu_ref(target: &Tensor, recon: &Tensor) -> Result<Tensor> {
    let (target, recon) = (&target.to_dtype(DType::F32)?, &recon.to_dtype(DType::F32)?);
    let var_b = |x: &Tensor| -> Result<Tensor> {
        let nb = x.dim(0)?;
        let c = x.broadcast_sub(&x.mean_keepdim(0)?)?;
        Ok((c.sqr()?.sum_all()? / (nb as f64 - 1.0).max(1.0))?)
    };
    Ok((var_b(&(target - recon)?)? / var_b(target)?)?)
}

/// FVU with the variance over all tokens: `Σ_{t,d} (T−R − mean)² / Σ_{t,d} (T − mean)²`.
pub fn fvu_all(target: &Tensor, recon: &Tensor) -> Result<Tensor> {
    let (target, recon) = (&target.to_dtype(DType::F32)?, &recon.to_dtype(DType::F32)?);
    let d = target.dim(D::Minus1)?;
    let flat = |x: &Tensor| -> Result<Tensor> {
        let x = x.reshape(((), d))?;
        Ok(x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.sum_all()?)
    };
    Ok((flat(&(target - recon)?)? / flat(target)?)?)
}

/// `Σ_m FVU_m` (reference definition), the MSE-mode training loss.
pub fn mse_loss(suite: &Suite, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (m, r) in suite.modules.iter().zip(&out.recon) {
        let v = fvu_ref(batch.target(m), r)?;
        total = Some(match total {
            Some(t) => (t + v)?,
            None => v,
        });
    }
    total.ok_or_else(|| Error::Usage("empty suite".into()))
}

/// The residual stream the suite implies: `Σ_m R_m + hook_resid_pre[0]`.
pub fn spliced_resid(batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let mut resid = f32(&out.recon[0])?;
    for r in &out.recon[1..] {
        resid = (resid + f32(r)?)?;
    }
    Ok((resid + f32(&batch.resid_pre0)?)?)
}

/// CE with the suite spliced in (per token, `(batch, pos-1)`): final LN and unembed of
/// [`spliced_resid`], next-token targets.
pub fn ce_per_token(rt: &Runtime, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    rt.ce_from_resid(&spliced_resid(batch, out)?, &batch.tokens)
}

/// The reference's CE loss: mean over batch·(pos−1).
pub fn ce_loss(rt: &Runtime, batch: &Batch, out: &PassOutput) -> Result<Tensor> {
    Ok(ce_per_token(rt, batch, out)?.mean_all()?)
}
