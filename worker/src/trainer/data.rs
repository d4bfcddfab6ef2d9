//! Tabular data for the trainer: a CSV file with a header row or a Parquet file, numeric feature columns
//! and a label column (class numbers or real numbers), split and normalized the same way on every rank.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::collective::{CollectiveError, Communicator};

/// What the label column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Class numbers 0, 1, 2, …: cross-entropy loss, accuracy.
    Classification,
    /// Real numbers: mean squared error, RMSE.
    Regression,
}

/// Rows in memory, features row-major.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub feature_names: Vec<String>,
    pub features: Vec<f32>,
    /// Class numbers (classification; empty for regression).
    pub labels: Vec<u32>,
    /// The label column as numbers (both tasks).
    pub targets: Vec<f32>,
    pub columns: usize,
    /// One more than the largest label (classification); 1 for regression.
    pub classes: usize,
    pub task: Task,
}

/// Row indices of the two parts of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
}

/// Per-feature mean and standard deviation of the training rows; saved with the model, so serving
/// normalizes inputs exactly as training did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// `rows` in an order shuffled by `seed`: the same on every rank.
pub fn shuffled(rows: &[usize], seed: u64) -> Vec<usize> {
    let mut order = rows.to_vec();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    order
}

impl Dataset {
    pub fn rows(&self) -> usize {
        self.targets.len()
    }

    /// The model's output width: one logit per class, or one value.
    pub fn outputs(&self) -> usize {
        match self.task {
            Task::Classification => self.classes,
            Task::Regression => 1,
        }
    }

    pub fn row(&self, index: usize) -> &[f32] {
        &self.features[index * self.columns..(index + 1) * self.columns]
    }

    /// A seeded shuffle, then the last `validation_fraction` of it held out.
    pub fn split(&self, validation_fraction: f64, seed: u64) -> Result<Split, TrainError> {
        let rows: Vec<usize> = (0..self.rows()).collect();
        let order = shuffled(&rows, seed);
        let validation = ((self.rows() as f64) * validation_fraction).round() as usize;
        if validation == 0 || validation >= self.rows() {
            return Err(TrainError::InvalidInput(format!(
                "{} rows with validation_fraction {validation_fraction} leave {validation} for validation and {} for training; expected both above 0",
                self.rows(),
                self.rows() - validation.min(self.rows())
            )));
        }
        let (train, held_out) = order.split_at(self.rows() - validation);
        Ok(Split {
            train: train.to_vec(),
            validation: held_out.to_vec(),
        })
    }
}

impl Normalization {
    pub fn of(dataset: &Dataset, rows: &[usize]) -> Normalization {
        let columns = dataset.columns;
        let count = rows.len().max(1) as f64;
        let mut mean = vec![0.0f64; columns];
        for row in rows {
            for (sum, value) in mean.iter_mut().zip(dataset.row(*row)) {
                *sum += f64::from(*value);
            }
        }
        mean.iter_mut().for_each(|sum| *sum /= count);
        let mut variance = vec![0.0f64; columns];
        for row in rows {
            for ((sum, value), mean) in variance.iter_mut().zip(dataset.row(*row)).zip(&mean) {
                *sum += (f64::from(*value) - mean).powi(2);
            }
        }
        let variance: Vec<f64> = variance.iter().map(|sum| sum / count).collect();
        Normalization::from_moments(&mean, &variance)
    }

    /// From each feature's mean and variance.
    pub fn from_moments(mean: &[f64], variance: &[f64]) -> Normalization {
        Normalization {
            mean: mean.iter().map(|value| *value as f32).collect(),
            // A constant feature keeps its values centred but unscaled.
            std: variance
                .iter()
                .map(|variance| variance.max(0.0).sqrt() as f32)
                .map(|std| if std > 1e-6 { std } else { 1.0 })
                .collect(),
        }
    }

    pub fn apply<'a>(&'a self, row: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
        row.iter()
            .zip(self.mean.iter().zip(&self.std))
            .map(|(value, (mean, std))| (value - mean) / std)
    }

    /// The dataset with every row normalized, once, so training steps only gather rows.
    pub fn normalize(&self, dataset: &Dataset) -> Dataset {
        let mut normalized = dataset.clone();
        for (index, row) in normalized.features.chunks_exact_mut(dataset.columns.max(1)).enumerate() {
            for (value, scaled) in row.iter_mut().zip(self.apply(dataset.row(index))) {
                *value = scaled;
            }
        }
        normalized
    }
}

/// Reads a CSV with a header row. Every column but `label` must hold numbers; `label` holds class
/// numbers 0, 1, 2, … for classification, or any number for regression.
pub fn load_csv(path: &Path, label: &str, task: Task) -> Result<Dataset, TrainError> {
    let file = std::fs::File::open(path)
        .map_err(|error| TrainError::InvalidInput(format!("cannot read dataset {}: {error}", path.display())))?;
    let mut reader = csv::Reader::from_reader(std::io::BufReader::new(file));
    let headers: Vec<String> = reader
        .headers()
        .map_err(|error| TrainError::InvalidInput(format!("dataset {}: {error}", path.display())))?
        .iter()
        .map(str::to_string)
        .collect();
    let label_index = headers.iter().position(|name| name == label).ok_or_else(|| {
        TrainError::InvalidInput(format!(
            "label column '{label}' is not in dataset {} (has: {})",
            path.display(),
            headers.join(", ")
        ))
    })?;
    let feature_names: Vec<String> = headers
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != label_index)
        .map(|(_, name)| name.clone())
        .collect();
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut targets = Vec::new();
    for (line, record) in reader.records().enumerate() {
        let record =
            record.map_err(|error| TrainError::InvalidInput(format!("dataset {}: {error}", path.display())))?;
        for (index, cell) in record.iter().enumerate() {
            // The header is line 1.
            let at = || {
                format!(
                    "dataset {} line {} column '{}'",
                    path.display(),
                    line + 2,
                    headers[index]
                )
            };
            if index == label_index && task == Task::Regression {
                let target: f32 = cell
                    .trim()
                    .parse()
                    .ok()
                    .filter(|value: &f32| value.is_finite())
                    .ok_or_else(|| {
                        TrainError::InvalidInput(format!("{}: target {cell:?} is not a finite number", at()))
                    })?;
                targets.push(target);
            } else if index == label_index {
                let class: u32 = cell.trim().parse().map_err(|_| {
                    TrainError::InvalidInput(format!("{}: label {cell:?} is not a class number (0, 1, 2, …)", at()))
                })?;
                labels.push(class);
                targets.push(class as f32);
            } else {
                let value: f32 = cell
                    .trim()
                    .parse()
                    .map_err(|_| TrainError::InvalidInput(format!("{}: {cell:?} is not a number", at())))?;
                features.push(value);
            }
        }
    }
    finish(path, feature_names, features, labels, targets, task)
}

/// Checks that the rows can train a model of `task` and assembles the dataset.
fn finish(
    path: &Path,
    feature_names: Vec<String>,
    features: Vec<f32>,
    labels: Vec<u32>,
    targets: Vec<f32>,
    task: Task,
) -> Result<Dataset, TrainError> {
    // One NaN or infinity would spoil its column's normalization and then every step's loss.
    if let Some(position) = features.iter().position(|value| !value.is_finite()) {
        let columns = feature_names.len().max(1);
        return Err(TrainError::InvalidInput(format!(
            "dataset {} row {} column '{}': {} is not a finite number",
            path.display(),
            position / columns + 1,
            feature_names.get(position % columns).map_or("?", String::as_str),
            features[position]
        )));
    }
    if task == Task::Regression {
        if targets.len() < 2 {
            return Err(TrainError::InvalidInput(format!(
                "dataset {} has {} rows; regression needs at least 2",
                path.display(),
                targets.len()
            )));
        }
        return Ok(Dataset {
            columns: feature_names.len(),
            feature_names,
            features,
            labels,
            targets,
            classes: 1,
            task,
        });
    }
    let classes = labels.iter().max().map_or(0, |max| *max as usize + 1);
    if labels.is_empty() || classes < 2 {
        return Err(TrainError::InvalidInput(format!(
            "dataset {} has {} rows and {classes} classes; a classifier needs rows of at least 2 classes",
            path.display(),
            labels.len()
        )));
    }
    Ok(Dataset {
        columns: feature_names.len(),
        feature_names,
        features,
        labels,
        targets,
        classes,
        task,
    })
}

/// Reads a dataset, choosing the format by the file's extension: `.parquet` (or `.pq`) or CSV.
pub fn load_dataset(path: &Path, label: &str, task: Task) -> Result<Dataset, TrainError> {
    let extension = path
        .extension()
        .and_then(|extension| extension.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("parquet" | "pq") => load_parquet(path, label, task),
        _ => load_csv(path, label, task),
    }
}

/// Reads a Parquet file (any compression, any number of row groups). Feature columns may be any integer,
/// float or decimal type, cast to f32; the label is an integer class number for classification or any
/// number for regression. Nulls are refused with the column and row that hold one.
pub fn load_parquet(path: &Path, label: &str, task: Task) -> Result<Dataset, TrainError> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type};
    use arrow_schema::DataType;

    let invalid = |message: String| TrainError::InvalidInput(format!("dataset {}: {message}", path.display()));
    let file = std::fs::File::open(path)
        .map_err(|error| TrainError::InvalidInput(format!("cannot read dataset {}: {error}", path.display())))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|error| invalid(format!("not a readable Parquet file: {error}")))?;
    let schema = builder.schema().clone();
    let headers: Vec<&str> = schema.fields().iter().map(|field| field.name().as_str()).collect();
    let label_index = headers.iter().position(|name| *name == label).ok_or_else(|| {
        TrainError::InvalidInput(format!(
            "label column '{label}' is not in dataset {} (has: {})",
            path.display(),
            headers.join(", ")
        ))
    })?;
    for field in schema.fields() {
        let numeric = field.data_type().is_numeric();
        if !numeric {
            return Err(invalid(format!(
                "column '{}' has type {}; expected numbers (integers, floats or decimals)",
                field.name(),
                field.data_type()
            )));
        }
        if field.name() == label && task == Task::Classification && !field.data_type().is_integer() {
            return Err(invalid(format!(
                "label column '{label}' has type {}; classification expects integer class numbers (0, 1, 2, …)",
                field.data_type()
            )));
        }
    }
    let feature_names: Vec<String> = headers
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != label_index)
        .map(|(_, name)| name.to_string())
        .collect();
    let reader = builder
        .with_batch_size(8192)
        .build()
        .map_err(|error| invalid(error.to_string()))?;
    let (mut features, mut labels, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows_before = 0usize;
    for batch in reader {
        let batch = batch.map_err(|error| invalid(error.to_string()))?;
        let rows = batch.num_rows();
        let mut columns = Vec::with_capacity(batch.num_columns());
        for (index, column) in batch.columns().iter().enumerate() {
            if let Some(row) = (0..rows).find(|row| column.is_null(*row)) {
                return Err(invalid(format!(
                    "column '{}' is null in row {}; expected a value in every row",
                    headers[index],
                    rows_before + row + 1
                )));
            }
            let target = if index == label_index && task == Task::Classification {
                DataType::Int64
            } else {
                DataType::Float64
            };
            // Unsafe casts fail instead of turning values that do not fit (a UInt64 label above i64::MAX)
            // into nulls.
            let options = arrow_cast::CastOptions {
                safe: false,
                ..Default::default()
            };
            let cast = arrow_cast::cast_with_options(column, &target, &options)
                .map_err(|error| invalid(format!("column '{}': {error}", headers[index])))?;
            columns.push(cast);
        }
        let label_column = &columns[label_index];
        if task == Task::Classification {
            for (row, class) in label_column.as_primitive::<Int64Type>().values().iter().enumerate() {
                let class = u32::try_from(*class).map_err(|_| {
                    invalid(format!(
                        "row {} column '{label}': label {class} is not a class number (0, 1, 2, …)",
                        rows_before + row + 1
                    ))
                })?;
                labels.push(class);
                targets.push(class as f32);
            }
        } else {
            for (row, target) in label_column.as_primitive::<Float64Type>().values().iter().enumerate() {
                if !target.is_finite() {
                    return Err(invalid(format!(
                        "row {} column '{label}': target {target} is not a finite number",
                        rows_before + row + 1
                    )));
                }
                targets.push(*target as f32);
            }
        }
        let feature_columns: Vec<&[f64]> = columns
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != label_index)
            .map(|(_, column)| column.as_primitive::<Float64Type>().values().as_ref())
            .collect();
        features.reserve(rows * feature_columns.len());
        for row in 0..rows {
            features.extend(feature_columns.iter().map(|column| column[row] as f32));
        }
        rows_before += rows;
    }
    finish(path, feature_names, features, labels, targets, task)
}

/// One feature's statistics over the rows a model was trained on, with a histogram: what drift detection
/// compares serving traffic against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureProfile {
    pub name: String,
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// `bins + 1` increasing edges from `min` to `max`; the last bin includes `max`.
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

/// The training data profile registered with a model: every feature's statistics and histogram, and the
/// label's distribution (class counts, or the target's statistics for regression).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataProfile {
    pub rows: usize,
    pub features: Vec<FeatureProfile>,
    pub label: FeatureProfile,
    /// Rows per class (classification; empty for regression).
    pub class_counts: Vec<u64>,
}

/// The values of column `column` of `dataset`: a feature, or the label (`column == dataset.columns`),
/// finite ones only.
fn column_values(dataset: &Dataset, column: usize) -> impl Iterator<Item = f64> + '_ {
    let label = column == dataset.columns;
    (0..dataset.rows())
        .map(move |row| {
            if label {
                f64::from(dataset.targets[row])
            } else {
                f64::from(dataset.features[row * dataset.columns + column])
            }
        })
        .filter(|value| value.is_finite())
}

/// `bins + 1` equal-width edges from `min` to `max`, and the bin of each value (the last includes `max`).
struct Bins {
    min: f64,
    width: f64,
    bins: usize,
}

impl Bins {
    fn new(min: f64, max: f64, bins: usize) -> Bins {
        let bins = bins.max(1);
        Bins {
            min,
            width: (max - min) / bins as f64,
            bins,
        }
    }

    fn edges(&self) -> Vec<f64> {
        (0..=self.bins)
            .map(|index| self.min + self.width * index as f64)
            .collect()
    }

    fn of(&self, value: f64) -> usize {
        if self.width > 0.0 {
            (((value - self.min) / self.width) as usize).min(self.bins - 1)
        } else {
            0
        }
    }
}

/// The profile of `dataset`'s rows, histograms with `bins` equal-width bins.
pub fn profile(dataset: &Dataset, label: &str, bins: usize) -> DataProfile {
    profile_with(dataset, label, bins, &mut |local| Ok(vec![local.to_vec()])).expect("one rank gathers nothing")
}

/// The profile of every rank's shard together, as [`profile`] gives for all their rows in one dataset (up
/// to the rounding of sums): each rank's statistics are gathered from every rank in two rounds (moments,
/// then histograms over the global range), exact in f64. Every rank of a sharded run calls it.
pub fn profile_of_shards(
    dataset: &Dataset,
    label: &str,
    bins: usize,
    communicator: &mut dyn Communicator,
) -> Result<DataProfile, CollectiveError> {
    profile_with(dataset, label, bins, &mut |local| {
        let world = communicator.world_size() as usize;
        // f64s travel as pairs of f32 bit patterns: an all-gather moves bytes without arithmetic.
        let mut all = vec![0.0f64; local.len() * world];
        communicator.all_gather(bytemuck::cast_slice(local), bytemuck::cast_slice_mut(&mut all))?;
        Ok(all.chunks_exact(local.len().max(1)).map(<[f64]>::to_vec).collect())
    })
}

/// Every rank's vector, in rank order, for the vector this rank passes.
type Gather<'a> = dyn FnMut(&[f64]) -> Result<Vec<Vec<f64>>, CollectiveError> + 'a;

/// [`profile`] with `gather` giving every rank's vector of local sums for the vector this rank passes.
fn profile_with(
    dataset: &Dataset,
    label: &str,
    bins: usize,
    gather: &mut Gather<'_>,
) -> Result<DataProfile, CollectiveError> {
    let columns = dataset.columns + 1;
    // Round 1: rows, classes, and each column's count, sum, minimum and maximum.
    let mut local = vec![dataset.rows() as f64, dataset.classes as f64];
    for column in 0..columns {
        let (mut count, mut sum, mut min, mut max) = (0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY);
        for value in column_values(dataset, column) {
            count += 1.0;
            sum += value;
            min = min.min(value);
            max = max.max(value);
        }
        local.extend([count, sum, min, max]);
    }
    let ranks = gather(&local)?;
    let total = |index: usize| ranks.iter().map(|rank| rank[index]).sum::<f64>();
    let rows = total(0) as usize;
    let classes = ranks.iter().map(|rank| rank[1] as usize).max().unwrap_or(1);
    struct Moments {
        count: usize,
        mean: f64,
        min: f64,
        max: f64,
    }
    let moments: Vec<Moments> = (0..columns)
        .map(|column| {
            let at = 2 + 4 * column;
            let count = total(at);
            Moments {
                count: count as usize,
                mean: if count > 0.0 { total(at + 1) / count } else { 0.0 },
                min: ranks.iter().map(|rank| rank[at + 2]).fold(f64::INFINITY, f64::min),
                max: ranks.iter().map(|rank| rank[at + 3]).fold(f64::NEG_INFINITY, f64::max),
            }
        })
        .collect();

    // Round 2: each column's squared deviations from the global mean and its histogram over the global
    // range, then the class counts.
    let bins = bins.max(1);
    let mut local = Vec::with_capacity(columns * (1 + bins) + classes);
    for (column, moments) in moments.iter().enumerate() {
        let mut counts = vec![0.0f64; bins];
        let mut squares = 0.0;
        if moments.count > 0 {
            let binning = Bins::new(moments.min, moments.max, bins);
            for value in column_values(dataset, column) {
                squares += (value - moments.mean) * (value - moments.mean);
                counts[binning.of(value)] += 1.0;
            }
        }
        local.push(squares);
        local.extend(counts);
    }
    let mut class_counts = vec![
        0.0f64;
        if dataset.task == Task::Classification {
            classes
        } else {
            0
        }
    ];
    for label in &dataset.labels {
        if let Some(count) = class_counts.get_mut(*label as usize) {
            *count += 1.0;
        }
    }
    local.extend(&class_counts);
    let ranks = gather(&local)?;
    let total = |index: usize| ranks.iter().map(|rank| rank[index]).sum::<f64>();

    let mut profiles: Vec<FeatureProfile> = moments
        .iter()
        .enumerate()
        .map(|(column, moments)| {
            let name = dataset
                .feature_names
                .get(column)
                .map_or(label, String::as_str)
                .to_string();
            if moments.count == 0 {
                return FeatureProfile {
                    name,
                    count: 0,
                    mean: 0.0,
                    std: 0.0,
                    min: 0.0,
                    max: 0.0,
                    edges: Vec::new(),
                    counts: Vec::new(),
                };
            }
            let at = column * (1 + bins);
            FeatureProfile {
                name,
                count: moments.count,
                mean: moments.mean,
                std: (total(at) / moments.count as f64).sqrt(),
                min: moments.min,
                max: moments.max,
                edges: Bins::new(moments.min, moments.max, bins).edges(),
                counts: (0..bins).map(|bin| total(at + 1 + bin) as u64).collect(),
            }
        })
        .collect();
    let label = profiles.pop().expect("the label column");
    let classes_at = columns * (1 + bins);
    Ok(DataProfile {
        rows,
        features: profiles,
        label,
        class_counts: (0..class_counts.len())
            .map(|class| total(classes_at + class) as u64)
            .collect(),
    })
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    #[test]
    fn a_profile_counts_every_row_into_one_bin_and_matches_the_hand_computed_statistics() {
        let dataset = Dataset {
            feature_names: vec!["a".into(), "b".into()],
            // Rows (a, b): (0, 5), (1, 5), (2, 5), (3, 5), (4, 5).
            features: vec![0.0, 5.0, 1.0, 5.0, 2.0, 5.0, 3.0, 5.0, 4.0, 5.0],
            labels: vec![0, 1, 1, 2, 1],
            targets: vec![0.0, 1.0, 1.0, 2.0, 1.0],
            columns: 2,
            classes: 3,
            task: Task::Classification,
        };
        let profile = profile(&dataset, "y", 4);
        assert_eq!(profile.rows, 5);
        let a = &profile.features[0];
        assert_eq!((a.count, a.mean, a.min, a.max), (5, 2.0, 0.0, 4.0));
        assert!((a.std - 2f64.sqrt()).abs() < 1e-12, "population std of 0..4");
        assert_eq!(a.edges, [0.0, 1.0, 2.0, 3.0, 4.0]);
        // 4.0 is the maximum: it goes in the last bin, with 3.0.
        assert_eq!(a.counts, [1, 1, 1, 2]);
        let b = &profile.features[1];
        assert_eq!(
            (b.std, b.counts.iter().sum::<u64>()),
            (0.0, 5),
            "a constant feature has one full bin"
        );
        assert_eq!(profile.class_counts, [1, 3, 1]);
        assert_eq!(profile.label.name, "y");
    }
}
