//! `toy-lm`'s run: the corpus and tokenizer files, the training loop (AdamW with a linear decay
//! to 10% of the learning rate over the run), the saved HF folder and `report.json`, whose
//! held-out CE is measured through scae's own model loader.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use scae::util::rng::SplitMix;

use crate::corpus;
use crate::model::{causal_mask, save_hf, Model};
use crate::vocab::{write_tokenizer, Vocab};

/// A validated `toy-lm` run: the flags of the same names (`d_model` divisible by `n_heads`).
#[derive(Debug, Clone)]
pub struct ToyConfig {
    pub out: PathBuf,
    pub overwrite: bool,
    pub n_stories: usize,
    pub n_heldout: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub ctx_len: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

/// What [`train`] measured and wrote.
#[derive(Debug, Clone)]
pub struct Trained {
    pub heldout_ce: f64,
    pub unigram_entropy: f64,
    /// Vocabulary size (words).
    pub n_words: usize,
    /// Seconds since training started.
    pub seconds: f64,
    /// The saved HF folder (`<out>/model`).
    pub model_dir: PathBuf,
}

/// Refuse sizes whose training would not fit in memory.
fn check_memory(cfg: &ToyConfig) -> Result<()> {
    // Parameters (a vocabulary of at most ~1,000 words) with AdamW's gradient and two moments,
    // and one step's activations (about 16 d-wide and 3 attention-sized buffers per layer),
    // in f64 so that no size overflows.
    let (d, l, s, b) = (cfg.d_model as f64, cfg.n_layers as f64, cfg.ctx_len as f64, cfg.batch_size as f64);
    let params = 1000.0 * d + 2.0 * s * d + l * 12.0 * d * d;
    let acts = b * s * l * (16.0 * d + 3.0 * cfg.n_heads as f64 * s);
    let sizes = format!(
        "--d-model {}, --n-layers {}, --ctx-len {}, --batch-size {}",
        cfg.d_model, cfg.n_layers, cfg.ctx_len, cfg.batch_size
    );
    scae::util::mem::check_fits(4.0 * (4.0 * params + 2.0 * acts), &sizes)?;
    Ok(())
}

/// Write the stories and the tokenizer into `cfg.out`, train the model, save it as an HF folder
/// and write `report.json`.
pub fn train(cfg: &ToyConfig) -> Result<Trained> {
    check_memory(cfg)?;
    let stage = scae::util::io::StagedDir::create(&cfg.out, cfg.overwrite, "--out")?;
    let dir = stage.path().to_path_buf();
    // Corpus and held-out stories (different seeds).
    let train = corpus::corpus(cfg.n_stories, cfg.seed);
    let heldout = corpus::corpus(cfg.n_heldout, cfg.seed ^ 0xA5A5_5A5A);
    scae::util::io::write_atomic(&dir.join("corpus.txt"), (train.join("\n") + "\n").as_bytes())?;
    scae::util::io::write_atomic(&dir.join("heldout.txt"), (heldout.join("\n") + "\n").as_bytes())?;
    let vocab = Vocab::build(&train);
    let (stream, unigram_entropy) = (&vocab.stream, vocab.unigram_entropy);
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir)?;
    write_tokenizer(&model_dir, &vocab.words)?;
    let n_ctx = 2 * cfg.ctx_len;
    let mut rng = SplitMix(cfg.seed.wrapping_add(1));
    let model = Model::new(vocab.words.len(), n_ctx, cfg.d_model, cfg.n_layers, cfg.n_heads, &mut rng)?;
    let start = Instant::now();
    let last = fit(cfg, &model, stream, &mut rng, start)?;
    save_hf(&model, &model_dir, vocab.words.len(), n_ctx, cfg.ctx_len)?;
    let heldout_ce = heldout_ce(&model_dir, &heldout, cfg.ctx_len)?;
    let report = serde_json::json!({
        "format": "scae-toy-lm", "version": 1,
        "vocab_size": vocab.words.len(), "n_tokens": stream.len(), "steps": cfg.steps,
        "final_train_ce": last, "heldout_ce": heldout_ce, "unigram_entropy": unigram_entropy,
        "seconds": start.elapsed().as_secs_f64(),
    });
    scae::util::io::write_atomic(&dir.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    let out = stage.commit()?;
    Ok(Trained {
        heldout_ce,
        unigram_entropy,
        n_words: vocab.words.len(),
        seconds: start.elapsed().as_secs_f64(),
        model_dir: out.join("model"),
    })
}

/// The training loop: `cfg.steps` AdamW steps on random windows of `stream` (progress on
/// stderr every 100 steps); returns the last step's loss (NaN without steps).
fn fit(cfg: &ToyConfig, model: &Model, stream: &[u32], rng: &mut SplitMix, start: Instant) -> Result<f64> {
    let mut opt = AdamW::new(
        model.vars.values().cloned().collect(),
        ParamsAdamW { lr: cfg.lr, weight_decay: 0.01, ..Default::default() },
    )?;
    let mask = causal_mask(cfg.ctx_len)?;
    let n_windows = stream.len().saturating_sub(cfg.ctx_len + 1);
    if n_windows == 0 {
        bail!("--n-stories {}: too few tokens for --ctx-len {}", cfg.n_stories, cfg.ctx_len);
    }
    let mut last = f64::NAN;
    for step in 0..cfg.steps {
        let mut rows = Vec::with_capacity(cfg.batch_size * cfg.ctx_len);
        for _ in 0..cfg.batch_size {
            let at = (rng.next_u64() % n_windows as u64) as usize;
            rows.extend_from_slice(&stream[at..at + cfg.ctx_len]);
        }
        let tokens = Tensor::from_vec(rows, (cfg.batch_size, cfg.ctx_len), &Device::Cpu)?;
        let loss = model.loss(&tokens, &mask)?;
        opt.set_learning_rate(cfg.lr * (1.0 - 0.9 * step as f64 / cfg.steps as f64));
        opt.backward_step(&loss)?;
        last = loss.to_scalar::<f32>()? as f64;
        if step % 100 == 0 || step + 1 == cfg.steps {
            scae::note!("toy-lm: step {step:4} loss {last:.4} ({:.1}s)", start.elapsed().as_secs_f64());
        }
    }
    Ok(last)
}

/// Mean CE of the saved folder, loaded through scae's own loader (TL processing), on up to 64
/// windows of the held-out stories.
fn heldout_ce(model_dir: &Path, heldout: &[String], ctx_len: usize) -> Result<f64> {
    let loaded = scae::model::Model::load("toy", model_dir, &Device::Cpu).context("reloading the saved model")?;
    let tok = loaded.tokenizer()?;
    let mut ids: Vec<u32> = Vec::new();
    for st in heldout {
        ids.extend(tok.encode(st)?);
        ids.push(0);
    }
    let n_eval = (ids.len() / ctx_len).min(64);
    let eval = Tensor::from_vec(ids[..n_eval * ctx_len].to_vec(), (n_eval, ctx_len), &Device::Cpu)?;
    Ok(loaded.runtime.forward(&eval, false, false)?.ce.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}
