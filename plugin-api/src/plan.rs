//! What to keep in every block, and the compensated weights that go with it.

use crate::structure::{BlockId, BlockKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What the plan keeps of one block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockPlan {
    /// The block.
    pub block: BlockId,
    /// Its original kind and shape.
    pub kind: BlockKind,
    /// Kept query heads (attention) or neurons (FFN), ascending. Empty = removed.
    pub kept: Vec<usize>,
    /// Kept KV heads (attention only; all of them unless whole KV groups were removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_kv_heads: Vec<usize>,
}

/// A summary of a block's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockChoice {
    /// Nothing removed.
    Dense,
    /// Some heads or neurons removed.
    Pruned,
    /// Everything removed: the branch contributes nothing.
    Removed,
}

impl BlockPlan {
    /// A plan that keeps the whole block.
    pub fn dense(block: BlockId, kind: BlockKind) -> BlockPlan {
        let (kept, kept_kv_heads) = match kind {
            BlockKind::Attention(a) => ((0..a.n_heads).collect(), (0..a.n_kv_heads).collect()),
            BlockKind::Ffn(f) => ((0..f.width).collect(), Vec::new()),
        };
        BlockPlan {
            block,
            kind,
            kept,
            kept_kv_heads,
        }
    }

    /// Dense, pruned or removed.
    pub fn choice(&self) -> BlockChoice {
        let full = match self.kind {
            BlockKind::Attention(a) => a.n_heads,
            BlockKind::Ffn(f) => f.width,
        };
        if self.kept.is_empty() {
            BlockChoice::Removed
        } else if self.kept.len() == full {
            BlockChoice::Dense
        } else {
            BlockChoice::Pruned
        }
    }

    /// The out-projection input columns the plan keeps, ascending.
    pub fn kept_columns(&self) -> Vec<usize> {
        match self.kind {
            BlockKind::Attention(a) => self
                .kept
                .iter()
                .flat_map(|&h| h * a.head_dim..(h + 1) * a.head_dim)
                .collect(),
            BlockKind::Ffn(_) => self.kept.clone(),
        }
    }
}

/// Per-block decisions for a whole model: the output of the search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// [`crate::FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Architecture the plan was made for ([`crate::ModelStructure::architecture`]).
    pub architecture: String,
    /// One entry per prunable block, in block order.
    pub blocks: Vec<BlockPlan>,
}

impl Plan {
    /// The plan that removes nothing.
    pub fn dense(structure: &crate::ModelStructure) -> Plan {
        Plan {
            format_version: crate::FORMAT_VERSION,
            architecture: structure.architecture.clone(),
            blocks: structure
                .blocks
                .iter()
                .map(|b| BlockPlan::dense(b.id, b.kind))
                .collect(),
        }
    }

    /// Checks that the plan fits `structure`: one entry per block, in order, with the
    /// same kinds, kept indices ascending and in range.
    pub fn validate_for(&self, structure: &crate::ModelStructure) -> Result<(), String> {
        if self.blocks.len() != structure.blocks.len() {
            return Err(format!(
                "the plan has {} blocks, the model {}",
                self.blocks.len(),
                structure.blocks.len()
            ));
        }
        for (p, b) in self.blocks.iter().zip(&structure.blocks) {
            if p.block != b.id || p.kind != b.kind {
                return Err(format!(
                    "plan entry {:?} does not match model {} ({:?})",
                    p.block, b.id, b.kind
                ));
            }
            let (n, n_kv) = match b.kind {
                BlockKind::Attention(a) => (a.n_heads, a.n_kv_heads),
                BlockKind::Ffn(f) => (f.width, 0),
            };
            for list in [(&p.kept, n), (&p.kept_kv_heads, n_kv)] {
                if list.0.windows(2).any(|w| w[0] >= w[1]) || list.0.iter().any(|&i| i >= list.1) {
                    return Err(format!(
                        "{}: kept indices must be ascending and below {}",
                        b.id, list.1
                    ));
                }
            }
            if let BlockKind::Attention(a) = b.kind {
                let per_kv = a.heads_per_kv();
                if let Some(h) = p
                    .kept
                    .iter()
                    .find(|&&h| !p.kept_kv_heads.contains(&(h / per_kv)))
                {
                    return Err(format!(
                        "{}: head {h} is kept but its KV head {} is not",
                        b.id,
                        h / per_kv
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A dense row-major f32 matrix of shape `rows x cols` (outputs x inputs).
#[derive(Clone, Debug, PartialEq)]
pub struct WeightMatrix {
    /// Number of rows (outputs).
    pub rows: usize,
    /// Number of columns (inputs).
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

impl WeightMatrix {
    /// A matrix from row-major data; `None` when the length does not match.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Option<WeightMatrix> {
        (data.len() == rows * cols).then_some(WeightMatrix { rows, cols, data })
    }

    /// Element at row `r`, column `c`.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }
}

/// The out-projection weights of every pruned block after OBS compensation, restricted
/// to the kept columns (in [`BlockPlan::kept_columns`] order). Blocks absent from the
/// map keep their original weights (dense or removed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrunedWeights {
    /// Compensated out-projection per block.
    pub out_projections: BTreeMap<BlockId, WeightMatrix>,
    /// Any other tensor of a block that a stage after the search replaced (sequential
    /// correction, recovery), by block and by the tensor's role in it ([`ROLE_Q`] ...),
    /// each at its pruned shape (kept rows x inputs). An adapter writes every entry or
    /// refuses the emit with an error: none is ever dropped.
    pub tensors: BTreeMap<BlockId, BTreeMap<String, WeightMatrix>>,
}

/// Role of an attention block's query projection in [`PrunedWeights::tensors`].
pub const ROLE_Q: &str = "q_proj";
/// Role of an attention block's key projection.
pub const ROLE_K: &str = "k_proj";
/// Role of an attention block's value projection.
pub const ROLE_V: &str = "v_proj";
/// Role of an FFN block's gate projection (gated FFNs).
pub const ROLE_GATE: &str = "gate_proj";
/// Role of an FFN block's up projection.
pub const ROLE_UP: &str = "up_proj";

impl PrunedWeights {
    /// The replaced tensor of `role` in `block`, if a stage set one.
    pub fn tensor(&self, block: BlockId, role: &str) -> Option<&WeightMatrix> {
        self.tensors.get(&block).and_then(|m| m.get(role))
    }

    /// The first (block, role) of [`PrunedWeights::tensors`] that `writes` says an
    /// adapter cannot write, for its error message.
    pub fn unwritable(&self, writes: impl Fn(BlockId, &str) -> bool) -> Option<(BlockId, &str)> {
        self.tensors
            .iter()
            .flat_map(|(b, m)| m.keys().map(move |r| (*b, r.as_str())))
            .find(|(b, r)| !writes(*b, r))
    }
}

/// What an emit step wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmitSummary {
    /// The file (or folder) written.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Prunable parameters before pruning.
    pub params_before: u64,
    /// Prunable parameters after pruning.
    pub params_after: u64,
}
