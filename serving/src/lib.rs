//! Kiln's model server: registered models served over the Open Inference Protocol v2 (the KServe / Triton
//! protocol), REST on port 8000 and gRPC on port 8001, so stock clients (`tritonclient.http`,
//! `tritonclient.grpc`, `kserve`) work unchanged.
//!
//! ```text
//!   REST :8000 ─┐  parse (JSON or binary tensors)   check against          dynamic batching      Model::infer
//!               ├─► ─────────────────────────────► the model's inputs ─► [ bounded queue ] ─► (burn, ONNX…)
//!   gRPC :8001 ─┘  (typed or raw contents)           (names, types, shapes)   503 when full       N instances
//! ```
//!
//! - [`Serving`] holds the loaded model versions by name. A version is warmed up (one row through the model)
//!   before it is marked ready, and only ready versions take requests.
//! - Every request is checked once against the model's declared tensors ([`model::check_inputs`]); a
//!   wrong name, datatype or shape gets the protocol's error naming the input, what was expected and what
//!   was given, and never reaches the model.
//! - [`batcher`] stacks queued requests into batches; its queue is bounded and a full queue answers 503 with
//!   `Retry-After` (gRPC `UNAVAILABLE`), so overload is refused quickly instead of growing latency.
//! - [`metrics`] exposes requests, errors, latency, batch sizes and queue depth per model and version.
//! - [`v1`]: KServe's V1 protocol (`/v1/models/NAME:predict`, instances in, predictions out) on the same
//!   REST port, for clients of KServe's V1 predictors.
//! - [`request_log`] writes every request and response, batched into Parquet files in an object store,
//!   without ever making a request wait (a full queue drops and counts).
//!
//! Deliberately not here: where models come from (the CLI resolves `models:/NAME@ALIAS` through the registry
//! and builds a [`Model`]), and Triton's model-repository and configuration extensions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Instant, SystemTime};

pub mod batcher;
mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod pipeline;
pub mod request_log;
pub mod router;
pub mod tensor;
pub mod v1;

pub use batcher::{BatchConfig, Batcher};
pub use error::ServeError;
pub use model::{Model, TensorSpec};
#[cfg(feature = "onnx")]
pub use onnx::OnnxModel;

/// Whether this build runs ONNX models (the cargo feature `onnx`).
pub const ONNX: bool = cfg!(feature = "onnx");

/// The ONNX model in `path`, run by tract; in a build without the `onnx` feature, an error that says how to
/// get one that has it.
pub fn load_onnx(path: &std::path::Path) -> Result<std::sync::Arc<dyn Model>, String> {
    #[cfg(feature = "onnx")]
    {
        Ok(std::sync::Arc::new(OnnxModel::load(path)?))
    }
    #[cfg(not(feature = "onnx"))]
    {
        Err(format!(
            "{}: this kiln was built without ONNX support; build it with `cargo build --release -p kiln --features onnx`",
            path.display()
        ))
    }
}
pub use tensor::{DataType, Tensor};

use metrics::{Metrics, ModelMetrics};
use request_log::{LogEntry, RequestLog};

/// The server's name and version in the protocol's server metadata.
pub const SERVER_NAME: &str = "kiln";

/// The protocol extensions this server implements.
pub const EXTENSIONS: [&str; 1] = ["binary_tensor_data"];

/// Feature enrichment: a request may carry entity keys (one input, named by [`Enricher::key`]) instead of
/// the model's input; the enricher looks their features up (the CLI's reads the feature store's online
/// store) and returns the model's input for them, one row per key.
pub trait Enricher: Send + Sync {
    /// The input that carries entity keys (a join key's name, such as `driver_id`).
    fn key(&self) -> &str;
    /// The model's input for the entities in `keys`, in their order; an entity without features online is
    /// refused with an error naming it.
    fn enrich<'a>(
        &'a self,
        keys: Tensor,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Tensor, ServeError>> + Send + 'a>>;
}

/// One loaded model version.
pub struct ServedModel {
    pub name: String,
    pub version: String,
    pub model: Arc<dyn Model>,
    batcher: Batcher,
    pub metrics: ModelMetrics,
    enricher: Option<Arc<dyn Enricher>>,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ServedModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

impl ServedModel {
    /// Checks `inputs` against the model and runs them in a batch; returns every declared output. Entity
    /// keys in place of the model's input are looked up first, when the model has an [`Enricher`].
    pub async fn infer(&self, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ServeError> {
        if let Some(enricher) = &self.enricher
            && let Some(position) = inputs.iter().position(|input| input.name == enricher.key())
        {
            let keys = inputs.remove(position);
            inputs.push(enricher.enrich(keys).await?);
        }
        let inputs = model::check_inputs(&self.name, self.model.as_ref(), inputs)?;
        self.batcher.infer(inputs).await
    }

    /// The positions of the outputs named in `requested` among the model's, in the order asked: checked before
    /// the model runs, so a request for an unknown or repeated output costs no inference.
    pub fn check_requested(&self, requested: &[String]) -> Result<Vec<usize>, ServeError> {
        let mut positions: Vec<usize> = Vec::with_capacity(requested.len());
        for name in requested {
            let index = self
                .model
                .outputs()
                .iter()
                .position(|spec| &spec.name == name)
                .ok_or_else(|| {
                    let names: Vec<&str> = self.model.outputs().iter().map(|spec| spec.name.as_str()).collect();
                    ServeError::invalid(format!(
                        "model '{}' has no output '{name}'; its outputs are {}",
                        self.name,
                        names.join(", ")
                    ))
                })?;
            if positions.contains(&index) {
                return Err(ServeError::invalid(format!("output '{name}' is requested twice")));
            }
            positions.push(index);
        }
        Ok(positions)
    }

    /// The outputs at `positions` (from [`ServedModel::check_requested`]; all, when empty), in that order.
    pub fn select_outputs(outputs: Vec<Tensor>, positions: &[usize]) -> Vec<Tensor> {
        if positions.is_empty() {
            return outputs;
        }
        let mut slots: Vec<Option<Tensor>> = outputs.into_iter().map(Some).collect();
        positions
            .iter()
            .filter_map(|index| slots.get_mut(*index).and_then(Option::take))
            .collect()
    }
}

/// What one request carried and got, for the request log.
#[derive(Debug)]
pub struct Exchange {
    /// The request's own id, when it gave one.
    pub id: Option<String>,
    pub received: SystemTime,
    pub started: Instant,
    /// Whether the tensors are kept: only when a request log will write them.
    capture: bool,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

impl Exchange {
    /// Keeps (shares) the request's checked inputs for the log.
    pub fn keep_inputs(&mut self, inputs: &[Tensor]) {
        if self.capture {
            self.inputs = inputs.to_vec();
        }
    }

    /// Keeps (shares) the outputs answered, for the log.
    pub fn keep_outputs(&mut self, outputs: &[Tensor]) {
        if self.capture {
            self.outputs = outputs.to_vec();
        }
    }
}

/// Requests answered since the last [`Serving::take_load`], with a sample of their latencies.
#[derive(Debug, Default)]
struct LoadWindow {
    requests: u64,
    latencies_ms: Vec<f32>,
}

/// Latencies kept per window: beyond it, the newest overwrite the oldest.
const LOAD_SAMPLES_MAX: usize = 4096;

/// A server's load over a window: what a replica reports to the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The model versions this server holds, by name; each name serves one version at a time.
pub struct Serving {
    models: RwLock<BTreeMap<String, Arc<ServedModel>>>,
    pub metrics: Metrics,
    load: Mutex<LoadWindow>,
    request_log: OnceLock<RequestLog>,
    /// Ids for requests that bring none: this process's random prefix, then a sequence.
    id_prefix: u64,
    id_sequence: AtomicU64,
}

impl Default for Serving {
    fn default() -> Serving {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        Serving {
            models: RwLock::default(),
            metrics: Metrics::default(),
            load: Mutex::default(),
            request_log: OnceLock::new(),
            id_prefix: nanos ^ (u64::from(std::process::id()) << 32),
            id_sequence: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Serving")
            .field("models", &self.names())
            .finish()
    }
}

impl Serving {
    /// Warms `model` up with one row of zeros and then serves it as `name` version `version`, replacing
    /// the version served before (requests already queued for that one still finish on it). Must run on a
    /// tokio runtime: the warm-up runs on a blocking thread.
    pub async fn load(
        &self,
        name: &str,
        version: &str,
        model: Arc<dyn Model>,
        config: BatchConfig,
    ) -> Result<(), ServeError> {
        self.load_enriched(name, version, model, config, None).await
    }

    /// [`Serving::load`], with entity keys looked up by `enricher` when a request carries them.
    pub async fn load_enriched(
        &self,
        name: &str,
        version: &str,
        model: Arc<dyn Model>,
        config: BatchConfig,
        enricher: Option<Arc<dyn Enricher>>,
    ) -> Result<(), ServeError> {
        config.validate().map_err(ServeError::InvalidInput)?;
        let warming = model.clone();
        let outputs = tokio::task::spawn_blocking(move || warming.infer(&model::warmup_inputs(warming.as_ref())))
            .await
            .map_err(|_| ServeError::Model {
                model: name.to_string(),
                message: "it panicked while warming up".into(),
            })?
            .map_err(|message| ServeError::Model {
                model: name.to_string(),
                message: format!("warming up: {message}"),
            })?;
        if outputs.len() != model.outputs().len() {
            return Err(ServeError::Model {
                model: name.to_string(),
                message: format!(
                    "warming up, it returned {} outputs; it declares {}",
                    outputs.len(),
                    model.outputs().len()
                ),
            });
        }
        let metrics = self.metrics.model(name, version);
        let batcher = Batcher::start(name, model.clone(), config, metrics.clone());
        let served = Arc::new(ServedModel {
            name: name.to_string(),
            version: version.to_string(),
            model,
            batcher,
            metrics,
            enricher,
        });
        self.models
            .write()
            .expect("models lock")
            .insert(name.to_string(), served);
        Ok(())
    }

    /// The served version of `name`; with `version`, only if that is the one served.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<ServedModel>, ServeError> {
        let models = self.models.read().expect("models lock");
        let served = models.get(name).ok_or_else(|| {
            let names: Vec<&str> = models.keys().map(String::as_str).collect();
            ServeError::NotFound(format!(
                "no model named '{name}' is served here (serving: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })?;
        match version {
            Some(version) if !version.is_empty() && version != served.version => Err(ServeError::NotFound(format!(
                "model '{name}' version '{version}' is not served here (serving version {})",
                served.version
            ))),
            _ => Ok(served.clone()),
        }
    }

    /// Logs every answered request to `store` from now on (see [`request_log`]).
    pub fn log_requests(&self, store: Arc<dyn request_log::LogStore>, config: request_log::RequestLogConfig) {
        let log = RequestLog::start(store, config, self.metrics.request_log.clone());
        if self.request_log.set(log).is_err() {
            tracing::warn!("the request log was already configured; keeping the first");
        }
    }

    /// A request that arrived now; its tensors are kept only when requests are logged.
    pub fn begin(&self) -> Exchange {
        Exchange {
            id: None,
            received: SystemTime::now(),
            started: Instant::now(),
            capture: self.request_log.get().is_some(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Counts an answered request and logs it.
    pub fn record(&self, served: &ServedModel, protocol: &'static str, exchange: Exchange, error: Option<&ServeError>) {
        self.metrics.answered(&served.metrics, protocol, error);
        let latency = exchange.started.elapsed().as_secs_f64();
        {
            let mut window = self.load.lock().expect("load lock");
            window.requests += 1;
            let sample = (latency * 1e3) as f32;
            if window.latencies_ms.len() < LOAD_SAMPLES_MAX {
                window.latencies_ms.push(sample);
            } else {
                let slot = window.requests as usize % LOAD_SAMPLES_MAX;
                window.latencies_ms[slot] = sample;
            }
        }
        let Some(log) = self.request_log.get() else { return };
        let request_id = exchange.id.unwrap_or_else(|| {
            format!(
                "{:016x}-{}",
                self.id_prefix,
                self.id_sequence.fetch_add(1, Ordering::Relaxed)
            )
        });
        let received_at_micros = exchange
            .received
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_micros() as i64);
        log.log(LogEntry {
            request_id,
            model: served.name.clone(),
            version: served.version.clone(),
            protocol,
            received_at_micros,
            latency_seconds: latency,
            status: error.map_or("ok", ServeError::reason),
            error: error.map(ToString::to_string),
            inputs: exchange.inputs,
            outputs: exchange.outputs,
        });
    }

    /// Writes what the request log holds and stops it.
    pub async fn close(&self) {
        if let Some(log) = self.request_log.get() {
            log.close().await;
        }
    }

    /// The load since the previous call: requests answered and their latency percentiles.
    pub fn take_load(&self) -> Load {
        let window = std::mem::take(&mut *self.load.lock().expect("load lock"));
        let mut latencies = window.latencies_ms;
        latencies.sort_unstable_by(f32::total_cmp);
        let percentile = |fraction: f64| {
            if latencies.is_empty() {
                return 0.0;
            }
            let index = ((latencies.len() as f64 * fraction).ceil() as usize).clamp(1, latencies.len()) - 1;
            f64::from(latencies[index])
        };
        Load {
            requests: window.requests,
            p50_ms: percentile(0.5),
            p99_ms: percentile(0.99),
        }
    }

    /// Requests waiting to be batched now, over every model.
    pub fn queue_depth(&self) -> i64 {
        self.models
            .read()
            .expect("models lock")
            .values()
            .map(|served| served.metrics.queue_depth.get())
            .sum()
    }

    /// The version served of each model.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.models
            .read()
            .expect("models lock")
            .iter()
            .map(|(name, served)| (name.clone(), served.version.clone()))
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.models.read().expect("models lock").keys().cloned().collect()
    }

    /// Ready when at least one model is loaded (each is warmed up before it is).
    pub fn ready(&self) -> bool {
        !self.models.read().expect("models lock").is_empty()
    }
}

/// Serves the protocol on `rest` (HTTP/1.1 REST, and gRPC too) and `grpc` (gRPC, and REST too) until
/// `shutdown` completes. Both ports answer both protocols; 8000 and 8001 are where clients expect each.
pub async fn serve(
    serving: Arc<Serving>,
    rest: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_service_status("inference.GRPCInferenceService", tonic_health::ServingStatus::Serving)
        .await;
    let routes = tonic::service::Routes::from(http::router(serving.clone()))
        .add_service(grpc::service(serving.clone()))
        .add_service(health_service);
    let served = serve_routes(routes, rest, grpc, shutdown).await;
    serving.close().await;
    served
}

/// Serves `routes` (REST and gRPC alike, HTTP/1.1 accepted) on both listeners until `shutdown`.
pub(crate) async fn serve_routes(
    routes: tonic::service::Routes,
    rest: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let listen = |listener: tokio::net::TcpListener| {
        tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(routes.clone())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown.clone().cancelled_owned(),
            )
    };
    let (rest, grpc) = tokio::join!(listen(rest), listen(grpc));
    rest.and(grpc)
}
