//! `kiln features` as users run it: the example definitions check out against their data, a broken copy
//! is refused with the reason, and a training set comes out point-in-time correct as Parquet.

use std::path::Path;
use std::process::Command;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/features")
}

#[test]
fn check_accepts_the_example_and_names_what_is_wrong_in_a_broken_copy() {
    let output = Command::new(KILN)
        .args(["features", "check"])
        .arg(examples().join("driver.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("ok (1 entities, 2 sources, 1 feature views with 4 features, 1 feature services)"),
        "{stdout}"
    );

    // The same file in another directory, its data path pointing back, and one feature mistyped.
    let directory = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(examples().join("driver.toml")).unwrap();
    let data = examples().join("data/driver_hourly.csv").canonicalize().unwrap();
    let broken = text
        .replace(
            "path = \"data/driver_hourly.csv\"",
            &format!("path = {:?}", data.display().to_string()),
        )
        .replace(
            "name = \"avg_daily_trips\"\ntype = \"int64\"",
            "name = \"avg_daily_trips\"\ntype = \"string\"",
        );
    let file = directory.path().join("broken.toml");
    std::fs::write(&file, broken).unwrap();
    let output = Command::new(KILN)
        .args(["features", "check"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("feature 'avg_daily_trips' is declared string but the column has type Int64"),
        "{stderr}"
    );
}

#[test]
fn a_training_set_is_written_as_parquet_point_in_time_correct() {
    let directory = tempfile::tempdir().unwrap();
    let entities = directory.path().join("entities.csv");
    // Driver 1001 at 05:30 (the 05:00 row counts), 1002 before any row (null).
    std::fs::write(
        &entities,
        "driver_id,event_timestamp\n1001,2026-11-01T05:30:00\n1002,2026-10-31T12:00:00\n",
    )
    .unwrap();
    let out = directory.path().join("train.parquet");
    let output = Command::new(KILN)
        .args([
            "features",
            "training-set",
            "--service",
            "driver_activity",
            "--json",
            "--definitions",
        ])
        .arg(examples().join("driver.toml"))
        .arg("--entities")
        .arg(&entities)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["rows"], 2);
    assert_eq!(summary["content_hash"].as_str().unwrap().len(), 64);
    assert_eq!(summary["feature_views"][0]["name"], "driver_hourly_stats");

    let file = std::fs::File::open(&out).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batch = reader.map(Result::unwrap).next().unwrap();
    let conv = batch
        .column_by_name("conv_rate")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow_array::Float64Array>()
        .unwrap()
        .clone();
    let csv = std::fs::read_to_string(examples().join("data/driver_hourly.csv")).unwrap();
    let expected: f64 = csv
        .lines()
        .find(|line| line.starts_with("1001,2026-11-01T05:00:00"))
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(conv.value(0), expected);
    assert!(arrow_array::Array::is_null(&conv, 1));

    let output = Command::new(KILN)
        .args(["features", "training-set", "--service", "drivers", "--definitions"])
        .arg(examples().join("driver.toml"))
        .arg("--entities")
        .arg(&entities)
        .arg("--out")
        .arg(directory.path().join("none.parquet"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("feature service 'drivers' is not defined (services: driver_activity)"),
        "{stderr}"
    );
    assert!(!directory.path().join("none.parquet").exists());
}
