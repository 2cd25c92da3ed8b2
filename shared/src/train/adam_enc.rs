//! Adam on an encoder held input-major, `(D, F)` (train-suite's host layout, which the encoder
//! product reads fastest), from its gradient by feature, `(F, D)` (as the backward's by-feature
//! sums write it): per element the operations of [`super::optim`]'s Adam, so the same bits as
//! on matching layouts.
//!
//! By bands of [`BAND`] rows of the encoder: the gradient's matching columns are first gathered
//! into a band-sized buffer (a few hundred KB, in cache; [`transpose_strided`]: 8 × 8 tiles
//! transposed in registers, the gradient's rows fetched ahead), then each row is updated as a
//! contiguous slice. For 8 encoders of 768 × 3072 (TinyStories-33M shape, 2 threads, from
//! memory) this takes ~17 ms, where updating eight rows at a time straight from the tiles took
//! ~29 (24 parameter and moment streams beside the strided gradient) and matching layouts ~11.

use rayon::prelude::*;

use super::optim::adam_slice;
use crate::util::blas::transpose_strided;

/// Encoder rows (input dimensions) per band.
const BAND: usize = 32;

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
    let bands = x.par_chunks_mut(BAND * f).zip(m.par_chunks_mut(BAND * f)).zip(v.par_chunks_mut(BAND * f));
    bands.enumerate().for_each_init(
        || vec![0f32; BAND * f],
        |gt, (b, ((x, m), v))| {
            // gt (rows, F): the band's columns of g (F, D).
            let (gt, rows) = (&mut gt[..x.len()], x.len() / f);
            transpose_strided(&g[BAND * b..], d, f, rows, gt, f);
            adam_slice(x, gt, m, v, coef, mc, pc);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::super::optim::{adam_moments, adam_param};
    use super::*;
    use crate::util::rng::SplitMix;

    /// The input-major update from a by-feature gradient is, bit for bit, the elementwise update
    /// on matching layouts (shapes with whole and partial blocks of eight, both ways).
    #[test]
    fn input_major_adam_is_the_elementwise_adam() {
        let (mc, pc) = ([0.1f32, 0.999, 0.001], [0.01f32, 0.3, 1e-8]);
        for (d, f) in [(16, 24), (13, 21), (8, 8), (5, 3), (24, 40), (45, 83), (40, 7)] {
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
