//! Experiment tracking as replicated state: experiments, runs, their params, tags and metric histories,
//! with MLflow's rules, so that the MLflow REST API (issue 6) is a thin layer over it and a run logged by
//! the stock `mlflow` client is an ordinary Kiln run.
//!
//! ```text
//!   Tracking ── experiments  id ─► Experiment (name unique, tags, active | deleted)
//!            ├─ names        name ─► id
//!            └─ runs         id ─► Run (experiment, name, status, times, params, tags,
//!                                       metrics: key ─► history of (value, timestamp, step), latest)
//! ```
//!
//! Every change is a method that checks everything first and then changes, so a refused request changes
//! nothing; it takes the time and the new ids as arguments (chosen by the proposer), so applying it is
//! deterministic on every replica. Maps are persistent (`imbl`), so a snapshot is a cheap clone.
//!
//! MLflow's rules kept here: experiment names are unique among live and deleted experiments; experiment
//! "0", "Default", always exists; a param, once logged, cannot change value; tags can be overwritten;
//! metrics keep their whole history and search uses the latest value (highest step, then timestamp);
//! a deleted run or experiment takes no writes until restored. Limits are MLflow's: keys up to 250
//! characters, param values up to 6,000, tag values up to 8,000, and per batch 1,000 metrics, 100 params
//! and 100 tags.

use imbl::{OrdMap, Vector};
use serde::{Deserialize, Serialize};

use crate::registry::{Registry, RegistryCommand, RegistryOutcome};

mod logged;
use crate::search::{Filter, Order, SearchableRun, TextAttribute, TimeAttribute};
pub use logged::{LoggedModel, LoggedModelCommand, LoggedModelSearch, LoggedModelStatus, logged_model_of};

const KEY_CHARS_MAX: usize = 250;
const PARAM_VALUE_CHARS_MAX: usize = 6_000;
const TAG_VALUE_CHARS_MAX: usize = 8_000;
const BATCH_METRICS_MAX: usize = 1_000;
const BATCH_PARAMS_MAX: usize = 100;
const BATCH_TAGS_MAX: usize = 100;
/// A dataset's source, schema and profile (JSON texts) at most.
const DATASET_TEXT_CHARS_MAX: usize = 1 << 20;
/// The most runs one search page returns (MLflow's limit).
pub const SEARCH_RESULTS_MAX: usize = 50_000;
pub const DEFAULT_EXPERIMENT_ID: &str = "0";
/// The artifact root experiments record: MLflow's proxied scheme, which clients resolve against the tracking
/// server they talk to (`mlflow-artifacts:/1/RUN/artifacts` is `/api/2.0/mlflow-artifacts/artifacts/1/RUN/…`).
pub const PROXIED_ARTIFACT_ROOT: &str = "mlflow-artifacts:";

/// MLflow's error codes, which its REST API returns and its client understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    InvalidParameterValue,
    ResourceAlreadyExists,
    ResourceDoesNotExist,
    InvalidState,
}

impl ErrorCode {
    /// The code as MLflow spells it in `error_code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidParameterValue => "INVALID_PARAMETER_VALUE",
            ErrorCode::ResourceAlreadyExists => "RESOURCE_ALREADY_EXISTS",
            ErrorCode::ResourceDoesNotExist => "RESOURCE_DOES_NOT_EXIST",
            ErrorCode::InvalidState => "INVALID_STATE",
        }
    }
}

/// Why a tracking request was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct TrackingError {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse<T>(code: ErrorCode, message: String) -> Result<T, TrackingError> {
    Err(TrackingError { code, message })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LifecycleStage {
    Active,
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    Running,
    Scheduled,
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Scheduled => "SCHEDULED",
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }

    pub fn parse(text: &str) -> Result<RunStatus, TrackingError> {
        Ok(match text {
            "RUNNING" => RunStatus::Running,
            "SCHEDULED" => RunStatus::Scheduled,
            "FINISHED" => RunStatus::Finished,
            "FAILED" => RunStatus::Failed,
            "KILLED" => RunStatus::Killed,
            other => {
                return refuse(
                    ErrorCode::InvalidParameterValue,
                    format!(
                        "run status '{other}' is not known; expected RUNNING, SCHEDULED, FINISHED, FAILED or KILLED"
                    ),
                );
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub id: String,
    pub name: String,
    pub artifact_location: String,
    pub lifecycle_stage: LifecycleStage,
    pub tags: OrdMap<String, String>,
    pub creation_time_ms: i64,
    pub last_update_time_ms: i64,
}

/// One logged value of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub value: f64,
    pub timestamp_ms: i64,
    pub step: i64,
}

impl MetricPoint {
    /// Whether this point supersedes `other` as the latest value: MLflow orders by step, then timestamp,
    /// then value.
    fn supersedes(&self, other: &MetricPoint) -> bool {
        (self.step, self.timestamp_ms)
            .cmp(&(other.step, other.timestamp_ms))
            .then(self.value.total_cmp(&other.value))
            != std::cmp::Ordering::Less
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub experiment_id: String,
    pub name: String,
    pub user_id: String,
    pub status: RunStatus,
    pub start_time_ms: i64,
    pub end_time_ms: Option<i64>,
    pub lifecycle_stage: LifecycleStage,
    pub artifact_uri: String,
    pub params: OrdMap<String, String>,
    pub tags: OrdMap<String, String>,
    pub metrics: OrdMap<String, Vector<MetricPoint>>,
    pub latest: OrdMap<String, MetricPoint>,
}

impl SearchableRun for Run {
    fn metric(&self, key: &str) -> Option<f64> {
        self.latest.get(key).map(|point| point.value)
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }

    fn text_attribute(&self, attribute: TextAttribute) -> Option<&str> {
        Some(match attribute {
            TextAttribute::RunId => &self.id,
            TextAttribute::RunName => &self.name,
            TextAttribute::Status => self.status.as_str(),
            TextAttribute::ArtifactUri => &self.artifact_uri,
            TextAttribute::UserId => &self.user_id,
        })
    }

    fn time_attribute(&self, attribute: TimeAttribute) -> Option<i64> {
        match attribute {
            TimeAttribute::StartTime => Some(self.start_time_ms),
            TimeAttribute::EndTime => self.end_time_ms,
        }
    }
}

/// An experiment as MLflow's experiment search sees it, through the run keys: `name` is the run-name slot,
/// `experiment_id` the run-id slot, `creation_time` and `last_update_time` the start and end times.
impl SearchableRun for Experiment {
    fn metric(&self, _key: &str) -> Option<f64> {
        None
    }

    fn param(&self, _key: &str) -> Option<&str> {
        None
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }

    fn text_attribute(&self, attribute: TextAttribute) -> Option<&str> {
        match attribute {
            TextAttribute::RunName => Some(&self.name),
            TextAttribute::RunId => Some(&self.id),
            _ => None,
        }
    }

    fn time_attribute(&self, attribute: TimeAttribute) -> Option<i64> {
        Some(match attribute {
            TimeAttribute::StartTime => self.creation_time_ms,
            TimeAttribute::EndTime => self.last_update_time_ms,
        })
    }
}

/// What a batch logs to a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogBatch {
    pub metrics: Vec<(String, MetricPoint)>,
    pub params: Vec<(String, String)>,
    pub tags: Vec<(String, String)>,
}

/// Which runs a search sees by lifecycle stage (MLflow's `run_view_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ViewType {
    #[default]
    ActiveOnly,
    DeletedOnly,
    All,
}

impl ViewType {
    fn shows(self, stage: LifecycleStage) -> bool {
        match self {
            ViewType::ActiveOnly => stage == LifecycleStage::Active,
            ViewType::DeletedOnly => stage == LifecycleStage::Deleted,
            ViewType::All => true,
        }
    }
}

/// A search for runs.
#[derive(Debug, Clone, Default)]
pub struct RunSearch {
    pub experiment_ids: Vec<String>,
    pub filter: Filter,
    pub order_by: Vec<Order>,
    pub view: ViewType,
    pub max_results: usize,
    /// Where the previous page ended (the `next_page_token` it returned).
    pub page_token: Option<String>,
}

/// A search for experiments (MLflow's `experiments/search`).
#[derive(Debug, Clone, Default)]
pub struct ExperimentSearch {
    pub filter: Filter,
    pub order_by: Vec<Order>,
    pub view: ViewType,
    pub max_results: usize,
    pub page_token: Option<String>,
}

/// One page of a search, and the token of the next when there is one.
#[derive(Debug, Clone)]
pub struct RunPage {
    pub runs: Vec<Run>,
    pub next_page_token: Option<String>,
}

/// A replicated write to the tracking store. Ids and times are chosen by the proposer, so every replica
/// applies the same change; `artifact_root` is the proposer's configured root, used only for the Default
/// experiment on the first write and for experiments created without a location.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrackingCommand {
    CreateExperiment {
        name: String,
        artifact_location: Option<String>,
        tags: Vec<(String, String)>,
        artifact_root: String,
    },
    RenameExperiment {
        id: String,
        name: String,
        artifact_root: String,
    },
    SetExperimentStage {
        id: String,
        deleted: bool,
        artifact_root: String,
    },
    CreateRun {
        run_id: String,
        experiment_id: String,
        name: String,
        user_id: String,
        start_time_ms: i64,
        tags: Vec<(String, String)>,
        artifact_root: String,
    },
    LogBatch {
        run_id: String,
        batch: LogBatch,
        artifact_root: String,
    },
    DeleteTag {
        run_id: String,
        key: String,
        artifact_root: String,
    },
    UpdateRun {
        run_id: String,
        status: Option<RunStatus>,
        end_time_ms: Option<i64>,
        name: Option<String>,
        artifact_root: String,
    },
    SetRunStage {
        run_id: String,
        deleted: bool,
        artifact_root: String,
    },
    /// An artifact was stored at `path` (written after its bytes are durable in the artifact store).
    RecordArtifact {
        path: String,
        size: u64,
        sha256: String,
        artifact_root: String,
    },
    /// Artifacts were deleted.
    ForgetArtifacts { paths: Vec<String>, artifact_root: String },
    /// Datasets a run used (MLflow's `log-inputs`); an input already logged is not repeated.
    LogInputs {
        run_id: String,
        inputs: Vec<DatasetInput>,
        artifact_root: String,
    },
    /// A write to MLflow 3's logged models.
    LogModel {
        command: LoggedModelCommand,
        artifact_root: String,
    },
    /// A write to the model registry, by `user_id`.
    Register {
        command: RegistryCommand,
        user_id: String,
        artifact_root: String,
    },
    /// Logged models a run produced, with the step of each (MLflow 3's `runs/outputs`); an output already
    /// logged is not repeated. After the older commands, so that older log entries keep their variant
    /// numbers.
    LogOutputs {
        run_id: String,
        models: Vec<(String, i64)>,
        artifact_root: String,
    },
    /// An artifact was stored for `path` in the object `object` (an upload that replaced a recorded
    /// artifact; see [`ArtifactRecord::object`]).
    RecordArtifactAt {
        path: String,
        size: u64,
        sha256: String,
        object: String,
        artifact_root: String,
    },
    /// [`TrackingCommand::LogBatch`] where some metrics are also a logged model's (`models`); all or
    /// nothing, and every model must exist.
    LogBatchForModels {
        run_id: String,
        batch: LogBatch,
        models: Vec<MetricModel>,
        artifact_root: String,
    },
}

impl TrackingCommand {
    fn artifact_root(&self) -> &str {
        match self {
            TrackingCommand::CreateExperiment { artifact_root, .. }
            | TrackingCommand::RenameExperiment { artifact_root, .. }
            | TrackingCommand::SetExperimentStage { artifact_root, .. }
            | TrackingCommand::CreateRun { artifact_root, .. }
            | TrackingCommand::LogBatch { artifact_root, .. }
            | TrackingCommand::DeleteTag { artifact_root, .. }
            | TrackingCommand::UpdateRun { artifact_root, .. }
            | TrackingCommand::SetRunStage { artifact_root, .. }
            | TrackingCommand::Register { artifact_root, .. }
            | TrackingCommand::RecordArtifact { artifact_root, .. }
            | TrackingCommand::LogModel { artifact_root, .. }
            | TrackingCommand::LogInputs { artifact_root, .. }
            | TrackingCommand::LogOutputs { artifact_root, .. }
            | TrackingCommand::RecordArtifactAt { artifact_root, .. }
            | TrackingCommand::LogBatchForModels { artifact_root, .. }
            | TrackingCommand::ForgetArtifacts { artifact_root, .. } => artifact_root,
        }
    }
}

/// Where a job's run goes (`None`: the Default experiment) and the tags it carries besides the job's.
/// A sweep's trials go to the sweep's experiment, tagged with the sweep and their number.
#[derive(Debug, Clone, Default)]
pub struct JobRunPlace {
    pub experiment: Option<String>,
    pub tags: Vec<(String, String)>,
}

/// What a tracking command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrackingOutcome {
    Experiment(Experiment),
    Run(Run),
    Registered(RegistryOutcome),
    LoggedModel(LoggedModel),
    Done,
}

fn check_key(key: &str, what: &str) -> Result<(), TrackingError> {
    if key.is_empty() || key.chars().count() > KEY_CHARS_MAX {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!("{what} key '{key}' must have 1 to {KEY_CHARS_MAX} characters"),
        );
    }
    // MLflow's rule: letters, digits, and _ - . space / (keys become file names in its file store).
    if let Some(bad) = key
        .chars()
        .find(|character| !(character.is_alphanumeric() || "_-. /".contains(*character)))
    {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!("{what} key '{key}' contains '{bad}'; expected letters, digits, spaces and _ - . /"),
        );
    }
    if key.split('/').any(|part| part == ".." || part == ".") || key.starts_with('/') {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!("{what} key '{key}' is not a relative path without '.' or '..' parts"),
        );
    }
    Ok(())
}

fn check_value(value: &str, limit: usize, what: &str, key: &str) -> Result<(), TrackingError> {
    if value.chars().count() > limit {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!(
                "{what} '{key}' has a value of {} characters; at most {limit} are allowed",
                value.chars().count()
            ),
        );
    }
    Ok(())
}

/// Experiments and runs, as the coordinator replicates them. Empty until the first write, which creates
/// the Default experiment under the artifact root its proposer was configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tracking {
    experiments: OrdMap<String, Experiment>,
    names: OrdMap<String, String>,
    runs: OrdMap<String, Run>,
    next_experiment: u64,
    registry: Registry,
    /// What was stored at each artifact path (`1/RUN/artifacts/model/weights.bin`), as its upload measured.
    artifacts: OrdMap<String, ArtifactRecord>,
    /// MLflow 3's logged models by id.
    logged_models: OrdMap<String, LoggedModel>,
    /// The last numbered report applied per job: (attempt, sequence).
    job_reports: OrdMap<u64, (u32, u64)>,
    /// Datasets runs used, by digest (a feature service's training set: its content hash).
    datasets: OrdMap<String, Dataset>,
    /// Each run's inputs, as MLflow's `log-inputs` records them: (dataset digest, tags).
    run_inputs: OrdMap<String, Vector<RunInput>>,
    /// Each run's outputs, as MLflow 3's `runs/outputs` records them: (logged model id, step), in the order
    /// logged.
    run_outputs: OrdMap<String, Vector<(String, i64)>>,
    /// Metric points logged for a logged model (MLflow 3's `model_id` on a metric), by model id, in the
    /// order logged.
    model_metrics: OrdMap<String, Vector<ModelMetric>>,
}

/// A metric point logged for a logged model: which run logged it, and on which dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetric {
    pub key: String,
    pub point: MetricPoint,
    pub run_id: String,
    pub dataset_name: String,
    pub dataset_digest: String,
}

/// Which logged model the metric at `index` of a batch is for (MLflow 3's `model_id`, `dataset_name` and
/// `dataset_digest` on a metric).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricModel {
    pub index: usize,
    pub model_id: String,
    pub dataset_name: String,
    pub dataset_digest: String,
}

/// One input of a run: the dataset's digest and the input's tags.
pub type RunInput = (String, OrdMap<String, String>);

/// A dataset a run used (MLflow's `Dataset`): what it is called, its digest, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    pub name: String,
    pub digest: String,
    pub source_type: String,
    pub source: String,
    pub schema: String,
    pub profile: String,
}

/// A dataset given as a run's input, with the input's tags (`mlflow.data.context`: training, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetInput {
    pub dataset: Dataset,
    pub tags: Vec<(String, String)>,
}

/// An artifact as stored: its size and SHA-256, so a download can be checked, and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub size: u64,
    pub sha256: String,
    pub stored_ms: i64,
    /// The object holding the bytes when it is not the artifact's own path: an upload that replaced a
    /// recorded artifact went to an object of its own, so the bytes it replaced stayed whole until this
    /// record said otherwise ([`crate::artifacts::upload_object`]).
    pub object: Option<String>,
}

impl ArtifactRecord {
    /// The object in the artifact store that holds the bytes of the artifact at `path`.
    pub fn object_of<'a>(record: Option<&'a ArtifactRecord>, path: &'a str) -> &'a str {
        record.and_then(|record| record.object.as_deref()).unwrap_or(path)
    }
}

impl Default for Tracking {
    fn default() -> Tracking {
        Tracking {
            experiments: OrdMap::new(),
            names: OrdMap::new(),
            runs: OrdMap::new(),
            next_experiment: 1,
            registry: Registry::default(),
            artifacts: OrdMap::new(),
            logged_models: OrdMap::new(),
            job_reports: OrdMap::new(),
            datasets: OrdMap::new(),
            run_inputs: OrdMap::new(),
            run_outputs: OrdMap::new(),
            model_metrics: OrdMap::new(),
        }
    }
}

/// The tracking store of snapshot format 5: no registry.
pub(crate) mod version5 {
    use super::*;

    #[derive(Deserialize)]
    pub(crate) struct Tracking {
        experiments: OrdMap<String, Experiment>,
        names: OrdMap<String, String>,
        runs: OrdMap<String, Run>,
        next_experiment: u64,
    }

    impl Tracking {
        pub(crate) fn upgrade(self) -> super::Tracking {
            super::Tracking {
                experiments: self.experiments,
                names: self.names,
                runs: self.runs,
                next_experiment: self.next_experiment,
                registry: Registry::default(),
                artifacts: OrdMap::new(),
                logged_models: OrdMap::new(),
                job_reports: OrdMap::new(),
                datasets: OrdMap::new(),
                run_inputs: OrdMap::new(),
                run_outputs: OrdMap::new(),
                model_metrics: OrdMap::new(),
            }
        }
    }
}

/// The tracking store of snapshot formats 6 and 7: no run outputs or model metrics, and artifacts only at
/// their own paths.
pub(crate) mod version7 {
    use super::*;

    #[derive(Clone, Deserialize)]
    pub(crate) struct ArtifactRecord {
        size: u64,
        sha256: String,
        stored_ms: i64,
    }

    #[derive(Deserialize)]
    pub(crate) struct Tracking {
        experiments: OrdMap<String, Experiment>,
        names: OrdMap<String, String>,
        runs: OrdMap<String, Run>,
        next_experiment: u64,
        registry: Registry,
        artifacts: OrdMap<String, ArtifactRecord>,
        logged_models: OrdMap<String, LoggedModel>,
        job_reports: OrdMap<u64, (u32, u64)>,
        datasets: OrdMap<String, Dataset>,
        run_inputs: OrdMap<String, Vector<RunInput>>,
    }

    impl Tracking {
        pub(crate) fn upgrade(self) -> super::Tracking {
            super::Tracking {
                experiments: self.experiments,
                names: self.names,
                runs: self.runs,
                next_experiment: self.next_experiment,
                registry: self.registry,
                artifacts: self
                    .artifacts
                    .into_iter()
                    .map(|(path, record)| {
                        let record = super::ArtifactRecord {
                            size: record.size,
                            sha256: record.sha256.clone(),
                            stored_ms: record.stored_ms,
                            object: None,
                        };
                        (path, record)
                    })
                    .collect(),
                logged_models: self.logged_models,
                job_reports: self.job_reports,
                datasets: self.datasets,
                run_inputs: self.run_inputs,
                run_outputs: OrdMap::new(),
                model_metrics: OrdMap::new(),
            }
        }
    }
}

impl Tracking {
    /// A store with only the Default experiment; artifacts live under `artifact_root` (a URI).
    pub fn new(artifact_root: &str, now_ms: i64) -> Tracking {
        let mut tracking = Tracking::default();
        tracking.ensure_default_experiment(artifact_root, now_ms);
        tracking
    }

    /// Creates the Default experiment ("0") under `artifact_root` unless it exists. One made by a job's run
    /// before any write carried a root has no location until a write brings one.
    pub fn ensure_default_experiment(&mut self, artifact_root: &str, now_ms: i64) {
        let location = if artifact_root.is_empty() {
            String::new()
        } else {
            format!("{}/{DEFAULT_EXPERIMENT_ID}", artifact_root.trim_end_matches('/'))
        };
        let default = match self.experiments.get(DEFAULT_EXPERIMENT_ID) {
            Some(default) if default.artifact_location.is_empty() && !location.is_empty() => Experiment {
                artifact_location: location,
                ..default.clone()
            },
            Some(_) => return,
            None => Experiment {
                id: DEFAULT_EXPERIMENT_ID.into(),
                name: "Default".into(),
                artifact_location: location,
                lifecycle_stage: LifecycleStage::Active,
                tags: OrdMap::new(),
                creation_time_ms: now_ms,
                last_update_time_ms: now_ms,
            },
        };
        self.names.insert(default.name.clone(), default.id.clone());
        self.experiments.insert(default.id.clone(), default);
    }

    /// The run of Kiln job `job`: 32 hex digits that no MLflow client's run can have (theirs start with the
    /// time).
    pub fn job_run_id(job: u64) -> String {
        format!("{job:032x}")
    }

    /// Starts the run of a train job in the Default experiment, with the job's hyperparameters as params,
    /// its id as tag `kiln.job_id` and the SHA-256 of its spec as `kiln.spec_sha256`. Part of applying the
    /// job's submission: deterministic, and a no-op if the run exists. (The code version, MLflow's
    /// `mlflow.source.git.commit`, is set by the job's rank 0, which sees its working directory.)
    pub fn start_job_run(
        &mut self,
        job: u64,
        name: &str,
        params: &[(String, String)],
        spec_hash: &str,
        place: &JobRunPlace,
        now_ms: i64,
    ) {
        let run_id = Tracking::job_run_id(job);
        if self.runs.contains_key(&run_id) {
            return;
        }
        self.ensure_default_experiment(PROXIED_ARTIFACT_ROOT, now_ms);
        // A named experiment is made on first use; one deleted meanwhile sends the run to Default.
        let experiment = match &place.experiment {
            Some(experiment) => match self.names.get(experiment) {
                Some(id) => id.clone(),
                None => self
                    .create_experiment(experiment, None, PROXIED_ARTIFACT_ROOT, &[], now_ms)
                    .unwrap_or_else(|_| DEFAULT_EXPERIMENT_ID.to_string()),
            },
            None => DEFAULT_EXPERIMENT_ID.to_string(),
        };
        let mut tags = vec![
            ("kiln.job_id".to_string(), job.to_string()),
            ("kiln.spec_sha256".to_string(), spec_hash.to_string()),
        ];
        tags.extend(place.tags.iter().cloned());
        let created = self
            .create_run(&run_id, &experiment, name, "kiln", now_ms, &tags)
            .is_ok()
            || (experiment != DEFAULT_EXPERIMENT_ID
                && self
                    .create_run(&run_id, DEFAULT_EXPERIMENT_ID, name, "kiln", now_ms, &tags)
                    .is_ok());
        if created {
            let batch = LogBatch {
                params: params.to_vec(),
                ..LogBatch::default()
            };
            // Keys a job spec allows are valid params; a refused batch leaves the run without them.
            let _ = self.log_batch(&run_id, &batch);
        }
    }

    /// The run of job `job`, when it has one that takes writes.
    fn active_job_run(&self, job: u64) -> Option<String> {
        let run_id = Tracking::job_run_id(job);
        self.runs
            .get(&run_id)
            .is_some_and(|run| run.lifecycle_stage == LifecycleStage::Active)
            .then_some(run_id)
    }

    /// Logs a train job's reported metrics into its run (if it has one), at the reported `step` (or `epoch`).
    /// Metrics whose names MLflow would refuse are left out.
    pub fn log_job_metrics(&mut self, job: u64, metrics: &std::collections::BTreeMap<String, f64>, now_ms: i64) {
        let Some(run_id) = self.active_job_run(job) else {
            return;
        };
        let step = metrics
            .get("step")
            .or_else(|| metrics.get("epoch"))
            .copied()
            .unwrap_or(0.0) as i64;
        let batch = LogBatch {
            metrics: metrics
                .iter()
                .filter(|(key, _)| check_key(key, "metric").is_ok())
                .map(|(key, value)| {
                    let point = MetricPoint {
                        value: *value,
                        timestamp_ms: now_ms,
                        step,
                    };
                    (key.clone(), point)
                })
                .collect(),
            ..LogBatch::default()
        };
        let _ = self.log_batch(&run_id, &batch);
    }

    /// Whether report `sequence` of `attempt` of `job` was applied already (a retry); never for 0.
    pub fn job_report_applied(&self, job: u64, attempt: u32, sequence: u64) -> bool {
        sequence != 0
            && self
                .job_reports
                .get(&job)
                .is_some_and(|last| *last >= (attempt, sequence))
    }

    /// Remembers report `sequence` of `attempt` of `job` as applied.
    pub fn note_job_report(&mut self, job: u64, attempt: u32, sequence: u64) {
        if sequence != 0 {
            self.job_reports.insert(job, (attempt, sequence));
        }
    }

    /// Logs a train job's metric points, each at its own step, into its run (if it has one). Points whose
    /// names MLflow would refuse are left out.
    pub fn log_job_points(&mut self, job: u64, points: Vec<(String, MetricPoint)>) {
        let Some(run_id) = self.active_job_run(job) else {
            return;
        };
        // One batch per MLflow's limit, so a large report is logged whole.
        let points: Vec<(String, MetricPoint)> = points
            .into_iter()
            .filter(|(key, _)| check_key(key, "metric").is_ok())
            .collect();
        for chunk in points.chunks(BATCH_METRICS_MAX) {
            let batch = LogBatch {
                metrics: chunk.to_vec(),
                ..LogBatch::default()
            };
            let _ = self.log_batch(&run_id, &batch);
        }
    }

    /// Ends a job's run (if it has one and it is still running) with the job's outcome.
    pub fn finish_job_run(&mut self, job: u64, status: RunStatus, end_ms: i64) {
        let run_id = Tracking::job_run_id(job);
        if self
            .runs
            .get(&run_id)
            .is_some_and(|run| run.status == RunStatus::Running)
        {
            let _ = self.update_run(&run_id, Some(status), Some(end_ms), None);
        }
    }

    /// Applies one replicated tracking command (see [`TrackingCommand`]); the Default experiment is made
    /// first if this is the first write.
    pub fn apply(&mut self, command: TrackingCommand, now_ms: i64) -> Result<TrackingOutcome, TrackingError> {
        // A refused command changes nothing, not even the Default experiment (the clone shares structure).
        let before = self.clone();
        self.ensure_default_experiment(command.artifact_root(), now_ms);
        let result = self.apply_checked(command, now_ms);
        if result.is_err() {
            *self = before;
        }
        result
    }

    fn apply_checked(&mut self, command: TrackingCommand, now_ms: i64) -> Result<TrackingOutcome, TrackingError> {
        match command {
            TrackingCommand::CreateExperiment {
                name,
                artifact_location,
                tags,
                artifact_root,
            } => {
                let id = self.create_experiment(&name, artifact_location.as_deref(), &artifact_root, &tags, now_ms)?;
                Ok(TrackingOutcome::Experiment(self.experiment(&id)?.clone()))
            }
            TrackingCommand::RenameExperiment { id, name, .. } => {
                self.rename_experiment(&id, &name, now_ms)?;
                Ok(TrackingOutcome::Experiment(self.experiment(&id)?.clone()))
            }
            TrackingCommand::SetExperimentStage { id, deleted, .. } => {
                self.set_experiment_stage(&id, deleted, now_ms)?;
                Ok(TrackingOutcome::Experiment(self.experiment(&id)?.clone()))
            }
            TrackingCommand::CreateRun {
                run_id,
                experiment_id,
                name,
                user_id,
                start_time_ms,
                tags,
                ..
            } => Ok(TrackingOutcome::Run(
                self.create_run(&run_id, &experiment_id, &name, &user_id, start_time_ms, &tags)?
                    .clone(),
            )),
            TrackingCommand::LogBatch { run_id, batch, .. } => {
                self.log_batch(&run_id, &batch)?;
                Ok(TrackingOutcome::Done)
            }
            TrackingCommand::LogBatchForModels {
                run_id, batch, models, ..
            } => {
                self.log_batch_for_models(&run_id, &batch, models)?;
                Ok(TrackingOutcome::Done)
            }
            TrackingCommand::DeleteTag { run_id, key, .. } => {
                self.delete_tag(&run_id, &key)?;
                Ok(TrackingOutcome::Done)
            }
            TrackingCommand::UpdateRun {
                run_id,
                status,
                end_time_ms,
                name,
                ..
            } => Ok(TrackingOutcome::Run(
                self.update_run(&run_id, status, end_time_ms, name.as_deref())?.clone(),
            )),
            TrackingCommand::SetRunStage { run_id, deleted, .. } => {
                self.set_run_stage(&run_id, deleted)?;
                Ok(TrackingOutcome::Run(self.run(&run_id)?.clone()))
            }
            TrackingCommand::LogInputs { run_id, inputs, .. } => {
                self.log_inputs(&run_id, inputs)?;
                Ok(TrackingOutcome::Done)
            }
            TrackingCommand::LogOutputs { run_id, models, .. } => {
                self.log_outputs(&run_id, models)?;
                Ok(TrackingOutcome::Done)
            }
            TrackingCommand::LogModel { command, .. } => Ok(match self.apply_logged_model(command, now_ms)? {
                Some(model) => TrackingOutcome::LoggedModel(model),
                None => TrackingOutcome::Done,
            }),
            TrackingCommand::RecordArtifact { path, size, sha256, .. } => {
                let record = ArtifactRecord {
                    size,
                    sha256,
                    stored_ms: now_ms,
                    object: None,
                };
                self.artifacts.insert(path, record);
                Ok(TrackingOutcome::Done)
            }
            TrackingCommand::RecordArtifactAt {
                path,
                size,
                sha256,
                object,
                ..
            } => {
                let record = ArtifactRecord {
                    size,
                    sha256,
                    stored_ms: now_ms,
                    object: Some(object),
                };
                self.artifacts.insert(path, record);
                Ok(TrackingOutcome::Done)
            }
            TrackingCommand::ForgetArtifacts { paths, .. } => {
                for path in paths {
                    self.artifacts.remove(&path);
                }
                Ok(TrackingOutcome::Done)
            }
            TrackingCommand::Register { command, user_id, .. } => {
                let runs = &self.runs;
                let run_metrics = |run_id: &str| {
                    runs.get(run_id).map(|run| {
                        run.latest
                            .iter()
                            .map(|(key, point)| (key.clone(), point.value))
                            .collect()
                    })
                };
                let outcome = self.registry.apply(command, &user_id, now_ms, run_metrics)?;
                Ok(TrackingOutcome::Registered(outcome))
            }
        }
    }

    /// The model registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records datasets as inputs of an active run. A dataset is known by its digest; logging the same
    /// dataset with the same tags again changes nothing.
    pub fn log_inputs(&mut self, run_id: &str, inputs: Vec<DatasetInput>) -> Result<(), TrackingError> {
        self.active_run(run_id)?;
        for input in &inputs {
            let dataset = &input.dataset;
            if dataset.name.is_empty() || dataset.digest.is_empty() {
                return refuse(
                    ErrorCode::InvalidParameterValue,
                    "a dataset input needs a name and a digest".into(),
                );
            }
            check_value(&dataset.name, KEY_CHARS_MAX, "dataset", "name")?;
            check_value(&dataset.digest, KEY_CHARS_MAX, "dataset", "digest")?;
            for (text, what) in [
                (&dataset.source, "source"),
                (&dataset.schema, "schema"),
                (&dataset.profile, "profile"),
            ] {
                check_value(text, DATASET_TEXT_CHARS_MAX, "dataset", what)?;
            }
            for (key, value) in &input.tags {
                check_key(key, "input tag")?;
                check_value(value, TAG_VALUE_CHARS_MAX, "input tag", key)?;
            }
        }
        let mut logged = self.run_inputs.get(run_id).cloned().unwrap_or_default();
        for input in inputs {
            let entry = (input.dataset.digest.clone(), input.tags.into_iter().collect());
            if !logged.contains(&entry) {
                logged.push_back(entry);
            }
            self.datasets.insert(input.dataset.digest.clone(), input.dataset);
        }
        self.run_inputs.insert(run_id.to_string(), logged);
        Ok(())
    }

    /// The datasets run `run_id` used, with each input's tags.
    /// Records that run `run_id` produced the logged models `models` (id, step); each must exist.
    pub fn log_outputs(&mut self, run_id: &str, models: Vec<(String, i64)>) -> Result<(), TrackingError> {
        self.active_run(run_id)?;
        for (model_id, _) in &models {
            self.logged_model(model_id)?;
        }
        let mut logged = self.run_outputs.get(run_id).cloned().unwrap_or_default();
        for output in models {
            if !logged.contains(&output) {
                logged.push_back(output);
            }
        }
        self.run_outputs.insert(run_id.to_string(), logged);
        Ok(())
    }

    /// [`Tracking::log_batch`], with the metrics `models` names also logged for those logged models.
    pub fn log_batch_for_models(
        &mut self,
        run_id: &str,
        batch: &LogBatch,
        models: Vec<MetricModel>,
    ) -> Result<(), TrackingError> {
        for model in &models {
            self.logged_model(&model.model_id)?;
            if model.index >= batch.metrics.len() {
                return refuse(
                    ErrorCode::InvalidParameterValue,
                    format!(
                        "metric {} of a batch of {} names a model",
                        model.index,
                        batch.metrics.len()
                    ),
                );
            }
        }
        self.log_batch(run_id, batch)?;
        for model in models {
            let (key, point) = &batch.metrics[model.index];
            let metric = ModelMetric {
                key: key.clone(),
                point: *point,
                run_id: run_id.to_string(),
                dataset_name: model.dataset_name,
                dataset_digest: model.dataset_digest,
            };
            let mut logged = self.model_metrics.get(&model.model_id).cloned().unwrap_or_default();
            logged.push_back(metric);
            self.model_metrics.insert(model.model_id, logged);
        }
        Ok(())
    }

    /// The metric points logged for logged model `model_id`, in the order logged.
    pub fn model_metrics(&self, model_id: &str) -> Vec<ModelMetric> {
        self.model_metrics
            .get(model_id)
            .map(|metrics| metrics.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The logged models run `run_id` produced, (id, step), in the order logged.
    pub fn outputs_of(&self, run_id: &str) -> Vec<(String, i64)> {
        self.run_outputs
            .get(run_id)
            .map(|outputs| outputs.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn inputs_of(&self, run_id: &str) -> Vec<(&Dataset, &OrdMap<String, String>)> {
        self.run_inputs
            .get(run_id)
            .map(|inputs| {
                inputs
                    .iter()
                    .filter_map(|(digest, tags)| Some((self.datasets.get(digest)?, tags)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every run and the datasets it used.
    pub fn all_inputs(&self) -> impl Iterator<Item = (&String, &Vector<RunInput>)> {
        self.run_inputs.iter()
    }

    pub fn dataset(&self, digest: &str) -> Option<&Dataset> {
        self.datasets.get(digest)
    }

    /// Every recorded artifact path and what was stored there.
    pub fn artifacts(&self) -> impl Iterator<Item = (&String, &ArtifactRecord)> {
        self.artifacts.iter()
    }

    /// The recorded artifacts whose paths start with `prefix` (a run's `0/RUN/artifacts/`), in path order,
    /// found by a range of the ordered map rather than a walk of every artifact.
    pub fn artifacts_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a ArtifactRecord)> {
        self.artifacts
            .range(prefix.to_string()..)
            .take_while(move |(path, _)| path.starts_with(prefix))
    }

    /// Every logged model.
    pub fn logged_models(&self) -> impl Iterator<Item = &LoggedModel> {
        self.logged_models.values()
    }

    /// Every run.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.values()
    }

    /// What was stored at artifact `path`, if its upload was recorded.
    pub fn artifact(&self, path: &str) -> Option<&ArtifactRecord> {
        self.artifacts.get(path)
    }

    pub fn experiment(&self, id: &str) -> Result<&Experiment, TrackingError> {
        self.experiments.get(id).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("no experiment has id '{id}'"),
        })
    }

    pub fn experiment_by_name(&self, name: &str) -> Result<&Experiment, TrackingError> {
        match self.names.get(name) {
            Some(id) => self.experiment(id),
            None => refuse(
                ErrorCode::ResourceDoesNotExist,
                format!("no experiment is named '{name}'"),
            ),
        }
    }

    pub fn experiments(&self) -> impl Iterator<Item = &Experiment> {
        self.experiments.values()
    }

    pub fn run(&self, id: &str) -> Result<&Run, TrackingError> {
        self.runs.get(id).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("no run has id '{id}'"),
        })
    }

    fn active_experiment(&self, id: &str) -> Result<&Experiment, TrackingError> {
        let experiment = self.experiment(id)?;
        if experiment.lifecycle_stage != LifecycleStage::Active {
            return refuse(
                ErrorCode::InvalidState,
                format!("experiment '{}' ({id}) is deleted; restore it first", experiment.name),
            );
        }
        Ok(experiment)
    }

    fn active_run(&self, id: &str) -> Result<&Run, TrackingError> {
        let run = self.run(id)?;
        if run.lifecycle_stage != LifecycleStage::Active {
            return refuse(
                ErrorCode::InvalidState,
                format!("run '{id}' is deleted; restore it first"),
            );
        }
        Ok(run)
    }

    /// Creates an experiment named `name`; returns its id. Ids count up from 1 ("0" is Default).
    pub fn create_experiment(
        &mut self,
        name: &str,
        artifact_location: Option<&str>,
        artifact_root: &str,
        tags: &[(String, String)],
        now_ms: i64,
    ) -> Result<String, TrackingError> {
        if name.trim().is_empty() {
            return refuse(
                ErrorCode::InvalidParameterValue,
                "an experiment needs a non-empty name".into(),
            );
        }
        if let Some(id) = self.names.get(name) {
            return refuse(
                ErrorCode::ResourceAlreadyExists,
                format!("experiment '{name}' already exists (id {id}); names are unique, deleted experiments included"),
            );
        }
        for (key, value) in tags {
            check_key(key, "tag")?;
            check_value(value, TAG_VALUE_CHARS_MAX, "tag", key)?;
        }
        let id = self.next_experiment.to_string();
        let experiment = Experiment {
            id: id.clone(),
            name: name.to_string(),
            artifact_location: artifact_location
                .map(str::to_string)
                .unwrap_or_else(|| format!("{}/{id}", artifact_root.trim_end_matches('/'))),
            lifecycle_stage: LifecycleStage::Active,
            tags: tags.iter().cloned().collect(),
            creation_time_ms: now_ms,
            last_update_time_ms: now_ms,
        };
        self.next_experiment += 1;
        self.names.insert(name.to_string(), id.clone());
        self.experiments.insert(id.clone(), experiment);
        Ok(id)
    }

    pub fn rename_experiment(&mut self, id: &str, new_name: &str, now_ms: i64) -> Result<(), TrackingError> {
        let experiment = self.active_experiment(id)?.clone();
        if new_name.trim().is_empty() {
            return refuse(
                ErrorCode::InvalidParameterValue,
                "an experiment needs a non-empty name".into(),
            );
        }
        if experiment.name == new_name {
            return Ok(());
        }
        if self.names.contains_key(new_name) {
            return refuse(
                ErrorCode::ResourceAlreadyExists,
                format!("experiment '{new_name}' already exists"),
            );
        }
        self.names.remove(&experiment.name);
        self.names.insert(new_name.to_string(), id.to_string());
        self.experiments.insert(
            id.to_string(),
            Experiment {
                name: new_name.to_string(),
                last_update_time_ms: now_ms,
                ..experiment
            },
        );
        Ok(())
    }

    /// Deletes (`deleted`) or restores an experiment; its runs follow it.
    pub fn set_experiment_stage(&mut self, id: &str, deleted: bool, now_ms: i64) -> Result<(), TrackingError> {
        let experiment = self.experiment(id)?.clone();
        if deleted && id == DEFAULT_EXPERIMENT_ID {
            return refuse(
                ErrorCode::InvalidParameterValue,
                "the Default experiment cannot be deleted".into(),
            );
        }
        let stage = if deleted {
            LifecycleStage::Deleted
        } else {
            LifecycleStage::Active
        };
        let run_ids: Vec<String> = self
            .runs
            .values()
            .filter(|run| run.experiment_id == id)
            .map(|run| run.id.clone())
            .collect();
        for run_id in run_ids {
            let run = self.runs[&run_id].clone();
            self.runs.insert(
                run_id,
                Run {
                    lifecycle_stage: stage,
                    ..run
                },
            );
        }
        self.experiments.insert(
            id.to_string(),
            Experiment {
                lifecycle_stage: stage,
                last_update_time_ms: now_ms,
                ..experiment
            },
        );
        Ok(())
    }

    /// Creates run `run_id` (chosen by the proposer: 32 hex digits, as MLflow's) in an active experiment.
    pub fn create_run(
        &mut self,
        run_id: &str,
        experiment_id: &str,
        name: &str,
        user_id: &str,
        start_time_ms: i64,
        tags: &[(String, String)],
    ) -> Result<&Run, TrackingError> {
        if run_id.len() != 32 || !run_id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return refuse(
                ErrorCode::InvalidParameterValue,
                format!("run id '{run_id}' is not 32 hex digits"),
            );
        }
        if self.runs.contains_key(run_id) {
            return refuse(
                ErrorCode::ResourceAlreadyExists,
                format!("run '{run_id}' already exists"),
            );
        }
        let experiment = self.active_experiment(experiment_id)?;
        for (key, value) in tags {
            check_key(key, "tag")?;
            check_value(value, TAG_VALUE_CHARS_MAX, "tag", key)?;
        }
        let mut tags: OrdMap<String, String> = tags.iter().cloned().collect();
        // MLflow keeps the run's name in a tag as well, and takes the tag when no name is given.
        let name = if name.is_empty() {
            tags.get("mlflow.runName").cloned().unwrap_or_default()
        } else {
            name.to_string()
        };
        if !name.is_empty() {
            tags.insert("mlflow.runName".into(), name.clone());
        }
        let run = Run {
            id: run_id.to_string(),
            experiment_id: experiment_id.to_string(),
            name,
            user_id: user_id.to_string(),
            status: RunStatus::Running,
            start_time_ms,
            end_time_ms: None,
            lifecycle_stage: LifecycleStage::Active,
            // A job's run made before the Default experiment had a location has none either.
            artifact_uri: if experiment.artifact_location.is_empty() {
                String::new()
            } else {
                format!("{}/{run_id}/artifacts", experiment.artifact_location)
            },
            params: OrdMap::new(),
            tags,
            metrics: OrdMap::new(),
            latest: OrdMap::new(),
        };
        self.runs.insert(run_id.to_string(), run);
        Ok(&self.runs[run_id])
    }

    /// Logs metrics, params and tags to an active run, all or nothing.
    pub fn log_batch(&mut self, run_id: &str, batch: &LogBatch) -> Result<(), TrackingError> {
        let run = self.active_run(run_id)?;
        let too_many = |what: &str, count: usize, limit: usize| {
            refuse::<()>(
                ErrorCode::InvalidParameterValue,
                format!("a batch of {count} {what} is too large; at most {limit} per batch"),
            )
        };
        if batch.metrics.len() > BATCH_METRICS_MAX {
            return too_many("metrics", batch.metrics.len(), BATCH_METRICS_MAX);
        }
        if batch.params.len() > BATCH_PARAMS_MAX {
            return too_many("params", batch.params.len(), BATCH_PARAMS_MAX);
        }
        if batch.tags.len() > BATCH_TAGS_MAX {
            return too_many("tags", batch.tags.len(), BATCH_TAGS_MAX);
        }
        // Any f64 is a metric value, NaN and infinities included (MLflow stores them too).
        for (key, _) in &batch.metrics {
            check_key(key, "metric")?;
        }
        let mut params_seen: OrdMap<&str, &str> = OrdMap::new();
        for (key, value) in &batch.params {
            check_key(key, "param")?;
            check_value(value, PARAM_VALUE_CHARS_MAX, "param", key)?;
            let earlier = run
                .params
                .get(key)
                .map(String::as_str)
                .or_else(|| params_seen.get(key.as_str()).copied());
            if let Some(earlier) = earlier.filter(|earlier| earlier != value) {
                return refuse(
                    ErrorCode::InvalidParameterValue,
                    format!(
                        "param '{key}' of run {run_id} is already '{earlier}'; a param cannot change value (log a new run, or use a tag or a metric)"
                    ),
                );
            }
            params_seen.insert(key, value);
        }
        for (key, value) in &batch.tags {
            check_key(key, "tag")?;
            check_value(value, TAG_VALUE_CHARS_MAX, "tag", key)?;
        }
        let mut run = run.clone();
        for (key, point) in &batch.metrics {
            let mut history = run.metrics.get(key).cloned().unwrap_or_default();
            history.push_back(*point);
            run.metrics.insert(key.clone(), history);
            if run.latest.get(key).is_none_or(|latest| point.supersedes(latest)) {
                run.latest.insert(key.clone(), *point);
            }
        }
        for (key, value) in &batch.params {
            run.params.insert(key.clone(), value.clone());
        }
        for (key, value) in &batch.tags {
            if key == "mlflow.runName" {
                run.name = value.clone();
            }
            run.tags.insert(key.clone(), value.clone());
        }
        self.runs.insert(run_id.to_string(), run);
        Ok(())
    }

    pub fn delete_tag(&mut self, run_id: &str, key: &str) -> Result<(), TrackingError> {
        let run = self.active_run(run_id)?;
        if !run.tags.contains_key(key) {
            return refuse(
                ErrorCode::ResourceDoesNotExist,
                format!("run {run_id} has no tag '{key}'"),
            );
        }
        let mut run = run.clone();
        run.tags.remove(key);
        self.runs.insert(run_id.to_string(), run);
        Ok(())
    }

    /// Sets a run's status, end time and name (each when given).
    pub fn update_run(
        &mut self,
        run_id: &str,
        status: Option<RunStatus>,
        end_time_ms: Option<i64>,
        name: Option<&str>,
    ) -> Result<&Run, TrackingError> {
        let mut run = self.active_run(run_id)?.clone();
        if let Some(status) = status {
            run.status = status;
        }
        if let Some(end) = end_time_ms {
            if end < run.start_time_ms {
                return refuse(
                    ErrorCode::InvalidParameterValue,
                    format!("end time {end} is before the run's start time {}", run.start_time_ms),
                );
            }
            run.end_time_ms = Some(end);
        }
        if let Some(name) = name.filter(|name| !name.is_empty()) {
            run.name = name.to_string();
            run.tags.insert("mlflow.runName".into(), name.to_string());
        }
        self.runs.insert(run_id.to_string(), run);
        Ok(&self.runs[run_id])
    }

    /// Deletes (`deleted`) or restores a run.
    pub fn set_run_stage(&mut self, run_id: &str, deleted: bool) -> Result<(), TrackingError> {
        let run = self.run(run_id)?.clone();
        if !deleted {
            self.active_experiment(&run.experiment_id)?;
        }
        let lifecycle_stage = if deleted {
            LifecycleStage::Deleted
        } else {
            LifecycleStage::Active
        };
        self.runs.insert(run_id.to_string(), Run { lifecycle_stage, ..run });
        Ok(())
    }

    /// Every logged value of a run's metric, in the order logged.
    pub fn metric_history(&self, run_id: &str, key: &str) -> Result<&Vector<MetricPoint>, TrackingError> {
        let run = self.run(run_id)?;
        run.metrics.get(key).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("run {run_id} has no metric '{key}'"),
        })
    }

    /// One page of the runs of `search.experiment_ids` that match its filter, in its order. The page token
    /// is the number of runs already returned.
    pub fn search_runs(&self, search: &RunSearch) -> Result<RunPage, TrackingError> {
        if search.experiment_ids.is_empty() {
            return refuse(
                ErrorCode::InvalidParameterValue,
                "a run search needs at least one experiment id".into(),
            );
        }
        for id in &search.experiment_ids {
            self.experiment(id)?;
        }
        let mut runs: Vec<&Run> = self
            .runs
            .values()
            .filter(|run| {
                search.experiment_ids.contains(&run.experiment_id)
                    && search.view.shows(run.lifecycle_stage)
                    && search.filter.matches(*run)
            })
            .collect();
        crate::search::sort(&search.order_by, &mut runs);
        let (runs, next_page_token) = page(runs, search.max_results, search.page_token.as_deref())?;
        Ok(RunPage { runs, next_page_token })
    }

    /// One page of the experiments that `search` shows and its filter matches, in its order (newest first
    /// by default), and the token of the next page when there is one.
    pub fn search_experiments(
        &self,
        search: &ExperimentSearch,
    ) -> Result<(Vec<Experiment>, Option<String>), TrackingError> {
        let mut experiments: Vec<&Experiment> = self
            .experiments
            .values()
            .filter(|experiment| search.view.shows(experiment.lifecycle_stage) && search.filter.matches(*experiment))
            .collect();
        crate::search::sort(&search.order_by, &mut experiments);
        page(experiments, search.max_results, search.page_token.as_deref())
    }
}

/// Items `[token, token + max_results)` of `items` (the token is the count already returned), and the next
/// page's token when items remain.
pub(crate) fn page<T: Clone>(
    items: Vec<&T>,
    max_results: usize,
    token: Option<&str>,
) -> Result<(Vec<T>, Option<String>), TrackingError> {
    if max_results == 0 || max_results > SEARCH_RESULTS_MAX {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!("max_results {max_results} is out of range; expected 1 to {SEARCH_RESULTS_MAX}"),
        );
    }
    let offset = match token {
        None => 0,
        Some(token) => token.parse::<usize>().map_err(|_| TrackingError {
            code: ErrorCode::InvalidParameterValue,
            message: format!("page token '{token}' is not one this server issued"),
        })?,
    };
    let end = offset.saturating_add(max_results).min(items.len());
    let page = items
        .get(offset..end)
        .unwrap_or_default()
        .iter()
        .map(|item| (*item).clone())
        .collect();
    Ok((page, (end < items.len()).then(|| end.to_string())))
}

#[cfg(test)]
mod tests;
