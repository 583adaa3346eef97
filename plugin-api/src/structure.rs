//! What a model's prunable blocks are, and what shapes the runtime can serve.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Index of a prunable block in [`ModelStructure::blocks`] (model order).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The index as a `usize`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// Index of a transformer layer (0-based, model order).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LayerIndex(pub u32);

impl fmt::Debug for LayerIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}", self.0)
    }
}

impl fmt::Display for LayerIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {}", self.0)
    }
}

/// Shape of a multi-head attention block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttentionShape {
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (= `n_heads` without grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Query heads that share one KV head.
    pub fn heads_per_kv(&self) -> usize {
        self.n_heads / self.n_kv_heads.max(1)
    }

    /// Input width of the out-projection (`n_heads * head_dim`).
    pub fn out_proj_inputs(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// Shape of a feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FfnShape {
    /// Number of intermediate neurons.
    pub width: usize,
    /// Gated FFN (SwiGLU: gate and up projections) rather than a single up projection.
    pub gated: bool,
}

/// The kind and original shape of a prunable block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Multi-head (possibly grouped-query) attention.
    Attention(AttentionShape),
    /// Feed-forward network.
    Ffn(FfnShape),
}

impl BlockKind {
    /// Input width of the block's out-projection (the matrix OBS compensates).
    pub fn out_proj_inputs(&self) -> usize {
        match self {
            BlockKind::Attention(a) => a.out_proj_inputs(),
            BlockKind::Ffn(f) => f.width,
        }
    }

    /// True for attention blocks.
    pub fn is_attention(&self) -> bool {
        matches!(self, BlockKind::Attention(_))
    }

    /// Short lower-case label: `attention` or `ffn`.
    pub fn label(&self) -> &'static str {
        match self {
            BlockKind::Attention(_) => "attention",
            BlockKind::Ffn(_) => "ffn",
        }
    }
}

/// One prunable block: an attention or FFN sub-layer of a transformer layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrunableBlock {
    /// Position in [`ModelStructure::blocks`].
    pub id: BlockId,
    /// Transformer layer the block belongs to.
    pub layer: LayerIndex,
    /// Kind and original shape.
    pub kind: BlockKind,
    /// Model (residual) width: the out-projection's output size.
    pub hidden: usize,
    /// Human-readable name, e.g. the runtime's node or tensor prefix.
    pub name: String,
}

/// How grouped-query attention heads may be removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GqaPolicy {
    /// Remove whole KV groups: a group's query heads together with its K/V rows.
    WholeKvGroups,
    /// Remove query heads one at a time but keep the same number in every KV group;
    /// K and V stay whole.
    EqualPerKvGroup,
}

/// Which whole modules (a block with nothing kept) the runtime can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleRemoval {
    /// Any attention or FFN block may be removed on its own.
    Independent,
    /// Only whole layers (attention and FFN together) may be removed.
    WholeLayerOnly,
    /// No block may be removed entirely.
    Never,
}

/// The shapes a runtime can load and serve after pruning.
///
/// The engine only proposes plans inside these constraints; an adapter that lies here
/// emits models its runtime refuses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShapeConstraints {
    /// How GQA heads may be removed (ignored without GQA).
    pub gqa_policy: GqaPolicy,
    /// Every attention block that is kept must keep the same number of heads.
    pub uniform_heads: bool,
    /// Every FFN block that is kept must keep the same width.
    pub uniform_ffn_width: bool,
    /// Kept FFN widths must be multiples of this (1 = any width).
    pub ffn_width_multiple: usize,
    /// Which whole modules may be removed.
    pub module_removal: ModuleRemoval,
    /// Attention blocks keep every head or go whole (a runtime that derives the head
    /// count from the model width, like mistral.rs's Qwen2 loader).
    #[serde(default, skip_serializing_if = "is_false")]
    pub fixed_heads: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for ShapeConstraints {
    fn default() -> Self {
        ShapeConstraints {
            gqa_policy: GqaPolicy::EqualPerKvGroup,
            uniform_heads: false,
            uniform_ffn_width: false,
            ffn_width_multiple: 32,
            module_removal: ModuleRemoval::Independent,
            fixed_heads: false,
        }
    }
}

/// A model as the engine sees it: prunable blocks in model order plus constraints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelStructure {
    /// Architecture family as the adapter names it (`bert`, `gpt2`, `llama`...).
    pub architecture: String,
    /// Prunable blocks; `blocks[i].id == BlockId(i)`.
    pub blocks: Vec<PrunableBlock>,
    /// What the runtime can serve.
    pub constraints: ShapeConstraints,
}

impl ModelStructure {
    /// The block with this id.
    pub fn block(&self, id: BlockId) -> Option<&PrunableBlock> {
        self.blocks.get(id.index())
    }

    /// Number of transformer layers (one more than the largest layer index).
    pub fn n_layers(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.layer.0 as usize + 1)
            .max()
            .unwrap_or(0)
    }

    /// Checks the internal consistency an adapter promises: ids in order, shapes
    /// non-empty and divisible as GQA requires. Returns the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        if self.blocks.is_empty() {
            return Err("the model has no prunable blocks".into());
        }
        if self.constraints.ffn_width_multiple == 0 {
            return Err("ffn_width_multiple must be at least 1".into());
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if b.id.index() != i {
                return Err(format!("block at position {i} has id {}", b.id.0));
            }
            if b.hidden == 0 {
                return Err(format!("{} ({}) has hidden size 0", b.id, b.name));
            }
            match b.kind {
                BlockKind::Attention(a) => {
                    if a.n_heads == 0 || a.head_dim == 0 || a.n_kv_heads == 0 {
                        return Err(format!(
                            "{} ({}) has an empty attention shape {a:?}",
                            b.id, b.name
                        ));
                    }
                    if a.n_heads % a.n_kv_heads != 0 {
                        return Err(format!(
                            "{} ({}): {} query heads are not divisible by {} KV heads",
                            b.id, b.name, a.n_heads, a.n_kv_heads
                        ));
                    }
                }
                BlockKind::Ffn(f) => {
                    if f.width == 0 {
                        return Err(format!("{} ({}) has FFN width 0", b.id, b.name));
                    }
                }
            }
        }
        Ok(())
    }
}
