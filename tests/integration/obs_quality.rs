//! OBS compensation and greedy ordering beat the naive alternatives on reconstruction
//! error (ZIPLM.md section 3), for correlated inputs.

use super::common::*;
use faer::Mat;
use ziplm::obs::{materialize, run_greedy, PreparedLayer};
use ziplm_plugin_api::{AttentionShape, BlockKind, FfnShape, GqaPolicy, GroupLayout};

struct Case {
    w: Mat<f64>,
    x: Mat<f64>,
    layer: PreparedLayer,
}

fn case(seed: u64, d_out: usize, n: usize) -> Case {
    let mut r = rng(seed);
    let w = randn(&mut r, d_out, n);
    let x = correlated_inputs(&mut r, n, 4 * n);
    let layer = PreparedLayer::new(w.as_ref(), gram2(&x).as_ref(), 0.01).unwrap();
    Case { w, x, layer }
}

/// Full `d_out x n` matrix from weights on `kept` columns.
fn expand(m: &Mat<f64>, kept: &[usize], n: usize) -> Mat<f64> {
    let mut full = Mat::zeros(m.nrows(), n);
    for (a, &j) in kept.iter().enumerate() {
        full.col_mut(j).copy_from(m.col(a));
    }
    full
}

fn kept_after(layout: &GroupLayout, removed_groups: &[usize]) -> Vec<usize> {
    let mut gone = vec![false; layout.n_columns()];
    for &g in removed_groups {
        for &c in &layout.groups[g] {
            gone[c] = true;
        }
    }
    (0..gone.len()).filter(|&c| !gone[c]).collect()
}

/// Error of keeping `kept` columns: with the OBS update, and with plain zeroing.
fn errors(c: &Case, kept: &[usize]) -> (f64, f64) {
    let n = c.w.ncols();
    let updated = expand(&materialize(&c.layer, kept).unwrap(), kept, n);
    let zeroed = expand(
        &Mat::from_fn(c.w.nrows(), kept.len(), |i, a| c.w[(i, kept[a])]),
        kept,
        n,
    );
    (
        output_error(&updated, &c.w, &c.x),
        output_error(&zeroed, &c.w, &c.x),
    )
}

#[test]
fn obs_update_beats_plain_removal_of_the_same_columns() {
    for seed in 0..5 {
        let c = case(100 + seed, 32, 96);
        let layout = GroupLayout::for_kind(
            &BlockKind::Ffn(FfnShape {
                width: 96,
                gated: false,
            }),
            GqaPolicy::WholeKvGroups,
        );
        let trace = run_greedy(&c.layer, &layout, 72, &[]).unwrap();
        for k in [8, 24, 48, 72] {
            let kept = kept_after(&layout, &trace.order[..k]);
            let (obs, plain) = errors(&c, &kept);
            assert!(
                obs < plain,
                "seed {seed}, {k} removed: OBS {obs} vs plain {plain}"
            );
        }
        // Heads too.
        let shape = AttentionShape {
            n_heads: 8,
            n_kv_heads: 8,
            head_dim: 12,
        };
        let layout = GroupLayout::for_kind(&BlockKind::Attention(shape), GqaPolicy::WholeKvGroups);
        let trace = run_greedy(&c.layer, &layout, 6, &[]).unwrap();
        for k in 1..=6 {
            let kept = kept_after(&layout, &trace.order[..k]);
            let (obs, plain) = errors(&c, &kept);
            assert!(
                obs < plain,
                "seed {seed}, {k} heads removed: OBS {obs} vs plain {plain}"
            );
        }
    }
}

#[test]
fn greedy_obs_order_beats_magnitude_order() {
    let mut wins = 0;
    let mut total = 0;
    for seed in 0..5 {
        let c = case(200 + seed, 32, 96);
        let n = 96;
        let layout = GroupLayout::for_kind(
            &BlockKind::Ffn(FfnShape {
                width: n,
                gated: false,
            }),
            GqaPolicy::WholeKvGroups,
        );
        let trace = run_greedy(&c.layer, &layout, 80, &[]).unwrap();
        // Magnitude order: smallest column norms first.
        let mut by_norm: Vec<usize> = (0..n).collect();
        let norm = |j: usize| c.w.col(j).iter().map(|v| v * v).sum::<f64>();
        by_norm.sort_by(|&a, &b| norm(a).total_cmp(&norm(b)));
        for k in [16, 32, 48, 64, 80] {
            let greedy_kept = kept_after(&layout, &trace.order[..k]);
            let mag_kept = kept_after(&layout, &by_norm[..k]);
            let (greedy_obs, _) = errors(&c, &greedy_kept);
            let (mag_obs, mag_plain) = errors(&c, &mag_kept);
            // Against magnitude order without the update, always.
            assert!(
                greedy_obs < mag_plain,
                "seed {seed} k {k}: greedy {greedy_obs} vs magnitude {mag_plain}"
            );
            // Against magnitude order with the same OBS update: the order itself wins.
            total += 1;
            if greedy_obs < mag_obs {
                wins += 1;
            }
        }
    }
    assert_eq!(
        wins, total,
        "greedy order beat magnitude order (both OBS-updated) in {wins}/{total} cases"
    );
}
