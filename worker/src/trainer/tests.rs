//! Data-parallel training against single-process training, and the digits MLP end to end, with the
//! ranks as threads joined by the real TCP ring.

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use super::*;
use crate::collective::{CollectiveConfig, RingCommunicator};

/// The settings the tests share; each test names only what it changes.
fn base_config() -> TrainConfig {
    TrainConfig {
        device: ComputeDevice::Cpu,
        image: None,
        hidden: vec![16],
        epochs: 1,
        batch_size: 32,
        learning_rate: 1e-2,
        seed: 0,
        validation_fraction: 0.2,
        optimizer: OptimizerKind::Adam,
        momentum: 0.0,
        weight_decay: 0.0,
        log_every_steps: 0,
        max_steps: None,
        checkpoint: None,
        sharded: false,
    }
}

/// Runs `train` on `world` ranks (threads); returns each rank's outcome in rank order.
fn train_on(world: u32, config: TrainConfig, dataset: Arc<Dataset>) -> Vec<TrainOutcome> {
    try_train_on(world, config, dataset)
        .into_iter()
        .map(|outcome| outcome.unwrap())
        .collect()
}

/// [`train_on`], keeping each rank's error.
fn try_train_on(world: u32, config: TrainConfig, dataset: Arc<Dataset>) -> Vec<Result<TrainOutcome, String>> {
    try_train_shards(config, vec![dataset; world as usize])
}

/// Trains `config` with one rank per dataset, rank r given `datasets[r]`; each rank's outcome or error.
fn try_train_shards(config: TrainConfig, datasets: Vec<Arc<Dataset>>) -> Vec<Result<TrainOutcome, String>> {
    let world = datasets.len() as u32;
    on_ring(world, move |rank, communicator| {
        train(
            &config,
            &datasets[rank as usize],
            communicator,
            |line| eprintln!("rank {rank}: {line}"),
            |_| {},
        )
        .map(|(_, outcome)| outcome)
        .map_err(|error| error.to_string())
    })
}

/// Runs `work` on `world` ranks (threads) joined by the TCP ring; each rank's result in rank order.
fn on_ring<T: Send + 'static>(
    world: u32,
    work: impl Fn(u32, &mut RingCommunicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let addresses = Arc::new(Mutex::new(vec![String::new(); world as usize]));
    let published = Arc::new(Barrier::new(world as usize));
    let work = Arc::new(work);
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let (addresses, published, work) = (addresses.clone(), published.clone(), work.clone());
            std::thread::spawn(move || {
                let (listener, address) = RingCommunicator::bind("127.0.0.1").unwrap();
                addresses.lock().unwrap()[rank as usize] = address.to_string();
                published.wait();
                let all = addresses.lock().unwrap().clone();
                let collective = CollectiveConfig {
                    timeout: Duration::from_secs(60),
                    ..CollectiveConfig::default()
                };
                let mut communicator = RingCommunicator::connect(listener, rank, &all, 1, collective).unwrap();
                work(rank, &mut communicator)
            })
        })
        .collect();
    threads.into_iter().map(|thread| thread.join().unwrap()).collect()
}

/// Trains `config` on the blobs three times with 2 ranks: uninterrupted; with checkpoints (every
/// `every_epochs` epochs and `every_steps` steps) and stopped early by `stop`; and resumed from those
/// checkpoints to the end. Returns rank 0's outcome of each run.
fn interrupt_and_resume(
    config: TrainConfig,
    every_epochs: u32,
    every_steps: Option<u32>,
    stop: impl FnOnce(TrainConfig) -> TrainConfig,
) -> (TrainOutcome, TrainOutcome, TrainOutcome) {
    let directory = std::env::temp_dir().join(format!(
        "kiln-checkpoint-{}-{every_epochs}-{every_steps:?}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&directory);
    let dataset = Arc::new(blobs());
    let uninterrupted = train_on(2, config.clone(), dataset.clone()).remove(0);
    let checkpointed = TrainConfig {
        checkpoint: Some(CheckpointConfig {
            directory: directory.clone(),
            every_epochs,
            every_steps,
        }),
        ..config
    };
    let stopped = train_on(2, stop(checkpointed.clone()), dataset.clone()).remove(0);
    let resumed = train_on(2, checkpointed, dataset).remove(0);
    std::fs::remove_dir_all(&directory).unwrap();
    (uninterrupted, stopped, resumed)
}

/// Three separable blobs in 8 dimensions, 301 rows (an odd count, so batches split unevenly).
fn blobs() -> Dataset {
    let rows = 301;
    let columns = 8;
    let mut features = Vec::with_capacity(rows * columns);
    let mut labels = Vec::with_capacity(rows);
    for row in 0..rows {
        let class = (row % 3) as u32;
        for column in 0..columns {
            let jitter = ((row * 31 + column * 17) % 23) as f32 / 23.0 - 0.5;
            features.push(class as f32 * if column % 2 == 0 { 1.0 } else { -1.0 } + jitter);
        }
        labels.push(class);
    }
    Dataset {
        feature_names: (0..columns).map(|column| format!("f{column}")).collect(),
        features,
        targets: labels.iter().map(|label| *label as f32).collect(),
        labels,
        columns,
        classes: 3,
        task: Task::Classification,
    }
}

#[test]
fn two_ranks_follow_one_rank_with_the_same_global_batch() {
    let config = TrainConfig {
        hidden: vec![16],
        // 241 training rows make 8 batches of 33 per epoch: the 10 steps cross an epoch boundary.
        epochs: 2,
        batch_size: 33,
        learning_rate: 1e-2,
        seed: 7,
        optimizer: OptimizerKind::Sgd,
        max_steps: Some(10),
        ..base_config()
    };
    let dataset = Arc::new(blobs());
    for optimizer in [OptimizerKind::Sgd, OptimizerKind::Adam] {
        let config = TrainConfig {
            optimizer,
            ..config.clone()
        };
        let single = train_on(1, config.clone(), dataset.clone()).remove(0);
        let parallel = train_on(2, config, dataset.clone());
        assert_eq!(single.steps, 10);
        assert_eq!(
            parallel[0].parameters_hash, parallel[1].parameters_hash,
            "{optimizer:?}: every rank holds identical parameters"
        );
        let largest = single
            .parameters
            .iter()
            .fold(0.0f32, |largest, value| largest.max(value.abs()));
        for (index, (one, two)) in single.parameters.iter().zip(&parallel[0].parameters).enumerate() {
            assert!(
                (one - two).abs() <= 1e-4 * largest.max(1.0),
                "{optimizer:?}: parameter {index} is {one} with 1 rank and {two} with 2 ranks"
            );
        }
    }
}

#[test]
fn the_digits_mlp_reaches_95_percent_with_two_ranks() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/digits.csv");
    let dataset = Arc::new(load_csv(&path, "digit", Task::Classification).unwrap());
    assert_eq!((dataset.rows(), dataset.columns, dataset.classes), (1797, 64, 10));
    let config = TrainConfig {
        hidden: vec![256, 256],
        epochs: 20,
        batch_size: 128,
        learning_rate: 1e-3,
        seed: 42,
        ..base_config()
    };
    let outcomes = train_on(2, config.clone(), dataset.clone());
    let last = outcomes[0].epochs.last().unwrap();
    assert!(last.validation >= 0.95, "validation accuracy {}", last.validation);
    assert_eq!(outcomes[0].parameters_hash, outcomes[1].parameters_hash);
    check_saved_model(&config, &dataset, &outcomes[0]);
}

/// Saves rank 0's model as `kiln task train` does and loads it back as serving does: its predictions on
/// the raw (unnormalized) validation rows score what training reported, and damaged weights are refused.
fn check_saved_model(config: &TrainConfig, dataset: &Dataset, outcome: &TrainOutcome) {
    let last = outcome.epochs.last().unwrap();
    let directory = tempfile::tempdir().unwrap();
    let manifest = SavedManifest {
        format: SAVED_FORMAT.into(),
        model: if config.image.is_some() { "cnn" } else { "mlp" }.into(),
        inputs: dataset.columns,
        image: config.image,
        hidden: config.hidden.clone(),
        classes: outcome.classes,
        feature_names: dataset.feature_names.clone(),
        label: "digit".into(),
        normalization: outcome.normalization.clone(),
        parameters: outcome.parameters.len(),
        parameters_hash: format!("{:016x}", outcome.parameters_hash),
        task: "classification".into(),
        validation_metric: last.validation_name.into(),
        validation: last.validation,
        job_id: 1,
        attempt: 0,
    };
    save(directory.path(), &manifest, &outcome.parameters).unwrap();
    let loaded = SavedModel::load(directory.path()).unwrap();
    // JSON keeps the validation metric to within an ulp (serde_json's default float parsing).
    assert!((loaded.manifest.validation - manifest.validation).abs() < 1e-12);
    let validation = manifest.validation;
    assert_eq!(
        SavedManifest {
            validation,
            ..loaded.manifest.clone()
        },
        manifest
    );
    let split = dataset.split(config.validation_fraction, config.seed).unwrap();
    let features: Vec<f32> = split
        .validation
        .iter()
        .flat_map(|row| dataset.row(*row).to_vec())
        .collect();
    let logits = loaded.predict(&features, split.validation.len());
    let correct = logits
        .chunks_exact(outcome.classes)
        .zip(&split.validation)
        .filter(|(logits, row)| {
            let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            best == dataset.labels[**row] as usize
        })
        .count();
    let rows = split.validation.len() as f64;
    let accuracy = correct as f64 / rows;
    // Inference runs without autodiff; a near tie may fall the other way for a row, no more.
    assert!(
        (accuracy - last.validation).abs() <= 1.0 / rows + 1e-9,
        "the loaded model scores {accuracy}; training reported {}",
        last.validation
    );
    let weights = directory.path().join("weights.bin");
    std::fs::write(&weights, vec![0u8; outcome.parameters.len() * 4]).unwrap();
    let error = SavedModel::load(directory.path()).unwrap_err().to_string();
    assert!(error.contains("weights.bin does not hash to"), "{error}");
    std::fs::write(&weights, [0u8; 8]).unwrap();
    let error = SavedModel::load(directory.path()).unwrap_err().to_string();
    assert!(error.contains("weights.bin has 8 bytes"), "{error}");
}

/// The rows of `dataset` that `keep` selects, as a dataset of their own (a shard).
fn rows_where(dataset: &Dataset, keep: impl Fn(usize) -> bool) -> Dataset {
    let rows: Vec<usize> = (0..dataset.rows()).filter(|row| keep(*row)).collect();
    let labels = if dataset.labels.is_empty() {
        Vec::new()
    } else {
        rows.iter().map(|row| dataset.labels[*row]).collect()
    };
    let classes = labels.iter().max().map_or(dataset.classes, |max| *max as usize + 1);
    Dataset {
        feature_names: dataset.feature_names.clone(),
        features: rows.iter().flat_map(|row| dataset.row(*row).to_vec()).collect(),
        targets: rows.iter().map(|row| dataset.targets[*row]).collect(),
        labels,
        columns: dataset.columns,
        classes,
        task: dataset.task,
    }
}

#[test]
fn sharded_ranks_agree_on_classes_and_statistics_and_learn_the_digits() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/digits.csv");
    let digits = load_csv(&path, "digit", Task::Classification).unwrap();
    // Uneven shards, and rank 0's holds no 9s: only rank 1 knows there are 10 classes.
    let first = rows_where(&digits, |row| row < 1000 && digits.labels[row] != 9);
    let second = rows_where(&digits, |row| row >= 1000 || digits.labels[row] == 9);
    assert_eq!((first.classes, second.classes), (9, 10));
    let config = TrainConfig {
        hidden: vec![256, 256],
        epochs: 20,
        batch_size: 128,
        learning_rate: 1e-3,
        seed: 42,
        sharded: true,
        ..base_config()
    };
    let outcomes: Vec<TrainOutcome> = try_train_shards(config.clone(), vec![Arc::new(first), Arc::new(second)])
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(outcomes[0].parameters_hash, outcomes[1].parameters_hash);
    assert_eq!((outcomes[0].classes, outcomes[1].classes), (10, 10));
    assert_eq!(outcomes[0].normalization, outcomes[1].normalization);
    // Both ranks report the same metrics, over every shard's rows.
    let (last, other) = (outcomes[0].epochs.last().unwrap(), outcomes[1].epochs.last().unwrap());
    assert_eq!(last.validation, other.validation);
    assert!(last.validation >= 0.95, "validation accuracy {}", last.validation);

    // The statistics are those of the shards' training rows together: the same shards as one dataset give
    // the same means (the validation split differs, so within a tolerance).
    let mean = |normalization: &Normalization| normalization.mean.iter().map(|value| f64::from(*value)).sum::<f64>();
    let whole = Normalization::of(&digits, &(0..digits.rows()).collect::<Vec<_>>());
    assert!(
        (mean(&outcomes[0].normalization) - mean(&whole)).abs() < 0.05 * mean(&whole).abs(),
        "{:?} against {:?}",
        outcomes[0].normalization.mean,
        whole.mean
    );

    // Shards whose columns differ are refused on every rank, naming both.
    let narrow = Dataset {
        feature_names: digits.feature_names[..63].to_vec(),
        features: digits
            .features
            .chunks_exact(64)
            .flat_map(|row| row[..63].to_vec())
            .collect(),
        columns: 63,
        ..digits.clone()
    };
    let errors = try_train_shards(
        TrainConfig { epochs: 1, ..config },
        vec![Arc::new(digits.clone()), Arc::new(narrow)],
    );
    for error in errors {
        let error = error.unwrap_err();
        assert!(
            error.contains("rank 0 has 64 feature columns, rank 1 has 63"),
            "{error}"
        );
    }
}

#[test]
fn the_profile_of_shards_is_the_profile_of_all_their_rows() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/digits.csv");
    let digits = load_csv(&path, "digit", Task::Classification).unwrap();
    let whole = profile(&digits, "digit", 10);
    // Three uneven shards; the first has no 9s and the last no 0s, so no rank alone knows every class
    // or every column's range.
    let shards = Arc::new(vec![
        rows_where(&digits, |row| row < 500 && digits.labels[row] != 9),
        rows_where(&digits, |row| {
            (500..1200).contains(&row) || (row < 500 && digits.labels[row] == 9)
        }),
        rows_where(&digits, |row| row >= 1200 && digits.labels[row] != 0),
        rows_where(&digits, |row| row >= 1200 && digits.labels[row] == 0),
    ]);
    let merged = on_ring(4, move |rank, communicator| {
        profile_of_shards(&shards[rank as usize], "digit", 10, communicator).unwrap()
    });
    for profile in &merged {
        assert_eq!(profile.rows, whole.rows);
        assert_eq!(profile.class_counts, whole.class_counts);
        for (merged, whole) in profile
            .features
            .iter()
            .chain([&profile.label])
            .zip(whole.features.iter().chain([&whole.label]))
        {
            assert_eq!(merged.name, whole.name);
            assert_eq!(
                (merged.count, merged.min, merged.max, &merged.edges, &merged.counts),
                (whole.count, whole.min, whole.max, &whole.edges, &whole.counts),
                "{}",
                whole.name
            );
            assert!(
                (merged.mean - whole.mean).abs() <= 1e-12 * whole.mean.abs().max(1.0),
                "{}",
                whole.name
            );
            assert!(
                (merged.std - whole.std).abs() <= 1e-9 * whole.std.max(1.0),
                "{}",
                whole.name
            );
        }
    }
    assert_eq!(merged[0], merged[3], "every rank has the same profile");
    // A shard's own profile is not the whole's: rank 0's alone misses the 9s.
    assert_ne!(
        profile(
            &rows_where(&digits, |row| row < 500 && digits.labels[row] != 9),
            "digit",
            10
        )
        .class_counts,
        whole.class_counts
    );
}

#[test]
fn bad_datasets_are_refused_with_the_reason() {
    let directory = std::env::temp_dir().join(format!("kiln-trainer-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let file = directory.join("bad.csv");
    std::fs::write(&file, "a,b,label\n1,2,0\n3,x,1\n").unwrap();
    let error = load_csv(&file, "label", Task::Classification).unwrap_err().to_string();
    assert!(
        error.contains("line 3 column 'b'") && error.contains("\"x\" is not a number"),
        "{error}"
    );
    let error = load_csv(&file, "class", Task::Classification).unwrap_err().to_string();
    assert!(
        error.contains("label column 'class' is not in") && error.contains("a, b, label"),
        "{error}"
    );
    let error = load_csv(&directory.join("missing.csv"), "label", Task::Classification)
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot read dataset"), "{error}");
    std::fs::remove_dir_all(&directory).unwrap();
}

/// Writes `columns` as a Parquet file compressed with zstd, in row groups of 500 rows.
fn write_parquet(path: &std::path::Path, columns: Vec<(&str, arrow_array::ArrayRef)>) {
    let batch = arrow_array::RecordBatch::try_from_iter(columns).unwrap();
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_max_row_group_row_count(Some(500))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(properties)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_datasets_load_like_their_csv() {
    use arrow_array::{ArrayRef, Float32Array, Float64Array, Int32Array, Int64Array, StringArray};
    let csv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/digits.csv");
    let expected = load_csv(&csv, "digit", Task::Classification).unwrap();
    let directory = tempfile::tempdir().unwrap();
    // The pixels as a mix of integer and float columns, the label in the middle.
    let mut columns: Vec<(&str, ArrayRef)> = Vec::new();
    for (index, name) in expected.feature_names.iter().enumerate() {
        let values = (0..expected.rows()).map(|row| expected.row(row)[index]);
        let column: ArrayRef = if index % 2 == 0 {
            Arc::new(Int32Array::from_iter_values(values.map(|value| value as i32)))
        } else {
            Arc::new(Float32Array::from_iter_values(values))
        };
        columns.push((name.as_str(), column));
        if index == 31 {
            let labels = expected.labels.iter().map(|label| i64::from(*label));
            columns.push(("digit", Arc::new(Int64Array::from_iter_values(labels))));
        }
    }
    let path = directory.path().join("digits.parquet");
    write_parquet(&path, columns);
    let loaded = load_dataset(&path, "digit", Task::Classification).unwrap();
    assert_eq!(loaded.feature_names, expected.feature_names);
    assert_eq!(loaded.features, expected.features);
    assert_eq!(loaded.labels, expected.labels);
    assert_eq!((loaded.rows(), loaded.columns, loaded.classes), (1797, 64, 10));

    let bad = directory.path().join("bad.parquet");
    let text: ArrayRef = Arc::new(StringArray::from(vec!["a", "b"]));
    write_parquet(
        &bad,
        vec![("name", text), ("label", Arc::new(Int64Array::from(vec![0, 1])))],
    );
    let error = load_dataset(&bad, "label", Task::Classification)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("column 'name' has type Utf8; expected numbers"),
        "{error}"
    );
    let gap: ArrayRef = Arc::new(Float64Array::from(vec![Some(1.0), None, Some(3.0)]));
    write_parquet(
        &bad,
        vec![("x", gap), ("label", Arc::new(Int64Array::from(vec![0, 1, 0])))],
    );
    let error = load_dataset(&bad, "label", Task::Classification)
        .unwrap_err()
        .to_string();
    assert!(error.contains("column 'x' is null in row 2"), "{error}");
    let x: ArrayRef = Arc::new(Float64Array::from(vec![1.0, 2.0]));
    write_parquet(
        &bad,
        vec![
            ("x", x.clone()),
            ("label", Arc::new(Float64Array::from(vec![0.5, 1.5]))),
        ],
    );
    let error = load_dataset(&bad, "label", Task::Classification)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("classification expects integer class numbers"),
        "{error}"
    );
    let regression = load_dataset(&bad, "label", Task::Regression).unwrap();
    assert_eq!(
        (regression.targets.clone(), regression.features.clone()),
        (vec![0.5, 1.5], vec![1.0, 2.0])
    );
    let error = load_dataset(&bad, "y", Task::Regression).unwrap_err().to_string();
    assert!(
        error.contains("label column 'y' is not in") && error.contains("x, label"),
        "{error}"
    );
    let nan: ArrayRef = Arc::new(Float64Array::from(vec![1.0, f64::NAN]));
    let upper = directory.path().join("BAD.PARQUET");
    write_parquet(
        &upper,
        vec![("x", nan), ("label", Arc::new(Int64Array::from(vec![0, 1])))],
    );
    let error = load_dataset(&upper, "label", Task::Classification)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("row 2 column 'x': NaN is not a finite number"),
        "{error}"
    );
    std::fs::write(&bad, "not parquet").unwrap();
    let error = load_dataset(&bad, "label", Task::Regression).unwrap_err().to_string();
    assert!(error.contains("not a readable Parquet file"), "{error}");
}

#[test]
fn a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_run_does() {
    let config = TrainConfig {
        hidden: vec![16],
        epochs: 6,
        batch_size: 32,
        learning_rate: 1e-2,
        seed: 3,
        ..base_config()
    };
    // Stopped after 3 epochs (with a checkpoint after each), then resumed by a new group.
    let (uninterrupted, stopped, resumed) =
        interrupt_and_resume(config, 1, None, |config| TrainConfig { epochs: 3, ..config });
    assert_eq!(stopped.epochs.len(), 3);
    assert_eq!(
        resumed.epochs.first().map(|epoch| epoch.epoch),
        Some(4),
        "it went on from epoch 4"
    );
    assert_eq!(resumed.steps, uninterrupted.steps);
    assert_eq!(
        resumed.parameters_hash, uninterrupted.parameters_hash,
        "parameters, optimizer state and data order all resumed exactly"
    );
}

#[test]
fn regression_learns_a_smooth_target_with_two_ranks() {
    // y = 3·x0 − 2·x1 + x2·x3 over 600 rows: an MLP should get well under the target's spread.
    let rows = 600;
    let columns = 4;
    let mut features = Vec::with_capacity(rows * columns);
    let mut targets = Vec::with_capacity(rows);
    for row in 0..rows {
        let x: Vec<f32> = (0..columns)
            .map(|column| (((row * 7919 + column * 104_729) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        targets.push(3.0 * x[0] - 2.0 * x[1] + x[2] * x[3]);
        features.extend(x);
    }
    let spread = {
        let mean = targets.iter().sum::<f32>() / rows as f32;
        (targets.iter().map(|value| (value - mean).powi(2)).sum::<f32>() / rows as f32).sqrt()
    };
    let dataset = Arc::new(Dataset {
        feature_names: (0..columns).map(|column| format!("x{column}")).collect(),
        features,
        labels: Vec::new(),
        targets,
        columns,
        classes: 1,
        task: Task::Regression,
    });
    let config = TrainConfig {
        hidden: vec![64, 64],
        epochs: 60,
        batch_size: 32,
        learning_rate: 3e-3,
        seed: 5,
        ..base_config()
    };
    let outcomes = train_on(2, config, dataset);
    let last = outcomes[0].epochs.last().unwrap();
    assert_eq!(last.validation_name, "rmse");
    assert!(
        last.validation < 0.2 * f64::from(spread),
        "RMSE {} against a spread of {spread}",
        last.validation
    );
    assert_eq!(outcomes[0].parameters_hash, outcomes[1].parameters_hash);
}

#[test]
fn the_digits_cnn_reaches_95_percent_with_two_ranks() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/digits.csv");
    let dataset = Arc::new(load_csv(&path, "digit", Task::Classification).unwrap());
    let config = TrainConfig {
        image: Some([1, 8, 8]),
        hidden: vec![64],
        epochs: 12,
        batch_size: 64,
        learning_rate: 2e-3,
        seed: 42,
        ..base_config()
    };
    let outcomes = train_on(2, config.clone(), dataset.clone());
    let last = outcomes[0].epochs.last().unwrap();
    assert!(last.validation >= 0.95, "validation accuracy {}", last.validation);
    assert_eq!(outcomes[0].parameters_hash, outcomes[1].parameters_hash);
    check_saved_model(&config, &dataset, &outcomes[0]);
}

#[test]
fn a_run_resumed_mid_epoch_from_a_step_checkpoint_ends_where_an_uninterrupted_run_does() {
    let config = TrainConfig {
        hidden: vec![16],
        epochs: 3,
        batch_size: 32,
        learning_rate: 1e-2,
        seed: 11,
        ..base_config()
    };
    // 241 training rows: 8 batches an epoch. Stop after 11 steps (3 into epoch 2), with a checkpoint
    // every 11 steps, then resume.
    let (uninterrupted, stopped, resumed) = interrupt_and_resume(config, 1000, Some(11), |config| TrainConfig {
        max_steps: Some(11),
        ..config
    });
    assert_eq!(stopped.steps, 11);
    assert_eq!(resumed.steps, uninterrupted.steps);
    assert_eq!(
        resumed.parameters_hash, uninterrupted.parameters_hash,
        "resumed exactly mid-epoch"
    );
    let (last_resumed, last_whole) = (resumed.epochs.last().unwrap(), uninterrupted.epochs.last().unwrap());
    assert_eq!(last_resumed.loss, last_whole.loss);
    // The partial epoch's loss covers the batches before the checkpoint too.
    assert!((resumed.epochs[0].loss - uninterrupted.epochs[1].loss).abs() < 1e-6);
}

#[test]
fn a_checkpoint_rank_0_cannot_read_fails_every_rank_at_once() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(
        directory.path().join("checkpoint.json"),
        r#"{"format": 99, "epoch": 1, "steps": 5, "parameters": 1, "parameters_hash": "0", "world_size": 2}"#,
    )
    .unwrap();
    let config = TrainConfig {
        checkpoint: Some(CheckpointConfig {
            directory: directory.path().to_path_buf(),
            every_epochs: 1,
            every_steps: None,
        }),
        ..base_config()
    };
    let started = std::time::Instant::now();
    let outcomes = try_train_on(2, config, Arc::new(blobs()));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the ranks waited for a timeout"
    );
    let errors: Vec<String> = outcomes.into_iter().map(|outcome| outcome.unwrap_err()).collect();
    assert!(errors[0].contains("has format 99"), "{errors:?}");
    assert!(errors[1].contains("rank 0 could not resume"), "{errors:?}");
}
