//! Host rows of matrices and the f64 dot products attribution sums links with.

use candle_core::Tensor;

use crate::error::Result;
use crate::util::to_vec;

/// Rows of a matrix on the host.
pub(super) struct Rows {
    pub(super) data: Vec<f32>,
    pub(super) width: usize,
}

impl Rows {
    pub(super) fn of(t: &Tensor) -> Result<Rows> {
        let width = t.dim(1)?;
        Ok(Rows { data: to_vec(t)?, width })
    }
    pub(super) fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.width..(r + 1) * self.width]
    }
    /// Rows `rs` as a host tensor.
    pub(super) fn tensor(&self, rs: impl Iterator<Item = usize>) -> Result<Tensor> {
        let data: Vec<f32> = rs.flat_map(|r| self.row(r).iter().copied()).collect();
        let n = data.len() / self.width.max(1);
        Ok(Tensor::from_vec(data, (n, self.width), &candle_core::Device::Cpu)?)
    }
}

/// `a · b`, each product and the sum in f64, in order.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Per head of width `a.len() / h`, the dot product of `a` and `b` over it (each as [`dot`]
/// sums it, four heads at a time).
pub(super) fn head_dots(a: &[f32], b: &[f32], h: usize) -> Vec<f64> {
    let dh = a.len() / h;
    let mut out = vec![-0.0f64; h];
    let mut hh = 0;
    while hh + 4 <= h {
        let mut acc = [-0.0f64; 4];
        for t in 0..dh {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = (hh + k) * dh + t;
                *acc += a[at] as f64 * b[at] as f64;
            }
        }
        out[hh..hh + 4].copy_from_slice(&acc);
        hh += 4;
    }
    for (k, o) in out.iter_mut().enumerate().skip(hh) {
        *o = dot(&a[k * dh..(k + 1) * dh], &b[k * dh..(k + 1) * dh]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dots_are_bit_equal_to_one_dot_per_head() {
        for (h, dh) in [(16, 48), (6, 5), (3, 7), (1, 64)] {
            let a: Vec<f32> = (0..h * dh).map(|i| ((i as f32) * 0.731).sin() * 3.0).collect();
            let b: Vec<f32> = (0..h * dh).map(|i| ((i as f32) * 1.37).cos() / 7.0).collect();
            let want: Vec<u64> =
                (0..h).map(|k| dot(&a[k * dh..(k + 1) * dh], &b[k * dh..(k + 1) * dh]).to_bits()).collect();
            assert_eq!(head_dots(&a, &b, h).iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "{h} heads");
        }
        // Signed zeros as `Iterator::sum` gives them (a sum of −0 terms is −0).
        assert!(head_dots(&[-0.0; 8], &[1.0; 8], 4).iter().all(|x| x.to_bits() == (-0.0f64).to_bits()));
    }
}
