//! `kiln bench SUITE`: measures a running cluster, the way nccl-tests measures a fabric. Prints a table
//! and writes JSON that `benches/run-raft.sh` turns into a report beside its baselines.
//!
//! Suite `lookup`: sequential online lookups against a feature server over Flight or HTTP, Kiln's or (over
//! HTTP) Feast's (see [`crate::bench_lookup`]).
//!
//! Suite `tracking`: log-batch throughput, run creation and run-search latency against any MLflow tracking
//! server's REST API, Kiln's or MLflow's own (see [`crate::bench_tracking`]).
//!
//! Suite `doget`: the throughput of whole DoGets of one Flight ticket (`--ticket`, a feature command as JSON)
//! read and decoded by a Rust client, in GB/s of Arrow buffers.
//!
//! Suite `serving`: closed-loop inference over the Open Inference Protocol's REST binding against any server
//! of it, Kiln's or a baseline's (see [`crate::bench_serving`]).
//!
//! Suites `tpe` (sample efficiency against Optuna) and `sweeps` (a sweep's scheduling overhead): see
//! [`crate::bench_sweeps`].
//!
//! Suite `raft`: committed job submissions per second and commit latency (p50, p99) at each client
//! concurrency. `--target etcd` drives an etcd cluster's KV Put with the same load generator, value size
//! and concurrency, so the two are compared on equal terms.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use kiln_coordinator::client::{Client, new_idempotency_key};
use kiln_proto as pb;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

const HELLO: &str = include_str!("../../examples/jobs/hello.toml");
/// Requests each client sends before measuring starts.
const WARMUP_PER_CLIENT: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchTarget {
    Kiln,
    Etcd,
}

impl BenchTarget {
    fn label(self) -> &'static str {
        match self {
            BenchTarget::Kiln => "kiln",
            BenchTarget::Etcd => "etcd",
        }
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// The suite to run: raft (coordinator commits against etcd), jobs (jobs through workers), lookup
    /// (online feature lookups against a feature server), doget (DoGet throughput from a feature server),
    /// tracking (an MLflow tracking server's log-batch and search, Kiln's or MLflow's), tpe (Kiln's TPE
    /// against Optuna's on known functions; no cluster), sweeps (a sweep's scheduling overhead) or serving
    /// (closed-loop inference against an Open Inference Protocol REST server).
    suite: String,
    /// Kiln coordinator addresses (the leader is found and loaded directly).
    #[arg(long, env = "KILN_COORDINATOR", default_value = "127.0.0.1:7070")]
    coordinator: String,
    #[arg(long, value_enum, default_value = "kiln")]
    target: BenchTarget,
    /// etcd client URLs' HOST:PORT, comma-separated (the first one is loaded), with --target etcd.
    #[arg(long, default_value = "127.0.0.1:2379")]
    etcd: String,
    /// Client concurrencies to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 4000)]
    requests: usize,
    /// Stop a level after this many seconds even if requests remain.
    #[arg(long, default_value_t = 30)]
    max_seconds: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Suite jobs: single-rank `true` jobs in the throughput phase.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Suite jobs: concurrent submitting clients in the throughput phase.
    #[arg(long, default_value_t = 32)]
    submitters: usize,
    /// Suite jobs: jobs submitted at a steady --rate in the latency phase (0 skips it).
    #[arg(long, default_value_t = 2000)]
    paced_jobs: usize,
    /// Suite jobs: submissions per second in the latency phase.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Suites lookup and doget: the feature server's address (Flight and HTTP share it; over HTTP it may be
    /// any server of Feast's `/get-online-features`).
    #[arg(long, env = "KILN_FEATURESTORE", default_value = "127.0.0.1:7072")]
    featurestore: String,
    /// Suite lookup: the protocol each lookup travels over.
    #[arg(long, value_enum, default_value = "flight")]
    over: crate::bench_lookup::LookupOver,
    /// Suite lookup: the feature service looked up.
    #[arg(long, default_value = "")]
    service: String,
    /// Suite lookup over HTTP: the features looked up instead of a service, as view:feature, comma-separated.
    #[arg(long, value_delimiter = ',')]
    lookup_features: Vec<String>,
    /// Suite lookup: the entity's join key; each lookup names one integer key drawn from
    /// --first-key..--first-key + --keys.
    #[arg(long, default_value = "id")]
    key: String,
    /// Suite lookup: the first entity key to draw from.
    #[arg(long, default_value_t = 0)]
    first_key: u64,
    /// Suite lookup: how many entity keys there are to draw from.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Suite doget: the ticket, sent as given: a Kiln feature command as JSON (`{"sql": {"query": "SELECT …"}}`,
    /// say) or any Flight server's ticket.
    #[arg(long, default_value = "")]
    ticket: String,
    /// Suite tracking: an MLflow tracking server's HTTP address (Kiln's, or `mlflow server`'s).
    #[arg(long, env = "KILN_TRACKING", default_value = "127.0.0.1:7080")]
    tracking: String,
    /// Suite tracking: metric points per log-batch (MLflow allows 1,000).
    #[arg(long, default_value_t = 1000)]
    batch_points: usize,
    /// Suite tracking: runs created, each with a param and a metric, before the searches.
    #[arg(long, default_value_t = 100_000)]
    runs: usize,
    /// Suite tracking: sequential run searches measured.
    #[arg(long, default_value_t = 200)]
    searches: usize,
    /// Suite tpe: seeds per function (0..N).
    #[arg(long, default_value_t = 10)]
    seeds: usize,
    /// Suites tpe and sweeps: trials per search (tpe) or in the sweep (sweeps).
    #[arg(long, default_value_t = 50)]
    trials: usize,
    /// Suite tpe: a Python with optuna installed, to run Optuna's TPE beside Kiln's.
    #[arg(long, env = "KILN_PYTHON")]
    python: Option<String>,
    /// Suite sweeps: trials in parallel (and commands at a time in the local pool).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Suite sweeps: how long each trial's command sleeps, in milliseconds.
    #[arg(long, default_value_t = 10)]
    trial_ms: u64,
    /// Suite serving: an Open Inference Protocol REST server (kiln serve's, or a baseline's).
    #[arg(long, default_value = "127.0.0.1:8000")]
    inference: String,
    /// Suite serving: what the server is, as the results name it.
    #[arg(long, default_value = "kiln")]
    server: String,
    /// Suite serving: the model to infer with.
    #[arg(long, default_value = "digits")]
    model: String,
    /// Suite serving: the model's input tensor.
    #[arg(long, default_value = "input")]
    input_name: String,
    /// Suite serving: FP32 values per row (one row per request).
    #[arg(long, default_value_t = 64)]
    features: usize,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct LevelResult {
    suite: String,
    target: BenchTarget,
    clients: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    ops_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    value_bytes: usize,
}

async fn channel(addr: &str) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

async fn one_request(
    target: BenchTarget,
    channel: Channel,
    client_index: usize,
    sequence: usize,
) -> Result<(), tonic::Status> {
    match target {
        BenchTarget::Kiln => {
            let request = pb::SubmitJobRequest {
                spec_toml: HELLO.to_string(),
                idempotency_key: new_idempotency_key(),
                source_name: "bench".into(),
            };
            pb::job_service_client::JobServiceClient::new(channel)
                .submit(request)
                .await?;
        }
        BenchTarget::Etcd => {
            let request = pb::etcd::PutRequest {
                key: format!("kiln-bench/{client_index}/{sequence}").into_bytes(),
                value: HELLO.as_bytes().to_vec(),
                ..Default::default()
            };
            pb::etcd::kv_client::KvClient::new(channel).put(request).await?;
        }
    }
    Ok(())
}

async fn run_level(
    target: BenchTarget,
    addr: &str,
    clients: usize,
    requests: usize,
    max_seconds: u64,
) -> Result<LevelResult> {
    let mut channels = Vec::with_capacity(clients);
    for _ in 0..clients {
        channels.push(channel(addr).await?);
    }
    // Warm up connections and the leader.
    let warmups = channels.iter().enumerate().map(|(index, channel)| {
        let channel = channel.clone();
        async move {
            for sequence in 0..WARMUP_PER_CLIENT {
                one_request(target, channel.clone(), index, usize::MAX - sequence).await?;
            }
            Ok::<(), tonic::Status>(())
        }
    });
    for result in futures::future::join_all(warmups).await {
        result.map_err(|status| anyhow::anyhow!("warm-up request failed: {}", status.message()))?;
    }
    let progress = indicatif::ProgressBar::new(requests as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message(format!("{clients} clients"));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, channel) in channels.into_iter().enumerate() {
        let next = next.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
            let mut errors = 0u64;
            loop {
                let sequence = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if sequence >= requests || Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                match one_request(target, channel.clone(), index, sequence).await {
                    Ok(()) => {
                        let micros = sent.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                        histogram.record(micros).expect("latency within bounds");
                    }
                    Err(_) => errors += 1,
                }
                progress.inc(1);
            }
            (histogram, errors)
        });
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let mut errors = 0;
    while let Some(result) = tasks.join_next().await {
        let (part, part_errors) = result.context("a load task panicked")?;
        histogram.add(part).context("merging latency histograms")?;
        errors += part_errors;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let completed = histogram.len();
    Ok(LevelResult {
        suite: "raft".into(),
        target,
        clients,
        requests: completed,
        errors,
        seconds,
        ops_per_second: completed as f64 / seconds,
        p50_ms: histogram.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: histogram.max() as f64 / 1000.0,
        value_bytes: HELLO.len(),
    })
}

/// The leader's client address, so the load is not measured through a forwarding hop.
async fn kiln_leader(addresses: &str) -> Result<String> {
    let mut client = Client::new(addresses)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client.cluster_status().await.map_err(crate::output::status_error)?;
        if let Some(leader) = status
            .members
            .iter()
            .find(|member| member.id == status.leader_id && !member.api_addr.is_empty())
        {
            return Ok(leader.api_addr.clone());
        }
        if Instant::now() > deadline {
            bail!("the cluster at {addresses} has no leader");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_jobs_suite(args: &BenchArgs) -> Result<()> {
    let results = crate::bench_jobs::run(
        &args.coordinator,
        args.jobs,
        args.submitters,
        args.paced_jobs,
        args.rate,
        args.max_seconds.max(600),
    )
    .await?;
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|result| {
            vec![
                result.phase.clone(),
                result.jobs.to_string(),
                result.failed.to_string(),
                format!("{} × {}", result.workers, result.slots / result.workers.max(1) as u32),
                format!("{:.0}", result.jobs_per_second),
                format!("{:.0}", result.submit_to_start_p50_ms),
                format!("{:.0}", result.submit_to_start_p99_ms),
                format!("{:.0}", result.submit_to_finish_p50_ms),
                format!("{:.0}", result.submit_to_finish_p99_ms),
            ]
        })
        .collect();
    crate::output::print_table(
        &[
            "PHASE",
            "JOBS",
            "FAILED",
            "WORKERS × SLOTS",
            "JOBS/S",
            "START P50 MS",
            "START P99 MS",
            "FINISH P50 MS",
            "FINISH P99 MS",
        ],
        &rows,
    );
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn run_lookup_suite(args: &BenchArgs) -> Result<()> {
    let target = crate::bench_lookup::LookupTarget {
        service: args.service.clone(),
        features: args.lookup_features.clone(),
        key: args.key.clone(),
        first_key: args.first_key,
        keys: args.keys,
    };
    let result =
        crate::bench_lookup::run(args.over, &args.featurestore, &target, args.requests, args.max_seconds).await?;
    let over = match result.over {
        crate::bench_lookup::LookupOver::Flight => "flight",
        crate::bench_lookup::LookupOver::Http => "http",
    };
    report(
        args,
        &result,
        &[
            "OVER",
            "LOOKED UP",
            "LOOKUPS",
            "NOT FOUND",
            "P50 MS",
            "P99 MS",
            "MAX MS",
        ],
        &[vec![
            over.to_string(),
            result.looked_up.clone(),
            result.lookups.to_string(),
            result.not_found.to_string(),
            format!("{:.3}", result.p50_ms),
            format!("{:.3}", result.p99_ms),
            format!("{:.3}", result.max_ms),
        ]],
    )
}

/// Closed-loop inference at each `--clients` level for `--max-seconds` (see [`crate::bench_serving`]).
async fn run_serving_suite(args: &BenchArgs) -> Result<()> {
    let mut results = Vec::new();
    for &clients in &args.clients {
        results.push(
            crate::bench_serving::run(
                &args.inference,
                &args.server,
                &args.model,
                &args.input_name,
                args.features,
                clients,
                args.max_seconds,
            )
            .await?,
        );
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|result| {
            vec![
                result.server.clone(),
                result.clients.to_string(),
                result.requests.to_string(),
                result.errors.to_string(),
                format!("{:.0}", result.requests_per_second),
                format!("{:.3}", result.p50_ms),
                format!("{:.3}", result.p99_ms),
            ]
        })
        .collect();
    report(
        args,
        &results,
        &["SERVER", "CLIENTS", "REQUESTS", "ERRORS", "REQ/S", "P50 MS", "P99 MS"],
        &rows,
    )
}

/// Prints one suite's result, as JSON with `--json` or as a table of `headers` and `row`, and writes it to
/// `--out` when given.
fn report(args: &BenchArgs, result: &impl Serialize, headers: &[&str], rows: &[Vec<String>]) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(result)?);
    } else {
        crate::output::print_table(headers, rows);
    }
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn run_tracking_suite(args: &BenchArgs) -> Result<()> {
    let clients = args.clients.first().copied().unwrap_or(1);
    let result = crate::bench_tracking::run(
        &args.tracking,
        clients,
        args.requests,
        args.batch_points,
        args.runs,
        args.searches,
        args.max_seconds,
    )
    .await?;
    report(
        args,
        &result,
        &[
            "SERVER",
            "CLIENTS",
            "LOG POINTS/S",
            "BATCH P50 MS",
            "BATCH P99 MS",
            "RUNS",
            "RUNS/S",
            "SEARCH P50 MS",
            "SEARCH P99 MS",
        ],
        &[vec![
            result.server.clone(),
            result.clients.to_string(),
            format!("{:.0}", result.log_points_per_second),
            format!("{:.2}", result.log_batch_p50_ms),
            format!("{:.2}", result.log_batch_p99_ms),
            result.runs.to_string(),
            format!("{:.0}", result.runs_per_second),
            format!("{:.2}", result.search_p50_ms),
            format!("{:.2}", result.search_p99_ms),
        ]],
    )
}

async fn run_doget_suite(args: &BenchArgs) -> Result<()> {
    if args.ticket.is_empty() {
        bail!("suite doget needs --ticket, a feature command as JSON such as '{{\"view\": {{\"name\": \"V\"}}}}'");
    }
    let result = crate::bench_lookup::doget(&args.featurestore, &args.ticket, args.requests, args.max_seconds).await?;
    report(
        args,
        &result,
        &["ROWS", "BYTES", "DOGETS", "SECONDS", "MEDIAN GB/S"],
        &[vec![
            result.rows.to_string(),
            result.bytes.to_string(),
            result.seconds.len().to_string(),
            result
                .seconds
                .iter()
                .map(|seconds| format!("{seconds:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
            format!("{:.3}", result.median_gb_per_s),
        ]],
    )
}

fn write_out(path: Option<&std::path::Path>, results: &impl Serialize) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.suite == "doget" {
        return run_doget_suite(&args).await;
    }
    if args.suite == "jobs" {
        return run_jobs_suite(&args).await;
    }
    if args.suite == "lookup" {
        return run_lookup_suite(&args).await;
    }
    if args.suite == "tracking" {
        return run_tracking_suite(&args).await;
    }
    if args.suite == "serving" {
        return run_serving_suite(&args).await;
    }
    if args.suite == "tpe" {
        let results = crate::bench_sweeps::run_tpe(args.python.as_deref(), args.seeds, args.trials)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&results)?);
        } else {
            crate::bench_sweeps::print_tpe(&results);
        }
        return write_out(args.out.as_deref(), &results);
    }
    if args.suite == "sweeps" {
        let result = crate::bench_sweeps::run_overhead(
            &args.coordinator,
            &args.tracking,
            args.trials,
            args.parallel,
            args.trial_ms,
            args.max_seconds.max(600),
        )
        .await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        } else {
            crate::bench_sweeps::print_overhead(&result);
        }
        return write_out(args.out.as_deref(), &result);
    }
    if args.suite != "raft" {
        bail!(
            "benchmark suite '{}' is not known; available: raft, jobs, lookup, doget, tracking, tpe, sweeps, serving",
            args.suite
        );
    }
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients needs positive concurrencies, for example 1,64");
    }
    let addr = match args.target {
        BenchTarget::Kiln => kiln_leader(&args.coordinator).await?,
        BenchTarget::Etcd => args.etcd.split(',').next().unwrap_or_default().trim().to_string(),
    };
    let mut results = Vec::new();
    for &clients in &args.clients {
        results.push(run_level(args.target, &addr, clients, args.requests, args.max_seconds).await?);
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|result| {
            vec![
                result.target.label().to_string(),
                result.clients.to_string(),
                result.requests.to_string(),
                result.errors.to_string(),
                format!("{:.0}", result.ops_per_second),
                format!("{:.2}", result.p50_ms),
                format!("{:.2}", result.p99_ms),
            ]
        })
        .collect();
    crate::output::print_table(
        &["TARGET", "CLIENTS", "REQUESTS", "ERRORS", "OPS/S", "P50 MS", "P99 MS"],
        &rows,
    );
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
