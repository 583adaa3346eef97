//! Runtime backends: each turns a model file into a [`ziplm_plugin_api::ModelAdapter`]
//! and measures, emits and verifies with its runtime.
//!
//! - [`tract`]: ONNX transformers on CPU with tract.
//! - [`mistralrs`] (feature `mistralrs`): Llama GGUF files and Hugging Face folders,
//!   verified in mistral.rs.

#[cfg(feature = "mistralrs")]
pub mod mistralrs;
pub mod tract;

use crate::database::DatabaseConfig;
use crate::error::{Error, Result};
use crate::job::{GgufDType, PruneJob};
use crate::profile::ProfileSettings;
use crate::progress::Progress;
use crate::report::PruneReport;
use std::path::Path;
use ziplm_plugin_api::{GqaPolicy, LatencyTable, ModelStructure, Workload};

/// What `ziplm profile` needs to time a model's shapes.
pub struct ProfileRequest<'a> {
    /// The workload timed.
    pub workload: Workload,
    /// The grid of shapes (FFN width multiple, largest FFN fraction removed).
    pub grid: &'a DatabaseConfig,
    /// How GQA heads are removed.
    pub gqa_policy: GqaPolicy,
    /// Type of the projections as the emitted model stores them (mistral.rs backend).
    pub gguf_dtype: GgufDType,
    /// Warm-up and timed runs per shape.
    pub settings: ProfileSettings,
    /// An earlier table of the same target and workload: only missing shapes are timed.
    pub reuse: Option<&'a LatencyTable>,
}

/// Loads a model's prunable structure with the backend its file type calls for.
pub fn load_structure(model: &Path, workload: &Workload) -> Result<ModelStructure> {
    match model.extension().and_then(|e| e.to_str()) {
        Some("onnx") => {
            let m = tract::TractModel::load(
                model,
                tract::TractOptions {
                    workload: *workload,
                    ..Default::default()
                },
            )?;
            Ok(ziplm_plugin_api::ModelAdapter::structure(&m).clone())
        }
        _ => mistralrs_structure(model),
    }
}

/// The error for a GGUF file or model folder in a build without the mistral.rs backend.
#[cfg(not(feature = "mistralrs"))]
fn no_mistralrs(model: &Path) -> Error {
    Error::Invalid(format!(
        "{}: not an ONNX file; GGUF and safetensors models need ziplm built with the `mistralrs` feature",
        model.display()
    ))
}

#[cfg(not(feature = "mistralrs"))]
fn mistralrs_structure(model: &Path) -> Result<ModelStructure> {
    Err(no_mistralrs(model))
}

#[cfg(not(feature = "mistralrs"))]
/// Profiles a GGUF file or model folder (needs the `mistralrs` feature).
pub fn profile_llm(
    model: &Path,
    _request: &ProfileRequest,
    _progress: &dyn Progress,
) -> Result<LatencyTable> {
    Err(no_mistralrs(model))
}

#[cfg(feature = "mistralrs")]
/// Times every grid shape of a GGUF file or model folder with candle's kernels, as
/// the mistral.rs backend's prune job does (the same table, key and all).
pub fn profile_llm(
    model: &Path,
    request: &ProfileRequest,
    progress: &dyn Progress,
) -> Result<LatencyTable> {
    check_llm_source(model)?;
    let m = mistralrs::LlamaModel::load(
        model,
        mistralrs::LlamaOptions {
            gqa_policy: request.gqa_policy,
            output_dtype: request.gguf_dtype,
            ..Default::default()
        },
    )?;
    let shapes =
        crate::database::grid_shapes(ziplm_plugin_api::ModelAdapter::structure(&m), request.grid);
    let mut profiler = mistralrs::profile::CandleProfiler::new(&m, request.gguf_dtype);
    crate::profile::build_table(
        &mut profiler,
        &request.workload,
        &shapes,
        &request.settings,
        request.reuse,
        progress,
    )
}

#[cfg(not(feature = "mistralrs"))]
/// Runs a job with the mistral.rs backend (needs the `mistralrs` feature).
pub fn run_mistralrs(job: &PruneJob, _progress: &dyn Progress) -> Result<PruneReport> {
    Err(Error::Invalid(format!(
        "{}: the mistralrs backend needs ziplm built with the `mistralrs` feature (cargo build --features mistralrs)",
        job.model.display()
    )))
}

#[cfg(feature = "mistralrs")]
fn mistralrs_structure(model: &Path) -> Result<ModelStructure> {
    check_llm_source(model)?;
    let m = mistralrs::LlamaModel::load(model, Default::default())?;
    Ok(ziplm_plugin_api::ModelAdapter::structure(&m).clone())
}

/// A GGUF file or a model folder; anything else gets a clear error.
#[cfg(feature = "mistralrs")]
fn check_llm_source(model: &Path) -> Result<()> {
    let gguf = model.extension().and_then(|e| e.to_str()) == Some("gguf");
    if gguf || model.is_dir() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{}: not a model ziplm knows (give an .onnx file, a .gguf file, or a Hugging Face folder with config.json and model.safetensors)",
            model.display()
        )))
    }
}

#[cfg(feature = "mistralrs")]
/// Runs a job with the mistral.rs backend.
pub fn run_mistralrs(job: &PruneJob, progress: &dyn Progress) -> Result<PruneReport> {
    check_llm_source(&job.model)?;
    Ok(mistralrs::driver::run(job, progress)?.report)
}

/// Runs a job with its backend (writes models and report into `job.out_dir`).
pub fn run_job(job: &PruneJob, progress: &dyn Progress) -> Result<PruneReport> {
    match job.backend {
        crate::job::BackendKind::Tract => Ok(tract::driver::run(job, progress)?.report),
        crate::job::BackendKind::Mistralrs => run_mistralrs(job, progress),
    }
}
