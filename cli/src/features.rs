//! `kiln features`: feature definitions, kept in the coordinator's catalog, and training sets.
//!
//! `apply` checks a definitions file against its data (through DataFusion) before anything is sent, then
//! applies every object at once; the coordinator versions each one. `list` and `training-set` read the
//! applied definitions back from the cluster (`training-set --definitions FILE` reads a file instead, as
//! Feast's CLI reads its local repository).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use kiln_featurestore::arrow::array::RecordBatch;
use kiln_featurestore::definitions::{Definitions, check_against_data, parse_definitions};
use kiln_featurestore::registry::{self, Registered};
use kiln_featurestore::server::FlightCommand;
use kiln_featurestore::training::write_training_set;
use kiln_proto as pb;
use serde_json::{Value, json};

use crate::Target;
use crate::output::{print_table, status_error, time_label};

#[derive(Subcommand)]
pub enum FeaturesCommand {
    /// Check definitions files against their data without applying anything: names, references, types,
    /// TTLs, and every view's columns as DataFusion reads them through its SQL. A directory stands for every
    /// `.toml` file in it.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Check definitions files against their data and apply them to the cluster: entities, sources, feature
    /// views and services. A directory stands for every `.toml` file in it. The files are the whole set:
    /// objects applied before and missing from them are deleted. Each changed object becomes a new version;
    /// a refused set changes nothing.
    Apply {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The applied feature views (their features, types, versions, owners and descriptions) and services.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Copy the views' latest values from their sources to the feature server's online store.
    Materialize {
        /// Only this view (default: every view).
        #[arg(long)]
        view: Option<String>,
        /// Only rows at or before this time (RFC 3339, such as 2026-11-01T12:00:00Z; default: all).
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Look up a feature service's latest values for entities in the online store.
    Get {
        #[arg(long)]
        service: String,
        /// KEY=VALUE, such as driver_id=1001; repeat a key for more entities.
        #[arg(long = "entity", required = true)]
        entities: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run SQL over the feature views (each is a table named after the view) on the feature server.
    Sql {
        query: String,
        #[arg(long)]
        json: bool,
    },
    /// Build a feature service's training set for entity rows, point-in-time correct, into a Parquet file.
    TrainingSet {
        /// A definitions file to use instead of the cluster's applied definitions (relative source paths
        /// resolve against its directory).
        #[arg(long)]
        definitions: Option<PathBuf>,
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

/// Reads a definitions file, checks it against its data, and makes its source paths absolute.
async fn load_checked(file: &Path) -> Result<Definitions> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut definitions = parse_definitions(&file.display().to_string(), &text)?;
    check_against_data(&definitions, &base_of(file)).await?;
    definitions.resolve_paths(&base_of(file))?;
    Ok(definitions)
}

/// The definitions files `paths` name: files as given, directories as every `.toml` file in them, sorted.
fn definition_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {}", path.display()))?
                .flatten()
                .map(|entry| entry.path())
                .filter(|file| file.is_file() && file.extension().is_some_and(|extension| extension == "toml"))
                .collect();
            if found.is_empty() {
                bail!("directory {} holds no .toml definitions files", path.display());
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Reads, checks and merges the definitions files `paths` name (each file complete in itself); a name
/// defined in two files is refused, naming both.
/// Checks the definitions in `paths` (files or directories) and applies them as the cluster's whole set;
/// returns the files read and what each object became.
pub(crate) async fn apply(
    client: &mut kiln_coordinator::client::Client,
    paths: &[PathBuf],
) -> Result<(String, Vec<pb::AppliedCatalogObject>)> {
    let (definitions, files) = load_checked_all(paths).await?;
    let drafts: Vec<pb::CatalogDraft> = registry::to_entries(&definitions)
        .into_iter()
        .map(|entry| pb::CatalogDraft {
            kind: entry.kind,
            name: entry.name,
            content: entry.content,
        })
        .collect();
    let applied = client
        .apply_catalog(registry::NAMESPACE, drafts, true)
        .await
        .map_err(status_error)?;
    Ok((files, applied))
}

async fn load_checked_all(paths: &[PathBuf]) -> Result<(Definitions, String)> {
    let files = definition_files(paths)?;
    let mut merged = Definitions::default();
    let mut defined: std::collections::BTreeMap<(&'static str, String), PathBuf> = Default::default();
    for file in &files {
        let definitions = load_checked(file).await?;
        let names = definitions
            .entities
            .iter()
            .map(|entity| ("entity", &entity.name))
            .chain(definitions.sources.iter().map(|source| ("source", &source.name)))
            .chain(definitions.views.iter().map(|view| ("feature_view", &view.name)))
            .chain(
                definitions
                    .services
                    .iter()
                    .map(|service| ("feature_service", &service.name)),
            );
        for (kind, name) in names {
            if let Some(other) = defined.insert((kind, name.clone()), file.clone()) {
                bail!(
                    "{kind} '{name}' is defined in both {} and {}; expected each name once across the files",
                    other.display(),
                    file.display()
                );
            }
        }
        merged.entities.extend(definitions.entities);
        merged.sources.extend(definitions.sources);
        merged.views.extend(definitions.views);
        merged.services.extend(definitions.services);
    }
    let label = files
        .iter()
        .map(|file| file.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Ok((merged, label))
}

/// The definitions applied to the cluster, with each object's version.
async fn registered(target: &Target) -> Result<Registered> {
    crate::featureserver::registered(&mut target.client()?).await
}

fn counts(definitions: &Definitions) -> Value {
    json!({
        "entities": definitions.entities.len(),
        "sources": definitions.sources.len(),
        "feature_views": definitions.views.len(),
        "features": definitions.views.iter().map(|view| view.features.len()).sum::<usize>(),
        "feature_services": definitions.services.len(),
    })
}

fn listing_json(registered: &Registered) -> Value {
    let version = |kind: &str, name: &str| {
        registered
            .version_of(kind, name)
            .map_or(json!(null), |applied| json!(applied))
    };
    let definitions = &registered.definitions;
    json!({
        "entities": definitions.entities.iter().map(|entity| json!({
            "name": entity.name,
            "join_keys": entity.join_keys,
            "description": entity.description,
            "version": version(registry::ENTITY, &entity.name),
        })).collect::<Vec<_>>(),
        "sources": definitions.sources.iter().map(|source| json!({
            "name": source.name,
            "kind": source.kind,
            "timestamp_field": source.timestamp_field,
            "description": source.description,
            "version": version(registry::SOURCE, &source.name),
        })).collect::<Vec<_>>(),
        "feature_views": definitions.views.iter().map(|view| json!({
            "name": view.name,
            "entities": view.entities,
            "source": view.source,
            "sql": view.sql,
            "ttl_seconds": view.ttl_seconds,
            "features": view.features.iter().map(|feature| json!({
                "name": feature.name,
                "type": feature.dtype.name(),
                "description": feature.description,
            })).collect::<Vec<_>>(),
            "owner": view.owner,
            "description": view.description,
            "tags": view.tags,
            "version": version(registry::FEATURE_VIEW, &view.name),
            "definition_hash": kiln_featurestore::training::view_hash(view),
        })).collect::<Vec<_>>(),
        "feature_services": definitions.services.iter().map(|service| json!({
            "name": service.name,
            "features": service.features.iter().map(|feature| format!("{}:{}", feature.view, feature.feature)).collect::<Vec<_>>(),
            "description": service.description,
            "version": version(registry::FEATURE_SERVICE, &service.name),
        })).collect::<Vec<_>>(),
    })
}

fn print_listing(registered: &Registered) {
    let definitions = &registered.definitions;
    if definitions.views.is_empty() {
        println!("no feature views applied (kiln features apply FILE)");
        return;
    }
    let rows: Vec<Vec<String>> = definitions
        .views
        .iter()
        .map(|view| {
            let applied = registered.version_of(registry::FEATURE_VIEW, &view.name);
            vec![
                view.name.clone(),
                applied.map_or("-".into(), |applied| applied.version.to_string()),
                view.entities.join(","),
                view.features
                    .iter()
                    .map(|feature| format!("{}:{}", feature.name, feature.dtype.name()))
                    .collect::<Vec<_>>()
                    .join(" "),
                view.ttl_seconds.map_or("-".into(), |seconds| {
                    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
                }),
                if view.owner.is_empty() {
                    "-".into()
                } else {
                    view.owner.clone()
                },
                applied.map_or("-".into(), |applied| time_label(applied.applied_at_ms)),
                view.description.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "VIEW",
            "VERSION",
            "ENTITIES",
            "FEATURES",
            "TTL",
            "OWNER",
            "APPLIED",
            "DESCRIPTION",
        ],
        &rows,
    );
    if !definitions.services.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = definitions
            .services
            .iter()
            .map(|service| {
                vec![
                    service.name.clone(),
                    registered
                        .version_of(registry::FEATURE_SERVICE, &service.name)
                        .map_or("-".into(), |applied| applied.version.to_string()),
                    service
                        .features
                        .iter()
                        .map(|feature| format!("{}:{}", feature.view, feature.feature))
                        .collect::<Vec<_>>()
                        .join(" "),
                    service.description.clone(),
                ]
            })
            .collect();
        print_table(&["SERVICE", "VERSION", "FEATURES", "DESCRIPTION"], &rows);
    }
}

fn print_applied(files: &str, applied: &[pb::AppliedCatalogObject], json: bool) {
    if json {
        let objects: Vec<Value> = applied
            .iter()
            .map(|object| {
                json!({
                    "kind": object.kind,
                    "name": object.name,
                    "version": object.version,
                    "change": object.change,
                })
            })
            .collect();
        println!("{}", json!({ "file": files, "objects": objects }));
        return;
    }
    let rows: Vec<Vec<String>> = applied
        .iter()
        .map(|object| {
            vec![
                object.kind.clone(),
                object.name.clone(),
                object.version.to_string(),
                object.change.clone(),
            ]
        })
        .collect();
    print_table(&["KIND", "NAME", "VERSION", "CHANGE"], &rows);
}

/// `KEY=VALUE` arguments as the online lookup takes them: integers as numbers, anything else as text.
fn parse_entities(arguments: &[String]) -> Result<BTreeMap<String, Vec<serde_json::Value>>> {
    let mut entities: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for argument in arguments {
        let Some((key, value)) = argument.split_once('=') else {
            bail!("--entity {argument:?} is not KEY=VALUE; expected, for example, --entity driver_id=1001");
        };
        let value = match value.parse::<i64>() {
            Ok(number) => json!(number),
            Err(_) => json!(value),
        };
        entities.entry(key.trim().to_string()).or_default().push(value);
    }
    Ok(entities)
}

fn print_batches(batches: &[RecordBatch], json: bool) -> Result<()> {
    if json {
        let mut writer = kiln_featurestore::arrow::json::ArrayWriter::new(Vec::new());
        for batch in batches {
            writer.write(batch)?;
        }
        writer.finish()?;
        let text = String::from_utf8(writer.into_inner())?;
        println!("{}", if text.is_empty() { "[]" } else { text.as_str() });
    } else {
        println!(
            "{}",
            kiln_featurestore::arrow::util::pretty::pretty_format_batches(batches)?
        );
    }
    Ok(())
}

pub async fn run(command: FeaturesCommand, target: Target, featurestore: String) -> Result<()> {
    match command {
        FeaturesCommand::Materialize { view, until, json } => {
            let until_micros = until
                .map(|text| {
                    humantime::parse_rfc3339_weak(&text)
                        .map_err(|error| {
                            anyhow::anyhow!("--until {text:?}: {error}; expected a time such as 2026-11-01T12:00:00Z")
                        })
                        .map(|time| {
                            time.duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |since| since.as_micros() as i64)
                        })
                })
                .transpose()?;
            let mut client = crate::featureserver::connect(&featurestore).await?;
            let report = crate::featureserver::materialize(&mut client, view, until_micros).await?;
            if json {
                println!("{report}");
            } else {
                let rows: Vec<Vec<String>> = report["views"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|view| {
                        vec![
                            view["view"].as_str().unwrap_or_default().to_string(),
                            view["rows_read"].to_string(),
                            view["rows_applied"].to_string(),
                            if view["push"] == true {
                                "pushed online as it arrives".into()
                            } else {
                                String::new()
                            },
                        ]
                    })
                    .collect();
                print_table(&["VIEW", "ROWS READ", "ROWS APPLIED", "NOTE"], &rows);
            }
            Ok(())
        }
        FeaturesCommand::Get {
            service,
            entities,
            json,
        } => {
            let command = FlightCommand::Online {
                service,
                entities: parse_entities(&entities)?,
            };
            let mut client = crate::featureserver::connect(&featurestore).await?;
            let batches = crate::featureserver::fetch(&mut client, &command).await?;
            print_batches(&batches, json)
        }
        FeaturesCommand::Sql { query, json } => {
            let mut client = crate::featureserver::connect(&featurestore).await?;
            let batches = crate::featureserver::fetch(&mut client, &FlightCommand::Sql { query }).await?;
            print_batches(&batches, json)
        }
        FeaturesCommand::Check { paths, json } => {
            let (definitions, files) = load_checked_all(&paths).await?;
            let counts = counts(&definitions);
            if json {
                println!("{counts}");
            } else {
                println!(
                    "{files}: ok ({} entities, {} sources, {} feature views with {} features, {} feature services)",
                    counts["entities"],
                    counts["sources"],
                    counts["feature_views"],
                    counts["features"],
                    counts["feature_services"]
                );
            }
            Ok(())
        }
        FeaturesCommand::Apply { paths, json } => {
            let (files, applied) = apply(&mut target.client()?, &paths).await?;
            print_applied(&files, &applied, json);
            Ok(())
        }
        FeaturesCommand::List { json } => {
            let registered = registered(&target).await?;
            if json {
                println!("{}", listing_json(&registered));
            } else {
                print_listing(&registered);
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
            let registered = match &definitions {
                Some(file) => {
                    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                    let mut parsed = parse_definitions(&file.display().to_string(), &text)?;
                    parsed.resolve_paths(&base_of(file))?;
                    Registered {
                        definitions: parsed,
                        versions: Default::default(),
                    }
                }
                None => registered(&target).await?,
            };
            if registered.definitions.services.is_empty() && definitions.is_none() {
                bail!("no feature service is applied to the cluster; run kiln features apply FILE first");
            }
            // A spinner with the rows joined so far, on a terminal only (indicatif hides it elsewhere).
            let progress = indicatif::ProgressBar::new_spinner();
            progress.set_style(
                indicatif::ProgressStyle::with_template("{spinner} joining: {pos} rows written ({per_sec}, {elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            if json {
                progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            } else {
                // It turns while the views are read and indexed, before the first rows are written.
                progress.enable_steady_tick(std::time::Duration::from_millis(120));
            }
            let built = write_training_set(
                &registered.definitions,
                &service,
                &entities,
                &event_timestamp,
                Path::new("/"),
                &out,
                &mut |rows| progress.set_position(rows as u64),
            )
            .await;
            progress.finish_and_clear();
            let set = built?;
            let summary = json!({
                "out": out.display().to_string(),
                "rows": set.rows,
                "columns": set.schema.fields().iter().map(|field| field.name().clone()).collect::<Vec<_>>(),
                "content_hash": set.content_hash,
                "entities": std::path::absolute(&entities).unwrap_or(entities.clone()).display().to_string(),
                "feature_views": set.views.iter().map(|view| json!({
                    "name": view.name,
                    "version": registered.version_of(registry::FEATURE_VIEW, &view.name).map(|applied| applied.version),
                    "definition_hash": view.definition_hash,
                })).collect::<Vec<_>>(),
            });
            if json {
                println!("{summary}");
            } else {
                println!(
                    "{}: {} rows, columns {}; content hash {}",
                    out.display(),
                    set.rows,
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
