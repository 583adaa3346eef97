//! Driving a [`LatencyProfiler`]: warm-up, repeated runs, medians, and the persisted
//! latency table (ZIPLM.md section 5).

use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::Progress;
use std::path::Path;
use ziplm_plugin_api::{
    BlockShape, LatencyProfiler, LatencyTable, LatencyTableKey, Measured, PairedTiming, TimedRun,
    Timing, Workload, FORMAT_VERSION,
};

/// How many times to run what is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProfileSettings {
    /// Untimed runs first (caches, lazy initialisation, CPU frequency).
    pub warmup: usize,
    /// Timed runs; the median is kept.
    pub runs: usize,
    /// Passes a table's profiling makes over its shapes (see [`build_table`]); each
    /// shape's timed runs are split across them. 1 = every shape once, all its runs in
    /// a row.
    #[serde(default = "one_pass")]
    pub passes: usize,
}

fn one_pass() -> usize {
    1
}

impl ProfileSettings {
    /// `warmup` untimed and `runs` timed runs, in one pass.
    pub fn new(warmup: usize, runs: usize) -> ProfileSettings {
        ProfileSettings {
            warmup,
            runs,
            passes: 1,
        }
    }

    /// The same settings in `passes` passes.
    pub fn in_passes(self, passes: usize) -> ProfileSettings {
        ProfileSettings { passes, ..self }
    }
}

impl Default for ProfileSettings {
    fn default() -> Self {
        ProfileSettings::new(3, 15)
    }
}

/// Runs `run` `warmup` times untimed, then `runs` times, and returns the median, min
/// and max.
pub fn measure(run: &mut dyn TimedRun, settings: &ProfileSettings) -> Result<Timing> {
    Ok(timing_of(&mut run_times(run, settings)?))
}

/// Runs `run` `warmup` times untimed, then returns the wall times (ms) of `runs` runs.
fn run_times(run: &mut dyn TimedRun, settings: &ProfileSettings) -> Result<Vec<f64>> {
    if settings.runs == 0 {
        return Err(Error::Invalid(
            "profiling needs at least one timed run".into(),
        ));
    }
    for _ in 0..settings.warmup {
        run.run()?;
    }
    Ok((0..settings.runs)
        .map(|_| run.run().map(|d| d.as_secs_f64() * 1e3))
        .collect::<std::result::Result<_, _>>()?)
}

/// Passes the mistral.rs backend's profiling makes by default. A shape's timed runs are
/// split across the passes (each prepares the shape afresh and warms it up again), so
/// a slow spell of the machine, or one unlucky allocation, hits a few runs of every
/// shape instead of all runs of a few: the table's differences between shapes, which
/// the search trades on, are what drift corrupted most. (tract's backend keeps one
/// pass: preparing a tract block model costs more than timing it, and doubled
/// all-MiniLM-L6-v2's profile, 57 s to 109 s.)
pub const LLM_PROFILE_PASSES: usize = 3;

/// Timed runs of pass `pass` of `passes` when `runs` are split as evenly as possible
/// (the first passes take the remainder).
fn runs_in_pass(runs: usize, passes: usize, pass: usize) -> usize {
    runs / passes + usize::from(pass < runs % passes)
}

/// Times two runnables alternately (warm-up rounds first, then `runs` timed rounds, a
/// then b each round, so slow drifts of the machine hit both); each closure returns the
/// wall time of one run. Returns the timings of a (the dense model) and b (the model
/// timed against it), and b's speedup as the median of the rounds' ratios.
pub fn time_alternating<E>(
    settings: &ProfileSettings,
    mut a: impl FnMut() -> std::result::Result<std::time::Duration, E>,
    mut b: impl FnMut() -> std::result::Result<std::time::Duration, E>,
) -> std::result::Result<PairedTiming, E> {
    for _ in 0..settings.warmup {
        a()?;
        b()?;
    }
    let (mut ta, mut tb) = (vec![], vec![]);
    for _ in 0..settings.runs.max(1) {
        ta.push(a()?.as_secs_f64() * 1e3);
        tb.push(b()?.as_secs_f64() * 1e3);
    }
    Ok(paired_timing(ta, tb))
}

/// The paired timing of rounds whose `i`-th runs are `dense_ms[i]` and `model_ms[i]`.
pub fn paired_timing(mut dense_ms: Vec<f64>, mut model_ms: Vec<f64>) -> PairedTiming {
    let rounds: Vec<(f64, f64)> = dense_ms
        .iter()
        .copied()
        .zip(model_ms.iter().copied())
        .collect();
    PairedTiming {
        speedup: median_of(&mut round_ratios(&rounds)),
        dense: timing_of(&mut dense_ms),
        model: timing_of(&mut model_ms),
        rounds,
    }
}

/// Each round's dense time over its model time.
fn round_ratios(rounds: &[(f64, f64)]) -> Vec<f64> {
    rounds
        .iter()
        .map(|(d, m)| d / m.max(f64::MIN_POSITIVE))
        .collect()
}

/// Two paired timings of the same two models as one: their rounds pooled.
pub fn pooled(a: &PairedTiming, b: &PairedTiming) -> PairedTiming {
    let (dense, model) = a.rounds.iter().chain(&b.rounds).copied().unzip();
    paired_timing(dense, model)
}

/// A distribution-free interval of about 95% for the median of `xs`: the order
/// statistics `k` and `n + 1 - k` with `k = n/2 - 0.98 sqrt(n)` (binomial ranks in the
/// normal approximation), the extremes at least; `None` for no samples.
pub fn median_interval(xs: &[f64]) -> Option<(f64, f64)> {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return None;
    }
    let k = ((n as f64 / 2.0 - 0.98 * (n as f64).sqrt()).round() as usize).clamp(1, n.div_ceil(2));
    Some((xs[k - 1], xs[n - k]))
}

/// The interval of [`median_interval`] for a paired timing's speedup (the rounds'
/// ratios); `None` when its rounds were not kept.
pub fn speedup_interval(t: &PairedTiming) -> Option<(f64, f64)> {
    median_interval(&round_ratios(&t.rounds))
}

/// The interval of [`median_interval`] for the model's median milliseconds; `None`
/// when the rounds were not kept.
pub fn model_ms_interval(t: &PairedTiming) -> Option<(f64, f64)> {
    median_interval(&t.rounds.iter().map(|r| r.1).collect::<Vec<_>>())
}

/// The median of samples (sorts them); 0 for none.
fn median_of(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => xs[n / 2],
        _ => 0.5 * (xs[n / 2 - 1] + xs[n / 2]),
    }
}

/// Median, min and max of samples in milliseconds (sorts them).
pub fn timing_of(ms: &mut [f64]) -> Timing {
    if ms.is_empty() {
        return Timing::ZERO;
    }
    let median_ms = median_of(ms);
    Timing {
        median_ms,
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        runs: ms.len(),
    }
}

/// The key a table measured by `profiler` at `workload` would have.
pub fn table_key(profiler: &dyn LatencyProfiler, workload: &Workload) -> LatencyTableKey {
    LatencyTableKey {
        target: profiler.target(),
        workload: *workload,
        model: profiler.model_key(),
    }
}

/// Measures every shape in `shapes` (and the non-prunable rest) not already in
/// `reuse`. Entries of `reuse` are kept only when its key matches this profiler and
/// workload exactly.
pub fn build_table(
    profiler: &mut dyn LatencyProfiler,
    workload: &Workload,
    shapes: &[BlockShape],
    settings: &ProfileSettings,
    reuse: Option<&LatencyTable>,
    progress: &dyn Progress,
) -> Result<LatencyTable> {
    workload.validate().map_err(Error::Invalid)?;
    let key = table_key(profiler, workload);
    let reuse = reuse.filter(|t| t.key == key && t.format_version == FORMAT_VERSION);
    let mut todo: Vec<BlockShape> = shapes.to_vec();
    todo.sort();
    todo.dedup();
    todo.retain(|s| reuse.is_none_or(|t| t.get(s).is_none()));
    let mut table = match reuse {
        Some(t) => t.clone(),
        None => LatencyTable {
            format_version: FORMAT_VERSION,
            key,
            rest: Timing::ZERO,
            entries: Vec::new(),
        },
    };
    let need_rest = reuse.is_none();
    let mut what: Vec<Measured> = todo.iter().map(|&s| Measured::Block(s)).collect();
    if need_rest {
        what.insert(0, Measured::Rest);
    }
    if what.is_empty() {
        return Ok(table);
    }
    let passes = settings.passes.clamp(1, settings.runs.max(1));
    progress.start("profiling", (passes * what.len()) as u64);
    let mut samples: Vec<Vec<f64>> = vec![vec![]; what.len()];
    for pass in 0..passes {
        let pass_settings =
            ProfileSettings::new(settings.warmup, runs_in_pass(settings.runs, passes, pass));
        for (w, ms) in what.iter().zip(&mut samples) {
            let mut run = profiler.prepare(w, workload)?;
            ms.extend(run_times(run.as_mut(), &pass_settings)?);
            drop(run);
            progress.advance(1);
        }
    }
    for (w, mut ms) in what.into_iter().zip(samples) {
        let timing = timing_of(&mut ms);
        match w {
            Measured::Block(shape) => table.insert(shape, timing),
            _ => table.rest = timing,
        }
    }
    progress.finish();
    Ok(table)
}

/// Reads a latency table, checking its format version.
pub fn load_table(path: &Path) -> Result<LatencyTable> {
    let table: LatencyTable = fsutil::read_json(path)?;
    if table.format_version != FORMAT_VERSION {
        return Err(Error::Format {
            path: path.to_path_buf(),
            detail: format!(
                "latency table format {} is not the supported format {FORMAT_VERSION}; profile again with `ziplm profile`",
                table.format_version
            ),
        });
    }
    // A bad time is named with the file and the shape here, not later in the search.
    let bad_time = |what: String, t: &Timing| {
        let ok = [t.median_ms, t.min_ms, t.max_ms]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0);
        (!ok).then(|| Error::Format {
            path: path.to_path_buf(),
            detail: format!(
                "{what}: times must be finite and non-negative milliseconds, got median {} (min {}, max {}); profile again with `ziplm profile`",
                t.median_ms, t.min_ms, t.max_ms
            ),
        })
    };
    if let Some(e) = bad_time("rest".into(), &table.rest) {
        return Err(e);
    }
    for entry in &table.entries {
        if let Some(e) = bad_time(format!("entry {:?}", entry.shape), &entry.timing) {
            return Err(e);
        }
    }
    Ok(table)
}

/// Writes a latency table atomically as pretty JSON (creating its folder).
pub fn save_table(table: &LatencyTable, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    fsutil::write_json_atomic(path, table)
}

/// Refuses a table measured with another runtime than `target`'s: a CPU table cannot
/// stand for a GPU target, nor the other way round.
pub fn check_same_runtime(
    path: &Path,
    table: &LatencyTable,
    target: &ziplm_plugin_api::TargetFingerprint,
) -> Result<()> {
    if table.key.target.runtime == target.runtime {
        return Ok(());
    }
    Err(Error::Format {
        path: path.into(),
        detail: format!(
            "the latency table was measured with {} ({}), and this job targets {} ({}); profile for this target (`ziplm profile` with the job's --threads or --cuda), or give the job the target the table was made for",
            table.key.target.runtime, table.key.target, target.runtime, target
        ),
    })
}

/// The latency table a job uses, and whether its models can be verified here.
pub struct AcquiredTable {
    /// The table.
    pub table: LatencyTable,
    /// False when the table was measured on another target (its timings define the
    /// target, so this machine's measurements would not say whether budgets are met).
    pub verify_here: bool,
    /// Lines for the report.
    pub notes: Vec<String>,
}

/// Where a run's latency table comes from and how it is profiled.
#[derive(Clone, Copy, Debug)]
pub struct TableRequest<'a> {
    /// The workload timed.
    pub workload: &'a Workload,
    /// Warm-up, runs and passes per shape.
    pub settings: &'a ProfileSettings,
    /// A table file to reuse and update (profiled and written when absent).
    pub path: Option<&'a Path>,
    /// Whether the run means to verify (a note says when a foreign table prevents it).
    pub verify: bool,
}

/// The committed table at `request.path`, checked against this job: its format, its
/// workload and model (the adapter's [`LatencyProfiler::model_key`]: what no pruning
/// changes, so a table serves a model and every model pruned from it) and its runtime.
/// `None` when there is no table there yet. The pipeline calls this when the job opens,
/// so a table that cannot serve fails before calibration, not after it.
pub fn committed_table(
    request: &TableRequest,
    profiler: &dyn LatencyProfiler,
) -> Result<Option<LatencyTable>> {
    let Some(path) = request.path.filter(|p| p.exists()) else {
        return Ok(None);
    };
    let key = table_key(profiler, request.workload);
    let committed = load_table(path)?;
    if committed.key.workload != key.workload || committed.key.model != key.model {
        return Err(Error::Format {
            path: path.into(),
            detail: format!(
                "the latency table is for {} / {}, this job is {} / {}; profile again with `ziplm profile`",
                committed.key.workload, committed.key.model, key.workload, key.model
            ),
        });
    }
    check_same_runtime(path, &committed, &key.target)?;
    Ok(Some(committed))
}

/// Profiles `shapes`, or reuses the committed latency table at `request.path`: a table
/// from this target is completed (and rewritten only if it changed), a table from
/// another machine of the same runtime is used as is (it must hold every shape); a
/// table of another runtime (a CPU table for a GPU target) is refused.
pub fn acquire_table(
    request: &TableRequest,
    profiler: &mut dyn LatencyProfiler,
    shapes: &[BlockShape],
    progress: &dyn Progress,
) -> Result<AcquiredTable> {
    let workload = request.workload;
    let key = table_key(profiler, workload);
    let (Some(path), Some(committed)) = (request.path, committed_table(request, profiler)?) else {
        let t = build_table(profiler, workload, shapes, request.settings, None, progress)?;
        if let Some(p) = request.path {
            save_table(&t, p)?;
        }
        return Ok(AcquiredTable {
            table: t,
            verify_here: true,
            notes: vec![],
        });
    };
    if committed.key.target == key.target {
        let t = build_table(
            profiler,
            workload,
            shapes,
            request.settings,
            Some(&committed),
            progress,
        )?;
        if t != committed {
            save_table(&t, path)?;
        }
        return Ok(AcquiredTable {
            table: t,
            verify_here: true,
            notes: vec![],
        });
    }
    // A table measured on the deployment machine: it defines the target.
    if let Some(missing) = shapes.iter().find(|s| committed.get(s).is_none()) {
        return Err(Error::Format {
            path: path.into(),
            detail: format!(
                "the latency table (measured on {}) has no timing for {missing:?}; run `ziplm profile` on that machine with the same --ffn-multiple",
                committed.key.target
            ),
        });
    }
    let mut notes = vec![];
    if request.verify {
        notes.push(format!(
            "not verified: latencies come from {} (measured on {}); this machine is {}",
            path.display(),
            committed.key.target,
            key.target
        ));
    }
    Ok(AcquiredTable {
        table: committed,
        verify_here: false,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use ziplm_plugin_api::{AdapterResult, TargetFingerprint};

    struct Fake {
        calls: Vec<Measured>,
    }
    struct FakeRun(f64);
    impl TimedRun for FakeRun {
        fn run(&mut self) -> AdapterResult<Duration> {
            Ok(Duration::from_secs_f64(self.0 / 1e3))
        }
    }
    impl LatencyProfiler for Fake {
        fn target(&self) -> TargetFingerprint {
            TargetFingerprint {
                runtime: "fake".into(),
                runtime_version: "1".into(),
                device: "test".into(),
                threads: 1,
                dtype: "f32".into(),
            }
        }
        fn model_key(&self) -> String {
            "fake-model".into()
        }
        fn prepare<'a>(
            &'a mut self,
            what: &Measured,
            _: &Workload,
        ) -> AdapterResult<Box<dyn TimedRun + 'a>> {
            self.calls.push(what.clone());
            let ms = match what {
                Measured::Rest | Measured::Model(_) => 1.0,
                Measured::Block(BlockShape::Ffn { width, .. }) => *width as f64 / 100.0,
                Measured::Block(BlockShape::Attention { heads, .. }) => *heads as f64 / 10.0,
            };
            Ok(Box::new(FakeRun(ms)))
        }
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(timing_of(&mut [3.0, 1.0, 2.0]).median_ms, 2.0);
        let t = timing_of(&mut [4.0, 1.0, 2.0, 3.0]);
        assert_eq!(
            (t.median_ms, t.min_ms, t.max_ms, t.runs),
            (2.5, 1.0, 4.0, 4)
        );
    }

    #[test]
    fn a_paired_speedup_is_the_median_of_the_rounds_ratios() {
        // The model runs at 2/3 of the dense model's time in every round, but the
        // machine slows down by 1.5x for the last five rounds of the dense model and
        // the last six of the model (a slow spell that began between the two runs of
        // round 5). The ratio of medians reads 1.0x; the median of the rounds' ratios
        // 1.5x.
        let slow = |i: usize, from: usize| if i >= from { 1.5 } else { 1.0 };
        let dense: Vec<f64> = (0..11).map(|i| 3.0 * slow(i, 6)).collect();
        let model: Vec<f64> = (0..11).map(|i| 2.0 * slow(i, 5)).collect();
        let t = paired_timing(dense, model);
        assert_eq!((t.dense.median_ms, t.model.median_ms), (3.0, 3.0));
        assert_eq!(t.speedup, 1.5);
        assert_eq!((t.dense.runs, t.model.runs), (11, 11));
        // An even number of rounds averages the two middle ratios.
        let t = paired_timing(vec![2.0, 3.0, 4.0, 6.0], vec![2.0, 2.0, 2.0, 2.0]);
        assert_eq!(t.speedup, 1.75);
    }

    #[test]
    fn the_median_interval_narrows_with_more_rounds_and_pools_keep_every_round() {
        // 15 samples: the 4th and 12th smallest (binomial coverage 96.5%).
        let xs: Vec<f64> = (1..=15).map(f64::from).collect();
        assert_eq!(median_interval(&xs), Some((4.0, 12.0)));
        assert_eq!(median_interval(&[2.0]), Some((2.0, 2.0)));
        assert_eq!(median_interval(&[]), None);
        // The same spread three times over: the 16th and 30th of 45.
        let xs3: Vec<f64> = xs.iter().chain(&xs).chain(&xs).copied().collect();
        assert_eq!(median_interval(&xs3), Some((6.0, 10.0)));

        let a = paired_timing(vec![3.0, 4.0], vec![2.0, 2.0]);
        let b = paired_timing(vec![6.0], vec![2.0]);
        let p = pooled(&a, &b);
        assert_eq!(p.rounds, vec![(3.0, 2.0), (4.0, 2.0), (6.0, 2.0)]);
        assert_eq!((p.speedup, p.dense.runs, p.dense.median_ms), (2.0, 3, 4.0));
        assert_eq!(speedup_interval(&p), Some((1.5, 3.0)));
        assert_eq!(model_ms_interval(&p), Some((2.0, 2.0)));
    }

    #[test]
    fn table_reuses_matching_entries_and_round_trips() {
        let w = Workload::prefill(1, 128);
        let shapes = [
            BlockShape::Ffn {
                hidden: 64,
                width: 128,
                gated: false,
            },
            BlockShape::Ffn {
                hidden: 64,
                width: 96,
                gated: false,
            },
        ];
        let mut p = Fake { calls: vec![] };
        let q = crate::progress::Quiet;
        let t1 = build_table(
            &mut p,
            &w,
            &shapes,
            &ProfileSettings::new(1, 3).in_passes(3),
            None,
            &q,
        )
        .unwrap();
        // Rest and two shapes, once a pass, one timed run each pass.
        assert_eq!(p.calls.len(), 3 * 3);
        assert!((t1.get(&shapes[0]).unwrap().median_ms - 1.28).abs() < 1e-6);
        assert_eq!(t1.get(&shapes[0]).unwrap().runs, 3);
        let more = [
            shapes[0],
            BlockShape::Attention {
                hidden: 64,
                heads: 2,
                kv_heads: 2,
                head_dim: 16,
            },
        ];
        let mut p2 = Fake { calls: vec![] };
        let t2 = build_table(
            &mut p2,
            &w,
            &more,
            &ProfileSettings::default(),
            Some(&t1),
            &q,
        )
        .unwrap();
        assert_eq!(p2.calls.len(), 1, "only the new shape is measured");
        assert_eq!(t2.entries.len(), 3);
        // Another workload does not reuse anything.
        let mut p3 = Fake { calls: vec![] };
        build_table(
            &mut p3,
            &Workload::prefill(1, 64),
            &more,
            &ProfileSettings::default(),
            Some(&t1),
            &q,
        )
        .unwrap();
        assert_eq!(p3.calls.len(), 3);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.json");
        save_table(&t2, &path).unwrap();
        assert_eq!(load_table(&path).unwrap(), t2);
    }

    #[test]
    fn the_runs_split_evenly_across_the_passes_and_all_count() {
        for runs in 1..20 {
            let passes = LLM_PROFILE_PASSES.min(runs);
            let split: Vec<usize> = (0..passes).map(|p| runs_in_pass(runs, passes, p)).collect();
            assert_eq!(split.iter().sum::<usize>(), runs);
            assert!(split.iter().max().unwrap() - split.iter().min().unwrap() <= 1);
            assert!(split.iter().all(|&r| r > 0), "{runs}: {split:?}");
        }
        // Every pass's samples reach the table: 9 runs, 3 passes, 3 + 3 + 3.
        let mut p = Fake { calls: vec![] };
        let shape = BlockShape::Ffn {
            hidden: 64,
            width: 128,
            gated: false,
        };
        let t = build_table(
            &mut p,
            &Workload::prefill(1, 16),
            &[shape],
            &ProfileSettings::new(0, 9).in_passes(3),
            None,
            &crate::progress::Quiet,
        )
        .unwrap();
        assert_eq!(t.get(&shape).unwrap().runs, 9);
        assert_eq!(t.rest.runs, 9);
        let firsts = p
            .calls
            .iter()
            .filter(|c| **c == Measured::Block(shape))
            .count();
        assert_eq!(firsts, 3);
    }
}
