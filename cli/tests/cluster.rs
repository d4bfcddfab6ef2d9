//! Real processes: `kiln coordinator` members on loopback, killed with SIGKILL and restarted, checked
//! against the invariants of DESIGN.md through the same client and CLI users have.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_cluster_tests::Cluster;
use kiln_coordinator::client::Client;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const HELLO: &str = include_str!("../../examples/jobs/hello.toml");
const JOBS: usize = 200;
const CLIENTS: usize = 8;

/// Submits with a fixed key until acknowledged: the retry a client makes after a failover.
async fn submit_until_acknowledged(client: &mut Client, key: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.submit(HELLO, "hello.toml", key).await {
            Ok(response) => return response.job.expect("a job").id,
            Err(status) if Instant::now() < deadline => {
                eprintln!("retrying {key}: {}", status.message());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("{key} was never acknowledged: {status}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_mid_load_loses_and_duplicates_nothing() {
    let mut cluster = Cluster::new(Path::new(KILN), 3, &["--snapshot-interval", "50"]).unwrap();
    cluster.start_all().unwrap();
    let leader = cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();

    let (progress_sender, mut progress) = tokio::sync::mpsc::channel::<()>(JOBS);
    let mut clients = tokio::task::JoinSet::new();
    for client_index in 0..CLIENTS {
        let mut client = cluster.client().unwrap();
        let progress_sender = progress_sender.clone();
        clients.spawn(async move {
            let mut acknowledged = Vec::new();
            for job_index in (client_index..JOBS).step_by(CLIENTS) {
                let key = format!("load-{job_index}");
                let id = submit_until_acknowledged(&mut client, &key).await;
                acknowledged.push((key, id));
                let _ = progress_sender.send(()).await;
            }
            acknowledged
        });
    }
    drop(progress_sender);
    // Kill the leader once a third of the jobs are in.
    for _ in 0..JOBS / 3 {
        progress.recv().await.expect("clients are running");
    }
    let commit_before_kill = cluster.status_of(leader).await.expect("leader answers").commit_index;
    cluster.kill(leader).unwrap();
    let killed_at = Instant::now();
    let new_leader = cluster
        .wait_for_leader(Some(leader), Duration::from_secs(10))
        .await
        .unwrap();
    let election = killed_at.elapsed();
    eprintln!("new leader {new_leader} elected {election:?} after the kill");
    assert!(
        election <= Duration::from_secs(2),
        "a new leader took {election:?} to appear"
    );

    let mut acknowledged: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(result) = clients.join_next().await {
        for (key, id) in result.unwrap() {
            assert!(acknowledged.insert(key, id).is_none());
        }
    }
    assert_eq!(acknowledged.len(), JOBS);

    let verify = |jobs: Vec<kiln_proto::Job>| {
        assert_eq!(jobs.len(), JOBS, "every acknowledged job exactly once");
        for job in &jobs {
            assert_eq!(
                acknowledged.get(&job.idempotency_key),
                Some(&job.id),
                "job {} matches its key",
                job.id
            );
        }
    };
    let mut on_new_leader = cluster.client_of(new_leader).unwrap();
    verify(on_new_leader.list_jobs(Vec::new(), 0).await.unwrap());

    // The killed member comes back and catches up, by snapshot since the leader compacted past it.
    cluster.start(leader).unwrap();
    let status = cluster.wait_caught_up(leader, Duration::from_secs(20)).await.unwrap();
    assert!(
        status.snapshot_index > commit_before_kill,
        "member {leader} caught up by snapshot (snapshot at {}, it had {commit_before_kill})",
        status.snapshot_index
    );
    verify(
        cluster
            .client_of(leader)
            .unwrap()
            .list_jobs(Vec::new(), 0)
            .await
            .unwrap(),
    );

    // All three stopped at once and restarted: every job is still there.
    cluster.kill_all().unwrap();
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    verify(cluster.client().unwrap().list_jobs(Vec::new(), 0).await.unwrap());
}

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(output)).expect("--json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_from_one_to_three_transfer_and_remove_through_the_cli() {
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.plan(2, false);
    cluster.plan(3, false);
    cluster.start(1).unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs/hello.toml");
    let id = stdout(&cluster.cli(&["submit", hello.to_str().unwrap()]).unwrap());
    let id: u64 = id.trim().parse().expect("submit prints the job id");

    for new in [2u64, 3] {
        cluster.start(new).unwrap();
        let member = format!("{new}={}", cluster.members[&new].raft_addr);
        stdout(&cluster.cli(&["cluster", "add", &member]).unwrap());
    }
    let status = json(&cluster.cli(&["cluster", "status", "--json"]).unwrap());
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{status:#}");
    assert!(
        members
            .iter()
            .all(|member| member["membership"] == "voter" && member["health"]["reachable"] == true)
    );

    stdout(&cluster.cli(&["cluster", "transfer-leader", "2"]).unwrap());
    let status = json(&cluster.cli(&["cluster", "status", "--json"]).unwrap());
    assert_eq!(status["leader_id"], 2, "{status:#}");

    stdout(&cluster.cli(&["cluster", "remove", "3"]).unwrap());
    cluster.kill(3).unwrap();
    let members = json(&cluster.cli(&["cluster", "members", "--json"]).unwrap());
    let ids: Vec<u64> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|member| member["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2]);

    // The two that remain still commit, and the new members hold the job submitted before they joined.
    let second = stdout(&cluster.cli(&["submit", hello.to_str().unwrap()]).unwrap());
    assert_eq!(second.trim().parse::<u64>().unwrap(), id + 1);
    let jobs = cluster.client_of(2).unwrap().list_jobs(Vec::new(), 0).await.unwrap();
    assert_eq!(jobs.iter().map(|job| job.id).collect::<Vec<_>>(), [id, id + 1]);

    // Bad membership requests are refused with a reason and change nothing.
    let output = cluster.cli(&["cluster", "remove", "9"]).unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("node 9 is not a member"));
    let output = cluster.cli(&["cluster", "add", "4=nowhere"]).unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("HOST:PORT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refuses_bad_specs_and_manages_jobs() {
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();

    let bad = directory.path().join("bad.toml");
    std::fs::write(&bad, HELLO.replace("cpus = 1", "cpus = 0")).unwrap();
    let output = cluster.cli(&["submit", bad.to_str().unwrap()]).unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("bad.toml:10:8") && error.contains("resources.cpus"),
        "{error}"
    );

    let typo = directory.path().join("typo.toml");
    std::fs::write(&typo, HELLO.replace("max_restarts", "max_restart")).unwrap();
    let error = String::from_utf8_lossy(&cluster.cli(&["submit", typo.to_str().unwrap()]).unwrap().stderr).to_string();
    assert!(error.contains("max_restart") && error.contains(":6:1"), "{error}");
    assert_eq!(
        json(&cluster.cli(&["jobs", "list", "--json"]).unwrap()),
        serde_json::json!([]),
        "nothing stored"
    );

    let good = directory.path().join("good.toml");
    std::fs::write(&good, HELLO).unwrap();
    let submitted = json(
        &cluster
            .cli(&["submit", good.to_str().unwrap(), "--json", "--idempotency-key", "k1"])
            .unwrap(),
    );
    assert_eq!(submitted["created"], true);
    let again = json(
        &cluster
            .cli(&["submit", good.to_str().unwrap(), "--json", "--idempotency-key", "k1"])
            .unwrap(),
    );
    assert_eq!(
        (again["id"].clone(), again["created"].clone()),
        (submitted["id"].clone(), false.into())
    );

    let id = submitted["id"].to_string();
    // A watcher sees the job as it is now, then each change as it is applied.
    let mut watch = cluster
        .client()
        .unwrap()
        .watch_jobs(vec![submitted["id"].as_u64().unwrap()])
        .await
        .unwrap();
    let first = watch.message().await.unwrap().unwrap().job.unwrap();
    assert_eq!(first.state, kiln_proto::JobState::Queued as i32);
    let shown = json(&cluster.cli(&["jobs", "show", &id, "--json"]).unwrap());
    assert_eq!(
        (shown["name"].as_str(), shown["state"].as_str()),
        (Some("hello"), Some("queued"))
    );
    assert_eq!(shown["spec"]["resources"]["memory_bytes"], 64 << 20);
    assert!(stdout(&cluster.cli(&["jobs", "cancel", &id]).unwrap()).contains("cancelled"));
    let change = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let changed = change.job.unwrap();
    assert_eq!(
        (changed.state, changed.message.as_str()),
        (kiln_proto::JobState::Cancelled as i32, "cancelled by user")
    );
    assert!(change.index > 0, "events carry the log index that produced them");
    let listed = json(
        &cluster
            .cli(&["jobs", "list", "--json", "--state", "cancelled"])
            .unwrap(),
    );
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let output = cluster.cli(&["jobs", "show", "999"]).unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("job 999 does not exist"));
    let output = cluster.cli(&["jobs", "list", "--state", "sleeping"]).unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("'sleeping' is not a job state"));
}

#[test]
fn demo_runs_end_to_end() {
    let directory = tempfile::tempdir().unwrap();
    let out = directory.path().join("demo.out");
    let mut demo = std::process::Command::new(KILN)
        .arg("demo")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = demo.kill();
            let _ = demo.wait();
            panic!(
                "the demo did not finish within 120 s:\n{}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("nothing lost"), "{text}");
    // The sweep step ran its trials and named the best one.
    assert!(text.contains("best of 20 trials"), "{text}");
    // The serving step deployed the registered model on the workers and classified the first digits
    // through the router, over the protocol.
    assert!(text.contains("2 replicas of digits version 2 ready"), "{text}");
    assert!(text.contains("actual    [0, 1, 2, 3, 4, 5, 6, 7]"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_single_node_cluster_that_survives_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", kiln_cluster_tests::free_port());
    let raft = format!("127.0.0.1:{}", kiln_cluster_tests::free_port());
    let data = directory.path().join("data");
    let start = || {
        std::process::Command::new(KILN)
            .args([
                "up",
                "--listen",
                &api,
                "--raft-listen",
                &raft,
                "--featurestore-listen",
                "127.0.0.1:0",
                "--tracking-listen",
                "127.0.0.1:0",
                "--serving-http-listen",
                "127.0.0.1:0",
                "--serving-grpc-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs/hello.toml");
    let cli = |args: &[&str]| {
        std::process::Command::new(KILN)
            .args(args)
            .args(["--coordinator", &api])
            .output()
            .unwrap()
    };
    let mut up = start();
    let id = stdout(&cli(&["submit", hello.to_str().unwrap()]));
    up.kill().unwrap();
    up.wait().unwrap();
    let mut up = start();
    let jobs = json(&cli(&["jobs", "list", "--json"]));
    up.kill().unwrap();
    up.wait().unwrap();
    assert_eq!(jobs[0]["id"].to_string(), id.trim(), "{jobs:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ports_answer_grpc_health_checks() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let member = &cluster.members[&1];
    let checks = [
        (&member.api_addr, "kiln.v1.JobService"),
        (&member.api_addr, "kiln.v1.ClusterService"),
        (&member.api_addr, ""),
        (&member.raft_addr, "kiln.v1.RaftPeer"),
    ];
    for (addr, service) in checks {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = HealthCheckRequest {
            service: service.to_string(),
        };
        let status = HealthClient::new(channel)
            .check(request)
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?} on {addr}");
    }
}
