//! Where artifacts' bytes live: an `object_store` (a local directory by default; `s3://BUCKET/PREFIX`,
//! `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX` when configured), behind MLflow's artifact proxy (`/api/2.0/mlflow-artifacts/artifacts/PATH`, served by every
//! coordinator). Experiments record `mlflow-artifacts:/ID` as their location and runs
//! `mlflow-artifacts:/ID/RUN/artifacts`, so clients reach the bytes through any coordinator.
//!
//! An upload streams through SHA-256 into a multipart upload, which becomes visible only when complete:
//! a local directory stages it under a hidden name and renames it, S3 publishes it on completion. One that
//! is too large, or whose client goes away half way, is aborted and leaves nothing (an earlier artifact at
//! the same path stays whole). The hash and size of what was stored are then replicated
//! ([`crate::tracking::ArtifactRecord`]), so a download can be checked against them.
//!
//! An upload that replaces a recorded artifact goes to an object of its own under [`UPLOADS`]
//! ([`upload_object`]), and the record names it: the bytes it replaces stay whole and stay the artifact
//! until the new record is replicated, so an upload whose record fails (the client gets an error) leaves the
//! earlier, acknowledged artifact as it was. The replaced object is removed once the new record holds. A
//! first upload goes to the artifact's own path, where any S3 client sees it.
//!
//! In a cluster of several coordinators the root must be shared storage (S3, or one directory every
//! coordinator mounts): each coordinator serves from it.

use std::sync::Arc;

use axum::body::Bytes;
use futures::{Stream, StreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};

/// Upload parts in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// The top-level directory of the objects of uploads that replaced an artifact; not an artifact path.
pub const UPLOADS: &str = ".kiln-uploads";

/// The object a replacing upload of `path` goes to: under [`UPLOADS`], named by `unique` (an id no other
/// upload uses).
pub fn upload_object(path: &str, unique: &str) -> String {
    format!("{UPLOADS}/{path}/{unique}")
}

/// Why an artifact operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{0}")]
    InvalidPath(String),
    #[error("artifact '{0}' does not exist")]
    NotFound(String),
    #[error(
        "the upload of '{path}' passed {limit} bytes, the most one artifact may have (--artifact-max-bytes); nothing was stored"
    )]
    TooLarge { path: String, limit: u64 },
    #[error("the upload of '{path}' ended after {received} bytes: {reason}; nothing was stored")]
    Interrupted {
        path: String,
        received: u64,
        reason: String,
    },
    #[error("artifact store: {0}")]
    Store(String),
}

/// What was stored: its size and SHA-256 (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub size: u64,
    pub sha256: String,
}

/// One entry of a directory listing: a file with its size, or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the listed directory's parent, as MLflow lists: `dir/name`.
    pub path: String,
    pub is_dir: bool,
    pub size: Option<u64>,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Checks a relative artifact path (`1/RUN/artifacts/model/weights.bin`): `/`-separated, no empty, `.` or
/// `..` parts, no `\`, `#` or control characters.
pub fn check_path(path: &str) -> Result<Path, ArtifactError> {
    let refuse = |why: &str| ArtifactError::InvalidPath(format!("artifact path '{path}' {why}"));
    if path.is_empty() {
        return Err(refuse("is empty; expected a relative path such as 'model/weights.bin'"));
    }
    if path.starts_with('/') {
        return Err(refuse("is absolute; expected a relative path"));
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(refuse("has an empty, '.' or '..' part; expected a plain relative path"));
    }
    if let Some(bad) = path.chars().find(|c| c.is_control() || *c == '\\' || *c == '#') {
        return Err(refuse(&format!("contains {bad:?}, which artifact paths may not")));
    }
    if path.split('/').next() == Some(UPLOADS) {
        return Err(refuse(&format!(
            "is under '{UPLOADS}', where Kiln keeps replacing uploads"
        )));
    }
    Path::parse(path).map_err(|error| refuse(&format!("is not a valid object path: {error}")))
}

/// The store's location of the object `object` (an artifact's path, or an [`upload_object`]).
fn object_location(object: &str) -> Result<Path, ArtifactError> {
    Path::parse(object)
        .map_err(|error| ArtifactError::InvalidPath(format!("object '{object}' is not a valid path: {error}")))
}

pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// What the root was configured as, for messages.
    root: String,
    /// The most bytes one artifact may have.
    pub max_bytes: u64,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ArtifactStore")
            .field("root", &self.root)
            .finish()
    }
}

impl ArtifactStore {
    /// Opens the store `root` names: `s3://BUCKET[/PREFIX]`, `gs://BUCKET[/PREFIX]` or
    /// `az://CONTAINER[/PREFIX]` (credentials, region and endpoint from each cloud's usual variables:
    /// `AWS_*`, `GOOGLE_*` such as `GOOGLE_SERVICE_ACCOUNT`, `AZURE_*` such as
    /// `AZURE_STORAGE_ACCOUNT_NAME`), else a local directory (`file:///abs/dir` or a path), created if
    /// missing.
    pub fn open(root: &str, max_bytes: u64) -> Result<ArtifactStore, ArtifactError> {
        let cloud = root
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "s3" | "gs" | "az"));
        let store: Arc<dyn ObjectStore> = if let Some((scheme, rest)) = cloud {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ArtifactError::InvalidPath(format!(
                    "artifact root '{root}' names no bucket; expected {scheme}://BUCKET[/PREFIX]"
                )));
            }
            let built: object_store::Result<Arc<dyn ObjectStore>> = match scheme {
                "s3" => object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map(|store| Arc::new(store) as Arc<dyn ObjectStore>),
                "gs" => object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map(|store| Arc::new(store) as Arc<dyn ObjectStore>),
                _ => object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .build()
                    .map(|store| Arc::new(store) as Arc<dyn ObjectStore>),
            };
            let store = built.map_err(|error| ArtifactError::Store(format!("opening {root}: {error}")))?;
            if prefix.trim_matches('/').is_empty() {
                store
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(store, prefix.trim_matches('/')))
            }
        } else if root.contains("://") && !root.starts_with("file://") {
            return Err(ArtifactError::InvalidPath(format!(
                "artifact root '{root}' is not supported; expected a directory, file:///DIR, s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or az://CONTAINER[/PREFIX]"
            )));
        } else {
            let directory = root.strip_prefix("file://").unwrap_or(root);
            std::fs::create_dir_all(directory).map_err(|error| {
                ArtifactError::Store(format!("creating the artifact directory {directory}: {error}"))
            })?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(directory)
                .map_err(|error| ArtifactError::Store(format!("opening {directory}: {error}")))?;
            Arc::new(local)
        };
        Ok(ArtifactStore {
            store,
            root: root.to_string(),
            max_bytes,
        })
    }

    /// The store itself, for writers that manage their own files (the serving tier's request log).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Streams `body` into `path`, hashing it on the way; the artifact appears whole when the body ends, or
    /// not at all when it fails, grows past the limit or is cut off.
    pub async fn put<E: std::fmt::Display>(
        &self,
        path: &str,
        body: impl Stream<Item = Result<Bytes, E>>,
    ) -> Result<Stored, ArtifactError> {
        self.put_object(path, path, body).await
    }

    /// [`ArtifactStore::put`] of artifact `path` into the object `object` (`path` itself, or an
    /// [`upload_object`] of it).
    pub async fn put_object<E: std::fmt::Display>(
        &self,
        path: &str,
        object: &str,
        body: impl Stream<Item = Result<Bytes, E>>,
    ) -> Result<Stored, ArtifactError> {
        check_path(path)?;
        let location = object_location(object)?;
        let upload = self
            .store
            .put_multipart(&location)
            .await
            .map_err(|error| ArtifactError::Store(format!("starting the upload of '{path}': {error}")))?;
        let mut writer = WriteMultipart::new(upload);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = std::pin::pin!(body);
        let failure = loop {
            match body.next().await {
                None => break None,
                Some(Err(error)) => {
                    break Some(ArtifactError::Interrupted {
                        path: path.to_string(),
                        received: size,
                        reason: error.to_string(),
                    });
                }
                Some(Ok(chunk)) => {
                    size += chunk.len() as u64;
                    if size > self.max_bytes {
                        break Some(ArtifactError::TooLarge {
                            path: path.to_string(),
                            limit: self.max_bytes,
                        });
                    }
                    hasher.update(&chunk);
                    if let Err(error) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                        break Some(ArtifactError::Store(format!("uploading '{path}': {error}")));
                    }
                    writer.put(chunk);
                }
            }
        };
        if let Some(failure) = failure {
            // Nothing was published; the staged parts go.
            let _ = writer.abort().await;
            return Err(failure);
        }
        writer
            .finish()
            .await
            .map_err(|error| ArtifactError::Store(format!("completing the upload of '{path}': {error}")))?;
        Ok(Stored {
            size,
            sha256: hex(&hasher.finalize()),
        })
    }

    /// The artifact at `path`: its size and its bytes as a stream.
    pub async fn get(
        &self,
        path: &str,
    ) -> Result<(u64, futures::stream::BoxStream<'static, Result<Bytes, ArtifactError>>), ArtifactError> {
        self.get_object(path, path).await
    }

    /// [`ArtifactStore::get`] of artifact `path`, whose bytes are in the object `object`.
    pub async fn get_object(
        &self,
        path: &str,
        object: &str,
    ) -> Result<(u64, futures::stream::BoxStream<'static, Result<Bytes, ArtifactError>>), ArtifactError> {
        check_path(path)?;
        let location = object_location(object)?;
        let result = self.store.get(&location).await.map_err(|error| match error {
            object_store::Error::NotFound { .. } => ArtifactError::NotFound(path.to_string()),
            other => ArtifactError::Store(format!("reading '{path}': {other}")),
        })?;
        let size = result.meta.size;
        let owned = path.to_string();
        let stream = result
            .into_stream()
            .map(move |chunk| chunk.map_err(|error| ArtifactError::Store(format!("reading '{owned}': {error}"))))
            .boxed();
        Ok((size, stream))
    }

    /// The files and directories directly under `directory` (`""`: the root), sorted by path. A directory
    /// that does not exist lists as empty, as MLflow's does.
    pub async fn list(&self, directory: &str) -> Result<Vec<Entry>, ArtifactError> {
        let directory = directory.trim_end_matches('/');
        let prefix = if directory.is_empty() {
            None
        } else {
            Some(check_path(directory)?)
        };
        let listing = self
            .store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map_err(|error| ArtifactError::Store(format!("listing '{directory}': {error}")))?;
        let relative = |location: &Path| -> String {
            let full = location.as_ref();
            full.strip_prefix(directory)
                .map(|rest| rest.trim_start_matches('/'))
                .unwrap_or(full)
                .to_string()
        };
        let mut entries: Vec<Entry> = listing
            .common_prefixes
            .iter()
            .filter(|location| location.as_ref() != UPLOADS)
            .map(|location| Entry {
                path: relative(location),
                is_dir: true,
                size: None,
            })
            .chain(listing.objects.iter().map(|meta| Entry {
                path: relative(&meta.location),
                is_dir: false,
                size: Some(meta.size),
            }))
            .collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(entries)
    }

    /// Removes the object `object` (one a record no longer names); one that is already gone is fine.
    pub async fn delete_object(&self, object: &str) -> Result<(), ArtifactError> {
        let location = object_location(object)?;
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(ArtifactError::Store(format!("deleting '{object}': {error}"))),
        }
    }

    /// Removes the objects under [`UPLOADS`] last written before `before_ms` (Unix milliseconds) that
    /// `named` does not hold: those of replacing uploads whose records were never applied. Returns their
    /// names.
    pub async fn remove_unnamed_uploads(
        &self,
        named: &std::collections::HashSet<String>,
        before_ms: i64,
    ) -> Result<Vec<String>, ArtifactError> {
        let mut removed = Vec::new();
        let mut objects = self.store.list(Some(&Path::from(UPLOADS)));
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(|error| ArtifactError::Store(format!("listing '{UPLOADS}': {error}")))?;
            let name = meta.location.to_string();
            if meta.last_modified.timestamp_millis() < before_ms && !named.contains(&name) {
                removed.push(name);
            }
        }
        for name in &removed {
            self.delete_object(name).await?;
        }
        Ok(removed)
    }

    /// Deletes the artifact at `path`, or every artifact under it when it is a directory.
    pub async fn delete(&self, path: &str) -> Result<Vec<String>, ArtifactError> {
        let location = check_path(path.trim_end_matches('/'))?;
        let mut deleted = Vec::new();
        let mut under = self.store.list(Some(&location));
        while let Some(meta) = under.next().await {
            let meta = meta.map_err(|error| ArtifactError::Store(format!("listing '{path}': {error}")))?;
            deleted.push(meta.location.to_string());
        }
        if deleted.is_empty() {
            match self.store.head(&location).await {
                Ok(meta) => deleted.push(meta.location.to_string()),
                Err(object_store::Error::NotFound { .. }) => return Err(ArtifactError::NotFound(path.to_string())),
                Err(error) => return Err(ArtifactError::Store(format!("reading '{path}': {error}"))),
            }
        }
        for name in &deleted {
            self.store
                .delete(&Path::from(name.as_str()))
                .await
                .map_err(|error| ArtifactError::Store(format!("deleting '{name}': {error}")))?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::iter(
            parts
                .iter()
                .map(|part| Ok(Bytes::from_static(part)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn an_upload_is_hashed_listed_read_back_and_deleted() {
        let directory = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&format!("file://{}", directory.path().display()), 1 << 20).unwrap();
        let stored = store
            .put("1/r/artifacts/model/w.bin", chunks(&[b"ab", b"c"]))
            .await
            .unwrap();
        // SHA-256 of "abc".
        assert_eq!(
            stored,
            Stored {
                size: 3,
                sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into()
            }
        );
        store.put("1/r/artifacts/notes.txt", chunks(&[b"hi"])).await.unwrap();
        let listed = store.list("1/r/artifacts").await.unwrap();
        let described: Vec<(&str, bool, Option<u64>)> = listed
            .iter()
            .map(|entry| (entry.path.as_str(), entry.is_dir, entry.size))
            .collect();
        assert_eq!(described, [("model", true, None), ("notes.txt", false, Some(2))]);
        assert!(store.list("1/r/nothing-here").await.unwrap().is_empty());

        let (size, stream) = store.get("1/r/artifacts/model/w.bin").await.unwrap();
        let bytes: Vec<Bytes> = stream.map(Result::unwrap).collect().await;
        assert_eq!((size, bytes.concat()), (3, b"abc".to_vec()));

        assert_eq!(
            store.delete("1/r/artifacts/model").await.unwrap(),
            ["1/r/artifacts/model/w.bin"]
        );
        assert!(matches!(
            store.get("1/r/artifacts/model/w.bin").await,
            Err(ArtifactError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn an_oversized_or_cut_off_upload_leaves_nothing_and_keeps_the_earlier_artifact() {
        let directory = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(directory.path().to_str().unwrap(), 4).unwrap();
        store.put("a/f", chunks(&[b"old"])).await.unwrap();
        let error = store.put("a/f", chunks(&[b"abc", b"de"])).await.unwrap_err();
        assert!(matches!(error, ArtifactError::TooLarge { limit: 4, .. }), "{error}");
        let cut_off = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"ne")),
            Err(std::io::Error::other("connection reset")),
        ]);
        let error = store.put("a/g", cut_off).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the upload of 'a/g' ended after 2 bytes: connection reset; nothing was stored"
        );
        let listed: Vec<String> = store
            .list("a")
            .await
            .unwrap()
            .into_iter()
            .map(|entry| entry.path)
            .collect();
        assert_eq!(listed, ["f"], "no staged part is listed");
        let (_, stream) = store.get("a/f").await.unwrap();
        let bytes: Vec<Bytes> = stream.map(Result::unwrap).collect().await;
        assert_eq!(bytes.concat(), b"old");
        // Nothing but the one artifact is on disk either.
        let on_disk: Vec<_> = std::fs::read_dir(directory.path().join("a")).unwrap().collect();
        assert_eq!(on_disk.len(), 1);
    }

    #[tokio::test]
    async fn a_replacing_upload_has_an_object_of_its_own_that_no_listing_shows() {
        let directory = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(directory.path().to_str().unwrap(), 1 << 20).unwrap();
        store.put("a/f", chunks(&[b"old"])).await.unwrap();
        let object = upload_object("a/f", "u1");
        assert_eq!(object, ".kiln-uploads/a/f/u1");
        let stored = store.put_object("a/f", &object, chunks(&[b"new"])).await.unwrap();
        assert_eq!(stored.size, 3);
        // Both are whole; the artifact's own path still holds the old bytes until the caller says otherwise.
        for (name, expected) in [("a/f", b"old"), (object.as_str(), b"new")] {
            let (_, stream) = store.get_object("a/f", name).await.unwrap();
            let bytes: Vec<Bytes> = stream.map(Result::unwrap).collect().await;
            assert_eq!(bytes.concat(), expected);
        }
        let root: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|entry| entry.path)
            .collect();
        assert_eq!(root, ["a"], "the uploads directory is not an artifact");
        store.delete_object("a/f").await.unwrap();
        store.delete_object("a/f").await.unwrap();
        assert!(matches!(store.get("a/f").await, Err(ArtifactError::NotFound(_))));

        // Of two upload objects, the one no record names goes once it is old enough; the named one stays.
        let orphan = upload_object("a/f", "u2");
        store.put_object("a/f", &orphan, chunks(&[b"lost"])).await.unwrap();
        let named: std::collections::HashSet<String> = [object.clone()].into();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let too_young = store.remove_unnamed_uploads(&named, now_ms - 60_000).await.unwrap();
        assert!(too_young.is_empty(), "{too_young:?}");
        assert_eq!(
            store.remove_unnamed_uploads(&named, now_ms + 60_000).await.unwrap(),
            std::slice::from_ref(&orphan)
        );
        assert!(matches!(
            store.get_object("a/f", &orphan).await,
            Err(ArtifactError::NotFound(_))
        ));
        assert!(store.get_object("a/f", &object).await.is_ok());
    }

    #[test]
    fn paths_that_could_escape_or_hide_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "a//b",
            "./a",
            "a\\b",
            "a#1",
            ".kiln-uploads/a/b",
        ] {
            let error = check_path(bad).unwrap_err();
            assert!(matches!(error, ArtifactError::InvalidPath(_)), "{bad}");
        }
        assert!(check_path("1/run/artifacts/model/model.json").is_ok());
        let error = ArtifactStore::open("hdfs://namenode/kiln", 1).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("expected a directory, file:///DIR, s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or az://"),
            "{error}"
        );
        let error = ArtifactStore::open("gs:///prefix", 1).unwrap_err();
        assert!(error.to_string().contains("expected gs://BUCKET[/PREFIX]"), "{error}");
    }

    /// GCS and Azure roots are opened from each cloud's environment; without an account Azure's cannot be
    /// configured, and the error says so. (No GCS or Azure endpoint is reachable from CI, so only S3 is
    /// exercised end to end, through moto, in the cluster tests.)
    #[test]
    fn gcs_and_azure_roots_are_configured_from_the_environment() {
        // Without credentials the GCS client is built; requests would use application default credentials.
        let gcs = ArtifactStore::open("gs://kiln-artifacts/team", 1).unwrap();
        assert_eq!(gcs.root, "gs://kiln-artifacts/team");
        if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none() {
            let error = ArtifactStore::open("az://kiln-artifacts", 1).unwrap_err();
            assert!(matches!(error, ArtifactError::Store(_)), "{error}");
            assert!(error.to_string().contains("opening az://kiln-artifacts"), "{error}");
        }
    }
}
