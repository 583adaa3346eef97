//! The quality-vs-speed frontier of SmolLM2-135M-Instruct on this CPU (mistral.rs,
//! prefill of 512 tokens, batch 1): ZipLM against the baselines at speedup targets,
//! every speedup measured in mistral.rs (dense and pruned GGUF files, same tensor type,
//! timed alternately in the same run, wall time of a one-token request, medians), every quality
//! figure a WikiText-2 test perplexity of the emitted weights.
//!
//! ```sh
//! python3 scripts/fetch_smollm2.py
//! ZIPLM_SHARED=../shared cargo run --features mistralrs --example frontier_llm -- target/frontier-llm
//! ```
//!
//! Perplexity: `wiki.test.raw` tokenised whole without BOS by the model's own tokenizer
//! (built from the GGUF metadata as mistral.rs builds it), non-overlapping windows of
//! 1024 tokens, mean NLL over every predicted token, computed with ziplm's candle forward
//! of the emitted weights (the same file mistral.rs serves; the tiny-model test shows the
//! two forwards agree to 1e-4). `--ppl-windows N` evaluates the first N windows only
//! (default: all). Calibration: `wikitext-2/valid.txt`, windows of 512 tokens.
//!
//! Methods: `ziplm` (OBS database, DP refined by SPDY, OBS-updated weights, verified and
//! corrected in mistral.rs); `magnitude` (ZipLM's per-layer shapes, neurons kept by
//! weight norm, no OBS update); `uniform` (the same width in every layer, OBS-updated);
//! `layer-drop` (whole layers dropped). Baselines get ZipLM's final millisecond budget.
//!
//! Stages, so that ZipLM and uniform widths get the same treatment: `ziplm-seq` and
//! `uniform-seq` are ZipLM's and the uniform baseline's selections with sequential
//! correction (ZIPLM.md section 8, `pipeline::correct`, target `--sequential-target`):
//! the same shapes, re-fitted on the pruned model's own inputs. `--recover TOKENS` adds
//! a `-rec` point after every ZipLM and uniform model (one-shot and corrected alike):
//! the same distillation (`Session::recover`, the `prune --recover` stage) with the same
//! token budget, learning rate and seed for each.
//!
//! ```sh
//! frontier_llm OUT --targets 1.5 --methods uniform,ziplm-seq,uniform-seq \
//!     --sequential-target inputs --recover 24576 --max-ffn-removed 0.5
//! ```

use anyhow::Context;
use clap::Parser;
use std::path::{Path, PathBuf};
use ziplm::backend::mistralrs::{driver, eval, LlamaModel, LlamaOptions, LoadedModel};
use ziplm::data::{CalibrationData, DataFormat};
use ziplm::frontier::{self, FrontierPoint};
use ziplm::job::{PruneJob, RecoverySettings};
use ziplm::pipeline::correct::{self, SequentialTarget};
use ziplm::pipeline::Session;
use ziplm::search::{Budget, Selection};
use ziplm_plugin_api::{ModelAdapter, PrunedWeights, Workload};

const METRIC: &str = "WikiText-2 test perplexity";

#[derive(Parser)]
struct Args {
    /// Output folder.
    #[arg(default_value = "target/frontier-llm")]
    out: PathBuf,
    /// Speedup targets.
    #[arg(long, value_delimiter = ',', default_value = "1.25,1.5")]
    targets: Vec<f64>,
    /// Methods to measure besides ziplm (magnitude, uniform, layer-drop, ziplm-seq,
    /// uniform-seq).
    #[arg(long, value_delimiter = ',', default_value = "magnitude,uniform")]
    methods: Vec<String>,
    /// What the `-seq` methods fit each block to: residual, output or inputs (see
    /// `prune --sequential-target`).
    #[arg(long, default_value = "residual")]
    sequential_target: String,
    /// Distil every ZipLM and uniform model (one-shot and `-seq`) for this many tokens
    /// and add each result as a `-rec` point.
    #[arg(long)]
    recover: Option<u64>,
    /// The recovery's peak learning rate (default: `prune --recover`'s).
    #[arg(long, requires = "recover")]
    recover_lr: Option<f64>,
    /// Calibration windows of 512 tokens (WikiText-2 valid).
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Perplexity windows of 1024 tokens to evaluate (default: the whole test set).
    #[arg(long)]
    ppl_windows: Option<usize>,
    /// SPDY refinement: loss evaluations (0 = plain DP).
    #[arg(long, default_value_t = 16)]
    refine: usize,
    /// Fail when ZipLM's perplexity is worse than magnitude's at some target.
    #[arg(long)]
    check: bool,
    /// Largest fraction of a layer's FFN neurons the database removes short of dropping
    /// the whole layer (1.0 = any width down to the grid's smallest).
    #[arg(long, default_value_t = 1.0)]
    max_ffn_removed: f64,
    /// The GGUF model (default: models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Search with the candle block table as it is (no fit to mistral.rs first).
    #[arg(long)]
    no_runtime_fit: bool,
    /// Write every model as a safetensors folder (served by mistral.rs's `mistral`
    /// loader; one FFN width for every layer) instead of a GGUF file.
    #[arg(long)]
    safetensors: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for m in &args.methods {
        anyhow::ensure!(
            [
                "magnitude",
                "uniform",
                "layer-drop",
                "ziplm-seq",
                "uniform-seq"
            ]
            .contains(&m.as_str()),
            "unknown method `{m}`: use magnitude, uniform, layer-drop, ziplm-seq or uniform-seq"
        );
    }
    let sequential_target = match args.sequential_target.as_str() {
        "residual" => SequentialTarget::Residual,
        "output" => SequentialTarget::Output,
        "inputs" => SequentialTarget::Inputs,
        other => {
            anyhow::bail!("unknown --sequential-target `{other}`: use residual, output or inputs")
        }
    };
    anyhow::ensure!(
        args.recover.is_none() || args.methods.iter().any(|m| m == "uniform"),
        "--recover compares ZipLM with uniform widths at the same recovery budget: add uniform to --methods"
    );
    let shared =
        PathBuf::from(std::env::var("ZIPLM_SHARED").unwrap_or_else(|_| "../shared".into()));
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !model_path.exists() {
        eprintln!(
            "skipped: {} not found (run scripts/fetch_smollm2.py)",
            model_path.display()
        );
        return Ok(());
    }
    let test_text = shared.join("data/wikitext-2-raw/wiki.test.raw");
    std::fs::create_dir_all(&args.out)?;
    let mut job = PruneJob::new(&model_path);
    job.workload = Workload::prefill(1, 512);
    job.budgets = args.targets.iter().map(|&s| Budget::Speedup(s)).collect();
    job.calibration = Some(CalibrationData::file(
        shared.join("data/wikitext-2/valid.txt"),
        Some(DataFormat::Text),
        args.samples,
        512,
    ));
    job.out_dir = args.out.clone();
    job.latency_table = Some(args.out.join("latency-table.json"));
    job.search.refine = ziplm::search::spdy::RefineConfig::with_evaluations(args.refine, job.seed);
    job.database.max_ffn_removed_fraction = args.max_ffn_removed;
    job.verify_settings = ziplm::profile::ProfileSettings::new(2, 9);
    // --recover runs after the pipeline: its held-out windows must stay out of every fit.
    if args.recover.is_some() {
        job.hold_out = RecoverySettings::with_tokens(1).held_out;
    }
    if args.no_runtime_fit {
        job.options.set("runtime_fit", "false");
    }
    if args.safetensors {
        job.options.set("llm_format", "safetensors");
    }
    let mut run = driver::run(&job, &ziplm::progress::Bars::default())?;
    println!("{}", run.report.to_text());

    // The whole test text, tokenised once without BOS.
    let tok = driver::tokenizer_for(&job, &run.model)?;
    let text = std::fs::read_to_string(&test_text)
        .with_context(|| format!("reading {}", test_text.display()))?;
    let ids: Vec<u32> = tok
        .encode(&text, false)?
        .iter()
        .map(|&i| i as u32)
        .collect();
    eprintln!("WikiText-2 test: {} tokens", ids.len());
    let ppl = |path: &Path| -> anyhow::Result<eval::Perplexity> {
        let m = LlamaModel::load(path, LlamaOptions::default())?;
        let t = std::time::Instant::now();
        let p = eval::perplexity(
            &m.weights,
            &ids,
            1024,
            args.ppl_windows,
            &ziplm::progress::Quiet,
        )?;
        eprintln!(
            "{}: perplexity {:.3} over {} tokens ({} windows) in {:.1} s",
            path.display(),
            p.ppl,
            p.tokens,
            p.windows,
            t.elapsed().as_secs_f64()
        );
        Ok(p)
    };
    let problem = run.database.search_problem(&run.table)?;
    let dense_gguf = args.out.join(driver::output_name(&run.model, "dense"));
    run.model.emit(
        &ziplm_plugin_api::Plan::dense(run.model.structure()),
        &PrunedWeights::default(),
        &dense_gguf,
    )?;
    let dense_rt = LoadedModel::load(&dense_gguf)?;
    let prompt: Vec<u32> = ids.iter().take(512).copied().collect();
    let measure = |path: &Path| -> anyhow::Result<ziplm_plugin_api::PairedTiming> {
        let rt = LoadedModel::load(path)?;
        Ok(driver::time_pair_loaded(
            &dense_rt,
            &rt,
            &prompt,
            &job.workload,
            &job.verify_settings,
        )?)
    };

    let dense_ppl = ppl(&dense_gguf)?;
    let mut points: Vec<FrontierPoint> = vec![];
    for outcome in &run.outcomes {
        let Budget::Speedup(target) = outcome.budget else {
            unreachable!("speedup budgets only")
        };
        let last = outcome.chosen_attempt().context("no attempt")?;
        let (zd, zm) = (
            last.measured_dense.context("verification is on")?,
            last.measured.context("verification is on")?,
        );
        points.push(FrontierPoint {
            method: "ziplm".into(),
            target,
            predicted_ms: outcome.search.predicted_ms,
            dense_ms: zd.median_ms,
            measured_ms: zm.median_ms,
            quality: ppl(&outcome.emitted.path)?.ppl,
            metric: METRIC.into(),
            measured_speedup: outcome.measured_speedup(),
        });
        let stem = args
            .out
            .join(job.output_stem(&outcome.budget))
            .display()
            .to_string();
        let budget = Budget::LatencyMs(last.search_budget_ms);
        // Writes a model, times it against the dense one and scores it.
        let point = |method: &str,
                     selection: &Selection,
                     plan: &ziplm_plugin_api::Plan,
                     weights: &PrunedWeights|
         -> anyhow::Result<FrontierPoint> {
            let path = PathBuf::from(driver::output_name(&run.model, &format!("{stem}.{method}")));
            run.model.emit(plan, weights, &path)?;
            let t = measure(&path)?;
            Ok(FrontierPoint {
                method: method.into(),
                target,
                predicted_ms: problem.time_of(selection),
                dense_ms: t.dense.median_ms,
                measured_ms: t.model.median_ms,
                quality: ppl(&path)?.ppl,
                metric: METRIC.into(),
                measured_speedup: Some(t.speedup),
            })
        };
        // The one-shot baselines, and the selections the later stages start from.
        let mut staged: Vec<Staged> = vec![Staged {
            method: "ziplm".into(),
            selection: outcome.search.selection.clone(),
            plan: outcome.plan.clone(),
            weights: outcome.weights.clone(),
        }];
        for method in args.methods.iter().filter(|m| !m.ends_with("-seq")) {
            let Some(b) = ziplm::baselines::baseline_model(
                &run.database,
                &problem,
                method,
                &outcome.search.selection,
                budget,
                job.search.buckets,
            )?
            else {
                continue;
            };
            points.push(point(method, &b.selection, &b.plan, &b.weights)?);
            if method == "uniform" {
                staged.push(Staged {
                    method: method.clone(),
                    selection: b.selection,
                    plan: b.plan,
                    weights: b.weights,
                });
            }
        }
        // + sequential correction, on the same selections.
        let mut corrected = vec![];
        for s in &staged {
            let method = format!("{}-seq", s.method);
            if !args.methods.contains(&method) {
                continue;
            }
            let t = std::time::Instant::now();
            let (plan, weights) = correct::correct(
                &run.model,
                &run.database,
                &s.selection,
                job.database.dampening,
                sequential_target,
                false,
                &ziplm::progress::Bars::default(),
            )?;
            eprintln!(
                "{method} {target}x: corrected ({}) in {:.1} s",
                args.sequential_target,
                t.elapsed().as_secs_f64()
            );
            points.push(point(&method, &s.selection, &plan, &weights)?);
            corrected.push(Staged {
                method,
                selection: s.selection.clone(),
                plan,
                weights,
            });
        }
        staged.extend(corrected);
        // + recovery: every ZipLM and uniform model, the same settings for each.
        if let Some(tokens) = args.recover {
            let mut recovery_job = job.clone();
            let mut settings = RecoverySettings::with_tokens(tokens);
            if let Some(lr) = args.recover_lr {
                settings.learning_rate = lr;
            }
            recovery_job.recovery = Some(settings);
            for s in &staged {
                let method = format!("{}-rec", s.method);
                let file_stem = format!("{}.{method}", job.output_stem(&outcome.budget));
                let t = std::time::Instant::now();
                let r = run
                    .session
                    .recover(
                        &run.model,
                        &recovery_job,
                        &s.plan,
                        &s.weights,
                        &run.held_out,
                        &file_stem,
                        &ziplm::progress::Bars::default(),
                    )?
                    .context("the mistral.rs session recovers")?;
                eprintln!(
                    "{method} {target}x: recovered in {:.1} s: {}",
                    t.elapsed().as_secs_f64(),
                    r.summary.line()
                );
                points.push(point(&method, &s.selection, &s.plan, &r.weights)?);
            }
        }
    }
    // The dense point's latency: the median of every timing run's dense median.
    let mut dense_ms: Vec<f64> = points.iter().map(|p| p.dense_ms).collect();
    dense_ms.sort_by(f64::total_cmp);
    let dense_med = dense_ms
        .get(dense_ms.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    points.insert(
        0,
        FrontierPoint {
            method: "dense".into(),
            target: 1.0,
            predicted_ms: problem.dense_ms(),
            dense_ms: dense_med,
            measured_ms: dense_med,
            quality: dense_ppl.ppl,
            metric: METRIC.into(),
            measured_speedup: None,
        },
    );
    frontier::write(
        &args.out,
        "frontier",
        &format!(
            "SmolLM2-135M on mistral.rs (CPU, f32 {}, prefill 1 x 512): perplexity vs measured speedup",
            if args.safetensors { "safetensors" } else { "GGUF" }
        ),
        &points,
    )?;
    println!(
        "\nperplexity over {} tokens ({} windows of 1024)",
        dense_ppl.tokens, dense_ppl.windows
    );
    println!("\n{}", frontier::to_markdown(&points, 3));
    if args.check {
        for z in points.iter().filter(|p| p.method == "ziplm") {
            if let Some(m) = points
                .iter()
                .find(|p| p.method == "magnitude" && p.target == z.target)
            {
                anyhow::ensure!(
                    z.quality <= m.quality,
                    "ZipLM's perplexity ({:.3}) is worse than magnitude's ({:.3}) at {}x",
                    z.quality,
                    m.quality,
                    z.target
                );
            }
        }
    }
    Ok(())
}

/// A model that the later stages (correction, recovery) start from.
struct Staged {
    method: String,
    selection: Selection,
    plan: ziplm_plugin_api::Plan,
    weights: PrunedWeights,
}
