//! The feature browser's data files (`view-features`), loaded by `<script>` tags so that the
//! page opens from `file://`: per module, chunks of [`CHUNK`] features as
//! `data/<module>-<n>.js` (`SCAE.addChunk(module, n, [feature, ...])`), and `data/meta.js`
//! (`SCAE.meta`: the suite's layout, the inputs, each feature's firing frequency and maximum;
//! `SCAE.vocab`: the text of every token a page shows).
//!
//! A feature is `{i, n, max, mean, hist, top, q, lt, lb, up, emb, out, down}`: firing count,
//! maximum and mean activation, a [`BINS`]-bin histogram, its top contexts, examples from lower
//! quantiles, the logit lens (top and bottom), and its links — upstream features, input tokens
//! (embed edges), output tokens (unembed edges) and the downstream features listening to it.
//! Numbers are rounded to keep the files small.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use super::why::{Source, Why};
use super::{Browse, Context, FeatureStats};
use crate::error::{Error, Result};
use crate::formats::connections::{Connections, EMBED_UP};
use crate::formats::suite::Suite;
use crate::model::tokenize::TextTokenizer;

/// Features per data file.
pub const CHUNK: usize = 256;
/// Histogram bins.
pub const BINS: usize = 20;

/// Edge scores from an edges file (`score-edges`' edges.parquet), shown for connections that
/// carry none; keyed by (downstream module, feature, upstream module or [`EMBED_UP`], upstream
/// feature or token).
#[derive(Debug, Clone, Default)]
pub struct EdgeScores(HashMap<(usize, usize, usize, u32), f32>);

impl EdgeScores {
    /// The scores of every edge (module and embed edges) in `edges`.
    pub fn new(edges: &Connections) -> EdgeScores {
        let mut m = HashMap::new();
        for (d, fs) in edges.edges.iter().enumerate() {
            for (i, es) in fs.iter().enumerate() {
                for x in es {
                    m.insert((d, i, x.up, x.feature), x.score);
                }
                for x in &edges.embed[d][i] {
                    m.insert((d, i, EMBED_UP, x.token), x.score);
                }
            }
        }
        EdgeScores(m)
    }

    /// `s` when finite, else the edge's score from the edges file, else NaN.
    pub fn score(&self, d: usize, i: usize, up: usize, j: u32, s: f32) -> f32 {
        if s.is_finite() {
            s
        } else {
            self.0.get(&(d, i, up, j)).copied().unwrap_or(f32::NAN)
        }
    }
}

/// Everything the data files are made of.
pub struct Page<'a> {
    /// The statistics from [`collect`](super::collect).
    pub browse: &'a Browse,
    pub suite: &'a Suite,
    /// The connections the pass ran with (`None`: all connections; no links are shown).
    pub conns: Option<&'a Connections>,
    pub scores: &'a EdgeScores,
    pub tokenizer: &'a TextTokenizer,
    /// The inputs and the pass in words, as recorded in `meta.js`.
    pub suite_path: &'a Path,
    pub acts_path: &'a Path,
    pub connections: Option<&'a Path>,
    pub pass_description: &'a str,
    /// Per module, feature and top context, why it fired there ([`super::why`]); empty: not
    /// computed.
    pub why: &'a [Vec<Vec<Option<Why>>>],
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
fn context(c: &Context, max: f32, vocab: &mut BTreeSet<u32>) -> Value {
    vocab.extend(&c.tokens);
    let pct: Vec<u32> =
        c.acts.iter().map(|a| ((a / max.max(1e-12)) * 100.0).round().clamp(0.0, 100.0) as u32).collect();
    json!([r3(c.act as f64), c.seq, c.pos, c.at, c.tokens, pct])
}

/// Why a context fired: `[pre, fixed, rest, [[kind, a, b, dpos, weight], ...]]`, kind 0 a
/// feature (a = module index, b = feature), kind 1 a token (a = token id); `dpos` = the
/// source's position − the context's (0 or less).
fn why(w: &Why, pos: u32, vocab: &mut BTreeSet<u32>) -> Value {
    let links: Vec<Value> = w
        .links
        .iter()
        .map(|(src, weight)| match *src {
            Source::Feature { module, feature, pos: p } => {
                json!([0, module, feature, p as i64 - pos as i64, r3(*weight)])
            }
            Source::Token { token, pos: p } => {
                vocab.insert(token);
                json!([1, token, 0, p as i64 - pos as i64, r3(*weight)])
            }
        })
        .collect();
    json!([r3(w.pre), r3(w.fixed), r3(w.rest), links])
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

/// Per module and feature, who listens to it downstream `(module, feature, score)` and the
/// output tokens it feeds through unembed edges `(token, score)`.
type Links = (Vec<Vec<Vec<(usize, usize, f32)>>>, Vec<Vec<Vec<(u32, f32)>>>);

fn downstream(page: &Page) -> Links {
    let (f, n_mod) = (page.suite.n_features, page.suite.modules.len());
    let mut listeners = vec![vec![Vec::new(); f]; n_mod];
    let mut outputs = vec![vec![Vec::new(); f]; n_mod];
    if let Some(c) = page.conns {
        for (d, fs) in c.edges.iter().enumerate() {
            for (i, es) in fs.iter().enumerate() {
                for e in es {
                    let s = page.scores.score(d, i, e.up, e.feature, e.score);
                    listeners[e.up][e.feature as usize].push((d, i, s));
                }
            }
        }
        for (v, es) in c.unembed.iter().enumerate() {
            for e in es {
                outputs[e.up][e.feature as usize].push((v as u32, e.score));
            }
        }
    }
    (listeners, outputs)
}

/// Feature `j` of module `mi` as the page reads it (see the module docs).
fn feature(page: &Page, links: &Links, mi: usize, j: usize, vocab: &mut BTreeSet<u32>) -> Value {
    let (listeners, outputs) = links;
    let fs = &page.browse.stats[mi][j];
    let lens = &page.browse.lens[mi][j];
    vocab.extend(lens.top.iter().chain(&lens.bottom).map(|(t, _)| *t));
    let score = |u: usize, x: u32, s: f32| r3(page.scores.score(mi, j, u, x, s) as f64);
    let up: Vec<Value> = match page.conns {
        Some(c) => c.edges[mi][j].iter().map(|e| json!([e.up, e.feature, score(e.up, e.feature, e.score)])).collect(),
        None => vec![],
    };
    let down: Vec<Value> = listeners[mi][j].iter().map(|(d, i, s)| json!([d, i, r3(*s as f64)])).collect();
    // Input tokens: the embed connections, [token, score].
    let emb: Vec<Value> = match page.conns {
        Some(c) => c.embed[mi][j]
            .iter()
            .map(|e| {
                vocab.insert(e.token);
                json!([e.token, score(EMBED_UP, e.token, e.score)])
            })
            .collect(),
        None => vec![],
    };
    // Examples from lower quantiles: the sampled contexts at 3/4, 1/2 and 1/4 of their range.
    let q: Vec<Value> = if fs.sampled.len() >= 3 {
        let l = fs.sampled.len() - 1;
        [l / 4, l / 2, 3 * l / 4].iter().map(|&k| context(&fs.sampled[k], fs.max, vocab)).collect()
    } else {
        vec![]
    };
    json!({
        "i": j,
        "n": fs.count,
        "max": r3(fs.max as f64),
        "mean": r3(if fs.count > 0 { fs.sum / fs.count as f64 } else { 0.0 }),
        "hist": if fs.count > 0 { histogram(fs) } else { vec![] },
        "top": fs
            .top
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let mut v = context(c, fs.max, vocab);
                if let Some(w) = page.why.get(mi).and_then(|f| f[j].get(k)).and_then(Option::as_ref) {
                    v.as_array_mut().expect("an array").push(why(w, c.pos, vocab));
                }
                v
            })
            .collect::<Vec<_>>(),
        "q": q,
        "lt": lens.top.iter().map(|(t, v)| json!([t, round(*v as f64, 2)])).collect::<Vec<_>>(),
        "lb": lens.bottom.iter().map(|(t, v)| json!([t, round(*v as f64, 2)])).collect::<Vec<_>>(),
        "up": up,
        "emb": emb,
        "out": outputs[mi][j]
            .iter()
            .map(|&(t, sc)| {
                vocab.insert(t);
                json!([t, r3(sc as f64)])
            })
            .collect::<Vec<_>>(),
        "down": down,
    })
}

/// Shards of the token search index (`data/search-<h>.js`).
pub const SEARCH_SHARDS: u32 = 16;

/// A token text as the search box matches it: trimmed, lower case.
pub fn search_key(text: &str) -> String {
    text.trim().to_lowercase()
}

/// The shard of a search key: `h = h·31 + code point` (mod 2³²) over its characters, mod
/// [`SEARCH_SHARDS`] (app.js computes the same).
pub fn search_shard(key: &str) -> u32 {
    key.chars().fold(0u32, |h, c| h.wrapping_mul(31).wrapping_add(c as u32)) % SEARCH_SHARDS
}

/// The token search index: per token text, the features whose top contexts fire on it
/// (`[module, feature, 0, contexts]`) or whose logit lens promotes it (`[module, feature, 1,
/// rank]`), written as `SCAE.addSearch(shard, {key: [...]})`.
fn write_search(dir: &Path, page: &Page) -> Result<usize> {
    let mut index: Vec<std::collections::BTreeMap<String, Vec<Value>>> =
        vec![Default::default(); SEARCH_SHARDS as usize];
    // Each token decoded once (features share their tokens).
    let mut keys: HashMap<u32, String> = HashMap::new();
    let mut add = |token: u32, entry: Value| {
        let key = keys.entry(token).or_insert_with(|| search_key(&page.tokenizer.token_text(token))).clone();
        if !key.is_empty() {
            index[search_shard(&key) as usize].entry(key).or_default().push(entry);
        }
    };
    for (mi, feats) in page.browse.stats.iter().enumerate() {
        for (j, fs) in feats.iter().enumerate() {
            let mut counts: std::collections::BTreeMap<u32, u32> = Default::default();
            for c in &fs.top {
                *counts.entry(c.tokens[c.at as usize]).or_default() += 1;
            }
            for (t, n) in counts {
                add(t, json!([mi, j, 0, n]));
            }
            for (rank, (t, _)) in page.browse.lens[mi][j].top.iter().enumerate() {
                add(*t, json!([mi, j, 1, rank + 1]));
            }
        }
    }
    let mut bytes = 0;
    for (h, shard) in index.into_iter().enumerate() {
        let text = format!("SCAE.addSearch({h}, {});\n", json!(shard));
        bytes += text.len();
        crate::util::io::write_atomic(&dir.join(format!("search-{h}.js")), text.as_bytes())?;
    }
    Ok(bytes)
}

/// Write the data files into `dir` (created here); returns the bytes written.
pub fn write_data(dir: &Path, page: &Page) -> Result<usize> {
    let (suite, browse) = (page.suite, page.browse);
    let (f, modules) = (suite.n_features, &suite.modules);
    let links = downstream(page);
    std::fs::create_dir_all(dir).map_err(|e| Error::input(dir, format!("cannot create: {e}")))?;
    let mut vocab = BTreeSet::new();
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
            let feats: Vec<Value> =
                (start..(start + CHUNK).min(f)).map(|j| feature(page, &links, mi, j, &mut vocab)).collect();
            let text = format!("SCAE.addChunk({}, {}, {});\n", json!(m.name()), start / CHUNK, Value::Array(feats));
            bytes += text.len();
            crate::util::io::write_atomic(&dir.join(format!("{}-{}.js", m.name(), start / CHUNK)), text.as_bytes())?;
        }
    }
    bytes += write_search(dir, page)?;
    let vocab: serde_json::Map<String, Value> =
        vocab.into_iter().map(|t| (t.to_string(), json!(page.tokenizer.token_text(t)))).collect();
    let meta = json!({
        "modules": modules.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "n_features": f,
        "k": suite.k,
        "chunk": CHUNK,
        "bins": BINS,
        "search_shards": SEARCH_SHARDS,
        "n_tokens": browse.n_tokens,
        "n_seqs": browse.n_seqs,
        "suite": page.suite_path.display().to_string(),
        "acts": page.acts_path.display().to_string(),
        "connections": page.connections.map(|p| p.display().to_string()),
        "pass": if page.conns.is_some() { "pruned" } else { "all-connections" },
        "pass_description": page.pass_description,
        "index": index,
    });
    let mut text = String::new();
    let _ = writeln!(text, "SCAE.meta = {meta};");
    let _ = writeln!(text, "SCAE.vocab = {};", Value::Object(vocab));
    bytes += text.len();
    crate::util::io::write_atomic(&dir.join("meta.js"), text.as_bytes())?;
    Ok(bytes)
}
