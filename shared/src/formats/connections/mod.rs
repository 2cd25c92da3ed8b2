//! Connection sets: for every downstream feature, the upstream features it listens to.
//!
//! Two on-disk forms, chosen by extension (FORMATS.md):
//! - `connections.parquet` (format `scae-connections`, version 1): one row per edge with
//!   columns `down_module` (utf8), `down_feature` (uint32), `up_module` (utf8),
//!   `up_feature` (uint32) and optionally `score` (float32). Rows are grouped by downstream
//!   module (suite order) and feature; within a feature they keep the file's order.
//!   `up_module = "embed"` marks an edge from the token embedding, `up_feature` its token id;
//!   `down_module = "unembed"` an edge into output token `down_feature` (docs/MATH.md,
//!   "Embed and unembed connections").
//! - the reference's layout, `*.safetensors`: one int64 tensor `<down>.<up>` of shape
//!   `[F_down, C]` per module pair, `-1` padded; and the reference's own files holding the
//!   same tables as `dict[down][up]`: `top_connections_{C}.pkl` (`pickle.dump`) and
//!   `connections.pt` (`torch.save`), read by [`crate::formats::reference`].
//!
//! Validation: unknown modules, features out of range, duplicate edges and edges from a
//! module that does not precede its target are errors (each row's checks as it is read, the
//! duplicates once the file is read, per edge list: the first list's smallest repeated edge is
//! named); except that the reference layout's
//! same-layer attn->mlp pairs on parallel (Pythia) models are dropped with a warning, because
//! the reference writes them although its pruned pass ignores them (docs/MATH.md, "Where scae departs from the reference").

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float32Array, StringArray, UInt32Array};

use super::edges_meta::{EdgesMeta, Key};
use super::reference::Table;
use crate::error::{Error, Result};
use crate::model::Module;

mod read;
pub use read::from_tables;
use read::{read_parquet, read_reference};

/// `format` key of a connections parquet file.
pub const FORMAT: &str = "scae-connections";
/// `format` key of an edges parquet file (same columns, more edges per feature).
pub const EDGES_FORMAT: &str = "scae-edges";
/// Current version.
pub const VERSION: u32 = 1;

/// One edge into a downstream feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Edge {
    /// Index of the upstream module in suite order.
    pub up: usize,
    pub feature: u32,
    /// The edge's score, NaN when unknown.
    pub score: f32,
}

/// One edge from the token embedding into a downstream feature: vocabulary item `token`
/// (docs/MATH.md, "Embed and unembed connections").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmbedEdge {
    pub token: u32,
    /// The edge's score, NaN when unknown.
    pub score: f32,
}

/// The name of the token embedding as an upstream module in connection files.
pub const EMBED: &str = "embed";
/// The name of the unembedding as a downstream module in connection files.
pub const UNEMBED: &str = "unembed";

/// `Edge::up` of an embed edge in a pooled candidate list (scoring and selection rank
/// module and embed edges together; `feature` is then the token id). It sorts after every
/// module in ties. Connection sets keep embed edges in [`Connections::embed`] instead.
pub const EMBED_UP: usize = usize::MAX;

impl From<EmbedEdge> for Edge {
    fn from(e: EmbedEdge) -> Edge {
        Edge { up: EMBED_UP, feature: e.token, score: e.score }
    }
}

/// `edges[down module][down feature]` -> the edges into that feature.
#[derive(Debug, Clone, PartialEq)]
pub struct Connections {
    pub modules: Vec<Module>,
    pub n_features: usize,
    pub edges: Vec<Vec<Vec<Edge>>>,
    /// `embed[down module][down feature]` -> the tokens wired into that feature. A module
    /// none of whose features has an embed edge reads the embedding densely (today's pass).
    pub embed: Vec<Vec<Vec<EmbedEdge>>>,
    /// `unembed[token]` -> the features that output token reads (indexed by token id, as long
    /// as the largest token listed + 1). Empty: every token reads every feature (today's CE).
    pub unembed: Vec<Vec<Edge>>,
}

impl Connections {
    /// An empty set (C = 0) for `modules`.
    pub fn empty(modules: &[Module], n_features: usize) -> Connections {
        Connections {
            modules: modules.to_vec(),
            n_features,
            edges: modules.iter().map(|_| vec![Vec::new(); n_features]).collect(),
            embed: modules.iter().map(|_| vec![Vec::new(); n_features]).collect(),
            unembed: Vec::new(),
        }
    }

    /// Total number of edges into the unembedding.
    pub fn n_unembed_edges(&self) -> usize {
        self.unembed.iter().map(Vec::len).sum()
    }

    /// Total number of edges between modules.
    pub fn n_edges(&self) -> usize {
        self.edges.iter().flatten().map(Vec::len).sum()
    }

    /// Total number of edges from the token embedding.
    pub fn n_embed_edges(&self) -> usize {
        self.embed.iter().flatten().map(Vec::len).sum()
    }

    /// Append a pooled candidate list to feature `i` of module `d`: module edges to
    /// [`edges`](Self::edges), those with `up == EMBED_UP` to [`embed`](Self::embed).
    pub fn set_pooled(&mut self, d: usize, i: usize, pooled: Vec<Edge>) {
        for e in pooled {
            match e.up {
                EMBED_UP => self.embed[d][i].push(EmbedEdge { token: e.feature, score: e.score }),
                _ => self.edges[d][i].push(e),
            }
        }
    }

    /// Whether module `d` reads the embedding through edges (some feature has an embed edge).
    pub fn has_embed(&self, d: usize) -> bool {
        self.embed[d].iter().any(|es| !es.is_empty())
    }

    /// Check every embed edge's token against the model's vocabulary (`path` names the file).
    pub fn check_vocab(&self, path: &Path, d_vocab: usize) -> Result<()> {
        if self.unembed.len() > d_vocab {
            let token = self.unembed.len() - 1;
            return Err(Error::input(
                path,
                format!("edge -> {UNEMBED}:{token}: token {token} out of range, the model's vocabulary has {d_vocab} tokens"),
            ));
        }
        for (d, feats) in self.embed.iter().enumerate() {
            for (i, es) in feats.iter().enumerate() {
                if let Some(e) = es.iter().find(|e| e.token as usize >= d_vocab) {
                    return Err(Error::input(
                        path,
                        format!(
                            "edge {EMBED}:{} -> {}:{i}: token {} out of range, the model's vocabulary has {d_vocab} tokens",
                            e.token, self.modules[d], e.token
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Read either form (by extension), checking it against the suite's modules, F and the
    /// model's block type.
    pub fn load(path: &Path, modules: &[Module], n_features: usize, parallel: bool) -> Result<Connections> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("parquet") => read_parquet(path, modules, n_features, parallel),
            Some("safetensors") => read_reference(path, modules, n_features, parallel),
            Some("pkl" | "pt") => {
                let tables = crate::formats::reference::read_connection_file(path)?;
                from_tables(path, tables, modules, n_features, parallel)
            }
            _ => {
                Err(Error::input(path, "--connections: expected a .parquet, .safetensors, .pkl or .pt file (or `all`)"))
            }
        }
    }

    /// Write the parquet form via `<path>.tmp`; its key-value metadata: `format` (connections or
    /// edges), version, F and modules, then `meta` in its order.
    pub fn write_parquet(&self, path: &Path, format: &str, meta: &EdgesMeta) -> Result<()> {
        self.write_parquet_gated(path, format, meta, None)
    }

    /// [`write_parquet`](Self::write_parquet) with a `gate` column (learned connections):
    /// `gates.0[d][i]` holds one value per edge of feature i of module d, its module edges then
    /// its embed edges, in list order; `gates.1[v]` one per unembed edge of token v (missing
    /// values are NaN).
    pub fn write_parquet_gated(
        &self,
        path: &Path,
        format: &str,
        meta: &EdgesMeta,
        gates: Option<(&[Vec<Vec<f32>>], &[Vec<f32>])>,
    ) -> Result<()> {
        let (mut dm, mut df, mut um, mut uf, mut sc) = (vec![], vec![], vec![], vec![], vec![]);
        let mut row = |d: String, i: u32, u: String, j: u32, score: f32| {
            dm.push(d);
            df.push(i);
            um.push(u);
            uf.push(j);
            sc.push(score);
        };
        let mut gate = Vec::new();
        for (d, feats) in self.edges.iter().enumerate() {
            let dname = self.modules[d].name();
            for (i, es) in feats.iter().enumerate() {
                if let Some((g, _)) = gates {
                    gate.extend(
                        g[d][i]
                            .iter()
                            .copied()
                            .chain(std::iter::repeat(f32::NAN))
                            .take(es.len() + self.embed[d][i].len()),
                    );
                }
                for e in es {
                    row(dname.clone(), i as u32, self.modules[e.up].name(), e.feature, e.score);
                }
                for e in &self.embed[d][i] {
                    row(dname.clone(), i as u32, EMBED.to_string(), e.token, e.score);
                }
            }
        }
        for (token, es) in self.unembed.iter().enumerate() {
            if let Some((_, g)) = gates {
                let g = g.get(token).map_or(&[][..], |v| &v[..]);
                gate.extend(g.iter().copied().chain(std::iter::repeat(f32::NAN)).take(es.len()));
            }
            for e in es {
                row(UNEMBED.to_string(), token as u32, self.modules[e.up].name(), e.feature, e.score);
            }
        }
        let mut cols: Vec<(&str, ArrayRef)> = vec![
            ("down_module", Arc::new(StringArray::from(dm))),
            ("down_feature", Arc::new(UInt32Array::from(df))),
            ("up_module", Arc::new(StringArray::from(um))),
            ("up_feature", Arc::new(UInt32Array::from(uf))),
            ("score", Arc::new(Float32Array::from(sc))),
        ];
        if gates.is_some() {
            cols.push(("gate", Arc::new(Float32Array::from(gate))));
        }
        let modules: Vec<String> = self.modules.iter().map(Module::name).collect();
        let mut all = EdgesMeta::new()
            .with(Key::Format, format)
            .with(Key::Version, VERSION)
            .with(Key::NFeatures, self.n_features)
            .with(Key::Modules, modules.join(","));
        all.extend(meta);
        crate::util::table::write_parquet(path, cols, &all.pairs())
    }

    /// Write the reference's layout: int64 `<down>.<up>` `[F, width]`, -1 padded, one tensor
    /// per preceding pair (all -1 when no edge), `width` = the most edges of any feature.
    pub fn write_reference(&self, path: &Path, parallel: bool) -> Result<()> {
        if self.n_embed_edges() + self.n_unembed_edges() > 0 {
            return Err(Error::input(
                path,
                format!(
                    "the reference's layout has no embed or unembed edges, but the connections hold {}; hint: write a .parquet instead",
                    self.n_embed_edges() + self.n_unembed_edges()
                ),
            ));
        }
        let tables = self.reference_tables(parallel);
        let bytes: Vec<Vec<u8>> =
            tables.iter().map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tables
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, t.shape.clone(), b)
                    .expect("sizes agree");
                (format!("{}.{}", t.down, t.up), v)
            })
            .collect();
        crate::util::io::write_safetensors(path, views, &Default::default())
    }
}

impl Connections {
    /// The reference's table width: the most edges of any feature (at least 1).
    fn reference_width(&self) -> usize {
        self.edges.iter().flatten().map(Vec::len).max().unwrap_or(0).max(1)
    }

    /// The reference's `[F, C]` per-pair index tables (C = the most edges of any feature, at least 1; each
    /// module's picks left-packed, `-1` after), for every preceding (down, up) pair in suite order.
    pub fn reference_tables(&self, parallel: bool) -> Vec<Table> {
        let (f, width) = (self.n_features, self.reference_width());
        let mut out = Vec::new();
        for (d, dm) in self.modules.iter().enumerate() {
            for (u, um) in self.modules.iter().enumerate() {
                if !um.precedes(dm, parallel) {
                    continue;
                }
                let mut values = vec![-1i64; f * width];
                for (i, es) in self.edges[d].iter().enumerate() {
                    for (slot, e) in es.iter().filter(|e| e.up == u).enumerate() {
                        values[i * width + slot] = e.feature as i64;
                    }
                }
                out.push(Table { down: dm.name(), up: um.name(), shape: vec![f, width], values });
            }
        }
        out
    }

    /// The first edge (in file order: modules' edges and embed edges per feature, then the
    /// unembedding's) whose score is NaN or infinite, as `up:j -> down:i`, with its score.
    pub fn first_non_finite_score(&self) -> Option<(String, f32)> {
        let name = |u: usize| self.modules[u].name();
        for (d, feats) in self.edges.iter().enumerate() {
            for (i, es) in feats.iter().enumerate() {
                if let Some(e) = es.iter().find(|e| !e.score.is_finite()) {
                    return Some((format!("{}:{} -> {}:{i}", name(e.up), e.feature, name(d)), e.score));
                }
                if let Some(e) = self.embed[d][i].iter().find(|e| !e.score.is_finite()) {
                    return Some((format!("{EMBED}:{} -> {}:{i}", e.token, name(d)), e.score));
                }
            }
        }
        for (v, es) in self.unembed.iter().enumerate() {
            if let Some(e) = es.iter().find(|e| !e.score.is_finite()) {
                return Some((format!("{}:{} -> {UNEMBED}:{v}", name(e.up), e.feature), e.score));
            }
        }
        None
    }

    /// The edge set as (down module, down feature, up module, up feature), sorted.
    pub fn edge_set(&self) -> Vec<(usize, usize, usize, u32)> {
        let mut v: Vec<_> = self
            .edges
            .iter()
            .enumerate()
            .flat_map(|(d, fs)| {
                fs.iter().enumerate().flat_map(move |(i, es)| es.iter().map(move |e| (d, i, e.up, e.feature)))
            })
            .collect();
        v.sort_unstable();
        v
    }
}

/// Connections stored with a suite: inside a reference suite's checkpoint (`tables`), or as the
/// `connections.parquet` of a scae suite folder (`source`, `tables` = `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub source: std::path::PathBuf,
    pub tables: Option<Vec<Table>>,
}

impl Embedded {
    /// The connections, checked against the suite and the model's block type.
    pub fn connections(&self, modules: &[Module], n_features: usize, parallel: bool) -> Result<Connections> {
        match &self.tables {
            Some(t) => from_tables(&self.source, t.clone(), modules, n_features, parallel),
            None => Connections::load(&self.source, modules, n_features, parallel),
        }
    }
}
