use super::*;

fn id(n: u32) -> String {
    format!("{n:032x}")
}

fn point(value: f64, timestamp_ms: i64, step: i64) -> MetricPoint {
    MetricPoint {
        value,
        timestamp_ms,
        step,
    }
}

fn batch(metrics: &[(&str, MetricPoint)], params: &[(&str, &str)], tags: &[(&str, &str)]) -> LogBatch {
    LogBatch {
        metrics: metrics.iter().map(|(key, point)| (key.to_string(), *point)).collect(),
        params: params
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
        tags: tags
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
    }
}

fn search(tracking: &Tracking, experiments: &[&str], filter: &str, order: &[&str], max: usize) -> Vec<String> {
    let page = tracking
        .search_runs(&RunSearch {
            experiment_ids: experiments.iter().map(|id| id.to_string()).collect(),
            filter: Filter::parse(filter).unwrap(),
            order_by: order.iter().map(|text| Order::parse(text).unwrap()).collect(),
            max_results: max,
            ..RunSearch::default()
        })
        .unwrap();
    page.runs.into_iter().map(|run| run.name).collect()
}

#[test]
fn experiments_have_unique_names_and_the_default_always_exists() {
    let mut tracking = Tracking::new("file:///artifacts/", 1_000);
    assert_eq!(tracking.experiment_by_name("Default").unwrap().id, "0");
    assert_eq!(
        tracking.experiment("0").unwrap().artifact_location,
        "file:///artifacts/0"
    );
    let digits = tracking
        .create_experiment("digits", None, "file:///artifacts", &[], 2_000)
        .unwrap();
    assert_eq!(digits, "1");
    let error = tracking
        .create_experiment("digits", None, "file:///artifacts", &[], 3_000)
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::ResourceAlreadyExists);
    assert!(
        error.message.contains("experiment 'digits' already exists (id 1)"),
        "{error}"
    );
    assert_eq!(
        tracking
            .create_experiment(" ", None, "file:///artifacts", &[], 0)
            .unwrap_err()
            .code,
        ErrorCode::InvalidParameterValue
    );

    // Deleted names stay taken; a deleted experiment takes no runs until restored.
    tracking.set_experiment_stage(&digits, true, 4_000).unwrap();
    assert_eq!(
        tracking
            .create_experiment("digits", None, "file:///artifacts", &[], 5_000)
            .unwrap_err()
            .code,
        ErrorCode::ResourceAlreadyExists
    );
    let error = tracking
        .create_run(&id(1), &digits, "r", "ada", 5_000, &[])
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidState);
    tracking.set_experiment_stage(&digits, false, 6_000).unwrap();
    tracking.create_run(&id(1), &digits, "r", "ada", 6_000, &[]).unwrap();
    assert_eq!(
        tracking.set_experiment_stage("0", true, 0).unwrap_err().code,
        ErrorCode::InvalidParameterValue
    );

    tracking.rename_experiment(&digits, "mnist", 7_000).unwrap();
    assert_eq!(tracking.experiment_by_name("mnist").unwrap().id, digits);
    assert!(tracking.experiment_by_name("digits").is_err());
    assert_eq!(
        tracking.rename_experiment(&digits, "Default", 0).unwrap_err().code,
        ErrorCode::ResourceAlreadyExists
    );
    assert_eq!(
        tracking.experiment("99").unwrap_err().code,
        ErrorCode::ResourceDoesNotExist
    );
}

#[test]
fn runs_log_batches_all_or_nothing_and_keep_metric_histories() {
    let mut tracking = Tracking::new("file:///a", 0);
    let run = tracking
        .create_run(
            &id(7),
            "0",
            "",
            "ada",
            1_000,
            &[("mlflow.runName".into(), "first".into())],
        )
        .unwrap();
    assert_eq!((run.name.as_str(), run.status), ("first", RunStatus::Running));
    assert_eq!(run.artifact_uri, format!("file:///a/0/{}/artifacts", id(7)));
    assert_eq!(
        tracking.create_run(&id(7), "0", "x", "", 0, &[]).unwrap_err().code,
        ErrorCode::ResourceAlreadyExists
    );
    assert_eq!(
        tracking.create_run("not-hex", "0", "x", "", 0, &[]).unwrap_err().code,
        ErrorCode::InvalidParameterValue
    );

    tracking
        .log_batch(
            &id(7),
            &batch(
                &[
                    ("loss", point(0.9, 10, 0)),
                    ("loss", point(0.5, 20, 1)),
                    ("loss", point(0.7, 15, 0)),
                ],
                &[("lr", "0.01"), ("lr", "0.01")],
                &[("team", "vision")],
            ),
        )
        .unwrap();
    let history = tracking.metric_history(&id(7), "loss").unwrap();
    assert_eq!(
        history.iter().map(|point| point.value).collect::<Vec<_>>(),
        [0.9, 0.5, 0.7]
    );
    // The latest value is the highest step's, not the last logged.
    assert_eq!(tracking.run(&id(7)).unwrap().latest["loss"].value, 0.5);

    // A param cannot change; the whole batch is refused and nothing in it lands.
    let before = tracking.clone();
    let error = tracking
        .log_batch(&id(7), &batch(&[("loss", point(0.1, 30, 2))], &[("lr", "0.1")], &[]))
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidParameterValue);
    assert!(
        error.message.contains("param 'lr'") && error.message.contains("already '0.01'"),
        "{error}"
    );
    assert_eq!(tracking, before);
    let error = tracking
        .log_batch(&id(7), &batch(&[], &[("a", "1"), ("a", "2")], &[]))
        .unwrap_err();
    assert!(error.message.contains("param 'a'"), "{error}");
    let error = tracking
        .log_batch(&id(7), &batch(&[("../x", point(1.0, 0, 0))], &[], &[]))
        .unwrap_err();
    assert!(
        error.message.contains("'.' or '..'") || error.message.contains("contains"),
        "{error}"
    );
    let long = "x".repeat(6_001);
    let error = tracking
        .log_batch(&id(7), &batch(&[], &[("big", &long)], &[]))
        .unwrap_err();
    assert!(error.message.contains("at most 6000"), "{error}");
    let many: Vec<(String, MetricPoint)> = (0..1_001).map(|step| ("m".to_string(), point(1.0, 0, step))).collect();
    let error = tracking
        .log_batch(
            &id(7),
            &LogBatch {
                metrics: many,
                ..LogBatch::default()
            },
        )
        .unwrap_err();
    assert!(error.message.contains("at most 1000 per batch"), "{error}");
    assert_eq!(tracking, before);

    // Tags overwrite; the run name follows its tag; a finished run has its end time.
    tracking
        .log_batch(
            &id(7),
            &batch(&[], &[], &[("team", "speech"), ("mlflow.runName", "renamed")]),
        )
        .unwrap();
    let run = tracking
        .update_run(&id(7), Some(RunStatus::Finished), Some(2_000), None)
        .unwrap();
    assert_eq!((run.tags["team"].as_str(), run.name.as_str()), ("speech", "renamed"));
    assert_eq!((run.status, run.end_time_ms), (RunStatus::Finished, Some(2_000)));
    assert_eq!(
        tracking.update_run(&id(7), None, Some(10), None).unwrap_err().code,
        ErrorCode::InvalidParameterValue
    );
    tracking.delete_tag(&id(7), "team").unwrap();
    assert_eq!(
        tracking.delete_tag(&id(7), "team").unwrap_err().code,
        ErrorCode::ResourceDoesNotExist
    );

    // A deleted run takes no writes until restored.
    tracking.set_run_stage(&id(7), true).unwrap();
    assert_eq!(
        tracking.log_batch(&id(7), &LogBatch::default()).unwrap_err().code,
        ErrorCode::InvalidState
    );
    tracking.set_run_stage(&id(7), false).unwrap();
    tracking.log_batch(&id(7), &LogBatch::default()).unwrap();
    assert!(
        RunStatus::parse("DONE")
            .unwrap_err()
            .message
            .contains("expected RUNNING")
    );
}

#[test]
fn searches_filter_order_and_page_through_runs() {
    let mut tracking = Tracking::new("file:///a", 0);
    let other = tracking.create_experiment("other", None, "file:///a", &[], 0).unwrap();
    for n in 0..7u32 {
        let experiment = if n == 6 { other.as_str() } else { "0" };
        tracking
            .create_run(&id(n), experiment, &format!("run{n}"), "ada", i64::from(n) * 100, &[])
            .unwrap();
        if n % 2 == 0 {
            let accuracy = 0.5 + f64::from(n) / 20.0;
            tracking
                .log_batch(
                    &id(n),
                    &batch(&[("accuracy", point(accuracy, 0, 0))], &[("even", "yes")], &[]),
                )
                .unwrap();
        }
    }
    assert_eq!(
        search(&tracking, &["0"], "", &[], 100),
        ["run5", "run4", "run3", "run2", "run1", "run0"]
    );
    assert_eq!(
        search(
            &tracking,
            &["0", &other],
            "params.even = 'yes'",
            &["metrics.accuracy DESC"],
            100
        ),
        ["run6", "run4", "run2", "run0"]
    );
    assert_eq!(
        search(&tracking, &["0"], "metrics.accuracy > 0.55", &["metrics.accuracy"], 100),
        ["run2", "run4"]
    );

    // Pages of two, in order, until the token runs out.
    let mut names = Vec::new();
    let mut token = None;
    loop {
        let page = tracking
            .search_runs(&RunSearch {
                experiment_ids: vec!["0".into()],
                max_results: 2,
                page_token: token,
                ..RunSearch::default()
            })
            .unwrap();
        names.extend(page.runs.into_iter().map(|run| run.name));
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(names, ["run5", "run4", "run3", "run2", "run1", "run0"]);

    // Deleted runs show only when asked for.
    tracking.set_run_stage(&id(5), true).unwrap();
    assert_eq!(search(&tracking, &["0"], "", &[], 1), ["run4"]);
    let deleted = tracking
        .search_runs(&RunSearch {
            experiment_ids: vec!["0".into()],
            view: ViewType::DeletedOnly,
            max_results: 10,
            ..RunSearch::default()
        })
        .unwrap();
    assert_eq!(deleted.runs.len(), 1);

    let refused = |search: RunSearch, expected: &str| {
        let error = tracking.search_runs(&search).unwrap_err();
        assert!(error.message.contains(expected), "{error}");
    };
    refused(
        RunSearch {
            max_results: 10,
            ..RunSearch::default()
        },
        "at least one experiment id",
    );
    refused(
        RunSearch {
            experiment_ids: vec!["42".into()],
            max_results: 10,
            ..RunSearch::default()
        },
        "no experiment has id '42'",
    );
    refused(
        RunSearch {
            experiment_ids: vec!["0".into()],
            ..RunSearch::default()
        },
        "max_results 0 is out of range",
    );
    refused(
        RunSearch {
            experiment_ids: vec!["0".into()],
            max_results: 10,
            page_token: Some("abc".into()),
            ..RunSearch::default()
        },
        "page token 'abc'",
    );
}

#[test]
fn the_store_round_trips_through_a_snapshot_encoding() {
    let mut tracking = Tracking::new("file:///a", 0);
    tracking.create_run(&id(1), "0", "r", "ada", 0, &[]).unwrap();
    tracking
        .log_batch(
            &id(1),
            &batch(&[("loss", point(0.25, 1, 1))], &[("lr", "0.1")], &[("t", "v")]),
        )
        .unwrap();
    let bytes = bincode::serde::encode_to_vec(&tracking, bincode::config::standard()).unwrap();
    let (decoded, _): (Tracking, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    assert_eq!(decoded, tracking);
}

/// A store with run `id(1)` and the logged model `m-1` it made.
fn run_with_logged_model() -> Tracking {
    let mut tracking = Tracking::new("file:///a", 0);
    tracking.create_run(&id(1), "0", "train", "ada", 1_000, &[]).unwrap();
    let create = LoggedModelCommand::Create {
        model_id: "m-1".into(),
        experiment_id: "0".into(),
        name: "model".into(),
        model_type: String::new(),
        source_run_id: id(1),
        tags: vec![],
        params: vec![],
    };
    tracking.apply_logged_model(create, 1_001).unwrap();
    tracking
}

#[test]
fn a_run_records_the_logged_models_it_produced_once_each() {
    let mut tracking = run_with_logged_model();
    let outputs = |models: &[(&str, i64)]| models.iter().map(|(id, step)| (id.to_string(), *step)).collect();
    tracking.log_outputs(&id(1), outputs(&[("m-1", 0)])).unwrap();
    tracking
        .log_outputs(&id(1), outputs(&[("m-1", 0), ("m-1", 5)]))
        .unwrap();
    assert_eq!(
        tracking.outputs_of(&id(1)),
        [("m-1".to_string(), 0), ("m-1".to_string(), 5)]
    );
    // An unknown model or run changes nothing.
    let error = tracking
        .log_outputs(&id(1), outputs(&[("m-1", 6), ("m-2", 0)]))
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::ResourceDoesNotExist, "{}", error.message);
    assert!(error.message.contains("m-2"), "{}", error.message);
    assert_eq!(tracking.outputs_of(&id(1)).len(), 2);
    let error = tracking.log_outputs(&id(2), outputs(&[("m-1", 0)])).unwrap_err();
    assert_eq!(error.code, ErrorCode::ResourceDoesNotExist);
    assert!(tracking.outputs_of(&id(2)).is_empty());
}

#[test]
fn metrics_logged_for_a_logged_model_are_its_metrics_too_and_an_unknown_model_logs_nothing() {
    let mut tracking = run_with_logged_model();
    let logged = batch(
        &[("loss", point(0.5, 10, 1)), ("accuracy", point(0.9, 10, 1))],
        &[],
        &[],
    );
    let for_model = |model_id: &str| MetricModel {
        index: 1,
        model_id: model_id.into(),
        dataset_name: "digits".into(),
        dataset_digest: "ab".into(),
    };
    tracking
        .log_batch_for_models(&id(1), &logged, vec![for_model("m-1")])
        .unwrap();
    let metrics = tracking.model_metrics("m-1");
    assert_eq!(metrics.len(), 1);
    assert_eq!((metrics[0].key.as_str(), metrics[0].point.value), ("accuracy", 0.9));
    assert_eq!(
        (metrics[0].run_id.as_str(), metrics[0].dataset_name.as_str()),
        (id(1).as_str(), "digits")
    );
    // Both points are the run's as well.
    assert_eq!(tracking.run(&id(1)).unwrap().latest.len(), 2);
    let error = tracking
        .log_batch_for_models(
            &id(1),
            &batch(
                &[("loss", point(0.4, 11, 2)), ("accuracy", point(1.0, 11, 2))],
                &[],
                &[],
            ),
            vec![for_model("m-2")],
        )
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::ResourceDoesNotExist);
    assert_eq!(
        tracking.run(&id(1)).unwrap().metrics["loss"].len(),
        1,
        "nothing of the batch was logged"
    );

    // Logged models are found by the latest value of a metric logged for them.
    let found = |filter: &str| -> Vec<String> {
        let search = LoggedModelSearch {
            experiment_ids: vec!["0".into()],
            filter: Filter::parse_for(filter, crate::search::Subject::LoggedModels).unwrap(),
            order_by: vec![Order::parse_for("metrics.accuracy DESC", crate::search::Subject::LoggedModels).unwrap()],
            max_results: 10,
            page_token: None,
        };
        let (models, _) = tracking.search_logged_models(&search).unwrap();
        models.into_iter().map(|model| model.id).collect()
    };
    assert_eq!(found("metrics.accuracy > 0.5"), ["m-1"]);
    assert!(found("metrics.accuracy > 0.95").is_empty());
    assert!(
        found("metrics.loss > 0").is_empty(),
        "the run's loss is not the model's"
    );
}
