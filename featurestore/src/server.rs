//! The feature server: Arrow Flight on port 7072 over the definitions the coordinator holds.
//!
//! ```text
//!   coordinator catalog ──(refreshed by the caller)──► watch<Registered> ──┐
//!                                                                          ▼
//!   ListFlights      views (path ["view", NAME]), services (path ["service", NAME]) and the training sets
//!                    built here (path ["dataset", CONTENT_HASH], their manifest as app_metadata)
//!   GetFlightInfo    a path, or a JSON command (below) ──► schema + one endpoint whose ticket is the command
//!   DoGet            the command's rows, streamed batch by batch (DataFusion's stream for views and SQL)
//!   DoPut            path ["push", SOURCE]: rows appended offline (one fsynced Parquet file under
//!                    DATA_DIR/push/SOURCE), then written online for every view of the source; acknowledged
//!                    with {"rows": N} only once both are durable
//!   DoAction         "materialize" {"view": NAME?, "until_micros": T?}: offline ──► online
//! ```
//!
//! Commands (a descriptor's `cmd`, and every ticket) are JSON, one key naming the kind:
//! `{"view": {"name": "driver_hourly_stats"}}`, `{"sql": {"query": "SELECT …"}}`,
//! `{"online": {"service": "driver_activity", "entities": {"driver_id": [1001, 1002]}}}`,
//! `{"training_set": {"service": "…", "entities": "/path/entities.parquet", "event_timestamp": "event_timestamp",
//! "rank": 0, "world": 1}}` (rank and world pick a contiguous shard of the rows).
//!
//! Flight SQL messages go to [`sql`]'s service (queries, prepared statements, catalog metadata).
//!
//! Every view is a DataFusion table named after the view in SQL. A malformed command, an unknown view,
//! service or feature gets `INVALID_ARGUMENT` with a message that names it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket, flight_descriptor,
};
use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::{DataFrame, SessionContext};
use datafusion::scalar::ScalarValue;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::FeatureStoreError;
use crate::cache::SourceCache;
use crate::definitions::{
    Definitions, FeatureRef, FeatureType, FeatureView, check_schema, push_directory, view_frame, view_frame_cached,
};
use crate::online::{OnlineStore, Value, materialize};
use crate::registry::Registered;
use crate::training::{publish, rename_durably, write_parquet, write_training_set};

/// The most bytes one DoPut may carry; a larger push is refused whole.
pub const PUSH_BYTES_MAX: usize = 256 << 20;
/// Rows per batch when a computed result (a training set) is streamed.
const STREAM_BATCH_ROWS: usize = 64 * 1024;
/// The most bytes of rows one Flight message carries: arrow-flight's own limit, under the 4 MiB a stock gRPC
/// client takes by default.
const MESSAGE_BYTES_MAX: usize = 2 << 20;
/// Flight messages (at most [`MESSAGE_BYTES_MAX`] each) encoded ahead of the connection sending them.
const MESSAGES_AHEAD: usize = 8;

/// What a client asks for, in a descriptor's `cmd` or a ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FlightCommand {
    /// Every row of a view (offline).
    View { name: String },
    /// A training set this server built before, by its content hash (listed as ["dataset", HASH]).
    Dataset { content_hash: String },
    /// A SQL query over the views.
    Sql { query: String },
    /// The latest values of a service's features for entities: join key ➜ one value per entity.
    Online {
        service: String,
        entities: BTreeMap<String, Vec<serde_json::Value>>,
    },
    /// A service's point-in-time training set for entity rows in a file the server can read.
    TrainingSet {
        service: String,
        entities: String,
        #[serde(default = "default_event_timestamp")]
        event_timestamp: String,
        #[serde(default)]
        rank: u32,
        #[serde(default)]
        world: u32,
    },
}

fn default_event_timestamp() -> String {
    "event_timestamp".into()
}

impl FlightCommand {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command serializes")
    }

    pub fn parse(bytes: &[u8], what: &str) -> Result<FlightCommand, Status> {
        serde_json::from_slice(bytes).map_err(|error| {
            Status::invalid_argument(format!(
                "the {what} is not a Kiln feature command ({error}); expected JSON such as {{\"view\": {{\"name\": \"…\"}}}}, {{\"sql\": {{\"query\": \"…\"}}}}, {{\"online\": {{\"service\": \"…\", \"entities\": {{…}}}}}} or {{\"training_set\": {{…}}}}"
            ))
        })
    }

    fn from_descriptor(descriptor: &FlightDescriptor) -> Result<FlightCommand, Status> {
        if descriptor.r#type == flight_descriptor::DescriptorType::Path as i32 {
            return match descriptor.path.as_slice() {
                [kind, name] if kind == "view" => Ok(FlightCommand::View { name: name.clone() }),
                [kind, hash] if kind == "dataset" => Ok(FlightCommand::Dataset {
                    content_hash: hash.clone(),
                }),
                other => Err(Status::invalid_argument(format!(
                    "descriptor path {other:?} names nothing here; expected [\"view\", NAME] or [\"dataset\", CONTENT_HASH] (a service needs entities: use a command)"
                ))),
            };
        }
        FlightCommand::parse(&descriptor.cmd, "descriptor's command")
    }
}

/// The Arrow Flight service. `registered` carries the definitions as the coordinator last reported them.
#[derive(Clone)]
pub struct FeatureServer {
    inner: Arc<Inner>,
}

/// What one materialization of one view did, for the recorder the binary installs (which makes it a run of
/// the tracking store, so lineage shows it as an execution between the view version and the online store).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MaterializationRecord {
    pub view: String,
    /// The view's version when it ran (its definition as applied to the cluster).
    pub view_version: u64,
    /// The view's source, and the file or object it reads.
    pub source: String,
    pub source_uri: String,
    pub until_micros: Option<i64>,
    pub rows_read: usize,
    pub rows_applied: usize,
    pub started_ms: i64,
    pub ended_ms: i64,
}

/// Records a materialization somewhere lasting; answers an id for it (a run id) or why it could not.
pub type MaterializationRecorder =
    Arc<dyn Fn(MaterializationRecord) -> futures::future::BoxFuture<'static, Result<String, String>> + Send + Sync>;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

struct Inner {
    registered: watch::Receiver<Arc<Registered>>,
    /// Where materializations are recorded (none: they are only reported to the caller).
    recorder: std::sync::OnceLock<MaterializationRecorder>,
    online: OnlineStore,
    data_dir: PathBuf,
    /// One push writes at a time, so files are numbered in acknowledgement order.
    push: tokio::sync::Mutex<u64>,
    /// Training sets computed lately (recorded as datasets), so that GetFlightInfo's DoGet and the other
    /// ranks' shards of the same set are not joined again.
    computed: std::sync::Mutex<Vec<Computed>>,
    /// Held while a training set is computed and recorded: ranks asking for the same set at once wait for
    /// the first and take its result, and a dataset's files are written once.
    building: tokio::sync::Mutex<()>,
    /// Local Arrow IPC sources held in memory for the views' DoGets and SQL.
    sources: Arc<SourceCache>,
}

/// A training set computed lately: its dataset, keyed by what it was computed from.
struct Computed {
    key: Vec<u8>,
    at: std::time::Instant,
    dataset: BuiltSet,
}

/// A training set recorded as a dataset: `datasets/HASH.parquet` holds its rows.
#[derive(Debug, Clone)]
struct BuiltSet {
    content_hash: String,
    rows: usize,
}

/// How many computed training sets are kept, and for how long. The key covers the command (without the
/// shard), the entity file's size and modification time, the definitions and the pushes received; a
/// source file rewritten in place within this time is not noticed.
const COMPUTED_KEPT: usize = 4;
const COMPUTED_TTL: std::time::Duration = std::time::Duration::from_secs(60);

fn status(error: FeatureStoreError) -> Status {
    match error {
        FeatureStoreError::InvalidInput(message) => Status::invalid_argument(message),
        other => Status::internal(other.to_string()),
    }
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

/// The arrow type a feature of `dtype` has in results built from the online store.
pub fn arrow_type(dtype: FeatureType) -> DataType {
    match dtype {
        FeatureType::Int32 => DataType::Int32,
        FeatureType::Int64 => DataType::Int64,
        FeatureType::Float32 => DataType::Float32,
        FeatureType::Float64 => DataType::Float64,
        FeatureType::String => DataType::Utf8,
        FeatureType::Bool => DataType::Boolean,
        FeatureType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        FeatureType::FloatList => DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
        FeatureType::Bytes => DataType::Binary,
    }
}

fn scalar(value: &Value, data_type: &DataType) -> Result<ScalarValue, FeatureStoreError> {
    let converted = match value {
        Value::Null => return Ok(ScalarValue::try_from(data_type)?),
        Value::Int(value) => ScalarValue::Int64(Some(*value)),
        Value::Float(value) => ScalarValue::Float64(Some(*value)),
        Value::Text(text) => ScalarValue::Utf8(Some(text.clone())),
        Value::Bool(value) => ScalarValue::Boolean(Some(*value)),
        Value::Timestamp(micros) => ScalarValue::TimestampMicrosecond(Some(*micros), None),
        Value::Bytes(bytes) => ScalarValue::Binary(Some(bytes.clone())),
        Value::FloatList(items) => {
            let items: Vec<ScalarValue> = items.iter().map(|item| ScalarValue::Float64(Some(*item))).collect();
            ScalarValue::List(ScalarValue::new_list_nullable(&items, &DataType::Float64))
        }
    };
    Ok(converted.cast_to(data_type)?)
}

fn column(values: &[Value], data_type: &DataType) -> Result<ArrayRef, FeatureStoreError> {
    if values.is_empty() {
        return Ok(datafusion::arrow::array::new_empty_array(data_type));
    }
    let scalars = values
        .iter()
        .map(|value| scalar(value, data_type))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ScalarValue::iter_to_array(scalars)?)
}

/// A JSON entity key as the online store keys it: integers as integers, text as text.
fn key_value(json: &serde_json::Value, key: &str) -> Result<Value, FeatureStoreError> {
    match json {
        serde_json::Value::Number(number) if number.is_i64() => Ok(Value::Int(number.as_i64().unwrap_or_default())),
        serde_json::Value::String(text) => Ok(Value::Text(text.clone())),
        serde_json::Value::Bool(value) => Ok(Value::Bool(*value)),
        other => Err(FeatureStoreError::InvalidInput(format!(
            "entity key '{key}' has value {other}; expected an integer or a string"
        ))),
    }
}

fn key_type(values: &[Value]) -> DataType {
    match values.iter().find(|value| **value != Value::Null) {
        Some(Value::Text(_)) => DataType::Utf8,
        Some(Value::Bool(_)) => DataType::Boolean,
        _ => DataType::Int64,
    }
}

fn batches_stream(batches: Vec<RecordBatch>) -> BoxStream<'static, Result<RecordBatch, FlightError>> {
    let mut pieces = Vec::new();
    for batch in batches {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let length = STREAM_BATCH_ROWS.min(batch.num_rows() - offset);
            pieces.push(Ok(batch.slice(offset, length)));
            offset += length;
        }
    }
    futures::stream::iter(pieces).boxed()
}

/// A command planned: a DataFusion frame (not run yet), rows ready to stream, or a small result already
/// computed.
enum Plan {
    Frame(DataFrame),
    Rows(Rows),
    Batch(RecordBatch),
}

impl Plan {
    fn schema(&self) -> SchemaRef {
        match self {
            Plan::Frame(frame) => Arc::new(frame.schema().as_arrow().clone()),
            Plan::Rows(rows) => rows.schema.clone(),
            Plan::Batch(batch) => batch.schema(),
        }
    }

    async fn rows(self) -> Result<Rows, FeatureStoreError> {
        match self {
            Plan::Frame(frame) => Rows::from_frame(frame).await,
            Plan::Rows(rows) => Ok(rows),
            Plan::Batch(batch) => Ok(Rows::from_batch(batch)),
        }
    }
}

/// A command's result: its schema and its rows as a stream.
struct Rows {
    schema: SchemaRef,
    stream: BoxStream<'static, Result<RecordBatch, FlightError>>,
}

impl Rows {
    async fn from_frame(frame: DataFrame) -> Result<Rows, FeatureStoreError> {
        let schema = Arc::new(frame.schema().as_arrow().clone());
        let stream = frame
            .execute_stream()
            .await?
            .map_err(|error| FlightError::ExternalError(Box::new(error)))
            .boxed();
        Ok(Rows { schema, stream })
    }

    /// The rows as Flight messages, encoded by a task of their own up to [`MESSAGES_AHEAD`] messages ahead
    /// of the connection, so reading and encoding overlap with sending. The task stops when the client goes.
    fn into_flight(self) -> Boxed<FlightData> {
        let (sender, receiver) = tokio::sync::mpsc::channel(MESSAGES_AHEAD);
        let pieces = self.stream.flat_map(|batch| {
            futures::stream::iter(match batch {
                Ok(batch) => split_for_flight(batch, MESSAGE_BYTES_MAX).into_iter().map(Ok).collect(),
                Err(error) => vec![Err(error)],
            })
        });
        // Cut already: arrow-flight's own split would cut them again by what `split_for_flight` says it miscounts.
        let mut encoded = FlightDataEncoderBuilder::new()
            .with_schema(self.schema)
            .with_max_flight_data_size(usize::MAX)
            .build(pieces)
            .map_err(Status::from);
        tokio::spawn(async move {
            while let Some(message) = encoded.next().await {
                if sender.send(message).await.is_err() {
                    break;
                }
            }
        });
        futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|message| (message, receiver))
        })
        .boxed()
    }

    /// Rows `[start, start + length)` of the Parquet file at `path`, read as they are sent.
    async fn from_parquet_range(path: &Path, start: usize, length: usize) -> Result<Rows, FeatureStoreError> {
        use datafusion::parquet::arrow::ParquetRecordBatchStreamBuilder;
        use datafusion::parquet::arrow::arrow_reader::{RowSelection, RowSelector};
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|error| FeatureStoreError::Storage(format!("opening {}: {error}", path.display())))?;
        let builder = ParquetRecordBatchStreamBuilder::new(file)
            .await?
            .with_batch_size(STREAM_BATCH_ROWS);
        let schema = builder.schema().clone();
        let selectors: Vec<RowSelector> = [RowSelector::skip(start), RowSelector::select(length)]
            .into_iter()
            .filter(|selector| selector.row_count > 0)
            .collect();
        let stream = builder
            .with_row_selection(RowSelection::from(selectors))
            .build()?
            .map_err(|error| FlightError::ExternalError(Box::new(error)))
            .boxed();
        Ok(Rows { schema, stream })
    }

    fn from_batch(batch: RecordBatch) -> Rows {
        Rows {
            schema: batch.schema(),
            stream: batches_stream(vec![batch]),
        }
    }
}

/// Where pushed rows go (Feast's `to`): the online store, the offline files, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushTarget {
    #[default]
    Online,
    Offline,
    OnlineAndOffline,
}

impl PushTarget {
    fn online(self) -> bool {
        self != PushTarget::Offline
    }

    fn offline(self) -> bool {
        self != PushTarget::Online
    }
}

/// What an online lookup found: the entity keys as given and, per feature, its value and the time of the
/// row it came from for each entity (`None` where the entity has no row).
pub(crate) struct Lookup {
    pub(crate) keys: Vec<(String, Vec<Value>)>,
    pub(crate) features: Vec<LookupFeature>,
}

#[derive(Clone)]
pub(crate) struct LookupFeature {
    pub(crate) view: String,
    pub(crate) name: String,
    pub(crate) data_type: DataType,
    pub(crate) values: Vec<Value>,
    pub(crate) timestamps_micros: Vec<Option<i64>>,
}

impl Lookup {
    /// The keys, then each feature (named by the feature alone), one row per entity.
    fn batch(&self) -> Result<RecordBatch, FeatureStoreError> {
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (key, values) in &self.keys {
            let data_type = key_type(values);
            columns.push(column(values, &data_type)?);
            fields.push(Field::new(key, data_type, true));
        }
        for feature in &self.features {
            columns.push(column(&feature.values, &feature.data_type)?);
            fields.push(Field::new(&feature.name, feature.data_type.clone(), true));
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
    }
}

impl FeatureServer {
    /// Opens the online store under `data_dir` (created if missing).
    pub fn open(
        data_dir: PathBuf,
        registered: watch::Receiver<Arc<Registered>>,
    ) -> Result<FeatureServer, FeatureStoreError> {
        std::fs::create_dir_all(&data_dir)
            .map_err(|error| FeatureStoreError::Storage(format!("creating {}: {error}", data_dir.display())))?;
        let online = OnlineStore::open(&data_dir.join("online.redb"))?;
        Ok(FeatureServer {
            inner: Arc::new(Inner {
                registered,
                recorder: std::sync::OnceLock::new(),
                online,
                data_dir,
                push: tokio::sync::Mutex::new(0),
                computed: std::sync::Mutex::new(Vec::new()),
                building: tokio::sync::Mutex::new(()),
                sources: Arc::new(SourceCache::new(crate::cache::DEFAULT_BUDGET_BYTES)),
            }),
        })
    }

    /// Has every materialization recorded by `recorder` from now on (once; a second is refused).
    pub fn record_materializations(&self, recorder: MaterializationRecorder) -> Result<(), FeatureStoreError> {
        self.inner
            .recorder
            .set(recorder)
            .map_err(|_| FeatureStoreError::InvalidInput("materializations already have a recorder".into()))
    }

    /// How many bytes of local Arrow IPC sources the server keeps in memory (0: none, every scan reads the
    /// file); [`crate::cache::DEFAULT_BUDGET_BYTES`] unless set.
    pub fn set_source_cache_bytes(&self, bytes: usize) {
        self.inner.sources.set_budget(bytes);
    }

    /// A view's rows as the server serves them: a local Arrow IPC source from memory.
    async fn view_frame(
        &self,
        definitions: &Definitions,
        view: &FeatureView,
    ) -> Result<Option<DataFrame>, FeatureStoreError> {
        view_frame_cached(definitions, view, &self.inner.data_dir, Some(&self.inner.sources)).await
    }

    /// The gRPC service, ready for `tonic::transport::Server::add_service`.
    pub fn into_service(self) -> FlightServiceServer<FeatureServer> {
        FlightServiceServer::new(self)
            .max_decoding_message_size(PUSH_BYTES_MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn registered(&self) -> Arc<Registered> {
        self.inner.registered.borrow().clone()
    }

    fn view<'a>(&self, registered: &'a Registered, name: &str) -> Result<&'a FeatureView, FeatureStoreError> {
        registered.definitions.view(name)
    }

    /// A DataFusion context with every view that has rows registered as a table under its name.
    async fn sql_context(&self, registered: &Registered) -> Result<SessionContext, FeatureStoreError> {
        let context = SessionContext::new();
        for view in &registered.definitions.views {
            if let Some(frame) = self.view_frame(&registered.definitions, view).await? {
                context.register_table(view.name.as_str(), frame.into_view())?;
            }
        }
        Ok(context)
    }

    async fn rows(&self, command: &FlightCommand) -> Result<Rows, FeatureStoreError> {
        self.plan(command).await?.rows().await
    }

    /// The schema of `command`'s answer. A lookup is checked, not run: its DoGet reads the online store.
    async fn schema(&self, command: &FlightCommand) -> Result<SchemaRef, FeatureStoreError> {
        match command {
            FlightCommand::Online { service, entities } => {
                let registered = self.registered();
                let features = &registered.definitions.service(service)?.features;
                Ok(self
                    .lookup_or_check(&registered, features, entities, false)?
                    .batch()?
                    .schema())
            }
            _ => Ok(self.plan(command).await?.schema()),
        }
    }

    /// Plans `command`: views and SQL are planned only (run when streamed); lookups and training sets are
    /// computed.
    async fn plan(&self, command: &FlightCommand) -> Result<Plan, FeatureStoreError> {
        let registered = self.registered();
        let definitions = &registered.definitions;
        match command {
            FlightCommand::View { name } => {
                let view = self.view(&registered, name)?;
                match self.view_frame(definitions, view).await? {
                    Some(frame) => Ok(Plan::Frame(frame)),
                    None => Err(FeatureStoreError::InvalidInput(format!(
                        "feature view '{name}' has no rows yet: its push source '{}' has received none",
                        view.source
                    ))),
                }
            }
            FlightCommand::Dataset { content_hash } => {
                let valid = content_hash.len() == 64 && content_hash.bytes().all(|byte| byte.is_ascii_hexdigit());
                let path = self.datasets_directory().join(format!("{content_hash}.parquet"));
                if !valid || !self.datasets_directory().join(format!("{content_hash}.json")).exists() {
                    return Err(FeatureStoreError::InvalidInput(format!(
                        "dataset '{content_hash}' is not known here; expected the content hash of a training set this server built (see ListFlights)"
                    )));
                }
                let context = SessionContext::new();
                crate::definitions::register_file(&context, "dataset", &path).await?;
                Ok(Plan::Frame(context.table("dataset").await?))
            }
            FlightCommand::Sql { query } => {
                let context = self.sql_context(&registered).await?;
                let frame = context
                    .sql(query)
                    .await
                    .map_err(|error| FeatureStoreError::InvalidInput(format!("the query does not run: {error}")))?;
                Ok(Plan::Frame(frame))
            }
            FlightCommand::Online { service, entities } => {
                let features = &definitions.service(service)?.features;
                Ok(Plan::Batch(self.lookup(&registered, features, entities)?.batch()?))
            }
            FlightCommand::TrainingSet {
                service,
                entities,
                event_timestamp,
                rank,
                world,
            } => {
                if *world > 0 && rank >= world {
                    return Err(FeatureStoreError::InvalidInput(format!(
                        "rank {rank} is not below world {world}; expected 0 ≤ rank < world"
                    )));
                }
                let key = self
                    .training_set_key(&registered, service, entities, event_timestamp)
                    .await;
                let building = self.inner.building.lock().await;
                let set = match self.computed(&key) {
                    Some(set) => set,
                    None => {
                        let set = self
                            .build_dataset(&registered, service, entities, event_timestamp)
                            .await?;
                        self.keep_computed(key, set.clone());
                        set
                    }
                };
                drop(building);
                let (start, length) = if *world > 1 {
                    let (world, rank) = (*world as usize, *rank as usize);
                    let start = set.rows * rank / world;
                    (start, set.rows * (rank + 1) / world - start)
                } else {
                    (0, set.rows)
                };
                let path = self.datasets_directory().join(format!("{}.parquet", set.content_hash));
                Ok(Plan::Rows(Rows::from_parquet_range(&path, start, length).await?))
            }
        }
    }

    fn datasets_directory(&self) -> PathBuf {
        self.inner.data_dir.join("datasets")
    }

    /// Builds a training set into the datasets directory and keeps it as a dataset version:
    /// `datasets/HASH.parquet` and `datasets/HASH.json` (the service, the entity source, the view versions),
    /// written once per content hash. The rows stream from the entity file into the Parquet file chunk by
    /// chunk; the set is never held whole.
    async fn build_dataset(
        &self,
        registered: &Registered,
        service: &str,
        entities: &str,
        event_timestamp: &str,
    ) -> Result<BuiltSet, FeatureStoreError> {
        let directory = self.datasets_directory();
        std::fs::create_dir_all(&directory)
            .map_err(|error| FeatureStoreError::Storage(format!("creating {}: {error}", directory.display())))?;
        // Builds run one at a time (`building`), so one name for the set being built suffices.
        let building = directory.join("building.parquet");
        let set = write_training_set(
            &registered.definitions,
            service,
            Path::new(entities),
            event_timestamp,
            &self.inner.data_dir,
            &building,
            &mut |_| {},
        )
        .await?;
        let manifest = directory.join(format!("{}.json", set.content_hash));
        let built = BuiltSet {
            content_hash: set.content_hash.clone(),
            rows: set.rows,
        };
        if manifest.exists() {
            // The same rows were recorded before.
            let _ = std::fs::remove_file(&building);
            return Ok(built);
        }
        // write_training_set made the file durable; only its final name is new.
        rename_durably(&building, &directory.join(format!("{}.parquet", set.content_hash)))?;
        let views: Vec<serde_json::Value> = set
            .views
            .iter()
            .map(|view| {
                serde_json::json!({
                    "name": view.name,
                    "definition_hash": view.definition_hash,
                    "version": registered
                        .version_of(crate::registry::FEATURE_VIEW, &view.name)
                        .map(|applied| applied.version),
                })
            })
            .collect();
        let record = serde_json::json!({
            "content_hash": set.content_hash,
            "service": service,
            "entities": entities,
            "event_timestamp": event_timestamp,
            "rows": set.rows,
            "feature_views": views,
        });
        // The manifest last, written aside and renamed: a dataset is listed only once its rows are durable.
        let temporary = manifest.with_extension("json.tmp");
        std::fs::write(&temporary, serde_json::to_vec_pretty(&record).expect("json"))
            .map_err(|error| FeatureStoreError::Storage(format!("writing {}: {error}", manifest.display())))?;
        publish(&temporary, &manifest)?;
        Ok(built)
    }

    /// The recorded datasets: (content hash, manifest), in hash order.
    fn datasets(&self) -> Vec<(String, serde_json::Value)> {
        let Ok(entries) = std::fs::read_dir(self.datasets_directory()) else {
            return Vec::new();
        };
        let mut datasets: Vec<(String, serde_json::Value)> = entries
            .flatten()
            .filter_map(|entry| {
                let path = entry.path();
                if path.extension()? != "json" {
                    return None;
                }
                let hash = path.file_stem()?.to_str()?.to_string();
                let manifest = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                Some((hash, manifest))
            })
            .collect();
        datasets.sort_by(|a, b| a.0.cmp(&b.0));
        datasets
    }

    /// The latest values of `features` for the entities given by join key (one value per entity for each
    /// key), from the online store.
    pub(crate) fn lookup(
        &self,
        registered: &Registered,
        features: &[FeatureRef],
        entities: &BTreeMap<String, Vec<serde_json::Value>>,
    ) -> Result<Lookup, FeatureStoreError> {
        self.lookup_or_check(registered, features, entities, true)
    }

    /// A lookup when `read`; otherwise its checks alone, answering as if no entity had a row (what a
    /// GetFlightInfo needs: the answer's schema, and the same errors).
    fn lookup_or_check(
        &self,
        registered: &Registered,
        features: &[FeatureRef],
        entities: &BTreeMap<String, Vec<serde_json::Value>>,
        read: bool,
    ) -> Result<Lookup, FeatureStoreError> {
        let definitions = &registered.definitions;
        let count = entities.values().map(Vec::len).max().unwrap_or(0);
        if let Some((key, values)) = entities.iter().find(|(_, values)| values.len() != count) {
            return Err(FeatureStoreError::InvalidInput(format!(
                "entity key '{key}' has {} values but another has {count}; expected one value per entity for each key",
                values.len()
            )));
        }
        let keys: Vec<(String, Vec<Value>)> = entities
            .iter()
            .map(|(key, values)| {
                let values = values
                    .iter()
                    .map(|value| key_value(value, key))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((key.clone(), values))
            })
            .collect::<Result<_, FeatureStoreError>>()?;
        // The features, grouped by view (one read per view), answered in the order they were named.
        let mut by_view: Vec<(&str, Vec<usize>)> = Vec::new();
        for (index, feature) in features.iter().enumerate() {
            match by_view.iter_mut().find(|(view, _)| *view == feature.view) {
                Some((_, indices)) => indices.push(index),
                None => by_view.push((&feature.view, vec![index])),
            }
        }
        let mut answered: Vec<Option<LookupFeature>> = vec![None; features.len()];
        for (view_name, indices) in by_view {
            let view = self.view(registered, view_name)?;
            let join_keys = definitions.join_keys(view);
            let key_columns: Vec<&Vec<Value>> = join_keys
                .iter()
                .map(|key| {
                    keys.iter()
                        .find(|(name, _)| name == key)
                        .map(|(_, values)| values)
                        .ok_or_else(|| {
                            FeatureStoreError::InvalidInput(format!(
                                "entity key '{key}' is missing; feature view '{view_name}' needs {}",
                                join_keys.join(", ")
                            ))
                        })
                })
                .collect::<Result<_, _>>()?;
            let key_rows: Vec<Vec<Value>> = (0..count)
                .map(|row| key_columns.iter().map(|values| values[row].clone()).collect())
                .collect();
            let names: Vec<String> = indices.iter().map(|index| features[*index].feature.clone()).collect();
            let found = if read {
                self.inner.online.get(view_name, &key_rows, &names)?
            } else {
                vec![None; key_rows.len()]
            };
            for (position, (index, name)) in indices.iter().zip(&names).enumerate() {
                let dtype = view
                    .features
                    .iter()
                    .find(|feature| &feature.name == name)
                    .map(|feature| feature.dtype)
                    .ok_or_else(|| {
                        FeatureStoreError::InvalidInput(format!(
                            "feature '{name}' is not in feature view '{view_name}'"
                        ))
                    })?;
                answered[*index] = Some(LookupFeature {
                    view: view_name.to_string(),
                    name: name.clone(),
                    data_type: arrow_type(dtype),
                    values: found
                        .iter()
                        .map(|row| row.as_ref().map_or(Value::Null, |row| row.values[position].clone()))
                        .collect(),
                    timestamps_micros: found
                        .iter()
                        .map(|row| row.as_ref().map(|row| row.timestamp_micros))
                        .collect(),
                });
            }
        }
        Ok(Lookup {
            keys,
            features: answered.into_iter().flatten().collect(),
        })
    }

    /// Appends pushed rows to `source` offline and/or writes them online for each of its views (`to`),
    /// durably before it returns.
    pub(crate) async fn push(
        &self,
        source_name: &str,
        batches: Vec<RecordBatch>,
        to: PushTarget,
    ) -> Result<usize, FeatureStoreError> {
        let registered = self.registered();
        let definitions = &registered.definitions;
        let source = definitions.push_source(source_name)?;
        let Some(first) = batches.first() else {
            return Ok(0);
        };
        let schema = first.schema();
        let batch = datafusion::arrow::compute::concat_batches(&schema, &batches)?;
        // Each view's rows as it would serve them, checked before anything is written.
        let mut online_rows = Vec::new();
        for view in definitions.views.iter().filter(|view| view.source == source.name) {
            let rows = match &view.sql {
                None => batch.clone(),
                Some(sql) => {
                    let context = SessionContext::new();
                    let table = MemTable::try_new(schema.clone(), vec![vec![batch.clone()]])?;
                    context.register_table(source.name.as_str(), Arc::new(table))?;
                    let frame = context.sql(sql).await.map_err(|error| {
                        FeatureStoreError::InvalidInput(format!(
                            "feature_view '{}': its sql does not run on the pushed rows: {error}",
                            view.name
                        ))
                    })?;
                    let rows = frame.collect().await?;
                    let schema = rows
                        .first()
                        .map(RecordBatch::schema)
                        .unwrap_or_else(|| Arc::new(Schema::empty()));
                    datafusion::arrow::compute::concat_batches(&schema, &rows)?
                }
            };
            check_schema(definitions, view, &rows.schema())?;
            online_rows.push((view, rows));
        }
        let mut sequence = self.inner.push.lock().await;
        if to.offline() {
            *sequence += 1;
            let directory = push_directory(&self.inner.data_dir, &source.name);
            std::fs::create_dir_all(&directory)
                .map_err(|error| FeatureStoreError::Storage(format!("creating {}: {error}", directory.display())))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_micros());
            write_parquet(&directory.join(format!("{now:020}-{:08}.parquet", *sequence)), &batch)?;
        }
        for (view, rows) in online_rows.into_iter().filter(|_| to.online()) {
            let features: Vec<String> = view.features.iter().map(|feature| feature.name.clone()).collect();
            self.inner.online.write(
                &view.name,
                &rows,
                &definitions.join_keys(view),
                &source.timestamp_field,
                &features,
                None,
            )?;
        }
        Ok(batch.num_rows())
    }

    /// What a training set is computed from: the command without the shard, the entity file's size and
    /// modification time, the definitions, and how many pushes this server has taken.
    async fn training_set_key(
        &self,
        registered: &Registered,
        service: &str,
        entities: &str,
        event_timestamp: &str,
    ) -> Vec<u8> {
        let file = std::fs::metadata(entities).ok().map(|metadata| {
            let modified = metadata
                .modified()
                .ok()
                .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |elapsed| elapsed.as_nanos());
            (metadata.len(), modified.to_string())
        });
        let pushes = *self.inner.push.lock().await;
        serde_json::to_vec(&serde_json::json!({
            "service": service,
            "entities": entities,
            "event_timestamp": event_timestamp,
            "file": file,
            "definitions": registered.definitions,
            "pushes": pushes,
        }))
        .expect("json")
    }

    fn computed(&self, key: &[u8]) -> Option<BuiltSet> {
        let mut computed = self.inner.computed.lock().expect("computed results poisoned");
        computed.retain(|entry| entry.at.elapsed() < COMPUTED_TTL);
        computed
            .iter()
            .find(|entry| entry.key == key)
            .map(|entry| entry.dataset.clone())
    }

    fn keep_computed(&self, key: Vec<u8>, dataset: BuiltSet) {
        let mut computed = self.inner.computed.lock().expect("computed results poisoned");
        computed.retain(|entry| entry.at.elapsed() < COMPUTED_TTL && entry.key != key);
        if computed.len() >= COMPUTED_KEPT {
            computed.remove(0);
        }
        computed.push(Computed {
            key,
            at: std::time::Instant::now(),
            dataset,
        });
    }

    async fn flight_info(&self, descriptor: FlightDescriptor, command: &FlightCommand) -> Result<FlightInfo, Status> {
        let schema = self.schema(command).await.map_err(status)?;
        let mut info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|error| Status::internal(error.to_string()))?
            .with_descriptor(descriptor)
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(command.to_bytes())));
        // A training set already built says which dataset version it is: its manifest (content hash, view
        // versions, entity source), so a trainer can record its lineage.
        if let FlightCommand::TrainingSet {
            service,
            entities,
            event_timestamp,
            ..
        } = command
        {
            let registered = self.registered();
            let key = self
                .training_set_key(&registered, service, entities, event_timestamp)
                .await;
            if let Some(set) = self.computed(&key) {
                let manifest = self.datasets_directory().join(format!("{}.json", set.content_hash));
                if let Ok(bytes) = std::fs::read(&manifest) {
                    info = info.with_total_records(set.rows as i64).with_app_metadata(bytes);
                }
            }
        }
        Ok(info)
    }

    /// What `materialize` did, per view.
    async fn materialize(
        &self,
        view: Option<String>,
        until_micros: Option<i64>,
    ) -> Result<serde_json::Value, FeatureStoreError> {
        let registered = self.registered();
        let definitions = &registered.definitions;
        let views: Vec<&FeatureView> = match &view {
            Some(name) => vec![self.view(&registered, name)?],
            None => definitions.views.iter().collect(),
        };
        let mut report = Vec::new();
        for view in views {
            let source = definitions.source_of(view)?;
            if source.kind == crate::definitions::SourceKind::Push {
                // Pushed rows went online as they arrived.
                report.push(serde_json::json!({"view": view.name, "rows_read": 0, "rows_applied": 0, "push": true}));
                continue;
            }
            let started_ms = now_ms();
            let done = materialize(
                definitions,
                &view.name,
                &self.inner.data_dir,
                &self.inner.online,
                until_micros,
            )
            .await?;
            let mut entry = serde_json::json!({
                "view": view.name,
                "rows_read": done.rows_read,
                "rows_applied": done.rows_applied,
                "push": false,
            });
            // The rows are online whatever happens next; a record that fails is reported beside them.
            if let Some(recorder) = self.inner.recorder.get() {
                let record = MaterializationRecord {
                    view: view.name.clone(),
                    view_version: registered
                        .version_of(crate::registry::FEATURE_VIEW, &view.name)
                        .map_or(0, |applied| u64::from(applied.version)),
                    source: source.name.clone(),
                    source_uri: match &source.kind {
                        crate::definitions::SourceKind::File { path } => path.clone(),
                        crate::definitions::SourceKind::Push => String::new(),
                    },
                    until_micros,
                    rows_read: done.rows_read,
                    rows_applied: done.rows_applied,
                    started_ms,
                    ended_ms: now_ms(),
                };
                match recorder(record).await {
                    Ok(run_id) => entry["run_id"] = run_id.into(),
                    Err(error) => entry["record_error"] = error.into(),
                }
            }
            report.push(entry);
        }
        Ok(serde_json::json!({ "views": report }))
    }
}

/// `batch` cut into row ranges of at most `max_bytes` each (one piece when it fits, none when it is empty),
/// measured by the bytes its rows hold.
///
/// arrow-flight's encoder splits by `get_buffer_memory_size`, which counts whole buffers: an array sliced
/// from a larger one counts all of it. Every batch read from an Arrow IPC file is such a slice of the one
/// buffer its body was read into, so a 4.7 MB batch of nine columns counted 47 MB and went out as 24
/// messages of 200 KB instead of 3 of 1.6 MB (apache/arrow-rs#3407).
fn split_for_flight(batch: RecordBatch, max_bytes: usize) -> Vec<RecordBatch> {
    let bytes: usize = batch
        .columns()
        .iter()
        .map(|column| {
            column
                .to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| column.get_buffer_memory_size())
        })
        .sum();
    let rows = batch.num_rows();
    let pieces = bytes.div_ceil(max_bytes.max(1)).clamp(1, rows.max(1));
    let rows_per_piece = rows.div_ceil(pieces).max(1);
    (0..rows)
        .step_by(rows_per_piece)
        .map(|start| batch.slice(start, rows_per_piece.min(rows - start)))
        .collect()
}

/// Serves `server` on `listener` until `shutdown` completes: Flight and Flight SQL over gRPC (HTTP/2), and
/// the [`http`] JSON endpoints over HTTP/1.1 on the same port.
pub async fn serve(
    server: FeatureServer,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let routes = tonic::service::Routes::from(http::router(server.clone())).add_service(server.into_service());
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

type Boxed<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaterializeRequest {
    #[serde(default)]
    view: Option<String>,
    #[serde(default)]
    until_micros: Option<i64>,
}

#[tonic::async_trait]
impl FlightService for FeatureServer {
    type HandshakeStream = Boxed<HandshakeResponse>;
    type ListFlightsStream = Boxed<FlightInfo>;
    type DoGetStream = Boxed<FlightData>;
    type DoPutStream = Boxed<PutResult>;
    type DoActionStream = Boxed<arrow_flight::Result>;
    type ListActionsStream = Boxed<ActionType>;
    type DoExchangeStream = Boxed<FlightData>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("the feature server needs no handshake"))
    }

    async fn list_flights(&self, _request: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        let registered = self.registered();
        let definitions = &registered.definitions;
        let mut infos = Vec::new();
        for view in &definitions.views {
            let command = FlightCommand::View {
                name: view.name.clone(),
            };
            let schema = match view_frame(definitions, view, &self.inner.data_dir)
                .await
                .map_err(status)?
            {
                Some(frame) => frame.schema().as_arrow().clone(),
                None => Schema::empty(),
            };
            let info = FlightInfo::new()
                .try_with_schema(&schema)
                .map_err(|error| Status::internal(error.to_string()))?
                .with_descriptor(FlightDescriptor::new_path(vec!["view".into(), view.name.clone()]))
                .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(command.to_bytes())));
            infos.push(Ok(info));
        }
        for (hash, manifest) in self.datasets() {
            let command = FlightCommand::Dataset {
                content_hash: hash.clone(),
            };
            let schema = match self.plan(&command).await {
                Ok(plan) => plan.schema(),
                Err(_) => continue,
            };
            let info = FlightInfo::new()
                .try_with_schema(&schema)
                .map_err(|error| Status::internal(error.to_string()))?
                .with_descriptor(FlightDescriptor::new_path(vec!["dataset".into(), hash]))
                .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(command.to_bytes())))
                .with_total_records(manifest["rows"].as_i64().unwrap_or(-1))
                .with_app_metadata(serde_json::to_vec(&manifest).expect("json"));
            infos.push(Ok(info));
        }
        for service in &definitions.services {
            let mut fields = Vec::new();
            for feature in &service.features {
                let dtype = self
                    .view(&registered, &feature.view)
                    .ok()
                    .and_then(|view| view.features.iter().find(|known| known.name == feature.feature))
                    .map(|known| known.dtype);
                if let Some(dtype) = dtype {
                    fields.push(Field::new(&feature.feature, arrow_type(dtype), true));
                }
            }
            let info = FlightInfo::new()
                .try_with_schema(&Schema::new(fields))
                .map_err(|error| Status::internal(error.to_string()))?
                .with_descriptor(FlightDescriptor::new_path(vec!["service".into(), service.name.clone()]));
            infos.push(Ok(info));
        }
        Ok(Response::new(futures::stream::iter(infos).boxed()))
    }

    async fn get_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let descriptor = request.into_inner();
        if sql::is_flight_sql(&descriptor.cmd) {
            return FlightService::get_flight_info(&sql::SqlService(self.clone()), Request::new(descriptor)).await;
        }
        let command = FlightCommand::from_descriptor(&descriptor)?;
        Ok(Response::new(self.flight_info(descriptor, &command).await?))
    }

    async fn poll_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        let descriptor = request.into_inner();
        let command = FlightCommand::from_descriptor(&descriptor)?;
        let info = self.flight_info(descriptor, &command).await?;
        Ok(Response::new(PollInfo::new().with_info(info)))
    }

    async fn get_schema(&self, request: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        let descriptor = request.into_inner();
        let command = FlightCommand::from_descriptor(&descriptor)?;
        let schema = self.schema(&command).await.map_err(status)?;
        let options = datafusion::arrow::ipc::writer::IpcWriteOptions::default();
        let result = arrow_flight::SchemaAsIpc::new(&schema, &options)
            .try_into()
            .map_err(|error: datafusion::arrow::error::ArrowError| Status::internal(error.to_string()))?;
        Ok(Response::new(result))
    }

    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let ticket = request.into_inner();
        if sql::is_flight_sql(&ticket.ticket) {
            return FlightService::do_get(&sql::SqlService(self.clone()), Request::new(ticket)).await;
        }
        let command = FlightCommand::parse(&ticket.ticket, "ticket")?;
        let rows = self.rows(&command).await.map_err(status)?;
        Ok(Response::new(rows.into_flight()))
    }

    async fn do_put(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        let mut messages = request.into_inner();
        let Some(first) = messages.message().await? else {
            return Err(invalid(
                "the push carried no messages; expected a descriptor and record batches".into(),
            ));
        };
        let (source, ingest) = match &first.flight_descriptor {
            Some(descriptor) if descriptor.path.len() == 2 && descriptor.path[0] == "push" => {
                (descriptor.path[1].clone(), false)
            }
            Some(descriptor) if sql::is_flight_sql(&descriptor.cmd) => (sql::ingest_source(&descriptor.cmd)?, true),
            other => {
                return Err(invalid(format!(
                    "a push must name its source with the descriptor path [\"push\", SOURCE] (or be a Flight SQL bulk ingestion into it); got {:?}",
                    other.as_ref().map(|descriptor| &descriptor.path)
                )));
            }
        };
        let all = futures::stream::once(async move { Ok(first) })
            .chain(messages)
            .map_err(FlightError::from);
        let mut decoded = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(all);
        let mut batches = Vec::new();
        let mut bytes = 0usize;
        while let Some(batch) = decoded.next().await {
            let batch = batch.map_err(|error| invalid(format!("the pushed rows do not decode: {error}")))?;
            bytes += batch.get_array_memory_size();
            if bytes > PUSH_BYTES_MAX {
                return Err(invalid(format!(
                    "the push is larger than {PUSH_BYTES_MAX} bytes; split it into several pushes"
                )));
            }
            batches.push(batch);
        }
        let rows = self
            .push(&source, batches, PushTarget::OnlineAndOffline)
            .await
            .map_err(status)?;
        let app_metadata = if ingest {
            sql::ingested(rows)
        } else {
            serde_json::to_vec(&serde_json::json!({ "source": source, "rows": rows }))
                .expect("json")
                .into()
        };
        let result = PutResult { app_metadata };
        Ok(Response::new(futures::stream::iter([Ok(result)]).boxed()))
    }

    async fn do_action(&self, request: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        match action.r#type.as_str() {
            "materialize" => {
                let body: MaterializeRequest = if action.body.is_empty() {
                    MaterializeRequest {
                        view: None,
                        until_micros: None,
                    }
                } else {
                    serde_json::from_slice(&action.body).map_err(|error| {
                        invalid(format!(
                            "the materialize body is not valid ({error}); expected {{\"view\": NAME?, \"until_micros\": MICROSECONDS?}}"
                        ))
                    })?
                };
                let report = self.materialize(body.view, body.until_micros).await.map_err(status)?;
                let result = arrow_flight::Result {
                    body: serde_json::to_vec(&report).expect("json").into(),
                };
                Ok(Response::new(futures::stream::iter([Ok(result)]).boxed()))
            }
            // Flight SQL's actions (prepared statements); it names anything it does not know.
            _ => FlightService::do_action(&sql::SqlService(self.clone()), Request::new(action)).await,
        }
    }

    async fn list_actions(&self, _request: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        let materialize = ActionType {
            r#type: "materialize".into(),
            description: "Copy views' latest values (optionally one view, up to until_micros) to the online store"
                .into(),
        };
        Ok(Response::new(futures::stream::iter([Ok(materialize)]).boxed()))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("the feature server has no exchanges"))
    }
}

pub mod http;
mod sql;

#[cfg(test)]
mod tests;
