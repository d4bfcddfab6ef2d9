//! `kiln features`: feature definitions and training sets.
//!
//! Until definitions are replicated through the coordinator (`kiln features apply`), these commands read
//! the definitions file they are given, as Feast's CLI reads its local repository.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use kiln_featurestore::definitions::{check_against_data, parse_definitions};
use kiln_featurestore::training::{read_file, training_set, write_parquet};

#[derive(Subcommand)]
pub enum FeaturesCommand {
    /// Check a definitions file against its data without applying anything: names, references, types,
    /// TTLs, and every view's columns as DataFusion reads them through its SQL.
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Build a feature service's training set for entity rows, point-in-time correct, into a Parquet file.
    TrainingSet {
        /// The definitions file (relative source paths resolve against its directory).
        #[arg(long)]
        definitions: PathBuf,
        #[arg(long)]
        service: String,
        /// Entity rows: a Parquet, CSV or JSON file with the views' join keys and the event time.
        #[arg(long)]
        entities: PathBuf,
        /// The event time column of the entity rows.
        #[arg(long, default_value = "event_timestamp")]
        event_timestamp: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn base_of(file: &Path) -> PathBuf {
    file.parent()
        .map(Path::to_path_buf)
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."))
}

pub async fn run(command: FeaturesCommand) -> Result<()> {
    match command {
        FeaturesCommand::Check { file, json } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let definitions = parse_definitions(&file.display().to_string(), &text)?;
            check_against_data(&definitions, &base_of(&file)).await?;
            let counts = serde_json::json!({
                "entities": definitions.entities.len(),
                "sources": definitions.sources.len(),
                "feature_views": definitions.views.len(),
                "features": definitions.views.iter().map(|view| view.features.len()).sum::<usize>(),
                "feature_services": definitions.services.len(),
            });
            if json {
                println!("{counts}");
            } else {
                println!(
                    "{}: ok ({} entities, {} sources, {} feature views with {} features, {} feature services)",
                    file.display(),
                    counts["entities"],
                    counts["sources"],
                    counts["feature_views"],
                    counts["features"],
                    counts["feature_services"]
                );
            }
            Ok(())
        }
        FeaturesCommand::TrainingSet {
            definitions,
            service,
            entities,
            event_timestamp,
            out,
            json,
        } => {
            let text =
                std::fs::read_to_string(&definitions).with_context(|| format!("reading {}", definitions.display()))?;
            let parsed = parse_definitions(&definitions.display().to_string(), &text)?;
            let rows = read_file(&entities).await?;
            let set = training_set(&parsed, &service, &rows, &event_timestamp, &base_of(&definitions)).await?;
            write_parquet(&out, &set.batch)?;
            let summary = serde_json::json!({
                "out": out.display().to_string(),
                "rows": set.batch.num_rows(),
                "columns": set.batch.schema().fields().iter().map(|field| field.name().clone()).collect::<Vec<_>>(),
                "content_hash": set.content_hash,
                "feature_views": set.views.iter().map(|view| serde_json::json!({
                    "name": view.name,
                    "definition_hash": view.definition_hash,
                })).collect::<Vec<_>>(),
            });
            if json {
                println!("{summary}");
            } else {
                println!(
                    "{}: {} rows, columns {}; content hash {}",
                    out.display(),
                    set.batch.num_rows(),
                    summary["columns"]
                        .as_array()
                        .map(|columns| columns
                            .iter()
                            .filter_map(|column| column.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default(),
                    set.content_hash
                );
            }
            Ok(())
        }
    }
}
