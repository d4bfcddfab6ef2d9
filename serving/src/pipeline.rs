//! Pre- and post-processing steps declared with a deployment, wrapped around any [`Model`]:
//!
//! ```text
//!   request ─► normalize (x - mean) / std ─► model ─► softmax │ argmax │ top_k │ threshold │ labels ─► answer
//! ```
//!
//! Preprocessing rewrites the model's first FP32 input in place. Postprocessing reads the model's first
//! FP32 output (the scores) and adds outputs beside it: `softmax` replaces the scores by their softmax along
//! the last dimension; `argmax` adds `class` (INT64 [-1]); `top_k` adds `top_k_indices` (INT64 [-1, k]) and
//! `top_k_scores` (FP32 [-1, k]); `threshold` adds `decision` (BOOL [-1]: the last score at or above it);
//! `labels` names classes, adding `class_label` (BYTES [-1]) after `argmax` and `top_k_labels` (BYTES
//! [-1, k]) after `top_k`. Steps are checked against the model's declared tensors when the pipeline is
//! built, so a step that cannot apply is refused before anything is served.

use std::sync::Arc;

use bytes::BytesMut;
use serde::Deserialize;

use crate::model::{Model, TensorSpec};
use crate::tensor::{DataType, Tensor};

/// One step, as a deployment file writes it (`{ normalize = { mean = [..], std = [..] } }`, `"softmax"`,
/// `{ top_k = 3 }`, …).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    Normalize { mean: Vec<f32>, std: Vec<f32> },
    Softmax,
    Argmax,
    TopK(usize),
    Threshold(f32),
    Labels(Vec<String>),
}

/// A model with its steps.
pub struct Pipeline {
    inner: Arc<dyn Model>,
    pre: Vec<Step>,
    post: Vec<Step>,
    /// Which inner output holds the scores, and how many per row.
    scores: usize,
    classes: usize,
    outputs: Vec<TensorSpec>,
}

fn first_fp32(specs: &[TensorSpec]) -> Option<usize> {
    specs.iter().position(|spec| spec.datatype == DataType::Fp32)
}

impl Pipeline {
    /// Wraps `inner`, refusing steps that do not fit its tensors.
    pub fn new(inner: Arc<dyn Model>, pre: Vec<Step>, post: Vec<Step>) -> Result<Pipeline, String> {
        for step in &pre {
            let Step::Normalize { mean, std } = step else {
                return Err(format!(
                    "{step:?} is a postprocessing step; preprocessing has only normalize"
                ));
            };
            let index = first_fp32(inner.inputs()).ok_or("normalize needs an FP32 input; the model has none")?;
            let width = inner.inputs()[index].shape.last().copied().unwrap_or(-1);
            if width < 0 || mean.len() != width as usize || std.len() != width as usize {
                return Err(format!(
                    "normalize has {} means and {} deviations; input '{}' has {width} values per row",
                    mean.len(),
                    std.len(),
                    inner.inputs()[index].name
                ));
            }
            if std.contains(&0.0) {
                return Err("normalize has a standard deviation of 0; expected nonzero ones".into());
            }
        }
        let mut outputs = inner.outputs().to_vec();
        let (mut scores, mut classes) = (0, 0);
        if !post.is_empty() {
            scores = first_fp32(&outputs).ok_or("postprocessing needs an FP32 output (scores); the model has none")?;
            let shape = &outputs[scores].shape;
            classes = match shape.as_slice() {
                [_, width] if *width > 0 => *width as usize,
                [_] => 1,
                _ => {
                    return Err(format!(
                        "postprocessing reads output '{}' as [-1, classes]; it has shape {shape:?}",
                        outputs[scores].name
                    ));
                }
            };
        }
        let mut picked: Option<&str> = None;
        for step in &post {
            let add = |outputs: &mut Vec<TensorSpec>, name: &str, datatype, shape| {
                outputs.push(TensorSpec::new(name, datatype, shape));
            };
            match step {
                Step::Normalize { .. } => return Err("normalize is a preprocessing step".into()),
                Step::Softmax => {}
                Step::Argmax => {
                    add(&mut outputs, "class", DataType::Int64, vec![-1]);
                    picked = Some("class");
                }
                Step::TopK(k) => {
                    if *k == 0 || *k > classes {
                        return Err(format!("top_k is {k}; expected 1 to {classes} (the scores per row)"));
                    }
                    add(&mut outputs, "top_k_indices", DataType::Int64, vec![-1, *k as i64]);
                    add(&mut outputs, "top_k_scores", DataType::Fp32, vec![-1, *k as i64]);
                    picked = Some("top_k");
                }
                Step::Threshold(_) => add(&mut outputs, "decision", DataType::Bool, vec![-1]),
                Step::Labels(labels) => {
                    if labels.len() != classes {
                        return Err(format!(
                            "labels names {} classes; the scores have {classes}",
                            labels.len()
                        ));
                    }
                    match picked {
                        Some("class") => add(&mut outputs, "class_label", DataType::Bytes, vec![-1]),
                        Some(_) => {
                            let k = outputs
                                .iter()
                                .find(|spec| spec.name == "top_k_indices")
                                .expect("top_k added it");
                            let width = k.shape[1];
                            add(&mut outputs, "top_k_labels", DataType::Bytes, vec![-1, width]);
                        }
                        None => return Err("labels names the classes argmax or top_k picks; put one before it".into()),
                    }
                }
            }
        }
        Ok(Pipeline {
            inner,
            pre,
            post,
            scores,
            classes,
            outputs,
        })
    }
}

/// Each row of `scores` (rows of `classes` values) replaced by its softmax.
pub fn softmax_rows(scores: &mut [f32], classes: usize) {
    for row in scores.chunks_exact_mut(classes.max(1)) {
        let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for value in row.iter_mut() {
            *value = (*value - top).exp();
            sum += *value;
        }
        row.iter_mut().for_each(|value| *value /= sum);
    }
}

/// The index of the largest value of each row of `scores` (rows of `classes` values; the last on ties).
pub fn argmax_rows(scores: &[f32], classes: usize) -> Vec<usize> {
    scores
        .chunks_exact(classes.max(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(index, _)| index)
        })
        .collect()
}

fn bytes_tensor(name: &str, shape: Vec<usize>, values: &[&str]) -> Tensor {
    let mut data = BytesMut::new();
    for value in values {
        data.extend_from_slice(&(value.len() as u32).to_le_bytes());
        data.extend_from_slice(value.as_bytes());
    }
    Tensor::new(name.into(), DataType::Bytes, shape, data.freeze()).expect("one element per row")
}

impl Model for Pipeline {
    fn platform(&self) -> &str {
        self.inner.platform()
    }

    fn inputs(&self) -> &[TensorSpec] {
        self.inner.inputs()
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let mut inputs = inputs.to_vec();
        for step in &self.pre {
            if let Step::Normalize { mean, std } = step {
                let index = first_fp32(self.inner.inputs()).expect("checked when built");
                let input = &inputs[index];
                let mut values = input.to_f32().map_err(|error| error.to_string())?;
                for row in values.chunks_exact_mut(mean.len()) {
                    for ((value, mean), std) in row.iter_mut().zip(mean).zip(std) {
                        *value = (*value - mean) / std;
                    }
                }
                inputs[index] = Tensor::from_f32(input.name.clone(), input.shape.clone(), &values);
            }
        }
        let mut outputs = self.inner.infer(&inputs)?;
        if self.post.is_empty() {
            return Ok(outputs);
        }
        let rows = outputs[self.scores].rows();
        let mut scores = outputs[self.scores].to_f32().map_err(|error| error.to_string())?;
        let classes = self.classes;
        // The classes the last argmax or top_k picked per row, and whether it was top_k.
        let (mut picked, mut top_k): (Vec<Vec<usize>>, bool) = (Vec::new(), false);
        for step in &self.post {
            match step {
                Step::Normalize { .. } => unreachable!("refused when built"),
                Step::Softmax => {
                    softmax_rows(&mut scores, classes);
                    let name = outputs[self.scores].name.clone();
                    let shape = outputs[self.scores].shape.clone();
                    outputs[self.scores] = Tensor::from_f32(name, shape, &scores);
                }
                Step::Argmax => {
                    picked = argmax_rows(&scores, classes)
                        .into_iter()
                        .map(|index| vec![index])
                        .collect();
                    top_k = false;
                    let classes: Vec<i64> = picked.iter().map(|row| row[0] as i64).collect();
                    outputs.push(Tensor::from_i64("class", vec![rows], &classes));
                }
                Step::TopK(k) => {
                    picked = scores
                        .chunks_exact(classes)
                        .map(|row| {
                            let mut order: Vec<usize> = (0..classes).collect();
                            order.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
                            order.truncate(*k);
                            order
                        })
                        .collect();
                    top_k = true;
                    let indices: Vec<i64> = picked.iter().flatten().map(|index| *index as i64).collect();
                    let best: Vec<f32> = picked
                        .iter()
                        .zip(scores.chunks_exact(classes))
                        .flat_map(|(order, row)| order.iter().map(|index| row[*index]))
                        .collect();
                    outputs.push(Tensor::from_i64("top_k_indices", vec![rows, *k], &indices));
                    outputs.push(Tensor::from_f32("top_k_scores", vec![rows, *k], &best));
                }
                Step::Threshold(threshold) => {
                    let data: Vec<u8> = scores
                        .chunks_exact(classes)
                        .map(|row| u8::from(row[classes - 1] >= *threshold))
                        .collect();
                    outputs.push(
                        Tensor::new("decision".into(), DataType::Bool, vec![rows], data.into()).expect("one per row"),
                    );
                }
                Step::Labels(labels) => {
                    let names: Vec<&str> = picked.iter().flatten().map(|index| labels[*index].as_str()).collect();
                    outputs.push(if top_k {
                        let width = picked.first().map_or(0, Vec::len);
                        bytes_tensor("top_k_labels", vec![rows, width], &names)
                    } else {
                        bytes_tensor("class_label", vec![rows], &names)
                    });
                }
            }
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns its input row as the scores.
    struct Echo {
        inputs: Vec<TensorSpec>,
        outputs: Vec<TensorSpec>,
    }

    impl Model for Echo {
        fn platform(&self) -> &str {
            "echo"
        }
        fn inputs(&self) -> &[TensorSpec] {
            &self.inputs
        }
        fn outputs(&self) -> &[TensorSpec] {
            &self.outputs
        }
        fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
            let mut scores = inputs[0].clone();
            scores.name = "scores".into();
            Ok(vec![scores])
        }
    }

    fn echo() -> Arc<dyn Model> {
        Arc::new(Echo {
            inputs: vec![TensorSpec::new("x", DataType::Fp32, vec![-1, 3])],
            outputs: vec![TensorSpec::new("scores", DataType::Fp32, vec![-1, 3])],
        })
    }

    fn names(pipeline: &Pipeline) -> Vec<&str> {
        pipeline.outputs().iter().map(|spec| spec.name.as_str()).collect()
    }

    #[test]
    fn steps_normalize_the_input_and_add_their_outputs_in_order() {
        let labels = vec!["cat".to_string(), "dog".into(), "fox".into()];
        let pipeline = Pipeline::new(
            echo(),
            vec![Step::Normalize {
                mean: vec![1.0, 1.0, 1.0],
                std: vec![1.0, 1.0, 2.0],
            }],
            vec![
                Step::Argmax,
                Step::Labels(labels.clone()),
                Step::TopK(2),
                Step::Labels(labels),
                Step::Threshold(0.5),
            ],
        )
        .unwrap();
        assert_eq!(
            names(&pipeline),
            [
                "scores",
                "class",
                "class_label",
                "top_k_indices",
                "top_k_scores",
                "top_k_labels",
                "decision"
            ]
        );
        let input = Tensor::from_f32("x", vec![2, 3], &[1.0, 3.0, 2.0, 5.0, 1.0, 3.0]);
        let outputs = pipeline.infer(&[input]).unwrap();
        // Normalized: [0, 2, 0.5] and [4, 0, 1].
        assert_eq!(outputs[0].to_f32().unwrap(), vec![0.0, 2.0, 0.5, 4.0, 0.0, 1.0]);
        assert_eq!(outputs[1], Tensor::from_i64("class", vec![2], &[1, 0]));
        assert_eq!(outputs[2].json_data(), serde_json::json!(["dog", "cat"]));
        assert_eq!(outputs[3], Tensor::from_i64("top_k_indices", vec![2, 2], &[1, 2, 0, 2]));
        assert_eq!(outputs[4].to_f32().unwrap(), vec![2.0, 0.5, 4.0, 1.0]);
        assert_eq!(outputs[5].json_data(), serde_json::json!(["dog", "fox", "cat", "fox"]));
        assert_eq!(outputs[6].json_data(), serde_json::json!([true, true]));
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_their_order() {
        let pipeline = Pipeline::new(echo(), vec![], vec![Step::Softmax, Step::Argmax]).unwrap();
        let outputs = pipeline
            .infer(&[Tensor::from_f32("x", vec![1, 3], &[1.0, 3.0, 2.0])])
            .unwrap();
        let probabilities = outputs[0].to_f32().unwrap();
        assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(probabilities[1] > probabilities[2] && probabilities[2] > probabilities[0]);
        assert_eq!(outputs[1], Tensor::from_i64("class", vec![1], &[1]));
    }

    #[test]
    fn steps_that_do_not_fit_the_model_are_refused_naming_why() {
        let refused = |pre: Vec<Step>, post: Vec<Step>| Pipeline::new(echo(), pre, post).err().unwrap();
        assert_eq!(
            refused(
                vec![Step::Normalize {
                    mean: vec![0.0; 2],
                    std: vec![1.0; 2]
                }],
                vec![]
            ),
            "normalize has 2 means and 2 deviations; input 'x' has 3 values per row"
        );
        assert_eq!(
            refused(vec![], vec![Step::TopK(4)]),
            "top_k is 4; expected 1 to 3 (the scores per row)"
        );
        assert_eq!(
            refused(vec![], vec![Step::Labels(vec!["a".into(); 3])]),
            "labels names the classes argmax or top_k picks; put one before it"
        );
        assert_eq!(
            refused(vec![], vec![Step::Argmax, Step::Labels(vec!["a".into(); 2])]),
            "labels names 2 classes; the scores have 3"
        );
        assert!(refused(vec![Step::Softmax], vec![]).contains("preprocessing has only normalize"));
    }
}
