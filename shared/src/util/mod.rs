//! Helpers with no SCAE concept in them: atomic file output ([`io`]), content fingerprints
//! ([`fingerprint`]), memory estimates
//! ([`mem`]), parquet tables ([`table`]), dense kernels on flat buffers ([`blas`]), a seeded
//! generator ([`rng`]), phase timing ([`profile`]), ordered sums along eight rows at once
//! ([`rows8`]), the run-time choice of vector unit
//! ([`simd`]) and collectives over the ranks of a job ([`collective`]).

pub mod blas;
pub mod collective;
pub mod fingerprint;
pub mod interrupt;
pub mod io;
pub mod mem;
pub mod profile;
pub mod progress;
pub mod rng;
pub mod rows8;
pub mod simd;
pub mod table;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// `note!(...)`: one line on stderr, like `eprintln!`, but a stderr that cannot be written
/// (closed, full) is ignored instead of panicking: progress notes never fail a run.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::util::write_note(format_args!($($arg)*))
    };
}

#[doc(hidden)]
pub fn write_note(args: std::fmt::Arguments) {
    use std::io::Write;
    if !quiet() {
        // One write per line, so that the lines of several processes (the ranks of a job) do not
        // interleave.
        let _ = std::io::stderr().lock().write_all(format!("{args}\n").as_bytes());
    }
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silence [`note!`] and progress in this process (the ranks of a job other than rank 0, which
/// speaks for the job; errors are still printed).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_quiet`] silenced this process.
pub fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// A tensor's values as a host `Vec<f32>` (any device and float dtype, any layout).
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Hand memory freed on the heap back to the system (glibc's `malloc_trim`; elsewhere
/// nothing). Freed buffers stay in the allocator's arenas otherwise: `finetune` at GPT-2 small,
/// F 24,576 kept the emptied suite's 3.6 GB resident beside the parameters and Adam's moments.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `f` of the values of a contiguous host f32 tensor, read in place (`None` for any other
/// tensor).
pub fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// A tensor's values on the host as `f32`: read in place when it is a contiguous host `f32`
/// tensor (the read lock on its storage held while this lives, so nothing may write that
/// storage meanwhile — a batch's activations are only read), else a copy ([`to_vec`]).
pub enum HostF32<'a> {
    InPlace(candle_core::StorageRef<'a>, std::ops::Range<usize>),
    Copied(Vec<f32>),
}

impl HostF32<'_> {
    pub fn of(t: &Tensor) -> Result<HostF32<'_>> {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(HostF32::InPlace(storage, a..b));
        }
        drop(storage);
        Ok(HostF32::Copied(to_vec(t)?))
    }

    pub fn as_slice(&self) -> &[f32] {
        match self {
            HostF32::InPlace(storage, r) => match &**storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[r.clone()],
                _ => unreachable!("HostF32::of keeps only host f32 storage in place"),
            },
            HostF32::Copied(v) => v,
        }
    }
}

/// Whether every value of a float tensor is finite. Off the host fast path: each value times 0
/// is 0, or NaN for NaN and infinities, so the sum is 0 exactly when all are finite (a plain sum
/// would overflow on large finite values).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    // A contiguous host f32 tensor is read in place, in parallel (cache shards are large).
    use rayon::prelude::*;
    // (The largest magnitude's bits per chunk, a branch-free loop that vectorizes; a check per
    // value with an early exit ran one value per cycle.)
    let finite = |c: &[f32]| c.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff)) < 0x7f80_0000;
    if let Some(ok) = with_host_f32(t, |v| v.par_chunks(1 << 16).all(finite)) {
        return Ok(ok);
    }
    Ok(t.to_dtype(DType::F32)?.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()? == 0.0)
}

/// A scalar tensor's value as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Progress on stderr of a run named `what` over `total_tokens` tokens (a bar on a terminal,
/// plain lines otherwise; see [`progress`]).
pub fn token_bar(total_tokens: Option<u64>, what: &str) -> progress::Progress {
    progress::Progress::new(what, progress::Unit::Tokens, total_tokens, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finite check: the extreme finite values pass, each kind of non-finite value fails
    /// wherever it sits (in either chunk of a two-chunk tensor, first or last), on the host fast
    /// path and through a non-f32 tensor.
    #[test]
    fn all_finite_tells_every_non_finite_value() {
        let dev = candle_core::Device::Cpu;
        let n = (1 << 16) + 5;
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - 7.0) * 1e-3).collect();
        for (at, x) in [(0, f32::MAX), (1, f32::MIN), (2, -0.0), (3, f32::MIN_POSITIVE / 4.0), (n - 1, -f32::MAX)] {
            v[at] = x;
        }
        assert!(all_finite(&Tensor::from_slice(&v, n, &dev).unwrap()).unwrap());
        let nan_neg = f32::from_bits(0xffc0_0001);
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, nan_neg] {
            for at in [0, 1 << 15, 1 << 16, n - 1] {
                let mut w = v.clone();
                w[at] = bad;
                let t = Tensor::from_slice(&w, n, &dev).unwrap();
                assert!(!all_finite(&t).unwrap(), "{bad} at {at}");
                assert!(!all_finite(&t.to_dtype(DType::F64).unwrap()).unwrap(), "{bad} at {at}, f64");
            }
        }
    }
}
