//! `kiln serve`: one serving replica. It fetches registered model versions through the cluster's registry
//! (`models:/NAME/VERSION`, `models:/NAME@ALIAS`) or reads a saved model directory or ONNX file, warms each
//! up, and serves them over the Open Inference Protocol: REST on 8000, gRPC on 8001.
//!
//! ONNX models (any `*.onnx` file among the version's files) run on tract, with the inputs and outputs the
//! file declares.
//!
//! A model named by an alias follows it: when `kiln models alias NAME VERSION ALIAS` moves the alias, the
//! replica fetches and warms up the new version and then switches to it; requests queued on the old version
//! finish there, so no request fails across the switch.
//!
//! Kiln's burn models (what `kiln task train` saves) are served with one FP32 input of shape [-1, features]
//! (named by `--input-name`) and, for a classifier, the outputs `probabilities` (softmax, [-1, classes]) and
//! `label` (the most probable class, INT64 [-1]); for a regression model, `prediction` ([-1, 1]). The
//! training normalization is applied to every row, as in training.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_serving::pipeline::{Pipeline, Step, argmax_rows, softmax_rows};
use kiln_serving::request_log::RequestLogConfig;
use kiln_serving::{BatchConfig, DataType, Model, Serving, Tensor, TensorSpec};
use kiln_worker::trainer::{ComputeDevice, SavedModel};

use crate::runs::{Api, text};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A model to serve, as [NAME=]SOURCE; repeat for several. SOURCE: models:/NAME/VERSION or
    /// models:/NAME@ALIAS (from the registry at --tracking), a directory holding a saved model (model.json
    /// and weights.bin, or an ONNX file), or an ONNX file. NAME defaults to the registered name (or the
    /// file's or directory's name).
    #[arg(long = "model", required_unless_present = "deployment")]
    models: Vec<String>,
    /// A deployment file (examples/deployments/digits.toml): the model, its batching and its pre- and
    /// post-processing steps. Its settings replace the matching flags.
    #[arg(long, conflicts_with = "models")]
    deployment: Option<PathBuf>,
    /// A coordinator's MLflow API, for the registry and the model artifacts.
    #[arg(long, env = "KILN_TRACKING", default_value = "127.0.0.1:7080")]
    tracking: String,
    /// The feature server whose online store a deployment's [features] are looked up in.
    #[arg(long, env = "KILN_FEATURESTORE", default_value = "127.0.0.1:7072")]
    featurestore: String,
    /// Where the Open Inference Protocol's REST binding listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_listen: String,
    /// Where its gRPC binding listens.
    #[arg(long, default_value = "127.0.0.1:8001")]
    grpc_listen: String,
    /// The most rows in one batch.
    #[arg(long, default_value_t = BatchConfig::default().max_batch_size)]
    max_batch_size: usize,
    /// How long a batch's first request may wait for others while a runner is free (0: take what is queued).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    max_wait: Duration,
    /// Requests that may wait per model; beyond it requests get 503 with Retry-After.
    #[arg(long, default_value_t = BatchConfig::default().queue_capacity)]
    queue_capacity: usize,
    /// Batches run at once per model.
    #[arg(long, default_value_t = BatchConfig::default().instances)]
    instances: usize,
    /// The name of a burn model's input tensor.
    #[arg(long, default_value = "input")]
    input_name: String,
    /// Where fetched models are kept (default: a temporary directory removed at exit).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// How often a model named by an alias (models:/NAME@ALIAS) checks where the alias points; when it has
    /// moved, the new version is fetched and warmed up, then takes the requests (0s: never).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    follow_interval: Duration,
    /// Log every request and its response as Parquet files under request-logs/MODEL/VERSION/ in this store:
    /// a directory, file:///DIR, s3://BUCKET[/PREFIX], gs://… or az://… (the cluster's artifact store).
    #[arg(long)]
    request_log: Option<String>,
    /// A request-log file is written per this many rows of one model version…
    #[arg(long, default_value_t = RequestLogConfig::default().rows_per_file)]
    request_log_rows: usize,
    /// …or at least this often while rows wait.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    request_log_interval: Duration,
}

/// A burn model saved by the trainer, served.
struct BurnModel {
    saved: SavedModel,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

impl BurnModel {
    fn new(saved: SavedModel, input_name: &str) -> BurnModel {
        let manifest = &saved.manifest;
        let inputs = vec![TensorSpec::new(
            input_name,
            DataType::Fp32,
            vec![-1, manifest.inputs as i64],
        )];
        let outputs = if manifest.is_classifier() {
            vec![
                TensorSpec::new("probabilities", DataType::Fp32, vec![-1, manifest.classes as i64]),
                TensorSpec::new("label", DataType::Int64, vec![-1]),
            ]
        } else {
            vec![TensorSpec::new("prediction", DataType::Fp32, vec![-1, 1])]
        };
        BurnModel { saved, inputs, outputs }
    }
}

impl Model for BurnModel {
    fn platform(&self) -> &str {
        "kiln_burn"
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let input = &inputs[0];
        let rows = input.rows();
        let features = input.to_f32().map_err(|error| error.to_string())?;
        let values = self.saved.predict(&features, rows);
        if !self.saved.manifest.is_classifier() {
            return Ok(vec![Tensor::from_f32("prediction", vec![rows, 1], &values)]);
        }
        let classes = self.saved.manifest.classes;
        let labels: Vec<i64> = argmax_rows(&values, classes)
            .into_iter()
            .map(|index| index as i64)
            .collect();
        let mut probabilities = values;
        softmax_rows(&mut probabilities, classes);
        Ok(vec![
            Tensor::from_f32("probabilities", vec![rows, classes], &probabilities),
            Tensor::from_i64("label", vec![rows], &labels),
        ])
    }
}

/// The model in `path`: an ONNX file (`*.onnx`, or a directory holding one, as MLflow's onnx flavor saves it),
/// else a Kiln model directory (`model.json` and `weights.bin`).
fn load_model(path: &Path, input_name: &str) -> Result<Arc<dyn Model>> {
    let onnx = if path.extension().is_some_and(|extension| extension == "onnx") {
        Some(path.to_path_buf())
    } else {
        std::fs::read_dir(path)
            .with_context(|| format!("reading model directory {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|file| file.extension().is_some_and(|extension| extension == "onnx"))
            .min()
    };
    if let Some(file) = onnx {
        return kiln_serving::load_onnx(&file).map_err(anyhow::Error::msg);
    }
    let compute = inference_device();
    let saved = SavedModel::load_on(path, compute)?;
    if compute != ComputeDevice::Cpu {
        println!(
            "{}: predicting on the GPU ({compute:?}, burn's CUDA backend)",
            path.display()
        );
    }
    Ok(Arc::new(BurnModel::new(saved, input_name)))
}

/// Where Kiln's burn models predict: the first GPU this process may use (CUDA_VISIBLE_DEVICES, which a
/// worker sets for a replica given `gpus` in its deployment's [resources]) when this kiln was built with
/// `burn-cuda`, else the CPU.
fn inference_device() -> ComputeDevice {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    if cfg!(feature = "burn-cuda") && !visible.trim().is_empty() {
        ComputeDevice::Cuda(0)
    } else {
        ComputeDevice::Cpu
    }
}

/// `[NAME=]SOURCE` split; `None` for a name not given.
fn parse_model(spec: &str) -> (Option<&str>, &str) {
    match spec.split_once('=') {
        Some((name, source)) if !name.contains('/') && !name.is_empty() => (Some(name), source),
        _ => (None, spec),
    }
}

/// A registry reference: (registered name, version or alias, whether it is an alias).
fn parse_registry(source: &str) -> Result<Option<(String, String, bool)>> {
    let Some(rest) = source.strip_prefix("models:/") else {
        return Ok(None);
    };
    let expected = "expected models:/NAME/VERSION or models:/NAME@ALIAS";
    if let Some((name, alias)) = rest.split_once('@') {
        if name.is_empty() || alias.is_empty() {
            bail!("model source '{source}' names no model or alias; {expected}");
        }
        return Ok(Some((name.to_string(), alias.to_string(), true)));
    }
    match rest.rsplit_once('/') {
        Some((name, version)) if !name.is_empty() && version.parse::<u64>().is_ok() => {
            Ok(Some((name.to_string(), version.to_string(), false)))
        }
        _ => bail!("model source '{source}' has no version number or alias; {expected}"),
    }
}

/// The version `reference` names (a version number, or an alias when `alias`) of registered model `name`:
/// (its number, its source).
async fn resolve(api: &Api, name: &str, reference: &str, alias: bool) -> Result<(String, String)> {
    let version = if alias {
        api.get(
            "registered-models/alias",
            &[("name", name), ("alias", reference)],
            &format!("model '{name}' alias '{reference}'"),
        )
        .await?["model_version"]
            .take()
    } else {
        api.get(
            "model-versions/get",
            &[("name", name), ("version", reference)],
            &format!("model '{name}' version {reference}"),
        )
        .await?["model_version"]
            .take()
    };
    Ok((text(&version["version"]), text(&version["source"])))
}

/// Downloads version `number` of `name` from `source` into `cache/NAME/NUMBER`; returns that directory.
async fn download(api: &Api, name: &str, number: &str, source: &str, cache: &Path) -> Result<PathBuf> {
    let Some(root) = proxied_directory(api, source).await? else {
        bail!("model '{name}' version {number} is stored at '{source}', outside the cluster's artifact proxy");
    };
    let directory = cache.join(name).join(number);
    let files = crate::artifacts::download_tree(api, &root, &directory).await?;
    if files == 0 {
        bail!("model '{name}' version {number} has no files at '{source}'");
    }
    Ok(directory)
}

/// The artifact proxy's directory (`1/RUN/artifacts/model`) that a version's source names:
/// `mlflow-artifacts:/PATH`, `runs:/RUN/PATH`, or `models:/m-ID` (an MLflow 3 logged model, as
/// `mlflow.register_model` records it); `None` for a source outside the proxy.
async fn proxied_directory(api: &Api, source: &str) -> Result<Option<String>> {
    let uri = if let Some(rest) = source.strip_prefix("runs:/") {
        let (run, path) = rest.split_once('/').unwrap_or((rest, ""));
        let root = crate::artifacts::run_root(api, run).await?;
        return Ok(Some(crate::artifacts::join(&root, path)));
    } else if let Some(id) = kiln_coordinator::tracking::logged_model_of(source) {
        let model = api
            .get(&format!("logged-models/{id}"), &[], &format!("logged model {id}"))
            .await?;
        text(&model["model"]["info"]["artifact_uri"])
    } else {
        source.to_string()
    };
    Ok(uri
        .strip_prefix("mlflow-artifacts:")
        .map(|path| path.trim_start_matches('/').to_string()))
}

/// A model served under an alias, kept on the version the alias points at.
struct Follow {
    served_name: String,
    registered: String,
    alias: String,
    version: String,
}

/// What serving a model needs beyond its files.
#[derive(Clone)]
struct Loading {
    tracking: String,
    /// Feature enrichment, and the feature server to look features up in.
    features: Option<(crate::enrich::FeatureSource, String)>,
    input_name: String,
    cache: PathBuf,
    config: BatchConfig,
    preprocess: Vec<Step>,
    postprocess: Vec<Step>,
}

/// A deployment file: one model, how it is batched, and its steps. The replica count and resources are
/// the coordinator's (`kiln deploy`; see kiln_coordinator::spec::DeploymentOptions); a replica run by hand
/// ignores them.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Deployment {
    /// "deployment" when given; `kiln deploy` needs it.
    #[serde(default)]
    kind: Option<String>,
    /// The name clients call the model by.
    pub(crate) name: String,
    /// models:/NAME@ALIAS, models:/NAME/VERSION, or a model directory or ONNX file.
    model: String,
    #[serde(default)]
    input_name: Option<String>,
    #[serde(default)]
    batching: Option<Batching>,
    #[serde(default)]
    preprocess: Vec<Step>,
    #[serde(default)]
    postprocess: Vec<Step>,
    /// Log every request and response as Parquet into this store (a directory, s3://…, gs://…, az://…),
    /// under request-logs/MODEL/VERSION/. A deployment's replicas log into the deployment's run without it.
    #[serde(default)]
    pub(crate) request_log: Option<String>,
    /// A request-log file is written per this many rows of one model version…
    #[serde(default)]
    request_log_rows: Option<usize>,
    /// …or at least this often while rows wait (a duration such as "10s").
    #[serde(default)]
    request_log_interval: Option<String>,
    /// Feature enrichment: requests may carry this feature service's entity keys instead of the input.
    #[serde(default)]
    features: Option<crate::enrich::FeatureSource>,
    /// How often a model named by an alias checks where it points (a duration such as "5s"; "0s": never).
    #[serde(default)]
    follow_interval: Option<String>,
    #[allow(dead_code)]
    #[serde(default)]
    replicas: Option<toml::Table>,
    #[allow(dead_code)]
    #[serde(default)]
    resources: Option<toml::Table>,
    #[allow(dead_code)]
    #[serde(default)]
    priority: Option<i64>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Batching {
    max_batch_size: Option<usize>,
    /// A duration such as "2ms".
    max_wait: Option<String>,
    queue_capacity: Option<usize>,
    instances: Option<usize>,
}

impl Deployment {
    /// Reads and checks `path`, naming the file, line and column of what is wrong.
    pub(crate) fn read(path: &Path) -> Result<Deployment> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Deployment::parse(path, &text)
    }

    /// Checks `text`, read from `path`; with its batching checked too.
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Deployment> {
        let deployment: Deployment = toml::from_str(text).map_err(|error| {
            let at = error
                .span()
                .map(|span| {
                    let (line, column) = kiln_coordinator::spec::line_column(text, span.start);
                    format!(":{line}:{column}")
                })
                .unwrap_or_default();
            anyhow::anyhow!("invalid deployment {}{at}: {}", path.display(), error.message())
        })?;
        if deployment.name.is_empty() || deployment.name.contains(['/', '=']) {
            bail!(
                "invalid deployment {}: name '{}' must be non-empty without '/' or '='",
                path.display(),
                deployment.name
            );
        }
        if let Some(kind) = &deployment.kind
            && kind != "deployment"
        {
            bail!(
                "invalid deployment {}: kind is \"{kind}\"; a deployment file has kind = \"deployment\"",
                path.display()
            );
        }
        deployment
            .batching(BatchConfig::default())
            .with_context(|| format!("invalid deployment {}", path.display()))?;
        deployment
            .follow_interval(Duration::ZERO)
            .with_context(|| format!("invalid deployment {}", path.display()))?;
        deployment
            .request_logging(RequestLogConfig::default())
            .with_context(|| format!("invalid deployment {}", path.display()))?;
        Ok(deployment)
    }

    /// `config` with this deployment's batching settings over it.
    fn batching(&self, mut config: BatchConfig) -> Result<BatchConfig> {
        if let Some(batching) = &self.batching {
            config.max_batch_size = batching.max_batch_size.unwrap_or(config.max_batch_size);
            config.queue_capacity = batching.queue_capacity.unwrap_or(config.queue_capacity);
            config.instances = batching.instances.unwrap_or(config.instances);
            if let Some(wait) = &batching.max_wait {
                config.max_wait = humantime::parse_duration(wait)
                    .with_context(|| format!("batching max_wait '{wait}'; expected a duration such as \"2ms\""))?;
            }
        }
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }

    /// `config` with this deployment's request-log settings over it.
    pub(crate) fn request_logging(&self, config: RequestLogConfig) -> Result<RequestLogConfig> {
        let rows_per_file = self.request_log_rows.unwrap_or(config.rows_per_file);
        let flush_interval = match &self.request_log_interval {
            None => config.flush_interval,
            Some(text) => humantime::parse_duration(text)
                .with_context(|| format!("request_log_interval '{text}'; expected a duration such as \"10s\""))?,
        };
        request_log_checked(
            rows_per_file,
            flush_interval,
            ["request_log_rows", "request_log_interval"],
        )?;
        Ok(RequestLogConfig {
            rows_per_file,
            flush_interval,
            ..config
        })
    }

    /// The alias-following interval, `default` unless the file sets one.
    fn follow_interval(&self, default: Duration) -> Result<Duration> {
        match &self.follow_interval {
            None => Ok(default),
            Some(text) => humantime::parse_duration(text)
                .with_context(|| format!("follow_interval '{text}'; expected a duration such as \"5s\"")),
        }
    }
}

/// Loads the model in `directory` on a blocking thread, warms it up and serves it as `name` `version`;
/// prints what it serves.
async fn load_one(serving: &Serving, name: &str, version: &str, directory: PathBuf, loading: &Loading) -> Result<()> {
    let (path, input_name) = (directory.clone(), loading.input_name.clone());
    let (preprocess, postprocess) = (loading.preprocess.clone(), loading.postprocess.clone());
    let model = tokio::task::spawn_blocking(move || -> Result<Arc<dyn Model>> {
        let model = load_model(&path, &input_name)?;
        if preprocess.is_empty() && postprocess.is_empty() {
            return Ok(model);
        }
        let pipeline = Pipeline::new(model, preprocess, postprocess)
            .map_err(|error| anyhow::anyhow!("the deployment's steps do not fit the model: {error}"))?;
        Ok(Arc::new(pipeline))
    })
    .await??;
    let description = model
        .inputs()
        .iter()
        .chain(model.outputs())
        .map(|spec| format!("{} {} {:?}", spec.name, spec.datatype, spec.shape))
        .collect::<Vec<_>>()
        .join("; ");
    let platform = model.platform().to_string();
    let enricher: Option<Arc<dyn kiln_serving::Enricher>> = match &loading.features {
        None => None,
        Some((source, address)) => {
            let [input] = model.inputs() else {
                bail!(
                    "feature enrichment ([features]) needs a model with one input; '{name}' has {}",
                    model.inputs().len()
                );
            };
            Some(Arc::new(crate::enrich::OnlineFeatures::new(
                source.clone(),
                &input.name,
                address,
            )?))
        }
    };
    serving
        .load_enriched(name, version, model, loading.config.clone(), enricher)
        .await
        .with_context(|| format!("loading model '{name}' from {}", directory.display()))?;
    println!("serving {name} version {version} ({platform}: {description})");
    Ok(())
}

/// Fetches or reads each of `models` ([NAME=]SOURCE) and serves it in `serving`; returns the ones named by
/// an alias, to follow.
async fn load_models(serving: &Serving, models: &[String], loading: &Loading) -> Result<Vec<Follow>> {
    let api = Api::new(&loading.tracking)?;
    let mut follows = Vec::new();
    for spec in models {
        let (given_name, source) = parse_model(spec);
        let (name, version, directory) = match parse_registry(source)? {
            Some((registered, reference, alias)) => {
                let (version, source) = resolve(&api, &registered, &reference, alias).await?;
                let directory = download(&api, &registered, &version, &source, &loading.cache).await?;
                let name = given_name.unwrap_or(&registered).to_string();
                if alias {
                    follows.push(Follow {
                        served_name: name.clone(),
                        registered,
                        alias: reference,
                        version: version.clone(),
                    });
                }
                (name, version, directory)
            }
            None => {
                let directory = PathBuf::from(source);
                let name = given_name
                    .map(str::to_string)
                    .or_else(|| directory.file_stem().map(|name| name.to_string_lossy().into_owned()))
                    .with_context(|| format!("model source '{source}' has no name; give one as NAME={source}"))?;
                (name, "1".to_string(), directory)
            }
        };
        load_one(serving, &name, &version, directory, loading).await?;
    }
    Ok(follows)
}

/// Keeps `follow.served_name` on the version its alias points at: looks every `interval`; when the alias
/// has moved, fetches the new version and warms it up before it takes requests. Requests already queued on
/// the old version finish there, so none is dropped. A failed look or load keeps the current version.
async fn follow_alias(
    serving: Arc<Serving>,
    mut follow: Follow,
    loading: Loading,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let api = match Api::new(&loading.tracking) {
        Ok(api) => api,
        Err(error) => {
            eprintln!("following {}@{}: {error:#}", follow.registered, follow.alias);
            return;
        }
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
        let moved = async {
            let (version, source) = resolve(&api, &follow.registered, &follow.alias, true).await?;
            if version == follow.version {
                return Ok(None);
            }
            let directory = download(&api, &follow.registered, &version, &source, &loading.cache).await?;
            load_one(&serving, &follow.served_name, &version, directory, &loading).await?;
            anyhow::Ok(Some(version))
        };
        match moved.await {
            Ok(Some(version)) => {
                println!(
                    "{}@{} moved from version {} to {version}",
                    follow.registered, follow.alias, follow.version
                );
                follow.version = version;
            }
            Ok(None) => {}
            Err(error) => eprintln!(
                "following {}@{} (still serving version {}): {error:#}",
                follow.registered, follow.alias, follow.version
            ),
        }
    }
}

/// Follows each of `follows` every `interval` (never when it is zero) until `shutdown`.
fn follow_aliases(
    serving: &Arc<Serving>,
    follows: Vec<Follow>,
    loading: &Loading,
    interval: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    for follow in follows {
        tokio::spawn(follow_alias(
            serving.clone(),
            follow,
            loading.clone(),
            interval,
            shutdown.clone(),
        ));
    }
}

/// Refuses a request log that writes a file per 0 rows or flushes more often than every 10 ms (the writer's
/// floor), naming the setting as `names` (rows, interval) call them.
fn request_log_checked(rows_per_file: usize, flush_interval: Duration, names: [&str; 2]) -> Result<()> {
    let [rows, interval] = names;
    if rows_per_file == 0 {
        bail!("{rows} is 0; expected at least 1 row per file");
    }
    if flush_interval < Duration::from_millis(10) {
        bail!(
            "{interval} is {}; expected at least 10ms",
            humantime::format_duration(flush_interval)
        );
    }
    Ok(())
}

/// Logs `serving`'s requests into the store at `location`.
fn log_requests(serving: &Serving, location: &str, config: RequestLogConfig) -> Result<()> {
    let store = kiln_coordinator::artifacts::ArtifactStore::open(location, u64::MAX)
        .with_context(|| format!("opening the request log's store {location}"))?;
    println!("logging requests to {location}/{}", config.prefix);
    serving.log_requests(Arc::new(store.object_store()), config);
    Ok(())
}

/// A replica's request log when its deployment names no store: the artifacts of the deployment's run, written
/// through the cluster's artifact proxy (any coordinator of `tracking`, a comma-separated list), so the files
/// land in the cluster's artifact store wherever the replica runs.
struct RunArtifacts {
    tracking: String,
    /// `EXPERIMENT/RUN/artifacts`.
    root: String,
}

impl RunArtifacts {
    /// The run of deployment job `deployment`, found through `tracking`.
    async fn of_deployment(tracking: &str, deployment: u64) -> Result<RunArtifacts> {
        let run = kiln_coordinator::tracking::Tracking::job_run_id(deployment);
        let what = format!("finding run {run} of deployment job {deployment}");
        let root = crate::runs::through_tracking(tracking, &what, |api| {
            let run = run.clone();
            async move { crate::artifacts::run_root(&api, &run).await }
        })
        .await?;
        Ok(RunArtifacts {
            tracking: tracking.to_string(),
            root,
        })
    }
}

impl kiln_serving::request_log::LogStore for RunArtifacts {
    fn put<'a>(
        &'a self,
        path: &'a str,
        bytes: bytes::Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let target = format!("{}/{path}", self.root);
            crate::runs::through_tracking(&self.tracking, "writing the request log", |api| {
                let (target, bytes) = (target.clone(), bytes.clone());
                async move { crate::artifacts::upload_bytes(&api, &target, bytes).await }
            })
            .await
            .map_err(|error| format!("{error:#}"))
        })
    }
}

/// How often a replica tells the coordinator that it is ready, where it listens and how loaded it is.
const REPLICA_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stopped replica goes on answering before it closes its ports (routers poll every 500 ms).
const REPLICA_DRAIN: Duration = Duration::from_secs(1);
/// Queue-depth samples per report, averaged.
const QUEUE_SAMPLES_PER_REPORT: u32 = 10;

/// `kiln task serve --spec FILE`: one replica of a deployment, as a worker starts it (with KILN_JOB_ID,
/// KILN_ATTEMPT, KILN_COORDINATOR, KILN_HOST and KILN_TRACKING set). It loads and warms up the model, listens
/// on free ports of its host, and then reports to the coordinator every second: ready, its addresses, the
/// version it serves, its mean queue depth, requests per second and latency. A model that cannot be loaded
/// is reported (`error`) before the process fails, so `kiln deployments show` says why.
pub async fn run_replica(spec: &Path) -> Result<()> {
    let variable = |name: &str| {
        std::env::var(name).with_context(|| {
            format!("{name} is not set; kiln task serve runs as a deployment's replica, started by a worker")
        })
    };
    let job_id: u64 = variable("KILN_JOB_ID")?.parse().context("KILN_JOB_ID")?;
    let attempt: u32 = variable("KILN_ATTEMPT")?.parse().context("KILN_ATTEMPT")?;
    let mut client = kiln_coordinator::client::Client::new(&variable("KILN_COORDINATOR")?)?;
    let host = std::env::var("KILN_HOST").unwrap_or_else(|_| "127.0.0.1".to_string());
    // The worker passes every coordinator's MLflow API; the registry is read through the first.
    let all_tracking = std::env::var("KILN_TRACKING").unwrap_or_default();
    let tracking = all_tracking.split(',').next().unwrap_or_default().trim().to_string();
    let temporary = tempfile::tempdir().context("creating a directory for fetched models")?;
    let serving = Arc::new(Serving::default());

    let started = async {
        let deployment = Deployment::read(spec)?;
        let featurestore = std::env::var("KILN_FEATURESTORE").unwrap_or_else(|_| "127.0.0.1:7072".to_string());
        let loading = Loading {
            tracking: tracking.clone(),
            features: deployment.features.clone().map(|source| (source, featurestore)),
            input_name: deployment.input_name.clone().unwrap_or_else(|| "input".to_string()),
            cache: temporary.path().to_path_buf(),
            config: deployment.batching(BatchConfig::default())?,
            preprocess: deployment.preprocess.clone(),
            postprocess: deployment.postprocess.clone(),
        };
        let models = [format!("{}={}", deployment.name, deployment.model)];
        let follows = load_models(&serving, &models, &loading).await?;
        match (
            &deployment.request_log,
            std::env::var(kiln_coordinator::deployment::DEPLOYMENT_ENV),
        ) {
            (Some(location), _) => log_requests(
                &serving,
                location,
                deployment.request_logging(RequestLogConfig::default())?,
            )?,
            (None, Ok(deployment_job)) if !all_tracking.is_empty() => {
                let deployment_job: u64 = deployment_job
                    .parse()
                    .with_context(|| format!("KILN_DEPLOYMENT is '{deployment_job}'; expected a job id"))?;
                // A replica that cannot log still serves: logging must never cost a request.
                match RunArtifacts::of_deployment(&all_tracking, deployment_job).await {
                    Ok(store) => {
                        let replica = std::env::var(kiln_coordinator::deployment::REPLICA_ENV).unwrap_or_default();
                        let config = RequestLogConfig {
                            prefix: format!("{}/replica-{replica}", crate::deployments::REQUEST_LOG_DIRECTORY),
                            ..deployment.request_logging(RequestLogConfig::default())?
                        };
                        println!(
                            "logging requests to the artifacts of run {} ({}/{}/)",
                            kiln_coordinator::tracking::Tracking::job_run_id(deployment_job),
                            store.root,
                            config.prefix
                        );
                        serving.log_requests(Arc::new(store), config);
                    }
                    Err(error) => eprintln!("requests are not logged: {error:#}"),
                }
            }
            _ => eprintln!("requests are not logged: the deployment names no request_log and no tracking API is set"),
        }
        let rest = tokio::net::TcpListener::bind((host.as_str(), 0))
            .await
            .with_context(|| format!("listening on {host}"))?;
        let grpc = tokio::net::TcpListener::bind((host.as_str(), 0))
            .await
            .with_context(|| format!("listening on {host}"))?;
        let interval = deployment.follow_interval(Duration::from_secs(5))?;
        anyhow::Ok((loading, follows, interval, rest, grpc))
    };
    let (loading, follows, follow_interval, rest, grpc) = match started.await {
        Ok(started) => started,
        Err(error) => {
            let mut message = format!("{error:#}");
            let mut cut = message.len().min(kiln_coordinator::state::METRIC_TEXT_LENGTH_MAX);
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            let request = kiln_proto::ReportMetricsRequest {
                job_id,
                attempt,
                artifacts: [(kiln_coordinator::deployment::ERROR.to_string(), message)].into(),
                ..Default::default()
            };
            if let Err(status) = client.report_metrics(request).await {
                eprintln!("reporting the failure: {}", status.message());
            }
            return Err(error);
        }
    };
    let (http, grpc_address) = (rest.local_addr()?.to_string(), grpc.local_addr()?.to_string());
    println!("replica of job {job_id}: Open Inference Protocol on REST http://{http} gRPC {grpc_address}");
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Stopped (scaled down, replaced by an update, deleted), the replica serves on for a moment: the routers
    // drop a replica once the coordinator has ended its job, which is before its worker sends the signal,
    // and requests already on their way still get answers.
    let signalled = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::shutdown_on_signal(signalled.clone()));
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            signalled.cancelled().await;
            tokio::time::sleep(REPLICA_DRAIN).await;
            shutdown.cancel();
        }
    });
    follow_aliases(&serving, follows, &loading, follow_interval, &shutdown);
    let reporting = {
        let (serving, shutdown) = (serving.clone(), shutdown.clone());
        async move {
            use kiln_coordinator::deployment as names;
            let mut ticker = tokio::time::interval(REPLICA_REPORT_INTERVAL / QUEUE_SAMPLES_PER_REPORT);
            let (mut samples, mut depth, mut since) = (0u32, 0i64, std::time::Instant::now());
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                depth += serving.queue_depth();
                samples += 1;
                if samples < QUEUE_SAMPLES_PER_REPORT {
                    continue;
                }
                let load = serving.take_load();
                let seconds = since.elapsed().as_secs_f64().max(1e-3);
                let metrics = [
                    (names::READY, 1.0),
                    (names::QUEUE_DEPTH, depth as f64 / f64::from(samples)),
                    (names::REQUESTS_PER_SECOND, load.requests as f64 / seconds),
                    (names::P50_MS, load.p50_ms),
                    (names::P99_MS, load.p99_ms),
                ];
                let versions: Vec<String> = serving.versions().into_values().collect();
                let artifacts = [
                    (names::HTTP, http.clone()),
                    (names::GRPC, grpc_address.clone()),
                    (names::VERSION, versions.join(",")),
                ];
                let request = kiln_proto::ReportMetricsRequest {
                    job_id,
                    attempt,
                    metrics: metrics
                        .into_iter()
                        .map(|(key, value)| (key.to_string(), value))
                        .collect(),
                    artifacts: artifacts
                        .into_iter()
                        .map(|(key, value)| (key.to_string(), value))
                        .collect(),
                    ..Default::default()
                };
                if let Err(status) = client.report_metrics(request).await {
                    eprintln!("reporting to the coordinator: {}", status.message());
                }
                (samples, depth, since) = (0, 0, std::time::Instant::now());
            }
        }
    };
    tokio::spawn(reporting);
    kiln_serving::serve(serving, rest, grpc, shutdown).await?;
    drop(temporary);
    Ok(())
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let mut config = BatchConfig {
        max_batch_size: args.max_batch_size,
        max_wait: args.max_wait,
        queue_capacity: args.queue_capacity,
        instances: args.instances,
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let (mut models, mut input_name) = (args.models.clone(), args.input_name.clone());
    let (mut preprocess, mut postprocess, mut request_log, mut features) = (Vec::new(), Vec::new(), None, None);
    let mut follow_interval = args.follow_interval;
    let mut logging = RequestLogConfig {
        rows_per_file: args.request_log_rows,
        flush_interval: args.request_log_interval,
        ..RequestLogConfig::default()
    };
    request_log_checked(
        logging.rows_per_file,
        logging.flush_interval,
        ["--request-log-rows", "--request-log-interval"],
    )?;
    if let Some(path) = &args.deployment {
        let deployment = Deployment::read(path)?;
        request_log = deployment.request_log.clone();
        logging = deployment.request_logging(logging)?;
        follow_interval = deployment.follow_interval(follow_interval)?;
        features = deployment
            .features
            .clone()
            .map(|source| (source, args.featurestore.clone()));
        config = deployment.batching(config)?;
        models = vec![format!("{}={}", deployment.name, deployment.model)];
        input_name = deployment.input_name.unwrap_or(input_name);
        (preprocess, postprocess) = (deployment.preprocess, deployment.postprocess);
    }
    let temporary = tempfile::tempdir().context("creating a directory for fetched models")?;
    let cache = args.cache_dir.clone().unwrap_or_else(|| temporary.path().to_path_buf());
    let serving = Arc::new(Serving::default());
    let loading = Loading {
        tracking: args.tracking.clone(),
        features,
        input_name,
        cache,
        config,
        preprocess,
        postprocess,
    };
    let follows = load_models(&serving, &models, &loading).await?;
    if let Some(location) = args.request_log.as_ref().or(request_log.as_ref()) {
        log_requests(&serving, location, logging)?;
    }
    let rest = tokio::net::TcpListener::bind(&args.http_listen)
        .await
        .with_context(|| format!("listening on {}", args.http_listen))?;
    let grpc = tokio::net::TcpListener::bind(&args.grpc_listen)
        .await
        .with_context(|| format!("listening on {}", args.grpc_listen))?;
    println!(
        "Open Inference Protocol: REST http://{} gRPC {}",
        rest.local_addr()?,
        grpc.local_addr()?
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::shutdown_on_signal(shutdown.clone()));
    follow_aliases(&serving, follows, &loading, follow_interval, &shutdown);
    kiln_serving::serve(serving, rest, grpc, shutdown).await?;
    drop(temporary);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_deployment_parses_and_bad_ones_are_refused_with_the_place() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deployments/digits.toml");
        let deployment = Deployment::read(&example).unwrap();
        assert_eq!(deployment.model, "models:/digits@champion");
        assert_eq!(deployment.postprocess[0], Step::TopK(3));
        let config = deployment.batching(BatchConfig::default()).unwrap();
        assert_eq!((config.max_batch_size, config.instances), (64, 2));
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("bad.toml");
        std::fs::write(&file, "name = \"d\"\nmodel = \"m\"\npostprocess = [{ top = 3 }]\n").unwrap();
        let error = Deployment::read(&file).unwrap_err().to_string();
        assert!(error.contains("bad.toml:3:"), "{error}");
        assert!(error.contains("unknown variant `top`"), "{error}");
        std::fs::write(&file, "name = \"d\"\nmodel = \"m\"\n[batching]\nmax_wait = \"soon\"\n").unwrap();
        let error = Deployment::read(&file).unwrap_err();
        assert!(format!("{error:#}").contains("batching max_wait 'soon'"), "{error:#}");
        for (line, expected) in [
            (
                "request_log_rows = 0",
                "request_log_rows is 0; expected at least 1 row per file",
            ),
            (
                "request_log_interval = \"0s\"",
                "request_log_interval is 0s; expected at least 10ms",
            ),
            (
                "request_log_interval = \"often\"",
                "request_log_interval 'often'; expected a duration",
            ),
        ] {
            std::fs::write(&file, format!("name = \"d\"\nmodel = \"m\"\n{line}\n")).unwrap();
            let error = format!("{:#}", Deployment::read(&file).unwrap_err());
            assert!(
                error.contains(expected) && error.contains("bad.toml"),
                "{line}: {error}"
            );
        }
    }

    #[test]
    fn a_deployment_sets_how_its_request_log_is_written() {
        let text = "name = \"d\"\nmodel = \"m\"\nrequest_log_rows = 500\nrequest_log_interval = \"2s\"\n";
        let deployment = Deployment::parse(Path::new("d.toml"), text).unwrap();
        let config = deployment.request_logging(RequestLogConfig::default()).unwrap();
        assert_eq!(
            (config.rows_per_file, config.flush_interval),
            (500, Duration::from_secs(2))
        );
        assert_eq!(config.prefix, RequestLogConfig::default().prefix);
        // What the file leaves unset keeps the setting it is laid over (`kiln serve`'s flags).
        let deployment = Deployment::parse(Path::new("d.toml"), "name = \"d\"\nmodel = \"m\"\n").unwrap();
        let flags = RequestLogConfig {
            rows_per_file: 7,
            flush_interval: Duration::from_millis(300),
            ..RequestLogConfig::default()
        };
        let config = deployment.request_logging(flags).unwrap();
        assert_eq!(
            (config.rows_per_file, config.flush_interval),
            (7, Duration::from_millis(300))
        );
    }

    #[test]
    fn model_sources_parse_with_and_without_a_name() {
        assert_eq!(
            parse_model("digits=models:/digits@champion"),
            (Some("digits"), "models:/digits@champion")
        );
        assert_eq!(parse_model("models:/digits/3"), (None, "models:/digits/3"));
        assert_eq!(parse_model("/tmp/a=b/model"), (None, "/tmp/a=b/model"));
        assert_eq!(
            parse_registry("models:/digits@champion").unwrap(),
            Some(("digits".into(), "champion".into(), true))
        );
        assert_eq!(
            parse_registry("models:/digits/3").unwrap(),
            Some(("digits".into(), "3".into(), false))
        );
        assert_eq!(parse_registry("/tmp/model").unwrap(), None);
        let error = parse_registry("models:/digits").unwrap_err().to_string();
        assert!(error.contains("has no version number or alias"), "{error}");
    }
}
