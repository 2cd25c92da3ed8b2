//! Resolving `--model`: a local HF folder, or a hub id looked up in (and, online, downloaded
//! into) the standard Hugging Face cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
//!
//! This is the only place scae touches the network, and only when `--model` is a hub id that
//! is not already cached. `HF_HUB_OFFLINE=1` forbids the download.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Files a model folder may need, besides the weights.
const META_FILES: [&str; 6] =
    ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"];

/// Turn `--model` into a local folder holding `config.json` and weights.
///
/// A path that exists must be a folder. Otherwise a string shaped like `owner/name` is a hub
/// id: its cached snapshot is used if complete, else it is downloaded (unless offline).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        if !path.is_dir() {
            return Err(Error::input(path, "--model: expected a folder with config.json and weights, found a file"));
        }
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(spec) {
        return Err(Error::input(path, "--model: no such folder (and not a hub id like `owner/name`)"));
    }
    if let Some(dir) = cached_snapshot(spec) {
        return Ok(dir);
    }
    let fail = not_cached("--model", spec, " (or run scae there once)");
    if offline() {
        return Err(fail("HF_HUB_OFFLINE is set, so it was not downloaded".into()));
    }
    download(spec).map_err(|e| fail(format!("download failed: {e}")))
}

/// Whether `HF_HUB_OFFLINE` forbids downloads.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The error for hub id `id` given to `flag` that is not cached (`why`: and not downloaded).
fn not_cached<'a>(flag: &'a str, id: &'a str, also: &'a str) -> impl Fn(String) -> Error + 'a {
    move |why| {
        Error::Usage(format!(
            "{flag} {id}: not a local folder and not in the Hugging Face cache; {why}; \
             hint: on a machine with network run `huggingface-cli download {id} --local-dir DIR`{also}, \
             copy DIR here and pass {flag} DIR"
        ))
    }
}

/// Whether `spec` has the shape of a hub id (`owner/name`).
pub fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The snapshot folder of a cached model if it has a config, weights and a tokenizer.
fn cached_snapshot(id: &str) -> Option<PathBuf> {
    let repo = hf_hub::Cache::from_env().model(id.to_string());
    let config = repo.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let has_tok = dir.join("tokenizer.json").is_file() || dir.join("vocab.json").is_file();
    (has_tok && crate::model::weight_files(&dir).is_ok()).then_some(dir)
}

/// Turn a `--suite` hub id into the cached (or, online, downloaded) snapshot folder of a suite
/// repo holding `files` (a reference suite: `config.json` and `checkpoint.pt`).
pub fn resolve_suite(id: &str, files: [&str; 2]) -> Result<PathBuf> {
    let repo = hf_hub::Cache::from_env().model(id.to_string());
    if let (Some(c), Some(_)) = (repo.get(files[0]), repo.get(files[1])) {
        if let Some(dir) = c.parent() {
            return Ok(dir.to_path_buf());
        }
    }
    let fail = not_cached("--suite", id, "");
    if offline() {
        return Err(fail("HF_HUB_OFFLINE is set, so it was not downloaded".into()));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env().build().map_err(|e| fail(format!("download failed: {e}")))?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for f in files {
        let p = repo.get(f).map_err(|e| fail(format!("download of {f} failed: {e}")))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| fail("nothing downloaded".into()))
}

fn download(id: &str) -> std::result::Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env().build().map_err(|e| e.to_string())?;
    let repo = api.model(id.to_string());
    let info = repo.info().map_err(|e| e.to_string())?;
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let has = |f: &str| listed.iter().any(|l| l == f);
    let mut wanted: Vec<String> = META_FILES.iter().filter(|f| has(f)).map(|f| f.to_string()).collect();
    let index = ["model.safetensors.index.json", "pytorch_model.bin.index.json"];
    if has("model.safetensors") {
        wanted.push("model.safetensors".into());
    } else if let Some(ix) = index.iter().find(|f| has(f)) {
        let path = repo.get(ix).map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let mut shards: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        wanted.extend(shards);
    } else if has("pytorch_model.bin") {
        wanted.push("pytorch_model.bin".into());
    } else {
        return Err(format!("{id} has no model.safetensors or pytorch_model.bin"));
    }
    let mut dir = None;
    for f in &wanted {
        let p = repo.get(f).map_err(|e| format!("{f}: {e}"))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| format!("{id}: nothing to download"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_hub_ids() {
        assert!(looks_like_hub_id("roneneldan/TinyStories-33M"));
        assert!(looks_like_hub_id("EleutherAI/pythia-70m"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("gpt2"));
        assert!(!looks_like_hub_id("/abs/path"));
    }
}
