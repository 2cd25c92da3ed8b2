//! Wiring a suite for a model: which upstream modules and features feed each downstream
//! module ([`Plan`], built once per connection set), and the pass options.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::kernels::{EdgeIndex, EMPTY};
use crate::error::{Error, Result};
use crate::formats::connections::Connections;
use crate::formats::suite::Suite;
use crate::sae::topk::check_topk_size;

/// Which upstream features feed each downstream feature.
#[derive(Debug, Clone, Copy)]
pub enum Wiring<'a> {
    /// Every preceding module's every feature (the reference's `connections=None`).
    All,
    /// Only the listed edges.
    Sparse(&'a Connections),
}

/// Options of the pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassOptions {
    /// Use the consistent attention b_dec term (mixed by the pattern with key-position
    /// scales) instead of the reference's query-position form (docs/MATH.md, "Pruned pass: attention targets").
    pub consistent_attn_bias: bool,
}

/// Per-downstream-module wiring, built once per connection set.
#[derive(Debug, Clone)]
pub struct DownPlan {
    /// Preceding modules (suite indices) in suite order.
    pub ups: Vec<usize>,
    /// Edge index over the concatenation of `ups`' features (Sparse wiring only).
    pub index: Option<Arc<EdgeIndex>>,
    /// `index.gather_cols()` as a tensor (F·C) u32.
    pub(crate) cols: Option<Tensor>,
    /// 1 for used slots, 0 for empty ones, `(F, C, 1)` (composed path).
    pub(crate) slot_mask: Option<Tensor>,
    /// Edges from the token embedding, when the connection set gives this module any (then
    /// the dense term reads only the positional part of `r0`).
    pub embed: Option<EmbedPlan>,
}

/// The embed edges of one downstream module (docs/MATH.md, "Embed and unembed connections"):
/// an edge index whose columns are the tokens the edges reference.
#[derive(Debug, Clone)]
pub struct EmbedPlan {
    /// Edge index over the referenced tokens: column m is token `tokens[m]`.
    pub index: Arc<EdgeIndex>,
    /// The referenced tokens, ascending.
    pub tokens: Vec<u32>,
    /// Token id -> its column, or EMPTY when no edge reads it (up to the largest referenced id).
    col_of: Vec<u32>,
    /// Composed path: each slot's token `(F·C_e)` (0 for empty slots) and column, and the
    /// slot mask `(F, C_e, 1)`.
    pub(crate) slot_tokens: Tensor,
    pub(crate) cols: Tensor,
    pub(crate) slot_mask: Tensor,
}

impl EmbedPlan {
    /// The column of `token`, if some edge reads it.
    pub fn col(&self, token: u32) -> Option<usize> {
        self.col_of.get(token as usize).filter(|&&c| c != EMPTY).map(|&c| c as usize)
    }

    fn new(lists: &[Vec<u32>], device: &Device) -> Result<EmbedPlan> {
        let mut tokens: Vec<u32> = lists.iter().flatten().copied().collect();
        tokens.sort_unstable();
        tokens.dedup();
        let mut col_of = vec![EMPTY; tokens.last().map_or(0, |&t| t as usize + 1)];
        for (m, &t) in tokens.iter().enumerate() {
            col_of[t as usize] = m as u32;
        }
        let cols: Vec<Vec<u32>> = lists.iter().map(|l| l.iter().map(|&t| col_of[t as usize]).collect()).collect();
        let width = cols.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let ix = EdgeIndex::new(&cols, width, tokens.len());
        let slot_tokens: Vec<u32> =
            ix.slot_col.iter().map(|&c| if c == EMPTY { 0 } else { tokens[c as usize] }).collect();
        let slot_tokens = Tensor::from_vec(slot_tokens, ix.slot_col.len(), device)?;
        let (gather, mask) = slot_tensors(&ix, device)?;
        Ok(EmbedPlan { index: Arc::new(ix), tokens, col_of, slot_tokens, cols: gather, slot_mask: mask })
    }
}

/// The unembed edges of a connection set (docs/MATH.md, "Embed and unembed connections"): an
/// edge index whose downstream "features" are output tokens `0..n_down` and whose columns are
/// every module's features (`m·F + j`).
#[derive(Debug, Clone)]
pub struct UnembedPlan {
    pub index: Arc<EdgeIndex>,
    /// Composed path: the slots' columns `(V_n·C_u)` and the slot mask `(V_n, C_u, 1)`.
    pub(crate) cols: Tensor,
    pub(crate) slot_mask: Tensor,
}

impl UnembedPlan {
    fn new(conns: &Connections, device: &Device) -> Result<UnembedPlan> {
        let f = conns.n_features as u32;
        let lists: Vec<Vec<u32>> =
            conns.unembed.iter().map(|es| es.iter().map(|e| e.up as u32 * f + e.feature).collect()).collect();
        let width = lists.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let ix = EdgeIndex::new(&lists, width, conns.modules.len() * conns.n_features);
        let (cols, mask) = slot_tensors(&ix, device)?;
        Ok(UnembedPlan { index: Arc::new(ix), cols, slot_mask: mask })
    }
}

/// An index's gather columns `(F·C)` and its slot mask `(F, C, 1)` (1 for used slots) as
/// tensors, for the composed path.
fn slot_tensors(ix: &EdgeIndex, device: &Device) -> Result<(Tensor, Tensor)> {
    let cols = Tensor::from_vec(ix.gather_cols(), ix.slot_col.len(), device)?;
    let mask: Vec<f32> = ix.slot_col.iter().map(|&c| if c == EMPTY { 0.0 } else { 1.0 }).collect();
    Ok((cols, Tensor::from_vec(mask, (ix.n_down, ix.width, 1), device)?))
}

/// A suite wired for a model: the plan of every module.
#[derive(Debug, Clone)]
pub struct Plan {
    downs: Vec<DownPlan>,
    /// Whether a connection set restricts the edges (else all connections).
    pub sparse: bool,
    /// Use composed candle ops instead of the CPU custom ops (any device; the default off the
    /// CPU).
    pub composed: bool,
    /// Edges into the unembedding, when the connection set gives any (then each output token
    /// reads only its connected features in the spliced CE).
    pub unembed: Option<UnembedPlan>,
}

impl Plan {
    /// Use the composed ops (the GPU path) on any device, e.g. to test them on the CPU.
    pub fn force_composed(&mut self, composed: bool) {
        self.composed = composed;
    }

    /// The wiring of module `d`.
    pub fn down(&self, d: usize) -> &DownPlan {
        &self.downs[d]
    }

    /// Wire `suite` for a model with (`parallel`) or without parallel blocks.
    pub fn new(suite: &Suite, wiring: Wiring, parallel: bool, device: &Device) -> Result<Plan> {
        let f = suite.n_features;
        check_topk_size(device, suite.k)?;
        let mut downs = Vec::new();
        for (d, dm) in suite.modules.iter().enumerate() {
            let ups: Vec<usize> =
                (0..suite.modules.len()).filter(|&u| suite.modules[u].precedes(dm, parallel)).collect();
            let embed = match wiring {
                Wiring::Sparse(conns) if conns.has_embed(d) => {
                    let lists: Vec<Vec<u32>> =
                        conns.embed[d].iter().map(|es| es.iter().map(|e| e.token).collect()).collect();
                    Some(EmbedPlan::new(&lists, device)?)
                }
                _ => None,
            };
            let index = match wiring {
                Wiring::All => (None, None, None),
                Wiring::Sparse(conns) => {
                    let pos = |u: usize| ups.iter().position(|&x| x == u);
                    let mut lists = Vec::with_capacity(f);
                    for edges in &conns.edges[d] {
                        let mut l = Vec::with_capacity(edges.len());
                        for e in edges {
                            let p = pos(e.up).ok_or_else(|| {
                                Error::Usage(format!(
                                    "edge {}:{} -> {dm} from a module that does not precede it",
                                    suite.modules[e.up], e.feature
                                ))
                            })?;
                            l.push((p * f) as u32 + e.feature);
                        }
                        lists.push(l);
                    }
                    let width = lists.iter().map(Vec::len).max().unwrap_or(0).max(1);
                    let ix = EdgeIndex::new(&lists, width, ups.len() * f);
                    let (cols, mask) = slot_tensors(&ix, device)?;
                    (Some(Arc::new(ix)), Some(cols), Some(mask))
                }
            };
            let (index, cols, slot_mask) = index;
            downs.push(DownPlan { ups, index, cols, slot_mask, embed });
        }
        let sparse = matches!(wiring, Wiring::Sparse(_));
        let unembed = match wiring {
            Wiring::Sparse(conns) if conns.n_unembed_edges() > 0 => Some(UnembedPlan::new(conns, device)?),
            _ => None,
        };
        Ok(Plan { downs, sparse, composed: !device.is_cpu(), unembed })
    }
}
