//! The feature server's HTTP/JSON endpoints, on the same port as Flight (HTTP/1.1 beside gRPC's HTTP/2), in
//! the shape of Feast's Python feature server so that code written against it works unchanged:
//!
//! ```text
//!   GET  /health                 200 {"status": "ok"}
//!   POST /get-online-features    {"feature_service": S | "features": ["view:feature" | "view", …],
//!                                 "entities": {"driver_id": [1001, 1002]}, "full_feature_names": false}
//!                                ──► {"metadata": {"feature_names": [keys…, features…]},
//!                                     "results": [{"values": […], "statuses": […], "event_timestamps": […]}, …]}
//!                                    one result per column (keys first), one entry per entity;
//!                                    statuses PRESENT or NOT_FOUND
//!   POST /push                   {"push_source_name": S, "df": {"column": [values…], …},
//!                                 "to": "online" | "offline" | "online_and_offline"}
//!                                ──► {"source": S, "rows": N} once the rows are durable
//! ```
//!
//! Bad input gets 400 (an unknown route 404) with `{"error": MESSAGE}` naming what is wrong; nothing is
//! written. Values are JSON numbers, strings, booleans, lists of numbers, timestamps as RFC 3339 strings and
//! bytes as base64.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use serde::Deserialize;

use super::{FeatureServer, Lookup, PushTarget, arrow_type};
use crate::FeatureStoreError;
use crate::definitions::{Definitions, Source};
use crate::online::Value;

/// The most bytes one HTTP request body may carry.
const BODY_BYTES_MAX: usize = 64 << 20;

/// The HTTP routes, to merge with the gRPC services on one port.
pub fn router(server: FeatureServer) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/get-online-features", post(get_online_features))
        .route("/push", post(push))
        .fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(server)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("a valid response")
}

fn error_response(status: StatusCode, message: String) -> Response {
    json_response(status, &serde_json::json!({ "error": message }))
}

fn answer(result: Result<serde_json::Value, FeatureStoreError>) -> Response {
    match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(FeatureStoreError::InvalidInput(message)) => error_response(StatusCode::BAD_REQUEST, message),
        Err(other) => error_response(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], expected: &str) -> Result<T, FeatureStoreError> {
    serde_json::from_slice(body).map_err(|error| {
        FeatureStoreError::InvalidInput(format!("the request body is not valid ({error}); expected {expected}"))
    })
}

async fn health() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// gRPC calls to a service this port does not serve get gRPC's UNIMPLEMENTED; anything else a 404 naming
/// the routes there are.
async fn fallback(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    if grpc {
        let status = tonic::Status::unimplemented(format!("{} is not served here", uri.path()));
        return status.into_http::<Body>();
    }
    error_response(
        StatusCode::NOT_FOUND,
        format!(
            "{method} {} is not a route of the feature server; expected GET /health, POST /get-online-features or POST /push",
            uri.path()
        ),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnlineRequest {
    #[serde(default)]
    feature_service: Option<String>,
    #[serde(default)]
    features: Option<Vec<String>>,
    entities: BTreeMap<String, Vec<serde_json::Value>>,
    #[serde(default)]
    full_feature_names: bool,
}

const ONLINE_EXPECTED: &str = "{\"feature_service\": NAME or \"features\": [\"view:feature\", …], \"entities\": {\"KEY\": [VALUES…]}, \"full_feature_names\": false}";

async fn get_online_features(State(server): State<FeatureServer>, body: Bytes) -> Response {
    answer(online_features(&server, &body))
}

fn online_features(server: &FeatureServer, body: &[u8]) -> Result<serde_json::Value, FeatureStoreError> {
    let request: OnlineRequest = parse(body, ONLINE_EXPECTED)?;
    let registered = server.registered();
    let definitions = &registered.definitions;
    let features = match (&request.feature_service, &request.features) {
        (Some(service), None) => definitions.service(service)?.features.clone(),
        (None, Some(features)) => definitions.features_named(features)?,
        _ => {
            return Err(FeatureStoreError::InvalidInput(format!(
                "name either a feature_service or a list of features, not both or neither; expected {ONLINE_EXPECTED}"
            )));
        }
    };
    if request.entities.is_empty() {
        return Err(FeatureStoreError::InvalidInput(format!(
            "no entities were given; expected {ONLINE_EXPECTED}"
        )));
    }
    let lookup = server.lookup(&registered, &features, &request.entities)?;
    Ok(online_response(&lookup, request.full_feature_names))
}

/// Feast's response: a result per column (entity keys first, then features), an entry per entity.
fn online_response(lookup: &Lookup, full_feature_names: bool) -> serde_json::Value {
    let epoch = serde_json::Value::from(timestamp_text(0));
    let mut names = Vec::new();
    let mut results = Vec::new();
    for (key, values) in &lookup.keys {
        names.push(serde_json::Value::from(key.as_str()));
        results.push(serde_json::json!({
            "values": values.iter().map(json_value).collect::<Vec<_>>(),
            "statuses": vec!["PRESENT"; values.len()],
            "event_timestamps": vec![epoch.clone(); values.len()],
        }));
    }
    for feature in &lookup.features {
        let name = if full_feature_names {
            format!("{}__{}", feature.view, feature.name)
        } else {
            feature.name.clone()
        };
        names.push(name.into());
        results.push(serde_json::json!({
            "values": feature.values.iter().map(json_value).collect::<Vec<_>>(),
            "statuses": feature
                .timestamps_micros
                .iter()
                .map(|time| if time.is_some() { "PRESENT" } else { "NOT_FOUND" })
                .collect::<Vec<_>>(),
            "event_timestamps": feature
                .timestamps_micros
                .iter()
                .map(|time| serde_json::Value::from(timestamp_text(time.unwrap_or(0))))
                .collect::<Vec<_>>(),
        }));
    }
    serde_json::json!({ "metadata": { "feature_names": names }, "results": results })
}

/// RFC 3339 in UTC with microseconds, as far back as the epoch; earlier times as their microsecond count.
fn timestamp_text(micros: i64) -> String {
    match u64::try_from(micros) {
        Ok(micros) => {
            humantime::format_rfc3339_micros(std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros))
                .to_string()
        }
        Err(_) => micros.to_string(),
    }
}

fn json_value(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Int(value) => (*value).into(),
        Value::Float(value) => serde_json::Number::from_f64(*value).map_or(serde_json::Value::Null, Into::into),
        Value::Text(text) => text.as_str().into(),
        Value::Bool(value) => (*value).into(),
        Value::Timestamp(micros) => timestamp_text(*micros).into(),
        Value::FloatList(items) => items
            .iter()
            .map(|item| serde_json::Number::from_f64(*item).map_or(serde_json::Value::Null, Into::into))
            .collect(),
        Value::Bytes(bytes) => base64::engine::general_purpose::STANDARD.encode(bytes).into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    push_source_name: String,
    df: BTreeMap<String, Vec<serde_json::Value>>,
    #[serde(default)]
    to: PushTarget,
    /// Feast's flag for accepting pushes while the feature server is read-only; there is no such mode here.
    #[serde(default)]
    #[allow(dead_code)]
    allow_registry_cache: Option<bool>,
}

const PUSH_EXPECTED: &str = "{\"push_source_name\": SOURCE, \"df\": {\"COLUMN\": [VALUES…], …}, \"to\": \"online\" | \"offline\" | \"online_and_offline\"}";

async fn push(State(server): State<FeatureServer>, body: Bytes) -> Response {
    let result = async {
        let request: PushRequest = parse(&body, PUSH_EXPECTED)?;
        let registered = server.registered();
        let definitions = &registered.definitions;
        let source = definitions.push_source(&request.push_source_name)?;
        let batch = push_batch(definitions, source, &request.df)?;
        let rows = server.push(&source.name, vec![batch], request.to).await?;
        Ok(serde_json::json!({ "source": source.name, "rows": rows }))
    }
    .await;
    answer(result)
}

/// The pushed columns as one batch: the timestamp field as a timestamp, a column a view of the source
/// declares as a feature with that feature's type, any other column with the type its values show.
fn push_batch(
    definitions: &Definitions,
    source: &Source,
    df: &BTreeMap<String, Vec<serde_json::Value>>,
) -> Result<RecordBatch, FeatureStoreError> {
    let rows = df.values().map(Vec::len).max().unwrap_or(0);
    if rows == 0 {
        return Err(FeatureStoreError::InvalidInput(format!(
            "the push carries no rows; expected {PUSH_EXPECTED}"
        )));
    }
    if let Some((name, values)) = df.iter().find(|(_, values)| values.len() != rows) {
        return Err(FeatureStoreError::InvalidInput(format!(
            "column '{name}' has {} values but another has {rows}; expected every column to have one value per row",
            values.len()
        )));
    }
    let mut fields = Vec::new();
    for (name, values) in df {
        let declared = definitions
            .views
            .iter()
            .filter(|view| view.source == source.name)
            .flat_map(|view| view.features.iter())
            .find(|feature| &feature.name == name)
            .map(|feature| arrow_type(feature.dtype));
        let data_type = if *name == source.timestamp_field {
            DataType::Timestamp(TimeUnit::Microsecond, None)
        } else if let Some(declared) = declared {
            declared
        } else {
            inferred_type(name, values)?
        };
        fields.push(Field::new(name, data_type, true));
    }
    let schema = Arc::new(Schema::new(fields));
    let records: Vec<serde_json::Map<String, serde_json::Value>> = (0..rows)
        .map(|row| {
            df.iter()
                .map(|(name, values)| (name.clone(), values[row].clone()))
                .collect()
        })
        .collect();
    let convert = || -> Result<Option<RecordBatch>, datafusion::arrow::error::ArrowError> {
        let mut decoder = datafusion::arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(rows)
            .build_decoder()?;
        decoder.serialize(&records)?;
        decoder.flush()
    };
    let batch = convert().map_err(|error| {
        FeatureStoreError::InvalidInput(format!(
            "the pushed columns do not convert to their types ({error}); the schema is {}",
            schema
                .fields()
                .iter()
                .map(|field| format!("{}: {}", field.name(), field.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    batch.ok_or_else(|| FeatureStoreError::InvalidInput("the push carries no rows".into()))
}

/// The type of a column no view declares, from its values: integers, floats, text, booleans or lists of
/// numbers.
fn inferred_type(name: &str, values: &[serde_json::Value]) -> Result<DataType, FeatureStoreError> {
    let mut data_type: Option<DataType> = None;
    for value in values {
        let this = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::Number(number) if number.is_i64() || number.is_u64() => DataType::Int64,
            serde_json::Value::Number(_) => DataType::Float64,
            serde_json::Value::String(_) => DataType::Utf8,
            serde_json::Value::Bool(_) => DataType::Boolean,
            serde_json::Value::Array(_) => DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            serde_json::Value::Object(_) => {
                return Err(FeatureStoreError::InvalidInput(format!(
                    "column '{name}' holds an object; expected numbers, strings, booleans or lists of numbers"
                )));
            }
        };
        data_type = Some(match (data_type, this) {
            (None, this) => this,
            (Some(DataType::Int64), DataType::Float64) | (Some(DataType::Float64), DataType::Int64) => {
                DataType::Float64
            }
            (Some(previous), this) if previous == this => previous,
            (Some(previous), this) => {
                return Err(FeatureStoreError::InvalidInput(format!(
                    "column '{name}' mixes {previous} and {this} values; expected one type per column"
                )));
            }
        });
    }
    Ok(data_type.unwrap_or(DataType::Utf8))
}
