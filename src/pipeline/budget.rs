//! One budget: search, correct the weights, emit, verify, tighten or loosen.
//!
//! `search -> emit -> verify`: for each budget the DP picks levels, the backend writes
//! the model, and the backend times the dense and the pruned model end to end in the
//! same run (alternating rounds; a speedup is the median of the rounds' ratios, and a
//! model whose interval straddles the budget is timed again, up to
//! `SearchSettings::extra_timings` times, with the rounds pooled). When the measured
//! latency misses the budget, the prediction is corrected by the measured/predicted
//! ratio and the search runs again with the tighter target;
//! when a verified model beats the budget by more than the overshoot tolerance, the
//! search is loosened again between the loosest search that met and the tightest that
//! missed (a bounded number of rounds in all). A backend with a runtime fit takes each
//! verified model as one more fit point ([`EmitAndMeasure::refit`]) and the searches
//! after it use the refitted table. The outcome is the loosest round that met; a miss
//! that remains is reported, not hidden.

use crate::database::Database;
use crate::error::Result;
use crate::search::spdy::{self, RefineConfig};
use crate::search::{Budget, SearchOutcome, SearchProblem, Selection};
use serde::{Deserialize, Serialize};
use ziplm_plugin_api::{EmitSummary, LatencyTable, PairedTiming, Plan, PrunedWeights, Timing};

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
    /// How far past the budget a verified model may land before the loop loosens the
    /// search again (0.05 = a 1.25x budget accepts up to 1.3125x measured).
    #[serde(default = "default_overshoot")]
    pub overshoot: f64,
    /// Timings a verified model may get after its first when the budget lies inside
    /// the ~95% interval of its measurement ([`undecided`]); their rounds are pooled.
    #[serde(default = "default_extra_timings")]
    pub extra_timings: usize,
}

fn default_overshoot() -> f64 {
    0.05
}

fn default_extra_timings() -> usize {
    2
}

impl Default for SearchSettings {
    fn default() -> Self {
        SearchSettings {
            buckets: crate::search::DEFAULT_BUCKETS,
            refine: Some(RefineConfig::default()),
            retries: 3,
            margin: 0.02,
            overshoot: default_overshoot(),
            extra_timings: default_extra_timings(),
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
    /// Predicted latency of the dense model in the same table (so that
    /// `predicted_dense_ms / predicted_ms` is the predicted speedup, which a refit
    /// changes). Absent in reports written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_dense_ms: Option<f64>,
    /// Measured dense latency (same run).
    pub measured_dense: Option<Timing>,
    /// Measured pruned latency.
    pub measured: Option<Timing>,
    /// Measured speedup: the median of the paired rounds' ratios
    /// ([`PairedTiming::speedup`]). Absent in reports written before it was kept,
    /// whose speedup is the ratio of the medians.
    #[serde(default)]
    pub measured_speedup: Option<f64>,
    /// Whether the measurement met the budget.
    pub met: Option<bool>,
    /// The runtime fit solved again with this round's timing as one more point
    /// ([`EmitAndMeasure::refit`]), when the backend keeps one and a search follows
    /// this round: the searches after it use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refit: Option<crate::runtime_fit::RuntimeFit>,
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
    /// Index in `attempts` of the round this outcome is (the loosest that met the
    /// budget, else the last).
    pub chosen: usize,
    /// Loss of the refined selection and of the plain one, when refined.
    pub refined_loss: Option<(f64, f64)>,
    /// The weights of the chosen round as emitted: the database's compensation after
    /// every weight stage ([`EmitAndMeasure::transform`]). Not serialised.
    #[serde(skip)]
    pub weights: PrunedWeights,
    /// The recovery stage's run, when the job recovers.
    #[serde(default)]
    pub recovery: Option<crate::job::RecoverySummary>,
}

impl BudgetOutcome {
    /// The attempt this outcome is (see [`BudgetOutcome::chosen`]).
    pub fn chosen_attempt(&self) -> Option<&Attempt> {
        self.attempts.get(self.chosen)
    }

    /// The chosen attempt's measurement met the budget (`None` when not verified).
    pub fn met(&self) -> Option<bool> {
        self.chosen_attempt().and_then(|a| a.met)
    }

    /// Measured speedup of the chosen attempt.
    pub fn measured_speedup(&self) -> Option<f64> {
        let a = self.chosen_attempt()?;
        a.measured_speedup
            .or_else(|| Some(a.measured_dense?.median_ms / a.measured?.median_ms))
    }
}

/// How far a measurement beats a budget, as a factor: at least 1 when it meets it. A
/// latency budget is met by the model's median; a speedup budget by the paired
/// speedup (the median of the rounds' ratios, [`PairedTiming::speedup`]).
pub fn margin_over(budget: Budget, timing: &PairedTiming) -> f64 {
    match budget {
        Budget::LatencyMs(ms) => ms / timing.model.median_ms.max(f64::MIN_POSITIVE),
        Budget::Speedup(s) => timing.speedup / s,
    }
}

/// Whether a measurement's rounds cannot tell met from missed yet: the budget lies
/// strictly inside the ~95% interval of the figure it is read by (the median of the
/// rounds' ratios for a speedup, the model's median for a latency;
/// [`crate::profile::median_interval`]). False when the rounds were not kept.
pub fn undecided(budget: Budget, timing: &PairedTiming) -> bool {
    match budget {
        Budget::Speedup(s) => {
            crate::profile::speedup_interval(timing).is_some_and(|(lo, hi)| lo < s && s < hi)
        }
        Budget::LatencyMs(ms) => {
            crate::profile::model_ms_interval(timing).is_some_and(|(lo, hi)| lo < ms && ms < hi)
        }
    }
}

/// Whether a measurement meets a budget ([`margin_over`] at least 1).
pub fn meets(budget: Budget, timing: &PairedTiming) -> bool {
    margin_over(budget, timing) >= 1.0
}

/// Backend operations the pass needs.
pub trait EmitAndMeasure {
    /// The weight stage after the search: turns the database's compensated weights of
    /// a plan into the weights emitted. The default keeps them as they are
    /// (sequential correction runs after verification instead, `pipeline::correct`).
    fn transform(&mut self, _plan: &Plan, weights: PrunedWeights) -> Result<PrunedWeights> {
        Ok(weights)
    }
    /// Writes the model for a plan and its compensated weights.
    fn emit(&mut self, plan: &Plan, weights: &PrunedWeights) -> Result<EmitSummary>;
    /// Times the dense and the emitted model end to end, alternating runs.
    fn measure(&mut self, emitted: &EmitSummary) -> Result<PairedTiming>;
    /// Loss of a candidate (for SPDY refinement); `None` when unsupported.
    fn loss(&mut self, _plan: &Plan, _weights: &PrunedWeights) -> Option<Result<f64>> {
        None
    }
    /// Takes a verified selection's paired timing as one more point of the backend's
    /// runtime fit ([`crate::runtime_fit::Refit`]) and returns the fit solved again
    /// with the table it scales, which the next searches use; `None` when the backend
    /// keeps no fit or the points give none.
    fn refit(
        &mut self,
        _selection: &Selection,
        _timing: &PairedTiming,
    ) -> Option<(crate::runtime_fit::RuntimeFit, LatencyTable)> {
        None
    }
}

/// Searches, emits and (when `verify`) verifies one budget.
///
/// Each round searches at a budget in predicted milliseconds, emits, and times the
/// model in the runtime. A miss tightens the next search by the measured/predicted
/// ratio; a model that meets the budget by more than `settings.overshoot` loosens it
/// again, between the loosest search that met and the tightest that missed (see
/// [`next_search_budget`]). The outcome is the loosest round that met the budget (the
/// least pruning that verified), or the last round when none did.
///
/// When the backend refits its runtime fit with each verified model
/// ([`EmitAndMeasure::refit`]), the next searches use the refitted table, and the
/// rounds so far are placed in its milliseconds by their selections' predicted times:
/// the DP at a selection's own predicted time returns that selection, so the bracket
/// and the choice of round keep their meaning across tables.
pub fn prune_to_budget(
    db: &Database,
    table: &LatencyTable,
    budget: Budget,
    settings: &SearchSettings,
    verify: bool,
    backend: &mut dyn EmitAndMeasure,
) -> Result<BudgetOutcome> {
    let mut problem: SearchProblem = db.search_problem(table)?;
    let mut fastest = problem.fastest().map(|(_, t)| t).unwrap_or(0.0);
    let mut search_budget = problem.budget_ms(budget);
    let mut rounds: Vec<Round> = vec![];
    let mut bracket = Bracket::default();
    // SPDY coefficients from the first search; later rounds reuse them (the DP alone
    // at the new budget) instead of refining again.
    let mut alphas: Option<Vec<f64>> = None;
    // A search that repeats a measured selection costs no measurement, but still counts
    // here so that the loop always ends.
    let max_searches = 2 * (settings.retries + 1);
    for searches in 1.. {
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
        // A selection measured before keeps its verdict: measuring it again would only
        // sample the noise again.
        if let Some(r) = rounds
            .iter()
            .find(|r| r.search.selection == search.selection)
        {
            bracket.record(search_budget, r.attempt.met == Some(true));
            let next = next_search_budget(&bracket, search_budget, false, None, settings, fastest);
            match next {
                Some(n) if searches < max_searches => {
                    search_budget = n;
                    continue;
                }
                _ => break,
            }
        }
        let plan = db.plan(&search.selection)?;
        let weights = backend.transform(&plan, db.pruned_weights(&search.selection)?)?;
        let emitted = backend.emit(&plan, &weights)?;
        let mut attempt = Attempt {
            search_budget_ms: search_budget,
            predicted_ms: search.predicted_ms,
            predicted_dense_ms: Some(search.dense_ms),
            measured_dense: None,
            measured: None,
            measured_speedup: None,
            met: None,
            refit: None,
        };
        if !verify {
            rounds.push(Round {
                rank: search_budget,
                attempt,
                search,
                plan,
                weights,
                emitted,
                loss,
            });
            break;
        }
        let dense_selected = search.selection == db.dense_selection();
        let mut timing = backend.measure(&emitted)?;
        // A model this close to the budget is timed again and the rounds pooled, so
        // that the verdict (and which model is kept) is not a coin toss of the noise.
        for _ in 0..settings.extra_timings {
            if dense_selected || !undecided(budget, &timing) {
                break;
            }
            timing = crate::profile::pooled(&timing, &backend.measure(&emitted)?);
        }
        // The dense model meets any speedup of at most 1x by definition: timing it
        // against itself would only sample the noise.
        let met = (dense_selected && matches!(budget, Budget::Speedup(s) if s <= 1.0))
            || meets(budget, &timing);
        attempt.measured_dense = Some(timing.dense);
        attempt.measured = Some(timing.model);
        attempt.measured_speedup = Some(timing.speedup);
        attempt.met = Some(met);
        let mut predicted = search.predicted_ms.max(f64::MIN_POSITIVE);
        let selection = search.selection.clone();
        rounds.push(Round {
            rank: search_budget,
            attempt,
            search,
            plan,
            weights,
            emitted,
            loss,
        });
        bracket.record(search_budget, met);
        if rounds.len() > settings.retries
            || searches >= max_searches
            || dense_selected && (met || !matches!(budget, Budget::Speedup(s) if s > 1.0))
        {
            break;
        }
        // The timing refits the table (a backend with a runtime fit): the next
        // searches, the bracket and the rounds' ranks move to its milliseconds. A refit
        // under which the budget has no admissible model is not used.
        let mut last_budget = search_budget;
        let refit = match dense_selected {
            true => None,
            false => backend.refit(&selection, &timing),
        };
        if let Some((fit, refitted)) = refit {
            let next = db.search_problem(&refitted)?;
            if next.solve(budget, &[], settings.buckets).is_ok() {
                problem = next;
                fastest = problem.fastest().map(|(_, t)| t).unwrap_or(0.0);
                bracket = Bracket::default();
                for r in &mut rounds {
                    r.rank = problem.time_of(&r.search.selection);
                    if let Some(met) = r.attempt.met {
                        bracket.record(r.rank, met);
                    }
                }
                predicted = problem.time_of(&selection).max(f64::MIN_POSITIVE);
                last_budget = predicted;
                if let Some(r) = rounds.last_mut() {
                    r.attempt.refit = Some(fit);
                }
            }
        }
        // The measurement corrects the prediction: the search budget at which this
        // selection's measured/predicted ratio would just meet the target, less the
        // margin.
        let beats_by = margin_over(budget, &timing);
        let corrected = predicted * beats_by * (1.0 - settings.margin);
        let settled = met && beats_by <= 1.0 + settings.overshoot;
        match next_search_budget(
            &bracket,
            last_budget,
            settled,
            Some(corrected),
            settings,
            fastest,
        ) {
            Some(n) => search_budget = n,
            None => {
                // No search follows: the refit (its point stays with the backend)
                // informed nothing in this loop, and the report does not claim it.
                if let Some(r) = rounds.last_mut() {
                    r.attempt.refit = None;
                }
                break;
            }
        }
    }
    let attempts: Vec<Attempt> = rounds.iter().map(|r| r.attempt.clone()).collect();
    let ranked: Vec<(f64, Option<bool>)> = rounds.iter().map(|r| (r.rank, r.attempt.met)).collect();
    let chosen = chosen_round(&ranked);
    let Some(last) = rounds.len().checked_sub(1) else {
        return Err(crate::error::Error::Invalid(
            "the search produced no model".into(),
        ));
    };
    if chosen != last {
        // The file on disk is the last round's: write the chosen one again.
        let r = &rounds[chosen];
        rounds[chosen].emitted = backend.emit(&r.plan, &r.weights)?;
    }
    let Round {
        search,
        plan,
        weights,
        emitted,
        loss,
        ..
    } = rounds.swap_remove(chosen);
    Ok(BudgetOutcome {
        budget,
        search,
        plan,
        emitted,
        attempts,
        chosen,
        refined_loss: loss,
        weights,
        recovery: None,
    })
}

/// One measured (or, without verification, emitted) round of the loop.
struct Round {
    /// Its search budget in the milliseconds of the table in use: the budget it was
    /// searched at, or after a refit its selection's predicted time.
    rank: f64,
    attempt: Attempt,
    search: SearchOutcome,
    plan: Plan,
    weights: PrunedWeights,
    emitted: EmitSummary,
    loss: Option<(f64, f64)>,
}

/// The round the outcome keeps, from each round's (rank, verdict): the one with the
/// loosest search budget ([`Round::rank`]) among those that met the budget (the least
/// pruning that verified), else the last.
fn chosen_round(rounds: &[(f64, Option<bool>)]) -> usize {
    rounds
        .iter()
        .enumerate()
        .filter(|(_, (_, met))| *met == Some(true))
        .max_by(|(_, (a, _)), (_, (b, _))| a.total_cmp(b))
        .map(|(i, _)| i)
        .unwrap_or(rounds.len().saturating_sub(1))
}

/// What the verification loop has learnt: the loosest search budget (predicted ms)
/// whose model met the budget, and the tightest whose model missed it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bracket {
    /// Loosest search budget that met.
    pub met: Option<f64>,
    /// Tightest search budget that missed.
    pub missed: Option<f64>,
}

impl Bracket {
    /// Records one round's verdict at its search budget.
    pub fn record(&mut self, search_budget: f64, met: bool) {
        let slot = if met { &mut self.met } else { &mut self.missed };
        *slot = Some(match (*slot, met) {
            (None, _) => search_budget,
            (Some(b), true) => b.max(search_budget),
            (Some(b), false) => b.min(search_budget),
        });
    }
}

/// A bracket this narrow (loosest met within 1% of the tightest miss) is closed.
const BRACKET_CLOSED: f64 = 1.01;

/// The next round's search budget, or `None` when the loop should stop.
///
/// `last` is the last round's search budget; `settled` whether its model met the
/// budget within `settings.overshoot`; `corrected` the measured/predicted-ratio
/// correction of its prediction (`None` when it repeated an earlier selection, whose
/// measurement teaches nothing new).
///
/// - Only misses so far: tighten, to `corrected` when it is tighter than `last`, else
///   by twice the margin; stop below the fastest admissible model.
/// - A model met the budget: stop when the last one met it closely enough or the
///   bracket is closed; otherwise try `corrected` when it lies strictly inside the
///   bracket, else its geometric middle (no middle without a miss: stop).
pub fn next_search_budget(
    bracket: &Bracket,
    last: f64,
    settled: bool,
    corrected: Option<f64>,
    settings: &SearchSettings,
    fastest: f64,
) -> Option<f64> {
    let Some(loosest_met) = bracket.met else {
        let next = corrected
            .filter(|&c| c < last)
            .unwrap_or(last * (1.0 - 2.0 * settings.margin));
        return (next >= fastest).then_some(next);
    };
    if settled {
        return None;
    }
    let tightest_miss = bracket.missed.unwrap_or(f64::INFINITY);
    if tightest_miss <= loosest_met * BRACKET_CLOSED {
        return None;
    }
    let inside = |b: f64| b > loosest_met && b < tightest_miss;
    corrected.filter(|&c| inside(c)).or_else(|| {
        bracket
            .missed
            .map(|miss| (loosest_met * miss).sqrt())
            .filter(|&m| inside(m))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SearchSettings {
        SearchSettings::default()
    }

    fn bracket(met: Option<f64>, missed: Option<f64>) -> Bracket {
        Bracket { met, missed }
    }

    #[test]
    fn the_bracket_keeps_the_loosest_met_and_the_tightest_miss() {
        let mut b = Bracket::default();
        b.record(10.0, false);
        b.record(8.0, true);
        b.record(9.0, false);
        b.record(7.0, true);
        assert_eq!(b, bracket(Some(8.0), Some(9.0)));
    }

    #[test]
    fn misses_alone_tighten_to_the_correction_or_by_twice_the_margin() {
        let b = bracket(None, Some(10.0));
        let s = settings();
        assert_eq!(
            next_search_budget(&b, 10.0, false, Some(8.0), &s, 1.0),
            Some(8.0)
        );
        // A correction that would loosen is not trusted after a miss.
        let fallback = next_search_budget(&b, 10.0, false, Some(11.0), &s, 1.0);
        assert!((fallback.unwrap() - 10.0 * (1.0 - 2.0 * s.margin)).abs() < 1e-12);
        // Nothing faster than the fastest admissible model: stop.
        assert_eq!(
            next_search_budget(&b, 10.0, false, Some(0.5), &s, 1.0),
            None
        );
    }

    #[test]
    fn a_close_met_model_or_a_closed_bracket_stops_the_loop() {
        let s = settings();
        let b = bracket(Some(8.0), Some(10.0));
        assert_eq!(next_search_budget(&b, 8.0, true, Some(9.0), &s, 1.0), None);
        let closed = bracket(Some(8.0), Some(8.05));
        assert_eq!(
            next_search_budget(&closed, 8.0, false, Some(8.02), &s, 1.0),
            None
        );
    }

    #[test]
    fn an_overshoot_loosens_inside_the_bracket() {
        let s = settings();
        let b = bracket(Some(8.0), Some(10.0));
        // The correction when it lies inside ...
        assert_eq!(
            next_search_budget(&b, 8.0, false, Some(9.5), &s, 1.0),
            Some(9.5)
        );
        // ... else the geometric middle.
        let mid = (8.0f64 * 10.0).sqrt();
        assert_eq!(
            next_search_budget(&b, 8.0, false, Some(12.0), &s, 1.0),
            Some(mid)
        );
        assert_eq!(next_search_budget(&b, 8.0, false, None, &s, 1.0), Some(mid));
        // A miss inside the bracket narrows it and the middle follows.
        let b2 = bracket(Some(8.0), Some(9.0));
        assert_eq!(
            next_search_budget(&b2, 9.0, false, Some(7.0), &s, 1.0),
            Some((72.0f64).sqrt())
        );
    }

    #[test]
    fn an_overshoot_without_a_miss_loosens_by_the_correction_only() {
        let s = settings();
        let b = bracket(Some(8.0), None);
        assert_eq!(
            next_search_budget(&b, 8.0, false, Some(9.0), &s, 1.0),
            Some(9.0)
        );
        // No correction (a repeated selection) and no miss: nothing to bisect.
        assert_eq!(next_search_budget(&b, 8.0, false, None, &s, 1.0), None);
    }

    #[test]
    fn the_chosen_round_is_the_loosest_that_met() {
        let a = |b: f64, met: Option<bool>| (b, met);
        assert_eq!(
            chosen_round(&[
                a(10.0, Some(false)),
                a(7.0, Some(true)),
                a(8.5, Some(true)),
                a(9.0, Some(false))
            ]),
            2
        );
        assert_eq!(
            chosen_round(&[a(10.0, Some(false)), a(9.0, Some(false))]),
            1
        );
        assert_eq!(chosen_round(&[a(10.0, None)]), 0);
    }
}
