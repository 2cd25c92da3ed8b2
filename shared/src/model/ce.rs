//! The next-token CE of a residual stream on the host, fused: each block of (positions ×
//! vocabulary columns) is unembedded by one single-threaded GEMM into a buffer of its own and
//! reduced at once (largest logit, sum of exponentials, the target's logit), blocks in
//! parallel — instead of candle's per-sequence unembedding followed by five whole-array passes
//! of `log_softmax` (max, shift, exp, sum, log) and a gather. [`Runtime::ce_from_resid`](super::Runtime::ce_from_resid)
//! takes it for f32 tensors on the CPU outside an autograd graph.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::util::blas::sgemm_ld;
use crate::util::with_host_f32;

/// Rows (positions) and vocabulary columns per task: a `(ROWS, COLS)` logits buffer per thread
/// (8 MB), and `W_U`'s columns packed once per row block rather than once per few rows.
const ROWS: usize = 1024;
const COLS: usize = 2048;

thread_local! {
    /// Each thread's logits buffer, kept between calls: a fresh 8 MB buffer per task (or per
    /// call) costs the kernel's zeroing of its pages every time (5% of an `evaluate` run).
    static LOGITS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// CE per position `(b, s − 1)` of `normalized (b, s, d)` (the final LN already applied) with
/// `w_u (d, V)`, `b_u (V)` and next-token targets from `tokens (b, s)`:
/// `ln Σ_v exp(l_v − M) − (l_target − M)` per row, `M` the row's largest logit. Tasks of
/// (positions × vocabulary columns) run in parallel, each keeping per row its block's largest
/// logit `m` and `Σ exp(l − m)` (f64); the blocks are then merged per row in vocabulary order,
/// `Σ_blocks sum·exp(m − M)`, so the value does not depend on the threads. `None` when a
/// tensor is not a contiguous f32 host tensor.
pub fn host_ce(normalized: &Tensor, w_u: &Tensor, b_u: &Tensor, tokens: &Tensor) -> Result<Option<Tensor>> {
    let (b, s, d) = normalized.dims3()?;
    let v = w_u.dim(1)?;
    let ce = with_host_f32(w_u, |w| {
        with_host_f32(b_u, |bias| -> Result<Vec<f32>> {
            let x = crate::util::to_vec(normalized)?;
            let tok: Vec<u32> = tokens.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
            Ok(fused_ce(&x, w, bias, &tok, (b, s, d, v), (ROWS, COLS)))
        })
    });
    match ce {
        Some(Some(ce)) => Ok(Some(Tensor::from_vec(ce?, (b, s.saturating_sub(1)), normalized.device())?)),
        _ => Ok(None),
    }
}

/// [`host_ce`] on host buffers, in tasks of `(rows, cols)`.
fn fused_ce(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    tok: &[u32],
    (b, s, d, v): (usize, usize, usize, usize),
    (rows_per, cols_per): (usize, usize),
) -> Vec<f32> {
    let n = b * s;
    // Every position is unembedded (the last of each sequence predicts nothing: < 1% extra).
    let tasks: Vec<(usize, usize)> =
        (0..n).step_by(rows_per).flat_map(|r0| (0..v).step_by(cols_per).map(move |c0| (r0, c0))).collect();
    // Per task, per row: (largest logit, Σ exp(l − it), the target's logit if in the block).
    let parts: Vec<Vec<(f32, f64, Option<f32>)>> = tasks
        .par_iter()
        .map(|&(r0, c0)| {
            LOGITS.with_borrow_mut(|buf| {
                let (rows, cols) = (rows_per.min(n - r0), cols_per.min(v - c0));
                if buf.len() < rows * cols {
                    buf.resize(rows * cols, 0.0);
                }
                sgemm_ld(rows, cols, d, &x[r0 * d..], d, 1, &w[c0..], v, 1, buf, cols, false);
                (0..rows)
                    .map(|r| {
                        let row = &mut buf[r * cols..(r + 1) * cols];
                        let (m, sum) = biased_max_sum_exp(row, &bias[c0..c0 + cols]);
                        let t = r0 + r;
                        let target = (t % s + 1 < s).then(|| tok[t + 1] as usize);
                        (m, sum, target.filter(|&j| (c0..c0 + cols).contains(&j)).map(|j| row[j - c0]))
                    })
                    .collect()
            })
        })
        .collect();
    let per_block = v.div_ceil(cols_per);
    let mut ce = Vec::with_capacity(b * s.saturating_sub(1));
    for t in (0..n).filter(|t| t % s + 1 < s) {
        let blocks = &parts[(t / rows_per) * per_block..(t / rows_per + 1) * per_block];
        let big = blocks.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p[t % rows_per].0));
        let (mut sum, mut target) = (0f64, 0f32);
        for p in blocks {
            let (m, s_b, tl) = p[t % rows_per];
            sum += s_b * ((m - big) as f64).exp();
            if let Some(l) = tl {
                target = l;
            }
        }
        ce.push((sum.ln() as f32) - (target - big));
    }
    ce
}

crate::widest! {
    /// Add `bias` to `row`, then its largest value `m` and `Σ exp(l − m)` (f64), in lanes the
    /// compiler vectorizes: eight running maxima (the maximum does not depend on the order),
    /// [`exp_le0`] in eight lanes and eight f64 partial sums. The sequential fold and the libm
    /// `expf` call per logit cost ~3 ns per logit, beside the GEMM's ~8 ns over two threads.
    fn biased_max_sum_exp(row: &mut [f32], bias: &[f32]) -> (f32, f64) {
        const L: usize = 8;
        let mut mx = [f32::NEG_INFINITY; L];
        let mut chunks = row.chunks_exact_mut(L);
        let mut bias_chunks = bias.chunks_exact(L);
        for (c, b) in (&mut chunks).zip(&mut bias_chunks) {
            for i in 0..L {
                c[i] += b[i];
                mx[i] = mx[i].max(c[i]);
            }
        }
        let mut m = mx.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        for (l, b) in chunks.into_remainder().iter_mut().zip(bias_chunks.remainder()) {
            *l += b;
            m = m.max(*l);
        }
        let mut acc = [0f64; L];
        let mut chunks = row.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                acc[i] += exp_le0(c[i] - m) as f64;
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&l| exp_le0(l - m) as f64).sum();
        (m, acc.iter().sum::<f64>() + tail)
    }
}

/// `exp(x)` for `x ≤ 0` (and NaN), within 1.5e-7 relative of the exact value for `x ≥ −87`
/// (8e-8 measured, about one f32 ulp), in plain
/// arithmetic the compiler vectorizes: `x = n·ln 2 + r` (`n` rounded to nearest by the
/// 1.5·2²³ trick, `ln 2` in two parts), a degree-7 polynomial for `exp(r)` on
/// `|r| ≤ ln 2 / 2` (Cephes' coefficients), and `2ⁿ` built in the exponent bits. Below −87
/// (where `exp` < 1.7e−38, nothing beside the row's largest term `exp(0) = 1` in an f64 sum)
/// it returns `exp(−87)`; NaN stays NaN.
#[inline(always)]
pub(super) fn exp_le0(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // `t`'s low mantissa bits hold n + 2²² (n ≥ −126 here).
    let bits = (t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23;
    e * f32::from_bits(bits as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix;
    use candle_core::Device;

    /// The vectorizable exp against f64's exp: within 1.5e-7 relative (8e-8 measured) on
    /// [−87, 0], its clamp below, and NaN through.
    #[test]
    fn exp_le0_is_exp() {
        let mut worst = 0f64;
        for i in 0..=2_000_000u32 {
            let x = -87.0 * (i as f32 / 2e6);
            let want = (x as f64).exp();
            worst = worst.max(((exp_le0(x) as f64) - want).abs() / want);
        }
        let half_ln2 = -std::f32::consts::LN_2 / 2.0; // where the rounding of n changes
        let near = [half_ln2, f32::from_bits(half_ln2.to_bits() - 1), f32::from_bits(half_ln2.to_bits() + 1)];
        for x in [0.0f32, -0.0, -1e-30, -0.5, -1.0, -86.99].into_iter().chain(near) {
            let want = (x as f64).exp();
            worst = worst.max(((exp_le0(x) as f64) - want).abs() / want);
        }
        assert!(worst < 1.5e-7, "worst relative error {worst}");
        assert_eq!(exp_le0(-1e4), exp_le0(-87.0));
        assert_eq!(exp_le0(f32::NEG_INFINITY), exp_le0(-87.0));
        assert!(exp_le0(f32::NAN).is_nan());
        // and the row reduction against a sequential one with libm's exp
        let row: Vec<f32> = SplitMix::normals(2051, 9).iter().map(|z| 4.0 * z).collect();
        let bias = SplitMix::normals(2051, 10);
        let mut got_row = row.clone();
        let (m, sum) = biased_max_sum_exp(&mut got_row, &bias);
        let biased: Vec<f32> = row.iter().zip(&bias).map(|(l, b)| l + b).collect();
        assert_eq!(got_row, biased);
        let want_m = biased.iter().fold(f32::NEG_INFINITY, |a, &l| a.max(l));
        let want_sum: f64 = biased.iter().map(|&l| ((l - want_m) as f64).exp()).sum();
        assert_eq!(m, want_m);
        assert!((sum - want_sum).abs() <= 2.4e-7 * want_sum, "{sum} vs {want_sum}");
    }

    /// The fused CE against candle's unembedding and `log_softmax` (the path it replaces), with
    /// tasks small enough that rows and vocabulary split into uneven blocks and merge.
    #[test]
    fn fused_ce_equals_log_softmax_ce() {
        let (b, s, d, v) = (3, 5, 4, 23);
        let x: Vec<f32> = SplitMix::normals(b * s * d, 1).iter().map(|z| 3.0 * z).collect();
        let (w, bias) = (SplitMix::normals(d * v, 2), SplitMix::normals(v, 3));
        let tok: Vec<u32> = (0..b * s).map(|i| ((i * 7 + 3) % v) as u32).collect();
        let dev = Device::Cpu;
        let logits = Tensor::from_slice(&x, (b * s, d), &dev)
            .unwrap()
            .matmul(&Tensor::from_slice(&w, (d, v), &dev).unwrap())
            .unwrap()
            .broadcast_add(&Tensor::from_slice(&bias, v, &dev).unwrap())
            .unwrap()
            .reshape((b, s, v))
            .unwrap();
        let tokens = Tensor::from_slice(&tok, (b, s), &dev).unwrap();
        let want: Vec<f32> =
            crate::model::token_ce(&logits, &tokens).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for blocks in [(2, 5), (4, 23), (1024, 2048), (7, 1)] {
            let got = fused_ce(&x, &w, &bias, &tok, (b, s, d, v), blocks);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{blocks:?}: {g} vs {w}");
            }
        }
        // and through the tensor entry point
        let xt = Tensor::from_slice(&x, (b, s, d), &dev).unwrap();
        let (wt, bt) = (Tensor::from_slice(&w, (d, v), &dev).unwrap(), Tensor::from_slice(&bias, v, &dev).unwrap());
        let t: Vec<f32> = host_ce(&xt, &wt, &bt, &tokens).unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(t, fused_ce(&x, &w, &bias, &tok, (b, s, d, v), (ROWS, COLS)));
    }
}
