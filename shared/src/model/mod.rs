//! The language model side: HF config and weights, TL processing, the hooked forward pass
//! ([`forward`]), the hook points a suite reads ([`hooks`]), resolving `--model` ([`hub`]) and
//! tokenizing text ([`tokenize`]).
//!
//! [`Model::load`] takes a local HF folder (see [`hub::resolve_model`] for hub ids),
//! reads `config.json`, the weights and the tokenizer, and fingerprints the model (its
//! configuration and the contents of its tensors, whatever the file layout) so that caches and
//! suites can be tied to the exact model that made them.

mod ce;
mod config;
mod forward;
mod hooks;
pub mod hub;
pub mod tokenize;
mod weights;

use std::path::{Path, PathBuf};

pub use config::{Activation, Arch, ModelConfig};
pub use forward::{ln_pre, token_ce, ForwardOutput, LayerHooks, Runtime};
pub use hooks::{graph_feature, graph_layer, Kind, Module};
pub use weights::{weight_files, BlockWeights, Weights};

use candle_core::Device;

use crate::error::{Error, IoContext, Result};
use tokenize::TextTokenizer;

/// A model ready to run, with where it came from.
pub struct Model {
    /// What the user passed as `--model` (a folder or a hub id).
    pub id: String,
    /// The folder it was read from.
    pub dir: PathBuf,
    /// The model's fingerprint: `blake3:<hex>` over its configuration and the contents of the
    /// tensors it is built from (see [`Weights::load`]); the same for `.bin` or `.safetensors`,
    /// whole or sharded.
    pub hash: String,
    /// The fingerprint scae 0.1 recorded (`blake3:` over `config.json` and the weight files'
    /// bytes), to accept caches and suites written before fingerprints were by content.
    pub file_hash: String,
    pub runtime: Runtime,
}

impl Model {
    /// Load config and weights from the folder `dir`; `id` is recorded as the model's name.
    pub fn load(id: &str, dir: &Path, device: &Device) -> Result<Model> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::input(dir, "not a model folder: config.json is missing"));
        }
        let cfg = ModelConfig::from_file(&config_path)?;
        let (weights, hash) = Weights::load(dir, &cfg)?;
        let mut files = vec![config_path];
        files.extend(weight_files(dir)?);
        let file_hash = hash_files(&files)?;
        let runtime = Runtime::new(cfg, weights, device)?;
        Ok(Model { id: id.to_string(), dir: dir.to_path_buf(), hash, file_hash, runtime })
    }

    /// Whether a recorded model fingerprint is this model's: the content fingerprint, or the
    /// file-bytes one that earlier versions recorded (they share the `blake3:` form, and a
    /// collision between the two is as unlikely as any other).
    pub fn is(&self, recorded: &str) -> bool {
        recorded == self.hash || recorded == self.file_hash
    }

    /// The model's configuration.
    pub fn cfg(&self) -> &ModelConfig {
        &self.runtime.cfg
    }

    /// The tokenizer from the same folder.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        TextTokenizer::from_dir(&self.dir, self.cfg())
    }
}

/// `blake3:<hex>` of the concatenated contents of `files`.
pub fn hash_files(files: &[PathBuf]) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    for f in files {
        // Memory-mapped and hashed on all cores: a 270 MB checkpoint takes ~0.1 s.
        hasher.update_mmap_rayon(f).at(f)?;
    }
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}
