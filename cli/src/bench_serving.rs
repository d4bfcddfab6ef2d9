//! `kiln bench serving`: closed-loop inference load against any server of the Open Inference Protocol's REST
//! binding: Kiln's (`kiln serve`) or a baseline answering the same route with the same JSON (onnxruntime
//! behind FastAPI, Ray Serve; see `benches/run-serving.sh`), so one client measures them all alike.
//!
//! Each of C clients holds one HTTP/1.1 keep-alive connection and sends one request at a time: one row of
//! `--features` FP32 values (from a fixed seeded set, pixel-like values 0..16) as JSON `data`, to
//! `POST /v2/models/MODEL/infer`. After a warm-up, every client sends for `--max-seconds`; latency is from
//! sending to the whole answer read. A non-200 answer counts as an error and is not timed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Requests each client sends before measuring starts.
const WARMUP_PER_CLIENT: usize = 50;
/// Distinct request bodies the clients cycle through.
const BODIES: usize = 256;

#[derive(Serialize)]
pub struct ServingResult {
    pub suite: &'static str,
    /// What was measured (`kiln`, `onnxruntime-fastapi`, `ray-serve`, …).
    pub server: String,
    pub clients: usize,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// `BODIES` inference requests of one row each, seeded, so every server gets the same rows.
fn bodies(input_name: &str, features: usize) -> Vec<String> {
    let mut state = 7u64;
    (0..BODIES)
        .map(|_| {
            let row: Vec<f32> = (0..features)
                .map(|_| crate::bench_lookup::next_key(&mut state, 17) as f32)
                .collect();
            serde_json::json!({
                "inputs": [{ "name": input_name, "shape": [1, features], "datatype": "FP32", "data": row }],
            })
            .to_string()
        })
        .collect()
}

/// One client's latencies (µs) and error count, measured from `start` until `deadline`.
async fn client_loop(
    url: String,
    bodies: Arc<Vec<String>>,
    offset: usize,
    ready: Arc<tokio::sync::Barrier>,
    seconds: u64,
) -> Result<(Histogram<u64>, u64, f64)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let send = |index: usize| {
        client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bodies[(offset + index) % bodies.len()].clone())
            .send()
    };
    for index in 0..WARMUP_PER_CLIENT {
        let response = send(index).await.with_context(|| format!("no answer from {url}"))?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            bail!("{url} answered {status} during the warm-up: {body}");
        }
    }
    ready.wait().await;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let mut errors = 0;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut index = 0;
    while Instant::now() < deadline {
        let sent = Instant::now();
        let answered = match send(index).await {
            Ok(response) => {
                let success = response.status().is_success();
                response.bytes().await.is_ok() && success
            }
            Err(_) => false,
        };
        if answered {
            histogram.record(sent.elapsed().as_micros().max(1) as u64)?;
        } else {
            errors += 1;
        }
        index += 1;
    }
    Ok((histogram, errors, started.elapsed().as_secs_f64()))
}

/// One level: `clients` closed-loop clients for `seconds` against `address`'s model.
pub async fn run(
    address: &str,
    server: &str,
    model: &str,
    input_name: &str,
    features: usize,
    clients: usize,
    seconds: u64,
) -> Result<ServingResult> {
    if clients == 0 || features == 0 || seconds == 0 {
        bail!("--clients, --features and --max-seconds must be positive");
    }
    let host = address.trim_start_matches("http://").trim_end_matches('/');
    let url = format!("http://{host}/v2/models/{model}/infer");
    let bodies = Arc::new(bodies(input_name, features));
    let ready = Arc::new(tokio::sync::Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|client| {
            tokio::spawn(client_loop(
                url.clone(),
                bodies.clone(),
                client * 17,
                ready.clone(),
                seconds,
            ))
        })
        .collect();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let (mut errors, mut elapsed) = (0, 0f64);
    for handle in handles {
        let (part, part_errors, part_seconds) = handle.await??;
        histogram.add(part)?;
        errors += part_errors;
        elapsed = elapsed.max(part_seconds);
    }
    let requests = histogram.len();
    Ok(ServingResult {
        suite: "serving",
        server: server.to_string(),
        clients,
        requests,
        errors,
        seconds: elapsed,
        requests_per_second: requests as f64 / elapsed.max(1e-9),
        p50_ms: histogram.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: histogram.max() as f64 / 1000.0,
    })
}
