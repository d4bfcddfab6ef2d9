//! The Open Inference Protocol's REST binding (port 8000), with its binary tensor extension:
//!
//! ```text
//!   GET  /v2/health/live   /v2/health/ready        200 when live / ready (503 when not ready)
//!   GET  /v2                                        server metadata: name, version, extensions
//!   GET  /v2/models/NAME[/versions/V]               model metadata: versions, platform, inputs, outputs
//!   GET  /v2/models/NAME[/versions/V]/ready         200 when ready, 404 when not served here
//!   POST /v2/models/NAME[/versions/V]/infer         {"id", "parameters", "inputs": [...], "outputs": [...]}
//!   GET  /metrics                                   Prometheus / OpenMetrics text
//!   GET  /   /v1/models[/NAME]   POST /v1/models/NAME:predict      KServe's V1 protocol ([`crate::v1`])
//! ```
//!
//! Binary tensors: with an `Inference-Header-Content-Length: N` header the body is N bytes of JSON followed
//! by the binary inputs, in input order, each announced in its input's `parameters.binary_data_size`.
//! Outputs come back binary when the request asks (`parameters.binary_data_output`, or an output's
//! `parameters.binary_data`), the same way; `tritonclient.http` asks by default.
//!
//! Errors are the protocol's `{"error": MESSAGE}` with 400 (bad request), 404 (no such model or version),
//! 500 (the model failed) or 503 (not ready, queue full: with `Retry-After`, shutting down).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::tensor::{Tensor, encode_json, parse_declared};
use crate::{EXTENSIONS, Exchange, SERVER_NAME, ServeError, ServedModel, Serving, v1};

/// The header that splits a binary request or response into its JSON and its tensors.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The most bytes one request body may carry.
const BODY_BYTES_MAX: usize = 64 << 20;

pub fn router(serving: Arc<Serving>) -> axum::Router {
    axum::Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_version_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_version_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_version))
        .route("/metrics", get(metrics))
        .route("/", get(v1_live))
        .route("/v1/models", get(v1_models))
        .route("/v1/models/{name}", get(v1_model).post(v1_predict))
        .fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(serving)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("a valid response")
}

fn error_response(error: &ServeError) -> Response {
    let mut response = json_response(error.http_status(), &json!({ "error": error.to_string() }));
    if matches!(error, ServeError::QueueFull { .. }) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

fn answer(outcome: Result<Value, ServeError>) -> Response {
    match outcome {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(error) => error_response(&error),
    }
}

async fn live() -> Response {
    json_response(StatusCode::OK, &json!({ "live": true }))
}

async fn ready(State(serving): State<Arc<Serving>>) -> Response {
    let ready = serving.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &json!({ "ready": ready }))
}

async fn server_metadata() -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "name": SERVER_NAME, "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS }),
    )
}

/// The protocol's model metadata object.
pub fn metadata_json(served: &ServedModel) -> Value {
    let tensors = |specs: &[crate::TensorSpec]| {
        specs
            .iter()
            .map(|spec| json!({ "name": spec.name, "datatype": spec.datatype.name(), "shape": spec.shape }))
            .collect::<Vec<_>>()
    };
    json!({
        "name": served.name,
        "versions": [served.version],
        "platform": served.model.platform(),
        "inputs": tensors(served.model.inputs()),
        "outputs": tensors(served.model.outputs()),
    })
}

async fn model_metadata(State(serving): State<Arc<Serving>>, Path(name): Path<String>) -> Response {
    answer(serving.get(&name, None).map(|served| metadata_json(&served)))
}

async fn model_version_metadata(
    State(serving): State<Arc<Serving>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    answer(serving.get(&name, Some(&version)).map(|served| metadata_json(&served)))
}

async fn model_ready(State(serving): State<Arc<Serving>>, Path(name): Path<String>) -> Response {
    answer(
        serving
            .get(&name, None)
            .map(|served| json!({ "name": served.name, "ready": true })),
    )
}

async fn model_version_ready(
    State(serving): State<Arc<Serving>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    answer(
        serving
            .get(&name, Some(&version))
            .map(|served| json!({ "name": served.name, "ready": true })),
    )
}

async fn metrics(State(serving): State<Arc<Serving>>) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Body::from(serving.metrics.encode()))
        .expect("a valid response")
}

async fn fallback(uri: axum::http::Uri) -> Response {
    error_response(&ServeError::NotFound(format!(
        "no endpoint at {}; the Open Inference Protocol's are under /v2 (for example /v2/models/NAME/infer), \
         KServe's V1 under /v1 (/v1/models/NAME:predict)",
        uri.path()
    )))
}

async fn v1_live() -> Response {
    json_response(StatusCode::OK, &json!({ "status": "alive" }))
}

async fn v1_models(State(serving): State<Arc<Serving>>) -> Response {
    json_response(StatusCode::OK, &json!({ "models": serving.names() }))
}

async fn v1_model(State(serving): State<Arc<Serving>>, Path(name): Path<String>) -> Response {
    answer(
        serving
            .get(&name, None)
            .map(|served| json!({ "name": served.name, "ready": true })),
    )
}

async fn v1_predict(State(serving): State<Arc<Serving>>, Path(call): Path<String>, body: Bytes) -> Response {
    let served = match v1::split_verb(&call).and_then(|(name, verb)| match verb {
        "predict" => serving.get(name, None),
        _ => Err(ServeError::NotFound(format!(
            "POST /v1/models/{call}: ':{verb}' is not served here; expected :predict"
        ))),
    }) {
        Ok(served) => served,
        Err(error) => return error_response(&error),
    };
    let mut exchange = serving.begin();
    let outcome = v1_run(&served, body, &mut exchange).await;
    serving.record(&served, "rest", exchange, outcome.as_ref().err());
    answer(outcome)
}

async fn v1_run(served: &ServedModel, body: Bytes, exchange: &mut Exchange) -> Result<Value, ServeError> {
    let inputs = v1::instances_to_tensors(&body, served.model.inputs())?;
    let rows = inputs[0].shape[0];
    exchange.keep_inputs(&inputs);
    let outputs = served.infer(inputs).await?;
    exchange.keep_outputs(&outputs);
    v1::predictions(&served.name, &outputs, rows)
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

#[derive(Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

async fn infer(
    State(serving): State<Arc<Serving>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer_on(&serving, &name, None, &headers, body).await
}

async fn infer_version(
    State(serving): State<Arc<Serving>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer_on(&serving, &name, Some(&version), &headers, body).await
}

async fn infer_on(serving: &Serving, name: &str, version: Option<&str>, headers: &HeaderMap, body: Bytes) -> Response {
    let served = match serving.get(name, version) {
        Ok(served) => served,
        Err(error) => return error_response(&error),
    };
    let mut exchange = serving.begin();
    let outcome = run(&served, headers, body, &mut exchange).await;
    serving.record(&served, "rest", exchange, outcome.as_ref().err());
    outcome.unwrap_or_else(|error| error_response(&error))
}

/// The JSON part and the binary part of a request body.
fn split_body(headers: &HeaderMap, body: Bytes) -> Result<(Bytes, Bytes), ServeError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, Bytes::new()));
    };
    let length: usize = value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| ServeError::invalid(format!("header {HEADER_LENGTH} is {value:?}; expected a byte count")))?;
    if length > body.len() {
        return Err(ServeError::invalid(format!(
            "header {HEADER_LENGTH} says the JSON takes {length} bytes, but the body has {}",
            body.len()
        )));
    }
    Ok((body.slice(..length), body.slice(length..)))
}

fn flag(parameters: &Map<String, Value>, name: &str) -> bool {
    parameters.get(name).and_then(Value::as_bool).unwrap_or(false)
}

/// The request's input tensors, from JSON `data` or from the binary part.
fn read_inputs(inputs: Vec<InputTensor>, binary: &Bytes) -> Result<Vec<Tensor>, ServeError> {
    let mut offset = 0usize;
    let mut tensors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let name = input.name;
        let (datatype, shape) = parse_declared(&name, &input.datatype, &input.shape)?;
        let binary_size = input.parameters.get("binary_data_size");
        let data = match (binary_size, input.data) {
            (Some(size), None) => {
                let size = size.as_u64().ok_or_else(|| {
                    ServeError::invalid(format!(
                        "input '{name}': binary_data_size is {size}; expected a byte count"
                    ))
                })? as usize;
                if offset + size > binary.len() {
                    return Err(ServeError::invalid(format!(
                        "input '{name}' announces {size} binary bytes at offset {offset}, but only {} follow the JSON",
                        binary.len()
                    )));
                }
                offset += size;
                binary.slice(offset - size..offset)
            }
            (None, Some(data)) => {
                let mut out = BytesMut::new();
                encode_json(&name, datatype, &data, &mut out)?;
                out.freeze()
            }
            (Some(_), Some(_)) => {
                return Err(ServeError::invalid(format!(
                    "input '{name}' has both 'data' and a binary_data_size; expected one"
                )));
            }
            (None, None) => {
                return Err(ServeError::invalid(format!(
                    "input '{name}' has no 'data' and no binary_data_size parameter"
                )));
            }
        };
        tensors.push(Tensor::new(name, datatype, shape, data)?);
    }
    if offset != binary.len() {
        return Err(ServeError::invalid(format!(
            "{} bytes of binary data follow the JSON but the inputs announce {offset}",
            binary.len()
        )));
    }
    Ok(tensors)
}

async fn run(
    served: &ServedModel,
    headers: &HeaderMap,
    body: Bytes,
    exchange: &mut Exchange,
) -> Result<Response, ServeError> {
    let (header_part, binary) = split_body(headers, body)?;
    let request: InferRequest = serde_json::from_slice(&header_part)
        .map_err(|error| ServeError::invalid(format!("the body is not an inference request: {error}")))?;
    exchange.id = request.id.clone();
    let inputs = read_inputs(request.inputs, &binary)?;
    exchange.keep_inputs(&inputs);
    let requested: Vec<String> = request.outputs.iter().map(|output| output.name.clone()).collect();
    let positions = served.check_requested(&requested)?;
    let outputs = ServedModel::select_outputs(served.infer(inputs).await?, &positions);
    let binary_default = flag(&request.parameters, "binary_data_output");
    exchange.keep_outputs(&outputs);
    let mut binary_parts = Vec::new();
    let mut described = Vec::with_capacity(outputs.len());
    for (index, output) in outputs.into_iter().enumerate() {
        let binary = request
            .outputs
            .get(index)
            .and_then(|asked| asked.parameters.get("binary_data"))
            .and_then(Value::as_bool)
            .unwrap_or(binary_default);
        let mut object = json!({
            "name": output.name,
            "datatype": output.datatype.name(),
            "shape": output.shape,
        });
        if binary {
            object["parameters"] = json!({ "binary_data_size": output.data.len() });
            binary_parts.push(output.data);
        } else {
            object["data"] = output.json_data();
        }
        described.push(object);
    }
    let mut response = json!({
        "model_name": served.name,
        "model_version": served.version,
        "outputs": described,
    });
    if let Some(id) = request.id {
        response["id"] = Value::String(id);
    }
    if binary_parts.is_empty() {
        return Ok(json_response(StatusCode::OK, &response));
    }
    let header_bytes = serde_json::to_vec(&response).expect("json");
    let mut body = BytesMut::with_capacity(header_bytes.len() + binary_parts.iter().map(Bytes::len).sum::<usize>());
    body.extend_from_slice(&header_bytes);
    for part in binary_parts {
        body.extend_from_slice(&part);
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(HEADER_LENGTH, header_bytes.len())
        .body(Body::from(body.freeze()))
        .expect("a valid response"))
}
