//! Tokenisation with the model's own `tokenizer.json` (the `tokenizers` crate).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A tokenizer with padding and truncation switched off (samples are padded by the
/// backend with an attention mask; padding inside the tokenizer would be averaged into
/// mean-pooled embeddings).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Format {
            path: path.into(),
            detail: format!("not a tokenizer.json the tokenizers library can load: {e}"),
        })?;
        Self::from_tokenizer(inner, path)
    }

    /// Wraps a tokenizer built in memory (e.g. from a GGUF file's metadata); `origin`
    /// names it in errors.
    pub fn from_tokenizer(mut inner: tokenizers::Tokenizer, origin: &Path) -> Result<Tokenizer> {
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::Format {
            path: origin.into(),
            detail: format!("cannot disable truncation: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
            path: origin.into(),
        })
    }

    /// The `tokenizer.json` of a model: inside a model folder, or next to a model file.
    pub fn next_to(model: &Path) -> Option<PathBuf> {
        let dir = if model.is_dir() {
            model
        } else {
            model.parent()?
        };
        let p = dir.join("tokenizer.json");
        p.is_file().then_some(p)
    }

    /// Token ids of `text` (with the model's special tokens when `special`).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| Error::Format {
                path: self.path.clone(),
                detail: format!("tokenising failed: {e}"),
            })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
