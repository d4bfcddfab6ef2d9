//! `kiln sweeps list | show ID`: hyperparameter sweeps and their trials. A sweep is a job of kind `sweep`;
//! its trials are the jobs whose environment names it (`KILN_SWEEP`), so both are read through the job API.
//! A trial's metric comes from its job (Kiln's trainer reports it) or, for programs that log through the
//! MLflow API, from its run, through `--tracking`.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::collections::HashMap;

use kiln_coordinator::sweep::{PARAMS_ENV, SWEEP_ENV, SweepSpec, TRIAL_ENV, experiment_name};
use kiln_coordinator::tracking::Tracking;
use kiln_proto as pb;
use serde_json::{Value, json};

use crate::output::{print_table, state_label, status_error};

#[derive(Subcommand)]
pub enum SweepsCommand {
    /// Sweeps in id order: state, algorithm, trials done of the most, the best value so far.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One sweep: its settings and every trial with its parameters, state, metric and how far it got.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

/// A trial as listed: its number, its job, and its parameters.
struct Trial {
    number: u64,
    job: pb::Job,
    params: Value,
}

fn env_of(job: &pb::Job) -> Value {
    serde_json::from_str::<Value>(&job.spec_json)
        .map(|spec| spec["env"].clone())
        .unwrap_or(Value::Null)
}

/// The trials of each sweep, by sweep id, in trial order.
fn trials_by_sweep(jobs: &[pb::Job]) -> std::collections::BTreeMap<u64, Vec<Trial>> {
    let mut trials: std::collections::BTreeMap<u64, Vec<Trial>> = Default::default();
    for job in jobs {
        let env = env_of(job);
        let (Some(sweep), Some(number)) = (
            env[SWEEP_ENV].as_str().and_then(|id| id.parse().ok()),
            env[TRIAL_ENV].as_str().and_then(|number| number.parse().ok()),
        ) else {
            continue;
        };
        let params = env[PARAMS_ENV]
            .as_str()
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or(Value::Null);
        trials.entry(sweep).or_default().push(Trial {
            number,
            job: job.clone(),
            params,
        });
    }
    for list in trials.values_mut() {
        list.sort_by_key(|trial| trial.number);
    }
    trials
}

/// The latest value of `metric` in each run of the sweep's experiment, by run id: one paged run search
/// (when a tracking API answers) rather than a request per trial.
async fn run_values(api: Option<&crate::runs::Api>, sweep: &pb::Job, metric: &str) -> HashMap<String, f64> {
    let mut values = HashMap::new();
    let Some(api) = api else { return values };
    let name = experiment_name(sweep.id, &sweep.name);
    let Ok(found) = api
        .get("experiments/get-by-name", &[("experiment_name", &name)], &name)
        .await
    else {
        return values;
    };
    let experiment = found["experiment"]["experiment_id"].clone();
    let mut token = Value::Null;
    loop {
        let body = json!({ "experiment_ids": [experiment], "max_results": 1000, "page_token": token });
        let Ok(page) = api.post("runs/search", body, "the sweep's runs").await else {
            return values;
        };
        for run in page["runs"].as_array().into_iter().flatten() {
            let value = run["data"]["metrics"]
                .as_array()
                .and_then(|metrics| metrics.iter().find(|entry| entry["key"] == metric))
                .and_then(|entry| entry["value"].as_f64());
            if let (Some(id), Some(value)) = (run["info"]["run_id"].as_str(), value) {
                values.insert(id.to_string(), value);
            }
        }
        token = page["next_page_token"].clone();
        if token.is_null() {
            return values;
        }
    }
}

async fn sweep_json(sweep: &pb::Job, trials: &[Trial], api: Option<&crate::runs::Api>) -> Result<Value> {
    let spec = SweepSpec::read(&sweep.spec_toml).with_context(|| format!("sweep {} cannot be read", sweep.id))?;
    let mut listed = Vec::new();
    let mut best: Option<(f64, u64)> = None;
    let runs = run_values(api, sweep, &spec.metric).await;
    for trial in trials {
        // Its job's value (Kiln's trainer reports it), else its run's.
        let value = trial
            .job
            .metrics
            .get(&spec.metric)
            .or_else(|| runs.get(&Tracking::job_run_id(trial.job.id)))
            .copied();
        if let Some(value) = value
            && trial.job.state == pb::JobState::Succeeded as i32
            && best.is_none_or(|(current, _)| spec.direction.loss(value) < spec.direction.loss(current))
        {
            best = Some((value, trial.number));
        }
        listed.push(json!({
            "trial": trial.number,
            "job": trial.job.id,
            "state": state_label(trial.job.state),
            "params": trial.params,
            "metric": value,
            "epoch": trial.job.metrics.get("epoch"),
            "message": trial.job.message,
        }));
    }
    let done = trials
        .iter()
        .filter(|trial| {
            trial.job.state != pb::JobState::Queued as i32 && trial.job.state != pb::JobState::Running as i32
        })
        .count();
    Ok(json!({
        "id": sweep.id,
        "name": sweep.name,
        "state": state_label(sweep.state),
        "algorithm": format!("{:?}", spec.algorithm).to_lowercase(),
        "metric": spec.metric,
        "direction": format!("{:?}", spec.direction).to_lowercase(),
        "max_trials": spec.max_trials,
        "parallel": spec.parallel,
        "trials_started": trials.len(),
        "trials_done": done,
        "best": best.map(|(value, trial)| json!({ "trial": trial, "value": value })),
        "message": sweep.message,
        "metrics": sweep.metrics,
        "artifacts": sweep.artifacts,
        "trials": listed,
    }))
}

fn short(value: &Value) -> String {
    match value.as_f64() {
        Some(number) if number.fract() != 0.0 => format!("{number:.4}"),
        _ => crate::runs::text(value),
    }
}

pub async fn run(command: SweepsCommand, client: &mut kiln_coordinator::client::Client, tracking: &str) -> Result<()> {
    let jobs = client.list_jobs(Vec::new(), 0).await.map_err(status_error)?;
    let api = crate::runs::Api::new(tracking).ok();
    let trials = trials_by_sweep(&jobs);
    let none = Vec::new();
    match command {
        SweepsCommand::List { json } => {
            let mut sweeps = Vec::new();
            for sweep in jobs.iter().filter(|job| job.kind == "sweep") {
                sweeps.push(sweep_json(sweep, trials.get(&sweep.id).unwrap_or(&none), api.as_ref()).await?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&sweeps)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = sweeps
                .iter()
                .map(|sweep| {
                    vec![
                        sweep["id"].to_string(),
                        crate::runs::text(&sweep["name"]),
                        crate::runs::text(&sweep["state"]),
                        crate::runs::text(&sweep["algorithm"]),
                        format!("{}/{}", sweep["trials_done"], sweep["max_trials"]),
                        format!(
                            "{} {}",
                            crate::runs::text(&sweep["metric"]),
                            sweep["best"]["value"]
                                .as_f64()
                                .map_or("-".to_string(), |value| format!("{value:.4}"))
                        ),
                    ]
                })
                .collect();
            print_table(&["ID", "NAME", "STATE", "ALGORITHM", "TRIALS", "BEST"], &rows);
        }
        SweepsCommand::Show { id, json } => {
            let Some(sweep) = jobs.iter().find(|job| job.id == id) else {
                bail!("job {id} does not exist");
            };
            if sweep.kind != "sweep" {
                bail!(
                    "job {id} is a {} job, not a sweep (kiln sweeps list shows the sweeps)",
                    sweep.kind
                );
            }
            let shown = sweep_json(sweep, trials.get(&id).unwrap_or(&none), api.as_ref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
                return Ok(());
            }
            println!(
                "sweep {} {} ({}): {} of {} by {} {} trials at a time; {} {}",
                shown["id"],
                crate::runs::text(&shown["name"]),
                crate::runs::text(&shown["state"]),
                shown["trials_started"],
                shown["max_trials"],
                crate::runs::text(&shown["algorithm"]),
                shown["parallel"],
                crate::runs::text(&shown["direction"]),
                crate::runs::text(&shown["metric"]),
            );
            if !sweep.message.is_empty() {
                println!("{}", sweep.message);
            }
            let rows: Vec<Vec<String>> = shown["trials"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|trial| {
                    let params = trial["params"]
                        .as_object()
                        .map(|params| {
                            params
                                .iter()
                                .map(|(name, value)| format!("{name}={}", short(value)))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    vec![
                        trial["trial"].to_string(),
                        trial["job"].to_string(),
                        crate::runs::text(&trial["state"]),
                        trial["metric"]
                            .as_f64()
                            .map_or("-".into(), |value| format!("{value:.4}")),
                        trial["epoch"].as_f64().map_or("-".into(), |epoch| epoch.to_string()),
                        params,
                    ]
                })
                .collect();
            print_table(&["TRIAL", "JOB", "STATE", "METRIC", "EPOCH", "PARAMS"], &rows);
        }
    }
    Ok(())
}
