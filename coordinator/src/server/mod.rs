//! One coordinator process: the node's event loop, the peer transport, and the gRPC services.
//!
//! ```text
//!   gRPC handlers (tokio)                  event loop (one OS thread)            peer links (tokio)
//!   JobService, ClusterService ──Event──►  Node::tick/step/propose/read ──msgs──► a task per peer
//!   RaftPeer.Stream / Send ─────Event──►      Node::ready() (fsync)               one RaftPeer.Stream
//!          ▲                                    │ replies, job events            (snapshots: Send)
//!          └──────── oneshot / broadcast ───────┘◄──── unreachable, snapshot status ───┘
//!                                               └──► snapshot worker thread (encode, save) ──┐
//!                                               ◄──────────── SnapshotSaved ─────────────────┘
//! ```
//!
//! The loop is the only owner of the node and the disk; everything else talks to it over a bounded
//! channel (full: the caller gets "overloaded, retry"; Raft traffic is dropped and raft-rs resends).
//! Writes that reach a follower are forwarded to the leader over `RaftPeer.Forward`; the leader stamps
//! the time into the command. Reads run ReadIndex on the node that received them.
//!
//! Files: `event_loop.rs` (the loop and the snapshot worker), `transport.rs` (outbound peer streams,
//! inbound batch decoding), `services.rs` (the gRPC services and the write path), `catalog.rs` (the catalog
//! service); this file holds the
//! configuration and the start-up and shutdown of a [`Coordinator`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_proto as pb;
use pb::catalog_service_server::CatalogServiceServer;
use pb::cluster_service_server::{ClusterService, ClusterServiceServer};
use pb::job_service_server::{JobService, JobServiceServer};
use pb::raft_peer_client::RaftPeerClient;
use pb::raft_peer_server::{RaftPeer, RaftPeerServer};
use pb::worker_service_server::{WorkerService, WorkerServiceServer};
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeType, Message, MessageType};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request as GrpcRequest, Response, Status};

use crate::error::CoordinatorError;
use crate::node::{Node, NodeConfig, NodeStatus, Reply, SavedSnapshot, SnapshotTask, Token, raft_logger};
use crate::scheduler::SchedulerConfig;
use crate::spec::parse_job_spec;
use crate::state::{
    Command, CommandResult, IDEMPOTENCY_KEY_LENGTH_MAX, Job, JobId, JobState, NodeId, Query, QueryResult, Request,
    StateMachine, Worker, WorkerId, decode, encode,
};
use crate::storage::{Databases, LogStore};

mod catalog;
mod event_loop;
mod mlflow;
mod services;
mod transport;
mod workers;

use event_loop::{Event, run_event_loop};
use services::Shared;
pub use services::WriteOutcome;
use transport::{Transport, peer_client, raft_event};
use workers::{Hub, HubEvent};

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
/// The most bytes one artifact may have unless configured otherwise (10 GiB).
pub const DEFAULT_ARTIFACT_MAX_BYTES: u64 = 10 << 30;
/// Batches queued on one peer stream; beyond this they are dropped (raft-rs resends).
const STREAM_BUFFER_BATCHES: usize = 256;
/// Worker stream messages and reports waiting for the leader's worker hub; beyond this workers wait.
const HUB_QUEUE_CAPACITY: usize = 4096;
/// How long a batch that carries a snapshot may take to be acknowledged.
const SNAPSHOT_SEND_TIMEOUT: Duration = Duration::from_secs(120);

/// The state as of the last applied entry, published by the event loop after every change. Cloning the
/// state is cheap (persistent maps), so readers never wait for the loop.
#[derive(Debug, Clone, Default)]
pub struct AppliedView {
    pub applied_index: u64,
    /// See [`Node::is_leader_ready`]: the scheduler and the worker streams run only while this holds.
    pub leader_ready: bool,
    pub term: u64,
    pub state: StateMachine,
}

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
    /// A worker not heard from for this long is declared lost.
    pub worker_lease: Duration,
    pub scheduler: SchedulerConfig,
    /// Where the MLflow Tracking REST API listens (`None`: not served). Port 0 picks a free port.
    pub tracking_listen: Option<SocketAddr>,
    /// Where the artifact proxy keeps artifacts' bytes: a directory, `file:///DIR`, `s3://BUCKET[/PREFIX]`,
    /// `gs://BUCKET[/PREFIX]` or `az://CONTAINER[/PREFIX]` (empty: `DATA_DIR/artifacts`). Shared storage when
    /// there are several coordinators.
    pub artifact_root: String,
    /// The most bytes one artifact may have.
    pub artifact_max_bytes: u64,
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
            worker_lease: Duration::from_secs(5),
            scheduler: SchedulerConfig::default(),
            tracking_listen: None,
            artifact_root: String::new(),
            artifact_max_bytes: DEFAULT_ARTIFACT_MAX_BYTES,
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
        if self.worker_lease < Duration::from_millis(200) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "the worker lease is {} ms; expected at least 200 ms (workers heartbeat at a fifth of it)",
                self.worker_lease.as_millis()
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
    /// Where the MLflow Tracking REST API answers, when it is served.
    pub tracking_addr: Option<SocketAddr>,
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
        let (views, view) = tokio::sync::watch::channel(AppliedView::default());
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
                    views,
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

        let (hub_events, hub_receiver) = tokio::sync::mpsc::channel(HUB_QUEUE_CAPACITY);
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
            view,
            hub: hub_events,
            worker_lease: config.worker_lease,
            rendezvous: Arc::new(Mutex::new(HashMap::new())),
        };
        tokio::spawn(
            Hub::new(
                shared.clone(),
                hub_receiver,
                config.worker_lease,
                config.scheduler.clone(),
            )
            .run(),
        );
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<JobServiceServer<Shared>>().await;
        health.set_serving::<ClusterServiceServer<Shared>>().await;
        health.set_serving::<WorkerServiceServer<Shared>>().await;
        health.set_serving::<CatalogServiceServer<Shared>>().await;
        health.set_serving::<RaftPeerServer<Shared>>().await;

        let mut servers = tokio::task::JoinSet::new();
        let api = tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .add_service(JobServiceServer::new(shared.clone()))
            .add_service(ClusterServiceServer::new(shared.clone()))
            .add_service(WorkerServiceServer::new(shared.clone()))
            .add_service(CatalogServiceServer::new(shared.clone()))
            .serve_with_incoming_shutdown(incoming(api_listener), shutdown.clone().cancelled_owned());
        servers.spawn(api);
        let tracking_addr = match config.tracking_listen {
            None => None,
            Some(listen) => {
                let listener = tokio::net::TcpListener::bind(listen).await.map_err(|error| {
                    CoordinatorError::InvalidArgument(format!("cannot listen for the MLflow API on {listen}: {error}"))
                })?;
                let addr = listener
                    .local_addr()
                    .map_err(|error| CoordinatorError::Internal(error.to_string()))?;
                let artifact_root = if config.artifact_root.is_empty() {
                    config.data_dir.join("artifacts").display().to_string()
                } else {
                    config.artifact_root.clone()
                };
                let artifacts = crate::artifacts::ArtifactStore::open(&artifact_root, config.artifact_max_bytes)
                    .map_err(|error| CoordinatorError::InvalidArgument(error.to_string()))?;
                let artifacts = Arc::new(artifacts);
                servers.spawn(mlflow::sweep_uploads(
                    shared.clone(),
                    artifacts.clone(),
                    shutdown.clone(),
                ));
                let routes = tonic::service::Routes::from(mlflow::router(shared.clone(), artifacts));
                let server = tonic::transport::Server::builder()
                    .accept_http1(true)
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(incoming(listener), shutdown.clone().cancelled_owned());
                servers.spawn(server);
                Some(addr)
            }
        };
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
            tracking_addr,
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
