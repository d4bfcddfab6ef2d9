//! What the serving tier runs: a [`Model`] declares its input and output tensors and runs one batch. Kiln's
//! burn models and ONNX models implement it; requests are checked against the declaration here, once, so
//! a model only ever sees inputs of the shapes and datatypes it declared.

use crate::ServeError;
use crate::tensor::{DataType, Tensor, shape_text};

/// A declared input or output: `-1` marks a dimension of any size. A batching model's first dimension is
/// `-1` (the batch) for every input and output.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            shape,
        }
    }

    fn describe(&self) -> String {
        format!("{} ({} {})", self.name, self.datatype, shape_text(&self.shape))
    }

    fn matches(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(declared, given)| *declared < 0 || *declared as usize == *given)
    }
}

/// A loaded model. `infer` may be called from several threads at once (one per configured instance).
pub trait Model: Send + Sync + 'static {
    /// The protocol's `platform` (for example `kiln_burn` or `onnx_tract`).
    fn platform(&self) -> &str;
    fn inputs(&self) -> &[TensorSpec];
    fn outputs(&self) -> &[TensorSpec];
    /// Runs one batch: `inputs` in the declared order, each with the batch as its first dimension when the
    /// model batches. Returns every declared output, in order, with as many rows.
    fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String>;

    /// What this model needs of an input beyond its declared datatype and shape (text in a string tensor,
    /// say), checked on each request before it joins a batch, so a bad one fails alone.
    fn check_input(&self, _input: &Tensor) -> Result<(), String> {
        Ok(())
    }

    /// Whether requests may be stacked into one batch: every input and output has a variable first
    /// dimension and fixed others, so rows from different requests line up.
    fn batches(&self) -> bool {
        self.inputs()
            .iter()
            .chain(self.outputs())
            .all(|spec| spec.shape.first() == Some(&-1) && spec.shape[1..].iter().all(|dim| *dim >= 0))
    }
}

/// `given` checked against `model`'s declared inputs, in the declared order: every input present once,
/// none unknown, each of its declared datatype and shape, and all with the same batch size when batching.
pub fn check_inputs(model_name: &str, model: &dyn Model, given: Vec<Tensor>) -> Result<Vec<Tensor>, ServeError> {
    let specs = model.inputs();
    let declared = || specs.iter().map(TensorSpec::describe).collect::<Vec<_>>().join(", ");
    let mut slots: Vec<Option<Tensor>> = vec![None; specs.len()];
    for tensor in given {
        let Some(index) = specs.iter().position(|spec| spec.name == tensor.name) else {
            return Err(ServeError::invalid(format!(
                "model '{model_name}' has no input '{}'; its inputs are {}",
                tensor.name,
                declared()
            )));
        };
        let spec = &specs[index];
        if tensor.datatype != spec.datatype {
            return Err(ServeError::invalid(format!(
                "input '{}' is {}; model '{model_name}' expects {}",
                tensor.name, tensor.datatype, spec.datatype
            )));
        }
        if !spec.matches(&tensor.shape) {
            return Err(ServeError::invalid(format!(
                "input '{}' has shape {}; model '{model_name}' expects {} (-1: any size)",
                tensor.name,
                shape_text(&tensor.shape),
                shape_text(&spec.shape)
            )));
        }
        if slots[index].is_some() {
            return Err(ServeError::invalid(format!("input '{}' is given twice", tensor.name)));
        }
        model.check_input(&tensor).map_err(ServeError::invalid)?;
        slots[index] = Some(tensor);
    }
    let mut inputs = Vec::with_capacity(specs.len());
    for (spec, slot) in specs.iter().zip(slots) {
        let tensor = slot.ok_or_else(|| {
            ServeError::invalid(format!(
                "input '{}' is missing; model '{model_name}' expects {}",
                spec.name,
                declared()
            ))
        })?;
        inputs.push(tensor);
    }
    if model.batches()
        && let Some(first) = inputs.first()
        && let Some(other) = inputs.iter().find(|tensor| tensor.rows() != first.rows())
    {
        return Err(ServeError::invalid(format!(
            "input '{}' has {} rows but input '{}' has {}; every input needs the same batch size",
            other.name,
            other.rows(),
            first.name,
            first.rows()
        )));
    }
    Ok(inputs)
}

/// One row of zeros (empty strings for `BYTES`) for each input: what a model is warmed up with.
pub fn warmup_inputs(model: &dyn Model) -> Vec<Tensor> {
    model
        .inputs()
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().map(|dim| (*dim).max(1) as usize).collect();
            let count: usize = shape.iter().product();
            let data = match spec.datatype.element_bytes() {
                Some(size) => vec![0u8; count * size],
                None => vec![0u8; count * 4],
            };
            Tensor::new(spec.name.clone(), spec.datatype, shape, data.into()).expect("zeros fit their shape")
        })
        .collect()
}
