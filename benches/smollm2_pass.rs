//! The whole pruning pass on SmolLM2-135M-Instruct with the mistral.rs backend (prefill
//! 1 x 512, CPU): calibration on 16 windows of 512 WikiText-2 valid tokens, database,
//! profiling of every shape (candle), search (plain DP unless `ZIPLM_BENCH_REFINE=N`) and
//! GGUF emit for 1.25x and 1.5x; no verification in mistral.rs (that is evidence, not
//! the pass). Stage times of the last run are printed with the goal: the pass
//! should cost at most 1.5x its own calibration forward pass plus the profiling runs.
//!
//! `python3 scripts/fetch_smollm2.py && ZIPLM_SHARED=../shared cargo bench --features mistralrs --bench smollm2_pass`
//! (skips without the model).

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
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    let valid = shared.join("data/wikitext-2/valid.txt");
    if !model.exists() || !valid.exists() {
        eprintln!(
            "skipped: {} or {} not found (scripts/fetch_smollm2.py, ZIPLM_SHARED)",
            model.display(),
            valid.display()
        );
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let mut job = PruneJob::new(&model);
    job.workload = ziplm_plugin_api::Workload::prefill(1, 512);
    job.budgets = vec![Budget::Speedup(1.25), Budget::Speedup(1.5)];
    job.calibration = Some(CalibrationData::file(
        valid,
        Some(DataFormat::Text),
        16,
        512,
    ));
    job.out_dir = out.path().to_path_buf();
    pass::bench_pass(c, "smollm2_pass", job);
}

criterion_group!(benches, whole_pass);
criterion_main!(benches);
