//! Writing a cache: the shard writer, and the `collect-acts` runner that runs the model over a
//! token source and writes shards and manifest into a staged output folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::{DataInfo, Manifest, ModelInfo, ShardInfo, StoreDType, CLEAN_CE, FORMAT, MANIFEST, VERSION, ZERO_CE};
use crate::data::{BatchSource, SequenceOptions, SourceSpec};
use crate::error::{Error, Result};
use crate::model::{ForwardOutput, Model, ModelConfig, Runtime};
use crate::util::collective::Collective;
use crate::util::io::StagedDir;
use crate::util::profile::Profile;

/// A validated `collect-acts` run.
#[derive(Debug, Clone)]
pub struct CollectConfig {
    /// The model as given (`--model`: a folder or a hub id), recorded in the manifest.
    pub model: String,
    /// Where the tokens come from (`None`: an error, raised once the model is loaded).
    pub source: Option<SourceSpec>,
    pub seq: SequenceOptions,
    /// Sequences to cache (`None`: all the data gives).
    pub limit: Option<usize>,
    /// Sequences skipped before the first cached one.
    pub skip_seqs: u64,
    /// Sequences per forward pass.
    pub batch_size: usize,
    pub dtype: StoreDType,
    /// Sequences per shard (`None`: whole batches of about 256 MiB).
    pub shard_seqs: Option<usize>,
    /// Output folder, and whether an existing, non-empty one is replaced.
    pub out: PathBuf,
    pub overwrite: bool,
    /// The manifest's `created_by` (tool and version).
    pub created_by: String,
}

/// What [`collect`] wrote.
#[derive(Debug, Clone)]
pub struct Collected {
    /// The finished cache folder.
    pub out: PathBuf,
    pub manifest: Manifest,
    /// Seconds from the first batch to the committed folder.
    pub secs: f64,
}

/// Run the model over the source and write a cache into `cfg.out`: shards of every hook the
/// pipeline needs, then `manifest.json`. Warns on stderr when the data ran out before
/// `cfg.limit`.
///
/// On several ranks of `coll` (`mpirun -n N collect-acts ...`) every rank reads the data, batch
/// i's forward pass runs on rank i mod N, and rank 0 receives the stored hooks and writes every
/// shard and the manifest, byte-identical to one process's (the other ranks return `None`).
pub fn collect(cfg: &CollectConfig, device: &Device, coll: &dyn Collective) -> Result<Option<Collected>> {
    let dir = crate::model::hub::resolve_model(&cfg.model)?;
    let model = Model::load(&cfg.model, &dir, device)?;
    let mcfg = model.cfg().clone();
    let ctx_len = cfg.seq.ctx_len;
    if ctx_len > mcfg.n_ctx {
        return Err(Error::Usage(format!(
            "--ctx-len {ctx_len}: above the model's n_ctx {} ({})",
            mcfg.n_ctx,
            dir.join("config.json").display()
        )));
    }
    let tokenizer = model.tokenizer()?;
    let Some(spec) = &cfg.source else { return Err(Error::Usage("one of --data or --tokens is required".into())) };
    let (batch, limit) = (cfg.batch_size, cfg.limit);
    let mut source = BatchSource::open(spec, &tokenizer, cfg.seq, batch, limit, mcfg.d_vocab)?;
    let skipped = source.skip(cfg.skip_seqs)?;
    if skipped < cfg.skip_seqs {
        return Err(Error::Usage(format!(
            "--skip-seqs {}: {} gives only {skipped} sequences with these flags",
            cfg.skip_seqs,
            spec.path().display()
        )));
    }
    let data_fingerprint = crate::util::fingerprint::file_fingerprint(spec.path())?;
    let stage = if coll.rank() == 0 { Some(StagedDir::create(&cfg.out, cfg.overwrite, "--out")?) } else { None };
    let shard_seqs = cfg.shard_seqs.unwrap_or_else(|| auto_shard_seqs(&mcfg, ctx_len, cfg.dtype, batch));
    // (Only rank 0 writes: the other ranks' writer never flushes.)
    let stage_path = stage.as_ref().map_or_else(|| cfg.out.clone(), |s| s.path().to_path_buf());
    let mut writer = ShardWriter::new(&stage_path, &mcfg, cfg.dtype, shard_seqs);

    let mut bar = crate::util::token_bar(limit.map(|l| (l * ctx_len) as u64), "collect-acts");
    let start = Instant::now();
    let (rank, ranks) = (coll.rank(), coll.size());
    let mut index = 0;
    // With SCAE_PROFILE, one line per batch: reading it, its forward pass, storing its hooks.
    let mut prof = Profile::new();
    while let Some(tokens) = source.next_batch(device)? {
        prof.mark("read");
        // Batch i's forward pass on rank i mod N, its stored hooks sent to rank 0, which
        // writes every shard in order (the shards one process writes).
        let owner = index % ranks;
        index += 1;
        if ranks == 1 {
            let out = model.runtime.forward(&tokens, true, false)?;
            prof.mark("forward");
            writer.push(&tokens, &out, &model.runtime)?;
        } else if rank == owner || rank == 0 {
            let mut bytes = Vec::new();
            let mut local = None;
            if rank == owner {
                let map = writer.stored(&model.runtime.forward(&tokens, true, false)?, &tokens, &model.runtime)?;
                if owner == 0 {
                    local = Some(map);
                } else {
                    bytes = safetensors::tensor::serialize(map.iter(), None)
                        .map_err(|e| Error::Usage(format!("serializing a batch for rank 0: {e}")))?;
                }
            }
            coll.send_to_root(owner, &mut bytes)?;
            if rank == 0 {
                let map = match local {
                    Some(m) => m,
                    None => candle_core::safetensors::load_buffer(&bytes, device)?,
                };
                writer.push_stored(&tokens, map)?;
            }
        }
        bar.inc(tokens.elem_count() as u64);
        prof.mark("store");
        prof.report("batch");
        prof = Profile::new();
    }
    if rank != 0 {
        return Ok(None);
    }
    writer.finish()?;
    bar.finish();
    let n_seqs = source.produced();
    if n_seqs == 0 {
        return Err(source.empty_error());
    }
    if let Some(l) = limit.filter(|&l| n_seqs < l) {
        crate::note!("collect-acts: warning: the data ran out after {n_seqs} of {l} sequences");
    }
    let total: usize = writer.shards.iter().map(|s| s.n_seqs).sum();
    let clean_ce = writer.shards.iter().map(|s| s.clean_ce * s.n_seqs as f64).sum::<f64>() / total as f64;
    let stats = source.stats().clone();
    let (kind, column) = match spec {
        SourceSpec::Text { column, .. } => ("text", Some(column.clone())),
        SourceSpec::Tokens { column, .. } => ("tokens", column.clone()),
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        model: ModelInfo::new(&cfg.model, &dir, &model.hash, &mcfg),
        ctx_len,
        prepend_bos: cfg.seq.prepend_bos,
        dtype: cfg.dtype,
        data: DataInfo {
            source: spec.path().display().to_string(),
            kind: kind.into(),
            column,
            pack: cfg.seq.pack,
            docs_read: stats.docs_read,
            docs_skipped_short: stats.docs_skipped_short,
            fingerprint: Some(data_fingerprint),
            skip_seqs: cfg.skip_seqs,
        },
        n_seqs,
        hooks: writer.hooks().to_vec(),
        shards: writer.shards.clone(),
        clean_ce,
        created_by: cfg.created_by.clone(),
    };
    let json =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Usage(format!("serializing the manifest: {e}")))?;
    let stage = stage.expect("rank 0 holds the stage");
    crate::util::io::write_atomic(&stage.path().join(MANIFEST), json.as_bytes())?;
    let out = stage.commit()?;
    Ok(Some(Collected { out, manifest, secs: start.elapsed().as_secs_f64() }))
}

/// Whole batches per shard, about 256 MiB each.
fn auto_shard_seqs(cfg: &ModelConfig, ctx: usize, dtype: StoreDType, batch: usize) -> usize {
    let per_layer = 2 * ctx + 4 * ctx * cfg.d_model + cfg.n_heads * ctx * ctx;
    let elems = ctx * cfg.d_model + cfg.n_layers * per_layer;
    let bytes = elems * dtype.dtype().size_in_bytes() + ctx * 8;
    let seqs = (256usize << 20) / bytes.max(1);
    (seqs / batch).max(1) * batch
}

/// Accumulates forward outputs and writes them as shards of about `shard_seqs` sequences.
pub struct ShardWriter {
    dir: PathBuf,
    hooks: Vec<String>,
    dtype: StoreDType,
    shard_seqs: usize,
    pending: Vec<HashMap<String, Tensor>>,
    pending_seqs: usize,
    pending_ce: Vec<Tensor>,
    /// The shard being written in the background, so disk I/O overlaps the next batches.
    writing: Option<std::thread::JoinHandle<Result<()>>>,
    pub shards: Vec<ShardInfo>,
}

impl ShardWriter {
    /// Write into `dir` (a staging folder) the hooks of `cfg`, cast to `dtype`.
    pub fn new(dir: &Path, cfg: &ModelConfig, dtype: StoreDType, shard_seqs: usize) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            hooks: cfg.hook_names(),
            dtype,
            shard_seqs: shard_seqs.max(1),
            pending: Vec::new(),
            pending_seqs: 0,
            pending_ce: Vec::new(),
            writing: None,
            shards: Vec::new(),
        }
    }

    /// The hook names written, in order.
    pub fn hooks(&self) -> &[String] {
        &self.hooks
    }

    /// Add one batch: its tokens `(batch, ctx)` and the forward pass of `rt` (run with hooks).
    pub fn push(&mut self, tokens: &Tensor, out: &ForwardOutput, rt: &Runtime) -> Result<()> {
        let map = self.stored(out, tokens, rt)?;
        self.push_stored(tokens, map)
    }

    /// The hooks of a forward pass as they are stored (in the cache's dtype), with the per-token
    /// clean CE and the zero-ablation CE (the CE of layer 0's input alone through the final LN
    /// and unembedding), both `(batch, ctx − 1)` f32: what evaluate reads instead of running
    /// the model again.
    pub fn stored(&self, out: &ForwardOutput, tokens: &Tensor, rt: &Runtime) -> Result<HashMap<String, Tensor>> {
        let dtype = self.dtype.dtype();
        let mut map = HashMap::new();
        map.insert("blocks.0.hook_resid_pre".to_string(), out.resid_pre0.to_dtype(dtype)?);
        for (l, layer) in out.layers.iter().enumerate() {
            for (suffix, t) in layer.named() {
                map.insert(format!("blocks.{l}.{suffix}"), t.to_dtype(dtype)?);
            }
        }
        map.insert(CLEAN_CE.to_string(), out.ce.to_dtype(DType::F32)?);
        let zero = rt.ce_from_resid(&out.resid_pre0, tokens)?;
        map.insert(ZERO_CE.to_string(), zero.to_dtype(DType::F32)?);
        Ok(map)
    }

    /// [`push`](Self::push) of a batch whose hooks were already made [`stored`](Self::stored)
    /// (here or on another rank).
    pub fn push_stored(&mut self, tokens: &Tensor, mut map: HashMap<String, Tensor>) -> Result<()> {
        let ce =
            map.get(CLEAN_CE).cloned().ok_or_else(|| Error::Usage("a stored batch without its clean CE".into()))?;
        let first = self.shards.iter().map(|s| s.n_seqs).sum::<usize>() + self.pending_seqs;
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        for name in names {
            let t = &map[name];
            // Checked as stored (f16 overflows at 65,504).
            if !crate::util::all_finite(t)? {
                return Err(Error::Usage(format!(
                    "hook `{name}` has NaN or infinite values ({} storage) in sequences {first}..{}; \
                     the model's activations overflow{}",
                    self.dtype.name(),
                    first + tokens.dim(0)?,
                    if self.dtype == StoreDType::F32 { "" } else { "; hint: --dtype f32" }
                )));
            }
        }
        map.insert("tokens".to_string(), tokens.to_dtype(DType::I64)?);
        self.pending_seqs += tokens.dim(0)?;
        self.pending.push(map);
        self.pending_ce.push(ce);
        if self.pending_seqs >= self.shard_seqs {
            self.flush()?;
        }
        Ok(())
    }

    /// Wait for the shard being written, if any.
    fn join_writer(&mut self) -> Result<()> {
        match self.writing.take() {
            Some(h) => h.join().map_err(|_| Error::Usage("the shard writer thread panicked".into()))?,
            None => Ok(()),
        }
    }

    /// Write whatever is pending as a shard and wait until every shard is on disk.
    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        self.join_writer()
    }

    /// Start writing whatever is pending as a shard (in the background).
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut names = self.hooks.clone();
        names.extend(["tokens".into(), CLEAN_CE.into(), ZERO_CE.into()]);
        let mut tensors: Vec<(String, Stacked)> = Vec::with_capacity(names.len());
        for name in names {
            let parts =
                self.pending.iter().map(|m| m[&name].to_device(&Device::Cpu)).collect::<candle_core::Result<_>>()?;
            tensors.push((name, Stacked::new(parts)?));
        }
        let ce = Tensor::cat(&self.pending_ce, 0)?.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
        let file = format!("shard-{:05}.safetensors", self.shards.len());
        let path = self.dir.join(&file);
        let meta: std::collections::BTreeMap<String, String> = [
            ("format".to_string(), format!("{FORMAT}-shard")),
            ("version".to_string(), VERSION.to_string()),
            ("dtype".to_string(), self.dtype.name().to_string()),
        ]
        .into();
        self.join_writer()?;
        self.writing = Some(std::thread::spawn(move || crate::util::io::write_safetensors(&path, tensors, &meta)));
        self.shards.push(ShardInfo { file, n_seqs: self.pending_seqs, clean_ce: ce });
        self.pending.clear();
        self.pending_ce.clear();
        self.pending_seqs = 0;
        Ok(())
    }
}

/// One tensor of a shard: its batches stacked along the first axis as the shard is written,
/// one tensor's bytes at a time (a shard used to be concatenated whole first: 262 MB more at
/// TinyStories-33M shape, whose first touch took 2.4 s of a 13 s run on a slow-faulting VM).
struct Stacked {
    parts: Vec<Tensor>,
    shape: Vec<usize>,
}

impl Stacked {
    /// Parts of one dtype and the same shape past the first axis (host tensors).
    fn new(parts: Vec<Tensor>) -> Result<Stacked> {
        let first = parts.first().ok_or_else(|| Error::Usage("an empty shard tensor".into()))?;
        if let Some(t) = parts.iter().find(|t| t.dtype() != first.dtype() || t.dims().get(1..) != first.dims().get(1..))
        {
            return Err(Error::Usage(format!(
                "a shard's batches disagree: {:?} {:?} beside {:?} {:?}",
                first.dtype(),
                first.dims(),
                t.dtype(),
                t.dims()
            )));
        }
        let mut shape = first.dims().to_vec();
        shape[0] = parts.iter().map(|t| t.dim(0)).sum::<candle_core::Result<usize>>()?;
        Ok(Stacked { parts, shape })
    }
}

impl safetensors::View for Stacked {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::View::dtype(&self.parts[0])
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut out = Vec::with_capacity(self.data_len());
        for t in &self.parts {
            out.extend_from_slice(&safetensors::View::data(&t));
        }
        out.into()
    }

    fn data_len(&self) -> usize {
        self.parts.iter().map(safetensors::View::data_len).sum()
    }
}
