//! Language-model quality: perplexity over a token stream in non-overlapping windows;
//! against a reference (the dense model), next-token agreement and KL divergence on the
//! same windows; and greedy chat replies to a probe set of plain questions, checked by
//! keyword.

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
    let totals = over_windows("perplexity", ids, window, max_windows, progress, |chunk| {
        let (nll, n) = w.window_nll(chunk)?;
        Ok((nll, n, 0.0, 0))
    })?;
    Ok(totals.perplexity())
}

/// Sums of the window statistics over a token stream.
struct Totals {
    nll: f64,
    tokens: usize,
    kl: f64,
    matches: usize,
    windows: usize,
}

impl Totals {
    fn perplexity(&self) -> Perplexity {
        let mean = self.nll / self.tokens.max(1) as f64;
        Perplexity {
            ppl: mean.exp(),
            mean_nll: mean,
            tokens: self.tokens,
            windows: self.windows,
        }
    }
}

/// Runs `score` (a window's `(sum of NLL, tokens, sum of KL, top-1 matches)`) over the
/// non-overlapping windows of `ids` (the last, shorter one included; at most
/// `max_windows`), one progress unit per window, and sums what it returns.
fn over_windows(
    label: &str,
    ids: &[u32],
    window: usize,
    max_windows: Option<usize>,
    progress: &dyn Progress,
    mut score: impl FnMut(&[u32]) -> candle_core::Result<(f64, usize, f64, usize)>,
) -> candle_core::Result<Totals> {
    let window = window.max(2);
    let total = ids.len().div_ceil(window);
    progress.start(label, max_windows.map_or(total, |m| m.min(total)) as u64);
    let mut t = Totals {
        nll: 0.0,
        tokens: 0,
        kl: 0.0,
        matches: 0,
        windows: 0,
    };
    for chunk in ids.chunks(window) {
        if max_windows.is_some_and(|m| t.windows >= m) {
            break;
        }
        let (nll, n, kl, matches) = score(chunk)?;
        t.nll += nll;
        t.tokens += n;
        t.kl += kl;
        t.matches += matches;
        t.windows += 1;
        progress.advance(1);
    }
    progress.finish();
    Ok(t)
}

/// A model's next-token distributions against a reference's on the same windows.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Fraction of predicted tokens whose most likely next token is the reference's.
    pub top1: f64,
    /// Mean KL(reference || model) of the next-token distributions (nats per token).
    pub kl: f64,
    /// Predicted tokens compared.
    pub tokens: usize,
}

/// The statistics of one window: `(sum of NLL of the model, tokens, sum of KL, top-1
/// matches)`.
fn window_against(
    model: &LlamaWeights,
    reference: &LlamaWeights,
    ids: &[u32],
) -> candle_core::Result<(f64, usize, f64, usize)> {
    use candle_core::{Tensor, D};
    if ids.len() < 2 {
        return Ok((0.0, 0, 0.0, 0));
    }
    let lp = model.window_log_probs(ids)?;
    let lq = reference.window_log_probs(ids)?;
    let n = ids.len() - 1;
    let target = Tensor::new(&ids[1..], lp.device())?.unsqueeze(1)?;
    let nll = -(lp.gather(&target, 1)?.sum_all()?.to_scalar::<f32>()? as f64);
    // KL(q || p) = sum q (log q - log p), per position.
    let kl = (lq.exp()? * (&lq - &lp)?)?.sum_all()?.to_scalar::<f32>()? as f64;
    let a = lp.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let b = lq.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let matches = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    Ok((nll, n, kl, matches))
}

/// Perplexity of `model` and its [`Agreement`] with `reference` on `ids`, in the same
/// windows as [`perplexity`].
pub fn perplexity_against(
    model: &LlamaWeights,
    reference: &LlamaWeights,
    ids: &[u32],
    window: usize,
    max_windows: Option<usize>,
    progress: &dyn Progress,
) -> candle_core::Result<(Perplexity, Agreement)> {
    let t = over_windows(
        "perplexity and agreement",
        ids,
        window,
        max_windows,
        progress,
        |chunk| window_against(model, reference, chunk),
    )?;
    let n = t.tokens.max(1) as f64;
    Ok((
        t.perplexity(),
        Agreement {
            top1: t.matches as f64 / n,
            kl: t.kl / n,
            tokens: t.tokens,
        },
    ))
}

/// Greedy replies (at most `max_tokens` each) of the model at `model`, loaded in
/// mistral.rs as it is served, to every probe; one progress unit per probe.
pub fn probe_replies(
    model: &std::path::Path,
    probes: &[crate::data::probes::Probe],
    max_tokens: usize,
    progress: &dyn Progress,
) -> crate::Result<Vec<crate::data::probes::ProbeReply>> {
    use crate::data::probes::{answers, ProbeReply};
    let rt = super::LoadedModel::load(model)?;
    progress.start("chat probes", probes.len() as u64);
    let mut out = vec![];
    for p in probes {
        let reply = rt.chat(&p.question, max_tokens)?.text;
        out.push(ProbeReply {
            question: p.question.clone(),
            answered: answers(p, &reply),
            reply,
        });
        progress.advance(1);
    }
    progress.finish();
    Ok(out)
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
    Ok(text_eval(model, None, text, tokenizer, window, max_windows, progress)?.0)
}

/// [`text_perplexity`], and with a `reference` model (the dense one) the [`Agreement`]
/// of the model's next-token distributions with the reference's on the same windows.
pub fn text_eval(
    model: &std::path::Path,
    reference: Option<&std::path::Path>,
    text: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    window: usize,
    max_windows: Option<usize>,
    progress: &dyn Progress,
) -> crate::Result<(Perplexity, Option<Agreement>)> {
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
    let failed = |e: candle_core::Error| {
        Error::Invalid(format!("{}: forward pass failed: {e}", model.display()))
    };
    let Some(reference) = reference else {
        return Ok((
            perplexity(&llm.weights, &ids, window, max_windows, progress).map_err(failed)?,
            None,
        ));
    };
    let dense = super::LlamaModel::load(reference, super::LlamaOptions::default())?;
    let (a, b) = (&llm.weights.config, &dense.weights.config);
    if (a.vocab, a.hidden) != (b.vocab, b.hidden) {
        return Err(Error::Invalid(format!(
            "{} (vocabulary {}, width {}) is not a pruned form of {} (vocabulary {}, width {}): give the dense model the pruned one was made from",
            model.display(),
            a.vocab,
            a.hidden,
            reference.display(),
            b.vocab,
            b.hidden
        )));
    }
    let (p, agreement) = perplexity_against(
        &llm.weights,
        &dense.weights,
        &ids,
        window,
        max_windows,
        progress,
    )
    .map_err(failed)?;
    Ok((p, Some(agreement)))
}
