//! The model registry as replicated state: registered models, their numbered versions and aliases, with
//! MLflow's rules, so that the MLflow Model Registry REST API (issue 6) is a thin layer over it.
//!
//! ```text
//!   Registry ── models  name ─► RegisteredModel (description, tags, times,
//!                                  versions: number ─► ModelVersion (source, run, stage, tags,
//!                                                                     the run's metrics when registered),
//!                                  aliases:  alias ─► version number)
//! ```
//!
//! It lives inside the tracking store ([`crate::tracking::Tracking`]), so a version can check its run and
//! copy the run's latest metrics as one deterministic step. As there, every change checks everything first,
//! so a refused command changes nothing, and takes its time from the proposer.
//!
//! MLflow's rules kept here: model names are unique and non-empty; versions count up from 1 per model and
//! are never reused (deleting the newest does not free its number); an alias names one version of its
//! model, moves when set again, and goes when its version is deleted; `latest` and names that read like a
//! version (`7`, `v7`) cannot be aliases; a version's stage is None, Staging, Production or Archived.

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use crate::search::{Filter, Order, SearchableRun, TextAttribute, TimeAttribute, compare};
use crate::tracking::{ErrorCode, TrackingError};

const NAME_CHARS_MAX: usize = 256;
const DESCRIPTION_CHARS_MAX: usize = 5_000;
const TAG_KEY_CHARS_MAX: usize = 250;
const TAG_VALUE_CHARS_MAX: usize = 5_000;
const ALIAS_CHARS_MAX: usize = 255;
const SOURCE_CHARS_MAX: usize = 5_000;

fn refuse<T>(code: ErrorCode, message: String) -> Result<T, TrackingError> {
    Err(TrackingError { code, message })
}

/// A version's stage (MLflow's legacy stages, still what `get-latest-versions` and `transition-stage` use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Stage {
    #[default]
    None,
    Staging,
    Production,
    Archived,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::None, Stage::Staging, Stage::Production, Stage::Archived];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::None => "None",
            Stage::Staging => "Staging",
            Stage::Production => "Production",
            Stage::Archived => "Archived",
        }
    }

    /// Parses a stage name in any case, as MLflow does.
    pub fn parse(text: &str) -> Result<Stage, TrackingError> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| TrackingError {
                code: ErrorCode::InvalidParameterValue,
                message: format!(
                    "'{text}' is not a model version stage; expected None, Staging, Production or Archived"
                ),
            })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub creation_time_ms: i64,
    pub last_updated_time_ms: i64,
    pub description: String,
    pub user_id: String,
    /// Where the model's files are (an artifact URI such as `mlflow-artifacts:/0/RUN/artifacts/model`).
    pub source: String,
    /// The run that made it, when known.
    pub run_id: String,
    pub run_link: String,
    pub stage: Stage,
    pub tags: OrdMap<String, String>,
    /// The run's latest metrics when the version was registered.
    pub metrics: OrdMap<String, f64>,
}

impl ModelVersion {
    pub fn version_text(&self) -> String {
        self.version.to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisteredModel {
    pub name: String,
    pub description: String,
    pub user_id: String,
    pub creation_time_ms: i64,
    pub last_updated_time_ms: i64,
    pub tags: OrdMap<String, String>,
    pub versions: OrdMap<u64, ModelVersion>,
    pub aliases: OrdMap<String, u64>,
    /// The number the next version gets.
    pub next_version: u64,
}

impl RegisteredModel {
    /// The aliases that point at `version`.
    pub fn aliases_of(&self, version: u64) -> Vec<String> {
        self.aliases
            .iter()
            .filter(|(_, target)| **target == version)
            .map(|(alias, _)| alias.clone())
            .collect()
    }

    /// The newest version in each stage that has one (MLflow's `latest_versions`), or in `stages` only.
    pub fn latest_versions(&self, stages: &[Stage]) -> Vec<&ModelVersion> {
        let wanted: &[Stage] = if stages.is_empty() { &Stage::ALL } else { stages };
        wanted
            .iter()
            .filter_map(|stage| self.versions.values().rev().find(|version| version.stage == *stage))
            .collect()
    }
}

/// A registered model as MLflow's `registered-models/search` sees it: `name` is the run-name slot,
/// `creation_timestamp` and `last_updated_timestamp` the start and end times.
impl SearchableRun for RegisteredModel {
    fn metric(&self, _key: &str) -> Option<f64> {
        None
    }

    fn param(&self, _key: &str) -> Option<&str> {
        None
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }

    fn text_attribute(&self, attribute: TextAttribute) -> Option<&str> {
        match attribute {
            TextAttribute::RunName | TextAttribute::RunId => Some(&self.name),
            _ => None,
        }
    }

    fn time_attribute(&self, attribute: TimeAttribute) -> Option<i64> {
        Some(match attribute {
            TimeAttribute::StartTime => self.creation_time_ms,
            TimeAttribute::EndTime => self.last_updated_time_ms,
        })
    }
}

/// A model version as `model-versions/search` sees it: `name`, `run_id`, `source_path` (the artifact-URI
/// slot), `version_number` (a number), the two timestamps, and tags.
impl SearchableRun for ModelVersion {
    fn metric(&self, key: &str) -> Option<f64> {
        (key == "version_number").then_some(self.version as f64)
    }

    fn param(&self, _key: &str) -> Option<&str> {
        None
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }

    fn text_attribute(&self, attribute: TextAttribute) -> Option<&str> {
        match attribute {
            TextAttribute::RunName => Some(&self.name),
            TextAttribute::RunId => Some(&self.run_id),
            TextAttribute::ArtifactUri => Some(&self.source),
            TextAttribute::Status => Some(self.stage.as_str()),
            TextAttribute::UserId => Some(&self.user_id),
        }
    }

    fn time_attribute(&self, attribute: TimeAttribute) -> Option<i64> {
        Some(match attribute {
            TimeAttribute::StartTime => self.creation_time_ms,
            TimeAttribute::EndTime => self.last_updated_time_ms,
        })
    }
}

/// A replicated write to the registry. Times come from the proposer (the enclosing tracking command).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RegistryCommand {
    CreateModel {
        name: String,
        description: String,
        tags: Vec<(String, String)>,
    },
    RenameModel {
        name: String,
        new_name: String,
    },
    UpdateModel {
        name: String,
        description: String,
    },
    DeleteModel {
        name: String,
    },
    SetModelTag {
        name: String,
        key: String,
        value: String,
    },
    DeleteModelTag {
        name: String,
        key: String,
    },
    /// `metrics` are the run's latest metrics, filled in when applied.
    CreateVersion {
        name: String,
        source: String,
        run_id: String,
        run_link: String,
        description: String,
        tags: Vec<(String, String)>,
    },
    UpdateVersion {
        name: String,
        version: u64,
        description: String,
    },
    TransitionStage {
        name: String,
        version: u64,
        stage: Stage,
        archive_existing: bool,
    },
    DeleteVersion {
        name: String,
        version: u64,
    },
    SetVersionTag {
        name: String,
        version: u64,
        key: String,
        value: String,
    },
    DeleteVersionTag {
        name: String,
        version: u64,
        key: String,
    },
    SetAlias {
        name: String,
        alias: String,
        version: u64,
    },
    DeleteAlias {
        name: String,
        alias: String,
    },
}

/// What a registry command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RegistryOutcome {
    Model(RegisteredModel),
    /// A version as applied, with the aliases that point at it.
    Version(ModelVersion, Vec<String>),
    Done,
}

/// A search for registered models or model versions (`registered-models/search`, `model-versions/search`).
#[derive(Debug, Clone, Default)]
pub struct ModelSearch {
    pub filter: Filter,
    pub order_by: Vec<Order>,
    pub max_results: usize,
    pub page_token: Option<String>,
}

fn check_chars(text: &str, limit: usize, what: &str) -> Result<(), TrackingError> {
    let count = text.chars().count();
    if count > limit {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!("{what} has {count} characters; at most {limit} are allowed"),
        );
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), TrackingError> {
    if name.trim().is_empty() {
        return refuse(
            ErrorCode::InvalidParameterValue,
            "a registered model needs a non-empty name".into(),
        );
    }
    check_chars(name, NAME_CHARS_MAX, &format!("model name '{name}'"))?;
    if name.contains('/') || name.contains(':') {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!("model name '{name}' contains '/' or ':', which model URIs (models:/NAME/VERSION) use"),
        );
    }
    Ok(())
}

fn check_tag(key: &str, value: &str) -> Result<(), TrackingError> {
    if key.is_empty() {
        return refuse(ErrorCode::InvalidParameterValue, "a tag needs a non-empty key".into());
    }
    check_chars(key, TAG_KEY_CHARS_MAX, &format!("tag key '{key}'"))?;
    check_chars(value, TAG_VALUE_CHARS_MAX, &format!("the value of tag '{key}'"))
}

/// MLflow's alias rule: letters, digits, `_` and `-`; not `latest`, not a version (`7`, `v7`).
fn check_alias(alias: &str) -> Result<(), TrackingError> {
    let looks_like_version = {
        let digits = alias.strip_prefix(['v', 'V']).unwrap_or(alias);
        !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit())
    };
    if alias.is_empty()
        || alias.chars().count() > ALIAS_CHARS_MAX
        || !alias.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!("alias '{alias}' must be 1 to {ALIAS_CHARS_MAX} letters, digits, '_' or '-'"),
        );
    }
    if alias.eq_ignore_ascii_case("latest") || looks_like_version {
        return refuse(
            ErrorCode::InvalidParameterValue,
            format!("alias '{alias}' is reserved ('latest' and version numbers such as 'v3' name versions already)"),
        );
    }
    Ok(())
}

/// Removes `key` from `map`, or refuses: `owner` has no such `what`.
fn remove_named<V: Clone>(
    map: &mut OrdMap<String, V>,
    key: &str,
    owner: &str,
    what: &str,
) -> Result<(), TrackingError> {
    match map.remove(key) {
        Some(_) => Ok(()),
        None => refuse(
            ErrorCode::ResourceDoesNotExist,
            format!("{owner} has no {what} '{key}'"),
        ),
    }
}

/// Registered models by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    models: OrdMap<String, RegisteredModel>,
}

impl Registry {
    pub fn model(&self, name: &str) -> Result<&RegisteredModel, TrackingError> {
        self.models.get(name).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("no registered model is named '{name}'"),
        })
    }

    pub fn models(&self) -> impl Iterator<Item = &RegisteredModel> {
        self.models.values()
    }

    pub fn version(&self, name: &str, version: u64) -> Result<&ModelVersion, TrackingError> {
        self.model(name)?.versions.get(&version).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("registered model '{name}' has no version {version}"),
        })
    }

    /// The version `alias` points at.
    pub fn version_by_alias(&self, name: &str, alias: &str) -> Result<&ModelVersion, TrackingError> {
        let model = self.model(name)?;
        let version = model.aliases.get(alias).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("registered model '{name}' has no alias '{alias}'"),
        })?;
        self.version(name, *version)
    }

    /// Applies one command. `run_metrics` looks up a run's latest metrics (`None`: no such run), so a new
    /// version can check its run and keep what the run measured.
    pub fn apply(
        &mut self,
        command: RegistryCommand,
        user_id: &str,
        now_ms: i64,
        run_metrics: impl Fn(&str) -> Option<OrdMap<String, f64>>,
    ) -> Result<RegistryOutcome, TrackingError> {
        match command {
            RegistryCommand::CreateModel {
                name,
                description,
                tags,
            } => {
                check_name(&name)?;
                check_chars(&description, DESCRIPTION_CHARS_MAX, "the description")?;
                for (key, value) in &tags {
                    check_tag(key, value)?;
                }
                if self.models.contains_key(&name) {
                    return refuse(
                        ErrorCode::ResourceAlreadyExists,
                        format!("registered model '{name}' already exists"),
                    );
                }
                let model = RegisteredModel {
                    name: name.clone(),
                    description,
                    user_id: user_id.to_string(),
                    creation_time_ms: now_ms,
                    last_updated_time_ms: now_ms,
                    tags: tags.into_iter().collect(),
                    versions: OrdMap::new(),
                    aliases: OrdMap::new(),
                    next_version: 1,
                };
                self.models.insert(name, model.clone());
                Ok(RegistryOutcome::Model(model))
            }
            RegistryCommand::RenameModel { name, new_name } => {
                let model = self.model(&name)?.clone();
                check_name(&new_name)?;
                if new_name != name && self.models.contains_key(&new_name) {
                    return refuse(
                        ErrorCode::ResourceAlreadyExists,
                        format!("registered model '{new_name}' already exists"),
                    );
                }
                self.models.remove(&name);
                let versions = model
                    .versions
                    .iter()
                    .map(|(number, version)| {
                        let renamed = ModelVersion {
                            name: new_name.clone(),
                            ..version.clone()
                        };
                        (*number, renamed)
                    })
                    .collect();
                let renamed = RegisteredModel {
                    name: new_name.clone(),
                    versions,
                    last_updated_time_ms: now_ms,
                    ..model
                };
                self.models.insert(new_name, renamed.clone());
                Ok(RegistryOutcome::Model(renamed))
            }
            RegistryCommand::UpdateModel { name, description } => {
                check_chars(&description, DESCRIPTION_CHARS_MAX, "the description")?;
                let model = self.model_mut(&name)?;
                model.description = description;
                model.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Model(model.clone()))
            }
            RegistryCommand::DeleteModel { name } => {
                self.model(&name)?;
                self.models.remove(&name);
                Ok(RegistryOutcome::Done)
            }
            RegistryCommand::SetModelTag { name, key, value } => {
                check_tag(&key, &value)?;
                let model = self.model_mut(&name)?;
                model.tags.insert(key, value);
                model.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Done)
            }
            RegistryCommand::DeleteModelTag { name, key } => {
                let model = self.model_mut(&name)?;
                remove_named(&mut model.tags, &key, &format!("registered model '{name}'"), "tag")?;
                model.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Done)
            }
            RegistryCommand::CreateVersion {
                name,
                source,
                run_id,
                run_link,
                description,
                tags,
            } => {
                self.model(&name)?;
                if source.trim().is_empty() {
                    return refuse(
                        ErrorCode::InvalidParameterValue,
                        "a model version needs a source: the URI of the model's files".into(),
                    );
                }
                check_chars(&source, SOURCE_CHARS_MAX, "the source")?;
                check_chars(&description, DESCRIPTION_CHARS_MAX, "the description")?;
                for (key, value) in &tags {
                    check_tag(key, value)?;
                }
                let metrics = if run_id.is_empty() {
                    OrdMap::new()
                } else {
                    run_metrics(&run_id).ok_or_else(|| TrackingError {
                        code: ErrorCode::ResourceDoesNotExist,
                        message: format!("no run has id '{run_id}' (the run_id of the new version of '{name}')"),
                    })?
                };
                let model = self.model_mut(&name)?;
                let version = ModelVersion {
                    name: name.clone(),
                    version: model.next_version,
                    creation_time_ms: now_ms,
                    last_updated_time_ms: now_ms,
                    description,
                    user_id: user_id.to_string(),
                    source,
                    run_id,
                    run_link,
                    stage: Stage::None,
                    tags: tags.into_iter().collect(),
                    metrics,
                };
                model.versions.insert(version.version, version.clone());
                model.next_version += 1;
                model.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Version(version, Vec::new()))
            }
            RegistryCommand::UpdateVersion {
                name,
                version,
                description,
            } => {
                check_chars(&description, DESCRIPTION_CHARS_MAX, "the description")?;
                let entry = self.version_mut(&name, version)?;
                entry.description = description;
                entry.last_updated_time_ms = now_ms;
                let entry = entry.clone();
                let aliases = self.model(&name)?.aliases_of(version);
                Ok(RegistryOutcome::Version(entry, aliases))
            }
            RegistryCommand::TransitionStage {
                name,
                version,
                stage,
                archive_existing,
            } => {
                self.version(&name, version)?;
                let model = self.model_mut(&name)?;
                if archive_existing && matches!(stage, Stage::Staging | Stage::Production) {
                    let others: Vec<u64> = model
                        .versions
                        .values()
                        .filter(|other| other.version != version && other.stage == stage)
                        .map(|other| other.version)
                        .collect();
                    for number in others {
                        if let Some(other) = model.versions.get_mut(&number) {
                            other.stage = Stage::Archived;
                            other.last_updated_time_ms = now_ms;
                        }
                    }
                }
                let entry = model.versions.get_mut(&version).expect("checked above");
                entry.stage = stage;
                entry.last_updated_time_ms = now_ms;
                let entry = entry.clone();
                model.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Version(entry, model.aliases_of(version)))
            }
            RegistryCommand::DeleteVersion { name, version } => {
                self.version(&name, version)?;
                let model = self.model_mut(&name)?;
                model.versions.remove(&version);
                for alias in model.aliases_of(version) {
                    model.aliases.remove(&alias);
                }
                model.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Done)
            }
            RegistryCommand::SetVersionTag {
                name,
                version,
                key,
                value,
            } => {
                check_tag(&key, &value)?;
                let entry = self.version_mut(&name, version)?;
                entry.tags.insert(key, value);
                entry.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Done)
            }
            RegistryCommand::DeleteVersionTag { name, version, key } => {
                let entry = self.version_mut(&name, version)?;
                let owner = format!("version {version} of registered model '{name}'");
                remove_named(&mut entry.tags, &key, &owner, "tag")?;
                entry.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Done)
            }
            RegistryCommand::SetAlias { name, alias, version } => {
                check_alias(&alias)?;
                self.version(&name, version)?;
                let model = self.model_mut(&name)?;
                model.aliases.insert(alias, version);
                model.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Done)
            }
            RegistryCommand::DeleteAlias { name, alias } => {
                let model = self.model_mut(&name)?;
                remove_named(
                    &mut model.aliases,
                    &alias,
                    &format!("registered model '{name}'"),
                    "alias",
                )?;
                model.last_updated_time_ms = now_ms;
                Ok(RegistryOutcome::Done)
            }
        }
    }

    fn model_mut(&mut self, name: &str) -> Result<&mut RegisteredModel, TrackingError> {
        self.models.get_mut(name).ok_or_else(|| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: format!("no registered model is named '{name}'"),
        })
    }

    fn version_mut(&mut self, name: &str, version: u64) -> Result<&mut ModelVersion, TrackingError> {
        self.model_mut(name)?
            .versions
            .get_mut(&version)
            .ok_or_else(|| TrackingError {
                code: ErrorCode::ResourceDoesNotExist,
                message: format!("registered model '{name}' has no version {version}"),
            })
    }

    /// One page of the registered models the filter matches, by name unless `order_by` says otherwise.
    pub fn search_models(&self, search: &ModelSearch) -> Result<(Vec<RegisteredModel>, Option<String>), TrackingError> {
        let mut models: Vec<&RegisteredModel> = self
            .models
            .values()
            .filter(|model| search.filter.matches(*model))
            .collect();
        // The map is already in name order; a stable sort keeps it among equals.
        if !search.order_by.is_empty() {
            crate::search::sort(&search.order_by, &mut models);
        }
        crate::tracking::page(models, search.max_results, search.page_token.as_deref())
    }

    /// One page of the model versions the filter matches: by model name, then newest version first, unless
    /// `order_by` says otherwise.
    pub fn search_versions(&self, search: &ModelSearch) -> Result<(Vec<ModelVersion>, Option<String>), TrackingError> {
        let mut versions: Vec<&ModelVersion> = self
            .models
            .values()
            .flat_map(|model| model.versions.values())
            .filter(|version| search.filter.matches(*version))
            .collect();
        let natural = |a: &&ModelVersion, b: &&ModelVersion| a.name.cmp(&b.name).then(b.version.cmp(&a.version));
        if search.order_by.is_empty() {
            versions.sort_by(natural);
        } else {
            versions.sort_by(|a, b| compare(&search.order_by, *a, *b).then_with(|| natural(a, b)));
        }
        crate::tracking::page(versions, search.max_results, search.page_token.as_deref())
    }
}

#[cfg(test)]
mod tests;
