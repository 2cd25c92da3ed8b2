//! One batch of cached clean-run tensors: [`Batch`] (candle tensors on the compute device, from
//! a cache shard or a live forward pass) and [`FlatBatch`] (the same as flat host buffers, for
//! the CPU engine).
//!
//! Dimensions: B sequences of S positions, N = B·S tokens, D = d_model, H heads.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{Kind, Module};
use crate::util::to_vec;

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
    /// The clean model's CE and the zero-ablation CE per position `(batch, pos − 1)` f32, when
    /// the cache stores them (collect-acts since December 2026).
    pub clean_ce: Option<Tensor>,
    pub zero_ce: Option<Tensor>,
}

/// Optional cache shard tensors `(n, ctx − 1)` f32 (written since collect-acts of December
/// 2026; caches without them are read as before): the clean model's next-token CE per position,
/// and the zero-ablation CE (layer 0's input alone through the final LN and unembedding).
pub const CLEAN_CE: &str = "clean_ce";
pub const ZERO_CE: &str = "zero_ce";

/// The parts' optional tensors concatenated, when every part has one.
fn cat_optional(parts: &[Batch], f: impl Fn(&Batch) -> Option<&Tensor>) -> Result<Option<Tensor>> {
    let all: Option<Vec<&Tensor>> = parts.iter().map(f).collect();
    all.map(|v| Ok(Tensor::cat(&v, 0)?)).transpose()
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
        let optional = |k: &str| map.contains_key(k).then(|| get(k)).transpose();
        Ok(Batch {
            tokens: get("tokens")?.to_dtype(DType::U32)?,
            resid_pre0: get("blocks.0.hook_resid_pre")?,
            ln1_scale: per_layer("ln1.hook_scale")?,
            ln2_scale: per_layer("ln2.hook_scale")?,
            ln2_normalized: per_layer("ln2.hook_normalized")?,
            pattern: per_layer("attn.hook_pattern")?,
            attn_out: per_layer("hook_attn_out")?,
            mlp_out: per_layer("hook_mlp_out")?,
            clean_ce: optional(CLEAN_CE)?,
            zero_ce: optional(ZERO_CE)?,
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
            clean_ce: cat_optional(parts, |b| b.clean_ce.as_ref())?,
            zero_ce: cat_optional(parts, |b| b.zero_ce.as_ref())?,
        })
    }

    /// Build from a clean forward pass run with hooks (its per-token CE is the clean CE, so a
    /// streamed batch carries it as a cached one does).
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
            clean_ce: Some(out.ce.to_dtype(DType::F32)?),
            zero_ce: None,
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
            clean_ce: self.clean_ce.as_ref().map(cut).transpose()?,
            zero_ce: self.zero_ce.as_ref().map(cut).transpose()?,
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

/// Cached clean-run tensors of a batch as flat buffers.
pub struct FlatBatch {
    pub b: usize,
    pub s: usize,
    pub r0: Vec<f32>,           // (N, D)
    pub s1: Vec<Vec<f32>>,      // per layer (N)
    pub s2: Vec<Vec<f32>>,      // per layer (N)
    pub pattern: Vec<Vec<f32>>, // per layer (B, H, S, S)
    pub targets: Vec<Vec<f32>>, // per module (N, D)
    pub tokens: Vec<u32>,       // (N)
}

impl FlatBatch {
    /// Flatten the pass inputs of a [`Batch`] only (no targets: enough for the CPU engine's
    /// forward, not for the losses).
    pub fn inputs(batch: &Batch) -> Result<FlatBatch> {
        let (b, s, _) = batch.resid_pre0.dims3()?;
        Ok(FlatBatch {
            b,
            s,
            r0: to_vec(&batch.resid_pre0)?,
            s1: batch.ln1_scale.iter().map(to_vec).collect::<Result<_>>()?,
            s2: batch.ln2_scale.iter().map(to_vec).collect::<Result<_>>()?,
            pattern: batch.pattern.iter().map(to_vec).collect::<Result<_>>()?,
            targets: Vec::new(),
            tokens: batch.tokens.to_device(&Device::Cpu)?.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?,
        })
    }

    /// Flatten a [`Batch`] for `suite`'s modules.
    pub fn new(batch: &Batch, modules: &[Module]) -> Result<FlatBatch> {
        Ok(FlatBatch {
            targets: modules.iter().map(|m| to_vec(batch.target(m))).collect::<Result<_>>()?,
            ..FlatBatch::inputs(batch)?
        })
    }
}
