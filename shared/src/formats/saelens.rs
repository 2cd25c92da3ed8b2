//! Export to SAELens 6.x (`convert-suite --to saelens`): one folder per module, each loadable
//! with `SAE.load_from_disk(folder)` (`cfg.json` + `sae_weights.safetensors`; INTEROP notes).
//!
//! Every module is written as SAELens' `topk` architecture, whose encode keeps the k largest of
//! `(x − b_dec) @ W_enc + b_enc` and applies ReLU to them, exactly scae's encoder
//! (`apply_b_dec_to_input: true`), with `W_enc = w_encᵀ [d_in, d_sae]` and `W_dec = w_decᵀ
//! [d_sae, d_in]`. For `attn_L` (an SAE on `hook_attn_out`) that is the whole model. For `mlp_L`
//! (a transcoder `ln2.hook_normalized -> hook_mlp_out`) the encode is exact too, and `decode`
//! gives the transcoder's prediction of `hook_mlp_out`, not a reconstruction of its input:
//! SAELens' own transcoders (`transcoder`, `jumprelu_transcoder`, skip variants) have no top-k,
//! so none of them computes scae's transcoder. The folder's `cfg.json` says so in its metadata
//! (`hook_name_out`, `scae_kind: "transcoder"`) and its README.md spells it out.

use std::path::Path;

use crate::error::{Error, Result};
use crate::formats::suite::Suite;
use crate::model::Kind;
use crate::util::blas::transpose;
use crate::util::io::{write_atomic, write_safetensors};

/// The version written as `metadata.sae_lens_version` (6.x: the current config layout; older
/// versions make SAELens convert the folder).
pub const SAE_LENS_VERSION: &str = "6.0.0";

/// The TransformerLens hook names a module reads and writes.
pub fn hooks(kind: Kind, layer: usize) -> (String, String) {
    match kind {
        Kind::Attn => (format!("blocks.{layer}.hook_attn_out"), format!("blocks.{layer}.hook_attn_out")),
        Kind::Mlp => (format!("blocks.{layer}.ln2.hook_normalized"), format!("blocks.{layer}.hook_mlp_out")),
    }
}

/// Write every module of `suite` (given as `given`: recorded with its id) as a SAELens folder
/// `dir/<module>/`; with `acts`, also each module's `sparsity.safetensors` over that cache.
pub fn write(dir: &Path, suite: &Suite, given: &Path, acts: Option<&Path>) -> Result<()> {
    let suite_id = suite.id()?;
    let sparsity = acts.map(|a| log_sparsity(suite, a)).transpose()?;
    let (d, f, k) = (suite.d_model, suite.n_features, suite.k);
    let params = suite.host_params()?;
    // Sequence layout and data of the suite's first training stage, when its lineage says.
    let trained = suite.lineage.trained_on.first();
    for (module, p) in suite.modules.iter().zip(&params) {
        let folder = dir.join(module.name());
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        let (hook_in, hook_out) = hooks(module.kind, module.layer);
        let transcoder = module.kind == Kind::Mlp;
        let cpu = &candle_core::Device::Cpu;
        let t = |v: Vec<f32>, shape: &[usize]| candle_core::Tensor::from_vec(v, shape, cpu);
        let tensors = vec![
            ("W_enc".to_string(), t(transpose(&p.w_enc, f, d), &[d, f])?),
            ("b_enc".to_string(), t(p.b_enc.clone(), &[f])?),
            ("W_dec".to_string(), t(transpose(&p.w_dec, d, f), &[f, d])?),
            ("b_dec".to_string(), t(p.b_dec.clone(), &[d])?),
        ];
        write_safetensors(&folder.join("sae_weights.safetensors"), tensors, &Default::default())?;
        if let Some(sp) = &sparsity {
            let m = suite.modules.iter().position(|x| x == module).expect("a module of the suite");
            let t = candle_core::Tensor::from_vec(sp[m].clone(), f, cpu)?;
            write_safetensors(
                &folder.join("sparsity.safetensors"),
                [("sparsity".to_string(), t)],
                &Default::default(),
            )?;
        }
        let mut metadata = serde_json::json!({
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": SAE_LENS_VERSION,
            "model_name": suite.model_id,
            "hook_name": hook_in,
            "prepend_bos": trained.map(|t| t.prepend_bos),
            "context_size": trained.map(|t| t.ctx_len),
            "dataset_path": trained.and_then(|t| t.data.as_ref()).map(|d| d.source.clone()),
            "scae_module": module.name(),
            "scae_kind": if transcoder { "transcoder" } else { "sae" },
            "scae_suite": given.display().to_string(),
            "scae_suite_id": suite_id,
        });
        if transcoder {
            metadata["hook_name_out"] = serde_json::json!(hook_out);
            metadata["scae_note"] = serde_json::json!(TRANSCODER_NOTE);
        }
        let cfg = serde_json::json!({
            "architecture": "topk",
            "d_in": d,
            "d_sae": f,
            "k": k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": true,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": metadata,
        });
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Usage(format!("cfg.json: {e}")))?;
        write_atomic(&folder.join("cfg.json"), text.as_bytes())?;
        if transcoder {
            let readme = format!(
                "# {name}: a TopK transcoder written as a SAELens `topk` SAE\n\n\
                 Input `{hook_in}`, output `{hook_out}` (TransformerLens names), k = {k}.\n\n\
                 {TRANSCODER_NOTE}\n\n\
                 ```python\nfrom sae_lens import SAE\nsae = SAE.load_from_disk(\"{name}\")\n\
                 feats = sae.encode(x)          # x: activations at {hook_in}; exactly scae's features\n\
                 mlp_out = sae.decode(feats)    # the transcoder's prediction of {hook_out}\n```\n",
                name = module.name()
            );
            write_atomic(&folder.join("README.md"), readme.as_bytes())?;
        }
    }
    Ok(())
}

/// Each module's `log10(firing frequency + 1e-10)` per feature (SAELens' `sparsity`) over the
/// tokens of the cache at `acts`: the module on its own input (`hook_attn_out`, or
/// `ln2.hook_normalized` for a transcoder), its features those of its top-k encoder.
pub fn log_sparsity(suite: &Suite, acts: &Path) -> Result<Vec<Vec<f32>>> {
    let cache = crate::formats::cache::Cache::open(acts)?;
    let (d, f) = (suite.d_model, suite.n_features);
    if cache.manifest.model.d_model != d {
        return Err(Error::input(
            acts,
            format!("--acts: the cache's d_model is {}, the suite's {d}", cache.manifest.model.d_model),
        ));
    }
    let cpu = candle_core::Device::Cpu;
    let enc = suite
        .aes
        .iter()
        .map(|ae| {
            Ok((ae.w_enc.as_tensor().t()?.contiguous()?, ae.b_enc.as_tensor().clone(), ae.b_dec.as_tensor().clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut counts = vec![vec![0u64; f]; suite.modules.len()];
    let mut n_tokens = 0u64;
    cache.for_each_batch(64, None, &cpu, |batch| {
        for (m, module) in suite.modules.iter().enumerate() {
            let x = match module.kind {
                Kind::Attn => &batch.attn_out[module.layer],
                Kind::Mlp => &batch.ln2_normalized[module.layer],
            };
            let x = x.to_dtype(candle_core::DType::F32)?.reshape(((), d))?;
            let (w, b_enc, b_dec) = &enc[m];
            let pre = x.broadcast_sub(b_dec)?.matmul(w)?.broadcast_add(b_enc)?;
            let fired =
                crate::sae::topk::topk_relu_device(&pre, suite.k)?.gt(0f32)?.to_dtype(candle_core::DType::F32)?;
            let per: Vec<f32> = fired.sum(0)?.to_vec1()?;
            counts[m].iter_mut().zip(per).for_each(|(c, p)| *c += p as u64);
        }
        n_tokens += batch.tokens.elem_count() as u64;
        Ok(())
    })?;
    Ok(counts
        .iter()
        .map(|c| c.iter().map(|&n| (n as f64 / n_tokens.max(1) as f64 + 1e-10).log10() as f32).collect())
        .collect())
}

/// What the folder of a transcoder says about SAELens' view of it.
const TRANSCODER_NOTE: &str = "SAELens has no TopK transcoder (its transcoders are ReLU or JumpReLU), so this \
transcoder is written as a `topk` SAE: `encode` equals scae's features exactly, and `decode` gives the \
transcoder's prediction of hook_name_out, not a reconstruction of its input hook_name. Tools that splice an \
SAE back into its own hook (SAELens' evals, HookedSAETransformer) would put it at the wrong hook: splice \
`decode` into hook_name_out instead.";
