//! `kiln lineage NAME [--upstream|--downstream] [--format text|dot|json]`: what a model version, dataset or
//! run came from and what came of it, as the coordinators' lineage endpoint draws it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::runs::{Api, answer};

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    /// An indented tree from the node named.
    Text,
    /// Graphviz (`kiln lineage … --format dot | dot -Tsvg > lineage.svg`).
    Dot,
    Json,
}

#[derive(Args)]
pub struct LineageArgs {
    /// models:/NAME/VERSION, models:/NAME@ALIAS, a run id, a dataset digest (or a prefix of 8 or more
    /// characters), job:ID, or a node id such as view:NAME@VERSION or online:VIEW (a view's online table).
    name: String,
    /// Only what it came from.
    #[arg(long, conflicts_with = "downstream")]
    upstream: bool,
    /// Only what came of it.
    #[arg(long)]
    downstream: bool,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// A coordinator's MLflow API (kiln up serves one on 127.0.0.1:7080).
    #[arg(long, env = "KILN_TRACKING", default_value = "127.0.0.1:7080")]
    tracking: String,
}

pub async fn run(args: LineageArgs) -> Result<()> {
    let direction = match (args.upstream, args.downstream) {
        (true, _) => "upstream",
        (_, true) => "downstream",
        _ => "both",
    };
    show(&args.tracking, &args.name, direction, args.format).await
}

/// Prints the lineage of `name` (see [`LineageArgs`]) in `direction`: upstream, downstream or both.
pub async fn show(tracking: &str, name: &str, direction: &str, format: Format) -> Result<()> {
    let api = Api::new(tracking)?;
    let args = LineageArgs {
        name: name.to_string(),
        upstream: false,
        downstream: false,
        format,
        tracking: tracking.to_string(),
    };
    let format = match args.format {
        Format::Dot => "dot",
        Format::Text | Format::Json => "json",
    };
    let request = api.client.get(format!("{}/api/2.0/kiln/lineage", api.host)).query(&[
        ("id", args.name.as_str()),
        ("direction", direction),
        ("format", format),
    ]);
    let what = format!("the lineage of {}", args.name);
    if let Format::Dot = args.format {
        let response = request.send().await.map_err(|_| anyhow::anyhow!(api.unreachable()))?;
        if !response.status().is_success() {
            answer(response, &what).await?;
            anyhow::bail!("{what} could not be drawn");
        }
        print!("{}", response.text().await?);
        return Ok(());
    }
    let graph = api.call(request, &what).await?;
    if let Format::Json = args.format {
        println!("{}", serde_json::to_string_pretty(&graph)?);
        return Ok(());
    }
    print!("{}", tree(&graph, direction));
    Ok(())
}

/// The graph as indented trees from the root: what it came from (`<-`), then what came of it (`->`).
fn tree(graph: &Value, direction: &str) -> String {
    let root = graph["root"].as_str().unwrap_or_default();
    let nodes: BTreeMap<&str, &Value> = graph["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|node| (node["id"].as_str().unwrap_or_default(), node))
                .collect()
        })
        .unwrap_or_default();
    let edges: Vec<(&str, &str)> = graph["edges"]
        .as_array()
        .map(|edges| {
            edges
                .iter()
                .map(|edge| {
                    (
                        edge["from"].as_str().unwrap_or_default(),
                        edge["to"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let describe = |id: &str| -> String {
        let Some(node) = nodes.get(id) else {
            return id.to_string();
        };
        let mut text = node["label"].as_str().unwrap_or(id).to_string();
        let attributes = node["attributes"].as_object().cloned().unwrap_or_default();
        let pick = |prefix: &str, numeric: bool| -> Vec<(String, Value)> {
            attributes
                .iter()
                .filter_map(|(key, value)| {
                    let name = key.strip_prefix(prefix)?;
                    // Metrics travel as text; shown as numbers, rounded.
                    let value = value
                        .as_str()
                        .and_then(|text| text.parse::<f64>().ok())
                        .filter(|_| numeric)
                        .map_or_else(|| value.clone(), Value::from);
                    Some((name.to_string(), value))
                })
                .collect()
        };
        let mut attributes: Vec<String> = crate::runs::headline_metrics(pick("metric.", true), 2)
            .into_iter()
            .chain(pick("param.", false))
            .map(|(key, value)| format!("{key}={}", crate::runs::text(&value)))
            .collect();
        if let Some(aliases) = node["attributes"]["aliases"].as_str() {
            attributes.push(format!("@{aliases}"));
        }
        if !attributes.is_empty() {
            text.push_str(&format!("  [{}]", attributes.join(" ")));
        }
        text
    };
    let mut out = format!("{}\n", describe(root));
    let mut walk = |upstream: bool, arrow: &str| {
        let mut seen = BTreeSet::from([root]);
        let mut stack: Vec<(&str, usize)> = vec![(root, 0)];
        while let Some((at, depth)) = stack.pop() {
            if depth > 0 {
                out.push_str(&format!("{}{arrow} {}\n", "  ".repeat(depth), describe(at)));
            }
            let mut next: Vec<&str> = edges
                .iter()
                .filter_map(|(from, to)| match upstream {
                    true if *to == at => Some(*from),
                    false if *from == at => Some(*to),
                    _ => None,
                })
                .collect();
            next.sort_unstable();
            for neighbour in next.into_iter().rev() {
                if seen.insert(neighbour) {
                    stack.push((neighbour, depth + 1));
                }
            }
        }
    };
    if direction != "downstream" {
        walk(true, "<-");
    }
    if direction != "upstream" {
        walk(false, "->");
    }
    out
}
