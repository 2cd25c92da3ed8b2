//! Text to token ids the way TransformerLens' `to_tokens` does it.
//!
//! Reads `tokenizer.json` (or a GPT-2 style `vocab.json` + `merges.txt`) from the model
//! folder. Texts are encoded without the tokenizer's own special tokens; `prepend_bos` puts the
//! BOS id in front, which is what TL does whether the tokenizer adds BOS itself or TL prepends
//! the BOS string manually (docs/MATH.md, "Model side").

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// A tokenizer with the model's BOS and EOS ids.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos: u32,
    pub eos: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer(bos={}, eos={})", self.bos, self.eos)
    }
}

impl TextTokenizer {
    /// Load the tokenizer of the model folder `dir`.
    ///
    /// BOS/EOS come from `tokenizer_config.json` (`bos_token`, `eos_token`), else from the
    /// model config (`bos_token_id`, `eos_token_id`), else from `<|endoftext|>`.
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<TextTokenizer> {
        let json = dir.join("tokenizer.json");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| Error::input(&json, format!("not a readable tokenizer: {e}")))?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            byte_level_bpe(dir)?
        } else {
            return Err(Error::input(dir, "no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"));
        };
        let special = read_special_tokens(dir);
        let lookup = |name: Option<String>| name.and_then(|n| inner.token_to_id(&n));
        let eot = inner.token_to_id("<|endoftext|>");
        let bos = lookup(special.0).or(cfg.bos_token_id).or(eot);
        let eos = lookup(special.1).or(cfg.eos_token_id).or(eot);
        match (bos, eos) {
            (Some(bos), Some(eos)) => Ok(TextTokenizer { inner, bos, eos }),
            _ => Err(Error::input(
                dir,
                "cannot tell the BOS/EOS token ids: expected bos_token/eos_token in \
                 tokenizer_config.json, bos_token_id/eos_token_id in config.json, or <|endoftext|>",
            )),
        }
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Usage(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of one token (for display; `<id>` if it cannot be decoded).
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(t) if !t.is_empty() => t,
            _ => self.inner.id_to_token(id).unwrap_or_else(|| format!("<{id}>")),
        }
    }

    /// Size of the tokenizer's vocabulary (with added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// `(bos_token, eos_token)` strings from `tokenizer_config.json` / `special_tokens_map.json`.
fn read_special_tokens(dir: &Path) -> (Option<String>, Option<String>) {
    let mut out = (None, None);
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        let tok = |key: &str| match &v[key] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        };
        out.0 = tok("bos_token").or(out.0);
        out.1 = tok("eos_token").or(out.1);
    }
    out
}

/// A GPT-2 byte-level BPE from `vocab.json` + `merges.txt` (older HF repos ship only these).
fn byte_level_bpe(dir: &Path) -> Result<Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| Error::input(&vocab, format!("not a readable BPE vocabulary with merges.txt: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens(&[tokenizers::AddedToken::from("<|endoftext|>", true)]);
    Ok(tok)
}
