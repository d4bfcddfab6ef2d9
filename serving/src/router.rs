//! The serving ports of a cluster: the Open Inference Protocol's REST and gRPC bindings in front of every
//! deployment's replicas. A request for model `NAME` goes to a ready replica of the deployment `NAME`, in
//! turn; the replica answers it as if called directly (errors included).
//!
//! ```text
//!   client ─► router :8000/:8001 ─► replica of NAME (a `kiln task serve` on some worker)
//!                 ▲
//!                 └── the replica table: set by the caller from the coordinator's state (ready replicas only)
//! ```
//!
//! - A replica that refuses the connection (its process or its worker died, and the table does not know it
//!   yet) is passed over for [`DOWN_FOR`] and the request goes to the next one, so a lost replica costs no
//!   request that had not reached it.
//! - A request that reached a replica and got no answer (the replica died holding it) is answered 503 with
//!   `Retry-After` (gRPC `UNAVAILABLE`), and the replica is passed over like one that refused: the client
//!   retries, and the next try goes elsewhere. A request thus fails at most once, retryably, when a replica
//!   is lost (while another one is ready).
//! - Where the table comes from is the caller's business (the CLI reads it from the coordinator), so this
//!   crate needs nothing of the coordinator's.
//! - `/metrics` (OpenMetrics) counts what the router did per deployment and protocol; each replica's own
//!   `/metrics` has the model's requests, latency and batches:
//!
//! ```text
//!   kiln_router_requests_total{model,protocol,outcome}   answered (by a replica, errors included), retried
//!                                                        (a replica refused; sent to the next), lost (a replica
//!                                                        died holding it: 503), unavailable (no ready replica),
//!                                                        unknown (no such deployment)
//!   kiln_router_replicas{model}                          ready replicas in the table
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use kiln_proto::inference::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use kiln_proto::inference::*;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::{EXTENSIONS, SERVER_NAME};

/// How long a replica that refused a connection is passed over (unless every replica is).
pub const DOWN_FOR: Duration = Duration::from_secs(3);
/// The largest request body forwarded.
const BODY_BYTES_MAX: usize = 256 << 20;
/// Headers of the protocol that travel both ways.
const FORWARDED_HEADERS: [&str; 4] = [
    "content-type",
    "inference-header-content-length",
    "retry-after",
    "content-length",
];

/// One ready replica of a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Shown in errors: the replica's job, say.
    pub id: String,
    /// The REST and gRPC bindings, as host:port.
    pub http: String,
    pub grpc: String,
}

/// The deployments the router knows, each with its ready replicas.
pub type Table = HashMap<String, Vec<Replica>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    model: String,
    protocol: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    model: String,
}

/// The router's own metrics.
struct RouterMetrics {
    registry: prometheus_client::registry::Registry,
    requests: Family<RouteLabels, Counter>,
    replicas: Family<DeploymentLabels, Gauge>,
}

impl Default for RouterMetrics {
    fn default() -> RouterMetrics {
        let mut registry = prometheus_client::registry::Registry::with_prefix("kiln_router");
        let requests = Family::<RouteLabels, Counter>::default();
        let replicas = Family::<DeploymentLabels, Gauge>::default();
        registry.register(
            "requests",
            "Requests the router handled, by deployment, protocol and outcome",
            requests.clone(),
        );
        registry.register("replicas", "Ready replicas of each deployment", replicas.clone());
        RouterMetrics {
            registry,
            requests,
            replicas,
        }
    }
}

/// Routes requests to replicas; shared by the REST and gRPC front ends.
pub struct Router {
    metrics: RouterMetrics,
    table: RwLock<Table>,
    /// Whether the table was ever set (until then the router is not ready).
    known: AtomicBool,
    turn: AtomicUsize,
    down: Mutex<HashMap<String, Instant>>,
    http: reqwest::Client,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Default for Router {
    fn default() -> Router {
        Router {
            metrics: RouterMetrics::default(),
            table: RwLock::default(),
            known: AtomicBool::new(false),
            turn: AtomicUsize::new(0),
            down: Mutex::default(),
            http: reqwest::Client::builder()
                .tcp_nodelay(true)
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
            channels: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Router")
            .field("table", &*self.table.read().expect("table lock"))
            .finish()
    }
}

/// Why a request could not be routed.
#[derive(Debug, Clone, PartialEq)]
enum RouteError {
    /// No deployment of that name.
    Unknown(String),
    /// The deployment has no replica that answered: retry.
    Unavailable(String),
}

impl RouteError {
    /// The `outcome` label it is counted under.
    fn outcome(&self) -> &'static str {
        match self {
            RouteError::Unknown(_) => "unknown",
            RouteError::Unavailable(_) => "unavailable",
        }
    }
}

impl Router {
    /// Replaces the table (the ready replicas of every deployment).
    pub fn set_table(&self, table: Table) {
        let mut current = self.table.write().expect("table lock");
        for gone in current.keys().filter(|name| !table.contains_key(*name)) {
            self.metrics.replicas.remove(&DeploymentLabels { model: gone.clone() });
        }
        for (name, replicas) in &table {
            self.metrics
                .replicas
                .get_or_create(&DeploymentLabels { model: name.clone() })
                .set(replicas.len() as i64);
        }
        *current = table;
        self.known.store(true, Ordering::Release);
    }

    pub fn table(&self) -> Table {
        self.table.read().expect("table lock").clone()
    }

    pub fn ready(&self) -> bool {
        self.known.load(Ordering::Acquire)
    }

    /// `model`'s replicas in the order to try them: in turn, the ones that refused a connection lately last.
    fn candidates(&self, model: &str) -> Result<Vec<Replica>, RouteError> {
        let table = self.table.read().expect("table lock");
        let Some(replicas) = table.get(model) else {
            let mut names: Vec<&str> = table.keys().map(String::as_str).collect();
            names.sort_unstable();
            return Err(RouteError::Unknown(format!(
                "no model named '{model}' is deployed (deployed: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        };
        if replicas.is_empty() {
            return Err(RouteError::Unavailable(format!(
                "deployment '{model}' has no ready replica yet; retry shortly"
            )));
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % replicas.len();
        let mut ordered: Vec<Replica> = replicas[start..].iter().chain(&replicas[..start]).cloned().collect();
        let down = self.down.lock().expect("down lock");
        let now = Instant::now();
        ordered.sort_by_key(|replica| down.get(&replica.id).is_some_and(|since| now < *since + DOWN_FOR));
        Ok(ordered)
    }

    /// Counts one request of `model` over `protocol` that ended as `outcome`.
    fn count(&self, model: &str, protocol: &'static str, outcome: &'static str) {
        self.metrics
            .requests
            .get_or_create(&RouteLabels {
                model: model.to_string(),
                protocol,
                outcome,
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode_metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics.registry).expect("writing to a String");
        text
    }

    fn mark_down(&self, replica: &Replica) {
        self.down
            .lock()
            .expect("down lock")
            .insert(replica.id.clone(), Instant::now());
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| Status::internal(format!("replica address '{address}': {error}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("a valid response")
}

fn route_error(error: RouteError) -> Response {
    match error {
        RouteError::Unknown(message) => json_response(StatusCode::NOT_FOUND, &json!({ "error": message })),
        RouteError::Unavailable(message) => {
            let mut response = json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "error": message }));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            response
        }
    }
}

/// The model a protocol path names: `/v2/models/NAME[/…]`, or KServe V1's `/v1/models/NAME[:VERB]`.
fn model_of(path: &str) -> Option<&str> {
    let name = if let Some(rest) = path.strip_prefix("/v2/models/") {
        rest.split('/').next()?
    } else {
        let call = path.strip_prefix("/v1/models/")?;
        call.rsplit_once(':').map_or(call, |(name, _)| name)
    };
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// The REST binding: health and server metadata answered here, everything under `/v2/models/NAME` sent to
/// a replica of `NAME`.
pub fn http_router(router: Arc<Router>) -> axum::Router {
    axum::Router::new()
        .fallback(rest)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(router)
}

async fn rest(
    axum::extract::State(router): axum::extract::State<Arc<Router>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    match path {
        "/v2/health/live" => return json_response(StatusCode::OK, &json!({ "live": true })),
        "/v2/health/ready" => {
            let ready = router.ready();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return json_response(status, &json!({ "ready": ready }));
        }
        "/v2" => {
            return json_response(
                StatusCode::OK,
                &json!({ "name": SERVER_NAME, "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS }),
            );
        }
        "/" => return json_response(StatusCode::OK, &json!({ "status": "alive" })),
        "/v1/models" => {
            let mut names: Vec<String> = router.table().into_keys().collect();
            names.sort_unstable();
            return json_response(StatusCode::OK, &json!({ "models": names }));
        }
        "/metrics" => {
            return Response::builder()
                .status(StatusCode::OK)
                .header(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Body::from(router.encode_metrics()))
                .expect("a valid response");
        }
        _ => {}
    }
    let Some(model) = model_of(path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({
                "error": format!("no route for {method} {path}; the protocol's routes are under /v2 (KServe V1's under /v1)")
            }),
        );
    };
    let replicas = match router.candidates(model) {
        Ok(replicas) => replicas,
        Err(error) => {
            router.count(model, "rest", error.outcome());
            return route_error(error);
        }
    };
    let target = uri.path_and_query().map_or(path, |whole| whole.as_str());
    let mut refused = Vec::new();
    for replica in &replicas {
        let mut request = router
            .http
            .request(method.clone(), format!("http://{}{target}", replica.http))
            .body(body.clone());
        for name in FORWARDED_HEADERS {
            if let Some(value) = headers.get(name) {
                request = request.header(name, value);
            }
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) if error.is_connect() => {
                router.mark_down(replica);
                router.count(model, "rest", "retried");
                refused.push(format!("replica {} at {}", replica.id, replica.http));
                continue;
            }
            Err(error) => {
                router.mark_down(replica);
                router.count(model, "rest", "lost");
                return lost(model, replica, &error.to_string());
            }
        };
        let status = response.status();
        let mut forwarded = Response::builder().status(status);
        for name in FORWARDED_HEADERS {
            if let Some(value) = response.headers().get(name) {
                forwarded = forwarded.header(name, value);
            }
        }
        return match response.bytes().await {
            Ok(bytes) => {
                router.count(model, "rest", "answered");
                forwarded.body(Body::from(bytes)).expect("a valid response")
            }
            Err(error) => {
                router.mark_down(replica);
                router.count(model, "rest", "lost");
                lost(model, replica, &error.to_string())
            }
        };
    }
    router.count(model, "rest", "unavailable");
    route_error(RouteError::Unavailable(format!(
        "no replica of '{model}' accepted the request ({} refused the connection); retry shortly",
        refused.join(", ")
    )))
}

/// A request that reached `replica` and got no answer: retryable, elsewhere.
fn lost(model: &str, replica: &Replica, error: &str) -> Response {
    route_error(RouteError::Unavailable(format!(
        "replica {} of '{model}' at {} did not answer ({error}); retry, another replica will take it",
        replica.id, replica.http
    )))
}

/// The gRPC binding: `inference.GRPCInferenceService` in front of the replicas.
pub fn grpc_service(router: Arc<Router>) -> GrpcInferenceServiceServer<GrpcRouter> {
    GrpcInferenceServiceServer::new(GrpcRouter { router })
        .max_decoding_message_size(BODY_BYTES_MAX)
        .max_encoding_message_size(BODY_BYTES_MAX)
}

pub struct GrpcRouter {
    router: Arc<Router>,
}

/// A connection refused (the replica is gone): tonic attaches the transport error as the source only then.
fn refused(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && std::error::Error::source(status).is_some()
}

impl GrpcRouter {
    /// Sends `message` to a replica of `model` with `call`, the next replica when one refuses the
    /// connection.
    async fn forward<M, R, F, Fut>(&self, model: &str, message: M, call: F) -> Result<tonic::Response<R>, Status>
    where
        M: Clone,
        F: Fn(GrpcInferenceServiceClient<Channel>, M) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let replicas = self.router.candidates(model).map_err(|error| {
            self.router.count(model, "grpc", error.outcome());
            match error {
                RouteError::Unknown(message) => Status::not_found(message),
                RouteError::Unavailable(message) => Status::unavailable(message),
            }
        })?;
        let mut tried = Vec::new();
        for replica in &replicas {
            let client = GrpcInferenceServiceClient::new(self.router.channel(&replica.grpc)?)
                .max_decoding_message_size(BODY_BYTES_MAX)
                .max_encoding_message_size(BODY_BYTES_MAX);
            match call(client, message.clone()).await {
                Err(status) if refused(&status) => {
                    self.router.mark_down(replica);
                    self.router.count(model, "grpc", "retried");
                    tried.push(format!("replica {} at {}", replica.id, replica.grpc));
                }
                Err(status)
                    if std::error::Error::source(&status).is_some()
                        && matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown) =>
                {
                    self.router.mark_down(replica);
                    self.router.count(model, "grpc", "lost");
                    return Err(Status::unavailable(format!(
                        "replica {} of '{model}' at {} did not answer ({}); retry, another replica will take it",
                        replica.id,
                        replica.grpc,
                        status.message()
                    )));
                }
                other => {
                    self.router.count(model, "grpc", "answered");
                    return other;
                }
            }
        }
        self.router.count(model, "grpc", "unavailable");
        Err(Status::unavailable(format!(
            "no replica of '{model}' accepted the request ({} refused the connection); retry shortly",
            tried.join(", ")
        )))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcRouter {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<tonic::Response<ServerLiveResponse>, Status> {
        Ok(tonic::Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<tonic::Response<ServerReadyResponse>, Status> {
        Ok(tonic::Response::new(ServerReadyResponse {
            ready: self.router.ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<tonic::Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        if self.router.candidates(&request.name).is_err() {
            return Ok(tonic::Response::new(ModelReadyResponse { ready: false }));
        }
        let name = request.name.clone();
        self.forward(&name, request, |mut client, message| async move {
            client.model_ready(message).await
        })
        .await
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<tonic::Response<ServerMetadataResponse>, Status> {
        Ok(tonic::Response::new(crate::grpc::server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<tonic::Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let name = request.name.clone();
        self.forward(&name, request, |mut client, message| async move {
            client.model_metadata(message).await
        })
        .await
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<tonic::Response<ModelInferResponse>, Status> {
        let request = request.into_inner();
        let name = request.model_name.clone();
        self.forward(&name, request, |mut client, message| async move {
            client.model_infer(message).await
        })
        .await
    }
}

/// Serves the router on `rest` and `grpc` (each answers both protocols, as a replica does) until `shutdown`.
pub async fn serve(
    router: Arc<Router>,
    rest: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let routes = tonic::service::Routes::from(http_router(router.clone())).add_service(grpc_service(router));
    crate::serve_routes(routes, rest, grpc, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str) -> Replica {
        Replica {
            id: id.into(),
            http: format!("127.0.0.1:{}", 1000 + id.len()),
            grpc: String::new(),
        }
    }

    #[test]
    fn replicas_take_turns_and_one_that_refused_goes_last_for_a_while() {
        let router = Router::default();
        assert!(!router.ready());
        assert!(
            matches!(router.candidates("digits"), Err(RouteError::Unknown(message)) if message.contains("deployed: none"))
        );
        router.set_table(Table::from([
            ("digits".to_string(), vec![replica("a"), replica("b"), replica("c")]),
            ("empty".to_string(), Vec::new()),
        ]));
        assert!(router.ready());
        let firsts: Vec<String> = (0..3)
            .map(|_| router.candidates("digits").unwrap()[0].id.clone())
            .collect();
        assert_eq!(firsts, ["a", "b", "c"]);
        router.mark_down(&replica("a"));
        for _ in 0..3 {
            let order = router.candidates("digits").unwrap();
            assert_eq!(order.last().unwrap().id, "a", "{order:?}");
        }
        assert!(matches!(router.candidates("empty"), Err(RouteError::Unavailable(_))));
        router.count("digits", "rest", "answered");
        router.count("digits", "rest", "answered");
        let text = router.encode_metrics();
        assert!(
            text.contains("kiln_router_requests_total{model=\"digits\",protocol=\"rest\",outcome=\"answered\"} 2"),
            "{text}"
        );
        assert!(text.contains("kiln_router_replicas{model=\"digits\"} 3"), "{text}");
        router.set_table(Table::new());
        assert!(!router.encode_metrics().contains("kiln_router_replicas{"));
        assert_eq!(model_of("/v2/models/digits/versions/3/infer"), Some("digits"));
        assert_eq!(model_of("/v2/models/"), None);
        assert_eq!(model_of("/v1/models/digits:predict"), Some("digits"));
        assert_eq!(model_of("/v1/models/digits"), Some("digits"));
        assert_eq!(model_of("/v1/models/:predict"), None);
        assert_eq!(model_of("/v1/models/a/b:predict"), None);
    }
}
