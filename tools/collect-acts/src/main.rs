//! `collect-acts`: run a causal LM over a dataset and write an activation cache
//! (`manifest.json` + `shard-*.safetensors` with TransformerLens hook names; FORMATS.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use scae::cli::Common;
use scae::data::{BatchSource, SourceSpec};
use scae::formats::cache::{DataInfo, Manifest, ModelInfo, ShardWriter, StoreDType, FORMAT, MANIFEST, VERSION};
use scae::model::Model;
use scae::util::io::StagedDir;

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
    scae::cli::run_main("collect-acts", || run(scae::cli::parse_args::<Args>()))
}

fn run(args: Args) -> Result<()> {
    let device = args.common.setup()?;
    let model_path = Path::new(&args.model);
    let inputs = [&[("--model", Some(model_path))][..], &args.data.paths()].concat();
    scae::util::io::refuse_overlap(&args.out, "--out", &inputs)?;
    let dir = scae::model::hub::resolve_model(&args.model)?;
    let model = Model::load(&args.model, &dir, &device)?;
    let cfg = model.cfg().clone();
    let ctx_len = args.data.ctx_len as usize;
    if ctx_len > cfg.n_ctx {
        bail!("--ctx-len {ctx_len}: above the model's n_ctx {} ({})", cfg.n_ctx, dir.join("config.json").display());
    }
    let tokenizer = model.tokenizer()?;
    let Some(spec) = args.data.spec() else { bail!("one of --data or --tokens is required") };
    let opts = args.data.options();
    let prepend_bos = opts.prepend_bos;
    let limit = args.n_seqs.map(|n| n as usize).or(args.n_tokens.map(|t| (t as usize).div_ceil(ctx_len)));
    let batch = args.batch_size as usize;
    let mut source = BatchSource::open(&spec, &tokenizer, opts, batch, limit, cfg.d_vocab)?;
    let skipped = source.skip(args.skip_seqs)?;
    if skipped < args.skip_seqs {
        bail!(
            "--skip-seqs {}: {} gives only {skipped} sequences with these flags",
            args.skip_seqs,
            spec.path().display()
        );
    }
    let data_fingerprint = scae::util::fingerprint::file_fingerprint(spec.path())?;
    let stage = StagedDir::create(&args.out, args.overwrite, "--out")?;
    let shard_seqs =
        args.shard_seqs.map(|s| s as usize).unwrap_or_else(|| auto_shard_seqs(&cfg, ctx_len, args.dtype, batch));
    let mut writer = ShardWriter::new(stage.path(), &cfg, args.dtype, shard_seqs);

    let mut bar = scae::util::token_bar(limit.map(|l| (l * ctx_len) as u64), "collect-acts");
    let start = Instant::now();
    while let Some(tokens) = source.next_batch(&device)? {
        let out = model.runtime.forward(&tokens, true, false)?;
        writer.push(&tokens, &out)?;
        bar.inc(tokens.elem_count() as u64);
    }
    writer.finish()?;
    bar.finish();
    let n_seqs = source.produced();
    if n_seqs == 0 {
        return Err(source.empty_error().into());
    }
    if let Some(l) = limit.filter(|&l| n_seqs < l) {
        scae::note!("collect-acts: warning: the data ran out after {n_seqs} of {l} sequences");
    }
    let total: usize = writer.shards.iter().map(|s| s.n_seqs).sum();
    let clean_ce = writer.shards.iter().map(|s| s.clean_ce * s.n_seqs as f64).sum::<f64>() / total as f64;
    let stats = source.stats().clone();
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        model: ModelInfo::new(&args.model, &dir, &model.hash, &cfg),
        ctx_len,
        prepend_bos,
        dtype: args.dtype,
        data: DataInfo {
            source: spec.path().display().to_string(),
            kind: if args.data.data.is_some() { "text" } else { "tokens" }.into(),
            column: match &spec {
                SourceSpec::Text { column, .. } => Some(column.clone()),
                SourceSpec::Tokens { column, .. } => column.clone(),
            },
            pack: opts.pack,
            docs_read: stats.docs_read,
            docs_skipped_short: stats.docs_skipped_short,
            fingerprint: Some(data_fingerprint),
            skip_seqs: args.skip_seqs,
        },
        n_seqs,
        hooks: writer.hooks().to_vec(),
        shards: writer.shards.clone(),
        clean_ce,
        created_by: format!("collect-acts {}", env!("CARGO_PKG_VERSION")),
    };
    let json = serde_json::to_string_pretty(&manifest).context("serializing the manifest")?;
    scae::util::io::write_atomic(&stage.path().join(MANIFEST), json.as_bytes())?;
    let out = stage.commit()?;
    let secs = start.elapsed().as_secs_f64();
    scae::say!(
        "collect-acts: {n_seqs} sequences ({} tokens) in {} shard(s) -> {}; clean CE {clean_ce:.4}; {:.0} tokens/s",
        n_seqs * ctx_len,
        manifest.shards.len(),
        out.display(),
        (n_seqs * ctx_len) as f64 / secs.max(1e-9)
    )?;
    Ok(())
}

/// Whole batches per shard, about 256 MiB each.
fn auto_shard_seqs(cfg: &scae::model::ModelConfig, ctx: usize, dtype: StoreDType, batch: usize) -> usize {
    let per_layer = 2 * ctx + 4 * ctx * cfg.d_model + cfg.n_heads * ctx * ctx;
    let elems = ctx * cfg.d_model + cfg.n_layers * per_layer;
    let bytes = elems * dtype.dtype().size_in_bytes() + ctx * 8;
    let seqs = (256usize << 20) / bytes.max(1);
    (seqs / batch).max(1) * batch
}
