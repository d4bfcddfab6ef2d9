use super::*;
use crate::registry::RegistryCommand;
use crate::tracking::{Dataset, DatasetInput, LogBatch, TrackingCommand};

const ROOT: &str = "mlflow-artifacts:";

fn apply(tracking: &mut Tracking, command: TrackingCommand) {
    tracking.apply(command, 100).unwrap();
}

/// A train run that read a training set of two feature views and wrote a model and checkpoints, registered
/// as digits v1 (and a second run that used the same dataset, without outputs).
fn store() -> (Tracking, String, String) {
    let mut tracking = Tracking::new(ROOT, 1);
    let run_id = format!("{:032x}", 7);
    let other = format!("{:032x}", 8);
    tracking.create_run(&run_id, "0", "digits-mlp", "kiln", 5, &[]).unwrap();
    tracking
        .create_run(&other, "0", "digits-again", "kiln", 6, &[])
        .unwrap();
    let batch = LogBatch {
        params: vec![("learning_rate".into(), "0.001".into())],
        ..LogBatch::default()
    };
    tracking.log_batch(&run_id, &batch).unwrap();
    let digest = "ab".repeat(32);
    let input = DatasetInput {
        dataset: Dataset {
            name: "digits training set".into(),
            digest: digest.clone(),
            source_type: "kiln-feature-service".into(),
            source: "{\"service\":\"digits\"}".into(),
            schema: String::new(),
            profile: "{\"rows\":1797}".into(),
        },
        tags: vec![(FEATURE_VIEWS_TAG.into(), "digit_pixels@2, digit_labels@1".into())],
    };
    for run in [&run_id, &other] {
        let command = TrackingCommand::LogInputs {
            run_id: run.clone(),
            inputs: vec![input.clone()],
            artifact_root: ROOT.into(),
        };
        apply(&mut tracking, command);
    }
    for path in ["model/weights.bin", "model/model.json", "checkpoints/checkpoint.json"] {
        let command = TrackingCommand::RecordArtifact {
            path: format!("0/{run_id}/artifacts/{path}"),
            size: 3,
            sha256: "00".repeat(32),
            artifact_root: ROOT.into(),
        };
        apply(&mut tracking, command);
    }
    let register = |command| TrackingCommand::Register {
        command,
        user_id: "kiln".into(),
        artifact_root: ROOT.into(),
    };
    apply(
        &mut tracking,
        register(RegistryCommand::CreateModel {
            name: "digits".into(),
            description: String::new(),
            tags: vec![],
        }),
    );
    apply(
        &mut tracking,
        register(RegistryCommand::CreateVersion {
            name: "digits".into(),
            source: format!("{ROOT}/0/{run_id}/artifacts/model"),
            run_id: run_id.clone(),
            run_link: String::new(),
            description: String::new(),
            tags: vec![],
        }),
    );
    apply(
        &mut tracking,
        register(RegistryCommand::SetAlias {
            name: "digits".into(),
            alias: "champion".into(),
            version: 1,
        }),
    );
    (tracking, run_id, digest)
}

fn ids(graph: &Graph) -> Vec<&str> {
    graph.nodes.keys().map(String::as_str).collect()
}

#[test]
fn a_model_version_traces_back_to_its_run_dataset_and_feature_views() {
    let (tracking, run_id, digest) = store();
    let graph = Graph::of(&tracking);
    let start = graph.resolve(&tracking, "models:/digits@champion").unwrap();
    assert_eq!(start, "model:digits/1");
    let upstream = graph.around(&start, Direction::Upstream);
    let model_artifact = format!("artifact:0/{run_id}/artifacts/model");
    assert_eq!(
        ids(&upstream),
        [
            model_artifact.as_str(),
            &format!("dataset:{digest}"),
            "model:digits/1",
            &format!("run:{run_id}"),
            "view:digit_labels@1",
            "view:digit_pixels@2",
        ]
    );
    // The checkpoints are the run's output too, but not upstream of the model.
    assert!(!upstream.nodes.keys().any(|id| id.ends_with("/checkpoints")));
    let run = &upstream.nodes[&format!("run:{run_id}")];
    assert_eq!(
        run.attributes["param.learning_rate"], "0.001",
        "which hyperparameters made it"
    );
    assert_eq!(upstream.nodes[&model_artifact].attributes["files"], "2");
    assert_eq!(upstream.nodes["model:digits/1"].attributes["aliases"], "champion");
    let edges: Vec<(&str, &str)> = upstream
        .edges
        .iter()
        .map(|edge| (edge.from.as_str(), edge.to.as_str()))
        .collect();
    assert!(
        edges.contains(&(model_artifact.as_str(), "model:digits/1")),
        "{edges:?}"
    );
    assert!(
        edges.contains(&("view:digit_pixels@2", &format!("dataset:{digest}"))),
        "{edges:?}"
    );
}

#[test]
fn a_version_registered_from_a_logged_model_traces_back_through_it_to_its_run() {
    let (mut tracking, run_id, _) = store();
    let model_id = "m-0123456789abcdef0123456789abcdef".to_string();
    let command = TrackingCommand::LogModel {
        command: crate::tracking::LoggedModelCommand::Create {
            model_id: model_id.clone(),
            experiment_id: "0".into(),
            name: "model".into(),
            model_type: String::new(),
            source_run_id: run_id.clone(),
            tags: vec![],
            params: vec![],
        },
        artifact_root: ROOT.into(),
    };
    apply(&mut tracking, command);
    let command = TrackingCommand::Register {
        command: RegistryCommand::CreateVersion {
            name: "digits".into(),
            source: format!("models:/{model_id}"),
            run_id: String::new(),
            run_link: String::new(),
            description: String::new(),
            tags: vec![],
        },
        user_id: "kiln".into(),
        artifact_root: ROOT.into(),
    };
    apply(&mut tracking, command);
    let graph = Graph::of(&tracking);
    let upstream = graph.around("model:digits/2", Direction::Upstream);
    let edges: Vec<(&str, &str)> = upstream
        .edges
        .iter()
        .map(|edge| (edge.from.as_str(), edge.to.as_str()))
        .collect();
    let logged = format!("logged:{model_id}");
    let run = format!("run:{run_id}");
    assert!(edges.contains(&(logged.as_str(), "model:digits/2")), "{edges:?}");
    assert!(edges.contains(&(run.as_str(), logged.as_str())), "{edges:?}");
}

#[test]
fn a_dataset_answers_which_runs_and_models_used_it() {
    let (tracking, run_id, digest) = store();
    let graph = Graph::of(&tracking);
    // By a prefix of its digest.
    let start = graph.resolve(&tracking, &digest[..10]).unwrap();
    let downstream = graph.around(&start, Direction::Downstream);
    let runs: Vec<&str> = downstream
        .nodes
        .values()
        .filter(|node| node.kind == Kind::Run)
        .map(|node| node.label.as_str())
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(downstream.nodes.contains_key("model:digits/1"));
    assert!(
        downstream
            .nodes
            .contains_key(&format!("artifact:0/{run_id}/artifacts/checkpoints"))
    );
    assert!(
        !downstream.nodes.keys().any(|id| id.starts_with("view:")),
        "views are upstream"
    );
    let dot = downstream.to_dot(&start);
    assert!(dot.starts_with("digraph lineage {"), "{dot}");
    assert!(
        dot.contains(&format!("\"run:{run_id}\" -> \"artifact:0/{run_id}/artifacts/model\";")),
        "{dot}"
    );
    assert!(dot.contains("shape=cylinder, style=bold"), "{dot}");
}

#[test]
fn names_that_match_nothing_or_too_much_are_refused() {
    let (tracking, _, _) = store();
    let graph = Graph::of(&tracking);
    let error = graph.resolve(&tracking, "models:/digits/9").unwrap_err();
    assert_eq!(error.code, ErrorCode::ResourceDoesNotExist);
    assert!(
        graph
            .resolve(&tracking, "models:/digits@nope")
            .unwrap_err()
            .message
            .contains("no alias")
    );
    let error = graph.resolve(&tracking, "nothing").unwrap_err();
    assert!(error.message.contains("expected models:/NAME/VERSION"), "{error}");
    // Both runs' ids start with 24 zeros.
    let error = graph.resolve(&tracking, &"0".repeat(24)).unwrap_err();
    assert!(error.message.contains("names 2 nodes"), "{error}");
    assert_eq!(graph.resolve(&tracking, "job:7").unwrap(), format!("run:{:032x}", 7));
    assert!(
        Direction::parse("sideways")
            .unwrap_err()
            .message
            .contains("expected upstream, downstream or both")
    );
}

#[test]
fn a_materialization_runs_from_its_view_version_to_the_online_table() {
    let (mut tracking, run_id, digest) = store();
    let materialization = format!("{:032x}", 9);
    let tags = [
        (EXECUTION_TAG.to_string(), MATERIALIZATION.to_string()),
        (FEATURE_VIEWS_TAG.to_string(), "digit_pixels@2".to_string()),
    ];
    tracking
        .create_run(&materialization, "0", "materialize digit_pixels@2", "kiln", 7, &tags)
        .unwrap();
    let batch = LogBatch {
        params: vec![
            ("view".into(), "digit_pixels".into()),
            ("rows_applied".into(), "1797".into()),
        ],
        ..LogBatch::default()
    };
    tracking.log_batch(&materialization, &batch).unwrap();
    let graph = Graph::of(&tracking);
    let start = graph.resolve(&tracking, "view:digit_pixels@2").unwrap();
    let downstream = graph.around(&start, Direction::Downstream);
    let run = &downstream.nodes[&format!("run:{materialization}")];
    assert_eq!(run.kind, Kind::Run);
    assert_eq!(run.attributes["execution"], MATERIALIZATION);
    assert_eq!(run.attributes["param.rows_applied"], "1797");
    assert!(
        run.label.starts_with("materialization of digit_pixels@2"),
        "{}",
        run.label
    );
    assert_eq!(downstream.nodes["online:digit_pixels"].kind, Kind::OnlineTable);
    // The same view version also fed the training set, and through it the model.
    for id in [
        format!("dataset:{digest}"),
        format!("run:{run_id}"),
        "model:digits/1".into(),
    ] {
        assert!(
            downstream.nodes.contains_key(&id),
            "{id} missing: {:?}",
            ids(&downstream)
        );
    }
    let edges: Vec<(&str, &str)> = downstream
        .edges
        .iter()
        .map(|edge| (edge.from.as_str(), edge.to.as_str()))
        .collect();
    let run_node = format!("run:{materialization}");
    assert!(edges.contains(&("view:digit_pixels@2", run_node.as_str())), "{edges:?}");
    assert!(edges.contains(&(run_node.as_str(), "online:digit_pixels")), "{edges:?}");
    // Upstream of the online table: the materialization and the view version, not the training run.
    let upstream = graph.around("online:digit_pixels", Direction::Upstream);
    assert_eq!(
        ids(&upstream),
        ["online:digit_pixels", run_node.as_str(), "view:digit_pixels@2"]
    );
    assert!(
        upstream
            .to_dot("online:digit_pixels")
            .contains("\"view:digit_pixels@2\" -> \"run:")
    );
}
