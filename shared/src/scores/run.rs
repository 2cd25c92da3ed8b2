//! The score-edges runner: one pass over a cache under the suite's full pass accumulates the
//! token statistics ([`super::ScoreStats`]), then every feature's top `keep` edges are formed
//! and written as `edges.parquet` (and, with `top_c`, `connections.parquet`) with
//! `scores.json` beside them.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::{select_top_c, ScoreStats};
use crate::error::{Error, Result};
use crate::formats::connections::{Connections, EDGES_FORMAT, FORMAT};
use crate::formats::edges_meta::{EdgesMeta, Key};
use crate::formats::scores_json::ScoresSummary;
use crate::inputs::Inputs;
use crate::pass::{PassOptions, Plan, ValuePass, Wiring};
use crate::util::collective::Collective;

/// What score-edges scores, and where the inputs came from (recorded in the files).
#[derive(Debug, Clone)]
pub struct ScoreConfig {
    /// The cache and suite as given (recorded in the metadata and scores.json).
    pub acts: PathBuf,
    pub suite: PathBuf,
    /// Edges kept per downstream feature in edges.parquet.
    pub keep: usize,
    /// Also select the top C of every feature into connections.parquet.
    pub top_c: Option<usize>,
    /// Also score edges from the token embedding / into the unembedding.
    pub embed: bool,
    pub unembed: bool,
    /// Sequences of the cache to read (`None`: all) and per batch.
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub options: PassOptions,
}

/// What [`run`] wrote.
pub struct Scored {
    pub n_tokens: u64,
    /// Edges in edges.parquet, and connections in connections.parquet (with `top_c`).
    pub n_edges: usize,
    pub n_connections: Option<usize>,
}

/// Score every edge of `inputs.suite` on `inputs`' cache and write the files into `dir`.
///
/// Sharded over the ranks of `coll` (`mpirun -n N score-edges ...`): rank r accumulates
/// batches r, r+N, ..., the statistics are added over the ranks (f64, rank order), and rank 0
/// (`dir` is `Some` there only) forms and writes the edges; the scores equal one process's up
/// to the order of the sums.
pub fn run(
    inputs: &Inputs,
    cfg: &ScoreConfig,
    dir: Option<&Path>,
    device: &Device,
    coll: &dyn Collective,
) -> Result<Option<Scored>> {
    let suite = &inputs.suite;
    let rt = &inputs.model.runtime;
    let parallel = inputs.parallel();
    let plan = Plan::new(suite, Wiring::All, parallel, device)?;
    let pass = ValuePass::new(suite, rt, &plan, cfg.options, device)?;
    let mut stats = ScoreStats::new(suite, rt.cfg.n_heads, parallel);
    if cfg.embed {
        stats = stats.with_embed(rt.cfg.d_vocab);
    }
    if cfg.unembed {
        stats = stats.with_unembed(rt.cfg.ln_eps);
    }
    let manifest = &inputs.cache().manifest;
    let total = cfg.limit.unwrap_or(manifest.n_seqs).min(manifest.n_seqs);
    let mut bar = crate::util::token_bar(Some((total * manifest.ctx_len) as u64), "score-edges");
    let (rank, ranks) = (coll.rank(), coll.size());
    let n_seqs = inputs.cache().for_each_batch_of(
        cfg.batch_size,
        cfg.limit,
        device,
        |i| i % ranks == rank,
        |batch| {
            let out = pass.run(&batch)?;
            stats.accumulate(suite, &batch, &out)?;
            // (Rank 0's share stands for the job's progress.)
            bar.inc((batch.tokens.elem_count() * ranks) as u64);
            Ok(())
        },
    )?;
    bar.finish();
    stats.reduce(suite, coll)?;
    let Some(dir) = dir else { return Ok(None) };
    let mut edges = Connections::empty(&suite.modules, suite.n_features);
    for d in 0..suite.modules.len() {
        for (i, pooled) in stats.top_edges(suite, rt, d, cfg.keep)?.into_iter().enumerate() {
            edges.set_pooled(d, i, pooled);
        }
    }
    edges.unembed = stats.top_unembed_edges(suite, rt, cfg.keep)?;
    // Scores that overflowed f32 (a suite of huge finite weights) would rank as garbage.
    if let Some((edge, _)) = edges.first_non_finite_score() {
        return Err(Error::input(
            &cfg.suite,
            format!(
                "edge scores of {edge} are not finite (the suite's weights or the cached activations overflow f32)"
            ),
        ));
    }
    let meta = EdgesMeta::new()
        .with(Key::ParallelAttnMlp, parallel)
        .with(Key::NTokens, stats.n_tokens)
        .with(Key::Keep, cfg.keep)
        .with(Key::Acts, cfg.acts.display())
        .with(Key::Suite, cfg.suite.display())
        .with(Key::SuiteId, suite.id()?)
        .with(Key::ConsistentAttnBias, cfg.options.consistent_attn_bias)
        .with(Key::Embed, cfg.embed)
        .with(Key::Unembed, cfg.unembed);
    edges.write_parquet(&dir.join("edges.parquet"), EDGES_FORMAT, &meta)?;
    let n_connections = match cfg.top_c {
        Some(c) => {
            let conns = select_top_c(&edges, c, None);
            conns.write_parquet(&dir.join("connections.parquet"), FORMAT, &meta.clone().with(Key::C, c))?;
            Some(conns.n_edges() + conns.n_embed_edges())
        }
        None => None,
    };
    let n_edges = edges.n_edges() + edges.n_embed_edges() + edges.n_unembed_edges();
    let summary = ScoresSummary {
        format: crate::formats::scores_json::FORMAT.into(),
        version: crate::formats::scores_json::VERSION,
        n_seqs,
        n_tokens: stats.n_tokens,
        keep: cfg.keep,
        top_c: cfg.top_c,
        n_edges,
        n_connections,
        normalization: "mean over tokens of the edge's signed term in the downstream pre-activation".into(),
        tie_order: "|score| descending, then upstream module (suite order), then upstream feature".into(),
        acts: cfg.acts.clone(),
        suite: cfg.suite.clone(),
    };
    summary.write(&dir.join("scores.json"))?;
    Ok(Some(Scored { n_tokens: stats.n_tokens, n_edges, n_connections }))
}
