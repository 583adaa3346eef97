//! The database end to end on a random two-layer model: levels, plans, weights,
//! search with a latency table.

use super::common::*;
use faer::Mat;
use ziplm::database::{BlockInput, Database, DatabaseConfig};
use ziplm::search::Budget;
use ziplm_plugin_api::*;

fn structure(constraints: ShapeConstraints) -> ModelStructure {
    structure_with_layers(constraints, 2)
}

/// A random model of `layers` layers: GQA attention 4 heads / 2 KV, gated FFN 96.
pub(super) fn structure_with_layers(constraints: ShapeConstraints, layers: u32) -> ModelStructure {
    let attn = BlockKind::Attention(AttentionShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
    });
    let ffn = BlockKind::Ffn(FfnShape {
        width: 96,
        gated: true,
    });
    let mut blocks = Vec::new();
    for l in 0..layers {
        for kind in [attn, ffn] {
            let id = BlockId(blocks.len() as u32);
            blocks.push(PrunableBlock {
                id,
                layer: LayerIndex(l),
                kind,
                hidden: 24,
                name: format!("layer{l}.{}", kind.label()),
            });
        }
    }
    ModelStructure {
        architecture: "test".into(),
        blocks,
        constraints,
    }
}

fn database(constraints: ShapeConstraints) -> Database {
    database_of(structure(constraints))
}

/// The database of `s` from random weights and correlated inputs (seed 42).
pub(super) fn database_of(s: ModelStructure) -> Database {
    let mut r = rng(42);
    let inputs = s
        .blocks
        .iter()
        .map(|b| {
            let n = b.kind.out_proj_inputs();
            let x = correlated_inputs(&mut r, n, 4 * n);
            BlockInput {
                layout: GroupLayout::for_kind(&b.kind, s.constraints.gqa_policy),
                weights: randn(&mut r, b.hidden, n),
                gram: gram2(&x),
            }
        })
        .collect();
    Database::from_parts(s, inputs, &DatabaseConfig::default()).unwrap()
}

/// A table where attention costs 0.5 ms a head, an FFN 1 ms per 32 neurons, the rest
/// 1 ms.
pub(super) fn table(db: &Database) -> LatencyTable {
    let mut t = LatencyTable {
        format_version: FORMAT_VERSION,
        key: LatencyTableKey {
            target: TargetFingerprint {
                runtime: "test".into(),
                runtime_version: "0".into(),
                device: "none".into(),
                threads: 1,
                dtype: "f32".into(),
            },
            workload: Workload::prefill(1, 16),
            model: "test".into(),
        },
        rest: Timing {
            median_ms: 1.0,
            min_ms: 1.0,
            max_ms: 1.0,
            runs: 1,
        },
        entries: vec![],
    };
    for shape in db.shapes() {
        let ms = match shape {
            BlockShape::Attention { heads, .. } => 0.5 * heads as f64,
            BlockShape::Ffn { width, .. } => width as f64 / 32.0,
        };
        t.insert(
            shape,
            Timing {
                median_ms: ms,
                min_ms: ms,
                max_ms: ms,
                runs: 1,
            },
        );
    }
    t
}

#[test]
fn levels_follow_the_grids() {
    let db = database(ShapeConstraints::default());
    // Attention, GQA 4 heads / 2 KV, equal per group: 4, 2, 0 heads.
    let a = &db.blocks[0];
    assert_eq!(
        a.levels.iter().map(|l| l.kept).collect::<Vec<_>>(),
        vec![4, 2, 0]
    );
    assert_eq!(
        a.levels.iter().map(|l| l.kept_kv).collect::<Vec<_>>(),
        vec![2, 2, 0]
    );
    // FFN 96 on a grid of 32: 96, 64, 32, 0.
    let f = &db.blocks[1];
    assert_eq!(
        f.levels.iter().map(|l| l.kept).collect::<Vec<_>>(),
        vec![96, 64, 32, 0]
    );
    for b in &db.blocks {
        assert_eq!(b.levels[0].error, 0.0);
        assert_eq!(b.levels.last().unwrap().error, 1.0);
        for w in b.levels.windows(2) {
            assert!(
                w[0].error <= w[1].error + 1e-12,
                "errors grow with pruning: {:?}",
                b.levels
            );
        }
    }
    assert_eq!(db.shapes().len(), 5); // attention 4, 2 heads; FFN 96, 64, 32
}

#[test]
fn whole_kv_groups_remove_k_and_v_heads() {
    let db = database(ShapeConstraints {
        gqa_policy: GqaPolicy::WholeKvGroups,
        ..Default::default()
    });
    let a = &db.blocks[0];
    assert_eq!(
        a.levels
            .iter()
            .map(|l| (l.kept, l.kept_kv))
            .collect::<Vec<_>>(),
        vec![(4, 2), (2, 1), (0, 0)]
    );
    let p = db.block_plan(0, 1).unwrap();
    assert_eq!(p.kept.len(), 2);
    assert_eq!(p.kept_kv_heads.len(), 1);
    assert_eq!(p.kept[0] / 2, p.kept_kv_heads[0]);
}

#[test]
fn search_plan_and_weights_fit_together() {
    let db = database(ShapeConstraints::default());
    let problem = db.search_problem(&table(&db)).unwrap();
    assert_eq!(problem.dense_ms(), 1.0 + 2.0 * (2.0 + 3.0));
    let out = problem.solve(Budget::Speedup(1.5), &[], 10_000).unwrap();
    assert!(out.predicted_ms <= out.budget_ms);
    let plan = db.plan(&out.selection).unwrap();
    plan.validate_for(&db.structure).unwrap();
    let weights = db.pruned_weights(&out.selection).unwrap();
    for bp in &plan.blocks {
        let b = &db.structure.blocks[bp.block.index()];
        match bp.choice() {
            BlockChoice::Pruned => {
                let w = &weights.out_projections[&bp.block];
                assert_eq!((w.rows, w.cols), (b.hidden, bp.kept_columns().len()));
            }
            _ => assert!(!weights.out_projections.contains_key(&bp.block)),
        }
    }
    // The plan's JSON form is stable and round-trips.
    let json = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
}

#[test]
fn database_is_deterministic_across_thread_counts() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let a = one.install(|| database(ShapeConstraints::default()));
    let b = database(ShapeConstraints::default());
    for (x, y) in a.blocks.iter().zip(&b.blocks) {
        assert_eq!(x.trace, y.trace);
        assert_eq!(x.levels, y.levels);
    }
    let _ = Mat::<f64>::zeros(1, 1);
}
