//! Wiring a suite for a model: which upstream modules and features feed each downstream
//! module ([`Plan`], built once per connection set), the index every sparse kernel and the
//! engine walk ([`EdgeIndex`]: slots per downstream feature, and the reverse adjacency), and the
//! pass options.

use std::sync::Arc;

use candle_core::{Device, Tensor};

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

/// The wiring of one downstream module: for each of its `n_down` features, `width` slots
/// holding a column of X (or [`EMPTY`]), plus the reverse adjacency.
#[derive(Debug, Clone)]
pub struct EdgeIndex {
    pub n_down: usize,
    pub width: usize,
    /// Columns of X (`n_cols` of them: |U| · F).
    pub n_cols: usize,
    /// `slot_col[i·width + c]`: X column of slot (i, c), or EMPTY.
    pub slot_col: Vec<u32>,
    /// CSR: slots reading column m are `rev_slots[rev_ptr[m]..rev_ptr[m+1]]`.
    pub rev_ptr: Vec<u32>,
    pub rev_slots: Vec<u32>,
    /// The downstream feature of each entry of `rev_slots` (`slot / width`, kept so that the
    /// per-edge loops do no division).
    pub rev_down: Vec<u32>,
}

/// Marks an unused slot.
pub const EMPTY: u32 = u32::MAX;

impl EdgeIndex {
    /// Build from per-feature column lists (each at most `width` long).
    pub fn new(cols: &[Vec<u32>], width: usize, n_cols: usize) -> EdgeIndex {
        let n_down = cols.len();
        let mut slot_col = vec![EMPTY; n_down * width];
        let mut counts = vec![0u32; n_cols + 1];
        for (i, cs) in cols.iter().enumerate() {
            for (c, &m) in cs.iter().enumerate() {
                slot_col[i * width + c] = m;
                counts[m as usize + 1] += 1;
            }
        }
        for m in 0..n_cols {
            counts[m + 1] += counts[m];
        }
        let mut fill = counts.clone();
        let mut rev_slots = vec![0u32; counts[n_cols] as usize];
        for (slot, &m) in slot_col.iter().enumerate() {
            if m != EMPTY {
                rev_slots[fill[m as usize] as usize] = slot as u32;
                fill[m as usize] += 1;
            }
        }
        let rev_down = rev_slots.iter().map(|&slot| slot / width as u32).collect();
        EdgeIndex { n_down, width, n_cols, slot_col, rev_ptr: counts, rev_slots, rev_down }
    }

    /// The slot columns with EMPTY replaced by 0 (for gathers; those slots get zero weight
    /// gradient because no X column points at them).
    pub fn gather_cols(&self) -> Vec<u32> {
        self.slot_col.iter().map(|&m| if m == EMPTY { 0 } else { m }).collect()
    }

    /// Per-slot values `(slots, h)` re-laid in column order: entry `j` of `rev_slots` gets
    /// slot `rev_slots[j]`'s `h` values (so the edges of one column are contiguous).
    pub(crate) fn to_col_order(&self, w: &[f32], h: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.rev_slots.len() * h];
        out.chunks_mut(h)
            .zip(&self.rev_slots)
            .for_each(|(o, &slot)| o.copy_from_slice(&w[slot as usize * h..(slot as usize + 1) * h]));
        out
    }

    /// The inverse of [`to_col_order`](Self::to_col_order) (empty slots get zeros).
    pub(crate) fn to_slot_order(&self, w_col: &[f32], h: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.slot_col.len() * h];
        w_col
            .chunks(h)
            .zip(&self.rev_slots)
            .for_each(|(v, &slot)| out[slot as usize * h..(slot as usize + 1) * h].copy_from_slice(v));
        out
    }

    /// The entries of column `m` in column order (indices into `rev_slots`, `rev_down`).
    pub(crate) fn col_range(&self, m: usize) -> std::ops::Range<usize> {
        self.rev_ptr[m] as usize..self.rev_ptr[m + 1] as usize
    }

    /// The edges reading column `m`: `(slot, downstream feature)`.
    pub(crate) fn edges(&self, m: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let r = self.rev_ptr[m] as usize..self.rev_ptr[m + 1] as usize;
        self.rev_slots[r.clone()].iter().zip(&self.rev_down[r]).map(|(&slot, &i)| (slot as usize, i as usize))
    }
}
