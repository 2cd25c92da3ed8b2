//! The key-value metadata of an edges or connections parquet (FORMATS.md, "Connections and
//! edges"): one schema, written by score-edges, select-edges, finetune (a suite's stored
//! connections) and convert-suite, read by `Connections::load`, select-edges, `inputs`
//! (lineage), `eval` (C) and convert-suite (block type).
//!
//! The entries keep the order they were set in (so a file's bytes depend only on what its
//! producer set, in its order); every key is a [`Key`], and every value is parsed in one place,
//! with an error naming the file and the key.

use std::fmt::Display;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::model::Module;

/// A metadata key of an edges or connections file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// `scae-edges` or `scae-connections` (written by `Connections::write_parquet`).
    Format,
    /// The layout version (written by `Connections::write_parquet`).
    Version,
    /// F of the suite (written by `Connections::write_parquet`).
    NFeatures,
    /// The suite's module names, comma separated (written by `Connections::write_parquet`).
    Modules,
    /// Whether the model has parallel attn/MLP blocks (`true`/`false`).
    ParallelAttnMlp,
    /// Tokens the scores were averaged over.
    NTokens,
    /// Edges kept per feature in an edges file.
    Keep,
    /// The activation cache scored on (path as given).
    Acts,
    /// The suite the edges were scored for (path as given) and its fingerprint.
    Suite,
    SuiteId,
    /// Pass options the scores were computed with.
    ConsistentAttnBias,
    Embed,
    Unembed,
    /// C: the most edges per feature a selection kept.
    C,
    /// The edges file a selection was made from.
    Edges,
    /// The seed of a random-connections control.
    RandomSeed,
    /// Embed / unembed edges per feature (select-edges `--embed-c`, `--unembed-c`).
    EmbedC,
    UnembedC,
    /// The file connections were copied from (finetune, convert-suite).
    Source,
    /// How learned connections were learned (learn-connections: λ, steps, β schedule, ...).
    Learned,
}

impl Key {
    /// The key as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Key::Format => "format",
            Key::Version => "version",
            Key::NFeatures => "n_features",
            Key::Modules => "modules",
            Key::ParallelAttnMlp => "parallel_attn_mlp",
            Key::NTokens => "n_tokens",
            Key::Keep => "keep",
            Key::Acts => "acts",
            Key::Suite => "suite",
            Key::SuiteId => "suite_id",
            Key::ConsistentAttnBias => "consistent_attn_bias",
            Key::Embed => "embed",
            Key::Unembed => "unembed",
            Key::C => "c",
            Key::Edges => "edges",
            Key::RandomSeed => "random_seed",
            Key::EmbedC => "embed_c",
            Key::UnembedC => "unembed_c",
            Key::Source => "source",
            Key::Learned => "learned",
        }
    }

    /// The keys describing the file itself and where it came from, which a copy of its
    /// connections writes afresh (finetune's stored connections).
    pub const OWN: [Key; 6] =
        [Key::Format, Key::Version, Key::NFeatures, Key::Modules, Key::Source, Key::ParallelAttnMlp];
}

/// The metadata of one edges or connections file, in file order. Keys other tools wrote are
/// kept as they are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EdgesMeta {
    entries: Vec<(String, String)>,
}

impl EdgesMeta {
    /// No entries.
    pub fn new() -> EdgesMeta {
        EdgesMeta::default()
    }

    /// The metadata of `path` when it is a parquet file; empty for the other connection
    /// formats (`.safetensors`, `.pkl`, `.pt`), which carry none.
    pub fn of_file(path: &Path) -> Result<EdgesMeta> {
        if path.extension().is_some_and(|e| e == "parquet") {
            Ok(EdgesMeta { entries: crate::util::table::parquet_metadata(path)? })
        } else {
            Ok(EdgesMeta::new())
        }
    }

    /// Set `key` to `value`: in place when present, else appended.
    pub fn set(&mut self, key: Key, value: impl Display) -> &mut EdgesMeta {
        let value = value.to_string();
        match self.entries.iter_mut().find(|(k, _)| k == key.as_str()) {
            Some(e) => e.1 = value,
            None => self.entries.push((key.as_str().to_string(), value)),
        }
        self
    }

    /// `set` with a builder's shape.
    pub fn with(mut self, key: Key, value: impl Display) -> EdgesMeta {
        self.set(key, value);
        self
    }

    /// The value of `key`, as written.
    pub fn get(&self, key: Key) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key.as_str()).map(|(_, v)| v.as_str())
    }

    /// These entries without `keys`, in order.
    pub fn without(&self, keys: &[Key]) -> EdgesMeta {
        let drop = |k: &str| keys.iter().any(|key| key.as_str() == k);
        EdgesMeta { entries: self.entries.iter().filter(|(k, _)| !drop(k)).cloned().collect() }
    }

    /// Append every entry of `other` (replacing those already set).
    pub fn extend(&mut self, other: &EdgesMeta) {
        for (k, v) in &other.entries {
            match self.entries.iter_mut().find(|(key, _)| key == k) {
                Some(e) => e.1 = v.clone(),
                None => self.entries.push((k.clone(), v.clone())),
            }
        }
    }

    /// The value of `key` parsed as `what` (e.g. "a whole number"); `path` names the file in
    /// the error.
    pub fn parse<T: FromStr>(&self, key: Key, what: &str, path: &Path) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| Error::input(path, format!("metadata `{}`: expected {what}, found {v:?}", key.as_str()))),
        }
    }

    /// `c`, if recorded.
    pub fn c(&self, path: &Path) -> Result<Option<u64>> {
        self.parse(Key::C, "a whole number", path)
    }

    /// `keep`, if recorded.
    pub fn keep(&self, path: &Path) -> Result<Option<usize>> {
        self.parse(Key::Keep, "a whole number", path)
    }

    /// `n_features`, if recorded.
    pub fn n_features(&self, path: &Path) -> Result<Option<usize>> {
        self.parse(Key::NFeatures, "a whole number", path)
    }

    /// `modules`, if recorded, as modules.
    pub fn modules(&self, path: &Path) -> Result<Option<Vec<Module>>> {
        let Some(v) = self.get(Key::Modules) else { return Ok(None) };
        v.split(',')
            .map(|m| {
                Module::parse(m).ok_or_else(|| {
                    Error::input(path, format!("metadata `modules`: `{m}` is not a module name (e.g. attn_0, mlp_0)"))
                })
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    /// The value of `key`, or an error naming `path` and the key with `hint`.
    pub fn require(&self, key: Key, path: &Path, hint: &str) -> Result<&str> {
        self.get(key).ok_or_else(|| Error::input(path, format!("metadata lacks `{}`; hint: {hint}", key.as_str())))
    }

    /// As `(key, value)` pairs for a parquet writer.
    pub fn pairs(&self) -> Vec<(&str, String)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_replaces_in_place_and_parses_with_named_errors() {
        let mut m = EdgesMeta::new().with(Key::ParallelAttnMlp, false).with(Key::C, 16).with(Key::Suite, "s/");
        m.set(Key::C, 8);
        assert_eq!(m.pairs(), vec![("parallel_attn_mlp", "false".into()), ("c", "8".into()), ("suite", "s/".into())]);
        let p = Path::new("x.parquet");
        assert_eq!(m.c(p).unwrap(), Some(8));
        assert_eq!(m.keep(p).unwrap(), None);
        m.set(Key::C, "many");
        let e = m.c(p).unwrap_err().to_string();
        assert!(e.contains("x.parquet") && e.contains("metadata `c`: expected a whole number, found \"many\""), "{e}");
        let rest = m.without(&Key::OWN);
        assert_eq!(rest.pairs(), vec![("c", "many".into()), ("suite", "s/".into())]);
        let e = EdgesMeta::new().with(Key::Modules, "attn_0,mlpx").modules(p).unwrap_err().to_string();
        assert!(e.contains("`mlpx` is not a module name"), "{e}");
    }
}
