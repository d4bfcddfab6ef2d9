//! The built-in trainer: burn models trained data-parallel over a [`Communicator`].
//!
//! ```text
//!   every rank: load the CSV ─► seeded shuffle ─► train / validation split ─► normalize (train statistics)
//!   rank 0's initial parameters ──broadcast──► every rank
//!   each step: global batch B of the epoch's seeded order; rank r takes rows [r·B/n, (r+1)·B/n)
//!              forward, backward ─► gradients × (local rows / B) ─► all-reduce (sum) ─► optimizer step
//! ```
//!
//! Weighting each rank's mean gradient by its share of the batch and summing makes the update exactly the
//! gradient of the global batch's mean loss, whatever the shard sizes (the last batch of an epoch may be
//! short): n ranks with global batch B follow 1 rank with batch B, up to floating-point rounding. Every
//! rank applies the same update to the same parameters, so they stay identical (checked by hash).
//!
//! Left out so far: checkpoints and resuming, elastic restarts with `min_workers`, the CNN, the CUDA
//! backend and NCCL, metrics sent to the coordinator (they go to the task's stdout, so `kiln jobs logs`
//! shows them), Parquet input.

mod data;
mod model;

use std::hash::{Hash, Hasher};
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::TensorData;

pub use data::{Dataset, Normalization, Task, load_csv};
pub use model::{Cnn, Mlp, Network};

use crate::collective::{CollectiveError, Communicator, ReduceOp, all_reduce_bucketed};

/// Gradient bytes per all-reduce at most (PyTorch DDP's default bucket).
pub const BUCKET_BYTES: usize = 25 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The dataset or the configuration is wrong; retrying does not help.
    #[error("{0}")]
    InvalidInput(String),
    /// A collective failed (a peer died or hung); the attempt should restart.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("writing the model: {0}")]
    Storage(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    Adam,
    Sgd,
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// `Some([channels, height, width])` trains the CNN on rows of flattened images; `None` the MLP.
    pub image: Option<[usize; 3]>,
    pub hidden: Vec<usize>,
    pub epochs: u32,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub seed: u64,
    pub validation_fraction: f64,
    pub optimizer: OptimizerKind,
    /// Stop after this many optimizer steps (tests); `None` runs every epoch.
    pub max_steps: Option<usize>,
    pub checkpoint: Option<CheckpointConfig>,
}

/// Where checkpoints go and how often. The directory must be reachable by rank 0 of a later attempt
/// (a shared filesystem, until artifacts live in the object store).
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub directory: std::path::PathBuf,
    pub every_epochs: u32,
    /// Also after every this many optimizer steps, mid-epoch included.
    pub every_steps: Option<u32>,
}

/// `checkpoint.json` beside `parameters.bin` (f32, visiting order) and `optimizer.bpk` (burn's record).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CheckpointManifest {
    /// Epochs completed.
    epoch: u32,
    /// Batches already done of the next epoch (0 at an epoch boundary): its data order is known from the
    /// seed, so the run goes on from the next batch.
    #[serde(default)]
    batch: u32,
    /// The next epoch's loss so far, so its reported loss covers the whole epoch.
    #[serde(default)]
    epoch_loss_so_far: f64,
    steps: usize,
    parameters: usize,
    parameters_hash: String,
    world_size: u32,
}

fn save_checkpoint(
    directory: &std::path::Path,
    manifest: &CheckpointManifest,
    parameters: &[f32],
    optimizer: &[u8],
) -> Result<(), TrainError> {
    let storage =
        |error: std::io::Error| TrainError::Storage(format!("checkpoint in {}: {error}", directory.display()));
    std::fs::create_dir_all(directory).map_err(storage)?;
    let write = |name: &str, bytes: &[u8]| -> Result<(), TrainError> {
        // Written aside, then renamed: a reader never sees half a file.
        let temporary = directory.join(format!(".{name}.tmp"));
        std::fs::write(&temporary, bytes).map_err(storage)?;
        std::fs::rename(&temporary, directory.join(name)).map_err(storage)
    };
    write("parameters.bin", bytemuck::cast_slice(parameters))?;
    write("optimizer.bpk", optimizer)?;
    // The manifest goes last: it names a checkpoint only once its files are complete.
    let manifest = serde_json::to_vec_pretty(manifest).map_err(|error| TrainError::Storage(error.to_string()))?;
    write("checkpoint.json", &manifest)
}

/// Saves the model, the optimizer and the position `(epochs completed, batches of the next, its loss so
/// far)`.
fn write_checkpoint(
    directory: &std::path::Path,
    model: &Network,
    optimizer: &burn::optim::ModuleOptimizer,
    position: (u32, u32, f64),
    steps: usize,
    world: usize,
) -> Result<(), TrainError> {
    let parameters = flatten(model);
    let optimizer_state = optimizer
        .into_bytes()
        .map_err(|error| TrainError::Storage(format!("encoding the optimizer state: {error:?}")))?;
    let manifest = CheckpointManifest {
        epoch: position.0,
        batch: position.1,
        epoch_loss_so_far: position.2,
        steps,
        parameters: parameters.len(),
        parameters_hash: format!("{:016x}", parameters_hash(&parameters)),
        world_size: world as u32,
    };
    save_checkpoint(directory, &manifest, &parameters, &optimizer_state)
}

/// A checkpoint as read back: its manifest, the parameters, the optimizer's record bytes.
type Checkpoint = (CheckpointManifest, Vec<f32>, Vec<u8>);

fn load_checkpoint(directory: &std::path::Path) -> Result<Option<Checkpoint>, TrainError> {
    let manifest_path = directory.join("checkpoint.json");
    let text = match std::fs::read(&manifest_path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(TrainError::Storage(format!("{}: {error}", manifest_path.display()))),
    };
    let corrupt =
        |what: String| TrainError::InvalidInput(format!("checkpoint in {} is corrupt: {what}", directory.display()));
    let manifest: CheckpointManifest = serde_json::from_slice(&text).map_err(|error| corrupt(error.to_string()))?;
    let bytes = std::fs::read(directory.join("parameters.bin")).map_err(|error| corrupt(error.to_string()))?;
    if bytes.len() != manifest.parameters * 4 {
        return Err(corrupt(format!(
            "parameters.bin has {} bytes, expected {}",
            bytes.len(),
            manifest.parameters * 4
        )));
    }
    let parameters: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().expect("4 bytes")))
        .collect();
    if format!("{:016x}", parameters_hash(&parameters)) != manifest.parameters_hash {
        return Err(corrupt("the parameters do not match their hash".into()));
    }
    let optimizer = std::fs::read(directory.join("optimizer.bpk")).map_err(|error| corrupt(error.to_string()))?;
    Ok(Some((manifest, parameters, optimizer)))
}

/// Sends rank 0's bytes to every rank (lengths first, then the bytes padded to whole f32 values).
fn broadcast_bytes(communicator: &mut dyn Communicator, bytes: &mut Vec<u8>) -> Result<(), TrainError> {
    let mut length = [f32::from_bits(bytes.len() as u32)];
    communicator.broadcast(&mut length, 0)?;
    let length = length[0].to_bits() as usize;
    let mut words = vec![0.0f32; length.div_ceil(4)];
    if communicator.rank() == 0 {
        let mut padded = bytes.clone();
        padded.resize(words.len() * 4, 0);
        words.copy_from_slice(bytemuck::cast_slice(&padded));
    }
    communicator.broadcast(&mut words, 0)?;
    let received: &[u8] = bytemuck::cast_slice(&words);
    *bytes = received[..length].to_vec();
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub struct EpochMetrics {
    pub epoch: u32,
    /// Mean training loss over the epoch's rows, all ranks together.
    pub loss: f64,
    /// Accuracy (classification) or RMSE (regression) on the validation rows; see `validation_name`.
    pub validation: f64,
    pub validation_name: &'static str,
    pub samples_per_second: f64,
    /// Where this rank's training time went, in seconds: forward and backward, copying gradients out of
    /// burn and back, the all-reduce (waiting for the slowest rank included), the optimizer step.
    pub seconds_compute: f64,
    pub seconds_gradient_copies: f64,
    pub seconds_all_reduce: f64,
    pub seconds_optimizer: f64,
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub epochs: Vec<EpochMetrics>,
    pub steps: usize,
    /// A hash of every parameter's bits: equal on every rank when data parallelism works.
    pub parameters_hash: u64,
    pub parameters: Vec<f32>,
    pub normalization: Normalization,
    pub classes: usize,
}

/// Every parameter, flattened in the order the module visits them (the same on every rank: parameter ids
/// are random per process, visiting order is not).
struct Flatten {
    values: Vec<f32>,
}

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        self.values.extend(data.try_to_vec::<f32>().expect("f32 parameters"));
    }
}

/// Writes flattened values back into the parameters, in visiting order.
struct Unflatten<'a> {
    values: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Unflatten<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let values = self.values;
        let offset = &mut self.offset;
        param.map(|tensor| {
            let shape = tensor.dims();
            let count: usize = shape.iter().product();
            let slice = values[*offset..*offset + count].to_vec();
            *offset += count;
            Tensor::<D>::from_data(TensorData::new(slice, shape), &tensor.device()).require_grad()
        })
    }
}

/// The gradients of a model's parameters, flattened in visiting order; parameters without a gradient
/// contribute zeros, so every rank's buffer has the same layout.
struct FlattenGradients<'a> {
    gradients: &'a GradientsParams,
    values: Vec<f32>,
}

impl ModuleVisitor for FlattenGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let count: usize = param.val().dims().iter().product();
        match self.gradients.get::<D>(param.id) {
            Some(gradient) => {
                let data = gradient.into_data().convert::<f32>();
                self.values.extend(data.try_to_vec::<f32>().expect("f32 gradients"));
            }
            None => self.values.extend(std::iter::repeat_n(0.0, count)),
        }
    }
}

/// Replaces each parameter's gradient with the reduced one.
struct ReplaceGradients<'a> {
    gradients: &'a mut GradientsParams,
    values: &'a [f32],
    offset: usize,
    entries: Vec<(ParamId, Vec<usize>)>,
}

impl ModuleVisitor for ReplaceGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().dims().to_vec();
        let count: usize = shape.iter().product();
        if let Some(old) = self.gradients.remove::<D>(param.id) {
            let slice = self.values[self.offset..self.offset + count].to_vec();
            let shape_array: [usize; D] = shape.clone().try_into().expect("rank D");
            let tensor = Tensor::<D>::from_data(TensorData::new(slice, shape_array), &old.device());
            self.gradients.register(param.id, tensor);
        }
        self.entries.push((param.id, shape));
        self.offset += count;
    }
}

/// Initial parameters drawn from the job's seed (uniform in ±1/√fan_in, as PyTorch's `Linear` does),
/// so they do not depend on the backend's global random state, with parameter ids numbered in visiting
/// order, so an optimizer state saved by one process loads into another (burn's ids are random).
struct SeededInit {
    random: rand::rngs::StdRng,
    fan_in: usize,
    next_id: u64,
}

impl ModuleMapper for SeededInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        use rand::Rng;
        let (_, tensor, mapper) = param.consume();
        let shape = tensor.dims();
        if D == 2 {
            // burn's Linear weight is [inputs, outputs]; its bias follows with the same fan-in.
            self.fan_in = shape[0];
        } else if D == 4 {
            // A convolution's weight is [out channels, in channels, kernel height, kernel width].
            self.fan_in = shape[1] * shape[2] * shape[3];
        }
        let bound = 1.0 / (self.fan_in.max(1) as f32).sqrt();
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|_| self.random.random_range(-bound..bound)).collect();
        let value = Tensor::<D>::from_data(TensorData::new(values, shape), &tensor.device()).require_grad();
        self.next_id += 1;
        Param::from_mapped_value(ParamId::from(self.next_id), value, mapper)
    }
}

fn flatten(model: &Network) -> Vec<f32> {
    let mut visitor = Flatten { values: Vec::new() };
    model.visit(&mut visitor);
    visitor.values
}

pub fn parameters_hash(parameters: &[f32]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for value in parameters {
        value.to_bits().hash(&mut hasher);
    }
    hasher.finish()
}

/// The given rows of an already normalized dataset, as a [rows, columns] tensor.
fn rows_tensor(dataset: &Dataset, rows: &[usize], device: &Device) -> Tensor<2> {
    let columns = dataset.columns;
    let mut values = Vec::with_capacity(rows.len() * columns);
    for row in rows {
        values.extend_from_slice(dataset.row(*row));
    }
    Tensor::<2>::from_data(TensorData::new(values, [rows.len(), columns]), device)
}

fn labels_tensor(dataset: &Dataset, rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let labels: Vec<i64> = rows.iter().map(|row| i64::from(dataset.labels[*row])).collect();
    Tensor::<1, Int>::from_data(TensorData::new(labels, [rows.len()]), device)
}

/// The batch's mean loss: cross-entropy over the classes, or the mean squared error.
fn batch_loss(model: &Network, dataset: &Dataset, rows: &[usize], device: &Device) -> Tensor<1> {
    let output = model.forward(rows_tensor(dataset, rows, device));
    match dataset.task {
        data::Task::Classification => CrossEntropyLossConfig::new()
            .init(device)
            .forward(output, labels_tensor(dataset, rows, device)),
        data::Task::Regression => {
            let targets: Vec<f32> = rows.iter().map(|row| dataset.targets[*row]).collect();
            let targets = Tensor::<2>::from_data(TensorData::new(targets, [rows.len(), 1]), device);
            burn::nn::loss::MseLoss::new().forward(output, targets, burn::nn::loss::Reduction::Mean)
        }
    }
}

/// Trains an MLP classifier on `dataset` as one rank of `communicator`'s group. `log` receives one line
/// per epoch (and one when resuming), `on_epoch` each epoch's metrics.
pub fn train(
    config: &TrainConfig,
    dataset: &Dataset,
    communicator: &mut dyn Communicator,
    mut log: impl FnMut(&str),
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<(Network, TrainOutcome), TrainError> {
    if config.batch_size == 0 {
        return Err(TrainError::InvalidInput(
            "the batch size is 0; expected at least 1".into(),
        ));
    }
    let (rank, world) = (communicator.rank() as usize, communicator.world_size() as usize);
    let split = dataset.split(config.validation_fraction, config.seed)?;
    let normalization = Normalization::of(dataset, &split.train);
    let dataset = &normalization.normalize(dataset);
    let device = Device::flex().autodiff();
    let network = match config.image {
        None => Network::Mlp(Mlp::new(dataset.columns, &config.hidden, dataset.outputs(), &device)),
        Some(image) => {
            if image.iter().product::<usize>() != dataset.columns {
                return Err(TrainError::InvalidInput(format!(
                    "image {}×{}×{} has {} values, but the dataset has {} feature columns",
                    image[0],
                    image[1],
                    image[2],
                    image.iter().product::<usize>(),
                    dataset.columns
                )));
            }
            let hidden = config.hidden.first().copied().unwrap_or(64);
            Network::Cnn(Cnn::new(image, hidden, dataset.outputs(), &device))
        }
    };
    let mut model = network.map(&mut SeededInit {
        random: rand::SeedableRng::seed_from_u64(config.seed),
        fan_in: dataset.columns,
        next_id: 0,
    });
    let mut optimizer = match config.optimizer {
        OptimizerKind::Adam => AdamConfig::new().init(),
        OptimizerKind::Sgd => SgdConfig::new().init(),
    };
    // Rank 0 reads the latest checkpoint, if any, and every rank starts from rank 0's parameters (and
    // optimizer state, and position).
    let mut initial = flatten(&model);
    // [epoch, steps, batch, epoch loss so far (f64 as two halves)], as bits.
    let mut resumed = [f32::from_bits(0); 5];
    let mut optimizer_bytes = Vec::new();
    if rank == 0
        && let Some(checkpoint) = &config.checkpoint
        && let Some((manifest, parameters, optimizer_state)) = load_checkpoint(&checkpoint.directory)?
    {
        if parameters.len() != initial.len() {
            return Err(TrainError::InvalidInput(format!(
                "the checkpoint in {} has {} parameters; this model has {} (was the model changed?)",
                checkpoint.directory.display(),
                parameters.len(),
                initial.len()
            )));
        }
        initial = parameters;
        optimizer_bytes = optimizer_state;
        let loss_bits = manifest.epoch_loss_so_far.to_bits();
        resumed = [
            f32::from_bits(manifest.epoch),
            f32::from_bits(manifest.steps as u32),
            f32::from_bits(manifest.batch),
            f32::from_bits(loss_bits as u32),
            f32::from_bits((loss_bits >> 32) as u32),
        ];
    }
    communicator.broadcast(&mut resumed, 0)?;
    let (start_epoch, mut steps) = (resumed[0].to_bits(), resumed[1].to_bits() as usize);
    let skip_batches = resumed[2].to_bits() as usize;
    let resumed_loss = f64::from_bits(u64::from(resumed[3].to_bits()) | (u64::from(resumed[4].to_bits()) << 32));
    communicator.broadcast(&mut initial, 0)?;
    model = model.map(&mut Unflatten {
        values: &initial,
        offset: 0,
    });
    if steps > 0 {
        broadcast_bytes(communicator, &mut optimizer_bytes)?;
        optimizer = optimizer
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(optimizer_bytes))
            .map_err(|error| TrainError::InvalidInput(format!("the checkpoint's optimizer state: {error:?}")))?;
        log(&format!(
            "resuming from the checkpoint after epoch {start_epoch} and {skip_batches} batches of the next (step {steps})"
        ));
    }
    let mut epochs = Vec::new();
    'epochs: for epoch in start_epoch + 1..=config.epochs {
        let started = Instant::now();
        let order = data::shuffled(&split.train, config.seed.wrapping_add(u64::from(epoch)));
        let resuming_here = epoch == start_epoch + 1;
        let mut timing = [std::time::Duration::ZERO; 4];
        let mut loss_total = if resuming_here { resumed_loss } else { 0.0 };
        for (index, batch) in order.chunks(config.batch_size).enumerate() {
            if resuming_here && index < skip_batches {
                continue;
            }
            let global = batch.len();
            let local = &batch[rank * global / world..(rank + 1) * global / world];
            let mut gradients_flat;
            let mut gradients = GradientsParams::new();
            let local_loss_sum;
            if local.is_empty() {
                gradients_flat = vec![0.0; initial.len()];
                local_loss_sum = 0.0;
            } else {
                let phase = Instant::now();
                let loss = batch_loss(&model, dataset, local, &device);
                local_loss_sum = f64::from(loss.clone().into_scalar::<f32>()) * local.len() as f64;
                gradients = GradientsParams::from_grads(loss.backward(), &model);
                timing[0] += phase.elapsed();
                let phase = Instant::now();
                let mut visitor = FlattenGradients {
                    gradients: &gradients,
                    values: Vec::with_capacity(initial.len()),
                };
                model.visit(&mut visitor);
                gradients_flat = visitor.values;
                // This rank's mean gradient, weighted by its share of the global batch.
                kiln_kernels::cpu::scale(&mut gradients_flat, local.len() as f32 / global as f32);
                timing[1] += phase.elapsed();
            }
            let phase = Instant::now();
            let mut loss_buffer = [local_loss_sum as f32];
            all_reduce_bucketed(
                communicator,
                &mut [gradients_flat.as_mut_slice(), loss_buffer.as_mut_slice()],
                ReduceOp::Sum,
                BUCKET_BYTES,
            )?;
            loss_total += f64::from(loss_buffer[0]);
            timing[2] += phase.elapsed();
            let phase = Instant::now();
            if local.is_empty() {
                // No graph on this rank for this batch: rebuild gradients from the reduced values.
                let loss = batch_loss(&model, dataset, &batch[..1], &device);
                gradients = GradientsParams::from_grads(loss.backward(), &model);
            }
            let mut replace = ReplaceGradients {
                gradients: &mut gradients,
                values: &gradients_flat,
                offset: 0,
                entries: Vec::new(),
            };
            model.visit(&mut replace);
            timing[1] += phase.elapsed();
            let phase = Instant::now();
            model = optimizer.step(config.learning_rate, model, gradients);
            timing[3] += phase.elapsed();
            steps += 1;
            if rank == 0
                && let Some(checkpoint) = &config.checkpoint
                && checkpoint
                    .every_steps
                    .is_some_and(|every| steps % every.max(1) as usize == 0)
            {
                let position = (epoch - 1, index as u32 + 1, loss_total);
                write_checkpoint(&checkpoint.directory, &model, &optimizer, position, steps, world)?;
            }
            if config.max_steps.is_some_and(|max| steps >= max) {
                break 'epochs;
            }
        }
        // Training time only: the validation pass is not part of the throughput.
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        let (validation_name, validation) = evaluate(&model, dataset, &split.validation);
        let metrics = EpochMetrics {
            epoch,
            loss: loss_total / split.train.len() as f64,
            validation,
            validation_name,
            samples_per_second: split.train.len() as f64 / seconds,
            seconds_compute: timing[0].as_secs_f64(),
            seconds_gradient_copies: timing[1].as_secs_f64(),
            seconds_all_reduce: timing[2].as_secs_f64(),
            seconds_optimizer: timing[3].as_secs_f64(),
        };
        log(&format!(
            "epoch {epoch}/{} loss {:.4} validation_{} {:.4} samples/s {:.0} (seconds: compute {:.3}, gradient copies {:.3}, all-reduce {:.3}, optimizer {:.3})",
            config.epochs,
            metrics.loss,
            metrics.validation_name,
            metrics.validation,
            metrics.samples_per_second,
            metrics.seconds_compute,
            metrics.seconds_gradient_copies,
            metrics.seconds_all_reduce,
            metrics.seconds_optimizer
        ));
        on_epoch(&metrics);
        epochs.push(metrics);
        if rank == 0
            && let Some(checkpoint) = &config.checkpoint
            && (epoch % checkpoint.every_epochs.max(1) == 0 || epoch == config.epochs)
        {
            write_checkpoint(&checkpoint.directory, &model, &optimizer, (epoch, 0, 0.0), steps, world)?;
        }
    }
    let parameters = flatten(&model);
    let outcome = TrainOutcome {
        epochs,
        steps,
        parameters_hash: parameters_hash(&parameters),
        parameters,
        normalization,
        classes: dataset.classes,
    };
    Ok((model, outcome))
}

/// The validation metric on `rows`: ("accuracy", share classified correctly) or ("rmse", root mean
/// squared error).
/// `dataset` is the normalized one the model trained on.
pub fn evaluate(model: &Network, dataset: &Dataset, rows: &[usize]) -> (&'static str, f64) {
    let device = Device::flex().autodiff();
    let inputs = rows_tensor(dataset, rows, &device);
    match dataset.task {
        data::Task::Classification => {
            if rows.is_empty() {
                return ("accuracy", 0.0);
            }
            let predicted = model.forward(inputs).argmax(1).into_data().convert::<i64>();
            let predicted = predicted.try_to_vec::<i64>().expect("i64 predictions");
            let correct = rows
                .iter()
                .zip(&predicted)
                .filter(|(row, class)| i64::from(dataset.labels[**row]) == **class)
                .count();
            ("accuracy", correct as f64 / rows.len() as f64)
        }
        data::Task::Regression => {
            if rows.is_empty() {
                return ("rmse", 0.0);
            }
            let predicted = model.forward(inputs).into_data().convert::<f32>();
            let predicted = predicted.try_to_vec::<f32>().expect("f32 predictions");
            let squared: f64 = rows
                .iter()
                .zip(&predicted)
                .map(|(row, value)| (f64::from(*value) - f64::from(dataset.targets[*row])).powi(2))
                .sum();
            ("rmse", (squared / rows.len() as f64).sqrt())
        }
    }
}

#[cfg(test)]
mod tests;
