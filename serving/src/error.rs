//! The serving tier's one error type, mapped to HTTP statuses and gRPC codes in one place.

use axum::http::StatusCode;

/// What went wrong with a request, and so whose fault it is and whether retrying helps.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// The request is malformed or does not match the model (a wrong shape, datatype or name): the
    /// client's fault; the same request fails again.
    #[error("{0}")]
    InvalidInput(String),
    /// No such model or version is loaded here.
    #[error("{0}")]
    NotFound(String),
    /// The model is loaded but not yet warmed up, or being replaced: retry.
    #[error("model '{0}' is not ready")]
    NotReady(String),
    /// The model's queue is at its bound: retry after a moment (HTTP 503 with Retry-After).
    #[error("model '{model}' has {capacity} requests waiting, its queue's limit; retry shortly")]
    QueueFull { model: String, capacity: usize },
    /// The model failed on a valid request: the server's fault.
    #[error("model '{model}' failed: {message}")]
    Model { model: String, message: String },
    /// The server is stopping: retry on another replica.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl ServeError {
    pub fn invalid(message: impl Into<String>) -> ServeError {
        ServeError::InvalidInput(message.into())
    }

    /// Whether the same request may succeed if sent again (to this or another replica).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ServeError::NotReady(_) | ServeError::QueueFull { .. } | ServeError::ShuttingDown
        )
    }

    /// A short label for the `reason` of the error counter.
    pub fn reason(&self) -> &'static str {
        match self {
            ServeError::InvalidInput(_) => "invalid_input",
            ServeError::NotFound(_) => "not_found",
            ServeError::NotReady(_) => "not_ready",
            ServeError::QueueFull { .. } => "queue_full",
            ServeError::Model { .. } => "model_error",
            ServeError::ShuttingDown => "shutting_down",
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ServeError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::Model { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ServeError::NotReady(_) | ServeError::QueueFull { .. } | ServeError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    pub fn grpc_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            ServeError::InvalidInput(_) => tonic::Status::invalid_argument(message),
            ServeError::NotFound(_) => tonic::Status::not_found(message),
            ServeError::Model { .. } => tonic::Status::internal(message),
            // UNAVAILABLE is the code gRPC clients treat as safe to retry.
            ServeError::NotReady(_) | ServeError::QueueFull { .. } | ServeError::ShuttingDown => {
                tonic::Status::unavailable(message)
            }
        }
    }
}
