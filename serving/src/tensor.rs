//! Tensors as the Open Inference Protocol carries them: a name, a datatype, a shape, and the elements in
//! row-major order as little-endian bytes, which is exactly the protocol's binary form (the REST binary
//! extension and gRPC's raw contents), so those arrive and leave without conversion. JSON `data` and gRPC's
//! typed `contents` are converted at the edge, with an error naming the tensor and the element at fault.
//!
//! `BYTES` elements are each a 4-byte little-endian length followed by that many bytes, as in the
//! protocol's binary form.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::ServeError;

/// The protocol's tensor datatypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    Bytes,
}

const NAMES: [(DataType, &str); 14] = [
    (DataType::Bool, "BOOL"),
    (DataType::Uint8, "UINT8"),
    (DataType::Uint16, "UINT16"),
    (DataType::Uint32, "UINT32"),
    (DataType::Uint64, "UINT64"),
    (DataType::Int8, "INT8"),
    (DataType::Int16, "INT16"),
    (DataType::Int32, "INT32"),
    (DataType::Int64, "INT64"),
    (DataType::Fp16, "FP16"),
    (DataType::Bf16, "BF16"),
    (DataType::Fp32, "FP32"),
    (DataType::Fp64, "FP64"),
    (DataType::Bytes, "BYTES"),
];

impl DataType {
    /// Parses a protocol name (`FP32`, `INT64`, …), naming the known ones when it is not one.
    pub fn parse(name: &str) -> Result<DataType, ServeError> {
        NAMES
            .iter()
            .find(|(_, known)| *known == name)
            .map(|(datatype, _)| *datatype)
            .ok_or_else(|| {
                let known: Vec<&str> = NAMES.iter().map(|(_, known)| *known).collect();
                ServeError::invalid(format!("datatype '{name}' is not one of {}", known.join(", ")))
            })
    }

    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(datatype, _)| *datatype == self)
            .expect("every datatype has a name")
            .1
    }

    /// Bytes per element; `None` for `BYTES`, whose elements carry their own length.
    pub fn element_bytes(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A tensor whose bytes match its shape and datatype (checked by [`Tensor::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    /// The elements, row-major, little-endian (see the module's note for `BYTES`).
    pub data: Bytes,
}

/// `[1, 64]` as people write shapes.
pub fn shape_text<T: std::fmt::Display>(shape: &[T]) -> String {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// An input's declared datatype and shape as the protocol gives them (a name, and sizes as signed
/// integers), checked, with errors naming the input.
pub fn parse_declared(name: &str, datatype: &str, shape: &[i64]) -> Result<(DataType, Vec<usize>), ServeError> {
    let datatype =
        DataType::parse(datatype).map_err(|error| ServeError::invalid(format!("input '{name}': {error}")))?;
    let shape = shape
        .iter()
        .map(|dim| usize::try_from(*dim))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            ServeError::invalid(format!(
                "input '{name}' has shape {shape:?}; expected sizes of 0 or more"
            ))
        })?;
    Ok((datatype, shape))
}

/// The offsets at which each `BYTES` element of `data` starts, and the end; an error if the
/// length prefixes do not tile `data` into exactly `count` elements.
fn bytes_offsets(name: &str, data: &[u8], count: usize) -> Result<Vec<usize>, ServeError> {
    let mut offsets = Vec::with_capacity(count + 1);
    let mut at = 0usize;
    while at < data.len() {
        offsets.push(at);
        let Some(prefix) = data.get(at..at + 4) else {
            return Err(ServeError::invalid(format!(
                "tensor '{name}': BYTES element {} has a cut-off length prefix",
                offsets.len() - 1
            )));
        };
        let length = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
        at += 4 + length;
    }
    if at != data.len() || offsets.len() != count {
        return Err(ServeError::invalid(format!(
            "tensor '{name}': {} bytes hold {} BYTES elements{}; its shape needs {count}",
            data.len(),
            offsets.len(),
            if at != data.len() { " and a cut-off one" } else { "" }
        )));
    }
    offsets.push(at);
    Ok(offsets)
}

impl Tensor {
    /// A tensor, if `data` holds exactly the elements `shape` needs.
    pub fn new(name: String, datatype: DataType, shape: Vec<usize>, data: Bytes) -> Result<Tensor, ServeError> {
        let count: usize = shape.iter().product();
        match datatype.element_bytes() {
            Some(size) if count * size != data.len() => {
                return Err(ServeError::invalid(format!(
                    "tensor '{name}' of shape {} and datatype {datatype} needs {} bytes; {} were given",
                    shape_text(&shape),
                    count * size,
                    data.len()
                )));
            }
            Some(_) => {}
            None => {
                bytes_offsets(&name, &data, count)?;
            }
        }
        Ok(Tensor {
            name,
            datatype,
            shape,
            data,
        })
    }

    /// An FP32 tensor from values.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Tensor {
        let mut data = BytesMut::with_capacity(values.len() * 4);
        for value in values {
            data.extend_from_slice(&value.to_le_bytes());
        }
        Tensor::new(name.into(), DataType::Fp32, shape, data.freeze()).expect("values match the shape")
    }

    /// An INT64 tensor from values.
    pub fn from_i64(name: impl Into<String>, shape: Vec<usize>, values: &[i64]) -> Tensor {
        let mut data = BytesMut::with_capacity(values.len() * 8);
        for value in values {
            data.extend_from_slice(&value.to_le_bytes());
        }
        Tensor::new(name.into(), DataType::Int64, shape, data.freeze()).expect("values match the shape")
    }

    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// A `BYTES` tensor's elements, in order (the layout was checked when the tensor was made).
    pub fn byte_elements(&self) -> Vec<&[u8]> {
        let offsets = bytes_offsets(&self.name, &self.data, self.element_count()).expect("checked at creation");
        offsets
            .windows(2)
            .map(|pair| &self.data[pair[0] + 4..pair[1]])
            .collect()
    }

    /// The first dimension: the batch.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// The elements of an FP32 tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>, ServeError> {
        if self.datatype != DataType::Fp32 {
            return Err(ServeError::invalid(format!(
                "tensor '{}' is {}; expected FP32",
                self.name, self.datatype
            )));
        }
        Ok(self
            .data
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes(chunk.try_into().expect("4 bytes")))
            .collect())
    }

    /// `parts` (same name, datatype and trailing dimensions) stacked along the first dimension.
    pub fn concat(parts: &[&Tensor]) -> Tensor {
        let first = parts[0];
        if parts.len() == 1 {
            return first.clone();
        }
        let mut data = BytesMut::with_capacity(parts.iter().map(|part| part.data.len()).sum());
        let mut shape = first.shape.clone();
        shape[0] = 0;
        for part in parts {
            assert_eq!(
                part.shape[1..],
                first.shape[1..],
                "batched tensors share their trailing dimensions"
            );
            assert_eq!(part.datatype, first.datatype, "batched tensors share their datatype");
            shape[0] += part.shape[0];
            data.extend_from_slice(&part.data);
        }
        Tensor {
            name: first.name.clone(),
            datatype: first.datatype,
            shape,
            data: data.freeze(),
        }
    }

    /// Splits along the first dimension into consecutive pieces of `rows[i]` rows (which sum to the
    /// first dimension). Fixed-size pieces share this tensor's buffer.
    pub fn split_rows(&self, rows: &[usize]) -> Result<Vec<Tensor>, String> {
        let total: usize = rows.iter().sum();
        if self.shape.first() != Some(&total) {
            return Err(format!(
                "its output '{}' has shape {}; expected {total} rows, one per input row",
                self.name,
                shape_text(&self.shape)
            ));
        }
        let per_row: usize = self.shape[1..].iter().product();
        let offsets = match self.datatype.element_bytes() {
            Some(size) => (0..=self.element_count()).map(|index| index * size).collect(),
            None => bytes_offsets(&self.name, &self.data, self.element_count()).map_err(|error| error.to_string())?,
        };
        let mut pieces = Vec::with_capacity(rows.len());
        let mut row = 0;
        for &count in rows {
            let (start, end) = (offsets[row * per_row], offsets[(row + count) * per_row]);
            let mut shape = self.shape.clone();
            shape[0] = count;
            pieces.push(Tensor {
                name: self.name.clone(),
                datatype: self.datatype,
                shape,
                data: self.data.slice(start..end),
            });
            row += count;
        }
        Ok(pieces)
    }

    /// The elements as a flat JSON array, as the protocol's JSON `data` carries them.
    pub fn json_data(&self) -> Value {
        fn read<const N: usize, T: Into<Value>>(data: &[u8], convert: impl Fn([u8; N]) -> T) -> Value {
            Value::Array(
                data.chunks_exact(N)
                    .map(|chunk| convert(chunk.try_into().expect("element bytes")).into())
                    .collect(),
            )
        }
        let data = &self.data[..];
        match self.datatype {
            DataType::Bool => Value::Array(data.iter().map(|byte| Value::Bool(*byte != 0)).collect()),
            DataType::Uint8 => read(data, u8::from_le_bytes),
            DataType::Uint16 => read(data, u16::from_le_bytes),
            DataType::Uint32 => read(data, u32::from_le_bytes),
            DataType::Uint64 => read(data, u64::from_le_bytes),
            DataType::Int8 => read(data, i8::from_le_bytes),
            DataType::Int16 => read(data, i16::from_le_bytes),
            DataType::Int32 => read(data, i32::from_le_bytes),
            DataType::Int64 => read(data, i64::from_le_bytes),
            DataType::Fp16 => read(data, |bytes| half::f16::from_le_bytes(bytes).to_f64()),
            DataType::Bf16 => read(data, |bytes| half::bf16::from_le_bytes(bytes).to_f64()),
            DataType::Fp32 => read(data, |bytes| f64::from(f32::from_le_bytes(bytes))),
            DataType::Fp64 => read(data, f64::from_le_bytes),
            DataType::Bytes => Value::Array(
                self.byte_elements()
                    .into_iter()
                    .map(|element| Value::String(String::from_utf8_lossy(element).into_owned()))
                    .collect(),
            ),
        }
    }
}

/// Appends `value`'s elements (nested arrays flattened row-major) to `out` as `datatype`, naming the
/// tensor and the element when one does not fit.
pub fn encode_json(name: &str, datatype: DataType, value: &Value, out: &mut BytesMut) -> Result<(), ServeError> {
    fn walk(
        name: &str,
        datatype: DataType,
        value: &Value,
        index: &mut usize,
        out: &mut BytesMut,
    ) -> Result<(), ServeError> {
        if let Value::Array(items) = value {
            for item in items {
                walk(name, datatype, item, index, out)?;
            }
            return Ok(());
        }
        let wrong = |expected: &str| {
            ServeError::invalid(format!(
                "input '{name}': element {index} is {value}; expected {expected} for datatype {datatype}"
            ))
        };
        macro_rules! integer {
            ($type:ty) => {{
                let number = value
                    .as_i64()
                    .and_then(|number| <$type>::try_from(number).ok())
                    .or_else(|| value.as_u64().and_then(|number| <$type>::try_from(number).ok()))
                    .ok_or_else(|| wrong(&format!("an integer from {} to {}", <$type>::MIN, <$type>::MAX)))?;
                out.extend_from_slice(&number.to_le_bytes());
            }};
        }
        let float = || value.as_f64().ok_or_else(|| wrong("a number"));
        match datatype {
            DataType::Bool => {
                out.extend_from_slice(&[u8::from(value.as_bool().ok_or_else(|| wrong("true or false"))?)])
            }
            DataType::Uint8 => integer!(u8),
            DataType::Uint16 => integer!(u16),
            DataType::Uint32 => integer!(u32),
            DataType::Uint64 => integer!(u64),
            DataType::Int8 => integer!(i8),
            DataType::Int16 => integer!(i16),
            DataType::Int32 => integer!(i32),
            DataType::Int64 => integer!(i64),
            DataType::Fp16 => out.extend_from_slice(&half::f16::from_f64(float()?).to_le_bytes()),
            DataType::Bf16 => out.extend_from_slice(&half::bf16::from_f64(float()?).to_le_bytes()),
            DataType::Fp32 => out.extend_from_slice(&(float()? as f32).to_le_bytes()),
            DataType::Fp64 => out.extend_from_slice(&float()?.to_le_bytes()),
            DataType::Bytes => {
                let text = value.as_str().ok_or_else(|| wrong("a string"))?;
                out.extend_from_slice(&(text.len() as u32).to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        }
        *index += 1;
        Ok(())
    }
    walk(name, datatype, value, &mut 0, out)
}

/// gRPC's typed contents as bytes: the field of `datatype` (the protocol shares `int_contents` among
/// INT8/16/32 and `uint_contents` among UINT8/16/32), each value range-checked.
pub fn encode_contents(
    name: &str,
    datatype: DataType,
    contents: &kiln_proto::inference::InferTensorContents,
) -> Result<Bytes, ServeError> {
    let mut out = BytesMut::new();
    let out_of_range = |index: usize, value: &dyn std::fmt::Display| {
        ServeError::invalid(format!(
            "input '{name}': element {index} is {value}, out of range for {datatype}"
        ))
    };
    macro_rules! narrow {
        ($values:expr, $type:ty) => {
            for (index, value) in $values.iter().enumerate() {
                let narrowed = <$type>::try_from(*value).map_err(|_| out_of_range(index, value))?;
                out.extend_from_slice(&narrowed.to_le_bytes());
            }
        };
    }
    match datatype {
        DataType::Bool => out.extend(contents.bool_contents.iter().map(|value| u8::from(*value))),
        DataType::Uint8 => narrow!(contents.uint_contents, u8),
        DataType::Uint16 => narrow!(contents.uint_contents, u16),
        DataType::Uint32 => narrow!(contents.uint_contents, u32),
        DataType::Uint64 => narrow!(contents.uint64_contents, u64),
        DataType::Int8 => narrow!(contents.int_contents, i8),
        DataType::Int16 => narrow!(contents.int_contents, i16),
        DataType::Int32 => narrow!(contents.int_contents, i32),
        DataType::Int64 => narrow!(contents.int64_contents, i64),
        DataType::Fp32 => narrow!(contents.fp32_contents, f32),
        DataType::Fp64 => narrow!(contents.fp64_contents, f64),
        DataType::Fp16 | DataType::Bf16 => {
            return Err(ServeError::invalid(format!(
                "input '{name}' is {datatype}, which has no typed contents field; send it in raw_input_contents"
            )));
        }
        DataType::Bytes => {
            for value in &contents.bytes_contents {
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(value);
            }
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from_json(name: &str, datatype: DataType, shape: Vec<usize>, data: Value) -> Result<Tensor, ServeError> {
        let mut out = BytesMut::new();
        encode_json(name, datatype, &data, &mut out)?;
        Tensor::new(name.into(), datatype, shape, out.freeze())
    }

    #[test]
    fn json_data_round_trips_for_every_datatype_nested_or_flat() {
        let cases = [
            (DataType::Bool, json!([[true, false], [false, true]])),
            (DataType::Uint8, json!([0, 255, 7, 9])),
            (DataType::Uint16, json!([0, 65535, 7, 9])),
            (DataType::Uint32, json!([0, 4294967295u64, 7, 9])),
            (DataType::Uint64, json!([0, u64::MAX, 7, 9])),
            (DataType::Int8, json!([[-128, 127], [0, -1]])),
            (DataType::Int16, json!([-32768, 32767, 0, -1])),
            (DataType::Int32, json!([-2147483648i64, 2147483647, 0, -1])),
            (DataType::Int64, json!([i64::MIN, i64::MAX, 0, -1])),
            (DataType::Fp16, json!([0.5, -2.0, 1024.0, 0.25])),
            (DataType::Bf16, json!([0.5, -2.0, 1024.0, 0.25])),
            (DataType::Fp32, json!([[0.5, -2.5], [1e10, 0.125]])),
            (DataType::Fp64, json!([0.1, -2.5, 1e300, 0.125])),
            (DataType::Bytes, json!(["a", "", "héllo", "xyz"])),
        ];
        for (datatype, data) in cases {
            let tensor = from_json("x", datatype, vec![2, 2], data.clone()).unwrap();
            let flat: Vec<Value> = match &data {
                Value::Array(items) => items
                    .iter()
                    .flat_map(|item| match item {
                        Value::Array(inner) => inner.clone(),
                        other => vec![other.clone()],
                    })
                    .collect(),
                _ => unreachable!(),
            };
            let back = tensor.json_data();
            for (given, returned) in flat.iter().zip(back.as_array().unwrap()) {
                match (given.as_f64(), returned.as_f64()) {
                    (Some(given), Some(returned)) if datatype == DataType::Fp32 => {
                        assert!(
                            ((given - returned) / given).abs() < 1e-6,
                            "{datatype}: {given} {returned}"
                        )
                    }
                    _ => assert_eq!(given, returned, "{datatype}"),
                }
            }
        }
    }

    #[test]
    fn a_value_that_does_not_fit_its_datatype_is_named() {
        let error = from_json("pixels", DataType::Uint8, vec![3], json!([1, 256, 2])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "input 'pixels': element 1 is 256; expected an integer from 0 to 255 for datatype UINT8"
        );
        let error = from_json("pixels", DataType::Fp32, vec![2], json!([1.0, "a"])).unwrap_err();
        assert!(
            error.to_string().contains("element 1 is \"a\"; expected a number"),
            "{error}"
        );
        let error = from_json("pixels", DataType::Fp32, vec![1, 3], json!([1.0, 2.0])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "tensor 'pixels' of shape [1, 3] and datatype FP32 needs 12 bytes; 8 were given"
        );
        let error = from_json("words", DataType::Bytes, vec![3], json!(["a", "b"])).unwrap_err();
        assert!(
            error.to_string().contains("hold 2 BYTES elements; its shape needs 3"),
            "{error}"
        );
        assert!(
            DataType::parse("FLOAT")
                .unwrap_err()
                .to_string()
                .contains("is not one of BOOL")
        );
    }

    #[test]
    fn concat_then_split_gives_back_the_parts_for_fixed_and_variable_elements() {
        for (datatype, first, second) in [
            (DataType::Fp32, json!([[1.0, 2.0]]), json!([[3.0, 4.0], [5.0, 6.0]])),
            (DataType::Bytes, json!([["a", "bb"]]), json!([["ccc", ""], ["d", "ee"]])),
        ] {
            let one = from_json("x", datatype, vec![1, 2], first).unwrap();
            let two = from_json("x", datatype, vec![2, 2], second).unwrap();
            let joined = Tensor::concat(&[&one, &two]);
            assert_eq!(joined.shape, vec![3, 2]);
            let pieces = joined.split_rows(&[1, 2]).unwrap();
            assert_eq!(pieces, vec![one, two]);
        }
        let tensor = Tensor::from_f32("y", vec![2, 1], &[1.0, 2.0]);
        assert!(
            tensor
                .split_rows(&[1, 2])
                .unwrap_err()
                .to_string()
                .contains("expected 3 rows")
        );
    }

    #[test]
    fn grpc_contents_are_range_checked_into_the_datatype() {
        let contents = kiln_proto::inference::InferTensorContents {
            int_contents: vec![1, -2, 300],
            ..Default::default()
        };
        let error = encode_contents("x", DataType::Int8, &contents).unwrap_err();
        assert_eq!(error.to_string(), "input 'x': element 2 is 300, out of range for INT8");
        let bytes = encode_contents("x", DataType::Int32, &contents).unwrap();
        let tensor = Tensor::new("x".into(), DataType::Int32, vec![3], bytes).unwrap();
        assert_eq!(tensor.json_data(), json!([1, -2, 300]));
    }
}
