//! Model hyper-parameters read from a Hugging Face `config.json`.
//!
//! The mapping follows TransformerLens 2.x (`convert_hf_model_config`) for the three supported
//! families, with one deliberate difference: sizes that TL hard-codes (GPT-Neo and GPT-2 use
//! `d_mlp = 4·d_model`) are read from the config when it sets them, so the model scae runs is
//! the model the checkpoint describes. See docs/MATH.md, "Model side".

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// A supported model family, named by its HF `architectures[0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `GPTNeoForCausalLM` (TinyStories-33M): learned positions, no 1/√d_head, local layers.
    GptNeo,
    /// `GPTNeoXForCausalLM` (Pythia): rotary on part of each head, parallel attn/MLP.
    GptNeoX,
    /// `GPT2LMHeadModel`: learned positions, Conv1D weights, tied unembedding.
    Gpt2,
}

impl Arch {
    /// The HF architecture string.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::GptNeo => "GPTNeoForCausalLM",
            Arch::GptNeoX => "GPTNeoXForCausalLM",
            Arch::Gpt2 => "GPT2LMHeadModel",
        }
    }

    /// Parse an HF architecture string.
    pub fn from_hf_name(name: &str) -> Option<Arch> {
        match name {
            "GPTNeoForCausalLM" => Some(Arch::GptNeo),
            "GPTNeoXForCausalLM" => Some(Arch::GptNeoX),
            "GPT2LMHeadModel" => Some(Arch::Gpt2),
            _ => None,
        }
    }
}

/// The MLP non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact `0.5·x·(1 + erf(x/√2))`.
    Gelu,
    /// Tanh approximation `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluNew,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    fn parse(s: &str) -> Option<Activation> {
        match s {
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluNew),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    /// The name as written in HF configs.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluNew => "gelu_new",
            Activation::Relu => "relu",
        }
    }
}

/// Everything the runtime needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    /// Maximum context length (positions).
    pub n_ctx: usize,
    pub d_vocab: usize,
    pub ln_eps: f64,
    pub act: Activation,
    /// Attention scores are divided by this (1 for GPT-Neo, √d_head otherwise).
    pub attn_scale: f64,
    /// Rotary dims per head (GPT-NeoX only), applied to the first `rotary_dim` dims.
    pub rotary_dim: Option<usize>,
    pub rotary_base: f64,
    /// Per layer: `Some(w)` for a local layer that sees keys `q-w < p <= q`, `None` for global.
    pub windows: Vec<Option<usize>>,
    /// Attention and MLP both read the block input (GPT-NeoX `use_parallel_residual`).
    pub parallel_attn_mlp: bool,
    /// Whether the HF checkpoint ties the unembedding to the token embedding.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// Typed access to fields of a JSON object with errors that name the file and field.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a serde_json::Map<String, Value>,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            Some(v) => v.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| {
                Error::input(self.path, format!("field `{key}`: expected a positive integer, found {v}"))
            }),
            None => Err(Error::input(self.path, format!("missing field `{key}` (a positive integer)"))),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::input(self.path, format!("field `{key}`: expected a number, found {v}"))),
            None => Ok(default),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::input(self.path, format!("field `{key}`: expected true or false, found {v}"))),
            None => Ok(default),
        }
    }

    fn str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str> {
        match self.get(key) {
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::input(self.path, format!("field `{key}`: expected a string, found {v}"))),
            None => Ok(default),
        }
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            // Some configs list several EOS ids; the first is the canonical one.
            Some(Value::Array(a)) if !a.is_empty() => Ok(a[0].as_u64().map(|n| n as u32)),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as u32))
                .ok_or_else(|| Error::input(self.path, format!("field `{key}`: expected a token id, found {v}"))),
        }
    }

    fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let s = self.str_or(key, default)?;
        Activation::parse(s).ok_or_else(|| {
            Error::input(self.path, format!("field `{key}`: expected one of gelu, gelu_new, relu, found \"{s}\""))
        })
    }
}

impl ModelConfig {
    /// Every field that determines what the model computes, as one line in a fixed order (part
    /// of the model's fingerprint; independent of how `config.json` spells them).
    pub fn canonical(&self) -> String {
        let windows: Vec<String> = self.windows.iter().map(|w| w.map_or("global".into(), |w| w.to_string())).collect();
        format!(
            "arch={};n_layers={};d_model={};n_heads={};d_head={};d_mlp={};n_ctx={};d_vocab={};ln_eps={:e};act={};\
             attn_scale={:e};rotary_dim={:?};rotary_base={:e};windows={};parallel={};tied={};bos={:?};eos={:?}",
            self.arch.hf_name(),
            self.n_layers,
            self.d_model,
            self.n_heads,
            self.d_head,
            self.d_mlp,
            self.n_ctx,
            self.d_vocab,
            self.ln_eps,
            self.act.name(),
            self.attn_scale,
            self.rotary_dim,
            self.rotary_base,
            windows.join(","),
            self.parallel_attn_mlp,
            self.tie_word_embeddings,
            self.bos_token_id,
            self.eos_token_id
        )
    }

    /// Read and check `config.json`.
    ///
    /// Fails on unreadable or malformed JSON, an architecture other than the three supported
    /// ones, missing size fields, and sizes that do not divide (d_model by n_heads).
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::input(path, format!("cannot read model config: {e}")))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| Error::input(path, format!("not valid JSON: {e}")))?;
        ModelConfig::from_json(path, &value)
    }

    /// Build from parsed JSON; `path` is only used in messages.
    pub fn from_json(path: &Path, value: &Value) -> Result<ModelConfig> {
        let obj = value.as_object().ok_or_else(|| Error::input(path, "expected a JSON object at the top level"))?;
        let f = Fields { path, obj };
        let arch_name = match f.get("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => a[0].as_str().unwrap_or("").to_string(),
            _ => match f.str_or("model_type", "")? {
                "gpt_neo" => "GPTNeoForCausalLM".into(),
                "gpt_neox" => "GPTNeoXForCausalLM".into(),
                "gpt2" => "GPT2LMHeadModel".into(),
                other => {
                    return Err(Error::input(
                        path,
                        format!("missing field `architectures` (model_type is \"{other}\")"),
                    ))
                }
            },
        };
        let arch = Arch::from_hf_name(&arch_name).ok_or_else(|| {
            Error::input(
                path,
                format!(
                    "unsupported architecture \"{arch_name}\": expected GPTNeoForCausalLM, \
                     GPTNeoXForCausalLM or GPT2LMHeadModel"
                ),
            )
        })?;
        let (d_model, n_layers, n_heads);
        let mut cfg = match arch {
            Arch::GptNeo => {
                d_model = f.usize("hidden_size")?;
                n_layers = f.usize("num_layers")?;
                n_heads = f.usize("num_heads")?;
                let window = f.usize_or("window_size", 256)?;
                let windows = gpt_neo_windows(&f, n_layers, window)?;
                ModelConfig {
                    arch,
                    n_layers,
                    d_model,
                    n_heads,
                    d_head: 0,
                    d_mlp: f.usize_or("intermediate_size", 4 * d_model)?,
                    n_ctx: f.usize("max_position_embeddings")?,
                    d_vocab: f.usize("vocab_size")?,
                    ln_eps: f.f64_or("layer_norm_epsilon", 1e-5)?,
                    act: f.activation("activation_function", "gelu_new")?,
                    attn_scale: 1.0,
                    rotary_dim: None,
                    rotary_base: 10000.0,
                    windows,
                    parallel_attn_mlp: false,
                    tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
                    bos_token_id: f.token_id("bos_token_id")?,
                    eos_token_id: f.token_id("eos_token_id")?,
                }
            }
            Arch::Gpt2 => {
                d_model = f.usize("n_embd")?;
                n_layers = f.usize("n_layer")?;
                n_heads = f.usize("n_head")?;
                if f.bool_or("scale_attn_by_inverse_layer_idx", false)? {
                    return Err(Error::input(
                        path,
                        "field `scale_attn_by_inverse_layer_idx`: expected false, found true \
                         (not supported)",
                    ));
                }
                // `n_positions` sizes `wpe`; old configs carry only `n_ctx`.
                let n_ctx = match f.get("n_positions") {
                    Some(_) => f.usize("n_positions")?,
                    None => f.usize("n_ctx")?,
                };
                ModelConfig {
                    arch,
                    n_layers,
                    d_model,
                    n_heads,
                    d_head: 0,
                    d_mlp: f.usize_or("n_inner", 4 * d_model)?,
                    n_ctx,
                    d_vocab: f.usize("vocab_size")?,
                    ln_eps: f.f64_or("layer_norm_epsilon", 1e-5)?,
                    act: f.activation("activation_function", "gelu_new")?,
                    attn_scale: 0.0,
                    rotary_dim: None,
                    rotary_base: 10000.0,
                    windows: vec![None; n_layers],
                    parallel_attn_mlp: false,
                    tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
                    bos_token_id: f.token_id("bos_token_id")?,
                    eos_token_id: f.token_id("eos_token_id")?,
                }
            }
            Arch::GptNeoX => {
                d_model = f.usize("hidden_size")?;
                n_layers = f.usize("num_hidden_layers")?;
                n_heads = f.usize("num_attention_heads")?;
                let d_head = d_model / n_heads.max(1);
                let pct = f.f64_or("rotary_pct", 0.25)?;
                // TL: round(rotary_pct * d_head); Python rounds half to even.
                let rotary_dim = round_half_even(pct * d_head as f64) as usize;
                if rotary_dim % 2 != 0 || rotary_dim > d_head {
                    return Err(Error::input(
                        path,
                        format!(
                            "field `rotary_pct`: gives rotary_dim {rotary_dim}, expected an even \
                             number of dims <= d_head {d_head}"
                        ),
                    ));
                }
                ModelConfig {
                    arch,
                    n_layers,
                    d_model,
                    n_heads,
                    d_head: 0,
                    d_mlp: f.usize("intermediate_size")?,
                    n_ctx: f.usize("max_position_embeddings")?,
                    d_vocab: f.usize("vocab_size")?,
                    ln_eps: f.f64_or("layer_norm_eps", 1e-5)?,
                    act: f.activation("hidden_act", "gelu")?,
                    attn_scale: 0.0,
                    rotary_dim: Some(rotary_dim),
                    rotary_base: f.f64_or("rotary_emb_base", 10000.0)?,
                    windows: vec![None; n_layers],
                    parallel_attn_mlp: f.bool_or("use_parallel_residual", true)?,
                    tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
                    bos_token_id: f.token_id("bos_token_id")?,
                    eos_token_id: f.token_id("eos_token_id")?,
                }
            }
        };
        if d_model % n_heads != 0 {
            return Err(Error::input(path, format!("d_model {d_model} is not divisible by n_heads {n_heads}")));
        }
        if !(cfg.ln_eps.is_finite() && cfg.ln_eps > 0.0) {
            return Err(Error::input(
                path,
                format!("LayerNorm epsilon: expected a finite number > 0, found {}", cfg.ln_eps),
            ));
        }
        cfg.d_head = d_model / n_heads;
        if arch != Arch::GptNeo {
            cfg.attn_scale = (cfg.d_head as f64).sqrt();
        }
        Ok(cfg)
    }

    /// The TL hook names cached for this model, in the reference buffer's order .
    pub fn hook_names(&self) -> Vec<String> {
        let mut names = vec!["blocks.0.hook_resid_pre".to_string()];
        for l in 0..self.n_layers {
            for suffix in [
                "ln1.hook_scale",
                "ln2.hook_scale",
                "ln1.hook_normalized",
                "ln2.hook_normalized",
                "hook_attn_out",
                "hook_mlp_out",
                "attn.hook_pattern",
            ] {
                names.push(format!("blocks.{l}.{suffix}"));
            }
        }
        names
    }
}

/// GPT-Neo's `attention_types` (`[[["global","local"], 2]]`) expanded to one entry per layer.
fn gpt_neo_windows(f: &Fields, n_layers: usize, window: usize) -> Result<Vec<Option<usize>>> {
    let bad = |what: String| Error::input(f.path, format!("field `attention_types`: {what}"));
    let Some(spec) = f.get("attention_types") else {
        // HF's default is alternating global/local.
        return Ok((0..n_layers).map(|l| (l % 2 == 1).then_some(window)).collect());
    };
    let mut out = Vec::new();
    for item in spec.as_array().ok_or_else(|| bad(format!("expected a list, found {spec}")))? {
        let pair = item.as_array().filter(|a| a.len() == 2);
        let (kinds, reps) = match pair {
            Some(a) => (a[0].as_array(), a[1].as_u64()),
            None => (None, None),
        };
        let (Some(kinds), Some(reps)) = (kinds, reps) else {
            return Err(bad(format!("expected [[kinds], repeat] pairs, found {item}")));
        };
        for _ in 0..reps {
            for k in kinds {
                match k.as_str() {
                    Some("global") => out.push(None),
                    Some("local") => out.push(Some(window)),
                    _ => return Err(bad(format!("expected \"global\" or \"local\", found {k}"))),
                }
            }
        }
    }
    if out.len() != n_layers {
        return Err(bad(format!("describes {} layers, but num_layers is {n_layers}", out.len())));
    }
    Ok(out)
}

/// Python's `round` (banker's rounding) for the rotary-dim computation.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_like_python() {
        // python: [round(x) for x in (0.5, 1.5, 2.5, 16.0, 16.4)] == [0, 2, 2, 16, 16]
        let got: Vec<f64> = [0.5, 1.5, 2.5, 16.0, 16.4].iter().map(|&x| round_half_even(x)).collect();
        assert_eq!(got, vec![0.0, 2.0, 2.0, 16.0, 16.0]);
    }

    #[test]
    fn expands_gpt_neo_attention_types() {
        let v: Value = serde_json::json!({
            "architectures": ["GPTNeoForCausalLM"], "hidden_size": 8, "num_layers": 4,
            "num_heads": 2, "max_position_embeddings": 32, "vocab_size": 10,
            "attention_types": [[["global", "local"], 2]], "window_size": 5
        });
        let cfg = ModelConfig::from_json(Path::new("c.json"), &v).unwrap();
        assert_eq!(cfg.windows, vec![None, Some(5), None, Some(5)]);
        assert_eq!(cfg.attn_scale, 1.0);
        assert_eq!(cfg.d_head, 4);
    }

    #[test]
    fn rejects_unknown_architecture() {
        let v: Value = serde_json::json!({"architectures": ["LlamaForCausalLM"]});
        let err = ModelConfig::from_json(Path::new("c.json"), &v).unwrap_err().to_string();
        assert!(err.contains("unsupported architecture \"LlamaForCausalLM\""), "{err}");
    }
}
