//! The `learn-connections` runner (docs/MATH.md, "Learned connections"): hard-concrete gates on
//! the candidate edges of an edges file, trained through the gated pruned pass on the sum of
//! the modules' FVU plus λ times the expected-L0 penalty; the suite frozen or trained jointly;
//! checkpoints and bit-identical resume as `finetune`'s; at the end each feature's top-C
//! candidates by `log α` become a connection set.
//!
//! The step runs on the CPU engine (f32 on the CPU: the gated pass and its exact gradients with
//! respect to the gates, [`Engine::gated`]) or through the composed autograd ops on any device;
//! both are deterministic, so a resumed run repeats the uninterrupted one bit for bit. Its cost
//! follows the candidates: `(F, keep)` gates and edge weights per module, no `F×F` tensor.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::checkpoints::file::{self as ckfile, DECAY, LATEST};
use super::checkpoints::{resume, CheckpointPolicy, TrainRun};
use super::data::TrainData;
use super::dead::DeadTracker;
use super::finetune::Loss;
use super::finetune_step::{engine_grads, LossSpec, StepInputs};
use super::gates::{GateAdam, GateInit, GateMode, GateParams};
use super::optim::{clip_module, DeviceOptimizer, Optimizer, OptimizerKind};
use super::{metrics_record, After, RunSummary, Schedule, Session, StepReport};
use crate::error::{Error, Result};
use crate::formats::connections::Connections;
use crate::formats::edges_meta::{EdgesMeta, Key};
use crate::inputs::Inputs;
use crate::pass::autograd::forward_gated;
use crate::pass::engine::SlotValues;
use crate::pass::objective::ce_per_token_gated;
use crate::pass::{PassOptions, Plan, Wiring};
use crate::sae::fired_t;
use crate::util::collective::Single;
use crate::util::scalar;

/// The temperature β over the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Beta {
    /// The reference's: `max(0.1, 2 (1 − step/steps))`.
    Reference,
    Constant(f64),
}

impl Beta {
    /// `--beta`: `reference` or a positive number.
    pub fn parse(s: &str) -> Result<Beta> {
        match s {
            "reference" => Ok(Beta::Reference),
            _ => match s.parse::<f64>() {
                Ok(b) if b.is_finite() && b > 0.0 => Ok(Beta::Constant(b)),
                _ => Err(Error::Usage(format!("--beta {s}: expected `reference` or a positive number"))),
            },
        }
    }

    pub fn at(self, step: u64, steps: u64) -> f64 {
        match self {
            Beta::Reference => (2.0 * (1.0 - step as f64 / steps.max(1) as f64)).max(0.1),
            Beta::Constant(b) => b,
        }
    }
}

/// A validated `learn-connections` run.
pub struct LearnConfig {
    pub out: PathBuf,
    /// The edges file the candidates came from.
    pub edges: PathBuf,
    pub c: usize,
    /// Connections to keep per output token among its unembed candidates.
    pub unembed_c: usize,
    /// The loss: the modules' FVU, the spliced CE, or FVU + `ce_weight` · CE.
    pub loss: Loss,
    pub ce_weight: f64,
    pub lambda: f64,
    pub beta: Beta,
    pub init: GateInit,
    pub mode: GateMode,
    /// Train only the gates (else the suite too, with `schedule`'s learning rate).
    pub freeze_suite: bool,
    /// The CPU engine (f32 on the CPU), else autograd on the device.
    pub use_engine: bool,
    pub gate_lr: f64,
    pub schedule: Schedule,
    pub batch_size: usize,
    pub seed: u64,
    pub pass: PassOptions,
    pub checkpoints: CheckpointPolicy,
    pub overwrite: bool,
    pub created_by: String,
    pub args: serde_json::Value,
    pub run: crate::formats::runconfig::RunConfig,
}

/// Name of the gates' state in a checkpoint folder, and of the final gates in the output.
pub const GATES_FILE: &str = "gates.safetensors";

/// The gates' state as named tensors: `log_alpha.{up,embed}.<module>` and, with `adam`, its
/// moments `m.…` / `v.…`.
fn gate_tensors(gp: &GateParams, adam: Option<&GateAdam>, modules: &[String]) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (k, (name, g)) in gp.named(modules).into_iter().enumerate() {
        out.insert(format!("log_alpha.{name}"), g.log_alpha.as_tensor().clone());
        if let Some(a) = adam {
            out.insert(format!("m.{name}"), a.m[k].clone());
            out.insert(format!("v.{name}"), a.v[k].clone());
        }
    }
    out
}

fn write_gates(
    path: &std::path::Path,
    gp: &GateParams,
    adam: Option<&GateAdam>,
    modules: &[String],
    step: u64,
) -> Result<()> {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("step".to_string(), step.to_string());
    if let Some(a) = adam {
        meta.insert("t".to_string(), a.t.to_string());
    }
    let tensors: Vec<(String, Tensor)> = gate_tensors(gp, adam, modules).into_iter().collect();
    crate::util::io::write_safetensors(path, tensors, &meta)
}

/// Restore the gates' state written at `step` from `path`.
fn read_gates(
    path: &std::path::Path,
    gp: &GateParams,
    adam: &mut GateAdam,
    modules: &[String],
    step: u64,
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::input(path, format!("the checkpoint has no gates ({e}); it was cut short: rerun without --resume"))
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::input(path, e.to_string()))?;
    let md = meta.metadata().clone().unwrap_or_default();
    let saved: Option<u64> = md.get("step").and_then(|s| s.parse().ok());
    if saved != Some(step) {
        return Err(Error::input(path, format!("gates of step {saved:?}, but the checkpoint is at step {step}")));
    }
    let map = candle_core::safetensors::load_buffer(&bytes, gp.target.device())?;
    let get = |name: &String| -> Result<Tensor> {
        map.get(name).cloned().ok_or_else(|| Error::input(path, format!("tensor `{name}` is missing")))
    };
    for (k, (name, g)) in gp.named(modules).into_iter().enumerate() {
        let la = get(&format!("log_alpha.{name}"))?;
        if la.dims() != g.log_alpha.as_tensor().dims() {
            return Err(Error::input(path, format!("`log_alpha.{name}` has another shape than this run's candidates")));
        }
        g.log_alpha.set(&la)?;
        adam.m[k] = get(&format!("m.{name}"))?;
        adam.v[k] = get(&format!("v.{name}"))?;
    }
    adam.t = md.get("t").and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(())
}

/// The candidates of the edges file `edges` (checked against the suite and model); its
/// unembed candidates only with a CE term in the loss (`ce`: the FVU does not read the
/// unembedding), else dropped with a note. Says which pass runs.
pub fn candidates(inputs: &Inputs, edges: &std::path::Path, ce: bool) -> Result<Connections> {
    let mut cands = inputs.connections(edges)?;
    if cands.n_unembed_edges() > 0 && !ce {
        crate::note!(
            "learn-connections: {} unembed candidates are not learned: the FVU does not read the unembedding (--loss ce or mse+ce learns them); every token reads every feature",
            cands.n_unembed_edges()
        );
        cands.unembed.clear();
    }
    let mut embed = match cands.n_embed_edges() {
        0 => String::new(),
        n => format!(" + {n} from the embedding"),
    };
    if cands.n_unembed_edges() > 0 {
        embed += &format!(" + {} into the unembedding", cands.n_unembed_edges());
    }
    crate::note!(
        "learn-connections: pass: pruned through gates on {} candidate edges{embed} from {}",
        cands.n_edges(),
        edges.display()
    );
    Ok(cands)
}

/// Training batches of `batch_size` sequences from the inputs' cache (checked to hold them).
pub fn train_data<'a>(
    inputs: &'a Inputs,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    device: &Device,
) -> Result<TrainData<'a>> {
    let cache = inputs.cache();
    if batch_size > cache.manifest.n_seqs {
        return Err(Error::Usage(format!(
            "--batch-size {batch_size}: the cache {} has only {} sequences",
            cache.dir.display(),
            cache.manifest.n_seqs
        )));
    }
    Ok(TrainData::from_cache(cache, shuffle, seed, device))
}

/// Learn a connection set for `inputs.suite` from the candidates `cands` over `data`.
pub fn run(
    inputs: &Inputs,
    data: &mut TrainData,
    cands: &Connections,
    cfg: &LearnConfig,
    device: &Device,
) -> Result<RunSummary> {
    let (suite, rt) = (&inputs.suite, &inputs.model.runtime);
    let modules: Vec<String> = suite.modules.iter().map(|m| m.name()).collect();
    let mut plan = Plan::new(suite, Wiring::Sparse(cands), inputs.parallel(), device)?;
    // Off the engine, the device-agnostic ops everywhere (deterministic on the CPU too).
    plan.force_composed(!cfg.use_engine);
    let gp = GateParams::new(&plan, cands, (cfg.c, cfg.unembed_c), cfg.init, cfg.seed, device)?;
    let (mse, ce_weight) = (cfg.loss.has_mse(), cfg.loss.ce_weight(cfg.ce_weight));
    let vars = gp.vars();
    let mut gopt = GateAdam::new(&vars)?;
    let tr = TrainRun {
        out: cfg.out.clone(),
        tool: "learn-connections",
        run: cfg.run.clone(),
        policy: cfg.checkpoints,
        schedule: cfg.schedule.clone(),
        batch_size: cfg.batch_size as u64,
        overwrite: cfg.overwrite,
    };
    let dir = Some(tr.prepare_dir()?);
    let mut params = suite.host_params()?;
    let mut opt = Optimizer::new(OptimizerKind::Adam, &params);
    let mut dead = DeadTracker::new(suite.modules.len(), suite.n_features, u64::MAX);
    let (mut step, mut seqs_seen) = (0u64, 0u64);
    let steps = cfg.schedule.steps;
    if cfg.checkpoints.resume {
        let st = resume(&tr, suite, &mut params, &mut opt, &mut dead)?;
        suite.set_params(&params)?;
        (step, seqs_seen) = (st.step, st.seqs_seen);
        // The checkpoint folder resume used: the one whose state is at that step.
        let name = [LATEST, DECAY]
            .into_iter()
            .find(|n| ckfile::read_state(&cfg.out, n, tr.tool).is_ok_and(|s| s.step == step))
            .unwrap_or(LATEST);
        read_gates(&cfg.out.join(name).join(GATES_FILE), &gp, &mut gopt, &modules, step)?;
        crate::note!("learn-connections: resuming at step {step} of {steps}");
    }
    let mut dopt = match cfg.freeze_suite || cfg.use_engine {
        true => None,
        false => Some(DeviceOptimizer::from_host(&opt, &suite.aes)?),
    };
    let tokens_per_step = (cfg.batch_size * data.ctx_len()) as u64;
    let coll = Single;
    let mut session = Session::open(dir, &tr, step, tokens_per_step, &coll)?;
    // The metrics' means are over the rows that have candidates (a first module has none).
    let has = gp.target.gt(0f32)?.to_dtype(DType::F32)?;
    let n_has = scalar(&has.sum_all()?)?.max(1.0);
    let target_sum = scalar(&gp.target.sum_all()?)?;
    while step < steps {
        let batch = data.batch_part(seqs_seen, cfg.batch_size, 0, cfg.batch_size)?;
        let beta = cfg.beta.at(step, steps);
        let gates = gp.sample(beta, cfg.mode, cfg.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15))?;
        let counts = gp.expected_counts(beta, cfg.mode)?;
        let penalty = gp.penalty_of(&counts)?;
        let lr_t = cfg.schedule.lr_at(step);
        let (report, store) = if cfg.use_engine {
            // The gates' gradients from the engine, chained into log α through the sample's
            // graph: ∂/∂log α of Σ z · sg(∂L/∂z) + λ · penalty.
            let suite_opt = (!cfg.freeze_suite).then_some((&mut opt, cfg.schedule.clip, lr_t));
            let si = StepInputs { suite, rt, plan: &plan, opts: cfg.pass, coll: &Single, decoder_major: false };
            let spec = LossSpec { fvu_scales: mse.then(|| vec![1.0; suite.modules.len()]), ce_weight, auxk: None };
            let (mut report, gz) = engine_gate_step(&si, &spec, &batch, &gates, &mut params, suite_opt)?;
            report.loss += cfg.lambda * scalar(&penalty)?;
            let mut sur = (&penalty * cfg.lambda)?;
            let zs = gates.up.iter().chain(&gates.embed).chain([&gates.unembed]);
            let gs = gz.up.iter().chain(&gz.embed).chain([&gz.unembed]);
            for (z, g) in zs.zip(gs) {
                if let (Some(z), Some(g)) = (z, g) {
                    sur = (sur + (z * Tensor::from_slice(g, z.dims(), z.device())?)?.sum_all()?)?;
                }
            }
            (report, sur.backward()?)
        } else {
            let out = forward_gated(suite, rt, &plan, &batch, cfg.pass, Some(&gates))?;
            let mut loss = (&penalty * cfg.lambda)?;
            let mut report = StepReport { fired: fired_t(&out.feats)?, ..StepReport::default() };
            if mse {
                let fvu = crate::pass::objective::fvu_per_module(suite, &batch, &out)?;
                loss = (loss + fvu.sum_all()?)?;
                report.fvu = Some(fvu.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            }
            if let Some(w) = ce_weight {
                let ce = ce_per_token_gated(suite, rt, &plan, &batch, &out, gates.unembed.as_ref())?.mean_all()?;
                loss = (loss + (&ce * w)?)?;
                report.ce = Some(scalar(&ce)?);
            }
            report.loss = scalar(&loss)?;
            (report, loss.backward()?)
        };
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned().map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        session.check_step(step, &report, &suite.modules)?;
        gopt.step(&vars, &grads, cfg.gate_lr)?;
        if let Some(d) = dopt.as_mut() {
            let mut sg = suite.aes.iter().map(|v| v.grads(&store)).collect::<Result<Vec<_>>>()?;
            if let Some(c) = cfg.schedule.clip {
                for g in sg.iter_mut() {
                    super::optim::clip_module_t(g, c)?;
                }
            }
            d.step(&suite.aes, &sg, lr_t)?;
        }
        let mut record = metrics_record(step, lr_t, &report, &suite.modules, &dead);
        record["beta"] = serde_json::json!(beta);
        record["penalty"] = serde_json::json!(scalar(&penalty)?);
        record["expected_edges_mean"] = serde_json::json!(scalar(&(counts * &has)?.sum_all()?)? / n_has);
        record["target_edges_mean"] = serde_json::json!(target_sum / n_has);
        record["open_gates_mean"] = serde_json::json!(open_gates(&gates)? / n_has);
        session.log(record, &report)?;
        step += 1;
        seqs_seen += cfg.batch_size as u64;
        let next = session.after_step(step, &cfg.schedule, |ckpt| {
            match &dopt {
                Some(d) => opt = d.to_host()?,
                // A frozen suite's optimizer takes no steps; the checkpoint counts the run's
                // (the gates' optimizer has its own count in gates.safetensors).
                None if cfg.freeze_suite => opt.t = step,
                // The engine's: the host parameters are the current ones.
                None => suite.set_params(&params)?,
            }
            let targets = ckpt.targets().to_vec();
            let folder = ckpt.dir().map(|p| p.to_path_buf());
            ckpt.save(suite, &opt, &dead, step, seqs_seen, None)?;
            if let Some(folder) = folder {
                for name in targets {
                    write_gates(&folder.join(name).join(GATES_FILE), &gp, Some(&gopt), &modules, step)?;
                }
            }
            Ok(())
        })?;
        match next {
            After::Continue => {}
            After::Halt => return Ok(session.halted(steps)),
            After::Interrupted => return Err(session.interrupted(step)),
        }
    }
    if cfg.use_engine && !cfg.freeze_suite {
        suite.set_params(&params)?;
    }
    session.finish(steps, || {
        let (learned, gate_values, unembed_gates) = gp.binarise(cands, (cfg.c, cfg.unembed_c))?;
        let mut meta = EdgesMeta::new()
            .with(Key::ParallelAttnMlp, inputs.parallel())
            .with(Key::C, cfg.c)
            .with(Key::Edges, cfg.edges.display());
        meta.set(Key::SuiteId, suite.id()?);
        meta.set(
            Key::Learned,
            format!(
                "hard-concrete gates, lambda {}, {} steps, beta {:?}, {:?} gates, init {:?}, suite {}",
                cfg.lambda,
                steps,
                cfg.beta,
                cfg.mode,
                cfg.init,
                if cfg.freeze_suite { "frozen" } else { "trained jointly" }
            ),
        );
        learned.write_parquet_gated(
            &cfg.out.join("connections.parquet"),
            crate::formats::connections::FORMAT,
            &meta,
            Some((&gate_values, &unembed_gates)),
        )?;
        write_gates(&cfg.out.join(GATES_FILE), &gp, None, &modules, steps)?;
        if !cfg.freeze_suite {
            let mut out_suite = suite.clone();
            out_suite.model_id = Some(inputs.model.id.clone());
            out_suite.model_hash = Some(inputs.model.hash.clone());
            out_suite.save(&cfg.out, &cfg.created_by, cfg.args.clone())?;
        }
        Ok(())
    })
}

/// One step of the gated pass on the CPU engine (finetune's engine step, with gates): the loss
/// of `spec` (the report's loss, without the penalty), the gates' gradients (returned) and,
/// with `suite_opt` (optimizer, clipping, learning rate), an optimizer step of the suite's host
/// parameters `params`.
fn engine_gate_step(
    si: &StepInputs,
    spec: &LossSpec,
    batch: &crate::data::Batch,
    gates: &crate::pass::autograd::Gates,
    params: &mut [crate::sae::AeParams<Vec<f32>>],
    suite_opt: Option<(&mut Optimizer, Option<f64>, f64)>,
) -> Result<(StepReport, SlotValues)> {
    let (suite, plan) = (si.suite, si.plan);
    let mut z = SlotValues::zeros(plan, suite.modules.len(), suite.n_features);
    let dst = z.up.iter_mut().chain(z.embed.iter_mut()).chain([&mut z.unembed]);
    for (dst, src) in dst.zip(gates.up.iter().chain(&gates.embed).chain([&gates.unembed])) {
        if let (Some(dst), Some(src)) = (dst.as_mut(), src) {
            *dst = crate::util::to_vec(src)?;
        }
    }
    let mut prof = crate::util::profile::Profile::new();
    let (report, grads) = engine_grads(si, batch, spec, params, Some(&z), None, &mut prof)?;
    let Some((mut grads, gz)) = grads else {
        return Ok((report, SlotValues::zeros(plan, suite.modules.len(), suite.n_features)));
    };
    if let Some((opt, clip, lr)) = suite_opt {
        if let Some(c) = clip {
            grads.iter_mut().for_each(|g| clip_module(g, c));
        }
        opt.step(params, &grads, lr);
    }
    prof.report("learn-connections step");
    Ok((report, gz))
}

/// The open gates of a step's sample.
fn open_gates(gates: &crate::pass::autograd::Gates) -> Result<f64> {
    let mut open = 0.0;
    for z in gates.up.iter().chain(&gates.embed).chain([&gates.unembed]).flatten() {
        open += z.gt(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(open)
}
