//! Model deployments: a job of kind `deployment` (see [`crate::spec::DeploymentOptions`]) runs no task
//! itself; the leader's deployment controller keeps its replicas running. A replica is a one-rank job of
//! kind `serve`, which a worker runs as `kiln task serve` on the deployment's file. Each replica reports,
//! about once a second, that it is ready, where it listens and how loaded it is ([`READY`],
//! [`QUEUE_DEPTH`], …; the artifacts [`HTTP`] and [`GRPC`]); routers send requests to the ready ones.
//!
//! The controller decides from the replicated state alone, so a new leader goes on where the old one
//! stopped, and every proposal is safe to repeat:
//!
//! - a replica is a `SubmitJob` whose idempotency key is `deployment-ID-replica-N`: proposed twice, it is
//!   made once;
//! - a replica that ended (its process exited, its worker was lost) is replaced by the next number;
//! - the number of live replicas stays between `replicas.min` and `replicas.max`: one is added while every
//!   live replica is ready and their mean queue depth is above `target_queue_depth`, and the newest is
//!   removed once the others could hold the load at under half that depth and nothing has changed for
//!   `scale_down_delay`;
//! - a deployment whose last [`CRASH_LOOP_REPLICAS`] replicas all ended without ever becoming ready, with
//!   none ready now, fails with their reason instead of starting replicas forever;
//! - a deployment whose file changed (`kiln deploy` of a new file under a running deployment's name) rolls:
//!   one replica of the new file is started, and once it is ready the oldest replica of an older file is
//!   stopped, one at a time, so the ready replicas never drop below what they were; the live count stays at
//!   what it was when the file changed (within the new min and max) plus the one starting. Scaling waits
//!   until the roll is done. If [`CRASH_LOOP_REPLICAS`] replicas of the new file in a row end without
//!   becoming ready, or one is not ready within `replicas.ready_timeout`, the deployment rolls back to the
//!   file its older replicas run, saying why (and the roll back stops what the new file started);
//! - a deployment that ended (deleted, failed) stops its replicas.

use std::collections::BTreeMap;

use crate::spec::{DeploymentOptions, JobKind, JobSpec, deployment_options};
use crate::state::{Command, Job, JobState, StateMachine};

/// A replica's environment: its deployment's job id and its replica number.
pub const DEPLOYMENT_ENV: &str = "KILN_DEPLOYMENT";
pub const REPLICA_ENV: &str = "KILN_REPLICA";

/// What a replica reports (job metrics): 1 once its model is loaded and warmed up.
pub const READY: &str = "ready";
/// Requests waiting for a batch, the mean over the last report interval.
pub const QUEUE_DEPTH: &str = "queue_depth";
pub const REQUESTS_PER_SECOND: &str = "requests_per_second";
/// Latency percentiles over the last report interval, in milliseconds.
pub const P50_MS: &str = "p50_ms";
pub const P99_MS: &str = "p99_ms";
/// Where a replica listens (job artifacts): the REST and gRPC bindings, as host:port.
pub const HTTP: &str = "http";
pub const GRPC: &str = "grpc";
/// The model version a replica serves, and why it could not start (job artifacts).
pub const VERSION: &str = "version";
pub const ERROR: &str = "error";

/// Replicas in a row that ended without becoming ready before a deployment fails.
pub const CRASH_LOOP_REPLICAS: usize = 3;
/// The reason a replica removed for low load is cancelled with starts with this.
pub const SCALED_DOWN: &str = "scaled down";
/// The reason a replica of an older file, stopped by a roll, is cancelled with starts with this.
pub const REPLACED: &str = "replaced by the updated deployment";
/// Kept in an updated deployment's metrics: its live replicas when the file changed, and when.
pub const ROLL_REPLICAS: &str = "roll_replicas";
pub const ROLL_STARTED_MS: &str = "roll_started_ms";

/// The deployment and replica number of a replica job.
pub fn replica_of(spec: &JobSpec) -> Option<(u64, u64)> {
    if spec.kind != JobKind::Serve {
        return None;
    }
    let deployment = spec.env.get(DEPLOYMENT_ENV)?.parse().ok()?;
    let replica = spec.env.get(REPLICA_ENV)?.parse().ok()?;
    Some((deployment, replica))
}

/// Whether a replica job is up: running, with its model loaded and its addresses reported.
pub fn is_ready(job: &Job) -> bool {
    job.state == JobState::Running
        && job.metrics.get(READY).is_some_and(|ready| *ready >= 1.0)
        && job.artifacts.contains_key(HTTP)
}

/// The idempotency key of replica `replica` of deployment `deployment`.
pub fn replica_key(deployment: u64, replica: u64) -> String {
    format!("deployment-{deployment}-replica-{replica}")
}

/// The job that runs replica `replica` of `deployment`: the deployment's file, one rank of its resources.
pub fn replica_spec(deployment: &Job, options: &DeploymentOptions, replica: u64) -> JobSpec {
    let mut env = BTreeMap::new();
    env.insert(DEPLOYMENT_ENV.to_string(), deployment.id.to_string());
    env.insert(REPLICA_ENV.to_string(), replica.to_string());
    JobSpec {
        name: format!("{}-{replica}", options.name),
        kind: JobKind::Serve,
        command: String::new(),
        args: Vec::new(),
        env,
        resources: crate::spec::ResourceSpec {
            workers: 1,
            ..options.resources.clone()
        },
        max_restarts: 0,
        priority: options.priority,
        train: None,
    }
}

/// The commands the leader should propose for every deployment now.
pub fn decide(state: &StateMachine, now_ms: i64) -> Vec<Command> {
    let mut commands = Vec::new();
    for (deployment, replicas) in state.deployments() {
        if deployment.state != JobState::Running {
            for (replica, job) in &replicas {
                if !job.state.is_finished() {
                    commands.push(Command::CancelJob {
                        id: job.id,
                        reason: format!(
                            "replica {replica} of deployment '{}', which {}",
                            deployment.spec.name,
                            deployment.state.label()
                        ),
                        now_ms,
                    });
                }
            }
            continue;
        }
        match deployment_options("deployment", &deployment.spec_toml) {
            Ok(options) => commands.extend(decide_one(deployment, &options, &replicas, now_ms)),
            Err(error) => commands.push(fail(
                deployment,
                format!("the deployment cannot be read: {error}"),
                now_ms,
            )),
        }
    }
    commands
}

fn fail(deployment: &Job, message: String, now_ms: i64) -> Command {
    Command::FinishSweep {
        job: deployment.id,
        succeeded: false,
        message,
        metrics: deployment.metrics.clone(),
        register: None,
        now_ms,
    }
}

/// Whether the latest [`CRASH_LOOP_REPLICAS`] ended replicas among those `counted` all failed without ever
/// being ready; if so, why (the last one's reason).
fn crash_loop(replicas: &[(u64, &Job)], counted: impl Fn(&Job) -> bool) -> Option<String> {
    let tail: Vec<&Job> = replicas
        .iter()
        .rev()
        .map(|(_, job)| *job)
        .filter(|job| counted(job) && job.state.is_finished())
        .take(CRASH_LOOP_REPLICAS)
        .collect();
    let looping = tail.len() == CRASH_LOOP_REPLICAS
        && tail.iter().all(|job| {
            matches!(job.state, JobState::Failed) && !job.metrics.get(READY).is_some_and(|ready| *ready >= 1.0)
        });
    if !looping {
        return None;
    }
    let last = tail[0];
    let reason = last
        .artifacts
        .get(ERROR)
        .cloned()
        .unwrap_or_else(|| last.message.clone());
    Some(format!(
        "{CRASH_LOOP_REPLICAS} replicas in a row ended before they were ready (the last, job {}: {reason}); see kiln jobs logs {}",
        last.id, last.id
    ))
}

fn decide_one(deployment: &Job, options: &DeploymentOptions, replicas: &[(u64, &Job)], now_ms: i64) -> Vec<Command> {
    let live: Vec<&(u64, &Job)> = replicas.iter().filter(|(_, job)| !job.state.is_finished()).collect();
    let ready: Vec<&Job> = live.iter().map(|(_, job)| *job).filter(|job| is_ready(job)).collect();

    // Replicas that keep dying before they are ready: the model or the file is wrong, and more replicas
    // would only fail the same way. The latest ended ones count (a live one is not evidence either way).
    if let Some(reason) = crash_loop(replicas, |_| true).filter(|_| ready.is_empty()) {
        return vec![fail(deployment, reason, now_ms)];
    }

    let outdated: Vec<&(u64, &Job)> = live
        .iter()
        .copied()
        .filter(|(_, job)| job.spec_toml != deployment.spec_toml)
        .collect();
    if !outdated.is_empty() {
        return roll(deployment, options, replicas, &live, &outdated, now_ms);
    }

    let (min, max) = (options.min_replicas as usize, options.max_replicas as usize);
    let mut wanted = live.len().clamp(min, max);
    let mut commands = Vec::new();
    if live.len() >= min && !ready.is_empty() && ready.len() == live.len() {
        let depth: f64 = ready
            .iter()
            .map(|job| job.metrics.get(QUEUE_DEPTH).copied().unwrap_or(0.0))
            .sum();
        let mean = depth / ready.len() as f64;
        // The last change: the newest replica's start, or the latest removal.
        let changed_at = replicas
            .iter()
            .map(|(_, job)| {
                if job.message.starts_with(SCALED_DOWN) {
                    job.finished_at_ms.unwrap_or(job.submitted_at_ms)
                } else {
                    job.submitted_at_ms
                }
            })
            .max()
            .unwrap_or(deployment.submitted_at_ms);
        if mean > options.target_queue_depth && live.len() < max {
            wanted = live.len() + 1;
        } else if live.len() > min
            && depth / ((live.len() - 1) as f64) < options.target_queue_depth / 2.0
            && now_ms.saturating_sub(changed_at) >= options.scale_down_delay_ms
        {
            let (replica, newest) = live.last().expect("more live replicas than the minimum");
            commands.push(Command::CancelJob {
                id: newest.id,
                reason: format!(
                    "{SCALED_DOWN}: the other replicas of '{}' hold its load (mean queue depth {mean:.2}, target {}); replica {replica}",
                    options.name, options.target_queue_depth
                ),
                now_ms,
            });
            return commands;
        }
    }
    let next = replicas.last().map_or(0, |(replica, _)| replica + 1);
    for replica in next..next + wanted.saturating_sub(live.len()) as u64 {
        let spec = replica_spec(deployment, options, replica);
        commands.push(Command::SubmitJob {
            spec,
            spec_toml: deployment.spec_toml.clone(),
            idempotency_key: replica_key(deployment.id, replica),
            now_ms,
        });
    }
    commands
}

/// One step of rolling `deployment` to its file: roll back, wait for the replica starting, stop an old one,
/// or start a new one (see the module's documentation).
fn roll(
    deployment: &Job,
    options: &DeploymentOptions,
    replicas: &[(u64, &Job)],
    live: &[&(u64, &Job)],
    outdated: &[&(u64, &Job)],
    now_ms: i64,
) -> Vec<Command> {
    let current = |job: &Job| job.spec_toml == deployment.spec_toml;
    let since = deployment
        .metrics
        .get(ROLL_STARTED_MS)
        .map_or(i64::MIN, |ms| *ms as i64);
    let starting: Vec<&Job> = live
        .iter()
        .map(|(_, job)| *job)
        .filter(|job| current(job) && !is_ready(job))
        .collect();
    let rollback = crash_loop(replicas, |job| current(job) && job.submitted_at_ms >= since).or_else(|| {
        let stuck = starting
            .iter()
            .find(|job| now_ms.saturating_sub(job.submitted_at_ms) > options.ready_timeout_ms)?;
        Some(format!(
            "replica job {} of the new file was not ready within {} (replicas.ready_timeout); see kiln jobs logs {}",
            stuck.id,
            humantime::format_duration(std::time::Duration::from_millis(options.ready_timeout_ms as u64)),
            stuck.id
        ))
    });
    if let Some(reason) = rollback {
        return vec![Command::UpdateDeployment {
            job: deployment.id,
            spec_toml: outdated[0].1.spec_toml.clone(),
            message: format!("the update was rolled back: {reason}"),
            now_ms,
        }];
    }
    if !starting.is_empty() {
        return Vec::new();
    }
    let (min, max) = (options.min_replicas as usize, options.max_replicas as usize);
    let target = deployment
        .metrics
        .get(ROLL_REPLICAS)
        .map_or(live.len(), |count| *count as usize)
        .clamp(min, max);
    if live.len() > target {
        let (replica, oldest) = outdated[0];
        return vec![Command::CancelJob {
            id: oldest.id,
            reason: format!("{REPLACED}: replica {replica} ran an older file of '{}'", options.name),
            now_ms,
        }];
    }
    let next = replicas.last().map_or(0, |(replica, _)| replica + 1);
    vec![Command::SubmitJob {
        spec: replica_spec(deployment, options, next),
        spec_toml: deployment.spec_toml.clone(),
        idempotency_key: replica_key(deployment.id, next),
        now_ms,
    }]
}

#[cfg(test)]
mod tests;
