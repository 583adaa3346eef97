//! Applying a plan inside tract: the same edits as the ONNX emitter, made on a
//! decluttered `TypedModel` (for the load-time transform, [`super::hook`]).
//!
//! Axis roles (see [`super::onnx::roles`]) are propagated over tract's typed ops:
//! `EinSum` axis mappings, element-wise ops, `AxisOp`s, `MultiBroadcastTo`, `Slice`,
//! `Concat`, `Softmax`. The graph is then rebuilt node by node with sliced constants,
//! re-dimensioned reshapes and broadcasts, and KV-cache sources of the kept heads;
//! removed blocks are bypassed.

use super::onnx::roles::{reshape_roles, Dims, Role};
use super::recognize::{RecognizedBlock, RecognizedKind, WeightEinsum};
use std::collections::{HashMap, HashSet};
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, DimLike, TractErrorContext};
use tract_onnx::tract_core::ops::array::{MultiBroadcastTo, Slice, TypedConcat};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::logic::Iff;
use tract_onnx::tract_core::ops::nn::Softmax;
use tract_onnx::tract_core::ops::source::TypedSource;
use ziplm_plugin_api::{BlockChoice, BlockKind, BlockPlan, WeightMatrix};

/// What to do with one block.
pub struct BlockEdit<'a> {
    /// The recognised block in the model being transformed.
    pub block: &'a RecognizedBlock,
    /// What the plan keeps.
    pub plan: &'a BlockPlan,
    /// Compensated out-projection (kept columns), if any.
    pub weights: Option<&'a WeightMatrix>,
    /// Post-LN model: a removed block keeps its out-projection bias.
    pub keep_bias_when_removed: bool,
}

#[derive(Default)]
struct Edits {
    /// Const node -> new tensor.
    consts: HashMap<usize, Tensor>,
    /// Const node feeding (node, slot) replaced for that use only.
    const_uses: HashMap<(usize, usize), Tensor>,
    /// Reshape nodes -> new op.
    ops: HashMap<usize, Box<dyn TypedOp>>,
    /// Source nodes -> new shape.
    sources: HashMap<usize, Vec<usize>>,
    /// Residual add node -> replacement: the outlet to forward, and an optional bias
    /// to add to it.
    bypass: HashMap<usize, (OutletId, Option<OutletId>)>,
}

fn shape_of(model: &TypedModel, o: OutletId) -> TractResult<Vec<usize>> {
    model
        .outlet_fact(o)?
        .shape
        .iter()
        .map(|d| d.to_usize())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tract_onnx::tract_core::internal::anyhow!("{e:?}"))
}

fn kept_for(plan: &BlockPlan, kind: &BlockKind, role: Role) -> TractResult<Vec<usize>> {
    let heads = |hs: &[usize], hd: usize| {
        hs.iter()
            .flat_map(|&h| h * hd..(h + 1) * hd)
            .collect::<Vec<_>>()
    };
    Ok(match (kind, role) {
        (BlockKind::Attention(a), Role::QPacked) => heads(&plan.kept, a.head_dim),
        (BlockKind::Attention(a), Role::KvPacked) => heads(&plan.kept_kv_heads, a.head_dim),
        (BlockKind::Attention(_), Role::Heads) => plan.kept.clone(),
        (BlockKind::Attention(_), Role::KvHeads) => plan.kept_kv_heads.clone(),
        (BlockKind::Attention(a), Role::NRep) => {
            let per = a.heads_per_kv();
            let first: Vec<usize> = plan
                .kept
                .iter()
                .filter(|&&h| h / per == plan.kept.first().map_or(0, |f| f / per))
                .map(|h| h % per)
                .collect();
            for g in &plan.kept_kv_heads {
                let these: Vec<usize> = plan
                    .kept
                    .iter()
                    .filter(|&&h| h / per == *g)
                    .map(|h| h % per)
                    .collect();
                if these != first {
                    bail!("the plan keeps different heads in different KV groups; the tract transform needs the same ones");
                }
            }
            first
        }
        (BlockKind::Ffn(_), Role::Ffn) => plan.kept.clone(),
        (k, r) => bail!("no kept indices for role {r:?} in a {} block", k.label()),
    })
}

fn slice_tensor(t: &Tensor, axis: usize, kept: &[usize]) -> TractResult<Tensor> {
    let t32 = t.cast_to::<f32>()?;
    let view = t32.to_plain_array_view::<f32>()?;
    let sliced = view.select(tract_ndarray::Axis(axis), kept);
    sliced
        .into_tensor()
        .cast_to_dt(t.datum_type())
        .map(|c| c.into_owned())
}

fn const_value(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    model.outlet_fact(outlet).ok()?.konst.clone()
}

/// The output axis of a projection einsum that carries its weight's outputs.
fn proj_output_axis(model: &TypedModel, w: &WeightEinsum) -> TractResult<usize> {
    let op = model.node(w.node).op_as::<EinSum>().context("einsum")?;
    let wslot = 1 - w.act_slot;
    let axes: Vec<usize> = op
        .axes
        .iter_all_axes()
        .filter(|a| {
            !a.inputs[wslot].is_empty()
                && a.inputs[w.act_slot].is_empty()
                && !a.outputs[0].is_empty()
        })
        .map(|a| a.outputs[0][0])
        .collect();
    match axes.as_slice() {
        [a] => Ok(*a),
        _ => bail!(
            "projection {} has {} output axes from its weight, expected one",
            model.node(w.node).name,
            axes.len()
        ),
    }
}

fn slice_projection_weight(
    model: &TypedModel,
    w: &WeightEinsum,
    kept: &[usize],
    edits: &mut Edits,
) -> TractResult<()> {
    let node = model.node(w.node);
    let wslot = 1 - w.act_slot;
    let op = node.op_as::<EinSum>().context("einsum")?;
    let waxis: Vec<usize> = op
        .axes
        .iter_all_axes()
        .filter(|a| !a.inputs[wslot].is_empty() && a.inputs[w.act_slot].is_empty())
        .map(|a| a.inputs[wslot][0])
        .collect();
    let [axis] = waxis.as_slice() else {
        bail!("projection weight with several output axes")
    };
    let src = node.inputs[wslot];
    let t = const_value(model, src).context("weight const")?;
    edits
        .const_uses
        .insert((w.node, wslot), slice_tensor(&t, *axis, kept)?);
    Ok(())
}

/// New out-projection weight: contracted axes sliced by role, values replaced by the
/// compensated matrix when given.
fn out_weight(
    model: &TypedModel,
    o: &WeightEinsum,
    roles: &[Role],
    e: &BlockEdit,
    edits: &mut Edits,
) -> TractResult<()> {
    let node = model.node(o.node);
    let wslot = 1 - o.act_slot;
    let op = node.op_as::<EinSum>().context("einsum")?;
    let t = const_value(model, node.inputs[wslot]).context("weight const")?;
    let mut out = t.as_ref().clone();
    // Contracted axes of the weight in weight order, with the activation's roles.
    for axis in op.axes.iter_all_axes() {
        if let (Some(&wa), Some(&aa)) =
            (axis.inputs[wslot].first(), axis.inputs[o.act_slot].first())
        {
            let role = roles[aa];
            if role != Role::None {
                out = slice_tensor(&out, wa, &kept_for(e.plan, &e.block_kind(), role)?)?;
            }
        }
    }
    if let Some(w) = e.weights {
        // Compensated values: [outputs x kept inputs] -> the weight's [inputs..., outputs] order.
        let n_in: usize = o.in_dims.iter().product::<usize>() * w.cols / o.inputs().max(1);
        let _ = n_in;
        let dims = out.shape().to_vec();
        let n_out = o.outputs;
        let total: usize = dims.iter().product();
        if total != w.rows * w.cols || w.rows != n_out {
            bail!(
                "compensated weights are {}x{}, the sliced weight has {total} values",
                w.rows,
                w.cols
            );
        }
        // The canonical layout (contracted first, then outputs) must be the tensor's.
        let mut vals = vec![0f32; total];
        for i in 0..w.cols {
            for j in 0..n_out {
                vals[i * n_out + j] = w.data[j * w.cols + i];
            }
        }
        out = tract_ndarray::ArrayD::from_shape_vec(dims, vals)?
            .into_tensor()
            .cast_to_dt(t.datum_type())?
            .into_owned();
    }
    edits.const_uses.insert((o.node, wslot), out);
    Ok(())
}

impl BlockEdit<'_> {
    fn block_kind(&self) -> BlockKind {
        self.plan.kind
    }
}

/// Propagates roles from the projections of one block and records the edits.
fn edit_block(model: &TypedModel, e: &BlockEdit, edits: &mut Edits) -> TractResult<()> {
    let kind = e.plan.kind;
    let (starts, end): (Vec<(&WeightEinsum, Role)>, &WeightEinsum) = match &e.block.kind {
        RecognizedKind::Attention {
            q,
            k,
            v,
            o,
            n_heads,
            n_kv_heads,
            ..
        } => {
            let kv_role = if n_heads == n_kv_heads {
                Role::QPacked
            } else {
                Role::KvPacked
            };
            (vec![(q, Role::QPacked), (k, kv_role), (v, kv_role)], o)
        }
        RecognizedKind::Ffn { ups, down } => (ups.iter().map(|u| (u, Role::Ffn)).collect(), down),
    };
    let (old, new) = match kind {
        BlockKind::Attention(a) => (
            Dims {
                heads: a.n_heads,
                kv: a.n_kv_heads,
                head_dim: a.head_dim,
                ffn: 0,
            },
            Dims {
                heads: e.plan.kept.len(),
                kv: e.plan.kept_kv_heads.len(),
                head_dim: a.head_dim,
                ffn: 0,
            },
        ),
        BlockKind::Ffn(f) => (
            Dims {
                heads: 0,
                kv: 0,
                head_dim: 0,
                ffn: f.width,
            },
            Dims {
                heads: 0,
                kv: 0,
                head_dim: 0,
                ffn: e.plan.kept.len(),
            },
        ),
    };
    let mut roles: HashMap<OutletId, Vec<Role>> = HashMap::new();
    for (w, role) in &starts {
        let axis = proj_output_axis(model, w)?;
        let rank = model.outlet_fact(OutletId::new(w.node, 0))?.rank();
        let mut r = vec![Role::None; rank];
        r[axis] = *role;
        roles.insert(OutletId::new(w.node, 0), r);
        slice_projection_weight(model, w, &kept_for(e.plan, &kind, *role)?, edits)?;
    }
    for n in model.eval_order()? {
        if n == end.node || starts.iter().any(|(w, _)| w.node == n) {
            continue;
        }
        let node = model.node(n);
        let in_roles: Vec<Option<&Vec<Role>>> = node.inputs.iter().map(|i| roles.get(i)).collect();
        if in_roles.iter().all(|r| r.is_none()) {
            continue;
        }
        let ctx = || {
            format!(
                "following heads/neurons through node #{n} `{}` ({})",
                node.name,
                node.op.name()
            )
        };
        let out_shape = shape_of(model, OutletId::new(n, 0))?;
        let get = |i: usize| -> TractResult<Vec<Role>> {
            Ok(match in_roles[i] {
                Some(r) => r.clone(),
                None => vec![Role::None; model.outlet_fact(node.inputs[i])?.rank()],
            })
        };
        let out: Vec<Role> = if let Some(op) = node.op_as::<EinSum>() {
            if node.inputs.iter().any(|&i| const_value(model, i).is_some()) {
                bail!(
                    "{}: a projection inside the block that is not its output projection",
                    ctx()
                );
            }
            let mut out = vec![Role::None; out_shape.len()];
            for axis in op.axes.iter_all_axes() {
                let mut r = Role::None;
                for (slot, positions) in axis.inputs.iter().enumerate() {
                    if let Some(&p) = positions.first() {
                        let ir = get(slot)?[p];
                        if ir != Role::None {
                            if r != Role::None && r != ir {
                                bail!("{}: inputs disagree ({r:?} vs {ir:?})", ctx());
                            }
                            r = ir;
                        }
                    }
                }
                match axis.outputs[0].first() {
                    Some(&p) => out[p] = r,
                    None if r != Role::None => bail!(
                        "{}: contracting an axis that carries heads or neurons",
                        ctx()
                    ),
                    None => {}
                }
            }
            out
        } else if node.op_is::<TypedBinOp>()
            || node.op_is::<Iff>()
            || node.op_is::<ElementWiseOp>()
            || node.op_is::<Cast>()
            || node.op_is::<Softmax>()
        {
            let mut out = vec![Role::None; out_shape.len()];
            for slot in 0..node.inputs.len() {
                let r = get(slot)?;
                let s = shape_of(model, node.inputs[slot])?;
                let off = out.len() - r.len();
                for a in 0..r.len() {
                    if r[a] != Role::None && s[a] == out_shape[off + a] {
                        out[off + a] = r[a];
                    }
                }
            }
            for slot in 0..node.inputs.len() {
                if let Some(t) = const_value(model, node.inputs[slot]) {
                    let off = out.len() - t.rank();
                    for a in 0..t.rank() {
                        if out[off + a] != Role::None
                            && t.shape()[a] == out_shape[off + a]
                            && t.shape()[a] > 1
                        {
                            let sliced =
                                slice_tensor(&t, a, &kept_for(e.plan, &kind, out[off + a])?)?;
                            edits.const_uses.insert((n, slot), sliced);
                        }
                    }
                }
            }
            out
        } else if let Some(op) = node.op_as::<AxisOp>() {
            let r = get(0)?;
            match op {
                AxisOp::Add(a) => {
                    let mut o = r.clone();
                    o.insert(*a, Role::None);
                    o
                }
                AxisOp::Rm(a) => {
                    let mut o = r.clone();
                    o.remove(*a);
                    o
                }
                AxisOp::Move(f, t) => {
                    let mut o = r.clone();
                    let x = o.remove(*f);
                    o.insert(*t, x);
                    o
                }
                AxisOp::Reshape(at, from, to) => {
                    let from_u: Vec<usize> = from
                        .iter()
                        .map(|d| d.to_usize())
                        .collect::<Result<_, _>>()
                        .map_err(|e| tract_onnx::tract_core::internal::anyhow!("{e:?}"))?;
                    let to_u: Vec<usize> = to
                        .iter()
                        .map(|d| d.to_usize())
                        .collect::<Result<_, _>>()
                        .map_err(|e| tract_onnx::tract_core::internal::anyhow!("{e:?}"))?;
                    let group_roles = reshape_roles(&from_u, &r[*at..*at + from.len()], &to_u)
                        .with_context(ctx)?;
                    let new_from: TVec<TDim> = from_u
                        .iter()
                        .zip(&r[*at..*at + from.len()])
                        .map(|(&d, &ro)| {
                            if ro == Role::None {
                                d.to_dim()
                            } else {
                                new.size(ro).to_dim()
                            }
                        })
                        .collect();
                    let new_to: TVec<TDim> = to_u
                        .iter()
                        .zip(&group_roles)
                        .map(|(&d, &ro)| {
                            if ro == Role::None {
                                d.to_dim()
                            } else {
                                new.size(ro).to_dim()
                            }
                        })
                        .collect();
                    if new_from != *from || new_to != *to {
                        edits
                            .ops
                            .insert(n, Box::new(AxisOp::Reshape(*at, new_from, new_to)));
                    }
                    let mut o = r[..*at].to_vec();
                    o.extend(group_roles);
                    o.extend_from_slice(&r[*at + from.len()..]);
                    o
                }
            }
        } else if let Some(op) = node.op_as::<MultiBroadcastTo>() {
            let r = get(0)?;
            let s = shape_of(model, node.inputs[0])?;
            let off = out_shape.len() - s.len();
            let mut o = vec![Role::None; out_shape.len()];
            for a in 0..s.len() {
                if s[a] == out_shape[off + a] {
                    o[off + a] = r[a];
                }
            }
            for p in 1..o.len() {
                let a = p as isize - off as isize;
                if a >= 0 && s[a as usize] == 1 && out_shape[p] > 1 && o[p - 1] == Role::KvHeads {
                    o[p] = Role::NRep;
                }
            }
            let new_shape: Vec<usize> = out_shape
                .iter()
                .zip(&o)
                .map(|(&d, &ro)| if ro == Role::None { d } else { new.size(ro) })
                .collect();
            if new_shape != out_shape {
                edits.ops.insert(
                    n,
                    Box::new(MultiBroadcastTo {
                        shape: new_shape.into(),
                    }),
                );
            }
            let _ = op;
            o
        } else if let Some(op) = node.op_as::<Slice>() {
            let r = get(0)?;
            if r[op.axis] != Role::None {
                bail!("{}: slicing an axis that carries heads", ctx());
            }
            r
        } else if let Some(op) = node.op_as::<TypedConcat>() {
            let mut out: Option<Vec<Role>> = None;
            for r in in_roles.iter().take(node.inputs.len()).flatten() {
                out = Some((*r).clone());
            }
            let out = out.expect("has roles");
            if out[op.axis] != Role::None {
                bail!("{}: concatenating along an axis that carries heads", ctx());
            }
            for &i in &node.inputs {
                if roles.contains_key(&i) {
                    continue;
                }
                if model.node(i.node).op_is::<TypedSource>() {
                    let s = shape_of(model, i)?;
                    let new_shape: Vec<usize> = s
                        .iter()
                        .zip(&out)
                        .map(|(&d, &ro)| if ro == Role::None { d } else { new.size(ro) })
                        .collect();
                    edits.sources.insert(i.node, new_shape);
                } else {
                    bail!(
                        "{}: concatenation with a tensor that does not carry the block's heads",
                        ctx()
                    );
                }
            }
            out
        } else {
            bail!(
                "{}: unsupported op on a tensor carrying heads or neurons",
                ctx()
            );
        };
        let _ = &old;
        roles.insert(OutletId::new(n, 0), out);
    }
    let end_in = model.node(end.node).inputs[end.act_slot];
    let end_roles = roles
        .get(&end_in)
        .context("the output projection's input is not reached from the projections")?
        .clone();
    out_weight(model, end, &end_roles, e, edits)
}

/// The residual sum an out-projection's output reaches through its bias and axis ops:
/// the sum node, its other input (the residual stream) and the bias on the way.
pub(crate) fn residual_sum(
    model: &TypedModel,
    out_node: usize,
) -> TractResult<(usize, OutletId, Option<OutletId>)> {
    let mut outlet = OutletId::new(out_node, 0);
    let mut bias: Option<OutletId> = None;
    for _ in 0..6 {
        let succ = model.outlet_successors(outlet);
        let [s] = succ else {
            bail!(
                "block output has {} consumers, expected the residual sum",
                succ.len()
            )
        };
        let node = model.node(s.node);
        let other = node.inputs.get(1 - s.slot.min(1)).copied();
        if node.op_is::<TypedBinOp>() {
            let other = other.context("binary op")?;
            if const_value(model, other).is_some() {
                bias = Some(other);
                outlet = OutletId::new(s.node, 0);
                continue;
            }
            return Ok((s.node, other, bias));
        } else if node.op_is::<AxisOp>() {
            outlet = OutletId::new(s.node, 0);
        } else {
            bail!(
                "expected a residual sum after the block, found {}",
                node.op.name()
            );
        }
    }
    bail!("no residual sum after the block")
}

/// Records the bypass of a removed block: its residual sum forwards the other input
/// (plus the bias when kept).
fn bypass(model: &TypedModel, e: &BlockEdit, edits: &mut Edits) -> TractResult<()> {
    let (sum, other, bias) = residual_sum(model, e.block.out_proj().node)?;
    edits.bypass.insert(
        sum,
        (other, if e.keep_bias_when_removed { bias } else { None }),
    );
    Ok(())
}

/// Rebuilds `model` with every block edited.
pub fn apply(model: &TypedModel, blocks: &[BlockEdit]) -> TractResult<TypedModel> {
    let mut edits = Edits::default();
    for e in blocks {
        match e.plan.choice() {
            BlockChoice::Dense => {}
            BlockChoice::Removed => bypass(model, e, &mut edits)
                .with_context(|| format!("removing {}", e.block.name))?,
            BlockChoice::Pruned => edit_block(model, e, &mut edits)
                .with_context(|| format!("pruning {}", e.block.name))?,
        }
    }
    let mut new = TypedModel {
        symbols: model.symbols.clone(),
        properties: model.properties.clone(),
        ..Default::default()
    };
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    let mut used_names: HashSet<String> = HashSet::new();
    for n in model.eval_order()? {
        let node = model.node(n);
        used_names.insert(node.name.clone());
        if let Some(src) = node.op_as::<TypedSource>() {
            let mut fact = src.fact.clone();
            if let Some(shape) = edits.sources.get(&n) {
                fact = TypedFact::dt_shape(fact.datum_type, shape.clone());
            }
            map.insert(OutletId::new(n, 0), new.add_source(&node.name, fact)?);
            continue;
        }
        if let Some(c) = node.op_as::<Const>() {
            let t = edits
                .consts
                .get(&n)
                .cloned()
                .map(Arc::new)
                .unwrap_or_else(|| c.val().clone());
            map.insert(OutletId::new(n, 0), new.add_const(&node.name, t)?);
            continue;
        }
        if let Some(&(fwd, bias)) = edits.bypass.get(&n) {
            let x = map[&fwd];
            let out = match bias {
                Some(b) => {
                    let bb = map[&b];
                    let op = node.op.clone();
                    new.wire_node(format!("{}.ziplm-bypass", node.name), op, &[x, bb])?[0]
                }
                None => x,
            };
            map.insert(OutletId::new(n, 0), out);
            continue;
        }
        let mut inputs: TVec<OutletId> = tvec![];
        for (slot, &i) in node.inputs.iter().enumerate() {
            match edits.const_uses.get(&(n, slot)) {
                Some(t) => inputs.push(new.add_const(
                    format!("{}.ziplm-{slot}", node.name),
                    t.clone().into_arc_tensor(),
                )?),
                None => inputs.push(map[&i]),
            }
        }
        let op = edits
            .ops
            .get(&n)
            .cloned()
            .unwrap_or_else(|| node.op.clone());
        let outs = new
            .wire_node(&node.name, op, &inputs)
            .with_context(|| format!("rewiring node `{}`", node.name))?;
        for (slot, o) in outs.into_iter().enumerate() {
            map.insert(OutletId::new(n, slot), o);
        }
    }
    // Keep the original order of inputs (eval order may differ).
    let inputs: TVec<OutletId> = model.input_outlets()?.iter().map(|o| map[o]).collect();
    new.set_input_outlets(&inputs)?;
    let outputs: TVec<OutletId> = model.output_outlets()?.iter().map(|o| map[o]).collect();
    new.select_output_outlets(&outputs)?;
    for (i, o) in model.output_outlets()?.iter().enumerate() {
        if let Some(label) = model.outlet_label(*o) {
            new.set_outlet_label(outputs[i], label.to_string())?;
        }
    }
    new.into_decluttered()
}
