//! `kiln bench tracking`: an MLflow tracking server's throughput and latency through its REST API, so Kiln's
//! and MLflow's own server (`mlflow server`, SQLite) are measured by the same client on equal terms:
//!
//! 1. log-batch: `--clients` clients each log batches of `--batch-points` metric points (MLflow's largest
//!    batch is 1,000) into their own run, for `--requests` batches in all or `--max-seconds`; points per
//!    second and the latency of a batch;
//! 2. populate: `--runs` runs in a new experiment, each with a param `lr` (one of 10 values) and a metric
//!    `accuracy` (uniform in 0..1, seeded), created by `--clients` clients; runs per second;
//! 3. search: `--searches` sequential `runs/search` calls over those runs, the way a dashboard asks:
//!    `metrics.accuracy > 0.5 AND params.lr = '0.003'`, ordered by `metrics.accuracy DESC`, 100 per page;
//!    p50 and p99 latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Serialize)]
pub struct TrackingResult {
    pub suite: &'static str,
    pub server: String,
    pub clients: usize,
    pub batch_points: usize,
    pub log_batches: u64,
    pub log_points_per_second: f64,
    pub log_batch_p50_ms: f64,
    pub log_batch_p99_ms: f64,
    pub runs: usize,
    pub runs_per_second: f64,
    pub searches: u64,
    pub search_matches: usize,
    pub search_p50_ms: f64,
    pub search_p99_ms: f64,
}

struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let response = self
            .client
            .post(format!("{}/api/2.0/mlflow/{path}", self.base))
            .json(body)
            .send()
            .await
            .with_context(|| format!("{path}: no answer from {}", self.base))?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status}: {answer}");
        }
        Ok(answer)
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// SplitMix64, so both servers get the same runs.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut mixed = *state;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    mixed ^ (mixed >> 31)
}

async fn create_run(api: &Api, experiment: &str, name: &str) -> Result<String> {
    let created = api
        .post(
            "runs/create",
            &json!({ "experiment_id": experiment, "run_name": name, "start_time": now_ms() }),
        )
        .await?;
    created["run"]["info"]["run_id"]
        .as_str()
        .map(str::to_string)
        .context("runs/create answered no run id")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

fn progress(length: u64, message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(length);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_string());
    bar
}

pub async fn run(
    server: &str,
    clients: usize,
    requests: usize,
    batch_points: usize,
    runs: usize,
    searches: usize,
    max_seconds: u64,
) -> Result<TrackingResult> {
    if clients == 0 || batch_points == 0 || batch_points > 1000 {
        bail!("--clients must be positive and --batch-points 1 to 1000 (MLflow's limit per batch)");
    }
    let base = if server.starts_with("http") {
        server.trim_end_matches('/').to_string()
    } else {
        format!("http://{server}")
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .timeout(Duration::from_secs(120))
        .build()?;
    let api = Arc::new(Api { client, base });
    let tag = format!("{:x}", now_ms());
    let experiment = api
        .post("experiments/create", &json!({ "name": format!("kiln-bench-{tag}") }))
        .await?["experiment_id"]
        .as_str()
        .context("experiments/create answered no id")?
        .to_string();

    // 1. log-batch throughput.
    let mut run_ids = Vec::new();
    for client in 0..clients {
        run_ids.push(create_run(&api, &experiment, &format!("log-batch-{client}")).await?);
    }
    let bar = progress(requests as u64, "log-batch");
    let sent = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for run_id in run_ids {
        let (api, sent, bar) = (api.clone(), sent.clone(), bar.clone());
        tasks.spawn(async move {
            let mut latencies = histogram();
            let mut step = 0i64;
            while sent.fetch_add(1, Ordering::Relaxed) < requests && Instant::now() < deadline {
                let timestamp = now_ms();
                let metrics: Vec<Value> = (0..batch_points)
                    .map(|index| {
                        json!({
                            "key": format!("m{}", index % 10),
                            "value": (step as f64).sin() + index as f64,
                            "timestamp": timestamp,
                            "step": step * 100 + (index / 10) as i64,
                        })
                    })
                    .collect();
                step += 1;
                let body = json!({ "run_id": run_id, "metrics": metrics });
                let at = Instant::now();
                api.post("runs/log-batch", &body).await?;
                latencies.record(at.elapsed().as_micros().max(1) as u64)?;
                bar.inc(1);
            }
            Ok::<_, anyhow::Error>(latencies)
        });
    }
    let mut batches = histogram();
    while let Some(done) = tasks.join_next().await {
        batches.add(done??)?;
    }
    let log_seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    // 2. populate the runs to search.
    let bar = progress(runs as u64, "runs");
    let made = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (api, made, bar, experiment) = (api.clone(), made.clone(), bar.clone(), experiment.clone());
        tasks.spawn(async move {
            loop {
                let index = made.fetch_add(1, Ordering::Relaxed);
                if index >= runs {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut state = index as u64 ^ 0x5EED;
                let accuracy = (next(&mut state) % 1_000_000) as f64 / 1_000_000.0;
                let lr = [
                    "0.001", "0.002", "0.003", "0.005", "0.01", "0.02", "0.03", "0.05", "0.1", "0.2",
                ][(next(&mut state) % 10) as usize];
                let run_id = create_run(&api, &experiment, &format!("run-{index}")).await?;
                let body = json!({
                    "run_id": run_id,
                    "metrics": [{ "key": "accuracy", "value": accuracy, "timestamp": now_ms(), "step": 0 }],
                    "params": [{ "key": "lr", "value": lr }],
                });
                api.post("runs/log-batch", &body).await?;
                bar.inc(1);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let populate_seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    // 3. search latency.
    let mut latencies = histogram();
    let mut matches = 0;
    let query = json!({
        "experiment_ids": [experiment],
        "filter": "metrics.accuracy > 0.5 AND params.lr = '0.003'",
        "order_by": ["metrics.accuracy DESC"],
        "max_results": 100,
    });
    let bar = progress(searches as u64, "search");
    for _ in 0..searches {
        let at = Instant::now();
        let found = api.post("runs/search", &query).await?;
        latencies.record(at.elapsed().as_micros().max(1) as u64)?;
        matches = found["runs"].as_array().map_or(0, Vec::len);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(TrackingResult {
        suite: "tracking",
        server: api.base.clone(),
        clients,
        batch_points,
        log_batches: batches.len(),
        log_points_per_second: batches.len() as f64 * batch_points as f64 / log_seconds,
        log_batch_p50_ms: millis(&batches, 0.5),
        log_batch_p99_ms: millis(&batches, 0.99),
        runs,
        runs_per_second: runs as f64 / populate_seconds,
        searches: latencies.len(),
        search_matches: matches,
        search_p50_ms: millis(&latencies, 0.5),
        search_p99_ms: millis(&latencies, 0.99),
    })
}
