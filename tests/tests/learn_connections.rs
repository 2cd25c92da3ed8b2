//! learn-connections end to end on the tiny fixtures: candidates from score-edges, gates
//! learned, exactly min(C, candidates) connections per feature written with their gates, the
//! expected-L0 target met, the result usable by finetune and evaluate, and an interrupted run
//! resumed bit for bit (frozen suite and joint training).

use std::path::{Path, PathBuf};

use scae_testkit::{fixture_suite, golden_cache, s, scratch, tool, tool_fails, tool_ok};

struct Case {
    tmp: PathBuf,
    acts: PathBuf,
    suite: PathBuf,
    edges: PathBuf,
}

fn case(name: &str) -> Case {
    case_with(name, &[])
}

/// Candidates from score-edges with embed edges (and `extra` flags), keep 12.
fn case_with(name: &str, extra: &[&str]) -> Case {
    let tmp = scratch(name);
    let acts = golden_cache(&tmp, "tiny-neo");
    let suite = fixture_suite("tiny-neo");
    let edges = tmp.join("edges");
    let mut a = vec!["--acts", s(&acts), "--suite", s(&suite), "--embed", "--keep", "12", "--out", s(&edges)];
    a.extend(extra);
    tool_ok("score-edges", &a);
    Case { tmp, acts, suite, edges: edges.join("edges.parquet") }
}

impl Case {
    fn learn(&self, out: &str, extra: &[&str]) -> PathBuf {
        let dir = self.tmp.join(out);
        let mut a = vec!["--acts", s(&self.acts), "--suite", s(&self.suite), "--edges", s(&self.edges), "--c", "4"];
        a.extend(["--batch-size", "3", "--out", s(&dir)]);
        a.extend(extra);
        tool_ok("learn-connections", &a);
        dir
    }
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (down module, down feature, up module, up feature, gate) rows of a connections parquet.
fn rows(path: &Path) -> Vec<(String, u32, String, u32, f32)> {
    use arrow_array::{Float32Array, StringArray, UInt32Array};
    let f = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let col = |n: &str| b.column_by_name(n).unwrap_or_else(|| panic!("column {n}")).clone();
        let (dm, df, um, uf, g) =
            (col("down_module"), col("down_feature"), col("up_module"), col("up_feature"), col("gate"));
        let dm = dm.as_any().downcast_ref::<StringArray>().unwrap();
        let um = um.as_any().downcast_ref::<StringArray>().unwrap();
        let df = df.as_any().downcast_ref::<UInt32Array>().unwrap();
        let uf = uf.as_any().downcast_ref::<UInt32Array>().unwrap();
        let g = g.as_any().downcast_ref::<Float32Array>().unwrap();
        for i in 0..b.num_rows() {
            out.push((dm.value(i).to_string(), df.value(i), um.value(i).to_string(), uf.value(i), g.value(i)));
        }
    }
    out
}

#[test]
fn learned_connections_keep_c_per_feature_meet_the_target_and_feed_finetune_and_evaluate() {
    let c = case("learn-e2e");
    let dir =
        c.learn("learned", &["--steps", "40", "--lambda", "1", "--gate-lr", "0.1", "--freeze-suite", "--beta", "0.5"]);
    let conns = dir.join("connections.parquet");
    let learned = rows(&conns);
    let cands = rows_without_gate(&c.edges);
    // Each feature keeps min(C, its candidates), all among its candidates, with finite gates.
    let mut per: std::collections::BTreeMap<(String, u32), usize> = Default::default();
    for r in &learned {
        *per.entry((r.0.clone(), r.1)).or_default() += 1;
        assert!(cands.contains(&(r.0.clone(), r.1, r.2.clone(), r.3)), "{r:?} is not a candidate");
        assert!(r.4.is_finite(), "{r:?}");
    }
    let mut cand_per: std::collections::BTreeMap<(String, u32), usize> = Default::default();
    for r in &cands {
        *cand_per.entry((r.0.clone(), r.1)).or_default() += 1;
    }
    for (k, n) in &cand_per {
        assert_eq!(per.get(k).copied().unwrap_or(0), (*n).min(4), "{k:?}");
    }
    assert!(learned.iter().any(|r| r.2 == "embed"), "embed candidates can be learned");
    // The expected number of open gates per feature reached the target (min(C, candidates)).
    let m = metrics(&dir);
    assert_eq!(m.len(), 40);
    let last = m.last().unwrap();
    let (got, want) = (last["expected_edges_mean"].as_f64().unwrap(), last["target_edges_mean"].as_f64().unwrap());
    assert!((got - want).abs() < 0.1 * want, "expected open gates {got} vs target {want}");
    let first = &m[0];
    assert!(first["penalty"].as_f64().unwrap() > 10.0 * last["penalty"].as_f64().unwrap(), "{first} -> {last}");
    // The learned set is an ordinary connections file: evaluate and finetune take it.
    let ev = c.tmp.join("ev");
    tool_ok("evaluate", &["--acts", s(&c.acts), "--suite", s(&c.suite), "--connections", s(&conns), "--out", s(&ev)]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ev.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["learned_connections"], true);
    let ft = c.tmp.join("ft");
    tool_ok(
        "finetune",
        &[
            "--acts",
            s(&c.acts),
            "--suite",
            s(&c.suite),
            "--connections",
            s(&conns),
            "--steps",
            "1",
            "--batch-size",
            "3",
            "--out",
            s(&ft),
        ],
    );
}

#[test]
fn the_engine_and_autograd_steps_compute_the_same_losses() {
    let c = case_with("learn-backends", &["--unembed"]);
    for loss in ["mse", "mse+ce"] {
        let flags = ["--steps", "3", "--freeze-suite", "--init", "scores", "--loss", loss];
        let runs: Vec<Vec<serde_json::Value>> = ["engine", "autograd"]
            .iter()
            .map(|b| {
                let mut a = flags.to_vec();
                a.extend(["--backend", b]);
                metrics(&c.learn(&format!("{b}-{loss}"), &a))
            })
            .collect();
        // Same suite, batch and gate sample: the losses and penalty of each step agree to
        // rounding (the gates after a step may differ by the float order of their gradients, so
        // steps after the first are compared loosely).
        for (step, (e, a)) in runs[0].iter().zip(&runs[1]).enumerate() {
            for key in ["loss", "penalty", "ce"] {
                let (Some(x), Some(y)) = (e[key].as_f64(), a[key].as_f64()) else {
                    assert!(key == "ce" && loss == "mse", "{loss}: step {step} has no {key}");
                    continue;
                };
                let tol = if step == 0 { 1e-5 } else { 1e-2 };
                assert!(
                    (x - y).abs() <= tol * y.abs().max(1e-3),
                    "{loss} step {step} {key}: engine {x} vs autograd {y}"
                );
            }
        }
        assert_eq!(runs[0].len(), 3);
    }
}

#[test]
fn with_a_ce_term_unembed_candidates_are_learned_per_token() {
    let c = case_with("learn-unembed", &["--unembed"]);
    let cands: Vec<_> = all_rows(&c.edges).into_iter().filter(|r| r.0 == "unembed").collect();
    assert!(!cands.is_empty(), "score-edges --unembed gave no unembed candidates");
    let flags = ["--steps", "20", "--freeze-suite", "--loss", "mse+ce", "--unembed-c", "2", "--lambda", "1"];
    let dir = c.learn("learned", &flags);
    let learned = rows(&dir.join("connections.parquet"));
    let unembed: Vec<_> = learned.iter().filter(|r| r.0 == "unembed").collect();
    // Each token keeps min(2, its candidates), among them, with finite gates.
    let mut per: std::collections::BTreeMap<u32, usize> = Default::default();
    for r in &unembed {
        *per.entry(r.1).or_default() += 1;
        assert!(cands.contains(&(r.0.clone(), r.1, r.2.clone(), r.3)), "{r:?} is not a candidate");
        assert!(r.4.is_finite(), "{r:?} has no gate");
    }
    let mut cand_per: std::collections::BTreeMap<u32, usize> = Default::default();
    for r in &cands {
        *cand_per.entry(r.1).or_default() += 1;
    }
    for (tok, n) in &cand_per {
        assert_eq!(per.get(tok).copied().unwrap_or(0), (*n).min(2), "token {tok}");
    }
    // The module edges keep C (4) per feature as before, and the CE is in the metrics.
    assert!(learned.iter().any(|r| r.0 != "unembed"));
    let m = metrics(&dir);
    assert!(m.iter().all(|r| r["ce"].as_f64().is_some_and(f64::is_finite)), "{:?}", m[0]);
    // evaluate reads the learned unembed edges.
    let ev = c.tmp.join("ev");
    let conns = dir.join("connections.parquet");
    let o =
        tool("evaluate", &["--acts", s(&c.acts), "--suite", s(&c.suite), "--connections", s(&conns), "--out", s(&ev)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("into the unembedding"), "{err}");
    // Without a CE term they are dropped, and said so.
    let plain = c.tmp.join("plain");
    let mut a = vec!["--acts", s(&c.acts), "--suite", s(&c.suite), "--edges", s(&c.edges), "--c", "4"];
    a.extend(["--steps", "2", "--batch-size", "3", "--freeze-suite", "--out", s(&plain)]);
    let o = tool("learn-connections", &a);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && said.contains("unembed candidates are not learned"), "{said}");
    assert!(rows(&plain.join("connections.parquet")).iter().all(|r| r.0 != "unembed"));
}

/// Every (down module, down feature, up module, up feature) row of an edges or connections file.
fn all_rows(path: &Path) -> Vec<(String, u32, String, u32)> {
    let mut out = rows_without_gate(path);
    out.extend(unembed_rows(path));
    out
}

fn unembed_rows(path: &Path) -> Vec<(String, u32, String, u32)> {
    use arrow_array::{StringArray, UInt32Array};
    let f = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (dm, um) = (col("down_module"), col("up_module"));
        let (df, uf) = (col("down_feature"), col("up_feature"));
        let dm = dm.as_any().downcast_ref::<StringArray>().unwrap();
        let um = um.as_any().downcast_ref::<StringArray>().unwrap();
        let df = df.as_any().downcast_ref::<UInt32Array>().unwrap();
        let uf = uf.as_any().downcast_ref::<UInt32Array>().unwrap();
        for i in (0..b.num_rows()).filter(|&i| dm.value(i) == "unembed") {
            out.push((dm.value(i).to_string(), df.value(i), um.value(i).to_string(), uf.value(i)));
        }
    }
    out
}

fn rows_without_gate(path: &Path) -> Vec<(String, u32, String, u32)> {
    use arrow_array::{StringArray, UInt32Array};
    let f = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let dm = b.column_by_name("down_module").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
        let um = b.column_by_name("up_module").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
        let df = b.column_by_name("down_feature").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap().clone();
        let uf = b.column_by_name("up_feature").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap().clone();
        for i in 0..b.num_rows() {
            if dm.value(i) != "unembed" {
                out.push((dm.value(i).to_string(), df.value(i), um.value(i).to_string(), uf.value(i)));
            }
        }
    }
    out
}

#[test]
fn an_interrupted_run_resumes_bit_for_bit_frozen_and_joint() {
    let c = case("learn-resume");
    for (name, joint, backend) in
        [("frozen", false, "engine"), ("joint", true, "engine"), ("joint-autograd", true, "autograd")]
    {
        let mut base = vec!["--steps", "6", "--checkpoint-every", "2", "--backend", backend];
        if !joint {
            base.push("--freeze-suite");
        }
        let whole = c.learn(&format!("{name}-whole"), &base);
        let mut halted = base.clone();
        halted.extend(["--halt-after", "3"]);
        let cut = c.learn(&format!("{name}-cut"), &halted);
        assert!(!cut.join("connections.parquet").exists(), "a halted run writes no result");
        let mut resumed = base.clone();
        resumed.push("--resume");
        c.learn(&format!("{name}-cut"), &resumed);
        let mut files = vec!["connections.parquet", "gates.safetensors", "metrics.jsonl"];
        if joint {
            files.push("suite.safetensors");
        }
        for f in files {
            let (a, b) = (std::fs::read(whole.join(f)).unwrap(), std::fs::read(cut.join(f)).unwrap());
            assert!(a == b, "{name}: {f} differs after resume");
        }
    }
    // A resume with other flags is refused, naming the flag.
    let mut other = vec!["--steps", "6", "--checkpoint-every", "2", "--freeze-suite", "--lambda", "2", "--resume"];
    other.extend(["--batch-size", "3"]);
    let dir = c.tmp.join("frozen-cut");
    let mut a =
        vec!["--acts", s(&c.acts), "--suite", s(&c.suite), "--edges", s(&c.edges), "--c", "4", "--out", s(&dir)];
    a.extend(other);
    tool_fails("learn-connections", &a, &["--lambda"]);
}
