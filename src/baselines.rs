//! Baselines ZipLM is compared against (issue evidence, `ziplm frontier`).
//!
//! - [`magnitude_plan`]: the same per-layer shapes as a ZipLM selection, but the kept
//!   heads / neurons are those with the largest out-projection weight norms, and no
//!   OBS update (the emitted weights are the original ones, sliced).
//! - [`uniform_selection`]: the same level in every layer of a kind (uniform widths),
//!   the fastest such model that meets the budget's prediction.
//! - [`layer_drop_selection`]: whole layers dropped (attention and FFN together), the
//!   rest dense; layers chosen greedily by the least removal error per millisecond
//!   saved until the prediction meets the budget.

use crate::database::Database;
use crate::error::{Error, Result};
use crate::search::{Budget, SearchProblem, Selection};
use ziplm_plugin_api::{BlockKind, BlockPlan, Plan, FORMAT_VERSION};

/// Norm of each group of out-projection columns (original weights).
fn group_norms(db: &Database, block: usize) -> Vec<f64> {
    let b = &db.blocks[block];
    b.layout
        .groups
        .iter()
        .map(|cols| {
            cols.iter()
                .map(|&c| b.layer.w.col(c).iter().map(|v| v * v).sum::<f64>())
                .sum()
        })
        .collect()
}

/// A plan with the shapes of `selection` whose kept units are chosen by weight
/// magnitude (largest out-projection column-group norms), respecting the GQA
/// schedule. Emit it without compensated weights.
pub fn magnitude_plan(db: &Database, selection: &Selection) -> Result<Plan> {
    let zipl = db.plan(selection)?;
    let mut blocks = Vec::with_capacity(zipl.blocks.len());
    for (bi, bp) in zipl.blocks.iter().enumerate() {
        let b = &db.blocks[bi];
        let level = b.levels[selection.levels[bi]];
        let n_groups = b.layout.groups.len();
        let keep_groups = n_groups - level.removed_groups;
        let norms = group_norms(db, bi);
        let mut order: Vec<usize> = (0..n_groups).collect();
        order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]).then(x.cmp(&y)));
        let kept_groups: Vec<usize> = match &b.layout.schedule {
            ziplm_plugin_api::GroupSchedule::Free => order.into_iter().take(keep_groups).collect(),
            ziplm_plugin_api::GroupSchedule::Balanced { class_of } => {
                // The same number of groups in every class: the largest of each class.
                let classes = b.layout.step();
                let per_class = keep_groups / classes.max(1);
                let mut taken = vec![0usize; classes];
                order
                    .into_iter()
                    .filter(|&g| {
                        let c = class_of[g] as usize;
                        let ok = taken[c] < per_class;
                        taken[c] += usize::from(ok);
                        ok
                    })
                    .collect()
            }
        };
        let mut gone = vec![true; b.layer.n_inputs()];
        for g in &kept_groups {
            for &c in &b.layout.groups[*g] {
                gone[c] = false;
            }
        }
        let (kept, kept_kv_heads) = match bp.kind {
            BlockKind::Ffn(_) => ((0..gone.len()).filter(|&c| !gone[c]).collect(), vec![]),
            BlockKind::Attention(a) => {
                let heads: Vec<usize> = (0..a.n_heads).filter(|h| !gone[h * a.head_dim]).collect();
                let mut kv: Vec<usize> = heads.iter().map(|h| h / a.heads_per_kv()).collect();
                kv.dedup();
                (heads, kv)
            }
        };
        blocks.push(BlockPlan {
            block: bp.block,
            kind: bp.kind,
            kept,
            kept_kv_heads,
        });
    }
    let plan = Plan {
        format_version: FORMAT_VERSION,
        architecture: zipl.architecture,
        blocks,
    };
    plan.validate_for(&db.structure).map_err(Error::Invalid)?;
    Ok(plan)
}

/// The uniform-width selection for a budget: every attention block at one level and
/// every FFN block at one level (removal excluded), with the least error sum among
/// the pairs whose predicted time meets the budget.
pub fn uniform_selection(problem: &SearchProblem, budget: Budget) -> Result<Selection> {
    let budget_ms = problem.budget_ms(budget);
    let levels_of = |attention: bool| -> Vec<usize> {
        let mut v: Vec<usize> = problem
            .blocks
            .iter()
            .filter(|b| b.attention == attention)
            .flat_map(|b| b.levels.iter().map(|l| l.kept).filter(|&k| k > 0))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let (heads, widths) = (levels_of(true), levels_of(false));
    let mut best: Option<(f64, Selection)> = None;
    for &h in heads.iter().chain(heads.is_empty().then_some(&0)) {
        for &w in widths.iter().chain(widths.is_empty().then_some(&0)) {
            let levels: Option<Vec<usize>> = problem
                .blocks
                .iter()
                .map(|b| {
                    b.levels
                        .iter()
                        .position(|l| l.kept == if b.attention { h } else { w })
                })
                .collect();
            let Some(levels) = levels else { continue };
            let sel = Selection { levels };
            // Shapes the runtime cannot serve (fixed heads) are no baseline.
            if problem.admits(&sel) && problem.time_of(&sel) <= budget_ms {
                let e = problem.error_of(&sel);
                if best.as_ref().is_none_or(|(be, _)| e < *be) {
                    best = Some((e, sel));
                }
            }
        }
    }
    best.map(|(_, s)| s)
        .ok_or_else(|| Error::Invalid("no uniform shape meets the budget".into()))
}

/// The whole-layer dropping selection for a budget: every block of a dropped layer at
/// its removed level, every other block dense. Layers are added greedily, cheapest
/// first by removal error per predicted millisecond saved, until the prediction meets
/// the budget.
pub fn layer_drop_selection(problem: &SearchProblem, budget: Budget) -> Result<Selection> {
    let budget_ms = problem.budget_ms(budget);
    let mut layers: Vec<_> = problem.blocks.iter().map(|b| b.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    let removed_level = |i: usize| problem.blocks[i].levels.iter().position(|l| l.kept == 0);
    // Per removable layer: (removal error per ms saved, layer, its blocks, their removed levels).
    let mut options = vec![];
    for &layer in &layers {
        let blocks: Vec<usize> = (0..problem.blocks.len())
            .filter(|&i| problem.blocks[i].layer == layer)
            .collect();
        let Some(levels) = blocks
            .iter()
            .map(|&i| removed_level(i))
            .collect::<Option<Vec<usize>>>()
        else {
            continue;
        };
        let error: f64 = blocks
            .iter()
            .zip(&levels)
            .map(|(&i, &l)| problem.blocks[i].levels[l].error)
            .sum();
        let saved: f64 = blocks
            .iter()
            .zip(&levels)
            .map(|(&i, &l)| {
                problem.blocks[i].levels[0].time_ms - problem.blocks[i].levels[l].time_ms
            })
            .sum();
        options.push((error / saved.max(1e-12), layer, blocks, levels));
    }
    options.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut sel = Selection {
        levels: vec![0; problem.blocks.len()],
    };
    for (_, _, blocks, levels) in &options {
        if problem.time_of(&sel) <= budget_ms {
            break;
        }
        for (&i, &l) in blocks.iter().zip(levels) {
            sel.levels[i] = l;
        }
    }
    if problem.time_of(&sel) > budget_ms {
        return Err(Error::Invalid(format!(
            "dropping every removable layer gives {:.3} ms, over the budget of {budget_ms:.3} ms",
            problem.time_of(&sel)
        )));
    }
    Ok(sel)
}

/// A baseline's model at one target: its selection (for the predicted time), its plan
/// and the weights to emit with it.
pub struct BaselineModel {
    /// The selection (ZipLM's for `magnitude`).
    pub selection: Selection,
    /// The plan to emit.
    pub plan: Plan,
    /// Compensated out-projections (none for `magnitude`).
    pub weights: ziplm_plugin_api::PrunedWeights,
}

/// The model of baseline `method` (`ziplm-plain`, `magnitude`, `uniform` or
/// `layer-drop`) at `budget`, next to ZipLM's `ziplm` selection at the same target.
/// `Ok(None)` when the method has no model within the budget (said on stderr).
pub fn baseline_model(
    db: &Database,
    problem: &SearchProblem,
    method: &str,
    ziplm: &Selection,
    budget: Budget,
    buckets: usize,
) -> Result<Option<BaselineModel>> {
    if method == "magnitude" {
        return Ok(Some(BaselineModel {
            selection: ziplm.clone(),
            plan: magnitude_plan(db, ziplm)?,
            weights: Default::default(),
        }));
    }
    let found = match method {
        "ziplm-plain" => problem.solve(budget, &[], buckets).map(|o| o.selection),
        "uniform" => uniform_selection(problem, budget),
        "layer-drop" => layer_drop_selection(problem, budget),
        other => return Err(Error::Invalid(format!("unknown baseline `{other}`"))),
    };
    let selection = match found {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{method}: {e}; no point");
            return Ok(None);
        }
    };
    Ok(Some(BaselineModel {
        plan: db.plan(&selection)?,
        weights: db.pruned_weights(&selection)?,
        selection,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::{BlockCandidates, Candidate};
    use ziplm_plugin_api::{BlockId, LayerIndex, ShapeConstraints};

    fn block(i: u32, attention: bool, removal_error: f64) -> BlockCandidates {
        BlockCandidates {
            block: BlockId(2 * i + u32::from(!attention)),
            layer: LayerIndex(i),
            attention,
            levels: vec![
                Candidate {
                    kept: 4,
                    error: 0.0,
                    time_ms: 1.0,
                },
                Candidate {
                    kept: 2,
                    error: 0.1,
                    time_ms: 0.6,
                },
                Candidate {
                    kept: 0,
                    error: removal_error,
                    time_ms: 0.0,
                },
            ],
        }
    }

    #[test]
    fn layer_drop_removes_the_cheapest_whole_layers_first() {
        let problem = SearchProblem {
            blocks: vec![
                block(0, true, 5.0),
                block(0, false, 5.0),
                block(1, true, 1.0),
                block(1, false, 1.0),
                block(2, true, 3.0),
                block(2, false, 3.0),
            ],
            rest_ms: 1.0,
            constraints: ShapeConstraints::default(),
        };
        // Dense 7 ms; 5 ms needs one layer dropped: layer 1 (least error).
        let sel = layer_drop_selection(&problem, Budget::LatencyMs(5.0)).unwrap();
        assert_eq!(sel.levels, vec![0, 0, 2, 2, 0, 0]);
        let sel = layer_drop_selection(&problem, Budget::LatencyMs(3.0)).unwrap();
        assert_eq!(sel.levels, vec![0, 0, 2, 2, 2, 2]);
        assert!(layer_drop_selection(&problem, Budget::LatencyMs(0.5)).is_err());
    }
}
