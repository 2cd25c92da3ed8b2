//! Reading connection files into [`Connections`]: the parquet form (codes for the module-name
//! columns), the reference's tables, and the checks every edge meets ([`Builder`]).

use std::collections::HashMap;
use std::path::Path;

use arrow_array::ArrayRef;

use super::super::edges_meta::{EdgesMeta, Key};
use super::super::reference::Table;
use super::{Connections, Edge, EmbedEdge, EMBED, UNEMBED, VERSION};
use crate::error::{Error, IoContext, Result};
use crate::model::Module;

struct Builder<'a> {
    path: &'a Path,
    modules: &'a [Module],
    n_features: usize,
    parallel: bool,
    by_name: HashMap<String, usize>,
    conns: Connections,
}

impl<'a> Builder<'a> {
    fn new(path: &'a Path, modules: &'a [Module], n_features: usize, parallel: bool) -> Self {
        Builder {
            path,
            modules,
            n_features,
            parallel,
            by_name: modules.iter().enumerate().map(|(i, m)| (m.name(), i)).collect(),
            conns: Connections::empty(modules, n_features),
        }
    }

    fn module(&self, name: &str, what: &str) -> Result<usize> {
        self.by_name.get(name).copied().ok_or_else(|| {
            let known: Vec<String> = self.modules.iter().map(Module::name).collect();
            Error::input(
                self.path,
                format!("{what} `{name}`: not a module of the suite (modules: {})", known.join(", ")),
            )
        })
    }

    fn feature(&self, f: i64, what: &str) -> Result<u32> {
        if f < 0 || f as usize >= self.n_features {
            return Err(Error::input(
                self.path,
                format!("{what} {f}: out of range, the suite has {} features", self.n_features),
            ));
        }
        Ok(f as u32)
    }

    fn add(&mut self, d: usize, i: u32, u: usize, j: u32, score: f32) -> Result<()> {
        let (dm, um) = (self.modules[d], self.modules[u]);
        if !um.precedes(&dm, self.parallel) {
            let why = if self.parallel { " (parallel attn/MLP blocks: only earlier layers feed a module)" } else { "" };
            return Err(Error::input(self.path, format!("edge {um}:{j} -> {dm}:{i}: {um} does not precede {dm}{why}")));
        }
        self.conns.edges[d][i as usize].push(Edge { up: u, feature: j, score });
        Ok(())
    }

    /// An edge from feature `j` of module `u` into output token `token` (any module feeds
    /// the unembedding).
    fn add_unembed(&mut self, token: u32, u: usize, j: u32, score: f32) -> Result<()> {
        let t = token as usize;
        if t >= MAX_VOCAB {
            return Err(Error::input(
                self.path,
                format!("down_feature {token} of an {UNEMBED} edge: above any vocabulary (at most {MAX_VOCAB} tokens)"),
            ));
        }
        if self.conns.unembed.len() <= t {
            self.conns.unembed.resize(t + 1, Vec::new());
        }
        self.conns.unembed[t].push(Edge { up: u, feature: j, score });
        Ok(())
    }

    /// The connections, refused when an edge is listed twice (each edge list checked on its own,
    /// modules side by side: the duplicate named is the first list's smallest).
    fn finish(self) -> Result<Connections> {
        use rayon::prelude::*;
        let c = &self.conns;
        let modules = self.modules;
        let dup = (0..c.edges.len()).into_par_iter().find_map_first(|d| {
            let mut keys = Vec::new();
            let dm = modules[d];
            (0..c.edges[d].len()).find_map(|i| {
                let up = c.edges[d][i].iter().map(|e| (e.up, e.feature));
                if let Some((u, j)) = first_duplicate(&mut keys, up) {
                    return Some(format!("duplicate edge {}:{j} -> {dm}:{i}", modules[u]));
                }
                let tokens = c.embed[d][i].iter().map(|e| (0, e.token));
                first_duplicate(&mut keys, tokens).map(|(_, t)| format!("duplicate edge {EMBED}:{t} -> {dm}:{i}"))
            })
        });
        let dup = dup.or_else(|| {
            let mut keys = Vec::new();
            c.unembed.iter().enumerate().find_map(|(token, es)| {
                first_duplicate(&mut keys, es.iter().map(|e| (e.up, e.feature)))
                    .map(|(u, j)| format!("duplicate edge {}:{j} -> {UNEMBED}:{token}", modules[u]))
            })
        });
        match dup {
            Some(msg) => Err(Error::input(self.path, msg)),
            None => Ok(self.conns),
        }
    }

    /// An edge from vocabulary item `token` of the embedding (any module may read it).
    fn add_embed(&mut self, d: usize, i: u32, token: u32, score: f32) -> Result<()> {
        self.conns.embed[d][i as usize].push(EmbedEdge { token, score });
        Ok(())
    }
}

/// Token ids of unembed edges are refused from here on before any list is sized by them (the
/// model's vocabulary is checked later; no model's comes near 2²⁴).
const MAX_VOCAB: usize = 1 << 24;

/// The smallest key that `keys` lists twice (`buf`: scratch).
fn first_duplicate(buf: &mut Vec<(usize, u32)>, keys: impl Iterator<Item = (usize, u32)>) -> Option<(usize, u32)> {
    buf.clear();
    buf.extend(keys);
    buf.sort_unstable();
    buf.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

pub(super) fn read_parquet(path: &Path, modules: &[Module], n_features: usize, parallel: bool) -> Result<Connections> {
    // Files from other tools (pandas) carry no scae metadata; ours must be a version we read.
    // Metadata that is present must describe this suite and model.
    let names: Vec<String> = modules.iter().map(Module::name).collect();
    let disagrees = |k: &str, v: &str, ours: String| {
        Err(Error::input(path, format!("metadata `{k}` {v} disagrees with the suite and model ({ours})")))
    };
    let meta = EdgesMeta::of_file(path)?;
    if let Some(v) = meta.get(Key::Version).filter(|v| *v != VERSION.to_string()) {
        return Err(Error::input(
            path,
            format!("version {v}, expected {VERSION}; hint: rewrite it with score-edges / select-edges"),
        ));
    }
    if let Some(v) = meta.get(Key::NFeatures).filter(|v| *v != n_features.to_string()) {
        return disagrees("n_features", v, n_features.to_string());
    }
    if let Some(v) = meta.get(Key::ParallelAttnMlp).filter(|v| *v != parallel.to_string()) {
        return disagrees("parallel_attn_mlp", v, parallel.to_string());
    }
    if let Some(v) = meta.get(Key::Modules).filter(|v| v.split(',').any(|m| !names.iter().any(|n| n == m))) {
        return disagrees("modules", v, names.join(","));
    }
    meta.c(path)?;
    let batches = crate::util::table::read_parquet(path)?;
    let mut b = Builder::new(path, modules, n_features, parallel);
    for batch in &batches {
        let col = |name: &str| -> Result<&ArrayRef> {
            batch.column_by_name(name).ok_or_else(|| Error::input(path, format!("missing column `{name}`")))
        };
        // Module names as codes into the batch's distinct names, each resolved once (an unknown
        // name is refused at its first row, as before).
        let (dnames, dm) = crate::util::table::string_codes(path, "down_module", col("down_module")?)?;
        let (unames, um) = crate::util::table::string_codes(path, "up_module", col("up_module")?)?;
        let resolve = |names: &[String]| names.iter().map(|n| b.by_name.get(n).copied()).collect::<Vec<_>>();
        let (dmod, umod) = (resolve(&dnames), resolve(&unames));
        let df = crate::util::table::ints(path, "down_feature", col("down_feature")?)?;
        let uf = crate::util::table::ints(path, "up_feature", col("up_feature")?)?;
        let score = match batch.column_by_name("score") {
            Some(c) => crate::util::table::floats(path, "score", c)?,
            None => vec![f32::NAN; batch.num_rows()],
        };
        for r in 0..batch.num_rows() {
            let (dc, uc) = (dm[r] as usize, um[r] as usize);
            let up = |b: &Builder| umod[uc].map_or_else(|| b.module(&unames[uc], "up_module"), Ok);
            if dnames[dc] == UNEMBED {
                let token = u32::try_from(df[r]).map_err(|_| {
                    Error::input(path, format!("down_feature {} of an {UNEMBED} edge: expected a token id", df[r]))
                })?;
                let u = up(&b)?;
                let j = b.feature(uf[r], "up_feature")?;
                b.add_unembed(token, u, j, score[r])?;
                continue;
            }
            let d = dmod[dc].map_or_else(|| b.module(&dnames[dc], "down_module"), Ok)?;
            let i = b.feature(df[r], "down_feature")?;
            if unames[uc] == EMBED {
                let token = u32::try_from(uf[r]).map_err(|_| {
                    Error::input(path, format!("up_feature {} of an {EMBED} edge: expected a token id", uf[r]))
                })?;
                b.add_embed(d, i, token, score[r])?;
                continue;
            }
            let u = up(&b)?;
            let j = b.feature(uf[r], "up_feature")?;
            b.add(d, i, u, j, score[r])?;
        }
    }
    b.finish()
}

pub(super) fn read_reference(
    path: &Path,
    modules: &[Module],
    n_features: usize,
    parallel: bool,
) -> Result<Connections> {
    let bytes = std::fs::read(path).at(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::input(path, format!("not a readable safetensors file: {e}")))?;
    let mut tables = Vec::new();
    for name in st.names() {
        let (dname, uname) = name.split_once('.').ok_or_else(|| {
            Error::input(path, format!("tensor `{name}`: expected a name `<down>.<up>`, e.g. `mlp_1.attn_0`"))
        })?;
        let view = st.tensor(name).expect("listed tensor");
        let vals: Vec<i64> = match view.dtype() {
            safetensors::Dtype::I64 => {
                view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect()
            }
            safetensors::Dtype::I32 => {
                view.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4")) as i64).collect()
            }
            other => return Err(Error::input(path, format!("tensor `{name}`: expected int64, found {other:?}"))),
        };
        tables.push(Table { down: dname.into(), up: uname.into(), shape: view.shape().to_vec(), values: vals });
    }
    from_tables(path, tables, modules, n_features, parallel)
}

/// Connections from the reference's per-pair index tables (`path` names their file in errors).
pub fn from_tables(
    path: &Path,
    mut tables: Vec<Table>,
    modules: &[Module],
    n_features: usize,
    parallel: bool,
) -> Result<Connections> {
    let mut b = Builder::new(path, modules, n_features, parallel);
    // Suite order of (down, up) so that per-feature edge order follows the reference's.
    tables.sort_by_key(|t| (Module::parse(&t.down).map(|m| m.index()), Module::parse(&t.up).map(|m| m.index())));
    let mut dropped = 0usize;
    for t in &tables {
        let name = format!("{}.{}", t.down, t.up);
        let d = b.module(&t.down, "down module")?;
        let u = b.module(&t.up, "up module")?;
        let shape = &t.shape;
        if shape.len() != 2 || shape[0] != n_features || shape[0].checked_mul(shape[1]) != Some(t.values.len()) {
            return Err(Error::input(
                path,
                format!("tensor `{name}`: expected shape [{n_features}, C], found {shape:?}"),
            ));
        }
        let (dm, um) = (modules[d], modules[u]);
        let same_layer_parallel = parallel
            && um.layer == dm.layer
            && um.kind == crate::model::Kind::Attn
            && dm.kind == crate::model::Kind::Mlp;
        let width = shape[1];
        for i in 0..n_features {
            for &v in &t.values[i * width..(i + 1) * width] {
                if v == -1 {
                    continue;
                }
                let j = b.feature(v, &format!("tensor `{name}`: feature"))?;
                if same_layer_parallel {
                    dropped += 1;
                    continue;
                }
                b.add(d, i as u32, u, j, f32::NAN)?;
            }
        }
    }
    if dropped > 0 {
        crate::note!(
            "warning: {}: dropped {dropped} same-layer attn->mlp edges, which a parallel-block model's pruned pass does not use",
            path.display()
        );
    }
    b.finish()
}
