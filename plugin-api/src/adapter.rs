//! The traits a runtime adapter implements.

use crate::calibration::ActivationSink;
use crate::error::AdapterResult;
use crate::groups::GroupLayout;
use crate::latency::Measured;
use crate::plan::{EmitSummary, Plan, PrunedWeights, WeightMatrix};
use crate::sequential::PairedStreams;
use crate::structure::{BlockId, ModelStructure};
use crate::workload::{TargetFingerprint, Workload};
use std::path::Path;
use std::time::Duration;

/// A loaded model the engine can prune.
///
/// Invariants the engine relies on: [`ModelAdapter::structure`] never changes after
/// loading; `out_projection(b)` has `hidden` rows and `out_proj_inputs()` columns of
/// block `b`; calibration activations come from the dense model.
pub trait ModelAdapter {
    /// The prunable blocks and the runtime's shape constraints.
    fn structure(&self) -> &ModelStructure;

    /// The removable column groups of a block. The default is the standard layout for
    /// its kind under the model's GQA policy; override it for unusual head layouts.
    fn group_layout(&self, block: BlockId) -> GroupLayout {
        let s = self.structure();
        let b = &s.blocks[block.index()];
        GroupLayout::for_kind(&b.kind, s.constraints.gqa_policy)
    }

    /// Sets the token-id samples [`ModelAdapter::calibrate`] runs the model on. The
    /// default refuses (for an adapter that brings its own calibration data).
    fn set_calibration(&mut self, samples: Vec<Vec<i64>>) -> AdapterResult<()> {
        let _ = samples;
        Err(crate::AdapterError::Unsupported {
            what: "calibration samples from the engine".into(),
            detail: "this adapter calibrates on its own data".into(),
            hint: "give the adapter its data directly".into(),
        })
    }

    /// The size of the token vocabulary, when known (random calibration ids need it).
    fn vocab_size(&self) -> Option<usize> {
        None
    }

    /// Runs the dense model on the adapter's calibration samples and feeds the
    /// out-projection inputs of the blocks in `capture` to `sink`.
    ///
    /// The engine may call this several times with different subsets to bound memory.
    fn calibrate(
        &mut self,
        capture: &[BlockId],
        sink: &mut dyn ActivationSink,
    ) -> AdapterResult<()>;

    /// The out-projection of `block`, as `hidden x inputs` (outputs x inputs) f32,
    /// whatever the file layout.
    fn out_projection(&self, block: BlockId) -> AdapterResult<WeightMatrix>;

    /// The dense and the pruned model side by side on the calibration samples, for
    /// sequential correction ([`PairedStreams`]). The default refuses: the engine
    /// then reports that this adapter cannot correct sequentially.
    fn paired_streams(&self) -> AdapterResult<Box<dyn PairedStreams + '_>> {
        Err(crate::AdapterError::Unsupported {
            what: "sequential correction".into(),
            detail: "this adapter cannot run the dense and the pruned model side by side".into(),
            hint: "prune without sequential correction".into(),
        })
    }

    /// Writes the pruned model to `dest`: upstream rows deleted as the plan says,
    /// out-projections replaced by `weights` where given. Writes atomically: on error
    /// `dest` keeps its old content or does not exist.
    fn emit(&self, plan: &Plan, weights: &PrunedWeights, dest: &Path)
        -> AdapterResult<EmitSummary>;
}

/// Scores a candidate pruned model on calibration batches (lower is better).
///
/// Used by the search to refine per-layer error coefficients; must be deterministic.
pub trait LossHook {
    /// Loss of the model pruned by `plan` with compensated `weights`.
    fn loss(&mut self, plan: &Plan, weights: &PrunedWeights) -> AdapterResult<f64>;
}

/// One prepared, repeatable piece of work to time.
pub trait TimedRun {
    /// Runs once and returns the wall time of the timed part.
    fn run(&mut self) -> AdapterResult<Duration>;
}

/// Times block shapes on a target. The engine does the warm-up, the repetitions and
/// the statistics; the profiler only prepares and runs.
pub trait LatencyProfiler {
    /// Where the timings are taken.
    fn target(&self) -> TargetFingerprint;

    /// The model family's non-prunable part, as stored in
    /// [`crate::LatencyTableKey::model`]. Leave out what pruning changes (heads, FFN
    /// widths, layer counts), so a pruned model reuses its original's table (the
    /// mistral.rs key does; tract's still counts blocks).
    fn model_key(&self) -> String;

    /// Prepares `what` at `workload`: build and optimise the runnable once, so
    /// [`TimedRun::run`] times only the execution.
    fn prepare<'a>(
        &'a mut self,
        what: &Measured,
        workload: &Workload,
    ) -> AdapterResult<Box<dyn TimedRun + 'a>>;
}
