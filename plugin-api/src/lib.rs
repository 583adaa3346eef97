//! The contract between the ziplm engine and a runtime adapter.
//!
//! A runtime adapter (tract, mistral.rs, or one a third party writes) describes a
//! transformer to the engine and carries out what the engine decides. This crate names
//! no runtime: it holds the data types both sides exchange and the traits an adapter
//! implements.
//!
//! The flow, with the type each step hands over:
//!
//! 1. [`ModelAdapter::structure`] describes the prunable blocks ([`ModelStructure`]):
//!    attention and FFN blocks in order, with the [`ShapeConstraints`] the runtime
//!    imposes on a pruned model.
//! 2. [`ModelAdapter::calibrate`] runs the dense model on calibration samples and
//!    streams the inputs of every out-projection / down-projection into an
//!    [`ActivationSink`] (the engine accumulates the Gram matrices).
//! 3. [`ModelAdapter::out_projection`] reads the weights the engine compensates.
//! 4. [`LatencyProfiler`] times blocks of a given [`BlockShape`] at a [`Workload`] on a
//!    target named by a [`TargetFingerprint`]; results live in a [`LatencyTable`].
//! 5. The engine searches a [`Plan`] (kept heads / neurons per block) and hands it,
//!    with the compensated weights ([`PrunedWeights`]), to [`ModelAdapter::emit`].
//! 6. A [`LossHook`] scores a candidate [`PrunedWeights`] on calibration batches.
//! 7. [`ModelAdapter::paired_streams`] runs the dense and the pruned model side by
//!    side, block by block, and hands each block's inputs from both to a
//!    [`PairedSink`] (sequential correction re-fits every block on the pruned model's
//!    own inputs).
//!
//! Every plan, latency table and report type is `serde` with a stable JSON form:
//! fields are never renamed within a major version, maps are ordered.
//!
//! ```
//! use ziplm_plugin_api::{AttentionShape, BlockKind, GqaPolicy, GroupLayout};
//! // A Llama-style attention block: 9 query heads sharing 3 KV heads of 64.
//! let kind = BlockKind::Attention(AttentionShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 });
//! // Removing whole KV groups: 3 groups of 3 query heads = 192 out-projection columns each.
//! let layout = GroupLayout::for_kind(&kind, GqaPolicy::WholeKvGroups);
//! assert_eq!(layout.groups.len(), 3);
//! assert_eq!(layout.groups[0].len(), 192);
//! ```
#![deny(missing_docs)]

mod adapter;
mod calibration;
mod error;
mod groups;
mod latency;
mod plan;
mod sequential;
mod structure;
mod workload;

pub use adapter::{LatencyProfiler, LossHook, ModelAdapter, TimedRun};
pub use calibration::ActivationSink;
pub use error::{AdapterError, AdapterResult};
pub use groups::{GroupLayout, GroupSchedule};
pub use latency::{
    BlockShape, LatencyEntry, LatencyTable, LatencyTableKey, Measured, PairedTiming, Timing,
};
pub use plan::{
    BlockChoice, BlockPlan, EmitSummary, Plan, PrunedWeights, WeightMatrix, ROLE_GATE, ROLE_K,
    ROLE_Q, ROLE_UP, ROLE_V,
};
pub use sequential::{PairedSink, PairedStreams};
pub use structure::{
    AttentionShape, BlockId, BlockKind, FfnShape, GqaPolicy, LayerIndex, ModelStructure,
    ModuleRemoval, PrunableBlock, ShapeConstraints,
};
pub use workload::{Phase, TargetFingerprint, Workload};

/// Version of the JSON forms of plans, latency tables and reports written by this crate.
///
/// Readers refuse files with a different major version.
pub const FORMAT_VERSION: u32 = 1;
