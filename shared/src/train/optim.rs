//! Optimizers and clipping (docs/MATH.md, "Optimizer and clipping"): Adam and SGD with
//! PyTorch's order of operations and per-module gradient-norm clipping, on host buffers (the
//! CPU engine) and on the device (the autograd path), side by side. The device state converts
//! to and from the host one, so both backends write the same checkpoints.

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::sae::AeParams;
use crate::util::blas::sq_sum;

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Sgd,
}

/// `g ← g · min(1, max_norm / (‖g‖₂ + 1e-6))` over all of one module's gradients
/// (`torch.nn.utils.clip_grad_norm_` on `ae.parameters()`); the norm [`grad_sq`]'s.
pub fn clip_module(g: &mut AeParams<Vec<f32>>, max_norm: f64) {
    let coef = clip_coef(grad_sq(g), max_norm);
    if coef < 1.0 {
        for v in g.each_mut() {
            v.par_iter_mut().for_each(|x| *x *= coef);
        }
    }
}

/// [`clip_module`]'s factor from the squared norm: `min(1, max_norm / (‖g‖₂ + 1e-6))` in f32.
fn clip_coef(sq: f64, max_norm: f64) -> f32 {
    (max_norm / (sq.sqrt() + 1e-6)).min(1.0) as f32
}

/// `‖g‖²` of one module's gradients in f64, fields in layout order: each weight in runs of
/// `d_model` values (`b_dec`'s length; rows when the decoder is held decoder-major), each run
/// one [`sq_sum`], the runs' sums added in order; each bias one [`sq_sum`]. The same value on
/// any number of threads, and what a backward that takes each row's [`sq_sum`] as it writes the
/// row gives ([`grad_sq_of_rows`]).
pub fn grad_sq(g: &AeParams<Vec<f32>>) -> f64 {
    let d = g.b_dec.len().max(1);
    let rows = |v: &[f32]| -> Vec<f64> { v.par_chunks(d).with_min_len(64).map(sq_sum).collect() };
    grad_sq_of_rows(g, &rows(&g.w_enc), &rows(&g.w_dec))
}

/// [`grad_sq`] given its weight rows' sums (`enc`, `dec`: per row of `w_enc`, `w_dec`).
pub fn grad_sq_of_rows(g: &AeParams<Vec<f32>>, enc: &[f64], dec: &[f64]) -> f64 {
    enc.iter().sum::<f64>() + sq_sum(&g.b_enc) + dec.iter().sum::<f64>() + sq_sum(&g.b_dec)
}

/// [`clip_module`] on the device (the norm in f64 as the host's).
pub fn clip_module_t(g: &mut AeParams<Tensor>, max_norm: f64) -> Result<()> {
    let sq64 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?) };
    let [first, rest @ ..] = g.each();
    let mut sq = sq64(first)?;
    for t in rest {
        sq = (sq + sq64(t)?)?;
    }
    let coef = ((sq.sqrt()? + 1e-6)?.recip()? * max_norm)?.minimum(1f64)?.to_dtype(DType::F32)?;
    for t in g.each_mut() {
        *t = t.broadcast_mul(&coef)?;
    }
    Ok(())
}

/// Optimizer state for every parameter on the host (Adam moments; nothing for SGD).
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Optimizer steps taken.
    pub t: u64,
    pub m: Vec<AeParams<Vec<f32>>>,
    pub v: Vec<AeParams<Vec<f32>>>,
}

impl Optimizer {
    /// Fresh state for `params` (Adam: β = (0.9, 0.999), ε = 1e-8, as torch's defaults).
    pub fn new(kind: OptimizerKind, params: &[AeParams<Vec<f32>>]) -> Optimizer {
        let (m, v) = match kind {
            OptimizerKind::Adam => {
                (params.iter().map(AeParams::zeros_like).collect(), params.iter().map(AeParams::zeros_like).collect())
            }
            OptimizerKind::Sgd => (Vec::new(), Vec::new()),
        };
        Optimizer { kind, beta1: 0.9, beta2: 0.999, eps: 1e-8, t: 0, m, v }
    }

    /// The same kind, settings and step count, without moments (to be given some).
    pub fn clone_settings(&self) -> Optimizer {
        Optimizer { m: Vec::new(), v: Vec::new(), ..*self }
    }

    /// One update of every parameter with learning rate `lr` (torch.optim.Adam / SGD order
    /// of operations).
    pub fn step(&mut self, params: &mut [AeParams<Vec<f32>>], grads: &[AeParams<Vec<f32>>], lr: f64) {
        self.t += 1;
        match self.kind {
            OptimizerKind::Sgd => {
                for (p, g) in params.iter_mut().zip(grads) {
                    for (pv, gv) in p.each_mut().into_iter().zip(g.each()) {
                        pv.iter_mut().zip(gv).for_each(|(x, d)| *x -= (lr as f32) * d);
                    }
                }
            }
            OptimizerKind::Adam => {
                let (mc, pc) = (self.moment_consts(), self.param_consts(lr));
                // Elementwise, so modules update in parallel with the same results.
                let moments = self.m.par_iter_mut().zip(self.v.par_iter_mut());
                params.par_iter_mut().zip(grads).zip(moments).for_each(|((p, g), (m, v))| {
                    let (ms, vs) = (m.each_mut(), v.each_mut());
                    for (((x, d), m), v) in p.each_mut().into_iter().zip(g.each()).zip(ms).zip(vs) {
                        for (((x, &d), mm), vv) in x.iter_mut().zip(d).zip(m.iter_mut()).zip(v.iter_mut()) {
                            adam_moments(mm, vv, d, mc);
                            adam_param(x, *mm, *vv, pc);
                        }
                    }
                });
            }
        }
    }

    /// Per module of train-suite's host layout (encoder input-major, its gradient `(F, D)`):
    /// [`clip_module`], `remove_parallel_component_rows` on the decoder-major decoder, then
    /// [`Self::step`] — for Adam in one pass, per element the same operations (the same bits).
    /// `grads` are left as they came for Adam (clipped, projected and turned for SGD).
    pub fn step_clipped(
        &mut self,
        params: &mut [AeParams<Vec<f32>>],
        grads: &mut [AeParams<Vec<f32>>],
        lr: f64,
        clip: Option<f64>,
        d: usize,
    ) {
        if self.kind != OptimizerKind::Adam {
            params.par_iter().zip(grads.par_iter_mut()).for_each(|(p, g)| {
                if let Some(c) = clip {
                    clip_module(g, c);
                }
                crate::sae::decoder::remove_parallel_component_rows(&p.w_dec, &mut g.w_dec, d);
                g.w_enc = crate::util::blas::transpose(&g.w_enc, g.b_enc.len(), d);
            });
            return self.step(params, grads, lr);
        }
        self.t += 1;
        let (mc, pc) = (self.moment_consts(), self.param_consts(lr));
        let moments = self.m.par_iter_mut().zip(self.v.par_iter_mut());
        params.par_iter_mut().zip(grads.par_iter()).zip(moments).for_each(|((p, g), (m, v))| {
            adam_module(p, g, m, v, clip.map(|c| (c, None)), d, mc, pc);
        });
    }

    /// [`Self::step_clipped`] (Adam) for a loop that hands over one module's gradients at a
    /// time while they are still in cache: [`Self::begin_step`] once, then this per module —
    /// the same operations per element, so the same bits. `sq`: [`grad_sq`] of `g` if known.
    #[allow(clippy::too_many_arguments)]
    pub fn step_clipped_module(
        &mut self,
        mi: usize,
        p: &mut Host,
        g: &Host,
        lr: f64,
        clip: Option<f64>,
        sq: Option<f64>,
        d: usize,
    ) {
        assert_eq!(self.kind, OptimizerKind::Adam, "step_clipped_module is Adam's");
        let (mc, pc) = (self.moment_consts(), self.param_consts(lr));
        adam_module(p, g, &mut self.m[mi], &mut self.v[mi], clip.map(|c| (c, sq)), d, mc, pc);
    }

    /// Count a step whose modules [`Self::step_clipped_module`] then updates.
    pub fn begin_step(&mut self) {
        self.t += 1;
    }

    /// Adam in two halves, for a backward that hands over one module's gradients at a time
    /// ([`crate::pass::engine::Engine::backward_each`]): fold module `m`'s gradients into its
    /// moments (the gradients can then be dropped); later [`Self::step_from_moments`]. Per element
    /// the same operations as [`Self::step`], so the same bits.
    pub fn fold_moments(&mut self, m: usize, g: &AeParams<Vec<f32>>) {
        let mc = self.moment_consts();
        let (ms, vs) = (self.m[m].each_mut(), self.v[m].each_mut());
        for ((d, m), v) in g.each().into_iter().zip(ms).zip(vs) {
            m.par_iter_mut()
                .zip(v.par_iter_mut())
                .zip(d.par_iter())
                .for_each(|((mm, vv), &d)| adam_moments(mm, vv, d, mc));
        }
    }

    /// The second half of [`Self::fold_moments`]: count the step and move every parameter by
    /// its moments with learning rate `lr`.
    pub fn step_from_moments(&mut self, params: &mut [AeParams<Vec<f32>>], lr: f64) {
        self.t += 1;
        let pc = self.param_consts(lr);
        let moments = self.m.par_iter().zip(self.v.par_iter());
        params.par_iter_mut().zip(moments).for_each(|(p, (m, v))| {
            for ((x, m), v) in p.each_mut().into_iter().zip(m.each()).zip(v.each()) {
                x.iter_mut().zip(m).zip(v).for_each(|((x, &mm), &vv)| adam_param(x, mm, vv, pc));
            }
        });
    }

    /// torch.optim.Adam (single-tensor): m.lerp_(g, 1 − β1); v.mul_(β2).addcmul_(g, g, 1 − β2);
    /// denom = sqrt(v) / sqrt(bc2) + eps; p.addcdiv_(m, denom, −lr / bc1), with the scalars
    /// formed in f64 and applied in f32: (1 − β1, β2, 1 − β2).
    fn moment_consts(&self) -> [f32; 3] {
        [(1.0 - self.beta1) as f32, self.beta2 as f32, (1.0 - self.beta2) as f32]
    }

    /// (lr / bc1, sqrt(bc2), eps) at step `t` (already counted).
    fn param_consts(&self, lr: f64) -> [f32; 3] {
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        [(lr / bc1) as f32, bc2.sqrt() as f32, self.eps as f32]
    }
}

type Host = AeParams<Vec<f32>>;

/// One module of [`Optimizer::step_clipped`] (Adam): clipping factor (`clip`: the bound and
/// [`grad_sq`] if known), then per element the moments and the parameter, the decoder's
/// gradient projected row by row.
#[allow(clippy::too_many_arguments)]
fn adam_module(
    p: &mut Host,
    g: &Host,
    m: &mut Host,
    v: &mut Host,
    clip: Option<(f64, Option<f64>)>,
    d: usize,
    mc: [f32; 3],
    pc: [f32; 3],
) {
    // Tasks of about 64 K elements (whole decoder rows for the projection).
    let (chunk, rows) = (1 << 16, (1usize << 16).div_ceil(d.max(1)) * d.max(1));
    // A coefficient of 1 (no clipping) leaves every gradient as it is. The encoder is held
    // input-major, its gradient by feature (`sae::step`).
    let coef = clip.map_or(1.0, |(c, sq)| clip_coef(sq.unwrap_or_else(|| grad_sq(g)), c));
    super::adam_enc::adam_input_major(&mut p.w_enc, &g.w_enc, &mut m.w_enc, &mut v.w_enc, d, coef, mc, pc);
    let fields = [
        (&mut p.b_enc, &g.b_enc, &mut m.b_enc, &mut v.b_enc, chunk, false),
        (&mut p.w_dec, &g.w_dec, &mut m.w_dec, &mut v.w_dec, rows, true),
        (&mut p.b_dec, &g.b_dec, &mut m.b_dec, &mut v.b_dec, chunk, false),
    ];
    for (x, g, m, v, size, project) in fields {
        let parts = x.par_chunks_mut(size).zip(g.par_chunks(size)).zip(m.par_chunks_mut(size));
        parts.zip(v.par_chunks_mut(size)).for_each(|(((x, g), m), v)| match project {
            true => adam_rows_projected(x, g, m, v, d, coef, mc, pc),
            false => adam_slice(x, g, m, v, coef, mc, pc),
        });
    }
}

/// Adam's moment update of one element ([`Optimizer::moment_consts`]).
#[inline]
pub(super) fn adam_moments(mm: &mut f32, vv: &mut f32, d: f32, [c1, b2, c2]: [f32; 3]) {
    *mm += c1 * (d - *mm);
    *vv = *vv * b2 + c2 * (d * d);
}

/// Adam's parameter update of one element ([`Optimizer::param_consts`]).
#[inline]
pub(super) fn adam_param(x: &mut f32, mm: f32, vv: f32, [step_size, bc2_sqrt, eps]: [f32; 3]) {
    let denom = vv.sqrt() / bc2_sqrt + eps;
    *x -= step_size * (mm / denom);
}

crate::widest! {
    /// [`adam_moments`] and [`adam_param`] of every element, the gradient `g · coef` (the clip).
    pub(super) fn adam_slice(x: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], coef: f32, mc: [f32; 3], pc: [f32; 3]) {
        for (((x, &g), mm), vv) in x.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            adam_moments(mm, vv, g * coef, mc);
            adam_param(x, *mm, *vv, pc);
        }
    }
}

crate::widest! {
    /// [`adam_slice`] of decoder rows `x (.., d)` (decoder-major) whose gradient `g · coef` first
    /// loses its component along the row: `g −= (g · x) x`, the dot summed in `j` order from
    /// zero as [`crate::sae::decoder::remove_parallel_component_rows`] (eight rows at once,
    /// [`crate::util::rows8::scaled_dots`]).
    fn adam_rows_projected(
        x: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        d: usize,
        coef: f32,
        mc: [f32; 3],
        pc: [f32; 3],
    ) {
        const R: usize = 8;
        let block = R * d.max(1);
        let parts = x.chunks_mut(block).zip(g.chunks(block)).zip(m.chunks_mut(block)).zip(v.chunks_mut(block));
        for (((x, g), m), v) in parts {
            let (n, dots) = (x.len() / d.max(1), crate::util::rows8::scaled_dots(g, x, d, coef));
            for (r, &dot) in dots[..n].iter().enumerate() {
                let s = r * d..(r + 1) * d;
                let row = x[s.clone()].iter_mut().zip(&g[s.clone()]).zip(m[s.clone()].iter_mut()).zip(v[s].iter_mut());
                for (((x, &g), mm), vv) in row {
                    adam_moments(mm, vv, g * coef - dot * *x, mc);
                    adam_param(x, *mm, *vv, pc);
                }
            }
        }
    }
}

/// Adam/SGD state on the parameters' device.
pub struct DeviceOptimizer {
    kind: OptimizerKind,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Optimizer steps taken.
    pub t: u64,
    m: Vec<AeParams<Tensor>>,
    v: Vec<AeParams<Tensor>>,
}

impl DeviceOptimizer {
    /// Upload a host optimizer's state for `vars`.
    pub fn from_host(opt: &Optimizer, vars: &[AeParams<Var>]) -> Result<DeviceOptimizer> {
        let up = |state: &[AeParams<Vec<f32>>]| -> Result<Vec<AeParams<Tensor>>> {
            state
                .iter()
                .zip(vars)
                .map(|(s, vs)| {
                    s.try_zip(vs, |x, like| {
                        let like = like.as_tensor();
                        Ok(Tensor::from_slice(x, like.shape(), like.device())?)
                    })
                })
                .collect()
        };
        Ok(DeviceOptimizer {
            kind: opt.kind,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            t: opt.t,
            m: up(&opt.m)?,
            v: up(&opt.v)?,
        })
    }

    /// Download the state (for a checkpoint).
    pub fn to_host(&self) -> Result<Optimizer> {
        let down = |state: &[AeParams<Tensor>]| -> Result<Vec<AeParams<Vec<f32>>>> {
            state.iter().map(|s| s.try_map(crate::util::to_vec)).collect()
        };
        Ok(Optimizer {
            kind: self.kind,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            t: self.t,
            m: down(&self.m)?,
            v: down(&self.v)?,
        })
    }

    /// One update of every variable with learning rate `lr`, in torch's order of operations.
    pub fn step(&mut self, vars: &[AeParams<Var>], grads: &[AeParams<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        match self.kind {
            OptimizerKind::Sgd => {
                for (vs, gs) in vars.iter().zip(grads) {
                    for (v, g) in vs.each().into_iter().zip(gs.each()) {
                        v.set(&(v.as_tensor() - (g * lr)?)?)?;
                    }
                }
            }
            OptimizerKind::Adam => {
                let Some(first) = vars.first() else { return Ok(()) };
                let adam =
                    AdamStep::new((self.beta1, self.beta2, self.eps), self.t, lr, first.w_enc.as_tensor().device())?;
                for (mi, (vs, gs)) in vars.iter().zip(grads).enumerate() {
                    let (ms, vvs) = (self.m[mi].each_mut(), self.v[mi].each_mut());
                    for (((var, g), m), v) in vs.each().into_iter().zip(gs.each()).zip(ms).zip(vvs) {
                        adam.apply(var, g, m, v)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One Adam update on device tensors at step `t` (1-based), in the host optimizer's (torch's)
/// order of operations: what [`DeviceOptimizer`] does to each variable, and the gates'
/// optimizer to each `log α`.
pub struct AdamStep {
    b1: f64,
    b2: f64,
    eps: f64,
    step_size: f64,
    bc2: Tensor,
}

impl AdamStep {
    /// The update of step `t` with betas, eps `(b1, b2, eps)` and learning rate `lr`.
    pub fn new((b1, b2, eps): (f64, f64, f64), t: u64, lr: f64, device: &candle_core::Device) -> Result<AdamStep> {
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2_sqrt = (1.0 - b2.powi(t as i32)).sqrt();
        Ok(AdamStep { b1, b2, eps, step_size: lr / bc1, bc2: Tensor::new(bc2_sqrt as f32, device)? })
    }

    /// Update `var` with gradient `g` and its moments `m`, `v` (replaced).
    pub fn apply(&self, var: &Var, g: &Tensor, m: &mut Tensor, v: &mut Tensor) -> Result<()> {
        let m_new = (&*m + ((g - &*m)? * (1.0 - self.b1))?)?;
        let v_new = ((&*v * self.b2)? + (g.sqr()? * (1.0 - self.b2))?)?;
        let denom = (v_new.sqrt()?.broadcast_div(&self.bc2)? + self.eps)?;
        var.set(&(var.as_tensor() - ((&m_new / denom)? * self.step_size)?)?)?;
        *m = m_new;
        *v = v_new;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix;
    use candle_core::Device;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        SplitMix::normals(n, seed)
    }

    fn params(v: [Vec<f32>; 4]) -> AeParams<Vec<f32>> {
        let [w_enc, b_enc, w_dec, b_dec] = v;
        AeParams { w_enc, b_enc, w_dec, b_dec }
    }

    fn flat(p: &AeParams<Vec<f32>>) -> Vec<f32> {
        p.each().into_iter().flatten().copied().collect()
    }

    #[test]
    fn adam_matches_closed_form_first_steps() {
        // First Adam step moves every parameter by lr·sign(g) (m̂ = g, v̂ = g²).
        let mut p = vec![params([vec![1.0, -2.0], vec![0.5], vec![3.0], vec![0.0]])];
        let g = vec![params([vec![0.3, -4.0], vec![1e-3], vec![-2.0], vec![0.0]])];
        let mut opt = Optimizer::new(OptimizerKind::Adam, &p);
        opt.step(&mut p, &g, 0.1);
        let want = [0.9f32, -1.9, 0.4, 3.1, 0.0];
        let got = flat(&p[0]);
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
        // torch forms 1 − β in f64 and applies it in f32: m = 0.1f32·g, v = 0.001f32·g² exactly
        let (gs, ms, vs) = (flat(&g[0]), flat(&opt.m[0]), flat(&opt.v[0]));
        for ((x, m), v) in gs.iter().zip(&ms).zip(&vs) {
            assert_eq!(*m, 0.1f32 * x);
            assert_eq!(*v, 0.001f32 * (x * x));
        }
    }

    /// Adam in two halves (moments folded module by module as a backward hands them over,
    /// then the parameters moved) is the same, bit for bit, as one step.
    #[test]
    fn adam_in_two_halves_is_one_step() {
        let shapes = AeParams::shapes(3, 5);
        let n = |s: &Vec<usize>| s.iter().product::<usize>();
        let mut seed = 0;
        let mut draw = || {
            shapes.map(|s| {
                seed += 1;
                random(n(s), seed)
            })
        };
        let mut one = vec![draw(), draw()];
        let mut two = one.clone();
        let (mut a, mut b) = (Optimizer::new(OptimizerKind::Adam, &one), Optimizer::new(OptimizerKind::Adam, &two));
        for step in 0..3 {
            let grads = vec![draw(), draw()];
            let lr = 0.01 * (step + 1) as f64;
            a.step(&mut one, &grads, lr);
            for m in (0..2).rev() {
                b.fold_moments(m, &grads[m]);
            }
            b.step_from_moments(&mut two, lr);
        }
        assert_eq!(one, two);
        assert_eq!(a, b);
    }

    #[test]
    fn clipping_scales_the_whole_module() {
        let mut g = params([vec![3.0f32], vec![4.0], vec![], vec![]]);
        clip_module(&mut g, 1.0);
        assert!((g.w_enc[0] - 0.6).abs() < 1e-5 && (g.b_enc[0] - 0.8).abs() < 1e-5);
        let mut small = params([vec![0.1f32], vec![], vec![], vec![]]);
        clip_module(&mut small, 1.0);
        assert_eq!(small.w_enc[0], 0.1);
    }

    /// The one-pass clip + projection + Adam equals the three passes one after the other, bit
    /// for bit: with the clip binding and not, decoders of rows not a multiple of eight and
    /// widths not a multiple of the vector, over a few steps; SGD goes the three-pass way.
    #[test]
    fn one_pass_clip_projection_adam_is_the_three_passes() {
        use crate::sae::decoder::{normalize_decoder_rows, remove_parallel_component_rows};
        let (d, f) = (13, 21);
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            for clip in [None, Some(1e-3), Some(1e3)] {
                let mut p: Vec<_> = (0..2)
                    .map(|m| params([random(f * d, m), random(f, m + 10), random(f * d, m + 20), random(d, m + 30)]))
                    .collect();
                p.iter_mut().for_each(|p| normalize_decoder_rows(&mut p.w_dec, d));
                let (mut q, mut o1) = (p.clone(), Optimizer::new(kind, &p));
                let (mut r, mut o2) = (p.clone(), o1.clone());
                let mut o3 = o1.clone();
                for step in 0..3u64 {
                    let g: Vec<_> = (0..2u64)
                        .map(|m| {
                            let s = 100 * step + 7 * m;
                            params([random(f * d, s + 1), random(f, s + 2), random(f * d, s + 3), random(d, s + 4)])
                        })
                        .collect();
                    let mut g1 = g.clone();
                    for (p, g) in p.iter().zip(g1.iter_mut()) {
                        if let Some(c) = clip {
                            clip_module(g, c);
                        }
                        remove_parallel_component_rows(&p.w_dec, &mut g.w_dec, d);
                        g.w_enc = crate::util::blas::transpose(&g.w_enc, f, d); // p's input-major layout
                    }
                    o1.step(&mut p, &g1, 1e-2);
                    let mut g2 = g.clone();
                    o2.step_clipped(&mut q, &mut g2, 1e-2, clip, d);
                    assert_eq!(p, q, "{kind:?} clip {clip:?} step {step}");
                    assert_eq!(o1, o2, "{kind:?} clip {clip:?} step {step}");
                    if kind == OptimizerKind::Adam {
                        o3.begin_step(); // and one module at a time
                        for (m, (r, g)) in r.iter_mut().zip(&g).enumerate() {
                            o3.step_clipped_module(m, r, g, 1e-2, clip, None, d);
                        }
                        assert_eq!(p, r, "module by module, clip {clip:?} step {step}");
                        assert_eq!(o1, o3, "module by module, clip {clip:?} step {step}");
                    }
                }
            }
        }
    }

    /// The device optimizer and clipping against the host ones (the CPU engine's), over a few
    /// steps with changing gradients and learning rates.
    #[test]
    fn device_adam_sgd_and_clipping_match_the_host() {
        let shapes = AeParams::shapes(2, 3);
        let n = |s: &Vec<usize>| s.iter().product::<usize>();
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let mut seed = 0;
            let init = shapes.map(|s| {
                seed += 1;
                random(n(s), seed)
            });
            let mut host = vec![init.clone()];
            let vars = vec![AeParams::<Var>::from_host(&init, 2, 3, &Device::Cpu).unwrap()];
            let mut hopt = Optimizer::new(kind, &host);
            let mut dopt = DeviceOptimizer::from_host(&hopt, &vars).unwrap();
            for step in 0..4u64 {
                let g = shapes.map(|s| {
                    seed += 1;
                    random(n(s), 10 + step * 4 + seed)
                });
                let mut dg = g.try_zip(&shapes, |v, s| Tensor::from_slice(v, s.as_slice(), &Device::Cpu)).unwrap();
                let mut hg = vec![g];
                clip_module(&mut hg[0], 1.5);
                clip_module_t(&mut dg, 1.5).unwrap();
                let lr = 0.01 * (step + 1) as f64;
                hopt.step(&mut host, &hg, lr);
                dopt.step(&vars, &[dg], lr).unwrap();
            }
            let got = vars[0].to_host().unwrap();
            for (i, (d, h)) in got.each().into_iter().zip(host[0].each()).enumerate() {
                for (a, b) in d.iter().zip(h) {
                    assert!((a - b).abs() <= 1e-7 * (1.0 + b.abs()), "{kind:?} param {i}: {a} vs {b}");
                }
            }
            // and the state survives a round trip through the host format
            let back = dopt.to_host().unwrap();
            assert_eq!(back.t, hopt.t);
            let all = |v: &[AeParams<Vec<f32>>]| v.iter().flat_map(flat).collect::<Vec<f32>>();
            for (x, y) in all(&back.m).iter().zip(all(&hopt.m)).chain(all(&back.v).iter().zip(all(&hopt.v))) {
                assert!((x - y).abs() <= 1e-6 * y.abs(), "{kind:?} moment {x} vs {y}");
            }
        }
    }
}
