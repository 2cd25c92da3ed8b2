//! Golden parity of the pruned pass against the reference `SCAESuite` (jacobcd52/
//! dictionary_learning @ 26dce3c, TL 2.18), written by `tests/fixtures/gen_suite.py`: features
//! and reconstructions with all connections and with the reference's top-C connections, the
//! consistent B3 variant, both losses, and the gradients of both losses w.r.t. every parameter.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use scae::data::Batch;
use scae::formats::connections::Connections;
use scae::formats::suite::Suite;
use scae::model::Model;
use scae::pass::{self, PassOptions, Plan, Wiring};
use scae_testkit::{fixtures, max_abs};

struct Case {
    model: Model,
    suite: Suite,
    golden: HashMap<String, Tensor>,
    batch: Batch,
    name: &'static str,
}

fn case(name: &'static str) -> Case {
    let dev = Device::Cpu;
    let model = Model::load(name, &fixtures().join("models").join(name), &dev).unwrap();
    let suite = Suite::load(&fixtures().join("suites").join(name).join("suite.safetensors"), &dev).unwrap();
    let golden =
        candle_core::safetensors::load(fixtures().join(format!("golden/suite-{name}.safetensors")), &dev).unwrap();
    let tokens = golden["tokens"].clone();
    let out = model.runtime.forward(&tokens, true, false).unwrap();
    let batch = Batch::from_forward(&tokens, &out).unwrap();
    Case { model, suite, golden, batch, name }
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    let b = b.reshape(a.shape()).unwrap();
    max_abs(&(a - b).unwrap())
}

fn check_pass(c: &Case, out: &pass::PassOutput, prefix: &str, recon_too: bool) -> f32 {
    let mut worst = 0f32;
    for (i, m) in c.suite.modules.iter().enumerate() {
        let d = diff(&out.feats[i], &c.golden[&format!("{prefix}.feats.{m}")]);
        assert!(d <= 1e-4, "{} {prefix}.feats.{m}: max abs diff {d}", c.name);
        worst = worst.max(d);
        if recon_too {
            let d = diff(&out.recon[i], &c.golden[&format!("{prefix}.recon.{m}")]);
            assert!(d <= 1e-4, "{} {prefix}.recon.{m}: max abs diff {d}", c.name);
            worst = worst.max(d);
        }
    }
    worst
}

fn reference_connections(c: &Case) -> Connections {
    let parallel = c.model.cfg().parallel_attn_mlp;
    let path = fixtures().join("suites").join(c.name).join("connections-ref.safetensors");
    Connections::load(&path, &c.suite.modules, c.suite.n_features, parallel).unwrap()
}

fn run_family(name: &'static str) {
    let c = case(name);
    let rt = &c.model.runtime;
    let parallel = c.model.cfg().parallel_attn_mlp;
    let dev = Device::Cpu;
    // All connections (the reference's connections=None).
    let plan = Plan::new(&c.suite, Wiring::All, parallel, &dev).unwrap();
    let full = pass::forward(&c.suite, rt, &plan, &c.batch, PassOptions::default()).unwrap();
    let w_full = check_pass(&c, &full, "full", true);
    // The reference's top-C connections.
    let conns = reference_connections(&c);
    assert!(conns.n_edges() > 0);
    let plan = Plan::new(&c.suite, Wiring::Sparse(&conns), parallel, &dev).unwrap();
    let out = pass::forward(&c.suite, rt, &plan, &c.batch, PassOptions::default()).unwrap();
    let w_pruned = check_pass(&c, &out, "pruned", true);
    // Losses.
    let mse = pass::objective::mse_loss(&c.suite, &c.batch, &out).unwrap();
    let ce = pass::objective::ce_loss(rt, &c.batch, &out).unwrap();
    let d_mse = diff(&mse.reshape(1).unwrap(), &c.golden["loss.mse"]);
    let d_ce = diff(&ce.reshape(1).unwrap(), &c.golden["loss.ce"]);
    assert!(d_mse <= 1e-4 && d_ce <= 1e-4, "{name}: loss diffs mse {d_mse} ce {d_ce}");
    // Gradients w.r.t. every suite parameter, relative to the largest reference entry.
    let mut worst_rel = 0f32;
    for (loss_name, loss) in [("mse", &mse), ("ce", &ce)] {
        let grads = loss.backward().unwrap();
        for (key, var) in c.suite.named_vars() {
            let want = &c.golden[&format!("grad.{loss_name}.{key}")];
            let got = grads.get(var.as_tensor()).cloned().unwrap_or_else(|| var.as_tensor().zeros_like().unwrap());
            let scale = max_abs(want).max(1e-8);
            let rel = diff(&got, want) / scale;
            assert!(rel <= 1e-4, "{name}: grad.{loss_name}.{key}: relative diff {rel} (scale {scale})");
            worst_rel = worst_rel.max(rel);
        }
    }
    // Consistent B3 variant.
    let opts = PassOptions { consistent_attn_bias: true };
    let b3 = pass::forward(&c.suite, rt, &plan, &c.batch, opts).unwrap();
    check_pass(&c, &b3, "b3", false);
    eprintln!(
        "{name}: full {w_full:.2e}, pruned {w_pruned:.2e}, losses {d_mse:.2e}/{d_ce:.2e}, grads rel {worst_rel:.2e}"
    );
}

#[test]
fn gpt_neo_pruned_pass_matches_reference() {
    run_family("tiny-neo");
}

#[test]
fn gpt_neox_pruned_pass_matches_reference() {
    run_family("tiny-pythia");
}

#[test]
fn gpt2_pruned_pass_matches_reference() {
    run_family("tiny-gpt2");
}

/// Average contributions (up to the documented factor per module kind) and top-C selection
/// against the reference's `get_avg_contribs` / `get_top_connections`.
fn run_scores(name: &'static str) {
    use scae::scores::ScoreStats;
    let c = case(name);
    let rt = &c.model.runtime;
    let cfg = c.model.cfg();
    let parallel = cfg.parallel_attn_mlp;
    let dev = Device::Cpu;
    let plan = Plan::new(&c.suite, Wiring::All, parallel, &dev).unwrap();
    let full = pass::forward(&c.suite, rt, &plan, &c.batch, PassOptions::default()).unwrap();
    let mut stats = ScoreStats::new(&c.suite, cfg.n_heads, parallel);
    stats.accumulate(&c.suite, &c.batch, &full).unwrap();
    let (b, s, _) = c.batch.resid_pre0.dims3().unwrap();
    let n_c: usize = 6;
    let mut worst = 0f32;
    let mut pairs = 0;
    for (d, dm) in c.suite.modules.iter().enumerate() {
        for (u, um) in c.suite.modules.iter().enumerate() {
            if !um.precedes(dm, parallel) {
                continue;
            }
            pairs += 1;
            let ours = stats.pair_scores(&c.suite, rt, d, u).unwrap();
            // reference = ours × B·S (mlp, plain sum) or ours / (H·S) (attn, ÷ B·H·S²)
            let factor = match dm.kind {
                scae::model::Kind::Mlp => (b * s) as f64,
                scae::model::Kind::Attn => 1.0 / (cfg.n_heads * s) as f64,
            };
            let ours = (ours * factor).unwrap();
            let want = &c.golden[&format!("avg.{dm}.{um}")];
            let rel = diff(&ours, want) / max_abs(want).max(1e-12);
            assert!(rel <= 1e-4, "{name} avg.{dm}.{um}: relative diff {rel}");
            worst = worst.max(rel);
        }
        // top-C across all upstream modules, compared slot by slot with the reference layout.
        let top = stats.top_edges(&c.suite, rt, d, n_c).unwrap();
        for (u, um) in c.suite.modules.iter().enumerate() {
            let Some(want) = c.golden.get(&format!("topc.{dm}.{um}")) else { continue };
            let want = want.to_vec2::<i64>().unwrap();
            for (i, row) in want.iter().enumerate() {
                let mut got: Vec<i64> = top[i].iter().filter(|e| e.up == u).map(|e| e.feature as i64).collect();
                got.resize(n_c, -1);
                assert_eq!(&got, row, "{name} topc.{dm}.{um} row {i}");
            }
        }
    }
    assert!(pairs > 0);
    eprintln!("{name}: avg contributions over {pairs} pairs, max relative diff {worst:.2e}; top-C identical");
}

#[test]
fn gpt_neo_edge_scores_match_reference() {
    run_scores("tiny-neo");
}

#[test]
fn gpt_neox_edge_scores_match_reference() {
    run_scores("tiny-pythia");
}

#[test]
fn gpt2_edge_scores_match_reference() {
    run_scores("tiny-gpt2");
}
