//! `eval.json` (format `scae-eval`, version 2; FORMATS.md): what `evaluate` measured, on which
//! tokens (held out from the suite's training or not), with which pass and suite, read back by
//! `evaluate --compare`. Written with sorted keys. Version 1 files (without the provenance
//! fields) are still read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `format` of an eval.json.
pub const FORMAT: &str = "scae-eval";
/// Current version (2: provenance — tokens, pass, suite and connections lineage).
pub const VERSION: u32 = 2;

/// One module's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleEval {
    /// FVU over all tokens (error and target centred).
    pub fvu: f64,
    /// The reference's FVU (batch-axis variance), averaged over batches.
    pub fvu_ref: f64,
    /// Mean number of non-zero features per token.
    pub l0: f64,
    /// Fraction of features that never had a non-zero value.
    pub dead_fraction: f64,
}

/// The whole of `eval.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub format: String,
    pub version: u32,
    pub acts: PathBuf,
    pub suite: PathBuf,
    pub connections: Option<PathBuf>,
    /// Edges in the connection set (none: all connections).
    pub n_connections: Option<usize>,
    /// C as recorded by score-edges/select-edges, else the most edges of any feature.
    pub c: Option<u64>,
    /// The most embed edges of any feature (none: every feature reads the whole embedding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_c: Option<u64>,
    /// The most features any output token reads (none: every token reads every feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unembed_c: Option<u64>,
    /// The `created_by` of the suite's config.json.
    pub suite_created_by: Option<String>,
    pub n_seqs: usize,
    pub n_tokens: u64,
    pub clean_ce: f64,
    pub ce: f64,
    pub ce_diff: f64,
    pub ce_zero: f64,
    pub ce_recovered: f64,
    pub mean_fvu: f64,
    pub mean_l0: f64,
    pub dead_fraction: f64,
    pub consistent_attn_bias: bool,
    pub modules: BTreeMap<String, ModuleEval>,
    /// Whether the suite was trained on these tokens: `held-out`, `training` or `unknown`,
    /// and why (from the suite's lineage and the cache's data).
    #[serde(default = "unknown")]
    pub tokens: String,
    #[serde(default)]
    pub tokens_note: String,
    /// The cache's identity (`Cache::id`).
    #[serde(default)]
    pub cache_id: Option<String>,
    /// Which pass ran, in words (as said on stderr).
    #[serde(default)]
    pub pass: String,
    /// The connections are the random control (`select-edges --random`).
    #[serde(default)]
    pub random_connections: bool,
    /// The connections were learned (`learn-connections`).
    #[serde(default)]
    pub learned_connections: bool,
    /// Whether the connections file was scored for this suite or an ancestor (absent when the
    /// file does not record it).
    #[serde(default)]
    pub connections_lineage: Option<crate::formats::suite::LineageCheck>,
    /// The suite's fingerprint, and that of the suite its lineage starts from (the pretrained
    /// suite: runs of one seed share it).
    #[serde(default)]
    pub suite_id: Option<String>,
    #[serde(default)]
    pub root_suite_id: Option<String>,
    /// How the suite's last training stage ran: `tool`, `steps`, `flags` (every flag of its run
    /// configuration), `connections` (from its config.json), so that runs finetuned "the same
    /// way" can be told.
    #[serde(default)]
    pub suite_training: Option<serde_json::Value>,
    /// Whether the suite records the data it was trained on (`tokens` is `unknown` without).
    #[serde(default)]
    pub suite_lineage_recorded: bool,
}

fn unknown() -> String {
    "unknown".into()
}

impl EvalReport {
    /// Write as pretty JSON with sorted keys (via `<path>.tmp`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let v = serde_json::to_value(self).expect("report serializes");
        crate::util::io::write_atomic(path, serde_json::to_string_pretty(&v).expect("json").as_bytes())
    }

    /// Read `dir/eval.json`, checking its format.
    pub fn read(dir: &Path) -> Result<EvalReport> {
        let path = dir.join("eval.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::input(&path, format!("cannot read: {e}; hint: make it with evaluate --out")))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::input(&path, format!("not valid JSON: {e}")))?;
        if v["format"] != FORMAT || !(1..=VERSION as u64).contains(&v["version"].as_u64().unwrap_or(0)) {
            return Err(Error::input(
                &path,
                format!(
                    "format {} v{}, expected {FORMAT} v1..={VERSION}; hint: written by evaluate",
                    v["format"], v["version"]
                ),
            ));
        }
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            Error::input(&path, format!("field `{field}`: {}", e.inner()))
        })
    }

    /// Whether the evaluated suite was written by `finetune`.
    pub fn finetuned(&self) -> bool {
        self.suite_created_by.as_deref().is_some_and(|s| s.starts_with("finetune"))
    }
}
