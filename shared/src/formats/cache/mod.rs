//! Activation caches: the handoff from `collect-acts` to every later stage.
//!
//! Layout of a cache folder (format `scae-acts`, version 1; see FORMATS.md):
//! - `manifest.json`: the model (id, hash, sizes), ctx_len, prepend_bos, dtype, data source,
//!   number of sequences, the shard list with each shard's clean CE.
//! - `shard-00000.safetensors`, ...: tensors named exactly like TransformerLens hooks
//!   (`blocks.0.hook_resid_pre`, `blocks.L.ln1.hook_scale`, ..., `blocks.L.attn.hook_pattern`)
//!   with a leading sequence axis, plus `tokens` (int64, `(n, ctx_len)`).
//!   `safetensors.torch.load_file` opens a shard as a dict that indexes like a TL cache.
//!
//! This file opens, checks and reads caches ([`Cache`], [`CacheReader`]); `manifest.rs` holds
//! the manifest's types and `collect.rs` writes a cache (the shard writer and [`collect()`], the
//! `collect-acts` runner).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::data::Batch;
use crate::error::{Error, IoContext, Result};
use crate::util::profile::Profile;
use read::{shard_header, Buffer};

mod collect;
mod manifest;
mod read;

pub use collect::{collect, CollectConfig, Collected, ShardWriter};
pub use manifest::{DataInfo, Manifest, ModelInfo, ShardInfo, StoreDType};

/// `format` field of a cache manifest.
pub const FORMAT: &str = "scae-acts";
/// Current cache layout version.
pub const VERSION: u32 = 1;
/// File name of the manifest inside a cache folder.
pub const MANIFEST: &str = "manifest.json";
/// Optional shard tensors: the stored clean and zero-ablation CEs ([`crate::data::CLEAN_CE`]).
pub use crate::data::{CLEAN_CE, ZERO_CE};

/// An opened cache folder.
#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Cache {
    /// The cache's identity: `blake3:<hex>` of its `manifest.json`, which names the model (by
    /// fingerprint), the data (by fingerprint), the sequencing and every shard's clean CE.
    pub fn id(&self) -> Result<String> {
        let path = self.dir.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Ok(format!("blake3:{}", blake3::hash(&bytes).to_hex()))
    }

    /// Open `dir` and check its manifest and that every shard file exists.
    pub fn open(dir: &Path) -> Result<Cache> {
        if !dir.is_dir() {
            let old = crate::util::io::sibling(dir, ".old");
            if old.is_dir() {
                return Err(Error::input(
                    dir,
                    format!(
                        "--acts: no such cache folder, but {} is there (left by an interrupted collect-acts \
                         --overwrite); hint: rename it back, or rerun collect-acts, which restores it first",
                        old.display()
                    ),
                ));
            }
            return Err(Error::input(dir, "--acts: no such cache folder; hint: make one with collect-acts"));
        }
        let manifest = Manifest::read(dir)?;
        for s in &manifest.shards {
            // shard files live in the cache folder itself
            let plain = matches!(
                Path::new(&s.file).components().collect::<Vec<_>>().as_slice(),
                [std::path::Component::Normal(_)]
            );
            if !plain {
                return Err(Error::input(
                    dir.join(MANIFEST),
                    format!("shard file `{}`: expected a file name inside the cache folder", s.file),
                ));
            }
            if !dir.join(&s.file).is_file() {
                return Err(Error::input(dir.join(MANIFEST), format!("lists shard {}, which is missing", s.file)));
            }
        }
        let m = &manifest;
        let held: usize = m.shards.iter().map(|s| s.n_seqs).sum();
        let sizes = [("ctx_len", m.ctx_len, 2), ("n_seqs", m.n_seqs, 1), ("model.n_layers", m.model.n_layers, 1)];
        let bad = |field: &str, what: String| Error::input(dir.join(MANIFEST), format!("field `{field}`: {what}"));
        for (field, v, min) in sizes {
            if v < min {
                return Err(bad(field, format!("expected at least {min}, found {v}")));
            }
        }
        if held != m.n_seqs {
            return Err(bad("n_seqs", format!("{} sequences, but its shards list {held}", m.n_seqs)));
        }
        let mi = &m.model;
        let arch = crate::model::Arch::from_hf_name(&mi.architecture).ok_or_else(|| {
            bad("model.architecture", format!("expected a supported architecture, found {:?}", mi.architecture))
        })?;
        if mi.parallel_attn_mlp && arch != crate::model::Arch::GptNeoX {
            return Err(bad("model.parallel_attn_mlp", format!("true, but {} blocks are sequential", mi.architecture)));
        }
        if mi.n_heads == 0 || mi.d_head * mi.n_heads != mi.d_model {
            return Err(bad(
                "model.d_head",
                format!("{} x {} heads is not d_model {}", mi.d_head, mi.n_heads, mi.d_model),
            ));
        }
        let cache = Cache { dir: dir.to_path_buf(), manifest };
        if let Some((name, _)) =
            cache.expected_tensors(1).into_iter().find(|(n, _)| n != "tokens" && !cache.manifest.hooks.contains(n))
        {
            return Err(bad("hooks", format!("lacks `{name}`, which every cache holds")));
        }
        for s in &cache.manifest.shards {
            cache.check_header(&cache.dir.join(&s.file), s.n_seqs)?;
        }
        Ok(cache)
    }

    /// Every tensor a pass reads, with its shape in a shard of `n` sequences.
    fn expected_tensors(&self, n: usize) -> Vec<(String, Vec<usize>)> {
        let m = &self.manifest;
        let (s, d, h) = (m.ctx_len, m.model.d_model, m.model.n_heads);
        let mut expected: Vec<(String, Vec<usize>)> =
            vec![("tokens".into(), vec![n, s]), ("blocks.0.hook_resid_pre".into(), vec![n, s, d])];
        for l in 0..m.model.n_layers {
            for (hook, shape) in [
                ("ln1.hook_scale", vec![n, s, 1]),
                ("ln2.hook_scale", vec![n, s, 1]),
                ("ln2.hook_normalized", vec![n, s, d]),
                ("attn.hook_pattern", vec![n, h, s, s]),
                ("hook_attn_out", vec![n, s, d]),
                ("hook_mlp_out", vec![n, s, d]),
            ] {
                expected.push((format!("blocks.{l}.{hook}"), shape));
            }
        }
        expected
    }

    /// Check a shard's header (names, dtypes, shapes; no tensor data is read) against the
    /// manifest, so a cache that disagrees with itself is refused when opened, not mid-run.
    fn check_header(&self, path: &Path, n: usize) -> Result<()> {
        let (_, header, _) = shard_header(path)?;
        let m = &self.manifest;
        let shard_format = format!("{FORMAT}-shard");
        let meta = |k: &str| header.get("__metadata__").and_then(|x| x.get(k)).and_then(|x| x.as_str());
        if let Some(f) = meta("format").filter(|f| *f != shard_format) {
            return Err(Error::input(path, format!("metadata `format`: expected {shard_format}, found {f}")));
        }
        if let Some(d) = meta("dtype").filter(|d| *d != m.dtype.name()) {
            return Err(Error::input(
                path,
                format!("metadata `dtype` {d} disagrees with the manifest's {}", m.dtype.name()),
            ));
        }
        // Tensors of layers past the manifest's: the manifest describes another model.
        if let Some(extra) = header.as_object().into_iter().flat_map(|o| o.keys()).find(|k| {
            k.strip_prefix("blocks.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| l >= m.model.n_layers)
        }) {
            return Err(Error::input(
                path,
                format!("holds tensor `{extra}`, past the manifest's {} layers", m.model.n_layers),
            ));
        }
        let stored = match m.dtype {
            StoreDType::F32 => "F32",
            StoreDType::Bf16 => "BF16",
            StoreDType::F16 => "F16",
        };
        for (name, shape) in self.expected_tensors(n) {
            let entry = header.get(&name).ok_or_else(|| {
                Error::input(path, format!("lacks tensor `{name}`; hint: rebuild the cache with collect-acts"))
            })?;
            let dtype = entry.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
            let found: Option<Vec<usize>> = entry
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
            if found.as_deref() != Some(shape.as_slice()) {
                return Err(Error::input(
                    path,
                    format!(
                        "tensor `{name}`: expected shape {shape:?} (manifest: {n} sequences, ctx {}, d_model {}, {} heads), found {}",
                        m.ctx_len,
                        m.model.d_model,
                        m.model.n_heads,
                        found.map(|f| format!("{f:?}")).unwrap_or_else(|| "none".into())
                    ),
                ));
            }
            let ok = if name == "tokens" {
                matches!(dtype, "I64" | "I32" | "U32" | "I16" | "U16" | "U8")
            } else {
                dtype == stored
            };
            if !ok {
                let want = if name == "tokens" {
                    "integer token ids".to_string()
                } else {
                    format!("{stored} (the manifest's dtype {})", m.dtype.name())
                };
                return Err(Error::input(path, format!("tensor `{name}`: expected {want}, found dtype {dtype}")));
            }
        }
        // The optional stored CEs (after the tensors every pass reads).
        for name in [CLEAN_CE, ZERO_CE] {
            let Some(entry) = header.get(name) else { continue };
            let dtype = entry.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
            let found: Option<Vec<usize>> = entry
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
            let want = [n, m.ctx_len.saturating_sub(1)];
            if dtype != "F32" || found.as_deref() != Some(&want[..]) {
                return Err(Error::input(
                    path,
                    format!(
                        "tensor `{name}`: expected F32 of shape {want:?}, found {dtype} of shape {}",
                        found.map_or_else(|| "none".to_string(), |f| format!("{f:?}"))
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Load the model the cache was made with (or `model_override`), checking its hash.
    pub fn load_model(&self, model_override: Option<&str>, device: &Device) -> Result<crate::model::Model> {
        let info = &self.manifest.model;
        let manifest = self.dir.join(MANIFEST);
        let spec = match (model_override, &info.path) {
            (Some(m), _) => m.to_string(),
            (None, Some(p)) if Path::new(p).is_dir() => p.clone(),
            (None, _) => info.id.clone(),
        };
        let dir = crate::model::hub::resolve_model(&spec)?;
        let model = crate::model::Model::load(&info.id, &dir, device)?;
        if !model.is(&info.hash) {
            return Err(Error::input(
                &manifest,
                format!(
                    "made with model {} ({}), but {} has hash {}; hint: pass --model with the cache's model",
                    info.id,
                    info.hash,
                    dir.display(),
                    model.hash
                ),
            ));
        }
        Ok(model)
    }

    /// Call `f` on consecutive batches of at most `batch_size` sequences, over the first
    /// `limit` sequences (all when `None`), loading one shard at a time. With `SCAE_PROFILE` set,
    /// each batch reports its reading and pass (`scae profile batch (ms): ...` on stderr).
    pub fn for_each_batch(
        &self,
        batch_size: usize,
        limit: Option<usize>,
        device: &Device,
        f: impl FnMut(Batch) -> Result<()>,
    ) -> Result<usize> {
        self.for_each_batch_of(batch_size, limit, device, |_| true, f)
    }

    /// [`for_each_batch`](Self::for_each_batch) over the batches whose index (0, 1, ... in
    /// cache order) `mine` picks: one rank's share of a sharded stage (batch i on rank i mod
    /// N). The batches are the same as one process's; a shard none of whose batches is picked
    /// is not read. Returns the sequences of all batches, picked or not.
    pub fn for_each_batch_of(
        &self,
        batch_size: usize,
        limit: Option<usize>,
        device: &Device,
        mine: impl Fn(usize) -> bool,
        mut f: impl FnMut(Batch) -> Result<()>,
    ) -> Result<usize> {
        let n_layers = self.manifest.model.n_layers;
        if let Some(l) = limit.filter(|&l| l > self.manifest.n_seqs) {
            crate::note!(
                "warning: --n-seqs {l}: the cache {} holds {} sequences; using those",
                self.dir.display(),
                self.manifest.n_seqs
            );
        }
        let limit = limit.unwrap_or(usize::MAX);
        let (mut done, mut index) = (0, 0);
        for (i, shard) in self.manifest.shards.iter().enumerate() {
            if done >= limit {
                break;
            }
            // This shard's batches: (start, length), in order.
            let mut batches = Vec::new();
            let mut start = 0;
            while start < shard.n_seqs && done < limit {
                let n = batch_size.min(shard.n_seqs - start).min(limit - done);
                batches.push((index, start, n));
                index += 1;
                start += n;
                done += n;
            }
            if !batches.iter().any(|&(bi, _, _)| mine(bi)) {
                continue;
            }
            // With SCAE_PROFILE, one line per batch (the shard's reading charged to its first).
            let mut prof = Profile::new();
            let map = self.load_shard(i, device)?;
            prof.mark("shard");
            for (_, start, n) in batches.into_iter().filter(|&(bi, _, _)| mine(bi)) {
                let batch = Batch::from_shard(&map, n_layers, start, n, device)?;
                prof.mark("batch");
                f(batch)?;
                prof.mark("pass");
                prof.report("batch");
                prof = Profile::new();
            }
        }
        Ok(done)
    }

    /// The sequence order of epoch `epoch`: cache order, or with `shuffle` each shard's
    /// sequences permuted by a generator seeded from (`seed`, `epoch`, shard), shards kept in
    /// order so that one shard is resident at a time.
    pub fn epoch_order(&self, epoch: u64, shuffle: bool, seed: u64) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.manifest.n_seqs);
        let mut start = 0;
        for (si, sh) in self.manifest.shards.iter().enumerate() {
            let mut idx: Vec<usize> = (start..start + sh.n_seqs).collect();
            if shuffle {
                let mut state = seed
                    ^ (epoch.wrapping_mul(0x9E3779B97F4A7C15))
                    ^ ((si as u64 + 1).wrapping_mul(0xD1B54A32D192ED03));
                for i in (1..idx.len()).rev() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    idx.swap(i, (state % (i as u64 + 1)) as usize);
                }
            }
            order.extend(idx);
            start += sh.n_seqs;
        }
        order
    }

    /// Load shard `i` as `name -> tensor` on `device` (floating tensors in f32): the tensors a
    /// pass reads and the stored CEs where present ([`Cache::load_seqs`] of every sequence).
    pub fn load_shard(&self, i: usize, device: &Device) -> Result<HashMap<String, Tensor>> {
        self.load_seqs(i, 0, self.manifest.shards[i].n_seqs, device)
    }

    /// Sequences `first..first + len` of shard `i`: every tensor a pass reads and the stored
    /// CEs where present, checked ([`Cache::check_shard`]), reading only their bytes (a few
    /// sequences of a 256 MB shard, as the why-it-fired pass and `attribute` read, cost what
    /// they hold).
    ///
    /// f32 tensors are read from the file straight into their buffers, several tensors at a
    /// time: read whole and then converted (candle's loader), a shard was copied twice and its
    /// pages faulted in twice, ~340 ms for 256 MB at TinyStories-33M shape on 2 threads.
    pub fn load_seqs(&self, i: usize, first: usize, len: usize, device: &Device) -> Result<HashMap<String, Tensor>> {
        use rayon::prelude::*;
        let path = self.dir.join(&self.manifest.shards[i].file);
        let unreadable = |what: String| Error::input(&path, format!("not a readable cache shard: {what}"));
        let (n, header, f) = shard_header(&path)?;
        let data_len = f.metadata().at(&path)?.len().saturating_sub(8 + n);
        // The tensors a pass reads, and the stored CEs where present (as load_shard keeps them).
        let shard_seqs = self.manifest.shards[i].n_seqs;
        let mut names: Vec<String> = self.expected_tensors(shard_seqs).into_iter().map(|(name, _)| name).collect();
        names.extend([CLEAN_CE, ZERO_CE].iter().filter(|c| header.get(**c).is_some()).map(|c| c.to_string()));
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            let entry = header.get(&name).ok_or_else(|| unreadable(format!("lacks tensor `{name}`")))?;
            let info: safetensors::tensor::TensorInfo =
                serde_json::from_value(entry.clone()).map_err(|e| unreadable(format!("tensor `{name}`: {e}")))?;
            let (start, end) = info.data_offsets;
            let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |a, &x| a.checked_mul(x));
            let bytes_len = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
            let rows = info.shape.first().copied().unwrap_or(0);
            if bytes_len != end.checked_sub(start) || end as u64 > data_len {
                return Err(unreadable(format!(
                    "tensor `{name}`: offsets {start}..{end} disagree with its shape or the file"
                )));
            }
            if rows == 0 || first.checked_add(len).is_none_or(|last| last > rows) {
                let shape = &info.shape;
                return Err(unreadable(format!(
                    "tensor `{name}`: no rows {first}..{} in shape {shape:?}",
                    first.saturating_add(len)
                )));
            }
            // Within the file: start + rows · row = end ≤ data_len.
            let row = (end - start) / rows;
            parts.push((name, info, 8 + n + (start + first * row) as u64, row * len));
        }
        // Buffers made here, filled several at a time (see read::Buffer::new).
        let mut bufs: Vec<Buffer> = parts.iter().map(|(_, info, _, bytes)| Buffer::new(info.dtype, *bytes)).collect();
        bufs.par_iter_mut()
            .zip(&parts)
            .map(|(b, (name, _, at, _))| {
                b.read(&f, &path, *at).map_err(|e| unreadable(format!("tensor `{name}`: {e}")))
            })
            .collect::<Result<()>>()?;
        let map = parts
            .into_iter()
            .zip(bufs)
            .map(|((name, info, _, _), b)| {
                let mut shape = info.shape.clone();
                shape[0] = len;
                let t = b
                    .into_tensor(info.dtype, shape, device)
                    .map_err(|e| unreadable(format!("tensor `{name}`: {e}")))?;
                let t = if t.dtype().is_float() { t.to_dtype(DType::F32)? } else { t };
                Ok((name, t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        self.check_shard(&path, len, &map)?;
        Ok(map)
    }

    /// Check that a shard holds every tensor a pass reads, with the manifest's shapes, token
    /// ids inside the vocabulary and finite activations (and finite stored CEs, when present).
    fn check_shard(&self, path: &Path, n: usize, map: &HashMap<String, Tensor>) -> Result<()> {
        let m = &self.manifest;
        for name in [CLEAN_CE, ZERO_CE] {
            if let Some(t) = map.get(name) {
                if t.dims() != [n, m.ctx_len.saturating_sub(1)] || !crate::util::all_finite(t)? {
                    return Err(Error::input(
                        path,
                        format!("tensor `{name}`: expected finite values of shape [{n}, {}]", m.ctx_len - 1),
                    ));
                }
            }
        }
        // Names and dtypes were checked from the header when the cache was opened; the shapes
        // again here, as the engine indexes by them (the file may have changed since).
        for (name, shape) in &self.expected_tensors(n) {
            let t = map.get(name).ok_or_else(|| {
                Error::input(path, format!("lacks tensor `{name}`; hint: rebuild the cache with collect-acts"))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::input(
                    path,
                    format!(
                        "tensor `{name}`: expected shape {shape:?} (manifest: {n} sequences), found {:?}",
                        t.dims()
                    ),
                ));
            }
            if name == "tokens" {
                let ids = t.to_dtype(DType::I64)?.flatten_all()?;
                let (min, max) = (ids.min(0)?.to_scalar::<i64>()?, ids.max(0)?.to_scalar::<i64>()?);
                if min < 0 || max >= m.model.d_vocab as i64 {
                    return Err(Error::input(
                        path,
                        format!("tensor `tokens`: expected ids in 0..{}, found {min}..={max}", m.model.d_vocab),
                    ));
                }
            } else {
                if !crate::util::all_finite(t)? {
                    return Err(Error::input(
                        path,
                        format!("tensor `{name}`: expected finite values, found NaN or infinite ones"),
                    ));
                }
                // A LayerNorm scale is a standard deviation (plus eps): the pass divides by it.
                if name.ends_with("hook_scale") {
                    let min = t.flatten_all()?.min(0)?.to_scalar::<f32>()?;
                    if min <= 0.0 {
                        return Err(Error::input(
                            path,
                            format!("tensor `{name}`: expected LayerNorm scales > 0, found {min}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Random access to cached sequences, keeping the last shard loaded.
pub struct CacheReader<'a> {
    cache: &'a Cache,
    device: Device,
    starts: Vec<usize>,
    loaded: Option<(usize, HashMap<String, Tensor>)>,
    /// Read each batch's sequences alone ([`Cache::load_seqs`]) instead of whole shards.
    by_sequence: bool,
}

impl<'a> CacheReader<'a> {
    /// A reader of `cache` producing tensors on `device`.
    pub fn new(cache: &'a Cache, device: &Device) -> CacheReader<'a> {
        let mut starts = Vec::new();
        let mut s = 0;
        for sh in &cache.manifest.shards {
            starts.push(s);
            s += sh.n_seqs;
        }
        CacheReader { cache, device: device.clone(), starts, loaded: None, by_sequence: false }
    }

    /// A reader that reads only the sequences asked for (a few scattered sequences: the same
    /// batches, less reading), not whole shards.
    pub fn by_sequence(cache: &'a Cache, device: &Device) -> CacheReader<'a> {
        CacheReader { by_sequence: true, ..CacheReader::new(cache, device) }
    }

    /// The batch made of sequences `seqs` (global indices), in that order.
    pub fn batch(&mut self, seqs: &[usize]) -> Result<Batch> {
        let n_layers = self.cache.manifest.model.n_layers;
        let mut parts = Vec::new();
        let mut i = 0;
        while i < seqs.len() {
            let shard = self.starts.partition_point(|&s| s <= seqs[i]) - 1;
            let local = seqs[i] - self.starts[shard];
            // extend a run of consecutive sequences in the same shard
            let mut len = 1;
            let shard_len = self.cache.manifest.shards[shard].n_seqs;
            while i + len < seqs.len() && seqs[i + len] == seqs[i] + len && local + len < shard_len {
                len += 1;
            }
            if self.by_sequence {
                let map = self.cache.load_seqs(shard, local, len, &self.device)?;
                parts.push(Batch::from_shard(&map, n_layers, 0, len, &self.device)?);
                i += len;
                continue;
            }
            if self.loaded.as_ref().map(|(s, _)| *s) != Some(shard) {
                self.loaded = None;
                self.loaded = Some((shard, self.cache.load_shard(shard, &self.device)?));
            }
            let map = &self.loaded.as_ref().expect("loaded").1;
            parts.push(Batch::from_shard(map, n_layers, local, len, &self.device)?);
            i += len;
        }
        Batch::concat(&parts)
    }
}
