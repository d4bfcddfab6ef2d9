//! The Kiln worker: registers its resources with the coordinators, holds one stream with the leader, runs
//! the tasks the leader assigns as child processes, and serves their output.
//!
//! ```text
//!   coordinator (any) ◄── Register (uid from the data dir → the same worker id after a restart)
//!   coordinator leader ◄═ Session stream ═► Agent ──start/kill──► Executor ──► child process groups
//!        heartbeats (running tasks, unacknowledged reports) ▲          │ exit status
//!        AssignTask / KillTask / ReportsAcknowledged        └──────────┘
//!   kiln jobs logs ──► WorkerAgent.Logs (this worker's gRPC port) ──► DATA/tasks/job-J-attempt-A-rank-R/*.log
//! ```
//!
//! Invariants:
//! - A task runs at most once per worker process: a repeated assignment is ignored.
//! - Every exit is reported until the leader acknowledges it (after committing it), across reconnects.
//! - Tasks keep running while the worker looks for a new leader; only the leader's word (a kill, or "register
//!   again" after the worker was declared lost) or the worker's own shutdown stops them.
//! - Each task is its own process group, so a kill reaches everything the task started.
//!
//! Left out on purpose: `train` tasks (the built-in trainer comes with the training work), cgroup limits
//! on CPU and memory (slots are a scheduling unit, not enforced), and re-adopting tasks after the worker
//! process itself was killed: a restarted worker kills what its previous process left behind and
//! registers again, which fails those attempts so their jobs restart.

mod agent;
pub mod collective;
mod executor;
pub mod gpu;
mod logs;
mod spawn;
pub mod trainer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use agent::Worker;
pub use executor::KEEP_TASKS_DEFAULT;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The command line or configuration is wrong; fix it and start again.
    #[error("{0}")]
    InvalidArgument(String),
    /// The data directory cannot be used.
    #[error("{0}")]
    Storage(String),
    /// The coordinators refused the worker for a reason retrying does not fix.
    #[error("{0}")]
    Refused(String),
}

/// How a worker is started (`kiln worker` flags; `kiln up` fills it in for its embedded workers).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Coordinator API addresses, `HOST:PORT`.
    pub coordinators: Vec<String>,
    pub data_dir: PathBuf,
    /// Where this worker serves its logs. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The host other ranks and `kiln jobs logs` reach this worker at; defaults to the listen address.
    pub advertise_host: Option<String>,
    pub cpus: u32,
    /// `None`: detect (with the `cuda` feature), otherwise none.
    pub gpus: Option<u32>,
    /// `None`: the machine's total memory.
    pub memory_bytes: Option<u64>,
    /// Ports reserved for rank 0 of the jobs this worker runs (`MASTER_PORT`).
    pub task_ports: (u16, u16),
    /// How long a task has after SIGTERM before SIGKILL.
    pub kill_grace: Duration,
    /// Where train tasks keep checkpoints (`JOB/checkpoints` below it). A later attempt may run on
    /// another worker, so point every worker at the same shared directory; default `DATA/artifacts`.
    pub artifact_dir: Option<PathBuf>,
    /// The coordinators' MLflow APIs (`HOST:PORT[,HOST:PORT…]`), handed to tasks as `KILN_TRACKING` and the
    /// first as `MLFLOW_TRACKING_URI`: train tasks upload their model to their run and register it there,
    /// and any task's `mlflow` client logs to the cluster.
    pub tracking: Option<String>,
    /// The feature server tasks read training sets from when a spec names none (`KILN_FEATURESTORE`).
    pub featurestore: Option<String>,
    /// Ended tasks whose directories (logs, working directory) are kept; the oldest beyond go.
    pub keep_tasks: usize,
}

impl WorkerConfig {
    pub fn new(coordinators: Vec<String>, data_dir: PathBuf) -> WorkerConfig {
        WorkerConfig {
            coordinators,
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: None,
            cpus: std::thread::available_parallelism().map_or(1, |count| count.get() as u32),
            gpus: None,
            memory_bytes: None,
            task_ports: (29500, 29999),
            kill_grace: Duration::from_secs(5),
            artifact_dir: None,
            tracking: None,
            featurestore: None,
            keep_tasks: KEEP_TASKS_DEFAULT,
        }
    }

    pub fn validate(&self) -> Result<(), WorkerError> {
        if self.coordinators.is_empty() {
            return Err(WorkerError::InvalidArgument(
                "no coordinator address given; expected --coordinator HOST:PORT[,HOST:PORT…]".into(),
            ));
        }
        for address in &self.coordinators {
            let valid = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0));
            if !valid {
                return Err(WorkerError::InvalidArgument(format!(
                    "coordinator address '{address}' is not HOST:PORT (for example 127.0.0.1:7070)"
                )));
            }
        }
        if self.cpus == 0 {
            return Err(WorkerError::InvalidArgument(
                "--cpus is 0; a worker offers at least 1 CPU slot".into(),
            ));
        }
        if self.keep_tasks == 0 {
            return Err(WorkerError::InvalidArgument(
                "--keep-tasks 0 would remove a task's logs as it ends; expected at least 1".into(),
            ));
        }
        if self.task_ports.0 == 0 || self.task_ports.0 > self.task_ports.1 {
            return Err(WorkerError::InvalidArgument(format!(
                "--task-ports {}-{} is not a range; expected LOW-HIGH with 1 <= LOW <= HIGH",
                self.task_ports.0, self.task_ports.1
            )));
        }
        if self.listen.ip().is_unspecified() && self.advertise_host.is_none() {
            return Err(WorkerError::InvalidArgument(format!(
                "--listen {} does not say how others reach this worker; add --advertise-host HOST",
                self.listen
            )));
        }
        Ok(())
    }
}

/// Parses `LOW-HIGH`.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("port range '{text}' is not LOW-HIGH (for example 29500-29999)"))?;
    let parse = |part: &str| {
        part.trim()
            .parse::<u16>()
            .map_err(|_| format!("port range '{text}': '{part}' is not a port number (1-65535)"))
    };
    let (low, high) = (parse(low)?, parse(high)?);
    if low == 0 || low > high {
        return Err(format!("port range '{text}' is empty; expected 1 <= LOW <= HIGH"));
    }
    Ok((low, high))
}

/// The machine's memory from `/proc/meminfo`, or 0 when it cannot be read.
pub fn total_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("29500-29999").unwrap(), (29500, 29999));
        assert!(parse_port_range("29999-29500").unwrap_err().contains("empty"));
        assert!(parse_port_range("80").unwrap_err().contains("LOW-HIGH"));
        assert!(parse_port_range("1-70000").unwrap_err().contains("70000"));
    }

    #[test]
    fn validation_names_the_flag() {
        let mut config = WorkerConfig::new(vec!["127.0.0.1:7070".into()], "w".into());
        assert!(config.validate().is_ok());
        config.cpus = 0;
        assert!(config.validate().unwrap_err().to_string().contains("--cpus"));
        config.cpus = 1;
        config.coordinators = vec!["nowhere".into()];
        assert!(config.validate().unwrap_err().to_string().contains("HOST:PORT"));
    }
}
