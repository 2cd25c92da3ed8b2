//! Decoder normalisation (docs/MATH.md, "Decoder normalisation"): unit-norm columns and the
//! removal of the gradient component parallel to each column, on host buffers and on the
//! device, side by side.

use candle_core::{Tensor, Var};

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
