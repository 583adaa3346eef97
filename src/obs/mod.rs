//! Structured optimal-brain-surgeon pruning of one linear layer (ZIPLM.md sections 2-4).
//!
//! A layer `y = W x` (`W`: outputs x inputs) with calibration Gram matrix
//! `H = 2 X X^T / N` is pruned by removing groups of input columns (a head, a KV group,
//! a neuron) greedily, cheapest OBS score first, compensating the remaining columns
//! after each removal. One pass yields every level: level `k` = the first `k`
//! removals. We keep only the removal order and per-level errors ([`RemovalTrace`]) and
//! recompute any level's weights with [`materialize`].
//!
//! - [`GramAccumulator`]: streaming `H` in f64.
//! - [`PreparedLayer`]: dead inputs and dampening.
//! - [`GroupGreedy`]: explicit updates, groups of any size, balanced schedules.
//! - [`ColumnGreedy`]: blocked lazy updates for single columns (FFN neurons).
//! - [`PairedGram`]: sequential correction's `H~`, `C` and re-targeted `W*`.

mod gram;
mod greedy;
mod lazy;
mod materialize;
mod prepare;
mod retarget;

pub use gram::GramAccumulator;
pub use greedy::GroupGreedy;
pub use lazy::{ColumnGreedy, DEFAULT_FOLD_EVERY};
pub use materialize::materialize;
pub use prepare::{PreparedLayer, DEFAULT_DAMPENING};
pub use retarget::PairedGram;

use crate::error::Result;
use serde::{Deserialize, Serialize};
use ziplm_plugin_api::{GroupLayout, GroupSchedule};

/// Runs faer's own solvers (Cholesky, inverses) on the calling thread: the database
/// parallelises across blocks, and only the Gram products ([`GramAccumulator`]) ask
/// for the rayon pool explicitly. Called by every entry point that factors matrices;
/// idempotent.
pub fn serial_solvers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| faer::set_global_parallelism(faer::Par::Seq));
}

/// One greedy step: the group removed and its OBS score (the increase of
/// `tr(dW H dW^T)` under the dampened `H`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Removal {
    /// Index into the layout's groups.
    pub group: usize,
    /// The OBS score `rho` at the time of removal.
    pub score: f64,
}

/// The exact normalised error after a given number of removals.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Groups removed.
    pub removed: usize,
    /// `||(W_k - W) X||^2 / ||W X||^2` on the calibration inputs (undampened).
    pub error: f64,
}

/// The outcome of one greedy pass: everything needed to rebuild any level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemovalTrace {
    /// Groups in removal order.
    pub order: Vec<usize>,
    /// OBS score of each step.
    pub scores: Vec<f64>,
    /// Exact errors at the requested checkpoints, ascending by `removed`.
    pub checkpoints: Vec<Checkpoint>,
}

impl RemovalTrace {
    /// The error recorded after `removed` groups, if that was a checkpoint.
    pub fn error_at(&self, removed: usize) -> Option<f64> {
        self.checkpoints
            .iter()
            .find(|c| c.removed == removed)
            .map(|c| c.error)
    }
}

/// Runs the greedy removal of up to `max_removed` groups, recording the exact error
/// after each count in `checkpoints` (counts beyond `max_removed` are ignored).
///
/// Picks [`ColumnGreedy`] when every group is a single column in free order, and
/// [`GroupGreedy`] otherwise; both give the same order up to floating-point ties.
pub fn run_greedy(
    layer: &PreparedLayer,
    layout: &GroupLayout,
    max_removed: usize,
    checkpoints: &[usize],
) -> Result<RemovalTrace> {
    let max_removed = max_removed.min(layout.groups.len());
    let mut wanted: Vec<usize> = checkpoints
        .iter()
        .copied()
        .filter(|&c| c <= max_removed)
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let singleton = layout.groups.len() == layer.n_inputs()
        && layout.groups.iter().all(|g| g.len() == 1)
        && layout.schedule == GroupSchedule::Free;
    let mut trace = RemovalTrace {
        order: Vec::new(),
        scores: Vec::new(),
        checkpoints: Vec::new(),
    };
    let mut e_damped = 0.0;
    let record = |trace: &mut RemovalTrace, e_damped: f64, delta_sq: f64| {
        let removed = trace.order.len();
        trace.checkpoints.push(Checkpoint {
            removed,
            error: layer.normalised_error(e_damped, delta_sq),
        });
    };
    let mut next = 0;
    if singleton {
        layout
            .validate(layer.n_inputs())
            .map_err(|e| crate::Error::Invalid(format!("group layout: {e}")))?;
        // Column index -> group index (layouts need not list columns in order).
        let mut group_of = vec![usize::MAX; layer.n_inputs()];
        for (g, cols) in layout.groups.iter().enumerate() {
            group_of[cols[0]] = g;
        }
        let mut greedy = ColumnGreedy::new(layer, DEFAULT_FOLD_EVERY)?;
        loop {
            if next < wanted.len() && wanted[next] == trace.order.len() {
                let delta = greedy.delta_sq();
                record(&mut trace, e_damped, delta);
                next += 1;
            }
            if trace.order.len() >= max_removed {
                break;
            }
            let Some(r) = greedy.step()? else { break };
            let g = group_of[r.group];
            if g == usize::MAX {
                return Err(crate::Error::Invalid(format!(
                    "column {} belongs to no group",
                    r.group
                )));
            }
            e_damped += r.score;
            trace.order.push(g);
            trace.scores.push(r.score);
        }
    } else {
        let mut greedy = GroupGreedy::new(layer, layout)?;
        loop {
            if next < wanted.len() && wanted[next] == trace.order.len() {
                record(&mut trace, e_damped, greedy.delta_sq());
                next += 1;
            }
            if trace.order.len() >= max_removed {
                break;
            }
            let Some(r) = greedy.step()? else { break };
            e_damped += r.score;
            trace.order.push(r.group);
            trace.scores.push(r.score);
        }
    }
    Ok(trace)
}
