//! `kiln demo`: the whole flow this build supports, end to end, on an embedded three-node cluster.
//!
//! Later issues extend it (workers run the jobs, features, training, serving). Today it shows the spine:
//! a replicated coordinator that accepts jobs on any node, refuses bad specs, de-duplicates retries, and
//! keeps every acknowledged job through the loss of its leader.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use kiln_coordinator::client::{Client, new_idempotency_key};
use kiln_coordinator::{Coordinator, CoordinatorConfig};

use crate::output;

const EXAMPLES: [(&str, &str); 3] = [
    (
        "examples/jobs/hello.toml",
        include_str!("../../examples/jobs/hello.toml"),
    ),
    (
        "examples/jobs/ddp-hello.toml",
        include_str!("../../examples/jobs/ddp-hello.toml"),
    ),
    (
        "examples/jobs/digits-mlp.toml",
        include_str!("../../examples/jobs/digits-mlp.toml"),
    ),
];

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
        3,
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
        4,
        "submit a malformed spec: refused with the field, line and column, nothing stored",
    );
    let broken = EXAMPLES[0].1.replace("workers = 1", "workers = 0");
    match client.submit(&broken, "broken.toml", &new_idempotency_key()).await {
        Ok(_) => bail!("a malformed spec was accepted"),
        Err(status) => println!("refused: {}", status.message()),
    }

    step(5, "cancel the training job (no workers exist yet to run it)");
    let cancelled = client
        .cancel_job(first_id + 2, "demo: cancelled by hand")
        .await
        .map_err(output::status_error)?;
    println!("job {} is {}", cancelled.id, output::state_label(cancelled.state));
    output::print_jobs(&client.list_jobs(Vec::new(), 0).await?, false)?;

    step(
        6,
        "stop the leader; the survivors elect a new one and keep every acknowledged job",
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
    if jobs.len() != EXAMPLES.len() {
        bail!("expected {} jobs after failover, found {}", EXAMPLES.len(), jobs.len());
    }

    step(7, "restart the stopped node from its data directory; it catches up");
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
        "\nsummary: 3 coordinators, {} jobs submitted, 1 retry de-duplicated, 1 bad spec refused, leader lost and replaced, nothing lost.",
        EXAMPLES.len()
    );
    println!("Next: `kiln up` for a cluster that stays up, then `kiln submit examples/jobs/hello.toml`.");
    for node in nodes.into_iter().flatten() {
        node.shutdown().await?;
    }
    Ok(())
}
