//! What a newcomer sees: `make all C=16` on the toy default (and `make eval C=0`) must show the
//! method working — pruning to C=16 costs CE, finetuning through the pruned pass wins most of
//! it back, and the controls (random connections, no connections) do clearly worse. Directions
//! only, not exact values.

use std::path::Path;
use std::process::Command;

use scae_testkit::{fixtures, s, scratch};

fn make(out: &Path, args: &[&str]) -> String {
    let root = fixtures().join("../..");
    let o = Command::new("make")
        .current_dir(&root)
        .arg("--no-print-directory")
        .args(args)
        .arg(format!("OUT={}", s(out)))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "make {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    stdout
}

/// CE diff of the one evaluation folder under `out/eval` whose name contains every needle.
fn ce_diff(out: &Path, needles: &[&str]) -> f64 {
    let dirs: Vec<_> = std::fs::read_dir(out.join("eval"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && needles.iter().all(|n| p.file_name().unwrap().to_str().unwrap().contains(n)))
        .collect();
    assert_eq!(dirs.len(), 1, "{needles:?}: {dirs:?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dirs[0].join("eval.json")).unwrap()).unwrap();
    v["ce_diff"].as_f64().unwrap()
}

#[test]
fn make_all_on_the_toy_default_shows_the_method_working() {
    let out = scratch("first-run").join("out");
    let report = make(&out, &["all", "C=16"]);
    make(&out, &["eval", "C=0"]);
    let all = ce_diff(&out, &["-all-before"]);
    let before = ce_diff(&out, &["-c16-sel", "-before"]);
    let after = ce_diff(&out, &["-c16-sel", "-mse-"]);
    let random = ce_diff(&out, &["-c16-random", "-mse-"]);
    let zero = ce_diff(&out, &["-c0-sel", "-mse-"]);
    let got = format!("all {all}, C=16 before {before}, after {after}, random {random}, C=0 {zero}");
    assert!(all < before, "pruning to C=16 should cost CE: {got}");
    assert!(after < before, "finetuning should lower CE diff at C=16: {got}");
    assert!(after < random, "selected connections should beat random ones: {got}");
    assert!(after < zero, "C=16 should beat C=0: {got}");
    // Most of the pruning cost is won back, and the report says so in words.
    assert!(before - after > 0.5 * (before - all), "{got}");
    assert!(report.contains("## report") && report.contains("winning back"), "{report}");
    assert!(report.contains("So: the selected connections carry what the suite needs"), "{report}");
    // And the feature browser of the finetuned suite.
    let line = report.lines().find(|l| l.starts_with("feature browser: ")).expect("the browser's path");
    let index = Path::new(&fixtures().join("../..")).join(line.trim_start_matches("feature browser: "));
    assert!(index.is_file() || Path::new(line.trim_start_matches("feature browser: ")).is_file(), "{line}");
}
