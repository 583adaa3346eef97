//! Rewriting the original ONNX file for a plan.
//!
//! The pruned model is the original file with, per pruned block:
//! - the projection weights (and biases) sliced to the kept heads / neurons, the
//!   out-projection's rows sliced and replaced by the OBS-compensated weights;
//! - every shape constant that encodes a head count or a width rewritten (head splits,
//!   head merges, GQA repeat factors, fused-QKV split sizes), found by propagating
//!   axis roles from the projections ([`roles`]);
//! - KV-cache inputs and outputs re-declared with the kept KV heads;
//! - removed blocks bypassed as ZIPLM.md section 1 says ([`edit`]).
//!
//! Blocks are matched to the file by the values of their weights (the recognised
//! tract constants), never by names.

pub mod edit;
pub mod locate;
pub mod roles;
pub mod tensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tract_onnx::pb;
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, DimLike, TractErrorContext};
use ziplm_plugin_api::{AdapterError, AdapterResult, Plan, PrunedWeights};

pub use edit::{emit, emit_masked, keeps_bias_when_removed};

/// What rewriting the ONNX file for a plan needs of the loaded model: the file and
/// what tract recognised in it. `TractModel` implements it; the rewrite depends on
/// this trait only, not on the adapter.
pub trait OnnxSource {
    /// The file's path (for messages).
    fn source_path(&self) -> &Path;
    /// The parsed file.
    fn source_file(&self) -> &OnnxFile;
    /// The model's inputs by role.
    fn source_inputs(&self) -> &[crate::backend::tract::inputs::InputSpec];
    /// The workload the model was loaded at (concrete shapes).
    fn source_workload(&self) -> ziplm_plugin_api::Workload;
    /// The prunable structure.
    fn source_structure(&self) -> &ziplm_plugin_api::ModelStructure;
    /// The recognised blocks, in structure order.
    fn source_blocks(&self) -> &[crate::backend::tract::recognize::RecognizedBlock];
}

/// A parsed ONNX file.
#[derive(Clone)]
pub struct OnnxFile {
    /// The protobuf model.
    pub proto: pb::ModelProto,
    /// The file it came from.
    pub path: PathBuf,
}

impl OnnxFile {
    /// The positions the model has, when it stores a learned position-embedding table
    /// (`...position_embeddings...` as BERT exports write it, `wpe` as GPT-2's): the rows
    /// of that table. `None` for rotary or unknown position schemes.
    pub fn max_positions(&self) -> Option<usize> {
        let graph = self.proto.graph.as_ref()?;
        graph
            .initializer
            .iter()
            .filter(|t| t.name.contains("position_embeddings") || t.name.contains("wpe."))
            .find_map(|t| match t.dims.as_slice() {
                [rows, _] if *rows > 0 => Some(*rows as usize),
                _ => None,
            })
    }

    /// Reads and decodes an ONNX file. Corrupt or truncated files are reported as such.
    pub fn read(path: &Path) -> AdapterResult<OnnxFile> {
        let bytes = std::fs::read(path).map_err(|e| AdapterError::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Decodes ONNX bytes (`path` is used for messages and external data).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> AdapterResult<OnnxFile> {
        use prost::Message;
        let proto = pb::ModelProto::decode(bytes).map_err(|e| AdapterError::InvalidModel {
            path: path.into(),
            detail: format!("not a valid ONNX protobuf ({e}); the file is corrupt or truncated, re-export or re-download it"),
        })?;
        if proto.graph.as_ref().is_none_or(|g| g.node.is_empty()) {
            return Err(AdapterError::InvalidModel {
                path: path.into(),
                detail: "the ONNX model has no graph nodes".into(),
            });
        }
        Ok(OnnxFile {
            proto,
            path: path.into(),
        })
    }

    /// The graph.
    pub fn graph(&self) -> &pb::GraphProto {
        self.proto.graph.as_ref().expect("checked at load")
    }

    /// Encodes the model.
    pub fn to_bytes(&self) -> Vec<u8> {
        use prost::Message;
        self.proto.encode_to_vec()
    }

    /// Parses the protobuf into a tract inference model.
    pub fn inference_model(&self) -> TractResult<InferenceModel> {
        let dir = self.path.parent().and_then(|p| p.to_str());
        Ok(tract_onnx::onnx().parse(&self.proto, dir)?.model)
    }

    /// Concrete shapes of every tensor of the graph at the given input shapes,
    /// from tract's analysis (keys are ONNX tensor names).
    pub fn tensor_shapes(
        &self,
        input_shapes: &[(DatumType, Vec<usize>)],
    ) -> TractResult<HashMap<String, Vec<usize>>> {
        use tract_onnx::tract_hir::infer::{Factoid, InferenceModelExt};
        let mut model = self.inference_model()?;
        for (ix, (dt, shape)) in input_shapes.iter().enumerate() {
            model.set_input_fact(ix, InferenceFact::dt_shape(*dt, shape.clone()))?;
        }
        model.analyse(false)?;
        let mut out = HashMap::new();
        for node in model.nodes() {
            for (slot, o) in node.outputs.iter().enumerate() {
                let outlet = OutletId::new(node.id, slot);
                let Some(label) = model.outlet_label(outlet) else {
                    continue;
                };
                if let Some(dims) = o.fact.shape.concretize() {
                    if let Ok(d) = dims
                        .iter()
                        .map(|d| d.to_usize().ok())
                        .collect::<Option<Vec<usize>>>()
                        .ok_or(())
                    {
                        out.insert(label.to_string(), d);
                    }
                }
            }
        }
        Ok(out)
    }

    /// True when residual sums feed only a LayerNormalization inside the stack
    /// (post-LN, BERT: two per layer). A pre-LN decoder (GPT-2) has one such sum, the
    /// last one before the final norm, so one is not enough.
    pub fn has_layer_norm_after_residual(&self) -> bool {
        let g = self.graph();
        let idx = tensors::GraphIndex::new(g);
        let normalised_sums = g.node.iter().filter(|n| {
            n.op_type == "Add"
                && idx.consumers.get(&n.output[0]).is_some_and(|c| {
                    !c.is_empty()
                        && c.iter()
                            .all(|&(m, _)| g.node[m].op_type == "LayerNormalization")
                })
                && n.input.iter().any(|i| idx.producer_op(g, i) == Some("Add"))
        });
        normalised_sums.count() >= 2
    }
}

/// Emits with a generic error context.
pub(crate) fn emit_error(context: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::Runtime {
        context: context.into(),
        detail: format!("{e:#}"),
    }
}

#[allow(unused)]
fn _assert_send(_: &Plan, _: &PrunedWeights) {}
