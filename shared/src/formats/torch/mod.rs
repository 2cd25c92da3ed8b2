//! PyTorch's own files, read without Python and without running anything: `torch.save`'s zip
//! format (`checkpoint.pt`, `connections.pt`), its legacy format (as the storages inside a
//! pickled CUDA tensor, `torch.storage._load_from_bytes`), and plain `pickle.dump` files
//! holding tensors (`top_connections_{C}.pkl`). Written back in the zip format that
//! `torch.load` reads (FORMATS.md, "The reference's files").
//!
//! Tensors are kept as references into their storage until asked for ([`TorchFile::tensor`]),
//! so that a checkpoint that also carries a whole language model (`model.*`) is not read in full.

pub mod pickle;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pickle::{Hooks, Storage, Value};

use crate::error::{Error, Result};

/// Element types of torch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// The storage class name (`torch.FloatStorage` -> `FloatStorage`) of each type.
    const CLASSES: [(&'static str, Dtype); 10] = [
        ("DoubleStorage", Dtype::F64),
        ("FloatStorage", Dtype::F32),
        ("HalfStorage", Dtype::F16),
        ("BFloat16Storage", Dtype::BF16),
        ("LongStorage", Dtype::I64),
        ("IntStorage", Dtype::I32),
        ("ShortStorage", Dtype::I16),
        ("CharStorage", Dtype::I8),
        ("ByteStorage", Dtype::U8),
        ("BoolStorage", Dtype::Bool),
    ];

    fn from_class(name: &str) -> Option<Dtype> {
        Self::CLASSES.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
    }

    pub fn class(self) -> &'static str {
        Self::CLASSES.iter().find(|(_, d)| *d == self).map(|(n, _)| *n).expect("every dtype has a class")
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

/// Where a storage's bytes are.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// Entry `<root>/data/<key>` of the zip file.
    Zip(String),
    /// Already in memory (a legacy blob inside a pickle).
    Bytes(Arc<Storage>),
}

/// A tensor as pickled: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
    offset: usize,
    /// Elements in the storage (from its reference).
    storage_len: usize,
    source: Source,
}

/// A tensor's contiguous little-endian values.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Dense {
    /// The values as i64 (integer tensors only).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let b = &self.bytes;
        Some(match self.dtype {
            Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect(),
            Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4")) as i64).collect(),
            Dtype::I16 => b.chunks_exact(2).map(|c| i16::from_le_bytes(c.try_into().expect("2")) as i64).collect(),
            Dtype::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
            Dtype::U8 => b.iter().map(|&x| x as i64).collect(),
            _ => return None,
        })
    }
}

/// An opened torch/pickle file: the decoded object and access to its storages.
pub struct TorchFile {
    pub path: PathBuf,
    pub root: Value,
    zip: Option<(zip::ZipArchive<File>, String)>,
}

/// Zip files start with a local file header.
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// The legacy format's first pickle: protocol 2, LONG1 of 10 bytes (0x1950a86a20f9469cfc6c), STOP.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

/// The globals torch's files use: containers, tensor rebuilding and storage classes.
fn allowed(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_parameter"),
        "torch.storage" => name == "_load_from_bytes",
        "torch" => Dtype::from_class(name).is_some(),
        _ => false,
    }
}

fn int(v: &Value, what: &str) -> std::result::Result<usize, String> {
    v.as_int()
        .and_then(|i| usize::try_from(i).ok())
        .ok_or_else(|| format!("{what}: expected a count, found {}", v.kind()))
}

fn ints(v: &Value, what: &str) -> std::result::Result<Vec<usize>, String> {
    v.as_seq()
        .ok_or_else(|| format!("{what}: expected a tuple, found {}", v.kind()))?
        .iter()
        .map(|x| int(x, what))
        .collect()
}

/// A storage reference `('storage', <class>, key, location, numel[, view])`: its dtype, key
/// and length. The location (`cpu`, `cuda:0`, ...) does not matter: the bytes are the same.
fn storage_ref(pid: &Value) -> std::result::Result<(Dtype, String, usize), String> {
    let items = pid.as_seq().ok_or_else(|| format!("persistent id: expected a tuple, found {}", pid.kind()))?;
    match items {
        [Value::Str(tag), Value::Global(m, cls), Value::Str(key), Value::Str(_), n, ..]
            if tag == "storage" && m == "torch" =>
        {
            let dtype = Dtype::from_class(cls).ok_or_else(|| format!("storage class torch.{cls} is not supported"))?;
            Ok((dtype, key.clone(), int(n, "storage size")?))
        }
        _ => Err("persistent id: expected ('storage', torch.<Type>Storage, key, location, size)".into()),
    }
}

/// A storage placeholder before its bytes are located: dtype, source, elements.
#[derive(Debug, Clone)]
struct StorageRef {
    dtype: Dtype,
    source: Source,
    len: usize,
}

struct TorchHooks<'a> {
    /// Storage keys to in-memory bytes (legacy format); `None` while only scanning.
    legacy: Option<&'a BTreeMap<String, Arc<Storage>>>,
    /// The zip format: storages are zip entries.
    zip: bool,
    refs: Vec<StorageRef>,
    /// Every storage referenced, as (key, dtype), in order.
    seen: Vec<(String, Dtype)>,
    /// Reading a legacy blob: its storages hold no further blobs.
    in_legacy: bool,
}

impl TorchHooks<'_> {
    fn new(legacy: Option<&BTreeMap<String, Arc<Storage>>>, zip: bool) -> TorchHooks<'_> {
        TorchHooks { legacy, zip, refs: vec![], seen: vec![], in_legacy: false }
    }

    fn storage_value(&mut self, r: StorageRef) -> Value {
        self.refs.push(r);
        Value::Int(self.refs.len() as i64 - 1)
    }
}

/// A tensor view must lie inside its storage and hold no more elements than it (no stride-0
/// broadcasts: torch writes none into these files).
fn check_view(t: &TorchTensor) -> std::result::Result<(), String> {
    let bad = || {
        format!(
            "tensor {:?} (offset {}, strides {:?}) does not fit its storage of {} elements",
            t.shape, t.offset, t.stride, t.storage_len
        )
    };
    if t.shape.len() != t.stride.len() {
        return Err(format!("tensor of {} dims with {} strides", t.shape.len(), t.stride.len()));
    }
    let n = t.shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).ok_or_else(bad)?;
    if n == 0 {
        return Ok(());
    }
    if n > t.storage_len {
        return Err(bad());
    }
    let mut last = t.offset;
    for (&s, &st) in t.shape.iter().zip(&t.stride) {
        last = (s - 1).checked_mul(st).and_then(|x| last.checked_add(x)).ok_or_else(bad)?;
    }
    if last >= t.storage_len {
        return Err(bad());
    }
    Ok(())
}

impl Hooks for TorchHooks<'_> {
    fn allowed(&self, module: &str, name: &str) -> bool {
        allowed(module, name)
    }

    fn persistent_load(&mut self, pid: Value) -> std::result::Result<Value, String> {
        let (dtype, key, len) = storage_ref(&pid)?;
        self.seen.push((key.clone(), dtype));
        let source = if self.zip {
            Source::Zip(key)
        } else if let Some(map) = self.legacy {
            let s = map.get(&key).ok_or_else(|| format!("storage {key} is referenced but not stored"))?;
            Source::Bytes(s.clone())
        } else {
            // Scanning a legacy pickle before its storages are read.
            Source::Bytes(Arc::new(Storage { dtype, bytes: vec![] }))
        };
        // Storages are marked by their index in `refs`, wrapped so they cannot pass for data.
        Ok(Value::PersId(Box::new(self.storage_value(StorageRef { dtype, source, len }))))
    }

    fn reduce(&mut self, module: &str, name: &str, args: &[Value]) -> std::result::Result<Value, String> {
        match (module, name) {
            ("collections", "OrderedDict") => match args {
                [] => Ok(Value::Dict(vec![])),
                _ => Err("OrderedDict with arguments is not supported".into()),
            },
            ("torch._utils", "_rebuild_tensor_v2") => {
                let [storage, offset, size, stride, ..] = args else {
                    return Err("_rebuild_tensor_v2: expected (storage, offset, size, stride, ...)".into());
                };
                let Value::PersId(idx) = storage else {
                    return Err(format!("_rebuild_tensor_v2: expected a storage, found {}", storage.kind()));
                };
                let r = self.refs.get(int(idx, "storage")?).cloned().ok_or("_rebuild_tensor_v2: unknown storage")?;
                let t = TorchTensor {
                    dtype: r.dtype,
                    shape: ints(size, "tensor size")?,
                    stride: ints(stride, "tensor stride")?,
                    offset: int(offset, "storage offset")?,
                    storage_len: r.len,
                    source: r.source,
                };
                check_view(&t)?;
                Ok(Value::Tensor(Arc::new(t)))
            }
            ("torch._utils", "_rebuild_parameter") => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err("_rebuild_parameter: expected a tensor".into()),
            },
            ("torch.storage", "_load_from_bytes") if self.in_legacy => {
                Err("a legacy storage blob inside another: not what torch writes".into())
            }
            ("torch.storage", "_load_from_bytes") => match args {
                [Value::Bytes(b)] => {
                    let r = legacy_storage(b)?;
                    Ok(Value::PersId(Box::new(self.storage_value(r))))
                }
                _ => Err("_load_from_bytes: expected one bytes argument".into()),
            },
            // Storage classes are only named, never called.
            _ => Err(format!("calling `{module}.{name}` is not supported")),
        }
    }
}

/// The single storage saved by a legacy-format `torch.save(storage)` (what a pickled tensor's
/// storage reduces to).
fn legacy_storage(blob: &[u8]) -> std::result::Result<StorageRef, String> {
    let (value, storages) = read_legacy(blob)?;
    let Value::PersId(idx) = value else {
        return Err(format!("legacy storage blob: expected a storage, found {}", value.kind()));
    };
    let i = int(&idx, "storage")?;
    storages.into_iter().nth(i).ok_or_else(|| "legacy storage blob: storage missing".to_string())
}

/// Decode a legacy-format `torch.save` blob: its object and the storages it references.
fn read_legacy(blob: &[u8]) -> std::result::Result<(Value, Vec<StorageRef>), String> {
    let rest = blob.strip_prefix(LEGACY_MAGIC).ok_or("not a torch legacy-format blob (bad magic number)")?;
    let mut scan = TorchHooks::new(None, false);
    scan.in_legacy = true;
    // Protocol version, system info, the object (scanned once for its storages and its end),
    // the storage keys, then each storage: its element count (int64) and its bytes.
    let (proto, mut at) = pickle::load(rest, &mut scan)?;
    if proto != Value::Int(1001) {
        return Err(format!("legacy format protocol {proto:?}, expected 1001"));
    }
    at += pickle::load(&rest[at..], &mut scan)?.1;
    let obj_at = at;
    scan.seen.clear();
    at += pickle::load(&rest[at..], &mut scan)?.1;
    let dtypes: BTreeMap<String, Dtype> = scan.seen.iter().cloned().collect();
    let (keys, n) = pickle::load(&rest[at..], &mut scan)?;
    at += n;
    let keys = keys.as_seq().ok_or("legacy format: expected a list of storage keys")?.to_vec();
    let mut map = BTreeMap::new();
    for k in keys {
        let k = k.as_str().ok_or("legacy format: storage key is not a string")?.to_string();
        let dtype = *dtypes.get(&k).ok_or_else(|| format!("legacy format: storage {k} is not referenced"))?;
        let head = rest.get(at..at.saturating_add(8)).ok_or("legacy format: truncated storage header")?;
        let numel = u64::from_le_bytes(head.try_into().expect("8")) as usize;
        at += 8;
        let len = numel.checked_mul(dtype.size()).ok_or("legacy format: storage size overflows")?;
        let bytes =
            rest.get(at..at.saturating_add(len)).ok_or_else(|| format!("legacy format: storage {k} truncated"))?;
        at += len;
        map.insert(k, Arc::new(Storage { dtype, bytes: bytes.to_vec() }));
    }
    let mut hooks = TorchHooks::new(Some(&map), false);
    hooks.in_legacy = true;
    let (obj, _) = pickle::load(&rest[obj_at..], &mut hooks)?;
    Ok((obj, hooks.refs))
}

impl TorchFile {
    /// Open a `torch.save` file (zip or legacy) or a plain pickle.
    pub fn open(path: &Path) -> Result<TorchFile> {
        let bad = |why: String| Error::input(path, why);
        let mut f = File::open(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let mut head = [0u8; 4];
        let got = f.read(&mut head).map_err(|e| bad(format!("cannot read: {e}")))?;
        if got == 4 && head == ZIP_MAGIC {
            f.rewind().map_err(|e| bad(format!("cannot read: {e}")))?;
            let mut z = zip::ZipArchive::new(f)
                .map_err(|e| bad(format!("not a readable torch.save zip file: {e}; hint: is it truncated?")))?;
            let pkl = z
                .file_names()
                .filter_map(|n| n.ok().map(|n| n.to_string()))
                .find(|n| n == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1))
                .ok_or_else(|| bad("a zip file without data.pkl: not written by torch.save".into()))?;
            let prefix = pkl.strip_suffix("data.pkl").expect("suffix").to_string();
            let mut bytes = Vec::new();
            z.by_name(&pkl)
                .and_then(|mut e| e.read_to_end(&mut bytes).map_err(Into::into))
                .map_err(|e| bad(format!("{pkl}: cannot read: {e}")))?;
            let mut hooks = TorchHooks::new(None, true);
            let (root, _) = pickle::load(&bytes, &mut hooks).map_err(|e| bad(format!("{pkl}: {e}")))?;
            return Ok(TorchFile { path: path.to_path_buf(), root, zip: Some((z, prefix)) });
        }
        let mut bytes = Vec::new();
        f.rewind().and_then(|_| f.read_to_end(&mut bytes)).map_err(|e| bad(format!("cannot read: {e}")))?;
        let root = if bytes.starts_with(LEGACY_MAGIC) {
            read_legacy(&bytes).map_err(bad)?.0
        } else if bytes.first() == Some(&0x80) {
            let mut hooks = TorchHooks::new(None, false);
            pickle::load(&bytes, &mut hooks).map_err(bad)?.0
        } else {
            return Err(bad("not a pickle or torch.save file (it starts with neither PK nor a pickle header)".into()));
        };
        Ok(TorchFile { path: path.to_path_buf(), root, zip: None })
    }

    /// The contiguous values of `t`.
    pub fn tensor(&mut self, t: &TorchTensor) -> Result<Dense> {
        let es = t.dtype.size();
        let want = t.storage_len.checked_mul(es).ok_or_else(|| Error::input(&self.path, "a storage size overflows"))?;
        let zip_bytes;
        let storage: &[u8] = match &t.source {
            Source::Bytes(s) => &s.bytes,
            Source::Zip(key) => {
                let Some((z, prefix)) = self.zip.as_mut() else {
                    return Err(Error::input(&self.path, "a zip storage outside a zip file"));
                };
                let name = format!("{prefix}data/{key}");
                let mut buf = Vec::new();
                // No more than the reference says the storage holds.
                z.by_name(&name)
                    .and_then(|e| e.take(want as u64).read_to_end(&mut buf).map_err(Into::into))
                    .map_err(|e| Error::input(&self.path, format!("storage {name}: cannot read: {e}")))?;
                zip_bytes = buf;
                &zip_bytes
            }
        };
        if storage.len() < want {
            return Err(Error::input(
                &self.path,
                format!(
                    "a storage holds {} bytes, its reference says {} elements of {es}",
                    storage.len(),
                    t.storage_len
                ),
            ));
        }
        let n: usize = t.shape.iter().product();
        let mut out = Vec::with_capacity(n * es);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..n {
            let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&storage[at * es..(at + 1) * es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(Dense { dtype: t.dtype, shape: t.shape.clone(), bytes: out })
    }
}

/// What [`save`] writes: nested string-keyed dicts of tensors and None.
pub enum Item {
    None,
    Tensor(Dense),
    /// An `OrderedDict` (true) or a plain dict (false).
    Dict(Vec<(String, Item)>, bool),
}

/// Write `root` as `torch.save` does (zip format, uncompressed entries aligned to 64 bytes,
/// protocol-2 pickle), to `path` via `<path>.tmp`.
pub fn save(path: &Path, root: &Item) -> Result<()> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("archive").to_string();
    let mut storages: Vec<&Dense> = Vec::new();
    let mut w = pickle::Writer::new();
    fn emit<'a>(w: &mut pickle::Writer, item: &'a Item, storages: &mut Vec<&'a Dense>) {
        match item {
            Item::None => {
                w.none();
            }
            Item::Dict(kv, ordered) => {
                if *ordered {
                    w.global("collections", "OrderedDict").op(b')').op(b'R');
                } else {
                    w.op(b'}');
                }
                if !kv.is_empty() {
                    w.mark();
                    for (k, v) in kv {
                        w.str(k);
                        emit(w, v, storages);
                    }
                    w.op(b'u');
                }
            }
            Item::Tensor(t) => {
                let key = storages.len().to_string();
                storages.push(t);
                let numel: usize = t.shape.iter().product();
                let mut stride = vec![1usize; t.shape.len()];
                for d in (0..t.shape.len().saturating_sub(1)).rev() {
                    stride[d] = stride[d + 1] * t.shape[d + 1];
                }
                w.global("torch._utils", "_rebuild_tensor_v2").mark();
                w.mark()
                    .str("storage")
                    .global("torch", t.dtype.class())
                    .str(&key)
                    .str("cpu")
                    .int(numel as i64)
                    .op(b't');
                w.op(b'Q').int(0).int_tuple(&t.shape).int_tuple(&stride).bool(false);
                w.global("collections", "OrderedDict").op(b')').op(b'R');
                w.op(b't').op(b'R');
            }
        }
    }
    emit(&mut w, root, &mut storages);
    let pkl = w.finish();
    crate::util::io::write_via_tmp(path, |tmp| {
        let file = File::create(tmp).map_err(|e| Error::input(tmp, format!("cannot write: {e}")))?;
        let write = || -> std::result::Result<(), zip::result::ZipError> {
            let mut z = zip::ZipWriter::new(std::io::BufWriter::new(file));
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .with_alignment(64);
            let mut entry = |name: String, bytes: &[u8]| -> std::result::Result<(), zip::result::ZipError> {
                z.start_file(name, opts)?;
                Ok(z.write_all(bytes)?)
            };
            entry(format!("{stem}/data.pkl"), &pkl)?;
            entry(format!("{stem}/.format_version"), b"1")?;
            entry(format!("{stem}/.storage_alignment"), b"64")?;
            entry(format!("{stem}/byteorder"), b"little")?;
            for (i, t) in storages.iter().enumerate() {
                entry(format!("{stem}/data/{i}"), &t.bytes)?;
            }
            entry(format!("{stem}/version"), b"3\n")?;
            z.finish()?.flush()?;
            Ok(())
        };
        write().map_err(|e| Error::input(tmp, format!("cannot write: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(shape: Vec<usize>, stride: Vec<usize>, offset: usize, storage_len: usize) -> TorchTensor {
        let source = Source::Bytes(Arc::new(Storage { dtype: Dtype::F32, bytes: vec![0; 4 * storage_len] }));
        TorchTensor { dtype: Dtype::F32, shape, stride, offset, storage_len, source }
    }

    #[test]
    fn views_must_fit_their_storage() {
        assert!(check_view(&view(vec![2, 3], vec![3, 1], 0, 6)).is_ok());
        assert!(check_view(&view(vec![3, 2], vec![1, 3], 0, 6)).is_ok(), "a transposed view");
        assert!(check_view(&view(vec![0, 5], vec![5, 1], 0, 0)).is_ok(), "empty");
        assert!(check_view(&view(vec![2, 3], vec![3, 1], 1, 6)).is_err(), "one past the end");
        // A stride-0 view asking for 2^40 elements of a 1-element storage, and overflowing strides.
        assert!(check_view(&view(vec![1 << 40], vec![0], 0, 1)).is_err());
        assert!(check_view(&view(vec![2, 2], vec![usize::MAX / 2, 1], 0, 8)).is_err());
        assert!(check_view(&view(vec![usize::MAX, 3], vec![1, 1], 0, 8)).is_err());
    }

    #[test]
    fn dense_values_follow_strides() {
        let bytes: Vec<u8> = (0..6i64).flat_map(|v| v.to_le_bytes()).collect();
        let source = Source::Bytes(Arc::new(Storage { dtype: Dtype::I64, bytes }));
        let t =
            TorchTensor { dtype: Dtype::I64, shape: vec![3, 2], stride: vec![1, 3], offset: 0, storage_len: 6, source };
        let mut f = TorchFile { path: PathBuf::from("x"), root: Value::None, zip: None };
        assert_eq!(f.tensor(&t).unwrap().to_i64().unwrap(), vec![0, 3, 1, 4, 2, 5]);
    }
}
