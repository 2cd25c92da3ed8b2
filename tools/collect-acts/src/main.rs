//! `collect-acts`: run a causal LM over a dataset and write an activation cache
//! (`manifest.json` + `shard-*.safetensors` with TransformerLens hook names; FORMATS.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use scae::cli::Common;
use scae::formats::cache::{CollectConfig, StoreDType};

/// Run a model over text (or token ids) and cache every hook the SCAE pipeline needs.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  collect-acts --model roneneldan/TinyStories-33M --data stories.parquet \\\n      --ctx-len 128 --no-prepend-bos --n-seqs 1024 --out acts/"
)]
struct Args {
    /// Model: a local HF folder (config.json, model.safetensors or pytorch_model.bin,
    /// tokenizer.json) or a hub id such as `roneneldan/TinyStories-33M` (downloaded into the
    /// HF cache when online).
    #[arg(long)]
    model: String,
    #[command(flatten)]
    data: scae::cli::DataArgs,
    /// Number of sequences to cache (default: all the data gives).
    #[arg(long, conflicts_with = "n_tokens", value_parser = clap::value_parser!(u64).range(1..))]
    n_seqs: Option<u64>,
    /// Number of tokens to cache (rounded up to whole sequences; default: --n-seqs, else all the
    /// data gives).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    n_tokens: Option<u64>,
    /// Skip the first N sequences the data gives (e.g. a held-out cache from the text after a
    /// training cache of N sequences, with the same data flags).
    #[arg(long, default_value_t = 0)]
    skip_seqs: u64,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Storage type of cached activations (computation is always f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: StoreDType,
    /// Sequences per shard file, rounded up to whole batches of --batch-size (default: about
    /// 256 MiB per shard).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    shard_seqs: Option<u64>,
    /// Output cache folder (must be absent or empty unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing, non-empty --out folder.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    // Under mpirun/srun -n N the forward passes are shared among the ranks; rank 0 writes.
    scae::cli::run_main_ranks("collect-acts", |coll| run(scae::cli::parse_args::<Args>(), coll))
}

fn run(args: Args, coll: &dyn scae::util::collective::Collective) -> Result<()> {
    let device = args.common.setup()?;
    let model_path = Path::new(&args.model);
    let inputs = [&[("--model", Some(model_path))][..], &args.data.paths()].concat();
    scae::util::io::refuse_overlap(&args.out, "--out", &inputs)?;
    let ctx_len = args.data.ctx_len as usize;
    let cfg = CollectConfig {
        model: args.model.clone(),
        source: args.data.spec(),
        seq: args.data.options(),
        limit: args.n_seqs.map(|n| n as usize).or(args.n_tokens.map(|t| (t as usize).div_ceil(ctx_len))),
        skip_seqs: args.skip_seqs,
        batch_size: args.batch_size as usize,
        dtype: args.dtype,
        shard_seqs: args.shard_seqs.map(|s| s as usize),
        out: args.out.clone(),
        overwrite: args.overwrite,
        created_by: format!("collect-acts {}", env!("CARGO_PKG_VERSION")),
    };
    let Some(c) = scae::formats::cache::collect(&cfg, &device, coll)? else { return Ok(()) };
    let (n_seqs, clean_ce) = (c.manifest.n_seqs, c.manifest.clean_ce);
    scae::say!(
        "collect-acts: {n_seqs} sequences ({} tokens) in {} shard(s) -> {}; clean CE {clean_ce:.4}; {:.0} tokens/s",
        n_seqs * ctx_len,
        c.manifest.shards.len(),
        c.out.display(),
        (n_seqs * ctx_len) as f64 / c.secs.max(1e-9)
    )?;
    Ok(())
}
