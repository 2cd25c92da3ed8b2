//! Top-C selection from scored edges (documented tie rule: |score| descending, then upstream
//! module in suite order, then upstream feature; exact zeros are never selected), the
//! unembedding's selection, the random-connections control, and the select-edges runner that
//! reads an edges file and writes a connections file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::formats::connections::{Connections, Edge, EmbedEdge, EDGES_FORMAT};
use crate::formats::edges_meta::{EdgesMeta, Key};

/// Selection order: |score| descending, then upstream module, then upstream feature.
pub fn edge_order(a: &Edge, b: &Edge) -> std::cmp::Ordering {
    b.score.abs().total_cmp(&a.score.abs()).then(a.up.cmp(&b.up)).then(a.feature.cmp(&b.feature))
}

/// The first `c` edges of every feature (inputs already in selection order, e.g. from
/// [`super::ScoreStats::top_edges`] or an edges file). Embed edges are pooled with the modules'
/// edges into the same budget, or, with `embed_c`, get a budget of their own. Unembed edges
/// are left out ([`select_unembed`] picks them).
pub fn select_top_c(edges: &Connections, c: usize, embed_c: Option<usize>) -> Connections {
    let mut out = edges.clone();
    out.unembed.clear();
    for d in 0..out.modules.len() {
        for i in 0..out.n_features {
            let mut es = std::mem::take(&mut out.edges[d][i]);
            let mut emb: Vec<Edge> = std::mem::take(&mut out.embed[d][i]).into_iter().map(Edge::from).collect();
            if embed_c.is_none() {
                es.append(&mut emb);
            }
            let mut pick = |mut es: Vec<Edge>, c: usize| {
                es.retain(|e| e.score != 0.0);
                es.sort_by(edge_order);
                es.truncate(c);
                out.set_pooled(d, i, es);
            };
            pick(es, c);
            if let Some(ce) = embed_c {
                pick(emb, ce);
            }
        }
    }
    out
}

/// `es` with the same count per upstream module (in order of first appearance) but distinct
/// random features of that module (scores NaN).
fn random_like(es: &[Edge], f: usize, rng: &mut crate::util::rng::SplitMix) -> Vec<Edge> {
    let mut ups: Vec<usize> = Vec::new();
    for e in es {
        if !ups.contains(&e.up) {
            ups.push(e.up);
        }
    }
    let mut fresh = Vec::with_capacity(es.len());
    for u in ups {
        let n = es.iter().filter(|e| e.up == u).count().min(f);
        // A partial Fisher-Yates shuffle over 0..F: n distinct draws.
        let mut pool: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
        for t in 0..n {
            let r = t + (rng.next_u64() % (f - t) as u64) as usize;
            let (vt, vr) = (*pool.get(&t).unwrap_or(&t), *pool.get(&r).unwrap_or(&r));
            pool.insert(r, vt);
            pool.insert(t, vr);
            fresh.push(Edge { up: u, feature: vr as u32, score: f32::NAN });
        }
    }
    fresh
}

/// The first `c` unembed edges of every output token (selection order; zero scores dropped).
pub fn select_unembed(edges: &Connections, c: usize) -> Vec<Vec<Edge>> {
    edges
        .unembed
        .iter()
        .map(|es| {
            let mut es: Vec<Edge> = es.iter().filter(|e| e.score != 0.0).copied().collect();
            es.sort_by(edge_order);
            es.truncate(c);
            es
        })
        .collect()
}

/// The random-connections control (the reference's `generate_fake_connections`): every
/// feature keeps how many edges it takes from each upstream module, but the upstream features
/// are distinct random ones of that module (scores NaN); its embed edges become as many
/// distinct random tokens among those the set's embed edges use. Deterministic in `seed`.
pub fn randomize_like(conns: &Connections, seed: u64) -> Connections {
    let f = conns.n_features;
    let mut out = conns.clone();
    for (d, feats) in out.edges.iter_mut().enumerate() {
        for (i, es) in feats.iter_mut().enumerate() {
            let mut rng = crate::util::rng::SplitMix(seed ^ ((d as u64) << 40) ^ (i as u64).wrapping_mul(0x9e37_79b9));
            *es = random_like(es, f, &mut rng);
        }
    }
    // Unembed edges: each token keeps its per-module counts, with random features.
    for (v, es) in out.unembed.iter_mut().enumerate() {
        let mut rng = crate::util::rng::SplitMix(seed.rotate_left(17) ^ (v as u64).wrapping_mul(0x9e37_79b9));
        *es = random_like(es, f, &mut rng);
    }
    // Embed edges: as many per feature, random distinct tokens among those the set's embed
    // edges use (the tokens scoring saw).
    let mut pool: Vec<u32> = out.embed.iter().flatten().flatten().map(|e| e.token).collect();
    pool.sort_unstable();
    pool.dedup();
    for (d, feats) in out.embed.iter_mut().enumerate() {
        for (i, es) in feats.iter_mut().enumerate() {
            if es.is_empty() {
                continue;
            }
            let mut rng = crate::util::rng::SplitMix(!seed ^ ((d as u64) << 40) ^ (i as u64).wrapping_mul(0x9e37_79b9));
            let mut idx: Vec<usize> = (0..pool.len()).collect();
            let n = es.len().min(pool.len());
            for t in 0..n {
                let r = t + (rng.next_u64() % (pool.len() - t) as u64) as usize;
                idx.swap(t, r);
            }
            *es = idx[..n].iter().map(|&j| EmbedEdge { token: pool[j], score: f32::NAN }).collect();
        }
    }
    out
}

/// What select-edges selects from an edges file.
#[derive(Debug, Clone)]
pub struct SelectConfig {
    /// The edges file (score-edges' `edges.parquet`).
    pub edges: PathBuf,
    /// Connections kept per downstream feature, across upstream modules.
    pub c: usize,
    /// A budget of its own for embed edges (else they compete for the C slots).
    pub embed_c: Option<usize>,
    /// Features kept per output token (edges into the unembedding); `None`: none.
    pub unembed_c: Option<usize>,
    /// The random-connections control's seed.
    pub random: Option<u64>,
}

/// A selection: the connections, the C achieved and the metadata their file records.
pub struct Selected {
    pub conns: Connections,
    pub c: usize,
    pub meta: EdgesMeta,
}

/// Read `cfg.edges` (checked: an edges file with F and modules in its metadata, a finite
/// score on every edge) and select its top-C connections (or the random control).
pub fn select(cfg: &SelectConfig) -> Result<Selected> {
    let path = cfg.edges.as_path();
    let meta = EdgesMeta::of_file(path)?;
    let hint = "edges files are written by score-edges";
    // A connections file has the same columns; its rows are already a selection.
    if let Some(f) = meta.get(Key::Format).filter(|f| *f != EDGES_FORMAT) {
        return Err(Error::input(path, format!("metadata `format`: expected {EDGES_FORMAT}, found {f}; hint: {hint}")));
    }
    meta.require(Key::NFeatures, path, hint)?;
    let n_features = meta.n_features(path)?.expect("required");
    meta.require(Key::Modules, path, hint)?;
    let modules = meta.modules(path)?.expect("required");
    let parallel = meta.require(Key::ParallelAttnMlp, path, hint)? == "true";
    if let Some(k) = meta.keep(path)?.filter(|&k| cfg.c > k) {
        crate::note!(
            "select-edges: warning: --c {} is above the {k} edges per feature kept in {}; features get at most {k}",
            cfg.c,
            path.display()
        );
    }
    let edges = Connections::load(path, &modules, n_features, parallel)?;
    // Ranking needs a finite score on every edge (a missing column or null reads as NaN).
    if let Some((edge, score)) = edges.first_non_finite_score() {
        return Err(Error::input(
            path,
            format!(
                "column `score`, edge {edge}: expected a finite score, found {score} (a missing column or a null reads as NaN); hint: {hint}"
            ),
        ));
    }
    let mut conns = select_top_c(&edges, cfg.c, cfg.embed_c);
    if let Some(uc) = cfg.unembed_c {
        if edges.n_unembed_edges() == 0 {
            return Err(Error::input(
                path,
                format!("--unembed-c {uc}: the file has no unembed edges; hint: score with score-edges --unembed"),
            ));
        }
        conns.unembed = select_unembed(&edges, uc);
    }
    if let Some(seed) = cfg.random {
        conns = randomize_like(&conns, seed);
    }
    // The C achieved: at most the edges each feature has.
    let c = conns.edges.iter().flatten().map(Vec::len).max().unwrap_or(0).min(cfg.c);
    let mut out =
        EdgesMeta::new().with(Key::ParallelAttnMlp, parallel).with(Key::C, c).with(Key::Edges, path.display());
    // The suite the edges were scored for: tools warn when the connections meet another suite.
    for k in [Key::Suite, Key::SuiteId] {
        if let Some(v) = meta.get(k) {
            out.set(k, v);
        }
    }
    if let Some(seed) = cfg.random {
        out.set(Key::RandomSeed, seed);
    }
    if let Some(ce) = cfg.embed_c {
        out.set(Key::EmbedC, ce);
    }
    if let Some(uc) = cfg.unembed_c {
        out.set(Key::UnembedC, uc);
    }
    Ok(Selected { conns, c, meta: out })
}

impl Selected {
    /// Write the connections file `out` (via a `.tmp` file).
    pub fn write(&self, out: &Path) -> Result<()> {
        self.conns.write_parquet(out, crate::formats::connections::FORMAT, &self.meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_control_keeps_per_module_counts_with_distinct_features() {
        let m = crate::model::Module::all(2);
        let mut c = Connections::empty(&m, 8);
        let e = |up, feature| Edge { up, feature, score: 1.0 };
        c.edges[3][5] = vec![e(0, 1), e(0, 2), e(2, 7), e(0, 3), e(1, 4)];
        c.edges[1][0] = (0..8).map(|j| e(0, j)).collect();
        let r = randomize_like(&c, 7);
        let count = |es: &[Edge], u| es.iter().filter(|x| x.up == u).count();
        for u in 0..3 {
            assert_eq!(count(&r.edges[3][5], u), count(&c.edges[3][5], u));
        }
        let mut all: Vec<u32> = r.edges[1][0].iter().map(|x| x.feature).collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>(), "all 8 of 8 features, each once");
        let edges_of = |c: &Connections| -> Vec<(usize, u32)> {
            c.edges.iter().flatten().flatten().map(|x| (x.up, x.feature)).collect()
        };
        assert_eq!(edges_of(&r), edges_of(&randomize_like(&c, 7)), "deterministic");
        assert_ne!(edges_of(&r), edges_of(&randomize_like(&c, 8)), "seed matters");
        assert!(r.edges[3][5].iter().all(|x| x.score.is_nan()));
    }

    #[test]
    fn selection_order_breaks_ties_by_module_then_feature() {
        let e = |up, feature, score| Edge { up, feature, score };
        let mut v = vec![e(2, 0, 0.5), e(0, 3, -0.5), e(0, 1, 0.5), e(1, 0, 0.9)];
        v.sort_by(edge_order);
        assert_eq!(v, vec![e(1, 0, 0.9), e(0, 1, 0.5), e(0, 3, -0.5), e(2, 0, 0.5)]);
    }
}
