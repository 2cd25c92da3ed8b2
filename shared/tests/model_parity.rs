//! Golden parity: scae's processed weights, hooks, logits and CE against TransformerLens 2.18
//! `run_with_cache` on tiny random models of all three families
//! (`tests/fixtures/gen_models.py` wrote the goldens).

use candle_core::{Device, Tensor};
use scae::model::Model;
use scae_testkit::{fixtures, golden, max_abs_diff};

const TOL: f32 = 1e-4;

fn check(golden_name: &str, folder: &str) {
    let g = golden(golden_name);
    let dir = fixtures().join("models").join(folder);
    let model = Model::load(folder, &dir, &Device::Cpu).expect("load model");
    let rt = &model.runtime;
    let tokens = &g["tokens"];
    let out = rt.forward(tokens, true, true).unwrap();
    let mut worst: Vec<(String, f32)> = Vec::new();
    let mut cmp = |name: &str, ours: &Tensor| {
        let d = max_abs_diff(ours, &g[name]);
        worst.push((name.to_string(), d));
    };
    cmp("blocks.0.hook_resid_pre", &out.resid_pre0);
    for (l, layer) in out.layers.iter().enumerate() {
        for (suffix, t) in layer.named() {
            cmp(&format!("blocks.{l}.{suffix}"), t);
        }
    }
    cmp("logits", out.logits.as_ref().unwrap());
    cmp("loss_per_token", &out.ce);
    let w = &rt.weights;
    cmp("weights.embed.W_E", &w.w_e);
    cmp("weights.unembed.W_U", &w.w_u);
    cmp("weights.unembed.b_U", &w.b_u);
    cmp("weights.blocks.0.attn.W_Q", &w.blocks[0].w_q);
    cmp("weights.blocks.0.attn.b_Q", &w.blocks[0].b_q);
    cmp("weights.blocks.0.attn.W_O", &w.blocks[0].w_o);
    cmp("weights.blocks.0.attn.b_O", &w.blocks[0].b_o);
    cmp("weights.blocks.0.mlp.W_in", &w.blocks[0].w_in);
    cmp("weights.blocks.0.mlp.b_in", &w.blocks[0].b_in);
    cmp("weights.blocks.1.mlp.W_out", &w.blocks[1].w_out);
    cmp("weights.blocks.1.mlp.b_out", &w.blocks[1].b_out);
    // Every hook, the logits, the CE and the weights: 7 per layer + resid + logits + CE + 11.
    assert_eq!(worst.len(), 7 * rt.cfg.n_layers + 3 + 11);
    let bad: Vec<_> = worst.iter().filter(|(_, d)| !(*d <= TOL)).collect();
    let max = worst.iter().map(|(_, d)| *d).fold(0f32, f32::max);
    eprintln!("{folder}: max abs diff over {} tensors = {max:.3e}", worst.len());
    assert!(bad.is_empty(), "{folder}: tensors differ from TransformerLens by more than {TOL}: {bad:?}");
    // The clean CE recorded in the golden metadata is the mean of the per-token loss.
    let mean_ce = out.ce.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let ref_ce = g["loss_per_token"].mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((mean_ce - ref_ce).abs() <= TOL, "{mean_ce} vs {ref_ce}");
}

#[test]
fn gpt_neo_matches_transformer_lens() {
    check("tiny-neo", "tiny-neo");
}

#[test]
fn gpt_neox_matches_transformer_lens() {
    check("tiny-pythia", "tiny-pythia");
}

#[test]
fn gpt2_matches_transformer_lens() {
    check("tiny-gpt2", "tiny-gpt2");
}

#[test]
fn pytorch_bin_checkpoint_loads_the_same_model() {
    check("tiny-gpt2", "tiny-gpt2-bin");
}

#[test]
fn sharded_safetensors_checkpoint_loads_the_same_model() {
    check("tiny-neo", "tiny-neo-sharded");
}

/// A model's identity is the content of its tensors, not its files: `.bin` and `.safetensors`,
/// whole and sharded, are the same model; a changed value, dtype, or config field is another.
#[test]
fn model_fingerprint_is_by_content_not_by_file_layout() {
    let load = |dir: &std::path::Path| Model::load("m", dir, &Device::Cpu).expect("load model");
    let models = fixtures().join("models");
    let (st, bin) = (load(&models.join("tiny-gpt2")), load(&models.join("tiny-gpt2-bin")));
    assert_eq!(st.hash, bin.hash, ".bin and .safetensors of the same weights");
    assert_ne!(st.file_hash, bin.file_hash, "the files differ");
    let (whole, sharded) = (load(&models.join("tiny-neo")), load(&models.join("tiny-neo-sharded")));
    assert_eq!(whole.hash, sharded.hash, "whole and sharded");
    assert_ne!(whole.hash, st.hash);
    assert!(whole.is(&whole.file_hash) && whole.is(&whole.hash) && !whole.is(&st.hash));
    // One changed value (safetensors rewritten with the same header), and a changed config.
    let tmp = std::env::temp_dir().join(format!("scae-model-fp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for f in std::fs::read_dir(models.join("tiny-neo")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.join(f.file_name().unwrap())).unwrap();
    }
    assert_eq!(load(&tmp).hash, whole.hash, "a copy elsewhere is the same model");
    let mut bytes = std::fs::read(tmp.join("model.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(tmp.join("model.safetensors"), &bytes).unwrap();
    let changed = load(&tmp);
    assert_ne!(changed.hash, whole.hash, "one changed bit is another model");
    let cfg_path = tmp.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["layer_norm_epsilon"] = serde_json::json!(1e-6);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_ne!(load(&tmp).hash, changed.hash, "another LN eps is another model");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn hook_shapes_match_transformer_lens() {
    let g = golden("tiny-pythia");
    let model = Model::load("p", &fixtures().join("models/tiny-pythia"), &Device::Cpu).unwrap();
    let out = model.runtime.forward(&g["tokens"], true, false).unwrap();
    let l = &out.layers[1];
    assert_eq!(l.ln1_scale.dims(), &[2, 12, 1]);
    assert_eq!(l.ln2_normalized.dims(), &[2, 12, 16]);
    assert_eq!(l.pattern.dims(), &[2, 2, 12, 12]);
    assert!(out.logits.is_none());
    assert_eq!(out.ce.dims(), &[2, 11]);
}

#[test]
fn tokenizes_like_transformer_lens_to_tokens() {
    let text = std::fs::read_to_string(fixtures().join("golden/tokenize.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let model = Model::load("n", &fixtures().join("models/tiny-neo"), &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    assert_eq!(tok.bos as u64, v["bos"].as_u64().unwrap());
    let texts = v["texts"].as_array().unwrap();
    for (i, t) in texts.iter().enumerate() {
        let ids = tok.encode(t.as_str().unwrap()).unwrap();
        let want_plain: Vec<u32> =
            v["no_prepend_bos"][i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let want_bos: Vec<u32> =
            v["prepend_bos"][i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want_plain, "text {i}");
        let mut with_bos = vec![tok.bos];
        with_bos.extend(&ids);
        assert_eq!(with_bos, want_bos, "text {i} with BOS");
    }
}
