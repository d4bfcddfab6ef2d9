//! `kiln runs list | show | compare | log`: experiment runs (train jobs' and any MLflow client's) as the
//! coordinators' MLflow tracking API serves them, as tables or `--json`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::output::print_table;

#[derive(Subcommand)]
pub enum RunsCommand {
    /// Runs, newest first: one experiment's (by name), or every active experiment's.
    List {
        #[arg(long)]
        experiment: Option<String>,
        /// MLflow's search filter, e.g. "metrics.validation_accuracy > 0.9 and params.model = 'mlp'".
        #[arg(long, default_value = "")]
        filter: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One run: its status, times, params, latest metrics and tags.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Runs side by side: every param and latest metric any of them has.
    Compare {
        #[arg(required = true, num_args = 2..)]
        ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Log metrics and params into a run, as `mlflow.log_metric` does: any program, a shell script
    /// included, can report a sweep trial's result this way (`kiln runs log --metric loss=0.25`; the
    /// worker sets MLFLOW_RUN_ID and KILN_TRACKING for a trial).
    Log {
        /// The run to log into.
        #[arg(long, env = "MLFLOW_RUN_ID")]
        run: String,
        /// A metric as NAME=VALUE (repeatable).
        #[arg(long = "metric", value_name = "NAME=VALUE", value_parser = parse_metric)]
        metrics: Vec<(String, f64)>,
        /// A param as NAME=VALUE (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// The step the metrics were measured at (an epoch, say).
        #[arg(long, default_value_t = 0)]
        step: i64,
    },
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => Ok((name.trim().to_string(), value.to_string())),
        _ => Err(format!("'{text}' is not NAME=VALUE")),
    }
}

fn parse_metric(text: &str) -> Result<(String, f64), String> {
    let (name, value) = parse_param(text)?;
    let number: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("the value of metric '{name}' is '{value}'; expected a number"))?;
    if !number.is_finite() {
        return Err(format!(
            "the value of metric '{name}' is {number}; expected a finite number"
        ));
    }
    Ok((name, number))
}

/// The MLflow tracking API of a coordinator, over HTTP (`kiln runs`, `kiln models`, `kiln artifacts`).
pub(crate) struct Api {
    pub(crate) client: reqwest::Client,
    /// `http://HOST:PORT`.
    pub(crate) host: String,
}

impl Api {
    pub(crate) fn new(address: &str) -> Result<Api> {
        // No overall timeout: artifact transfers stream for as long as they need; connecting is bounded.
        // Plain HTTP: no root certificates to load (reading the system's bundle took most of a short
        // `kiln runs log`'s start).
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tls_built_in_root_certs(false)
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            client,
            host: format!("http://{}", address.trim_start_matches("http://").trim_end_matches('/')),
        })
    }

    pub(crate) fn unreachable(&self) -> String {
        format!(
            "no MLflow tracking API answers at {} (kiln up serves one on 127.0.0.1:7080; --tracking)",
            self.host
        )
    }

    pub(crate) async fn call(&self, request: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        let response = request
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| self.unreachable())?;
        answer(response, what).await
    }

    pub(crate) async fn get(&self, path: &str, query: &[(&str, &str)], what: &str) -> Result<Value> {
        self.call(
            self.client
                .get(format!("{}/api/2.0/mlflow/{path}", self.host))
                .query(query),
            what,
        )
        .await
    }

    pub(crate) async fn post(&self, path: &str, body: Value, what: &str) -> Result<Value> {
        self.call(
            self.client
                .post(format!("{}/api/2.0/mlflow/{path}", self.host))
                .json(&body),
            what,
        )
        .await
    }

    pub(crate) async fn run(&self, id: &str) -> Result<Value> {
        Ok(self.get("runs/get", &[("run_id", id)], &format!("run {id}")).await?["run"].take())
    }
}

/// Runs `step` against each address of `tracking` (a comma-separated list) in turn, for a few rounds, so a
/// coordinator failing over does not lose what a task hands the cluster. `step` must be safe to repeat.
pub(crate) async fn through_tracking<T, F, Fut>(tracking: &str, what: &str, step: F) -> Result<T>
where
    F: Fn(Api) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let addresses: Vec<&str> = tracking
        .split(',')
        .map(str::trim)
        .filter(|address| !address.is_empty())
        .collect();
    let mut failure = anyhow::anyhow!("KILN_TRACKING names no address");
    for round in 0..5 {
        if round > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for address in &addresses {
            match step(Api::new(address)?).await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    eprintln!("{what} through {address}: {error:#}");
                    failure = error;
                }
            }
        }
    }
    Err(failure.context(format!("{what} failed")))
}

/// A response's JSON body, or its MLflow error as an error.
pub(crate) async fn answer(response: reqwest::Response, what: &str) -> Result<Value> {
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("{what}: the answer is not JSON"))?;
    if !status.is_success() {
        bail!(
            "{what}: {} ({})",
            body["message"].as_str().unwrap_or("no message"),
            body["error_code"].as_str().unwrap_or(status.as_str())
        );
    }
    Ok(body)
}

/// The `key`/`value` pairs of a run's params, metrics or tags.
fn pairs(run: &Value, field: &str) -> Vec<(String, Value)> {
    run["data"][field]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| {
                    (
                        item["key"].as_str().unwrap_or_default().to_string(),
                        item["value"].clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The metrics worth a glance, at most `count`: validation metrics first, then losses, then the rest;
/// counters and throughputs (`step`, `epoch`, `*_per_second`) left out.
pub(crate) fn headline_metrics(metrics: Vec<(String, Value)>, count: usize) -> Vec<(String, Value)> {
    let rank = |key: &str| {
        if key.starts_with("validation_") {
            0
        } else if key.contains("loss") {
            1
        } else {
            2
        }
    };
    let mut kept: Vec<(String, Value)> = metrics
        .into_iter()
        .filter(|(key, _)| !matches!(key.as_str(), "step" | "epoch") && !key.ends_with("_per_second"))
        .collect();
    kept.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then_with(|| a.0.cmp(&b.0)));
    kept.truncate(count);
    kept
}

pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => match number.as_f64() {
            Some(float) if number.is_f64() => format!("{float:.4}"),
            _ => number.to_string(),
        },
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub(crate) fn when(millis: &Value) -> String {
    match millis.as_i64().and_then(|millis| u64::try_from(millis).ok()) {
        Some(millis) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(millis)).to_string()
        }
        None => "-".into(),
    }
}

fn duration(info: &Value) -> String {
    match (info["start_time"].as_i64(), info["end_time"].as_i64()) {
        (Some(start), Some(end)) => format!("{:.1}s", (end - start) as f64 / 1000.0),
        _ => "-".into(),
    }
}

pub async fn run(command: RunsCommand, tracking: &str) -> Result<()> {
    let api = Api::new(tracking.split(',').next().unwrap_or_default())?;
    match command {
        RunsCommand::Log {
            run,
            metrics,
            params,
            step,
        } => {
            if metrics.is_empty() && params.is_empty() {
                bail!("nothing to log: give --metric NAME=VALUE or --param NAME=VALUE");
            }
            let timestamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as i64);
            let body = json!({
                "run_id": run,
                "metrics": metrics
                    .iter()
                    .map(|(key, value)| json!({ "key": key, "value": value, "timestamp": timestamp, "step": step }))
                    .collect::<Vec<_>>(),
                "params": params
                    .iter()
                    .map(|(key, value)| json!({ "key": key, "value": value }))
                    .collect::<Vec<_>>(),
            });
            // KILN_TRACKING may list every coordinator: the first that answers takes the batch.
            let what = format!("logging into run {run}");
            through_tracking(tracking, &what, |api| {
                let body = body.clone();
                let what = what.clone();
                async move { api.post("runs/log-batch", body, &what).await }
            })
            .await?;
            Ok(())
        }
        RunsCommand::List {
            experiment,
            filter,
            limit,
            json,
        } => {
            let experiment_ids: Vec<String> = match &experiment {
                Some(name) => {
                    let found = api
                        .get(
                            "experiments/get-by-name",
                            &[("experiment_name", name)],
                            &format!("experiment '{name}'"),
                        )
                        .await?;
                    vec![
                        found["experiment"]["experiment_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ]
                }
                None => api
                    .post("experiments/search", json!({ "max_results": 1000 }), "the experiments")
                    .await?["experiments"]
                    .as_array()
                    .map(|all| {
                        all.iter()
                            .filter_map(|e| e["experiment_id"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            if experiment_ids.is_empty() {
                if json {
                    println!("[]");
                } else {
                    println!("no runs yet");
                }
                return Ok(());
            }
            let body = json!({
                "experiment_ids": experiment_ids,
                "filter": filter,
                "max_results": limit.max(1),
                "order_by": ["attributes.start_time DESC"],
            });
            let found = api.post("runs/search", body, "the run search").await?;
            let runs = found["runs"].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = runs
                .iter()
                .map(|run| {
                    let info = &run["info"];
                    let metrics: Vec<String> = headline_metrics(pairs(run, "metrics"), 3)
                        .into_iter()
                        .map(|(key, value)| format!("{key}={}", text(&value)))
                        .collect();
                    vec![
                        text(&info["run_id"]),
                        text(&info["run_name"]),
                        text(&info["experiment_id"]),
                        text(&info["status"]),
                        when(&info["start_time"]),
                        duration(info),
                        metrics.join(" "),
                    ]
                })
                .collect();
            print_table(
                &[
                    "RUN ID",
                    "NAME",
                    "EXPERIMENT",
                    "STATUS",
                    "STARTED",
                    "DURATION",
                    "METRICS",
                ],
                &rows,
            );
            Ok(())
        }
        RunsCommand::Show { id, json } => {
            let run = api.run(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&run)?);
                return Ok(());
            }
            let info = &run["info"];
            println!("run {} ({})", text(&info["run_id"]), text(&info["run_name"]));
            println!("  experiment  {}", text(&info["experiment_id"]));
            println!("  status      {}", text(&info["status"]));
            println!("  started     {}", when(&info["start_time"]));
            println!("  duration    {}", duration(info));
            println!("  artifacts   {}", text(&info["artifact_uri"]));
            for (title, field) in [("params", "params"), ("metrics (latest)", "metrics"), ("tags", "tags")] {
                let entries = pairs(&run, field);
                if entries.is_empty() {
                    continue;
                }
                println!("{title}:");
                let width = entries.iter().map(|(key, _)| key.chars().count()).max().unwrap_or(0);
                for (key, value) in &entries {
                    println!("  {key:<width$}  {}", text(value));
                }
            }
            Ok(())
        }
        RunsCommand::Compare { ids, json } => {
            let mut runs = Vec::new();
            for id in &ids {
                runs.push(api.run(id).await?);
            }
            let keys = |field: &str| -> BTreeSet<String> {
                runs.iter()
                    .flat_map(|run| pairs(run, field).into_iter().map(|(key, _)| key))
                    .collect()
            };
            let (params, metrics) = (keys("params"), keys("metrics"));
            let value_of = |run: &Value, field: &str, key: &str| {
                pairs(run, field)
                    .into_iter()
                    .find(|(name, _)| name == key)
                    .map_or(Value::Null, |(_, value)| value)
            };
            if json {
                let table: Vec<Value> = runs
                    .iter()
                    .map(|run| {
                        let section = |field: &str, names: &BTreeSet<String>| -> serde_json::Map<String, Value> {
                            names
                                .iter()
                                .map(|key| (key.clone(), value_of(run, field, key)))
                                .collect()
                        };
                        json!({
                            "run_id": run["info"]["run_id"],
                            "run_name": run["info"]["run_name"],
                            "status": run["info"]["status"],
                            "params": section("params", &params),
                            "metrics": section("metrics", &metrics),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&table)?);
                return Ok(());
            }
            let mut headers = vec!["".to_string()];
            headers.extend(runs.iter().map(|run| text(&run["info"]["run_name"])));
            let mut rows = vec![{
                let mut row = vec!["run id".to_string()];
                row.extend(runs.iter().map(|run| text(&run["info"]["run_id"])));
                row
            }];
            for (field, label, names) in [("params", "param", &params), ("metrics", "metric", &metrics)] {
                for key in names {
                    let mut row = vec![format!("{label} {key}")];
                    row.extend(runs.iter().map(|run| text(&value_of(run, field, key))));
                    rows.push(row);
                }
            }
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            print_table(&headers, &rows);
            Ok(())
        }
    }
}
