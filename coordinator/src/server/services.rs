//! The gRPC services (JobService, ClusterService, RaftPeer) and the write path: run on the leader, or
//! forward to it.

use super::*;

/// The most metric points one report may carry (a report is one Raft entry).
const REPORT_POINTS_MAX: usize = 10_000;

/// What a write produced, as it travels back from the leader to the node the client called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WriteOutcome {
    /// A metrics report was recorded.
    Recorded,
    Submitted {
        job: Job,
        created: bool,
    },
    Cancelled {
        job: Job,
    },
    Membership {
        voters: Vec<NodeId>,
        learners: Vec<NodeId>,
    },
    LeaderIs {
        id: NodeId,
    },
    WorkerRegistered {
        worker: Worker,
    },
    /// Milliseconds since the leader last heard from each worker.
    Leases {
        ages_ms: BTreeMap<WorkerId, i64>,
    },
    CatalogApplied {
        objects: Vec<crate::catalog::AppliedObject>,
    },
    /// A tracking write's outcome, or MLflow's reason for refusing it.
    Tracked(Result<crate::tracking::TrackingOutcome, crate::tracking::TrackingError>),
}

/// What the gRPC handlers share: a way to reach the loop, and to reach peers.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) node_id: NodeId,
    /// Long-lived streams (peer streams, watches) end when this is cancelled.
    pub(super) shutdown: CancellationToken,
    pub(super) local_ip: Option<IpAddr>,
    pub(super) api_addr: String,
    pub(super) raft_addr: String,
    pub(super) events: SyncSender<Event>,
    pub(super) job_events: broadcast::Sender<(u64, Job)>,
    pub(super) request_timeout: Duration,
    pub(super) peers: Arc<Mutex<HashMap<String, RaftPeerClient<Channel>>>>,
    pub(super) generated_keys: Arc<AtomicU64>,
    /// The latest applied state.
    pub(super) view: tokio::sync::watch::Receiver<AppliedView>,
    pub(super) hub: tokio::sync::mpsc::Sender<HubEvent>,
    pub(super) worker_lease: Duration,
    /// Rendezvous of running attempts, leader-local: ranks that lose it to a failover simply ask again.
    pub(super) rendezvous: Arc<Mutex<HashMap<(JobId, u32), workers::RendezvousTable>>>,
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

    pub(super) async fn status(&self) -> Result<NodeStatus, CoordinatorError> {
        self.ask(|reply| Event::Status { reply }).await
    }

    pub(super) async fn query(&self, query: Query) -> Result<QueryResult, CoordinatorError> {
        match self.ask(|reply| Event::Read { query, reply }).await? {
            Reply::Query(QueryResult::Rejected(error)) | Reply::Failed(error) => Err(error),
            Reply::Query(result) => Ok(result),
            other => Err(CoordinatorError::Internal(format!(
                "unexpected reply to a read: {other:?}"
            ))),
        }
    }

    pub(super) async fn propose(&self, command: Command) -> Result<CommandResult, CoordinatorError> {
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
    pub(super) async fn execute(&self, request: Request) -> Result<WriteOutcome, CoordinatorError> {
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
            Request::RegisterWorker(registration) => {
                match self
                    .propose(Command::RegisterWorker {
                        registration,
                        now_ms: now_ms(),
                    })
                    .await?
                {
                    CommandResult::WorkerRegistered { worker } => Ok(WriteOutcome::WorkerRegistered { worker }),
                    other => Err(CoordinatorError::Internal(format!(
                        "unexpected registration result {other:?}"
                    ))),
                }
            }
            Request::WorkerLeases => self.worker_leases().await,
            Request::Track(command) => match self
                .propose(Command::Track {
                    command,
                    now_ms: now_ms(),
                })
                .await?
            {
                CommandResult::Tracked(result) => Ok(WriteOutcome::Tracked(result)),
                other => Err(CoordinatorError::Internal(format!(
                    "unexpected tracking result {other:?}"
                ))),
            },
            Request::ApplyCatalog {
                namespace,
                objects,
                replace,
            } => self.apply_catalog(namespace, objects, replace).await,
            Request::ReportMetrics(report) => {
                self.propose(Command::RecordReport(crate::state::Report {
                    now_ms: now_ms(),
                    ..report
                }))
                .await?;
                Ok(WriteOutcome::Recorded)
            }
        }
    }

    pub(super) async fn leader_status(&self) -> Result<NodeStatus, CoordinatorError> {
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
                    state: attempt.state.label().to_string(),
                    started_at_ms: attempt.started_at_ms,
                    ended_at_ms: attempt.ended_at_ms.unwrap_or(0),
                    message: attempt.message.clone(),
                    master_addr: attempt.master_addr.clone(),
                    master_port: attempt.master_port.into(),
                    tasks: attempt
                        .tasks
                        .iter()
                        .map(|task| pb::TaskInfo {
                            rank: task.rank,
                            worker_id: task.worker,
                            worker_address: task.worker_address.clone(),
                            local_rank: task.local_rank,
                            local_world_size: task.local_world_size,
                            state: task.state.label().to_string(),
                            stop_requested: task.stop_requested,
                            exit_code: task.exit_code,
                            signal: task.signal,
                            ended_at_ms: task.ended_at_ms.unwrap_or(0),
                            message: task.message.clone(),
                        })
                        .collect(),
                })
                .collect(),
            submitted_at_ms: job.submitted_at_ms,
            updated_at_ms: job.updated_at_ms,
            finished_at_ms: job.finished_at_ms.unwrap_or(0),
            message: job.message.clone(),
            idempotency_key: job.idempotency_key.clone(),
            metrics: job.metrics.clone().into_iter().collect(),
            artifacts: job.artifacts.clone().into_iter().collect(),
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
                after_id: request.after_id,
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

    async fn report_metrics(
        &self,
        request: GrpcRequest<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let request = request.into_inner();
        if request.metrics.len() + request.artifacts.len() > crate::state::JOB_METRICS_MAX {
            return Err(Status::invalid_argument(format!(
                "{} metrics and artifacts in one report; at most {} are kept per job",
                request.metrics.len() + request.artifacts.len(),
                crate::state::JOB_METRICS_MAX
            )));
        }
        for (name, value) in &request.metrics {
            if name.is_empty() || name.len() > crate::state::METRIC_TEXT_LENGTH_MAX || !value.is_finite() {
                return Err(Status::invalid_argument(format!(
                    "metric {name:?} = {value} is not valid; expected a name of 1 to {} bytes and a finite value",
                    crate::state::METRIC_TEXT_LENGTH_MAX
                )));
            }
        }
        if request.points.len() > REPORT_POINTS_MAX {
            return Err(Status::invalid_argument(format!(
                "{} metric points in one report; at most {REPORT_POINTS_MAX} (send the rest in the next)",
                request.points.len()
            )));
        }
        if let Some(point) = request
            .points
            .iter()
            .find(|point| point.key.is_empty() || point.key.len() > crate::state::METRIC_TEXT_LENGTH_MAX)
        {
            return Err(Status::invalid_argument(format!(
                "metric point {:?} has no valid name; expected 1 to {} bytes",
                point.key,
                crate::state::METRIC_TEXT_LENGTH_MAX
            )));
        }
        for (name, location) in &request.artifacts {
            let limit = crate::state::METRIC_TEXT_LENGTH_MAX;
            if name.is_empty() || name.len() > limit || location.len() > limit {
                return Err(Status::invalid_argument(format!(
                    "artifact {name:?} is not valid; expected a name and location of 1 to {limit} bytes"
                )));
            }
        }
        let points = request
            .points
            .into_iter()
            .map(|point| {
                let value = crate::tracking::MetricPoint {
                    value: point.value,
                    timestamp_ms: point.timestamp_ms,
                    step: point.step,
                };
                (point.key, value)
            })
            .collect();
        self.execute(Request::ReportMetrics(crate::state::Report {
            job: request.job_id,
            attempt: request.attempt,
            sequence: request.sequence,
            metrics: request.metrics.into_iter().collect(),
            points,
            artifacts: request.artifacts.into_iter().collect(),
            now_ms: 0,
        }))
        .await?;
        Ok(Response::new(pb::ReportMetricsResponse {}))
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
                after_id: 0,
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

    pub(super) async fn cluster_status(&self) -> Result<pb::ClusterStatus, CoordinatorError> {
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
