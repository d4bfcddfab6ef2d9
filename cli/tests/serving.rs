//! The serving tier end to end: a digits MLP trained on the cluster and registered, given the alias
//! `champion`, served by `kiln serve --model models:/digits@champion` over the Open Inference Protocol, and
//! driven over REST by hand and by the stock Triton clients (tritonclient.http and tritonclient.grpc).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_cluster_tests::{Cluster, free_port, http_json, http_text, stock_python};
use serde_json::json;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// A `kiln serve` process, killed (by its id) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn digits_csv() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/data/digits.csv")
        .canonicalize()
        .unwrap()
}

/// The first `rows` rows of the digits CSV: (features, labels).
fn digits_rows(rows: usize) -> (Vec<Vec<f32>>, Vec<i64>) {
    let text = std::fs::read_to_string(digits_csv()).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let label = header.iter().position(|name| *name == "digit").unwrap();
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for line in lines.take(rows) {
        let values: Vec<f32> = line.split(',').map(|value| value.parse().unwrap()).collect();
        labels.push(values[label] as i64);
        features.push(
            values
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != label)
                .map(|(_, value)| *value)
                .collect(),
        );
    }
    (features, labels)
}

/// Starts `kiln serve ARGS` on free ports, logging to `directory/serve.log`; waits until it is ready.
/// Returns the process and its REST and gRPC addresses.
async fn serve(args: &[&str], directory: &Path) -> (Server, String, String) {
    let (rest, grpc) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let log_path = directory.join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = Server(
        Command::new(KILN)
            .arg("serve")
            .args(args)
            .args(["--http-listen", &rest, "--grpc-listen", &grpc])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(&rest).is_ok() && http_json(&rest, "GET", "/v2/health/ready", "").0 == 200 {
            return (server, rest, grpc);
        }
        assert!(
            Instant::now() < deadline,
            "kiln serve did not become ready: {}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

type LoggedRow = (String, String, String, Option<String>);

/// The rows of the request-log files under `directory` as (request id, status, inputs, outputs), once there
/// are at least `expected` (waiting up to 20 s for the log's next flush).
async fn logged_rows(directory: &Path, expected: usize) -> Vec<LoggedRow> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = read_logged_rows(directory);
        if rows.len() >= expected || Instant::now() > deadline {
            assert!(
                rows.len() >= expected,
                "{} of {expected} rows logged: {rows:?}",
                rows.len()
            );
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The rows of the request-log files directly in `directory`.
fn read_logged_rows(directory: &Path) -> Vec<LoggedRow> {
    use arrow_array::{Array, StringArray};
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(directory).into_iter().flatten() {
        let file = std::fs::File::open(entry.unwrap().path()).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            let (ids, statuses, inputs, outputs) = (
                column("request_id"),
                column("status"),
                column("inputs"),
                column("outputs"),
            );
            for row in 0..batch.num_rows() {
                rows.push((
                    ids.value(row).to_string(),
                    statuses.value(row).to_string(),
                    inputs.value(row).to_string(),
                    (!outputs.is_null(row)).then(|| outputs.value(row).to_string()),
                ));
            }
        }
    }
    rows
}

/// Runs a test script with the stock clients' Python; it must end by printing `last_line`.
/// Trains the digits MLP for `epochs` on the cluster, which registers it as `digits` version 1, and points
/// the alias `champion` at it.
fn train_digits(cluster: &Cluster, directory: &Path, epochs: u32) {
    let tracking = cluster.members[&1].tracking_addr.clone();
    let spec = include_str!("../../examples/jobs/digits-mlp.toml")
        .replace(
            "dataset = \"examples/data/digits.csv\"",
            &format!("dataset = {:?}", digits_csv().display().to_string()),
        )
        .replace("epochs = 30", &format!("epochs = {epochs}"));
    let file = directory.join("digits.toml");
    std::fs::write(&file, spec).unwrap();
    let submitted = cluster.cli(&["submit", file.to_str().unwrap()]).unwrap();
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let job = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    let waited = cluster.cli(&["jobs", "wait", &job, "--max-wait", "180s"]).unwrap();
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stdout));
    let aliased = cluster
        .cli(&["models", "alias", "digits", "1", "champion", "--tracking", &tracking])
        .unwrap();
    assert!(aliased.status.success(), "{}", String::from_utf8_lossy(&aliased.stderr));
}

/// Registers digits version 1's files again, as version 2 of the same run.
fn register_version_2(cluster: &Cluster, tracking: &str) {
    let (status, version) = http_json(
        tracking,
        "GET",
        "/api/2.0/mlflow/model-versions/get?name=digits&version=1",
        "",
    );
    assert_eq!(status, 200, "{version}");
    let source = version["model_version"]["source"].as_str().unwrap();
    let run = version["model_version"]["run_id"].as_str().unwrap();
    let registered = cluster
        .cli(&[
            "models",
            "register",
            "digits",
            source,
            "--run",
            run,
            "--tracking",
            tracking,
        ])
        .unwrap();
    assert!(
        registered.status.success(),
        "{}",
        String::from_utf8_lossy(&registered.stderr)
    );
}

/// Three clients sending `one_row` to `rest` until `stop` (at most 90 s): each answers the model versions
/// that answered it, in order, and its failures.
fn version_clients(
    rest: &str,
    one_row: &str,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(Vec<String>, Vec<String>)>> {
    (0..3)
        .map(|_| {
            let (stop, rest, one_row) = (stop.clone(), rest.to_string(), one_row.to_string());
            std::thread::spawn(move || {
                let (mut versions, mut failures) = (Vec::new(), Vec::new());
                let deadline = Instant::now() + Duration::from_secs(90);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && versions.len() < 1_000_000 {
                    let (status, answer) = http_json(&rest, "POST", "/v2/models/digits/infer", &one_row);
                    match status {
                        200 => versions.push(answer["model_version"].as_str().unwrap().to_string()),
                        _ => failures.push(format!("{status} {answer}")),
                    }
                }
                (versions, failures)
            })
        })
        .collect()
}

fn python_script(python: &str, script: &str, args: &[&str], last_line: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script);
    let output = Command::new(python).arg(&script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.trim_end().ends_with(last_line), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_model_is_served_over_the_open_inference_protocol_to_stock_triton_clients() {
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    cluster.start_worker(1, 2, &[]).unwrap();
    cluster.wait_for_workers(1, Duration::from_secs(20)).await.unwrap();
    let tracking = cluster.members[&1].tracking_addr.clone();

    // Train and register digits version 1, then point the alias at it.
    let directory = tempfile::tempdir().unwrap();
    train_digits(&cluster, directory.path(), 8);

    // A source that names nothing the registry has is refused before anything listens.
    let refused = Command::new(KILN)
        .args(["serve", "--model", "models:/digits@nobody", "--tracking", &tracking])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("alias 'nobody'"), "{message}");

    let request_log = directory.path().join("request-log").display().to_string();
    let (_server, rest, grpc) = serve(
        &[
            "--model",
            "models:/digits@champion",
            "--input-name",
            "pixels",
            "--tracking",
            &tracking,
            "--request-log",
            &request_log,
            "--request-log-interval",
            "200ms",
            "--follow-interval",
            "200ms",
        ],
        directory.path(),
    )
    .await;

    // Metadata and inference over REST with JSON tensors, as the protocol's specification writes them.
    let (status, metadata) = http_json(&rest, "GET", "/v2/models/digits", "");
    assert_eq!(status, 200, "{metadata}");
    assert_eq!(metadata["versions"], json!(["1"]));
    assert_eq!(
        metadata["inputs"],
        json!([{ "name": "pixels", "datatype": "FP32", "shape": [-1, 64] }])
    );
    let (features, labels) = digits_rows(50);
    let flat: Vec<f32> = features.concat();
    let request = json!({
        "id": "by-hand",
        "inputs": [{ "name": "pixels", "shape": [50, 64], "datatype": "FP32", "data": flat }],
        "outputs": [{ "name": "label" }],
    });
    let (status, answer) = http_json(&rest, "POST", "/v2/models/digits/infer", &request.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], "by-hand");
    assert_eq!(answer["model_version"], "1");
    let outputs = answer["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "only the requested output: {answer}");
    assert_eq!(outputs[0]["shape"], json!([50]));
    let predicted: Vec<i64> = outputs[0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|value| value.as_i64().unwrap())
        .collect();
    let correct = predicted.iter().zip(&labels).filter(|(a, b)| a == b).count();
    assert!(correct >= 42, "{correct} of 50 right");

    // Bad requests get the protocol's error object naming what is wrong, and change nothing.
    let cases = [
        (
            json!({ "inputs": [{ "name": "pixels", "shape": [1, 63], "datatype": "FP32", "data": vec![0.0; 63] }] }),
            400,
            "input 'pixels' has shape [1, 63]; model 'digits' expects [-1, 64] (-1: any size)",
        ),
        (
            json!({ "inputs": [{ "name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 60] }] }),
            400,
            "tensor 'pixels' of shape [1, 64] and datatype FP32 needs 256 bytes; 240 were given",
        ),
        (
            json!({ "inputs": [{ "name": "image", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 64] }] }),
            400,
            "model 'digits' has no input 'image'; its inputs are pixels (FP32 [-1, 64])",
        ),
        (
            json!({ "inputs": [{ "name": "pixels", "shape": [1, 64], "datatype": "FLOAT", "data": vec![0.0; 64] }] }),
            400,
            "input 'pixels': datatype 'FLOAT' is not one of BOOL",
        ),
        (json!({ "inputs": [] }), 400, "input 'pixels' is missing"),
    ];
    for (request, expected_status, expected) in cases {
        let (status, answer) = http_json(&rest, "POST", "/v2/models/digits/infer", &request.to_string());
        assert_eq!(status, expected_status, "{answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(expected), "{message}");
    }
    let (status, answer) = http_json(&rest, "POST", "/v2/models/digits/infer", "{not json");
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("the body is not an inference request")
    );
    let (status, answer) = http_json(&rest, "GET", "/v2/models/mnist", "");
    assert_eq!(status, 404);
    assert_eq!(
        answer["error"],
        "no model named 'mnist' is served here (serving: digits)"
    );

    let (status, metrics) = http_text(&rest, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("kiln_serving_requests_total{model=\"digits\",version=\"1\",protocol=\"rest\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "kiln_serving_errors_total{model=\"digits\",version=\"1\",protocol=\"rest\",reason=\"invalid_input\"} 6"
        ),
        "{metrics}"
    );

    // Every request was logged as Parquet: the good one with its tensors, the refused ones with the reason.
    let rows = logged_rows(&directory.path().join("request-log/request-logs/digits/1"), 7).await;
    let by_hand = rows
        .iter()
        .find(|row| row.0 == "by-hand")
        .expect("the request with id by-hand");
    assert_eq!(by_hand.1, "ok");
    assert!(
        by_hand.2.starts_with(r#"{"pixels":{"data":[0.0,0.0,5.0"#),
        "{}",
        by_hand.2
    );
    assert!(by_hand.3.as_deref().unwrap().starts_with(r#"{"label":{"data":[0,1,2"#));
    let refused = rows.iter().filter(|row| row.1 == "invalid_input").count();
    assert_eq!(refused, 6, "{rows:?}");

    // The example deployment: the same model with top-3 labels added to its outputs.
    let deployment = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deployments/digits.toml");
    let (deployed, deployed_rest, _) = serve(
        &["--deployment", deployment.to_str().unwrap(), "--tracking", &tracking],
        directory.path(),
    )
    .await;
    let request = json!({
        "inputs": [{ "name": "pixels", "shape": [3, 64], "datatype": "FP32", "data": features[..3].concat() }],
        "outputs": [{ "name": "top_k_labels" }, { "name": "top_k_scores" }],
    });
    let (status, answer) = http_json(&deployed_rest, "POST", "/v2/models/digits/infer", &request.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["shape"], json!([3, 3]));
    let labels = answer["outputs"][0]["data"].as_array().unwrap();
    assert_eq!([&labels[0], &labels[3], &labels[6]], ["zero", "one", "two"], "{answer}");
    let scores: Vec<f64> = answer["outputs"][1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|value| value.as_f64().unwrap())
        .collect();
    assert!(
        scores.chunks(3).all(|row| row[0] >= row[1] && row[1] >= row[2]),
        "{scores:?}"
    );
    drop(deployed);

    // The alias moves to a new version while clients send requests: none fails, and each client's answers
    // switch from version 1 to version 2 once and for all.
    register_version_2(&cluster, &tracking);
    let stop = Arc::new(AtomicBool::new(false));
    let one_row = json!({
        "inputs": [{ "name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": features[0] }],
    })
    .to_string();
    let clients = version_clients(&rest, &one_row, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moved = cluster
        .cli(&["models", "alias", "digits", "2", "champion", "--tracking", &tracking])
        .unwrap();
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_json(&rest, "GET", "/v2/models/digits", "").1["versions"] != json!(["2"]) {
        assert!(
            Instant::now() < deadline,
            "the replica did not follow the alias to version 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let (versions, failures) = client.join().unwrap();
        assert!(failures.is_empty(), "requests failed across the switch: {failures:?}");
        let switched = versions
            .iter()
            .position(|version| version == "2")
            .expect("answers from version 2");
        assert!(switched > 0, "answers from version 1 before the switch");
        assert!(
            versions[..switched].iter().all(|version| version == "1")
                && versions[switched..].iter().all(|version| version == "2"),
            "one switch, never back: {versions:?}"
        );
    }

    let Some(python) = stock_python() else { return };
    let csv = digits_csv().display().to_string();
    python_script(
        &python,
        "inference_clients.py",
        &[&rest, &grpc, "digits", &csv],
        "all inference checks passed",
    );
    python_script(
        &python,
        "kserve_clients.py",
        &[&rest, &grpc, "digits", &csv],
        "all kserve client checks passed",
    );
}

/// Whether the kiln under test runs ONNX models. `cargo test --workspace` (the README's test command, and CI)
/// builds it with kiln-serving's default feature `onnx`; `cargo test -p kiln` alone builds it without, as
/// `cargo build -p kiln` does, and the ONNX tests are then skipped (outside CI) for the refusal test below.
fn onnx_built() -> bool {
    if !kiln_serving::ONNX {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs `cargo test --workspace`, which builds kiln with ONNX"
        );
        eprintln!("skipped: this kiln was built without the feature onnx (run cargo test --workspace)");
    }
    kiln_serving::ONNX
}

/// A kiln built without the `onnx` feature refuses an ONNX model with an error that says how to build one
/// that serves it, and starts nothing.
#[test]
fn without_the_onnx_feature_an_onnx_model_is_refused_saying_how_to_build_it() {
    let directory = tempfile::tempdir().unwrap();
    let model = directory.path().join("model.onnx");
    std::fs::write(&model, b"any bytes: a build without tract never reads them").unwrap();
    let answer = Command::new(KILN)
        .args(["serve", "--model", model.to_str().unwrap()])
        .args(["--http-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&answer.stderr);
    assert!(!answer.status.success(), "{message}");
    assert!(message.contains("model.onnx"), "{message}");
    if kiln_serving::ONNX {
        // tract read the bytes and refused them as a graph.
        assert!(!message.contains("without ONNX"), "{message}");
    } else {
        assert!(
            message.contains("built without ONNX support") && message.contains("--features onnx"),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_onnx_model_from_scikit_learn_registered_through_mlflow_serves_what_onnxruntime_computes() {
    if !onnx_built() {
        return;
    }
    let Some(python) = stock_python() else { return };
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let tracking = cluster.members[&1].tracking_addr.clone();
    let directory = tempfile::tempdir().unwrap();
    let model_directory = directory.path().display().to_string();
    let uri = format!("http://{tracking}");
    python_script(
        &python,
        "onnx_model.py",
        &["make", &model_directory, &uri],
        "all onnx checks passed",
    );
    // Version 2 is the same graph logged as an MLflow model (mlflow.onnx.log_model): its source is the
    // logged model (models:/m-ID), and the registry read its signature and flavors from its MLmodel file.
    let shown = Command::new(KILN)
        .args(["models", "show", "sk-digits", "--json", "--tracking", &tracking])
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let version = shown["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|version| version["version"] == "2")
        .unwrap_or_else(|| panic!("no version 2: {shown:#}"));
    assert!(
        version["source"].as_str().unwrap().starts_with("models:/m-"),
        "{version:#}"
    );
    let tag = |key: &str| -> serde_json::Value {
        let value = version["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|tag| tag["key"] == key)
            .unwrap_or_else(|| panic!("no tag {key}: {version:#}"))["value"]
            .as_str()
            .unwrap()
            .to_string();
        serde_json::from_str(&value).unwrap()
    };
    let signature = tag("kiln.signature");
    assert_eq!(signature["inputs"][0]["name"], "pixels", "{signature}");
    assert_eq!(
        signature["inputs"][0]["tensor-spec"]["shape"],
        serde_json::json!([-1, 64]),
        "{signature}"
    );
    assert_eq!(signature["outputs"][1]["name"], "probabilities", "{signature}");
    let runtime = tag("kiln.runtime");
    assert_eq!(runtime["framework"], "onnx", "{runtime}");
    assert_eq!(
        runtime["flavors"],
        serde_json::json!(["onnx", "python_function"]),
        "{runtime}"
    );
    // Version 1 was a plain directory of files, with no MLmodel: no such tags.
    let first = shown["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|version| version["version"] == "1")
        .unwrap();
    assert!(!first["tags"].to_string().contains("kiln.runtime"), "{first:#}");
    // Both versions serve what onnxruntime computes: version 1's files and version 2's MLflow model.
    for version in ["1", "2"] {
        let model = format!("models:/sk-digits/{version}");
        let (_server, rest, grpc) = serve(&["--model", &model, "--tracking", &tracking], directory.path()).await;
        python_script(
            &python,
            "onnx_model.py",
            &["check", &rest, &grpc, &model_directory],
            "all onnx checks passed",
        );
    }
    // A file that is not an ONNX graph is refused at load, naming it.
    let broken = directory.path().join("broken.onnx");
    std::fs::write(&broken, b"not a graph").unwrap();
    let refused = Command::new(KILN)
        .args([
            "serve",
            "--model",
            broken.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--grpc-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("broken.onnx"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_models_with_fp16_and_string_tensors_serve_what_onnxruntime_computes() {
    if !onnx_built() {
        return;
    }
    let Some(python) = stock_python() else { return };
    let directory = tempfile::tempdir().unwrap();
    let model_directory = directory.path().display().to_string();
    python_script(
        &python,
        "onnx_model.py",
        &["make-typed", &model_directory],
        "all onnx checks passed",
    );
    let half = format!("half={}", directory.path().join("fp16.onnx").display());
    let colors = format!("colors={}", directory.path().join("strings.onnx").display());
    let (_server, rest, grpc) = serve(&["--model", &half, "--model", &colors], directory.path()).await;
    python_script(
        &python,
        "onnx_model.py",
        &["check-typed", &rest, &grpc, &model_directory],
        "all onnx checks passed",
    );
}

/// A one-coordinator cluster with its tracking API and one worker per entry of `cpus` (its CPU slots), started
/// one after the other so that worker process N is the Nth registered; returns it and the workers' ids.
async fn cluster_with_workers(cpus: &[u32]) -> (Cluster, Vec<u64>) {
    let mut cluster = Cluster::new(Path::new(KILN), 1, &["--worker-lease", "2s"]).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let mut ids = Vec::new();
    for (index, slots) in cpus.iter().enumerate() {
        cluster.start_worker(index as u32 + 1, *slots, &[]).unwrap();
        let workers = cluster
            .wait_for_workers(index + 1, Duration::from_secs(20))
            .await
            .unwrap();
        let new = workers.iter().map(|worker| worker.id).find(|id| !ids.contains(id));
        ids.push(new.unwrap());
    }
    (cluster, ids)
}

/// The cluster's serving ports: `kiln router` in front of every deployment, on free ports, logging to
/// `directory/router.log`. Returns the process and its REST and gRPC addresses.
fn start_router(cluster: &Cluster, directory: &Path) -> (Server, String, String) {
    let (rest, grpc) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let log = std::fs::File::create(directory.join("router.log")).unwrap();
    let router = Server(
        Command::new(KILN)
            .args(["router", "--coordinator", &cluster.addresses()])
            .args(["--http-listen", &rest, "--grpc-listen", &grpc])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    (router, rest, grpc)
}

/// Waits (up to 10 s) until the router at `rest` has a ready replica of `model`.
async fn wait_routed(rest: &str, model: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_json(rest, "GET", &format!("/v2/models/{model}/ready"), "").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the router did not learn of deployment '{model}'"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `kiln deployments show NAME --json`.
fn deployment_state(cluster: &Cluster, name: &str) -> serde_json::Value {
    let shown = cluster.cli(&["deployments", "show", name, "--json"]).unwrap();
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    serde_json::from_slice(&shown.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_runs_replicas_on_the_workers_behind_the_router_and_outlives_a_lost_worker() {
    let (mut cluster, workers) = cluster_with_workers(&[2, 2]).await;
    let first = workers[0];
    let directory = tempfile::tempdir().unwrap();
    train_digits(&cluster, directory.path(), 4);

    // The cluster's serving ports: a router in front of every deployment.
    let (_router, rest, grpc) = start_router(&cluster, directory.path());

    // A file the coordinator cannot use is refused with its place, and nothing is deployed.
    let deployment = |name: &str, model: &str, max: u32| {
        format!(
            "kind = \"deployment\"\nname = \"{name}\"\nmodel = \"{model}\"\ninput_name = \"pixels\"\nfollow_interval = \"300ms\"\n\n[replicas]\nmin = 2\nmax = {max}\n\n[resources]\ncpus = 1\n"
        )
    };
    let bad = directory.path().join("bad.toml");
    std::fs::write(&bad, deployment("digits", "models:/digits@champion", 1)).unwrap();
    let refused = cluster.cli(&["deploy", bad.to_str().unwrap()]).unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("bad.toml:9:7") && message.contains("'replicas.max' is 1; expected replicas.min (2)"),
        "{message}"
    );
    std::fs::write(&bad, "name = \"digits\"\nmodel = \"models:/digits@champion\"\n").unwrap();
    let refused = cluster.cli(&["deploy", bad.to_str().unwrap()]).unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("it needs kind = \"deployment\""), "{message}");
    let listed = cluster.cli(&["deployments", "list", "--json"]).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&listed.stdout).unwrap(),
        json!([])
    );

    // A model the registry does not have: the replicas fail before they are ready, and the deployment
    // fails with their reason instead of starting replicas forever.
    let ghost = directory.path().join("ghost.toml");
    std::fs::write(&ghost, deployment("ghost", "models:/digits@nobody", 2)).unwrap();
    let failed = cluster
        .cli(&["deploy", ghost.to_str().unwrap(), "--wait", "90s"])
        .unwrap();
    assert!(!failed.status.success());
    let message = String::from_utf8_lossy(&failed.stderr);
    assert!(
        message.contains("deployment 'ghost' failed") && message.contains("alias 'nobody'"),
        "{message}"
    );
    let ghost = deployment_state(&cluster, "ghost");
    let made = ghost["replicas"].as_array().unwrap().len();
    assert!((3..=5).contains(&made), "{made} replicas were started: {ghost}");

    // The digits model on two replicas, one per worker.
    let file = directory.path().join("deployment.toml");
    std::fs::write(&file, deployment("digits", "models:/digits@champion", 3)).unwrap();
    let deployed = cluster
        .cli(&["deploy", file.to_str().unwrap(), "--wait", "90s"])
        .unwrap();
    assert!(
        deployed.status.success(),
        "{}{}",
        String::from_utf8_lossy(&deployed.stdout),
        String::from_utf8_lossy(&deployed.stderr)
    );
    let again = cluster.cli(&["deploy", file.to_str().unwrap()]).unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("runs this file already"));
    let state = deployment_state(&cluster, "digits");
    assert_eq!(
        (state["replicas_ready"].as_u64(), state["versions"].clone()),
        (Some(2), json!(["1"]))
    );
    let workers: Vec<u64> = state["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|replica| replica["worker"].as_u64().unwrap())
        .collect();
    assert_ne!(workers[0], workers[1], "replicas spread over the workers: {state}");

    // Through the router's REST port, like any served model.
    wait_routed(&rest, "digits").await;
    let (features, labels) = digits_rows(20);
    let request = json!({
        "inputs": [{ "name": "pixels", "shape": [20, 64], "datatype": "FP32", "data": features.concat() }],
        "outputs": [{ "name": "label" }],
    });
    let (status, answer) = http_json(&rest, "POST", "/v2/models/digits/infer", &request.to_string());
    assert_eq!(status, 200, "{answer}");
    let predicted = answer["outputs"][0]["data"].as_array().unwrap();
    let correct = predicted
        .iter()
        .zip(&labels)
        .filter(|(a, b)| a.as_i64() == Some(**b))
        .count();
    assert!(correct >= 15, "{correct} of 20 right");
    let (status, answer) = http_json(&rest, "POST", "/v2/models/mnist/infer", &request.to_string());
    assert_eq!(status, 404);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("no model named 'mnist' is deployed (deployed: digits)")
    );

    // Under load from three clients, the worker of replica 0 is killed: a request may fail once, with a
    // retryable 503, and its retry succeeds; a replacement replica starts on the other worker.
    let stop = Arc::new(AtomicBool::new(false));
    let one_row = json!({
        "inputs": [{ "name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": features[0] }],
    })
    .to_string();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, rest, one_row) = (stop.clone(), rest.clone(), one_row.clone());
            std::thread::spawn(move || {
                let (mut answered, mut retried, mut failed_twice) = (0usize, Vec::new(), Vec::new());
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && answered < 1_000_000 {
                    let (status, answer) = http_json(&rest, "POST", "/v2/models/digits/infer", &one_row);
                    if status == 200 {
                        answered += 1;
                        continue;
                    }
                    retried.push(format!("{status} {answer}"));
                    let (again, answer) = http_json(&rest, "POST", "/v2/models/digits/infer", &one_row);
                    if again == 200 {
                        answered += 1;
                    } else {
                        failed_twice.push(format!("{again} {answer}"));
                    }
                }
                (answered, retried, failed_twice)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lost = state["replicas"][0]["job"].as_u64().unwrap();
    cluster.kill_worker(if workers[0] == first { 1 } else { 2 }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = deployment_state(&cluster, "digits");
        let replicas = now["replicas"].as_array().unwrap();
        let replaced = replicas
            .iter()
            .any(|replica| replica["job"] == lost && replica["state"] != "running");
        if replaced && now["replicas_ready"] == 2 {
            assert!(replicas.len() >= 3, "{now}");
            break;
        }
        assert!(Instant::now() < deadline, "the deployment did not recover: {now}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = cluster.cli(&["deployments", "list", "--json"]).unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let digits = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|deployment| deployment["name"] == "digits" && deployment["state"] == "running")
        .unwrap();
    assert!(digits["requests_per_second"].as_f64().unwrap() > 0.0, "{digits}");
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for client in clients {
        let (answered, retried, failed_twice) = client.join().unwrap();
        assert!(failed_twice.is_empty(), "requests failed twice: {failed_twice:?}");
        assert!(
            retried.iter().all(|failure| failure.starts_with("503")),
            "failures must be retryable: {retried:?}"
        );
        total += answered;
        eprintln!("a client: {answered} answered, {} retried: {retried:?}", retried.len());
    }
    assert!(total > 100, "{total} requests answered");
    // The router's own metrics: what it answered, per deployment, and the ready replicas it knows.
    let (status, metrics) = http_text(&rest, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("kiln_router_requests_total{model=\"digits\",protocol=\"rest\",outcome=\"answered\"}")
            && metrics.contains("kiln_router_replicas{model=\"digits\"} 2"),
        "{metrics}"
    );

    // The stock Triton and KServe clients, over both of the router's ports.
    if let Some(python) = stock_python() {
        let csv = digits_csv().display().to_string();
        python_script(
            &python,
            "inference_clients.py",
            &[&rest, &grpc, "digits", &csv, "-"],
            "all inference checks passed",
        );
        python_script(
            &python,
            "kserve_clients.py",
            &[&rest, &grpc, "digits", &csv],
            "all kserve client checks passed",
        );
    }

    // The alias moves to a new version while clients send through the router: no request fails, and both
    // replicas roll to it.
    let tracking = cluster.members[&1].tracking_addr.clone();
    register_version_2(&cluster, &tracking);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = version_clients(&rest, &one_row, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moved = cluster
        .cli(&["models", "alias", "digits", "2", "champion", "--tracking", &tracking])
        .unwrap();
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = deployment_state(&cluster, "digits");
        if now["versions"] == json!(["2"]) && now["replicas_ready"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas did not roll to version 2: {now}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let (versions, failures) = client.join().unwrap();
        assert!(failures.is_empty(), "requests failed across the roll: {failures:?}");
        assert_eq!(
            (
                versions.first().map(String::as_str),
                versions.last().map(String::as_str)
            ),
            (Some("1"), Some("2")),
            "{} answers",
            versions.len()
        );
    }

    // Deleted: its replicas stop and the router forgets it.
    let deleted = cluster.cli(&["deployments", "delete", "digits"]).unwrap();
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_json(&rest, "GET", "/v2/models/digits/ready", "").0 != 404 {
        assert!(
            Instant::now() < deadline,
            "the router still routes to the deleted deployment"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = deployment_state(&cluster, "digits");
    assert_eq!(state["state"], "cancelled");
    assert!(
        state["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|replica| replica["state"] != "running" && replica["state"] != "queued"),
        "{state}"
    );
}

/// Downloads the request-log files of run `run` (its artifacts under `requests/`) into `directory`, flat;
/// returns their paths in the run.
fn fetch_request_logs(cluster: &Cluster, tracking: &str, run: &str, directory: &Path) -> Vec<String> {
    let listed = cluster
        .cli(&[
            "artifacts",
            "list",
            run,
            "--path",
            "requests",
            "--json",
            "--tracking",
            tracking,
        ])
        .unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mut paths = Vec::new();
    for file in listed.as_array().unwrap() {
        let path = file["path"].as_str().unwrap().to_string();
        let out = directory.join(path.replace('/', "_"));
        if !out.exists() {
            let fetched = cluster
                .cli(&[
                    "artifacts",
                    "get",
                    run,
                    &path,
                    "--out",
                    out.to_str().unwrap(),
                    "--tracking",
                    tracking,
                ])
                .unwrap();
            assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
        }
        paths.push(path);
    }
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_follows_its_load_between_min_and_max_and_logs_every_request_into_its_run() {
    let (cluster, _) = cluster_with_workers(&[4]).await;
    let directory = tempfile::tempdir().unwrap();
    train_digits(&cluster, directory.path(), 1);
    let tracking = cluster.members[&1].tracking_addr.clone();

    let (_router, rest, _) = start_router(&cluster, directory.path());

    // One request at a time per replica, so that a load of many clients queues; one more replica while more
    // than one request waits on average, one fewer after 2 s without.
    let file = directory.path().join("deployment.toml");
    let deployment = |model: &str, postprocess: &str, target_queue_depth: u32| {
        format!(
            "kind = \"deployment\"\nname = \"digits\"\nmodel = \"{model}\"\ninput_name = \"pixels\"\n{postprocess}\n\
             [batching]\nmax_batch_size = 1\nmax_wait = \"0ms\"\ninstances = 1\n\n\
             [replicas]\nmin = 1\nmax = 2\ntarget_queue_depth = {target_queue_depth}\nscale_down_delay = \"2s\"\n\n\
             [resources]\ncpus = 1\n"
        )
    };
    std::fs::write(&file, deployment("models:/digits@champion", "", 1)).unwrap();
    let deployed = cluster
        .cli(&["deploy", file.to_str().unwrap(), "--wait", "90s"])
        .unwrap();
    assert!(
        deployed.status.success(),
        "{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    let state = deployment_state(&cluster, "digits");
    assert_eq!(
        (state["replicas_live"].as_u64(), state["replicas_ready"].as_u64()),
        (Some(1), Some(1))
    );
    let run = state["run"].as_str().unwrap().to_string();
    wait_routed(&rest, "digits").await;

    // Twelve clients: the queue grows past the target and a second replica is started; both serve.
    let (features, _) = digits_rows(1);
    let one_row = json!({
        "inputs": [{ "name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": features[0] }],
    })
    .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let (stop, rest, one_row) = (stop.clone(), rest.clone(), one_row.clone());
            std::thread::spawn(move || {
                let (mut answered, mut failures) = (0usize, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && answered < 1_000_000 {
                    match http_json(&rest, "POST", "/v2/models/digits/infer", &one_row) {
                        (200, _) => answered += 1,
                        (status, answer) => failures.push(format!("{status} {answer}")),
                    }
                }
                (answered, failures)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = deployment_state(&cluster, "digits");
        let replicas = now["replicas"].as_array().unwrap();
        let both_served = replicas.len() == 2
            && replicas
                .iter()
                .all(|replica| replica["requests_per_second"].as_f64().is_some_and(|rate| rate > 0.0));
        if now["replicas_ready"] == 2 && both_served {
            break;
        }
        assert!(Instant::now() < deadline, "no second replica under load: {now}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, metrics) = http_text(&rest, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("kiln_router_replicas{model=\"digits\"} 2"),
        "{metrics}"
    );

    // The load stops: after the delay the newest replica is removed, and the deployment stays at its minimum.
    stop.store(true, Ordering::SeqCst);
    let mut answered = 0;
    for client in clients {
        let (count, failures) = client.join().unwrap();
        assert!(failures.is_empty(), "requests failed while scaling up: {failures:?}");
        answered += count;
    }
    assert!(answered > 50, "{answered} requests answered");
    let deadline = Instant::now() + Duration::from_secs(30);
    let scaled_down = loop {
        let now = deployment_state(&cluster, "digits");
        if now["replicas_live"] == 1 {
            break now;
        }
        assert!(Instant::now() < deadline, "the idle replica was not removed: {now}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let replicas = scaled_down["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{scaled_down}");
    assert_eq!(replicas[0]["state"], "running", "{scaled_down}");
    assert_eq!(replicas[1]["state"], "cancelled", "{scaled_down}");
    assert!(
        replicas[1]["message"].as_str().unwrap().starts_with("scaled down"),
        "{scaled_down}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(deployment_state(&cluster, "digits")["replicas_live"], 1);

    // A changed file deployed under the running name updates it in place: its replica is replaced by one of
    // the new file (which adds the top two classes to every answer) while clients send, and none fails.
    let (stop, switched) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, switched, rest, one_row) = (stop.clone(), switched.clone(), rest.clone(), one_row.clone());
            std::thread::spawn(move || {
                let (mut outputs, mut failures) = (Vec::new(), Vec::new());
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && outputs.len() < 1_000_000 {
                    match http_json(&rest, "POST", "/v2/models/digits/infer", &one_row) {
                        (200, answer) => {
                            let top_k = answer["outputs"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .any(|output| output["name"] == "top_k_indices");
                            if top_k {
                                switched.store(true, Ordering::SeqCst);
                            }
                            outputs.push(top_k);
                        }
                        (status, answer) => failures.push(format!("{status} {answer}")),
                    }
                }
                (outputs, failures)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(
        &file,
        deployment("models:/digits@champion", "postprocess = [{ top_k = 2 }]\n", 100),
    )
    .unwrap();
    let updated = cluster
        .cli(&["deploy", file.to_str().unwrap(), "--wait", "90s"])
        .unwrap();
    let said = String::from_utf8_lossy(&updated.stdout);
    assert!(
        updated.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&updated.stderr)
    );
    assert!(
        said.contains("is updating: its replicas are replaced one at a time"),
        "{said}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !switched.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "no answer from the updated replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let (outputs, failures) = client.join().unwrap();
        assert!(failures.is_empty(), "requests failed across the update: {failures:?}");
        // While the new replica is ready and the old one not yet stopped, a router sends to both, so the two
        // kinds of answer may interleave for a moment (as in any rolling update); the last are the new file's.
        assert_eq!(
            (outputs.first(), outputs.last()),
            (Some(&false), Some(&true)),
            "answers switch to the new file's outputs"
        );
        answered += outputs.len();
    }
    let rolled = deployment_state(&cluster, "digits");
    let replicas = rolled["replicas"].as_array().unwrap();
    assert_eq!(
        (rolled["replicas_live"].as_u64(), rolled["replicas_outdated"].as_u64()),
        (Some(1), Some(0)),
        "{rolled}"
    );
    assert!(
        replicas[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("replaced by the updated deployment"),
        "{rolled}"
    );
    let again = cluster.cli(&["deploy", file.to_str().unwrap()]).unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("runs this file already"));

    // A file whose model does not exist: its replicas cannot start, the deployment rolls back to the file
    // it ran, and `kiln deploy` says why; the replica of that file answered throughout.
    let working = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        deployment("models:/digits@nobody", "postprocess = [{ top_k = 2 }]\n", 100),
    )
    .unwrap();
    let refused = cluster
        .cli(&["deploy", file.to_str().unwrap(), "--wait", "120s"])
        .unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        message.contains("no longer runs this file: the update was rolled back") && message.contains("alias 'nobody'"),
        "{message}"
    );
    let state = deployment_state(&cluster, "digits");
    assert_eq!(
        (state["replicas_live"].as_u64(), state["replicas_ready"].as_u64()),
        (Some(1), Some(1)),
        "{state}"
    );
    let shown = cluster
        .cli(&["jobs", "show", &state["job"].to_string(), "--json"])
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["spec_toml"].as_str(), Some(working.as_str()), "{shown}");
    let (status, answer) = http_json(&rest, "POST", "/v2/models/digits/infer", &one_row);
    assert_eq!(status, 200, "{answer}");
    answered += 1;

    // Every answered request is in the request log, in the artifacts of the deployment's run: the removed
    // replica wrote its rows when it stopped, the other when the deployment is deleted.
    let deleted = cluster.cli(&["deployments", "delete", "digits"]).unwrap();
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    let logs = directory.path().join("request-logs");
    std::fs::create_dir(&logs).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (paths, rows) = loop {
        let paths = fetch_request_logs(&cluster, &tracking, &run, &logs);
        let rows = read_logged_rows(&logs);
        if rows.len() >= answered || Instant::now() > deadline {
            break (paths, rows);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(rows.len(), answered, "rows logged for the answered requests, each once");
    assert!(
        rows.iter()
            .all(|(_, status, _, outputs)| status == "ok" && outputs.is_some())
    );
    let mut ids: Vec<&str> = rows.iter().map(|(id, ..)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), rows.len(), "request ids are unique");
    for replica in ["requests/replica-0/digits/1/", "requests/replica-1/digits/1/"] {
        assert!(
            paths
                .iter()
                .any(|path| path.starts_with(replica) && path.ends_with(".parquet")),
            "no file under {replica}: {paths:?}"
        );
    }
    let shown = cluster.cli(&["deployments", "show", "digits"]).unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(&format!(
            "requests  logged to the artifacts of run {run}, under requests/, a file per 10000 rows of a model \
             version or every 10s"
        )),
        "{shown}"
    );
}
