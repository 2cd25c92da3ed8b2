//! Dense kernels on flat row-major `f32` buffers, shared by the CPU engine and the host
//! pretraining step: a strided GEMM (parallel over one block of rows per thread, the same bits on
//! any thread count), dot/axpy, sums of scaled rows, a tiled transpose, and a deterministic fold.

use rayon::prelude::*;

/// The fewest output rows per task of a parallel [`sgemm`].
const GEMM_ROWS: usize = 128;

/// Output rows per task of a parallel [`sgemm`] of `m ≥ 2·GEMM_ROWS` rows and `n` columns.
/// Above 64 columns: one block per thread (at most 64), blocks of nearly equal size and at
/// least [`GEMM_ROWS`] rows. Each task packs all of B, so fewer, larger blocks pack it fewer
/// times (the encoder product at TinyStories-33M shape, 1,024 × 3,072 × 768 on 2 threads:
/// 30 → 24 ms with 512 rows instead of 128). The result does not depend on the blocks, so not
/// on the threads: the kernel's depth blocking (each output's order of additions) depends on
/// `k` and the caches only, and its other paths — one row (blocks here have at least 66), at
/// most 64 rows and 64 columns, at most 256 outputs — are out of reach above 64 columns.
/// Up to 64 columns the blocks stay fixed at [`GEMM_ROWS`] rows (a last short block can take
/// those paths; fixed blocks keep it the same on any thread count).
fn gemm_rows(m: usize, n: usize) -> usize {
    if n <= 64 {
        return GEMM_ROWS;
    }
    let blocks = rayon::current_num_threads().clamp(1, 64).min(m / GEMM_ROWS).max(1);
    m.div_ceil(blocks)
}

/// `C (m, n) = [C +] A (m, k) · B (k, n)` with explicit (row, column) strides for A and B;
/// C is row-major contiguous.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
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
    // Bounds and k = 0 are checked by `sgemm_ld`, per block of rows.
    if par && m >= 2 * GEMM_ROWS {
        // Parallel over blocks of output rows, each a single-threaded product.
        let block = gemm_rows(m, n);
        c[..m * n].par_chunks_mut(block * n).enumerate().for_each(|(blk, cb)| {
            let rows = cb.len() / n;
            sgemm(rows, n, k, &a[blk * block * a_rs..], a_rs, a_cs, b, b_rs, b_cs, cb, acc, false);
        });
        return;
    }
    sgemm_ld(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, n, acc);
}

/// Single-threaded [`sgemm`] into a C with row stride `c_rs` (a block of columns of a wider
/// row-major matrix).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_ld(
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
    c_rs: usize,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c_rs >= n && c.len() >= (m - 1) * c_rs + n, "sgemm_ld: C too short");
    if k == 0 {
        if !acc {
            c.chunks_mut(c_rs).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs, "sgemm_ld: A too short");
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs, "sgemm_ld: B too short");
    let parallelism = gemm::Parallelism::None;
    // SAFETY: the asserts above bound every index the kernel touches; C does not alias A or B.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
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

crate::widest! {
    /// `a += b`, elementwise.
    pub fn add_into(a: &mut [f32], b: &[f32]) {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    }
}

crate::widest! {
    /// `y += alpha · x`, elementwise.
    pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        y.iter_mut().zip(x).for_each(|(o, v)| *o += alpha * v);
    }
}

crate::widest! {
    /// `Σ a·b` in eight interleaved partial sums (so it vectorizes; a fixed order, so results
    /// do not depend on threads or on the vector unit).
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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
}

/// `out[j] = dot(a, rows[sel[j]])` for every `j` (rows of `a.len()`), each the bits of [`dot`]:
/// with AVX four rows side by side, so that four chains of partial sums overlap (one [`dot`]
/// is bound by its additions' latency: 65,536 dots of 768 at F 3072, 2 threads, 3.8 → 1.4 ms).
pub fn dots(a: &[f32], rows: &[f32], sel: &[u32], out: &mut [f32]) {
    let d = a.len();
    let row = |i: u32| &rows[i as usize * d..(i as usize + 1) * d];
    #[allow(unused_mut)] // assigned on x86-64 only
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx") {
        for (s, o) in sel.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
            let four = [row(s[0]), row(s[1]), row(s[2]), row(s[3])];
            // SAFETY: the CPU has AVX.
            unsafe { dots4_avx(a, four, o) };
        }
        done = sel.len() / 4 * 4;
    }
    for (&i, o) in sel[done..].iter().zip(&mut out[done..]) {
        *o = dot(a, row(i));
    }
}

/// `put(j, dot(a, rows[idx[j]]))` for every slot `j` of `idx` with `keep(j)`, in slot order
/// ([`dots`] on up to 64 slots at a time; rows of `a.len()`).
pub fn dots_of_slots(
    a: &[f32],
    rows: &[f32],
    idx: &[u32],
    keep: impl Fn(usize) -> bool,
    mut put: impl FnMut(usize, f32),
) {
    let (mut sel, mut slot, mut got) = ([0u32; 64], [0usize; 64], [0f32; 64]);
    for (c, part) in idx.chunks(64).enumerate() {
        let mut n = 0;
        for (j, &i) in part.iter().enumerate().filter(|&(j, _)| keep(c * 64 + j)) {
            (sel[n], slot[n]) = (i, c * 64 + j);
            n += 1;
        }
        dots(a, rows, &sel[..n], &mut got[..n]);
        for (&s, &g) in slot[..n].iter().zip(&got) {
            put(s, g);
        }
    }
}

/// Four [`dot`]s of `a` with rows of its length: per row the eight partial sums of `dot` in one
/// register (a product rounded, then added: `dot`'s operations lane by lane), the tail and the
/// final combination in `dot`'s order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dots4_avx(a: &[f32], rows: [&[f32]; 4], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = a.len();
    let body = d / 8 * 8;
    assert!(rows.iter().all(|r| r.len() == d) && out.len() == 4);
    let mut acc = [_mm256_setzero_ps(); 4];
    for c in (0..body).step_by(8) {
        // SAFETY: c + 8 <= d, the length of `a` and of every row.
        let x = unsafe { _mm256_loadu_ps(a.as_ptr().add(c)) };
        for (acc, r) in acc.iter_mut().zip(&rows) {
            let y = unsafe { _mm256_loadu_ps(r.as_ptr().add(c)) };
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, y));
        }
    }
    for ((o, acc), r) in out.iter_mut().zip(acc).zip(rows) {
        let mut l = [0f32; 8];
        // SAFETY: `l` holds eight floats.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), acc) };
        let mut tail = 0f32;
        for (x, y) in a[body..].iter().zip(&r[body..]) {
            tail += x * y;
        }
        *o = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])) + tail;
    }
}

/// `(rows, cols)` row-major to `(cols, rows)` row-major, parallel over blocks of 32 output rows
/// (each a contiguous run of memory).
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    out.par_chunks_mut(T * rows).enumerate().for_each(|(b, ob)| {
        // Output rows c0.. of this block are the source columns c0..c0 + ob.len() / rows.
        let c0 = b * T;
        transpose_strided(&src[c0..], cols, rows, ob.len() / rows, ob, rows);
    });
    out
}

/// `dst[c · dst_stride + r] = src[r · src_stride + c]` for `r < rows`, `c < cols`, on this
/// thread (a block of a transpose, e.g. the attention edges' key-block operands, or a band of
/// a gradient's columns for train-suite's encoder Adam): 8 × 8 blocks through registers (8
/// source rows read along, each block's 8 output rows written whole), the edges value by value.
/// With AVX the blocks are register transposes ([`crate::util::rows8`]'s) and the source rows
/// 32 ahead are prefetched: read a band at a time, rows `src_stride` apart are not streams the
/// hardware follows (a 32-column band of a 3,072 × 768 gradient: ~1.5x faster with the
/// prefetch).
pub fn transpose_strided(src: &[f32], src_stride: usize, rows: usize, cols: usize, dst: &mut [f32], dst_stride: usize) {
    const B: usize = 8;
    let (rb, cb) = (rows / B * B, cols / B * B);
    #[allow(unused_mut)] // assigned on x86-64 only
    let mut tiled = false;
    #[cfg(target_arch = "x86_64")]
    if rb > 0 && cb > 0 && std::is_x86_feature_detected!("avx") {
        assert!(
            src.len() >= (rb - 1) * src_stride + cb && dst.len() >= (cb - 1) * dst_stride + rb,
            "transpose_strided: bounds"
        );
        // SAFETY: the CPU has AVX; the bounds are checked above.
        unsafe { blocks_avx(src, src_stride, rb, cb, dst, dst_stride) };
        tiled = true;
    }
    for r0 in (0..rb).step_by(B).filter(|_| !tiled) {
        let s: [&[f32]; B] = std::array::from_fn(|i| &src[(r0 + i) * src_stride..][..cols]);
        for c0 in (0..cb).step_by(B) {
            let mut t = [[0f32; B]; B];
            for (i, row) in s.iter().enumerate() {
                let row: &[f32; B] = row[c0..c0 + B].try_into().expect("8 values");
                for (j, &v) in row.iter().enumerate() {
                    t[j][i] = v;
                }
            }
            for (j, tj) in t.iter().enumerate() {
                dst[(c0 + j) * dst_stride + r0..][..B].copy_from_slice(tj);
            }
        }
    }
    for r in 0..rows {
        for c in if r < rb { cb } else { 0 }..cols {
            dst[c * dst_stride + r] = src[r * src_stride + c];
        }
    }
}

/// [`transpose_strided`]'s whole 8 × 8 blocks: source rows `0..rb`, columns `0..cb` (multiples
/// of 8, inside `src` and `dst` as the caller checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn blocks_avx(src: &[f32], src_stride: usize, rb: usize, cb: usize, dst: &mut [f32], dst_stride: usize) {
    use std::arch::x86_64::*;
    const AHEAD: usize = 32;
    for r0 in (0..rb).step_by(8) {
        for r in (r0 + AHEAD..r0 + AHEAD + 8).filter(|&r| r < rb) {
            // Every line of the row's span: one per 16 values, and the last value's.
            for c in (0..cb).step_by(16).chain([cb - 1]) {
                // SAFETY: row r < rb, column c < cb: inside `src` (a prefetch reads nothing).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(src.as_ptr().add(r * src_stride + c).cast()) };
            }
        }
        for c0 in (0..cb).step_by(8) {
            // SAFETY: rows r0..r0 + 8 of the source hold columns c0..c0 + 8 (r0 + 8 <= rb, c0 + 8 <= cb).
            let cols = unsafe { crate::util::rows8::columns8(src.as_ptr().add(r0 * src_stride), src_stride, c0) };
            for (j, col) in cols.into_iter().enumerate() {
                // SAFETY: output row c0 + j < cb holds columns r0..r0 + 8 <= rb.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add((c0 + j) * dst_stride + r0), col) };
            }
        }
    }
}

/// Blocks of a deterministic parallel fold.
const BLOCKS: usize = 16;

/// Deterministic parallel fold over rows: `out` (rows of `row_len`) is cut into at most
/// [`BLOCKS`] blocks of whole rows; `body(first_row, block, acc)` fills its block and adds into
/// its own accumulator of `acc_len`; the accumulators are summed in block order. The result
/// does not depend on the thread count or scheduling, so runs are bit-reproducible.
pub fn fold_rows<F>(out: &mut [f32], row_len: usize, acc_len: usize, body: F) -> Vec<f32>
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

/// `out (F, D)`: `out[i] = Σ coef(j) · rows[j / width]` over the flat positions `j` with
/// `idx[j] == i` and `coef(j) != 0`. A column index of the sparse (token, slot) entries makes
/// the sum parallel over features, without per-thread accumulators, and deterministic.
pub fn by_feature(
    idx: &[u32],
    width: usize,
    f: usize,
    d: usize,
    coef: impl Fn(usize) -> f32 + Sync,
    rows: &[f32],
) -> Vec<f32> {
    let mut out = vec![0f32; f * d];
    FeatureIndex::new(idx, width, f, |j| coef(j) != 0.0).sum_into(&mut out, None, d, coef, rows);
    out
}

/// The column index of sparse codes `idx (N, width)` over `f` features: per feature its
/// entries `(token, flat position)` in position order, those with `keep(position)`. One index
/// serves every sum over the same codes ([`Self::sum_into`]).
pub struct FeatureIndex {
    ptr: Vec<u32>,
    entries: Vec<(u32, u32)>,
}

impl FeatureIndex {
    pub fn new(idx: &[u32], width: usize, f: usize, keep: impl Fn(usize) -> bool) -> FeatureIndex {
        let mut ptr = vec![0u32; f + 1];
        for (j, &i) in idx.iter().enumerate() {
            ptr[i as usize + 1] += u32::from(keep(j));
        }
        for i in 0..f {
            ptr[i + 1] += ptr[i];
        }
        let mut fill = ptr.clone();
        let mut entries = vec![(0u32, 0u32); ptr[f] as usize];
        for (t, row) in idx.chunks(width.max(1)).enumerate() {
            for (s, &i) in row.iter().enumerate() {
                let j = t * width + s;
                if keep(j) {
                    entries[fill[i as usize] as usize] = (t as u32, j as u32);
                    fill[i as usize] += 1;
                }
            }
        }
        FeatureIndex { ptr, entries }
    }

    /// [`by_feature`] over the index's entries (those with `coef(j) != 0`) into `out (F, D)`,
    /// whatever it held (e.g. a [`crate::util::mem::scratch`] buffer): every row is written
    /// whole. With `row_sq`, also each finished row's [`sq_sum`] (read while the row is in cache).
    pub fn sum_into(
        &self,
        out: &mut [f32],
        row_sq: Option<&mut [f64]>,
        d: usize,
        coef: impl Fn(usize) -> f32 + Sync,
        rows: &[f32],
    ) {
        let row = |terms: &mut Vec<(u32, f32)>, i: usize, o: &mut [f32]| {
            terms.clear();
            let mine = &self.entries[self.ptr[i] as usize..self.ptr[i + 1] as usize];
            terms.extend(mine.iter().map(|&(t, j)| (t, coef(j as usize))).filter(|&(_, c)| c != 0.0));
            scaled_rows(o, rows, terms, true);
        };
        let out_rows = out.par_chunks_mut(d.max(1)).enumerate();
        match row_sq {
            Some(sq) => out_rows.zip(sq.par_iter_mut()).for_each_init(Vec::new, |terms, ((i, o), s)| {
                row(terms, i, o);
                *s = sq_sum(o);
            }),
            None => out_rows.for_each_init(Vec::new, |terms, (i, o)| row(terms, i, o)),
        }
    }
}

crate::widest! {
    /// `Σ x²` in f64: eight interleaved lanes (element `j` in lane `j mod 8`, each summed in
    /// order from zero), then the lanes in order, then the tail in order; not bound by the
    /// latency of one chain of additions.
    pub fn sq_sum(v: &[f32]) -> f64 {
        let mut lanes = [0f64; 8];
        let mut it = v.chunks_exact(8);
        for c in &mut it {
            lanes.iter_mut().zip(c).for_each(|(l, &x)| *l += (x as f64) * (x as f64));
        }
        let tail: f64 = it.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
        lanes.iter().sum::<f64>() + tail
    }
}

/// `o += Σ c · rows[r]` over `terms` `(r, c)` in their order, rows of `o.len()`: per element
/// the additions one row after the other (the bits of an [`axpy`] per term), in blocks of
/// 128 columns held in registers over all the terms.
pub fn add_scaled_rows(o: &mut [f32], rows: &[f32], terms: &[(u32, f32)]) {
    scaled_rows(o, rows, terms, false)
}

crate::widest! {
    /// [`add_scaled_rows`] onto `o`, or onto zeros with `from_zero` (`o`'s values unread).
    fn scaled_rows(o: &mut [f32], rows: &[f32], terms: &[(u32, f32)], from_zero: bool) {
        const B: usize = 128;
        let d = o.len();
        let mut c0 = 0;
        while c0 + B <= d {
            let mut acc = [0f32; B];
            if !from_zero {
                acc.copy_from_slice(&o[c0..c0 + B]);
            }
            for &(r, c) in terms {
                let row = &rows[r as usize * d + c0..r as usize * d + c0 + B];
                acc.iter_mut().zip(row).for_each(|(a, x)| *a += c * x);
            }
            o[c0..c0 + B].copy_from_slice(&acc);
            c0 += B;
        }
        if from_zero {
            o[c0..].fill(0.0);
        }
        for &(r, c) in terms {
            let row = &rows[r as usize * d + c0..(r as usize + 1) * d];
            o[c0..].iter_mut().zip(row).for_each(|(a, x)| *a += c * x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Above 64 columns a parallel product equals one single-threaded call bit for bit whatever
    /// the thread count, and so do 2–4 nearly equal blocks of rows (shapes around the kernel's
    /// register and cache blocks); up to 64 columns (the kernel's small-product paths) it is the
    /// same on any thread count.
    #[test]
    fn sgemm_rows_blocks_do_not_change_bits() {
        let mut rng = crate::util::rng::SplitMix(7);
        for (m, n, k) in [(513, 1, 300), (512, 2, 64), (700, 3, 40), (513, 60, 1500), (1025, 40, 768)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let mut one = vec![0f32; m * n];
            sgemm(m, n, k, &a, k, 1, &b, 1, k, &mut one, false, true);
            for threads in [2, 3, 8] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut c = vec![0f32; m * n];
                pool.install(|| sgemm(m, n, k, &a, k, 1, &b, 1, k, &mut c, false, true));
                assert!(c == one, "{m}x{n}x{k} on {threads} threads");
            }
        }
        for (m, n, k) in [(1000, 300, 768), (1024, 3072, 100), (513, 65, 1500), (300, 2048, 512), (1025, 70, 64)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let mut whole = vec![0f32; m * n];
            sgemm(m, n, k, &a, k, 1, &b, 1, k, &mut whole, false, false);
            for threads in [1, 2, 3, 8] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut c = vec![0f32; m * n];
                pool.install(|| sgemm(m, n, k, &a, k, 1, &b, 1, k, &mut c, false, true));
                assert!(c == whole, "{m}x{n}x{k} on {threads} threads");
            }
            for rows in [m.div_ceil(2), m.div_ceil(3), m.div_ceil(4)] {
                let mut c = vec![0f32; m * n];
                c.chunks_mut(rows * n).enumerate().for_each(|(blk, cb)| {
                    sgemm(cb.len() / n, n, k, &a[blk * rows * k..], k, 1, &b, 1, k, cb, false, false)
                });
                assert!(c == whole, "{m}x{n}x{k} in blocks of {rows} rows");
            }
        }
    }

    /// Four rows side by side give each row's [`dot`] bit for bit (lengths with and without a
    /// tail, a number of rows with a remainder, repeated rows).
    #[test]
    fn dots_are_dot_bit_for_bit() {
        let mut rng = crate::util::rng::SplitMix(11);
        for (d, n_sel) in [(768, 64), (13, 7), (5, 9), (64, 3), (200, 4)] {
            let rows: Vec<f32> = (0..10 * d).map(|_| rng.normal() as f32).collect();
            let a: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
            let sel: Vec<u32> = (0..n_sel).map(|j| ((j * 7 + 3) % 10) as u32).collect();
            let mut out = vec![0f32; n_sel];
            dots(&a, &rows, &sel, &mut out);
            for (j, &i) in sel.iter().enumerate() {
                let want = dot(&a, &rows[i as usize * d..(i as usize + 1) * d]);
                assert_eq!(out[j].to_bits(), want.to_bits(), "d {d}, slot {j}");
            }
        }
    }

    /// The tiled parallel and one-thread transposes against the definition, on shapes that are
    /// and are not multiples of the tiles (and single rows or columns).
    #[test]
    fn transpose_matches_the_definition() {
        for (rows, cols) in [(1, 1), (1, 70), (70, 1), (8, 8), (32, 32), (33, 65), (100, 37), (64, 2048), (3072, 40)] {
            let src: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let out = transpose(&src, rows, cols);
            let mut one = vec![0f32; rows * cols];
            transpose_strided(&src, cols, rows, cols, &mut one, rows);
            assert_eq!(one, out, "{rows}x{cols} on one thread");
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(out[c * rows + r], src[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
        // A block of columns (as the attention edges take one key block's): its rows of the
        // whole transpose.
        let (rows, cols, c0, w) = (64, 2048, 136, 131);
        let src: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut part = vec![0f32; w * rows];
        transpose_strided(&src[c0..], cols, rows, w, &mut part, rows);
        assert_eq!(part, transpose(&src, rows, cols)[c0 * rows..(c0 + w) * rows]);
    }

    /// The product with B held row-major `(k, n)` is the product with B `(n, k)` read through
    /// strides, bit for bit (the kernel packs either into the same panels): train-suite's
    /// input-major encoder relies on it. Deep k (the kernel's depth blocking), the parallel
    /// path and shapes off the kernel's blocks.
    #[test]
    fn sgemm_bits_do_not_depend_on_the_layout_of_b() {
        let mut rng = crate::util::rng::SplitMix(17);
        for (m, n, k) in [(300, 200, 768), (1024, 96, 40), (70, 33, 130)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b_nk: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let b_kn = transpose(&b_nk, n, k);
            let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
            sgemm(m, n, k, &a, k, 1, &b_nk, 1, k, &mut c1, false, true);
            sgemm(m, n, k, &a, k, 1, &b_kn, n, 1, &mut c2, false, true);
            assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()), "{m} x {n} x {k}");
            // and both are the product
            let want: f64 = (0..k).map(|j| a[j] as f64 * b_nk[j] as f64).sum();
            assert!((c1[0] as f64 - want).abs() < 1e-3 * (1.0 + want.abs()), "{m} x {n} x {k}: {} vs {want}", c1[0]);
        }
    }
}
