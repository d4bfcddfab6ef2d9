use super::*;
use crate::search::Subject;
use crate::tracking::{LogBatch, MetricPoint, Tracking, TrackingCommand, TrackingOutcome};

fn register(tracking: &mut Tracking, command: RegistryCommand, now_ms: i64) -> Result<RegistryOutcome, TrackingError> {
    let command = TrackingCommand::Register {
        command,
        user_id: "ada".into(),
        artifact_root: "file:///artifacts".into(),
    };
    match tracking.apply(command, now_ms)? {
        TrackingOutcome::Registered(outcome) => Ok(outcome),
        other => panic!("a registry command gave {other:?}"),
    }
}

fn create_model(tracking: &mut Tracking, name: &str) {
    let command = RegistryCommand::CreateModel {
        name: name.into(),
        description: String::new(),
        tags: vec![],
    };
    register(tracking, command, 10).unwrap();
}

fn create_version(tracking: &mut Tracking, name: &str, run_id: &str, now_ms: i64) -> Result<u64, TrackingError> {
    let command = RegistryCommand::CreateVersion {
        name: name.into(),
        source: format!("mlflow-artifacts:/0/{run_id}/artifacts/model"),
        run_id: run_id.into(),
        run_link: String::new(),
        description: String::new(),
        tags: vec![],
    };
    match register(tracking, command, now_ms)? {
        RegistryOutcome::Version(version, _) => Ok(version.version),
        other => panic!("creating a version gave {other:?}"),
    }
}

fn alias(tracking: &mut Tracking, name: &str, alias: &str, version: u64) -> Result<RegistryOutcome, TrackingError> {
    let command = RegistryCommand::SetAlias {
        name: name.into(),
        alias: alias.into(),
        version,
    };
    register(tracking, command, 50)
}

/// A store with run `r` (id 1) whose latest accuracy is 0.97.
fn store_with_a_run() -> (Tracking, String) {
    let mut tracking = Tracking::new("file:///artifacts", 1);
    let run_id = format!("{:032x}", 1);
    tracking.create_run(&run_id, "0", "r", "ada", 1, &[]).unwrap();
    let batch = LogBatch {
        metrics: vec![
            (
                "accuracy".into(),
                MetricPoint {
                    value: 0.5,
                    timestamp_ms: 2,
                    step: 0,
                },
            ),
            (
                "accuracy".into(),
                MetricPoint {
                    value: 0.97,
                    timestamp_ms: 3,
                    step: 1,
                },
            ),
        ],
        ..LogBatch::default()
    };
    tracking.log_batch(&run_id, &batch).unwrap();
    (tracking, run_id)
}

#[test]
fn versions_count_up_per_model_keep_their_runs_metrics_and_are_never_reused() {
    let (mut tracking, run_id) = store_with_a_run();
    create_model(&mut tracking, "digits");
    create_model(&mut tracking, "iris");
    assert_eq!(create_version(&mut tracking, "digits", &run_id, 20).unwrap(), 1);
    assert_eq!(create_version(&mut tracking, "digits", "", 21).unwrap(), 2);
    assert_eq!(create_version(&mut tracking, "iris", "", 22).unwrap(), 1);
    let first = tracking.registry().version("digits", 1).unwrap();
    assert_eq!(first.metrics["accuracy"], 0.97, "the run's latest value, not its first");
    assert_eq!(first.user_id, "ada");
    assert!(tracking.registry().version("digits", 2).unwrap().metrics.is_empty());

    let delete = RegistryCommand::DeleteVersion {
        name: "digits".into(),
        version: 2,
    };
    register(&mut tracking, delete, 30).unwrap();
    assert_eq!(
        create_version(&mut tracking, "digits", "", 31).unwrap(),
        3,
        "a deleted version's number is not given again"
    );
    let error = tracking.registry().version("digits", 2).unwrap_err();
    assert_eq!(error.code, ErrorCode::ResourceDoesNotExist);
    assert_eq!(error.message, "registered model 'digits' has no version 2");
}

#[test]
fn refused_commands_name_the_problem_and_change_nothing() {
    let (mut tracking, _) = store_with_a_run();
    create_model(&mut tracking, "digits");
    let before = tracking.clone();

    let error = create_version(&mut tracking, "digits", &format!("{:032x}", 9), 20).unwrap_err();
    assert_eq!(error.code, ErrorCode::ResourceDoesNotExist);
    assert!(
        error
            .message
            .contains("no run has id '00000000000000000000000000000009'"),
        "{error}"
    );

    let duplicate = RegistryCommand::CreateModel {
        name: "digits".into(),
        description: String::new(),
        tags: vec![],
    };
    let error = register(&mut tracking, duplicate, 20).unwrap_err();
    assert_eq!(error.code, ErrorCode::ResourceAlreadyExists);

    let unnamed = RegistryCommand::CreateModel {
        name: " ".into(),
        description: String::new(),
        tags: vec![],
    };
    assert_eq!(
        register(&mut tracking, unnamed, 20).unwrap_err().message,
        "a registered model needs a non-empty name"
    );

    let sourceless = RegistryCommand::CreateVersion {
        name: "digits".into(),
        source: String::new(),
        run_id: String::new(),
        run_link: String::new(),
        description: String::new(),
        tags: vec![],
    };
    assert!(
        register(&mut tracking, sourceless, 20)
            .unwrap_err()
            .message
            .contains("needs a source")
    );
    let error = create_version(&mut tracking, "nope", "", 20).unwrap_err();
    assert_eq!(error.message, "no registered model is named 'nope'");
    assert_eq!(
        alias(&mut tracking, "digits", "champion", 1).unwrap_err().code,
        ErrorCode::ResourceDoesNotExist
    );
    assert_eq!(tracking, before);
}

#[test]
fn aliases_move_go_with_their_version_and_cannot_look_like_versions() {
    let (mut tracking, run_id) = store_with_a_run();
    create_model(&mut tracking, "digits");
    create_version(&mut tracking, "digits", &run_id, 20).unwrap();
    create_version(&mut tracking, "digits", &run_id, 21).unwrap();
    alias(&mut tracking, "digits", "champion", 1).unwrap();
    alias(&mut tracking, "digits", "challenger", 2).unwrap();
    assert_eq!(
        tracking
            .registry()
            .version_by_alias("digits", "champion")
            .unwrap()
            .version,
        1
    );
    alias(&mut tracking, "digits", "champion", 2).unwrap();
    let model = tracking.registry().model("digits").unwrap();
    assert_eq!(model.aliases_of(2), ["challenger", "champion"]);
    assert!(model.aliases_of(1).is_empty());

    for reserved in ["latest", "v3", "7", "LATEST"] {
        let error = alias(&mut tracking, "digits", reserved, 1).unwrap_err();
        assert!(error.message.contains("is reserved"), "{reserved}: {error}");
    }
    let error = alias(&mut tracking, "digits", "a b", 1).unwrap_err();
    assert!(error.message.contains("letters, digits, '_' or '-'"), "{error}");

    let delete = RegistryCommand::DeleteVersion {
        name: "digits".into(),
        version: 2,
    };
    register(&mut tracking, delete, 30).unwrap();
    let error = tracking.registry().version_by_alias("digits", "champion").unwrap_err();
    assert_eq!(error.message, "registered model 'digits' has no alias 'champion'");
}

#[test]
fn stages_archive_the_previous_production_version_and_latest_versions_follow() {
    let (mut tracking, _) = store_with_a_run();
    create_model(&mut tracking, "digits");
    for now in 20..23 {
        create_version(&mut tracking, "digits", "", now).unwrap();
    }
    let transition = |version, stage, archive_existing| RegistryCommand::TransitionStage {
        name: "digits".into(),
        version,
        stage,
        archive_existing,
    };
    register(&mut tracking, transition(1, Stage::Production, false), 30).unwrap();
    register(&mut tracking, transition(2, Stage::Production, true), 31).unwrap();
    let registry = tracking.registry();
    assert_eq!(registry.version("digits", 1).unwrap().stage, Stage::Archived);
    let model = registry.model("digits").unwrap();
    let latest: Vec<(u64, Stage)> = model
        .latest_versions(&[])
        .iter()
        .map(|v| (v.version, v.stage))
        .collect();
    assert_eq!(latest, [(3, Stage::None), (2, Stage::Production), (1, Stage::Archived)]);
    let production: Vec<u64> = model
        .latest_versions(&[Stage::Production])
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(production, [2]);
    assert_eq!(Stage::parse("production").unwrap(), Stage::Production);
    assert!(
        Stage::parse("prod")
            .unwrap_err()
            .message
            .contains("expected None, Staging, Production or Archived")
    );
}

#[test]
fn renaming_a_model_renames_its_versions_and_keeps_its_aliases() {
    let (mut tracking, _) = store_with_a_run();
    create_model(&mut tracking, "digits");
    create_model(&mut tracking, "iris");
    create_version(&mut tracking, "digits", "", 20).unwrap();
    alias(&mut tracking, "digits", "champion", 1).unwrap();
    let taken = RegistryCommand::RenameModel {
        name: "digits".into(),
        new_name: "iris".into(),
    };
    assert_eq!(
        register(&mut tracking, taken, 30).unwrap_err().code,
        ErrorCode::ResourceAlreadyExists
    );
    let rename = RegistryCommand::RenameModel {
        name: "digits".into(),
        new_name: "digits-mlp".into(),
    };
    register(&mut tracking, rename, 31).unwrap();
    assert!(tracking.registry().model("digits").is_err());
    let version = tracking.registry().version_by_alias("digits-mlp", "champion").unwrap();
    assert_eq!((version.name.as_str(), version.version), ("digits-mlp", 1));
}

#[test]
fn models_and_versions_are_searched_with_mlflows_filters() {
    let (mut tracking, run_id) = store_with_a_run();
    for name in ["digits-cnn", "digits-mlp", "iris"] {
        create_model(&mut tracking, name);
    }
    let tag = RegistryCommand::SetModelTag {
        name: "iris".into(),
        key: "team".into(),
        value: "tabular".into(),
    };
    register(&mut tracking, tag, 15).unwrap();
    create_version(&mut tracking, "digits-mlp", &run_id, 20).unwrap();
    create_version(&mut tracking, "digits-mlp", "", 21).unwrap();
    create_version(&mut tracking, "iris", &run_id, 22).unwrap();
    let registry = tracking.registry();
    let models = |filter: &str, order: &[&str]| -> Vec<String> {
        let search = ModelSearch {
            filter: Filter::parse_for(filter, Subject::RegisteredModels).unwrap(),
            order_by: order
                .iter()
                .map(|text| Order::parse_for(text, Subject::RegisteredModels).unwrap())
                .collect(),
            max_results: 100,
            page_token: None,
        };
        registry
            .search_models(&search)
            .unwrap()
            .0
            .into_iter()
            .map(|model| model.name)
            .collect()
    };
    assert_eq!(models("", &[]), ["digits-cnn", "digits-mlp", "iris"]);
    assert_eq!(
        models("name LIKE 'digits%'", &["name DESC"]),
        ["digits-mlp", "digits-cnn"]
    );
    assert_eq!(models("tags.team = 'tabular'", &[]), ["iris"]);
    // A model without the tag differs from any value (MLflow's client excludes prompts this way).
    assert_eq!(models("tags.team != 'tabular'", &[]), ["digits-cnn", "digits-mlp"]);
    assert_eq!(
        models("name LIKE 'digits%' AND tag.`mlflow.prompt.is_prompt` != 'true'", &[]),
        ["digits-cnn", "digits-mlp"]
    );
    assert_eq!(models("", &["last_updated_timestamp DESC"])[0], "iris");

    let versions = |filter: &str| -> Vec<(String, u64)> {
        let search = ModelSearch {
            filter: Filter::parse_for(filter, Subject::ModelVersions).unwrap(),
            order_by: vec![],
            max_results: 100,
            page_token: None,
        };
        let (page, _) = registry.search_versions(&search).unwrap();
        page.into_iter()
            .map(|version| (version.name, version.version))
            .collect()
    };
    let mlp = |version| ("digits-mlp".to_string(), version);
    assert_eq!(versions("name = 'digits-mlp'"), [mlp(2), mlp(1)]);
    assert_eq!(
        versions(&format!("run_id IN ('{run_id}')")),
        [mlp(1), ("iris".to_string(), 1)]
    );
    assert_eq!(versions("version_number > 1"), [mlp(2)]);
    let error = Filter::parse_for("metrics.x > 1", Subject::ModelVersions).unwrap_err();
    assert!(
        error.to_string().contains("model versions have no 'metrics'"),
        "{error}"
    );
}
