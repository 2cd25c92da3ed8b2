//! Pruning a graph to what matters for its logits, as circuit-tracer's `prune_graph` does
//! (docs/MATH.md, "Attribution graphs"):
//! 1. `Â` = |link weights| with each target's incoming weights normalised to sum 1 (at least
//!    1e-10); a node's influence is `w (Â + Â² + …)` at the node, with `w` the logit nodes'
//!    probabilities (computed in one sweep from the logits down: the graph is a DAG in node
//!    order).
//! 2. Keep the most influential nodes up to `node_threshold` of the total influence; tokens
//!    and logits always.
//! 3. On the links among kept nodes, renormalised, a link's score is `Â[t, s]·(w + influence)[t]`;
//!    keep the best links up to `edge_threshold` of the total score.
//! 4. Drop, repeatedly, features left without a kept incoming or outgoing link.
//!
//! Node `influence` in the graph file is circuit-tracer's: the cumulative share of the total
//! influence up to and including the node in decreasing order (smaller = more influential).

use super::{Graph, Link, NodeKind};

/// What pruning keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Pruned {
    pub node_keep: Vec<bool>,
    pub link_keep: Vec<bool>,
    /// Each node's influence on the logits (step 1).
    pub influence: Vec<f64>,
    /// Each node's cumulative share of the influence, in decreasing order of influence.
    pub cumulative: Vec<f64>,
}

/// `Σ_{k≥1} w Âᵏ` per node over the links whose `keep` is set (all when `None`), with `Â` the
/// row-normalised absolute weights (rows = targets). Links must go from lower to higher index.
pub fn influence(n_nodes: usize, links: &[Link], keep: Option<&[bool]>, w: &[f64]) -> Vec<f64> {
    let kept = |k: usize| keep.is_none_or(|m| m[k]);
    let mut row_sum = vec![0f64; n_nodes];
    for (_, l) in links.iter().enumerate().filter(|(k, _)| kept(*k)) {
        row_sum[l.target] += l.weight.abs();
    }
    // Outgoing links per source in link order, to sweep from the last node down: one array
    // by source (counts, offsets, then the links), not a growing list per node.
    let mut start = vec![0usize; n_nodes + 1];
    for (_, l) in links.iter().enumerate().filter(|(k, _)| kept(*k)) {
        start[l.source + 1] += 1;
    }
    for i in 0..n_nodes {
        start[i + 1] += start[i];
    }
    let mut next = start.clone();
    let mut out_of = vec![0usize; start[n_nodes]];
    for (k, l) in links.iter().enumerate().filter(|(k, _)| kept(*k)) {
        out_of[next[l.source]] = k;
        next[l.source] += 1;
    }
    // total[n] = w[n] + Σ_{links n→t} total[t]·Â[t, n]; influence = total − w.
    let mut total = w.to_vec();
    for n in (0..n_nodes).rev() {
        let add: f64 = out_of[start[n]..start[n + 1]]
            .iter()
            .map(|&k| {
                let l = &links[k];
                total[l.target] * l.weight.abs() / row_sum[l.target].max(1e-10)
            })
            .sum();
        total[n] += add;
    }
    total.iter().zip(w).map(|(t, w)| t - w).collect()
}

/// circuit-tracer's `find_threshold`: the score at which the sorted scores' cumulative share
/// first reaches `share`.
fn threshold(scores: &[f64], share: f64) -> f64 {
    let mut sorted: Vec<f64> = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = sorted.iter().sum();
    let mut cum = 0.0;
    for (i, &s) in sorted.iter().enumerate() {
        cum += s;
        if cum / total >= share || i + 1 == sorted.len() {
            return s;
        }
    }
    0.0
}

/// Each node's cumulative share of the total influence in decreasing order.
fn cumulative(influence: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..influence.len()).collect();
    order.sort_by(|&a, &b| influence[b].total_cmp(&influence[a]).then(a.cmp(&b)));
    let total: f64 = influence.iter().sum();
    let mut out = vec![0.0; influence.len()];
    let mut cum = 0.0;
    for i in order {
        cum += influence[i];
        out[i] = if total > 0.0 { cum / total } else { 0.0 };
    }
    out
}

/// Prune `graph` (thresholds in [0, 1]).
pub fn prune(graph: &Graph, node_threshold: f64, edge_threshold: f64) -> Pruned {
    let n = graph.nodes.len();
    let w: Vec<f64> =
        graph.nodes.iter().map(|nd| if let NodeKind::Logit { prob, .. } = nd.kind { prob } else { 0.0 }).collect();
    let is_feature = |i: usize| matches!(graph.nodes[i].kind, NodeKind::Feature { .. });
    let inf = influence(n, &graph.links, None, &w);
    let node_cut = threshold(&inf, node_threshold);
    let mut node_keep: Vec<bool> = (0..n).map(|i| !is_feature(i) || inf[i] >= node_cut).collect();
    let mut link_keep: Vec<bool> = graph.links.iter().map(|l| node_keep[l.source] && node_keep[l.target]).collect();
    // Link scores on the pruned graph.
    let inf2 = influence(n, &graph.links, Some(&link_keep), &w);
    let mut row_sum = vec![0f64; n];
    for (l, _) in graph.links.iter().zip(&link_keep).filter(|x| *x.1) {
        row_sum[l.target] += l.weight.abs();
    }
    let scores: Vec<f64> = graph
        .links
        .iter()
        .zip(&link_keep)
        .map(
            |(l, &k)| {
                if k {
                    l.weight.abs() / row_sum[l.target].max(1e-10) * (inf2[l.target] + w[l.target])
                } else {
                    0.0
                }
            },
        )
        .collect();
    let nonzero: Vec<f64> = scores.iter().copied().filter(|&x| x > 0.0).collect();
    let edge_cut = if nonzero.is_empty() { 0.0 } else { threshold(&nonzero, edge_threshold) };
    for (k, s) in scores.iter().enumerate() {
        link_keep[k] &= *s >= edge_cut && *s > 0.0;
    }
    // Features need a kept outgoing and a kept incoming link; repeat until nothing changes.
    loop {
        let (mut has_out, mut has_in) = (vec![false; n], vec![false; n]);
        for (l, _) in graph.links.iter().zip(&link_keep).filter(|x| *x.1) {
            has_out[l.source] = true;
            has_in[l.target] = true;
        }
        let mut changed = false;
        for i in 0..n {
            if is_feature(i) && node_keep[i] && !(has_out[i] && has_in[i]) {
                node_keep[i] = false;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        for (k, l) in graph.links.iter().enumerate() {
            link_keep[k] &= node_keep[l.source] && node_keep[l.target];
        }
    }
    Pruned { node_keep, link_keep, cumulative: cumulative(&inf), influence: inf }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrib::{Node, Terms};

    /// A random DAG of `n` nodes (links from lower to higher index).
    fn dag(n: usize, seed: u64) -> Vec<Link> {
        let mut rng = crate::util::rng::SplitMix(seed);
        let mut links = Vec::new();
        for t in 1..n {
            for s in 0..t {
                if rng.uniform() < 0.4 {
                    links.push(Link { source: s, target: t, weight: rng.uniform() * 2.0 - 1.0 });
                }
            }
        }
        links
    }

    #[test]
    fn influence_equals_the_power_series_of_the_normalised_matrix() {
        let n = 9;
        let links = dag(n, 3);
        // Dense oracle: Â (rows targets), influence = Σ_{k=1..n} w Âᵏ.
        let mut a = vec![vec![0f64; n]; n];
        for l in &links {
            a[l.target][l.source] += l.weight.abs();
        }
        for row in a.iter_mut() {
            let s: f64 = row.iter().sum::<f64>().max(1e-10);
            row.iter_mut().for_each(|x| *x /= s);
        }
        let w: Vec<f64> = (0..n).map(|i| if i >= n - 2 { 0.5 + 0.1 * i as f64 } else { 0.0 }).collect();
        let (mut cur, mut total) = (w.clone(), vec![0f64; n]);
        for _ in 0..n {
            let next: Vec<f64> = (0..n).map(|c| (0..n).map(|r| cur[r] * a[r][c]).sum()).collect();
            total.iter_mut().zip(&next).for_each(|(t, x)| *t += x);
            cur = next;
        }
        let got = influence(n, &links, None, &w);
        for (g, e) in got.iter().zip(&total) {
            assert!((g - e).abs() < 1e-12, "{got:?} vs {total:?}");
        }
        assert!(got.iter().any(|&x| x > 0.1), "a graph with influence: {got:?}");
    }

    #[test]
    fn pruning_keeps_the_paths_to_the_logits_and_drops_dangling_features() {
        // Tokens 0, 1; features 2 (strong path), 3 (weak), 4 (fed, but feeds nothing); logit 5.
        let node = |kind| Node { kind, pos: 0, activation: 1.0, pre: 1.0, terms: Terms::default() };
        let feat = |f| node(NodeKind::Feature { module: 0, feature: f });
        let graph = Graph {
            tokens: vec![0, 1],
            nodes: vec![
                node(NodeKind::Token { token: 0 }),
                node(NodeKind::Token { token: 1 }),
                feat(0),
                feat(1),
                feat(2),
                node(NodeKind::Logit { token: 7, prob: 0.9 }),
            ],
            links: vec![
                Link { source: 0, target: 2, weight: 3.0 },
                Link { source: 1, target: 3, weight: 0.01 },
                Link { source: 0, target: 4, weight: 1.0 },
                Link { source: 2, target: 5, weight: 5.0 },
                Link { source: 3, target: 5, weight: 0.01 },
                Link { source: 1, target: 5, weight: -1.0 },
            ],
            logit_coverage: 0.9,
        };
        let p = prune(&graph, 0.8, 0.98);
        assert_eq!(p.node_keep, vec![true, true, true, false, false, true]);
        assert!(p.link_keep[0] && p.link_keep[3] && !p.link_keep[1] && !p.link_keep[2] && !p.link_keep[4]);
        // Feature 4 reaches no logit: no influence; feature 2 carries most of it.
        assert_eq!(p.influence[4], 0.0);
        assert!(p.influence[2] > 0.8 * p.influence.iter().sum::<f64>() / 2.0);
        assert!(p.cumulative[2] < p.cumulative[3]);
        // Without pruning thresholds (1, 1) every node with a path survives.
        let all = prune(&graph, 1.0, 1.0);
        assert!(all.node_keep[3] && !all.node_keep[4]);
    }
}
