//! A resolved prune job: what the CLI flags, a serving config or `[package.metadata.ziplm]`
//! all turn into, and what a backend driver runs.

use crate::data::CalibrationData;
use crate::database::DatabaseConfig;
use crate::pipeline::SearchSettings;
use crate::profile::ProfileSettings;
use crate::search::Budget;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{GqaPolicy, Workload};

/// Which runtime serves the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// tract (ONNX, CPU).
    Tract,
    /// mistral.rs (GGUF / safetensors).
    Mistralrs,
}

impl BackendKind {
    /// The backend for a model path: `.gguf` files and folders are mistral.rs models,
    /// anything else goes to tract (which names what it cannot read).
    pub fn of(model: &Path) -> BackendKind {
        match model.extension().and_then(|e| e.to_str()) {
            Some("gguf") => BackendKind::Mistralrs,
            Some("onnx") => BackendKind::Tract,
            _ if model.is_dir() => BackendKind::Mistralrs,
            _ => BackendKind::Tract,
        }
    }

    /// How this backend profiles a latency table by default.
    pub fn profile_settings(self) -> ProfileSettings {
        match self {
            // Profiling a candle block is cheap: more runs, in passes.
            BackendKind::Mistralrs => {
                ProfileSettings::new(2, 15).in_passes(crate::profile::LLM_PROFILE_PASSES)
            }
            // Preparing a tract block model is not: one pass.
            BackendKind::Tract => ProfileSettings::new(2, 9),
        }
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

/// The tensor type of the pruned projections in an emitted GGUF file (mistral.rs
/// backend). Norms are always F32; embeddings keep their stored type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GgufDType {
    /// 32-bit floats: exact, and fast on any CPU (candle's f32 matmul picks its SIMD
    /// kernels at run time).
    #[default]
    F32,
    /// 16-bit floats.
    F16,
    /// ggml Q8_0 (32-wide blocks).
    Q8_0,
    /// ggml Q4_K (256-wide super-blocks: FFN widths become multiples of 256).
    Q4K,
}

/// The file format of models the mistral.rs backend emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmFormat {
    /// One GGUF file (`llama` architecture; per-layer FFN widths). Needs a GGUF source.
    Gguf,
    /// A Hugging Face folder (`config.json` + `model.safetensors` + tokenizer files),
    /// loaded by mistral.rs's `mistral` loader: one FFN width for every layer.
    Safetensors,
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
    /// Also write each emitted model as a tract NNEF archive (`.nnef.tar`).
    #[serde(default)]
    pub nnef: bool,
    /// Tensor type of the pruned projections in emitted GGUF files.
    #[serde(default)]
    pub gguf_dtype: GgufDType,
    /// Format of the emitted LLMs (mistralrs backend); `None` = the source's format.
    #[serde(default)]
    pub llm_format: Option<LlmFormat>,
    /// Fit the block table to the runtime before searching (mistralrs backend, when
    /// verifying): two probe models timed in mistral.rs set per-kind scales
    /// ([`crate::runtime_fit`]).
    #[serde(default = "yes")]
    pub runtime_fit: bool,
}

fn yes() -> bool {
    true
}

impl PruneJob {
    /// A job with defaults that work out of the box: CPU, one thread, prefill 1x128,
    /// a 1.5x speedup, random calibration ids unless data is given.
    pub fn new(model: impl Into<PathBuf>) -> PruneJob {
        let model = model.into();
        let backend = BackendKind::of(&model);
        PruneJob {
            name: None,
            out_dir: PathBuf::from("ziplm-out"),
            model,
            backend,
            device: Device::Cpu { threads: 1 },
            workload: Workload::prefill(1, 128),
            budgets: vec![Budget::Speedup(1.5)],
            calibration: None,
            random_samples: 64,
            tokenizer: None,
            latency_table: None,
            seed: 0,
            gqa_policy: GqaPolicy::WholeKvGroups,
            database: DatabaseConfig::default(),
            profile: match backend {
                // Profiling a candle block is cheap: more runs, in passes.
                BackendKind::Mistralrs => {
                    ProfileSettings::new(2, 15).in_passes(crate::profile::LLM_PROFILE_PASSES)
                }
                BackendKind::Tract => ProfileSettings::new(2, 9),
            },
            search: SearchSettings::default(),
            verify: true,
            verify_settings: ProfileSettings::new(3, 15),
            nnef: false,
            gguf_dtype: GgufDType::F32,
            llm_format: None,
            runtime_fit: true,
        }
    }

    /// Checks that the job asks for at least one budget and that each is valid.
    pub fn check_budgets(&self) -> crate::Result<()> {
        if self.budgets.is_empty() {
            return Err(crate::Error::Invalid(
                "no budget given: ask for a latency (ms) or a speedup".into(),
            ));
        }
        for b in &self.budgets {
            b.validate()?;
        }
        Ok(())
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

    /// A budget as a file-name fragment: `speedup-1.5` or `latency-8ms`.
    pub fn budget_label(budget: &Budget) -> String {
        match budget {
            Budget::Speedup(s) => format!("speedup-{s}"),
            Budget::LatencyMs(ms) => format!("latency-{ms}ms"),
        }
    }

    /// File stem of the model emitted for a budget, e.g. `model.speedup-1.5` or
    /// `model.latency-8ms`.
    pub fn output_stem(&self, budget: &Budget) -> String {
        format!("{}.{}", self.display_name(), Self::budget_label(budget))
    }
}
