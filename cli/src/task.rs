//! `kiln task …`: programs that run as the ranks of a Kiln job (the worker starts them like any command).
//!
//! `kiln task allreduce` meets the other ranks through the coordinator, joins the ring, and all-reduces
//! buffers of the given sizes: with `--check` it verifies every element against the exact sum, and rank 0
//! prints one JSON line per size with the time and the bus bandwidth (size × 2(n−1)/n ÷ time, the figure
//! nccl-tests reports), which `benches/run-allreduce.sh` collects.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln_worker::collective::{self, CollectiveConfig, Communicator, Compression, RankEnvironment, ReduceOp};
use serde::Serialize;

#[derive(Subcommand)]
pub enum TaskCommand {
    /// All-reduce benchmark and check across the ranks of this job.
    Allreduce(AllreduceArgs),
    /// The built-in trainer, as one rank of a `train` job (the worker starts it).
    Train(TrainArgs),
    /// One replica of a deployment, as a `serve` job (the worker starts it).
    Serve(TrainArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// The job spec as submitted.
    #[arg(long)]
    spec: std::path::PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum WireFormat {
    F32,
    Bf16,
}

#[derive(Args)]
pub struct AllreduceArgs {
    /// Buffer sizes, comma-separated (e.g. 1MiB,16MiB,256MiB).
    #[arg(long, value_delimiter = ',', default_value = "1MiB,16MiB")]
    sizes: Vec<String>,
    /// Timed all-reduces per size (after one untimed warm-up).
    #[arg(long, default_value_t = 5)]
    iterations: u32,
    #[arg(long, value_enum, default_value = "f32")]
    wire: WireFormat,
    /// Verify every element against the exact sum.
    #[arg(long)]
    check: bool,
    /// Per-operation timeout of the collectives.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    timeout: Duration,
}

#[derive(Serialize)]
struct SizeResult {
    bytes: usize,
    world: u32,
    wire: &'static str,
    iterations: u32,
    seconds_per_iteration: f64,
    algorithm_gbps: f64,
    bus_gbps: f64,
}

/// Rank `rank`'s value at `index`: integers small enough that every sum is exact in f32.
fn value(rank: u32, index: usize) -> f32 {
    ((index % 1024) + rank as usize * 7) as f32
}

pub async fn run(command: TaskCommand) -> Result<()> {
    match command {
        TaskCommand::Allreduce(args) => allreduce(args).await,
        TaskCommand::Train(args) => train(args).await,
        TaskCommand::Serve(args) => crate::serve::run_replica(&args.spec).await,
    }
}

async fn allreduce(args: AllreduceArgs) -> Result<()> {
    let environment = RankEnvironment::from_environment()?;
    let mut sizes = Vec::new();
    for size in &args.sizes {
        let bytes =
            kiln_coordinator::spec::parse_memory(size).map_err(|message| anyhow::anyhow!("--sizes: {message}"))?;
        if bytes % 4 != 0 {
            bail!("--sizes: {size} is not a whole number of f32 values (a multiple of 4 bytes)");
        }
        sizes.push(bytes as usize);
    }
    let config = CollectiveConfig {
        timeout: args.timeout,
        compression: match args.wire {
            WireFormat::F32 => Compression::None,
            WireFormat::Bf16 => Compression::Bf16,
        },
        ..CollectiveConfig::default()
    };
    let mut communicator = collective::join(&environment, config).await?;
    let (rank, world) = (communicator.rank(), communicator.world_size());
    eprintln!("rank {rank} of {world} joined the ring");
    let check = args.check;
    let iterations = args.iterations.max(1);
    let wire = match args.wire {
        WireFormat::F32 => "f32",
        WireFormat::Bf16 => "bf16",
    };
    // The collectives block; they run off the async runtime.
    tokio::task::spawn_blocking(move || -> Result<()> {
        for bytes in sizes {
            let elements = bytes / 4;
            let fill = |buffer: &mut Vec<f32>| {
                buffer.clear();
                buffer.extend((0..elements).map(|index| value(rank, index)));
            };
            let mut buffer = Vec::with_capacity(elements);
            fill(&mut buffer);
            communicator.all_reduce(&mut buffer, ReduceOp::Sum)?;
            if check {
                for (index, reduced) in buffer.iter().enumerate() {
                    let exact: f32 = (0..world).map(|other| value(other, index)).sum();
                    let tolerance = if wire == "bf16" { exact.abs() / 128.0 } else { 0.0 };
                    if (reduced - exact).abs() > tolerance {
                        bail!("all-reduce of {bytes} bytes: element {index} is {reduced}, expected {exact}");
                    }
                }
                println!("all-reduce check passed: {bytes} bytes, {world} ranks, {wire} on the wire");
            }
            let mut elapsed = Duration::ZERO;
            for _ in 0..iterations {
                fill(&mut buffer);
                communicator.barrier()?;
                let started = Instant::now();
                communicator.all_reduce(&mut buffer, ReduceOp::Sum)?;
                elapsed += started.elapsed();
            }
            let seconds = elapsed.as_secs_f64() / f64::from(iterations);
            let algorithm_gbps = bytes as f64 / seconds / 1e9;
            let bus_gbps = algorithm_gbps * 2.0 * f64::from(world - 1) / f64::from(world);
            if rank == 0 {
                let result = SizeResult {
                    bytes,
                    world,
                    wire,
                    iterations,
                    seconds_per_iteration: seconds,
                    algorithm_gbps,
                    bus_gbps,
                };
                println!("{}", serde_json::to_string(&result)?);
            }
        }
        Ok(())
    })
    .await??;
    Ok(())
}

/// A train job's dataset given as a feature service's training set:
/// `features://SERVICE?entities=PATH[&event_timestamp=COLUMN][&server=HOST:PORT]`. The entity rows (join
/// keys, event time and the label) are a file the feature server can read; the server defaults to
/// `KILN_FEATURESTORE`, else 127.0.0.1:7072.
#[derive(Debug, PartialEq)]
struct FeatureDataset {
    service: String,
    entities: std::path::PathBuf,
    event_timestamp: String,
    server: String,
}

impl FeatureDataset {
    fn parse(dataset: &str) -> Result<Option<FeatureDataset>> {
        let Some(rest) = dataset.strip_prefix("features://") else {
            return Ok(None);
        };
        let expected = "expected features://SERVICE?entities=PATH[&event_timestamp=COLUMN][&server=HOST:PORT]";
        let (service, query) = rest.split_once('?').unwrap_or((rest, ""));
        if service.is_empty() {
            bail!("dataset {dataset:?} names no feature service; {expected}");
        }
        let mut parsed = FeatureDataset {
            service: service.to_string(),
            entities: std::path::PathBuf::new(),
            event_timestamp: "event_timestamp".into(),
            server: std::env::var("KILN_FEATURESTORE").unwrap_or_else(|_| "127.0.0.1:7072".into()),
        };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("entities", value)) => parsed.entities = value.into(),
                Some(("event_timestamp", value)) => parsed.event_timestamp = value.into(),
                Some(("server", value)) => parsed.server = value.into(),
                _ => bail!("dataset {dataset:?}: '{pair}' is not understood; {expected}"),
            }
        }
        if parsed.entities.as_os_str().is_empty() {
            bail!("dataset {dataset:?} names no entity rows; {expected}");
        }
        Ok(Some(parsed))
    }

    /// Fetches this rank's shard of the training set over Flight (rows [rank·N/world, (rank+1)·N/world))
    /// and keeps the features and `label` (not the entity rows' keys and times) in a Parquet file in the run
    /// directory; returns its path.
    async fn fetch(
        &self,
        label: &str,
        resolve: &impl Fn(std::path::PathBuf) -> std::path::PathBuf,
        rank: u32,
        world: u32,
    ) -> Result<(std::path::PathBuf, Option<serde_json::Value>)> {
        use kiln_featurestore::arrow::compute::concat_batches;
        let entities = std::path::absolute(resolve(self.entities.clone()))?;
        let entity_columns = kiln_featurestore::training::file_columns(&entities).await?;
        let command = kiln_featurestore::server::FlightCommand::TrainingSet {
            service: self.service.clone(),
            entities: entities.display().to_string(),
            event_timestamp: self.event_timestamp.clone(),
            rank,
            world,
        };
        let mut client = crate::featureserver::connect(&self.server).await?;
        let batches = crate::featureserver::fetch(&mut client, &command).await?;
        // Now that the set is built, the server says which dataset version it is.
        let manifest = client
            .get_flight_info(arrow_flight::FlightDescriptor::new_cmd(command.to_bytes()))
            .await
            .ok()
            .and_then(|info| serde_json::from_slice::<serde_json::Value>(&info.app_metadata).ok());
        let Some(first) = batches.first() else {
            bail!(
                "feature service '{}' gave no rows for {}",
                self.service,
                entities.display()
            );
        };
        let all = concat_batches(&first.schema(), &batches)?;
        let keep: Vec<usize> = all
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, field)| field.name() == label || !entity_columns.contains(field.name()))
            .map(|(index, _)| index)
            .collect();
        let kept = all.project(&keep)?;
        let run_directory = std::env::var("KILN_RUN_DIR").unwrap_or_else(|_| ".".into());
        let path = std::path::Path::new(&run_directory).join("training-set.parquet");
        kiln_featurestore::training::write_parquet(&path, &kept)?;
        println!(
            "training set of feature service '{}' from {}, shard {rank} of {world}: {} rows, columns {}",
            self.service,
            self.server,
            kept.num_rows(),
            kept.schema()
                .fields()
                .iter()
                .map(|field| field.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok((path, manifest))
    }

    /// The training set as a dataset input of the job's run: its content hash, where it came from, and
    /// the feature view versions it joined (for lineage).
    fn input(&self, manifest: &serde_json::Value) -> Option<serde_json::Value> {
        let digest = manifest["content_hash"].as_str()?;
        let views: Vec<String> = manifest["feature_views"]
            .as_array()
            .map(|views| {
                views
                    .iter()
                    .map(|view| {
                        let name = view["name"].as_str().unwrap_or_default();
                        match view["version"].as_u64() {
                            Some(version) => format!("{name}@{version}"),
                            None => name.to_string(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let source = serde_json::json!({
            "service": self.service,
            "entities": manifest["entities"],
            "event_timestamp": manifest["event_timestamp"],
            "server": self.server,
        });
        Some(serde_json::json!({
            "dataset": {
                "name": format!("{} training set", self.service),
                "digest": digest,
                "source_type": "kiln-feature-service",
                "source": source.to_string(),
                "profile": serde_json::json!({ "rows": manifest["rows"] }).to_string(),
            },
            "tags": [
                { "key": "mlflow.data.context", "value": "training" },
                { "key": kiln_coordinator::lineage::FEATURE_VIEWS_TAG, "value": views.join(",") },
            ],
        }))
    }
}

/// The commit checked out in the git work tree that holds `directory`, if it is in one and git is there.
fn git_commit(directory: &std::path::Path) -> Option<String> {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(directory)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let commit = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (output.status.success() && commit.len() >= 40 && commit.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .then_some(commit)
}

/// A dataset file as a dataset input of the job's run: its SHA-256 and path.
fn file_input(path: &std::path::Path) -> Result<serde_json::Value> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    let digest: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(serde_json::json!({
        "dataset": {
            "name": path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default(),
            "digest": digest,
            "source_type": "local",
            "source": serde_json::json!({ "uri": path.display().to_string() }).to_string(),
        },
        "tags": [{ "key": "mlflow.data.context", "value": "training" }],
    }))
}

async fn train(args: TrainArgs) -> Result<()> {
    use kiln_worker::trainer::{self, OptimizerKind, TrainConfig};
    let text = std::fs::read_to_string(&args.spec)
        .map_err(|error| anyhow::anyhow!("reading the job spec {}: {error}", args.spec.display()))?;
    let options = kiln_coordinator::spec::parse_train_options(&args.spec.display().to_string(), &text)?;
    let environment = RankEnvironment::from_environment()?;
    let worker_relative = |path: std::path::PathBuf| match std::env::var("KILN_WORKER_CWD") {
        Ok(base) if path.is_relative() => std::path::Path::new(&base).join(path),
        _ => path,
    };
    // A training set from the feature store is fetched in shards, one per rank; a file is read whole by
    // every rank.
    let (dataset_path, sharded, input) = match FeatureDataset::parse(&options.dataset)? {
        Some(features) => {
            let (rank, world) = (environment.rank, environment.world_size);
            let (path, manifest) = features.fetch(&options.label, &worker_relative, rank, world).await?;
            let input = manifest.as_ref().and_then(|manifest| features.input(manifest));
            (path, world > 1, input)
        }
        None => {
            let path = worker_relative(std::path::PathBuf::from(&options.dataset));
            let input = if environment.rank == 0 {
                file_input(&path).ok()
            } else {
                None
            };
            (path, false, input)
        }
    };
    let task = if options.task == "regression" {
        trainer::Task::Regression
    } else {
        trainer::Task::Classification
    };
    let dataset = trainer::load_dataset(&dataset_path, &options.label, task)?;
    // Rank 0 records what the run trains on (the training set's dataset version, or the file's hash), for
    // lineage, and the code version (the git commit of the worker's directory, where the job's relative
    // paths lead), before it starts.
    if environment.rank == 0
        && let Ok(tracking) = std::env::var("KILN_TRACKING")
    {
        let run_id = kiln_coordinator::tracking::Tracking::job_run_id(environment.job);
        let inputs = input.map(|input| serde_json::json!({ "run_id": run_id, "datasets": [input] }));
        let commit = std::env::var("KILN_WORKER_CWD")
            .ok()
            .and_then(|directory| git_commit(std::path::Path::new(&directory)))
            .map(|commit| serde_json::json!({ "run_id": run_id, "key": "mlflow.source.git.commit", "value": commit }));
        crate::runs::through_tracking(&tracking, "recording the run's training data and code version", |api| {
            let (inputs, commit) = (inputs.clone(), commit.clone());
            async move {
                if let Some(inputs) = inputs {
                    api.post("runs/log-inputs", inputs, "the run's inputs").await?;
                }
                if let Some(commit) = commit {
                    api.post("runs/set-tag", commit, "the run's code version").await?;
                }
                Ok(())
            }
        })
        .await?;
    }
    println!(
        "rank {} of {}: {} rows, {} features, {} classes from {}",
        environment.rank,
        environment.world_size,
        dataset.rows(),
        dataset.columns,
        dataset.classes,
        dataset_path.display()
    );
    // A rank given GPUs (the worker sets CUDA_VISIBLE_DEVICES) all-reduces over NCCL and, when this kiln has
    // burn's CUDA backend, computes on the first of them.
    let gpu_rank = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|devices| !devices.trim().is_empty());
    if gpu_rank && !cfg!(feature = "burn-cuda") {
        println!(
            "rank {}: this kiln has no CUDA backend for burn; computing on the CPU",
            environment.rank
        );
    }
    let config = TrainConfig {
        device: if gpu_rank && cfg!(feature = "burn-cuda") {
            trainer::ComputeDevice::Cuda(0)
        } else {
            trainer::ComputeDevice::Cpu
        },
        image: options.image.map(|image| image.map(|size| size as usize)),
        hidden: options.hidden.iter().map(|width| *width as usize).collect(),
        epochs: options.epochs,
        batch_size: options.batch_size as usize,
        learning_rate: options.learning_rate,
        seed: options.seed,
        validation_fraction: options.validation_fraction,
        optimizer: if options.optimizer == "sgd" {
            OptimizerKind::Sgd
        } else {
            OptimizerKind::Adam
        },
        momentum: options.momentum as f32,
        weight_decay: options.weight_decay as f32,
        log_every_steps: options.log_every_steps,
        max_steps: None,
        sharded,
        checkpoint: std::env::var("KILN_CHECKPOINT_DIR")
            .ok()
            .map(|directory| trainer::CheckpointConfig {
                directory: directory.into(),
                every_epochs: options.checkpoint_every,
                every_steps: options.checkpoint_every_steps,
            }),
    };
    let group = Group::join(&environment, gpu_rank).await?;
    let run_directory = std::env::var("KILN_RUN_DIR").unwrap_or_else(|_| ".".into());
    let (job_id, attempt, rank) = (environment.job, environment.attempt, environment.rank);
    // Rank 0 reports each epoch's metrics, the loss every `log_every_steps` steps and the artifacts to the
    // cluster through one queue. Whatever is queued while a report is in flight goes in the next, so
    // reporting keeps up with training; reports are numbered, so a retry after a failover logs nothing twice.
    let (reports, mut pending) = tokio::sync::mpsc::channel::<Report>(REPORTS_QUEUED_MAX);
    let reporter = (rank == 0).then(|| {
        let coordinators = environment.coordinators.join(",");
        tokio::spawn(async move {
            let Ok(mut client) = kiln_coordinator::client::Client::new(&coordinators) else {
                return;
            };
            client.retry_deadline = Duration::from_secs(30);
            let mut sequence = 0;
            let mut queued = Vec::new();
            while pending.recv_many(&mut queued, REPORTS_PER_BATCH_MAX).await > 0 {
                sequence += 1;
                let request = Report::batch(job_id, attempt, sequence, queued.drain(..));
                if let Err(status) = client.report_metrics(request).await {
                    eprintln!("metrics not recorded: {}", status.message());
                }
            }
        })
    });
    if let Some(checkpoint) = &config.checkpoint {
        let artifacts = [("checkpoints".to_string(), checkpoint.directory.display().to_string())].into();
        let _ = reports.try_send(Report {
            artifacts,
            ..Report::default()
        });
    }
    let epoch_reports = reports.clone();
    let register = options.register.clone();
    let checkpoint_directory = config
        .checkpoint
        .as_ref()
        .map(|checkpoint| checkpoint.directory.clone());
    let model_directory = std::path::Path::new(&run_directory).join("model");
    // What the registry keeps with the model: the training data's profile (computed after training), the
    // signature, and what it needs to run.
    let signature = serde_json::json!({
        "inputs": dataset.feature_names.iter().map(|name| serde_json::json!({ "name": name, "type": "float" })).collect::<Vec<_>>(),
        "outputs": [if options.task == "regression" {
            serde_json::json!({ "name": options.label, "type": "float" })
        } else {
            serde_json::json!({ "name": options.label, "type": "long", "classes": dataset.classes })
        }],
    });
    let runtime = serde_json::json!({
        "format": trainer::SAVED_FORMAT,
        "model": options.model,
        "framework": "burn",
        "devices": if cfg!(feature = "burn-cuda") { vec!["cpu", "cuda"] } else { vec!["cpu"] },
    });
    // A tag holds 5,000 characters; a wider signature is only in the model's files.
    let signature_tag = Some(signature.to_string())
        .filter(|text| text.chars().count() <= 5_000)
        .unwrap_or_else(|| "model/signature.json".to_string());
    let version_tags = vec![
        ("kiln.signature".to_string(), signature_tag),
        ("kiln.profile".to_string(), "model/profile.json".to_string()),
        ("kiln.runtime".to_string(), runtime.to_string()),
    ];
    let finished = tokio::task::spawn_blocking(move || -> Result<()> {
        let report = |progress: trainer::Progress<'_>| {
            if rank != 0 {
                return;
            }
            match progress {
                // Step reports are dropped only if the queue is full (the cluster unreachable for a long while).
                trainer::Progress::Step(metrics) => {
                    let values = [
                        ("step".to_string(), metrics.step as f64),
                        ("train_loss".to_string(), metrics.loss),
                        ("step_samples_per_second".to_string(), metrics.samples_per_second),
                    ];
                    let _ = epoch_reports.try_send(Report::measured(values.into(), metrics.step as i64));
                }
                // Epoch reports wait for room, so the final metrics always reach the cluster.
                trainer::Progress::Epoch(metrics) => {
                    let values = [
                        ("epoch".to_string(), f64::from(metrics.epoch)),
                        ("loss".to_string(), metrics.loss),
                        (format!("validation_{}", metrics.validation_name), metrics.validation),
                        ("samples_per_second".to_string(), metrics.samples_per_second),
                    ];
                    let _ = epoch_reports.blocking_send(Report::measured(values.into(), i64::from(metrics.epoch)));
                }
            }
        };
        let mut communicator = group.into_communicator()?;
        let (_, outcome) = trainer::train(
            &config,
            &dataset,
            communicator.as_mut(),
            |line| println!("{line}"),
            report,
        )?;
        let (validation_name, validation) = outcome
            .epochs
            .last()
            .map_or(("accuracy", 0.0), |epoch| (epoch.validation_name, epoch.validation));
        println!(
            "rank {rank}: trained {} steps; validation {validation_name} {validation:.4}; parameters hash {:016x}",
            outcome.steps, outcome.parameters_hash
        );
        // The training data's profile: rank 0 read every row from a file; a feature-store training set is
        // sharded, so every rank takes part and the profile covers all of their rows.
        let profile = if config.sharded {
            Some(trainer::profile_of_shards(
                &dataset,
                &options.label,
                PROFILE_BINS,
                communicator.as_mut(),
            )?)
        } else {
            (rank == 0).then(|| trainer::profile(&dataset, &options.label, PROFILE_BINS))
        };
        if rank == 0 {
            let directory = std::path::Path::new(&run_directory).join("model");
            // What serving loads back (kiln_worker::trainer::SavedModel).
            let manifest = trainer::SavedManifest {
                format: trainer::SAVED_FORMAT.to_string(),
                model: options.model.clone(),
                inputs: dataset.columns,
                image: config.image,
                hidden: config.hidden.clone(),
                classes: outcome.classes,
                feature_names: dataset.feature_names.clone(),
                label: options.label.clone(),
                normalization: outcome.normalization.clone(),
                parameters: outcome.parameters.len(),
                parameters_hash: format!("{:016x}", outcome.parameters_hash),
                task: options.task.clone(),
                validation_metric: validation_name.to_string(),
                validation,
                job_id,
                attempt,
            };
            trainer::save(&directory, &manifest, &outcome.parameters)?;
            std::fs::write(
                directory.join("signature.json"),
                serde_json::to_string_pretty(&signature)?,
            )?;
            if let Some(profile) = &profile {
                std::fs::write(directory.join("profile.json"), serde_json::to_string_pretty(profile)?)?;
            }
            println!("model saved to {}", directory.display());
            let artifacts = [("model".to_string(), directory.display().to_string())].into();
            let _ = reports.blocking_send(Report {
                artifacts,
                ..Report::default()
            });
        }
        Ok(())
    })
    .await?;
    // Let the last reports reach the cluster before this rank exits.
    if let Some(reporter) = reporter {
        let _ = tokio::time::timeout(Duration::from_secs(10), reporter).await;
    }
    finished?;
    if rank == 0
        && let Ok(tracking) = std::env::var("KILN_TRACKING")
    {
        let published = Published {
            run_id: kiln_coordinator::tracking::Tracking::job_run_id(job_id),
            model: &model_directory,
            checkpoints: checkpoint_directory.as_deref(),
            register: register.as_deref(),
            tags: version_tags,
        };
        published.publish(&tracking).await?;
    }
    Ok(())
}

/// What rank 0 of a train job hands to the cluster's MLflow API when it is done: the model (and the last
/// checkpoint) as artifacts of the job's run, and with `train.register` a new version of that registered
/// model whose source is the uploaded model.
struct Published<'a> {
    run_id: String,
    model: &'a std::path::Path,
    checkpoints: Option<&'a std::path::Path>,
    register: Option<&'a str>,
    /// Tags of the registered version: its signature, where its data profile is, its runtime needs.
    tags: Vec<(String, String)>,
}

impl Published<'_> {
    /// Tries each address of `tracking` (a comma-separated list) in turn, for a few rounds, so a coordinator
    /// failing over does not lose the model. Every step is safe to repeat.
    async fn publish(&self, tracking: &str) -> Result<()> {
        let what = format!("publishing the model of run {}", self.run_id);
        crate::runs::through_tracking(tracking, &what, |api| self.publish_through(api)).await
    }

    async fn publish_through(&self, api: crate::runs::Api) -> Result<()> {
        let root = crate::artifacts::run_root(&api, &self.run_id).await?;
        let mut uploaded = 0;
        for (directory, prefix) in [(Some(self.model), "model"), (self.checkpoints, "checkpoints")] {
            let Some(directory) = directory else { continue };
            let Ok(entries) = std::fs::read_dir(directory) else {
                continue;
            };
            for entry in entries {
                let entry = entry?;
                if !entry.file_type()?.is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                crate::artifacts::upload(&api, &entry.path(), &format!("{root}/{prefix}/{name}")).await?;
                uploaded += 1;
            }
        }
        println!("{uploaded} files uploaded to the artifacts of run {}", self.run_id);
        let Some(name) = self.register else {
            return Ok(());
        };
        let what = format!("registered model '{name}'");
        let source = format!("mlflow-artifacts:/{root}/model");
        // A retried publish finds the version it made before instead of making a second.
        let filter = format!("name = '{}' AND run_id = '{}'", name.replace('\'', "\\'"), self.run_id);
        let existing = api
            .get("model-versions/search", &[("filter", filter.as_str())], &what)
            .await?;
        if let Some(version) = existing["model_versions"]
            .as_array()
            .and_then(|versions| versions.iter().find(|version| version["source"] == source.as_str()))
        {
            println!(
                "{name} version {} already holds this model",
                crate::runs::text(&version["version"])
            );
            return Ok(());
        }
        if api
            .get("registered-models/get", &[("name", name)], &what)
            .await
            .is_err()
        {
            let created = api
                .post("registered-models/create", serde_json::json!({ "name": name }), &what)
                .await;
            // Another publisher may have made it meanwhile; the version below needs it either way.
            if let Err(error) = created
                && !error.to_string().contains("RESOURCE_ALREADY_EXISTS")
            {
                return Err(error);
            }
        }
        let body = serde_json::json!({
            "name": name,
            "source": source,
            "run_id": self.run_id,
            "description": "registered by the train job on success",
            "tags": self
                .tags
                .iter()
                .map(|(key, value)| serde_json::json!({ "key": key, "value": value }))
                .collect::<Vec<_>>(),
        });
        let created = api.post("model-versions/create", body, &what).await?;
        println!(
            "registered {name} version {}",
            crate::runs::text(&created["model_version"]["version"])
        );
        Ok(())
    }
}

/// A rank's group as it leaves the async side: the TCP ring, or for GPU ranks an invitation to NCCL (whose
/// communicator must be made on the thread that uses it).
enum Group {
    Ring(collective::RingCommunicator),
    #[cfg(feature = "cuda")]
    Nccl(collective::NcclInvite),
}

impl Group {
    async fn join(environment: &RankEnvironment, gpu_rank: bool) -> Result<Group> {
        #[cfg(feature = "cuda")]
        {
            let joined = collective::join_preferring_nccl(environment, CollectiveConfig::default(), gpu_rank).await?;
            match joined {
                collective::Joined::Nccl(invite) => {
                    println!("rank {}: all-reduce over NCCL", environment.rank);
                    Ok(Group::Nccl(invite))
                }
                collective::Joined::Ring(ring) => Ok(Group::Ring(ring)),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            if gpu_rank {
                println!(
                    "rank {}: this kiln has no NCCL (the cuda feature); all-reduce over the TCP ring",
                    environment.rank
                );
            }
            Ok(Group::Ring(
                collective::join(environment, CollectiveConfig::default()).await?,
            ))
        }
    }

    fn into_communicator(self) -> Result<Box<dyn Communicator>> {
        match self {
            Group::Ring(ring) => Ok(Box::new(ring)),
            #[cfg(feature = "cuda")]
            Group::Nccl(invite) => Ok(Box::new(invite.join(0)?)),
        }
    }
}

/// Metrics measured at one step (or epoch), or artifact locations, on their way to the coordinator.
#[derive(Default)]
struct Report {
    metrics: std::collections::HashMap<String, f64>,
    /// The step the metrics were measured at; each becomes a point of the run's history there.
    step: Option<i64>,
    timestamp_ms: i64,
    artifacts: std::collections::HashMap<String, String>,
}

impl Report {
    fn measured(metrics: std::collections::HashMap<String, f64>, step: i64) -> Report {
        let timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as i64);
        Report {
            metrics,
            step: Some(step),
            timestamp_ms,
            artifacts: Default::default(),
        }
    }

    /// Queued reports as one request: every measured value as a point, the latest of each metric, every
    /// artifact location.
    fn batch(
        job_id: u64,
        attempt: u32,
        sequence: u64,
        reports: impl Iterator<Item = Report>,
    ) -> kiln_proto::ReportMetricsRequest {
        let mut request = kiln_proto::ReportMetricsRequest {
            job_id,
            attempt,
            sequence,
            ..Default::default()
        };
        for report in reports {
            if let Some(step) = report.step {
                let mut measured: Vec<(&String, &f64)> = report.metrics.iter().collect();
                measured.sort_by(|a, b| a.0.cmp(b.0));
                request
                    .points
                    .extend(measured.into_iter().map(|(key, value)| kiln_proto::MetricPoint {
                        key: key.clone(),
                        value: *value,
                        step,
                        timestamp_ms: report.timestamp_ms,
                    }));
            }
            request.metrics.extend(report.metrics);
            request.artifacts.extend(report.artifacts);
        }
        request
    }
}

/// Bins of each feature's histogram in the training data profile.
const PROFILE_BINS: usize = 20;

/// Reports waiting to be sent at most: minutes of step reports, so none is dropped while a coordinator
/// fails over.
const REPORTS_QUEUED_MAX: usize = 65_536;
/// Reports one request carries at most (each has a handful of metrics; a request holds 10,000 points).
const REPORTS_PER_BATCH_MAX: usize = 1_000;
