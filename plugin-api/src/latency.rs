//! Latency measurements and the persisted latency table.

use crate::workload::{TargetFingerprint, Workload};
use serde::{Deserialize, Serialize};

/// The shape of one block to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BlockShape {
    /// Attention with `heads` query heads and `kv_heads` KV heads kept.
    Attention {
        /// Model width.
        hidden: usize,
        /// Query heads kept.
        heads: usize,
        /// KV heads kept.
        kv_heads: usize,
        /// Width of one head.
        head_dim: usize,
    },
    /// FFN with `width` neurons kept.
    Ffn {
        /// Model width.
        hidden: usize,
        /// Neurons kept.
        width: usize,
        /// Gated (SwiGLU).
        gated: bool,
    },
}

/// What a profiler is asked to time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Measured {
    /// One prunable block of this shape (with its norm and residual as the runtime runs
    /// them).
    Block(BlockShape),
    /// Everything that is not prunable (embeddings, final norm, head, glue).
    Rest,
    /// A whole model file end to end (verification of an emitted model).
    Model(std::path::PathBuf),
}

/// Repeated timings of one thing: the median and its spread.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Median over the timed runs, in milliseconds.
    pub median_ms: f64,
    /// Fastest run, in milliseconds.
    pub min_ms: f64,
    /// Slowest run, in milliseconds.
    pub max_ms: f64,
    /// Number of timed runs (warm-up runs excluded).
    pub runs: usize,
}

impl Timing {
    /// A timing of exactly zero (a removed block).
    pub const ZERO: Timing = Timing {
        median_ms: 0.0,
        min_ms: 0.0,
        max_ms: 0.0,
        runs: 0,
    };

    /// Relative spread `(max - min) / median`, 0 for a zero median.
    pub fn relative_spread(&self) -> f64 {
        if self.median_ms > 0.0 {
            (self.max_ms - self.min_ms) / self.median_ms
        } else {
            0.0
        }
    }
}

/// A model timed against its dense model in one run of alternating rounds (each round
/// runs the dense model, then the model), so that a slow spell of the machine hits
/// both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedTiming {
    /// The dense model's runs.
    pub dense: Timing,
    /// The model's runs.
    pub model: Timing,
    /// The median over the rounds of the dense run's time over the model's run's time
    /// in the same round. Drift of the machine between rounds cancels in each ratio,
    /// which it does not in `dense.median_ms / model.median_ms`.
    pub speedup: f64,
    /// Each round's (dense, model) milliseconds, in order; empty when not kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<(f64, f64)>,
}

/// One measured block shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyEntry {
    /// The shape timed.
    pub shape: BlockShape,
    /// Its timing.
    pub timing: Timing,
}

/// What a latency table is valid for: reused only when all fields match.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LatencyTableKey {
    /// Where it was measured.
    pub target: TargetFingerprint,
    /// At which workload.
    pub workload: Workload,
    /// The model's non-prunable part (the adapter's description of it: architecture,
    /// hidden size, vocabulary, ...), which fixes the `rest` timing. Prunable sizes
    /// (heads, FFN widths) belong in the shapes, not here, so that a table serves the
    /// model and the models pruned from it.
    pub model: String,
}

/// Measured block latencies for one target, workload and model family.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyTable {
    /// [`crate::FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// What the table is valid for.
    pub key: LatencyTableKey,
    /// Time of everything not prunable.
    pub rest: Timing,
    /// Block timings, sorted by shape.
    pub entries: Vec<LatencyEntry>,
}

impl LatencyTable {
    /// The timing of `shape`, if measured.
    pub fn get(&self, shape: &BlockShape) -> Option<&Timing> {
        self.entries
            .binary_search_by(|e| e.shape.cmp(shape))
            .ok()
            .map(|i| &self.entries[i].timing)
    }

    /// Inserts or replaces a timing, keeping entries sorted.
    pub fn insert(&mut self, shape: BlockShape, timing: Timing) {
        match self.entries.binary_search_by(|e| e.shape.cmp(&shape)) {
            Ok(i) => self.entries[i].timing = timing,
            Err(i) => self.entries.insert(i, LatencyEntry { shape, timing }),
        }
    }
}
