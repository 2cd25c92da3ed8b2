//! attribute: the graph is exact (every feature node's incoming links plus its bias terms equal
//! its pre-activation from the pruned pass, computed here independently by the autograd pass;
//! its activation equals evaluate --dump's; logit nodes sum to the spliced logits), complete
//! (one node per non-zero feature), in the format's required fields, and pruned as circuit-tracer
//! prunes (tokens and logits kept, every kept feature with a kept link in and out).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use scae::attrib::json::{missing_field, REQUIRED};
use scae_testkit::{fixtures, golden_cache, s, scratch, tool_fails, tool_ok};
use serde_json::Value;

const SEQ: usize = 1;

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every feature and logit node of `graph`, with the sum of its incoming links.
fn incoming(graph: &Value) -> HashMap<String, f64> {
    let mut sums: HashMap<String, f64> = HashMap::new();
    for l in graph["links"].as_array().unwrap() {
        *sums.entry(l["target"].as_str().unwrap().to_string()).or_default() += l["weight"].as_f64().unwrap();
    }
    sums
}

fn terms(n: &Value) -> f64 {
    ["bias", "upstream_bias", "position", "pruned_links"].iter().map(|k| n[*k].as_f64().unwrap()).sum()
}

/// The pass's pre-activations `[module][pos·F + f]` and spliced logits of the last position,
/// computed in process by the autograd pass (not the code that builds the graph).
fn independent(acts: &Path, suite: &Path, conns: Option<&Path>, consistent: bool) -> (Vec<Vec<f32>>, Vec<f32>) {
    let dev = Device::Cpu;
    let inputs = scae::Inputs::open(acts, suite, None, &dev).unwrap();
    let set = conns.map(|c| inputs.connections(c).unwrap());
    let wiring = match &set {
        Some(c) => scae::Wiring::Sparse(c),
        None => scae::Wiring::All,
    };
    let plan = scae::Plan::new(&inputs.suite, wiring, inputs.parallel(), &dev).unwrap();
    let batch = scae::formats::cache::CacheReader::new(inputs.cache(), &dev).batch(&[SEQ]).unwrap();
    let opts = scae::PassOptions { consistent_attn_bias: consistent };
    let rt = &inputs.model.runtime;
    let out = scae::pass::autograd::forward(&inputs.suite, rt, &plan, &batch, opts).unwrap();
    let pre = out.pre.iter().map(|p| p.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    let logits = scae::pass::objective::logits_planned(&inputs.suite, rt, &plan, &batch, &out).unwrap();
    let n = logits.dim(0).unwrap();
    (pre, logits.narrow(0, n - 1, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

struct Case {
    name: &'static str,
    /// `None`: all connections; else a file made by `make`.
    conns: Option<PathBuf>,
    consistent: bool,
}

/// Run attribute --no-prune and evaluate --dump on sequence SEQ and check exactness.
fn check_exact(tmp: &Path, acts: &Path, case: &Case) -> Value {
    let suite = fixtures().join("suites").join(case.name).join("suite.safetensors");
    let conn_arg = case.conns.as_deref().map_or("all".to_string(), |p| s(p).to_string());
    let mut extra: Vec<&str> = vec!["--connections", &conn_arg];
    if case.consistent {
        extra.push("--consistent-attn-bias");
    }
    let g = tmp.join("graphs");
    let seq = SEQ.to_string();
    let mut args =
        vec!["--acts", s(acts), "--seq", &seq, "--suite", s(&suite), "--no-prune", "--out", s(&g), "--slug", "all"];
    args.extend(&extra);
    let said = tool_ok("attribute", &args);
    assert!(said.contains("all.json"), "{said}");
    let ev = tmp.join("ev");
    let mut args = vec!["--acts", s(acts), "--suite", s(&suite), "--dump", "--out", s(&ev), "--overwrite"];
    args.extend(&extra);
    tool_ok("evaluate", &args);
    let dump = candle_core::safetensors::load(ev.join("features.safetensors"), &Device::Cpu).unwrap();
    let graph = read(&g.join("all.json"));
    assert_eq!(missing_field(&graph), None);
    let (pre, logits) = independent(acts, &suite, case.conns.as_deref(), case.consistent);
    let sums = incoming(&graph);
    let modules: Vec<String> =
        graph["metadata"]["transcoder_list"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().into()).collect();
    let f = 32;
    let mut n_features = 0;
    let mut worst = 0f64;
    for n in graph["nodes"].as_array().unwrap() {
        let id = n["node_id"].as_str().unwrap();
        match n["feature_type"].as_str().unwrap() {
            "cross layer transcoder" => {
                n_features += 1;
                let m = modules.iter().position(|x| x == n["module"].as_str().unwrap()).unwrap();
                let (pos, j) = (n["ctx_idx"].as_u64().unwrap() as usize, n["index"].as_u64().unwrap() as usize);
                let total = sums.get(id).copied().unwrap_or(0.0) + terms(n);
                let expect = pre[m][pos * f + j] as f64;
                let err = (total - expect).abs() / expect.abs().max(1.0);
                worst = worst.max(err);
                assert!(err < 1e-4, "{}: {id}: links + terms {total} vs the pass's pre-activation {expect}", case.name);
                assert!((n["pre_activation"].as_f64().unwrap() - total).abs() < 1e-9);
                let feats = &dump[&format!("feats.{}", modules[m])];
                let act = feats.get(SEQ).unwrap().get(pos).unwrap().get(j).unwrap().to_scalar::<f32>().unwrap() as f64;
                assert!(
                    act > 0.0 && (n["activation"].as_f64().unwrap() - act).abs() <= 1e-5 * act.max(1.0),
                    "{id}: activation vs evaluate --dump {act}"
                );
                // The node's number in the graph: cantor(layer, f), layer = 2L (+1 for mlp).
                let layer: u64 = n["layer"].as_str().unwrap().parse().unwrap();
                assert_eq!(n["feature"].as_u64().unwrap(), (layer + j as u64) * (layer + j as u64 + 1) / 2 + j as u64);
                assert_eq!(id, format!("{layer}_{j}_{pos}"));
            }
            "logit" => {
                let v = n["feature"].as_u64().unwrap() as usize;
                let total = sums.get(id).copied().unwrap_or(0.0) + terms(n);
                let expect = logits[v] as f64;
                assert!(
                    (total - expect).abs() < 1e-4 * expect.abs().max(1.0),
                    "{id}: {total} vs spliced logit {expect}"
                );
                let clerp = n["clerp"].as_str().unwrap();
                assert!(clerp.starts_with("Output \"") && clerp.contains("(p="), "{clerp}");
            }
            "embedding" => assert!(id.starts_with("E_") && n["layer"] == "E"),
            other => panic!("unexpected feature_type {other}"),
        }
    }
    // Complete: a node for every non-zero feature of the sequence.
    let nonzero: usize = modules
        .iter()
        .map(|m| {
            let v = dump[&format!("feats.{m}")].get(SEQ).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().filter(|&&x| x != 0.0).count()
        })
        .sum();
    assert_eq!(n_features, nonzero, "{}: one node per active feature", case.name);
    eprintln!(
        "{}: {n_features} feature nodes, worst relative error of links + terms vs the pass {worst:.2e}",
        case.name
    );
    graph
}

#[test]
fn graphs_are_exact_decompositions_of_the_pruned_pass() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let tmp = scratch(&format!("attribute-{name}"));
        let acts = golden_cache(&tmp, name);
        let reference = fixtures().join("suites").join(name).join("connections-ref.safetensors");
        for case in [
            Case { name, conns: Some(reference.clone()), consistent: false },
            Case { name, conns: Some(reference.clone()), consistent: true },
            Case { name, conns: None, consistent: false },
        ] {
            check_exact(&tmp, &acts, &case);
        }
    }
}

#[test]
fn graphs_with_embed_and_unembed_connections_are_exact() {
    let name = "tiny-neo";
    let tmp = scratch("attribute-ends");
    let acts = golden_cache(&tmp, name);
    let suite = fixtures().join("suites").join(name).join("suite.safetensors");
    let edges = tmp.join("edges");
    tool_ok(
        "score-edges",
        &["--acts", s(&acts), "--suite", s(&suite), "--embed", "--unembed", "--keep", "12", "--out", s(&edges)],
    );
    let conns = tmp.join("ends.parquet");
    let e = edges.join("edges.parquet");
    tool_ok("select-edges", &["--edges", s(&e), "--c", "4", "--embed-c", "3", "--unembed-c", "4", "--out", s(&conns)]);
    let graph = check_exact(&tmp, &acts, &Case { name, conns: Some(conns), consistent: false });
    // Token links reach only the features whose embed edges list that token: fewer than with
    // the dense embedding, where every active feature of every module reads its token.
    let from_tokens =
        graph["links"].as_array().unwrap().iter().filter(|l| l["source"].as_str().unwrap().starts_with("E_")).count();
    assert!(from_tokens > 0);
}

#[test]
fn pruned_graphs_keep_tokens_logits_and_connected_features_and_the_folder_lists_every_graph() {
    let name = "tiny-neo";
    let tmp = scratch("attribute-prune");
    let acts = golden_cache(&tmp, name);
    let suite = fixtures().join("suites").join(name).join("suite.safetensors");
    let conns = fixtures().join("suites").join(name).join("connections-ref.safetensors");
    let g = tmp.join("graphs");
    let seq = SEQ.to_string();
    let base = ["--acts", s(&acts), "--seq", &seq, "--suite", s(&suite), "--connections", s(&conns), "--out", s(&g)];
    let run = |more: &[&str]| {
        let mut a = base.to_vec();
        a.extend(more);
        tool_ok("attribute", &a);
    };
    run(&["--slug", "full", "--no-prune"]);
    run(&["--slug", "pruned"]);
    let (full, pruned) = (read(&g.join("full.json")), read(&g.join("pruned.json")));
    let ids = |v: &Value| -> Vec<String> {
        v["nodes"].as_array().unwrap().iter().map(|n| n["node_id"].as_str().unwrap().to_string()).collect()
    };
    let (all, kept) = (ids(&full), ids(&pruned));
    assert!(kept.len() < all.len(), "pruning drops nodes: {} of {}", kept.len(), all.len());
    assert!(kept.iter().all(|k| all.contains(k)));
    for n in full["nodes"].as_array().unwrap() {
        if matches!(n["feature_type"].as_str(), Some("embedding" | "logit")) {
            assert!(kept.contains(&n["node_id"].as_str().unwrap().to_string()), "tokens and logits are always kept");
        }
    }
    let links = pruned["links"].as_array().unwrap();
    for n in pruned["nodes"].as_array().unwrap().iter().filter(|n| n["feature_type"] == "cross layer transcoder") {
        let id = n["node_id"].as_str().unwrap();
        assert!(links.iter().any(|l| l["target"] == id) && links.iter().any(|l| l["source"] == id), "{id} dangles");
        // Still exact: the links pruning left out are on the node.
        let total: f64 =
            links.iter().filter(|l| l["target"] == id).map(|l| l["weight"].as_f64().unwrap()).sum::<f64>() + terms(n);
        assert!((total - n["pre_activation"].as_f64().unwrap()).abs() < 1e-9 * total.abs().max(1.0));
    }
    assert!(links.iter().all(|l| kept.contains(&l["source"].as_str().unwrap().to_string())
        && kept.contains(&l["target"].as_str().unwrap().to_string())));
    assert_eq!(pruned["metadata"]["node_threshold"], 0.8);
    // The folder's list holds both graphs, once each, after a rerun too.
    run(&["--slug", "pruned"]);
    let list = read(&g.join("graph-metadata.json"));
    let slugs: Vec<&str> = list["graphs"].as_array().unwrap().iter().map(|m| m["slug"].as_str().unwrap()).collect();
    assert_eq!(slugs, ["full", "pruned"]);
    // Influence is circuit-tracer's cumulative share: in (0, 1], the logits' own none.
    for n in pruned["nodes"].as_array().unwrap() {
        let x = n["influence"].as_f64().unwrap();
        assert!(x > 0.0 && x <= 1.0 + 1e-9, "{x}");
    }
}

#[test]
fn formats_md_lists_every_required_graph_field() {
    let doc = std::fs::read_to_string(fixtures().join("../../shared/FORMATS.md")).unwrap();
    let section = doc.split("## Attribution graph").nth(1).expect("FORMATS.md has an `Attribution graph` section");
    let section = section.split("\n## ").next().unwrap();
    let r = &REQUIRED;
    for f in r.top.iter().chain(r.metadata).chain(r.q_params).chain(r.node).chain(r.link) {
        assert!(section.contains(&format!("`{f}`")), "FORMATS.md, Attribution graph: `{f}` not documented");
    }
}

#[test]
fn bad_requests_get_one_line_errors() {
    let name = "tiny-neo";
    let tmp = scratch("attribute-bad");
    let acts = golden_cache(&tmp, name);
    let suite = fixtures().join("suites").join(name).join("suite.safetensors");
    let g = tmp.join("g");
    tool_fails(
        "attribute",
        &["--acts", s(&acts), "--seq", "999", "--suite", s(&suite), "--out", s(&g)],
        &["--seq 999", "sequences 0 to"],
    );
    tool_fails(
        "attribute",
        &["--acts", s(&acts), "--seq", "0", "--suite", s(&suite), "--slug", "../x", "--out", s(&g)],
        &["--slug", "letters"],
    );
    tool_fails("attribute", &["--prompt", "hi", "--suite", s(&suite), "--out", s(&g)], &["--prompt needs --model"]);
    tool_fails(
        "attribute",
        &[
            "--acts",
            s(&acts),
            "--seq",
            "0",
            "--suite",
            s(&suite),
            "--connections",
            "all",
            "--max-links",
            "10",
            "--out",
            s(&g),
        ],
        &["more than 10 links", "--max-links"],
    );
    assert!(!g.join("graph-metadata.json").exists(), "nothing written on a refused request");
}

/// The reader attribute and the why-it-fired pass use reads only the sequences asked for; its
/// batches equal the whole-shard reader's bit for bit (runs within a shard, across shards, out of
/// order), and a sequence past a shard's rows is refused.
#[test]
fn sequences_read_alone_equal_the_whole_shards_rows() {
    use scae::formats::cache::{Cache, CacheReader};
    let tmp = scratch("attribute-read-by-sequence");
    let (g, acts) = (fixtures().join("golden/suite-tiny-neo.safetensors"), tmp.join("acts"));
    let m = scae_testkit::fixture_model("tiny-neo");
    let args = ["--model", s(&m), "--tokens", s(&g), "--ctx-len", "6", "--batch-size", "1", "--shard-seqs", "2"];
    tool_ok("collect-acts", &[&args[..], &["--no-prepend-bos", "--out", s(&acts)]].concat());
    let cache = Cache::open(&acts).unwrap();
    assert!(cache.manifest.shards.len() >= 2, "several shards");
    let n = cache.manifest.n_seqs;
    let bits = |t: &candle_core::Tensor| -> Vec<u64> {
        let t = t.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap();
        t.to_vec1::<f64>().unwrap().iter().map(|x| x.to_bits()).collect()
    };
    let shard = cache.load_shard(0, &Device::Cpu).unwrap();
    // Every tensor as candle's safetensors loader reads the whole file (an independent reader).
    let whole = candle_core::safetensors::load(acts.join(&cache.manifest.shards[0].file), &Device::Cpu).unwrap();
    assert!(shard.len() >= 2 + 6 * cache.manifest.model.n_layers, "every tensor a pass reads");
    for (name, t) in &shard {
        assert_eq!(bits(t), bits(&whole[name]), "{name}: load_shard vs candle");
    }
    let part = cache.load_seqs(0, 1, 1, &Device::Cpu).unwrap();
    assert!(part.contains_key("tokens") && part.contains_key("blocks.0.attn.hook_pattern"));
    for (name, t) in &part {
        assert_eq!(bits(t), bits(&shard[name].narrow(0, 1, 1).unwrap()), "{name}");
    }
    for seqs in [vec![0, 1], vec![1, 2], vec![n - 1, 0, 1], (0..n).collect()] {
        let a = CacheReader::new(&cache, &Device::Cpu).batch(&seqs).unwrap();
        let b = CacheReader::by_sequence(&cache, &Device::Cpu).batch(&seqs).unwrap();
        let each = |b: &scae::data::Batch| -> Vec<Vec<u64>> {
            let mut v = vec![bits(&b.tokens), bits(&b.resid_pre0)];
            for l in [&b.ln1_scale, &b.ln2_scale, &b.ln2_normalized, &b.pattern, &b.attn_out, &b.mlp_out] {
                v.extend(l.iter().map(bits));
            }
            v
        };
        assert_eq!(each(&a), each(&b), "sequences {seqs:?}");
    }
    let err = cache.load_seqs(0, 1, 2, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("shard-00000.safetensors") && err.contains("no rows 1..3"), "{err}");
    // A shard cut short after the cache was opened: refused, the file named, no panic.
    let file = acts.join(&cache.manifest.shards[1].file);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = cache.load_seqs(1, 0, 1, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("shard-00001.safetensors") && err.contains("not a readable cache shard"), "{err}");
    // A bf16 cache (read through safetensors' view, not straight into f32 buffers): each tensor
    // as candle's loader reads it and converts it to f32, whole shards and single sequences.
    let acts16 = tmp.join("acts-bf16");
    let a16 = ["--dtype", "bf16", "--no-prepend-bos", "--out", s(&acts16)];
    tool_ok("collect-acts", &[&args[..], &a16[..]].concat());
    let cache = Cache::open(&acts16).unwrap();
    let whole = candle_core::safetensors::load(acts16.join(&cache.manifest.shards[0].file), &Device::Cpu).unwrap();
    assert_eq!(whole["blocks.0.hook_attn_out"].dtype(), candle_core::DType::BF16, "a bf16 cache");
    let (shard, part) = (cache.load_shard(0, &Device::Cpu).unwrap(), cache.load_seqs(0, 1, 1, &Device::Cpu).unwrap());
    for (name, t) in &shard {
        let want = match whole[name].dtype().is_float() {
            true => whole[name].to_dtype(candle_core::DType::F32).unwrap(),
            false => whole[name].clone(),
        };
        assert_eq!(t.dtype(), want.dtype(), "{name}");
        assert_eq!(bits(t), bits(&want), "{name}: bf16 load_shard vs candle");
        assert_eq!(bits(&part[name]), bits(&want.narrow(0, 1, 1).unwrap()), "{name}: bf16 load_seqs");
    }
}
