//! The Python reference's own files (tests/fixtures/gen_reference_files.py, written by its code):
//! HF suite folders in every key layout, training checkpoints, `top_connections_{C}.pkl` with
//! CUDA-tagged storages and `connections.pt` — read exactly as the equivalent safetensors
//! inputs, used by the tools, converted both ways byte-identically, and refused clearly when bad.

use std::path::{Path, PathBuf};

use candle_core::Device;
use scae::formats::connections::Connections;
use scae::formats::suite::Suite;
use scae_testkit::{fixture_model, fixtures, golden_cache, s, scratch, tool_fails, tool_ok};

const MODELS: [&str; 2] = ["tiny-neo", "tiny-pythia"];

fn refdir(name: &str) -> PathBuf {
    fixtures().join("reference").join(name)
}

fn parallel(name: &str) -> bool {
    name.contains("pythia")
}

/// Every parameter of `a` equals `b`'s bit for bit.
fn same_params(a: &Suite, b: &Suite, what: &str) {
    assert_eq!((a.k, a.n_features, a.d_model, a.modules.clone()), (b.k, b.n_features, b.d_model, b.modules.clone()));
    let (pa, pb) = (a.host_params().unwrap(), b.host_params().unwrap());
    for (m, (x, y)) in a.modules.iter().zip(pa.iter().zip(&pb)) {
        for ((n, u), (_, v)) in x.named().into_iter().zip(y.named()) {
            assert!(u.iter().zip(v.iter()).all(|(p, q)| p.to_bits() == q.to_bits()), "{what}: {m}.{n} differs");
        }
    }
}

/// Every edge of `c` in order, without scores (the reference's files carry none: NaN).
fn edges(c: &Connections) -> Vec<(usize, usize, usize, u32)> {
    let mut v = Vec::new();
    for (d, fs) in c.edges.iter().enumerate() {
        for (i, es) in fs.iter().enumerate() {
            v.extend(es.iter().map(|e| (d, i, e.up, e.feature)));
        }
    }
    v
}

/// A copy of training checkpoint folder `name/train` with the config.json a user writes there.
fn train_dir(tmp: &Path, name: &str, base: &Suite) -> PathBuf {
    let d = tmp.join(format!("train-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(refdir(name).join("train/checkpoint.pt"), d.join("checkpoint.pt")).unwrap();
    let cfg = format!("{{\"k\": {}, \"n_features\": {}}}", base.k, base.n_features);
    std::fs::write(d.join("config.json"), cfg).unwrap();
    d
}

#[test]
fn reference_suites_and_connection_files_load_exactly() {
    let dev = Device::Cpu;
    let tmp = scratch("ref-load");
    for name in MODELS {
        let base = Suite::load(&fixtures().join("suites").join(name).join("suite.safetensors"), &dev).unwrap();
        let conn_ref = fixtures().join("suites").join(name).join("connections-ref.safetensors");
        let want = Connections::load(&conn_ref, &base.modules, base.n_features, parallel(name)).unwrap();
        assert!(want.n_edges() > 0);
        let train = train_dir(&tmp, name, &base);
        for (dir, embedded) in [
            (refdir(name).join("hf"), true),
            (refdir(name).join("hf-old"), false),
            (refdir(name).join("caden"), false),
            (train, false),
        ] {
            let what = format!("{name} {}", dir.display());
            let suite = Suite::load(&dir, &dev).unwrap();
            same_params(&suite, &base, &what);
            match (&suite.embedded, embedded) {
                (Some(e), true) => {
                    let got = e.connections(&suite.modules, suite.n_features, parallel(name)).unwrap();
                    assert_eq!(edges(&got), edges(&want), "{what}: embedded connections");
                }
                (None, false) => {}
                (e, _) => panic!("{what}: embedded connections {:?}, expected {embedded}", e.is_some()),
            }
        }
        for file in ["top_connections_6.pkl", "connections.pt"] {
            let got =
                Connections::load(&refdir(name).join(file), &base.modules, base.n_features, parallel(name)).unwrap();
            assert_eq!(edges(&got), edges(&want), "{name} {file}");
        }
    }
}

fn eval_numbers(dir: &Path) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    serde_json::json!({"ce": v["ce"], "clean_ce": v["clean_ce"], "modules": v["modules"]})
}

#[test]
fn tools_use_reference_suites_and_their_connections() {
    for name in MODELS {
        let tmp = scratch(&format!("ref-tools-{name}"));
        let acts = golden_cache(&tmp, name);
        let fx = fixtures().join("suites").join(name);
        let eval = |out: &str, args: &[&str]| -> (serde_json::Value, String) {
            let o = tmp.join(out);
            let mut a = vec!["--acts", s(&acts), "--out", s(&o)];
            a.extend_from_slice(args);
            let run = scae_testkit::tool("evaluate", &a);
            assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
            (eval_numbers(&o), String::from_utf8_lossy(&run.stderr).to_string())
        };
        let st = fx.join("suite.safetensors");
        let cr = fx.join("connections-ref.safetensors");
        let (want, _) = eval("want", &["--suite", s(&st), "--connections", s(&cr)]);
        // The suite's stored connections by default, said on stderr.
        let hf = refdir(name).join("hf");
        let (got, err) = eval("hf", &["--suite", s(&hf)]);
        assert_eq!(got, want, "{name}: evaluate --suite hf/ (stored connections)");
        assert!(err.contains("evaluate: pass: pruned") && err.contains("stored with the suite in"), "{err}");
        assert!(err.contains("reference suite") && err.contains("language-model entries"), "{err}");
        for file in ["top_connections_6.pkl", "connections.pt"] {
            let p = refdir(name).join(file);
            let (got, err) = eval(file, &["--suite", s(&refdir(name).join("caden")), "--connections", s(&p)]);
            assert_eq!(got, want, "{name}: caden suite + {file}");
            // The reference lists same-layer attn->mlp pairs on Pythia; its pass ignores them.
            assert_eq!(err.contains("same-layer attn->mlp edges"), parallel(name), "{err}");
        }
        // `--connections all`: the full pass, as a suite without connections.
        let (full, _) = eval("full", &["--suite", s(&st)]);
        let (got, err) = eval("hf-all", &["--suite", s(&hf), "--connections", "all"]);
        assert_eq!(got, full, "{name}: --connections all");
        assert!(err.contains("pass: all connections") && err.contains("--connections all, not those stored"), "{err}");
        assert_ne!(full, want);
        // finetune starts from a reference suite with its stored connections and writes a scae suite.
        let ft = tmp.join("ft");
        tool_ok(
            "finetune",
            &["--acts", s(&acts), "--suite", s(&hf), "--steps", "2", "--batch-size", "2", "--out", s(&ft)],
        );
        assert!(ft.join("suite.safetensors").is_file());
    }
}

#[test]
fn convert_suite_round_trips_byte_identically() {
    let dev = Device::Cpu;
    for name in MODELS {
        let tmp = scratch(&format!("ref-convert-{name}"));
        let model = fixture_model(name);
        let (s1, r1, s2) = (tmp.join("s1"), tmp.join("r1"), tmp.join("s2"));
        // Reference -> scae, checked against the model's block type.
        tool_ok(
            "convert-suite",
            &["--suite", s(&refdir(name).join("hf")), "--to", "scae", "--model", s(&model), "--out", s(&s1)],
        );
        let base = Suite::load(&fixtures().join("suites").join(name).join("suite.safetensors"), &dev).unwrap();
        same_params(&Suite::load(&s1, &dev).unwrap(), &base, name);
        let cr = fixtures().join("suites").join(name).join("connections-ref.safetensors");
        let want = Connections::load(&cr, &base.modules, base.n_features, parallel(name)).unwrap();
        let got =
            Connections::load(&s1.join("connections.parquet"), &base.modules, base.n_features, parallel(name)).unwrap();
        assert_eq!(got.edge_set(), want.edge_set());
        // scae -> reference -> scae: every file byte-identical.
        let c1 = s1.join("connections.parquet");
        tool_ok("convert-suite", &["--suite", s(&s1), "--connections", s(&c1), "--to", "reference", "--out", s(&r1)]);
        let back = Suite::load(&r1, &dev).unwrap();
        same_params(&back, &base, name);
        assert!(back.embedded.is_some());
        tool_ok("convert-suite", &["--suite", s(&r1), "--to", "scae", "--out", s(&s2)]);
        for f in ["suite.safetensors", "config.json", "connections.parquet"] {
            assert_eq!(std::fs::read(s1.join(f)).unwrap(), std::fs::read(s2.join(f)).unwrap(), "{name}: {f} differs");
        }
        // Without the sidecar the checkpoint's own tables are used: the same edges.
        std::fs::remove_file(r1.join(scae::formats::reference::SIDECAR)).unwrap();
        let s3 = tmp.join("s3");
        tool_ok("convert-suite", &["--suite", s(&r1), "--to", "scae", "--model", s(&model), "--out", s(&s3)]);
        let got =
            Connections::load(&s3.join("connections.parquet"), &base.modules, base.n_features, parallel(name)).unwrap();
        assert_eq!(got.edge_set(), want.edge_set());
        // Our checkpoint.pt reads back with the same parser as torch's.
        let f = scae::formats::torch::TorchFile::open(&r1.join("checkpoint.pt")).unwrap();
        assert!(f.root.get("aes.attn_0.encoder.weight").is_some() && f.root.get("connections").is_some());
    }
}

#[test]
fn bad_reference_files_are_one_line_errors() {
    let tmp = scratch("ref-bad");
    let name = "tiny-neo";
    let acts = golden_cache(&tmp, name);
    let hf = refdir(name).join("hf");
    let copy = |label: &str| -> PathBuf {
        let d = tmp.join(label);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "checkpoint.pt"] {
            std::fs::copy(hf.join(f), d.join(f)).unwrap();
        }
        d
    };
    let st = fixtures().join("suites").join(name).join("suite.safetensors");
    let eval_fails = |suite: &Path, conns: Option<&Path>, needles: &[&str]| {
        let out = tmp.join("out");
        let mut a = vec!["--acts", s(&acts), "--suite", s(suite), "--out", s(&out)];
        if let Some(c) = conns {
            a.extend(["--connections", s(c)]);
        }
        let err = tool_fails("evaluate", &a, needles);
        assert_eq!(err.trim_end().lines().filter(|l| l.starts_with("evaluate: ")).count(), 1, "{err}");
        assert!(!out.exists(), "output left behind");
    };
    // A truncated zip.
    let d = copy("truncated");
    let bytes = std::fs::read(d.join("checkpoint.pt")).unwrap();
    std::fs::write(d.join("checkpoint.pt"), &bytes[..bytes.len() / 2]).unwrap();
    eval_fails(&d, None, &["checkpoint.pt", "not a readable torch.save zip file"]);
    // config.json that disagrees with the tensors, or lacks a field.
    let d = copy("bad-config");
    std::fs::write(d.join("config.json"), r#"{"k": 4, "n_features": 64}"#).unwrap();
    eval_fails(&d, None, &["config.json", "field `n_features`: 64 disagrees", "[32, 16]"]);
    std::fs::write(d.join("config.json"), r#"{"n_features": 32}"#).unwrap();
    eval_fails(&d, None, &["config.json", "missing field `k`"]);
    // A training checkpoint folder without config.json says what to write.
    let d = tmp.join("train-no-config");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(refdir(name).join("train/checkpoint.pt"), d.join("checkpoint.pt")).unwrap();
    eval_fails(&d, None, &["config.json", "hint", "\"k\": K"]);
    // A pickle whose global would run a command, one with an opcode these files never use,
    // a truncated one, and one holding something other than connection tables.
    let evil = fixtures().join("reference/bad/evil.pkl");
    eval_fails(&st, Some(&evil), &["evil.pkl", "global `posix.system`", "refusing"]);
    let odd = tmp.join("odd.pkl");
    std::fs::write(&odd, b"\x80\x02}q\x00(X\x01\x00\x00\x00aI1\nu.").unwrap();
    eval_fails(&st, Some(&odd), &["odd.pkl", "unexpected pickle opcode 0x49"]);
    let pkl = std::fs::read(refdir(name).join("top_connections_6.pkl")).unwrap();
    let cut = tmp.join("cut.pkl");
    std::fs::write(&cut, &pkl[..pkl.len() - 40]).unwrap();
    eval_fails(&st, Some(&cut), &["cut.pkl", "truncated"]);
    let list = tmp.join("list.pkl");
    std::fs::write(&list, b"\x80\x02]q\x00.").unwrap();
    eval_fails(&st, Some(&list), &["list.pkl", "expected dict[down][up] -> tensor, found a list"]);
    // Connection tables that do not fit the suite.
    let wrong_f = tmp.join("wrong.pt");
    let ck = scae::formats::torch::TorchFile::open(&refdir(name).join("connections.pt")).unwrap();
    drop(ck);
    let dense = scae::formats::torch::Dense {
        dtype: scae::formats::torch::Dtype::I64,
        shape: vec![5, 1],
        bytes: [0i64; 5].iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    use scae::formats::torch::Item;
    let item =
        Item::Dict(vec![("mlp_0".into(), Item::Dict(vec![("attn_0".into(), Item::Tensor(dense))], false))], false);
    scae::formats::torch::save(&wrong_f, &item).unwrap();
    eval_fails(&st, Some(&wrong_f), &["wrong.pt", "tensor `mlp_0.attn_0`: expected shape [32, C], found [5, 1]"]);
    // convert-suite says the same, and leaves no output.
    let d = copy("bad-config-2");
    std::fs::write(d.join("config.json"), r#"{"k": 0, "n_features": 32}"#).unwrap();
    let out = tmp.join("converted");
    tool_fails(
        "convert-suite",
        &["--suite", s(&d), "--to", "scae", "--out", s(&out)],
        &["field `k`: expected a positive integer, found 0"],
    );
    assert!(!out.exists());
}

#[test]
fn suite_hub_ids_resolve_through_the_hugging_face_cache_offline() {
    let tmp = scratch("ref-hub");
    let name = "tiny-neo";
    let acts = golden_cache(&tmp, name);
    // The cache layout hf-hub reads: models--owner--name/{refs/main, snapshots/<rev>/...}.
    let repo = tmp.join("hf/hub/models--scae-fixtures--tiny-neo-suite");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "checkpoint.pt"] {
        std::fs::copy(refdir(name).join("hf").join(f), snap.join(f)).unwrap();
    }
    let run = |id: &str, out: &str| {
        std::process::Command::new(scae_testkit::bin_dir().join("evaluate"))
            .args(["--acts", s(&acts), "--suite", id, "--out", s(&tmp.join(out))])
            .env("HF_HOME", tmp.join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let o = run("scae-fixtures/tiny-neo-suite", "hub");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (tmp.join("hub"), tmp.join("direct"));
    tool_ok("evaluate", &["--acts", s(&acts), "--suite", s(&refdir(name).join("hf")), "--out", s(&b)]);
    assert_eq!(eval_numbers(&a), eval_numbers(&b));
    // Not cached and offline: one line saying so, with the way out.
    let o = run("scae-fixtures/absent-suite", "absent");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--suite scae-fixtures/absent-suite") && err.contains("HF_HUB_OFFLINE") && err.contains("hint")
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn make_all_takes_a_reference_suite_and_connections_offline() {
    let tmp = scratch("ref-make");
    let data = tmp.join("corpus.txt");
    let line = "once upon a time there was a little cat who liked to play in the sun with her friends\n";
    std::fs::write(&data, line.repeat(40)).unwrap();
    let root = scae_testkit::fixtures().join("../..");
    let hf = refdir("tiny-neo").join("hf");
    let pkl = refdir("tiny-neo").join("top_connections_6.pkl");
    let out = tmp.join("out");
    let o = std::process::Command::new("make")
        .current_dir(&root)
        .args([
            "--no-print-directory",
            "all",
            "BUILD=0",
            &format!("MODEL={}", s(&fixture_model("tiny-neo"))),
            &format!("DATA={}", s(&data)),
            &format!("SUITE={}", s(&hf)),
            &format!("CONNECTIONS={}", s(&pkl)),
            &format!("OUT={}", s(&out)),
            "CTX=12",
            "N_SEQS=16",
            "BATCH=4",
            "BOS=0",
            "PACK=1",
            "STEPS=3",
            "THREADS=1",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "make failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("## before finetuning ({}, held-out tokens)", pkl.display())), "{stdout}");
    assert!(stdout.contains("## after finetuning"), "{stdout}");
    // No edge scoring: the connections came from the pickle.
    assert!(!out.join("edges").exists(), "make scored edges although CONNECTIONS was given");
    assert!(!stdout.contains("score-edges"), "{stdout}");
}
