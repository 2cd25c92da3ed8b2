//! "Why it fired here": for each top context of each feature, the exact terms of its
//! pre-activation at that position, as an attribution graph writes them (docs/MATH.md,
//! "Attribution graphs"): the largest links (an upstream feature at a position, or a token's
//! embedding), the sum of the other links, and the node's own terms (bias, upstream decoder
//! biases, position). They add up to the pre-activation. Computed from the features of the
//! sequences that hold top contexts (kept by the statistics pass, [`super::Browse::kept`], else
//! run through the pass again), with links only into the contexts' nodes and products only for
//! the features those links read.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::Device;
use rayon::prelude::*;

use super::{Browse, BrowseConfig};
use crate::attrib::{attribute_nodes, sequence_output, NodeKey, NodeKind, Products, SeqFeats, Setup};
use crate::error::Result;
use crate::formats::cache::CacheReader;
use crate::formats::connections::Connections;
use crate::inputs::Inputs;
use crate::pass::{PassOutput, ValuePass};

/// Where a term comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source {
    Feature { module: usize, feature: u32, pos: usize },
    Token { token: u32, pos: usize },
}

/// The decomposition of one activation.
#[derive(Debug, Clone, PartialEq)]
pub struct Why {
    /// The largest links, by size.
    pub links: Vec<(Source, f64)>,
    /// The sum of the other links.
    pub rest: f64,
    /// Bias + upstream decoder biases + position.
    pub fixed: f64,
    pub pre: f64,
}

/// Per module, feature and top context (in `browse`'s order), its decomposition, with the
/// `keep` largest links; `pass` is the value pass `browse` was collected with (`conns`' wiring).
pub fn explain(
    inputs: &Inputs,
    conns: Option<&Connections>,
    pass: &ValuePass,
    browse: &Browse,
    cfg: &BrowseConfig,
    keep: usize,
    device: &Device,
) -> Result<Vec<Vec<Vec<Option<Why>>>>> {
    let suite = &inputs.suite;
    let mut wanted: BTreeMap<usize, HashSet<NodeKey>> = BTreeMap::new();
    for (m, feats) in browse.stats.iter().enumerate() {
        for (j, fs) in feats.iter().enumerate() {
            for c in &fs.top {
                wanted.entry(c.seq as usize).or_default().insert((m, c.pos as usize, j as u32));
            }
        }
    }
    let rt = &inputs.model.runtime;
    // The parameter and product rows the contexts read are formed once for all of them, in as
    // much memory again as the kept features may take.
    let products = Products::kept(cfg.keep_entries.saturating_mul(8));
    let setup = Setup {
        suite,
        rt,
        conns,
        parallel: inputs.parallel(),
        opts: cfg.pass,
        max_links: usize::MAX,
        products: &products,
    };
    let mut reader = CacheReader::by_sequence(inputs.cache(), device);
    let seqs: Vec<usize> = wanted.keys().copied().collect();
    type Found = Vec<((usize, u32, usize, usize), Why)>;
    let explain_one = |batch: &crate::data::Batch, out: &PassOutput, feats: &SeqFeats, seq: usize| -> Result<Found> {
        let want = &wanted[&seq];
        let mut found = Vec::new();
        let graph = attribute_nodes(&setup, batch, out, feats, Some(want), None)?;
        // Each node's incoming links are pushed together.
        let incoming: HashMap<usize, &[crate::attrib::Link]> =
            graph.links.chunk_by(|a, b| a.target == b.target).map(|run| (run[0].target, run)).collect();
        debug_assert_eq!(incoming.len(), graph.links.chunk_by(|a, b| a.target == b.target).count());
        for (n, node) in graph.nodes.iter().enumerate() {
            let NodeKind::Feature { module, feature } = node.kind else { continue };
            if !want.contains(&(module, node.pos, feature)) {
                continue;
            }
            let mut links: Vec<(usize, f64)> =
                incoming.get(&n).map_or(Vec::new(), |run| run.iter().map(|l| (l.source, l.weight)).collect());
            links.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
            let rest = links.iter().skip(keep).map(|l| l.1).sum();
            let source = |src: usize| match graph.nodes[src].kind {
                NodeKind::Feature { module, feature } => Source::Feature { module, feature, pos: graph.nodes[src].pos },
                NodeKind::Token { token } => Source::Token { token, pos: graph.nodes[src].pos },
                NodeKind::Logit { .. } => unreachable!("logits feed nothing"),
            };
            let top = links.iter().take(keep).map(|&(src, w)| (source(src), w)).collect();
            let why = Why { links: top, rest, fixed: node.terms.sum(), pre: node.pre };
            found.push(((module, feature, seq, node.pos), why));
        }
        Ok(found)
    };
    let mut found: HashMap<(usize, u32, usize, usize), Why> = HashMap::new();
    // Sequences whose features the statistics pass kept are not run again.
    let (stored, again): (Vec<usize>, Vec<usize>) = seqs.iter().partition(|s| browse.kept.contains_key(s));
    let f = suite.n_features;
    // On the CPU a batch's sequences are explained side by side (most of a graph's work is
    // per-link arithmetic on one thread; at most one graph per thread is alive at once); each
    // sequence's result does not depend on which ran first. On a GPU one after the other, on
    // the thread that holds the device.
    let side_by_side = device.is_cpu();
    let mut gather = |n: usize, one: &(dyn Fn(usize) -> Result<Found> + Sync)| -> Result<()> {
        let parts: Vec<Result<Found>> =
            if side_by_side { (0..n).into_par_iter().map(one).collect() } else { (0..n).map(one).collect() };
        for part in parts {
            found.extend(part?);
        }
        Ok(())
    };
    for chunk in stored.chunks(cfg.batch_size.max(1)) {
        let batch = reader.batch(chunk)?;
        let none = PassOutput { feats: Vec::new(), recon: Vec::new(), pre: Vec::new() };
        gather(chunk.len(), &|i| {
            let seq = chunk[i];
            explain_one(&batch.narrow(i, 1)?, &none, &SeqFeats::of_flat(&browse.kept[&seq], f), seq)
        })?;
    }
    for chunk in again.chunks(cfg.batch_size.max(1)) {
        let batch = reader.batch(chunk)?;
        let out = pass.run(&batch)?;
        let s = batch.tokens.dim(1)?;
        gather(chunk.len(), &|i| {
            let out = sequence_output(&out, i, s)?;
            explain_one(&batch.narrow(i, 1)?, &out, &SeqFeats::of_output(&out)?, chunk[i])
        })?;
    }
    Ok(browse
        .stats
        .iter()
        .enumerate()
        .map(|(m, feats)| {
            feats
                .iter()
                .enumerate()
                .map(|(j, fs)| {
                    fs.top.iter().map(|c| found.remove(&(m, j as u32, c.seq as usize, c.pos as usize))).collect()
                })
                .collect()
        })
        .collect())
}
