//! The fast CPU pruned pass: forward and hand-written backward over flat `f32` buffers.
//!
//! Computes exactly what [`crate::pruned::forward`] computes (that version, built from candle
//! ops with autograd, is checked against the reference; this one is checked against it), but:
//! - features are kept sparse (`k` indices and values per token), so decoding, the edge terms
//!   and every backward step cost `k` (or `k·C`) per token instead of `F`;
//! - gradients are computed only where they exist: top-k selects `k` entries per row, so the
//!   gradient of each pre-activation row has `k` non-zeros, and constants (cached scales,
//!   patterns, model weights) get no gradient work at all.
//!
//! Per downstream module d the pre-activation is `a = Z Eᵀ + b_enc − E b_dec + edges`, where
//! `Z (N, D)` gathers every d_model-space term (layer-0 residual, upstream decoder biases, with
//! all connections the upstream reconstructions, and for attention the mixing by the cached
//! pattern and `b_O`), and `edges` is the sparse sum over connected upstream features
//! (SPEC §4, Appendix). The only dense products are `Z Eᵀ` (the embedding term, `N·D·F`),
//! per-step weight products of size `F·D·D`, and the attention mixing of edge terms
//! (`B·H·S²·F`).

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::Runtime;
use crate::pruned::{Batch, PassOptions, Plan};
use crate::sparse_ops::{topk_indices, EdgeIndex};
use crate::suite::{Kind, Suite};

/// Output rows per task of a parallel [`sgemm`].
const GEMM_ROWS: usize = 128;

/// `C (m, n) = [C +] A (m, k) · B (k, n)` with explicit (row, column) strides for A and B;
/// C is row-major contiguous.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    acc: bool,
    par: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            c[..m * n].iter_mut().for_each(|x| *x = 0.0);
        }
        return;
    }
    debug_assert!(c.len() >= m * n);
    debug_assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    debug_assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    if par && m >= 2 * GEMM_ROWS {
        // Parallel over fixed blocks of output rows, each a single-threaded product.
        c[..m * n].par_chunks_mut(GEMM_ROWS * n).enumerate().for_each(|(blk, cb)| {
            let rows = cb.len() / n;
            sgemm(rows, n, k, &a[blk * GEMM_ROWS * a_rs..], a_rs, a_cs, b, b_rs, b_cs, cb, acc, false);
        });
        return;
    }
    let parallelism = gemm::Parallelism::None;
    // SAFETY: the asserts above bound every index the kernel touches; C does not alias A or B.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `C (m, n) = A (m, k) · B (n, k)ᵀ`, all row-major (e.g. activations times an encoder).
pub fn gemm_nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    sgemm(m, n, k, a, k, 1, b, 1, k, c, false, true);
}

/// A tensor's values as a host `Vec<f32>` (any device and float dtype, any layout).
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn add_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(o, v)| *o += alpha * v);
}

/// `Σ a·b` in eight interleaved partial sums (so it vectorizes; a fixed order, so results do
/// not depend on threads).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `out (F, D)`: `out[i] = Σ coef(j) · rows[j / width]` over the flat positions `j` with
/// `idx[j] == i` and `coef(j) != 0`. A column index of the sparse (token, slot) entries makes
/// the sum parallel over features, without per-thread accumulators, and deterministic.
fn by_feature(
    idx: &[u32],
    width: usize,
    f: usize,
    d: usize,
    coef: impl Fn(usize) -> f32 + Sync,
    rows: &[f32],
) -> Vec<f32> {
    let mut ptr = vec![0u32; f + 1];
    for (j, &i) in idx.iter().enumerate() {
        if coef(j) != 0.0 {
            ptr[i as usize + 1] += 1;
        }
    }
    for i in 0..f {
        ptr[i + 1] += ptr[i];
    }
    let mut fill = ptr.clone();
    let mut entries = vec![0u32; ptr[f] as usize];
    for (j, &i) in idx.iter().enumerate() {
        if coef(j) != 0.0 {
            entries[fill[i as usize] as usize] = j as u32;
            fill[i as usize] += 1;
        }
    }
    let mut out = vec![0f32; f * d];
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        for &j in &entries[ptr[i] as usize..ptr[i + 1] as usize] {
            let t = j as usize / width;
            axpy(coef(j as usize), &rows[t * d..(t + 1) * d], o);
        }
    });
    out
}

/// The non-zero selected values of the upstream modules `ups` at token `t`, in (module,
/// top-k slot) order: `(pu, kk, v, col)` with `col = pu·F + feature`, the feature's column
/// among the concatenated upstream features.
fn active_ups<'s>(
    states: &'s [ModuleState],
    ups: &'s [usize],
    t: usize,
    k: usize,
    f: usize,
) -> impl Iterator<Item = (usize, usize, f32, usize)> + 's {
    ups.iter().enumerate().flat_map(move |(pu, &u)| {
        let st = &states[u];
        (0..k).filter_map(move |kk| {
            let v = st.val[t * k + kk];
            (v != 0.0).then(|| (pu, kk, v, pu * f + st.idx[t * k + kk] as usize))
        })
    })
}

/// Add `scratch (N, |U|, K)` — the gradient of every upstream module's selected values that
/// one downstream module's edges produced — into the per-module totals `g_val_up[u] (N, K)`.
fn add_up_value_grads(ups: &[usize], scratch: &[f32], n: usize, k: usize, g_val_up: &mut [Vec<f32>]) {
    for (pu, &u) in ups.iter().enumerate() {
        let gvu = &mut g_val_up[u];
        for t in 0..n {
            let src = &scratch[(t * ups.len() + pu) * k..(t * ups.len() + pu + 1) * k];
            add_into(&mut gvu[t * k..(t + 1) * k], src);
        }
    }
}

/// Add gradients w.r.t. upstream modules' `W_decᵀ` (F, D) into their running totals.
fn add_dec_t_grads(ups: &[usize], g_dec_t_up: Vec<Vec<f32>>, g_dec_t_in: &mut [Vec<f32>]) {
    for (g, &u) in g_dec_t_up.into_iter().zip(ups) {
        if g_dec_t_in[u].is_empty() {
            g_dec_t_in[u] = g;
        } else {
            add_into(&mut g_dec_t_in[u], &g);
        }
    }
}

/// Optional phase timing (`SCAE_PROFILE=1`): totals per phase printed to stderr after each
/// forward and backward; one environment lookup per pass when off.
struct Profile {
    on: bool,
    last: std::time::Instant,
    totals: Vec<(&'static str, f64)>,
}

impl Profile {
    fn new() -> Profile {
        Profile { on: std::env::var_os("SCAE_PROFILE").is_some(), last: std::time::Instant::now(), totals: Vec::new() }
    }

    /// Charge the time since the last mark to `phase`.
    fn mark(&mut self, phase: &'static str) {
        if !self.on {
            return;
        }
        let dt = self.last.elapsed().as_secs_f64() * 1e3;
        self.last = std::time::Instant::now();
        match self.totals.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, t)) => *t += dt,
            None => self.totals.push((phase, dt)),
        }
    }

    fn report(&self, what: &str) {
        if self.on {
            let parts: Vec<String> = self.totals.iter().map(|(p, t)| format!("{p} {t:.1}")).collect();
            eprintln!("scae profile {what} (ms): {}", parts.join(", "));
        }
    }
}

/// `(F, D)` row-major to `(D, F)` row-major, in cache-sized tiles.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut out = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// Blocks of a deterministic parallel fold.
const BLOCKS: usize = 16;

/// Deterministic parallel fold over rows: `out` (rows of `row_len`) is cut into at most
/// [`BLOCKS`] blocks of whole rows; `body(first_row, block, acc)` fills its block and adds into
/// its own accumulator of `acc_len`; the accumulators are summed in block order. The result
/// does not depend on the thread count or scheduling, so runs are bit-reproducible.
fn fold_rows<F>(out: &mut [f32], row_len: usize, acc_len: usize, body: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let n_rows = out.len() / row_len.max(1);
    let per = n_rows.div_ceil(BLOCKS).max(1);
    let accs: Vec<Vec<f32>> = out
        .par_chunks_mut(per * row_len)
        .enumerate()
        .map(|(b, chunk)| {
            let mut acc = vec![0f32; acc_len];
            body(b * per, chunk, &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0f32; acc_len];
    for a in &accs {
        add_into(&mut total, a);
    }
    total
}

/// One module's parameters as flat buffers.
struct Params {
    enc: Vec<f32>,   // (F, D)
    b_enc: Vec<f32>, // (F)
    dec_t: Vec<f32>, // (F, D) = W_decᵀ
    b_dec: Vec<f32>, // (D)
}

/// Model constants of one layer.
struct LayerConsts {
    w_v: Vec<f32>,      // (D, H·dh)
    w_o: Vec<f32>,      // (H·dh, D)
    b_o: Vec<f32>,      // (D)
    w_ov_sum: Vec<f32>, // (D, D)
}

/// Cached clean-run tensors of a batch as flat buffers.
pub struct FlatBatch {
    pub b: usize,
    pub s: usize,
    pub r0: Vec<f32>,           // (N, D)
    pub s1: Vec<Vec<f32>>,      // per layer (N)
    pub s2: Vec<Vec<f32>>,      // per layer (N)
    pub pattern: Vec<Vec<f32>>, // per layer (B, H, S, S)
    pub targets: Vec<Vec<f32>>, // per module (N, D)
    pub tokens: Vec<u32>,       // (N)
}

impl FlatBatch {
    /// Flatten the pass inputs of a [`Batch`] only (no targets or tokens: enough for
    /// [`Engine::forward`], not for the losses).
    pub fn inputs(batch: &Batch) -> Result<FlatBatch> {
        let (b, s, _) = batch.resid_pre0.dims3()?;
        Ok(FlatBatch {
            b,
            s,
            r0: to_vec(&batch.resid_pre0)?,
            s1: batch.ln1_scale.iter().map(to_vec).collect::<Result<_>>()?,
            s2: batch.ln2_scale.iter().map(to_vec).collect::<Result<_>>()?,
            pattern: batch.pattern.iter().map(to_vec).collect::<Result<_>>()?,
            targets: Vec::new(),
            tokens: Vec::new(),
        })
    }

    /// Flatten a [`Batch`] for `suite`'s modules.
    pub fn new(batch: &Batch, suite: &Suite) -> Result<FlatBatch> {
        Ok(FlatBatch {
            targets: suite.modules.iter().map(|m| to_vec(batch.target(m))).collect::<Result<_>>()?,
            tokens: batch.tokens.to_device(&Device::Cpu)?.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?,
            ..FlatBatch::inputs(batch)?
        })
    }
}

/// What the forward pass keeps for the backward pass, per module.
pub struct ModuleState {
    /// Top-k indices `(N, K)` and ReLU'd values `(N, K)`.
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
    /// Reconstruction `(N, D)` including `b_dec`.
    pub recon: Vec<f32>,
    /// The d_model-space encoder input `Z (N, D)`.
    z: Vec<f32>,
    /// Edge weights in column order ([`EdgeIndex::to_col_order`]) for the loops that push from
    /// upstream features, and for attention targets also by slot `(F, C, H)` (sparse wiring).
    w: Vec<f32>,
    w_col: Vec<f32>,
    /// Attention targets, sparse wiring: `E W_Oᵀ (F, H·dh)` and per up `W_decᵀ W_V (F, H·dh)`.
    ev: Vec<f32>,
    dv: Vec<Vec<f32>>,
    /// AuxK (with dead latents): the `k_aux` largest ReLU'd pre-activations among dead latents,
    /// `(N, k_aux)`, the number of dead latents, and the loss gradient w.r.t. their
    /// reconstruction of the residual `(N, D)` (set by [`Engine::auxk_loss_and_grad`]).
    pub aux_idx: Vec<u32>,
    pub aux_val: Vec<f32>,
    pub k_aux: usize,
    pub n_dead: usize,
    aux_g: Vec<f32>,
}

/// The gradient of a module's pre-activation: `kb` (index, value) entries per token.
struct PreGrad {
    idx: Vec<u32>,
    g: Vec<f32>,
    kb: usize,
}

/// Forward state of a whole suite.
pub struct State {
    pub modules: Vec<ModuleState>,
}

/// Gradients of one module's parameters (shapes as the suite's).
#[derive(Debug, Clone)]
pub struct ModuleGrads {
    pub w_enc: Vec<f32>, // (F, D)
    pub b_enc: Vec<f32>, // (F)
    pub w_dec: Vec<f32>, // (D, F)
    pub b_dec: Vec<f32>, // (D)
}

/// The fast pruned pass of a suite for one model and wiring.
pub struct Engine<'a> {
    suite: &'a Suite,
    plan: &'a Plan,
    opts: PassOptions,
    params: Vec<Params>,
    layers: Vec<LayerConsts>,
    n_heads: usize,
    d_head: usize,
    d: usize,
    f: usize,
    k: usize,
    /// Force the dense (`Some(true)`) or sparse (`Some(false)`) attention edge gradient;
    /// `None` picks by cost.
    dense_attn_grad: Option<bool>,
}

impl<'a> Engine<'a> {
    /// Force the dense or sparse computation of attention edge gradients (both exact; the
    /// default picks the cheaper one). For tests and benchmarks.
    pub fn force_dense_attn_grad(&mut self, dense: Option<bool>) {
        self.dense_attn_grad = dense;
    }

    /// Snapshot the suite's parameters and the model's constants.
    pub fn new(suite: &'a Suite, rt: &Runtime, plan: &'a Plan, opts: PassOptions) -> Result<Engine<'a>> {
        let params = suite
            .aes
            .iter()
            .map(|ae| {
                Ok(Params {
                    enc: to_vec(ae.w_enc.as_tensor())?,
                    b_enc: to_vec(ae.b_enc.as_tensor())?,
                    dec_t: to_vec(&ae.w_dec.as_tensor().t()?.contiguous()?)?,
                    b_dec: to_vec(ae.b_dec.as_tensor())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..rt.cfg.n_layers)
            .map(|l| {
                let (w_v, w_o) = rt.flat_vo(l);
                Ok(LayerConsts {
                    w_v: to_vec(w_v)?,
                    w_o: to_vec(w_o)?,
                    b_o: to_vec(&rt.weights.blocks[l].b_o)?,
                    w_ov_sum: to_vec(rt.w_ov_sum(l))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if plan.sparse && suite.modules.iter().enumerate().any(|(d, _)| plan.down(d).index.is_none()) {
            return Err(Error::Usage("sparse plan without edge index".into()));
        }
        Ok(Engine {
            suite,
            plan,
            opts,
            params,
            layers,
            n_heads: rt.cfg.n_heads,
            d_head: rt.cfg.d_head,
            d: suite.d_model,
            f: suite.n_features,
            k: suite.k,
            dense_attn_grad: None,
        })
    }

    /// `M = mix(X W_V)` then `out = M W_O`: attention mixing of `x (N, D)` with the cached
    /// pattern of `layer`; returns `(N, D)`.
    fn attn_mix(&self, fb: &FlatBatch, layer: usize, x: &[f32]) -> Vec<f32> {
        let (b, s, d, h, dh) = (fb.b, fb.s, self.d, self.n_heads, self.d_head);
        let hd = h * dh;
        let n = b * s;
        let lc = &self.layers[layer];
        let mut v = vec![0f32; n * hd];
        sgemm(n, hd, d, x, d, 1, &lc.w_v, hd, 1, &mut v, false, true);
        let mut m = vec![0f32; n * hd];
        let p = &fb.pattern[layer];
        m.par_chunks_mut(s * hd).enumerate().for_each(|(bi, mb)| {
            for hh in 0..h {
                // M[b, :, h, :] = P[b, h] (S, S) · V[b, :, h, :] (S, dh)
                let pb = &p[(bi * h + hh) * s * s..(bi * h + hh + 1) * s * s];
                let vb = &v[bi * s * hd + hh * dh..];
                let mut out = vec![0f32; s * dh];
                sgemm(s, dh, s, pb, s, 1, vb, hd, 1, &mut out, false, false);
                for q in 0..s {
                    mb[q * hd + hh * dh..q * hd + (hh + 1) * dh].copy_from_slice(&out[q * dh..(q + 1) * dh]);
                }
            }
        });
        let mut out = vec![0f32; n * d];
        sgemm(n, d, hd, &m, hd, 1, &lc.w_o, d, 1, &mut out, false, true);
        out
    }

    /// Transpose of [`attn_mix`](Self::attn_mix): `gX` from `g_out (N, D)`.
    fn attn_mix_back(&self, fb: &FlatBatch, layer: usize, g_out: &[f32]) -> Vec<f32> {
        let (b, s, d, h, dh) = (fb.b, fb.s, self.d, self.n_heads, self.d_head);
        let hd = h * dh;
        let n = b * s;
        let lc = &self.layers[layer];
        // gM = g_out W_Oᵀ
        let mut gm = vec![0f32; n * hd];
        sgemm(n, hd, d, g_out, d, 1, &lc.w_o, 1, d, &mut gm, false, true);
        let p = &fb.pattern[layer];
        let mut gv = vec![0f32; n * hd];
        gv.par_chunks_mut(s * hd).enumerate().for_each(|(bi, gvb)| {
            for hh in 0..h {
                // gV[b, :, h, :] = P[b, h]ᵀ · gM[b, :, h, :]
                let pb = &p[(bi * h + hh) * s * s..(bi * h + hh + 1) * s * s];
                let gmb = &gm[bi * s * hd + hh * dh..];
                let mut out = vec![0f32; s * dh];
                sgemm(s, dh, s, pb, 1, s, gmb, hd, 1, &mut out, false, false);
                for p_ in 0..s {
                    gvb[p_ * hd + hh * dh..p_ * hd + (hh + 1) * dh].copy_from_slice(&out[p_ * dh..(p_ + 1) * dh]);
                }
            }
        });
        // gX = gV W_Vᵀ
        let mut gx = vec![0f32; n * d];
        sgemm(n, d, hd, &gv, hd, 1, &lc.w_v, 1, hd, &mut gx, false, true);
        gx
    }

    /// Run the pruned pass on a batch.
    pub fn forward(&self, fb: &FlatBatch) -> Result<State> {
        self.forward_with_dead(fb, None)
    }

    /// Run the pruned pass; with `dead` masks (per module), also select each module's AuxK
    /// latents: the `min(D/2, n_dead)` largest ReLU'd pre-top-k activations among dead ones.
    pub fn forward_with_dead(&self, fb: &FlatBatch, dead: Option<&[Vec<bool>]>) -> Result<State> {
        let mut prof = Profile::new();
        let (b, s, d, f, k) = (fb.b, fb.s, self.d, self.f, self.k);
        let n = b * s;
        let mut states: Vec<ModuleState> = Vec::with_capacity(self.suite.modules.len());
        for (di, module) in self.suite.modules.iter().enumerate() {
            let pd = &self.params[di];
            let plan_d = self.plan.down(di);
            let ups = &plan_d.ups;
            let l = module.layer;
            let mut ub = vec![0f32; d];
            for &u in ups {
                add_into(&mut ub, &self.params[u].b_dec);
            }
            // Z: the d_model-space encoder input.
            let z = match module.kind {
                Kind::Mlp => {
                    let sc = &fb.s2[l];
                    let mut z = fb.r0.clone();
                    if self.plan.sparse {
                        z.par_chunks_mut(d).for_each(|row| add_into(row, &ub));
                    } else {
                        for &u in ups {
                            add_into(&mut z, &states[u].recon);
                        }
                    }
                    z.par_chunks_mut(d).zip(sc.par_iter()).for_each(|(row, &sv)| row.iter_mut().for_each(|x| *x /= sv));
                    z
                }
                Kind::Attn => {
                    let sc = &fb.s1[l];
                    let mut x = fb.r0.clone();
                    if !self.plan.sparse {
                        for &u in ups {
                            add_into(&mut x, &states[u].recon);
                            for row in x.chunks_mut(d) {
                                axpy(-1.0, &self.params[u].b_dec, row);
                            }
                        }
                    }
                    if self.opts.consistent_attn_bias {
                        x.par_chunks_mut(d).for_each(|row| add_into(row, &ub));
                    }
                    x.par_chunks_mut(d).zip(sc.par_iter()).for_each(|(row, &sv)| row.iter_mut().for_each(|v| *v /= sv));
                    let mut z = self.attn_mix(fb, l, &x);
                    let b_o = &self.layers[l].b_o;
                    let mut c = vec![0f32; d];
                    if !self.opts.consistent_attn_bias && !ups.is_empty() {
                        sgemm(1, d, d, &ub, d, 1, &self.layers[l].w_ov_sum, d, 1, &mut c, false, false);
                    }
                    z.par_chunks_mut(d).zip(sc.par_iter()).for_each(|(row, &sv)| {
                        add_into(row, b_o);
                        axpy(1.0 / sv, &c, row);
                    });
                    z
                }
            };
            // a = Z Eᵀ + b_enc − E b_dec
            let mut a = vec![0f32; n * f];
            prof.mark("Z");
            sgemm(n, f, d, &z, d, 1, &pd.enc, 1, d, &mut a, false, true);
            let bias: Vec<f32> = (0..f).map(|i| pd.b_enc[i] - dot(&pd.enc[i * d..(i + 1) * d], &pd.b_dec)).collect();
            a.par_chunks_mut(f).for_each(|row| add_into(row, &bias));
            prof.mark("Z·Eᵀ");
            // Sparse edge terms.
            let (mut w, mut w_col, mut ev, mut dv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            if self.plan.sparse && !ups.is_empty() {
                let index = plan_d.index.as_ref().expect("sparse plan");
                match module.kind {
                    Kind::Mlp => {
                        w_col = index.to_col_order(&self.mlp_edge_weights(di, index), 1);
                        prof.mark("mlp w");
                        self.mlp_edges_forward(fb, di, index, &w_col, &states, &mut a);
                        prof.mark("mlp edges");
                    }
                    Kind::Attn => {
                        let (w_, ev_, dv_) = self.attn_edge_weights(di, l, index);
                        w = w_;
                        ev = ev_;
                        dv = dv_;
                        w_col = index.to_col_order(&w, self.n_heads);
                        prof.mark("attn w");
                        self.attn_edges_forward(fb, di, l, index, &w_col, &states, &mut a);
                        prof.mark("attn edges");
                    }
                }
            }
            // top-k, ReLU, decode
            let idx = topk_indices(&a, f, k);
            prof.mark("top-k");
            let val: Vec<f32> = idx.iter().enumerate().map(|(j, &i)| a[(j / k) * f + i as usize].max(0.0)).collect();
            let mut recon = vec![0f32; n * d];
            recon.par_chunks_mut(d).enumerate().for_each(|(t, r)| {
                r.copy_from_slice(&pd.b_dec);
                for kk in 0..k {
                    let v = val[t * k + kk];
                    if v != 0.0 {
                        let i = idx[t * k + kk] as usize;
                        axpy(v, &pd.dec_t[i * d..(i + 1) * d], r);
                    }
                }
            });
            let (mut aux_idx, mut aux_val, mut k_aux, mut n_dead) = (Vec::new(), Vec::new(), 0, 0);
            if let Some(mask) = dead.map(|m| &m[di]) {
                n_dead = mask.iter().filter(|&&x| x).count();
                if n_dead > 0 {
                    k_aux = (d / 2).min(n_dead).max(1);
                    let masked: Vec<f32> = a
                        .par_chunks(f)
                        .flat_map_iter(|r| {
                            r.iter().zip(mask).map(|(v, &dd)| if dd { v.max(0.0) } else { f32::NEG_INFINITY })
                        })
                        .collect();
                    aux_idx = topk_indices(&masked, f, k_aux);
                    aux_val = aux_idx
                        .iter()
                        .enumerate()
                        .map(|(j, &i)| masked[(j / k_aux) * f + i as usize].max(0.0))
                        .collect();
                }
            }
            states.push(ModuleState {
                idx,
                val,
                recon,
                z,
                w,
                w_col,
                ev,
                dv,
                aux_idx,
                aux_val,
                k_aux,
                n_dead,
                aux_g: Vec::new(),
            });
            prof.mark("decode, AuxK");
        }
        prof.report("forward");
        Ok(State { modules: states })
    }

    /// `w[i,c] = E[i] · W_dec^{u}[:, j]` for every slot.
    fn mlp_edge_weights(&self, di: usize, index: &EdgeIndex) -> Vec<f32> {
        let (d, f) = (self.d, self.f);
        let ups = &self.plan.down(di).ups;
        let enc = &self.params[di].enc;
        let width = index.width;
        let mut w = vec![0f32; f * width];
        w.par_chunks_mut(width).enumerate().for_each(|(i, wrow)| {
            for (c, wv) in wrow.iter_mut().enumerate() {
                let col = index.slot_col[i * width + c];
                if col != crate::sparse_ops::EMPTY {
                    let (pu, j) = (col as usize / f, col as usize % f);
                    *wv = dot(&enc[i * d..(i + 1) * d], &self.params[ups[pu]].dec_t[j * d..(j + 1) * d]);
                }
            }
        });
        w
    }

    /// Attention edge weights `w_h[i,c] = (E W_Oᵀ)[i, h] · (W_decᵀ W_V)[j, h]` (d_head dots),
    /// with the two factors.
    fn attn_edge_weights(&self, di: usize, layer: usize, index: &EdgeIndex) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let (d, f, h, dh) = (self.d, self.f, self.n_heads, self.d_head);
        let hd = h * dh;
        let lc = &self.layers[layer];
        let ups = &self.plan.down(di).ups;
        let mut ev = vec![0f32; f * hd];
        sgemm(f, hd, d, &self.params[di].enc, d, 1, &lc.w_o, 1, d, &mut ev, false, true);
        let dv: Vec<Vec<f32>> = ups
            .iter()
            .map(|&u| {
                let mut o = vec![0f32; f * hd];
                sgemm(f, hd, d, &self.params[u].dec_t, d, 1, &lc.w_v, hd, 1, &mut o, false, true);
                o
            })
            .collect();
        let width = index.width;
        let mut w = vec![0f32; f * width * h];
        w.par_chunks_mut(width * h).enumerate().for_each(|(i, wrow)| {
            for c in 0..width {
                let col = index.slot_col[i * width + c];
                if col == crate::sparse_ops::EMPTY {
                    continue;
                }
                let (pu, j) = (col as usize / f, col as usize % f);
                for hh in 0..h {
                    wrow[c * h + hh] = dot(
                        &ev[i * hd + hh * dh..i * hd + (hh + 1) * dh],
                        &dv[pu][j * hd + hh * dh..j * hd + (hh + 1) * dh],
                    );
                }
            }
        });
        (w, ev, dv)
    }

    fn mlp_edges_forward(
        &self,
        fb: &FlatBatch,
        di: usize,
        index: &EdgeIndex,
        w_col: &[f32],
        states: &[ModuleState],
        a: &mut [f32],
    ) {
        let (f, k) = (self.f, self.k);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s2[self.suite.modules[di].layer];
        a.par_chunks_mut(f).enumerate().for_each(|(t, arow)| {
            let inv = 1.0 / sc[t];
            for (_, _, v, col) in active_ups(states, ups, t, k, f) {
                let x = v * inv;
                let r = index.col_range(col);
                for (&wv, &i) in w_col[r.clone()].iter().zip(&index.rev_down[r]) {
                    arow[i as usize] += wv * x;
                }
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn attn_edges_forward(
        &self,
        fb: &FlatBatch,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        w_col: &[f32],
        states: &[ModuleState],
        a: &mut [f32],
    ) {
        let (s, f, k, h) = (fb.s, self.f, self.k, self.n_heads);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s1[layer];
        let p = &fb.pattern[layer];
        // Per-thread buffers, reused across sequences (no fresh pages per sequence).
        let init = || (vec![0f32; s * h * f], vec![0f32; s * s * h]);
        a.par_chunks_mut(s * f).enumerate().for_each_init(init, |(y, pq), (bi, ab)| {
            // Y[p, h, i] = Σ_edges w_h · f_u[p, j] / s1[p]
            y.fill(0.0);
            for pp in 0..s {
                let t = bi * s + pp;
                let inv = 1.0 / sc[t];
                for (_, _, v, col) in active_ups(states, ups, t, k, f) {
                    let x = v * inv;
                    let r = index.col_range(col);
                    for (ws, &i) in w_col[r.start * h..r.end * h].chunks_exact(h).zip(&index.rev_down[r]) {
                        for (hh, &wv) in ws.iter().enumerate() {
                            y[(pp * h + hh) * f + i as usize] += wv * x;
                        }
                    }
                }
            }
            // a[q] += Σ_{p ≤ q} Σ_h P_h[q, p] Y[p, h]: one product over (key, head) pairs,
            // with the pattern laid out as [q][p][h].
            pattern_qph(&p[bi * h * s * s..(bi + 1) * h * s * s], s, h, pq);
            causal_mix(s, f, h, pq, y, ab);
        });
    }

    /// AuxK of every module with dead latents (the definition of [`crate::sae`]: the AuxK
    /// latents reconstruct the detached residual `r = T − R` without bias;
    /// `AuxK = scale · Σ (ê − r)² / Σ (r − r̄)²`, `scale = min(n_dead / (D/2), 1)`), storing
    /// `alpha ×` its gradient for [`backward`](Self::backward). Returns AuxK per module (0 when
    /// no latent is dead).
    pub fn auxk_loss_and_grad(&self, fb: &FlatBatch, state: &mut State, alpha: f64) -> Vec<f64> {
        let d = self.d;
        let n = fb.b * fb.s;
        let mut out = Vec::with_capacity(state.modules.len());
        for (m, st) in state.modules.iter_mut().enumerate() {
            if st.k_aux == 0 {
                out.push(0.0);
                continue;
            }
            let ka = st.k_aux;
            let dec_t = &self.params[m].dec_t;
            let mut ehat = vec![0f32; n * d];
            ehat.par_chunks_mut(d).enumerate().for_each(|(t, row)| {
                for j in 0..ka {
                    let v = st.aux_val[t * ka + j];
                    if v != 0.0 {
                        let i = st.aux_idx[t * ka + j] as usize;
                        axpy(v, &dec_t[i * d..(i + 1) * d], row);
                    }
                }
            });
            let r: Vec<f32> = fb.targets[m].iter().zip(&st.recon).map(|(t, x)| t - x).collect();
            let mut mean = vec![0f64; d];
            for row in r.chunks(d) {
                mean.iter_mut().zip(row).for_each(|(a, v)| *a += *v as f64 / n as f64);
            }
            let den: f64 = r
                .chunks(d)
                .map(|row| row.iter().zip(&mean).map(|(v, mu)| (*v as f64 - mu).powi(2)).sum::<f64>())
                .sum::<f64>()
                .max(1e-30);
            let num: f64 = ehat.iter().zip(&r).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let scale = (st.n_dead as f64 / (d / 2).max(1) as f64).min(1.0);
            out.push(scale * num / den);
            let coef = alpha * scale * 2.0 / den;
            st.aux_g = ehat.iter().zip(&r).map(|(a, b)| (coef * (a - b) as f64) as f32).collect();
        }
        out
    }

    /// Backpropagate `g_recon[m] (N, D)` (the loss gradient w.r.t. every reconstruction)
    /// through the pass; returns the gradient of every parameter.
    pub fn backward(&self, fb: &FlatBatch, state: &State, mut g_recon: Vec<Vec<f32>>) -> Result<Vec<ModuleGrads>> {
        let mut prof = Profile::new();
        let (b, s, d, f, k) = (fb.b, fb.s, self.d, self.f, self.k);
        let n = b * s;
        let n_mod = self.suite.modules.len();
        // Gradient w.r.t. reconstructions without b_dec (attention inputs under all connections).
        let mut g_recon_nb: Vec<Vec<f32>> = vec![Vec::new(); n_mod];
        // Gradient w.r.t. each module's selected feature values (N, K).
        let mut g_val: Vec<Vec<f32>> = (0..n_mod).map(|_| vec![0f32; n * k]).collect();
        let mut grads: Vec<Option<ModuleGrads>> = vec![None; n_mod];
        // Gradients w.r.t. W_decᵀ (F, D) that downstream edge weights send to each module.
        let mut g_dec_t_in: Vec<Vec<f32>> = vec![Vec::new(); n_mod];
        let mut g_bdec_extra: Vec<Vec<f32>> = vec![vec![0f32; d]; n_mod];
        for di in (0..n_mod).rev() {
            let module = self.suite.modules[di];
            let l = module.layer;
            let pd = &self.params[di];
            let st = &state.modules[di];
            let plan_d = self.plan.down(di);
            let ups = &plan_d.ups;
            // Decode: recon = Σ val·dec_t[idx] + b_dec. b_dec gets the gradient of the
            // reconstruction with bias only; the decoder gets both.
            let mut g_rec = std::mem::take(&mut g_recon[di]);
            let mut g_bdec: Vec<f32> = vec![0f32; d];
            for row in g_rec.chunks(d) {
                add_into(&mut g_bdec, row);
            }
            if !g_recon_nb[di].is_empty() {
                add_into(&mut g_rec, &g_recon_nb[di]);
            }
            let gv = &mut g_val[di];
            gv.par_chunks_mut(k).enumerate().for_each(|(t, gvr)| {
                let gr = &g_rec[t * d..(t + 1) * d];
                for kk in 0..k {
                    if st.val[t * k + kk] != 0.0 {
                        let i = st.idx[t * k + kk] as usize;
                        gvr[kk] += dot(gr, &pd.dec_t[i * d..(i + 1) * d]);
                    }
                }
            });
            let mut g_dec_t = by_feature(&st.idx, k, f, d, |j| st.val[j], &g_rec);
            // Through ReLU + top-k: sparse gradient of the pre-activation, (t, kk) -> g; with
            // AuxK, k_aux more entries per token (dead latents).
            let pg = if st.aux_g.is_empty() {
                PreGrad {
                    idx: st.idx.clone(),
                    g: (0..n * k).map(|j| if st.val[j] > 0.0 { gv[j] } else { 0.0 }).collect(),
                    kb: k,
                }
            } else {
                let ka = st.k_aux;
                let kb = k + ka;
                let (mut idx, mut g) = (vec![0u32; n * kb], vec![0f32; n * kb]);
                for t in 0..n {
                    for kk in 0..k {
                        idx[t * kb + kk] = st.idx[t * k + kk];
                        g[t * kb + kk] = if st.val[t * k + kk] > 0.0 { gv[t * k + kk] } else { 0.0 };
                    }
                    let ag = &st.aux_g[t * d..(t + 1) * d];
                    for j in 0..ka {
                        let (i, v) = (st.aux_idx[t * ka + j] as usize, st.aux_val[t * ka + j]);
                        idx[t * kb + k + j] = i as u32;
                        if v > 0.0 {
                            g[t * kb + k + j] = dot(ag, &pd.dec_t[i * d..(i + 1) * d]);
                            axpy(v, ag, &mut g_dec_t[i * d..(i + 1) * d]);
                        }
                    }
                }
                PreGrad { idx, g, kb }
            };
            // a = Z Eᵀ + b_enc − E b_dec^d
            let mut g_benc = vec![0f32; f];
            for (j, &g) in pg.g.iter().enumerate() {
                if g != 0.0 {
                    g_benc[pg.idx[j] as usize] += g;
                }
            }
            // gE += g_preᵀ Z, gZ = g_pre E  (sparse: k per row)
            let mut g_z = vec![0f32; n * d];
            g_z.par_chunks_mut(d).enumerate().for_each(|(t, gzr)| {
                for kk in 0..pg.kb {
                    let g = pg.g[t * pg.kb + kk];
                    if g != 0.0 {
                        let i = pg.idx[t * pg.kb + kk] as usize;
                        axpy(g, &pd.enc[i * d..(i + 1) * d], gzr);
                    }
                }
            });
            let mut g_enc = by_feature(&pg.idx, pg.kb, f, d, |j| pg.g[j], &st.z);
            // − E b_dec: gE[i] −= g_benc[i] b_dec; g b_dec −= Σ_i g_benc[i] E[i]
            for i in 0..f {
                if g_benc[i] != 0.0 {
                    axpy(-g_benc[i], &pd.b_dec, &mut g_enc[i * d..(i + 1) * d]);
                    axpy(-g_benc[i], &pd.enc[i * d..(i + 1) * d], &mut g_bdec);
                }
            }
            // Z's inputs.
            let mut g_ub = vec![0f32; d];
            match module.kind {
                Kind::Mlp => {
                    let sc = &fb.s2[l];
                    let gx: Vec<f32> =
                        g_z.chunks(d).zip(sc).flat_map(|(r, &sv)| r.iter().map(move |x| x / sv)).collect();
                    if self.plan.sparse {
                        for row in gx.chunks(d) {
                            add_into(&mut g_ub, row);
                        }
                    } else {
                        for &u in ups {
                            add_into(&mut g_recon[u], &gx);
                        }
                    }
                }
                Kind::Attn => {
                    let sc = &fb.s1[l];
                    if !self.opts.consistent_attn_bias && !ups.is_empty() {
                        // Z[t] += (ub W_OVsum) / s1[t]
                        let mut gc = vec![0f32; d];
                        for (row, &sv) in g_z.chunks(d).zip(sc) {
                            axpy(1.0 / sv, row, &mut gc);
                        }
                        let mut gub = vec![0f32; d];
                        sgemm(1, d, d, &gc, d, 1, &self.layers[l].w_ov_sum, 1, d, &mut gub, false, false);
                        add_into(&mut g_ub, &gub);
                    }
                    if !self.plan.sparse || self.opts.consistent_attn_bias {
                        let gx = self.attn_mix_back(fb, l, &g_z);
                        let gx: Vec<f32> =
                            gx.chunks(d).zip(sc).flat_map(|(r, &sv)| r.iter().map(move |x| x / sv)).collect();
                        if self.opts.consistent_attn_bias {
                            for row in gx.chunks(d) {
                                add_into(&mut g_ub, row);
                            }
                        }
                        if !self.plan.sparse {
                            for &u in ups {
                                if g_recon_nb[u].is_empty() {
                                    g_recon_nb[u] = vec![0f32; n * d];
                                }
                                add_into(&mut g_recon_nb[u], &gx);
                            }
                        }
                    }
                }
            }
            for &u in ups {
                add_into(&mut g_bdec_extra[u], &g_ub);
            }
            prof.mark("decode, dense");
            // Sparse edges.
            if self.plan.sparse && !ups.is_empty() {
                let index = plan_d.index.as_ref().expect("sparse plan");
                let (before, _) = g_val.split_at_mut(di);
                match module.kind {
                    Kind::Mlp => {
                        let gw = self.mlp_edges_backward(fb, di, index, &st.w_col, &pg, state, before);
                        prof.mark("mlp edges");
                        self.mlp_edge_weights_backward(di, index, &gw, &mut g_enc, &mut g_dec_t_in);
                        prof.mark("mlp w");
                    }
                    Kind::Attn => {
                        let gw = self.attn_edges_backward(fb, di, l, index, &st.w, &pg, state, before);
                        prof.mark("attn edges");
                        self.attn_edge_weights_backward(di, l, index, &gw, st, &mut g_enc, &mut g_dec_t_in);
                        prof.mark("attn w");
                    }
                }
            }
            // Assemble this module's gradients (W_dec from its transpose).
            if !g_dec_t_in[di].is_empty() {
                add_into(&mut g_dec_t, &g_dec_t_in[di]);
            }
            let g_wdec = transpose(&g_dec_t, f, d);
            grads[di] = Some(ModuleGrads { w_enc: g_enc, b_enc: g_benc, w_dec: g_wdec, b_dec: g_bdec });
        }
        prof.mark("assemble");
        prof.report("backward");
        let mut out: Vec<ModuleGrads> = grads.into_iter().map(|g| g.expect("every module visited")).collect();
        for (g, extra) in out.iter_mut().zip(&g_bdec_extra) {
            add_into(&mut g.b_dec, extra);
        }
        Ok(out)
    }

    /// Edge-term backward for an mlp target: returns `g w (F·C)`, adds into upstream `g_val`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_edges_backward(
        &self,
        fb: &FlatBatch,
        di: usize,
        index: &EdgeIndex,
        w_col: &[f32],
        pg: &PreGrad,
        state: &State,
        g_val_up: &mut [Vec<f32>],
    ) -> Vec<f32> {
        let (n, f, k) = (fb.b * fb.s, self.f, self.k);
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s2[self.suite.modules[di].layer];
        // Per token: (g val of every up at t). Collect per-up row slices mutably in parallel by
        // computing into a scratch (N, |U|·K) buffer, then scattering.
        let mut scratch = vec![0f32; n * ups.len() * k];
        let row_len = ups.len() * k;
        let gw_col = fold_rows(&mut scratch, row_len, w_col.len(), |first, block, gw| {
            let mut dense = vec![0f32; f];
            for (r, srow) in block.chunks_mut(row_len).enumerate() {
                let t = first + r;
                for kk in 0..pg.kb {
                    dense[pg.idx[t * pg.kb + kk] as usize] += pg.g[t * pg.kb + kk];
                }
                let inv = 1.0 / sc[t];
                for (pu, kk, v, col) in active_ups(&state.modules, ups, t, k, f) {
                    let x = v * inv;
                    let mut acc = 0f32;
                    let r = index.col_range(col);
                    for (j, &i) in r.clone().zip(&index.rev_down[r]) {
                        let g = dense[i as usize];
                        gw[j] += g * x;
                        acc += g * w_col[j];
                    }
                    srow[pu * k + kk] = acc * inv;
                }
                for kk in 0..pg.kb {
                    dense[pg.idx[t * pg.kb + kk] as usize] = 0.0;
                }
            }
        });
        add_up_value_grads(ups, &scratch, n, k, g_val_up);
        index.to_slot_order(&gw_col, 1)
    }

    fn mlp_edge_weights_backward(
        &self,
        di: usize,
        index: &EdgeIndex,
        gw: &[f32],
        g_enc: &mut [f32],
        g_dec_t_in: &mut [Vec<f32>],
    ) {
        let (d, f) = (self.d, self.f);
        let ups = &self.plan.down(di).ups;
        let enc = &self.params[di].enc;
        let width = index.width;
        let mut g_dec_t_up: Vec<Vec<f32>> = ups.iter().map(|_| vec![0f32; f * d]).collect();
        for i in 0..f {
            for c in 0..width {
                let slot = i * width + c;
                let col = index.slot_col[slot];
                if col == crate::sparse_ops::EMPTY || gw[slot] == 0.0 {
                    continue;
                }
                let (pu, j) = (col as usize / f, col as usize % f);
                let dec = &self.params[ups[pu]].dec_t[j * d..(j + 1) * d];
                axpy(gw[slot], dec, &mut g_enc[i * d..(i + 1) * d]);
                axpy(gw[slot], &enc[i * d..(i + 1) * d], &mut g_dec_t_up[pu][j * d..(j + 1) * d]);
            }
        }
        add_dec_t_grads(ups, g_dec_t_up, g_dec_t_in);
    }

    /// Edge-term backward for an attention target.
    #[allow(clippy::too_many_arguments)]
    fn attn_edges_backward(
        &self,
        fb: &FlatBatch,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        w: &[f32],
        pg: &PreGrad,
        state: &State,
        g_val_up: &mut [Vec<f32>],
    ) -> Vec<f32> {
        let (s, f, k, h) = (fb.s, self.f, self.k, self.n_heads);
        let n = fb.b * s;
        let ups = &self.plan.down(di).ups;
        let sc = &fb.s1[layer];
        let p = &fb.pattern[layer];
        let mut scratch = vec![0f32; n * ups.len() * k];
        let seq_len = s * ups.len() * k;
        let gw = fold_rows(&mut scratch, seq_len, w.len(), |first, block, gw| {
            for (r, sb) in block.chunks_mut(seq_len).enumerate() {
                let bi = first + r;
                // gY_h[p, i] = Σ_{q ≥ p} P[h, q, p] g_pre[q, i], g_pre having k entries per row.
                let kb = pg.kb;
                let pb = &p[bi * h * s * s..(bi + 1) * h * s * s];
                // All of gY, pushed from gA's k non-zeros per query (cheaper than the per-(p, i)
                // sums further below at every size measured, d_model 64–128, F 256–2048,
                // C 8–64), unless its F·S·H buffer is large.
                if self.dense_attn_grad.unwrap_or(f * s * h <= 1 << 24) {
                    // gY as [i][p][h]: every non-zero gA[q, i] (k per query) adds
                    // gA[q, i] · P[q, 0..=q, ·] — one contiguous row of the [q][p][h] pattern.
                    let mut pq = vec![0f32; s * s * h];
                    pattern_qph(pb, s, h, &mut pq);
                    let mut gy = vec![0f32; f * s * h];
                    for q in 0..s {
                        let prow = &pq[q * s * h..q * s * h + (q + 1) * h];
                        for kk in 0..kb {
                            let g = pg.g[(bi * s + q) * kb + kk];
                            if g != 0.0 {
                                let i = pg.idx[(bi * s + q) * kb + kk] as usize;
                                axpy(g, prow, &mut gy[i * s * h..i * s * h + (q + 1) * h]);
                            }
                        }
                    }
                    self.attn_edge_grads_by_feature(fb, bi, index, w, &gy, state, ups, sc, sb, gw);
                    continue;
                }
                // Sparse: gY_h[p, i] = Σ_{q ≥ p} P[h, q, p] g_pre[q, i] only for the (p, i)
                // that an active upstream feature at p connects to. g_pre has k entries per row:
                // index it by column (feature i -> its (q, g) entries, q ascending).
                let mut col_ptr = vec![0u32; f + 1];
                for q in 0..s {
                    for kk in 0..kb {
                        if pg.g[(bi * s + q) * kb + kk] != 0.0 {
                            col_ptr[pg.idx[(bi * s + q) * kb + kk] as usize + 1] += 1;
                        }
                    }
                }
                for i in 0..f {
                    col_ptr[i + 1] += col_ptr[i];
                }
                let mut fill = col_ptr.clone();
                let mut entries = vec![(0u32, 0f32); col_ptr[f] as usize];
                for q in 0..s {
                    for kk in 0..kb {
                        let g = pg.g[(bi * s + q) * kb + kk];
                        if g != 0.0 {
                            let i = pg.idx[(bi * s + q) * kb + kk] as usize;
                            entries[fill[i] as usize] = (q as u32, g);
                            fill[i] += 1;
                        }
                    }
                }
                // Otherwise, per key position, a cache of gY_h[p, i] for the i touched at p.
                let mut stamp = vec![u32::MAX; f];
                let mut cache = vec![0f32; f * h];
                for pp in 0..s {
                    let t = bi * s + pp;
                    let inv = 1.0 / sc[t];
                    for (pu, kk, v, col) in active_ups(&state.modules, ups, t, k, f) {
                        let mut acc = 0f32;
                        for (slot, i) in index.edges(col) {
                            if stamp[i] != pp as u32 {
                                stamp[i] = pp as u32;
                                let gyi = &mut cache[i * h..(i + 1) * h];
                                gyi.iter_mut().for_each(|x| *x = 0.0);
                                for &(q, g) in &entries[col_ptr[i] as usize..col_ptr[i + 1] as usize] {
                                    let q = q as usize;
                                    if q < pp {
                                        continue;
                                    }
                                    for (hh, gy) in gyi.iter_mut().enumerate() {
                                        *gy += pb[(hh * s + q) * s + pp] * g;
                                    }
                                }
                            }
                            let gyi = &cache[i * h..(i + 1) * h];
                            for (hh, &g) in gyi.iter().enumerate() {
                                gw[slot as usize * h + hh] += g * v * inv;
                                acc += g * w[slot as usize * h + hh];
                            }
                        }
                        sb[(pp * ups.len() + pu) * k + kk] = acc * inv;
                    }
                }
            }
        });
        add_up_value_grads(ups, &scratch, n, k, g_val_up);
        gw
    }

    /// The attention edge gradients of one sequence `bi` given all of `gY [i][p][h]`, visited
    /// by downstream feature so that `gY[i]`, the edge weights and their gradients are read in
    /// order: `gw[slot] += gY[i, p] · v / s1[p]` and, for the upstream value at `(p, u, kk)`,
    /// `sb += (gY[i, p] · w[slot]) / s1[p]`.
    #[allow(clippy::too_many_arguments)]
    fn attn_edge_grads_by_feature(
        &self,
        fb: &FlatBatch,
        bi: usize,
        index: &EdgeIndex,
        w: &[f32],
        gy: &[f32],
        state: &State,
        ups: &[usize],
        sc: &[f32],
        sb: &mut [f32],
        gw: &mut [f32],
    ) {
        let (s, f, k, h) = (fb.s, self.f, self.k, self.n_heads);
        let width = index.width;
        let per_pos = ups.len() * k;
        // Active upstream values of this sequence by upstream column: (position in sb, v / s1).
        let n_cols = ups.len() * f;
        let mut ptr = vec![0u32; n_cols + 1];
        for pp in 0..s {
            for (_, _, _, col) in active_ups(&state.modules, ups, bi * s + pp, k, f) {
                ptr[col + 1] += 1;
            }
        }
        for c in 0..n_cols {
            ptr[c + 1] += ptr[c];
        }
        let mut fill = ptr.clone();
        let mut act = vec![(0u32, 0f32); ptr[n_cols] as usize];
        let inv: Vec<f32> = (0..s).map(|pp| 1.0 / sc[bi * s + pp]).collect();
        for pp in 0..s {
            for (pu, kk, v, col) in active_ups(&state.modules, ups, bi * s + pp, k, f) {
                act[fill[col] as usize] = (((pp * ups.len() + pu) * k + kk) as u32, v * inv[pp]);
                fill[col] += 1;
            }
        }
        for i in 0..f {
            let gyi = &gy[i * s * h..(i + 1) * s * h];
            for c in 0..width {
                let slot = i * width + c;
                let col = index.slot_col[slot];
                if col == crate::sparse_ops::EMPTY {
                    continue;
                }
                let col = col as usize;
                let wv = &w[slot * h..(slot + 1) * h];
                let gws = &mut gw[slot * h..(slot + 1) * h];
                for &(e, vinv) in &act[ptr[col] as usize..ptr[col + 1] as usize] {
                    let pp = e as usize / per_pos;
                    let g = &gyi[pp * h..(pp + 1) * h];
                    let mut acc = 0f32;
                    for hh in 0..h {
                        gws[hh] += g[hh] * vinv;
                        acc += g[hh] * wv[hh];
                    }
                    sb[e as usize] += acc * inv[pp];
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attn_edge_weights_backward(
        &self,
        di: usize,
        layer: usize,
        index: &EdgeIndex,
        gw: &[f32],
        st: &ModuleState,
        g_enc: &mut [f32],
        g_dec_t_in: &mut [Vec<f32>],
    ) {
        let (d, f, h, dh) = (self.d, self.f, self.n_heads, self.d_head);
        let hd = h * dh;
        let ups = &self.plan.down(di).ups;
        let lc = &self.layers[layer];
        let width = index.width;
        let mut g_ev = vec![0f32; f * hd];
        let mut g_dv: Vec<Vec<f32>> = ups.iter().map(|_| vec![0f32; f * hd]).collect();
        for i in 0..f {
            for c in 0..width {
                let slot = i * width + c;
                let col = index.slot_col[slot];
                if col == crate::sparse_ops::EMPTY {
                    continue;
                }
                let (pu, j) = (col as usize / f, col as usize % f);
                for hh in 0..h {
                    let g = gw[slot * h + hh];
                    if g == 0.0 {
                        continue;
                    }
                    let r = hh * dh..(hh + 1) * dh;
                    let (evr, dvr) = (i * hd + r.start..i * hd + r.end, j * hd + r.start..j * hd + r.end);
                    axpy(g, &st.dv[pu][dvr.clone()], &mut g_ev[evr.clone()]);
                    axpy(g, &st.ev[evr], &mut g_dv[pu][dvr]);
                }
            }
        }
        // ev = E W_Oᵀ -> gE += g_ev W_O ; dv_u = W_decᵀ_u W_V -> g W_decᵀ_u += g_dv W_Vᵀ
        sgemm(f, d, hd, &g_ev, hd, 1, &lc.w_o, d, 1, g_enc, true, true);
        let g_dec_t_up: Vec<Vec<f32>> = g_dv
            .iter()
            .map(|gdv| {
                let mut o = vec![0f32; f * d];
                sgemm(f, d, hd, gdv, hd, 1, &lc.w_v, 1, hd, &mut o, false, true);
                o
            })
            .collect();
        add_dec_t_grads(ups, g_dec_t_up, g_dec_t_in);
    }
}

/// `out (S, F) += P (S, S·H) · Y (S·H, F)` for a causal pattern over `h` heads
/// (`P[q, p·H + h] = 0` for p > q): only the blocks on or below the diagonal are multiplied.
fn causal_mix(s: usize, f: usize, h: usize, p: &[f32], y: &[f32], out: &mut [f32]) {
    const BLOCK: usize = 32;
    let mut q0 = 0;
    while q0 < s {
        let qn = BLOCK.min(s - q0);
        // keys 0 ..= last query of this block, all heads
        let kn = (q0 + qn) * h;
        sgemm(qn, f, kn, &p[q0 * s * h..], s * h, 1, y, f, 1, &mut out[q0 * f..(q0 + qn) * f], true, false);
        q0 += qn;
    }
}

/// One sequence's pattern `(H, S_q, S_k)` re-laid as `[q][p][h]` (zeros above the diagonal),
/// the layout of the head-combined product [`causal_mix`] and of the pushed gradient.
fn pattern_qph(pb: &[f32], s: usize, h: usize, pq: &mut [f32]) {
    pq.fill(0.0);
    for hh in 0..h {
        for q in 0..s {
            for pp in 0..=q {
                pq[(q * s + pp) * h + hh] = pb[(hh * s + q) * s + pp];
            }
        }
    }
}

/// The reference FVU loss `Σ_m FVU_m` and its gradient w.r.t. every reconstruction.
pub fn mse_loss_and_grad(fb: &FlatBatch, state: &State, d: usize) -> (f64, Vec<Vec<f32>>) {
    let (fvus, grads) = mse_per_module(fb, state, d);
    (fvus.iter().sum(), grads)
}

/// Each module's reference FVU (`Σ var_b(T−R) / Σ var_b(T)`, unbiased variance over the batch
/// axis per (position, dim)) and its gradient w.r.t. the module's reconstruction.
pub fn mse_per_module(fb: &FlatBatch, state: &State, d: usize) -> (Vec<f64>, Vec<Vec<f32>>) {
    let (b, s) = (fb.b, fb.s);
    let sd = s * d;
    let mut fvus = Vec::new();
    let mut grads = Vec::new();
    for (m, st) in state.modules.iter().enumerate() {
        let t = &fb.targets[m];
        let e: Vec<f32> = t.iter().zip(&st.recon).map(|(a, r)| a - r).collect();
        let mean = |x: &[f32]| -> Vec<f64> {
            let mut mu = vec![0f64; sd];
            for bi in 0..b {
                for (j, v) in x[bi * sd..(bi + 1) * sd].iter().enumerate() {
                    mu[j] += *v as f64;
                }
            }
            mu.iter_mut().for_each(|v| *v /= b as f64);
            mu
        };
        let (me, mt) = (mean(&e), mean(t));
        let (mut num, mut den) = (0f64, 0f64);
        for bi in 0..b {
            for j in 0..sd {
                num += (e[bi * sd + j] as f64 - me[j]).powi(2);
                den += (t[bi * sd + j] as f64 - mt[j]).powi(2);
            }
        }
        // FVU = num/den (the (B−1) factors cancel); dFVU/dR = −2 (e − ē) / den
        fvus.push(num / den);
        grads.push((0..b * sd).map(|x| (-2.0 * (e[x] as f64 - me[x % sd]) / den) as f32).collect());
    }
    (fvus, grads)
}

/// CE with the suite spliced in and its gradient w.r.t. every reconstruction (all equal: the
/// residual is their sum). Returns (mean CE over batch·(pos−1), gradient).
pub fn ce_loss_and_grad(rt: &Runtime, fb: &FlatBatch, state: &State, d: usize) -> Result<(f64, Vec<Vec<f32>>)> {
    let (b, s) = (fb.b, fb.s);
    let n = b * s;
    let mut resid = fb.r0.clone();
    for st in &state.modules {
        add_into(&mut resid, &st.recon);
    }
    let w_u = to_vec(&rt.weights.w_u)?; // (D, V)
    let b_u = to_vec(&rt.weights.b_u)?;
    let v = b_u.len();
    let eps = rt.cfg.ln_eps as f32;
    let count = (b * (s - 1)) as f64;
    let mut g_resid = vec![0f32; n * d];
    // Rows in chunks so the logits never exist for the whole batch.
    let chunk = 64usize;
    let losses: Vec<f64> = g_resid
        .par_chunks_mut(chunk * d)
        .enumerate()
        .map(|(ci, gchunk)| {
            let rows = gchunk.len() / d;
            let t0 = ci * chunk;
            let mut normed = vec![0f32; rows * d];
            let mut sig = vec![0f32; rows];
            for r in 0..rows {
                let x = &resid[(t0 + r) * d..(t0 + r + 1) * d];
                let mu = x.iter().sum::<f32>() / d as f32;
                let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d as f32;
                let sd = (var + eps).sqrt();
                sig[r] = sd;
                for j in 0..d {
                    normed[r * d + j] = (x[j] - mu) / sd;
                }
            }
            let mut logits = vec![0f32; rows * v];
            sgemm(rows, v, d, &normed, d, 1, &w_u, v, 1, &mut logits, false, false);
            let mut loss = 0f64;
            let mut glog = vec![0f32; rows * v];
            for r in 0..rows {
                let t = t0 + r;
                if t % s == s - 1 {
                    continue; // the last position has no target
                }
                let target = fb.tokens[t + 1] as usize;
                let row = &mut logits[r * v..(r + 1) * v];
                row.iter_mut().zip(&b_u).for_each(|(x, bb)| *x += bb);
                let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = row.iter().map(|x| ((x - mx) as f64).exp()).sum();
                let lse = mx as f64 + z.ln();
                loss += lse - row[target] as f64;
                let g = &mut glog[r * v..(r + 1) * v];
                for j in 0..v {
                    g[j] = ((((row[j] as f64) - lse).exp()) / count) as f32;
                }
                g[target] -= (1.0 / count) as f32;
            }
            // g_normed = glog W_Uᵀ; LNPre backward: gx = (gn − mean(gn) − n·mean(gn·n)) / σ
            let mut gn = vec![0f32; rows * d];
            sgemm(rows, d, v, &glog, v, 1, &w_u, 1, v, &mut gn, false, false);
            for r in 0..rows {
                let gnr = &gn[r * d..(r + 1) * d];
                let nr = &normed[r * d..(r + 1) * d];
                let mg = gnr.iter().sum::<f32>() / d as f32;
                let mgn = gnr.iter().zip(nr).map(|(a, b)| a * b).sum::<f32>() / d as f32;
                for j in 0..d {
                    gchunk[r * d + j] = (gnr[j] - mg - nr[j] * mgn) / sig[r];
                }
            }
            loss
        })
        .collect();
    let loss = losses.iter().sum::<f64>() / count;
    let grads = state.modules.iter().map(|_| g_resid.clone()).collect();
    Ok((loss, grads))
}

/// Gradients as candle tensors shaped like the suite's variables (in `named_vars` order).
pub fn grads_to_tensors(suite: &Suite, grads: &[ModuleGrads], device: &Device) -> Result<Vec<Tensor>> {
    let (d, f) = (suite.d_model, suite.n_features);
    let mut out = Vec::new();
    for g in grads {
        out.push(Tensor::from_vec(g.b_dec.clone(), d, device)?);
        out.push(Tensor::from_vec(g.w_enc.clone(), (f, d), device)?);
        out.push(Tensor::from_vec(g.b_enc.clone(), f, device)?);
        out.push(Tensor::from_vec(g.w_dec.clone(), (d, f), device)?);
    }
    Ok(out)
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

/// The pruned pass's values without gradients (evaluation, edge scores), set up once per run:
/// on the CPU in f32 the engine (a fraction of the autograd pass's time and memory),
/// otherwise [`crate::pruned::forward`]. `pre` is left empty.
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
    pub fn run(&self, batch: &Batch) -> Result<crate::pruned::PassOutput> {
        let engine = match &self.engine {
            Some(e) if batch.resid_pre0.device().is_cpu() && batch.pass_dtype() == DType::F32 => e,
            _ => return crate::pruned::forward(self.suite, self.rt, self.plan, batch, self.opts),
        };
        let fb = FlatBatch::inputs(batch)?;
        let state = engine.forward(&fb)?;
        let (b, s, d) = batch.resid_pre0.dims3()?;
        let (n, f, k) = (b * s, self.suite.n_features, self.suite.k);
        let dev = batch.resid_pre0.device();
        let mut out = crate::pruned::PassOutput { feats: Vec::new(), recon: Vec::new(), pre: Vec::new() };
        for st in state.modules {
            out.feats.push(dense_features(&st, n, f, k, dev)?);
            out.recon.push(Tensor::from_vec(st.recon, (b, s, d), dev)?);
        }
        Ok(out)
    }
}
