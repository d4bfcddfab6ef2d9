//! Job specs: the TOML users write (`examples/jobs/*.toml`) and the validated [`JobSpec`] the state machine
//! stores.
//!
//! Parsing and validation happen before anything is proposed, on whichever node receives the submission,
//! and again in the CLI so the user sees the file name. A spec that fails either step is refused with a
//! [`SpecError`] naming the field, line and column; nothing is stored.
//!
//! ```toml
//! name = "hello"
//! kind = "command"            # or "train"
//! command = "echo"
//! args = ["hello", "kiln"]
//! max_restarts = 1
//! [env]
//! GREETING = "hi"
//! [resources]                 # per worker
//! workers = 2
//! min_workers = 1             # optional: a restarted attempt may run with as few as this many ranks
//! cpus = 1
//! gpus = 0
//! memory = "512MiB"
//! ```
//!
//! Left out on purpose: the train section's dataset and optimizer details are checked by the training
//! issue; here a train job must name its model and may carry the common hyperparameters.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Largest world size a single job may ask for.
pub const WORKERS_MAX: u32 = 1024;
/// Most restarts a job may ask for; more would hide a broken job for hours.
pub const MAX_RESTARTS_MAX: u32 = 100;
/// Longest job name, so it fits in a DNS label and a terminal column.
pub const NAME_LENGTH_MAX: usize = 63;
/// Largest spec accepted, in bytes; specs are replicated through Raft and must stay small.
pub const SPEC_BYTES_MAX: usize = 64 * 1024;

/// A spec the coordinator accepted. Every field is checked; the state machine trusts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub kind: JobKind,
    /// The program for `command` jobs; empty for `train` jobs.
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: ResourceSpec,
    pub max_restarts: u32,
    /// Higher runs first; FIFO within one priority.
    pub priority: i32,
    pub train: Option<TrainSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Command,
    Train,
    /// A hyperparameter sweep (see [`crate::sweep`]): runs no task itself; the leader's sweep controller
    /// submits its trials as jobs of the template's kind.
    Sweep,
    /// A model deployment (see [`crate::deployment`]): runs no task itself; the leader's deployment
    /// controller keeps its replicas (jobs of kind `serve`) between `replicas.min` and `replicas.max`.
    Deployment,
    /// One replica of a deployment (`kiln task serve`), made by the deployment controller only.
    Serve,
}

impl JobKind {
    pub fn label(self) -> &'static str {
        match self {
            JobKind::Command => "command",
            JobKind::Train => "train",
            JobKind::Sweep => "sweep",
            JobKind::Deployment => "deployment",
            JobKind::Serve => "serve",
        }
    }
}

/// What each worker (rank) of a job needs; the job needs `workers` times this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSpec {
    pub workers: u32,
    pub cpus: u32,
    pub gpus: u32,
    pub memory_bytes: u64,
}

/// The train section. The training issue adds dataset, optimizer and checkpoint settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub model: String,
    pub epochs: Option<u32>,
    pub batch_size: Option<u32>,
    /// Kept as text so the spec stays `Eq` and encodes exactly.
    pub learning_rate: Option<String>,
    pub seed: Option<u64>,
}

/// Why a spec was refused: what is wrong, where (1-based line and column), and in which file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub source_name: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid job spec {}:{}:{}: {}",
            self.source_name, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for SpecError {}

/// The TOML shape. Unknown keys are refused so a typo (`max_restart`) never silently does nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Spanned<String>,
    kind: Spanned<JobKind>,
    command: Option<Spanned<String>>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    resources: Option<Spanned<RawResources>>,
    #[serde(default)]
    max_restarts: Option<Spanned<u32>>,
    #[serde(default)]
    priority: i32,
    train: Option<Spanned<RawTrain>>,
    /// A sweep's sections, read by [`crate::sweep::SweepSpec::parse`].
    sweep: Option<Spanned<toml::Value>>,
    space: Option<Spanned<toml::Value>>,
    template: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    workers: Option<Spanned<u32>>,
    min_workers: Option<Spanned<u32>>,
    cpus: Option<Spanned<u32>>,
    #[serde(default)]
    gpus: u32,
    memory: Option<Spanned<Memory>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrain {
    model: Spanned<String>,
    epochs: Option<u32>,
    batch_size: Option<u32>,
    learning_rate: Option<f64>,
    seed: Option<u64>,
    dataset: Option<Spanned<String>>,
    label: Option<String>,
    validation_fraction: Option<Spanned<f64>>,
    hidden: Option<Spanned<Vec<u32>>>,
    optimizer: Option<Spanned<String>>,
    checkpoint_every: Option<u32>,
    checkpoint_every_steps: Option<u32>,
    task: Option<Spanned<String>>,
    image: Option<Spanned<Vec<u32>>>,
    momentum: Option<Spanned<f64>>,
    weight_decay: Option<Spanned<f64>>,
    log_every_steps: Option<u32>,
    register: Option<Spanned<String>>,
}

/// Built-in models the trainer knows.
pub const MODELS: [&str; 2] = ["mlp", "cnn"];
/// Optimizers the trainer knows.
pub const OPTIMIZERS: [&str; 2] = ["adam", "sgd"];
/// What a train job's label column holds.
pub const TASKS: [&str; 2] = ["classification", "regression"];

/// Everything the trainer needs from a train job's `[train]` section, with defaults filled in. Read from
/// the spec text (which the state keeps verbatim), so adding options never changes the stored `JobSpec`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub model: String,
    pub epochs: u32,
    /// The global batch: split evenly across the ranks.
    pub batch_size: u32,
    pub learning_rate: f64,
    pub seed: u64,
    /// A CSV file with a header row or a Parquet file; every column but `label` is a numeric feature.
    pub dataset: String,
    pub label: String,
    /// Share of the rows (after a seeded shuffle) held out for validation.
    pub validation_fraction: f64,
    /// Hidden layer widths of the MLP.
    pub hidden: Vec<u32>,
    pub optimizer: String,
    /// Save a checkpoint after every this many epochs (and after the last).
    pub checkpoint_every: u32,
    /// And after every this many optimizer steps, when set.
    pub checkpoint_every_steps: Option<u32>,
    /// "classification" (class numbers) or "regression" (real numbers).
    pub task: String,
    /// For the CNN: the feature columns are an image of [channels, height, width].
    pub image: Option<[u32; 3]>,
    /// SGD's momentum (0 by default: plain SGD); Adam ignores it.
    pub momentum: f64,
    /// L2 weight decay added to every gradient (0 by default).
    pub weight_decay: f64,
    /// Report the training loss and throughput every this many steps (0: per epoch only).
    pub log_every_steps: u32,
    /// Register the trained model under this name in the model registry when the job succeeds.
    pub register: Option<String>,
}

/// Parses a train job's spec into its [`TrainOptions`] (and checks it like [`parse_job_spec`]).
pub fn parse_train_options(source_name: &str, text: &str) -> Result<TrainOptions, SpecError> {
    parse_job_spec(source_name, text)?;
    let raw: RawSpec = toml::from_str(text).map_err(|error| SpecError {
        source_name: source_name.to_string(),
        line: 1,
        column: 1,
        message: error.message().to_string(),
    })?;
    let train = raw.train.map(Spanned::into_inner).ok_or_else(|| SpecError {
        source_name: source_name.to_string(),
        line: 1,
        column: 1,
        message: "section [train] is missing".into(),
    })?;
    Ok(TrainOptions {
        model: train.model.into_inner(),
        epochs: train.epochs.unwrap_or(10),
        batch_size: train.batch_size.unwrap_or(64),
        learning_rate: train.learning_rate.unwrap_or(1e-3),
        seed: train.seed.unwrap_or(0),
        dataset: train.dataset.map(Spanned::into_inner).unwrap_or_default(),
        label: train.label.unwrap_or_else(|| "label".into()),
        validation_fraction: train.validation_fraction.map_or(0.2, Spanned::into_inner),
        hidden: train.hidden.map_or_else(|| vec![256, 256], Spanned::into_inner),
        optimizer: train.optimizer.map_or_else(|| "adam".into(), Spanned::into_inner),
        checkpoint_every: train.checkpoint_every.unwrap_or(1).max(1),
        checkpoint_every_steps: train.checkpoint_every_steps.filter(|steps| *steps > 0),
        task: train.task.map_or_else(|| "classification".into(), Spanned::into_inner),
        image: train
            .image
            .and_then(|image| <[u32; 3]>::try_from(image.into_inner()).ok()),
        momentum: train.momentum.map_or(0.0, Spanned::into_inner),
        weight_decay: train.weight_decay.map_or(0.0, Spanned::into_inner),
        log_every_steps: train.log_every_steps.unwrap_or(50),
        register: train.register.map(Spanned::into_inner),
    })
}

/// `[resources] min_workers` of an already validated spec's text: how few ranks a restarted attempt may
/// run with (elastic training keeps its global batch, so it resumes on fewer). `None` when not set.
///
/// Read from the text the state keeps verbatim, like [`parse_train_options`], so the stored `JobSpec` and
/// the Raft log's commands keep their encoding; only the scheduler of a restart asks, which is rare.
pub fn min_workers(spec_toml: &str) -> Option<u32> {
    #[derive(Deserialize)]
    struct Outer {
        resources: Option<Inner>,
    }
    #[derive(Deserialize)]
    struct Inner {
        min_workers: Option<u32>,
    }
    if !spec_toml.contains("min_workers") {
        return None;
    }
    toml::from_str::<Outer>(spec_toml).ok()?.resources?.min_workers
}

/// Memory per worker: an integer number of bytes or a string with a unit (`"512MiB"`, `"4GB"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Memory {
    Bytes(u64),
    Text(String),
}

/// Parses `"512MiB"`, `"4 GB"`, `"1024"`. Binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) units.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("memory '{text}' does not start with a number; expected e.g. \"512MiB\""))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "memory unit '{other}' is not known; expected one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
            ));
        }
    };
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("memory '{text}' is too large"));
    }
    Ok(bytes as u64)
}

/// 1-based line and column of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |tail| tail.chars().count()) + 1;
    (line, column)
}

/// Parses and validates a spec. `source_name` only decorates error messages.
pub fn parse_job_spec(source_name: &str, text: &str) -> Result<JobSpec, SpecError> {
    let error_at = |offset: usize, message: String| {
        let (line, column) = line_column(text, offset);
        SpecError {
            source_name: source_name.to_string(),
            line,
            column,
            message,
        }
    };
    if text.len() > SPEC_BYTES_MAX {
        return Err(error_at(
            SPEC_BYTES_MAX,
            format!("spec is {} bytes; at most {SPEC_BYTES_MAX} are accepted", text.len()),
        ));
    }
    let toml_error = |error: toml::de::Error| {
        let offset = error.span().map_or(0, |span| span.start);
        error_at(offset, error.message().trim().to_string())
    };
    // A deployment's file has fields of its own (the model, batching, steps): read by its own shape.
    #[derive(Deserialize)]
    struct Peek {
        kind: Option<Spanned<JobKind>>,
    }
    match toml::from_str::<Peek>(text).map_err(toml_error)?.kind {
        Some(kind) if *kind.get_ref() == JobKind::Deployment => {
            let options = deployment_options_at(text, &error_at)?;
            return Ok(JobSpec {
                name: options.name,
                kind: JobKind::Deployment,
                command: String::new(),
                args: Vec::new(),
                env: BTreeMap::new(),
                // Per replica; `workers` is the fewest replicas, so a deployment the cluster cannot hold
                // even when idle is refused at once.
                resources: ResourceSpec {
                    workers: options.min_replicas,
                    ..options.resources
                },
                max_restarts: 0,
                priority: options.priority,
                train: None,
            });
        }
        Some(kind) if *kind.get_ref() == JobKind::Serve => {
            return Err(error_at(
                kind.span().start,
                "jobs of kind \"serve\" are a deployment's replicas, made by the coordinator; submit the deployment (kind = \"deployment\") instead".into(),
            ));
        }
        _ => {}
    }
    let raw: RawSpec = toml::from_str(text).map_err(toml_error)?;
    check_name(raw.name.get_ref()).map_err(|message| error_at(raw.name.span().start, message))?;

    let kind = *raw.kind.get_ref();
    if kind == JobKind::Sweep {
        let misplaced = [
            ("command", raw.command.as_ref().map(|command| command.span().start)),
            ("[train]", raw.train.as_ref().map(|train| train.span().start)),
            (
                "[resources]",
                raw.resources.as_ref().map(|resources| resources.span().start),
            ),
            (
                "max_restarts",
                raw.max_restarts.as_ref().map(|restarts| restarts.span().start),
            ),
            ("[env]", raw.env.keys().next().map(|key| key.span().start)),
        ];
        if let Some((field, offset)) = misplaced
            .into_iter()
            .find_map(|(field, offset)| offset.map(|offset| (field, offset)))
        {
            return Err(error_at(
                offset,
                format!("{field} is not used by a job of kind \"sweep\"; each trial takes it from [template]"),
            ));
        }
        crate::sweep::SweepSpec::parse(text).map_err(|error| error_at(raw.kind.span().start, error.0))?;
        return Ok(JobSpec {
            name: raw.name.get_ref().clone(),
            kind,
            command: String::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            resources: ResourceSpec {
                workers: 0,
                cpus: 0,
                gpus: 0,
                memory_bytes: 0,
            },
            max_restarts: 0,
            priority: raw.priority,
            train: None,
        });
    }
    for (section, value) in [
        ("sweep", &raw.sweep),
        ("space", &raw.space),
        ("template", &raw.template),
    ] {
        if let Some(value) = value {
            return Err(error_at(
                value.span().start,
                format!("section [{section}] is only for jobs of kind \"sweep\""),
            ));
        }
    }
    let command = match (kind, &raw.command) {
        (JobKind::Command, None) => {
            return Err(error_at(
                raw.kind.span().start,
                "field 'command' is missing; a job of kind \"command\" needs the program to run".into(),
            ));
        }
        (JobKind::Command, Some(command)) if command.get_ref().trim().is_empty() => {
            return Err(error_at(
                command.span().start,
                "field 'command' is empty; expected the program to run".into(),
            ));
        }
        (JobKind::Command, Some(command)) => command.get_ref().clone(),
        (JobKind::Train, Some(command)) => {
            return Err(error_at(
                command.span().start,
                "field 'command' is not used by a job of kind \"train\"; remove it or use kind = \"command\"".into(),
            ));
        }
        (JobKind::Train, None) => String::new(),
        (JobKind::Sweep | JobKind::Deployment | JobKind::Serve, _) => unreachable!("returned above"),
    };

    let train = match (kind, raw.train) {
        (JobKind::Train, None) => {
            return Err(error_at(
                raw.kind.span().start,
                "section [train] is missing; a job of kind \"train\" needs at least train.model".into(),
            ));
        }
        (JobKind::Command, Some(train)) => {
            return Err(error_at(
                train.span().start,
                "section [train] is only for jobs of kind \"train\"".into(),
            ));
        }
        (JobKind::Command | JobKind::Sweep | JobKind::Deployment | JobKind::Serve, None) => None,
        (JobKind::Sweep | JobKind::Deployment | JobKind::Serve, Some(_)) => unreachable!("returned above"),
        (JobKind::Train, Some(train)) => {
            let train = train.into_inner();
            if !MODELS.contains(&train.model.get_ref().as_str()) {
                return Err(error_at(
                    train.model.span().start,
                    format!(
                        "field 'train.model' is {:?}; expected a built-in model: {}",
                        train.model.get_ref(),
                        MODELS.join(", ")
                    ),
                ));
            }
            match &train.dataset {
                None => {
                    return Err(error_at(
                        train.model.span().start,
                        "field 'train.dataset' is missing; expected the path of a CSV (with a header row) or Parquet file, or features://SERVICE?entities=PATH".into(),
                    ));
                }
                Some(dataset) if dataset.get_ref().trim().is_empty() => {
                    return Err(error_at(
                        dataset.span().start,
                        "field 'train.dataset' is empty; expected the path of a CSV or Parquet file".into(),
                    ));
                }
                Some(_) => {}
            }
            if let Some(fraction) = &train.validation_fraction
                && !(*fraction.get_ref() > 0.0 && *fraction.get_ref() < 1.0)
            {
                return Err(error_at(
                    fraction.span().start,
                    format!(
                        "field 'train.validation_fraction' is {}; expected a share between 0 and 1, such as 0.2",
                        fraction.get_ref()
                    ),
                ));
            }
            if let Some(hidden) = &train.hidden
                && (hidden.get_ref().is_empty() || hidden.get_ref().contains(&0))
            {
                return Err(error_at(
                    hidden.span().start,
                    "field 'train.hidden' must list one or more layer widths above 0, such as [256, 256]".into(),
                ));
            }
            for (name, value) in [("momentum", &train.momentum), ("weight_decay", &train.weight_decay)] {
                if let Some(value) = value
                    && !(*value.get_ref() >= 0.0 && *value.get_ref() < 1.0)
                {
                    return Err(error_at(
                        value.span().start,
                        format!(
                            "field 'train.{name}' is {}; expected a value in [0, 1), such as 0.9 for momentum or 1e-4 for weight decay",
                            value.get_ref()
                        ),
                    ));
                }
            }
            if let Some(momentum) = &train.momentum
                && train
                    .optimizer
                    .as_ref()
                    .is_none_or(|optimizer| optimizer.get_ref() != "sgd")
            {
                return Err(error_at(
                    momentum.span().start,
                    "field 'train.momentum' is for optimizer = \"sgd\"; Adam keeps its own moments (beta1 0.9)".into(),
                ));
            }
            if let Some(name) = &train.register
                && (name.get_ref().trim().is_empty() || name.get_ref().contains(['/', ':']))
            {
                return Err(error_at(
                    name.span().start,
                    format!(
                        "field 'train.register' is '{}'; expected a registered model name without '/' or ':', such as \"digits\"",
                        name.get_ref()
                    ),
                ));
            }
            if let Some(optimizer) = &train.optimizer
                && !OPTIMIZERS.contains(&optimizer.get_ref().as_str())
            {
                return Err(error_at(
                    optimizer.span().start,
                    format!(
                        "field 'train.optimizer' is {:?}; expected one of {}",
                        optimizer.get_ref(),
                        OPTIMIZERS.join(", ")
                    ),
                ));
            }
            match (train.model.get_ref().as_str(), &train.image) {
                ("cnn", None) => {
                    return Err(error_at(
                        train.model.span().start,
                        "field 'train.image' is missing; the CNN needs the image shape, such as [1, 8, 8] (channels, height, width)".into(),
                    ));
                }
                ("cnn", Some(image)) if image.get_ref().len() != 3 || image.get_ref().contains(&0) => {
                    return Err(error_at(
                        image.span().start,
                        "field 'train.image' must be [channels, height, width], each above 0".into(),
                    ));
                }
                ("mlp", Some(image)) => {
                    return Err(error_at(
                        image.span().start,
                        "field 'train.image' is only for model = \"cnn\"".into(),
                    ));
                }
                _ => {}
            }
            if let Some(task) = &train.task
                && !TASKS.contains(&task.get_ref().as_str())
            {
                return Err(error_at(
                    task.span().start,
                    format!(
                        "field 'train.task' is {:?}; expected one of {}",
                        task.get_ref(),
                        TASKS.join(", ")
                    ),
                ));
            }
            if train.batch_size == Some(0) || train.epochs == Some(0) {
                return Err(error_at(
                    train.model.span().start,
                    "fields 'train.batch_size' and 'train.epochs' must be above 0".into(),
                ));
            }
            Some(TrainSpec {
                model: train.model.into_inner(),
                epochs: train.epochs,
                batch_size: train.batch_size,
                learning_rate: train.learning_rate.map(|rate| rate.to_string()),
                seed: train.seed,
            })
        }
    };

    let mut env = BTreeMap::new();
    for (key, value) in raw.env {
        let valid = !key.get_ref().is_empty()
            && !key.get_ref().starts_with(|c: char| c.is_ascii_digit())
            && key.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(error_at(
                key.span().start,
                format!(
                    "environment variable name {:?} is not valid; expected letters, digits and '_', not starting with a digit",
                    key.get_ref()
                ),
            ));
        }
        env.insert(key.into_inner(), value);
    }

    let resources = parse_resources(raw.resources, &error_at)?;

    let max_restarts = match raw.max_restarts {
        None => 0,
        Some(restarts) if *restarts.get_ref() > MAX_RESTARTS_MAX => {
            return Err(error_at(
                restarts.span().start,
                format!(
                    "field 'max_restarts' is {}; expected 0 to {MAX_RESTARTS_MAX}",
                    restarts.get_ref()
                ),
            ));
        }
        Some(restarts) => restarts.into_inner(),
    };

    Ok(JobSpec {
        name: raw.name.into_inner(),
        kind,
        command,
        args: raw.args,
        env,
        resources,
        max_restarts,
        priority: raw.priority,
        train,
    })
}

/// A job's `[resources]`, with defaults: one worker of one CPU slot.
fn parse_resources(
    resources: Option<Spanned<RawResources>>,
    error_at: &dyn Fn(usize, String) -> SpecError,
) -> Result<ResourceSpec, SpecError> {
    Ok(match resources {
        None => ResourceSpec {
            workers: 1,
            cpus: 1,
            gpus: 0,
            memory_bytes: 0,
        },
        Some(resources) => {
            let resources = resources.into_inner();
            let workers = match resources.workers {
                None => 1,
                Some(workers) if *workers.get_ref() == 0 || *workers.get_ref() > WORKERS_MAX => {
                    return Err(error_at(
                        workers.span().start,
                        format!(
                            "field 'resources.workers' is {}; expected 1 to {WORKERS_MAX}",
                            workers.get_ref()
                        ),
                    ));
                }
                Some(workers) => workers.into_inner(),
            };
            if let Some(minimum) = &resources.min_workers
                && (*minimum.get_ref() == 0 || *minimum.get_ref() > workers)
            {
                return Err(error_at(
                    minimum.span().start,
                    format!(
                        "field 'resources.min_workers' is {}; expected 1 to resources.workers ({workers})",
                        minimum.get_ref()
                    ),
                ));
            }
            let cpus = match resources.cpus {
                None => 1,
                Some(cpus) if *cpus.get_ref() == 0 => {
                    return Err(error_at(
                        cpus.span().start,
                        "field 'resources.cpus' is 0; expected at least 1 CPU slot per worker".into(),
                    ));
                }
                Some(cpus) => cpus.into_inner(),
            };
            let memory_bytes = match resources.memory {
                None => 0,
                Some(memory) => {
                    let start = memory.span().start;
                    match memory.into_inner() {
                        Memory::Bytes(bytes) => bytes,
                        Memory::Text(text) => parse_memory(&text)
                            .map_err(|message| error_at(start, format!("field 'resources.memory': {message}")))?,
                    }
                }
            };
            ResourceSpec {
                workers,
                cpus,
                gpus: resources.gpus,
                memory_bytes,
            }
        }
    })
}

/// Refuses a name that is empty, too long, or not made of letters, digits, '-', '_' and '.'.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= NAME_LENGTH_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if valid {
        return Ok(());
    }
    Err(format!(
        "field 'name' is {name:?}; expected 1 to {NAME_LENGTH_MAX} characters of letters, digits, '-', '_' or '.'"
    ))
}

/// The most replicas one deployment may have.
pub const REPLICAS_MAX: u32 = 64;

/// What the coordinator needs from a deployment's file (`kind = "deployment"`), with defaults filled in.
/// The rest (the model, batching, steps) is the replica's to read (`kiln task serve`); the coordinator only
/// checks that it is there and of the right shape. Read from the spec text, like [`TrainOptions`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentOptions {
    /// The name clients call the model by, and the deployment's.
    pub name: String,
    /// models:/NAME@ALIAS, models:/NAME/VERSION, or a model directory or ONNX file on the workers.
    pub model: String,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Requests waiting per replica (its mean over a report interval) above which a replica is added.
    pub target_queue_depth: f64,
    /// How long the replicas must have been under-used before one is removed (and between removals).
    pub scale_down_delay_ms: i64,
    /// How long a replica of an updated file may take to become ready before the update is rolled back.
    pub ready_timeout_ms: i64,
    /// Per replica (`workers` is 1).
    pub resources: ResourceSpec,
    pub priority: i32,
}

/// The file's shape. Unknown keys are refused, as in a job spec.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployment {
    name: Spanned<String>,
    #[allow(dead_code)]
    kind: JobKind,
    model: Spanned<String>,
    // The replica's: kept as written and read by `kiln task serve`.
    #[allow(dead_code)]
    input_name: Option<String>,
    #[allow(dead_code)]
    batching: Option<toml::Table>,
    #[allow(dead_code)]
    #[serde(default)]
    preprocess: Vec<toml::Value>,
    #[allow(dead_code)]
    #[serde(default)]
    postprocess: Vec<toml::Value>,
    #[allow(dead_code)]
    request_log: Option<String>,
    #[allow(dead_code)]
    request_log_rows: Option<u64>,
    #[allow(dead_code)]
    request_log_interval: Option<String>,
    #[allow(dead_code)]
    follow_interval: Option<String>,
    #[allow(dead_code)]
    features: Option<toml::Table>,
    replicas: Option<Spanned<RawReplicas>>,
    resources: Option<Spanned<RawResources>>,
    #[serde(default)]
    priority: i32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplicas {
    min: Option<Spanned<u32>>,
    max: Option<Spanned<u32>>,
    target_queue_depth: Option<Spanned<f64>>,
    scale_down_delay: Option<Spanned<String>>,
    ready_timeout: Option<Spanned<String>>,
}

/// Reads a deployment's file; the error names the line and column of what is wrong.
pub fn deployment_options(source_name: &str, text: &str) -> Result<DeploymentOptions, SpecError> {
    let error_at = |offset: usize, message: String| {
        let (line, column) = line_column(text, offset);
        SpecError {
            source_name: source_name.to_string(),
            line,
            column,
            message,
        }
    };
    deployment_options_at(text, &error_at)
}

fn deployment_options_at(
    text: &str,
    error_at: &dyn Fn(usize, String) -> SpecError,
) -> Result<DeploymentOptions, SpecError> {
    let raw: RawDeployment = toml::from_str(text).map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        error_at(offset, error.message().trim().to_string())
    })?;
    check_name(raw.name.get_ref()).map_err(|message| error_at(raw.name.span().start, message))?;
    if raw.model.get_ref().trim().is_empty() {
        return Err(error_at(
            raw.model.span().start,
            "field 'model' is empty; expected models:/NAME@ALIAS, models:/NAME/VERSION, or a model directory or ONNX file".into(),
        ));
    }
    if let Some(resources) = &raw.resources {
        let inner = resources.get_ref();
        if let Some(offset) = inner
            .workers
            .as_ref()
            .map(|workers| workers.span().start)
            .or(inner.min_workers.as_ref().map(|workers| workers.span().start))
        {
            return Err(error_at(
                offset,
                "[resources] of a deployment are per replica; the number of replicas is [replicas] min and max".into(),
            ));
        }
    }
    let resources = parse_resources(raw.resources, error_at)?;
    let (mut min, mut max, mut target, mut delay_ms, mut ready_ms) = (1, None, 8.0, 60_000, 600_000);
    if let Some(replicas) = raw.replicas {
        let replicas = replicas.into_inner();
        // A replica count from `low` (named `low_text` in the error) to REPLICAS_MAX.
        let count = |field: &str, value: Spanned<u32>, low: u32, low_text: String| {
            let (start, value) = (value.span().start, value.into_inner());
            if value < low || value > REPLICAS_MAX {
                return Err(error_at(
                    start,
                    format!("field 'replicas.{field}' is {value}; expected {low_text} to {REPLICAS_MAX}"),
                ));
            }
            Ok(value)
        };
        if let Some(value) = replicas.min {
            min = count("min", value, 1, "1".into())?;
        }
        if let Some(value) = replicas.max {
            max = Some(count("max", value, min, format!("replicas.min ({min})"))?);
        }
        if let Some(value) = replicas.target_queue_depth {
            if !(value.get_ref().is_finite() && *value.get_ref() > 0.0) {
                return Err(error_at(
                    value.span().start,
                    format!(
                        "field 'replicas.target_queue_depth' is {}; expected a number of waiting requests above 0",
                        value.get_ref()
                    ),
                ));
            }
            target = value.into_inner();
        }
        let milliseconds = |field: &str, value: Spanned<String>, example: &str| {
            let duration = humantime::parse_duration(value.get_ref()).map_err(|error| {
                error_at(
                    value.span().start,
                    format!(
                        "field 'replicas.{field}' is {:?} ({error}); expected a duration such as \"{example}\"",
                        value.get_ref()
                    ),
                )
            })?;
            Ok(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX))
        };
        if let Some(value) = replicas.scale_down_delay {
            delay_ms = milliseconds("scale_down_delay", value, "60s")?;
        }
        if let Some(value) = replicas.ready_timeout {
            ready_ms = milliseconds("ready_timeout", value, "10m")?;
        }
    }
    Ok(DeploymentOptions {
        name: raw.name.into_inner(),
        model: raw.model.into_inner(),
        min_replicas: min,
        max_replicas: max.unwrap_or(min),
        target_queue_depth: target,
        scale_down_delay_ms: delay_ms,
        ready_timeout_ms: ready_ms,
        resources,
        priority: raw.priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
name = "hello"
kind = "command"
command = "echo"
args = ["hello"]
[resources]
workers = 2
memory = "512MiB"
"#;

    #[test]
    fn accepts_a_valid_spec() {
        let spec = parse_job_spec("hello.toml", HELLO).unwrap();
        assert_eq!(spec.name, "hello");
        assert_eq!(spec.resources.workers, 2);
        assert_eq!(spec.resources.memory_bytes, 512 << 20);
        assert_eq!(spec.resources.cpus, 1);
    }

    #[test]
    fn names_the_field_line_and_column() {
        let bad = HELLO.replace("workers = 2", "workers = 0");
        let error = parse_job_spec("hello.toml", &bad).unwrap_err();
        assert_eq!((error.line, error.column), (7, 11), "{error}");
        assert!(error.message.contains("resources.workers"), "{error}");
        assert!(
            error.to_string().starts_with("invalid job spec hello.toml:7:11:"),
            "{error}"
        );
    }

    #[test]
    fn refuses_unknown_fields_and_kinds() {
        let typo = HELLO.replace("args", "argz");
        let error = parse_job_spec("t.toml", &typo).unwrap_err();
        assert!(error.message.contains("argz"), "{error}");
        assert_eq!(error.line, 5);

        let kind = HELLO.replace("\"command\"\ncommand", "\"batch\"\ncommand");
        let error = parse_job_spec("t.toml", &kind).unwrap_err();
        assert!(
            error.message.contains("command") && error.message.contains("train"),
            "{error}"
        );
        assert_eq!(error.line, 3);
    }

    #[test]
    fn cross_field_rules() {
        let no_command = "name = \"x\"\nkind = \"command\"\n";
        let error = parse_job_spec("t.toml", no_command).unwrap_err();
        assert!(error.message.contains("'command' is missing"), "{error}");
        let train = "name = \"x\"\nkind = \"train\"\n[train]\nmodel = \"mlp\"\nepochs = 3\ndataset = \"d.csv\"\n";
        let spec = parse_job_spec("t.toml", train).unwrap();
        assert_eq!(spec.train.unwrap().epochs, Some(3));
        let error = parse_job_spec("t.toml", "name = \"x\"\nkind = \"train\"\n").unwrap_err();
        assert!(error.message.contains("[train]"), "{error}");
    }

    #[test]
    fn train_options_have_defaults_and_ranges() {
        let train = "name = \"x\"\nkind = \"train\"\n[train]\nmodel = \"mlp\"\ndataset = \"d.parquet\"\n";
        let options = parse_train_options("t.toml", train).unwrap();
        assert_eq!(
            (options.momentum, options.weight_decay, options.log_every_steps),
            (0.0, 0.0, 50)
        );
        let tuned = format!("{train}optimizer = \"sgd\"\nmomentum = 0.9\nweight_decay = 1e-4\nlog_every_steps = 0\n");
        let options = parse_train_options("t.toml", &tuned).unwrap();
        assert_eq!(
            (options.momentum, options.weight_decay, options.log_every_steps),
            (0.9, 1e-4, 0)
        );
        let error =
            parse_train_options("t.toml", &format!("{train}optimizer = \"sgd\"\nmomentum = 1.5\n")).unwrap_err();
        assert!(error.message.contains("'train.momentum' is 1.5"), "{error}");
        assert_eq!(error.line, 7);
        let error = parse_train_options("t.toml", &format!("{train}momentum = 0.9\n")).unwrap_err();
        assert!(error.message.contains("is for optimizer = \"sgd\""), "{error}");
    }

    #[test]
    fn min_workers_is_checked_and_read_back() {
        let elastic = HELLO.replace("workers = 2", "workers = 2\nmin_workers = 1");
        parse_job_spec("t.toml", &elastic).unwrap();
        assert_eq!(min_workers(&elastic), Some(1));
        assert_eq!(min_workers(HELLO), None);
        for bad in ["0", "3"] {
            let text = HELLO.replace("workers = 2", &format!("workers = 2\nmin_workers = {bad}"));
            let error = parse_job_spec("t.toml", &text).unwrap_err();
            assert!(
                error.message.contains(&format!(
                    "'resources.min_workers' is {bad}; expected 1 to resources.workers (2)"
                )),
                "{error}"
            );
            assert_eq!(error.line, 8);
        }
    }

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("4GB").unwrap(), 4_000_000_000);
        assert_eq!(parse_memory("1.5 GiB").unwrap(), 3 << 29);
        assert!(parse_memory("4 parsecs").unwrap_err().contains("parsecs"));
        assert!(parse_memory("lots").is_err());
    }
}
