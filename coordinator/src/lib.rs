//! The Kiln coordinator: a Raft group (raft-rs) that replicates the cluster's control state.
//!
//! ```text
//!            ┌──────────── coordinator process ─────────────┐
//!  clients ─►│ gRPC :7070  JobService, ClusterService       │
//!            │      │ writes (forwarded to the leader)       │
//!            │      ▼                                       │
//!            │  event loop ── Node (RawNode + StateMachine) │
//!            │      │  ▲            │ fsync                 │
//!            │      ▼  │            ▼                       │
//!  peers  ◄─►│ gRPC :7071 RaftPeer  LogStore (redb)         │
//!            └──────────────────────────────────────────────┘
//! ```
//!
//! Module map: [`spec`] parses job TOML; [`catalog`] keeps other services' versioned documents; [`search`]
//! parses and evaluates MLflow's run search language; [`tracking`] holds experiments and runs with MLflow's
//! rules, replicated through [`state`]'s `Track` command and served as MLflow's REST API by
//! `server::mlflow`; [`state`] is the deterministic state machine; [`scheduler`] the
//! pure placement function the leader runs; [`storage`] the
//! durable raft log; [`node`] the sans-IO consensus node; [`server`] the event loop, peer transport and
//! gRPC services; [`client`] the failover client the CLI and tests use.
//!
//! Invariants (DESIGN.md): an acknowledged write survives the loss of any minority and a restart of all;
//! apply is deterministic; a retried submission with the same idempotency key never creates a second job.
//!
//! Left out for now: the scheduler, workers and everything past jobs; those issues extend the state
//! machine with new commands (and bump the snapshot format version).

pub mod artifacts;
pub mod catalog;
pub mod client;
pub mod deployment;
pub mod error;
pub mod lineage;
pub mod node;
pub mod registry;
pub mod scheduler;
pub mod search;
pub mod server;
pub mod spec;
pub mod state;
pub mod storage;
pub mod sweep;
pub mod tracking;

pub use error::CoordinatorError;
pub use server::{Coordinator, CoordinatorConfig};
