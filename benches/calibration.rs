//! Calibration throughput against this machine's matrix-multiply throughput (issue 15
//! item 1; goal: calibration at least 0.5 of GEMM).
//!
//! - `gemm_f32`: candle's f32 matmul on SmolLM2-135M's FFN shapes (512 tokens x 576 ->
//!   1536 and 1536 -> 576, weights `[out, in]` as the forward multiplies them), both
//!   vCPUs: the machine's attainable rate for this work.
//! - `calibrate`: ziplm's calibration of SmolLM2-135M-Instruct on 4 windows of 512
//!   tokens, capturing every out-projection input into the engine's Gram
//!   accumulators, exactly as the database stage does. Its FLOPs are the forward
//!   without the output head ([`LlamaWeights::forward_flops`]) plus the Gram updates
//!   ([`LlamaWeights::gram_flops`]).
//!
//! Criterion reports both as elements (FLOPs) per second; the last line prints the two
//! medians of this run and their ratio.
//!
//! `python3 scripts/fetch_smollm2.py && cargo bench --features mistralrs --bench calibration`
//! (the calibration half skips without the model).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use ziplm::backend::mistralrs::{LlamaModel, LlamaOptions};
use ziplm::obs::GramAccumulator;
use ziplm_plugin_api::{AdapterError, BlockId, ModelAdapter};

const TOKENS: usize = 512;

fn ffn_pair() -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (TOKENS, 576), &dev).unwrap();
    let up = Tensor::randn(0f32, 0.05, (1536, 576), &dev).unwrap();
    let down = Tensor::randn(0f32, 0.05, (576, 1536), &dev).unwrap();
    (x, up, down)
}

/// One up and one down projection: `2 * 2 * 512 * 576 * 1536` FLOPs.
fn gemm_once(x: &Tensor, up: &Tensor, down: &Tensor) {
    let h = x.matmul(&up.t().unwrap()).unwrap();
    let y = h.matmul(&down.t().unwrap()).unwrap();
    std::hint::black_box(y);
}

const GEMM_FLOPS: u64 = 2 * 2 * (TOKENS as u64) * 576 * 1536;

fn calibrate_once(model: &mut LlamaModel) {
    let blocks: Vec<BlockId> = model.structure().blocks.iter().map(|b| b.id).collect();
    let mut grams: Vec<GramAccumulator> = model
        .structure()
        .blocks
        .iter()
        .map(|b| GramAccumulator::new(b.kind.out_proj_inputs()))
        .collect();
    let mut sink = |id: BlockId, rows: &[f32], _w: usize| -> Result<(), AdapterError> {
        grams[id.index()]
            .add(rows)
            .map_err(|e| AdapterError::Calibration(e.to_string()))
    };
    model.calibrate(&blocks, &mut sink).unwrap();
    std::hint::black_box(grams);
}

fn median_rate(mut f: impl FnMut(), flops: u64, runs: usize) -> f64 {
    let mut rates: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            flops as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[runs / 2]
}

fn throughput(c: &mut Criterion) {
    let (x, up, down) = ffn_pair();
    let mut g = c.benchmark_group("calibration");
    g.throughput(Throughput::Elements(GEMM_FLOPS));
    g.bench_function("gemm_f32", |b| b.iter(|| gemm_once(&x, &up, &down)));

    let model_path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model_path.exists() {
        eprintln!(
            "skipped calibrate: {} not found (scripts/fetch_smollm2.py)",
            model_path.display()
        );
        g.finish();
        return;
    }
    let mut model = LlamaModel::load(&model_path, LlamaOptions::default()).unwrap();
    // Token ids do not change the work; a fixed pseudo-random sequence per window.
    let vocab = model.weights.config.vocab as i64;
    let samples: Vec<Vec<i64>> = (0..4)
        .map(|s| {
            (0..TOKENS as i64)
                .map(|i| (i * 7919 + s * 104_729) % vocab)
                .collect()
        })
        .collect();
    model.set_calibration(samples).unwrap();
    let tokens = 4 * TOKENS;
    let flops = 4 * (model.weights.forward_flops(TOKENS) + model.weights.gram_flops(TOKENS));
    g.throughput(Throughput::Elements(flops))
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    g.bench_function("calibrate_smollm2_4x512", |b| {
        b.iter(|| calibrate_once(&mut model))
    });
    g.finish();

    // Where the time goes: the forward alone (no Gram updates), and the Gram updates
    // alone on activations of the same widths.
    let forward = 4 * model.weights.forward_flops(TOKENS);
    let blocks: Vec<BlockId> = model.structure().blocks.iter().map(|b| b.id).collect();
    let forward_only = |m: &mut LlamaModel| {
        let mut sink = |_: BlockId, _: &[f32], _: usize| -> Result<(), AdapterError> { Ok(()) };
        m.calibrate(&blocks, &mut sink).unwrap();
    };
    let widths: Vec<usize> = model
        .structure()
        .blocks
        .iter()
        .map(|b| b.kind.out_proj_inputs())
        .collect();
    let rows: Vec<Vec<f32>> = widths
        .iter()
        .map(|&w| {
            (0..w * TOKENS)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
                .collect()
        })
        .collect();
    let grams_only = || {
        let mut accs: Vec<GramAccumulator> =
            widths.iter().map(|&w| GramAccumulator::new(w)).collect();
        for _ in 0..4 {
            for (acc, r) in accs.iter_mut().zip(&rows) {
                acc.add(r).unwrap();
            }
        }
        std::hint::black_box(accs);
    };
    // Interleaved, so drift of the machine's clock hits every rate alike.
    let mut rates: Vec<[f64; 4]> = vec![];
    for _ in 0..5 {
        rates.push([
            median_rate(|| gemm_once(&x, &up, &down), GEMM_FLOPS, 9),
            median_rate(|| calibrate_once(&mut model), flops, 1),
            median_rate(|| forward_only(&mut model), forward, 1),
            median_rate(grams_only, flops - forward, 1),
        ]);
    }
    let med = |k: usize| {
        let mut v: Vec<f64> = rates.iter().map(|r| r[k]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (gemm, cal, fwd, gram) = (med(0), med(1), med(2), med(3));
    eprintln!(
        "medians of this run (5 interleaved rounds): f32 GEMM {:.1} GFLOP/s; calibration {:.1} GFLOP/s ({:.0} tokens/s; forward {:.0}%, Gram {:.0}% of its FLOPs); ratio {:.2} (goal >= 0.5); forward alone {:.1} GFLOP/s, Gram updates alone {:.1} GFLOP/s",
        gemm / 1e9,
        cal / 1e9,
        cal / flops as f64 * tokens as f64,
        100.0 * forward as f64 / flops as f64,
        100.0 * (flops - forward) as f64 / flops as f64,
        cal / gemm,
        fwd / 1e9,
        gram / 1e9,
    );
}

criterion_group!(benches, throughput);
criterion_main!(benches);
