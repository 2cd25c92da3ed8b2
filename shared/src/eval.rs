//! `evaluate`'s runner: the suite's pruned pass over an activation cache, and what it measures
//! (docs/MATH.md, "Evaluation metrics"): CE with the suite spliced in against the clean and the
//! zero-ablation CE, FVU (both definitions), L0 and dead features per module.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::formats::connections::Connections;
use crate::formats::eval_json::{EvalReport, ModuleEval, FORMAT, VERSION};
use crate::inputs::Inputs;
use crate::pass::objective::ce_per_token_planned;
use crate::pass::{PassOptions, Plan, ValuePass, Wiring};
use crate::sae::loss::{fvu_ref, Moments};
use crate::util::collective::Collective;

/// A validated `evaluate` run.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub acts: PathBuf,
    pub suite: PathBuf,
    /// The connections file (recorded in the report; the set itself is passed to [`run`]).
    pub connections: Option<PathBuf>,
    /// The file's metadata, the lineage check and the pass in words (from
    /// [`crate::inputs::Chosen`]).
    pub connections_meta: crate::formats::edges_meta::EdgesMeta,
    pub connections_lineage: Option<crate::formats::suite::LineageCheck>,
    pub pass_description: String,
    pub batch_size: usize,
    /// Use only the first N cached sequences.
    pub limit: Option<usize>,
    pub pass: PassOptions,
    /// Also keep every module's features and reconstructions.
    pub dump: bool,
}

/// Running sums for one module.
#[derive(Default, Clone)]
struct ModuleStats {
    target: Moments,
    err: Moments,
    fvu_ref_sum: f64,
    nonzero: u64,
    fired: Vec<bool>,
}

/// What [`run`] returns: the report, and with `dump` the tensors `feats.<m> [n, ctx, F]` and
/// `recon.<m> [n, ctx, d_model]`.
pub struct Evaluation {
    pub report: EvalReport,
    pub dump: HashMap<String, Tensor>,
}

/// C as recorded in the connections file's metadata `meta` (`c`), else the most edges of any
/// feature.
pub fn connections_c(meta: &crate::formats::edges_meta::EdgesMeta, conns: &Connections) -> u64 {
    let c = meta.get(crate::formats::edges_meta::Key::C).and_then(|v| v.parse().ok());
    c.unwrap_or_else(|| conns.edges.iter().flatten().map(Vec::len).max().unwrap_or(0) as u64)
}

/// Whether `suite` was trained on the tokens of `cache`, from its lineage: `("training", why)`
/// when a training stage read this cache or overlapping sequences of the same text,
/// `("held-out", why)` when none did, `("unknown", why)` when the suite records no training data.
pub fn token_split(
    suite: &crate::formats::suite::Suite,
    cache: &crate::formats::cache::Cache,
) -> Result<(String, String)> {
    let trained = &suite.lineage.trained_on;
    if trained.is_empty() {
        return Ok((
            "unknown".into(),
            "the suite records no training data (a reference suite, or one written before scae recorded lineage)"
                .into(),
        ));
    }
    let id = cache.id()?;
    let m = &cache.manifest;
    for t in trained {
        if t.cache_id.as_deref() == Some(id.as_str()) {
            return Ok(("training".into(), format!("{} trained the suite on this cache", t.tool)));
        }
        if let Some(d) = &t.data {
            let same_layout = t.ctx_len == m.ctx_len && t.prepend_bos == m.prepend_bos;
            if d.overlaps(t.n_seqs, &m.data, m.n_seqs as u64, same_layout) == Some(true) {
                return Ok((
                    "training".into(),
                    format!(
                        "{} read {} sequences of the same text ({}), overlapping these",
                        t.tool, t.n_seqs, d.source
                    ),
                ));
            }
        }
    }
    let unknown =
        trained.iter().any(|t| t.data.as_ref().is_none_or(|d| d.fingerprint.is_none()) || m.data.fingerprint.is_none());
    if unknown {
        return Ok(("unknown".into(), "a training stage or this cache does not record its data's fingerprint".into()));
    }
    Ok((
        "held-out".into(),
        format!("none of the {} training stage(s) of the suite read these sequences", trained.len()),
    ))
}

/// How the suite at `dir` was trained last, from its config.json: `tool`, `steps`, `flags`
/// (every flag of the run's configuration) and `connections` (`None` when the folder has no
/// scae config).
pub fn suite_training(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(serde_json::json!({
        "tool": v["created_by"].as_str()?.split(' ').next(),
        "steps": v["args"]["run"]["steps"],
        "flags": v["args"]["run"]["flags"],
        "connections": v["lineage"]["connections"]["source"],
    }))
}

/// Evaluate `inputs.suite` with `conns` (all connections when `None`) on `inputs`' cache.
///
/// Sharded over the ranks of `coll` (`mpirun -n N evaluate ...`): rank r evaluates batches r,
/// r+N, ... (the same batches as one process) and the sums (CE, moments, FVU (ref), counts,
/// firing) are added over the ranks in f64, so every number equals one process's up to the
/// order of the sums. `dump` runs as one process.
pub fn run(
    inputs: &Inputs,
    conns: Option<&Connections>,
    cfg: &EvalConfig,
    device: &Device,
    coll: &dyn Collective,
) -> Result<Evaluation> {
    if cfg.dump && coll.size() > 1 {
        return Err(Error::Usage(format!(
            "--dump writes every sequence's features from one process; hint: run it without mpirun/srun ({} ranks)",
            coll.size()
        )));
    }
    let suite = &inputs.suite;
    let rt = &inputs.model.runtime;
    let available = inputs.cache().manifest.n_seqs;
    let n_eval = cfg.limit.unwrap_or(available).min(available);
    // FVU (ref), the reference's batch-axis FVU, is a variance over a batch's sequences.
    if n_eval < 2 {
        return Err(Error::Usage(format!(
            "--n-seqs: evaluating needs at least 2 sequences, found {n_eval} (FVU (ref) is a variance over a batch's sequences)"
        )));
    }
    if cfg.batch_size < 2 {
        return Err(Error::Usage(format!(
            "--batch-size {}: expected at least 2 (FVU (ref) is a variance over a batch's sequences)",
            cfg.batch_size
        )));
    }
    let c_value = match (&cfg.connections, conns) {
        (Some(_), Some(c)) => Some(connections_c(&cfg.connections_meta, c)),
        _ => None,
    };
    let suite_created_by: Option<String> = std::fs::read_to_string(cfg.suite.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["created_by"].as_str().map(String::from));
    let wiring = match conns {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let plan = Plan::new(suite, wiring, inputs.parallel(), device)?;
    let pass = ValuePass::new(suite, rt, &plan, cfg.pass, device)?;
    let n_mod = suite.modules.len();
    let mut stats = vec![ModuleStats { fired: vec![false; suite.n_features], ..Default::default() }; n_mod];
    let (mut ce_sum, mut clean_sum, mut zero_sum, mut n_pred, mut n_tok, mut n_batches) =
        (0f64, 0f64, 0f64, 0u64, 0u64, 0u64);
    let mut dump: HashMap<String, Vec<Tensor>> = HashMap::new();
    let cache = inputs.cache();
    let m = &cache.manifest;
    let mut bar =
        crate::util::token_bar(Some((cfg.limit.unwrap_or(m.n_seqs).min(m.n_seqs) * m.ctx_len) as u64), "evaluate");
    let sum = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    let (rank, ranks) = (coll.rank(), coll.size());
    let n_seqs = cache.for_each_batch_of(
        cfg.batch_size,
        cfg.limit,
        device,
        |i| i % ranks == rank,
        |batch| {
            let out = pass.run(&batch)?;
            let (b, s, _) = batch.resid_pre0.dims3()?;
            ce_sum += sum(&ce_per_token_planned(suite, rt, &plan, &batch, &out)?)?;
            // The clean and zero-ablation CEs do not depend on the suite: read from the cache
            // where collect-acts stored them, else computed here.
            clean_sum += match &batch.clean_ce {
                Some(c) => sum(c)?,
                None => sum(&rt.forward(&batch.tokens, false, false)?.ce)?,
            };
            // Zero ablation: the residual stream replaced by layer 0's input alone.
            zero_sum += match &batch.zero_ce {
                Some(z) => sum(z)?,
                None => sum(&rt.ce_from_resid(&batch.resid_pre0, &batch.tokens)?)?,
            };
            n_pred += (b * (s - 1)) as u64;
            n_tok += (b * s) as u64;
            // A last batch of one sequence has no batch-axis variance: it is left out of FVU (ref).
            let ref_batch = b >= 2;
            n_batches += ref_batch as u64;
            for (i, module) in suite.modules.iter().enumerate() {
                let st = &mut stats[i];
                let target = batch.target(module);
                st.target.add(target)?;
                st.err.add(&(target - &out.recon[i])?)?;
                if ref_batch {
                    st.fvu_ref_sum += fvu_ref(target, &out.recon[i])?.to_scalar::<f32>()? as f64;
                }
                // Read in place where the features are a host f32 tensor (the CPU engine's).
                let count = |v: &[f32]| count_nonzero(v, &mut st.fired);
                let nonzero = match crate::util::with_host_f32(&out.feats[i], count) {
                    Some(c) => c,
                    None => count_nonzero(&out.feats[i].to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, &mut st.fired),
                };
                st.nonzero += nonzero;
                if cfg.dump {
                    let f = out.feats[i].reshape((b, s, suite.n_features))?;
                    dump.entry(format!("feats.{module}")).or_default().push(f);
                    dump.entry(format!("recon.{module}")).or_default().push(out.recon[i].clone());
                }
            }
            // (Rank 0's share stands for the job's progress.)
            bar.inc((b * s * ranks) as u64);
            Ok(())
        },
    )?;
    bar.finish();
    if ranks > 1 {
        let mut sums = vec![ce_sum, clean_sum, zero_sum, n_pred as f64, n_tok as f64, n_batches as f64];
        sums.extend(stats.iter().flat_map(|st| [st.fvu_ref_sum, st.nonzero as f64]));
        coll.sum_f64(&mut sums)?;
        [ce_sum, clean_sum, zero_sum] = [sums[0], sums[1], sums[2]];
        (n_pred, n_tok, n_batches) = (sums[3] as u64, sums[4] as u64, sums[5] as u64);
        for (st, v) in stats.iter_mut().zip(sums[6..].chunks(2)) {
            (st.fvu_ref_sum, st.nonzero) = (v[0], v[1] as u64);
            st.target.reduce(coll, suite.d_model)?;
            st.err.reduce(coll, suite.d_model)?;
        }
        let fired = super::train::parallel::any_fired(coll, stats.iter().map(|st| st.fired.clone()).collect())?;
        stats.iter_mut().zip(fired).for_each(|(st, f)| st.fired = f);
    }
    let (ce, clean_ce, ce_zero) = (ce_sum / n_pred as f64, clean_sum / n_pred as f64, zero_sum / n_pred as f64);
    let mut modules = BTreeMap::new();
    let (mut mean_fvu, mut mean_l0, mut mean_dead) = (0.0, 0.0, 0.0);
    for (module, st) in suite.modules.iter().zip(&stats) {
        let n = n_tok as f64;
        let fvu = st.err.total_variance(n) / st.target.total_variance(n);
        let l0 = st.nonzero as f64 / n;
        let dead = st.fired.iter().filter(|f| !**f).count() as f64 / suite.n_features as f64;
        mean_fvu += fvu / n_mod as f64;
        mean_l0 += l0 / n_mod as f64;
        mean_dead += dead / n_mod as f64;
        let fvu_ref = st.fvu_ref_sum / n_batches as f64;
        modules.insert(module.name(), ModuleEval { fvu, fvu_ref, l0, dead_fraction: dead });
    }
    let (tokens, tokens_note) = token_split(suite, inputs.cache())?;
    let suite_id = suite.id()?;
    let root_suite_id = suite.lineage.ancestors.last().cloned().unwrap_or_else(|| suite_id.clone());
    let report = EvalReport {
        tokens,
        tokens_note,
        cache_id: Some(inputs.cache().id()?),
        pass: cfg.pass_description.clone(),
        random_connections: cfg.connections_meta.get(crate::formats::edges_meta::Key::RandomSeed).is_some(),
        learned_connections: cfg.connections_meta.get(crate::formats::edges_meta::Key::Learned).is_some(),
        connections_lineage: cfg.connections_lineage.clone(),
        suite_id: Some(suite_id),
        root_suite_id: Some(root_suite_id),
        suite_training: suite_training(&cfg.suite),
        suite_lineage_recorded: !suite.lineage.trained_on.is_empty(),
        format: FORMAT.into(),
        version: VERSION,
        acts: cfg.acts.clone(),
        suite: cfg.suite.clone(),
        connections: cfg.connections.clone(),
        n_connections: conns.map(|c| c.n_edges()),
        c: c_value,
        embed_c: conns
            .filter(|c| c.n_embed_edges() > 0)
            .map(|c| c.embed.iter().flatten().map(Vec::len).max().unwrap_or(0) as u64),
        unembed_c: conns
            .filter(|c| c.n_unembed_edges() > 0)
            .map(|c| c.unembed.iter().map(Vec::len).max().unwrap_or(0) as u64),
        suite_created_by,
        n_seqs,
        n_tokens: n_tok,
        clean_ce,
        ce,
        ce_diff: ce - clean_ce,
        ce_zero,
        ce_recovered: (ce_zero - ce) / (ce_zero - clean_ce),
        mean_fvu,
        mean_l0,
        dead_fraction: mean_dead,
        consistent_attn_bias: cfg.pass.consistent_attn_bias,
        modules,
    };
    let dump = dump.into_iter().map(|(k, v)| Ok((k, Tensor::cat(&v, 0)?))).collect::<Result<_>>()?;
    Ok(Evaluation { report, dump })
}

/// The non-zero values of features `(N, F)` (`F = fired.len()`), marking each feature with one
/// as fired; blocks of 64 rows in parallel, each thread's flags joined at the end.
fn count_nonzero(v: &[f32], fired: &mut [bool]) -> u64 {
    use rayon::prelude::*;
    let f = fired.len().max(1);
    let (n, seen) = v
        .par_chunks(f * 64)
        .fold(
            || (0u64, vec![false; f]),
            |(mut n, mut seen), block| {
                for row in block.chunks(f) {
                    for (s, x) in seen.iter_mut().zip(row) {
                        n += u64::from(*x != 0.0);
                        *s |= *x != 0.0;
                    }
                }
                (n, seen)
            },
        )
        .reduce(
            || (0, vec![false; f]),
            |(a, sa), (b, sb)| (a + b, sa.iter().zip(&sb).map(|(x, y)| *x || *y).collect()),
        );
    fired.iter_mut().zip(&seen).for_each(|(o, s)| *o |= *s);
    n
}
