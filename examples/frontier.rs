//! The quality-vs-speed frontier of all-MiniLM-L6-v2 on this CPU (tract, batch 1,
//! sequence 128, one thread): ZipLM against the baselines at a range of speedup targets,
//! every speedup measured (dense and pruned timed in the same run), every quality
//! figure an STS-B dev Spearman x100 of the emitted model.
//!
//! ```sh
//! ZIPLM_SHARED=../shared cargo run --release --example frontier -- target/frontier
//! # CI's smaller form (ZipLM must not score below magnitude at 1.5x and 2.0x):
//! cargo run --example frontier -- target/ci-minilm --targets 1.5,2.0 --methods ziplm,magnitude --check
//! ```
//!
//! Methods:
//! - `ziplm`: the DP over the OBS database refined by SPDY with the output loss,
//!   OBS-updated weights, verified and corrected;
//! - `ziplm-plain`: the plain error-sum DP over the same database (no refinement);
//! - `magnitude`: ZipLM's per-layer shapes, units kept by weight norm, no OBS update;
//! - `uniform`: one head count and one FFN width in every layer, OBS-updated weights;
//! - `layer-drop`: whole layers dropped, the rest dense;
//! - `ziplm-seq`, `uniform-seq`: ZipLM's and the uniform baseline's selections with
//!   sequential correction (ZIPLM.md section 8, `pipeline::correct`): the same shapes,
//!   heads and neurons re-chosen and re-fitted on the pruned model's own inputs. Not in
//!   the default set (one more emit, timing and scoring each); `ziplm-seqd`,
//!   `uniform-seqd`: the same with the drift-cancelling target `W X + (h - h~)`;
//!   `ziplm-seqi`, `uniform-seqi`: with the inputs target `W X~` (OBS on `(W, H~)`).
//!
//! The others get the same (corrected) millisecond budget as ZipLM's final search.
//! Writes `OUT/frontier.{csv,json,svg}` and prints a markdown table.

use anyhow::Context;
use clap::Parser;
use std::path::{Path, PathBuf};
use ziplm::backend::tract::encode::SentenceEncoder;
use ziplm::backend::tract::{device::TractDevice, driver, onnx, profile::time_pair};
use ziplm::data::{sts, tokenizer::Tokenizer, CalibrationData, DataFormat};
use ziplm::frontier::{self, FrontierPoint};
use ziplm::job::PruneJob;
use ziplm::search::Budget;

const METRIC: &str = "STS-B dev Spearman x100";

#[derive(Parser)]
struct Args {
    /// Output folder.
    #[arg(default_value = "target/frontier")]
    out: PathBuf,
    /// Speedup targets.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1.1,1.25,1.5,1.75,2.0,2.25,2.5"
    )]
    targets: Vec<f64>,
    /// Methods to measure (ziplm always runs: the baselines take its corrected budget).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ziplm,ziplm-plain,magnitude,uniform,layer-drop"
    )]
    methods: Vec<String>,
    /// Calibration sentences (STS-B train).
    #[arg(long, default_value_t = 2048)]
    samples: usize,
    /// Fail when ZipLM scores below the magnitude baseline at some target.
    #[arg(long)]
    check: bool,
    /// SPDY refinement of ZipLM's search: at most this many loss evaluations (0 = off).
    #[arg(long, default_value_t = 32)]
    refine: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for m in &args.methods {
        anyhow::ensure!(
            [
                "ziplm",
                "ziplm-plain",
                "magnitude",
                "uniform",
                "layer-drop",
                "ziplm-seq",
                "uniform-seq",
                "ziplm-seqd",
                "uniform-seqd",
                "ziplm-seqi",
                "uniform-seqi"
            ]
            .contains(&m.as_str()),
            "unknown method `{m}`: use ziplm, ziplm-plain, magnitude, uniform, layer-drop, ziplm-seq, uniform-seq, ziplm-seqd, uniform-seqd, ziplm-seqi or uniform-seqi"
        );
    }
    let shared =
        PathBuf::from(std::env::var("ZIPLM_SHARED").unwrap_or_else(|_| "../shared".into()));
    let model = shared.join("models/all-MiniLM-L6-v2-onnx/model.onnx");
    if !model.exists() {
        eprintln!("skipped: {} not found (set ZIPLM_SHARED)", model.display());
        return Ok(());
    }
    std::fs::create_dir_all(&args.out)?;
    let mut job = PruneJob::new(&model);
    job.budgets = args.targets.iter().map(|&s| Budget::Speedup(s)).collect();
    job.calibration = Some(CalibrationData::file(
        shared.join("data/stsbenchmark/sts-train.csv"),
        Some(DataFormat::StsTsv),
        args.samples,
        128,
    ));
    job.out_dir = args.out.clone();
    job.latency_table = Some(args.out.join("latency-table.json"));
    job.search.refine = ziplm::search::spdy::RefineConfig::with_evaluations(args.refine, job.seed);
    let ziplm_label = if args.refine > 0 {
        "ziplm"
    } else {
        "ziplm-plain"
    };
    let run = driver::run(&job, &ziplm::progress::Bars::default())?;
    println!("{}", run.report.to_text());

    let tok = Tokenizer::from_file(&model.with_file_name("tokenizer.json"))?;
    let pairs = sts::read_pairs(&shared.join("data/stsbenchmark/sts-dev.csv"))?;
    let score = |path: &Path| -> anyhow::Result<f64> {
        let enc = SentenceEncoder::new(&std::fs::read(path)?, 16, 128)?;
        Ok(sts::evaluate(&pairs, &mut |s: &[String]| {
            enc.embed(&tok, s)
        })?)
    };
    let cpu1 = TractDevice::cpu(1);
    let measure = |path: &Path| {
        time_pair(
            &run.model,
            &model,
            path,
            &job.workload,
            &cpu1,
            &job.verify_settings,
        )
        .map(|t| t.timing)
    };
    let problem = run.database.search_problem(&run.table)?;

    let dense_quality = score(&model)?;
    let mut points = vec![];
    let mut dense_ms = vec![];
    for outcome in &run.outcomes {
        let target = match outcome.budget {
            Budget::Speedup(s) => s,
            Budget::LatencyMs(_) => unreachable!("the job has speedup budgets only"),
        };
        let last = outcome
            .chosen_attempt()
            .context("an outcome without an attempt")?;
        let (zd, zm) = (
            last.measured_dense.context("verification is on")?,
            last.measured.context("verification is on")?,
        );
        dense_ms.push(zd.median_ms);
        let stem = outcome.emitted.path.with_extension("");
        if args.methods.iter().any(|m| m == "ziplm") {
            points.push(FrontierPoint {
                method: ziplm_label.into(),
                target,
                predicted_ms: outcome.search.predicted_ms,
                dense_ms: zd.median_ms,
                measured_ms: zm.median_ms,
                quality: score(&outcome.emitted.path)?,
                metric: METRIC.into(),
                measured_speedup: outcome.measured_speedup(),
            });
        }
        // The baselines aim at ZipLM's final (corrected) millisecond budget.
        let budget = Budget::LatencyMs(last.search_budget_ms);
        let methods: Vec<String> = args
            .methods
            .iter()
            .filter(|m| {
                !m.contains("-seq") && *m != "ziplm" && !(*m == "ziplm-plain" && args.refine == 0)
            })
            .cloned()
            .collect();
        points.extend(frontier::baseline_points(
            &run.database,
            &problem,
            &outcome.search.selection,
            budget,
            job.search.buckets,
            &methods,
            (target, METRIC),
            |method, plan, weights| {
                let path = PathBuf::from(format!("{}.{method}.onnx", stem.display()));
                std::fs::write(&path, onnx::emit(&run.model, plan, weights)?)
                    .map_err(|e| ziplm::Error::io(&path, e))?;
                let t = measure(&path).map_err(|e| ziplm::Error::Invalid(format!("{e:#}")))?;
                Ok(frontier::Measured {
                    dense_ms: t.dense.median_ms,
                    measured_ms: t.model.median_ms,
                    speedup: t.speedup,
                    quality: score(&path).map_err(|e| ziplm::Error::Invalid(format!("{e:#}")))?,
                })
            },
        )?);
    }
    let dense_med = median(&mut dense_ms);
    // Sequential correction of ZipLM's and the uniform baseline's selections.
    for outcome in &run.outcomes {
        let Budget::Speedup(target) = outcome.budget else {
            continue;
        };
        let last = outcome
            .chosen_attempt()
            .context("an outcome without an attempt")?;
        let stem = outcome.emitted.path.with_extension("");
        for method in [
            "ziplm-seq",
            "uniform-seq",
            "ziplm-seqd",
            "uniform-seqd",
            "ziplm-seqi",
            "uniform-seqi",
        ] {
            if !args.methods.iter().any(|m| m == method) {
                continue;
            }
            let selection = if method.starts_with("ziplm") {
                outcome.search.selection.clone()
            } else {
                match ziplm::baselines::uniform_selection(
                    &problem,
                    Budget::LatencyMs(last.search_budget_ms),
                ) {
                    Ok(s) => s,
                    Err(_) => continue,
                }
            };
            let t = std::time::Instant::now();
            let (plan, weights) = ziplm::pipeline::correct::correct(
                &run.model,
                &run.database,
                &selection,
                job.database.dampening,
                if method.ends_with("seqd") {
                    ziplm::pipeline::correct::SequentialTarget::Residual
                } else if method.ends_with("seqi") {
                    ziplm::pipeline::correct::SequentialTarget::Inputs
                } else {
                    ziplm::pipeline::correct::SequentialTarget::Output
                },
                false,
                &ziplm::progress::Bars::default(),
            )?;
            eprintln!(
                "{method} {target}x: corrected in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            let path = PathBuf::from(format!("{}.{method}.onnx", stem.display()));
            std::fs::write(&path, onnx::emit(&run.model, &plan, &weights)?)?;
            let t = measure(&path)?;
            points.push(FrontierPoint {
                method: method.into(),
                target,
                predicted_ms: problem.time_of(&selection),
                dense_ms: t.dense.median_ms,
                measured_ms: t.model.median_ms,
                quality: score(&path)?,
                metric: METRIC.into(),
                measured_speedup: Some(t.speedup),
            });
        }
    }
    points.insert(
        0,
        FrontierPoint {
            method: "dense".into(),
            target: 1.0,
            predicted_ms: problem.dense_ms(),
            dense_ms: dense_med,
            measured_ms: dense_med,
            quality: dense_quality,
            metric: METRIC.into(),
            measured_speedup: None,
        },
    );
    frontier::write(
        &args.out,
        "frontier",
        "all-MiniLM-L6-v2 on tract, 1 thread, 1 x 128: quality vs measured speedup",
        &points,
    )?;

    println!("\n{}", frontier::to_markdown(&points, 2));
    for o in &run.outcomes {
        if o.met() == Some(false) {
            eprintln!(
                "warning: budget {:?} missed after {} searches (see the report)",
                o.budget,
                o.attempts.len()
            );
        }
    }
    if args.check {
        for z in points.iter().filter(|p| p.method == ziplm_label) {
            if let Some(m) = points
                .iter()
                .find(|p| p.method == "magnitude" && p.target == z.target)
            {
                anyhow::ensure!(
                    z.quality >= m.quality,
                    "ZipLM ({:.2}) scored below the magnitude baseline ({:.2}) at {}x",
                    z.quality,
                    m.quality,
                    z.target
                );
            }
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}
