//! `kiln bench lookup`: sequential online lookups against a feature server from Rust, so the figure is the
//! server's and the wire's and not a Python client's. Each lookup names one entity drawn at random from
//! `first_key..first_key + keys`, as a serving path sends it, over either protocol:
//!
//! - `--over flight`: one DoGet whose ticket is the `online` command for a feature service;
//! - `--over http`: one `POST /get-online-features` in the body Feast's feature server takes (`entities` and
//!   `feature_service`, or `features` from `--lookup-features`), on one keep-alive HTTP/1.1 connection, so the same client measures
//!   Kiln and `feast serve` alike.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use futures::TryStreamExt;
use hdrhistogram::Histogram;
use kiln_featurestore::server::FlightCommand;
use serde::Serialize;

/// Lookups sent before measuring starts.
const WARMUP: usize = 100;

/// The protocol a lookup travels over.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LookupOver {
    /// Arrow Flight DoGet (Kiln's feature server).
    Flight,
    /// HTTP/JSON `POST /get-online-features` (Kiln's feature server or Feast's).
    Http,
}

/// What each lookup asks for.
pub struct LookupTarget {
    /// The feature service looked up (required over Flight).
    pub service: String,
    /// Features as `view:feature` (over HTTP, instead of a service).
    pub features: Vec<String>,
    /// The entity's join key.
    pub key: String,
    /// The first entity key; lookups draw from `first_key..first_key + keys`.
    pub first_key: u64,
    pub keys: u64,
}

#[derive(Serialize)]
pub struct LookupResult {
    pub suite: &'static str,
    pub over: LookupOver,
    /// The feature service, or the features joined by commas.
    pub looked_up: String,
    pub lookups: u64,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Measured lookups that found no row for their entity.
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

/// A connected client of one protocol.
enum Looker {
    Flight(arrow_flight::FlightClient),
    Http { client: reqwest::Client, url: String },
}

impl Looker {
    async fn connect(over: LookupOver, featurestore: &str) -> Result<Self> {
        Ok(match over {
            LookupOver::Flight => Looker::Flight(crate::featureserver::connect(featurestore).await?),
            LookupOver::Http => {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .tcp_nodelay(true)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .context("building the HTTP client")?;
                let base = if featurestore.contains("://") {
                    featurestore.trim_end_matches('/').to_string()
                } else {
                    format!("http://{featurestore}")
                };
                Looker::Http {
                    client,
                    url: format!("{base}/get-online-features"),
                }
            }
        })
    }

    /// Looks one entity up; true when the server has a row for it.
    async fn lookup(&mut self, target: &LookupTarget, entity: u64) -> Result<bool> {
        match self {
            Looker::Flight(client) => {
                let command = FlightCommand::Online {
                    service: target.service.clone(),
                    entities: [(target.key.clone(), vec![serde_json::json!(entity)])].into(),
                };
                let batches: Vec<_> = client
                    .do_get(arrow_flight::Ticket::new(command.to_bytes()))
                    .await
                    .context("a lookup failed")?
                    .try_collect()
                    .await
                    .context("a lookup's rows did not arrive")?;
                let batch = batches.first().context("a lookup answered no rows")?;
                // The last column is a feature: null when the entity has no row online.
                Ok(batch.num_rows() == 1 && batch.column(batch.num_columns() - 1).null_count() == 0)
            }
            Looker::Http { client, url } => {
                let mut body = serde_json::json!({ "entities": { target.key.as_str(): [entity] } });
                if target.features.is_empty() {
                    body["feature_service"] = serde_json::json!(target.service);
                } else {
                    body["features"] = serde_json::json!(target.features);
                }
                let response = client
                    .post(url.as_str())
                    .json(&body)
                    .send()
                    .await
                    .context("a lookup failed")?;
                let status = response.status();
                let answer: serde_json::Value = response.json().await.context("a lookup's answer is not JSON")?;
                if !status.is_success() {
                    bail!("a lookup was refused with {status}: {answer}");
                }
                online_found(&answer)
            }
        }
    }
}

/// Whether a `/get-online-features` answer found its one entity: the last result (a feature) is PRESENT.
fn online_found(answer: &serde_json::Value) -> Result<bool> {
    let status = answer["results"]
        .as_array()
        .and_then(|results| results.last())
        .and_then(|result| result["statuses"][0].as_str())
        .with_context(|| format!("a lookup's answer has no results[].statuses: {answer}"))?;
    Ok(status == "PRESENT")
}

pub async fn run(
    over: LookupOver,
    featurestore: &str,
    target: &LookupTarget,
    requests: usize,
    max_seconds: u64,
) -> Result<LookupResult> {
    if target.keys == 0 || requests == 0 {
        bail!("--keys and --requests must be positive");
    }
    let looked_up = match over {
        LookupOver::Flight if target.service.is_empty() => {
            bail!("a lookup over Flight needs --service, the feature service to look up")
        }
        LookupOver::Flight if !target.features.is_empty() => {
            bail!("a lookup over Flight names a feature service (--service), not --lookup-features")
        }
        LookupOver::Http if target.service.is_empty() == target.features.is_empty() => {
            bail!(
                "a lookup over HTTP needs either --service or --lookup-features (view:feature, comma-separated), not both"
            )
        }
        _ if target.features.is_empty() => target.service.clone(),
        _ => target.features.join(","),
    };
    let mut looker = Looker::connect(over, featurestore).await?;
    let mut state = 11u64;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let mut not_found = 0;
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let started = Instant::now();
    for index in 0..WARMUP + requests {
        if Instant::now() >= deadline {
            break;
        }
        let entity = target.first_key + next_key(&mut state, target.keys);
        let sent = Instant::now();
        let found = looker.lookup(target, entity).await?;
        let elapsed = sent.elapsed();
        if index >= WARMUP {
            if !found {
                not_found += 1;
            }
            let micros = elapsed.as_micros().clamp(1, 60_000_000) as u64;
            histogram.record(micros).expect("latency within bounds");
        }
    }
    Ok(LookupResult {
        suite: "lookup",
        over,
        looked_up,
        lookups: histogram.len(),
        seconds: started.elapsed().as_secs_f64(),
        p50_ms: histogram.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: histogram.max() as f64 / 1000.0,
        not_found,
    })
}

#[cfg(test)]
mod tests {
    use super::online_found;

    #[test]
    fn an_answer_is_found_when_its_last_feature_is_present() {
        let answer = |status: &str| {
            serde_json::json!({
                "metadata": {"feature_names": ["id", "g0"]},
                "results": [{"values": [1], "statuses": ["PRESENT"]}, {"values": [null], "statuses": [status]}],
            })
        };
        assert!(online_found(&answer("PRESENT")).unwrap());
        assert!(!online_found(&answer("NOT_FOUND")).unwrap());
        let error = online_found(&serde_json::json!({"detail": "no"}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("results[].statuses"), "{error}");
    }
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
