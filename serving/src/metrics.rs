//! Prometheus metrics of the serving tier, per model and version, exposed at `/metrics` in the
//! OpenMetrics text format:
//!
//! ```text
//!   kiln_serving_requests_total{model,version,protocol}            requests answered (successes and errors)
//!   kiln_serving_errors_total{model,version,protocol,reason}       errors by reason (invalid_input, queue_full, …)
//!   kiln_serving_request_duration_seconds{model,version}           end-to-end latency, enqueue to reply
//!   kiln_serving_batch_size{model,version}                         rows per batch the model ran
//!   kiln_serving_queue_depth{model,version}                        requests waiting for a batch
//!   kiln_serving_request_log_{rows_written,files_written,rows_dropped}_total   the request log
//! ```

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    version: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model: String,
    version: String,
    protocol: &'static str,
    reason: &'static str,
}

type Histograms = Family<ModelLabels, Histogram, fn() -> Histogram>;

/// Every serving metric, registered once.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: Histograms,
    batch_size: Histograms,
    queue_depth: Family<ModelLabels, Gauge>,
    /// The request log's counters (registered whether or not a log is configured).
    pub request_log: crate::request_log::LogCounters,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("kiln_serving");
        let requests = Family::<RequestLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        // 50 µs to about 1.6 s, doubling.
        let latency: Histograms = Family::new_with_constructor(|| Histogram::new(exponential_buckets(5e-5, 2.0, 16)));
        // 1 to 1,024 rows, doubling.
        let batch_size: Histograms = Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 11)));
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        registry.register("requests", "Inference requests answered", requests.clone());
        registry.register(
            "errors",
            "Inference requests answered with an error, by reason",
            errors.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Inference latency from arrival to reply",
            latency.clone(),
        );
        registry.register("batch_size", "Rows in each batch the model ran", batch_size.clone());
        registry.register("queue_depth", "Requests waiting to be batched", queue_depth.clone());
        let request_log = crate::request_log::LogCounters::default();
        registry.register(
            "request_log_rows_written",
            "Request-log rows written to the store",
            request_log.rows_written.clone(),
        );
        registry.register(
            "request_log_files_written",
            "Request-log Parquet files written to the store",
            request_log.files_written.clone(),
        );
        registry.register(
            "request_log_rows_dropped",
            "Request-log rows dropped because the writer was behind or a write failed",
            request_log.rows_dropped.clone(),
        );
        Metrics {
            registry,
            requests,
            errors,
            latency,
            batch_size,
            queue_depth,
            request_log,
        }
    }
}

impl Metrics {
    /// The handles one loaded model version records into.
    pub fn model(&self, model: &str, version: &str) -> ModelMetrics {
        let labels = ModelLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        let requests = |protocol| {
            self.requests
                .get_or_create(&RequestLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                    protocol,
                })
                .clone()
        };
        ModelMetrics {
            rest_requests: requests("rest"),
            grpc_requests: requests("grpc"),
            latency: self.latency.get_or_create(&labels).clone(),
            batch_size: self.batch_size.get_or_create(&labels).clone(),
            queue_depth: self.queue_depth.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// Counts one answered request of `model` (`protocol`: `rest` or `grpc`); `error` when it failed.
    pub fn answered(&self, model: &ModelMetrics, protocol: &'static str, error: Option<&crate::ServeError>) {
        match protocol {
            "grpc" => model.grpc_requests.inc(),
            _ => model.rest_requests.inc(),
        };
        if let Some(error) = error {
            let labels = &model.labels;
            self.errors
                .get_or_create(&ErrorLabels {
                    model: labels.model.clone(),
                    version: labels.version.clone(),
                    protocol,
                    reason: error.reason(),
                })
                .inc();
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

/// One model version's metric handles (cheap clones of the registered ones).
#[derive(Clone, Debug)]
pub struct ModelMetrics {
    pub labels: ModelLabels,
    /// Requests answered over each protocol: looked up once, not per request.
    pub rest_requests: Counter,
    pub grpc_requests: Counter,
    pub latency: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: Gauge,
}
