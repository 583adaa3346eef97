//! The pruning pass after the database: search, emit, verify, correct.
//!
//! `search -> emit -> verify`: for each budget the DP picks levels, the backend writes
//! the model, and the backend times the dense and the pruned model end to end in the
//! same run. When the measured latency misses the budget, the prediction is corrected
//! by the measured/predicted ratio and the search runs again with the tighter target
//! (a bounded number of times); a miss that remains is reported, not hidden.

use crate::database::Database;
use crate::error::Result;
use crate::search::spdy::{self, RefineConfig};
use crate::search::{Budget, SearchOutcome, SearchProblem, Selection};
use serde::{Deserialize, Serialize};
use ziplm_plugin_api::{EmitSummary, LatencyTable, Plan, PrunedWeights, Timing};

/// Settings of the search and verification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchSettings {
    /// DP buckets.
    pub buckets: usize,
    /// SPDY refinement (needs a loss hook; backends without one fall back to the
    /// plain DP); `None` = plain error-sum DP. Default: 32 loss evaluations.
    pub refine: Option<RefineConfig>,
    /// Searches after the first when the measured latency misses the budget.
    pub retries: usize,
    /// Safety margin applied to corrected targets (0.02 = aim 2% below).
    pub margin: f64,
}

impl Default for SearchSettings {
    fn default() -> Self {
        SearchSettings {
            buckets: crate::search::DEFAULT_BUCKETS,
            refine: Some(RefineConfig::default()),
            retries: 3,
            margin: 0.02,
        }
    }
}

/// One search-emit-verify round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Budget given to the DP, in predicted milliseconds.
    pub search_budget_ms: f64,
    /// Predicted latency of the selection.
    pub predicted_ms: f64,
    /// Measured dense latency (same run).
    pub measured_dense: Option<Timing>,
    /// Measured pruned latency.
    pub measured: Option<Timing>,
    /// Whether the measurement met the budget.
    pub met: Option<bool>,
}

/// The outcome for one budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetOutcome {
    /// The budget asked for.
    pub budget: Budget,
    /// The final search.
    pub search: SearchOutcome,
    /// The final plan.
    pub plan: Plan,
    /// What was written.
    pub emitted: EmitSummary,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Loss of the refined selection and of the plain one, when refined.
    pub refined_loss: Option<(f64, f64)>,
}

impl BudgetOutcome {
    /// The last attempt's measurement met the budget (`None` when not verified).
    pub fn met(&self) -> Option<bool> {
        self.attempts.last().and_then(|a| a.met)
    }

    /// Measured speedup of the final attempt.
    pub fn measured_speedup(&self) -> Option<f64> {
        let a = self.attempts.last()?;
        Some(a.measured_dense?.median_ms / a.measured?.median_ms)
    }
}

/// Whether a measurement meets a budget.
pub fn meets(budget: Budget, dense: &Timing, pruned: &Timing) -> bool {
    match budget {
        Budget::LatencyMs(ms) => pruned.median_ms <= ms,
        Budget::Speedup(s) => dense.median_ms / pruned.median_ms >= s,
    }
}

/// Backend operations the pass needs.
pub trait EmitAndMeasure {
    /// Writes the model for a plan and its compensated weights.
    fn emit(&mut self, plan: &Plan, weights: &PrunedWeights) -> Result<EmitSummary>;
    /// Times the dense and the emitted model end to end, alternating runs.
    fn measure(&mut self, emitted: &EmitSummary) -> Result<(Timing, Timing)>;
    /// Loss of a candidate (for SPDY refinement); `None` when unsupported.
    fn loss(&mut self, _plan: &Plan, _weights: &PrunedWeights) -> Option<Result<f64>> {
        None
    }
}

/// Searches, emits and (when `verify`) verifies one budget.
pub fn prune_to_budget(
    db: &Database,
    table: &LatencyTable,
    budget: Budget,
    settings: &SearchSettings,
    verify: bool,
    backend: &mut dyn EmitAndMeasure,
) -> Result<BudgetOutcome> {
    let problem: SearchProblem = db.search_problem(table)?;
    let mut search_budget = problem.budget_ms(budget);
    let mut attempts = vec![];
    let mut refined_loss = None;
    // SPDY coefficients from the first search; corrected retries reuse them (the DP
    // alone at the new budget) instead of refining again.
    let mut alphas: Option<Vec<f64>> = None;
    // Each round searches, emits and (when verifying) measures; the loop ends with the
    // last round's result, which becomes the outcome.
    let (search, plan, emitted) = loop {
        let budget_now = Budget::LatencyMs(search_budget);
        let (search, loss) = match &alphas {
            None => {
                let (search, loss, found) =
                    search_once(db, &problem, budget_now, settings, backend)?;
                alphas = found;
                (search, loss)
            }
            Some(a) => search_with_coefficients(db, &problem, budget_now, a, settings, backend)?,
        };
        if loss.is_some() {
            refined_loss = loss;
        }
        let plan = db.plan(&search.selection)?;
        let weights = db.pruned_weights(&search.selection)?;
        let emitted = backend.emit(&plan, &weights)?;
        let mut attempt = Attempt {
            search_budget_ms: search_budget,
            predicted_ms: search.predicted_ms,
            measured_dense: None,
            measured: None,
            met: None,
        };
        if !verify {
            attempts.push(attempt);
            break (search, plan, emitted);
        }
        let (dense, pruned) = backend.measure(&emitted)?;
        let met = meets(budget, &dense, &pruned);
        attempt.measured_dense = Some(dense);
        attempt.measured = Some(pruned);
        attempt.met = Some(met);
        attempts.push(attempt);
        let dense_selected = search.selection == db.dense_selection();
        if met
            || attempts.len() > settings.retries
            || dense_selected && !matches!(budget, Budget::Speedup(s) if s > 1.0)
        {
            break (search, plan, emitted);
        }
        // Correct the prediction with the measurement and search again.
        let ratio = pruned.median_ms / search.predicted_ms.max(f64::MIN_POSITIVE);
        let target_measured = match budget {
            Budget::LatencyMs(ms) => ms,
            Budget::Speedup(s) => dense.median_ms / s,
        };
        let next = target_measured / ratio * (1.0 - settings.margin);
        search_budget = if next < search_budget {
            next
        } else {
            search_budget * (1.0 - 2.0 * settings.margin)
        };
        let fastest = problem.fastest().map(|(_, t)| t).unwrap_or(0.0);
        if search_budget < fastest {
            // Cannot go faster: keep the last result, reported as a miss.
            break (search, plan, emitted);
        }
    };
    Ok(BudgetOutcome {
        budget,
        search,
        plan,
        emitted,
        attempts,
        refined_loss,
    })
}

/// The backend's loss of a selection (`None` when the backend has no loss hook).
fn score(
    db: &Database,
    selection: &Selection,
    backend: &mut dyn EmitAndMeasure,
) -> Result<Option<f64>> {
    let plan = db.plan(selection)?;
    let weights = db.pruned_weights(selection)?;
    backend.loss(&plan, &weights).transpose()
}

/// A corrected retry after a refined search: the DP with the refined coefficients at
/// the new budget, or the plain DP's solution when that scores better. Two loss
/// evaluations instead of a new refinement.
fn search_with_coefficients(
    db: &Database,
    problem: &SearchProblem,
    budget: Budget,
    alphas: &[f64],
    settings: &SearchSettings,
    backend: &mut dyn EmitAndMeasure,
) -> Result<(SearchOutcome, Option<(f64, f64)>)> {
    let refined = problem.solve(budget, alphas, settings.buckets)?;
    let plain = problem.solve(budget, &[], settings.buckets)?;
    let (Some(r), Some(p)) = (
        score(db, &refined.selection, backend)?,
        score(db, &plain.selection, backend)?,
    ) else {
        return Ok((refined, None));
    };
    Ok(if p < r {
        (plain, Some((p, p)))
    } else {
        (refined, Some((r, p)))
    })
}

/// One search: the plain DP, or SPDY refinement when configured and the backend has a
/// loss hook. Returns the outcome, the (refined, plain) losses and the coefficients.
#[allow(clippy::type_complexity)]
fn search_once(
    db: &Database,
    problem: &SearchProblem,
    budget: Budget,
    settings: &SearchSettings,
    backend: &mut dyn EmitAndMeasure,
) -> Result<(SearchOutcome, Option<(f64, f64)>, Option<Vec<f64>>)> {
    let Some(cfg) = &settings.refine else {
        return Ok((problem.solve(budget, &[], settings.buckets)?, None, None));
    };
    let mut unsupported = false;
    let mut hook = |sel: &Selection| -> Result<f64> {
        Ok(score(db, sel, backend)?.unwrap_or_else(|| {
            unsupported = true;
            0.0
        }))
    };
    let refined = spdy::refine(problem, budget, settings.buckets, cfg, &mut hook)?;
    if unsupported {
        return Ok((problem.solve(budget, &[], settings.buckets)?, None, None));
    }
    Ok((
        refined.outcome,
        Some((refined.loss, refined.baseline_loss)),
        Some(refined.alphas),
    ))
}
