//! Opening the inputs most stages share (an activation cache, its model, a suite, optional
//! connections) and checking that they agree before any heavy compute.

use std::path::Path;

use candle_core::Device;

use crate::error::{Error, Result};
use crate::formats::cache::{Cache, MANIFEST};
use crate::formats::connections::Connections;
use crate::formats::suite::Suite;
use crate::model::Model;

/// A cache (or none, when activations are computed on the fly), the model, and a suite
/// checked against both.
pub struct Inputs {
    pub cache: Option<Cache>,
    pub model: Model,
    pub suite: Suite,
}

impl Inputs {
    /// Open `acts` (and its model, or `model_override`) and the suite at `suite_path`.
    ///
    /// Fails when the suite's d_model, layer count or recorded model hash disagree with the
    /// cache, naming both files.
    pub fn open(acts: &Path, suite_path: &Path, model_override: Option<&str>, device: &Device) -> Result<Inputs> {
        let cache = Cache::open(acts)?;
        let suite = Suite::load(suite_path, device)?;
        let m = &cache.manifest.model;
        let manifest = acts.join(MANIFEST);
        let mismatch = |what: String| {
            Error::input(
                suite_path,
                format!("{what}, but {} says otherwise; they do not belong together", manifest.display()),
            )
        };
        check_fit(&suite, m.d_model, m.n_layers, &m.hash, "cache", mismatch)?;
        let model = cache.load_model(model_override, device)?;
        Ok(Inputs { cache: Some(cache), model, suite })
    }

    /// Open a model (folder or hub id) and a suite for streaming: activations are computed
    /// from data by the tool. Fails when the suite does not fit the model.
    pub fn open_streaming(model_spec: &str, suite_path: &Path, device: &Device) -> Result<Inputs> {
        let suite = Suite::load(suite_path, device)?;
        let dir = crate::model::hub::resolve_model(model_spec)?;
        let model = Model::load(model_spec, &dir, device)?;
        let cfg = model.cfg();
        let mismatch =
            |what: String| Error::input(suite_path, format!("{what}; it does not belong to --model {model_spec}"));
        check_fit(&suite, cfg.d_model, cfg.n_layers, &model.hash, "model", mismatch)?;
        Ok(Inputs { cache: None, model, suite })
    }

    /// The cache (tools that require `--acts` open with it).
    pub fn cache(&self) -> &Cache {
        self.cache.as_ref().expect("opened with a cache")
    }

    /// Whether the model has parallel attn/MLP blocks.
    pub fn parallel(&self) -> bool {
        self.model.cfg().parallel_attn_mlp
    }

    /// Load a connections file checked against the suite and model.
    pub fn connections(&self, path: &Path) -> Result<Connections> {
        let conns = Connections::load(path, &self.suite.modules, self.suite.n_features, self.parallel())?;
        conns.check_vocab(path, self.model.cfg().d_vocab)?;
        Ok(conns)
    }

    /// The connection set a pass uses, from `--connections`: a file; `all` for every
    /// preceding feature (`None`); or, when absent, the connections stored with a reference
    /// suite if it has them (as the reference's `from_pretrained` does), else all. `tool`
    /// prefixes what is said about the choice.
    pub fn choose_connections(&self, arg: Option<&Path>, tool: &str) -> Result<Option<Connections>> {
        let embedded = self.suite.embedded.as_ref();
        match arg {
            Some(p) if is_all(p) => {
                if let Some(e) = embedded {
                    crate::note!(
                        "{tool}: --connections all: the full pass, not the connections in {}",
                        e.source.display()
                    );
                }
                Ok(None)
            }
            Some(p) => {
                if let Some(e) = embedded {
                    crate::note!("{tool}: using {} instead of the connections in {}", p.display(), e.source.display());
                }
                self.connections(p).map(Some)
            }
            None => match embedded {
                None => Ok(None),
                Some(e) => {
                    let c = e.connections(&self.suite.modules, self.suite.n_features, self.parallel())?;
                    crate::note!(
                        "{tool}: using the {} connections stored in {} (--connections all for the full pass, --connections FILE for others)",
                        c.n_edges(),
                        e.source.display()
                    );
                    Ok(Some(c))
                }
            },
        }
    }

    /// The file that the chosen connections come from (for fingerprints): `arg` unless it is
    /// `all`; the suite's checkpoint when its embedded connections are used.
    pub fn connections_file(&self, arg: Option<&Path>) -> Option<std::path::PathBuf> {
        match arg {
            Some(p) if is_all(p) => None,
            Some(p) => Some(p.to_path_buf()),
            None => self.suite.embedded.as_ref().map(|e| e.source.clone()),
        }
    }
}

/// Whether a `--connections` argument is the keyword `all` (a file named `all` is `./all`).
pub fn is_all(p: &Path) -> bool {
    p.as_os_str() == "all"
}

/// The suite's d_model, layer count and recorded model hash against the model's (`other`
/// names where those come from in the message).
fn check_fit(
    suite: &Suite,
    d_model: usize,
    n_layers: usize,
    hash: &str,
    other: &str,
    mismatch: impl Fn(String) -> Error,
) -> Result<()> {
    if suite.d_model != d_model {
        return Err(mismatch(format!("d_model {} ({other}: {d_model})", suite.d_model)));
    }
    if suite.modules.len() != 2 * n_layers {
        return Err(mismatch(format!("{} layers ({other}: {n_layers})", suite.modules.len() / 2)));
    }
    if let Some(h) = &suite.model_hash {
        if h != hash {
            return Err(mismatch(format!("trained for model hash {h} ({other}: {hash})")));
        }
    }
    Ok(())
}
