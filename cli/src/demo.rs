//! `kiln demo`: the whole flow this build supports, end to end, on an embedded cluster of three
//! coordinators and two workers.
//!
//! Later issues extend it (canary and A/B routing, drift). Today it shows: a replicated coordinator that accepts jobs on any
//! node, refuses bad specs, de-duplicates retries, gang-schedules a 2-rank job onto workers that run it with
//! the torchrun environment, cancels a running job on every worker, trains the built-in MLP on the UCI
//! digits with 2 data-parallel ranks (a tracked run, its model registered), trains it again from the
//! feature store and prints the new version's lineage, deploys that version on two replicas behind a router
//! (the Open Inference Protocol) and classifies a few digits through it, runs a TPE sweep of command trials, and keeps every
//! acknowledged job — and the workers — through the loss of its leader.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use kiln_coordinator::client::{Client, new_idempotency_key};
use kiln_coordinator::{Coordinator, CoordinatorConfig};
use kiln_proto as pb;
use kiln_worker::{Worker, WorkerConfig};

use crate::output;

const EXAMPLES: [(&str, &str); 2] = [
    (
        "examples/jobs/hello.toml",
        include_str!("../../examples/jobs/hello.toml"),
    ),
    (
        "examples/jobs/ddp-hello.toml",
        include_str!("../../examples/jobs/ddp-hello.toml"),
    ),
];
const DIGITS_JOB: &str = include_str!("../../examples/jobs/digits-mlp.toml");
const DIGITS_FEATURES_JOB: &str = include_str!("../../examples/jobs/digits-features.toml");
/// The digits feature definitions and their data, written under the demo's directory.
const DIGITS_FEATURES: [(&str, &str); 3] = [
    ("digits.toml", include_str!("../../examples/features/digits.toml")),
    (
        "data/digits_pixels.csv",
        include_str!("../../examples/features/data/digits_pixels.csv"),
    ),
    (
        "data/digits_labels.csv",
        include_str!("../../examples/features/data/digits_labels.csv"),
    ),
];
const DIGITS_DATA: &str = include_str!("../../examples/data/digits.csv");
const BRANIN_SWEEP: &str = include_str!("../../examples/sweeps/branin-tpe.toml");
const BRANIN_SCRIPT: &str = include_str!("../../examples/scripts/objective.py");
/// Trials of the demo's sweep.
const SWEEP_TRIALS: usize = 20;
/// A job that runs until cancelled, to show a cancel reaching every rank.
const LONG_JOB: &str =
    "name = \"long\"\nkind = \"command\"\ncommand = \"sleep\"\nargs = [\"600\"]\n[resources]\nworkers = 2\ncpus = 1\n";

#[derive(Args)]
pub struct DemoArgs {
    /// Where the three coordinators keep their logs; a temporary directory when not given.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

async fn start_node(id: u64, peers: &[(u64, String, String)], root: &std::path::Path) -> Result<Coordinator> {
    let mut config = CoordinatorConfig::new(id, root.join(format!("node-{id}")));
    let (_, raft, api) = peers.iter().find(|(peer, _, _)| *peer == id).expect("node is in peers");
    config.api_listen = api.parse()?;
    config.raft_listen = raft.parse()?;
    config.peers = peers.iter().map(|(peer, raft, _)| (*peer, raft.clone())).collect();
    // Every coordinator serves the MLflow API; they share one artifact store.
    config.tracking_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config.artifact_root = root.join("artifact-store").display().to_string();
    Ok(Coordinator::start(config).await?)
}

async fn wait_for_leader(client: &mut Client, not: Option<u64>) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(status) = client.cluster_status().await
            && status.leader_id != 0
            && Some(status.leader_id) != not
        {
            return Ok(status.leader_id);
        }
        if Instant::now() > deadline {
            bail!("no leader was elected within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits a train job and waits for it (5 minutes at most); it must succeed.
async fn train(client: &mut Client, spec: &str, source: &str) -> Result<pb::Job> {
    let job = client
        .submit(spec, source, &new_idempotency_key())
        .await
        .map_err(output::status_error)?
        .job
        .context("no job returned")?;
    let trained = tokio::time::timeout(Duration::from_secs(300), client.wait_job(job.id))
        .await
        .with_context(|| format!("{source} did not finish training within 300 s"))?
        .map_err(output::status_error)?;
    println!(
        "job {} {}: {}",
        trained.id,
        output::state_label(trained.state),
        trained.message
    );
    if trained.state != pb::JobState::Succeeded as i32 {
        bail!("the training job of {source} did not succeed");
    }
    Ok(trained)
}

/// Sends the first 8 rows of the digits CSV to the served model as one OIP request (JSON tensors, as any
/// HTTP client can) and prints each predicted digit beside the true one.
async fn classify(rest: &str, dataset: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(dataset)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("the digits CSV is empty")?.split(',').collect();
    let label = header
        .iter()
        .position(|name| *name == "digit")
        .context("no digit column")?;
    let (mut pixels, mut truth) = (Vec::new(), Vec::new());
    for line in lines.take(8) {
        let values: Vec<f32> = line.split(',').map(str::parse).collect::<Result<_, _>>()?;
        truth.push(values[label] as i64);
        pixels.extend(
            values
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != label)
                .map(|(_, value)| *value),
        );
    }
    let request = serde_json::json!({
        "inputs": [{ "name": "pixels", "shape": [truth.len(), header.len() - 1], "datatype": "FP32", "data": pixels }],
        "outputs": [{ "name": "label" }],
    });
    let url = format!("http://{rest}/v2/models/digits/infer");
    println!("POST {url} (8 rows of 64 pixels)");
    let answer: serde_json::Value = reqwest::Client::new()
        .post(&url)
        .json(&request)
        .send()
        .await
        .context("the model server did not answer")?
        .error_for_status()?
        .json()
        .await?;
    let predicted: Vec<i64> = answer["outputs"][0]["data"]
        .as_array()
        .context("the answer has no label data")?
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect();
    println!("predicted {predicted:?}\nactual    {truth:?}");
    Ok(())
}

fn step(number: u32, text: &str) {
    println!("\n── {number}. {text}");
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let temporary = tempfile::tempdir().context("creating a temporary directory")?;
    let root = args.data_dir.unwrap_or_else(|| temporary.path().to_path_buf());
    let mut peers = Vec::new();
    for id in 1..=3u64 {
        peers.push((
            id,
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
        ));
    }
    step(1, "start an embedded cluster of three coordinators on loopback");
    let mut nodes = Vec::new();
    for (id, _, _) in &peers {
        nodes.push(Some(start_node(*id, &peers, &root).await?));
    }
    let all: Vec<String> = peers.iter().map(|(_, _, api)| api.clone()).collect();
    let trackers: Vec<String> = nodes
        .iter()
        .flatten()
        .filter_map(|node| node.tracking_addr.map(|address| address.to_string()))
        .collect();
    let tracking = trackers
        .first()
        .cloned()
        .context("no coordinator serves the MLflow API")?;
    let mut client = Client::new(&all.join(","))?;
    let started = Instant::now();
    let leader = wait_for_leader(&mut client, None).await?;
    println!(
        "node {leader} was elected leader in {} ms",
        started.elapsed().as_millis()
    );
    output::print_cluster_status(&client.cluster_status().await?, false, true)?;

    step(
        2,
        "start two workers (2 CPU slots each); they register with the cluster",
    );
    let mut workers = Vec::new();
    for index in 1..=2 {
        let mut config = WorkerConfig::new(all.clone(), root.join(format!("worker-{index}")));
        config.cpus = 2;
        config.kill_grace = Duration::from_secs(2);
        config.artifact_dir = Some(root.join("artifacts"));
        config.tracking = Some(trackers.join(","));
        let mut worker = Worker::start(config).await?;
        let id = tokio::time::timeout(Duration::from_secs(15), worker.registered())
            .await
            .ok()
            .flatten()
            .context("a worker did not register within 15 s")?;
        println!("worker {id} serving logs on {}", worker.address);
        workers.push(worker);
    }
    output::print_workers(&client.list_workers().await?, false)?;

    step(
        3,
        "submit the example jobs, each to a different node (followers forward to the leader)",
    );
    let mut first_key = String::new();
    let mut first_id = 0;
    for (index, (name, text)) in EXAMPLES.iter().enumerate() {
        let mut one = Client::new(&all[index % all.len()])?;
        let key = new_idempotency_key();
        let response = one.submit(text, name, &key).await.map_err(output::status_error)?;
        let job = response.job.context("no job returned")?;
        println!("{name} -> job {} (via node {})", job.id, index % all.len() + 1);
        if index == 0 {
            first_key = key;
            first_id = job.id;
        }
    }

    step(
        4,
        "retry the first submission with its idempotency key: the same job comes back",
    );
    let again = client
        .submit(EXAMPLES[0].1, EXAMPLES[0].0, &first_key)
        .await
        .map_err(output::status_error)?;
    let again_id = again.job.map_or(0, |job| job.id);
    println!("retry -> job {again_id} (created: {})", again.created);
    if again_id != first_id || again.created {
        bail!("a retried submission created a new job");
    }

    step(
        5,
        "submit a malformed spec: refused with the field, line and column, nothing stored",
    );
    let broken = EXAMPLES[0].1.replace("workers = 1", "workers = 0");
    match client.submit(&broken, "broken.toml", &new_idempotency_key()).await {
        Ok(_) => bail!("a malformed spec was accepted"),
        Err(status) => println!("refused: {}", status.message()),
    }

    step(
        6,
        "wait for the jobs; the 2-rank job ran with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set",
    );
    for id in [first_id, first_id + 1] {
        let job = tokio::time::timeout(Duration::from_secs(60), client.wait_job(id))
            .await
            .context("a job did not finish within 60 s")?
            .map_err(output::status_error)?;
        println!("job {id} {}: {}", output::state_label(job.state), job.message);
        if job.state != pb::JobState::Succeeded as i32 {
            bail!("job {id} did not succeed");
        }
    }
    for rank in 0..2 {
        print!("rank {rank} said: ");
        crate::job_logs(&mut client, first_id + 1, rank, None, false).await?;
    }

    step(7, "cancel a running 2-rank job: both process groups are stopped");
    let long = client
        .submit(LONG_JOB, "long.toml", &new_idempotency_key())
        .await
        .map_err(output::status_error)?
        .job
        .context("no job returned")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.get_job(long.id).await?.state != pb::JobState::Running as i32 {
        if Instant::now() > deadline {
            bail!("job {} did not start within 15 s", long.id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
        .cancel_job(long.id, "demo: cancelled by hand")
        .await
        .map_err(output::status_error)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let job = client.get_job(long.id).await?;
        let tasks = job
            .attempts
            .last()
            .map(|attempt| attempt.tasks.clone())
            .unwrap_or_default();
        if tasks.iter().all(|task| task.state != "running") {
            let states: Vec<String> = tasks
                .iter()
                .map(|task| format!("rank {} {}", task.rank, task.state))
                .collect();
            println!(
                "job {} is {}; {}",
                job.id,
                output::state_label(job.state),
                states.join(", ")
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("the ranks of job {} were not stopped within 15 s", long.id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    output::print_jobs(&client.list_jobs(Vec::new(), 0).await?, false)?;

    step(
        8,
        "train the built-in MLP on the UCI digits with 2 ranks: each trains on its shard, gradients are all-reduced",
    );
    let dataset = root.join("digits.csv");
    std::fs::write(&dataset, DIGITS_DATA).context("writing the digits dataset")?;
    let spec = DIGITS_JOB.replace(
        "dataset = \"examples/data/digits.csv\"",
        &format!("dataset = {:?}", dataset.display().to_string()),
    );
    let digits = train(&mut client, &spec, "examples/jobs/digits-mlp.toml").await?;
    for rank in 0..2 {
        let logs = crate::task_logs_text(&mut client, digits.id, rank).await?;
        let summary = logs
            .lines()
            .rfind(|line| line.contains("trained"))
            .unwrap_or("no summary");
        println!("{summary}");
    }

    println!("the run of job {}, and the model it registered:", digits.id);
    crate::runs::run(
        crate::runs::RunsCommand::List {
            experiment: None,
            filter: String::new(),
            limit: 1,
            json: false,
        },
        &tracking,
    )
    .await?;

    step(
        9,
        "define the digits as features, train the same model with 2 ranks from the feature store, register it as the next version, and trace it back",
    );
    let features = root.join("features");
    for (name, text) in DIGITS_FEATURES {
        let path = features.join(name);
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let (_, applied) = crate::features::apply(&mut client, &[features.join("digits.toml")]).await?;
    println!(
        "applied {} feature definitions (entity, source, view, service)",
        applied.len()
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let feature_server = crate::featureserver::start(
        &all.join(","),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        root.join("featurestore"),
        Duration::from_millis(200),
        Some(trackers.join(",")),
        crate::featureserver::DEFAULT_SOURCE_CACHE_MB << 20,
        shutdown.clone(),
    )
    .await?;
    println!("feature server on grpc://{}", feature_server.address);
    // The server follows the definitions; wait until it serves the new view.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut flight = crate::featureserver::connect(&feature_server.address.to_string()).await?;
        let listed: Vec<_> = futures::TryStreamExt::try_collect(flight.list_flights(Vec::<u8>::new()).await?).await?;
        if listed.iter().any(|info| {
            info.flight_descriptor
                .as_ref()
                .is_some_and(|d| d.path.iter().any(|p| p == "digit_pixels"))
        }) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the feature server did not take up the definitions within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spec = DIGITS_FEATURES_JOB.replace(
        "entities=examples/features/data/digits_labels.csv",
        &format!(
            "entities={}&server={}",
            features.join("data/digits_labels.csv").display(),
            feature_server.address
        ),
    );
    train(&mut client, &spec, "examples/jobs/digits-features.toml").await?;
    crate::models::run(
        crate::models::ModelsCommand::Show {
            name: "digits".into(),
            json: false,
        },
        &tracking,
    )
    .await?;
    println!(
        "
where version 2 came from (kiln lineage models:/digits/2 --upstream):"
    );
    crate::lineage::show(&tracking, "models:/digits/2", "upstream", crate::lineage::Format::Text).await?;
    println!(
        "\nthe dashboard, while the demo runs: http://{tracking}/ (this model: http://{tracking}/models/digits; its lineage drawn: http://{tracking}/lineage?id=models%3A%2Fdigits%2F2)"
    );

    step(
        10,
        "deploy version 2 (kiln deploy: 2 replicas on the workers behind the serving router, Open Inference Protocol over REST and gRPC) and classify digits with one request",
    );
    let deployment = "kind = \"deployment\"\nname = \"digits\"\nmodel = \"models:/digits/2\"\ninput_name = \"pixels\"\n\n[replicas]\nmin = 2\nmax = 2\n\n[resources]\ncpus = 1\n";
    println!("{deployment}");
    let deployed = client
        .submit(deployment, "digits-deployment.toml", &new_idempotency_key())
        .await?
        .job
        .context("the coordinator returned no job")?;
    let (rest, _, _router) =
        crate::deployments::start_router(&all.join(","), "127.0.0.1:0", "127.0.0.1:0", shutdown.clone()).await?;
    let started = Instant::now();
    loop {
        let jobs = client.list_jobs(vec![pb::JobState::Running], 0).await?;
        if crate::deployments::table_of(&jobs)
            .get("digits")
            .is_some_and(|ready| ready.len() == 2)
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            crate::deployments::run(
                crate::deployments::DeploymentsCommand::Show {
                    name: "digits".into(),
                    json: false,
                },
                &mut client,
            )
            .await?;
            bail!("the deployment's replicas were not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "2 replicas of digits version 2 ready in {} ms (kiln deployments list):",
        started.elapsed().as_millis()
    );
    crate::deployments::run(
        crate::deployments::DeploymentsCommand::List { json: false },
        &mut client,
    )
    .await?;
    let ready = format!("http://{rest}/v2/models/digits/ready");
    while !reqwest::get(&ready)
        .await
        .is_ok_and(|answer| answer.status().is_success())
    {
        if started.elapsed() > Duration::from_secs(70) {
            bail!("the router did not learn of the deployment");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    classify(&rest.to_string(), &dataset).await?;
    client.cancel_job(deployed.id, "the demo's deployment is done").await?;
    shutdown.cancel();
    // The deployment and its replicas are jobs too, which the failover below must keep.
    let deployment_jobs = client
        .list_jobs(Vec::new(), 0)
        .await?
        .iter()
        .filter(|job| job.kind == "deployment" || job.kind == "serve")
        .count();

    step(
        11,
        "a hyperparameter sweep: TPE searches the Branin function (minimum 0.3979) with 20 command trials (6 random, then modelled), 2 at a time, each logging its value through the MLflow API",
    );
    let mut sweep_jobs = 0;
    let python = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if python {
        let script = root.join("objective.py");
        std::fs::write(&script, BRANIN_SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        let spec = BRANIN_SWEEP
            .replace("max_trials = 30", &format!("max_trials = {SWEEP_TRIALS}"))
            .replace("examples/scripts/objective.py", &script.display().to_string());
        let sweep = client
            .submit(&spec, "examples/sweeps/branin-tpe.toml", &new_idempotency_key())
            .await
            .map_err(output::status_error)?
            .job
            .context("no job returned")?;
        let done = tokio::time::timeout(Duration::from_secs(180), client.wait_job(sweep.id))
            .await
            .context("the sweep did not finish within 180 s")?
            .map_err(output::status_error)?;
        crate::sweeps::run(
            crate::sweeps::SweepsCommand::Show {
                id: sweep.id,
                json: false,
            },
            &mut client,
            &tracking,
        )
        .await?;
        if done.state != pb::JobState::Succeeded as i32 {
            bail!("the sweep {}: {}", output::state_label(done.state), done.message);
        }
        println!(
            "its trials, the value by trial and the parallel coordinates: http://{tracking}/sweeps/{}",
            sweep.id
        );
        sweep_jobs = 1 + SWEEP_TRIALS;
    } else {
        println!("skipped: the trials run python3, which this machine does not have");
    }

    step(
        12,
        "stop the leader; the survivors elect a new one, keep every job, and the workers follow it",
    );
    let index = peers
        .iter()
        .position(|(id, _, _)| *id == leader)
        .expect("leader is a member");
    let stopped_at = Instant::now();
    if let Some(node) = nodes[index].take() {
        node.shutdown().await?;
    }
    let new_leader = wait_for_leader(&mut client, Some(leader)).await?;
    println!(
        "node {new_leader} took over {} ms after node {leader} stopped",
        stopped_at.elapsed().as_millis()
    );
    let jobs = client.list_jobs(Vec::new(), 0).await?;
    println!("{} jobs still present on the new leader's side", jobs.len());
    let expected = EXAMPLES.len() + 3 + sweep_jobs + deployment_jobs;
    if jobs.len() != expected {
        bail!("expected {expected} jobs after failover, found {}", jobs.len());
    }
    let after = client
        .submit(EXAMPLES[0].1, EXAMPLES[0].0, &new_idempotency_key())
        .await
        .map_err(output::status_error)?
        .job
        .context("no job returned")?;
    let job = tokio::time::timeout(Duration::from_secs(30), client.wait_job(after.id))
        .await
        .context("a job submitted after the failover did not finish within 30 s")?
        .map_err(output::status_error)?;
    println!(
        "job {} submitted after the failover: {} on worker {}",
        job.id,
        output::state_label(job.state),
        job.attempts
            .last()
            .and_then(|attempt| attempt.tasks.first())
            .map_or(0, |task| task.worker_id)
    );

    step(13, "restart the stopped node from its data directory; it catches up");
    nodes[index] = Some(start_node(leader, &peers, &root).await?);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = client.cluster_status().await?;
        let caught_up = status.members.iter().all(|member| {
            member
                .health
                .as_ref()
                .is_some_and(|health| health.reachable && health.applied_index >= status.commit_index)
        });
        if caught_up {
            output::print_cluster_status(&status, false, true)?;
            break;
        }
        if Instant::now() > deadline {
            bail!("node {leader} did not catch up within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!(
        "\nsummary: 3 coordinators and 2 workers; {} jobs ran (a 2-rank command job, two 2-rank training runs, one from the feature store, and a sweep of {} trials among them), 2 model versions registered with their lineage and one served over the Open Inference Protocol, 1 retry de-duplicated, 1 bad spec refused, 1 running job cancelled on every rank, leader lost and replaced, nothing lost.",
        EXAMPLES.len() + 3 + sweep_jobs,
        sweep_jobs.saturating_sub(1)
    );
    println!("The MLflow API (runs, models, artifacts, lineage) and the dashboard were served on http://{tracking}/.");
    println!(
        "Next: `kiln up --workers 2` for a cluster that stays up, then `kiln submit examples/jobs/ddp-hello.toml`."
    );
    for worker in workers {
        worker.shutdown().await;
    }
    for node in nodes.into_iter().flatten() {
        node.shutdown().await?;
    }
    Ok(())
}
