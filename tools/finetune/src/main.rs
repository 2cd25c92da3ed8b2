//! `finetune`: train a suite through the pruned forward pass on local reconstruction (FVU),
//! downstream CE, or both, with checkpoints and bit-identical resume (the loop is
//! `scae::train::finetune`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use scae::inputs::Inputs;
use scae::train::finetune::{FinetuneConfig, Loss};
use scae::train::optim::OptimizerKind;

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
    /// Training loss.
    #[arg(long, value_enum, default_value = "mse")]
    loss: Loss,
    /// Weight of CE in `--loss mse+ce`.
    #[arg(long, default_value_t = 1.0, value_parser = scae::cli::non_negative_f64)]
    ce_weight: f64,
    /// Optimizer (Adam: betas 0.9, 0.999, eps 1e-8, as the reference).
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: OptimizerKind,
    /// Base learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = scae::cli::positive_f64)]
    lr: f64,
    /// Use --lr as is instead of the reference's lr / sqrt(F / 2^14).
    #[arg(long)]
    no_scale_lr: bool,
    /// Introduce module m's loss term only from step (2·layer + [0 attn, 1 mlp]) · N (default:
    /// every module from step 0).
    #[arg(long)]
    stagger_steps: Option<u64>,
    /// Build the autograd graph for this many sequences at a time (memory follows it; the
    /// gradient is still the whole batch's, at the cost of one extra forward pass). Default:
    /// the whole batch.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    micro_batch: Option<u64>,
    /// AuxK weight (mse losses): dead latents' largest pre-top-k activations reconstruct the
    /// residual (dead as of the previous step). 0 (the reference's default) reproduces it.
    #[arg(long, default_value_t = 0.0, value_parser = scae::cli::non_negative_f64)]
    auxk_alpha: f64,
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
    scae::cli::run_main("finetune", || run(scae::cli::parse_args::<Args>()))
}

fn run(args: Args) -> Result<()> {
    let device = args.common.setup()?;
    let model_path = args.model.as_deref().map(Path::new);
    let named = [
        ("--acts", args.acts.as_deref()),
        ("--suite", Some(args.suite.as_path())),
        ("--connections", args.connections.as_deref()),
        ("--model", model_path),
    ];
    scae::util::io::refuse_overlap(&args.out, "--out", &[&named[..], &args.data.paths()].concat())?;
    if args.auxk_alpha > 0.0 && args.loss == Loss::Ce {
        bail!("--auxk-alpha {}: only with an mse loss (the reference's CE-mode AuxK is a no-op)", args.auxk_alpha);
    }
    let use_engine = args.compute.use_engine(&device)?;
    if use_engine && args.micro_batch.is_some() {
        bail!("--micro-batch: only for the autograd backend (the CPU engine's memory is already small); hint: --backend autograd");
    }
    let inputs = match (&args.acts, &args.model) {
        (Some(acts), _) => Inputs::open(acts, &args.suite, args.model.as_deref(), &device)?,
        (None, Some(m)) => Inputs::open_streaming(m, &args.suite, &device)?,
        (None, None) => bail!("--data/--tokens need --model (the model to run)"),
    };
    let ctx_est = inputs.cache.as_ref().map_or(args.data.ctx_len as f64, |c| c.manifest.ctx_len as f64);
    let bytes = scae::train::finetune::footprint(&inputs, args.step.batch_size as f64, ctx_est);
    scae::util::mem::check_fits(bytes, &format!("--batch-size {}", args.step.batch_size))?;
    let tokenizer = if inputs.cache.is_none() { Some(inputs.model.tokenizer()?) } else { None };
    let seed = args.common.seed;
    let mut source = args.step.train_data(
        inputs.cache.as_ref(),
        Some(&inputs.model),
        tokenizer.as_ref(),
        &args.data,
        seed,
        &device,
    )?;
    let chosen = inputs.choose_connections(args.connections.as_deref(), "finetune")?;
    let conn_file = chosen.file.clone();
    if args.step.batch_size < 2 && args.loss != Loss::Ce {
        bail!("--batch-size 1: the reference's FVU needs a variance over at least 2 sequences");
    }
    let ctx = source.ctx_len();
    let steps = args.step.steps(ctx)?;
    let n_features = inputs.suite.n_features;
    let lr = if args.no_scale_lr { args.lr } else { scae::train::schedule::scaled_lr(args.lr, n_features) };
    let (run, step) = (&args.run, &args.step);
    // Every flag that changes the run, and the contents of its inputs: what --resume repeats.
    let files = [
        ("--acts", args.acts.as_deref()),
        ("--suite", Some(args.suite.as_path())),
        ("--connections", conn_file.as_deref()),
        ("--data", args.data.data.as_deref()),
        ("--tokens", args.data.tokens.as_deref()),
    ];
    let run_config = scae::formats::runconfig::RunConfig::new(&args, &files, steps)?;
    let trained_on = inputs.trained_on(
        "finetune",
        args.acts.as_deref(),
        args.data.spec(),
        args.data.options(),
        steps * step.batch_size,
    )?;
    let lineage =
        scae::formats::suite::Lineage::child(&inputs.suite, &args.suite, trained_on, inputs.connections_ref(&chosen))?;
    let cfg = FinetuneConfig {
        out: args.out.clone(),
        loss: args.loss,
        ce_weight: args.ce_weight,
        optimizer: args.optimizer,
        batch_size: step.batch_size as usize,
        micro_batch: args.micro_batch.map(|m| m as usize),
        schedule: run.schedule(steps, lr)?,
        stagger_steps: args.stagger_steps,
        auxk_alpha: args.auxk_alpha,
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
        lineage,
        connections_meta: chosen.meta.clone(),
        connections_source: chosen.file.clone(),
    };
    let done = scae::train::finetune::run(&inputs, &mut source, chosen.set.as_ref(), &cfg, &device)?;
    if !done.halted {
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
