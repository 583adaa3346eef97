//! The correct stage: sequential correction of a chosen plan (ZIPLM.md section 8).
//!
//! The database fits every block on the DENSE model's inputs; once a plan is chosen,
//! the pruned model feeds each block other inputs and the errors add up with depth.
//! Here the blocks are taken in model order through the adapter's
//! [`ziplm_plugin_api::PairedStreams`]: for each pruned block, the paired inputs give
//! `H~` and `W*` ([`crate::obs::PairedGram`]), structured OBS on `(W*, H~)` re-chooses
//! the block's kept groups at the plan's count and fits their weights
//! ([`Database::rechoose`]), and the pruned stream moves on through the corrected
//! block. Every shape, and so the predicted latency, stays the plan's.
//!
//! Each block's target is [`SequentialTarget`]: by default ZIPLM.md's variant
//! `W X + (h - h~)`, which also cancels the drift its residual input carries (the
//! adapter gives the residual streams through [`PairedSink::accept_residual`]), the
//! dense block output `W X` alone, or the block's own output on the pruned inputs,
//! `W X~` (OBS on `(W, H~)`).
//!
//! Dense and removed blocks are left as they are (the emitters write a dense block's
//! own weights).

use crate::database::{to_faer, Database};
use crate::error::{Error, Result};
use crate::obs::PairedGram;
use crate::progress::Progress;
use crate::search::Selection;
use serde::{Deserialize, Serialize};
use ziplm_plugin_api::{
    AdapterError, AdapterResult, BlockChoice, BlockId, ModelAdapter, PairedSink, Plan,
    PrunedWeights,
};

/// What each corrected block is fitted to (`--sequential-target`,
/// `pruning.sequential_target`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SequentialTarget {
    /// `W X + (h - h~)`: the dense block output and the drift its residual input
    /// carries, so the residual sums of the two models agree as well as they can.
    #[default]
    Residual,
    /// `W X`: the dense block output alone.
    Output,
    /// `W X~`: the block's own dense weights on the pruned model's inputs, so OBS runs
    /// on `(W, H~)` (the sequential pass of SparseGPT and GPTQ). No cross term `C`:
    /// the kept weights are not regressed from the dense inputs onto the pruned ones,
    /// which shrinks them where the two streams differ much (attention after pruned
    /// attention).
    Inputs,
}

/// Feeds one block's paired inputs (and, for the drift variant, residuals) into its
/// accumulator.
struct BlockSink<'a> {
    acc: &'a mut PairedGram,
    block: BlockId,
    width: usize,
    residuals: bool,
}

impl PairedSink for BlockSink<'_> {
    fn accept(&mut self, dense: &[f32], pruned: &[f32], width: usize) -> AdapterResult<()> {
        if width != self.width {
            return Err(AdapterError::InvalidRequest(format!(
                "{}: paired activations of width {width}, the out-projection takes {}",
                self.block, self.width
            )));
        }
        self.acc
            .add(dense, pruned)
            .map_err(|e| AdapterError::Calibration(format!("{}: {e}", self.block)))
    }
    fn accept_residual(
        &mut self,
        dense: &[f32],
        pruned: &[f32],
        hidden: usize,
    ) -> AdapterResult<()> {
        if !self.residuals {
            return Ok(());
        }
        self.acc
            .add_residual(dense, pruned, hidden)
            .map_err(|e| AdapterError::Calibration(format!("{}: {e}", self.block)))
    }
}

/// The plan of `selection` and its out-projections, corrected block by block on the
/// pruned model's own inputs. `dampening` is relative to the mean diagonal of `H~`
/// (the database's). One progress unit per block.
pub fn correct(
    adapter: &dyn ModelAdapter,
    db: &Database,
    selection: &Selection,
    dampening: f64,
    target: SequentialTarget,
    keep_choice: bool,
    progress: &dyn Progress,
) -> Result<(Plan, PrunedWeights)> {
    crate::obs::serial_solvers();
    let cancel_drift = target == SequentialTarget::Residual;
    let mut plan = db.plan(selection)?;
    let mut weights = PrunedWeights::default();
    let mut streams = adapter.paired_streams().map_err(|e| match e {
        AdapterError::Unsupported { detail, .. } => Error::Invalid(format!(
            "sequential correction: {detail}; prune without --sequential (or pruning.sequential = false)"
        )),
        other => other.into(),
    })?;
    progress.start("sequential correction", plan.blocks.len() as u64);
    for (b, level) in selection.levels.iter().enumerate() {
        let block = &db.blocks[b].block;
        if plan.blocks[b].choice() != BlockChoice::Pruned {
            streams.advance(&plan.blocks[b], None)?;
            progress.advance(1);
            continue;
        }
        let width = block.kind.out_proj_inputs();
        let mut acc = PairedGram::new(width);
        streams.capture(
            block.id,
            &mut BlockSink {
                acc: &mut acc,
                block: block.id,
                width,
                residuals: cancel_drift,
            },
        )?;
        if cancel_drift && !acc.has_residuals() {
            return Err(Error::Invalid(format!(
                "sequential correction: the adapter gives no residual streams for {}, so the drift cannot be cancelled; use the output target (--sequential-target output)",
                block.id
            )));
        }
        let w = to_faer(&adapter.out_projection(block.id)?);
        let (w_star, h) = match target {
            SequentialTarget::Inputs => (w, acc.pruned_gram()?),
            _ => acc.retarget(w.as_ref(), dampening)?,
        };
        let (bp, fitted) = if keep_choice {
            db.refit(b, *level, &w_star, &h, dampening)?
        } else {
            db.rechoose(b, *level, &w_star, &h, dampening)?
        };
        streams.advance(&bp, fitted.as_ref())?;
        if let Some(m) = fitted {
            weights.out_projections.insert(block.id, m);
        }
        plan.blocks[b] = bp;
        progress.advance(1);
    }
    progress.finish();
    Ok((plan, weights))
}
