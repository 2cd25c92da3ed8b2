//! The sparse pruned pass against the dense-masked oracle (`scae::dense_oracle`) on random
//! connection sets of several sizes: features, reconstructions, and the gradients of both
//! losses w.r.t. every suite parameter.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use scae::connections::{Connections, Edge};
use scae::dense_oracle;
use scae::model::Model;
use scae::pruned::{self, Batch, PassOptions, Plan, Wiring};
use scae::suite::Suite;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// xorshift64*: deterministic test randomness without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_connections(suite: &Suite, parallel: bool, c: usize, seed: u64) -> Connections {
    let mut rng = Rng(seed);
    let mut conns = Connections::empty(&suite.modules, suite.n_features);
    for (d, dm) in suite.modules.iter().enumerate() {
        let ups: Vec<usize> = (0..suite.modules.len()).filter(|&u| suite.modules[u].precedes(dm, parallel)).collect();
        if ups.is_empty() {
            continue;
        }
        for i in 0..suite.n_features {
            let want = rng.below(c + 1); // 0..=c edges, some features with none
            let mut es: Vec<Edge> = Vec::new();
            while es.len() < want.min(ups.len() * suite.n_features) {
                let e = Edge { up: ups[rng.below(ups.len())], feature: rng.below(suite.n_features) as u32, score: f32::NAN };
                if !es.iter().any(|x| x.up == e.up && x.feature == e.feature) {
                    es.push(e);
                }
            }
            conns.edges[d][i] = es;
        }
    }
    conns
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn compare(name: &str, suite: &Suite, model: &Model, batch: &Batch, conns: Option<&Connections>, opts: PassOptions) {
    let rt = &model.runtime;
    let parallel = model.cfg().parallel_attn_mlp;
    let dev = Device::Cpu;
    let wiring = match conns {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let plan = Plan::new(suite, wiring, parallel, &dev).unwrap();
    let fast = pruned::forward(suite, rt, &plan, batch, opts).unwrap();
    let slow = dense_oracle::forward(suite, rt, parallel, conns, batch, opts).unwrap();
    for (i, m) in suite.modules.iter().enumerate() {
        let d = max_abs(&(&fast.feats[i] - &slow.feats[i]).unwrap());
        assert!(d <= 1e-4, "{name}: feats {m} differ by {d}");
        let d = max_abs(&(&fast.recon[i] - &slow.recon[i]).unwrap());
        assert!(d <= 1e-4, "{name}: recon {m} differ by {d}");
    }
    for loss_kind in ["mse", "ce"] {
        let (lf, ls) = if loss_kind == "mse" {
            (pruned::mse_loss(suite, batch, &fast).unwrap(), pruned::mse_loss(suite, batch, &slow).unwrap())
        } else {
            (pruned::ce_loss(rt, batch, &fast).unwrap(), pruned::ce_loss(rt, batch, &slow).unwrap())
        };
        let (gf, gs) = (lf.backward().unwrap(), ls.backward().unwrap());
        for (key, var) in suite.named_vars() {
            let zero = var.as_tensor().zeros_like().unwrap();
            let a = gf.get(var.as_tensor()).unwrap_or(&zero);
            let b = gs.get(var.as_tensor()).unwrap_or(&zero);
            let scale = max_abs(b).max(1e-6);
            let rel = max_abs(&(a - b).unwrap()) / scale;
            assert!(rel <= 1e-4, "{name}: {loss_kind} grad {key}: relative diff {rel}");
        }
    }
}

#[test]
fn sparse_pass_matches_dense_masked_oracle() {
    let dev = Device::Cpu;
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let model = Model::load(name, &fixtures().join("models").join(name), &dev).unwrap();
        let suite = Suite::load(&fixtures().join("suites").join(name).join("suite.safetensors"), &dev).unwrap();
        let g = candle_core::safetensors::load(fixtures().join(format!("golden/suite-{name}.safetensors")), &dev).unwrap();
        let tokens = &g["tokens"];
        let out = model.runtime.forward(tokens, true, false).unwrap();
        let batch = Batch::from_forward(tokens, &out).unwrap();
        let parallel = model.cfg().parallel_attn_mlp;
        compare(&format!("{name} all"), &suite, &model, &batch, None, PassOptions::default());
        for (c, seed) in [(0usize, 1u64), (1, 2), (5, 3), (40, 4)] {
            let conns = random_connections(&suite, parallel, c, seed);
            compare(&format!("{name} C={c}"), &suite, &model, &batch, Some(&conns), PassOptions::default());
        }
        let conns = random_connections(&suite, parallel, 8, 9);
        compare(&format!("{name} C=8 consistent-b3"), &suite, &model, &batch, Some(&conns), PassOptions { consistent_attn_bias: true });
    }
}
