//! score-edges, select-edges and evaluate on a cache of the golden tokens, against the
//! reference's outputs (tests/fixtures/gen_suite.py) and against each other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array};
use candle_core::{Device, Tensor};
use scae_testkit::{fixtures, golden, golden_cache, s, scratch, tool_fails, tool_ok};

fn suite(name: &str) -> PathBuf {
    scae_testkit::fixture_suite(name)
}

/// (down, up) -> per down feature, the upstream features in file order.
fn read_edges(path: &Path) -> HashMap<(String, String), Vec<Vec<i64>>> {
    let batches = scae::util::table::read_parquet(path).unwrap();
    let mut out: HashMap<(String, String), Vec<Vec<i64>>> = HashMap::new();
    for b in &batches {
        let dm = scae::util::table::strings(path, "down_module", b.column_by_name("down_module").unwrap()).unwrap();
        let um = scae::util::table::strings(path, "up_module", b.column_by_name("up_module").unwrap()).unwrap();
        let df = scae::util::table::ints(path, "down_feature", b.column_by_name("down_feature").unwrap()).unwrap();
        let uf = scae::util::table::ints(path, "up_feature", b.column_by_name("up_feature").unwrap()).unwrap();
        for r in 0..b.num_rows() {
            let rows = out.entry((dm[r].clone(), um[r].clone())).or_insert_with(|| vec![vec![]; 32]);
            if rows.len() <= df[r] as usize {
                rows.resize(df[r] as usize + 1, vec![]); // unembed rows: down_feature is a token id
            }
            rows[df[r] as usize].push(uf[r]);
        }
    }
    out
}

#[test]
fn score_edges_top_c_equals_the_reference_selection() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let tmp = scratch(&format!("score-{name}"));
        let acts = golden_cache(&tmp, name);
        let out = tmp.join("edges");
        tool_ok(
            "score-edges",
            &["--acts", s(&acts), "--suite", s(&suite(name)), "--top-c", "6", "--keep", "10", "--out", s(&out)],
        );
        let got = read_edges(&out.join("connections.parquet"));
        let g = golden(&format!("suite-{name}"));
        let mut compared = 0;
        for (key, want) in g.iter().filter(|(k, _)| k.starts_with("topc.")) {
            let parts: Vec<&str> = key.split('.').collect();
            let want = want.to_vec2::<i64>().unwrap();
            let rows =
                got.get(&(parts[1].to_string(), parts[2].to_string())).cloned().unwrap_or_else(|| vec![vec![]; 32]);
            for (i, w) in want.iter().enumerate() {
                let mut r = rows[i].clone();
                r.resize(6, -1);
                assert_eq!(&r, w, "{name} {key} row {i}");
                compared += 1;
            }
        }
        assert!(compared > 0);
        // select-edges from the kept edges reproduces score-edges' own top-C for a smaller C.
        tool_ok(
            "score-edges",
            &[
                "--acts",
                s(&acts),
                "--suite",
                s(&suite(name)),
                "--top-c",
                "3",
                "--keep",
                "10",
                "--out",
                s(&tmp.join("e3")),
            ],
        );
        tool_ok(
            "select-edges",
            &["--edges", s(&out.join("edges.parquet")), "--c", "3", "--out", s(&tmp.join("c3.parquet"))],
        );
        assert_eq!(read_edges(&tmp.join("c3.parquet")), read_edges(&tmp.join("e3/connections.parquet")), "{name}");
    }
}

#[test]
fn evaluate_matches_reference_losses_and_features() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let tmp = scratch(&format!("eval-{name}"));
        let acts = golden_cache(&tmp, name);
        let conns = fixtures().join("suites").join(name).join("connections-ref.safetensors");
        let out = tmp.join("eval");
        tool_ok(
            "evaluate",
            &["--acts", s(&acts), "--suite", s(&suite(name)), "--connections", s(&conns), "--dump", "--out", s(&out)],
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
        let g = golden(&format!("suite-{name}"));
        let scalar = |k: &str| g[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let ce = report["ce"].as_f64().unwrap();
        assert!((ce - scalar("loss.ce")).abs() < 1e-4, "{name}: ce {ce} vs reference {}", scalar("loss.ce"));
        let fvu_ref_sum: f64 =
            report["modules"].as_object().unwrap().values().map(|m| m["fvu_ref"].as_f64().unwrap()).sum();
        assert!(
            (fvu_ref_sum - scalar("loss.mse")).abs() < 1e-4,
            "{name}: Σ fvu_ref {fvu_ref_sum} vs {}",
            scalar("loss.mse")
        );
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(acts.join("manifest.json")).unwrap()).unwrap();
        let clean = report["clean_ce"].as_f64().unwrap();
        assert!((clean - manifest["clean_ce"].as_f64().unwrap()).abs() < 1e-5);
        assert!((report["ce_diff"].as_f64().unwrap() - (ce - clean)).abs() < 1e-12);
        // Dumped features equal the reference's; FVU over all tokens and L0 recomputed naively.
        let dump = candle_core::safetensors::load(out.join("features.safetensors"), &Device::Cpu).unwrap();
        let shard = candle_core::safetensors::load(acts.join("shard-00000.safetensors"), &Device::Cpu).unwrap();
        for (m, r) in report["modules"].as_object().unwrap() {
            let f = &dump[&format!("feats.{m}")];
            let want = g[&format!("pruned.feats.{m}")].reshape(f.shape()).unwrap();
            let d = (f - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "{name} feats.{m}: {d}");
            let fv = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let l0 = fv.iter().filter(|v| **v != 0.0).count() as f64 / 36.0;
            assert!((r["l0"].as_f64().unwrap() - l0).abs() < 1e-9);
            let hook = if m.starts_with("attn") { "hook_attn_out" } else { "hook_mlp_out" };
            let t =
                shard[&format!("blocks.{}.{hook}", &m[m.len() - 1..])].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rc = dump[&format!("recon.{m}")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let dm = 16;
            let (mut num, mut den) = (0f64, 0f64);
            for dd in 0..dm {
                let col = |v: &[f32]| -> Vec<f64> { (0..36).map(|t| v[t * dm + dd] as f64).collect() };
                let tc = col(&t);
                let ec: Vec<f64> = tc.iter().zip(col(&rc)).map(|(a, b)| a - b).collect();
                let var = |x: &[f64]| {
                    let mu = x.iter().sum::<f64>() / x.len() as f64;
                    x.iter().map(|v| (v - mu).powi(2)).sum::<f64>()
                };
                num += var(&ec);
                den += var(&tc);
            }
            assert!((r["fvu"].as_f64().unwrap() - num / den).abs() < 1e-4, "{name} fvu {m}");
        }
    }
}

fn write_conn_parquet(path: &Path, rows: &[(&str, u32, &str, u32)]) {
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("down_module", Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()))),
        ("down_feature", Arc::new(UInt32Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()))),
        ("up_module", Arc::new(StringArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>()))),
        ("up_feature", Arc::new(UInt32Array::from(rows.iter().map(|r| r.3).collect::<Vec<_>>()))),
    ];
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn bad_connections_and_mismatched_inputs_are_clear_errors() {
    let tmp = scratch("bad-conns");
    let acts = golden_cache(&tmp, "tiny-pythia");
    let su = suite("tiny-pythia");
    let eval = |c: &Path, needles: &[&str]| {
        let out = tmp.join("eval");
        tool_fails(
            "evaluate",
            &["--acts", s(&acts), "--suite", s(&su), "--connections", s(c), "--out", s(&out)],
            needles,
        );
        assert!(!out.exists() && !tmp.join("eval.tmp").exists());
    };
    let c = tmp.join("c.parquet");
    write_conn_parquet(&c, &[("mlp_1", 0, "attn_9", 0)]);
    eval(&c, &["c.parquet", "up_module `attn_9`: not a module of the suite"]);
    write_conn_parquet(&c, &[("mlp_1", 40, "attn_0", 0)]);
    eval(&c, &["down_feature 40: out of range, the suite has 32 features"]);
    write_conn_parquet(&c, &[("mlp_1", 1, "attn_0", 2), ("mlp_1", 1, "attn_0", 2)]);
    eval(&c, &["duplicate edge attn_0:2 -> mlp_1:1"]);
    // Duplicates are found once the file is read, per edge list: the first list's is named.
    let rows =
        [("mlp_1", 3, "attn_0", 5), ("attn_1", 0, "mlp_0", 1), ("mlp_1", 3, "attn_0", 5), ("attn_1", 0, "mlp_0", 1)];
    write_conn_parquet(&c, &rows);
    eval(&c, &["duplicate edge mlp_0:1 -> attn_1:0"]);
    // An unembed edge's token id is bounded before any list is sized by it.
    write_conn_parquet(&c, &[("unembed", 4_000_000_000, "attn_0", 0)]);
    eval(&c, &["down_feature 4000000000 of an unembed edge: above any vocabulary"]);
    // Pythia has parallel blocks: attn_1 does not feed mlp_1.
    write_conn_parquet(&c, &[("mlp_1", 1, "attn_1", 2)]);
    eval(&c, &["attn_1 does not precede mlp_1", "parallel"]);
    write_conn_parquet(&c, &[("attn_0", 1, "mlp_1", 2)]);
    eval(&c, &["mlp_1 does not precede attn_0"]);
    std::fs::write(tmp.join("c.txt"), "x").unwrap();
    eval(&tmp.join("c.txt"), &["expected a .parquet, .safetensors, .pkl or .pt file"]);
    // A suite whose d_model disagrees with the cache.
    let t = Tensor::zeros((32, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut bad: HashMap<String, Tensor> = HashMap::new();
    for m in ["attn_0", "mlp_0", "attn_1", "mlp_1"] {
        bad.insert(format!("aes.{m}.encoder.weight"), t.clone());
        bad.insert(format!("aes.{m}.encoder.bias"), Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap());
        bad.insert(format!("aes.{m}.decoder.weight"), t.t().unwrap().contiguous().unwrap());
        bad.insert(format!("aes.{m}.b_dec"), Tensor::zeros(8, candle_core::DType::F32, &Device::Cpu).unwrap());
    }
    let bad_path = tmp.join("bad.safetensors");
    let meta: HashMap<String, String> =
        [("k".to_string(), "4".to_string()), ("n_features".to_string(), "32".to_string())].into();
    safetensors::serialize_to_file(bad.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), &bad_path).unwrap();
    tool_fails(
        "score-edges",
        &["--acts", s(&acts), "--suite", s(&bad_path), "--out", s(&tmp.join("o"))],
        &["bad.safetensors", "d_model 8 (cache: 16)", "manifest.json"],
    );
    tool_fails(
        "score-edges",
        &["--acts", s(&acts), "--suite", s(&su), "--top-c", "9", "--keep", "4", "--out", s(&tmp.join("o"))],
        &["--top-c 9", "--keep 4"],
    );
    tool_fails(
        "evaluate",
        &["--acts", s(&tmp.join("nope")), "--suite", s(&su), "--out", s(&tmp.join("o"))],
        &["no such cache folder"],
    );
    tool_fails(
        "select-edges",
        &["--edges", s(&c), "--c", "2", "--out", s(&tmp.join("x.parquet"))],
        &["metadata lacks `n_features`"],
    );
}

#[test]
fn reference_layout_round_trips_and_pythia_same_layer_edges_are_dropped() {
    let tmp = scratch("reflayout");
    let su = scae::formats::suite::Suite::load(&suite("tiny-pythia"), &Device::Cpu).unwrap();
    let path = fixtures().join("suites/tiny-pythia/connections-ref.safetensors");
    let conns = scae::formats::connections::Connections::load(&path, &su.modules, 32, true).unwrap();
    // The reference file lists attn_L -> mlp_L edges; none survive on a parallel model.
    assert!(conns.edges[1].iter().all(|es| es.is_empty()), "mlp_0 gets no upstream input on Pythia");
    let out = tmp.join("rt.safetensors");
    conns.write_reference(&out, true).unwrap();
    let strip = |c: &scae::formats::connections::Connections| -> Vec<Vec<Vec<(usize, u32)>>> {
        c.edges.iter().map(|d| d.iter().map(|es| es.iter().map(|e| (e.up, e.feature)).collect()).collect()).collect()
    };
    let again = scae::formats::connections::Connections::load(&out, &su.modules, 32, true).unwrap();
    assert!(strip(&again) == strip(&conns), "reference layout does not round-trip");
    let pq = tmp.join("rt.parquet");
    conns.write_parquet(&pq, scae::formats::connections::FORMAT, &Default::default()).unwrap();
    let from_pq = scae::formats::connections::Connections::load(&pq, &su.modules, 32, true).unwrap();
    assert!(strip(&from_pq) == strip(&conns), "parquet does not round-trip");
    assert_eq!(conns.n_edges(), 32 * 6 + strip(&conns)[3].iter().map(Vec::len).sum::<usize>());
}

/// Corrupt caches and suites, and an output path that is a folder: one-line errors naming the
/// file and the tensor, and no output left behind.
#[test]
fn corrupt_caches_and_suites_are_clear_errors() {
    let tmp = scratch("corrupt");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let su = suite("tiny-gpt2");
    let shard = "shard-00000.safetensors";
    // A copy of the cache whose shard has one tensor replaced.
    let corrupt = |name: &str, edit: &dyn Fn(&Tensor) -> Tensor| -> PathBuf {
        let dir = tmp.join(format!("acts-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(acts.join("manifest.json"), dir.join("manifest.json")).unwrap();
        let mut map = candle_core::safetensors::load(acts.join(shard), &Device::Cpu).unwrap();
        let t = map[name].clone();
        map.insert(name.to_string(), edit(&t));
        candle_core::safetensors::save(&map, dir.join(shard)).unwrap();
        dir
    };
    let eval = |a: &Path, suite: &Path, needles: &[&str]| {
        let out = tmp.join("eval");
        tool_fails("evaluate", &["--acts", s(a), "--suite", s(suite), "--out", s(&out)], needles);
        assert!(!out.exists() && !tmp.join("eval.tmp").exists());
    };
    let narrow = corrupt("blocks.1.hook_attn_out", &|t| t.narrow(2, 0, 8).unwrap());
    eval(&narrow, &su, &[shard, "tensor `blocks.1.hook_attn_out`: expected shape [3, 12, 16]", "found [3, 12, 8]"]);
    let nan = corrupt("blocks.0.hook_resid_pre", &|t| (t * f64::NAN).unwrap());
    eval(&nan, &su, &[shard, "tensor `blocks.0.hook_resid_pre`: expected finite values"]);
    // The stored CEs: the wrong shape, or not finite.
    let short = corrupt("clean_ce", &|t| t.narrow(1, 0, 5).unwrap());
    eval(&short, &su, &[shard, "tensor `clean_ce`: expected F32 of shape [3, 11]", "[3, 5]"]);
    let nan_ce = corrupt("zero_ce", &|t| (t * f64::NAN).unwrap());
    eval(&nan_ce, &su, &[shard, "tensor `zero_ce`: expected finite values of shape [3, 11]"]);
    // A manifest pointing outside its folder.
    let manifest = std::fs::read_to_string(acts.join("manifest.json"))
        .unwrap()
        .replace(&format!("\"{shard}\""), &format!("\"../{shard}\""));
    std::fs::write(nan.join("manifest.json"), manifest).unwrap();
    eval(&nan, &su, &["manifest.json", "expected a file name inside the cache folder"]);
    // Suites: a NaN weight, a tensor of a module the suite does not have.
    let mut tensors = candle_core::safetensors::load(&su, &Device::Cpu).unwrap();
    let meta: HashMap<String, String> =
        [("k".to_string(), "4".to_string()), ("n_features".to_string(), "32".to_string())].into();
    let save = |t: &HashMap<String, Tensor>, name: &str| -> PathBuf {
        let p = tmp.join(name);
        safetensors::serialize_to_file(t.iter().map(|(k, v)| (k.as_str(), v)), Some(meta.clone()), &p).unwrap();
        p
    };
    let ok = save(&tensors, "ok.safetensors");
    tool_ok("evaluate", &["--acts", s(&acts), "--suite", s(&ok), "--out", s(&tmp.join("ok-eval"))]);
    let w = tensors["aes.mlp_1.encoder.bias"].clone();
    tensors.insert("aes.mlp_1.encoder.bias".into(), (w * f64::NAN).unwrap());
    eval(
        &acts,
        &save(&tensors, "nan.safetensors"),
        &["nan.safetensors", "tensor `aes.mlp_1.encoder.bias`: expected finite values"],
    );
    tensors.insert("aes.mlp_1.encoder.bias".into(), tensors["aes.mlp_0.encoder.bias"].clone());
    tensors.insert("aes.mlp_2.b_dec".into(), tensors["aes.mlp_0.b_dec"].clone());
    eval(&acts, &save(&tensors, "extra.safetensors"), &["extra.safetensors", "unexpected tensor `aes.mlp_2.b_dec`"]);
    // select-edges onto a folder: refused, no `.tmp` left.
    let edges = tmp.join("edges");
    tool_ok("score-edges", &["--acts", s(&acts), "--suite", s(&su), "--out", s(&edges)]);
    let dir = tmp.join("taken");
    std::fs::create_dir_all(&dir).unwrap();
    tool_fails(
        "select-edges",
        &["--edges", s(&edges.join("edges.parquet")), "--c", "2", "--out", s(&dir)],
        &["taken", "expected a file to write, found a folder"],
    );
    assert!(!tmp.join("taken.tmp").exists());
}

/// Embed edges (docs/MATH.md, "Embed and unembed connections") through the tools:
/// `score-edges --embed` writes them (up_module `embed`) pooled with the modules' edges;
/// `select-edges` pools them into C by default and gives them their own budget with
/// `--embed-c`; finetune and evaluate run on such a set; a token outside the vocabulary is a
/// clear error naming the file.
#[test]
fn embed_connections_run_through_score_select_finetune_and_evaluate() {
    let name = "tiny-neo";
    let tmp = scratch("embed-tools");
    let acts = golden_cache(&tmp, name);
    let su = suite(name);
    let edges = tmp.join("edges");
    tool_ok("score-edges", &["--acts", s(&acts), "--suite", s(&su), "--embed", "--keep", "12", "--out", s(&edges)]);
    let per_feature = |path: &Path, from_embed: bool| -> Vec<usize> {
        let rows = read_edges(path);
        let mut counts = vec![0usize; 4 * 32];
        for ((down, up), feats) in &rows {
            if (up == "embed") == from_embed {
                let m = scae::model::Module::parse(down).unwrap().index();
                for (i, es) in feats.iter().enumerate() {
                    counts[m * 32 + i] += es.len();
                }
            }
        }
        counts
    };
    let edges_file = edges.join("edges.parquet");
    let embed_kept = per_feature(&edges_file, true);
    assert!(embed_kept.iter().any(|&n| n > 0), "score-edges --embed kept no embed edge");
    let pooled = tmp.join("pooled.parquet");
    tool_ok("select-edges", &["--edges", s(&edges_file), "--c", "4", "--out", s(&pooled)]);
    let (pm, pe) = (per_feature(&pooled, false), per_feature(&pooled, true));
    assert!(pm.iter().zip(&pe).all(|(a, b)| a + b <= 4), "pooled: at most C edges in all");
    assert!(pe.iter().any(|&n| n > 0), "pooled: some embed edge won a slot");
    let split = tmp.join("split.parquet");
    let out = tool_ok("select-edges", &["--edges", s(&edges_file), "--c", "4", "--embed-c", "3", "--out", s(&split)]);
    assert!(out.contains("from the embedding"), "{out}");
    let (sm, se) = (per_feature(&split, false), per_feature(&split, true));
    assert!(sm.iter().all(|&n| n <= 4) && se.iter().all(|&n| n <= 3));
    assert!(se.iter().zip(&embed_kept).all(|(&got, &kept)| got == kept.min(3)), "each feature's top 3 embed edges");
    let ft = tmp.join("ft");
    let conns = s(&split);
    let base = ["--acts", s(&acts), "--suite", s(&su), "--connections", conns];
    let mut args = base.to_vec();
    args.extend(["--out", s(&ft), "--steps", "2", "--batch-size", "3"]);
    tool_ok("finetune", &args);
    let ev = tmp.join("eval");
    let mut args = base.to_vec();
    args[3] = s(&ft);
    args.extend(["--out", s(&ev)]);
    tool_ok("evaluate", &args);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ev.join("eval.json")).unwrap()).unwrap();
    assert!(report["ce"].as_f64().unwrap().is_finite());
    // The feature browser lists a feature's input tokens: those of its embed edges, in order.
    let view = tmp.join("view");
    tool_ok("view-features", &["--acts", s(&acts), "--suite", s(&su), "--connections", conns, "--out", s(&view)]);
    let at = se.iter().position(|&n| n == 3).expect("a feature with three embed edges");
    let module = scae::model::Module::all(2)[at / 32].name();
    let text = std::fs::read_to_string(view.join(format!("data/{module}-0.js"))).unwrap();
    let body = text.trim_end().trim_end_matches(';');
    let chunk: serde_json::Value = serde_json::from_str(&body[body.find('[').unwrap()..body.len() - 1]).unwrap();
    let shown: Vec<i64> = chunk[at % 32]["emb"].as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
    assert_eq!(shown, read_edges(&split)[&(module, "embed".to_string())][at % 32], "input tokens of {at}");
    // A token outside the vocabulary.
    let bad = tmp.join("bad.parquet");
    write_conn_parquet(&bad, &[("mlp_0", 0, "embed", 999_999)]);
    let out = tmp.join("eval-bad");
    tool_fails(
        "evaluate",
        &["--acts", s(&acts), "--suite", s(&su), "--connections", s(&bad), "--out", s(&out)],
        &["bad.parquet", "token 999999 out of range"],
    );
    assert!(!out.exists());
}

/// Unembed edges through the tools: `score-edges --unembed` writes them (down_module
/// `unembed`), `select-edges --unembed-c` keeps each token's top features, finetune (CE loss)
/// and evaluate read them — evaluate's CE differs from the same set without them — and the
/// browser lists a feature's output tokens; asking for unembed edges the file lacks is a
/// clear error.
#[test]
fn unembed_connections_run_through_score_select_finetune_and_evaluate() {
    let name = "tiny-neo";
    let tmp = scratch("unembed-tools");
    let acts = golden_cache(&tmp, name);
    let su = suite(name);
    let edges = tmp.join("edges");
    tool_ok("score-edges", &["--acts", s(&acts), "--suite", s(&su), "--unembed", "--keep", "12", "--out", s(&edges)]);
    let edges_file = edges.join("edges.parquet");
    let kept = read_edges(&edges_file);
    assert!(kept.keys().any(|(d, _)| d == "unembed"), "score-edges --unembed kept no unembed edge");
    let conns = tmp.join("conns.parquet");
    let out = tool_ok("select-edges", &["--edges", s(&edges_file), "--c", "4", "--unembed-c", "3", "--out", s(&conns)]);
    assert!(out.contains("into the unembedding"), "{out}");
    let sel = read_edges(&conns);
    let mut per_token: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for ((d, _), feats) in &sel {
        if d == "unembed" {
            for (v, es) in feats.iter().enumerate() {
                *per_token.entry(v).or_default() += es.len();
            }
        }
    }
    assert!(per_token.values().all(|&n| n <= 3) && per_token.values().any(|&n| n == 3));
    let plain = tmp.join("plain.parquet");
    tool_ok("select-edges", &["--edges", s(&edges_file), "--c", "4", "--out", s(&plain)]);
    let ce_of = |suite: &Path, c: &Path, out: &Path| -> f64 {
        tool_ok("evaluate", &["--acts", s(&acts), "--suite", s(suite), "--connections", s(c), "--out", s(out)]);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
        r["ce"].as_f64().unwrap()
    };
    let (with, without) = (ce_of(&su, &conns, &tmp.join("e1")), ce_of(&su, &plain, &tmp.join("e2")));
    assert!((with - without).abs() > 1e-4, "unembed edges did not change evaluate's CE ({with} vs {without})");
    let ft = tmp.join("ft");
    tool_ok(
        "finetune",
        &[
            "--acts",
            s(&acts),
            "--suite",
            s(&su),
            "--connections",
            s(&conns),
            "--loss",
            "ce",
            "--steps",
            "2",
            "--batch-size",
            "3",
            "--out",
            s(&ft),
        ],
    );
    assert!(ce_of(&ft, &conns, &tmp.join("e3")).is_finite());
    let view = tmp.join("view");
    tool_ok("view-features", &["--acts", s(&acts), "--suite", s(&su), "--connections", s(&conns), "--out", s(&view)]);
    // Feature j of module m feeds the tokens whose unembed rows name it.
    let ((m, j), tokens) = {
        let mut feeds: std::collections::BTreeMap<(String, i64), Vec<i64>> = Default::default();
        let batches = scae::util::table::read_parquet(&conns).unwrap();
        for b in &batches {
            let col = |n: &str| b.column_by_name(n).unwrap();
            let dm = scae::util::table::strings(&conns, "down_module", col("down_module")).unwrap();
            let df = scae::util::table::ints(&conns, "down_feature", col("down_feature")).unwrap();
            let um = scae::util::table::strings(&conns, "up_module", col("up_module")).unwrap();
            let uf = scae::util::table::ints(&conns, "up_feature", col("up_feature")).unwrap();
            for r in 0..b.num_rows() {
                if dm[r] == "unembed" {
                    feeds.entry((um[r].clone(), uf[r])).or_default().push(df[r]);
                }
            }
        }
        feeds.into_iter().next().unwrap()
    };
    let text = std::fs::read_to_string(view.join(format!("data/{m}-0.js"))).unwrap();
    let body = text.trim_end().trim_end_matches(';');
    let chunk: serde_json::Value = serde_json::from_str(&body[body.find('[').unwrap()..body.len() - 1]).unwrap();
    let mut shown: Vec<i64> =
        chunk[j as usize]["out"].as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
    shown.sort_unstable();
    let mut want = tokens;
    want.sort_unstable();
    assert_eq!(shown, want, "output tokens of {m}/{j}");
    // An edges file without unembed edges.
    let plain_edges = tmp.join("plain-edges");
    tool_ok("score-edges", &["--acts", s(&acts), "--suite", s(&su), "--keep", "12", "--out", s(&plain_edges)]);
    tool_fails(
        "select-edges",
        &[
            "--edges",
            s(&plain_edges.join("edges.parquet")),
            "--c",
            "4",
            "--unembed-c",
            "3",
            "--out",
            s(&tmp.join("x.parquet")),
        ],
        &["--unembed-c 3: the file has no unembed edges", "score-edges --unembed"],
    );
}

/// collect-acts stores each position's clean CE (equal to TransformerLens' per-token loss) and
/// zero-ablation CE in the shards; evaluate reads them instead of running the model, and its
/// report equals the one from the same cache without them (where it computes them again).
#[test]
fn evaluate_reads_the_clean_and_zero_ablation_ce_that_collect_acts_stored() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let tmp = scratch(&format!("eval-stored-ce-{name}"));
        let acts = tmp.join("acts");
        let g = fixtures().join(format!("golden/{name}.safetensors"));
        let m = scae_testkit::fixture_model(name);
        tool_ok(
            "collect-acts",
            &["--model", s(&m), "--tokens", s(&g), "--ctx-len", "12", "--no-prepend-bos", "--out", s(&acts)],
        );
        let shard = candle_core::safetensors::load(acts.join("shard-00000.safetensors"), &Device::Cpu).unwrap();
        let want = golden(name)["loss_per_token"].clone();
        let clean = &shard["clean_ce"];
        assert_eq!(clean.dims(), want.dims(), "{name}");
        let d = (clean - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{name}: stored clean CE differs from TransformerLens' by {d}");
        assert_eq!(shard["zero_ce"].dims(), want.dims());
        // The same cache without the stored CEs, and with constants in their place.
        let (bare, marked) = (tmp.join("bare"), tmp.join("marked"));
        let rewrite = |dst_dir: &Path, mark: bool| {
            std::fs::create_dir_all(dst_dir).unwrap();
            for e in std::fs::read_dir(&acts).unwrap() {
                let p = e.unwrap().path();
                let dst = dst_dir.join(p.file_name().unwrap());
                if p.extension().is_some_and(|x| x == "safetensors") {
                    let mut map = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
                    let bytes = std::fs::read(&p).unwrap();
                    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
                    for (k, v) in [("clean_ce", 3.0), ("zero_ce", 7.0)] {
                        let t = map.remove(k).unwrap();
                        if mark {
                            map.insert(k.to_string(), (t.zeros_like().unwrap() + v).unwrap());
                        }
                    }
                    let mut kept: Vec<(String, Tensor)> = map.into_iter().collect();
                    kept.sort_by(|a, b| a.0.cmp(&b.0));
                    scae::util::io::write_safetensors(
                        &dst,
                        kept,
                        &meta.metadata().clone().unwrap_or_default().into_iter().collect(),
                    )
                    .unwrap();
                } else if p.is_file() {
                    std::fs::copy(&p, &dst).unwrap();
                }
            }
        };
        rewrite(&bare, false);
        rewrite(&marked, true);
        let report = |cache: &Path, out: &str| -> serde_json::Value {
            let out = tmp.join(out);
            tool_ok("evaluate", &["--acts", s(cache), "--suite", s(&suite(name)), "--out", s(&out)]);
            serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap()
        };
        let (stored, computed) = (report(&acts, "eval-stored"), report(&bare, "eval-computed"));
        let read = report(&marked, "eval-marked");
        assert_eq!((read["clean_ce"].as_f64(), read["ce_zero"].as_f64()), (Some(3.0), Some(7.0)), "{name}: not read");
        for k in ["clean_ce", "ce_zero", "ce", "ce_recovered", "mean_fvu"] {
            let (a, b) = (stored[k].as_f64().unwrap(), computed[k].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{name}: {k} {a} (stored) vs {b} (computed)");
        }
        // (Two different quantities: the random tiny models' zero ablation is not always worse.)
        assert!((stored["ce_zero"].as_f64().unwrap() - stored["clean_ce"].as_f64().unwrap()).abs() > 1e-3, "{name}");
    }
}
