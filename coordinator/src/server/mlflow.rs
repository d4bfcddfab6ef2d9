//! The MLflow Tracking REST API 2.0 over the replicated tracking store ([`crate::tracking`]), so that the
//! stock `mlflow` client (`MLFLOW_TRACKING_URI=http://HOST:PORT`) logs to Kiln and reads back what Kiln
//! recorded. Served on the coordinator's tracking port (7080 by default) beside gRPC's HTTP/2.
//!
//! ```text
//!   POST /api/2.0/mlflow/experiments/create | update | delete | restore | search
//!   GET  /api/2.0/mlflow/experiments/get?experiment_id= | get-by-name?experiment_name=
//!   POST /api/2.0/mlflow/runs/create | update | delete | restore | log-metric | log-parameter | set-tag
//!                              | delete-tag | log-batch | log-inputs | outputs | search
//!   GET  /api/2.0/mlflow/runs/get?run_id=   /api/2.0/mlflow/metrics/get-history?run_id=&metric_key=
//! ```
//!
//! Writes go through Raft like any command (a follower forwards them to the leader); reads see the state
//! after a ReadIndex, so a client reads its own writes on any node. Errors are MLflow's:
//! `{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": …}` with 404, other codes with 400, and the
//! message names the field and what was expected. The Model Registry's endpoints are in [`registry`].

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::*;
use crate::search::{Filter, Order};
use crate::tracking::{
    ErrorCode, Experiment, ExperimentSearch, LifecycleStage, LogBatch, MetricModel, MetricPoint, Run, RunSearch,
    RunStatus, Tracking, TrackingCommand, TrackingError, TrackingOutcome, ViewType,
};

/// The most bytes one request body may carry (a log-batch at MLflow's limits fits easily).
const BODY_BYTES_MAX: usize = 16 << 20;
/// Runs per search page when the client does not say (MLflow's default).
const DEFAULT_MAX_RESULTS: usize = 1000;

mod artifacts;
mod dashboard;
mod lineage;
mod logged;
mod mlmodel;
mod registry;

#[derive(Clone)]
pub(super) struct Tracker {
    shared: Shared,
    /// The root experiments created here record ([`crate::tracking::PROXIED_ARTIFACT_ROOT`]).
    artifact_root: String,
    artifacts: Arc<crate::artifacts::ArtifactStore>,
}

pub(super) fn router(shared: Shared, artifacts: Arc<crate::artifacts::ArtifactStore>) -> axum::Router {
    let api = |path: &str| format!("/api/2.0/mlflow/{path}");
    axum::Router::new()
        .route(&api("experiments/create"), post(create_experiment))
        .route(&api("experiments/get"), get(get_experiment))
        .route(&api("experiments/get-by-name"), get(get_experiment_by_name))
        .route(
            &api("experiments/search"),
            post(search_experiments).get(search_experiments_get),
        )
        .route(&api("experiments/update"), post(update_experiment))
        .route(&api("experiments/delete"), post(delete_experiment))
        .route(&api("experiments/restore"), post(restore_experiment))
        .route(&api("runs/create"), post(create_run))
        .route(&api("runs/get"), get(get_run))
        .route(&api("runs/update"), post(update_run))
        .route(&api("runs/delete"), post(delete_run))
        .route(&api("runs/restore"), post(restore_run))
        .route(&api("runs/log-metric"), post(log_metric))
        .route(&api("runs/log-parameter"), post(log_parameter))
        .route(&api("runs/set-tag"), post(set_tag))
        .route(&api("runs/delete-tag"), post(delete_tag))
        .route(&api("runs/log-batch"), post(log_batch))
        .route(&api("runs/search"), post(search_runs))
        .route(&api("runs/log-inputs"), post(log_inputs))
        .route(&api("runs/outputs"), post(log_outputs))
        .route(&api("metrics/get-history"), get(metric_history))
        .route("/health", get(|| async { "OK" }))
        .merge(registry::routes())
        .merge(logged::routes())
        .merge(lineage::routes())
        .merge(dashboard::routes())
        .fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        // Artifact uploads stream past the JSON body limit (theirs is the store's).
        .merge(artifacts::routes())
        .with_state(Tracker::new(shared, artifacts))
}

/// How often the leader looks for the objects of refused replacing uploads.
const UPLOAD_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// How long an upload object no record names is left alone: longer than any upload and its record take,
/// and than a write whose answer was lost can wait to be applied by a leader that holds it.
const UPLOAD_ORPHAN_AGE: Duration = Duration::from_secs(24 * 3600);

/// On the leader, every [`UPLOAD_SWEEP_INTERVAL`]: removes the objects of replacing uploads that no
/// artifact record names and that are older than [`UPLOAD_ORPHAN_AGE`] (their uploads were refused; see
/// [`crate::artifacts::upload_object`]). Runs until `shutdown`.
pub(super) async fn sweep_uploads(
    shared: Shared,
    artifacts: Arc<crate::artifacts::ArtifactStore>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let tracker = Tracker::new(shared, artifacts);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(UPLOAD_SWEEP_INTERVAL) => {}
        }
        let leads = matches!(tracker.shared.status().await, Ok(status) if status.leader_id == status.id);
        if !leads {
            continue;
        }
        // A current read (ReadIndex), so that no record applied elsewhere is missed.
        let Ok(tracking) = tracker.read().await else { continue };
        let named: std::collections::HashSet<String> = tracking
            .artifacts()
            .filter_map(|(_, record)| record.object.clone())
            .collect();
        let before_ms = now_millis() - UPLOAD_ORPHAN_AGE.as_millis() as i64;
        match tracker.artifacts.remove_unnamed_uploads(&named, before_ms).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(count = removed.len(), "removed the objects of refused artifact uploads");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!("sweeping refused artifact uploads: {error}"),
        }
    }
}

/// Why a request failed, as MLflow reports it.
struct Failure {
    code: &'static str,
    status: StatusCode,
    message: String,
}

impl From<TrackingError> for Failure {
    fn from(error: TrackingError) -> Failure {
        Failure {
            code: error.code.as_str(),
            status: if error.code == ErrorCode::ResourceDoesNotExist {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            },
            message: error.message,
        }
    }
}

impl From<CoordinatorError> for Failure {
    fn from(error: CoordinatorError) -> Failure {
        let retryable = error.is_retryable();
        Failure {
            code: if retryable {
                "TEMPORARILY_UNAVAILABLE"
            } else {
                "INTERNAL_ERROR"
            },
            status: if retryable {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            },
            message: error.to_string(),
        }
    }
}

fn invalid(message: String) -> Failure {
    Failure {
        code: ErrorCode::InvalidParameterValue.as_str(),
        status: StatusCode::BAD_REQUEST,
        message,
    }
}

fn respond(result: Result<Value, Failure>) -> Response {
    let (status, body) = match result {
        Ok(body) => (StatusCode::OK, body),
        Err(failure) => (
            failure.status,
            json!({ "error_code": failure.code, "message": failure.message }),
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("a valid response")
}

async fn fallback(uri: axum::http::Uri) -> Response {
    respond(Err(Failure {
        code: "ENDPOINT_NOT_FOUND",
        status: StatusCode::NOT_FOUND,
        message: format!("{} is not an MLflow REST endpoint this server offers", uri.path()),
    }))
}

/// A JSON request body as an object.
fn body_of(bytes: &Bytes) -> Result<serde_json::Map<String, Value>, Failure> {
    if bytes.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(other) => Err(invalid(format!("the request body is {other}; expected a JSON object"))),
        Err(error) => Err(invalid(format!("the request body is not JSON: {error}"))),
    }
}

/// A query string as fields (values as JSON strings, as protobuf's JSON mapping reads them; a key given
/// more than once, as a repeated field is sent, becomes a list).
fn query_of(query: Option<String>) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let value = Value::String(value.into_owned());
        match fields.get_mut(key.as_ref()) {
            None => {
                fields.insert(key.into_owned(), value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
        }
    }
    fields
}

struct Fields(serde_json::Map<String, Value>);

impl Fields {
    fn text(&self, name: &str) -> Result<Option<String>, Failure> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(other) => Err(invalid(format!("'{name}' is {other}; expected a string"))),
        }
    }

    fn required_text(&self, name: &str) -> Result<String, Failure> {
        self.text(name)?
            .ok_or_else(|| invalid(format!("'{name}' is missing; it is required")))
    }

    /// The run named by `run_id` (or MLflow's older `run_uuid`).
    fn run_id(&self) -> Result<String, Failure> {
        match self.text("run_id")? {
            Some(id) if !id.is_empty() => Ok(id),
            _ => self.required_text("run_uuid"),
        }
    }

    /// An int64: protobuf's JSON mapping sends it as a number or as a string.
    fn integer(&self, name: &str) -> Result<Option<i64>, Failure> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(number)) => number
                .as_i64()
                .map(Some)
                .ok_or_else(|| invalid(format!("'{name}' is {number}; expected an integer"))),
            Some(Value::String(text)) => text
                .parse()
                .map(Some)
                .map_err(|_| invalid(format!("'{name}' is '{text}'; expected an integer"))),
            Some(other) => Err(invalid(format!("'{name}' is {other}; expected an integer"))),
        }
    }

    /// A double: a number, or one of protobuf's strings for the values JSON lacks.
    fn number(&self, name: &str) -> Result<Option<f64>, Failure> {
        number_value(self.0.get(name), name)
    }

    fn pairs(&self, name: &str) -> Result<Vec<(String, String)>, Failure> {
        self.objects(name, "{\"key\", \"value\"}")?
            .iter()
            .map(|fields| Ok((fields.required_text("key")?, fields.text("value")?.unwrap_or_default())))
            .collect()
    }

    /// A list of objects (`expected` says what each holds, for the error), each as fields of its own.
    fn objects(&self, name: &str, expected: &str) -> Result<Vec<Fields>, Failure> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .map(|item| Fields(item.as_object().cloned().unwrap_or_default()))
                .collect()),
            Some(other) => Err(invalid(format!("'{name}' is {other}; expected a list of {expected}"))),
        }
    }

    fn strings(&self, name: &str) -> Result<Vec<String>, Failure> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(text.clone()),
                    other => Err(invalid(format!("'{name}' holds {other}; expected strings"))),
                })
                .collect(),
            Some(Value::String(text)) => Ok(vec![text.clone()]),
            Some(other) => Err(invalid(format!("'{name}' is {other}; expected a list of strings"))),
        }
    }

    fn view_type(&self, name: &str) -> Result<ViewType, Failure> {
        match self.text(name)?.as_deref() {
            None | Some("ACTIVE_ONLY") => Ok(ViewType::ActiveOnly),
            Some("DELETED_ONLY") => Ok(ViewType::DeletedOnly),
            Some("ALL") => Ok(ViewType::All),
            Some(other) => Err(invalid(format!(
                "'{name}' is '{other}'; expected ACTIVE_ONLY, DELETED_ONLY or ALL"
            ))),
        }
    }

    fn max_results(&self) -> Result<usize, Failure> {
        match self.integer("max_results")? {
            None => Ok(DEFAULT_MAX_RESULTS),
            Some(count) if count > 0 => Ok(count as usize),
            Some(count) => Err(invalid(format!("'max_results' is {count}; expected a positive number"))),
        }
    }
}

fn number_value(value: Option<&Value>, name: &str) -> Result<Option<f64>, Failure> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => Ok(number.as_f64()),
        Some(Value::String(text)) => match text.as_str() {
            "NaN" => Ok(Some(f64::NAN)),
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            other => other
                .parse()
                .map(Some)
                .map_err(|_| invalid(format!("'{name}' is '{other}'; expected a number"))),
        },
        Some(other) => Err(invalid(format!("'{name}' is {other}; expected a number"))),
    }
}

/// A double as protobuf's JSON mapping writes it (strings for the values JSON lacks).
fn number_json(value: f64) -> Value {
    if value.is_nan() {
        Value::from("NaN")
    } else if value == f64::INFINITY {
        Value::from("Infinity")
    } else if value == f64::NEG_INFINITY {
        Value::from("-Infinity")
    } else {
        Value::from(value)
    }
}

fn stage(stage: LifecycleStage) -> &'static str {
    match stage {
        LifecycleStage::Active => "active",
        LifecycleStage::Deleted => "deleted",
    }
}

fn pairs_json<'a>(pairs: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<Value> {
    pairs
        .map(|(key, value)| json!({ "key": key, "value": value }))
        .collect()
}

fn experiment_json(experiment: &Experiment) -> Value {
    json!({
        "experiment_id": experiment.id,
        "name": experiment.name,
        "artifact_location": experiment.artifact_location,
        "lifecycle_stage": stage(experiment.lifecycle_stage),
        "creation_time": experiment.creation_time_ms,
        "last_update_time": experiment.last_update_time_ms,
        "tags": pairs_json(experiment.tags.iter()),
    })
}

fn run_info_json(run: &Run) -> Value {
    let mut info = json!({
        "run_id": run.id,
        "run_uuid": run.id,
        "run_name": run.name,
        "experiment_id": run.experiment_id,
        "user_id": run.user_id,
        "status": run.status.as_str(),
        "start_time": run.start_time_ms,
        "artifact_uri": run.artifact_uri,
        "lifecycle_stage": stage(run.lifecycle_stage),
    });
    if let Some(end) = run.end_time_ms {
        info["end_time"] = Value::from(end);
    }
    info
}

fn metric_json(key: &str, point: &MetricPoint) -> Value {
    json!({ "key": key, "value": number_json(point.value), "timestamp": point.timestamp_ms, "step": point.step })
}

fn run_json(run: &Run) -> Value {
    json!({
        "info": run_info_json(run),
        "data": {
            "metrics": run.latest.iter().map(|(key, point)| metric_json(key, point)).collect::<Vec<_>>(),
            "params": pairs_json(run.params.iter()),
            "tags": pairs_json(run.tags.iter()),
        },
        "inputs": {},
    })
}

/// A run with the datasets it used (`inputs.dataset_inputs`) and the logged models it produced
/// (`outputs.model_outputs`).
fn run_with_inputs(tracking: &Tracking, run: &Run) -> Value {
    let mut answer = run_json(run);
    let inputs: Vec<Value> = tracking
        .inputs_of(&run.id)
        .into_iter()
        .map(|(dataset, tags)| {
            json!({
                "dataset": {
                    "name": dataset.name,
                    "digest": dataset.digest,
                    "source_type": dataset.source_type,
                    "source": dataset.source,
                    "schema": dataset.schema,
                    "profile": dataset.profile,
                },
                "tags": pairs_json(tags.iter()),
            })
        })
        .collect();
    if !inputs.is_empty() {
        answer["inputs"] = json!({ "dataset_inputs": inputs });
    }
    let outputs: Vec<Value> = tracking
        .outputs_of(&run.id)
        .into_iter()
        .map(|(model_id, step)| json!({ "model_id": model_id, "step": step }))
        .collect();
    if !outputs.is_empty() {
        answer["outputs"] = json!({ "model_outputs": outputs });
    }
    answer
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

impl Tracker {
    /// The API's state: experiments created through it record the proxied artifact root.
    fn new(shared: Shared, artifacts: Arc<crate::artifacts::ArtifactStore>) -> Tracker {
        Tracker {
            shared,
            artifact_root: crate::tracking::PROXIED_ARTIFACT_ROOT.to_string(),
            artifacts,
        }
    }

    async fn write(&self, command: TrackingCommand) -> Result<TrackingOutcome, Failure> {
        match self.shared.execute(Request::Track(command)).await? {
            WriteOutcome::Tracked(result) => Ok(result?),
            other => Err(Failure::from(CoordinatorError::Internal(format!(
                "unexpected tracking outcome {other:?}"
            )))),
        }
    }

    async fn read(&self) -> Result<Tracking, Failure> {
        match self.shared.query(Query::Tracking).await? {
            QueryResult::Tracking(tracking) => Ok(*tracking),
            other => Err(Failure::from(CoordinatorError::Internal(format!(
                "unexpected tracking read {other:?}"
            )))),
        }
    }

    /// A new run id: 32 hex digits, unique per node (time, node id, counter).
    fn new_run_id(&self) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        let sequence = self.shared.generated_keys.fetch_add(1, Ordering::Relaxed);
        format!("{nanos:016x}{:08x}{:08x}", self.shared.node_id as u32, sequence as u32)
    }
}

/// A write whose answer is empty: the command built from the request's fields (and this node's artifact
/// root), applied through Raft.
async fn write_only(
    tracker: Tracker,
    body: Bytes,
    command: impl FnOnce(&Fields, String) -> Result<TrackingCommand, Failure>,
) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            tracker.write(command(&fields, tracker.artifact_root.clone())?).await?;
            Ok(json!({}))
        }
        .await,
    )
}

async fn create_experiment(State(tracker): State<Tracker>, body: Bytes) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            let outcome = tracker
                .write(TrackingCommand::CreateExperiment {
                    name: fields.required_text("name")?,
                    artifact_location: fields
                        .text("artifact_location")?
                        .filter(|location| !location.is_empty()),
                    tags: fields.pairs("tags")?,
                    artifact_root: tracker.artifact_root.clone(),
                })
                .await?;
            match outcome {
                TrackingOutcome::Experiment(experiment) => Ok(json!({ "experiment_id": experiment.id })),
                other => Err(Failure::from(CoordinatorError::Internal(format!(
                    "unexpected outcome {other:?}"
                )))),
            }
        }
        .await,
    )
}

async fn get_experiment(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    respond(
        async {
            let id = Fields(query_of(query)).required_text("experiment_id")?;
            let tracking = tracker.read().await?;
            Ok(json!({ "experiment": experiment_json(tracking.experiment(&id)?) }))
        }
        .await,
    )
}

async fn get_experiment_by_name(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    respond(
        async {
            let name = Fields(query_of(query)).required_text("experiment_name")?;
            let tracking = tracker.read().await?;
            Ok(json!({ "experiment": experiment_json(tracking.experiment_by_name(&name)?) }))
        }
        .await,
    )
}

async fn search_experiments_get(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    respond(experiments_page(&tracker, Fields(query_of(query))).await)
}

async fn search_experiments(State(tracker): State<Tracker>, body: Bytes) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            experiments_page(&tracker, fields).await
        }
        .await,
    )
}

async fn experiments_page(tracker: &Tracker, fields: Fields) -> Result<Value, Failure> {
    let filter = Filter::parse_experiments(&fields.text("filter")?.unwrap_or_default())
        .map_err(|error| invalid(format!("'filter': {error}")))?;
    let order_by: Vec<Order> = fields
        .strings("order_by")?
        .iter()
        .map(|text| Order::parse_experiments(text).map_err(|error| invalid(format!("'order_by': {error}"))))
        .collect::<Result<_, _>>()?;
    let search = ExperimentSearch {
        filter,
        order_by,
        view: fields.view_type("view_type")?,
        max_results: fields.max_results()?,
        page_token: fields.text("page_token")?.filter(|token| !token.is_empty()),
    };
    let (experiments, next_page_token) = tracker.read().await?.search_experiments(&search)?;
    let mut answer = json!({ "experiments": experiments.iter().map(experiment_json).collect::<Vec<_>>() });
    if let Some(token) = next_page_token {
        answer["next_page_token"] = Value::from(token);
    }
    Ok(answer)
}

async fn update_experiment(State(tracker): State<Tracker>, body: Bytes) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        Ok(TrackingCommand::RenameExperiment {
            id: fields.required_text("experiment_id")?,
            name: fields.required_text("new_name")?,
            artifact_root,
        })
    })
    .await
}

async fn experiment_stage(tracker: Tracker, body: Bytes, deleted: bool) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        Ok(TrackingCommand::SetExperimentStage {
            id: fields.required_text("experiment_id")?,
            deleted,
            artifact_root,
        })
    })
    .await
}

async fn delete_experiment(State(tracker): State<Tracker>, body: Bytes) -> Response {
    experiment_stage(tracker, body, true).await
}

async fn restore_experiment(State(tracker): State<Tracker>, body: Bytes) -> Response {
    experiment_stage(tracker, body, false).await
}

fn run_outcome(outcome: TrackingOutcome) -> Result<Run, Failure> {
    match outcome {
        TrackingOutcome::Run(run) => Ok(run),
        other => Err(Failure::from(CoordinatorError::Internal(format!(
            "unexpected outcome {other:?}"
        )))),
    }
}

async fn create_run(State(tracker): State<Tracker>, body: Bytes) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            let experiment_id = fields
                .text("experiment_id")?
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| crate::tracking::DEFAULT_EXPERIMENT_ID.to_string());
            let outcome = tracker
                .write(TrackingCommand::CreateRun {
                    run_id: tracker.new_run_id(),
                    experiment_id,
                    name: fields.text("run_name")?.unwrap_or_default(),
                    user_id: fields.text("user_id")?.unwrap_or_default(),
                    start_time_ms: fields.integer("start_time")?.unwrap_or_else(now_millis),
                    tags: fields.pairs("tags")?,
                    artifact_root: tracker.artifact_root.clone(),
                })
                .await?;
            Ok(json!({ "run": run_json(&run_outcome(outcome)?) }))
        }
        .await,
    )
}

async fn get_run(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    respond(
        async {
            let id = Fields(query_of(query)).run_id()?;
            let tracking = tracker.read().await?;
            Ok(json!({ "run": run_with_inputs(&tracking, tracking.run(&id)?) }))
        }
        .await,
    )
}

async fn update_run(State(tracker): State<Tracker>, body: Bytes) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            let status = fields
                .text("status")?
                .map(|status| RunStatus::parse(&status))
                .transpose()?;
            let outcome = tracker
                .write(TrackingCommand::UpdateRun {
                    run_id: fields.run_id()?,
                    status,
                    end_time_ms: fields.integer("end_time")?,
                    name: fields.text("run_name")?,
                    artifact_root: tracker.artifact_root.clone(),
                })
                .await?;
            Ok(json!({ "run_info": run_info_json(&run_outcome(outcome)?) }))
        }
        .await,
    )
}

async fn run_stage(tracker: Tracker, body: Bytes, deleted: bool) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        Ok(TrackingCommand::SetRunStage {
            run_id: fields.run_id()?,
            deleted,
            artifact_root,
        })
    })
    .await
}

async fn delete_run(State(tracker): State<Tracker>, body: Bytes) -> Response {
    run_stage(tracker, body, true).await
}

async fn restore_run(State(tracker): State<Tracker>, body: Bytes) -> Response {
    run_stage(tracker, body, false).await
}

/// A log-batch command for the request's run.
fn logged(fields: &Fields, batch: LogBatch, artifact_root: String) -> Result<TrackingCommand, Failure> {
    logged_for_models(fields, batch, Vec::new(), artifact_root)
}

/// The batch as one command: [`TrackingCommand::LogBatchForModels`] when some metric names a logged model.
fn logged_for_models(
    fields: &Fields,
    batch: LogBatch,
    models: Vec<MetricModel>,
    artifact_root: String,
) -> Result<TrackingCommand, Failure> {
    let run_id = fields.run_id()?;
    Ok(if models.is_empty() {
        TrackingCommand::LogBatch {
            run_id,
            batch,
            artifact_root,
        }
    } else {
        TrackingCommand::LogBatchForModels {
            run_id,
            batch,
            models,
            artifact_root,
        }
    })
}

/// The logged model a metric is for (MLflow 3's `model_id`, with its dataset), if it names one.
fn metric_model(fields: &Fields, index: usize) -> Result<Option<MetricModel>, Failure> {
    Ok(match fields.text("model_id")?.filter(|id| !id.is_empty()) {
        None => None,
        Some(model_id) => Some(MetricModel {
            index,
            model_id,
            dataset_name: fields.text("dataset_name")?.unwrap_or_default(),
            dataset_digest: fields.text("dataset_digest")?.unwrap_or_default(),
        }),
    })
}

fn metric_point(fields: &Fields) -> Result<(String, MetricPoint), Failure> {
    let key = fields.required_text("key")?;
    let value = fields
        .number("value")?
        .ok_or_else(|| invalid(format!("metric '{key}' has no 'value'; it is required")))?;
    Ok((
        key,
        MetricPoint {
            value,
            timestamp_ms: fields.integer("timestamp")?.unwrap_or_else(now_millis),
            step: fields.integer("step")?.unwrap_or(0),
        },
    ))
}

async fn log_metric(State(tracker): State<Tracker>, body: Bytes) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        let batch = LogBatch {
            metrics: vec![metric_point(fields)?],
            ..LogBatch::default()
        };
        let models = metric_model(fields, 0)?.into_iter().collect();
        logged_for_models(fields, batch, models, artifact_root)
    })
    .await
}

async fn log_parameter(State(tracker): State<Tracker>, body: Bytes) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        let batch = LogBatch {
            params: vec![(fields.required_text("key")?, fields.text("value")?.unwrap_or_default())],
            ..LogBatch::default()
        };
        logged(fields, batch, artifact_root)
    })
    .await
}

async fn set_tag(State(tracker): State<Tracker>, body: Bytes) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        let batch = LogBatch {
            tags: vec![(fields.required_text("key")?, fields.text("value")?.unwrap_or_default())],
            ..LogBatch::default()
        };
        logged(fields, batch, artifact_root)
    })
    .await
}

async fn delete_tag(State(tracker): State<Tracker>, body: Bytes) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        Ok(TrackingCommand::DeleteTag {
            run_id: fields.run_id()?,
            key: fields.required_text("key")?,
            artifact_root,
        })
    })
    .await
}

async fn log_batch(State(tracker): State<Tracker>, body: Bytes) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        let items = fields.objects("metrics", "metrics")?;
        let metrics = items.iter().map(metric_point).collect::<Result<_, _>>()?;
        let models = items
            .iter()
            .enumerate()
            .filter_map(|(index, item)| metric_model(item, index).transpose())
            .collect::<Result<_, _>>()?;
        let batch = LogBatch {
            metrics,
            params: fields.pairs("params")?,
            tags: fields.pairs("tags")?,
        };
        logged_for_models(fields, batch, models, artifact_root)
    })
    .await
}

async fn log_inputs(State(tracker): State<Tracker>, body: Bytes) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        let inputs = fields
            .objects("datasets", "dataset inputs")?
            .into_iter()
            .map(|input| {
                let dataset = Fields(
                    input
                        .0
                        .get("dataset")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default(),
                );
                Ok(crate::tracking::DatasetInput {
                    dataset: crate::tracking::Dataset {
                        name: dataset.required_text("name")?,
                        digest: dataset.required_text("digest")?,
                        source_type: dataset.text("source_type")?.unwrap_or_default(),
                        source: dataset.text("source")?.unwrap_or_default(),
                        schema: dataset.text("schema")?.unwrap_or_default(),
                        profile: dataset.text("profile")?.unwrap_or_default(),
                    },
                    tags: input.pairs("tags")?,
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        Ok(TrackingCommand::LogInputs {
            run_id: fields.run_id()?,
            inputs,
            artifact_root,
        })
    })
    .await
}

/// MLflow 3's `runs/outputs`: the logged models a run produced (`mlflow.<flavor>.log_model` sends it), each
/// `{"model_id", "step"}`.
async fn log_outputs(State(tracker): State<Tracker>, body: Bytes) -> Response {
    write_only(tracker, body, |fields, artifact_root| {
        let models = fields
            .objects("models", "model outputs {\"model_id\", \"step\"}")?
            .iter()
            .map(|output| Ok((output.required_text("model_id")?, output.integer("step")?.unwrap_or(0))))
            .collect::<Result<Vec<_>, Failure>>()?;
        Ok(TrackingCommand::LogOutputs {
            run_id: fields.run_id()?,
            models,
            artifact_root,
        })
    })
    .await
}

async fn search_runs(State(tracker): State<Tracker>, body: Bytes) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            let filter = Filter::parse(&fields.text("filter")?.unwrap_or_default())
                .map_err(|error| invalid(format!("'filter': {error}")))?;
            let order_by = fields
                .strings("order_by")?
                .iter()
                .map(|text| Order::parse(text).map_err(|error| invalid(format!("'order_by': {error}"))))
                .collect::<Result<_, _>>()?;
            let search = RunSearch {
                experiment_ids: fields.strings("experiment_ids")?,
                filter,
                order_by,
                view: fields.view_type("run_view_type")?,
                max_results: fields.max_results()?,
                page_token: fields.text("page_token")?.filter(|token| !token.is_empty()),
            };
            let tracking = tracker.read().await?;
            let page = tracking.search_runs(&search)?;
            let runs: Vec<Value> = page.runs.iter().map(|run| run_with_inputs(&tracking, run)).collect();
            let mut answer = json!({ "runs": runs });
            if let Some(token) = page.next_page_token {
                answer["next_page_token"] = Value::from(token);
            }
            Ok(answer)
        }
        .await,
    )
}

async fn metric_history(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    respond(
        async {
            let fields = Fields(query_of(query));
            let run_id = fields.run_id()?;
            let key = fields.required_text("metric_key")?;
            let tracking = tracker.read().await?;
            // A run that never logged the metric has an empty history, as in MLflow.
            let history: Vec<Value> = tracking
                .run(&run_id)?
                .metrics
                .get(&key)
                .map(|points| points.iter().map(|point| metric_json(&key, point)).collect())
                .unwrap_or_default();
            Ok(json!({ "metrics": history }))
        }
        .await,
    )
}
