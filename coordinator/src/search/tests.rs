use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

#[derive(Debug, Default, Clone)]
struct Run {
    id: String,
    name: Option<String>,
    status: String,
    start: Option<i64>,
    end: Option<i64>,
    metrics: BTreeMap<String, f64>,
    params: BTreeMap<String, String>,
    tags: BTreeMap<String, String>,
}

impl SearchableRun for Run {
    fn metric(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).copied()
    }
    fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
    fn text_attribute(&self, attribute: TextAttribute) -> Option<&str> {
        match attribute {
            TextAttribute::RunId => Some(&self.id),
            TextAttribute::RunName => self.name.as_deref(),
            TextAttribute::Status => Some(&self.status),
            TextAttribute::ArtifactUri | TextAttribute::UserId => None,
        }
    }
    fn time_attribute(&self, attribute: TimeAttribute) -> Option<i64> {
        match attribute {
            TimeAttribute::StartTime => self.start,
            TimeAttribute::EndTime => self.end,
        }
    }
}

fn run(id: &str, start: i64, accuracy: Option<f64>, lr: &str, team: Option<&str>) -> Run {
    Run {
        id: id.into(),
        name: Some(format!("run-{id}")),
        status: if accuracy.is_some() { "FINISHED" } else { "RUNNING" }.into(),
        start: Some(start),
        end: accuracy.map(|_| start + 1000),
        metrics: accuracy
            .map(|value| ("accuracy".to_string(), value))
            .into_iter()
            .collect(),
        params: [("lr".to_string(), lr.to_string())].into(),
        tags: team
            .map(|team| {
                [
                    ("team".to_string(), team.to_string()),
                    ("mlflow.runName".to_string(), format!("run-{id}")),
                ]
                .into()
            })
            .unwrap_or_default(),
    }
}

fn runs() -> Vec<Run> {
    vec![
        run("a", 1_000, Some(0.91), "0.01", Some("vision")),
        run("b", 2_000, Some(0.85), "0.1", Some("Vision-Core")),
        run("c", 3_000, None, "0.01", None),
        run("d", 4_000, Some(0.97), "0.001", Some("speech")),
    ]
}

fn matching(filter: &str) -> Vec<String> {
    let filter = Filter::parse(filter).unwrap_or_else(|error| panic!("{filter}: {error}"));
    runs()
        .into_iter()
        .filter(|run| filter.matches(run))
        .map(|run| run.id)
        .collect()
}

#[test]
fn filters_select_runs_as_mlflow_does() {
    assert_eq!(matching(""), ["a", "b", "c", "d"]);
    assert_eq!(matching("   "), ["a", "b", "c", "d"]);
    assert_eq!(matching("metrics.accuracy > 0.9"), ["a", "d"]);
    assert_eq!(matching("metric.accuracy >= 0.85 and params.lr = '0.01'"), ["a"]);
    // A run without the metric matches no clause on it, != included.
    assert_eq!(matching("metrics.accuracy != 0.91"), ["b", "d"]);
    assert_eq!(matching("metrics.accuracy <= 9e-1"), ["b"]);
    assert_eq!(matching("params.lr != \"0.01\""), ["b", "d"]);
    assert_eq!(matching("tags.team LIKE 'vis%'"), ["a"]);
    assert_eq!(matching("tags.team ILIKE 'vis%'"), ["a", "b"]);
    assert_eq!(matching("tags.team LIKE '_peech'"), ["d"]);
    assert_eq!(matching("tags.mlflow.runName = 'run-d'"), ["d"]);
    assert_eq!(matching("tags.`mlflow.runName` = 'run-a'"), ["a"]);
    assert_eq!(matching("attributes.status = 'RUNNING'"), ["c"]);
    assert_eq!(matching("attribute.run_id IN ('a', 'c', 'zz')"), ["a", "c"]);
    assert_eq!(matching("run.run_id NOT IN ('a','c')"), ["b", "d"]);
    assert_eq!(
        matching("attributes.start_time > 1500 AND attributes.end_time < 5000"),
        ["b"]
    );
    assert_eq!(
        matching("attributes.start_time > 1500 AND attributes.end_time <= 5000"),
        ["b", "d"]
    );
    assert_eq!(matching("attributes.created <= 1000"), ["a"]);
    assert_eq!(matching("attributes.run_name ILIKE 'RUN-_'"), ["a", "b", "c", "d"]);
    assert_eq!(matching("metrics.`accuracy` > 0.95"), ["d"]);
    assert_eq!(matching("metrics.\"accuracy\" < 0.9"), ["b"]);
}

#[test]
fn bad_filters_name_what_is_wrong() {
    let refused = |filter: &str, expected: &str| {
        let error = Filter::parse(filter).unwrap_err().to_string();
        assert!(error.contains(expected), "{filter}: {error}");
    };
    refused("accuracy > 0.9", "expected metrics.accuracy, params.accuracy");
    refused("metrics.accuracy > 'high'", "expected a number");
    refused("params.lr = 0.01", "expected a quoted string");
    refused("params.lr > '0.01'", "compares numbers (expected =, !=, LIKE or ILIKE)");
    refused("metrics.accuracy LIKE '9%'", "compares text");
    refused("metrics.accuracy IN ('1')", "IN works on the text attributes");
    refused("metrics.accuracy > 0.9 and", "ends after AND");
    refused("metrics.accuracy > 0.9 OR params.lr = '1'", "OR is not supported");
    refused("metrics.accuracy > 0.9 params.lr = '1'", "follows a complete clause");
    refused("params.lr = 'open", "never closed");
    refused("datasets.name = 'x'", "'datasets' is not something a run has");
    refused("attributes.lifecycle = 'x'", "attribute 'lifecycle' cannot be searched");
    refused("metrics.accuracy ~ 1", "is not part of a search");
    refused("metrics.accuracy", "where a comparator was expected");
    refused("attributes.run_id IN 'a'", "IN takes a list");
    refused("attributes.run_id NOT ('a')", "NOT must be followed by IN");
}

fn ordered(orders: &[&str]) -> Vec<String> {
    let orders: Vec<Order> = orders.iter().map(|text| Order::parse(text).unwrap()).collect();
    let all = runs();
    let mut keyed: Vec<&_> = all.iter().collect();
    sort(&orders, &mut keyed);
    let mut runs = all.clone();
    runs.sort_by(|a, b| compare(&orders, a, b));
    let ids: Vec<String> = runs.into_iter().map(|run| run.id).collect();
    let keyed: Vec<String> = keyed.into_iter().map(|run| run.id.clone()).collect();
    assert_eq!(keyed, ids, "sort reads each key once and orders as compare does");
    ids
}

#[test]
fn orderings_put_missing_values_last_and_break_ties_by_newest() {
    assert_eq!(ordered(&["metrics.accuracy DESC"]), ["d", "a", "b", "c"]);
    assert_eq!(ordered(&["metrics.accuracy"]), ["b", "a", "d", "c"]);
    assert_eq!(ordered(&["metrics.accuracy asc"]), ["b", "a", "d", "c"]);
    // Equal params: the newer run first.
    assert_eq!(ordered(&["params.lr ASC"]), ["d", "c", "a", "b"]);
    assert_eq!(
        ordered(&["tags.team DESC", "attributes.start_time"]),
        ["a", "d", "b", "c"]
    );
    assert_eq!(ordered(&[]), ["d", "c", "b", "a"]);
    let error = Order::parse("metrics.accuracy sideways").unwrap_err().to_string();
    assert!(error.contains("expected ASC or DESC"), "{error}");
    let error = Order::parse("metrics.accuracy DESC, params.lr")
        .unwrap_err()
        .to_string();
    assert!(error.contains("give each key its own order_by entry"), "{error}");
}

/// LIKE by brute force: try every way to split the text among the pattern's wildcards.
fn like_reference(text: &[char], pattern: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('%', rest)) => (0..=text.len()).any(|skip| like_reference(&text[skip..], rest)),
        Some(('_', rest)) => !text.is_empty() && like_reference(&text[1..], rest),
        Some((literal, rest)) => text.first() == Some(literal) && like_reference(&text[1..], rest),
    }
}

proptest! {
    #[test]
    fn like_matches_the_brute_force_rule(text in "[ab%_]{0,8}", pattern in "[ab%_]{0,6}") {
        let text_chars: Vec<char> = text.chars().collect();
        let pattern_chars: Vec<char> = pattern.chars().collect();
        prop_assert_eq!(like(&text, &pattern, false), like_reference(&text_chars, &pattern_chars));
    }
}

#[test]
fn experiment_searches_take_mlflows_experiment_keys() {
    #[derive(Debug)]
    struct Experiment(&'static str, &'static str, i64, Option<&'static str>);
    impl SearchableRun for Experiment {
        fn metric(&self, _: &str) -> Option<f64> {
            None
        }
        fn param(&self, _: &str) -> Option<&str> {
            None
        }
        fn tag(&self, key: &str) -> Option<&str> {
            (key == "team").then_some(self.3).flatten()
        }
        fn text_attribute(&self, attribute: TextAttribute) -> Option<&str> {
            match attribute {
                TextAttribute::RunName => Some(self.1),
                TextAttribute::RunId => Some(self.0),
                _ => None,
            }
        }
        fn time_attribute(&self, attribute: TimeAttribute) -> Option<i64> {
            (attribute == TimeAttribute::StartTime).then_some(self.2)
        }
    }
    let experiments = [
        Experiment("0", "Default", 1, None),
        Experiment("1", "digits", 2, Some("vision")),
        Experiment("2", "digits-asha", 3, Some("vision")),
    ];
    let found = |filter: &str, order: &[&str]| -> Vec<&str> {
        let filter = Filter::parse_experiments(filter).unwrap();
        let orders: Vec<Order> = order
            .iter()
            .map(|text| Order::parse_experiments(text).unwrap())
            .collect();
        let mut matched: Vec<&Experiment> = experiments.iter().filter(|e| filter.matches(*e)).collect();
        matched.sort_by(|a, b| compare(&orders, *a, *b));
        matched.into_iter().map(|experiment| experiment.1).collect()
    };
    assert_eq!(found("name LIKE 'digits%'", &["name ASC"]), ["digits", "digits-asha"]);
    assert_eq!(found("attribute.name = 'digits'", &[]), ["digits"]);
    assert_eq!(
        found("tags.team = 'vision' and creation_time > 2", &[]),
        ["digits-asha"]
    );
    assert_eq!(found("", &[]), ["digits-asha", "digits", "Default"]);
    assert_eq!(
        found("experiment_id IN ('0', '2')", &["creation_time"]),
        ["Default", "digits-asha"]
    );
    let error = Filter::parse_experiments("metrics.loss > 1").unwrap_err().to_string();
    assert!(error.contains("experiments have no 'metrics'"), "{error}");
    let error = Filter::parse_experiments("status = 'x'").unwrap_err().to_string();
    assert!(error.contains("experiments cannot be searched by 'status'"), "{error}");
}
