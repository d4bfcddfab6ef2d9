//! The feature server over a real loopback socket, through arrow-flight's own client.

use std::path::Path;

use arrow_flight::FlightClient;
use datafusion::arrow::array::{Array, Float64Array, Int64Array, TimestampMicrosecondArray};
use futures::TryStreamExt;
use tonic::codegen::Bytes;
use tonic::transport::Channel;

use super::*;
use crate::definitions::{Definitions, parse_definitions};

fn example() -> Definitions {
    let text = include_str!("../../../examples/features/driver.toml");
    let mut definitions = parse_definitions("driver.toml", text).unwrap();
    definitions
        .resolve_paths(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/features"))
        .unwrap();
    definitions
}

struct Running {
    client: FlightClient,
    address: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

async fn start(data_dir: &Path, definitions: Definitions) -> Running {
    let registered = Registered {
        definitions,
        versions: Default::default(),
    };
    let (_keep, receiver) = watch::channel(Arc::new(registered));
    let server = FeatureServer::open(data_dir.to_path_buf(), receiver).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _keep = _keep;
        serve(server, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Running {
        client: FlightClient::new(channel),
        address,
        stop: Some(stop),
        task,
    }
}

/// One HTTP/1.1 request on its own connection: the status code and the JSON body.
async fn http(address: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        head.to_ascii_lowercase().contains("content-type: application/json"),
        "{head}"
    );
    (
        code,
        serde_json::from_str(body).unwrap_or_else(|error| panic!("{error}: {body}")),
    )
}

async fn fetch(client: &mut FlightClient, command: &FlightCommand) -> Vec<RecordBatch> {
    let info = client
        .get_flight_info(FlightDescriptor::new_cmd(command.to_bytes()))
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    client.do_get(ticket).await.unwrap().try_collect().await.unwrap()
}

async fn list(client: &mut FlightClient) -> Vec<FlightInfo> {
    client
        .list_flights(Bytes::new())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

fn float_column(batch: &RecordBatch, name: &str) -> Float64Array {
    batch
        .column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .clone()
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_sql_and_training_sets_are_served_and_errors_name_the_problem() {
    let directory = tempfile::tempdir().unwrap();
    let mut running = start(directory.path(), example()).await;
    let client = &mut running.client;

    let listed = list(client).await;
    let paths: Vec<Vec<String>> = listed
        .iter()
        .map(|info| info.flight_descriptor.clone().unwrap().path)
        .collect();
    assert!(
        paths.contains(&vec!["view".into(), "driver_hourly_stats".into()]),
        "{paths:?}"
    );
    assert!(
        paths.contains(&vec!["service".into(), "driver_activity".into()]),
        "{paths:?}"
    );

    // A view by path: every row of the example (5 drivers × 48 hours).
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "view".into(),
            "driver_hourly_stats".into(),
        ]))
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let batches: Vec<RecordBatch> = client.do_get(ticket).await.unwrap().try_collect().await.unwrap();
    assert_eq!(rows(&batches), 5 * 48);

    let batches = fetch(
        client,
        &FlightCommand::Sql {
            query: "SELECT driver_id, count(*) AS hours FROM driver_hourly_stats GROUP BY driver_id ORDER BY driver_id"
                .into(),
        },
    )
    .await;
    assert_eq!(rows(&batches), 5);
    let hours = batches[0]
        .column_by_name("hours")
        .unwrap()
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .clone();
    assert!(hours.iter().all(|count| count == Some(48)));

    // A training set, sharded over two ranks: the shards partition the rows.
    let entities = directory.path().join("entities.csv");
    let mut text = String::from("driver_id,event_timestamp\n");
    for hour in 0..10 {
        text.push_str(&format!("1001,2026-11-01T{hour:02}:30:00\n"));
    }
    std::fs::write(&entities, text).unwrap();
    let shard = |rank, world| FlightCommand::TrainingSet {
        service: "driver_activity".into(),
        entities: entities.display().to_string(),
        event_timestamp: "event_timestamp".into(),
        rank,
        world,
    };
    let whole = rows(&fetch(client, &shard(0, 1)).await);
    let first = rows(&fetch(client, &shard(0, 2)).await);
    let second = rows(&fetch(client, &shard(1, 2)).await);
    assert_eq!((whole, first + second), (10, 10));
    assert_eq!(first, 5);

    // A computed set is kept for its DoGet and the other shards, keyed by the entity file as well: a file
    // rewritten in between is noticed, and the DoGet serves the new rows.
    let info = client
        .get_flight_info(FlightDescriptor::new_cmd(shard(0, 1).to_bytes()))
        .await
        .unwrap();
    std::fs::write(&entities, "driver_id,event_timestamp\n1001,2026-11-01T00:30:00\n").unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let served: Vec<RecordBatch> = client
        .do_get(ticket.clone())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows(&served), 1);
    let again: Vec<RecordBatch> = client.do_get(ticket).await.unwrap().try_collect().await.unwrap();
    assert_eq!(rows(&again), 1);

    // Each training set built is kept as a dataset version, listed with its manifest and readable by hash.
    let listed = list(client).await;
    let datasets: Vec<&FlightInfo> = listed
        .iter()
        .filter(|info| info.flight_descriptor.as_ref().unwrap().path[0] == "dataset")
        .collect();
    assert_eq!(datasets.len(), 2, "the 10-row and the 1-row sets");
    let ten = datasets.iter().find(|info| info.total_records == 10).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&ten.app_metadata).unwrap();
    assert_eq!(manifest["service"], "driver_activity");
    assert_eq!(manifest["feature_views"][0]["name"], "driver_hourly_stats");
    let hash = ten.flight_descriptor.as_ref().unwrap().path[1].clone();
    assert_eq!(manifest["content_hash"], hash.as_str());
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec!["dataset".into(), hash]))
        .await
        .unwrap();
    let batches: Vec<RecordBatch> = client
        .do_get(info.endpoint[0].ticket.clone().unwrap())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows(&batches), 10);
    let error = client
        .get_flight_info(FlightDescriptor::new_path(vec!["dataset".into(), "../online".into()]))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("dataset '../online' is not known here"), "{error}");

    let cases = [
        (
            FlightDescriptor::new_cmd(b"not json".to_vec()),
            "is not a Kiln feature command",
        ),
        (
            FlightDescriptor::new_path(vec!["view".into(), "nope".into()]),
            "feature view 'nope' is not defined (views: driver_hourly_stats, driver_live_stats)",
        ),
        (
            FlightDescriptor::new_cmd(
                FlightCommand::Sql {
                    query: "SELECT missing FROM driver_hourly_stats".into(),
                }
                .to_bytes(),
            ),
            "the query does not run",
        ),
        (
            FlightDescriptor::new_cmd(shard(2, 2).to_bytes()),
            "rank 2 is not below world 2",
        ),
    ];
    for (descriptor, expected) in cases {
        let error = client.get_flight_info(descriptor).await.unwrap_err().to_string();
        assert!(error.contains(expected), "{error}");
    }
    let error = client
        .do_get(Ticket::new(b"{\"view\": 3}".to_vec()))
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(error.contains("is not a Kiln feature command"), "{error}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_and_materialized_rows_are_served_online_and_survive_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let mut running = start(directory.path(), example()).await;
    let client = &mut running.client;

    // Materialize the file view, then look two drivers up (1999 was never seen).
    let report: Vec<Bytes> = client
        .do_action(Action::new("materialize", Bytes::new()))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report[0]).unwrap();
    let applied: u64 = report["views"]
        .as_array()
        .unwrap()
        .iter()
        .map(|view| view["rows_applied"].as_u64().unwrap())
        .sum();
    assert!(applied >= 5, "{report}");
    let lookup = FlightCommand::Online {
        service: "driver_activity".into(),
        entities: [(
            "driver_id".to_string(),
            vec![serde_json::json!(1001), serde_json::json!(1999)],
        )]
        .into(),
    };
    let batches = fetch(client, &lookup).await;
    let conv = float_column(&batches[0], "conv_rate");
    assert!(conv.is_valid(0) && conv.is_null(1), "{conv:?}");

    // Push rows into the push source the example declares, then read them online and offline.
    let definitions = example();
    let push_source = definitions
        .sources
        .iter()
        .find(|source| source.kind == crate::definitions::SourceKind::Push)
        .unwrap()
        .clone();
    let push_view = definitions.views.iter().find(|view| view.source == push_source.name);
    let schema = Arc::new(Schema::new(vec![
        Field::new("driver_id", DataType::Int64, false),
        Field::new(
            &push_source.timestamp_field,
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
        Field::new("trips_today", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1001, 1002])),
            Arc::new(TimestampMicrosecondArray::from(vec![
                1_762_000_000_000_000,
                1_762_000_000_000_000,
            ])),
            Arc::new(Int64Array::from(vec![Some(7), None])),
        ],
    )
    .unwrap();
    let flight = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![
            "push".into(),
            push_source.name.clone(),
        ])))
        .build(futures::stream::iter([Ok(batch.clone())]));
    let acknowledged: Vec<PutResult> = client.do_put(flight).await.unwrap().try_collect().await.unwrap();
    let acknowledged: serde_json::Value = serde_json::from_slice(&acknowledged[0].app_metadata).unwrap();
    assert_eq!(acknowledged["rows"], 2);
    if let Some(view) = push_view {
        let offline = fetch(
            client,
            &FlightCommand::View {
                name: view.name.clone(),
            },
        )
        .await;
        assert_eq!(rows(&offline), 2);
    }

    // A push to a file source, or with a column missing, is refused and writes nothing.
    let refused = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![
            "push".into(),
            "driver_hourly".into(),
        ])))
        .build(futures::stream::iter([Ok(batch)]));
    let error = client.do_put(refused).await.map(|_| ()).unwrap_err().to_string();
    assert!(error.contains("reads a file, not pushes"), "{error}");

    // The server restarts on the same directory: online values and pushed rows are still there.
    running.stop().await;
    let mut running = start(directory.path(), example()).await;
    let batches = fetch(&mut running.client, &lookup).await;
    let again = float_column(&batches[0], "conv_rate");
    assert_eq!(again, conv);
    if let Some(view) = push_view {
        let offline = fetch(
            &mut running.client,
            &FlightCommand::View {
                name: view.name.clone(),
            },
        )
        .await;
        assert_eq!(rows(&offline), 2);
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feast_shaped_http_lookups_and_pushes_share_the_flight_port() {
    let directory = tempfile::tempdir().unwrap();
    let mut running = start(directory.path(), example()).await;
    let address = running.address;
    let (code, health) = http(address, "GET", "/health", "").await;
    assert_eq!((code, health["status"].as_str()), (200, Some("ok")));

    // Materialized over Flight, read over HTTP: one known driver and one never seen.
    let _: Vec<Bytes> = running
        .client
        .do_action(Action::new("materialize", Bytes::new()))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let (code, answer) = http(
        address,
        "POST",
        "/get-online-features",
        r#"{"feature_service": "driver_activity", "entities": {"driver_id": [1001, 1999]}}"#,
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer["metadata"]["feature_names"],
        serde_json::json!(["driver_id", "conv_rate", "acc_rate", "conv_acc"])
    );
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[0]["values"], serde_json::json!([1001, 1999]));
    assert_eq!(results[1]["statuses"], serde_json::json!(["PRESENT", "NOT_FOUND"]));
    assert!(results[1]["values"][1].is_null(), "{answer}");
    assert!(
        results[1]["event_timestamps"][0].as_str().unwrap().ends_with('Z'),
        "{answer}"
    );
    // The same value Flight serves for the same lookup.
    let flight = fetch(
        &mut running.client,
        &FlightCommand::Online {
            service: "driver_activity".into(),
            entities: [("driver_id".to_string(), vec![serde_json::json!(1001)])].into(),
        },
    )
    .await;
    let conv = float_column(&flight[0], "conv_rate").value(0);
    assert_eq!(results[1]["values"][0].as_f64(), Some(conv));

    // Features by reference, with full names.
    let (code, answer) = http(
        address,
        "POST",
        "/get-online-features",
        r#"{"features": ["driver_hourly_stats:acc_rate"], "entities": {"driver_id": [1002]}, "full_feature_names": true}"#,
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer["metadata"]["feature_names"],
        serde_json::json!(["driver_id", "driver_hourly_stats__acc_rate"])
    );

    // A push to the online store only, then to both; the offline view sees only the second.
    let push = |to: &str, trips: &str| {
        format!(
            r#"{{"push_source_name": "driver_live", "to": "{to}", "df": {{"driver_id": [1003], "event_timestamp": ["2026-11-26T10:00:00Z"], "trips_today": [{trips}]}}}}"#
        )
    };
    let (code, answer) = http(address, "POST", "/push", &push("online", "7")).await;
    assert_eq!((code, answer["rows"].as_u64()), (200, Some(1)), "{answer}");
    let live = r#"{"feature_service": "driver_live", "entities": {"driver_id": [1003]}}"#;
    let (_, answer) = http(address, "POST", "/get-online-features", live).await;
    assert_eq!(answer["results"][1]["values"], serde_json::json!([7]), "{answer}");
    let view = FlightCommand::View {
        name: "driver_live_stats".into(),
    };
    let error = running
        .client
        .get_flight_info(FlightDescriptor::new_cmd(view.to_bytes()))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("has no rows yet"), "{error}");
    let (code, _) = http(address, "POST", "/push", &push("online_and_offline", "8")).await;
    assert_eq!(code, 200);
    assert_eq!(rows(&fetch(&mut running.client, &view).await), 1);

    // Bad input is refused with a message naming the problem, and changes nothing.
    for (path, body, expected) in [
        (
            "/get-online-features",
            r#"{"feature_service": "nope", "entities": {"driver_id": [1]}}"#,
            "feature service 'nope' is not defined",
        ),
        (
            "/get-online-features",
            r#"{"features": ["driver_hourly_stats:nope"], "entities": {"driver_id": [1]}}"#,
            "feature 'nope' is not in feature view 'driver_hourly_stats'",
        ),
        (
            "/get-online-features",
            r#"{"feature_service": "driver_activity", "features": ["driver_hourly_stats"], "entities": {"driver_id": [1]}}"#,
            "not both or neither",
        ),
        ("/get-online-features", "{not json", "the request body is not valid"),
        ("/push", &push("online", r#""many""#), "do not convert to their types"),
        (
            "/push",
            r#"{"push_source_name": "driver_hourly", "df": {"driver_id": [1]}}"#,
            "reads a file, not pushes",
        ),
    ] {
        let (code, answer) = http(address, "POST", path, body).await;
        assert_eq!(code, 400, "{body}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(expected), "{body}: {message}");
    }
    let (_, answer) = http(address, "POST", "/get-online-features", live).await;
    assert_eq!(answer["results"][1]["values"], serde_json::json!([8]), "{answer}");
    let (code, answer) = http(address, "GET", "/nowhere", "").await;
    assert_eq!(code, 404);
    assert!(
        answer["error"].as_str().unwrap().contains("/get-online-features"),
        "{answer}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_of_many_messages_streams_whole_and_an_error_while_streaming_is_the_calls_status() {
    let directory = tempfile::tempdir().unwrap();
    let mut running = start(directory.path(), example()).await;
    let client = &mut running.client;

    // 1,000,000 rows of two columns: many Flight messages.
    let query = "SELECT value, value * 2 AS twice FROM generate_series(1, 1000000)";
    let batches = fetch(client, &FlightCommand::Sql { query: query.into() }).await;
    assert!(batches.len() > 10, "{} batches", batches.len());
    assert_eq!(rows(&batches), 1_000_000);
    let (mut sum, mut sum_twice) = (0i64, 0i64);
    for batch in &batches {
        let value = batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let twice = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        sum += value.values().iter().sum::<i64>();
        sum_twice += twice.values().iter().sum::<i64>();
    }
    assert_eq!(sum, 500_000_500_000);
    assert_eq!(sum_twice, 2 * sum);

    // Rows stream until the cast of 'x' fails, far into the result: the client gets the rows before it,
    // then the query's error as the call's status.
    let failing = FlightCommand::Sql {
        query: "SELECT CAST(CASE WHEN value > 900000 THEN 'x' ELSE '1' END AS BIGINT) AS n FROM generate_series(1, 1000000)"
            .into(),
    };
    let mut stream = client.do_get(Ticket::new(failing.to_bytes())).await.unwrap();
    let mut received = 0;
    let error = loop {
        match stream.try_next().await {
            Ok(Some(batch)) => received += batch.num_rows(),
            Ok(None) => panic!("the failing query ended without an error after {received} rows"),
            Err(error) => break error.to_string(),
        }
    };
    assert!(received <= 900_000, "{received} rows before the error");
    assert!(error.contains("'x'"), "{error}");
    running.stop().await;
}

/// An Arrow IPC file of scores: one row per id, at time 10 × id, score id / 8.
fn write_scores(path: &Path, ids: std::ops::Range<i64>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(
            "event_timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
        Field::new("score", DataType::Float64, true),
    ]));
    let ids: Vec<i64> = ids.collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(TimestampMicrosecondArray::from(
                ids.iter().map(|id| id * 10).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                ids.iter().map(|id| *id as f64 / 8.0).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = datafusion::arrow::ipc::writer::FileWriter::try_new(file, &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrow_source_served_from_memory_follows_its_file_when_it_is_rewritten() {
    let directory = tempfile::tempdir().unwrap();
    write_scores(&directory.path().join("scores.arrow"), 1..4);
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
    let mut definitions = parse_definitions("scores.toml", text).unwrap();
    definitions.resolve_paths(directory.path()).unwrap();
    let mut running = start(&directory.path().join("server"), definitions).await;
    let client = &mut running.client;
    let view = FlightCommand::View { name: "scores".into() };
    let sql = FlightCommand::Sql {
        query: "SELECT sum(id) AS ids, sum(score) AS scores FROM scores".into(),
    };
    let ids = |batches: &[RecordBatch]| -> Vec<i64> {
        batches
            .iter()
            .flat_map(|batch| {
                let column = batch.column_by_name("id").unwrap();
                column.as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
            })
            .collect()
    };

    // Read once, then served again from memory: the same rows, in the file's order.
    for _ in 0..2 {
        assert_eq!(ids(&fetch(client, &view).await), vec![1, 2, 3]);
        let totals = fetch(client, &sql).await;
        assert_eq!(float_column(&totals[0], "scores").value(0), 0.75);
    }

    // Rewritten in place with other rows: the next DoGet and query serve the new file.
    write_scores(&directory.path().join("scores.arrow"), 10..15);
    assert_eq!(ids(&fetch(client, &view).await), vec![10, 11, 12, 13, 14]);
    let totals = fetch(client, &sql).await;
    let summed = totals[0].column_by_name("ids").unwrap();
    assert_eq!(summed.as_any().downcast_ref::<Int64Array>().unwrap().value(0), 60);
    running.stop().await;
}

#[test]
fn a_batch_sliced_from_a_larger_buffer_is_split_by_the_bytes_its_rows_hold() {
    // Nine float64 columns sliced from arrays ten times as long, as every batch read from an Arrow IPC file
    // slices the one buffer its body was read into.
    let rows = 65_536;
    let schema = Arc::new(Schema::new(
        (0..9)
            .map(|index| Field::new(format!("f{index}"), DataType::Float64, false))
            .collect::<Vec<_>>(),
    ));
    let columns: Vec<ArrayRef> = (0..9)
        .map(|column| {
            let whole = Float64Array::from_iter_values((0..rows * 10).map(|row| (row * 9 + column) as f64));
            Arc::new(whole.slice(rows, rows)) as ArrayRef
        })
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    // What arrow-flight's own split counts: every column's whole buffer, 47 MB for 4.7 MB of rows.
    let counted: usize = batch
        .columns()
        .iter()
        .map(|column| column.get_buffer_memory_size())
        .sum();
    assert!(counted >= 9 * rows * 10 * 8, "{counted}");

    let pieces = split_for_flight(batch.clone(), 2 << 20);
    assert_eq!(pieces.len(), 3, "4.7 MB of rows in pieces of at most 2 MiB");
    for piece in &pieces {
        let bytes: usize = piece
            .columns()
            .iter()
            .map(|column| column.to_data().get_slice_memory_size().unwrap())
            .sum();
        assert!(bytes <= 2 << 20, "{bytes}");
    }
    assert_eq!(
        datafusion::arrow::compute::concat_batches(&schema, &pieces).unwrap(),
        batch,
        "the pieces are the batch's rows, in order"
    );

    // A batch that fits goes whole, an empty one not at all, and no piece is smaller than a row.
    assert_eq!(split_for_flight(batch.slice(10, 1000), 2 << 20).len(), 1);
    assert!(split_for_flight(batch.slice(0, 0), 2 << 20).is_empty());
    let tiny = split_for_flight(batch.slice(0, 2), 8);
    assert_eq!(tiny.iter().map(RecordBatch::num_rows).collect::<Vec<_>>(), [1, 1]);
}
