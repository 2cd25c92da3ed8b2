//! Black-box tests of `collect-acts`: caches equal TransformerLens goldens, every data format
//! tokenizes like TL's `to_tokens`, and bad input fails with one clear line and no output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use scae_testkit::{fixture_model as model, fixtures, load, max_abs_diff, s as p, scratch};

const BIN: &str = env!("CARGO_BIN_EXE_collect-acts");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run collect-acts")
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn cache_matches_transformer_lens_for_every_family() {
    for name in ["tiny-neo", "tiny-pythia", "tiny-gpt2"] {
        let tmp = scratch(&format!("golden-{name}"));
        let golden_path = fixtures().join(format!("golden/{name}.safetensors"));
        let out = tmp.join("acts");
        // The golden file holds a `tokens` tensor (2, 12); its other tensors are ignored.
        let o = run(&[
            "--model",
            p(&model(name)),
            "--tokens",
            p(&golden_path),
            "--ctx-len",
            "12",
            "--no-prepend-bos",
            "--batch-size",
            "1",
            "--shard-seqs",
            "1",
            "--out",
            p(&out),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let m = manifest(&out);
        assert_eq!(m["n_seqs"], 2);
        assert_eq!(m["shards"].as_array().unwrap().len(), 2);
        let golden = load(&golden_path);
        let mut ce_sum = 0.0;
        for (i, shard) in m["shards"].as_array().unwrap().iter().enumerate() {
            let s = load(&out.join(shard["file"].as_str().unwrap()));
            let hooks = m["hooks"].as_array().unwrap();
            assert_eq!(s.len(), hooks.len() + 3, "hooks + tokens + the clean and zero-ablation CEs");
            for h in hooks {
                let h = h.as_str().unwrap();
                let want = golden[h].narrow(0, i, 1).unwrap();
                let d = max_abs_diff(&s[h], &want);
                assert!(d <= 1e-4, "{name} shard {i} {h}: max abs diff {d}");
            }
            assert_eq!(s["tokens"].dtype(), DType::I64);
            let want_tokens = golden["tokens"].narrow(0, i, 1).unwrap().to_vec2::<i64>().unwrap();
            assert_eq!(s["tokens"].to_vec2::<i64>().unwrap(), want_tokens);
            let golden_ce = golden["loss_per_token"].narrow(0, i, 1).unwrap().mean_all().unwrap();
            let golden_ce = golden_ce.to_scalar::<f32>().unwrap() as f64;
            // The stored per-position CE is TransformerLens' loss per token.
            let want_ce = golden["loss_per_token"].narrow(0, i, 1).unwrap();
            let d = max_abs_diff(&s["clean_ce"], &want_ce);
            assert!(d <= 1e-4, "{name} shard {i} clean_ce: max abs diff {d}");
            assert_eq!(s["zero_ce"].dims(), want_ce.dims());
            let ce = shard["clean_ce"].as_f64().unwrap();
            assert!((ce - golden_ce).abs() < 1e-4, "{name} shard {i} CE {ce} vs {golden_ce}");
            ce_sum += ce;
        }
        assert!((m["clean_ce"].as_f64().unwrap() - ce_sum / 2.0).abs() < 1e-9);
        assert_eq!(m["model"]["architecture"].as_str().unwrap().is_empty(), false);
        assert!(m["model"]["hash"].as_str().unwrap().starts_with("blake3:"));
    }
}

#[test]
fn bf16_cache_is_the_rounded_f32_cache() {
    let tmp = scratch("bf16");
    let golden_path = fixtures().join("golden/tiny-gpt2.safetensors");
    let out = tmp.join("acts");
    let o = run(&[
        "--model",
        p(&model("tiny-gpt2")),
        "--tokens",
        p(&golden_path),
        "--ctx-len",
        "12",
        "--no-prepend-bos",
        "--dtype",
        "bf16",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = load(&out.join("shard-00000.safetensors"));
    let golden = load(&golden_path);
    let h = "blocks.1.hook_mlp_out";
    assert_eq!(s[h].dtype(), DType::BF16);
    let want = golden[h].to_dtype(DType::BF16).unwrap();
    // Rounding the same f32 values (equal up to 1e-5) to bf16 gives the same bf16 numbers,
    // or neighbours where a value sits on a rounding boundary.
    let d = max_abs_diff(&s[h], &want);
    let scale = golden[h].abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d <= scale * 2f32.powi(-7), "bf16 cache differs by {d}");
    assert_eq!(manifest(&out)["dtype"], "bf16");
}

fn golden_texts() -> (Vec<String>, Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden/tokenize.json")).unwrap()).unwrap();
    let texts = v["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let rows = |k: &str| -> Vec<Vec<i64>> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
            .collect()
    };
    (texts, rows("prepend_bos"), rows("no_prepend_bos"))
}

fn write_parquet_texts(path: &Path, column: &str, texts: &[String]) {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    let arr: ArrayRef = Arc::new(StringArray::from(texts.to_vec()));
    let batch = RecordBatch::try_from_iter([(column, arr)]).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn cached_tokens(dir: &Path) -> Vec<Vec<i64>> {
    load(&dir.join("shard-00000.safetensors"))["tokens"].to_vec2::<i64>().unwrap()
}

#[test]
fn every_text_format_tokenizes_like_transformer_lens() {
    let tmp = scratch("formats");
    let (texts, with_bos, without_bos) = golden_texts();
    let ctx = with_bos.iter().map(|r| r.len()).min().unwrap();
    let parquet = tmp.join("d.parquet");
    write_parquet_texts(&parquet, "story", &texts);
    let jsonl: String = texts.iter().map(|t| serde_json::json!({"text": t, "meta": 1}).to_string() + "\n").collect();
    std::fs::write(tmp.join("d.jsonl"), &jsonl).unwrap();
    std::fs::write(tmp.join("d.jsonl.zst"), zstd::encode_all(jsonl.as_bytes(), 3).unwrap()).unwrap();
    let cases: [(&str, &[&str]); 3] =
        [("d.parquet", &["--text-column", "story"]), ("d.jsonl", &[]), ("d.jsonl.zst", &[])];
    for (file, extra) in cases {
        for bos in [true, false] {
            let out = tmp.join(format!("acts-{file}-{bos}"));
            let ctx_s = ctx.to_string();
            let (m, data) = (model("tiny-neo"), tmp.join(file));
            let mut args = vec!["--model", p(&m), "--data", p(&data), "--ctx-len", &ctx_s];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--out", p(&out), if bos { "--prepend-bos" } else { "--no-prepend-bos" }]);
            let o = run(&args);
            assert!(o.status.success(), "{file}: {}", String::from_utf8_lossy(&o.stderr));
            let golden = if bos { &with_bos } else { &without_bos };
            let want: Vec<Vec<i64>> = golden.iter().filter(|r| r.len() >= ctx).map(|r| r[..ctx].to_vec()).collect();
            assert_eq!(cached_tokens(&out), want, "{file} prepend_bos={bos}");
            assert_eq!(manifest(&out)["prepend_bos"], bos);
        }
    }
    // .txt: one document per line (the texts have no newlines).
    std::fs::write(tmp.join("d.txt"), texts.join("\n")).unwrap();
    let out = tmp.join("acts-txt");
    let o =
        run(&["--model", p(&model("tiny-neo")), "--data", p(&tmp.join("d.txt")), "--ctx-len", "4", "--out", p(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: Vec<Vec<i64>> = with_bos.iter().map(|r| r[..4].to_vec()).collect();
    assert_eq!(cached_tokens(&out), want);
}

#[test]
fn short_texts_are_skipped_or_packed() {
    let tmp = scratch("pack");
    let (texts, _, without_bos) = golden_texts();
    let longest = without_bos.iter().map(|r| r.len()).max().unwrap();
    let ctx = longest + 1; // every text is too short unless packed
    let jsonl: String = texts.iter().map(|t| serde_json::json!({"text": t}).to_string() + "\n").collect();
    std::fs::write(tmp.join("d.jsonl"), &jsonl).unwrap();
    let ctx_s = ctx.to_string();
    let (m, data) = (model("tiny-neo"), tmp.join("d.jsonl"));
    let base = ["--model", p(&m), "--data", p(&data), "--ctx-len", &ctx_s, "--no-prepend-bos"];
    let out = tmp.join("skip");
    let o = run(&[&base[..], &["--out", p(&out)]].concat());
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("4 documents read, 4 shorter than that skipped") && err.contains("--pack"), "{err}");
    assert!(!out.exists() && !tmp.join("skip.tmp").exists());
    let out = tmp.join("packed");
    let o = run(&[&base[..], &["--pack", "--out", p(&out)]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut stream: Vec<i64> = vec![];
    for r in &without_bos {
        stream.extend(r);
        stream.push(0); // EOS
    }
    let want: Vec<Vec<i64>> = stream.chunks_exact(ctx).map(|c| c.to_vec()).collect();
    assert_eq!(cached_tokens(&out), want);
}

#[test]
fn n_tokens_and_n_seqs_limit_the_cache() {
    let tmp = scratch("limits");
    let golden_path = fixtures().join("golden/tiny-neo.safetensors");
    let out = tmp.join("a");
    let o = run(&[
        "--model",
        p(&model("tiny-neo")),
        "--tokens",
        p(&golden_path),
        "--ctx-len",
        "6",
        "--n-tokens",
        "5",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(manifest(&out)["n_seqs"], 1);
    // With BOS prepended, a pre-tokenized row is a document: BOS + its first ctx-1 ids.
    let golden = load(&golden_path)["tokens"].to_vec2::<i64>().unwrap();
    let mut want = vec![0i64];
    want.extend(&golden[0][..5]);
    assert_eq!(cached_tokens(&out), vec![want]);
}

// ---- bad input: exit 1, one clear line, nothing left behind ----

fn expect_failure(args: &[&str], out: &Path, needles: &[&str]) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("collect-acts: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    let tmp = PathBuf::from(format!("{}.tmp", out.display()));
    assert!(!tmp.exists(), "staging folder left behind");
}

fn broken_model(tmp: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(model("tiny-neo")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    edit(&dir);
    dir
}

fn tokens_args<'a>(m: &'a Path, out: &'a Path) -> Vec<&'a str> {
    static GOLDEN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let g = GOLDEN.get_or_init(|| fixtures().join("golden/tiny-neo.safetensors"));
    vec!["--model", p(m), "--tokens", p(g), "--ctx-len", "8", "--out", p(out)]
}

#[test]
fn bad_model_folders_are_clear_errors() {
    let tmp = scratch("badmodel");
    let out = tmp.join("out");
    let m = broken_model(&tmp.join("a"), |d| std::fs::remove_file(d.join("config.json")).unwrap());
    expect_failure(&tokens_args(&m, &out), &out, &["config.json is missing"]);
    let m = broken_model(&tmp.join("b"), |d| std::fs::write(d.join("config.json"), "{not json").unwrap());
    expect_failure(&tokens_args(&m, &out), &out, &["config.json", "not valid JSON"]);
    let m = broken_model(&tmp.join("c"), |d| {
        let t =
            std::fs::read_to_string(d.join("config.json")).unwrap().replace("GPTNeoForCausalLM", "LlamaForCausalLM");
        std::fs::write(d.join("config.json"), t).unwrap()
    });
    expect_failure(&tokens_args(&m, &out), &out, &["unsupported architecture \"LlamaForCausalLM\""]);
    let m = broken_model(&tmp.join("d"), |d| std::fs::write(d.join("model.safetensors"), b"garbage bytes").unwrap());
    expect_failure(&tokens_args(&m, &out), &out, &["model.safetensors", "not a readable safetensors file"]);
    let m = broken_model(&tmp.join("e"), |d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    expect_failure(&tokens_args(&m, &out), &out, &["no weights found"]);
    let m = broken_model(&tmp.join("f"), |d| {
        let t = std::fs::read_to_string(d.join("config.json"))
            .unwrap()
            .replace("\"hidden_size\": 16", "\"hidden_size\": 32");
        std::fs::write(d.join("config.json"), t).unwrap()
    });
    expect_failure(&tokens_args(&m, &out), &out, &["model.safetensors", "expected shape [300, 32], found [300, 16]"]);
    let missing = tmp.join("nope");
    expect_failure(&tokens_args(&missing, &out), &out, &["no such folder"]);
    assert!(!out.exists());
}

#[test]
fn hub_id_offline_says_how_to_use_a_local_folder() {
    let tmp = scratch("offline");
    let out = tmp.join("out");
    let o = Command::new(BIN)
        .args(["--model", "nobody-xyz/not-a-model", "--data", "x.txt", "--out", p(&out)])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", p(&tmp))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("not in the Hugging Face cache") && err.contains("--model DIR"), "{err}");
}

#[test]
fn bad_data_and_arguments_are_clear_errors() {
    let tmp = scratch("baddata");
    let out = tmp.join("out");
    let m = model("tiny-neo");
    let mm = p(&m);
    let run_args = |data: &Path| -> Vec<String> {
        ["--model", mm, "--data", p(data), "--ctx-len", "8", "--out", p(&out)].map(String::from).to_vec()
    };
    let fail = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_failure(&a, &out, needles)
    };
    // ctx_len above n_ctx (32)
    let g = fixtures().join("golden/tiny-neo.safetensors");
    expect_failure(
        &["--model", mm, "--tokens", p(&g), "--ctx-len", "64", "--out", p(&out)],
        &out,
        &["--ctx-len 64", "n_ctx 32"],
    );
    // empty dataset
    std::fs::write(tmp.join("empty.txt"), "").unwrap();
    fail(run_args(&tmp.join("empty.txt")), &["empty.txt", "0 documents read"]);
    // wrong text column (parquet and jsonl)
    write_parquet_texts(&tmp.join("d.parquet"), "story", &["a b c".to_string()]);
    fail(run_args(&tmp.join("d.parquet")), &["d.parquet", "no column `text` (columns: story)", "--text-column"]);
    std::fs::write(tmp.join("d.jsonl"), "{\"story\": \"hello\"}\n").unwrap();
    fail(run_args(&tmp.join("d.jsonl")), &["d.jsonl", "line 1: no field `text`"]);
    std::fs::write(tmp.join("bad.jsonl"), "{\"text\": \"ok\"}\nnot json\n").unwrap();
    expect_failure(
        &["--model", mm, "--data", p(&tmp.join("bad.jsonl")), "--ctx-len", "2", "--out", p(&out)],
        &out,
        &["bad.jsonl", "line 2: not valid JSON"],
    );
    // unknown extension, missing file
    std::fs::write(tmp.join("d.csv"), "text\nhello\n").unwrap();
    fail(run_args(&tmp.join("d.csv")), &["d.csv", "expected a .parquet"]);
    fail(run_args(&tmp.join("none.txt")), &["none.txt", "no such file"]);
    // token ids outside the vocabulary
    let big = Tensor::from_vec(vec![1i64, 2, 3, 999], (1, 4), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("tokens".to_string(), big)]), tmp.join("t.safetensors")).unwrap();
    expect_failure(
        &[
            "--model",
            mm,
            "--tokens",
            p(&tmp.join("t.safetensors")),
            "--ctx-len",
            "4",
            "--no-prepend-bos",
            "--out",
            p(&out),
        ],
        &out,
        &["t.safetensors", "token id 999", "d_vocab 300"],
    );
    assert!(!out.exists());
    // a tokens file without a `tokens` tensor
    expect_failure(
        &["--model", mm, "--tokens", p(&m.join("model.safetensors")), "--ctx-len", "8", "--out", p(&out)],
        &out,
        &["no tensor `tokens`"],
    );
}

#[test]
fn output_folder_is_protected() {
    let tmp = scratch("out");
    let m = model("tiny-neo");
    let g = fixtures().join("golden/tiny-neo.safetensors");
    let out = tmp.join("acts");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let args = ["--model", p(&m), "--tokens", p(&g), "--ctx-len", "8", "--out", p(&out)];
    expect_failure(&args, &out, &["acts", "not empty", "--overwrite"]);
    assert!(out.join("keep.txt").exists());
    let o = run(&[&args[..], &["--overwrite"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join("keep.txt").exists() && out.join("manifest.json").exists());
    // Not writable: the parent is a regular file.
    std::fs::write(tmp.join("file"), "x").unwrap();
    let bad = tmp.join("file").join("acts");
    expect_failure(
        &["--model", p(&m), "--tokens", p(&g), "--ctx-len", "8", "--out", p(&bad)],
        &bad,
        &["cannot create output folder"],
    );
    // A file where the folder should be.
    expect_failure(
        &["--model", p(&m), "--tokens", p(&g), "--ctx-len", "8", "--out", p(&tmp.join("file"))],
        &tmp.join("file"),
        &["expected a folder, found a file"],
    );
}

#[test]
fn parquet_token_lists_are_read_as_documents() {
    use arrow_array::builder::{Int64Builder, ListBuilder};
    let tmp = scratch("tok-parquet");
    let golden = load(&fixtures().join("golden/tiny-neo.safetensors"))["tokens"].to_vec2::<i64>().unwrap();
    let mut b = ListBuilder::new(Int64Builder::new());
    for row in &golden {
        for &t in row {
            b.values().append_value(t);
        }
        b.append(true);
    }
    let arr: arrow_array::ArrayRef = Arc::new(b.finish());
    let batch = arrow_array::RecordBatch::try_from_iter([("input_ids", arr)]).unwrap();
    let path = tmp.join("t.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let out = tmp.join("acts");
    let o = run(&[
        "--model",
        p(&model("tiny-neo")),
        "--tokens",
        p(&path),
        "--ctx-len",
        "12",
        "--no-prepend-bos",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(cached_tokens(&out), golden);
    // a column of the wrong type is refused
    let strs: arrow_array::ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["a", "b"]));
    let batch = arrow_array::RecordBatch::try_from_iter([("input_ids", strs)]).unwrap();
    let bad = tmp.join("bad.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&bad).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let out2 = tmp.join("acts2");
    expect_failure(
        &["--model", p(&model("tiny-neo")), "--tokens", p(&bad), "--ctx-len", "4", "--out", p(&out2)],
        &out2,
        &["column `input_ids`: expected lists of integers"],
    );
}
