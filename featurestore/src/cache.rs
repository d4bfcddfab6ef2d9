//! Arrow IPC sources kept in memory, so that serving one (a view's DoGet, SQL over it) hands out the
//! same buffers every time instead of reading and decoding the file again.
//!
//! ```text
//!   view_frame ──► register_file(.arrow) ──► CachedIpcTable { the schema DataFusion read from the file }
//!                                                 │ scan
//!                                                 ▼
//!         file fits the budget? ── no ──► read batch by batch: contiguous runs of the file's batches, one
//!                │ yes                     per target partition, each read as it is polled
//!                │
//!                ▼
//!   SourceCache: path ──► (length, modified time, batches)      LRU, at most `budget` bytes in all
//!                │ same length and time: the batches held; otherwise read once (a blocking task)
//!                ▼
//!   MemTable over the batches (contiguous runs, one per target partition: file order within each)
//! ```
//!
//! A file is keyed by its length and modification time, checked on every scan: a rewritten file is read
//! again. Files are read, never memory-mapped: a source rewritten in place while a DoGet streams it
//! cannot take the server down. Only local files are kept; object-store sources stream as before.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use datafusion::arrow::array::{ArrayData, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;

/// The default budget: 1 GiB of Arrow buffers.
pub const DEFAULT_BUDGET_BYTES: usize = 1 << 30;

/// Arrow IPC files held in memory, least recently used first out, within a byte budget.
#[derive(Debug, Default)]
pub struct SourceCache {
    budget: AtomicUsize,
    held: Mutex<Held>,
    /// One gate per file being read: scans that miss at once wait for the first read instead of reading too.
    reading: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Files read into memory so far.
    reads: AtomicUsize,
}

#[derive(Debug, Default)]
struct Held {
    files: HashMap<PathBuf, Entry>,
    bytes: usize,
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    version: Version,
    batches: Arc<Vec<RecordBatch>>,
    bytes: usize,
    used: u64,
}

/// What identifies one content of a file: its length and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    length: u64,
    modified: Option<SystemTime>,
}

impl Version {
    fn of(path: &Path) -> std::io::Result<Version> {
        let metadata = std::fs::metadata(path)?;
        Ok(Version {
            length: metadata.len(),
            modified: metadata.modified().ok(),
        })
    }
}

impl SourceCache {
    pub fn new(budget_bytes: usize) -> SourceCache {
        SourceCache {
            budget: AtomicUsize::new(budget_bytes),
            held: Mutex::default(),
            reading: Mutex::default(),
            reads: AtomicUsize::new(0),
        }
    }

    /// Sets the budget (0 keeps nothing); files held beyond it are let go at once.
    pub fn set_budget(&self, bytes: usize) {
        self.budget.store(bytes, Ordering::Relaxed);
        let mut held = self.held.lock().expect("cache lock");
        held.evict_to(bytes);
    }

    pub fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// Bytes of Arrow buffers held now, and how many files.
    pub fn held(&self) -> (usize, usize) {
        let held = self.held.lock().expect("cache lock");
        (held.bytes, held.files.len())
    }

    /// How many times a file was read into memory.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    /// The batches of the Arrow IPC file at `path`: the ones held when the file is unchanged, else read
    /// now (and held when they fit the budget). `None` when the file alone is larger than the budget: the
    /// caller streams it instead.
    async fn batches(&self, path: &Path) -> Result<Option<Arc<Vec<RecordBatch>>>> {
        let version = Version::of(path).map_err(|error| io_error(path, error))?;
        let budget = self.budget();
        // A file larger than the budget would not fit once read (its buffers are at least its body).
        if version.length > budget as u64 {
            return Ok(None);
        }
        if let Some(batches) = self.held.lock().expect("cache lock").take(path, version) {
            return Ok(Some(batches));
        }
        let gate = self
            .reading
            .lock()
            .expect("cache lock")
            .entry(path.to_path_buf())
            .or_default()
            .clone();
        let _reading = gate.lock().await;
        // Another scan may have read the file while this one waited.
        if let Some(batches) = self.held.lock().expect("cache lock").take(path, version) {
            return Ok(Some(batches));
        }
        let owned = path.to_path_buf();
        let read = tokio::task::spawn_blocking(move || read_ipc_file(&owned)).await;
        self.reading.lock().expect("cache lock").remove(path);
        let batches = Arc::new(read.map_err(|error| DataFusionError::External(Box::new(error)))??);
        self.reads.fetch_add(1, Ordering::Relaxed);
        // Held only if the file did not change while it was read.
        if Version::of(path).ok() == Some(version) {
            let bytes = held_bytes(&batches);
            self.held
                .lock()
                .expect("cache lock")
                .put(path.to_path_buf(), version, batches.clone(), bytes, budget);
        }
        Ok(Some(batches))
    }
}

impl Held {
    fn take(&mut self, path: &Path, version: Version) -> Option<Arc<Vec<RecordBatch>>> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.files.get_mut(path)?;
        if entry.version != version {
            let stale = self.files.remove(path).expect("present");
            self.bytes -= stale.bytes;
            return None;
        }
        entry.used = clock;
        Some(entry.batches.clone())
    }

    fn put(&mut self, path: PathBuf, version: Version, batches: Arc<Vec<RecordBatch>>, bytes: usize, budget: usize) {
        if bytes > budget {
            return;
        }
        if let Some(replaced) = self.files.remove(&path) {
            self.bytes -= replaced.bytes;
        }
        self.evict_to(budget - bytes);
        self.clock += 1;
        self.bytes += bytes;
        self.files.insert(
            path,
            Entry {
                version,
                batches,
                bytes,
                used: self.clock,
            },
        );
    }

    /// Lets the least recently used files go until at most `bytes` are held.
    fn evict_to(&mut self, bytes: usize) {
        while self.bytes > bytes {
            let Some(oldest) = self
                .files
                .iter()
                .min_by_key(|(_, entry)| entry.used)
                .map(|(path, _)| path.clone())
            else {
                break;
            };
            let entry = self.files.remove(&oldest).expect("present");
            self.bytes -= entry.bytes;
        }
    }
}

/// The memory `batches` hold: each allocation once, however many arrays slice it (a batch read from an
/// IPC file is mostly slices of the one buffer its body was read into; a compressed file's are larger
/// than the file).
fn held_bytes(batches: &[RecordBatch]) -> usize {
    fn add(data: &ArrayData, seen: &mut HashSet<usize>, total: &mut usize) {
        let nulls = data.nulls().map(|nulls| nulls.buffer());
        for buffer in data.buffers().iter().chain(nulls) {
            if seen.insert(buffer.data_ptr().as_ptr() as usize) {
                *total += buffer.capacity();
            }
        }
        for child in data.child_data() {
            add(child, seen, total);
        }
    }
    let (mut seen, mut total) = (HashSet::new(), 0);
    for batch in batches {
        for column in batch.columns() {
            add(&column.to_data(), &mut seen, &mut total);
        }
    }
    total
}

fn io_error(path: &Path, error: std::io::Error) -> DataFusionError {
    DataFusionError::Execution(format!("reading {}: {error}", path.display()))
}

fn read_ipc_file(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|error| io_error(path, error))?;
    let reader = FileReader::try_new(std::io::BufReader::new(file), None)?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// A local Arrow IPC file as a table (with the schema DataFusion read from it), scanned from the
/// [`SourceCache`] while the file fits its budget and batch by batch from the file otherwise.
///
/// DataFusion's own scan of an IPC file, when its context has several partitions, splits the file into
/// byte ranges and reads each range whole into memory before its first batch; this one never holds more
/// than a batch per partition.
#[derive(Debug)]
pub struct CachedIpcTable {
    path: PathBuf,
    schema: SchemaRef,
    cache: Arc<SourceCache>,
}

impl CachedIpcTable {
    pub fn new(path: PathBuf, schema: SchemaRef, cache: Arc<SourceCache>) -> CachedIpcTable {
        CachedIpcTable { path, schema, cache }
    }

    /// Runs of the file's batches, read as they are polled.
    fn file_runs(&self, partitions: usize) -> Result<Vec<Arc<dyn PartitionStream>>> {
        let file = std::fs::File::open(&self.path).map_err(|error| io_error(&self.path, error))?;
        let count = FileReader::try_new(file, None)?.num_batches();
        Ok(runs(count, partitions)
            .map(|batches| {
                Arc::new(FileRun {
                    path: self.path.clone(),
                    schema: self.schema.clone(),
                    batches,
                }) as Arc<dyn PartitionStream>
            })
            .collect())
    }
}

/// `count` batches cut into contiguous runs, one per partition (at most `partitions`, at least one, even
/// when empty), so that each partition keeps the file's order: a one-partition context reads the file in
/// order, as the point-in-time rules need.
fn runs(count: usize, partitions: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per_partition = count.div_ceil(partitions.clamp(1, count.max(1))).max(1);
    let starts = (0..count.max(1)).step_by(per_partition);
    starts.map(move |first| first..(first + per_partition).min(count))
}

/// Batches `batches` of the Arrow IPC file at `path`, read one at a time.
#[derive(Debug)]
struct FileRun {
    path: PathBuf,
    schema: SchemaRef,
    batches: std::ops::Range<usize>,
}

impl PartitionStream for FileRun {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _context: Arc<TaskContext>) -> SendableRecordBatchStream {
        let opened = std::fs::File::open(&self.path)
            .map_err(|error| io_error(&self.path, error))
            .and_then(|file| Ok(FileReader::try_new(std::io::BufReader::new(file), None)?))
            .and_then(|mut reader| {
                reader.set_index(self.batches.start)?;
                Ok(reader)
            });
        let batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send> = match opened {
            Ok(reader) => Box::new(reader.take(self.batches.len()).map(|batch| Ok(batch?))),
            Err(error) => Box::new(std::iter::once(Err(error))),
        };
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches),
        ))
    }
}

#[tonic::async_trait]
impl TableProvider for CachedIpcTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let partitions = state.config().target_partitions();
        let Some(batches) = self.cache.batches(&self.path).await? else {
            return StreamingTable::try_new(self.schema(), self.file_runs(partitions)?)?
                .scan(state, projection, filters, limit)
                .await;
        };
        let held = runs(batches.len(), partitions)
            .map(|run| batches[run].to_vec())
            .collect();
        MemTable::try_new(self.schema(), held)?
            .scan(state, projection, filters, limit)
            .await
    }
}

#[cfg(test)]
mod tests;
