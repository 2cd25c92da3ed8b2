//! Content fingerprints: what identifies a model, a suite or a file independently of where and
//! how it is stored.
//!
//! - [`TensorHasher`]: a blake3 digest of named tensors (name, dtype, shape, bytes, in the order
//!   given), so that the same weights saved as `.bin` or `.safetensors`, whole or sharded, give
//!   the same fingerprint while any changed value, shape or dtype gives another.
//! - [`file_fingerprint`]: a digest of a file's contents (whole up to 64 MiB, else its size and
//!   64 evenly spread blocks of 64 KiB), cheap enough for multi-GB data files.

use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// A running digest of named tensors. Each tensor enters as its name, dtype, shape and bytes
/// (little-endian, row-major), each length-prefixed, so no two different inputs can give the
/// same stream.
pub struct TensorHasher {
    h: blake3::Hasher,
}

impl TensorHasher {
    /// A digest of the kind `domain` (e.g. `scae-model-v2`), which enters first.
    pub fn new(domain: &str) -> TensorHasher {
        let mut h = blake3::Hasher::new();
        h.update(domain.as_bytes());
        TensorHasher { h }
    }

    fn field(&mut self, bytes: &[u8]) {
        self.h.update(&(bytes.len() as u64).to_le_bytes());
        if bytes.len() > 1 << 20 {
            self.h.update_rayon(bytes);
        } else {
            self.h.update(bytes);
        }
    }

    /// Add a string (a configuration's canonical form).
    pub fn add_str(&mut self, s: &str) {
        self.field(s.as_bytes());
    }

    /// Add one tensor given as raw parts.
    pub fn add_raw(&mut self, name: &str, dtype: &str, shape: &[usize], bytes: &[u8]) {
        self.field(name.as_bytes());
        self.field(dtype.as_bytes());
        let dims: Vec<u8> = shape.iter().flat_map(|d| (*d as u64).to_le_bytes()).collect();
        self.field(&dims);
        self.field(bytes);
    }

    /// Add one tensor (copied to the host in its own dtype).
    pub fn add_tensor(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let bytes = safetensors::View::data(t);
        self.add_raw(name, t.dtype().as_str(), t.dims(), &bytes);
        Ok(())
    }

    /// The digest as `blake3:<hex>`.
    pub fn finish(self) -> String {
        format!("blake3:{}", self.h.finalize().to_hex())
    }
}

/// A fingerprint of a file's contents: `blake3:<hex>` of its size and its bytes, whole up to
/// 64 MiB; a larger file by its size and 64 blocks of 64 KiB spread evenly over it (first and
/// last included), which any bulk change of its values hits.
pub fn file_fingerprint(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    hash_file(path, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(format!("blake3:{}", h.finalize().to_hex()))
}

/// Hash a file into `h` as [`file_fingerprint`] describes.
pub fn hash_file(path: &Path, h: &mut blake3::Hasher) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    const WHOLE: u64 = 64 << 20;
    const BLOCK: u64 = 64 << 10;
    const BLOCKS: u64 = 64;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    h.update(&len.to_le_bytes());
    if len <= WHOLE {
        std::io::copy(&mut f, h)?;
        return Ok(());
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..BLOCKS {
        f.seek(SeekFrom::Start(i * (len - BLOCK) / (BLOCKS - 1)))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
    }
    Ok(())
}

/// A short form of a fingerprint for messages: its first 12 hex digits.
pub fn short(id: &str) -> &str {
    let hex = id.rsplit(':').next().unwrap_or(id);
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn tensor_digest_depends_on_every_part_and_not_on_the_storage() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec(vec![1f32, 2., 3., 4.], (2, 2), &dev).unwrap();
        let digest = |name: &str, t: &Tensor| {
            let mut h = TensorHasher::new("test");
            h.add_tensor(name, t).unwrap();
            h.finish()
        };
        let base = digest("w", &a);
        // The same values through another route (a transposed copy transposed back).
        assert_eq!(base, digest("w", &a.t().unwrap().contiguous().unwrap().t().unwrap()));
        assert_ne!(base, digest("v", &a));
        assert_ne!(base, digest("w", &a.reshape(4).unwrap()));
        assert_ne!(base, digest("w", &a.to_dtype(DType::F64).unwrap()));
        assert_ne!(base, digest("w", &(a.clone() + 1e-7).unwrap()));
        // Length prefixes: moving a byte from the name into the dtype changes the digest.
        let mut h1 = TensorHasher::new("t");
        h1.add_raw("ab", "c", &[1], &[0]);
        let mut h2 = TensorHasher::new("t");
        h2.add_raw("a", "bc", &[1], &[0]);
        assert_ne!(h1.finish(), h2.finish());
        assert_eq!(short("blake3:0123456789abcdef"), "0123456789ab");
    }
}
