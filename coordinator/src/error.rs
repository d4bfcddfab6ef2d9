//! The coordinator's one error type. Each variant says who is at fault and whether a retry can help;
//! [`CoordinatorError::to_status`] is the one place errors become gRPC statuses.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CoordinatorError {
    /// The caller sent something wrong; retrying the same request fails the same way.
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (cancel a finished job, add a member twice).
    #[error("{0}")]
    FailedPrecondition(String),
    /// This node cannot serve writes; the leader, when known, can. Retry there.
    #[error("node {node_id} is not the leader (leader: {})", leader_id.map_or("unknown".to_string(), |id| id.to_string()))]
    NotLeader { node_id: u64, leader_id: Option<u64> },
    /// The cluster cannot answer now (no leader, no quorum, leadership changed mid-request). Retry.
    #[error("{0}")]
    Unavailable(String),
    /// The request took longer than its deadline; it may or may not have taken effect. Retry with the
    /// same idempotency key.
    #[error("{0}")]
    Timeout(String),
    /// The local disk or database failed; this node stops serving.
    #[error("storage: {0}")]
    Storage(String),
    /// A bug or a corrupt message between nodes.
    #[error("internal: {0}")]
    Internal(String),
}

impl CoordinatorError {
    /// True when the same request may succeed later or on another node.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CoordinatorError::NotLeader { .. } | CoordinatorError::Unavailable(_) | CoordinatorError::Timeout(_)
        )
    }

    pub fn to_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            CoordinatorError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            CoordinatorError::NotFound(_) => tonic::Status::not_found(message),
            CoordinatorError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            CoordinatorError::NotLeader { .. } | CoordinatorError::Unavailable(_) => {
                tonic::Status::unavailable(message)
            }
            CoordinatorError::Timeout(_) => tonic::Status::deadline_exceeded(message),
            CoordinatorError::Storage(_) | CoordinatorError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(error: CoordinatorError) -> tonic::Status {
        error.to_status()
    }
}
