//! Dense kernels on flat row-major `f32` buffers, shared by the CPU engine and the host
//! pretraining step: a strided GEMM (parallel over fixed row blocks, so results do not depend
//! on the thread count), dot/axpy, a tiled transpose, and a deterministic parallel fold.

use rayon::prelude::*;

/// Output rows per task of a parallel [`sgemm`].
const GEMM_ROWS: usize = 128;

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
        // Parallel over fixed blocks of output rows, each a single-threaded product.
        c[..m * n].par_chunks_mut(GEMM_ROWS * n).enumerate().for_each(|(blk, cb)| {
            let rows = cb.len() / n;
            sgemm(rows, n, k, &a[blk * GEMM_ROWS * a_rs..], a_rs, a_cs, b, b_rs, b_cs, cb, acc, false);
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

/// `C (m, n) = A (m, k) · B (n, k)ᵀ`, all row-major (e.g. activations times an encoder).
pub fn gemm_nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    sgemm(m, n, k, a, k, 1, b, 1, k, c, false, true);
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

/// `(rows, cols)` row-major to `(cols, rows)` row-major, in cache-sized tiles, parallel over
/// blocks of output rows (each a contiguous run of memory).
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    out.par_chunks_mut(T * rows).enumerate().for_each(|(b, ob)| {
        // Output rows c0.. of this block are the source columns c0..c0 + ob.len() / rows.
        let c0 = b * T;
        for r0 in (0..rows).step_by(T) {
            let r1 = (r0 + T).min(rows);
            for (c, orow) in ob.chunks_exact_mut(rows).enumerate() {
                for (o, r) in orow[r0..r1].iter_mut().zip(r0..r1) {
                    *o = src[r * cols + c0 + c];
                }
            }
        }
    });
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiled parallel transpose against the definition, on shapes that are and are not
    /// multiples of the tile (and single rows or columns).
    #[test]
    fn transpose_matches_the_definition() {
        for (rows, cols) in [(1, 1), (1, 70), (70, 1), (32, 32), (33, 65), (100, 37), (3072, 40)] {
            let src: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let out = transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(out[c * rows + r], src[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }
}
