//! `kiln deploy FILE`, `kiln deployments list | show NAME | delete NAME`, and `kiln router`.
//!
//! A deployment is a job of kind `deployment` (its file: examples/deployments/digits.toml); its replicas
//! are the jobs of kind `serve` whose environment names it (`KILN_DEPLOYMENT`), each running
//! `kiln task serve` on a worker and reporting its addresses and load. Everything here reads them through
//! the job API. The router (the serving ports 8000 and 8001; `kiln up` runs one) keeps its table of ready
//! replicas from the same listing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use kiln_coordinator::client::Client;
use kiln_coordinator::deployment as names;
use kiln_proto as pb;
use kiln_serving::router::{Replica, Router, Table};
use serde_json::{Value, json};

use crate::output::{print_table, state_label, status_error};

#[derive(Subcommand)]
pub enum DeploymentsCommand {
    /// Deployments: state, replicas ready of the wanted range, versions served, requests/s, p50 and p99.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One deployment (the running one of that name, else the latest): its settings and every replica, where
    /// it runs, what it serves and how loaded it is.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a deployment and its replicas.
    Delete { name: String },
}

fn env_of(job: &pb::Job) -> Value {
    serde_json::from_str::<Value>(&job.spec_json)
        .map(|spec| spec["env"].clone())
        .unwrap_or(Value::Null)
}

/// Every deployment with its replicas (in replica order), in job id order.
fn deployments_of(jobs: &[pb::Job]) -> Vec<(&pb::Job, Vec<(u64, &pb::Job)>)> {
    let mut replicas: HashMap<u64, Vec<(u64, &pb::Job)>> = HashMap::new();
    for job in jobs.iter().filter(|job| job.kind == "serve") {
        let env = env_of(job);
        if let (Some(deployment), Some(number)) = (
            env[names::DEPLOYMENT_ENV].as_str().and_then(|id| id.parse().ok()),
            env[names::REPLICA_ENV].as_str().and_then(|number| number.parse().ok()),
        ) {
            replicas.entry(deployment).or_default().push((number, job));
        }
    }
    jobs.iter()
        .filter(|job| job.kind == "deployment")
        .map(|job| {
            let mut mine = replicas.remove(&job.id).unwrap_or_default();
            mine.sort_by_key(|(number, _)| *number);
            (job, mine)
        })
        .collect()
}

fn is_ready(job: &pb::Job) -> bool {
    job.state == pb::JobState::Running as i32
        && job.metrics.get(names::READY).is_some_and(|ready| *ready >= 1.0)
        && job.artifacts.contains_key(names::HTTP)
        && job.artifacts.contains_key(names::GRPC)
}

/// The router's table: each running deployment's ready replicas.
pub fn table_of(jobs: &[pb::Job]) -> Table {
    deployments_of(jobs)
        .into_iter()
        .filter(|(deployment, _)| deployment.state == pb::JobState::Running as i32)
        .map(|(deployment, replicas)| {
            let ready = replicas
                .into_iter()
                .filter(|(_, job)| is_ready(job))
                .map(|(_, job)| Replica {
                    id: format!("job {}", job.id),
                    http: job.artifacts[names::HTTP].clone(),
                    grpc: job.artifacts[names::GRPC].clone(),
                })
                .collect();
            (deployment.name.clone(), ready)
        })
        .collect()
}

/// Where in its deployment's run a replica logs requests (`requests/replica-N/MODEL/VERSION/…parquet`).
pub const REQUEST_LOG_DIRECTORY: &str = "requests";

/// A replica of `deployment`; `outdated` when it runs an older file than the deployment's.
fn replica_json(number: u64, job: &pb::Job, deployment: &pb::Job) -> Value {
    let task = job.attempts.last().and_then(|attempt| attempt.tasks.first());
    json!({
        "replica": number,
        "job": job.id,
        "state": state_label(job.state),
        "ready": is_ready(job),
        "worker": task.map(|task| task.worker_id),
        "http": job.artifacts.get(names::HTTP),
        "grpc": job.artifacts.get(names::GRPC),
        "version": job.artifacts.get(names::VERSION),
        "queue_depth": job.metrics.get(names::QUEUE_DEPTH),
        "requests_per_second": job.metrics.get(names::REQUESTS_PER_SECOND),
        "p50_ms": job.metrics.get(names::P50_MS),
        "p99_ms": job.metrics.get(names::P99_MS),
        "error": job.artifacts.get(names::ERROR),
        "message": job.message,
        "outdated": job.spec_toml != deployment.spec_toml,
    })
}

fn deployment_json(deployment: &pb::Job, replicas: &[(u64, &pb::Job)]) -> Value {
    let options = kiln_coordinator::spec::deployment_options("deployment", &deployment.spec_toml).ok();
    let live: Vec<&pb::Job> = replicas
        .iter()
        .map(|(_, job)| *job)
        .filter(|job| !kiln_coordinator::client::is_finished(job.state))
        .collect();
    let ready: Vec<&pb::Job> = live.iter().copied().filter(|job| is_ready(job)).collect();
    // Replicas still running an older file while the deployment rolls to its new one.
    let outdated = live.iter().filter(|job| job.spec_toml != deployment.spec_toml).count();
    let metric = |job: &pb::Job, name: &str| job.metrics.get(name).copied().unwrap_or(0.0);
    // A fold from 0.0: an empty f64 sum is -0.0.
    let rate = ready
        .iter()
        .map(|job| metric(job, names::REQUESTS_PER_SECOND))
        .fold(0.0, |sum, value| sum + value);
    // p50: the replicas' medians weighted by their traffic; p99: the worst replica's.
    let p50 = if rate > 0.0 {
        ready
            .iter()
            .map(|job| metric(job, names::P50_MS) * metric(job, names::REQUESTS_PER_SECOND))
            .sum::<f64>()
            / rate
    } else {
        0.0
    };
    let p99 = ready.iter().map(|job| metric(job, names::P99_MS)).fold(0.0, f64::max);
    let mut versions: Vec<&str> = ready
        .iter()
        .filter_map(|job| job.artifacts.get(names::VERSION).map(String::as_str))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    // The replicas log every request into the deployment's run, unless the file names another place.
    let run = kiln_coordinator::tracking::Tracking::job_run_id(deployment.id);
    // Where and how often, as the replicas read the file (the defaults where it says nothing).
    let file = crate::serve::Deployment::parse(Path::new("deployment.toml"), &deployment.spec_toml).ok();
    let logging = file
        .as_ref()
        .and_then(|file| {
            file.request_logging(kiln_serving::request_log::RequestLogConfig::default())
                .ok()
        })
        .unwrap_or_default();
    let request_log = file
        .and_then(|file| file.request_log)
        .unwrap_or_else(|| format!("the artifacts of run {run}, under {REQUEST_LOG_DIRECTORY}/"));
    json!({
        "name": deployment.name,
        "job": deployment.id,
        "state": state_label(deployment.state),
        "model": options.as_ref().map(|options| options.model.clone()),
        "replicas_min": options.as_ref().map(|options| options.min_replicas),
        "replicas_max": options.as_ref().map(|options| options.max_replicas),
        "target_queue_depth": options.as_ref().map(|options| options.target_queue_depth),
        "replicas_live": live.len(),
        "replicas_ready": ready.len(),
        "replicas_outdated": outdated,
        "versions": versions,
        "requests_per_second": rate,
        "p50_ms": p50,
        "p99_ms": p99,
        "run": run,
        "request_log": request_log,
        "request_log_rows": logging.rows_per_file,
        "request_log_interval": humantime::format_duration(logging.flush_interval).to_string(),
        "message": deployment.message,
        "replicas": replicas
            .iter()
            .map(|(number, job)| replica_json(*number, job, deployment))
            .collect::<Vec<_>>(),
    })
}

fn number(value: &Value, decimals: usize) -> String {
    value
        .as_f64()
        .map_or("-".to_string(), |number| format!("{number:.decimals$}"))
}

/// The deployment called `name`: the one not yet ended, else the latest.
fn find<'a>(
    deployments: &'a [(&'a pb::Job, Vec<(u64, &'a pb::Job)>)],
    name: &str,
) -> Result<&'a (&'a pb::Job, Vec<(u64, &'a pb::Job)>)> {
    let mut same: Vec<&(&pb::Job, Vec<(u64, &pb::Job)>)> =
        deployments.iter().filter(|(job, _)| job.name == name).collect();
    same.sort_by_key(|(job, _)| (!kiln_coordinator::client::is_finished(job.state), job.id));
    match same.last() {
        Some(found) => Ok(found),
        None => {
            let known: Vec<&str> = deployments.iter().map(|(job, _)| job.name.as_str()).collect();
            bail!(
                "no deployment named '{name}' (deployments: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        }
    }
}

pub async fn run(command: DeploymentsCommand, client: &mut Client) -> Result<()> {
    let jobs = client.list_jobs(Vec::new(), 0).await.map_err(status_error)?;
    let deployments = deployments_of(&jobs);
    match command {
        DeploymentsCommand::List { json } => {
            let listed: Vec<Value> = deployments
                .iter()
                .map(|(job, replicas)| deployment_json(job, replicas))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = listed
                .iter()
                .map(|deployment| {
                    vec![
                        crate::runs::text(&deployment["name"]),
                        deployment["job"].to_string(),
                        crate::runs::text(&deployment["state"]),
                        format!(
                            "{}/{} ({}..{})",
                            deployment["replicas_ready"],
                            deployment["replicas_live"],
                            deployment["replicas_min"],
                            deployment["replicas_max"]
                        ),
                        deployment["versions"]
                            .as_array()
                            .map(|versions| versions.iter().map(crate::runs::text).collect::<Vec<_>>().join(","))
                            .unwrap_or_default(),
                        number(&deployment["requests_per_second"], 1),
                        number(&deployment["p50_ms"], 2),
                        number(&deployment["p99_ms"], 2),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME",
                    "JOB",
                    "STATE",
                    "READY/LIVE (MIN..MAX)",
                    "VERSION",
                    "REQ/S",
                    "P50 MS",
                    "P99 MS",
                ],
                &rows,
            );
        }
        DeploymentsCommand::Show { name, json } => {
            let (job, replicas) = find(&deployments, &name)?;
            let shown = deployment_json(job, replicas);
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
                return Ok(());
            }
            println!(
                "deployment {} (job {}): {}",
                shown["name"].as_str().unwrap_or_default(),
                job.id,
                state_label(job.state)
            );
            println!("  model     {}", crate::runs::text(&shown["model"]));
            println!(
                "  replicas  {} ready, {} live (min {}, max {}; one more above a mean queue of {})",
                shown["replicas_ready"],
                shown["replicas_live"],
                shown["replicas_min"],
                shown["replicas_max"],
                shown["target_queue_depth"]
            );
            if shown["replicas_outdated"].as_u64().unwrap_or(0) > 0 {
                println!(
                    "  updating  {} replica(s) still run the previous file; they are replaced one at a time",
                    shown["replicas_outdated"]
                );
            }
            println!(
                "  load      {} requests/s, p50 {} ms, p99 {} ms",
                number(&shown["requests_per_second"], 1),
                number(&shown["p50_ms"], 2),
                number(&shown["p99_ms"], 2)
            );
            println!(
                "  requests  logged to {}, a file per {} rows of a model version or every {}",
                crate::runs::text(&shown["request_log"]),
                shown["request_log_rows"],
                crate::runs::text(&shown["request_log_interval"])
            );
            if !job.message.is_empty() {
                println!("  message   {}", job.message);
            }
            let rows: Vec<Vec<String>> = shown["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|replica| {
                    vec![
                        replica["replica"].to_string(),
                        replica["job"].to_string(),
                        crate::runs::text(&replica["state"]),
                        if replica["ready"] == true { "yes" } else { "no" }.to_string(),
                        crate::runs::text(&replica["worker"]),
                        crate::runs::text(&replica["http"]),
                        crate::runs::text(&replica["version"]),
                        number(&replica["queue_depth"], 1),
                        number(&replica["requests_per_second"], 1),
                        number(&replica["p50_ms"], 2),
                        number(&replica["p99_ms"], 2),
                        replica["error"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| crate::runs::text(&replica["message"])),
                    ]
                })
                .collect();
            print_table(
                &[
                    "REPLICA", "JOB", "STATE", "READY", "WORKER", "REST", "VERSION", "QUEUE", "REQ/S", "P50 MS",
                    "P99 MS", "MESSAGE",
                ],
                &rows,
            );
        }
        DeploymentsCommand::Delete { name } => {
            let (job, _) = find(&deployments, &name)?;
            if kiln_coordinator::client::is_finished(job.state) {
                bail!(
                    "deployment '{name}' (job {}) already {}",
                    job.id,
                    state_label(job.state)
                );
            }
            client
                .cancel_job(job.id, "deleted with kiln deployments delete")
                .await
                .map_err(status_error)?;
            println!(
                "deployment '{name}' (job {}) deleted; its replicas are stopping",
                job.id
            );
        }
    }
    Ok(())
}

/// `kiln deploy FILE`: checks the file as a replica will read it, submits it, and with `wait` waits until
/// the fewest replicas it asks for are ready (or it fails). A file named like a running deployment updates
/// it in place: the coordinator rolls its replicas to the new file one at a time (and back, if replicas of the
/// new file cannot start), and `wait` waits until every replica runs the new file.
pub async fn deploy(file: &Path, wait: Option<Duration>, json: bool, client: &mut Client) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let source = file.display().to_string();
    crate::serve::Deployment::parse(file, &text)?;
    let kind = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|table| table.get("kind").cloned());
    if kind.as_ref().and_then(toml::Value::as_str) != Some("deployment") {
        bail!(
            "{source} is not a deployment file: it needs kind = \"deployment\" (see examples/deployments/digits.toml)"
        );
    }
    let options = kiln_coordinator::spec::deployment_options(&source, &text)?;
    // Only to say whether this is a new deployment, an update or the same file again.
    let jobs = client
        .list_jobs(vec![pb::JobState::Running], 0)
        .await
        .map_err(status_error)?;
    let running = deployments_of(&jobs)
        .into_iter()
        .find(|(job, _)| job.name == options.name && !kiln_coordinator::client::is_finished(job.state))
        .map(|(job, _)| (job.id, job.spec_toml == text));
    let response = client
        .submit(&text, &source, &kiln_coordinator::client::new_idempotency_key())
        .await
        .map_err(status_error)?;
    let job = response.job.context("the coordinator returned no job")?;
    if !json {
        match running {
            Some((id, true)) if id == job.id => {
                println!("deployment '{}' (job {id}) runs this file already", options.name)
            }
            Some((id, false)) if id == job.id => println!(
                "deployment '{}' (job {id}) is updating: its replicas are replaced one at a time by replicas of this file ({} to {} replicas of {})",
                options.name, options.min_replicas, options.max_replicas, options.model
            ),
            _ => println!(
                "deployment '{}' is job {} ({} to {} replicas of {})",
                options.name, job.id, options.min_replicas, options.max_replicas, options.model
            ),
        }
    }
    let Some(wait) = wait else {
        if json {
            println!("{}", serde_json::to_string_pretty(&deployment_json(&job, &[]))?);
        }
        return Ok(());
    };
    let deadline = Instant::now() + wait;
    let mut shown = (usize::MAX, u64::MAX);
    loop {
        let jobs = client.list_jobs(Vec::new(), 0).await.map_err(status_error)?;
        let deployments = deployments_of(&jobs);
        let Some((current, replicas)) = deployments.iter().find(|(found, _)| found.id == job.id) else {
            bail!("deployment job {} is gone", job.id);
        };
        let state = deployment_json(current, replicas);
        let ready = state["replicas_ready"].as_u64().unwrap_or(0) as usize;
        if kiln_coordinator::client::is_finished(current.state) {
            bail!(
                "deployment '{}' {}: {}",
                options.name,
                state_label(current.state),
                current.message
            );
        }
        if current.spec_toml != text {
            bail!(
                "deployment '{}' (job {}) no longer runs this file: {}",
                options.name,
                current.id,
                if current.message.is_empty() {
                    "another file was deployed under its name"
                } else {
                    current.message.as_str()
                }
            );
        }
        let outdated = state["replicas_outdated"].as_u64().unwrap_or(0);
        if ready >= options.min_replicas as usize && outdated == 0 {
            if json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                println!(
                    "deployment '{}' is ready: {ready} replica(s); requests to the serving ports (8000 REST, 8001 gRPC) reach them",
                    options.name
                );
            }
            return Ok(());
        }
        if (ready, outdated) != shown && !json {
            if outdated > 0 {
                eprintln!("updating: {ready} replicas ready, {outdated} still on the previous file");
            } else {
                eprintln!("waiting: {ready} of {} replicas ready", options.min_replicas);
            }
            shown = (ready, outdated);
        }
        if Instant::now() >= deadline {
            bail!(
                "deployment '{}': {ready} of {} replicas ready after {}; see kiln deployments show {}",
                options.name,
                options.min_replicas,
                humantime::format_duration(wait),
                options.name
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Keeps `router`'s table current: lists the running jobs every `interval` until `shutdown`. A failed
/// listing keeps the table as it was (the replicas keep serving while the coordinators fail over).
pub async fn follow_table(
    router: Arc<Router>,
    mut client: Client,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    client.retry_deadline = interval.max(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match client.list_jobs(vec![pb::JobState::Running], 0).await {
            Ok(jobs) => router.set_table(table_of(&jobs)),
            Err(status) => tracing::debug!(message = status.message(), "listing the deployments"),
        }
    }
}

/// How often a router refreshes its table.
pub const TABLE_INTERVAL: Duration = Duration::from_millis(500);

/// Starts a router on `rest` and `grpc` for the cluster at `coordinators`; returns the bound addresses.
pub async fn start_router(
    coordinators: &str,
    rest: &str,
    grpc: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(
    std::net::SocketAddr,
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<()>>,
)> {
    let client = Client::new(coordinators)?;
    let router = Arc::new(Router::default());
    let rest = tokio::net::TcpListener::bind(rest)
        .await
        .with_context(|| format!("listening on {rest}"))?;
    let grpc = tokio::net::TcpListener::bind(grpc)
        .await
        .with_context(|| format!("listening on {grpc}"))?;
    let addresses = (rest.local_addr()?, grpc.local_addr()?);
    tokio::spawn(follow_table(router.clone(), client, TABLE_INTERVAL, shutdown.clone()));
    let task = tokio::spawn(async move {
        kiln_serving::router::serve(router, rest, grpc, shutdown).await?;
        Ok(())
    });
    Ok((addresses.0, addresses.1, task))
}

#[derive(clap::Args)]
pub struct RouterArgs {
    /// The cluster's coordinators, whose deployments it routes to.
    #[arg(long, env = "KILN_COORDINATOR", default_value = "127.0.0.1:7070")]
    coordinator: String,
    /// Where the Open Inference Protocol's REST binding listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_listen: String,
    /// Where its gRPC binding listens.
    #[arg(long, default_value = "127.0.0.1:8001")]
    grpc_listen: String,
}

/// `kiln router`: the serving ports of a cluster, in front of every deployment's ready replicas.
pub async fn run_router(args: RouterArgs) -> Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::shutdown_on_signal(shutdown.clone()));
    let (rest, grpc, task) = start_router(&args.coordinator, &args.http_listen, &args.grpc_listen, shutdown).await?;
    println!(
        "routing to the deployments of {}: REST http://{rest} gRPC {grpc}",
        args.coordinator
    );
    task.await?
}

/// `kiln deploy`'s arguments.
#[derive(clap::Args)]
pub struct DeployArgs {
    /// The deployment's file (kind = "deployment"; examples/deployments/digits.toml).
    pub file: PathBuf,
    /// Wait until the fewest replicas it asks for are ready, at most this long (e.g. 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64, kind: &str, state: pb::JobState, env: Value) -> pb::Job {
        pb::Job {
            id,
            name: if kind == "deployment" {
                "digits".into()
            } else {
                format!("digits-{id}")
            },
            kind: kind.into(),
            state: state as i32,
            spec_json: json!({ "env": env }).to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn the_table_holds_the_ready_replicas_of_running_deployments() {
        let replica = |id: u64, number: u64, ready: bool| {
            let mut job = job(
                id,
                "serve",
                pb::JobState::Running,
                json!({ "KILN_DEPLOYMENT": "1", "KILN_REPLICA": number.to_string() }),
            );
            if ready {
                job.metrics.insert(names::READY.into(), 1.0);
                job.artifacts
                    .insert(names::HTTP.into(), format!("127.0.0.1:{}", 9000 + id));
                job.artifacts
                    .insert(names::GRPC.into(), format!("127.0.0.1:{}", 9100 + id));
            }
            job
        };
        let jobs = vec![
            job(1, "deployment", pb::JobState::Running, Value::Null),
            replica(3, 1, true),
            replica(2, 0, true),
            replica(4, 2, false),
            job(5, "command", pb::JobState::Running, Value::Null),
        ];
        let table = table_of(&jobs);
        let ready: Vec<&str> = table["digits"].iter().map(|replica| replica.http.as_str()).collect();
        assert_eq!(ready, ["127.0.0.1:9002", "127.0.0.1:9003"]);
        let listed = deployments_of(&jobs);
        assert_eq!(
            listed[0].1.iter().map(|(number, _)| *number).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        let shown = deployment_json(listed[0].0, &listed[0].1);
        assert_eq!(
            (shown["replicas_live"].as_u64(), shown["replicas_ready"].as_u64()),
            (Some(3), Some(2))
        );
        assert!(
            find(&listed, "nope")
                .unwrap_err()
                .to_string()
                .contains("deployments: digits")
        );
    }
}
