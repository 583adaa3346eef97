//! Sentence embeddings from an encoder ONNX (mean pooling over real tokens, then L2
//! normalisation), for evaluating encoders on STS.

use super::inputs;
use super::model::runnable_from_bytes;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use tract_onnx::prelude::*;
use ziplm_plugin_api::Workload;

/// Embeds sentences with an encoder model at a fixed batch and padded length.
pub struct SentenceEncoder {
    plan: Arc<TypedSimplePlan>,
    specs: Vec<inputs::InputSpec>,
    workload: Workload,
}

impl SentenceEncoder {
    /// Prepares the model (ONNX bytes) for `batch` sentences of up to `seq_len` tokens.
    pub fn new(onnx: &[u8], batch: usize, seq_len: usize) -> Result<SentenceEncoder> {
        let workload = Workload::prefill(batch, seq_len);
        let (plan, specs) = runnable_from_bytes(onnx, &workload)
            .map_err(|e| Error::numerical("preparing the encoder", format!("{e:#}")))?;
        Ok(SentenceEncoder { plan, specs, workload })
    }

    /// Embeds `sentences` (tokenised with `tok`, truncated to the sequence length).
    pub fn embed(&self, tok: &Tokenizer, sentences: &[String]) -> Result<Vec<Vec<f32>>> {
        let (b, s) = (self.workload.batch, self.workload.seq_len);
        let mut out = Vec::with_capacity(sentences.len());
        for chunk in sentences.chunks(b) {
            let mut ids = vec![0i64; b * s];
            let mut mask = vec![0i64; b * s];
            for (i, sent) in chunk.iter().enumerate() {
                let mut t = tok.encode(sent, true)?;
                t.truncate(s);
                for (j, &id) in t.iter().enumerate() {
                    ids[i * s + j] = id;
                    mask[i * s + j] = 1;
                }
            }
            let inputs = inputs::build_inputs(&self.specs, &self.workload, &ids, &mask)
                .map_err(|e| Error::numerical("encoder inputs", format!("{e:#}")))?;
            let res = self.plan.run(inputs).map_err(|e| Error::numerical("running the encoder", format!("{e:#}")))?;
            let hidden = res[0].cast_to::<f32>().map_err(|e| Error::numerical("encoder output", format!("{e:#}")))?;
            let view = hidden
                .to_plain_array_view::<f32>()
                .map_err(|e| Error::numerical("encoder output", format!("{e:#}")))?;
            let shape = view.shape().to_vec();
            if shape.len() != 3 || shape[0] != b || shape[1] != s {
                return Err(Error::numerical("encoder output", format!("expected [batch, seq, hidden], got {shape:?}")));
            }
            let d = shape[2];
            for i in 0..chunk.len() {
                let mut e = vec![0f32; d];
                let mut n = 0f32;
                for j in 0..s {
                    if mask[i * s + j] == 1 {
                        n += 1.0;
                        for k in 0..d {
                            e[k] += view[[i, j, k]];
                        }
                    }
                }
                let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                out.push(e.iter().map(|v| v / n.max(1.0) / (norm / n.max(1.0))).collect());
            }
        }
        Ok(out)
    }
}
