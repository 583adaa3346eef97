//! Running a [`PruneJob`] on a Llama GGUF model: load -> calibrate -> database ->
//! profile (candle) -> search -> emit (GGUF) -> verify (mistral.rs), and the report.

use super::loss::HiddenLoss;
use super::model::{LlamaModel, LlamaOptions};
use super::profile::CandleProfiler;
use super::runtime::LoadedModel;
use crate::data::{self, tokenizer::Tokenizer, DataFormat, SampleMode};
use crate::database::Database;
use crate::error::{Error, Result};
use crate::job::{Device, PruneJob};
use crate::pipeline::{self, BudgetOutcome, EmitAndMeasure};
use crate::profile;
use crate::progress::Progress;
use crate::report::{self, PruneReport, StageTimes};
use crate::runtime_fit::{self, Point, RuntimeFit};
use crate::search::SearchProblem;
use std::path::{Path, PathBuf};
use std::time::Instant;
use ziplm_plugin_api::{
    EmitSummary, LatencyTable, ModelAdapter, Phase, Plan, PrunedWeights, Timing, Workload,
};

/// Everything a mistral.rs run produced.
pub struct MistralRun {
    /// The report (also written to the output folder).
    pub report: PruneReport,
    /// The database (reusable for more budgets).
    pub database: Database,
    /// The latency table used.
    pub table: LatencyTable,
    /// Per-budget outcomes.
    pub outcomes: Vec<BudgetOutcome>,
    /// The loaded model.
    pub model: LlamaModel,
}

/// Calibration windows held out for the SPDY loss, and their length cap.
const LOSS_SAMPLES: usize = 4;
const LOSS_TOKENS: usize = 256;
/// The prompt verification replies to (greedy, in the report).
pub const CHAT_PROMPT: &str = "What is the capital of France?";

/// The tokenizer of a job: `--tokenizer`, the model's `tokenizer.json` (in its folder or
/// next to the file), or the one in the GGUF metadata.
pub fn tokenizer_for(job: &PruneJob, model: &LlamaModel) -> Result<Tokenizer> {
    model_tokenizer(&job.model, job.tokenizer.as_deref(), model)
}

/// The tokenizer of the model at `path`: `explicit`, else a `tokenizer.json` next to
/// (or inside) it, else one built from the GGUF metadata.
pub fn model_tokenizer(
    path: &Path,
    explicit: Option<&Path>,
    model: &LlamaModel,
) -> Result<Tokenizer> {
    if let Some(p) = explicit
        .map(Path::to_path_buf)
        .or_else(|| Tokenizer::next_to(path))
    {
        return Tokenizer::from_file(&p);
    }
    let gguf = model.gguf().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: the model folder has no tokenizer.json; pass one with --tokenizer",
            path.display()
        ))
    })?;
    let inner = super::tokenizer::from_gguf(gguf).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        detail: e,
    })?;
    Tokenizer::from_tokenizer(inner, path)
}

/// Calibration windows for a job: tokenised text cut into windows, or random ids.
pub fn calibration_samples(job: &PruneJob, model: &LlamaModel) -> Result<Vec<Vec<i64>>> {
    let Some(cal) = &job.calibration else {
        return Ok(data::random_samples(
            model.weights.config.vocab,
            job.random_samples,
            job.workload.seq_len,
            job.seed,
        ));
    };
    let tok = tokenizer_for(job, model)?;
    let format = cal
        .format
        .unwrap_or_else(|| DataFormat::from_path(&cal.path));
    let texts = data::read_texts(&cal.path, format)?;
    data::make_samples(&tok, &texts, SampleMode::Windows, cal.samples, cal.seq_len)
}

/// Decode steps generated per decode timing sample.
pub const DECODE_STEPS: usize = 16;

/// Prompt ids for timing, calibration tokens repeated: the workload's `seq_len` tokens
/// for prefill, the `kv_len` tokens that fill the cache for decode.
pub fn timing_prompt(model: &LlamaModel, workload: &Workload) -> Vec<u32> {
    let pool: Vec<u32> = model
        .calibration_samples()
        .iter()
        .flatten()
        .copied()
        .collect();
    (0..prompt_len(workload))
        .map(|i| pool.get(i % pool.len().max(1)).copied().unwrap_or(1))
        .collect()
}

/// Prompt tokens a timing needs: the workload's `seq_len` for prefill, the `kv_len`
/// tokens that fill the cache for decode.
fn prompt_len(workload: &Workload) -> usize {
    match workload.phase {
        Phase::Prefill => workload.seq_len,
        Phase::Decode { kv_len } => kv_len,
    }
}

/// Times each emitted file or folder in `models` against `dense` in mistral.rs
/// ([`time_pair_loaded`]) on fixed random prompt ids (any ids time the same). Each
/// file is read by ziplm's reader first, so a corrupt or unsupported one gets ziplm's
/// clear error rather than the runtime's.
pub fn time_files(
    dense: &Path,
    models: &[PathBuf],
    workload: &Workload,
    settings: &profile::ProfileSettings,
    progress: &dyn Progress,
) -> Result<Vec<(Timing, Timing)>> {
    let llm = LlamaModel::load(dense, Default::default())?;
    check_timed_workload(workload, llm.weights.config.context_length)?;
    let prompt: Vec<u32> =
        data::random_samples(llm.weights.config.vocab, 1, prompt_len(workload), 0)
            .concat()
            .into_iter()
            .map(|i| i as u32)
            .collect();
    drop(llm);
    let dense_rt = LoadedModel::load(dense)?;
    let mut out = vec![];
    for m in models {
        drop(LlamaModel::load(m, Default::default())?);
        let rt = LoadedModel::load(m)?;
        out.push(time_pair_loaded(
            &dense_rt, &rt, &prompt, workload, settings,
        )?);
        progress.advance(1);
    }
    Ok(out)
}

/// What mistral.rs can time for a workload: one sequence; decode one token per step.
fn check_timed_workload(workload: &Workload, context: usize) -> Result<()> {
    if workload.batch != 1 {
        return Err(Error::Invalid(format!(
            "the mistralrs backend times one sequence (batch 1), the workload has batch {}",
            workload.batch
        )));
    }
    let tokens = match workload.phase {
        Phase::Prefill => workload.seq_len,
        Phase::Decode { kv_len } => {
            if workload.seq_len != 1 {
                return Err(Error::Invalid(format!(
                    "decode workloads generate one token per step (seq_len = 1), got seq_len {}",
                    workload.seq_len
                )));
            }
            kv_len + 1 + DECODE_STEPS
        }
    };
    if tokens > context {
        return Err(Error::Invalid(format!(
            "the workload needs {tokens} tokens of context, the model's context is {context}"
        )));
    }
    Ok(())
}

/// The file (`STEM.gguf`) or folder (`STEM`) name of an emitted model.
pub fn output_name(model: &LlamaModel, stem: &str) -> String {
    match model.format {
        super::model::LlmFormat::Gguf => format!("{stem}.gguf"),
        super::model::LlmFormat::Safetensors => stem.to_string(),
    }
}

/// Times two loaded models on the same prompt, alternating. Prefill: wall milliseconds
/// of a one-token request (prefill plus one sampling step). Decode: milliseconds per
/// generated token after the prompt ([`LoadedModel::decode_step`]).
pub fn time_pair_loaded(
    a: &LoadedModel,
    b: &LoadedModel,
    prompt: &[u32],
    workload: &Workload,
    settings: &profile::ProfileSettings,
) -> ziplm_plugin_api::AdapterResult<(Timing, Timing)> {
    match workload.phase {
        Phase::Prefill => {
            profile::time_alternating(settings, || a.prefill(prompt), || b.prefill(prompt))
        }
        Phase::Decode { .. } => profile::time_alternating(
            settings,
            || a.decode_step(prompt, DECODE_STEPS),
            || b.decode_step(prompt, DECODE_STEPS),
        ),
    }
}

struct Backend<'a> {
    model: &'a LlamaModel,
    loss: Option<&'a HiddenLoss>,
    job: &'a PruneJob,
    dest: PathBuf,
    dense: &'a mut Option<LoadedModel>,
    dense_path: &'a Path,
    prompt: &'a [u32],
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
        if self.dense.is_none() {
            *self.dense = Some(LoadedModel::load(self.dense_path)?);
        }
        let pruned = LoadedModel::load(&emitted.path)?;
        let dense = self.dense.as_ref().expect("loaded above");
        let r = time_pair_loaded(
            dense,
            &pruned,
            self.prompt,
            &self.job.workload,
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

/// Times the probe models of [`runtime_fit`] in mistral.rs against the dense model.
struct ProbeRuntime<'a> {
    model: &'a LlamaModel,
    database: &'a Database,
    dense: &'a LoadedModel,
    dir: &'a Path,
    prompt: &'a [u32],
    job: &'a PruneJob,
    progress: &'a dyn Progress,
}

impl ProbeRuntime<'_> {
    /// The fit and a report note, or why there is none (an error only for a failure
    /// to write or run a probe).
    fn fit(
        &self,
        problem: &SearchProblem,
    ) -> Result<std::result::Result<(RuntimeFit, String), String>> {
        let Some((ffn, attention)) = runtime_fit::probes(problem) else {
            return Ok(Err("no probe shape fits the shape constraints".into()));
        };
        let mut dense_ms = vec![];
        let mut timed = vec![];
        let probes: Vec<_> = std::iter::once(("ffn", ffn))
            .chain(attention.map(|a| ("attention", a)))
            .collect();
        self.progress.start("runtime fit", probes.len() as u64);
        for (name, sel) in probes {
            let plan = self.database.plan(&sel)?;
            let path = self
                .dir
                .join(output_name(self.model, &format!("probe-{name}")));
            self.model.emit(&plan, &PrunedWeights::default(), &path)?;
            let probe = LoadedModel::load(&path)?;
            let (d, p) = time_pair_loaded(
                self.dense,
                &probe,
                self.prompt,
                &self.job.workload,
                &self.job.verify_settings,
            )?;
            drop(probe);
            crate::fsutil::remove_model(&path);
            dense_ms.push(d.median_ms);
            timed.push((name, sel, p.median_ms / d.median_ms));
            self.progress.advance(1);
        }
        self.progress.finish();
        // One dense latency for all points; each probe as its ratio to the dense runs
        // it alternated with (drift between probes cancels).
        let m0 = dense_ms.iter().sum::<f64>() / dense_ms.len() as f64;
        let dense_sel = self.database.dense_selection();
        let dense = Point::of(problem, &dense_sel, m0);
        let points: Vec<(&str, Point)> = timed
            .iter()
            .map(|(name, sel, ratio)| (*name, Point::of(problem, sel, m0 * ratio)))
            .collect();
        let fit = match RuntimeFit::solve(dense, points[0].1, points.get(1).map(|p| p.1)) {
            Ok(f) => f,
            Err(why) => return Ok(Err(why)),
        };
        let probes: Vec<String> = points
            .iter()
            .map(|(name, p)| {
                format!(
                    "{name} probe {:.1} ms (table {:.1})",
                    p.measured_ms,
                    problem.rest_ms + p.attention_ms + p.ffn_ms
                )
            })
            .collect();
        let note = format!(
            "runtime fit: mistral.rs = {:.1} ms + {:.3} x candle attention + {:.3} x candle FFN (dense {:.1} ms, table {:.1}; {})",
            fit.rest_ms,
            fit.attention_scale,
            fit.ffn_scale,
            m0,
            problem.dense_ms(),
            probes.join(", ")
        );
        Ok(Ok((fit, note)))
    }
}

/// Runs a job end to end and writes the models (`NAME.BUDGET.gguf`, or `NAME.BUDGET/`
/// folders for safetensors) and the report into the job's output folder.
pub fn run(job: &PruneJob, progress: &dyn Progress) -> Result<MistralRun> {
    job.check_budgets()?;
    crate::fsutil::check_output_folder(&job.out_dir)?;
    if let Device::Cuda { .. } = job.device {
        return Err(Error::Invalid(
            "CUDA targets are not built into this ziplm: the mistralrs backend profiles and verifies on the CPU (target.device = \"cpu\")".into(),
        ));
    }
    job.workload.validate().map_err(Error::Invalid)?;
    let mut stages = StageTimes::default();
    let t = Instant::now();
    let mut model = LlamaModel::load(
        &job.model,
        LlamaOptions {
            gqa_policy: job.gqa_policy,
            output_dtype: job.gguf_dtype,
            format: job.llm_format,
            tokenizer_json: job.tokenizer.clone(),
        },
    )?;
    stages.load_s = t.elapsed().as_secs_f64();
    check_timed_workload(&job.workload, model.weights.config.context_length)?;
    let samples = calibration_samples(job, &model)?;
    model.set_calibration(samples)?;
    let database = Database::build(&mut model, &job.database, progress)?;
    stages.calibrate_s = database.timings.calibrate_s;
    stages.database_s = database.timings.database_s;

    let t = Instant::now();
    let mut notes = vec![format!(
        "latencies: blocks timed with candle {} kernels ({} threads); verification times whole models in mistral.rs ({})",
        super::profile::CANDLE_VERSION,
        super::profile::candle_threads(),
        match job.workload.phase {
            Phase::Prefill => "wall time of a one-token request on the prompt".to_string(),
            Phase::Decode { .. } => format!(
                "per generated token: wall time of 1 + {DECODE_STEPS} tokens minus 1 token after the prompt, over the tokens generated"
            ),
        }
    )];
    let acquired = {
        let mut profiler = CandleProfiler::new(&model, job.gguf_dtype);
        profile::acquire_table(job, &mut profiler, &database.shapes(), progress)?
    };
    let verify = job.verify && acquired.verify_here;
    notes.extend(acquired.notes);
    let mut table = acquired.table;
    stages.profile_s = t.elapsed().as_secs_f64();

    // Every budget is checked before anything is written.
    let problem = database.search_problem(&table)?;
    for budget in &job.budgets {
        problem.solve(*budget, &[], job.search.buckets)?;
    }
    let loss = match job.search.refine {
        Some(_) => Some(HiddenLoss::new(&model, LOSS_SAMPLES, LOSS_TOKENS)?),
        None => None,
    };
    std::fs::create_dir_all(&job.out_dir).map_err(|e| Error::io(&job.out_dir, e))?;
    // The dense model through the same emitter (same tensor types), for timing.
    let scratch = tempfile::Builder::new()
        .prefix(".ziplm-dense-")
        .tempdir_in(&job.out_dir)
        .map_err(|e| Error::io(&job.out_dir, e))?;
    let dense_path = scratch.path().join(output_name(&model, "dense"));
    if verify {
        model.emit(
            &Plan::dense(model.structure()),
            &PrunedWeights::default(),
            &dense_path,
        )?;
    }
    let prompt = timing_prompt(&model, &job.workload);
    let mut dense_loaded: Option<LoadedModel> = None;
    if verify && job.runtime_fit {
        let t = Instant::now();
        let dense = LoadedModel::load(&dense_path)?;
        let probe = ProbeRuntime {
            model: &model,
            database: &database,
            dense: &dense,
            dir: scratch.path(),
            prompt: &prompt,
            job,
            progress,
        };
        match probe.fit(&problem)? {
            Ok((fit, note)) => {
                // A fit from two noisy probes must not turn a budget the table can
                // meet into an error: then verification decides, as without a fit.
                let fitted_table = runtime_fit::apply(&table, &fit);
                let fitted = database.search_problem(&fitted_table)?;
                let refused = job
                    .budgets
                    .iter()
                    .find_map(|b| fitted.solve(*b, &[], job.search.buckets).err());
                match refused {
                    None => {
                        table = fitted_table;
                        notes.push(note);
                    }
                    Some(e) => notes.push(format!(
                        "{note}; not used: with it {e}; the searches use the candle table as it is"
                    )),
                }
            }
            Err(why) => notes.push(format!(
                "runtime fit skipped ({why}); the searches use the candle table as it is"
            )),
        }
        dense_loaded = Some(dense);
        stages.profile_s += t.elapsed().as_secs_f64();
    }
    let mut outcomes = vec![];
    let mut budgets = vec![];
    let t_search = Instant::now();
    let (mut emit_s, mut verify_s) = (0.0, 0.0);
    for budget in &job.budgets {
        let dest = job
            .out_dir
            .join(output_name(&model, &job.output_stem(budget)));
        let mut backend = Backend {
            model: &model,
            loss: loss.as_ref(),
            job,
            dest,
            dense: &mut dense_loaded,
            dense_path: &dense_path,
            prompt: &prompt,
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
        let plan_path = job
            .out_dir
            .join(format!("{}.plan.json", job.output_stem(budget)));
        crate::fsutil::write_json_atomic(&plan_path, &outcome.plan)?;
        notes.extend(report::dense_note(&database, &outcome));
        if verify {
            let t = Instant::now();
            let label = PruneJob::budget_label(budget);
            match LoadedModel::load(&outcome.emitted.path)?.chat(CHAT_PROMPT, 24) {
                Ok(reply) => notes.push(format!(
                    "{label}: mistral.rs reply to {CHAT_PROMPT:?}: {:?}",
                    reply.text
                )),
                // A model without a chat template still serves raw prompts.
                Err(e) if e.to_string().contains("chat template") => notes.push(format!(
                    "{label}: no chat reply (the model has no chat template)"
                )),
                Err(e) => return Err(e.into()),
            }
            verify_s += t.elapsed().as_secs_f64();
        }
        budgets.push(report::budget_report(&database, &table, &outcome)?);
        outcomes.push(outcome);
    }
    drop(dense_loaded);
    drop(scratch);
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
    Ok(MistralRun {
        report,
        database,
        table,
        outcomes,
        model,
    })
}
