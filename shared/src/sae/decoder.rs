//! Decoder normalisation (docs/MATH.md, "Decoder normalisation"): unit-norm columns and the
//! removal of the gradient component parallel to each column, on host buffers and on the
//! device, side by side.

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::error::Result;

/// Divide every column of `w_dec (D, F)` by its norm (+ f32 eps, as the reference).
pub fn normalize_decoder(w_dec: &mut [f32], d: usize, f: usize) {
    let mut norms = vec![0f64; f];
    for j in 0..d {
        for i in 0..f {
            norms[i] += (w_dec[j * f + i] as f64).powi(2);
        }
    }
    for j in 0..d {
        for i in 0..f {
            w_dec[j * f + i] /= (norms[i].sqrt() as f32) + f32::EPSILON;
        }
    }
}

/// [`normalize_decoder`] of a decoder held decoder-major, `w_dec_t (F, D)` (train-suite's host
/// loop keeps it so): the same sums in the same order, so the same bits.
/// Eight rows at a time: their norms (the same f64 sums in the same order as
/// [`normalize_decoder`]'s, [`crate::util::rows8::sq_sums`]), then their division while
/// they are in cache (one pass over the decoder instead of two; 9.4 MB per module per step at
/// TinyStories-33M shape).
pub fn normalize_decoder_rows(w_dec_t: &mut [f32], d: usize) {
    if d == 0 {
        return;
    }
    w_dec_t.par_chunks_mut(8 * d).with_min_len(8).for_each(|blk| normalize_rows_block(blk, d));
}

crate::widest! {
    /// [`normalize_decoder_rows`] of up to eight rows of `d`.
    fn normalize_rows_block(blk: &mut [f32], d: usize) {
        let norms = crate::util::rows8::sq_sums(blk, d);
        for (row, norm) in blk.chunks_mut(d).zip(norms) {
            let div = (norm.sqrt() as f32) + f32::EPSILON;
            row.iter_mut().for_each(|x| *x /= div);
        }
    }
}

/// [`normalize_decoder`] of a decoder variable, on its device.
pub fn normalize_decoder_t(w_dec: &Var) -> Result<()> {
    let w = w_dec.as_tensor();
    let norms = (w.sqr()?.sum_keepdim(0)?.sqrt()? + f32::EPSILON as f64)?;
    w_dec.set(&w.broadcast_div(&norms)?)?;
    Ok(())
}

/// `G[:, i] −= (G[:, i] · W[:, i]) W[:, i]` for every column of `w_dec (D, F)` (unit-norm
/// columns assumed), so that a step keeps the columns' norms to first order.
pub fn remove_parallel_component(w_dec: &[f32], g_dec: &mut [f32], d: usize, f: usize) {
    let mut dots = vec![0f32; f];
    for j in 0..d {
        for i in 0..f {
            dots[i] += g_dec[j * f + i] * w_dec[j * f + i];
        }
    }
    for j in 0..d {
        for i in 0..f {
            g_dec[j * f + i] -= dots[i] * w_dec[j * f + i];
        }
    }
}

/// [`remove_parallel_component`] with the decoder and its gradient decoder-major `(F, D)`: the
/// same sums in the same order, so the same bits.
pub fn remove_parallel_component_rows(w_dec_t: &[f32], g_dec_t: &mut [f32], d: usize) {
    if d == 0 {
        return;
    }
    // Eight rows at a time: their dots ((g · 1) · w is g · w), then the subtraction.
    g_dec_t.par_chunks_mut(8 * d).zip(w_dec_t.par_chunks(8 * d)).with_min_len(8).for_each(|(g, w)| {
        let dots = crate::util::rows8::scaled_dots(g, w, d, 1.0);
        for ((g, w), dot) in g.chunks_mut(d).zip(w.chunks(d)).zip(dots) {
            g.iter_mut().zip(w).for_each(|(x, y)| *x -= dot * y);
        }
    });
}

/// [`remove_parallel_component`] on the device: returns the projected gradient.
pub fn remove_parallel_component_t(w_dec: &Tensor, g_dec: &Tensor) -> Result<Tensor> {
    let dots = (g_dec * w_dec)?.sum_keepdim(0)?;
    Ok((g_dec - w_dec.broadcast_mul(&dots)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix;
    use candle_core::Device;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        SplitMix::normals(n, seed)
    }

    /// Decoder-major normalisation in blocks of eight rows (several blocks and a partial one)
    /// gives the standard layout's bits.
    #[test]
    fn row_blocks_normalise_as_the_columns() {
        for (d, f) in [(37, 21), (5, 8), (64, 3)] {
            let mut w = random(d * f, 7);
            let mut rows = crate::util::blas::transpose(&w, d, f);
            normalize_decoder(&mut w, d, f);
            normalize_decoder_rows(&mut rows, d);
            assert_eq!(crate::util::blas::transpose(&rows, f, d), w, "d {d}, f {f}");
        }
    }

    #[test]
    fn decoder_helpers_match_the_host() {
        let (d, f) = (3, 4);
        let mut w = random(d * f, 1);
        let mut g = random(d * f, 2);
        let var = Var::from_tensor(&Tensor::from_slice(&w, (d, f), &Device::Cpu).unwrap()).unwrap();
        normalize_decoder_t(&var).unwrap();
        normalize_decoder(&mut w, d, f);
        let dev_g =
            remove_parallel_component_t(var.as_tensor(), &Tensor::from_slice(&g, (d, f), &Device::Cpu).unwrap())
                .unwrap();
        remove_parallel_component(&w, &mut g, d, f);
        let close = |a: &Tensor, b: &[f32]| {
            for (x, y) in a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(b) {
                assert!((x - y).abs() < 1e-6, "{x} vs {y}");
            }
        };
        // decoder-major: the same bits
        let mut rows = crate::util::blas::transpose(&random(d * f, 1), d, f);
        normalize_decoder_rows(&mut rows, d);
        let mut g_rows = crate::util::blas::transpose(&random(d * f, 2), d, f);
        remove_parallel_component_rows(&rows, &mut g_rows, d);
        assert_eq!(crate::util::blas::transpose(&rows, f, d), w);
        assert_eq!(crate::util::blas::transpose(&g_rows, f, d), g);
        close(var.as_tensor(), &w);
        close(&dev_g, &g);
        // and the formula itself: unit columns, and a gradient orthogonal to each column
        let wt = var.as_tensor().to_vec2::<f32>().unwrap();
        for i in 0..f {
            let norm: f32 = (0..d).map(|j| wt[j][i] * wt[j][i]).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "column {i} norm {norm}");
            let dot: f32 = (0..d).map(|j| wt[j][i] * g[j * f + i]).sum();
            assert!(dot.abs() < 1e-5, "column {i}: g·w = {dot}");
        }
    }
}
