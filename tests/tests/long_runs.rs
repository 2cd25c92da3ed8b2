//! Long runs a researcher can leave alone: a resume that refuses any changed flag (named), a
//! finished run extended with a larger `--steps` (bit-identical to a run of that length), Ctrl-C
//! that stops at a step boundary with a checkpoint and says how to continue, and plain progress
//! lines when stderr is not a terminal.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use scae_testkit::{bin_dir, fixture_suite, golden_cache, s, scratch, tool, tool_fails, tool_ok};

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

fn same_suite(a: &Path, b: &Path) {
    assert_eq!(
        std::fs::read(a.join("suite.safetensors")).unwrap(),
        std::fs::read(b.join("suite.safetensors")).unwrap(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

struct Setup {
    tmp: PathBuf,
    acts: PathBuf,
    suite: PathBuf,
}

fn setup(name: &str) -> Setup {
    let tmp = scratch(name);
    let acts = golden_cache(&tmp, "tiny-gpt2");
    Setup { tmp, acts, suite: fixture_suite("tiny-gpt2") }
}

impl Setup {
    fn finetune(&self, out: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "--acts",
            s(&self.acts),
            "--suite",
            s(&self.suite),
            "--out",
            s(&self.tmp.join(out)),
            "--batch-size",
            "3",
            "--lr",
            "1e-2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn resume_names_each_changed_flag_and_extends_a_finished_run_exactly() {
    let t = setup("long-resume");
    let ck = ["--checkpoint-every", "2"];
    tool_ok("finetune", &strs(&t.finetune("a", &[&["--steps", "10", "--halt-after", "3"][..], &ck].concat())));
    // AuxK, and any other flag: refused, named with both values.
    let err = tool_fails(
        "finetune",
        &strs(&t.finetune("a", &[&["--steps", "10", "--resume", "--auxk-alpha", "0.5"][..], &ck].concat())),
        &["--resume: --auxk-alpha is 0.5, the checkpoint's run used 0.0", "hint"],
    );
    assert!(!err.contains("--steps"), "{err}");
    tool_fails(
        "finetune",
        &strs(&t.finetune(
            "a",
            &[&["--steps", "10", "--resume", "--decay-start", "0.5", "--loss", "mse+ce"][..], &ck].concat(),
        )),
        &[
            "--decay-start is 0.5, the checkpoint's run used 0.8",
            "--loss is \"mse+ce\", the checkpoint's run used \"mse\"",
        ],
    );
    // The same flags (another --threads, another --checkpoint-every): resumed to the end.
    tool_ok(
        "finetune",
        &strs(&t.finetune("a", &["--steps", "10", "--resume", "--checkpoint-every", "3", "--threads", "1"])),
    );
    assert!(t.tmp.join("a/checkpoint-decay/state.json").is_file(), "the state where the decay starts is kept");
    tool_ok("finetune", &strs(&t.finetune("b", &["--steps", "10"])));
    same_suite(&t.tmp.join("a"), &t.tmp.join("b"));
    // Resuming a finished run of the same length: nothing to train, said plainly.
    let done = tool_ok("finetune", &strs(&t.finetune("a", &[&["--steps", "10", "--resume"][..], &ck].concat())));
    assert!(done.contains("already complete; nothing trained") && !done.contains("tokens/s"), "{done}");
    same_suite(&t.tmp.join("a"), &t.tmp.join("b"));
    // Extended to 16 steps: the 10-step result goes at once (a halted extension leaves only its
    // checkpoints), and the end is exactly the run of 16 steps from the start.
    let o = tool(
        "finetune",
        &strs(&t.finetune("a", &[&["--steps", "16", "--resume", "--halt-after", "1"][..], &ck].concat())),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("the checkpoint's run had 10 steps; continuing from its state at step 8"), "{err}");
    assert!(!t.tmp.join("a/suite.safetensors").exists(), "the 10-step result stayed beside the 16-step run");
    tool_ok("finetune", &strs(&t.finetune("a", &[&["--steps", "16", "--resume"][..], &ck].concat())));
    tool_ok("finetune", &strs(&t.finetune("c", &["--steps", "16"])));
    same_suite(&t.tmp.join("a"), &t.tmp.join("c"));
    assert_eq!(lines(&t.tmp.join("a")), 16);
    // Shorter than a kept state allows: the reason is the shorter schedule's own decay.
    tool_fails(
        "finetune",
        &strs(&t.finetune("a", &[&["--steps", "8", "--resume"][..], &ck].concat())),
        &[
            "--steps 8",
            "the 8-step schedule starts its decay at step 7, before every kept checkpoint (the earliest is at step 13)",
        ],
    );
    // With warmup (a proportion of --steps) no step carries over: refused, naming --steps.
    tool_ok("finetune", &strs(&t.finetune("w", &[&["--steps", "10", "--warmup", "0.2"][..], &ck].concat())));
    tool_fails(
        "finetune",
        &strs(&t.finetune("w", &[&["--steps", "12", "--warmup", "0.2", "--resume"][..], &ck].concat())),
        &["--steps 12", "warmup", "hint: resume with --steps 10"],
    );
    // A run without checkpoints has nothing to resume from.
    tool_fails("finetune", &strs(&t.finetune("b", &["--steps", "12", "--resume"])), &["no checkpoint to resume from"]);
    // train-suite derives its resume check the same way.
    let ts = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["--acts", s(&t.acts), "--out", s(&t.tmp.join(out)), "--k", "4", "--batch-size", "3"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    tool_ok("train-suite", &strs(&ts("ts", &["--steps", "6", "--checkpoint-every", "2", "--halt-after", "2"])));
    tool_fails(
        "train-suite",
        &strs(&ts("ts", &["--steps", "6", "--checkpoint-every", "2", "--resume", "--auxk-alpha", "0.5"])),
        &["--auxk-alpha is 0.5, the checkpoint's run used 0.03125"],
    );
}

#[test]
fn ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_resume_finishes_the_same_run() {
    let t = setup("long-interrupt");
    let args = t.finetune("a", &["--steps", "40"]);
    let mut child = Command::new(bin_dir().join("finetune"))
        .args(&args)
        .env("SCAE_STEP_DELAY_MS", "40")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = t.tmp.join("a");
    let start = std::time::Instant::now();
    while lines(&out) < 3 {
        assert!(start.elapsed().as_secs() < 60, "finetune wrote no metrics");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    let stopped = lines(&out);
    assert!(stopped >= 3 && stopped < 40, "{stopped} steps: {err}");
    let want = format!("finetune: interrupted at step {stopped}; last checkpoint at step {stopped} (");
    assert!(err.contains(&want), "`{want}` in: {err}");
    assert!(err.contains("rerun the same command with --resume"), "{err}");
    assert!(out.join("checkpoint/state.json").is_file() && !out.join("suite.safetensors").exists());
    // The same command plus --resume finishes the run, bit-identical to an uninterrupted one.
    tool_ok("finetune", &strs(&[args.clone(), vec!["--resume".to_string()]].concat()));
    tool_ok("finetune", &strs(&t.finetune("b", &["--steps", "40"])));
    same_suite(&out, &t.tmp.join("b"));
}

#[test]
fn without_a_terminal_progress_is_a_plain_line_every_tenth_of_the_run() {
    let t = setup("long-progress");
    let o = tool("finetune", &strs(&t.finetune("a", &["--steps", "20"])));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let progress: Vec<&str> = err.lines().filter(|l| l.starts_with("finetune: step ")).collect();
    assert_eq!(progress.len(), 10, "{err}");
    let first = progress[0];
    assert!(first.starts_with("finetune: step 2/20 (10%), loss "), "{first}");
    for part in [", FVU ", " tokens/s, ETA "] {
        assert!(first.contains(part), "`{part}` in {first}");
    }
    // No raw decimals for rates: tokens/s is a whole number.
    let rate = first.split(", ").find(|p| p.ends_with(" tokens/s")).unwrap();
    assert!(rate.trim_end_matches(" tokens/s").chars().all(|c| c.is_ascii_digit() || c == ','), "{rate}");
    assert!(progress[9].starts_with("finetune: step 20/20 (100%)"), "{}", progress[9]);
    // The last line says where the result went, readably (no raw JSON).
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("finetune: 20 steps -> ") && out.contains("mean FVU") && !out.contains('{'), "{out}");
}
