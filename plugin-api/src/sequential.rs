//! The sequential-correction hook: how an adapter hands the engine paired inputs of
//! the dense and of the pruned model (ZIPLM.md section 8).

use crate::error::AdapterResult;
use crate::plan::{BlockPlan, WeightMatrix};
use crate::structure::BlockId;

/// Receives a block's out-projection inputs from the dense and from the pruned model,
/// token by token paired.
pub trait PairedSink {
    /// `dense` and `pruned` hold the same tokens in the same order,
    /// `dense.len() / width` rows of `width` values each (token-major): the vectors the
    /// out-projection multiplies in the dense model (`X`) and the same vectors computed
    /// from the pruned model's hidden state (`X~`, every column: the block itself is
    /// still dense upstream of its out-projection).
    fn accept(&mut self, dense: &[f32], pruned: &[f32], width: usize) -> AdapterResult<()>;

    /// The residual stream the block's output is added to, dense `h` and pruned `h~`
    /// (`hidden` values per token), for the tokens of the next
    /// [`PairedSink::accept`]. Optional: an adapter that cannot give it never calls
    /// it, and the correction then targets the dense block output alone.
    fn accept_residual(
        &mut self,
        dense: &[f32],
        pruned: &[f32],
        hidden: usize,
    ) -> AdapterResult<()> {
        let _ = (dense, pruned, hidden);
        Ok(())
    }
}

/// The dense and the pruned model run side by side on the calibration samples, block
/// by block in model order ([`crate::ModelAdapter::paired_streams`]).
///
/// The pruned stream starts dense. The engine calls, for every block in order,
/// [`PairedStreams::capture`] (zero or more times) and then [`PairedStreams::advance`]
/// once; a block is never captured after it was advanced past.
pub trait PairedStreams {
    /// Feeds `block`'s out-projection inputs, dense and pruned, to `sink`, in batches
    /// of any size. Blocks before it are pruned as advanced; it and the blocks after
    /// it are still dense in the pruned stream.
    fn capture(&mut self, block: BlockId, sink: &mut dyn PairedSink) -> AdapterResult<()>;

    /// Prunes `plan.block` in the pruned stream as `plan` says, with `out_projection`
    /// (outputs x the plan's kept columns) in place of its out-projection when given,
    /// and moves both streams past the block.
    fn advance(
        &mut self,
        plan: &BlockPlan,
        out_projection: Option<&WeightMatrix>,
    ) -> AdapterResult<()>;
}
