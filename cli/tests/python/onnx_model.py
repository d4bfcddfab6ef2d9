"""An ONNX model from another framework, registered through the stock mlflow client and served by Kiln.

Usage:
  onnx_model.py make DIRECTORY TRACKING_URI
      Fits a scikit-learn LogisticRegression on the first 1,500 of sklearn's digits, converts it with skl2onnx
      (input "pixels" FP32 [None, 64]; outputs "label" INT64 and "probabilities" FP32, no ZipMap), saves
      DIRECTORY/model.onnx, logs it as artifact "model" of a run, and registers it as "sk-digits" version 1.
  onnx_model.py check HTTP_ADDRESS GRPC_ADDRESS DIRECTORY
      Compares what Kiln serves (tritonclient.http and tritonclient.grpc) with onnxruntime on the held-out
      rows: the same labels, probabilities within 1e-5; the metadata read from the file.
Prints "all onnx checks passed" at the end of each mode.
"""

import os
import sys

import numpy as np
from sklearn.datasets import load_digits

x, y = load_digits(return_X_y=True)
x = x.astype(np.float32)
mode = sys.argv[1]

if mode == "make":
    import mlflow
    from mlflow import MlflowClient
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    directory, uri = sys.argv[2], sys.argv[3]
    classifier = LogisticRegression(max_iter=3000).fit(x[:1500], y[:1500])
    onnx_model = convert_sklearn(
        classifier,
        initial_types=[("pixels", FloatTensorType([None, 64]))],
        options={id(classifier): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path = os.path.join(directory, "model.onnx")
    with open(path, "wb") as file:
        file.write(onnx_model.SerializeToString())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("sklearn")
    with mlflow.start_run(run_name="logistic-regression") as run:
        mlflow.log_param("max_iter", 3000)
        mlflow.log_metric("accuracy", float(classifier.score(x[1500:], y[1500:])))
        mlflow.log_artifact(path, artifact_path="model")
    client = MlflowClient(uri)
    client.create_registered_model("sk-digits")
    version = client.create_model_version("sk-digits", run.info.artifact_uri + "/model", run.info.run_id)
    assert version.version == "1", version
    print("all onnx checks passed")

elif mode == "check":
    import onnxruntime
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http_address, grpc_address, directory = sys.argv[2:5]
    rows = x[1500:]
    session = onnxruntime.InferenceSession(os.path.join(directory, "model.onnx"), providers=["CPUExecutionProvider"])
    expected_label, expected_probabilities = session.run(["label", "probabilities"], {"pixels": rows})

    http = httpclient.InferenceServerClient(http_address)
    grpc = grpcclient.InferenceServerClient(grpc_address)
    metadata = http.get_model_metadata("sk-digits")
    assert metadata["platform"] == "onnx_tract", metadata
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}], metadata
    outputs = {output["name"]: output for output in metadata["outputs"]}
    assert outputs["label"]["datatype"] == "INT64" and outputs["probabilities"]["datatype"] == "FP32", outputs
    assert outputs["probabilities"]["shape"] == [-1, 10], outputs

    tensor = httpclient.InferInput("pixels", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    result = http.infer("sk-digits", [tensor])
    grpc_tensor = grpcclient.InferInput("pixels", list(rows.shape), "FP32")
    grpc_tensor.set_data_from_numpy(rows)
    grpc_result = grpc.infer("sk-digits", [grpc_tensor])
    for served in (result, grpc_result):
        assert np.array_equal(served.as_numpy("label"), expected_label), (served.as_numpy("label"), expected_label)
        np.testing.assert_allclose(served.as_numpy("probabilities"), expected_probabilities, atol=1e-5)
    # Row by row, as clients send them, the same answers.
    for index in range(0, len(rows), 97):
        tensor = httpclient.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(rows[index : index + 1])
        label = http.infer("sk-digits", [tensor]).as_numpy("label")
        assert label[0] == expected_label[index], (index, label, expected_label[index])
    print("all onnx checks passed")

else:
    sys.exit(f"unknown mode {mode!r}; expected make or check")
