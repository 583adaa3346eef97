//! A resolved prune job: what the CLI flags, a serving config or `[package.metadata.ziplm]`
//! all turn into ([`request`]: one raw request, one resolving step), and what the
//! pipeline runs.

pub mod options;
pub mod recovery;
pub mod request;

pub use options::{BackendOptions, OptionSpec};
pub use recovery::{LearningRateTrial, RecoverySettings, RecoverySummary};

use crate::data::CalibrationData;
use crate::database::DatabaseConfig;
use crate::pipeline::SearchSettings;
use crate::profile::ProfileSettings;
use crate::search::Budget;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{GqaPolicy, Workload};

/// Which runtime serves the model: the name of a backend in the registry
/// ([`crate::backend::named`]), e.g. `"tract"` or `"mistralrs"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackendKind(Cow<'static, str>);

impl BackendKind {
    /// tract (ONNX, CPU).
    pub const TRACT: BackendKind = BackendKind(Cow::Borrowed("tract"));
    /// mistral.rs (GGUF / safetensors).
    pub const MISTRALRS: BackendKind = BackendKind(Cow::Borrowed("mistralrs"));

    /// The backend of this name (checked when the job runs).
    pub fn named(name: impl Into<String>) -> BackendKind {
        BackendKind(Cow::Owned(name.into()))
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The backend for a model path: the first registered backend that takes it;
    /// anything none takes goes to tract (which names what it cannot read).
    pub fn of(model: &Path) -> BackendKind {
        crate::backend::for_model(model)
            .map(|b| BackendKind(Cow::Borrowed(b.name())))
            .unwrap_or(BackendKind::TRACT)
    }

    /// How this backend profiles a latency table by default (tract's settings for a
    /// name no backend has: the run then fails with that name).
    pub fn profile_settings(&self) -> ProfileSettings {
        self.backend().profile_settings()
    }

    /// The CPU threads this backend targets by default.
    pub fn default_threads(&self) -> usize {
        self.backend().default_threads()
    }

    fn backend(&self) -> &'static dyn crate::backend::Backend {
        crate::backend::named(self.name()).unwrap_or(&crate::backend::tract::TractBackend)
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// CPU with this many threads.
    Cpu {
        /// Threads (1 and N are different targets).
        threads: usize,
    },
    /// CUDA device of this index.
    Cuda {
        /// Device index.
        device: usize,
    },
}

/// Everything a prune run needs, resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneJob {
    /// A name for outputs and generated constants (default: the model's file stem).
    #[serde(default)]
    pub name: Option<String>,
    /// Source model file (ONNX, GGUF) or folder (safetensors).
    pub model: PathBuf,
    /// Runtime.
    pub backend: BackendKind,
    /// Deployment target.
    pub device: Device,
    /// The workload budgets are stated for.
    pub workload: Workload,
    /// Budgets: one model is emitted per budget, all from one calibration and one
    /// database.
    pub budgets: Vec<Budget>,
    /// Calibration data; `None` = random token ids (only sensible for test models).
    pub calibration: Option<CalibrationData>,
    /// Number of random samples when no calibration data is given.
    pub random_samples: usize,
    /// The calibration used instead of [`PruneJob::calibration`] when the loaded model
    /// has a chat template: the same data files plus one share of the samples from the
    /// model's own chat transcripts (`self`), so that a chat model calibrated on plain
    /// text keeps its chat (ZIPLM.md section 9). [`crate::job::JobRequest::resolve`]
    /// sets it for backends whose models chat, unless `--no-self-chat` /
    /// `calibration.self_chat = false`; `None` = always `calibration`.
    #[serde(default)]
    pub chat_calibration: Option<CalibrationData>,
    /// The model's `tokenizer.json` (default: next to the model).
    pub tokenizer: Option<PathBuf>,
    /// Folder for the emitted models and reports.
    pub out_dir: PathBuf,
    /// Latency table to reuse and update (profiled when absent or stale).
    pub latency_table: Option<PathBuf>,
    /// Seed for sampling and refinement.
    pub seed: u64,
    /// GQA head removal policy.
    pub gqa_policy: GqaPolicy,
    /// Database settings.
    pub database: DatabaseConfig,
    /// Profiling settings.
    pub profile: ProfileSettings,
    /// Search settings.
    pub search: SearchSettings,
    /// Time dense and pruned models end to end and correct misses.
    pub verify: bool,
    /// Timing settings of the verification.
    pub verify_settings: ProfileSettings,
    /// Options of the job's backend (`gguf_dtype`, `nnef`, ...: see each backend's
    /// [`crate::backend::Backend::options`]).
    #[serde(default)]
    pub options: BackendOptions,
    /// Distil each pruned model towards the dense one after verification (the gradual
    /// mode); `None` = one-shot.
    #[serde(default)]
    pub recovery: Option<RecoverySettings>,
    /// Calibration windows to keep out of every fit even without `recovery`: for a
    /// caller that recovers outside the pipeline ([`crate::pipeline::Session::recover`]
    /// on a finished run). See [`PruneJob::held_out_windows`].
    #[serde(default)]
    pub hold_out: usize,
    /// Re-fit every pruned block on the pruned model's own inputs after each search
    /// (sequential correction, ZIPLM.md section 8; [`crate::pipeline::correct`]).
    #[serde(default)]
    pub sequential: bool,
    /// What sequential correction fits each block to.
    #[serde(default)]
    pub sequential_target: crate::pipeline::correct::SequentialTarget,
    /// Sequential correction keeps the database's choice of heads and neurons and only
    /// re-fits their out-projection columns (instead of re-choosing them on the
    /// re-targeted weights).
    #[serde(default)]
    pub sequential_keep_choice: bool,
}

/// Checks a list of budgets: at least one, each valid, none twice.
fn check_budgets(budgets: &[Budget]) -> crate::Result<()> {
    if budgets.is_empty() {
        return Err(crate::Error::Invalid(
            "no budget given: ask for a latency (ms) or a speedup".into(),
        ));
    }
    for (i, b) in budgets.iter().enumerate() {
        b.validate()?;
        if budgets[..i].contains(b) {
            return Err(crate::Error::Invalid(format!(
                "the budget {} is given twice: give each budget once",
                PruneJob::budget_label(b)
            )));
        }
    }
    Ok(())
}

impl PruneJob {
    /// A job with defaults that work out of the box: CPU with the backend's default
    /// threads (one for tract, candle's pool for mistral.rs), prefill 1x128,
    /// a 1.5x speedup, random calibration ids unless data is given.
    pub fn new(model: impl Into<PathBuf>) -> PruneJob {
        let model = model.into();
        let backend = BackendKind::of(&model);
        let profile = backend.profile_settings();
        let threads = backend.default_threads();
        PruneJob {
            name: None,
            out_dir: PathBuf::from("ziplm-out"),
            model,
            backend,
            device: Device::Cpu { threads },
            workload: Workload::prefill(1, 128),
            budgets: vec![Budget::Speedup(1.5)],
            calibration: None,
            random_samples: 64,
            tokenizer: None,
            latency_table: None,
            seed: 0,
            gqa_policy: GqaPolicy::WholeKvGroups,
            database: DatabaseConfig::default(),
            profile,
            search: SearchSettings::default(),
            verify: true,
            verify_settings: ProfileSettings::new(3, 15),
            options: BackendOptions::default(),
            recovery: None,
            hold_out: 0,
            sequential: false,
            sequential_target: Default::default(),
            sequential_keep_choice: false,
            chat_calibration: None,
        }
    }

    /// Checks that the job asks for at least one budget, that each is valid, and that
    /// none is given twice.
    pub fn check_budgets(&self) -> crate::Result<()> {
        check_budgets(&self.budgets)
    }

    /// Checks that the job's name, which becomes part of every output file name, is one
    /// plain path component (no folder, not hidden, not empty).
    pub fn check_name(&self) -> crate::Result<()> {
        let Some(name) = &self.name else {
            return Ok(());
        };
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0'])
            && Path::new(name).is_relative();
        if plain {
            Ok(())
        } else {
            Err(crate::Error::Invalid(format!(
                "the model name {name:?} is not a plain file name: it names the output files inside the output folder, so give one without '/', '\\' or a leading '.'"
            )))
        }
    }

    /// The job's name: the configured one, or the model's file stem.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let name = match self.model.is_dir() {
                true => self.model.file_name(),
                false => self.model.file_stem(),
            };
            name.and_then(|s| s.to_str()).unwrap_or("model").to_string()
        })
    }

    /// A budget as a file-name fragment: `speedup-1.5` or `latency-8ms`. Numbers are
    /// written in the shortest form that reads back exactly, in exponent form when
    /// that is shorter than 12 characters would allow (`speedup-1e-300`).
    pub fn budget_label(budget: &Budget) -> String {
        fn number(x: f64) -> String {
            let plain = format!("{x}");
            if plain.len() <= 12 {
                plain
            } else {
                format!("{x:e}")
            }
        }
        match budget {
            Budget::Speedup(s) => format!("speedup-{}", number(*s)),
            Budget::LatencyMs(ms) => format!("latency-{}ms", number(*ms)),
        }
    }

    /// Calibration windows the pipeline keeps out of the database, the correction and
    /// the recovery's training, so that the recovery's early stopping reads text no
    /// fit has seen ([`crate::pipeline::JobRun::held_out`]): `recovery.held_out` when
    /// the job recovers, at least `hold_out`.
    pub fn held_out_windows(&self) -> usize {
        self.recovery
            .as_ref()
            .map_or(0, |r| r.held_out)
            .max(self.hold_out)
    }

    /// File stem of the model emitted for a budget, e.g. `model.speedup-1.5` or
    /// `model.latency-8ms`.
    pub fn output_stem(&self, budget: &Budget) -> String {
        format!("{}.{}", self.display_name(), Self::budget_label(budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_labels_are_short_and_read_back_exactly() {
        let label = |b| PruneJob::budget_label(&b);
        assert_eq!(label(Budget::Speedup(1.5)), "speedup-1.5");
        assert_eq!(label(Budget::LatencyMs(8.0)), "latency-8ms");
        assert_eq!(label(Budget::Speedup(1e-300)), "speedup-1e-300");
        assert_eq!(label(Budget::LatencyMs(1e300)), "latency-1e300ms");
        let x = 1.0f64 / 3.0;
        let l = label(Budget::Speedup(x));
        assert!(l.len() < 32, "{l}");
        assert_eq!(l["speedup-".len()..].parse::<f64>().unwrap(), x);
    }

    #[test]
    fn names_are_one_plain_path_component() {
        let mut job = PruneJob::new("model.onnx");
        for bad in ["../../escape", "/abs/path", "", ".hidden", "a/b", "a\\b"] {
            job.name = Some(bad.into());
            let e = job.check_name().unwrap_err().to_string();
            assert!(e.contains("plain file name"), "{bad}: {e}");
        }
        for good in ["minilm", "smollm2.q8", "my-model_2"] {
            job.name = Some(good.into());
            job.check_name().unwrap();
        }
    }

    #[test]
    fn a_budget_given_twice_is_refused() {
        let mut job = PruneJob::new("model.onnx");
        job.budgets = vec![
            Budget::Speedup(1.5),
            Budget::Speedup(2.0),
            Budget::Speedup(1.5),
        ];
        let e = job.check_budgets().unwrap_err().to_string();
        assert!(e.contains("speedup-1.5 is given twice"), "{e}");
    }
}
