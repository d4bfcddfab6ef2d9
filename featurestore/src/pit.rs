//! The point-in-time join: for each (entity key, event time) row, each feature's latest value at or before
//! that time and within the view's TTL, else null. Never a value from the future.
//!
//! ```text
//!   feature rows ──keys to dense ids (arrow's row format: any key types, several key columns)──►
//!       sort (key id, timestamp, source position)            one parallel sort, O(F log F): a FeatureIndex,
//!                                                            built once per view
//!   entity rows, in batches of any size, each:
//!                ──same key ids──► binary search in their key's run for the last timestamp ≤ event time (rayon)
//!       ──TTL check──► take indices (null when none) ──► arrow `take` per feature column
//! ```
//!
//! Rules a training set can rely on:
//! - A feature row counts when `event_time - ttl <= feature_time <= event_time` (Feast's rule; no TTL: any
//!   time at or before).
//! - Ties on the timestamp go to the row that comes last in the source: a row written later (a correction,
//!   a late arrival) wins over an earlier one with the same time.
//! - Entity rows keep their order and count; an entity the view has never seen gets nulls. A null key or a
//!   null event time matches nothing; a feature row with a null key or time is never chosen.
//!
//! Timestamps of any arrow timestamp unit or time zone (and dates) are compared as instants, in
//! microseconds.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, concat_batches, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::row::{RowConverter, SortField};

use rayon::prelude::*;

use crate::FeatureStoreError;

/// One side of the join: a batch and which of its columns are the join keys and the timestamp.
#[derive(Debug, Clone)]
pub struct Side<'a> {
    pub batch: &'a RecordBatch,
    pub keys: &'a [String],
    pub timestamp: &'a str,
}

/// The feature view side: which columns to bring over (in this order) and the TTL in microseconds.
#[derive(Debug, Clone)]
pub struct Features<'a> {
    pub side: Side<'a>,
    pub columns: &'a [String],
    pub ttl_micros: Option<i64>,
}

fn column<'a>(side: &'a Side<'_>, name: &str, role: &str) -> Result<&'a ArrayRef, FeatureStoreError> {
    let index = side.batch.schema().index_of(name).map_err(|_| {
        FeatureStoreError::InvalidInput(format!(
            "{role} column '{name}' is not there (columns: {})",
            side.batch
                .schema()
                .fields()
                .iter()
                .map(|field| field.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    Ok(side.batch.column(index))
}

/// The timestamp column as microseconds since the epoch (null where null).
fn micros(side: &Side<'_>, role: &str) -> Result<Vec<Option<i64>>, FeatureStoreError> {
    timestamp_micros(column(side, side.timestamp, role)?, side.timestamp, role)
}

/// A timestamp, date or ISO 8601 text column as microseconds since the epoch (null where null).
pub(crate) fn timestamp_micros(
    values: &ArrayRef,
    name: &str,
    role: &str,
) -> Result<Vec<Option<i64>>, FeatureStoreError> {
    let target = DataType::Timestamp(TimeUnit::Microsecond, None);
    let usable = matches!(
        values.data_type(),
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 | DataType::Utf8 | DataType::LargeUtf8
    );
    if !usable {
        return Err(FeatureStoreError::InvalidInput(format!(
            "{role} column '{name}' has type {}; expected a timestamp (or a date, or ISO 8601 text)",
            values.data_type()
        )));
    }
    // Time zones only label instants; dropping them keeps the instant.
    let values = match values.data_type() {
        DataType::Timestamp(unit, Some(_)) => cast(values, &DataType::Timestamp(*unit, None))?,
        _ => values.clone(),
    };
    let converted = cast(&values, &target)?;
    let converted = converted
        .as_any()
        .downcast_ref::<datafusion::arrow::array::TimestampMicrosecondArray>()
        .expect("cast to microseconds");
    Ok(converted.iter().collect())
}

/// A dense id per row (equal keys, equal ids); `None` where a key column is null or the key is unknown.
type KeyIds = Vec<Option<u32>>;

/// How keys become dense ids.
enum KeyMap {
    /// The common case, one integer key column, without arrow's row format: the values themselves are the
    /// hash keys.
    Integer(ahash::AHashMap<i64, u32>),
    /// Any other keys (any types, several columns), in arrow's row format.
    Rows {
        converter: RowConverter,
        ids: HashMap<Box<[u8]>, u32>,
    },
}

/// Whether `columns` are one integer column whose values survive a cast to Int64 (UInt64 above i64::MAX
/// would not).
fn integer_key(columns: &[ArrayRef]) -> bool {
    matches!(columns, [column] if column.data_type().is_integer() && column.data_type() != &DataType::UInt64)
}

fn as_i64(column: &ArrayRef) -> Result<datafusion::arrow::array::Int64Array, FeatureStoreError> {
    let cast = cast(column, &DataType::Int64)?;
    Ok(cast
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Int64Array>()
        .expect("cast to Int64")
        .clone())
}

/// A view's feature rows, indexed once for point-in-time lookups, then probed by any number of entity
/// batches (a training set streams its entity rows through it in chunks).
pub struct FeatureIndex {
    batch: RecordBatch,
    key_names: Vec<String>,
    key_types: Vec<DataType>,
    keys: KeyMap,
    /// (key id, time, source position), sorted: each key's rows form one run, in time order, ties in
    /// source order.
    sorted: Vec<(u32, i64, u32)>,
    /// Each key id's run in `sorted`.
    runs: HashMap<u32, (usize, usize)>,
    ttl_micros: Option<i64>,
}

impl std::fmt::Debug for FeatureIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureIndex")
            .field("rows", &self.batch.num_rows())
            .field("keys", &self.key_names)
            .field("ttl_micros", &self.ttl_micros)
            .finish_non_exhaustive()
    }
}

impl FeatureIndex {
    /// Indexes the rows of `side` (its join keys and timestamp); `ttl_micros` bounds how old a picked row
    /// may be.
    pub fn new(side: &Side<'_>, ttl_micros: Option<i64>) -> Result<FeatureIndex, FeatureStoreError> {
        if side.keys.is_empty() {
            return Err(FeatureStoreError::InvalidInput(
                "the feature rows have no join keys; expected at least one".into(),
            ));
        }
        if side.batch.num_rows() > u32::MAX as usize {
            return Err(FeatureStoreError::InvalidInput(format!(
                "{} feature rows is more than one join handles (2^32 - 1)",
                side.batch.num_rows()
            )));
        }
        let key_columns: Vec<ArrayRef> = side
            .keys
            .iter()
            .map(|key| column(side, key, "feature key").cloned())
            .collect::<Result<_, _>>()?;
        let (keys, feature_ids): (KeyMap, KeyIds) = if integer_key(&key_columns) {
            let values = as_i64(&key_columns[0])?;
            let mut ids: ahash::AHashMap<i64, u32> = ahash::AHashMap::with_capacity(values.len() / 8 + 16);
            let feature_ids = values
                .iter()
                .map(|key| {
                    let next = ids.len() as u32;
                    key.map(|key| *ids.entry(key).or_insert(next))
                })
                .collect();
            (KeyMap::Integer(ids), feature_ids)
        } else {
            let fields = key_columns
                .iter()
                .map(|column| SortField::new(column.data_type().clone()))
                .collect();
            let converter = RowConverter::new(fields)?;
            let rows = converter.convert_columns(&key_columns)?;
            let mut ids: HashMap<Box<[u8]>, u32> = HashMap::new();
            let feature_ids = (0..rows.num_rows())
                .map(|row| {
                    if key_columns.iter().any(|column| column.is_null(row)) {
                        return None;
                    }
                    let next = ids.len() as u32;
                    Some(*ids.entry(rows.row(row).data().into()).or_insert(next))
                })
                .collect();
            (KeyMap::Rows { converter, ids }, feature_ids)
        };
        let times = micros(side, "feature timestamp")?;
        let mut sorted: Vec<(u32, i64, u32)> = feature_ids
            .iter()
            .zip(&times)
            .enumerate()
            .filter_map(|(row, (key, time))| Some(((*key)?, (*time)?, row as u32)))
            .collect();
        sorted.par_sort_unstable();
        let mut runs: HashMap<u32, (usize, usize)> = HashMap::new();
        let mut start = 0;
        while start < sorted.len() {
            let key = sorted[start].0;
            let end = start + sorted[start..].partition_point(|(other, _, _)| *other == key);
            runs.insert(key, (start, end));
            start = end;
        }
        Ok(FeatureIndex {
            batch: side.batch.clone(),
            key_names: side.keys.to_vec(),
            key_types: key_columns.iter().map(|column| column.data_type().clone()).collect(),
            keys,
            sorted,
            runs,
            ttl_micros,
        })
    }

    /// The entity rows' keys as this index's ids.
    fn entity_ids(&self, entities: &Side<'_>) -> Result<KeyIds, FeatureStoreError> {
        if entities.keys.len() != self.key_names.len() {
            return Err(FeatureStoreError::InvalidInput(format!(
                "the entity rows are joined on [{}] and the feature rows on [{}]; expected the same number of join keys, at least one",
                entities.keys.join(", "),
                self.key_names.join(", ")
            )));
        }
        let mut columns = Vec::new();
        for ((entity_key, feature_key), feature_type) in entities.keys.iter().zip(&self.key_names).zip(&self.key_types)
        {
            let entity_column = column(entities, entity_key, "entity key")?;
            // Both sides in one type: the feature side's, so an Int32 entity key meets an Int64 view key.
            columns.push(if entity_column.data_type() == feature_type {
                entity_column.clone()
            } else {
                cast(entity_column, feature_type).map_err(|error| {
                    FeatureStoreError::InvalidInput(format!(
                        "entity key '{entity_key}' ({}) cannot be compared with feature key '{feature_key}' ({feature_type}): {error}",
                        entity_column.data_type(),
                    ))
                })?
            });
        }
        Ok(match &self.keys {
            KeyMap::Integer(ids) => as_i64(&columns[0])?
                .iter()
                .map(|key| key.and_then(|key| ids.get(&key).copied()))
                .collect(),
            KeyMap::Rows { converter, ids } => {
                let rows = converter.convert_columns(&columns)?;
                (0..rows.num_rows())
                    .map(|row| {
                        if columns.iter().any(|column| column.is_null(row)) {
                            return None;
                        }
                        ids.get(rows.row(row).data()).copied()
                    })
                    .collect()
            }
        })
    }

    /// For each entity row, the feature row the point-in-time rule picks, or null.
    pub fn match_rows(&self, entities: &Side<'_>) -> Result<UInt32Array, FeatureStoreError> {
        let entity_keys = self.entity_ids(entities)?;
        let entity_times = micros(entities, "entity event time")?;
        let picked = entity_keys.par_iter().zip(&entity_times).map(|(key, time)| {
            let (key, time) = ((*key)?, (*time)?);
            let (start, end) = *self.runs.get(&key)?;
            let run = &self.sorted[start..end];
            // The last row at or before `time`: the end of the rows with time ≤ event time, minus one.
            let after = run.partition_point(|(_, feature_time, _)| *feature_time <= time);
            let (_, feature_time, row) = *run.get(after.checked_sub(1)?)?;
            match self.ttl_micros {
                Some(ttl) if feature_time < time.saturating_sub(ttl) => None,
                _ => Some(row),
            }
        });
        let picked: Vec<Option<u32>> = picked.collect();
        Ok(UInt32Array::from(picked))
    }

    /// The entity rows with the picked values of `columns` appended (named as in the view, or with `prefix`
    /// + name when given).
    pub fn join(
        &self,
        entities: &Side<'_>,
        columns: &[String],
        prefix: &str,
    ) -> Result<RecordBatch, FeatureStoreError> {
        let indices = self.match_rows(entities)?;
        let feature_side = Side {
            batch: &self.batch,
            keys: &self.key_names,
            timestamp: "",
        };
        let mut fields: Vec<Arc<Field>> = entities.batch.schema().fields().iter().cloned().collect();
        let mut output_columns: Vec<ArrayRef> = entities.batch.columns().to_vec();
        for name in columns {
            let values = column(&feature_side, name, "feature")?;
            let taken = take(values.as_ref(), &indices, None)?;
            let output = format!("{prefix}{name}");
            if fields.iter().any(|field| field.name() == &output) {
                return Err(FeatureStoreError::InvalidInput(format!(
                    "feature '{output}' would repeat a column the entity rows already have; give the view a prefix"
                )));
            }
            fields.push(Arc::new(Field::new(output, values.data_type().clone(), true)));
            output_columns.push(taken);
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), output_columns)?)
    }
}

/// For each entity row, the feature row the point-in-time rule picks, or null.
pub fn match_rows(entities: &Side<'_>, features: &Features<'_>) -> Result<UInt32Array, FeatureStoreError> {
    FeatureIndex::new(&features.side, features.ttl_micros)?.match_rows(entities)
}

/// The entity rows with the picked features appended as columns (named as in the view, or with
/// `prefix` + name when given).
pub fn point_in_time_join(
    entities: &Side<'_>,
    features: &Features<'_>,
    prefix: &str,
) -> Result<RecordBatch, FeatureStoreError> {
    FeatureIndex::new(&features.side, features.ttl_micros)?.join(entities, features.columns, prefix)
}

/// Which columns a join over whole tables uses, for [`point_in_time_join_batches`].
#[derive(Debug, Clone)]
pub struct JoinColumns<'a> {
    pub entity_keys: &'a [String],
    pub entity_timestamp: &'a str,
    pub feature_keys: &'a [String],
    pub feature_timestamp: &'a str,
    /// Feature columns to bring over, in this order.
    pub columns: &'a [String],
    pub ttl_micros: Option<i64>,
    /// Put before each feature column's name in the output ("" for none).
    pub prefix: &'a str,
}

/// [`point_in_time_join`] over many batches on each side (they are concatenated first).
pub fn point_in_time_join_batches(
    entities: &[RecordBatch],
    features: &[RecordBatch],
    join: &JoinColumns<'_>,
) -> Result<RecordBatch, FeatureStoreError> {
    let concat = |batches: &[RecordBatch], what: &str| -> Result<RecordBatch, FeatureStoreError> {
        let first = batches
            .first()
            .ok_or_else(|| FeatureStoreError::InvalidInput(format!("no {what} batches (not even an empty one)")))?;
        Ok(concat_batches(&first.schema(), batches)?)
    };
    let entity_batch = concat(entities, "entity")?;
    let feature_batch = concat(features, "feature")?;
    point_in_time_join(
        &Side {
            batch: &entity_batch,
            keys: join.entity_keys,
            timestamp: join.entity_timestamp,
        },
        &Features {
            side: Side {
                batch: &feature_batch,
                keys: join.feature_keys,
                timestamp: join.feature_timestamp,
            },
            columns: join.columns,
            ttl_micros: join.ttl_micros,
        },
        join.prefix,
    )
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use proptest::prelude::*;

    use super::*;

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    /// Entity rows (key, event time in ms) and feature rows (key, time in ms); feature values are each
    /// row's position, so the picked row can be read back from the output.
    fn batches(entities: &[(Option<i64>, Option<i64>)], features: &[(Option<i64>, i64)]) -> (RecordBatch, RecordBatch) {
        let entity_batch = RecordBatch::try_from_iter([
            (
                "driver_id",
                Arc::new(Int64Array::from(entities.iter().map(|row| row.0).collect::<Vec<_>>())) as ArrayRef,
            ),
            (
                "event_timestamp",
                Arc::new(TimestampMillisecondArray::from(
                    entities.iter().map(|row| row.1).collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
        ])
        .unwrap();
        let feature_batch = RecordBatch::try_from_iter([
            (
                "driver_id",
                Arc::new(Int64Array::from(features.iter().map(|row| row.0).collect::<Vec<_>>())) as ArrayRef,
            ),
            (
                "ts",
                // Seconds here and milliseconds on the entity side: units must not matter.
                Arc::new(
                    datafusion::arrow::array::TimestampSecondArray::from(
                        features.iter().map(|row| row.1).collect::<Vec<_>>(),
                    )
                    .with_timezone("+02:00"),
                ) as ArrayRef,
            ),
            (
                "position",
                Arc::new(Float64Array::from_iter_values(
                    (0..features.len()).map(|row| row as f64),
                )) as ArrayRef,
            ),
        ])
        .unwrap();
        (entity_batch, feature_batch)
    }

    /// The rule stated plainly: every candidate is looked at.
    fn brute_force(
        entities: &[(Option<i64>, Option<i64>)],
        features: &[(Option<i64>, i64)],
        ttl_seconds: Option<i64>,
    ) -> Vec<Option<f64>> {
        entities
            .iter()
            .map(|(key, time_ms)| {
                let (key, time_ms) = ((*key)?, (*time_ms)?);
                let mut best: Option<(i64, usize)> = None;
                for (position, (feature_key, seconds)) in features.iter().enumerate() {
                    let feature_ms = seconds * 1000;
                    let in_window =
                        feature_ms <= time_ms && ttl_seconds.is_none_or(|ttl| feature_ms >= time_ms - ttl * 1000);
                    if *feature_key == Some(key) && in_window && best.is_none_or(|(best_ms, _)| feature_ms >= best_ms) {
                        best = Some((feature_ms, position));
                    }
                }
                best.map(|(_, position)| position as f64)
            })
            .collect()
    }

    fn join(
        entities: &[(Option<i64>, Option<i64>)],
        features: &[(Option<i64>, i64)],
        ttl_seconds: Option<i64>,
    ) -> Vec<Option<f64>> {
        let (entity_batch, feature_batch) = batches(entities, features);
        let (keys, columns) = (strings(&["driver_id"]), strings(&["position"]));
        let spec = JoinColumns {
            entity_keys: &keys,
            entity_timestamp: "event_timestamp",
            feature_keys: &keys,
            feature_timestamp: "ts",
            columns: &columns,
            ttl_micros: ttl_seconds.map(|ttl| ttl * 1_000_000),
            prefix: "",
        };
        let output = point_in_time_join_batches(&[entity_batch], &[feature_batch], &spec).unwrap();
        assert_eq!(output.num_rows(), entities.len());
        let picked = output
            .column_by_name("position")
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .clone();
        picked.iter().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn matches_the_brute_force_rule(
            entities in proptest::collection::vec((proptest::option::weighted(0.95, 0i64..6), proptest::option::weighted(0.95, 0i64..60_000)), 0..40),
            features in proptest::collection::vec((proptest::option::weighted(0.95, 0i64..5), 0i64..60), 0..60),
            ttl in proptest::option::of(0i64..30),
        ) {
            // Keys 0..6 on the entity side and 0..5 on the feature side: key 5 is an entity the view never saw.
            // Feature times in whole seconds collide often (ties); rows come in random time order (late arrivals).
            prop_assert_eq!(join(&entities, &features, ttl), brute_force(&entities, &features, ttl));
        }
    }

    #[test]
    fn ties_go_to_the_row_written_last_and_nothing_comes_from_the_future() {
        // Driver 1: two rows at t=10 s (the second is a correction), one at t=20 s.
        let features = [(Some(1), 10), (Some(1), 10), (Some(1), 20)];
        let entities = [
            (Some(1), Some(9_999)),
            (Some(1), Some(10_000)),
            (Some(1), Some(19_999)),
            (Some(1), Some(20_000)),
        ];
        assert_eq!(
            join(&entities, &features, None),
            [None, Some(1.0), Some(1.0), Some(2.0)]
        );
        // With a 5 s TTL, the t=10 row is too old for an event at 15.001 s but not at 15 s.
        let entities = [(Some(1), Some(15_000)), (Some(1), Some(15_001))];
        assert_eq!(join(&entities, &features, Some(5)), [Some(1.0), None]);
    }

    #[test]
    fn string_keys_several_key_columns_and_bad_input() {
        let entity_batch = RecordBatch::try_from_iter([
            (
                "city",
                Arc::new(StringArray::from(vec!["paris", "paris", "oslo"])) as ArrayRef,
            ),
            ("driver", Arc::new(Int64Array::from(vec![1, 2, 1])) as ArrayRef),
            (
                "at",
                Arc::new(StringArray::from(vec![
                    "2026-01-02T00:00:00",
                    "2026-01-02T00:00:00",
                    "2026-01-02T00:00:00",
                ])) as ArrayRef,
            ),
        ])
        .unwrap();
        let feature_batch = RecordBatch::try_from_iter([
            (
                "city",
                Arc::new(StringArray::from(vec!["paris", "oslo", "paris"])) as ArrayRef,
            ),
            (
                "driver",
                Arc::new(datafusion::arrow::array::Int32Array::from(vec![1, 1, 2])) as ArrayRef,
            ),
            (
                "ts",
                Arc::new(StringArray::from(vec![
                    "2026-01-01T00:00:00",
                    "2026-01-01T00:00:00",
                    "2026-01-03T00:00:00",
                ])) as ArrayRef,
            ),
            ("rate", Arc::new(Float64Array::from(vec![0.5, 0.7, 0.9])) as ArrayRef),
        ])
        .unwrap();
        let (keys, rate, speed) = (strings(&["city", "driver"]), strings(&["rate"]), strings(&["speed"]));
        let spec = JoinColumns {
            entity_keys: &keys,
            entity_timestamp: "at",
            feature_keys: &keys,
            feature_timestamp: "ts",
            columns: &rate,
            ttl_micros: None,
            prefix: "view__",
        };
        let output = point_in_time_join_batches(
            std::slice::from_ref(&entity_batch),
            std::slice::from_ref(&feature_batch),
            &spec,
        )
        .unwrap();
        let rates: Vec<Option<f64>> = output
            .column_by_name("view__rate")
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .iter()
            .collect();
        // paris/2's only row is from the future.
        assert_eq!(rates, [Some(0.5), None, Some(0.7)]);

        let unknown = JoinColumns {
            columns: &speed,
            ..spec.clone()
        };
        let error = point_in_time_join_batches(
            std::slice::from_ref(&entity_batch),
            std::slice::from_ref(&feature_batch),
            &unknown,
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("feature column 'speed' is not there (columns: city, driver, ts, rate)"),
            "{error}"
        );
        let wrong_time = JoinColumns {
            entity_timestamp: "driver",
            ..spec
        };
        let error = point_in_time_join_batches(&[entity_batch], &[feature_batch], &wrong_time).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("entity event time column 'driver' has type Int64; expected a timestamp"),
            "{error}"
        );
    }
}
