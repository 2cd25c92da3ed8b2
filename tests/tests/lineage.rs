//! Suites carry their connections and their lineage: a finetuned suite stores the connections it
//! was trained with (every tool uses them by default and says which pass it runs), records the
//! suite and data it came from; connections record the suite they were scored for, and using
//! them on a suite outside that lineage warns and is recorded; evaluate tells held-out tokens from
//! training tokens by the suite's lineage.

use std::path::{Path, PathBuf};

use scae_testkit::{fixture_model, s, scratch, tool, tool_ok};

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

struct Run {
    tmp: PathBuf,
}

impl Run {
    fn p(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// A cache of the tiny GPT-Neo on the fixture stories: `n` sequences after the first `skip`.
    fn cache(&self, name: &str, skip: u64, n: u64) -> PathBuf {
        let data = scae_testkit::fixtures().join("../../pipelines/data/stories.txt");
        let out = self.p(name);
        let (skip, n) = (skip.to_string(), n.to_string());
        tool_ok(
            "collect-acts",
            &[
                "--model",
                s(&fixture_model("tiny-neo")),
                "--data",
                s(&data),
                "--ctx-len",
                "16",
                "--pack",
                "--skip-seqs",
                &skip,
                "--n-seqs",
                &n,
                "--out",
                s(&out),
            ],
        );
        out
    }

    /// evaluate; returns eval.json and stderr.
    fn evaluate(&self, out: &str, args: &[&str]) -> (serde_json::Value, String) {
        let o = tool("evaluate", &[args, &["--out", s(&self.p(out))]].concat());
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "evaluate {args:?}: {err}");
        (json(&self.p(out).join("eval.json")), err)
    }
}

#[test]
fn finetuned_suites_carry_their_connections_and_lineage() {
    let r = Run { tmp: scratch("lineage") };
    let acts = r.cache("acts", 0, 24);
    let suite = |name: &str, seed: &str| {
        let out = r.p(name);
        tool_ok(
            "train-suite",
            &[
                "--acts",
                s(&acts),
                "--out",
                s(&out),
                "--expansion",
                "2",
                "--k",
                "4",
                "--steps",
                "6",
                "--batch-size",
                "8",
                "--seed",
                seed,
            ],
        );
        out
    };
    let (a, b) = (suite("a", "0"), suite("b", "1"));
    let conns = |suite: &Path, name: &str| {
        let edges = r.p(&format!("edges-{name}"));
        tool_ok("score-edges", &["--acts", s(&acts), "--suite", s(suite), "--keep", "8", "--out", s(&edges)]);
        let c = r.p(&format!("{name}.parquet"));
        tool_ok("select-edges", &["--edges", s(&edges.join("edges.parquet")), "--c", "4", "--out", s(&c)]);
        c
    };
    let (ca, cb) = (conns(&a, "ca"), conns(&b, "cb"));
    let ft = r.p("ft");
    tool_ok(
        "finetune",
        &[
            "--acts",
            s(&acts),
            "--suite",
            s(&a),
            "--connections",
            s(&ca),
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--out",
            s(&ft),
        ],
    );
    // The finetuned suite stores its connections and records where it came from.
    assert!(ft.join("connections.parquet").is_file());
    let cfg = json(&ft.join("config.json"));
    let lineage = &cfg["lineage"];
    let (ea, _) = r.evaluate("ea", &["--acts", s(&acts), "--suite", s(&a)]);
    assert_eq!(lineage["parent"]["id"], ea["suite_id"], "{lineage}");
    assert_eq!(lineage["ancestors"][0], ea["suite_id"]);
    assert_eq!(lineage["trained_on"].as_array().unwrap().len(), 2, "train-suite, then finetune: {lineage}");
    assert_eq!(lineage["connections"]["source"], s(&ca));
    assert_eq!(lineage["connections"]["suite_id"], ea["suite_id"], "the connections were scored for its parent");
    assert_eq!(cfg["args"]["run"]["flags"]["--loss"], "mse");
    // evaluate uses them by default, and says so; the numbers equal passing the file.
    let (with_file, _) = r.evaluate("e-file", &["--acts", s(&acts), "--suite", s(&ft), "--connections", s(&ca)]);
    let (stored, err) = r.evaluate("e-stored", &["--acts", s(&acts), "--suite", s(&ft)]);
    assert_eq!(stored["ce"], with_file["ce"]);
    assert!(err.contains("evaluate: pass: pruned, ") && err.contains("connections stored with the suite in"), "{err}");
    assert!(stored["pass"].as_str().unwrap().contains("stored with the suite"));
    assert_eq!(stored["connections_lineage"]["in_lineage"], true);
    assert!(stored["connections_lineage"]["note"].as_str().unwrap().contains("an ancestor"), "{}", stored);
    // The full pass only when asked, and said.
    let (all, err) = r.evaluate("e-all", &["--acts", s(&acts), "--suite", s(&ft), "--connections", "all"]);
    assert_ne!(all["ce"], stored["ce"]);
    assert!(
        err.contains("pass: all connections (every preceding feature; --connections all, not those stored"),
        "{err}"
    );
    // Connections scored for another suite of the same shape: a warning naming both, recorded.
    let (other, err) = r.evaluate("e-other", &["--acts", s(&acts), "--suite", s(&ft), "--connections", s(&cb)]);
    assert!(err.contains("evaluate: warning: ") && err.contains(s(&cb)) && err.contains(s(&b)), "{err}");
    assert!(err.contains("which is neither") && err.contains(s(&ft)), "{err}");
    assert_eq!(other["connections_lineage"]["in_lineage"], false);
    // view-features runs the same pass by default.
    let o = tool("view-features", &["--acts", s(&acts), "--suite", s(&ft), "--out", s(&r.p("view"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success()
            && err.contains("view-features: pass: pruned, ")
            && err.contains("connections stored with the suite"),
        "{err}"
    );
    // convert-suite carries them into the reference's layout, and the suite keeps its identity.
    tool_ok("convert-suite", &["--suite", s(&ft), "--to", "reference", "--out", s(&r.p("ref"))]);
    let (conv, err) = r.evaluate("e-ref", &["--acts", s(&acts), "--suite", s(&r.p("ref"))]);
    assert_eq!(conv["ce"], stored["ce"], "{err}");
    assert_eq!(conv["suite_id"], stored["suite_id"]);
    assert!(err.contains("pass: pruned, ") && err.contains("connections stored with the suite"), "{err}");
    // Held-out or training tokens, from the lineage: the cache it was trained on, the sequences
    // after it in the same text, and sequences that overlap it.
    assert_eq!(stored["tokens"], "training", "{}", stored["tokens_note"]);
    let after = r.cache("after", 24, 8);
    let (held, _) = r.evaluate("e-held", &["--acts", s(&after), "--suite", s(&ft)]);
    assert_eq!(held["tokens"], "held-out", "{}", held["tokens_note"]);
    let overlap = r.cache("overlap", 20, 8);
    let (ov, _) = r.evaluate("e-overlap", &["--acts", s(&overlap), "--suite", s(&ft)]);
    assert_eq!(ov["tokens"], "training", "{}", ov["tokens_note"]);
    assert!(ov["tokens_note"].as_str().unwrap().contains("overlapping"), "{}", ov["tokens_note"]);
    // A suite trained by streaming the same text (no cache) knows it saw these tokens too.
    let data = scae_testkit::fixtures().join("../../pipelines/data/stories.txt");
    let streamed = r.p("streamed");
    tool_ok(
        "train-suite",
        &[
            "--model",
            s(&fixture_model("tiny-neo")),
            "--data",
            s(&data),
            "--ctx-len",
            "16",
            "--pack",
            "--out",
            s(&streamed),
            "--expansion",
            "2",
            "--k",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "8",
        ],
    );
    let (st, _) = r.evaluate("e-streamed", &["--acts", s(&acts), "--suite", s(&streamed)]);
    assert_eq!(st["tokens"], "training", "{}", st["tokens_note"]);
    let (st, _) = r.evaluate("e-streamed-after", &["--acts", s(&after), "--suite", s(&streamed)]);
    assert_eq!(st["tokens"], "held-out", "{}", st["tokens_note"]);
}
