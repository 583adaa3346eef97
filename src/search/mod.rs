//! Choosing every block's level under a latency budget (ZIPLM.md section 6).
//!
//! A [`SearchProblem`] lists, per prunable block, its candidate levels with their
//! normalised error and predicted time. [`SearchProblem::solve`] turns the runtime's
//! [`ShapeConstraints`] into DP stages:
//!
//! - **Tied choices** (`uniform_heads`, `uniform_ffn_width`): the shared value is
//!   enumerated in an outer loop; each value restricts the tied blocks to that level
//!   and the DP runs on the rest. The best over all values wins.
//! - **Whole-layer removal only**: a layer's attention and FFN become one stage whose
//!   options are the product of their kept levels, plus "drop the layer".
//! - Otherwise each block is its own stage.
//!
//! [`spdy`] refines the per-block error coefficients with a loss hook.

pub mod dp;
pub mod spdy;

use crate::error::{Error, Result};
use dp::DpOption;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use ziplm_plugin_api::{BlockId, LayerIndex, ModuleRemoval, ShapeConstraints};

/// Default number of DP time buckets (ZIPLM.md asks for at least 10,000).
pub const DEFAULT_BUCKETS: usize = 10_000;

/// One level a block can take.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Heads (attention) or neurons (FFN) kept; 0 = removed.
    pub kept: usize,
    /// Normalised output error `e(l, s)`.
    pub error: f64,
    /// Predicted time in milliseconds.
    pub time_ms: f64,
}

/// A block's candidate levels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockCandidates {
    /// The block.
    pub block: BlockId,
    /// Its layer.
    pub layer: LayerIndex,
    /// Attention (heads) or FFN (neurons).
    pub attention: bool,
    /// Levels; index 0 must be the dense level.
    pub levels: Vec<Candidate>,
}

/// What the user asks for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// End-to-end latency at the workload, in milliseconds.
    LatencyMs(f64),
    /// Speedup over the dense model's predicted latency (`2.0` = twice as fast).
    Speedup(f64),
}

impl Budget {
    /// Checks the number is positive and finite.
    pub fn validate(&self) -> Result<()> {
        let (v, what) = match *self {
            Budget::LatencyMs(v) => (v, "latency budget (ms)"),
            Budget::Speedup(v) => (v, "speedup"),
        };
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::Invalid(format!(
                "the {what} must be a positive number, got {v}"
            )));
        }
        Ok(())
    }
}

/// The level chosen for every block (index into [`BlockCandidates::levels`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Selection {
    /// Level index per block, in block order.
    pub levels: Vec<usize>,
}

/// A solved search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchOutcome {
    /// The chosen levels.
    pub selection: Selection,
    /// Predicted latency of the pruned model (ms).
    pub predicted_ms: f64,
    /// Predicted latency of the dense model (ms).
    pub dense_ms: f64,
    /// The budget in ms.
    pub budget_ms: f64,
    /// Sum of normalised errors of the chosen levels.
    pub error_sum: f64,
}

/// Everything the search needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchProblem {
    /// Candidates per block, in block order.
    pub blocks: Vec<BlockCandidates>,
    /// Time of everything not prunable (ms).
    pub rest_ms: f64,
    /// The runtime's shape constraints.
    pub constraints: ShapeConstraints,
}

/// A DP stage: blocks decided together and their joint options.
struct Stage {
    blocks: Vec<usize>,
    /// Each option: level index per block of `blocks`.
    options: Vec<Vec<usize>>,
}

impl SearchProblem {
    /// Checks candidates: a dense level first, finite non-negative errors and times.
    pub fn validate(&self) -> Result<()> {
        if self.blocks.is_empty() {
            return Err(Error::Invalid(
                "nothing to search: the model has no prunable blocks".into(),
            ));
        }
        if !(self.rest_ms.is_finite() && self.rest_ms >= 0.0) {
            return Err(Error::Invalid(format!(
                "fixed time must be finite and >= 0, got {}",
                self.rest_ms
            )));
        }
        for b in &self.blocks {
            if b.levels.is_empty() {
                return Err(Error::Invalid(format!(
                    "{} has no candidate level",
                    b.block
                )));
            }
            for c in &b.levels {
                if !(c.error.is_finite()
                    && c.error >= 0.0
                    && c.time_ms.is_finite()
                    && c.time_ms >= 0.0)
                {
                    return Err(Error::Invalid(format!(
                        "{} has an invalid level {c:?}",
                        b.block
                    )));
                }
            }
        }
        Ok(())
    }

    /// Predicted latency of the dense model.
    pub fn dense_ms(&self) -> f64 {
        self.rest_ms + self.blocks.iter().map(|b| b.levels[0].time_ms).sum::<f64>()
    }

    /// The budget in milliseconds.
    pub fn budget_ms(&self, budget: Budget) -> f64 {
        match budget {
            Budget::LatencyMs(ms) => ms,
            Budget::Speedup(s) => self.dense_ms() / s,
        }
    }

    /// Predicted latency of a selection.
    pub fn time_of(&self, sel: &Selection) -> f64 {
        self.rest_ms
            + self
                .blocks
                .iter()
                .zip(&sel.levels)
                .map(|(b, &l)| b.levels[l].time_ms)
                .sum::<f64>()
    }

    /// Sum of normalised errors of a selection.
    pub fn error_of(&self, sel: &Selection) -> f64 {
        self.blocks
            .iter()
            .zip(&sel.levels)
            .map(|(b, &l)| b.levels[l].error)
            .sum()
    }

    /// Checks a selection against the shape constraints (used by tests and when
    /// loading a plan).
    pub fn admits(&self, sel: &Selection) -> bool {
        if sel.levels.len() != self.blocks.len() || self.removes_everything(sel) {
            return false;
        }
        let c = &self.constraints;
        let kept = |i: usize| self.blocks[i].levels[sel.levels[i]].kept;
        let mut heads = BTreeSet::new();
        let mut widths = BTreeSet::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let k = kept(i);
            if k == 0 && c.module_removal == ModuleRemoval::Never {
                return false;
            }
            if k > 0 && b.attention && c.fixed_heads && k != b.levels[0].kept {
                return false;
            }
            if k > 0 {
                if b.attention {
                    heads.insert(k)
                } else {
                    widths.insert(k)
                };
            }
        }
        if (c.uniform_heads && heads.len() > 1) || (c.uniform_ffn_width && widths.len() > 1) {
            return false;
        }
        if c.module_removal == ModuleRemoval::WholeLayerOnly {
            for b in &self.blocks {
                let layer_kept: Vec<usize> = (0..self.blocks.len())
                    .filter(|&j| self.blocks[j].layer == b.layer)
                    .map(kept)
                    .collect();
                let removed = layer_kept.iter().filter(|&&k| k == 0).count();
                if removed != 0 && removed != layer_kept.len() {
                    return false;
                }
            }
        }
        true
    }

    /// Whether a block may keep `k > 0` units: everything, or with fixed heads only
    /// the dense head count.
    fn allowed_kept(&self, b: &BlockCandidates, k: usize) -> bool {
        !(b.attention && self.constraints.fixed_heads) || k == b.levels[0].kept
    }

    /// The shared values to enumerate for tied blocks: `[None]` when not tied.
    fn tie_domain(&self, attention: bool, tied: bool) -> Vec<Option<usize>> {
        if !tied {
            return vec![None];
        }
        let mut common: Option<BTreeSet<usize>> = None;
        for b in self.blocks.iter().filter(|b| b.attention == attention) {
            let s: BTreeSet<usize> = b
                .levels
                .iter()
                .map(|l| l.kept)
                .filter(|&k| k > 0 && self.allowed_kept(b, k))
                .collect();
            common = Some(match common {
                None => s,
                Some(c) => c.intersection(&s).copied().collect(),
            });
        }
        match common {
            None => vec![None], // no block of this kind
            Some(c) => c.into_iter().rev().map(Some).collect(),
        }
    }

    fn stages_for(&self, heads: Option<usize>, width: Option<usize>) -> Option<Vec<Stage>> {
        let removal = self.constraints.module_removal;
        let kept_levels = |i: usize| -> Vec<usize> {
            let b = &self.blocks[i];
            let tie = if b.attention { heads } else { width };
            (0..b.levels.len())
                .filter(|&l| {
                    let k = b.levels[l].kept;
                    k > 0 && self.allowed_kept(b, k) && tie.is_none_or(|t| t == k)
                })
                .collect()
        };
        let removed_level = |i: usize| self.blocks[i].levels.iter().position(|l| l.kept == 0);
        let mut stages = Vec::new();
        if removal == ModuleRemoval::WholeLayerOnly {
            let layers: BTreeSet<LayerIndex> = self.blocks.iter().map(|b| b.layer).collect();
            for layer in layers {
                let members: Vec<usize> = (0..self.blocks.len())
                    .filter(|&i| self.blocks[i].layer == layer)
                    .collect();
                let mut options: Vec<Vec<usize>> = vec![Vec::new()];
                for &i in &members {
                    let levels = kept_levels(i);
                    options = options
                        .iter()
                        .flat_map(|o| levels.iter().map(move |&l| [o.as_slice(), &[l]].concat()))
                        .collect();
                }
                if let Some(drop) = members
                    .iter()
                    .map(|&i| removed_level(i))
                    .collect::<Option<Vec<usize>>>()
                {
                    options.push(drop);
                }
                if options.is_empty() {
                    return None;
                }
                stages.push(Stage {
                    blocks: members,
                    options,
                });
            }
        } else {
            for i in 0..self.blocks.len() {
                let mut options: Vec<Vec<usize>> =
                    kept_levels(i).into_iter().map(|l| vec![l]).collect();
                if removal == ModuleRemoval::Independent {
                    if let Some(r) = removed_level(i) {
                        options.push(vec![r]);
                    }
                }
                if options.is_empty() {
                    return None;
                }
                stages.push(Stage {
                    blocks: vec![i],
                    options,
                });
            }
        }
        Some(stages)
    }

    fn tie_combinations(&self) -> Vec<(Option<usize>, Option<usize>)> {
        let c = &self.constraints;
        let hs = self.tie_domain(true, c.uniform_heads);
        let ws = self.tie_domain(false, c.uniform_ffn_width);
        hs.iter()
            .flat_map(|&h| ws.iter().map(move |&w| (h, w)))
            .collect()
    }

    /// The fastest admissible selection and its predicted time.
    pub fn fastest(&self) -> Option<(Selection, f64)> {
        let mut best: Option<(Selection, f64)> = None;
        for (h, w) in self.tie_combinations() {
            let Some(stages) = self.stages_for(h, w) else {
                continue;
            };
            let mut choice: Vec<&Vec<usize>> = stages
                .iter()
                .map(|st| {
                    self.quickest_option(st, false)
                        .expect("stages have options")
                })
                .collect();
            if !stages
                .iter()
                .zip(&choice)
                .any(|(st, o)| self.option_keeps(st, o))
            {
                // Everything removed is no model: keep the stage that costs least to keep.
                let extra = |k: usize| {
                    self.quickest_option(&stages[k], true).map(|o| {
                        (
                            self.option_time(&stages[k], o)
                                - self.option_time(&stages[k], choice[k]),
                            o,
                        )
                    })
                };
                let Some((k, o)) = (0..stages.len())
                    .filter_map(|k| extra(k).map(|(dt, o)| (k, dt, o)))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(k, _, o)| (k, o))
                else {
                    continue;
                };
                choice[k] = o;
            }
            let mut levels = vec![0; self.blocks.len()];
            for (st, opt) in stages.iter().zip(choice) {
                for (&bi, &l) in st.blocks.iter().zip(opt) {
                    levels[bi] = l;
                }
            }
            let sel = Selection { levels };
            let t = self.time_of(&sel);
            if best.as_ref().is_none_or(|(_, bt)| t < *bt) {
                best = Some((sel, t));
            }
        }
        best
    }

    fn option_time(&self, st: &Stage, opt: &[usize]) -> f64 {
        st.blocks
            .iter()
            .zip(opt)
            .map(|(&b, &l)| self.blocks[b].levels[l].time_ms)
            .sum()
    }

    /// The fastest option of a stage (only those keeping a block when `keep`).
    fn quickest_option<'s>(&self, st: &'s Stage, keep: bool) -> Option<&'s Vec<usize>> {
        st.options
            .iter()
            .filter(|o| !keep || self.option_keeps(st, o))
            .min_by(|a, b| self.option_time(st, a).total_cmp(&self.option_time(st, b)))
    }

    /// Whether an option of a stage keeps at least one block.
    fn option_keeps(&self, st: &Stage, opt: &[usize]) -> bool {
        st.blocks
            .iter()
            .zip(opt)
            .any(|(&b, &l)| self.blocks[b].levels[l].kept > 0)
    }

    /// The DP over `stages` within `block_budget`: `(cost, time, selection)`.
    ///
    /// A selection that removes every block is no model at all. When the plain DP
    /// picks one, each stage in turn is made to keep something and the best of those
    /// answers is taken (exact: any admissible selection keeps some stage).
    fn solve_stages(
        &self,
        stages: &[Stage],
        alpha: &dyn Fn(usize) -> f64,
        block_budget: f64,
        buckets: usize,
    ) -> Option<(f64, f64, Selection)> {
        let dp_option = |st: &Stage, opt: &[usize]| DpOption {
            time: self.option_time(st, opt),
            cost: st
                .blocks
                .iter()
                .zip(opt)
                .map(|(&b, &l)| alpha(b) * self.blocks[b].levels[l].error)
                .sum(),
        };
        // Option indices per stage; `forced` keeps only the options that keep a block.
        let run = |forced: Option<usize>| -> Option<(f64, f64, Selection)> {
            let allowed: Vec<Vec<usize>> = stages
                .iter()
                .enumerate()
                .map(|(k, st)| {
                    (0..st.options.len())
                        .filter(|&o| forced != Some(k) || self.option_keeps(st, &st.options[o]))
                        .collect()
                })
                .collect();
            let dp_stages: Vec<Vec<DpOption>> = stages
                .iter()
                .zip(&allowed)
                .map(|(st, a)| a.iter().map(|&o| dp_option(st, &st.options[o])).collect())
                .collect();
            let sol = dp::solve(&dp_stages, block_budget, buckets)?;
            let mut levels = vec![0; self.blocks.len()];
            for ((st, a), &o) in stages.iter().zip(&allowed).zip(&sol.choices) {
                for (&bi, &l) in st.blocks.iter().zip(&st.options[a[o]]) {
                    levels[bi] = l;
                }
            }
            Some((sol.cost, sol.time, Selection { levels }))
        };
        let plain = run(None)?;
        if !self.removes_everything(&plain.2) {
            return Some(plain);
        }
        (0..stages.len())
            .filter_map(|k| run(Some(k)))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)))
    }

    /// Whether a selection removes every block (no model left).
    pub fn removes_everything(&self, sel: &Selection) -> bool {
        self.blocks
            .iter()
            .zip(&sel.levels)
            .all(|(b, &l)| b.levels[l].kept == 0)
    }

    /// Minimises `sum alpha_b * e(b, level)` subject to predicted time <= budget.
    ///
    /// `alphas` (one per block, or empty for all ones) are the SPDY coefficients.
    /// Fails with [`Error::ImpossibleBudget`] when even the fastest admissible model
    /// is too slow.
    pub fn solve(&self, budget: Budget, alphas: &[f64], buckets: usize) -> Result<SearchOutcome> {
        self.validate()?;
        budget.validate()?;
        if !alphas.is_empty() && alphas.len() != self.blocks.len() {
            return Err(Error::Invalid(format!(
                "{} coefficients for {} blocks",
                alphas.len(),
                self.blocks.len()
            )));
        }
        let alpha = |b: usize| if alphas.is_empty() { 1.0 } else { alphas[b] };
        let budget_ms = self.budget_ms(budget);
        let dense_ms = self.dense_ms();
        if dense_ms <= budget_ms {
            // The dense model already meets the budget: nothing to prune.
            let selection = Selection {
                levels: vec![0; self.blocks.len()],
            };
            return Ok(SearchOutcome {
                predicted_ms: dense_ms,
                error_sum: 0.0,
                selection,
                dense_ms,
                budget_ms,
            });
        }
        let block_budget = budget_ms - self.rest_ms;
        let mut best: Option<(f64, f64, Selection)> = None;
        if block_budget >= 0.0 {
            for (h, w) in self.tie_combinations() {
                let Some(stages) = self.stages_for(h, w) else {
                    continue;
                };
                let Some((cost, time, selection)) =
                    self.solve_stages(&stages, &alpha, block_budget, buckets)
                else {
                    continue;
                };
                let better = match &best {
                    None => true,
                    Some((c, t, _)) => cost < *c || (cost == *c && time < *t),
                };
                if better {
                    best = Some((cost, time, selection));
                }
            }
        }
        match best {
            Some((_, _, selection)) => Ok(SearchOutcome {
                predicted_ms: self.time_of(&selection),
                error_sum: self.error_of(&selection),
                selection,
                dense_ms,
                budget_ms,
            }),
            None => {
                let fastest = self.fastest();
                // Bucket rounding (always up) can reject a budget that only the fastest
                // selection meets, with no slack at all: fall back to that selection.
                if let Some((selection, t)) = fastest.clone().filter(|(_, t)| *t <= budget_ms) {
                    return Ok(SearchOutcome {
                        predicted_ms: t,
                        error_sum: self.error_of(&selection),
                        selection,
                        dense_ms,
                        budget_ms,
                    });
                }
                let fastest_ms = fastest.map(|(_, t)| t).unwrap_or(dense_ms);
                Err(Error::ImpossibleBudget {
                    requested_ms: budget_ms,
                    fastest_ms,
                    dense_ms,
                    max_speedup: dense_ms / fastest_ms.max(f64::MIN_POSITIVE),
                })
            }
        }
    }
}
