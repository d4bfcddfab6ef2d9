//! The client the CLI, the benchmark and the tests use: a list of coordinator addresses, failover between
//! them, and retries for errors that another node or a moment later can fix.
//!
//! Any coordinator accepts any request (followers forward writes to the leader), so the client only has
//! to find one that answers. Writes carry an idempotency key, so retrying one never applies it twice.

use std::future::Future;
use std::time::{Duration, Instant};

use kiln_proto as pb;
use pb::catalog_service_client::CatalogServiceClient;
use pb::cluster_service_client::ClusterServiceClient;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::CoordinatorError;
use crate::server::validate_host_port;

/// A failover client over comma-separated coordinator addresses.
#[derive(Clone)]
pub struct Client {
    endpoints: Vec<(String, Channel)>,
    /// Index of the endpoint that answered last; tried first.
    preferred: usize,
    /// How long one call may keep retrying across endpoints.
    pub retry_deadline: Duration,
}

/// How long the client keeps trying when no coordinator accepts a connection at all.
const NOBODY_THERE_AFTER: Duration = Duration::from_secs(3);

/// A failure to reach the server at all (refused, unroutable), as opposed to an answer from it: tonic
/// attaches the transport error as the status's source only in that case.
fn is_connection_failure(status: &Status) -> bool {
    status.code() == Code::Unavailable && std::error::Error::source(status).is_some()
}

fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::ResourceExhausted
    )
}

/// A fresh idempotency key: unique per process, call and moment, with no central coordination.
pub fn new_idempotency_key() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!(
        "{:x}-{nanos:x}-{:x}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

impl Client {
    /// `addresses` is `HOST:PORT[,HOST:PORT…]`. Connections are made lazily.
    pub fn new(addresses: &str) -> Result<Client, CoordinatorError> {
        let mut endpoints = Vec::new();
        for address in addresses
            .split(',')
            .map(str::trim)
            .filter(|address| !address.is_empty())
        {
            validate_host_port(address)?;
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .map_err(|error| CoordinatorError::InvalidArgument(format!("address '{address}': {error}")))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(20))
                .connect_lazy();
            endpoints.push((address.to_string(), channel));
        }
        if endpoints.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "no coordinator address given; expected HOST:PORT[,HOST:PORT…]".into(),
            ));
        }
        Ok(Client {
            endpoints,
            preferred: 0,
            retry_deadline: Duration::from_secs(30),
        })
    }

    pub fn addresses(&self) -> Vec<String> {
        self.endpoints.iter().map(|(address, _)| address.clone()).collect()
    }

    /// Calls `call` on the preferred endpoint; on an error another node or a later try may fix, moves
    /// to the next endpoint, backing off after each full round, until `retry_deadline`.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let deadline = started + self.retry_deadline;
        let mut backoff = Duration::from_millis(50);
        let mut attempts = 0usize;
        // Whether any coordinator answered at all (even with an error): if none can even be connected
        // to for a while, nothing is running there and waiting out the whole deadline helps no one.
        let mut any_answered = false;
        loop {
            let index = (self.preferred + attempts) % self.endpoints.len();
            let (address, channel) = &self.endpoints[index];
            // No single attempt may outlive the whole call's deadline.
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let outcome = tokio::time::timeout(remaining, call(channel.clone()))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded(format!("no answer from {address} in time"))));
            any_answered |= !matches!(&outcome, Err(status) if is_connection_failure(status));
            match outcome {
                Ok(value) => {
                    self.preferred = index;
                    return Ok(value);
                }
                Err(status) if !any_answered && started.elapsed() >= NOBODY_THERE_AFTER => {
                    return Err(Status::unavailable(format!(
                        "cannot connect to any coordinator at {} ({}); is one running there? (`kiln up` starts one)",
                        self.addresses().join(", "),
                        status.message()
                    )));
                }
                Err(status) if retryable(&status) && Instant::now() < deadline => {
                    tracing::debug!(%address, %status, "coordinator call failed; trying the next one");
                }
                Err(status) if retryable(&status) => {
                    return Err(Status::new(
                        status.code(),
                        format!(
                            "no coordinator could answer within {} s (tried {}); last error from {address}: {}",
                            self.retry_deadline.as_secs(),
                            self.addresses().join(", "),
                            status.message()
                        ),
                    ));
                }
                Err(status) => return Err(status),
            }
            attempts += 1;
            if attempts.is_multiple_of(self.endpoints.len()) {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }

    pub async fn submit(
        &mut self,
        spec_toml: &str,
        source_name: &str,
        idempotency_key: &str,
    ) -> Result<pb::SubmitJobResponse, Status> {
        let request = pb::SubmitJobRequest {
            spec_toml: spec_toml.to_string(),
            idempotency_key: idempotency_key.to_string(),
            source_name: source_name.to_string(),
        };
        self.call(|channel| {
            let request = request.clone();
            async move { Ok(JobServiceClient::new(channel).submit(request).await?.into_inner()) }
        })
        .await
    }

    pub async fn get_job(&mut self, id: u64) -> Result<pb::Job, Status> {
        self.call(|channel| async move {
            Ok(JobServiceClient::new(channel)
                .get(pb::GetJobRequest { id })
                .await?
                .into_inner())
        })
        .await
    }

    pub async fn list_jobs(&mut self, states: Vec<pb::JobState>, limit: u32) -> Result<Vec<pb::Job>, Status> {
        self.list_jobs_after(states, limit, 0).await
    }

    /// One page: jobs with an id above `after_id`.
    pub async fn list_jobs_after(
        &mut self,
        states: Vec<pb::JobState>,
        limit: u32,
        after_id: u64,
    ) -> Result<Vec<pb::Job>, Status> {
        let request = pb::ListJobsRequest {
            states: states.into_iter().map(|state| state as i32).collect(),
            limit,
            after_id,
        };
        self.call(|channel| {
            let request = request.clone();
            async move { Ok(JobServiceClient::new(channel).list(request).await?.into_inner().jobs) }
        })
        .await
    }

    pub async fn cancel_job(&mut self, id: u64, reason: &str) -> Result<pb::Job, Status> {
        let request = pb::CancelJobRequest {
            id,
            reason: reason.to_string(),
        };
        self.call(|channel| {
            let request = request.clone();
            async move { Ok(JobServiceClient::new(channel).cancel(request).await?.into_inner()) }
        })
        .await
    }

    /// Opens a watch on one endpoint that answers; the stream ends with an error if that node goes away.
    pub async fn watch_jobs(&mut self, ids: Vec<u64>) -> Result<tonic::Streaming<pb::JobEvent>, Status> {
        self.call(|channel| {
            let request = pb::WatchJobsRequest { ids: ids.clone() };
            async move { Ok(JobServiceClient::new(channel).watch(request).await?.into_inner()) }
        })
        .await
    }

    pub async fn cluster_status(&mut self) -> Result<pb::ClusterStatus, Status> {
        self.call(|channel| async move {
            Ok(ClusterServiceClient::new(channel)
                .status(pb::ClusterStatusRequest {})
                .await?
                .into_inner())
        })
        .await
    }

    pub async fn members(&mut self) -> Result<pb::MembersResponse, Status> {
        self.call(|channel| async move {
            Ok(ClusterServiceClient::new(channel)
                .members(pb::MembersRequest {})
                .await?
                .into_inner())
        })
        .await
    }

    pub async fn add_member(&mut self, id: u64, raft_addr: &str, learner: bool) -> Result<pb::ClusterStatus, Status> {
        let request = pb::AddMemberRequest {
            id,
            raft_addr: raft_addr.to_string(),
            learner,
        };
        self.call(|channel| {
            let request = request.clone();
            async move {
                Ok(ClusterServiceClient::new(channel)
                    .add_member(request)
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    pub async fn remove_member(&mut self, id: u64) -> Result<pb::ClusterStatus, Status> {
        self.call(|channel| async move {
            Ok(ClusterServiceClient::new(channel)
                .remove_member(pb::RemoveMemberRequest { id })
                .await?
                .into_inner())
        })
        .await
    }

    pub async fn transfer_leader(&mut self, id: u64) -> Result<pb::ClusterStatus, Status> {
        self.call(|channel| async move {
            Ok(ClusterServiceClient::new(channel)
                .transfer_leader(pb::TransferLeaderRequest { id })
                .await?
                .into_inner())
        })
        .await
    }

    /// Sends one report; `request.sequence` (1, 2, … per attempt) makes its retries harmless.
    pub async fn report_metrics(&mut self, request: pb::ReportMetricsRequest) -> Result<(), Status> {
        self.call(|channel| {
            let request = request.clone();
            async move {
                JobServiceClient::new(channel).report_metrics(request).await?;
                Ok(())
            }
        })
        .await
    }

    /// Applies catalog objects to a namespace at once (see the catalog service). Retrying is harmless: an
    /// object equal to its current version is unchanged.
    pub async fn apply_catalog(
        &mut self,
        namespace: &str,
        objects: Vec<pb::CatalogDraft>,
        replace: bool,
    ) -> Result<Vec<pb::AppliedCatalogObject>, Status> {
        let request = pb::ApplyCatalogRequest {
            namespace: namespace.to_string(),
            objects,
            replace,
        };
        self.call(|channel| {
            let request = request.clone();
            async move {
                Ok(CatalogServiceClient::new(channel)
                    .apply(request)
                    .await?
                    .into_inner()
                    .objects)
            }
        })
        .await
    }

    pub async fn list_catalog(
        &mut self,
        namespace: &str,
        include_deleted: bool,
        include_history: bool,
    ) -> Result<Vec<pb::CatalogObject>, Status> {
        let request = pb::ListCatalogRequest {
            namespace: namespace.to_string(),
            include_deleted,
            include_history,
        };
        self.call(|channel| {
            let request = request.clone();
            async move {
                Ok(CatalogServiceClient::new(channel)
                    .list(request)
                    .await?
                    .into_inner()
                    .objects)
            }
        })
        .await
    }

    pub async fn list_workers(&mut self) -> Result<Vec<pb::WorkerInfo>, Status> {
        self.call(|channel| async move {
            Ok(WorkerServiceClient::new(channel)
                .list(pb::ListWorkersRequest {})
                .await?
                .into_inner()
                .workers)
        })
        .await
    }

    pub async fn get_worker(&mut self, id: u64) -> Result<pb::WorkerInfo, Status> {
        self.call(|channel| async move {
            Ok(WorkerServiceClient::new(channel)
                .get(pb::GetWorkerRequest { id })
                .await?
                .into_inner())
        })
        .await
    }

    /// Waits until the job has finished and returns it; survives the loss of the node it watches.
    pub async fn wait_job(&mut self, id: u64) -> Result<pb::Job, Status> {
        loop {
            let job = self.get_job(id).await?;
            if is_finished(job.state) {
                return Ok(job);
            }
            let mut stream = self.watch_jobs(vec![id]).await?;
            // Ends when the watched node goes away or the watch falls behind: read again, then watch again.
            while let Ok(Some(event)) = stream.message().await {
                if let Some(job) = event.job.filter(|job| is_finished(job.state)) {
                    return Ok(job);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Succeeded, failed or cancelled.
pub fn is_finished(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}
