//! Top-k selection (docs/MATH.md, "Top-k selection and ties"): the host kernel every CPU path
//! uses, the autograd wrapper `f = scatter(idx, ReLU(gather(a, idx)))`, and the device variant.

use candle_core::{Device, Tensor, D};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `x`'s position in [`f32::total_cmp`]'s order, as an integer (so comparisons vectorize).
#[inline]
pub(crate) fn order_key(x: f32) -> i32 {
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
    let n_groups = n_groups(cols, k);
    out.par_chunks_mut(k)
        .zip(a.par_chunks(cols))
        .for_each_init(|| Scratch::new(cols, n_groups), |s, (o, row)| select_row(row, k, n_groups, s, o));
    out
}

/// [`topk_indices`] of `a + bias` (each row of `a (rows, cols)` plus `bias (cols)`), with
/// `keep` leaving the biased values in `a` (the addition done row by row as each is selected;
/// without, `a` is only read). Also returns the selected values' ReLU `(rows, k)` ([`relu_at`],
/// read while each row is in cache).
pub fn topk_relu_biased(a: &mut [f32], bias: &[f32], k: usize, keep: bool) -> (Vec<u32>, Vec<f32>) {
    let cols = bias.len();
    let rows = a.len() / cols.max(1);
    let (mut out, mut val) = (vec![0u32; rows * k], vec![0f32; rows * k]);
    if cols == 0 {
        return (out, val);
    }
    if k == 0 {
        if keep {
            a.par_chunks_mut(cols).for_each(|row| add_row(row, bias));
        }
        return (out, val);
    }
    let n_groups = n_groups(cols, k);
    let out_rows = out.par_chunks_mut(k).zip(val.par_chunks_mut(k));
    out_rows.zip(a.par_chunks_mut(cols)).for_each_init(
        || Scratch::new(cols, n_groups),
        |s, ((o, v), row)| {
            if keep {
                add_row_keys(row, bias, &mut s.0);
            } else {
                sum_keys(row, bias, &mut s.0);
            }
            select_keys(k, n_groups, s, o);
            relu_row(v, o, row, (!keep).then_some(bias));
        },
    );
    (out, val)
}

/// The selected values `ReLU(a[t, idx[t, j]])` `(rows, k)` of `a (rows, cols)`, rows in parallel.
pub fn relu_at(a: &[f32], cols: usize, idx: &[u32], k: usize) -> Vec<f32> {
    let mut val = vec![0f32; idx.len()];
    if k == 0 {
        return val;
    }
    val.par_chunks_mut(k)
        .zip(idx.par_chunks(k))
        .zip(a.par_chunks(cols.max(1)))
        .for_each(|((v, ix), row)| relu_row(v, ix, row, None));
    val
}

/// `v[j] = ReLU(row[ix[j]] (+ bias[ix[j]]))`: one row of [`relu_at`] (of a row not yet biased).
fn relu_row(v: &mut [f32], ix: &[u32], row: &[f32], bias: Option<&[f32]>) {
    match bias {
        None => v.iter_mut().zip(ix).for_each(|(v, &i)| *v = row[i as usize].max(0.0)),
        Some(b) => v.iter_mut().zip(ix).for_each(|(v, &i)| *v = (row[i as usize] + b[i as usize]).max(0.0)),
    }
}

/// About 8 entries per group, between k and 4k groups (more groups: a tighter bound).
fn n_groups(cols: usize, k: usize) -> usize {
    (cols / 8).clamp(k, 4 * k).min(cols)
}

/// One thread's buffers for [`select_row`]: order keys, candidates' indices (16 spare: the
/// vector scan stores 16 at a time), candidates packed ([`pack`]), group maxima.
struct Scratch(Vec<i32>, Vec<u32>, Vec<u64>, Vec<i32>);

impl Scratch {
    fn new(cols: usize, n_groups: usize) -> Scratch {
        Scratch(vec![0i32; cols], vec![0u32; cols + 16], vec![0u64; cols], vec![0i32; n_groups])
    }
}

/// A candidate as one integer whose descending order is the selection's: order key
/// descending, then index ascending.
#[inline]
fn pack(key: i32, i: u32) -> u64 {
    ((((key as u32) ^ 0x8000_0000) as u64) << 32) | (!i) as u64
}

/// The indices `i` with `keys[i] >= bound`, ascending, into `out` (at least `keys.len() + 16`
/// long); returns how many. With AVX-512 sixteen keys per comparison, the indices of those
/// that pass compressed into a register and stored whole (the next store overwrites the
/// rest).
fn scan(keys: &[i32], bound: i32, out: &mut [u32]) -> usize {
    assert!(out.len() >= keys.len() + 16);
    let mut n = 0;
    #[allow(unused_mut)] // assigned on x86-64 only
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; `out` has room for 16 past the last candidate.
        (n, done) = unsafe { scan_avx512(keys, bound, out) };
    }
    for (i, &v) in keys.iter().enumerate().skip(done) {
        out[n] = i as u32;
        n += usize::from(v >= bound);
    }
    n
}

/// [`scan`]'s whole blocks of 16 keys: `(candidates, keys scanned)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scan_avx512(keys: &[i32], bound: i32, out: &mut [u32]) -> (usize, usize) {
    use std::arch::x86_64::*;
    let body = keys.len() / 16 * 16;
    let (b, step) = (_mm512_set1_epi32(bound), _mm512_set1_epi32(16));
    let mut iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut n = 0;
    for c in (0..body).step_by(16) {
        // SAFETY: c + 16 <= keys.len(); n <= c, so n + 16 <= out.len().
        let v = unsafe { _mm512_loadu_si512(keys.as_ptr().add(c).cast()) };
        let m = _mm512_cmpge_epi32_mask(v, b);
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(n).cast(), _mm512_maskz_compress_epi32(m, iota)) };
        n += m.count_ones() as usize;
        iota = _mm512_add_epi32(iota, step);
    }
    (n, body)
}

crate::widest! {
    /// `row += bias`, elementwise.
    fn add_row(row: &mut [f32], bias: &[f32]) {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

crate::widest! {
    /// The `k` largest of one row into `o`, as [`topk_indices`] describes.
    fn select_row(row: &[f32], k: usize, n_groups: usize, s: &mut Scratch, o: &mut [u32]) {
        s.0.iter_mut().zip(row).for_each(|(key, &x)| *key = order_key(x));
        select_keys(k, n_groups, s, o)
    }
}

crate::widest! {
    /// `row += bias` and the order keys of the sums into `keys`, in one pass.
    fn add_row_keys(row: &mut [f32], bias: &[f32], keys: &mut [i32]) {
        row.iter_mut().zip(bias).zip(keys.iter_mut()).for_each(|((a, b), key)| {
            *a += b;
            *key = order_key(*a);
        });
    }
}

crate::widest! {
    /// The order keys of `row + bias` into `keys` (the sums not stored).
    fn sum_keys(row: &[f32], bias: &[f32], keys: &mut [i32]) {
        row.iter().zip(bias).zip(keys.iter_mut()).for_each(|((a, b), key)| *key = order_key(a + b));
    }
}

crate::widest! {
    /// [`select_row`] from the row's order keys (in the scratch).
    fn select_keys(k: usize, n_groups: usize, s: &mut Scratch, o: &mut [u32]) {
        let Scratch(keys, found, cand, maxima) = s;
        maxima.copy_from_slice(&keys[..n_groups]);
        for blk in keys[n_groups..].chunks_exact(n_groups) {
            maxima.iter_mut().zip(blk).for_each(|(m, &v)| *m = (*m).max(v));
        }
        let bound = *maxima.select_nth_unstable_by(k - 1, |x, y| y.cmp(x)).1;
        let n = scan(keys, bound, found);
        let cand = &mut cand[..n];
        cand.iter_mut().zip(&found[..n]).for_each(|(c, &i)| *c = pack(keys[i as usize], i));
        let top = if n > k {
            cand.select_nth_unstable_by(k - 1, |x, y| y.cmp(x));
            &mut cand[..k]
        } else {
            cand
        };
        top.sort_unstable_by(|x, y| y.cmp(x));
        o.iter_mut().zip(top.iter()).for_each(|(dst, &c)| *dst = !(c as u32));
    }
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

/// The longest row candle's CUDA sort can order: it keeps a whole row in shared memory.
pub const DEVICE_SORT_MAX: usize = 8192;

/// Refuse, before any compute, a `k` the device's top-k cannot select (above half of
/// [`DEVICE_SORT_MAX`] on a GPU; any feature count is fine, see [`topk_indices_t`]).
pub fn check_topk_size(device: &Device, k: usize) -> Result<()> {
    if device.is_cuda() && 2 * k > DEVICE_SORT_MAX {
        return Err(Error::Usage(format!(
            "k {k}: top-k on the GPU selects at most {} features per token; hint: a smaller --k",
            DEVICE_SORT_MAX / 2
        )));
    }
    Ok(())
}

/// Indices `(N, k)` u32 of the `k` largest entries of each row of `a (N, F)`, in descending
/// order, without leaving the device and for any `F`: rows longer than [`DEVICE_SORT_MAX`] are
/// cut into blocks of that length (the last padded with −∞), each block's top `k` are taken by
/// one sort, and the top `k` of those candidates (recursively, if they are still too many) are
/// the row's. With `2k ≤` the block length every stage at least halves the row. Sorts are stable (ties toward the lower index) on the CPU; candle's CUDA
/// sort gives no tie guarantee.
pub fn topk_indices_t(a: &Tensor, k: usize) -> Result<Tensor> {
    topk_indices_blocked(a, k, DEVICE_SORT_MAX)
}

fn topk_indices_blocked(a: &Tensor, k: usize, max_row: usize) -> Result<Tensor> {
    let (n, f) = a.dims2()?;
    if f <= max_row {
        return Ok(a.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, k.min(f))?.contiguous()?);
    }
    if 2 * k > max_row {
        return Err(Error::Usage(format!("top-k of {k} among {f}: k must be at most {}", max_row / 2)));
    }
    let (nb, bs) = (f.div_ceil(max_row), max_row);
    let padded = if nb * bs > f {
        let pad = Tensor::full(f32::NEG_INFINITY, (n, nb * bs - f), a.device())?.to_dtype(a.dtype())?;
        Tensor::cat(&[a, &pad], 1)?
    } else {
        a.clone()
    };
    let blocks = padded.reshape((n * nb, bs))?;
    let kb = k;
    let local = blocks.arg_sort_last_dim(false)?.narrow(1, 0, kb)?.contiguous()?; // (N·nb, kb)
    let vals = blocks.gather(&local, 1)?.reshape((n, nb * kb))?;
    let offsets = Tensor::arange(0u32, nb as u32, a.device())?.affine(bs as f64, 0.0)?.reshape((1, nb, 1))?;
    let global = local.reshape((n, nb, kb))?.broadcast_add(&offsets)?.reshape((n, nb * kb))?;
    // The candidates keep block order and, within a block, index order among equal values, so
    // stable sorts of them still break ties toward the lower index.
    let pick = topk_indices_blocked(&vals, k, max_row)?;
    Ok(global.gather(&pick, 1)?)
}

/// [`topk_relu`] without leaving the device (indices from [`topk_indices_t`]).
pub fn topk_relu_device(pre: &Tensor, k: usize) -> Result<Tensor> {
    let idx_t = topk_indices_t(&pre.detach(), k)?;
    let vals = pre.gather(&idx_t, D::Minus1)?.relu()?;
    Ok(pre.zeros_like()?.scatter(&idx_t, &vals, D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The candidates' scan finds every key at or above the bound, in index order, on lengths
    /// with and without a partial block of 16 (none, some or all passing).
    #[test]
    fn scan_finds_the_keys_at_or_above_the_bound() {
        for len in [0, 5, 16, 17, 40, 3072] {
            let keys: Vec<i32> = (0..len).map(|i| ((i * 7919) % 23) as i32 - 11).collect();
            for bound in [-20, 0, 5, 11, 12] {
                let mut out = vec![0u32; len + 16];
                let n = scan(&keys, bound, &mut out);
                let want: Vec<u32> = (0..len as u32).filter(|&i| keys[i as usize] >= bound).collect();
                assert_eq!(&out[..n], &want[..], "len {len} bound {bound}");
            }
        }
    }

    /// The biased selection is the selection of `a + bias`, and leaves `a + bias` in `a` (or `a`
    /// as it was, without `keep`).
    #[test]
    fn biased_topk_is_topk_of_the_sum() {
        for (rows, cols, k) in [(7, 300, 16), (5, 37, 9), (3, 8, 8), (4, 10, 0)] {
            let a: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 97) as f32 - 40.0).collect();
            let bias: Vec<f32> = (0..cols).map(|i| ((i * 31) % 13) as f32 * 0.5).collect();
            let summed: Vec<f32> = a.chunks(cols).flat_map(|r| r.iter().zip(&bias).map(|(x, b)| x + b)).collect();
            for keep in [true, false] {
                let mut biased = a.clone();
                let (idx, val) = topk_relu_biased(&mut biased, &bias, k, keep);
                assert_eq!(idx, topk_indices(&summed, cols, k));
                assert_eq!(val, relu_at(&summed, cols, &idx, k));
                assert_eq!(&biased, if keep { &summed } else { &a });
            }
        }
    }

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

    /// The device top-k against the host kernel (the exact rule) on rows with many ties, one
    /// and several blocks, and several stages of candidates (small block limits make the
    /// recursion cheap to test), including the real-shape case F = 24,576.
    #[test]
    fn device_topk_matches_the_exact_top_k_for_any_row_length() {
        let mut state = 99u64;
        let mut rand = |cols: usize, rows: usize| -> Vec<f32> {
            (0..rows * cols)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 33) % 23) as f32 - 11.0 // many ties
                })
                .collect()
        };
        for (rows, cols, k, max_row) in [
            (6, 100, 7, 128),
            (6, 100, 7, 16),
            (5, 1000, 9, 64),
            (4, 1000, 20, 40),
            (4, 90, 8, 16),
            (3, 24_576, 64, DEVICE_SORT_MAX),
        ] {
            let a = rand(cols, rows);
            let t = Tensor::from_slice(&a, (rows, cols), &Device::Cpu).unwrap();
            let got = topk_indices_blocked(&t, k, max_row).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
            assert_eq!(got, topk_indices(&a, cols, k), "rows {rows} cols {cols} k {k} blocks of {max_row}");
        }
        let t = Tensor::zeros((2, 50), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(topk_indices_blocked(&t, 9, 16).is_err(), "k above half the block is refused");
    }
}
