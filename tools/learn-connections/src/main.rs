//! `learn-connections`: learn each feature's C connections among the candidate edges of an
//! edges file with hard-concrete gates trained through the pruned pass (the loop is
//! `scae::train::learn`), then write the top-C by gate as `connections.parquet`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use scae::inputs::Inputs;
use scae::train::finetune::Loss;
use scae::train::gates::{GateInit, GateMode};
use scae::train::learn::{Beta, LearnConfig};

/// Learn connections: gates on candidate edges, trained through the pruned pass.
#[derive(Debug, Parser, serde::Serialize)]
#[command(
    version,
    after_help = "Example:\n  learn-connections --acts acts/ --suite suite/ --edges edges/edges.parquet --c 16 \\\n      --steps 200 --batch-size 16 --out learned/\n  then finetune --connections learned/connections.parquet as with any connections.\n\nLoss: the modules' FVU summed (and/or the spliced CE), plus lambda * mean over features of\n(expected open gates - C)^2."
)]
struct Args {
    /// Activation cache folder (from collect-acts).
    #[arg(long)]
    acts: PathBuf,
    /// Suite (folder or bare .safetensors).
    #[arg(long)]
    suite: PathBuf,
    /// Candidate edges: edges.parquet from score-edges (its `keep` per feature; embed candidates
    /// too when it has them, unembed candidates with a CE term in the loss).
    #[arg(long)]
    edges: PathBuf,
    /// Connections to keep per feature (the target of the expected-L0 penalty).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    c: u64,
    /// Connections to keep per output token among its unembed candidates (default: C).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    unembed_c: Option<u64>,
    /// Loss: mse (the modules' FVU), ce (the spliced CE; learns unembed candidates too) or mse+ce.
    #[arg(long, value_enum, default_value = "mse")]
    loss: Loss,
    /// Weight of CE in --loss mse+ce.
    #[arg(long, default_value_t = 1.0, value_parser = scae::cli::non_negative_f64)]
    ce_weight: f64,
    /// Weight of the penalty mean_i (expected open gates of feature i - min(C, its candidates))^2.
    #[arg(long, default_value_t = 0.01, value_parser = scae::cli::non_negative_f64)]
    lambda: f64,
    /// Temperature: `reference` (max(0.1, 2 (1 - step/steps))) or a constant.
    #[arg(long, default_value = "reference")]
    beta: String,
    /// How log alpha starts: zero (N(0, 0.01), the reference) or scores (+1 for each feature's
    /// top-C candidates by score, -1 for the others).
    #[arg(long, value_enum, default_value = "zero")]
    init: GateInit,
    /// Gates in the forward pass: hard (0/1, straight-through) or relaxed.
    #[arg(long, value_enum, default_value = "hard")]
    gates: GateMode,
    /// Train only the gates (default: the suite too, jointly).
    #[arg(long)]
    freeze_suite: bool,
    /// Step implementation: auto (the CPU engine on the CPU, autograd on a GPU), engine, autograd.
    #[arg(long, value_enum, default_value = "auto")]
    backend: scae::cli::Backend,
    /// Adam learning rate of log alpha.
    #[arg(long, default_value_t = 0.05, value_parser = scae::cli::positive_f64)]
    gate_lr: f64,
    /// Learning rate of the suite when trained jointly (scaled as finetune's unless --no-scale-lr).
    #[arg(long, default_value_t = 1e-4, value_parser = scae::cli::positive_f64)]
    lr: f64,
    /// Use --lr as is instead of the reference's lr / sqrt(F / 2^14).
    #[arg(long)]
    no_scale_lr: bool,
    /// Output folder: connections.parquet (with a `gate` column: log alpha), gates.safetensors,
    /// metrics.jsonl, checkpoint/ (and the suite when trained jointly).
    #[arg(long)]
    #[serde(skip)]
    out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    step: scae::cli::StepArgs,
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
    scae::cli::run_main("learn-connections", || run(scae::cli::parse_args::<Args>()))
}

fn run(args: Args) -> Result<()> {
    scae::util::collective::require_one_process("learn-connections")?;
    let files = [
        ("--acts", Some(args.acts.as_path())),
        ("--suite", Some(args.suite.as_path())),
        ("--edges", Some(args.edges.as_path())),
    ];
    scae::util::io::refuse_overlap(&args.out, "--out", &files)?;
    let beta = Beta::parse(&args.beta)?;
    let device = args.common.setup()?;
    if args.step.batch_size < 2 {
        anyhow::bail!("--batch-size 1: the reference's FVU needs a variance over at least 2 sequences");
    }
    let inputs = Inputs::open(&args.acts, &args.suite, None, &device)?;
    let cands = scae::train::learn::candidates(&inputs, &args.edges, args.loss != Loss::Mse)?;
    let (batch, seed) = (args.step.batch_size as usize, args.common.seed);
    let mut data = scae::train::learn::train_data(&inputs, batch, args.step.shuffle, seed, &device)?;
    let steps = args.step.steps(data.ctx_len())?;
    let lr =
        if args.no_scale_lr { args.lr } else { scae::train::schedule::scaled_lr(args.lr, inputs.suite.n_features) };
    let run_config = scae::formats::runconfig::RunConfig::new(&args, &files, steps)?;
    let cfg = LearnConfig {
        out: args.out.clone(),
        edges: args.edges.clone(),
        c: args.c as usize,
        unembed_c: args.unembed_c.unwrap_or(args.c) as usize,
        loss: args.loss,
        ce_weight: args.ce_weight,
        lambda: args.lambda,
        beta,
        init: args.init,
        mode: args.gates,
        freeze_suite: args.freeze_suite,
        use_engine: args.backend.use_engine(&device, scae::cli::ComputeDType::F32)?,
        gate_lr: args.gate_lr,
        schedule: args.run.schedule(steps, lr)?,
        batch_size: batch,
        seed,
        pass: args.pass.options(),
        checkpoints: args.run.checkpoints(),
        overwrite: args.run.overwrite,
        created_by: format!("learn-connections {}", env!("CARGO_PKG_VERSION")),
        args: serde_json::json!({"argv": std::env::args().collect::<Vec<_>>(), "steps": steps, "lr_applied": lr, "run": &run_config}),
        run: run_config,
    };
    let done = scae::train::learn::run(&inputs, &mut data, &cands, &cfg, &device)?;
    let path: &Path = &args.out.join("connections.parquet");
    if !done.halted {
        scae::say!("{} -> {}", scae::train::summary_line("learn-connections", &done, &args.out), path.display())?;
    }
    Ok(())
}
