//! The mistral.rs backend: Llama-architecture models (SmolLM2, TinyLlama, Llama, Mistral)
//! as GGUF files or Hugging Face folders, read and calibrated with candle, emitted as
//! GGUF files or safetensors folders stock mistralrs-core loads, and verified in
//! mistralrs-core itself.
//!
//! - [`gguf`]: bounds-checked header walk, then candle's reader and dequantisation.
//! - [`hf`]: Hugging Face folders (config.json + safetensors) read and written.
//! - [`llama`]: the f32 Llama forward (mistral.rs's `quantized_llama` semantics) with
//!   hooks at the o_proj / down_proj inputs.
//! - [`tokenizer`]: the GGUF-metadata tokenizer, built as mistral.rs builds it.
//! - [`model`]: the [`ziplm_plugin_api::ModelAdapter`]: structure, shape constraints,
//!   calibration, pruned weights.
//! - [`emit`]: writing the pruned GGUF file.
//! - [`profile`]: timing block shapes with candle's kernels.
//! - [`loss`]: the SPDY loss hook.
//! - [`generate`]: batched greedy generation with a KV cache on ziplm's forward.
//! - [`runtime`]: mistralrs-core: load, logits, prefill timing, chat.
//! - [`driver`]: a whole prune job.
//! - [`eval`]: perplexity of a model on a text.
//! - [`self_chat`]: the dense model's own chat transcripts (`--calibration self:N`).
//! - [`sequential`]: the dense and pruned streams sequential correction fits on
//!   (ZIPLM.md section 8).
//! - [`recovery`]: distillation of a pruned model towards the dense one (section 9).
//! - [`train_ops`]: the fused softmax and KL ops recovery trains through, with their
//!   backward passes.

pub mod driver;
pub mod emit;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod loss;
pub mod model;
pub mod options;
pub mod profile;
pub mod recovery;
pub mod runtime;
pub mod self_chat;
pub mod sequential;
pub mod tokenizer;
pub mod train_ops;

pub use driver::MistralBackend;

/// The candle device every tensor of this backend lives on: the one place that names
/// it. The CPU: candle is built here without CUDA, and `MistralSession::open` refuses a
/// CUDA target; the forward, the profiler and the corrections make their tensors on the
/// device of the weights they work with, so a CUDA target changes this function (with
/// the job's device index) and the runtime's device map.
pub fn target_device() -> candle_core::Device {
    candle_core::Device::Cpu
}
pub use model::{LlamaModel, LlamaOptions};
pub use runtime::LoadedModel;

/// Loads an artifact ziplm emitted (a GGUF file or a model folder) in mistral.rs, ready to serve: the one
/// call where an app's build step (`ziplm::build` writes the file into `OUT_DIR`) and its
/// serving code meet.
pub fn load_for_serving(path: &std::path::Path) -> crate::Result<LoadedModel> {
    Ok(LoadedModel::load(path)?)
}
