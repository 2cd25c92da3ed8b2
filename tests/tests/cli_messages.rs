//! What the tools say when a flag or file is off: select-edges refuses to overwrite and names a
//! folder given as --out, `evaluate --compare` names the field of eval.json at fault,
//! `--tokens 2048` hints at `--n-tokens`, and every tool's `--help` states what each optional
//! flag does when it is left out.

use scae_testkit::{bin_dir, fixture_suite, golden_cache, s, scratch, tool, tool_fails, tool_ok};

#[test]
fn select_edges_refuses_to_overwrite_and_names_a_folder_out() {
    let tmp = scratch("cli-select");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let edges = tmp.join("edges");
    tool_ok("score-edges", &["--acts", s(&acts), "--suite", s(&fixture_suite("tiny-gpt2")), "--out", s(&edges)]);
    let e = edges.join("edges.parquet");
    let out = tmp.join("c4.parquet");
    tool_ok("select-edges", &["--edges", s(&e), "--c", "4", "--out", s(&out)]);
    let before = std::fs::read(&out).unwrap();
    tool_fails("select-edges", &["--edges", s(&e), "--c", "2", "--out", s(&out)], &["file exists", "--overwrite"]);
    assert_eq!(std::fs::read(&out).unwrap(), before, "the existing file was kept");
    tool_ok("select-edges", &["--edges", s(&e), "--c", "2", "--out", s(&out), "--overwrite"]);
    assert_ne!(std::fs::read(&out).unwrap(), before);
    let dir = format!("{}/", s(&tmp.join("sub")));
    std::fs::create_dir_all(&dir).unwrap();
    tool_fails(
        "select-edges",
        &["--edges", s(&e), "--c", "2", "--out", &dir],
        &["found a folder", "connections.parquet"],
    );
    tool_fails(
        "select-edges",
        &["--edges", s(&e), "--c", "2", "--out", s(&tmp.join("nope/c.parquet"))],
        &["does not exist", "nope"],
    );
    // The connections record the suite they were selected for.
    let meta: std::collections::HashMap<String, String> =
        scae::util::table::parquet_metadata(&out).unwrap().into_iter().collect();
    assert!(meta["suite_id"].starts_with("blake3:") && meta["suite"] == s(&fixture_suite("tiny-gpt2")), "{meta:?}");
}

#[test]
fn compare_names_the_field_and_tokens_hints_at_n_tokens() {
    let tmp = scratch("cli-compare");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let ev = tmp.join("ev");
    tool_ok("evaluate", &["--acts", s(&acts), "--suite", s(&fixture_suite("tiny-gpt2")), "--out", s(&ev)]);
    let path = ev.join("eval.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["ce"] = serde_json::json!("high");
    std::fs::write(&path, v.to_string()).unwrap();
    tool_fails(
        "evaluate",
        &["--compare", s(&ev), "--out", s(&tmp.join("cmp"))],
        &["eval.json", "field `ce`", "expected f64"],
    );
    let o = tool("train-suite", &["--acts", s(&acts), "--tokens", "2048", "--out", s(&tmp.join("ts"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err
        .contains("hint: --tokens names a file of pre-tokenized data; the number of tokens to train on is --n-tokens"));
}

/// Each option of a `--help` text with the lines that describe it.
fn options(help: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if indent <= 6 && t.starts_with('-') {
            let flag = t.split_whitespace().find(|w| w.starts_with("--")).unwrap().trim_end_matches(',');
            out.push((flag.to_string(), t.to_string()));
        } else if let Some(last) = out.last_mut() {
            last.1.push(' ');
            last.1.push_str(t);
        }
    }
    out
}

#[test]
fn every_help_states_what_an_optional_flag_defaults_to() {
    let tools = [
        "collect-acts",
        "train-suite",
        "score-edges",
        "select-edges",
        "finetune",
        "evaluate",
        "view-features",
        "convert-suite",
        "attribute",
        "learn-connections",
        "toy-lm",
    ];
    let mut silent = Vec::new();
    for t in tools {
        let help = String::from_utf8_lossy(
            &std::process::Command::new(bin_dir().join(t)).arg("--help").output().unwrap().stdout,
        )
        .to_string();
        let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap_or("").to_string();
        for (flag, text) in options(&help) {
            let takes_value = text.split_whitespace().nth(1).is_some_and(|w| w.starts_with('<'));
            let required = usage.contains(&format!("{flag} <"));
            let lower = text.to_lowercase();
            let said = lower.contains("default") || lower.contains("required") || lower.contains("one of");
            if takes_value && !required && !["--help", "--version"].contains(&flag.as_str()) && !said {
                silent.push(format!("{t} {flag}: {text}"));
            }
        }
    }
    assert!(silent.is_empty(), "--help does not say what these are when left out:\n{}", silent.join("\n"));
}

/// A tool launched as one of several ranks (mpirun / srun -n N) refuses before any work, in
/// one line, instead of N copies writing one output; a lone process inside a multi-task Slurm
/// allocation (SLURM_NTASKS set, no job step) runs.
#[test]
fn tools_launched_as_several_ranks_refuse_in_one_line() {
    let tmp = scratch("cli-ranks");
    let out = tmp.join("c.parquet");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(bin_dir().join("select-edges"));
        cmd.args(["--edges", "missing.parquet", "--c", "2", "--out", s(&out)]);
        for v in ["OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "SLURM_STEP_NUM_TASKS"] {
            cmd.env_remove(v);
        }
        cmd.envs(env.iter().copied()).output().unwrap()
    };
    for env in [[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")], [("PMI_SIZE", "4"), ("PMI_RANK", "0")]]
    {
        let o = run(&env);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("select-edges: launched as rank") && err.contains(env[0].0), "{err}");
        assert!(err.contains("hint:"), "{err}");
        assert!(!out.exists());
    }
    let o = run(&[("SLURM_NTASKS", "8")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("launched as rank") && err.contains("missing.parquet"), "it ran as one process: {err}");
    // A stage that runs on ranks, in a build without MPI, refuses the same way.
    if !scae::util::collective::WITH_MPI {
        let o = std::process::Command::new(bin_dir().join("finetune"))
            .args(["--acts", "a", "--suite", "s", "--out", s(&tmp.join("ft")), "--steps", "1"])
            .envs([("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("finetune: launched as rank 0 of 2") && err.contains("make build MPI=1"), "{err}");
    }
}
