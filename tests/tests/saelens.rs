//! `convert-suite --to saelens` against SAELens itself: golden/saelens-tiny-neo.* hold what
//! SAELens 6 computed on this export of the tiny-neo fixture suite (tests/fixtures/gen_saelens.py,
//! `SAE.load_from_disk`, `encode`, `decode`). scae's own features and reconstructions of the
//! same inputs must equal them, and the folders must carry what SAELens read.

use candle_core::{Device, Tensor};
use scae::sae::step::step;
use scae::util::collective::Single;
use scae_testkit::{fixture_suite, fixtures, load, max_abs, s, scratch, tool_ok};

#[test]
fn saelens_computes_scae_features_from_the_export() {
    let tmp = scratch("saelens");
    let out = tmp.join("saelens");
    let suite_path = fixture_suite("tiny-neo");
    tool_ok("convert-suite", &["--suite", s(&suite_path), "--to", "saelens", "--out", s(&out)]);
    let golden = load(&fixtures().join("golden/saelens-tiny-neo.safetensors"));
    let read: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden/saelens-tiny-neo.json")).unwrap())
            .unwrap();
    let suite = scae::formats::suite::Suite::load(&suite_path, &Device::Cpu).unwrap();
    let (d, f, k) = (suite.d_model, suite.n_features, suite.k);
    // The host step reads its parameters in the host pretraining layout.
    let mut params = suite.host_params().unwrap();
    params.iter_mut().for_each(|p| p.to_host_layout(d, f));
    for (module, p) in suite.modules.iter().zip(&params) {
        let name = module.name();
        // What SAELens read from this folder (golden) is what the folder says now.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(&name).join("cfg.json")).unwrap()).unwrap();
        let seen = &read["modules"][&name];
        assert_eq!(seen["architecture"], "topk", "{name}: {seen}");
        for key in ["d_in", "d_sae", "k"] {
            assert_eq!(cfg[key], seen[key], "{name}: {key}");
        }
        assert_eq!(
            (cfg["d_in"].as_u64(), cfg["d_sae"].as_u64(), cfg["k"].as_u64()),
            (Some(d as u64), Some(f as u64), Some(k as u64))
        );
        assert_eq!(cfg["metadata"]["hook_name"], seen["hook_name"], "{name}");
        assert!(cfg["metadata"]["sae_lens_version"].as_str().unwrap().starts_with('6'), "{cfg}");
        let transcoder = name.starts_with("mlp");
        assert_eq!(cfg["metadata"]["hook_name_out"], seen["hook_name_out"], "{name}");
        assert_eq!(
            transcoder,
            out.join(&name).join("README.md").is_file(),
            "{name}: a transcoder's folder explains itself"
        );
        // scae's standalone features and reconstruction of the inputs SAELens was given.
        let x = &golden[&format!("x.{name}")];
        let n = x.dim(0).unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let o = step(&Single, p, &xv, &xv, d, f, k, &vec![false; f], 0.0).unwrap();
        let mut feats = vec![0f32; n * f];
        for (j, (&i, &v)) in o.idx.iter().zip(&o.val).enumerate() {
            feats[(j / k) * f + i as usize] = v;
        }
        let recon = scae::sae::decode(&o.idx, &o.val, k, &p.w_dec, d, Some(&p.b_dec));
        for (what, mine, dims) in [("feats", feats, (n, f)), ("out", recon, (n, d))] {
            let want = &golden[&format!("{what}.{name}")];
            let mine = Tensor::from_vec(mine, dims, &Device::Cpu).unwrap();
            let err = max_abs(&(&mine - want).unwrap()) / max_abs(want).max(1e-6);
            assert!(err <= 1e-5, "{name} {what}: scae vs SAELens, relative difference {err:.2e}");
        }
        let active = golden[&format!("feats.{name}")].ne(0f32).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        let per_row = active.sum_all().unwrap().to_scalar::<f32>().unwrap() / n as f32;
        assert!(per_row > 0.0 && per_row <= k as f32, "{name}: {per_row} active features per row");
    }
}

#[test]
fn the_export_carries_each_features_firing_frequency_over_a_cache() {
    let tmp = scratch("saelens-sparsity");
    let acts = scae_testkit::golden_cache(&tmp, "tiny-neo");
    let out = tmp.join("saelens");
    let suite_path = fixture_suite("tiny-neo");
    tool_ok("convert-suite", &["--suite", s(&suite_path), "--to", "saelens", "--acts", s(&acts), "--out", s(&out)]);
    // The same frequencies from the host pretraining step's encoder, token by token.
    let suite = scae::formats::suite::Suite::load(&suite_path, &Device::Cpu).unwrap();
    let (d, f, k) = (suite.d_model, suite.n_features, suite.k);
    let mut params = suite.host_params().unwrap();
    params.iter_mut().for_each(|p| p.to_host_layout(d, f));
    let cache = scae::formats::cache::Cache::open(&acts).unwrap();
    let mut counts = vec![vec![0u64; f]; suite.modules.len()];
    let mut n = 0u64;
    cache
        .for_each_batch(2, None, &Device::Cpu, |b| {
            for (m, module) in suite.modules.iter().enumerate() {
                let x = match module.kind {
                    scae::model::Kind::Attn => &b.attn_out[module.layer],
                    scae::model::Kind::Mlp => &b.ln2_normalized[module.layer],
                };
                let x: Vec<f32> = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
                let o = step(&Single, &params[m], &x, &x, d, f, k, &vec![false; f], 0.0)?;
                for (&i, &v) in o.idx.iter().zip(&o.val) {
                    counts[m][i as usize] += u64::from(v > 0.0);
                }
            }
            n += b.tokens.elem_count() as u64;
            Ok(())
        })
        .unwrap();
    for (m, module) in suite.modules.iter().enumerate() {
        let file = load(&out.join(module.name()).join("sparsity.safetensors"));
        let got: Vec<f32> = file["sparsity"].to_vec1().unwrap();
        let want: Vec<f32> = counts[m].iter().map(|&c| (c as f64 / n as f64 + 1e-10).log10() as f32).collect();
        assert_eq!(got.len(), f);
        for (j, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-5, "{module} feature {j}: log10 frequency {a} vs {b}");
        }
        assert!(want.iter().any(|&v| v > -10.0), "{module}: some feature fires");
    }
}
