//! The request log: every answered inference request becomes one row (its id, model and version, protocol,
//! arrival time, latency, outcome, and its input and output tensors as JSON), written in batches as Parquet
//! files to an object store (the artifact store):
//!
//! ```text
//!   handler ──try_send (buffers shared, no copy)──► [ bounded queue ] ──► writer ──► PREFIX/MODEL/VERSION/
//!      └─ full: the row is dropped and counted          rows_per_file rows or flush_interval,      FIRST_MS-SEQ.parquet
//!         (kiln_serving_request_log_dropped_total)      whichever comes first
//! ```
//!
//! The files go to a [`LogStore`]: any `object_store` store (a directory, `s3://…`), or, for a deployment's
//! replicas, the artifacts of the deployment's run behind the cluster's artifact proxy.
//!
//! Logging never makes a request wait: the handler only clones reference-counted tensor buffers into the
//! queue, and the JSON and Parquet encoding happen on the writer. A file that cannot be written is counted
//! as dropped rows and the writer goes on. Closing the log flushes what is queued.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType as ArrowType, Field, Schema, TimeUnit};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::tensor::Tensor;

/// Where and how often the log is written.
#[derive(Clone, Debug)]
pub struct RequestLogConfig {
    /// The directory in the store the files go under.
    pub prefix: String,
    /// A file is written when one model version has this many rows waiting.
    pub rows_per_file: usize,
    /// And at least this often while rows wait.
    pub flush_interval: Duration,
    /// Rows that may wait for the writer; beyond it rows are dropped and counted.
    pub queue_capacity: usize,
}

impl Default for RequestLogConfig {
    fn default() -> RequestLogConfig {
        RequestLogConfig {
            prefix: "request-logs".into(),
            rows_per_file: 10_000,
            flush_interval: Duration::from_secs(10),
            queue_capacity: 65_536,
        }
    }
}

/// Where the log's files are written: one whole file at a time, at a path relative to the store.
pub trait LogStore: Send + Sync + 'static {
    /// Writes `bytes` as the file at `path`; the error says why it could not.
    fn put<'a>(
        &'a self,
        path: &'a str,
        bytes: bytes::Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

impl LogStore for Arc<dyn ObjectStore> {
    fn put<'a>(
        &'a self,
        path: &'a str,
        bytes: bytes::Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let path = Path::parse(path).map_err(|error| error.to_string())?;
            ObjectStoreExt::put(self.as_ref(), &path, bytes.into())
                .await
                .map(|_| ())
                .map_err(|error| error.to_string())
        })
    }
}

/// One answered request.
#[derive(Debug)]
pub struct LogEntry {
    pub request_id: String,
    pub model: String,
    pub version: String,
    pub protocol: &'static str,
    pub received_at_micros: i64,
    pub latency_seconds: f64,
    /// `ok`, or the error's reason (`invalid_input`, `queue_full`, …).
    pub status: &'static str,
    pub error: Option<String>,
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
}

/// The counters the log keeps (registered with the serving metrics).
#[derive(Clone, Debug, Default)]
pub struct LogCounters {
    pub rows_written: Counter,
    pub files_written: Counter,
    pub rows_dropped: Counter,
}

/// The handle handlers log through.
pub struct RequestLog {
    queue: mpsc::Sender<LogEntry>,
    counters: LogCounters,
    closing: CancellationToken,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("RequestLog")
    }
}

impl RequestLog {
    /// Starts the writer on the current tokio runtime.
    pub fn start(store: Arc<dyn LogStore>, config: RequestLogConfig, counters: LogCounters) -> RequestLog {
        let (queue, receiver) = mpsc::channel(config.queue_capacity.max(1));
        let closing = CancellationToken::new();
        let writer = tokio::spawn(write_loop(receiver, store, config, counters.clone(), closing.clone()));
        RequestLog {
            queue,
            counters,
            closing,
            writer: Mutex::new(Some(writer)),
        }
    }

    /// Queues `entry`, or drops and counts it when the writer is behind.
    pub fn log(&self, entry: LogEntry) {
        if self.closing.is_cancelled() || self.queue.try_send(entry).is_err() {
            self.counters.rows_dropped.inc();
        }
    }

    /// Writes what is queued and stops the writer; later entries are dropped.
    pub async fn close(&self) {
        self.closing.cancel();
        let writer = self.writer.lock().expect("writer lock").take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

async fn write_loop(
    mut receiver: mpsc::Receiver<LogEntry>,
    store: Arc<dyn LogStore>,
    config: RequestLogConfig,
    counters: LogCounters,
    closing: CancellationToken,
) {
    let mut pending: BTreeMap<(String, String), Vec<LogEntry>> = BTreeMap::new();
    let mut sequence = 0u64;
    let mut ticker = tokio::time::interval(config.flush_interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            entry = receiver.recv() => {
                let Some(entry) = entry else { break };
                let key = (entry.model.clone(), entry.version.clone());
                let rows = pending.entry(key.clone()).or_default();
                rows.push(entry);
                if rows.len() >= config.rows_per_file {
                    let rows = pending.remove(&key).unwrap_or_default();
                    write_file(&store, &config.prefix, rows, &mut sequence, &counters).await;
                }
            }
            _ = ticker.tick() => {
                for (_, rows) in std::mem::take(&mut pending) {
                    write_file(&store, &config.prefix, rows, &mut sequence, &counters).await;
                }
            }
            () = closing.cancelled() => {
                receiver.close();
                while let Some(entry) = receiver.recv().await {
                    pending.entry((entry.model.clone(), entry.version.clone())).or_default().push(entry);
                }
                break;
            }
        }
    }
    for (_, rows) in pending {
        for chunk in chunks(rows, config.rows_per_file) {
            write_file(&store, &config.prefix, chunk, &mut sequence, &counters).await;
        }
    }
}

fn chunks(mut rows: Vec<LogEntry>, size: usize) -> Vec<Vec<LogEntry>> {
    let mut out = Vec::new();
    while rows.len() > size.max(1) {
        let rest = rows.split_off(size.max(1));
        out.push(rows);
        rows = rest;
    }
    if !rows.is_empty() {
        out.push(rows);
    }
    out
}

async fn write_file(
    store: &Arc<dyn LogStore>,
    prefix: &str,
    rows: Vec<LogEntry>,
    sequence: &mut u64,
    counters: &LogCounters,
) {
    if rows.is_empty() {
        return;
    }
    let count = rows.len() as u64;
    let first = &rows[0];
    let name = format!(
        "{}/{}/{}/{}-{:06}.parquet",
        prefix.trim_matches('/'),
        first.model,
        first.version,
        first.received_at_micros / 1000,
        *sequence
    );
    *sequence += 1;
    let written = match encode(&rows) {
        Ok(bytes) => store.put(&name, bytes.into()).await,
        Err(error) => Err(error),
    };
    match written {
        Ok(()) => {
            counters.rows_written.inc_by(count);
            counters.files_written.inc();
        }
        Err(error) => {
            tracing::warn!("request log: {count} rows not written to {name}: {error}");
            counters.rows_dropped.inc_by(count);
        }
    }
}

fn tensors_json(tensors: &[Tensor]) -> String {
    let mut object = Map::new();
    for tensor in tensors {
        object.insert(
            tensor.name.clone(),
            json!({ "datatype": tensor.datatype.name(), "shape": tensor.shape, "data": tensor.json_data() }),
        );
    }
    Value::Object(object).to_string()
}

/// The schema of every request-log file.
pub fn schema() -> Schema {
    let text = |name: &str, nullable: bool| Field::new(name, ArrowType::Utf8, nullable);
    Schema::new(vec![
        text("request_id", false),
        text("model", false),
        text("version", false),
        text("protocol", false),
        Field::new(
            "received_at",
            ArrowType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("latency_ms", ArrowType::Float64, false),
        text("status", false),
        text("error", true),
        text("inputs", false),
        text("outputs", true),
    ])
}

/// `rows` as one Parquet file (zstd).
fn encode(rows: &[LogEntry]) -> Result<Vec<u8>, String> {
    let strings = |value: &dyn Fn(&LogEntry) -> Option<String>| -> ArrayRef {
        Arc::new(rows.iter().map(value).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|row| Some(row.request_id.clone())),
        strings(&|row| Some(row.model.clone())),
        strings(&|row| Some(row.version.clone())),
        strings(&|row| Some(row.protocol.to_string())),
        Arc::new(
            TimestampMicrosecondArray::from(rows.iter().map(|row| row.received_at_micros).collect::<Vec<i64>>())
                .with_timezone("UTC"),
        ),
        Arc::new(
            rows.iter()
                .map(|row| row.latency_seconds * 1000.0)
                .collect::<Float64Array>(),
        ),
        strings(&|row| Some(row.status.to_string())),
        strings(&|row| row.error.clone()),
        strings(&|row| Some(tensors_json(&row.inputs))),
        strings(&|row| row.error.is_none().then(|| tensors_json(&row.outputs))),
    ];
    let batch = RecordBatch::try_new(Arc::new(schema()), columns).map_err(|error| error.to_string())?;
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut bytes = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), Some(properties))
        .map_err(|error| error.to_string())?;
    writer.write(&batch).map_err(|error| error.to_string())?;
    writer.close().map_err(|error| error.to_string())?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;

    fn entry(model: &str, index: usize) -> LogEntry {
        LogEntry {
            request_id: format!("r-{index}"),
            model: model.into(),
            version: "3".into(),
            protocol: "rest",
            received_at_micros: 1_700_000_000_000_000 + index as i64,
            latency_seconds: 0.002,
            status: if index == 1 { "invalid_input" } else { "ok" },
            error: (index == 1).then(|| "input 'x' has shape [1, 3]".to_string()),
            inputs: vec![Tensor::from_f32("x", vec![1, 2], &[index as f32, 0.5])],
            outputs: vec![Tensor::from_i64("label", vec![1], &[index as i64])],
        }
    }

    fn read_all(directory: &std::path::Path) -> Vec<RecordBatch> {
        let mut files: Vec<_> = walk(directory);
        files.sort();
        files
            .iter()
            .flat_map(|file| {
                let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                    std::fs::File::open(file).unwrap(),
                )
                .unwrap()
                .build()
                .unwrap();
                reader.map(Result::unwrap).collect::<Vec<_>>()
            })
            .collect()
    }

    fn walk(directory: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(directory).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[tokio::test]
    async fn rows_are_written_as_parquet_per_model_version_in_files_of_bounded_size_and_flushed_on_close() {
        let directory = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(directory.path()).unwrap());
        let store = Arc::new(store);
        let config = RequestLogConfig {
            rows_per_file: 2,
            flush_interval: Duration::from_secs(3600),
            ..RequestLogConfig::default()
        };
        let counters = LogCounters::default();
        let log = RequestLog::start(store, config, counters.clone());
        for index in 0..5 {
            log.log(entry("digits", index));
        }
        log.log(entry("other", 9));
        log.close().await;
        log.log(entry("digits", 10));
        assert_eq!(counters.rows_written.get(), 6);
        assert_eq!(counters.files_written.get(), 4, "digits: 2 + 2 + 1 rows, other: 1");
        assert_eq!(counters.rows_dropped.get(), 1, "logged after closing");
        let files = walk(directory.path());
        assert!(
            files
                .iter()
                .all(|file| file.starts_with(directory.path().join("request-logs")))
        );
        let batches = read_all(&directory.path().join("request-logs/digits/3"));
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 5);
        let first = &batches[0];
        assert_eq!(first.schema().as_ref(), &schema());
        let column = |name: &str| {
            first
                .column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        assert_eq!(column("request_id").value(0), "r-0");
        assert_eq!(
            column("inputs").value(0),
            r#"{"x":{"data":[0.0,0.5],"datatype":"FP32","shape":[1,2]}}"#
        );
        assert_eq!(
            column("outputs").value(0),
            r#"{"label":{"data":[0],"datatype":"INT64","shape":[1]}}"#
        );
        assert_eq!(column("status").value(1), "invalid_input");
        assert!(column("outputs").is_null(1), "a failed request has no outputs");
        assert!(column("error").value(1).contains("has shape [1, 3]"));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let directory = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(directory.path()).unwrap());
        let store = Arc::new(store);
        let config = RequestLogConfig {
            queue_capacity: 3,
            ..RequestLogConfig::default()
        };
        let counters = LogCounters::default();
        // On this current-thread runtime the writer cannot run until the test awaits: the queue fills.
        let log = RequestLog::start(store, config, counters.clone());
        for index in 0..10 {
            log.log(entry("digits", index));
        }
        assert_eq!(counters.rows_dropped.get(), 7);
        log.close().await;
        assert_eq!(counters.rows_written.get(), 3);
    }
}
