//! A real network partition: three coordinators in a network namespace this test creates, the leader cut
//! off from its peers by firewall rules inside that namespace. The isolated minority cannot commit (or
//! serve a current read); the majority elects a leader and goes on; after healing, all three agree.
//!
//! Needs root and iproute2/iptables (as CI on the project's machine has). Elsewhere it says why and
//! passes without running, rather than touching the host's network.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/jobs/hello.toml");

struct Namespace {
    name: String,
}

impl Namespace {
    fn create() -> Result<Namespace, String> {
        let name = format!("kiln-partition-{}", std::process::id());
        let run = |args: &[&str]| -> Result<(), String> {
            let output = Command::new("ip")
                .args(args)
                .output()
                .map_err(|error| format!("ip: {error}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
            }
        };
        run(&["netns", "add", &name])?;
        let namespace = Namespace { name };
        run(&["netns", "exec", &namespace.name, "ip", "link", "set", "lo", "up"])?;
        let probe = namespace.command("iptables").args(["-L", "INPUT"]).output();
        match probe {
            Ok(output) if output.status.success() => Ok(namespace),
            _ => Err("iptables does not work in the namespace".into()),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    fn iptables(&self, args: &[&str]) {
        let output = self.command("iptables").args(args).output().unwrap();
        assert!(
            output.status.success(),
            "iptables {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn kiln(&self, coordinator: &str, args: &[&str]) -> Output {
        self.command(KILN)
            .args(args)
            .args(["--coordinator", coordinator])
            .output()
            .unwrap()
    }
}

/// The coordinator processes, killed when the test ends however it ends.
struct Members(Vec<Child>);

impl Drop for Members {
    fn drop(&mut self) {
        for member in &mut self.0 {
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

/// Prints the members' logs when the test fails.
struct LogsOnFailure(std::path::PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in 1..=3 {
                let log = std::fs::read_to_string(self.0.join(format!("node-{id}.log"))).unwrap_or_default();
                eprintln!("---- node {id} ----\n{log}");
            }
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn api(id: u64) -> String {
    format!("127.0.0.{id}:7070")
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("--json prints JSON")
}

fn job_names_and_ids(namespace: &Namespace, coordinator: &str) -> Vec<(u64, String)> {
    let jobs = json(&namespace.kiln(coordinator, &["jobs", "list", "--json", "--timeout", "5"]));
    let jobs = jobs.as_array().unwrap().iter();
    jobs.map(|job| {
        (
            job["id"].as_u64().unwrap(),
            job["idempotency_key"].as_str().unwrap().to_string(),
        )
    })
    .collect()
}

fn submit(namespace: &Namespace, coordinator: &str, key: &str, timeout: &str) -> Output {
    namespace.kiln(
        coordinator,
        &["submit", HELLO, "--idempotency-key", key, "--timeout", timeout],
    )
}

#[test]
fn isolated_leader_cannot_commit_majority_goes_on_and_all_agree_after_healing() {
    let namespace = match Namespace::create() {
        Ok(namespace) => namespace,
        Err(reason) => {
            eprintln!("not run: this test needs root with `ip netns` and iptables ({reason})");
            return;
        }
    };
    let directory = tempfile::tempdir().unwrap();
    let _logs = LogsOnFailure(directory.path().to_path_buf());
    let peers = "1=127.0.0.1:7071,2=127.0.0.2:7071,3=127.0.0.3:7071";
    let _members = Members(
        (1..=3u64)
            .map(|id| {
                namespace
                    .command(KILN)
                    .args([
                        "coordinator",
                        "--id",
                        &id.to_string(),
                        "--peers",
                        peers,
                        "--listen",
                        &api(id),
                    ])
                    .args(["--request-timeout", "2", "--data-dir"])
                    .arg(directory.path().join(format!("node-{id}")))
                    .env("KILN_LOG", "info,raft=info")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(directory.path().join(format!("node-{id}.log"))).unwrap())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let all = format!("{},{},{}", api(1), api(2), api(3));
    let leader_of = |coordinator: &str| -> u64 {
        let status = json(&namespace.kiln(coordinator, &["cluster", "status", "--json", "--timeout", "5"]));
        status["leader_id"].as_u64().unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let leader = loop {
        let leader = leader_of(&all);
        if leader != 0 {
            break leader;
        }
        assert!(Instant::now() < deadline, "no leader elected");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(submit(&namespace, &all, "before", "10").status.success());

    // Cut the leader's Raft traffic both ways; clients can still reach every member.
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for other in &others {
        let (leader_ip, other_ip) = (format!("127.0.0.{leader}"), format!("127.0.0.{other}"));
        namespace.iptables(&[
            "-A", "INPUT", "-s", &leader_ip, "-d", &other_ip, "-p", "tcp", "--dport", "7071", "-j", "DROP",
        ]);
        namespace.iptables(&[
            "-A", "INPUT", "-s", &other_ip, "-d", &leader_ip, "-p", "tcp", "--dport", "7071", "-j", "DROP",
        ]);
    }

    // The isolated old leader takes the write but can never commit it; its client hears a failure.
    let minority = submit(&namespace, &api(leader), "in-minority", "4");
    assert!(!minority.status.success(), "the isolated member acknowledged a write");
    // Nor can it serve a current read.
    let read = namespace.kiln(&api(leader), &["jobs", "list", "--timeout", "3"]);
    assert!(
        !read.status.success(),
        "the isolated member served a read it cannot confirm"
    );

    // The majority elects a leader among themselves and commits.
    let majority = format!("{},{}", api(others[0]), api(others[1]));
    let output = submit(&namespace, &majority, "in-majority", "15");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let new_leader = leader_of(&majority);
    assert!(others.contains(&new_leader), "leader {new_leader} is in the majority");
    let expected = vec![(1, "before".to_string()), (2, "in-majority".to_string())];
    assert_eq!(job_names_and_ids(&namespace, &majority), expected);

    // Heal: everyone converges on the majority's history; the minority's write is gone.
    namespace.iptables(&["-F", "INPUT"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let views: Vec<Vec<(u64, String)>> = (1..=3).map(|id| job_names_and_ids(&namespace, &api(id))).collect();
        if views.iter().all(|view| *view == expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members still disagree after healing: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
