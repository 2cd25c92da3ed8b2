//! Opening the inputs most stages share (an activation cache, its model, a suite, optional
//! connections) and checking that they agree before any heavy compute.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::error::{Error, Result};
use crate::formats::cache::{Cache, MANIFEST};
use crate::formats::connections::Connections;
use crate::formats::edges_meta::{EdgesMeta, Key};
use crate::formats::suite::Suite;
use crate::model::Model;

/// A `--suite` argument as a local path: itself if it exists, else a hub id's snapshot folder in
/// the Hugging Face cache (downloaded when online), as `--model` is resolved.
pub fn resolve_suite(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match path.to_str().filter(|s| crate::model::hub::looks_like_hub_id(s)) {
        Some(id) => crate::model::hub::resolve_suite(id, ["config.json", crate::formats::reference::CHECKPOINT]),
        None => Err(Error::input(path, "--suite: no such folder or file (and not a hub id like `owner/name`)")),
    }
}

/// Load the suite a `--suite` argument names (a path or a hub id, see [`resolve_suite`]).
pub fn load_suite(path: &Path, device: &Device) -> Result<Suite> {
    Suite::load(&resolve_suite(path)?, device)
}

/// A cache (or none, when activations are computed on the fly), the model, and a suite
/// checked against both.
pub struct Inputs {
    pub cache: Option<Cache>,
    pub model: Model,
    pub suite: Suite,
    /// `--suite` as given.
    pub suite_path: std::path::PathBuf,
}

impl Inputs {
    /// Open `acts` (and its model, or `model_override`) and the suite at `suite_path`.
    ///
    /// Fails when the suite's d_model, layer count or recorded model hash disagree with the
    /// cache, naming both files.
    pub fn open(acts: &Path, suite_path: &Path, model_override: Option<&str>, device: &Device) -> Result<Inputs> {
        let cache = Cache::open(acts)?;
        let suite = load_suite(suite_path, device)?;
        let m = &cache.manifest.model;
        let manifest = acts.join(MANIFEST);
        let mismatch = |what: String| {
            Error::input(
                suite_path,
                format!("{what}, but {} says otherwise; they do not belong together", manifest.display()),
            )
        };
        check_fit(&suite, m.d_model, m.n_layers, "cache", &mismatch)?;
        let model = cache.load_model(model_override, device)?;
        check_model(&suite, &model, "cache", &mismatch)?;
        Ok(Inputs { cache: Some(cache), model, suite, suite_path: suite_path.to_path_buf() })
    }

    /// Open a model (folder or hub id) and a suite for streaming: activations are computed
    /// from data by the tool. Fails when the suite does not fit the model.
    pub fn open_streaming(model_spec: &str, suite_path: &Path, device: &Device) -> Result<Inputs> {
        Inputs::with_model(load_suite(suite_path, device)?, model_spec, suite_path, device)
    }

    /// [`open_streaming`](Self::open_streaming) with the suite already loaded from `suite_path`.
    pub fn with_model(suite: Suite, model_spec: &str, suite_path: &Path, device: &Device) -> Result<Inputs> {
        let dir = crate::model::hub::resolve_model(model_spec)?;
        let model = Model::load(model_spec, &dir, device)?;
        let cfg = model.cfg();
        let mismatch =
            |what: String| Error::input(suite_path, format!("{what}; it does not belong to --model {model_spec}"));
        check_fit(&suite, cfg.d_model, cfg.n_layers, "model", &mismatch)?;
        check_model(&suite, &model, "model", &mismatch)?;
        Ok(Inputs { cache: None, model, suite, suite_path: suite_path.to_path_buf() })
    }

    /// Open a training stage's inputs: the cache `acts` (its model, or `model`), else the model
    /// `model` for streaming; and the suite.
    pub fn open_for(acts: Option<&Path>, model: Option<&str>, suite: &Path, device: &Device) -> Result<Inputs> {
        match (acts, model) {
            (Some(acts), _) => Inputs::open(acts, suite, model, device),
            (None, Some(m)) => Inputs::open_streaming(m, suite, device),
            (None, None) => Err(Error::Usage("--data/--tokens need --model (the model to run)".into())),
        }
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
    /// preceding feature (no set); or, when absent, the connections stored with the suite (a
    /// finetuned suite's `connections.parquet`, a reference checkpoint's `connections`, as the
    /// reference's `from_pretrained` does), else all. Says on stderr, prefixed with `tool`,
    /// which pass runs, and warns when the file's edges were scored for a suite outside this
    /// suite's lineage.
    pub fn choose_connections(&self, arg: Option<&Path>, tool: &str) -> Result<Chosen> {
        let embedded = self.suite.embedded.as_ref();
        let stored =
            |e: &crate::formats::connections::Embedded| format!("stored with the suite in {}", e.source.display());
        let (set, file, how) = match arg {
            Some(p) if is_all(p) => {
                let how = match embedded {
                    Some(e) => format!("--connections all, not those {}", stored(e)),
                    None => "--connections all".to_string(),
                };
                (None, None, how)
            }
            Some(p) => {
                let given = self.connections(p)?;
                if let Some(e) = embedded {
                    let same = e
                        .connections(&self.suite.modules, self.suite.n_features, self.parallel())
                        .is_ok_and(|s| s == given);
                    if !same {
                        crate::note!("{tool}: using {} instead of the connections {}", p.display(), stored(e));
                    }
                }
                (Some(given), Some(p.to_path_buf()), format!("from {}", p.display()))
            }
            None => match embedded {
                None => (None, None, "the suite stores none; --connections FILE for a pruned pass".to_string()),
                Some(e) => {
                    let c = e.connections(&self.suite.modules, self.suite.n_features, self.parallel())?;
                    (Some(c), Some(e.source.clone()), format!("{} (--connections all for the full pass)", stored(e)))
                }
            },
        };
        let meta = match &file {
            Some(p) => EdgesMeta::of_file(p)?,
            None => EdgesMeta::new(),
        };
        let lineage = match &file {
            Some(f) => self.lineage_check(f, &meta, tool)?,
            None => None,
        };
        let pass = match &set {
            Some(c) => {
                let mut n = format!("{} connections", c.n_edges());
                if c.n_embed_edges() > 0 {
                    n.push_str(&format!(" + {} from the embedding", c.n_embed_edges()));
                }
                if c.n_unembed_edges() > 0 {
                    n.push_str(&format!(" + {} into the unembedding", c.n_unembed_edges()));
                }
                format!("pruned, {n} {how}")
            }
            None => format!("all connections (every preceding feature; {how})"),
        };
        crate::note!("{tool}: pass: {pass}");
        Ok(Chosen { set, file, meta, lineage, pass })
    }

    /// Whether connections from `file` (with parquet metadata `meta`) were scored for this suite
    /// or one of its ancestors; warns on stderr, naming both suites, when not. `None` when the
    /// file does not record its suite.
    fn lineage_check(&self, file: &Path, meta: &EdgesMeta, tool: &str) -> Result<Option<LineageCheck>> {
        let Some(id) = meta.get(Key::SuiteId) else { return Ok(None) };
        let own = self.suite.id()?;
        let (path, file) = (self.suite_path.display(), file.display());
        if id == own {
            return Ok(Some(LineageCheck { in_lineage: true, note: format!("{file} was scored for this suite") }));
        }
        if let Some(n) = self.suite.lineage.ancestors.iter().position(|a| a == id) {
            let note = format!("{file} was scored for an ancestor of {path} ({} generation(s) back)", n + 1);
            return Ok(Some(LineageCheck { in_lineage: true, note }));
        }
        let other = meta.get(Key::Suite).unwrap_or("a suite whose path was not recorded");
        let note = format!(
            "{file} was scored for suite {} ({other}), which is neither {path} ({}) nor one of its ancestors",
            crate::util::fingerprint::short(id),
            crate::util::fingerprint::short(&own)
        );
        crate::note!("{tool}: warning: {note}");
        Ok(Some(LineageCheck { in_lineage: false, note }))
    }

    /// The record of the connections a suite is finetuned with, for its lineage.
    pub fn connections_ref(&self, chosen: &Chosen) -> crate::formats::suite::ConnectionsRef {
        let c = chosen.set.as_ref();
        crate::formats::suite::ConnectionsRef {
            source: chosen.file.as_ref().map_or("all".to_string(), |p| p.display().to_string()),
            n_edges: c.map(|c| c.n_edges() + c.n_embed_edges() + c.n_unembed_edges()),
            suite_id: chosen.meta.get(Key::SuiteId).map(String::from),
        }
    }

    /// The lineage of a suite trained from this one on `data` with the connections `chosen`.
    pub fn child_lineage(
        &self,
        data: crate::formats::suite::TrainedOn,
        chosen: &Chosen,
    ) -> Result<crate::formats::suite::Lineage> {
        self.suite.child_lineage(&self.suite_path, data, self.connections_ref(chosen))
    }

    /// What a training stage on these inputs read, for the suite's lineage: `seqs_read`
    /// sequences of the cache at `acts`, or of the streamed `data`.
    pub fn trained_on(
        &self,
        tool: &str,
        acts: Option<&Path>,
        data: Option<crate::data::SourceSpec>,
        opts: crate::data::SequenceOptions,
        seqs_read: u64,
    ) -> Result<crate::formats::suite::TrainedOn> {
        match (&self.cache, acts) {
            (Some(c), Some(a)) => crate::formats::suite::TrainedOn::of_cache(tool, a, c, seqs_read),
            _ => data_trained_on(tool, data, opts, seqs_read),
        }
    }
}

/// What a streaming training stage read (`data`, cut into sequences by `opts`), for the suite's
/// lineage.
pub fn data_trained_on(
    tool: &str,
    data: Option<crate::data::SourceSpec>,
    opts: crate::data::SequenceOptions,
    seqs_read: u64,
) -> Result<crate::formats::suite::TrainedOn> {
    // The same fields collect-acts records for a cache of this data.
    let (path, kind, column) = match &data {
        Some(crate::data::SourceSpec::Text { path, column }) => (path, "text", Some(column.clone())),
        Some(crate::data::SourceSpec::Tokens { path, column }) => (path, "tokens", column.clone()),
        None => return Err(Error::Usage("--data or --tokens is required without --acts".into())),
    };
    crate::formats::suite::TrainedOn::streamed(tool, path, kind, column, opts, seqs_read)
}

/// The connections a tool runs with (see [`Inputs::choose_connections`]).
pub struct Chosen {
    /// The set (`None`: all connections).
    pub set: Option<Connections>,
    /// The file it came from (`--connections FILE`, or the suite's stored file).
    pub file: Option<std::path::PathBuf>,
    /// The file's parquet key-value metadata (empty for other formats).
    pub meta: EdgesMeta,
    /// Whether the file was scored for this suite or one of its ancestors (`None`: the file does
    /// not say).
    pub lineage: Option<LineageCheck>,
    /// Which pass runs, in words (what the tool said on stderr).
    pub pass: String,
}

pub use crate::formats::suite::LineageCheck;

/// Whether the model has parallel attn/MLP blocks: from `model` (a folder or hub id) if given,
/// else from the metadata of the connections parquet `parquet`, else sequential. The two must
/// agree when both say.
pub fn block_type(model: Option<&str>, parquet: Option<&Path>) -> Result<bool> {
    let from_model = match model {
        Some(m) => {
            let dir = crate::model::hub::resolve_model(m)?;
            Some(crate::model::ModelConfig::from_file(&dir.join("config.json"))?.parallel_attn_mlp)
        }
        None => None,
    };
    let from_file = match parquet {
        Some(p) => EdgesMeta::of_file(p)?.get(Key::ParallelAttnMlp).map(|v| v == "true"),
        None => None,
    };
    match (from_model, from_file) {
        (Some(a), Some(b)) if a != b => Err(Error::input(
            parquet.expect("file"),
            format!("metadata `parallel_attn_mlp` {b} disagrees with --model {} ({a})", model.unwrap_or("")),
        )),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Ok(false),
    }
}

/// Whether a `--connections` argument is the keyword `all` (a file named `all` is `./all`).
pub fn is_all(p: &Path) -> bool {
    p.as_os_str() == "all"
}

/// The suite's d_model and layer count against the model's (`other` names where those come
/// from in the message).
fn check_fit(
    suite: &Suite,
    d_model: usize,
    n_layers: usize,
    other: &str,
    mismatch: &impl Fn(String) -> Error,
) -> Result<()> {
    if suite.d_model != d_model {
        return Err(mismatch(format!("d_model {} ({other}: {d_model})", suite.d_model)));
    }
    if suite.modules.len() != 2 * n_layers {
        return Err(mismatch(format!("{} layers ({other}: {n_layers})", suite.modules.len() / 2)));
    }
    Ok(())
}

/// The model fingerprint the suite records (if any) against the model's.
fn check_model(suite: &Suite, model: &Model, other: &str, mismatch: &impl Fn(String) -> Error) -> Result<()> {
    match &suite.model_hash {
        Some(h) if !model.is(h) => Err(mismatch(format!("trained for model hash {h} ({other}: {})", model.hash))),
        _ => Ok(()),
    }
}
