//! `evaluate`: run a suite's pruned pass over an activation cache and report CE with the suite
//! spliced in, FVU (two definitions), L0 and dead features per module (`eval.json`); or compare
//! earlier runs (`--compare`).

mod plot;
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use scae::eval::EvalConfig;
use scae::inputs::Inputs;
use scae::util::collective::Collective;
use scae::util::io::StagedDir;

/// Evaluate a suite (optionally with a connection set) on an activation cache.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  evaluate --acts acts/ --suite suite/ --connections edges/connections.parquet --out eval/\n\nWithout --connections every preceding feature is connected (the reference's connections=None)."
)]
struct Args {
    /// Activation cache folder (from collect-acts); required unless --compare.
    #[arg(long, required_unless_present = "compare")]
    acts: Option<PathBuf>,
    /// Suite folder (suite.safetensors + config.json) or a bare .safetensors; required unless
    /// --compare.
    #[arg(long, required_unless_present = "compare")]
    suite: Option<PathBuf>,
    /// Compare earlier runs (their --out folders): print a markdown table and write
    /// compare.md, compare.png and compare.svg (CE diff and mean FVU vs C) into --out
    /// (default: none; evaluate --suite on --acts).
    #[arg(long, num_args = 1.., conflicts_with_all = ["acts", "suite", "connections", "dump"])]
    compare: Vec<PathBuf>,
    /// Connection set: connections.parquet, the reference's .safetensors, .pkl or .pt, or `all`
    /// (every preceding feature). Default: the suite's stored connections if any, else all.
    #[arg(long)]
    connections: Option<PathBuf>,
    /// Output folder: eval.json (and features.safetensors with --dump).
    #[arg(long)]
    out: PathBuf,
    /// Also write every module's features `feats.<m> [n, ctx, F]` and reconstructions
    /// `recon.<m> [n, ctx, d_model]` to features.safetensors.
    #[arg(long)]
    dump: bool,
    #[command(flatten)]
    cache: scae::cli::CacheRunArgs,
    #[command(flatten)]
    pass: scae::cli::PassArgs,
    #[command(flatten)]
    common: scae::cli::Common,
}

fn main() -> ExitCode {
    // Under mpirun/srun -n N the batches are shared among the ranks (scae::eval::run).
    scae::cli::run_main_ranks("evaluate", |coll| run(scae::cli::parse_args::<Args>(), coll))
}

fn run(args: Args, coll: &dyn Collective) -> Result<()> {
    let model_path = args.cache.model.as_deref().map(Path::new);
    let mut inputs = vec![
        ("--acts", args.acts.as_deref()),
        ("--suite", args.suite.as_deref()),
        ("--connections", args.connections.as_deref()),
        ("--model", model_path),
    ];
    inputs.extend(args.compare.iter().map(|c| ("--compare", Some(c.as_path()))));
    scae::util::io::refuse_overlap(&args.out, "--out", &inputs)?;
    if !args.compare.is_empty() {
        scae::util::collective::require_one_process("evaluate --compare")?;
        let (text, runs) = report::compare(&args.compare, &args.out)?;
        plot::plot(&runs, &args.out.join("compare"))?;
        scae::cli::say(format_args!("{text}"))?;
        scae::say!("plot: {} and .svg", args.out.join("compare.png").display())?;
        return Ok(());
    }
    let (Some(acts), Some(suite)) = (args.acts.clone(), args.suite.clone()) else {
        anyhow::bail!("--acts and --suite are required (or --compare)");
    };
    let device = args.common.setup()?;
    let inputs = Inputs::open(&acts, &suite, args.cache.model.as_deref(), &device)?;
    let chosen = inputs.choose_connections(args.connections.as_deref(), "evaluate")?;
    let cfg = EvalConfig {
        acts,
        suite,
        connections: chosen.file.clone(),
        connections_meta: chosen.meta.clone(),
        connections_lineage: chosen.lineage.clone(),
        pass_description: chosen.pass.clone(),
        batch_size: args.cache.batch_size as usize,
        limit: args.cache.limit(),
        pass: args.pass.options(),
        dump: args.dump,
    };
    // On several ranks each evaluates its share of the batches; rank 0 writes.
    let stage =
        if coll.rank() == 0 { Some(StagedDir::create(&args.out, args.cache.overwrite, "--out")?) } else { None };
    let ev = scae::eval::run(&inputs, chosen.set.as_ref(), &cfg, &device, coll)?;
    let Some(stage) = stage else { return Ok(()) };
    ev.report.write(&stage.path().join("eval.json"))?;
    if args.dump {
        let path = stage.path().join("features.safetensors");
        let dump: HashMap<String, candle_core::Tensor> = ev.dump;
        let dump: Vec<_> = dump.into_iter().collect();
        scae::util::io::write_safetensors(&path, dump, &Default::default())?;
    }
    let out = stage.commit()?;
    let r = &ev.report;
    scae::say!("| module | FVU | FVU (ref) | L0 | never fired % |\n|---|---|---|---|---|")?;
    for module in &inputs.suite.modules {
        let m = &r.modules[&module.name()];
        scae::say!("| {module} | {:.4} | {:.4} | {:.1} | {:.1} |", m.fvu, m.fvu_ref, m.l0, 100.0 * m.dead_fraction)?;
    }
    scae::say!(
        "FVU: unexplained variance over all tokens; FVU (ref): the reference's training FVU (variance over a batch's \
         sequences per position, averaged over batches); never fired: no non-zero value on these tokens."
    )?;
    scae::say!(
        "clean CE {:.4}, CE with suite {:.4}, CE diff {:.4}, CE recovered {:.3} (zero-ablation CE {:.4}; {} {} tokens: {}) -> {}",
        r.clean_ce,
        r.ce,
        r.ce_diff,
        r.ce_recovered,
        r.ce_zero,
        r.n_tokens,
        r.tokens,
        r.tokens_note,
        out.display()
    )?;
    Ok(())
}
