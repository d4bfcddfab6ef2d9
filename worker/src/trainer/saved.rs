//! A trained model as rank 0 saves it (`model.json` beside `weights.bin`), and loaded back for inference:
//! the same network rebuilt on burn's CPU backend without autodiff, its parameters read in visiting order,
//! and the training normalization applied to every input row, so serving sees exactly what training saw.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use super::{Normalization, TrainError, Unflatten, build_network, parameters_hash};

/// The format of `model.json` this code writes and reads.
pub const SAVED_FORMAT: &str = "kiln-mlp-1";

/// `model.json`: enough to rebuild the network and prepare its inputs exactly as training did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedManifest {
    pub format: String,
    /// `mlp` or `cnn`.
    pub model: String,
    /// Feature columns per row.
    pub inputs: usize,
    /// For the CNN: the shape each input row is read as, [channels, height, width].
    pub image: Option<[usize; 3]>,
    pub hidden: Vec<usize>,
    pub classes: usize,
    pub feature_names: Vec<String>,
    pub label: String,
    pub normalization: Normalization,
    /// `weights.bin`: little-endian f32, every parameter in the model's visiting order (per layer: the
    /// weight, as [inputs, outputs] for dense layers and [out, in, height, width] for convolutions, then
    /// the bias).
    pub parameters: usize,
    pub parameters_hash: String,
    /// `classification` or `regression`.
    pub task: String,
    pub validation_metric: String,
    pub validation: f64,
    pub job_id: u64,
    pub attempt: u32,
}

impl SavedManifest {
    pub fn is_classifier(&self) -> bool {
        self.task != "regression"
    }

    /// The network's output width: one logit per class, or one value.
    pub fn outputs(&self) -> usize {
        if self.is_classifier() { self.classes } else { 1 }
    }
}

/// Writes `parameters` (in visiting order) as `directory/weights.bin` and `manifest` as
/// `directory/model.json`, creating the directory.
pub fn save(directory: &Path, manifest: &SavedManifest, parameters: &[f32]) -> std::io::Result<()> {
    std::fs::create_dir_all(directory)?;
    let weights: Vec<u8> = parameters.iter().flat_map(|value| value.to_le_bytes()).collect();
    std::fs::write(directory.join("weights.bin"), weights)?;
    let text = serde_json::to_string_pretty(manifest).map_err(std::io::Error::other)?;
    std::fs::write(directory.join("model.json"), text)
}

/// A saved model, ready to predict. Safe to share between threads: prediction only reads it.
#[derive(Debug)]
pub struct SavedModel {
    pub manifest: SavedManifest,
    network: super::Network,
    device: Device,
}

impl SavedModel {
    /// Loads `directory/model.json` and `directory/weights.bin` onto the CPU, refusing a manifest of another
    /// format, weights of the wrong size, or weights whose hash is not the recorded one.
    pub fn load(directory: &Path) -> Result<SavedModel, TrainError> {
        SavedModel::load_on(directory, super::ComputeDevice::Cpu)
    }

    /// [`SavedModel::load`] onto `compute`: the CPU, or a GPU with burn's CUDA backend (the `burn-cuda`
    /// feature), where every prediction then runs.
    pub fn load_on(directory: &Path, compute: super::ComputeDevice) -> Result<SavedModel, TrainError> {
        let invalid =
            |message: String| TrainError::InvalidInput(format!("model in {}: {message}", directory.display()));
        let text = std::fs::read_to_string(directory.join("model.json"))
            .map_err(|error| invalid(format!("cannot read model.json: {error}")))?;
        let manifest: SavedManifest =
            serde_json::from_str(&text).map_err(|error| invalid(format!("model.json is not a Kiln model: {error}")))?;
        if manifest.format != SAVED_FORMAT {
            return Err(invalid(format!(
                "model.json has format '{}'; expected '{SAVED_FORMAT}'",
                manifest.format
            )));
        }
        if manifest.normalization.mean.len() != manifest.inputs || manifest.normalization.std.len() != manifest.inputs {
            return Err(invalid(format!(
                "the normalization has {} means and {} deviations for {} inputs",
                manifest.normalization.mean.len(),
                manifest.normalization.std.len(),
                manifest.inputs
            )));
        }
        let bytes = std::fs::read(directory.join("weights.bin"))
            .map_err(|error| invalid(format!("cannot read weights.bin: {error}")))?;
        if bytes.len() != manifest.parameters * 4 {
            return Err(invalid(format!(
                "weights.bin has {} bytes; model.json says {} parameters ({} bytes)",
                bytes.len(),
                manifest.parameters,
                manifest.parameters * 4
            )));
        }
        let weights: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes(chunk.try_into().expect("4 bytes")))
            .collect();
        if format!("{:016x}", parameters_hash(&weights)) != manifest.parameters_hash {
            return Err(invalid(format!(
                "weights.bin does not hash to {} as model.json records (a different or damaged file)",
                manifest.parameters_hash
            )));
        }
        let device = compute.device()?;
        let network = build_network(
            manifest.image,
            manifest.inputs,
            &manifest.hidden,
            manifest.outputs(),
            &device,
        )?;
        let expected: usize = network.num_params();
        if expected != weights.len() {
            return Err(invalid(format!(
                "the {} network model.json describes has {expected} parameters; weights.bin holds {}",
                manifest.model,
                weights.len()
            )));
        }
        let network = network.map(&mut Unflatten {
            values: &weights,
            offset: 0,
            require_grad: false,
        });
        Ok(SavedModel {
            manifest,
            network,
            device,
        })
    }

    /// The network's outputs for `rows` raw feature rows (`features` holds rows × inputs values, row-major,
    /// before normalization): rows × [`SavedManifest::outputs`] values, row-major (logits for a classifier).
    pub fn predict(&self, features: &[f32], rows: usize) -> Vec<f32> {
        let inputs = self.manifest.inputs;
        assert_eq!(features.len(), rows * inputs, "{rows} rows of {inputs} features");
        let mut normalized = Vec::with_capacity(features.len());
        for row in features.chunks_exact(inputs.max(1)) {
            normalized.extend(self.manifest.normalization.apply(row));
        }
        let input = Tensor::<2>::from_data(TensorData::new(normalized, [rows, inputs]), &self.device);
        let output = self.network.forward(input).into_data().convert::<f32>();
        output.try_into_vec::<f32>().expect("f32 outputs")
    }
}
