//! Small helpers for parquet tables (edges, connections): write with key-value metadata via
//! `<path>.tmp`, read whole, and pull typed columns with errors that name the column.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, IoContext, Result};

/// Write `columns` as one parquet file with `meta` in its key-value metadata.
pub fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>, meta: &[(&str, String)]) -> Result<()> {
    let batch = RecordBatch::try_from_iter(columns).map_err(|e| Error::Usage(format!("building table: {e}")))?;
    let kv: Vec<KeyValue> = meta.iter().map(|(k, v)| KeyValue::new(k.to_string(), v.clone())).collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(kv))
        .build();
    crate::util::io::write_via_tmp(path, |tmp| {
        let file = std::fs::File::create(tmp).at(tmp)?;
        let fail = |e: parquet::errors::ParquetError| Error::input(tmp, format!("cannot write parquet: {e}"));
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(fail)?;
        w.write(&batch).map_err(fail)?;
        w.close().map_err(fail)?;
        Ok(())
    })
}

/// Read every record batch of a parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| Error::input(path, format!("cannot open: {e}")))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::input(path, format!("not a readable parquet file: {e}")))?
        .with_batch_size(65536)
        .build()
        .map_err(|e| Error::input(path, format!("not a readable parquet file: {e}")))?;
    reader.map(|b| b.map_err(|e| Error::input(path, format!("corrupt parquet data: {e}")))).collect()
}

/// The key-value metadata of a parquet file.
pub fn parquet_metadata(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::input(path, format!("cannot open: {e}")))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::input(path, format!("not a readable parquet file: {e}")))?;
    let kv = b.metadata().file_metadata().key_value_metadata().cloned().unwrap_or_default();
    Ok(kv.into_iter().map(|k| (k.key, k.value.unwrap_or_default())).collect())
}

fn no_nulls(path: &Path, name: &str, c: &ArrayRef) -> Result<()> {
    if c.null_count() > 0 {
        return Err(Error::input(path, format!("column `{name}`: {} null values, expected none", c.null_count())));
    }
    Ok(())
}

/// A utf8 column as strings.
pub fn strings(path: &Path, name: &str, c: &ArrayRef) -> Result<Vec<String>> {
    let (names, codes) = string_codes(path, name, c)?;
    Ok(codes.into_iter().map(|k| names[k as usize].clone()).collect())
}

/// A string column as codes into its distinct values (in order of first appearance): a column of
/// a few names over many rows (module names of millions of edges) without a String per row.
pub fn string_codes(path: &Path, name: &str, c: &ArrayRef) -> Result<(Vec<String>, Vec<u32>)> {
    no_nulls(path, name, c)?;
    Ok(match c.data_type() {
        DataType::Utf8 => codes_of(c.as_string::<i32>().iter()),
        DataType::LargeUtf8 => codes_of(c.as_string::<i64>().iter()),
        DataType::Utf8View => codes_of(c.as_string_view().iter()),
        // Pandas writes categorical columns as dictionaries: their values are the names.
        DataType::Dictionary(_, _) => {
            let fail = |e: String| Error::input(path, format!("column `{name}`: {e}"));
            let dict = c.as_any_dictionary_opt().ok_or_else(|| fail("expected a dictionary".into()))?;
            let names = strings_plain(dict.values()).map_err(fail)?;
            (names, dict.normalized_keys().into_iter().map(|k| k as u32).collect())
        }
        other => return Err(Error::input(path, format!("column `{name}`: expected strings, found {other}"))),
    })
}

/// [`string_codes`] of the values of a column.
fn codes_of<'a>(values: impl Iterator<Item = Option<&'a str>>) -> (Vec<String>, Vec<u32>) {
    let mut index: rustc_hash::FxHashMap<&'a str, u32> = Default::default();
    let mut distinct = Vec::new();
    let codes = values
        .map(|s| {
            let s = s.unwrap_or("");
            *index.entry(s).or_insert_with(|| {
                distinct.push(s.to_string());
                distinct.len() as u32 - 1
            })
        })
        .collect();
    (distinct, codes)
}

fn strings_plain(c: &ArrayRef) -> std::result::Result<Vec<String>, String> {
    match c.data_type() {
        DataType::Utf8 => Ok(c.as_string::<i32>().iter().map(|s| s.unwrap_or("").to_string()).collect()),
        DataType::LargeUtf8 => Ok(c.as_string::<i64>().iter().map(|s| s.unwrap_or("").to_string()).collect()),
        other => Err(format!("expected strings, found {other}")),
    }
}

/// An integer array (any width, signed or not) as i64 values (`None` for nulls; u64 values
/// above i64::MAX saturate).
pub fn int_values(c: &ArrayRef) -> std::result::Result<Vec<Option<i64>>, String> {
    use arrow_array::types::*;
    macro_rules! conv {
        ($t:ty) => {
            c.as_primitive::<$t>().iter().map(|v| v.map(|x| x as i64)).collect()
        };
    }
    Ok(match c.data_type() {
        DataType::Int8 => conv!(Int8Type),
        DataType::Int16 => conv!(Int16Type),
        DataType::Int32 => conv!(Int32Type),
        DataType::Int64 => conv!(Int64Type),
        DataType::UInt8 => conv!(UInt8Type),
        DataType::UInt16 => conv!(UInt16Type),
        DataType::UInt32 => conv!(UInt32Type),
        DataType::UInt64 => {
            c.as_primitive::<UInt64Type>().iter().map(|v| v.map(|x| x.min(i64::MAX as u64) as i64)).collect()
        }
        other => return Err(format!("expected integers, found {other}")),
    })
}

/// An integer column (any width, signed or not) as i64; nulls are an error.
pub fn ints(path: &Path, name: &str, c: &ArrayRef) -> Result<Vec<i64>> {
    no_nulls(path, name, c)?;
    let vals = int_values(c).map_err(|e| Error::input(path, format!("column `{name}`: {e}")))?;
    Ok(vals.into_iter().map(|v| v.unwrap_or(0)).collect())
}

/// A float column as f32 (nulls become NaN).
pub fn floats(path: &Path, name: &str, c: &ArrayRef) -> Result<Vec<f32>> {
    use arrow_array::types::*;
    let out: Vec<f32> = match c.data_type() {
        DataType::Float32 => c.as_primitive::<Float32Type>().iter().map(|v| v.unwrap_or(f32::NAN)).collect(),
        DataType::Float64 => {
            c.as_primitive::<Float64Type>().iter().map(|v| v.map(|x| x as f32).unwrap_or(f32::NAN)).collect()
        }
        other => return Err(Error::input(path, format!("column `{name}`: expected floats, found {other}"))),
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A column's codes name its rows' strings, plain or as pandas' dictionary (categorical)
    /// columns write them; nulls are refused with the column named.
    #[test]
    fn string_codes_name_every_row() {
        let rows = ["mlp_1", "attn_0", "mlp_1", "embed", "attn_0"];
        let plain: ArrayRef = std::sync::Arc::new(arrow_array::StringArray::from(rows.to_vec()));
        let dict: ArrayRef = std::sync::Arc::new(
            rows.iter().copied().collect::<arrow_array::DictionaryArray<arrow_array::types::Int32Type>>(),
        );
        let path = Path::new("t.parquet");
        for c in [&plain, &dict] {
            let (names, codes) = string_codes(path, "m", c).unwrap();
            let back: Vec<&str> = codes.iter().map(|&k| names[k as usize].as_str()).collect();
            assert_eq!(back, rows);
            assert_eq!(strings(path, "m", c).unwrap(), rows);
        }
        assert_eq!(string_codes(path, "m", &plain).unwrap().0, ["mlp_1", "attn_0", "embed"]);
        let nulls: ArrayRef = std::sync::Arc::new(arrow_array::StringArray::from(vec![Some("a"), None]));
        let e = string_codes(path, "m", &nulls).unwrap_err().to_string();
        assert!(e.contains("column `m`: 1 null values"), "{e}");
    }
}
