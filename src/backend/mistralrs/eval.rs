//! Language-model quality: perplexity over a token stream in non-overlapping windows.

use super::llama::LlamaWeights;
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
/// At most `max_windows` windows when given.
pub fn perplexity(
    w: &LlamaWeights,
    ids: &[u32],
    window: usize,
    max_windows: Option<usize>,
) -> candle_core::Result<Perplexity> {
    let mut nll = 0.0;
    let mut n = 0;
    let mut windows = 0;
    for chunk in ids.chunks(window.max(2)) {
        if max_windows.is_some_and(|m| windows >= m) {
            break;
        }
        let (s, c) = w.window_nll(chunk)?;
        nll += s;
        n += c;
        windows += 1;
    }
    let mean = nll / n.max(1) as f64;
    Ok(Perplexity {
        ppl: mean.exp(),
        mean_nll: mean,
        tokens: n,
        windows,
    })
}
