//! The dashboard in headless Chromium: after a 2-rank train job that registers its model and a run logged
//! over the MLflow API, every page loads, the charts and the lineage graph render, and nothing reaches the
//! browser's console.

use std::path::Path;
use std::time::Duration;

use kiln_cluster_tests::{Cluster, chromium, http_json, load_page};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_page_renders_in_headless_chromium_with_its_charts_and_no_console_errors() {
    let Some(chromium) = chromium() else { return };
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    cluster.start_worker(1, 2, &[]).unwrap();
    cluster.wait_for_workers(1, Duration::from_secs(20)).await.unwrap();
    let address = cluster.members[&1].tracking_addr.clone();

    // A 2-rank digits job (its run, metrics, model artifact and registered version), and a second run
    // logged by hand to compare it with.
    let directory = tempfile::tempdir().unwrap();
    let dataset = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/digits.csv");
    let spec = include_str!("../../examples/jobs/digits-mlp.toml")
        .replace(
            "dataset = \"examples/data/digits.csv\"",
            &format!("dataset = {:?}", dataset.canonicalize().unwrap().display().to_string()),
        )
        .replace("epochs = 30", "epochs = 5");
    let file = directory.path().join("digits.toml");
    std::fs::write(&file, spec).unwrap();
    let submitted = cluster.cli(&["submit", file.to_str().unwrap()]).unwrap();
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let job = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    let waited = cluster.cli(&["jobs", "wait", &job, "--max-wait", "120s"]).unwrap();
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stdout));
    let run_id = format!("{:032x}", job.parse::<u64>().unwrap());
    let (status, created) = http_json(
        &address,
        "POST",
        "/api/2.0/mlflow/runs/create",
        r#"{"experiment_id": "0", "run_name": "by-hand"}"#,
    );
    assert_eq!(status, 200, "{created}");
    let other = created["run"]["info"]["run_id"].as_str().unwrap().to_string();
    let batch = format!(
        r#"{{"run_id": "{other}", "metrics": [{{"key": "loss", "value": 2.0, "timestamp": 1, "step": 1}}, {{"key": "loss", "value": 1.0, "timestamp": 2, "step": 3}}], "params": [{{"key": "learning_rate", "value": "0.01"}}]}}"#
    );
    let (status, answer) = http_json(&address, "POST", "/api/2.0/mlflow/runs/log-batch", &batch);
    assert_eq!(status, 200, "{answer}");

    let job_link = format!("/jobs/{job}");
    let pages = [
        ("/", vec!["<h1>Cluster</h1>", "class=\"bar\"", job_link.as_str()]),
        ("/jobs", vec!["digits-mlp", "succeeded"]),
        (
            job_link.as_str(),
            vec!["Rank 0 output", "Rank 1 output", "trained 60 steps", &run_id],
        ),
        (
            "/runs",
            vec!["by-hand", "digits-mlp", "validation_accuracy", "type=\"checkbox\""],
        ),
        (
            "/runs?order_by=metrics.%60loss%60+DESC&filter=params.learning_rate+%3D+%270.01%27",
            vec!["by-hand"],
        ),
        (
            &format!("/runs/{run_id}"),
            vec!["<polyline class=\"series\"", "validation_accuracy", "model/weights.bin"],
        ),
        (
            &format!("/compare?runs={run_id}&runs={other}"),
            vec!["Comparing 2 runs", "learning_rate ≠", "<polyline class=\"series\""],
        ),
        ("/models", vec!["digits"]),
        ("/models/digits", vec!["v1", &run_id[..8]]),
        (
            "/lineage?id=models%3A%2Fdigits%2F1",
            vec![
                "class=\"lineage\"",
                "ModelVersion",
                "Run",
                "Artifact",
                "Dataset",
                "marker-end",
            ],
        ),
    ];
    for (path, expected) in pages {
        let (dom, console) = load_page(&chromium, &format!("http://{address}{path}"));
        assert!(console.is_empty(), "{path} wrote to the console: {console:?}");
        for needle in expected {
            assert!(dom.contains(needle), "{path} lacks {needle:?}:\n{dom}");
        }
    }
    // The run page draws one chart per metric; the filter above kept only the run it names.
    let (dom, _) = load_page(&chromium, &format!("http://{address}/runs/{run_id}"));
    assert!(dom.matches("<svg class=\"chart\"").count() >= 4, "{dom}");
    let (dom, _) = load_page(
        &chromium,
        &format!("http://{address}/runs?filter=params.learning_rate+%3D+%270.01%27"),
    );
    assert!(dom.contains("by-hand") && !dom.contains(">digits-mlp<"), "{dom}");
    // A page about nothing says so, with the status to match.
    let (status, _) = http_json(&address, "GET", "/runs/0123", "");
    assert_eq!(status, 404);
    let (dom, _) = load_page(&chromium, &format!("http://{address}/runs/0123"));
    assert!(dom.contains("no run has id '0123'"), "{dom}");
    cluster.kill_all().unwrap();
}
