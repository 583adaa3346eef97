//! What the model is timed on: the workload and the target.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Prefill (process a prompt) or decode (one step with a KV cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// All `seq_len` tokens in one pass (encoders, prompt processing).
    Prefill,
    /// `seq_len` new tokens (usually 1) attending to `kv_len` cached tokens.
    Decode {
        /// Length of the KV cache already filled.
        kv_len: usize,
    },
}

/// The shape of the work a budget is stated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Workload {
    /// Sequences per call.
    pub batch: usize,
    /// Tokens per sequence in this call.
    pub seq_len: usize,
    /// Prefill or decode.
    #[serde(flatten)]
    pub phase: Phase,
}

impl Workload {
    /// A prefill workload.
    pub fn prefill(batch: usize, seq_len: usize) -> Self {
        Workload {
            batch,
            seq_len,
            phase: Phase::Prefill,
        }
    }

    /// A decode workload: `batch` sequences, one new token each, `kv_len` cached.
    pub fn decode(batch: usize, kv_len: usize) -> Self {
        Workload {
            batch,
            seq_len: 1,
            phase: Phase::Decode { kv_len },
        }
    }

    /// Checks that every dimension is positive.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch == 0 {
            return Err("workload batch must be at least 1".into());
        }
        if self.seq_len == 0 {
            return Err("workload sequence length must be at least 1".into());
        }
        if self.phase == (Phase::Decode { kv_len: 0 }) {
            return Err("a decode workload needs at least one cached token (kv_len >= 1)".into());
        }
        Ok(())
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.phase {
            Phase::Prefill => write!(f, "prefill batch {} x {} tokens", self.batch, self.seq_len),
            Phase::Decode { kv_len } => write!(
                f,
                "decode batch {} x {} tokens after {} cached",
                self.batch, self.seq_len, kv_len
            ),
        }
    }
}

/// A stable description of where latencies were measured.
///
/// Two fingerprints are the same target exactly when they are equal: a latency table
/// measured on one target is never reused for another.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TargetFingerprint {
    /// Runtime name (`tract`, `mistralrs`...).
    pub runtime: String,
    /// Exact runtime version.
    pub runtime_version: String,
    /// Device description: CPU model and features, or GPU name and compute capability.
    pub device: String,
    /// Threads the runtime uses (1 and N threads are different targets); 0 for a GPU,
    /// whose speed the host's threads do not set.
    pub threads: usize,
    /// Data type the model is served in (`f32`, `f16`, `q8_0`...).
    pub dtype: String,
}

impl fmt::Display for TargetFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.threads == 0 {
            return write!(
                f,
                "{} {} on {} ({})",
                self.runtime, self.runtime_version, self.device, self.dtype
            );
        }
        write!(
            f,
            "{} {} on {} ({} thread{}, {})",
            self.runtime,
            self.runtime_version,
            self.device,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.dtype
        )
    }
}
