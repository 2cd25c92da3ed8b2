//! `scores.json` (format `scae-scores`, version 1; FORMATS.md): a summary of a `score-edges`
//! run beside its `edges.parquet`. Written with sorted keys.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// `format` of a scores.json.
pub const FORMAT: &str = "scae-scores";
/// Current version.
pub const VERSION: u32 = 1;

/// The whole of `scores.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoresSummary {
    pub format: String,
    pub version: u32,
    pub n_seqs: usize,
    pub n_tokens: u64,
    /// Edges kept per downstream feature in edges.parquet.
    pub keep: usize,
    /// `--top-c`, when connections.parquet was written.
    pub top_c: Option<usize>,
    pub n_edges: usize,
    pub n_connections: Option<usize>,
    /// How scores are normalised (in words).
    pub normalization: String,
    /// The selection order (in words).
    pub tie_order: String,
    pub acts: PathBuf,
    pub suite: PathBuf,
}

impl ScoresSummary {
    /// Write as pretty JSON with sorted keys (via `<path>.tmp`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let v = serde_json::to_value(self).expect("summary serializes");
        crate::util::io::write_atomic(path, serde_json::to_string_pretty(&v).expect("json").as_bytes())
    }
}
