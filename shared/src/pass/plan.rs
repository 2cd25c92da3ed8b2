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
                    let cols = Tensor::from_vec(ix.gather_cols(), ix.slot_col.len(), device)?;
                    let mask: Vec<f32> = ix.slot_col.iter().map(|&c| if c == EMPTY { 0.0 } else { 1.0 }).collect();
                    let mask = Tensor::from_vec(mask, (f, width, 1), device)?;
                    (Some(Arc::new(ix)), Some(cols), Some(mask))
                }
            };
            let (index, cols, slot_mask) = index;
            downs.push(DownPlan { ups, index, cols, slot_mask });
        }
        let sparse = matches!(wiring, Wiring::Sparse(_));
        Ok(Plan { downs, sparse, composed: !device.is_cpu() })
    }
}
