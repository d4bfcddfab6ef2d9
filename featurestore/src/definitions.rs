//! Feature definitions: entities (join keys), sources, feature views and feature services, written in TOML
//! (`examples/features/driver.toml`) and checked twice before anything changes:
//!
//! ```text
//!   parse_definitions(text)  names unique, references resolve, types known, TTLs parse   (no IO)
//!   check_against_data(defs) every view's source (and SQL transform) read by DataFusion: the join keys,
//!                            the timestamp and every feature exist, with a type the feature accepts
//! ```
//!
//! A definition that fails either check is refused with an error naming the object, the field and what
//! was expected; nothing is applied.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::datasource::file_format::options::ArrowReadOptions;
use datafusion::prelude::{CsvReadOptions, DataFrame, JsonReadOptions, ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::FeatureStoreError;
use crate::cache::{CachedIpcTable, SourceCache};

/// Everything one definitions file declares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definitions {
    pub entities: Vec<Entity>,
    pub sources: Vec<Source>,
    pub views: Vec<FeatureView>,
    pub services: Vec<FeatureService>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    pub name: String,
    pub join_keys: Vec<String>,
    pub description: String,
}

/// Where a view's rows come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceKind {
    /// A Parquet, CSV (with a header row), newline-delimited JSON or Arrow IPC file, by extension.
    File { path: String },
    /// Rows pushed through Flight `DoPut`.
    Push,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub name: String,
    pub kind: SourceKind,
    pub timestamp_field: String,
    pub description: String,
}

/// The value types a feature may have, and the arrow types each accepts from a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeatureType {
    Int32,
    Int64,
    Float32,
    Float64,
    String,
    Bool,
    Timestamp,
    /// An embedding: a list of floats.
    FloatList,
    /// Raw bytes, such as an encoded image.
    Bytes,
}

impl FeatureType {
    pub const NAMES: [&'static str; 9] = [
        "int32",
        "int64",
        "float32",
        "float64",
        "string",
        "bool",
        "timestamp",
        "float_list",
        "bytes",
    ];

    pub fn parse(name: &str) -> Option<FeatureType> {
        Some(match name {
            "int32" => FeatureType::Int32,
            "int64" => FeatureType::Int64,
            "float32" => FeatureType::Float32,
            "float64" => FeatureType::Float64,
            "string" => FeatureType::String,
            "bool" => FeatureType::Bool,
            "timestamp" => FeatureType::Timestamp,
            "float_list" => FeatureType::FloatList,
            "bytes" => FeatureType::Bytes,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FeatureType::Int32 => "int32",
            FeatureType::Int64 => "int64",
            FeatureType::Float32 => "float32",
            FeatureType::Float64 => "float64",
            FeatureType::String => "string",
            FeatureType::Bool => "bool",
            FeatureType::Timestamp => "timestamp",
            FeatureType::FloatList => "float_list",
            FeatureType::Bytes => "bytes",
        }
    }

    /// Whether a source column of `data_type` can hold this feature without losing anything.
    pub fn accepts(self, data_type: &DataType) -> bool {
        use DataType as T;
        let float = |item: &DataType| matches!(item, T::Float16 | T::Float32 | T::Float64);
        match self {
            FeatureType::Int32 => matches!(data_type, T::Int8 | T::Int16 | T::Int32 | T::UInt8 | T::UInt16),
            FeatureType::Int64 => matches!(
                data_type,
                T::Int8 | T::Int16 | T::Int32 | T::Int64 | T::UInt8 | T::UInt16 | T::UInt32
            ),
            FeatureType::Float32 => matches!(data_type, T::Float16 | T::Float32),
            FeatureType::Float64 => matches!(data_type, T::Float16 | T::Float32 | T::Float64),
            FeatureType::String => matches!(data_type, T::Utf8 | T::LargeUtf8 | T::Utf8View),
            FeatureType::Bool => matches!(data_type, T::Boolean),
            FeatureType::Timestamp => matches!(data_type, T::Timestamp(_, _) | T::Date32 | T::Date64),
            FeatureType::FloatList => match data_type {
                T::List(item) | T::LargeList(item) | T::FixedSizeList(item, _) => float(item.data_type()),
                _ => false,
            },
            FeatureType::Bytes => matches!(data_type, T::Binary | T::LargeBinary | T::BinaryView),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    pub name: String,
    pub dtype: FeatureType,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureView {
    pub name: String,
    pub entities: Vec<String>,
    pub source: String,
    /// A SQL query over the source (named by the source's name) whose result the view serves.
    pub sql: Option<String>,
    /// How old a value may be and still count, in seconds; `None`: forever.
    pub ttl_seconds: Option<u64>,
    pub features: Vec<Feature>,
    pub description: String,
    pub owner: String,
    pub tags: BTreeMap<String, String>,
}

/// A feature of a view, as a service names it: `view:feature`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureRef {
    pub view: String,
    pub feature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureService {
    pub name: String,
    pub features: Vec<FeatureRef>,
    pub description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    entity: Vec<Spanned<RawEntity>>,
    #[serde(default)]
    source: Vec<Spanned<RawSource>>,
    #[serde(default)]
    feature_view: Vec<Spanned<RawView>>,
    #[serde(default)]
    feature_service: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    name: String,
    join_keys: Vec<String>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    /// A file path; absent for a push source.
    path: Option<String>,
    #[serde(default)]
    push: bool,
    timestamp_field: String,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawView {
    name: String,
    entities: Vec<String>,
    source: String,
    sql: Option<String>,
    ttl: Option<String>,
    #[serde(default)]
    feature: Vec<RawFeature>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeature {
    name: String,
    #[serde(rename = "type")]
    dtype: String,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    features: Vec<String>,
    #[serde(default)]
    description: String,
}

/// Where in the file a problem is, 1-based.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
    (line, column)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses and checks a definitions file without touching any data: names are unique and valid, every
/// reference resolves, types and TTLs parse. Errors carry the file name, line and column.
pub fn parse_definitions(source_name: &str, text: &str) -> Result<Definitions, FeatureStoreError> {
    let at = |offset: usize, message: String| {
        let (line, column) = line_column(text, offset);
        FeatureStoreError::InvalidInput(format!("invalid definitions {source_name}:{line}:{column}: {message}"))
    };
    let raw: RawFile = toml::from_str(text).map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        at(offset, error.message().to_string())
    })?;
    let mut definitions = Definitions::default();
    let mut names: BTreeMap<(&str, String), ()> = BTreeMap::new();
    let mut unique = |kind: &'static str, name: &str, offset: usize| {
        if !valid_name(name) {
            return Err(at(
                offset,
                format!(
                    "{kind} name '{name}' is not valid; expected letters, digits and '_', not starting with a digit"
                ),
            ));
        }
        if names.insert((kind, name.to_string()), ()).is_some() {
            return Err(at(offset, format!("{kind} '{name}' is defined twice")));
        }
        Ok(())
    };

    for entity in raw.entity {
        let offset = entity.span().start;
        let entity = entity.into_inner();
        unique("entity", &entity.name, offset)?;
        if entity.join_keys.is_empty() {
            return Err(at(
                offset,
                format!(
                    "entity '{}' has no join_keys; expected at least one column name",
                    entity.name
                ),
            ));
        }
        definitions.entities.push(Entity {
            name: entity.name,
            join_keys: entity.join_keys,
            description: entity.description,
        });
    }
    for source in raw.source {
        let offset = source.span().start;
        let source = source.into_inner();
        unique("source", &source.name, offset)?;
        let kind = match (source.path, source.push) {
            (Some(path), false) if !path.trim().is_empty() => SourceKind::File { path },
            (None, true) => SourceKind::Push,
            _ => {
                return Err(at(
                    offset,
                    format!(
                        "source '{}' needs either path = \"FILE\" (Parquet, CSV, JSON or Arrow IPC) or push = true",
                        source.name
                    ),
                ));
            }
        };
        definitions.sources.push(Source {
            name: source.name,
            kind,
            timestamp_field: source.timestamp_field,
            description: source.description,
        });
    }
    for view in raw.feature_view {
        let offset = view.span().start;
        let view = view.into_inner();
        unique("feature_view", &view.name, offset)?;
        for entity in &view.entities {
            if !definitions.entities.iter().any(|known| &known.name == entity) {
                return Err(at(
                    offset,
                    format!(
                        "feature_view '{}' names entity '{entity}', which is not defined (entities: {})",
                        view.name,
                        name_list(definitions.entities.iter().map(|entity| entity.name.as_str()))
                    ),
                ));
            }
        }
        if view.entities.is_empty() {
            return Err(at(
                offset,
                format!("feature_view '{}' names no entities; expected at least one", view.name),
            ));
        }
        if !definitions.sources.iter().any(|source| source.name == view.source) {
            return Err(at(
                offset,
                format!(
                    "feature_view '{}' reads source '{}', which is not defined (sources: {})",
                    view.name,
                    view.source,
                    name_list(definitions.sources.iter().map(|source| source.name.as_str()))
                ),
            ));
        }
        let ttl_seconds = match &view.ttl {
            None => None,
            Some(text) => Some(
                humantime::parse_duration(text)
                    .map_err(|error| {
                        at(offset, format!("feature_view '{}': ttl '{text}' is not a duration ({error}); expected e.g. \"2h\" or \"7d\"", view.name))
                    })?
                    .as_secs(),
            ),
        };
        if view.feature.is_empty() {
            return Err(at(
                offset,
                format!("feature_view '{}' declares no [[feature_view.feature]]", view.name),
            ));
        }
        let mut features = Vec::new();
        let mut seen = BTreeSet::new();
        for feature in view.feature {
            if !valid_name(&feature.name) || !seen.insert(feature.name.clone()) {
                return Err(at(
                    offset,
                    format!(
                        "feature_view '{}': feature '{}' is repeated or not a valid name",
                        view.name, feature.name
                    ),
                ));
            }
            let dtype = FeatureType::parse(&feature.dtype).ok_or_else(|| {
                at(
                    offset,
                    format!(
                        "feature_view '{}': feature '{}' has type '{}'; expected one of {}",
                        view.name,
                        feature.name,
                        feature.dtype,
                        FeatureType::NAMES.join(", ")
                    ),
                )
            })?;
            features.push(Feature {
                name: feature.name,
                dtype,
                description: feature.description,
            });
        }
        definitions.views.push(FeatureView {
            name: view.name,
            entities: view.entities,
            source: view.source,
            sql: view.sql,
            ttl_seconds,
            features,
            description: view.description,
            owner: view.owner,
            tags: view.tags,
        });
    }
    for service in raw.feature_service {
        let offset = service.span().start;
        let service = service.into_inner();
        unique("feature_service", &service.name, offset)?;
        let mut features = Vec::new();
        for reference in &service.features {
            let (view_name, feature_name) = match reference.split_once(':') {
                Some((view, feature)) => (view, Some(feature)),
                None => (reference.as_str(), None),
            };
            let view = definitions
                .views
                .iter()
                .find(|view| view.name == view_name)
                .ok_or_else(|| {
                    at(
                        offset,
                        format!(
                            "feature_service '{}' names view '{view_name}', which is not defined (views: {})",
                            service.name,
                            name_list(definitions.views.iter().map(|view| view.name.as_str()))
                        ),
                    )
                })?;
            // "view" takes every feature of the view; "view:feature" one.
            let chosen: Vec<&Feature> = match feature_name {
                None => view.features.iter().collect(),
                Some(name) => vec![view.features.iter().find(|feature| feature.name == name).ok_or_else(|| {
                    at(
                        offset,
                        format!(
                            "feature_service '{}' names feature '{name}' of view '{view_name}', which has no such feature (features: {})",
                            service.name,
                            name_list(view.features.iter().map(|feature| feature.name.as_str()))
                        ),
                    )
                })?],
            };
            features.extend(chosen.into_iter().map(|feature| FeatureRef {
                view: view.name.clone(),
                feature: feature.name.clone(),
            }));
        }
        if features.is_empty() {
            return Err(at(
                offset,
                format!("feature_service '{}' names no features", service.name),
            ));
        }
        definitions.services.push(FeatureService {
            name: service.name,
            features,
            description: service.description,
        });
    }
    Ok(definitions)
}

/// `names` joined with ", ", or "none" when there are none.
pub fn name_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

impl Definitions {
    /// The feature view named `name`, or an error that lists the views there are.
    pub fn view(&self, name: &str) -> Result<&FeatureView, FeatureStoreError> {
        self.views.iter().find(|view| view.name == name).ok_or_else(|| {
            FeatureStoreError::InvalidInput(format!(
                "feature view '{name}' is not defined (views: {})",
                name_list(self.views.iter().map(|view| view.name.as_str()))
            ))
        })
    }

    /// The feature service named `name`, or an error that lists the services there are.
    pub fn service(&self, name: &str) -> Result<&FeatureService, FeatureStoreError> {
        self.services
            .iter()
            .find(|service| service.name == name)
            .ok_or_else(|| {
                FeatureStoreError::InvalidInput(format!(
                    "feature service '{name}' is not defined (services: {})",
                    name_list(self.services.iter().map(|service| service.name.as_str()))
                ))
            })
    }

    /// The features that references name, as a request gives them: `"view:feature"` for one feature, `"view"`
    /// for every feature of the view, in the order given.
    pub fn features_named(&self, references: &[String]) -> Result<Vec<FeatureRef>, FeatureStoreError> {
        if references.is_empty() {
            return Err(FeatureStoreError::InvalidInput(
                "no features were named; expected references such as \"view:feature\" or \"view\"".into(),
            ));
        }
        let mut features = Vec::new();
        for reference in references {
            let (view_name, feature_name) = match reference.split_once(':') {
                Some((view, feature)) => (view, Some(feature)),
                None => (reference.as_str(), None),
            };
            let view = self.view(view_name)?;
            match feature_name {
                None => features.extend(view.features.iter().map(|feature| FeatureRef {
                    view: view.name.clone(),
                    feature: feature.name.clone(),
                })),
                Some(name) => {
                    let feature = view
                        .features
                        .iter()
                        .find(|feature| feature.name == name)
                        .ok_or_else(|| {
                            FeatureStoreError::InvalidInput(format!(
                                "feature '{name}' is not in feature view '{view_name}' (features: {})",
                                name_list(view.features.iter().map(|feature| feature.name.as_str()))
                            ))
                        })?;
                    features.push(FeatureRef {
                        view: view.name.clone(),
                        feature: feature.name.clone(),
                    });
                }
            }
        }
        Ok(features)
    }

    /// The push source named `name`, or an error naming the sources there are or saying it reads a file.
    pub fn push_source(&self, name: &str) -> Result<&Source, FeatureStoreError> {
        let source = self.sources.iter().find(|source| source.name == name).ok_or_else(|| {
            FeatureStoreError::InvalidInput(format!(
                "source '{name}' is not defined (sources: {})",
                name_list(self.sources.iter().map(|source| source.name.as_str()))
            ))
        })?;
        if source.kind != SourceKind::Push {
            return Err(FeatureStoreError::InvalidInput(format!(
                "source '{name}' reads a file, not pushes; expected a source with push = true"
            )));
        }
        Ok(source)
    }

    /// The source `view` reads.
    pub fn source_of(&self, view: &FeatureView) -> Result<&Source, FeatureStoreError> {
        self.sources
            .iter()
            .find(|source| source.name == view.source)
            .ok_or_else(|| FeatureStoreError::InvalidInput(format!("source '{}' is not defined", view.source)))
    }

    /// The join keys of `view`'s entities, in order.
    pub fn join_keys(&self, view: &FeatureView) -> Vec<String> {
        view.entities
            .iter()
            .filter_map(|entity| self.entities.iter().find(|known| &known.name == entity))
            .flat_map(|entity| entity.join_keys.iter().cloned())
            .collect()
    }
}

/// Where a push source's rows are kept offline: one Parquet file per acknowledged push.
pub fn push_directory(base: &Path, source: &str) -> std::path::PathBuf {
    base.join("push").join(source)
}

fn has_parquet_files(directory: &Path) -> bool {
    std::fs::read_dir(directory).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|entry| entry.path().extension().is_some_and(|extension| extension == "parquet"))
    })
}

/// Whether a source path is an object-store URL (`s3://BUCKET/KEY`, `file:///PATH`) rather than a local path.
pub fn is_object_url(path: &str) -> bool {
    path.split_once("://")
        .is_some_and(|(scheme, _)| !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// Makes the store `url` names readable by `context`, through `object_store`'s clients configured from
/// each cloud's standard environment: `s3://BUCKET/…` (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_REGION`, `AWS_ENDPOINT` for an S3-compatible store such as MinIO, `AWS_ALLOW_HTTP`, …),
/// `gs://BUCKET/…` (`GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_APPLICATION_CREDENTIALS`, …) and
/// `az://CONTAINER/…` (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, …); `file://` needs
/// nothing.
fn register_object_store(context: &SessionContext, name: &str, url: &str) -> Result<(), FeatureStoreError> {
    use object_store::ObjectStore;

    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let bucket = rest.split('/').next().unwrap_or_default();
    if scheme == "file" {
        return Ok(());
    }
    if !matches!(scheme, "s3" | "s3a" | "gs" | "az") {
        return Err(FeatureStoreError::InvalidInput(format!(
            "source '{name}': {url} is in a '{scheme}' store, which this build does not read; expected a local path, s3://BUCKET/KEY, gs://BUCKET/KEY, az://CONTAINER/KEY or file:///PATH"
        )));
    }
    if bucket.is_empty() || !rest.contains('/') {
        return Err(FeatureStoreError::InvalidInput(format!(
            "source '{name}': {url} names no object; expected {scheme}://BUCKET/KEY"
        )));
    }
    let built: object_store::Result<Arc<dyn ObjectStore>> = match scheme {
        "gs" => object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map(|store| Arc::new(store) as Arc<dyn ObjectStore>),
        "az" => object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_container_name(bucket)
            .build()
            .map(|store| Arc::new(store) as Arc<dyn ObjectStore>),
        _ => object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map(|store| Arc::new(store) as Arc<dyn ObjectStore>),
    };
    let store = built.map_err(|error| {
        FeatureStoreError::InvalidInput(format!(
            "source '{name}': the {scheme}:// store for '{bucket}' cannot be configured: {error}"
        ))
    })?;
    let store_url = datafusion::execution::object_store::ObjectStoreUrl::parse(format!("{scheme}://{bucket}"))?;
    context.register_object_store(store_url.as_ref(), store);
    Ok(())
}

/// A DataFusion context that reads in one partition: a file's rows come in the file's order, and several
/// files in the order given (more partitions would interleave them). The point-in-time rule ("the later
/// row wins a tie") and the online store ("later writes win") depend on it.
pub(crate) fn in_order() -> SessionContext {
    SessionContext::new_with_config(datafusion::prelude::SessionConfig::new().with_target_partitions(1))
}

/// The rows a view serves: its source registered with DataFusion under the source's name (a file, with
/// relative paths against `base`; a push source, the files under [`push_directory`]), through its SQL
/// transform when it has one. `None` for a push source that has received nothing yet.
pub async fn view_frame(
    definitions: &Definitions,
    view: &FeatureView,
    base: &Path,
) -> Result<Option<DataFrame>, FeatureStoreError> {
    view_frame_cached(definitions, view, base, None).await
}

/// [`view_frame`], with a local Arrow IPC source scanned from `cache` while it fits the cache's budget.
pub async fn view_frame_cached(
    definitions: &Definitions,
    view: &FeatureView,
    base: &Path,
    cache: Option<&Arc<SourceCache>>,
) -> Result<Option<DataFrame>, FeatureStoreError> {
    let source = definitions.source_of(view)?;
    let context = in_order();
    match &source.kind {
        SourceKind::File { path } => {
            let location = if is_object_url(path) || Path::new(path).is_absolute() {
                std::path::PathBuf::from(path)
            } else {
                base.join(path)
            };
            register_file_cached(&context, &source.name, &location, cache).await?;
        }
        SourceKind::Push => {
            let directory = push_directory(base, &source.name);
            if !has_parquet_files(&directory) {
                return Ok(None);
            }
            context
                .register_parquet(
                    &source.name,
                    directory.to_string_lossy().as_ref(),
                    ParquetReadOptions::default(),
                )
                .await?;
        }
    }
    let frame = match &view.sql {
        Some(sql) => context.sql(sql).await.map_err(|error| {
            FeatureStoreError::InvalidInput(format!("feature_view '{}': its sql does not run: {error}", view.name))
        })?,
        None => context.table(source.name.as_str()).await?,
    };
    Ok(Some(frame))
}

/// The schema a view produces ([`view_frame`]'s); `None` for a push source.
pub async fn view_schema(
    definitions: &Definitions,
    view: &FeatureView,
    base: &Path,
) -> Result<Option<Schema>, FeatureStoreError> {
    Ok(view_frame(definitions, view, base)
        .await?
        .map(|frame| frame.schema().as_arrow().clone()))
}

/// Registers a Parquet, CSV, newline-delimited JSON or Arrow IPC (.arrow, .feather, .ipc) file with DataFusion as
/// table `name`.
pub async fn register_file(context: &SessionContext, name: &str, path: &Path) -> Result<(), FeatureStoreError> {
    register_file_cached(context, name, path, None).await
}

/// [`register_file`], with a local Arrow IPC file scanned from `cache` (a [`CachedIpcTable`] around
/// DataFusion's own table for it).
pub async fn register_file_cached(
    context: &SessionContext,
    name: &str,
    path: &Path,
    cache: Option<&Arc<SourceCache>>,
) -> Result<(), FeatureStoreError> {
    if let Some(url) = path.to_str().filter(|text| is_object_url(text)) {
        register_object_store(context, name, url)?;
    } else if !path.exists() {
        return Err(FeatureStoreError::InvalidInput(format!(
            "source '{name}': file {} does not exist",
            path.display()
        )));
    }
    let location = path.to_string_lossy();
    let extension = path
        .extension()
        .and_then(|extension| extension.to_str())
        .map(str::to_ascii_lowercase);
    let result = match extension.as_deref() {
        Some("parquet" | "pq") => {
            context
                .register_parquet(name, &location, ParquetReadOptions::default())
                .await
        }
        Some("csv") => {
            context
                .register_csv(name, &location, CsvReadOptions::new().has_header(true))
                .await
        }
        Some(extension @ ("arrow" | "feather" | "ipc")) => {
            let file_extension = match extension {
                "feather" => ".feather",
                "ipc" => ".ipc",
                _ => ".arrow",
            };
            let options = ArrowReadOptions {
                file_extension,
                ..Default::default()
            };
            let registered = context.register_arrow(name, &location, options).await;
            match (registered, cache) {
                (Ok(()), Some(cache)) if !is_object_url(&location) => {
                    let inferred = context.deregister_table(name)?.expect("the table just registered");
                    let table = CachedIpcTable::new(path.to_path_buf(), inferred.schema(), cache.clone());
                    context.register_table(name, Arc::new(table)).map(|_| ())
                }
                (registered, _) => registered,
            }
        }
        Some("json" | "jsonl" | "ndjson") => {
            let options = JsonReadOptions {
                file_extension: ".json",
                ..Default::default()
            };
            let options = match extension.as_deref() {
                Some("jsonl") => JsonReadOptions {
                    file_extension: ".jsonl",
                    ..options
                },
                Some("ndjson") => JsonReadOptions {
                    file_extension: ".ndjson",
                    ..options
                },
                _ => options,
            };
            context.register_json(name, &location, options).await
        }
        _ => {
            return Err(FeatureStoreError::InvalidInput(format!(
                "source '{name}': {} is not a .parquet, .csv, .json or .arrow (Arrow IPC) file",
                path.display()
            )));
        }
    };
    result.map_err(|error| {
        FeatureStoreError::InvalidInput(format!("source '{name}': reading {}: {error}", path.display()))
    })
}

/// Checks every view against the data its source holds: each entity's join keys, the source's timestamp
/// field and every feature are columns of the view's schema, with types the features accept.
pub async fn check_against_data(definitions: &Definitions, base: &Path) -> Result<(), FeatureStoreError> {
    for view in &definitions.views {
        let Some(schema) = view_schema(definitions, view, base).await? else {
            continue;
        };
        check_schema(definitions, view, &schema)?;
    }
    Ok(())
}

/// Checks that `schema` (what `view` produces) holds the view's join keys, its source's timestamp field
/// and every feature, with types the features accept.
pub fn check_schema(definitions: &Definitions, view: &FeatureView, schema: &Schema) -> Result<(), FeatureStoreError> {
    let columns = || name_list(schema.fields().iter().map(|field| field.name().as_str()));
    let find = |name: &str, role: &str| {
        schema.field_with_name(name).map_err(|_| {
            FeatureStoreError::InvalidInput(format!(
                "feature_view '{}': {role} '{name}' is not a column of its data (columns: {})",
                view.name,
                columns()
            ))
        })
    };
    for entity in &view.entities {
        let entity = definitions
            .entities
            .iter()
            .find(|known| &known.name == entity)
            .expect("parse_definitions checked the references");
        for key in &entity.join_keys {
            find(key, &format!("join key of entity '{}'", entity.name))?;
        }
    }
    let source = definitions.source_of(view)?;
    let timestamp = find(&source.timestamp_field, "timestamp field")?;
    if !FeatureType::Timestamp.accepts(timestamp.data_type()) {
        return Err(FeatureStoreError::InvalidInput(format!(
            "feature_view '{}': timestamp field '{}' has type {}; expected a timestamp or a date",
            view.name,
            source.timestamp_field,
            timestamp.data_type()
        )));
    }
    for feature in &view.features {
        let field = find(&feature.name, "feature")?;
        if !feature.dtype.accepts(field.data_type()) {
            return Err(FeatureStoreError::InvalidInput(format!(
                "feature_view '{}': feature '{}' is declared {} but the column has type {}",
                view.name,
                feature.name,
                feature.dtype.name(),
                field.data_type()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
