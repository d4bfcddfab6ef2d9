//! The online store keeps the newest row per entity, survives a reopen, and materializes the example.

use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, Int64Array, StringArray, TimestampSecondArray};

use super::*;
use crate::definitions::parse_definitions;

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn rows(drivers: &[i64], seconds: &[i64], rates: &[f64]) -> RecordBatch {
    RecordBatch::try_from_iter([
        ("driver_id", Arc::new(Int64Array::from(drivers.to_vec())) as ArrayRef),
        ("ts", Arc::new(TimestampSecondArray::from(seconds.to_vec())) as ArrayRef),
        ("rate", Arc::new(Float64Array::from(rates.to_vec())) as ArrayRef),
        (
            "city",
            Arc::new(StringArray::from(vec!["oslo"; drivers.len()])) as ArrayRef,
        ),
    ])
    .unwrap()
}

#[test]
fn the_newest_row_wins_and_survives_a_reopen() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("online.redb");
    let (keys, features) = (strings(&["driver_id"]), strings(&["rate", "city"]));
    {
        let store = OnlineStore::open(&path).unwrap();
        // Driver 1 at 10 s then 20 s; driver 2 at 30 s.
        let applied = store.write(
            "stats",
            &rows(&[1, 1, 2], &[10, 20, 30], &[0.1, 0.2, 0.3]),
            &keys,
            "ts",
            &features,
            None,
        );
        assert_eq!(applied.unwrap(), 3);
        // A late row older than what is stored changes nothing; one at the same time replaces it.
        let applied = store.write(
            "stats",
            &rows(&[1, 2], &[15, 30], &[9.0, 0.35]),
            &keys,
            "ts",
            &features,
            None,
        );
        assert_eq!(applied.unwrap(), 1);
        // Rows after `until` are left out.
        let applied = store.write(
            "stats",
            &rows(&[2], &[40], &[0.4]),
            &keys,
            "ts",
            &features,
            Some(35_000_000),
        );
        assert_eq!(applied.unwrap(), 0);
    }
    let store = OnlineStore::open(&path).unwrap();
    let lookup = [vec![Value::Int(1)], vec![Value::Int(2)], vec![Value::Int(3)]];
    let found = store
        .get("stats", &lookup, &strings(&["city", "rate", "speed"]))
        .unwrap();
    assert_eq!(
        found[0],
        Some(OnlineRow {
            timestamp_micros: 20_000_000,
            values: vec![Value::Text("oslo".into()), Value::Float(0.2), Value::Null],
        })
    );
    assert_eq!(found[1].as_ref().unwrap().values[1], Value::Float(0.35));
    assert_eq!(found[2], None);
    // Another view's rows are its own.
    assert_eq!(store.get("other", &lookup[..1], &features).unwrap(), [None]);
    // Bad input is refused and changes nothing.
    let error = store
        .write(
            "stats",
            &rows(&[1], &[99], &[5.0]),
            &keys,
            "ts",
            &strings(&["speed"]),
            None,
        )
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("feature column 'speed' is not in the rows written to view 'stats'"),
        "{error}"
    );
    assert_eq!(
        store.get("stats", &lookup[..1], &features).unwrap()[0]
            .as_ref()
            .unwrap()
            .timestamp_micros,
        20_000_000
    );
}

#[tokio::test]
async fn materializing_the_example_puts_each_drivers_latest_row_online() {
    let text = include_str!("../../../examples/features/driver.toml");
    let definitions = parse_definitions("driver.toml", text).unwrap();
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/features");
    let directory = tempfile::tempdir().unwrap();
    let store = OnlineStore::open(&directory.path().join("online.redb")).unwrap();
    // The CSV's last rows are 2026-11-02T23:00:00; stop ten hours earlier first.
    let until = 1_793_660_400_000_000 - 10 * 3_600_000_000;
    let partial = materialize(&definitions, "driver_hourly_stats", &base, &store, Some(until))
        .await
        .unwrap();
    assert_eq!(partial.rows_read, 240);
    let all = materialize(&definitions, "driver_hourly_stats", &base, &store, None)
        .await
        .unwrap();
    // The hour at `until` is written again (a row as new as the stored one replaces it: later writes win
    // ties), then the ten newer hours; the older hours change nothing.
    assert_eq!(all.rows_applied, 5 * 11);

    let csv = std::fs::read_to_string(base.join("data/driver_hourly.csv")).unwrap();
    let last_1001 = csv.lines().rfind(|line| line.starts_with("1001,")).unwrap();
    let fields: Vec<&str> = last_1001.split(',').collect();
    let (conv, acc): (f64, f64) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
    let found = store
        .get(
            "driver_hourly_stats",
            &[vec![Value::Int(1001)]],
            &strings(&["conv_rate", "acc_rate", "conv_acc", "avg_daily_trips"]),
        )
        .unwrap();
    let row = found[0].as_ref().unwrap();
    assert_eq!(row.timestamp_micros, 1_793_660_400_000_000);
    assert_eq!(row.values[0], Value::Float(conv));
    assert_eq!(row.values[1], Value::Float(acc));
    assert_eq!(row.values[2], Value::Float(conv * acc));
    assert_eq!(row.values[3], Value::Int(fields[4].parse().unwrap()));

    let error = materialize(&definitions, "driver_stats", &base, &store, None)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("feature view 'driver_stats' is not defined (views: driver_hourly_stats, driver_live_stats)"),
        "{error}"
    );
}
