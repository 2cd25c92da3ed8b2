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

/// `bytes` bytes at offset `at` of shard file `f` (at `path`) as a tensor of `dtype` and `shape` on
/// `device`: f32 (on a little-endian host) read into its buffer in place, other dtypes through
/// safetensors' view. The error says what was wrong, without the file (the caller names it).
pub(super) fn read_tensor(
    f: &std::fs::File,
    path: &Path,
    at: u64,
    bytes: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    let cut_short = |_| "cut short".to_string();
    if dtype == safetensors::Dtype::F32 && cfg!(target_endian = "little") {
        let mut v = vec![0f32; bytes / 4];
        // SAFETY: the byte view covers `v` exactly (bytes is 4 per value: checked against the
        // shape by the caller), and any bits are a valid f32.
        let raw = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 4) };
        read_exact_at(f, path, raw, at).map_err(cut_short)?;
        return Tensor::from_vec(v, shape, device).map_err(|e| e.to_string());
    }
    let mut raw = vec![0u8; bytes];
    read_exact_at(f, path, &mut raw, at).map_err(cut_short)?;
    let view = safetensors::tensor::TensorView::new(dtype, shape, &raw).map_err(|e| e.to_string())?;
    candle_core::safetensors::Load::load(&view, device).map_err(|e| e.to_string())
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
