//! Initialising an autoencoder (docs/MATH.md, "Initialisation").

use super::decoder::normalize_decoder;
use super::params::AeParams;
use crate::util::rng::SplitMix;

/// The reference's initialisation at HEAD: `W_enc ~ U(−1/√D, 1/√D) / 10` (nn.Linear's default,
/// then /10), `b_enc = 0`, `W_dec = W_encᵀ` with unit columns, `b_dec = 0`.
pub fn init_params(d: usize, f: usize, rng: &mut SplitMix) -> AeParams<Vec<f32>> {
    let bound = 1.0 / (d as f64).sqrt();
    let enc: Vec<f32> = (0..f * d).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound / 10.0) as f32).collect();
    let mut dec = vec![0f32; d * f];
    for i in 0..f {
        for j in 0..d {
            dec[j * f + i] = enc[i * d + j];
        }
    }
    normalize_decoder(&mut dec, d, f);
    AeParams { w_enc: enc, b_enc: vec![0f32; f], w_dec: dec, b_dec: vec![0f32; d] }
}

/// Weiszfeld's geometric median of `points (n, d)`: start at the mean, reweight by inverse
/// distance up to 100 times, stop when the move is below 1e-5 (the reference's; distances are
/// floored at 1e-12 so a point equal to the estimate cannot divide by zero).
pub fn geometric_median(points: &[f32], d: usize) -> Vec<f32> {
    let n = points.len() / d;
    let mut guess = vec![0f64; d];
    for p in points.chunks(d) {
        guess.iter_mut().zip(p).for_each(|(g, v)| *g += *v as f64 / n as f64);
    }
    for _ in 0..100 {
        let prev = guess.clone();
        let w: Vec<f64> = points
            .chunks(d)
            .map(|p| 1.0 / p.iter().zip(&prev).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt().max(1e-12))
            .collect();
        let total: f64 = w.iter().sum();
        guess = vec![0f64; d];
        for (p, wi) in points.chunks(d).zip(&w) {
            guess.iter_mut().zip(p).for_each(|(g, v)| *g += wi / total * *v as f64);
        }
        let moved = guess.iter().zip(&prev).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        if moved < 1e-5 {
            break;
        }
    }
    guess.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_median_of_a_symmetric_cloud_is_its_centre() {
        // Four corners of a square around (1, 2) and one far outlier: the median barely moves
        // toward the outlier, the mean moves a lot.
        let pts = [0.0, 1.0, 2.0, 1.0, 0.0, 3.0, 2.0, 3.0, 1.0, 2.0, 100.0, 2.0];
        let m = geometric_median(&pts, 2);
        assert!((m[0] - 1.0).abs() < 0.3 && (m[1] - 2.0).abs() < 1e-3, "{m:?}");
    }
}
