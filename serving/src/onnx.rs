//! ONNX models from any framework (PyTorch, scikit-learn through skl2onnx, XGBoost through onnxmltools…),
//! run by tract. The signature is read from the file: each graph input and output with its element type
//! and shape, an unknown first dimension becoming the batch (`-1`). The graph is optimized once for a
//! symbolic batch size, so one loaded model runs batches of any size.
//!
//! Tensors of booleans, integers, FP16, FP32, FP64 and strings (the protocol's `BYTES`, which must hold UTF-8
//! for a string tensor: an element that does not is an error naming the tensor and the element). tract has no
//! BF16, so a graph with BF16 (or complex, or quantized) inputs or outputs is refused at load, the tensor named.

use std::path::Path;

use bytes::BytesMut;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::model::{Model, TensorSpec};
use crate::tensor::{DataType, Tensor as ServeTensor};

type Run = Box<dyn Fn(TVec<TValue>) -> TractResult<TVec<TValue>> + Send + Sync>;

/// A loaded ONNX graph.
pub struct OnnxModel {
    run: Run,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("OnnxModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

fn datatype_of(name: &str, datum: DatumType) -> Result<DataType, String> {
    Ok(match datum {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        DatumType::String => DataType::Bytes,
        other => {
            return Err(format!(
                "tensor '{name}' holds {other:?}; Kiln serves ONNX tensors of booleans, integers, FP16, FP32, FP64 \
                 and strings"
            ));
        }
    })
}

/// A `BYTES` tensor's elements as text: what a string input of a graph takes.
fn strings_of(tensor: &ServeTensor) -> Result<Vec<&str>, String> {
    tensor
        .byte_elements()
        .into_iter()
        .enumerate()
        .map(|(index, element)| {
            std::str::from_utf8(element).map_err(|_| {
                format!(
                    "input '{}': BYTES element {index} is not UTF-8 text; the model's input is a string tensor",
                    tensor.name
                )
            })
        })
        .collect()
}

/// Our little-endian bytes as a tract tensor of `datatype`.
fn to_tract(tensor: &ServeTensor) -> TractResult<Tensor> {
    macro_rules! decode {
        ($type:ty, $size:expr) => {{
            let values: Vec<$type> = tensor
                .data
                .chunks_exact($size)
                .map(|chunk| <$type>::from_le_bytes(chunk.try_into().expect("element bytes")))
                .collect();
            Tensor::from_shape(&tensor.shape, &values)
        }};
    }
    match tensor.datatype {
        DataType::Bool => {
            let values: Vec<bool> = tensor.data.iter().map(|byte| *byte != 0).collect();
            Tensor::from_shape(&tensor.shape, &values)
        }
        DataType::Uint8 => decode!(u8, 1),
        DataType::Uint16 => decode!(u16, 2),
        DataType::Uint32 => decode!(u32, 4),
        DataType::Uint64 => decode!(u64, 8),
        DataType::Int8 => decode!(i8, 1),
        DataType::Int16 => decode!(i16, 2),
        DataType::Int32 => decode!(i32, 4),
        DataType::Int64 => decode!(i64, 8),
        DataType::Fp16 => decode!(f16, 2),
        DataType::Fp32 => decode!(f32, 4),
        DataType::Fp64 => decode!(f64, 8),
        DataType::Bytes => {
            let values: Vec<String> = strings_of(tensor)
                .map_err(TractError::msg)?
                .into_iter()
                .map(str::to_string)
                .collect();
            Ok(tract_ndarray::ArrayD::from_shape_vec(tract_ndarray::IxDyn(&tensor.shape), values)?.into_tensor())
        }
        DataType::Bf16 => unreachable!("refused when the model loaded"),
    }
}

/// A tract output as our tensor named `name`, its elements in row-major order.
fn from_tract(name: &str, datatype: DataType, value: &Tensor) -> Result<ServeTensor, String> {
    let mut data = BytesMut::with_capacity(value.len() * datatype.element_bytes().unwrap_or(1));
    macro_rules! encode {
        ($type:ty) => {{
            let view = value
                .to_plain_array_view::<$type>()
                .map_err(|error| error.to_string())?;
            for element in view.iter() {
                data.extend_from_slice(&element.to_le_bytes());
            }
        }};
    }
    match datatype {
        DataType::Bool => {
            let view = value.to_plain_array_view::<bool>().map_err(|error| error.to_string())?;
            data.extend(view.iter().map(|element| u8::from(*element)));
        }
        DataType::Uint8 => encode!(u8),
        DataType::Uint16 => encode!(u16),
        DataType::Uint32 => encode!(u32),
        DataType::Uint64 => encode!(u64),
        DataType::Int8 => encode!(i8),
        DataType::Int16 => encode!(i16),
        DataType::Int32 => encode!(i32),
        DataType::Int64 => encode!(i64),
        DataType::Fp16 => encode!(f16),
        DataType::Fp32 => encode!(f32),
        DataType::Fp64 => encode!(f64),
        DataType::Bytes => {
            let view = value
                .to_plain_array_view::<String>()
                .map_err(|error| error.to_string())?;
            for element in view.iter() {
                let length = u32::try_from(element.len())
                    .map_err(|_| format!("output '{name}': a string of {} bytes is too long", element.len()))?;
                data.extend_from_slice(&length.to_le_bytes());
                data.extend_from_slice(element.as_bytes());
            }
        }
        DataType::Bf16 => unreachable!("refused when the model loaded"),
    }
    ServeTensor::new(name.to_string(), datatype, value.shape().to_vec(), data.freeze())
        .map_err(|error| error.to_string())
}

impl OnnxModel {
    /// Loads and optimizes the graph at `path`, with its first unknown input dimensions as the batch.
    pub fn load(path: &Path) -> Result<OnnxModel, String> {
        let failed = |error: TractError| format!("ONNX model {}: {error:#}", path.display());
        let mut model = tract_onnx::onnx().model_for_path(path).map_err(failed)?;
        let batch = model.sym("N");
        let mut inputs = Vec::new();
        for index in 0..model.inputs.len() {
            let name = model.node(model.inputs[index].node).name.clone();
            let fact = model.input_fact(index).map_err(failed)?.clone();
            let datum = fact
                .datum_type
                .concretize()
                .ok_or_else(|| format!("ONNX input '{name}' declares no element type"))?;
            let datatype = datatype_of(&name, datum)?;
            let dims: Vec<Option<i64>> = fact
                .shape
                .dims()
                .map(|dim| dim.concretize().and_then(|dim| dim.to_i64().ok()))
                .collect();
            if dims.iter().skip(1).any(Option::is_none) {
                return Err(format!(
                    "ONNX input '{name}' has an unknown dimension after the first; Kiln batches along the first and needs the others fixed"
                ));
            }
            let shape: TVec<TDim> = dims
                .iter()
                .map(|dim| dim.map_or_else(|| batch.to_dim(), TDim::from))
                .collect();
            model
                .set_input_fact(index, InferenceFact::dt_shape(datum, shape))
                .map_err(failed)?;
            inputs.push(TensorSpec::new(
                name,
                datatype,
                dims.iter().map(|dim| dim.unwrap_or(-1)).collect(),
            ));
        }
        let optimized = model.into_optimized().map_err(failed)?;
        let mut outputs = Vec::new();
        for (index, outlet) in optimized.outputs.iter().enumerate() {
            let name = optimized
                .outlet_label(*outlet)
                .map(str::to_string)
                .unwrap_or_else(|| optimized.node(outlet.node).name.clone());
            let fact = optimized.output_fact(index).map_err(failed)?;
            let datatype = datatype_of(&name, fact.datum_type)?;
            let shape = fact.shape.iter().map(|dim| dim.to_i64().unwrap_or(-1)).collect();
            outputs.push(TensorSpec::new(name, datatype, shape));
        }
        let plan = optimized.into_runnable().map_err(failed)?;
        Ok(OnnxModel {
            run: Box::new(move |values| plan.run(values)),
            inputs,
            outputs,
        })
    }
}

impl Model for OnnxModel {
    fn platform(&self) -> &str {
        "onnx_tract"
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn check_input(&self, input: &ServeTensor) -> Result<(), String> {
        if input.datatype == DataType::Bytes {
            strings_of(input)?;
        }
        Ok(())
    }

    fn infer(&self, inputs: &[ServeTensor]) -> Result<Vec<ServeTensor>, String> {
        let values = inputs
            .iter()
            .map(|input| to_tract(input).map(TValue::from))
            .collect::<TractResult<TVec<TValue>>>()
            .map_err(|error| error.to_string())?;
        let results = (self.run)(values).map_err(|error| format!("{error:#}"))?;
        results
            .iter()
            .zip(&self.outputs)
            .map(|(value, spec)| from_tract(&spec.name, spec.datatype, value))
            .collect()
    }
}
