//! Batches of token rows for the model: what `collect-acts` caches, and what training tools
//! stream when they compute activations on the fly instead of reading a cache.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::data::docs::{self, SequenceOptions, SequenceStats, Sequencer};
use crate::error::{Error, Result};
use crate::model::tokenize::TextTokenizer;

/// Where tokens come from.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// Documents of text in a `.parquet` / `.jsonl` / `.jsonl.zst` / `.txt` file.
    Text { path: PathBuf, column: String },
    /// Pre-tokenized rows in a `.parquet` list column or a `.safetensors` `tokens` tensor.
    Tokens { path: PathBuf, column: Option<String> },
}

impl SourceSpec {
    /// The file read.
    pub fn path(&self) -> &Path {
        match self {
            SourceSpec::Text { path, .. } | SourceSpec::Tokens { path, .. } => path,
        }
    }
}

/// Yields `(batch, ctx_len)` u32 token tensors until `limit` rows or the data run out.
pub struct BatchSource<'a> {
    seq: Sequencer<'a>,
    batch_size: usize,
    limit: Option<usize>,
    produced: usize,
    d_vocab: usize,
    ctx_len: usize,
    path: PathBuf,
}

impl<'a> BatchSource<'a> {
    /// Open `spec`. Text needs `tokenizer`. Fails before reading any row if the file cannot
    /// be opened or lacks the column.
    pub fn open(
        spec: &SourceSpec,
        tokenizer: &'a TextTokenizer,
        opts: SequenceOptions,
        batch_size: usize,
        limit: Option<usize>,
        d_vocab: usize,
    ) -> Result<BatchSource<'a>> {
        let docs = match spec {
            SourceSpec::Text { path, column } => docs::open_texts(path, column)?,
            SourceSpec::Tokens { path, column } => docs::open_tokens(path, column.as_deref())?,
        };
        let seq = Sequencer::new(docs, Some(tokenizer), opts, tokenizer.bos, tokenizer.eos);
        Ok(BatchSource {
            seq,
            batch_size: batch_size.max(1),
            limit,
            produced: 0,
            d_vocab,
            ctx_len: opts.ctx_len,
            path: spec.path().to_path_buf(),
        })
    }

    /// The next batch (possibly shorter at the end), or `None`.
    pub fn next_batch(&mut self, device: &Device) -> Result<Option<Tensor>> {
        let want = match self.limit {
            Some(l) => self.batch_size.min(l - self.produced.min(l)),
            None => self.batch_size,
        };
        let mut rows: Vec<u32> = Vec::with_capacity(want * self.ctx_len);
        let mut n = 0;
        while n < want {
            let Some(row) = self.next_row()? else { break };
            rows.extend(row);
            n += 1;
        }
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(rows, (n, self.ctx_len), device)?))
    }

    /// The next single row (ids checked against the vocabulary), or `None`.
    pub fn next_row(&mut self) -> Result<Option<Vec<u32>>> {
        let Some(row) = self.seq.next_row()? else { return Ok(None) };
        if let Some(&bad) = row.iter().find(|&&t| t as usize >= self.d_vocab) {
            return Err(Error::input(
                &self.path,
                format!("token id {bad} is outside the model's vocabulary (d_vocab {})", self.d_vocab),
            ));
        }
        self.produced += 1;
        Ok(Some(row))
    }

    /// Read and drop the next `n` rows (not counted as produced); returns how many there were.
    pub fn skip(&mut self, n: u64) -> Result<u64> {
        for i in 0..n {
            if self.seq.next_row()?.is_none() {
                return Ok(i);
            }
        }
        Ok(n)
    }

    /// Rows produced so far.
    pub fn produced(&self) -> usize {
        self.produced
    }

    /// Documents read and skipped so far.
    pub fn stats(&self) -> &SequenceStats {
        &self.seq.stats
    }

    /// The error for a source that gave no row at all.
    pub fn empty_error(&self) -> Error {
        let s = &self.seq.stats;
        Error::input(
            &self.path,
            format!(
                "no sequence of {} tokens: {} documents read, {} shorter than that skipped; \
                 hint: use --pack or a smaller --ctx-len",
                self.ctx_len, s.docs_read, s.docs_skipped_short
            ),
        )
    }
}
