//! MLflow's artifact proxy over the artifact store ([`crate::artifacts`]), the endpoints the stock client
//! uses for `mlflow-artifacts:` URIs:
//!
//! ```text
//!   PUT    /api/2.0/mlflow-artifacts/artifacts/PATH      upload (the body, streamed)
//!   GET    /api/2.0/mlflow-artifacts/artifacts/PATH      download (streamed; x-kiln-sha256 when recorded)
//!   GET    /api/2.0/mlflow-artifacts/artifacts?path=DIR  list: {"files": [{"path", "is_dir", "file_size"}]}
//!   DELETE /api/2.0/mlflow-artifacts/artifacts/PATH      delete a file or a directory
//! ```
//!
//! An upload is recorded (size and SHA-256) through Raft once its bytes are stored, and answered only then.
//! One that replaces a recorded artifact is stored in an object of its own, named by its record, so the
//! artifact it replaces stays whole and current until the record is replicated; the replaced object is
//! removed after ([`crate::artifacts::upload_object`]).
//! A download is hashed as it streams and cut off with an error if the bytes no longer match the record,
//! so a corrupted artifact never arrives whole. Listings carry each file's recorded hash as `kiln_sha256`.

use axum::extract::Path as UrlPath;
use axum::routing::get;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::*;
use crate::artifacts::{ArtifactError, hex};
use crate::tracking::ArtifactRecord;

/// The header a download's recorded SHA-256 travels in.
pub const SHA256_HEADER: &str = "x-kiln-sha256";

pub(super) fn routes() -> axum::Router<Tracker> {
    let root = "/api/2.0/mlflow-artifacts/artifacts";
    axum::Router::new()
        .route(root, get(list))
        .route(&format!("{root}/{{*path}}"), get(download).put(upload).delete(delete))
}

impl From<ArtifactError> for Failure {
    fn from(error: ArtifactError) -> Failure {
        let (code, status) = match &error {
            ArtifactError::InvalidPath(_) | ArtifactError::Interrupted { .. } => {
                ("INVALID_PARAMETER_VALUE", StatusCode::BAD_REQUEST)
            }
            ArtifactError::NotFound(_) => ("RESOURCE_DOES_NOT_EXIST", StatusCode::NOT_FOUND),
            ArtifactError::TooLarge { .. } => ("RESOURCE_EXHAUSTED", StatusCode::PAYLOAD_TOO_LARGE),
            ArtifactError::Store(_) => ("INTERNAL_ERROR", StatusCode::INTERNAL_SERVER_ERROR),
        };
        Failure {
            code,
            status,
            message: error.to_string(),
        }
    }
}

/// What a refused upload's client may still be sending is read and dropped, up to this much or this long,
/// so that closing the connection does not reset it before the client reads the refusal.
const LINGER_BYTES: usize = 1 << 20;
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

async fn linger(mut rest: axum::body::BodyDataStream) {
    let drain = async {
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match rest.next().await {
                Some(Ok(chunk)) => drained += chunk.len(),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

async fn upload(
    State(tracker): State<Tracker>,
    UrlPath(path): UrlPath<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let mut body = body.into_data_stream();
    let result = async {
        let store = &tracker.artifacts;
        crate::artifacts::check_path(&path)?;
        // Refused before a byte is stored when the client says how much it will send.
        let announced = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if let Some(length) = announced
            && length > store.max_bytes
        {
            return Err(Failure::from(ArtifactError::TooLarge {
                path: path.clone(),
                limit: store.max_bytes,
            }));
        }
        // A recorded artifact is replaced through an object of its own; a new one goes to its own path.
        let replaced = tracker.read().await?.artifact(&path).cloned();
        let object = match &replaced {
            Some(_) => crate::artifacts::upload_object(&path, &tracker.new_run_id()),
            None => path.clone(),
        };
        let stored = store.put_object(&path, &object, &mut body).await.inspect_err(|error| {
            tracing::warn!("artifact upload refused: {error}");
        })?;
        let (size, sha256, artifact_root) = (stored.size, stored.sha256, tracker.artifact_root.clone());
        let command = if object == path {
            TrackingCommand::RecordArtifact {
                path: path.clone(),
                size,
                sha256,
                artifact_root,
            }
        } else {
            TrackingCommand::RecordArtifactAt {
                path: path.clone(),
                size,
                sha256,
                object: object.clone(),
                artifact_root,
            }
        };
        // When this fails the replaced artifact is still the recorded one, whole; the new object stays,
        // since a write whose answer was lost may still be applied and name it.
        tracker.write(command).await?;
        if let Some(replaced) = replaced {
            let previous = ArtifactRecord::object_of(Some(&replaced), &path);
            if previous != object
                && let Err(error) = store.delete_object(previous).await
            {
                tracing::warn!("artifact '{path}': the replaced object '{previous}' was not removed: {error}");
            }
        }
        Ok(json!({}))
    }
    .await;
    if result.is_err() {
        linger(body).await;
    }
    respond(result)
}

async fn download(State(tracker): State<Tracker>, UrlPath(path): UrlPath<String>) -> Response {
    let opened = async {
        let expected = tracker.read().await?.artifact(&path).cloned();
        let object = ArtifactRecord::object_of(expected.as_ref(), &path);
        let (size, stream) = tracker.artifacts.get_object(&path, object).await?;
        Ok::<_, Failure>((expected, size, stream))
    }
    .await;
    let (expected, size, stream) = match opened {
        Ok(opened) => opened,
        Err(failure) => return respond(Err(failure)),
    };
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size);
    let body = match expected {
        None => Body::from_stream(stream),
        Some(record) => {
            response = response.header(SHA256_HEADER, &record.sha256);
            // Hash as it goes; at the end, a mismatch becomes an error that cuts the response off.
            let mut hasher = Some(Sha256::new());
            let checked = stream
                .map(Some)
                .chain(futures::stream::once(async { None }))
                .filter_map(move |item| {
                    let out = match item {
                        Some(Ok(chunk)) => {
                            if let Some(hasher) = hasher.as_mut() {
                                hasher.update(&chunk);
                            }
                            Some(Ok(chunk))
                        }
                        Some(Err(error)) => Some(Err(error)),
                        None => {
                            let actual = hex(&hasher.take().map(Sha256::finalize).unwrap_or_default());
                            (actual != record.sha256).then(|| {
                                tracing::error!(
                                    "artifact '{}' no longer matches its recorded SHA-256 ({} stored, {actual} read)",
                                    path,
                                    record.sha256
                                );
                                Err(ArtifactError::Store(format!(
                                    "artifact '{path}' does not match its recorded SHA-256"
                                )))
                            })
                        }
                    };
                    futures::future::ready(out)
                });
            Body::from_stream(checked)
        }
    };
    response.body(body).expect("a valid response")
}

async fn list(State(tracker): State<Tracker>, RawQuery(query): RawQuery) -> Response {
    respond(
        async {
            let directory = Fields(query_of(query)).text("path")?.unwrap_or_default();
            let mut entries = tracker.artifacts.list(&directory).await?;
            let tracking = tracker.read().await?;
            let directory = directory.trim_end_matches('/');
            // Artifacts whose bytes are in an upload object of their own are listed from their records.
            let prefix = if directory.is_empty() {
                String::new()
            } else {
                format!("{directory}/")
            };
            for (full, record) in tracking.artifacts_under(&prefix) {
                if record.object.is_none() {
                    continue;
                }
                let rest = &full[prefix.len()..];
                let entry = match rest.split_once('/') {
                    Some((child, _)) => crate::artifacts::Entry {
                        path: child.to_string(),
                        is_dir: true,
                        size: None,
                    },
                    None => crate::artifacts::Entry {
                        path: rest.to_string(),
                        is_dir: false,
                        size: Some(record.size),
                    },
                };
                match entries.iter_mut().find(|listed| listed.path == entry.path) {
                    Some(listed) if !entry.is_dir => *listed = entry,
                    Some(_) => {}
                    None => entries.push(entry),
                }
            }
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            let files: Vec<Value> = entries
                .iter()
                .map(|entry| {
                    let mut file = json!({ "path": entry.path, "is_dir": entry.is_dir });
                    if let Some(size) = entry.size {
                        file["file_size"] = Value::from(size);
                        let full = if directory.is_empty() {
                            entry.path.clone()
                        } else {
                            format!("{directory}/{}", entry.path)
                        };
                        if let Some(record) = tracking.artifact(&full) {
                            file["kiln_sha256"] = Value::from(record.sha256.clone());
                        }
                    }
                    file
                })
                .collect();
            Ok(json!({ "files": files }))
        }
        .await,
    )
}

async fn delete(State(tracker): State<Tracker>, UrlPath(path): UrlPath<String>) -> Response {
    respond(
        async {
            // The artifacts recorded at `path` or under it, and the objects at those paths in the store.
            let tracking = tracker.read().await?;
            let directory = format!("{}/", path.trim_end_matches('/'));
            let recorded: Vec<(String, Option<String>)> = tracking
                .artifact(&path)
                .map(|record| (path.clone(), record.object.clone()))
                .into_iter()
                .chain(
                    tracking
                        .artifacts_under(&directory)
                        .map(|(full, record)| (full.clone(), record.object.clone())),
                )
                .collect();
            let mut paths = match tracker.artifacts.delete(&path).await {
                Ok(deleted) => deleted,
                Err(ArtifactError::NotFound(_)) if !recorded.is_empty() => Vec::new(),
                Err(error) => return Err(error.into()),
            };
            for (full, object) in recorded {
                if let Some(object) = object {
                    tracker.artifacts.delete_object(&object).await?;
                }
                if !paths.contains(&full) {
                    paths.push(full);
                }
            }
            tracker
                .write(TrackingCommand::ForgetArtifacts {
                    paths,
                    artifact_root: tracker.artifact_root.clone(),
                })
                .await?;
            Ok(json!({}))
        }
        .await,
    )
}
