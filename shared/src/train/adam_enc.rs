//! Adam on an encoder held input-major, `(D, F)` (train-suite's host layout, which the encoder
//! product reads fastest), from its gradient by feature, `(F, D)` (as the backward's by-feature
//! sums write it): per element the operations of [`super::optim`]'s Adam, so the same bits as
//! on matching layouts. Eight rows of the encoder at a time: their parameters and moments
//! stream front to back, and the gradient's matching 8 × 8 tiles are transposed in registers
//! (each gradient line is read for two blocks of rows, the second time from cache).

use rayon::prelude::*;

use super::optim::{adam_moments, adam_param};

/// Adam's update of `x (D, F)` and its moments `m`, `v` (same layout) from `g (F, D)` scaled by
/// `coef`; `mc`, `pc` are [`super::optim::Optimizer`]'s moment and parameter constants.
#[allow(clippy::too_many_arguments)]
pub(super) fn adam_input_major(
    x: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    d: usize,
    coef: f32,
    mc: [f32; 3],
    pc: [f32; 3],
) {
    let f = x.len() / d.max(1);
    assert!(g.len() == x.len() && m.len() == x.len() && v.len() == x.len(), "adam_input_major: sizes");
    if f == 0 {
        return;
    }
    let blocks = x.par_chunks_mut(8 * f).zip(m.par_chunks_mut(8 * f)).zip(v.par_chunks_mut(8 * f));
    blocks.enumerate().for_each(|(b, ((x, m), v))| {
        let j0 = 8 * b;
        #[allow(unused_mut)] // assigned on x86-64 only
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if x.len() == 8 * f && d >= j0 + 8 && std::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX; eight rows of F; g is (F, D) with j0 + 8 <= D.
            unsafe { block_avx(x, g, m, v, d, j0, coef, mc, pc) };
            done = f / 8 * 8;
        }
        for c in 0..x.len() / f {
            for i in done..f {
                let at = c * f + i;
                adam_moments(&mut m[at], &mut v[at], g[i * d + j0 + c] * coef, mc);
                adam_param(&mut x[at], m[at], v[at], pc);
            }
        }
    });
}

/// [`adam_input_major`] of eight rows over their whole blocks of eight features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx(
    x: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    d: usize,
    j0: usize,
    coef: f32,
    [c1, b2, c2]: [f32; 3],
    [step, bc2, eps]: [f32; 3],
) {
    use std::arch::x86_64::*;
    let f = x.len() / 8;
    assert!(x.len() == 8 * f && m.len() == x.len() && v.len() == x.len() && g.len() == f * d && j0 + 8 <= d);
    let (coef, c1, b2, c2) = (_mm256_set1_ps(coef), _mm256_set1_ps(c1), _mm256_set1_ps(b2), _mm256_set1_ps(c2));
    let (step, bc2, eps) = (_mm256_set1_ps(step), _mm256_set1_ps(bc2), _mm256_set1_ps(eps));
    for f0 in (0..f / 8 * 8).step_by(8) {
        // SAFETY: rows f0..f0 + 8 of g have D values and j0 + 8 <= D.
        let gt = unsafe { crate::util::rows8::columns8(g.as_ptr().add(f0 * d), d, j0) };
        for (c, gv) in gt.into_iter().enumerate() {
            let at = c * f + f0;
            // SAFETY: row c of the block has F values and f0 + 8 <= F.
            unsafe {
                let (xp, mp, vp) = (x.as_mut_ptr().add(at), m.as_mut_ptr().add(at), v.as_mut_ptr().add(at));
                let gi = _mm256_mul_ps(gv, coef);
                let mm = _mm256_loadu_ps(mp);
                let mm = _mm256_add_ps(mm, _mm256_mul_ps(c1, _mm256_sub_ps(gi, mm)));
                let vv =
                    _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(vp), b2), _mm256_mul_ps(c2, _mm256_mul_ps(gi, gi)));
                let denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), bc2), eps);
                let xv = _mm256_sub_ps(_mm256_loadu_ps(xp), _mm256_mul_ps(step, _mm256_div_ps(mm, denom)));
                _mm256_storeu_ps(mp, mm);
                _mm256_storeu_ps(vp, vv);
                _mm256_storeu_ps(xp, xv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix;

    /// The input-major update from a by-feature gradient is, bit for bit, the elementwise update
    /// on matching layouts (shapes with whole and partial blocks of eight, both ways).
    #[test]
    fn input_major_adam_is_the_elementwise_adam() {
        let (mc, pc) = ([0.1f32, 0.999, 0.001], [0.01f32, 0.3, 1e-8]);
        for (d, f) in [(16, 24), (13, 21), (8, 8), (5, 3), (24, 40)] {
            let x0 = SplitMix::normals(d * f, 1);
            let g = SplitMix::normals(f * d, 2);
            let m0 = SplitMix::normals(d * f, 3);
            let v0: Vec<f32> = SplitMix::normals(d * f, 4).iter().map(|x| x * x).collect();
            let (mut x, mut m, mut v) = (x0.clone(), m0.clone(), v0.clone());
            adam_input_major(&mut x, &g, &mut m, &mut v, d, 0.7, mc, pc);
            let gt = crate::util::blas::transpose(&g, f, d);
            for at in 0..d * f {
                let (mut mm, mut vv, mut xx) = (m0[at], v0[at], x0[at]);
                adam_moments(&mut mm, &mut vv, gt[at] * 0.7, mc);
                adam_param(&mut xx, mm, vv, pc);
                assert_eq!(
                    (x[at].to_bits(), m[at].to_bits(), v[at].to_bits()),
                    (xx.to_bits(), mm.to_bits(), vv.to_bits()),
                    "d {d}, f {f}, {at}"
                );
            }
        }
    }
}
