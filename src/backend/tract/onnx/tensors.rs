//! Reading and writing ONNX tensors (initializers and `Constant` node values).

use std::collections::HashMap;
use tract_onnx::pb::{self, tensor_proto::DataType};
use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::{bail, TractErrorContext};

/// Where a constant tensor lives in the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstLoc {
    /// `graph.initializer[i]`.
    Initializer(usize),
    /// The `value` attribute of `graph.node[i]` (a `Constant` node).
    ConstantNode(usize),
}

/// Name -> producer / consumers / constants of a graph.
pub struct GraphIndex {
    /// Tensor name -> (node, output slot).
    pub producer: HashMap<String, (usize, usize)>,
    /// Tensor name -> (node, input slot) of every consumer.
    pub consumers: HashMap<String, Vec<(usize, usize)>>,
    /// Tensor name -> constant location.
    pub consts: HashMap<String, ConstLoc>,
    /// Graph input names.
    pub inputs: Vec<String>,
    /// Graph output names.
    pub outputs: Vec<String>,
}

impl GraphIndex {
    /// Indexes `graph`.
    pub fn new(graph: &pb::GraphProto) -> GraphIndex {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        let mut consts = HashMap::new();
        for (i, init) in graph.initializer.iter().enumerate() {
            consts.insert(init.name.clone(), ConstLoc::Initializer(i));
        }
        for (n, node) in graph.node.iter().enumerate() {
            for (slot, out) in node.output.iter().enumerate() {
                if !out.is_empty() {
                    producer.insert(out.clone(), (n, slot));
                }
            }
            for (slot, inp) in node.input.iter().enumerate() {
                if !inp.is_empty() {
                    consumers.entry(inp.clone()).or_default().push((n, slot));
                }
            }
            if node.op_type == "Constant"
                && node
                    .attribute
                    .iter()
                    .any(|a| a.name == "value" && a.t.is_some())
            {
                consts.insert(node.output[0].clone(), ConstLoc::ConstantNode(n));
            }
        }
        let init_names: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|i| i.name.as_str()).collect();
        GraphIndex {
            producer,
            consumers,
            consts,
            inputs: graph
                .input
                .iter()
                .map(|i| i.name.clone())
                .filter(|n| !init_names.contains(n.as_str()))
                .collect(),
            outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
        }
    }

    /// The tensor proto of a constant.
    pub fn const_proto<'g>(
        &self,
        graph: &'g pb::GraphProto,
        name: &str,
    ) -> Option<&'g pb::TensorProto> {
        match self.consts.get(name)? {
            ConstLoc::Initializer(i) => graph.initializer.get(*i),
            ConstLoc::ConstantNode(n) => graph.node[*n]
                .attribute
                .iter()
                .find(|a| a.name == "value")?
                .t
                .as_ref(),
        }
    }

    /// The constant behind `name`, following `Identity` nodes (exporters share equal
    /// constants, e.g. zero biases, through them).
    pub fn resolve_const(&self, graph: &pb::GraphProto, name: &str) -> Option<String> {
        let mut t = name.to_string();
        for _ in 0..8 {
            if self.consts.contains_key(&t) {
                return Some(t);
            }
            let &(n, _) = self.producer.get(&t)?;
            if graph.node[n].op_type != "Identity" {
                return None;
            }
            t = graph.node[n].input[0].clone();
        }
        None
    }

    /// The producing node's op type, if any.
    pub fn producer_op<'g>(&self, graph: &'g pb::GraphProto, name: &str) -> Option<&'g str> {
        self.producer
            .get(name)
            .map(|&(n, _)| graph.node[n].op_type.as_str())
    }
}

/// A mutable handle to a constant tensor.
pub fn const_proto_mut(graph: &mut pb::GraphProto, loc: ConstLoc) -> Option<&mut pb::TensorProto> {
    match loc {
        ConstLoc::Initializer(i) => graph.initializer.get_mut(i),
        ConstLoc::ConstantNode(n) => graph.node[n]
            .attribute
            .iter_mut()
            .find(|a| a.name == "value")?
            .t
            .as_mut(),
    }
}

/// Dimensions as `usize`.
pub fn dims(t: &pb::TensorProto) -> Vec<usize> {
    t.dims.iter().map(|&d| d.max(0) as usize).collect()
}

fn check_inline(t: &pb::TensorProto) -> TractResult<()> {
    if !t.external_data.is_empty() {
        bail!(
            "tensor `{}` is stored in an external data file; ziplm rewrites single-file ONNX models \
             (re-export without external data, or merge it with onnx.save_model(..., save_as_external_data=False))",
            t.name
        );
    }
    Ok(())
}

/// The values of a float tensor (f32 or f16) as f32.
pub fn read_f32(t: &pb::TensorProto) -> TractResult<Vec<f32>> {
    check_inline(t)?;
    let n: usize = dims(t).iter().product();
    let dt = t.data_type;
    let v: Vec<f32> = if dt == DataType::Float as i32 {
        if !t.raw_data.is_empty() {
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            t.float_data.clone()
        }
    } else if dt == DataType::Float16 as i32 {
        if !t.raw_data.is_empty() {
            t.raw_data
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect()
        } else {
            t.int32_data
                .iter()
                .map(|&b| f16::from_bits(b as u16).to_f32())
                .collect()
        }
    } else {
        bail!(
            "tensor `{}` has data type {dt}, expected float32 or float16",
            t.name
        );
    };
    if v.len() != n {
        bail!(
            "tensor `{}` holds {} values for dims {:?}",
            t.name,
            v.len(),
            t.dims
        );
    }
    Ok(v)
}

/// True when the tensor is a float tensor ziplm can read.
pub fn is_float(t: &pb::TensorProto) -> bool {
    t.data_type == DataType::Float as i32 || t.data_type == DataType::Float16 as i32
}

/// Replaces the content of a float tensor, keeping its data type (f32 or f16).
pub fn write_f32(t: &mut pb::TensorProto, dims: &[usize], values: &[f32]) -> TractResult<()> {
    check_inline(t)?;
    assert_eq!(dims.iter().product::<usize>(), values.len());
    t.dims = dims.iter().map(|&d| d as i64).collect();
    t.float_data.clear();
    t.int32_data.clear();
    t.raw_data = if t.data_type == DataType::Float16 as i32 {
        values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect()
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    Ok(())
}

/// The values of an integer tensor (int64 or int32) as i64.
pub fn read_i64(t: &pb::TensorProto) -> TractResult<Vec<i64>> {
    check_inline(t)?;
    let dt = t.data_type;
    if dt == DataType::Int64 as i32 {
        Ok(if !t.raw_data.is_empty() {
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        } else {
            t.int64_data.clone()
        })
    } else if dt == DataType::Int32 as i32 {
        Ok(if !t.raw_data.is_empty() {
            t.raw_data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect()
        } else {
            t.int32_data.iter().map(|&v| v as i64).collect()
        })
    } else {
        bail!(
            "tensor `{}` has data type {dt}, expected an integer type",
            t.name
        )
    }
}

/// A new int64 tensor with the same dims and type as `like` and values `values`.
pub fn i64_like(like: &pb::TensorProto, name: &str, values: &[i64]) -> pb::TensorProto {
    let mut t = pb::TensorProto {
        name: name.to_string(),
        dims: like.dims.clone(),
        data_type: like.data_type,
        ..Default::default()
    };
    if like.data_type == DataType::Int32 as i32 {
        t.raw_data = values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect();
    } else {
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    t
}

/// Keeps `kept` indices along `axis` of a row-major array of shape `dims`.
pub fn slice_axis(
    values: &[f32],
    dims: &[usize],
    axis: usize,
    kept: &[usize],
) -> (Vec<usize>, Vec<f32>) {
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let n = dims[axis];
    let mut out = Vec::with_capacity(outer * kept.len() * inner);
    for o in 0..outer {
        for &k in kept {
            let start = (o * n + k) * inner;
            out.extend_from_slice(&values[start..start + inner]);
        }
    }
    let mut new_dims = dims.to_vec();
    new_dims[axis] = kept.len();
    (new_dims, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_middle_axis() {
        // dims [2, 3, 2]
        let v: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let (d, s) = slice_axis(&v, &[2, 3, 2], 1, &[0, 2]);
        assert_eq!(d, vec![2, 2, 2]);
        assert_eq!(s, vec![0., 1., 4., 5., 6., 7., 10., 11.]);
    }

    #[test]
    fn f32_round_trip_and_f16() {
        let mut t = pb::TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            ..Default::default()
        };
        write_f32(&mut t, &[2, 2], &[1.0, 2.0, 3.0, 4.5]).unwrap();
        assert_eq!(read_f32(&t).unwrap(), vec![1.0, 2.0, 3.0, 4.5]);
        t.data_type = DataType::Float16 as i32;
        write_f32(&mut t, &[1, 2], &[0.5, -2.0]).unwrap();
        assert_eq!(read_f32(&t).unwrap(), vec![0.5, -2.0]);
    }
}
