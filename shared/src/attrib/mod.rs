//! Exact attribution graphs of one sequence through a suite's pruned pass (docs/MATH.md,
//! "Attribution graphs"). Every term of every active feature's pre-activation is a link from
//! the node that produced it: an upstream feature at a position (mlp targets read the same
//! position, attention targets every key position, mixed by the frozen pattern), or the token
//! embedding at a position (through an embed edge, or the dense embedding term when the module
//! reads the whole embedding). What depends on no node is kept on the node: its own bias
//! (`b_enc − E·b_dec`, plus `b_O·E` for attention), the upstream decoder biases, and the
//! positional embedding. Links plus those terms equal the pass's pre-activation; logits of the
//! last position decompose the same way over the features active there.
//!
//! [`prune`] keeps the part of the graph that matters for the logits, as circuit-tracer does.

mod feats;
pub mod json;
mod logits;
mod memo;
pub mod prune;
mod rows;
pub mod run;

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::formats::connections::Connections;
use crate::formats::suite::Suite;
use crate::model::{Kind, Runtime};
use crate::pass::{PassOptions, PassOutput};
use crate::util::to_vec;
pub use feats::SeqFeats;
use logits::{logit_part, Ends};
use memo::Key;
pub use memo::Products;
use rows::{dot, head_dots, Rows};

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NodeKind {
    /// The embedding of the prompt's token at `pos`.
    Token { token: u32 },
    /// Feature `feature` of module `module` (suite order).
    Feature { module: usize, feature: u32 },
    /// The logit of vocabulary item `token` at the last position, with its probability.
    Logit { token: u32, prob: f64 },
}

/// The parts of a node's value that no node produces.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Terms {
    /// Feature: `b_enc[i] − E_i·b_dec` (+ `b_O·E_i` for attention); logit: `b_U[v]`.
    pub bias: f64,
    /// The decoder biases of the modules before it (all of them for a logit), through the
    /// same path as the features' edges.
    pub upstream_bias: f64,
    /// The positional embedding's part of the layer-0 residual (0 for rotary models).
    pub position: f64,
}

impl Terms {
    pub fn sum(&self) -> f64 {
        self.bias + self.upstream_bias + self.position
    }
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub pos: usize,
    /// Feature: its activation from the pass (after ReLU and top-k); token: 1; logit: the logit.
    pub activation: f64,
    /// Feature: its pre-activation (links + terms); logit: the logit; token: 1.
    pub pre: f64,
    pub terms: Terms,
}

/// One term of a node's pre-activation: what `source` adds to `target`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub source: usize,
    pub target: usize,
    pub weight: f64,
}

/// A sequence's graph. Nodes are in topological order: tokens by position, then features by
/// module (suite order), position and feature, then logits by probability; every link goes
/// from a lower index to a higher one, and each node's incoming links are contiguous.
#[derive(Debug, Clone)]
pub struct Graph {
    pub tokens: Vec<u32>,
    pub nodes: Vec<Node>,
    pub links: Vec<Link>,
    /// How much probability the logit nodes cover.
    pub logit_coverage: f64,
}

impl Graph {
    /// Index of the first logit node.
    pub fn first_logit(&self) -> usize {
        self.nodes.iter().position(|n| matches!(n.kind, NodeKind::Logit { .. })).unwrap_or(self.nodes.len())
    }
}

/// Which logits become nodes: the most probable, until `cumulative` probability or `max` nodes.
#[derive(Debug, Clone, Copy)]
pub struct LogitChoice {
    pub cumulative: f64,
    pub max: usize,
}

impl Default for LogitChoice {
    fn default() -> Self {
        LogitChoice { cumulative: 0.95, max: 10 }
    }
}

/// Everything the decomposition reads.
pub struct Setup<'a> {
    pub suite: &'a Suite,
    pub rt: &'a Runtime,
    /// The connection set (`None`: every preceding feature).
    pub conns: Option<&'a Connections>,
    pub parallel: bool,
    pub opts: PassOptions,
    /// Refuse graphs with more links than this (all connections at real sizes can have billions).
    pub max_links: usize,
    /// Where the sequence-independent product rows come from (kept across graphs or not).
    pub products: &'a Products,
}

/// Per module, the features active anywhere in the sequence and their encoder rows and
/// decoder columns.
struct Active {
    ids: Vec<u32>,
    row_of: HashMap<u32, usize>,
    enc: Rows,
    dec: Rows,
}

/// A feature node by (module, position, feature).
pub type NodeKey = (usize, usize, u32);

/// The graph of `batch` (one sequence), whose pass `out` was computed with the same setup
/// (features from [`crate::pass::ValuePass`], as evaluate's).
pub fn attribute(setup: &Setup, batch: &Batch, out: &PassOutput, logits: LogitChoice) -> Result<Graph> {
    attribute_nodes(setup, batch, out, &SeqFeats::of_output(out)?, None, Some(logits))
}

/// Sequence `i` of a batch's pass output (`s` positions per sequence).
pub fn sequence_output(out: &PassOutput, i: usize, s: usize) -> Result<PassOutput> {
    let rows = |v: &[Tensor]| -> Result<Vec<Tensor>> { v.iter().map(|t| Ok(t.narrow(0, i * s, s)?)).collect() };
    Ok(PassOutput {
        feats: rows(&out.feats)?,
        recon: out.recon.iter().map(|t| Ok(t.narrow(0, i, 1)?)).collect::<Result<_>>()?,
        pre: rows(&out.pre)?,
    })
}

/// [`attribute`], with incoming links only for the feature nodes in `wanted` (all when `None`)
/// and logit nodes only when `logits` is given. Every active feature is still a node. `feats`
/// are `out`'s features (`out` itself is read only for logits).
pub fn attribute_nodes(
    setup: &Setup,
    batch: &Batch,
    out: &PassOutput,
    feats: &SeqFeats,
    wanted: Option<&std::collections::HashSet<NodeKey>>,
    logits: Option<LogitChoice>,
) -> Result<Graph> {
    let (suite, rt) = (setup.suite, setup.rt);
    let (b, s, d) = batch.resid_pre0.dims3()?;
    if b != 1 {
        return Err(Error::Usage(format!("attribution reads one sequence, found a batch of {b}")));
    }
    let cpu = candle_core::Device::Cpu;
    let host = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&cpu)?.to_dtype(DType::F32)?) };
    // Rows (dim 0) or columns (dim 1) `ids` of a matrix, selected where it is, on the host.
    let select = |t: &Tensor, ids: &[u32], dim: usize| -> Result<Tensor> {
        host(&t.index_select(&Tensor::new(ids, t.device())?, dim)?)
    };
    let tokens: Vec<u32> = batch.tokens.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    // With wanted nodes (and no logits), the parameters of the features their links read: the
    // wanted features and their connections' upstream features (all of them when every
    // connection is kept), not of every active one.
    let needed: Option<Vec<std::collections::HashSet<u32>>> = match (wanted, setup.conns) {
        (Some(w), Some(c)) if logits.is_none() => {
            let mut need = vec![std::collections::HashSet::new(); suite.modules.len()];
            for &(dm, _, i) in w {
                need[dm].insert(i);
                for e in &c.edges[dm][i as usize] {
                    if let Some(n) = need.get_mut(e.up) {
                        n.insert(e.feature);
                    }
                }
            }
            Some(need)
        }
        _ => None,
    };
    // Active features per module (those needed), with their parameters.
    let mut active = Vec::new();
    for (m, ae) in suite.aes.iter().enumerate() {
        let ids: Vec<u32> =
            feats.active(m).into_iter().filter(|j| needed.as_ref().is_none_or(|n| n[m].contains(j))).collect();
        let enc = setup.products.rows(Key::Enc(m), &ids, d, |ids| select(ae.w_enc.as_tensor(), ids, 0))?;
        let dec = setup
            .products
            .rows(Key::Dec(m), &ids, d, |ids| Ok(select(ae.w_dec.as_tensor(), ids, 1)?.t()?.contiguous()?))?;
        let row_of = ids.iter().enumerate().map(|(r, &j)| (j, r)).collect();
        active.push(Active { enc, dec, ids, row_of });
    }
    let w_e_rows = select(&rt.weights.w_e, &tokens, 0)?.contiguous()?; // (S, D)
    let r0 = host(&batch.resid_pre0)?.reshape((s, d))?;
    // The positional part: exactly what the pass adds besides the tokens. A module reading the
    // whole embedding reads the cached r0 = W_E[tok] + r_pos; one with embed edges reads r_pos.
    let pos_dense = (&r0 - &w_e_rows)?;
    let pos_edges = match &rt.weights.w_pos {
        Some(w) => host(&w.narrow(0, 0, s)?)?,
        None => Tensor::zeros((s, d), DType::F32, &cpu)?,
    };
    let (w_e, pos_dense_h, pos_edges_h) = (Rows::of(&w_e_rows)?, Rows::of(&pos_dense)?, Rows::of(&pos_edges)?);
    let b_dec: Vec<Vec<f32>> = suite.aes.iter().map(|ae| to_vec(ae.b_dec.as_tensor())).collect::<Result<_>>()?;
    let b_enc: Vec<Vec<f32>> = suite.aes.iter().map(|ae| to_vec(ae.b_enc.as_tensor())).collect::<Result<_>>()?;

    // Nodes: tokens, then features by module, position, feature.
    let mut nodes: Vec<Node> = tokens
        .iter()
        .enumerate()
        .map(|(p, &token)| Node {
            kind: NodeKind::Token { token },
            pos: p,
            activation: 1.0,
            pre: 1.0,
            terms: Terms::default(),
        })
        .collect();
    let mut node_of: Vec<NodeOf> = vec![NodeOf::default(); suite.modules.len()];
    // Module m's k-th value is node first[m] + k.
    let mut first = Vec::with_capacity(suite.modules.len());
    for (m, values) in feats.modules.iter().enumerate() {
        first.push(nodes.len());
        for &(t, j, v) in values {
            let t = t as usize;
            node_of[m].insert((t, j), nodes.len());
            let kind = NodeKind::Feature { module: m, feature: j };
            nodes.push(Node { kind, pos: t, activation: v as f64, pre: 0.0, terms: Terms::default() });
        }
    }
    // Per module, each feature's nodes with their positions, by position: an attention
    // target's links from feature j are its places up to the target's position.
    let mut places: Vec<rustc_hash::FxHashMap<u32, Vec<(usize, usize)>>> = vec![Default::default(); first.len()];
    for (m, values) in feats.modules.iter().enumerate() {
        for (k, &(t, j, _)) in values.iter().enumerate() {
            places[m].entry(j).or_default().push((t as usize, first[m] + k));
        }
    }
    let mut links = Vec::new();
    // Per downstream module: incoming links of each of its nodes.
    for (dm, module) in suite.modules.iter().enumerate() {
        let l = module.layer;
        let ups: Vec<usize> =
            (0..suite.modules.len()).filter(|&u| suite.modules[u].precedes(module, setup.parallel)).collect();
        let mut ub = vec![0f32; d];
        for &u in &ups {
            ub.iter_mut().zip(&b_dec[u]).for_each(|(a, &x)| *a += x);
        }
        let sparse_embed = setup.conns.is_some_and(|c| c.has_embed(dm));
        let pos_rows = if sparse_embed { &pos_edges_h } else { &pos_dense_h };
        let embeds = |i: u32, tok: u32| -> bool {
            !sparse_embed || setup.conns.is_some_and(|c| c.embed[dm][i as usize].iter().any(|e| e.token == tok))
        };
        // The upstream sources of feature i: (module, feature) pairs.
        let sources = |i: u32| -> Vec<(usize, u32)> {
            match setup.conns {
                Some(c) => c.edges[dm][i as usize].iter().map(|e| (e.up, e.feature)).collect(),
                None => ups.iter().flat_map(|&u| active[u].ids.iter().map(move |&j| (u, j))).collect(),
            }
        };
        let act = &active[dm];
        let skip = |q: usize, i: u32| wanted.is_some_and(|w| !w.contains(&(dm, q, i)));
        // The nodes whose links are wanted, by position, then feature: (position, feature, node).
        let targets: Vec<(usize, u32, usize)> = (feats.modules[dm].iter().enumerate())
            .map(|(k, &(q, i, _))| (q as usize, i, first[dm] + k))
            .filter(|&(q, i, _)| !skip(q, i))
            .collect();
        if targets.is_empty() {
            continue;
        }
        match module.kind {
            Kind::Mlp => {
                let s2 = to_vec(&batch.ln2_scale[l])?;
                // Edge weights E_i · W_dec^u[:, j], per distinct feature.
                let mut weights: HashMap<u32, Vec<(usize, u32, f64)>> = HashMap::new();
                for &(q, i, n) in &targets {
                    let e = act.enc.row(act.row_of[&i]);
                    let ws = weights.entry(i).or_insert_with(|| {
                        sources(i)
                            .into_iter()
                            .filter_map(|(u, j)| {
                                active[u].row_of.get(&j).map(|&r| (u, j, dot(e, active[u].dec.row(r))))
                            })
                            .collect()
                    });
                    let sc = s2[q] as f64;
                    let mut sum = 0.0;
                    for &(u, j, w) in ws.iter() {
                        if let Some(&src) = node_of[u].get(&(q, j)) {
                            let weight = w * nodes[src].activation / sc;
                            links.push(Link { source: src, target: n, weight });
                            sum += weight;
                        }
                    }
                    if embeds(i, tokens[q]) {
                        let weight = dot(e, w_e.row(q)) / sc;
                        links.push(Link { source: q, target: n, weight });
                        sum += weight;
                    }
                    let terms = Terms {
                        bias: b_enc[dm][i as usize] as f64 - dot(e, &b_dec[dm]),
                        upstream_bias: dot(e, &ub) / sc,
                        position: dot(e, pos_rows.row(q)) / sc,
                    };
                    nodes[n].pre = sum + terms.sum();
                    nodes[n].terms = terms;
                    if links.len() > setup.max_links {
                        return Err(too_many(setup.max_links));
                    }
                }
            }
            Kind::Attn => {
                let (h, dh) = (rt.cfg.n_heads, rt.cfg.d_head);
                let (w_v, w_o) = rt.flat_vo(l);
                let (w_v, w_o) = (host(w_v)?, host(w_o)?);
                let b_o = to_vec(&rt.weights.blocks[l].b_o)?;
                let s1 = to_vec(&batch.ln1_scale[l])?;
                let pat = to_vec(&batch.pattern[l])?; // (1, H, S, S)
                let p_at = |hh: usize, q: usize, p: usize| pat[(hh * s + q) * s + p] as f64;
                // ev = E W_Oᵀ per active feature; values through W_V of upstream decoders,
                // tokens, positions and the upstream bias; all (.., H·d_h). With `wanted`, only
                // for the wanted features and the upstream features their links read (a few
                // rows of each module's active ones, where view-features' why-it-fired pass
                // formed them all per sequence).
                let mine: Vec<u32> = match wanted {
                    Some(_) => {
                        let mut ids: Vec<u32> = targets.iter().map(|t| t.1).collect();
                        ids.sort_unstable();
                        ids.dedup();
                        ids
                    }
                    None => act.ids.clone(),
                };
                let w_enc = suite.aes[dm].w_enc.as_tensor();
                let ev = setup
                    .products
                    .rows(Key::EncWo(dm), &mine, h * dh, |ids| Ok(select(w_enc, ids, 0)?.matmul(&w_o.t()?)?))?;
                let ev_rows: HashMap<u32, usize> = mine.iter().enumerate().map(|(r, &i)| (i, r)).collect();
                let ev_row = |i: u32| ev_rows[&i];
                let dv: Vec<Option<(Rows, HashMap<u32, usize>)>> = (0..suite.modules.len())
                    .map(|u| {
                        if !ups.contains(&u) {
                            return Ok(None);
                        }
                        let read: Vec<u32> = match wanted {
                            Some(_) => {
                                let read = mine.iter().flat_map(|&i| sources(i)).filter(|&(uu, _)| uu == u);
                                let mut read: Vec<u32> =
                                    read.map(|(_, j)| j).filter(|j| active[u].row_of.contains_key(j)).collect();
                                read.sort_unstable();
                                read.dedup();
                                read
                            }
                            None => active[u].ids.clone(),
                        };
                        let row_of = read.iter().enumerate().map(|(r, &j)| (j, r)).collect();
                        if read.is_empty() {
                            return Ok(Some((Rows { data: Vec::new(), width: h * dh }, row_of)));
                        }
                        let w_dec = suite.aes[u].w_dec.as_tensor();
                        let form = |ids: &[u32]| Ok(select(w_dec, ids, 1)?.t()?.contiguous()?.matmul(&w_v)?);
                        Ok(Some((setup.products.rows(Key::DecWv(u, dm), &read, h * dh, form)?, row_of)))
                    })
                    .collect::<Result<_>>()?;
                // Per head, every active feature's products with every position's token and
                // positional values: (H, n, S), as batched products.
                let n_act = mine.len();
                let heads = |x: &Tensor, rows: usize| -> Result<Tensor> {
                    Ok(x.reshape((rows, h, dh))?.transpose(0, 1)?.contiguous()?)
                };
                let evh = heads(&ev.tensor(0..n_act)?, n_act)?;
                // `x W_V` of the S token rows, and of the S positional rows (kept by position where
                // they are the positional embedding's, the same in every sequence).
                let by_pos = |xv: Rows| -> Result<Vec<f32>> {
                    let xv = Tensor::from_vec(xv.data, (s, xv.width), &cpu)?;
                    to_vec(&evh.matmul(&heads(&xv, s)?.transpose(1, 2)?.contiguous()?)?)
                };
                let w_e = &rt.weights.w_e;
                let tok_v = setup
                    .products
                    .rows(Key::TokWv(dm), &tokens, h * dh, |ids| Ok(select(w_e, ids, 0)?.matmul(&w_v)?))?;
                let tok_h = by_pos(tok_v)?;
                let pos_v = match (&rt.weights.w_pos, sparse_embed) {
                    (Some(w_pos), true) => {
                        let at: Vec<u32> = (0..s as u32).collect();
                        setup
                            .products
                            .rows(Key::PosWv(dm), &at, h * dh, |ids| Ok(select(w_pos, ids, 0)?.matmul(&w_v)?))?
                    }
                    _ => Rows::of(&Tensor::new(pos_rows.data.as_slice(), &cpu)?.reshape((s, d))?.matmul(&w_v)?)?,
                };
                let pos_h = by_pos(pos_v)?;
                // Per position p ≤ q, values `v` of row r mixed by the heads' pattern at q (each
                // sum over heads in head order, from −0, as `Iterator::sum`).
                let mix_at = |v: &[f32], r: usize, q: usize, out: &mut [f64]| {
                    out[..=q].fill(-0.0);
                    for hh in 0..h {
                        let (pr, vr) = (&pat[(hh * s + q) * s..][..=q], &v[(hh * n_act + r) * s..][..=q]);
                        out.iter_mut().zip(pr.iter().zip(vr)).for_each(|(o, (&a, &b))| *o += a as f64 * b as f64);
                    }
                };
                let ubv = Rows::of(&Tensor::new(ub.as_slice(), &cpu)?.reshape((1, d))?.matmul(&w_v)?)?;
                // The pattern at q, by position then head.
                let (mut at_q, mut pq) = (usize::MAX, Vec::new());
                let mix = |w: &[f64], pq: &[f64], p: usize| -> f64 {
                    pq[p * h..(p + 1) * h].iter().zip(w).map(|(&a, &b)| a * b).sum()
                };
                let (mut tok_q, mut pos_q) = (vec![0f64; s], vec![0f64; s]);
                let mut weights: HashMap<u32, Vec<(usize, u32, Vec<f64>)>> = HashMap::new();
                // A target's links from features, as (position · sources + source, node).
                let mut hits: Vec<(usize, usize)> = Vec::new();
                for &(q, i, n) in &targets {
                    if at_q != q {
                        pq = (0..=q).flat_map(|p| (0..h).map(move |hh| p_at(hh, q, p))).collect();
                        at_q = q;
                    }
                    let r = ev_row(i);
                    let (e, evi) = (act.enc.row(act.row_of[&i]), ev.row(r));
                    let ws = weights.entry(i).or_insert_with(|| {
                        sources(i)
                            .into_iter()
                            .filter_map(|(u, j)| {
                                let (rows, row_of) = dv[u].as_ref()?;
                                row_of.get(&j).map(|&ru| (u, j, head_dots(evi, rows.row(ru), h)))
                            })
                            .collect()
                    });
                    let mut sum = 0.0;
                    let mut position = 0.0;
                    let mut consistent_ub = 0.0;
                    let ubh = head_dots(evi, ubv.row(0), h);
                    mix_at(&tok_h, r, q, &mut tok_q);
                    mix_at(&pos_h, r, q, &mut pos_q);
                    // The sources' places up to q, in the order of a scan by position, then
                    // source: each source's few places, not every position of every source.
                    let n_ws = ws.len();
                    hits.clear();
                    for (si, (u, j, _)) in ws.iter().enumerate() {
                        let at = places[*u].get(j).map_or(&[][..], |v| v.as_slice());
                        hits.extend(at.iter().take_while(|&&(p, _)| p <= q).map(|&(p, src)| (p * n_ws + si, src)));
                    }
                    hits.sort_unstable();
                    let mut hit = hits.iter().peekable();
                    for p in 0..=q {
                        let sc = s1[p] as f64;
                        while let Some(&(key, src)) = hit.next_if(|h| h.0 / n_ws == p) {
                            let weight = mix(&ws[key % n_ws].2, &pq, p) * nodes[src].activation / sc;
                            links.push(Link { source: src, target: n, weight });
                            sum += weight;
                        }
                        if embeds(i, tokens[p]) {
                            let weight = tok_q[p] / sc;
                            links.push(Link { source: p, target: n, weight });
                            sum += weight;
                        }
                        position += pos_q[p] / sc;
                        consistent_ub += mix(&ubh, &pq, p) / sc;
                    }
                    let upstream_bias = if setup.opts.consistent_attn_bias {
                        consistent_ub
                    } else if ups.is_empty() {
                        0.0
                    } else {
                        ubh.iter().sum::<f64>() / s1[q] as f64
                    };
                    let terms = Terms {
                        bias: b_enc[dm][i as usize] as f64 - dot(e, &b_dec[dm]) + dot(e, &b_o),
                        upstream_bias,
                        position,
                    };
                    nodes[n].pre = sum + terms.sum();
                    nodes[n].terms = terms;
                    if links.len() > setup.max_links {
                        return Err(too_many(setup.max_links));
                    }
                }
            }
        }
    }
    let (logit_nodes, logit_links, coverage) = match logits {
        Some(choice) => {
            // The last position's token and positional rows (the dense term the unembedding
            // reads), and every module's decoder bias.
            let t = s - 1;
            let ends = Ends { token: w_e.row(t), position: pos_dense_h.row(t), b_dec: &b_dec };
            logit_part(setup, batch, out, &active, &node_of, &nodes, choice, &ends)?
        }
        None => (Vec::new(), Vec::new(), 0.0),
    };
    let first_logit = nodes.len();
    for (k, node) in logit_nodes.into_iter().enumerate() {
        nodes.push(node);
        for &(src, weight) in &logit_links[k] {
            links.push(Link { source: src, target: first_logit + k, weight });
        }
    }
    Ok(Graph { tokens, nodes, links, logit_coverage: coverage })
}

fn too_many(max: usize) -> Error {
    Error::Usage(format!(
        "the graph has more than {max} links (--max-links; each takes 24 bytes before pruning): attribute through a \
         connection set (--connections FILE), a shorter prompt, or raise --max-links"
    ))
}

/// A module's feature nodes by (position, feature).
type NodeOf = rustc_hash::FxHashMap<(usize, u32), usize>;
