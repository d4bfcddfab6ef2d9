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

use crate::error::CoordinatorError;
use crate::spec::JobSpec;

pub type JobId = u64;
pub type NodeId = u64;

/// Bumped whenever the snapshot layout changes.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;
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

/// One try at running every rank of a job; the workers issue fills these in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub state: String,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// A member's address as recorded in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub raft_addr: String,
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
}

/// What applying a command produced, sent back to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    Submitted { job: Job, created: bool },
    Cancelled { job: Job },
    Rejected(CoordinatorError),
}

/// Reads, served after ReadIndex confirms this node has applied everything committed before the read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Query {
    GetJob {
        id: JobId,
    },
    /// Jobs in id order, optionally only those in `states`, at most `limit` (0: all).
    ListJobs {
        states: Vec<JobState>,
        limit: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueryResult {
    Job(Job),
    Jobs(Vec<Job>),
    Rejected(CoordinatorError),
}

/// The replicated state. Its maps are persistent (`imbl`): a clone shares structure and costs next to
/// nothing, so a snapshot copy never stalls the event loop however many jobs there are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    jobs: imbl::OrdMap<JobId, Job>,
    idempotency_keys: imbl::OrdMap<String, JobId>,
    next_job_id: JobId,
    members: BTreeMap<NodeId, MemberRecord>,
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

impl StateMachine {
    pub fn apply(&mut self, command: Command) -> (CommandResult, Option<Job>) {
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
                    return (CommandResult::Submitted { job, created: false }, None);
                }
                self.next_job_id += 1;
                let job = Job {
                    id: self.next_job_id,
                    spec,
                    spec_toml,
                    state: JobState::Queued,
                    attempts: Vec::new(),
                    submitted_at_ms: now_ms,
                    updated_at_ms: now_ms,
                    finished_at_ms: None,
                    message: String::new(),
                    idempotency_key: idempotency_key.clone(),
                };
                if !idempotency_key.is_empty() {
                    self.idempotency_keys.insert(idempotency_key, job.id);
                }
                self.jobs.insert(job.id, job.clone());
                (
                    CommandResult::Submitted {
                        job: job.clone(),
                        created: true,
                    },
                    Some(job),
                )
            }
            Command::CancelJob { id, reason, now_ms } => {
                let Some(job) = self.jobs.get_mut(&id) else {
                    return (
                        CommandResult::Rejected(CoordinatorError::NotFound(format!("job {id} does not exist"))),
                        None,
                    );
                };
                if job.state == JobState::Cancelled {
                    return (CommandResult::Cancelled { job: job.clone() }, None);
                }
                if !job.state.can_become(JobState::Cancelled) {
                    return (
                        CommandResult::Rejected(CoordinatorError::FailedPrecondition(format!(
                            "job {id} already {}; only queued or running jobs can be cancelled",
                            job.state.label()
                        ))),
                        None,
                    );
                }
                job.state = JobState::Cancelled;
                job.updated_at_ms = now_ms;
                job.finished_at_ms = Some(now_ms);
                job.message = if reason.is_empty() {
                    "cancelled by user".into()
                } else {
                    reason
                };
                (CommandResult::Cancelled { job: job.clone() }, Some(job.clone()))
            }
        }
    }

    pub fn query(&self, query: &Query) -> QueryResult {
        match query {
            Query::GetJob { id } => match self.jobs.get(id) {
                Some(job) => QueryResult::Job(job.clone()),
                None => QueryResult::Rejected(CoordinatorError::NotFound(format!("job {id} does not exist"))),
            },
            Query::ListJobs { states, limit } => {
                let selected = self
                    .jobs
                    .values()
                    .filter(|job| states.is_empty() || states.contains(&job.state));
                let jobs = if *limit == 0 {
                    selected.cloned().collect()
                } else {
                    selected.take(*limit).cloned().collect()
                };
                QueryResult::Jobs(jobs)
            }
        }
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
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
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(CoordinatorError::Storage(format!(
                "snapshot format version {version} is not supported; this build reads version {SNAPSHOT_FORMAT_VERSION}"
            )));
        }
        let (_, state): (u32, StateMachine) = decode(bytes, "state machine snapshot")?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_job_spec;

    fn submit(key: &str, now_ms: i64) -> Command {
        let spec_toml = "name = \"hello\"\nkind = \"command\"\ncommand = \"true\"\n".to_string();
        let spec = parse_job_spec("t", &spec_toml).unwrap();
        Command::SubmitJob {
            spec,
            spec_toml,
            idempotency_key: key.into(),
            now_ms,
        }
    }

    #[test]
    fn idempotency_key_returns_the_same_job() {
        let mut state = StateMachine::default();
        let (first, _) = state.apply(submit("k1", 10));
        let (again, event) = state.apply(submit("k1", 20));
        let (CommandResult::Submitted { job: a, created: true }, CommandResult::Submitted { job: b, created: false }) =
            (first, again)
        else {
            panic!("unexpected results");
        };
        assert_eq!(a, b);
        assert!(event.is_none());
        assert_eq!(state.job_count(), 1);
    }

    #[test]
    fn cancel_follows_the_lifecycle() {
        let mut state = StateMachine::default();
        state.apply(submit("", 1));
        let (result, _) = state.apply(Command::CancelJob {
            id: 1,
            reason: String::new(),
            now_ms: 5,
        });
        let CommandResult::Cancelled { job } = result else {
            panic!("{result:?}")
        };
        assert_eq!((job.state, job.finished_at_ms), (JobState::Cancelled, Some(5)));
        let (result, _) = state.apply(Command::CancelJob {
            id: 9,
            reason: String::new(),
            now_ms: 5,
        });
        assert!(matches!(result, CommandResult::Rejected(CoordinatorError::NotFound(_))));
        assert!(!JobState::Succeeded.can_become(JobState::Cancelled));
    }

    #[test]
    fn snapshot_round_trip_and_version_check() {
        let mut state = StateMachine::default();
        state.apply(submit("a", 1));
        state.record_member(1, Some("127.0.0.1:7071".into()));
        let bytes = state.to_snapshot().unwrap();
        assert_eq!(StateMachine::from_snapshot(&bytes).unwrap(), state);
        let wrong = encode(&(99u32, &state)).unwrap();
        let error = StateMachine::from_snapshot(&wrong).unwrap_err();
        assert!(error.to_string().contains("version 99"), "{error}");
    }
}
