//! The agent: registration, the session with the leader, heartbeats and reports.
//!
//! Lifecycle: `register` (any coordinator; retried) → `session` with the leader (found by trying each
//! coordinator: only the ready leader accepts) → on a broken stream, back to `session` with tasks still
//! running → on "register again" (declared lost), stop every task and go back to `register`.
//!
//! A standby assignment (`AssignTask.after`) waits here until the task it names exits, and starts the moment
//! that exit is seen, before the exit is even reported: the cluster has already committed that it takes the
//! slot. Stopping every task (a new registration, the fence, shutdown) drops what stands by first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kiln_proto as pb;
use pb::worker_service_client::WorkerServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::executor::{Executor, Key};
use crate::logs::LogServer;
use crate::{WorkerConfig, WorkerError, gpu, total_memory_bytes};

/// Exits waiting to be reported; a task's waiter pauses when this is full.
const EXIT_QUEUE: usize = 1024;
/// Messages queued towards the leader; beyond this the session is dropped and started again.
const OUTBOUND_QUEUE: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Heartbeats go out at this fraction of the lease, so two can be lost without the lease running out.
const HEARTBEATS_PER_LEASE: u32 = 5;
/// A worker cut off this long (in fifths of the lease) stops its tasks: well after a leader failover
/// (about a second), well before the leader declares the worker lost (the whole lease).
const FENCE_FIFTHS_OF_LEASE: u32 = 3;
/// How long opening a session with one coordinator may take; short against the lease, so a dead
/// coordinator tried first leaves time to find the leader.
const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// A running worker. It stops when its shutdown token is cancelled; [`Worker::wait`] returns then.
pub struct Worker {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    registered: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("address", &self.address).finish()
    }
}

enum SessionEnd {
    /// The stream broke or no leader answered: try again, tasks keep running.
    Lost,
    /// The cluster no longer counts this worker as alive.
    Reregister(String),
    Shutdown,
}

fn load_or_create_uid(data_dir: &Path) -> Result<String, WorkerError> {
    let path = data_dir.join("worker-uid");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(WorkerError::Storage(format!("reading {}: {error}", path.display()))),
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let uid = format!("w-{:x}-{nanos:x}", std::process::id());
    let temporary = data_dir.join("worker-uid.tmp");
    std::fs::write(&temporary, &uid)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|error| WorkerError::Storage(format!("writing {}: {error}", path.display())))?;
    Ok(uid)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

struct Agent {
    config: WorkerConfig,
    uid: String,
    address: String,
    host: String,
    gpus: u32,
    memory_bytes: u64,
    channels: Vec<(String, Channel)>,
    /// The coordinator that last accepted a session; tried first.
    preferred: usize,
    executor: Executor,
    exits: mpsc::Receiver<(Key, pb::task_report::Outcome)>,
    /// Reports not yet acknowledged by the leader, repeated in every heartbeat.
    unacknowledged: BTreeMap<Key, pb::TaskReport>,
    /// Standby assignments, by the running task each waits for.
    standby: BTreeMap<Key, pb::AssignTask>,
    worker_id: u64,
    heartbeat: Duration,
    /// See [`Agent::check_fence`].
    fence: Duration,
    last_contact: std::time::Instant,
    /// Tasks were stopped for lack of contact; not again until contact returns.
    fenced: bool,
    /// Wait before looking for the leader again; reset whenever a session opens.
    session_backoff: Duration,
    shutdown: CancellationToken,
    registered: tokio::sync::watch::Sender<u64>,
}

impl Worker {
    /// Binds the log server, then registers and runs in the background. Fails at once on a bad
    /// configuration or data directory; a cluster that is not up yet is waited for.
    pub async fn start(config: WorkerConfig) -> Result<Worker, WorkerError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|error| {
            WorkerError::Storage(format!(
                "creating data directory {}: {error}",
                config.data_dir.display()
            ))
        })?;
        let uid = load_or_create_uid(&config.data_dir)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|error| WorkerError::InvalidArgument(format!("cannot listen on {}: {error}", config.listen)))?;
        let bound = listener
            .local_addr()
            .map_err(|error| WorkerError::InvalidArgument(error.to_string()))?;
        let host = config.advertise_host.clone().unwrap_or_else(|| bound.ip().to_string());
        let address = format!("{host}:{}", bound.port());
        let shutdown = CancellationToken::new();
        let (exit_sender, exits) = mpsc::channel(EXIT_QUEUE);
        let gpus = config.gpus.unwrap_or_else(gpu::detect_gpus);
        let executor = Executor::new(
            config.data_dir.clone(),
            gpus,
            config.kill_grace,
            exit_sender,
            config.coordinators.join(","),
            host.clone(),
            config
                .artifact_dir
                .clone()
                .unwrap_or_else(|| config.data_dir.join("artifacts")),
        );
        let mut executor = executor;
        executor.tracking = config.tracking.clone();
        executor.featurestore = config.featurestore.clone();
        executor.kill_leftovers();
        executor.keep_ended_tasks(config.keep_tasks);
        let logs = LogServer {
            data_dir: config.data_dir.clone(),
            running: executor.running_set(),
            shutdown: shutdown.clone(),
        };
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let server_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(pb::worker_agent_server::WorkerAgentServer::new(logs))
                .serve_with_incoming_shutdown(incoming, server_shutdown.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the worker's log server stopped");
            }
        });
        let mut channels = Vec::new();
        for coordinator in &config.coordinators {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{coordinator}"))
                .map_err(|error| WorkerError::InvalidArgument(format!("coordinator '{coordinator}': {error}")))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2))
                .connect_lazy();
            channels.push((coordinator.clone(), channel));
        }
        let memory_bytes = config.memory_bytes.unwrap_or_else(total_memory_bytes);
        let (registered, registered_receiver) = tokio::sync::watch::channel(0);
        let agent = Agent {
            config,
            uid,
            address,
            host,
            gpus,
            memory_bytes,
            channels,
            preferred: 0,
            executor,
            exits,
            unacknowledged: BTreeMap::new(),
            standby: BTreeMap::new(),
            worker_id: 0,
            heartbeat: Duration::from_secs(1),
            fence: Duration::from_secs(3),
            last_contact: std::time::Instant::now(),
            fenced: false,
            session_backoff: BACKOFF_MIN,
            shutdown: shutdown.clone(),
            registered,
        };
        let task = tokio::spawn(agent.run());
        Ok(Worker {
            address: bound,
            shutdown,
            task,
            registered: registered_receiver,
        })
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The id the cluster gave this worker, once it has registered.
    pub async fn registered(&mut self) -> Option<u64> {
        self.registered.wait_for(|id| *id != 0).await.ok().map(|id| *id)
    }

    /// Runs until the shutdown token is cancelled; running tasks are stopped first.
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

fn is_permanent(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument | Code::PermissionDenied | Code::Unimplemented
    )
}

impl Agent {
    async fn run(mut self) {
        'register: loop {
            match self.register().await {
                Ok(Some(())) => self.session_backoff = BACKOFF_MIN,
                Ok(None) => break 'register,
                Err(error) => {
                    tracing::error!(%error, "the cluster refused this worker; stopping");
                    self.shutdown.cancel();
                    break 'register;
                }
            }
            loop {
                match self.session().await {
                    SessionEnd::Lost => {
                        // The coordinator tried first did not lead: start with the next one next time.
                        self.preferred = (self.preferred + 1) % self.channels.len();
                        self.check_fence();
                        if self.sleep(self.session_backoff).await.is_none() {
                            break 'register;
                        }
                        self.session_backoff = (self.session_backoff * 2).min(BACKOFF_MAX);
                    }
                    SessionEnd::Reregister(reason) => {
                        tracing::warn!(worker = self.worker_id, %reason, "registering again; stopping every task");
                        // Registering frees everything the cluster counted here, so nothing may still run.
                        self.stop_tasks("this worker is registering again").await;
                        self.unacknowledged.clear();
                        self.executor.forget_started();
                        continue 'register;
                    }
                    SessionEnd::Shutdown => break 'register,
                }
            }
        }
        self.stop_tasks("the worker is shutting down").await;
    }

    /// Fencing: a worker cut off from every leader for longer than `fence` stops its tasks itself. The
    /// leader declares it lost only after the whole lease, and reschedules its ranks then, so by that time
    /// nothing of them runs here any more: a partition cannot make a rank run twice.
    fn check_fence(&mut self) {
        let silent = self.last_contact.elapsed();
        if self.fenced || self.executor.is_idle() || silent <= self.fence {
            return;
        }
        self.fenced = true;
        self.standby.clear();
        let reason = format!(
            "no leader heard for {:.1} s (fence {:.1} s); stopping tasks so they cannot run twice",
            silent.as_secs_f64(),
            self.fence.as_secs_f64()
        );
        tracing::warn!(worker = self.worker_id, %reason, "fenced");
        self.executor.kill_all(&reason);
    }

    fn contact(&mut self) {
        self.last_contact = std::time::Instant::now();
        self.fenced = false;
    }

    async fn sleep(&self, duration: Duration) -> Option<()> {
        tokio::select! {
            () = tokio::time::sleep(duration) => Some(()),
            () = self.shutdown.cancelled() => None,
        }
    }

    /// Stops every task and waits (up to the grace period and a little) for them to go.
    async fn stop_tasks(&mut self, reason: &str) {
        self.standby.clear();
        self.executor.kill_all(reason);
        let deadline = tokio::time::Instant::now() + self.config.kill_grace + Duration::from_secs(1);
        while !self.executor.is_idle() {
            match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                Ok(Some((key, outcome))) => {
                    self.record_exit(key, outcome);
                }
                _ => break,
            }
        }
    }

    /// `Ok(None)` when shut down while trying.
    async fn register(&mut self) -> Result<Option<()>, WorkerError> {
        let request = pb::RegisterWorkerRequest {
            uid: self.uid.clone(),
            address: self.address.clone(),
            host: self.host.clone(),
            hostname: hostname(),
            resources: Some(pb::WorkerResources {
                cpus: self.config.cpus,
                gpus: self.gpus,
                memory_bytes: self.memory_bytes,
            }),
            task_port_low: self.config.task_ports.0.into(),
            task_port_high: self.config.task_ports.1.into(),
        };
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 0usize;
        loop {
            let (coordinator, channel) = &self.channels[(self.preferred + attempt) % self.channels.len()];
            let mut client = WorkerServiceClient::new(channel.clone());
            let call = tokio::time::timeout(Duration::from_secs(15), client.register(request.clone()));
            let outcome = tokio::select! {
                outcome = call => outcome,
                () = self.shutdown.cancelled() => return Ok(None),
            };
            match outcome {
                Ok(Ok(response)) => {
                    let info = response.into_inner();
                    self.worker_id = info.id;
                    self.executor.set_worker_id(info.id);
                    let lease = Duration::from_millis(info.lease_ms.max(500));
                    self.heartbeat = lease / HEARTBEATS_PER_LEASE;
                    self.fence = lease * FENCE_FIFTHS_OF_LEASE / 5;
                    self.contact();
                    tracing::info!(
                        worker = info.id,
                        address = %self.address,
                        cpus = self.config.cpus,
                        gpus = self.gpus,
                        "registered with the cluster"
                    );
                    let _ = self.registered.send(info.id);
                    return Ok(Some(()));
                }
                Ok(Err(status)) if is_permanent(&status) => {
                    return Err(WorkerError::Refused(format!(
                        "coordinator {coordinator} refused the registration: {}",
                        status.message()
                    )));
                }
                Ok(Err(status)) => {
                    tracing::debug!(%coordinator, %status, "registration failed; trying again");
                }
                Err(_) => tracing::debug!(%coordinator, "registration timed out; trying again"),
            }
            attempt += 1;
            if attempt.is_multiple_of(self.channels.len()) {
                self.sleep(backoff).await.ok_or(()).ok();
                if self.shutdown.is_cancelled() {
                    return Ok(None);
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    fn record_exit(&mut self, key: Key, outcome: pb::task_report::Outcome) -> pb::TaskReport {
        self.executor.finished(key);
        if let Some(next) = self.standby.remove(&key) {
            // The slot is this task's now: the cluster committed the standby before it was sent.
            self.executor.start(next);
        }
        tracing::info!(%key, ?outcome, "task ended");
        let report = pb::TaskReport {
            task: Some(key.to_proto()),
            outcome: Some(outcome),
        };
        self.unacknowledged.insert(key, report.clone());
        report
    }

    fn heartbeat_message(&self) -> pb::WorkerMessage {
        pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Heartbeat(pb::WorkerHeartbeat {
                running: self.executor.running_keys().into_iter().map(Key::to_proto).collect(),
                unacknowledged: self.unacknowledged.values().cloned().collect(),
            })),
        }
    }

    /// Starts an assigned task, or keeps a standby one until the task it waits for has exited: at once if that
    /// task ran here and is over; later if it runs, or if its own assignment has not arrived yet.
    fn assign(&mut self, mut assign: pb::AssignTask) {
        match assign.after.take().map(|after| Key::from_proto(&after)) {
            Some(after) if self.executor.is_running(after) || !self.executor.was_started(after) => {
                if let Some(key) = assign.task.as_ref().map(Key::from_proto) {
                    tracing::debug!(%key, %after, "standing by");
                }
                self.standby.insert(after, assign);
            }
            _ => self.executor.start(assign),
        }
    }

    /// Opens a session with whichever coordinator leads, then serves it until it breaks.
    async fn session(&mut self) -> SessionEnd {
        while let Ok((key, outcome)) = self.exits.try_recv() {
            self.record_exit(key, outcome);
        }
        let mut opened = None;
        for attempt in 0..self.channels.len() {
            let index = (self.preferred + attempt) % self.channels.len();
            let (outbound, receiver) = mpsc::channel(OUTBOUND_QUEUE);
            let hello = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Hello(pb::WorkerHello {
                    worker_id: self.worker_id,
                    uid: self.uid.clone(),
                })),
            };
            // The leader reads the hello before it answers, so it must already be queued.
            let _ = outbound.try_send(hello);
            let _ = outbound.try_send(self.heartbeat_message());
            let mut client = WorkerServiceClient::new(self.channels[index].1.clone());
            let call = tokio::time::timeout(SESSION_OPEN_TIMEOUT, client.session(ReceiverStream::new(receiver)));
            let outcome = tokio::select! {
                outcome = call => outcome,
                () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            };
            match outcome {
                Ok(Ok(response)) => {
                    self.preferred = index;
                    self.session_backoff = BACKOFF_MIN;
                    self.contact();
                    opened = Some((outbound, response.into_inner()));
                    break;
                }
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        Code::NotFound | Code::FailedPrecondition | Code::PermissionDenied
                    ) =>
                {
                    return SessionEnd::Reregister(status.message().to_string());
                }
                Ok(Err(status)) => tracing::debug!(coordinator = %self.channels[index].0, %status, "no session"),
                Err(_) => tracing::debug!(coordinator = %self.channels[index].0, "no session: timed out"),
            }
        }
        let Some((outbound, mut inbound)) = opened else {
            return SessionEnd::Lost;
        };
        // A new session is sent every standby placement that still holds; one withdrawn while this worker
        // was away must not start.
        self.standby.clear();
        tracing::info!(worker = self.worker_id, leader = %self.channels[self.preferred].0, "session with the leader open");
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            let message = tokio::select! {
                () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                message = inbound.message() => message,
                exit = self.exits.recv() => {
                    let Some((key, outcome)) = exit else { return SessionEnd::Shutdown };
                    let report = self.record_exit(key, outcome);
                    let message = pb::WorkerMessage { kind: Some(pb::worker_message::Kind::Report(report)) };
                    if outbound.try_send(message).is_err() {
                        return SessionEnd::Lost;
                    }
                    continue;
                }
                _ = heartbeat.tick() => {
                    self.check_fence();
                    if outbound.try_send(self.heartbeat_message()).is_err() {
                        return SessionEnd::Lost;
                    }
                    continue;
                }
            };
            let kind = match message {
                Ok(Some(pb::LeaderMessage { kind: Some(kind) })) => {
                    self.contact();
                    kind
                }
                Ok(Some(_)) => continue,
                Ok(None) => {
                    tracing::info!(
                        worker = self.worker_id,
                        "the leader ended the session; looking for the leader"
                    );
                    return SessionEnd::Lost;
                }
                Err(status) => {
                    tracing::info!(worker = self.worker_id, %status, "the session broke; looking for the leader");
                    return SessionEnd::Lost;
                }
            };
            match kind {
                pb::leader_message::Kind::Assign(assign) => self.assign(assign),
                pb::leader_message::Kind::Kill(kill) => {
                    if let Some(key) = kill.task.as_ref().map(Key::from_proto) {
                        self.standby
                            .retain(|_, waiting| waiting.task.as_ref().map(Key::from_proto) != Some(key));
                        self.executor.kill(key, &kill.reason);
                    }
                }
                pb::leader_message::Kind::Acknowledged(acknowledged) => {
                    for key in &acknowledged.tasks {
                        let key = Key::from_proto(key);
                        self.unacknowledged.remove(&key);
                        // Committed as ended: the leader never assigns it again, so forget it.
                        self.executor.forget(key);
                    }
                }
                pb::leader_message::Kind::Reregister(reregister) => return SessionEnd::Reregister(reregister.reason),
            }
        }
    }
}
