//! The whole-pass benchmark both real-model benches share: a job without verification
//! (that is evidence, not the pass), plain DP unless `ZIPLM_BENCH_REFINE=N` asks for
//! SPDY with N loss evaluations, 5 timed runs per profiled shape, 10 criterion samples
//! (flat sampling), and the stage times of the last run printed with the issues' goal
//! (1.5 x (calibration + profiling)).

use criterion::{Criterion, SamplingMode};
use std::time::{Duration, Instant};
use ziplm::job::PruneJob;

/// Benchmarks `ziplm::backend::run_job(job)` as criterion group `group`.
pub fn bench_pass(c: &mut Criterion, group: &str, mut job: PruneJob) {
    job.verify = false;
    job.search.refine = std::env::var("ZIPLM_BENCH_REFINE")
        .ok()
        .and_then(|v| v.parse().ok())
        .and_then(|n| ziplm::search::spdy::RefineConfig::with_evaluations(n, 0));
    job.profile = ziplm::profile::ProfileSettings::new(1, 5);
    let mut last = None;
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1));
    g.bench_function("calibrate_database_profile_search_emit", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                last = Some(ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap());
            }
            start.elapsed()
        })
    });
    g.finish();
    if let Some(r) = last {
        eprintln!("stages (last run): {}", r.stages.summary());
    }
}
