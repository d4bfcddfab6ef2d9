//! `kiln artifacts list RUN | get RUN PATH --out FILE | put RUN FILE [--path DIR]`: a run's artifacts
//! through the coordinators' MLflow artifact proxy, streamed both ways. A download is written beside its
//! destination and renamed into place only when its SHA-256 matches what the cluster recorded at upload.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::output::print_table;
use crate::runs::{Api, answer, text};

/// The header the coordinator sends a download's recorded SHA-256 in.
const SHA256_HEADER: &str = "x-kiln-sha256";
const PROXY: &str = "api/2.0/mlflow-artifacts/artifacts";

#[derive(Subcommand)]
pub enum ArtifactsCommand {
    /// A run's artifacts under DIR (default: all of them), with sizes and SHA-256.
    List {
        run: String,
        #[arg(long, default_value = "")]
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Downloads artifact PATH of RUN to FILE, checking its SHA-256.
    Get {
        run: String,
        path: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Uploads FILE as an artifact of RUN (under DIR when given).
    Put {
        run: String,
        file: PathBuf,
        #[arg(long, default_value = "")]
        path: String,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The run's artifact directory in the proxy (`1/RUN/artifacts`).
pub(crate) async fn run_root(api: &Api, run: &str) -> Result<String> {
    let info = api.run(run).await?["info"].take();
    let uri = text(&info["artifact_uri"]);
    match uri.strip_prefix("mlflow-artifacts:") {
        Some(rest) => Ok(rest.trim_start_matches('/').to_string()),
        None => {
            bail!("run {run} keeps its artifacts at '{uri}', outside the cluster's artifact proxy; read them there")
        }
    }
}

/// `root/path`, either of them possibly empty.
pub(crate) fn join(root: &str, path: &str) -> String {
    let (root, path) = (root.trim_end_matches('/'), path.trim_matches('/'));
    match (root.is_empty(), path.is_empty()) {
        (_, true) => root.to_string(),
        (true, false) => path.to_string(),
        (false, false) => format!("{root}/{path}"),
    }
}

/// Every file under `directory` (recursively), as (path relative to the run, size, sha256).
async fn walk(api: &Api, root: &str, directory: &str) -> Result<Vec<(String, Value, Value)>> {
    let mut files = Vec::new();
    let mut pending = vec![directory.trim_matches('/').to_string()];
    while let Some(directory) = pending.pop() {
        let url = format!("{}/{PROXY}", api.host);
        let listing = api
            .call(
                api.client.get(url).query(&[("path", join(root, &directory))]),
                "the artifact listing",
            )
            .await?;
        for file in listing["files"].as_array().cloned().unwrap_or_default() {
            let path = join(&directory, &text(&file["path"]));
            if file["is_dir"].as_bool() == Some(true) {
                pending.push(path);
            } else {
                files.push((path, file["file_size"].clone(), file["kiln_sha256"].clone()));
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

pub async fn run(command: ArtifactsCommand, tracking: &str) -> Result<()> {
    let api = Api::new(tracking)?;
    match command {
        ArtifactsCommand::List { run, path, json } => {
            let root = run_root(&api, &run).await?;
            let files = walk(&api, &root, &path).await?;
            if json {
                let listed: Vec<Value> = files
                    .iter()
                    .map(|(path, size, sha256)| serde_json::json!({ "path": path, "size": size, "sha256": sha256 }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else if files.is_empty() {
                println!("run {run} has no artifacts yet");
            } else {
                let rows: Vec<Vec<String>> = files
                    .iter()
                    .map(|(path, size, sha256)| vec![path.clone(), text(size), text(sha256)])
                    .collect();
                print_table(&["PATH", "BYTES", "SHA256"], &rows);
            }
            Ok(())
        }
        ArtifactsCommand::Get { run, path, out } => {
            let root = run_root(&api, &run).await?;
            let (size, sha256) = download(&api, &join(&root, &path), &out).await?;
            println!("{} ({size} bytes, sha256 {sha256}) -> {}", path, out.display());
            Ok(())
        }
        ArtifactsCommand::Put { run, file, path } => {
            let root = run_root(&api, &run).await?;
            let name = file
                .file_name()
                .and_then(|name| name.to_str())
                .with_context(|| format!("{} has no usable file name", file.display()))?;
            let target = join(&join(&root, &path), name);
            upload(&api, &file, &target).await?;
            println!("{} -> {}", file.display(), join(&path, name));
            Ok(())
        }
    }
}

/// Downloads every file under `source` (a path under the proxy's root) into `out`, keeping the layout and
/// checking each file's SHA-256; returns how many files there were.
pub(crate) async fn download_tree(api: &Api, source: &str, out: &Path) -> Result<usize> {
    let files = walk(api, source, "").await?;
    for (path, _, _) in &files {
        let target = out.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        download(api, &join(source, path), &target).await?;
    }
    Ok(files.len())
}

/// Streams `file` to the proxy at `target` (a path under the proxy's root).
pub async fn upload(api: &Api, file: &Path, target: &str) -> Result<()> {
    let opened = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let length = opened.metadata().await?.len();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(opened));
    put(api, target, body, length, &format!("uploading {}", file.display())).await
}

/// Uploads `bytes` as the artifact at `target` (`EXPERIMENT/RUN/artifacts/PATH`).
pub(crate) async fn upload_bytes(api: &Api, target: &str, bytes: bytes::Bytes) -> Result<()> {
    let length = bytes.len() as u64;
    put(api, target, bytes.into(), length, &format!("uploading {target}")).await
}

async fn put(api: &Api, target: &str, body: reqwest::Body, length: u64, what: &str) -> Result<()> {
    let response = api
        .client
        .put(format!("{}/{PROXY}/{target}", api.host))
        .header(reqwest::header::CONTENT_LENGTH, length)
        .body(body)
        .send()
        .await
        .with_context(|| api.unreachable())?;
    answer(response, what).await?;
    Ok(())
}

/// Streams the artifact at `source` into `out`, through a temporary file beside it that is renamed into
/// place only when the bytes are all there and their SHA-256 is the one recorded. Returns (size, sha256).
pub async fn download(api: &Api, source: &str, out: &Path) -> Result<(u64, String)> {
    let response = api
        .client
        .get(format!("{}/{PROXY}/{source}", api.host))
        .send()
        .await
        .with_context(|| api.unreachable())?;
    if !response.status().is_success() {
        answer(response, &format!("artifact '{source}'")).await?;
        bail!("artifact '{source}' could not be read");
    }
    let expected = response
        .headers()
        .get(SHA256_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let announced = response.content_length();
    let directory = out
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let partial = tempfile::NamedTempFile::new_in(directory)
        .with_context(|| format!("creating a temporary file in {}", directory.display()))?;
    let mut writer = tokio::fs::File::from_std(partial.reopen()?);
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("artifact '{source}' was cut off after {received} bytes"))?;
        hasher.update(&chunk);
        received += chunk.len() as u64;
        writer.write_all(&chunk).await?;
    }
    writer.flush().await?;
    writer.sync_all().await?;
    if let Some(announced) = announced
        && announced != received
    {
        bail!("artifact '{source}' announced {announced} bytes but {received} arrived; nothing was written");
    }
    let actual = hex(&hasher.finalize());
    match expected {
        Some(expected) if expected != actual => {
            bail!(
                "artifact '{source}' has SHA-256 {actual}, but {expected} was recorded at upload; nothing was written"
            )
        }
        None => eprintln!("artifact '{source}' has no recorded SHA-256 (stored outside Kiln); not checked"),
        Some(_) => {}
    }
    partial
        .persist(out)
        .with_context(|| format!("moving the download into {}", out.display()))?;
    Ok((received, actual))
}
