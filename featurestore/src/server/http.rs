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
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};

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

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
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
    match online_features(&server, &body) {
        Ok((lookup, full_feature_names)) => json_response(
            StatusCode::OK,
            &OnlineResponse {
                lookup: &lookup,
                full_feature_names,
            },
        ),
        Err(error) => answer(Err(error)),
    }
}

/// The lookup a `/get-online-features` body asks for, and whether it wants full feature names.
fn online_features(server: &FeatureServer, body: &[u8]) -> Result<(Lookup, bool), FeatureStoreError> {
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
    Ok((lookup, request.full_feature_names))
}

/// Feast's response: a result per column (entity keys first, then features), an entry per entity. It is
/// written straight from the lookup, with no JSON tree built in between.
struct OnlineResponse<'a> {
    lookup: &'a Lookup,
    full_feature_names: bool,
}

impl Serialize for OnlineResponse<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut response = serializer.serialize_map(Some(2))?;
        response.serialize_entry(
            "metadata",
            &Metadata {
                feature_names: FeatureNames(self),
            },
        )?;
        response.serialize_entry("results", &Results(self.lookup))?;
        response.end()
    }
}

#[derive(Serialize)]
struct Metadata<'a> {
    feature_names: FeatureNames<'a>,
}

/// The keys, then the features; a feature is named `VIEW__FEATURE` with full feature names.
struct FeatureNames<'a>(&'a OnlineResponse<'a>);

impl Serialize for FeatureNames<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let OnlineResponse {
            lookup,
            full_feature_names,
        } = self.0;
        let mut names = serializer.serialize_seq(Some(lookup.keys.len() + lookup.features.len()))?;
        for (key, _) in &lookup.keys {
            names.serialize_element(key)?;
        }
        for feature in &lookup.features {
            if *full_feature_names {
                names.serialize_element(&format_args!("{}__{}", feature.view, feature.name))?;
            } else {
                names.serialize_element(&feature.name)?;
            }
        }
        names.end()
    }
}

/// One result per key column (every entry PRESENT at the epoch), then one per feature.
struct Results<'a>(&'a Lookup);

impl Serialize for Results<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let lookup = self.0;
        let mut results = serializer.serialize_seq(Some(lookup.keys.len() + lookup.features.len()))?;
        for (_, values) in &lookup.keys {
            results.serialize_element(&Column { values, times: None })?;
        }
        for feature in &lookup.features {
            results.serialize_element(&Column {
                values: &feature.values,
                times: Some(&feature.timestamps_micros),
            })?;
        }
        results.end()
    }
}

/// `{"values": […], "statuses": […], "event_timestamps": […]}` for one column: a feature's entry is
/// NOT_FOUND where its time is `None`; a key column (`times` of `None`) is PRESENT throughout.
struct Column<'a> {
    values: &'a [Value],
    times: Option<&'a [Option<i64>]>,
}

impl Serialize for Column<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Values<'a>(&'a [Value]);
        impl Serialize for Values<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.iter().map(JsonValue))
            }
        }
        struct Statuses<'a>(&'a Column<'a>);
        impl Serialize for Statuses<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let Column { values, times } = self.0;
                serializer.collect_seq(
                    (0..values.len()).map(|entry| match times.and_then(|times| times.get(entry)) {
                        Some(None) => "NOT_FOUND",
                        _ => "PRESENT",
                    }),
                )
            }
        }
        struct Times<'a>(&'a Column<'a>);
        impl Serialize for Times<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let Column { values, times } = self.0;
                serializer.collect_seq((0..values.len()).map(|entry| {
                    TimestampText(times.and_then(|times| times.get(entry).copied().flatten()).unwrap_or(0))
                }))
            }
        }
        let mut column = serializer.serialize_map(Some(3))?;
        column.serialize_entry("values", &Values(self.values))?;
        column.serialize_entry("statuses", &Statuses(self))?;
        column.serialize_entry("event_timestamps", &Times(self))?;
        column.end()
    }
}

/// RFC 3339 in UTC with microseconds, as far back as the epoch; earlier times as their microsecond count.
struct TimestampText(i64);

impl std::fmt::Display for TimestampText {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match u64::try_from(self.0) {
            Ok(micros) => {
                humantime::format_rfc3339_micros(std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros))
                    .fmt(formatter)
            }
            Err(_) => self.0.fmt(formatter),
        }
    }
}

impl Serialize for TimestampText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A value as JSON: numbers (a float that is not finite as null), strings, booleans, timestamps as
/// [`TimestampText`], lists of floats, bytes as base64.
struct JsonValue<'a>(&'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => serializer.serialize_unit(),
            Value::Int(value) => serializer.serialize_i64(*value),
            Value::Float(value) if value.is_finite() => serializer.serialize_f64(*value),
            Value::Float(_) => serializer.serialize_unit(),
            Value::Text(text) => serializer.serialize_str(text),
            Value::Bool(value) => serializer.serialize_bool(*value),
            Value::Timestamp(micros) => TimestampText(*micros).serialize(serializer),
            Value::FloatList(items) => {
                serializer.collect_seq(items.iter().map(|item| item.is_finite().then_some(*item)))
            }
            Value::Bytes(bytes) => serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes)),
        }
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

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::DataType;

    use super::{Lookup, OnlineResponse};
    use crate::online::Value;
    use crate::server::LookupFeature;

    fn feature(name: &str, values: Vec<Value>, timestamps_micros: Vec<Option<i64>>) -> LookupFeature {
        LookupFeature {
            view: "stats".into(),
            name: name.into(),
            data_type: DataType::Float64,
            values,
            timestamps_micros,
        }
    }

    fn written(lookup: &Lookup, full_feature_names: bool) -> serde_json::Value {
        let text = serde_json::to_string(&OnlineResponse {
            lookup,
            full_feature_names,
        })
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn the_online_answer_is_feasts_shape_for_every_kind_of_value() {
        let t = 1_764_151_200_123_456; // 2025-11-26T10:00:00.123456Z
        let lookup = Lookup {
            keys: vec![("driver_id".into(), vec![Value::Int(1001), Value::Int(1999)])],
            features: vec![
                feature("rate", vec![Value::Float(0.5), Value::Null], vec![Some(t), None]),
                feature(
                    "odd",
                    vec![Value::Float(f64::NAN), Value::Float(f64::INFINITY)],
                    vec![Some(t); 2],
                ),
                feature(
                    "name",
                    vec![Value::Text("a \"b\"".into()), Value::Bool(true)],
                    vec![Some(t); 2],
                ),
                feature(
                    "seen",
                    vec![Value::Timestamp(t), Value::Timestamp(-5)],
                    vec![Some(t); 2],
                ),
                feature(
                    "embedding",
                    vec![Value::FloatList(vec![1.0, f64::NAN]), Value::Bytes(vec![0, 255])],
                    vec![Some(-7), Some(0)],
                ),
            ],
        };
        let stamp = "2025-11-26T10:00:00.123456Z";
        let epoch = "1970-01-01T00:00:00.000000Z";
        let present = ["PRESENT", "PRESENT"];
        assert_eq!(
            written(&lookup, false),
            serde_json::json!({
                "metadata": {"feature_names": ["driver_id", "rate", "odd", "name", "seen", "embedding"]},
                "results": [
                    {"values": [1001, 1999], "statuses": present, "event_timestamps": [epoch, epoch]},
                    {"values": [0.5, null], "statuses": ["PRESENT", "NOT_FOUND"], "event_timestamps": [stamp, epoch]},
                    {"values": [null, null], "statuses": present, "event_timestamps": [stamp, stamp]},
                    {"values": ["a \"b\"", true], "statuses": present, "event_timestamps": [stamp, stamp]},
                    {"values": [stamp, "-5"], "statuses": present, "event_timestamps": [stamp, stamp]},
                    {"values": [[1.0, null], "AP8="], "statuses": present, "event_timestamps": ["-7", epoch]},
                ],
            })
        );
        assert_eq!(
            written(&lookup, true)["metadata"]["feature_names"],
            serde_json::json!([
                "driver_id",
                "stats__rate",
                "stats__odd",
                "stats__name",
                "stats__seen",
                "stats__embedding"
            ])
        );
    }
}
