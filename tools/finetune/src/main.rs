//! `finetune`: train a suite through the pruned forward pass (SPEC §6) on local reconstruction
//! (FVU), downstream CE, or both, with checkpoints and bit-identical resume.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use scae::devtrain::{DeviceOptimizer, LossSpec};
use scae::engine::{self, Engine, FlatBatch};
use scae::inputs::Inputs;
use scae::pruned::{Plan, Wiring};
use scae::stream::TrainData;
use scae::suite::Kind;
use scae::train::{self, DeadTracker, Optimizer, OptimizerKind, Params};

/// Which loss to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Loss {
    /// Σ over modules of the reference's FVU (batch-axis variance).
    Mse,
    /// Next-token CE with the suite spliced in.
    Ce,
    /// mse + ce_weight · ce.
    #[value(name = "mse+ce")]
    MseCe,
}

/// Finetune a suite through the pruned pass.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  finetune --acts acts/ --suite suite/ --connections edges/connections.parquet \\\n      --loss mse --steps 1000 --batch-size 16 --checkpoint-every 100 --out ft/\n\nResume an interrupted run with the same arguments plus --resume."
)]
struct Args {
    /// Activation cache folder (from collect-acts). Or stream: --model with --data/--tokens.
    #[arg(long, required_unless_present_any = ["data", "tokens"])]
    acts: Option<PathBuf>,
    /// Suite to start from (folder or bare .safetensors).
    #[arg(long)]
    suite: PathBuf,
    /// Connection set (.parquet or the reference's .safetensors); none = all connections.
    #[arg(long)]
    connections: Option<PathBuf>,
    /// Output folder: suite.safetensors, config.json, metrics.jsonl, checkpoint/.
    #[arg(long)]
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
    /// Introduce module m's loss term only from step (2·layer + [0 attn, 1 mlp]) · N.
    #[arg(long)]
    stagger_steps: Option<u64>,
    /// Sequences per step.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Build the autograd graph for this many sequences at a time (memory follows it; the
    /// gradient is still the whole batch's, at the cost of one extra forward pass). Default:
    /// the whole batch.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    micro_batch: Option<u64>,
    /// Number of steps.
    #[arg(long, conflicts_with = "tokens", value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Train on this many tokens (steps = tokens / (batch_size · ctx_len)).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    tokens: Option<u64>,
    /// Shuffle sequences within each cache shard every epoch (default: cache order, as the
    /// reference).
    #[arg(long)]
    shuffle: bool,
    /// AuxK weight (mse losses): dead latents' largest pre-top-k activations reconstruct the
    /// residual (dead as of the previous step). 0 (the reference's default) reproduces it.
    #[arg(long, default_value_t = 0.0, value_parser = scae::cli::non_negative_f64)]
    auxk_alpha: f64,
    /// A feature is dead after this many tokens without a non-zero value.
    #[arg(long, default_value_t = 10_000_000)]
    dead_threshold: u64,
    #[command(flatten)]
    compute: scae::cli::ComputeArgs,
    /// Model folder or hub id: with --acts, overrides the one recorded in the cache manifest;
    /// with --data/--tokens, the model whose activations are computed on the fly.
    #[arg(long)]
    model: Option<String>,
    /// Streaming mode: compute activations batch by batch instead of reading --acts.
    #[command(flatten)]
    data: scae::cli::DataArgs,
    #[command(flatten)]
    pass: scae::cli::PassArgs,
    #[command(flatten)]
    run: scae::cli::RunArgs,
    #[command(flatten)]
    common: scae::cli::Common,
}

fn main() -> ExitCode {
    scae::cli::run_main("finetune", || run(Args::parse()))
}

fn stagger_scale(kind: Kind, layer: usize, step: u64, stagger: Option<u64>) -> f32 {
    match stagger {
        Some(n) if step < (2 * layer as u64 + u64::from(kind == Kind::Mlp)) * n => 0.0,
        _ => 1.0,
    }
}

fn run(args: Args) -> Result<()> {
    let device = args.common.setup()?;
    if args.auxk_alpha < 0.0 || (args.auxk_alpha > 0.0 && args.loss == Loss::Ce) {
        bail!(
            "--auxk-alpha {}: expected >= 0, and only with an mse loss (the reference's CE-mode AuxK is a no-op)",
            args.auxk_alpha
        );
    }
    let use_engine = args.compute.use_engine(&device)?;
    if use_engine && args.micro_batch.is_some() {
        bail!("--micro-batch: only for the autograd backend (the CPU engine's memory is already small); hint: --backend autograd");
    }
    let pass_dtype = args.compute.dtype();
    let clip = args.run.clip()?;
    let inputs = match (&args.acts, &args.model) {
        (Some(acts), _) => Inputs::open(acts, &args.suite, args.model.as_deref(), &device)?,
        (None, Some(m)) => Inputs::open_streaming(m, &args.suite, &device)?,
        (None, None) => bail!("--data/--tokens need --model (the model to run)"),
    };
    let tokenizer = if inputs.cache.is_none() { Some(inputs.model.tokenizer()?) } else { None };
    let mut source = match (&inputs.cache, &tokenizer) {
        (Some(c), _) => TrainData::from_cache(c, args.shuffle, args.common.seed, &device),
        (None, Some(tok)) => {
            let spec = args.data.spec().context("--data or --tokens is required without --acts")?;
            if args.shuffle {
                bail!("--shuffle: streaming reads the data in file order; shuffle the file instead");
            }
            TrainData::streaming(&inputs.model, tok, spec, args.data.options(), &device)?
        }
        (None, None) => unreachable!("a tokenizer exists without a cache"),
    };
    let conns = args.connections.as_ref().map(|p| inputs.connections(p)).transpose()?;
    let suite = &inputs.suite;
    let rt = &inputs.model.runtime;
    let batch_size = args.batch_size as usize;
    if let Some(c) = &inputs.cache {
        if batch_size > c.manifest.n_seqs {
            bail!("--batch-size {batch_size}: the cache {} has only {} sequences", c.dir.display(), c.manifest.n_seqs);
        }
    }
    let ctx = source.ctx_len();
    if batch_size < 2 && args.loss != Loss::Ce {
        bail!("--batch-size 1: the reference's FVU needs a variance over at least 2 sequences");
    }
    let steps = match (args.steps, args.tokens) {
        (Some(s), _) => s,
        (None, Some(t)) => (t / (args.batch_size * ctx as u64)).max(1),
        (None, None) => bail!("one of --steps or --tokens is required"),
    };
    let lr = if args.no_scale_lr { args.lr } else { train::scaled_lr(args.lr, suite.n_features) };
    let wiring = match &conns {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let mut plan = Plan::new(suite, wiring, inputs.parallel(), &device)?;
    if !use_engine {
        // The device-agnostic ops everywhere: on the CPU this runs exactly the GPU path's ops
        // (and deterministically, unlike the CPU custom ops' parallel backward).
        plan.force_composed(true);
    }
    let mut digest_args = serde_json::json!({
        "acts": args.acts, "data": args.data.data, "tokens": args.data.tokens, "ctx_len": ctx, "suite": args.suite, "connections": args.connections, "loss": format!("{:?}", args.loss),
        "ce_weight": args.ce_weight, "optimizer": format!("{:?}", args.optimizer), "lr": args.lr, "no_scale_lr": args.no_scale_lr,
        "warmup": args.run.warmup, "decay_start": args.run.decay_start, "clip": args.run.clip_grad, "stagger": args.stagger_steps,
        "batch_size": args.batch_size, "steps": steps, "shuffle": args.shuffle, "seed": args.common.seed,
        "dead_threshold": args.dead_threshold, "consistent_attn_bias": args.pass.consistent_attn_bias,
    });
    args.compute.add_to_digest(&mut digest_args);
    let digest = train::digest(&digest_args);

    let run_dir = train::prepare_run_dir(&args.out, args.run.resume, args.run.overwrite)?;

    let mut params = Params::from_suite(suite)?;
    let mut opt = Optimizer::new(args.optimizer, &params);
    let mut dead = DeadTracker::new(suite.modules.len(), suite.n_features, args.dead_threshold);
    let (mut step, mut seqs_seen) = (0u64, 0u64);
    let metrics_path = args.out.join("metrics.jsonl");
    if args.run.resume {
        let st = train::load_checkpoint(&args.out, suite, &mut opt, &mut dead, "finetune", &digest)?;
        params = Params::from_suite(suite)?;
        step = st.step;
        seqs_seen = st.seqs_seen;
        train::trim_metrics(&metrics_path, step)?;
        eprintln!("finetune: resuming at step {step} of {steps}");
    }
    let vars = scae::devtrain::module_vars(suite);
    let mut dopt = if use_engine { None } else { Some(DeviceOptimizer::from_host(&opt, &vars)?) };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| metrics_path.display().to_string())?;
    let bar = scae::cli::token_bar(Some(steps * (batch_size * ctx) as u64), "finetuning");
    bar.set_position(step * (batch_size * ctx) as u64);
    let start_time = Instant::now();
    let start_step = step;
    let mut ckpt = train::Checkpoints::new(run_dir, "finetune", digest, &args.run, step);
    while step < steps {
        // Next batch in data order (wrapping over epochs).
        let batch = source.batch(seqs_seen, batch_size)?;
        let scales: Vec<f32> =
            suite.modules.iter().map(|m| stagger_scale(m.kind, m.layer, step, args.stagger_steps)).collect();
        let n_tok = (batch_size * ctx) as u64;
        let mut record = serde_json::Map::new();
        let ce_weight = match args.loss {
            Loss::Mse => None,
            Loss::Ce => Some(1.0),
            Loss::MseCe => Some(args.ce_weight),
        };
        let lr_t = lr * train::lr_factor(step, steps, args.run.warmup, args.run.decay_start);
        let check = |loss: f64| -> Result<()> {
            if !loss.is_finite() {
                bail!(ckpt.non_finite(step, loss));
            }
            Ok(())
        };
        let fvu_record = |fvus: &[f64]| -> serde_json::Value {
            suite
                .modules
                .iter()
                .zip(fvus)
                .map(|(m, f)| (m.name(), serde_json::json!(f)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        // AuxK's latents: dead as of the previous step, in modules whose loss term is on.
        let dead_masks = || -> Vec<Vec<bool>> {
            (0..suite.modules.len())
                .map(|m| if scales[m] != 0.0 { dead.dead(m) } else { vec![false; suite.n_features] })
                .collect()
        };
        // (loss, per-module FVU, per-module AuxK, CE) of the step, by either backend.
        let (loss, fvus, auxks, ce) = if let Some(dopt) = dopt.as_mut() {
            let pass_batch = batch.with_pass_dtype(pass_dtype)?;
            let auxk = (args.auxk_alpha > 0.0).then(|| (args.auxk_alpha, dead_masks()));
            let spec = LossSpec { fvu_scales: (args.loss != Loss::Ce).then(|| scales.clone()), ce_weight, auxk };
            let (values, mut grads) = scae::devtrain::finetune_grads(
                suite,
                rt,
                &plan,
                &pass_batch,
                args.pass.options(),
                &spec,
                args.micro_batch.map(|m| m as usize),
            )?;
            for (m, fired) in values.fired.iter().enumerate() {
                if scales[m] != 0.0 {
                    dead.update_fired(m, n_tok, fired);
                }
            }
            check(values.loss)?;
            if let Some(c) = clip {
                for g in grads.iter_mut() {
                    scae::devtrain::clip_module(g, c)?;
                }
            }
            dopt.step(&vars, &grads, lr_t)?;
            (values.loss, values.fvu, values.auxk, values.ce)
        } else {
            let fb = FlatBatch::new(&batch, suite)?;
            let eng = Engine::new(suite, rt, &plan, args.pass.options())?;
            let mut state = if args.auxk_alpha > 0.0 {
                eng.forward_with_dead(&fb, Some(&dead_masks()))?
            } else {
                eng.forward(&fb)?
            };
            for (m, st) in state.modules.iter().enumerate() {
                if scales[m] != 0.0 {
                    dead.update(m, n_tok, &st.idx, &st.val);
                }
            }
            let d = suite.d_model;
            let (mut loss, mut fvu_vals, mut auxk_vals, mut ce_val) = (0f64, None, None, None);
            let mut g_recon: Vec<Vec<f32>> = vec![vec![0f32; fb.b * fb.s * d]; suite.modules.len()];
            if args.loss != Loss::Ce {
                let (fvus, grads) = engine::mse_per_module(&fb, &state, d);
                for (m, (fvu, g)) in fvus.iter().zip(grads).enumerate() {
                    loss += scales[m] as f64 * fvu;
                    g_recon[m].iter_mut().zip(&g).for_each(|(a, b)| *a += scales[m] * b);
                }
                fvu_vals = Some(fvus);
                if args.auxk_alpha > 0.0 {
                    let aux = eng.auxk_loss_and_grad(&fb, &mut state, args.auxk_alpha);
                    loss += args.auxk_alpha * aux.iter().sum::<f64>();
                    auxk_vals = Some(aux);
                }
            }
            if let Some(w) = ce_weight {
                let (ce, g) = engine::ce_loss_and_grad(rt, &fb, &state, d)?;
                loss += w * ce;
                for gr in g_recon.iter_mut() {
                    gr.iter_mut().zip(&g[0]).for_each(|(a, b)| *a += w as f32 * b);
                }
                ce_val = Some(ce);
            }
            check(loss)?;
            let grads = eng.backward(&fb, &state, g_recon)?;
            let mut grads = train::grads_layout(grads);
            if let Some(c) = clip {
                grads.iter_mut().for_each(|g| train::clip_module(g, c));
            }
            opt.step(&mut params, &grads, lr_t);
            params.store(suite)?;
            (loss, fvu_vals, auxk_vals, ce_val)
        };
        if let Some(f) = &fvus {
            record.insert("fvu".into(), fvu_record(f));
        }
        if let Some(a) = &auxks {
            record.insert("auxk".into(), fvu_record(a));
        }
        if let Some(ce) = ce {
            let clean = rt.forward(&batch.tokens, false, false)?.ce.mean_all()?.to_scalar::<f32>()? as f64;
            record.insert("ce".into(), serde_json::json!(ce));
            record.insert("ce_diff".into(), serde_json::json!(ce - clean));
        }
        step += 1;
        seqs_seen += batch_size as u64;
        let dead_counts: serde_json::Map<String, serde_json::Value> = suite
            .modules
            .iter()
            .enumerate()
            .map(|(m, name)| (name.name(), serde_json::json!(dead.n_dead(m))))
            .collect();
        record.insert("step".into(), serde_json::json!(step - 1));
        record.insert("loss".into(), serde_json::json!(loss));
        record.insert("lr".into(), serde_json::json!(lr_t));
        record.insert("dead".into(), dead_counts.into());
        writeln!(metrics, "{}", serde_json::Value::Object(record))?;
        bar.inc(n_tok);
        bar.set_message(format!("loss {loss:.4}"));
        let due = ckpt.due(step, steps);
        if due.save {
            metrics.flush()?;
            if let Some(d) = &dopt {
                opt = d.to_host()?;
            }
            ckpt.save(suite, &opt, &dead, step, seqs_seen)?;
        }
        if due.halt {
            bar.finish_and_clear();
            ckpt.report_halt(step);
            return Ok(());
        }
    }
    bar.finish_and_clear();
    metrics.flush()?;
    let cli: Vec<String> = std::env::args().collect();
    let mut out_suite = suite.clone();
    out_suite.model_id = Some(inputs.model.id.clone());
    out_suite.model_hash = Some(inputs.model.hash.clone());
    out_suite.save(
        &args.out,
        &format!("finetune {}", env!("CARGO_PKG_VERSION")),
        serde_json::json!({"argv": cli, "steps": steps, "lr": lr}),
    )?;
    ckpt.finish();
    let secs = start_time.elapsed().as_secs_f64();
    let done = (step - start_step) * (batch_size * ctx) as u64;
    println!("finetune: {steps} steps -> {} ({:.0} tokens/s)", args.out.display(), done as f64 / secs.max(1e-9));
    Ok(())
}
