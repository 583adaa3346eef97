//! The loss hook of the tract backend: how far a candidate plan's model output is
//! from the dense model's, on held calibration batches.
//!
//! SPDY refinement (`search::spdy`) scores DP solutions with it. A candidate is
//! emitted to ONNX in memory (the same bytes the emit step would write), loaded in
//! tract and run on the batches; the loss is the relative squared error of the first
//! output (`last_hidden_state` or logits) over the real (unmasked) tokens:
//! `sum (pruned - dense)^2 / sum dense^2`.

use super::model::{pad_batch, runnable_from_bytes, TractModel};
use super::{inputs, onnx};
use ziplm_plugin_api::{AdapterError, AdapterResult, Plan, PrunedWeights, Workload};

/// Samples per batch of the loss.
const LOSS_BATCH: usize = 8;

/// Dense outputs on fixed batches, and the scoring of candidates against them.
pub struct OutputLoss {
    workload: Workload,
    /// `(ids, mask)` per batch.
    batches: Vec<(Vec<i64>, Vec<i64>)>,
    /// Dense first output per batch (f32, row-major) and its shape.
    dense: Vec<(Vec<f32>, Vec<usize>)>,
}

fn runtime(context: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::runtime(context, format!("{e:#}"))
}

impl OutputLoss {
    /// Takes the first `samples` calibration samples (cut to `seq_len` tokens), runs the
    /// dense model on them and keeps its outputs.
    pub fn new(
        model: &TractModel,
        calibration: &[Vec<i64>],
        samples: usize,
        seq_len: usize,
    ) -> AdapterResult<OutputLoss> {
        let held: Vec<Vec<i64>> = calibration
            .iter()
            .filter(|s| !s.is_empty())
            .take(samples.max(1))
            .map(|s| s[..s.len().min(seq_len)].to_vec())
            .collect();
        if held.is_empty() {
            return Err(AdapterError::Calibration(
                "the loss needs at least one calibration sample".into(),
            ));
        }
        let seq = held.iter().map(Vec::len).max().unwrap_or(1);
        let batch = LOSS_BATCH.min(held.len());
        let workload = Workload::prefill(batch, seq);
        let batches: Vec<(Vec<i64>, Vec<i64>)> = held
            .chunks(batch)
            .map(|c| pad_batch(c, batch, seq))
            .collect();
        let mut loss = OutputLoss {
            workload,
            batches,
            dense: vec![],
        };
        loss.dense = loss.outputs(&model.file().to_bytes())?;
        Ok(loss)
    }

    /// The first output of the model in `bytes` on every batch.
    fn outputs(&self, bytes: &[u8]) -> AdapterResult<Vec<(Vec<f32>, Vec<usize>)>> {
        let (plan, specs) = runnable_from_bytes(bytes, &self.workload)
            .map_err(|e| runtime("loading a candidate for the loss", e))?;
        let mut out = vec![];
        for (ids, mask) in &self.batches {
            let inputs = inputs::build_inputs(&specs, &self.workload, ids, mask)
                .map_err(|e| runtime("building loss inputs", e))?;
            let result = plan
                .run(inputs)
                .map_err(|e| runtime("running a candidate for the loss", e))?;
            let t = result[0]
                .cast_to::<f32>()
                .map_err(|e| runtime("reading the output", e))?;
            let shape = t.shape().to_vec();
            let data: Vec<f32> = t
                .to_plain_array_view::<f32>()
                .map_err(|e| runtime("reading the output", e))?
                .iter()
                .copied()
                .collect();
            out.push((data, shape));
        }
        Ok(out)
    }

    /// Relative squared output error of a plan with its compensated weights.
    pub fn loss(
        &self,
        model: &TractModel,
        plan: &Plan,
        weights: &PrunedWeights,
    ) -> AdapterResult<f64> {
        let bytes = onnx::emit(model, plan, weights)?;
        let pruned = self.outputs(&bytes)?;
        let (mut num, mut den) = (0f64, 0f64);
        for (((p, p_shape), (d, d_shape)), (_, mask)) in
            pruned.iter().zip(&self.dense).zip(&self.batches)
        {
            if p_shape != d_shape {
                return Err(AdapterError::runtime(
                    "scoring a candidate",
                    format!("output shape {p_shape:?}, dense {d_shape:?}"),
                ));
            }
            // Token-major outputs ([batch, seq, ...]) are compared on real tokens only.
            let tokens = mask.len();
            let per_token = if d_shape.len() >= 2 && d_shape[0] * d_shape[1] == tokens {
                d.len() / tokens
            } else {
                0
            };
            for (i, (&a, &b)) in p.iter().zip(d).enumerate() {
                if per_token > 0 && mask[i / per_token] == 0 {
                    continue;
                }
                num += (a as f64 - b as f64).powi(2);
                den += (b as f64).powi(2);
            }
        }
        if !(num.is_finite() && den > 0.0) {
            return Err(AdapterError::runtime(
                "scoring a candidate",
                format!("loss {num} / {den} is not finite"),
            ));
        }
        Ok(num / den)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::random_samples;
    use std::path::PathBuf;
    use ziplm_plugin_api::ModelAdapter;

    #[test]
    fn dense_plan_has_zero_loss_and_pruning_has_some() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/onnx/tiny-bert-feature-extraction/model.onnx");
        let model = TractModel::load(
            &path,
            super::super::TractOptions {
                workload: Workload::prefill(1, 16),
                ..Default::default()
            },
        )
        .unwrap();
        let samples = random_samples(128, 8, 16, 1);
        let loss = OutputLoss::new(&model, &samples, 8, 16).unwrap();
        let dense = Plan::dense(model.structure());
        assert!(
            loss.loss(&model, &dense, &PrunedWeights::default())
                .unwrap()
                < 1e-10
        );
        let mut pruned = dense.clone();
        pruned.blocks[1].kept.truncate(64);
        let l = loss
            .loss(&model, &pruned, &PrunedWeights::default())
            .unwrap();
        assert!(l > 1e-6 && l.is_finite(), "{l}");
    }
}
