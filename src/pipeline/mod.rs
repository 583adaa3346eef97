//! The one pipeline every prune job runs, whatever its backend.
//!
//! [`run`] passes one named value from each stage to the next:
//!
//! ```text
//! load       Backend::open            -> S: Session (the loaded model)
//! calibrate  calibration::samples     -> Calibration (token samples set on the model;
//!                                        Session::self_chat writes them for self:N, and
//!                                        for a chat model's share of its own chat)
//! database   Database::build          -> Database (removal orders, errors, weights)
//! profile    profile::acquire_table   -> Profiled (LatencyTable, whether to verify)
//! prepare    Session::prepare_*       -> Prepared (loss hook, verification set-up)
//! per budget, budget::prune_to_budget:
//!   search     DP / SPDY              -> Selection, Plan
//!   emit       Session::emit          -> EmitSummary (the model file)
//!   verify     Session::measure       -> paired timing (PairedTiming), next round or done
//!   refit      Session::refit         -> the runtime fit solved again with that timing
//!                                        (RuntimeFit, LatencyTable for the next search)
//!   correct    correct::correct (job.sequential) -> Plan, PrunedWeights re-fitted on
//!              the pruned model's inputs (ModelAdapter::paired_streams), emitted again
//!   recover    Session::recover       -> Recovered (distilled weights, emitted again)
//!   artifacts  Session::write_artifacts, Session::check_served
//! report     PruneReport              -> report.{json,txt,svg}
//! ```
//!
//! A backend supplies a [`Session`]; everything else lives here once.

pub mod budget;
pub mod calibration;
pub mod chain;
pub mod correct;

pub use budget::{
    meets, next_search_budget, prune_to_budget, Attempt, Bracket, BudgetOutcome, EmitAndMeasure,
    SearchSettings,
};

use crate::data::{tokenizer::Tokenizer, SampleMode};
use crate::database::Database;
use crate::error::{Error, Result};
use crate::job::PruneJob;
use crate::outputs::OutputSet;
use crate::profile::{self, TableRequest};
use crate::progress::Progress;
use crate::report::{self, PruneReport, StageTimes};
use crate::runtime_fit::RuntimeFit;
use crate::search::Selection;
use std::path::{Path, PathBuf};
use std::time::Instant;
use ziplm_plugin_api::{
    EmitSummary, LatencyProfiler, LatencyTable, ModelAdapter, PairedTiming, Plan, PrunedWeights,
};

/// A backend's state for one job beside its loaded model: what the pipeline asks of a
/// runtime. Every call gets the model ([`Session::Model`], the plugin API's adapter).
///
/// The pipeline calls, in order: the calibration hooks, [`Session::profiler`],
/// [`Session::prepare_loss`], [`Session::prepare_verification`] (when verifying), then
/// per budget [`Session::emit`] / [`Session::measure`] / [`Session::loss`] from the
/// verification loop, [`Session::write_artifacts`] and [`Session::check_served`], and
/// last [`Session::finish`].
pub trait Session {
    /// The backend's model type.
    type Model: ModelAdapter;

    /// How calibration text is cut into samples.
    fn sample_mode(&self, _model: &Self::Model) -> SampleMode {
        SampleMode::Windows
    }
    /// A tokenizer the model carries itself, used when no `tokenizer.json` is found.
    fn embedded_tokenizer(
        &self,
        _model: &Self::Model,
        _job: &PruneJob,
    ) -> Option<Result<Tokenizer>> {
        None
    }

    /// Chat transcripts the dense model writes itself, holding at least `tokens` ids
    /// (`--calibration self:N`, [`crate::data::self_chat`]); backends whose models do
    /// not chat refuse (and jobs that ask them are refused when resolved, see
    /// [`crate::backend::Backend::writes_chat`]).
    fn self_chat(
        &self,
        _model: &Self::Model,
        _job: &PruneJob,
        _tokens: usize,
        _progress: &dyn Progress,
    ) -> Result<Vec<crate::data::self_chat::Transcript>> {
        Err(Error::Invalid(
            "this backend's models do not chat: self-written calibration (self:N) is for chat LLMs in the mistralrs backend; give --calibration FILE".into(),
        ))
    }

    /// Whether the loaded model chats (has a chat template), so that a job's
    /// [`PruneJob::chat_calibration`] applies to it.
    fn chats(&self, _model: &Self::Model, _job: &PruneJob) -> bool {
        false
    }

    /// Notes the report starts with (how this backend times).
    fn notes(&self, _job: &PruneJob) -> Vec<String> {
        vec![]
    }
    /// The profiler of this job's target.
    fn profiler<'a>(
        &'a self,
        model: &'a Self::Model,
        job: &PruneJob,
    ) -> Box<dyn LatencyProfiler + 'a>;

    /// Prepares the loss the SPDY refinement scores candidates with (called only when
    /// the job refines).
    fn prepare_loss(&mut self, _model: &Self::Model, _job: &PruneJob) -> Result<()> {
        Ok(())
    }
    /// The loss of a candidate; `None` when the backend has none.
    fn loss(
        &self,
        _model: &Self::Model,
        _plan: &Plan,
        _weights: &PrunedWeights,
    ) -> Option<Result<f64>> {
        None
    }

    /// Sets up verification once before the budgets (called only when verifying):
    /// `scratch` is a folder inside the output folder that is removed after the run.
    /// Returns the table the searches use (a backend may fit it to its runtime) and
    /// report notes.
    fn prepare_verification(
        &mut self,
        _model: &Self::Model,
        _job: &PruneJob,
        _database: &Database,
        table: LatencyTable,
        _scratch: &Path,
        _progress: &dyn Progress,
    ) -> Result<(LatencyTable, Vec<String>)> {
        Ok((table, vec![]))
    }

    /// The file (or folder) name of the model emitted under `stem`.
    fn output_name(&self, model: &Self::Model, stem: &str) -> String;
    /// Writes the model for a plan with its weights to `dest` (atomically).
    fn emit(
        &self,
        model: &Self::Model,
        plan: &Plan,
        weights: &PrunedWeights,
        dest: &Path,
    ) -> Result<EmitSummary> {
        Ok(model.emit(plan, weights, dest)?)
    }
    /// Times the dense and the emitted model end to end in the runtime, alternating.
    fn measure(
        &mut self,
        model: &Self::Model,
        job: &PruneJob,
        emitted: &EmitSummary,
    ) -> Result<PairedTiming>;
    /// Takes a verified selection's timing as one more point of the runtime fit this
    /// session made in [`Session::prepare_verification`], and returns the fit solved
    /// again with the table the next searches use ([`EmitAndMeasure::refit`]); `None`
    /// without a fit.
    fn refit(
        &mut self,
        _selection: &Selection,
        _timing: &PairedTiming,
    ) -> Option<(RuntimeFit, LatencyTable)> {
        None
    }

    /// Times each of `models` (emitted files) against `model`, emitted unpruned through
    /// the same emitter into `scratch`, alternating in one run per model: a chain's
    /// speedups over the original. `None` when the backend does not time whole models.
    fn time_against_dense(
        &mut self,
        _model: &Self::Model,
        _job: &PruneJob,
        _models: &[PathBuf],
        _scratch: &Path,
    ) -> Result<Option<Vec<PairedTiming>>> {
        Ok(None)
    }

    /// The recovery stage (the gradual mode, `job.recovery`), after a budget's plan is
    /// verified: the weights of `plan` distilled towards the dense model (or the
    /// recovery's teacher, `RecoverySettings::teacher`) on the
    /// calibration windows, with early stopping on `held_out` (windows no fit has seen,
    /// [`JobRun::held_out`]). Shapes do not
    /// change, so the verified latency holds. `None` when this backend does not
    /// recover (jobs that ask for it are refused when resolved).
    #[allow(clippy::too_many_arguments)] // each is one input of the stage; a struct would only rename them
    fn recover(
        &mut self,
        _model: &Self::Model,
        _job: &PruneJob,
        _plan: &Plan,
        _weights: &PrunedWeights,
        _held_out: &[Vec<i64>],
        _stem: &str,
        _progress: &dyn Progress,
    ) -> Result<Option<Recovered>> {
        Ok(None)
    }

    /// Writes the backend's other files of a finished budget into `dir` (the staging
    /// folder of the output set, beside the model), named after `stem`.
    fn write_artifacts(
        &mut self,
        _model: &Self::Model,
        _job: &PruneJob,
        _dir: &Path,
        _stem: &str,
        _outcome: &BudgetOutcome,
    ) -> Result<()> {
        Ok(())
    }
    /// Checks a verified model as its runtime serves it; returns report notes.
    fn check_served(&mut self, _job: &PruneJob, _outcome: &BudgetOutcome) -> Result<Vec<String>> {
        Ok(vec![])
    }
    /// Releases what verification held (loaded runtimes) before the scratch folder
    /// goes.
    fn finish(&mut self) {}
}

/// What the recovery stage returns: the distilled weights and what it did.
pub struct Recovered {
    /// Every trained tensor, as the plan's replaced weights.
    pub weights: PrunedWeights,
    /// The run, for the budget's report.
    pub summary: crate::job::RecoverySummary,
}

/// Everything a run produced.
pub struct JobRun<S: Session> {
    /// The report (also written to the output folder).
    pub report: PruneReport,
    /// The database (reusable for more budgets).
    pub database: Database,
    /// The latency table the searches used.
    pub table: LatencyTable,
    /// Per-budget outcomes, in the job's order.
    pub outcomes: Vec<BudgetOutcome>,
    /// The loaded model.
    pub model: S::Model,
    /// The backend's state for the job.
    pub session: S,
    /// The calibration windows kept out of every fit ([`PruneJob::held_out_windows`]),
    /// for [`Session::recover`]'s early stopping.
    pub held_out: Vec<Vec<i64>>,
}

/// Checks a job before a backend loads anything: its budgets, its name and its output
/// folder.
pub fn check_job(job: &PruneJob) -> Result<()> {
    job.check_budgets()?;
    job.check_name()?;
    crate::fsutil::check_output_folder(&job.out_dir)
}

/// The profile stage's value: the table and whether this machine verifies.
pub struct Profiled {
    /// The latency table.
    pub table: LatencyTable,
    /// Whether models are timed here (false with another target's table).
    pub verify: bool,
    /// Report notes.
    pub notes: Vec<String>,
}

/// Runs a job end to end: checks it ([`check_job`]), loads its model with `open` (the
/// backend's: the model and the backend's state for the job), then calibration, database, profile, every budget's search-emit-verify
/// loop, the backend's artifacts and the report (`NAME.report.json`, `.txt`, `.svg`),
/// all committed into the output folder as one set ([`crate::outputs`]).
pub fn run<S: Session>(
    job: &PruneJob,
    open: impl FnOnce(&PruneJob) -> Result<(S::Model, S)>,
    progress: &dyn Progress,
) -> Result<JobRun<S>> {
    check_job(job)?;
    // The output folder is locked for the whole run, and every file goes to a staging
    // folder first: the set is committed at the end, or not at all.
    let set = OutputSet::begin(&job.out_dir, &job.display_name())?;
    let t = Instant::now();
    let (mut model, mut session) = open(job)?;
    crate::memory::check_workload_fits(model.structure(), &job.workload, model.vocab_size())?;
    // A committed table that cannot serve this job fails it now, not after calibration.
    profile::committed_table(&table_request(job), session.profiler(&model, job).as_ref())?;
    let mut stages = StageTimes {
        load_s: t.elapsed().as_secs_f64(),
        ..Default::default()
    };

    // calibrate + database
    let t = Instant::now();
    let mut samples = calibration::samples(job, &model, &session, progress)?;
    let held_out = calibration::hold_out(&mut samples, job.held_out_windows())?;
    let samples_s = t.elapsed().as_secs_f64();
    let chat_note = calibration::chat_note(job, &model, &session);
    model.set_calibration(samples)?;
    let database = Database::build(&mut model, &job.database, progress)?;
    stages.calibrate_s = samples_s + database.timings.calibrate_s;
    stages.database_s = database.timings.database_s;

    // profile
    let t = Instant::now();
    let mut notes = session.notes(job);
    notes.extend(chat_note);
    notes.extend(calibration::too_few_tokens(
        database.calibration_tokens,
        model.structure(),
    ));
    let profiled = profile_stage(job, &model, &session, &database, progress)?;
    notes.extend(profiled.notes);
    let verify = profiled.verify;
    let mut table = profiled.table;
    stages.profile_s = t.elapsed().as_secs_f64();

    // Every budget is checked before anything is written: an impossible one fails the
    // job with the fastest achievable latency, leaving the output folder untouched.
    let problem = database.search_problem(&table)?;
    for budget in &job.budgets {
        problem.solve(*budget, &[], job.search.buckets)?;
    }
    if job.search.refine.is_some() {
        session.prepare_loss(&model, job)?;
    }
    let scratch = tempfile::Builder::new()
        .prefix(".scratch-")
        .tempdir_in(set.stage())
        .map_err(|e| Error::io(set.stage(), e))?;
    if verify {
        let t = Instant::now();
        let (fitted, more) = session.prepare_verification(
            &model,
            job,
            &database,
            table,
            scratch.path(),
            progress,
        )?;
        table = fitted;
        notes.extend(more);
        stages.profile_s += t.elapsed().as_secs_f64();
    }

    // per budget: search -> emit -> verify -> correct -> recover -> artifacts
    let mut outcomes = vec![];
    let mut budgets = vec![];
    let t_search = Instant::now();
    let (mut emit_s, mut verify_s) = (0.0, 0.0);
    for budget in &job.budgets {
        let stem = job.output_stem(budget);
        let output_name = session.output_name(&model, &stem);
        let mut runtime = BudgetRuntime {
            dest: set.stage().join(&output_name),
            model: &model,
            session: &mut session,
            job,
            emit_s: 0.0,
            verify_s: 0.0,
        };
        let mut outcome = prune_to_budget(
            &database,
            &table,
            *budget,
            &job.search,
            verify,
            &mut runtime,
        )?;
        emit_s += runtime.emit_s;
        verify_s += runtime.verify_s;
        // correct: the verified shapes re-fitted on the pruned model's own inputs, and
        // written over the verified file (the latency is the shapes', so it holds)
        if job.sequential {
            let t = Instant::now();
            let (plan, weights) = correct::correct(
                &model,
                &database,
                &outcome.search.selection,
                job.database.dampening,
                job.sequential_target,
                job.sequential_keep_choice,
                progress,
            )?;
            outcome.plan = plan;
            outcome.weights = weights;
            let dest = set.stage().join(&output_name);
            outcome.emitted = session.emit(&model, &outcome.plan, &outcome.weights, &dest)?;
            stages.correct_s += t.elapsed().as_secs_f64();
        }
        // recover: distil the verified shapes' weights, and write them in their place
        if job.recovery.is_some() {
            let t = Instant::now();
            if let Some(r) = session.recover(
                &model,
                job,
                &outcome.plan,
                &outcome.weights,
                &held_out,
                &stem,
                progress,
            )? {
                outcome.weights = r.weights;
                let dest = set.stage().join(&output_name);
                outcome.emitted = session.emit(&model, &outcome.plan, &outcome.weights, &dest)?;
                notes.push(format!("{stem}: {}", r.summary.line()));
                outcome.recovery = Some(r.summary);
            }
            stages.recover_s += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        crate::fsutil::write_json_atomic(
            &set.stage().join(format!("{stem}.plan.json")),
            &outcome.plan,
        )?;
        session.write_artifacts(&model, job, set.stage(), &stem, &outcome)?;
        emit_s += t.elapsed().as_secs_f64();
        notes.extend(report::dense_note(&database, &outcome));
        if verify {
            let t = Instant::now();
            notes.extend(session.check_served(job, &outcome)?);
            verify_s += t.elapsed().as_secs_f64();
        }
        // Where the model is once the set is committed.
        outcome.emitted.path = set.final_path(&output_name);
        budgets.push(report::budget_report(&database, &table, &outcome)?);
        outcomes.push(outcome);
    }
    session.finish();
    drop(scratch);
    stages.emit_s = emit_s;
    stages.verify_s = verify_s;
    stages.search_s = (t_search.elapsed().as_secs_f64()
        - emit_s
        - verify_s
        - stages.correct_s
        - stages.recover_s)
        .max(0.0);

    // report
    let report = PruneReport::new(
        job,
        &model.structure().architecture,
        &table,
        &database,
        stages,
        budgets,
        notes,
    );
    report.write(set.stage(), &format!("{}.report", job.display_name()))?;
    set.commit()?;
    Ok(JobRun {
        report,
        database,
        table,
        outcomes,
        model,
        session,
        held_out,
    })
}

/// Where the job's latency table comes from and how it is profiled.
fn table_request(job: &PruneJob) -> TableRequest<'_> {
    TableRequest {
        workload: &job.workload,
        settings: &job.profile,
        path: job.latency_table.as_deref(),
        verify: job.verify,
    }
}

/// The profile stage: the job's committed table completed, or a new one profiled.
fn profile_stage<S: Session>(
    job: &PruneJob,
    model: &S::Model,
    session: &S,
    database: &Database,
    progress: &dyn Progress,
) -> Result<Profiled> {
    let mut profiler = session.profiler(model, job);
    let acquired = profile::acquire_table(
        &table_request(job),
        profiler.as_mut(),
        &database.shapes(),
        progress,
    )?;
    Ok(Profiled {
        table: acquired.table,
        verify: job.verify && acquired.verify_here,
        notes: acquired.notes,
    })
}

/// The verification loop's view of a session for one budget: emits to the budget's
/// file and keeps the stage times.
struct BudgetRuntime<'a, S: Session> {
    model: &'a S::Model,
    session: &'a mut S,
    job: &'a PruneJob,
    dest: PathBuf,
    emit_s: f64,
    verify_s: f64,
}

impl<S: Session> EmitAndMeasure for BudgetRuntime<'_, S> {
    fn emit(&mut self, plan: &Plan, weights: &PrunedWeights) -> Result<EmitSummary> {
        let t = Instant::now();
        let s = self.session.emit(self.model, plan, weights, &self.dest)?;
        self.emit_s += t.elapsed().as_secs_f64();
        Ok(s)
    }
    fn measure(&mut self, emitted: &EmitSummary) -> Result<PairedTiming> {
        let t = Instant::now();
        let r = self.session.measure(self.model, self.job, emitted)?;
        self.verify_s += t.elapsed().as_secs_f64();
        Ok(r)
    }
    fn loss(&mut self, plan: &Plan, weights: &PrunedWeights) -> Option<Result<f64>> {
        self.session.loss(self.model, plan, weights)
    }
    fn refit(
        &mut self,
        selection: &Selection,
        timing: &PairedTiming,
    ) -> Option<(RuntimeFit, LatencyTable)> {
        self.session.refit(selection, timing)
    }
}
