//! The raw job every front end lowers into, and the one step that resolves it
//! (ripgrep's LowArgs -> HiArgs).
//!
//! The CLI's flags and a serving config's tables (`ziplm.toml`, `[package.metadata.ziplm]`)
//! both become a [`JobRequest`]: values as the user wrote them, `None` where they wrote
//! nothing. [`JobRequest::resolve`] makes every check, once, and names the flag or the
//! config key the user wrote ([`Origin`] spells each [`Field`]).

use super::{BackendKind, BackendOptions, Device, PruneJob, RecoverySettings};
use crate::data::{CalibrationData, CalibrationSource, DataFormat};
use crate::error::{Error, Result};
use crate::search::spdy::RefineConfig;
use crate::search::Budget;
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{GqaPolicy, Phase, Workload};

/// The most verified searches after the first a job may ask for.
pub const MAX_RETRIES: usize = 16;

/// The most extra timings a measurement may get (each times two models again).
pub const MAX_EXTRA_TIMINGS: usize = 8;

/// Where a request came from, for messages.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// Command-line flags.
    Cli,
    /// One `[[model]]` table of a serving config.
    Config {
        /// The config file.
        file: PathBuf,
        /// The model's name or source, as the table gives it.
        model: String,
    },
}

/// The values of a request that are checked, by what they mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The model file or folder.
    Model,
    /// The outputs' name.
    Name,
    /// The backend's name.
    Backend,
    /// The tokenizer file.
    Tokenizer,
    /// CPU threads.
    Threads,
    /// CUDA device.
    Cuda,
    /// Sequences per call.
    Batch,
    /// Tokens per sequence.
    SeqLen,
    /// Prefill or decode.
    Phase,
    /// Cached tokens of a decode step.
    KvLen,
    /// A speedup budget.
    Speedup,
    /// A latency budget.
    LatencyMs,
    /// The calibration file.
    Calibration,
    /// Calibration samples.
    Samples,
    /// Tokens per calibration sample.
    CalibrationSeqLen,
    /// Timed runs per shape.
    Runs,
    /// Verified searches after the first.
    Retries,
    /// Timings after the first of an undecided measurement.
    ExtraTimings,
    /// The FFN width grid.
    FfnMultiple,
    /// The largest fraction of an FFN removed.
    MaxFfnRemoved,
    /// The output format.
    OutputFormat,
    /// The recovery stage's settings.
    Recovery,
    /// The model recovery distils towards.
    Teacher,
    /// Budgets pruned as a chain.
    Chain,
    /// Sequential correction.
    Sequential,
    /// Its target.
    SequentialTarget,
    /// Keeping the database's choice in it.
    SequentialKeepChoice,
    /// A chat model's own chat beside its calibration text.
    SelfChat,
}

impl Field {
    /// How the CLI and a serving config spell the field.
    fn spellings(self) -> (&'static str, &'static str) {
        match self {
            Field::Model => ("MODEL", "source"),
            Field::Name => ("the name", "name"),
            Field::Backend => ("the backend", "backend"),
            Field::Tokenizer => ("--tokenizer", "tokenizer"),
            Field::Threads => ("--threads", "target.threads"),
            Field::Cuda => ("--cuda", "target.cuda"),
            Field::Batch => ("--batch", "workload.batch"),
            Field::SeqLen => ("--seq-len", "workload.seq_len"),
            Field::Phase => ("the phase", "workload.phase"),
            Field::KvLen => ("--decode-kv-len", "workload.kv_len"),
            Field::Speedup => ("--speedup", "budget.speedup"),
            Field::LatencyMs => ("--latency-ms", "budget.latency_ms"),
            Field::Calibration => ("--calibration", "calibration.path"),
            Field::Samples => ("--samples", "calibration.samples"),
            Field::CalibrationSeqLen => ("--calibration-seq-len", "calibration.seq_len"),
            Field::Runs => ("--runs", "profile.runs"),
            Field::Retries => ("--retries", "pruning.retries"),
            Field::ExtraTimings => ("--extra-timings", "profile.extra_timings"),
            Field::FfnMultiple => ("--ffn-multiple", "pruning.ffn_multiple"),
            Field::MaxFfnRemoved => ("--max-ffn-removed", "pruning.max_ffn_removed"),
            Field::OutputFormat => ("the output format", "output.format"),
            Field::Recovery => ("--recover", "recovery"),
            Field::Teacher => ("--teacher", "recovery.teacher"),
            Field::Chain => ("--chain", "recovery.chain = true"),
            Field::Sequential => ("--sequential", "pruning.sequential = true"),
            Field::SequentialTarget => ("--sequential-target", "pruning.sequential_target"),
            Field::SequentialKeepChoice => {
                ("--sequential-keep-choice", "pruning.sequential_keep_choice")
            }
            Field::SelfChat => ("--no-self-chat", "calibration.self_chat = false"),
        }
    }
}

impl Origin {
    /// How this front end spells `field`.
    pub fn spell(&self, field: Field) -> &'static str {
        let (cli, config) = field.spellings();
        match self {
            Origin::Cli => cli,
            Origin::Config { .. } => config,
        }
    }

    /// An error about the request, in this front end's terms (a config error names the
    /// file and the model).
    pub fn error(&self, detail: impl Into<String>) -> Error {
        match self {
            Origin::Cli => Error::Invalid(detail.into()),
            Origin::Config { file, model } => Error::Format {
                path: file.clone(),
                detail: format!("model `{model}`: {}", detail.into()),
            },
        }
    }
}

/// A backend option as given: `gguf_dtype = "q8_0"`, spelled `--gguf-dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct RawOption {
    /// The option's name ([`crate::job::OptionSpec::name`]).
    pub name: String,
    /// Its value.
    pub value: String,
    /// How the user wrote it (for messages).
    pub spelled: String,
}

/// A job as a front end received it: every value optional, nothing checked yet.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRequest {
    /// Where it came from.
    pub origin: Origin,
    /// The model file or folder.
    pub model: Option<PathBuf>,
    /// The outputs' name (default: the model's file stem).
    pub name: Option<String>,
    /// A backend by name (default: the one that reads the model).
    pub backend: Option<String>,
    /// The tokenizer (default: next to the model).
    pub tokenizer: Option<PathBuf>,
    /// Seed for sampling and refinement (default 0).
    pub seed: Option<u64>,
    /// CPU threads (default: the backend's).
    pub threads: Option<usize>,
    /// A CUDA device instead of the CPU.
    pub cuda: Option<usize>,
    /// Sequences per call (default 1).
    pub batch: Option<usize>,
    /// Tokens per sequence (default 128).
    pub seq_len: Option<usize>,
    /// `prefill` or `decode` (default: decode when `kv_len` is given).
    pub phase: Option<String>,
    /// Cached tokens of a decode step.
    pub kv_len: Option<usize>,
    /// Speedup budgets.
    pub speedup: Vec<f64>,
    /// Latency budgets (ms).
    pub latency_ms: Vec<f64>,
    /// Calibration data: files and `self` / `self:N`, the samples split between them.
    pub calibration: Vec<PathBuf>,
    /// Its format (default: from the extension).
    pub calibration_format: Option<DataFormat>,
    /// Calibration samples (default 256; random ones: at most 64).
    pub samples: Option<usize>,
    /// Tokens per calibration sample (default 128).
    pub calibration_seq_len: Option<usize>,
    /// Output folder (default `ziplm-out`).
    pub out: Option<PathBuf>,
    /// Latency table to reuse and update.
    pub latency_table: Option<PathBuf>,
    /// Timed runs per shape (default: the backend's).
    pub runs: Option<usize>,
    /// Time the emitted models end to end (default true).
    pub verify: Option<bool>,
    /// FFN widths kept are multiples of this (default 32).
    pub ffn_multiple: Option<usize>,
    /// Largest fraction of an FFN removed short of dropping it (default 1).
    pub max_ffn_removed: Option<f64>,
    /// GQA head removal (default: whole KV groups).
    pub gqa: Option<GqaPolicy>,
    /// SPDY evaluations per search (default 32; 0 = off).
    pub refine: Option<usize>,
    /// Verified searches after the first (default 3).
    pub retries: Option<usize>,
    /// Timings a verified model gets after its first while its ~95% interval
    /// straddles the budget, rounds pooled (default 2).
    pub extra_timings: Option<usize>,
    /// A named output format (config `output.format`), standing for backend options.
    pub output_format: Option<String>,
    /// Backend options.
    pub options: Vec<RawOption>,
    /// Distil each pruned model towards the dense one (the gradual mode).
    pub recovery: Option<RecoverySettings>,
    /// Sequential correction after each search (default false).
    pub sequential: Option<bool>,
    /// What it fits each block to (default: the residual target).
    pub sequential_target: Option<crate::pipeline::correct::SequentialTarget>,
    /// Sequential correction re-fits the database's choice instead of re-choosing.
    pub sequential_keep_choice: Option<bool>,
    /// A chat model calibrated on data files also calibrates on a share of its own chat
    /// transcripts (default true; [`PruneJob::chat_calibration`]).
    pub self_chat: Option<bool>,
}

impl JobRequest {
    /// An empty request from `origin`.
    pub fn new(origin: Origin) -> JobRequest {
        JobRequest {
            origin,
            model: None,
            name: None,
            backend: None,
            tokenizer: None,
            seed: None,
            threads: None,
            cuda: None,
            batch: None,
            seq_len: None,
            phase: None,
            kv_len: None,
            speedup: vec![],
            latency_ms: vec![],
            calibration: vec![],
            calibration_format: None,
            samples: None,
            calibration_seq_len: None,
            out: None,
            latency_table: None,
            runs: None,
            verify: None,
            ffn_multiple: None,
            max_ffn_removed: None,
            gqa: None,
            refine: None,
            retries: None,
            extra_timings: None,
            output_format: None,
            options: vec![],
            recovery: None,
            sequential: None,
            sequential_target: None,
            sequential_keep_choice: None,
            self_chat: None,
        }
    }
}

/// `cal` with one more source, the model's own chat transcripts (`self`), sharing the
/// samples with the data files: what a chat model calibrates on by default
/// ([`PruneJob::chat_calibration`]). `None` when `cal` already has a `self` source or
/// too few samples to give the chat one of its own.
fn with_own_chat(cal: &CalibrationData) -> Option<CalibrationData> {
    let has_self = cal
        .sources
        .iter()
        .any(|s| matches!(s, CalibrationSource::SelfChat { .. }));
    if has_self || cal.samples <= cal.sources.len() {
        return None;
    }
    let mut chat = cal.clone();
    chat.sources.push(CalibrationSource::SelfChat { tokens: 0 });
    let last = chat.sources.len() - 1;
    chat.sources[last] = CalibrationSource::SelfChat {
        tokens: chat.share(last) * chat.seq_len,
    };
    Some(chat)
}

/// Why `path`, which should be a `what` file, is not one.
fn not_a_file(path: &Path, what: &str) -> String {
    if path.is_dir() {
        format!("a folder, not a {what} file")
    } else {
        format!("no such {what} file")
    }
}

/// A resolved job and what the user should hear about it.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The job.
    pub job: PruneJob,
    /// Things accepted but worth a word (printed before the run).
    pub warnings: Vec<String>,
}

/// Tokens per sequence, and per calibration sample when the backend has no default of
/// its own ([`crate::backend::Backend::calibration_seq_len`]), when none is given.
pub const DEFAULT_SEQ_LEN: usize = 128;
/// Calibration samples when none is given.
pub const DEFAULT_SAMPLES: usize = 256;
/// Random calibration samples at most (no calibration data).
const MAX_RANDOM_SAMPLES: usize = 64;

impl JobRequest {
    /// Checks every value and resolves the request into a job. Nothing is read but
    /// the file system's answer to whether the named files exist.
    pub fn resolve(&self) -> Result<Resolved> {
        self.resolve_with(true)
    }

    /// [`JobRequest::resolve`] for a command that prunes nothing (`ziplm profile`):
    /// the same checks, no budget needed.
    pub fn resolve_target(&self) -> Result<PruneJob> {
        Ok(self.resolve_with(false)?.job)
    }

    fn resolve_with(&self, needs_budget: bool) -> Result<Resolved> {
        let o = &self.origin;
        let at_least_one = |v: Option<usize>, f: Field| match v {
            Some(0) => Err(o.error(format!("{} must be at least 1", o.spell(f)))),
            _ => Ok(()),
        };
        let mut warnings = vec![];

        // model and backend
        let Some(model) = &self.model else {
            return Err(o.error(
                "give a model file (ziplm prune MODEL) or a serving config (--config ziplm.toml)",
            ));
        };
        if !model.exists() {
            return Err(o.error(format!(
                "{}: no such model file or folder ({})",
                model.display(),
                o.spell(Field::Model)
            )));
        }
        let mut job = PruneJob::new(model);
        if let Some(b) = &self.backend {
            // The named backend's own defaults, not those of the one the path implied.
            let backend = crate::backend::named(b).map_err(|e| o.error(e.to_string()))?;
            job.backend = BackendKind::named(backend.name());
            job.profile = backend.profile_settings();
            job.device = Device::Cpu {
                threads: backend.default_threads(),
            };
        }
        let backend = crate::backend::named(job.backend.name()).ok();
        job.name = self.name.clone();
        job.check_name().map_err(|e| o.error(e.to_string()))?;

        // target
        at_least_one(self.threads, Field::Threads)?;
        job.device = match (self.threads, self.cuda) {
            (Some(_), Some(_)) => {
                return Err(o.error(format!(
                    "give {} (CPU) or {} (GPU), not both",
                    o.spell(Field::Threads),
                    o.spell(Field::Cuda)
                )))
            }
            (_, Some(device)) => Device::Cuda { device },
            (Some(threads), None) => Device::Cpu { threads },
            (None, None) => job.device,
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Device::Cpu { threads } = job.device {
            if threads > cores {
                warnings.push(format!(
                    "{} {threads} is more than this machine's {cores} cores: the latencies will be those of an oversubscribed CPU",
                    o.spell(Field::Threads)
                ));
            }
        }

        // workload
        let phase = match (self.phase.as_deref(), self.kv_len) {
            (None, None) | (Some("prefill"), None) => Phase::Prefill,
            (None, Some(kv_len)) | (Some("decode"), Some(kv_len)) => Phase::Decode { kv_len },
            (Some("prefill"), Some(_)) => {
                return Err(o.error(format!(
                    "{} is only for decode workloads",
                    o.spell(Field::KvLen)
                )))
            }
            (Some("decode"), None) => {
                return Err(o.error(format!(
                    "a decode workload needs {} (the cached tokens of each step)",
                    o.spell(Field::KvLen)
                )))
            }
            (Some(other), _) => {
                return Err(o.error(format!(
                    "{} is `{other}`, expected \"prefill\" or \"decode\"",
                    o.spell(Field::Phase)
                )))
            }
        };
        job.workload = Workload {
            batch: self.batch.unwrap_or(1),
            seq_len: self.seq_len.unwrap_or(DEFAULT_SEQ_LEN),
            phase,
        };
        job.workload.validate().map_err(|e| {
            o.error(format!(
                "{e} ({}, {}, {})",
                o.spell(Field::Batch),
                o.spell(Field::SeqLen),
                o.spell(Field::KvLen)
            ))
        })?;

        // calibration
        at_least_one(self.samples, Field::Samples)?;
        at_least_one(self.calibration_seq_len, Field::CalibrationSeqLen)?;
        let samples = self.samples.unwrap_or(DEFAULT_SAMPLES);
        let seq_len = self
            .calibration_seq_len
            .unwrap_or_else(|| backend.map_or(DEFAULT_SEQ_LEN, |b| b.calibration_seq_len()));
        if self.calibration.is_empty() {
            if self.calibration_seq_len.is_some() {
                return Err(o.error(format!(
                    "{} sets the length of calibration samples: give {} FILE too",
                    o.spell(Field::CalibrationSeqLen),
                    o.spell(Field::Calibration)
                )));
            }
            job.random_samples = samples.min(MAX_RANDOM_SAMPLES);
            let chat_hint = if backend.is_some_and(|b| b.writes_chat()) {
                ", or `self` for a chat model to write its own"
            } else {
                ""
            };
            warnings.push(format!(
                "no calibration data given: calibrating on {} random token sequences (fine for test models; give {} FILE for real ones{chat_hint})",
                job.random_samples,
                o.spell(Field::Calibration)
            ));
        } else {
            if samples < self.calibration.len() {
                return Err(o.error(format!(
                    "{} gives {} calibration sources but {} asks for {samples} samples: give at least one sample per source",
                    o.spell(Field::Calibration),
                    self.calibration.len(),
                    o.spell(Field::Samples)
                )));
            }
            // Placeholders first, so that `share` divides by the number of sources.
            let mut cal = CalibrationData {
                sources: vec![CalibrationSource::SelfChat { tokens: 0 }; self.calibration.len()],
                samples,
                seq_len,
            };
            for (i, spec) in self.calibration.iter().enumerate() {
                cal.sources[i] = self.calibration_source(spec, cal.share(i) * seq_len, backend)?;
            }
            let chats = backend.is_some_and(|b| b.writes_chat());
            if chats && self.self_chat != Some(false) {
                job.chat_calibration = with_own_chat(&cal);
            }
            job.calibration = Some(cal);
        }
        if let Some(t) = &self.tokenizer {
            if !t.is_file() {
                return Err(o.error(format!(
                    "{}: {} ({})",
                    t.display(),
                    not_a_file(t, "tokenizer"),
                    o.spell(Field::Tokenizer)
                )));
            }
        }
        job.tokenizer = self.tokenizer.clone();

        // outputs, profiling, pruning, search
        job.out_dir = self
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("ziplm-out"));
        crate::fsutil::check_output_folder(&job.out_dir).map_err(|e| o.error(e.to_string()))?;
        job.latency_table = self.latency_table.clone();
        at_least_one(self.runs, Field::Runs)?;
        if let Some(runs) = self.runs {
            job.profile.runs = runs;
        }
        job.verify = self.verify.unwrap_or(true);
        job.sequential = self.sequential.unwrap_or(false);
        if let Some(t) = self.sequential_target {
            if !job.sequential {
                return Err(o.error(format!(
                    "{} is the target of sequential correction, which is off: turn it on ({}) or leave the target out",
                    o.spell(Field::SequentialTarget),
                    o.spell(Field::Sequential)
                )));
            }
            job.sequential_target = t;
        }
        if let Some(keep) = self.sequential_keep_choice {
            if keep && !job.sequential {
                return Err(o.error(format!(
                    "{} is a setting of sequential correction, which is off: turn it on ({}) or leave it out",
                    o.spell(Field::SequentialKeepChoice),
                    o.spell(Field::Sequential)
                )));
            }
            job.sequential_keep_choice = keep;
        }
        at_least_one(self.ffn_multiple, Field::FfnMultiple)?;
        if let Some(m) = self.ffn_multiple {
            job.database.ffn_width_multiple = m;
        }
        if let Some(f) = self.max_ffn_removed {
            if !(0.0..=1.0).contains(&f) {
                return Err(o.error(format!(
                    "{} must be between 0 and 1 (a fraction of each FFN), got {f}",
                    o.spell(Field::MaxFfnRemoved)
                )));
            }
            job.database.max_ffn_removed_fraction = f;
        }
        if let Some(g) = self.gqa {
            job.gqa_policy = g;
        }
        if let Some(n) = self.retries {
            if n > MAX_RETRIES {
                return Err(o.error(format!(
                    "{} is at most {MAX_RETRIES} (each retry emits and times a model), got {n}",
                    o.spell(Field::Retries)
                )));
            }
            job.search.retries = n;
        }
        if let Some(n) = self.extra_timings {
            if n > MAX_EXTRA_TIMINGS {
                return Err(o.error(format!(
                    "{} is at most {MAX_EXTRA_TIMINGS} (each extra timing runs the dense and the pruned model again), got {n}",
                    o.spell(Field::ExtraTimings)
                )));
            }
            job.search.extra_timings = n;
        }
        job.seed = self.seed.unwrap_or(0);
        job.search.refine = RefineConfig::with_evaluations(
            self.refine
                .unwrap_or(RefineConfig::default().max_evaluations),
            job.seed,
        );

        // backend options
        job.options = self.options_for(backend, model)?;

        // recovery
        if let Some(r) = &self.recovery {
            if !r.stage_tokens.is_empty() && !r.chain {
                return Err(o.error(format!(
                    "{} gives one figure per stage of a chain: add {}, or give one figure",
                    o.spell(Field::Recovery),
                    o.spell(Field::Chain)
                )));
            }
            r.check()
                .map_err(|e| o.error(format!("{} ({})", e, o.spell(Field::Recovery))))?;
            if let Some(b) = backend.filter(|b| !b.recovers()) {
                return Err(o.error(format!(
                    "{}: the {} backend has no recovery stage (distillation runs in the mistralrs backend, for {}); leave it out",
                    o.spell(Field::Recovery),
                    b.name(),
                    crate::backend::LLM_MODELS
                )));
            }
            if job.calibration.is_none() {
                return Err(o.error(format!(
                    "{} trains on the calibration text: give {} FILE",
                    o.spell(Field::Recovery),
                    o.spell(Field::Calibration)
                )));
            }
            if let Some(t) = &r.teacher {
                if !t.exists() {
                    return Err(o.error(format!(
                        "{} {}: no such model file or folder (give the dense model the pruned one came from)",
                        o.spell(Field::Teacher),
                        t.display()
                    )));
                }
            }
            job.recovery = Some(r.clone());
        }

        // budgets (last: every other mistake is named first)
        if needs_budget {
            job.budgets = self.budgets()?;
            if let Some(r) = job.recovery.as_ref().filter(|r| r.chain) {
                let stages = crate::pipeline::chain::speedups(&job.budgets)
                    .map_err(|e| o.error(format!("{} ({})", e, o.spell(Field::Chain))))?
                    .len();
                if !r.stage_tokens.is_empty() && r.stage_tokens.len() != stages {
                    return Err(o.error(format!(
                        "{} gives {} stage figures for a chain of {stages} speedups: give one figure per speedup, smallest first, or one for every stage",
                        o.spell(Field::Recovery),
                        r.stage_tokens.len()
                    )));
                }
            }
        }
        Ok(Resolved { job, warnings })
    }

    /// The backend options, each checked against the backend's declared ones.
    fn options_for(
        &self,
        backend: Option<&'static dyn crate::backend::Backend>,
        model: &Path,
    ) -> Result<BackendOptions> {
        let o = &self.origin;
        let mut options = BackendOptions::default();
        let mut given: Vec<RawOption> = vec![];
        if let Some(format) = &self.output_format {
            let implied = backend
                .and_then(|b| b.output_format(format))
                .ok_or_else(|| {
                    o.error(format!(
                        "{} `{format}` is not one the {} backend writes",
                        o.spell(Field::OutputFormat),
                        backend.map_or("job's", |b| b.name())
                    ))
                })?;
            given.extend(implied.into_iter().map(|(name, value)| RawOption {
                name: name.into(),
                value: value.into(),
                spelled: o.spell(Field::OutputFormat).into(),
            }));
        }
        given.extend(self.options.iter().cloned());
        for opt in given {
            let spec = backend.and_then(|b| b.options().iter().find(|s| s.name == opt.name));
            let Some(spec) = spec else {
                let owner = crate::backend::all()
                    .into_iter()
                    .find(|b| b.options().iter().any(|s| s.name == opt.name));
                return Err(o.error(match owner {
                    Some(b) => format!(
                        "{} is an option of the {} backend ({}); {} is not one",
                        opt.spelled,
                        b.name(),
                        b.models(),
                        model.display()
                    ),
                    None => format!("{}: no backend has an option `{}`", opt.spelled, opt.name),
                }));
            };
            if !spec.values.contains(&opt.value.as_str()) {
                return Err(o.error(format!(
                    "{} `{}`: expected one of {}",
                    opt.spelled,
                    opt.value,
                    spec.values.join(", ")
                )));
            }
            options.set(opt.name, opt.value);
        }
        Ok(options)
    }

    /// One `--calibration` value: `self` / `self:N` (the model's own chat, for backends
    /// that write it; `self` alone asks for `default_tokens`), else a data file that must
    /// exist.
    fn calibration_source(
        &self,
        spec: &Path,
        default_tokens: usize,
        backend: Option<&'static dyn crate::backend::Backend>,
    ) -> Result<CalibrationSource> {
        let o = &self.origin;
        if let Some(tokens) = crate::data::self_chat::parse_spec(&spec.to_string_lossy()) {
            let tokens =
                tokens.map_err(|e| o.error(format!("{e} ({})", o.spell(Field::Calibration))))?;
            if let Some(b) = backend.filter(|b| !b.writes_chat()) {
                return Err(o.error(format!(
                    "{} self: the {} backend's models do not chat (self-written transcripts are for chat LLMs in the mistralrs backend, {}); give a data file",
                    o.spell(Field::Calibration),
                    b.name(),
                    crate::backend::LLM_MODELS
                )));
            }
            return Ok(CalibrationSource::SelfChat {
                tokens: tokens.unwrap_or(default_tokens),
            });
        }
        if !spec.is_file() {
            return Err(o.error(format!(
                "{}: {} ({})",
                spec.display(),
                not_a_file(spec, "calibration"),
                o.spell(Field::Calibration)
            )));
        }
        Ok(CalibrationSource::File {
            path: spec.to_path_buf(),
            format: self.calibration_format,
        })
    }

    /// The budgets: each positive, none twice, at least one.
    fn budgets(&self) -> Result<Vec<Budget>> {
        let o = &self.origin;
        let given = self
            .speedup
            .iter()
            .map(|&s| (Budget::Speedup(s), Field::Speedup))
            .chain(
                self.latency_ms
                    .iter()
                    .map(|&ms| (Budget::LatencyMs(ms), Field::LatencyMs)),
            );
        let mut budgets: Vec<Budget> = vec![];
        for (budget, field) in given {
            budget
                .validate()
                .map_err(|e| o.error(format!("{}: {e}", o.spell(field))))?;
            budgets.push(budget);
        }
        if budgets.is_empty() {
            return Err(o.error(format!(
                "no budget given: give {} X (times faster than the dense model) or {} MS",
                o.spell(Field::Speedup),
                o.spell(Field::LatencyMs)
            )));
        }
        // The job's own check (a budget given twice), which library callers get too.
        super::check_budgets(&budgets).map_err(|e| o.error(e.to_string()))?;
        Ok(budgets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(model: &Path) -> JobRequest {
        let mut r = JobRequest::new(Origin::Cli);
        r.model = Some(model.to_path_buf());
        r.speedup = vec![1.5];
        r
    }

    #[test]
    fn each_check_names_the_flag_or_the_key_the_user_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        std::fs::write(&model, b"").unwrap();
        let config = Origin::Config {
            file: "ziplm.toml".into(),
            model: "m".into(),
        };
        let mut r = request(&model);
        r.ffn_multiple = Some(0);
        let cli = r.resolve().unwrap_err().to_string();
        assert!(cli.contains("--ffn-multiple must be at least 1"), "{cli}");
        r.origin = config;
        let cfg = r.resolve().unwrap_err().to_string();
        assert!(
            cfg.contains("ziplm.toml") && cfg.contains("pruning.ffn_multiple must be at least 1"),
            "{cfg}"
        );
    }

    /// Retries and extra timings set the verification loop's settings, default when
    /// not given, and are bounded with the flag named.
    #[test]
    fn the_verification_settings_are_set_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        std::fs::write(&model, b"").unwrap();
        let r = request(&model);
        let search = |r: &JobRequest| r.clone().resolve().unwrap().job.search;
        assert_eq!(search(&r).retries, 3);
        assert_eq!(search(&r).extra_timings, 2);
        let set = JobRequest {
            retries: Some(7),
            extra_timings: Some(0),
            ..r.clone()
        };
        assert_eq!((search(&set).retries, search(&set).extra_timings), (7, 0));
        for (bad, flag) in [
            (
                JobRequest {
                    retries: Some(usize::MAX),
                    ..r.clone()
                },
                "--retries is at most 16",
            ),
            (
                JobRequest {
                    extra_timings: Some(9),
                    ..r.clone()
                },
                "--extra-timings is at most 8",
            ),
        ] {
            let e = bad.resolve().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    /// A request for an (empty) GGUF file in `dir` with calibration text, and recovery
    /// settings to give it.
    fn recovering_llm_request(dir: &Path) -> (JobRequest, RecoverySettings) {
        let gguf = dir.join("m.gguf");
        let text = dir.join("t.txt");
        for f in [&gguf, &text] {
            std::fs::write(f, b"").unwrap();
        }
        let mut r = request(&gguf);
        r.calibration = vec![text];
        (r, RecoverySettings::with_tokens(1024))
    }

    #[test]
    fn a_chain_needs_two_or_more_speedups() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut s) = recovering_llm_request(dir.path());
        s.chain = true;
        r.recovery = Some(s);
        let e = r.clone().resolve().unwrap_err().to_string();
        assert!(e.contains("two or more") && e.contains("--chain"), "{e}");
        r.speedup = vec![2.0, 1.5];
        let job = r.resolve().unwrap().job;
        assert!(job.recovery.is_some_and(|s| s.chain));
    }

    #[test]
    fn stage_tokens_give_each_chain_stage_its_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut s) = recovering_llm_request(dir.path());
        s.stage_tokens = vec![1024, 4096];
        r.recovery = Some(s.clone());
        r.speedup = vec![1.5, 2.0];
        let e = r.clone().resolve().unwrap_err().to_string();
        assert!(
            e.contains("one figure per stage of a chain") && e.contains("--chain"),
            "{e}"
        );
        s.chain = true;
        r.recovery = Some(s.clone());
        let job = r.clone().resolve().unwrap().job;
        assert_eq!(job.recovery.unwrap().stage_tokens, [1024, 4096]);
        r.speedup = vec![1.25, 1.5, 2.0];
        let e = r.clone().resolve().unwrap_err().to_string();
        assert!(
            e.contains("2 stage figures for a chain of 3 speedups") && e.contains("--recover"),
            "{e}"
        );
        s.stage_tokens = vec![1024, 0];
        r.recovery = Some(s);
        r.speedup = vec![1.5, 2.0];
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("stage_tokens must each be at least 1"), "{e}");
    }

    #[test]
    fn a_missing_teacher_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, mut s) = recovering_llm_request(dir.path());
        s.teacher = Some(dir.path().join("dense.gguf"));
        r.recovery = Some(s);
        let e = r.clone().resolve().unwrap_err().to_string();
        assert!(
            e.contains("--teacher") && e.contains("dense.gguf: no such model file"),
            "{e}"
        );
        std::fs::write(dir.path().join("dense.gguf"), b"").unwrap();
        let job = r.resolve().unwrap().job;
        assert_eq!(
            job.recovery.and_then(|s| s.teacher),
            Some(dir.path().join("dense.gguf"))
        );
    }

    #[test]
    fn recovery_is_refused_where_it_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let onnx = dir.path().join("m.onnx");
        let gguf = dir.path().join("m.gguf");
        let text = dir.path().join("t.txt");
        for f in [&onnx, &gguf, &text] {
            std::fs::write(f, b"").unwrap();
        }
        let mut r = request(&onnx);
        r.calibration = vec![text.clone()];
        r.recovery = Some(RecoverySettings::with_tokens(1024));
        let e = r.resolve().unwrap_err().to_string();
        assert!(
            e.contains("--recover: the tract backend has no recovery stage"),
            "{e}"
        );
        let mut r = request(&gguf);
        r.recovery = Some(RecoverySettings::with_tokens(1024));
        let e = r.resolve().unwrap_err().to_string();
        assert!(
            e.contains("--recover trains on the calibration text: give --calibration"),
            "{e}"
        );
        r.calibration = vec![text];
        let mut bad = RecoverySettings::with_tokens(1024);
        bad.warmup = 2.0;
        r.recovery = Some(bad);
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("recovery.warmup"), "{e}");
        r.recovery = Some(RecoverySettings::with_tokens(1024));
        let job = r.resolve().unwrap().job;
        assert_eq!(job.recovery.map(|s| s.tokens), Some(1024));
        // LLMs calibrate on 512-token windows unless told otherwise.
        assert_eq!(job.calibration.map(|c| c.seq_len), Some(512));
    }

    #[test]
    fn self_written_calibration_is_for_chat_llms_and_sized_by_the_samples() {
        let dir = tempfile::tempdir().unwrap();
        let onnx = dir.path().join("m.onnx");
        let gguf = dir.path().join("m.gguf");
        for f in [&onnx, &gguf] {
            std::fs::write(f, b"").unwrap();
        }
        let mut r = request(&onnx);
        r.calibration = vec!["self:4096".into()];
        let e = r.resolve().unwrap_err().to_string();
        assert!(
            e.contains("--calibration self: the tract backend's models do not chat"),
            "{e}"
        );
        let mut r = request(&gguf);
        r.calibration = vec!["self:none".into()];
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("self:none: not a token count"), "{e}");
        r.calibration = vec!["self:4096".into()];
        let cal = r.resolve().unwrap().job.calibration.unwrap();
        assert_eq!(cal.sources, [CalibrationSource::SelfChat { tokens: 4096 }]);
        assert_eq!(cal.paths().count(), 0);
        // `self` alone: as many tokens as the samples hold.
        r.calibration = vec!["self".into()];
        r.samples = Some(8);
        let cal = r.resolve().unwrap().job.calibration.unwrap();
        assert_eq!(
            cal.sources,
            [CalibrationSource::SelfChat { tokens: 8 * 512 }]
        );
        // Recovery trains on it like on a file.
        r.recovery = Some(RecoverySettings::with_tokens(1024));
        assert!(r.resolve().is_ok());
    }

    /// A chat LLM given text calibrates on its own chat too, one more share of the
    /// samples ([`PruneJob::chat_calibration`]); not with `--no-self-chat`, not when
    /// the job already names `self`, and not for backends whose models do not chat.
    #[test]
    fn a_chat_model_given_text_also_calibrates_on_its_own_chat() {
        let dir = tempfile::tempdir().unwrap();
        let (gguf, onnx) = (dir.path().join("m.gguf"), dir.path().join("m.onnx"));
        let text = dir.path().join("t.txt");
        for f in [&gguf, &onnx, &text] {
            std::fs::write(f, b"").unwrap();
        }
        let mut r = request(&gguf);
        r.calibration = vec![text.clone()];
        r.samples = Some(9);
        let job = r.resolve().unwrap().job;
        let file = CalibrationSource::File {
            path: text.clone(),
            format: None,
        };
        // The text alone stays the job's calibration for a model without a template.
        assert_eq!(
            job.calibration.unwrap().sources,
            std::slice::from_ref(&file)
        );
        let chat = job.chat_calibration.unwrap();
        // 5 samples of text, 4 of the model's chat: 4 x 512 tokens.
        assert_eq!(
            chat.sources,
            [
                file.clone(),
                CalibrationSource::SelfChat { tokens: 4 * 512 }
            ]
        );
        assert_eq!((chat.samples, chat.seq_len), (9, 512));
        assert_eq!((chat.share(0), chat.share(1)), (5, 4));
        // Off when asked, when `self` is named already, or with one sample per file.
        r.self_chat = Some(false);
        assert!(r.resolve().unwrap().job.chat_calibration.is_none());
        r.self_chat = Some(true);
        r.calibration = vec![text.clone(), "self:100".into()];
        assert!(r.resolve().unwrap().job.chat_calibration.is_none());
        r.calibration = vec![text.clone()];
        r.samples = Some(1);
        assert!(r.resolve().unwrap().job.chat_calibration.is_none());
        // No data: random ids as before (and the warning names `self`).
        r.calibration = vec![];
        let resolved = r.resolve().unwrap();
        assert!(resolved.job.chat_calibration.is_none());
        assert!(resolved.warnings.iter().any(|w| w.contains("`self`")));
        // ONNX models do not chat.
        let mut r = request(&onnx);
        r.calibration = vec![text];
        assert!(r.resolve().unwrap().job.chat_calibration.is_none());
    }

    #[test]
    fn a_data_file_and_self_written_chat_share_the_samples() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        let text = dir.path().join("t.txt");
        std::fs::write(&gguf, b"").unwrap();
        std::fs::write(&text, "some text").unwrap();
        let mut r = request(&gguf);
        r.calibration = vec![text.clone(), "self".into()];
        r.samples = Some(7);
        let cal = r.resolve().unwrap().job.calibration.unwrap();
        // 4 samples from the file, 3 written by the model: `self` asks for 3 x 512 tokens.
        assert_eq!(
            cal.sources,
            [
                CalibrationSource::File {
                    path: text.clone(),
                    format: None
                },
                CalibrationSource::SelfChat { tokens: 3 * 512 }
            ]
        );
        assert_eq!((cal.share(0), cal.share(1)), (4, 3));
        // Fewer samples than sources, and a missing file among several, are named.
        r.samples = Some(1);
        let e = r.resolve().unwrap_err().to_string();
        assert!(
            e.contains("--calibration gives 2 calibration sources but --samples asks for 1"),
            "{e}"
        );
        r.samples = None;
        r.calibration = vec!["self:64".into(), dir.path().join("gone.txt")];
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("gone.txt: no such calibration file"), "{e}");
    }

    #[test]
    fn options_of_another_backend_and_unknown_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        std::fs::write(&model, b"").unwrap();
        let mut r = request(&model);
        r.options.push(RawOption {
            name: "gguf_dtype".into(),
            value: "q8_0".into(),
            spelled: "--gguf-dtype".into(),
        });
        let e = r.resolve().unwrap_err().to_string();
        assert!(
            e.contains("--gguf-dtype is an option of the mistralrs backend"),
            "{e}"
        );
        r.options = vec![RawOption {
            name: "nnef".into(),
            value: "maybe".into(),
            spelled: "nnef".into(),
        }];
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("expected one of true, false"), "{e}");
        r.options[0].value = "true".into();
        let job = r.resolve().unwrap().job;
        assert!(job.options.flag("nnef", false));
    }

    #[test]
    fn more_threads_than_cores_and_no_calibration_data_are_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        std::fs::write(&model, b"").unwrap();
        let mut r = request(&model);
        r.threads = Some(100_000);
        let warnings = r.resolve().unwrap().warnings;
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("--threads 100000 is more than")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("no calibration data")),
            "{warnings:?}"
        );
    }

    #[test]
    fn no_budget_is_refused_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        std::fs::write(&model, b"").unwrap();
        let mut r = request(&model);
        r.speedup.clear();
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("no budget given"), "{e}");
        let mut r = request(&model);
        r.tokenizer = Some(dir.path().join("nope.json"));
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("nope.json: no such tokenizer file"), "{e}");
        let mut r = request(&model);
        r.calibration = vec![dir.path().join("data.txt")];
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("data.txt: no such calibration file"), "{e}");
        let r = request(&dir.path().join("gone.onnx"));
        let e = r.resolve().unwrap_err().to_string();
        assert!(e.contains("gone.onnx: no such model"), "{e}");
    }
}
