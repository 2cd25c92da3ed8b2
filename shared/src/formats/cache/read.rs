//! Reading cache shard files: the safetensors header, and tensors' bytes straight into their
//! buffers ([`super::Cache::load_seqs`] reads several tensors of one file at a time).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, IoContext, Result};

/// A shard's header: its length, its JSON, and the file, positioned after it.
pub(super) fn shard_header(path: &Path) -> Result<(u64, serde_json::Value, std::fs::File)> {
    use std::io::Read;
    let unreadable = |what: &str| Error::input(path, format!("not a readable cache shard: {what}"));
    let mut f = std::fs::File::open(path).at(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| unreadable("shorter than a safetensors header"))?;
    let len = u64::from_le_bytes(len);
    let file_len = f.metadata().at(path)?.len();
    if len > file_len.saturating_sub(8) || len > 1 << 30 {
        return Err(unreadable(&format!("header length {len} exceeds the file ({file_len} bytes)")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|_| unreadable("truncated header"))?;
    let header = serde_json::from_slice(&header).map_err(|e| unreadable(&format!("header is not JSON: {e}")))?;
    Ok((len, header, f))
}

/// One tensor's bytes: f32 (on a little-endian host) read straight into the tensor's own buffer,
/// other dtypes as bytes for safetensors' view.
pub(super) enum Buffer {
    F32(Vec<f32>),
    Raw(Vec<u8>),
}

impl Buffer {
    /// A zeroed buffer of `bytes` bytes for a tensor of `dtype` (`bytes` checked against its
    /// shape by the caller). Allocated on the calling thread: the tensors outlive the reading,
    /// and memory a pool thread allocates comes from its own arena, which the main heap's large
    /// allocations later cannot reuse.
    pub(super) fn new(dtype: safetensors::Dtype, bytes: usize) -> Buffer {
        match dtype == safetensors::Dtype::F32 && cfg!(target_endian = "little") {
            true => Buffer::F32(vec![0f32; bytes / 4]),
            false => Buffer::Raw(vec![0u8; bytes]),
        }
    }

    /// Fill the buffer from offset `at` of shard file `f` (at `path`); may run on any thread.
    pub(super) fn read(&mut self, f: &std::fs::File, path: &Path, at: u64) -> std::result::Result<(), String> {
        let raw = match self {
            // SAFETY: the byte view covers the values exactly, and any bits are a valid f32.
            Buffer::F32(v) => unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 4) },
            Buffer::Raw(v) => &mut v[..],
        };
        read_exact_at(f, path, raw, at).map_err(|_| "cut short".to_string())
    }

    /// The tensor of `dtype` and `shape` on `device` (an f32 buffer becomes its storage as it
    /// is). The error says what was wrong, without the file (the caller names it).
    pub(super) fn into_tensor(
        self,
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        device: &Device,
    ) -> std::result::Result<Tensor, String> {
        match self {
            Buffer::F32(v) => Tensor::from_vec(v, shape, device).map_err(|e| e.to_string()),
            Buffer::Raw(raw) => {
                let view = safetensors::tensor::TensorView::new(dtype, shape, &raw).map_err(|e| e.to_string())?;
                candle_core::safetensors::Load::load(&view, device).map_err(|e| e.to_string())
            }
        }
    }
}

/// `buf.len()` bytes of `f` (at `path`) from offset `at`, without moving a shared cursor (so
/// that several threads read one file; elsewhere than Unix, through a handle of its own).
fn read_exact_at(f: &std::fs::File, path: &Path, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let _ = path;
        std::os::unix::fs::FileExt::read_exact_at(f, buf, at)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let _ = f;
        let mut f = std::fs::File::open(path)?;
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(buf)
    }
}
