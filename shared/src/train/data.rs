//! Batches for training tools: read from an activation cache, or computed on the fly from a
//! model and a dataset (the same code path as `collect-acts`, batch by batch), for runs whose
//! activations would not fit on disk.
//!
//! Both are addressed by the number of sequences consumed so far (`seqs_seen`), which is what
//! a checkpoint stores, so a resumed run reads exactly the data an uninterrupted one would.
//! When the data run out, they start again from the beginning (the reference's buffer restarts
//! its dataset the same way).

use candle_core::{Device, Tensor};

use crate::data::docs::SequenceOptions;
use crate::data::source::{BatchSource, SourceSpec};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::formats::cache::{Cache, CacheReader};
use crate::model::tokenize::TextTokenizer;
use crate::model::Model;

/// Where training batches come from.
pub enum TrainData<'a> {
    /// A cache, in cache order or shuffled per shard and epoch.
    Cache { cache: &'a Cache, reader: CacheReader<'a>, shuffle: bool, seed: u64, epoch: u64, order: Vec<usize> },
    /// A model run over a dataset.
    Stream {
        model: &'a Model,
        tokenizer: &'a TextTokenizer,
        spec: SourceSpec,
        opts: SequenceOptions,
        source: Option<BatchSource<'a>>,
        at: u64,
        device: Device,
    },
}

impl<'a> TrainData<'a> {
    /// Read batches from `cache`.
    pub fn from_cache(cache: &'a Cache, shuffle: bool, seed: u64, device: &Device) -> TrainData<'a> {
        TrainData::Cache {
            cache,
            reader: CacheReader::new(cache, device),
            shuffle,
            seed,
            epoch: u64::MAX,
            order: Vec::new(),
        }
    }

    /// Compute batches by running `model` (with its `tokenizer`) over `spec`. Fails early if
    /// the data cannot be opened or ctx_len exceeds the model's context.
    pub fn streaming(
        model: &'a Model,
        tokenizer: &'a TextTokenizer,
        spec: SourceSpec,
        opts: SequenceOptions,
        device: &Device,
    ) -> Result<TrainData<'a>> {
        if opts.ctx_len > model.cfg().n_ctx {
            return Err(Error::Usage(format!(
                "--ctx-len {}: above the model's n_ctx {}",
                opts.ctx_len,
                model.cfg().n_ctx
            )));
        }
        // Open now so that a bad file or column fails before any training; the first batch
        // reads from this source.
        let source = BatchSource::open(&spec, tokenizer, opts, 1, None, model.cfg().d_vocab)?;
        Ok(TrainData::Stream { model, tokenizer, spec, opts, source: Some(source), at: 0, device: device.clone() })
    }

    /// Tokens per sequence.
    pub fn ctx_len(&self) -> usize {
        match self {
            TrainData::Cache { cache, .. } => cache.manifest.ctx_len,
            TrainData::Stream { opts, .. } => opts.ctx_len,
        }
    }

    /// The batch of `n` sequences starting after `seqs_seen` consumed ones.
    pub fn batch(&mut self, seqs_seen: u64, n: usize) -> Result<Batch> {
        self.batch_part(seqs_seen, n, 0, n)
    }

    /// Sequences `first..first + len` of [`batch`](Self::batch)`(seqs_seen, n)` (one rank's
    /// slice of a data-parallel step): read, or computed, only for those sequences.
    pub fn batch_part(&mut self, seqs_seen: u64, n: usize, first: usize, len: usize) -> Result<Batch> {
        match self {
            TrainData::Cache { cache, reader, shuffle, seed, epoch, order } => {
                let total = cache.manifest.n_seqs as u64;
                let mut seqs = Vec::with_capacity(len);
                for j in first as u64..(first + len) as u64 {
                    let g = seqs_seen + j;
                    if g / total != *epoch {
                        *epoch = g / total;
                        *order = cache.epoch_order(*epoch, *shuffle, *seed);
                    }
                    seqs.push(order[(g % total) as usize]);
                }
                reader.batch(&seqs)
            }
            TrainData::Stream { model, tokenizer, spec, opts, source, at, device } => {
                let tok: &'a TextTokenizer = tokenizer;
                let d_vocab = model.cfg().d_vocab;
                let open = || BatchSource::open(spec, tok, *opts, 1, None, d_vocab);
                // The next row, reopening the data at its end (fresh data without a row is an
                // error).
                let next_row = |s: &mut BatchSource<'a>| -> Result<Vec<u32>> {
                    if let Some(r) = s.next_row()? {
                        return Ok(r);
                    }
                    *s = open()?;
                    s.next_row()?.ok_or_else(|| s.empty_error())
                };
                if source.is_none() || *at != seqs_seen {
                    let mut s = open()?;
                    for _ in 0..seqs_seen {
                        next_row(&mut s)?;
                    }
                    *source = Some(s);
                }
                let s = source.as_mut().expect("opened");
                let mut rows: Vec<u32> = Vec::with_capacity(len * opts.ctx_len);
                for j in 0..n {
                    let row = next_row(s)?;
                    if (first..first + len).contains(&j) {
                        rows.extend(row);
                    }
                }
                *at = seqs_seen + n as u64;
                let tokens = Tensor::from_vec(rows, (len, opts.ctx_len), device)?;
                let out = model.runtime.forward(&tokens, true, false)?;
                Batch::from_forward(&tokens, &out)
            }
        }
    }
}
