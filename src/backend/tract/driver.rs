//! Running a [`PruneJob`] with tract: load -> calibrate -> database -> profile ->
//! search -> emit -> verify, and the report.

use super::loss::OutputLoss;
use super::model::{TractModel, TractOptions};
use super::profile::{time_pair, TractProfiler};
use crate::data::{self, tokenizer::Tokenizer, DataFormat, SampleMode};
use crate::database::Database;
use crate::error::{Error, Result};
use crate::job::{Device, PruneJob};
use crate::pipeline::{self, BudgetOutcome, EmitAndMeasure};
use crate::profile;
use crate::progress::Progress;
use crate::report::{self, PruneReport, StageTimes};
use std::path::PathBuf;
use std::time::Instant;
use ziplm_plugin_api::{EmitSummary, LatencyTable, ModelAdapter, Plan, PrunedWeights, Timing};

/// Everything a tract run produced.
pub struct TractRun {
    /// The report (also written to the output folder).
    pub report: PruneReport,
    /// The database (reusable for more budgets).
    pub database: Database,
    /// The latency table used.
    pub table: LatencyTable,
    /// Per-budget outcomes.
    pub outcomes: Vec<BudgetOutcome>,
    /// The loaded model.
    pub model: TractModel,
}

/// Calibration samples for a job: tokenised data, or random ids when none is given.
pub fn calibration_samples(job: &PruneJob, model: &TractModel) -> Result<Vec<Vec<i64>>> {
    let Some(cal) = &job.calibration else {
        let vocab = model.vocab().ok_or_else(|| {
            Error::Invalid(
                "no calibration data given and the vocabulary size is unknown; pass --calibration"
                    .into(),
            )
        })?;
        return Ok(data::random_samples(
            vocab,
            job.random_samples,
            job.workload.seq_len,
            job.seed,
        ));
    };
    let tok_path = job.tokenizer.clone().or_else(|| Tokenizer::next_to(&job.model)).ok_or_else(|| {
        Error::Invalid(format!(
            "calibration text needs the model's tokenizer: no tokenizer.json next to {}; pass --tokenizer",
            job.model.display()
        ))
    })?;
    let tok = Tokenizer::from_file(&tok_path)?;
    let format = cal
        .format
        .unwrap_or_else(|| DataFormat::from_path(&cal.path));
    let texts = data::read_texts(&cal.path, format)?;
    let mode = if model.structure().architecture == "bert" {
        SampleMode::PerText
    } else {
        SampleMode::Windows
    };
    data::make_samples(
        &tok,
        &texts,
        mode,
        cal.samples,
        cal.seq_len.min(job.workload.seq_len.max(cal.seq_len)),
    )
}

fn threads(job: &PruneJob) -> Result<usize> {
    match job.device {
        Device::Cpu { threads } if threads >= 1 => Ok(threads),
        Device::Cpu { .. } => Err(Error::Invalid("threads must be at least 1".into())),
        Device::Cuda { .. } => Err(Error::Invalid(
            "the tract backend runs on the CPU; use target.threads (CUDA targets are for the mistralrs backend)".into(),
        )),
    }
}

/// Calibration samples the SPDY loss hook scores candidates on.
const LOSS_SAMPLES: usize = 64;

struct Backend<'a> {
    model: &'a TractModel,
    loss: Option<&'a OutputLoss>,
    job: &'a PruneJob,
    threads: usize,
    dest: PathBuf,
    emit_s: f64,
    verify_s: f64,
}

impl EmitAndMeasure for Backend<'_> {
    fn emit(&mut self, plan: &Plan, weights: &PrunedWeights) -> Result<EmitSummary> {
        let t = Instant::now();
        let s = self.model.emit(plan, weights, &self.dest)?;
        self.emit_s += t.elapsed().as_secs_f64();
        Ok(s)
    }
    fn measure(&mut self, emitted: &EmitSummary) -> Result<(Timing, Timing)> {
        let t = Instant::now();
        let r = time_pair(
            self.model,
            &self.job.model,
            &emitted.path,
            &self.job.workload,
            self.threads,
            &self.job.verify_settings,
        )?;
        self.verify_s += t.elapsed().as_secs_f64();
        Ok(r)
    }
    fn loss(&mut self, plan: &Plan, weights: &PrunedWeights) -> Option<Result<f64>> {
        let loss = self.loss?;
        Some(loss.loss(self.model, plan, weights).map_err(Into::into))
    }
}

/// Runs a job end to end and writes the models and the report (`report.json`,
/// `report.txt`, `report.svg`) into the job's output folder.
pub fn run(job: &PruneJob, progress: &dyn Progress) -> Result<TractRun> {
    job.check_budgets()?;
    crate::fsutil::check_output_folder(&job.out_dir)?;
    let threads = threads(job)?;
    let mut stages = StageTimes::default();
    let t = Instant::now();
    let mut model = TractModel::load(
        &job.model,
        TractOptions {
            workload: job.workload,
            gqa_policy: job.gqa_policy,
        },
    )?;
    stages.load_s = t.elapsed().as_secs_f64();
    let samples = calibration_samples(job, &model)?;
    model.set_calibration(samples)?;
    let database = Database::build(&mut model, &job.database, progress)?;
    stages.calibrate_s = database.timings.calibrate_s;
    stages.database_s = database.timings.database_s;

    let t = Instant::now();
    let mut notes = vec![];
    let mut verify = job.verify;
    let table = {
        let mut profiler = TractProfiler::new(&model, threads);
        let acquired = profile::acquire_table(job, &mut profiler, &database.shapes(), progress)?;
        if !acquired.verify_here {
            verify = false;
        }
        notes.extend(acquired.notes);
        acquired.table
    };
    stages.profile_s = t.elapsed().as_secs_f64();

    // Every budget is checked before anything is written: an impossible one fails the
    // job with the fastest achievable latency, leaving the output folder untouched.
    let problem = database.search_problem(&table)?;
    for budget in &job.budgets {
        problem.solve(*budget, &[], job.search.buckets)?;
    }
    // SPDY refinement scores candidates by their output error on held samples.
    let loss = match job.search.refine {
        Some(_) => {
            let cap = match job.workload.phase {
                ziplm_plugin_api::Phase::Prefill => job.workload.seq_len,
                ziplm_plugin_api::Phase::Decode { .. } => 128,
            };
            Some(OutputLoss::new(
                &model,
                model.calibration_samples(),
                LOSS_SAMPLES,
                cap,
            )?)
        }
        None => None,
    };
    std::fs::create_dir_all(&job.out_dir).map_err(|e| Error::io(&job.out_dir, e))?;
    let mut outcomes = vec![];
    let mut budgets = vec![];
    let t_search = Instant::now();
    let (mut emit_s, mut verify_s) = (0.0, 0.0);
    for budget in &job.budgets {
        let dest = job
            .out_dir
            .join(format!("{}.onnx", job.output_stem(budget)));
        let mut backend = Backend {
            model: &model,
            loss: loss.as_ref(),
            job,
            threads,
            dest,
            emit_s: 0.0,
            verify_s: 0.0,
        };
        let outcome = pipeline::prune_to_budget(
            &database,
            &table,
            *budget,
            &job.search,
            verify,
            &mut backend,
        )?;
        emit_s += backend.emit_s;
        verify_s += backend.verify_s;
        if job.nnef {
            let onnx_bytes = std::fs::read(&outcome.emitted.path)
                .map_err(|e| Error::io(&outcome.emitted.path, e))?;
            let nnef_path = job
                .out_dir
                .join(format!("{}.nnef.tar", job.output_stem(budget)));
            super::nnef::write_nnef(&onnx_bytes, &job.workload, &nnef_path)?;
        }
        let plan_path = job
            .out_dir
            .join(format!("{}.plan.json", job.output_stem(budget)));
        crate::fsutil::write_json_atomic(&plan_path, &outcome.plan)?;
        // The bundle for the load-time tract transform (same model as the ONNX).
        let weights = database.pruned_weights(&outcome.search.selection)?;
        let bundle_path = job
            .out_dir
            .join(format!("{}.plan-bundle.json", job.output_stem(budget)));
        super::hook::write_bundle(
            &bundle_path,
            &outcome.plan,
            &weights,
            super::onnx::keeps_bias_when_removed(&model)?,
        )?;
        notes.extend(report::dense_note(&database, &outcome));
        budgets.push(report::budget_report(&database, &table, &outcome)?);
        outcomes.push(outcome);
    }
    stages.emit_s = emit_s;
    stages.verify_s = verify_s;
    stages.search_s = (t_search.elapsed().as_secs_f64() - emit_s - verify_s).max(0.0);
    let report = PruneReport::new(
        job,
        &model.structure().architecture,
        &table,
        &database,
        stages,
        budgets,
        notes,
    );
    report.write(&job.out_dir, "report")?;
    Ok(TractRun {
        report,
        database,
        table,
        outcomes,
        model,
    })
}
