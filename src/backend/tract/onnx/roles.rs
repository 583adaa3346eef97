//! Axis roles: which axes of which tensors carry heads or widths, and which shape
//! constants encode them.
//!
//! Starting from the projections of a block (their last axis is "Q heads x head_dim",
//! "KV heads x head_dim", "fused QKV" or "FFN width"), roles are propagated forward
//! through the block's ops with the concrete shapes tract computed for the workload:
//! a reshape splitting `[H*hd]` into `[H, hd]` yields a `Heads` axis, merging back
//! yields `QPacked`, a GQA expand after `KvHeads` yields `NRep`, and so on. Every
//! `Reshape`/`Expand`/`Split` whose output carries a role then has the element of its
//! target shape at that axis traced back to a constant (through `Concat`,
//! `Unsqueeze`, `Gather(Shape)`, `Mul`...): that constant is what changes when heads
//! or neurons are removed. Elements that are `-1`, or read from another tensor's shape,
//! adapt by themselves.

use super::tensors::{self, GraphIndex};
use std::collections::{HashMap, HashSet};
use tract_onnx::pb;
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, TractErrorContext};

/// What an axis holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Nothing that pruning changes.
    None,
    /// Query heads x head width, packed (`H * hd`).
    QPacked,
    /// KV heads x head width, packed (`kv * hd`).
    KvPacked,
    /// Fused Q, K, V projections (`(H + 2 kv) * hd`).
    Fused,
    /// Query heads (`H`).
    Heads,
    /// KV heads (`kv`).
    KvHeads,
    /// Query heads per KV head (`H / kv`).
    NRep,
    /// FFN neurons.
    Ffn,
}

/// Sizes of a block, before or after pruning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv: usize,
    /// Head width.
    pub head_dim: usize,
    /// FFN width.
    pub ffn: usize,
}

impl Dims {
    /// The size of an axis of this role.
    pub fn size(&self, r: Role) -> usize {
        match r {
            Role::None => 0,
            Role::QPacked => self.heads * self.head_dim,
            Role::KvPacked => self.kv * self.head_dim,
            Role::Fused => (self.heads + 2 * self.kv) * self.head_dim,
            Role::Heads => self.heads,
            Role::KvHeads => self.kv,
            Role::NRep => self.heads / self.kv.max(1),
            Role::Ffn => self.ffn,
        }
    }
}

/// A constant operand of an element-wise op that must be sliced along a role axis
/// (a bias, typically).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConstSlice {
    /// The node reading the constant.
    pub node: usize,
    /// Its input slot.
    pub slot: usize,
    /// The constant's tensor name (through `Identity` nodes).
    pub tensor: String,
    /// The axis of the constant to slice.
    pub axis: usize,
    /// The role of that axis.
    pub role: Role,
}

/// One element of a shape constant to change: input `slot` of `node` is a constant
/// whose element `index` becomes `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShapeEdit {
    /// Consuming node.
    pub node: usize,
    /// Its input slot holding the constant.
    pub slot: usize,
    /// Element index in the constant.
    pub index: usize,
    /// New value.
    pub value: i64,
}

/// Roles found in one block.
#[derive(Debug, Default)]
pub struct Region {
    /// Tensor name -> role of each axis.
    pub roles: HashMap<String, Vec<Role>>,
    /// Constant operands to slice.
    pub const_slices: Vec<ConstSlice>,
    /// Graph inputs reached (KV caches) -> roles of their axes.
    pub graph_inputs: HashMap<String, Vec<Role>>,
    /// Graph outputs reached -> roles.
    pub graph_outputs: HashMap<String, Vec<Role>>,
    /// Nodes the roles went through, in order.
    pub nodes: Vec<usize>,
}

const UNARY: &[&str] = &[
    "Cast",
    "Neg",
    "Sqrt",
    "Reciprocal",
    "Softmax",
    "LogSoftmax",
    "IsNaN",
    "IsInf",
    "Erf",
    "Sigmoid",
    "Tanh",
    "Relu",
    "Gelu",
    "Identity",
    "Dropout",
    "Exp",
    "Log",
    "Abs",
    "Not",
    "Sin",
    "Cos",
    "Elu",
    "Softplus",
    "Clip",
    "HardSigmoid",
];
const BROADCAST: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "And", "Or", "Max", "Min", "Greater",
    "Less", "Mod", "PRelu",
];

fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn norm_axis(a: i64, rank: usize) -> usize {
    if a < 0 {
        (a + rank as i64) as usize
    } else {
        a as usize
    }
}

struct Ctx<'a> {
    graph: &'a pb::GraphProto,
    index: &'a GraphIndex,
    shapes: &'a HashMap<String, Vec<usize>>,
}

impl Ctx<'_> {
    fn shape(&self, t: &str) -> TractResult<Vec<usize>> {
        if let Some(c) = self
            .index
            .resolve_const(self.graph, t)
            .and_then(|c| self.index.const_proto(self.graph, &c))
        {
            return Ok(tensors::dims(c));
        }
        self.shapes
            .get(t)
            .cloned()
            .with_context(|| format!("no shape known for tensor `{t}`"))
    }
    fn const_i64(&self, t: &str) -> Option<Vec<i64>> {
        tensors::read_i64(self.index.const_proto(self.graph, t)?).ok()
    }
    fn is_const(&self, t: &str) -> bool {
        self.index.resolve_const(self.graph, t).is_some()
    }
}

/// Propagates roles from `starts` (tensor, role of its last axis) through the graph,
/// stopping at the nodes in `ends` (the out-projections).
pub fn propagate(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    shapes: &HashMap<String, Vec<usize>>,
    starts: &[(String, Role)],
    ends: &HashSet<usize>,
) -> TractResult<Region> {
    let cx = Ctx {
        graph,
        index,
        shapes,
    };
    let mut region = Region::default();
    for (t, r) in starts {
        let rank = cx.shape(t)?.len();
        let mut roles = vec![Role::None; rank];
        roles[rank - 1] = *r;
        region.roles.insert(t.clone(), roles);
    }
    for (n, node) in graph.node.iter().enumerate() {
        if ends.contains(&n) || node.op_type == "Shape" || node.op_type == "Size" {
            continue;
        }
        let has_roles = node.input.iter().any(|i| region.roles.contains_key(i));
        if !has_roles {
            continue;
        }
        let outs = step(&cx, n, node, &mut region).with_context(|| {
            format!(
                "following heads/neurons through node `{}` ({})",
                node.name, node.op_type
            )
        })?;
        region.nodes.push(n);
        for (t, roles) in node.output.iter().zip(outs) {
            if roles.iter().any(|r| *r != Role::None) {
                if index.outputs.contains(t) {
                    region.graph_outputs.insert(t.clone(), roles.clone());
                }
                region.roles.insert(t.clone(), roles);
            } else {
                region.roles.insert(t.clone(), roles);
            }
        }
    }
    Ok(region)
}

fn roles_of(region: &Region, t: &str, rank: usize) -> Vec<Role> {
    region
        .roles
        .get(t)
        .cloned()
        .unwrap_or_else(|| vec![Role::None; rank])
}

fn step(
    cx: &Ctx,
    _n: usize,
    node: &pb::NodeProto,
    region: &mut Region,
) -> TractResult<Vec<Vec<Role>>> {
    let op = node.op_type.as_str();
    let out_shape = |i: usize| cx.shape(&node.output[i]);
    if UNARY.contains(&op) {
        let r = roles_of(region, &node.input[0], cx.shape(&node.input[0])?.len());
        if op == "Softmax" || op == "LogSoftmax" {
            let axis = attr(node, "axis").map(|a| a.i).unwrap_or(-1);
            if r[norm_axis(axis, r.len())] != Role::None {
                bail!("softmax over an axis that carries heads or neurons");
            }
        }
        return Ok(vec![r]);
    }
    if BROADCAST.contains(&op) {
        let os = out_shape(0)?;
        let rank = os.len();
        let mut out = vec![Role::None; rank];
        for inp in node.input.iter().filter(|i| !i.is_empty()) {
            let s = cx.shape(inp)?;
            let r = roles_of(region, inp, s.len());
            let off = rank - s.len();
            for (a, (&d, &role)) in s.iter().zip(&r).enumerate() {
                if role != Role::None && d == os[off + a] {
                    if out[off + a] != Role::None && out[off + a] != role {
                        bail!(
                            "operands disagree on axis {}: {:?} vs {role:?}",
                            off + a,
                            out[off + a]
                        );
                    }
                    out[off + a] = role;
                }
            }
        }
        // Constant operands spanning a role axis are sliced with it (biases).
        for (slot, inp) in node.input.iter().enumerate() {
            let Some(c) = (!inp.is_empty())
                .then(|| cx.index.resolve_const(cx.graph, inp))
                .flatten()
            else {
                continue;
            };
            let s = cx.shape(inp)?;
            let off = rank - s.len();
            for (a, &d) in s.iter().enumerate() {
                let role = out[off + a];
                if role != Role::None && d == os[off + a] && d > 1 {
                    region.const_slices.push(ConstSlice {
                        node: _n,
                        slot,
                        tensor: c.clone(),
                        axis: a,
                        role,
                    });
                }
            }
        }
        return Ok(vec![out]);
    }
    match op {
        "Transpose" => {
            let r = roles_of(region, &node.input[0], cx.shape(&node.input[0])?.len());
            let perm: Vec<usize> = match attr(node, "perm") {
                Some(a) => a.ints.iter().map(|&p| p as usize).collect(),
                None => (0..r.len()).rev().collect(),
            };
            Ok(vec![perm.iter().map(|&p| r[p]).collect()])
        }
        "Unsqueeze" | "Squeeze" => {
            let in_rank = cx.shape(&node.input[0])?.len();
            let r = roles_of(region, &node.input[0], in_rank);
            let out_rank = out_shape(0)?.len();
            let axes: Vec<i64> = match attr(node, "axes") {
                Some(a) => a.ints.clone(),
                None => node
                    .input
                    .get(1)
                    .and_then(|t| cx.const_i64(t))
                    .unwrap_or_default(),
            };
            if op == "Unsqueeze" {
                let mut axes: Vec<usize> = axes.iter().map(|&a| norm_axis(a, out_rank)).collect();
                axes.sort();
                let mut out = r.clone();
                for a in axes {
                    out.insert(a, Role::None);
                }
                Ok(vec![out])
            } else {
                let in_shape = cx.shape(&node.input[0])?;
                let axes: Vec<usize> = if axes.is_empty() {
                    (0..in_rank).filter(|&a| in_shape[a] == 1).collect()
                } else {
                    axes.iter().map(|&a| norm_axis(a, in_rank)).collect()
                };
                Ok(vec![r
                    .iter()
                    .enumerate()
                    .filter(|(a, _)| !axes.contains(a))
                    .map(|(_, &x)| x)
                    .collect()])
            }
        }
        "Reshape" | "Flatten" => {
            let is = cx.shape(&node.input[0])?;
            let r = roles_of(region, &node.input[0], is.len());
            Ok(vec![reshape_roles(&is, &r, &out_shape(0)?)?])
        }
        "Expand" => {
            let is = cx.shape(&node.input[0])?;
            let r = roles_of(region, &node.input[0], is.len());
            let os = out_shape(0)?;
            let off = os.len() - is.len();
            let mut out = vec![Role::None; os.len()];
            for a in 0..is.len() {
                let o = off + a;
                if is[a] == os[o] {
                    out[o] = r[a];
                } else if r[a] != Role::None {
                    bail!("expanding an axis that carries heads or neurons");
                }
            }
            // A broadcast axis right after the KV heads is the GQA repeat.
            for o in 1..os.len() {
                let a = o as isize - off as isize;
                let was_one = a >= 0 && is[a as usize] == 1 && os[o] > 1;
                if was_one && out[o - 1] == Role::KvHeads {
                    out[o] = Role::NRep;
                }
            }
            Ok(vec![out])
        }
        "MatMul" => {
            if node.input.iter().any(|i| cx.is_const(i)) {
                bail!("a projection inside the block that is not its output projection");
            }
            let a = cx.shape(&node.input[0])?;
            let b = cx.shape(&node.input[1])?;
            let ra = roles_of(region, &node.input[0], a.len());
            let rb = roles_of(region, &node.input[1], b.len());
            if ra[a.len() - 1] != Role::None || rb[b.len().saturating_sub(2)] != Role::None {
                bail!("a product contracting an axis that carries heads or neurons");
            }
            let os = out_shape(0)?;
            let rank = os.len();
            let mut out = vec![Role::None; rank];
            for (s, r) in [(&a, &ra), (&b, &rb)] {
                let off = rank - s.len();
                for ax in 0..s.len().saturating_sub(2) {
                    if r[ax] != Role::None && s[ax] == os[off + ax] {
                        if out[off + ax] != Role::None && out[off + ax] != r[ax] {
                            bail!(
                                "operands disagree on batch axis {}: {:?} vs {:?}",
                                off + ax,
                                out[off + ax],
                                r[ax]
                            );
                        }
                        out[off + ax] = r[ax];
                    }
                }
            }
            out[rank - 2] = ra[a.len() - 2];
            out[rank - 1] = rb[b.len() - 1];
            Ok(vec![out])
        }
        "Concat" => {
            let axis_attr = attr(node, "axis").map(|a| a.i).unwrap_or(0);
            let os = out_shape(0)?;
            let axis = norm_axis(axis_attr, os.len());
            let mut out: Option<Vec<Role>> = None;
            for inp in &node.input {
                if let Some(r) = region.roles.get(inp) {
                    if r[axis] != Role::None {
                        bail!("concatenating along an axis that carries heads or neurons");
                    }
                    match &out {
                        None => out = Some(r.clone()),
                        Some(o) if o != r => {
                            bail!("concatenated tensors disagree on their heads axes")
                        }
                        _ => {}
                    }
                }
            }
            let out = out.expect("has_roles");
            for inp in &node.input {
                if cx.index.inputs.contains(inp) {
                    region.graph_inputs.insert(inp.clone(), out.clone());
                } else if !region.roles.contains_key(inp) {
                    bail!("concatenation with `{inp}`, which does not carry the block's heads");
                }
            }
            Ok(vec![out])
        }
        "Split" => {
            let is = cx.shape(&node.input[0])?;
            let r = roles_of(region, &node.input[0], is.len());
            let axis = norm_axis(attr(node, "axis").map(|a| a.i).unwrap_or(0), is.len());
            let outs: Vec<Vec<Role>> = match r[axis] {
                Role::None => vec![r.clone(); node.output.len()],
                Role::Fused if node.output.len() == 3 => {
                    [Role::QPacked, Role::QPacked, Role::QPacked]
                        .iter()
                        .map(|&x| {
                            let mut o = r.clone();
                            o[axis] = x;
                            o
                        })
                        .collect()
                }
                other => bail!("splitting an axis of role {other:?}"),
            };
            Ok(outs)
        }
        "Slice" => {
            let is = cx.shape(&node.input[0])?;
            let r = roles_of(region, &node.input[0], is.len());
            let os = out_shape(0)?;
            for a in 0..is.len() {
                if r[a] != Role::None && is[a] != os[a] {
                    bail!("slicing an axis that carries heads or neurons");
                }
            }
            Ok(vec![r])
        }
        _ => bail!("unsupported op {op} on a tensor carrying heads or neurons"),
    }
}

/// Roles of a reshape's output from its input roles, grouping axes whose products
/// match.
pub fn reshape_roles(is: &[usize], ir: &[Role], os: &[usize]) -> TractResult<Vec<Role>> {
    let mut out = vec![Role::None; os.len()];
    let (mut i, mut j) = (0usize, 0usize);
    while i < is.len() || j < os.len() {
        let (gi, gj) = (i, j);
        let mut pi: usize = if i < is.len() {
            i += 1;
            is[i - 1]
        } else {
            1
        };
        let mut pj: usize = if j < os.len() {
            j += 1;
            os[j - 1]
        } else {
            1
        };
        while pi != pj {
            if pi < pj {
                if i >= is.len() {
                    bail!("reshape {is:?} -> {os:?}: sizes do not match");
                }
                pi *= is[i];
                i += 1;
            } else {
                if j >= os.len() {
                    bail!("reshape {is:?} -> {os:?}: sizes do not match");
                }
                pj *= os[j];
                j += 1;
            }
        }
        // Absorb trailing size-1 axes into this group.
        while i < is.len() && is[i] == 1 && (j >= os.len() || os[j] != 1) {
            i += 1;
        }
        while j < os.len() && os[j] == 1 && (i >= is.len() || is[i] != 1) {
            j += 1;
        }
        let in_axes: Vec<usize> = (gi..i).filter(|&a| is[a] != 1).collect();
        let out_axes: Vec<usize> = (gj..j).filter(|&a| os[a] != 1).collect();
        let in_roles: Vec<Role> = in_axes.iter().map(|&a| ir[a]).collect();
        if in_roles.iter().all(|r| *r == Role::None) {
            continue;
        }
        let set = |out: &mut Vec<Role>, roles: &[Role]| {
            for (&a, &r) in out_axes.iter().zip(roles) {
                out[a] = r;
            }
        };
        match (in_roles.as_slice(), out_axes.len()) {
            (r, n) if r.len() == n && in_axes.iter().zip(&out_axes).all(|(&a, &b)| is[a] == os[b]) => set(&mut out, r),
            ([Role::QPacked], 2) => set(&mut out, &[Role::Heads, Role::None]),
            ([Role::KvPacked], 2) => set(&mut out, &[Role::KvHeads, Role::None]),
            ([Role::Heads, Role::None], 1) => set(&mut out, &[Role::QPacked]),
            ([Role::KvHeads, Role::None], 1) => set(&mut out, &[Role::KvPacked]),
            ([Role::KvHeads, Role::NRep], 1) => set(&mut out, &[Role::Heads]),
            ([Role::KvHeads, Role::NRep, Role::None], 1) => set(&mut out, &[Role::QPacked]),
            ([Role::KvHeads, Role::NRep, Role::None], 2) => set(&mut out, &[Role::Heads, Role::None]),
            // GQA folded into a product: heads split into (KV heads, repeats).
            ([Role::Heads], 2) => set(&mut out, &[Role::KvHeads, Role::NRep]),
            ([Role::QPacked], 3) => set(&mut out, &[Role::KvHeads, Role::NRep, Role::None]),
            ([Role::Heads, Role::None], 3) => set(&mut out, &[Role::KvHeads, Role::NRep, Role::None]),
            (r, _) => bail!("reshape {is:?} -> {os:?} regroups axes of roles {r:?} in a way ziplm cannot follow"),
        }
    }
    Ok(out)
}

/// Where an element of a shape vector comes from.
#[derive(Clone, Debug, PartialEq)]
enum Prov {
    Leaf {
        node: usize,
        slot: usize,
        index: usize,
        value: i64,
    },
    ShapeOf {
        tensor: String,
        axis: usize,
    },
    Mul(Box<Prov>, Box<Prov>),
    Unknown(String),
}

fn length(cx: &Ctx, t: &str) -> usize {
    cx.shape(t)
        .map(|s| s.first().copied().unwrap_or(1))
        .unwrap_or(1)
}

fn prov(cx: &Ctx, node: usize, slot: usize, elem: usize, depth: usize) -> Prov {
    if depth > 16 {
        return Prov::Unknown("too deep".into());
    }
    let t = &cx.graph.node[node].input[slot];
    if let Some(vals) = cx.const_i64(t) {
        let index = if vals.len() == 1 { 0 } else { elem };
        return match vals.get(index) {
            Some(&value) => Prov::Leaf {
                node,
                slot,
                index,
                value,
            },
            None => Prov::Unknown(format!("index {elem} out of `{t}`")),
        };
    }
    let Some(&(p, _)) = cx.index.producer.get(t) else {
        return Prov::Unknown(format!("`{t}` has no producer"));
    };
    let pn = &cx.graph.node[p];
    match pn.op_type.as_str() {
        "Concat" => {
            let mut off = 0;
            for (i, piece) in pn.input.iter().enumerate() {
                let len = length(cx, piece);
                if elem < off + len {
                    return prov(cx, p, i, elem - off, depth + 1);
                }
                off += len;
            }
            Prov::Unknown("concat too short".into())
        }
        "Unsqueeze" | "Squeeze" | "Identity" | "Cast" | "Reshape" | "Flatten" => {
            prov(cx, p, 0, elem, depth + 1)
        }
        "Gather" => {
            let Some(idx) = pn.input.get(1).and_then(|i| cx.const_i64(i)) else {
                return Prov::Unknown("gather with computed indices".into());
            };
            let i = if idx.len() == 1 {
                idx[0]
            } else {
                idx.get(elem).copied().unwrap_or(0)
            };
            let data = &pn.input[0];
            if let Some(&(s, _)) = cx.index.producer.get(data) {
                let sn = &cx.graph.node[s];
                if sn.op_type == "Shape" {
                    let rank = cx.shape(&sn.input[0]).map(|v| v.len()).unwrap_or(0);
                    let start = attr(sn, "start").map(|a| norm_axis(a.i, rank)).unwrap_or(0);
                    return Prov::ShapeOf {
                        tensor: sn.input[0].clone(),
                        axis: start + norm_axis(i, rank - start),
                    };
                }
            }
            Prov::Unknown("gather from a computed vector".into())
        }
        "Shape" => {
            let rank = cx.shape(&pn.input[0]).map(|v| v.len()).unwrap_or(0);
            let start = attr(pn, "start").map(|a| norm_axis(a.i, rank)).unwrap_or(0);
            Prov::ShapeOf {
                tensor: pn.input[0].clone(),
                axis: start + elem,
            }
        }
        "Slice" => {
            let data = &pn.input[0];
            let starts = pn.input.get(1).and_then(|i| cx.const_i64(i));
            match (
                cx.index.producer.get(data).map(|&(s, _)| &cx.graph.node[s]),
                starts,
            ) {
                (Some(sn), Some(st)) if sn.op_type == "Shape" => {
                    let rank = cx.shape(&sn.input[0]).map(|v| v.len()).unwrap_or(0);
                    Prov::ShapeOf {
                        tensor: sn.input[0].clone(),
                        axis: norm_axis(st[0].max(-(rank as i64)), rank) + elem,
                    }
                }
                _ => Prov::Unknown("slice of a computed vector".into()),
            }
        }
        "Mul" => {
            let e = |i: usize| {
                if length(cx, &pn.input[i]) == 1 {
                    0
                } else {
                    elem
                }
            };
            Prov::Mul(
                Box::new(prov(cx, p, 0, e(0), depth + 1)),
                Box::new(prov(cx, p, 1, e(1), depth + 1)),
            )
        }
        "Where" => {
            let from_ones = cx.index.producer_op(cx.graph, &pn.input[1]) == Some("ConstantOfShape");
            if from_ones {
                prov(cx, p, 2, elem, depth + 1)
            } else {
                Prov::Unknown("where".into())
            }
        }
        other => Prov::Unknown(format!("computed by {other}")),
    }
}

/// The shape-constant edits that make `region`'s reshapes, expands and splits produce
/// the `new` sizes instead of the `old` ones.
pub fn shape_edits(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    shapes: &HashMap<String, Vec<usize>>,
    region: &Region,
    old: &Dims,
    new: &Dims,
) -> TractResult<Vec<ShapeEdit>> {
    let cx = Ctx {
        graph,
        index,
        shapes,
    };
    let mut edits = vec![];
    for &n in &region.nodes {
        let node = &graph.node[n];
        let op = node.op_type.as_str();
        let ctx = || format!("rewriting the shape of node `{}` ({op})", node.name);
        match op {
            "Reshape" | "Expand" => {
                let Some(out_roles) = region.roles.get(&node.output[0]) else {
                    continue;
                };
                for (p, &role) in out_roles.iter().enumerate() {
                    if role == Role::None {
                        continue;
                    }
                    let (o, w) = (old.size(role) as i64, new.size(role) as i64);
                    if o == w {
                        continue;
                    }
                    let pv = prov(&cx, n, 1, p, 0);
                    resolve(&cx, region, &pv, o, w, old, new, &mut edits).with_context(|| {
                        format!(
                            "{}: element {p} of the target shape ({role:?}: {o} -> {w})",
                            ctx()
                        )
                    })?;
                }
            }
            "Split" => {
                let Some(first) = node.output.first().and_then(|t| region.roles.get(t)) else {
                    continue;
                };
                let rank = first.len();
                let axis = norm_axis(attr(node, "axis").map(|a| a.i).unwrap_or(0), rank);
                for (i, out) in node.output.iter().enumerate() {
                    let role = region.roles.get(out).map(|r| r[axis]).unwrap_or(Role::None);
                    if role == Role::None {
                        continue;
                    }
                    let (o, w) = (old.size(role) as i64, new.size(role) as i64);
                    if node.input.len() > 1 && !node.input[1].is_empty() {
                        let pv = prov(&cx, n, 1, i, 0);
                        resolve(&cx, region, &pv, o, w, old, new, &mut edits)
                            .with_context(|| format!("{}: split size {i}", ctx()))?;
                    } else if o != w {
                        bail!(
                            "{}: split sizes given as an attribute (opset < 13) are not supported",
                            ctx()
                        );
                    }
                }
            }
            _ => {}
        }
    }
    Ok(edits)
}

#[allow(clippy::too_many_arguments)]
fn resolve(
    cx: &Ctx,
    region: &Region,
    pv: &Prov,
    old: i64,
    new: i64,
    old_dims: &Dims,
    new_dims: &Dims,
    edits: &mut Vec<ShapeEdit>,
) -> TractResult<()> {
    match pv {
        Prov::Leaf { value, .. } if *value == -1 || *value == 0 => Ok(()),
        Prov::Leaf {
            node,
            slot,
            index,
            value,
        } => {
            if *value != old {
                bail!("found constant {value}, expected {old}");
            }
            edits.push(ShapeEdit {
                node: *node,
                slot: *slot,
                index: *index,
                value: new,
            });
            Ok(())
        }
        Prov::ShapeOf { .. } => Ok(()),
        Prov::Mul(a, b) => {
            let (leaf, dynamic) = match (a.as_ref(), b.as_ref()) {
                (l @ Prov::Leaf { .. }, Prov::ShapeOf { tensor, axis })
                | (Prov::ShapeOf { tensor, axis }, l @ Prov::Leaf { .. }) => (l, (tensor, *axis)),
                _ => bail!("a product that is not (shape of a tensor) x (constant)"),
            };
            let Prov::Leaf {
                node,
                slot,
                index,
                value,
            } = leaf
            else {
                unreachable!()
            };
            let dyn_old = cx.shape(dynamic.0)?[dynamic.1] as i64;
            let role = region
                .roles
                .get(dynamic.0)
                .map(|r| r[dynamic.1])
                .unwrap_or(Role::None);
            let dyn_new = if role == Role::None {
                dyn_old
            } else {
                new_dims.size(role) as i64
            };
            let _ = old_dims;
            if value * dyn_old != old {
                bail!("{value} x {dyn_old} is not the expected {old}");
            }
            if dyn_new == 0 || new % dyn_new != 0 {
                bail!("{new} is not a multiple of {dyn_new}");
            }
            edits.push(ShapeEdit {
                node: *node,
                slot: *slot,
                index: *index,
                value: new / dyn_new,
            });
            Ok(())
        }
        Prov::Unknown(why) => bail!("cannot trace where this size comes from ({why})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::*;

    #[test]
    fn reshape_splits_and_merges_heads() {
        assert_eq!(
            reshape_roles(&[1, 16, 64], &[None, None, QPacked], &[1, 16, 4, 16]).unwrap(),
            vec![None, None, Heads, None]
        );
        assert_eq!(
            reshape_roles(&[1, 16, 4, 16], &[None, None, Heads, None], &[1, 16, 64]).unwrap(),
            vec![None, None, QPacked]
        );
        assert_eq!(
            reshape_roles(
                &[1, 2, 2, 24, 16],
                &[None, KvHeads, NRep, None, None],
                &[1, 4, 24, 16]
            )
            .unwrap(),
            vec![None, Heads, None, None]
        );
        assert_eq!(
            reshape_roles(&[16, 192], &[None, Fused], &[1, 16, 192]).unwrap(),
            vec![None, None, Fused]
        );
        assert!(reshape_roles(&[1, 16, 64], &[None, None, Ffn], &[1, 16, 2, 32]).is_err());
    }
}
