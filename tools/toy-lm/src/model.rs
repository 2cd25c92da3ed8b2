//! The toy GPT-Neo: parameters under HF GPT-Neo names, its forward pass and loss for training,
//! and saving it as an HF model folder that scae loads like any other.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor, Var, D};
use scae::util::rng::SplitMix;

/// The trainable model, with HF GPT-Neo parameter names.
pub struct Model {
    pub vars: BTreeMap<String, Var>,
    n_layers: usize,
    n_heads: usize,
    d: usize,
}

fn randn(rng: &mut SplitMix, shape: &[usize], std: f64) -> Result<Var> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)?)
}

fn filled(shape: &[usize], value: f32) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::full(value, shape, &Device::Cpu)?)?)
}

impl Model {
    pub fn new(
        vocab: usize,
        n_ctx: usize,
        d: usize,
        n_layers: usize,
        n_heads: usize,
        rng: &mut SplitMix,
    ) -> Result<Model> {
        let mut v = BTreeMap::new();
        v.insert("transformer.wte.weight".into(), randn(rng, &[vocab, d], 0.02)?);
        v.insert("transformer.wpe.weight".into(), randn(rng, &[n_ctx, d], 0.02)?);
        for l in 0..n_layers {
            let p = format!("transformer.h.{l}");
            for ln in ["ln_1", "ln_2"] {
                v.insert(format!("{p}.{ln}.weight"), filled(&[d], 1.0)?);
                v.insert(format!("{p}.{ln}.bias"), filled(&[d], 0.0)?);
            }
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                v.insert(format!("{p}.attn.attention.{proj}.weight"), randn(rng, &[d, d], 0.02)?);
            }
            v.insert(format!("{p}.attn.attention.out_proj.bias"), filled(&[d], 0.0)?);
            v.insert(format!("{p}.mlp.c_fc.weight"), randn(rng, &[4 * d, d], 0.02)?);
            v.insert(format!("{p}.mlp.c_fc.bias"), filled(&[4 * d], 0.0)?);
            v.insert(format!("{p}.mlp.c_proj.weight"), randn(rng, &[d, 4 * d], 0.02 / (2.0 * n_layers as f64).sqrt())?);
            v.insert(format!("{p}.mlp.c_proj.bias"), filled(&[d], 0.0)?);
        }
        v.insert("transformer.ln_f.weight".into(), filled(&[d], 1.0)?);
        v.insert("transformer.ln_f.bias".into(), filled(&[d], 0.0)?);
        Ok(Model { vars: v, n_layers, n_heads, d })
    }

    fn w(&self, name: &str) -> &Tensor {
        self.vars[name].as_tensor()
    }

    fn ln(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (_, n) = scae::model::ln_pre(x, 1e-5)?;
        Ok(n.broadcast_mul(self.w(&format!("{prefix}.weight")))?.broadcast_add(self.w(&format!("{prefix}.bias")))?)
    }

    fn linear(&self, x: &Tensor, name: &str, bias: bool) -> Result<Tensor> {
        let (b, s, din) = x.dims3()?;
        let w = self.w(&format!("{name}.weight"));
        let mut y = x.reshape((b * s, din))?.matmul(&w.t()?)?;
        if bias {
            y = y.broadcast_add(self.w(&format!("{name}.bias")))?;
        }
        Ok(y.reshape((b, s, w.dim(0)?))?)
    }

    /// Mean next-token CE of `tokens (B, S)` (u32).
    pub fn loss(&self, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s) = tokens.dims2()?;
        let (d, h) = (self.d, self.n_heads);
        let dh = d / h;
        let wte = self.w("transformer.wte.weight");
        let mut x = wte.index_select(&tokens.flatten_all()?, 0)?.reshape((b, s, d))?;
        x = x.broadcast_add(&self.w("transformer.wpe.weight").narrow(0, 0, s)?)?;
        for l in 0..self.n_layers {
            let p = format!("transformer.h.{l}");
            let hn = self.ln(&x, &format!("{p}.ln_1"))?;
            let heads = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, s, h, dh))?.transpose(1, 2)?.contiguous()?) };
            let q = heads(self.linear(&hn, &format!("{p}.attn.attention.q_proj"), false)?)?;
            let k = heads(self.linear(&hn, &format!("{p}.attn.attention.k_proj"), false)?)?;
            let v = heads(self.linear(&hn, &format!("{p}.attn.attention.v_proj"), false)?)?;
            // GPT-Neo does not scale scores by 1/sqrt(d_head).
            let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(mask)?;
            let att = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let z = att.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))?;
            x = (x + self.linear(&z, &format!("{p}.attn.attention.out_proj"), true)?)?;
            let h2 = self.ln(&x, &format!("{p}.ln_2"))?;
            let m = self.linear(&h2, &format!("{p}.mlp.c_fc"), true)?.gelu()?;
            x = (x + self.linear(&m, &format!("{p}.mlp.c_proj"), true)?)?;
        }
        let xf = self.ln(&x, "transformer.ln_f")?;
        let logits = xf.reshape((b * s, d))?.matmul(&wte.t()?)?.reshape((b, s, ()))?;
        Ok(scae::model::token_ce(&logits, tokens)?.mean_all()?)
    }
}

pub fn causal_mask(s: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 }).collect();
    Ok(Tensor::from_vec(m, (s, s), &Device::Cpu)?)
}

/// Save `model` into `dir` as an HF GPT-Neo folder (`model.safetensors`, `config.json`;
/// lm_head tied to wte) for sequences of `ctx_len` (local layers see `ctx_len` keys).
pub fn save_hf(model: &Model, dir: &Path, vocab_size: usize, n_ctx: usize, ctx_len: usize) -> Result<()> {
    let tensors: HashMap<String, Tensor> = model.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    scae::util::io::write_safetensors(&dir.join("model.safetensors"), tensors, &Default::default())?;
    let n_layers = model.n_layers;
    let mut config = serde_json::json!({
        "architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo",
        "vocab_size": vocab_size, "max_position_embeddings": n_ctx, "hidden_size": model.d,
        "num_layers": n_layers, "num_heads": model.n_heads,
        "attention_types": [[["global", "local"], n_layers / 2 + n_layers % 2]], "window_size": ctx_len,
        "attention_layers": (0..n_layers).map(|l| if l % 2 == 0 { "global" } else { "local" }).collect::<Vec<_>>(),
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": true,
        "intermediate_size": null, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
    });
    // `attention_types` must describe exactly n_layers layers.
    if n_layers % 2 == 1 {
        config["attention_types"] = serde_json::json!([[["global", "local"], n_layers / 2], [["global"], 1]]);
    }
    scae::util::io::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    Ok(())
}
