//! The inputs of an exported transformer, and building them for a workload.
//!
//! Hugging Face exporters name their inputs by role (`input_ids`, `attention_mask`,
//! `token_type_ids`, `position_ids`, `past_key_values.N.key` / `.value`): that is the
//! models' public interface, as tensor names are for checkpoints.

use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, DimLike, TractErrorContext};
use tract_onnx::tract_hir::infer::Factoid;
use ziplm_plugin_api::{Phase, Workload};

/// What an input carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputRole {
    /// Token ids `[batch, seq]`.
    Ids,
    /// Attention mask `[batch, past + seq]`.
    AttentionMask,
    /// Segment ids `[batch, seq]` (BERT).
    TokenTypes,
    /// Positions `[batch, seq]`.
    Positions,
    /// Cached keys or values of one layer `[batch, kv_heads, past, head_dim]`.
    Past {
        /// Declared KV heads.
        heads: usize,
        /// Declared head width.
        head_dim: usize,
    },
}

/// One model input.
#[derive(Clone, Debug)]
pub struct InputSpec {
    /// The ONNX input name.
    pub name: String,
    /// Its role.
    pub role: InputRole,
    /// Element type.
    pub datum_type: DatumType,
}

/// Reads the model's inputs and their roles. Fails on an input it cannot feed.
pub fn input_specs(model: &InferenceModel) -> TractResult<Vec<InputSpec>> {
    let mut specs = vec![];
    for &outlet in model.input_outlets()? {
        let name = model.node(outlet.node).name.clone();
        let fact = model.outlet_fact(outlet)?;
        let datum_type = fact.datum_type.concretize().unwrap_or(i64::datum_type());
        let role = if name == "input_ids" {
            InputRole::Ids
        } else if name == "attention_mask" {
            InputRole::AttentionMask
        } else if name == "token_type_ids" {
            InputRole::TokenTypes
        } else if name == "position_ids" {
            InputRole::Positions
        } else if name.starts_with("past_key_values.") || name.starts_with("past_key_value") {
            let dims: Vec<Option<usize>> = fact
                .shape
                .dims()
                .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
                .collect();
            match dims.as_slice() {
                [_, Some(h), _, Some(hd)] => InputRole::Past { heads: *h, head_dim: *hd },
                _ => bail!("input {name}: expected a KV cache of shape [batch, heads, past, head_dim] with known heads and head_dim"),
            }
        } else {
            bail!(
                "input `{name}` is not one ziplm knows how to feed (expected input_ids, attention_mask, \
                 token_type_ids, position_ids or past_key_values.N.key/value, as Hugging Face exporters write)"
            );
        };
        specs.push(InputSpec {
            name,
            role,
            datum_type,
        });
    }
    if !specs.iter().any(|s| s.role == InputRole::Ids) {
        bail!("the model has no `input_ids` input");
    }
    Ok(specs)
}

/// Past length of a workload (0 for prefill).
pub fn past_len(workload: &Workload) -> usize {
    match workload.phase {
        Phase::Prefill => 0,
        Phase::Decode { kv_len } => kv_len,
    }
}

/// The concrete shape of an input at a workload.
pub fn shape_for(spec: &InputSpec, workload: &Workload) -> Vec<usize> {
    let (b, s, p) = (workload.batch, workload.seq_len, past_len(workload));
    match spec.role {
        InputRole::Ids | InputRole::TokenTypes | InputRole::Positions => vec![b, s],
        InputRole::AttentionMask => vec![b, p + s],
        InputRole::Past { heads, head_dim } => vec![b, heads, p, head_dim],
    }
}

/// Sets concrete input facts for a workload (decoder exports need them: their causal
/// masks cannot be analysed with symbolic lengths).
pub fn set_input_facts(
    model: &mut InferenceModel,
    specs: &[InputSpec],
    workload: &Workload,
) -> TractResult<()> {
    for (ix, spec) in specs.iter().enumerate() {
        model.set_input_fact(
            ix,
            InferenceFact::dt_shape(spec.datum_type, shape_for(spec, workload)),
        )?;
    }
    Ok(())
}

/// Builds the input tensors for token ids `ids` (`batch x seq`, row-major) with a
/// mask (1 = real token). KV caches are zero-filled at the workload's past length
/// with the mask covering them as real positions.
pub fn build_inputs(
    specs: &[InputSpec],
    workload: &Workload,
    ids: &[i64],
    mask: &[i64],
) -> TractResult<TVec<TValue>> {
    let (b, s, p) = (workload.batch, workload.seq_len, past_len(workload));
    if ids.len() != b * s || mask.len() != b * s {
        bail!(
            "expected {} token ids for batch {b} x {s} tokens, got {}",
            b * s,
            ids.len()
        );
    }
    let mut out = tvec![];
    for spec in specs {
        let t: Tensor = match spec.role {
            InputRole::Ids => {
                tract_ndarray::Array2::from_shape_vec((b, s), ids.to_vec())?.into_tensor()
            }
            InputRole::TokenTypes => tract_ndarray::Array2::<i64>::zeros((b, s)).into_tensor(),
            InputRole::Positions => {
                tract_ndarray::Array2::from_shape_fn((b, s), |(_, j)| (p + j) as i64).into_tensor()
            }
            InputRole::AttentionMask => {
                tract_ndarray::Array2::from_shape_fn((b, p + s), |(i, j)| {
                    if j < p {
                        1
                    } else {
                        mask[i * s + j - p]
                    }
                })
                .into_tensor()
            }
            InputRole::Past { heads, head_dim } => {
                tract_ndarray::Array4::<f32>::zeros((b, heads, p, head_dim)).into_tensor()
            }
        };
        out.push(t.cast_to_dt(spec.datum_type)?.into_owned().into_tvalue());
    }
    Ok(out)
}
