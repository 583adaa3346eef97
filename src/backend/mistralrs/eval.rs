//! Language-model quality: perplexity over a token stream in non-overlapping windows.

use super::llama::LlamaWeights;
use crate::progress::Progress;
use serde::{Deserialize, Serialize};

/// A perplexity measurement.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Perplexity {
    /// exp(mean NLL).
    pub ppl: f64,
    /// Mean negative log-likelihood per predicted token (nats).
    pub mean_nll: f64,
    /// Predicted tokens.
    pub tokens: usize,
    /// Windows evaluated.
    pub windows: usize,
}

/// Perplexity of `w` on `ids`, cut into non-overlapping windows of `window` tokens (the
/// last, shorter one included); in each window every token but the first is predicted.
/// At most `max_windows` windows when given; one progress unit per window.
pub fn perplexity(
    w: &LlamaWeights,
    ids: &[u32],
    window: usize,
    max_windows: Option<usize>,
    progress: &dyn Progress,
) -> candle_core::Result<Perplexity> {
    let window = window.max(2);
    let total = ids.len().div_ceil(window);
    progress.start(
        "perplexity",
        max_windows.map_or(total, |m| m.min(total)) as u64,
    );
    let mut nll = 0.0;
    let mut n = 0;
    let mut windows = 0;
    for chunk in ids.chunks(window) {
        if max_windows.is_some_and(|m| windows >= m) {
            break;
        }
        let (s, c) = w.window_nll(chunk)?;
        nll += s;
        n += c;
        windows += 1;
        progress.advance(1);
    }
    progress.finish();
    let mean = nll / n.max(1) as f64;
    Ok(Perplexity {
        ppl: mean.exp(),
        mean_nll: mean,
        tokens: n,
        windows,
    })
}

/// Perplexity of the model at `model` (GGUF file or folder) on a whole text file,
/// tokenised without BOS by the model's tokenizer (`tokenizer`, else the one next to
/// the model, else the GGUF metadata's), in non-overlapping windows of `window` tokens.
pub fn text_perplexity(
    model: &std::path::Path,
    text: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    window: usize,
    max_windows: Option<usize>,
    progress: &dyn Progress,
) -> crate::Result<Perplexity> {
    use crate::Error;
    if window < 2 {
        return Err(Error::Invalid(format!(
            "perplexity windows need at least 2 tokens, got {window}"
        )));
    }
    if max_windows == Some(0) {
        return Err(Error::Invalid(
            "--windows 0 evaluates nothing: give at least 1, or leave it out for the whole text"
                .into(),
        ));
    }
    let llm = super::LlamaModel::load(model, super::LlamaOptions::default())?;
    let tok = super::driver::model_tokenizer(model, tokenizer, &llm)?;
    let raw = std::fs::read_to_string(text)
        .map_err(|e| Error::Invalid(format!("{}: cannot read the text ({e})", text.display())))?;
    let ids: Vec<u32> = tok
        .encode(&raw, false)?
        .into_iter()
        .map(|i| i as u32)
        .collect();
    if ids.len() < 2 {
        return Err(Error::Invalid(format!(
            "{}: {} token(s) after tokenising; perplexity needs at least 2 (is the file empty?)",
            text.display(),
            ids.len()
        )));
    }
    let vocab = llm.weights.config.vocab;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::Invalid(format!(
            "the tokenizer gives id {bad}, beyond the model's vocabulary of {vocab}: \
             pass the model's own tokenizer.json with --tokenizer"
        )));
    }
    perplexity(&llm.weights, &ids, window, max_windows, progress)
        .map_err(|e| Error::Invalid(format!("{}: forward pass failed: {e}", model.display())))
}
