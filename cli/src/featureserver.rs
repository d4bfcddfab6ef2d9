//! `kiln featurestore`: the Arrow Flight feature server (port 7072), fed with the definitions the
//! coordinator holds, which it re-reads every `--refresh-ms`; `kiln up` embeds one. With `--tracking` each
//! materialization is recorded as a run of the experiment `kiln-materializations`, which lineage shows
//! between the view version and its online table. Also the client side of `kiln features
//! get|sql|materialize`, which talk to it over Flight.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arrow_flight::{Action, FlightClient, FlightDescriptor};
use clap::Args;
use futures::TryStreamExt;
use kiln_coordinator::client::Client;
use kiln_featurestore::arrow::array::RecordBatch;
use kiln_featurestore::registry::{self, Applied, Registered, RegistryEntry};
use kiln_featurestore::server::{FeatureServer, FlightCommand, MaterializationRecord, MaterializationRecorder, serve};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::output::status_error;

#[derive(Args)]
pub struct FeatureServerArgs {
    /// Coordinator addresses, comma-separated.
    #[arg(long, env = "KILN_COORDINATOR", default_value = "127.0.0.1:7070")]
    coordinator: String,
    #[arg(long, default_value = "127.0.0.1:7072")]
    listen: SocketAddr,
    /// The online store and pushed rows live here; a restart with the same directory keeps them.
    #[arg(long, env = "KILN_FEATURESTORE_DATA_DIR", default_value = "kiln-featurestore")]
    data_dir: PathBuf,
    /// How often the definitions are re-read from the coordinator, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    refresh_ms: u64,
    /// Coordinators' MLflow tracking APIs (comma-separated), where materializations are recorded for
    /// lineage. Without it they are only reported to whoever asked for them.
    #[arg(long, env = "KILN_TRACKING")]
    tracking: Option<String>,
    /// Megabytes of local Arrow IPC sources kept in memory, so that DoGets and SQL over them do not read
    /// and decode the file each time (0: read the file every time). A larger file is always read.
    #[arg(long, env = "KILN_SOURCE_CACHE_MB", default_value_t = DEFAULT_SOURCE_CACHE_MB)]
    source_cache_mb: usize,
}

/// `--source-cache-mb`'s default: 1 GiB.
pub const DEFAULT_SOURCE_CACHE_MB: usize = kiln_featurestore::cache::DEFAULT_BUDGET_BYTES >> 20;

/// The experiment that holds one run per materialization.
pub const MATERIALIZATIONS_EXPERIMENT: &str = "kiln-materializations";

/// Records materializations as runs through the tracking APIs at `tracking` (a comma-separated list, tried
/// in turn). Each record carries a fresh key in the tag `kiln.materialization`, so a retry after a lost
/// answer finds the run it made instead of making another.
fn tracking_recorder(tracking: String) -> MaterializationRecorder {
    Arc::new(move |record: MaterializationRecord| {
        let tracking = tracking.clone();
        Box::pin(async move {
            let key = materialization_key();
            crate::runs::through_tracking(&tracking, "recording a materialization", |api| {
                let (record, key) = (record.clone(), key.clone());
                async move { record_materialization(&api, &record, &key).await }
            })
            .await
            .map_err(|error| format!("{error:#}"))
        }) as futures::future::BoxFuture<'static, Result<String, String>>
    })
}

/// A key no other materialization has: the time in nanoseconds, this process and a count within it.
fn materialization_key() -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{nanos:x}-{:x}-{count:x}", std::process::id())
}

/// One try at recording `record` through `api`; every step may be repeated.
async fn record_materialization(api: &crate::runs::Api, record: &MaterializationRecord, key: &str) -> Result<String> {
    let what = "the materializations experiment";
    let experiment = match api
        .get(
            "experiments/get-by-name",
            &[("experiment_name", MATERIALIZATIONS_EXPERIMENT)],
            what,
        )
        .await
    {
        Ok(found) => found["experiment"]["experiment_id"].clone(),
        Err(_) => api
            .post(
                "experiments/create",
                json!({ "name": MATERIALIZATIONS_EXPERIMENT }),
                what,
            )
            .await?["experiment_id"]
            .clone(),
    };
    let experiment = experiment
        .as_str()
        .with_context(|| format!("{what} has no id"))?
        .to_string();
    let found = api
        .post(
            "runs/search",
            json!({
                "experiment_ids": [experiment],
                "filter": format!("tags.`kiln.materialization` = '{key}'"),
                "max_results": 1,
            }),
            "looking for the materialization's run",
        )
        .await?;
    let view = format!("{}@{}", record.view, record.view_version);
    let run_id = match found["runs"][0]["info"]["run_id"].as_str() {
        Some(run_id) => run_id.to_string(),
        None => api
            .post(
                "runs/create",
                json!({
                    "experiment_id": experiment,
                    "run_name": format!("materialize {view}"),
                    "start_time": record.started_ms,
                    "tags": [
                        { "key": "kiln.materialization", "value": key },
                        { "key": kiln_coordinator::lineage::EXECUTION_TAG, "value": kiln_coordinator::lineage::MATERIALIZATION },
                        { "key": kiln_coordinator::lineage::FEATURE_VIEWS_TAG, "value": view },
                    ],
                }),
                "creating the materialization's run",
            )
            .await?["run"]["info"]["run_id"]
            .as_str()
            .context("runs/create answered no run id")?
            .to_string(),
    };
    let until = record.until_micros.map_or_else(
        || "latest".to_string(),
        |micros| {
            humantime::format_rfc3339_micros(std::time::UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64))
                .to_string()
        },
    );
    let params: Vec<Value> = [
        ("view", record.view.clone()),
        ("view_version", record.view_version.to_string()),
        ("source", record.source.clone()),
        ("source_uri", record.source_uri.clone()),
        ("until", until),
        ("rows_read", record.rows_read.to_string()),
        ("rows_applied", record.rows_applied.to_string()),
    ]
    .into_iter()
    .filter(|(_, value)| !value.is_empty())
    .map(|(key, value)| json!({ "key": key, "value": value }))
    .collect();
    api.post(
        "runs/log-batch",
        json!({ "run_id": run_id, "params": params }),
        "logging the materialization",
    )
    .await?;
    api.post(
        "runs/update",
        json!({ "run_id": run_id, "status": "FINISHED", "end_time": record.ended_ms }),
        "finishing the materialization's run",
    )
    .await?;
    Ok(run_id)
}

/// The definitions applied to the cluster, with each object's version.
pub async fn registered(client: &mut Client) -> Result<Registered> {
    let objects = client
        .list_catalog(registry::NAMESPACE, false, false)
        .await
        .map_err(status_error)?;
    let entries = objects.into_iter().filter_map(|object| {
        let current = object.versions.last()?.clone();
        Some((
            RegistryEntry {
                kind: object.kind,
                name: object.name,
                content: current.content,
            },
            Applied {
                version: current.version,
                applied_at_ms: current.applied_at_ms,
            },
        ))
    });
    Ok(registry::from_entries(entries)?)
}

/// A running feature server.
pub struct Running {
    pub address: SocketAddr,
    pub task: tokio::task::JoinHandle<Result<()>>,
}

/// Starts a feature server on `listen` that follows the definitions of the cluster at `coordinator`, until
/// `shutdown` is cancelled.
pub async fn start(
    coordinator: &str,
    listen: SocketAddr,
    data_dir: PathBuf,
    refresh: Duration,
    tracking: Option<String>,
    source_cache_bytes: usize,
    shutdown: CancellationToken,
) -> Result<Running> {
    let mut client = Client::new(coordinator)?;
    client.retry_deadline = refresh.max(Duration::from_secs(1));
    let initial = match registered(&mut client).await {
        Ok(initial) => initial,
        Err(error) => {
            tracing::warn!("feature server: definitions not read yet ({error:#}); retrying");
            Registered::default()
        }
    };
    let (sender, receiver) = watch::channel(Arc::new(initial));
    let server = FeatureServer::open(data_dir.clone(), receiver)?;
    server.set_source_cache_bytes(source_cache_bytes);
    if let Some(tracking) = tracking.filter(|tracking| !tracking.trim().is_empty()) {
        server.record_materializations(tracking_recorder(tracking))?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("the feature server cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let refresher = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = refresher.cancelled() => return,
                () = tokio::time::sleep(refresh) => {}
            }
            match registered(&mut client).await {
                Ok(latest) => {
                    sender.send_if_modified(|current| {
                        let changed = current.versions != latest.versions;
                        if changed {
                            *current = Arc::new(latest);
                        }
                        changed
                    });
                }
                Err(error) => tracing::warn!("feature server: definitions not refreshed ({error:#})"),
            }
        }
    });
    let task = tokio::spawn(async move {
        serve(server, listener, shutdown.cancelled_owned())
            .await
            .context("the feature server stopped")
    });
    tracing::info!("feature server on {address} (data {})", data_dir.display());
    Ok(Running { address, task })
}

pub async fn run(args: FeatureServerArgs) -> Result<()> {
    let shutdown = CancellationToken::new();
    let running = start(
        &args.coordinator,
        args.listen,
        args.data_dir.clone(),
        Duration::from_millis(args.refresh_ms.max(10)),
        args.tracking.clone(),
        args.source_cache_mb.saturating_mul(1 << 20),
        shutdown.clone(),
    )
    .await?;
    println!(
        "kiln feature server on {} (Arrow Flight; definitions from {}; data {})",
        running.address,
        args.coordinator,
        args.data_dir.display()
    );
    tokio::spawn(crate::shutdown_on_signal(shutdown));
    running.task.await?
}

/// A Flight client of the feature server at `address`.
pub async fn connect(address: &str) -> Result<FlightClient> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .with_context(|| format!("feature server address '{address}'"))?
        .connect_timeout(Duration::from_secs(2))
        .max_frame_size(FRAME_BYTES_MAX)
        .connect()
        .await
        .with_context(|| format!("no feature server answers at {address} (kiln featurestore, or kiln up)"))?;
    // Other Flight servers send larger messages than tonic's 4 MiB default (pyarrow.flight, 65,536-row
    // batches of a wide table: 4.7 MB); Kiln's own are at most 2 MB.
    let inner = arrow_flight::flight_service_client::FlightServiceClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX);
    Ok(FlightClient::new_from_inner(inner))
}

/// The largest Flight message a client of Kiln's accepts.
const MESSAGE_BYTES_MAX: usize = 256 << 20;

/// The largest HTTP/2 DATA frame a client of Kiln's accepts (HTTP/2's default is 16 KiB). A server
/// writes each frame with one system call, so on loopback a 2 MB Flight message costs 128 writes at the
/// default and 2 at this size.
const FRAME_BYTES_MAX: u32 = 1 << 20;

fn flight_error(error: arrow_flight::error::FlightError) -> anyhow::Error {
    match error {
        arrow_flight::error::FlightError::Tonic(status) => status_error(*status),
        other => anyhow::anyhow!(other),
    }
}

/// The rows of `command`, fetched over Flight.
pub async fn fetch(client: &mut FlightClient, command: &FlightCommand) -> Result<Vec<RecordBatch>> {
    let info = client
        .get_flight_info(FlightDescriptor::new_cmd(command.to_bytes()))
        .await
        .map_err(flight_error)?;
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint
            .ticket
            .context("the feature server answered with an endpoint without a ticket")?;
        let stream = client.do_get(ticket).await.map_err(flight_error)?;
        batches.extend(stream.try_collect::<Vec<_>>().await.map_err(flight_error)?);
    }
    Ok(batches)
}

/// Runs the materialize action; returns the server's report.
pub async fn materialize(
    client: &mut FlightClient,
    view: Option<String>,
    until_micros: Option<i64>,
) -> Result<serde_json::Value> {
    let body = serde_json::json!({ "view": view, "until_micros": until_micros });
    let results: Vec<_> = client
        .do_action(Action::new("materialize", serde_json::to_vec(&body)?))
        .await
        .map_err(flight_error)?
        .try_collect()
        .await
        .map_err(flight_error)?;
    let first = results
        .first()
        .context("the feature server sent no materialize report")?;
    Ok(serde_json::from_slice(first)?)
}
