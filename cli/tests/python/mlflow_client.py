"""Kiln's MLflow tracking API through the stock `mlflow` client (mlflow-skinny), unchanged.

Usage:
  mlflow_client.py log URI      logs experiment "digits" with runs lr-0.1 (finished) and lr-0.3 (failed)
  mlflow_client.py check URI    reads them back (another node, after a failover), searches, logs more, and
                                checks that errors come back as MLflow's error codes
Prints "all mlflow checks passed" at the end of each mode.
"""

import sys

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

mode, uri = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
client = MlflowClient(uri)


def refused(call, code, words):
    try:
        call()
    except MlflowException as error:
        assert error.error_code == code, (error.error_code, str(error))
        assert words in str(error), str(error)
    else:
        raise AssertionError(f"accepted; expected {code}")


if mode == "log":
    mlflow.set_experiment("digits")
    for lr, accuracy, status in [(0.1, 0.93, "FINISHED"), (0.3, 0.71, "FAILED")]:
        with mlflow.start_run(run_name=f"lr-{lr}") as run:
            mlflow.log_param("lr", lr)
            mlflow.log_params({"epochs": 3, "batch": 64})
            for step in range(3):
                mlflow.log_metric("loss", 1.0 / (step + 1) + lr, step=step)
            mlflow.log_metrics({"accuracy": accuracy})
            mlflow.set_tags({"team": "vision", "lr-tag": str(lr)})
            if status == "FAILED":
                mlflow.end_run(status="FAILED")
    print("all mlflow checks passed")

elif mode == "check":
    experiment = mlflow.get_experiment_by_name("digits")
    assert experiment is not None and experiment.lifecycle_stage == "active", experiment
    runs = client.search_runs([experiment.experiment_id], order_by=["metrics.accuracy DESC"])
    assert [run.info.run_name for run in runs] == ["lr-0.1", "lr-0.3"], runs
    best = runs[0]
    assert best.info.status == "FINISHED" and runs[1].info.status == "FAILED", runs
    assert best.data.params == {"lr": "0.1", "epochs": "3", "batch": "64"}, best.data.params
    assert best.data.metrics["accuracy"] == 0.93 and best.data.tags["team"] == "vision", best.data
    history = client.get_metric_history(best.info.run_id, "loss")
    assert [(point.step, round(point.value, 6)) for point in history] == [(0, 1.1), (1, 0.6), (2, 0.433333)], history
    assert best.data.metrics["loss"] == history[-1].value

    # Search: filters, ordering, and the run's own fields.
    found = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string="metrics.accuracy > 0.8 and params.lr = '0.1' and tags.team LIKE 'vis%'",
        output_format="list",
    )
    assert [run.info.run_id for run in found] == [best.info.run_id], found
    found = mlflow.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FAILED'", output_format="list")
    assert [run.info.run_name for run in found] == ["lr-0.3"], found
    assert client.get_run(best.info.run_id).info.artifact_uri.endswith(f"/{best.info.run_id}/artifacts")

    # More writes after the failover, and deletes that search honours.
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="lr-0.2") as run:
        mlflow.log_metric("accuracy", 0.88)
    client.delete_run(runs[1].info.run_id)
    names = [run.info.run_name for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])]
    assert names == ["lr-0.1", "lr-0.2"], names

    # Errors are MLflow's, with messages that name the problem.
    refused(lambda: client.get_run("0" * 32), "RESOURCE_DOES_NOT_EXIST", "no run has id")
    refused(lambda: client.create_experiment("digits"), "RESOURCE_ALREADY_EXISTS", "already exists")
    refused(lambda: client.log_param(best.info.run_id, "lr", "0.5"), "INVALID_PARAMETER_VALUE", "cannot change value")
    refused(
        lambda: client.search_runs([experiment.experiment_id], filter_string="accuracy > 0.5"),
        "INVALID_PARAMETER_VALUE",
        "expected metrics.accuracy",
    )
    assert mlflow.get_experiment_by_name("nope") is None
    mlflow.create_experiment("digits-asha", tags={"team": "vision"})
    named = [e.name for e in mlflow.search_experiments(filter_string="name LIKE 'digits%'", order_by=["name DESC"])]
    assert named == ["digits-asha", "digits"], named
    tagged = [e.name for e in mlflow.search_experiments(filter_string="tags.team = 'vision'")]
    assert tagged == ["digits-asha"], tagged
    print("all mlflow checks passed")

else:
    sys.exit(f"unknown mode {mode}")
