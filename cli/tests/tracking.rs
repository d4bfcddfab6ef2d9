//! Experiment tracking as MLflow users run it: the stock `mlflow` client against the MLflow REST API that
//! every coordinator serves, on a three-node cluster, through a follower and across the loss of the
//! leader; and the API's errors over plain HTTP.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_cluster_tests::{Cluster, http_json as http, stock_python};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn mlflow(python: &str, mode: &str, address: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/mlflow_client.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(mode)
        .arg(format!("http://{address}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{mode}: {stdout}{stderr}");
    assert!(
        stdout.trim_end().ends_with("all mlflow checks passed"),
        "{mode}: {stdout}"
    );
}

async fn three_nodes(extra_args: &[&str]) -> (Cluster, u64) {
    let mut cluster = Cluster::new(Path::new(KILN), 3, extra_args).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    let leader = cluster.wait_for_leader(None, Duration::from_secs(20)).await.unwrap();
    (cluster, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_mlflow_client_logs_through_a_follower_and_reads_back_after_the_leader_dies() {
    let Some(python) = stock_python() else { return };
    let (mut cluster, leader) = three_nodes(&[]).await;
    let follower = *cluster.members.keys().find(|id| **id != leader).unwrap();
    let follower_tracking = cluster.members[&follower].tracking_addr.clone();
    mlflow(&python, "log", &follower_tracking);

    // The same runs through the CLI: listed (newest first), shown, compared.
    let kiln = |args: &[&str]| {
        let output = Command::new(KILN)
            .args(args)
            .args(["--tracking", &follower_tracking])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            output.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let listed: serde_json::Value =
        serde_json::from_str(&kiln(&["runs", "list", "--experiment", "digits", "--json"])).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["info"]["run_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lr-0.3", "lr-0.1"]);
    let ids: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["info"]["run_id"].as_str().unwrap().to_string())
        .collect();
    let filtered = kiln(&[
        "runs",
        "list",
        "--experiment",
        "digits",
        "--filter",
        "metrics.accuracy > 0.9",
    ]);
    assert!(
        filtered.contains("lr-0.1") && !filtered.contains("lr-0.3"),
        "{filtered}"
    );
    let shown = kiln(&["runs", "show", &ids[1]]);
    assert!(
        shown.contains("FINISHED") && shown.contains("accuracy") && shown.contains("0.9300"),
        "{shown}"
    );
    let compared: serde_json::Value =
        serde_json::from_str(&kiln(&["runs", "compare", &ids[0], &ids[1], "--json"])).unwrap();
    assert_eq!(compared[0]["params"]["lr"], "0.3", "{compared}");
    assert_eq!(compared[1]["metrics"]["accuracy"], 0.93, "{compared}");
    let table = kiln(&["runs", "compare", &ids[0], &ids[1]]);
    assert!(table.contains("param lr") && table.contains("metric loss"), "{table}");

    // The artifacts the client logged, listed with their hashes and downloaded with the hash checked.
    let artifacts: serde_json::Value = serde_json::from_str(&kiln(&["artifacts", "list", &ids[1], "--json"])).unwrap();
    let paths: Vec<&str> = artifacts
        .as_array()
        .unwrap()
        .iter()
        .map(|file| file["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["model/config.json", "model/weights.bin", "notes.txt"],
        "{artifacts}"
    );
    let weights: Vec<u8> = (0..=255u8).cycle().take(256 * 4096).collect();
    let expected_sha = sha256_hex(&weights);
    assert_eq!(artifacts[1]["sha256"], expected_sha.as_str(), "{artifacts}");
    assert_eq!(artifacts[1]["size"], 1_048_576, "{artifacts}");
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("weights.bin");
    let got = kiln(&[
        "artifacts",
        "get",
        &ids[1],
        "model/weights.bin",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(got.contains(&expected_sha), "{got}");
    assert_eq!(std::fs::read(&out).unwrap(), weights);
    let upload = scratch.path().join("extra.txt");
    std::fs::write(&upload, "more").unwrap();
    kiln(&[
        "artifacts",
        "put",
        &ids[1],
        upload.to_str().unwrap(),
        "--path",
        "extras",
    ]);
    let listed = kiln(&["artifacts", "list", &ids[1], "--path", "extras"]);
    assert!(
        listed.contains("extras/extra.txt") && listed.contains(&sha256_hex(b"more")),
        "{listed}"
    );

    // The registry the client filled, through `kiln models`.
    let models: serde_json::Value = serde_json::from_str(&kiln(&["models", "list", "--json"])).unwrap();
    assert_eq!(models[0]["name"], "digits-mlp", "{models}");
    assert_eq!(models[0]["aliases"][0]["alias"], "champion", "{models}");
    let shown = kiln(&["models", "show", "digits-mlp"]);
    assert!(shown.contains("champion") && shown.contains(&ids[1]), "{shown}");
    kiln(&["models", "alias", "digits-mlp", "1", "challenger"]);
    let shown: serde_json::Value = serde_json::from_str(&kiln(&["models", "show", "digits-mlp", "--json"])).unwrap();
    assert_eq!(
        shown["versions"][0]["aliases"],
        serde_json::json!(["challenger", "champion"]),
        "{shown}"
    );
    // The version keeps the run's metrics as they were when it was registered.
    assert_eq!(shown["versions"][0]["kiln_metrics"]["accuracy"], 0.93, "{shown}");
    let output = Command::new(KILN)
        .args(["runs", "list", "--experiment", "nope", "--tracking", &follower_tracking])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("no experiment is named 'nope'"),
        "{stderr}"
    );

    cluster.kill(leader).unwrap();
    cluster
        .wait_for_leader(Some(leader), Duration::from_secs(20))
        .await
        .unwrap();
    let survivor = *cluster
        .members
        .keys()
        .find(|id| **id != leader && **id != follower)
        .unwrap();
    mlflow(&python, "check", &cluster.members[&survivor].tracking_addr.clone());
    cluster.kill_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_answers_mlflow_error_codes_that_name_the_problem() {
    let (mut cluster, leader) = three_nodes(&["--artifact-max-bytes", "4096"]).await;
    let address = cluster.members[&leader].tracking_addr.clone();
    let api = "/api/2.0/mlflow";
    let (status, body) = http(
        &address,
        "POST",
        &format!("{api}/experiments/create"),
        r#"{"name": "e"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let experiment = body["experiment_id"].as_str().unwrap().to_string();
    let cases = [
        (
            "GET",
            format!("{api}/runs/get?run_id={}", "0".repeat(32)),
            String::new(),
            404,
            "RESOURCE_DOES_NOT_EXIST",
            "no run has id",
        ),
        (
            "POST",
            format!("{api}/experiments/create"),
            r#"{"name": "e"}"#.into(),
            400,
            "RESOURCE_ALREADY_EXISTS",
            "already exists",
        ),
        (
            "POST",
            format!("{api}/experiments/create"),
            "{}".into(),
            400,
            "INVALID_PARAMETER_VALUE",
            "'name' is missing",
        ),
        (
            "POST",
            format!("{api}/experiments/create"),
            "[1]".into(),
            400,
            "INVALID_PARAMETER_VALUE",
            "expected a JSON object",
        ),
        (
            "POST",
            format!("{api}/runs/create"),
            r#"{"experiment_id": "42"}"#.into(),
            404,
            "RESOURCE_DOES_NOT_EXIST",
            "no experiment has id '42'",
        ),
        (
            "POST",
            format!("{api}/runs/search"),
            format!(r#"{{"experiment_ids": ["{experiment}"], "filter": "metrics.a > 'x'"}}"#),
            400,
            "INVALID_PARAMETER_VALUE",
            "expected a number",
        ),
        (
            "POST",
            format!("{api}/runs/update"),
            format!(r#"{{"run_id": "{}", "status": "DONE"}}"#, "0".repeat(32)),
            400,
            "INVALID_PARAMETER_VALUE",
            "expected RUNNING, SCHEDULED, FINISHED, FAILED or KILLED",
        ),
        (
            "GET",
            format!("{api}/model-versions/get?name=nope&version=1"),
            String::new(),
            404,
            "RESOURCE_DOES_NOT_EXIST",
            "no registered model is named 'nope'",
        ),
        (
            "GET",
            format!("{api}/model-versions/get?name=nope&version=one"),
            String::new(),
            400,
            "INVALID_PARAMETER_VALUE",
            "expected a version number",
        ),
        (
            "GET",
            format!("{api}/nothing/here"),
            String::new(),
            404,
            "ENDPOINT_NOT_FOUND",
            "is not an MLflow REST endpoint",
        ),
        (
            "PUT",
            "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/../../escape".into(),
            "x".into(),
            400,
            "INVALID_PARAMETER_VALUE",
            "has an empty, '.' or '..' part",
        ),
        (
            "PUT",
            "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/big.bin".into(),
            "x".repeat(5000),
            413,
            "RESOURCE_EXHAUSTED",
            "passed 4096 bytes, the most one artifact may have",
        ),
        (
            "GET",
            "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/big.bin".into(),
            String::new(),
            404,
            "RESOURCE_DOES_NOT_EXIST",
            "does not exist",
        ),
    ];
    for (method, path, body, expected_status, code, words) in cases {
        let (status, answer) = http(&address, method, &path, &body);
        assert_eq!(status, expected_status, "{method} {path}: {answer}");
        assert_eq!(answer["error_code"], code, "{method} {path}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{method} {path}: {message}");
    }
    // A run in the new experiment, logged with a batch and read back with its history.
    let (status, created) = http(
        &address,
        "POST",
        &format!("{api}/runs/create"),
        &format!(r#"{{"experiment_id": "{experiment}", "start_time": "5"}}"#),
    );
    assert_eq!(status, 200, "{created}");
    let run = created["run"]["info"]["run_id"].as_str().unwrap().to_string();
    assert_eq!(created["run"]["info"]["start_time"], 5);
    let batch = format!(
        r#"{{"run_id": "{run}", "metrics": [{{"key": "m", "value": 1.5, "timestamp": 7, "step": 2}}, {{"key": "m", "value": "NaN", "timestamp": 8, "step": 3}}], "params": [{{"key": "p", "value": "v"}}]}}"#
    );
    let (status, answer) = http(&address, "POST", &format!("{api}/runs/log-batch"), &batch);
    assert_eq!(status, 200, "{answer}");
    let (_, history) = http(
        &address,
        "GET",
        &format!("{api}/metrics/get-history?run_id={run}&metric_key=m"),
        "",
    );
    assert_eq!(history["metrics"][0]["value"], 1.5, "{history}");
    assert_eq!(history["metrics"][1]["value"], "NaN", "{history}");
    let (_, empty) = http(
        &address,
        "GET",
        &format!("{api}/metrics/get-history?run_id={run}&metric_key=none"),
        "",
    );
    assert_eq!(empty["metrics"], serde_json::json!([]), "{empty}");
    // A metric with a NaN step is refused whole: nothing of the batch is logged.
    let batch = format!(
        r#"{{"run_id": "{run}", "metrics": [{{"key": "n", "value": 1, "timestamp": 9, "step": 4}}, {{"key": "n", "value": 2, "timestamp": 9, "step": "NaN"}}]}}"#
    );
    let (status, answer) = http(&address, "POST", &format!("{api}/runs/log-batch"), &batch);
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("'step' is 'NaN'; expected an integer"),
        "{answer}"
    );
    let (_, none) = http(
        &address,
        "GET",
        &format!("{api}/metrics/get-history?run_id={run}&metric_key=n"),
        "",
    );
    assert_eq!(none["metrics"], serde_json::json!([]), "{none}");

    // Uploads that go wrong half way leave nothing behind: one cut off by its client, one that streams
    // (chunked, so no length up front) past the limit.
    let artifacts = "/api/2.0/mlflow-artifacts/artifacts";
    let upload = |path: &str, head: &str, body: &[u8]| {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        write!(
            stream,
            "PUT {artifacts}/{path} HTTP/1.1\r\nHost: {address}\r\n{head}\r\n"
        )
        .unwrap();
        stream.write_all(body).unwrap();
        stream
    };
    let cut_off = upload("1/r/artifacts/cut.bin", "Content-Length: 3000\r\n", &[7u8; 1500]);
    std::thread::sleep(Duration::from_millis(200));
    drop(cut_off);
    let mut chunked = Vec::new();
    for _ in 0..5 {
        chunked.extend_from_slice(b"3e8\r\n");
        chunked.extend_from_slice(&[1u8; 1000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut streamed = upload(
        "1/r/artifacts/streamed.bin",
        "Transfer-Encoding: chunked\r\nConnection: close\r\n",
        &chunked,
    );
    let mut response = String::new();
    std::io::Read::read_to_string(&mut streamed, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("nothing was stored"), "{response}");
    // A small one that completes is listed, with its hash.
    let (status, answer) = http(&address, "PUT", &format!("{artifacts}/1/r/artifacts/ok.txt"), "fine");
    assert_eq!(status, 200, "{answer}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, listed) = http(&address, "GET", &format!("{artifacts}?path=1/r/artifacts"), "");
        assert_eq!(status, 200, "{listed}");
        let files: Vec<&str> = listed["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|file| file["path"].as_str().unwrap())
            .collect();
        if files == ["ok.txt"] {
            assert_eq!(
                listed["files"][0]["kiln_sha256"],
                sha256_hex(b"fine").as_str(),
                "{listed}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "half-written uploads are visible: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.kill_all().unwrap();
}

/// Every file under `directory`, relative to it, sorted.
fn files_under(directory: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path.strip_prefix(directory).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_record_fails_leaves_the_artifact_it_replaced_whole() {
    let artifacts_directory = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::new(Path::new(KILN), 3, &[]).unwrap();
    cluster.tracking = true;
    cluster.artifact_root = Some(artifacts_directory.path().display().to_string());
    cluster.start_all().unwrap();
    let leader = cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let address = cluster.members[&leader].tracking_addr.clone();
    let artifacts = "/api/2.0/mlflow-artifacts/artifacts";
    let file = format!("{artifacts}/0/r/artifacts/model/w.bin");
    let (status, answer) = http(&address, "PUT", &file, "old bytes");
    assert_eq!(status, 200, "{answer}");

    // A replacing upload whose bytes are stored but whose record the leader, left alone half way through
    // the body, cannot replicate: it is refused, and the artifact it would have replaced is still there,
    // whole and matching its record, once the cluster is back.
    let followers: Vec<u64> = cluster.members.keys().copied().filter(|id| *id != leader).collect();
    let mut upload = std::net::TcpStream::connect(&address).unwrap();
    upload.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    use std::io::{Read, Write};
    write!(
        upload,
        "PUT {file} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnew "
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    for follower in &followers {
        cluster.kill(*follower).unwrap();
    }
    upload.write_all(b"bytes").unwrap();
    let mut response = String::new();
    upload.read_to_string(&mut response).unwrap();
    assert!(
        !response.starts_with("HTTP/1.1 200"),
        "an upload was acknowledged without its record: {response}"
    );
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    // The record is in the old leader's log only, so the two others, restarted without it, elect one of
    // themselves and never apply it. (Were the old leader elected again, the record would apply: its bytes
    // are whole too, and that download would be the new bytes.)
    cluster.kill(leader).unwrap();
    for follower in &followers {
        cluster.start(*follower).unwrap();
    }
    let old_leader = leader;
    let leader = cluster
        .wait_for_leader(Some(old_leader), Duration::from_secs(20))
        .await
        .unwrap();
    let address = cluster.members[&leader].tracking_addr.clone();
    let read = |address: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = kiln_cluster_tests::http_text(address, "GET", &file, "");
            if status == 200 || std::time::Instant::now() > deadline {
                return (status, body);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(read(&address), (200, "old bytes".to_string()));
    cluster.start(old_leader).unwrap();

    // Uploaded again, the new bytes replace the old ones: downloaded and listed with their own hash, and
    // the replaced object is gone from the store.
    let (status, answer) = http(&address, "PUT", &file, "new bytes");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(read(&address), (200, "new bytes".to_string()));
    let (_, listed) = http(&address, "GET", &format!("{artifacts}?path=0/r/artifacts/model"), "");
    assert_eq!(listed["files"][0]["path"], "w.bin", "{listed}");
    assert_eq!(listed["files"][0]["file_size"], 9, "{listed}");
    assert_eq!(
        listed["files"][0]["kiln_sha256"],
        sha256_hex(b"new bytes").as_str(),
        "{listed}"
    );
    let (_, root) = http(&address, "GET", artifacts, "");
    assert_eq!(
        root["files"],
        serde_json::json!([{ "path": "0", "is_dir": true }]),
        "{root}"
    );
    let stored = files_under(artifacts_directory.path());
    assert!(!stored.contains(&"0/r/artifacts/model/w.bin".to_string()), "{stored:?}");
    let holding_new: Vec<&String> = stored
        .iter()
        .filter(|file| std::fs::read(artifacts_directory.path().join(file)).unwrap() == b"new bytes")
        .collect();
    assert!(!holding_new.is_empty(), "{stored:?}");

    // Deleted, it is gone, and so is its object.
    let (status, answer) = http(&address, "DELETE", &format!("{artifacts}/0/r/artifacts/model"), "");
    assert_eq!(status, 200, "{answer}");
    let (status, _) = kiln_cluster_tests::http_text(&address, "GET", &file, "");
    assert_eq!(status, 404);
    let (_, listed) = http(&address, "GET", &format!("{artifacts}?path=0/r/artifacts/model"), "");
    assert_eq!(listed["files"], serde_json::json!([]), "{listed}");
    let after = files_under(artifacts_directory.path());
    assert!(after.len() < stored.len(), "{after:?} against {stored:?}");
    cluster.kill_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_can_live_in_an_s3_bucket() {
    let Some(python) = stock_python() else { return };
    let s3 = kiln_cluster_tests::S3Server::start(&python);
    s3.create_bucket(&python, "kiln-artifacts");
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.tracking = true;
    cluster.artifact_root = Some("s3://kiln-artifacts/cluster-a".into());
    cluster.env = s3
        .environment()
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let address = cluster.members[&1].tracking_addr.clone();
    let artifacts = "/api/2.0/mlflow-artifacts/artifacts";
    let body = "x".repeat(10_000);
    let (status, answer) = http(
        &address,
        "PUT",
        &format!("{artifacts}/0/r/artifacts/model/w.bin"),
        &body,
    );
    assert_eq!(status, 200, "{answer}");
    let (status, listed) = http(&address, "GET", &format!("{artifacts}?path=0/r/artifacts/model"), "");
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["files"][0]["path"], "w.bin", "{listed}");
    assert_eq!(listed["files"][0]["file_size"], 10_000, "{listed}");
    assert_eq!(
        listed["files"][0]["kiln_sha256"],
        sha256_hex(body.as_bytes()).as_str(),
        "{listed}"
    );
    // The object is in the bucket under the root's prefix, as any S3 client sees it.
    let script = format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\nprint(s3.get_object(Bucket='kiln-artifacts', Key='cluster-a/0/r/artifacts/model/w.bin')['ContentLength'])\n",
        s3.endpoint
    );
    let output = Command::new(&python).args(["-c", &script]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "10000",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (status, _) = http(&address, "DELETE", &format!("{artifacts}/0/r/artifacts/model"), "");
    assert_eq!(status, 200);
    let (status, gone) = http(&address, "GET", &format!("{artifacts}/0/r/artifacts/model/w.bin"), "");
    assert_eq!(status, 404, "{gone}");
    cluster.kill_all().unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
