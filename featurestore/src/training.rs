//! Training sets: a feature service's features joined point-in-time onto entity rows, as one dataset
//! version with a content hash and the view versions that made it (for lineage).
//!
//! ```text
//!   for each view the service reads: DataFusion reads the view (source + SQL) ──► a FeatureIndex (pit)
//!   entity rows (join keys + event time), streamed from their file in chunks of CHUNK_ROWS rows
//!   ──► each chunk joined with every view's index ──► entity columns, then the features in the
//!       service's order ──► the sink (a Parquet file) and the content hash, chunk by chunk
//!       content hash  = SHA-256 of the result in Arrow IPC stream form, one message per chunk
//!       view versions = SHA-256 of each view's definition
//! ```
//!
//! The set is never held whole: memory is the views' rows and one chunk. Chunks have exactly CHUNK_ROWS
//! rows (the last fewer), whatever batches the entity file yields, so equal data gives an equal hash.
//!
//! Feature columns keep their names unless two views of the service share a name (or a feature shares
//! an entity column's name); then that view's columns are named `view__feature`.

use std::collections::BTreeSet;
use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::{BatchCoalescer, concat_batches};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::FeatureStoreError;
use crate::definitions::{Definitions, FeatureView, in_order, view_frame};
use crate::pit::{FeatureIndex, Side};

/// Entity rows per chunk of a training set: each chunk is joined, hashed and handed on before the next.
pub const CHUNK_ROWS: usize = 64 * 1024;

/// A view as a training set used it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewVersion {
    pub name: String,
    /// SHA-256 of the view's definition (its source, SQL, TTL and features), hex.
    pub definition_hash: String,
}

/// A training set built: what it is, beside its rows (which went to the sink chunk by chunk).
#[derive(Debug, Clone)]
pub struct TrainingSet {
    pub schema: SchemaRef,
    pub rows: usize,
    /// SHA-256 of the rows and schema (Arrow IPC stream, one message per chunk), hex: equal data, equal hash.
    pub content_hash: String,
    pub views: Vec<ViewVersion>,
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// SHA-256 of a view's definition.
pub fn view_hash(view: &FeatureView) -> String {
    let text = serde_json::to_vec(view).expect("a view serializes");
    hex(Sha256::digest(text))
}

/// SHA-256 of `batch` in Arrow IPC stream form.
pub fn content_hash(batch: &RecordBatch) -> Result<String, FeatureStoreError> {
    let mut hasher = StreamWriter::try_new(Sha256::new(), &batch.schema())?;
    hasher.write(batch)?;
    hasher.finish()?;
    Ok(hex(hasher.into_inner()?.finalize()))
}

/// Every row of `view`, read through its source and SQL by DataFusion (one empty batch with the view's
/// schema when there are none).
pub async fn read_view(
    definitions: &Definitions,
    view: &FeatureView,
    base: &Path,
) -> Result<Vec<RecordBatch>, FeatureStoreError> {
    let frame = view_frame(definitions, view, base).await?.ok_or_else(|| {
        FeatureStoreError::InvalidInput(format!(
            "feature view '{}' reads push source '{}', whose rows are not stored offline yet",
            view.name, view.source
        ))
    })?;
    let schema = std::sync::Arc::new(frame.schema().as_arrow().clone());
    let rows = frame.collect().await?;
    Ok(if rows.is_empty() {
        vec![RecordBatch::new_empty(schema)]
    } else {
        rows
    })
}

/// One view of a service, indexed for the join.
struct Joined {
    index: FeatureIndex,
    keys: Vec<String>,
    features: Vec<String>,
    prefix: String,
}

/// Builds service `service_name`'s training set for the entity rows of `entities` (which hold every join
/// key of the views the service reads and the event time column `event_timestamp`), handing it to `sink`
/// chunk by chunk, in the entity rows' order.
pub async fn training_set(
    definitions: &Definitions,
    service_name: &str,
    mut entities: SendableRecordBatchStream,
    event_timestamp: &str,
    base: &Path,
    sink: &mut (dyn FnMut(&RecordBatch) -> Result<(), FeatureStoreError> + Send),
) -> Result<TrainingSet, FeatureStoreError> {
    let service = definitions.service(service_name)?;
    let entity_schema = entities.schema();
    // The views in the order the service first names them, each with its chosen features.
    let mut views: Vec<(&FeatureView, Vec<String>)> = Vec::new();
    for reference in &service.features {
        let view = definitions
            .views
            .iter()
            .find(|view| view.name == reference.view)
            .expect("definitions resolve their references");
        match views.iter_mut().find(|(known, _)| known.name == view.name) {
            Some((_, features)) => features.push(reference.feature.clone()),
            None => views.push((view, vec![reference.feature.clone()])),
        }
    }
    let entity_columns: BTreeSet<String> = entity_schema
        .fields()
        .iter()
        .map(|field| field.name().clone())
        .collect();
    let mut joined = Vec::new();
    let mut versions = Vec::new();
    for (index, (view, features)) in views.iter().enumerate() {
        let clashes = features.iter().any(|feature| {
            entity_columns.contains(feature)
                || views
                    .iter()
                    .enumerate()
                    .any(|(other, (_, theirs))| other != index && theirs.contains(feature))
        });
        let prefix = if clashes {
            format!("{}__", view.name)
        } else {
            String::new()
        };
        let keys = definitions.join_keys(view);
        let source = definitions.source_of(view)?;
        let rows = read_view(definitions, view, base).await?;
        let rows = concat_batches(&rows[0].schema(), &rows)?;
        let side = Side {
            batch: &rows,
            keys: &keys,
            timestamp: &source.timestamp_field,
        };
        let ttl_micros = view.ttl_seconds.map(|seconds| seconds.saturating_mul(1_000_000) as i64);
        joined.push(Joined {
            index: FeatureIndex::new(&side, ttl_micros)?,
            keys,
            features: features.clone(),
            prefix,
        });
        versions.push(ViewVersion {
            name: view.name.clone(),
            definition_hash: view_hash(view),
        });
    }
    let mut hasher: Option<StreamWriter<Sha256>> = None;
    let mut schema = None;
    let mut rows = 0;
    let mut join_chunk = |chunk: RecordBatch| -> Result<(), FeatureStoreError> {
        let mut result = chunk;
        for view in &joined {
            let side = Side {
                batch: &result,
                keys: &view.keys,
                timestamp: event_timestamp,
            };
            result = view.index.join(&side, &view.features, &view.prefix)?;
        }
        if hasher.is_none() {
            hasher = Some(StreamWriter::try_new(Sha256::new(), &result.schema())?);
            schema = Some(result.schema());
        }
        hasher.as_mut().expect("created above").write(&result)?;
        rows += result.num_rows();
        sink(&result)
    };
    let mut chunks = BatchCoalescer::new(entity_schema.clone(), CHUNK_ROWS);
    let mut any = false;
    while let Some(batch) = entities.next().await {
        chunks.push_batch(batch?)?;
        while let Some(chunk) = chunks.next_completed_batch() {
            any = true;
            join_chunk(chunk)?;
        }
    }
    chunks.finish_buffered_batch()?;
    while let Some(chunk) = chunks.next_completed_batch() {
        any = true;
        join_chunk(chunk)?;
    }
    if !any {
        // No entity rows: the set is empty, with its columns.
        join_chunk(RecordBatch::new_empty(entity_schema))?;
    }
    let mut hasher = hasher.expect("at least one chunk was joined");
    hasher.finish()?;
    Ok(TrainingSet {
        schema: schema.expect("at least one chunk was joined"),
        rows,
        content_hash: hex(hasher.into_inner()?.finalize()),
        views: versions,
    })
}

/// Builds a training set (as [`training_set`]) from the entity rows in file `entities` into the Parquet
/// file `out`, durably: `out` appears only once every row is written and fsynced. `progress` hears the
/// number of rows written so far after each chunk.
pub async fn write_training_set(
    definitions: &Definitions,
    service_name: &str,
    entities: &Path,
    event_timestamp: &str,
    base: &Path,
    out: &Path,
    progress: &mut (dyn FnMut(usize) + Send),
) -> Result<TrainingSet, FeatureStoreError> {
    let stream = read_file_stream(entities).await?;
    let temporary = out.with_extension("parquet.tmp");
    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    let mut written = 0;
    let built = training_set(definitions, service_name, stream, event_timestamp, base, &mut |chunk| {
        if writer.is_none() {
            writer = Some(parquet_writer(&temporary, chunk.schema())?);
        }
        writer
            .as_mut()
            .expect("created above")
            .write(chunk)
            .map_err(|error| storage_error(&temporary, &error))?;
        written += chunk.num_rows();
        progress(written);
        Ok(())
    })
    .await;
    let set = match built {
        Ok(set) => set,
        Err(error) => {
            drop(writer);
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
    };
    let writer = writer.expect("at least one chunk was written");
    writer.close().map_err(|error| storage_error(&temporary, &error))?;
    publish(&temporary, out)?;
    Ok(set)
}

/// The rows of a Parquet, CSV or JSON file as a stream, in the file's order, read by DataFusion.
pub async fn read_file_stream(path: &Path) -> Result<SendableRecordBatchStream, FeatureStoreError> {
    let context = in_order();
    crate::definitions::register_file(&context, "file", path).await?;
    Ok(context.table("file").await?.execute_stream().await?)
}

/// Every row of a Parquet, CSV or JSON file (entity rows, for example), read by DataFusion.
pub async fn read_file(path: &Path) -> Result<Vec<RecordBatch>, FeatureStoreError> {
    let context = in_order();
    crate::definitions::register_file(&context, "file", path).await?;
    Ok(context.table("file").await?.collect().await?)
}

/// The column names of a Parquet, CSV or JSON file, from its schema alone (no rows are read).
pub async fn file_columns(path: &Path) -> Result<Vec<String>, FeatureStoreError> {
    let context = SessionContext::new();
    crate::definitions::register_file(&context, "file", path).await?;
    let table = context.table("file").await?;
    Ok(table
        .schema()
        .fields()
        .iter()
        .map(|field| field.name().clone())
        .collect())
}

fn storage_error(path: &Path, error: &dyn std::fmt::Display) -> FeatureStoreError {
    FeatureStoreError::Storage(format!("writing {}: {error}", path.display()))
}

/// A snappy-compressed Parquet writer creating `path`.
fn parquet_writer(path: &Path, schema: SchemaRef) -> Result<ArrowWriter<std::fs::File>, FeatureStoreError> {
    use datafusion::parquet::basic::Compression;
    use datafusion::parquet::file::properties::WriterProperties;
    let file = std::fs::File::create(path).map_err(|error| storage_error(path, &error))?;
    let properties = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    ArrowWriter::try_new(file, schema, Some(properties)).map_err(|error| storage_error(path, &error))
}

/// Makes the finished file `temporary` durable under the name `path`: its bytes fsynced, then
/// [`rename_durably`].
pub fn publish(temporary: &Path, path: &Path) -> Result<(), FeatureStoreError> {
    std::fs::File::open(temporary)
        .and_then(|file| file.sync_all())
        .map_err(|error| storage_error(path, &error))?;
    rename_durably(temporary, path)
}

/// Renames a file whose bytes are already durable, and fsyncs the directory so the new name is too.
pub fn rename_durably(from: &Path, to: &Path) -> Result<(), FeatureStoreError> {
    std::fs::rename(from, to).map_err(|error| storage_error(to, &error))?;
    sync_directory_of(to)
}

/// Fsyncs the directory holding `path`, so a rename into it survives a crash.
fn sync_directory_of(path: &Path) -> Result<(), FeatureStoreError> {
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty());
    std::fs::File::open(directory.unwrap_or(Path::new(".")))
        .and_then(|directory| directory.sync_all())
        .map_err(|error| storage_error(path, &error))
}

/// Writes `batch` to `path` as a snappy-compressed Parquet file, durably: written aside and fsynced,
/// renamed, and the directory fsynced.
pub fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), FeatureStoreError> {
    let temporary = path.with_extension("parquet.tmp");
    let mut writer = parquet_writer(&temporary, batch.schema())?;
    writer.write(batch).map_err(|error| storage_error(path, &error))?;
    writer.close().map_err(|error| storage_error(path, &error))?;
    publish(&temporary, path)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Array, ArrayRef, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    use super::*;
    use crate::definitions::parse_definitions;

    fn example() -> (Definitions, std::path::PathBuf) {
        let text = include_str!("../../examples/features/driver.toml");
        (
            parse_definitions("driver.toml", text).unwrap(),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/features"),
        )
    }

    /// conv_rate of `driver` at `hour` (0-based from 2026-11-01T00:00) in the example CSV.
    fn conv_rate(base: &Path, driver: i64, hour: usize) -> f64 {
        let csv = std::fs::read_to_string(base.join("data/driver_hourly.csv")).unwrap();
        let line = csv
            .lines()
            .filter(|line| line.starts_with(&format!("{driver},")))
            .nth(hour)
            .unwrap();
        line.split(',').nth(2).unwrap().parse().unwrap()
    }

    fn entities(rows: &[(i64, &str)]) -> RecordBatch {
        RecordBatch::try_from_iter([
            (
                "driver_id",
                Arc::new(Int64Array::from(rows.iter().map(|row| row.0).collect::<Vec<_>>())) as ArrayRef,
            ),
            (
                "event_timestamp",
                Arc::new(StringArray::from(rows.iter().map(|row| row.1).collect::<Vec<_>>())) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    /// Builds a set from `batches` of entity rows, keeping the chunks it hands on.
    async fn build(
        definitions: &Definitions,
        service: &str,
        batches: Vec<RecordBatch>,
        base: &Path,
    ) -> Result<(TrainingSet, Vec<RecordBatch>), FeatureStoreError> {
        let schema = batches[0].schema();
        let stream = RecordBatchStreamAdapter::new(schema, futures::stream::iter(batches.into_iter().map(Ok)));
        let mut chunks = Vec::new();
        let set = training_set(
            definitions,
            service,
            Box::pin(stream),
            "event_timestamp",
            base,
            &mut |chunk| {
                chunks.push(chunk.clone());
                Ok(())
            },
        )
        .await?;
        Ok((set, chunks))
    }

    #[tokio::test]
    async fn the_example_service_joins_point_in_time_with_its_ttl() {
        let (definitions, base) = example();
        let rows = [
            (1001, "2026-11-01T05:00:00"), // exactly on the hour: that hour's row
            (1002, "2026-11-01T05:30:00"), // between hours: the earlier one
            (1003, "2026-10-31T23:59:59"), // before any row: null
            (1004, "2026-11-05T00:00:00"), // two days after the last row, TTL one day: null
            (9999, "2026-11-01T05:00:00"), // an unknown driver: null
        ];
        let (set, chunks) = build(&definitions, "driver_activity", vec![entities(&rows)], &base)
            .await
            .unwrap();
        assert_eq!((set.rows, chunks.len()), (5, 1));
        let schema = set.schema.clone();
        let names: Vec<&str> = schema.fields().iter().map(|field| field.name().as_str()).collect();
        assert_eq!(
            names,
            ["driver_id", "event_timestamp", "conv_rate", "acc_rate", "conv_acc"]
        );
        assert_eq!(chunks[0].schema(), schema);
        let conv = chunks[0]
            .column_by_name("conv_rate")
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .clone();
        assert_eq!(conv.value(0), conv_rate(&base, 1001, 5));
        assert_eq!(conv.value(1), conv_rate(&base, 1002, 5));
        assert!(conv.is_null(2) && conv.is_null(3) && conv.is_null(4));
        assert_eq!(set.views.len(), 1);
        assert_eq!(set.views[0].definition_hash, view_hash(&definitions.views[0]));

        // The same request gives the same dataset version; other rows another.
        let again = build(&definitions, "driver_activity", vec![entities(&rows)], &base)
            .await
            .unwrap()
            .0;
        assert_eq!(again.content_hash, set.content_hash);
        let other = build(&definitions, "driver_activity", vec![entities(&rows[..2])], &base)
            .await
            .unwrap()
            .0;
        assert_ne!(other.content_hash, set.content_hash);

        let error = build(&definitions, "driver", vec![entities(&rows)], &base)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("feature service 'driver' is not defined (services: driver_activity, driver_live)"),
            "{error}"
        );
    }

    const DRIVERS: i64 = 1000;
    const MINUTE: i64 = 60_000_000;

    /// 150,000 entity rows (more than two chunks): driver `i % 1200` (the last 200 unknown) at minute
    /// `i % 240` of the day.
    fn entity_rows() -> RecordBatch {
        let rows = 150_000;
        let schema = Arc::new(Schema::new(vec![
            Field::new("driver_id", DataType::Int64, false),
            Field::new(
                "event_timestamp",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
        ]));
        let drivers = Int64Array::from_iter_values((0..rows).map(|row| row % 1200));
        let day = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z
        let times = TimestampMicrosecondArray::from_iter_values((0..rows).map(|row| day + (row % 240) * MINUTE));
        RecordBatch::try_new(schema, vec![Arc::new(drivers), Arc::new(times)]).unwrap()
    }

    #[tokio::test]
    async fn a_set_larger_than_a_chunk_streams_in_chunks_and_hashes_the_same_however_its_entities_arrive() {
        let directory = tempfile::tempdir().unwrap();
        // Three hourly rows per driver; driver d's rate at hour h is d + h/10; a 1-hour TTL.
        let mut csv = String::from("driver_id,event_timestamp,rate\n");
        for driver in 0..DRIVERS {
            for hour in 0..3 {
                csv.push_str(&format!(
                    "{driver},2026-01-01T{hour:02}:00:00,{}\n",
                    driver as f64 + hour as f64 / 10.0
                ));
            }
        }
        std::fs::write(directory.path().join("rates.csv"), csv).unwrap();
        let text = r#"
[[entity]]
name = "driver"
join_keys = ["driver_id"]

[[source]]
name = "rates"
path = "rates.csv"
timestamp_field = "event_timestamp"

[[feature_view]]
name = "rates"
entities = ["driver"]
source = "rates"
ttl = "1h"

[[feature_view.feature]]
name = "rate"
type = "float64"

[[feature_service]]
name = "rates"
features = ["rates"]
"#;
        let definitions = parse_definitions("rates.toml", text).unwrap();
        let entities = entity_rows();

        let (whole, chunks) = build(&definitions, "rates", vec![entities.clone()], directory.path())
            .await
            .unwrap();
        assert_eq!(whole.rows, 150_000);
        let sizes: Vec<usize> = chunks.iter().map(RecordBatch::num_rows).collect();
        assert_eq!(sizes, vec![CHUNK_ROWS, CHUNK_ROWS, 150_000 - 2 * CHUNK_ROWS]);

        // Every row against the rule worked out by hand: the last hour at or before the event time, if it
        // is at most an hour old; nothing for the unknown drivers.
        let mut row = 0;
        for chunk in &chunks {
            let rates = chunk
                .column_by_name("rate")
                .unwrap()
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap();
            for index in 0..chunk.num_rows() {
                let (driver, minute) = (row % 1200, row % 240);
                let hour = (minute / 60).min(2);
                let expected =
                    (driver < DRIVERS && minute - hour * 60 <= 60).then(|| driver as f64 + hour as f64 / 10.0);
                let found = (!rates.is_null(index)).then(|| rates.value(index));
                assert_eq!(found, expected, "entity row {row}");
                row += 1;
            }
        }

        // The same rows in uneven batches: the same chunks, the same hash.
        let uneven: Vec<RecordBatch> = (0..150_000)
            .step_by(7_001)
            .map(|start| entities.slice(start, 7_001.min(150_000 - start)))
            .collect();
        let (again, chunks_again) = build(&definitions, "rates", uneven, directory.path()).await.unwrap();
        assert_eq!(again.content_hash, whole.content_hash);
        assert_eq!(chunks_again, chunks);

        // A different row, a different hash.
        let (changed, _) = build(
            &definitions,
            "rates",
            vec![entities.slice(1, 149_999)],
            directory.path(),
        )
        .await
        .unwrap();
        assert_ne!(changed.content_hash, whole.content_hash);

        // Written to Parquet: the file holds the same rows.
        let out = directory.path().join("set.parquet");
        let entity_file = directory.path().join("entities.parquet");
        write_parquet(&entity_file, &entities).unwrap();
        let mut reported = Vec::new();
        let written = write_training_set(
            &definitions,
            "rates",
            &entity_file,
            "event_timestamp",
            directory.path(),
            &out,
            &mut |rows| reported.push(rows),
        )
        .await
        .unwrap();
        assert_eq!(written.rows, 150_000);
        assert_eq!(reported, [CHUNK_ROWS, 2 * CHUNK_ROWS, 150_000]);
        let read = read_file(&out).await.unwrap();
        assert_eq!(read.iter().map(RecordBatch::num_rows).sum::<usize>(), 150_000);
        assert!(!out.with_extension("parquet.tmp").exists());
    }
}
