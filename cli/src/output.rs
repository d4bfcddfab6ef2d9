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
            "ended_at_ms": attempt.ended_at_ms,
            "message": attempt.message,
        })).collect::<Vec<_>>(),
        "submitted_at_ms": job.submitted_at_ms,
        "updated_at_ms": job.updated_at_ms,
        "finished_at_ms": (job.finished_at_ms > 0).then_some(job.finished_at_ms),
        "message": job.message,
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
    println!("submitted:     {}", time_label(job.submitted_at_ms));
    println!("updated:       {}", time_label(job.updated_at_ms));
    println!("finished:      {}", time_label(job.finished_at_ms));
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
