//! `finetune`: train a suite through the pruned forward pass on local reconstruction (FVU),
//! downstream CE, or both, with checkpoints and bit-identical resume (the loop is
//! `scae::train::finetune`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use scae::inputs::Inputs;
use scae::train::finetune::FinetuneConfig;

/// Finetune a suite through the pruned pass.
#[derive(Debug, Parser, serde::Serialize)]
#[command(
    version,
    after_help = "Example:\n  finetune --acts acts/ --suite suite/ --connections edges/connections.parquet \\\n      --loss mse --steps 1000 --batch-size 16 --checkpoint-every 100 --out ft/\n\nResume an interrupted run with the same arguments plus --resume."
)]
struct Args {
    /// Activation cache folder (from collect-acts); required unless streaming: --model with
    /// --data/--tokens.
    #[arg(long, required_unless_present_any = ["data", "tokens"], conflicts_with_all = ["data", "tokens"])]
    acts: Option<PathBuf>,
    /// Suite to start from (folder or bare .safetensors).
    #[arg(long)]
    suite: PathBuf,
    /// Connection set: .parquet, the reference's .safetensors, .pkl or .pt, or `all` (every
    /// preceding feature). Default: the suite's stored connections if it has them, else all.
    #[arg(long)]
    connections: Option<PathBuf>,
    /// Output folder: suite.safetensors, config.json, connections.parquet (the connections it
    /// was trained with), metrics.jsonl, checkpoint/.
    #[arg(long)]
    #[serde(skip)]
    out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    ft: scae::cli::FinetuneArgs,
    #[command(flatten)]
    #[serde(flatten)]
    step: scae::cli::StepArgs,
    #[command(flatten)]
    #[serde(flatten)]
    compute: scae::cli::ComputeArgs,
    /// Model folder or hub id: with --acts, overrides the one recorded in the cache manifest;
    /// with --data/--tokens, the model whose activations are computed on the fly (default: the
    /// cache's model).
    #[arg(long)]
    model: Option<String>,
    /// Streaming mode: compute activations batch by batch instead of reading --acts.
    #[command(flatten)]
    #[serde(flatten)]
    data: scae::cli::DataArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pass: scae::cli::PassArgs,
    #[command(flatten)]
    #[serde(flatten)]
    run: scae::cli::RunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    common: scae::cli::Common,
}

fn main() -> ExitCode {
    // Under mpirun/srun -n N: data-parallel over the N ranks (scae::train::finetune::run).
    scae::cli::run_main_ranks("finetune", |coll| run(scae::cli::parse_args::<Args>(), coll))
}

fn run(args: Args, coll: &dyn scae::util::collective::Collective) -> Result<()> {
    let device = args.common.setup()?;
    let named = [
        ("--acts", args.acts.as_deref()),
        ("--suite", Some(args.suite.as_path())),
        ("--connections", args.connections.as_deref()),
        ("--model", args.model.as_deref().map(Path::new)),
    ];
    scae::util::io::refuse_overlap(&args.out, "--out", &[&named[..], &args.data.paths()].concat())?;
    let (ft, step, run) = (&args.ft, &args.step, &args.run);
    let use_engine = args.compute.use_engine(&device)?;
    ft.check(use_engine, step.batch_size)?;
    let mut inputs = Inputs::open_for(args.acts.as_deref(), args.model.as_deref(), &args.suite, &device)?;
    let ctx_est = inputs.cache.as_ref().map_or(args.data.ctx_len as f64, |c| c.manifest.ctx_len as f64);
    let bytes = scae::train::finetune::footprint(&inputs, step.batch_size as f64, ctx_est);
    scae::util::mem::check_fits(bytes, &format!("--batch-size {}", step.batch_size))?;
    let tokenizer = if inputs.cache.is_none() { Some(inputs.model.tokenizer()?) } else { None };
    let (cache, model) = (inputs.cache.as_ref(), Some(&inputs.model));
    let mut source = step.train_data(cache, model, tokenizer.as_ref(), &args.data, args.common.seed, &device)?;
    let chosen = inputs.choose_connections(args.connections.as_deref(), "finetune")?;
    let steps = step.steps(source.ctx_len())?;
    let n_features = inputs.suite.n_features;
    let lr = if ft.no_scale_lr { ft.lr } else { scae::train::schedule::scaled_lr(ft.lr, n_features) };
    // Every flag that changes the run, and the contents of its inputs: what --resume repeats.
    let files = [
        ("--acts", args.acts.as_deref()),
        ("--suite", Some(args.suite.as_path())),
        ("--connections", chosen.file.as_deref()),
        ("--data", args.data.data.as_deref()),
        ("--tokens", args.data.tokens.as_deref()),
    ];
    let run_config = scae::formats::runconfig::RunConfig::new(&args, &files, steps)?;
    let seqs = steps * step.batch_size;
    let trained_on =
        inputs.trained_on("finetune", args.acts.as_deref(), args.data.spec(), args.data.options(), seqs)?;
    let cfg = FinetuneConfig {
        out: args.out.clone(),
        loss: ft.loss,
        ce_weight: ft.ce_weight,
        optimizer: ft.optimizer,
        batch_size: step.batch_size as usize,
        micro_batch: ft.micro_batch.map(|m| m as usize),
        schedule: run.schedule(steps, lr)?,
        stagger_steps: ft.stagger_steps,
        auxk_alpha: ft.auxk_alpha,
        dead_threshold: step.dead_threshold,
        use_engine,
        dtype: args.compute.dtype(),
        pass: args.pass.options(),
        checkpoints: run.checkpoints(),
        overwrite: run.overwrite,
        created_by: format!("finetune {}", env!("CARGO_PKG_VERSION")),
        args: serde_json::json!({
            "argv": std::env::args().collect::<Vec<_>>(), "steps": steps, "lr_applied": lr, "run": &run_config,
        }),
        run: run_config,
        lineage: inputs.child_lineage(trained_on, &chosen)?,
    };
    let done = scae::train::finetune::run(&inputs.model, &mut inputs.suite, &mut source, &chosen, &cfg, &device, coll)?;
    if !done.halted && coll.rank() == 0 {
        scae::say!("{}", scae::train::summary_line("finetune", &done, &args.out))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag enters the run's configuration (what --resume compares, flag by flag) except
    /// the few that cannot change the result; a new flag enters by default.
    #[test]
    fn the_run_config_holds_every_flag_that_can_change_the_run() {
        let args = Args::parse_from(["finetune", "--acts", "a", "--suite", "s", "--out", "o", "--steps", "1"]);
        let bad = scae::cli::run_config_mismatches(&Args::command(), &args);
        assert!(bad.is_empty(), "{bad:?}");
        assert!(Args::command().get_arguments().count() > 20);
    }
}
