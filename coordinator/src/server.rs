//! One coordinator process: the node's event loop, the peer transport, and the gRPC services.
//!
//! ```text
//!   gRPC handlers (tokio)                 event loop (one OS thread)             peer links (tokio)
//!   JobService, ClusterService ──Event──► Node::tick/step/propose/read ──msgs──► one task per peer
//!   RaftPeer.Send ───────────────Event──►      Node::ready() (fsync)              RaftPeer.Send RPCs
//!          ▲                                    │ replies, job events                  │
//!          └──────── oneshot / broadcast ───────┘◄──── unreachable, snapshot status ───┘
//! ```
//!
//! The loop is the only owner of the node and the disk; everything else talks to it over a bounded
//! channel (full: the caller gets "overloaded, retry"; Raft traffic is dropped and raft-rs resends).
//! Writes that reach a follower are forwarded to the leader over `RaftPeer.Forward`; the leader stamps
//! the time into the command. Reads run ReadIndex on the node that received them.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_proto as pb;
use pb::cluster_service_server::{ClusterService, ClusterServiceServer};
use pb::job_service_server::{JobService, JobServiceServer};
use pb::raft_peer_client::RaftPeerClient;
use pb::raft_peer_server::{RaftPeer, RaftPeerServer};
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeType, Message, MessageType};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request as GrpcRequest, Response, Status};

use crate::error::CoordinatorError;
use crate::node::{Node, NodeConfig, NodeStatus, Reply, SavedSnapshot, SnapshotTask, Token, raft_logger};
use crate::spec::parse_job_spec;
use crate::state::{
    Command, CommandResult, IDEMPOTENCY_KEY_LENGTH_MAX, Job, JobId, JobState, NodeId, Query, QueryResult, Request,
    StateMachine, decode, encode,
};
use crate::storage::{Databases, LogStore};

/// Events waiting for the loop; beyond this callers are told to retry.
const EVENT_QUEUE_CAPACITY: usize = 8192;
/// Raft messages waiting to be sent to one peer; beyond this they are dropped (raft-rs resends).
const PEER_QUEUE_CAPACITY: usize = 4096;
/// Raft messages sent in one RPC at most.
const PEER_BATCH_MESSAGES_MAX: usize = 512;
/// Job events a slow watcher may fall behind before its stream ends with an error.
const WATCH_BUFFER_EVENTS: usize = 4096;
/// Largest gRPC message between peers: snapshots travel in one message.
const PEER_MESSAGE_BYTES_MAX: usize = 512 << 20;
/// How long a learner may take to catch up before `cluster add` gives up on promoting it.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);
/// Batches queued on one peer stream; beyond this they are dropped (raft-rs resends).
const STREAM_BUFFER_BATCHES: usize = 256;
/// How long a batch that carries a snapshot may take to be acknowledged.
const SNAPSHOT_SEND_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub node: NodeConfig,
    /// Where clients and workers connect (JobService, ClusterService). Port 0 picks a free port.
    pub api_listen: SocketAddr,
    /// Where peers connect (RaftPeer). Port 0 picks a free port.
    pub raft_listen: SocketAddr,
    /// The founding voters' Raft addresses. A node started with `join` may list them only to find its
    /// peers; it is added with `kiln cluster add`.
    pub peers: BTreeMap<NodeId, String>,
    /// Start with an empty configuration and wait to be added by a running cluster.
    pub join: bool,
    pub data_dir: PathBuf,
    pub tick_interval: Duration,
    /// How long a client request may take end to end, retries and forwarding included.
    pub request_timeout: Duration,
}

impl CoordinatorConfig {
    pub fn new(id: NodeId, data_dir: PathBuf) -> CoordinatorConfig {
        CoordinatorConfig {
            node: NodeConfig::new(id),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            raft_listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            peers: BTreeMap::new(),
            join: false,
            data_dir,
            tick_interval: Duration::from_millis(50),
            request_timeout: Duration::from_secs(10),
        }
    }

    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let id = self.node.id;
        if id == 0 {
            return Err(CoordinatorError::InvalidArgument(
                "--id is 0; node ids start at 1".into(),
            ));
        }
        if !self.join && !self.peers.is_empty() && !self.peers.contains_key(&id) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "--peers does not list this node's id {id} (has: {}); list every founding member including this one, or start with --join",
                self.peers
                    .keys()
                    .map(|id| id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if self.tick_interval.is_zero() {
            return Err(CoordinatorError::InvalidArgument(
                "the tick interval must be above zero".into(),
            ));
        }
        Ok(())
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

enum Event {
    Raft {
        from_id: NodeId,
        from_addr: String,
        messages: Vec<Message>,
    },
    Propose {
        command: Command,
        reply: oneshot::Sender<Reply>,
    },
    ConfChange {
        change_type: ConfChangeType,
        node_id: NodeId,
        raft_addr: String,
        reply: oneshot::Sender<Reply>,
    },
    Read {
        query: Query,
        reply: oneshot::Sender<Reply>,
    },
    TransferLeader {
        to: NodeId,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Unreachable {
        to: NodeId,
    },
    SnapshotSaved(Result<SavedSnapshot, CoordinatorError>),
    SnapshotSent {
        to: NodeId,
        delivered: bool,
    },
}

/// Outbound Raft traffic: one task per peer, each with a bounded queue.
struct Transport {
    self_id: NodeId,
    /// The address peer connections leave from (see [`peer_client`]).
    local_ip: Option<IpAddr>,
    self_addr: String,
    /// Every peer address known: from `--peers`, from applied membership changes, from incoming batches.
    book: BTreeMap<NodeId, String>,
    links: HashMap<NodeId, (String, tokio::sync::mpsc::Sender<Message>)>,
    runtime: tokio::runtime::Handle,
    events: SyncSender<Event>,
    shutdown: CancellationToken,
}

impl Transport {
    fn learn(&mut self, id: NodeId, addr: &str) {
        if id == self.self_id || addr.is_empty() {
            return;
        }
        if self.book.get(&id).map(String::as_str) != Some(addr) {
            self.book.insert(id, addr.to_string());
        }
    }

    fn undeliverable(&self, to: NodeId, snapshot: bool, unreachable: &mut Vec<NodeId>) {
        unreachable.push(to);
        if snapshot {
            // A leader waits for a snapshot's fate before sending that member anything else.
            let _ = self.events.try_send(Event::SnapshotSent { to, delivered: false });
        }
    }

    fn send(&mut self, messages: Vec<Message>) -> Vec<NodeId> {
        let mut unreachable = Vec::new();
        for message in messages {
            let to = message.to;
            let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let Some(addr) = self.book.get(&to).cloned() else {
                self.undeliverable(to, snapshot, &mut unreachable);
                continue;
            };
            let stale = self
                .links
                .get(&to)
                .is_none_or(|(link_addr, sender)| *link_addr != addr || sender.is_closed());
            if stale {
                let (sender, receiver) = tokio::sync::mpsc::channel(PEER_QUEUE_CAPACITY);
                let link = PeerLink {
                    local_ip: self.local_ip,
                    to,
                    addr: addr.clone(),
                    from_id: self.self_id,
                    from_addr: self.self_addr.clone(),
                    events: self.events.clone(),
                };
                let shutdown = self.shutdown.clone();
                self.runtime.spawn(async move {
                    tokio::select! {
                        () = link.run(receiver) => {}
                        () = shutdown.cancelled() => {}
                    }
                });
                self.links.insert(to, (addr, sender));
            }
            let (_, sender) = &self.links[&to];
            if sender.try_send(message).is_err() {
                self.undeliverable(to, snapshot, &mut unreachable);
            }
        }
        unreachable
    }
}

struct PeerLink {
    local_ip: Option<IpAddr>,
    to: NodeId,
    addr: String,
    from_id: NodeId,
    from_addr: String,
    events: SyncSender<Event>,
}

impl PeerLink {
    fn encode(&self, batch: &[Message]) -> pb::RaftBatch {
        let mut encoded = Vec::with_capacity(batch.len());
        for message in batch {
            match message.write_to_bytes() {
                Ok(bytes) => encoded.push(bytes),
                Err(error) => tracing::error!(%error, "encoding a raft message"),
            }
        }
        pb::RaftBatch {
            from_id: self.from_id,
            from_raft_addr: self.from_addr.clone(),
            messages: encoded,
        }
    }

    fn unreachable(&self, why: &dyn std::fmt::Display) {
        tracing::debug!(to = self.to, addr = %self.addr, %why, "raft messages not delivered");
        let _ = self.events.try_send(Event::Unreachable { to: self.to });
    }

    /// Sends batches over one long-lived stream (no per-batch round trip); a batch with a snapshot goes
    /// as its own acknowledged call, so the leader learns whether the snapshot arrived.
    async fn run(self, mut receiver: tokio::sync::mpsc::Receiver<Message>) {
        let client = match peer_client(&self.addr, self.local_ip) {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(to = self.to, addr = %self.addr, %error, "cannot reach peer");
                return;
            }
        };
        let mut stream: Option<(tokio::sync::mpsc::Sender<pb::RaftBatch>, tokio::task::JoinHandle<()>)> = None;
        let mut batch = Vec::new();
        while let Some(first) = receiver.recv().await {
            batch.clear();
            batch.push(first);
            while batch.len() < PEER_BATCH_MESSAGES_MAX {
                match receiver.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            let request = self.encode(&batch);
            if batch
                .iter()
                .any(|message| message.get_msg_type() == MessageType::MsgSnapshot)
            {
                let mut client = client.clone();
                let outcome = tokio::time::timeout(SNAPSHOT_SEND_TIMEOUT, client.send(request)).await;
                let delivered = matches!(outcome, Ok(Ok(_)));
                if !delivered {
                    self.unreachable(&"the snapshot was not acknowledged");
                }
                let _ = self.events.try_send(Event::SnapshotSent { to: self.to, delivered });
                continue;
            }
            // A stream whose call ended (peer restarted, connection lost) is replaced; what was in flight
            // on it is lost, and raft-rs sends it again.
            if let Some((_, call)) = &stream
                && call.is_finished()
            {
                self.unreachable(&"the stream to the peer ended");
                stream = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (sender, _) = stream.get_or_insert_with(|| {
                let (sender, batches) = tokio::sync::mpsc::channel(STREAM_BUFFER_BATCHES);
                let mut client = client.clone();
                let call = tokio::spawn(async move {
                    let _ = client
                        .stream(tokio_stream::wrappers::ReceiverStream::new(batches))
                        .await;
                });
                (sender, call)
            });
            if let Err(error) = sender.try_send(request) {
                // Full: the peer is slow or gone. Dropping is safe; raft-rs resends.
                self.unreachable(&error);
            }
        }
        if let Some((_, call)) = stream {
            call.abort();
        }
    }
}

fn endpoint(addr: &str) -> Result<Endpoint, CoordinatorError> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true)
        })
        .map_err(|error| CoordinatorError::InvalidArgument(format!("address '{addr}' is not valid: {error}")))
}

/// A client for a peer's RaftPeer service. Connections leave from `local_ip` (this node's Raft listen
/// address, when it is a specific one), so a member on 127.0.0.2 talks to its peers as 127.0.0.2: what
/// multi-homed hosts expect, and what lets a test cut one member off with a firewall rule.
fn peer_client(addr: &str, local_ip: Option<IpAddr>) -> Result<RaftPeerClient<Channel>, CoordinatorError> {
    let channel = endpoint(addr)?.local_address(local_ip).connect_lazy();
    Ok(RaftPeerClient::new(channel)
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX))
}

/// A thread that encodes and saves snapshots, so a large state never stalls the event loop. It ends
/// when the loop drops its sender.
fn spawn_snapshot_worker(events: SyncSender<Event>) -> Result<SyncSender<SnapshotTask>, CoordinatorError> {
    let (sender, tasks) = std::sync::mpsc::sync_channel::<SnapshotTask>(1);
    std::thread::Builder::new()
        .name("kiln-snapshots".into())
        .spawn(move || {
            for task in tasks {
                if events.send(Event::SnapshotSaved(task.run())).is_err() {
                    return;
                }
            }
        })
        .map_err(|error| CoordinatorError::Internal(format!("starting the snapshot thread: {error}")))?;
    Ok(sender)
}

/// The event loop: owns the node, the disk and the transport.
fn run_event_loop(
    mut node: Node,
    receiver: Receiver<Event>,
    mut transport: Transport,
    job_events: broadcast::Sender<(u64, Job)>,
    tick_interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let mut waiting: HashMap<Token, oneshot::Sender<Reply>> = HashMap::new();
    let mut next_token: Token = 0;
    let snapshots = spawn_snapshot_worker(transport.events.clone())?;
    let mut next_tick = Instant::now() + tick_interval;
    let mut handle = |event: Event, node: &mut Node, transport: &mut Transport, waiting: &mut HashMap<_, _>| {
        let mut wait = |reply: oneshot::Sender<Reply>| {
            next_token += 1;
            waiting.insert(next_token, reply);
            next_token
        };
        match event {
            Event::Raft {
                from_id,
                from_addr,
                messages,
            } => {
                transport.learn(from_id, &from_addr);
                for message in messages {
                    node.step(message);
                }
            }
            Event::Propose { command, reply } => {
                let token = wait(reply);
                node.propose(token, &command);
            }
            Event::ConfChange {
                change_type,
                node_id,
                raft_addr,
                reply,
            } => {
                let token = wait(reply);
                transport.learn(node_id, &raft_addr);
                node.propose_conf_change(token, change_type, node_id, &raft_addr);
            }
            Event::Read { query, reply } => {
                let token = wait(reply);
                node.read(token, query);
            }
            Event::TransferLeader { to } => node.transfer_leader(to),
            Event::Status { reply } => {
                let mut status = node.status();
                for (id, addr) in &transport.book {
                    status.member_addrs.entry(*id).or_insert_with(|| addr.clone());
                }
                status.member_addrs.insert(node.id(), transport.self_addr.clone());
                let _ = reply.send(status);
            }
            Event::Unreachable { to } => node.report_unreachable(to),
            Event::SnapshotSent { to, delivered } => node.report_snapshot(to, delivered),
            Event::SnapshotSaved(outcome) => return node.snapshot_saved(outcome),
        }
        Ok(())
    };
    while !shutdown.is_cancelled() {
        let timeout = next_tick.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(timeout) {
            Ok(event) => {
                handle(event, &mut node, &mut transport, &mut waiting)?;
                // Take what else is queued so one Ready (one fsync) covers many requests.
                for _ in 0..EVENT_QUEUE_CAPACITY {
                    match receiver.try_recv() {
                        Ok(event) => handle(event, &mut node, &mut transport, &mut waiting)?,
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_tick {
            node.tick();
            next_tick += tick_interval;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + tick_interval;
            }
        }
        let output = node.ready()?;
        if let Some(task) = output.snapshot {
            // The node sends at most one at a time, so this never waits.
            let _ = snapshots.send(task);
        }
        for (id, member) in node.state().members() {
            transport.learn(*id, &member.raft_addr);
        }
        for to in transport.send(output.messages) {
            node.report_unreachable(to);
        }
        for (token, reply) in output.replies {
            if let Some(sender) = waiting.remove(&token) {
                let _ = sender.send(reply);
            }
        }
        for event in output.events {
            let _ = job_events.send(event);
        }
    }
    Ok(())
}

/// What a write produced, as it travels back from the leader to the node the client called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WriteOutcome {
    Submitted { job: Job, created: bool },
    Cancelled { job: Job },
    Membership { voters: Vec<NodeId>, learners: Vec<NodeId> },
    LeaderIs { id: NodeId },
}

/// What the gRPC handlers share: a way to reach the loop, and to reach peers.
#[derive(Clone)]
struct Shared {
    node_id: NodeId,
    /// Long-lived streams (peer streams, watches) end when this is cancelled.
    shutdown: CancellationToken,
    local_ip: Option<IpAddr>,
    api_addr: String,
    raft_addr: String,
    events: SyncSender<Event>,
    job_events: broadcast::Sender<(u64, Job)>,
    request_timeout: Duration,
    peers: Arc<Mutex<HashMap<String, RaftPeerClient<Channel>>>>,
    generated_keys: Arc<AtomicU64>,
}

impl Shared {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> Result<T, CoordinatorError> {
        let (sender, receiver) = oneshot::channel();
        match self.events.try_send(make(sender)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(CoordinatorError::Unavailable(
                    "the coordinator is overloaded; retry".into(),
                ));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(CoordinatorError::Unavailable("the coordinator is shutting down".into()));
            }
        }
        match tokio::time::timeout(self.request_timeout, receiver).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(CoordinatorError::Unavailable("the coordinator is shutting down".into())),
            Err(_) => Err(CoordinatorError::Timeout(
                "the coordinator did not answer in time; retry".into(),
            )),
        }
    }

    async fn status(&self) -> Result<NodeStatus, CoordinatorError> {
        self.ask(|reply| Event::Status { reply }).await
    }

    async fn query(&self, query: Query) -> Result<QueryResult, CoordinatorError> {
        match self.ask(|reply| Event::Read { query, reply }).await? {
            Reply::Query(QueryResult::Rejected(error)) | Reply::Failed(error) => Err(error),
            Reply::Query(result) => Ok(result),
            other => Err(CoordinatorError::Internal(format!(
                "unexpected reply to a read: {other:?}"
            ))),
        }
    }

    async fn propose(&self, command: Command) -> Result<CommandResult, CoordinatorError> {
        match self.ask(|reply| Event::Propose { command, reply }).await? {
            Reply::Command(CommandResult::Rejected(error)) | Reply::Failed(error) => Err(error),
            Reply::Command(result) => Ok(result),
            other => Err(CoordinatorError::Internal(format!(
                "unexpected reply to a write: {other:?}"
            ))),
        }
    }

    async fn conf_change(
        &self,
        change_type: ConfChangeType,
        node_id: NodeId,
        raft_addr: String,
    ) -> Result<WriteOutcome, CoordinatorError> {
        match self
            .ask(|reply| Event::ConfChange {
                change_type,
                node_id,
                raft_addr,
                reply,
            })
            .await?
        {
            Reply::ConfChanged { voters, learners } => Ok(WriteOutcome::Membership { voters, learners }),
            Reply::Failed(error) => Err(error),
            other => Err(CoordinatorError::Internal(format!(
                "unexpected reply to a membership change: {other:?}"
            ))),
        }
    }

    fn peer(&self, addr: &str) -> Result<RaftPeerClient<Channel>, CoordinatorError> {
        let mut peers = self.peers.lock().expect("peer client cache poisoned");
        if let Some(client) = peers.get(addr) {
            return Ok(client.clone());
        }
        let client = peer_client(addr, self.local_ip)?;
        peers.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Runs a write here when this node leads, otherwise on the leader; retries through elections
    /// until the request deadline.
    async fn execute(&self, request: Request) -> Result<WriteOutcome, CoordinatorError> {
        let deadline = Instant::now() + self.request_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let error = match self.execute_locally(&request).await {
                Ok(outcome) => return Ok(outcome),
                Err(CoordinatorError::NotLeader {
                    leader_id: Some(leader),
                    ..
                }) => match self.forward(leader, &request).await {
                    Ok(outcome) => return Ok(outcome),
                    Err(error) => error,
                },
                Err(error) => error,
            };
            if !error.is_retryable() || Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(250));
        }
    }

    async fn forward(&self, leader: NodeId, request: &Request) -> Result<WriteOutcome, CoordinatorError> {
        let status = self.status().await?;
        let Some(addr) = status.member_addrs.get(&leader).cloned() else {
            return Err(CoordinatorError::Unavailable(format!(
                "the address of leader {leader} is not known yet"
            )));
        };
        let mut client = self.peer(&addr)?;
        let mut grpc_request = GrpcRequest::new(pb::ForwardRequest {
            request: encode(request)?,
        });
        grpc_request.set_timeout(self.request_timeout);
        let outcome = tokio::time::timeout(self.request_timeout, client.forward(grpc_request))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("the leader did not answer in time")));
        match outcome {
            Ok(response) => {
                let outcome: Result<WriteOutcome, CoordinatorError> =
                    decode(&response.into_inner().reply, "a forwarded reply")?;
                outcome
            }
            Err(status) => Err(CoordinatorError::Unavailable(format!(
                "forwarding to leader {leader} at {addr} failed: {}",
                status.message()
            ))),
        }
    }

    async fn execute_locally(&self, request: &Request) -> Result<WriteOutcome, CoordinatorError> {
        match request.clone() {
            Request::SubmitJob {
                spec,
                spec_toml,
                idempotency_key,
            } => {
                let command = Command::SubmitJob {
                    spec,
                    spec_toml,
                    idempotency_key,
                    now_ms: now_ms(),
                };
                match self.propose(command).await? {
                    CommandResult::Submitted { job, created } => Ok(WriteOutcome::Submitted { job, created }),
                    other => Err(CoordinatorError::Internal(format!(
                        "unexpected submit result {other:?}"
                    ))),
                }
            }
            Request::CancelJob { id, reason } => {
                match self
                    .propose(Command::CancelJob {
                        id,
                        reason,
                        now_ms: now_ms(),
                    })
                    .await?
                {
                    CommandResult::Cancelled { job } => Ok(WriteOutcome::Cancelled { job }),
                    other => Err(CoordinatorError::Internal(format!(
                        "unexpected cancel result {other:?}"
                    ))),
                }
            }
            Request::AddMember { id, raft_addr, learner } => self.add_member(id, raft_addr, learner).await,
            Request::RemoveMember { id } => self.remove_member(id).await,
            Request::TransferLeader { id } => self.transfer_leader(id).await,
        }
    }

    async fn leader_status(&self) -> Result<NodeStatus, CoordinatorError> {
        let status = self.status().await?;
        if status.role != "leader" {
            let leader_id = (status.leader_id != 0).then_some(status.leader_id);
            return Err(CoordinatorError::NotLeader {
                node_id: self.node_id,
                leader_id,
            });
        }
        Ok(status)
    }

    async fn add_member(&self, id: NodeId, raft_addr: String, learner: bool) -> Result<WriteOutcome, CoordinatorError> {
        let status = self.leader_status().await?;
        if status.voters.contains(&id) {
            if learner {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "node {id} is already a voter"
                )));
            }
            return Ok(WriteOutcome::Membership {
                voters: status.voters,
                learners: status.learners,
            });
        }
        if !status.learners.contains(&id) {
            let outcome = self
                .conf_change(ConfChangeType::AddLearnerNode, id, raft_addr.clone())
                .await?;
            if learner {
                return Ok(outcome);
            }
        } else if learner {
            return Ok(WriteOutcome::Membership {
                voters: status.voters,
                learners: status.learners,
            });
        }
        // Promote only once the learner holds the log: adding an empty voter can stall the quorum.
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let status = self.leader_status().await?;
            let matched = status.matched.get(&id).copied().unwrap_or(0);
            if matched > 0 && matched + 64 >= status.commit_index {
                break;
            }
            if Instant::now() >= deadline {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "node {id} at {raft_addr} did not catch up within {} s (it has log index {matched} of {}); it stays a learner. Is `kiln coordinator --id {id} --join` running there?",
                    CATCH_UP_TIMEOUT.as_secs(),
                    status.commit_index
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.conf_change(ConfChangeType::AddNode, id, raft_addr).await
    }

    async fn remove_member(&self, id: NodeId) -> Result<WriteOutcome, CoordinatorError> {
        let status = self.leader_status().await?;
        if !status.voters.contains(&id) && !status.learners.contains(&id) {
            return Err(CoordinatorError::NotFound(format!(
                "node {id} is not a member (voters: {:?}, learners: {:?})",
                status.voters, status.learners
            )));
        }
        if id == self.node_id {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "node {id} is the leader; move leadership first (`kiln cluster transfer-leader ID`), then remove it"
            )));
        }
        if status.voters == [id] {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "node {id} is the last voter"
            )));
        }
        self.conf_change(ConfChangeType::RemoveNode, id, String::new()).await
    }

    async fn transfer_leader(&self, id: NodeId) -> Result<WriteOutcome, CoordinatorError> {
        let status = self.leader_status().await?;
        if !status.voters.contains(&id) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "node {id} is not a voter (voters: {:?}); only a voter can lead",
                status.voters
            )));
        }
        if id == self.node_id {
            return Ok(WriteOutcome::LeaderIs { id });
        }
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        loop {
            // Asked again each round: raft-rs abandons a transfer that does not finish within an election timeout.
            let _ = self.events.try_send(Event::TransferLeader { to: id });
            tokio::time::sleep(Duration::from_millis(100)).await;
            let status = self.status().await?;
            if status.leader_id == id {
                return Ok(WriteOutcome::LeaderIs { id });
            }
            if Instant::now() >= deadline {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "leadership did not move to node {id} within {} s; is it running and caught up?",
                    TRANSFER_TIMEOUT.as_secs()
                )));
            }
        }
    }

    fn idempotency_key(&self, given: String) -> Result<String, CoordinatorError> {
        if given.len() > IDEMPOTENCY_KEY_LENGTH_MAX {
            return Err(CoordinatorError::InvalidArgument(format!(
                "idempotency key is {} bytes; at most {IDEMPOTENCY_KEY_LENGTH_MAX} are accepted",
                given.len()
            )));
        }
        if !given.is_empty() {
            return Ok(given);
        }
        // Without a key from the client, one made here still makes this node's own retries safe.
        let sequence = self.generated_keys.fetch_add(1, Ordering::Relaxed);
        Ok(format!("auto-{}-{}-{sequence}", self.node_id, now_ms()))
    }
}

impl From<&Job> for pb::Job {
    fn from(job: &Job) -> pb::Job {
        let state = match job.state {
            JobState::Queued => pb::JobState::Queued,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        };
        pb::Job {
            id: job.id,
            name: job.spec.name.clone(),
            kind: job.spec.kind.label().to_string(),
            state: state as i32,
            spec_toml: job.spec_toml.clone(),
            spec_json: serde_json::to_string(&job.spec).unwrap_or_default(),
            resources: Some(pb::Resources {
                workers: job.spec.resources.workers,
                cpus: job.spec.resources.cpus,
                gpus: job.spec.resources.gpus,
                memory_bytes: job.spec.resources.memory_bytes,
            }),
            max_restarts: job.spec.max_restarts,
            attempts: job
                .attempts
                .iter()
                .map(|attempt| pb::Attempt {
                    number: attempt.number,
                    state: attempt.state.clone(),
                    started_at_ms: attempt.started_at_ms,
                    ended_at_ms: attempt.ended_at_ms.unwrap_or(0),
                    message: attempt.message.clone(),
                })
                .collect(),
            submitted_at_ms: job.submitted_at_ms,
            updated_at_ms: job.updated_at_ms,
            finished_at_ms: job.finished_at_ms.unwrap_or(0),
            message: job.message.clone(),
            idempotency_key: job.idempotency_key.clone(),
        }
    }
}

fn job_state_from_proto(value: i32) -> Result<JobState, CoordinatorError> {
    match pb::JobState::try_from(value) {
        Ok(pb::JobState::Queued) => Ok(JobState::Queued),
        Ok(pb::JobState::Running) => Ok(JobState::Running),
        Ok(pb::JobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(pb::JobState::Failed) => Ok(JobState::Failed),
        Ok(pb::JobState::Cancelled) => Ok(JobState::Cancelled),
        _ => Err(CoordinatorError::InvalidArgument(format!(
            "job state {value} is not known; expected queued, running, succeeded, failed or cancelled"
        ))),
    }
}

#[tonic::async_trait]
impl JobService for Shared {
    async fn submit(
        &self,
        request: GrpcRequest<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let request = request.into_inner();
        let source = if request.source_name.is_empty() {
            "<request>"
        } else {
            request.source_name.as_str()
        };
        let spec =
            parse_job_spec(source, &request.spec_toml).map_err(|error| Status::invalid_argument(error.to_string()))?;
        let idempotency_key = self.idempotency_key(request.idempotency_key)?;
        match self
            .execute(Request::SubmitJob {
                spec,
                spec_toml: request.spec_toml,
                idempotency_key,
            })
            .await?
        {
            WriteOutcome::Submitted { job, created } => Ok(Response::new(pb::SubmitJobResponse {
                job: Some(pb::Job::from(&job)),
                created,
            })),
            other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn get(&self, request: GrpcRequest<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        match self
            .query(Query::GetJob {
                id: request.into_inner().id,
            })
            .await?
        {
            QueryResult::Job(job) => Ok(Response::new(pb::Job::from(&job))),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn list(&self, request: GrpcRequest<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let request = request.into_inner();
        let states = request
            .states
            .into_iter()
            .map(job_state_from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        match self
            .query(Query::ListJobs {
                states,
                limit: request.limit as usize,
            })
            .await?
        {
            QueryResult::Jobs(jobs) => Ok(Response::new(pb::ListJobsResponse {
                jobs: jobs.iter().map(pb::Job::from).collect(),
            })),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn cancel(&self, request: GrpcRequest<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let request = request.into_inner();
        match self
            .execute(Request::CancelJob {
                id: request.id,
                reason: request.reason,
            })
            .await?
        {
            WriteOutcome::Cancelled { job } => Ok(Response::new(pb::Job::from(&job))),
            other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
        }
    }

    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::JobEvent, Status>>;

    async fn watch(&self, request: GrpcRequest<pb::WatchJobsRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let ids: Vec<JobId> = request.into_inner().ids;
        let wanted = move |job: &Job| ids.is_empty() || ids.contains(&job.id);
        // Subscribe before reading, so no change between the read and the subscription is missed.
        let mut changes = self.job_events.subscribe();
        let QueryResult::Jobs(current) = self
            .query(Query::ListJobs {
                states: Vec::new(),
                limit: 0,
            })
            .await?
        else {
            return Err(Status::internal("unexpected result listing jobs"));
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            for job in current.iter().filter(|job| wanted(job)) {
                let event = pb::JobEvent {
                    job: Some(pb::Job::from(job)),
                    index: 0,
                };
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            loop {
                let change = tokio::select! {
                    change = changes.recv() => change,
                    () = shutdown.cancelled() => return,
                };
                match change {
                    Ok((index, job)) if wanted(&job) => {
                        let event = pb::JobEvent {
                            job: Some(pb::Job::from(&job)),
                            index,
                        };
                        if sender.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let status = Status::data_loss(format!("the watch fell {missed} events behind; watch again"));
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }
}

impl Shared {
    async fn node_status_of(&self, addr: &str) -> Result<pb::NodeStatusResponse, String> {
        let mut client = self.peer(addr).map_err(|error| error.to_string())?;
        let mut request = GrpcRequest::new(pb::NodeStatusRequest {});
        request.set_timeout(Duration::from_secs(1));
        match tokio::time::timeout(Duration::from_secs(2), client.node_status(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(status.message().to_string()),
            Err(_) => Err("no answer within 2 s".to_string()),
        }
    }

    fn own_node_status(&self, status: &NodeStatus) -> pb::NodeStatusResponse {
        pb::NodeStatusResponse {
            id: self.node_id,
            role: status.role.to_string(),
            term: status.term,
            leader_id: status.leader_id,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            api_addr: self.api_addr.clone(),
            raft_addr: self.raft_addr.clone(),
            matched: status.matched.clone().into_iter().collect(),
        }
    }

    async fn cluster_status(&self) -> Result<pb::ClusterStatus, CoordinatorError> {
        let local = self.status().await?;
        let mut ids: Vec<NodeId> = local.voters.iter().chain(local.learners.iter()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        let probes = ids.iter().map(|id| {
            let addr = local.member_addrs.get(id).cloned().unwrap_or_default();
            let local = &local;
            async move {
                let answer = if *id == self.node_id {
                    Ok(self.own_node_status(local))
                } else if addr.is_empty() {
                    Err("address unknown".to_string())
                } else {
                    self.node_status_of(&addr).await
                };
                (*id, addr, answer)
            }
        });
        let answers = futures::future::join_all(probes).await;
        let leader_matched: BTreeMap<u64, u64> = answers
            .iter()
            .find_map(|(_, _, answer)| answer.as_ref().ok().filter(|status| status.role == "leader"))
            .map(|status| status.matched.clone().into_iter().collect())
            .unwrap_or_default();
        let members = answers
            .into_iter()
            .map(|(id, raft_addr, answer)| {
                let membership = if local.voters.contains(&id) { "voter" } else { "learner" };
                let (api_addr, health) = match answer {
                    Ok(status) => (
                        status.api_addr.clone(),
                        pb::MemberHealth {
                            reachable: true,
                            role: status.role,
                            term: status.term,
                            commit_index: status.commit_index,
                            applied_index: status.applied_index,
                            matched_index: leader_matched.get(&id).copied().unwrap_or(0),
                            error: String::new(),
                        },
                    ),
                    Err(error) => (
                        String::new(),
                        pb::MemberHealth {
                            reachable: false,
                            role: "unknown".into(),
                            matched_index: leader_matched.get(&id).copied().unwrap_or(0),
                            error,
                            ..pb::MemberHealth::default()
                        },
                    ),
                };
                pb::Member {
                    id,
                    raft_addr,
                    api_addr,
                    membership: membership.into(),
                    health: Some(health),
                }
            })
            .collect();
        Ok(pb::ClusterStatus {
            node_id: self.node_id,
            leader_id: local.leader_id,
            term: local.term,
            commit_index: local.commit_index,
            applied_index: local.applied_index,
            first_log_index: local.first_log_index,
            last_log_index: local.last_log_index,
            snapshot_index: local.snapshot_index,
            members,
        })
    }
}

#[tonic::async_trait]
impl ClusterService for Shared {
    async fn status(
        &self,
        _request: GrpcRequest<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(self.cluster_status().await?))
    }

    async fn members(
        &self,
        _request: GrpcRequest<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        let status = self.cluster_status().await?;
        Ok(Response::new(pb::MembersResponse {
            leader_id: status.leader_id,
            members: status.members,
        }))
    }

    async fn add_member(
        &self,
        request: GrpcRequest<pb::AddMemberRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let request = request.into_inner();
        if request.id == 0 {
            return Err(Status::invalid_argument("member id is 0; node ids start at 1"));
        }
        validate_host_port(&request.raft_addr)?;
        self.execute(Request::AddMember {
            id: request.id,
            raft_addr: request.raft_addr,
            learner: request.learner,
        })
        .await?;
        Ok(Response::new(self.cluster_status().await?))
    }

    async fn remove_member(
        &self,
        request: GrpcRequest<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.execute(Request::RemoveMember {
            id: request.into_inner().id,
        })
        .await?;
        Ok(Response::new(self.cluster_status().await?))
    }

    async fn transfer_leader(
        &self,
        request: GrpcRequest<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.execute(Request::TransferLeader {
            id: request.into_inner().id,
        })
        .await?;
        Ok(Response::new(self.cluster_status().await?))
    }
}

/// Checks `HOST:PORT`, the form every address flag takes.
pub fn validate_host_port(addr: &str) -> Result<(), CoordinatorError> {
    let valid = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0));
    if valid {
        Ok(())
    } else {
        Err(CoordinatorError::InvalidArgument(format!(
            "address '{addr}' is not HOST:PORT (for example 127.0.0.1:7071)"
        )))
    }
}

fn raft_event(batch: pb::RaftBatch) -> Result<Event, Status> {
    let mut messages = Vec::with_capacity(batch.messages.len());
    for bytes in &batch.messages {
        let message = Message::parse_from_bytes(bytes)
            .map_err(|error| Status::invalid_argument(format!("raft message does not decode: {error}")))?;
        messages.push(message);
    }
    Ok(Event::Raft {
        from_id: batch.from_id,
        from_addr: batch.from_raft_addr,
        messages,
    })
}

#[tonic::async_trait]
impl RaftPeer for Shared {
    async fn send(&self, request: GrpcRequest<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        match self.events.try_send(raft_event(request.into_inner())?) {
            Ok(()) => Ok(Response::new(pb::RaftAck {})),
            Err(_) => Err(Status::unavailable(
                "the coordinator is overloaded; raft messages dropped",
            )),
        }
    }

    async fn stream(
        &self,
        request: GrpcRequest<tonic::Streaming<pb::RaftBatch>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let mut batches = request.into_inner();
        // Ends with the server, or a graceful shutdown would wait on peers' streams forever.
        while let Some(batch) = tokio::select! {
            batch = batches.message() => batch?,
            () = self.shutdown.cancelled() => None,
        } {
            if self.events.try_send(raft_event(batch)?).is_err() {
                tracing::debug!("the event queue is full; a batch of raft messages was dropped");
            }
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn forward(&self, request: GrpcRequest<pb::ForwardRequest>) -> Result<Response<pb::ForwardResponse>, Status> {
        let request: Request = decode(&request.into_inner().request, "a forwarded request")?;
        // Only the leader executes forwarded writes; anyone else answers NotLeader and the sender retries.
        let outcome = self.execute_locally(&request).await;
        Ok(Response::new(pb::ForwardResponse {
            reply: encode(&outcome)?,
        }))
    }

    async fn node_status(
        &self,
        _request: GrpcRequest<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        let status = self.status().await?;
        Ok(Response::new(self.own_node_status(&status)))
    }
}

/// Accepted connections with Nagle's algorithm off: small RPCs otherwise wait out the peer's delayed ACK
/// (about 40 ms per round trip on Linux).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A running coordinator; dropping it does not stop it, [`Coordinator::shutdown`] does.
pub struct Coordinator {
    pub node_id: NodeId,
    pub api_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    shutdown: CancellationToken,
    servers: tokio::task::JoinSet<Result<(), tonic::transport::Error>>,
    event_loop: Option<std::thread::JoinHandle<Result<(), CoordinatorError>>>,
}

impl Coordinator {
    pub async fn start(mut config: CoordinatorConfig) -> Result<Coordinator, CoordinatorError> {
        config.validate()?;
        let id = config.node.id;
        std::fs::create_dir_all(&config.data_dir).map_err(|error| {
            CoordinatorError::Storage(format!(
                "creating data directory {}: {error}",
                config.data_dir.display()
            ))
        })?;
        let api_listener = tokio::net::TcpListener::bind(config.api_listen)
            .await
            .map_err(|error| {
                CoordinatorError::InvalidArgument(format!(
                    "cannot listen for clients on {}: {error}",
                    config.api_listen
                ))
            })?;
        let raft_listener = tokio::net::TcpListener::bind(config.raft_listen)
            .await
            .map_err(|error| {
                CoordinatorError::InvalidArgument(format!("cannot listen for peers on {}: {error}", config.raft_listen))
            })?;
        let api_addr = api_listener
            .local_addr()
            .map_err(|error| CoordinatorError::Internal(error.to_string()))?;
        let raft_addr = raft_listener
            .local_addr()
            .map_err(|error| CoordinatorError::Internal(error.to_string()))?;
        let local_ip = Some(raft_addr.ip()).filter(|ip| !ip.is_unspecified());
        let raft_advertised = match config.peers.get(&id) {
            Some(addr) if !addr.ends_with(":0") => addr.clone(),
            _ => raft_addr.to_string(),
        };
        config.peers.insert(id, raft_advertised.clone());

        let mut store = LogStore::open(Databases::open(&config.data_dir)?)?;
        if store.is_blank() && !config.join {
            let voters: Vec<NodeId> = config.peers.keys().copied().collect();
            let mut founders = StateMachine::default();
            for (peer, addr) in &config.peers {
                founders.record_member(*peer, Some(addr.clone()));
            }
            store.bootstrap(&voters, founders.to_snapshot()?)?;
            tracing::info!(node = id, ?voters, "bootstrapped a new cluster configuration");
        }
        let mut node_config = config.node.clone();
        // The node counts in ticks; its write deadline matches the one clients are given.
        let tick_ms = config.tick_interval.as_millis().max(1);
        node_config.request_timeout_ticks = (config.request_timeout.as_millis() / tick_ms).max(1) as u64;
        let node = Node::new(node_config, store, &raft_logger())?;

        let shutdown = CancellationToken::new();
        let (events, receiver) = std::sync::mpsc::sync_channel(EVENT_QUEUE_CAPACITY);
        let (job_events, _) = broadcast::channel(WATCH_BUFFER_EVENTS);
        let transport = Transport {
            self_id: id,
            self_addr: raft_advertised.clone(),
            local_ip,
            book: config
                .peers
                .iter()
                .filter(|(peer, _)| **peer != id)
                .map(|(peer, addr)| (*peer, addr.clone()))
                .collect(),
            links: HashMap::new(),
            runtime: tokio::runtime::Handle::current(),
            events: events.clone(),
            shutdown: shutdown.clone(),
        };
        let loop_shutdown = shutdown.clone();
        let loop_events = job_events.clone();
        let tick_interval = config.tick_interval;
        let event_loop = std::thread::Builder::new()
            .name(format!("kiln-raft-{id}"))
            .spawn(move || {
                let result = run_event_loop(
                    node,
                    receiver,
                    transport,
                    loop_events,
                    tick_interval,
                    loop_shutdown.clone(),
                );
                if let Err(error) = &result {
                    tracing::error!(%error, "the raft event loop stopped");
                }
                loop_shutdown.cancel();
                result
            })
            .map_err(|error| CoordinatorError::Internal(format!("starting the event loop: {error}")))?;

        let shared = Shared {
            node_id: id,
            shutdown: shutdown.clone(),
            local_ip,
            api_addr: api_addr.to_string(),
            raft_addr: raft_advertised,
            events,
            job_events,
            request_timeout: config.request_timeout,
            peers: Arc::new(Mutex::new(HashMap::new())),
            generated_keys: Arc::new(AtomicU64::new(0)),
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<JobServiceServer<Shared>>().await;
        health.set_serving::<ClusterServiceServer<Shared>>().await;
        health.set_serving::<RaftPeerServer<Shared>>().await;

        let mut servers = tokio::task::JoinSet::new();
        let api = tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .add_service(JobServiceServer::new(shared.clone()))
            .add_service(ClusterServiceServer::new(shared.clone()))
            .serve_with_incoming_shutdown(incoming(api_listener), shutdown.clone().cancelled_owned());
        servers.spawn(api);
        let peer = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(
                RaftPeerServer::new(shared)
                    .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
            )
            .serve_with_incoming_shutdown(incoming(raft_listener), shutdown.clone().cancelled_owned());
        servers.spawn(peer);
        tracing::info!(node = id, %api_addr, %raft_addr, "coordinator started");
        Ok(Coordinator {
            node_id: id,
            api_addr,
            raft_addr,
            shutdown,
            servers,
            event_loop: Some(event_loop),
        })
    }

    /// A token that stops this coordinator when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled (by a signal handler, or by a fatal storage error).
    pub async fn wait(mut self) -> Result<(), CoordinatorError> {
        self.shutdown.cancelled().await;
        self.stop().await
    }

    pub async fn shutdown(mut self) -> Result<(), CoordinatorError> {
        self.shutdown.cancel();
        self.stop().await
    }

    async fn stop(&mut self) -> Result<(), CoordinatorError> {
        while let Some(result) = self.servers.join_next().await {
            if let Ok(Err(error)) = result {
                tracing::warn!(%error, "a gRPC server ended with an error");
            }
        }
        match self.event_loop.take() {
            Some(handle) => tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|error| CoordinatorError::Internal(error.to_string()))?
                .map_err(|_| CoordinatorError::Internal("the event loop panicked".into()))?,
            None => Ok(()),
        }
    }
}
