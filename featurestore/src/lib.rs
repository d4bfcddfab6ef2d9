//! Kiln's feature store. So far: definitions checked against their data ([`definitions`]) and kept in the
//! coordinator's catalog ([`registry`]), the point-in-time join ([`pit`]) that turns feature views and
//! entity rows into a training set, the online store with materialization ([`online`]), and training sets
//! for a feature service with their content hash and view versions ([`training`]), and the Arrow Flight
//! feature server ([`server`]), which keeps Arrow IPC sources in memory ([`cache`]).

/// The arrow crate this one builds on (DataFusion's), for callers that handle its record batches.
pub use datafusion::arrow;

pub mod cache;
pub mod definitions;
pub mod online;
pub mod pit;
pub mod registry;
pub mod server;
pub mod training;

/// Why a feature-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FeatureStoreError {
    /// The request or the data is wrong; the message names what and what was expected.
    #[error("{0}")]
    InvalidInput(String),
    #[error("arrow: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error("datafusion: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("parquet: {0}")]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),
    /// Durable state (the online store, pushed rows, datasets) could not be read or written.
    #[error("storage: {0}")]
    Storage(String),
}
