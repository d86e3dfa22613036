//! The node-building helpers: a graph builder that names every node and initializer, the
//! attributes, and the typed value infos of the graph's inputs and outputs.

use tract_onnx::pb::{
    attribute_proto::AttributeType,
    tensor_proto::DataType,
    tensor_shape_proto::{dimension, Dimension},
    type_proto, AttributeProto, NodeProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

/// Accumulates nodes and initializers with unique names.
#[derive(Default)]
pub(super) struct GraphBuilder {
    pub(super) nodes: Vec<NodeProto>,
    pub(super) initializers: Vec<TensorProto>,
    pub(super) counter: usize,
    /// Products' weights as int8 blocks ([`super::ExportOptions::int8`]).
    pub(super) int8: bool,
}

impl GraphBuilder {
    /// Adds a node with one fresh output and returns the output's name.
    pub(super) fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.counter += 1;
        let out = format!("/{}_{}", op.to_lowercase(), self.counter);
        self.node_to(op, inputs, &out, attrs);
        out
    }

    pub(super) fn node_to(
        &mut self,
        op: &str,
        inputs: &[&str],
        output: &str,
        attrs: Vec<AttributeProto>,
    ) {
        self.node_outputs(op, inputs, &[output], attrs)
    }

    pub(super) fn node_outputs(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        });
    }

    pub(super) fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.initializers.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&x| x as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.to_string()
    }

    pub(super) fn init_i8(&mut self, name: &str, dims: &[usize], data: &[i8]) -> String {
        self.initializers.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&x| x as i64).collect(),
            data_type: DataType::Int8 as i32,
            raw_data: data.iter().map(|&x| x as u8).collect(),
            ..Default::default()
        });
        name.to_string()
    }

    pub(super) fn const_f32_scalar(&mut self, name: &str, value: f32) -> String {
        self.init_f32(&format!("/const/{name}"), &[], &[value])
    }

    pub(super) fn const_i64(&mut self, name: &str, values: &[i64], dims: &[usize]) -> String {
        let name = format!("/const/{name}");
        if !self.initializers.iter().any(|t| t.name == name) {
            self.initializers.push(TensorProto {
                name: name.clone(),
                dims: dims.iter().map(|&x| x as i64).collect(),
                data_type: DataType::Int64 as i32,
                raw_data: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ..Default::default()
            });
        }
        name
    }

    pub(super) fn const_i64_scalar(&mut self, value: i64) -> String {
        self.const_i64(&format!("scalar{value}"), &[value], &[])
    }
}

pub(super) fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

pub(super) fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

pub(super) fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

pub(super) enum Dim {
    Param(String),
    Value(i64),
}

pub(super) fn d(name: &str) -> Dim {
    Dim::Param(name.into())
}

pub(super) fn n(value: usize) -> Dim {
    Dim::Value(value as i64)
}

pub(super) fn value_info(name: &str, dtype: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|x| Dimension {
            value: Some(match x {
                Dim::Param(p) => dimension::Value::DimParam(p.clone()),
                Dim::Value(v) => dimension::Value::DimValue(*v),
            }),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
