//! The mistral.rs backend in a build without the `mistralrs` feature: the same API
//! as `backend/mistralrs/` for what the rest of ziplm calls, each call a clear error
//! that says how to build it in. GGUF files and model folders still reach this
//! backend (so a user learns what is missing rather than getting tract's error).

use crate::backend::{Backend, ProfileRequest};
use crate::error::{Error, Result};
use crate::job::{OptionSpec, PruneJob};
use crate::profile::ProfileSettings;
use crate::progress::Progress;
use crate::report::PruneReport;
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{LatencyTable, ModelStructure, Workload};

/// The error every call of this stub returns.
fn not_built(model: &Path) -> Error {
    Error::Invalid(format!(
        "{}: GGUF and safetensors models need ziplm built with the `mistralrs` feature (cargo build --features mistralrs)",
        model.display()
    ))
}

/// The mistral.rs backend's registry entry, not built in.
pub struct MistralBackend;

impl Backend for MistralBackend {
    fn name(&self) -> &'static str {
        "mistralrs"
    }
    // The same paths and defaults as the real backend, so jobs resolve alike in both
    // builds.
    fn takes(&self, model: &Path) -> bool {
        crate::backend::is_llm_path(model)
    }
    fn profile_settings(&self) -> ProfileSettings {
        crate::backend::llm_profile_settings()
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
    // `--recover` and `self:N` resolve as in the real backend; running says what is
    // missing.
    fn recovers(&self) -> bool {
        true
    }
    fn writes_chat(&self) -> bool {
        true
    }
    fn output_format(&self, format: &str) -> Option<Vec<(&'static str, &'static str)>> {
        crate::backend::llm_output_format(format)
    }
    fn run(&self, job: &PruneJob, _: &dyn Progress) -> Result<PruneReport> {
        Err(not_built(&job.model))
    }
    fn structure(&self, model: &Path, _: &Workload) -> Result<ModelStructure> {
        Err(not_built(model))
    }
    fn profile(&self, model: &Path, _: &ProfileRequest, _: &dyn Progress) -> Result<LatencyTable> {
        Err(not_built(model))
    }
    fn time_files(
        &self,
        dense: &Path,
        _: &[PathBuf],
        _: &Workload,
        _: crate::job::Device,
        _: &ProfileSettings,
        _: &dyn Progress,
    ) -> Result<Vec<crate::backend::TimedFile>> {
        Err(not_built(dense))
    }
}

/// Perplexity evaluation (`ziplm eval --text`), not built in.
pub mod eval {
    use crate::progress::Progress;
    use std::path::Path;

    /// A perplexity figure (never produced by this stub).
    pub struct Perplexity {
        /// exp(mean NLL).
        pub ppl: f64,
        /// Mean negative log-likelihood per predicted token (nats).
        pub mean_nll: f64,
        /// Predicted tokens.
        pub tokens: usize,
        /// Windows evaluated.
        pub windows: usize,
    }

    /// Always the "build with --features mistralrs" error.
    pub fn text_perplexity(
        model: &Path,
        _text: &Path,
        _tokenizer: Option<&Path>,
        _window: usize,
        _max_windows: Option<usize>,
        _progress: &dyn Progress,
    ) -> crate::Result<Perplexity> {
        Err(super::not_built(model))
    }

    /// Agreement with a reference model (never produced by this stub).
    pub struct Agreement {
        /// Top-1 next-token agreement.
        pub top1: f64,
        /// Mean KL(reference || model), nats per token.
        pub kl: f64,
        /// Tokens compared.
        pub tokens: usize,
    }

    /// Always the "build with --features mistralrs" error.
    pub fn text_eval(
        model: &Path,
        _reference: Option<&Path>,
        _text: &Path,
        _tokenizer: Option<&Path>,
        _window: usize,
        _max_windows: Option<usize>,
        _progress: &dyn Progress,
    ) -> crate::Result<(Perplexity, Option<Agreement>)> {
        Err(super::not_built(model))
    }

    /// Always the "build with --features mistralrs" error.
    pub fn probe_replies(
        model: &Path,
        _probes: &[crate::data::probes::Probe],
        _max_tokens: usize,
        _progress: &dyn Progress,
    ) -> crate::Result<Vec<crate::data::probes::ProbeReply>> {
        Err(super::not_built(model))
    }
}
