//! `evaluate`: run a suite's pruned pass over an activation cache and report CE with the suite
//! spliced in, FVU (two definitions), L0 and dead features per module (`eval.json`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::{DType, Tensor};
use clap::Parser;
use scae::inputs::Inputs;
use scae::io::StagedDir;
use scae::pruned::{self, Plan, Wiring};

/// Evaluate a suite (optionally with a connection set) on an activation cache.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  evaluate --acts acts/ --suite suite/ --connections edges/connections.parquet --out eval/\n\nWithout --connections every preceding feature is connected (the reference's connections=None)."
)]
struct Args {
    /// Activation cache folder (from collect-acts).
    #[arg(long, required_unless_present = "compare")]
    acts: Option<PathBuf>,
    /// Suite folder (suite.safetensors + config.json) or a bare .safetensors.
    #[arg(long, required_unless_present = "compare")]
    suite: Option<PathBuf>,
    /// Compare earlier runs (their --out folders): print a markdown table and write
    /// compare.md, compare.png and compare.svg (CE diff and mean FVU vs C) into --out.
    #[arg(long, num_args = 1.., conflicts_with_all = ["acts", "suite", "connections", "dump"])]
    compare: Vec<PathBuf>,
    /// Connection set: connections.parquet, or the reference's .safetensors layout.
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

/// Running sums for one module.
#[derive(Default, Clone)]
struct ModuleStats {
    sum_t: Vec<f64>,
    sq_t: Vec<f64>,
    sum_e: Vec<f64>,
    sq_e: Vec<f64>,
    fvu_ref_sum: f64,
    nonzero: u64,
    fired: Vec<bool>,
}

fn add_moments(sum: &mut Vec<f64>, sq: &mut Vec<f64>, x: &Tensor) -> scae::Result<()> {
    let d = x.dim(candle_core::D::Minus1)?;
    let x = x.reshape(((), d))?.to_dtype(DType::F64)?;
    let s = x.sum(0)?.to_vec1::<f64>()?;
    let q = x.sqr()?.sum(0)?.to_vec1::<f64>()?;
    if sum.is_empty() {
        *sum = vec![0.0; d];
        *sq = vec![0.0; d];
    }
    sum.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
    sq.iter_mut().zip(&q).for_each(|(a, b)| *a += b);
    Ok(())
}

fn total_variance(sum: &[f64], sq: &[f64], n: f64) -> f64 {
    sum.iter().zip(sq).map(|(s, q)| q - s * s / n).sum()
}

mod report;

/// `--compare`: table and plot of earlier runs.
fn compare(args: &Args) -> Result<()> {
    let mut runs = args.compare.iter().map(|d| report::load_run(d)).collect::<Result<Vec<_>>>()?;
    report::sort_runs(&mut runs);
    let table = report::table(&runs);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("{}: --out: cannot create output folder: {e}", args.out.display()))?;
    scae::io::write_atomic(&args.out.join("compare.md"), table.as_bytes())?;
    report::plot(&runs, &args.out.join("compare"))?;
    print!("{table}");
    println!("plot: {} and .svg", args.out.join("compare.png").display());
    Ok(())
}

fn main() -> ExitCode {
    scae::cli::run_main("evaluate", || run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    if !args.compare.is_empty() {
        return compare(&args);
    }
    let (Some(acts), Some(suite_path)) = (args.acts.clone(), args.suite.clone()) else {
        anyhow::bail!("--acts and --suite are required (or --compare)");
    };
    let device = args.common.setup()?;
    let inputs = Inputs::open(&acts, &suite_path, args.cache.model.as_deref(), &device)?;
    let conns = args.connections.as_ref().map(|p| inputs.connections(p)).transpose()?;
    // C as recorded by score-edges/select-edges, else the most edges of any feature.
    let c_value: Option<u64> = match (&args.connections, &conns) {
        (Some(p), Some(c)) => {
            let meta = if p.extension().is_some_and(|e| e == "parquet") {
                scae::table::parquet_metadata(p)?
            } else {
                Vec::new()
            };
            Some(
                meta.iter()
                    .find(|(k, _)| k == "c")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or_else(|| c.edges.iter().flatten().map(Vec::len).max().unwrap_or(0) as u64),
            )
        }
        _ => None,
    };
    let suite_created_by: Option<String> = std::fs::read_to_string(suite_path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["created_by"].as_str().map(String::from));
    let suite = &inputs.suite;
    let rt = &inputs.model.runtime;
    let wiring = match &conns {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let plan = Plan::new(suite, wiring, inputs.parallel(), &device)?;
    let pass = scae::engine::ValuePass::new(suite, rt, &plan, args.pass.options(), &device)?;
    let stage = StagedDir::create(&args.out, args.cache.overwrite, "--out")?;
    let n_mod = suite.modules.len();
    let mut stats = vec![ModuleStats { fired: vec![false; suite.n_features], ..Default::default() }; n_mod];
    let (mut ce_sum, mut clean_sum, mut zero_sum, mut n_pred, mut n_tok, mut n_batches) =
        (0f64, 0f64, 0f64, 0u64, 0u64, 0u64);
    let mut dump: HashMap<String, Vec<Tensor>> = HashMap::new();
    let limit = args.cache.limit();
    let m = &inputs.cache().manifest;
    let bar = scae::cli::token_bar(Some((limit.unwrap_or(m.n_seqs).min(m.n_seqs) * m.ctx_len) as u64), "evaluating");
    let n_seqs = inputs.cache().for_each_batch(args.cache.batch_size as usize, limit, &device, |batch| {
        let out = pass.run(&batch)?;
        let (b, s, _) = batch.resid_pre0.dims3()?;
        let ce = pruned::ce_per_token(rt, &batch, &out)?;
        ce_sum += ce.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        let clean = rt.forward(&batch.tokens, false, false)?.ce;
        clean_sum += clean.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        // Zero ablation: the residual stream replaced by layer 0's input alone.
        let zero = rt.ce_from_resid(&batch.resid_pre0, &batch.tokens)?;
        zero_sum += zero.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        n_pred += (b * (s - 1)) as u64;
        n_tok += (b * s) as u64;
        n_batches += 1;
        for (i, module) in suite.modules.iter().enumerate() {
            let st = &mut stats[i];
            let target = batch.target(module);
            let err = (target - &out.recon[i])?;
            add_moments(&mut st.sum_t, &mut st.sq_t, target)?;
            add_moments(&mut st.sum_e, &mut st.sq_e, &err)?;
            st.fvu_ref_sum += pruned::fvu_ref(target, &out.recon[i])?.to_scalar::<f32>()? as f64;
            let feats = out.feats[i].to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (j, v) in feats.iter().enumerate() {
                if *v != 0.0 {
                    st.nonzero += 1;
                    st.fired[j % suite.n_features] = true;
                }
            }
            if args.dump {
                let f = out.feats[i].reshape((b, s, suite.n_features))?;
                dump.entry(format!("feats.{module}")).or_default().push(f);
                dump.entry(format!("recon.{module}")).or_default().push(out.recon[i].clone());
            }
        }
        bar.inc((b * s) as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    let (ce, clean_ce, ce_zero) = (ce_sum / n_pred as f64, clean_sum / n_pred as f64, zero_sum / n_pred as f64);
    let ce_recovered = (ce_zero - ce) / (ce_zero - clean_ce);
    let mut per_module = serde_json::Map::new();
    let (mut mean_fvu, mut mean_l0, mut mean_dead) = (0.0, 0.0, 0.0);
    for (module, st) in suite.modules.iter().zip(&stats) {
        let n = n_tok as f64;
        let fvu = total_variance(&st.sum_e, &st.sq_e, n) / total_variance(&st.sum_t, &st.sq_t, n);
        let l0 = st.nonzero as f64 / n;
        let dead = st.fired.iter().filter(|f| !**f).count() as f64 / suite.n_features as f64;
        mean_fvu += fvu / n_mod as f64;
        mean_l0 += l0 / n_mod as f64;
        mean_dead += dead / n_mod as f64;
        per_module.insert(
            module.name(),
            serde_json::json!({"fvu": fvu, "fvu_ref": st.fvu_ref_sum / n_batches as f64, "l0": l0, "dead_fraction": dead}),
        );
    }
    let report = serde_json::json!({
        "format": "scae-eval", "version": 1,
        "acts": acts, "suite": suite_path, "connections": args.connections,
        "n_connections": conns.as_ref().map(|c| c.n_edges()),
        "c": c_value,
        "suite_created_by": suite_created_by,
        "n_seqs": n_seqs, "n_tokens": n_tok,
        "clean_ce": clean_ce, "ce": ce, "ce_diff": ce - clean_ce, "ce_zero": ce_zero, "ce_recovered": ce_recovered,
        "mean_fvu": mean_fvu, "mean_l0": mean_l0, "dead_fraction": mean_dead,
        "consistent_attn_bias": args.pass.consistent_attn_bias,
        "modules": per_module,
    });
    scae::io::write_atomic(&stage.path().join("eval.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    if args.dump {
        let tensors: Vec<(String, Tensor)> =
            dump.into_iter().map(|(k, v)| Ok((k, Tensor::cat(&v, 0)?))).collect::<Result<_>>()?;
        let path = stage.path().join("features.safetensors");
        let tmp = scae::io::tmp_path(&path);
        candle_core::safetensors::save(&tensors.into_iter().collect::<HashMap<_, _>>(), &tmp)?;
        std::fs::rename(&tmp, &path)?;
    }
    let out = stage.commit()?;
    println!("| module | FVU | FVU (ref) | L0 | dead % |\n|---|---|---|---|---|");
    for module in &suite.modules {
        let r = &report["modules"][module.name()];
        println!(
            "| {module} | {:.4} | {:.4} | {:.1} | {:.1} |",
            r["fvu"].as_f64().unwrap_or(f64::NAN),
            r["fvu_ref"].as_f64().unwrap_or(f64::NAN),
            r["l0"].as_f64().unwrap_or(f64::NAN),
            100.0 * r["dead_fraction"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "clean CE {clean_ce:.4}, CE with suite {ce:.4}, CE diff {:.4}, CE recovered {ce_recovered:.3} (zero-ablation CE {ce_zero:.4}; {n_tok} tokens) -> {}",
        ce - clean_ce,
        out.display()
    );
    Ok(())
}
