//! KServe's V1 protocol (TensorFlow Serving's row format) on the REST port, beside the Open Inference
//! Protocol, for clients written against KServe's sklearn, XGBoost or custom predictors:
//!
//! ```text
//!   GET  /                          {"status": "alive"}
//!   GET  /v1/models                 {"models": [NAME, ...]}
//!   GET  /v1/models/NAME            {"name": NAME, "ready": true}  (404 when not served here)
//!   POST /v1/models/NAME:predict    {"instances": [ROW, ...]}  ->  {"predictions": [ROW, ...]}
//! ```
//!
//! A row is one instance, without the batch dimension: for a model with one input, that input's value (a
//! number, a string or nested arrays, as deep as the input's shape); for a model with several, an object
//! with a value per input name. The instances are stacked into one tensor per input, checked against the
//! model as any request is (a wrong shape or datatype gets the same error naming it), batched and run.
//! Each prediction is the model's one output for that row, or an object of every output by name when the
//! model has several (TensorFlow Serving answers the same way).

use serde_json::{Map, Value, json};

use crate::ServeError;
use crate::model::TensorSpec;
use crate::tensor::{DataType, Tensor, encode_json};

/// The path's `NAME:VERB`, split: `digits:predict` → (`digits`, `predict`).
pub fn split_verb(call: &str) -> Result<(&str, &str), ServeError> {
    match call.rsplit_once(':') {
        Some((name, verb)) if !name.is_empty() => Ok((name, verb)),
        _ => Err(ServeError::NotFound(format!(
            "POST /v1/models/{call}: expected /v1/models/NAME:predict"
        ))),
    }
}

/// The shape of one instance's value: its array lengths, following first elements.
fn row_shape(value: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut current = value;
    while let Value::Array(items) = current {
        shape.push(items.len());
        match items.first() {
            Some(first) => current = first,
            None => break,
        }
    }
    shape
}

/// The datatype of an input the model does not declare (an entity key that enrichment looks up): integers,
/// or strings.
fn undeclared_datatype(name: &str, values: &[&Value]) -> Result<DataType, ServeError> {
    let mut leaves = Vec::new();
    for value in values {
        collect_leaves(value, &mut leaves);
    }
    if leaves.iter().all(|leaf| leaf.is_i64() || leaf.is_u64()) {
        Ok(DataType::Int64)
    } else if leaves.iter().all(|leaf| leaf.is_string()) {
        Ok(DataType::Bytes)
    } else {
        Err(ServeError::invalid(format!(
            "instances give '{name}', which the model does not declare, values that are neither all integers nor \
             all strings"
        )))
    }
}

fn collect_leaves<'a>(value: &'a Value, leaves: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| collect_leaves(item, leaves)),
        leaf => leaves.push(leaf),
    }
}

/// The request body's instances as one tensor per input, for a model that declares `inputs`.
pub fn instances_to_tensors(body: &[u8], inputs: &[TensorSpec]) -> Result<Vec<Tensor>, ServeError> {
    let request: Value =
        serde_json::from_slice(body).map_err(|error| ServeError::invalid(format!("the body is not JSON: {error}")))?;
    let Some(instances) = request.get("instances") else {
        return Err(ServeError::invalid(
            "the body has no 'instances'; expected {\"instances\": [ROW, ...]}, a row per instance",
        ));
    };
    let Value::Array(instances) = instances else {
        return Err(ServeError::invalid(format!(
            "'instances' is {instances}; expected an array, a row per instance"
        )));
    };
    if instances.is_empty() {
        return Err(ServeError::invalid("'instances' is empty; expected at least one row"));
    }
    // Per input, its value in every instance, in order.
    let mut columns: Vec<(String, Vec<&Value>)> = Vec::new();
    // A tensor's value is never an object, so objects name their inputs.
    if instances.iter().all(Value::is_object) {
        for (index, instance) in instances.iter().enumerate() {
            let object = instance.as_object().expect("checked above");
            if index == 0 {
                if object.is_empty() {
                    return Err(ServeError::invalid(
                        "instance 0 is an empty object; expected a value per input by name",
                    ));
                }
                columns = object.keys().map(|name| (name.clone(), Vec::new())).collect();
            }
            for (name, values) in &mut columns {
                let value = object.get(name.as_str()).ok_or_else(|| {
                    ServeError::invalid(format!("instance {index} has no '{name}'; instance 0 has it"))
                })?;
                values.push(value);
            }
            if object.len() != columns.len() {
                let extra: Vec<&str> = object
                    .keys()
                    .filter(|name| !columns.iter().any(|(known, _)| known == *name))
                    .map(String::as_str)
                    .collect();
                return Err(ServeError::invalid(format!(
                    "instance {index} has {}, which instance 0 does not; every instance names the same inputs",
                    extra.join(", ")
                )));
            }
        }
    } else {
        let [input] = inputs else {
            let names: Vec<&str> = inputs.iter().map(|spec| spec.name.as_str()).collect();
            return Err(ServeError::invalid(format!(
                "the model has {} inputs ({}); expected each instance as an object with a value per input",
                inputs.len(),
                names.join(", ")
            )));
        };
        columns.push((input.name.clone(), instances.iter().collect()));
    }
    columns
        .into_iter()
        .map(|(name, values)| {
            let datatype = match inputs.iter().find(|spec| spec.name == name) {
                Some(spec) => spec.datatype,
                None => undeclared_datatype(&name, &values)?,
            };
            let first = row_shape(values[0]);
            for (index, value) in values.iter().enumerate().skip(1) {
                let shape = row_shape(value);
                if shape != first {
                    return Err(ServeError::invalid(format!(
                        "input '{name}' of instance {index} has shape {shape:?}; instance 0's has {first:?}"
                    )));
                }
            }
            let mut data = bytes::BytesMut::new();
            for value in &values {
                encode_json(&name, datatype, value, &mut data)?;
            }
            let shape: Vec<usize> = std::iter::once(values.len()).chain(first).collect();
            Tensor::new(name, datatype, shape, data.freeze())
        })
        .collect()
}

/// Elements `flat` nested as `dims` (a scalar when `dims` is empty).
fn nest(flat: &[Value], dims: &[usize]) -> Value {
    match dims.split_first() {
        None => flat.first().cloned().unwrap_or(Value::Null),
        Some((_, inner)) => {
            let size: usize = inner.iter().product();
            Value::Array(flat.chunks(size.max(1)).map(|chunk| nest(chunk, inner)).collect())
        }
    }
}

/// The response body of model `model`: a prediction per instance.
pub fn predictions(model: &str, outputs: &[Tensor], rows: usize) -> Result<Value, ServeError> {
    let mut per_output = Vec::with_capacity(outputs.len());
    for output in outputs {
        if output.shape.first() != Some(&rows) {
            return Err(ServeError::Model {
                model: model.to_string(),
                message: format!(
                    "output '{}' has shape {:?}, not one row per instance ({rows}); use the v2 protocol for it",
                    output.name, output.shape
                ),
            });
        }
        let Value::Array(flat) = output.json_data() else {
            unreachable!("json_data is an array")
        };
        let Value::Array(rows) = nest(&flat, &output.shape) else {
            unreachable!("a shape with a batch dimension nests into rows")
        };
        per_output.push((output.name.as_str(), rows.into_iter()));
    }
    let predictions: Vec<Value> = if let [(_, only)] = per_output.as_mut_slice() {
        only.collect()
    } else {
        (0..rows)
            .map(|_| {
                let row = per_output
                    .iter_mut()
                    .map(|(name, values)| (name.to_string(), values.next().expect("a row per instance")))
                    .collect::<Map<String, Value>>();
                Value::Object(row)
            })
            .collect()
    };
    Ok(json!({ "predictions": predictions }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
        TensorSpec::new(name, datatype, shape)
    }

    #[test]
    fn rows_of_one_input_stack_into_a_batch() {
        let inputs = [spec("pixels", DataType::Fp32, vec![-1, 2, 2])];
        let tensors = instances_to_tensors(br#"{"instances": [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]}"#, &inputs).unwrap();
        assert_eq!(tensors.len(), 1);
        assert_eq!(tensors[0].name, "pixels");
        assert_eq!(tensors[0].shape, vec![2, 2, 2]);
        assert_eq!(
            tensors[0].to_f32().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        );
    }

    #[test]
    fn objects_name_each_input_and_undeclared_keys_take_their_values_type() {
        let inputs = [
            spec("a", DataType::Fp32, vec![-1, 2]),
            spec("b", DataType::Int64, vec![-1]),
        ];
        let body = br#"{"instances": [{"a": [1, 2], "b": 7}, {"a": [3, 4], "b": 8}]}"#;
        let tensors = instances_to_tensors(body, &inputs).unwrap();
        assert_eq!(tensors[0].shape, vec![2, 2]);
        assert_eq!(tensors[1].shape, vec![2]);
        assert_eq!(tensors[1].datatype, DataType::Int64);
        let keys =
            instances_to_tensors(br#"{"instances": [{"driver_id": 1001}, {"driver_id": 1002}]}"#, &inputs).unwrap();
        assert_eq!((keys[0].datatype, keys[0].shape.clone()), (DataType::Int64, vec![2]));
        let names = instances_to_tensors(br#"{"instances": [{"city": "Oslo"}]}"#, &inputs).unwrap();
        assert_eq!(names[0].datatype, DataType::Bytes);
    }

    #[test]
    fn bad_instances_are_refused_naming_what_is_wrong() {
        let inputs = [spec("pixels", DataType::Fp32, vec![-1, 2])];
        for (body, expected) in [
            (&br#"{"inputs": [[1, 2]]}"#[..], "the body has no 'instances'"),
            (br#"{"instances": 3}"#, "'instances' is 3; expected an array"),
            (br#"{"instances": []}"#, "'instances' is empty"),
            (
                br#"{"instances": [[1, 2], [3]]}"#,
                "input 'pixels' of instance 1 has shape [1]; instance 0's has [2]",
            ),
            (
                br#"{"instances": [[1, "x"]]}"#,
                "input 'pixels': element 1 is \"x\"; expected a number",
            ),
            (b"not json", "the body is not JSON"),
            (br#"{"instances": [{}]}"#, "instance 0 is an empty object"),
        ] {
            let error = instances_to_tensors(body, &inputs).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        let two = [spec("a", DataType::Fp32, vec![-1]), spec("b", DataType::Fp32, vec![-1])];
        let error = instances_to_tensors(br#"{"instances": [[1, 2]]}"#, &two)
            .unwrap_err()
            .to_string();
        assert!(error.contains("the model has 2 inputs (a, b)"), "{error}");
        let error = instances_to_tensors(br#"{"instances": [{"a": 1, "b": 2}, {"a": 1}]}"#, &two)
            .unwrap_err()
            .to_string();
        assert!(error.contains("instance 1 has no 'b'"), "{error}");
    }

    #[test]
    fn one_output_predicts_its_row_and_several_an_object_per_row() {
        let probabilities = Tensor::from_f32("probabilities", vec![2, 2], &[0.25, 0.75, 1.0, 0.0]);
        let label = Tensor::from_i64("label", vec![2], &[1, 0]);
        assert_eq!(
            predictions("m", std::slice::from_ref(&label), 2).unwrap(),
            json!({ "predictions": [1, 0] })
        );
        assert_eq!(
            predictions("m", &[probabilities, label], 2).unwrap(),
            json!({ "predictions": [
                { "probabilities": [0.25, 0.75], "label": 1 },
                { "probabilities": [1.0, 0.0], "label": 0 },
            ] })
        );
        let scalar = Tensor::from_i64("count", vec![1], &[5]);
        let error = predictions("m", &[scalar], 2).unwrap_err().to_string();
        assert!(
            error.contains("model 'm' failed: output 'count' has shape [1], not one row per instance (2)"),
            "{error}"
        );
    }

    #[test]
    fn the_verb_is_split_from_the_name() {
        assert_eq!(split_verb("digits:predict").unwrap(), ("digits", "predict"));
        assert_eq!(split_verb("a:b:explain").unwrap(), ("a:b", "explain"));
        assert!(split_verb("digits").is_err());
    }
}
