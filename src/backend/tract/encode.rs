//! Sentence embeddings from an encoder ONNX (mean pooling over real tokens, then L2
//! normalisation), for evaluating encoders on STS.
//!
//! Sentences are sorted by length and run in batches at the smallest of a few compiled
//! sequence lengths that fits them, so short sentences do not pay for padding.

use super::inputs;
use super::model::runnable_from_bytes;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use tract_onnx::prelude::*;
use ziplm_plugin_api::Workload;

/// Embeds sentences with an encoder model.
pub struct SentenceEncoder {
    /// (workload, plan, input specs), by increasing sequence length.
    plans: Vec<(Workload, Arc<TypedSimplePlan>, Vec<inputs::InputSpec>)>,
}

fn err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::numerical(context, format!("{e:#}"))
}

impl SentenceEncoder {
    /// Prepares the model (ONNX bytes) for `batch` sentences of up to `max_len` tokens.
    pub fn new(onnx: &[u8], batch: usize, max_len: usize) -> Result<SentenceEncoder> {
        let mut lens: Vec<usize> = [16, 32, 64, 128, 256, 512]
            .into_iter()
            .filter(|&l| l < max_len)
            .collect();
        lens.push(max_len);
        let mut plans = vec![];
        for len in lens {
            let w = Workload::prefill(batch, len);
            let (plan, specs) =
                runnable_from_bytes(onnx, &w).map_err(|e| err("preparing the encoder", e))?;
            plans.push((w, plan, specs));
        }
        Ok(SentenceEncoder { plans })
    }

    /// Embeds `sentences` (tokenised with `tok`, truncated to the longest length).
    pub fn embed(&self, tok: &Tokenizer, sentences: &[String]) -> Result<Vec<Vec<f32>>> {
        let max = self.plans.last().map(|p| p.0.seq_len).unwrap_or(0);
        let mut tokens: Vec<(usize, Vec<i64>)> = sentences
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut t = tok.encode(s, true)?;
                t.truncate(max);
                Ok((i, t))
            })
            .collect::<Result<_>>()?;
        tokens.sort_by_key(|(_, t)| t.len());
        let mut out: Vec<Vec<f32>> = vec![vec![]; sentences.len()];
        let batch = self.plans[0].0.batch;
        for chunk in tokens.chunks(batch) {
            let longest = chunk.iter().map(|(_, t)| t.len()).max().unwrap_or(1);
            let (w, plan, specs) = self
                .plans
                .iter()
                .find(|p| p.0.seq_len >= longest)
                .expect("max length");
            let s = w.seq_len;
            let mut ids = vec![0i64; batch * s];
            let mut mask = vec![0i64; batch * s];
            for (i, (_, t)) in chunk.iter().enumerate() {
                for (j, &id) in t.iter().enumerate() {
                    ids[i * s + j] = id;
                    mask[i * s + j] = 1;
                }
            }
            let ins = inputs::build_inputs(specs, w, &ids, &mask)
                .map_err(|e| err("encoder inputs", e))?;
            let res = plan.run(ins).map_err(|e| err("running the encoder", e))?;
            let hidden = res[0]
                .cast_to::<f32>()
                .map_err(|e| err("encoder output", e))?;
            let view = hidden
                .to_plain_array_view::<f32>()
                .map_err(|e| err("encoder output", e))?;
            let shape = view.shape().to_vec();
            if shape.len() != 3 || shape[0] != batch || shape[1] != s {
                return Err(Error::numerical(
                    "encoder output",
                    format!("expected [batch, seq, hidden], got {shape:?}"),
                ));
            }
            let d = shape[2];
            for (i, (orig, _)) in chunk.iter().enumerate() {
                let mut e = vec![0f32; d];
                for j in 0..s {
                    if mask[i * s + j] == 1 {
                        for k in 0..d {
                            e[k] += view[[i, j, k]];
                        }
                    }
                }
                // Mean then L2-normalise: the mean's scale cancels.
                let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                out[*orig] = e.iter().map(|v| v / norm).collect();
            }
        }
        Ok(out)
    }
}

/// STS Benchmark Spearman x100 of the encoder at `model` on the pairs of `sts` (`ziplm
/// eval --sts`), with its tokenizer (`tokenizer`, else `tokenizer.json` next to the
/// model); `batch` sentences of up to `max_len` tokens per run. Returns the score and
/// the number of pairs.
pub fn sts_score(
    model: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    sts: &std::path::Path,
    batch: usize,
    max_len: usize,
) -> Result<(f64, usize)> {
    let tok_path = tokenizer
        .map(std::path::Path::to_path_buf)
        .or_else(|| Tokenizer::next_to(model))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no tokenizer.json next to {}; pass --tokenizer",
                model.display()
            ))
        })?;
    let tok = Tokenizer::from_file(&tok_path)?;
    let pairs = crate::data::sts::read_pairs(sts)?;
    let bytes = std::fs::read(model).map_err(|e| Error::io(model, e))?;
    let enc = SentenceEncoder::new(&bytes, batch, max_len)?;
    let score = crate::data::sts::evaluate(&pairs, &mut |s: &[String]| enc.embed(&tok, s))?;
    Ok((score, pairs.len()))
}
