//! The built-in trainer: burn models trained data-parallel over a [`Communicator`].
//!
//! ```text
//!   every rank: load the CSV ─► seeded shuffle ─► train / validation split ─► normalize (train statistics)
//!   rank 0's initial parameters ──broadcast──► every rank
//!   each step: global batch B of the epoch's seeded order; rank r takes rows [r·B/n, (r+1)·B/n)
//!              forward, backward ─► gradients × (local rows / B) ─► all-reduce (sum)
//!              ─► fused optimizer step on the flat parameters (kiln-kernels) ─► parameters back into burn
//! ```
//!
//! Weighting each rank's mean gradient by its share of the batch and summing makes the update exactly the
//! gradient of the global batch's mean loss, whatever the shard sizes (the last batch of an epoch may be
//! short): n ranks with global batch B follow 1 rank with batch B, up to floating-point rounding. Every
//! rank applies the same update to the same parameters, so they stay identical (checked by hash).
//!
//! Sharded (`TrainConfig::sharded`): each rank holds only its own rows, as when every rank fetched its
//! shard of a training set. Each rank splits its shard into training and validation rows; the class count,
//! the normalization statistics (mean, then variance about the global mean), the validation metric and the
//! epoch loss are all-reduced, so every rank agrees on them. Each step rank r takes its next
//! B·(r+1)/n − B·r/n rows of its own shuffled shard; every rank runs as many steps per epoch as the rank
//! with the most batches (a rank out of rows contributes nothing), and gradients are summed with the row
//! count and divided by it after the all-reduce, so each step is still the mean over the rows it used.
//!
//! The optimizer is not burn's: Adam and SGD run as one fused kernel over flat buffers (parameters,
//! gradients, moments), which costs a fraction of burn's per-tensor optimizer and makes the optimizer state
//! three plain vectors in visiting order, independent of the world size, easy to checkpoint and broadcast.
//!
//! With the `burn-cuda` feature a rank that was given a GPU computes on it with burn's CUDA backend
//! ([`ComputeDevice::Cuda`]); the flat buffers, the optimizer and the collectives stay on the host.

mod data;
mod model;
mod saved;

use std::hash::{Hash, Hasher};
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;

pub use data::{
    DataProfile, Dataset, FeatureProfile, Normalization, Task, load_csv, load_dataset, load_parquet, profile,
    profile_of_shards,
};
pub use model::{Cnn, Mlp, Network};
pub use saved::{SAVED_FORMAT, SavedManifest, SavedModel, save};

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

/// Where a rank computes its forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    /// burn's flex backend on the CPU.
    #[default]
    Cpu,
    /// burn's CUDA backend on the GPU with this ordinal among the visible ones (the `burn-cuda` feature).
    Cuda(usize),
}

impl ComputeDevice {
    /// The burn device with autodiff (for training), or why it cannot be used here.
    pub fn burn_device(self) -> Result<Device, TrainError> {
        Ok(self.device()?.autodiff())
    }

    /// The burn device (for inference), or why it cannot be used here.
    pub fn device(self) -> Result<Device, TrainError> {
        match self {
            ComputeDevice::Cpu => Ok(Device::flex()),
            #[cfg(feature = "burn-cuda")]
            ComputeDevice::Cuda(ordinal) => {
                if !crate::gpu::cuda_driver_present() {
                    return Err(TrainError::InvalidInput(
                        "this rank was given a GPU, but the CUDA driver cannot be loaded here".into(),
                    ));
                }
                Ok(Device::cuda(ordinal))
            }
            #[cfg(not(feature = "burn-cuda"))]
            ComputeDevice::Cuda(_) => Err(TrainError::InvalidInput(
                "CUDA training needs a kiln built with `--features burn-cuda`; this one computes on the CPU only"
                    .into(),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    Adam,
    Sgd,
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub device: ComputeDevice,
    /// `Some([channels, height, width])` trains the CNN on rows of flattened images; `None` the MLP.
    pub image: Option<[usize; 3]>,
    pub hidden: Vec<usize>,
    pub epochs: u32,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub seed: u64,
    pub validation_fraction: f64,
    pub optimizer: OptimizerKind,
    /// SGD's momentum (0: plain SGD); Adam ignores it.
    pub momentum: f32,
    /// L2 weight decay added to the gradients.
    pub weight_decay: f32,
    /// Report a [`StepMetrics`] every this many steps (0: never).
    pub log_every_steps: u32,
    /// Stop after this many optimizer steps (tests); `None` runs every epoch.
    pub max_steps: Option<usize>,
    pub checkpoint: Option<CheckpointConfig>,
    /// Each rank was given only its own shard of the rows (a training set fetched per rank from the feature
    /// store), not the whole dataset: see [`train`] for what changes.
    pub sharded: bool,
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

/// What [`CheckpointManifest::format`] must be: 2 since the optimizer state became flat vectors.
const CHECKPOINT_FORMAT: u32 = 2;

/// `checkpoint.json` beside the parameter and optimizer files it names (f32, little-endian, visiting order;
/// the optimizer's state vectors one after the other). Each checkpoint writes new files named by its step
/// and switches to them by renaming the manifest, so a crash mid-write leaves the previous checkpoint whole.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CheckpointManifest {
    /// Format 1 (burn's optimizer record) had no such field.
    #[serde(default = "first_format")]
    format: u32,
    /// "adam" or "sgd": which state the optimizer file holds.
    #[serde(default)]
    optimizer: String,
    #[serde(default = "first_parameters_file")]
    parameters_file: String,
    /// Format 1 kept burn's optimizer record in `optimizer.bpk`, which this trainer does not read.
    #[serde(default)]
    optimizer_file: String,
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

fn first_format() -> u32 {
    1
}

fn first_parameters_file() -> String {
    "parameters.bin".into()
}

/// Adam or SGD over flat buffers in visiting order, stepped by the fused kernels.
#[derive(Debug, Clone)]
struct FlatOptimizer {
    kind: OptimizerKind,
    learning_rate: f32,
    momentum: f32,
    weight_decay: f32,
    /// Adam: the first moment then the second, each as long as the parameters. SGD: the velocity.
    state: Vec<f32>,
}

impl FlatOptimizer {
    fn new(config: &TrainConfig, parameters: usize) -> FlatOptimizer {
        let vectors = match config.optimizer {
            OptimizerKind::Adam => 2,
            OptimizerKind::Sgd => 1,
        };
        FlatOptimizer {
            kind: config.optimizer,
            learning_rate: config.learning_rate as f32,
            momentum: config.momentum,
            weight_decay: config.weight_decay,
            state: vec![0.0; vectors * parameters],
        }
    }

    fn name(&self) -> &'static str {
        match self.kind {
            OptimizerKind::Adam => "adam",
            OptimizerKind::Sgd => "sgd",
        }
    }

    /// Applies step number `step` (counted from 1) of `gradients` to `parameters`.
    fn step(&mut self, parameters: &mut [f32], gradients: &[f32], step: usize) -> Result<(), TrainError> {
        let result = match self.kind {
            OptimizerKind::Adam => {
                let (first, second) = self.state.split_at_mut(parameters.len());
                let config = kiln_kernels::AdamStep {
                    weight_decay: self.weight_decay,
                    ..kiln_kernels::AdamStep::new(self.learning_rate, step as u64)
                };
                kiln_kernels::cpu::adam_step(parameters, gradients, first, second, &config)
            }
            OptimizerKind::Sgd => {
                let config = kiln_kernels::SgdStep {
                    learning_rate: self.learning_rate,
                    momentum: self.momentum,
                    weight_decay: self.weight_decay,
                };
                kiln_kernels::cpu::sgd_step(parameters, gradients, &mut self.state, &config)
            }
        };
        result.map_err(|error| TrainError::InvalidInput(format!("the optimizer step: {error}")))
    }
}

fn save_checkpoint(
    directory: &std::path::Path,
    manifest: &CheckpointManifest,
    parameters: &[f32],
    optimizer: &[f32],
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
    write(&manifest.parameters_file, bytemuck::cast_slice(parameters))?;
    write(&manifest.optimizer_file, bytemuck::cast_slice(optimizer))?;
    // The manifest goes last: it names a checkpoint only once its files are complete.
    let text = serde_json::to_vec_pretty(manifest).map_err(|error| TrainError::Storage(error.to_string()))?;
    write("checkpoint.json", &text)?;
    // Only now are the previous checkpoint's files unreferenced.
    let current = [manifest.parameters_file.as_str(), manifest.optimizer_file.as_str()];
    for entry in std::fs::read_dir(directory).map_err(storage)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.ends_with(".bin") && (name.starts_with("parameters") || name.starts_with("optimizer"));
        if ours && !current.contains(&name.as_str()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Saves the model, the optimizer and the position `(epochs completed, batches of the next, its loss so
/// far)`.
fn write_checkpoint(
    directory: &std::path::Path,
    parameters: &[f32],
    optimizer: &FlatOptimizer,
    position: (u32, u32, f64),
    steps: usize,
    world: usize,
) -> Result<(), TrainError> {
    let manifest = CheckpointManifest {
        format: CHECKPOINT_FORMAT,
        optimizer: optimizer.name().to_string(),
        parameters_file: format!("parameters-{steps}.bin"),
        optimizer_file: format!("optimizer-{steps}.bin"),
        epoch: position.0,
        batch: position.1,
        epoch_loss_so_far: position.2,
        steps,
        parameters: parameters.len(),
        parameters_hash: format!("{:016x}", parameters_hash(parameters)),
        world_size: world as u32,
    };
    save_checkpoint(directory, &manifest, parameters, &optimizer.state)
}

/// A checkpoint as read back: its manifest, the parameters, the optimizer's state (none from format 1).
type Checkpoint = (CheckpointManifest, Vec<f32>, Option<Vec<f32>>);

fn read_floats(path: &std::path::Path) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))?;
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "{} has {} bytes, not a whole number of f32 values",
            path.display(),
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().expect("4 bytes")))
        .collect())
}

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
    if manifest.format > CHECKPOINT_FORMAT {
        return Err(TrainError::InvalidInput(format!(
            "the checkpoint in {} has format {}; this Kiln reads formats 1 to {CHECKPOINT_FORMAT} (a newer Kiln wrote it)",
            directory.display(),
            manifest.format
        )));
    }
    let parameters = read_floats(&directory.join(&manifest.parameters_file)).map_err(corrupt)?;
    if parameters.len() != manifest.parameters {
        return Err(corrupt(format!(
            "parameters.bin has {} values, expected {}",
            parameters.len(),
            manifest.parameters
        )));
    }
    if format!("{:016x}", parameters_hash(&parameters)) != manifest.parameters_hash {
        return Err(corrupt("the parameters do not match their hash".into()));
    }
    let optimizer = if manifest.format == 1 {
        None
    } else {
        Some(read_floats(&directory.join(&manifest.optimizer_file)).map_err(corrupt)?)
    };
    Ok(Some((manifest, parameters, optimizer)))
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

/// The training loss and throughput over the last [`TrainConfig::log_every_steps`] steps.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// Optimizer steps taken so far, this one included (counted across restarts).
    pub step: usize,
    pub epoch: u32,
    /// Mean loss of the global batches since the last report, all ranks together.
    pub loss: f64,
    pub samples_per_second: f64,
}

/// What [`train`] reports as it goes.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    Step(&'a StepMetrics),
    Epoch(&'a EpochMetrics),
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
    /// Whether the parameters train (on an autodiff device) or only infer.
    require_grad: bool,
}

impl ModuleMapper for Unflatten<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let values = self.values;
        let offset = &mut self.offset;
        let require_grad = self.require_grad;
        param.map(|tensor| {
            let shape = tensor.dims();
            let count: usize = shape.iter().product();
            let slice = values[*offset..*offset + count].to_vec();
            *offset += count;
            let loaded = Tensor::<D>::from_data(TensorData::new(slice, shape), &tensor.device());
            if require_grad { loaded.require_grad() } else { loaded }
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

/// Reads the latest checkpoint in `directory` into `parameters` and `optimizer`; returns the position to
/// broadcast (`[epoch, steps, batch, loss low bits, loss high bits]`), or `None` when there is none yet.
fn restore(
    directory: &std::path::Path,
    parameters: &mut Vec<f32>,
    optimizer: &mut FlatOptimizer,
    log: &mut impl FnMut(&str),
) -> Result<Option<[f32; 5]>, TrainError> {
    let Some((manifest, saved, optimizer_state)) = load_checkpoint(directory)? else {
        return Ok(None);
    };
    if saved.len() != parameters.len() {
        return Err(TrainError::InvalidInput(format!(
            "the checkpoint in {} has {} parameters; this model has {} (was the model changed?)",
            directory.display(),
            saved.len(),
            parameters.len()
        )));
    }
    match optimizer_state {
        Some(state) if manifest.optimizer == optimizer.name() && state.len() == optimizer.state.len() => {
            optimizer.state = state;
        }
        Some(state) => {
            return Err(TrainError::InvalidInput(format!(
                "the checkpoint in {} holds {} values of {:?} optimizer state; this job uses {} ({} values)",
                directory.display(),
                state.len(),
                manifest.optimizer,
                optimizer.name(),
                optimizer.state.len()
            )));
        }
        None => log(&format!(
            "the checkpoint in {} is format 1, whose optimizer state this trainer cannot read: resuming its parameters with a fresh {} state",
            directory.display(),
            optimizer.name()
        )),
    }
    *parameters = saved;
    let loss_bits = manifest.epoch_loss_so_far.to_bits();
    Ok(Some([
        f32::from_bits(manifest.epoch),
        f32::from_bits(manifest.steps as u32),
        f32::from_bits(manifest.batch),
        f32::from_bits(loss_bits as u32),
        f32::from_bits((loss_bits >> 32) as u32),
    ]))
}

/// The network a train job configures: an MLP, or with `image` the CNN (its first hidden width, else 64).
fn build_network(
    image: Option<[usize; 3]>,
    inputs: usize,
    hidden: &[usize],
    outputs: usize,
    device: &Device,
) -> Result<Network, TrainError> {
    let Some(image) = image else {
        return Ok(Network::Mlp(Mlp::new(inputs, hidden, outputs, device)));
    };
    if image.iter().product::<usize>() != inputs {
        return Err(TrainError::InvalidInput(format!(
            "image {}×{}×{} has {} values, but the dataset has {inputs} feature columns",
            image[0],
            image[1],
            image[2],
            image.iter().product::<usize>(),
        )));
    }
    let hidden = hidden.first().copied().unwrap_or(64);
    Ok(Network::Cnn(Cnn::new(image, hidden, outputs, device)))
}

/// Trains the configured model on `dataset` as one rank of `communicator`'s group. `log` receives one line
/// per epoch, per `log_every_steps` steps and one when resuming; `on_progress` the same as metrics.
pub fn train(
    config: &TrainConfig,
    dataset: &Dataset,
    communicator: &mut dyn Communicator,
    mut log: impl FnMut(&str),
    mut on_progress: impl FnMut(Progress<'_>),
) -> Result<(Network, TrainOutcome), TrainError> {
    if config.batch_size == 0 {
        return Err(TrainError::InvalidInput(
            "the batch size is 0; expected at least 1".into(),
        ));
    }
    let (rank, world) = (communicator.rank() as usize, communicator.world_size() as usize);
    let split = dataset.split(config.validation_fraction, config.seed)?;
    let shards = if config.sharded {
        Some(ShardPlan::agree(config, dataset, &split, communicator)?)
    } else {
        None
    };
    let normalization = match &shards {
        Some(_) => normalization_of_shards(dataset, &split.train, communicator)?,
        None => Normalization::of(dataset, &split.train),
    };
    let mut normalized = normalization.normalize(dataset);
    if let Some(shards) = &shards {
        normalized.classes = shards.classes;
    }
    let dataset = &normalized;
    let train_rows = shards.as_ref().map_or(split.train.len(), |shards| shards.train_rows);
    let device = config.device.burn_device()?;
    let network = build_network(
        config.image,
        dataset.columns,
        &config.hidden,
        dataset.outputs(),
        &device,
    )?;
    let mut model = network.map(&mut SeededInit {
        random: rand::SeedableRng::seed_from_u64(config.seed),
        fan_in: dataset.columns,
        next_id: 0,
    });
    // Rank 0 reads the latest checkpoint, if any, and every rank starts from rank 0's parameters (and
    // optimizer state, and position).
    let mut parameters = flatten(&model);
    let mut optimizer = FlatOptimizer::new(config, parameters.len());
    // [epoch, steps, batch, epoch loss so far (f64 as two halves), 1 if rank 0 could not resume], as bits:
    // every rank learns the outcome, so a checkpoint rank 0 refuses fails the whole group at once.
    let mut resumed = [f32::from_bits(0); 6];
    let mut failure = None;
    if rank == 0
        && let Some(checkpoint) = &config.checkpoint
    {
        match restore(&checkpoint.directory, &mut parameters, &mut optimizer, &mut log) {
            Ok(Some(position)) => resumed[..5].copy_from_slice(&position),
            Ok(None) => {}
            Err(error) => {
                resumed[5] = f32::from_bits(1);
                failure = Some(error);
            }
        }
    }
    communicator.broadcast(&mut resumed, 0)?;
    if resumed[5].to_bits() != 0 {
        return Err(failure.unwrap_or_else(|| {
            TrainError::InvalidInput("rank 0 could not resume from the job's checkpoint (its log says why)".into())
        }));
    }
    let (start_epoch, mut steps) = (resumed[0].to_bits(), resumed[1].to_bits() as usize);
    let skip_batches = resumed[2].to_bits() as usize;
    let resumed_loss = f64::from_bits(u64::from(resumed[3].to_bits()) | (u64::from(resumed[4].to_bits()) << 32));
    communicator.broadcast(&mut parameters, 0)?;
    model = model.map(&mut Unflatten {
        values: &parameters,
        offset: 0,
        require_grad: true,
    });
    if steps > 0 {
        communicator.broadcast(&mut optimizer.state, 0)?;
        log(&format!(
            "resuming from the checkpoint after epoch {start_epoch} and {skip_batches} batches of the next (step {steps})"
        ));
    }
    let mut epochs = Vec::new();
    // Loss sum, rows and start time since the last step report.
    let (mut interval_loss, mut interval_rows, mut interval_started) = (0.0f64, 0usize, Instant::now());
    'epochs: for epoch in start_epoch + 1..=config.epochs {
        let started = Instant::now();
        let order = data::shuffled(&split.train, config.seed.wrapping_add(u64::from(epoch)));
        let resuming_here = epoch == start_epoch + 1;
        let mut timing = [std::time::Duration::ZERO; 4];
        let mut loss_total = if resuming_here { resumed_loss } else { 0.0 };
        let batches = shards
            .as_ref()
            .map_or(order.len().div_ceil(config.batch_size), |shards| shards.steps_per_epoch);
        for index in 0..batches {
            if resuming_here && index < skip_batches {
                continue;
            }
            // This rank's rows of the step, and the step's row count when this rank knows it (a slice of
            // the global batch); sharded, the count is learned with the all-reduce.
            let (local, known_global) = match &shards {
                None => {
                    let batch = &order[index * config.batch_size..((index + 1) * config.batch_size).min(order.len())];
                    let global = batch.len();
                    (&batch[rank * global / world..(rank + 1) * global / world], Some(global))
                }
                Some(shards) => {
                    let start = (index * shards.local_batch).min(order.len());
                    let end = ((index + 1) * shards.local_batch).min(order.len());
                    (&order[start..end], None)
                }
            };
            let mut gradients_flat;
            let local_loss_sum;
            if local.is_empty() {
                // Nothing to compute here this step; the other ranks' gradients arrive through the sum.
                gradients_flat = vec![0.0; parameters.len()];
                local_loss_sum = 0.0;
            } else {
                let phase = Instant::now();
                let loss = batch_loss(&model, dataset, local, &device);
                local_loss_sum = f64::from(loss.clone().into_scalar::<f32>()) * local.len() as f64;
                let gradients = GradientsParams::from_grads(loss.backward(), &model);
                timing[0] += phase.elapsed();
                let phase = Instant::now();
                let mut visitor = FlattenGradients {
                    gradients: &gradients,
                    values: Vec::with_capacity(parameters.len()),
                };
                model.visit(&mut visitor);
                gradients_flat = visitor.values;
                // This rank's mean gradient, weighted by its share of the global batch (sharded: by its row
                // count, divided by the step's after the sum).
                let weight = known_global.map_or(local.len() as f32, |global| local.len() as f32 / global as f32);
                kiln_kernels::cpu::scale(&mut gradients_flat, weight);
                timing[1] += phase.elapsed();
            }
            let phase = Instant::now();
            let mut loss_buffer = [local_loss_sum as f32, local.len() as f32];
            all_reduce_bucketed(
                communicator,
                &mut [gradients_flat.as_mut_slice(), loss_buffer.as_mut_slice()],
                ReduceOp::Sum,
                BUCKET_BYTES,
            )?;
            let global = known_global.unwrap_or(loss_buffer[1].round() as usize);
            if known_global.is_none() && global > 0 {
                kiln_kernels::cpu::scale(&mut gradients_flat, 1.0 / global as f32);
            }
            loss_total += f64::from(loss_buffer[0]);
            timing[2] += phase.elapsed();
            let phase = Instant::now();
            steps += 1;
            optimizer.step(&mut parameters, &gradients_flat, steps)?;
            timing[3] += phase.elapsed();
            let phase = Instant::now();
            model = model.map(&mut Unflatten {
                values: &parameters,
                offset: 0,
                require_grad: true,
            });
            timing[1] += phase.elapsed();
            interval_loss += f64::from(loss_buffer[0]);
            interval_rows += global;
            if config.log_every_steps > 0 && steps.is_multiple_of(config.log_every_steps as usize) {
                let seconds = interval_started.elapsed().as_secs_f64().max(1e-9);
                let metrics = StepMetrics {
                    step: steps,
                    epoch,
                    loss: interval_loss / interval_rows.max(1) as f64,
                    samples_per_second: interval_rows as f64 / seconds,
                };
                log(&format!(
                    "step {} epoch {epoch} loss {:.4} samples/s {:.0}",
                    metrics.step, metrics.loss, metrics.samples_per_second
                ));
                on_progress(Progress::Step(&metrics));
                (interval_loss, interval_rows, interval_started) = (0.0, 0, Instant::now());
            }
            if rank == 0
                && let Some(checkpoint) = &config.checkpoint
                && checkpoint
                    .every_steps
                    .is_some_and(|every| steps.is_multiple_of(every.max(1) as usize))
            {
                let position = (epoch - 1, index as u32 + 1, loss_total);
                let paused = Instant::now();
                write_checkpoint(&checkpoint.directory, &parameters, &optimizer, position, steps, world)?;
                // Step throughput counts training only.
                interval_started += paused.elapsed();
            }
            if config.max_steps.is_some_and(|max| steps >= max) {
                break 'epochs;
            }
        }
        // Training time only: the validation pass is not part of the throughput.
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        let paused = Instant::now();
        let (validation_name, validation) = match &shards {
            None => evaluate(&model, dataset, &split.validation),
            Some(_) => {
                let (name, sum, count) = evaluation_sums(&model, dataset, &split.validation);
                let mut sums = [sum as f32, count as f32];
                communicator.all_reduce(&mut sums, ReduceOp::Sum)?;
                (name, metric_of(name, f64::from(sums[0]), f64::from(sums[1])))
            }
        };
        let metrics = EpochMetrics {
            epoch,
            loss: loss_total / train_rows as f64,
            validation,
            validation_name,
            samples_per_second: train_rows as f64 / seconds,
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
        on_progress(Progress::Epoch(&metrics));
        epochs.push(metrics);
        if rank == 0
            && let Some(checkpoint) = &config.checkpoint
            && (epoch % checkpoint.every_epochs.max(1) == 0 || epoch == config.epochs)
        {
            write_checkpoint(
                &checkpoint.directory,
                &parameters,
                &optimizer,
                (epoch, 0, 0.0),
                steps,
                world,
            )?;
        }
        interval_started += paused.elapsed();
    }
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
    let (name, sum, count) = evaluation_sums(model, dataset, rows);
    (name, metric_of(name, sum, count as f64))
}

/// The metric from its sums: correct predictions or squared errors over `count` rows (0 for no rows).
fn metric_of(name: &str, sum: f64, count: f64) -> f64 {
    if count <= 0.0 {
        0.0
    } else if name == "rmse" {
        (sum / count).sqrt()
    } else {
        sum / count
    }
}

/// What the validation metric sums over `rows`: ("accuracy", correct predictions, rows) or ("rmse",
/// squared errors, rows).
fn evaluation_sums(model: &Network, dataset: &Dataset, rows: &[usize]) -> (&'static str, f64, usize) {
    let name = match dataset.task {
        data::Task::Classification => "accuracy",
        data::Task::Regression => "rmse",
    };
    if rows.is_empty() {
        return (name, 0.0, 0);
    }
    let device = model
        .devices()
        .into_iter()
        .next()
        .unwrap_or_else(|| Device::flex().autodiff());
    let inputs = rows_tensor(dataset, rows, &device);
    let sum = match dataset.task {
        data::Task::Classification => {
            let predicted = model.forward(inputs).argmax(1).into_data().convert::<i64>();
            let predicted = predicted.try_to_vec::<i64>().expect("i64 predictions");
            rows.iter()
                .zip(&predicted)
                .filter(|(row, class)| i64::from(dataset.labels[**row]) == **class)
                .count() as f64
        }
        data::Task::Regression => {
            let predicted = model.forward(inputs).into_data().convert::<f32>();
            let predicted = predicted.try_to_vec::<f32>().expect("f32 predictions");
            rows.iter()
                .zip(&predicted)
                .map(|(row, value)| (f64::from(*value) - f64::from(dataset.targets[*row])).powi(2))
                .sum()
        }
    };
    (name, sum, rows.len())
}

/// What the ranks of a sharded run agree on before training: learned from every rank's shard.
struct ShardPlan {
    /// One more than the largest class any shard holds (classification); 1 for regression.
    classes: usize,
    /// Training rows over all shards.
    train_rows: usize,
    /// This rank's rows per step: its part of the global batch.
    local_batch: usize,
    /// Steps per epoch: as many as the rank with the most batches needs.
    steps_per_epoch: usize,
}

impl ShardPlan {
    fn agree(
        config: &TrainConfig,
        dataset: &Dataset,
        split: &data::Split,
        communicator: &mut dyn Communicator,
    ) -> Result<ShardPlan, TrainError> {
        let (rank, world) = (communicator.rank() as usize, communicator.world_size() as usize);
        if config.batch_size < world {
            return Err(TrainError::InvalidInput(format!(
                "a sharded run of {world} ranks needs a batch size of at least {world}, so every rank takes rows each step; got {}",
                config.batch_size
            )));
        }
        let local_batch_of = |rank: usize| config.batch_size * (rank + 1) / world - config.batch_size * rank / world;
        // [columns, classes, training rows] of every rank. Counts are exact in f32 below 2^24.
        let mine = [dataset.columns as f32, dataset.classes as f32, split.train.len() as f32];
        let mut all = vec![0.0f32; 3 * world];
        communicator.all_gather(&mine, &mut all)?;
        let shards: Vec<[usize; 3]> = all
            .chunks_exact(3)
            .map(|shard| [shard[0] as usize, shard[1] as usize, shard[2] as usize])
            .collect();
        if let Some((other, shard)) = shards.iter().enumerate().find(|(_, shard)| shard[0] != shards[0][0]) {
            return Err(TrainError::InvalidInput(format!(
                "the shards disagree on their columns: rank 0 has {} feature columns, rank {other} has {}; every rank's shard must have the same columns",
                shards[0][0], shard[0]
            )));
        }
        let steps_per_epoch = shards
            .iter()
            .enumerate()
            .map(|(rank, shard)| shard[2].div_ceil(local_batch_of(rank)))
            .max()
            .unwrap_or(0);
        Ok(ShardPlan {
            classes: shards.iter().map(|shard| shard[1]).max().unwrap_or(1),
            train_rows: shards.iter().map(|shard| shard[2]).sum(),
            local_batch: local_batch_of(rank),
            steps_per_epoch,
        })
    }
}

/// The normalization of the training rows of every rank's shard: the global mean first, then the variance
/// about it, each summed in f64 on the rank and all-reduced.
fn normalization_of_shards(
    dataset: &Dataset,
    rows: &[usize],
    communicator: &mut dyn Communicator,
) -> Result<Normalization, TrainError> {
    let columns = dataset.columns;
    let mut sums = vec![0.0f64; columns];
    for row in rows {
        for (sum, value) in sums.iter_mut().zip(dataset.row(*row)) {
            *sum += f64::from(*value);
        }
    }
    let mut buffer: Vec<f32> = sums.iter().map(|sum| *sum as f32).collect();
    buffer.push(rows.len() as f32);
    communicator.all_reduce(&mut buffer, ReduceOp::Sum)?;
    let count = f64::from(buffer[columns]).max(1.0);
    let mean: Vec<f64> = buffer[..columns].iter().map(|sum| f64::from(*sum) / count).collect();
    let mut squares = vec![0.0f64; columns];
    for row in rows {
        for ((sum, value), mean) in squares.iter_mut().zip(dataset.row(*row)).zip(&mean) {
            *sum += (f64::from(*value) - mean).powi(2);
        }
    }
    let mut buffer: Vec<f32> = squares.iter().map(|sum| *sum as f32).collect();
    communicator.all_reduce(&mut buffer, ReduceOp::Sum)?;
    Ok(Normalization::from_moments(
        &mean,
        &buffer.iter().map(|sum| f64::from(*sum) / count).collect::<Vec<_>>(),
    ))
}

#[cfg(test)]
mod tests;
