//! Runtime backends: each turns a model file into a [`ziplm_plugin_api::ModelAdapter`]
//! and measures, emits and verifies with its runtime.
//!
//! - [`tract`]: ONNX transformers on CPU with tract.

pub mod tract;
