//! `kiln bench jobs`: jobs through a running cluster with workers, end to end.
//!
//! Two phases, one after the other:
//! - throughput: `--jobs` single-rank jobs running `true`, submitted by `--clients` concurrent clients as
//!   fast as the cluster acknowledges them; jobs per second from the first submission to the last job's end.
//! - latency: `--paced-jobs` more, submitted at `--rate` per second (open loop, below capacity), so the
//!   submit-to-start time measures the scheduling path rather than the queue.
//!
//! Latencies are read from the job records, all stamped by the leader's clock: `submitted_at_ms` when it
//! proposes the submission, the attempt's `started_at_ms` when it proposes the placement (submit to
//! start), and `finished_at_ms` when it proposes the exit report (submit to finish, which bounds the time
//! to the process start from above: it adds the worker's spawn, `true` itself, and the report back).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use kiln_coordinator::client::{Client, new_idempotency_key};
use kiln_proto as pb;
use serde::Serialize;

const TRUE_JOB: &str =
    "name = \"bench-true\"\nkind = \"command\"\ncommand = \"true\"\n[resources]\nworkers = 1\ncpus = 1\n";
/// Jobs fetched per page when reading the results back.
const PAGE_JOBS: u32 = 1000;

#[derive(Serialize)]
pub struct JobsPhase {
    pub phase: String,
    pub jobs: usize,
    pub clients: usize,
    pub submit_seconds: f64,
    pub total_seconds: f64,
    pub jobs_per_second: f64,
    pub succeeded: usize,
    pub failed: usize,
    pub submit_to_start_p50_ms: f64,
    pub submit_to_start_p99_ms: f64,
    pub submit_to_start_max_ms: f64,
    /// Until the leader learned the process exited: an upper bound on the time to the process start that
    /// includes the worker's spawn and the report back.
    pub submit_to_finish_p50_ms: f64,
    pub submit_to_finish_p99_ms: f64,
    pub workers: usize,
    pub slots: u32,
}

async fn submit_one(client: &mut Client) -> Result<u64> {
    let key = new_idempotency_key();
    let response = client
        .submit(TRUE_JOB, "bench-true.toml", &key)
        .await
        .map_err(crate::output::status_error)?;
    Ok(response.job.context("no job returned")?.id)
}

fn progress_bar(length: usize, message: &str) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new(length as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message(message.to_string());
    progress
}

/// Waits until no job is queued or running, then reads back every job above `after_id`.
async fn collect(client: &mut Client, after_id: u64, count: usize, deadline: Instant) -> Result<Vec<pb::Job>> {
    // Jobs run in submission order, so the first unfinished one says how far the cluster has got.
    let progress = progress_bar(count, "finished");
    loop {
        let unfinished = client
            .list_jobs_after(vec![pb::JobState::Queued, pb::JobState::Running], 1, after_id)
            .await
            .map_err(crate::output::status_error)?;
        let Some(first) = unfinished.first() else {
            progress.finish_and_clear();
            break;
        };
        progress.set_position(first.id.saturating_sub(after_id + 1));
        if Instant::now() > deadline {
            bail!(
                "jobs were still unfinished at the deadline (first: job {})",
                unfinished[0].id
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut jobs = Vec::new();
    let mut cursor = after_id;
    loop {
        let page = client
            .list_jobs_after(Vec::new(), PAGE_JOBS, cursor)
            .await
            .map_err(crate::output::status_error)?;
        let Some(last) = page.last() else { break };
        cursor = last.id;
        jobs.extend(page);
    }
    Ok(jobs)
}

fn summarize(phase: &str, clients: usize, submit_seconds: f64, jobs: &[pb::Job], cluster: (usize, u32)) -> JobsPhase {
    let mut histogram = Histogram::<u64>::new(3).expect("valid histogram");
    let mut finish = Histogram::<u64>::new(3).expect("valid histogram");
    let mut first_submit = i64::MAX;
    let mut last_finish = i64::MIN;
    let mut succeeded = 0;
    for job in jobs {
        first_submit = first_submit.min(job.submitted_at_ms);
        last_finish = last_finish.max(job.finished_at_ms);
        if job.state == pb::JobState::Succeeded as i32 {
            succeeded += 1;
        }
        if job.finished_at_ms > 0 {
            let _ = finish.record((job.finished_at_ms - job.submitted_at_ms).max(0) as u64);
        }
        if let Some(attempt) = job.attempts.first() {
            let _ = histogram.record((attempt.started_at_ms - job.submitted_at_ms).max(0) as u64);
        }
    }
    let total_seconds = ((last_finish - first_submit).max(1) as f64) / 1000.0;
    JobsPhase {
        phase: phase.to_string(),
        jobs: jobs.len(),
        clients,
        submit_seconds,
        total_seconds,
        jobs_per_second: jobs.len() as f64 / total_seconds,
        succeeded,
        failed: jobs.len() - succeeded,
        submit_to_start_p50_ms: histogram.value_at_quantile(0.5) as f64,
        submit_to_start_p99_ms: histogram.value_at_quantile(0.99) as f64,
        submit_to_start_max_ms: histogram.max() as f64,
        submit_to_finish_p50_ms: finish.value_at_quantile(0.5) as f64,
        submit_to_finish_p99_ms: finish.value_at_quantile(0.99) as f64,
        workers: cluster.0,
        slots: cluster.1,
    }
}

async fn highest_job_id(client: &mut Client) -> Result<u64> {
    let mut cursor = 0;
    loop {
        let page = client
            .list_jobs_after(Vec::new(), PAGE_JOBS, cursor)
            .await
            .map_err(crate::output::status_error)?;
        match page.last() {
            Some(last) => cursor = last.id,
            None => return Ok(cursor),
        }
    }
}

pub async fn run(
    addresses: &str,
    jobs: usize,
    clients: usize,
    paced_jobs: usize,
    rate: f64,
    max_seconds: u64,
) -> Result<Vec<JobsPhase>> {
    if clients == 0 || rate <= 0.0 {
        bail!("--clients and --rate must be above zero");
    }
    let mut client = Client::new(addresses)?;
    let workers = client.list_workers().await.map_err(crate::output::status_error)?;
    let alive: Vec<&pb::WorkerInfo> = workers.iter().filter(|worker| worker.state == "alive").collect();
    if alive.is_empty() {
        bail!("the cluster at {addresses} has no alive worker; start it with `kiln up --workers 2`");
    }
    let slots: u32 = alive.iter().map(|worker| worker.total.unwrap_or_default().cpus).sum();
    let cluster = (alive.len(), slots);
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let mut results = Vec::new();

    let before = highest_job_id(&mut client).await?;
    let started = Instant::now();
    let mut submitters = tokio::task::JoinSet::new();
    let submitted = progress_bar(jobs, "submitted");
    for index in 0..clients {
        let mut own = Client::new(addresses)?;
        let count = jobs / clients + usize::from(index < jobs % clients);
        let submitted = submitted.clone();
        submitters.spawn(async move {
            for _ in 0..count {
                submit_one(&mut own).await?;
                submitted.inc(1);
            }
            anyhow::Ok(())
        });
    }
    while let Some(outcome) = submitters.join_next().await {
        outcome??;
    }
    submitted.finish_and_clear();
    let submit_seconds = started.elapsed().as_secs_f64();
    let finished = collect(&mut client, before, jobs, deadline).await?;
    results.push(summarize("throughput", clients, submit_seconds, &finished, cluster));

    if paced_jobs > 0 {
        let before = highest_job_id(&mut client).await?;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let started = Instant::now();
        let mut submitters = tokio::task::JoinSet::new();
        for index in 0..paced_jobs {
            tokio::time::sleep_until((started + interval * index as u32).into()).await;
            let mut own = client.clone();
            submitters.spawn(async move { submit_one(&mut own).await });
            while let Some(done) = submitters.try_join_next() {
                done??;
            }
        }
        while let Some(outcome) = submitters.join_next().await {
            outcome??;
        }
        let submit_seconds = started.elapsed().as_secs_f64();
        let finished = collect(&mut client, before, paced_jobs, deadline).await?;
        results.push(summarize(
            &format!("latency at {rate:.0} jobs/s"),
            1,
            submit_seconds,
            &finished,
            cluster,
        ));
    }
    Ok(results)
}
