//! The loss hook of the mistral.rs backend: how far a candidate's final hidden states
//! are from the dense model's on held calibration windows (relative squared error,
//! `sum (pruned - dense)^2 / sum dense^2`), computed with ziplm's candle forward of the
//! pruned weights (the same weights the emitter writes).

use super::model::LlamaModel;
use candle_core::Tensor;
use ziplm_plugin_api::{AdapterError, AdapterResult, Plan, PrunedWeights};

/// Dense outputs on held windows, and the scoring of candidates against them.
pub struct HiddenLoss {
    held: Vec<Vec<u32>>,
    dense: Vec<Tensor>,
    dense_norm: f64,
}

fn ce(e: candle_core::Error) -> AdapterError {
    AdapterError::runtime("the loss forward pass", e)
}

impl HiddenLoss {
    /// Takes the first `samples` calibration windows, cut to `seq_len` tokens, and keeps
    /// the dense model's final hidden states on them.
    pub fn new(model: &LlamaModel, samples: usize, seq_len: usize) -> AdapterResult<HiddenLoss> {
        let held: Vec<Vec<u32>> = model
            .calibration_samples()
            .iter()
            .take(samples.max(1))
            .map(|s| s[..s.len().min(seq_len.max(1))].to_vec())
            .collect();
        if held.is_empty() {
            return Err(AdapterError::Calibration(
                "the loss needs at least one calibration sample".into(),
            ));
        }
        let mut dense = vec![];
        let mut dense_norm = 0.0;
        for ids in &held {
            let out = model
                .weights
                .forward(ids, false, &mut |_, _, _| Ok(()))
                .map_err(ce)?;
            dense_norm += out
                .sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .map_err(ce)? as f64;
            dense.push(out);
        }
        Ok(HiddenLoss {
            held,
            dense,
            dense_norm: dense_norm.max(f64::MIN_POSITIVE),
        })
    }

    /// Loss of the model a plan and its compensated weights describe.
    pub fn loss(
        &self,
        model: &LlamaModel,
        plan: &Plan,
        weights: &PrunedWeights,
    ) -> AdapterResult<f64> {
        let pruned = model.pruned_weights(plan, weights)?;
        let mut err = 0.0;
        for (ids, dense) in self.held.iter().zip(&self.dense) {
            let out = pruned
                .forward(ids, false, &mut |_, _, _| Ok(()))
                .map_err(ce)?;
            err += (out - dense)
                .and_then(|d| d.sqr())
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .map_err(ce)? as f64;
        }
        Ok(err / self.dense_norm)
    }
}
