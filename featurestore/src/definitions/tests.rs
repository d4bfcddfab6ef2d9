//! Definitions: the example file parses and matches its data; each kind of mistake is refused with the
//! object, the field and the place named.

use std::path::PathBuf;

use super::*;

const DRIVER: &str = include_str!("../../../examples/features/driver.toml");

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/features")
}

fn refused(text: &str) -> String {
    parse_definitions("driver.toml", text).unwrap_err().to_string()
}

#[test]
fn the_example_parses() {
    let definitions = parse_definitions("driver.toml", DRIVER).unwrap();
    assert_eq!(definitions.entities[0].join_keys, ["driver_id"]);
    assert_eq!(definitions.sources.len(), 2);
    assert_eq!(definitions.sources[1].kind, SourceKind::Push);
    let view = &definitions.views[0];
    assert_eq!(view.ttl_seconds, Some(86_400));
    assert_eq!(view.features.len(), 4);
    assert_eq!(view.tags["team"], "driver-performance");
    let service = &definitions.services[0];
    assert_eq!(service.features.len(), 3);
    assert_eq!(
        service.features[2],
        FeatureRef {
            view: "driver_hourly_stats".into(),
            feature: "conv_acc".into()
        }
    );
    // A whole view may be named too.
    let whole = DRIVER.replace(
        "features = [\"driver_hourly_stats:conv_rate\", \"driver_hourly_stats:acc_rate\", \"driver_hourly_stats:conv_acc\"]",
        "features = [\"driver_hourly_stats\"]",
    );
    assert_eq!(
        parse_definitions("driver.toml", &whole).unwrap().services[0]
            .features
            .len(),
        4
    );
}

#[test]
fn mistakes_are_named_with_their_place() {
    let error = refused(&DRIVER.replace("entities = [\"driver\"]", "entities = [\"drivr\"]"));
    assert!(
        error.contains("names entity 'drivr', which is not defined (entities: driver)"),
        "{error}"
    );
    assert!(error.starts_with("invalid definitions driver.toml:2"), "{error}");
    let error = refused(&DRIVER.replace("source = \"driver_hourly\"", "source = \"hourly\""));
    assert!(
        error.contains("reads source 'hourly', which is not defined (sources: driver_hourly, driver_live)"),
        "{error}"
    );
    let error = refused(&DRIVER.replace("type = \"int64\"", "type = \"integer\""));
    assert!(
        error.contains("feature 'avg_daily_trips' has type 'integer'; expected one of int32, int64"),
        "{error}"
    );
    let error = refused(&DRIVER.replace("ttl = \"1day\"", "ttl = \"soon\""));
    assert!(error.contains("ttl 'soon' is not a duration"), "{error}");
    let error = refused(&DRIVER.replace("driver_hourly_stats:conv_acc", "driver_hourly_stats:speed"));
    assert!(
        error.contains("names feature 'speed' of view 'driver_hourly_stats', which has no such feature"),
        "{error}"
    );
    let error = refused(&format!(
        "{DRIVER}\n[[entity]]\nname = \"driver\"\njoin_keys = [\"id\"]\n"
    ));
    assert!(error.contains("entity 'driver' is defined twice"), "{error}");
    let error = refused(&DRIVER.replace("push = true", "push = false"));
    assert!(error.contains("source 'driver_live' needs either path"), "{error}");
    let error = refused(&DRIVER.replace("owner =", "ownr ="));
    assert!(error.contains("ownr"), "{error}");
}

#[tokio::test]
async fn the_example_matches_its_data_and_mismatches_are_refused() {
    let definitions = parse_definitions("driver.toml", DRIVER).unwrap();
    check_against_data(&definitions, &examples()).await.unwrap();
    let schema = view_schema(&definitions, &definitions.views[0], &examples())
        .await
        .unwrap()
        .unwrap();
    assert!(schema.field_with_name("conv_acc").is_ok());

    let check = |text: String| async move {
        let definitions = parse_definitions("driver.toml", &text).unwrap();
        check_against_data(&definitions, &examples())
            .await
            .unwrap_err()
            .to_string()
    };
    let error = check(DRIVER.replace(
        "type = \"float64\"\ndescription = \"Share of offers converted",
        "type = \"string\"\ndescription = \"Share of offers converted",
    ))
    .await;
    assert!(
        error.contains("feature 'conv_rate' is declared string but the column has type Float64"),
        "{error}"
    );
    let error = check(DRIVER.replace("name = \"avg_daily_trips\"", "name = \"trips\"")).await;
    assert!(
        error.contains("feature 'trips' is not a column of its data (columns: driver_id, event_timestamp"),
        "{error}"
    );
    let error = check(DRIVER.replace("join_keys = [\"driver_id\"]", "join_keys = [\"driver\"]")).await;
    assert!(
        error.contains("join key of entity 'driver' 'driver' is not a column"),
        "{error}"
    );
    let error = check(DRIVER.replace("path = \"data/driver_hourly.csv\"", "path = \"data/missing.parquet\"")).await;
    assert!(
        error.contains("file") && error.contains("missing.parquet does not exist"),
        "{error}"
    );
    let error = check(DRIVER.replace("FROM driver_hourly\"", "FROM driver_hourly WHERE speed > 1\"")).await;
    assert!(
        error.contains("feature_view 'driver_hourly_stats': its sql does not run"),
        "{error}"
    );
}

#[tokio::test]
async fn an_arrow_ipc_file_is_a_source_like_any_other() {
    use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::{Field, TimeUnit};
    use std::sync::Arc;

    let directory = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(
            "event_timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
        Field::new("score", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(TimestampMicrosecondArray::from(vec![10, 20, 30])),
            Arc::new(Float64Array::from(vec![0.5, 0.25, 0.125])),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(directory.path().join("scores.arrow")).unwrap();
    let mut writer = datafusion::arrow::ipc::writer::FileWriter::try_new(file, &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
    let text = r#"
[[entity]]
name = "item"
join_keys = ["id"]

[[source]]
name = "scores_file"
path = "scores.arrow"
timestamp_field = "event_timestamp"

[[feature_view]]
name = "scores"
entities = ["item"]
source = "scores_file"

[[feature_view.feature]]
name = "score"
type = "float64"
"#;
    let definitions = parse_definitions("scores.toml", text).unwrap();
    check_against_data(&definitions, directory.path()).await.unwrap();
    let frame = view_frame(&definitions, &definitions.views[0], directory.path())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame.count().await.unwrap(), 3);
}
