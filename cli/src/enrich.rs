//! Feature enrichment for served models: a request carries entity keys (`driver_id`) instead of the model's
//! input, and the features of a feature service are looked up for them in the feature store's online store
//! (one Flight `DoGet` per request, with the lookup as its ticket), in the service's order, as the model's
//! FP32 input `[keys, features]`. A deployment asks for it:
//!
//! ```toml
//! [features]
//! service = "driver_activity"   # the features, in order, that the model was trained on
//! entity = "driver_id"          # the key a request may carry instead of the model's input
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use arrow_flight::{FlightClient, Ticket};
use futures::TryStreamExt;
use kiln_featurestore::arrow::array::{Array, AsArray, RecordBatch};
use kiln_featurestore::arrow::datatypes::{DataType as ArrowType, Float32Type, Float64Type, Int32Type, Int64Type};
use kiln_featurestore::server::FlightCommand;
use kiln_serving::{DataType, Enricher, ServeError, Tensor};
use tonic::transport::Channel;

/// A deployment's `[features]`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSource {
    /// The feature service whose features, in order, make the model's input.
    pub service: String,
    /// The entity key a request carries instead.
    pub entity: String,
}

/// Looks features up in the online store of the feature server at one address.
pub struct OnlineFeatures {
    source: FeatureSource,
    /// The model's input that the features become.
    input: String,
    channel: Channel,
}

impl OnlineFeatures {
    /// An enricher for `source`'s features as the model input `input`, from the feature server at
    /// `address` (connected on first use).
    pub fn new(source: FeatureSource, input: &str, address: &str) -> anyhow::Result<OnlineFeatures> {
        use anyhow::Context;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .with_context(|| format!("feature server address '{address}'"))?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect_lazy();
        Ok(OnlineFeatures {
            source,
            input: input.to_string(),
            channel,
        })
    }

    async fn lookup(&self, keys: Tensor) -> Result<Tensor, ServeError> {
        let entity = &self.source.entity;
        if keys.shape.len() != 1 && !(keys.shape.len() == 2 && keys.shape[1] == 1) {
            return Err(ServeError::invalid(format!(
                "input '{entity}' has shape {:?}; entity keys are one per row, shape [N] or [N, 1]",
                keys.shape
            )));
        }
        let values: Vec<serde_json::Value> = match keys.datatype {
            DataType::Int64 | DataType::Int32 | DataType::Uint32 | DataType::Uint64 | DataType::Bytes => {
                keys.json_data().as_array().cloned().unwrap_or_default()
            }
            other => {
                return Err(ServeError::invalid(format!(
                    "input '{entity}' is {}; entity keys are INT64 or BYTES (strings)",
                    other.name()
                )));
            }
        };
        let rows = values.len();
        let command = FlightCommand::Online {
            service: self.source.service.clone(),
            entities: BTreeMap::from([(entity.clone(), values.clone())]),
        };
        let unavailable = |message: String| ServeError::Model {
            model: self.source.service.clone(),
            message,
        };
        let inner = arrow_flight::flight_service_client::FlightServiceClient::new(self.channel.clone());
        let mut client = FlightClient::new_from_inner(inner);
        let batches: Vec<RecordBatch> = client
            .do_get(Ticket::new(command.to_bytes()))
            .await
            .map_err(|error| unavailable(format!("looking up features online: {error}")))?
            .try_collect()
            .await
            .map_err(|error| unavailable(format!("looking up features online: {error}")))?;
        let mut features: Vec<f32> = Vec::new();
        let mut width = None;
        let mut row = 0;
        for batch in &batches {
            // The key column first, then each feature of the service.
            let columns = &batch.columns()[1..];
            if *width.get_or_insert(columns.len()) != columns.len() {
                return Err(unavailable("the online lookup's batches differ in width".into()));
            }
            for index in 0..batch.num_rows() {
                for (column, field) in columns.iter().zip(&batch.schema().fields()[1..]) {
                    let value = number(column.as_ref(), index).ok_or_else(|| {
                        let key = values.get(row).map(ToString::to_string).unwrap_or_default();
                        if column.is_null(index) {
                            ServeError::invalid(format!(
                                "{entity}={key} has no value of feature '{}' online (feature service '{}'); materialize it or push it first",
                                field.name(),
                                self.source.service
                            ))
                        } else {
                            ServeError::invalid(format!(
                                "feature '{}' is {}; only numeric features can be a model's input",
                                field.name(),
                                field.data_type()
                            ))
                        }
                    })?;
                    features.push(value);
                }
                row += 1;
            }
        }
        if row != rows {
            return Err(unavailable(format!(
                "the online lookup answered {row} rows for {rows} keys"
            )));
        }
        Ok(Tensor::from_f32(
            self.input.clone(),
            vec![rows, width.unwrap_or(0)],
            &features,
        ))
    }
}

/// Element `index` of a numeric column as f32; `None` when null or not numeric.
fn number(column: &dyn Array, index: usize) -> Option<f32> {
    if column.is_null(index) {
        return None;
    }
    Some(match column.data_type() {
        ArrowType::Float32 => column.as_primitive::<Float32Type>().value(index),
        ArrowType::Float64 => column.as_primitive::<Float64Type>().value(index) as f32,
        ArrowType::Int64 => column.as_primitive::<Int64Type>().value(index) as f32,
        ArrowType::Int32 => column.as_primitive::<Int32Type>().value(index) as f32,
        ArrowType::Boolean => f32::from(u8::from(column.as_boolean().value(index))),
        _ => return None,
    })
}

impl Enricher for OnlineFeatures {
    fn key(&self) -> &str {
        &self.source.entity
    }

    fn enrich<'a>(&'a self, keys: Tensor) -> Pin<Box<dyn Future<Output = Result<Tensor, ServeError>> + Send + 'a>> {
        Box::pin(self.lookup(keys))
    }
}
