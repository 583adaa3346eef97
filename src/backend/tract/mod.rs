//! The tract backend: ONNX transformers in, pruned ONNX out, timed on the CPU or a
//! CUDA GPU.
//!
//! - [`inputs`]: the model's inputs by role and building them for a workload.
//! - [`recognize`]: the prunable blocks of the decluttered graph, by structure.
//! - [`model`]: [`TractModel`], the [`ziplm_plugin_api::ModelAdapter`] (calibration,
//!   weights, emit).
//! - [`onnx`]: rewriting the ONNX file for a plan (weights, head-count constants, KV
//!   cache shapes, removed branches).
//! - [`device`]: the target tract runs timed models on (CPU threads or a CUDA GPU);
//!   [`gpu`]: a GPU target's fingerprint and node placement; `cuda` (feature `cuda`,
//!   else a stand-in that says how to build it): tract-cuda's runtime.
//! - [`profile`]: timing block shapes with tract's optimised plan on the target.
//! - [`nnef`]: the emitted model as a tract NNEF archive.
//! - [`loss`]: the loss hook (output error of a candidate plan) for SPDY refinement.
//! - [`streams`]: the dense and pruned streams sequential correction fits on.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
mod cuda_off;
pub mod device;
pub mod driver;
pub mod encode;
pub mod gpu;
pub mod hook;
pub mod inputs;
pub mod loss;
pub mod model;
pub mod nnef;
pub mod onnx;
pub mod profile;
pub mod recognize;
pub mod streams;
pub mod surgery;

pub use driver::TractBackend;
pub use model::{TractModel, TractOptions};

/// The exact tract version this backend is built against (all tract crates pin it).
pub const TRACT_VERSION: &str = "0.23.9";
