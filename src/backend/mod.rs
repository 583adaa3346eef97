//! Runtime backends and their registry.
//!
//! A backend is one folder here that implements [`Backend`] (what the front ends ask:
//! which models it takes, profiling defaults, inspect, profile, run, speedup timing)
//! and [`crate::pipeline::Session`] (a model loaded for one job, which the one
//! pipeline drives). Every front end dispatches through [`for_model`] / [`named`]:
//!
//! - [`tract`]: ONNX transformers on CPU with tract.
//! - [`mistralrs`]: Llama GGUF files and Hugging Face folders, verified in mistral.rs.
//!   Without the `mistralrs` feature the module is a stub with the same API whose
//!   calls return a clear "build with --features mistralrs" error.
//!
//! Adding a backend: a folder with both traits, and one line in [`BUILTIN`] (or a call
//! to [`register`] from outside the crate).

#[cfg(feature = "mistralrs")]
pub mod mistralrs;
#[cfg(not(feature = "mistralrs"))]
#[path = "mistralrs_off.rs"]
pub mod mistralrs;
pub mod tract;

use crate::database::DatabaseConfig;
use crate::error::{Error, Result};
use crate::job::{BackendOptions, OptionSpec, PruneJob};
use crate::profile::ProfileSettings;
use crate::progress::Progress;
use crate::report::PruneReport;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use ziplm_plugin_api::{GqaPolicy, LatencyTable, ModelStructure, PairedTiming, Workload};

/// The models the mistral.rs backend reads, built in or not: `.gguf` files and folders.
pub(crate) fn is_llm_path(model: &Path) -> bool {
    model.extension().and_then(|e| e.to_str()) == Some("gguf") || model.is_dir()
}

/// The mistral.rs backend's profiling defaults, built in or not: profiling a candle
/// block is cheap, so more runs, in passes ([`crate::profile::LLM_PROFILE_PASSES`]).
pub(crate) fn llm_profile_settings() -> ProfileSettings {
    ProfileSettings::new(2, 15).in_passes(crate::profile::LLM_PROFILE_PASSES)
}

/// Tokens per calibration window of the mistral.rs backend, built in or not: with the
/// default 256 samples, 131,072 tokens (ZIPLM.md section 2 wants many more tokens than
/// the widest out-projection has inputs; ZipLM's follow-up calibrates on 2^23).
pub(crate) const LLM_CALIBRATION_SEQ_LEN: usize = 512;

/// What the mistral.rs backend reads, built in or not (for messages).
pub(crate) const LLM_MODELS: &str = "GGUF files and Hugging Face model folders";

/// The mistral.rs backend's options, built in or not (read by
/// `mistralrs::options::MistralOptions`).
pub(crate) const LLM_OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "gguf_dtype",
        values: &["f32", "f16", "q8_0", "q4_k"],
        help: "tensor type of the pruned projections in emitted GGUF files",
    },
    OptionSpec {
        name: "llm_format",
        values: &["gguf", "safetensors"],
        help: "format of the emitted models (default: the source's)",
    },
    OptionSpec::flag(
        "runtime_fit",
        "fit the candle block table to mistral.rs with two probe models before searching",
    ),
    OptionSpec::flag(
        "refit",
        "solve the runtime fit again with each verified model's timing before the next search",
    ),
];

/// The mistral.rs backend's options for a serving config's `output.format`.
pub(crate) fn llm_output_format(format: &str) -> Option<Vec<(&'static str, &'static str)>> {
    let gguf = |dtype| Some(vec![("llm_format", "gguf"), ("gguf_dtype", dtype)]);
    match format {
        "gguf" => gguf("f32"),
        "gguf-f16" => gguf("f16"),
        "gguf-q8_0" => gguf("q8_0"),
        "gguf-q4_k" => gguf("q4_k"),
        "safetensors" => Some(vec![("llm_format", "safetensors")]),
        _ => None,
    }
}

/// What a runtime backend offers the front ends (CLI, config, build API, `speedup`).
pub trait Backend: Sync {
    /// The name jobs, configs and reports use (`backend = "tract"`).
    fn name(&self) -> &'static str;
    /// Whether the model at `model` (a file or folder) is one this backend reads.
    fn takes(&self, model: &Path) -> bool;
    /// How this backend profiles a latency table by default.
    fn profile_settings(&self) -> ProfileSettings;
    /// The models it reads, in words (for messages: "ONNX models").
    fn models(&self) -> &'static str;
    /// The options it takes ([`crate::job::BackendOptions`]); a job that sets another
    /// is refused when it is resolved.
    fn options(&self) -> &'static [OptionSpec] {
        &[]
    }
    /// The options that a serving config's `output.format` stands for; `None` when
    /// this backend writes no such format.
    fn output_format(&self, _format: &str) -> Option<Vec<(&'static str, &'static str)>> {
        None
    }
    /// The CPU threads a job targets when it names none.
    fn default_threads(&self) -> usize {
        1
    }
    /// Whether it runs the recovery stage (`--recover`, `[model.recovery]`); jobs
    /// that ask another backend for it are refused.
    fn recovers(&self) -> bool {
        false
    }
    /// Whether its models write their own chat transcripts for calibration
    /// (`--calibration self:N`); jobs that ask another backend for it are refused.
    fn writes_chat(&self) -> bool {
        false
    }
    /// Tokens per calibration sample when a job names none (`--calibration-seq-len`).
    fn calibration_seq_len(&self) -> usize {
        crate::job::request::DEFAULT_SEQ_LEN
    }
    /// Runs a resolved job end to end through [`crate::pipeline::run`].
    fn run(&self, job: &PruneJob, progress: &dyn Progress) -> Result<PruneReport>;
    /// The prunable structure of a model (`ziplm inspect`).
    fn structure(&self, model: &Path, workload: &Workload) -> Result<ModelStructure>;
    /// Times every grid shape of a model (`ziplm profile`): the table a prune job of
    /// the same model and workload would build.
    fn profile(
        &self,
        model: &Path,
        request: &ProfileRequest,
        progress: &dyn Progress,
    ) -> Result<LatencyTable>;
    /// Times each of `models` against `dense` end to end in the runtime, alternating
    /// runs (`ziplm speedup`); one timing per model.
    fn time_files(
        &self,
        dense: &Path,
        models: &[PathBuf],
        workload: &Workload,
        device: crate::job::Device,
        settings: &ProfileSettings,
        progress: &dyn Progress,
    ) -> Result<Vec<TimedFile>>;
}

/// One model file timed against the dense model ([`Backend::time_files`]).
#[derive(Clone, Debug)]
pub struct TimedFile {
    /// The model's timing against the dense model.
    pub timing: PairedTiming,
    /// How the dense model was run, when not as its file is (e.g. emitted unpruned in
    /// the model's tensor type, so that the ratio times the pruning, not the type).
    pub dense_as: Option<String>,
}

impl From<PairedTiming> for TimedFile {
    fn from(timing: PairedTiming) -> Self {
        TimedFile {
            timing,
            dense_as: None,
        }
    }
}

/// The backends built into ziplm, in the order models are matched against them.
pub static BUILTIN: &[&dyn Backend] = &[&tract::TractBackend, &mistralrs::MistralBackend];

/// Backends registered at run time ([`register`]), matched before the built-in ones.
static REGISTERED: RwLock<Vec<&'static dyn Backend>> = RwLock::new(Vec::new());

/// Adds a backend (for example one written against the plugin API outside this
/// crate). A backend with the name of one already registered replaces it.
pub fn register(backend: &'static dyn Backend) {
    let mut r = REGISTERED.write().unwrap_or_else(|e| e.into_inner());
    r.retain(|b| b.name() != backend.name());
    r.push(backend);
}

/// Every backend: the registered ones first, then [`BUILTIN`].
pub fn all() -> Vec<&'static dyn Backend> {
    let r = REGISTERED.read().unwrap_or_else(|e| e.into_inner());
    r.iter().copied().chain(BUILTIN.iter().copied()).collect()
}

/// The backend that reads `model`, if any.
pub fn for_model(model: &Path) -> Option<&'static dyn Backend> {
    all().into_iter().find(|b| b.takes(model))
}

/// The backend called `name`, or an error that lists the known names.
pub fn named(name: &str) -> Result<&'static dyn Backend> {
    let all = all();
    all.iter()
        .copied()
        .find(|b| b.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|b| b.name()).collect();
            Error::Invalid(format!(
                "unknown backend `{name}`: use one of {}",
                names.join(", ")
            ))
        })
}

/// The backend for `model`, or a clear error naming the model kinds ziplm reads.
pub fn for_model_or_error(model: &Path) -> Result<&'static dyn Backend> {
    for_model(model).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: not a model ziplm knows (give an .onnx file, a .gguf file, or a Hugging Face folder with config.json and model.safetensors)",
            model.display()
        ))
    })
}

/// What `ziplm profile` needs to time a model's shapes.
pub struct ProfileRequest<'a> {
    /// The workload timed.
    pub workload: Workload,
    /// The target device (CPU threads or a GPU).
    pub device: crate::job::Device,
    /// The grid of shapes (FFN width multiple, largest FFN fraction removed).
    pub grid: &'a DatabaseConfig,
    /// How GQA heads are removed.
    pub gqa_policy: GqaPolicy,
    /// The backend's options (the tensor type the table is for, for mistral.rs).
    pub options: &'a BackendOptions,
    /// Warm-up and timed runs per shape.
    pub settings: ProfileSettings,
    /// An earlier table of the same target and workload: only missing shapes are timed.
    pub reuse: Option<&'a LatencyTable>,
}

/// Loads a model's prunable structure with the backend that reads it.
pub fn load_structure(model: &Path, workload: &Workload) -> Result<ModelStructure> {
    for_model_or_error(model)?.structure(model, workload)
}

/// Runs a job with its backend (writes models and report into `job.out_dir`).
pub fn run_job(job: &PruneJob, progress: &dyn Progress) -> Result<PruneReport> {
    named(job.backend.name())?.run(job, progress)
}
