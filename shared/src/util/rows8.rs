//! Ordered sums along eight rows at once: per row one chain of additions in column order from
//! zero (the bits of the plain loop), the eight chains side by side in one vector register.
//! A row's chain cannot be split without changing its bits, so the rows, not the columns, go
//! across the vector's lanes: eight rows' columns are loaded eight at a time and transposed in
//! registers. (Scalar, eight chains side by side, such a sum cost ~1 ms per decoder of
//! 3,072 × 768 at TinyStories-33M shape; as here, a fifth of that.) The same transposes serve a
//! matrix held transposed: [`axpy_columns`] (per row, one chain over the columns) and Adam on
//! train-suite's input-major encoder (`train::adam_enc`).

/// `Σ_j (a[r, j] as f64)²` in `j` order from zero for each of the (up to eight) rows `r` of
/// `a` (rows of `d`); rows past the last are 0.
pub fn sq_sums(a: &[f32], d: usize) -> [f64; 8] {
    let rows = a.len() / d.max(1);
    assert!(rows <= 8 && a.len() == rows * d, "rows8::sq_sums: up to eight whole rows");
    let mut out = [0f64; 8];
    #[allow(unused_mut)] // assigned on x86-64 only
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if rows == 8 && d >= 8 && std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX; eight rows of d.
        (out, done) = unsafe { sq_sums_avx(a, d) };
    }
    for (r, s) in out[..rows].iter_mut().enumerate() {
        for &x in &a[r * d + done..(r + 1) * d] {
            *s += (x as f64) * (x as f64);
        }
    }
    out
}

/// `Σ_j (a[r, j] · s) · b[r, j]` in f32, in `j` order from zero, for each of the (up to eight)
/// rows `r` of `a` and `b` (rows of `d`); rows past the last are 0.
pub fn scaled_dots(a: &[f32], b: &[f32], d: usize, s: f32) -> [f32; 8] {
    let rows = a.len() / d.max(1);
    assert!(rows <= 8 && a.len() == rows * d && b.len() == a.len(), "rows8::scaled_dots: up to eight whole rows");
    let mut out = [0f32; 8];
    #[allow(unused_mut)] // assigned on x86-64 only
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if rows == 8 && d >= 8 && std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX; eight rows of d in each.
        (out, done) = unsafe { scaled_dots_avx(a, b, d, s) };
    }
    for (r, o) in out[..rows].iter_mut().enumerate() {
        for (&x, &y) in a[r * d + done..(r + 1) * d].iter().zip(&b[r * d + done..(r + 1) * d]) {
            *o += (x * s) * y;
        }
    }
    out
}

/// `out[r] += Σ_i alpha[i] · w[r, i]` for each row `r` of `w (out.len(), alpha.len())`, the terms
/// in `i` order and those with `alpha[i] == 0` skipped: per element the bits of one
/// [`crate::util::blas::axpy`] per non-zero term (`w`'s columns), eight rows at once.
pub fn axpy_columns(out: &mut [f32], w: &[f32], alpha: &[f32]) {
    let cols = alpha.len();
    assert_eq!(w.len(), out.len() * cols, "rows8::axpy_columns: w is (out.len(), alpha.len())");
    #[allow(unused_mut)] // assigned on x86-64 only
    let (mut rows_done, mut done) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if cols >= 8 && std::is_x86_feature_detected!("avx") {
        done = cols / 8 * 8;
        for (o, blk) in out.chunks_exact_mut(8).zip(w.chunks_exact(8 * cols)) {
            // SAFETY: the CPU has AVX; eight rows of `cols`.
            unsafe { axpy_columns_avx(o, blk, alpha) };
        }
        rows_done = out.len() / 8 * 8;
    }
    for (r, o) in out.iter_mut().enumerate() {
        let from = if r < rows_done { done } else { 0 };
        for (&a, &x) in alpha[from..].iter().zip(&w[r * cols + from..(r + 1) * cols]) {
            if a != 0.0 {
                *o += a * x;
            }
        }
    }
}

/// [`axpy_columns`] of eight rows over their whole blocks of eight columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn axpy_columns_avx(out: &mut [f32], w: &[f32], alpha: &[f32]) {
    use std::arch::x86_64::*;
    let cols = alpha.len();
    assert!(out.len() == 8 && w.len() == 8 * cols);
    // SAFETY: `out` holds eight floats.
    let mut acc = unsafe { _mm256_loadu_ps(out.as_ptr()) };
    for i in (0..cols / 8 * 8).step_by(8) {
        if alpha[i..i + 8].iter().all(|&a| a == 0.0) {
            continue;
        }
        // SAFETY: eight rows of `cols`, i + 8 <= cols.
        let c = unsafe { columns8(w.as_ptr(), cols, i) };
        for (v, &a) in c.into_iter().zip(&alpha[i..i + 8]) {
            if a != 0.0 {
                acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(a), v));
            }
        }
    }
    // SAFETY: as above.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) };
}

/// Columns `j..j + 8` of eight rows of `d` at `p` as eight vectors, vector `c` holding column
/// `j + c` of rows 0..8.
///
/// # Safety
/// AVX; `p` points at eight rows of `d` and `j + 8 <= d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn columns8(p: *const f32, d: usize, j: usize) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // SAFETY: the caller's bounds.
    transpose8(std::array::from_fn(|i| unsafe { _mm256_loadu_ps(p.add(i * d + j)) }))
}

/// The 8 × 8 transpose of eight vectors: vector `c` of the result holds element `c` of each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved, then quadruples, then the 128-bit halves exchanged.
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}

/// [`sq_sums`] of eight rows over their whole blocks of eight columns: `(sums, columns done)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn sq_sums_avx(a: &[f32], d: usize) -> ([f64; 8], usize) {
    use std::arch::x86_64::*;
    assert!(a.len() == 8 * d);
    let body = d / 8 * 8;
    let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    for j in (0..body).step_by(8) {
        // SAFETY: eight rows of d, j + 8 <= d.
        for c in unsafe { columns8(a.as_ptr(), d, j) } {
            let (l, h) = (_mm256_cvtps_pd(_mm256_castps256_ps128(c)), _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(c)));
            lo = _mm256_add_pd(lo, _mm256_mul_pd(l, l));
            hi = _mm256_add_pd(hi, _mm256_mul_pd(h, h));
        }
    }
    let mut out = [0f64; 8];
    // SAFETY: `out` holds eight doubles.
    unsafe {
        _mm256_storeu_pd(out.as_mut_ptr(), lo);
        _mm256_storeu_pd(out.as_mut_ptr().add(4), hi);
    }
    (out, body)
}

/// [`scaled_dots`] of eight rows over their whole blocks of eight columns: `(dots, columns done)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn scaled_dots_avx(a: &[f32], b: &[f32], d: usize, s: f32) -> ([f32; 8], usize) {
    use std::arch::x86_64::*;
    assert!(a.len() == 8 * d && b.len() == 8 * d);
    let body = d / 8 * 8;
    let (mut acc, sv) = (_mm256_setzero_ps(), _mm256_set1_ps(s));
    for j in (0..body).step_by(8) {
        // SAFETY: eight rows of d in each, j + 8 <= d.
        let (ca, cb) = unsafe { (columns8(a.as_ptr(), d, j), columns8(b.as_ptr(), d, j)) };
        for (x, y) in ca.into_iter().zip(cb) {
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(x, sv), y));
        }
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds eight floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) };
    (out, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix;

    /// Columns' axpys eight rows at once are the plain axpys' bits (zero terms skipped, a whole
    /// zero block, row and column tails).
    #[test]
    fn column_axpys_are_the_plain_axpys() {
        for (rows, cols) in [(16, 40), (8, 8), (13, 21), (3, 5), (9, 64)] {
            let w = SplitMix::normals(rows * cols, 3);
            let alpha: Vec<f32> = SplitMix::normals(cols, 4)
                .iter()
                .enumerate()
                .map(|(i, &a)| if i % 5 == 2 || (8..16).contains(&i) { 0.0 } else { a })
                .collect();
            let start = SplitMix::normals(rows, 5);
            let mut got = start.clone();
            axpy_columns(&mut got, &w, &alpha);
            let mut want = start;
            for (i, &a) in alpha.iter().enumerate() {
                if a != 0.0 {
                    want.iter_mut().enumerate().for_each(|(r, o)| *o += a * w[r * cols + i]);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{rows} x {cols}");
        }
    }

    /// Both sums are the plain loops' bits, for eight rows (vector path, with and without a
    /// column tail) and fewer (plain path), with values of very different sizes.
    #[test]
    fn eight_rows_are_the_plain_chains() {
        for (rows, d) in [(8, 768), (8, 37), (8, 8), (8, 3), (5, 40), (1, 9)] {
            let scale = |i: usize, x: f64| (x * 10f64.powi((i % 7) as i32 - 3)) as f32;
            let a: Vec<f32> =
                SplitMix::normals(rows * d, 1).iter().enumerate().map(|(i, &x)| scale(i, x as f64)).collect();
            let b: Vec<f32> = SplitMix::normals(rows * d, 2);
            let (sq, dots) = (sq_sums(&a, d), scaled_dots(&a, &b, d, 0.37));
            for r in 0..8 {
                let (mut s, mut t) = (0f64, 0f32);
                for j in 0..d * usize::from(r < rows) {
                    s += (a[r * d + j] as f64).powi(2);
                    t += (a[r * d + j] * 0.37) * b[r * d + j];
                }
                assert_eq!(sq[r].to_bits(), s.to_bits(), "rows {rows}, d {d}, row {r}: squares");
                assert_eq!(dots[r].to_bits(), t.to_bits(), "rows {rows}, d {d}, row {r}: dots");
            }
        }
    }
}
