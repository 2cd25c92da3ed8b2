//! Feature pages as the circuit-tracer / Neuronpedia graph UI loads them
//! (`view-features --neuronpedia DIR`): one `DIR/<id>.json` per feature, where `<id>` is the
//! feature's number in an attribution graph's nodes (`feature` = cantor(layer, f) =
//! (layer + f)(layer + f + 1)/2 + f, each module on its own layer index: attn_L → 2L,
//! mlp_L → 2L + 1), so that a graph whose `metadata.scan` points at DIR finds its pages.
//!
//! Fields (the UI's feature model): `transcoder_id` (the module), `index` (the feature within
//! it), `examples_quantiles` (`Top activations`: the top contexts; `Sampled`: the reservoir of
//! contexts, by activation; each example `tokens` as text, `tokens_acts_list`,
//! `train_token_ind` the activating token, `is_repeated_datapoint`), `top_logits` /
//! `bottom_logits` (the logit lens, as text), `act_min` / `act_max`, `quantile_values`
//! (deciles of the sampled activations), `histogram` (the sampled activations in
//! [`super::page::BINS`] bins from 0 to `act_max`), `activation_frequency` (share of tokens).

use std::path::Path;

use serde_json::{json, Value};

use super::{Browse, Context};
use crate::error::Result;
use crate::formats::suite::Suite;
use crate::model::tokenize::TextTokenizer;

pub use crate::model::{graph_feature, graph_layer};

fn example(c: &Context, tok: &TextTokenizer) -> Value {
    json!({
        "tokens": c.tokens.iter().map(|&t| tok.token_text(t)).collect::<Vec<_>>(),
        "tokens_acts_list": c.acts,
        "train_token_ind": c.at,
        "is_repeated_datapoint": false,
    })
}

/// Write one page per feature of every module into `dir`; returns how many.
pub fn write(dir: &Path, browse: &Browse, suite: &Suite, tok: &TextTokenizer) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
    let mut n = 0;
    for (mi, module) in suite.modules.iter().enumerate() {
        let layer = graph_layer(module);
        for (f, fs) in browse.stats[mi].iter().enumerate() {
            let lens = &browse.lens[mi][f];
            let mut sorted = fs.samples.clone();
            sorted.sort_by(f32::total_cmp);
            let q = |p: f64| sorted.get(((sorted.len() - 1) as f64 * p).round() as usize).copied().unwrap_or(0.0);
            let quantiles: Vec<f32> =
                if sorted.is_empty() { vec![] } else { (1..10).map(|k| q(k as f64 / 10.0)).collect() };
            let mut histogram = vec![0u32; super::page::BINS];
            for &a in &sorted {
                let b = ((a / fs.max.max(f32::MIN_POSITIVE)) * super::page::BINS as f32) as usize;
                histogram[b.min(super::page::BINS - 1)] += 1;
            }
            let page = json!({
                "transcoder_id": module.name(),
                "index": f,
                "examples_quantiles": [
                    {"quantile_name": "Top activations", "examples": fs.top.iter().map(|c| example(c, tok)).collect::<Vec<_>>()},
                    {"quantile_name": "Sampled", "examples": fs.sampled.iter().map(|c| example(c, tok)).collect::<Vec<_>>()},
                ],
                "top_logits": lens.top.iter().map(|(t, _)| tok.token_text(*t)).collect::<Vec<_>>(),
                "bottom_logits": lens.bottom.iter().map(|(t, _)| tok.token_text(*t)).collect::<Vec<_>>(),
                "act_min": sorted.first().copied().unwrap_or(0.0),
                "act_max": fs.max,
                "quantile_values": quantiles,
                "histogram": if fs.count > 0 { histogram } else { vec![] },
                "activation_frequency": fs.count as f64 / browse.n_tokens.max(1) as f64,
            });
            let path = dir.join(format!("{}.json", graph_feature(layer, f as u64)));
            crate::util::io::write_atomic(&path, page.to_string().as_bytes())?;
            n += 1;
        }
    }
    Ok(n)
}
