//! Data-parallel finetuning on several MPI ranks (`mpirun -n 2 finetune ...`, the tools built
//! with `make build MPI=1`): the same global batch gives the one-process run up to the order of
//! floating-point sums (losses to 1e-9, updates to 1e-5 of their size), two runs are byte-
//! identical (over shared memory and over TCP, the multi-machine transport), a halted run
//! resumes bit-identically, a rank that dies ends the job, and a batch the ranks cannot share
//! is refused in one line. Without mpirun or without the feature `mpi` each test says SKIPPED.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use scae_testkit::{bin_dir, fixture_suite, fixtures, golden_cache, load, max_abs, s, scratch, tool_ok};

/// `mpirun` when this build has MPI and one is on the PATH (else the test is skipped).
fn mpirun() -> Option<PathBuf> {
    if !scae::util::collective::WITH_MPI {
        eprintln!("SKIPPED: the tools are built without the feature mpi (make test MPI=1)");
        return None;
    }
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path).map(|d| d.join("mpirun")).find(|p| p.is_file());
    if found.is_none() {
        eprintln!("SKIPPED: no mpirun on the PATH");
    }
    found
}

/// `mpirun -n np [transport flags] <tool> args` (as root, more ranks than cores, unbound).
fn launch(mpirun: &Path, np: usize, tcp: bool, tool: &str, args: &[&str]) -> Command {
    let mut c = Command::new(mpirun);
    c.args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", &np.to_string()]);
    if tcp {
        // The transport between machines, here over the loopback interface.
        c.args(["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"]);
    }
    c.arg(bin_dir().join(tool)).args(args);
    c
}

fn ran(o: Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{what} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

struct Setup {
    tmp: PathBuf,
    acts: PathBuf,
    suite: PathBuf,
    conns: PathBuf,
}

fn setup(name: &str) -> Setup {
    let tmp = scratch(name);
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let conns = fixtures().join("suites/tiny-gpt2/connections-ref.safetensors");
    Setup { tmp, acts, suite: fixture_suite("tiny-gpt2"), conns }
}

impl Setup {
    /// finetune's arguments into `out`, a batch of 2 of the 3 cached sequences: one per rank, so
    /// a rank's own statistics (a variance over one sequence is 0) would not even be finite.
    fn args(&self, out: &Path, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["--acts", s(&self.acts), "--suite", s(&self.suite), "--connections", s(&self.conns)]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend(["--out".into(), s(out).into(), "--batch-size".into(), "2".into()]);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    }
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

/// Every number of two metrics records (losses, per-module FVU, AuxK, CE) within `rel`.
fn same_numbers(a: &serde_json::Value, b: &serde_json::Value, rel: f64, what: &str) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            assert_eq!(x.len(), y.len(), "{what}: {a} vs {b}");
            for (k, v) in x {
                same_numbers(v, &y[k], rel, &format!("{what}.{k}"));
            }
        }
        (x, y) if x.is_number() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(close(x, y, rel), "{what}: {x} on one process vs {y} on two ranks");
        }
        (x, y) => assert_eq!(x, y, "{what}"),
    }
}

#[test]
fn two_ranks_train_the_one_process_run() {
    let Some(mpi) = mpirun() else { return };
    let t = setup("mpi-equal");
    // SGD with lr 1 and no clipping: the update is the gradient.
    let sgd = ["--optimizer", "sgd", "--clip-grad", "none", "--lr", "1", "--no-scale-lr"];
    // (name, flags, steps): 1 step from the fixture suite; AuxK needs dead latents, which
    // exist from the second step on with --dead-threshold 0 (a latent silent for one step is
    // dead): both runs resume the same one-process checkpoint after step 1 and take step 2.
    let auxk = ["--loss", "mse", "--dead-threshold", "0", "--auxk-alpha", "1", "--steps", "2"];
    // The autograd path (the GPU's) over MPI through host buffers, micro-batched on both sides
    // (a data-parallel autograd step always is: its two passes are where the ranks meet).
    let autograd = ["--backend", "autograd", "--micro-batch", "1"];
    let cases: [(&str, Vec<&str>); 7] = [
        ("mse", [&sgd[..], &["--loss", "mse", "--steps", "1"]].concat()),
        ("ce", [&sgd[..], &["--loss", "ce", "--steps", "1"]].concat()),
        ("mse+ce", [&sgd[..], &["--loss", "mse+ce", "--steps", "1"]].concat()),
        ("mse+auxk", [&sgd[..], &auxk[..]].concat()),
        ("autograd mse", [&sgd[..], &["--loss", "mse", "--steps", "1"], &autograd[..]].concat()),
        ("autograd mse+ce", [&sgd[..], &["--loss", "mse+ce", "--steps", "1"], &autograd[..]].concat()),
        ("autograd mse+auxk", [&sgd[..], &auxk[..], &autograd[..]].concat()),
    ];
    for (name, flags) in cases {
        let tag = name.replace(' ', "-");
        let (one, two) = (t.tmp.join(format!("{tag}-np1")), t.tmp.join(format!("{tag}-np2")));
        let resumed = name.ends_with("mse+auxk");
        let mut flags = flags.clone();
        let before = if resumed {
            let halt = [&flags[..], &["--checkpoint-every", "1", "--halt-after", "1"]].concat();
            tool_ok("finetune", &t.args(&one, &halt).iter().map(String::as_str).collect::<Vec<_>>());
            assert!(Command::new("cp").args(["-r", s(&one), s(&two)]).status().unwrap().success());
            flags.push("--resume");
            load(&one.join("checkpoint/suite.safetensors"))
        } else {
            load(&t.suite)
        };
        tool_ok("finetune", &t.args(&one, &flags).iter().map(String::as_str).collect::<Vec<_>>());
        let a2 = t.args(&two, &flags);
        let out = ran(
            launch(&mpi, 2, false, "finetune", &a2.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap(),
            name,
        );
        assert_eq!(out.lines().count(), 1, "{name}: rank 0 alone prints the summary:\n{out}");
        // Losses: whole-batch statistics, summed in another order.
        let (m1, m2) = (metrics(&one), metrics(&two));
        assert_eq!((m1.len(), m2.len()), if resumed { (2, 2) } else { (1, 1) });
        let (r1, r2) = (m1.last().unwrap(), m2.last().unwrap());
        if resumed {
            let aux: f64 = r1["auxk"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
            assert!(aux > 0.0, "the AuxK term is on at step 2: {r1}");
        }
        same_numbers(r1, r2, 1e-9, name);
        // Parameters to 1e-6 relative, and the step's change (the gradient) to 1e-5 of its
        // size: averaging per-rank losses as DDP does changes it by percents.
        let (p1, p2) = (load(&one.join("suite.safetensors")), load(&two.join("suite.safetensors")));
        for (key, x) in &p1 {
            let y = &p2[key];
            let rel = max_abs(&(x - y).unwrap()) / max_abs(x).max(1e-12);
            assert!(rel <= 1e-6, "{name} {key}: parameters differ by {rel:.2e} relative");
            let (u1, u2) = ((x - &before[key]).unwrap(), (y - &before[key]).unwrap());
            let size = max_abs(&u1);
            assert!(size > 0.0, "{name} {key}: the step changed nothing");
            let rel = max_abs(&(&u1 - &u2).unwrap()) / size;
            eprintln!("{name} {key}: update differs by {rel:.2e} of its size");
            assert!(rel <= 1e-5, "{name} {key}: updates differ by {rel:.2e} of their size");
        }
    }
}

#[test]
fn two_rank_runs_repeat_and_resume_bit_identically_over_shared_memory_and_tcp() {
    let Some(mpi) = mpirun() else { return };
    let t = setup("mpi-repeat");
    let common = ["--loss", "mse+ce", "--steps", "4", "--lr", "3e-3", "--seed", "7", "--checkpoint-every", "2"];
    let run = |out: &Path, tcp: bool, extra: &[&str]| {
        let a = t.args(out, &[&common[..], extra].concat());
        ran(
            launch(&mpi, 2, tcp, "finetune", &a.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap(),
            "np 2",
        )
    };
    let (a, b, c) = (t.tmp.join("a"), t.tmp.join("b"), t.tmp.join("c"));
    run(&a, false, &[]);
    run(&b, true, &[]);
    run(&c, false, &["--halt-after", "1"]);
    assert!(!c.join("suite.safetensors").exists());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["replicas"]["ranks"], 2, "{state}");
    assert_eq!(state["replicas"]["state_hash"].as_str().map(str::len), Some(16), "{state}");
    run(&c, false, &["--resume"]);
    let bytes = |d: &Path| std::fs::read(d.join("suite.safetensors")).unwrap();
    assert!(bytes(&a) == bytes(&b), "two np=2 runs (shared memory, TCP) differ");
    assert!(bytes(&a) == bytes(&c), "a halted and resumed np=2 run differs from an uninterrupted one");
    let lines = |d: &Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    assert_eq!(lines(&a), lines(&c));
    assert_eq!(lines(&a).lines().count(), 4);
}

#[test]
fn a_rank_that_dies_ends_the_job_and_the_run_resumes() {
    let Some(mpi) = mpirun() else { return };
    let t = setup("mpi-kill");
    let out = t.tmp.join("ft");
    let a = t.args(&out, &["--steps", "200", "--checkpoint-every", "1"]);
    let mut job = launch(&mpi, 2, false, "finetune", &a.iter().map(String::as_str).collect::<Vec<_>>())
        .env("SCAE_STEP_DELAY_MS", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !out.join("checkpoint/state.json").is_file() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGKILL one rank (a child of mpirun running finetune).
    let ranks =
        String::from_utf8(Command::new("pgrep").args(["-P", &job.id().to_string()]).output().unwrap().stdout).unwrap();
    let victim = ranks.split_whitespace().last().expect("mpirun's ranks").to_string();
    assert!(Command::new("kill").args(["-9", &victim]).status().unwrap().success());
    let killed = Instant::now();
    let status = loop {
        if let Some(st) = job.try_wait().unwrap() {
            break st;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "the job still runs 30 s after a rank died");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "the job must fail when a rank dies");
    // The same command with --resume goes on from the last checkpoint (one more step here).
    let a = t.args(&out, &["--steps", "200", "--checkpoint-every", "1", "--resume", "--halt-after", "1"]);
    let o = launch(&mpi, 2, false, "finetune", &a.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    let err2 = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "resume after the crash failed:\n{err2}");
    assert!(err2.contains("resuming at step"), "{err2}");
}

#[test]
fn a_batch_the_ranks_cannot_share_is_refused_in_one_line() {
    let Some(mpi) = mpirun() else { return };
    let t = setup("mpi-refuse");
    let mut a = t.args(&t.tmp.join("ft"), &["--steps", "1"]);
    let at = a.iter().position(|x| x == "--batch-size").unwrap();
    a[at + 1] = "3".into();
    let o = launch(&mpi, 2, false, "finetune", &a.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--batch-size 3 does not divide among 2 ranks"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!t.tmp.join("ft").join("suite.safetensors").exists());
}

/// `train-suite` on the golden cache into `out` with `extra` flags, as one process or on `np`
/// ranks.
fn train_suite(mpi: &Path, t: &Setup, out: &Path, np: usize, extra: &[&str]) -> String {
    let mut a = vec!["--acts", s(&t.acts), "--expansion", "2", "--k", "4", "--batch-size", "2", "--out", s(out)];
    a.extend_from_slice(extra);
    if np == 1 {
        return tool_ok("train-suite", &a);
    }
    ran(launch(mpi, np, false, "train-suite", &a).output().unwrap(), &format!("train-suite on {np} ranks"))
}

#[test]
fn train_suite_on_ranks_sharded_by_module_is_byte_identical_and_data_parallel_is_the_same_run() {
    let Some(mpi) = mpirun() else { return };
    let t = setup("mpi-train-suite");
    let steps = ["--steps", "3", "--checkpoint-every", "1"];
    let one = t.tmp.join("np1");
    train_suite(&mpi, &t, &one, 1, &steps);
    let bytes = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    // Sharded by module on 2 and 3 ranks (of the fixture's 4 modules): the same bytes, the
    // same metrics, the same checkpoint; halted and resumed too.
    for np in [2, 3] {
        let out = t.tmp.join(format!("shard-np{np}"));
        let printed = train_suite(&mpi, &t, &out, np, &[&steps[..], &["--shard-modules"]].concat());
        assert_eq!(printed.lines().count(), 1, "{printed}");
        for f in
            ["suite.safetensors", "metrics.jsonl", "checkpoint/optimizer.safetensors", "checkpoint/suite.safetensors"]
        {
            assert!(bytes(&one, f) == bytes(&out, f), "--shard-modules on {np} ranks: {f} differs from one process's");
        }
    }
    let halted = t.tmp.join("shard-halted");
    train_suite(&mpi, &t, &halted, 2, &[&steps[..], &["--shard-modules", "--halt-after", "2"]].concat());
    train_suite(&mpi, &t, &halted, 2, &[&steps[..], &["--shard-modules", "--resume"]].concat());
    assert!(bytes(&one, "suite.safetensors") == bytes(&halted, "suite.safetensors"), "sharded resume differs");
    // Data-parallel: the first step's losses to 1e-9, the parameters after three Adam steps
    // to 1e-6 relative.
    let dp = t.tmp.join("dp-np2");
    train_suite(&mpi, &t, &dp, 2, &steps);
    let (m1, m2) = (metrics(&one), metrics(&dp));
    same_numbers(&m1[0], &m2[0], 1e-9, "train-suite step 1");
    for (r1, r2) in m1.iter().zip(&m2) {
        same_numbers(r1, r2, 1e-5, "train-suite");
    }
    let (p1, p2) = (load(&one.join("suite.safetensors")), load(&dp.join("suite.safetensors")));
    for (key, x) in &p1 {
        let rel = max_abs(&(x - &p2[key]).unwrap()) / max_abs(x).max(1e-12);
        eprintln!("train-suite data-parallel {key}: {rel:.2e}");
        assert!(rel <= 1e-6, "train-suite data-parallel {key}: parameters differ by {rel:.2e} relative");
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dp.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["replicas"]["ranks"], 2, "{state}");
    // The autograd path (the GPU's), data-parallel through host buffers: the same contract
    // against its own one-process run.
    let (ag1, ag2) = (t.tmp.join("autograd-np1"), t.tmp.join("autograd-np2"));
    let autograd = [&steps[..], &["--backend", "autograd"]].concat();
    train_suite(&mpi, &t, &ag1, 1, &autograd);
    train_suite(&mpi, &t, &ag2, 2, &autograd);
    let (m1, m2) = (metrics(&ag1), metrics(&ag2));
    same_numbers(&m1[0], &m2[0], 1e-9, "train-suite autograd step 1");
    let (p1, p2) = (load(&ag1.join("suite.safetensors")), load(&ag2.join("suite.safetensors")));
    for (key, x) in &p1 {
        let rel = max_abs(&(x - &p2[key]).unwrap()) / max_abs(x).max(1e-12);
        assert!(rel <= 1e-6, "train-suite autograd data-parallel {key}: parameters differ by {rel:.2e} relative");
    }
}

#[test]
fn make_all_np_2_runs_every_heavy_stage_on_two_ranks() {
    let Some(mpi) = mpirun() else { return };
    let tmp = scratch("mpi-make");
    let data = tmp.join("corpus.txt");
    let line = "once upon a time there was a little cat who liked to play in the sun with her friends\n";
    std::fs::write(&data, line.repeat(40)).unwrap();
    let make = |np: &str, out: &Path| {
        let launch = format!("LAUNCH={} --allow-run-as-root --oversubscribe --bind-to none -n {np}", s(&mpi));
        let o = Command::new("make")
            .current_dir(fixtures().join("../.."))
            .args(["--no-print-directory", "all", "BUILD=0", "MPI=1", &format!("NP={np}"), &launch])
            .arg(format!("MODEL={}", s(&scae_testkit::fixture_model("tiny-neo"))))
            .arg(format!("DATA={}", s(&data)))
            .arg(format!("OUT={}", s(out)))
            .args(["CTX=12", "N_SEQS=16", "N_HELDOUT=8", "BATCH=4", "BOS=0", "PACK=1", "STEPS=3", "SUITE_STEPS=3"])
            .args(["EXPANSION=2", "K=4", "C=4", "CS=4", "DENSE_CONTROL=0", "CONTROL=0", "VIEW=1", "THREADS=1"])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "make all NP={np} failed:\n{stdout}\n{stderr}");
        stdout.to_string()
    };
    let (one, two) = (tmp.join("np1"), tmp.join("np2"));
    make("1", &one);
    let printed = make("2", &two);
    assert!(printed.contains("on NP=2 ranks"), "make says how it launches:\n{printed}");
    // NP enters the keys of the stages it runs: neither run can reuse the other's outputs.
    let names = |d: &Path, stage: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d.join(stage))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    // collect-acts writes one process's bytes on any NP: the same caches serve both.
    assert_eq!(names(&one, "acts"), names(&two, "acts"));
    for stage in ["suite", "edges", "finetune", "eval", "view"] {
        let (a, b) = (names(&one, stage), names(&two, stage));
        assert!(!a.is_empty() && a.len() == b.len() && a.iter().all(|x| !b.contains(x)), "{stage}: {a:?} vs {b:?}");
    }
    for stage in ["suite", "finetune"] {
        let b = names(&two, stage);
        let state = two.join(stage).join(&b[0]).join("checkpoint/state.json");
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        assert_eq!(state["replicas"]["ranks"], 2, "{stage} ran on two ranks: {state}");
    }
}

/// A cache of 16 sequences of 12 tokens of the fixture model tiny-neo (over a small corpus),
/// and that model's fixture suite.
fn sixteen_seqs(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = tmp.join("corpus.txt");
    let line = "once upon a time there was a little cat who liked to play in the sun with her friends\n";
    std::fs::write(&data, line.repeat(40)).unwrap();
    let acts = tmp.join("acts16");
    let model = scae_testkit::fixture_model("tiny-neo");
    let a =
        ["--model", s(&model), "--data", s(&data), "--ctx-len", "12", "--n-seqs", "16", "--pack", "--out", s(&acts)];
    tool_ok("collect-acts", &a);
    (acts, fixture_suite("tiny-neo"))
}

#[test]
fn evaluate_on_ranks_shares_the_batches_and_reports_the_same_numbers() {
    let Some(mpi) = mpirun() else { return };
    let tmp = scratch("mpi-evaluate");
    let (acts, suite) = sixteen_seqs(&tmp);
    let conns = fixtures().join("suites/tiny-neo/connections-ref.safetensors");
    let eval = |np: usize, out: &Path| -> serde_json::Value {
        let a = [
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--connections",
            s(&conns),
            "--batch-size",
            "4",
            "--out",
            s(out),
        ];
        let printed = if np == 1 {
            tool_ok("evaluate", &a)
        } else {
            ran(launch(&mpi, np, false, "evaluate", &a).output().unwrap(), &format!("evaluate on {np} ranks"))
        };
        assert!(printed.contains("CE diff"), "rank 0 prints the report:\n{printed}");
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap()
    };
    let one = eval(1, &tmp.join("np1"));
    // 4 batches: 2 per rank on 2 ranks, 2/1/1 on 3.
    for np in [2, 3] {
        let got = eval(np, &tmp.join(format!("np{np}")));
        same_numbers(&one, &got, 1e-9, &format!("evaluate on {np} ranks"));
    }
}

/// Every edge of an edges/connections file: (down module, down feature, up module, up feature)
/// and its score, in file order.
fn edge_rows(path: &Path) -> Vec<((String, i64, String, i64), f64)> {
    use scae::util::table::{floats, ints, read_parquet, strings};
    let mut out = Vec::new();
    for b in &read_parquet(path).unwrap() {
        let col = |name: &str| b.column_by_name(name).unwrap();
        let (dm, um) = (
            strings(path, "down_module", col("down_module")).unwrap(),
            strings(path, "up_module", col("up_module")).unwrap(),
        );
        let (df, uf) = (
            ints(path, "down_feature", col("down_feature")).unwrap(),
            ints(path, "up_feature", col("up_feature")).unwrap(),
        );
        let score = floats(path, "score", col("score")).unwrap();
        for r in 0..b.num_rows() {
            out.push(((dm[r].clone(), df[r], um[r].clone(), uf[r]), score[r] as f64));
        }
    }
    out
}

#[test]
fn score_edges_on_ranks_shares_the_batches_and_keeps_the_same_edges() {
    let Some(mpi) = mpirun() else { return };
    let tmp = scratch("mpi-score");
    let (acts, suite) = sixteen_seqs(&tmp);
    let score = |np: usize, out: &Path| {
        let a = ["--acts", s(&acts), "--suite", s(&suite), "--keep", "6", "--top-c", "3", "--embed", "--unembed"];
        let a = [&a[..], &["--batch-size", "4", "--out", s(out)]].concat();
        if np == 1 {
            tool_ok("score-edges", &a);
        } else {
            ran(launch(&mpi, np, false, "score-edges", &a).output().unwrap(), &format!("score-edges on {np} ranks"));
        }
    };
    let one = tmp.join("np1");
    score(1, &one);
    for np in [2, 3] {
        let out = tmp.join(format!("np{np}"));
        score(np, &out);
        for file in ["edges.parquet", "connections.parquet"] {
            let (a, b) = (edge_rows(&one.join(file)), edge_rows(&out.join(file)));
            assert!(a.len() > 100 && a.len() == b.len(), "{file} on {np} ranks: {} vs {} edges", a.len(), b.len());
            for ((ea, sa), (eb, sb)) in a.iter().zip(&b) {
                assert_eq!(ea, eb, "{file} on {np} ranks: the same edges in the same order");
                // Scores are stored in f32: statistics that agree to 1e-9 round to the same f32
                // or to its neighbour.
                assert!(close(*sa, *sb, f32::EPSILON as f64), "{file} on {np} ranks, {ea:?}: score {sa} vs {sb}");
            }
        }
        let (j1, j2) = (
            std::fs::read_to_string(one.join("scores.json")).unwrap(),
            std::fs::read_to_string(out.join("scores.json")).unwrap(),
        );
        same_numbers(&serde_json::from_str(&j1).unwrap(), &serde_json::from_str(&j2).unwrap(), 0.0, "scores.json");
    }
}

/// Every file under `dir` (relative path, bytes), sorted by path.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn view_features_on_ranks_shares_the_pass_and_writes_the_same_browser() {
    let Some(mpi) = mpirun() else { return };
    let tmp = scratch("mpi-view");
    let (acts, suite) = sixteen_seqs(&tmp);
    let conns = fixtures().join("suites/tiny-neo/connections-ref.safetensors");
    let view = |np: usize, out: &Path| {
        let a = [
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--connections",
            s(&conns),
            "--batch-size",
            "4",
            "--out",
            s(out),
        ];
        if np == 1 {
            tool_ok("view-features", &a);
        } else {
            ran(
                launch(&mpi, np, false, "view-features", &a).output().unwrap(),
                &format!("view-features on {np} ranks"),
            );
        }
    };
    let one = tmp.join("np1");
    view(1, &one);
    let want = files_under(&one);
    assert!(want.len() > 3, "{want:?}");
    for np in [2, 3] {
        let out = tmp.join(format!("np{np}"));
        view(np, &out);
        let got = files_under(&out);
        assert_eq!(got.iter().map(|f| &f.0).collect::<Vec<_>>(), want.iter().map(|f| &f.0).collect::<Vec<_>>());
        for ((name, a), (_, b)) in want.iter().zip(&got) {
            assert!(a == b, "view-features on {np} ranks: {} differs from one process's", name.display());
        }
    }
}

#[test]
fn collect_acts_on_ranks_shares_the_forward_passes_and_writes_the_same_cache() {
    let Some(mpi) = mpirun() else { return };
    let tmp = scratch("mpi-collect");
    let data = tmp.join("corpus.txt");
    let line = "once upon a time there was a little cat who liked to play in the sun with her friends\n";
    std::fs::write(&data, line.repeat(40)).unwrap();
    let model = scae_testkit::fixture_model("tiny-neo");
    let collect = |np: usize, out: &Path| {
        let a = ["--model", s(&model), "--data", s(&data), "--ctx-len", "12", "--n-seqs", "16", "--pack"];
        let a = [&a[..], &["--batch-size", "2", "--shard-seqs", "4", "--dtype", "bf16", "--out", s(out)]].concat();
        if np == 1 {
            tool_ok("collect-acts", &a);
        } else {
            ran(launch(&mpi, np, false, "collect-acts", &a).output().unwrap(), &format!("collect-acts on {np} ranks"));
        }
    };
    let one = tmp.join("np1");
    collect(1, &one);
    let want = files_under(&one);
    assert_eq!(want.len(), 5, "4 shards and the manifest: {:?}", want.iter().map(|f| &f.0).collect::<Vec<_>>());
    for np in [2, 3] {
        let out = tmp.join(format!("np{np}"));
        collect(np, &out);
        let got = files_under(&out);
        assert_eq!(got.len(), want.len());
        for ((name, a), (other, b)) in want.iter().zip(&got) {
            assert_eq!(name, other);
            assert!(a == b, "collect-acts on {np} ranks: {} differs from one process's", name.display());
        }
    }
}
