//! What a newcomer sees: `make all C=16` on the toy default (and `make eval C=0`) must show the
//! method working against the right control — pruning to C=16 costs CE, finetuning through the
//! pruned pass closes most of the gap to the all-connections suite finetuned the same way, the
//! other controls (random connections, no connections) do clearly worse — on held-out tokens by
//! default, with the training-token numbers beside them, few dead features, and sentences that
//! state the numbers they come from. Directions and thresholds only, not exact values.

use std::path::Path;
use std::process::Command;

use scae_testkit::{fixtures, s, scratch};

fn make(out: &Path, args: &[&str]) -> String {
    let root = fixtures().join("../..");
    let o = Command::new("make")
        .current_dir(&root)
        .arg("--no-print-directory")
        // The tools the test harness built (with the same features: MPI=1 keeps its MPI).
        .arg("BUILD=0")
        .args(args)
        .arg(format!("OUT={}", s(out)))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "make {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    stdout
}

/// eval.json of the one evaluation folder under `out/eval` whose name contains every needle.
fn eval(out: &Path, needles: &[&str]) -> serde_json::Value {
    let dirs: Vec<_> = std::fs::read_dir(out.join("eval"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && needles.iter().all(|n| p.file_name().unwrap().to_str().unwrap().contains(n)))
        .collect();
    assert_eq!(dirs.len(), 1, "{needles:?}: {dirs:?}");
    serde_json::from_str(&std::fs::read_to_string(dirs[0].join("eval.json")).unwrap()).unwrap()
}

#[test]
fn make_all_on_the_toy_default_shows_the_method_working() {
    let out = scratch("first-run").join("out");
    let report = make(&out, &["all", "C=16"]);
    make(&out, &["eval", "C=0"]);
    // It says what it runs before running it.
    assert!(report.starts_with("make: preset toy (pipelines/toy.mk)"), "{report}");
    let held = |role: &str| eval(&out, &[&format!("-{role}-heldout-")]);
    let train = |role: &str| eval(&out, &[&format!("-{role}-train-")]);
    let (all0, top0, top1, all1, rand1, zero1) = (
        held("all-before"),
        held("top16-before"),
        held("top16-finetuned"),
        held("all-finetuned"),
        held("random16-finetuned"),
        held("top0-finetuned"),
    );
    // The default evaluation is on tokens no stage trained on, and eval.json says so (from the
    // suites' lineage, not from the folder names).
    for e in [&all0, &top0, &top1, &all1, &rand1, &zero1] {
        assert_eq!(e["tokens"], "held-out", "{}", e["tokens_note"]);
    }
    assert_eq!(train("top16-finetuned")["tokens"], "training");
    // The finetuned suites ran with the connections they store, and say which pass that was.
    assert!(top1["pass"].as_str().unwrap().contains("stored with the suite"), "{}", top1["pass"]);
    assert!(all1["pass"].as_str().unwrap().starts_with("all connections"), "{}", all1["pass"]);
    let ce = |e: &serde_json::Value| e["ce_diff"].as_f64().unwrap();
    let (a, b, x, y, r, z) = (ce(&all0), ce(&top0), ce(&top1), ce(&all1), ce(&rand1), ce(&zero1));
    let got = format!("all {a}, C=16 before {b}, after {x}, all finetuned {y}, random {r}, C=0 {z}");
    assert!(a < b, "pruning to C=16 should cost CE: {got}");
    assert!(x < b, "finetuning should lower CE diff at C=16: {got}");
    assert!(x < r, "selected connections should beat random ones: {got}");
    assert!(x < z, "C=16 should beat C=0: {got}");
    // Most of the gap to the all-connections suite finetuned the same way is closed...
    let share = (b - x) / (b - y);
    assert!(share > 0.5, "{got}");
    // ... and the report says so with the number it computed from these runs.
    for row in [
        "| all | not finetuned |",
        "| top 16 | not finetuned |",
        "| top 16 | finetuned |",
        "| all | finetuned |",
        "| random 16 | finetuned |",
    ] {
        assert!(report.contains(row), "{row} in: {report}");
    }
    assert!(report.contains("CE diff, held-out tokens") && report.contains("CE diff, training tokens"), "{report}");
    assert!(report.contains("all connections, finetuned the same way (the control)"), "{report}");
    let stated = format!("closes {:.0}% of the gap", 100.0 * share);
    assert!(report.contains(&stated), "`{stated}` in: {report}");
    assert!(report.contains("So: finetuning through the sparse pass"), "{report}");
    assert!(!report.contains("Caution"), "{report}");
    // Few dead features after pretraining, and finetuning does not raise them by 10 points.
    let dead = |e: &serde_json::Value| e["dead_fraction"].as_f64().unwrap();
    assert!(dead(&all0) <= 0.25, "pretrained suite: {:.3} never fire on held-out tokens", dead(&all0));
    assert!(dead(&top1) <= dead(&all0) + 0.10, "finetuning: {:.3} -> {:.3} never fire", dead(&all0), dead(&top1));
    // And the feature browser of the finetuned suite.
    let line = report.lines().find(|l| l.starts_with("feature browser: ")).expect("the browser's path");
    let index = Path::new(&fixtures().join("../..")).join(line.trim_start_matches("feature browser: "));
    assert!(index.is_file() || Path::new(line.trim_start_matches("feature browser: ")).is_file(), "{line}");
    // And the circuit of the toy's prompt, as README "Circuits of a prompt" describes it.
    let said = make(&out, &["circuit"]);
    let line = said.lines().find(|l| l.starts_with("graph: ")).expect("the graph's path");
    let path = line.trim_start_matches("graph: ");
    let path =
        if Path::new(path).is_file() { Path::new(path).to_path_buf() } else { fixtures().join("../..").join(path) };
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(said.contains("graph view: ") && said.contains("view/graph.html#circuit"), "{said}");
    let nodes = g["nodes"].as_array().unwrap();
    let logits: Vec<&str> =
        nodes.iter().filter(|n| n["feature_type"] == "logit").map(|n| n["clerp"].as_str().unwrap()).collect();
    assert_eq!(logits.len(), 10, "{logits:?}");
    // "the ten candidates are all names, each at about 8-9%"
    for c in &logits {
        let name = c.split('"').nth(1).unwrap();
        assert!(name.chars().next().unwrap().is_uppercase() && name.chars().all(char::is_alphabetic), "{c}");
        let p: f64 = c.split("(p=").nth(1).unwrap().trim_end_matches(')').parse().unwrap();
        assert!((0.07..0.1).contains(&p), "{c}");
    }
    // "the token `named` drives mlp_0 features, which drive mlp_1 features, which write the names"
    let last = g["metadata"]["prompt_tokens"].as_array().unwrap().len() - 1;
    let feature_at = |module: &str| nodes.iter().filter(|n| n["module"] == module && n["ctx_idx"] == last).count();
    assert!(feature_at("mlp_0") >= 2 && feature_at("mlp_1") >= 2, "features at the last position");
    let links = g["links"].as_array().unwrap();
    let from_named = links.iter().any(|l| {
        l["source"].as_str().unwrap().ends_with(&format!("_{last}"))
            && l["source"].as_str().unwrap().starts_with("E_")
            && l["target"].as_str().unwrap().starts_with("1_")
    });
    assert!(from_named, "the last token feeds an mlp_0 feature");
    let info = &g["metadata"]["info"]["before_pruning"];
    eprintln!("circuit: {} of {} nodes, {} of {} links", nodes.len(), info["nodes"], links.len(), info["links"]);
    // "kept under a tenth of the nodes and of the links"
    assert!(nodes.len() < info["nodes"].as_u64().unwrap() as usize / 10, "pruning keeps a readable graph");
    assert!(links.len() < info["links"].as_u64().unwrap() as usize / 10, "pruning keeps a readable graph");
}
