//! `score-edges`: average signed contribution of every upstream feature to every downstream
//! feature under the suite's full pass, written as `edges.parquet` (top M per feature) and,
//! with `--top-c`, `connections.parquet` (top C per feature across all upstream modules).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use scae::formats::connections::{Connections, EDGES_FORMAT, FORMAT};
use scae::formats::scores::ScoresSummary;
use scae::inputs::Inputs;
use scae::pass::{Plan, ValuePass, Wiring};
use scae::scores::{select_top_c, ScoreStats};
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
    scae::cli::run_main("score-edges", || run(scae::cli::parse_args::<Args>()))
}

fn run(args: Args) -> Result<()> {
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
    let suite = &inputs.suite;
    let rt = &inputs.model.runtime;
    let parallel = inputs.parallel();
    let plan = Plan::new(suite, Wiring::All, parallel, &device)?;
    scae::note!("score-edges: pass: all connections (every edge's term is scored in the full pass)");
    let stage = StagedDir::create(&args.out, args.cache.overwrite, "--out")?;
    let pass = ValuePass::new(suite, rt, &plan, args.pass.options(), &device)?;
    let mut stats = ScoreStats::new(suite, rt.cfg.n_heads, parallel);
    if args.embed {
        stats = stats.with_embed(rt.cfg.d_vocab);
    }
    if args.unembed {
        stats = stats.with_unembed(rt.cfg.ln_eps);
    }
    let limit = args.cache.limit();
    let ctx = inputs.cache().manifest.ctx_len;
    let total = limit.unwrap_or(inputs.cache().manifest.n_seqs).min(inputs.cache().manifest.n_seqs);
    let mut bar = scae::util::token_bar(Some((total * ctx) as u64), "score-edges");
    let n_seqs = inputs.cache().for_each_batch(args.cache.batch_size as usize, limit, &device, |batch| {
        let out = pass.run(&batch)?;
        stats.accumulate(suite, &batch, &out)?;
        bar.inc(batch.tokens.elem_count() as u64);
        Ok(())
    })?;
    bar.finish();
    let mut edges = Connections::empty(&suite.modules, suite.n_features);
    for d in 0..suite.modules.len() {
        for (i, pooled) in stats.top_edges(suite, rt, d, keep)?.into_iter().enumerate() {
            edges.set_pooled(d, i, pooled);
        }
    }
    edges.unembed = stats.top_unembed_edges(suite, rt, keep)?;
    // Scores that overflowed f32 (a suite of huge finite weights) would rank as garbage.
    if let Some((d, i)) = edges
        .edges
        .iter()
        .enumerate()
        .find_map(|(d, fs)| fs.iter().position(|es| es.iter().any(|e| !e.score.is_finite())).map(|i| (d, i)))
    {
        bail!(
            "{}: edge scores of feature {}:{i} are not finite (the suite's weights or the cached activations overflow f32)",
            args.suite.display(),
            suite.modules[d].name()
        );
    }
    let meta = vec![
        ("parallel_attn_mlp", parallel.to_string()),
        ("n_tokens", stats.n_tokens.to_string()),
        ("keep", keep.to_string()),
        ("acts", args.acts.display().to_string()),
        ("suite", args.suite.display().to_string()),
        ("suite_id", suite.id()?),
        ("consistent_attn_bias", args.pass.consistent_attn_bias.to_string()),
        ("embed", args.embed.to_string()),
        ("unembed", args.unembed.to_string()),
    ];
    edges.write_parquet(&stage.path().join("edges.parquet"), EDGES_FORMAT, &meta)?;
    let mut n_conn = None;
    if let Some(c) = args.top_c {
        let conns = select_top_c(&edges, c, None);
        let mut m = meta.clone();
        m.push(("c", c.to_string()));
        conns.write_parquet(&stage.path().join("connections.parquet"), FORMAT, &m)?;
        n_conn = Some(conns.n_edges() + conns.n_embed_edges());
    }
    let summary = ScoresSummary {
        format: scae::formats::scores::FORMAT.into(),
        version: scae::formats::scores::VERSION,
        n_seqs,
        n_tokens: stats.n_tokens,
        keep,
        top_c: args.top_c,
        n_edges: edges.n_edges() + edges.n_embed_edges() + edges.n_unembed_edges(),
        n_connections: n_conn,
        normalization: "mean over tokens of the edge's signed term in the downstream pre-activation".into(),
        tie_order: "|score| descending, then upstream module (suite order), then upstream feature".into(),
        acts: args.acts.clone(),
        suite: args.suite.clone(),
    };
    summary.write(&stage.path().join("scores.json"))?;
    let out = stage.commit()?;
    scae::say!(
        "score-edges: {} tokens, {} edges kept{} -> {}",
        stats.n_tokens,
        edges.n_edges() + edges.n_embed_edges() + edges.n_unembed_edges(),
        n_conn.map(|n| format!(", {n} connections (C={})", args.top_c.unwrap_or(0))).unwrap_or_default(),
        out.display()
    )?;
    Ok(())
}
