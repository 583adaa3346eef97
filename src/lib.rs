//! ziplm: inference-aware structured pruning (ZipLM) of transformers to a latency
//! budget.
//!
//! The pipeline, one value handed to the next:
//!
//! ```text
//! load (adapter) -> calibrate + database (Database) -> profile (LatencyTable)
//!   -> search (SearchOutcome / Plan) -> emit (adapter) -> verify
//! ```
//!
//! - [`obs`]: the structured OBS mathematics for one layer.
//! - [`database`]: calibration and the per-block removal orders and errors.
//! - [`profile`]: timing block shapes and the persisted latency table.
//! - [`search`]: the budgeted DP, tied choices, SPDY refinement.
//!
//! Runtime adapters implement the traits of [`ziplm_plugin_api`] (re-exported as
//! [`api`]).

#![warn(missing_docs)]

pub mod backend;
pub mod baselines;
#[path = "build_api.rs"]
pub mod build;
mod cli;
pub mod config;
pub mod data;
pub mod database;
pub mod error;
pub mod frontier;
pub(crate) mod fsutil;
pub mod gguf_header;
pub mod hf_format;
pub mod inspect;
pub mod job;
pub(crate) mod memory;
pub mod obs;
pub mod outputs;
pub mod pipeline;
pub mod profile;
pub mod progress;
pub mod report;
pub mod runtime_fit;
pub mod search;
pub mod speedup;
pub mod target;

pub use error::{Error, Result};

/// The `ziplm` command line: parses `args` (program name first) and runs the command;
/// returns the exit code (0 success, 1 a budget missed, 2 an error).
pub fn run_cli(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> anyhow::Result<std::process::ExitCode> {
    cli::run(args)
}
pub use ziplm_plugin_api as api;

#[doc(hidden)]
pub use cli::resolve_prune_args;
