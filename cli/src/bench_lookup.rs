//! `kiln bench lookup`: sequential online lookups against a feature server over Flight, from Rust, so the
//! figure is the server's and the wire's and not a Python client's. Each lookup is one DoGet whose ticket
//! is the `online` command for one entity drawn at random from `0..keys`, as a serving path sends it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use hdrhistogram::Histogram;
use kiln_featurestore::server::FlightCommand;
use serde::Serialize;

/// Lookups sent before measuring starts.
const WARMUP: usize = 100;

#[derive(Serialize)]
pub struct LookupResult {
    pub suite: &'static str,
    pub service: String,
    pub lookups: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Lookups that found no row for their entity.
    pub not_found: u64,
}

/// A small deterministic generator for the entity keys (SplitMix64), so runs draw the same keys.
pub(crate) fn next_key(state: &mut u64, keys: u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut mixed = *state;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (mixed ^ (mixed >> 31)) % keys
}

pub async fn run(
    featurestore: &str,
    service: &str,
    key: &str,
    keys: u64,
    requests: usize,
    max_seconds: u64,
) -> Result<LookupResult> {
    if keys == 0 || requests == 0 {
        bail!("--keys and --requests must be positive");
    }
    let mut client = crate::featureserver::connect(featurestore).await?;
    let mut state = 11u64;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let mut not_found = 0;
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let started = Instant::now();
    for index in 0..WARMUP + requests {
        if Instant::now() >= deadline {
            break;
        }
        let entity = next_key(&mut state, keys);
        let command = FlightCommand::Online {
            service: service.to_string(),
            entities: [(key.to_string(), vec![serde_json::json!(entity)])].into(),
        };
        let sent = Instant::now();
        let batches: Vec<_> = client
            .do_get(arrow_flight::Ticket::new(command.to_bytes()))
            .await
            .context("a lookup failed")?
            .try_collect()
            .await
            .context("a lookup's rows did not arrive")?;
        let elapsed = sent.elapsed();
        let batch = batches.first().context("a lookup answered no rows")?;
        // The last column is a feature: null when the entity has no row online.
        if batch.num_rows() != 1 || batch.column(batch.num_columns() - 1).null_count() == 1 {
            not_found += 1;
        }
        if index >= WARMUP {
            let micros = elapsed.as_micros().clamp(1, 60_000_000) as u64;
            histogram.record(micros).expect("latency within bounds");
        }
    }
    Ok(LookupResult {
        suite: "lookup",
        service: service.to_string(),
        lookups: histogram.len(),
        seconds: started.elapsed().as_secs_f64(),
        p50_ms: histogram.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: histogram.max() as f64 / 1000.0,
        not_found,
    })
}

#[derive(Serialize)]
pub struct DoGetResult {
    pub suite: &'static str,
    pub ticket: String,
    pub rows: usize,
    /// The bytes of the Arrow buffers received by each DoGet.
    pub bytes: usize,
    /// Seconds of each DoGet, from the request until the last batch is decoded.
    pub seconds: Vec<f64>,
    /// Bytes per second of the median DoGet, in GB/s.
    pub median_gb_per_s: f64,
}

/// `kiln bench doget`: `requests` DoGets of `ticket` (sent as given: a Kiln feature command as JSON, or
/// another Flight server's ticket) from Rust, each read to the end and decoded, timed one by one; stops
/// early after `max_seconds`.
pub async fn doget(featurestore: &str, ticket: &str, requests: usize, max_seconds: u64) -> Result<DoGetResult> {
    if requests == 0 {
        bail!("--requests must be positive");
    }
    let mut client = crate::featureserver::connect(featurestore).await?;
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let (mut rows, mut bytes, mut seconds) = (0, 0, Vec::new());
    while seconds.len() < requests && Instant::now() < deadline {
        let sent = Instant::now();
        let mut stream = client
            .do_get(arrow_flight::Ticket::new(ticket.as_bytes().to_vec()))
            .await
            .context("the DoGet failed")?;
        (rows, bytes) = (0, 0);
        while let Some(batch) = stream.try_next().await.context("the DoGet's rows did not arrive")? {
            rows += batch.num_rows();
            bytes += batch
                .columns()
                .iter()
                .map(|column| column.to_data().get_slice_memory_size().unwrap_or_default())
                .sum::<usize>();
        }
        seconds.push(sent.elapsed().as_secs_f64());
    }
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(DoGetResult {
        suite: "doget",
        ticket: ticket.to_string(),
        rows,
        bytes,
        seconds,
        median_gb_per_s: bytes as f64 / median / 1e9,
    })
}
