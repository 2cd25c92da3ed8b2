//! Documents in, fixed-length token sequences out.
//!
//! Sources (chosen by extension): HF-style `.parquet` with a text column, `.jsonl` and
//! `.jsonl.zst` (one JSON object per line, as the Pile ships), `.txt` (one document per
//! line), or pre-tokenized ids: a `.parquet` list-of-integers column, or a `.safetensors`
//! file with a `tokens` tensor `(n_seqs, ctx)`.
//!
//! [`Sequencer`] turns documents into `ctx_len`-token rows like the reference buffer: with BOS
//! prepended (optional), documents shorter than `ctx_len` skipped, longer ones truncated. With
//! `pack`, documents are instead concatenated with EOS between them and cut into rows, so no
//! data is wasted.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::{Error, IoContext, Result};
use crate::model::tokenize::TextTokenizer;

/// One document: raw text, or token ids that are already tokenized.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    Text(String),
    Tokens(Vec<u32>),
}

/// A stream of documents from a file.
pub type DocStream = Box<dyn Iterator<Item = Result<Doc>>>;

/// Open a text dataset (`.parquet`, `.jsonl`, `.jsonl.zst`, `.txt`).
///
/// Fails at once if the file is missing, of an unknown type, or (parquet) lacks `column`.
pub fn open_texts(path: &Path, column: &str) -> Result<DocStream> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    if !path.is_file() {
        return Err(Error::input(path, "--data: no such file"));
    }
    if name.ends_with(".parquet") {
        parquet_column(path, Some(column), ColumnKind::Text)
    } else if name.ends_with(".jsonl.zst") || name.ends_with(".json.zst") {
        let file = File::open(path).at(path)?;
        let dec = zstd::stream::read::Decoder::new(file).at(path)?;
        Ok(jsonl(path, Box::new(BufReader::new(dec)), column))
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        let file = File::open(path).at(path)?;
        Ok(jsonl(path, Box::new(BufReader::new(file)), column))
    } else if name.ends_with(".txt") {
        let file = File::open(path).at(path)?;
        let p = path.to_path_buf();
        Ok(Box::new(BufReader::new(file).lines().filter_map(move |line| match line {
            Ok(l) if l.trim().is_empty() => None,
            Ok(l) => Some(Ok(Doc::Text(l))),
            Err(e) => Some(Err(Error::io(&p, e))),
        })))
    } else {
        Err(Error::input(path, "--data: expected a .parquet, .jsonl, .jsonl.zst or .txt file"))
    }
}

/// Open pre-tokenized data (`.parquet` list-of-integers column, or `.safetensors` with a
/// `tokens` tensor). `column` names the parquet column; `None` picks `tokens` or `input_ids`.
pub fn open_tokens(path: &Path, column: Option<&str>) -> Result<DocStream> {
    if !path.is_file() {
        return Err(Error::input(path, "--tokens: no such file"));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => parquet_column(path, column, ColumnKind::Tokens),
        Some("safetensors") => safetensors_tokens(path),
        _ => Err(Error::input(path, "--tokens: expected a .parquet or .safetensors file")),
    }
}

fn jsonl(path: &Path, reader: Box<dyn BufRead>, column: &str) -> DocStream {
    let path = path.to_path_buf();
    let column = column.to_string();
    Box::new(reader.lines().enumerate().filter_map(move |(i, line)| {
        let line = match line {
            Ok(l) => l,
            Err(e) => return Some(Err(Error::input(&path, format!("line {}: cannot read: {e}", i + 1)))),
        };
        if line.trim().is_empty() {
            return None;
        }
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => return Some(Err(Error::input(&path, format!("line {}: not valid JSON: {e}", i + 1)))),
        };
        match v.get(&column) {
            Some(serde_json::Value::String(s)) => Some(Ok(Doc::Text(s.clone()))),
            Some(other) => Some(Err(Error::input(
                &path,
                format!("line {}: field `{column}`: expected a string, found {}", i + 1, json_kind(other)),
            ))),
            None => Some(Err(Error::input(
                &path,
                format!(
                    "line {}: no field `{column}` (fields: {}); hint: choose one with --text-column",
                    i + 1,
                    v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default()
                ),
            ))),
        }
    }))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

#[derive(Clone, Copy, PartialEq)]
enum ColumnKind {
    Text,
    Tokens,
}

fn parquet_column(path: &Path, column: Option<&str>, kind: ColumnKind) -> Result<DocStream> {
    let file = File::open(path).at(path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::input(path, format!("not a readable parquet file: {e}")))?;
    let fields: Vec<String> = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
    let column = match column {
        Some(c) => c.to_string(),
        None => {
            ["tokens", "input_ids"].iter().find(|c| fields.iter().any(|f| f == *c)).map(|c| c.to_string()).ok_or_else(
                || {
                    Error::input(
                        path,
                        format!(
                            "no column `tokens` or `input_ids` (columns: {}); hint: --tokens-column",
                            fields.join(", ")
                        ),
                    )
                },
            )?
        }
    };
    let Some(idx) = fields.iter().position(|f| *f == column) else {
        let flag = if kind == ColumnKind::Text { "--text-column" } else { "--tokens-column" };
        return Err(Error::input(
            path,
            format!("no column `{column}` (columns: {}); hint: choose one with {flag}", fields.join(", ")),
        ));
    };
    let dtype = builder.schema().field(idx).data_type().clone();
    let ok = match kind {
        ColumnKind::Text => matches!(dtype, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
        ColumnKind::Tokens => match &dtype {
            DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => f.data_type().is_integer(),
            _ => false,
        },
    };
    if !ok {
        let want = if kind == ColumnKind::Text { "strings" } else { "lists of integers" };
        return Err(Error::input(path, format!("column `{column}`: expected {want}, found {dtype}")));
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(|e| Error::input(path, format!("cannot read column `{column}`: {e}")))?;
    let path = path.to_path_buf();
    Ok(Box::new(reader.flat_map(move |batch| -> Vec<Result<Doc>> {
        match batch {
            Ok(b) => docs_from_batch(&path, &b, kind),
            Err(e) => vec![Err(Error::input(&path, format!("corrupt parquet data: {e}")))],
        }
    })))
}

fn docs_from_batch(path: &PathBuf, batch: &RecordBatch, kind: ColumnKind) -> Vec<Result<Doc>> {
    let col: &ArrayRef = batch.column(0);
    let n = col.len();
    let mut out = Vec::with_capacity(n);
    match kind {
        ColumnKind::Text => {
            let casted = match arrow_cast_utf8(col) {
                Ok(c) => c,
                Err(e) => return vec![Err(Error::input(path, e))],
            };
            for i in 0..n {
                if !casted.is_null(i) {
                    out.push(Ok(Doc::Text(casted.value(i).to_string())));
                }
            }
        }
        ColumnKind::Tokens => {
            for i in 0..n {
                if col.is_null(i) {
                    continue;
                }
                out.push(list_row_ids(col, i).map(Doc::Tokens).map_err(|e| Error::input(path, e)));
            }
        }
    }
    out
}

fn arrow_cast_utf8(col: &ArrayRef) -> std::result::Result<arrow_array::StringArray, String> {
    use arrow_array::cast::AsArray;
    match col.data_type() {
        DataType::Utf8 => Ok(col.as_string::<i32>().clone()),
        DataType::LargeUtf8 => Ok(col.as_string::<i64>().iter().collect()),
        DataType::Utf8View => Ok(col.as_string_view().iter().collect()),
        other => Err(format!("expected strings, found {other}")),
    }
}

fn list_row_ids(col: &ArrayRef, i: usize) -> std::result::Result<Vec<u32>, String> {
    use arrow_array::cast::AsArray;
    let values: ArrayRef = match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().value(i),
        DataType::LargeList(_) => col.as_list::<i64>().value(i),
        DataType::FixedSizeList(_, _) => col.as_fixed_size_list().value(i),
        other => return Err(format!("expected lists of integers, found {other}")),
    };
    let as_i64 = crate::util::table::int_values(&values).map_err(|e| format!("token ids: {e}"))?;
    as_i64
        .into_iter()
        .map(|v| match v {
            Some(v) if (0..=u32::MAX as i64).contains(&v) => Ok(v as u32),
            Some(v) => Err(format!("row {i}: token id {v} is out of range")),
            None => Err(format!("row {i}: null token id")),
        })
        .collect()
}

fn safetensors_tokens(path: &Path) -> Result<DocStream> {
    let bytes = std::fs::read(path).at(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::input(path, format!("not a readable safetensors file: {e}")))?;
    let view = st.tensor("tokens").map_err(|_| {
        let names: Vec<String> = st.names().into_iter().map(String::from).collect();
        Error::input(path, format!("no tensor `tokens` (tensors: {})", names.join(", ")))
    })?;
    let shape = view.shape().to_vec();
    if shape.len() != 2 {
        return Err(Error::input(path, format!("tensor `tokens`: expected shape (n_seqs, ctx), found {shape:?}")));
    }
    use safetensors::Dtype;
    let data = view.data();
    let ids: Vec<i64> = match view.dtype() {
        Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        Dtype::I32 => data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect(),
        Dtype::U32 => data.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect(),
        Dtype::U16 => data.chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().expect("2 bytes")) as i64).collect(),
        other => {
            return Err(Error::input(path, format!("tensor `tokens`: expected an integer dtype, found {other:?}")))
        }
    };
    if let Some(bad) = ids.iter().find(|&&v| v < 0 || v > u32::MAX as i64) {
        return Err(Error::input(path, format!("tensor `tokens`: token id {bad} is out of range")));
    }
    let ctx = shape[1];
    let rows: Vec<Result<Doc>> =
        ids.chunks(ctx.max(1)).map(|r| Ok(Doc::Tokens(r.iter().map(|&v| v as u32).collect()))).collect();
    Ok(Box::new(rows.into_iter()))
}

/// How documents become rows.
#[derive(Debug, Clone, Copy)]
pub struct SequenceOptions {
    pub ctx_len: usize,
    pub prepend_bos: bool,
    /// Concatenate documents separated by EOS instead of skipping short ones.
    pub pack: bool,
}

/// Counters of what the sequencer did, for the manifest and for error messages.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SequenceStats {
    pub docs_read: u64,
    pub docs_skipped_short: u64,
}

/// Turns a [`DocStream`] into rows of exactly `ctx_len` tokens.
pub struct Sequencer<'a> {
    docs: DocStream,
    tokenizer: Option<&'a TextTokenizer>,
    opts: SequenceOptions,
    bos: u32,
    eos: u32,
    packed: Vec<u32>,
    pub stats: SequenceStats,
}

impl<'a> Sequencer<'a> {
    /// `tokenizer` is needed for text documents; `bos`/`eos` are the model's ids.
    pub fn new(
        docs: DocStream,
        tokenizer: Option<&'a TextTokenizer>,
        opts: SequenceOptions,
        bos: u32,
        eos: u32,
    ) -> Self {
        Sequencer { docs, tokenizer, opts, bos, eos, packed: Vec::new(), stats: SequenceStats::default() }
    }

    fn doc_ids(&self, doc: Doc) -> Result<Vec<u32>> {
        match doc {
            Doc::Tokens(t) => Ok(t),
            Doc::Text(s) => match self.tokenizer {
                Some(t) => t.encode(&s),
                None => Err(Error::Usage("text documents need a tokenizer".into())),
            },
        }
    }

    /// The next row, or `None` when the documents run out.
    pub fn next_row(&mut self) -> Result<Option<Vec<u32>>> {
        let ctx = self.opts.ctx_len;
        let bos_len = usize::from(self.opts.prepend_bos);
        loop {
            if self.opts.pack && self.packed.len() >= ctx - bos_len {
                let mut row = Vec::with_capacity(ctx);
                if self.opts.prepend_bos {
                    row.push(self.bos);
                }
                row.extend(self.packed.drain(..ctx - bos_len));
                return Ok(Some(row));
            }
            let Some(doc) = self.docs.next() else { return Ok(None) };
            let ids = self.doc_ids(doc?)?;
            self.stats.docs_read += 1;
            if self.opts.pack {
                self.packed.extend(ids);
                self.packed.push(self.eos);
                continue;
            }
            if ids.len() + bos_len < ctx {
                self.stats.docs_skipped_short += 1;
                continue;
            }
            let mut row = Vec::with_capacity(ctx);
            if self.opts.prepend_bos {
                row.push(self.bos);
            }
            row.extend_from_slice(&ids[..ctx - bos_len]);
            return Ok(Some(row));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(rows: &[&[u32]]) -> DocStream {
        let v: Vec<Result<Doc>> = rows.iter().map(|r| Ok(Doc::Tokens(r.to_vec()))).collect();
        Box::new(v.into_iter())
    }

    fn drain(mut s: Sequencer) -> Vec<Vec<u32>> {
        let mut out = vec![];
        while let Some(r) = s.next_row().unwrap() {
            out.push(r);
        }
        out
    }

    #[test]
    fn skips_short_documents_and_truncates_long_ones() {
        let opts = SequenceOptions { ctx_len: 4, prepend_bos: true, pack: false };
        let s = Sequencer::new(toks(&[&[1, 2], &[1, 2, 3], &[5, 6, 7, 8, 9]]), None, opts, 0, 99);
        assert_eq!(drain(s), vec![vec![0, 1, 2, 3], vec![0, 5, 6, 7]]);
    }

    #[test]
    fn packs_documents_with_eos() {
        let opts = SequenceOptions { ctx_len: 3, prepend_bos: false, pack: true };
        let s = Sequencer::new(toks(&[&[1, 2], &[3], &[4, 5, 6]]), None, opts, 0, 9);
        // stream: 1 2 9 3 9 4 5 6 9
        assert_eq!(drain(s), vec![vec![1, 2, 9], vec![3, 9, 4], vec![5, 6, 9]]);
    }
}
