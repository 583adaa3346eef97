//! The budgeted search: DP against brute force, properties (never over budget,
//! monotone in the budget), constraints and refinement.

use proptest::prelude::*;
use ziplm::search::dp::{self, DpOption};
use ziplm::search::spdy::{refine, RefineConfig};
use ziplm::search::{BlockCandidates, Budget, Candidate, SearchProblem, Selection};
use ziplm::Error;
use ziplm_plugin_api::{BlockId, LayerIndex, ModuleRemoval, ShapeConstraints};

fn stages_strategy() -> impl Strategy<Value = Vec<Vec<DpOption>>> {
    prop::collection::vec(
        prop::collection::vec(
            (0.0f64..10.0, 0.0f64..1.0).prop_map(|(time, cost)| DpOption { time, cost }),
            1..6,
        ),
        1..8,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn dp_never_exceeds_the_budget(stages in stages_strategy(), budget in 0.5f64..60.0, buckets in 10usize..3000) {
        if let Some(sol) = dp::solve(&stages, budget, buckets) {
            let time: f64 = sol.choices.iter().enumerate().map(|(l, &s)| stages[l][s].time).sum();
            prop_assert!(time <= budget * (1.0 + 1e-9), "time {time} > budget {budget}");
            prop_assert!((time - sol.time).abs() < 1e-9);
        }
    }

    #[test]
    fn dp_is_monotone_in_the_budget(stages in stages_strategy(), b1 in 0.5f64..40.0, extra in 0.0f64..20.0) {
        // Same bucket size for both budgets so the discretisation is shared.
        let beta = 0.01;
        let buckets1 = (b1 / beta).round() as usize;
        let buckets2 = ((b1 + extra) / beta).round() as usize;
        let s1 = dp::solve(&stages, buckets1 as f64 * beta, buckets1.max(1));
        let s2 = dp::solve(&stages, buckets2 as f64 * beta, buckets2.max(1));
        match (s1, s2) {
            (Some(a), Some(b)) => prop_assert!(b.cost <= a.cost + 1e-12, "{} > {}", b.cost, a.cost),
            (Some(_), None) => prop_assert!(false, "a larger budget lost feasibility"),
            _ => {}
        }
    }

    #[test]
    fn dp_matches_brute_force_on_integer_times(
        stages in prop::collection::vec(
            prop::collection::vec((0u32..8, 0.0f64..1.0).prop_map(|(t, cost)| DpOption { time: t as f64, cost }), 1..5),
            1..6),
        budget in 1u32..30,
    ) {
        let sol = dp::solve(&stages, budget as f64, budget as usize);
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; stages.len()];
        'outer: loop {
            let t: f64 = idx.iter().enumerate().map(|(l, &s)| stages[l][s].time).sum();
            let c: f64 = idx.iter().enumerate().map(|(l, &s)| stages[l][s].cost).sum();
            if t <= budget as f64 && best.is_none_or(|b| c < b) {
                best = Some(c);
            }
            for l in 0..stages.len() {
                idx[l] += 1;
                if idx[l] < stages[l].len() { continue 'outer; }
                idx[l] = 0;
            }
            break;
        }
        match (sol, best) {
            (None, None) => {}
            (Some(s), Some(b)) => prop_assert!((s.cost - b).abs() < 1e-12),
            (s, b) => prop_assert!(false, "dp {:?} brute {:?}", s, b),
        }
    }
}

/// A model of `layers` layers: attention with 4 head levels, FFN with 5 widths,
/// errors and times random but monotone.
fn problem(layers: usize, seed: u64, constraints: ShapeConstraints) -> SearchProblem {
    let mut r = super::common::rng(seed);
    let mut u = move || rand::Rng::random::<f64>(&mut r);
    let mut blocks = Vec::new();
    for l in 0..layers {
        for attention in [true, false] {
            let kepts: Vec<usize> = if attention {
                vec![4, 3, 2, 1, 0]
            } else {
                vec![128, 96, 64, 32, 0]
            };
            let full = kepts[0] as f64;
            let mut levels = Vec::new();
            let mut e: f64 = 0.0;
            for (i, &k) in kepts.iter().enumerate() {
                if i > 0 {
                    e = (e + 0.3 * u()).min(1.0);
                }
                let err = if k == 0 { 1.0 } else { e };
                let time = if k == 0 {
                    0.0
                } else {
                    ((k as f64 / full) * 10.0 * (0.8 + 0.4 * u())).round()
                };
                levels.push(Candidate {
                    kept: k,
                    error: err,
                    time_ms: time,
                });
            }
            blocks.push(BlockCandidates {
                block: BlockId(blocks.len() as u32),
                layer: LayerIndex(l as u32),
                attention,
                levels,
            });
        }
    }
    SearchProblem {
        blocks,
        rest_ms: 3.0,
        constraints,
    }
}

fn brute(p: &SearchProblem, budget_ms: f64) -> Option<f64> {
    let n = p.blocks.len();
    let mut idx = vec![0usize; n];
    let mut best: Option<f64> = None;
    loop {
        let sel = Selection {
            levels: idx.clone(),
        };
        if p.admits(&sel) && p.time_of(&sel) <= budget_ms + 1e-9 {
            let e = p.error_of(&sel);
            if best.is_none_or(|b| e < b) {
                best = Some(e);
            }
        }
        let mut l = 0;
        loop {
            if l == n {
                return best;
            }
            idx[l] += 1;
            if idx[l] < p.blocks[l].levels.len() {
                break;
            }
            idx[l] = 0;
            l += 1;
        }
    }
}

fn constraint_sets() -> Vec<ShapeConstraints> {
    let base = ShapeConstraints::default();
    vec![
        base.clone(),
        ShapeConstraints {
            uniform_heads: true,
            ..base.clone()
        },
        ShapeConstraints {
            module_removal: ModuleRemoval::WholeLayerOnly,
            uniform_heads: true,
            ..base.clone()
        },
        ShapeConstraints {
            module_removal: ModuleRemoval::Never,
            uniform_ffn_width: true,
            ..base.clone()
        },
        ShapeConstraints {
            module_removal: ModuleRemoval::WholeLayerOnly,
            ..base.clone()
        },
        // Qwen2 in mistral.rs: every head or none, one FFN width, whole layers.
        ShapeConstraints {
            module_removal: ModuleRemoval::WholeLayerOnly,
            uniform_heads: true,
            uniform_ffn_width: true,
            fixed_heads: true,
            ..base
        },
    ]
}

#[test]
fn constrained_search_matches_brute_force() {
    for (ci, constraints) in constraint_sets().into_iter().enumerate() {
        for seed in 0..4 {
            let p = problem(3, seed * 10 + ci as u64, constraints.clone());
            let dense = p.dense_ms();
            for frac in [0.35, 0.5, 0.7, 0.9, 1.0] {
                let budget = (dense * frac).round(); // integer times, integer budget
                let buckets = ((budget - p.rest_ms) as usize).max(1);
                let bf = brute(&p, budget);
                match (p.solve(Budget::LatencyMs(budget), &[], buckets), bf) {
                    (Ok(out), Some(b)) => {
                        assert!(
                            p.admits(&out.selection),
                            "constraints {ci}: inadmissible {:?}",
                            out.selection
                        );
                        assert!(out.predicted_ms <= budget + 1e-9);
                        assert!(
                            (out.error_sum - b).abs() < 1e-9,
                            "constraints {ci} seed {seed} frac {frac}: {} vs {b}",
                            out.error_sum
                        );
                    }
                    (Err(Error::ImpossibleBudget { fastest_ms, .. }), None) => {
                        assert!(
                            fastest_ms > budget,
                            "fastest {fastest_ms} <= budget {budget}"
                        );
                        let (sel, t) = p.fastest().unwrap();
                        assert!(p.admits(&sel));
                        assert_eq!(t, fastest_ms);
                    }
                    (r, b) => panic!(
                        "constraints {ci} seed {seed} frac {frac}: search {r:?}, brute force {b:?}"
                    ),
                }
            }
        }
    }
}

#[test]
fn impossible_budget_names_the_fastest_time() {
    let p = problem(
        2,
        1,
        ShapeConstraints {
            module_removal: ModuleRemoval::Never,
            ..Default::default()
        },
    );
    let err = p.solve(Budget::Speedup(100.0), &[], 10_000).unwrap_err();
    let (fastest, _) = match &err {
        Error::ImpossibleBudget {
            fastest_ms,
            dense_ms,
            ..
        } => (*fastest_ms, *dense_ms),
        other => panic!("{other:?}"),
    };
    assert!(
        err.to_string().contains(&format!("{fastest:.3} ms")),
        "{err}"
    );
    assert!(p.solve(Budget::LatencyMs(fastest), &[], 10_000).is_ok());
}

#[test]
fn dense_budget_keeps_everything() {
    let p = problem(3, 2, ShapeConstraints::default());
    let out = p.solve(Budget::Speedup(1.0), &[], 10_000).unwrap();
    assert_eq!(
        out.selection,
        Selection {
            levels: vec![0; p.blocks.len()]
        }
    );
    assert_eq!(out.error_sum, 0.0);
}

#[test]
fn refinement_is_deterministic_bounded_and_never_worse() {
    let p = problem(4, 3, ShapeConstraints::default());
    // A "real" loss that weighs FFN errors of late layers more than the proxy does.
    let loss_of = |sel: &Selection| -> f64 {
        sel.levels
            .iter()
            .enumerate()
            .map(|(b, &l)| p.blocks[b].levels[l].error * (1.0 + b as f64))
            .sum()
    };
    let cfg = RefineConfig {
        restarts: 6,
        local_steps: 20,
        resample_fraction: 0.1,
        max_evaluations: 15,
        seed: 7,
    };
    let mut calls = 0;
    let mut hook = |s: &Selection| {
        calls += 1;
        Ok(loss_of(s))
    };
    let a = refine(&p, Budget::Speedup(1.6), 10_000, &cfg, &mut hook).unwrap();
    assert!(calls <= 15, "{calls} evaluations");
    assert!(a.loss <= a.baseline_loss);
    assert!(a.outcome.predicted_ms <= a.outcome.budget_ms);
    let mut hook2 = |s: &Selection| Ok(loss_of(s));
    let b = refine(&p, Budget::Speedup(1.6), 10_000, &cfg, &mut hook2).unwrap();
    assert_eq!(a, b, "same seed, same result");
}

/// A selection that removes every block is no model, even where the errors say
/// removal is free: the search keeps the cheapest block to keep, matching brute
/// force, and the fastest selection keeps one too. (A two-layer model at a tight
/// corrected budget once emitted "the plan removes every layer".)
#[test]
fn no_selection_removes_every_block() {
    for constraints in constraint_sets()
        .into_iter()
        .filter(|c| c.module_removal != ModuleRemoval::Never)
    {
        for seed in 0..4 {
            let mut p = problem(2, 100 + seed, constraints.clone());
            for b in &mut p.blocks {
                for l in &mut b.levels {
                    if l.kept == 0 {
                        l.error = 0.0; // removal looks free
                    }
                }
            }
            let (fastest, fastest_ms) = p.fastest().unwrap();
            assert!(p.admits(&fastest) && !p.removes_everything(&fastest));
            assert!(fastest_ms > p.rest_ms, "{fastest_ms}: something is kept");
            for budget in [
                fastest_ms,
                fastest_ms + 1.0,
                fastest_ms + 4.0,
                p.dense_ms() - 1.0,
            ] {
                let buckets = ((budget - p.rest_ms) as usize).max(1);
                let out = p.solve(Budget::LatencyMs(budget), &[], buckets).unwrap();
                assert!(
                    !p.removes_everything(&out.selection),
                    "{constraints:?} seed {seed} budget {budget}"
                );
                let bf = brute(&p, budget).unwrap();
                assert!(
                    (out.error_sum - bf).abs() < 1e-9,
                    "{} vs {bf}",
                    out.error_sum
                );
            }
            let err = p.solve(Budget::LatencyMs(p.rest_ms), &[], 100).unwrap_err();
            assert!(matches!(err, Error::ImpossibleBudget { .. }), "{err}");
        }
    }
}
