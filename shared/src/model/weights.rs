//! Reading HF checkpoints and turning them into TransformerLens' processed weights.
//!
//! Reads `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with
//! `model.safetensors.index.json`, or `pytorch_model.bin` (also sharded), converts the HF
//! layout of each family to TL's (`W_Q [H,D,d_h]`, `W_O [H,d_h,D]`, ...) and applies
//! TL's default processing in TL's order (docs/MATH.md, "Model side"): fold LayerNorm, center writing weights,
//! center the unembedding, fold value biases. Everything is done in f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};

use super::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::util::with_host_f32;

/// One transformer block in TL layout after processing (LayerNorms are folded away).
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub w_q: Tensor,   // (n_heads, d_model, d_head)
    pub b_q: Tensor,   // (n_heads, d_head)
    pub w_k: Tensor,   // (n_heads, d_model, d_head)
    pub b_k: Tensor,   // (n_heads, d_head)
    pub w_v: Tensor,   // (n_heads, d_model, d_head)
    pub b_v: Tensor,   // (n_heads, d_head); zero after fold_value_biases
    pub w_o: Tensor,   // (n_heads, d_head, d_model)
    pub b_o: Tensor,   // (d_model)
    pub w_in: Tensor,  // (d_model, d_mlp)
    pub b_in: Tensor,  // (d_mlp)
    pub w_out: Tensor, // (d_mlp, d_model)
    pub b_out: Tensor, // (d_model)
}

/// All weights of a model, processed as TL's `from_pretrained` defaults do.
#[derive(Debug, Clone)]
pub struct Weights {
    pub w_e: Tensor,           // (d_vocab, d_model)
    pub w_pos: Option<Tensor>, // (n_ctx, d_model); None for rotary models
    pub blocks: Vec<BlockWeights>,
    pub w_u: Tensor, // (d_model, d_vocab)
    pub b_u: Tensor, // (d_vocab)
}

/// The LayerNorm parameters that processing folds into the next linear map.
struct LnParams {
    w: Tensor,
    b: Tensor,
}

/// HF tensors by name, with lookups that tolerate the optional `transformer.` prefix.
struct RawTensors {
    map: HashMap<String, Tensor>,
    source: PathBuf,
    /// The tensors the conversion read, by the name it asked for, as stored (for the model's
    /// fingerprint: what determines the model scae runs, whatever else the files hold).
    used: std::cell::RefCell<std::collections::BTreeMap<String, Tensor>>,
}

impl RawTensors {
    fn get(&self, name: &str) -> Result<Tensor> {
        let bare = name.strip_prefix("transformer.").unwrap_or(name);
        let found = self.map.get(name).or_else(|| self.map.get(bare)).or_else(|| {
            // GPT-2 checkpoints exist both with and without the `transformer.` prefix.
            self.map.get(&format!("transformer.{bare}"))
        });
        match found {
            Some(t) if !t.dtype().is_float() => Err(Error::input(
                &self.source,
                format!("tensor `{name}`: expected floating-point weights, found {:?}", t.dtype()),
            )),
            Some(t) => {
                self.used.borrow_mut().insert(name.to_string(), t.clone());
                Ok(t.to_dtype(DType::F32)?)
            }
            None => Err(Error::input(&self.source, format!("missing tensor `{name}`"))),
        }
    }

    fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dims() != shape {
            return Err(Error::input(
                &self.source,
                format!("tensor `{name}`: expected shape {shape:?}, found {:?}", t.dims()),
            ));
        }
        // A model holding NaN or infinities would write a cache every later stage refuses.
        if !crate::util::all_finite(&t)? {
            return Err(Error::input(
                &self.source,
                format!("tensor `{name}`: expected finite weights, found NaN or infinite ones"),
            ));
        }
        Ok(t)
    }
}

/// The weight files of a model folder, in the order they are read (and hashed).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for (single, index) in
        [("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")]
    {
        if dir.join(single).is_file() {
            return Ok(vec![dir.join(single)]);
        }
        let index_path = dir.join(index);
        if index_path.is_file() {
            return shards_from_index(&index_path);
        }
    }
    Err(Error::input(
        dir,
        "no weights found: expected model.safetensors, model.safetensors.index.json, \
         pytorch_model.bin or pytorch_model.bin.index.json",
    ))
}

fn shards_from_index(index_path: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string(index_path).map_err(|e| Error::input(index_path, format!("cannot read: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::input(index_path, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::input(index_path, "missing field `weight_map` (tensor name -> shard file)"))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::input(index_path, format!("lists shard {}, which does not exist", missing.display())));
    }
    Ok(paths)
}

fn read_tensor_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let is_st = path.extension().is_some_and(|e| e == "safetensors");
    let loaded = if is_st {
        // Mapped (one copy of the bytes, not two) and converted tensor by tensor on all threads.
        // SAFETY: the file is only read, and not expected to change while it is (as for the
        // model hash's mapping of it).
        unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.and_then(|st| {
            use rayon::prelude::*;
            let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
            names.into_par_iter().map(|n| st.load(&n, &Device::Cpu).map(|t| (n, t))).collect()
        })
    } else {
        candle_core::pickle::read_all(path)
    };
    loaded.map_err(|e| {
        let kind = if is_st { "safetensors" } else { "PyTorch checkpoint" };
        Error::input(path, format!("not a readable {kind} file: {e}"))
    })
}

/// A 2-D tensor transposed into a contiguous one: on the host (f32) by tiles on all threads,
/// where candle's strided copy runs on one (the unembedding's took ~0.25 s of every load).
trait Transposed {
    fn transposed(&self) -> Result<Tensor>;
}

impl Transposed for Tensor {
    fn transposed(&self) -> Result<Tensor> {
        let (r, c) = self.dims2()?;
        match with_host_f32(self, |v| crate::util::blas::transpose(v, r, c)) {
            Some(t) => Ok(Tensor::from_vec(t, (c, r), &Device::Cpu)?),
            None => Ok(self.t()?.contiguous()?),
        }
    }
}

/// `s − mean₀(s)` for `s = w · gain[:, None]`, `w (D, N)`, `gain (D)`: an LN gain folded into
/// the weight it feeds, then centred over its input axis — candle's
/// `broadcast_mul`, `mean_keepdim(0)`, `broadcast_sub` with their order of operations (column
/// sums in row order from 0, times `1/D` plus 0, as candle's mean), so the same bits, on all
/// threads where candle's reduction over the first axis runs on one.
fn scale_rows_center_columns(w: &Tensor, gain: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (d, n) = w.dims2()?;
    let scaled = with_host_f32(gain, |g| {
        with_host_f32(w, |w| {
            let mut s = vec![0f32; w.len()];
            s.par_chunks_mut(n.max(1)).zip(w.par_chunks(n.max(1))).zip(g).for_each(|((s, w), &g)| {
                s.iter_mut().zip(w).for_each(|(s, w)| *s = w * g);
            });
            s
        })
    });
    let Some(Some(mut s)) = scaled else {
        let scaled = w.broadcast_mul(&gain.unsqueeze(1)?)?;
        return Ok(scaled.broadcast_sub(&scaled.mean_keepdim(0)?)?);
    };
    if n == 0 {
        return Ok(w.clone());
    }
    const COLS: usize = 256;
    let (mul, add) = ((1f64 / d as f64) as f32, 0f32);
    let mean: Vec<f32> = (0..n)
        .into_par_iter()
        .step_by(COLS)
        .flat_map_iter(|c0| {
            let c1 = (c0 + COLS).min(n);
            let mut acc = vec![0f32; c1 - c0];
            for row in s.chunks_exact(n) {
                acc.iter_mut().zip(&row[c0..c1]).for_each(|(a, x)| *a += x);
            }
            acc.into_iter().map(move |a| a * mul + add)
        })
        .collect();
    s.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(&mean).for_each(|(x, m)| *x -= m));
    Ok(Tensor::from_vec(s, (d, n), &Device::Cpu)?)
}

impl Weights {
    /// Load the checkpoint in `dir` for `cfg` and apply TL's default processing. Also returns
    /// the model's fingerprint: `blake3:<hex>` over `cfg` (its canonical form) and every
    /// tensor the conversion read (name as asked for, dtype, shape and bytes as stored, in name
    /// order), so the same weights as `.bin` or `.safetensors`, whole or sharded, are the same
    /// model (docs/MATH.md, "Model side"; FORMATS.md, `model.hash`).
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<(Weights, String)> {
        let files = weight_files(dir)?;
        let mut map = HashMap::new();
        for f in &files {
            map.extend(read_tensor_file(f)?);
        }
        let raw = RawTensors { map, source: files[0].clone(), used: Default::default() };
        let (mut w, ln1, ln2, ln_f) = match cfg.arch {
            Arch::GptNeo => convert_gpt_neo(&raw, cfg)?,
            Arch::Gpt2 => convert_gpt2(&raw, cfg)?,
            Arch::GptNeoX => convert_gpt_neox(&raw, cfg)?,
        };
        w.fold_layer_norm(&ln1, &ln2, &ln_f)?;
        w.center_writing_weights()?;
        w.center_unembed()?;
        w.fold_value_biases()?;
        let mut h = crate::util::fingerprint::TensorHasher::new("scae-model-v2");
        h.add_str(&cfg.canonical());
        for (name, t) in raw.used.borrow().iter() {
            h.add_tensor(name, t)?;
        }
        Ok((w, h.finish()))
    }

    /// Step 2: fold each LN's bias into the next bias, its gain into the weight,
    /// then center the weight over its d_model (input) axis.
    fn fold_layer_norm(&mut self, ln1: &[LnParams], ln2: &[LnParams], ln_f: &LnParams) -> Result<()> {
        for (b, (l1, l2)) in self.blocks.iter_mut().zip(ln1.iter().zip(ln2)) {
            // W_X: (H, D, d_h); ln: (D)
            let gain = l1.w.reshape((1, (), 1))?;
            let bias = l1.b.reshape((1, (), 1))?;
            for (w, bx) in [(&mut b.w_q, &mut b.b_q), (&mut b.w_k, &mut b.b_k), (&mut b.w_v, &mut b.b_v)] {
                *bx = (&*bx + w.broadcast_mul(&bias)?.sum(1)?)?;
                let scaled = w.broadcast_mul(&gain)?;
                *w = scaled.broadcast_sub(&scaled.mean_keepdim(1)?)?;
            }
            // W_in: (D, d_mlp)
            b.b_in = (&b.b_in + l2.b.unsqueeze(0)?.matmul(&b.w_in)?.squeeze(0)?)?;
            b.w_in = scale_rows_center_columns(&b.w_in, &l2.w)?;
        }
        self.b_u = (&self.b_u + ln_f.b.unsqueeze(0)?.matmul(&self.w_u)?.squeeze(0)?)?;
        self.w_u = scale_rows_center_columns(&self.w_u, &ln_f.w)?;
        Ok(())
    }

    /// Step 3: every write into the residual stream gets zero mean over d_model.
    fn center_writing_weights(&mut self) -> Result<()> {
        let center_last = |t: &Tensor| -> Result<Tensor> { Ok(t.broadcast_sub(&t.mean_keepdim(D::Minus1)?)?) };
        self.w_e = center_last(&self.w_e)?;
        if let Some(p) = &self.w_pos {
            self.w_pos = Some(center_last(p)?);
        }
        for b in &mut self.blocks {
            b.w_o = center_last(&b.w_o)?;
            b.b_o = center_last(&b.b_o)?;
            b.w_out = center_last(&b.w_out)?;
            b.b_out = center_last(&b.b_out)?;
        }
        Ok(())
    }

    /// Step 4: logits are invariant to a constant shift, so remove the vocab mean.
    fn center_unembed(&mut self) -> Result<()> {
        self.w_u = self.w_u.broadcast_sub(&self.w_u.mean_keepdim(1)?)?;
        self.b_u = self.b_u.broadcast_sub(&self.b_u.mean_keepdim(0)?)?;
        Ok(())
    }

    /// Step 5: softmax rows sum to one, so `b_V` passes straight into `b_O`.
    fn fold_value_biases(&mut self) -> Result<()> {
        for b in &mut self.blocks {
            // Σ_h b_V[h] · W_O[h]: (H, 1, d_h) x (H, d_h, D) -> (H, 1, D) -> (D)
            let extra = b.b_v.unsqueeze(1)?.matmul(&b.w_o)?.sum(0)?.squeeze(0)?;
            b.b_o = (&b.b_o + extra)?;
            b.b_v = b.b_v.zeros_like()?;
        }
        Ok(())
    }
}

type Converted = (Weights, Vec<LnParams>, Vec<LnParams>, LnParams);

fn ln(raw: &RawTensors, prefix: &str, d: usize) -> Result<LnParams> {
    Ok(LnParams {
        w: raw.get_shaped(&format!("{prefix}.weight"), &[d])?,
        b: raw.get_shaped(&format!("{prefix}.bias"), &[d])?,
    })
}

/// `[H·d_h, D]` (nn.Linear `[out, in]`, rows = head-major) -> TL `[H, D, d_h]`.
fn heads_from_linear_rows(w: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
    Ok(w.reshape((cfg.n_heads, cfg.d_head, cfg.d_model))?.transpose(1, 2)?.contiguous()?)
}

/// `[D, H·d_h]` -> TL `W_O [H, d_h, D]` from an nn.Linear out-projection (`[out=D, in=H·d_h]`).
fn w_o_from_linear(w: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
    Ok(w.t()?.reshape((cfg.n_heads, cfg.d_head, cfg.d_model))?.contiguous()?)
}

fn unembed(raw: &RawTensors, cfg: &ModelConfig, lm_head: &str, w_e: &Tensor) -> Result<Tensor> {
    // HF ties the head to the embedding when the config says so, whatever the file holds
    // (safetensors checkpoints of tied models usually store only the embedding).
    let w = if cfg.tie_word_embeddings { w_e.clone() } else { raw.get_shaped(lm_head, &[cfg.d_vocab, cfg.d_model])? };
    w.transposed()
}

fn convert_gpt_neo(raw: &RawTensors, cfg: &ModelConfig) -> Result<Converted> {
    let (d, m) = (cfg.d_model, cfg.d_mlp);
    let w_e = raw.get_shaped("transformer.wte.weight", &[cfg.d_vocab, d])?;
    let w_pos = raw.get_shaped("transformer.wpe.weight", &[cfg.n_ctx, d])?;
    let zeros_heads = Tensor::zeros((cfg.n_heads, cfg.d_head), DType::F32, &Device::Cpu)?;
    let (mut blocks, mut ln1, mut ln2) = (vec![], vec![], vec![]);
    for l in 0..cfg.n_layers {
        let p = format!("transformer.h.{l}");
        let a = format!("{p}.attn.attention");
        let proj = |n: &str| -> Result<Tensor> {
            heads_from_linear_rows(&raw.get_shaped(&format!("{a}.{n}.weight"), &[d, d])?, cfg)
        };
        blocks.push(BlockWeights {
            w_q: proj("q_proj")?,
            b_q: zeros_heads.clone(),
            w_k: proj("k_proj")?,
            b_k: zeros_heads.clone(),
            w_v: proj("v_proj")?,
            b_v: zeros_heads.clone(),
            w_o: w_o_from_linear(&raw.get_shaped(&format!("{a}.out_proj.weight"), &[d, d])?, cfg)?,
            b_o: raw.get_shaped(&format!("{a}.out_proj.bias"), &[d])?,
            w_in: raw.get_shaped(&format!("{p}.mlp.c_fc.weight"), &[m, d])?.transposed()?,
            b_in: raw.get_shaped(&format!("{p}.mlp.c_fc.bias"), &[m])?,
            w_out: raw.get_shaped(&format!("{p}.mlp.c_proj.weight"), &[d, m])?.transposed()?,
            b_out: raw.get_shaped(&format!("{p}.mlp.c_proj.bias"), &[d])?,
        });
        ln1.push(ln(raw, &format!("{p}.ln_1"), d)?);
        ln2.push(ln(raw, &format!("{p}.ln_2"), d)?);
    }
    let ln_f = ln(raw, "transformer.ln_f", d)?;
    let w_u = unembed(raw, cfg, "lm_head.weight", &w_e)?;
    let b_u = Tensor::zeros(cfg.d_vocab, DType::F32, &Device::Cpu)?;
    Ok((Weights { w_e, w_pos: Some(w_pos), blocks, w_u, b_u }, ln1, ln2, ln_f))
}

fn convert_gpt2(raw: &RawTensors, cfg: &ModelConfig) -> Result<Converted> {
    let (d, m, h, dh) = (cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_head);
    let w_e = raw.get_shaped("transformer.wte.weight", &[cfg.d_vocab, d])?;
    let w_pos = raw.get_shaped("transformer.wpe.weight", &[cfg.n_ctx, d])?;
    let (mut blocks, mut ln1, mut ln2) = (vec![], vec![], vec![]);
    for l in 0..cfg.n_layers {
        let p = format!("transformer.h.{l}");
        // Conv1D stores [in, out]; c_attn's output axis is (qkv, head, d_head).
        let c_attn = raw.get_shaped(&format!("{p}.attn.c_attn.weight"), &[d, 3 * d])?;
        let c_attn_b = raw.get_shaped(&format!("{p}.attn.c_attn.bias"), &[3 * d])?;
        let qkv = c_attn.reshape((d, 3, h, dh))?.permute((1, 2, 0, 3))?; // (3, H, D, d_h)
        let qkv_b = c_attn_b.reshape((3, h, dh))?;
        let pick = |t: &Tensor, i: usize| -> Result<Tensor> { Ok(t.get(i)?.contiguous()?) };
        blocks.push(BlockWeights {
            w_q: pick(&qkv, 0)?,
            b_q: pick(&qkv_b, 0)?,
            w_k: pick(&qkv, 1)?,
            b_k: pick(&qkv_b, 1)?,
            w_v: pick(&qkv, 2)?,
            b_v: pick(&qkv_b, 2)?,
            w_o: raw.get_shaped(&format!("{p}.attn.c_proj.weight"), &[d, d])?.reshape((h, dh, d))?,
            b_o: raw.get_shaped(&format!("{p}.attn.c_proj.bias"), &[d])?,
            w_in: raw.get_shaped(&format!("{p}.mlp.c_fc.weight"), &[d, m])?,
            b_in: raw.get_shaped(&format!("{p}.mlp.c_fc.bias"), &[m])?,
            w_out: raw.get_shaped(&format!("{p}.mlp.c_proj.weight"), &[m, d])?,
            b_out: raw.get_shaped(&format!("{p}.mlp.c_proj.bias"), &[d])?,
        });
        ln1.push(ln(raw, &format!("{p}.ln_1"), d)?);
        ln2.push(ln(raw, &format!("{p}.ln_2"), d)?);
    }
    let ln_f = ln(raw, "transformer.ln_f", d)?;
    let w_u = unembed(raw, cfg, "lm_head.weight", &w_e)?;
    let b_u = Tensor::zeros(cfg.d_vocab, DType::F32, &Device::Cpu)?;
    Ok((Weights { w_e, w_pos: Some(w_pos), blocks, w_u, b_u }, ln1, ln2, ln_f))
}

fn convert_gpt_neox(raw: &RawTensors, cfg: &ModelConfig) -> Result<Converted> {
    let (d, m, h, dh) = (cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_head);
    let w_e = raw.get_shaped("gpt_neox.embed_in.weight", &[cfg.d_vocab, d])?;
    let (mut blocks, mut ln1, mut ln2) = (vec![], vec![], vec![]);
    for l in 0..cfg.n_layers {
        let p = format!("gpt_neox.layers.{l}");
        // Rows are laid out (head, qkv, d_head).
        let qkv_w = raw.get_shaped(&format!("{p}.attention.query_key_value.weight"), &[3 * d, d])?;
        let qkv_b = raw.get_shaped(&format!("{p}.attention.query_key_value.bias"), &[3 * d])?;
        let qkv = qkv_w.reshape((h, 3, dh, d))?.permute((1, 0, 3, 2))?; // (3, H, D, d_h)
        let qkv_b = qkv_b.reshape((h, 3, dh))?.transpose(0, 1)?; // (3, H, d_h)
        let pick = |t: &Tensor, i: usize| -> Result<Tensor> { Ok(t.get(i)?.contiguous()?) };
        blocks.push(BlockWeights {
            w_q: pick(&qkv, 0)?,
            b_q: pick(&qkv_b, 0)?,
            w_k: pick(&qkv, 1)?,
            b_k: pick(&qkv_b, 1)?,
            w_v: pick(&qkv, 2)?,
            b_v: pick(&qkv_b, 2)?,
            w_o: w_o_from_linear(&raw.get_shaped(&format!("{p}.attention.dense.weight"), &[d, d])?, cfg)?,
            b_o: raw.get_shaped(&format!("{p}.attention.dense.bias"), &[d])?,
            w_in: raw.get_shaped(&format!("{p}.mlp.dense_h_to_4h.weight"), &[m, d])?.transposed()?,
            b_in: raw.get_shaped(&format!("{p}.mlp.dense_h_to_4h.bias"), &[m])?,
            w_out: raw.get_shaped(&format!("{p}.mlp.dense_4h_to_h.weight"), &[d, m])?.transposed()?,
            b_out: raw.get_shaped(&format!("{p}.mlp.dense_4h_to_h.bias"), &[d])?,
        });
        ln1.push(ln(raw, &format!("{p}.input_layernorm"), d)?);
        ln2.push(ln(raw, &format!("{p}.post_attention_layernorm"), d)?);
    }
    let ln_f = ln(raw, "gpt_neox.final_layer_norm", d)?;
    let w_u = unembed(raw, cfg, "embed_out.weight", &w_e)?;
    let b_u = Tensor::zeros(cfg.d_vocab, DType::F32, &Device::Cpu)?;
    Ok((Weights { w_e, w_pos: None, blocks, w_u, b_u }, ln1, ln2, ln_f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host fold and transpose give candle's bits (uneven column blocks, a strided input
    /// through candle's path).
    #[test]
    fn host_fold_and_transpose_are_candles() {
        let (d, n) = (37, 600);
        let w = Tensor::from_vec(crate::util::rng::SplitMix::normals(d * n, 7), (d, n), &Device::Cpu).unwrap();
        let g = Tensor::from_vec(crate::util::rng::SplitMix::normals(d, 8), d, &Device::Cpu).unwrap();
        let scaled = w.broadcast_mul(&g.unsqueeze(1).unwrap()).unwrap();
        let want = scaled.broadcast_sub(&scaled.mean_keepdim(0).unwrap()).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        assert_eq!(bits(&scale_rows_center_columns(&w, &g).unwrap()), bits(&want));
        let wt = w.t().unwrap();
        assert_eq!(bits(&w.transposed().unwrap()), bits(&wt.contiguous().unwrap()));
        assert_eq!(w.transposed().unwrap().dims(), &[n, d]);
        // a strided (non-contiguous) input takes candle's path
        assert_eq!(bits(&wt.transposed().unwrap()), bits(&w));
    }
}
