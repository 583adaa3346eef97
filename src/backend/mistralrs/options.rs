//! The mistral.rs backend's typed options, read from a job's [`BackendOptions`]
//! (declared in [`crate::backend::LLM_OPTIONS`]).

use crate::error::{Error, Result};
use crate::job::BackendOptions;
use serde::{Deserialize, Serialize};

/// The tensor type of the pruned projections in an emitted GGUF file. Norms are always
/// F32; embeddings keep their stored type.
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

impl GgufDType {
    /// The type of an option value (`f32`, `f16`, `q8_0`, `q4_k`).
    pub fn parse(value: &str) -> Option<GgufDType> {
        Some(match value {
            "f32" => GgufDType::F32,
            "f16" => GgufDType::F16,
            "q8_0" => GgufDType::Q8_0,
            "q4_k" => GgufDType::Q4K,
            _ => return None,
        })
    }
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

/// What a job asks of the mistral.rs backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MistralOptions {
    /// Tensor type of the pruned projections in emitted GGUF files (`gguf_dtype`).
    pub gguf_dtype: GgufDType,
    /// Format of the emitted models (`llm_format`); `None` = the source's format.
    pub llm_format: Option<LlmFormat>,
    /// Fit the block table to the runtime before searching (`runtime_fit`, default
    /// true): two probe models timed in mistral.rs set per-kind scales
    /// ([`crate::runtime_fit`]).
    pub runtime_fit: bool,
    /// Solve the runtime fit again with each verified model's timing as one more
    /// point before the next search (`refit`, default false: opt-in after a CI run
    /// where it went wrong, README;
    /// [`crate::runtime_fit::Refit`]).
    pub refit: bool,
}

impl MistralOptions {
    /// Reads the options of a job (values the backend does not know are errors).
    pub fn of(options: &BackendOptions) -> Result<MistralOptions> {
        let bad = |name: &str, v: &str| {
            Error::Invalid(format!(
                "mistralrs option {name} = `{v}` is not a value it takes"
            ))
        };
        let gguf_dtype = match options.get("gguf_dtype") {
            None => GgufDType::F32,
            Some(v) => GgufDType::parse(v).ok_or_else(|| bad("gguf_dtype", v))?,
        };
        let llm_format = match options.get("llm_format") {
            None => None,
            Some("gguf") => Some(LlmFormat::Gguf),
            Some("safetensors") => Some(LlmFormat::Safetensors),
            Some(v) => return Err(bad("llm_format", v)),
        };
        Ok(MistralOptions {
            gguf_dtype,
            llm_format,
            runtime_fit: options.flag("runtime_fit", true),
            refit: options.flag("refit", false),
        })
    }
}
