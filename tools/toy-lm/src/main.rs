//! `toy-lm`: the built-in offline default model. Writes a deterministic synthetic story corpus,
//! a word-level tokenizer, and trains a tiny GPT-Neo on it with candle, saved as a normal HF
//! folder (`config.json`, `model.safetensors`, `tokenizer.json`) that `collect-acts` reads like
//! any other model.

mod corpus;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Parser;
use scae::util::rng::SplitMix;

/// Write a synthetic story corpus and train a tiny GPT-Neo on it.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  toy-lm --out out/toy\n\nWrites out/toy/corpus.txt (training stories, one per line), out/toy/heldout.txt,\nout/toy/model/ (an HF GPT-Neo folder) and out/toy/report.json (CE vs unigram entropy)."
)]
struct Args {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Training stories.
    #[arg(long, default_value_t = 4000)]
    n_stories: usize,
    /// Held-out stories for the report.
    #[arg(long, default_value_t = 200)]
    n_heldout: usize,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    #[arg(long, default_value_t = 2)]
    n_layers: usize,
    #[arg(long, default_value_t = 4)]
    n_heads: usize,
    /// Context length of training sequences (the model's n_ctx is twice this).
    #[arg(long, default_value_t = 64)]
    ctx_len: usize,
    /// Training steps.
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// AdamW learning rate (linear decay to 10% over the run).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Replace an existing, non-empty --out folder.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    common: scae::cli::Common,
}

/// The trainable model, with HF GPT-Neo parameter names.
struct Model {
    vars: BTreeMap<String, Var>,
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
    fn new(vocab: usize, n_ctx: usize, d: usize, n_layers: usize, n_heads: usize, rng: &mut SplitMix) -> Result<Model> {
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
    fn loss(&self, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
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

fn causal_mask(s: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 }).collect();
    Ok(Tensor::from_vec(m, (s, s), &Device::Cpu)?)
}

fn main() -> ExitCode {
    scae::cli::run_main("toy-lm", || run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    args.common.setup()?;
    if args.d_model % args.n_heads != 0 {
        bail!("--d-model {}: not divisible by --n-heads {}", args.d_model, args.n_heads);
    }
    let stage = scae::util::io::StagedDir::create(&args.out, args.overwrite, "--out")?;
    let dir = stage.path().to_path_buf();
    // Corpus and held-out stories (different seeds).
    let train = corpus::corpus(args.n_stories, args.common.seed);
    let heldout = corpus::corpus(args.n_heldout, args.common.seed ^ 0xA5A5_5A5A);
    scae::util::io::write_atomic(&dir.join("corpus.txt"), (train.join("\n") + "\n").as_bytes())?;
    scae::util::io::write_atomic(&dir.join("heldout.txt"), (heldout.join("\n") + "\n").as_bytes())?;
    // Word-level vocabulary: <|endoftext|> = 0 (BOS/EOS), <|unk|> = 1, then words by first use.
    let mut vocab: Vec<String> = vec!["<|endoftext|>".into(), "<|unk|>".into()];
    let mut index: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, w)| (w.clone(), i as u32)).collect();
    let mut counts: Vec<u64> = vec![0; 2];
    let mut stream: Vec<u32> = Vec::new();
    for st in &train {
        for w in corpus::words(st) {
            let id = *index.entry(w.clone()).or_insert_with(|| {
                vocab.push(w.clone());
                counts.push(0);
                (vocab.len() - 1) as u32
            });
            counts[id as usize] += 1;
            stream.push(id);
        }
        stream.push(0);
        counts[0] += 1;
    }
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir)?;
    write_tokenizer(&model_dir, &vocab)?;
    let total: u64 = counts.iter().sum();
    let unigram_entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();

    let n_ctx = 2 * args.ctx_len;
    let mut rng = SplitMix(args.common.seed.wrapping_add(1));
    let model = Model::new(vocab.len(), n_ctx, args.d_model, args.n_layers, args.n_heads, &mut rng)?;
    let mut opt = AdamW::new(
        model.vars.values().cloned().collect(),
        ParamsAdamW { lr: args.lr, weight_decay: 0.01, ..Default::default() },
    )?;
    let mask = causal_mask(args.ctx_len)?;
    let n_windows = stream.len().saturating_sub(args.ctx_len + 1);
    if n_windows == 0 {
        bail!("--n-stories {}: too few tokens for --ctx-len {}", args.n_stories, args.ctx_len);
    }
    let start = Instant::now();
    let mut last = f64::NAN;
    for step in 0..args.steps {
        let mut rows = Vec::with_capacity(args.batch_size * args.ctx_len);
        for _ in 0..args.batch_size {
            let at = (rng.next_u64() % n_windows as u64) as usize;
            rows.extend_from_slice(&stream[at..at + args.ctx_len]);
        }
        let tokens = Tensor::from_vec(rows, (args.batch_size, args.ctx_len), &Device::Cpu)?;
        let loss = model.loss(&tokens, &mask)?;
        opt.set_learning_rate(args.lr * (1.0 - 0.9 * step as f64 / args.steps as f64));
        opt.backward_step(&loss)?;
        last = loss.to_scalar::<f32>()? as f64;
        if step % 100 == 0 || step + 1 == args.steps {
            eprintln!("toy-lm: step {step:4} loss {last:.4} ({:.1}s)", start.elapsed().as_secs_f64());
        }
    }
    // Save as an HF GPT-Neo folder (lm_head tied to wte).
    let tensors: HashMap<String, Tensor> = model.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&tensors, model_dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo",
        "vocab_size": vocab.len(), "max_position_embeddings": n_ctx, "hidden_size": args.d_model,
        "num_layers": args.n_layers, "num_heads": args.n_heads,
        "attention_types": [[["global", "local"], args.n_layers / 2 + args.n_layers % 2]], "window_size": args.ctx_len,
        "attention_layers": (0..args.n_layers).map(|l| if l % 2 == 0 { "global" } else { "local" }).collect::<Vec<_>>(),
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": true,
        "intermediate_size": null, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
    });
    // `attention_types` must describe exactly n_layers layers.
    let mut config = config;
    if args.n_layers % 2 == 1 {
        config["attention_types"] = serde_json::json!([[["global", "local"], args.n_layers / 2], [["global"], 1]]);
    }
    scae::util::io::write_atomic(&model_dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    // Check the saved folder through scae's own loader (TL processing) on held-out stories.
    let loaded = scae::model::Model::load("toy", &model_dir, &Device::Cpu).context("reloading the saved model")?;
    let tok = loaded.tokenizer()?;
    let mut ids: Vec<u32> = Vec::new();
    for st in &heldout {
        ids.extend(tok.encode(st)?);
        ids.push(0);
    }
    let n_eval = (ids.len() / args.ctx_len).min(64);
    let eval = Tensor::from_vec(ids[..n_eval * args.ctx_len].to_vec(), (n_eval, args.ctx_len), &Device::Cpu)?;
    let heldout_ce =
        loaded.runtime.forward(&eval, false, false)?.ce.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
    let report = serde_json::json!({
        "format": "scae-toy-lm", "version": 1,
        "vocab_size": vocab.len(), "train_tokens": stream.len(), "steps": args.steps,
        "final_train_ce": last, "heldout_ce": heldout_ce, "unigram_entropy": unigram_entropy,
        "seconds": start.elapsed().as_secs_f64(),
    });
    scae::util::io::write_atomic(&dir.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    let out = stage.commit()?;
    println!(
        "toy-lm: held-out CE {heldout_ce:.3} nats vs unigram entropy {unigram_entropy:.3} nats ({} words, {:.0}s) -> {}",
        vocab.len(),
        start.elapsed().as_secs_f64(),
        out.join("model").display()
    );
    Ok(())
}

/// A word-level `tokenizer.json` (Whitespace pre-tokenizer) plus `tokenizer_config.json`.
fn write_tokenizer(dir: &std::path::Path, vocab: &[String]) -> Result<()> {
    let map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::json!(i))).collect();
    let special = |id: usize, content: &str| serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<|endoftext|>"), special(1, "<|unk|>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "<|unk|>"},
    });
    scae::util::io::write_atomic(&dir.join("tokenizer.json"), serde_json::to_string(&tok)?.as_bytes())?;
    let cfg = serde_json::json!({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|unk|>", "model_max_length": 1000000, "tokenizer_class": "PreTrainedTokenizerFast"});
    scae::util::io::write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    Ok(())
}
