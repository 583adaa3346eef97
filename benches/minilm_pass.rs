//! The whole pruning pass on all-MiniLM-L6-v2 with tract (prefill 1 x 128, one
//! thread): calibration on 512 STS-B train sentences, database, profiling of every
//! shape on the level grid, search and emit for 1.5x and 2.0x (no end-to-end
//! verification: that is evidence, not the pass; plain DP unless
//! `ZIPLM_BENCH_REFINE=N` asks for SPDY with N loss evaluations). Stage times of the last run are
//! printed, with the goal: the pass should cost at most 1.5x its own
//! calibration forward pass plus the profiling runs.
//!
//! `ZIPLM_SHARED=../shared cargo bench --bench minilm_pass` (skips without the model).

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use ziplm::data::{CalibrationData, DataFormat};
use ziplm::job::PruneJob;
use ziplm::search::Budget;

fn pass(c: &mut Criterion) {
    let shared =
        PathBuf::from(std::env::var("ZIPLM_SHARED").unwrap_or_else(|_| "../shared".into()));
    let model = shared.join("models/all-MiniLM-L6-v2-onnx/model.onnx");
    if !model.exists() {
        eprintln!("skipped: {} not found (set ZIPLM_SHARED)", model.display());
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let mut job = PruneJob::new(&model);
    job.budgets = vec![Budget::Speedup(1.5), Budget::Speedup(2.0)];
    job.calibration = Some(CalibrationData {
        path: shared.join("data/stsbenchmark/sts-train.csv"),
        format: Some(DataFormat::StsTsv),
        samples: 512,
        seq_len: 128,
    });
    job.out_dir = out.path().to_path_buf();
    job.verify = false;
    // The pass as the issue states its goal: the plain DP. SPDY refinement (the CLI
    // default) adds its loss evaluations to the search stage; `ZIPLM_BENCH_REFINE=N`
    // measures that variant.
    job.search.refine = std::env::var("ZIPLM_BENCH_REFINE")
        .ok()
        .and_then(|v| v.parse().ok())
        .and_then(|n| ziplm::search::spdy::RefineConfig::with_evaluations(n, 0));
    job.profile = ziplm::profile::ProfileSettings { warmup: 1, runs: 5 };
    let mut last = None;
    let mut group = c.benchmark_group("minilm_pass");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1));
    group.bench_function("calibrate_database_profile_search_emit", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                last = Some(
                    ziplm::backend::tract::driver::run(&job, &ziplm::progress::Quiet)
                        .unwrap()
                        .report,
                );
            }
            start.elapsed()
        })
    });
    group.finish();
    if let Some(r) = last {
        eprintln!("stages (last run): {}", r.stages.summary());
    }
}

criterion_group!(benches, pass);
criterion_main!(benches);
