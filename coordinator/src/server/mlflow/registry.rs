//! The MLflow Model Registry REST API 2.0 over the replicated registry ([`crate::registry`]):
//!
//! ```text
//!   POST   /api/2.0/mlflow/registered-models/create | rename | get-latest-versions | set-tag | alias
//!   PATCH  /api/2.0/mlflow/registered-models/update
//!   DELETE /api/2.0/mlflow/registered-models/delete | delete-tag | alias
//!   GET    /api/2.0/mlflow/registered-models/get?name= | search?filter= | alias?name=&alias=
//!   POST   /api/2.0/mlflow/model-versions/create | transition-stage | set-tag
//!   PATCH  /api/2.0/mlflow/model-versions/update
//!   DELETE /api/2.0/mlflow/model-versions/delete | delete-tag
//!   GET    /api/2.0/mlflow/model-versions/get?name=&version= | search?filter= | get-download-uri
//! ```
//!
//! The stock client sends GET fields in the query and the others as a JSON body; both are accepted for every
//! endpoint. A version's JSON also carries `kiln_metrics`, the run's metrics when it was registered (MLflow's
//! client ignores fields it does not know).

use axum::routing::{get, patch, post};

use super::*;
use crate::registry::{ModelSearch, ModelVersion, RegisteredModel, RegistryCommand, RegistryOutcome, Stage};
use crate::search::Subject;
use crate::tracking::logged_model_of;

/// Models or versions per search page when the client does not say (MLflow's default for both).
const DEFAULT_MODELS_PER_PAGE: usize = 100;

pub(super) fn routes() -> axum::Router<Tracker> {
    let api = |path: &str| format!("/api/2.0/mlflow/{path}");
    axum::Router::new()
        .route(&api("registered-models/create"), post(create_model))
        .route(&api("registered-models/rename"), post(rename_model))
        .route(&api("registered-models/update"), patch(update_model))
        .route(&api("registered-models/delete"), axum::routing::delete(delete_model))
        .route(&api("registered-models/get"), get(get_model))
        .route(&api("registered-models/search"), get(search_models).post(search_models))
        .route(
            &api("registered-models/get-latest-versions"),
            post(latest_versions).get(latest_versions),
        )
        .route(&api("registered-models/set-tag"), post(set_model_tag))
        .route(
            &api("registered-models/delete-tag"),
            axum::routing::delete(delete_model_tag),
        )
        .route(
            &api("registered-models/alias"),
            post(set_alias).delete(delete_alias).get(version_by_alias),
        )
        .route(&api("model-versions/create"), post(create_version))
        .route(&api("model-versions/update"), patch(update_version))
        .route(&api("model-versions/transition-stage"), post(transition_stage))
        .route(&api("model-versions/delete"), axum::routing::delete(delete_version))
        .route(&api("model-versions/get"), get(get_version))
        .route(
            &api("model-versions/search"),
            get(search_versions).post(search_versions),
        )
        .route(&api("model-versions/get-download-uri"), get(download_uri))
        .route(&api("model-versions/set-tag"), post(set_version_tag))
        .route(
            &api("model-versions/delete-tag"),
            axum::routing::delete(delete_version_tag),
        )
}

/// A request's fields: its JSON body, else its query string.
fn request_fields(query: Option<String>, body: &Bytes) -> Result<Fields, Failure> {
    if body.is_empty() {
        Ok(Fields(query_of(query)))
    } else {
        Ok(Fields(body_of(body)?))
    }
}

impl Fields {
    /// A version number: MLflow sends it as a string.
    fn version(&self) -> Result<u64, Failure> {
        let text = match self.0.get("version") {
            Some(Value::Number(number)) => number.to_string(),
            _ => self.required_text("version")?,
        };
        text.parse::<u64>()
            .ok()
            .filter(|version| *version > 0)
            .ok_or_else(|| invalid(format!("'version' is '{text}'; expected a version number (1, 2, …)")))
    }

    fn search(&self, subject: Subject) -> Result<ModelSearch, Failure> {
        let filter = Filter::parse_for(&self.text("filter")?.unwrap_or_default(), subject)
            .map_err(|error| invalid(format!("'filter': {error}")))?;
        let order_by = self
            .strings("order_by")?
            .iter()
            .map(|text| Order::parse_for(text, subject).map_err(|error| invalid(format!("'order_by': {error}"))))
            .collect::<Result<_, _>>()?;
        let max_results = match self.integer("max_results")? {
            None => DEFAULT_MODELS_PER_PAGE,
            Some(count) if count > 0 => count as usize,
            Some(count) => return Err(invalid(format!("'max_results' is {count}; expected a positive number"))),
        };
        Ok(ModelSearch {
            filter,
            order_by,
            max_results,
            page_token: self.text("page_token")?.filter(|token| !token.is_empty()),
        })
    }
}

pub(super) fn version_json(version: &ModelVersion, aliases: Vec<String>) -> Value {
    let metrics: serde_json::Map<String, Value> = version
        .metrics
        .iter()
        .map(|(key, value)| (key.clone(), number_json(*value)))
        .collect();
    let mut answer = json!({
        "name": version.name,
        "version": version.version_text(),
        "creation_timestamp": version.creation_time_ms,
        "last_updated_timestamp": version.last_updated_time_ms,
        "user_id": version.user_id,
        "current_stage": version.stage.as_str(),
        "description": version.description,
        "source": version.source,
        "run_id": version.run_id,
        "run_link": version.run_link,
        "status": "READY",
        "tags": pairs_json(version.tags.iter()),
        "aliases": aliases,
        "kiln_metrics": metrics,
    });
    // MLflow 3's model_id: the logged model a version was registered from is its source.
    if let Some(model_id) = logged_model_of(&version.source) {
        answer["model_id"] = json!(model_id);
    }
    answer
}

fn model_json(model: &RegisteredModel) -> Value {
    let latest: Vec<Value> = model
        .latest_versions(&[])
        .into_iter()
        .map(|version| version_json(version, model.aliases_of(version.version)))
        .collect();
    let aliases: Vec<Value> = model
        .aliases
        .iter()
        .map(|(alias, version)| json!({ "alias": alias, "version": version.to_string() }))
        .collect();
    json!({
        "name": model.name,
        "creation_timestamp": model.creation_time_ms,
        "last_updated_timestamp": model.last_updated_time_ms,
        "user_id": model.user_id,
        "description": model.description,
        "latest_versions": latest,
        "tags": pairs_json(model.tags.iter()),
        "aliases": aliases,
    })
}

impl Tracker {
    async fn register(&self, command: RegistryCommand, user_id: String) -> Result<RegistryOutcome, Failure> {
        match self
            .write(TrackingCommand::Register {
                command,
                user_id,
                artifact_root: self.artifact_root.clone(),
            })
            .await?
        {
            TrackingOutcome::Registered(outcome) => Ok(outcome),
            other => Err(Failure::from(CoordinatorError::Internal(format!(
                "unexpected registry outcome {other:?}"
            )))),
        }
    }
}

/// Applies the command built from the request's fields; answers the model or version it produced under
/// `registered_model` or `model_version`, or `{}`.
async fn registry_write(
    tracker: Tracker,
    query: Option<String>,
    body: Bytes,
    command: impl FnOnce(&Fields) -> Result<RegistryCommand, Failure>,
) -> Response {
    respond(
        async {
            let fields = request_fields(query, &body)?;
            let command = command(&fields)?;
            registered(&tracker, &fields, command).await
        }
        .await,
    )
}

/// Applies `command` through Raft as the request's user; the answer MLflow gives.
async fn registered(tracker: &Tracker, fields: &Fields, command: RegistryCommand) -> Result<Value, Failure> {
    let user_id = fields.text("user_id")?.unwrap_or_default();
    match tracker.register(command, user_id).await? {
        RegistryOutcome::Model(model) => Ok(json!({ "registered_model": model_json(&model) })),
        RegistryOutcome::Version(version, aliases) => Ok(json!({ "model_version": version_json(&version, aliases) })),
        RegistryOutcome::Done => Ok(json!({})),
    }
}

async fn create_model(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::CreateModel {
            name: fields.required_text("name")?,
            description: fields.text("description")?.unwrap_or_default(),
            tags: fields.pairs("tags")?,
        })
    })
    .await
}

async fn rename_model(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::RenameModel {
            name: fields.required_text("name")?,
            new_name: fields.required_text("new_name")?,
        })
    })
    .await
}

async fn update_model(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::UpdateModel {
            name: fields.required_text("name")?,
            description: fields.text("description")?.unwrap_or_default(),
        })
    })
    .await
}

async fn delete_model(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::DeleteModel {
            name: fields.required_text("name")?,
        })
    })
    .await
}

async fn set_model_tag(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::SetModelTag {
            name: fields.required_text("name")?,
            key: fields.required_text("key")?,
            value: fields.text("value")?.unwrap_or_default(),
        })
    })
    .await
}

async fn delete_model_tag(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::DeleteModelTag {
            name: fields.required_text("name")?,
            key: fields.required_text("key")?,
        })
    })
    .await
}

async fn set_alias(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::SetAlias {
            name: fields.required_text("name")?,
            alias: fields.required_text("alias")?,
            version: fields.version()?,
        })
    })
    .await
}

async fn delete_alias(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::DeleteAlias {
            name: fields.required_text("name")?,
            alias: fields.required_text("alias")?,
        })
    })
    .await
}

/// A new version; when its source is an MLflow model in the artifact store, with the signature and runtime
/// its `MLmodel` file gives ([`super::mlmodel`]).
async fn create_version(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    respond(
        async {
            let fields = request_fields(query, &body)?;
            let (name, source) = (fields.required_text("name")?, fields.required_text("source")?);
            // MLflow 3 sends the logged model's id beside a source that is that model.
            if let (Some(given), Some(named)) = (
                fields.text("model_id")?.filter(|id| !id.is_empty()),
                logged_model_of(&source),
            ) && given != named
            {
                return Err(invalid(format!(
                    "'model_id' is '{given}' but the source '{source}' is logged model '{named}'; they must match"
                )));
            }
            let mut tags = fields.pairs("tags")?;
            let read = super::mlmodel::source_tags(&tracker, &name, &source, &tags).await?;
            tags.extend(read);
            let command = RegistryCommand::CreateVersion {
                name,
                source,
                run_id: fields.text("run_id")?.unwrap_or_default(),
                run_link: fields.text("run_link")?.unwrap_or_default(),
                description: fields.text("description")?.unwrap_or_default(),
                tags,
            };
            registered(&tracker, &fields, command).await
        }
        .await,
    )
}

async fn update_version(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::UpdateVersion {
            name: fields.required_text("name")?,
            version: fields.version()?,
            description: fields.text("description")?.unwrap_or_default(),
        })
    })
    .await
}

async fn transition_stage(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        let archive_existing = match fields.0.get("archive_existing_versions") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(flag)) => *flag,
            Some(Value::String(text)) if text == "true" || text == "false" => text == "true",
            Some(other) => {
                return Err(invalid(format!(
                    "'archive_existing_versions' is {other}; expected true or false"
                )));
            }
        };
        Ok(RegistryCommand::TransitionStage {
            name: fields.required_text("name")?,
            version: fields.version()?,
            stage: Stage::parse(&fields.required_text("stage")?)?,
            archive_existing,
        })
    })
    .await
}

async fn delete_version(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::DeleteVersion {
            name: fields.required_text("name")?,
            version: fields.version()?,
        })
    })
    .await
}

async fn set_version_tag(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::SetVersionTag {
            name: fields.required_text("name")?,
            version: fields.version()?,
            key: fields.required_text("key")?,
            value: fields.text("value")?.unwrap_or_default(),
        })
    })
    .await
}

async fn delete_version_tag(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_write(tracker, query, body, |fields| {
        Ok(RegistryCommand::DeleteVersionTag {
            name: fields.required_text("name")?,
            version: fields.version()?,
            key: fields.required_text("key")?,
        })
    })
    .await
}

/// A read of the registry with the request's fields.
async fn registry_read(
    tracker: Tracker,
    query: Option<String>,
    body: Bytes,
    answer: impl FnOnce(&Fields, &crate::registry::Registry) -> Result<Value, Failure>,
) -> Response {
    respond(
        async {
            let fields = request_fields(query, &body)?;
            let tracking = tracker.read().await?;
            answer(&fields, tracking.registry())
        }
        .await,
    )
}

async fn get_model(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_read(tracker, query, body, |fields, registry| {
        Ok(json!({ "registered_model": model_json(registry.model(&fields.required_text("name")?)?) }))
    })
    .await
}

async fn search_models(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_read(tracker, query, body, |fields, registry| {
        let (models, next_page_token) = registry.search_models(&fields.search(Subject::RegisteredModels)?)?;
        let mut answer = json!({ "registered_models": models.iter().map(model_json).collect::<Vec<_>>() });
        if let Some(token) = next_page_token {
            answer["next_page_token"] = Value::from(token);
        }
        Ok(answer)
    })
    .await
}

async fn latest_versions(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_read(tracker, query, body, |fields, registry| {
        let model = registry.model(&fields.required_text("name")?)?;
        let stages = fields
            .strings("stages")?
            .iter()
            .map(|stage| Stage::parse(stage))
            .collect::<Result<Vec<_>, _>>()?;
        let versions: Vec<Value> = model
            .latest_versions(&stages)
            .into_iter()
            .map(|version| version_json(version, model.aliases_of(version.version)))
            .collect();
        Ok(json!({ "model_versions": versions }))
    })
    .await
}

async fn version_by_alias(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_read(tracker, query, body, |fields, registry| {
        let name = fields.required_text("name")?;
        let version = registry.version_by_alias(&name, &fields.required_text("alias")?)?;
        let aliases = registry.model(&name)?.aliases_of(version.version);
        Ok(json!({ "model_version": version_json(version, aliases) }))
    })
    .await
}

async fn get_version(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_read(tracker, query, body, |fields, registry| {
        let name = fields.required_text("name")?;
        let version = registry.version(&name, fields.version()?)?;
        let aliases = registry.model(&name)?.aliases_of(version.version);
        Ok(json!({ "model_version": version_json(version, aliases) }))
    })
    .await
}

async fn search_versions(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_read(tracker, query, body, |fields, registry| {
        let (versions, next_page_token) = registry.search_versions(&fields.search(Subject::ModelVersions)?)?;
        let versions: Vec<Value> = versions
            .iter()
            .map(|version| {
                let aliases = registry
                    .model(&version.name)
                    .map(|model| model.aliases_of(version.version))
                    .unwrap_or_default();
                version_json(version, aliases)
            })
            .collect();
        let mut answer = json!({ "model_versions": versions });
        if let Some(token) = next_page_token {
            answer["next_page_token"] = Value::from(token);
        }
        Ok(answer)
    })
    .await
}

async fn download_uri(State(tracker): State<Tracker>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    registry_read(tracker, query, body, |fields, registry| {
        let version = registry.version(&fields.required_text("name")?, fields.version()?)?;
        Ok(json!({ "artifact_uri": version.source }))
    })
    .await
}
