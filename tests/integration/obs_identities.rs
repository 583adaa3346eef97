//! The three identities of ZIPLM.md section 3, on random problems of several sizes,
//! with single columns, heads, and GQA groupings. They hold exactly (no dampening,
//! `H = 2 X X^T`); we ask for 1e-8 relative in f64.

use super::common::*;
use faer::linalg::solvers::{DenseSolveCore, SolveLstsqCore};
use faer::{Mat, Side};
use ziplm::obs::{materialize, ColumnGreedy, GroupGreedy, PreparedLayer};
use ziplm_plugin_api::{AttentionShape, BlockKind, FfnShape, GqaPolicy, GroupLayout};

const TOL: f64 = 1e-8;

struct Problem {
    w: Mat<f64>,
    x: Mat<f64>,
    layer: PreparedLayer,
}

fn problem(seed: u64, d_out: usize, n: usize, tokens: usize) -> Problem {
    let mut r = rng(seed);
    let w = randn(&mut r, d_out, n);
    let x = correlated_inputs(&mut r, n, tokens);
    let layer = PreparedLayer::new(w.as_ref(), gram2(&x).as_ref(), 0.0).unwrap();
    Problem { w, x, layer }
}

fn removed_columns(layout: &GroupLayout, order: &[usize]) -> Vec<bool> {
    let n = layout.n_columns();
    let mut gone = vec![false; n];
    for &g in order {
        for &c in &layout.groups[g] {
            gone[c] = true;
        }
    }
    gone
}

/// Least squares `min ||W' X_K - W X||` solved independently by QR of `X_K^T`.
fn least_squares_fit(p: &Problem, kept: &[usize]) -> Mat<f64> {
    let tokens = p.x.ncols();
    let xk_t = Mat::from_fn(tokens, kept.len(), |t, a| p.x[(kept[a], t)]);
    let target_t = mul(&p.x.transpose().to_owned(), p.w.transpose()); // (W X)^T, tokens x d_out
    let mut rhs = target_t.clone();
    xk_t.qr()
        .solve_lstsq_in_place_with_conj(faer::Conj::No, rhs.as_mut());
    // First |K| rows hold W'^T.
    Mat::from_fn(p.w.nrows(), kept.len(), |i, a| rhs[(a, i)])
}

fn inverse_of_kept(p: &Problem, kept: &[usize]) -> Mat<f64> {
    let n = p.layer.n_inputs();
    let hkk = Mat::from_fn(kept.len(), kept.len(), |a, b| p.layer.h[(kept[a], kept[b])]);
    let inv = hkk.as_ref().llt(Side::Lower).unwrap().inverse();
    let mut full = Mat::zeros(n, n);
    for (a, &i) in kept.iter().enumerate() {
        for (b, &j) in kept.iter().enumerate() {
            full[(i, j)] = inv[(a, b)];
        }
    }
    full
}

/// Checks the three identities after `steps` greedy removals under `layout`.
fn check_identities(p: &Problem, layout: &GroupLayout, steps: usize) {
    let mut g = GroupGreedy::new(&p.layer, layout).unwrap();
    let mut order = Vec::new();
    let mut rho_sum = 0.0;
    for _ in 0..steps {
        let r = g.step().unwrap().unwrap();
        order.push(r.group);
        rho_sum += r.score;
    }
    let gone = removed_columns(layout, &order);
    let kept: Vec<usize> = (0..gone.len()).filter(|&c| !gone[c]).collect();

    // 1. sum rho / 2 == ||(W_pruned - W) X||^2
    let err = output_error(g.weights(), &p.w, &p.x);
    assert!(
        rel(rho_sum / 2.0, err) < TOL,
        "identity 1: {} vs {err}",
        rho_sum / 2.0
    );

    // 2. kept columns == least-squares fit; removed columns exactly zero
    let fit = least_squares_fit(p, &kept);
    let w_kept = Mat::from_fn(p.w.nrows(), kept.len(), |i, a| g.weights()[(i, kept[a])]);
    assert!(
        rel_diff(&w_kept, &fit) < TOL,
        "identity 2: {}",
        rel_diff(&w_kept, &fit)
    );
    for c in (0..gone.len()).filter(|&c| gone[c]) {
        assert!(g.weights().col(c).iter().all(|&v| v == 0.0));
    }

    // 3. Hinv after downdates == inverse(H_KK) zero-padded
    let expect = inverse_of_kept(p, &kept);
    assert!(
        rel_diff(g.hinv(), &expect) < TOL,
        "identity 3: {}",
        rel_diff(g.hinv(), &expect)
    );

    // The on-demand weights equal the greedy's.
    let m = materialize(&p.layer, &kept).unwrap();
    assert!(
        rel_diff(&m, &w_kept) < TOL,
        "materialize: {}",
        rel_diff(&m, &w_kept)
    );
}

#[test]
fn identities_single_columns_several_sizes() {
    for (seed, d_out, n, tokens, steps) in [
        (1, 7, 12, 60, 9),
        (2, 24, 40, 200, 30),
        (3, 64, 96, 400, 80),
    ] {
        let p = problem(seed, d_out, n, tokens);
        let layout = GroupLayout::for_kind(
            &BlockKind::Ffn(FfnShape {
                width: n,
                gated: false,
            }),
            GqaPolicy::WholeKvGroups,
        );
        check_identities(&p, &layout, steps);
    }
}

#[test]
fn identities_attention_heads() {
    for (seed, heads, head_dim, d_out) in [(4, 4, 8, 32), (5, 6, 5, 20), (6, 12, 4, 48)] {
        let shape = AttentionShape {
            n_heads: heads,
            n_kv_heads: heads,
            head_dim,
        };
        let n = heads * head_dim;
        let p = problem(seed, d_out, n, 4 * n);
        let layout = GroupLayout::for_kind(&BlockKind::Attention(shape), GqaPolicy::WholeKvGroups);
        check_identities(&p, &layout, heads - 1);
    }
}

#[test]
fn identities_gqa_whole_kv_groups() {
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 6,
    };
    let p = problem(7, 30, 54, 300);
    let layout = GroupLayout::for_kind(&BlockKind::Attention(shape), GqaPolicy::WholeKvGroups);
    assert_eq!(layout.groups.len(), 3);
    check_identities(&p, &layout, 2);
}

#[test]
fn identities_gqa_equal_per_group_and_balanced_order() {
    let shape = AttentionShape {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 5,
    };
    let p = problem(8, 16, 40, 200);
    let layout = GroupLayout::for_kind(&BlockKind::Attention(shape), GqaPolicy::EqualPerKvGroup);
    check_identities(&p, &layout, 6);
    // Every complete round removes one head from each KV group.
    let mut g = GroupGreedy::new(&p.layer, &layout).unwrap();
    for _round in 0..3 {
        let a = g.step().unwrap().unwrap().group;
        let b = g.step().unwrap().unwrap().group;
        assert_ne!(
            a / 4,
            b / 4,
            "one round must hit both KV groups: heads {a} and {b}"
        );
    }
}

#[test]
fn lazy_column_path_matches_explicit_path() {
    for (seed, d_out, n, steps, fold) in [
        (9, 16, 50, 45, 7),
        (10, 40, 128, 120, 32),
        (11, 8, 33, 33, 5),
    ] {
        let p = problem(seed, d_out, n, 3 * n);
        let layout = GroupLayout::for_kind(
            &BlockKind::Ffn(FfnShape {
                width: n,
                gated: true,
            }),
            GqaPolicy::WholeKvGroups,
        );
        let mut explicit = GroupGreedy::new(&p.layer, &layout).unwrap();
        let mut lazy = ColumnGreedy::new(&p.layer, fold).unwrap();
        for step in 0..steps {
            let a = explicit.step().unwrap().unwrap();
            let b = lazy.step().unwrap().unwrap();
            assert_eq!(a.group, b.group, "step {step}");
            assert!(
                rel(b.score, a.score) < 1e-7,
                "step {step}: {} vs {}",
                b.score,
                a.score
            );
        }
        assert!(rel_diff(&lazy.weights(), explicit.weights()) < TOL);
        assert!(rel_diff(&lazy.hinv(), explicit.hinv()) < TOL);
        assert!(rel(lazy.delta_sq(), explicit.delta_sq()) < TOL);
    }
}

#[test]
fn recorded_errors_are_exact_with_dampening() {
    // With dampening the scores measure the dampened objective; the checkpoint errors
    // must still be the true normalised output errors on the calibration inputs.
    let mut r = rng(12);
    let (d_out, n, tokens) = (20, 64, 256);
    let w = randn(&mut r, d_out, n);
    let x = correlated_inputs(&mut r, n, tokens);
    let layer = PreparedLayer::new(w.as_ref(), gram2(&x).as_ref(), 0.01).unwrap();
    let layout = GroupLayout::for_kind(
        &BlockKind::Ffn(FfnShape {
            width: n,
            gated: false,
        }),
        GqaPolicy::WholeKvGroups,
    );
    let checkpoints = [0, 10, 32, 50, 60];
    let trace = ziplm::obs::run_greedy(&layer, &layout, 60, &checkpoints).unwrap();
    let dense_out = fro2(&mul(&w, x.as_ref()));
    for c in &trace.checkpoints {
        let gone = removed_columns(&layout, &trace.order[..c.removed]);
        let kept: Vec<usize> = (0..n).filter(|&j| !gone[j]).collect();
        let wk = materialize(&layer, &kept).unwrap();
        let mut full = Mat::zeros(d_out, n);
        for (a, &j) in kept.iter().enumerate() {
            full.col_mut(j).copy_from(wk.col(a));
        }
        let direct = output_error(&full, &w, &x) / dense_out;
        assert!(
            (c.error - direct).abs() < 1e-9 * direct.max(1.0),
            "after {}: {} vs {direct}",
            c.removed,
            c.error
        );
    }
    assert_eq!(trace.checkpoints.len(), checkpoints.len());
    assert_eq!(trace.checkpoints[0].error, 0.0);
}

#[test]
fn dead_inputs_are_removed_first_at_no_cost() {
    let mut r = rng(13);
    let (d_out, n, tokens) = (6, 10, 50);
    let w = randn(&mut r, d_out, n);
    let mut x = correlated_inputs(&mut r, n, tokens);
    for t in 0..tokens {
        x[(3, t)] = 0.0;
        x[(7, t)] = 0.0;
    }
    let layer = PreparedLayer::new(w.as_ref(), gram2(&x).as_ref(), 0.01).unwrap();
    assert_eq!(layer.dead.iter().filter(|&&d| d).count(), 2);
    let layout = GroupLayout::for_kind(
        &BlockKind::Ffn(FfnShape {
            width: n,
            gated: false,
        }),
        GqaPolicy::WholeKvGroups,
    );
    let trace = ziplm::obs::run_greedy(&layer, &layout, 2, &[2]).unwrap();
    let mut first: Vec<usize> = trace.order.clone();
    first.sort();
    assert_eq!(first, vec![3, 7]);
    assert_eq!(trace.scores, vec![0.0, 0.0]);
    assert_eq!(trace.error_at(2), Some(0.0));
}
