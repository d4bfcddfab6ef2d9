//! `kiln features` as users run it: the example definitions check out against their data, a broken copy
//! is refused with the reason, a training set comes out point-in-time correct as Parquet, and applied
//! definitions are versioned by the cluster and survive the loss of its leader.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use kiln_cluster_tests::{Cluster, S3Server, stock_python};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/features")
}

/// The example data's conversion rate on the row that starts with `prefix` (driver, hour).
fn example_conv_rate(prefix: &str) -> f64 {
    let csv = std::fs::read_to_string(examples().join("data/driver_hourly.csv")).unwrap();
    csv.lines()
        .find(|line| line.starts_with(prefix))
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
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
        stdout.contains("ok (1 entities, 2 sources, 2 feature views with 5 features, 2 feature services)"),
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
    let expected = example_conv_rate("1001,2026-11-01T05:00:00");
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
        stderr.contains("feature service 'drivers' is not defined (services: driver_activity, driver_live)"),
        "{stderr}"
    );
    assert!(!directory.path().join("none.parquet").exists());
}

fn json_of(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The example, copied elsewhere with its data path made absolute, after `edit`.
fn example_copy(directory: &Path, name: &str, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let text = std::fs::read_to_string(examples().join("driver.toml")).unwrap();
    let data = examples().join("data/driver_hourly.csv").canonicalize().unwrap();
    let text = text.replace(
        "path = \"data/driver_hourly.csv\"",
        &format!("path = {:?}", data.display().to_string()),
    );
    let file = directory.join(name);
    std::fs::write(&file, edit(text)).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_definitions_are_versioned_by_the_cluster_and_outlive_its_leader() {
    let mut cluster = Cluster::new(Path::new(KILN), 3, &[]).unwrap();
    cluster.start_all().unwrap();
    let leader = cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let example = examples().join("driver.toml");

    let applied = json_of(
        &cluster
            .cli(&["features", "apply", example.to_str().unwrap(), "--json"])
            .unwrap(),
    );
    let objects = applied["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 7, "{applied:#}");
    assert!(
        objects
            .iter()
            .all(|object| object["change"] == "created" && object["version"] == 1)
    );

    let listed = json_of(&cluster.cli(&["features", "list", "--json"]).unwrap());
    let view = &listed["feature_views"][0];
    assert_eq!(view["name"], "driver_hourly_stats");
    assert_eq!(view["version"]["version"], 1);
    assert_eq!(view["owner"].as_str().map(str::is_empty), Some(false), "{view:#}");
    let features: Vec<(String, String)> = view["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|feature| {
            (
                feature["name"].as_str().unwrap().into(),
                feature["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        features.contains(&("avg_daily_trips".into(), "int64".into())),
        "{features:?}"
    );
    // Source paths are stored absolute, so any reader of the cluster finds the data.
    let path = listed["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|source| source["kind"]["File"]["path"].as_str())
        .unwrap();
    assert!(Path::new(path).is_absolute() && Path::new(path).exists(), "{path}");
    let table = cluster.cli(&["features", "list"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("driver_hourly_stats") && table.contains("conv_rate:float64"),
        "{table}"
    );

    // Applying the same file again changes nothing; changing the view makes version 2 of it alone.
    let again = json_of(
        &cluster
            .cli(&["features", "apply", example.to_str().unwrap(), "--json"])
            .unwrap(),
    );
    assert!(
        again["objects"]
            .as_array()
            .unwrap()
            .iter()
            .all(|object| object["change"] == "unchanged")
    );
    let changed = example_copy(directory.path(), "changed.toml", |text| {
        text.replace(
            "Conversion and acceptance rates, hourly",
            "Conversion and acceptance rates per hour",
        )
    });
    let applied = json_of(
        &cluster
            .cli(&["features", "apply", changed.to_str().unwrap(), "--json"])
            .unwrap(),
    );
    let changes: Vec<(String, u64, String)> = applied["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|object| object["change"] != "unchanged")
        .map(|object| {
            (
                object["name"].as_str().unwrap().into(),
                object["version"].as_u64().unwrap(),
                object["change"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(changes, [("driver_hourly_stats".into(), 2, "updated".into())]);

    // A file with a mistyped feature is refused whole; what was applied stays.
    let broken = example_copy(directory.path(), "broken.toml", |text| {
        text.replace("Conversion and acceptance rates per hour", "x").replace(
            "name = \"avg_daily_trips\"\ntype = \"int64\"",
            "name = \"avg_daily_trips\"\ntype = \"string\"",
        )
    });
    let output = cluster.cli(&["features", "apply", broken.to_str().unwrap()]).unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("feature 'avg_daily_trips' is declared string"),
        "{stderr}"
    );
    let before = listed;
    let listed = json_of(&cluster.cli(&["features", "list", "--json"]).unwrap());
    assert_eq!(listed["feature_views"][0]["version"]["version"], 2);
    assert_eq!(
        listed["feature_views"][0]["description"], "Conversion and acceptance rates per hour",
        "the refused file changed nothing"
    );
    assert_eq!(listed["feature_services"], before["feature_services"]);

    // The leader goes; the definitions are still there, and a training set names the view's version.
    cluster.kill(leader).unwrap();
    cluster
        .wait_for_leader(Some(leader), Duration::from_secs(10))
        .await
        .unwrap();
    let entities = directory.path().join("entities.csv");
    std::fs::write(&entities, "driver_id,event_timestamp\n1001,2026-11-01T05:30:00\n").unwrap();
    let out = directory.path().join("train.parquet");
    let summary = json_of(
        &cluster
            .cli(&[
                "features",
                "training-set",
                "--service",
                "driver_activity",
                "--entities",
                entities.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--json",
            ])
            .unwrap(),
    );
    assert_eq!(summary["rows"], 1);
    assert_eq!(summary["feature_views"][0]["version"], 2, "{summary:#}");
    assert_eq!(
        summary["feature_views"][0]["definition_hash"],
        listed["feature_views"][0]["definition_hash"]
    );
}

/// A `kiln featurestore` process on a free port, following `cluster`.
/// A child process killed (by its id) when dropped, also when a test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct FeatureServer {
    child: std::process::Child,
    address: String,
}

impl FeatureServer {
    fn start(cluster: &Cluster, data_dir: &Path) -> FeatureServer {
        let address = format!("127.0.0.1:{}", kiln_cluster_tests::free_port());
        let mut command = Command::new(KILN);
        if let Some(tracking) = cluster.tracking_addresses() {
            command.args(["featurestore", "--tracking", &tracking]);
        } else {
            command.arg("featurestore");
        }
        let child = command
            .args([
                "--coordinator",
                &cluster.addresses(),
                "--listen",
                &address,
                "--refresh-ms",
                "100",
                "--data-dir",
            ])
            .arg(data_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        FeatureServer { child, address }
    }

    /// A server on `data_dir` once the example definitions are applied and it has picked them up.
    fn serving_the_example(cluster: &Cluster, data_dir: &Path) -> FeatureServer {
        let server = FeatureServer::start(cluster, data_dir);
        let example = examples().join("driver.toml");
        json_of(
            &cluster
                .cli(&["features", "apply", example.to_str().unwrap(), "--json"])
                .unwrap(),
        );
        json_of(&server.features(
            cluster,
            &["sql", "SELECT count(*) FROM driver_hourly_stats", "--json"],
            Duration::from_secs(20),
        ));
        server
    }

    fn stop(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Runs `kiln features ARGS` against this server until it succeeds or `deadline` passes.
    fn features(&self, cluster: &Cluster, args: &[&str], deadline: Duration) -> Output {
        let until = std::time::Instant::now() + deadline;
        loop {
            let output = cluster
                .cli(&[&["features", "--featurestore", &self.address], args].concat())
                .unwrap();
            if output.status.success() || std::time::Instant::now() > until {
                return output;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feature_server_serves_what_was_applied_and_keeps_its_online_store_across_a_restart() {
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("featurestore");
    let server = FeatureServer::start(&cluster, &data);
    let example = examples().join("driver.toml");
    json_of(
        &cluster
            .cli(&["features", "apply", example.to_str().unwrap(), "--json"])
            .unwrap(),
    );

    // The server picks the definitions up within its refresh interval.
    let output = server.features(
        &cluster,
        &[
            "sql",
            "SELECT driver_id, count(*) AS hours FROM driver_hourly_stats GROUP BY driver_id ORDER BY driver_id",
            "--json",
        ],
        Duration::from_secs(20),
    );
    let rows = json_of(&output);
    assert_eq!(rows.as_array().unwrap().len(), 5, "{rows:#}");
    assert_eq!(rows[0]["driver_id"], 1001);
    assert_eq!(rows[0]["hours"], 48);

    let report = json_of(&server.features(
        &cluster,
        &["materialize", "--until", "2026-11-01T05:30:00Z", "--json"],
        Duration::from_secs(5),
    ));
    assert_eq!(report["views"][0]["view"], "driver_hourly_stats");
    assert_eq!(report["views"][0]["rows_applied"], 5 * 6, "{report:#}");
    let lookup = [
        "get",
        "--service",
        "driver_activity",
        "--entity",
        "driver_id=1001",
        "--entity",
        "driver_id=4242",
        "--json",
    ];
    let found = json_of(&server.features(&cluster, &lookup, Duration::from_secs(5)));
    // The latest row at or before 05:30 is 05:00's.
    let expected = example_conv_rate("1001,2026-11-01T05:00:00");
    assert_eq!(found[0]["driver_id"], 1001);
    assert_eq!(found[0]["conv_rate"].as_f64(), Some(expected), "{found:#}");
    assert!(
        found[1].get("conv_rate").is_none_or(serde_json::Value::is_null),
        "{found:#}"
    );

    let output = server.features(
        &cluster,
        &["get", "--service", "nope", "--entity", "driver_id=1"],
        Duration::ZERO,
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("feature service 'nope' is not defined (services: driver_activity, driver_live)"),
        "{stderr}"
    );

    // Restarted on the same directory, the server still answers from its online store.
    server.stop();
    let server = FeatureServer::start(&cluster, &data);
    let again = json_of(&server.features(&cluster, &lookup, Duration::from_secs(20)));
    assert_eq!(again, found);

    // `kiln bench lookup` draws the same entities over either protocol (drivers 1001-1005 of 1001-1010 are
    // online), so both find the same ones.
    let mut not_found = Vec::new();
    for over in ["flight", "http"] {
        let output = cluster
            .cli(&[
                "bench",
                "lookup",
                "--featurestore",
                &server.address,
                "--over",
                over,
                "--service",
                "driver_activity",
                "--key",
                "driver_id",
                "--first-key",
                "1001",
                "--keys",
                "10",
                "--requests",
                "40",
                "--json",
            ])
            .unwrap();
        let result = json_of(&output);
        assert_eq!(result["over"], over, "{result:#}");
        assert_eq!(result["lookups"], 40, "{result:#}");
        let missed = result["not_found"].as_u64().unwrap();
        assert!(0 < missed && missed < 40, "{result:#}");
        not_found.push(missed);
    }
    assert_eq!(not_found[0], not_found[1]);
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_python_clients_list_read_push_and_query_over_flight_and_flight_sql() {
    let Some(python) = stock_python() else { return };
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let server = FeatureServer::serving_the_example(&cluster, &directory.path().join("featurestore"));
    let entities = directory.path().join("entities.csv");
    std::fs::write(
        &entities,
        "driver_id,event_timestamp\n1001,2026-11-01T05:30:00\n1002,2026-11-01T06:30:00\n1003,2026-10-01T00:00:00\n",
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/feature_clients.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(&server.address)
        .arg(&entities)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.trim_end().ends_with("all stock-client checks passed"),
        "{stdout}"
    );

    // The rows pushed from Python are still there after a restart.
    server.stop();
    let server = FeatureServer::start(&cluster, &directory.path().join("featurestore"));
    let found = json_of(&server.features(
        &cluster,
        &[
            "get",
            "--service",
            "driver_live",
            "--entity",
            "driver_id=1001",
            "--json",
        ],
        Duration::from_secs(20),
    ));
    assert_eq!(found[0]["trips_today"], 7, "{found:#}");
    server.stop();
}

/// Writes `spec` to `file`, submits it, waits for it to succeed (up to 300 s) and returns its id and the
/// logs of its `ranks` ranks, one after the other.
fn submit_and_wait(cluster: &Cluster, file: &Path, spec: &str, ranks: u32) -> (String, String) {
    std::fs::write(file, spec).unwrap();
    let submitted = cluster.cli(&["submit", file.to_str().unwrap()]).unwrap();
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let id = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    let waited = cluster.cli(&["jobs", "wait", &id, "--max-wait", "300s"]).unwrap();
    let logs: String = (0..ranks)
        .map(|rank| {
            let output = cluster
                .cli(&["jobs", "logs", &id, "--rank", &rank.to_string()])
                .unwrap();
            String::from_utf8_lossy(&output.stdout).to_string()
        })
        .collect();
    assert!(
        waited.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&waited.stdout)
    );
    (id, logs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_train_job_reads_its_training_set_from_the_feature_server() {
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    cluster.start_worker(1, 1, &[]).unwrap();
    cluster.wait_for_workers(1, Duration::from_secs(20)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let server = FeatureServer::serving_the_example(&cluster, &directory.path().join("featurestore"));

    // Entity rows at half past each hour, labelled by whether that hour's conversion rate is above 0.5:
    // the features the service returns decide the label, so only a correct join can learn it.
    let csv = std::fs::read_to_string(examples().join("data/driver_hourly.csv")).unwrap();
    let mut entities = String::from("driver_id,event_timestamp,converts\n");
    for line in csv.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        let converts = u8::from(fields[2].parse::<f64>().unwrap() > 0.5);
        let at = fields[1].replace(":00:00", ":30:00");
        entities.push_str(&format!("{},{at},{converts}\n", fields[0]));
    }
    let entities_file = directory.path().join("entities.csv");
    std::fs::write(&entities_file, entities).unwrap();
    let spec = format!(
        r#"name = "driver-conversion"
kind = "train"

[train]
model = "mlp"
dataset = "features://driver_activity?entities={}&server={}"
label = "converts"
validation_fraction = 0.2
hidden = [32]
optimizer = "adam"
epochs = 60
batch_size = 32
learning_rate = 0.01
seed = 7

[resources]
workers = 1
cpus = 1
"#,
        entities_file.display(),
        server.address
    );
    let (id, logs) = submit_and_wait(&cluster, &directory.path().join("train.toml"), &spec, 1);
    assert!(
        logs.contains("training set of feature service 'driver_activity'")
            && logs.contains("240 rows, columns converts, conv_rate, acc_rate, conv_acc"),
        "{logs}"
    );
    let shown = json_of(&cluster.cli(&["jobs", "show", &id, "--json"]).unwrap());
    let accuracy = shown["metrics"]["validation_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.85, "validation accuracy {accuracy}\n{logs}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digits_example_trains_from_the_feature_store_with_each_rank_fetching_its_shard() {
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    cluster.start_worker(1, 1, &[]).unwrap();
    cluster.start_worker(2, 1, &[]).unwrap();
    cluster.wait_for_workers(2, Duration::from_secs(20)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let server = FeatureServer::start(&cluster, &directory.path().join("featurestore"));

    // The examples directory is the whole set: the driver and the digits definitions together.
    let applied = json_of(
        &cluster
            .cli(&["features", "apply", examples().to_str().unwrap(), "--json"])
            .unwrap(),
    );
    let names: Vec<&str> = applied["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|object| object["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"digit_pixels") && names.contains(&"driver_hourly_stats"),
        "{applied:#}"
    );
    json_of(&server.features(
        &cluster,
        &["sql", "SELECT count(*) FROM digit_pixels", "--json"],
        Duration::from_secs(20),
    ));

    // The example job as shipped, pointed at this server and the example's entity rows.
    let labels = examples().join("data/digits_labels.csv");
    let spec = std::fs::read_to_string(examples().join("../jobs/digits-features.toml"))
        .unwrap()
        .replace(
            "entities=examples/features/data/digits_labels.csv",
            &format!("entities={}&server={}", labels.display(), server.address),
        );
    let (id, logs) = submit_and_wait(&cluster, &directory.path().join("digits-features.toml"), &spec, 2);
    // 1,797 labelled images: rank 0 fetched rows 0..898, rank 1 rows 898..1797, with the 64 pixels and
    // the label only.
    for expected in ["shard 0 of 2: 898 rows", "shard 1 of 2: 899 rows"] {
        assert!(logs.contains(expected), "{expected}\n{logs}");
    }
    assert!(logs.contains("columns digit, p0, p1"), "{logs}");
    let shown = json_of(&cluster.cli(&["jobs", "show", &id, "--json"]).unwrap());
    let accuracy = shown["metrics"]["validation_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.95, "validation accuracy {accuracy}\n{logs}");
    // Both ranks asked for the same set at once; the server built it once and neither failed.
    assert_eq!(shown["attempts"].as_array().unwrap().len(), 1, "{shown:#}");

    // The job's run: its params, a validation accuracy per epoch, its model as an artifact that downloads
    // with the recorded hash, registered as digits v1; and the lineage from that version back to the
    // training set's dataset version and the feature view versions it joined.
    let tracking = cluster.members[&1].tracking_addr.clone();
    let job: u64 = id.parse().unwrap();
    let run_id = format!("{job:032x}");
    let kiln = |args: &[&str]| -> String {
        let output = cluster.cli(&[args, &["--tracking", &tracking]].concat()).unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let run: serde_json::Value = serde_json::from_str(&kiln(&["runs", "show", &run_id, "--json"])).unwrap();
    let params = run["data"]["params"].to_string();
    assert!(
        params.contains("\"learning_rate\"") && params.contains("\"epochs\""),
        "{run:#}"
    );
    let (_, history) = kiln_cluster_tests::http_json(
        &tracking,
        "GET",
        &format!("/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=validation_accuracy"),
        "",
    );
    assert_eq!(history["metrics"].as_array().unwrap().len(), 30, "{history}");
    let dataset = &run["inputs"]["dataset_inputs"][0]["dataset"];
    assert_eq!(dataset["source_type"], "kiln-feature-service", "{run:#}");
    let digest = dataset["digest"].as_str().unwrap().to_string();
    let listed: serde_json::Value = serde_json::from_str(&kiln(&["artifacts", "list", &run_id, "--json"])).unwrap();
    let weights = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|file| file["path"] == "model/weights.bin")
        .unwrap_or_else(|| panic!("no model artifact: {listed:#}"));
    let out = directory.path().join("weights.bin");
    let got = kiln(&[
        "artifacts",
        "get",
        &run_id,
        "model/weights.bin",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(got.contains(weights["sha256"].as_str().unwrap()), "{got}");
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        weights["size"].as_u64().unwrap()
    );
    // The training data profile registered with the model covers both ranks' shards, not rank 0's alone.
    let profile_path = directory.path().join("profile.json");
    kiln(&[
        "artifacts",
        "get",
        &run_id,
        "model/profile.json",
        "--out",
        profile_path.to_str().unwrap(),
    ]);
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(&profile_path).unwrap()).unwrap();
    assert_eq!(profile["rows"], 1797, "{profile}");
    let class_counts: Vec<u64> = profile["class_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|count| count.as_u64().unwrap())
        .collect();
    assert_eq!(class_counts.len(), 10, "{profile}");
    assert_eq!(class_counts.iter().sum::<u64>(), 1797, "{profile}");
    let pixel: u64 = profile["features"][10]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|count| count.as_u64().unwrap())
        .sum();
    assert_eq!(pixel, 1797, "every row in one bin: {profile}");

    // `kiln lineage TARGET --DIRECTION --format json`, and the ids of its nodes.
    let lineage_of = |target: &str, direction: &str| -> serde_json::Value {
        serde_json::from_str(&kiln(&["lineage", target, direction, "--format", "json"])).unwrap()
    };
    let ids = |graph: &serde_json::Value| -> Vec<String> {
        graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| node["id"].as_str().unwrap().to_string())
            .collect()
    };
    let lineage = lineage_of("models:/digits/1", "--upstream");
    let nodes = ids(&lineage);
    for expected in [
        "model:digits/1".to_string(),
        format!("run:{run_id}"),
        format!("artifact:0/{run_id}/artifacts/model"),
        format!("dataset:{digest}"),
        "view:digit_pixels@1".to_string(),
    ] {
        assert!(nodes.contains(&expected), "{expected} missing from {lineage:#}");
    }
    let run_node = lineage["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["kind"] == "run")
        .unwrap();
    assert_eq!(run_node["attributes"]["param.learning_rate"], "0.001", "{run_node}");
    // The dataset, named by a prefix of its digest, answers which runs and models used it.
    let downstream = kiln(&["lineage", &digest[..12], "--downstream"]);
    assert!(
        downstream.contains("model digits v1") && downstream.contains("run digits-features"),
        "{downstream}"
    );
    let dot = kiln(&["lineage", "models:/digits/1", "--format", "dot"]);
    assert!(
        dot.contains(&format!("\"dataset:{digest}\" -> \"run:{run_id}\";")),
        "{dot}"
    );

    // A materialization is an execution too: the feature server records it as a run, which lineage shows
    // between the view version and its online table, beside the training set the same version fed.
    let report = json_of(&server.features(
        &cluster,
        &["materialize", "--view", "digit_pixels", "--json"],
        Duration::from_secs(5),
    ));
    assert_eq!(report["views"][0]["rows_applied"], 1797, "{report:#}");
    let materialization = report["views"][0]["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the materialization was not recorded: {report:#}"))
        .to_string();
    let recorded: serde_json::Value =
        serde_json::from_str(&kiln(&["runs", "show", &materialization, "--json"])).unwrap();
    assert_eq!(recorded["info"]["status"], "FINISHED", "{recorded:#}");
    assert!(
        recorded["data"]["params"].to_string().contains("\"rows_applied\""),
        "{recorded:#}"
    );
    let downstream = lineage_of("view:digit_pixels@1", "--downstream");
    let nodes = ids(&downstream);
    for expected in [
        format!("run:{materialization}"),
        "online:digit_pixels".to_string(),
        format!("dataset:{digest}"),
        "model:digits/1".to_string(),
    ] {
        assert!(nodes.contains(&expected), "{expected} missing from {downstream:#}");
    }
    let text = kiln(&["lineage", "online:digit_pixels", "--upstream"]);
    assert!(text.contains("materialization of digit_pixels@1"), "{text}");

    // Served with feature enrichment: a request names images by `image_id`, and the replica looks their
    // pixels up online (the service's features, in order, as the model's input).
    let deployment = directory.path().join("enriched.toml");
    std::fs::write(
        &deployment,
        "kind = \"deployment\"\nname = \"digits\"\nmodel = \"models:/digits/1\"\ninput_name = \"pixels\"\n\n[features]\nservice = \"digit_classifier\"\nentity = \"image_id\"\n",
    )
    .unwrap();
    let rest = format!("127.0.0.1:{}", kiln_cluster_tests::free_port());
    let grpc = format!("127.0.0.1:{}", kiln_cluster_tests::free_port());
    let served = Killed(
        Command::new(KILN)
            .args([
                "serve",
                "--deployment",
                deployment.to_str().unwrap(),
                "--tracking",
                &tracking,
            ])
            .args([
                "--featurestore",
                &server.address,
                "--http-listen",
                &rest,
                "--grpc-listen",
                &grpc,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&rest).is_err()
        || kiln_cluster_tests::http_json(&rest, "GET", "/v2/health/ready", "").0 != 200
    {
        assert!(std::time::Instant::now() < deadline, "kiln serve did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let labels_csv = std::fs::read_to_string(&labels).unwrap();
    let expected: Vec<i64> = labels_csv
        .lines()
        .skip(1)
        .take(40)
        .map(|line| line.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    let ids: Vec<i64> = (0..40).collect();
    let request = serde_json::json!({
        "inputs": [{ "name": "image_id", "shape": [40], "datatype": "INT64", "data": ids }],
        "outputs": [{ "name": "label" }],
    });
    let (status, answer) =
        kiln_cluster_tests::http_json(&rest, "POST", "/v2/models/digits/infer", &request.to_string());
    assert_eq!(status, 200, "{answer}");
    let predicted = answer["outputs"][0]["data"].as_array().unwrap();
    let correct = predicted
        .iter()
        .zip(&expected)
        .filter(|(got, want)| got.as_i64() == Some(**want))
        .count();
    assert!(correct >= 36, "{correct} of 40 right: {answer}");
    // An image the online store does not have is refused, naming it.
    let request = serde_json::json!({
        "inputs": [{ "name": "image_id", "shape": [2], "datatype": "INT64", "data": [1, 999999] }],
    });
    let (status, answer) =
        kiln_cluster_tests::http_json(&rest, "POST", "/v2/models/digits/infer", &request.to_string());
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("image_id=999999 has no value of feature 'p0' online (feature service 'digit_classifier')"),
        "{answer}"
    );
    drop(served);
    server.stop();
}

#[test]
fn a_source_in_an_s3_object_store_reads_like_the_local_file() {
    let Some(python) = stock_python() else { return };
    let s3 = S3Server::start(&python);
    s3.upload(
        &python,
        "kiln-features",
        "driver/hourly.csv",
        &examples().join("data/driver_hourly.csv"),
    );
    let directory = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(examples().join("driver.toml")).unwrap();
    assert!(text.contains("path = \"data/driver_hourly.csv\""));
    let remote = directory.path().join("driver.toml");
    std::fs::write(
        &remote,
        text.replace(
            "path = \"data/driver_hourly.csv\"",
            "path = \"s3://kiln-features/driver/hourly.csv\"",
        ),
    )
    .unwrap();
    let entities = directory.path().join("entities.csv");
    std::fs::write(
        &entities,
        "driver_id,event_timestamp\n1001,2026-11-01T05:30:00\n1003,2026-11-01T09:10:00\n1002,2026-10-31T12:00:00\n",
    )
    .unwrap();
    let kiln = |args: &[&std::ffi::OsStr]| {
        let output = Command::new(KILN).args(args).envs(s3.environment()).output().unwrap();
        assert!(
            output.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    };
    let checked = json_of(&kiln(&[
        "features".as_ref(),
        "check".as_ref(),
        remote.as_os_str(),
        "--json".as_ref(),
    ]));
    assert_eq!(checked["feature_views"], 2, "{checked}");

    // The same training set from the object and from the local file.
    let conv_rates = |definitions: &Path, out: &Path| -> Vec<Option<f64>> {
        kiln(&[
            "features".as_ref(),
            "training-set".as_ref(),
            "--service".as_ref(),
            "driver_activity".as_ref(),
            "--definitions".as_ref(),
            definitions.as_os_str(),
            "--entities".as_ref(),
            entities.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        let file = std::fs::File::open(out).unwrap();
        let batches: Vec<_> = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect();
        batches
            .iter()
            .flat_map(|batch| {
                batch
                    .column_by_name("conv_rate")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<arrow_array::Float64Array>()
                    .unwrap()
                    .iter()
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let from_s3 = conv_rates(&remote, &directory.path().join("s3.parquet"));
    let from_file = conv_rates(&examples().join("driver.toml"), &directory.path().join("local.parquet"));
    assert_eq!(from_s3.len(), 3);
    assert!(from_s3[0].is_some() && from_s3[2].is_none(), "{from_s3:?}");
    assert_eq!(from_s3, from_file);

    // A key that is not there is refused, naming the source; so is a store this build does not read.
    for (path, expected) in [
        (
            "s3://kiln-features/driver/missing.csv",
            "source 'driver_hourly': reading s3://kiln-features/driver/missing.csv",
        ),
        (
            "hdfs://kiln-features/driver/hourly.csv",
            "which this build does not read",
        ),
        (
            "az://kiln-features/driver/hourly.csv",
            "source 'driver_hourly': the az:// store for 'kiln-features' cannot be configured",
        ),
    ] {
        let broken = directory.path().join("broken.toml");
        std::fs::write(
            &broken,
            text.replace("path = \"data/driver_hourly.csv\"", &format!("path = \"{path}\"")),
        )
        .unwrap();
        let output = Command::new(KILN)
            .args(["features", "check"])
            .arg(&broken)
            .envs(s3.environment())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "{path}: {stderr}"
        );
    }
}
