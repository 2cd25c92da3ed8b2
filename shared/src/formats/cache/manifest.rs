//! A cache's `manifest.json`: the model the activations came from, the data and its
//! sequencing, the storage type and the shard list (format `scae-acts`; FORMATS.md).

use std::path::Path;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::{FORMAT, MANIFEST, VERSION};
use crate::error::{Error, Result};
use crate::model::ModelConfig;

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
