//! The online store: the latest value of each feature per entity, durable in redb, looked up by entity
//! key for serving.
//!
//! ```text
//!   materialize(view, until) ── DataFusion reads the view (source + SQL) ──► rows with time ≤ until ──┐
//!   push (Flight DoPut, later) ───────────────────────────────────────────────────────────────────────┤
//!                                                                                                     ▼
//!   online.redb   table "latest": (view, entity key values) ──► (event time µs, [(feature, value)])
//!                 a row replaces the stored one when its time is at least as new (later writes win ties)
//! ```
//!
//! Every write is one redb transaction, fsynced before it returns: what was acknowledged survives a
//! restart. Keys and rows are bincode of plain values ([`Value`]), independent of arrow's in-memory
//! formats.

use std::path::Path;

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::scalar::ScalarValue;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::FeatureStoreError;
use crate::definitions::Definitions;

const LATEST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("latest");

/// One feature or key value, as the online store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    /// Microseconds since the epoch.
    Timestamp(i64),
    FloatList(Vec<f64>),
    Bytes(Vec<u8>),
}

impl Value {
    /// Row `row` of `array`.
    pub fn from_array(array: &ArrayRef, row: usize) -> Result<Value, FeatureStoreError> {
        if array.is_null(row) {
            return Ok(Value::Null);
        }
        Value::from_scalar(ScalarValue::try_from_array(array, row)?)
    }

    fn from_scalar(scalar: ScalarValue) -> Result<Value, FeatureStoreError> {
        use ScalarValue as S;
        if scalar.is_null() {
            return Ok(Value::Null);
        }
        let unsupported = |scalar: &ScalarValue| {
            FeatureStoreError::InvalidInput(format!(
                "a value of type {} cannot be kept online; expected integers, floats, text, booleans, timestamps, lists of floats or bytes",
                scalar.data_type()
            ))
        };
        Ok(match scalar {
            S::Int8(Some(value)) => Value::Int(value.into()),
            S::Int16(Some(value)) => Value::Int(value.into()),
            S::Int32(Some(value)) => Value::Int(value.into()),
            S::Int64(Some(value)) => Value::Int(value),
            S::UInt8(Some(value)) => Value::Int(value.into()),
            S::UInt16(Some(value)) => Value::Int(value.into()),
            S::UInt32(Some(value)) => Value::Int(value.into()),
            S::UInt64(Some(value)) => Value::Int(
                i64::try_from(value)
                    .map_err(|_| FeatureStoreError::InvalidInput(format!("{value} does not fit a 64-bit integer")))?,
            ),
            S::Float16(Some(value)) => Value::Float(value.to_f64()),
            S::Float32(Some(value)) => Value::Float(value.into()),
            S::Float64(Some(value)) => Value::Float(value),
            S::Utf8(Some(text)) | S::LargeUtf8(Some(text)) | S::Utf8View(Some(text)) => Value::Text(text),
            S::Boolean(Some(value)) => Value::Bool(value),
            S::Binary(Some(bytes)) | S::LargeBinary(Some(bytes)) | S::BinaryView(Some(bytes)) => Value::Bytes(bytes),
            S::TimestampSecond(..)
            | S::TimestampMillisecond(..)
            | S::TimestampMicrosecond(..)
            | S::TimestampNanosecond(..)
            | S::Date32(_)
            | S::Date64(_) => {
                let array = scalar.to_array()?;
                let micros = crate::pit::timestamp_micros(&array, "value", "timestamp")?;
                micros[0].map_or(Value::Null, Value::Timestamp)
            }
            S::List(list) => float_list(list.value(0))?,
            S::LargeList(list) => float_list(list.value(0))?,
            S::FixedSizeList(list) => float_list(list.value(0))?,
            other => return Err(unsupported(&other)),
        })
    }
}

fn float_list(items: ArrayRef) -> Result<Value, FeatureStoreError> {
    if !matches!(
        items.data_type(),
        DataType::Float16 | DataType::Float32 | DataType::Float64
    ) {
        return Err(FeatureStoreError::InvalidInput(format!(
            "a list of {} cannot be kept online; expected a list of floats",
            items.data_type()
        )));
    }
    let floats = cast(&items, &DataType::Float64)?;
    let floats = floats
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Float64Array>()
        .expect("cast to f64");
    Ok(Value::FloatList(
        floats.iter().map(|value| value.unwrap_or(f64::NAN)).collect(),
    ))
}

/// What is stored for one entity of one view. Written with owned names (`N = String`) and read with names
/// borrowed from the stored bytes (`N = &str`), so a lookup copies no name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stored<N> {
    timestamp_micros: i64,
    features: Vec<(N, Value)>,
}

/// A lookup's answer for one entity: the time of the row it came from and the values asked for, in the
/// order asked ([`Value::Null`] for a feature the row does not have).
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineRow {
    pub timestamp_micros: i64,
    pub values: Vec<Value>,
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FeatureStoreError> {
    bincode::serde::encode_to_vec(value, bincode_config())
        .map_err(|error| FeatureStoreError::Storage(format!("encoding an online row: {error}")))
}

fn key_bytes(view: &str, key: &[Value]) -> Result<Vec<u8>, FeatureStoreError> {
    encode(&(view, key))
}

fn storage(error: impl std::fmt::Display) -> FeatureStoreError {
    FeatureStoreError::Storage(error.to_string())
}

/// The online store in one redb file.
pub struct OnlineStore {
    database: Database,
}

impl std::fmt::Debug for OnlineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlineStore").finish_non_exhaustive()
    }
}

impl OnlineStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<OnlineStore, FeatureStoreError> {
        let database = Database::create(path)
            .map_err(|error| FeatureStoreError::Storage(format!("opening {}: {error}", path.display())))?;
        Ok(OnlineStore { database })
    }

    /// Writes the rows of `batch` for `view` (entity key columns `keys`, event time `timestamp`, features
    /// `features`) whose time is at or before `until` (all when `None`), each replacing what is stored
    /// for its entity unless that is newer. Durable when it returns; returns how many rows it applied.
    pub fn write(
        &self,
        view: &str,
        batch: &RecordBatch,
        keys: &[String],
        timestamp: &str,
        features: &[String],
        until_micros: Option<i64>,
    ) -> Result<usize, FeatureStoreError> {
        let column = |name: &str, role: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| {
                FeatureStoreError::InvalidInput(format!(
                    "{role} column '{name}' is not in the rows written to view '{view}'"
                ))
            })
        };
        let key_columns: Vec<ArrayRef> = keys.iter().map(|key| column(key, "key")).collect::<Result<_, _>>()?;
        let feature_columns: Vec<ArrayRef> = features
            .iter()
            .map(|feature| column(feature, "feature"))
            .collect::<Result<_, _>>()?;
        let times = crate::pit::timestamp_micros(&column(timestamp, "timestamp")?, timestamp, "timestamp")?;
        // Everything is converted before the transaction opens: bad input changes nothing.
        let mut rows = Vec::with_capacity(batch.num_rows());
        for (row, time) in times.iter().enumerate() {
            let Some(time) = *time else { continue };
            if until_micros.is_some_and(|until| time > until) {
                continue;
            }
            let key: Vec<Value> = key_columns
                .iter()
                .map(|column| Value::from_array(column, row))
                .collect::<Result<_, _>>()?;
            if key.contains(&Value::Null) {
                continue;
            }
            let values = features
                .iter()
                .zip(&feature_columns)
                .map(|(name, column)| Ok((name.clone(), Value::from_array(column, row)?)))
                .collect::<Result<Vec<_>, FeatureStoreError>>()?;
            rows.push((key_bytes(view, &key)?, time, values));
        }
        let mut transaction = self.database.begin_write().map_err(storage)?;
        transaction.set_durability(Durability::Immediate).map_err(storage)?;
        let mut applied = 0;
        {
            let mut table = transaction.open_table(LATEST).map_err(storage)?;
            for (key, time, features) in rows {
                let newer = match table.get(key.as_slice()).map_err(storage)? {
                    Some(stored) => decode::<&str>(stored.value())?.timestamp_micros <= time,
                    None => true,
                };
                if newer {
                    let stored = encode(&Stored {
                        timestamp_micros: time,
                        features,
                    })?;
                    table.insert(key.as_slice(), stored.as_slice()).map_err(storage)?;
                    applied += 1;
                }
            }
        }
        transaction.commit().map_err(storage)?;
        Ok(applied)
    }

    /// The latest row of `view` for each entity key (in the order given), with `features` in that order;
    /// `None` for an entity never written.
    pub fn get(
        &self,
        view: &str,
        keys: &[Vec<Value>],
        features: &[String],
    ) -> Result<Vec<Option<OnlineRow>>, FeatureStoreError> {
        let transaction = self.database.begin_read().map_err(storage)?;
        let table = match transaction.open_table(LATEST) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![None; keys.len()]),
            Err(error) => return Err(storage(error)),
        };
        keys.iter()
            .map(|key| {
                let Some(stored) = table.get(key_bytes(view, key)?.as_slice()).map_err(storage)? else {
                    return Ok(None);
                };
                let stored = decode::<&str>(stored.value())?;
                let values = features
                    .iter()
                    .map(|name| {
                        stored
                            .features
                            .iter()
                            .find(|(stored_name, _)| stored_name == name)
                            .map_or(Value::Null, |(_, value)| value.clone())
                    })
                    .collect();
                Ok(Some(OnlineRow {
                    timestamp_micros: stored.timestamp_micros,
                    values,
                }))
            })
            .collect()
    }
}

fn decode<'a, N: Deserialize<'a>>(bytes: &'a [u8]) -> Result<Stored<N>, FeatureStoreError> {
    bincode::serde::borrow_decode_from_slice(bytes, bincode_config())
        .map(|(stored, _)| stored)
        .map_err(|error| FeatureStoreError::Storage(format!("an online row is corrupt: {error}")))
}

/// What a materialization did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Materialized {
    pub rows_read: usize,
    pub rows_applied: usize,
}

/// Copies view `view_name`'s latest values at or before `until_micros` (all when `None`) from its
/// source, through its SQL, into `store`. Relative source paths resolve against `base`.
pub async fn materialize(
    definitions: &Definitions,
    view_name: &str,
    base: &Path,
    store: &OnlineStore,
    until_micros: Option<i64>,
) -> Result<Materialized, FeatureStoreError> {
    let view = definitions.view(view_name)?;
    let Some(frame) = crate::definitions::view_frame(definitions, view, base).await? else {
        // A push source's rows go online as they arrive; there is nothing to copy.
        return Ok(Materialized {
            rows_read: 0,
            rows_applied: 0,
        });
    };
    let source = definitions.source_of(view)?;
    let keys = definitions.join_keys(view);
    let features: Vec<String> = view.features.iter().map(|feature| feature.name.clone()).collect();
    let mut report = Materialized {
        rows_read: 0,
        rows_applied: 0,
    };
    // Batch by batch, so a large source never sits in memory whole.
    let mut stream = frame.execute_stream().await?;
    use futures::StreamExt;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        report.rows_read += batch.num_rows();
        report.rows_applied += store.write(
            &view.name,
            &batch,
            &keys,
            &source.timestamp_field,
            &features,
            until_micros,
        )?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
