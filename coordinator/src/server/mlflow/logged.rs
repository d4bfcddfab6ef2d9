//! MLflow 3's logged-model endpoints over the replicated logged models ([`crate::tracking::LoggedModel`]):
//!
//! ```text
//!   POST   /api/2.0/mlflow/logged-models                   create (PENDING; its files go to its artifact_uri)
//!   GET    /api/2.0/mlflow/logged-models/ID                get
//!   PATCH  /api/2.0/mlflow/logged-models/ID                finalize (status READY or UPLOAD_FAILED)
//!   DELETE /api/2.0/mlflow/logged-models/ID
//!   POST   /api/2.0/mlflow/logged-models/search            by experiment, filter and order
//!   PATCH  /api/2.0/mlflow/logged-models/ID/tags           DELETE …/ID/tags/KEY    POST …/ID/params
//! ```

use axum::extract::Path as UrlPath;
use axum::routing::{delete, patch, post};

use super::*;
use crate::search::Subject;
use crate::tracking::{LoggedModel, LoggedModelCommand, LoggedModelSearch, LoggedModelStatus, ModelMetric};

/// Logged models per search page when the client does not say.
const DEFAULT_MODELS_PER_PAGE: usize = 100;

pub(super) fn routes() -> axum::Router<Tracker> {
    let api = |path: &str| format!("/api/2.0/mlflow/{path}");
    axum::Router::new()
        .route(&api("logged-models"), post(create))
        .route(&api("logged-models/search"), post(search))
        .route(&api("logged-models/{id}"), get(read).patch(finalize).delete(remove))
        .route(&api("logged-models/{id}/tags"), patch(set_tags))
        .route(&api("logged-models/{id}/tags/{key}"), delete(delete_tag))
        .route(&api("logged-models/{id}/params"), post(log_params))
}

/// A logged model as MLflow answers it, with the metric points logged for it.
fn model_json(model: &LoggedModel, metrics: &[ModelMetric]) -> Value {
    let metrics: Vec<Value> = metrics
        .iter()
        .map(|metric| {
            json!({
                "key": metric.key,
                "value": number_json(metric.point.value),
                "timestamp": metric.point.timestamp_ms,
                "step": metric.point.step,
                "run_id": metric.run_id,
                "model_id": model.id,
                "dataset_name": metric.dataset_name,
                "dataset_digest": metric.dataset_digest,
            })
        })
        .collect();
    json!({
        "info": {
            "model_id": model.id,
            "experiment_id": model.experiment_id,
            "name": model.name,
            "creation_timestamp_ms": model.creation_time_ms,
            "last_updated_timestamp_ms": model.last_updated_time_ms,
            "artifact_uri": model.artifact_uri,
            "status": model.status.as_str(),
            "model_type": model.model_type,
            "source_run_id": model.source_run_id,
            "tags": pairs_json(model.tags.iter()),
        },
        "data": { "params": pairs_json(model.params.iter()), "metrics": metrics },
    })
}

impl Tracker {
    async fn log_model(&self, command: LoggedModelCommand) -> Result<Value, Failure> {
        let command = TrackingCommand::LogModel {
            command,
            artifact_root: self.artifact_root.clone(),
        };
        match self.write(command).await? {
            TrackingOutcome::LoggedModel(model) => {
                let metrics = self.read().await?.model_metrics(&model.id);
                Ok(json!({ "model": model_json(&model, &metrics) }))
            }
            TrackingOutcome::Done => Ok(json!({})),
            other => Err(Failure::from(CoordinatorError::Internal(format!(
                "unexpected logged-model outcome {other:?}"
            )))),
        }
    }
}

async fn create(State(tracker): State<Tracker>, body: Bytes) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            let command = LoggedModelCommand::Create {
                model_id: format!("m-{}", tracker.new_run_id()),
                experiment_id: fields.required_text("experiment_id")?,
                name: fields.text("name")?.unwrap_or_default(),
                model_type: fields.text("model_type")?.unwrap_or_default(),
                source_run_id: fields.text("source_run_id")?.unwrap_or_default(),
                tags: fields.pairs("tags")?,
                params: fields.pairs("params")?,
            };
            tracker.log_model(command).await
        }
        .await,
    )
}

async fn read(State(tracker): State<Tracker>, UrlPath(id): UrlPath<String>) -> Response {
    respond(
        async {
            let tracking = tracker.read().await?;
            Ok(json!({ "model": model_json(tracking.logged_model(&id)?, &tracking.model_metrics(&id)) }))
        }
        .await,
    )
}

async fn finalize(State(tracker): State<Tracker>, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            let status = LoggedModelStatus::parse(&fields.required_text("status")?)?;
            tracker
                .log_model(LoggedModelCommand::Finalize { model_id: id, status })
                .await
        }
        .await,
    )
}

async fn remove(State(tracker): State<Tracker>, UrlPath(id): UrlPath<String>) -> Response {
    respond(tracker.log_model(LoggedModelCommand::Delete { model_id: id }).await)
}

async fn set_tags(State(tracker): State<Tracker>, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    respond(
        async {
            let tags = Fields(body_of(&body)?).pairs("tags")?;
            tracker
                .log_model(LoggedModelCommand::SetTags { model_id: id, tags })
                .await
        }
        .await,
    )
}

async fn delete_tag(State(tracker): State<Tracker>, UrlPath((id, key)): UrlPath<(String, String)>) -> Response {
    respond(
        tracker
            .log_model(LoggedModelCommand::DeleteTag { model_id: id, key })
            .await,
    )
}

async fn log_params(State(tracker): State<Tracker>, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    respond(
        async {
            let params = Fields(body_of(&body)?).pairs("params")?;
            tracker
                .log_model(LoggedModelCommand::LogParams { model_id: id, params })
                .await
        }
        .await,
    )
}

async fn search(State(tracker): State<Tracker>, body: Bytes) -> Response {
    respond(
        async {
            let fields = Fields(body_of(&body)?);
            let filter = Filter::parse_for(&fields.text("filter")?.unwrap_or_default(), Subject::LoggedModels)
                .map_err(|error| invalid(format!("'filter': {error}")))?;
            // MLflow sends the order as objects: {"field_name": "creation_timestamp", "ascending": false}.
            let order_by = match fields.0.get("order_by") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| {
                        let field = item["field_name"].as_str().unwrap_or_default();
                        let direction = if item["ascending"].as_bool() == Some(false) {
                            "DESC"
                        } else {
                            "ASC"
                        };
                        Order::parse_for(&format!("{field} {direction}"), Subject::LoggedModels)
                            .map_err(|error| invalid(format!("'order_by': {error}")))
                    })
                    .collect::<Result<_, _>>()?,
                Some(other) => return Err(invalid(format!("'order_by' is {other}; expected a list"))),
            };
            let max_results = match fields.integer("max_results")? {
                None => DEFAULT_MODELS_PER_PAGE,
                Some(count) if count > 0 => count as usize,
                Some(count) => return Err(invalid(format!("'max_results' is {count}; expected a positive number"))),
            };
            let search = LoggedModelSearch {
                experiment_ids: fields.strings("experiment_ids")?,
                filter,
                order_by,
                max_results,
                page_token: fields.text("page_token")?.filter(|token| !token.is_empty()),
            };
            let tracking = tracker.read().await?;
            let (models, next_page_token) = tracking.search_logged_models(&search)?;
            let models: Vec<Value> = models
                .iter()
                .map(|model| model_json(model, &tracking.model_metrics(&model.id)))
                .collect();
            let mut answer = json!({ "models": models });
            if let Some(token) = next_page_token {
                answer["next_page_token"] = Value::from(token);
            }
            Ok(answer)
        }
        .await,
    )
}
