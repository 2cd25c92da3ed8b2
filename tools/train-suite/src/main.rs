//! `train-suite`: pretrain a suite with standard TopK training — every module from one pass over
//! an activation cache (or a model streamed over data): `attn_L` an SAE on `hook_attn_out`,
//! `mlp_L` a transcoder `ln2.hook_normalized -> hook_mlp_out` (the loop is
//! `scae::train::pretrain`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use scae::formats::cache::Cache;
use scae::model::Model;
use scae::train::pretrain::{PretrainConfig, SuiteShape};
use scae::util::collective::Collective;

/// Pretrain a TopK suite on an activation cache.
#[derive(Debug, Parser, serde::Serialize)]
#[command(
    version,
    after_help = "Example:\n  train-suite --acts acts/ --expansion 4 --k 32 --steps 2000 --batch-size 16 --out suite/\n\nlr = --lr / sqrt(F / 2^14), Adam, linear decay from --decay-start, per-module clipping,\nunit-norm decoder columns, b_dec = geometric median of the first batch, AuxK on dead latents."
)]
struct Args {
    /// Activation cache folder (from collect-acts); required unless streaming: --model with
    /// --data/--tokens.
    #[arg(long, required_unless_present_any = ["data", "tokens"], conflicts_with_all = ["data", "tokens", "model"])]
    acts: Option<PathBuf>,
    /// Streaming mode: the model whose activations are computed batch by batch (with --data or
    /// --tokens; default: none, read --acts).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    data: scae::cli::DataArgs,
    /// Output folder: suite.safetensors, config.json, metrics.jsonl, checkpoint/.
    #[arg(long)]
    #[serde(skip)]
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
    /// AuxK weight (0 disables it).
    #[arg(long, default_value_t = 1.0 / 32.0, value_parser = scae::cli::non_negative_f64)]
    auxk_alpha: f64,
    #[command(flatten)]
    #[serde(flatten)]
    step: scae::cli::StepArgs,
    #[command(flatten)]
    #[serde(flatten)]
    compute: scae::cli::ComputeArgs,
    #[command(flatten)]
    #[serde(flatten)]
    run: scae::cli::RunArgs,
    /// On N ranks (mpirun/srun): rank r trains modules r, r+N, ... on whole batches (byte-
    /// identical to one process) instead of every module on its share of each batch.
    #[arg(long)]
    #[serde(skip)]
    shard_modules: bool,
    #[command(flatten)]
    #[serde(flatten)]
    common: scae::cli::Common,
}

fn main() -> ExitCode {
    scae::cli::run_main_ranks("train-suite", |coll| run(scae::cli::parse_args::<Args>(), coll))
}

fn run(args: Args, coll: &dyn Collective) -> Result<()> {
    let device = args.common.setup()?;
    let model_path = args.model.as_deref().map(Path::new);
    let inputs = [&[("--acts", args.acts.as_deref()), ("--model", model_path)][..], &args.data.paths()].concat();
    scae::util::io::refuse_overlap(&args.out, "--out", &inputs)?;
    let use_engine = args.compute.use_engine(&device)?;
    let cache = args.acts.as_ref().map(|a| Cache::open(a)).transpose()?;
    let model = match (&cache, &args.model) {
        (Some(_), _) => None,
        (None, Some(spec)) => Some(Model::load(spec, &scae::model::hub::resolve_model(spec)?, &device)?),
        (None, None) => bail!("--data/--tokens need --model (the model to run)"),
    };
    let tokenizer = model.as_ref().map(|m| m.tokenizer()).transpose()?;
    let (d, n_layers, model_id, model_hash) = match (&cache, &model) {
        (Some(c), _) => {
            let m = &c.manifest.model;
            (m.d_model, m.n_layers, m.id.clone(), m.hash.clone())
        }
        (None, Some(m)) => (m.cfg().d_model, m.cfg().n_layers, m.id.clone(), m.hash.clone()),
        (None, None) => unreachable!("a model is loaded without a cache"),
    };
    let seed = args.common.seed;
    let mut source =
        args.step.train_data(cache.as_ref(), model.as_ref(), tokenizer.as_ref(), &args.data, seed, &device)?;
    let ctx = source.ctx_len();
    let tokens = args.step.batch_size as f64 * ctx as f64;
    let f_est = args.expansion as f64 * d as f64;
    let sizes = format!("--expansion {} (F {f_est}), --batch-size {}", args.expansion, args.step.batch_size);
    scae::util::mem::check_fits(scae::train::pretrain::footprint(n_layers, d, f_est, tokens), &sizes)?;
    let (f, k) = ((args.expansion as usize) * d, args.k as usize);
    if k > f {
        bail!("--k {k}: above the {f} features per module (expansion {} × d_model {d})", args.expansion);
    }
    let steps = args.step.steps(ctx)?;
    let lr = scae::train::schedule::scaled_lr(args.lr, f);
    if !use_engine {
        scae::sae::topk::check_topk_size(&device, k)?;
    }
    let (run, step) = (&args.run, &args.step);
    // Every flag that changes the run, and its inputs' contents: what --resume repeats.
    let files = [("--acts", args.acts.as_deref()), ("--data", args.data.data.as_deref())];
    let files = [&files[..], &[("--tokens", args.data.tokens.as_deref())]].concat();
    let run_config = scae::formats::runconfig::RunConfig::new(&args, &files, steps)?;
    let seqs_read = steps * step.batch_size;
    let trained_on = match (&cache, &args.acts) {
        (Some(c), Some(a)) => scae::formats::suite::TrainedOn::of_cache("train-suite", a, c, seqs_read)?,
        _ => scae::inputs::data_trained_on("train-suite", args.data.spec(), args.data.options(), seqs_read)?,
    };
    let cfg = PretrainConfig {
        out: args.out.clone(),
        shape: SuiteShape { d_model: d, n_layers, n_features: f, k, model_id, model_hash },
        batch_size: step.batch_size as usize,
        schedule: run.schedule(steps, lr)?,
        auxk_alpha: args.auxk_alpha,
        dead_threshold: step.dead_threshold,
        use_engine,
        dtype: args.compute.dtype(),
        seed,
        shard_modules: args.shard_modules,
        checkpoints: run.checkpoints(),
        overwrite: run.overwrite,
        created_by: format!("train-suite {}", env!("CARGO_PKG_VERSION")),
        args: serde_json::json!({
            "argv": std::env::args().collect::<Vec<_>>(), "steps": steps, "lr_applied": lr, "run": &run_config,
        }),
        run: run_config,
        lineage: scae::formats::suite::Lineage { trained_on: vec![trained_on], ..Default::default() },
    };
    let done = scae::train::pretrain::run(&mut source, &cfg, &device, coll)?;
    if !done.halted && coll.rank() == 0 {
        scae::say!("{} (F {f}, k {k})", scae::train::summary_line("train-suite", &done, &args.out))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
