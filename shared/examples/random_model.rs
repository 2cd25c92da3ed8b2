//! Benchmark helper (not a test): a randomly initialised HF model folder of a real model's exact
//! shape and vocabulary size, so every stage can be timed at that shape offline.
//!
//! `random_model SHAPE TOKENIZER_DIR OUT_DIR` writes `OUT_DIR/{config.json, model.safetensors,
//! tokenizer.json}`; SHAPE is one of
//! - `tinystories-33m`: GPT-Neo, d_model 768, 16 heads, 4 layers, vocab 50,257 (roneneldan/TinyStories-33M);
//! - `pythia-70m`: GPT-NeoX, d_model 512, 8 heads, 6 layers, parallel attention and MLP, rotary
//!   on 25% of each head, untied unembedding, vocab 50,304 (EleutherAI/pythia-70m);
//! - `gpt2-small`: GPT-2, d_model 768, 12 heads, 12 layers, vocab 50,257 (openai-community/gpt2).
//!
//! The tokenizer is copied from TOKENIZER_DIR (e.g. the toy model's word-level one): its ids all
//! lie inside the model's vocabulary, so the toy corpus drives the model while the unembedding
//! keeps its real size. Weights are N(0, 0.02), LayerNorms identity, biases zero.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use scae::util::rng::SplitMix;

struct Writer {
    rng: SplitMix,
    tensors: HashMap<String, Tensor>,
}

impl Writer {
    fn randn(&mut self, name: String, shape: &[usize]) -> Result<()> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (self.rng.normal() * 0.02) as f32).collect();
        self.tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        Ok(())
    }
    fn fill(&mut self, name: String, shape: &[usize], value: f32) -> Result<()> {
        self.tensors.insert(name, Tensor::full(value, shape, &Device::Cpu)?);
        Ok(())
    }
    fn ln(&mut self, prefix: &str, d: usize) -> Result<()> {
        self.fill(format!("{prefix}.weight"), &[d], 1.0)?;
        self.fill(format!("{prefix}.bias"), &[d], 0.0)
    }
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [shape, tok_dir, out] = &a[..] else {
        bail!("usage: random_model tinystories-33m|pythia-70m|gpt2-small TOKENIZER_DIR OUT_DIR");
    };
    let out = Path::new(out);
    std::fs::create_dir_all(out)?;
    std::fs::copy(Path::new(tok_dir).join("tokenizer.json"), out.join("tokenizer.json"))?;
    let mut w = Writer { rng: SplitMix(0x5CAE), tensors: HashMap::new() };
    let config = match shape.as_str() {
        "tinystories-33m" => {
            let (d, layers, vocab, n_ctx) = (768, 4, 50257, 2048);
            w.randn("transformer.wte.weight".into(), &[vocab, d])?;
            w.randn("transformer.wpe.weight".into(), &[n_ctx, d])?;
            for l in 0..layers {
                let p = format!("transformer.h.{l}");
                w.ln(&format!("{p}.ln_1"), d)?;
                w.ln(&format!("{p}.ln_2"), d)?;
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    w.randn(format!("{p}.attn.attention.{proj}.weight"), &[d, d])?;
                }
                w.fill(format!("{p}.attn.attention.out_proj.bias"), &[d], 0.0)?;
                w.randn(format!("{p}.mlp.c_fc.weight"), &[4 * d, d])?;
                w.fill(format!("{p}.mlp.c_fc.bias"), &[4 * d], 0.0)?;
                w.randn(format!("{p}.mlp.c_proj.weight"), &[d, 4 * d])?;
                w.fill(format!("{p}.mlp.c_proj.bias"), &[d], 0.0)?;
            }
            w.ln("transformer.ln_f", d)?;
            serde_json::json!({
                "architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo", "vocab_size": vocab,
                "max_position_embeddings": n_ctx, "hidden_size": d, "num_layers": layers, "num_heads": 16,
                "attention_types": [[["global", "local"], 2]], "window_size": 256,
                "attention_layers": ["global", "local", "global", "local"], "intermediate_size": null,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": true,
                "bos_token_id": 50256, "eos_token_id": 50256,
            })
        }
        "pythia-70m" => {
            let (d, m, layers, vocab) = (512, 2048, 6, 50304);
            w.randn("gpt_neox.embed_in.weight".into(), &[vocab, d])?;
            w.randn("embed_out.weight".into(), &[vocab, d])?;
            for l in 0..layers {
                let p = format!("gpt_neox.layers.{l}");
                w.ln(&format!("{p}.input_layernorm"), d)?;
                w.ln(&format!("{p}.post_attention_layernorm"), d)?;
                w.randn(format!("{p}.attention.query_key_value.weight"), &[3 * d, d])?;
                w.fill(format!("{p}.attention.query_key_value.bias"), &[3 * d], 0.0)?;
                w.randn(format!("{p}.attention.dense.weight"), &[d, d])?;
                w.fill(format!("{p}.attention.dense.bias"), &[d], 0.0)?;
                w.randn(format!("{p}.mlp.dense_h_to_4h.weight"), &[m, d])?;
                w.fill(format!("{p}.mlp.dense_h_to_4h.bias"), &[m], 0.0)?;
                w.randn(format!("{p}.mlp.dense_4h_to_h.weight"), &[d, m])?;
                w.fill(format!("{p}.mlp.dense_4h_to_h.bias"), &[d], 0.0)?;
            }
            w.ln("gpt_neox.final_layer_norm", d)?;
            serde_json::json!({
                "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": vocab,
                "hidden_size": d, "intermediate_size": m, "num_hidden_layers": layers, "num_attention_heads": 8,
                "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000,
                "use_parallel_residual": true, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 0,
            })
        }
        "gpt2-small" => {
            let (d, layers, vocab, n_ctx) = (768, 12, 50257, 1024);
            w.randn("transformer.wte.weight".into(), &[vocab, d])?;
            w.randn("transformer.wpe.weight".into(), &[n_ctx, d])?;
            for l in 0..layers {
                let p = format!("transformer.h.{l}");
                w.ln(&format!("{p}.ln_1"), d)?;
                w.ln(&format!("{p}.ln_2"), d)?;
                // Conv1D weights are stored (in, out).
                w.randn(format!("{p}.attn.c_attn.weight"), &[d, 3 * d])?;
                w.fill(format!("{p}.attn.c_attn.bias"), &[3 * d], 0.0)?;
                w.randn(format!("{p}.attn.c_proj.weight"), &[d, d])?;
                w.fill(format!("{p}.attn.c_proj.bias"), &[d], 0.0)?;
                w.randn(format!("{p}.mlp.c_fc.weight"), &[d, 4 * d])?;
                w.fill(format!("{p}.mlp.c_fc.bias"), &[4 * d], 0.0)?;
                w.randn(format!("{p}.mlp.c_proj.weight"), &[4 * d, d])?;
                w.fill(format!("{p}.mlp.c_proj.bias"), &[d], 0.0)?;
            }
            w.ln("transformer.ln_f", d)?;
            serde_json::json!({
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
                "n_embd": d, "n_layer": layers, "n_head": 12, "n_positions": n_ctx, "n_ctx": n_ctx,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                "bos_token_id": 50256, "eos_token_id": 50256,
            })
        }
        other => bail!("unknown shape {other:?}: expected tinystories-33m, pythia-70m or gpt2-small"),
    };
    candle_core::safetensors::save(&w.tensors, out.join("model.safetensors"))?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}
