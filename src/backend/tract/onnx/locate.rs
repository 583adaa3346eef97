//! Finding a recognised block's projections in the ONNX file, by weight values.

use super::tensors::{self, GraphIndex};
use crate::backend::tract::recognize::{RecognizedBlock, RecognizedKind, WeightEinsum};
use std::collections::HashMap;
use tract_onnx::pb;
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, TractErrorContext};

/// One projection (MatMul or Gemm with a constant weight) in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxProj {
    /// The MatMul / Gemm node.
    pub node: usize,
    /// Name of the constant weight.
    pub weight: String,
    /// The weight is stored `[outputs, inputs]` (Gemm with `transB = 1`).
    pub transposed: bool,
    /// Offset of this projection's outputs within the weight's output axis (fused QKV).
    pub offset: usize,
    /// Number of outputs of this projection.
    pub width: usize,
    /// Gemm's constant bias input, if any.
    pub bias: Option<String>,
}

/// A block's projections in the file.
// A handful per model: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum OnnxBlock {
    /// Attention.
    Attention {
        /// Query, key, value and output projections.
        q: OnnxProj,
        /// Key projection.
        k: OnnxProj,
        /// Value projection.
        v: OnnxProj,
        /// Output projection.
        o: OnnxProj,
    },
    /// FFN.
    Ffn {
        /// Up projections.
        ups: Vec<OnnxProj>,
        /// Down projection.
        down: OnnxProj,
    },
}

/// A constant's dims and values, or `None` when it is not a float matrix.
type CachedConst = Option<(Vec<usize>, Vec<f32>)>;

/// Cache of decoded float matrices (rank-2 float constants).
#[derive(Default)]
pub struct Matrices {
    cache: HashMap<String, CachedConst>,
}

impl Matrices {
    fn get(
        &mut self,
        graph: &pb::GraphProto,
        index: &GraphIndex,
        name: &str,
    ) -> Option<&(Vec<usize>, Vec<f32>)> {
        self.cache
            .entry(name.to_string())
            .or_insert_with(|| {
                let t = index.const_proto(graph, name)?;
                let d = tensors::dims(t);
                if d.len() != 2 || !tensors::is_float(t) {
                    return None;
                }
                Some((d, tensors::read_f32(t).ok()?))
            })
            .as_ref()
    }
}

fn matches_at(
    values: &[f32],
    dims: &[usize],
    w: &WeightEinsum,
    transposed: bool,
    off: usize,
) -> bool {
    let (n_in, n_out) = (w.inputs(), w.outputs);
    let at = |i: usize, j: usize| {
        if transposed {
            values[(off + j) * dims[1] + i]
        } else {
            values[i * dims[1] + off + j]
        }
    };
    // Cheap probes first.
    for &(i, j) in &[(0, 0), (n_in - 1, n_out - 1), (n_in / 2, n_out / 2)] {
        if at(i, j).to_bits() != w.canonical[i * n_out + j].to_bits() {
            return false;
        }
    }
    (0..n_in)
        .all(|i| (0..n_out).all(|j| at(i, j).to_bits() == w.canonical[i * n_out + j].to_bits()))
}

/// Finds the projection whose weight holds exactly `w`'s values.
pub fn find_proj(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    mats: &mut Matrices,
    w: &WeightEinsum,
) -> TractResult<OnnxProj> {
    let (n_in, n_out) = (w.inputs(), w.outputs);
    let mut found = vec![];
    let names: Vec<String> = index.consts.keys().cloned().collect();
    for name in names {
        let Some(consumers) = index.consumers.get(&name) else {
            continue;
        };
        let users: Vec<(usize, usize)> = consumers
            .iter()
            .copied()
            .filter(|&(n, _)| matches!(graph.node[n].op_type.as_str(), "MatMul" | "Gemm"))
            .collect();
        if users.is_empty() {
            continue;
        }
        let Some((dims, values)) = mats.get(graph, index, &name) else {
            continue;
        };
        for transposed in [false, true] {
            let (rows_in, outs) = if transposed {
                (dims[1], dims[0])
            } else {
                (dims[0], dims[1])
            };
            if rows_in != n_in || outs < n_out {
                continue;
            }
            for off in 0..=(outs - n_out) {
                if matches_at(values, dims, w, transposed, off) {
                    found.push((name.clone(), transposed, off, users.clone()));
                }
            }
        }
    }
    let [(name, transposed, offset, users)] = found.as_slice() else {
        bail!(
            "{} ONNX weights hold the values of a {n_in}x{n_out} projection (expected exactly one); \
             the file does not match the graph tract analysed",
            found.len()
        );
    };
    let &(node, slot) = users.first().expect("non-empty");
    let pn = &graph.node[node];
    if pn.op_type == "MatMul" && (slot != 1 || *transposed) {
        bail!(
            "projection `{}`: the weight must be MatMul's second input, stored [in, out]",
            pn.name
        );
    }
    if pn.op_type == "Gemm" {
        let attr = |n: &str| {
            pn.attribute
                .iter()
                .find(|a| a.name == n)
                .map(|a| a.i)
                .unwrap_or(0)
        };
        if slot != 1 || attr("transA") != 0 || (attr("transB") != 0) != *transposed {
            bail!("projection `{}`: unsupported Gemm layout", pn.name);
        }
    }
    if users.len() != 1 {
        bail!(
            "weight `{name}` is used by {} nodes; ziplm cannot slice a shared weight",
            users.len()
        );
    }
    let bias = if pn.op_type == "Gemm" {
        pn.input
            .get(2)
            .filter(|b| !b.is_empty())
            .and_then(|b| index.resolve_const(graph, b))
    } else {
        None
    };
    Ok(OnnxProj {
        node,
        weight: name.clone(),
        transposed: *transposed,
        offset: *offset,
        width: n_out,
        bias,
    })
}

/// Locates every projection of a recognised block.
pub fn locate(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    mats: &mut Matrices,
    block: &RecognizedBlock,
) -> TractResult<OnnxBlock> {
    let f = |mats: &mut Matrices, w: &WeightEinsum, what: &str| {
        find_proj(graph, index, mats, w)
            .with_context(|| format!("finding the {what} of {} in the ONNX file", block.name))
    };
    Ok(match &block.kind {
        RecognizedKind::Attention { q, k, v, o, .. } => OnnxBlock::Attention {
            q: f(mats, q, "query projection")?,
            k: f(mats, k, "key projection")?,
            v: f(mats, v, "value projection")?,
            o: f(mats, o, "output projection")?,
        },
        RecognizedKind::Ffn { ups, down } => OnnxBlock::Ffn {
            ups: ups
                .iter()
                .map(|u| f(mats, u, "up projection"))
                .collect::<TractResult<_>>()?,
            down: f(mats, down, "down projection")?,
        },
    })
}
