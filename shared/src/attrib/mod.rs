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

pub mod json;
pub mod prune;
pub mod run;
mod subset;

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::formats::connections::Connections;
use crate::formats::suite::Suite;
use crate::model::{Kind, Runtime};
use crate::pass::{PassOptions, PassOutput};
use crate::util::to_vec;
use subset::Subset;

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
/// from a lower index to a higher one.
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
}

/// Rows of a matrix on the host.
struct Rows {
    data: Vec<f32>,
    width: usize,
}

impl Rows {
    fn of(t: &Tensor) -> Result<Rows> {
        let width = t.dim(1)?;
        Ok(Rows { data: to_vec(t)?, width })
    }
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.width..(r + 1) * self.width]
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Per module, the features active anywhere in the sequence and their encoder rows and
/// decoder columns.
struct Active {
    ids: Vec<u32>,
    row_of: HashMap<u32, usize>,
    enc: Rows,
    dec: Rows,
    /// `dec` as a tensor (for products with model matrices).
    dec_t: Tensor,
    enc_t: Tensor,
}

/// A feature node by (module, position, feature).
pub type NodeKey = (usize, usize, u32);

/// The graph of `batch` (one sequence), whose pass `out` was computed with the same setup
/// (features from [`crate::pass::ValuePass`], as evaluate's).
pub fn attribute(setup: &Setup, batch: &Batch, out: &PassOutput, logits: LogitChoice) -> Result<Graph> {
    attribute_nodes(setup, batch, out, None, Some(logits))
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
/// and logit nodes only when `logits` is given. Every active feature is still a node.
pub fn attribute_nodes(
    setup: &Setup,
    batch: &Batch,
    out: &PassOutput,
    wanted: Option<&std::collections::HashSet<NodeKey>>,
    logits: Option<LogitChoice>,
) -> Result<Graph> {
    let (suite, rt) = (setup.suite, setup.rt);
    let (b, s, d) = batch.resid_pre0.dims3()?;
    if b != 1 {
        return Err(Error::Usage(format!("attribution reads one sequence, found a batch of {b}")));
    }
    let f = suite.n_features;
    let cpu = candle_core::Device::Cpu;
    let host = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&cpu)?.to_dtype(DType::F32)?) };
    let tokens: Vec<u32> = batch.tokens.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    let feats: Vec<Vec<f32>> = out.feats.iter().map(to_vec).collect::<Result<_>>()?;
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
        let ids: Vec<u32> = (0..f as u32)
            .filter(|&j| needed.as_ref().is_none_or(|n| n[m].contains(&j)))
            .filter(|&j| (0..s).any(|t| feats[m][t * f + j as usize] != 0.0))
            .collect();
        let idx = Tensor::new(ids.as_slice(), &cpu)?;
        let enc_t = host(ae.w_enc.as_tensor())?.index_select(&idx, 0)?.contiguous()?;
        let dec_t = host(ae.w_dec.as_tensor())?.index_select(&idx, 1)?.t()?.contiguous()?;
        let row_of = ids.iter().enumerate().map(|(r, &j)| (j, r)).collect();
        active.push(Active { enc: Rows::of(&enc_t)?, dec: Rows::of(&dec_t)?, ids, row_of, dec_t, enc_t });
    }
    let tok_idx = Tensor::new(tokens.as_slice(), &cpu)?;
    let w_e_rows = host(&rt.weights.w_e)?.index_select(&tok_idx, 0)?.contiguous()?; // (S, D)
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
    let mut node_of: Vec<HashMap<(usize, u32), usize>> = vec![HashMap::new(); suite.modules.len()];
    for m in 0..suite.modules.len() {
        for t in 0..s {
            for j in 0..f {
                let v = feats[m][t * f + j];
                if v != 0.0 {
                    node_of[m].insert((t, j as u32), nodes.len());
                    let kind = NodeKind::Feature { module: m, feature: j as u32 };
                    nodes.push(Node { kind, pos: t, activation: v as f64, pre: 0.0, terms: Terms::default() });
                }
            }
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
        if node_of[dm].keys().all(|&(q, i)| skip(q, i)) {
            continue;
        }
        match module.kind {
            Kind::Mlp => {
                let s2 = to_vec(&batch.ln2_scale[l])?;
                // Edge weights E_i · W_dec^u[:, j], per distinct feature.
                let mut weights: HashMap<u32, Vec<(usize, u32, f64)>> = HashMap::new();
                for (&(q, i), &n) in sorted(&node_of[dm]).iter().filter(|e| !skip(e.0 .0, e.0 .1)) {
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
                            let weight = w * feats[u][q * f + j as usize] as f64 / sc;
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
                let mine = wanted.map(|_| {
                    Subset::of(node_of[dm].keys().filter(|&&(q, i)| !skip(q, i)).map(|&(_, i)| i), &act.row_of)
                });
                let ev_t = match &mine {
                    Some(sub) => sub.select(&act.enc_t)?,
                    None => act.enc_t.clone(),
                }
                .matmul(&w_o.t()?)?;
                let ev_row = |i: u32| mine.as_ref().map_or_else(|| act.row_of[&i], |sub| sub.row_of[&i]);
                let ev = Rows::of(&ev_t)?;
                let dv: Vec<Option<(Rows, HashMap<u32, usize>)>> = (0..suite.modules.len())
                    .map(|u| {
                        if !ups.contains(&u) {
                            return Ok(None);
                        }
                        let (dec, row_of) = match &mine {
                            Some(sub) => {
                                let read = sub.ids.iter().flat_map(|&i| sources(i)).filter(|&(uu, _)| uu == u);
                                let up = Subset::of(read.map(|(_, j)| j), &active[u].row_of);
                                if up.ids.is_empty() {
                                    return Ok(Some((Rows { data: Vec::new(), width: h * dh }, HashMap::new())));
                                }
                                (up.select(&active[u].dec_t)?, up.row_of)
                            }
                            None => (active[u].dec_t.clone(), active[u].row_of.clone()),
                        };
                        Ok(Some((Rows::of(&dec.matmul(&w_v)?)?, row_of)))
                    })
                    .collect::<Result<_>>()?;
                // Per head, every active feature's products with every position's token and
                // positional values: (H, n, S), as batched products.
                let n_act = ev_t.dim(0)?;
                let heads = |x: &Tensor, rows: usize| -> Result<Tensor> {
                    Ok(x.reshape((rows, h, dh))?.transpose(0, 1)?.contiguous()?)
                };
                let evh = heads(&ev_t, n_act)?;
                let by_pos = |x: &Tensor| -> Result<Vec<f32>> {
                    to_vec(&evh.matmul(&heads(&x.matmul(&w_v)?, s)?.transpose(1, 2)?.contiguous()?)?)
                };
                let tok_h = by_pos(&w_e_rows)?;
                let pos_h = by_pos(&Tensor::new(pos_rows.data.as_slice(), &cpu)?.reshape((s, d))?)?;
                let mix_at = |v: &[f32], r: usize, q: usize, p: usize| -> f64 {
                    (0..h).map(|hh| p_at(hh, q, p) * v[(hh * n_act + r) * s + p] as f64).sum()
                };
                let ubv = Rows::of(&Tensor::new(ub.as_slice(), &cpu)?.reshape((1, d))?.matmul(&w_v)?)?;
                let per_head = |a: &[f32], b: &[f32]| -> Vec<f64> {
                    (0..h).map(|hh| dot(&a[hh * dh..(hh + 1) * dh], &b[hh * dh..(hh + 1) * dh])).collect()
                };
                let mix = |w: &[f64], q: usize, p: usize| -> f64 { (0..h).map(|hh| p_at(hh, q, p) * w[hh]).sum() };
                let mut weights: HashMap<u32, Vec<(usize, u32, Vec<f64>)>> = HashMap::new();
                for (&(q, i), &n) in sorted(&node_of[dm]).iter().filter(|e| !skip(e.0 .0, e.0 .1)) {
                    let r = ev_row(i);
                    let (e, evi) = (act.enc.row(act.row_of[&i]), ev.row(r));
                    let ws = weights.entry(i).or_insert_with(|| {
                        sources(i)
                            .into_iter()
                            .filter_map(|(u, j)| {
                                let (rows, row_of) = dv[u].as_ref()?;
                                row_of.get(&j).map(|&ru| (u, j, per_head(evi, rows.row(ru))))
                            })
                            .collect()
                    });
                    let mut sum = 0.0;
                    let mut position = 0.0;
                    let mut consistent_ub = 0.0;
                    let ubh = per_head(evi, ubv.row(0));
                    for p in 0..=q {
                        let sc = s1[p] as f64;
                        for (u, j, w) in ws.iter() {
                            if let Some(&src) = node_of[*u].get(&(p, *j)) {
                                let weight = mix(w, q, p) * feats[*u][p * f + *j as usize] as f64 / sc;
                                links.push(Link { source: src, target: n, weight });
                                sum += weight;
                            }
                        }
                        if embeds(i, tokens[p]) {
                            let weight = mix_at(&tok_h, r, q, p) / sc;
                            links.push(Link { source: p, target: n, weight });
                            sum += weight;
                        }
                        position += mix_at(&pos_h, r, q, p) / sc;
                        consistent_ub += mix(&ubh, q, p) / sc;
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
            logit_part(setup, batch, out, &active, &node_of, &feats, choice, &ends)?
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

/// A node map's entries by (position, feature), so that links come out in a stable order.
fn sorted(map: &HashMap<(usize, u32), usize>) -> Vec<(&(usize, u32), &usize)> {
    let mut v: Vec<_> = map.iter().collect();
    v.sort_unstable_by_key(|e| *e.0);
    v
}

type LogitPart = (Vec<Node>, Vec<Vec<(usize, f64)>>, f64);

/// What the logits read besides features: the last position's token row `W_E[tok]` and
/// positional part `r0 − W_E[tok]`, and every module's `b_dec`.
struct Ends<'a> {
    token: &'a [f32],
    position: &'a [f32],
    b_dec: &'a [Vec<f32>],
}

/// The logit nodes of the last position and their incoming links (docs/MATH.md, "Embed and
/// unembed connections": with unembed edges a token reads only its connected features; the
/// scale is LNPre's of the whole spliced residual).
#[allow(clippy::too_many_arguments)]
fn logit_part(
    setup: &Setup,
    batch: &Batch,
    out: &PassOutput,
    active: &[Active],
    node_of: &[HashMap<(usize, u32), usize>],
    feats: &[Vec<f32>],
    choice: LogitChoice,
    ends: &Ends,
) -> Result<LogitPart> {
    let (suite, rt) = (setup.suite, setup.rt);
    let cpu = candle_core::Device::Cpu;
    let (_, s, d) = batch.resid_pre0.dims3()?;
    let f = suite.n_features;
    let t = s - 1;
    let resid = to_vec(&crate::pass::objective::spliced_resid(batch, out)?.reshape((s, d))?.narrow(0, t, 1)?)?;
    let mean = resid.iter().map(|&x| x as f64).sum::<f64>() / d as f64;
    let var = resid.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / d as f64;
    let scale = (var + rt.cfg.ln_eps).sqrt();
    let w_u = rt.weights.w_u.to_device(&cpu)?.to_dtype(DType::F32)?;
    let vocab = w_u.dim(1)?;
    let b_u = to_vec(&rt.weights.b_u)?;
    let mut ub = vec![0f32; d];
    for b in ends.b_dec {
        ub.iter_mut().zip(b).for_each(|(a, &x)| *a += x);
    }
    let times_wu = |v: &[f32]| -> Result<Vec<f32>> { to_vec(&Tensor::new(v, &cpu)?.reshape((1, d))?.matmul(&w_u)?) };
    let (tok_l, pos_l, ub_l) = (times_wu(ends.token)?, times_wu(ends.position)?, times_wu(&ub)?);
    // Features active at the last position and their rows W_dec[:, j]ᵀ W_U.
    let unembed = setup.conns.map(|c| &c.unembed).filter(|u| !u.is_empty());
    let mut reads: Vec<(usize, usize, f64, Vec<f32>)> = Vec::new(); // (module, node, value, row over V)
    let mut readers: HashMap<(usize, u32), usize> = HashMap::new();
    for (m, a) in active.iter().enumerate() {
        let here: Vec<usize> = (0..a.ids.len()).filter(|&r| feats[m][t * f + a.ids[r] as usize] != 0.0).collect();
        if here.is_empty() {
            continue;
        }
        let idx = Tensor::new(here.iter().map(|&r| r as u32).collect::<Vec<_>>().as_slice(), &cpu)?;
        let rows = Rows::of(&a.dec_t.index_select(&idx, 0)?.matmul(&w_u)?)?;
        for (k, &r) in here.iter().enumerate() {
            let j = a.ids[r];
            readers.insert((m, j), reads.len());
            reads.push((m, node_of[m][&(t, j)], feats[m][t * f + j as usize] as f64, rows.row(k).to_vec()));
        }
    }
    // Which features token v reads.
    let reads_of = |v: usize| -> Vec<usize> {
        match unembed {
            Some(u) => u
                .get(v)
                .map_or(Vec::new(), |es| es.iter().filter_map(|e| readers.get(&(e.up, e.feature)).copied()).collect()),
            None => (0..reads.len()).collect(),
        }
    };
    let logit = |v: usize| -> f64 {
        let feats: f64 = reads_of(v).iter().map(|&k| reads[k].2 * reads[k].3[v] as f64).sum();
        (tok_l[v] as f64 + pos_l[v] as f64 + ub_l[v] as f64 + feats) / scale + b_u[v] as f64
    };
    let all: Vec<f64> = (0..vocab).map(logit).collect();
    let max = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = all.iter().map(|&x| (x - max).exp()).sum();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| all[b].total_cmp(&all[a]).then(a.cmp(&b)));
    let (mut nodes, mut links, mut covered) = (Vec::new(), Vec::new(), 0.0);
    for &v in order.iter().take(choice.max.max(1)) {
        let prob = (all[v] - max).exp() / z;
        let mut incoming = vec![(t, tok_l[v] as f64 / scale)];
        incoming.extend(reads_of(v).into_iter().map(|k| (reads[k].1, reads[k].2 * reads[k].3[v] as f64 / scale)));
        let terms =
            Terms { bias: b_u[v] as f64, upstream_bias: ub_l[v] as f64 / scale, position: pos_l[v] as f64 / scale };
        nodes.push(Node {
            kind: NodeKind::Logit { token: v as u32, prob },
            pos: t,
            activation: all[v],
            pre: all[v],
            terms,
        });
        links.push(incoming);
        covered += prob;
        if covered >= choice.cumulative {
            break;
        }
    }
    Ok((nodes, links, covered))
}
