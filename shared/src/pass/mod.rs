//! The pruned forward pass (docs/MATH.md, "Pruned pass: mlp targets", "Pruned pass: attention
//! targets", "Edge terms"): each downstream feature's pre-activation sums only its connected
//! upstream features' contributions (plus the embedding and bias terms), with attention
//! patterns and LN scales frozen from the clean run; then ReLU + top-k. One formula, four
//! implementations:
//! - [`autograd`]: composed candle ops with autograd (any device and dtype; the GPU path);
//! - [`engine`]: the hand-written CPU pass, forward and backward on flat buffers (the fast path);
//! - [`kernels`]: the sparse CPU custom ops the autograd pass uses on the CPU;
//! - `oracle` (feature `oracle`, tests only): the reference's dense masked algorithm.
//!
//! [`plan`] wires a suite for a connection set; [`objective`] holds what finetuning and evaluation measure on the pass (Σ FVU, spliced CE).

pub mod autograd;
pub mod engine;
pub mod kernels;
pub mod objective;
#[cfg(feature = "oracle")]
pub mod oracle;
pub mod plan;

use candle_core::{DType, Device, Tensor};

pub use autograd::forward;
pub use plan::{DownPlan, PassOptions, Plan, Wiring};

use crate::data::{Batch, FlatBatch};
use crate::error::Result;
use crate::formats::suite::Suite;
use crate::model::Runtime;
use engine::{Engine, ModuleState};

/// Features and reconstructions of every module.
#[derive(Debug, Clone)]
pub struct PassOutput {
    /// `(batch·pos, n_features)`: ReLU'd top-k values scattered into zeros.
    pub feats: Vec<Tensor>,
    /// `(batch, pos, d_model)`: `f W_decᵀ + b_dec`.
    pub recon: Vec<Tensor>,
    /// `(batch·pos, n_features)`: the pre-activations before ReLU and top-k (for AuxK).
    pub pre: Vec<Tensor>,
}

/// The pruned pass's values without gradients (evaluation, edge scores), set up once per run:
/// on the CPU in f32 the engine (a fraction of the autograd pass's time and memory),
/// otherwise [`autograd::forward`]. `pre` is left empty.
pub struct ValuePass<'a> {
    suite: &'a Suite,
    rt: &'a Runtime,
    plan: &'a Plan,
    opts: PassOptions,
    engine: Option<Engine<'a>>,
}

impl<'a> ValuePass<'a> {
    /// Prepare the pass for batches on `device`.
    pub fn new(
        suite: &'a Suite,
        rt: &'a Runtime,
        plan: &'a Plan,
        opts: PassOptions,
        device: &Device,
    ) -> Result<ValuePass<'a>> {
        let engine = if device.is_cpu() && !plan.composed { Some(Engine::new(suite, rt, plan, opts)?) } else { None };
        Ok(ValuePass { suite, rt, plan, opts, engine })
    }

    /// Features and reconstructions of every module on `batch`.
    pub fn run(&self, batch: &Batch) -> Result<PassOutput> {
        let engine = match &self.engine {
            Some(e) if batch.resid_pre0.device().is_cpu() && batch.pass_dtype() == DType::F32 => e,
            _ => return autograd::forward(self.suite, self.rt, self.plan, batch, self.opts),
        };
        let fb = FlatBatch::inputs(batch)?;
        let state = engine.forward(&fb)?;
        let (b, s, d) = batch.resid_pre0.dims3()?;
        let (n, f, k) = (b * s, self.suite.n_features, self.suite.k);
        let dev = batch.resid_pre0.device();
        let mut out = PassOutput { feats: Vec::new(), recon: Vec::new(), pre: Vec::new() };
        for st in state.modules {
            out.feats.push(dense_features(&st, n, f, k, dev)?);
            out.recon.push(Tensor::from_vec(st.recon, (b, s, d), dev)?);
        }
        Ok(out)
    }
}

/// Features of a module as a dense `(N, F)` tensor (for inspection and tests).
pub fn dense_features(state: &ModuleState, n: usize, f: usize, k: usize, device: &Device) -> Result<Tensor> {
    let mut dense = vec![0f32; n * f];
    for t in 0..n {
        for kk in 0..k {
            dense[t * f + state.idx[t * k + kk] as usize] = state.val[t * k + kk];
        }
    }
    Ok(Tensor::from_vec(dense, (n, f), device)?)
}
