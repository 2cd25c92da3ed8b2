//! Benchmark helper (not a test): time one pruned forward + backward step (MSE loss) of a
//! suite with a connection set, as `bench/bench_pruned.py` does for the reference.
//!
//! `bench_pruned MODEL_DIR SUITE.safetensors CONNECTIONS TOKENS.safetensors STEPS [engine|autograd|composed|dense]`
//! prints one JSON line: median milliseconds per step (and per forward).
use std::time::Instant;

use candle_core::Device;
use scae::data::{Batch, FlatBatch};
use scae::formats::connections::Connections;
use scae::pass::{self, PassOptions, Plan, Wiring};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let dev = Device::Cpu;
    let model = scae::model::Model::load("bench", std::path::Path::new(&a[1]), &dev)?;
    let suite = scae::formats::suite::Suite::load(std::path::Path::new(&a[2]), &dev)?;
    let parallel = model.cfg().parallel_attn_mlp;
    let conns = Connections::load(std::path::Path::new(&a[3]), &suite.modules, suite.n_features, parallel)?;
    let toks = candle_core::safetensors::load(&a[4], &dev)?["tokens"].clone();
    let steps: usize = a[5].parse()?;
    let mode = a.get(6).map(String::as_str).unwrap_or("engine");
    let out = model.runtime.forward(&toks, true, false)?;
    let batch = Batch::from_forward(&toks, &out)?;
    let mut plan = Plan::new(&suite, Wiring::Sparse(&conns), parallel, &dev)?;
    // "composed": the device-agnostic ops of the GPU path, on the CPU.
    plan.force_composed(mode == "composed");
    let (mut step_ms, mut fwd_ms) = (Vec::new(), Vec::new());
    let fb = FlatBatch::new(&batch, &suite.modules)?;
    for i in 0..steps + 1 {
        let t = Instant::now();
        if mode == "engine" {
            // The fast path: forward, loss gradient, hand-written backward.
            let eng = scae::pass::engine::Engine::new(&suite, &model.runtime, &plan, PassOptions::default())?;
            let state = eng.forward(&fb)?;
            let f = t.elapsed().as_secs_f64() * 1e3;
            let (_, g) = scae::pass::objective::mse_loss_and_grad(&fb, &state.recons(), suite.d_model);
            let grads = eng.backward(&fb, &state, g)?;
            let _t = scae::pass::engine::grads_to_tensors(&suite, &grads, &dev)?;
            if i > 0 {
                step_ms.push(t.elapsed().as_secs_f64() * 1e3);
                fwd_ms.push(f);
            }
            continue;
        }
        let o = if mode == "dense" {
            scae::pass::oracle::forward(&suite, &model.runtime, parallel, Some(&conns), &batch, PassOptions::default())?
        } else {
            pass::forward(&suite, &model.runtime, &plan, &batch, PassOptions::default())?
        };
        let loss = pass::objective::mse_loss(&suite, &batch, &o)?;
        let f = t.elapsed().as_secs_f64() * 1e3;
        let _grads = loss.backward()?;
        let s = t.elapsed().as_secs_f64() * 1e3;
        if i > 0 {
            step_ms.push(s);
            fwd_ms.push(f);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let min = step_ms.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{{\"step_ms\": {:.2}, \"min_step_ms\": {:.2}, \"fwd_ms\": {:.2}, \"edges\": {}}}",
        med(&mut step_ms),
        min,
        med(&mut fwd_ms),
        conns.n_edges()
    );
    Ok(())
}
