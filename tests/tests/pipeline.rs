//! The whole chain on a tiny configuration: collect-acts -> train-suite -> score-edges ->
//! select-edges -> finetune -> evaluate, with consistency checks between the outputs; and
//! bit-identical resume of train-suite.

use std::path::Path;

use candle_core::Device;
use scae_testkit::{fixtures, s, scratch, tool_fails, tool_ok};

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn losses(p: &Path) -> Vec<f64> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn tiny_cache(tmp: &Path) -> std::path::PathBuf {
    let acts = tmp.join("acts");
    let model = fixtures().join("models/tiny-neo");
    let data = fixtures().join("../../pipelines/data/stories.txt");
    tool_ok(
        "collect-acts",
        &["--model", s(&model), "--data", s(&data), "--ctx-len", "16", "--n-seqs", "64", "--out", s(&acts)],
    );
    acts
}

#[test]
fn whole_chain_runs_and_finetuning_lowers_its_loss() {
    let tmp = scratch("chain");
    let acts = tiny_cache(&tmp);
    let suite = tmp.join("suite");
    tool_ok(
        "train-suite",
        &[
            "--acts",
            s(&acts),
            "--out",
            s(&suite),
            "--expansion",
            "2",
            "--k",
            "4",
            "--steps",
            "60",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
            "--dead-threshold",
            "5000",
        ],
    );
    let cfg = json(&suite.join("config.json"));
    assert_eq!(cfg["n_features"], 32);
    assert_eq!(cfg["k"], 4);
    assert_eq!(cfg["model_hash"], json(&acts.join("manifest.json"))["model"]["hash"]);
    // Pretraining lowers the FVU it optimizes.
    let l = losses(&suite.join("metrics.jsonl"));
    assert_eq!(l.len(), 60);
    assert!(l[59] < 0.5 * l[0], "train-suite loss {} -> {}", l[0], l[59]);
    let edges = tmp.join("edges");
    tool_ok(
        "score-edges",
        &["--acts", s(&acts), "--suite", s(&suite), "--keep", "16", "--top-c", "4", "--out", s(&edges)],
    );
    tool_ok(
        "select-edges",
        &["--edges", s(&edges.join("edges.parquet")), "--c", "4", "--out", s(&tmp.join("c4.parquet"))],
    );
    let conns = tmp.join("c4.parquet");
    let ft = tmp.join("ft");
    tool_ok(
        "finetune",
        &[
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--connections",
            s(&conns),
            "--out",
            s(&ft),
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--lr",
            "2e-3",
        ],
    );
    let l = losses(&ft.join("metrics.jsonl"));
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[25..].iter().sum::<f64>() / 5.0;
    assert!(last < first, "finetune loss {first} -> {last}");
    // Evaluate before and after: the finetuned suite reconstructs better through the pruned pass.
    tool_ok(
        "evaluate",
        &["--acts", s(&acts), "--suite", s(&suite), "--connections", s(&conns), "--out", s(&tmp.join("e0"))],
    );
    tool_ok(
        "evaluate",
        &["--acts", s(&acts), "--suite", s(&ft), "--connections", s(&conns), "--out", s(&tmp.join("e1"))],
    );
    let (e0, e1) = (json(&tmp.join("e0/eval.json")), json(&tmp.join("e1/eval.json")));
    let mean_ref = |e: &serde_json::Value| -> f64 {
        e["modules"].as_object().unwrap().values().map(|m| m["fvu_ref"].as_f64().unwrap()).sum()
    };
    assert!(mean_ref(&e1) < mean_ref(&e0), "pruned-pass FVU before {} after {}", mean_ref(&e0), mean_ref(&e1));
    assert_eq!(e0["clean_ce"], e1["clean_ce"]);
    assert_eq!(e1["n_connections"].as_u64().unwrap() as usize, 4 * 32 * 3); // every non-first module, C=4
                                                                            // CE recovered is consistent with the three CEs it is made of.
    let rec = (e1["ce_zero"].as_f64().unwrap() - e1["ce"].as_f64().unwrap())
        / (e1["ce_zero"].as_f64().unwrap() - e1["clean_ce"].as_f64().unwrap());
    assert!((rec - e1["ce_recovered"].as_f64().unwrap()).abs() < 1e-9);
    // The comparison report: one row per run, a PNG and an SVG.
    let report = tmp.join("report");
    let table = tool_ok("evaluate", &["--compare", s(&tmp.join("e0")), s(&tmp.join("e1")), "--out", s(&report)]);
    assert_eq!(table.lines().filter(|l| l.starts_with("| top 4 |")).count(), 2, "{table}");
    assert!(table.contains("| top 4 | finetuned |") && table.contains("| top 4 | not finetuned |"), "{table}");
    // Both were evaluated on the cache the suites were trained on, and the table says so.
    assert!(table.contains("CE diff, training tokens") && !table.contains("held-out"), "{table}");
    assert_eq!(&std::fs::read(report.join("compare.png")).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    assert!(std::fs::read_to_string(report.join("compare.svg")).unwrap().contains("<svg"));
    tool_fails("evaluate", &["--compare", s(&tmp.join("nope")), "--out", s(&report)], &["eval.json", "cannot read"]);
    // The finetuned suite keeps the cache's model hash.
    assert_eq!(json(&ft.join("config.json"))["model_hash"], cfg["model_hash"]);
}

/// train-suite resumes bit-identically on both backends; the autograd backend (the GPU path)
/// follows the CPU engine's loss curve, and bf16 mixed precision stays close to f32.
#[test]
fn train_suite_resume_is_bit_identical() {
    let tmp = scratch("ts-resume");
    let acts = tiny_cache(&tmp);
    let args = |out: &Path| -> Vec<String> {
        [
            "--acts",
            s(&acts),
            "--out",
            s(out),
            "--expansion",
            "2",
            "--k",
            "4",
            "--steps",
            "8",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
            "--dead-threshold",
            "300",
            "--shuffle",
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |out: &Path, extra: &[&str]| {
        let mut a = args(out);
        a.extend(extra.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        tool_ok("train-suite", &refs);
    };
    let load = |p: &Path| candle_core::safetensors::load(p.join("suite.safetensors"), &Device::Cpu).unwrap();
    for backend in ["engine", "autograd"] {
        let (a, b) = (tmp.join(format!("a-{backend}")), tmp.join(format!("b-{backend}")));
        run(&a, &["--backend", backend]);
        run(&b, &["--backend", backend, "--checkpoint-every", "3", "--halt-after", "5"]);
        assert!(!b.join("suite.safetensors").exists());
        run(&b, &["--backend", backend, "--checkpoint-every", "3", "--resume"]);
        let (sa, sb) = (load(&a), load(&b));
        assert_eq!(sa.len(), 16);
        for (k, t) in &sa {
            assert_eq!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                sb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{backend} {k}"
            );
        }
        assert_eq!(losses(&a.join("metrics.jsonl")), losses(&b.join("metrics.jsonl")));
    }
    // and ends with the same parameters (8 Adam steps, AuxK on)
    let (se, sa) = (load(&tmp.join("a-engine")), load(&tmp.join("a-autograd")));
    for (k, te) in &se {
        let d =
            (te - &sa[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let scale = te.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        assert!(d <= 1e-4 * scale, "train-suite autograd {k}: differs from the engine's by {d} (scale {scale})");
    }
    let bf16 = tmp.join("a-bf16");
    run(&bf16, &["--backend", "autograd", "--dtype", "bf16"]);
    let engine = losses(&tmp.join("a-engine/metrics.jsonl"));
    for (other, tol) in [("a-autograd", 1e-3), ("a-bf16", 5e-2)] {
        let l = losses(&tmp.join(other).join("metrics.jsonl"));
        for (step, (x, y)) in engine.iter().zip(&l).enumerate() {
            assert!((x - y).abs() <= tol * x.abs(), "{other} step {step}: loss {y} vs the engine's {x}");
        }
    }
    tool_fails(
        "train-suite",
        &["--acts", s(&acts), "--out", s(&tmp.join("c")), "--k", "99", "--expansion", "2", "--steps", "1"],
        &["--k 99", "32 features"],
    );
    tool_fails(
        "train-suite",
        &["--acts", s(&acts), "--out", s(&tmp.join("c")), "--steps", "1", "--backend", "engine", "--dtype", "bf16"],
        &["--backend engine", "f32 on the CPU"],
    );
}

#[test]
fn streaming_mode_equals_going_through_a_cache() {
    let tmp = scratch("stream");
    let model = fixtures().join("models/tiny-neo");
    let data = fixtures().join("../../pipelines/data/stories.txt");
    let acts = tmp.join("acts");
    tool_ok(
        "collect-acts",
        &[
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--ctx-len",
            "16",
            "--n-seqs",
            "32",
            "--batch-size",
            "8",
            "--out",
            s(&acts),
        ],
    );
    let stream = ["--model", s(&model), "--data", s(&data), "--ctx-len", "16"];
    let common = ["--expansion", "2", "--k", "4", "--steps", "4", "--batch-size", "8", "--lr", "1e-2"];
    let (a, b) = (tmp.join("ts-cache"), tmp.join("ts-stream"));
    tool_ok("train-suite", &[&["--acts", s(&acts), "--out", s(&a)][..], &common].concat());
    tool_ok("train-suite", &[&stream[..], &["--out", s(&b)], &common].concat());
    let load = |p: &Path| candle_core::safetensors::load(p.join("suite.safetensors"), &Device::Cpu).unwrap();
    let same = |x: &Path, y: &Path| {
        let (sx, sy) = (load(x), load(y));
        for (k, t) in &sx {
            let d =
                (t - &sy[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-6, "{k}: cache vs streaming differ by {d}");
        }
    };
    same(&a, &b);
    // finetune from that suite, both ways; the streaming run is also interrupted and resumed.
    let ft = ["--suite", s(&a), "--steps", "4", "--batch-size", "8", "--lr", "1e-2"];
    let (c, d) = (tmp.join("ft-cache"), tmp.join("ft-stream"));
    tool_ok("finetune", &[&["--acts", s(&acts), "--out", s(&c)][..], &ft].concat());
    tool_ok(
        "finetune",
        &[&stream[..], &["--out", s(&d), "--checkpoint-every", "1", "--halt-after", "3"], &ft].concat(),
    );
    tool_ok("finetune", &[&stream[..], &["--out", s(&d), "--checkpoint-every", "1", "--resume"], &ft].concat());
    same(&c, &d);
}

#[test]
fn toy_lm_learns_its_corpus_and_loads_like_any_model() {
    let tmp = scratch("toy");
    let out = tmp.join("toy");
    tool_ok(
        "toy-lm",
        &[
            "--out",
            s(&out),
            "--n-stories",
            "300",
            "--steps",
            "80",
            "--d-model",
            "32",
            "--n-heads",
            "2",
            "--ctx-len",
            "32",
            "--batch-size",
            "16",
            "--lr",
            "1e-2",
        ],
    );
    let report = json(&out.join("report.json"));
    let (ce, h) = (report["heldout_ce"].as_f64().unwrap(), report["unigram_entropy"].as_f64().unwrap());
    // The unigram entropy is what a model without context reaches; the toy model is far below.
    assert!(ce < 0.5 * h, "held-out CE {ce} vs unigram entropy {h}");
    // The folder works with the regular tools: a cache of the corpus, packed.
    let acts = tmp.join("acts");
    tool_ok(
        "collect-acts",
        &[
            "--model",
            s(&out.join("model")),
            "--data",
            s(&out.join("corpus.txt")),
            "--ctx-len",
            "32",
            "--pack",
            "--n-seqs",
            "16",
            "--out",
            s(&acts),
        ],
    );
    let m = json(&acts.join("manifest.json"));
    assert_eq!(m["model"]["architecture"], "GPTNeoForCausalLM");
    assert!(m["clean_ce"].as_f64().unwrap() < 0.5 * h);
    // Same seed, same corpus.
    let again = tmp.join("toy2");
    tool_ok(
        "toy-lm",
        &[
            "--out",
            s(&again),
            "--n-stories",
            "300",
            "--steps",
            "1",
            "--d-model",
            "32",
            "--n-heads",
            "2",
            "--ctx-len",
            "32",
        ],
    );
    assert_eq!(std::fs::read(out.join("corpus.txt")).unwrap(), std::fs::read(again.join("corpus.txt")).unwrap());
}
