//! The toy corpus's word-level vocabulary and its HF tokenizer files.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;

use crate::corpus;

/// The vocabulary of the training stories and the stories as one token stream.
pub struct Vocab {
    /// `<|endoftext|>` = 0 (BOS/EOS), `<|unk|>` = 1, then words by first use.
    pub words: Vec<String>,
    /// Every story's ids followed by 0.
    pub stream: Vec<u32>,
    /// Entropy of the unigram distribution of `stream`, in nats.
    pub unigram_entropy: f64,
}

impl Vocab {
    /// Build from the training stories.
    pub fn build(train: &[String]) -> Vocab {
        let mut vocab: Vec<String> = vec!["<|endoftext|>".into(), "<|unk|>".into()];
        let mut index: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, w)| (w.clone(), i as u32)).collect();
        let mut counts: Vec<u64> = vec![0; 2];
        let mut stream: Vec<u32> = Vec::new();
        for st in train {
            for w in corpus::words(st) {
                let id = *index.entry(w.clone()).or_insert_with(|| {
                    vocab.push(w.clone());
                    counts.push(0);
                    (vocab.len() - 1) as u32
                });
                counts[id as usize] += 1;
                stream.push(id);
            }
            stream.push(0);
            counts[0] += 1;
        }
        let total: u64 = counts.iter().sum();
        let unigram_entropy: f64 = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / total as f64;
                -p * p.ln()
            })
            .sum();
        Vocab { words: vocab, stream, unigram_entropy }
    }
}

/// A word-level `tokenizer.json` (Whitespace pre-tokenizer) plus `tokenizer_config.json`.
pub fn write_tokenizer(dir: &Path, vocab: &[String]) -> Result<()> {
    let map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::json!(i))).collect();
    let special = |id: usize, content: &str| serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<|endoftext|>"), special(1, "<|unk|>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "<|unk|>"},
    });
    scae::util::io::write_atomic(&dir.join("tokenizer.json"), serde_json::to_string(&tok)?.as_bytes())?;
    let cfg = serde_json::json!({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|unk|>", "model_max_length": 1000000, "tokenizer_class": "PreTrainedTokenizerFast"});
    scae::util::io::write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    Ok(())
}
