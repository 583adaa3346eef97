//! NNEF output: the emitted (pruned) ONNX model, made concrete for the workload,
//! decluttered and written as a tract NNEF archive (`.nnef.tar`), which tract loads
//! without the ONNX front end.
//!
//! tract 0.23.9 has no NNEF serializer for `GeluExact` (what decluttering makes of
//! BERT's erf GELU), so those nodes are written as their definition,
//! `0.5 * x * (1 + erf(x / sqrt 2))`, which plain tract loads.

use super::inputs;
use super::model::typed_at;
use super::onnx::OnnxFile;
use std::path::Path;
use tract_nnef::framework::Nnef;
use tract_onnx::prelude::*;
use tract_onnx::WithOnnx;
use tract_transformers::WithTractTransformers;
use ziplm_plugin_api::{AdapterError, AdapterResult, Workload};

/// The NNEF framework with every operator set a decluttered ONNX transformer may use.
pub fn framework() -> Nnef {
    tract_nnef::nnef().with_onnx().with_tract_transformers()
}

fn nnef_error(e: impl std::fmt::Display) -> AdapterError {
    AdapterError::runtime("writing the NNEF archive", format!("{e:#}"))
}

/// The NNEF archive of ONNX `bytes` at `workload`, in memory.
pub fn to_nnef(bytes: &[u8], workload: &Workload) -> AdapterResult<Vec<u8>> {
    let file = OnnxFile::from_bytes(bytes, Path::new("<emitted model>"))?;
    let typed = (|| -> TractResult<TypedModel> {
        let specs = inputs::input_specs(&file.inference_model()?)?;
        let mut typed = typed_at(&file, &specs, workload)?;
        expand_gelu_exact(&mut typed)?;
        Ok(typed)
    })()
    .map_err(nnef_error)?;
    framework()
        .write_to_tar(&typed, Vec::new())
        .map_err(nnef_error)
}

/// Replaces every `GeluExact` node by `0.5 * x * (1 + erf(x / sqrt 2))`.
fn expand_gelu_exact(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
    use tract_onnx::tract_core::ops::math;
    use tract_onnx::tract_core::ops::nn::GeluExact;
    let gelus: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| {
            n.op_as::<ElementWiseOp>()
                .is_some_and(|e| e.0.is::<GeluExact>())
        })
        .map(|n| n.id)
        .collect();
    for id in gelus {
        let node = model.node(id).clone();
        let fact = model.outlet_fact(node.inputs[0])?.clone();
        let rank = fact.rank();
        let scalar = |v: f32| -> TractResult<Tensor> {
            tensor0(v)
                .cast_to_dt(fact.datum_type)?
                .into_owned()
                .broadcast_into_rank(rank)
        };
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, node.inputs[0])?;
        let name = &node.name;
        let c = patch.add_const(
            format!("{name}.inv_sqrt2"),
            scalar(std::f32::consts::FRAC_1_SQRT_2)?,
        )?;
        let one = patch.add_const(format!("{name}.one"), scalar(1.0)?)?;
        let half = patch.add_const(format!("{name}.half"), scalar(0.5)?)?;
        let scaled = patch.wire_node(format!("{name}.scaled"), math::mul(), &[x, c])?[0];
        let erf = patch.wire_node(format!("{name}.erf"), math::erf(), &[scaled])?[0];
        let plus_one = patch.wire_node(format!("{name}.plus_one"), math::add(), &[erf, one])?[0];
        let times_x = patch.wire_node(format!("{name}.times_x"), math::mul(), &[plus_one, x])?[0];
        let out = patch.wire_node(format!("{name}.out"), math::mul(), &[times_x, half])?[0];
        patch.shunt_outside(model, id.into(), out)?;
        patch.apply(model)?;
    }
    model.compact()
}

/// Writes the NNEF archive of ONNX `bytes` to `dest` (atomically).
pub fn write_nnef(bytes: &[u8], workload: &Workload, dest: &Path) -> crate::Result<()> {
    crate::fsutil::write_atomic(dest, &to_nnef(bytes, workload)?)
}
