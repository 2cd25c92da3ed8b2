//! Top-k selection (docs/MATH.md, "Top-k selection and ties"): the host kernel every CPU path
//! uses, the autograd wrapper `f = scatter(idx, ReLU(gather(a, idx)))`, and the device variant.

use candle_core::{Device, Tensor, D};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `x`'s position in [`f32::total_cmp`]'s order, as an integer (so comparisons vectorize).
#[inline]
fn order_key(x: f32) -> i32 {
    let b = x.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// Indices of the `k` largest entries of each row of `a (rows, cols)` in the order of
/// [`f32::total_cmp`], ties toward the lower index, in descending order of value.
///
/// Per row: the row's values become integer order keys; the row is split into `G ≥ k`
/// strided groups (entries `j, j + G, j + 2G, …`) and the k-th largest group maximum is a
/// lower bound of the k-th largest key (k groups each hold an entry at least that large), so
/// one branch-free scan collects the few candidates at or above it, and only they are
/// selected and sorted.
pub fn topk_indices(a: &[f32], cols: usize, k: usize) -> Vec<u32> {
    let rows = a.len() / cols.max(1);
    let mut out = vec![0u32; rows * k];
    if k == 0 || cols == 0 {
        return out;
    }
    // About 8 entries per group, between k and 4k groups (more groups: a tighter bound).
    let n_groups = (cols / 8).clamp(k, 4 * k).min(cols);
    let order = |x: &(i32, u32), y: &(i32, u32)| y.0.cmp(&x.0).then(x.1.cmp(&y.1));
    out.par_chunks_mut(k).enumerate().for_each_init(
        || (vec![0i32; cols], vec![(0i32, 0u32); cols], vec![0i32; n_groups]),
        |(keys, cand, maxima): &mut (Vec<i32>, Vec<(i32, u32)>, Vec<i32>), (r, o)| {
            let row = &a[r * cols..(r + 1) * cols];
            keys.iter_mut().zip(row).for_each(|(key, &x)| *key = order_key(x));
            maxima.copy_from_slice(&keys[..n_groups]);
            for blk in keys[n_groups..].chunks_exact(n_groups) {
                maxima.iter_mut().zip(blk).for_each(|(m, &v)| *m = (*m).max(v));
            }
            let bound = *maxima.select_nth_unstable_by(k - 1, |x, y| y.cmp(x)).1;
            let mut n = 0;
            for (i, &v) in keys.iter().enumerate() {
                cand[n] = (v, i as u32);
                n += usize::from(v >= bound);
            }
            let cand = &mut cand[..n];
            let top = if n > k {
                cand.select_nth_unstable_by(k - 1, order);
                &mut cand[..k]
            } else {
                cand
            };
            top.sort_unstable_by(order);
            o.iter_mut().zip(top.iter()).for_each(|(dst, &(_, i))| *dst = i);
        },
    );
    out
}

/// `f = scatter(topk_idx(a), ReLU(gather(a, idx)))`: gradients reach the selected positive
/// values only. Returns the features `(N, F)`.
pub fn topk_relu(pre: &Tensor, k: usize) -> Result<Tensor> {
    let (n, f) = pre.dims2()?;
    let values = pre.detach().to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let idx = topk_indices(&values, f, k);
    let idx_t = Tensor::from_vec(idx, (n, k), pre.device())?;
    let vals = pre.gather(&idx_t, D::Minus1)?.relu()?;
    Ok(pre.zeros_like()?.scatter(&idx_t, &vals, D::Minus1)?)
}

/// Refuse, before any compute, a feature count the device's top-k cannot sort: candle's CUDA
/// sort keeps a whole row in shared memory, at most 8192 features.
pub fn check_topk_size(device: &Device, n_features: usize) -> Result<()> {
    if device.is_cuda() && n_features > 8192 {
        return Err(Error::Usage(format!(
            "{n_features} features per module: top-k on the GPU sorts rows of at most 8192 features (candle's sort kernel keeps a row in shared memory); hint: a smaller --expansion, or the CPU"
        )));
    }
    Ok(())
}

/// [`topk_relu`] without leaving the device: indices from a descending arg-sort (candle's
/// CUDA sort handles rows up to 8192 features; ties are not guaranteed toward the lower
/// index there).
pub fn topk_relu_device(pre: &Tensor, k: usize) -> Result<Tensor> {
    check_topk_size(pre.device(), pre.dim(D::Minus1)?)?;
    let idx_t = pre.detach().arg_sort_last_dim(false)?.narrow(D::Minus1, 0, k)?.contiguous()?;
    let vals = pre.gather(&idx_t, D::Minus1)?.relu()?;
    Ok(pre.zeros_like()?.scatter(&idx_t, &vals, D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast top-k against a full sort on random rows with many ties (short rows: direct
    /// selection; long rows: the sampled lower bound, including rows where it fails).
    #[test]
    fn topk_matches_a_full_sort() {
        for (rows, cols, k) in [(50, 37, 9), (40, 1024, 32), (20, 512, 3), (30, 100, 7), (10, 64, 64), (10, 8, 1)] {
            check_topk(rows, cols, k);
        }
    }

    fn check_topk(rows: usize, cols: usize, k: usize) {
        let mut state = 12345u64;
        let a: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((state >> 33) % 7) as f32 - 3.0;
                // some rows almost constant (the sampled bound then keeps everything)
                if (state >> 20) % 5 == 0 {
                    0.0
                } else {
                    v * ((state >> 40) % 1000) as f32
                }
            })
            .collect();
        let got = topk_indices(&a, cols, k);
        for r in 0..rows {
            let row = &a[r * cols..(r + 1) * cols];
            let mut idx: Vec<u32> = (0..cols as u32).collect();
            idx.sort_by(|x, y| row[*y as usize].total_cmp(&row[*x as usize]).then(x.cmp(y)));
            assert_eq!(&got[r * k..(r + 1) * k], &idx[..k], "row {r}");
        }
    }

    #[test]
    fn topk_follows_total_order_on_special_values() {
        let row = [-0.0, 0.0, f32::NAN, -f32::INFINITY, 1.5, f32::INFINITY, -f32::NAN, -3.0];
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.sort_by(|x, y| row[*y as usize].total_cmp(&row[*x as usize]).then(x.cmp(y)));
        for k in 1..=row.len() {
            assert_eq!(topk_indices(&row, row.len(), k), &idx[..k], "k {k}");
        }
    }

    #[test]
    fn topk_breaks_ties_toward_lower_index() {
        let a = [1.0, 3.0, 3.0, 0.0, 3.0, -1.0];
        assert_eq!(topk_indices(&a, 6, 2), vec![1, 2]);
        assert_eq!(topk_indices(&a, 3, 1), vec![1, 1]);
        assert_eq!(topk_indices(&[0.0, 0.0, 0.0], 3, 2), vec![0, 1]);
    }
}
