//! Opening the inputs most stages share (an activation cache, its model, a suite, optional
//! connections) and checking that they agree before any heavy compute.

use std::path::Path;

use candle_core::Device;

use crate::cache::{Cache, MANIFEST};
use crate::connections::Connections;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::suite::Suite;

/// A cache, the model that made it, and a suite checked against both.
pub struct Inputs {
    pub cache: Cache,
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
        let mismatch = |what: String| Error::input(suite_path, format!("{what}, but {} says otherwise; they do not belong together", manifest.display()));
        if suite.d_model != m.d_model {
            return Err(mismatch(format!("d_model {} (cache: {})", suite.d_model, m.d_model)));
        }
        if suite.modules.len() != 2 * m.n_layers {
            return Err(mismatch(format!("{} layers (cache: {})", suite.modules.len() / 2, m.n_layers)));
        }
        if let Some(h) = &suite.model_hash {
            if *h != m.hash {
                return Err(mismatch(format!("trained for model hash {h} (cache: {})", m.hash)));
            }
        }
        let model = cache.load_model(model_override, device)?;
        Ok(Inputs { cache, model, suite })
    }

    /// Whether the model has parallel attn/MLP blocks.
    pub fn parallel(&self) -> bool {
        self.model.cfg().parallel_attn_mlp
    }

    /// Load a connections file checked against the suite and model.
    pub fn connections(&self, path: &Path) -> Result<Connections> {
        Connections::load(path, &self.suite.modules, self.suite.n_features, self.parallel())
    }
}
