//! The mistral.rs backend in the pipeline: [`MistralSession`] (a Llama GGUF file or
//! Hugging Face folder loaded for one job: blocks profiled with candle, models emitted
//! as GGUF or safetensors, verified in mistral.rs) and [`MistralBackend`], its entry in
//! the backend registry.

use super::loss::HiddenLoss;
use super::model::{LlamaModel, LlamaOptions};
use super::options::MistralOptions;
use super::profile::CandleProfiler;
use super::runtime::LoadedModel;
use crate::backend::{Backend, ProfileRequest, TimedFile};
use crate::data::{self, tokenizer::Tokenizer};
use crate::database::Database;
use crate::error::{Error, Result};
use crate::job::{Device, OptionSpec, PruneJob};
use crate::pipeline::{self, BudgetOutcome, JobRun, Session};
use crate::profile::{self, ProfileSettings};
use crate::progress::Progress;
use crate::report::PruneReport;
use crate::runtime_fit::{self, Point, Refit, RuntimeFit};
use crate::search::SearchProblem;
use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{
    EmitSummary, LatencyProfiler, LatencyTable, ModelAdapter, ModelStructure, PairedTiming, Phase,
    Plan, PrunedWeights, Workload,
};

/// A mistral.rs run's results (with the loaded [`LlamaModel`]).
pub type MistralRun = JobRun<MistralSession>;

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
///
/// A GGUF model whose projections are stored in another tensor type than the dense
/// file's is timed against the dense model emitted unpruned in the model's type (as
/// verification times it): mistral.rs runs each type with its own kernels (a Q4_1
/// SmolLM2-135M took 15.7x its F32 form's time for a 512-token prefill on a 2-vCPU
/// EPYC), so the file as it is would time the tensor type, not the pruning (a type
/// ziplm does not write is timed against the file as it is, with a note saying so;
/// a folder's types are not compared).
pub fn time_files(
    dense: &Path,
    models: &[PathBuf],
    workload: &Workload,
    settings: &profile::ProfileSettings,
    progress: &dyn Progress,
) -> Result<Vec<TimedFile>> {
    let llm = LlamaModel::load(dense, Default::default())?;
    check_timed_workload(workload, llm.weights.config.context_length)?;
    let prompt: Vec<u32> =
        data::random_samples(llm.weights.config.vocab, 1, prompt_len(workload), 0)
            .concat()
            .into_iter()
            .map(|i| i as u32)
            .collect();
    let dense_type = llm.projection_type();
    drop(llm);
    // Beside the models (a dense copy is as large as the dense model), else in the
    // system's temporary folder.
    let beside = models
        .first()
        .and_then(|m| m.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = tempfile::Builder::new()
        .prefix(".ziplm-speedup-")
        .tempdir_in(beside)
        .or_else(|_| tempfile::tempdir())
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    // The dense model as each model's tensor type needs it (keyed by that type when
    // it differs from the dense file's): the file itself, or emitted in the type.
    let mut dense_runs: Vec<(Option<GgmlDType>, LoadedModel, Option<String>)> = vec![];
    let mut out = vec![];
    for m in models {
        let model_type = LlamaModel::load(m, Default::default())?.projection_type();
        let (key, emitted_as) = match (dense_type, model_type) {
            (Some(d), Some(t)) if d != t => (Some(t), Some((d, t))),
            _ => (None, None),
        };
        let i = match dense_runs.iter().position(|(k, _, _)| *k == key) {
            Some(i) => i,
            None => {
                dense_runs.push(match emitted_as {
                    None => (key, LoadedModel::load(dense)?, None),
                    Some((d, t)) => {
                        let (rt, note) = dense_emitted_as(dense, d, t, scratch.path())?;
                        (key, rt, Some(note))
                    }
                });
                dense_runs.len() - 1
            }
        };
        let (_, dense_rt, note) = &dense_runs[i];
        let rt = LoadedModel::load(m)?;
        out.push(TimedFile {
            timing: time_pair_loaded(dense_rt, &rt, &prompt, workload, settings)?,
            dense_as: note.clone(),
        });
        progress.advance(1);
    }
    Ok(out)
}

/// The dense model emitted unpruned with its projections in `as_type` (the type of
/// the model timed), loaded in mistral.rs, and the note that says so. A type ziplm
/// does not write (a model quantized by another tool) is timed against the dense file
/// as it is, and the note says that the ratio includes the two types' kernels.
fn dense_emitted_as(
    dense: &Path,
    dense_type: GgmlDType,
    as_type: GgmlDType,
    scratch: &Path,
) -> Result<(LoadedModel, String)> {
    let Some(output_dtype) = super::emit::output_dtype_of(as_type) else {
        let note = format!(
            "{} stores its projections as {dense_type:?} and this model as {as_type:?}, a type ziplm does not write: timed against the dense file as it is, so the speedup includes the two types' kernels (give a dense model stored as {as_type:?} to time the pruning alone)",
            dense.display()
        );
        return Ok((LoadedModel::load(dense)?, note));
    };
    let llm = LlamaModel::load(
        dense,
        LlamaOptions {
            output_dtype,
            ..Default::default()
        },
    )?;
    let path = scratch.join(output_name(&llm, &format!("dense-{as_type:?}")));
    llm.emit(
        &Plan::dense(llm.structure()),
        &PrunedWeights::default(),
        &path,
    )?;
    drop(llm);
    let note = format!(
        "{} stores its projections as {dense_type:?} and this model as {as_type:?}, which mistral.rs runs with other kernels: timed against the dense model emitted unpruned as {as_type:?}, as verification times it",
        dense.display()
    );
    Ok((LoadedModel::load(&path)?, note))
}

/// Refuses GPU targets: mistral.rs's CUDA build needs nvcc when it is built, which
/// ziplm's build does not assume.
fn check_cpu(device: Device) -> Result<()> {
    match device {
        Device::Cuda { .. } => Err(Error::Invalid(
            "CUDA targets are for ONNX models (tract's CUDA runtime): the mistralrs backend profiles and verifies GGUF and safetensors models on the CPU; drop --cuda / target.cuda (mistral.rs's own CUDA build needs nvcc when it is built)".into(),
        )),
        Device::Cpu { .. } => Ok(()),
    }
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
) -> ziplm_plugin_api::AdapterResult<PairedTiming> {
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

/// The probes' runtime fit, its report note and its points (the dense model first),
/// read against `dense_ms`, from which a [`Refit`] starts.
struct ProbeFit {
    fit: RuntimeFit,
    note: String,
    points: Vec<Point>,
    dense_ms: f64,
    /// No attention probe: one scale for both kinds of block.
    tied: bool,
}

impl ProbeRuntime<'_> {
    /// The fit with its note and points, or why there is none (an error only for a
    /// failure to write or run a probe).
    fn fit(&self, problem: &SearchProblem) -> Result<std::result::Result<ProbeFit, String>> {
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
            let t = time_pair_loaded(
                self.dense,
                &probe,
                self.prompt,
                &self.job.workload,
                &self.job.verify_settings,
            )?;
            drop(probe);
            crate::fsutil::remove_model(&path);
            dense_ms.push(t.dense.median_ms);
            timed.push((name, sel, runtime_fit::saving(t.speedup), t.rounds.len()));
            self.progress.advance(1);
        }
        self.progress.finish();
        // One dense latency for all points; each probe as its ratio to the dense runs
        // it alternated with (drift between probes cancels).
        let m0 = dense_ms.iter().sum::<f64>() / dense_ms.len() as f64;
        let dense_sel = self.database.dense_selection();
        let dense = Point::of(problem, &dense_sel, m0);
        let points: Vec<(&str, Point, f64, usize)> = timed
            .iter()
            .map(|(name, sel, saving, rounds)| {
                let point = Point::of(problem, sel, m0 * (1.0 - saving));
                (*name, point, *saving, *rounds)
            })
            .collect();
        let fit = match RuntimeFit::solve(dense, points[0].1, points.get(1).map(|p| p.1)) {
            Ok(f) => f,
            Err(why) => return Ok(Err(why)),
        };
        let probes: Vec<String> = points
            .iter()
            .map(|(name, p, saving, rounds)| {
                format!(
                    "{name} probe {:.1} ms (table {:.1}; saves {:.1}% in {rounds} rounds)",
                    p.measured_ms,
                    problem.rest_ms + p.attention_ms + p.ffn_ms,
                    100.0 * saving
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
        Ok(Ok(ProbeFit {
            fit,
            note,
            points: std::iter::once(dense)
                .chain(points.iter().map(|p| p.1))
                .collect(),
            dense_ms: m0,
            tied: points.len() < 2,
        }))
    }
}

/// The mistral.rs backend's state for one job beside its [`LlamaModel`]: the loss and
/// what verification loads.
pub struct MistralSession {
    options: MistralOptions,
    loss: Option<HiddenLoss>,
    /// The dense model as emitted (same tensor types), loaded in mistral.rs.
    dense: Option<LoadedModel>,
    dense_path: PathBuf,
    prompt: Vec<u32>,
    /// The recovery's teacher (`RecoverySettings::teacher`), loaded and matched to the
    /// model when the job opens, so that a wrong one fails before any work.
    teacher: Option<Teacher>,
    /// The runtime fit, solved again with each verified model (`refit` option).
    refit: Option<Refit>,
}

/// A recovery teacher: the model, its path and the teacher layer of each layer of the
/// model pruned ([`super::recovery::layers_in_teacher`]).
struct Teacher {
    path: PathBuf,
    model: LlamaModel,
    layers: Vec<usize>,
}

impl MistralSession {
    /// Loads the job's model (CPU targets only; the workload must be one mistral.rs can
    /// time on this model).
    pub fn open(job: &PruneJob) -> Result<(LlamaModel, MistralSession)> {
        check_llm_source(&job.model)?;
        check_cpu(job.device)?;
        match job.device {
            Device::Cuda { .. } => {}
            // candle and mistral.rs size their thread pools once per process.
            // The default is candle's pool; any other count is refused, not ignored.
            Device::Cpu { threads } if threads != super::profile::candle_threads() => {
                return Err(Error::Invalid(format!(
                    "--threads {threads}: the mistralrs backend runs on candle's thread pool, {} threads in this process; set RAYON_NUM_THREADS={threads} to time on {threads} threads",
                    super::profile::candle_threads()
                )))
            }
            Device::Cpu { .. } => {}
        }
        job.workload.validate().map_err(Error::Invalid)?;
        let options = MistralOptions::of(&job.options)?;
        let model = LlamaModel::load(
            &job.model,
            LlamaOptions {
                gqa_policy: job.gqa_policy,
                output_dtype: options.gguf_dtype,
                format: options.llm_format,
                tokenizer_json: job.tokenizer.clone(),
            },
        )?;
        check_timed_workload(&job.workload, model.weights.config.context_length)?;
        let teacher = match job.recovery.as_ref().and_then(|r| r.teacher.clone()) {
            None => None,
            Some(path) => {
                let t = LlamaModel::load(&path, LlamaOptions::default())?;
                let layers = super::recovery::layers_in_teacher(&t.weights, &model.weights)?;
                Some(Teacher {
                    path,
                    model: t,
                    layers,
                })
            }
        };
        Ok((
            model,
            MistralSession {
                options,
                loss: None,
                dense: None,
                dense_path: PathBuf::new(),
                prompt: vec![],
                teacher,
                refit: None,
            },
        ))
    }

    /// The dense model in mistral.rs, loaded on first use.
    /// Writes `model` unpruned through the same emitter (same tensor types) into
    /// `scratch` as the model [`Session::measure`] times against, and the prompt.
    fn prepare_timing(&mut self, model: &LlamaModel, job: &PruneJob, scratch: &Path) -> Result<()> {
        self.dense_path = scratch.join(output_name(model, "dense"));
        model.emit(
            &Plan::dense(model.structure()),
            &PrunedWeights::default(),
            &self.dense_path,
        )?;
        self.prompt = timing_prompt(model, &job.workload);
        Ok(())
    }

    fn dense(&mut self) -> Result<&LoadedModel> {
        if self.dense.is_none() {
            self.dense = Some(LoadedModel::load(&self.dense_path)?);
        }
        Ok(self.dense.as_ref().expect("loaded above"))
    }
}

impl Session for MistralSession {
    type Model = LlamaModel;

    fn embedded_tokenizer(&self, model: &LlamaModel, job: &PruneJob) -> Option<Result<Tokenizer>> {
        Some(model_tokenizer(&job.model, None, model))
    }
    fn self_chat(
        &self,
        model: &LlamaModel,
        job: &PruneJob,
        tokens: usize,
        progress: &dyn Progress,
    ) -> Result<Vec<crate::data::self_chat::Transcript>> {
        // A recovery teacher writes the chat: the model pruned may be a pruned one.
        let (path, writer) = match &self.teacher {
            Some(t) => (t.path.as_path(), &t.model),
            None => (job.model.as_path(), model),
        };
        super::self_chat::transcripts(
            path,
            writer,
            tokens,
            &crate::data::self_chat::cache_folder(),
            super::self_chat::BATCH,
            progress,
        )
    }
    fn chats(&self, model: &LlamaModel, job: &PruneJob) -> bool {
        super::self_chat::has_chat_template(&job.model, model)
    }
    fn notes(&self, job: &PruneJob) -> Vec<String> {
        vec![format!(
            "latencies: blocks timed with candle {} kernels ({} threads); verification times whole models in mistral.rs ({})",
            super::profile::CANDLE_VERSION,
            super::profile::candle_threads(),
            match job.workload.phase {
                Phase::Prefill => "wall time of a one-token request on the prompt".to_string(),
                Phase::Decode { .. } => format!(
                    "per generated token: wall time of 1 + {DECODE_STEPS} tokens minus 1 token after the prompt, over the tokens generated"
                ),
            }
        )]
    }
    fn profiler<'a>(
        &'a self,
        model: &'a LlamaModel,
        _job: &PruneJob,
    ) -> Box<dyn LatencyProfiler + 'a> {
        Box::new(CandleProfiler::new(model, self.options.gguf_dtype))
    }
    fn recover(
        &mut self,
        model: &LlamaModel,
        job: &PruneJob,
        plan: &Plan,
        weights: &PrunedWeights,
        held_out: &[Vec<i64>],
        stem: &str,
        progress: &dyn Progress,
    ) -> Result<Option<crate::pipeline::Recovered>> {
        let Some(settings) = &job.recovery else {
            return Ok(None);
        };
        let held = model.token_windows(held_out)?;
        let pruned = super::model::prune(&model.weights, model.structure(), plan, weights)?;
        let kept = super::recovery::kept_layers(model.structure(), plan);
        // A teacher (prune -> recover -> prune): the kept layers as the teacher's.
        let (teacher, kept_in_teacher) = match &self.teacher {
            None => (&model.weights, kept.clone()),
            Some(t) => (
                &t.model.weights,
                kept.iter().map(|&l| t.layers[l]).collect(),
            ),
        };
        let checkpoint = crate::outputs::recovery_checkpoint(&job.out_dir, stem);
        let (student, summary) = super::recovery::recover(
            teacher,
            &pruned,
            &kept_in_teacher,
            model.calibration_samples(),
            &held,
            settings,
            job.seed,
            Some(&checkpoint),
            progress,
        )?;
        let weights = super::recovery::as_pruned_weights(&student, model.structure(), plan)?;
        Ok(Some(crate::pipeline::Recovered { weights, summary }))
    }
    fn prepare_loss(&mut self, model: &LlamaModel, _job: &PruneJob) -> Result<()> {
        self.loss = Some(HiddenLoss::new(model, LOSS_SAMPLES, LOSS_TOKENS)?);
        Ok(())
    }
    fn loss(
        &self,
        model: &LlamaModel,
        plan: &Plan,
        weights: &PrunedWeights,
    ) -> Option<Result<f64>> {
        let loss = self.loss.as_ref()?;
        Some(loss.loss(model, plan, weights).map_err(Into::into))
    }
    fn prepare_verification(
        &mut self,
        model: &LlamaModel,
        job: &PruneJob,
        database: &Database,
        table: LatencyTable,
        scratch: &Path,
        progress: &dyn Progress,
    ) -> Result<(LatencyTable, Vec<String>)> {
        self.prepare_timing(model, job, scratch)?;
        if !self.options.runtime_fit {
            return Ok((table, vec![]));
        }
        let problem = database.search_problem(&table)?;
        self.dense()?;
        let probe = ProbeRuntime {
            model,
            database,
            dense: self.dense.as_ref().expect("loaded above"),
            dir: scratch,
            prompt: &self.prompt,
            job,
            progress,
        };
        Ok(match probe.fit(&problem)? {
            Ok(ProbeFit {
                fit,
                note,
                points,
                dense_ms,
                tied,
            }) => {
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
                        if self.options.refit {
                            self.refit = Some(Refit::new(table, problem, dense_ms, points, tied));
                        }
                        (fitted_table, vec![note])
                    }
                    Some(e) => (
                        table,
                        vec![format!(
                        "{note}; not used: with it {e}; the searches use the candle table as it is"
                    )],
                    ),
                }
            }
            Err(why) => (
                table,
                vec![format!(
                    "runtime fit skipped ({why}); the searches use the candle table as it is"
                )],
            ),
        })
    }
    fn refit(
        &mut self,
        selection: &crate::search::Selection,
        timing: &PairedTiming,
    ) -> Option<(RuntimeFit, LatencyTable)> {
        self.refit.as_mut()?.add(selection, timing.speedup).ok()
    }
    fn output_name(&self, model: &LlamaModel, stem: &str) -> String {
        output_name(model, stem)
    }
    fn measure(
        &mut self,
        _model: &LlamaModel,
        job: &PruneJob,
        emitted: &EmitSummary,
    ) -> Result<PairedTiming> {
        self.dense()?;
        let pruned = LoadedModel::load(&emitted.path)?;
        let dense = self.dense.as_ref().expect("loaded above");
        Ok(time_pair_loaded(
            dense,
            &pruned,
            &self.prompt,
            &job.workload,
            &job.verify_settings,
        )?)
    }
    fn time_against_dense(
        &mut self,
        model: &LlamaModel,
        job: &PruneJob,
        models: &[PathBuf],
        scratch: &Path,
    ) -> Result<Option<Vec<PairedTiming>>> {
        self.prepare_timing(model, job, scratch)?;
        let mut timings = vec![];
        for path in models {
            let emitted = EmitSummary {
                path: path.clone(),
                bytes: 0,
                params_before: 0,
                params_after: 0,
            };
            timings.push(self.measure(model, job, &emitted)?);
        }
        self.finish();
        Ok(Some(timings))
    }
    fn check_served(&mut self, _job: &PruneJob, outcome: &BudgetOutcome) -> Result<Vec<String>> {
        let label = PruneJob::budget_label(&outcome.budget);
        match LoadedModel::load(&outcome.emitted.path)?.chat(CHAT_PROMPT, 24) {
            Ok(reply) => Ok(vec![format!(
                "{label}: mistral.rs reply to {CHAT_PROMPT:?}: {:?}",
                reply.text
            )]),
            // A model without a chat template still serves raw prompts.
            Err(e) if e.to_string().contains("chat template") => Ok(vec![format!(
                "{label}: no chat reply (the model has no chat template)"
            )]),
            Err(e) => Err(e.into()),
        }
    }
    fn finish(&mut self) {
        self.dense = None;
    }
}

/// Runs a job with mistral.rs end to end (see [`pipeline::run`]): writes the models
/// (`NAME.BUDGET.gguf`, or `NAME.BUDGET/` folders for safetensors) and the report.
pub fn run(job: &PruneJob, progress: &dyn Progress) -> Result<MistralRun> {
    pipeline::run(job, MistralSession::open, progress)
}

/// A GGUF file or a model folder; anything else gets a clear error.
fn check_llm_source(model: &Path) -> Result<()> {
    if crate::backend::is_llm_path(model) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{}: not a model ziplm knows (give an .onnx file, a .gguf file, or a Hugging Face folder with config.json and model.safetensors)",
            model.display()
        )))
    }
}

/// The mistral.rs backend: Llama-family GGUF files and Hugging Face folders.
pub struct MistralBackend;

impl Backend for MistralBackend {
    fn name(&self) -> &'static str {
        "mistralrs"
    }
    fn takes(&self, model: &Path) -> bool {
        crate::backend::is_llm_path(model)
    }
    fn profile_settings(&self) -> ProfileSettings {
        crate::backend::llm_profile_settings()
    }
    fn run(&self, job: &PruneJob, progress: &dyn Progress) -> Result<PruneReport> {
        if job.recovery.as_ref().is_some_and(|r| r.chain) {
            return pipeline::chain::run(job, MistralSession::open, progress);
        }
        Ok(run(job, progress)?.report)
    }
    fn models(&self) -> &'static str {
        crate::backend::LLM_MODELS
    }
    fn options(&self) -> &'static [OptionSpec] {
        crate::backend::LLM_OPTIONS
    }
    fn calibration_seq_len(&self) -> usize {
        crate::backend::LLM_CALIBRATION_SEQ_LEN
    }
    fn recovers(&self) -> bool {
        true
    }
    fn writes_chat(&self) -> bool {
        true
    }
    fn output_format(&self, format: &str) -> Option<Vec<(&'static str, &'static str)>> {
        crate::backend::llm_output_format(format)
    }
    fn default_threads(&self) -> usize {
        super::profile::candle_threads()
    }
    fn time_files(
        &self,
        dense: &Path,
        models: &[PathBuf],
        workload: &Workload,
        device: Device,
        settings: &ProfileSettings,
        progress: &dyn Progress,
    ) -> Result<Vec<TimedFile>> {
        check_cpu(device)?;
        time_files(dense, models, workload, settings, progress)
    }
    fn structure(&self, model: &Path, _workload: &Workload) -> Result<ModelStructure> {
        check_llm_source(model)?;
        let m = LlamaModel::load(model, Default::default())?;
        Ok(m.structure().clone())
    }
    fn profile(
        &self,
        model: &Path,
        request: &ProfileRequest,
        progress: &dyn Progress,
    ) -> Result<LatencyTable> {
        check_llm_source(model)?;
        check_cpu(request.device)?;
        let options = MistralOptions::of(request.options)?;
        let m = LlamaModel::load(
            model,
            LlamaOptions {
                gqa_policy: request.gqa_policy,
                output_dtype: options.gguf_dtype,
                ..Default::default()
            },
        )?;
        // The workloads a prune job of this model can time (one sequence, within the
        // context), so no table is built for one it could not use.
        check_timed_workload(&request.workload, m.weights.config.context_length)?;
        let shapes = crate::database::grid_shapes(m.structure(), request.grid);
        let mut profiler = CandleProfiler::new(&m, options.gguf_dtype);
        profile::build_table(
            &mut profiler,
            &request.workload,
            &shapes,
            &request.settings,
            request.reuse,
            progress,
        )
    }
}
