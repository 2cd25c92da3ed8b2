//! The Makefile as a newcomer drives it: output paths keyed on everything that determines them
//! (a changed DATA, or another MODEL folder that is also named `model`, reruns the stages),
//! `make -n` writes nothing, presets never mix (MODEL without PIPELINE takes the reference's
//! settings), `make all` starts by printing its settings, `make help` shows each variable's
//! comment.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use scae_testkit::{fixture_model, fixtures, s, scratch};

fn root() -> PathBuf {
    fixtures().join("../..")
}

/// `make ARGS` in the repository root with the built tools (BUILD=0) and the network off.
fn make(args: &[&str]) -> Output {
    Command::new("make")
        .current_dir(root())
        .arg("--no-print-directory")
        .args(args)
        .arg("BUILD=0")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run make")
}

fn ok(args: &[&str]) -> String {
    let o = make(args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "make {args:?} failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// Whether `make -q ARGS` finds everything up to date.
fn up_to_date(args: &[&str]) -> bool {
    let o = make(&[&["-q"][..], args].concat());
    match o.status.code() {
        Some(0) => true,
        Some(1) => false,
        c => panic!("make -q {args:?}: exit {c:?}: {}", String::from_utf8_lossy(&o.stderr)),
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// Every file under `dir` (relative path and size), sorted.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, p.metadata().unwrap().len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn outputs_are_keyed_on_every_input_and_make_n_writes_nothing() {
    let tmp = scratch("make-keys");
    // Two different models in folders that are both named `model`.
    let (model_a, model_b) = (tmp.join("a/model"), tmp.join("b/model"));
    copy_dir(&fixture_model("tiny-neo"), &model_a);
    copy_dir(&fixture_model("tiny-gpt2"), &model_b);
    let story = std::fs::read_to_string(root().join("pipelines/data/stories.txt")).unwrap();
    let (data_a, data_b) = (tmp.join("a.txt"), tmp.join("b.txt"));
    std::fs::write(&data_a, &story).unwrap();
    std::fs::write(&data_b, story.lines().rev().collect::<Vec<_>>().join("\n")).unwrap();
    let out = tmp.join("out");
    let (out_arg, ma, mb, da, db) = (
        format!("OUT={}", s(&out)),
        format!("MODEL={}", s(&model_a)),
        format!("MODEL={}", s(&model_b)),
        format!("DATA={}", s(&data_a)),
        format!("DATA={}", s(&data_b)),
    );
    let base = |m: &str, d: &str| -> Vec<String> {
        [&out_arg, m, d, "CTX=12", "N_SEQS=8", "N_HELDOUT=4", "BATCH=4", "BOS=0", "PACK=1", "THREADS=1"]
            .iter()
            .map(|x| x.to_string())
            .collect()
    };
    let args = |m: &str, d: &str, goal: &str| -> Vec<String> {
        let mut a = vec![goal.to_string()];
        a.extend(base(m, d));
        a
    };
    // `make -n all` on nothing yet: prints the commands, writes nothing.
    let dry = make(&strs(&[&["-n".to_string()][..], &args(&ma, &da, "all")].concat()));
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(String::from_utf8_lossy(&dry.stdout).contains("collect-acts"));
    assert!(!out.exists(), "make -n all wrote {}", out.display());
    // The activation caches of model A on data A.
    ok(&strs(&args(&ma, &da, "acts")));
    ok(&strs(&args(&ma, &da, "heldout")));
    assert!(up_to_date(&strs(&args(&ma, &da, "acts"))));
    assert!(up_to_date(&strs(&args(&ma, &da, "heldout"))));
    // Other data, another model in a folder of the same name: the stages rerun.
    assert!(!up_to_date(&strs(&args(&ma, &db, "acts"))), "DATA changed, the cache was not remade");
    assert!(!up_to_date(&strs(&args(&ma, &db, "heldout"))), "DATA changed, the held-out cache was not remade");
    assert!(!up_to_date(&strs(&args(&mb, &da, "acts"))), "another folder named model reused the cache");
    // The same data file edited in place (new contents, same path): rerun.
    std::fs::write(&data_a, story.replace("Lily", "Mia")).unwrap();
    assert!(!up_to_date(&strs(&args(&ma, &da, "acts"))), "DATA's contents changed, the cache was not remade");
    // Paths with quotes are inputs like any other: two of them do not share a key.
    let (qa, qb) = (tmp.join("it's.txt"), tmp.join("other's.txt"));
    std::fs::write(&qa, &story).unwrap();
    std::fs::write(&qb, story.replace("Tom", "Sam")).unwrap();
    let acts_of = |d: &Path| -> String {
        let p =
            ok(&strs(&[vec!["-s".to_string(), "paths".to_string()], base(&ma, &format!("DATA={}", s(d)))].concat()));
        p.lines().find_map(|l| l.strip_prefix("acts: ")).unwrap().to_string()
    };
    assert_ne!(acts_of(&qa), acts_of(&qb));
    // The toy's seed keys its folder: another seed makes another toy, never reuses this one.
    let dry = ok(&["-n", "toy", "TOY_SEED=1", &out_arg]);
    assert!(dry.contains(&format!("--seed 1 --out {}/toy-seed1", s(&out))), "{dry}");
    // `make -n all` with some outputs present writes nothing either.
    let before = listing(&out);
    let dry = make(&strs(&[&["-n".to_string()][..], &args(&ma, &db, "all")].concat()));
    assert!(dry.status.success());
    assert_eq!(listing(&out), before, "make -n all changed {}", out.display());
}

/// With CKPT_EVERY, a stage whose run was interrupted resumes from its checkpoint on the next
/// `make` instead of starting over, and ends as an uninterrupted run.
#[test]
fn make_resumes_an_interrupted_stage() {
    let tmp = scratch("make-resume");
    let story = root().join("pipelines/data/stories.txt");
    let base = |out: &Path| -> Vec<String> {
        [
            format!("OUT={}", s(out)),
            format!("MODEL={}", s(&fixture_model("tiny-neo"))),
            format!("DATA={}", s(&story)),
            "CTX=12".into(),
            "N_SEQS=16".into(),
            "BATCH=4".into(),
            "PACK=1".into(),
            "EXPANSION=2".into(),
            "K=4".into(),
            "SUITE_STEPS=6".into(),
            "CKPT_EVERY=2".into(),
            "THREADS=1".into(),
        ]
        .to_vec()
    };
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    // The train-suite command make would run, stopped after 2 steps (as a kill would).
    ok(&strs(&[vec!["acts".to_string()], base(&a)].concat()));
    let dry = ok(&strs(&[vec!["-n".to_string(), "suite".to_string()], base(&a)].concat()));
    let cmd: String = dry
        .lines()
        .skip_while(|l| !l.contains("train-suite"))
        .take_while(|l| !l.starts_with("touch"))
        .collect::<Vec<_>>()
        .join("\n");
    let halted =
        Command::new("bash").current_dir(root()).args(["-c", &format!("{cmd} --halt-after 2")]).output().unwrap();
    assert!(halted.status.success(), "{cmd}: {}", String::from_utf8_lossy(&halted.stderr));
    let o = make(&strs(&[vec!["suite".to_string()], base(&a)].concat()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("train-suite: resuming at step 2 of 6"), "{err}");
    ok(&strs(&[vec!["suite".to_string()], base(&b)].concat()));
    let suite_dir = |out: &Path| -> PathBuf {
        let paths = ok(&strs(&[vec!["-s".to_string(), "paths".to_string()], base(out)].concat()));
        PathBuf::from(paths.lines().find_map(|l| l.strip_prefix("suite: ")).unwrap())
    };
    assert_eq!(
        std::fs::read(suite_dir(&a).join("suite.safetensors")).unwrap(),
        std::fs::read(suite_dir(&b).join("suite.safetensors")).unwrap()
    );
}

#[test]
fn presets_are_explicit_and_make_says_what_it_runs() {
    // The toy preset without MODEL; the reference's defaults with MODEL and no PIPELINE.
    let toy = ok(&["-s", "settings"]);
    assert!(toy.contains("preset toy (pipelines/toy.mk)"), "{toy}");
    assert!(toy.contains("N_SEQS=512") && toy.contains("SUITE_LR=3e-4"), "{toy}");
    let own = ok(&["-s", "settings", "MODEL=/models/my-gpt2", "DATA=/data/web.jsonl.zst", "CTX=128", "K=64"]);
    assert!(own.contains("preset default (pipelines/default.mk), MODEL from the command line"), "{own}");
    for want in ["N_SEQS=8192", "SUITE_LR=2e-4", "STEPS=3051", "LR=1e-3", "BOS=0", "PACK=0", "BATCH=256"] {
        assert!(own.contains(want), "{want} in: {own}");
    }
    for toy_only in ["N_SEQS=512", "SUITE_STEPS=400 ", "LR=1e-4", "BOS=1"] {
        assert!(!own.contains(toy_only), "the toy preset's {toy_only} leaked into: {own}");
    }
    // MODEL without DATA: a clear error naming DATA.
    let o = make(&["-s", "settings", "MODEL=/models/my-gpt2"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("DATA is required"), "{}", String::from_utf8_lossy(&o.stderr));
    // An explicit preset wins, and an unknown one is named.
    assert!(ok(&["-s", "settings", "PIPELINE=pythia-70m"]).contains("MODEL=EleutherAI/pythia-70m"));
    let o = make(&["-s", "settings", "PIPELINE=nope"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("PIPELINE=nope: no pipelines/nope.mk"));
    // `make help`: the targets, then every variable with its value and its comment.
    let help = ok(&["-s", "help"]);
    assert!(help.contains("all: activations -> suite"), "{help}");
    assert!(help.contains("  C = 16\n      Connections kept per downstream feature."), "{help}");
    assert!(help.contains("  CTX = 64\n      Tokens per sequence (the toy model's n_ctx is 128)."), "{help}");
    assert!(help.contains("  LR = 1e-4\n"), "{help}");
}

/// With sparse ends, the dense-ends run beside them scores and selects its own edges (no embed
/// candidates competing for its C slots).
#[test]
fn dense_ends_runs_select_from_edges_without_embed_candidates() {
    let out = scratch("make-ends").join("out");
    let o = ok(&["-n", "all", "EMBED_C=4", "C=8", &format!("OUT={}", s(&out))]);
    let selects: Vec<&str> = o.lines().filter(|l| l.contains("select-edges --edges")).collect();
    let sparse = selects.iter().find(|l| l.contains("--embed-c 4") && !l.contains("--random")).expect("sparse ends");
    let dense = selects.iter().find(|l| !l.contains("--embed-c")).expect("dense ends");
    assert!(sparse.contains("-embed-") && !dense.contains("-embed-"), "{sparse}\n{dense}");
    assert!(o.contains("score-edges") && o.matches("score-edges --acts").count() == 2, "{o}");
    assert!(!out.exists());
}

/// `SELECT=learned` learns the connections with learn-connections; with UNEMBED_C its loss has
/// the CE term that learns the unembed candidates (and the output is keyed on that loss).
#[test]
fn select_learned_runs_learn_connections_with_ce_when_the_unembedding_is_sparse() {
    let out = scratch("make-learned").join("out");
    let o = ok(&["-n", "all", "SELECT=learned", "C=8", &format!("OUT={}", s(&out))]);
    let learn: Vec<&str> = o.lines().filter(|l| l.contains("learn-connections --acts")).collect();
    assert!(!learn.is_empty() && learn.iter().all(|l| l.contains("--loss mse ") && !l.contains("--unembed-c")), "{o}");
    let o = ok(&["-n", "all", "SELECT=learned", "C=8", "UNEMBED_C=4", &format!("OUT={}", s(&out))]);
    let learn: Vec<&str> = o.lines().filter(|l| l.contains("learn-connections --acts")).collect();
    let sparse = learn.iter().find(|l| l.contains("--unembed-c 4")).expect("a learn run with unembed candidates");
    assert!(sparse.contains("--loss mse+ce"), "{sparse}");
    assert!(!out.exists());
}
