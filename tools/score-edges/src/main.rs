//! `score-edges`: average signed contribution of every upstream feature to every downstream
//! feature under the suite's full pass, written as `edges.parquet` (top M per feature) and,
//! with `--top-c`, `connections.parquet` (top C per feature across all upstream modules).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use scae::inputs::Inputs;
use scae::scores::ScoreConfig;
use scae::util::io::StagedDir;

/// Score every edge of a suite on an activation cache and pick top-C connections.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  score-edges --acts acts/ --suite suite/ --top-c 16 --out edges/\n\nScores: mean over tokens of the edge's signed term in the downstream pre-activation\n(the reference's average contribution up to a positive factor per module). Ties: |score| desc, upstream module, feature."
)]
struct Args {
    /// Activation cache folder (from collect-acts).
    #[arg(long)]
    acts: PathBuf,
    /// Suite folder (suite.safetensors + config.json) or a bare .safetensors.
    #[arg(long)]
    suite: PathBuf,
    /// Output folder: edges.parquet, connections.parquet (with --top-c), scores.json.
    #[arg(long)]
    out: PathBuf,
    /// Also write connections.parquet with the top C edges of every feature (default: only
    /// edges.parquet; select-edges picks C later).
    #[arg(long)]
    top_c: Option<usize>,
    /// Also score edges from the token embedding (rows with up_module `embed`, up_feature =
    /// token id), pooled with the modules' edges in edges.parquet and --top-c.
    #[arg(long)]
    embed: bool,
    /// Also score edges into the unembedding (rows with down_module `unembed`, down_feature =
    /// output token): feature j -> token v by j's mean contribution to logit v over the
    /// positions whose next token is v; --keep per token.
    #[arg(long)]
    unembed: bool,
    /// Edges kept per downstream feature in edges.parquet (at least --top-c).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    keep: u64,
    #[command(flatten)]
    cache: scae::cli::CacheRunArgs,
    #[command(flatten)]
    pass: scae::cli::PassArgs,
    #[command(flatten)]
    common: scae::cli::Common,
}

fn main() -> ExitCode {
    // Under mpirun/srun -n N the batches are shared among the ranks (scae::scores::run).
    scae::cli::run_main_ranks("score-edges", |coll| run(scae::cli::parse_args::<Args>(), coll))
}

fn run(args: Args, coll: &dyn scae::util::collective::Collective) -> Result<()> {
    let device = args.common.setup()?;
    let model_path = args.cache.model.as_deref().map(Path::new);
    let inputs =
        [("--acts", Some(args.acts.as_path())), ("--suite", Some(args.suite.as_path())), ("--model", model_path)];
    scae::util::io::refuse_overlap(&args.out, "--out", &inputs)?;
    let keep = args.keep as usize;
    if let Some(c) = args.top_c {
        if c > keep {
            bail!("--top-c {c}: above --keep {keep}; hint: raise --keep");
        }
    }
    let inputs = Inputs::open(&args.acts, &args.suite, args.cache.model.as_deref(), &device)?;
    scae::note!("score-edges: pass: all connections (every edge's term is scored in the full pass)");
    let cfg = ScoreConfig {
        acts: args.acts.clone(),
        suite: args.suite.clone(),
        keep,
        top_c: args.top_c,
        embed: args.embed,
        unembed: args.unembed,
        limit: args.cache.limit(),
        batch_size: args.cache.batch_size as usize,
        options: args.pass.options(),
    };
    // Rank 0 writes; the other ranks only add their statistics.
    let stage =
        if coll.rank() == 0 { Some(StagedDir::create(&args.out, args.cache.overwrite, "--out")?) } else { None };
    let scored = scae::scores::run(&inputs, &cfg, stage.as_ref().map(|s| s.path()), &device, coll)?;
    let (Some(stage), Some(scored)) = (stage, scored) else { return Ok(()) };
    let out = stage.commit()?;
    scae::say!(
        "score-edges: {} tokens, {} edges kept{} -> {}",
        scored.n_tokens,
        scored.n_edges,
        scored.n_connections.map(|n| format!(", {n} connections (C={})", args.top_c.unwrap_or(0))).unwrap_or_default(),
        out.display()
    )?;
    Ok(())
}
