//! The dashboard, served on the tracking port beside the MLflow API: plain HTML rendered here, charts and
//! the lineage graph as inline SVG, no script and no build step. Every coordinator serves it from its own
//! replicated state (reads after a ReadIndex, so any node shows what was acknowledged).
//!
//! ```text
//!   /                    the cluster (members, leader, workers and their load), recent jobs, runs, models
//!   /jobs                every job;  /jobs/ID   its attempts, ranks, metrics and each rank's output
//!   /runs                runs of an experiment: filter (MLflow's syntax), sort by any column, compare
//!   /runs/ID             params, a chart per metric, inputs, artifacts
//!   /compare?runs=A&runs=B   the runs' metrics overlaid, their params side by side
//!   /models, /models/NAME    registered models, versions, stages and aliases
//!   /lineage?id=NAME     the graph around a model version, dataset or run
//!   /sweeps, /sweeps/ID  sweeps; a sweep's trials, its metric by trial and its parallel coordinates
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use axum::extract::Path as UrlPath;

use super::*;
use crate::lineage::{Direction, Graph};
use crate::state::{Job, Worker};

mod svg;

use svg::{ColumnValue, PALETTE, Series, escape};

/// Lines of each rank's output a job page shows (the end of it).
const LOG_LINES_SHOWN: usize = 200;
/// Runs a runs page lists at most.
const RUNS_SHOWN: usize = 500;

pub(super) fn routes() -> axum::Router<Tracker> {
    axum::Router::new()
        .route("/", get(overview))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/runs", get(runs))
        .route("/runs/{id}", get(run))
        .route("/compare", get(compare))
        .route("/models", get(models))
        .route("/models/{name}", get(model))
        .route("/lineage", get(lineage))
        .route("/sweeps", get(sweeps))
        .route("/sweeps/{id}", get(sweep))
        .route("/favicon.ico", get(favicon))
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222}\
header{background:#2b2118;color:#fff;padding:10px 20px}header a{color:#ffd9a8;margin-right:18px;text-decoration:none}\
header b{margin-right:28px}main{padding:16px 20px}table{border-collapse:collapse;margin:8px 0 18px}\
th,td{border-bottom:1px solid #e5e5e5;padding:4px 10px;text-align:left;font-size:13px;vertical-align:top}\
th a{color:#222}td.num{text-align:right;font-variant-numeric:tabular-nums}pre{background:#f7f7f7;padding:8px;\
overflow:auto;max-height:420px;font-size:12px}.state-succeeded,.state-FINISHED,.state-alive{color:#2ca02c}\
.state-failed,.state-FAILED,.state-lost{color:#d62728}.state-running,.state-RUNNING{color:#1f77b4}\
.state-cancelled,.state-KILLED{color:#888}.charts svg{margin:4px 12px 12px 0;border:1px solid #eee}\
.muted{color:#777}form.inline{display:inline}input[type=text]{width:420px}";

fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · Kiln</title><style>{STYLE}</style></head><body><header><b>Kiln</b><a href=\"/\">Cluster</a><a href=\"/jobs\">Jobs</a><a href=\"/runs\">Runs</a><a href=\"/models\">Models</a><a href=\"/sweeps\">Sweeps</a></header><main><h1>{}</h1>{body}</main></body></html>",
        escape(title),
        escape(title)
    );
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .body(Body::from(html))
        .expect("a valid response")
}

/// A page that could not be drawn: the reason, with the status it deserves.
fn trouble(failure: Failure) -> Response {
    let mut response = page(
        "Not available",
        &format!(
            "<p>{}</p><p class=\"muted\">{}</p>",
            escape(&failure.message),
            failure.code
        ),
    );
    *response.status_mut() = failure.status;
    response
}

fn render(result: Result<Response, Failure>) -> Response {
    result.unwrap_or_else(trouble)
}

async fn favicon() -> Response {
    let icon = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><rect width=\"16\" height=\"16\" rx=\"3\" fill=\"#c2410c\"/></svg>";
    Response::builder()
        .header(header::CONTENT_TYPE, "image/svg+xml")
        .body(Body::from(icon))
        .expect("a valid response")
}

fn when(millis: i64) -> String {
    u64::try_from(millis)
        .ok()
        .filter(|millis| *millis > 0)
        .map(|millis| humantime_like(std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis)))
        .unwrap_or_else(|| "-".into())
}

/// `2026-11-26 09:53:05` in UTC.
fn humantime_like(time: std::time::SystemTime) -> String {
    let seconds = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64);
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.4}")
    }
}

/// A link to what a lineage node is, when it has a page.
fn node_link(id: &str) -> Option<String> {
    if let Some(run) = id.strip_prefix("run:") {
        return Some(format!("/runs/{run}"));
    }
    if let Some(model) = id.strip_prefix("model:") {
        let name = model.rsplit_once('/').map_or(model, |(name, _)| name);
        return Some(format!("/models/{}", url_part(name)));
    }
    Some(format!("/lineage?id={}", url_part(id)))
}

/// Text for a URL query or path part.
fn url_part(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

impl Tracker {
    async fn jobs(&self) -> Result<Vec<Job>, Failure> {
        let query = Query::ListJobs {
            states: Vec::new(),
            limit: 0,
            after_id: 0,
        };
        match self.shared.query(query).await? {
            QueryResult::Jobs(jobs) => Ok(jobs),
            other => Err(Failure::from(CoordinatorError::Internal(format!(
                "unexpected answer {other:?}"
            )))),
        }
    }

    async fn workers(&self) -> Result<Vec<Worker>, Failure> {
        match self.shared.query(Query::ListWorkers).await? {
            QueryResult::Workers(workers) => Ok(workers),
            other => Err(Failure::from(CoordinatorError::Internal(format!(
                "unexpected answer {other:?}"
            )))),
        }
    }
}

fn jobs_table(jobs: &[&Job]) -> String {
    let mut html = String::from(
        "<table><tr><th>ID</th><th>Name</th><th>Kind</th><th>State</th><th>Ranks</th><th>Submitted</th><th>Message</th></tr>",
    );
    for job in jobs {
        let state = job.state.label();
        let _ = write!(
            html,
            "<tr><td><a href=\"/jobs/{}\">{}</a></td><td>{}</td><td>{:?}</td><td class=\"state-{state}\">{state}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            job.id,
            job.id,
            escape(&job.spec.name),
            job.spec.kind,
            job.spec.resources.workers,
            when(job.submitted_at_ms),
            escape(&job.message)
        );
    }
    html.push_str("</table>");
    html
}

async fn overview(State(tracker): State<Tracker>) -> Response {
    render(
        async {
            let status = tracker.shared.cluster_status().await?;
            let mut html = format!(
                "<h2>Members</h2><p>leader <b>{}</b>, term {}, commit {}, applied {} (answered by node {})</p><table><tr><th>Node</th><th>Role</th><th>Raft</th><th>API</th><th>Term</th><th>Applied</th><th>Health</th></tr>",
                status.leader_id, status.term, status.commit_index, status.applied_index, status.node_id
            );
            for member in &status.members {
                let health = member.health.clone().unwrap_or_default();
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"{}\">{}</td></tr>",
                    member.id,
                    escape(&health.role),
                    escape(&member.raft_addr),
                    escape(&member.api_addr),
                    health.term,
                    health.applied_index,
                    if health.reachable { "state-alive" } else { "state-lost" },
                    if health.reachable { "reachable".to_string() } else { escape(&health.error) }
                );
            }
            html.push_str("</table><h2>Workers</h2>");
            let workers = tracker.workers().await?;
            if workers.is_empty() {
                html.push_str("<p class=\"muted\">no worker has registered</p>");
            } else {
                html.push_str("<table><tr><th>ID</th><th>Address</th><th>State</th><th>CPUs in use</th><th>GPUs in use</th><th>Memory in use</th><th>Tasks</th></tr>");
                for worker in &workers {
                    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
                    let state = worker.state.label();
                    let _ = write!(
                        html,
                        "<tr><td>{}</td><td>{}</td><td class=\"state-{state}\">{state}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
                        worker.id,
                        escape(&worker.address),
                        svg::load_bar(f64::from(worker.allocated.cpus), f64::from(worker.capacity.cpus), "cpu"),
                        svg::load_bar(f64::from(worker.allocated.gpus), f64::from(worker.capacity.gpus), "gpu"),
                        svg::load_bar(gib(worker.allocated.memory_bytes), gib(worker.capacity.memory_bytes), "GiB"),
                        worker.tasks.len()
                    );
                }
                html.push_str("</table>");
            }
            let jobs = tracker.jobs().await?;
            let recent: Vec<&Job> = jobs.iter().rev().take(15).collect();
            let _ = write!(
                html,
                "<h2>Recent jobs</h2>{}<p><a href=\"/jobs\">all {} jobs</a></p>",
                jobs_table(&recent),
                jobs.len()
            );
            let tracking = tracker.read().await?;
            let mut newest: Vec<&Run> = tracking
                .runs()
                .filter(|run| run.lifecycle_stage == LifecycleStage::Active)
                .collect();
            newest.sort_by_key(|run| std::cmp::Reverse(run.start_time_ms));
            html.push_str("<h2>Recent runs</h2>");
            html.push_str(&runs_table(&newest.into_iter().take(10).collect::<Vec<_>>(), &[], None));
            let models: Vec<String> = tracking
                .registry()
                .models()
                .map(|model| format!("<a href=\"/models/{}\">{}</a>", url_part(&model.name), escape(&model.name)))
                .collect();
            let _ = write!(
                html,
                "<h2>Models</h2><p>{}</p>",
                if models.is_empty() { "<span class=\"muted\">none registered</span>".to_string() } else { models.join(" · ") }
            );
            Ok(page("Cluster", &html))
        }
        .await,
    )
}

async fn jobs(State(tracker): State<Tracker>) -> Response {
    render(
        async {
            let jobs = tracker.jobs().await?;
            let all: Vec<&Job> = jobs.iter().rev().collect();
            Ok(page(&format!("Jobs ({})", jobs.len()), &jobs_table(&all)))
        }
        .await,
    )
}

/// The end of a rank's output, read from the worker that ran it.
async fn rank_output(address: &str, job: u64, attempt: u32, rank: u32) -> String {
    let read = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| error.to_string())?
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect()
            .await
            .map_err(|error| format!("worker {address} does not answer: {error}"))?;
        let mut agent = kiln_proto::worker_agent_client::WorkerAgentClient::new(channel);
        let request = kiln_proto::LogsRequest {
            task: Some(kiln_proto::TaskKey {
                job_id: job,
                attempt,
                rank,
            }),
            follow: false,
        };
        let mut stream = agent
            .logs(request)
            .await
            .map_err(|status| status.message().to_string())?
            .into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(|status| status.message().to_string())? {
            text.extend(chunk.data);
        }
        Ok::<_, String>(String::from_utf8_lossy(&text).into_owned())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), read).await {
        Ok(Ok(text)) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..].join("\n")
        }
        Ok(Err(error)) => format!("(output not available: {error})"),
        Err(_) => "(output not available: the worker took too long)".into(),
    }
}

async fn job(State(tracker): State<Tracker>, UrlPath(id): UrlPath<String>) -> Response {
    render(
        async {
            let id: u64 = id
                .parse()
                .map_err(|_| invalid(format!("'{id}' is not a job id; expected a number")))?;
            let job = match tracker.shared.query(Query::GetJob { id }).await? {
                QueryResult::Job(job) => job,
                QueryResult::Rejected(error) => return Err(Failure::from(error)),
                other => return Err(Failure::from(CoordinatorError::Internal(format!("unexpected answer {other:?}")))),
            };
            let state = job.state.label();
            let mut html = format!(
                "<p>{} · <span class=\"state-{state}\">{state}</span> · {} rank(s) · submitted {}</p><p>{}</p>",
                escape(&job.spec.name),
                job.spec.resources.workers,
                when(job.submitted_at_ms),
                escape(&job.message)
            );
            let run_id = crate::tracking::Tracking::job_run_id(id);
            if tracker.read().await?.run(&run_id).is_ok() {
                let _ = write!(html, "<p>tracked as <a href=\"/runs/{run_id}\">run {run_id}</a></p>");
            }
            if !job.metrics.is_empty() {
                html.push_str("<h2>Latest metrics</h2><table>");
                for (key, value) in &job.metrics {
                    let _ = write!(html, "<tr><td>{}</td><td class=\"num\">{}</td></tr>", escape(key), number(*value));
                }
                html.push_str("</table>");
            }
            html.push_str("<h2>Attempts</h2><table><tr><th>Attempt</th><th>State</th><th>Started</th><th>Ranks</th><th>Message</th></tr>");
            for attempt in &job.attempts {
                let ranks: Vec<String> = attempt
                    .tasks
                    .iter()
                    .map(|task| format!("rank {} on worker {}: {}", task.rank, task.worker, task.state.label()))
                    .collect();
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    attempt.number,
                    attempt.state,
                    when(attempt.started_at_ms),
                    escape(&ranks.join("; ")),
                    escape(&attempt.message)
                );
            }
            html.push_str("</table>");
            if let Some(attempt) = job.attempts.last() {
                for task in &attempt.tasks {
                    let output = rank_output(&task.worker_address, id, attempt.number, task.rank).await;
                    let _ = write!(
                        html,
                        "<h2>Rank {} output (attempt {})</h2><pre>{}</pre>",
                        task.rank,
                        attempt.number,
                        escape(&output)
                    );
                }
            }
            let _ = write!(html, "<h2>Spec</h2><pre>{}</pre>", escape(&job.spec_toml));
            Ok(page(&format!("Job {id}"), &html))
        }
        .await,
    )
}

/// A table of runs; with `sort_links`, the headers re-sort the page (keeping the other query fields), and
/// each row has a box to pick it for comparison.
fn runs_table(runs: &[&Run], metric_keys: &[String], sort_links: Option<&dyn Fn(&str) -> String>) -> String {
    let header = |label: &str, key: &str| match sort_links {
        Some(link) => format!("<th><a href=\"{}\">{}</a></th>", escape(&link(key)), escape(label)),
        None => format!("<th>{}</th>", escape(label)),
    };
    let mut html = String::from("<table><tr>");
    if sort_links.is_some() {
        html.push_str("<th></th>");
    }
    for (label, key) in [
        ("Run", "attributes.run_name"),
        ("Status", "attributes.status"),
        ("Started", "attributes.start_time"),
    ] {
        html.push_str(&header(label, key));
    }
    for key in metric_keys {
        html.push_str(&header(key, &format!("metrics.`{key}`")));
    }
    html.push_str("</tr>");
    for run in runs {
        let name = if run.name.is_empty() { &run.id } else { &run.name };
        html.push_str("<tr>");
        if sort_links.is_some() {
            let _ = write!(
                html,
                "<td><input type=\"checkbox\" name=\"runs\" value=\"{}\"></td>",
                run.id
            );
        }
        let status = run.status.as_str();
        let _ = write!(
            html,
            "<td><a href=\"/runs/{}\">{}</a></td><td class=\"state-{status}\">{status}</td><td>{}</td>",
            run.id,
            escape(name),
            when(run.start_time_ms)
        );
        for key in metric_keys {
            let value = run.latest.get(key).map_or("".to_string(), |point| number(point.value));
            let _ = write!(html, "<td class=\"num\">{value}</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    if runs.is_empty() {
        html.push_str("<p class=\"muted\">no runs</p>");
    }
    html
}

async fn runs(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    render(
        async {
            let fields = Fields(query_of(query));
            let tracking = tracker.read().await?;
            let experiment = match fields.text("experiment")? {
                Some(id) if !id.is_empty() => tracking.experiment(&id)?.clone(),
                _ => tracking.experiment(crate::tracking::DEFAULT_EXPERIMENT_ID)?.clone(),
            };
            let filter_text = fields.text("filter")?.unwrap_or_default();
            let order_text = fields.text("order_by")?.unwrap_or_default();
            let filter =
                Filter::parse(&filter_text).map_err(|error| invalid(format!("the filter: {error}")))?;
            let order_by = if order_text.is_empty() {
                Vec::new()
            } else {
                vec![Order::parse(&order_text).map_err(|error| invalid(format!("the order: {error}")))?]
            };
            let page_of = tracking.search_runs(&RunSearch {
                experiment_ids: vec![experiment.id.clone()],
                filter,
                order_by,
                max_results: RUNS_SHOWN,
                ..RunSearch::default()
            })?;
            let found: Vec<&Run> = page_of.runs.iter().collect();
            let metric_keys: Vec<String> = found
                .iter()
                .flat_map(|run| run.latest.keys().cloned())
                .filter(|key| !matches!(key.as_str(), "step" | "epoch") && !key.ends_with("_per_second"))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .take(6)
                .collect();
            let base = |order: &str| {
                format!(
                    "/runs?experiment={}&filter={}&order_by={}",
                    url_part(&experiment.id),
                    url_part(&filter_text),
                    url_part(order)
                )
            };
            // A header sorts descending first, and flips when it is already the order.
            let sort = |key: &str| {
                let descending = format!("{key} DESC");
                if order_text == descending {
                    base(&format!("{key} ASC"))
                } else {
                    base(&descending)
                }
            };
            let experiments: Vec<String> = tracking
                .experiments()
                .filter(|other| other.lifecycle_stage == LifecycleStage::Active)
                .map(|other| {
                    if other.id == experiment.id {
                        format!("<b>{}</b>", escape(&other.name))
                    } else {
                        format!("<a href=\"/runs?experiment={}\">{}</a>", url_part(&other.id), escape(&other.name))
                    }
                })
                .collect();
            let html = format!(
                "<p>experiments: {}</p><form method=\"get\" action=\"/runs\"><input type=\"hidden\" name=\"experiment\" value=\"{}\"><input type=\"text\" name=\"filter\" value=\"{}\" placeholder=\"metrics.validation_accuracy &gt; 0.9 and params.model = 'mlp'\"> <button>Filter</button></form><form method=\"get\" action=\"/compare\">{}<button>Compare the runs ticked</button></form>",
                experiments.join(" · "),
                escape(&experiment.id),
                escape(&filter_text),
                runs_table(&found, &metric_keys, Some(&sort)),
            );
            Ok(page(&format!("Runs of {}", experiment.name), &html))
        }
        .await,
    )
}

fn history_series<'a>(run: &'a Run, key: &str, name: &'a str, colour: &'a str) -> Series<'a> {
    Series {
        name,
        colour,
        points: run
            .metrics
            .get(key)
            .map(|points| points.iter().map(|point| (point.step as f64, point.value)).collect())
            .unwrap_or_default(),
    }
}

async fn run(State(tracker): State<Tracker>, UrlPath(id): UrlPath<String>) -> Response {
    render(
        async {
            let tracking = tracker.read().await?;
            let run = tracking.run(&id)?;
            let status = run.status.as_str();
            let mut html = format!(
                "<p><span class=\"state-{status}\">{status}</span> · experiment {} · started {} · <a href=\"/lineage?id=run:{}\">lineage</a></p>",
                escape(&tracking.experiment(&run.experiment_id).map(|e| e.name.clone()).unwrap_or_default()),
                when(run.start_time_ms),
                run.id
            );
            if let Some(job) = run.tags.get("kiln.job_id") {
                let _ = write!(html, "<p>the run of <a href=\"/jobs/{0}\">job {0}</a></p>", escape(job));
            }
            html.push_str("<h2>Metrics</h2><div class=\"charts\">");
            // Validation metrics first, then losses, then the rest; counters last.
            let rank = |key: &str| match key {
                _ if key.starts_with("validation_") => 0,
                _ if key.contains("loss") => 1,
                "step" | "epoch" => 3,
                _ => 2,
            };
            let mut keys: Vec<&String> = run.metrics.keys().collect();
            keys.sort_by_key(|key| (rank(key), key.as_str()));
            for key in keys {
                html.push_str(&svg::line_chart(key, &[history_series(run, key, key, PALETTE[0])]));
            }
            if run.metrics.is_empty() {
                html.push_str("<p class=\"muted\">no metrics logged</p>");
            }
            html.push_str("</div><h2>Params</h2><table>");
            for (key, value) in &run.params {
                let _ = write!(html, "<tr><td>{}</td><td>{}</td></tr>", escape(key), escape(value));
            }
            html.push_str("</table><h2>Inputs</h2><table>");
            for (dataset, tags) in tracking.inputs_of(&run.id) {
                let views = tags.get(crate::lineage::FEATURE_VIEWS_TAG).cloned().unwrap_or_default();
                let _ = write!(
                    html,
                    "<tr><td><a href=\"/lineage?id=dataset:{}\">{}</a></td><td>{}</td><td>{}</td></tr>",
                    url_part(&dataset.digest),
                    escape(&dataset.name),
                    escape(&dataset.source_type),
                    escape(&views)
                );
            }
            html.push_str("</table><h2>Artifacts</h2><table>");
            // Only artifacts behind the proxy were recorded; a run stored elsewhere lists none.
            let prefix = run
                .artifact_uri
                .strip_prefix(crate::tracking::PROXIED_ARTIFACT_ROOT)
                .map(|path| format!("{}/", path.trim_start_matches('/')))
                .unwrap_or_default();
            let recorded = tracking.artifacts_under(&prefix).filter(|_| !prefix.is_empty());
            for (path, record) in recorded {
                let relative = &path[prefix.len()..];
                let _ = write!(
                    html,
                    "<tr><td><a href=\"/api/2.0/mlflow-artifacts/artifacts/{}\">{}</a></td><td class=\"num\">{}</td><td class=\"muted\">{}</td></tr>",
                    escape(path),
                    escape(relative),
                    record.size,
                    &record.sha256
                );
            }
            html.push_str("</table>");
            let title = if run.name.is_empty() { format!("Run {}", run.id) } else { format!("Run {}", run.name) };
            Ok(page(&title, &html))
        }
        .await,
    )
}

async fn compare(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    render(
        async {
            let fields = Fields(query_of(query));
            let ids = fields.strings("runs")?;
            if ids.len() < 2 {
                return Err(invalid("pick at least two runs to compare (?runs=A&runs=B)".into()));
            }
            let tracking = tracker.read().await?;
            let runs = ids
                .iter()
                .map(|id| tracking.run(id))
                .collect::<Result<Vec<&Run>, _>>()?;
            let names: Vec<String> = runs
                .iter()
                .map(|run| {
                    if run.name.is_empty() {
                        run.id.clone()
                    } else {
                        format!("{} ({})", run.name, &run.id[..8])
                    }
                })
                .collect();
            let keys: BTreeSet<&String> = runs.iter().flat_map(|run| run.metrics.keys()).collect();
            let mut html = String::from("<h2>Metrics</h2><div class=\"charts\">");
            for key in keys {
                let series: Vec<Series<'_>> = runs
                    .iter()
                    .zip(&names)
                    .enumerate()
                    .map(|(index, (run, name))| history_series(run, key, name, PALETTE[index % PALETTE.len()]))
                    .collect();
                html.push_str(&svg::line_chart(key, &series));
            }
            html.push_str("</div><h2>Params</h2><table><tr><th></th>");
            for name in &names {
                let _ = write!(html, "<th>{}</th>", escape(name));
            }
            html.push_str("</tr>");
            let params: BTreeSet<&String> = runs.iter().flat_map(|run| run.params.keys()).collect();
            for key in params {
                let values: Vec<Option<&String>> = runs.iter().map(|run| run.params.get(key)).collect();
                let differs = values.windows(2).any(|pair| pair[0] != pair[1]);
                let _ = write!(html, "<tr><td>{}{}</td>", escape(key), if differs { " ≠" } else { "" });
                for value in values {
                    let _ = write!(html, "<td>{}</td>", escape(value.map_or("", String::as_str)));
                }
                html.push_str("</tr>");
            }
            html.push_str("</table>");
            Ok(page(&format!("Comparing {} runs", runs.len()), &html))
        }
        .await,
    )
}

async fn models(State(tracker): State<Tracker>) -> Response {
    render(
        async {
            let tracking = tracker.read().await?;
            let mut html = String::from("<table><tr><th>Model</th><th>Versions</th><th>Aliases</th><th>Updated</th><th>Description</th></tr>");
            for model in tracking.registry().models() {
                let aliases: Vec<String> = model.aliases.iter().map(|(alias, version)| format!("{alias} → v{version}")).collect();
                let _ = write!(
                    html,
                    "<tr><td><a href=\"/models/{}\">{}</a></td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    url_part(&model.name),
                    escape(&model.name),
                    model.versions.len(),
                    escape(&aliases.join(", ")),
                    when(model.last_updated_time_ms),
                    escape(&model.description)
                );
            }
            html.push_str("</table>");
            Ok(page("Models", &html))
        }
        .await,
    )
}

async fn model(State(tracker): State<Tracker>, UrlPath(name): UrlPath<String>) -> Response {
    render(
        async {
            let tracking = tracker.read().await?;
            let model = tracking.registry().model(&name)?;
            let mut html = format!("<p>{}</p><table><tr><th>Version</th><th>Aliases</th><th>Stage</th><th>Run</th><th>Created</th><th>Metrics when registered</th><th>Source</th><th></th></tr>", escape(&model.description));
            for version in model.versions.values().rev() {
                let metrics: BTreeMap<&String, &f64> = version
                    .metrics
                    .iter()
                    .filter(|(key, _)| key.starts_with("validation_") || key.contains("loss"))
                    .collect();
                let metrics: Vec<String> = metrics.iter().map(|(key, value)| format!("{key}={}", number(**value))).collect();
                let run_cell = if version.run_id.is_empty() {
                    "-".to_string()
                } else {
                    format!("<a href=\"/runs/{0}\">{1}</a>", escape(&version.run_id), escape(&version.run_id[..8.min(version.run_id.len())]))
                };
                let _ = write!(
                    html,
                    "<tr><td>v{}</td><td>{}</td><td>{}</td><td>{run_cell}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/lineage?id={}\">lineage</a></td></tr>",
                    version.version,
                    escape(&model.aliases_of(version.version).join(", ")),
                    version.stage.as_str(),
                    when(version.creation_time_ms),
                    escape(&metrics.join(" ")),
                    escape(&version.source),
                    url_part(&format!("models:/{}/{}", model.name, version.version))
                );
            }
            html.push_str("</table>");
            Ok(page(&format!("Model {}", model.name), &html))
        }
        .await,
    )
}

async fn lineage(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    render(
        async {
            let fields = Fields(query_of(query));
            let name = fields.required_text("id")?;
            let direction = Direction::parse(&fields.text("direction")?.unwrap_or_default())?;
            let tracking = tracker.read().await?;
            let graph = Graph::of(&tracking);
            let root = graph.resolve(&tracking, &name)?;
            let around = graph.around(&root, direction);
            let links: Vec<String> = ["upstream", "downstream", "both"]
                .iter()
                .map(|way| format!("<a href=\"/lineage?id={}&direction={way}\">{way}</a>", url_part(&name)))
                .collect();
            let html = format!(
                "<p>{} · {} · <a href=\"/api/2.0/kiln/lineage?id={}&format=dot\">DOT</a></p>{}",
                escape(&root),
                links.join(" · "),
                url_part(&name),
                svg::lineage(&around, &root, node_link)
            );
            Ok(page("Lineage", &html))
        }
        .await,
    )
}

/// A sweep's trials (trial number, job) and each one's value of the sweep's metric, from its run or job.
fn sweep_trials<'a>(
    jobs: &'a [Job],
    tracking: &Tracking,
    sweep: u64,
    metric: &str,
) -> Vec<(u64, &'a Job, Option<f64>)> {
    let mut trials: Vec<(u64, &Job, Option<f64>)> = jobs
        .iter()
        .filter_map(|job| {
            let (of, trial) = crate::sweep::trial_of(&job.spec)?;
            (of == sweep).then_some((trial, job))
        })
        .map(|(trial, job)| (trial, job, crate::sweep::controller::value_of(tracking, metric, job)))
        .collect();
    trials.sort_by_key(|(trial, _, _)| *trial);
    trials
}

async fn sweeps(State(tracker): State<Tracker>) -> Response {
    render(
        async {
            let jobs = tracker.jobs().await?;
            let tracking = tracker.read().await?;
            let mut html = String::from(
                "<table><tr><th>ID</th><th>Name</th><th>State</th><th>Algorithm</th><th>Trials</th><th>Best</th><th>Message</th></tr>",
            );
            let sweeps: Vec<&Job> = jobs
                .iter()
                .rev()
                .filter(|job| job.spec.kind == crate::spec::JobKind::Sweep)
                .collect();
            for sweep in &sweeps {
                let Ok(spec) = crate::sweep::SweepSpec::read(&sweep.spec_toml) else {
                    continue;
                };
                let trials = sweep_trials(&jobs, &tracking, sweep.id, &spec.metric);
                let best = trials
                    .iter()
                    .filter_map(|(_, _, value)| *value)
                    .min_by(|a, b| spec.direction.loss(*a).total_cmp(&spec.direction.loss(*b)));
                let state = sweep.state.label();
                let _ = write!(
                    html,
                    "<tr><td><a href=\"/sweeps/{}\">{}</a></td><td>{}</td><td class=\"state-{state}\">{state}</td><td>{:?}</td><td class=\"num\">{} / {}</td><td>{} {}</td><td>{}</td></tr>",
                    sweep.id,
                    sweep.id,
                    escape(&sweep.spec.name),
                    spec.algorithm,
                    trials.len(),
                    spec.max_trials,
                    escape(&spec.metric),
                    best.map_or("-".to_string(), number),
                    escape(&sweep.message)
                );
            }
            html.push_str("</table>");
            Ok(page(&format!("Sweeps ({})", sweeps.len()), &html))
        }
        .await,
    )
}

async fn sweep(State(tracker): State<Tracker>, UrlPath(id): UrlPath<String>) -> Response {
    render(
        async {
            let id: u64 = id
                .parse()
                .map_err(|_| invalid(format!("'{id}' is not a sweep id; expected a number")))?;
            let jobs = tracker.jobs().await?;
            let Some(sweep) = jobs
                .iter()
                .find(|job| job.id == id && job.spec.kind == crate::spec::JobKind::Sweep)
            else {
                return Err(Failure::from(crate::tracking::TrackingError {
                    code: crate::tracking::ErrorCode::ResourceDoesNotExist,
                    message: format!("sweep {id} does not exist (/sweeps lists them)"),
                }));
            };
            let spec = crate::sweep::SweepSpec::read(&sweep.spec_toml)
                .map_err(|error| invalid(format!("sweep {id} cannot be read: {error}")))?;
            let tracking = tracker.read().await?;
            let trials = sweep_trials(&jobs, &tracking, id, &spec.metric);
            let state = sweep.state.label();
            let mut html = format!(
                "<p>{} · <span class=\"state-{state}\">{state}</span> · {:?} · {} of {} trials, {} at a time · {:?} {}</p><p>{}</p>",
                escape(&sweep.spec.name),
                spec.algorithm,
                trials.len(),
                spec.max_trials,
                spec.parallel,
                spec.direction,
                escape(&spec.metric),
                escape(&sweep.message)
            );
            // The metric by trial, and the best so far.
            let mut best: Option<f64> = None;
            let mut best_so_far = Vec::new();
            for (trial, _, value) in &trials {
                if let Some(value) = value
                    && best.is_none_or(|current| spec.direction.loss(*value) < spec.direction.loss(current))
                {
                    best = Some(*value);
                }
                if let Some(best) = best {
                    best_so_far.push((*trial as f64, best));
                }
            }
            let values: Vec<(f64, f64)> = trials
                .iter()
                .filter_map(|(trial, _, value)| Some((*trial as f64, (*value)?)))
                .collect();
            let chart = svg::line_chart(
                &format!("{} by trial", spec.metric),
                &[
                    Series {
                        name: "trial",
                        colour: PALETTE[0],
                        points: values,
                    },
                    Series {
                        name: "best so far",
                        colour: PALETTE[1],
                        points: best_so_far,
                    },
                ],
            );
            // Parallel coordinates: every parameter, then the metric.
            let params: Vec<crate::sweep::Params> = trials
                .iter()
                .map(|(_, job, _)| crate::sweep::controller::params_of(job))
                .collect();
            let names: BTreeSet<&str> = params.iter().flat_map(|params| params.keys().map(String::as_str)).collect();
            let mut columns: Vec<(String, Vec<ColumnValue>)> = names
                .iter()
                .map(|name| {
                    let values = params
                        .iter()
                        .map(|params| match params.get(*name) {
                            Some(crate::sweep::Value::Text(text)) => ColumnValue::Text(text.clone()),
                            Some(crate::sweep::Value::Bool(flag)) => ColumnValue::Text(flag.to_string()),
                            Some(value) => value.as_f64().map_or(ColumnValue::Missing, ColumnValue::Number),
                            None => ColumnValue::Missing,
                        })
                        .collect();
                    (name.to_string(), values)
                })
                .collect();
            columns.push((
                spec.metric.clone(),
                trials
                    .iter()
                    .map(|(_, _, value)| value.map_or(ColumnValue::Missing, ColumnValue::Number))
                    .collect(),
            ));
            let parallel = svg::parallel_coordinates(
                "parameters and metric, by trial",
                &columns,
                spec.direction == crate::sweep::Direction::Minimize,
            );
            let _ = write!(html, "<div class=\"charts\">{chart}{parallel}</div>");
            html.push_str("<h2>Trials</h2><table><tr><th>Trial</th><th>Job</th><th>State</th><th>Metric</th><th>Epoch</th><th>Parameters</th><th>Message</th></tr>");
            for ((trial, job, value), params) in trials.iter().zip(&params) {
                let state = job.state.label();
                let described: Vec<String> = params.iter().map(|(name, value)| format!("{name}={value}")).collect();
                let _ = write!(
                    html,
                    "<tr><td>{trial}</td><td><a href=\"/jobs/{}\">{}</a></td><td class=\"state-{state}\">{state}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                    job.id,
                    job.id,
                    value.map_or("-".to_string(), number),
                    job.metrics.get("epoch").map_or("-".to_string(), |epoch| number(*epoch)),
                    escape(&described.join(", ")),
                    escape(&job.message)
                );
            }
            html.push_str("</table>");
            let _ = write!(html, "<h2>Spec</h2><pre>{}</pre>", escape(&sweep.spec_toml));
            Ok(page(&format!("Sweep {id}"), &html))
        }
        .await,
    )
}
