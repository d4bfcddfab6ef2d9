//! MLflow 3's logged models: a model logged from a run (`mlflow.<flavor>.log_model`) is an entity of its own,
//! with an id (`m-` and 32 hex digits), an artifact location under its experiment
//! (`…/models/ID/artifacts`), a status that is finalized once its files are uploaded, tags and params. The
//! stock client looks them up whenever it reads a run's artifacts by path, and creates them when it logs a
//! model.

use imbl::{OrdMap, Vector};
use serde::{Deserialize, Serialize};

use super::{ErrorCode, ModelMetric, Tracking, TrackingError, check_key, check_value, refuse};
use crate::search::{Filter, Order, SearchableRun, TextAttribute, TimeAttribute};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoggedModelStatus {
    Pending,
    Ready,
    Failed,
}

impl LoggedModelStatus {
    /// The protobuf enum's name, as MLflow's JSON carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            LoggedModelStatus::Pending => "LOGGED_MODEL_PENDING",
            LoggedModelStatus::Ready => "LOGGED_MODEL_READY",
            LoggedModelStatus::Failed => "LOGGED_MODEL_UPLOAD_FAILED",
        }
    }

    pub fn parse(text: &str) -> Result<LoggedModelStatus, TrackingError> {
        match text {
            "LOGGED_MODEL_PENDING" | "PENDING" => Ok(LoggedModelStatus::Pending),
            "LOGGED_MODEL_READY" | "READY" => Ok(LoggedModelStatus::Ready),
            "LOGGED_MODEL_UPLOAD_FAILED" | "FAILED" => Ok(LoggedModelStatus::Failed),
            other => refuse(
                ErrorCode::InvalidParameterValue,
                format!(
                    "'{other}' is not a logged model status; expected LOGGED_MODEL_READY or LOGGED_MODEL_UPLOAD_FAILED"
                ),
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedModel {
    pub id: String,
    pub experiment_id: String,
    pub name: String,
    pub model_type: String,
    pub source_run_id: String,
    pub artifact_uri: String,
    pub status: LoggedModelStatus,
    pub creation_time_ms: i64,
    pub last_updated_time_ms: i64,
    pub tags: OrdMap<String, String>,
    pub params: OrdMap<String, String>,
}

/// The logged model a source names, `models:/m-ID` (how MLflow 3 registers a version of one), if it
/// names one.
pub fn logged_model_of(source: &str) -> Option<&str> {
    source
        .strip_prefix("models:/")
        .map(|id| id.trim_end_matches('/'))
        .filter(|id| id.starts_with("m-") && !id.contains('/'))
}

/// A logged model as its search sees it: `name`, `source_run_id`, the two timestamps, params, tags, and
/// the latest value (highest step, then latest time) of each metric logged for it.
struct Searched<'a> {
    model: &'a LoggedModel,
    metrics: Option<&'a Vector<ModelMetric>>,
}

impl SearchableRun for Searched<'_> {
    fn metric(&self, key: &str) -> Option<f64> {
        self.metrics?
            .iter()
            .filter(|metric| metric.key == key)
            .max_by_key(|metric| (metric.point.step, metric.point.timestamp_ms))
            .map(|metric| metric.point.value)
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.model.params.get(key).map(String::as_str)
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.model.tags.get(key).map(String::as_str)
    }

    fn text_attribute(&self, attribute: TextAttribute) -> Option<&str> {
        let model = self.model;
        match attribute {
            TextAttribute::RunName => Some(&model.name),
            TextAttribute::RunId => Some(&model.source_run_id),
            TextAttribute::ArtifactUri => Some(&model.id),
            TextAttribute::Status => Some(model.status.as_str()),
            TextAttribute::UserId => None,
        }
    }

    fn time_attribute(&self, attribute: TimeAttribute) -> Option<i64> {
        Some(match attribute {
            TimeAttribute::StartTime => self.model.creation_time_ms,
            TimeAttribute::EndTime => self.model.last_updated_time_ms,
        })
    }
}

/// A replicated write to the logged models; the id of a new one is chosen by the proposer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LoggedModelCommand {
    Create {
        model_id: String,
        experiment_id: String,
        name: String,
        model_type: String,
        source_run_id: String,
        tags: Vec<(String, String)>,
        params: Vec<(String, String)>,
    },
    Finalize {
        model_id: String,
        status: LoggedModelStatus,
    },
    Delete {
        model_id: String,
    },
    SetTags {
        model_id: String,
        tags: Vec<(String, String)>,
    },
    DeleteTag {
        model_id: String,
        key: String,
    },
    LogParams {
        model_id: String,
        params: Vec<(String, String)>,
    },
}

/// A search for logged models.
#[derive(Debug, Clone, Default)]
pub struct LoggedModelSearch {
    pub experiment_ids: Vec<String>,
    pub filter: Filter,
    pub order_by: Vec<Order>,
    pub max_results: usize,
    pub page_token: Option<String>,
}

fn check_pairs(pairs: &[(String, String)], what: &str, limit: usize) -> Result<(), TrackingError> {
    for (key, value) in pairs {
        check_key(key, what)?;
        check_value(value, limit, what, key)?;
    }
    Ok(())
}

impl Tracking {
    pub fn logged_model(&self, id: &str) -> Result<&LoggedModel, TrackingError> {
        self.logged_models.get(id).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("no logged model has id '{id}'"),
        })
    }

    fn logged_model_mut(&mut self, id: &str) -> Result<&mut LoggedModel, TrackingError> {
        self.logged_models.get_mut(id).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("no logged model has id '{id}'"),
        })
    }

    pub(super) fn apply_logged_model(
        &mut self,
        command: LoggedModelCommand,
        now_ms: i64,
    ) -> Result<Option<LoggedModel>, TrackingError> {
        match command {
            LoggedModelCommand::Create {
                model_id,
                experiment_id,
                name,
                model_type,
                source_run_id,
                tags,
                params,
            } => {
                let experiment = self.active_experiment(&experiment_id)?;
                let location = experiment.artifact_location.trim_end_matches('/').to_string();
                if !source_run_id.is_empty() {
                    self.run(&source_run_id)?;
                }
                if self.logged_models.contains_key(&model_id) {
                    return refuse(
                        ErrorCode::ResourceAlreadyExists,
                        format!("logged model '{model_id}' already exists"),
                    );
                }
                check_pairs(&tags, "tag", super::TAG_VALUE_CHARS_MAX)?;
                check_pairs(&params, "param", super::PARAM_VALUE_CHARS_MAX)?;
                let model = LoggedModel {
                    artifact_uri: format!("{location}/models/{model_id}/artifacts"),
                    id: model_id.clone(),
                    experiment_id,
                    name: if name.is_empty() { model_id.clone() } else { name },
                    model_type,
                    source_run_id,
                    status: LoggedModelStatus::Pending,
                    creation_time_ms: now_ms,
                    last_updated_time_ms: now_ms,
                    tags: tags.into_iter().collect(),
                    params: params.into_iter().collect(),
                };
                self.logged_models.insert(model_id, model.clone());
                Ok(Some(model))
            }
            LoggedModelCommand::Finalize { model_id, status } => {
                if status == LoggedModelStatus::Pending {
                    return refuse(
                        ErrorCode::InvalidParameterValue,
                        "a logged model is finalized as LOGGED_MODEL_READY or LOGGED_MODEL_UPLOAD_FAILED".into(),
                    );
                }
                let model = self.logged_model_mut(&model_id)?;
                model.status = status;
                model.last_updated_time_ms = now_ms;
                Ok(Some(model.clone()))
            }
            LoggedModelCommand::Delete { model_id } => {
                self.logged_model(&model_id)?;
                self.logged_models.remove(&model_id);
                Ok(None)
            }
            LoggedModelCommand::SetTags { model_id, tags } => {
                check_pairs(&tags, "tag", super::TAG_VALUE_CHARS_MAX)?;
                let model = self.logged_model_mut(&model_id)?;
                model.tags.extend(tags);
                model.last_updated_time_ms = now_ms;
                Ok(None)
            }
            LoggedModelCommand::DeleteTag { model_id, key } => {
                let model = self.logged_model_mut(&model_id)?;
                if model.tags.remove(&key).is_none() {
                    return refuse(
                        ErrorCode::ResourceDoesNotExist,
                        format!("logged model '{model_id}' has no tag '{key}'"),
                    );
                }
                model.last_updated_time_ms = now_ms;
                Ok(None)
            }
            LoggedModelCommand::LogParams { model_id, params } => {
                check_pairs(&params, "param", super::PARAM_VALUE_CHARS_MAX)?;
                let model = self.logged_model(&model_id)?;
                if let Some((key, value)) = params
                    .iter()
                    .find(|(key, value)| model.params.get(key).is_some_and(|old| old != value))
                {
                    return refuse(
                        ErrorCode::InvalidParameterValue,
                        format!(
                            "param '{key}' of logged model '{model_id}' is '{}'; it cannot change value to '{value}'",
                            model.params[key]
                        ),
                    );
                }
                let model = self.logged_model_mut(&model_id)?;
                model.params.extend(params);
                model.last_updated_time_ms = now_ms;
                Ok(None)
            }
        }
    }

    /// One page of the logged models of `search.experiment_ids` its filter matches, newest first unless
    /// ordered otherwise.
    pub fn search_logged_models(
        &self,
        search: &LoggedModelSearch,
    ) -> Result<(Vec<LoggedModel>, Option<String>), TrackingError> {
        for id in &search.experiment_ids {
            self.experiment(id)?;
        }
        let searched: Vec<Searched<'_>> = self
            .logged_models
            .values()
            .filter(|model| search.experiment_ids.is_empty() || search.experiment_ids.contains(&model.experiment_id))
            .map(|model| Searched {
                model,
                metrics: self.model_metrics.get(&model.id),
            })
            .filter(|searched| search.filter.matches(searched))
            .collect();
        let mut models: Vec<&Searched<'_>> = searched.iter().collect();
        crate::search::sort(&search.order_by, &mut models);
        let models: Vec<&LoggedModel> = models.into_iter().map(|searched| searched.model).collect();
        super::page(models, search.max_results, search.page_token.as_deref())
    }
}
