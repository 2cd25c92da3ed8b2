//! Activation caches: the handoff from `collect-acts` to every later stage.
//!
//! Layout of a cache folder (format `scae-acts`, version 1; see FORMATS.md):
//! - `manifest.json`: the model (id, hash, sizes), ctx_len, prepend_bos, dtype, data source,
//!   number of sequences, the shard list with each shard's clean CE.
//! - `shard-00000.safetensors`, ...: tensors named exactly like TransformerLens hooks
//!   (`blocks.0.hook_resid_pre`, `blocks.L.ln1.hook_scale`, ..., `blocks.L.attn.hook_pattern`)
//!   with a leading sequence axis, plus `tokens` (int64, `(n, ctx_len)`).
//!   `safetensors.torch.load_file` opens a shard as a dict that indexes like a TL cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::Batch;
use crate::error::{Error, IoContext, Result};
use crate::model::{ForwardOutput, ModelConfig};

/// `format` field of a cache manifest.
pub const FORMAT: &str = "scae-acts";
/// Current cache layout version.
pub const VERSION: u32 = 1;
/// File name of the manifest inside a cache folder.
pub const MANIFEST: &str = "manifest.json";

/// Floating-point storage types of cached tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDType {
    F32,
    Bf16,
    F16,
}

impl StoreDType {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            StoreDType::F32 => DType::F32,
            StoreDType::Bf16 => DType::BF16,
            StoreDType::F16 => DType::F16,
        }
    }

    /// The name used in flags and manifests.
    pub fn name(self) -> &'static str {
        match self {
            StoreDType::F32 => "f32",
            StoreDType::Bf16 => "bf16",
            StoreDType::F16 => "f16",
        }
    }
}

/// The model a cache was computed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    /// The folder the model was read from (absolute), so later stages can reload it.
    #[serde(default)]
    pub path: Option<String>,
    pub hash: String,
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    pub d_vocab: usize,
    pub n_ctx: usize,
    pub parallel_attn_mlp: bool,
}

impl ModelInfo {
    /// Describe `cfg` loaded from `id` with weights hash `hash`.
    pub fn new(id: &str, dir: &Path, hash: &str, cfg: &ModelConfig) -> ModelInfo {
        ModelInfo {
            id: id.to_string(),
            path: std::fs::canonicalize(dir).ok().map(|p| p.display().to_string()),
            hash: hash.to_string(),
            architecture: cfg.arch.hf_name().to_string(),
            n_layers: cfg.n_layers,
            d_model: cfg.d_model,
            n_heads: cfg.n_heads,
            d_head: cfg.d_head,
            d_mlp: cfg.d_mlp,
            d_vocab: cfg.d_vocab,
            n_ctx: cfg.n_ctx,
            parallel_attn_mlp: cfg.parallel_attn_mlp,
        }
    }
}

/// Where the tokens came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// The `--data` or `--tokens` path as given.
    pub source: String,
    /// `text` or `tokens`.
    pub kind: String,
    /// Column read from parquet/jsonl, if any.
    pub column: Option<String>,
    pub pack: bool,
    pub docs_read: u64,
    pub docs_skipped_short: u64,
    /// A fingerprint of the data file's contents (`util::fingerprint::file_fingerprint`), so
    /// that later stages can tell whether two caches read the same text (absent in caches
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Sequences the data gave that were skipped before the cache's first (`--skip-seqs`: a
    /// held-out cache from the text after a training cache's).
    #[serde(default)]
    pub skip_seqs: u64,
}

impl DataInfo {
    /// Whether a cache of `n` sequences with these data settings and `other`'s `m` sequences
    /// may share tokens: the same text (by fingerprint), and either other sequencing settings
    /// or overlapping ranges of sequences. `None` when a fingerprint is missing.
    pub fn overlaps(&self, n: u64, other: &DataInfo, m: u64, same_layout: bool) -> Option<bool> {
        let (a, b) = (self.fingerprint.as_ref()?, other.fingerprint.as_ref()?);
        // A column left unrecorded on one side (the default one) could be the other's.
        let columns_differ = matches!((&self.column, &other.column), (Some(x), Some(y)) if x != y);
        if a != b || self.kind != other.kind || columns_differ {
            return Some(false);
        }
        if !same_layout || self.pack != other.pack {
            return Some(true);
        }
        Some(self.skip_seqs < other.skip_seqs + m && other.skip_seqs < self.skip_seqs + n)
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub n_seqs: usize,
    /// Mean next-token CE of the clean model over the shard's `n_seqs·(ctx_len-1)` predictions.
    pub clean_ce: f64,
}

/// `manifest.json` of a cache folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model: ModelInfo,
    pub ctx_len: usize,
    pub prepend_bos: bool,
    pub dtype: StoreDType,
    pub data: DataInfo,
    pub n_seqs: usize,
    pub hooks: Vec<String>,
    pub shards: Vec<ShardInfo>,
    /// Mean clean CE over all shards (weighted by sequences).
    pub clean_ce: f64,
    /// Tool and version that wrote the cache.
    pub created_by: String,
}

impl Manifest {
    /// Read and check `dir/manifest.json` (format and version).
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::input(&path, format!("cannot read cache manifest: {e}; hint: make one with collect-acts"))
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::input(&path, format!("not valid JSON: {e}")))?;
        let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
        if format != FORMAT || version != VERSION as u64 {
            return Err(Error::input(
                &path,
                format!(
                    "format {format} v{version}, expected {FORMAT} v{VERSION}; hint: rebuild the cache with collect-acts"
                ),
            ));
        }
        serde_json::from_value(v).map_err(|e| Error::input(&path, format!("malformed manifest: {e}")))
    }
}

/// Accumulates forward outputs and writes them as shards of about `shard_seqs` sequences.
pub struct ShardWriter {
    dir: PathBuf,
    hooks: Vec<String>,
    dtype: StoreDType,
    shard_seqs: usize,
    pending: Vec<HashMap<String, Tensor>>,
    pending_seqs: usize,
    pending_ce: Vec<Tensor>,
    /// The shard being written in the background, so disk I/O overlaps the next batches.
    writing: Option<std::thread::JoinHandle<Result<()>>>,
    pub shards: Vec<ShardInfo>,
}

impl ShardWriter {
    /// Write into `dir` (a staging folder) the hooks of `cfg`, cast to `dtype`.
    pub fn new(dir: &Path, cfg: &ModelConfig, dtype: StoreDType, shard_seqs: usize) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            hooks: cfg.hook_names(),
            dtype,
            shard_seqs: shard_seqs.max(1),
            pending: Vec::new(),
            pending_seqs: 0,
            pending_ce: Vec::new(),
            writing: None,
            shards: Vec::new(),
        }
    }

    /// The hook names written, in order.
    pub fn hooks(&self) -> &[String] {
        &self.hooks
    }

    /// Add one batch: its tokens `(batch, ctx)` and the forward pass (run with hooks).
    pub fn push(&mut self, tokens: &Tensor, out: &ForwardOutput) -> Result<()> {
        let dtype = self.dtype.dtype();
        let mut map = HashMap::new();
        map.insert("blocks.0.hook_resid_pre".to_string(), out.resid_pre0.to_dtype(dtype)?);
        for (l, layer) in out.layers.iter().enumerate() {
            for (suffix, t) in layer.named() {
                map.insert(format!("blocks.{l}.{suffix}"), t.to_dtype(dtype)?);
            }
        }
        let first = self.shards.iter().map(|s| s.n_seqs).sum::<usize>() + self.pending_seqs;
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        for name in names {
            let t = &map[name];
            // Checked as stored (f16 overflows at 65,504).
            if !crate::util::all_finite(t)? {
                return Err(Error::Usage(format!(
                    "hook `{name}` has NaN or infinite values ({} storage) in sequences {first}..{}; \
                     the model's activations overflow{}",
                    self.dtype.name(),
                    first + tokens.dim(0)?,
                    if self.dtype == StoreDType::F32 { "" } else { "; hint: --dtype f32" }
                )));
            }
        }
        map.insert("tokens".to_string(), tokens.to_dtype(DType::I64)?);
        self.pending_seqs += tokens.dim(0)?;
        self.pending.push(map);
        self.pending_ce.push(out.ce.clone());
        if self.pending_seqs >= self.shard_seqs {
            self.flush()?;
        }
        Ok(())
    }

    /// Wait for the shard being written, if any.
    fn join_writer(&mut self) -> Result<()> {
        match self.writing.take() {
            Some(h) => h.join().map_err(|_| Error::Usage("the shard writer thread panicked".into()))?,
            None => Ok(()),
        }
    }

    /// Write whatever is pending as a shard and wait until every shard is on disk.
    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        self.join_writer()
    }

    /// Start writing whatever is pending as a shard (in the background).
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut names = self.hooks.clone();
        names.push("tokens".into());
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(names.len());
        for name in names {
            let parts: Vec<&Tensor> = self.pending.iter().map(|m| &m[&name]).collect();
            let t = Tensor::cat(&parts, 0)?.to_device(&Device::Cpu)?;
            tensors.push((name, t));
        }
        let ce = Tensor::cat(&self.pending_ce, 0)?.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
        let file = format!("shard-{:05}.safetensors", self.shards.len());
        let path = self.dir.join(&file);
        let meta: std::collections::BTreeMap<String, String> = [
            ("format".to_string(), format!("{FORMAT}-shard")),
            ("version".to_string(), VERSION.to_string()),
            ("dtype".to_string(), self.dtype.name().to_string()),
        ]
        .into();
        self.join_writer()?;
        self.writing = Some(std::thread::spawn(move || crate::util::io::write_safetensors(&path, tensors, &meta)));
        self.shards.push(ShardInfo { file, n_seqs: self.pending_seqs, clean_ce: ce });
        self.pending.clear();
        self.pending_ce.clear();
        self.pending_seqs = 0;
        Ok(())
    }
}

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
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| unreadable(&format!("header is not JSON: {e}")))?;
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
    /// `limit` sequences (all when `None`), loading one shard at a time.
    pub fn for_each_batch(
        &self,
        batch_size: usize,
        limit: Option<usize>,
        device: &Device,
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
        let mut done = 0;
        for (i, shard) in self.manifest.shards.iter().enumerate() {
            if done >= limit {
                break;
            }
            let map = self.load_shard(i, device)?;
            let mut start = 0;
            while start < shard.n_seqs && done < limit {
                let n = batch_size.min(shard.n_seqs - start).min(limit - done);
                f(Batch::from_shard(&map, n_layers, start, n, device)?)?;
                start += n;
                done += n;
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

    /// Load shard `i` as `name -> tensor` on `device` (floating tensors in f32).
    pub fn load_shard(&self, i: usize, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.dir.join(&self.manifest.shards[i].file);
        let map = candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::input(&path, format!("not a readable cache shard: {e}")))?;
        let map = map
            .into_iter()
            .map(|(k, t)| {
                let t = if t.dtype().is_float() { t.to_dtype(DType::F32)? } else { t };
                Ok((k, t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        self.check_shard(&path, self.manifest.shards[i].n_seqs, &map)?;
        Ok(map)
    }

    /// Check that a shard holds every tensor a pass reads, with the manifest's shapes, token
    /// ids inside the vocabulary and finite activations.
    fn check_shard(&self, path: &Path, n: usize, map: &HashMap<String, Tensor>) -> Result<()> {
        let m = &self.manifest;
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
        CacheReader { cache, device: device.clone(), starts, loaded: None }
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
