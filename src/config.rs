//! The serving config: latency budgets declared in TOML (a `ziplm.toml`, or the
//! `[package.metadata.ziplm]` table of an app's `Cargo.toml`).
//!
//! ```toml
//! [[model]]
//! source = "models/all-MiniLM-L6-v2/model.onnx"   # relative to this file
//! backend = "tract"                                # default: from the extension
//! seed = 0
//! [model.target]
//! threads = 1                                      # default: the backend's
//! # cuda = 0                                       # or a CUDA GPU (ONNX models)
//! [model.workload]
//! batch = 1
//! seq_len = 128
//! phase = "prefill"                                # or "decode" with kv_len
//! [model.budget]
//! speedup = [1.5, 2.0]                             # one model per budget
//! latency_ms = [8.0]
//! [model.calibration]
//! path = "data/sts-train.csv"
//! format = "sts_tsv"                               # text | jsonl | sts_tsv
//! samples = 512
//! seq_len = 128
//! [model.output]
//! dir = "pruned"
//! [model.profile]
//! latency_table = "latency/minilm-cpu1.json"       # reused when it matches the target
//! ```
//!
//! An LLM (mistralrs backend) may also recover each pruned model by distillation:
//!
//! ```toml
//! [model.recovery]
//! tokens = 1048576          # training tokens in all; required
//! learning_rate = 1e-5      # defaults: job::RecoverySettings
//! # learning_rate_trials = [1e-5, 3e-5]  # or chosen on held-out text
//! # chain = true, stage_tokens = [16384, 81920]  # a chain's tokens per stage
//! held_out = 8              # calibration windows kept for early stopping
//! ```
//!
//! A chat LLM with no data of its own can calibrate (and recover) on transcripts it
//! writes itself, cached by its hash (`crate::data::self_chat`):
//!
//! ```toml
//! [model.calibration]
//! path = "self:65536"       # or "self": as many tokens as samples x seq_len
//! ```
//!
//! A list of sources shares the samples evenly, e.g. encyclopaedia text and the model's
//! own chat: `path = ["wiki.txt", "self"]`. A chat LLM given data files gets that share
//! of its own chat by default (`path = "wiki.txt"` calibrates as `["wiki.txt", "self"]`);
//! `self_chat = false` keeps it to the files.
//!
//! Unknown keys and bad values are errors naming the file, the line and the key. A table
//! lowers into a [`JobRequest`], which the same step as the CLI's resolves.

use crate::data::DataFormat;
use crate::error::{Error, Result};
use crate::job::request::{JobRequest, Origin, RawOption};
use crate::job::{BackendKind, PruneJob};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use ziplm_plugin_api::GqaPolicy;

/// A serving config: one or more models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServingConfig {
    /// The models to prune.
    pub model: Vec<ModelConfig>,
}

/// One model and its budgets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A name for messages and outputs (default: the file stem).
    #[serde(default)]
    pub name: Option<String>,
    /// The model file or folder.
    pub source: PathBuf,
    /// `tract` or `mistralrs` (default: from the extension).
    #[serde(default)]
    pub backend: Option<BackendKind>,
    /// The tokenizer (default: `tokenizer.json` next to the model).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Seed.
    #[serde(default)]
    pub seed: u64,
    /// Where it runs.
    #[serde(default)]
    pub target: TargetConfig,
    /// The workload the budget is for.
    #[serde(default)]
    pub workload: WorkloadConfig,
    /// The budgets.
    pub budget: BudgetConfig,
    /// Calibration data.
    #[serde(default)]
    pub calibration: Option<CalibrationConfig>,
    /// Outputs.
    #[serde(default)]
    pub output: OutputConfig,
    /// Profiling.
    #[serde(default)]
    pub profile: ProfileConfig,
    /// Pruning options.
    #[serde(default)]
    pub pruning: PruningConfig,
    /// `[model.recovery]`: distil each pruned model towards the dense one (the gradual
    /// mode; mistralrs backend). `tokens` is required, the rest has defaults.
    #[serde(default)]
    pub recovery: Option<crate::job::RecoverySettings>,
}

/// `[model.target]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// CPU threads (default 1).
    #[serde(default)]
    pub threads: Option<usize>,
    /// CUDA device index: ONNX models on tract's CUDA runtime (feature `cuda`, or a
    /// latency table profiled on the GPU).
    #[serde(default)]
    pub cuda: Option<usize>,
}

/// `[model.workload]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Sequences per call.
    #[serde(default = "one")]
    pub batch: usize,
    /// Tokens per sequence (prefill) or new tokens (decode).
    #[serde(default = "default_seq")]
    pub seq_len: usize,
    /// `prefill` or `decode`.
    #[serde(default = "prefill")]
    pub phase: String,
    /// KV cache length (decode).
    #[serde(default)]
    pub kv_len: Option<usize>,
}

fn one() -> usize {
    1
}
fn default_seq() -> usize {
    128
}
fn prefill() -> String {
    "prefill".into()
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            batch: 1,
            seq_len: 128,
            phase: prefill(),
            kv_len: None,
        }
    }
}

/// `[model.budget]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Target speedups.
    #[serde(default)]
    pub speedup: Vec<f64>,
    /// Target latencies (ms).
    #[serde(default)]
    pub latency_ms: Vec<f64>,
}

/// `[model.calibration]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationConfig {
    /// The data file, or `self` / `self:N`: chat transcripts the model writes itself
    /// (chat LLMs in the mistralrs backend); or a list of them, which share the samples.
    pub path: CalibrationPaths,
    /// Its format (default: from the extension).
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// Samples.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Tokens per sample (default: the backend's, 128; 512 for LLMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    /// A chat LLM calibrated on data files also calibrates on one more share of its own
    /// chat transcripts (default true; `false` = the files alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_chat: Option<bool>,
}

/// `[model.calibration] path`: one source, or a list that shares the samples.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CalibrationPaths {
    /// `path = "data.txt"`.
    One(PathBuf),
    /// `path = ["data.txt", "self:16384"]`.
    Many(Vec<PathBuf>),
}

impl<'de> Deserialize<'de> for CalibrationPaths {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = CalibrationPaths;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a data file, \"self:N\", or a list of them")
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(CalibrationPaths::One(v.into()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = vec![];
                while let Some(p) = seq.next_element::<PathBuf>()? {
                    v.push(p);
                }
                if v.is_empty() {
                    return Err(serde::de::Error::invalid_length(0, &self));
                }
                Ok(CalibrationPaths::Many(v))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl CalibrationPaths {
    /// The sources, in the order written.
    pub fn as_slice(&self) -> &[PathBuf] {
        match self {
            CalibrationPaths::One(p) => std::slice::from_ref(p),
            CalibrationPaths::Many(v) => v,
        }
    }
}

fn default_samples() -> usize {
    256
}

/// `[model.output]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Output folder.
    #[serde(default = "default_out")]
    pub dir: PathBuf,
    /// Output format (`onnx` for tract, or `nnef` for ONNX plus a tract NNEF archive;
    /// for mistralrs `gguf` (f32 projections), `gguf-f16`, `gguf-q8_0`, `gguf-q4_k`, or
    /// `safetensors` (a Hugging Face folder, one FFN width for every layer)).
    #[serde(default)]
    pub format: Option<String>,
}

fn default_out() -> PathBuf {
    PathBuf::from("ziplm-out")
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: default_out(),
            format: None,
        }
    }
}

/// `[model.profile]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Latency table to reuse (and write when profiling).
    #[serde(default)]
    pub latency_table: Option<PathBuf>,
    /// Timed runs per shape.
    #[serde(default)]
    pub runs: Option<usize>,
    /// Skip end-to-end verification.
    #[serde(default)]
    pub no_verify: bool,
    /// Search with the block table as profiled, without fitting it to the runtime
    /// first (mistralrs backend).
    #[serde(default)]
    pub no_runtime_fit: bool,
    /// Solve the runtime fit again with each verified model before the next search
    /// (mistralrs backend; experimental).
    #[serde(default)]
    pub refit: bool,
    /// Timings a verified model gets after its first while its ~95% interval
    /// straddles the budget, rounds pooled (default 2, at most 8).
    #[serde(default)]
    pub extra_timings: Option<usize>,
}

/// `[model.pruning]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruningConfig {
    /// FFN widths kept are multiples of this.
    #[serde(default)]
    pub ffn_multiple: Option<usize>,
    /// `whole_kv_groups` or `equal_per_kv_group`.
    #[serde(default)]
    pub gqa: Option<GqaPolicy>,
    /// SPDY refinement with at most this many loss evaluations (default 32; 0 = off).
    #[serde(default)]
    pub refine: Option<usize>,
    /// Verified searches after the first when a model misses or overshoots its budget
    /// (default 3, at most 16).
    #[serde(default)]
    pub retries: Option<usize>,
    /// Largest fraction of one layer's FFN neurons removed short of dropping the layer
    /// (default 1.0).
    #[serde(default)]
    pub max_ffn_removed: Option<f64>,
    /// Re-fit the kept out-projections on the pruned model's own inputs after each
    /// search (sequential correction, ZIPLM.md section 8).
    #[serde(default)]
    pub sequential: bool,
    /// Its target: `residual` (default) or `output`.
    #[serde(default)]
    pub sequential_target: Option<crate::pipeline::correct::SequentialTarget>,
    /// Keep the database's choice of heads and neurons and only re-fit them.
    #[serde(default)]
    pub sequential_keep_choice: Option<bool>,
}

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::Format {
        path: path.into(),
        detail: detail.into(),
    }
}

impl ModelConfig {
    /// The raw job this table stands for, with paths resolved against `base` (the
    /// config's folder); `file` names the config in errors.
    pub fn request(&self, file: &Path, base: &Path) -> JobRequest {
        let resolve = |p: &Path| resolve(base, p);
        let mut r = JobRequest::new(Origin::Config {
            file: file.to_path_buf(),
            model: self
                .name
                .clone()
                .unwrap_or_else(|| self.source.display().to_string()),
        });
        r.model = Some(resolve(&self.source));
        r.name = self.name.clone();
        r.backend = self.backend.as_ref().map(|b| b.name().to_string());
        r.tokenizer = self.tokenizer.as_deref().map(resolve);
        r.seed = Some(self.seed);
        r.threads = self.target.threads;
        r.cuda = self.target.cuda;
        r.batch = Some(self.workload.batch);
        r.seq_len = Some(self.workload.seq_len);
        r.phase = Some(self.workload.phase.clone());
        r.kv_len = self.workload.kv_len;
        r.speedup = self.budget.speedup.clone();
        r.latency_ms = self.budget.latency_ms.clone();
        if let Some(c) = &self.calibration {
            // `self` / `self:N` name self-written chat, not a file beside the config.
            r.calibration = c
                .path
                .as_slice()
                .iter()
                .map(
                    |p| match crate::data::self_chat::parse_spec(&p.to_string_lossy()) {
                        Some(_) => p.clone(),
                        None => resolve(p),
                    },
                )
                .collect();
            r.calibration_format = c.format;
            r.samples = Some(c.samples);
            r.calibration_seq_len = c.seq_len;
            r.self_chat = c.self_chat;
        }
        r.recovery = self.recovery.clone().map(|mut s| {
            s.teacher = s.teacher.as_deref().map(resolve);
            s
        });
        r.out = Some(resolve(&self.output.dir));
        r.output_format = self.output.format.clone();
        r.latency_table = self.profile.latency_table.as_deref().map(resolve);
        r.runs = self.profile.runs;
        r.verify = Some(!self.profile.no_verify);
        if self.profile.no_runtime_fit {
            r.options.push(RawOption {
                name: "runtime_fit".into(),
                value: "false".into(),
                spelled: "profile.no_runtime_fit".into(),
            });
        }
        if self.profile.refit {
            r.options.push(RawOption {
                name: "refit".into(),
                value: "true".into(),
                spelled: "profile.refit".into(),
            });
        }
        r.sequential = Some(self.pruning.sequential);
        r.sequential_target = self.pruning.sequential_target;
        r.sequential_keep_choice = self.pruning.sequential_keep_choice;
        r.ffn_multiple = self.pruning.ffn_multiple;
        r.max_ffn_removed = self.pruning.max_ffn_removed;
        r.gqa = self.pruning.gqa;
        r.refine = self.pruning.refine;
        r.retries = self.pruning.retries;
        r.extra_timings = self.profile.extra_timings;
        r
    }

    /// Resolves the table into a job ([`JobRequest::resolve`]): every value checked,
    /// errors naming the file, the model and the key.
    pub fn to_job(&self, file: &Path, base: &Path) -> Result<PruneJob> {
        Ok(self.request(file, base).resolve()?.job)
    }
}

/// Parses a serving config from TOML text (`file` names it in errors).
pub fn parse(text: &str, file: &Path) -> Result<ServingConfig> {
    toml::from_str(text).map_err(|e| bad(file, e.to_string().trim_end().to_string()))
}

#[derive(Deserialize)]
struct Manifest {
    package: Option<ManifestPackage>,
}
#[derive(Deserialize)]
struct ManifestPackage {
    metadata: Option<ManifestMetadata>,
}
#[derive(Deserialize)]
struct ManifestMetadata {
    ziplm: Option<ServingConfig>,
}

/// Reads the raw jobs of a serving config: a `ziplm.toml`, or a `Cargo.toml` whose
/// `[package.metadata.ziplm]` holds the same tables (found with `cargo_metadata`).
pub fn load_requests(path: &Path) -> Result<Vec<JobRequest>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let config = if path.file_name().is_some_and(|n| n == "Cargo.toml") {
        cargo_config(path, &text)?
    } else {
        parse(&text, path)?
    };
    if config.model.is_empty() {
        return Err(bad(path, "no [[model]] table"));
    }
    Ok(config
        .model
        .iter()
        .map(|m| m.request(path, &base))
        .collect())
}

/// Reads and resolves the jobs of a serving config ([`load_requests`]).
pub fn load_jobs(path: &Path) -> Result<Vec<PruneJob>> {
    load_requests(path)?
        .iter()
        .map(|r| Ok(r.resolve()?.job))
        .collect()
}

fn cargo_config(path: &Path, text: &str) -> Result<ServingConfig> {
    // cargo_metadata validates the manifest and tells whether the table exists; the
    // table itself is parsed from the text so errors carry line numbers.
    let meta = cargo_metadata::MetadataCommand::new()
        .manifest_path(path)
        .no_deps()
        .exec()
        .map_err(|e| bad(path, format!("cargo metadata failed: {e}")))?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let pkg = meta
        .packages
        .iter()
        .find(|p| {
            std::fs::canonicalize(p.manifest_path.as_std_path())
                .ok()
                .as_deref()
                == Some(canonical.as_path())
        })
        .ok_or_else(|| bad(path, "not a package manifest"))?;
    if pkg.metadata.get("ziplm").is_none() {
        return Err(bad(path, "no [package.metadata.ziplm] table"));
    }
    let m: Manifest =
        toml::from_str(text).map_err(|e| bad(path, e.to_string().trim_end().to_string()))?;
    m.package
        .and_then(|p| p.metadata)
        .and_then(|m| m.ziplm)
        .ok_or_else(|| bad(path, "no [package.metadata.ziplm] table"))
}

/// A relative path made absolute against `base` (helper for the build API).
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}
