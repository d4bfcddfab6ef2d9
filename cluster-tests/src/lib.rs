//! A harness for tests that run real `kiln coordinator` processes on loopback: start a cluster on free
//! ports, SIGKILL or restart members, grow it, and wait for conditions with deadlines.
//!
//! The tests themselves live beside the binary (`cli/tests/`), where Cargo hands them its path;
//! they pass it to [`Cluster::new`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_coordinator::client::Client;
use kiln_proto as pb;

/// A port nobody listens on right now (the kernel picks it; released before use).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    // A port below Linux's ephemeral range (32768 and up), so no outgoing connection of the many the tests
    // make can take it between this check and the child's bind (port 0 hands out ephemeral ports, and
    // a test once lost one that way), and below workers' default task ports (29500-29999, from which the
    // leader picks MASTER_PORT: a coordinator on one of them fails the rank that gets it). Each process
    // starts somewhere random and walks on, so parallel test processes rarely try the same ones.
    const FIRST: u64 = 20_000;
    const SPAN: u64 = 9_500;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        u64::from(std::process::id()).wrapping_mul(0x9E37_79B9)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.subsec_nanos().into())
    });
    // 7,919 is prime and does not divide SPAN, so the walk visits every port of the span once.
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (seed.wrapping_add(step.wrapping_mul(7_919))) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

pub struct Member {
    pub id: u64,
    pub api_addr: String,
    pub raft_addr: String,
    /// Where the member serves the MLflow tracking API when the cluster's `tracking` is set.
    pub tracking_addr: String,
    child: Option<Child>,
    /// Founding members start with `--peers`; later ones with `--join`.
    founding: bool,
}

/// A `kiln worker` process, named by its index in the test (the cluster assigns its worker id).
pub struct WorkerProcess {
    pub cpus: u32,
    child: Option<Child>,
    pub extra_args: Vec<String>,
}

pub struct Cluster {
    binary: PathBuf,
    directory: tempfile::TempDir,
    pub members: BTreeMap<u64, Member>,
    pub workers: BTreeMap<u32, WorkerProcess>,
    /// Extra flags for every coordinator (for example `--snapshot-interval 50`).
    pub extra_args: Vec<String>,
    /// Every coordinator serves the MLflow tracking API on its `tracking_addr`.
    pub tracking: bool,
    /// With `tracking`, where the coordinators keep artifacts (default: one directory they share).
    pub artifact_root: Option<String>,
    /// Extra environment for every coordinator (an object store's credentials, say).
    pub env: Vec<(String, String)>,
}

impl Cluster {
    /// Plans `founders` members (ids 1..=founders) without starting them.
    pub fn new(binary: &Path, founders: u64, extra_args: &[&str]) -> Result<Cluster> {
        let mut cluster = Cluster {
            binary: binary.to_path_buf(),
            directory: tempfile::tempdir()?,
            members: BTreeMap::new(),
            workers: BTreeMap::new(),
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            tracking: false,
            artifact_root: None,
            env: Vec::new(),
        };
        for id in 1..=founders {
            cluster.plan(id, true);
        }
        Ok(cluster)
    }

    /// Reserves addresses for a member; `founding: false` makes it start with `--join`.
    pub fn plan(&mut self, id: u64, founding: bool) {
        let member = Member {
            id,
            api_addr: format!("127.0.0.1:{}", free_port()),
            raft_addr: format!("127.0.0.1:{}", free_port()),
            tracking_addr: format!("127.0.0.1:{}", free_port()),
            child: None,
            founding,
        };
        self.members.insert(id, member);
    }

    /// Every member's MLflow tracking API, comma-separated, when the cluster serves one.
    pub fn tracking_addresses(&self) -> Option<String> {
        self.tracking.then(|| {
            let addresses: Vec<&str> = self
                .members
                .values()
                .map(|member| member.tracking_addr.as_str())
                .collect();
            addresses.join(",")
        })
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.directory.path().join(format!("node-{id}"))
    }

    fn peers_flag(&self) -> String {
        let founders: Vec<String> = self
            .members
            .values()
            .filter(|member| member.founding)
            .map(|member| format!("{}={}", member.id, member.raft_addr))
            .collect();
        founders.join(",")
    }

    pub fn start(&mut self, id: u64) -> Result<()> {
        let peers = self.peers_flag();
        let data_dir = self.data_dir(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.directory.path().join(format!("node-{id}.log")))?;
        let member = self.members.get_mut(&id).context("unknown member")?;
        if member.child.is_some() {
            bail!("member {id} is already running");
        }
        let mut command = Command::new(&self.binary);
        command
            .arg("coordinator")
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                &member.api_addr,
                "--raft-listen",
                &member.raft_addr,
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&self.extra_args)
            .env("KILN_LOG", "info,raft=info")
            .stdout(Stdio::null())
            .stderr(log);
        if self.tracking {
            // One artifact root for every coordinator, as a real cluster shares S3 or a mounted directory.
            let root = self
                .artifact_root
                .clone()
                .unwrap_or_else(|| self.directory.path().join("artifacts").display().to_string());
            command
                .args(["--tracking-listen", &member.tracking_addr])
                .args(["--artifact-root", &root]);
        }
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        if member.founding {
            command.args(["--peers", &peers]);
        } else {
            command.arg("--join");
        }
        member.child = Some(
            command
                .spawn()
                .with_context(|| format!("starting {}", self.binary.display()))?,
        );
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        for id in ids {
            self.start(id)?;
        }
        Ok(())
    }

    /// SIGKILL: no goodbye, no flush beyond what was already fsynced.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let member = self.members.get_mut(&id).context("unknown member")?;
        if let Some(mut child) = member.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn kill_all(&mut self) -> Result<()> {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        for id in ids {
            self.kill(id)?;
        }
        Ok(())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.members.get(&id).is_some_and(|member| member.child.is_some())
    }

    pub fn worker_data_dir(&self, index: u32) -> PathBuf {
        self.directory.path().join(format!("worker-{index}"))
    }

    /// Where a worker's or member's log goes (`node-ID.log`, `worker-INDEX.log`).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.directory.path().join(format!("{name}.log"))
    }

    /// Starts (or restarts, with the same data directory) worker `index` offering `cpus` slots, pointed at
    /// every planned coordinator.
    pub fn start_worker(&mut self, index: u32, cpus: u32, extra_args: &[&str]) -> Result<()> {
        let coordinators: Vec<&str> = self.members.values().map(|member| member.api_addr.as_str()).collect();
        let coordinators = coordinators.join(",");
        let data_dir = self.worker_data_dir(index);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&format!("worker-{index}")))?;
        if self.workers.get(&index).is_some_and(|worker| worker.child.is_some()) {
            bail!("worker {index} is already running");
        }
        let mut command = Command::new(&self.binary);
        command
            .arg("worker")
            .args(["--coordinator", &coordinators, "--cpus", &cpus.to_string()]);
        if let Some(tracking) = self.tracking_addresses() {
            command.args(["--tracking", &tracking]);
        }
        let child = command
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--kill-grace", "2"])
            .args(extra_args)
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.workers.insert(
            index,
            WorkerProcess {
                cpus,
                child: Some(child),
                extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            },
        );
        Ok(())
    }

    /// SIGKILL a worker. The tasks it started keep running as orphans until their own end or the next
    /// start of this worker, as after a real crash.
    pub fn kill_worker(&mut self, index: u32) -> Result<()> {
        if let Some(mut child) = self.workers.get_mut(&index).and_then(|worker| worker.child.take()) {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Sends a signal to worker `index` (SIGSTOP to freeze it, SIGCONT to let it go on).
    pub fn signal_worker(&self, index: u32, signal: rustix::process::Signal) -> Result<()> {
        let child = self
            .workers
            .get(&index)
            .and_then(|worker| worker.child.as_ref())
            .context("worker is not running")?;
        let pid = rustix::process::Pid::from_raw(child.id() as i32).context("a worker has a pid")?;
        rustix::process::kill_process(pid, signal)?;
        Ok(())
    }

    /// Waits until `count` workers are registered and alive.
    pub async fn wait_for_workers(&self, count: usize, timeout: Duration) -> Result<Vec<pb::WorkerInfo>> {
        let deadline = Instant::now() + timeout;
        let mut client = self.client()?;
        client.retry_deadline = Duration::from_secs(2);
        loop {
            if let Ok(workers) = client.list_workers().await {
                let alive: Vec<pb::WorkerInfo> = workers.into_iter().filter(|worker| worker.state == "alive").collect();
                if alive.len() >= count {
                    return Ok(alive);
                }
            }
            if Instant::now() > deadline {
                bail!("{count} workers did not register within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Client addresses of the running members, comma-separated.
    pub fn addresses(&self) -> String {
        let running: Vec<&str> = self
            .members
            .values()
            .filter(|member| member.child.is_some())
            .map(|member| member.api_addr.as_str())
            .collect();
        running.join(",")
    }

    pub fn client(&self) -> Result<Client> {
        Ok(Client::new(&self.addresses())?)
    }

    pub fn client_of(&self, id: u64) -> Result<Client> {
        let mut client = Client::new(&self.members[&id].api_addr)?;
        client.retry_deadline = Duration::from_secs(2);
        Ok(client)
    }

    /// Runs the `kiln` CLI against the running members.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(&self.binary)
            .args(args)
            .env("KILN_COORDINATOR", self.addresses())
            .output()?)
    }

    /// The status as member `id` sees it, if it answers.
    pub async fn status_of(&self, id: u64) -> Option<pb::ClusterStatus> {
        let mut client = self.client_of(id).ok()?;
        client.retry_deadline = Duration::from_millis(300);
        client.cluster_status().await.ok()
    }

    /// Waits until a running member reports a leader other than `not`; returns it.
    pub async fn wait_for_leader(&self, not: Option<u64>, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            for (id, member) in &self.members {
                if member.child.is_none() {
                    continue;
                }
                if let Some(status) = self.status_of(*id).await
                    && status.leader_id != 0
                    && Some(status.leader_id) != not
                    && self.is_running(status.leader_id)
                {
                    return Ok(status.leader_id);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no leader within {timeout:?}; logs in {}",
                    self.directory.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until member `id` has applied everything the leader committed.
    pub async fn wait_caught_up(&self, id: u64, timeout: Duration) -> Result<pb::ClusterStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self.wait_for_leader(None, timeout).await?;
            if let (Some(leader_status), Some(status)) = (self.status_of(leader).await, self.status_of(id).await)
                && status.applied_index >= leader_status.commit_index
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("member {id} did not catch up within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first so the worker stops its tasks; SIGKILL if it lingers.
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Workers first, while the coordinators still answer, so they stop their tasks.
        self.workers.clear();
        let _ = self.kill_all();
        // A failing test keeps the members' data and logs for reading.
        if std::thread::panicking()
            && let Ok(empty) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.directory, empty).keep();
            eprintln!("cluster logs and data kept in {}", kept.display());
        }
    }
}

/// The Python interpreter of the virtual environment `.ci/run` prepares with the stock clients the tests
/// drive (pyarrow, adbc-driver-flightsql, mlflow-skinny, moto). `None` outside CI when `KILN_PYTHON` is
/// unset, so a developer's `cargo test` skips those tests; under CI its absence fails the test.
pub fn stock_python() -> Option<String> {
    match std::env::var("KILN_PYTHON") {
        Ok(python) if !python.is_empty() => Some(python),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "KILN_PYTHON is not set; .ci/run sets it to its virtual environment's python"
            );
            eprintln!("skipped: KILN_PYTHON is not set (.ci/run sets it)");
            None
        }
    }
}

/// Headless Chromium for the dashboard tests: `KILN_CHROMIUM`, else `chromium` on the PATH (Debian's,
/// which `.ci/run` installs). `None` outside CI when neither is there, so a developer's `cargo test` skips
/// those tests; under CI its absence fails the test.
pub fn chromium() -> Option<String> {
    if let Ok(path) = std::env::var("KILN_CHROMIUM")
        && !path.is_empty()
    {
        return Some(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|directory| directory.join("chromium"))
            .find(|candidate| candidate.is_file())
    });
    match found {
        Some(path) => Some(path.display().to_string()),
        None => {
            assert!(
                std::env::var("CI").is_err(),
                "no chromium: .ci/run installs Debian's chromium (or set KILN_CHROMIUM)"
            );
            eprintln!("skipped: no chromium on the PATH and KILN_CHROMIUM is not set");
            None
        }
    }
}

/// Loads `url` in headless Chromium; the DOM it ends with, and what the page wrote to the console (each
/// line Chromium logs as `CONSOLE`).
pub fn load_page(chromium: &str, url: &str) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=3000", "--dump-dom", url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chromium could not load {url}: {stderr}");
    let console = stderr
        .lines()
        .filter(|line| line.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    (String::from_utf8_lossy(&output.stdout).into_owned(), console)
}

/// One HTTP/1.1 request to `address` (a JSON body, or none); the status and the JSON body (null when the
/// body is not JSON).
pub fn http_json(address: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, text) = http_text(address, method, path, body);
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

/// One HTTP/1.1 request with a JSON body (empty for none); the status and the body as text.
pub fn http_text(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let text = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, text.to_string())
}

/// An S3-compatible server on loopback for the object-store tests: moto's, from the `.ci/run` virtual
/// environment, stopped (by its process id) when dropped.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
}

impl S3Server {
    pub fn start(python: &str) -> S3Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let child = Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "moto's S3 server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server { child, endpoint }
    }

    /// Creates `bucket` and uploads `file` as `key`, with boto3 (installed with moto).
    pub fn upload(&self, python: &str, bucket: &str, key: &str, file: &Path) {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\ns3.create_bucket(Bucket='{bucket}')\ns3.upload_file(r'{}', '{bucket}', '{key}')\n",
            self.endpoint,
            file.display()
        );
        let output = Command::new(python).args(["-c", &script]).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }

    /// Creates an empty `bucket`, with boto3.
    pub fn create_bucket(&self, python: &str, bucket: &str) {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\ns3.create_bucket(Bucket='{bucket}')\n",
            self.endpoint
        );
        let output = Command::new(python).args(["-c", &script]).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }

    /// `object_store`'s standard S3 environment, pointed at this server.
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
