//! Finding the prunable blocks of a decluttered tract model, by structure.
//!
//! After `into_decluttered()`, every linear layer of an exported transformer is an
//! `EinSum` with one `Const` operand, head splits are `AxisOp::Reshape(_, [H*hd],
//! [H, hd])`, and the head merge is folded into the out-projection's weight. We match:
//!
//! - **FFN**: a weight einsum (the down-projection) whose activation input is reached,
//!   through element-wise ops only (activation, gating product, bias), from one or two
//!   weight einsums (up, or gate + up) reading the same tensor.
//! - **Attention**: a weight einsum (the out-projection) whose activation input comes
//!   from an activation-by-activation einsum fed by a softmax; walking back from there
//!   reaches exactly three weight einsums (Q, K, V). Head counts come from the reshapes
//!   after the Q and K projections.
//!
//! Nothing here reads node or tensor names (they only decorate messages).

use std::collections::{BTreeSet, HashSet};
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, DimLike, TractErrorContext};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::Softmax;

/// A linear layer: an einsum of an activation with a constant weight.
#[derive(Clone, Debug)]
pub struct WeightEinsum {
    /// The einsum node.
    pub node: usize,
    /// Input slot of the activation.
    pub act_slot: usize,
    /// The weight as a row-major `[inputs, outputs]` matrix (contracted axes first, in
    /// the weight's own axis order, then output axes).
    pub canonical: Vec<f32>,
    /// Sizes of the contracted (input-feature) axes, in weight order.
    pub in_dims: Vec<usize>,
    /// Product of the output axes' sizes.
    pub outputs: usize,
    /// Positions of the activation's feature axes, in weight order (for calibration).
    pub act_feature_axes: Vec<usize>,
    /// Positions of the activation's token axes, ascending.
    pub act_token_axes: Vec<usize>,
}

impl WeightEinsum {
    /// Number of input features (product of the contracted axes).
    pub fn inputs(&self) -> usize {
        self.in_dims.iter().product()
    }
}

/// What kind of block was recognised.
// A handful per model: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum RecognizedKind {
    /// Multi-head attention.
    Attention {
        /// Query projection.
        q: WeightEinsum,
        /// Key projection.
        k: WeightEinsum,
        /// Value projection.
        v: WeightEinsum,
        /// Output projection.
        o: WeightEinsum,
        /// Query heads.
        n_heads: usize,
        /// KV heads.
        n_kv_heads: usize,
        /// Head width.
        head_dim: usize,
    },
    /// Feed-forward network.
    Ffn {
        /// Up projections (gate first when gated).
        ups: Vec<WeightEinsum>,
        /// Down projection.
        down: WeightEinsum,
    },
}

/// One recognised block.
#[derive(Clone, Debug)]
pub struct RecognizedBlock {
    /// Attention or FFN, with its linear layers.
    pub kind: RecognizedKind,
    /// The transformer layer (0-based).
    pub layer: usize,
    /// Name of the out-projection node (for messages).
    pub name: String,
}

impl RecognizedBlock {
    /// The out-projection (the matrix OBS compensates).
    pub fn out_proj(&self) -> &WeightEinsum {
        match &self.kind {
            RecognizedKind::Attention { o, .. } => o,
            RecognizedKind::Ffn { down, .. } => down,
        }
    }
}

fn konst(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    model.outlet_fact(outlet).ok()?.konst.clone()
}

/// Describes `node` as a weight einsum if it is one.
pub fn weight_einsum(model: &TypedModel, node: usize) -> Option<WeightEinsum> {
    let n = model.node(node);
    let op = n.op_as::<EinSum>()?;
    if n.inputs.len() != 2 || op.q_params.is_some() {
        return None;
    }
    let consts: Vec<Option<Arc<Tensor>>> = n.inputs.iter().map(|&i| konst(model, i)).collect();
    let (w_slot, weight) = match (&consts[0], &consts[1]) {
        (None, Some(w)) => (1, w.clone()),
        (Some(w), None) => (0, w.clone()),
        _ => return None,
    };
    if !weight.datum_type().is_float() {
        return None;
    }
    let a_slot = 1 - w_slot;
    let mut contracted: Vec<(usize, usize)> = vec![]; // (weight axis, activation axis)
    let mut outs: Vec<usize> = vec![];
    let mut act_axes_in_output: Vec<usize> = vec![];
    for axis in op.axes.iter_all_axes() {
        let in_w = axis.inputs[w_slot].first().copied();
        let in_a = axis.inputs[a_slot].first().copied();
        let in_o = !axis.outputs[0].is_empty();
        if axis.inputs[w_slot].len() > 1 || axis.inputs[a_slot].len() > 1 {
            return None;
        }
        match (in_w, in_a, in_o) {
            (Some(w), Some(a), false) => contracted.push((w, a)),
            (Some(w), None, true) => outs.push(w),
            (None, Some(a), true) => act_axes_in_output.push(a),
            (Some(w), None, false) if weight.shape()[w] == 1 => {}
            (None, Some(a), false) => {
                // An activation axis summed away on its own: only size 1 is harmless.
                let fact = model.outlet_fact(n.inputs[a_slot]).ok()?;
                if fact.shape[a].to_usize().ok()? != 1 {
                    return None;
                }
            }
            (None, None, _) => {}
            _ => return None, // shared batch axis: not a plain linear layer
        }
    }
    if contracted.is_empty() || outs.is_empty() {
        return None;
    }
    contracted.sort();
    outs.sort();
    let shape = weight.shape();
    let in_dims: Vec<usize> = contracted.iter().map(|&(w, _)| shape[w]).collect();
    let outputs: usize = outs.iter().map(|&w| shape[w]).product();
    let perm: Vec<usize> = contracted
        .iter()
        .map(|&(w, _)| w)
        .chain(outs.iter().copied())
        .collect();
    if perm.len() != shape.len() {
        return None; // size-1 weight axes besides: keep it simple
    }
    let w32 = weight.cast_to::<f32>().ok()?;
    let view = w32.to_plain_array_view::<f32>().ok()?.permuted_axes(perm);
    let canonical: Vec<f32> = view.iter().copied().collect();
    let mut act_token_axes = act_axes_in_output;
    act_token_axes.sort();
    Some(WeightEinsum {
        node,
        act_slot: a_slot,
        canonical,
        in_dims,
        outputs,
        act_feature_axes: contracted.iter().map(|&(_, a)| a).collect(),
        act_token_axes,
    })
}

fn is_elementwise(node: &TypedNode) -> bool {
    node.op_is::<ElementWiseOp>() || node.op_is::<TypedBinOp>()
}

/// Walks back from `start` through element-wise ops; returns the weight einsums it
/// reaches, or `None` when it meets anything else (a reshape, a softmax, a source).
fn ffn_sources(model: &TypedModel, start: OutletId) -> Option<Vec<usize>> {
    let mut stack = vec![start];
    let mut seen = HashSet::new();
    let mut found = BTreeSet::new();
    while let Some(o) = stack.pop() {
        if !seen.insert(o) || konst(model, o).is_some() {
            continue;
        }
        let node = model.node(o.node);
        if weight_einsum(model, o.node).is_some() {
            found.insert(o.node);
        } else if is_elementwise(node) {
            stack.extend(node.inputs.iter().copied());
        } else {
            return None;
        }
        if seen.len() > 64 {
            return None;
        }
    }
    Some(found.into_iter().collect())
}

/// Everything upstream of `start` down to (and including) weight einsums, sources
/// and constants.
fn upstream(
    model: &TypedModel,
    start: OutletId,
    stop_at_weights: bool,
) -> (Vec<usize>, Vec<usize>) {
    let mut stack = vec![start];
    let mut seen = HashSet::new();
    let mut weights = BTreeSet::new();
    let mut nodes = BTreeSet::new();
    while let Some(o) = stack.pop() {
        if !seen.insert(o.node) {
            continue;
        }
        nodes.insert(o.node);
        if stop_at_weights && weight_einsum(model, o.node).is_some() {
            weights.insert(o.node);
            continue;
        }
        stack.extend(model.node(o.node).inputs.iter().copied());
    }
    (weights.into_iter().collect(), nodes.into_iter().collect())
}

/// Follows the output of a projection forward through element-wise ops to the first
/// reshape that splits its feature axis in two; returns the two sizes.
fn head_split(model: &TypedModel, proj: usize, width: usize) -> Option<(usize, usize)> {
    let mut outlet = OutletId::new(proj, 0);
    for _ in 0..8 {
        let succs = model.outlet_successors(outlet);
        for s in succs {
            let node = model.node(s.node);
            if let Some(AxisOp::Reshape(_, from, to)) = node.op_as::<AxisOp>() {
                if from.len() == 1 && from[0].to_usize().ok()? == width && to.len() == 2 {
                    return Some((to[0].to_usize().ok()?, to[1].to_usize().ok()?));
                }
            }
        }
        let next = succs.iter().find(|s| is_elementwise(model.node(s.node)))?;
        outlet = OutletId::new(next.node, 0);
    }
    None
}

/// Whether a projection's output reaches a residual sum: an `Add` of two computed
/// tensors, possibly after a bias add or a reshape. A projection whose output goes
/// nowhere else (a model head, or a plain MLP) is not a transformer block.
fn feeds_residual(model: &TypedModel, node: usize) -> bool {
    let mut frontier = vec![OutletId::new(node, 0)];
    for _ in 0..4 {
        let mut next = vec![];
        for outlet in frontier {
            for s in model.outlet_successors(outlet) {
                let succ = model.node(s.node);
                let is_add = succ
                    .op_as::<TypedBinOp>()
                    .is_some_and(|b| b.0.name() == "Add");
                if is_add && succ.inputs.iter().all(|&i| konst(model, i).is_none()) {
                    return true;
                }
                if is_add || succ.op_is::<AxisOp>() {
                    next.push(OutletId::new(s.node, 0));
                }
            }
        }
        frontier = next;
    }
    false
}

/// Recognises every prunable block, in model order.
///
/// Fails naming the node when a linear layer looks like an out-projection but the
/// pattern around it is not one we can prune.
pub fn recognize(model: &TypedModel) -> TractResult<Vec<RecognizedBlock>> {
    let order = model.eval_order()?;
    let mut found: Vec<(usize, RecognizedKind, String)> = vec![];
    let mut used: HashSet<usize> = HashSet::new();
    for &n in &order {
        if used.contains(&n) {
            continue;
        }
        let Some(down) = weight_einsum(model, n) else {
            continue;
        };
        if !feeds_residual(model, n) {
            continue;
        }
        let node = model.node(n);
        let act = node.inputs[down.act_slot];
        // FFN?
        if let Some(ups) = ffn_sources(model, act) {
            let ups: Vec<WeightEinsum> = ups
                .iter()
                .filter_map(|&u| weight_einsum(model, u))
                .collect();
            let same_input = ups.windows(2).all(|w| {
                model.node(w[0].node).inputs[w[0].act_slot]
                    == model.node(w[1].node).inputs[w[1].act_slot]
            });
            if !ups.is_empty()
                && ups.len() <= 2
                && same_input
                && ups.iter().all(|u| u.outputs == down.inputs())
            {
                // Gate first: the gate passes through a non-linearity before the product.
                let mut ups = ups;
                if ups.len() == 2 {
                    let gate_first = model
                        .outlet_successors(OutletId::new(ups[0].node, 0))
                        .iter()
                        .any(|s| model.node(s.node).op_is::<ElementWiseOp>());
                    if !gate_first {
                        ups.swap(0, 1);
                    }
                }
                used.extend(ups.iter().map(|u| u.node));
                used.insert(n);
                found.push((n, RecognizedKind::Ffn { ups, down }, node.name.clone()));
                continue;
            }
        }
        // Attention?
        let (weights, region) = upstream(model, act, true);
        let softmaxes: Vec<usize> = region
            .iter()
            .copied()
            .filter(|&r| model.node(r).op_is::<Softmax>())
            .collect();
        if softmaxes.is_empty() {
            continue; // a projection that is neither (embedding, head): not prunable
        }
        if weights.len() != 3 || softmaxes.len() != 1 {
            bail!(
                "node {} ({}) looks like an attention output projection but its attention reaches {} \
                 projections and {} softmax nodes; expected Q, K, V projections and one softmax",
                n,
                node.name,
                weights.len(),
                softmaxes.len()
            );
        }
        let softmax = softmaxes[0];
        // The value projection is not upstream of the softmax.
        let (before_softmax, _) = upstream(model, OutletId::new(softmax, 0), true);
        let v_nodes: Vec<usize> = weights
            .iter()
            .copied()
            .filter(|w| !before_softmax.contains(w))
            .collect();
        if v_nodes.len() != 1 || before_softmax.len() != 2 {
            bail!(
                "attention before node {} ({}): cannot tell the value projection from Q and K \
                 (expected exactly one projection after the softmax, found {})",
                n,
                node.name,
                v_nodes.len()
            );
        }
        let o = down;
        let mut qk: Vec<WeightEinsum> = before_softmax
            .iter()
            .filter_map(|&w| weight_einsum(model, w))
            .collect();
        let v = weight_einsum(model, v_nodes[0]).expect("checked above");
        // Q has as many outputs as the out-projection has inputs; with MHA both do.
        if qk[0].outputs != o.inputs() && qk[1].outputs == o.inputs() {
            qk.swap(0, 1);
        }
        let (q, k) = (qk[0].clone(), qk[1].clone());
        // No split at all: one head of the whole width (a model ziplm pruned to one
        // head, whose reshape tract folded away). Keeping or removing it whole is all
        // a plan can do with one head, so nothing depends on the split's form.
        let one_head = (q.outputs == o.inputs()).then_some((1, q.outputs));
        let Some((n_heads, head_dim)) = head_split(model, q.node, q.outputs).or(one_head) else {
            bail!(
                "attention before node {} ({}): no reshape splitting the query projection ({} features) \
                 into heads (expected Reshape [H*hd] -> [H, hd])",
                n,
                node.name,
                q.outputs
            );
        };
        let (n_kv_heads, kv_dim) =
            head_split(model, k.node, k.outputs).unwrap_or((k.outputs / head_dim, head_dim));
        if kv_dim != head_dim
            || n_heads * head_dim != o.inputs()
            || v.outputs != k.outputs
            || n_heads % n_kv_heads != 0
        {
            bail!(
                "attention before node {} ({}): inconsistent shapes (Q {} = {n_heads}x{head_dim}, K {} = {n_kv_heads}x{kv_dim}, \
                 V {}, out-projection inputs {})",
                n,
                node.name,
                q.outputs,
                k.outputs,
                v.outputs,
                o.inputs()
            );
        }
        used.extend([q.node, k.node, v.node, n]);
        found.push((
            n,
            RecognizedKind::Attention {
                q,
                k,
                v,
                o,
                n_heads,
                n_kv_heads,
                head_dim,
            },
            node.name.clone(),
        ));
    }
    // Layers: an attention block opens a layer; an FFN after an FFN opens one too.
    let mut layer = 0usize;
    let mut prev_attention: Option<bool> = None;
    let mut out = Vec::with_capacity(found.len());
    for (_, kind, name) in found {
        let is_attention = matches!(kind, RecognizedKind::Attention { .. });
        if let Some(prev) = prev_attention {
            if is_attention || !prev {
                layer += 1;
            }
        }
        prev_attention = Some(is_attention);
        out.push(RecognizedBlock { kind, layer, name });
    }
    Ok(out)
}
