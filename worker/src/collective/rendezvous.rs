//! Forming a group through the coordinator: every rank of an attempt publishes its ring address and
//! learns everyone else's. The attempt number is the group's epoch: the leader refuses ranks of an attempt
//! that is over, and the ring handshake refuses connections that carry another epoch.

use std::time::{Duration, Instant};

use kiln_proto as pb;
use pb::worker_service_client::WorkerServiceClient;
use tonic::Code;

use super::{CollectiveConfig, CollectiveError, RingCommunicator};

/// Where a rank stands, as its worker describes it in the task's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnvironment {
    pub coordinators: Vec<String>,
    pub job: u64,
    pub attempt: u32,
    pub rank: u32,
    pub world_size: u32,
    /// The host this rank's worker is reached at; the ring listener binds there.
    pub host: String,
}

impl RankEnvironment {
    /// Reads `KILN_COORDINATOR`, `KILN_JOB_ID`, `KILN_ATTEMPT`, `RANK`, `WORLD_SIZE` and `KILN_HOST`.
    pub fn from_environment() -> Result<RankEnvironment, CollectiveError> {
        let read = |name: &str| {
            std::env::var(name).map_err(|_| {
                CollectiveError::InvalidArgument(format!(
                    "environment variable {name} is not set; this runs as a rank of a Kiln job"
                ))
            })
        };
        let number = |name: &str| -> Result<u64, CollectiveError> {
            let text = read(name)?;
            text.parse().map_err(|_| {
                CollectiveError::InvalidArgument(format!("environment variable {name} is '{text}', not a number"))
            })
        };
        Ok(RankEnvironment {
            coordinators: read("KILN_COORDINATOR")?
                .split(',')
                .map(|address| address.trim().to_string())
                .filter(|address| !address.is_empty())
                .collect(),
            job: number("KILN_JOB_ID")?,
            attempt: number("KILN_ATTEMPT")? as u32,
            rank: number("RANK")? as u32,
            world_size: number("WORLD_SIZE")? as u32,
            host: read("KILN_HOST").unwrap_or_else(|_| "127.0.0.1".into()),
        })
    }
}

/// Publishes `address` (and rank 0's `blob`) and waits for every rank of the attempt; returns every
/// rank's address by rank and rank 0's blob. Follows the leader across coordinators until `timeout`.
pub async fn rendezvous(
    environment: &RankEnvironment,
    address: &str,
    blob: Vec<u8>,
    timeout: Duration,
) -> Result<(Vec<String>, Vec<u8>), CollectiveError> {
    if environment.coordinators.is_empty() {
        return Err(CollectiveError::InvalidArgument(
            "no coordinator address to rendezvous through".into(),
        ));
    }
    let deadline = Instant::now() + timeout;
    let mut attempt = 0usize;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        let coordinator = &environment.coordinators[attempt % environment.coordinators.len()];
        attempt += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let request = pb::RendezvousRequest {
            job_id: environment.job,
            attempt: environment.attempt,
            rank: environment.rank,
            world_size: environment.world_size,
            address: address.to_string(),
            blob: blob.clone(),
            timeout_ms: remaining.as_millis().min(u128::from(u32::MAX)) as u32,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{coordinator}"))
            .map_err(|error| CollectiveError::InvalidArgument(format!("coordinator '{coordinator}': {error}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let answer = match endpoint.connect().await {
            Ok(channel) => WorkerServiceClient::new(channel).rendezvous(request).await,
            Err(error) => Err(tonic::Status::unavailable(error.to_string())),
        };
        match answer {
            Ok(response) => {
                let response = response.into_inner();
                return Ok((response.addresses, response.blob));
            }
            Err(status)
                if matches!(
                    status.code(),
                    Code::FailedPrecondition | Code::InvalidArgument | Code::NotFound | Code::DeadlineExceeded
                ) =>
            {
                return Err(CollectiveError::Rendezvous(status.message().to_string()));
            }
            Err(status) => {
                last_error = format!("{coordinator}: {}", status.message());
                if attempt.is_multiple_of(environment.coordinators.len()) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    Err(CollectiveError::Rendezvous(format!(
        "no leader answered within {} s (last: {last_error})",
        timeout.as_secs_f64()
    )))
}

/// Binds this rank's listener, meets the other ranks through the coordinator, and joins the ring.
pub async fn join(
    environment: &RankEnvironment,
    config: CollectiveConfig,
) -> Result<RingCommunicator, CollectiveError> {
    join_with_blob(environment, config, Vec::new())
        .await
        .map(|(ring, _)| ring)
}

/// [`join`], also handing rank 0's `blob` to every rank.
async fn join_with_blob(
    environment: &RankEnvironment,
    config: CollectiveConfig,
    blob: Vec<u8>,
) -> Result<(RingCommunicator, Vec<u8>), CollectiveError> {
    let (listener, address) = RingCommunicator::bind(&environment.host).map_err(|error| {
        CollectiveError::InvalidArgument(format!("binding a ring listener on {}: {error}", environment.host))
    })?;
    let (addresses, blob) = rendezvous(environment, &address.to_string(), blob, config.timeout).await?;
    let (rank, epoch) = (environment.rank, u64::from(environment.attempt));
    let ring =
        tokio::task::spawn_blocking(move || RingCommunicator::connect(listener, rank, &addresses, epoch, config))
            .await
            .map_err(|error| CollectiveError::InvalidArgument(format!("joining the ring: {error}")))??;
    Ok((ring, blob))
}

/// What [`join_preferring_nccl`] joined.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub enum Joined {
    Ring(RingCommunicator),
    Nccl(NcclInvite),
}

/// Meets the attempt's other ranks and joins the TCP ring; when rank 0 has a GPU and NCCL, the group uses
/// NCCL instead. Rank 0 decides for everyone (its NCCL unique id travels in the rendezvous blob; none means
/// the ring), so ranks never split between the two. The ring is joined first either way, so a rank of
/// another attempt (another epoch) never reaches NCCL. NCCL's communicator cannot move between threads:
/// the thread that will use it calls [`NcclInvite::join`].
#[cfg(feature = "cuda")]
pub async fn join_preferring_nccl(
    environment: &RankEnvironment,
    config: CollectiveConfig,
    gpu_rank: bool,
) -> Result<Joined, CollectiveError> {
    let id = if environment.rank == 0 && gpu_rank && super::nccl::is_available() {
        tokio::task::spawn_blocking(super::nccl::unique_id)
            .await
            .map_err(|error| CollectiveError::InvalidArgument(format!("creating the NCCL id: {error}")))??
    } else {
        Vec::new()
    };
    let timeout = config.timeout;
    let (ring, id) = join_with_blob(environment, config, id).await?;
    if id.is_empty() {
        return Ok(Joined::Ring(ring));
    }
    if !super::nccl::is_available() {
        return Err(CollectiveError::InvalidArgument(format!(
            "rank 0 chose NCCL for this group, but the CUDA driver or libnccl cannot be loaded on rank {}'s host",
            environment.rank
        )));
    }
    Ok(Joined::Nccl(NcclInvite {
        ring,
        id,
        timeout,
        rank: environment.rank,
        world_size: environment.world_size,
    }))
}

/// Everything needed to join an NCCL group, from [`join_preferring_nccl`].
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct NcclInvite {
    ring: RingCommunicator,
    id: Vec<u8>,
    timeout: Duration,
    rank: u32,
    world_size: u32,
}

#[cfg(feature = "cuda")]
impl NcclInvite {
    /// Joins on GPU `device` (an ordinal among the visible ones); blocks until every rank has joined.
    pub fn join(self, device: usize) -> Result<super::NcclCommunicator, CollectiveError> {
        let communicator = super::NcclCommunicator::new(device, self.rank, self.world_size, &self.id, self.timeout);
        drop(self.ring);
        communicator
    }
}
