//! How the CLI prints: aligned tables for people, `--json` for scripts.

use anyhow::Result;
use kiln_proto as pb;
use serde_json::{Value, json};

pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

pub fn state_label(state: i32) -> &'static str {
    pb::JobState::try_from(state)
        .unwrap_or(pb::JobState::Unspecified)
        .label()
}

pub fn time_label(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

pub fn job_json(job: &pb::Job) -> Value {
    let resources = job.resources.unwrap_or_default();
    json!({
        "id": job.id,
        "name": job.name,
        "kind": job.kind,
        "state": state_label(job.state),
        "resources": {
            "workers": resources.workers,
            "cpus": resources.cpus,
            "gpus": resources.gpus,
            "memory_bytes": resources.memory_bytes,
        },
        "max_restarts": job.max_restarts,
        "attempts": job.attempts.iter().map(|attempt| json!({
            "number": attempt.number,
            "state": attempt.state,
            "started_at_ms": attempt.started_at_ms,
            "ended_at_ms": (attempt.ended_at_ms > 0).then_some(attempt.ended_at_ms),
            "message": attempt.message,
            "master_addr": attempt.master_addr,
            "master_port": attempt.master_port,
            "tasks": attempt.tasks.iter().map(|task| json!({
                "rank": task.rank,
                "worker_id": task.worker_id,
                "worker_address": task.worker_address,
                "local_rank": task.local_rank,
                "state": task.state,
                "stop_requested": task.stop_requested,
                "exit_code": task.exit_code,
                "signal": task.signal,
                "message": task.message,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "submitted_at_ms": job.submitted_at_ms,
        "updated_at_ms": job.updated_at_ms,
        "finished_at_ms": (job.finished_at_ms > 0).then_some(job.finished_at_ms),
        "message": job.message,
        "metrics": job.metrics.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "artifacts": job.artifacts.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "idempotency_key": job.idempotency_key,
        "spec": serde_json::from_str::<Value>(&job.spec_json).unwrap_or(Value::Null),
        "spec_toml": job.spec_toml,
    })
}

/// Prints rows under headers, each column as wide as its widest cell.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn print_jobs(jobs: &[pb::Job], json: bool) -> Result<()> {
    if json {
        let values: Vec<Value> = jobs.iter().map(job_json).collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            let resources = job.resources.unwrap_or_default();
            vec![
                job.id.to_string(),
                job.name.clone(),
                job.kind.clone(),
                state_label(job.state).to_string(),
                resources.workers.to_string(),
                time_label(job.submitted_at_ms),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "KIND", "STATE", "WORKERS", "SUBMITTED"], &rows);
    Ok(())
}

pub fn print_job(job: &pb::Job, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&job_json(job))?);
        return Ok(());
    }
    let resources = job.resources.unwrap_or_default();
    println!("id:            {}", job.id);
    println!("name:          {}", job.name);
    println!("kind:          {}", job.kind);
    println!("state:         {}", state_label(job.state));
    if !job.message.is_empty() {
        println!("message:       {}", job.message);
    }
    println!(
        "resources:     {} worker(s) × {} cpu, {} gpu, {} bytes memory",
        resources.workers, resources.cpus, resources.gpus, resources.memory_bytes
    );
    println!("max restarts:  {}", job.max_restarts);
    println!("attempts:      {}", job.attempts.len());
    for attempt in &job.attempts {
        println!(
            "  attempt {} {} (started {}, master {}:{}){}",
            attempt.number,
            attempt.state,
            time_label(attempt.started_at_ms),
            attempt.master_addr,
            attempt.master_port,
            if attempt.message.is_empty() {
                String::new()
            } else {
                format!(": {}", attempt.message)
            }
        );
        for task in &attempt.tasks {
            let ending = match (task.exit_code, task.signal) {
                (Some(code), _) => format!(" exit {code}"),
                (None, Some(signal)) => format!(" signal {signal}"),
                _ => String::new(),
            };
            println!(
                "    rank {} on worker {} ({}) {}{}{}",
                task.rank,
                task.worker_id,
                task.worker_address,
                task.state,
                ending,
                if task.stop_requested && task.state == "running" {
                    " (stopping)"
                } else {
                    ""
                }
            );
        }
    }
    println!("submitted:     {}", time_label(job.submitted_at_ms));
    println!("updated:       {}", time_label(job.updated_at_ms));
    println!("finished:      {}", time_label(job.finished_at_ms));
    if !job.metrics.is_empty() {
        let metrics: std::collections::BTreeMap<_, _> = job.metrics.iter().collect();
        let text: Vec<String> = metrics.iter().map(|(name, value)| format!("{name}={value}")).collect();
        println!("metrics:       {}", text.join(" "));
    }
    for (name, location) in job.artifacts.iter().collect::<std::collections::BTreeMap<_, _>>() {
        println!("artifact:      {name} {location}");
    }
    println!("idempotency:   {}", job.idempotency_key);
    println!("spec:");
    for line in job.spec_toml.lines() {
        println!("  {line}");
    }
    Ok(())
}

pub fn cluster_json(status: &pb::ClusterStatus) -> Value {
    json!({
        "node_id": status.node_id,
        "leader_id": (status.leader_id != 0).then_some(status.leader_id),
        "term": status.term,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "first_log_index": status.first_log_index,
        "last_log_index": status.last_log_index,
        "snapshot_index": status.snapshot_index,
        "members": status.members.iter().map(|member| {
            let health = member.health.clone().unwrap_or_default();
            json!({
                "id": member.id,
                "raft_addr": member.raft_addr,
                "api_addr": member.api_addr,
                "membership": member.membership,
                "health": {
                    "reachable": health.reachable,
                    "role": health.role,
                    "term": health.term,
                    "commit_index": health.commit_index,
                    "applied_index": health.applied_index,
                    "matched_index": health.matched_index,
                    "error": health.error,
                },
            })
        }).collect::<Vec<_>>(),
    })
}

pub fn print_cluster_status(status: &pb::ClusterStatus, json: bool, summary: bool) -> Result<()> {
    if json {
        let value = cluster_json(status);
        let value = if summary { value } else { value["members"].clone() };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if summary {
        let leader = if status.leader_id == 0 {
            "none".to_string()
        } else {
            status.leader_id.to_string()
        };
        println!(
            "leader {leader}, term {}, commit {}, applied {} (answered by node {}; log {}..{}, snapshot at {})",
            status.term,
            status.commit_index,
            status.applied_index,
            status.node_id,
            status.first_log_index,
            status.last_log_index,
            status.snapshot_index
        );
    }
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|member| {
            let health = member.health.clone().unwrap_or_default();
            vec![
                member.id.to_string(),
                member.membership.clone(),
                if health.reachable {
                    health.role.clone()
                } else {
                    "unreachable".into()
                },
                member.raft_addr.clone(),
                member.api_addr.clone(),
                health.term.to_string(),
                health.commit_index.to_string(),
                health.applied_index.to_string(),
                health.matched_index.to_string(),
                health.error.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "MEMBERSHIP",
            "ROLE",
            "RAFT",
            "API",
            "TERM",
            "COMMIT",
            "APPLIED",
            "MATCHED",
            "ERROR",
        ],
        &rows,
    );
    Ok(())
}

fn resources_label(resources: Option<pb::WorkerResources>) -> String {
    let resources = resources.unwrap_or_default();
    format!(
        "{} cpu, {} gpu, {} MiB",
        resources.cpus,
        resources.gpus,
        resources.memory_bytes >> 20
    )
}

fn heartbeat_label(age_ms: i64) -> String {
    if age_ms < 0 {
        "-".into()
    } else {
        format!("{:.1} s ago", age_ms as f64 / 1000.0)
    }
}

pub fn worker_json(worker: &pb::WorkerInfo) -> Value {
    let resources = |resources: Option<pb::WorkerResources>| {
        let resources = resources.unwrap_or_default();
        json!({"cpus": resources.cpus, "gpus": resources.gpus, "memory_bytes": resources.memory_bytes})
    };
    json!({
        "id": worker.id,
        "uid": worker.uid,
        "address": worker.address,
        "host": worker.host,
        "hostname": worker.hostname,
        "state": worker.state,
        "total": resources(worker.total),
        "free": resources(worker.free),
        "running": worker.running.iter().map(|task| json!({
            "job_id": task.job_id, "attempt": task.attempt, "rank": task.rank,
        })).collect::<Vec<_>>(),
        "last_heartbeat_age_ms": (worker.last_heartbeat_age_ms >= 0).then_some(worker.last_heartbeat_age_ms),
        "registered_at_ms": worker.registered_at_ms,
        "updated_at_ms": worker.updated_at_ms,
        "registrations": worker.registrations,
        "task_ports": [worker.task_port_low, worker.task_port_high],
        "message": worker.message,
    })
}

pub fn print_workers(workers: &[pb::WorkerInfo], json: bool) -> Result<()> {
    if json {
        let values: Vec<Value> = workers.iter().map(worker_json).collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|worker| {
            vec![
                worker.id.to_string(),
                worker.address.clone(),
                worker.state.clone(),
                resources_label(worker.free),
                resources_label(worker.total),
                worker.running.len().to_string(),
                heartbeat_label(worker.last_heartbeat_age_ms),
            ]
        })
        .collect();
    print_table(
        &["ID", "ADDRESS", "STATE", "FREE", "TOTAL", "TASKS", "HEARTBEAT"],
        &rows,
    );
    Ok(())
}

pub fn print_worker(worker: &pb::WorkerInfo, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&worker_json(worker))?);
        return Ok(());
    }
    println!("id:            {}", worker.id);
    println!("address:       {}", worker.address);
    println!("host:          {} ({})", worker.host, worker.hostname);
    println!("state:         {}", worker.state);
    if !worker.message.is_empty() {
        println!("message:       {}", worker.message);
    }
    println!("total:         {}", resources_label(worker.total));
    println!("free:          {}", resources_label(worker.free));
    println!("task ports:    {}-{}", worker.task_port_low, worker.task_port_high);
    println!("heartbeat:     {}", heartbeat_label(worker.last_heartbeat_age_ms));
    println!(
        "registered:    {} ({} times)",
        time_label(worker.registered_at_ms),
        worker.registrations
    );
    for task in &worker.running {
        println!(
            "  running job {} attempt {} rank {}",
            task.job_id, task.attempt, task.rank
        );
    }
    Ok(())
}
