//! The distillation loss's two large ops, forward and backward, fused
//! (`backend::mistralrs::train_ops`) against candle's composed ops, on SmolLM2-135M's
//! shapes at 512 tokens:
//!
//! - `kl`: the token-summed KL of the next-token distributions, logits `[512, 49152]`
//!   (candle: `log_softmax`, the teacher's `exp`, product, sum; fused: `kl_rows`).
//! - `attention_softmax`: one layer's causal attention softmax of scaled scores `[1, 9,
//!   512, 512]` (candle: scale, mask and `softmax` composed of max, sub, exp, sum, div;
//!   fused: `masked_softmax`).
//!
//! Each is timed forward plus backward with a weighted sum as the loss. The last line
//! prints the medians of this run and their ratios.
//!
//! `cargo bench --workspace --all-features --bench train_ops --profile dev`

use candle_core::{DType, Device, Tensor, Var, D};
use criterion::{criterion_group, criterion_main, Criterion};
use std::time::{Duration, Instant};
use ziplm::backend::mistralrs::train_ops;

const TOKENS: usize = 512;
const VOCAB: usize = 49152;
const HEADS: usize = 9;

fn randn(shape: &[usize], std: f32) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
}

fn causal_mask() -> Tensor {
    let v: Vec<f32> = (0..TOKENS * TOKENS)
        .map(|i| {
            if i % TOKENS > i / TOKENS {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (TOKENS, TOKENS), &Device::Cpu).unwrap()
}

fn kl_composed(s: &Var, t: &Tensor) {
    let log_t = candle_nn::ops::log_softmax(t, D::Minus1).unwrap();
    let p = log_t.exp().unwrap();
    let log_s = candle_nn::ops::log_softmax(s.as_tensor(), D::Minus1).unwrap();
    let kl = (p * (log_t - log_s).unwrap()).unwrap().sum_all().unwrap();
    std::hint::black_box(kl.backward().unwrap());
}

fn kl_fused(s: &Var, t: &Tensor) {
    let kl = train_ops::kl_rows(s.as_tensor(), t)
        .unwrap()
        .sum_all()
        .unwrap();
    std::hint::black_box(kl.backward().unwrap());
}

const SCALE: f64 = 0.125;

fn softmax_composed(x: &Var, mask: &Tensor, w: &Tensor) {
    let scores = (x.as_tensor() * SCALE)
        .unwrap()
        .broadcast_add(mask)
        .unwrap();
    let y = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
    let loss = (y * w).unwrap().sum_all().unwrap();
    std::hint::black_box(loss.backward().unwrap());
}

fn softmax_fused(x: &Var, mask: &Tensor, w: &Tensor) {
    let y = train_ops::masked_softmax(x.as_tensor(), mask, SCALE).unwrap();
    let loss = (y * w).unwrap().sum_all().unwrap();
    std::hint::black_box(loss.backward().unwrap());
}

fn median_ms(f: &mut dyn FnMut(), n: usize) -> f64 {
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[n / 2]
}

fn train_ops(c: &mut Criterion) {
    let s = Var::from_tensor(&randn(&[TOKENS, VOCAB], 3.0)).unwrap();
    let t = randn(&[TOKENS, VOCAB], 3.0);
    let scores = Var::from_tensor(&randn(&[1, HEADS, TOKENS, TOKENS], 2.0)).unwrap();
    let mask = causal_mask();
    let w = randn(&[1, HEADS, TOKENS, TOKENS], 1.0);
    assert_eq!(s.dtype(), DType::F32);

    let mut g = c.benchmark_group("kl");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("composed", |b| b.iter(|| kl_composed(&s, &t)));
    g.bench_function("fused", |b| b.iter(|| kl_fused(&s, &t)));
    g.finish();
    let mut g = c.benchmark_group("attention_softmax");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("composed", |b| {
        b.iter(|| softmax_composed(&scores, &mask, &w))
    });
    g.bench_function("fused", |b| b.iter(|| softmax_fused(&scores, &mask, &w)));
    g.finish();

    // Interleaved rounds, so the shared machine's drift hits both alike.
    let (mut kc, mut kf, mut sc, mut sf) = (vec![], vec![], vec![], vec![]);
    for _ in 0..5 {
        kc.push(median_ms(&mut || kl_composed(&s, &t), 3));
        kf.push(median_ms(&mut || kl_fused(&s, &t), 3));
        sc.push(median_ms(&mut || softmax_composed(&scores, &mask, &w), 3));
        sf.push(median_ms(&mut || softmax_fused(&scores, &mask, &w), 3));
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (kc, kf, sc, sf) = (med(kc), med(kf), med(sc), med(sf));
    println!(
        "interleaved medians: kl composed {kc:.1} ms, fused {kf:.1} ms ({:.2}x); attention softmax composed {sc:.2} ms, fused {sf:.2} ms ({:.2}x)",
        kc / kf,
        sc / sf
    );
}

criterion_group!(benches, train_ops);
criterion_main!(benches);
