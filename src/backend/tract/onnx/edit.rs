//! Applying a plan to the ONNX file.

use super::locate::{self, Matrices, OnnxBlock, OnnxProj};
use super::roles::{self, Dims, Role, ShapeEdit};
use super::tensors::{self, ConstLoc, GraphIndex};
use super::OnnxSource;
use crate::backend::tract::inputs;
use std::collections::{BTreeMap, HashMap, HashSet};
use tract_onnx::pb;
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, TractErrorContext};
use ziplm_plugin_api::{AdapterError, AdapterResult, BlockChoice, BlockKind, Plan, PrunedWeights};

/// Kept indices along an axis of each role, for one block.
struct Kept {
    by_role: HashMap<Role, Vec<usize>>,
}

impl Kept {
    fn get(&self, r: Role) -> TractResult<&[usize]> {
        self.by_role
            .get(&r)
            .map(|v| v.as_slice())
            .with_context(|| format!("no kept indices for an axis of role {r:?}"))
    }
}

fn expand_heads(heads: &[usize], hd: usize) -> Vec<usize> {
    heads.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect()
}

/// All edits, collected before anything is changed.
#[derive(Default)]
struct Edits {
    /// Constant name -> (new dims, new values).
    consts: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    shape: Vec<ShapeEdit>,
    io_dims: BTreeMap<String, Vec<(usize, usize)>>,
    /// Inputs to point at a new float constant: (node, slot, new tensor).
    rewires: Vec<(usize, usize, pb::TensorProto)>,
    /// Residual adds to rewire: (node, slot of the branch, replacement tensor or None = Identity of the other input).
    bypass: Vec<(usize, usize, Option<String>)>,
}

impl Edits {
    fn set_const(&mut self, name: &str, dims: Vec<usize>, values: Vec<f32>) -> TractResult<()> {
        if let Some(prev) = self.consts.get(name) {
            if prev.0 != dims || prev.1 != values {
                bail!("constant `{name}` would be edited twice in different ways (shared between blocks?)");
            }
        }
        self.consts.insert(name.to_string(), (dims, values));
        Ok(())
    }
}

/// Writes the ONNX model pruned by `plan`, with the out-projections of `weights`.
/// Replaced tensors other than out-projections are refused (not written yet).
pub fn emit(
    model: &impl OnnxSource,
    plan: &Plan,
    weights: &PrunedWeights,
) -> AdapterResult<Vec<u8>> {
    refuse_other_tensors(weights)?;
    emit_inner(model, plan, weights).map_err(|e| {
        super::emit_error(
            &format!(
                "writing the pruned ONNX of {}",
                model.source_path().display()
            ),
            e,
        )
    })
}

/// The tract backend writes out-projections only: any other replaced tensor is an
/// error, never silently dropped.
pub fn refuse_other_tensors(weights: &PrunedWeights) -> AdapterResult<()> {
    match weights.unwritable(|_, _| false) {
        None => Ok(()),
        Some((b, role)) => Err(AdapterError::Unsupported {
            what: format!("replaced `{role}` tensor of {b}"),
            detail: "the tract backend writes compensated out-projections only".into(),
            hint: "run the job without the stage that changed it".into(),
        }),
    }
}

fn emit_inner(
    model: &impl OnnxSource,
    plan: &Plan,
    weights: &PrunedWeights,
) -> TractResult<Vec<u8>> {
    let mut proto = model.source_file().proto.clone();
    let graph = model.source_file().graph();
    let index = GraphIndex::new(graph);
    let specs = model.source_inputs();
    let workload = model.source_workload();
    let input_shapes: Vec<(DatumType, Vec<usize>)> = specs
        .iter()
        .map(|s| (s.datum_type, inputs::shape_for(s, &workload)))
        .collect();
    let shapes = model.source_file().tensor_shapes(&input_shapes)?;
    let mut mats = Matrices::default();
    let mut edits = Edits::default();
    let structure = model.source_structure();
    for (bp, (block, rec)) in plan
        .blocks
        .iter()
        .zip(structure.blocks.iter().zip(model.source_blocks()))
    {
        let choice = bp.choice();
        if choice == BlockChoice::Dense {
            continue;
        }
        let located = locate::locate(graph, &index, &mut mats, rec)?;
        let ctx = || format!("{} ({})", block.id, block.name);
        if choice == BlockChoice::Removed {
            let out = match &located {
                OnnxBlock::Attention { o, .. } => o,
                OnnxBlock::Ffn { down, .. } => down,
            };
            bypass(graph, &index, out, &mut edits)
                .with_context(|| format!("removing {}", ctx()))?;
            continue;
        }
        let compensated = weights.out_projections.get(&block.id);
        match (block.kind, &located) {
            (BlockKind::Attention(a), OnnxBlock::Attention { q, k, v, o }) => {
                let hd = a.head_dim;
                let kept = Kept {
                    by_role: HashMap::from([
                        (Role::QPacked, expand_heads(&bp.kept, hd)),
                        (Role::KvPacked, expand_heads(&bp.kept_kv_heads, hd)),
                        (Role::Heads, bp.kept.clone()),
                        (Role::KvHeads, bp.kept_kv_heads.clone()),
                        (Role::Fused, {
                            let (qw, kw) = (a.n_heads * hd, a.n_kv_heads * hd);
                            let mut f = expand_heads(&bp.kept, hd);
                            f.extend(expand_heads(&bp.kept_kv_heads, hd).iter().map(|c| c + qw));
                            f.extend(
                                expand_heads(&bp.kept_kv_heads, hd)
                                    .iter()
                                    .map(|c| c + qw + kw),
                            );
                            f
                        }),
                    ]),
                };
                if a.n_kv_heads != a.n_heads {
                    // Equal heads per KV group: the repeat factor changes, the same in every group.
                    let per = bp.kept.len() / bp.kept_kv_heads.len().max(1);
                    let counts: BTreeMap<usize, usize> =
                        bp.kept.iter().fold(BTreeMap::new(), |mut m, h| {
                            *m.entry(h / a.heads_per_kv()).or_insert(0) += 1;
                            m
                        });
                    if counts.values().any(|&c| c != per) {
                        bail!(
                            "{}: kept heads {:?} are not the same number in every KV group",
                            ctx(),
                            bp.kept
                        );
                    }
                }
                slice_projections(
                    graph,
                    &index,
                    &mut mats,
                    &[(q, Role::QPacked), (k, Role::KvPacked), (v, Role::KvPacked)],
                    &kept,
                    &mut edits,
                )
                .with_context(|| format!("slicing the projections of {}", ctx()))?;
                slice_out(
                    graph,
                    &index,
                    &mut mats,
                    o,
                    kept.get(Role::QPacked)?,
                    compensated,
                    &mut edits,
                )?;
                let old = Dims {
                    heads: a.n_heads,
                    kv: a.n_kv_heads,
                    head_dim: hd,
                    ffn: 0,
                };
                let new = Dims {
                    heads: bp.kept.len(),
                    kv: bp.kept_kv_heads.len(),
                    head_dim: hd,
                    ffn: 0,
                };
                let fused = q.weight == k.weight;
                // Without GQA the KV heads are the query heads: one role for both.
                let kv_role = if a.n_kv_heads == a.n_heads {
                    Role::QPacked
                } else {
                    Role::KvPacked
                };
                if fused && a.n_kv_heads != a.n_heads {
                    bail!(
                        "{}: fused QKV projections with grouped-query attention are not supported",
                        ctx()
                    );
                }
                let starts: Vec<(String, Role)> = if fused {
                    vec![(graph.node[q.node].output[0].clone(), Role::Fused)]
                } else {
                    vec![
                        (graph.node[q.node].output[0].clone(), Role::QPacked),
                        (graph.node[k.node].output[0].clone(), kv_role),
                        (graph.node[v.node].output[0].clone(), kv_role),
                    ]
                };
                region_edits(
                    graph, &index, &shapes, &starts, o, &old, &new, &kept, &mut edits,
                )
                .with_context(ctx)?;
            }
            (BlockKind::Ffn(f), OnnxBlock::Ffn { ups, down }) => {
                let kept = Kept {
                    by_role: HashMap::from([(Role::Ffn, bp.kept.clone())]),
                };
                let projs: Vec<(&OnnxProj, Role)> = ups.iter().map(|u| (u, Role::Ffn)).collect();
                slice_projections(graph, &index, &mut mats, &projs, &kept, &mut edits)
                    .with_context(|| format!("slicing the projections of {}", ctx()))?;
                slice_out(
                    graph,
                    &index,
                    &mut mats,
                    down,
                    &bp.kept,
                    compensated,
                    &mut edits,
                )?;
                let old = Dims {
                    heads: 0,
                    kv: 0,
                    head_dim: 0,
                    ffn: f.width,
                };
                let new = Dims {
                    heads: 0,
                    kv: 0,
                    head_dim: 0,
                    ffn: bp.kept.len(),
                };
                let starts: Vec<(String, Role)> = ups
                    .iter()
                    .map(|u| (graph.node[u.node].output[0].clone(), Role::Ffn))
                    .collect();
                region_edits(
                    graph, &index, &shapes, &starts, down, &old, &new, &kept, &mut edits,
                )
                .with_context(ctx)?;
            }
            _ => bail!("{}: the plan's block kind does not match the file", ctx()),
        }
    }
    apply(&mut proto, &index, edits)?;
    prune_dead(proto.graph.as_mut().expect("graph"));
    proto.metadata_props.retain(|p| p.key != "ziplm.plan");
    proto.metadata_props.push(pb::StringStringEntryProto {
        key: "ziplm.plan".into(),
        value: plan_summary(plan),
    });
    use prost::Message;
    Ok(proto.encode_to_vec())
}

/// "L0 attn 3/4 heads, L0 ffn 96/128, ..." (stored in the model's metadata).
fn plan_summary(plan: &Plan) -> String {
    plan.blocks
        .iter()
        .map(|b| {
            let (kind, full) = match b.kind {
                BlockKind::Attention(a) => ("heads", a.n_heads),
                BlockKind::Ffn(f) => ("ffn", f.width),
            };
            format!("{}:{kind}={}/{full}", b.block.0, b.kept.len())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Slices the output axis of each projection's weight (and Gemm bias) to the kept
/// indices of its role. Projections sharing one weight (fused QKV) are sliced together.
fn slice_projections(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    mats: &mut Matrices,
    projs: &[(&OnnxProj, Role)],
    kept: &Kept,
    edits: &mut Edits,
) -> TractResult<()> {
    let mut by_weight: BTreeMap<&str, Vec<(&OnnxProj, Role)>> = BTreeMap::new();
    for &(p, r) in projs {
        by_weight.entry(p.weight.as_str()).or_default().push((p, r));
    }
    for (weight, mut parts) in by_weight {
        parts.sort_by_key(|(p, _)| p.offset);
        let t = index.const_proto(graph, weight).context("weight")?;
        let dims = tensors::dims(t);
        let (out_axis, total) = if parts[0].0.transposed {
            (0, dims[0])
        } else {
            (1, dims[1])
        };
        let mut cols = vec![];
        let mut covered = 0;
        for (p, r) in &parts {
            if p.offset != covered {
                bail!("weight `{weight}` has outputs outside the recognised projections");
            }
            let role_kept = kept.get(*r)?;
            cols.extend(role_kept.iter().map(|c| c + p.offset));
            covered += p.width;
        }
        if covered != total {
            bail!("weight `{weight}` has {total} outputs, the projections cover {covered}");
        }
        let values = tensors::read_f32(t)?;
        let (d, v) = tensors::slice_axis(&values, &dims, out_axis, &cols);
        edits.set_const(weight, d, v)?;
        if let Some(bias) = &parts[0].0.bias {
            let b = index.const_proto(graph, bias).context("bias")?;
            let bd = tensors::dims(b);
            if bd.iter().product::<usize>() == total {
                let bv = tensors::read_f32(b)?;
                let axis = bd.len() - 1;
                let (d, v) = tensors::slice_axis(&bv, &bd, axis, &cols);
                let mut nt = b.clone();
                tensors::write_f32(&mut nt, &d, &v)?;
                edits.rewires.push((parts[0].0.node, 2, nt));
            }
        }
        let _ = mats;
    }
    Ok(())
}

/// Slices the input axis of the out-projection and writes the compensated weights.
fn slice_out(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    _mats: &mut Matrices,
    o: &OnnxProj,
    kept: &[usize],
    compensated: Option<&ziplm_plugin_api::WeightMatrix>,
    edits: &mut Edits,
) -> TractResult<()> {
    let t = index.const_proto(graph, &o.weight).context("out weight")?;
    let dims = tensors::dims(t);
    let in_axis = if o.transposed { 1 } else { 0 };
    let values = tensors::read_f32(t)?;
    let (d, mut v) = tensors::slice_axis(&values, &dims, in_axis, kept);
    if let Some(w) = compensated {
        // w is outputs x kept inputs.
        if w.cols != kept.len() || w.rows != o.width {
            bail!(
                "compensated weights are {}x{}, expected {}x{}",
                w.rows,
                w.cols,
                o.width,
                kept.len()
            );
        }
        for i in 0..kept.len() {
            for j in 0..o.width {
                let val = w.data[j * w.cols + i];
                if o.transposed {
                    v[j * kept.len() + i] = val;
                } else {
                    v[i * o.width + j] = val;
                }
            }
        }
    }
    edits.set_const(&o.weight, d, v)
}

#[allow(clippy::too_many_arguments)]
fn region_edits(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    shapes: &HashMap<String, Vec<usize>>,
    starts: &[(String, Role)],
    end: &OnnxProj,
    old: &Dims,
    new: &Dims,
    kept: &Kept,
    edits: &mut Edits,
) -> TractResult<()> {
    let ends = HashSet::from([end.node]);
    let region = roles::propagate(graph, index, shapes, starts, &ends)?;
    // The out-projection must read the kept axis.
    let act = &graph.node[end.node].input[0];
    let act_roles = region.roles.get(act).with_context(|| {
        format!("the output projection's input `{act}` is not reached from the projections")
    })?;
    let last = *act_roles.last().unwrap_or(&Role::None);
    if !matches!(last, Role::QPacked | Role::Ffn) {
        bail!("the output projection reads an axis of role {last:?}, expected the packed heads or the FFN width");
    }
    for cs in &region.const_slices {
        let t = index
            .const_proto(graph, &cs.tensor)
            .context("constant operand")?;
        let d = tensors::dims(t);
        let v = tensors::read_f32(t)?;
        let (nd, nv) = tensors::slice_axis(&v, &d, cs.axis, kept.get(cs.role)?);
        // Copy on write: the constant may be shared with other blocks.
        let mut nt = t.clone();
        tensors::write_f32(&mut nt, &nd, &nv)?;
        edits.rewires.push((cs.node, cs.slot, nt));
    }
    edits
        .shape
        .extend(roles::shape_edits(graph, index, shapes, &region, old, new)?);
    for (name, r) in region
        .graph_inputs
        .iter()
        .chain(region.graph_outputs.iter())
    {
        let e = edits.io_dims.entry(name.clone()).or_default();
        for (axis, role) in r.iter().enumerate() {
            if *role != Role::None {
                e.push((axis, new.size(*role)));
            }
        }
    }
    Ok(())
}

/// Finds the residual sum fed by the block's output and records how to bypass it.
fn bypass(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    out: &OnnxProj,
    edits: &mut Edits,
) -> TractResult<()> {
    let mut t = graph.node[out.node].output[0].clone();
    let mut bias = out.bias.clone();
    for _ in 0..6 {
        let consumers = index.consumers.get(&t).cloned().unwrap_or_default();
        let [(n, slot)] = consumers.as_slice() else {
            bail!(
                "the block's output `{t}` has {} consumers, expected the residual sum",
                consumers.len()
            );
        };
        let node = &graph.node[*n];
        let other = node
            .input
            .get(1 - slot.min(&1))
            .cloned()
            .unwrap_or_default();
        match node.op_type.as_str() {
            "Add" if index.resolve_const(graph, &other).is_some() => {
                bias = Some(other);
                t = node.output[0].clone();
            }
            "Add" => {
                // The residual sum. Post-LN (only LayerNorms read it): keep the bias.
                let post_ln = index.consumers.get(&node.output[0]).is_some_and(|c| {
                    !c.is_empty()
                        && c.iter()
                            .all(|&(m, _)| graph.node[m].op_type == "LayerNormalization")
                });
                edits
                    .bypass
                    .push((*n, *slot, if post_ln { bias } else { None }));
                return Ok(());
            }
            "Reshape" | "Identity" | "Cast" => t = node.output[0].clone(),
            other => bail!(
                "expected a residual sum after the block, found {other} (`{}`)",
                node.name
            ),
        }
    }
    bail!("no residual sum found after the block")
}

fn apply(proto: &mut pb::ModelProto, index: &GraphIndex, edits: Edits) -> TractResult<()> {
    let graph = proto.graph.as_mut().expect("graph");
    for (name, (dims, values)) in &edits.consts {
        let loc = *index.consts.get(name).context("constant")?;
        let t = tensors::const_proto_mut(graph, loc).context("constant")?;
        tensors::write_f32(t, dims, values)?;
        let _ = matches!(loc, ConstLoc::Initializer(_));
    }
    // Shape constants: copy on write, one new initializer per (node, slot).
    let mut grouped: BTreeMap<(usize, usize), Vec<(usize, i64)>> = BTreeMap::new();
    for e in &edits.shape {
        grouped
            .entry((e.node, e.slot))
            .or_default()
            .push((e.index, e.value));
    }
    let mut counter = 0;
    for ((node, slot), changes) in grouped {
        let name = graph.node[node].input[slot].clone();
        let src = {
            let loc = *index.consts.get(&name).context("shape constant")?;
            match loc {
                ConstLoc::Initializer(i) => graph.initializer[i].clone(),
                ConstLoc::ConstantNode(n) => graph.node[n]
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.clone())
                    .context("constant value")?,
            }
        };
        let mut values = tensors::read_i64(&src)?;
        for (i, v) in changes {
            values[i] = v;
        }
        let new_name = loop {
            counter += 1;
            let candidate = format!("{name}.ziplm{counter}");
            if !index.consts.contains_key(&candidate) && !index.producer.contains_key(&candidate) {
                break candidate;
            }
        };
        graph
            .initializer
            .push(tensors::i64_like(&src, &new_name, &values));
        graph.node[node].input[slot] = new_name;
    }
    for (node, slot, mut tensor) in edits.rewires {
        let base = graph.node[node].input[slot].clone();
        let new_name = loop {
            counter += 1;
            let candidate = format!("{base}.ziplm{counter}");
            if !index.consts.contains_key(&candidate) && !index.producer.contains_key(&candidate) {
                break candidate;
            }
        };
        tensor.name = new_name.clone();
        graph.initializer.push(tensor);
        graph.node[node].input[slot] = new_name;
    }
    for (name, dims) in &edits.io_dims {
        for vi in graph
            .input
            .iter_mut()
            .chain(graph.output.iter_mut())
            .filter(|v| &v.name == name)
        {
            if let Some(pb::type_proto::Value::TensorType(tt)) =
                vi.r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                if let Some(shape) = tt.shape.as_mut() {
                    for &(axis, size) in dims {
                        if let Some(d) = shape.dim.get_mut(axis) {
                            if matches!(
                                d.value,
                                Some(pb::tensor_shape_proto::dimension::Value::DimValue(_))
                            ) {
                                d.value = Some(pb::tensor_shape_proto::dimension::Value::DimValue(
                                    size as i64,
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    for (node, slot, replacement) in edits.bypass {
        let n = &mut graph.node[node];
        match replacement {
            Some(bias) => n.input[slot] = bias,
            None => {
                let keep = n.input[1 - slot].clone();
                n.op_type = "Identity".into();
                n.input = vec![keep];
                n.attribute.clear();
            }
        }
    }
    Ok(())
}

/// Removes nodes whose outputs nothing reads (up to the graph outputs) and unused
/// initializers.
fn prune_dead(graph: &mut pb::GraphProto) {
    let mut live: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let mut i = 0;
    graph.node.retain(|_| {
        let k = keep[i];
        i += 1;
        k
    });
    graph.initializer.retain(|t| live.contains(&t.name));
}

#[allow(unused)]
fn _unused(_: &AdapterError, _: AdapterResult<()>) {}

/// The dense model with the plan's removed heads / neurons masked to zero in the
/// out-projections (no OBS update, no shape change): the reference a pruned model
/// without compensation must reproduce. Removed blocks are masked whole; in pre-LN
/// models their out-projection bias is zeroed too, as the bypass drops it.
pub fn emit_masked(model: &impl OnnxSource, plan: &Plan) -> AdapterResult<Vec<u8>> {
    masked_inner(model, plan)
        .map_err(|e| super::emit_error("writing the masked reference model", e))
}

fn masked_inner(model: &impl OnnxSource, plan: &Plan) -> TractResult<Vec<u8>> {
    let mut proto = model.source_file().proto.clone();
    let graph = model.source_file().graph();
    let index = GraphIndex::new(graph);
    let mut mats = Matrices::default();
    let mut edits = Edits::default();
    for (bp, (block, rec)) in plan.blocks.iter().zip(
        model
            .source_structure()
            .blocks
            .iter()
            .zip(model.source_blocks()),
    ) {
        if bp.choice() == BlockChoice::Dense {
            continue;
        }
        let located = locate::locate(graph, &index, &mut mats, rec)?;
        let o = match &located {
            OnnxBlock::Attention { o, .. } => o,
            OnnxBlock::Ffn { down, .. } => down,
        };
        let kept_rows = match block.kind {
            BlockKind::Attention(a) => expand_heads(&bp.kept, a.head_dim),
            BlockKind::Ffn(_) => bp.kept.clone(),
        };
        let t = index.const_proto(graph, &o.weight).context("out weight")?;
        let dims = tensors::dims(t);
        let mut v = tensors::read_f32(t)?;
        let n_in = block.kind.out_proj_inputs();
        let keep: HashSet<usize> = kept_rows.into_iter().collect();
        for i in (0..n_in).filter(|i| !keep.contains(i)) {
            for j in 0..o.width {
                let at = if o.transposed {
                    j * n_in + i
                } else {
                    i * o.width + j
                };
                v[at] = 0.0;
            }
        }
        edits.set_const(&o.weight, dims, v)?;
        if bp.choice() == BlockChoice::Removed {
            let mut probe = Edits::default();
            bypass(graph, &index, o, &mut probe)?;
            let (_, _, kept_bias) = &probe.bypass[0];
            if kept_bias.is_none() {
                // Pre-LN: the bypass drops the bias; zero every bias on the way.
                for (node, slot, bias) in chain_biases(graph, &index, o) {
                    let b = index.const_proto(graph, &bias).context("bias")?;
                    let d = tensors::dims(b);
                    let n = d.iter().product::<usize>();
                    let mut zero = b.clone();
                    tensors::write_f32(&mut zero, &d, &vec![0.0; n])?;
                    edits.rewires.push((node, slot, zero));
                }
            }
        }
    }
    apply(&mut proto, &index, edits)?;
    use prost::Message;
    Ok(proto.encode_to_vec())
}

/// Constant biases between an out-projection and its residual sum (Gemm's C input
/// and constant `Add`s), as (reading node, slot, constant).
fn chain_biases(
    graph: &pb::GraphProto,
    index: &GraphIndex,
    out: &OnnxProj,
) -> Vec<(usize, usize, String)> {
    let mut found: Vec<(usize, usize, String)> =
        out.bias.iter().map(|b| (out.node, 2, b.clone())).collect();
    let mut t = graph.node[out.node].output[0].clone();
    for _ in 0..6 {
        let Some([(n, slot)]) = index.consumers.get(&t).map(|c| c.as_slice()) else {
            break;
        };
        let node = &graph.node[*n];
        let other_slot = 1 - (*slot).min(1);
        let other = node.input.get(other_slot).cloned().unwrap_or_default();
        match node.op_type.as_str() {
            "Add" => match index.resolve_const(graph, &other) {
                Some(c) => {
                    found.push((*n, other_slot, c));
                    t = node.output[0].clone();
                }
                None => break,
            },
            "Reshape" | "Identity" | "Cast" => t = node.output[0].clone(),
            _ => break,
        }
    }
    found
}

/// Per block: whether removing it keeps the out-projection bias (post-LN: the residual
/// sum feeds only a LayerNorm), as [`emit`] decides.
pub fn keeps_bias_when_removed(model: &impl OnnxSource) -> AdapterResult<Vec<bool>> {
    let graph = model.source_file().graph();
    let index = GraphIndex::new(graph);
    let mut mats = Matrices::default();
    let mut out = vec![];
    for rec in model.source_blocks() {
        let located = locate::locate(graph, &index, &mut mats, rec)
            .map_err(|e| super::emit_error("locating blocks", e))?;
        let o = match &located {
            OnnxBlock::Attention { o, .. } => o,
            OnnxBlock::Ffn { down, .. } => down,
        };
        let mut probe = Edits::default();
        bypass(graph, &index, o, &mut probe)
            .map_err(|e| super::emit_error("finding residual sums", e))?;
        out.push(probe.bypass[0].2.is_some());
    }
    Ok(out)
}
