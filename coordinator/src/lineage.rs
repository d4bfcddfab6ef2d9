//! Lineage: the graph of what made what, drawn from what the tracking store already records, so every
//! Kiln step that records anything is in it without a separate write.
//!
//! ```text
//!   view:NAME@VERSION ──► dataset:DIGEST ──► run:ID ──► artifact:PATH ──► model:NAME/VERSION
//!   (feature view version)  (training set)   (job or     (model, checkpoints)  (registered version)
//!                                             MLflow run) ──► logged:ID (MLflow 3 logged model)
//!
//!   view:NAME@VERSION ──► run:ID ──► online:NAME
//!                         (a materialization: the feature server records each as a run tagged
//!                          kiln.execution = materialization)
//! ```
//!
//! - a run's inputs are the datasets logged for it (`log-inputs`; a train job logs its training set, with
//!   the feature view versions it joined in the input's `kiln.feature_views` tag);
//! - its outputs are the top-level entries of its artifacts (`model`, `checkpoints`, …), the logged models
//!   whose source run it is, and the registered versions made from it (through the artifact the version's
//!   source names, when that is one of the run's);
//! - runs carry their params, status and times, so a model version answers which hyperparameters made it;
//! - a run's own `kiln.feature_views` tag names views it read directly; a materialization (tag
//!   `kiln.execution` = `materialization`, param `view`) writes that view's table of the online store.
//!
//! [`Graph::around`] walks it upstream (what a node came from), downstream (what came of it) or both.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use crate::tracking::{ErrorCode, PROXIED_ARTIFACT_ROOT, Tracking, TrackingError};

/// The tag of a dataset input that names the feature view versions a training set joined:
/// `driver_hourly_stats@2,driver_daily@1`.
pub const FEATURE_VIEWS_TAG: &str = "kiln.feature_views";

/// The tag that says what kind of Kiln step a run records, when it is not a training run.
pub const EXECUTION_TAG: &str = "kiln.execution";

/// [`EXECUTION_TAG`]'s value for a materialization (offline store to online store).
pub const MATERIALIZATION: &str = "materialization";

/// The views named by a `kiln.feature_views` tag: `driver_hourly_stats@2,driver_daily@1`.
fn views_of(tag: Option<&String>) -> Vec<&str> {
    tag.map(|views| {
        views
            .split(',')
            .map(str::trim)
            .filter(|view| !view.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// How a run is called in labels: its name and its job (`digits-mlp (job 4)`), or its name and the start
/// of its id.
fn run_title(run: &crate::tracking::Run) -> String {
    let short = &run.id[..8.min(run.id.len())];
    if run.tags.get(EXECUTION_TAG).is_some_and(|kind| kind == MATERIALIZATION) {
        let views = views_of(run.tags.get(FEATURE_VIEWS_TAG)).join(", ");
        return format!("materialization of {views} ({short})");
    }
    match (run.name.is_empty(), run.tags.get("kiln.job_id")) {
        (false, Some(job)) => format!("{} (job {job})", run.name),
        (false, None) => format!("{} ({short})", run.name),
        (true, Some(job)) => format!("of job {job}"),
        (true, None) => short.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    FeatureView,
    Dataset,
    Run,
    /// A view's table in the online store, written by materializations.
    OnlineTable,
    Artifact,
    LoggedModel,
    ModelVersion,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub id: String,
    pub kind: Kind,
    pub label: String,
    pub attributes: BTreeMap<String, String>,
}

/// `from` flowed into `to`: an input of a run, an output of one, a version made from an artifact.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Upstream,
    Downstream,
    Both,
}

impl Direction {
    pub fn parse(text: &str) -> Result<Direction, TrackingError> {
        match text {
            "upstream" => Ok(Direction::Upstream),
            "downstream" => Ok(Direction::Downstream),
            "" | "both" => Ok(Direction::Both),
            other => Err(TrackingError {
                code: ErrorCode::InvalidParameterValue,
                message: format!("direction '{other}' is not one; expected upstream, downstream or both"),
            }),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Graph {
    pub nodes: BTreeMap<String, Node>,
    pub edges: BTreeSet<Edge>,
}

impl Graph {
    fn node(&mut self, id: String, kind: Kind, label: String, attributes: BTreeMap<String, String>) -> String {
        self.nodes.entry(id.clone()).or_insert(Node {
            id: id.clone(),
            kind,
            label,
            attributes,
        });
        id
    }

    /// The node of feature view version `view` (`NAME@VERSION`).
    fn view(&mut self, view: &str) -> String {
        self.node(
            format!("view:{view}"),
            Kind::FeatureView,
            format!("feature view {view}"),
            BTreeMap::new(),
        )
    }

    fn edge(&mut self, from: &str, to: &str) {
        self.edges.insert(Edge {
            from: from.to_string(),
            to: to.to_string(),
        });
    }

    /// The whole graph the tracking store implies.
    pub fn of(tracking: &Tracking) -> Graph {
        let mut graph = Graph::default();
        let proxied = format!("{PROXIED_ARTIFACT_ROOT}/");
        // Runs, with what describes them.
        for run in tracking.runs() {
            let mut attributes: BTreeMap<String, String> = run
                .params
                .iter()
                .map(|(key, value)| (format!("param.{key}"), value.clone()))
                .collect();
            attributes.insert("status".into(), run.status.as_str().into());
            attributes.insert("experiment_id".into(), run.experiment_id.clone());
            attributes.insert("start_time".into(), run.start_time_ms.to_string());
            if let Some(job) = run.tags.get("kiln.job_id") {
                attributes.insert("job".into(), job.clone());
            }
            let materialization = run.tags.get(EXECUTION_TAG).is_some_and(|kind| kind == MATERIALIZATION);
            if materialization {
                attributes.insert("execution".into(), MATERIALIZATION.into());
            }
            let label = if materialization {
                run_title(run)
            } else {
                format!("run {}", run_title(run))
            };
            let node = graph.node(format!("run:{}", run.id), Kind::Run, label, attributes);
            // Views the run read itself (not through a training set).
            for view in views_of(run.tags.get(FEATURE_VIEWS_TAG)) {
                let view_node = graph.view(view);
                graph.edge(&view_node, &node);
            }
            if materialization && let Some(view) = run.params.get("view") {
                let table = graph.node(
                    format!("online:{view}"),
                    Kind::OnlineTable,
                    format!("online table {view}"),
                    BTreeMap::new(),
                );
                graph.edge(&node, &table);
            }
        }
        // Inputs: datasets, and the feature view versions a training set joined.
        for (run_id, inputs) in tracking.all_inputs() {
            let run = format!("run:{run_id}");
            for (digest, tags) in inputs {
                let Some(dataset) = tracking.dataset(digest) else {
                    continue;
                };
                let attributes = [
                    ("source_type", &dataset.source_type),
                    ("source", &dataset.source),
                    ("profile", &dataset.profile),
                ]
                .into_iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(key, value)| (key.to_string(), value.clone()))
                .collect();
                let short = &digest[..12.min(digest.len())];
                let node = graph.node(
                    format!("dataset:{digest}"),
                    Kind::Dataset,
                    format!("dataset {} ({short})", dataset.name),
                    attributes,
                );
                graph.edge(&node, &run);
                for view in views_of(tags.get(FEATURE_VIEWS_TAG)) {
                    let view_node = graph.view(view);
                    graph.edge(&view_node, &node);
                }
            }
        }
        // Outputs: the top-level entries of each run's artifacts.
        let runs_by_prefix: BTreeMap<String, String> = tracking
            .runs()
            .filter_map(|run| {
                let prefix = run.artifact_uri.strip_prefix(&proxied)?;
                Some((format!("{}/", prefix.trim_start_matches('/')), run.id.clone()))
            })
            .collect();
        let titles: BTreeMap<&str, String> = tracking.runs().map(|run| (run.id.as_str(), run_title(run))).collect();
        for (path, record) in tracking.artifacts() {
            let Some((prefix, run_id)) = runs_by_prefix
                .range(..=path.clone())
                .next_back()
                .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            else {
                continue;
            };
            let entry = path[prefix.len()..].split('/').next().unwrap_or_default();
            let id = format!("artifact:{prefix}{entry}");
            let is_new = !graph.nodes.contains_key(&id);
            let node = graph.node(
                id,
                Kind::Artifact,
                format!(
                    "{entry} of run {}",
                    titles.get(run_id.as_str()).map_or(run_id.as_str(), String::as_str)
                ),
                BTreeMap::new(),
            );
            if let Some(artifact) = graph.nodes.get_mut(&node) {
                let files = artifact.attributes.entry("files".into()).or_insert_with(|| "0".into());
                *files = (files.parse::<u64>().unwrap_or(0) + 1).to_string();
                if path.len() == prefix.len() + entry.len() {
                    artifact.attributes.insert("sha256".into(), record.sha256.clone());
                }
            }
            if is_new {
                graph.edge(&format!("run:{run_id}"), &node);
            }
        }
        for model in tracking.logged_models() {
            let node = graph.node(
                format!("logged:{}", model.id),
                Kind::LoggedModel,
                format!("logged model {}", model.name),
                [("status".to_string(), model.status.as_str().to_string())].into(),
            );
            if !model.source_run_id.is_empty() {
                graph.edge(&format!("run:{}", model.source_run_id), &node);
            }
        }
        // Registered versions: from the artifact or logged model their source names, else from their run.
        for model in tracking.registry().models() {
            for version in model.versions.values() {
                let aliases = model.aliases_of(version.version);
                let mut attributes: BTreeMap<String, String> = version
                    .metrics
                    .iter()
                    .map(|(key, value)| (format!("metric.{key}"), value.to_string()))
                    .collect();
                attributes.insert("source".into(), version.source.clone());
                attributes.insert("stage".into(), version.stage.as_str().into());
                if !aliases.is_empty() {
                    attributes.insert("aliases".into(), aliases.join(","));
                }
                let node = graph.node(
                    format!("model:{}/{}", model.name, version.version),
                    Kind::ModelVersion,
                    format!("model {} v{}", model.name, version.version),
                    attributes,
                );
                // An MLflow 3 version's source is its logged model, `models:/m-ID`.
                let artifact = version
                    .source
                    .strip_prefix(&proxied)
                    .map(|path| format!("artifact:{}", path.trim_start_matches('/').trim_end_matches('/')))
                    .or_else(|| crate::tracking::logged_model_of(&version.source).map(|id| format!("logged:{id}")));
                match artifact.filter(|artifact| graph.nodes.contains_key(artifact)) {
                    Some(artifact) => graph.edge(&artifact, &node),
                    None if !version.run_id.is_empty() => graph.edge(&format!("run:{}", version.run_id), &node),
                    None => {}
                }
            }
        }
        // Edges only between nodes that exist (a run deleted since, say).
        let nodes = &graph.nodes;
        graph.edges = std::mem::take(&mut graph.edges)
            .into_iter()
            .filter(|edge| nodes.contains_key(&edge.from) && nodes.contains_key(&edge.to))
            .collect();
        graph
    }

    /// The node a user names: `models:/NAME/VERSION` or `models:/NAME@ALIAS`, a run id (or `run:ID`), a
    /// dataset digest (or `dataset:DIGEST`), `job:ID`, or any node id (`view:NAME@VERSION`, …). A run or
    /// dataset may be named by a unique prefix of at least 8 characters.
    pub fn resolve(&self, tracking: &Tracking, name: &str) -> Result<String, TrackingError> {
        let missing = |what: String| TrackingError {
            code: ErrorCode::ResourceDoesNotExist,
            message: what,
        };
        if let Some(model) = name.strip_prefix("models:/") {
            let id = match model.split_once('@') {
                Some((model, alias)) => {
                    let version = tracking.registry().version_by_alias(model, alias)?;
                    format!("model:{model}/{}", version.version)
                }
                None => format!("model:{}", model.trim_end_matches('/')),
            };
            return self
                .nodes
                .contains_key(&id)
                .then_some(id)
                .ok_or_else(|| missing(format!("{name} is not a registered model version")));
        }
        if let Some(job) = name.strip_prefix("job:") {
            let job: u64 = job
                .parse()
                .map_err(|_| missing(format!("'{name}' is not job:NUMBER")))?;
            let id = format!("run:{}", Tracking::job_run_id(job));
            return self
                .nodes
                .contains_key(&id)
                .then_some(id)
                .ok_or_else(|| missing(format!("job {job} has no run")));
        }
        if self.nodes.contains_key(name) {
            return Ok(name.to_string());
        }
        let bare = name
            .strip_prefix("run:")
            .or_else(|| name.strip_prefix("dataset:"))
            .unwrap_or(name);
        let candidates: Vec<&String> = self
            .nodes
            .keys()
            .filter(|id| {
                ["run:", "dataset:"].iter().any(|kind| {
                    id.strip_prefix(kind)
                        .is_some_and(|rest| bare.len() >= 8 && rest.starts_with(bare))
                })
            })
            .collect();
        match candidates.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(missing(format!(
                "nothing in the lineage is named '{name}'; expected models:/NAME/VERSION, models:/NAME@ALIAS, a run id, a dataset digest, job:ID or a node id such as view:NAME@VERSION"
            ))),
            many => Err(TrackingError {
                code: ErrorCode::InvalidParameterValue,
                message: format!("'{name}' names {} nodes; give more of it", many.len()),
            }),
        }
    }

    /// The part of the graph reachable from `start` against the edges (upstream), along them
    /// (downstream), or both ways, with the edges between what was reached.
    pub fn around(&self, start: &str, direction: Direction) -> Graph {
        let mut reached = BTreeSet::from([start.to_string()]);
        let mut walk = |upstream: bool| {
            let mut queue = VecDeque::from([start.to_string()]);
            while let Some(at) = queue.pop_front() {
                for edge in &self.edges {
                    let next = match upstream {
                        true if edge.to == at => &edge.from,
                        false if edge.from == at => &edge.to,
                        _ => continue,
                    };
                    if reached.insert(next.clone()) {
                        queue.push_back(next.clone());
                    }
                }
            }
        };
        if direction != Direction::Downstream {
            walk(true);
        }
        if direction != Direction::Upstream {
            walk(false);
        }
        Graph {
            nodes: self
                .nodes
                .iter()
                .filter(|(id, _)| reached.contains(*id))
                .map(|(id, node)| (id.clone(), node.clone()))
                .collect(),
            edges: self
                .edges
                .iter()
                .filter(|edge| reached.contains(&edge.from) && reached.contains(&edge.to))
                .cloned()
                .collect(),
        }
    }

    /// Graphviz DOT: runs as boxes, datasets and views as cylinders and notes, artifacts as folders, model
    /// versions as double octagons; `start` drawn bold.
    pub fn to_dot(&self, start: &str) -> String {
        let quote = |text: &str| format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""));
        let mut dot = String::from("digraph lineage {\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];\n");
        for node in self.nodes.values() {
            let shape = match node.kind {
                Kind::FeatureView => "note",
                Kind::Dataset => "cylinder",
                Kind::Run => "box",
                Kind::OnlineTable => "box3d",
                Kind::Artifact => "folder",
                Kind::LoggedModel => "component",
                Kind::ModelVersion => "doubleoctagon",
            };
            let style = if node.id == start {
                ", style=bold, penwidth=2"
            } else {
                ""
            };
            dot.push_str(&format!(
                "  {} [label={}, shape={shape}{style}];\n",
                quote(&node.id),
                quote(&node.label)
            ));
        }
        for edge in &self.edges {
            dot.push_str(&format!("  {} -> {};\n", quote(&edge.from), quote(&edge.to)));
        }
        dot.push_str("}\n");
        dot
    }
}

#[cfg(test)]
mod tests;
