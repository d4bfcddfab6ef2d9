//! The sweep suites of `kiln bench`.
//!
//! Suite `tpe`: sample efficiency. Kiln's TPE and random search (the searchers the sweep controller runs,
//! called in-process with the same history it would give them) and Optuna's default `TPESampler` (run by
//! `benches/optuna_tpe.py` in `--python`) minimize Branin and Hartmann-6 for `--trials` trials from seeds
//! 0..`--seeds`; the figure is the median regret (best value found minus the known minimum) after the last
//! trial, over the seeds. A median over 10 seeds depends much on which 10: with 20 seeds or more, the
//! seeds are also cut into blocks of 10 (0–9, 10–19, …) and the table counts the blocks where Kiln's median
//! is at most Optuna's.
//!
//! Suite `sweeps`: scheduling overhead. A random sweep of `--trials` `command` trials, `--parallel` at a
//! time, each sleeping `--trial-ms` and logging its metric with `kiln runs log`, through a running cluster;
//! beside it, the same commands run `--parallel` at a time by a local process pool (what a perfect
//! scheduler would do on this machine). Overhead is the sweep's wall time (the leader's clock, from its
//! submission to its end) over the pool's, minus one; the nominal ideal (trials × trial time ÷ parallel)
//! is shown too.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_coordinator::client::{Client, new_idempotency_key};
use kiln_coordinator::sweep::objectives::{OBJECTIVES, Objective};
use kiln_coordinator::sweep::{Direction, Observation, Searcher};
use serde::Serialize;
use serde_json::json;

const OPTUNA_SCRIPT: &str = include_str!("../../benches/optuna_tpe.py");

#[derive(Serialize)]
pub struct SearcherResult {
    pub function: String,
    pub searcher: String,
    pub seeds: usize,
    pub trials: usize,
    pub median_regret: f64,
    pub mean_regret: f64,
    /// Median over seeds of the regret after each trial (the curve a plot draws).
    pub median_curve: Vec<f64>,
    /// The regret after the last trial, per seed in seed order.
    pub final_regrets: Vec<f64>,
}

/// Seeds per block when the table compares blocks of seeds.
const BLOCK_SEEDS: usize = 10;

impl SearcherResult {
    /// The median final regret of each whole block of [`BLOCK_SEEDS`] seeds.
    fn block_medians(&self) -> Vec<f64> {
        self.final_regrets
            .chunks_exact(BLOCK_SEEDS)
            .map(|block| median(&mut block.to_vec()))
            .collect()
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.is_empty() {
        f64::NAN
    } else if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Per-seed curves of the best value after each trial, as regrets, summarized.
fn summarize(objective: &Objective, searcher: &str, curves: &[Vec<f64>]) -> SearcherResult {
    let trials = curves.iter().map(Vec::len).min().unwrap_or(0);
    let regret = |value: f64| objective.regret(value).max(0.0);
    let median_curve = (0..trials)
        .map(|trial| median(&mut curves.iter().map(|curve| regret(curve[trial])).collect::<Vec<_>>()))
        .collect();
    let final_regrets: Vec<f64> = curves
        .iter()
        .filter_map(|curve| curve.get(trials.checked_sub(1)?))
        .map(|value| regret(*value))
        .collect();
    let mut finals = final_regrets.clone();
    SearcherResult {
        function: objective.name.to_string(),
        searcher: searcher.to_string(),
        seeds: curves.len(),
        trials,
        mean_regret: finals.iter().sum::<f64>() / finals.len().max(1) as f64,
        median_regret: median(&mut finals),
        median_curve,
        final_regrets,
    }
}

/// Kiln's searcher minimizing `objective` for `trials` trials from `seed`: the best value after each.
fn kiln_curve(searcher: Searcher, objective: &Objective, seed: u64, trials: usize) -> Result<Vec<f64>> {
    let space = objective.space()?;
    let mut history = Vec::with_capacity(trials);
    let mut best = f64::INFINITY;
    let mut curve = Vec::with_capacity(trials);
    for trial in 0..trials as u64 {
        let params = searcher
            .suggest(&space, seed, trial, Direction::Minimize, &history)?
            .context("the searcher ran out of suggestions")?;
        let value = (objective.evaluate)(&params);
        best = best.min(value);
        curve.push(best);
        history.push(Observation {
            params,
            value: Some(value),
        });
    }
    Ok(curve)
}

/// The `tpe` suite: Kiln's TPE and random search, and Optuna's TPE when `python` has it.
pub fn run_tpe(python: Option<&str>, seeds: usize, trials: usize) -> Result<Vec<SearcherResult>> {
    if seeds == 0 || trials == 0 {
        bail!("--seeds and --trials must be above zero");
    }
    let mut results = Vec::new();
    for objective in &OBJECTIVES {
        for (name, searcher) in [("kiln-tpe", Searcher::Tpe), ("kiln-random", Searcher::Random)] {
            let started = Instant::now();
            let curves = (0..seeds as u64)
                .map(|seed| kiln_curve(searcher, objective, seed, trials))
                .collect::<Result<Vec<_>>>()?;
            tracing::debug!(
                searcher = name,
                function = objective.name,
                per_trial_us = started.elapsed().as_micros() as f64 / (seeds * trials) as f64
            );
            results.push(summarize(objective, name, &curves));
        }
    }
    let Some(python) = python else {
        eprintln!("no --python with optuna given: Kiln's searchers only");
        return Ok(results);
    };
    let directory = tempfile::tempdir().context("a temporary directory for the Optuna script")?;
    let script = directory.path().join("optuna_tpe.py");
    std::fs::write(&script, OPTUNA_SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    eprintln!("running Optuna's TPE ({seeds} seeds × {trials} trials per function) with {python}");
    let output = std::process::Command::new(python)
        .arg(&script)
        .args(["--seeds", &seeds.to_string(), "--trials", &trials.to_string()])
        .output()
        .with_context(|| format!("running {python}"))?;
    if !output.status.success() {
        bail!(
            "the Optuna baseline failed ({}); is optuna installed in {python}?\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let answer: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("the Optuna baseline printed no JSON")?;
    let version = answer["optuna_version"].as_str().unwrap_or("?");
    for objective in &OBJECTIVES {
        let curves: Vec<Vec<f64>> = serde_json::from_value(answer["functions"][objective.name]["curves"].clone())
            .with_context(|| format!("the Optuna baseline's curves for {}", objective.name))?;
        results.push(summarize(objective, &format!("optuna-tpe {version}"), &curves));
    }
    Ok(results)
}

pub fn print_tpe(results: &[SearcherResult]) {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|result| {
            let optuna = results
                .iter()
                .find(|other| other.function == result.function && other.searcher.starts_with("optuna"));
            vec![
                result.function.clone(),
                result.searcher.clone(),
                format!("{} × {}", result.seeds, result.trials),
                format!("{:.4}", result.median_regret),
                format!("{:.4}", result.mean_regret),
                optuna.map_or("-".into(), |optuna| {
                    format!("{:.2}x", result.median_regret / optuna.median_regret)
                }),
                optuna
                    .filter(|optuna| optuna.block_medians().len() >= 2 && !std::ptr::eq(*optuna, result))
                    .map_or("-".into(), |optuna| {
                        let (ours, theirs) = (result.block_medians(), optuna.block_medians());
                        let wins = ours.iter().zip(&theirs).filter(|(ours, theirs)| ours <= theirs).count();
                        format!("{wins} of {}", ours.len().min(theirs.len()))
                    }),
            ]
        })
        .collect();
    crate::output::print_table(
        &[
            "FUNCTION",
            "SEARCHER",
            "SEEDS × TRIALS",
            "MEDIAN REGRET",
            "MEAN REGRET",
            "VS OPTUNA",
            "BLOCKS OF 10 SEEDS AT MOST OPTUNA'S",
        ],
        &rows,
    );
}

#[derive(Serialize)]
pub struct OverheadResult {
    pub trials: usize,
    pub parallel: usize,
    pub trial_ms: u64,
    /// trials × trial_ms ÷ parallel.
    pub nominal_ideal_seconds: f64,
    /// The same commands run `parallel` at a time by a local process pool.
    pub pool_seconds: f64,
    /// From the sweep's submission to its end, on the leader's clock.
    pub sweep_seconds: f64,
    pub overhead_vs_pool: f64,
    pub overhead_vs_nominal: f64,
    /// The mean time one pool command took, from its start to its exit.
    pub pool_command_ms: f64,
    /// The mean time one trial held its slot on the leader's clock, from the commit that started it (its
    /// placement, or its predecessor's exit for a trial that stood by) to the one that recorded its exit. The
    /// next trial starts in that same commit, so a slot is never idle there: what a trial holds beyond a pool
    /// command's time is the path from one trial to the next (for a placement made when the slot freed: its
    /// commit and the assignment; always: the spawn and the exit's report).
    pub trial_slot_ms: f64,
    /// Trials that started in a finished trial's place (queue-ahead: placed on standby behind it, started by
    /// the worker when it exited), not by a placement made after the slot freed.
    pub standby_starts: usize,
    pub sweep_state: String,
    pub sweep_message: String,
}

/// The trial's program: sleep, then log the metric (`value`, the trial's parameter x) into its run.
fn trial_command(kiln: &Path, trial_ms: u64) -> (String, Vec<String>) {
    let script = format!(
        "sleep {:.3} && exec '{}' runs log --metric value=\"$KILN_PARAM_X\"",
        trial_ms as f64 / 1000.0,
        kiln.display()
    );
    ("sh".into(), vec!["-c".into(), script])
}

/// A run to log the pool's commands into (they need one, as trials have theirs).
async fn pool_run(tracking: &str) -> Result<String> {
    let api = crate::runs::Api::new(tracking.split(',').next().unwrap_or_default())?;
    let name = format!("kiln-bench-sweeps-{}", new_idempotency_key());
    let experiment = api
        .post(
            "experiments/create",
            json!({ "name": name }),
            "creating the pool's experiment",
        )
        .await?["experiment_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let run = api
        .post(
            "runs/create",
            json!({ "experiment_id": experiment, "run_name": "local pool" }),
            "creating the pool's run",
        )
        .await?;
    Ok(run["run"]["info"]["run_id"].as_str().unwrap_or_default().to_string())
}

/// The same commands as the trials, `parallel` at a time, straight from this process: the wall seconds.
/// The pool's wall time in seconds and its commands' mean duration in milliseconds.
async fn run_pool(kiln: &Path, tracking: &str, trials: usize, parallel: usize, trial_ms: u64) -> Result<(f64, f64)> {
    let run = pool_run(tracking).await?;
    let (program, args) = trial_command(kiln, trial_ms);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut lanes = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let (next, program, args, run, tracking) = (
            next.clone(),
            program.clone(),
            args.clone(),
            run.clone(),
            tracking.to_string(),
        );
        lanes.spawn(async move {
            let mut busy = Duration::ZERO;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= trials {
                    break;
                }
                let command_started = Instant::now();
                // Spread over [0, 1) like the sweep's uniform x.
                let x = (index as f64 * 0.618_033_988_749_895).fract();
                let status = tokio::process::Command::new(&program)
                    .args(&args)
                    .env("MLFLOW_RUN_ID", &run)
                    .env("KILN_TRACKING", &tracking)
                    .env("KILN_PARAM_X", x.to_string())
                    .status()
                    .await
                    .with_context(|| format!("starting {program}"))?;
                if !status.success() {
                    bail!("a pool command failed: {status}");
                }
                busy += command_started.elapsed();
            }
            Ok(busy)
        });
    }
    let mut busy = Duration::ZERO;
    while let Some(lane) = lanes.join_next().await {
        busy += lane??;
    }
    Ok((
        started.elapsed().as_secs_f64(),
        busy.as_secs_f64() * 1000.0 / trials as f64,
    ))
}

fn sweep_toml(kiln: &Path, trials: usize, parallel: usize, trial_ms: u64) -> String {
    let (program, args) = trial_command(kiln, trial_ms);
    format!(
        "name = \"bench-overhead\"\nkind = \"sweep\"\n\n[sweep]\nalgorithm = \"random\"\nmetric = \"value\"\n\
         direction = \"minimize\"\nmax_trials = {trials}\nparallel = {parallel}\nseed = 1\n\n[space]\n\
         x = {{ uniform = [0.0, 1.0] }}\n\n[template]\nkind = \"command\"\ncommand = {}\nargs = {}\n\n\
         [template.resources]\ncpus = 1\n",
        // JSON strings and arrays of strings are TOML too.
        serde_json::to_string(&program).unwrap_or_default(),
        serde_json::to_string(&args).unwrap_or_default(),
    )
}

/// The `sweeps` suite against the cluster at `coordinator` (its MLflow API at `tracking`).
pub async fn run_overhead(
    coordinator: &str,
    tracking: &str,
    trials: usize,
    parallel: usize,
    trial_ms: u64,
    max_seconds: u64,
) -> Result<OverheadResult> {
    if trials == 0 || parallel == 0 {
        bail!("--trials and --parallel must be above zero");
    }
    let kiln = std::env::current_exe().context("the path of this kiln binary (the trials run it)")?;
    let mut client = Client::new(coordinator)?;
    let workers = client.list_workers().await.map_err(crate::output::status_error)?;
    let slots: u32 = workers
        .iter()
        .filter(|worker| worker.state == "alive")
        .map(|worker| worker.total.unwrap_or_default().cpus)
        .sum();
    if (slots as usize) < parallel {
        bail!(
            "the cluster at {coordinator} has {slots} CPU slots on alive workers; --parallel {parallel} needs as many \
             (kiln up --workers 1 --worker-cpus {parallel})"
        );
    }
    eprintln!("local pool: {trials} commands, {parallel} at a time");
    let (pool_seconds, pool_command_ms) = run_pool(&kiln, tracking, trials, parallel, trial_ms).await?;
    eprintln!("sweep: {trials} trials, {parallel} at a time");
    let spec = sweep_toml(&kiln, trials, parallel, trial_ms);
    let sweep = client
        .submit(&spec, "bench-overhead.toml", &new_idempotency_key())
        .await
        .map_err(crate::output::status_error)?
        .job
        .context("no job returned")?;
    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_message(format!("sweep {} running", sweep.id));
    progress.enable_steady_tick(Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let finished = loop {
        let job = client.get_job(sweep.id).await.map_err(crate::output::status_error)?;
        if kiln_coordinator::client::is_finished(job.state) {
            break job;
        }
        if Instant::now() > deadline {
            bail!("sweep {} still running after {max_seconds} s", sweep.id);
        }
        // Light polling: the leader's own clock times the sweep, not this loop.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    progress.finish_and_clear();
    let sweep_seconds = (finished.finished_at_ms - finished.submitted_at_ms) as f64 / 1000.0;
    let nominal = trials as f64 * trial_ms as f64 / 1000.0 / parallel as f64;
    // The trials are the jobs submitted after the sweep, read a page at a time.
    let mut jobs = Vec::new();
    loop {
        let after = jobs.last().map_or(sweep.id, |job: &kiln_proto::Job| job.id);
        let page = client
            .list_jobs_after(Vec::new(), 500, after)
            .await
            .map_err(crate::output::status_error)?;
        if page.is_empty() {
            break;
        }
        jobs.extend(page);
    }
    let attempts: Vec<&kiln_proto::Attempt> = jobs
        .iter()
        .filter(|job| job.name.starts_with("bench-overhead-t"))
        .flat_map(|job| &job.attempts)
        .collect();
    let runs: Vec<f64> = attempts
        .iter()
        .map(|attempt| (attempt.ended_at_ms - attempt.started_at_ms) as f64)
        .collect();
    let standby_starts = attempts
        .iter()
        .filter(|attempt| attempt.message.contains("in the place of"))
        .count();
    let trial_slot_ms = runs.iter().sum::<f64>() / runs.len().max(1) as f64;
    Ok(OverheadResult {
        trials,
        parallel,
        trial_ms,
        nominal_ideal_seconds: nominal,
        pool_seconds,
        sweep_seconds,
        overhead_vs_pool: sweep_seconds / pool_seconds - 1.0,
        overhead_vs_nominal: sweep_seconds / nominal - 1.0,
        pool_command_ms,
        trial_slot_ms,
        standby_starts,
        sweep_state: crate::output::state_label(finished.state).to_string(),
        sweep_message: finished.message,
    })
}

pub fn print_overhead(result: &OverheadResult) {
    crate::output::print_table(
        &[
            "TRIALS",
            "PARALLEL",
            "TRIAL MS",
            "NOMINAL S",
            "LOCAL POOL S",
            "SWEEP S",
            "OVERHEAD VS POOL",
            "VS NOMINAL",
        ],
        &[vec![
            result.trials.to_string(),
            result.parallel.to_string(),
            result.trial_ms.to_string(),
            format!("{:.2}", result.nominal_ideal_seconds),
            format!("{:.2}", result.pool_seconds),
            format!("{:.2}", result.sweep_seconds),
            format!("{:+.1}%", result.overhead_vs_pool * 100.0),
            format!("{:+.1}%", result.overhead_vs_nominal * 100.0),
        ]],
    );
    println!(
        "a pool command took {:.1} ms on average, a trial held its slot {:.1} ms (start to reported exit, the \
         leader's clock): {:+.1} ms a trial for what starting and ending it costs; {} of {} trials started in a \
         finished trial's place (standby)",
        result.pool_command_ms,
        result.trial_slot_ms,
        result.trial_slot_ms - result.pool_command_ms,
        result.standby_starts,
        result.trials
    );
    println!("sweep {}: {}", result.sweep_state, result.sweep_message);
}
