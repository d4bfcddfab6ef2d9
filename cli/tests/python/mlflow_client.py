"""Kiln's MLflow tracking API through the stock `mlflow` client (mlflow-skinny), unchanged.

Usage:
  mlflow_client.py log URI      logs experiment "digits" with runs lr-0.1 (finished, with artifacts: a
                                notes file and a model directory) and lr-0.3 (failed); registers the model
                                of lr-0.1 as digits-mlp version 1 and points alias champion at it
  mlflow_client.py check URI    reads them back (another node, after a failover): runs, searches, artifact
                                downloads, the registry; logs more, and checks that errors come back as
                                MLflow's error codes
Prints "all mlflow checks passed" at the end of each mode.
"""

import os
import sys
import tempfile

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
                continue
            # Artifacts through the proxy: a file, a text, and a directory with a binary file.
            with tempfile.TemporaryDirectory() as directory:
                notes = os.path.join(directory, "notes.txt")
                with open(notes, "w") as file:
                    file.write("trained on digits\n")
                mlflow.log_artifact(notes)
                model = os.path.join(directory, "model")
                os.makedirs(model)
                with open(os.path.join(model, "weights.bin"), "wb") as file:
                    file.write(bytes(range(256)) * 4096)
                mlflow.log_artifacts(model, artifact_path="model")
            mlflow.log_dict({"hidden": [256, 256]}, "model/config.json")
            source = run.info.artifact_uri + "/model"
            assert source.startswith("mlflow-artifacts:/"), source

    # The registry: a model, a version made from the run's model directory, an alias.
    client.create_registered_model("digits-mlp", tags={"task": "classification"}, description="digits MLP")
    best = [r for r in client.search_runs([mlflow.get_experiment_by_name("digits").experiment_id]) if r.info.run_name == "lr-0.1"][0]
    version = client.create_model_version("digits-mlp", best.info.artifact_uri + "/model", best.info.run_id)
    assert version.version == "1" and version.status == "READY", version
    client.set_registered_model_alias("digits-mlp", "champion", "1")
    refused(lambda: client.set_registered_model_alias("digits-mlp", "latest", "1"), "INVALID_PARAMETER_VALUE", "reserved")
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
    # Artifacts read back through another node: listed (with extras/, which `kiln artifacts put` added
    # between the two modes), downloaded whole.
    listed = sorted((f.path, f.is_dir) for f in client.list_artifacts(best.info.run_id))
    assert listed == [("extras", True), ("model", True), ("notes.txt", False)], listed
    extras = [(f.path, f.is_dir) for f in client.list_artifacts(best.info.run_id, "extras")]
    assert extras == [("extras/extra.txt", False)], extras
    listed = sorted((f.path, f.file_size) for f in client.list_artifacts(best.info.run_id, "model"))
    assert [path for path, _ in listed] == ["model/config.json", "model/weights.bin"], listed
    assert listed[1][1] == 1048576 and listed[0][1] > 0, listed
    with tempfile.TemporaryDirectory() as directory:
        local = mlflow.artifacts.download_artifacts(run_id=best.info.run_id, artifact_path="model", dst_path=directory)
        with open(os.path.join(local, "weights.bin"), "rb") as file:
            assert file.read() == bytes(range(256)) * 4096
        notes = mlflow.artifacts.download_artifacts(run_id=best.info.run_id, artifact_path="notes.txt", dst_path=directory)
        assert open(notes).read() == "trained on digits\n"
    assert mlflow.artifacts.load_dict(best.info.artifact_uri + "/model/config.json") == {"hidden": [256, 256]}

    # MLflow 3's logged models: made, finalized, found by the run that made them.
    logged = client.create_logged_model(experiment.experiment_id, name="digits-net", source_run_id=best.info.run_id, params={"hidden": "256"})
    assert logged.status == "PENDING" and logged.artifact_location.endswith(f"/models/{logged.model_id}/artifacts"), logged
    client.finalize_logged_model(logged.model_id, "READY")
    found = client.search_logged_models([experiment.experiment_id], filter_string="name = 'digits-net'")
    assert [(m.model_id, str(m.status)) for m in found] == [(logged.model_id, "READY")], found
    assert client.get_logged_model(logged.model_id).params == {"hidden": "256"}
    # A metric logged for the model (MLflow 3's model_id) is the model's as well as the run's.
    client.log_metric(best.info.run_id, "holdout_accuracy", 0.97, step=3, model_id=logged.model_id, dataset_name="digits", dataset_digest="abc123")
    metrics = client.get_logged_model(logged.model_id).metrics
    assert [(m.key, m.value, m.step, m.run_id, m.dataset_name, m.dataset_digest) for m in metrics] == [
        ("holdout_accuracy", 0.97, 3, best.info.run_id, "digits", "abc123")
    ], metrics
    assert client.get_run(best.info.run_id).data.metrics["holdout_accuracy"] == 0.97
    found = client.search_logged_models([experiment.experiment_id], filter_string="metrics.holdout_accuracy > 0.9")
    assert [m.model_id for m in found] == [logged.model_id], found
    assert client.search_logged_models([experiment.experiment_id], filter_string="metrics.holdout_accuracy > 0.99") == []

    # The registry: the alias resolves, searches find the model and its version, a second version and stages.
    champion = client.get_model_version_by_alias("digits-mlp", "champion")
    assert champion.version == "1" and champion.run_id == best.info.run_id, champion
    # challenger was added between the two modes by `kiln models alias`.
    assert champion.source == best.info.artifact_uri + "/model", champion
    assert champion.aliases == ["challenger", "champion"], champion
    model = client.get_registered_model("digits-mlp")
    assert model.description == "digits MLP" and model.tags == {"task": "classification"}, model
    assert model.aliases == {"champion": "1", "challenger": "1"}, model.aliases
    assert [m.name for m in client.search_registered_models(filter_string="name LIKE 'digits%'")] == ["digits-mlp"]
    second = client.create_model_version("digits-mlp", champion.source, best.info.run_id)
    assert second.version == "2", second
    client.transition_model_version_stage("digits-mlp", "2", "Production")
    versions = client.search_model_versions(f"run_id = '{best.info.run_id}'")
    assert sorted(v.version for v in versions) == ["1", "2"], versions
    assert [v.version for v in client.get_latest_versions("digits-mlp", stages=["Production"])] == ["2"]
    client.set_registered_model_alias("digits-mlp", "champion", "2")
    assert client.get_model_version_by_alias("digits-mlp", "champion").version == "2"
    assert client.get_model_version_download_uri("digits-mlp", "1") == champion.source
    refused(lambda: client.get_model_version_by_alias("digits-mlp", "nope"), "RESOURCE_DOES_NOT_EXIST", "no alias 'nope'")
    refused(lambda: client.get_registered_model("nope"), "RESOURCE_DOES_NOT_EXIST", "no registered model is named 'nope'")
    refused(lambda: client.create_registered_model("digits-mlp"), "RESOURCE_ALREADY_EXISTS", "already exists")
    refused(
        lambda: client.create_model_version("digits-mlp", champion.source, "f" * 32),
        "RESOURCE_DOES_NOT_EXIST",
        "no run has id",
    )

    mlflow.create_experiment("digits-asha", tags={"team": "vision"})
    named = [e.name for e in mlflow.search_experiments(filter_string="name LIKE 'digits%'", order_by=["name DESC"])]
    assert named == ["digits-asha", "digits"], named
    tagged = [e.name for e in mlflow.search_experiments(filter_string="tags.team = 'vision'")]
    assert tagged == ["digits-asha"], tagged
    print("all mlflow checks passed")

else:
    sys.exit(f"unknown mode {mode}")
