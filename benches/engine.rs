//! Benchmarks of the engine's own work (no runtime involved).
//!
//! - `obs_ffn_576x1536_to_90pct`: greedy OBS of a SmolLM2-135M `down_proj`-shaped
//!   layer (576 outputs, 1536 inputs), removing 90% of the neurons one at a time and
//!   recording the exact error at every level of the 32-wide grid. Includes preparing
//!   `H` (dampening, inverse by Cholesky, output energy).
//! - `obs_heads_576x576_9x64`: the attention out-projection of the same model, 9
//!   heads of 64, removed head by head to the end.
//! - `dp_60x50x10000`: the budgeted DP for 60 blocks of 50 levels each and 10,000
//!   buckets (a 30-layer model with attention and FFN blocks).
//!
//! Goals (issue 2, on one core): the FFN pass under 1 s, the DP under 50 ms. Run with
//! `cargo bench --bench engine`; results are in `benches/README.md`.

use criterion::{criterion_group, criterion_main, Criterion};
use faer::{Accum, Mat, Par};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;
use ziplm::obs::{run_greedy, PreparedLayer, DEFAULT_DAMPENING};
use ziplm::search::dp::{self, DpOption};
use ziplm_plugin_api::{AttentionShape, BlockKind, FfnShape, GqaPolicy, GroupLayout};

fn normal(r: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = r.random::<f64>().max(1e-300);
    let u2: f64 = r.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A layer with correlated inputs: `X = M Z + noise` over `tokens` tokens.
fn layer(d_out: usize, n: usize, tokens: usize, seed: u64) -> (Mat<f64>, Mat<f64>) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let w = Mat::from_fn(d_out, n, |_, _| normal(&mut r) * 0.02);
    let k = n / 2;
    let mix = Mat::from_fn(n, k, |_, j| normal(&mut r) / (1.0 + j as f64).sqrt());
    let z = Mat::from_fn(k, tokens, |_, _| normal(&mut r));
    let mut x = Mat::<f64>::zeros(n, tokens);
    faer::linalg::matmul::matmul(
        x.as_mut(),
        Accum::Replace,
        mix.as_ref(),
        z.as_ref(),
        1.0,
        Par::Seq,
    );
    for j in 0..tokens {
        for i in 0..n {
            x[(i, j)] += 0.05 * normal(&mut r);
        }
    }
    let mut h = Mat::<f64>::zeros(n, n);
    faer::linalg::matmul::matmul(
        h.as_mut(),
        Accum::Replace,
        x.as_ref(),
        x.transpose(),
        2.0 / tokens as f64,
        Par::Seq,
    );
    (w, h)
}

fn obs_ffn(c: &mut Criterion) {
    let (w, h) = layer(576, 1536, 4096, 1);
    let layout = GroupLayout::for_kind(
        &BlockKind::Ffn(FfnShape {
            width: 1536,
            gated: true,
        }),
        GqaPolicy::WholeKvGroups,
    );
    let max_removed = 1536 * 9 / 10;
    let checkpoints: Vec<usize> = (0..=max_removed).step_by(32).collect();
    c.bench_function("obs_ffn_576x1536_to_90pct", |b| {
        b.iter(|| {
            let prepared = PreparedLayer::new(w.as_ref(), h.as_ref(), DEFAULT_DAMPENING).unwrap();
            black_box(run_greedy(&prepared, &layout, max_removed, &checkpoints).unwrap())
        })
    });
}

fn obs_heads(c: &mut Criterion) {
    let (w, h) = layer(576, 576, 4096, 2);
    let layout = GroupLayout::for_kind(
        &BlockKind::Attention(AttentionShape {
            n_heads: 9,
            n_kv_heads: 9,
            head_dim: 64,
        }),
        GqaPolicy::WholeKvGroups,
    );
    let checkpoints: Vec<usize> = (0..=8).collect();
    c.bench_function("obs_heads_576x576_9x64", |b| {
        b.iter(|| {
            let prepared = PreparedLayer::new(w.as_ref(), h.as_ref(), DEFAULT_DAMPENING).unwrap();
            black_box(run_greedy(&prepared, &layout, 8, &checkpoints).unwrap())
        })
    });
}

fn dp_bench(c: &mut Criterion) {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let stages: Vec<Vec<DpOption>> = (0..60)
        .map(|_| {
            let mut e = 0.0;
            (0..50)
                .map(|s| {
                    e += r.random::<f64>() * 0.02;
                    DpOption {
                        time: 1.0 - s as f64 / 50.0 + r.random::<f64>() * 0.01,
                        cost: e,
                    }
                })
                .collect()
        })
        .collect();
    let dense: f64 = stages.iter().map(|s| s[0].time).sum();
    c.bench_function("dp_60x50x10000", |b| {
        b.iter(|| black_box(dp::solve(&stages, dense / 2.0, 10_000).unwrap()))
    });
}

criterion_group! {
    name = obs;
    config = Criterion::default().sample_size(10);
    targets = obs_ffn, obs_heads
}
criterion_group! {
    name = search;
    config = Criterion::default().sample_size(20);
    targets = dp_bench
}
criterion_main!(obs, search);
