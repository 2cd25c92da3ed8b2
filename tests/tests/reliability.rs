//! Faults and malformed inputs, one table row each: the exit code, a one-line message naming the
//! file or flag, and that no output is left behind; kills at each point of the checkpoint swap
//! (and of an output folder's swap) followed by `--resume`, which must end bit-identical to an
//! uninterrupted run; a closed or full stdout; byte-identical outputs of repeated runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor};
use scae_testkit::{bin_dir, fixture_model, fixture_suite, fixtures, golden_cache, s, scratch, tool, tool_ok};

/// One malformed input or fault: the tool's arguments, the exit code, the words its one-line
/// message must contain, and the outputs that must not exist afterwards.
struct Row {
    what: &'static str,
    tool: &'static str,
    args: Vec<String>,
    code: i32,
    needles: Vec<&'static str>,
    absent: Vec<PathBuf>,
}

fn check(row: &Row) {
    let args: Vec<&str> = row.args.iter().map(String::as_str).collect();
    let o = tool(row.tool, &args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let ctx = format!("[{}] {} {args:?}\nstderr: {err}", row.what, row.tool);
    assert_eq!(o.status.code(), Some(row.code), "{ctx}");
    assert!(!err.contains("panicked"), "{ctx}");
    if row.code == 1 {
        assert!(err.starts_with(&format!("{}: ", row.tool)), "{ctx}");
        assert_eq!(scae_testkit::error_lines(&err, row.tool).len(), 1, "one line: {ctx}");
    }
    for n in &row.needles {
        assert!(err.contains(n), "expected `{n}`: {ctx}");
    }
    for p in &row.absent {
        assert!(!p.exists(), "{} was left behind: {ctx}", p.display());
        assert!(!scae::util::io::sibling(p, ".tmp").exists(), "{}.tmp was left behind: {ctx}", p.display());
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of cache `acts` at `to` with `edit` applied to its manifest.
fn edited_cache(acts: &Path, to: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    copy_dir(acts, to);
    let p = to.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&p, m.to_string()).unwrap();
    to.to_path_buf()
}

/// A copy of a safetensors file with tensor `name` replaced by `f(tensor)`.
fn edited_tensors(from: &Path, to: &Path, name: &str, f: impl FnOnce(&Tensor) -> Tensor) {
    let mut t = candle_core::safetensors::load(from, &Device::Cpu).unwrap();
    let x = f(&t[name]);
    t.insert(name.to_string(), x);
    candle_core::safetensors::save(&t, to).unwrap();
}

#[test]
fn malformed_inputs_and_sizes_are_refused_with_one_line() {
    let tmp = scratch("rel-table");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let suite = fixture_suite("tiny-gpt2");
    let out = tmp.join("out");
    let ft = |extra: &[&str]| {
        let mut a = strings(&["--acts", s(&acts), "--suite", s(&suite), "--out", s(&out), "--batch-size", "3"]);
        a.extend(strings(extra));
        a
    };
    let ts = |acts: &Path, extra: &[&str]| {
        let mut a = strings(&["--acts", s(acts), "--out", s(&out), "--batch-size", "3", "--k", "4"]);
        a.extend(strings(extra));
        a
    };
    // (3) a manifest claiming more sequences than its shards hold.
    let more = edited_cache(&acts, &tmp.join("acts-more"), |m| m["n_seqs"] = 99.into());
    // (3) a shard claiming more sequences than its tensors hold.
    let shard_more = edited_cache(&acts, &tmp.join("acts-shard-more"), |m| {
        m["n_seqs"] = 4.into();
        m["shards"][0]["n_seqs"] = 4.into();
    });
    // (11) a cache tensor of the wrong dtype.
    let wrong_dtype = edited_cache(&acts, &tmp.join("acts-i64"), |_| ());
    let shard = wrong_dtype.join("shard-00000.safetensors");
    edited_tensors(&shard, &shard, "blocks.0.hook_attn_out", |t| t.to_dtype(DType::I64).unwrap());
    // (8) a model with a NaN weight.
    let nan_model = tmp.join("nan-model");
    copy_dir(&fixture_model("tiny-gpt2"), &nan_model);
    let w = nan_model.join("model.safetensors");
    edited_tensors(&w, &w, "transformer.h.0.mlp.c_fc.weight", |t| {
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[5] = f32::NAN;
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    });
    // (8) a finite model whose activations overflow f16 storage.
    let big_model = tmp.join("big-model");
    copy_dir(&fixture_model("tiny-gpt2"), &big_model);
    let w = big_model.join("model.safetensors");
    edited_tensors(&w, &w, "transformer.wte.weight", |t| t.affine(1e9, 0.0).unwrap());
    // (12) suite folders whose config.json contradicts their tensors.
    let folder = tmp.join("suite-folder");
    tool_ok("train-suite", &["--acts", s(&acts), "--out", s(&folder), "--steps", "1", "--batch-size", "3", "--k", "4"]);
    let bad_cfg = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let to = tmp.join(name);
        copy_dir(&folder, &to);
        let p = to.join("config.json");
        let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(&p, c.to_string()).unwrap();
        to
    };
    let bad_d = bad_cfg("suite-d", &|c| c["d_model"] = 999.into());
    let bad_modules = bad_cfg("suite-mod", &|c| c["modules"][0] = "attn_7".into());
    let toy = tmp.join("toy");
    // A suite of huge finite weights: its edge scores overflow.
    let huge = tmp.join("huge-suite");
    copy_dir(&folder, &huge);
    let w = huge.join("suite.safetensors");
    edited_tensors(&w, &w, "aes.attn_0.decoder.weight", |t| t.affine(0.0, 3e38).unwrap());
    // Found by our own sweep (see the note): more caches the manifest cannot describe.
    let empty = edited_cache(&acts, &tmp.join("acts-empty"), |m| {
        m["n_seqs"] = 0.into();
        m["shards"] = serde_json::json!([]);
    });
    let one_layer = edited_cache(&acts, &tmp.join("acts-1layer"), |m| m["model"]["n_layers"] = 1.into());
    let foo_arch = edited_cache(&acts, &tmp.join("acts-foo"), |m| m["model"]["architecture"] = "Foo".into());
    let bf16 = edited_cache(&acts, &tmp.join("acts-bf16"), |m| m["dtype"] = "bf16".into());
    let no_hook = edited_cache(&acts, &tmp.join("acts-hooks"), |m| {
        m["hooks"].as_array_mut().unwrap().retain(|h| h != "blocks.1.hook_mlp_out")
    });
    let zero_scale = edited_cache(&acts, &tmp.join("acts-scale"), |_| ());
    let shard = zero_scale.join("shard-00000.safetensors");
    edited_tensors(&shard, &shard, "blocks.0.ln2.hook_scale", |t| t.zeros_like().unwrap());
    // A model with integer weights, and one with a negative LayerNorm epsilon.
    let int_model = tmp.join("int-model");
    copy_dir(&fixture_model("tiny-gpt2"), &int_model);
    let w = int_model.join("model.safetensors");
    edited_tensors(&w, &w, "transformer.h.0.attn.c_attn.weight", |t| t.to_dtype(DType::I64).unwrap());
    let eps_model = tmp.join("eps-model");
    copy_dir(&fixture_model("tiny-gpt2"), &eps_model);
    let cfg = eps_model.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["layer_norm_epsilon"] = (-1e-5).into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    // Edges and connections, and connections whose metadata names another suite.
    let edges = tmp.join("edges");
    tool_ok(
        "score-edges",
        &["--acts", s(&acts), "--suite", s(&suite), "--keep", "8", "--top-c", "4", "--out", s(&edges)],
    );
    let conns = edges.join("connections.parquet");
    let other_f = tmp.join("other-f.parquet");
    rewrite_parquet_meta(&conns, &other_f, "n_features", "512");
    // Outputs that are, or hold, an input.
    let suite_copy = tmp.join("suite-copy");
    copy_dir(&folder, &suite_copy);
    let holder = tmp.join("holder");
    copy_dir(&folder, &holder.join("suite"));
    let fifo = tmp.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let tokens_file = fixtures().join("golden/suite-tiny-gpt2.safetensors");
    let collect = |model: &Path| {
        strings(&["--model", s(model), "--tokens", s(&tokens_file), "--ctx-len", "12", "--out", s(&out)])
    };
    let rows = vec![
        Row {
            what: "manifest n_seqs above its shards' (train-suite)",
            tool: "train-suite",
            args: ts(&more, &["--steps", "1"]),
            code: 1,
            needles: vec!["manifest.json", "field `n_seqs`", "99 sequences", "shards list 3"],
            absent: vec![out.clone()],
        },
        Row {
            what: "manifest n_seqs above its shards' (finetune, batch above the real count)",
            tool: "finetune",
            args: {
                let mut a = ft(&["--steps", "1"]);
                a[1] = s(&more).into();
                a[7] = "9".into();
                a
            },
            code: 1,
            needles: vec!["manifest.json", "field `n_seqs`"],
            absent: vec![out.clone()],
        },
        Row {
            what: "a shard's n_seqs above its tensors'",
            tool: "evaluate",
            args: strings(&["--acts", s(&shard_more), "--suite", s(&suite), "--out", s(&out)]),
            code: 1,
            needles: vec!["shard-00000.safetensors", "tensor `tokens`", "expected shape [4, 12]", "found [3, 12]"],
            absent: vec![out.clone()],
        },
        Row {
            what: "a cache tensor of the wrong dtype",
            tool: "train-suite",
            args: ts(&wrong_dtype, &["--steps", "1"]),
            code: 1,
            needles: vec!["shard-00000.safetensors", "blocks.0.hook_attn_out", "expected F32", "I64"],
            absent: vec![out.clone()],
        },
        Row {
            what: "a model with a NaN weight",
            tool: "collect-acts",
            args: strings(&[
                "--model",
                s(&nan_model),
                "--tokens",
                s(&fixtures().join("golden/suite-tiny-gpt2.safetensors")),
                "--ctx-len",
                "12",
                "--out",
                s(&out),
            ]),
            code: 1,
            needles: vec!["model.safetensors", "transformer.h.0.mlp.c_fc.weight", "finite"],
            absent: vec![out.clone()],
        },
        Row {
            what: "activations that overflow f16 storage",
            tool: "collect-acts",
            args: strings(&[
                "--model",
                s(&big_model),
                "--tokens",
                s(&fixtures().join("golden/suite-tiny-gpt2.safetensors")),
                "--ctx-len",
                "12",
                "--dtype",
                "f16",
                "--out",
                s(&out),
            ]),
            code: 1,
            needles: vec!["has NaN or infinite values (f16 storage) in sequences 0..3", "hint: --dtype f32"],
            absent: vec![out.clone()],
        },
        Row {
            what: "suite config d_model contradicts the tensors",
            tool: "evaluate",
            args: strings(&["--acts", s(&acts), "--suite", s(&bad_d), "--out", s(&out)]),
            code: 1,
            needles: vec!["config.json", "field `d_model`", "999"],
            absent: vec![out.clone()],
        },
        Row {
            what: "suite config modules contradict the tensors",
            tool: "finetune",
            args: {
                let mut a = ft(&["--steps", "1"]);
                a[3] = s(&bad_modules).into();
                a
            },
            code: 1,
            needles: vec!["config.json", "field `modules`", "attn_7"],
            absent: vec![out.clone()],
        },
        Row {
            what: "train-suite at an absurd lr diverges",
            tool: "train-suite",
            args: ts(&acts, &["--steps", "20", "--lr", "1e4"]),
            code: 1,
            needles: vec!["the run diverged", "FVU", "hint: lower --lr", "no checkpoint was written"],
            absent: vec![out.clone()],
        },
        Row {
            what: "an update that makes parameters infinite is never checkpointed",
            tool: "finetune",
            args: ft(&[
                "--steps",
                "5",
                "--optimizer",
                "sgd",
                "--clip-grad",
                "none",
                "--lr",
                "1e300",
                "--no-scale-lr",
                "--checkpoint-every",
                "1",
            ]),
            code: 1,
            needles: vec!["step 1", "is not finite after the update", "no checkpoint was written"],
            absent: vec![out.clone()],
        },
        Row {
            what: "train-suite --expansion beyond memory",
            tool: "train-suite",
            args: ts(&acts, &["--steps", "1", "--expansion", "1000000000"]),
            code: 1,
            needles: vec!["--expansion 1000000000", "needs about", "is available"],
            absent: vec![out.clone()],
        },
        Row {
            what: "train-suite --batch-size beyond the cache",
            tool: "train-suite",
            args: {
                let mut a = ts(&acts, &["--steps", "1"]);
                a[5] = "18446744073709551615".into();
                a
            },
            code: 1,
            needles: vec!["--batch-size 18446744073709551615", "has only 3 sequences"],
            absent: vec![out.clone()],
        },
        Row {
            what: "finetune streaming with --batch-size beyond memory",
            tool: "finetune",
            args: strings(&[
                "--model",
                s(&fixture_model("tiny-gpt2")),
                "--tokens",
                s(&fixtures().join("golden/suite-tiny-gpt2.safetensors")),
                "--ctx-len",
                "12",
                "--suite",
                s(&suite),
                "--steps",
                "1",
                "--batch-size",
                "100000000000",
                "--out",
                s(&out),
            ]),
            code: 1,
            needles: vec!["--batch-size 100000000000", "needs about"],
            absent: vec![out.clone()],
        },
        Row {
            what: "toy-lm --n-heads 0",
            tool: "toy-lm",
            args: strings(&["--out", s(&toy), "--n-heads", "0"]),
            code: 2,
            needles: vec!["--n-heads"],
            absent: vec![toy.clone()],
        },
        Row {
            what: "toy-lm --ctx-len 0",
            tool: "toy-lm",
            args: strings(&["--out", s(&toy), "--ctx-len", "0"]),
            code: 2,
            needles: vec!["--ctx-len"],
            absent: vec![toy.clone()],
        },
        Row {
            what: "toy-lm --batch-size 0",
            tool: "toy-lm",
            args: strings(&["--out", s(&toy), "--batch-size", "0"]),
            code: 2,
            needles: vec!["--batch-size"],
            absent: vec![toy.clone()],
        },
        Row {
            what: "toy-lm --d-model 0",
            tool: "toy-lm",
            args: strings(&["--out", s(&toy), "--d-model", "0"]),
            code: 2,
            needles: vec!["--d-model"],
            absent: vec![toy.clone()],
        },
        Row {
            what: "toy-lm --lr NaN",
            tool: "toy-lm",
            args: strings(&["--out", s(&toy), "--lr", "NaN"]),
            code: 2,
            needles: vec!["--lr", "finite"],
            absent: vec![toy.clone()],
        },
        Row {
            what: "toy-lm --d-model beyond memory",
            tool: "toy-lm",
            args: strings(&["--out", s(&toy), "--d-model", "100000000"]),
            code: 1,
            needles: vec!["--d-model 100000000", "needs about"],
            absent: vec![toy.clone()],
        },
        Row {
            what: "toy-lm heads that do not divide d_model",
            tool: "toy-lm",
            args: strings(&["--out", s(&toy), "--d-model", "60", "--n-heads", "7"]),
            code: 1,
            needles: vec!["--d-model 60", "--n-heads 7"],
            absent: vec![toy.clone()],
        },
        Row {
            what: "edge scores that overflow f32",
            tool: "score-edges",
            args: strings(&["--acts", s(&acts), "--suite", s(&huge), "--out", s(&out)]),
            code: 1,
            needles: vec!["huge-suite", "edge scores", "not finite"],
            absent: vec![out.clone()],
        },
        Row {
            what: "an empty cache",
            tool: "evaluate",
            args: strings(&["--acts", s(&empty), "--suite", s(&suite), "--out", s(&out)]),
            code: 1,
            needles: vec!["manifest.json", "field `n_seqs`", "at least 1"],
            absent: vec![out.clone()],
        },
        Row {
            what: "manifest n_layers below the shards' layers",
            tool: "train-suite",
            args: ts(&one_layer, &["--steps", "1"]),
            code: 1,
            needles: vec!["shard-00000.safetensors", "blocks.1.", "past the manifest's 1 layers"],
            absent: vec![out.clone()],
        },
        Row {
            what: "manifest architecture unknown",
            tool: "score-edges",
            args: strings(&["--acts", s(&foo_arch), "--suite", s(&suite), "--out", s(&out)]),
            code: 1,
            needles: vec!["manifest.json", "field `model.architecture`", "Foo"],
            absent: vec![out.clone()],
        },
        Row {
            what: "manifest dtype disagrees with the shards",
            tool: "evaluate",
            args: strings(&["--acts", s(&bf16), "--suite", s(&suite), "--out", s(&out)]),
            code: 1,
            needles: vec!["shard-00000.safetensors", "dtype", "bf16"],
            absent: vec![out.clone()],
        },
        Row {
            what: "manifest hooks list lacks a hook",
            tool: "train-suite",
            args: ts(&no_hook, &["--steps", "1"]),
            code: 1,
            needles: vec!["manifest.json", "field `hooks`", "blocks.1.hook_mlp_out"],
            absent: vec![out.clone()],
        },
        Row {
            what: "a LayerNorm scale of 0 in a shard",
            tool: "score-edges",
            args: strings(&["--acts", s(&zero_scale), "--suite", s(&suite), "--out", s(&out)]),
            code: 1,
            needles: vec!["shard-00000.safetensors", "blocks.0.ln2.hook_scale", "scales > 0", "found 0"],
            absent: vec![out.clone()],
        },
        Row {
            what: "a model with an integer weight",
            tool: "collect-acts",
            args: collect(&int_model),
            code: 1,
            needles: vec!["transformer.h.0.attn.c_attn.weight", "floating-point", "I64"],
            absent: vec![out.clone()],
        },
        Row {
            what: "a model with a negative LayerNorm epsilon",
            tool: "collect-acts",
            args: collect(&eps_model),
            code: 1,
            needles: vec!["config.json", "epsilon", "-0.00001"],
            absent: vec![out.clone()],
        },
        Row {
            what: "evaluate over one sequence (no batch-axis variance)",
            tool: "evaluate",
            args: strings(&["--acts", s(&acts), "--suite", s(&suite), "--n-seqs", "1", "--out", s(&out)]),
            code: 1,
            needles: vec!["--n-seqs", "at least 2 sequences, found 1"],
            absent: vec![out.clone()],
        },
        Row {
            what: "connections whose metadata names another n_features",
            tool: "evaluate",
            args: strings(&["--acts", s(&acts), "--suite", s(&suite), "--connections", s(&other_f), "--out", s(&out)]),
            code: 1,
            needles: vec!["other-f.parquet", "metadata `n_features` 512", "disagrees"],
            absent: vec![out.clone()],
        },
        Row {
            what: "select-edges given a connections file",
            tool: "select-edges",
            args: strings(&["--edges", s(&conns), "--c", "2", "--out", s(&tmp.join("sel.parquet"))]),
            code: 1,
            needles: vec!["connections.parquet", "metadata `format`", "scae-edges"],
            absent: vec![tmp.join("sel.parquet")],
        },
        Row {
            what: "select-edges writing over its input",
            tool: "select-edges",
            args: strings(&[
                "--edges",
                s(&edges.join("edges.parquet")),
                "--c",
                "2",
                "--out",
                s(&edges.join("edges.parquet")),
            ]),
            code: 1,
            needles: vec!["--out: is the input --edges"],
            absent: vec![],
        },
        Row {
            what: "select-edges writing onto a FIFO",
            tool: "select-edges",
            args: strings(&["--edges", s(&edges.join("edges.parquet")), "--c", "2", "--out", s(&fifo)]),
            code: 1,
            needles: vec!["fifo", "expected a regular file"],
            absent: vec![],
        },
        Row {
            what: "evaluate --overwrite onto its own --suite",
            tool: "evaluate",
            args: strings(&["--acts", s(&acts), "--suite", s(&suite_copy), "--out", s(&suite_copy), "--overwrite"]),
            code: 1,
            needles: vec!["--out: is the input --suite"],
            absent: vec![],
        },
        Row {
            what: "finetune --overwrite onto a folder holding its --suite",
            tool: "finetune",
            args: strings(&[
                "--acts",
                s(&acts),
                "--suite",
                s(&holder.join("suite")),
                "--out",
                s(&holder),
                "--overwrite",
                "--steps",
                "1",
                "--batch-size",
                "3",
            ]),
            code: 1,
            needles: vec!["--out: holds the input --suite"],
            absent: vec![],
        },
        Row {
            what: "collect-acts --overwrite onto its --model",
            tool: "collect-acts",
            args: {
                let mut a = collect(&int_model);
                a[7] = s(&int_model).into();
                a.push("--overwrite".into());
                a
            },
            code: 1,
            needles: vec!["--out: is the input --model"],
            absent: vec![],
        },
        Row {
            what: "train-suite with both --acts and --data",
            tool: "train-suite",
            args: ts(&acts, &["--steps", "1", "--data", s(&tokens_file)]),
            code: 2,
            needles: vec!["--data"],
            absent: vec![out.clone()],
        },
        Row {
            what: "--threads beyond 1024",
            tool: "evaluate",
            args: strings(&["--acts", s(&acts), "--suite", s(&suite), "--out", s(&out), "--threads", "100000"]),
            code: 2,
            needles: vec!["--threads"],
            absent: vec![out.clone()],
        },
    ];
    for row in &rows {
        check(row);
    }
    // Overlap refusals deleted nothing.
    assert!(suite_copy.join("suite.safetensors").is_file() && holder.join("suite/suite.safetensors").is_file());
    assert!(int_model.join("model.safetensors").is_file() && edges.join("edges.parquet").is_file());
}

/// A copy of parquet file `from` at `to` with key-value metadata `key` set to `value`.
fn rewrite_parquet_meta(from: &Path, to: &Path, key: &str, value: &str) {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    let builder = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(from).unwrap()).unwrap();
    let kv: Vec<KeyValue> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k.key != key && k.key != "ARROW:schema")
        .chain([KeyValue::new(key.to_string(), value.to_string())])
        .collect();
    let schema = builder.schema().clone();
    let reader = builder.build().unwrap();
    let props = WriterProperties::builder().set_key_value_metadata(Some(kv)).build();
    let mut w = ArrowWriter::try_new(std::fs::File::create(to).unwrap(), schema, Some(props)).unwrap();
    for b in reader {
        w.write(&b.unwrap()).unwrap();
    }
    w.close().unwrap();
}

#[test]
fn resume_refuses_checkpoints_and_inputs_no_such_run_has() {
    let tmp = scratch("rel-resume");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let suite = fixture_suite("tiny-gpt2");
    let edges = tmp.join("edges");
    tool_ok(
        "score-edges",
        &["--acts", s(&acts), "--suite", s(&suite), "--keep", "8", "--top-c", "4", "--out", s(&edges)],
    );
    let conns = tmp.join("c.parquet");
    std::fs::copy(edges.join("connections.parquet"), &conns).unwrap();
    let out = tmp.join("ft");
    let run = |extra: &[&str]| -> Vec<String> {
        let mut a = strings(&[
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--connections",
            s(&conns),
            "--out",
            s(&out),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "1",
        ]);
        a.extend(strings(extra));
        a
    };
    let halted = || {
        let _ = std::fs::remove_dir_all(&out);
        tool_ok("finetune", &run(&["--halt-after", "2"]).iter().map(String::as_str).collect::<Vec<_>>());
    };
    let resume = run(&["--resume"]);
    let state = out.join("checkpoint/state.json");
    let edit_state = |k: &str, v: serde_json::Value| {
        let mut st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        st[k] = v;
        std::fs::write(&state, st.to_string()).unwrap();
    };
    let fails = |needles: Vec<&'static str>| {
        check(&Row { what: "resume", tool: "finetune", args: resume.clone(), code: 1, needles, absent: vec![] });
    };
    halted();
    edit_state("step", 100000.into());
    fails(vec!["state.json", "field `step`", "1..=4", "100000"]);
    halted();
    edit_state("opt_t", 0.into());
    fails(vec!["state.json", "field `opt_t`", "expected the step, 2"]);
    halted();
    edit_state("seqs_seen", 3.into());
    fails(vec!["state.json", "field `seqs_seen`", "expected 4"]);
    halted();
    let opt = out.join("checkpoint/optimizer.safetensors");
    let key = "v.aes.mlp_0.b_dec";
    edited_tensors(&opt, &opt, key, |t| t.affine(0.0, -1.0).unwrap());
    fails(vec!["optimizer.safetensors", key, ">= 0"]);
    halted();
    edited_tensors(&opt, &opt, "dead.attn_0", |t| t.narrow(0, 0, 3).unwrap());
    fails(vec!["optimizer.safetensors", "dead.attn_0", "expected shape"]);
    // The connections file changed at the same path.
    halted();
    let other = tmp.join("c2");
    tool_ok("select-edges", &["--edges", s(&edges.join("edges.parquet")), "--c", "2", "--out", s(&other)]);
    std::fs::copy(&other, &conns).unwrap();
    fails(vec!["state.json", "--connections names other contents than the checkpoint's run read"]);
}

#[test]
fn leftovers_of_a_run_killed_before_its_first_checkpoint_do_not_block_a_rerun() {
    let tmp = scratch("rel-leftovers");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let out = tmp.join("ts");
    std::fs::create_dir_all(out.join("checkpoint.tmp")).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"step\":0}\n").unwrap();
    let args = ["--acts", s(&acts), "--out", s(&out), "--steps", "2", "--batch-size", "3", "--k", "4"];
    tool_ok("train-suite", &args);
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
    // Anything else in the folder still needs --overwrite.
    let other = tmp.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    check(&Row {
        what: "a folder with other files",
        tool: "train-suite",
        args: strings(&["--acts", s(&acts), "--out", s(&other), "--steps", "1", "--batch-size", "3", "--k", "4"]),
        code: 1,
        needles: vec!["not empty"],
        absent: vec![],
    });
    assert!(other.join("notes.txt").is_file());
}

#[test]
fn a_second_run_into_the_same_output_is_refused_while_the_first_runs() {
    let tmp = scratch("rel-lock");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let out = tmp.join("eval");
    // Hold the output's lock as a running tool would.
    let lock = std::fs::File::create(scae::util::io::sibling(&out, ".lock")).unwrap();
    lock.try_lock().unwrap();
    let args = strings(&["--acts", s(&acts), "--suite", s(&fixture_suite("tiny-gpt2")), "--out", s(&out)]);
    check(&Row {
        what: "output locked",
        tool: "evaluate",
        args: args.clone(),
        code: 1,
        needles: vec!["another run is writing this output", "eval.lock"],
        absent: vec![out.clone()],
    });
    drop(lock);
    tool_ok("evaluate", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!scae::util::io::sibling(&out, ".lock").exists(), "the lock file is removed after the run");
}

#[test]
fn evaluate_leaves_a_last_one_sequence_batch_out_of_fvu_ref() {
    let tmp = scratch("rel-fvuref");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let out = tmp.join("eval");
    tool_ok(
        "evaluate",
        &["--acts", s(&acts), "--suite", s(&fixture_suite("tiny-gpt2")), "--batch-size", "2", "--out", s(&out)],
    );
    let ev: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    for (m, v) in ev["modules"].as_object().unwrap() {
        assert!(v["fvu_ref"].as_f64().is_some_and(f64::is_finite), "{m}: {}", v["fvu_ref"]);
    }
}

#[test]
fn the_token_budget_and_the_token_file_are_different_flags() {
    let tmp = scratch("rel-tokens");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    // 72 tokens over 3 x 12-token steps: 2 steps.
    let ts = tmp.join("ts");
    tool_ok("train-suite", &["--acts", s(&acts), "--n-tokens", "72", "--batch-size", "3", "--k", "4", "--out", s(&ts)]);
    assert_eq!(std::fs::read_to_string(ts.join("metrics.jsonl")).unwrap().lines().count(), 2);
    // finetune streaming from a pre-tokenized file.
    let ft = tmp.join("ft");
    let toks = fixtures().join("golden/suite-tiny-gpt2.safetensors");
    tool_ok(
        "finetune",
        &[
            "--model",
            s(&fixture_model("tiny-gpt2")),
            "--tokens",
            s(&toks),
            "--ctx-len",
            "12",
            "--no-prepend-bos",
            "--suite",
            s(&fixture_suite("tiny-gpt2")),
            "--n-tokens",
            "36",
            "--batch-size",
            "3",
            "--out",
            s(&ft),
        ],
    );
    assert_eq!(std::fs::read_to_string(ft.join("metrics.jsonl")).unwrap().lines().count(), 1);
}

/// Run a tool with `SCAE_FAULT=point`: it must die at that point (abort, as under `kill -9`).
fn killed_at(name: &str, args: &[&str], point: &str) {
    let o = Command::new(bin_dir().join(name)).args(args).env("SCAE_FAULT", point).output().unwrap();
    assert!(o.status.code().is_none(), "{name} was to be killed at {point}: {:?}", o.status);
}

#[test]
fn killed_at_each_point_of_the_checkpoint_swap_then_resumed_equals_uninterrupted() {
    let tmp = scratch("rel-kill");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let suite = fixture_suite("tiny-gpt2");
    let base = |out: &Path| -> Vec<String> {
        strings(&[
            "--acts",
            s(&acts),
            "--suite",
            s(&suite),
            "--out",
            s(out),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "1",
        ])
    };
    let whole = tmp.join("whole");
    let a = base(&whole);
    tool_ok("finetune", &a.iter().map(String::as_str).collect::<Vec<_>>());
    let expected = std::fs::read(whole.join("suite.safetensors")).unwrap();
    // `swap:moved-aside` first fires at the second checkpoint (the first has nothing to move
    // aside); the other two at the first.
    for point in ["checkpoint:staged", "swap:moved-aside", "swap:staged-in"] {
        let out = tmp.join(point.replace(':', "-"));
        let a = base(&out);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        killed_at("finetune", &a, point);
        let names = ["checkpoint", "checkpoint.tmp", "checkpoint.old"];
        let left: Vec<&str> = names.iter().copied().filter(|n| out.join(n).exists()).collect();
        assert!(!left.is_empty(), "{point}: the kill left no checkpoint at all");
        tool_ok("finetune", &[&a[..], &["--resume"]].concat());
        assert_eq!(std::fs::read(out.join("suite.safetensors")).unwrap(), expected, "{point}: resumed run differs");
        for n in ["checkpoint.tmp", "checkpoint.old"] {
            assert!(!out.join(n).exists(), "{point}: {n} left after the resumed run");
        }
    }
    // A damaged checkpoint.tmp (a state.json that is not JSON) never replaces the good one.
    let out = tmp.join("damaged-tmp");
    let a = base(&out);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    tool_ok("finetune", &[&a[..], &["--halt-after", "2"]].concat());
    copy_dir(&out.join("checkpoint"), &out.join("checkpoint.tmp"));
    std::fs::write(out.join("checkpoint.tmp/state.json"), "junk").unwrap();
    tool_ok("finetune", &[&a[..], &["--resume"]].concat());
    assert_eq!(std::fs::read(out.join("suite.safetensors")).unwrap(), expected, "resumed past a damaged tmp");
    // train-suite shares the mechanism: killed mid-swap, resumed, identical.
    let ts = |out: &Path| {
        strings(&[
            "--acts",
            s(&acts),
            "--out",
            s(out),
            "--steps",
            "3",
            "--batch-size",
            "3",
            "--k",
            "4",
            "--checkpoint-every",
            "1",
        ])
    };
    let (w, k) = (tmp.join("ts-whole"), tmp.join("ts-killed"));
    tool_ok("train-suite", &ts(&w).iter().map(String::as_str).collect::<Vec<_>>());
    let a = ts(&k);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    killed_at("train-suite", &a, "swap:moved-aside");
    assert!(!k.join("checkpoint").exists() && k.join("checkpoint.old").exists());
    tool_ok("train-suite", &[&a[..], &["--resume"]].concat());
    assert_eq!(
        std::fs::read(k.join("suite.safetensors")).unwrap(),
        std::fs::read(w.join("suite.safetensors")).unwrap()
    );
}

#[test]
fn an_overwrite_killed_mid_swap_keeps_the_old_output() {
    let tmp = scratch("rel-overwrite");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let manifest = std::fs::read(acts.join("manifest.json")).unwrap();
    let toks = fixtures().join("golden/suite-tiny-gpt2.safetensors");
    let m = fixture_model("tiny-gpt2");
    let args = ["--model", s(&m), "--tokens", s(&toks), "--ctx-len", "12", "--no-prepend-bos", "--out", s(&acts)];
    killed_at("collect-acts", &[&args[..], &["--overwrite"]].concat(), "swap:moved-aside");
    // The old cache is whole under `.old`, and readers say where it is.
    let old = scae::util::io::sibling(&acts, ".old");
    assert_eq!(std::fs::read(old.join("manifest.json")).unwrap(), manifest);
    let o =
        tool("evaluate", &["--acts", s(&acts), "--suite", s(&fixture_suite("tiny-gpt2")), "--out", s(&tmp.join("e"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains(".old") && err.contains("interrupted"), "{err}");
    // A plain rerun without --overwrite would meet an empty target: it restores the old cache first.
    let o = tool("collect-acts", &args);
    assert_eq!(o.status.code(), Some(1), "the restored cache is not overwritten without --overwrite");
    assert_eq!(std::fs::read(acts.join("manifest.json")).unwrap(), manifest);
    tool_ok("collect-acts", &[&args[..], &["--overwrite"]].concat());
    assert!(!old.exists() && !scae::util::io::sibling(&acts, ".tmp").exists());
}

#[test]
fn a_closed_stdout_is_a_quiet_exit_and_a_full_one_an_error() {
    let tmp = scratch("rel-stdout");
    let acts = golden_cache(&tmp, "tiny-gpt2");
    let suite = fixture_suite("tiny-gpt2");
    let args = |out: &Path| {
        ["--acts".to_string(), s(&acts).into(), "--suite".into(), s(&suite).into(), "--out".into(), s(out).into()]
    };
    // The read end is closed before the tool writes its table.
    let mut child = Command::new(bin_dir().join("evaluate"))
        .args(args(&tmp.join("e1")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(scae_testkit::error_lines(&err, "evaluate").is_empty(), "{err}");
    assert!(tmp.join("e1/eval.json").is_file());
    if Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let o = Command::new(bin_dir().join("evaluate")).args(args(&tmp.join("e2"))).stdout(full).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("evaluate: writing to stdout") && scae_testkit::error_lines(&err, "evaluate").len() == 1,
            "{err}"
        );
    }
}

#[test]
fn repeated_runs_write_identical_bytes() {
    let tmp = scratch("rel-bytes");
    let toks = fixtures().join("golden/suite-tiny-gpt2.safetensors");
    let m = fixture_model("tiny-gpt2");
    let run = |tag: &str| -> Vec<(String, Vec<u8>)> {
        let acts = tmp.join(format!("acts-{tag}"));
        let ts = tmp.join(format!("ts-{tag}"));
        let ft = tmp.join(format!("ft-{tag}"));
        tool_ok("collect-acts", &["--model", s(&m), "--tokens", s(&toks), "--ctx-len", "12", "--out", s(&acts)]);
        tool_ok("train-suite", &["--acts", s(&acts), "--out", s(&ts), "--steps", "2", "--batch-size", "3", "--k", "4"]);
        tool_ok(
            "finetune",
            &["--acts", s(&acts), "--suite", s(&ts), "--out", s(&ft), "--steps", "2", "--batch-size", "3"],
        );
        // (manifest.json and config.json record the run's own paths)
        [
            (acts.join("shard-00000.safetensors"), "cache shard"),
            (ts.join("suite.safetensors"), "suite"),
            (ft.join("suite.safetensors"), "finetuned suite"),
        ]
        .into_iter()
        .map(|(p, name)| (name.to_string(), std::fs::read(p).unwrap()))
        .collect()
    };
    let (a, b) = (run("a"), run("b"));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name}: two identical runs wrote different bytes");
        // the header's metadata keys are sorted
        let n = u64::from_le_bytes(x[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&x[8..8 + n]).unwrap();
        if let Some(at) = header.find("\"__metadata__\"") {
            let meta: serde_json::Value = serde_json::from_str(header).unwrap();
            let keys: Vec<&String> = meta["__metadata__"].as_object().unwrap().keys().collect();
            let pos: Vec<usize> = keys.iter().map(|k| header[at..].find(&format!("\"{k}\"")).unwrap()).collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "{name}: metadata keys not sorted: {header}");
        }
    }
}
