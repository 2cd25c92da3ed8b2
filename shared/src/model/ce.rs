//! The next-token CE of a residual stream on the host, fused: each block of (positions ×
//! vocabulary columns) is unembedded by one single-threaded GEMM into a buffer of its own and
//! reduced at once (largest logit, sum of exponentials, the target's logit), blocks in
//! parallel — instead of candle's per-sequence unembedding followed by five whole-array passes
//! of `log_softmax` (max, shift, exp, sum, log) and a gather. [`Runtime::ce_from_resid`](super::Runtime::ce_from_resid)
//! takes it for f32 tensors on the CPU outside an autograd graph.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::util::blas::sgemm_ld;

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
    let (ws, wl) = w_u.storage_and_layout();
    let (bs, bl) = b_u.storage_and_layout();
    let (Storage::Cpu(candle_core::CpuStorage::F32(w)), Storage::Cpu(candle_core::CpuStorage::F32(bias))) =
        (&*ws, &*bs)
    else {
        return Ok(None);
    };
    let (Some((w0, w1)), Some((b0, b1))) = (wl.contiguous_offsets(), bl.contiguous_offsets()) else {
        return Ok(None);
    };
    let (w, bias) = (&w[w0..w1], &bias[b0..b1]);
    let x = crate::util::to_vec(normalized)?;
    let tok: Vec<u32> = tokens.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    let ce = fused_ce(&x, w, bias, &tok, (b, s, d, v), (ROWS, COLS));
    Ok(Some(Tensor::from_vec(ce, (b, s.saturating_sub(1)), normalized.device())?))
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
                        row.iter_mut().zip(&bias[c0..c0 + cols]).for_each(|(l, b)| *l += b);
                        let m = row.iter().fold(f32::NEG_INFINITY, |a, &l| a.max(l));
                        let sum: f64 = row.iter().map(|&l| (l - m).exp() as f64).sum();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix;
    use candle_core::Device;

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
