//! The replicated state machine: what every coordinator agrees on, changed only by applying committed
//! [`Command`]s in log order.
//!
//! ```text
//!   client Request ──(leader stamps time)──► Command ──raft log──► StateMachine::apply ──► CommandResult
//!                                                                         │
//!                                                                         └─► changed jobs (watch events)
//! ```
//!
//! Invariants:
//! - `apply` reads no clock, no randomness and no IO: the leader stamps `now_ms` into each command and job
//!   ids come from a counter in the state itself, so every replica computes the same state.
//! - An idempotency key maps to exactly one job forever; submitting it again returns that job.
//! - A job's state moves only along [`JobState::can_become`].
//!
//! Snapshots are bincode with a leading format version; an unknown version is refused, never guessed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::catalog::{AppliedObject, Catalog, CatalogObject, ObjectDraft};
use crate::error::CoordinatorError;
use crate::spec::{JobSpec, ResourceSpec};
use crate::tracking::{Tracking, TrackingCommand, TrackingError, TrackingOutcome};
use sha2::Digest;

pub type JobId = u64;
pub type NodeId = u64;

/// Bumped whenever the snapshot layout changes.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 8;
/// Most metrics or artifacts one job keeps, and the longest name or location, so reports cannot bloat the
/// replicated state.
pub const JOB_METRICS_MAX: usize = 64;
pub const METRIC_TEXT_LENGTH_MAX: usize = 1024;
/// Longest accepted idempotency key, so keys cannot bloat the replicated state.
pub const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// The lifecycle: Queued → Running → (Succeeded | Failed); Running → Queued on a restart; Queued or
    /// Running → Cancelled. Finished states are final.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Failed)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Queued)
        )
    }

    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn label(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// One try at running every rank of a job: the gang placed together, stopped together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub state: AttemptState,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub message: String,
    /// Rank 0's host and the port reserved for it there (`MASTER_ADDR`, `MASTER_PORT`).
    pub master_addr: String,
    pub master_port: u16,
    /// Indexed by rank.
    pub tasks: Vec<Task>,
}

/// An attempt's lifecycle: Running → Succeeded | Failed | Cancelled, final once left. A finished attempt
/// may still have ranks whose processes are being stopped (`Task::stop_requested`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl AttemptState {
    pub fn label(self) -> &'static str {
        match self {
            AttemptState::Running => "running",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Failed => "failed",
            AttemptState::Cancelled => "cancelled",
        }
    }
}

/// One rank of an attempt, placed on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub rank: u32,
    pub worker: WorkerId,
    /// The worker's gRPC address when the task was placed, where its logs are read.
    pub worker_address: String,
    pub local_rank: u32,
    pub local_world_size: u32,
    pub state: TaskState,
    /// The leader wants this process gone (its attempt ended or the job was cancelled); its resources stay
    /// allocated until the worker reports that it exited, so nothing is ever over-committed.
    pub stop_requested: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_at_ms: Option<i64>,
    pub message: String,
}

/// A task's lifecycle: Running → Succeeded | Failed | Killed | Lost. Only a Running task holds resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
    /// Stopped on the leader's request (cancel, or another rank of its gang failed).
    Killed,
    /// Its worker was lost or restarted; whether the process ran on is unknown to the cluster.
    Lost,
}

impl TaskState {
    pub fn label(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Killed => "killed",
            TaskState::Lost => "lost",
        }
    }
}

/// Which process: a rank of one attempt of one job. Unique for the life of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskKey {
    pub job: JobId,
    pub attempt: u32,
    pub rank: u32,
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} attempt {} rank {}", self.job, self.attempt, self.rank)
    }
}

/// How a task's process ended, as its worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskOutcome {
    Exited {
        code: i32,
    },
    Signalled {
        signal: i32,
    },
    /// The process never ran (the program does not exist, the working directory could not be made).
    FailedToStart {
        message: String,
    },
}

/// Resources of a worker, or of one rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpus: u32,
    pub gpus: u32,
    pub memory_bytes: u64,
}

impl Capacity {
    pub fn of_rank(resources: &ResourceSpec) -> Capacity {
        Capacity {
            cpus: resources.cpus,
            gpus: resources.gpus,
            memory_bytes: resources.memory_bytes,
        }
    }

    pub fn contains(&self, need: &Capacity) -> bool {
        self.cpus >= need.cpus && self.gpus >= need.gpus && self.memory_bytes >= need.memory_bytes
    }

    /// How many ranks needing `need` fit in `self`.
    pub fn ranks_that_fit(&self, need: &Capacity) -> u32 {
        let by = |have: u64, want: u64| have.checked_div(want).unwrap_or(u64::MAX);
        let count = by(self.cpus.into(), need.cpus.into())
            .min(by(self.gpus.into(), need.gpus.into()))
            .min(by(self.memory_bytes, need.memory_bytes));
        count.min(u32::MAX.into()) as u32
    }

    pub fn plus(&self, other: &Capacity) -> Capacity {
        Capacity {
            cpus: self.cpus + other.cpus,
            gpus: self.gpus + other.gpus,
            memory_bytes: self.memory_bytes + other.memory_bytes,
        }
    }

    /// `self - other`; the caller has checked `self.contains(other)`.
    pub fn minus(&self, other: &Capacity) -> Capacity {
        assert!(self.contains(other), "capacity {self:?} cannot give {other:?}");
        Capacity {
            cpus: self.cpus - other.cpus,
            gpus: self.gpus - other.gpus,
            memory_bytes: self.memory_bytes - other.memory_bytes,
        }
    }
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cpus, {} gpus, {} MiB",
            self.cpus,
            self.gpus,
            self.memory_bytes >> 20
        )
    }
}

pub type WorkerId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    Alive,
    /// Missed its lease, or asked to be forgotten; it must register again to get tasks.
    Lost,
}

impl WorkerState {
    pub fn label(self) -> &'static str {
        match self {
            WorkerState::Alive => "alive",
            WorkerState::Lost => "lost",
        }
    }
}

/// A worker as the cluster knows it. Invariant: `allocated` is the sum of the needs of `tasks`, and
/// `capacity.contains(allocated)` whenever no registration shrank the capacity under running tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    /// Kept in the worker's data directory, so a restarted worker registers as the same one.
    pub uid: String,
    /// The worker's own gRPC address (logs), `HOST:PORT`.
    pub address: String,
    /// The host other ranks reach this worker's tasks at (`MASTER_ADDR`).
    pub host: String,
    pub hostname: String,
    pub capacity: Capacity,
    pub allocated: Capacity,
    /// Ports this worker reserves for rank 0 of the jobs it runs (inclusive).
    pub task_ports: (u16, u16),
    /// Tasks whose processes may be running here.
    pub tasks: std::collections::BTreeSet<TaskKey>,
    pub state: WorkerState,
    pub registered_at_ms: i64,
    pub updated_at_ms: i64,
    /// How many times this worker has registered (process starts and returns after being lost).
    pub registrations: u32,
    pub message: String,
}

impl Worker {
    pub fn free(&self) -> Capacity {
        if self.capacity.contains(&self.allocated) {
            self.capacity.minus(&self.allocated)
        } else {
            Capacity::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    /// The TOML exactly as submitted, for `kiln jobs show`.
    pub spec_toml: String,
    pub state: JobState,
    pub attempts: Vec<Attempt>,
    pub submitted_at_ms: i64,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    /// Why the job is in its state (a cancel reason, a failure), or empty.
    pub message: String,
    pub idempotency_key: String,
    /// When the job last entered the queue (submission or restart); the backfill bound counts from here.
    pub queued_since_ms: i64,
    /// The latest value of each metric its ranks reported (`epoch`, `loss`, `validation_accuracy`, …).
    pub metrics: BTreeMap<String, f64>,
    /// Where its outputs are (`checkpoints`, `model`), as its ranks reported them.
    pub artifacts: BTreeMap<String, String>,
}

impl Job {
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// The fewest ranks the next attempt may have: every rank for a first attempt, down to the spec's
    /// `min_workers` for a restart of an elastic job.
    pub fn min_ranks(&self) -> u32 {
        let ranks = self.spec.resources.workers;
        if self.attempts.is_empty() {
            return ranks;
        }
        crate::spec::min_workers(&self.spec_toml).map_or(ranks, |minimum| minimum.clamp(1, ranks))
    }

    /// Restarts used so far: attempts after the first.
    pub fn restarts(&self) -> u32 {
        (self.attempts.len() as u32).saturating_sub(1)
    }
}

/// A member's address as recorded in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub raft_addr: String,
}

/// What a worker tells the cluster about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRegistration {
    pub uid: String,
    pub address: String,
    pub host: String,
    pub hostname: String,
    pub capacity: Capacity,
    pub task_ports: (u16, u16),
}

/// A client's intent, as sent between nodes before the leader stamps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    SubmitJob {
        spec: JobSpec,
        spec_toml: String,
        idempotency_key: String,
    },
    CancelJob {
        id: JobId,
        reason: String,
    },
    AddMember {
        id: NodeId,
        raft_addr: String,
        learner: bool,
    },
    RemoveMember {
        id: NodeId,
    },
    TransferLeader {
        id: NodeId,
    },
    RegisterWorker(WorkerRegistration),
    ReportMetrics(Report),
    /// The leader's in-memory lease table (last heartbeat per worker); answered by the leader only.
    WorkerLeases,
    ApplyCatalog {
        namespace: String,
        objects: Vec<ObjectDraft>,
        replace: bool,
    },
    /// A write to experiment tracking.
    Track(TrackingCommand),
}

/// An entry of the Raft log. Carries everything apply needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    SubmitJob {
        spec: JobSpec,
        spec_toml: String,
        idempotency_key: String,
        now_ms: i64,
    },
    CancelJob {
        id: JobId,
        reason: String,
        now_ms: i64,
    },
    RegisterWorker {
        registration: WorkerRegistration,
        now_ms: i64,
    },
    /// The scheduler's decision: attempt `attempt` of `job` runs rank r on `placement[r]`. Applied only if
    /// it still holds (job queued, attempt number next, workers alive with room); otherwise refused whole.
    StartAttempt {
        job: JobId,
        attempt: u32,
        placement: Vec<WorkerId>,
        master_port: u16,
        now_ms: i64,
    },
    /// A worker reports how a task's process ended. Reports of tasks that are no longer running are
    /// acknowledged and change nothing, so a worker may repeat a report until it is acknowledged.
    TaskFinished {
        task: TaskKey,
        worker: WorkerId,
        outcome: TaskOutcome,
        now_ms: i64,
    },
    /// The leader declares a worker lost (its lease ran out); its running tasks are lost with it. Applies
    /// only to the registration it was decided for: a worker that registered again since is left alone.
    WorkerLost {
        worker: WorkerId,
        registrations: u32,
        reason: String,
        now_ms: i64,
    },
    /// Several commands in one log entry, applied in order (the scheduler's and the reports' batches).
    Batch(Vec<Command>),
    /// A running attempt's latest metrics and artifact locations; reports of other attempts are refused.
    RecordMetrics {
        job: JobId,
        attempt: u32,
        metrics: BTreeMap<String, f64>,
        artifacts: BTreeMap<String, String>,
        now_ms: i64,
    },
    /// Catalog objects applied to a namespace at once (see [`crate::catalog`]); with `replace`, the
    /// namespace's other live objects are deleted.
    ApplyCatalog {
        namespace: String,
        objects: Vec<ObjectDraft>,
        replace: bool,
        now_ms: i64,
    },
    /// A write to experiment tracking (see [`crate::tracking`]).
    Track {
        command: TrackingCommand,
        now_ms: i64,
    },
    /// A numbered report of a running attempt: like `RecordMetrics`, and its points are logged to the job's
    /// run once however often it is retried.
    RecordReport(Report),
    /// The sweep controller's verdict on a running sweep: it ended (every trial done) or failed (with the
    /// reason); also the deployment controller's on a deployment whose replicas cannot start. The best trial's metrics become the sweep's; with `register`, its model is registered and
    /// the alias set, once: a repeat finds the sweep ended and changes nothing.
    FinishSweep {
        job: JobId,
        succeeded: bool,
        message: String,
        metrics: BTreeMap<String, f64>,
        register: Option<crate::sweep::Registration>,
        now_ms: i64,
    },
    /// `StartAttempt` for the job submitted with `idempotency_key`: the leader places a job in the same batch
    /// that submits it (a sweep's next trial), before the job has its id. Refused when no such job exists.
    StartAttemptByKey {
        idempotency_key: String,
        attempt: u32,
        placement: Vec<WorkerId>,
        master_port: u16,
        now_ms: i64,
    },
    /// A running deployment's file replaced (the deployment controller's rollback of an update whose replicas
    /// cannot start; `kiln deploy` of a changed file arrives as `SubmitJob`). `message` becomes the
    /// deployment's. Refused when the file does not parse as a deployment of the same name.
    UpdateDeployment {
        job: JobId,
        spec_toml: String,
        message: String,
        now_ms: i64,
    },
    /// Holds a queued job back from the scheduler (`held`), or lets it go. A held job starts only through a
    /// standby placement (`StandbyAttempt`): the sweep controller holds the trials it submits ahead of a free
    /// slot, so they never run beside the sweep's `parallel` trials. By idempotency key, like
    /// `StartAttemptByKey`, as the controller holds a trial in the batch that submits it. Refused when the
    /// job is not queued.
    HoldJob {
        idempotency_key: String,
        held: bool,
        now_ms: i64,
    },
    /// A held single-rank job stands by behind running task `after`: it starts in that task's place (on its
    /// worker, with its resources and `MASTER_PORT`) the moment the task exits. The worker starts it when it
    /// sees the exit, without waiting for the cluster; the state starts it when the exit's report is applied,
    /// in the same apply that frees the slot. So a slot is handed on without a commit or a message on the
    /// way. Refused (and nothing changes) unless the job is queued, held, single-rank, not standing by
    /// elsewhere, and needs no more than `after` holds, and `after` runs on an alive worker with nothing
    /// standing by behind it yet. A standby behind a task that is lost with its worker is dropped: the job
    /// stays held, for its controller to place again.
    StandbyAttempt {
        idempotency_key: String,
        after: TaskKey,
        now_ms: i64,
    },
}

/// What a rank reports: the latest metrics and artifact locations, and the points measured since its
/// previous report, numbered per attempt (`sequence` 0: not numbered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub job: JobId,
    pub attempt: u32,
    pub sequence: u64,
    pub metrics: BTreeMap<String, f64>,
    pub points: Vec<(String, crate::tracking::MetricPoint)>,
    pub artifacts: BTreeMap<String, String>,
    pub now_ms: i64,
}

/// What applying a command produced, sent back to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    Submitted {
        job: Job,
        created: bool,
    },
    Cancelled {
        job: Job,
    },
    WorkerRegistered {
        worker: Worker,
    },
    /// The command took effect (or was a harmless repeat).
    Done,
    Batch(Vec<CommandResult>),
    Rejected(CoordinatorError),
    CatalogApplied(Vec<AppliedObject>),
    /// A tracking write's outcome, or why it was refused (with MLflow's error code).
    Tracked(Result<TrackingOutcome, TrackingError>),
}

/// Reads, served after ReadIndex confirms this node has applied everything committed before the read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Query {
    GetJob {
        id: JobId,
    },
    /// Jobs in id order after `after_id`, optionally only those in `states`, at most `limit` (0: all).
    ListJobs {
        states: Vec<JobState>,
        limit: usize,
        after_id: JobId,
    },
    ListWorkers,
    GetWorker {
        id: WorkerId,
    },
    ListCatalog {
        namespace: String,
        include_deleted: bool,
        include_history: bool,
    },
    /// The tracking store as applied (a cheap, structure-sharing copy).
    Tracking,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueryResult {
    Job(Job),
    Jobs(Vec<Job>),
    Workers(Vec<Worker>),
    Rejected(CoordinatorError),
    Catalog(Vec<CatalogObject>),
    Tracking(Box<Tracking>),
}

/// The replicated state. Its maps are persistent (`imbl`): a clone shares structure and costs next to
/// nothing, so a snapshot copy never stalls the event loop however many jobs there are, and the leader's
/// scheduler reads a copy of every applied state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateMachine {
    jobs: imbl::OrdMap<JobId, Job>,
    idempotency_keys: imbl::OrdMap<String, JobId>,
    next_job_id: JobId,
    members: BTreeMap<NodeId, MemberRecord>,
    workers: imbl::OrdMap<WorkerId, Worker>,
    worker_uids: imbl::OrdMap<String, WorkerId>,
    next_worker_id: WorkerId,
    /// Queued jobs in scheduling order: priority (higher first), then job id (submission order). A
    /// restarted job keeps its place.
    queue: imbl::OrdSet<(i64, JobId)>,
    /// Versioned documents of other services (feature-store definitions).
    catalog: Catalog,
    /// Experiments and runs.
    tracking: Tracking,
    /// Queued jobs the scheduler leaves alone (see [`Command::HoldJob`]).
    held: imbl::OrdSet<JobId>,
    /// Standby placements: a running task, and the held job that starts in its place when it exits (see
    /// [`Command::StandbyAttempt`]).
    standby: imbl::OrdMap<TaskKey, JobId>,
    /// `standby` by job: derived (rebuilt when a snapshot is read, not stored).
    #[serde(skip)]
    standing_by: imbl::OrdMap<JobId, TaskKey>,
    /// Every sweep's trials, by sweep and trial number: derived from `jobs` (rebuilt when a snapshot is
    /// read, not stored), so the sweep controller visits sweeps and their trials, not every job.
    #[serde(skip)]
    sweep_trials: imbl::OrdMap<JobId, imbl::OrdMap<u64, JobId>>,
    /// Every deployment's replicas, by deployment and replica number: derived like `sweep_trials`.
    #[serde(skip)]
    deployment_replicas: imbl::OrdMap<JobId, imbl::OrdMap<u64, JobId>>,
}

/// A train job's hyperparameters as its run's params.
fn train_params(spec: &JobSpec) -> Vec<(String, String)> {
    let mut params = vec![("workers".to_string(), spec.resources.workers.to_string())];
    if let Some(train) = &spec.train {
        params.push(("model".into(), train.model.clone()));
        let optional = [
            ("epochs", train.epochs.map(|value| value.to_string())),
            ("batch_size", train.batch_size.map(|value| value.to_string())),
            ("learning_rate", train.learning_rate.clone()),
            ("seed", train.seed.map(|value| value.to_string())),
        ];
        params.extend(
            optional
                .into_iter()
                .filter_map(|(key, value)| Some((key.to_string(), value?))),
        );
    }
    params
}

/// Records a new job in the sweep index: a sweep, or a trial of one.
fn index_sweep_job(index: &mut imbl::OrdMap<JobId, imbl::OrdMap<u64, JobId>>, job: &Job) {
    if job.spec.kind == crate::spec::JobKind::Sweep {
        index.entry(job.id).or_default();
    } else if let Some((sweep, trial)) = crate::sweep::trial_of(&job.spec)
        && let Some(trials) = index.get_mut(&sweep)
    {
        trials.insert(trial, job.id);
    }
}

/// Records a new job in the deployment index: a deployment, or a replica of one.
fn index_deployment_job(index: &mut imbl::OrdMap<JobId, imbl::OrdMap<u64, JobId>>, job: &Job) {
    if job.spec.kind == crate::spec::JobKind::Deployment {
        index.entry(job.id).or_default();
    } else if let Some((deployment, replica)) = crate::deployment::replica_of(&job.spec)
        && let Some(replicas) = index.get_mut(&deployment)
    {
        replicas.insert(replica, job.id);
    }
}

fn queue_key(job: &Job) -> (i64, JobId) {
    (-i64::from(job.spec.priority), job.id)
}

pub fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CoordinatorError> {
    bincode::serde::encode_to_vec(value, bincode_config())
        .map_err(|error| CoordinatorError::Internal(format!("encoding: {error}")))
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, CoordinatorError> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, bincode_config())
        .map_err(|error| CoordinatorError::Internal(format!("decoding {what}: {error}")))?;
    if read != bytes.len() {
        return Err(CoordinatorError::Internal(format!(
            "decoding {what}: {} trailing bytes",
            bytes.len() - read
        )));
    }
    Ok(value)
}

/// A command that changed one job (recorded for watchers), or was refused with the reason.
fn job_changed(outcome: Result<Job, String>, changed: &mut Vec<Job>) -> CommandResult {
    match outcome {
        Ok(job) => {
            changed.push(job);
            CommandResult::Done
        }
        Err(reason) => CommandResult::Rejected(CoordinatorError::FailedPrecondition(reason)),
    }
}

impl StateMachine {
    /// Applies one committed command. Jobs it changed are appended to `changed` (for watchers).
    pub fn apply(&mut self, command: Command, changed: &mut Vec<Job>) -> CommandResult {
        let before = changed.len();
        let result = self.apply_command(command, changed);
        // A train job that ended ends its run with it.
        for job in &changed[before..] {
            let status = match job.state {
                JobState::Succeeded => crate::tracking::RunStatus::Finished,
                JobState::Failed => crate::tracking::RunStatus::Failed,
                JobState::Cancelled => crate::tracking::RunStatus::Killed,
                _ => continue,
            };
            let end = job.finished_at_ms.unwrap_or(job.updated_at_ms);
            self.tracking.finish_job_run(job.id, status, end);
        }
        result
    }

    fn apply_command(&mut self, command: Command, changed: &mut Vec<Job>) -> CommandResult {
        match command {
            Command::SubmitJob {
                spec,
                spec_toml,
                idempotency_key,
                now_ms,
            } => {
                if !idempotency_key.is_empty()
                    && let Some(existing) = self.idempotency_keys.get(&idempotency_key)
                {
                    let job = self.jobs[existing].clone();
                    return CommandResult::Submitted { job, created: false };
                }
                if let Err(reason) = self.check_fits_cluster(&spec) {
                    return CommandResult::Rejected(CoordinatorError::FailedPrecondition(reason));
                }
                // A deployment submitted under the name of a running one updates it in place (`kiln deploy`
                // of a changed file): the controller rolls its replicas to the new file.
                let running = (spec.kind == crate::spec::JobKind::Deployment)
                    .then(|| {
                        self.deployments()
                            .find(|(job, _)| job.spec.name == spec.name && !job.state.is_finished())
                            .map(|(job, _)| job.id)
                    })
                    .flatten();
                if let Some(id) = running {
                    return self.update_deployment(id, spec, spec_toml, None, now_ms, changed);
                }
                self.next_job_id += 1;
                // A sweep or a deployment runs no task: it is running from the start, and never queued.
                let sweep = matches!(
                    spec.kind,
                    crate::spec::JobKind::Sweep | crate::spec::JobKind::Deployment
                );
                let job = Job {
                    id: self.next_job_id,
                    spec,
                    spec_toml,
                    state: if sweep { JobState::Running } else { JobState::Queued },
                    attempts: Vec::new(),
                    submitted_at_ms: now_ms,
                    updated_at_ms: now_ms,
                    finished_at_ms: None,
                    message: String::new(),
                    idempotency_key: idempotency_key.clone(),
                    queued_since_ms: now_ms,
                    metrics: BTreeMap::new(),
                    artifacts: BTreeMap::new(),
                };
                if !idempotency_key.is_empty() {
                    self.idempotency_keys.insert(idempotency_key, job.id);
                }
                if !sweep {
                    self.queue.insert(queue_key(&job));
                }
                self.jobs.insert(job.id, job.clone());
                index_sweep_job(&mut self.sweep_trials, &job);
                index_deployment_job(&mut self.deployment_replicas, &job);
                // Train jobs and sweep trials get a run; a trial's is in its sweep's experiment, with its
                // parameters.
                let trial = crate::sweep::trial_of(&job.spec)
                    .and_then(|(sweep, trial)| Some((self.jobs.get(&sweep)?, sweep, trial)))
                    .filter(|(sweep, _, _)| sweep.spec.kind == crate::spec::JobKind::Sweep)
                    .map(|(sweep, id, trial)| (crate::sweep::experiment_name(id, &sweep.spec.name), id, trial));
                if job.spec.kind == crate::spec::JobKind::Train || trial.is_some() {
                    let spec_hash = crate::artifacts::hex(&sha2::Sha256::digest(job.spec_toml.as_bytes()));
                    let mut params = train_params(&job.spec);
                    let mut place = crate::tracking::JobRunPlace::default();
                    if let Some((experiment, sweep, trial)) = &trial {
                        for (name, value) in crate::sweep::trial_params(&job.spec) {
                            params.retain(|(key, _)| *key != name);
                            params.push((name, value));
                        }
                        place.experiment = Some(experiment.clone());
                        place.tags = vec![
                            ("kiln.sweep".to_string(), sweep.to_string()),
                            ("kiln.trial".to_string(), trial.to_string()),
                        ];
                    }
                    self.tracking
                        .start_job_run(job.id, &job.spec.name, &params, &spec_hash, &place, now_ms);
                } else if job.spec.kind == crate::spec::JobKind::Deployment
                    && let Ok(options) = crate::spec::deployment_options("deployment", &job.spec_toml)
                {
                    // A deployment's run holds its replicas' request logs (artifacts under `requests/`).
                    let spec_hash = crate::artifacts::hex(&sha2::Sha256::digest(job.spec_toml.as_bytes()));
                    let params = [
                        ("model", options.model.clone()),
                        ("replicas.min", options.min_replicas.to_string()),
                        ("replicas.max", options.max_replicas.to_string()),
                    ]
                    .map(|(key, value)| (key.to_string(), value));
                    let place = crate::tracking::JobRunPlace {
                        experiment: None,
                        tags: vec![("kiln.deployment".to_string(), options.name.clone())],
                    };
                    self.tracking
                        .start_job_run(job.id, &job.spec.name, &params, &spec_hash, &place, now_ms);
                }
                changed.push(job.clone());
                CommandResult::Submitted { job, created: true }
            }
            Command::CancelJob { id, reason, now_ms } => self.cancel(id, reason, now_ms, changed),
            Command::RegisterWorker { registration, now_ms } => self.register_worker(registration, now_ms, changed),
            Command::StartAttempt {
                job,
                attempt,
                placement,
                master_port,
                now_ms,
            } => job_changed(
                self.start_attempt(job, attempt, &placement, master_port, now_ms),
                changed,
            ),
            Command::TaskFinished {
                task,
                worker,
                outcome,
                now_ms,
            } => {
                self.task_finished(task, worker, outcome, now_ms, changed);
                CommandResult::Done
            }
            Command::WorkerLost {
                worker,
                registrations,
                reason,
                now_ms,
            } => {
                let Some(record) = self.workers.get_mut(&worker) else {
                    return CommandResult::Rejected(CoordinatorError::NotFound(format!(
                        "worker {worker} does not exist"
                    )));
                };
                if record.state == WorkerState::Alive && record.registrations == registrations {
                    record.state = WorkerState::Lost;
                    record.updated_at_ms = now_ms;
                    record.message = reason.clone();
                    self.lose_tasks_of(worker, &reason, now_ms, changed);
                }
                CommandResult::Done
            }
            Command::RecordMetrics {
                job,
                attempt,
                metrics,
                artifacts,
                now_ms,
            } => self.record_report(
                Report {
                    job,
                    attempt,
                    sequence: 0,
                    metrics,
                    points: Vec::new(),
                    artifacts,
                    now_ms,
                },
                changed,
            ),
            Command::RecordReport(report) => self.record_report(report, changed),
            Command::ApplyCatalog {
                namespace,
                objects,
                replace,
                now_ms,
            } => match self.catalog.apply(&namespace, objects, replace, now_ms) {
                Ok(applied) => CommandResult::CatalogApplied(applied),
                Err(error) => CommandResult::Rejected(error),
            },
            Command::Track { command, now_ms } => CommandResult::Tracked(self.tracking.apply(command, now_ms)),
            Command::FinishSweep {
                job,
                succeeded,
                message,
                metrics,
                register,
                now_ms,
            } => self.finish_sweep(job, succeeded, message, metrics, register, now_ms, changed),
            Command::StartAttemptByKey {
                idempotency_key,
                attempt,
                placement,
                master_port,
                now_ms,
            } => {
                let started = self
                    .job_by_key(&idempotency_key)
                    .and_then(|job| self.start_attempt(job, attempt, &placement, master_port, now_ms));
                job_changed(started, changed)
            }
            Command::UpdateDeployment {
                job,
                spec_toml,
                message,
                now_ms,
            } => match crate::spec::parse_job_spec("deployment", &spec_toml) {
                Ok(spec) => self.update_deployment(job, spec, spec_toml, Some(message), now_ms, changed),
                Err(error) => CommandResult::Rejected(CoordinatorError::InvalidArgument(error.to_string())),
            },
            Command::HoldJob {
                idempotency_key,
                held,
                now_ms,
            } => {
                let held = self
                    .job_by_key(&idempotency_key)
                    .and_then(|job| self.hold(job, held, now_ms));
                job_changed(held, changed)
            }
            Command::StandbyAttempt {
                idempotency_key,
                after,
                now_ms,
            } => {
                let placed = self
                    .job_by_key(&idempotency_key)
                    .and_then(|job| self.stand_by(job, after, now_ms));
                job_changed(placed, changed)
            }
            Command::Batch(commands) => CommandResult::Batch(
                commands
                    .into_iter()
                    .map(|command| self.apply_command(command, changed))
                    .collect(),
            ),
        }
    }

    /// Records a running attempt's report: its latest metrics and artifact locations on the job, its points
    /// (or, unnumbered, its metrics at their step) in the job's run. A numbered report at or below the last
    /// one applied for its attempt is a retry: it changes nothing and succeeds.
    fn record_report(&mut self, report: Report, changed: &mut Vec<Job>) -> CommandResult {
        let Report {
            job,
            attempt,
            sequence,
            metrics,
            points,
            artifacts,
            now_ms,
        } = report;
        let Some(record) = self.jobs.get_mut(&job) else {
            return CommandResult::Rejected(CoordinatorError::NotFound(format!("job {job} does not exist")));
        };
        let current = record
            .attempts
            .last()
            .is_some_and(|last| last.number == attempt && last.state == AttemptState::Running);
        if !current {
            return CommandResult::Rejected(CoordinatorError::FailedPrecondition(format!(
                "job {job} attempt {attempt} is not running; its metrics are not recorded"
            )));
        }
        if self.tracking.job_report_applied(job, attempt, sequence) {
            return CommandResult::Done;
        }
        let mut merged_metrics = record.metrics.clone();
        merged_metrics.extend(metrics.clone());
        let mut merged_artifacts = record.artifacts.clone();
        merged_artifacts.extend(artifacts);
        if merged_metrics.len() > JOB_METRICS_MAX || merged_artifacts.len() > JOB_METRICS_MAX {
            return CommandResult::Rejected(CoordinatorError::InvalidArgument(format!(
                "job {job} would keep more than {JOB_METRICS_MAX} metrics or artifacts"
            )));
        }
        record.metrics = merged_metrics;
        record.artifacts = merged_artifacts;
        record.updated_at_ms = now_ms;
        changed.push(record.clone());
        self.tracking.note_job_report(job, attempt, sequence);
        if points.is_empty() {
            self.tracking.log_job_metrics(job, &metrics, now_ms);
        } else {
            self.tracking.log_job_points(job, points);
        }
        CommandResult::Done
    }

    /// A job whose gang could never be placed, even on an idle cluster, is refused at submission. With
    /// no worker registered yet every job waits, since workers may still be starting.
    fn check_fits_cluster(&self, spec: &JobSpec) -> Result<(), String> {
        let alive: Vec<&Worker> = self
            .workers
            .values()
            .filter(|worker| worker.state == WorkerState::Alive)
            .collect();
        if alive.is_empty() {
            return Ok(());
        }
        let need = Capacity::of_rank(&spec.resources);
        let fit: u64 = alive
            .iter()
            .map(|worker| u64::from(worker.capacity.ranks_that_fit(&need)))
            .sum();
        if fit >= u64::from(spec.resources.workers) {
            return Ok(());
        }
        let largest = alive
            .iter()
            .map(|worker| format!("worker {}: {}", worker.id, worker.capacity))
            .collect::<Vec<_>>()
            .join("; ");
        Err(format!(
            "job '{}' needs {} rank(s) of {need} each, but the cluster's {} alive worker(s) can hold only {fit} such rank(s) even when idle ({largest}); ask for less, or add workers",
            spec.name,
            spec.resources.workers,
            alive.len()
        ))
    }

    /// Replaces running deployment `id`'s file with `spec_toml` (parsed as `spec`), remembering when, and
    /// how many replicas were live, for the roll (see [`crate::deployment`]). A rollback (`rollback`: its
    /// message) keeps the replica count the rolled-back update started from. The same file again changes
    /// nothing.
    fn update_deployment(
        &mut self,
        id: JobId,
        spec: JobSpec,
        spec_toml: String,
        rollback: Option<String>,
        now_ms: i64,
        changed: &mut Vec<Job>,
    ) -> CommandResult {
        let live = self.deployment_replicas.get(&id).map_or(0, |replicas| {
            replicas
                .values()
                .filter(|replica| self.jobs.get(*replica).is_some_and(|job| !job.state.is_finished()))
                .count()
        });
        let Some(job) = self.jobs.get_mut(&id) else {
            return CommandResult::Rejected(CoordinatorError::NotFound(format!("job {id} does not exist")));
        };
        if job.spec.kind != crate::spec::JobKind::Deployment || job.state != JobState::Running {
            return CommandResult::Rejected(CoordinatorError::FailedPrecondition(format!(
                "job {id} is not a running deployment (it is a {} job, {})",
                job.spec.kind.label(),
                job.state.label()
            )));
        }
        if spec.kind != crate::spec::JobKind::Deployment || spec.name != job.spec.name {
            return CommandResult::Rejected(CoordinatorError::InvalidArgument(format!(
                "deployment '{}' can only be updated by a file of kind \"deployment\" with the same name; got a {} job named '{}'",
                job.spec.name,
                spec.kind.label(),
                spec.name
            )));
        }
        if job.spec_toml == spec_toml {
            return CommandResult::Submitted {
                job: job.clone(),
                created: false,
            };
        }
        job.spec = spec;
        job.spec_toml = spec_toml;
        job.updated_at_ms = now_ms;
        match rollback {
            Some(message) => job.message = message,
            None => {
                job.message.clear();
                job.metrics
                    .insert(crate::deployment::ROLL_REPLICAS.to_string(), live as f64);
            }
        }
        job.metrics
            .insert(crate::deployment::ROLL_STARTED_MS.to_string(), now_ms as f64);
        changed.push(job.clone());
        CommandResult::Submitted {
            job: job.clone(),
            created: false,
        }
    }

    #[allow(clippy::too_many_arguments)] // the fields of Command::FinishSweep
    fn finish_sweep(
        &mut self,
        id: JobId,
        succeeded: bool,
        message: String,
        metrics: BTreeMap<String, f64>,
        register: Option<crate::sweep::Registration>,
        now_ms: i64,
        changed: &mut Vec<Job>,
    ) -> CommandResult {
        let Some(job) = self.jobs.get_mut(&id) else {
            return CommandResult::Rejected(CoordinatorError::NotFound(format!("job {id} does not exist")));
        };
        if !matches!(
            job.spec.kind,
            crate::spec::JobKind::Sweep | crate::spec::JobKind::Deployment
        ) {
            return CommandResult::Rejected(CoordinatorError::FailedPrecondition(format!(
                "job {id} is a {} job, not a sweep or a deployment",
                job.spec.kind.label()
            )));
        }
        if job.state != JobState::Running {
            return CommandResult::Done;
        }
        job.state = if succeeded {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        job.updated_at_ms = now_ms;
        job.finished_at_ms = Some(now_ms);
        job.message = message;
        job.metrics = metrics;
        if let Some(registration) = register {
            let outcome = crate::sweep::register_best(&mut self.tracking, &registration, now_ms);
            if let Some(job) = self.jobs.get_mut(&id) {
                match outcome {
                    Ok(version) => {
                        job.artifacts
                            .insert("model".into(), format!("models:/{}/{version}", registration.name));
                    }
                    Err(error) => job
                        .message
                        .push_str(&format!("; the best model was not registered: {error}")),
                }
            }
        }
        changed.push(self.jobs[&id].clone());
        CommandResult::Done
    }

    fn cancel(&mut self, id: JobId, reason: String, now_ms: i64, changed: &mut Vec<Job>) -> CommandResult {
        let Some(job) = self.jobs.get_mut(&id) else {
            return CommandResult::Rejected(CoordinatorError::NotFound(format!("job {id} does not exist")));
        };
        if job.state == JobState::Cancelled {
            return CommandResult::Cancelled { job: job.clone() };
        }
        if !job.state.can_become(JobState::Cancelled) {
            return CommandResult::Rejected(CoordinatorError::FailedPrecondition(format!(
                "job {id} already {}; only queued or running jobs can be cancelled",
                job.state.label()
            )));
        }
        let message = if reason.is_empty() {
            "cancelled by user".to_string()
        } else {
            reason
        };
        self.queue.remove(&queue_key(job));
        self.held.remove(&id);
        if let Some(after) = self.standing_by.remove(&id) {
            self.standby.remove(&after);
        }
        job.state = JobState::Cancelled;
        job.updated_at_ms = now_ms;
        job.finished_at_ms = Some(now_ms);
        job.message = message.clone();
        if let Some(attempt) = job.attempts.last_mut()
            && attempt.state == AttemptState::Running
        {
            attempt.state = AttemptState::Cancelled;
            attempt.ended_at_ms = Some(now_ms);
            attempt.message = message;
            for task in attempt.tasks.iter_mut().filter(|task| task.state == TaskState::Running) {
                task.stop_requested = true;
            }
        }
        changed.push(job.clone());
        CommandResult::Cancelled { job: job.clone() }
    }

    fn register_worker(
        &mut self,
        registration: WorkerRegistration,
        now_ms: i64,
        changed: &mut Vec<Job>,
    ) -> CommandResult {
        let id = match self.worker_uids.get(&registration.uid).copied() {
            Some(id) => {
                // A registration is a process start: whatever the previous process ran is gone.
                self.lose_tasks_of(id, &format!("worker {id} restarted"), now_ms, changed);
                id
            }
            None => {
                self.next_worker_id += 1;
                self.worker_uids.insert(registration.uid.clone(), self.next_worker_id);
                self.next_worker_id
            }
        };
        let previous = self.workers.get(&id);
        let worker = Worker {
            id,
            uid: registration.uid,
            address: registration.address,
            host: registration.host,
            hostname: registration.hostname,
            capacity: registration.capacity,
            allocated: Capacity::default(),
            task_ports: registration.task_ports,
            tasks: Default::default(),
            state: WorkerState::Alive,
            registered_at_ms: previous.map_or(now_ms, |worker| worker.registered_at_ms),
            updated_at_ms: now_ms,
            registrations: previous.map_or(0, |worker| worker.registrations) + 1,
            message: String::new(),
        };
        self.workers.insert(id, worker.clone());
        CommandResult::WorkerRegistered { worker }
    }

    fn lose_tasks_of(&mut self, worker: WorkerId, reason: &str, now_ms: i64, changed: &mut Vec<Job>) {
        let tasks = self
            .workers
            .get(&worker)
            .map(|record| record.tasks.clone())
            .unwrap_or_default();
        for key in tasks {
            let message = format!("rank {} was lost: {reason}", key.rank);
            self.end_task(key, TaskState::Lost, None, None, message, now_ms, changed);
        }
    }

    fn start_attempt(
        &mut self,
        id: JobId,
        number: u32,
        placement: &[WorkerId],
        master_port: u16,
        now_ms: i64,
    ) -> Result<Job, String> {
        let job = self.jobs.get(&id).ok_or_else(|| format!("job {id} does not exist"))?;
        if job.state != JobState::Queued {
            return Err(format!("job {id} is {}, not queued", job.state.label()));
        }
        let expected = job.attempts.len() as u32 + 1;
        if number != expected {
            return Err(format!("job {id} is waiting for attempt {expected}, not {number}"));
        }
        let (minimum, ranks) = (job.min_ranks() as usize, job.spec.resources.workers as usize);
        if placement.len() < minimum || placement.len() > ranks {
            let wanted = if minimum == ranks {
                format!("{ranks}")
            } else {
                format!("{minimum} to {ranks}")
            };
            return Err(format!(
                "job {id} attempt {number} takes {wanted} ranks; the placement names {} workers",
                placement.len()
            ));
        }
        let need = Capacity::of_rank(&job.spec.resources);
        let mut per_worker: BTreeMap<WorkerId, u32> = BTreeMap::new();
        for worker in placement {
            *per_worker.entry(*worker).or_default() += 1;
        }
        for (worker, ranks) in &per_worker {
            let record = self
                .workers
                .get(worker)
                .ok_or_else(|| format!("worker {worker} does not exist"))?;
            if record.state != WorkerState::Alive {
                return Err(format!("worker {worker} is {}", record.state.label()));
            }
            if record.free().ranks_that_fit(&need) < *ranks {
                return Err(format!(
                    "worker {worker} has {} free; {ranks} rank(s) of {need} do not fit",
                    record.free()
                ));
            }
        }
        let master = &self.workers[&placement[0]];
        if master_port < master.task_ports.0 || master_port > master.task_ports.1 {
            return Err(format!(
                "port {master_port} is outside worker {}'s task ports {}-{}",
                master.id, master.task_ports.0, master.task_ports.1
            ));
        }
        let master_addr = master.host.clone();
        let port_taken = self
            .workers
            .values()
            .filter(|worker| worker.host == master_addr)
            .flat_map(|worker| worker.tasks.iter())
            .filter_map(|key| self.jobs.get(&key.job)?.attempts.get(key.attempt as usize - 1))
            .any(|attempt| attempt.master_port == master_port);
        if port_taken {
            return Err(format!(
                "port {master_port} on {master_addr} is held by a running attempt"
            ));
        }
        let mut local_ranks: BTreeMap<WorkerId, u32> = BTreeMap::new();
        let tasks: Vec<Task> = placement
            .iter()
            .enumerate()
            .map(|(rank, worker)| {
                let local = local_ranks.entry(*worker).or_default();
                let local_rank = *local;
                *local += 1;
                Task {
                    rank: rank as u32,
                    worker: *worker,
                    worker_address: self.workers[worker].address.clone(),
                    local_rank,
                    local_world_size: per_worker[worker],
                    state: TaskState::Running,
                    stop_requested: false,
                    exit_code: None,
                    signal: None,
                    ended_at_ms: None,
                    message: String::new(),
                }
            })
            .collect();
        for task in &tasks {
            let record = self.workers.get_mut(&task.worker).expect("checked above");
            record.allocated = record.allocated.plus(&need);
            record.tasks.insert(TaskKey {
                job: id,
                attempt: number,
                rank: task.rank,
            });
        }
        self.held.remove(&id);
        let job = self.jobs.get_mut(&id).expect("checked above");
        self.queue.remove(&queue_key(job));
        assert!(job.state.can_become(JobState::Running));
        job.state = JobState::Running;
        job.updated_at_ms = now_ms;
        job.message = String::new();
        job.attempts.push(Attempt {
            number,
            state: AttemptState::Running,
            started_at_ms: now_ms,
            ended_at_ms: None,
            message: String::new(),
            master_addr,
            master_port,
            tasks,
        });
        Ok(job.clone())
    }

    fn task_finished(
        &mut self,
        key: TaskKey,
        worker: WorkerId,
        outcome: TaskOutcome,
        now_ms: i64,
        changed: &mut Vec<Job>,
    ) {
        let Some(task) = self.task(&key) else { return };
        if task.worker != worker || task.state != TaskState::Running {
            return;
        }
        let stop_requested = task.stop_requested;
        let rank = key.rank;
        let (state, exit_code, signal, message) = match outcome {
            TaskOutcome::Exited { code: 0 } => (TaskState::Succeeded, Some(0), None, String::new()),
            TaskOutcome::Exited { code } if stop_requested => (
                TaskState::Killed,
                Some(code),
                None,
                format!("rank {rank} stopped (exit code {code})"),
            ),
            TaskOutcome::Exited { code } => (
                TaskState::Failed,
                Some(code),
                None,
                format!("rank {rank} exited with code {code} on worker {worker}"),
            ),
            TaskOutcome::Signalled { signal } if stop_requested => (
                TaskState::Killed,
                None,
                Some(signal),
                format!("rank {rank} stopped by signal {signal}"),
            ),
            TaskOutcome::Signalled { signal } => (
                TaskState::Failed,
                None,
                Some(signal),
                format!("rank {rank} was killed by signal {signal} on worker {worker}"),
            ),
            TaskOutcome::FailedToStart { message } if stop_requested => (
                TaskState::Killed,
                None,
                None,
                format!("rank {rank} stopped before it started ({message})"),
            ),
            TaskOutcome::FailedToStart { message } => (
                TaskState::Failed,
                None,
                None,
                format!("rank {rank} could not start on worker {worker}: {message}"),
            ),
        };
        self.end_task(key, state, exit_code, signal, message, now_ms, changed);
    }

    pub fn task(&self, key: &TaskKey) -> Option<&Task> {
        self.jobs
            .get(&key.job)?
            .attempts
            .get(key.attempt.checked_sub(1)? as usize)?
            .tasks
            .get(key.rank as usize)
    }

    /// Ends a running task, frees what it held, and moves its attempt and job on: the last rank to succeed
    /// ends the job; the first rank to fail stops the others and restarts or fails the job.
    #[allow(clippy::too_many_arguments)] // one call site per way a task ends; a struct would only rename them
    fn end_task(
        &mut self,
        key: TaskKey,
        state: TaskState,
        exit_code: Option<i32>,
        signal: Option<i32>,
        message: String,
        now_ms: i64,
        changed: &mut Vec<Job>,
    ) {
        let Some(job) = self.jobs.get_mut(&key.job) else { return };
        let need = Capacity::of_rank(&job.spec.resources);
        let max_restarts = job.spec.max_restarts;
        let restarts = job.restarts();
        let Some(attempt) = job.attempts.get_mut(key.attempt as usize - 1) else {
            return;
        };
        let Some(task) = attempt.tasks.get_mut(key.rank as usize) else {
            return;
        };
        if task.state != TaskState::Running {
            return;
        }
        task.state = state;
        task.exit_code = exit_code;
        task.signal = signal;
        task.ended_at_ms = Some(now_ms);
        task.message = message.clone();
        let worker = task.worker;
        if let Some(record) = self.workers.get_mut(&worker) {
            assert!(record.tasks.remove(&key), "{key} was not on worker {worker}");
            record.allocated = record.allocated.minus(&need);
        }
        job.updated_at_ms = now_ms;
        if attempt.state == AttemptState::Running {
            if state == TaskState::Succeeded {
                if attempt.tasks.iter().all(|task| task.state == TaskState::Succeeded) {
                    attempt.state = AttemptState::Succeeded;
                    attempt.ended_at_ms = Some(now_ms);
                    assert!(job.state.can_become(JobState::Succeeded));
                    job.state = JobState::Succeeded;
                    job.finished_at_ms = Some(now_ms);
                    job.message = format!("all {} rank(s) exited with code 0", attempt.tasks.len());
                }
            } else {
                attempt.state = AttemptState::Failed;
                attempt.ended_at_ms = Some(now_ms);
                attempt.message = message.clone();
                for other in attempt.tasks.iter_mut().filter(|task| task.state == TaskState::Running) {
                    other.stop_requested = true;
                }
                let number = attempt.number;
                if restarts < max_restarts {
                    assert!(job.state.can_become(JobState::Queued));
                    job.state = JobState::Queued;
                    job.queued_since_ms = now_ms;
                    job.message = format!(
                        "attempt {number} failed: {message}; restarting ({} of {max_restarts} restarts)",
                        restarts + 1
                    );
                    self.queue.insert(queue_key(job));
                } else {
                    assert!(job.state.can_become(JobState::Failed));
                    job.state = JobState::Failed;
                    job.finished_at_ms = Some(now_ms);
                    job.message = if max_restarts == 0 {
                        message
                    } else {
                        format!("failed after {number} attempts ({max_restarts} restarts): {message}")
                    };
                }
            }
        }
        changed.push(job.clone());
        if let Some(next) = self.standby.remove(&key) {
            self.standing_by.remove(&next);
            self.hand_on(key, worker, state, next, now_ms, changed);
        }
    }

    /// Starts `next`, which stood by behind task `key`, in that task's place now that it ended `how`; a
    /// task lost with its worker hands nothing on (the worker is gone, or restarted without the standby).
    fn hand_on(
        &mut self,
        key: TaskKey,
        worker: WorkerId,
        how: TaskState,
        next: JobId,
        now_ms: i64,
        changed: &mut Vec<Job>,
    ) {
        let port = self
            .jobs
            .get(&key.job)
            .and_then(|job| job.attempts.get(key.attempt as usize - 1))
            .map_or(0, |attempt| attempt.master_port);
        let Some(job) = self.jobs.get(&next) else { return };
        let number = job.attempts.len() as u32 + 1;
        let refused = if how == TaskState::Lost {
            format!("its standby place behind {key} was lost with worker {worker}; held for its sweep to place again")
        } else {
            match self.start_attempt(next, number, &[worker], port, now_ms) {
                Ok(mut job) => {
                    if let Some(attempt) = job.attempts.last_mut() {
                        attempt.message =
                            format!("started on worker {worker} in the place of {key}, which it stood by behind");
                    }
                    self.jobs.insert(next, job.clone());
                    changed.push(job);
                    return;
                }
                Err(reason) => {
                    format!("its standby start behind {key} was refused ({reason}); held for its sweep to place again")
                }
            }
        };
        if let Some(job) = self.jobs.get_mut(&next) {
            job.message = refused;
            job.updated_at_ms = now_ms;
            changed.push(job.clone());
        }
    }

    /// The job submitted with `idempotency_key` (the commands the leader proposes in the batch that submits
    /// the job name it by key).
    fn job_by_key(&self, idempotency_key: &str) -> Result<JobId, String> {
        self.idempotency_keys
            .get(idempotency_key)
            .copied()
            .ok_or_else(|| format!("no job was submitted with idempotency key '{idempotency_key}'"))
    }

    /// Holds queued job `id` back from the scheduler, or releases it (dropping any standby placement).
    fn hold(&mut self, id: JobId, held: bool, now_ms: i64) -> Result<Job, String> {
        let job = self
            .jobs
            .get_mut(&id)
            .ok_or_else(|| format!("job {id} does not exist"))?;
        if job.state != JobState::Queued {
            return Err(format!(
                "job {id} is {}; only a queued job can be held or released",
                job.state.label()
            ));
        }
        if held {
            if self.held.insert(id).is_none() {
                job.message = "held: waits for a place its sweep hands on".to_string();
            }
        } else {
            self.held.remove(&id);
            if let Some(after) = self.standing_by.remove(&id) {
                self.standby.remove(&after);
            }
            job.message.clear();
        }
        job.updated_at_ms = now_ms;
        Ok(job.clone())
    }

    /// Places held job `id` on standby behind task `after` (see [`Command::StandbyAttempt`]).
    fn stand_by(&mut self, id: JobId, after: TaskKey, now_ms: i64) -> Result<Job, String> {
        let job = self.jobs.get(&id).ok_or_else(|| format!("job {id} does not exist"))?;
        if job.state != JobState::Queued || !self.held.contains(&id) {
            return Err(format!(
                "job {id} is {}{}; only a held, queued job stands by",
                job.state.label(),
                if job.state == JobState::Queued {
                    " but not held"
                } else {
                    ""
                }
            ));
        }
        if job.spec.resources.workers != 1 {
            return Err(format!(
                "job {id} has {} ranks; only a single-rank job stands by behind one task",
                job.spec.resources.workers
            ));
        }
        match (self.standing_by.get(&id), self.standby.get(&after)) {
            (Some(current), _) if *current == after => return Ok(job.clone()),
            (Some(current), _) => return Err(format!("job {id} already stands by behind {current}")),
            (None, Some(other)) => return Err(format!("job {other} already stands by behind {after}")),
            (None, None) => {}
        }
        let task = self.task(&after).ok_or_else(|| format!("{after} does not exist"))?;
        if task.state != TaskState::Running {
            return Err(format!("{after} is {}, not running", task.state.label()));
        }
        let worker = task.worker;
        if self
            .workers
            .get(&worker)
            .is_none_or(|record| record.state != WorkerState::Alive)
        {
            return Err(format!("{after} is on worker {worker}, which is not alive"));
        }
        let need = Capacity::of_rank(&job.spec.resources);
        let holds = Capacity::of_rank(&self.jobs[&after.job].spec.resources);
        if !holds.contains(&need) {
            return Err(format!("job {id} needs {need} per rank; {after} holds only {holds}"));
        }
        self.standby.insert(after, id);
        self.standing_by.insert(id, after);
        let job = self.jobs.get_mut(&id).expect("checked above");
        job.message = format!("standing by on worker {worker}: starts when {after} exits");
        job.updated_at_ms = now_ms;
        Ok(job.clone())
    }

    /// The held job standing by behind each running task, with the task's worker.
    pub fn standby(&self) -> impl Iterator<Item = (TaskKey, JobId)> + '_ {
        self.standby.iter().map(|(after, job)| (*after, *job))
    }

    /// The task held job `id` stands by behind, if it does.
    pub fn standing_by(&self, id: JobId) -> Option<TaskKey> {
        self.standing_by.get(&id).copied()
    }

    pub fn is_held(&self, id: JobId) -> bool {
        self.held.contains(&id)
    }

    pub fn query(&self, query: &Query) -> QueryResult {
        match query {
            Query::GetJob { id } => match self.jobs.get(id) {
                Some(job) => QueryResult::Job(job.clone()),
                None => QueryResult::Rejected(CoordinatorError::NotFound(format!("job {id} does not exist"))),
            },
            Query::ListJobs {
                states,
                limit,
                after_id,
            } => {
                let selected = self
                    .jobs
                    .range((std::ops::Bound::Excluded(*after_id), std::ops::Bound::Unbounded))
                    .map(|(_, job)| job)
                    .filter(|job| states.is_empty() || states.contains(&job.state));
                let jobs = if *limit == 0 {
                    selected.cloned().collect()
                } else {
                    selected.take(*limit).cloned().collect()
                };
                QueryResult::Jobs(jobs)
            }
            Query::ListWorkers => QueryResult::Workers(self.workers.values().cloned().collect()),
            Query::ListCatalog {
                namespace,
                include_deleted,
                include_history,
            } => QueryResult::Catalog(self.catalog.list(namespace, *include_deleted, *include_history)),
            Query::Tracking => QueryResult::Tracking(Box::new(self.tracking.clone())),
            Query::GetWorker { id } => match self.workers.get(id) {
                Some(worker) => QueryResult::Workers(vec![worker.clone()]),
                None => QueryResult::Rejected(CoordinatorError::NotFound(format!(
                    "worker {id} does not exist (workers: {})",
                    if self.workers.is_empty() {
                        "none registered".to_string()
                    } else {
                        self.workers
                            .keys()
                            .map(|id| id.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ))),
            },
        }
    }

    /// Experiments and runs.
    pub fn tracking(&self) -> &Tracking {
        &self.tracking
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    /// Queued jobs in scheduling order, but for the held ones (the scheduler does not place those).
    pub fn queued_jobs(&self) -> impl Iterator<Item = &Job> {
        self.queue
            .iter()
            .filter(|(_, id)| !self.held.contains(id))
            .map(|(_, id)| &self.jobs[id])
    }

    pub fn members(&self) -> &BTreeMap<NodeId, MemberRecord> {
        &self.members
    }

    /// Records a member's address when a membership change that carries one is applied.
    pub fn record_member(&mut self, id: NodeId, raft_addr: Option<String>) {
        match raft_addr {
            Some(raft_addr) if !raft_addr.is_empty() => {
                self.members.insert(id, MemberRecord { raft_addr });
            }
            _ => {}
        }
    }

    pub fn forget_member(&mut self, id: NodeId) {
        self.members.remove(&id);
    }

    pub fn to_snapshot(&self) -> Result<Vec<u8>, CoordinatorError> {
        encode(&(SNAPSHOT_FORMAT_VERSION, self))
    }

    pub fn from_snapshot(bytes: &[u8]) -> Result<StateMachine, CoordinatorError> {
        if bytes.is_empty() {
            return Ok(StateMachine::default());
        }
        let (version, _): (u32, usize) = bincode::serde::decode_from_slice(bytes, bincode_config())
            .map_err(|error| CoordinatorError::Storage(format!("snapshot header is corrupt: {error}")))?;
        if version == 1 {
            let (_, state): (u32, version1::StateMachine) = decode(bytes, "version 1 state machine snapshot")?;
            return Ok(state.upgrade().with_indexes());
        }
        if version == 2 {
            let (_, state): (u32, version2::StateMachine) = decode(bytes, "version 2 state machine snapshot")?;
            return Ok(state.upgrade().with_indexes());
        }
        if version == 3 {
            let (_, state): (u32, version3::StateMachine) = decode(bytes, "version 3 state machine snapshot")?;
            return Ok(state.upgrade().with_indexes());
        }
        if version == 4 {
            let (_, state): (u32, version4::StateMachine) = decode(bytes, "version 4 state machine snapshot")?;
            return Ok(state.upgrade().with_indexes());
        }
        if version == 5 {
            let (_, state): (u32, version5::StateMachine) = decode(bytes, "version 5 state machine snapshot")?;
            return Ok(state.upgrade().with_indexes());
        }
        if version == 6 {
            let (_, state): (u32, version6::StateMachine) = decode(bytes, "version 6 state machine snapshot")?;
            return Ok(state.upgrade().with_indexes());
        }
        if version == 7 {
            let (_, state): (u32, version7::StateMachine) = decode(bytes, "version 7 state machine snapshot")?;
            return Ok(state.upgrade().with_indexes());
        }
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(CoordinatorError::Storage(format!(
                "snapshot format version {version} is not supported; this build reads versions 1 to {SNAPSHOT_FORMAT_VERSION}"
            )));
        }
        let (_, state): (u32, StateMachine) = decode(bytes, "state machine snapshot")?;
        Ok(state.with_indexes())
    }

    /// The derived indexes (not in snapshots), rebuilt from the jobs (in id order, so a sweep comes
    /// before its trials).
    fn with_indexes(mut self) -> StateMachine {
        let (mut sweep_trials, mut deployment_replicas) = (imbl::OrdMap::new(), imbl::OrdMap::new());
        for job in self.jobs.values() {
            index_sweep_job(&mut sweep_trials, job);
            index_deployment_job(&mut deployment_replicas, job);
        }
        self.sweep_trials = sweep_trials;
        self.deployment_replicas = deployment_replicas;
        self.standing_by = self.standby.iter().map(|(after, job)| (*job, *after)).collect();
        self
    }

    /// Every deployment with its replicas in replica order.
    pub fn deployments(&self) -> impl Iterator<Item = (&Job, Vec<(u64, &Job)>)> {
        self.deployment_replicas.iter().filter_map(|(deployment, replicas)| {
            let replicas = replicas
                .iter()
                .filter_map(|(replica, id)| Some((*replica, self.jobs.get(id)?)))
                .collect();
            Some((self.jobs.get(deployment)?, replicas))
        })
    }

    /// Every sweep with its trials in trial order.
    pub fn sweeps(&self) -> impl Iterator<Item = (&Job, Vec<(u64, &Job)>)> {
        self.sweep_trials.iter().filter_map(|(sweep, trials)| {
            let trials = trials
                .iter()
                .filter_map(|(trial, id)| Some((*trial, self.jobs.get(id)?)))
                .collect();
            Some((self.jobs.get(sweep)?, trials))
        })
    }
}

/// Snapshot format 7 (tracking without run outputs or model metrics; artifacts only at their own paths).
mod version7 {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct StateMachine {
        jobs: imbl::OrdMap<JobId, Job>,
        idempotency_keys: imbl::OrdMap<String, JobId>,
        next_job_id: JobId,
        members: BTreeMap<NodeId, MemberRecord>,
        workers: imbl::OrdMap<WorkerId, Worker>,
        worker_uids: imbl::OrdMap<String, WorkerId>,
        next_worker_id: WorkerId,
        queue: imbl::OrdSet<(i64, JobId)>,
        catalog: Catalog,
        tracking: crate::tracking::version7::Tracking,
        held: imbl::OrdSet<JobId>,
        standby: imbl::OrdMap<TaskKey, JobId>,
    }

    impl StateMachine {
        pub(super) fn upgrade(self) -> super::StateMachine {
            super::StateMachine {
                jobs: self.jobs,
                idempotency_keys: self.idempotency_keys,
                next_job_id: self.next_job_id,
                members: self.members,
                workers: self.workers,
                worker_uids: self.worker_uids,
                next_worker_id: self.next_worker_id,
                queue: self.queue,
                catalog: self.catalog,
                tracking: self.tracking.upgrade(),
                held: self.held,
                standby: self.standby,
                ..Default::default()
            }
        }
    }
}

/// Snapshot format 6 (no held jobs and no standby placements; tracking as in format 7).
mod version6 {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct StateMachine {
        jobs: imbl::OrdMap<JobId, Job>,
        idempotency_keys: imbl::OrdMap<String, JobId>,
        next_job_id: JobId,
        members: BTreeMap<NodeId, MemberRecord>,
        workers: imbl::OrdMap<WorkerId, Worker>,
        worker_uids: imbl::OrdMap<String, WorkerId>,
        next_worker_id: WorkerId,
        queue: imbl::OrdSet<(i64, JobId)>,
        catalog: Catalog,
        tracking: crate::tracking::version7::Tracking,
    }

    impl StateMachine {
        pub(super) fn upgrade(self) -> super::StateMachine {
            super::StateMachine {
                jobs: self.jobs,
                idempotency_keys: self.idempotency_keys,
                next_job_id: self.next_job_id,
                members: self.members,
                workers: self.workers,
                worker_uids: self.worker_uids,
                next_worker_id: self.next_worker_id,
                queue: self.queue,
                catalog: self.catalog,
                tracking: self.tracking.upgrade(),
                ..Default::default()
            }
        }
    }
}

/// Snapshot format 5 (tracking without the model registry).
mod version5 {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct StateMachine {
        jobs: imbl::OrdMap<JobId, Job>,
        idempotency_keys: imbl::OrdMap<String, JobId>,
        next_job_id: JobId,
        members: BTreeMap<NodeId, MemberRecord>,
        workers: imbl::OrdMap<WorkerId, Worker>,
        worker_uids: imbl::OrdMap<String, WorkerId>,
        next_worker_id: WorkerId,
        queue: imbl::OrdSet<(i64, JobId)>,
        catalog: Catalog,
        tracking: crate::tracking::version5::Tracking,
    }

    impl StateMachine {
        pub(super) fn upgrade(self) -> super::StateMachine {
            super::StateMachine {
                jobs: self.jobs,
                idempotency_keys: self.idempotency_keys,
                next_job_id: self.next_job_id,
                members: self.members,
                workers: self.workers,
                worker_uids: self.worker_uids,
                next_worker_id: self.next_worker_id,
                queue: self.queue,
                catalog: self.catalog,
                tracking: self.tracking.upgrade(),
                held: imbl::OrdSet::new(),
                standby: imbl::OrdMap::new(),
                standing_by: imbl::OrdMap::new(),
                sweep_trials: imbl::OrdMap::new(),
                deployment_replicas: imbl::OrdMap::new(),
            }
        }
    }
}

/// Snapshot format 4 (jobs, workers and the catalog; no tracking).
mod version4 {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct StateMachine {
        jobs: imbl::OrdMap<JobId, Job>,
        idempotency_keys: imbl::OrdMap<String, JobId>,
        next_job_id: JobId,
        members: BTreeMap<NodeId, MemberRecord>,
        workers: imbl::OrdMap<WorkerId, Worker>,
        worker_uids: imbl::OrdMap<String, WorkerId>,
        next_worker_id: WorkerId,
        queue: imbl::OrdSet<(i64, JobId)>,
        catalog: Catalog,
    }

    impl StateMachine {
        pub(super) fn upgrade(self) -> super::StateMachine {
            super::StateMachine {
                jobs: self.jobs,
                idempotency_keys: self.idempotency_keys,
                next_job_id: self.next_job_id,
                members: self.members,
                workers: self.workers,
                worker_uids: self.worker_uids,
                next_worker_id: self.next_worker_id,
                queue: self.queue,
                catalog: self.catalog,
                tracking: Tracking::default(),
                held: imbl::OrdSet::new(),
                standby: imbl::OrdMap::new(),
                standing_by: imbl::OrdMap::new(),
                sweep_trials: imbl::OrdMap::new(),
                deployment_replicas: imbl::OrdMap::new(),
            }
        }
    }
}

/// Snapshot format 3 (jobs with metrics and artifacts; no catalog).
mod version3 {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct StateMachine {
        jobs: imbl::OrdMap<JobId, Job>,
        idempotency_keys: imbl::OrdMap<String, JobId>,
        next_job_id: JobId,
        members: BTreeMap<NodeId, MemberRecord>,
        workers: imbl::OrdMap<WorkerId, Worker>,
        worker_uids: imbl::OrdMap<String, WorkerId>,
        next_worker_id: WorkerId,
        queue: imbl::OrdSet<(i64, JobId)>,
    }

    impl StateMachine {
        pub(super) fn upgrade(self) -> super::StateMachine {
            super::StateMachine {
                jobs: self.jobs,
                idempotency_keys: self.idempotency_keys,
                next_job_id: self.next_job_id,
                members: self.members,
                workers: self.workers,
                worker_uids: self.worker_uids,
                next_worker_id: self.next_worker_id,
                queue: self.queue,
                catalog: Catalog::default(),
                tracking: Tracking::default(),
                held: imbl::OrdSet::new(),
                standby: imbl::OrdMap::new(),
                standing_by: imbl::OrdMap::new(),
                sweep_trials: imbl::OrdMap::new(),
                deployment_replicas: imbl::OrdMap::new(),
            }
        }
    }
}

/// Snapshot format 2 (workers, attempts and tasks; jobs without metrics and artifacts).
mod version2 {
    use super::*;

    #[derive(Deserialize)]
    pub(super) struct Job {
        id: JobId,
        spec: JobSpec,
        spec_toml: String,
        state: JobState,
        attempts: Vec<Attempt>,
        submitted_at_ms: i64,
        updated_at_ms: i64,
        finished_at_ms: Option<i64>,
        message: String,
        idempotency_key: String,
        queued_since_ms: i64,
    }

    #[derive(Deserialize)]
    pub(super) struct StateMachine {
        jobs: BTreeMap<JobId, Job>,
        idempotency_keys: BTreeMap<String, JobId>,
        next_job_id: JobId,
        members: BTreeMap<NodeId, MemberRecord>,
        workers: BTreeMap<WorkerId, Worker>,
        worker_uids: BTreeMap<String, WorkerId>,
        next_worker_id: WorkerId,
        queue: std::collections::BTreeSet<(i64, JobId)>,
    }

    impl StateMachine {
        pub(super) fn upgrade(self) -> super::StateMachine {
            let jobs = self
                .jobs
                .into_iter()
                .map(|(id, job)| {
                    let job = super::Job {
                        id: job.id,
                        spec: job.spec,
                        spec_toml: job.spec_toml,
                        state: job.state,
                        attempts: job.attempts,
                        submitted_at_ms: job.submitted_at_ms,
                        updated_at_ms: job.updated_at_ms,
                        finished_at_ms: job.finished_at_ms,
                        message: job.message,
                        idempotency_key: job.idempotency_key,
                        queued_since_ms: job.queued_since_ms,
                        metrics: BTreeMap::new(),
                        artifacts: BTreeMap::new(),
                    };
                    (id, job)
                })
                .collect();
            super::StateMachine {
                jobs,
                idempotency_keys: self.idempotency_keys.into_iter().collect(),
                next_job_id: self.next_job_id,
                members: self.members,
                workers: self.workers.into_iter().collect(),
                worker_uids: self.worker_uids.into_iter().collect(),
                next_worker_id: self.next_worker_id,
                queue: self.queue.into_iter().collect(),
                catalog: Catalog::default(),
                tracking: Tracking::default(),
                held: imbl::OrdSet::new(),
                standby: imbl::OrdMap::new(),
                standing_by: imbl::OrdMap::new(),
                sweep_trials: imbl::OrdMap::new(),
                deployment_replicas: imbl::OrdMap::new(),
            }
        }
    }
}

/// Snapshot format 1 (jobs and members, before workers existed), read so a data directory written by
/// that build starts under this one. No job had an attempt then, so none is lost in the upgrade.
mod version1 {
    use super::*;

    #[derive(Deserialize)]
    #[allow(dead_code)] // decoded field by field; attempts were always empty before workers existed
    pub(super) struct Attempt {
        number: u32,
        state: String,
        started_at_ms: i64,
        ended_at_ms: Option<i64>,
        message: String,
    }

    #[derive(Deserialize)]
    pub(super) struct Job {
        id: JobId,
        spec: JobSpec,
        spec_toml: String,
        state: JobState,
        #[allow(dead_code)] // see Attempt
        attempts: Vec<Attempt>,
        submitted_at_ms: i64,
        updated_at_ms: i64,
        finished_at_ms: Option<i64>,
        message: String,
        idempotency_key: String,
    }

    /// `imbl` maps serialize as plain maps, so ordinary maps read them back.
    #[derive(Deserialize)]
    pub(super) struct StateMachine {
        jobs: BTreeMap<JobId, Job>,
        idempotency_keys: BTreeMap<String, JobId>,
        next_job_id: JobId,
        members: BTreeMap<NodeId, MemberRecord>,
    }

    impl StateMachine {
        pub(super) fn upgrade(self) -> super::StateMachine {
            let mut state = super::StateMachine {
                idempotency_keys: self.idempotency_keys.into_iter().collect(),
                next_job_id: self.next_job_id,
                members: self.members,
                ..Default::default()
            };
            for (id, job) in self.jobs {
                let job = super::Job {
                    id: job.id,
                    spec: job.spec,
                    spec_toml: job.spec_toml,
                    state: job.state,
                    attempts: Vec::new(),
                    submitted_at_ms: job.submitted_at_ms,
                    updated_at_ms: job.updated_at_ms,
                    finished_at_ms: job.finished_at_ms,
                    message: job.message,
                    idempotency_key: job.idempotency_key,
                    queued_since_ms: job.submitted_at_ms,
                    metrics: BTreeMap::new(),
                    artifacts: BTreeMap::new(),
                };
                if job.state == JobState::Queued {
                    state.queue.insert(queue_key(&job));
                }
                state.jobs.insert(id, job);
            }
            state
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_job_spec;

    fn submit_spec(key: &str, now_ms: i64, spec_toml: &str) -> Command {
        let spec = parse_job_spec("t", spec_toml).unwrap();
        Command::SubmitJob {
            spec,
            spec_toml: spec_toml.to_string(),
            idempotency_key: key.into(),
            now_ms,
        }
    }

    fn submit(key: &str, now_ms: i64) -> Command {
        submit_spec(
            key,
            now_ms,
            "name = \"hello\"\nkind = \"command\"\ncommand = \"true\"\n",
        )
    }

    fn gang(workers: u32, max_restarts: u32) -> String {
        format!(
            "name = \"gang\"\nkind = \"command\"\ncommand = \"true\"\nmax_restarts = {max_restarts}\n[resources]\nworkers = {workers}\ncpus = 1\n"
        )
    }

    fn apply(state: &mut StateMachine, command: Command) -> CommandResult {
        state.apply(command, &mut Vec::new())
    }

    fn register(state: &mut StateMachine, uid: &str, cpus: u32) -> WorkerId {
        let result = apply(
            state,
            Command::RegisterWorker {
                registration: WorkerRegistration {
                    uid: uid.into(),
                    address: format!("127.0.0.1:{}", 9000 + cpus),
                    host: "127.0.0.1".into(),
                    hostname: "test".into(),
                    capacity: Capacity {
                        cpus,
                        gpus: 0,
                        memory_bytes: 1 << 30,
                    },
                    task_ports: (29500, 29599),
                },
                now_ms: 1,
            },
        );
        let CommandResult::WorkerRegistered { worker } = result else {
            panic!("{result:?}")
        };
        worker.id
    }

    fn start(state: &mut StateMachine, job: JobId, attempt: u32, placement: Vec<WorkerId>) -> CommandResult {
        apply(
            state,
            Command::StartAttempt {
                job,
                attempt,
                placement,
                master_port: 29500,
                now_ms: 5,
            },
        )
    }

    fn finish(state: &mut StateMachine, job: JobId, attempt: u32, rank: u32, worker: WorkerId, code: i32) {
        apply(
            state,
            Command::TaskFinished {
                task: TaskKey { job, attempt, rank },
                worker,
                outcome: TaskOutcome::Exited { code },
                now_ms: 9,
            },
        );
    }

    #[test]
    fn idempotency_key_returns_the_same_job() {
        let mut state = StateMachine::default();
        let first = apply(&mut state, submit("k1", 10));
        let mut changed = Vec::new();
        let again = state.apply(submit("k1", 20), &mut changed);
        let (CommandResult::Submitted { job: a, created: true }, CommandResult::Submitted { job: b, created: false }) =
            (first, again)
        else {
            panic!("unexpected results");
        };
        assert_eq!(a, b);
        assert!(changed.is_empty());
        assert_eq!(state.job_count(), 1);
    }

    #[test]
    fn cancel_follows_the_lifecycle() {
        let mut state = StateMachine::default();
        apply(&mut state, submit("", 1));
        let result = apply(
            &mut state,
            Command::CancelJob {
                id: 1,
                reason: String::new(),
                now_ms: 5,
            },
        );
        let CommandResult::Cancelled { job } = result else {
            panic!("{result:?}")
        };
        assert_eq!((job.state, job.finished_at_ms), (JobState::Cancelled, Some(5)));
        assert_eq!(state.queued_jobs().count(), 0);
        let result = apply(
            &mut state,
            Command::CancelJob {
                id: 9,
                reason: String::new(),
                now_ms: 5,
            },
        );
        assert!(matches!(result, CommandResult::Rejected(CoordinatorError::NotFound(_))));
        assert!(!JobState::Succeeded.can_become(JobState::Cancelled));
    }

    #[test]
    fn a_gang_succeeds_when_every_rank_exits_zero() {
        let mut state = StateMachine::default();
        let (a, b) = (register(&mut state, "a", 2), register(&mut state, "b", 2));
        apply(&mut state, submit_spec("", 1, &gang(2, 0)));
        assert!(matches!(start(&mut state, 1, 1, vec![a, b]), CommandResult::Done));
        // The same decision again (a duplicate proposal) is refused and changes nothing.
        assert!(matches!(
            start(&mut state, 1, 1, vec![a, b]),
            CommandResult::Rejected(_)
        ));
        assert_eq!(state.worker(a).unwrap().allocated.cpus, 1);
        finish(&mut state, 1, 1, 0, a, 0);
        assert_eq!(state.job(1).unwrap().state, JobState::Running);
        // A report from the wrong worker, or repeated, changes nothing.
        finish(&mut state, 1, 1, 1, a, 0);
        finish(&mut state, 1, 1, 0, a, 3);
        finish(&mut state, 1, 1, 1, b, 0);
        let job = state.job(1).unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(job.attempts[0].state, AttemptState::Succeeded);
        assert_eq!(state.worker(a).unwrap().allocated, Capacity::default());
        assert!(state.worker(b).unwrap().tasks.is_empty());
    }

    #[test]
    fn a_failed_rank_stops_its_gang_and_restarts_the_job() {
        let mut state = StateMachine::default();
        let (a, b) = (register(&mut state, "a", 2), register(&mut state, "b", 2));
        apply(&mut state, submit_spec("", 1, &gang(2, 1)));
        start(&mut state, 1, 1, vec![a, b]);
        finish(&mut state, 1, 1, 1, b, 7);
        let job = state.job(1).unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert!(
            job.message.contains("rank 1 exited with code 7 on worker 2"),
            "{}",
            job.message
        );
        assert!(job.attempts[0].tasks[0].stop_requested);
        // Rank 0 still holds its slot until its worker reports it stopped.
        assert_eq!(state.worker(a).unwrap().allocated.cpus, 1);
        assert_eq!(state.queued_jobs().count(), 1);
        apply(
            &mut state,
            Command::TaskFinished {
                task: TaskKey {
                    job: 1,
                    attempt: 1,
                    rank: 0,
                },
                worker: a,
                outcome: TaskOutcome::Signalled { signal: 15 },
                now_ms: 10,
            },
        );
        assert_eq!(state.job(1).unwrap().attempts[0].tasks[0].state, TaskState::Killed);
        start(&mut state, 1, 2, vec![a, a]);
        // The second attempt loses its worker: no restarts left, so the job fails with the reason.
        apply(
            &mut state,
            Command::WorkerLost {
                worker: a,
                registrations: 1,
                reason: "missed its lease".into(),
                now_ms: 20,
            },
        );
        let job = state.job(1).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.message.contains("missed its lease"), "{}", job.message);
        assert_eq!(state.worker(a).unwrap().allocated, Capacity::default());
        assert!(matches!(
            start(&mut state, 1, 3, vec![b, b]),
            CommandResult::Rejected(_)
        ));
    }

    #[test]
    fn too_large_jobs_are_refused_and_restarted_workers_keep_their_id() {
        let mut state = StateMachine::default();
        // With no workers at all, jobs wait.
        assert!(matches!(
            apply(&mut state, submit_spec("", 1, &gang(8, 0))),
            CommandResult::Submitted { .. }
        ));
        let a = register(&mut state, "a", 2);
        let result = apply(
            &mut state,
            submit_spec(
                "",
                1,
                "name = \"big\"\nkind = \"command\"\ncommand = \"x\"\n[resources]\ngpus = 5\n",
            ),
        );
        let CommandResult::Rejected(error) = result else {
            panic!("{result:?}")
        };
        assert!(error.to_string().contains("5 gpus"), "{error}");
        assert_eq!(state.job_count(), 1);
        apply(&mut state, submit_spec("", 1, &gang(1, 0)));
        start(&mut state, 2, 1, vec![a]);
        assert_eq!(register(&mut state, "a", 4), a);
        let worker = state.worker(a).unwrap();
        assert_eq!((worker.registrations, worker.capacity.cpus), (2, 4));
        assert_eq!(worker.allocated, Capacity::default());
        assert_eq!(state.job(2).unwrap().state, JobState::Failed);
        assert!(matches!(
            state.query(&Query::GetWorker { id: 42 }),
            QueryResult::Rejected(CoordinatorError::NotFound(_))
        ));
    }

    /// Format 1 as yesterday's build wrote it (same field order, so the same bincode).
    #[derive(Serialize)]
    struct Version1Job {
        id: JobId,
        spec: JobSpec,
        spec_toml: String,
        state: JobState,
        attempts: Vec<()>,
        submitted_at_ms: i64,
        updated_at_ms: i64,
        finished_at_ms: Option<i64>,
        message: String,
        idempotency_key: String,
    }

    #[test]
    fn sweeps_index_their_trials_and_a_trial_is_placed_by_its_idempotency_key() {
        let mut state = StateMachine::default();
        let worker = register(&mut state, "w", 2);
        let sweep_toml = include_str!("../../examples/sweeps/branin-tpe.toml");
        let CommandResult::Submitted { job: sweep, .. } = apply(&mut state, submit_spec("sweep", 1, sweep_toml)) else {
            panic!("the sweep was not submitted")
        };
        apply(&mut state, submit("plain", 2));
        let spec = crate::sweep::SweepSpec::parse(sweep_toml).unwrap();
        for trial in [1u64, 0] {
            let mut params = crate::sweep::Params::new();
            params.insert("x".into(), crate::sweep::Value::Float(trial as f64));
            params.insert("y".into(), crate::sweep::Value::Float(1.0));
            let text = spec.trial_spec(sweep.id, trial, &params);
            apply(&mut state, submit_spec(&format!("sweep-1-trial-{trial}"), 3, &text));
        }
        let listed: Vec<(JobId, Vec<u64>)> = state
            .sweeps()
            .map(|(sweep, trials)| (sweep.id, trials.iter().map(|(trial, _)| *trial).collect()))
            .collect();
        assert_eq!(listed, vec![(sweep.id, vec![0, 1])]);

        // Placed by key in the batch that submitted it; an unknown key changes nothing.
        let by_key = |key: &str| Command::StartAttemptByKey {
            idempotency_key: key.into(),
            attempt: 1,
            placement: vec![worker],
            master_port: 29500,
            now_ms: 4,
        };
        let refused = apply(&mut state, by_key("sweep-1-trial-7"));
        assert!(matches!(refused, CommandResult::Rejected(_)), "{refused:?}");
        assert_eq!(apply(&mut state, by_key("sweep-1-trial-0")), CommandResult::Done);
        let placed = state.sweeps().next().unwrap().1[0].1.clone();
        assert_eq!((placed.state, placed.attempts.len()), (JobState::Running, 1));

        // The index is not stored: a snapshot rebuilds it.
        let restored = StateMachine::from_snapshot(&state.to_snapshot().unwrap()).unwrap();
        assert_eq!(restored, state);
        assert_eq!(restored.sweeps().count(), 1);
    }

    #[test]
    fn a_version_1_snapshot_is_upgraded_with_its_jobs_queued() {
        let spec_toml = "name = \"hello\"\nkind = \"command\"\ncommand = \"true\"\n".to_string();
        let spec = parse_job_spec("t", &spec_toml).unwrap();
        let job = |id: JobId, state: JobState| Version1Job {
            id,
            spec: spec.clone(),
            spec_toml: spec_toml.clone(),
            state,
            attempts: Vec::new(),
            submitted_at_ms: 10,
            updated_at_ms: 10,
            finished_at_ms: None,
            message: String::new(),
            idempotency_key: format!("k{id}"),
        };
        let jobs: BTreeMap<JobId, Version1Job> = [(1, job(1, JobState::Queued)), (2, job(2, JobState::Cancelled))]
            .into_iter()
            .collect();
        let keys: BTreeMap<String, JobId> = [("k1".to_string(), 1u64), ("k2".to_string(), 2u64)]
            .into_iter()
            .collect();
        let members: BTreeMap<NodeId, MemberRecord> = [(
            1,
            MemberRecord {
                raft_addr: "127.0.0.1:7071".into(),
            },
        )]
        .into_iter()
        .collect();
        let bytes = encode(&(1u32, (jobs, keys, 2u64, members))).unwrap();
        let mut state = StateMachine::from_snapshot(&bytes).unwrap();
        assert_eq!(state.job_count(), 2);
        assert_eq!(state.queued_jobs().map(|job| job.id).collect::<Vec<_>>(), [1]);
        assert_eq!(state.members().len(), 1);
        // Ids and idempotency keys carry on where they were.
        let CommandResult::Submitted { job, created } = apply(&mut state, submit("k2", 20)) else {
            panic!("a retried key is answered")
        };
        assert_eq!((job.id, created), (2, false));
        let CommandResult::Submitted { job, .. } = apply(&mut state, submit("k3", 20)) else {
            panic!("a new key creates a job")
        };
        assert_eq!(job.id, 3);
    }

    #[test]
    fn a_version_2_snapshot_is_upgraded_with_its_workers_and_attempts() {
        // Format 2 is format 3 without each job's metrics and artifacts: write one field by field.
        #[derive(Serialize)]
        struct Version2Job<'a> {
            id: JobId,
            spec: &'a JobSpec,
            spec_toml: &'a str,
            state: JobState,
            attempts: &'a [Attempt],
            submitted_at_ms: i64,
            updated_at_ms: i64,
            finished_at_ms: Option<i64>,
            message: &'a str,
            idempotency_key: &'a str,
            queued_since_ms: i64,
        }
        let mut state = StateMachine::default();
        let a = register(&mut state, "a", 2);
        apply(&mut state, submit_spec("k1", 1, &gang(1, 1)));
        apply(&mut state, submit_spec("k2", 1, &gang(1, 0)));
        start(&mut state, 1, 1, vec![a]);
        let jobs: BTreeMap<JobId, Version2Job> = state
            .jobs
            .iter()
            .map(|(id, job)| {
                let old = Version2Job {
                    id: job.id,
                    spec: &job.spec,
                    spec_toml: &job.spec_toml,
                    state: job.state,
                    attempts: &job.attempts,
                    submitted_at_ms: job.submitted_at_ms,
                    updated_at_ms: job.updated_at_ms,
                    finished_at_ms: job.finished_at_ms,
                    message: &job.message,
                    idempotency_key: &job.idempotency_key,
                    queued_since_ms: job.queued_since_ms,
                };
                (*id, old)
            })
            .collect();
        let body = (
            jobs,
            &state.idempotency_keys,
            state.next_job_id,
            &state.members,
            &state.workers,
            &state.worker_uids,
            state.next_worker_id,
            &state.queue,
        );
        let bytes = encode(&(2u32, body)).unwrap();
        let upgraded = StateMachine::from_snapshot(&bytes).unwrap();
        assert_eq!(
            upgraded, state,
            "everything carries over; metrics and artifacts start empty"
        );
        assert_eq!(upgraded.worker(a).unwrap().tasks.len(), 1);
    }

    #[test]
    fn metrics_are_kept_for_the_running_attempt_only() {
        let mut state = StateMachine::default();
        let a = register(&mut state, "a", 2);
        apply(&mut state, submit_spec("", 1, &gang(1, 1)));
        start(&mut state, 1, 1, vec![a]);
        let record = |attempt: u32, loss: f64| Command::RecordMetrics {
            job: 1,
            attempt,
            metrics: [("loss".to_string(), loss)].into(),
            artifacts: [("model".to_string(), "/runs/1/model".to_string())].into(),
            now_ms: 6,
        };
        assert!(matches!(apply(&mut state, record(1, 0.5)), CommandResult::Done));
        assert!(matches!(apply(&mut state, record(1, 0.25)), CommandResult::Done));
        assert!(matches!(apply(&mut state, record(2, 9.0)), CommandResult::Rejected(_)));
        let job = state.job(1).unwrap();
        assert_eq!(job.metrics["loss"], 0.25);
        assert_eq!(job.artifacts["model"], "/runs/1/model");
    }

    #[test]
    fn a_version_3_snapshot_is_upgraded_with_an_empty_catalog() {
        // Format 3 is format 4 without the catalog.
        let mut state = StateMachine::default();
        let a = register(&mut state, "a", 2);
        apply(&mut state, submit_spec("k1", 1, &gang(1, 1)));
        start(&mut state, 1, 1, vec![a]);
        let body = (
            &state.jobs,
            &state.idempotency_keys,
            state.next_job_id,
            &state.members,
            &state.workers,
            &state.worker_uids,
            state.next_worker_id,
            &state.queue,
        );
        let bytes = encode(&(3u32, body)).unwrap();
        assert_eq!(StateMachine::from_snapshot(&bytes).unwrap(), state);
    }

    #[test]
    fn catalog_applies_are_replicated_commands_and_survive_snapshots() {
        let mut state = StateMachine::default();
        let command = |content: &str, now_ms| Command::ApplyCatalog {
            namespace: "features".into(),
            objects: vec![ObjectDraft {
                kind: "feature_view".into(),
                name: "driver_hourly".into(),
                content: content.into(),
            }],
            replace: true,
            now_ms,
        };
        let CommandResult::CatalogApplied(applied) = apply(&mut state, command("a", 1)) else {
            panic!("not applied")
        };
        assert_eq!(applied[0].version, 1);
        let CommandResult::CatalogApplied(applied) = apply(&mut state, command("b", 2)) else {
            panic!("not applied")
        };
        assert_eq!(applied[0].version, 2);
        assert!(matches!(
            apply(&mut state, command("", 3)),
            CommandResult::Rejected(CoordinatorError::InvalidArgument(_))
        ));
        let restored = StateMachine::from_snapshot(&state.to_snapshot().unwrap()).unwrap();
        let QueryResult::Catalog(objects) = restored.query(&Query::ListCatalog {
            namespace: "features".into(),
            include_deleted: false,
            include_history: true,
        }) else {
            panic!("not a catalog")
        };
        assert_eq!(objects.len(), 1);
        let contents: Vec<&str> = objects[0].versions.iter().map(|v| v.content.as_str()).collect();
        assert_eq!(contents, ["a", "b"]);
    }

    #[test]
    fn a_version_4_snapshot_is_upgraded_with_empty_tracking() {
        // Format 4 is format 5 without tracking.
        let mut state = StateMachine::default();
        register(&mut state, "a", 2);
        apply(&mut state, submit("k1", 1));
        let body = (
            &state.jobs,
            &state.idempotency_keys,
            state.next_job_id,
            &state.members,
            &state.workers,
            &state.worker_uids,
            state.next_worker_id,
            &state.queue,
            &state.catalog,
        );
        let bytes = encode(&(4u32, body)).unwrap();
        assert_eq!(StateMachine::from_snapshot(&bytes).unwrap(), state);
    }

    #[test]
    fn a_version_5_snapshot_is_upgraded_with_an_empty_registry() {
        use crate::tracking::TrackingCommand;
        // Format 5 is format 6 without the tables it added to the tracking store, its last fields.
        let mut state = StateMachine::default();
        apply(&mut state, submit("k1", 1));
        let command = TrackingCommand::CreateExperiment {
            name: "digits".into(),
            artifact_location: None,
            tags: vec![("team".into(), "vision".into())],
            artifact_root: "file:///a".into(),
        };
        apply(&mut state, Command::Track { command, now_ms: 5 });
        assert!(state.tracking().experiment_by_name("digits").is_ok());
        let current = state.to_snapshot().unwrap();
        // The tables format 6 added to the tracking store, empty, encode as one length byte (0 entries)
        // each at the very end: the registry, artifacts, logged models, job reports, datasets, run inputs;
        // after them format 8's run outputs and model metrics, and format 7's held jobs and standby
        // placements.
        let added = 6 + 2 + 2;
        assert_eq!(current[current.len() - added..], [0u8; 10]);
        let mut bytes = encode(&(5u32, ())).unwrap();
        let header = bytes.len();
        bytes.extend_from_slice(&current[header..current.len() - added]);
        assert_eq!(StateMachine::from_snapshot(&bytes).unwrap(), state);
    }

    #[test]
    fn tracking_writes_are_replicated_commands_and_survive_snapshots() {
        use crate::tracking::{LogBatch, MetricPoint, TrackingCommand, TrackingOutcome};
        let mut state = StateMachine::default();
        let root = "file:///data/artifacts".to_string();
        let track = |command| Command::Track { command, now_ms: 10 };
        let run_id = format!("{:032x}", 1);
        let created = apply(
            &mut state,
            track(TrackingCommand::CreateRun {
                run_id: run_id.clone(),
                experiment_id: "0".into(),
                name: "first".into(),
                user_id: "ada".into(),
                start_time_ms: 10,
                tags: Vec::new(),
                artifact_root: root.clone(),
            }),
        );
        let CommandResult::Tracked(Ok(TrackingOutcome::Run(run))) = created else {
            panic!("{created:?}")
        };
        assert_eq!(run.artifact_uri, format!("file:///data/artifacts/0/{run_id}/artifacts"));
        let logged = apply(
            &mut state,
            track(TrackingCommand::LogBatch {
                run_id: run_id.clone(),
                batch: LogBatch {
                    metrics: vec![(
                        "loss".into(),
                        MetricPoint {
                            value: 0.5,
                            timestamp_ms: 11,
                            step: 1,
                        },
                    )],
                    params: vec![("lr".into(), "0.1".into())],
                    tags: Vec::new(),
                },
                artifact_root: root.clone(),
            }),
        );
        assert!(
            matches!(logged, CommandResult::Tracked(Ok(TrackingOutcome::Done))),
            "{logged:?}"
        );

        // A refused write changes nothing; on an empty store that includes the Default experiment.
        let mut empty = StateMachine::default();
        let refused = apply(
            &mut empty,
            track(TrackingCommand::SetRunStage {
                run_id: "nope".into(),
                deleted: true,
                artifact_root: root.clone(),
            }),
        );
        let CommandResult::Tracked(Err(error)) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(error.code, crate::tracking::ErrorCode::ResourceDoesNotExist);
        assert_eq!(empty, StateMachine::default());

        let restored = StateMachine::from_snapshot(&state.to_snapshot().unwrap()).unwrap();
        assert_eq!(restored, state);
        let history = restored.tracking().metric_history(&run_id, "loss").unwrap();
        assert_eq!(history.iter().map(|point| point.value).collect::<Vec<_>>(), [0.5]);
        assert_eq!(restored.tracking().run(&run_id).unwrap().params["lr"], "0.1");
    }

    #[test]
    fn a_numbered_report_logs_its_points_once_however_often_it_is_retried() {
        use crate::tracking::{MetricPoint, Tracking};
        let mut state = StateMachine::default();
        let worker = register(&mut state, "a", 2);
        let spec = "name = \"digits\"\nkind = \"train\"\n[train]\nmodel = \"mlp\"\ndataset = \"d.csv\"\nlabel = \"y\"\n[resources]\nworkers = 1\ncpus = 1\n";
        apply(&mut state, submit_spec("k", 1, spec));
        start(&mut state, 1, 1, vec![worker]);
        let point = |value: f64, step: i64| {
            (
                "train_loss".to_string(),
                MetricPoint {
                    value,
                    timestamp_ms: 5,
                    step,
                },
            )
        };
        let report = |attempt: u32, sequence: u64, points: Vec<(String, MetricPoint)>| {
            Command::RecordReport(Report {
                job: 1,
                attempt,
                sequence,
                metrics: [("train_loss".to_string(), points.last().unwrap().1.value)].into(),
                points,
                artifacts: BTreeMap::new(),
                now_ms: 7,
            })
        };
        // Three steps in one batch, then the next batch; the first is retried after both (a failover).
        let first = report(1, 1, vec![point(0.9, 10), point(0.8, 20), point(0.7, 30)]);
        assert!(matches!(apply(&mut state, first.clone()), CommandResult::Done));
        assert!(matches!(
            apply(&mut state, report(1, 2, vec![point(0.6, 40)])),
            CommandResult::Done
        ));
        assert!(
            matches!(apply(&mut state, first), CommandResult::Done),
            "a retry succeeds"
        );
        let history = state
            .tracking()
            .metric_history(&Tracking::job_run_id(1), "train_loss")
            .unwrap();
        let steps: Vec<(i64, f64)> = history.iter().map(|point| (point.step, point.value)).collect();
        assert_eq!(steps, [(10, 0.9), (20, 0.8), (30, 0.7), (40, 0.6)]);
        assert_eq!(
            state.job(1).unwrap().metrics["train_loss"],
            0.6,
            "the retry did not roll the latest back"
        );
        // A report of an attempt that is not running is refused, numbered or not.
        let stale = report(2, 1, vec![point(0.1, 50)]);
        assert!(matches!(apply(&mut state, stale), CommandResult::Rejected(_)));
    }

    #[test]
    fn a_train_job_gets_a_tracking_run_that_follows_its_metrics_and_its_end() {
        use crate::tracking::{RunStatus, Tracking};
        let mut state = StateMachine::default();
        let worker = register(&mut state, "a", 2);
        let spec = "name = \"digits\"\nkind = \"train\"\n[train]\nmodel = \"mlp\"\ndataset = \"d.csv\"\nlabel = \"y\"\nepochs = 2\nlearning_rate = 0.01\n[resources]\nworkers = 1\ncpus = 1\n";
        apply(&mut state, submit_spec("k", 1, spec));
        // A command job gets no run.
        apply(&mut state, submit("k2", 1));
        assert!(state.tracking().run(&Tracking::job_run_id(2)).is_err());
        let run_id = Tracking::job_run_id(1);
        let run = state.tracking().run(&run_id).unwrap().clone();
        assert_eq!(
            (run.name.as_str(), run.experiment_id.as_str(), run.status),
            ("digits", "0", RunStatus::Running)
        );
        assert_eq!(run.tags["kiln.job_id"], "1");
        assert_eq!(run.params["learning_rate"], "0.01");
        assert_eq!(run.params["epochs"], "2");
        // Its artifacts go through the artifact proxy, like every experiment's made here.
        assert_eq!(
            state.tracking().experiment("0").unwrap().artifact_location,
            "mlflow-artifacts:/0"
        );
        assert_eq!(run.artifact_uri, format!("mlflow-artifacts:/0/{run_id}/artifacts"));

        start(&mut state, 1, 1, vec![worker]);
        for (epoch, loss) in [(1.0, 0.9), (2.0, 0.4)] {
            let report = Command::RecordMetrics {
                job: 1,
                attempt: 1,
                metrics: [("epoch".to_string(), epoch), ("loss".to_string(), loss)].into(),
                artifacts: BTreeMap::new(),
                now_ms: 10,
            };
            assert!(matches!(apply(&mut state, report), CommandResult::Done));
        }
        let history = state.tracking().metric_history(&run_id, "loss").unwrap();
        let points: Vec<(i64, f64)> = history.iter().map(|point| (point.step, point.value)).collect();
        assert_eq!(points, [(1, 0.9), (2, 0.4)]);

        finish(&mut state, 1, 1, 0, worker, 0);
        let run = state.tracking().run(&run_id).unwrap();
        assert_eq!(run.status, RunStatus::Finished);
        assert_eq!(run.end_time_ms, state.job(1).unwrap().finished_at_ms);
    }

    fn hold(state: &mut StateMachine, key: &str, held: bool) -> CommandResult {
        apply(
            state,
            Command::HoldJob {
                idempotency_key: key.into(),
                held,
                now_ms: 6,
            },
        )
    }

    fn stand_by(state: &mut StateMachine, key: &str, after: TaskKey) -> CommandResult {
        apply(
            state,
            Command::StandbyAttempt {
                idempotency_key: key.into(),
                after,
                now_ms: 7,
            },
        )
    }

    fn refused(result: CommandResult, expected: &str) {
        match result {
            CommandResult::Rejected(error) => assert!(error.to_string().contains(expected), "{error}"),
            other => panic!("expected a refusal naming '{expected}', got {other:?}"),
        }
    }

    #[test]
    fn a_held_job_stands_by_and_starts_in_the_place_of_the_task_it_waits_for() {
        let mut state = StateMachine::default();
        let worker = register(&mut state, "w", 2);
        apply(&mut state, submit("a", 1));
        assert_eq!(start(&mut state, 1, 1, vec![worker]), CommandResult::Done);
        let a = TaskKey {
            job: 1,
            attempt: 1,
            rank: 0,
        };
        for key in ["b", "c"] {
            apply(&mut state, submit(key, 2));
        }
        apply(&mut state, submit_spec("wide", 2, &gang(2, 0)));
        // Not held: the scheduler's to place.
        refused(stand_by(&mut state, "b", a), "only a held, queued job stands by");
        assert_eq!(hold(&mut state, "b", true), CommandResult::Done);
        assert_eq!(hold(&mut state, "c", true), CommandResult::Done);
        assert_eq!(hold(&mut state, "wide", true), CommandResult::Done);
        assert_eq!(
            state.queued_jobs().map(|job| job.id).collect::<Vec<_>>(),
            Vec::<JobId>::new(),
            "held jobs are not the scheduler's"
        );
        refused(stand_by(&mut state, "wide", a), "only a single-rank job stands by");
        let missing = TaskKey { job: 9, ..a };
        refused(stand_by(&mut state, "b", missing), "does not exist");
        let before = state.clone();
        assert_eq!(stand_by(&mut state, "b", a), CommandResult::Done);
        assert_eq!(
            stand_by(&mut state, "b", a),
            CommandResult::Done,
            "a repeat changes nothing"
        );
        refused(
            stand_by(&mut state, "c", a),
            "job 2 already stands by behind job 1 attempt 1 rank 0",
        );
        assert_ne!(state, before);
        let b = state.job(2).unwrap();
        assert_eq!(b.state, JobState::Queued);
        assert!(b.message.contains("standing by on worker 1"), "{}", b.message);
        assert_eq!(state.standing_by(2), Some(a));
        // The slot is a's until it exits; then b has it, in the same apply.
        assert_eq!(state.worker(worker).unwrap().free().cpus, 1);
        finish(&mut state, 1, 1, 0, worker, 0);
        assert_eq!(state.job(1).unwrap().state, JobState::Succeeded);
        let b = state.job(2).unwrap();
        assert_eq!(b.state, JobState::Running);
        let attempt = b.current_attempt().unwrap();
        assert_eq!(
            (attempt.number, attempt.tasks[0].worker, attempt.master_port),
            (1, worker, 29500)
        );
        assert!(
            attempt.message.contains("in the place of job 1 attempt 1 rank 0"),
            "{}",
            attempt.message
        );
        assert!(!state.is_held(2));
        assert_eq!(state.standing_by(2), None);
        let record = state.worker(worker).unwrap();
        assert_eq!((record.free().cpus, record.tasks.len()), (1, 1));
        // A finished task hands nothing on twice; c still waits, held.
        refused(stand_by(&mut state, "c", a), "is succeeded, not running");
        assert!(state.is_held(3));
        // Released, c is the scheduler's again.
        assert_eq!(hold(&mut state, "c", false), CommandResult::Done);
        assert_eq!(state.queued_jobs().map(|job| job.id).collect::<Vec<_>>(), [3]);
        refused(
            hold(&mut state, "a", true),
            "job 1 is succeeded; only a queued job can be held",
        );
    }

    #[test]
    fn a_standby_goes_with_a_lost_worker_and_with_a_cancel() {
        let mut state = StateMachine::default();
        let worker = register(&mut state, "w", 2);
        for key in ["a", "b", "c", "d"] {
            apply(&mut state, submit(key, 1));
        }
        start(&mut state, 1, 1, vec![worker]);
        apply(
            &mut state,
            Command::StartAttempt {
                job: 2,
                attempt: 1,
                placement: vec![worker],
                master_port: 29501,
                now_ms: 5,
            },
        );
        let task = |job| TaskKey {
            job,
            attempt: 1,
            rank: 0,
        };
        for (key, after) in [("c", 1), ("d", 2)] {
            hold(&mut state, key, true);
            assert_eq!(stand_by(&mut state, key, task(after)), CommandResult::Done);
        }
        // A cancelled standby is gone: its predecessor's exit hands nothing on.
        apply(
            &mut state,
            Command::CancelJob {
                id: 4,
                reason: String::new(),
                now_ms: 8,
            },
        );
        assert!(!state.is_held(4) && state.standing_by(4).is_none());
        finish(&mut state, 2, 1, 0, worker, 0);
        assert_eq!(state.job(4).unwrap().state, JobState::Cancelled);
        assert_eq!(state.worker(worker).unwrap().free().cpus, 1);
        // Snapshots keep what stands by.
        let restored = StateMachine::from_snapshot(&state.to_snapshot().unwrap()).unwrap();
        assert_eq!(restored, state);
        assert_eq!(restored.standing_by(3), Some(task(1)));
        // A lost worker loses the place: the job stays held, for its sweep to place again.
        let registrations = state.worker(worker).unwrap().registrations;
        apply(
            &mut state,
            Command::WorkerLost {
                worker,
                registrations,
                reason: "gone".into(),
                now_ms: 9,
            },
        );
        let c = state.job(3).unwrap();
        assert_eq!(c.state, JobState::Queued);
        assert!(c.message.contains("was lost with worker 1"), "{}", c.message);
        assert!(state.is_held(3) && state.standing_by(3).is_none());
    }

    #[test]
    fn a_version_6_snapshot_is_upgraded_with_nothing_held() {
        // Format 6 is format 8 without its last four fields (the tracking store's run outputs and model
        // metrics, then held jobs and standby placements): empty, one length byte each.
        let mut state = StateMachine::default();
        apply(&mut state, submit("k1", 1));
        register(&mut state, "w", 2);
        let current = state.to_snapshot().unwrap();
        assert_eq!(current[current.len() - 4..], [0u8; 4]);
        let mut bytes = encode(&(6u32, ())).unwrap();
        let header = bytes.len();
        bytes.extend_from_slice(&current[header..current.len() - 4]);
        assert_eq!(StateMachine::from_snapshot(&bytes).unwrap(), state);
    }

    #[test]
    fn a_version_7_snapshot_is_upgraded_with_no_run_outputs() {
        use crate::tracking::TrackingCommand;
        // Format 7 is format 8 without the tracking store's run outputs and model metrics, the fields before
        // held jobs and standby placements (a held job makes those two more than empty), and without the
        // object of each artifact record, its last field (None: one byte).
        let mut state = StateMachine::default();
        apply(&mut state, submit("k1", 1));
        apply(
            &mut state,
            Command::HoldJob {
                idempotency_key: "k1".into(),
                held: true,
                now_ms: 2,
            },
        );
        assert!(state.is_held(1));
        let sha256 = "ab".repeat(32);
        let command = TrackingCommand::RecordArtifact {
            path: "0/r/artifacts/w.bin".into(),
            size: 3,
            sha256: sha256.clone(),
            artifact_root: "file:///a".into(),
        };
        apply(&mut state, Command::Track { command, now_ms: 5 });
        let current = state.to_snapshot().unwrap();
        // Held: one entry (length 1, job 1); standby: empty. Before them, the empty run outputs and model
        // metrics.
        let tail = 5;
        assert_eq!(current[current.len() - tail..], [0u8, 0, 1, 1, 0]);
        // The record: its size, its SHA-256, the time it was stored (one byte), then the object.
        let after_sha = current
            .windows(sha256.len())
            .position(|window| window == sha256.as_bytes())
            .unwrap()
            + sha256.len();
        let object = after_sha + 1;
        assert_eq!(current[object], 0, "no object");
        let mut bytes = encode(&(7u32, ())).unwrap();
        let header = bytes.len();
        bytes.extend_from_slice(&current[header..object]);
        bytes.extend_from_slice(&current[object + 1..current.len() - tail]);
        bytes.extend_from_slice(&current[current.len() - tail + 2..]);
        let upgraded = StateMachine::from_snapshot(&bytes).unwrap();
        assert_eq!(upgraded, state);
        let record = upgraded.tracking().artifact("0/r/artifacts/w.bin").unwrap();
        assert_eq!(
            (record.size, record.sha256.as_str(), record.object.as_deref()),
            (3, sha256.as_str(), None)
        );
    }

    #[test]
    fn snapshot_round_trip_and_version_check() {
        let mut state = StateMachine::default();
        apply(&mut state, submit("a", 1));
        register(&mut state, "w", 2);
        state.record_member(1, Some("127.0.0.1:7071".into()));
        let bytes = state.to_snapshot().unwrap();
        assert_eq!(StateMachine::from_snapshot(&bytes).unwrap(), state);
        let wrong = encode(&(99u32, &state)).unwrap();
        let error = StateMachine::from_snapshot(&wrong).unwrap_err();
        assert!(error.to_string().contains("version 99"), "{error}");
    }
}
