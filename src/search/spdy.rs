//! SPDY-style refinement of the per-block error coefficients (ZIPLM.md section 6).
//!
//! The plain DP minimises the sum of layer-wise errors, a proxy for the model's loss.
//! Refinement searches coefficients `alpha` in `[0, 1]^L`: each candidate `alpha`
//! gives a DP solution, scored by the real loss of the stitched model (a
//! [`ziplm_plugin_api::LossHook`] on calibration batches). Random restarts first, then
//! local search that resamples a fraction of the coordinates of the best so far.
//! Selections already scored are not scored again, and the loss hook is called at most
//! `max_evaluations` times. Deterministic for a given seed.

use super::{Budget, SearchOutcome, SearchProblem, Selection};
use crate::error::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Settings of the refinement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefineConfig {
    /// Random coefficient vectors tried before local search.
    pub restarts: usize,
    /// Local-search proposals after the restarts.
    pub local_steps: usize,
    /// Fraction of coordinates resampled per local proposal (at least one).
    pub resample_fraction: f64,
    /// Hard limit on loss evaluations (distinct selections scored).
    pub max_evaluations: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for RefineConfig {
    fn default() -> Self {
        RefineConfig {
            restarts: 8,
            local_steps: 24,
            resample_fraction: 0.1,
            max_evaluations: 32,
            seed: 0,
        }
    }
}

impl RefineConfig {
    /// Refinement with at most `evaluations` loss evaluations (`None` for 0: the plain
    /// error-sum DP).
    pub fn with_evaluations(evaluations: usize, seed: u64) -> Option<RefineConfig> {
        (evaluations > 0).then(|| RefineConfig {
            max_evaluations: evaluations,
            seed,
            ..Default::default()
        })
    }
}

/// One scored candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Sum of normalised errors of the selection.
    pub error_sum: f64,
    /// Loss the hook returned.
    pub loss: f64,
    /// Predicted latency.
    pub predicted_ms: f64,
}

/// The result of a refinement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefineOutcome {
    /// The best selection found (by loss).
    pub outcome: SearchOutcome,
    /// Its coefficients.
    pub alphas: Vec<f64>,
    /// Its loss.
    pub loss: f64,
    /// Loss of the plain (all-ones) DP solution, for comparison.
    pub baseline_loss: f64,
    /// Every distinct selection scored, in order.
    pub history: Vec<Evaluation>,
}

/// Refines coefficients under `budget`, scoring selections with `loss`.
pub fn refine(
    problem: &SearchProblem,
    budget: Budget,
    buckets: usize,
    config: &RefineConfig,
    loss: &mut dyn FnMut(&Selection) -> Result<f64>,
) -> Result<RefineOutcome> {
    let n = problem.blocks.len();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut scored: HashMap<Selection, f64> = HashMap::new();
    let mut history = Vec::new();
    let mut evaluate = |alphas: &[f64],
                        scored: &mut HashMap<Selection, f64>,
                        history: &mut Vec<Evaluation>|
     -> Result<Option<(SearchOutcome, f64)>> {
        let out = problem.solve(budget, alphas, buckets)?;
        if let Some(&l) = scored.get(&out.selection) {
            return Ok(Some((out, l)));
        }
        if scored.len() >= config.max_evaluations.max(1) {
            return Ok(None);
        }
        let l = loss(&out.selection)?;
        scored.insert(out.selection.clone(), l);
        history.push(Evaluation {
            error_sum: out.error_sum,
            loss: l,
            predicted_ms: out.predicted_ms,
        });
        Ok(Some((out, l)))
    };

    let ones = vec![1.0; n];
    let (base_out, base_loss) = evaluate(&ones, &mut scored, &mut history)?
        .expect("the first evaluation is always allowed");
    let mut best = (base_out, base_loss, ones);
    let better = |l: f64, best: f64| l < best || (best.is_nan() && !l.is_nan());
    for _ in 0..config.restarts {
        let alphas: Vec<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
        let Some((out, l)) = evaluate(&alphas, &mut scored, &mut history)? else {
            break;
        };
        if better(l, best.1) {
            best = (out, l, alphas);
        }
    }
    let k = ((n as f64 * config.resample_fraction).round() as usize).clamp(1, n.max(1));
    for _ in 0..config.local_steps {
        let mut alphas = best.2.clone();
        for _ in 0..k {
            let i = rng.random_range(0..n);
            alphas[i] = rng.random::<f64>();
        }
        let Some((out, l)) = evaluate(&alphas, &mut scored, &mut history)? else {
            break;
        };
        if better(l, best.1) {
            best = (out, l, alphas);
        }
    }
    Ok(RefineOutcome {
        outcome: best.0,
        alphas: best.2,
        loss: best.1,
        baseline_loss: base_loss,
        history,
    })
}
