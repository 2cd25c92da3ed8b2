//! view-features: its data agree with evaluate's own features (the top context of a feature is
//! where evaluate --dump has that feature's largest activation), and the site renders in a real
//! browser from file:// — headless Chromium, asserting on the rendered DOM. Skipped, with a
//! message, where Chromium is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use scae_testkit::{fixture_model, fixtures, golden_cache, s, scratch, tool_ok};

struct Site {
    dir: PathBuf,
    module: String,
    feature: usize,
    /// Token id and text at the feature's largest activation, from evaluate --dump.
    max_token: (u32, String),
    max_act: f32,
    first_up: (String, u32),
}

/// The data of feature `j` of `module` in the site (parsed from its chunk file).
fn feature_data(dir: &Path, module: &str, j: usize) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(format!("data/{module}-{}.js", j / 256))).unwrap();
    let body = text.trim_end().trim_end_matches(';');
    let start = body.find('[').unwrap();
    let arr: serde_json::Value = serde_json::from_str(&body[start..body.len() - 1]).unwrap();
    arr[j % 256].clone()
}

fn build(name: &str) -> Site {
    let tmp = scratch(&format!("view-{name}"));
    let acts = golden_cache(&tmp, name);
    let fx = fixtures().join("suites").join(name);
    let (suite, conns) = (fx.join("suite.safetensors"), fx.join("connections-ref.safetensors"));
    let ev = tmp.join("eval");
    tool_ok(
        "evaluate",
        &["--acts", s(&acts), "--suite", s(&suite), "--connections", s(&conns), "--dump", "--out", s(&ev)],
    );
    let dir = tmp.join("view");
    let out = tool_ok(
        "view-features",
        &["--acts", s(&acts), "--suite", s(&suite), "--connections", s(&conns), "--out", s(&dir)],
    );
    assert!(out.contains("view-features:") && out.contains("index.html"), "{out}");
    // The most frequently firing feature of mlp_1 and its largest activation in evaluate's dump.
    let module = "mlp_1".to_string();
    let dump = candle_core::safetensors::load(ev.join("features.safetensors"), &Device::Cpu).unwrap();
    let feats = dump[&format!("feats.{module}")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let f = 32;
    let n = feats.len() / f;
    let tokens = candle_core::safetensors::load(acts.join("shard-00000.safetensors"), &Device::Cpu).unwrap()["tokens"]
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let model = scae::model::Model::load("m", &fixture_model(name), &Device::Cpu).unwrap();
    let tokenizer = model.tokenizer().unwrap();
    // The most frequently firing feature whose top token has visible text.
    let mut by_count: Vec<usize> = (0..f).collect();
    by_count.sort_by_key(|&j| std::cmp::Reverse((0..n).filter(|&t| feats[t * f + j] > 0.0).count()));
    let (j, t_max, a_max, text) = by_count
        .into_iter()
        .map(|j| {
            let (t, a) =
                (0..n).map(|t| (t, feats[t * f + j])).fold((0, f32::MIN), |m, x| if x.1 > m.1 { x } else { m });
            (j, t, a, tokenizer.token_text(tokens[t] as u32))
        })
        .find(|x| !x.3.trim().is_empty())
        .unwrap();
    let tok = tokens[t_max] as u32;
    let c =
        scae::formats::connections::Connections::load(&conns, &scae::model::Module::all(2), f, name.contains("pythia"))
            .unwrap();
    let e = c.edges[3][j][0];
    let first_up = (scae::model::Module::all(2)[e.up].name(), e.feature);
    Site { dir, module, feature: j, max_token: (tok, text), max_act: a_max, first_up }
}

#[test]
fn site_data_agree_with_evaluate() {
    let site = build("tiny-neo");
    let d = feature_data(&site.dir, &site.module, site.feature);
    let top = &d["top"][0];
    assert!((top[0].as_f64().unwrap() - site.max_act as f64).abs() < 1e-3, "{top} vs {}", site.max_act);
    let at = top[3].as_u64().unwrap() as usize;
    assert_eq!(top[4][at].as_u64().unwrap() as u32, site.max_token.0, "{top}");
    assert_eq!(top[5][at], 100, "the activating token is at 100% of the feature's max");
    let modules: Vec<String> = scae::model::Module::all(2).iter().map(|m| m.name()).collect();
    assert_eq!(modules[d["up"][0][0].as_u64().unwrap() as usize], site.first_up.0);
    assert_eq!(d["up"][0][1], site.first_up.1);
    assert_eq!(d["lt"].as_array().unwrap().len(), 10);
    // The logit lens against a naive oracle: W_dec[:, j] · W_U for every token, by loops.
    let fx = fixtures().join("suites/tiny-neo/suite.safetensors");
    let suite = scae::formats::suite::Suite::load(&fx, &Device::Cpu).unwrap();
    let mi = suite.find(&site.module).unwrap();
    let dec = suite.aes[mi].w_dec.as_tensor().to_vec2::<f32>().unwrap(); // (D, F)
    let model = scae::model::Model::load("m", &fixture_model("tiny-neo"), &Device::Cpu).unwrap();
    let w_u = model.runtime.weights.w_u.to_vec2::<f32>().unwrap(); // (D, vocab)
    let logits: Vec<f64> = (0..w_u[0].len())
        .map(|t| (0..dec.len()).map(|k| dec[k][site.feature] as f64 * w_u[k][t] as f64).sum())
        .collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    for (rank, (want_top, want_low)) in order.iter().zip(order.iter().rev()).take(10).enumerate() {
        let (gt, gl) = (&d["lt"][rank], &d["lb"][rank]);
        assert_eq!(gt[0].as_u64().unwrap() as usize, *want_top, "lens top {rank}");
        assert_eq!(gl[0].as_u64().unwrap() as usize, *want_low, "lens bottom {rank}");
        assert!((gt[1].as_f64().unwrap() - logits[*want_top]).abs() < 6e-3);
        assert!((gl[1].as_f64().unwrap() - logits[*want_low]).abs() < 6e-3);
    }
    let meta = std::fs::read_to_string(site.dir.join("data/meta.js")).unwrap();
    assert!(meta.starts_with("SCAE.meta = {") && meta.contains("SCAE.vocab = {"));
    // Downstream listeners are the inverse of the connections.
    let (um, uj) = &site.first_up;
    let up = feature_data(&site.dir, um, *uj as usize);
    let listed = up["down"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| modules[x[0].as_u64().unwrap() as usize] == site.module && x[1] == site.feature);
    assert!(listed, "{} should list {}/{} downstream: {}", um, site.module, site.feature, up["down"]);
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|c| {
        Command::new(c).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| PathBuf::from(c))
    })
}

/// The DOM after the page's scripts ran, for `url` (a file:// URL with query and hash).
fn dom(chrome: &Path, url: &str) -> String {
    let o = Command::new(chrome)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", url])
        .output()
        .unwrap();
    assert!(o.status.success(), "chromium failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn site_renders_in_headless_chromium() {
    let Some(chrome) = chromium() else {
        eprintln!("SKIPPED site_renders_in_headless_chromium: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let site = build("tiny-pythia");
    let index = format!("file://{}", s(&site.dir.join("index.html")));
    // The index lists the modules and the features, dead ones marked.
    let html = dom(&chrome, &index);
    assert!(html.contains(r#"data-view="index""#), "{html}");
    assert!(html.contains(r##"href="#mlp_1""##) && html.contains(r##"href="#attn_0/0""##), "index links");
    // A feature page: its top context's marked token is the one evaluate found, and its
    // connections are links.
    let id = format!("{}/{}", site.module, site.feature);
    let html = dom(&chrome, &format!("{index}#{id}"));
    assert!(html.contains(&format!(r#"data-feature="{id}""#)), "{html}");
    let token = html_escape(&site.max_token.1);
    let at = html.find(r#"class="tok max" title="100% of max""#).expect("a marked token at 100% of max");
    let text = &html[at..];
    let text = &text[text.find('>').unwrap() + 1..text.find("</span>").unwrap()];
    assert_eq!(text, token, "the first top context's marked token");
    let (um, uj) = &site.first_up;
    assert!(html.contains(&format!(r##"href="#{um}/{uj}" class="up""##)), "upstream link missing:\n{html}");
    // Following the first upstream link on the page navigates to that feature's page.
    let first = html.find(r#"" class="up""#).expect("an upstream link");
    let target = &html[html[..first].rfind("href=\"#").unwrap() + 7..first];
    let html = dom(&chrome, &format!("{}?follow=up#{id}", index));
    assert!(html.contains(&format!(r#"data-feature="{target}""#)), "navigation to {target} failed:\n{html}");
    // Each top context says why it fired; the histogram's axes are labelled.
    let html = dom(&chrome, &format!("{index}#{id}"));
    assert!(html.contains(r#"<div class="why""#) && html.contains("biases and position"), "{html}");
    assert!(html.contains("activation (sampled when firing)") && html.contains(">count</text>"), "{html}");
    // The index: density in % and a log10-density histogram with labelled axes.
    let html = dom(&chrome, &format!("{index}#mlp_1"));
    assert!(html.contains(r#"id="density""#) && html.contains("log10 density (share of tokens it fires on)"), "{html}");
    assert!(html.contains("density %") && html.contains(">features</text>"), "{html}");
    // Listeners sorted by score, those that never fired marked: a feature with a dead listener.
    let meta = std::fs::read_to_string(site.dir.join("data/meta.js")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(meta.lines().next().unwrap().trim_start_matches("SCAE.meta = ").trim_end_matches(';'))
            .unwrap();
    let modules: Vec<String> = scae::model::Module::all(2).iter().map(|m| m.name()).collect();
    let dead = |m: usize, j: u64| meta["index"][&modules[m]]["freq"][j as usize].as_f64().unwrap() == 0.0;
    let (m, j, down) = modules
        .iter()
        .enumerate()
        .flat_map(|(m, name)| (0..32).map(move |j| (m, name, j)))
        .find_map(|(m, name, j)| {
            let d = feature_data(&site.dir, name, j);
            let down = d["down"].as_array().unwrap().clone();
            down.iter().any(|x| dead(x[0].as_u64().unwrap() as usize, x[1].as_u64().unwrap())).then_some((m, j, down))
        })
        .expect("a feature with a listener that never fires");
    let html = dom(&chrome, &format!("{index}#{}/{j}", modules[m]));
    let table = &html[html.find(r#"<table class="down">"#).unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    assert_eq!(table_scores(table).len(), down.len());
    assert!(table.contains(r#"<tr class="dead">"#) && table.contains("never fired"), "{table}");
    // Search by token: a feature whose top context fires on a (plain-word) token is listed.
    let vocab = std::fs::read_to_string(site.dir.join("data/meta.js")).unwrap();
    let vocab = vocab.lines().nth(1).unwrap().trim_start_matches("SCAE.vocab = ").trim_end_matches(';').to_string();
    let vocab: serde_json::Value = serde_json::from_str(&vocab).unwrap();
    let (name, j, word) = modules
        .iter()
        .flat_map(|name| (0..32).map(move |j| (name, j)))
        .find_map(|(name, j)| {
            let d = feature_data(&site.dir, name, j);
            let top = d["top"].as_array()?.first()?.clone();
            let tok = top[4][top[3].as_u64()? as usize].as_u64()?;
            let word = vocab[tok.to_string()].as_str()?.trim().to_string();
            (word.len() > 1 && word.chars().all(|c| c.is_ascii_alphanumeric())).then_some((name, j, word))
        })
        .expect("a feature whose top context fires on a word");
    let html = dom(&chrome, &format!("{index}#search/{word}"));
    assert!(html.contains(r#"data-view="search""#), "{html}");
    assert!(html.contains(&format!(r##"href="#{name}/{j}""##)), "search for {word} lists {name}/{j}: {html}");
}

/// Why a top context fired: the page's terms are the largest incoming links of that node in
/// `attribute`'s graph of the same sequence, and they add up to its pre-activation.
#[test]
fn why_it_fired_agrees_with_attribute() {
    let site = build("tiny-neo");
    let d = feature_data(&site.dir, &site.module, site.feature);
    let tmp = site.dir.parent().unwrap().to_path_buf();
    let fx = fixtures().join("suites/tiny-neo");
    let modules: Vec<scae::model::Module> = scae::model::Module::all(2);
    let mut checked = 0;
    for ctx in d["top"].as_array().unwrap().iter().take(3) {
        let (seq, pos) = (ctx[1].as_u64().unwrap(), ctx[2].as_u64().unwrap() as i64);
        let why = &ctx[6];
        let g = tmp.join(format!("why-{seq}"));
        tool_ok(
            "attribute",
            &[
                "--acts",
                s(&tmp.join("acts")),
                "--seq",
                &seq.to_string(),
                "--suite",
                s(&fx.join("suite.safetensors")),
                "--connections",
                s(&fx.join("connections-ref.safetensors")),
                "--no-prune",
                "--slug",
                "g",
                "--out",
                s(&g),
            ],
        );
        let graph: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(g.join("g.json")).unwrap()).unwrap();
        let m = modules.iter().position(|x| x.name() == site.module).unwrap();
        let layer = scae::model::graph_layer(&modules[m]);
        let id = format!("{layer}_{}_{pos}", site.feature);
        let node = graph["nodes"].as_array().unwrap().iter().find(|n| n["node_id"] == id.as_str()).unwrap();
        let mut links: Vec<(String, f64)> = graph["links"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["target"] == id.as_str())
            .map(|l| (l["source"].as_str().unwrap().to_string(), l["weight"].as_f64().unwrap()))
            .collect();
        links.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let shown = why[3].as_array().unwrap();
        assert_eq!(shown.len(), links.len().min(5));
        for (t, (src, w)) in shown.iter().zip(&links) {
            let p = pos + t[3].as_i64().unwrap();
            let want = match t[0].as_u64().unwrap() {
                0 => format!("{}_{}_{p}", scae::model::graph_layer(&modules[t[1].as_u64().unwrap() as usize]), t[2]),
                _ => format!("E_{}_{p}", t[1]),
            };
            assert_eq!(&want, src);
            assert!((t[4].as_f64().unwrap() - w).abs() < 1e-3, "{t} vs {w}");
        }
        let rest: f64 = links.iter().skip(5).map(|l| l.1).sum();
        let fixed: f64 = ["bias", "upstream_bias", "position"].iter().map(|k| node[*k].as_f64().unwrap()).sum();
        let pre = node["pre_activation"].as_f64().unwrap();
        assert!((why[0].as_f64().unwrap() - pre).abs() < 1e-3 && (why[1].as_f64().unwrap() - fixed).abs() < 1e-3);
        assert!((why[2].as_f64().unwrap() - rest).abs() < 1e-3);
        assert!((pre - ctx[0].as_f64().unwrap()).abs() < 2e-3, "a selected activation is its pre-activation");
        checked += 1;
    }
    assert!(checked > 0);
    // The why-it-fired pass reads the statistics pass's kept features; with no room to keep
    // them it runs those sequences through the pass again: the same pages.
    let again = tmp.join("view-keep0");
    let acts = tmp.join("acts");
    let (suite, conns) = (fx.join("suite.safetensors"), fx.join("connections-ref.safetensors"));
    let a = ["--acts", s(&acts), "--suite", s(&suite), "--connections", s(&conns)];
    tool_ok("view-features", &[&a[..], &["--keep-mb", "0", "--out", s(&again)]].concat());
    let data = |dir: &Path| -> Vec<(std::ffi::OsString, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("data"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_owned(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let (kept, rerun) = (data(&site.dir), data(&again));
    assert!(!kept.is_empty());
    assert!(kept == rerun, "view-features --keep-mb 0 wrote different data files");
}

/// The score column of a rendered connection table (unknown scores as -inf), checked to be in
/// decreasing order.
fn table_scores(table: &str) -> Vec<f64> {
    let scores: Vec<f64> = table
        .split(r#"<td class="num">"#)
        .skip(1)
        .map(|c| c[..c.find('<').unwrap()].parse().unwrap_or(f64::NEG_INFINITY))
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "connections by score: {scores:?}");
    scores
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A site whose connections have both ends sparse shows a feature's input tokens (embed
/// connections) and output tokens (unembed connections) as tables, rendered by Chromium.
#[test]
fn sparse_ends_render_in_headless_chromium() {
    let Some(chrome) = chromium() else {
        eprintln!("SKIPPED sparse_ends_render_in_headless_chromium: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let tmp = scratch("view-ends");
    let acts = golden_cache(&tmp, "tiny-neo");
    let suite = fixtures().join("suites/tiny-neo/suite.safetensors");
    let edges = tmp.join("edges");
    tool_ok(
        "score-edges",
        &["--acts", s(&acts), "--suite", s(&suite), "--embed", "--unembed", "--keep", "12", "--out", s(&edges)],
    );
    let conns = tmp.join("conns.parquet");
    tool_ok(
        "select-edges",
        &[
            "--edges",
            s(&edges.join("edges.parquet")),
            "--c",
            "4",
            "--embed-c",
            "3",
            "--unembed-c",
            "3",
            "--out",
            s(&conns),
        ],
    );
    let dir = tmp.join("view");
    tool_ok("view-features", &["--acts", s(&acts), "--suite", s(&suite), "--connections", s(&conns), "--out", s(&dir)]);
    // A feature with both: three input tokens and at least one output token.
    let (module, j, n_out) = scae::model::Module::all(2)
        .iter()
        .flat_map(|m| (0..32).map(move |j| (m.name(), j)))
        .find_map(|(m, j)| {
            let d = feature_data(&dir, &m, j);
            let (e, o) = (d["emb"].as_array().unwrap().len(), d["out"].as_array().unwrap().len());
            (e == 3 && o > 0).then_some((m, j, o))
        })
        .expect("a feature with embed and unembed connections");
    let index = format!("file://{}", s(&dir.join("index.html")));
    let html = dom(&chrome, &format!("{index}#{module}/{j}"));
    assert!(html.contains("Input tokens (embed connections, 3)") && html.contains(r#"<table id="emb">"#), "{html}");
    // Scored connections are listed by score, highest first.
    let j = (0..32).find(|&j| feature_data(&dir, "mlp_1", j)["up"].as_array().unwrap().len() >= 2).unwrap();
    let scored = dom(&chrome, &format!("{index}#mlp_1/{j}"));
    let table = &scored[scored.find(r#"<table class="up">"#).unwrap()..];
    let scores = table_scores(&table[..table.find("</table>").unwrap()]);
    assert!(scores.len() >= 2 && scores.iter().all(|x| x.is_finite()), "{scores:?}");
    assert!(
        html.contains(&format!("Output tokens (unembed connections, {n_out})")) && html.contains(r#"<table id="out">"#),
        "{html}"
    );
}

/// `view-features --neuronpedia`: one page per feature under features/, named by the feature's
/// number in an attribution graph (Cantor pairing of the module's graph layer and the feature),
/// with every field of the circuit-tracer / Neuronpedia feature model, of its type, and numbers
/// that agree with the browser's own data.
#[test]
fn neuronpedia_feature_pages_have_the_ui_fields() {
    let tmp = scratch("view-neuronpedia");
    let acts = golden_cache(&tmp, "tiny-neo");
    let fx = fixtures().join("suites/tiny-neo");
    let (suite, conns) = (fx.join("suite.safetensors"), fx.join("connections-ref.safetensors"));
    let dir = tmp.join("view");
    let a = ["--acts", s(&acts), "--suite", s(&suite), "--connections", s(&conns), "--neuronpedia", "--out", s(&dir)];
    tool_ok("view-features", &a);
    let pages = std::fs::read_dir(dir.join("features")).unwrap().count();
    assert_eq!(pages, 4 * 32, "one page per feature of the 4 modules");
    let mut fired = 0;
    for (li, module) in ["attn_0", "mlp_0", "attn_1", "mlp_1"].iter().enumerate() {
        for j in 0..32u64 {
            let id = (li as u64 + j) * (li as u64 + j + 1) / 2 + j;
            let text = std::fs::read_to_string(dir.join(format!("features/{id}.json"))).unwrap();
            let p: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(p["transcoder_id"], *module);
            assert_eq!(p["index"], j);
            for key in ["act_min", "act_max", "activation_frequency"] {
                assert!(p[key].is_number(), "{module} {j}: {key} in {p}");
            }
            for key in ["top_logits", "bottom_logits"] {
                assert!(p[key].as_array().unwrap().iter().all(|t| t.is_string()), "{key}");
            }
            for key in ["quantile_values", "histogram"] {
                assert!(p[key].as_array().unwrap().iter().all(|t| t.is_number()), "{key}");
            }
            let quantiles = p["examples_quantiles"].as_array().unwrap();
            assert_eq!(quantiles.len(), 2);
            for q in quantiles {
                assert!(q["quantile_name"].is_string());
                for e in q["examples"].as_array().unwrap() {
                    let (toks, acts) = (e["tokens"].as_array().unwrap(), e["tokens_acts_list"].as_array().unwrap());
                    assert!(!toks.is_empty() && toks.len() == acts.len() && toks.iter().all(|t| t.is_string()));
                    assert!((e["train_token_ind"].as_u64().unwrap() as usize) < toks.len());
                    assert_eq!(e["is_repeated_datapoint"], false);
                }
            }
            // The browser's own numbers for the same feature.
            let own = feature_data(&dir, module, j as usize);
            let n = own["n"].as_u64().unwrap();
            if n > 0 {
                fired += 1;
                let top = &quantiles[0]["examples"][0];
                let at = top["train_token_ind"].as_u64().unwrap() as usize;
                let best = top["tokens_acts_list"][at].as_f64().unwrap();
                assert!((best - p["act_max"].as_f64().unwrap()).abs() <= 1e-6 * best.abs().max(1.0), "{module} {j}");
                assert!((best - own["max"].as_f64().unwrap()).abs() <= 1e-3 * best.abs().max(1.0), "{module} {j}");
            } else {
                assert_eq!(p["activation_frequency"], 0.0, "{module} {j}: a dead feature says so");
                assert!(quantiles[0]["examples"].as_array().unwrap().is_empty());
            }
        }
    }
    assert!(fired > 10, "{fired} features fired");
}

/// `view-features --graphs`: an `attribute` graph drawn in graph.html from file:// by the
/// vendored layout library — every node and link of the file drawn, tokens on the bottom row
/// and logits on the top one, feature nodes opening their pages; graphs of another suite refused.
#[test]
fn graph_view_renders_attribute_graphs_in_headless_chromium() {
    let tmp = scratch("view-graphs");
    let acts = golden_cache(&tmp, "tiny-neo");
    let fx = fixtures().join("suites/tiny-neo");
    let (suite, conns) = (fx.join("suite.safetensors"), fx.join("connections-ref.safetensors"));
    let g = tmp.join("graphs");
    tool_ok(
        "attribute",
        &["--acts", s(&acts), "--seq", "1", "--suite", s(&suite), "--connections", s(&conns), "--out", s(&g)],
    );
    let graph: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(g.join("seq-1.json")).unwrap()).unwrap();
    let dir = tmp.join("view");
    let base = ["--acts", s(&acts), "--suite", s(&suite), "--connections", s(&conns)];
    let mut a = base.to_vec();
    a.extend(["--graphs", s(&g), "--neuronpedia", "--out", s(&dir)]);
    tool_ok("view-features", &a);
    assert!(std::fs::read_to_string(dir.join("data/graphs.js")).unwrap().contains("\"seq-1\""));
    // Every feature node's number names its page in features/ (--neuronpedia), so a UI pointed
    // there (metadata.scan) finds them.
    for n in graph["nodes"].as_array().unwrap().iter().filter(|n| n["feature_type"] == "cross layer transcoder") {
        let page = dir.join(format!("features/{}.json", n["feature"]));
        let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&page).unwrap()).unwrap();
        assert_eq!((&p["transcoder_id"], &p["index"]), (&n["module"], &n["index"]), "{}", page.display());
    }
    // A graph made with another suite is refused, naming the file.
    let other = tmp.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(g.join("graph-metadata.json"), other.join("graph-metadata.json")).unwrap();
    let text = std::fs::read_to_string(g.join("seq-1.json")).unwrap();
    let id = graph["metadata"]["info"]["suite_id"].as_str().unwrap();
    std::fs::write(other.join("seq-1.json"), text.replace(id, "blake3:0123456789abcdef")).unwrap();
    let mut a = base.to_vec();
    let out2 = tmp.join("view2");
    a.extend(["--graphs", s(&other), "--out", s(&out2)]);
    scae_testkit::tool_fails("view-features", &a, &["seq-1.json", "made for suite 0123456789ab"]);
    assert!(!out2.exists(), "nothing written when a graph is refused");

    let Some(chrome) = chromium() else {
        eprintln!(
            "SKIPPED graph_view_renders_attribute_graphs_in_headless_chromium (browser part): no chromium on PATH"
        );
        return;
    };
    let page = format!("file://{}", s(&dir.join("graph.html")));
    let html = dom(&chrome, &format!("{page}#seq-1"));
    assert!(html.contains(r#"data-laid-out="1""#), "laid out: {html}");
    let n_nodes = graph["nodes"].as_array().unwrap().len();
    let n_links = graph["links"].as_array().unwrap().len();
    assert_eq!(html.matches(r#"<g class="node "#).count(), n_nodes, "every node drawn");
    assert_eq!(html.matches("<line ").count(), n_links, "every link drawn");
    // Rows: tokens (row 0) below every feature, logits above.
    let ys = |row_is: &dyn Fn(u32) -> bool| -> Vec<f64> {
        html.split(r#"<g class="node "#)
            .skip(1)
            .filter_map(|chunk| {
                let row: u32 = chunk.split(r#"data-row=""#).nth(1)?.split('"').next()?.parse().ok()?;
                let t = chunk.split("translate(").nth(1)?.split(')').next()?;
                let y: f64 = t.split(',').nth(1)?.parse().ok()?;
                row_is(row).then_some(y)
            })
            .collect()
    };
    let tokens = ys(&|r| r == 0);
    let features = ys(&|r| r > 0 && r <= 4);
    let logits = ys(&|r| r >= 5);
    assert_eq!(tokens.len(), 12, "one token node per position");
    assert!(!features.is_empty() && !logits.is_empty());
    let min_tok = tokens.iter().cloned().fold(f64::MAX, f64::min);
    let max_logit = logits.iter().cloned().fold(f64::MIN, f64::max);
    assert!(features.iter().all(|&y| y < min_tok && y > max_logit), "tokens at the bottom, logits on top");
    // A feature node opens its page in the browser.
    let feature =
        graph["nodes"].as_array().unwrap().iter().find(|n| n["feature_type"] == "cross layer transcoder").unwrap();
    let href = format!("index.html#{}/{}", feature["module"].as_str().unwrap(), feature["index"]);
    assert!(html.contains(&format!(r#"data-href="{href}""#)), "{href}");
    let index = format!("file://{}", s(&dir.join("index.html")));
    let fpage = dom(&chrome, &format!("{index}#{}/{}", feature["module"].as_str().unwrap(), feature["index"]));
    assert!(fpage.contains(&format!(r#"data-feature="{}/{}""#, feature["module"].as_str().unwrap(), feature["index"])));
    // The index lists the graph.
    assert!(dom(&chrome, &index).contains(r##"href="graph.html#seq-1""##));
}
