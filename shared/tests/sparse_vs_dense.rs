//! The sparse pruned pass against the dense-masked oracle (`scae::dense_oracle`) on random
//! connection sets of several sizes: features, reconstructions, and the gradients of both
//! losses w.r.t. every suite parameter.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use scae::data::Batch;
use scae::formats::connections::{Connections, Edge};
use scae::formats::suite::Suite;
use scae::model::Model;
use scae::pass::oracle as dense_oracle;
use scae::pass::{self, PassOptions, PassOutput, Plan, Wiring};
use scae::util::collective::Single;
use scae_testkit::{fixtures, max_abs};

/// The fixture model, its suite and a batch of the suite golden's tokens.
fn fixture_case(name: &str) -> (Model, Suite, Batch) {
    let dev = Device::Cpu;
    let model = Model::load(name, &fixtures().join("models").join(name), &dev).unwrap();
    let suite = Suite::load(&fixtures().join("suites").join(name).join("suite.safetensors"), &dev).unwrap();
    let g = candle_core::safetensors::load(fixtures().join(format!("golden/suite-{name}.safetensors")), &dev).unwrap();
    let out = model.runtime.forward(&g["tokens"], true, false).unwrap();
    let batch = Batch::from_forward(&g["tokens"], &out).unwrap();
    (model, suite, batch)
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
                let e = Edge {
                    up: ups[rng.below(ups.len())],
                    feature: rng.below(suite.n_features) as u32,
                    score: f32::NAN,
                };
                if !es.iter().any(|x| x.up == e.up && x.feature == e.feature) {
                    es.push(e);
                }
            }
            conns.edges[d][i] = es;
        }
    }
    conns
}

/// Features and reconstructions of two passes agree to 1e-4 (absolute).
fn assert_outputs_close(label: &str, suite: &Suite, got: &PassOutput, want: &PassOutput) {
    for (i, m) in suite.modules.iter().enumerate() {
        let d = max_abs(&(&got.feats[i] - &want.feats[i]).unwrap());
        assert!(d <= 1e-4, "{label}: feats {m} differ by {d}");
        let d = max_abs(&(&got.recon[i] - &want.recon[i]).unwrap());
        assert!(d <= 1e-4, "{label}: recon {m} differ by {d}");
    }
}

/// `store`'s gradient of `var` (zeros when the loss does not reach it).
fn grad_of(store: &GradStore, var: &Var) -> Tensor {
    store.get(var.as_tensor()).cloned().unwrap_or_else(|| var.as_tensor().zeros_like().unwrap())
}

/// A gradient agrees with the wanted one to 1e-4 relative to the wanted one's largest entry.
fn assert_grad_close(label: &str, got: &Tensor, want: &Tensor) {
    let scale = max_abs(want).max(1e-6);
    let rel = max_abs(&(got - want).unwrap()) / scale;
    assert!(rel <= 1e-4, "{label}: relative diff {rel} (scale {scale})");
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
    let slow = dense_oracle::forward(suite, rt, parallel, conns, batch, opts).unwrap();
    // Both the CPU custom ops and the composed ops of the GPU path.
    for composed in [false, true] {
        let mut plan = plan.clone();
        plan.force_composed(composed);
        let name = &format!("{name} composed={composed}");
        let fast = pass::forward(suite, rt, &plan, batch, opts).unwrap();
        assert_outputs_close(name, suite, &fast, &slow);
        for loss_kind in ["mse", "ce"] {
            let (lf, ls) = if loss_kind == "mse" {
                (
                    pass::objective::mse_loss(suite, batch, &fast).unwrap(),
                    pass::objective::mse_loss(suite, batch, &slow).unwrap(),
                )
            } else {
                (
                    pass::objective::ce_loss(rt, batch, &fast).unwrap(),
                    pass::objective::ce_loss(rt, batch, &slow).unwrap(),
                )
            };
            let (gf, gs) = (lf.backward().unwrap(), ls.backward().unwrap());
            for (key, var) in suite.named_vars() {
                assert_grad_close(&format!("{name}: {loss_kind} grad {key}"), &grad_of(&gf, var), &grad_of(&gs, var));
            }
        }
    }
}

#[test]
fn sparse_pass_matches_dense_masked_oracle() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let (model, suite, batch) = fixture_case(name);
        let parallel = model.cfg().parallel_attn_mlp;
        compare(&format!("{name} all"), &suite, &model, &batch, None, PassOptions::default());
        for (c, seed) in [(0usize, 1u64), (1, 2), (5, 3), (40, 4)] {
            let conns = random_connections(&suite, parallel, c, seed);
            compare(&format!("{name} C={c}"), &suite, &model, &batch, Some(&conns), PassOptions::default());
        }
        let conns = random_connections(&suite, parallel, 8, 9);
        compare(
            &format!("{name} C=8 consistent-b3"),
            &suite,
            &model,
            &batch,
            Some(&conns),
            PassOptions { consistent_attn_bias: true },
        );
    }
}

/// The fast engine (hand-written backward) against the autograd pass: features,
/// reconstructions, both losses and every parameter gradient.
fn compare_engine(
    name: &str,
    suite: &Suite,
    model: &Model,
    batch: &Batch,
    conns: Option<&Connections>,
    opts: PassOptions,
) {
    use scae::data::FlatBatch;
    use scae::pass::engine::{self, Engine};
    let rt = &model.runtime;
    let parallel = model.cfg().parallel_attn_mlp;
    let dev = Device::Cpu;
    let wiring = match conns {
        Some(c) => Wiring::Sparse(c),
        None => Wiring::All,
    };
    let plan = Plan::new(suite, wiring, parallel, &dev).unwrap();
    let auto = pass::forward(suite, rt, &plan, batch, opts).unwrap();
    // The engine's value-only pass (evaluate, score-edges).
    let values = pass::ValuePass::new(suite, rt, &plan, opts, &dev).unwrap().run(batch).unwrap();
    assert_outputs_close(&format!("{name}: value pass"), suite, &values, &auto);
    let eng = Engine::new(suite, rt, &plan, opts).unwrap();
    let fb = FlatBatch::new(batch, &suite.modules).unwrap();
    let state = eng.forward(&fb).unwrap();
    let n = fb.b * fb.s;
    for (i, m) in suite.modules.iter().enumerate() {
        let dense = engine::dense_features(&state.modules[i], n, suite.n_features, suite.k, &dev).unwrap();
        let d = max_abs(&(&dense - &auto.feats[i]).unwrap());
        assert!(d <= 1e-4, "{name}: engine feats {m} differ by {d}");
        let rec = Tensor::from_vec(state.modules[i].recon.clone(), auto.recon[i].shape(), &dev).unwrap();
        let d = max_abs(&(&rec - &auto.recon[i]).unwrap());
        assert!(d <= 1e-4, "{name}: engine recon {m} differ by {d}");
    }
    for loss_kind in ["mse", "ce"] {
        let (auto_loss, (eng_loss, g_recon)) = if loss_kind == "mse" {
            (
                pass::objective::mse_loss(suite, batch, &auto).unwrap(),
                pass::objective::mse_loss_and_grad(&fb, &state.recons(), suite.d_model),
            )
        } else {
            (
                pass::objective::ce_loss(rt, batch, &auto).unwrap(),
                pass::objective::ce_loss_and_grad(rt, &fb, &state.recons(), suite.d_model)
                    .map(|(l, g)| (l, vec![g; suite.modules.len()]))
                    .unwrap(),
            )
        };
        let al = auto_loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (al - eng_loss).abs() <= 1e-4 * al.abs().max(1.0),
            "{name}: {loss_kind} loss {al} vs engine {eng_loss}"
        );
        let ga = auto_loss.backward().unwrap();
        let grads = eng.backward(&fb, &state, g_recon.clone()).unwrap();
        if loss_kind == "mse" {
            // With no room for the attention edge factors, the backward forms them again: the
            // same bits.
            let eng0 = Engine::new(suite, rt, &plan, opts).unwrap().with_factor_budget(0);
            let again = eng0.backward(&fb, &eng0.forward(&fb).unwrap(), g_recon).unwrap();
            for (g, a) in grads.iter().zip(&again) {
                for ((key, x), (_, y)) in g.named().into_iter().zip(a.named()) {
                    assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name}: {key} recomputed");
                }
            }
        }
        let tensors = engine::grads_to_tensors(suite, &grads, &dev).unwrap();
        for ((key, var), got) in suite.named_vars().into_iter().zip(&tensors) {
            assert_grad_close(&format!("{name}: engine {loss_kind} grad {key}"), got, &grad_of(&ga, var));
        }
    }
}

#[test]
fn engine_matches_autograd_pass() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let (model, suite, batch) = fixture_case(name);
        let parallel = model.cfg().parallel_attn_mlp;
        let consistent = PassOptions { consistent_attn_bias: true };
        compare_engine(&format!("{name} all"), &suite, &model, &batch, None, PassOptions::default());
        compare_engine(&format!("{name} all consistent-b3"), &suite, &model, &batch, None, consistent);
        for (c, seed) in [(0usize, 11u64), (3, 12), (40, 13)] {
            let conns = random_connections(&suite, parallel, c, seed);
            compare_engine(&format!("{name} C={c}"), &suite, &model, &batch, Some(&conns), PassOptions::default());
            compare_engine(&format!("{name} C={c} consistent-b3"), &suite, &model, &batch, Some(&conns), consistent);
        }
    }
}

/// The engine against the autograd pass at real-shape-like dimensions: 16 heads and F = 3072
/// (a random GPT-Neo from `toy-lm --steps 0`, d_model 128, two layers, 2 × 16 tokens), with
/// C = 16 and C = 64, and F = 24,576 with C = 16.
#[test]
fn engine_matches_autograd_pass_at_sixteen_heads_and_f_3072_and_24576() {
    use scae::sae::init::init_params;
    use scae::util::rng::SplitMix;
    let dir = scae_testkit::scratch("sixteen-heads");
    let toy = dir.join("toy");
    let toy_args = ["--d-model", "128", "--n-heads", "16", "--n-layers", "2", "--ctx-len", "16", "--steps", "0"];
    let mut args = vec!["--out", scae_testkit::s(&toy), "--n-stories", "60", "--n-heldout", "10"];
    args.extend(toy_args);
    scae_testkit::tool_ok("toy-lm", &args);
    let dev = Device::Cpu;
    let model = Model::load("toy", &toy.join("model"), &dev).unwrap();
    assert_eq!(model.cfg().n_heads, 16);
    let vocab = model.cfg().d_vocab as u64;
    let mut rng = SplitMix(5);
    let ids: Vec<u32> = (0..2 * 16).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let tokens = Tensor::from_vec(ids, (2, 16), &dev).unwrap();
    let batch = Batch::from_forward(&tokens, &model.runtime.forward(&tokens, true, false).unwrap()).unwrap();
    let d = 128;
    let modules = scae::model::Module::all(2);
    // F 3072 at C 16 and 64; F 24,576 (GPT-2 small's 32×) shows no feature-count ceiling.
    for (f, cs) in [(3072, &[(16usize, 31u64), (64, 32)][..]), (24_576, &[(16, 33)][..])] {
        let params: Vec<_> = modules
            .iter()
            .map(|_| {
                let mut p = init_params(d, f, &mut rng);
                p.b_enc.iter_mut().for_each(|b| *b = (rng.normal() * 0.02) as f32);
                p.b_dec.iter_mut().for_each(|b| *b = (rng.normal() * 0.01) as f32);
                p
            })
            .collect();
        let suite = Suite::from_params(&params, &modules, 16, d, f).unwrap();
        for &(c, seed) in cs {
            let conns = random_connections(&suite, false, c, seed);
            let name = format!("16 heads F {f} C={c}");
            compare_engine(&name, &suite, &model, &batch, Some(&conns), PassOptions::default());
        }
    }
}

/// AuxK through the pruned pass: its gradient w.r.t. the parameters of dead latents that the
/// top-k never selects (the only parameters the detached residual target does not depend on)
/// equals central finite differences of FVU + α·AuxK.
#[test]
fn engine_auxk_gradient_matches_finite_differences() {
    use scae::data::FlatBatch;
    use scae::pass::engine::Engine;
    let dev = Device::Cpu;
    let name = "tiny-neo";
    let (model, suite, batch) = fixture_case(name);
    let conns = random_connections(&suite, false, 5, 21);
    let plan = Plan::new(&suite, Wiring::Sparse(&conns), false, &dev).unwrap();
    let fb = FlatBatch::new(&batch, &suite.modules).unwrap();
    let (f, d) = (suite.n_features, suite.d_model);
    let alpha = 0.7;
    // Dead = never selected on this batch.
    let plain = Engine::new(&suite, &model.runtime, &plan, PassOptions::default()).unwrap().forward(&fb).unwrap();
    // At most D/2 per module, so that every dead latent is among the k_aux = n_dead AuxK latents
    // (no selection among dead latents to switch under a perturbation).
    let dead: Vec<Vec<bool>> = plain
        .modules
        .iter()
        .map(|st| {
            let mut n = 0;
            (0..f)
                .map(|i| {
                    let never = !st.idx.iter().any(|&j| j as usize == i);
                    let take = never && n < d / 2;
                    n += usize::from(take);
                    take
                })
                .collect()
        })
        .collect();
    assert!(dead.iter().all(|m| m.iter().any(|&x| x)), "every module needs a dead latent");
    let base = suite.host_params().unwrap();
    let loss_at = |p: &Vec<scae::sae::AeParams<Vec<f32>>>| -> f64 {
        suite.set_params(p).unwrap();
        let eng = Engine::new(&suite, &model.runtime, &plan, PassOptions::default()).unwrap();
        let mut st = eng.forward_with_dead(&fb, Some(&dead)).unwrap();
        let (mse, _) = pass::objective::mse_loss_and_grad(&fb, &st.recons(), d);
        let aux: f64 = eng.auxk_loss_and_grad(&Single, &fb, &mut st, alpha).unwrap().iter().sum();
        mse + alpha * aux
    };
    suite.set_params(&base).unwrap();
    let eng = Engine::new(&suite, &model.runtime, &plan, PassOptions::default()).unwrap();
    let mut st = eng.forward_with_dead(&fb, Some(&dead)).unwrap();
    assert!(st.modules.iter().all(|m| m.aux.as_ref().is_some_and(|a| a.k_aux > 0)));
    let (_, g_rec) = pass::objective::mse_loss_and_grad(&fb, &st.recons(), d);
    eng.auxk_loss_and_grad(&Single, &fb, &mut st, alpha).unwrap();
    let grads = eng.backward(&fb, &st, g_rec).unwrap();
    let h = 1e-3f32;
    let (mut errors, mut checked, mut nonzero) = (Vec::new(), 0, 0);
    for (m, dm) in dead.iter().enumerate() {
        for i in (0..f).filter(|&i| dm[i]) {
            // encoder row entries, the encoder bias, decoder column entries
            let slots: Vec<(usize, usize)> =
                (0..d).map(|j| (0, i * d + j)).chain([(1, i)]).chain((0..d).map(|j| (2, j * f + i))).collect();
            for (which, j) in slots {
                let mut p = base.clone();
                p[m].each_mut()[which][j] += h;
                let up = loss_at(&p);
                p[m].each_mut()[which][j] -= 2.0 * h;
                let down = loss_at(&p);
                let fd = (up - down) / (2.0 * h as f64);
                let an = grads[m].each()[which][j] as f64;
                if an != 0.0 {
                    nonzero += 1;
                }
                let err = (fd - an).abs() / (1e-2 + fd.abs());
                if err > 3e-2 && std::env::var("SCAE_DEBUG").is_ok() {
                    eprintln!("module {m} latent {i} param {which} idx {j}: fd {fd:.5} an {an:.5}");
                }
                errors.push(err);
                checked += 1;
            }
        }
    }
    suite.set_params(&base).unwrap();
    assert!(nonzero > 0, "AuxK gave no gradient to dead latents");
    // A perturbation can still push a latent across the main top-k or its ReLU kink (a
    // discontinuity finite differences straddle): require almost all entries to agree.
    errors.sort_by(|a, b| a.total_cmp(b));
    let bad = errors.iter().filter(|&&e| e > 3e-2).count();
    let median = errors[errors.len() / 2];
    assert!(
        bad * 50 <= checked && median < 1e-2,
        "AuxK gradient vs finite differences: {bad} of {checked} entries off by > 3e-2, median {median}"
    );
}

/// Host copy of a tensor.
fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// Embed and unembed edges in the dense oracle (docs/MATH.md, "Embed and unembed
/// connections"). With every token wired into every feature, and every feature into every
/// token, the pass and the logits are today's. With a few edges, the change of a module's
/// pre-activation (embed edges on that module only) and of the logits equals the removed
/// terms summed by scalar loops: mlp `([tok_t ∈ E(i)] − 1) E_i·W_E[tok_t] / s2[t]`, attention
/// the same through `W_OV[h]` mixed by the pattern, logits
/// `−Σ_{(m,j) ∉ U(v)} f_m[t,j] W_dec^m[:,j]·W_U[:,v] / s[t]`.
#[test]
fn oracle_with_every_end_edge_equals_the_dense_ends() {
    use dense_oracle::{EmbedEdges, UnembedEdges};
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let (model, suite, batch) = fixture_case(name);
        let rt = &model.runtime;
        let parallel = model.cfg().parallel_attn_mlp;
        let opts = PassOptions::default();
        let (f, d, n_mod) = (suite.n_features, suite.d_model, suite.modules.len());
        let vocab = rt.weights.w_e.dim(0).unwrap();
        let (b, s, _) = batch.resid_pre0.dims3().unwrap();
        let n = b * s;
        let conns = random_connections(&suite, parallel, 5, 21);
        let dense = dense_oracle::forward(&suite, rt, parallel, Some(&conns), &batch, opts).unwrap();

        // Every end edge present: today's pass and logits.
        let every_token: EmbedEdges = vec![Some(vec![(0..vocab as u32).collect(); f]); n_mod];
        let ends =
            dense_oracle::forward_with_ends(&suite, rt, parallel, Some(&conns), Some(&every_token), &batch, opts)
                .unwrap();
        assert_outputs_close(&format!("{name}: every embed edge"), &suite, &ends, &dense);
        let every_feature: UnembedEdges =
            vec![(0..n_mod).flat_map(|m| (0..f as u32).map(move |j| (m, j))).collect(); vocab];
        let logits = dense_oracle::logits_with_ends(&suite, rt, &batch, &dense, &every_feature).unwrap();
        let resid = pass::objective::spliced_resid(&batch, &dense).unwrap();
        let want = rt.unembed(&resid).unwrap().reshape((n, vocab)).unwrap();
        let (diff, big) = (max_abs(&(&logits - &want).unwrap()), max_abs(&want));
        assert!(diff <= 1e-4 * big.max(1.0), "{name}: logits with every unembed edge differ by {diff} (max {big})");

        // A few embed edges per feature: tokens of the batch and one that is absent.
        let toks: Vec<u32> =
            host(&batch.tokens.to_dtype(candle_core::DType::F32).unwrap()).iter().map(|&x| x as u32).collect();
        let absent = (0..vocab as u32).find(|v| !toks.contains(v)).unwrap();
        let lists: Vec<Vec<u32>> = (0..f)
            .map(|i| {
                let mut l = vec![toks[(i * 7) % n], toks[(i * 3 + 1) % n], absent];
                l.sort_unstable();
                l.dedup();
                l
            })
            .collect();
        let w_e = host(&rt.weights.w_e);
        let (mlp0, attn0) = (1usize, 0usize); // mlp_0, attn_0
        for target in [mlp0, attn0] {
            let mut embed: EmbedEdges = vec![None; n_mod];
            embed[target] = Some(lists.clone());
            let ends = dense_oracle::forward_with_ends(&suite, rt, parallel, Some(&conns), Some(&embed), &batch, opts)
                .unwrap();
            let got: Vec<f32> = host(&(&ends.pre[target] - &dense.pre[target]).unwrap());
            let enc = host(suite.aes[target].w_enc.as_tensor());
            let e_dot = |i: usize, x: &[f32]| -> f32 { (0..d).map(|c| enc[i * d + c] * x[c]).sum() };
            let mut want = vec![0f32; n * f];
            if target == mlp0 {
                let s2 = host(&batch.ln2_scale[0]);
                for t in 0..n {
                    let row = &w_e[toks[t] as usize * d..(toks[t] as usize + 1) * d];
                    for i in 0..f {
                        if !lists[i].contains(&toks[t]) {
                            want[t * f + i] = -e_dot(i, row) / s2[t];
                        }
                    }
                }
            } else {
                let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
                let (w_v, w_o) = rt.flat_vo(0);
                let (w_v, w_o) = (host(w_v), host(w_o)); // (D, H·dh), (H·dh, D)
                let (s1, pat) = (host(&batch.ln1_scale[0]), host(&batch.pattern[0]));
                // x W_OV[h] for x = W_E[tok_p], by loops.
                let ov = |x: &[f32], hh: usize| -> Vec<f32> {
                    let v: Vec<f32> =
                        (0..dh).map(|e| (0..d).map(|c| x[c] * w_v[c * h * dh + hh * dh + e]).sum()).collect();
                    (0..d).map(|o| (0..dh).map(|e| v[e] * w_o[(hh * dh + e) * d + o]).sum()).collect()
                };
                for bi in 0..b {
                    for p in 0..s {
                        let t = bi * s + p;
                        let row = &w_e[toks[t] as usize * d..(toks[t] as usize + 1) * d];
                        for hh in 0..h {
                            let xo = ov(row, hh);
                            for i in 0..f {
                                if lists[i].contains(&toks[t]) {
                                    continue;
                                }
                                let w = e_dot(i, &xo) / s1[t];
                                for q in p..s {
                                    want[(bi * s + q) * f + i] -= pat[((bi * h + hh) * s + q) * s + p] * w;
                                }
                            }
                        }
                    }
                }
            }
            let big = want.iter().fold(0f32, |a, x| a.max(x.abs()));
            assert!(big > 1e-3, "{name}: the removed embed terms of module {target} are all ~0");
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-4 * big.max(1.0), "{name}: module {target} Δpre[{j}] {g} vs loops {w}");
            }
        }

        // A few unembed edges per token: Δlogit[t, v] = −Σ_{(m,j) ∉ U(v)} f_m[t,j] W_dec^m[:,j]·W_U[:,v] / s[t].
        let mut rng = Rng(77);
        let few: UnembedEdges =
            (0..vocab).map(|_| (0..6).map(|_| (rng.below(n_mod), rng.below(f) as u32)).collect()).collect();
        let sparse = dense_oracle::logits_with_ends(&suite, rt, &batch, &dense, &few).unwrap();
        let got = host(&(&sparse - &logits).unwrap());
        let r = host(&resid);
        let scale: Vec<f32> = r
            .chunks(d)
            .map(|x| {
                let mu = x.iter().sum::<f32>() / d as f32;
                (x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d as f32 + rt.cfg.ln_eps as f32).sqrt()
            })
            .collect();
        let w_u = host(&rt.weights.w_u); // (D, V)
        let feats: Vec<Vec<f32>> = dense.feats.iter().map(host).collect();
        let decs: Vec<Vec<f32>> = suite.aes.iter().map(|ae| host(ae.w_dec.as_tensor())).collect(); // (D, F)
        let mut big = 0f32;
        for v in (0..vocab).step_by(vocab.div_ceil(24)) {
            for t in 0..n {
                let mut want = 0f32;
                for m in 0..n_mod {
                    for j in 0..f {
                        let z = feats[m][t * f + j];
                        if z != 0.0 && !few[v].contains(&(m, j as u32)) {
                            let u: f32 = (0..d).map(|c| decs[m][c * f + j] * w_u[c * vocab + v]).sum();
                            want -= z * u / scale[t];
                        }
                    }
                }
                big = big.max(want.abs());
                let g = got[t * vocab + v];
                assert!((g - want).abs() <= 1e-4 * want.abs().max(1.0), "{name}: Δlogit[{t}, {v}] {g} vs loops {want}");
            }
        }
        assert!(big > 1e-3, "{name}: the removed unembed terms are all ~0");
    }
}

/// `conns` plus up to `ce` embed edges per feature of every module in `modules` (tokens drawn
/// from `toks`, the batch's, and from the whole vocabulary).
fn with_embed(conns: &Connections, modules: &[usize], toks: &[u32], vocab: usize, ce: usize, seed: u64) -> Connections {
    use scae::formats::connections::EmbedEdge;
    let mut rng = Rng(seed);
    let mut out = conns.clone();
    for &d in modules {
        for es in out.embed[d].iter_mut() {
            let want = rng.below(ce + 1);
            while es.len() < want {
                let token = if rng.below(3) == 0 { rng.below(vocab) as u32 } else { toks[rng.below(toks.len())] };
                if !es.iter().any(|e| e.token == token) {
                    es.push(EmbedEdge { token, score: f32::NAN });
                }
            }
        }
    }
    out
}

/// Embed edges through every path: the autograd pass (CPU custom ops and composed) against the
/// dense oracle, the engine against the autograd pass (values and every gradient, both
/// losses), on all modules and on attn_0 / mlp_0 alone; and with every token wired into every
/// feature, the engine's pass equals the one without embed edges.
#[test]
fn embed_edges_match_the_dense_oracle_on_every_path() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let (model, suite, batch) = fixture_case(name);
        let parallel = model.cfg().parallel_attn_mlp;
        let vocab = model.runtime.weights.w_e.dim(0).unwrap();
        let toks: Vec<u32> = host(&batch.tokens).iter().map(|&x| x as u32).collect();
        let every: Vec<usize> = (0..suite.modules.len()).collect();
        let opts = PassOptions::default();
        for (c, ce, modules, seed) in [(5usize, 4usize, every.clone(), 41u64), (0, 6, vec![0], 42), (3, 6, vec![1], 43)]
        {
            let conns = with_embed(&random_connections(&suite, parallel, c, seed), &modules, &toks, vocab, ce, seed);
            assert!(conns.n_embed_edges() > 0);
            let label = format!("{name} C={c} embed C={ce} on {modules:?}");
            compare(&label, &suite, &model, &batch, Some(&conns), opts);
            compare_engine(&label, &suite, &model, &batch, Some(&conns), opts);
        }
        // Every token into every feature of every module: the dense embedding term exactly.
        let base = random_connections(&suite, parallel, 5, 44);
        let mut full = base.clone();
        for d in 0..suite.modules.len() {
            for es in full.embed[d].iter_mut() {
                *es = (0..vocab as u32)
                    .map(|token| scae::formats::connections::EmbedEdge { token, score: f32::NAN })
                    .collect();
            }
        }
        let dev = Device::Cpu;
        let pass_of = |c: &Connections| {
            let plan = Plan::new(&suite, Wiring::Sparse(c), parallel, &dev).unwrap();
            pass::ValuePass::new(&suite, &model.runtime, &plan, opts, &dev).unwrap().run(&batch).unwrap()
        };
        assert_outputs_close(&format!("{name}: every embed edge"), &suite, &pass_of(&full), &pass_of(&base));
    }
}

/// Embed edge scores (docs/MATH.md, "Embed and unembed connections") against scalar loops:
/// the mean over tokens of the edge's term in the downstream pre-activation, for mlp_0 and
/// attn_0 — `(E_i·W_E[v]) Σ_t [tok_t = v]/s2[t] / N`, and through `W_OV[h]` mixed by the
/// pattern for attention; every token of the batch is a candidate of every feature.
#[test]
fn embed_edge_scores_match_loops() {
    use scae::formats::connections::EMBED_UP;
    for name in ["tiny-neo", "tiny-pythia"] {
        let (model, suite, batch) = fixture_case(name);
        let rt = &model.runtime;
        let parallel = model.cfg().parallel_attn_mlp;
        let (f, d) = (suite.n_features, suite.d_model);
        let vocab = rt.weights.w_e.dim(0).unwrap();
        let (b, s, _) = batch.resid_pre0.dims3().unwrap();
        let n = b * s;
        let plan = Plan::new(&suite, Wiring::All, parallel, &Device::Cpu).unwrap();
        let out = pass::forward(&suite, rt, &plan, &batch, PassOptions::default()).unwrap();
        let mut stats = scae::ScoreStats::new(&suite, rt.cfg.n_heads, parallel).with_embed(vocab);
        stats.accumulate(&suite, &batch, &out).unwrap();
        let toks: Vec<u32> = host(&batch.tokens).iter().map(|&x| x as u32).collect();
        let mut distinct = toks.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let w_e = host(&rt.weights.w_e);
        for target in [0usize, 1] {
            let cands = stats.top_edges(&suite, rt, target, f * suite.modules.len() + vocab).unwrap();
            let enc = host(suite.aes[target].w_enc.as_tensor());
            let e_dot = |i: usize, x: &[f32]| -> f64 { (0..d).map(|c| enc[i * d + c] as f64 * x[c] as f64).sum() };
            // want[i][v]: the loops' score of v -> i.
            let mut want = vec![vec![0f64; vocab]; f];
            if target == 1 {
                let s2 = host(&batch.ln2_scale[0]);
                for t in 0..n {
                    let v = toks[t] as usize;
                    for (i, w) in want.iter_mut().enumerate() {
                        w[v] += e_dot(i, &w_e[v * d..(v + 1) * d]) / s2[t] as f64 / n as f64;
                    }
                }
            } else {
                let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
                let (w_v, w_o) = rt.flat_vo(0);
                let (w_v, w_o) = (host(w_v), host(w_o));
                let (s1, pat) = (host(&batch.ln1_scale[0]), host(&batch.pattern[0]));
                for t in 0..n {
                    let (bi, p, v) = (t / s, t % s, toks[t] as usize);
                    for hh in 0..h {
                        let x = &w_e[v * d..(v + 1) * d];
                        let xv: Vec<f32> =
                            (0..dh).map(|e| (0..d).map(|c| x[c] * w_v[c * h * dh + hh * dh + e]).sum()).collect();
                        let xo: Vec<f32> =
                            (0..d).map(|o| (0..dh).map(|e| xv[e] * w_o[(hh * dh + e) * d + o]).sum()).collect();
                        let colsum: f32 = (p..s).map(|q| pat[((bi * h + hh) * s + q) * s + p]).sum();
                        for (i, w) in want.iter_mut().enumerate() {
                            w[v] += e_dot(i, &xo) * (colsum / s1[t]) as f64 / n as f64;
                        }
                    }
                }
            }
            let big = want.iter().flatten().fold(0f64, |a, x| a.max(x.abs()));
            assert!(big > 1e-4, "{name}: module {target}: embed scores all ~0");
            for (i, cs) in cands.iter().enumerate() {
                let embed: Vec<_> = cs.iter().filter(|e| e.up == EMBED_UP).collect();
                assert_eq!(
                    embed.len(),
                    distinct.len(),
                    "{name}: module {target} feature {i}: one candidate per token seen"
                );
                for e in embed {
                    let w = want[i][e.feature as usize];
                    assert!(
                        (e.score as f64 - w).abs() <= 1e-4 * big,
                        "{name}: module {target}: score of embed:{} -> {i}: {} vs loops {w}",
                        e.feature,
                        e.score
                    );
                }
            }
        }
    }
}

/// Unembed edges in the spliced CE (docs/MATH.md, "Embed and unembed connections"): the CE of
/// the autograd pass (custom op and composed) and every parameter gradient equal the dense
/// oracle's (`logits_with_ends`); the engine's host CE and its gradients (through the
/// reconstructions and past them) equal autograd's; and with every feature wired into every
/// token the CE is today's.
#[test]
fn unembed_edges_match_the_dense_oracle_and_the_engine() {
    use scae::data::FlatBatch;
    use scae::formats::connections::Edge;
    use scae::pass::engine::{self, Engine};
    let dev = Device::Cpu;
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let (model, suite, batch) = fixture_case(name);
        let rt = &model.runtime;
        let parallel = model.cfg().parallel_attn_mlp;
        let (f, n_mod) = (suite.n_features, suite.modules.len());
        let vocab = rt.weights.w_e.dim(0).unwrap();
        let opts = PassOptions::default();
        let mut conns = random_connections(&suite, parallel, 5, 51);
        let mut rng = Rng(52);
        // Up to 6 features per token over the first 3/4 of the vocabulary (the rest read none).
        conns.unembed = (0..vocab * 3 / 4)
            .map(|_| {
                let mut es: Vec<Edge> = Vec::new();
                for _ in 0..rng.below(7) {
                    let e = Edge { up: rng.below(n_mod), feature: rng.below(f) as u32, score: f32::NAN };
                    if !es.iter().any(|x| x.up == e.up && x.feature == e.feature) {
                        es.push(e);
                    }
                }
                es
            })
            .collect();
        let lists: dense_oracle::UnembedEdges = (0..vocab)
            .map(|v| conns.unembed.get(v).map(|es| es.iter().map(|e| (e.up, e.feature)).collect()).unwrap_or_default())
            .collect();
        let (b, s) = batch.tokens.dims2().unwrap();
        let oracle_ce = |out: &PassOutput| {
            let logits = dense_oracle::logits_with_ends(&suite, rt, &batch, out, &lists).unwrap();
            scae::model::token_ce(&logits.reshape((b, s, vocab)).unwrap(), &batch.tokens).unwrap().mean_all().unwrap()
        };
        let mut plan = Plan::new(&suite, Wiring::Sparse(&conns), parallel, &dev).unwrap();
        for composed in [false, true] {
            plan.force_composed(composed);
            let label = format!("{name} composed={composed}");
            let out = pass::forward(&suite, rt, &plan, &batch, opts).unwrap();
            let got = pass::objective::ce_loss_planned(&suite, rt, &plan, &batch, &out).unwrap();
            let want = oracle_ce(&out);
            let (g, w) = (got.to_scalar::<f32>().unwrap(), want.to_scalar::<f32>().unwrap());
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{label}: CE {g} vs oracle {w}");
            let today = pass::objective::ce_loss(rt, &batch, &out).unwrap().to_scalar::<f32>().unwrap();
            assert!((g - today).abs() > 1e-3, "{label}: the unembed edges change nothing ({g} vs {today})");
            let (gg, gw) = (got.backward().unwrap(), want.backward().unwrap());
            for (key, var) in suite.named_vars() {
                assert_grad_close(&format!("{label}: unembed CE grad {key}"), &grad_of(&gg, var), &grad_of(&gw, var));
            }
        }
        // The engine's host CE and its gradients against autograd's.
        plan.force_composed(false);
        let out = pass::forward(&suite, rt, &plan, &batch, opts).unwrap();
        let auto = pass::objective::ce_loss_planned(&suite, rt, &plan, &batch, &out).unwrap();
        let ga = auto.backward().unwrap();
        let eng = Engine::new(&suite, rt, &plan, opts).unwrap();
        let fb = FlatBatch::new(&batch, &suite.modules).unwrap();
        let state = eng.forward(&fb).unwrap();
        let (ce, g, extra) = eng.unembed_ce_loss_and_grad(&Single, &fb, &state).unwrap().expect("unembed edges");
        let al = auto.to_scalar::<f32>().unwrap() as f64;
        assert!((ce - al).abs() <= 1e-4 * al.abs().max(1.0), "{name}: engine unembed CE {ce} vs autograd {al}");
        let grads = eng.backward_with(&fb, &state, vec![g; n_mod], Some(extra)).unwrap();
        let tensors = engine::grads_to_tensors(&suite, &grads, &dev).unwrap();
        for ((key, var), got) in suite.named_vars().into_iter().zip(&tensors) {
            assert_grad_close(&format!("{name}: engine unembed CE grad {key}"), got, &grad_of(&ga, var));
        }
        // Every feature into every token: today's CE.
        let mut full = conns.clone();
        full.unembed = vec![
            (0..n_mod)
                .flat_map(|m| (0..f as u32).map(move |j| Edge { up: m, feature: j, score: f32::NAN }))
                .collect();
            vocab
        ];
        let plan = Plan::new(&suite, Wiring::Sparse(&full), parallel, &dev).unwrap();
        let out = pass::forward(&suite, rt, &plan, &batch, opts).unwrap();
        let got =
            pass::objective::ce_loss_planned(&suite, rt, &plan, &batch, &out).unwrap().to_scalar::<f32>().unwrap();
        let today = pass::objective::ce_loss(rt, &batch, &out).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - today).abs() <= 1e-5 * today.abs().max(1.0), "{name}: every unembed edge: {got} vs {today}");
    }
}

/// Unembed edge scores against loops: feature j of module m -> token v scores
/// `(1/|T_v|) Σ_{t ∈ T_v} f_m[t, j] (W_dec^m[:, j] · W_U[:, v]) / s[t]`, `T_v` the positions whose
/// next token is v and `s` LNPre's scale of the full pass's spliced residual; every
/// co-occurring feature is a candidate.
#[test]
fn unembed_edge_scores_match_loops() {
    for name in ["tiny-neo", "tiny-pythia"] {
        let (model, suite, batch) = fixture_case(name);
        let rt = &model.runtime;
        let parallel = model.cfg().parallel_attn_mlp;
        let (f, d, n_mod) = (suite.n_features, suite.d_model, suite.modules.len());
        let (b, s, _) = batch.resid_pre0.dims3().unwrap();
        let plan = Plan::new(&suite, Wiring::All, parallel, &Device::Cpu).unwrap();
        let out = pass::forward(&suite, rt, &plan, &batch, PassOptions::default()).unwrap();
        let mut stats = scae::ScoreStats::new(&suite, rt.cfg.n_heads, parallel).with_unembed(rt.cfg.ln_eps);
        stats.accumulate(&suite, &batch, &out).unwrap();
        let got = stats.top_unembed_edges(&suite, rt, n_mod * f).unwrap();
        let toks: Vec<u32> = host(&batch.tokens).iter().map(|&x| x as u32).collect();
        let r = host(&pass::objective::spliced_resid(&batch, &out).unwrap());
        let scale: Vec<f64> = r
            .chunks(d)
            .map(|x| {
                let mu = x.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                (x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / d as f64 + rt.cfg.ln_eps).sqrt()
            })
            .collect();
        let (feats, w_u) = (out.feats.iter().map(host).collect::<Vec<_>>(), host(&rt.weights.w_u));
        let vocab = rt.weights.w_u.dim(1).unwrap();
        let decs: Vec<Vec<f32>> = suite.aes.iter().map(|ae| host(ae.w_dec.as_tensor())).collect(); // (D, F)
        let mut checked = 0;
        let mut targets: Vec<u32> = (0..b * s).filter(|t| t % s != s - 1).map(|t| toks[t + 1]).collect();
        targets.sort_unstable();
        targets.dedup();
        for &v in &targets {
            let tv: Vec<usize> = (0..b * s).filter(|&t| t % s != s - 1 && toks[t + 1] == v).collect();
            let mut want = std::collections::HashMap::new();
            for m in 0..n_mod {
                for j in 0..f {
                    let u: f64 = (0..d).map(|c| decs[m][c * f + j] as f64 * w_u[c * vocab + v as usize] as f64).sum();
                    let mean: f64 =
                        tv.iter().map(|&t| feats[m][t * f + j] as f64 / scale[t]).sum::<f64>() / tv.len() as f64;
                    if tv.iter().any(|&t| feats[m][t * f + j] != 0.0) {
                        want.insert((m, j as u32), mean * u);
                    }
                }
            }
            let es = &got[v as usize];
            assert_eq!(es.len(), want.len(), "{name}: token {v}: one candidate per co-occurring feature");
            for e in es {
                let w = want[&(e.up, e.feature)];
                assert!(
                    (e.score as f64 - w).abs() <= 1e-4 * w.abs().max(1e-3),
                    "{name}: {}:{} -> {v}: {} vs {w}",
                    e.up,
                    e.feature,
                    e.score
                );
                checked += 1;
            }
        }
        assert!(checked > 50, "{name}: only {checked} unembed scores checked");
    }
}
