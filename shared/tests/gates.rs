//! Learned connections' gates (docs/MATH.md, "Learned connections"): the gated sparse pass
//! equals the dense oracle whose masks hold the gate values, and the gradients with respect to
//! the gates agree (≤ 1e-4), on upstream and embed edges, mlp and attention targets, through
//! the composed ops and the CPU custom ops; the sampled gates and the expected counts against a
//! direct transcription of the formulas; the gradient with respect to `log α` against central
//! differences of the loss.

use candle_core::{DType, Device, Tensor, Var};
use scae::data::{Batch, FlatBatch};
use scae::formats::connections::{Connections, Edge, EmbedEdge};
use scae::formats::suite::Suite;
use scae::model::Model;
use scae::pass::autograd::{forward_gated, Gates};
use scae::pass::engine::{self, Engine, SlotValues};
use scae::pass::oracle::{forward_masked, Masks};
use scae::pass::{PassOptions, PassOutput, Plan, Wiring};
use scae::train::gates::{GateInit, GateMode, GateParams, GAMMA, ZETA};
use scae::util::rng::SplitMix;
use scae_testkit::{fixtures, max_abs};

fn fixture_case(name: &str) -> (Model, Suite, Batch) {
    let dev = Device::Cpu;
    let model = Model::load(name, &fixtures().join("models").join(name), &dev).unwrap();
    let suite = Suite::load(&fixtures().join("suites").join(name).join("suite.safetensors"), &dev).unwrap();
    let g = candle_core::safetensors::load(fixtures().join(format!("golden/suite-{name}.safetensors")), &dev).unwrap();
    let out = model.runtime.forward(&g["tokens"], true, false).unwrap();
    let batch = Batch::from_forward(&g["tokens"], &out).unwrap();
    (model, suite, batch)
}

/// Random candidates: up to `c` distinct upstream edges per feature, and embed edges (tokens of
/// the batch) into the features of modules 0 and 3.
fn candidates(suite: &Suite, tokens: &[u32], c: usize, seed: u64, parallel: bool) -> Connections {
    let mut rng = SplitMix(seed);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
    let mut conns = Connections::empty(&suite.modules, suite.n_features);
    for (d, dm) in suite.modules.iter().enumerate() {
        let ups: Vec<usize> = (0..suite.modules.len()).filter(|&u| suite.modules[u].precedes(dm, parallel)).collect();
        for i in 0..suite.n_features {
            if !ups.is_empty() {
                let want = below(c + 1);
                while conns.edges[d][i].len() < want {
                    let e = Edge { up: ups[below(ups.len())], feature: below(suite.n_features) as u32, score: 1.0 };
                    if !conns.edges[d][i].iter().any(|x| x.up == e.up && x.feature == e.feature) {
                        conns.edges[d][i].push(e);
                    }
                }
            }
            if d == 0 || d == 3 {
                for _ in 0..below(3) {
                    let t = tokens[below(tokens.len())];
                    if !conns.embed[d][i].iter().any(|e| e.token == t) {
                        conns.embed[d][i].push(EmbedEdge { token: t, score: 1.0 });
                    }
                }
            }
        }
    }
    conns
}

fn loss(suite: &Suite, batch: &Batch, out: &PassOutput) -> Tensor {
    let mut l = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (m, module) in suite.modules.iter().enumerate() {
        let e = (&out.recon[m] - batch.target(module)).unwrap();
        l = (l + e.sqr().unwrap().mean_all().unwrap()).unwrap();
    }
    l
}

/// Gate values per slot of `plan` (`(F, width)` row-major, `None` where a module has none):
/// uniform in (0.1, 0.9), with every fifth slot closed (0) and every fifth open (1) when `hard`.
fn gate_values(plan: &Plan, f: usize, seed: u64, hard: bool) -> SlotValues {
    let mut rng = SplitMix(seed);
    let mut one = |width: usize| -> Vec<f32> {
        (0..f * width)
            .map(|k| match k % 5 {
                1 if hard => 0.0,
                3 if hard => 1.0,
                _ => 0.1 + 0.8 * rng.uniform() as f32,
            })
            .collect()
    };
    let up = (0..4).map(|d| plan.down(d).index.as_ref().map(|ix| one(ix.width))).collect();
    let embed = (0..4).map(|d| plan.down(d).embed.as_ref().map(|ep| one(ep.index.width))).collect();
    // Unembed slots: (V_n, C_u) rows, `f` above counts rows of module slots only.
    let unembed = plan.unembed.as_ref().map(|u| {
        let n = u.index.slot_col.len();
        (0..n)
            .map(|k| match k % 5 {
                1 if hard => 0.0,
                3 if hard => 1.0,
                _ => 0.1 + 0.8 * rng.uniform() as f32,
            })
            .collect()
    });
    SlotValues { up, embed, unembed }
}

/// Gate variables of every slot set, and the autograd pass's gates made of them.
struct GateVars {
    up: Vec<Option<Var>>,
    emb: Vec<Option<Var>>,
    unembed: Option<Var>,
    gates: Gates,
}

/// The values as variables `(F, width)` and as the autograd pass's gates.
fn gate_vars(z: &SlotValues, f: usize, unembed_rows: usize) -> GateVars {
    let var = |v: &Option<Vec<f32>>, rows: usize| {
        v.as_ref().map(|v| {
            Var::from_tensor(&Tensor::from_vec(v.clone(), (rows, v.len() / rows), &Device::Cpu).unwrap()).unwrap()
        })
    };
    let (up, emb): (Vec<_>, Vec<_>) =
        (z.up.iter().map(|v| var(v, f)).collect(), z.embed.iter().map(|v| var(v, f)).collect());
    let unembed = var(&z.unembed, unembed_rows);
    let t = |v: &Option<Var>| v.as_ref().map(|v| v.as_tensor().clone());
    let gates = Gates { up: up.iter().map(t).collect(), embed: emb.iter().map(t).collect(), unembed: t(&unembed) };
    GateVars { up, emb, unembed, gates }
}

/// The gradients of the gate variables in `store` as slot values (zeros where none reached them).
fn grads_of(store: &candle_core::backprop::GradStore, v: &GateVars) -> SlotValues {
    let host = |v: &Option<Var>| {
        v.as_ref().map(|v| {
            store
                .get(v.as_tensor())
                .map_or_else(|| vec![0f32; v.elem_count()], |g| g.flatten_all().unwrap().to_vec1().unwrap())
        })
    };
    SlotValues {
        up: v.up.iter().map(host).collect(),
        embed: v.emb.iter().map(host).collect(),
        unembed: host(&v.unembed),
    }
}

/// The dense oracle with masks holding the gate values `z` (F×F per module pair, F×V for the
/// embedding): its output and the loss's gradient with respect to each candidate's mask entry,
/// by slot.
fn oracle_gate_grads(
    model: &Model,
    suite: &Suite,
    parallel: bool,
    cands: &Connections,
    z: &SlotValues,
    batch: &Batch,
) -> (PassOutput, SlotValues) {
    let (f, dev) = (suite.n_features, Device::Cpu);
    let vocab = model.runtime.weights.w_e.dim(0).unwrap();
    let var = |m: Vec<f32>, cols: usize| Var::from_tensor(&Tensor::from_vec(m, (f, cols), &dev).unwrap()).unwrap();
    let up_masks: Vec<Vec<Option<Var>>> = (0..4)
        .map(|d| {
            (0..4)
                .map(|u| {
                    let zd = z.up[d].as_ref()?;
                    let w = zd.len() / f;
                    let mut m = vec![0f32; f * f];
                    for (i, es) in cands.edges[d].iter().enumerate() {
                        for (c, e) in es.iter().enumerate().filter(|(_, e)| e.up == u) {
                            m[i * f + e.feature as usize] = zd[i * w + c];
                        }
                    }
                    Some(var(m, f))
                })
                .collect()
        })
        .collect();
    let emb_masks: Vec<Option<Var>> = (0..4)
        .map(|d| {
            let zd = z.embed[d].as_ref()?;
            let w = zd.len() / f;
            let mut m = vec![0f32; f * vocab];
            for (i, es) in cands.embed[d].iter().enumerate() {
                for (c, e) in es.iter().enumerate() {
                    m[i * vocab + e.token as usize] = zd[i * w + c];
                }
            }
            Some(var(m, vocab))
        })
        .collect();
    let masks = Masks {
        up: &|d, u| {
            Ok(Some(
                up_masks[d][u]
                    .as_ref()
                    .map_or_else(|| Tensor::zeros((f, f), DType::F32, &dev), |v| Ok(v.as_tensor().clone()))?,
            ))
        },
        embed: &|d| Ok(emb_masks[d].as_ref().map(|v| v.as_tensor().clone())),
    };
    let out = forward_masked(suite, &model.runtime, parallel, &masks, batch, PassOptions::default()).unwrap();
    let store = loss(suite, batch, &out).backward().unwrap();
    let grad = |v: &Var| store.get(v.as_tensor()).map(|t| t.to_vec2::<f32>().unwrap());
    let mut g = z.clone();
    for d in 0..4 {
        if let Some(gd) = g.up[d].as_mut() {
            let w = gd.len() / f;
            gd.fill(0.0);
            for (i, es) in cands.edges[d].iter().enumerate() {
                for (c, e) in es.iter().enumerate() {
                    let m = grad(up_masks[d][e.up].as_ref().unwrap());
                    gd[i * w + c] = m.map_or(0.0, |m| m[i][e.feature as usize]);
                }
            }
        }
        if let Some(gd) = g.embed[d].as_mut() {
            let w = gd.len() / f;
            gd.fill(0.0);
            let m = grad(emb_masks[d].as_ref().unwrap()).unwrap();
            for (i, es) in cands.embed[d].iter().enumerate() {
                for (c, e) in es.iter().enumerate() {
                    gd[i * w + c] = m[i][e.token as usize];
                }
            }
        }
    }
    (out, g)
}

/// The largest difference between two sets of slot values on the candidates' slots, the largest
/// magnitude among `got`, and how many slots were compared.
fn slot_diff(cands: &Connections, f: usize, got: &SlotValues, want: &SlotValues) -> (f32, f32, usize) {
    let (mut worst, mut largest, mut n) = (0f32, 0f32, 0);
    for d in 0..4 {
        let lists = [
            (&got.up[d], &want.up[d], &cands.edges[d].iter().map(Vec::len).collect::<Vec<_>>()),
            (&got.embed[d], &want.embed[d], &cands.embed[d].iter().map(Vec::len).collect::<Vec<_>>()),
        ];
        for (g, w, lens) in lists {
            let (Some(g), Some(w)) = (g, w) else { continue };
            let width = g.len() / f;
            for (i, &len) in lens.iter().enumerate() {
                for c in 0..len {
                    worst = worst.max((g[i * width + c] - w[i * width + c]).abs());
                    largest = largest.max(g[i * width + c].abs());
                    n += 1;
                }
            }
        }
    }
    // Unembed slots: every one (unused slots are 0 on both sides).
    if let (Some(g), Some(w)) = (&got.unembed, &want.unembed) {
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
            largest = largest.max(a.abs());
            n += usize::from(*a != 0.0);
        }
    }
    (worst, largest, n)
}

#[test]
fn gated_pass_and_its_gate_gradients_equal_the_dense_oracle_with_gate_valued_masks() {
    let (model, suite, batch) = fixture_case("tiny-neo");
    let rt = &model.runtime;
    let dev = Device::Cpu;
    let tokens: Vec<u32> = batch.tokens.flatten_all().unwrap().to_vec1().unwrap();
    let cands = candidates(&suite, &tokens, 5, 7, false);
    let f = suite.n_features;
    for composed in [true, false] {
        let mut plan = Plan::new(&suite, Wiring::Sparse(&cands), false, &dev).unwrap();
        plan.force_composed(composed);
        let z = gate_values(&plan, f, 11, false);
        let gv = gate_vars(&z, f, 0);
        let opts = PassOptions::default();
        let out = forward_gated(&suite, rt, &plan, &batch, opts, Some(&gv.gates)).unwrap();
        let store = loss(&suite, &batch, &out).backward().unwrap();
        let got = grads_of(&store, &gv);
        let (want_out, want) = oracle_gate_grads(&model, &suite, false, &cands, &z, &batch);
        for m in 0..4 {
            let d = max_abs(&(&out.feats[m] - &want_out.feats[m]).unwrap());
            assert!(d <= 1e-4, "composed {composed}: feats {m} differ by {d}");
        }
        let (worst, largest, n) = slot_diff(&cands, f, &got, &want);
        assert!(n > 100 && largest > 1e-3, "{n} gates compared, largest gradient {largest}");
        assert!(worst <= 1e-4, "composed {composed}: gate gradients differ by {worst}");
        eprintln!("composed {composed}: {n} gate gradients up to {largest:.2e}, worst difference {worst:.2e}");
    }
}

#[test]
fn the_engines_gated_pass_and_gradients_equal_the_autograd_pass_and_the_oracle() {
    let dev = Device::Cpu;
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let (model, suite, batch) = fixture_case(name);
        let rt = &model.runtime;
        let parallel = model.cfg().parallel_attn_mlp;
        let tokens: Vec<u32> = batch.tokens.flatten_all().unwrap().to_vec1().unwrap();
        let cands = candidates(&suite, &tokens, 5, 13, parallel);
        let f = suite.n_features;
        let plan = Plan::new(&suite, Wiring::Sparse(&cands), parallel, &dev).unwrap();
        let z = gate_values(&plan, f, 5, true);
        // The engine: forward, the reference FVU's gradient, backward.
        let eng = Engine::new(&suite, rt, &plan, PassOptions::default()).unwrap().gated(&z).unwrap();
        let fb = FlatBatch::new(&batch, &suite.modules).unwrap();
        let state = eng.forward(&fb).unwrap();
        let (eng_loss, g_recon) = scae::pass::objective::mse_loss_and_grad(&fb, &state.recons(), suite.d_model);
        let (grads, gz) = eng.backward_gated(&fb, &state, g_recon, None).unwrap();
        // Autograd on the same gates.
        let gv = gate_vars(&z, f, 0);
        let out = forward_gated(&suite, rt, &plan, &batch, PassOptions::default(), Some(&gv.gates)).unwrap();
        let auto_loss = scae::pass::objective::mse_loss(&suite, &batch, &out).unwrap();
        let al = auto_loss.to_scalar::<f32>().unwrap() as f64;
        assert!((al - eng_loss).abs() <= 1e-4 * al.abs().max(1.0), "{name}: loss {al} vs engine {eng_loss}");
        for m in 0..4 {
            let dense = engine::dense_features(&state.modules[m], fb.b * fb.s, f, suite.k, &dev).unwrap();
            let d = max_abs(&(&dense - &out.feats[m]).unwrap());
            assert!(d <= 1e-4, "{name}: engine feats {m} differ by {d}");
        }
        let store = auto_loss.backward().unwrap();
        let want = grads_of(&store, &gv);
        let (worst, largest, n) = slot_diff(&cands, f, &gz, &want);
        assert!(n > 100 && largest > 1e-3, "{name}: {n} gates compared, largest gradient {largest}");
        assert!(worst <= 1e-4, "{name}: engine gate gradients differ from autograd's by {worst}");
        eprintln!("{name}: engine vs autograd, {n} gate gradients up to {largest:.2e}, worst {worst:.2e}");
        // The suite's gradients through the gated weights.
        let tensors = engine::grads_to_tensors(&suite, &grads, &dev).unwrap();
        for ((key, var), got) in suite.named_vars().into_iter().zip(&tensors) {
            let want = store.get(var.as_tensor()).unwrap();
            let (d, scale) = (max_abs(&(got - want).unwrap()), max_abs(want));
            assert!(d <= 1e-4 * scale.max(1.0), "{name}: engine gradient {key} differs by {d} (largest {scale})");
        }
        // The naive oracle (its loss: the mean squared errors, summed).
        if name == "tiny-neo" {
            let (_, want) = oracle_gate_grads(&model, &suite, parallel, &cands, &z, &batch);
            let mse: Vec<Vec<f32>> = state
                .recons()
                .iter()
                .zip(&fb.targets)
                .map(|(r, t)| r.iter().zip(t).map(|(a, b)| 2.0 * (a - b) / r.len() as f32).collect())
                .collect();
            let (_, gz_mse) = eng.backward_gated(&fb, &state, mse, None).unwrap();
            let (worst, largest, n) = slot_diff(&cands, f, &gz_mse, &want);
            assert!(n > 100 && largest > 1e-4, "{name}: {n} gates, largest {largest}");
            assert!(worst <= 1e-4, "{name}: engine vs oracle gate gradients differ by {worst}");
            eprintln!("{name}: engine vs oracle, {n} gate gradients up to {largest:.2e}, worst {worst:.2e}");
        }
    }
}

#[test]
fn the_engines_unembed_gates_and_ce_gradients_equal_autograds() {
    use scae::util::collective::Single;
    let dev = Device::Cpu;
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let (model, suite, batch) = fixture_case(name);
        let rt = &model.runtime;
        let parallel = model.cfg().parallel_attn_mlp;
        let tokens: Vec<u32> = batch.tokens.flatten_all().unwrap().to_vec1().unwrap();
        let (f, n_mod) = (suite.n_features, suite.modules.len());
        let vocab = rt.weights.w_e.dim(0).unwrap();
        let mut cands = candidates(&suite, &tokens, 5, 23, parallel);
        // Up to 6 features per token over the first 3/4 of the vocabulary.
        let mut rng = SplitMix(29);
        let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
        cands.unembed = (0..vocab * 3 / 4)
            .map(|_| {
                let mut es: Vec<Edge> = Vec::new();
                for _ in 0..below(7) {
                    let e = Edge { up: below(n_mod), feature: below(f) as u32, score: 1.0 };
                    if !es.iter().any(|x| x.up == e.up && x.feature == e.feature) {
                        es.push(e);
                    }
                }
                es
            })
            .collect();
        let plan = Plan::new(&suite, Wiring::Sparse(&cands), parallel, &dev).unwrap();
        let z = gate_values(&plan, f, 9, true);
        let rows = plan.unembed.as_ref().unwrap().index.n_down;
        // Autograd: FVU + the spliced CE with gated unembed edges.
        let gv = gate_vars(&z, f, rows);
        let opts = PassOptions::default();
        let out = forward_gated(&suite, rt, &plan, &batch, opts, Some(&gv.gates)).unwrap();
        let ce = scae::pass::objective::ce_per_token_gated(&suite, rt, &plan, &batch, &out, gv.gates.unembed.as_ref())
            .unwrap()
            .mean_all()
            .unwrap();
        let auto_ce = ce.to_scalar::<f32>().unwrap() as f64;
        let auto_loss = (scae::pass::objective::mse_loss(&suite, &batch, &out).unwrap() + ce).unwrap();
        let store = auto_loss.backward().unwrap();
        let want = grads_of(&store, &gv);
        // The engine.
        let eng = Engine::new(&suite, rt, &plan, opts).unwrap().gated(&z).unwrap();
        let fb = FlatBatch::new(&batch, &suite.modules).unwrap();
        let state = eng.forward(&fb).unwrap();
        let (_, mut g_recon) = scae::pass::objective::mse_loss_and_grad(&fb, &state.recons(), suite.d_model);
        let (eng_ce, g, extra) = eng.unembed_ce_loss_and_grad(&Single, &fb, &state).unwrap().expect("unembed edges");
        assert!((eng_ce - auto_ce).abs() <= 1e-4 * auto_ce.abs(), "{name}: CE {eng_ce} vs autograd {auto_ce}");
        for gr in g_recon.iter_mut() {
            gr.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
        let (grads, gz) = eng.backward_gated(&fb, &state, g_recon, Some(extra)).unwrap();
        let unembed_largest = gz.unembed.as_ref().unwrap().iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(unembed_largest > 1e-4, "{name}: unembed gate gradients all ~0 ({unembed_largest})");
        let (worst, largest, n) = slot_diff(&cands, f, &gz, &want);
        assert!(worst <= 1e-4, "{name}: gate gradients under FVU + CE differ from autograd's by {worst}");
        eprintln!("{name}: FVU + CE, {n} gate gradients up to {largest:.2e} (unembed {unembed_largest:.2e}), worst {worst:.2e}");
        let tensors = engine::grads_to_tensors(&suite, &grads, &dev).unwrap();
        for ((key, var), got) in suite.named_vars().into_iter().zip(&tensors) {
            let want = store.get(var.as_tensor()).unwrap();
            let (d, scale) = (max_abs(&(got - want).unwrap()), max_abs(want));
            assert!(d <= 1e-4 * scale.max(1.0), "{name}: engine gradient {key} differs by {d} (largest {scale})");
        }
        // Central differences of the engine's loss in the largest unembed gates (the logits
        // are linear in them and the features do not depend on them).
        let loss_at = |z: &SlotValues| -> f64 {
            let eng = Engine::new(&suite, rt, &plan, opts).unwrap().gated(z).unwrap();
            let st = eng.forward(&fb).unwrap();
            let (mse, _) = scae::pass::objective::mse_loss_and_grad(&fb, &st.recons(), suite.d_model);
            mse + eng.unembed_ce_loss_and_grad(&Single, &fb, &st).unwrap().unwrap().0
        };
        let gu = gz.unembed.as_ref().unwrap();
        let mut order: Vec<usize> = (0..gu.len()).collect();
        order.sort_by(|&a, &b| gu[b].abs().total_cmp(&gu[a].abs()));
        for &k in order.iter().take(4) {
            let eps = 1e-2f32;
            let mut zp = z.clone();
            zp.unembed.as_mut().unwrap()[k] += eps;
            let mut zm = z.clone();
            zm.unembed.as_mut().unwrap()[k] -= eps;
            let fd = (loss_at(&zp) - loss_at(&zm)) / (2.0 * eps as f64);
            assert!(
                (fd - gu[k] as f64).abs() <= 1e-2 * (gu[k] as f64).abs(),
                "{name}: unembed gate {k}: {} vs differences {fd}",
                gu[k]
            );
        }
    }
}

#[test]
fn sampled_gates_and_expected_counts_follow_the_hard_concrete_formulas() {
    let (_model, suite, batch) = fixture_case("tiny-neo");
    let dev = Device::Cpu;
    let tokens: Vec<u32> = batch.tokens.flatten_all().unwrap().to_vec1().unwrap();
    let cands = candidates(&suite, &tokens, 5, 3, false);
    let plan = Plan::new(&suite, Wiring::Sparse(&cands), false, &dev).unwrap();
    let gp = GateParams::new(&plan, &cands, (3, 3), GateInit::Scores, 5, &dev).unwrap();
    let beta = 0.7;
    for mode in [GateMode::Relaxed, GateMode::Hard] {
        let gates = gp.sample(beta, mode, 99).unwrap();
        let mut rng = SplitMix(99);
        for (g, z) in gp.up.iter().chain(&gp.embed).zip(gates.up.iter().chain(&gates.embed)) {
            let (Some(g), Some(z)) = (g, z) else { continue };
            let la = g.log_alpha.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let used = g.used.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let z = z.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for k in 0..la.len() {
                let u = rng.uniform() * (1.0 - 2e-7) + 1e-7;
                let s = 1.0 / (1.0 + (-((u.ln() - (1.0 - u).ln() + la[k] as f64) / beta)).exp());
                let zbar = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0);
                let want = used[k] as f64 * if mode == GateMode::Hard { (zbar > 0.5) as u8 as f64 } else { zbar };
                assert!((z[k] as f64 - want).abs() < 1e-5, "{mode:?} gate {k}: {} vs {want}", z[k]);
            }
        }
    }
    // Expected open gates per feature: Σ_j σ(log α − β ln(−γ/ζ)) over its candidates (relaxed
    // gates), Σ_j σ(log α) (hard gates: open when the logistic noise + log α > 0).
    for mode in [GateMode::Relaxed, GateMode::Hard] {
        let counts = gp.expected_counts(beta, mode).unwrap().to_vec1::<f32>().unwrap();
        let shift = if mode == GateMode::Relaxed { beta * (-GAMMA / ZETA).ln() } else { 0.0 };
        let f = suite.n_features;
        for d in 0..4 {
            for i in 0..f {
                let mut want = 0.0;
                for (g, n) in [(&gp.up[d], cands.edges[d][i].len()), (&gp.embed[d], cands.embed[d][i].len())] {
                    if let Some(g) = g {
                        let la = g.log_alpha.as_tensor().to_vec2::<f32>().unwrap();
                        for k in 0..n {
                            want += 1.0 / (1.0 + (-(la[i][k] as f64 - shift)).exp());
                        }
                    }
                }
                assert!((counts[d * f + i] as f64 - want).abs() < 1e-4, "module {d} feature {i}");
            }
        }
    }
    // Hard gates open with probability σ(log α): over many draws, the share of open gates.
    let draws = 200;
    let g = gp.up[3].as_ref().unwrap();
    let la = g.log_alpha.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let used = g.used.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut open = vec![0f64; la.len()];
    for s in 0..draws {
        let z = gp.sample(beta, GateMode::Hard, 1000 + s).unwrap();
        for (k, v) in z.up[3].as_ref().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().enumerate()
        {
            open[k] += v as f64 / draws as f64;
        }
    }
    let (mut got, mut want) = (0.0, 0.0);
    for k in 0..la.len() {
        got += open[k];
        want += used[k] as f64 / (1.0 + (-(la[k] as f64)).exp());
    }
    assert!((got - want).abs() < 0.05 * want, "open hard gates {got} vs Σ σ(log α) {want}");
}

#[test]
fn the_gradient_with_respect_to_log_alpha_matches_central_differences() {
    let (model, suite, batch) = fixture_case("tiny-neo");
    let rt = &model.runtime;
    let dev = Device::Cpu;
    let tokens: Vec<u32> = batch.tokens.flatten_all().unwrap().to_vec1().unwrap();
    let cands = candidates(&suite, &tokens, 4, 21, false);
    let mut plan = Plan::new(&suite, Wiring::Sparse(&cands), false, &dev).unwrap();
    plan.force_composed(true);
    let gp = GateParams::new(&plan, &cands, (2, 2), GateInit::Zero, 1, &dev).unwrap();
    let (beta, seed) = (1.0, 17);
    let value = |gp: &GateParams| -> (f64, Tensor) {
        let gates = gp.sample(beta, GateMode::Relaxed, seed).unwrap();
        let out = forward_gated(&suite, rt, &plan, &batch, PassOptions::default(), Some(&gates)).unwrap();
        let l = (loss(&suite, &batch, &out) + (gp.penalty(beta, GateMode::Relaxed).unwrap() * 0.01).unwrap()).unwrap();
        (l.to_scalar::<f32>().unwrap() as f64, l)
    };
    let (_, l) = value(&gp);
    let store = l.backward().unwrap();
    // Module 3 (mlp_1): its upstream gates.
    let g = gp.up[3].as_ref().unwrap();
    let grad = store.get(g.log_alpha.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    let base = g.log_alpha.as_tensor().to_vec2::<f32>().unwrap();
    let mut checked = 0;
    for i in 0..suite.n_features {
        for c in 0..cands.edges[3][i].len().min(1) {
            let eps = 1e-2f32;
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i][c] += delta;
                let flat: Vec<f32> = v.concat();
                g.log_alpha.set(&Tensor::from_vec(flat, (base.len(), base[0].len()), &dev).unwrap()).unwrap();
                value(&gp).0
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let got = grad[i][c] as f64;
            assert!(
                (fd - got).abs() <= 2e-2 * got.abs().max(1e-2),
                "gate ({i},{c}): autograd {got} vs differences {fd}"
            );
            checked += 1;
        }
    }
    g.log_alpha.set(&Tensor::from_vec(base.concat(), (base.len(), base[0].len()), &dev).unwrap()).unwrap();
    assert!(checked >= 10, "{checked}");
}
