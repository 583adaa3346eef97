//! The paired streams of sequential correction (ZIPLM.md section 8) for an ONNX
//! model ([`ziplm_plugin_api::PairedStreams`]; the fit itself is the engine's,
//! `pipeline::correct`).
//!
//! tract runs whole graphs, so the pruned stream is a model: the plan so far (blocks
//! before the current one as advanced, the rest dense) is emitted to ONNX in memory
//! (the emit step's own bytes) and run beside the dense model on the same calibration
//! batches, both with the current block's out-projection input as an extra output.
//! That block is dense in both graphs, so its node keeps its name and layout; the
//! residual stream its output is added to is the sum's other input in each graph
//! (`surgery::residual_sum`). Cost per
//! corrected block: one forward of the calibration set through each model.

use super::inputs;
use super::model::{pad_batch, token_rows, typed_at, TractModel, CALIBRATION_BATCH};
use super::onnx::{self, OnnxFile};
use super::recognize;
use std::path::Path;
use tract_onnx::prelude::*;
use ziplm_plugin_api::{
    AdapterError, AdapterResult, BlockId, BlockPlan, ModelAdapter, PairedSink, PairedStreams, Plan,
    PrunedWeights, WeightMatrix, Workload,
};

fn runtime(context: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::runtime(context, format!("{e:#}"))
}

/// The dense model and the plan advanced so far.
pub struct TractStreams<'a> {
    model: &'a TractModel,
    plan: Plan,
    weights: PrunedWeights,
    next: usize,
}

impl<'a> TractStreams<'a> {
    /// Both streams at the start: the pruned one is the dense model.
    pub fn new(model: &'a TractModel) -> AdapterResult<TractStreams<'a>> {
        if model.calibration_samples().iter().all(|s| s.is_empty()) {
            return Err(AdapterError::Calibration(
                "sequential correction needs the calibration samples".into(),
            ));
        }
        Ok(TractStreams {
            model,
            plan: Plan::dense(model.structure()),
            weights: PrunedWeights::default(),
            next: 0,
        })
    }

    fn check(&self, block: BlockId) -> AdapterResult<()> {
        if block.index() != self.next || self.next >= self.plan.blocks.len() {
            return Err(AdapterError::InvalidRequest(format!(
                "the streams are at block {}, not at {block}: blocks go in model order",
                self.next
            )));
        }
        Ok(())
    }
}

/// A runnable of `typed` with two extra outputs: the input of out-projection node
/// `name` (slot `slot`) and the residual stream its output is added to.
fn with_capture(
    model: &TractModel,
    typed: &TypedModel,
    name: &str,
    slot: usize,
) -> AdapterResult<Arc<TypedSimplePlan>> {
    let node = typed
        .nodes()
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| {
            AdapterError::runtime(
                "sequential correction",
                format!("the pruned graph has no node {name}"),
            )
        })?;
    let outlet = node.inputs[slot];
    let (_, residual, _) = super::surgery::residual_sum(typed, node.id)
        .map_err(|e| runtime(&format!("finding the residual sum after {name}"), e))?;
    model
        .runnable_with(typed, &[outlet, residual])
        .map_err(|e| runtime("optimising a model for sequential correction", e))
}

impl PairedStreams for TractStreams<'_> {
    fn capture(&mut self, block: BlockId, sink: &mut dyn PairedSink) -> AdapterResult<()> {
        self.check(block)?;
        let model = self.model;
        let bytes = onnx::emit(model, &self.plan, &self.weights)?;
        let pruned_file = OnnxFile::from_bytes(&bytes, Path::new("<pruned so far>"))?;
        let pruned_specs = pruned_file
            .inference_model()
            .and_then(|m| inputs::input_specs(&m))
            .map_err(|e| runtime("reading the pruned model's inputs", e))?;
        let groups = model.length_groups();
        let batch = CALIBRATION_BATCH
            .min(groups.iter().map(|(_, g)| g.len()).sum())
            .max(1);
        for (len, group) in groups {
            let workload = Workload::prefill(batch, len);
            let dense = typed_at(model.file(), model.input_specs(), &workload)
                .map_err(|e| runtime(&format!("preparing the dense model at {workload}"), e))?;
            let blocks = recognize::recognize(&dense)
                .map_err(|e| runtime("recognising the dense graph", e))?;
            let o = blocks
                .get(block.index())
                .ok_or_else(|| AdapterError::InvalidRequest(format!("no {block}")))?
                .out_proj()
                .clone();
            let name = dense.node(o.node).name.clone();
            let pruned = typed_at(&pruned_file, &pruned_specs, &workload)
                .map_err(|e| runtime(&format!("preparing the pruned model at {workload}"), e))?;
            let dense_run = with_capture(model, &dense, &name, o.act_slot)?;
            let pruned_run = with_capture(model, &pruned, &name, o.act_slot)?;
            let n_dense = dense
                .output_outlets()
                .map_err(|e| runtime("model outputs", e))?
                .len();
            let n_pruned = pruned
                .output_outlets()
                .map_err(|e| runtime("model outputs", e))?
                .len();
            for chunk in group.chunks(batch) {
                let (ids, mask) = pad_batch(chunk, batch, len);
                let rows = |run: &Arc<TypedSimplePlan>,
                            specs: &[inputs::InputSpec],
                            n_out: usize| {
                    let inputs = inputs::build_inputs(specs, &workload, &ids, &mask)
                        .map_err(|e| runtime("building calibration inputs", e))?;
                    let outs = run
                        .run(inputs)
                        .map_err(|e| runtime("running sequential correction", e))?;
                    let read = |e| runtime(&format!("reading activations of {block}"), e);
                    let x = token_rows(&outs[n_out], &o.act_token_axes, &o.act_feature_axes, &mask)
                        .map_err(read)?;
                    // The residual stream: tokens first, the hidden features last.
                    let rank = outs[n_out + 1].rank();
                    let h = token_rows(
                        &outs[n_out + 1],
                        &(0..rank - 1).collect::<Vec<_>>(),
                        &[rank - 1],
                        &mask,
                    )
                    .map_err(read)?;
                    Ok::<_, AdapterError>((x, h))
                };
                let (x, h) = rows(&dense_run, model.input_specs(), n_dense)?;
                let (xt, ht) = rows(&pruned_run, &pruned_specs, n_pruned)?;
                sink.accept_residual(&h, &ht, o.outputs)?;
                sink.accept(&x, &xt, o.inputs())?;
            }
        }
        Ok(())
    }

    fn advance(
        &mut self,
        plan: &BlockPlan,
        out_projection: Option<&WeightMatrix>,
    ) -> AdapterResult<()> {
        self.check(plan.block)?;
        self.plan.blocks[self.next] = plan.clone();
        if let Some(m) = out_projection {
            self.weights.out_projections.insert(plan.block, m.clone());
        }
        self.plan
            .validate_for(self.model.structure())
            .map_err(AdapterError::InvalidRequest)?;
        self.next += 1;
        Ok(())
    }
}
