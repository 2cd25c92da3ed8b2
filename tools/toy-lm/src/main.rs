//! `toy-lm`: the built-in offline default model. Writes a deterministic synthetic story corpus,
//! a word-level tokenizer, and trains a tiny GPT-Neo on it with candle, saved as a normal HF
//! folder (`config.json`, `model.safetensors`, `tokenizer.json`) that `collect-acts` reads like
//! any other model.

mod corpus;
mod model;
mod run;
mod vocab;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use run::ToyConfig;

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
    let cfg = ToyConfig {
        out: args.out,
        overwrite: args.overwrite,
        n_stories: args.n_stories,
        n_heldout: args.n_heldout,
        d_model: args.d_model,
        n_layers: args.n_layers,
        n_heads: args.n_heads,
        ctx_len: args.ctx_len,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.common.seed,
    };
    let t = run::train(&cfg)?;
    scae::say!(
        "toy-lm: held-out CE {:.3} nats vs unigram entropy {:.3} nats ({} words, {:.0}s) -> {}",
        t.heldout_ce,
        t.unigram_entropy,
        t.n_words,
        t.seconds,
        t.model_dir.display()
    )?;
    Ok(())
}
