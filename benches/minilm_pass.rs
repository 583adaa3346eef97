//! The whole pruning pass on all-MiniLM-L6-v2 with tract (prefill 1 x 128, one
//! thread): calibration on 512 STS-B train sentences, database, profiling of every
//! shape on the level grid, search and emit for 1.5x and 2.0x (no end-to-end
//! verification: that is evidence, not the pass; plain DP unless
//! `ZIPLM_BENCH_REFINE=N` asks for SPDY with N loss evaluations). Stage times of the last run are
//! printed, with the goal: the pass should cost at most 1.5x its own
//! calibration forward pass plus the profiling runs.
//!
//! `ZIPLM_SHARED=../shared cargo bench --bench minilm_pass` (skips without the model).

#[path = "common/pass.rs"]
mod pass;

use criterion::{criterion_group, criterion_main, Criterion};
use std::path::PathBuf;
use ziplm::data::{CalibrationData, DataFormat};
use ziplm::job::PruneJob;
use ziplm::search::Budget;

fn whole_pass(c: &mut Criterion) {
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
    job.calibration = Some(CalibrationData::file(
        shared.join("data/stsbenchmark/sts-train.csv"),
        Some(DataFormat::StsTsv),
        512,
        128,
    ));
    job.out_dir = out.path().to_path_buf();
    pass::bench_pass(c, "minilm_pass", job);
}

criterion_group!(benches, whole_pass);
criterion_main!(benches);
