//! A suite's lineage, recorded in its `config.json` (FORMATS.md, "Suite"): the suite it
//! was finetuned from (and every ancestor's fingerprint), the data each training stage read
//! (cache identity or data fingerprint and sequence range), and the connections it was trained
//! with. From it `evaluate` tells held-out tokens from training ones and tools warn when
//! connections meet a suite outside the lineage.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// A suite's history: what it was trained from, on which data, with which connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// The suite this one was finetuned from (fingerprint and path as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<SuiteRef>,
    /// Fingerprints of every earlier suite, nearest first (parent, grandparent, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<String>,
    /// What each training stage read, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trained_on: Vec<TrainedOn>,
    /// The connections of the last training stage: `all`, or the file, its edge count and the
    /// suite its edges were scored for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionsRef>,
}

/// A suite by fingerprint (`Suite::id`) and the path it was read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteRef {
    pub id: String,
    pub path: String,
}

/// The data one training stage read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainedOn {
    /// `train-suite` or `finetune`.
    pub tool: String,
    /// The activation cache (`--acts`) as given, and its identity (`Cache::id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acts: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_id: Option<String>,
    /// The text or tokens the sequences came from (the cache's `data`, or `--data` when
    /// streaming), with the sequences read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::formats::cache::DataInfo>,
    #[serde(default)]
    pub n_seqs: u64,
    /// Sequence layout: tokens per sequence and BOS.
    #[serde(default)]
    pub ctx_len: usize,
    #[serde(default)]
    pub prepend_bos: bool,
}

impl TrainedOn {
    /// A stage of `tool` that read `seqs_read` sequences of the cache at `acts` (all of it when
    /// they wrap around).
    pub fn of_cache(
        tool: &str,
        acts: &Path,
        cache: &crate::formats::cache::Cache,
        seqs_read: u64,
    ) -> Result<TrainedOn> {
        let m = &cache.manifest;
        Ok(TrainedOn {
            tool: tool.to_string(),
            acts: Some(acts.display().to_string()),
            cache_id: Some(cache.id()?),
            data: Some(m.data.clone()),
            n_seqs: seqs_read.min(m.n_seqs as u64),
            ctx_len: m.ctx_len,
            prepend_bos: m.prepend_bos,
        })
    }

    /// A stage of `tool` that computed activations on the fly from the first `seqs_read`
    /// sequences of `data` (`--data` / `--tokens`, read with `opts`).
    pub fn streamed(
        tool: &str,
        data: &Path,
        kind: &str,
        column: Option<String>,
        opts: crate::data::SequenceOptions,
        seqs_read: u64,
    ) -> Result<TrainedOn> {
        let info = crate::formats::cache::DataInfo {
            source: data.display().to_string(),
            kind: kind.to_string(),
            column,
            pack: opts.pack,
            docs_read: 0,
            docs_skipped_short: 0,
            fingerprint: Some(crate::util::fingerprint::file_fingerprint(data)?),
            skip_seqs: 0,
        };
        Ok(TrainedOn {
            tool: tool.to_string(),
            acts: None,
            cache_id: None,
            data: Some(info),
            n_seqs: seqs_read,
            ctx_len: opts.ctx_len,
            prepend_bos: opts.prepend_bos,
        })
    }
}

/// The connections a suite was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsRef {
    /// `all`, or the file as given.
    pub source: String,
    /// Edges between modules, from the embedding, into the unembedding (`None` for all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_edges: Option<usize>,
    /// The suite the connections were scored for (the file's `suite_id` metadata), if recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite_id: Option<String>,
}

/// Whether a connections file was scored for a suite or one of its ancestors, and the
/// sentence saying so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageCheck {
    pub in_lineage: bool,
    pub note: String,
}

impl Lineage {
    /// Nothing recorded.
    pub fn is_empty(&self) -> bool {
        *self == Lineage::default()
    }
}
