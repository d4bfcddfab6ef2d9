//! Sweeps through the interfaces users have: `kiln submit` of a sweep file, its trials running as jobs on
//! real workers (examples/scripts/objective.py logging through the MLflow REST API), `kiln sweeps show`, and a
//! leader killed mid-sweep.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_cluster_tests::Cluster;
use kiln_coordinator::sweep::objectives::{BRANIN, HARTMANN6, Objective};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// Each test runs a cluster and trials on a machine that may have two cores: one at a time, so a test
/// measures Kiln rather than its neighbours.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The TPE example made into another sweep: its algorithm, trial count and space replaced, the script
/// given by absolute path (workers run in the test's directory), extra template environment added.
fn branin_sweep(algorithm: &str, max_trials: u32, parallel: u32, space: &str, env: &str) -> String {
    let text = std::fs::read_to_string(examples().join("sweeps/branin-tpe.toml")).unwrap();
    let script = examples().join("scripts/objective.py");
    let replaced = text
        .replace("algorithm = \"tpe\"", &format!("algorithm = \"{algorithm}\""))
        .replace("max_trials = 30", &format!("max_trials = {max_trials}"))
        .replace("parallel = 2", &format!("parallel = {parallel}"))
        .replace("examples/scripts/objective.py", script.to_str().unwrap());
    let (head, _) = replaced.split_once("[space]").unwrap();
    let (_, template) = replaced.split_once("[template]").unwrap();
    format!("{head}[space]\n{space}\n[template]{template}\n[template.env]\n{env}\n")
}

/// A sweep of one known function (objective.py's name for it) over its space, one trial at a time.
fn objective_sweep(objective: &Objective, algorithm: &str, max_trials: u32, seed: u64) -> String {
    let name = objective.name;
    branin_sweep(algorithm, max_trials, 1, objective.space_toml, "")
        .replace(
            "name = \"branin-tpe\"",
            &format!("name = \"{name}-{algorithm}-{seed}\""),
        )
        .replace("seed = 7", &format!("seed = {seed}"))
        .replace("metric = \"branin\"", &format!("metric = \"{name}\""))
        .replace("objective.py\", \"branin\"]", &format!("objective.py\", \"{name}\"]"))
}

/// One coordinator serving the MLflow API, and one worker with `cpus` slots.
async fn cluster_with_worker(cpus: u32) -> Cluster {
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    cluster.start_worker(1, cpus, &[]).unwrap();
    cluster.wait_for_workers(1, Duration::from_secs(20)).await.unwrap();
    cluster
}

fn run(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let mut all = args.to_vec();
    let tracking = cluster.tracking_addresses().unwrap_or_default();
    if args.first() == Some(&"sweeps") {
        all.extend(["--tracking", tracking.split(',').next().unwrap()]);
    }
    let output = cluster.cli(&all).unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

fn submit(cluster: &Cluster, directory: &Path, text: &str) -> u64 {
    let file = directory.join("sweep.toml");
    std::fs::write(&file, text).unwrap();
    let (ok, stdout, stderr) = run(cluster, &["submit", file.to_str().unwrap()]);
    assert!(ok, "kiln submit: {stderr}");
    stdout.trim().parse().expect("kiln submit prints the job id")
}

/// `kiln sweeps show ID --json` once the sweep is no longer running (or the deadline passed).
fn wait_for_sweep(cluster: &Cluster, id: u64, deadline: Duration) -> serde_json::Value {
    let until = Instant::now() + deadline;
    loop {
        let (ok, stdout, stderr) = run(cluster, &["sweeps", "show", &id.to_string(), "--json"]);
        if ok {
            let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            if shown["state"] != "running" {
                return shown;
            }
            assert!(
                Instant::now() < until,
                "sweep {id} still running after {deadline:?}: {shown:#}"
            );
        } else {
            assert!(Instant::now() < until, "kiln sweeps show {id}: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn branin(x: f64, y: f64) -> f64 {
    let pi = std::f64::consts::PI;
    let (b, c, t) = (5.1 / (4.0 * pi * pi), 5.0 / pi, 1.0 / (8.0 * pi));
    (y - b * x * x + c * x - 6.0).powi(2) + 10.0 * (1.0 - t) * x.cos() + 10.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_sweep_of_command_trials_covers_its_grid_once_and_names_the_best() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = cluster_with_worker(3).await;
    let directory = tempfile::tempdir().unwrap();
    let space = "x = { uniform = [-5.0, 10.0], steps = 3 }\ny = { uniform = [0.0, 15.0], steps = 3 }";
    // max_trials above the grid's 9 points: the grid ends the sweep.
    let id = submit(&cluster, directory.path(), &branin_sweep("grid", 20, 3, space, ""));
    let shown = wait_for_sweep(&cluster, id, Duration::from_secs(120));
    assert_eq!(shown["state"], "succeeded", "{shown:#}");
    let trials = shown["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 9, "{shown:#}");
    let mut points = BTreeSet::new();
    let mut best = f64::INFINITY;
    for trial in trials {
        assert_eq!(trial["state"], "succeeded", "{trial}");
        let (x, y) = (
            trial["params"]["x"].as_f64().unwrap(),
            trial["params"]["y"].as_f64().unwrap(),
        );
        assert!(points.insert(format!("{x},{y}")), "{x},{y} ran twice: {shown:#}");
        // The value each trial logged through the MLflow API is read back from its run.
        let value = trial["metric"].as_f64().unwrap_or_else(|| panic!("no metric: {trial}"));
        assert!((value - branin(x, y)).abs() < 1e-9, "{trial}");
        best = best.min(value);
    }
    for x in [-5.0, 2.5, 10.0] {
        for y in [0.0, 7.5, 15.0] {
            assert!(points.contains(&format!("{x},{y}")), "{x},{y} never ran: {points:?}");
        }
    }
    assert!(
        (shown["best"]["value"].as_f64().unwrap() - best).abs() < 1e-12,
        "{shown:#}"
    );
    assert!(
        shown["message"].as_str().unwrap().starts_with("best of 9 trials"),
        "{shown:#}"
    );
    assert_eq!(shown["metrics"]["trials"], 9.0);
    // Queue-ahead: a grid draws without the history, so trials stood by behind running ones and took their
    // slots as they exited; never more than `parallel` (3) ran at once, on the leader's clock.
    let (ok, stdout, stderr) = run(&cluster, &["jobs", "list", "--json"]);
    assert!(ok, "{stderr}");
    let jobs: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let trial_jobs: BTreeSet<u64> = trials.iter().map(|trial| trial["job"].as_u64().unwrap()).collect();
    let attempts: Vec<&serde_json::Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|job| trial_jobs.contains(&job["id"].as_u64().unwrap()))
        .flat_map(|job| job["attempts"].as_array().unwrap())
        .collect();
    assert_eq!(attempts.len(), 9, "one attempt per trial: {jobs:#}");
    let handed_on = attempts
        .iter()
        .filter(|attempt| attempt["message"].as_str().unwrap().contains("in the place of"))
        .count();
    assert!(handed_on >= 1, "no trial started in a finished trial's place: {jobs:#}");
    let spans: Vec<(i64, i64)> = attempts
        .iter()
        .map(|attempt| {
            (
                attempt["started_at_ms"].as_i64().unwrap(),
                attempt["ended_at_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    for (start, _) in &spans {
        // A trial that starts in another's place starts in the apply that ends it: [start, end) spans.
        let at_once = spans.iter().filter(|(from, to)| from <= start && start < to).count();
        assert!(at_once <= 3, "{at_once} trials ran at {start}: {spans:?}");
    }
    // Every trial is a run of the sweep's experiment, with its parameters.
    let tracking = cluster.tracking_addresses().unwrap();
    let (ok, stdout, stderr) = run(
        &cluster,
        &[
            "runs",
            "list",
            "--experiment",
            &format!("sweep-{id}-branin-tpe"),
            "--json",
            "--tracking",
            tracking.split(',').next().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    let runs: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 9, "{runs:#}");
    let (ok, listed, _) = run(&cluster, &["sweeps", "list"]);
    assert!(
        ok && listed.contains("branin-tpe") && listed.contains("9/20"),
        "{listed}"
    );
    // The dashboard's page: the trials, the metric by trial and the parallel coordinates.
    let address = tracking.split(',').next().unwrap();
    let (status, html) = kiln_cluster_tests::http_text(address, "GET", &format!("/sweeps/{id}"), "");
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains("best so far") && html.contains("class=\"chart parallel\""),
        "{html}"
    );
    assert_eq!(html.matches("class=\"trial\"").count(), 9, "one line per trial: {html}");
    let (status, html) = kiln_cluster_tests::http_text(address, "GET", "/sweeps", "");
    assert!(
        status == 200 && html.contains(&format!("href=\"/sweeps/{id}\"")),
        "{html}"
    );
    let (status, _) = kiln_cluster_tests::http_text(address, "GET", "/sweeps/999", "");
    assert_eq!(status, 404);
}

/// Any program can be a trial: a shell line reporting through `kiln runs log` (the worker gives it
/// MLFLOW_RUN_ID and KILN_TRACKING), and `kiln runs log` refuses what is not a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_trial_reports_its_metric_with_kiln_runs_log() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = cluster_with_worker(2).await;
    let directory = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"shell\"\nkind = \"sweep\"\n[sweep]\nalgorithm = \"grid\"\nmetric = \"loss\"\n\
         direction = \"minimize\"\nmax_trials = 10\nparallel = 2\nseed = 1\n[space]\n\
         x = {{ uniform = [1.0, 3.0], steps = 3 }}\n[template]\nkind = \"command\"\ncommand = \"sh\"\n\
         args = [\"-c\", \"exec '{KILN}' runs log --metric loss=$KILN_PARAM_X --param shell=yes\"]\n"
    );
    let id = submit(&cluster, directory.path(), &text);
    let shown = wait_for_sweep(&cluster, id, Duration::from_secs(60));
    assert_eq!(shown["state"], "succeeded", "{shown:#}");
    assert_eq!(shown["trials"].as_array().unwrap().len(), 3, "{shown:#}");
    assert_eq!(shown["best"]["value"], 1.0, "{shown:#}");
    let best = shown["trials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|trial| trial["trial"] == shown["best"]["trial"])
        .unwrap();
    let run_id = format!("{:032x}", best["job"].as_u64().unwrap());
    let tracking = cluster.tracking_addresses().unwrap();
    let tracking = tracking.split(',').next().unwrap();
    let (ok, stdout, stderr) = run(&cluster, &["runs", "show", &run_id, "--json", "--tracking", tracking]);
    assert!(ok && stdout.contains("\"shell\""), "{stdout}{stderr}");
    for (args, expected) in [
        (vec!["--metric", "loss=abc"], "expected a number"),
        (vec!["--metric", "=1"], "is not NAME=VALUE"),
        (vec![], "nothing to log"),
    ] {
        let mut all = vec!["runs", "log", "--run", &run_id, "--tracking", tracking];
        all.extend(args);
        let (ok, _, stderr) = run(&cluster, &all);
        assert!(!ok && stderr.contains(expected), "{all:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sweeps_are_refused_and_a_metric_nobody_reports_fails_the_sweep_after_its_first_trials() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::new(Path::new(KILN), 1, &[]).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    for (space, expected) in [
        ("", "the search space is empty"),
        (
            "x = { log_uniform = [0.0, 1.0] }",
            "includes 0 or less; expected 0 < low < high",
        ),
    ] {
        let file = directory.path().join("bad.toml");
        std::fs::write(&file, branin_sweep("random", 5, 1, space, "")).unwrap();
        let (ok, _, stderr) = run(&cluster, &["submit", file.to_str().unwrap()]);
        assert!(!ok && stderr.contains(expected), "{space}: {stderr}");
    }
    let (ok, listed, _) = run(&cluster, &["jobs", "list", "--json"]);
    assert!(ok && listed.trim() == "[]", "nothing was stored: {listed}");

    cluster.start_worker(1, 2, &[]).unwrap();
    cluster.wait_for_workers(1, Duration::from_secs(20)).await.unwrap();
    let space = "x = { uniform = [-5.0, 10.0] }\ny = { uniform = [0.0, 15.0] }";
    let id = submit(
        &cluster,
        directory.path(),
        &branin_sweep("random", 30, 2, space, "OBJECTIVE_METRIC = \"something_else\""),
    );
    let shown = wait_for_sweep(&cluster, id, Duration::from_secs(60));
    assert_eq!(shown["state"], "failed", "{shown:#}");
    let message = shown["message"].as_str().unwrap();
    assert!(
        message.contains("without reporting metric 'branin'") && message.contains("something_else"),
        "{message}"
    );
    // It failed at its first trials, not after running all 30.
    assert!(shown["trials"].as_array().unwrap().len() <= 4, "{shown:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_survives_its_leader_dying_with_exactly_max_trials_trials() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::new(Path::new(KILN), 3, &[]).unwrap();
    cluster.tracking = true;
    cluster.start_all().unwrap();
    let leader = cluster.wait_for_leader(None, Duration::from_secs(10)).await.unwrap();
    cluster.start_worker(1, 2, &[]).unwrap();
    cluster.wait_for_workers(1, Duration::from_secs(20)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let space = "x = { uniform = [-5.0, 10.0] }\ny = { uniform = [0.0, 15.0] }";
    let id = submit(
        &cluster,
        directory.path(),
        &branin_sweep("tpe", 8, 2, space, "OBJECTIVE_SLEEP_S = \"0.5\""),
    );
    // Once some trials are done, the leader dies; another takes over the sweep.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, stdout, _) = run(&cluster, &["sweeps", "show", &id.to_string(), "--json"]);
        if ok {
            let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            if shown["trials_done"].as_u64().unwrap_or(0) >= 3 {
                break;
            }
        }
        assert!(Instant::now() < until, "the sweep did not get going");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.kill(leader).unwrap();
    cluster
        .wait_for_leader(Some(leader), Duration::from_secs(20))
        .await
        .unwrap();
    let shown = wait_for_sweep(&cluster, id, Duration::from_secs(120));
    assert_eq!(shown["state"], "succeeded", "{shown:#}");
    let trials = shown["trials"].as_array().unwrap();
    let numbers: Vec<u64> = trials.iter().map(|trial| trial["trial"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..8).collect::<Vec<u64>>(), "{shown:#}");
    let (ok, listed, _) = run(&cluster, &["jobs", "list", "--json"]);
    assert!(ok);
    let jobs: serde_json::Value = serde_json::from_str(&listed).unwrap();
    // The sweep and its 8 trials: no trial was submitted twice across the failover.
    assert_eq!(jobs.as_array().unwrap().len(), 9, "{jobs:#}");
}

/// The digits ASHA example, with its dataset path made absolute; `random` makes it the full random search
/// over the same trials (the same seed draws the same parameters for each trial number) run to the end.
/// Each function with the trials each sweep runs and the regret to reach.
/// (Over seeds 0..10, in-process: Branin 29.4 trials with TPE against 33.1 with random search, Hartmann-6
/// 23.1 against 26.0, where budget + 1 counts a seed that never got there.)
const REGRET_TARGETS: [(Objective, u32, f64); 2] = [(BRANIN, 35, 0.3), (HARTMANN6, 25, 1.0)];

/// Hyperband through the cluster, with trials that are data-parallel jobs of two ranks each: every trial
/// runs both ranks, and each one ends either done or stopped at a rung, none failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hyperband_sweep_of_two_rank_training_trials_completes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut cluster = cluster_with_worker(2).await;
    cluster.start_worker(2, 2, &[]).unwrap();
    cluster.wait_for_workers(2, Duration::from_secs(20)).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let text = digits_sweep("hyperband")
        .replace("max_trials = 24", "max_trials = 6")
        .replace("workers = 1\n", "workers = 2\n");
    assert!(
        text.contains("workers = 2\n") && text.contains("max_trials = 6"),
        "{text}"
    );
    let id = submit(&cluster, directory.path(), &text);
    let shown = wait_for_sweep(&cluster, id, Duration::from_secs(600));
    assert_eq!(shown["state"], "succeeded", "{shown:#}");
    let trials = shown["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 6, "{shown:#}");
    eprintln!("hyperband: {}", shown["message"]);
    for trial in trials {
        let message = trial["message"].as_str().unwrap_or_default();
        assert!(
            trial["state"] == "succeeded" || message.starts_with("stopped early by Hyperband"),
            "{trial}"
        );
        let (ok, job, stderr) = run(&cluster, &["jobs", "show", &trial["job"].to_string(), "--json"]);
        assert!(ok, "{stderr}");
        let job: serde_json::Value = serde_json::from_str(&job).unwrap();
        let ranks: BTreeSet<String> = job["attempts"][0]["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|task| task["rank"].to_string())
            .collect();
        assert_eq!(ranks.len(), 2, "two ranks: {job:#}");
    }
}

/// How many trials TPE and random search need to come within a regret of each function's minimum, over 10
/// seeds, through `command` trials that read their parameters from the worker's file and log the value
/// through the MLflow API. Each sweep runs one trial at a time, so every suggestion sees all earlier results
/// (the controller's searcher is deterministic in the seed, the trial number and that history, so these
/// sweeps make the same suggestions as `sweep::tests::tpe_needs_fewer_trials_than_random_search_to_reach_a_regret`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpe_needs_fewer_command_trials_than_random_search_to_reach_a_regret_over_ten_seeds() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = cluster_with_worker(8).await;
    let directory = tempfile::tempdir().unwrap();
    let mut sweeps = Vec::new();
    for (objective, budget, regret) in REGRET_TARGETS {
        for seed in 0..10 {
            for algorithm in ["tpe", "random"] {
                let text = objective_sweep(&objective, algorithm, budget, seed);
                let file = directory
                    .path()
                    .join(format!("{}-{algorithm}-{seed}.toml", objective.name));
                std::fs::write(&file, text).unwrap();
                let (ok, stdout, stderr) = run(&cluster, &["submit", file.to_str().unwrap()]);
                assert!(ok, "kiln submit: {stderr}");
                let id: u64 = stdout.trim().parse().unwrap();
                sweeps.push((objective, budget, regret, seed, algorithm, id));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut needed: BTreeMap<(&str, &str), Vec<u32>> = BTreeMap::new();
    for (objective, budget, regret, seed, algorithm, id) in sweeps {
        let shown = wait_for_sweep(&cluster, id, deadline.saturating_duration_since(Instant::now()));
        assert_eq!(shown["state"], "succeeded", "{shown:#}");
        let trials = shown["trials"].as_array().unwrap();
        assert_eq!(trials.len(), budget as usize, "{shown:#}");
        let mut values: Vec<(u64, f64)> = trials
            .iter()
            .map(|trial| {
                assert_eq!(trial["state"], "succeeded", "{trial}");
                (trial["trial"].as_u64().unwrap(), trial["metric"].as_f64().unwrap())
            })
            .collect();
        values.sort_by_key(|(trial, _)| *trial);
        let first = values
            .iter()
            .position(|(_, value)| objective.regret(*value) <= regret)
            .map_or(budget + 1, |index| index as u32 + 1);
        eprintln!(
            "{} {algorithm} seed {seed}: regret {regret} after {first} trials",
            objective.name
        );
        needed.entry((objective.name, algorithm)).or_default().push(first);
    }
    let mean = |counts: &Vec<u32>| counts.iter().sum::<u32>() as f64 / counts.len() as f64;
    for (objective, budget, regret) in REGRET_TARGETS {
        let tpe = mean(&needed[&(objective.name, "tpe")]);
        let random = mean(&needed[&(objective.name, "random")]);
        eprintln!(
            "{}: regret {regret} reached after {tpe:.1} trials with TPE, {random:.1} with random search (budget {budget}; \
             {} counts as never)",
            objective.name,
            budget + 1
        );
        assert!(
            tpe < random,
            "{}: TPE needed {tpe:.1} trials on average to reach regret {regret}, random search {random:.1}: {needed:?}",
            objective.name
        );
    }
}

fn digits_sweep(algorithm: &str) -> String {
    let text = std::fs::read_to_string(examples().join("sweeps/digits-asha.toml")).unwrap();
    let dataset = examples().join("data/digits.csv");
    let text = text.replace("examples/data/digits.csv", dataset.to_str().unwrap());
    if algorithm == "asha" {
        return text;
    }
    text.replace("algorithm = \"asha\"", &format!("algorithm = \"{algorithm}\""))
        .replace("register = \"digits\"\n", "")
        .replace("alias = \"champion\"\n", "")
        .replace("name = \"digits-asha\"", "name = \"digits-full\"")
        .replace(
            "seed = 42\n\n[template.resources]",
            "seed = 42\nepochs = 27\n\n[template.resources]",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asha_on_the_digits_stops_most_trials_early_and_keeps_the_best() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = cluster_with_worker(2).await;
    let directory = tempfile::tempdir().unwrap();
    let asha = submit(&cluster, directory.path(), &digits_sweep("asha"));
    let asha = wait_for_sweep(&cluster, asha, Duration::from_secs(600));
    assert_eq!(asha["state"], "succeeded", "{asha:#}");
    let full = submit(&cluster, directory.path(), &digits_sweep("random"));
    let full = wait_for_sweep(&cluster, full, Duration::from_secs(600));
    assert_eq!(full["state"], "succeeded", "{full:#}");

    let trials = |shown: &serde_json::Value| shown["trials"].as_array().unwrap().clone();
    let (asha_trials, full_trials) = (trials(&asha), trials(&full));
    assert_eq!(asha_trials.len(), 24, "{asha:#}");
    assert_eq!(full_trials.len(), 24, "{full:#}");
    // The same trial numbers drew the same parameters.
    for (a, b) in asha_trials.iter().zip(&full_trials) {
        assert_eq!(a["params"], b["params"]);
    }
    let stopped = asha_trials
        .iter()
        .filter(|trial| {
            trial["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("stopped early")
        })
        .count();
    assert!(stopped >= 12, "{stopped} of 24 trials stopped early: {asha:#}");
    let side_by_side: Vec<String> = asha_trials
        .iter()
        .zip(&full_trials)
        .map(|(a, b)| {
            format!(
                "{} {}: ASHA {} at epoch {}, full {}",
                a["trial"], a["params"], a["metric"], a["epoch"], b["metric"]
            )
        })
        .collect();
    let epochs = |trials: &[serde_json::Value]| -> f64 {
        trials.iter().map(|trial| trial["epoch"].as_f64().unwrap_or(0.0)).sum()
    };
    let (spent, everything) = (epochs(&asha_trials), epochs(&full_trials));
    assert_eq!(everything, 24.0 * 27.0, "{full:#}");
    assert!(
        spent < 0.4 * everything,
        "ASHA spent {spent} trial-epochs of {everything}:\n{}",
        side_by_side.join("\n")
    );
    let best = |shown: &serde_json::Value| shown["best"]["value"].as_f64().unwrap();
    eprintln!(
        "ASHA: {stopped} of 24 trials stopped early, {spent} of {everything} trial-epochs ({:.1}%), best {} against \
         the full search's {}",
        100.0 * spent / everything,
        best(&asha),
        best(&full)
    );
    // Within 1 point of accuracy of the full search's best.
    assert!(
        best(&asha) >= best(&full) - 0.01,
        "ASHA's best {} against {}:\n{}",
        best(&asha),
        best(&full),
        side_by_side.join("\n")
    );

    // The best trial's model is the next version of "digits", with the alias.
    let tracking = cluster.tracking_addresses().unwrap();
    let (ok, shown, stderr) = run(
        &cluster,
        &[
            "models",
            "show",
            "digits",
            "--json",
            "--tracking",
            tracking.split(',').next().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    let model: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert!(model.to_string().contains("champion"), "{model:#}");
    assert!(
        asha["artifacts"]["model"]
            .as_str()
            .unwrap()
            .starts_with("models:/digits/"),
        "{asha:#}"
    );
}
