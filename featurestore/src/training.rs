//! Training sets: a feature service's features joined point-in-time onto entity rows, as one dataset
//! version with a content hash and the view versions that made it (for lineage).
//!
//! ```text
//!   entity rows (join keys + event time) ──► for each view the service reads:
//!       DataFusion reads the view (source + SQL) ──► point-in-time join (pit) on the view's entity keys
//!   ──► the training set: entity columns, then the features in the service's order
//!       content hash  = SHA-256 of the result in Arrow IPC stream form
//!       view versions = SHA-256 of each view's definition
//! ```
//!
//! Feature columns keep their names unless two views of the service share a name (or a feature shares
//! an entity column's name); then that view's columns are named `view__feature`.

use std::collections::BTreeSet;
use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::prelude::SessionContext;
use sha2::{Digest, Sha256};

use crate::FeatureStoreError;
use crate::definitions::{Definitions, FeatureView, view_frame};
use crate::pit::{JoinColumns, point_in_time_join_batches};

/// A view as a training set used it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewVersion {
    pub name: String,
    /// SHA-256 of the view's definition (its source, SQL, TTL and features), hex.
    pub definition_hash: String,
}

#[derive(Debug, Clone)]
pub struct TrainingSet {
    pub batch: RecordBatch,
    /// SHA-256 of the rows and schema (Arrow IPC stream), hex: equal data, equal hash.
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
    let mut bytes = Vec::new();
    {
        let mut writer = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema())?;
        writer.write(batch)?;
        writer.finish()?;
    }
    Ok(hex(Sha256::digest(&bytes)))
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

/// Builds service `service_name`'s training set for `entities` (which hold every join key of the views
/// the service reads and the event time column `event_timestamp`).
pub async fn training_set(
    definitions: &Definitions,
    service_name: &str,
    entities: &[RecordBatch],
    event_timestamp: &str,
    base: &Path,
) -> Result<TrainingSet, FeatureStoreError> {
    let service = definitions.service(service_name)?;
    let first = entities
        .first()
        .ok_or_else(|| FeatureStoreError::InvalidInput("no entity rows were given (not even an empty batch)".into()))?;
    let mut result = concat_batches(&first.schema(), entities)?;
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
    let entity_columns: BTreeSet<String> = result
        .schema()
        .fields()
        .iter()
        .map(|field| field.name().clone())
        .collect();
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
        let join = JoinColumns {
            entity_keys: &keys,
            entity_timestamp: event_timestamp,
            feature_keys: &keys,
            feature_timestamp: &source.timestamp_field,
            columns: features,
            ttl_micros: view.ttl_seconds.map(|seconds| seconds.saturating_mul(1_000_000) as i64),
            prefix: &prefix,
        };
        result = point_in_time_join_batches(std::slice::from_ref(&result), &rows, &join)?;
        versions.push(ViewVersion {
            name: view.name.clone(),
            definition_hash: view_hash(view),
        });
    }
    Ok(TrainingSet {
        content_hash: content_hash(&result)?,
        batch: result,
        views: versions,
    })
}

/// Every row of a Parquet, CSV or JSON file (entity rows, for example), read by DataFusion.
pub async fn read_file(path: &Path) -> Result<Vec<RecordBatch>, FeatureStoreError> {
    let context = SessionContext::new();
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

/// Writes `batch` to `path` as a snappy-compressed Parquet file, durably: written aside and fsynced,
/// renamed, and the directory fsynced.
pub fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), FeatureStoreError> {
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::basic::Compression;
    use datafusion::parquet::file::properties::WriterProperties;
    let storage =
        |error: &dyn std::fmt::Display| FeatureStoreError::Storage(format!("writing {}: {error}", path.display()));
    let temporary = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&temporary).map_err(|error| storage(&error))?;
    let properties = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(properties)).map_err(|error| storage(&error))?;
    writer.write(batch).map_err(|error| storage(&error))?;
    writer.close().map_err(|error| storage(&error))?;
    // Durable before it counts: the file's bytes, then its name in the directory.
    std::fs::File::open(&temporary)
        .and_then(|file| file.sync_all())
        .map_err(|error| storage(&error))?;
    std::fs::rename(&temporary, path).map_err(|error| storage(&error))?;
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty());
    std::fs::File::open(directory.unwrap_or(Path::new(".")))
        .and_then(|directory| directory.sync_all())
        .map_err(|error| storage(&error))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Array, ArrayRef, Float64Array, Int64Array, StringArray};

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
        let set = training_set(
            &definitions,
            "driver_activity",
            &[entities(&rows)],
            "event_timestamp",
            &base,
        )
        .await
        .unwrap();
        let schema = set.batch.schema();
        let names: Vec<&str> = schema.fields().iter().map(|field| field.name().as_str()).collect();
        assert_eq!(
            names,
            ["driver_id", "event_timestamp", "conv_rate", "acc_rate", "conv_acc"]
        );
        let conv = set
            .batch
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
        let again = training_set(
            &definitions,
            "driver_activity",
            &[entities(&rows)],
            "event_timestamp",
            &base,
        )
        .await
        .unwrap();
        assert_eq!(again.content_hash, set.content_hash);
        let other = training_set(
            &definitions,
            "driver_activity",
            &[entities(&rows[..2])],
            "event_timestamp",
            &base,
        )
        .await
        .unwrap();
        assert_ne!(other.content_hash, set.content_hash);

        let error = training_set(&definitions, "driver", &[entities(&rows)], "event_timestamp", &base)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("feature service 'driver' is not defined (services: driver_activity, driver_live)"),
            "{error}"
        );
    }
}
