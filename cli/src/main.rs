//! `kiln`: the one binary. `main` parses the command line, runs the command, and reports its error.

mod artifacts;
mod bench;
mod bench_jobs;
mod bench_lookup;
mod bench_serving;
mod bench_sweeps;
mod bench_tracking;
mod demo;
mod deployments;
mod enrich;
mod features;
mod featureserver;
mod lineage;
mod models;
mod output;
mod runs;
mod serve;
mod sweeps;
mod task;

/// mimalloc for the whole binary: a DoGet of a wide table allocates megabytes per batch, and glibc maps
/// (and the kernel zeroes) fresh pages for every one of them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kiln_coordinator::client::{Client, new_idempotency_key};
use kiln_coordinator::spec::parse_job_spec;
use kiln_coordinator::{Coordinator, CoordinatorConfig};
use kiln_proto as pb;
use kiln_worker::{Worker, WorkerConfig};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: a highly available cluster runtime for machine learning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Target {
    /// Coordinator addresses, comma-separated; the client fails over between them.
    #[arg(long, global = true, env = "KILN_COORDINATOR", default_value = "127.0.0.1:7070")]
    coordinator: String,
    /// Give up after this many seconds of failing over and retrying.
    #[arg(long, global = true, env = "KILN_TIMEOUT", default_value_t = 30)]
    timeout: u64,
}

impl Target {
    fn client(&self) -> Result<Client> {
        let mut client = Client::new(&self.coordinator)?;
        client.retry_deadline = Duration::from_secs(self.timeout.max(1));
        Ok(client)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run one coordinator (a Raft member).
    Coordinator(CoordinatorArgs),
    /// Run an embedded single-node cluster on the default ports until Ctrl-C.
    Up(UpArgs),
    /// Start an embedded three-node cluster, submit the example jobs, survive a leader loss, summarise.
    Demo(demo::DemoArgs),
    /// Submit a job spec (TOML); prints the job id.
    Submit {
        file: PathBuf,
        /// Reuse a key to make a retried submission return the first one's job.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List, show, cancel and watch jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Run a worker: register with the cluster and run the tasks it is given.
    Worker(WorkerArgs),
    /// List and show workers.
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Inspect and change the coordinator group.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Programs that run as the ranks of a job (for example `kiln task allreduce`).
    #[command(subcommand, hide = true)]
    Task(task::TaskCommand),
    /// Benchmark a running cluster (suites: raft, jobs, lookup, doget, tracking, tpe, sweeps, serving).
    Bench(bench::BenchArgs),
    /// Feature definitions and training sets (`kiln features apply FILE`, `list`, `training-set …`).
    Features {
        #[command(subcommand)]
        command: features::FeaturesCommand,
        #[command(flatten)]
        target: Target,
        /// The feature server (kiln featurestore, or the one kiln up embeds), for get, sql and materialize.
        #[arg(long, global = true, env = "KILN_FEATURESTORE", default_value = "127.0.0.1:7072")]
        featurestore: String,
    },
    /// Run a feature server: Arrow Flight over the feature definitions the cluster holds.
    Featurestore(featureserver::FeatureServerArgs),
    /// Serve registered models over the Open Inference Protocol (REST :8000, gRPC :8001).
    Serve(serve::ServeArgs),
    /// Deploy a model on the cluster (a deployment file, kind = "deployment"): replicas on the workers
    /// behind the serving ports; prints its job id.
    Deploy {
        #[command(flatten)]
        args: deployments::DeployArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Deployments and their replicas: list, show, delete.
    Deployments {
        #[command(subcommand)]
        command: deployments::DeploymentsCommand,
        #[command(flatten)]
        target: Target,
    },
    /// The serving ports of a cluster (REST :8000, gRPC :8001) in front of every deployment's replicas.
    Router(deployments::RouterArgs),
    /// Hyperparameter sweeps (submitted with kiln submit, kind = "sweep"): list, show with their trials.
    Sweeps {
        #[command(subcommand)]
        command: sweeps::SweepsCommand,
        #[command(flatten)]
        target: Target,
        /// A coordinator's MLflow API, for the metrics trials log through it (kiln up serves one on
        /// 127.0.0.1:7080).
        #[arg(long, global = true, env = "KILN_TRACKING", default_value = "127.0.0.1:7080")]
        tracking: String,
    },
    /// Experiment runs (train jobs' and MLflow clients'): list, show, compare, and log into one.
    Runs {
        #[command(subcommand)]
        command: runs::RunsCommand,
        /// A coordinator's MLflow tracking API (kiln up serves one on 127.0.0.1:7080).
        #[arg(long, global = true, env = "KILN_TRACKING", default_value = "127.0.0.1:7080")]
        tracking: String,
    },
    /// The model registry: registered models, their versions and aliases (list, show, alias, register).
    Models {
        #[command(subcommand)]
        command: models::ModelsCommand,
        /// A coordinator's MLflow API (kiln up serves one on 127.0.0.1:7080).
        #[arg(long, global = true, env = "KILN_TRACKING", default_value = "127.0.0.1:7080")]
        tracking: String,
    },
    /// What a model version, dataset or run came from and what came of it (text, dot or json).
    Lineage(lineage::LineageArgs),
    /// A run's artifacts (list, get, put), streamed and checked against their SHA-256.
    Artifacts {
        #[command(subcommand)]
        command: artifacts::ArtifactsCommand,
        /// A coordinator's MLflow API (kiln up serves one on 127.0.0.1:7080).
        #[arg(long, global = true, env = "KILN_TRACKING", default_value = "127.0.0.1:7080")]
        tracking: String,
    },
}

#[derive(Args)]
struct CoordinatorArgs {
    /// This node's id (1, 2, …), unique in the cluster.
    #[arg(long)]
    id: u64,
    /// The founding members' Raft addresses: ID=HOST:PORT,… (this node included).
    #[arg(long, value_parser = parse_peers, default_value = "")]
    peers: BTreeMap<u64, String>,
    /// Address for clients and workers.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Address for Raft peers; defaults to this node's entry in --peers, else 127.0.0.1:7071.
    #[arg(long)]
    raft_listen: Option<SocketAddr>,
    /// Where this member keeps its Raft log and snapshots (raft.redb, snapshots.redb).
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: PathBuf,
    /// Start empty and wait for `kiln cluster add ID=HOST:PORT` on a running cluster.
    #[arg(long)]
    join: bool,
    /// Snapshot the state and compact the Raft log every this many entries (etcd's default count).
    #[arg(long, default_value_t = 100_000)]
    snapshot_interval: u64,
    /// Raft tick in milliseconds; elections start after 10 to 20 silent ticks.
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
    /// Seconds a client request may take inside the cluster (forwarding and retries included).
    #[arg(long, default_value_t = 10)]
    request_timeout: u64,
    #[command(flatten)]
    tracking: TrackingArgs,
    #[command(flatten)]
    scheduling: SchedulingArgs,
}

#[derive(Args, Clone)]
struct TrackingArgs {
    /// Where the MLflow Tracking REST API listens (MLFLOW_TRACKING_URI=http://ADDR); not served when absent.
    #[arg(long)]
    tracking_listen: Option<SocketAddr>,
    /// Where the artifact proxy keeps artifacts: a directory, file:///DIR, s3://BUCKET[/PREFIX],
    /// gs://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX], with credentials from each cloud's usual variables
    /// (default: DATA_DIR/artifacts). Several coordinators need one shared root.
    #[arg(long, default_value = "")]
    artifact_root: String,
    /// The most bytes one artifact may have; a larger upload is refused and leaves nothing.
    #[arg(long, default_value_t = kiln_coordinator::server::DEFAULT_ARTIFACT_MAX_BYTES)]
    artifact_max_bytes: u64,
}

#[derive(Args, Clone)]
struct SchedulingArgs {
    /// A worker not heard from for this long is declared lost (e.g. 5s, 1500ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    worker_lease: Duration,
    /// How long a job that does not fit may be passed by smaller jobs behind it before they wait for it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    backfill_window: Duration,
}

impl SchedulingArgs {
    fn apply(&self, config: &mut CoordinatorConfig) {
        config.worker_lease = self.worker_lease;
        config.scheduler.backfill_window_ms = self.backfill_window.as_millis() as i64;
    }
}

#[derive(Args)]
struct WorkerArgs {
    /// Coordinator addresses, comma-separated; the worker follows the leader among them.
    #[arg(long, env = "KILN_COORDINATOR", default_value = "127.0.0.1:7070")]
    coordinator: String,
    /// CPU slots offered (default: the machine's cores).
    #[arg(long)]
    cpus: Option<u32>,
    /// GPUs offered (default: detected with the `cuda` build, else none).
    #[arg(long)]
    gpus: Option<u32>,
    /// Memory offered, e.g. 8GiB (default: the machine's).
    #[arg(long)]
    memory: Option<String>,
    /// Where task directories and logs live; a restart with the same directory is the same worker.
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: PathBuf,
    /// Where this worker serves task logs (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The host other ranks and clients reach this worker at (default: the --listen address).
    #[arg(long)]
    advertise_host: Option<String>,
    /// Ports this worker reserves for rank 0 of its jobs (MASTER_PORT).
    #[arg(long, default_value = "29500-29999")]
    task_ports: String,
    /// Seconds a task has to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 5)]
    kill_grace: u64,
    /// Ended tasks whose directories (logs, working directory) are kept; the oldest beyond go, in batches.
    #[arg(long, default_value_t = kiln_worker::KEEP_TASKS_DEFAULT)]
    keep_tasks: usize,
    /// Where train tasks keep checkpoints; share it between workers so a restarted attempt on another
    /// worker resumes (default: DATA-DIR/artifacts).
    #[arg(long)]
    artifact_dir: Option<PathBuf>,
    /// The coordinators' MLflow APIs (HOST:PORT[,…]), handed to tasks: train jobs upload their model to
    /// their run and register it; any task's mlflow client logs to the first (MLFLOW_TRACKING_URI).
    #[arg(long, env = "KILN_TRACKING")]
    tracking: Option<String>,
}

#[derive(Subcommand)]
enum WorkersCommand {
    /// Every worker: address, state, free and total resources, running tasks, last heartbeat.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One worker.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Where the embedded coordinator keeps its data; a restart with the same directory resumes.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "kiln-data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:7071")]
    raft_listen: SocketAddr,
    /// Workers to run in this process.
    #[arg(long, default_value_t = 0)]
    workers: u32,
    /// CPU slots each embedded worker offers (default: the machine's cores).
    #[arg(long)]
    worker_cpus: Option<u32>,
    /// Ended tasks whose directories (logs, working directory) each embedded worker keeps.
    #[arg(long, default_value_t = kiln_worker::KEEP_TASKS_DEFAULT)]
    keep_tasks: usize,
    /// The embedded feature server's Arrow Flight address (its data under DATA_DIR/featurestore).
    #[arg(long, default_value = "127.0.0.1:7072")]
    featurestore_listen: SocketAddr,
    /// Megabytes of local Arrow IPC sources the embedded feature server keeps in memory (0: none).
    #[arg(long, env = "KILN_SOURCE_CACHE_MB", default_value_t = featureserver::DEFAULT_SOURCE_CACHE_MB)]
    source_cache_mb: usize,
    /// Where the MLflow Tracking REST API listens (MLFLOW_TRACKING_URI=http://ADDR).
    #[arg(long, default_value = "127.0.0.1:7080")]
    tracking_listen: SocketAddr,
    /// Where the artifact proxy keeps artifacts: a directory, file:///DIR, s3://BUCKET[/PREFIX],
    /// gs://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX] (default: DATA_DIR/artifacts).
    #[arg(long, default_value = "")]
    artifact_root: String,
    /// The serving ports (kiln deploy): the Open Inference Protocol's REST binding…
    #[arg(long, default_value = "127.0.0.1:8000")]
    serving_http_listen: String,
    /// …and its gRPC binding.
    #[arg(long, default_value = "127.0.0.1:8001")]
    serving_grpc_listen: String,
    #[command(flatten)]
    scheduling: SchedulingArgs,
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Jobs in id order.
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled); repeatable.
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long, default_value_t = 0)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One job: state, resources, timestamps, attempts and the spec as submitted.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job (cancelling a cancelled job is a no-op).
    Cancel {
        id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Wait for a job to finish: exit 0 when it succeeded, 1 with the reason otherwise.
    Wait {
        id: u64,
        /// Give up after this long (e.g. 10m); by default wait as long as it takes.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_wait: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Print a rank's stdout and stderr (from the worker that ran it).
    Logs {
        id: u64,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Which attempt (default: the latest).
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing until the rank exits (waits for the job to start if it is queued).
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Print every change to the given jobs (all jobs when none given) until interrupted.
    Watch {
        ids: Vec<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Members, leader, term, commit and applied index, each member's health.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The members only.
    Members {
        #[arg(long)]
        json: bool,
    },
    /// Add ID=HOST:PORT (its Raft address) as a learner, then promote it once it caught up.
    Add {
        #[arg(value_parser = parse_peer)]
        member: (u64, String),
        /// Keep it a learner (a non-voting replica).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member (a voter or a learner); move leadership away from it first.
    Remove { id: u64 },
    /// Hand leadership to another voter.
    TransferLeader { id: u64 },
}

fn parse_peer(text: &str) -> Result<(u64, String), String> {
    let (id, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not ID=HOST:PORT (for example 2=127.0.0.2:7071)"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("'{id}' in '{text}' is not a node id (a positive integer)"))?;
    if id == 0 {
        return Err(format!("node id 0 in '{text}'; ids start at 1"));
    }
    kiln_coordinator::server::validate_host_port(addr.trim()).map_err(|error| error.to_string())?;
    Ok((id, addr.trim().to_string()))
}

fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let (id, addr) = parse_peer(item)?;
        if peers.insert(id, addr).is_some() {
            return Err(format!("node id {id} appears twice in --peers"));
        }
    }
    Ok(peers)
}

/// Logs go to stderr; `KILN_LOG` (tracing's filter syntax) overrides the default level.
fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},raft=warn,h2=warn,tower=warn"))
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn shutdown_on_signal(token: tokio_util::sync::CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
        () = token.cancelled() => {}
    }
    token.cancel();
}

async fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    let mut config = CoordinatorConfig::new(args.id, args.data_dir);
    config.peers = args.peers;
    config.join = args.join;
    config.api_listen = args.listen;
    config.raft_listen = match args.raft_listen {
        Some(addr) => addr,
        None => match config.peers.get(&args.id) {
            Some(addr) => addr
                .parse()
                .with_context(|| format!("this node's --peers entry '{addr}' is not IP:PORT; pass --raft-listen"))?,
            None => SocketAddr::from(([127, 0, 0, 1], 7071)),
        },
    };
    config.node.snapshot_interval_entries = args.snapshot_interval.max(1);
    config.tick_interval = Duration::from_millis(args.tick_ms.max(1));
    config.request_timeout = Duration::from_secs(args.request_timeout.max(1));
    config.tracking_listen = args.tracking.tracking_listen;
    config.artifact_root = args.tracking.artifact_root;
    config.artifact_max_bytes = args.tracking.artifact_max_bytes;
    args.scheduling.apply(&mut config);
    let coordinator = Coordinator::start(config).await?;
    println!(
        "coordinator {} serving clients on {} and peers on {}",
        coordinator.node_id, coordinator.api_addr, coordinator.raft_addr
    );
    if let Some(addr) = coordinator.tracking_addr {
        println!("  MLflow tracking API on http://{addr}");
    }
    tokio::spawn(shutdown_on_signal(coordinator.shutdown_token()));
    coordinator.wait().await?;
    Ok(())
}

async fn run_up(args: UpArgs) -> Result<()> {
    let mut config = CoordinatorConfig::new(1, args.data_dir.clone());
    config.api_listen = args.listen;
    config.raft_listen = args.raft_listen;
    config.peers.insert(1, args.raft_listen.to_string());
    config.tracking_listen = Some(args.tracking_listen);
    config.artifact_root = args.artifact_root.clone();
    args.scheduling.apply(&mut config);
    let coordinator = Coordinator::start(config).await?;
    let mut workers = Vec::new();
    for index in 1..=args.workers {
        let mut worker_config = WorkerConfig::new(
            vec![coordinator.api_addr.to_string()],
            args.data_dir.join(format!("worker-{index}")),
        );
        if let Some(cpus) = args.worker_cpus {
            worker_config.cpus = cpus;
        }
        worker_config.keep_tasks = args.keep_tasks;
        // One checkpoint directory for every embedded worker: a restarted attempt resumes anywhere. (The
        // artifact proxy's store is DATA_DIR/artifacts; checkpoints reach it as run artifacts at the end.)
        worker_config.artifact_dir = Some(args.data_dir.join("checkpoints"));
        worker_config.tracking = coordinator.tracking_addr.map(|address| address.to_string());
        // Train jobs find the embedded feature server without `&server=` in their dataset.
        worker_config.featurestore = Some(args.featurestore_listen.to_string());
        let mut worker = Worker::start(worker_config).await?;
        let id = worker
            .registered()
            .await
            .context("the embedded worker stopped before registering")?;
        println!(
            "  worker {id}         {} (data {}/worker-{index})",
            worker.address,
            args.data_dir.display()
        );
        workers.push(worker);
    }
    let token = coordinator.shutdown_token();
    let features = featureserver::start(
        &coordinator.api_addr.to_string(),
        args.featurestore_listen,
        args.data_dir.join("featurestore"),
        Duration::from_secs(1),
        coordinator.tracking_addr.map(|address| address.to_string()),
        args.source_cache_mb.saturating_mul(1 << 20),
        token.clone(),
    )
    .await?;
    let (serving_rest, serving_grpc, router) = deployments::start_router(
        &coordinator.api_addr.to_string(),
        &args.serving_http_listen,
        &args.serving_grpc_listen,
        token.clone(),
    )
    .await?;
    println!(
        "kiln is up: an embedded single-node cluster with {} worker(s)",
        workers.len()
    );
    println!(
        "  coordinator API  {}   (kiln --coordinator {} …)",
        coordinator.api_addr, coordinator.api_addr
    );
    println!("  raft peers       {}", coordinator.raft_addr);
    if let Some(addr) = coordinator.tracking_addr {
        println!("  MLflow tracking  http://{addr}   (MLFLOW_TRACKING_URI=http://{addr})");
    }
    println!(
        "  feature server   {}   (Arrow Flight: grpc://{})",
        features.address, features.address
    );
    println!("  serving          REST http://{serving_rest}  gRPC {serving_grpc}   (kiln deploy FILE)");
    println!("  data             {}", args.data_dir.display());
    println!("Try: kiln submit examples/jobs/hello.toml && kiln jobs list. Ctrl-C stops it.");
    tokio::spawn(shutdown_on_signal(token.clone()));
    token.cancelled().await;
    if let Ok(Err(error)) = features.task.await {
        tracing::warn!("{error:#}");
    }
    if let Ok(Err(error)) = router.await {
        tracing::warn!("{error:#}");
    }
    for worker in workers {
        worker.shutdown().await;
    }
    coordinator.shutdown().await?;
    Ok(())
}

async fn run_worker(args: WorkerArgs) -> Result<()> {
    let coordinators: Vec<String> = args
        .coordinator
        .split(',')
        .map(|address| address.trim().to_string())
        .filter(|address| !address.is_empty())
        .collect();
    let mut config = WorkerConfig::new(coordinators, args.data_dir);
    if let Some(cpus) = args.cpus {
        config.cpus = cpus;
    }
    config.gpus = args.gpus;
    config.memory_bytes = args
        .memory
        .as_deref()
        .map(kiln_coordinator::spec::parse_memory)
        .transpose()
        .map_err(|message| anyhow::anyhow!("--memory: {message}"))?;
    config.listen = args.listen;
    config.advertise_host = args.advertise_host;
    config.task_ports = kiln_worker::parse_port_range(&args.task_ports)
        .map_err(|message| anyhow::anyhow!("--task-ports: {message}"))?;
    config.kill_grace = Duration::from_secs(args.kill_grace);
    config.keep_tasks = args.keep_tasks;
    config.artifact_dir = args.artifact_dir;
    config.tracking = args.tracking;
    let mut worker = Worker::start(config).await?;
    println!(
        "worker serving logs on {}; registering with {}",
        worker.address, args.coordinator
    );
    let token = worker.shutdown_token();
    tokio::spawn(shutdown_on_signal(token.clone()));
    tokio::select! {
        id = worker.registered() => {
            if let Some(id) = id {
                println!("registered as worker {id}");
            }
        }
        () = token.cancelled() => {}
    }
    worker.wait().await;
    Ok(())
}

async fn workers(command: WorkersCommand, target: Target) -> Result<()> {
    let mut client = target.client()?;
    match command {
        WorkersCommand::List { json } => {
            let workers = client.list_workers().await.map_err(output::status_error)?;
            output::print_workers(&workers, json)
        }
        WorkersCommand::Show { id, json } => {
            let worker = client.get_worker(id).await.map_err(output::status_error)?;
            output::print_worker(&worker, json)
        }
    }
}

async fn wait_job(client: &mut Client, id: u64, max_wait: Option<Duration>, json: bool) -> Result<()> {
    let waited = client.wait_job(id);
    let job = match max_wait {
        Some(limit) => tokio::time::timeout(limit, waited)
            .await
            .map_err(|_| anyhow::anyhow!("job {id} did not finish within {}", humantime::format_duration(limit)))?,
        None => waited.await,
    }
    .map_err(output::status_error)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&output::job_json(&job))?);
    }
    let state = output::state_label(job.state);
    if job.state == pb::JobState::Succeeded as i32 {
        if !json {
            println!("job {id} succeeded: {}", job.message);
        }
        Ok(())
    } else {
        bail!("job {id} {state}: {}", job.message)
    }
}

/// A rank's stdout of the latest attempt, as text (for the demo).
pub(crate) async fn task_logs_text(client: &mut Client, id: u64, rank: u32) -> Result<String> {
    let mut stream = open_logs(client, id, rank, None, false).await?;
    let mut text = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(output::status_error)? {
        if chunk.stream == "stdout" {
            text.extend(chunk.data);
        }
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Prints a rank's output: its stdout to stdout, its stderr to stderr.
pub(crate) async fn job_logs(
    client: &mut Client,
    id: u64,
    rank: u32,
    attempt: Option<u32>,
    follow: bool,
) -> Result<()> {
    use std::io::Write;
    let mut stream = open_logs(client, id, rank, attempt, follow).await?;
    while let Some(chunk) = stream.message().await.map_err(output::status_error)? {
        if chunk.stream == "stderr" {
            let mut stderr = std::io::stderr().lock();
            stderr.write_all(&chunk.data)?;
            stderr.flush()?;
        } else {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&chunk.data)?;
            stdout.flush()?;
        }
    }
    Ok(())
}

/// Finds where `rank` of the given attempt (default: the latest) ran and opens its log stream on that
/// worker. With `follow`, waits for a queued job to start and for a just-placed rank to appear.
async fn open_logs(
    client: &mut Client,
    id: u64,
    rank: u32,
    attempt: Option<u32>,
    follow: bool,
) -> Result<tonic::Streaming<pb::LogChunk>> {
    let job = loop {
        let job = client.get_job(id).await.map_err(output::status_error)?;
        let resources = job.resources.unwrap_or_default();
        if rank >= resources.workers {
            bail!(
                "job {id} has ranks 0 to {}; there is no rank {rank}",
                resources.workers.saturating_sub(1)
            );
        }
        if !job.attempts.is_empty() || !follow || kiln_coordinator::client::is_finished(job.state) {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let chosen = match attempt {
        Some(number) => job
            .attempts
            .iter()
            .find(|candidate| candidate.number == number)
            .with_context(|| format!("job {id} has no attempt {number} (it has {})", job.attempts.len()))?,
        None => job.attempts.last().with_context(|| {
            format!(
                "job {id} has not started yet ({}); no output to show",
                output::state_label(job.state)
            )
        })?,
    };
    let task = chosen
        .tasks
        .iter()
        .find(|task| task.rank == rank)
        .with_context(|| format!("attempt {} of job {id} has no rank {rank}", chosen.number))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", task.worker_address))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| {
            format!(
                "connecting to worker {} at {} for the logs",
                task.worker_id, task.worker_address
            )
        })?;
    let request = pb::LogsRequest {
        task: Some(pb::TaskKey {
            job_id: id,
            attempt: chosen.number,
            rank,
        }),
        follow,
    };
    let mut agent = pb::worker_agent_client::WorkerAgentClient::new(channel);
    // Right after placement the worker may not have the task yet; when following, give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match agent.logs(request).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if follow && status.code() == tonic::Code::NotFound && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => return Err(output::status_error(status)),
        }
    }
}

async fn submit(file: PathBuf, key: Option<String>, json: bool, target: Target) -> Result<()> {
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let source = file.display().to_string();
    // Checked here first so the error names the file before anything leaves this machine.
    parse_job_spec(&source, &text)?;
    let key = key.unwrap_or_else(new_idempotency_key);
    let response = target
        .client()?
        .submit(&text, &source, &key)
        .await
        .map_err(output::status_error)?;
    let job = response.job.context("the coordinator returned no job")?;
    if json {
        let mut value = output::job_json(&job);
        value["created"] = serde_json::Value::Bool(response.created);
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("{}", job.id);
    }
    Ok(())
}

async fn jobs(command: JobsCommand, target: Target) -> Result<()> {
    let mut client = target.client()?;
    match command {
        JobsCommand::List { states, limit, json } => {
            let mut wanted = Vec::new();
            for state in states {
                match pb::JobState::from_label(&state) {
                    Some(parsed) => wanted.push(parsed),
                    None => bail!(
                        "--state '{state}' is not a job state; expected queued, running, succeeded, failed or cancelled"
                    ),
                }
            }
            let jobs = client.list_jobs(wanted, limit).await.map_err(output::status_error)?;
            output::print_jobs(&jobs, json)?;
        }
        JobsCommand::Show { id, json } => {
            let job = client.get_job(id).await.map_err(output::status_error)?;
            output::print_job(&job, json)?;
        }
        JobsCommand::Cancel { id, reason } => {
            let job = client.cancel_job(id, &reason).await.map_err(output::status_error)?;
            println!("job {} {}", job.id, output::state_label(job.state));
        }
        JobsCommand::Wait { id, max_wait, json } => wait_job(&mut client, id, max_wait, json).await?,
        JobsCommand::Logs {
            id,
            rank,
            attempt,
            follow,
        } => job_logs(&mut client, id, rank, attempt, follow).await?,
        JobsCommand::Watch { ids, json } => {
            let mut stream = client.watch_jobs(ids).await.map_err(output::status_error)?;
            while let Some(event) = stream.message().await.map_err(output::status_error)? {
                let Some(job) = event.job else { continue };
                if json {
                    println!("{}", serde_json::to_string(&output::job_json(&job))?);
                } else {
                    println!("job {:<6} {:<10} {}", job.id, output::state_label(job.state), job.name);
                }
            }
        }
    }
    Ok(())
}

async fn cluster(command: ClusterCommand, target: Target) -> Result<()> {
    let mut client = target.client()?;
    let status = match command {
        ClusterCommand::Status { json } => {
            let status = client.cluster_status().await.map_err(output::status_error)?;
            return output::print_cluster_status(&status, json, true);
        }
        ClusterCommand::Members { json } => {
            let members = client.members().await.map_err(output::status_error)?;
            let status = pb::ClusterStatus {
                leader_id: members.leader_id,
                members: members.members,
                ..Default::default()
            };
            return output::print_cluster_status(&status, json, false);
        }
        ClusterCommand::Add {
            member: (id, addr),
            learner,
        } => client
            .add_member(id, &addr, learner)
            .await
            .map_err(output::status_error)?,
        ClusterCommand::Remove { id } => client.remove_member(id).await.map_err(output::status_error)?,
        ClusterCommand::TransferLeader { id } => client.transfer_leader(id).await.map_err(output::status_error)?,
    };
    output::print_cluster_status(&status, false, false)
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Coordinator(args) => run_coordinator(args).await,
        Command::Up(args) => run_up(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Submit {
            file,
            idempotency_key,
            json,
            target,
        } => submit(file, idempotency_key, json, target).await,
        Command::Jobs { command, target } => jobs(command, target).await,
        Command::Cluster { command, target } => cluster(command, target).await,
        Command::Worker(args) => run_worker(args).await,
        Command::Workers { command, target } => workers(command, target).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Task(command) => task::run(command).await,
        Command::Features {
            command,
            target,
            featurestore,
        } => features::run(command, target, featurestore).await,
        Command::Featurestore(args) => featureserver::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Deploy { args, target } => {
            deployments::deploy(&args.file, args.wait, args.json, &mut target.client()?).await
        }
        Command::Deployments { command, target } => deployments::run(command, &mut target.client()?).await,
        Command::Router(args) => deployments::run_router(args).await,
        Command::Runs { command, tracking } => runs::run(command, &tracking).await,
        Command::Sweeps {
            command,
            target,
            tracking,
        } => sweeps::run(command, &mut target.client()?, &tracking).await,
        Command::Models { command, tracking } => models::run(command, &tracking).await,
        Command::Artifacts { command, tracking } => artifacts::run(command, &tracking).await,
        Command::Lineage(args) => lineage::run(args).await,
    }
}

fn main() {
    let cli = Cli::parse();
    // Servers narrate what they do; client commands and the demo speak only when something is wrong.
    let server = matches!(
        cli.command,
        Command::Coordinator(_)
            | Command::Up(_)
            | Command::Worker(_)
            | Command::Featurestore(_)
            | Command::Serve(_)
            | Command::Router(_)
    );
    init_tracing(if server { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            std::process::exit(1);
        }
    };
    if let Err(error) = runtime.block_on(run(cli)) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
