//! finetune: first-step gradients equal the reference's (SGD, no clipping, lr 1: the update is
//! the gradient), resumed runs end bit-identical to uninterrupted ones, loss decreases, and
//! bad runs stop with a clear message.

use std::path::Path;

use scae_testkit::{fixture_suite, fixtures, golden_cache, load, max_abs, s, scratch, tool_fails, tool_ok};

#[test]
fn first_step_gradients_match_the_reference() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let tmp = scratch(&format!("ft-grad-{name}"));
        let acts = golden_cache(&tmp, name);
        let conns = fixtures().join("suites").join(name).join("connections-ref.safetensors");
        let golden = load(&fixtures().join(format!("golden/suite-{name}.safetensors")));
        let suite = fixture_suite(name);
        let before = load(&suite);
        // The CPU engine and the autograd (GPU) path in f32 match to 1e-4 per tensor. bf16 mixed
        // precision (8 mantissa bits, and top-k choices that may flip) is held to the direction
        // of the whole gradient: cosine similarity with the reference's.
        // --micro-batch 1 (and 2: uneven chunks) builds the graph a few sequences at a time:
        // still the batch's gradient.
        for (backend, dtype, micro) in [
            ("engine", "f32", "3"),
            ("autograd", "f32", "3"),
            ("autograd", "f32", "1"),
            ("autograd", "f32", "2"),
            ("autograd", "bf16", "2"),
        ] {
            for loss in ["mse", "ce"] {
                let out = tmp.join(format!("ft-{loss}-{backend}-{dtype}-{micro}"));
                let mut args = vec![
                    "--acts",
                    s(&acts),
                    "--suite",
                    s(&suite),
                    "--connections",
                    s(&conns),
                    "--out",
                    s(&out),
                    "--loss",
                    loss,
                    "--optimizer",
                    "sgd",
                    "--clip-grad",
                    "none",
                    "--lr",
                    "1",
                    "--no-scale-lr",
                    "--steps",
                    "1",
                    "--batch-size",
                    "3",
                    "--backend",
                    backend,
                    "--dtype",
                    dtype,
                ];
                if backend == "autograd" {
                    args.extend(["--micro-batch", micro]);
                }
                tool_ok("finetune", &args);
                let after = load(&out.join("suite.safetensors"));
                let (mut dot, mut n1, mut n2) = (0f64, 0f64, 0f64);
                for (key, old) in &before {
                    let grad = (old - &after[key]).unwrap(); // SGD, lr 1: θ − θ' = ∇
                    let want = &golden[&format!("grad.{loss}.{key}")];
                    let rel = max_abs(&(&grad - want).unwrap()) / max_abs(want).max(1e-8);
                    assert!(dtype == "bf16" || rel <= 1e-4, "{name} {backend} {loss} {key}: relative diff {rel}");
                    let (a, b) = (
                        grad.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    for (x, y) in a.iter().zip(&b) {
                        (dot, n1, n2) =
                            (dot + (*x as f64) * (*y as f64), n1 + (*x as f64).powi(2), n2 + (*y as f64).powi(2));
                    }
                }
                let cos = dot / (n1.sqrt() * n2.sqrt()).max(1e-30);
                eprintln!("{name} {backend} {dtype} micro {micro} {loss}: gradient cosine {cos:.6}");
                assert!(cos >= 0.98, "{name} {backend} {dtype} {loss}: gradient cosine {cos}");
                // the logged loss does not depend on the micro-batching
                let logged = |p: &Path| -> f64 {
                    let line = std::fs::read_to_string(p.join("metrics.jsonl")).unwrap();
                    serde_json::from_str::<serde_json::Value>(line.trim()).unwrap()["loss"].as_f64().unwrap()
                };
                if micro == "1" {
                    let (a, b) = (logged(&out), logged(&tmp.join(format!("ft-{loss}-engine-f32-3"))));
                    assert!((a - b).abs() <= 1e-5 * b.abs(), "{name} {loss}: loss {a} with micro-batches vs {b}");
                }
            }
        }
    }
}

fn run_ft(acts: &Path, out: &Path, extra: &[&str]) -> String {
    let suite = fixture_suite("tiny-gpt2");
    let mut args = vec![
        "--acts",
        s(acts),
        "--suite",
        s(&suite),
        "--out",
        s(out),
        "--steps",
        "6",
        "--batch-size",
        "3",
        "--lr",
        "3e-3",
        "--shuffle",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    tool_ok("finetune", &args)
}

#[test]
fn resumed_run_ends_bit_identical() {
    let tmp = scratch("ft-resume");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let conns = fixtures().join("suites/tiny-gpt2/connections-ref.safetensors");
    for (loss, backend) in [("mse", "engine"), ("mse+ce", "engine"), ("mse+ce", "autograd")] {
        let a = tmp.join(format!("a-{loss}-{backend}"));
        let b = tmp.join(format!("b-{loss}-{backend}"));
        let common = ["--loss", loss, "--connections", s(&conns), "--warmup", "0.2", "--backend", backend];
        run_ft(&acts, &a, &common);
        run_ft(&acts, &b, &[&common[..], &["--checkpoint-every", "2", "--halt-after", "3"]].concat());
        assert!(!b.join("suite.safetensors").exists() && b.join("checkpoint/state.json").exists());
        run_ft(&acts, &b, &[&common[..], &["--checkpoint-every", "2", "--resume"]].concat());
        let (sa, sb) = (load(&a.join("suite.safetensors")), load(&b.join("suite.safetensors")));
        for (k, ta) in &sa {
            let same = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == sb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "{loss}: {k} differs after resume");
        }
        let lines = |p: &Path| std::fs::read_to_string(p.join("metrics.jsonl")).unwrap().lines().count();
        assert_eq!(lines(&a), 6);
        assert_eq!(lines(&b), 6);
        // and the trained suite differs from the start (training happened)
        let start = load(&fixture_suite("tiny-gpt2"));
        assert!(max_abs(&(&sa["aes.mlp_1.encoder.weight"] - &start["aes.mlp_1.encoder.weight"]).unwrap()) > 0.0);
    }
}

#[test]
fn finetuning_lowers_the_loss_it_optimizes() {
    let tmp = scratch("ft-lower");
    let acts = golden_cache(&tmp, "tiny-neo");
    let out = tmp.join("ft");
    tool_ok(
        "finetune",
        &[
            "--acts",
            s(&acts),
            "--suite",
            s(&fixture_suite("tiny-neo")),
            "--out",
            s(&out),
            "--steps",
            "40",
            "--batch-size",
            "3",
            "--lr",
            "1e-3",
            "--decay-start",
            "1.0",
        ],
    );
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 40);
    // same batch every step: the loss must go down clearly
    assert!(losses[39] < 0.7 * losses[0], "loss {} -> {}", losses[0], losses[39]);
}

#[test]
fn bad_runs_stop_with_clear_errors() {
    let tmp = scratch("ft-bad");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let suite = fixture_suite("tiny-gpt2");
    let out = tmp.join("ft");
    // a learning rate that blows up: the FVU passes the divergence bound; the checkpoint stays.
    tool_fails(
        "finetune",
        &[
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--out",
            s(&out),
            "--steps",
            "20",
            "--batch-size",
            "3",
            "--optimizer",
            "sgd",
            "--clip-grad",
            "none",
            "--lr",
            "1e30",
            "--no-scale-lr",
            "--checkpoint-every",
            "1",
        ],
        &["the run diverged", "last checkpoint with finite parameters"],
    );
    assert!(out.join("checkpoint/state.json").exists());
    tool_fails(
        "finetune",
        &["--acts", s(&acts), "--suite", s(&suite), "--out", s(&tmp.join("x")), "--steps", "1", "--batch-size", "9"],
        &["--batch-size 9", "only 3 sequences"],
    );
    tool_fails(
        "finetune",
        &[
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--out",
            s(&tmp.join("y")),
            "--steps",
            "1",
            "--resume",
            "--batch-size",
            "2",
        ],
        &["no checkpoint to resume from"],
    );
    tool_fails(
        "finetune",
        &[
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--out",
            s(&tmp.join("z")),
            "--steps",
            "1",
            "--batch-size",
            "3",
            "--loss",
            "ce",
            "--auxk-alpha",
            "0.1",
        ],
        &["--auxk-alpha", "mse"],
    );
    // AuxK in MSE mode: every latent is dead after 10 tokens, so every module reports AuxK.
    let aux = tmp.join("aux");
    tool_ok(
        "finetune",
        &[
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--out",
            s(&aux),
            "--steps",
            "3",
            "--batch-size",
            "3",
            "--auxk-alpha",
            "0.1",
            "--dead-threshold",
            "10",
        ],
    );
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(aux.join("metrics.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    assert_eq!(last["auxk"].as_object().unwrap().len(), 4);
    assert!(last["auxk"].as_object().unwrap().values().all(|v| v.as_f64().unwrap() > 0.0));
    // flags of the autograd (GPU) path that the CPU engine does not take, and a GPU this build
    // does not have
    let base = ["--acts", s(&acts), "--suite", s(&suite), "--steps", "1", "--batch-size", "3"];
    tool_fails(
        "finetune",
        &[&base[..], &["--out", s(&tmp.join("m")), "--backend", "engine", "--micro-batch", "1"]].concat(),
        &["--micro-batch", "autograd"],
    );
    tool_fails(
        "finetune",
        &[&base[..], &["--out", s(&tmp.join("b")), "--backend", "engine", "--dtype", "bf16"]].concat(),
        &["--backend engine", "f32 on the CPU"],
    );
    if !cfg!(feature = "cuda") {
        tool_fails(
            "finetune",
            &[&base[..], &["--out", s(&tmp.join("g")), "--device", "cuda"]].concat(),
            &["--device cuda", "without CUDA"],
        );
    }
    assert!(!tmp.join("m").exists() && !tmp.join("b").exists());
    // resuming with other arguments is refused
    tool_fails(
        "finetune",
        &["--acts", s(&acts), "--suite", s(&suite), "--out", s(&out), "--steps", "20", "--batch-size", "2", "--resume"],
        &["--resume", "--batch-size is 2, the checkpoint's run used 3", "--optimizer is \"adam\""],
    );
}

/// AuxK through the pruned pass on the autograd backend (the GPU path), with and without
/// micro-batches, against the CPU engine: three SGD steps (latents dead from the second on),
/// same parameters and the same logged AuxK.
#[test]
fn autograd_auxk_matches_the_engine() {
    let tmp = scratch("ft-auxk");
    let acts = golden_cache(&tmp, "tiny-neo");
    let suite = fixture_suite("tiny-neo");
    let conns = fixtures().join("suites/tiny-neo/connections-ref.safetensors");
    let run = |tag: &str, extra: &[&str]| -> std::path::PathBuf {
        let out = tmp.join(tag);
        let mut args = vec![
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--connections",
            s(&conns),
            "--out",
            s(&out),
            "--steps",
            "3",
            "--batch-size",
            "3",
            "--optimizer",
            "sgd",
            "--lr",
            "1e-2",
            "--no-scale-lr",
            "--clip-grad",
            "none",
            "--auxk-alpha",
            "0.5",
            "--dead-threshold",
            "10",
        ];
        args.extend_from_slice(extra);
        tool_ok("finetune", &args);
        out
    };
    let engine = run("engine", &["--backend", "engine"]);
    let metrics = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let want = metrics(&engine);
    assert!(
        want[2]["auxk"].as_object().unwrap().values().any(|v| v.as_f64().unwrap() > 0.0),
        "AuxK must be active by step 2"
    );
    let start = load(&suite);
    let reference = load(&engine.join("suite.safetensors"));
    for (tag, extra) in
        [("autograd", vec!["--backend", "autograd"]), ("micro", vec!["--backend", "autograd", "--micro-batch", "1"])]
    {
        let out = run(tag, &extra);
        let got = load(&out.join("suite.safetensors"));
        for (k, r) in &reference {
            // compare the updates (θ' − θ), relative to the largest
            let (du, dr) = ((&got[k] - &start[k]).unwrap(), (r - &start[k]).unwrap());
            let rel = max_abs(&(&du - &dr).unwrap()) / max_abs(&dr).max(1e-12);
            assert!(rel <= 1e-4, "{tag} {k}: update differs from the engine's by {rel} (relative)");
        }
        for (a, b) in metrics(&out).iter().zip(&want) {
            for (m, v) in b["auxk"].as_object().unwrap() {
                let (x, y) = (a["auxk"][m].as_f64().unwrap(), v.as_f64().unwrap());
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{tag} step {} {m}: AuxK {x} vs {y}", b["step"]);
            }
        }
    }
}

/// A run that fails before its first checkpoint leaves nothing behind, and puts back the
/// folder it was to replace (`--overwrite`); a successful `--overwrite` replaces it.
#[test]
fn failed_runs_leave_no_output_and_keep_what_they_would_replace() {
    let tmp = scratch("ft-keep");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let suite = fixture_suite("tiny-gpt2");
    let out = tmp.join("ft");
    let base = ["--acts", s(&acts), "--suite", s(&suite), "--batch-size", "3"];
    tool_ok("finetune", &[&base[..], &["--out", s(&out), "--steps", "1"]].concat());
    let before = std::fs::read(out.join("suite.safetensors")).unwrap();
    // the loss blows up at step 1, before any checkpoint
    let blow_up = ["--steps", "5", "--optimizer", "sgd", "--clip-grad", "none", "--lr", "1e30", "--no-scale-lr"];
    tool_fails(
        "finetune",
        &[&base[..], &blow_up, &["--out", s(&out), "--overwrite"]].concat(),
        &["the run diverged", "no checkpoint was written"],
    );
    assert_eq!(std::fs::read(out.join("suite.safetensors")).unwrap(), before, "the replaced output is back");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 1);
    assert!(!tmp.join("ft.replaced").exists());
    let fresh = tmp.join("fresh");
    tool_fails("finetune", &[&base[..], &blow_up, &["--out", s(&fresh)]].concat(), &["the run diverged"]);
    assert!(!fresh.exists(), "a failed fresh run leaves no folder");
    tool_ok("finetune", &[&base[..], &["--out", s(&out), "--steps", "2", "--overwrite"]].concat());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
    assert!(!tmp.join("ft.replaced").exists());
}
