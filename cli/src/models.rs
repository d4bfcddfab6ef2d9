//! `kiln models list | show NAME | alias NAME VERSION ALIAS | register NAME SOURCE`: the model registry as
//! the coordinators' MLflow Model Registry API serves it, as tables or `--json`.

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::output::print_table;
use crate::runs::{Api, text, when};

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Registered models: their newest version, aliases and when they changed.
    List {
        /// MLflow's filter, e.g. "name LIKE 'digits%'".
        #[arg(long, default_value = "")]
        filter: String,
        #[arg(long)]
        json: bool,
    },
    /// One model: every version with its run, stage, aliases and the run's metrics when registered.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Points ALIAS (e.g. champion) at VERSION of NAME, moving it from any other version.
    Alias { name: String, version: u64, alias: String },
    /// Registers a new version of NAME (creating the model if needed) from SOURCE, the model's files
    /// (e.g. mlflow-artifacts:/0/RUN/artifacts/model), made by run RUN.
    Register {
        name: String,
        source: String,
        #[arg(long, default_value = "")]
        run: String,
    },
}

fn aliases(model: &Value) -> String {
    let aliases: Vec<String> = model["aliases"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|alias| format!("{}={}", text(&alias["alias"]), text(&alias["version"])))
                .collect()
        })
        .unwrap_or_default();
    if aliases.is_empty() {
        "-".into()
    } else {
        aliases.join(" ")
    }
}

fn metrics(version: &Value) -> String {
    let all: Vec<(String, Value)> = version["kiln_metrics"]
        .as_object()
        .map(|all| all.iter().map(|(key, value)| (key.clone(), value.clone())).collect())
        .unwrap_or_default();
    crate::runs::headline_metrics(all, 3)
        .into_iter()
        .map(|(key, value)| format!("{key}={}", text(&value)))
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn run(command: ModelsCommand, tracking: &str) -> Result<()> {
    let api = Api::new(tracking)?;
    match command {
        ModelsCommand::List { filter, json } => {
            let mut models = Vec::new();
            let mut token = String::new();
            loop {
                let mut query = vec![("filter", filter.as_str()), ("max_results", "1000")];
                if !token.is_empty() {
                    query.push(("page_token", token.as_str()));
                }
                let page = api.get("registered-models/search", &query, "the model search").await?;
                models.extend(page["registered_models"].as_array().cloned().unwrap_or_default());
                match page["next_page_token"].as_str() {
                    Some(next) if !next.is_empty() => token = next.to_string(),
                    _ => break,
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&models)?);
                return Ok(());
            }
            if models.is_empty() {
                println!("no registered models yet");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = models
                .iter()
                .map(|model| {
                    let newest = model["latest_versions"]
                        .as_array()
                        .and_then(|versions| {
                            versions
                                .iter()
                                .filter_map(|version| text(&version["version"]).parse::<u64>().ok())
                                .max()
                        })
                        .map_or("-".to_string(), |version| version.to_string());
                    vec![
                        text(&model["name"]),
                        newest,
                        aliases(model),
                        when(&model["last_updated_timestamp"]),
                        text(&model["description"]),
                    ]
                })
                .collect();
            print_table(&["NAME", "NEWEST", "ALIASES", "UPDATED", "DESCRIPTION"], &rows);
            Ok(())
        }
        ModelsCommand::Show { name, json } => {
            let what = format!("model '{name}'");
            let model = api.get("registered-models/get", &[("name", &name)], &what).await?["registered_model"].take();
            let filter = format!("name = '{}'", name.replace('\'', "\\'"));
            let versions = api
                .get(
                    "model-versions/search",
                    &[("filter", &filter), ("max_results", "10000")],
                    &what,
                )
                .await?["model_versions"]
                .take();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "model": model, "versions": versions }))?
                );
                return Ok(());
            }
            println!("model {}", text(&model["name"]));
            if !text(&model["description"]).is_empty() {
                println!("  {}", text(&model["description"]));
            }
            println!("  created   {}", when(&model["creation_timestamp"]));
            println!("  aliases   {}", aliases(&model));
            let rows: Vec<Vec<String>> = versions
                .as_array()
                .map(|all| {
                    all.iter()
                        .map(|version| {
                            let aliases: Vec<String> = version["aliases"]
                                .as_array()
                                .map(|all| all.iter().map(text).collect())
                                .unwrap_or_default();
                            vec![
                                text(&version["version"]),
                                if aliases.is_empty() {
                                    "-".into()
                                } else {
                                    aliases.join(",")
                                },
                                text(&version["current_stage"]),
                                text(&version["run_id"]),
                                when(&version["creation_timestamp"]),
                                metrics(version),
                                text(&version["source"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(
                &["VERSION", "ALIASES", "STAGE", "RUN", "CREATED", "METRICS", "SOURCE"],
                &rows,
            );
            Ok(())
        }
        ModelsCommand::Alias { name, version, alias } => {
            let body = json!({ "name": name, "alias": alias, "version": version.to_string() });
            api.post(
                "registered-models/alias",
                body,
                &format!("alias '{alias}' of model '{name}'"),
            )
            .await?;
            println!("{name}@{alias} -> version {version}");
            Ok(())
        }
        ModelsCommand::Register { name, source, run } => {
            let exists = api
                .get("registered-models/get", &[("name", &name)], &format!("model '{name}'"))
                .await
                .is_ok();
            if !exists {
                api.post(
                    "registered-models/create",
                    json!({ "name": name }),
                    &format!("model '{name}'"),
                )
                .await?;
            }
            let body = json!({ "name": name, "source": source, "run_id": run });
            let created = api
                .post("model-versions/create", body, &format!("a version of model '{name}'"))
                .await?;
            println!("{name} version {}", text(&created["model_version"]["version"]));
            Ok(())
        }
    }
}
