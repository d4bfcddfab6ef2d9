//! Kiln's feature store. So far: definitions checked against their data ([`definitions`]) and the
//! point-in-time join ([`pit`]), the step that turns feature views and entity rows into a training set.
//! Replicating definitions through the coordinator, the online store and the Arrow Flight server come next
//! (see the feature-store issue).

pub mod definitions;
pub mod pit;

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
}
