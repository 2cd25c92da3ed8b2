//! `train-suite`: pretrain a suite with standard TopK training (SPEC §8): every module from
//! one pass over an activation cache — `attn_L` an SAE on `hook_attn_out`, `mlp_L` a
//! transcoder `ln2.hook_normalized -> hook_mlp_out`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use clap::Parser;
use scae::cache::Cache;
use scae::devtrain::DeviceOptimizer;
use scae::engine::to_vec;
use scae::model::Model;
use scae::sae::{self, SplitMix, UpdateConfig};
use scae::stream::TrainData;
use scae::suite::{Kind, Module};
use scae::train::{self, DeadTracker, Optimizer, OptimizerKind, Params};

/// Pretrain a TopK suite on an activation cache.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  train-suite --acts acts/ --expansion 4 --k 32 --steps 2000 --batch-size 16 --out suite/\n\nlr = --lr / sqrt(F / 2^14), Adam, linear decay from --decay-start, per-module clipping,\nunit-norm decoder columns, b_dec = geometric median of the first batch, AuxK on dead latents."
)]
struct Args {
    /// Activation cache folder (from collect-acts). Or stream: --model with --data/--tokens.
    #[arg(long, required_unless_present_any = ["data", "tokens"])]
    acts: Option<PathBuf>,
    /// Streaming mode: the model whose activations are computed batch by batch.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    data: scae::cli::DataArgs,
    /// Output folder: suite.safetensors, config.json, metrics.jsonl, checkpoint/.
    #[arg(long)]
    out: PathBuf,
    /// Features per module = expansion × d_model.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    expansion: u64,
    /// Active features per token.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    k: u64,
    /// Base learning rate (scaled by 1/sqrt(F / 2^14)).
    #[arg(long, default_value_t = 2e-4, value_parser = scae::cli::positive_f64)]
    lr: f64,
    /// Number of steps.
    #[arg(long, conflicts_with = "tokens", value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Train on this many tokens (steps = tokens / (batch_size · ctx_len)).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    tokens: Option<u64>,
    /// Sequences per step.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// AuxK weight (0 disables it).
    #[arg(long, default_value_t = 1.0 / 32.0, value_parser = scae::cli::non_negative_f64)]
    auxk_alpha: f64,
    /// A latent is dead after this many tokens without a non-zero value.
    #[arg(long, default_value_t = 10_000_000)]
    dead_threshold: u64,
    /// Shuffle sequences within each cache shard every epoch.
    #[arg(long)]
    shuffle: bool,
    #[command(flatten)]
    compute: scae::cli::ComputeArgs,
    #[command(flatten)]
    run: scae::cli::RunArgs,
    #[command(flatten)]
    common: scae::cli::Common,
}

fn main() -> ExitCode {
    scae::cli::run_main("train-suite", || run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let device = args.common.setup()?;
    let use_engine = args.compute.use_engine(&device)?;
    let cache = args.acts.as_ref().map(|a| Cache::open(a)).transpose()?;
    let model = match (&cache, &args.model) {
        (Some(_), _) => None,
        (None, Some(spec)) => Some(Model::load(spec, &scae::hub::resolve_model(spec)?, &device)?),
        (None, None) => bail!("--data/--tokens need --model (the model to run)"),
    };
    let tokenizer = model.as_ref().map(|m| m.tokenizer()).transpose()?;
    let (d, n_layers, model_id, model_hash) = match (&cache, &model) {
        (Some(c), _) => (
            c.manifest.model.d_model,
            c.manifest.model.n_layers,
            c.manifest.model.id.clone(),
            c.manifest.model.hash.clone(),
        ),
        (None, Some(m)) => (m.cfg().d_model, m.cfg().n_layers, m.id.clone(), m.hash.clone()),
        (None, None) => unreachable!(),
    };
    let mut source = match (&cache, &model, &tokenizer) {
        (Some(c), _, _) => TrainData::from_cache(c, args.shuffle, args.common.seed, &device),
        (None, Some(m), Some(tok)) => {
            let spec = args.data.spec().context("--data or --tokens is required without --acts")?;
            if args.shuffle {
                bail!("--shuffle: streaming reads the data in file order; shuffle the file instead");
            }
            TrainData::streaming(m, tok, spec, args.data.options(), &device)?
        }
        _ => unreachable!(),
    };
    let ctx = source.ctx_len();
    let f = (args.expansion as usize) * d;
    let k = args.k as usize;
    if k > f {
        bail!("--k {k}: above the {f} features per module (expansion {} × d_model {d})", args.expansion);
    }
    let batch_size = args.batch_size as usize;
    if let Some(c) = &cache {
        if batch_size > c.manifest.n_seqs {
            bail!("--batch-size {batch_size}: the cache {} has only {} sequences", c.dir.display(), c.manifest.n_seqs);
        }
    }
    let steps = match (args.steps, args.tokens) {
        (Some(s), _) => s,
        (None, Some(t)) => (t / (args.batch_size * ctx as u64)).max(1),
        (None, None) => bail!("one of --steps or --tokens is required"),
    };
    let clip = args.run.clip()?;
    let lr = train::scaled_lr(args.lr, f);
    if !use_engine {
        scae::pruned::check_topk_size(&device, f)?;
    }
    let modules = Module::all(n_layers);
    let mut digest_args = serde_json::json!({
        "acts": args.acts, "data": args.data.data, "tokens": args.data.tokens, "ctx_len": ctx, "expansion": args.expansion, "k": k, "lr": args.lr, "steps": steps, "batch_size": args.batch_size,
        "auxk_alpha": args.auxk_alpha, "dead_threshold": args.dead_threshold, "warmup": args.run.warmup,
        "decay_start": args.run.decay_start, "clip": args.run.clip_grad, "shuffle": args.shuffle, "seed": args.common.seed,
    });
    args.compute.add_to_digest(&mut digest_args);
    let digest = train::digest(&digest_args);
    let run_dir = train::prepare_run_dir(&args.out, args.run.resume, args.run.overwrite)?;
    let mut next_batch = |seqs_seen: u64| -> Result<scae::pruned::Batch> { Ok(source.batch(seqs_seen, batch_size)?) };
    // Each module's (input, target).
    let module_data = |b: &scae::pruned::Batch| -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        modules
            .iter()
            .map(|md| match md.kind {
                Kind::Attn => {
                    let x = to_vec(&b.attn_out[md.layer])?;
                    Ok((x.clone(), x))
                }
                Kind::Mlp => Ok((to_vec(&b.ln2_normalized[md.layer])?, to_vec(&b.mlp_out[md.layer])?)),
            })
            .collect()
    };

    let mut rng = SplitMix(args.common.seed);
    let mut params = Params { modules: modules.iter().map(|_| sae::init_params(d, f, &mut rng)).collect() };
    let mut opt = Optimizer::new(OptimizerKind::Adam, &params);
    let mut dead = DeadTracker::new(modules.len(), f, args.dead_threshold);
    let (mut step, mut seqs_seen) = (0u64, 0u64);
    let metrics_path = args.out.join("metrics.jsonl");
    // A fresh run reads its first batch before the loop (for b_dec) and trains on it first.
    let mut first_batch = None;
    if args.run.resume {
        let suite = train::suite_from_params(&params, &modules, k, d, f)?;
        let st = train::load_checkpoint(&args.out, &suite, &mut opt, &mut dead, "train-suite", &digest)?;
        params = Params::from_suite(&suite)?;
        step = st.step;
        seqs_seen = st.seqs_seen;
        train::trim_metrics(&metrics_path, step)?;
        eprintln!("train-suite: resuming at step {step} of {steps}");
    } else {
        // b_dec = geometric median of the first batch's targets (up to 4096 tokens).
        let batch0 = next_batch(0)?;
        let first = module_data(&batch0)?;
        for (p, (_, y)) in params.modules.iter_mut().zip(&first) {
            let take = (4096 * d).min(y.len());
            p[3] = sae::geometric_median(&y[..take], d);
        }
        first_batch = Some(batch0);
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| metrics_path.display().to_string())?;
    let cfg = UpdateConfig { d, f, k, auxk_alpha: args.auxk_alpha, clip };
    let bar = scae::cli::token_bar(Some(steps * (batch_size * ctx) as u64), "training");
    bar.set_position(step * (batch_size * ctx) as u64);
    let (start, start_step) = (Instant::now(), step);
    let mut ckpt = train::Checkpoints::new(run_dir, "train-suite", digest, &args.run, step);
    // The autograd path keeps parameters and optimizer state on the device.
    let shapes: [&[usize]; 4] = [&[f, d], &[f], &[d, f], &[d]];
    let upload = |p: &[Vec<f32>; 4]| -> Result<[Var; 4]> {
        let v = |i: usize| -> Result<Var> { Ok(Var::from_tensor(&Tensor::from_slice(&p[i], shapes[i], &device)?)?) };
        Ok([v(0)?, v(1)?, v(2)?, v(3)?])
    };
    let download = |vars: &[[Var; 4]]| -> Result<Params> {
        let modules = vars
            .iter()
            .map(|vs| {
                Ok([
                    to_vec(vs[0].as_tensor())?,
                    to_vec(vs[1].as_tensor())?,
                    to_vec(vs[2].as_tensor())?,
                    to_vec(vs[3].as_tensor())?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Params { modules })
    };
    let (vars, mut dopt) = if use_engine {
        (Vec::new(), None)
    } else {
        let vars = params.modules.iter().map(upload).collect::<Result<Vec<_>>>()?;
        let dopt = DeviceOptimizer::from_host(&opt, &vars)?;
        (vars, Some(dopt))
    };
    while step < steps {
        let batch = match first_batch.take() {
            Some(b) => b,
            None => next_batch(seqs_seen)?,
        };
        let masks: Vec<Vec<bool>> = (0..modules.len()).map(|mi| dead.dead(mi)).collect();
        let lr_t = lr * train::lr_factor(step, steps, args.run.warmup, args.run.decay_start);
        let n_tok = (batch_size * ctx) as u64;
        let out: Vec<(f64, f64)> = if let Some(dopt) = dopt.as_mut() {
            let n = batch_size * ctx;
            let data = modules
                .iter()
                .map(|md| {
                    let (x, y) = match md.kind {
                        Kind::Attn => (&batch.attn_out[md.layer], &batch.attn_out[md.layer]),
                        Kind::Mlp => (&batch.ln2_normalized[md.layer], &batch.mlp_out[md.layer]),
                    };
                    Ok((x.reshape((n, d))?, y.reshape((n, d))?))
                })
                .collect::<Result<Vec<_>>>()?;
            let v = scae::devtrain::sae_update(
                &vars,
                dopt,
                &data,
                &masks,
                k,
                args.auxk_alpha,
                clip,
                lr_t,
                args.compute.dtype(),
            )?;
            for (mi, fired) in v.fired.iter().enumerate() {
                dead.update_fired(mi, n_tok, fired);
            }
            v.fvu.into_iter().zip(v.auxk).collect()
        } else {
            let data = module_data(&batch)?;
            let refs: Vec<(&[f32], &[f32])> = data.iter().map(|(x, y)| (x.as_slice(), y.as_slice())).collect();
            let out = sae::update(&mut params, &mut opt, &refs, &masks, cfg, lr_t);
            for (mi, (_, _, idx, val)) in out.iter().enumerate() {
                dead.update(mi, n_tok, idx, val);
            }
            out.into_iter().map(|(fv, ax, _, _)| (fv, ax)).collect()
        };
        let mut fvu = serde_json::Map::new();
        let mut auxk = serde_json::Map::new();
        let mut dead_rec = serde_json::Map::new();
        let mut total = 0f64;
        for (mi, (fv, ax)) in out.iter().enumerate() {
            total += fv + args.auxk_alpha * ax;
            fvu.insert(modules[mi].name(), serde_json::json!(fv));
            auxk.insert(modules[mi].name(), serde_json::json!(ax));
            dead_rec.insert(modules[mi].name(), serde_json::json!(dead.n_dead(mi)));
        }
        if !total.is_finite() {
            bail!(ckpt.non_finite(step, total));
        }
        let rec =
            serde_json::json!({"step": step, "loss": total, "lr": lr_t, "fvu": fvu, "auxk": auxk, "dead": dead_rec});
        writeln!(metrics, "{rec}")?;
        step += 1;
        seqs_seen += batch_size as u64;
        bar.inc(n_tok);
        let due = ckpt.due(step, steps);
        if due.save {
            metrics.flush()?;
            if let Some(dopt) = &dopt {
                params = download(&vars)?;
                opt = dopt.to_host()?;
            }
            ckpt.save(&train::suite_from_params(&params, &modules, k, d, f)?, &opt, &dead, step, seqs_seen)?;
        }
        if due.halt {
            bar.finish_and_clear();
            ckpt.report_halt(step);
            return Ok(());
        }
    }
    bar.finish_and_clear();
    metrics.flush()?;
    if dopt.is_some() {
        params = download(&vars)?;
    }
    // The saved decoder has unit-norm columns, as every forward pass saw it.
    for p in params.modules.iter_mut() {
        sae::normalize_decoder(&mut p[2], d, f);
    }
    let mut suite = train::suite_from_params(&params, &modules, k, d, f)?;
    suite.model_id = Some(model_id);
    suite.model_hash = Some(model_hash);
    let argv: Vec<String> = std::env::args().collect();
    suite.save(
        &args.out,
        &format!("train-suite {}", env!("CARGO_PKG_VERSION")),
        serde_json::json!({"argv": argv, "steps": steps, "lr": lr}),
    )?;
    ckpt.finish();
    let secs = start.elapsed().as_secs_f64();
    let last: Vec<String> =
        std::fs::read_to_string(&metrics_path)?.lines().last().map(|l| l.to_string()).into_iter().collect();
    println!(
        "train-suite: {steps} steps, F {f}, k {k} -> {} ({:.0} tokens/s); last: {}",
        args.out.display(),
        ((step - start_step) * (batch_size * ctx) as u64) as f64 / secs.max(1e-9),
        last.first().map(String::as_str).unwrap_or("")
    );
    Ok(())
}
