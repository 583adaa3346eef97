//! The calibration hook: how an adapter hands activations to the engine.

use crate::error::AdapterResult;
use crate::structure::BlockId;

/// Receives the inputs of out-projections (attention output projection, FFN
/// down-projection) while an adapter runs the dense model on calibration samples.
///
/// Adapters call [`ActivationSink::accept`] once per block and batch, in any order of
/// blocks, as many batches as they like. The engine accumulates `H = 2 X X^T / N` in
/// f64, so it never needs all tokens at once.
pub trait ActivationSink {
    /// `rows` holds `rows.len() / width` tokens, each a row of `width` values (row-major,
    /// token-major): exactly the vectors the out-projection of `block` multiplies.
    ///
    /// `width` must equal the block's out-projection input width. Returning an error
    /// (NaN or Inf activations, wrong width) stops calibration.
    fn accept(&mut self, block: BlockId, rows: &[f32], width: usize) -> AdapterResult<()>;
}

impl<F> ActivationSink for F
where
    F: FnMut(BlockId, &[f32], usize) -> AdapterResult<()>,
{
    fn accept(&mut self, block: BlockId, rows: &[f32], width: usize) -> AdapterResult<()> {
        self(block, rows, width)
    }
}
