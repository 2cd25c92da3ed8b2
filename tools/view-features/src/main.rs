//! `view-features`: a static feature browser for a suite — one page per feature
//! (`index.html#<module>/<feature>`) with its firing frequency, activation histogram, top
//! activating contexts, examples from lower quantiles, logit lens, and its upstream and
//! downstream connections as links. Opens from `file://`: no server, no network; the data are
//! JavaScript files loaded by `<script>` tags.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use scae::browse::{BrowseConfig, Context, FeatureStats};
use scae::formats::connections::EMBED_UP;
use scae::inputs::Inputs;
use scae::util::io::StagedDir;
use serde_json::{json, Value};

/// Write a static feature browser for a suite on an activation cache.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  view-features --acts acts/ --suite ft/ --connections c16.parquet --out view/\n  then open view/index.html (or view/index.html#mlp_1/42)\n\nFeatures come from the same pass as evaluate's: pruned with --connections, else the suite's\nstored connections, else all connections."
)]
struct Args {
    /// Activation cache folder (from collect-acts).
    #[arg(long)]
    acts: PathBuf,
    /// Suite: a scae suite folder or .safetensors, or a reference suite folder / hub id.
    #[arg(long)]
    suite: PathBuf,
    /// Connection set (.parquet, .safetensors, .pkl, .pt) or `all`; shown as each feature's links.
    /// Default: the suite's stored connections (those it was finetuned with), else all.
    #[arg(long)]
    connections: Option<PathBuf>,
    /// edges.parquet from score-edges: scores for connections that carry none (default: none;
    /// such connections are listed without scores).
    #[arg(long)]
    edges: Option<PathBuf>,
    /// Output folder: index.html, app.js, style.css, data/.
    #[arg(long)]
    out: PathBuf,
    /// Top activating contexts per feature.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100))]
    top: u64,
    /// Tokens of context left of the activating token (right: a third of it, at least 2).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=64))]
    context: u64,
    #[command(flatten)]
    cache: scae::cli::CacheRunArgs,
    #[command(flatten)]
    pass: scae::cli::PassArgs,
    #[command(flatten)]
    common: scae::cli::Common,
}

/// Features per data file.
const CHUNK: usize = 256;
/// Histogram bins.
const BINS: usize = 20;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

fn main() -> ExitCode {
    scae::cli::run_main("view-features", || run(scae::cli::parse_args::<Args>()))
}

/// `x` rounded to `digits` decimals (smaller files); null when not finite.
fn round(x: f64, digits: i32) -> Value {
    let scale = 10f64.powi(digits);
    let v = (x * scale).round() / scale;
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

fn r3(x: f64) -> Value {
    round(x, 3)
}

/// A context as `[act, seq, pos, at, [tokens], [acts in % of the feature's max]]`.
fn context(c: &Context, max: f32, vocab: &mut HashMap<u32, ()>) -> Value {
    for t in &c.tokens {
        vocab.insert(*t, ());
    }
    let pct: Vec<u32> =
        c.acts.iter().map(|a| ((a / max.max(1e-12)) * 100.0).round().clamp(0.0, 100.0) as u32).collect();
    json!([r3(c.act as f64), c.seq, c.pos, c.at, c.tokens, pct])
}

fn histogram(fs: &FeatureStats) -> Vec<u32> {
    let mut h = vec![0u32; BINS];
    if fs.max > 0.0 {
        for &a in &fs.samples {
            let b = ((a / fs.max) * BINS as f32) as usize;
            h[b.min(BINS - 1)] += 1;
        }
    }
    h
}

fn run(args: Args) -> Result<()> {
    let named = [
        ("--acts", Some(args.acts.as_path())),
        ("--suite", Some(args.suite.as_path())),
        ("--connections", args.connections.as_deref()),
        ("--edges", args.edges.as_deref()),
    ];
    scae::util::io::refuse_overlap(&args.out, "--out", &named)?;
    let device = args.common.setup()?;
    let inputs = Inputs::open(&args.acts, &args.suite, args.cache.model.as_deref(), &device)?;
    let chosen = inputs.choose_connections(args.connections.as_deref(), "view-features")?;
    let conns = chosen.set.clone();
    let suite = &inputs.suite;
    let (f, modules) = (suite.n_features, &suite.modules);
    // Scores for edges that carry none, from an edges file.
    let edge_scores: HashMap<(usize, usize, usize, u32), f32> = match &args.edges {
        Some(p) => {
            let e = inputs.connections(p)?;
            let mut m = HashMap::new();
            for (d, fs) in e.edges.iter().enumerate() {
                for (i, es) in fs.iter().enumerate() {
                    for x in es {
                        m.insert((d, i, x.up, x.feature), x.score);
                    }
                    for x in &e.embed[d][i] {
                        m.insert((d, i, EMBED_UP, x.token), x.score);
                    }
                }
            }
            m
        }
        None => HashMap::new(),
    };
    let stage = StagedDir::create(&args.out, args.cache.overwrite, "--out")?;
    let left = args.context as usize;
    let cfg = BrowseConfig {
        batch_size: args.cache.batch_size as usize,
        limit: args.cache.limit(),
        top_n: args.top as usize,
        left,
        right: (left / 3).max(2),
        hist_samples: 256,
        sample_contexts: 9,
        lens: 10,
        pass: args.pass.options(),
        seed: args.common.seed,
    };
    let browse = scae::browse::collect(&inputs, conns.as_ref(), &cfg, &device)?;
    // Upstream links per feature, and who listens to each feature downstream.
    let score = |d: usize, i: usize, u: usize, j: u32, s: f32| -> f32 {
        if s.is_finite() {
            s
        } else {
            edge_scores.get(&(d, i, u, j)).copied().unwrap_or(f32::NAN)
        }
    };
    let mut listeners: Vec<Vec<Vec<(usize, usize, f32)>>> = vec![vec![Vec::new(); f]; modules.len()];
    if let Some(c) = &conns {
        for (d, fs) in c.edges.iter().enumerate() {
            for (i, es) in fs.iter().enumerate() {
                for e in es {
                    listeners[e.up][e.feature as usize].push((d, i, score(d, i, e.up, e.feature, e.score)));
                }
            }
        }
    }
    // The output tokens each feature feeds through unembed edges: [token, score].
    let mut outputs: Vec<Vec<Vec<(u32, f32)>>> = vec![vec![Vec::new(); f]; modules.len()];
    if let Some(c) = &conns {
        for (v, es) in c.unembed.iter().enumerate() {
            for e in es {
                outputs[e.up][e.feature as usize].push((v as u32, e.score));
            }
        }
    }
    let tokenizer = inputs.model.tokenizer()?;
    let data = stage.path().join("data");
    std::fs::create_dir_all(&data).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", data.display()))?;
    let mut vocab: HashMap<u32, ()> = HashMap::new();
    let mut index = serde_json::Map::new();
    let mut bytes = 0usize;
    for (mi, m) in modules.iter().enumerate() {
        let st = &browse.stats[mi];
        let n = browse.n_tokens.max(1) as f64;
        index.insert(
            m.name(),
            json!({
                "freq": st.iter().map(|s| r3(1e5 * s.count as f64 / n)).collect::<Vec<_>>(),
                "max": st.iter().map(|s| r3(s.max as f64)).collect::<Vec<_>>(),
            }),
        );
        for start in (0..f).step_by(CHUNK) {
            let mut feats = Vec::new();
            for j in start..(start + CHUNK).min(f) {
                let fs = &st[j];
                let lens = &browse.lens[mi][j];
                for (t, _) in lens.top.iter().chain(&lens.bottom) {
                    vocab.insert(*t, ());
                }
                let up: Vec<Value> = match &conns {
                    Some(c) => c.edges[mi][j]
                        .iter()
                        .map(|e| json!([e.up, e.feature, r3(score(mi, j, e.up, e.feature, e.score) as f64)]))
                        .collect(),
                    None => vec![],
                };
                let down: Vec<Value> = listeners[mi][j].iter().map(|(d, i, s)| json!([d, i, r3(*s as f64)])).collect();
                // Input tokens: the embed connections, [token, score].
                let emb: Vec<Value> = match &conns {
                    Some(c) => c.embed[mi][j]
                        .iter()
                        .map(|e| {
                            vocab.insert(e.token, ());
                            json!([e.token, r3(score(mi, j, EMBED_UP, e.token, e.score) as f64)])
                        })
                        .collect(),
                    None => vec![],
                };
                // Examples from lower quantiles: the sampled contexts at 3/4, 1/2 and 1/4 of their range.
                let q: Vec<Value> = if fs.sampled.len() >= 3 {
                    let l = fs.sampled.len() - 1;
                    [l / 4, l / 2, 3 * l / 4].iter().map(|&k| context(&fs.sampled[k], fs.max, &mut vocab)).collect()
                } else {
                    vec![]
                };
                feats.push(json!({
                    "i": j,
                    "n": fs.count,
                    "max": r3(fs.max as f64),
                    "mean": r3(if fs.count > 0 { fs.sum / fs.count as f64 } else { 0.0 }),
                    "hist": if fs.count > 0 { histogram(fs) } else { vec![] },
                    "top": fs.top.iter().map(|c| context(c, fs.max, &mut vocab)).collect::<Vec<_>>(),
                    "q": q,
                    "lt": lens.top.iter().map(|(t, v)| json!([t, round(*v as f64, 2)])).collect::<Vec<_>>(),
                    "lb": lens.bottom.iter().map(|(t, v)| json!([t, round(*v as f64, 2)])).collect::<Vec<_>>(),
                    "up": up,
                    "emb": emb,
                    "out": outputs[mi][j]
                        .iter()
                        .map(|&(t, sc)| {
                            vocab.insert(t, ());
                            json!([t, r3(sc as f64)])
                        })
                        .collect::<Vec<_>>(),
                    "down": down,
                }));
            }
            let text = format!("SCAE.addChunk({}, {}, {});\n", json!(m.name()), start / CHUNK, Value::Array(feats));
            bytes += text.len();
            scae::util::io::write_atomic(&data.join(format!("{}-{}.js", m.name(), start / CHUNK)), text.as_bytes())?;
        }
    }
    let mut ids: Vec<u32> = vocab.into_keys().collect();
    ids.sort_unstable();
    let vocab: serde_json::Map<String, Value> =
        ids.iter().map(|&t| (t.to_string(), json!(tokenizer.token_text(t)))).collect();
    let meta = json!({
        "modules": modules.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "n_features": f,
        "k": suite.k,
        "chunk": CHUNK,
        "bins": BINS,
        "n_tokens": browse.n_tokens,
        "n_seqs": browse.n_seqs,
        "suite": args.suite.display().to_string(),
        "acts": args.acts.display().to_string(),
        "connections": chosen.file.as_ref().map(|p| p.display().to_string()),
        "pass": if conns.is_some() { "pruned" } else { "all-connections" },
        "pass_description": chosen.pass,
        "index": index,
    });
    let mut text = String::new();
    let _ = writeln!(text, "SCAE.meta = {meta};");
    let _ = writeln!(text, "SCAE.vocab = {};", Value::Object(vocab));
    bytes += text.len();
    scae::util::io::write_atomic(&data.join("meta.js"), text.as_bytes())?;
    for (name, body) in [("index.html", INDEX_HTML), ("app.js", APP_JS), ("style.css", STYLE_CSS)] {
        scae::util::io::write_atomic(&stage.path().join(name), body.as_bytes())?;
        bytes += body.len();
    }
    let out = stage.commit()?;
    let alive: usize = browse.stats.iter().flatten().filter(|s| s.count > 0).count();
    scae::say!(
        "view-features: {} features ({alive} firing) over {} tokens, {:.1} MB -> {}",
        f * modules.len(),
        browse.n_tokens,
        bytes as f64 / 1e6,
        out.join("index.html").display()
    )?;
    Ok(())
}
