//! Kiln's gRPC API, generated from `proto/kiln.proto` at build time by protox and tonic-prost-build.
//!
//! ```text
//!   kiln CLI / SDK ──JobService, ClusterService──► coordinator :7070
//!   coordinator ◄──────────── RaftPeer ──────────► coordinator :7071
//! ```
//!
//! Raft messages cross the wire as opaque bytes (`RaftBatch.messages`) because raft-rs encodes them with
//! rust-protobuf 2; decoding them is the coordinator's business, not this crate's.

#[allow(clippy::all, clippy::pedantic, missing_docs)] // generated code
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}

pub use v1::*;

/// The Open Inference Protocol v2 over gRPC (KServe / Triton), which the serving tier speaks on port 8001.
#[allow(clippy::all, clippy::pedantic, missing_docs)] // generated code
pub mod inference {
    tonic::include_proto!("inference");
}

/// The one etcd v3 KV method the `raft` benchmark uses to load an etcd baseline with the same client code.
#[allow(clippy::all, clippy::pedantic, missing_docs)] // generated code
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

impl JobState {
    /// The lower-case name users see: `queued`, `running`, `succeeded`, `failed`, `cancelled`.
    pub fn label(self) -> &'static str {
        match self {
            JobState::Unspecified => "unknown",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses the lower-case name back; `None` names no state.
    pub fn from_label(label: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|state| state.label() == label)
    }
}
