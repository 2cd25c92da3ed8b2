//! The TopK autoencoder, one definition per formula (docs/MATH.md, "TopK autoencoder"):
//! - [`params`]: the four parameters by name ([`AeParams`]), in any representation;
//! - [`topk`]: top-k selection with the tie rule, host and device;
//! - [`loss`]: FVU (both definitions) and AuxK, host and device;
//! - [`decoder`]: unit-norm decoder columns and the parallel-gradient projection;
//! - [`init`]: the reference's initialisation and the geometric median;
//! - [`step`]: one pretraining forward and backward (host, hand-written; device, autograd).
//!
//! Encode: `f = ReLU(top-k((x − b_dec) W_encᵀ + b_enc))`; decode: `x̂ = f W_decᵀ + b_dec`.

pub mod decoder;
pub mod init;
pub mod loss;
pub mod params;
pub mod step;
pub mod topk;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

pub use params::AeParams;

use crate::error::Result;
use crate::util::blas::add_scaled_rows;

/// Decode sparse codes: row `t` of the result `(N, D)` is `bias + Σ_j val[t, j] · dec_t[idx[t, j]]`
/// over the `width` entries of the row with a non-zero value (`bias` zero when `None`);
/// `dec_t` is `W_decᵀ (F, D)`.
pub fn decode(idx: &[u32], val: &[f32], width: usize, dec_t: &[f32], d: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let n = idx.len() / width.max(1);
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d).enumerate().for_each(|(t, r)| {
        let slots = t * width..(t + 1) * width;
        decode_row(&idx[slots.clone()], &val[slots], dec_t, bias, r)
    });
    out
}

/// One row of [`decode`] into `out` (rows of `out.len()`): `bias` (else zero), then each
/// non-zero `val[j] · dec_t[idx[j]]` added in `j` order ([`add_scaled_rows`], 64 terms at a time:
/// per element the additions of one `axpy` per term).
pub fn decode_row(idx: &[u32], val: &[f32], dec_t: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    match bias {
        Some(b) => out.copy_from_slice(b),
        None => out.fill(0.0),
    }
    let mut terms = [(0u32, 0f32); 64];
    for (idx, val) in idx.chunks(terms.len()).zip(val.chunks(terms.len())) {
        let mut n = 0;
        for (&i, &v) in idx.iter().zip(val).filter(|(_, &v)| v != 0.0) {
            terms[n] = (i, v);
            n += 1;
        }
        add_scaled_rows(out, dec_t, &terms[..n]);
    }
}

/// Which of `f` latents have a non-zero value on some token, given the sparse codes.
pub fn fired(idx: &[u32], val: &[f32], f: usize) -> Vec<bool> {
    let mut out = vec![false; f];
    for (&i, &v) in idx.iter().zip(val) {
        if v != 0.0 {
            out[i as usize] = true;
        }
    }
    out
}

/// [`fired`] of dense features `(N, F)` per module, on their device: one `modules × F`
/// transfer.
pub fn fired_t(feats: &[Tensor]) -> Result<Vec<Vec<bool>>> {
    let counts = feats.iter().map(|f| Ok(f.ne(0f32)?.to_dtype(DType::F32)?.sum(0)?)).collect::<Result<Vec<_>>>()?;
    let all = Tensor::stack(&counts, 0)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    Ok(all.into_iter().map(|r| r.into_iter().map(|c| c > 0.0).collect()).collect())
}
