//! The point-in-time join at the scale: 100,000 entity rows against 1,000,000 feature rows
//! (10,000 entities × 100 timestamps, 4 float features, a 1-day TTL): `cargo bench -p kiln-featurestore`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, TimestampMicrosecondArray};
use kiln_featurestore::pit::{JoinColumns, point_in_time_join_batches};

const ENTITIES: i64 = 10_000;
const TIMES: i64 = 100;
const ENTITY_ROWS: usize = 100_000;
const HOUR: i64 = 3_600_000_000;

/// A cheap deterministic spread, so runs are comparable.
fn mix(value: u64) -> u64 {
    value.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

fn features() -> RecordBatch {
    let rows = (ENTITIES * TIMES) as usize;
    // Rows in shuffled order: the join must not rely on sorted input.
    let order: Vec<u64> = (0..rows as u64).map(|row| mix(row) % rows as u64).collect();
    let keys: Vec<i64> = order.iter().map(|row| *row as i64 % ENTITIES).collect();
    let times: Vec<i64> = order.iter().map(|row| (*row as i64 / ENTITIES) * HOUR).collect();
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("driver_id", Arc::new(Int64Array::from(keys))),
        ("ts", Arc::new(TimestampMicrosecondArray::from(times))),
    ];
    for name in ["f0", "f1", "f2", "f3"] {
        let values = (0..rows as u64).map(|row| (mix(row ^ name.len() as u64) % 1000) as f64 / 1000.0);
        columns.push((name, Arc::new(Float64Array::from_iter_values(values))));
    }
    RecordBatch::try_from_iter(columns).unwrap()
}

fn entities() -> RecordBatch {
    let keys = (0..ENTITY_ROWS as u64).map(|row| (mix(row) % ENTITIES as u64) as i64);
    let times = (0..ENTITY_ROWS as u64).map(|row| (mix(row + 7) % (TIMES as u64 * HOUR as u64)) as i64);
    RecordBatch::try_from_iter([
        ("driver_id", Arc::new(Int64Array::from_iter_values(keys)) as ArrayRef),
        (
            "event_timestamp",
            Arc::new(TimestampMicrosecondArray::from_iter_values(times)) as ArrayRef,
        ),
    ])
    .unwrap()
}

fn bench_pit(c: &mut Criterion) {
    let (features, entities) = (features(), entities());
    let keys = vec!["driver_id".to_string()];
    let columns: Vec<String> = ["f0", "f1", "f2", "f3"].map(String::from).to_vec();
    let join = JoinColumns {
        entity_keys: &keys,
        entity_timestamp: "event_timestamp",
        feature_keys: &keys,
        feature_timestamp: "ts",
        columns: &columns,
        ttl_micros: Some(24 * HOUR),
        prefix: "",
    };
    let mut group = c.benchmark_group("point_in_time_join");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements((features.num_rows() + entities.num_rows()) as u64));
    group.bench_function("100k_entity_rows_x_1M_feature_rows", |b| {
        b.iter(|| {
            point_in_time_join_batches(
                black_box(std::slice::from_ref(&entities)),
                black_box(std::slice::from_ref(&features)),
                &join,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_pit);
criterion_main!(benches);
