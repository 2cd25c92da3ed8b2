//! `toy-lm`: the built-in offline default model. Writes a deterministic synthetic story corpus,
//! a word-level tokenizer, and trains a tiny GPT-Neo on it with candle, saved as a normal HF
//! folder (`config.json`, `model.safetensors`, `tokenizer.json`) that `collect-acts` reads like
//! any other model.

mod corpus;
mod model;
mod vocab;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Parser;
use model::{causal_mask, save_hf, Model};
use scae::util::rng::SplitMix;
use vocab::{write_tokenizer, Vocab};

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
    #[arg(long, default_value_t = 4000, value_parser = at_least(1))]
    n_stories: usize,
    /// Held-out stories (heldout.txt: for report.json's held-out CE, and the pipeline's
    /// held-out evaluation).
    #[arg(long, default_value_t = 1000, value_parser = at_least(1))]
    n_heldout: usize,
    #[arg(long, default_value_t = 64, value_parser = at_least(1))]
    d_model: usize,
    #[arg(long, default_value_t = 2, value_parser = at_least(1))]
    n_layers: usize,
    #[arg(long, default_value_t = 4, value_parser = at_least(1))]
    n_heads: usize,
    /// Context length of training sequences (the model's n_ctx is twice this).
    #[arg(long, default_value_t = 64, value_parser = at_least(2))]
    ctx_len: usize,
    /// Training steps (0: write the randomly initialised model).
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 32, value_parser = at_least(1))]
    batch_size: usize,
    /// AdamW learning rate (linear decay to 10% over the run).
    #[arg(long, default_value_t = 3e-3, value_parser = scae::cli::positive_f64)]
    lr: f64,
    /// Replace an existing, non-empty --out folder.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    common: scae::cli::Common,
}

/// Value parser of an integer >= `min`.
fn at_least(min: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(min..)
}

fn main() -> ExitCode {
    scae::cli::run_main("toy-lm", || run(scae::cli::parse_args::<Args>()))
}

fn run(args: Args) -> Result<()> {
    args.common.setup()?;
    if args.d_model % args.n_heads != 0 {
        bail!("--d-model {}: not divisible by --n-heads {}", args.d_model, args.n_heads);
    }
    // Parameters (a vocabulary of at most ~1,000 words) with AdamW's gradient and two moments,
    // and one step's activations (about 16 d-wide and 3 attention-sized buffers per layer),
    // in f64 so that no size overflows.
    let (d, l, s, b) = (args.d_model as f64, args.n_layers as f64, args.ctx_len as f64, args.batch_size as f64);
    let params = 1000.0 * d + 2.0 * s * d + l * 12.0 * d * d;
    let acts = b * s * l * (16.0 * d + 3.0 * args.n_heads as f64 * s);
    let sizes = format!(
        "--d-model {}, --n-layers {}, --ctx-len {}, --batch-size {}",
        args.d_model, args.n_layers, args.ctx_len, args.batch_size
    );
    scae::util::mem::check_fits(4.0 * (4.0 * params + 2.0 * acts), &sizes)?;
    let stage = scae::util::io::StagedDir::create(&args.out, args.overwrite, "--out")?;
    let dir = stage.path().to_path_buf();
    // Corpus and held-out stories (different seeds).
    let train = corpus::corpus(args.n_stories, args.common.seed);
    let heldout = corpus::corpus(args.n_heldout, args.common.seed ^ 0xA5A5_5A5A);
    scae::util::io::write_atomic(&dir.join("corpus.txt"), (train.join("\n") + "\n").as_bytes())?;
    scae::util::io::write_atomic(&dir.join("heldout.txt"), (heldout.join("\n") + "\n").as_bytes())?;
    let vocab = Vocab::build(&train);
    let (stream, unigram_entropy) = (&vocab.stream, vocab.unigram_entropy);
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir)?;
    write_tokenizer(&model_dir, &vocab.words)?;
    let n_ctx = 2 * args.ctx_len;
    let mut rng = SplitMix(args.common.seed.wrapping_add(1));
    let model = Model::new(vocab.words.len(), n_ctx, args.d_model, args.n_layers, args.n_heads, &mut rng)?;
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
            scae::note!("toy-lm: step {step:4} loss {last:.4} ({:.1}s)", start.elapsed().as_secs_f64());
        }
    }
    save_hf(&model, &model_dir, vocab.words.len(), n_ctx, args.ctx_len)?;
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
        "vocab_size": vocab.words.len(), "n_tokens": stream.len(), "steps": args.steps,
        "final_train_ce": last, "heldout_ce": heldout_ce, "unigram_entropy": unigram_entropy,
        "seconds": start.elapsed().as_secs_f64(),
    });
    scae::util::io::write_atomic(&dir.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    let out = stage.commit()?;
    scae::say!(
        "toy-lm: held-out CE {heldout_ce:.3} nats vs unigram entropy {unigram_entropy:.3} nats ({} words, {:.0}s) -> {}",
        vocab.words.len(),
        start.elapsed().as_secs_f64(),
        out.join("model").display()
    )?;
    Ok(())
}
