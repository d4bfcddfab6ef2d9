"""An ONNX model from another framework, registered through the stock mlflow client and served by Kiln.

Usage:
  onnx_model.py make DIRECTORY TRACKING_URI
      Fits a scikit-learn LogisticRegression on the first 1,500 of sklearn's digits, converts it with skl2onnx
      (input "pixels" FP32 [None, 64]; outputs "label" INT64 and "probabilities" FP32, no ZipMap), saves
      DIRECTORY/model.onnx, logs it as artifact "model" of a run, and registers it as "sk-digits" version 1;
      then logs it as an MLflow model with its signature (mlflow.onnx.log_model), registered as version 2,
      registers the run's model again as version 3, and loads version 2 back with mlflow.pyfunc.
  onnx_model.py check HTTP_ADDRESS GRPC_ADDRESS DIRECTORY
      Compares what Kiln serves (tritonclient.http and tritonclient.grpc) with onnxruntime on the held-out
      rows: the same labels, probabilities within 1e-5; the metadata read from the file.
  onnx_model.py make-typed DIRECTORY
      Writes two graphs made with onnx.helper: DIRECTORY/fp16.onnx (input "x" FP16 [None, 4], a MatMul and an
      Add in FP16, output "y" FP16 [None, 3]) and DIRECTORY/strings.onnx (input "color" STRING [None, 1],
      CategoryMapper to "index" INT64 and back to "name" STRING, unknown colors mapping to -1 and "unknown").
  onnx_model.py check-typed HTTP_ADDRESS GRPC_ADDRESS DIRECTORY
      Compares Kiln serving them as "half" and "colors" with onnxruntime, over tritonclient.http and
      tritonclient.grpc; a BYTES element that is not UTF-8 text is refused with an error naming it.
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

    # The same graph as an MLflow model (MLmodel, conda.yaml, model.onnx) with its signature, logged and
    # registered the MLflow 3 way: version 2's source is the logged model, models:/m-ID.
    import mlflow.onnx
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    outputs = {"label": classifier.predict(x[:5]), "probabilities": classifier.predict_proba(x[:5]).astype(np.float32)}
    signature = infer_signature({"pixels": x[:5]}, outputs)
    with mlflow.start_run(run_name="logistic-regression-logged"):
        info = mlflow.onnx.log_model(onnx_model, name="model", signature=signature, registered_model_name="sk-digits")
    assert str(info.registered_model_version) == "2", info.registered_model_version
    logged = client.get_model_version("sk-digits", "2")
    assert logged.source == info.model_uri and info.model_uri.startswith("models:/m-"), (logged.source, info.model_uri)
    # A model_id that is not the logged model the source names is refused, as MLflow's server does.
    from mlflow.exceptions import MlflowException

    try:
        client.create_model_version("sk-digits", info.model_uri, info.run_id, model_id="m-someone-else")
        raise AssertionError("a version whose model_id contradicts its source was made")
    except MlflowException as error:
        assert "must match" in str(error) and error.error_code == "INVALID_PARAMETER_VALUE", error
    # The stock client reads it back: the run lists the logged model as its output, so registering the
    # run's "model" finds it (version 3), and mlflow.pyfunc loads the version and predicts with onnxruntime.
    outputs = client.get_run(info.run_id).outputs.model_outputs
    assert [(output.model_id, output.step) for output in outputs] == [(info.model_id, 0)], outputs
    third = mlflow.register_model(f"runs:/{info.run_id}/model", "sk-digits")
    assert third.version == "3" and third.source == info.model_uri, (third.version, third.source)
    import onnxruntime

    rows = x[1500:1510]
    predicted = mlflow.pyfunc.load_model("models:/sk-digits/2").predict({"pixels": rows})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (expected,) = session.run(["label"], {"pixels": rows})
    assert list(predicted["label"]) == list(expected), (predicted["label"], expected)
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

elif mode == "make-typed":
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory = sys.argv[2]
    generator = np.random.default_rng(7)
    weights = numpy_helper.from_array(generator.uniform(-1, 1, (4, 3)).astype(np.float16), "w")
    bias = numpy_helper.from_array(generator.uniform(-1, 1, (3,)).astype(np.float16), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 3])],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(directory, "fp16.onnx"))

    colors = ["red", "green", "blue"]
    graph = helper.make_graph(
        [
            helper.make_node(
                "CategoryMapper", ["color"], ["index"], domain="ai.onnx.ml",
                cats_strings=colors, cats_int64s=[0, 1, 2], default_int64=-1,
            ),
            helper.make_node(
                "CategoryMapper", ["index"], ["name"], domain="ai.onnx.ml",
                cats_strings=colors, cats_int64s=[0, 1, 2], default_string="unknown",
            ),
        ],
        "colors",
        [helper.make_tensor_value_info("color", TensorProto.STRING, [None, 1])],
        [
            helper.make_tensor_value_info("index", TensorProto.INT64, [None, 1]),
            helper.make_tensor_value_info("name", TensorProto.STRING, [None, 1]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(directory, "strings.onnx"))
    print("all onnx checks passed")

elif mode == "check-typed":
    import onnxruntime
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http_address, grpc_address, directory = sys.argv[2:5]
    http = httpclient.InferenceServerClient(http_address)
    grpc = grpcclient.InferenceServerClient(grpc_address)

    def infer_both(model, inputs, datatype):
        """The model's outputs for each named numpy input, over REST and over gRPC."""
        results = []
        for client, module in ((http, httpclient), (grpc, grpcclient)):
            tensors = []
            for name, value in inputs.items():
                tensor = module.InferInput(name, list(value.shape), datatype)
                tensor.set_data_from_numpy(value)
                tensors.append(tensor)
            results.append(client.infer(model, tensors))
        return results

    # FP16 in and out: what onnxruntime computes, to FP16's precision.
    metadata = http.get_model_metadata("half")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP16", "shape": [-1, 4]}], metadata
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP16", "shape": [-1, 3]}], metadata
    session = onnxruntime.InferenceSession(os.path.join(directory, "fp16.onnx"), providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(11).uniform(-1, 1, (16, 4)).astype(np.float16)
    (expected,) = session.run(["y"], {"x": rows})
    for served in infer_both("half", {"x": rows}, "FP16"):
        y = served.as_numpy("y")
        assert y.dtype == np.float16 and y.shape == (16, 3), (y.dtype, y.shape)
        np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2)

    # Strings in and out.
    metadata = http.get_model_metadata("colors")
    assert metadata["inputs"] == [{"name": "color", "datatype": "BYTES", "shape": [-1, 1]}], metadata
    outputs = {output["name"]: output["datatype"] for output in metadata["outputs"]}
    assert outputs == {"index": "INT64", "name": "BYTES"}, outputs
    session = onnxruntime.InferenceSession(
        os.path.join(directory, "strings.onnx"), providers=["CPUExecutionProvider"]
    )
    colors = np.array([["red"], ["blue"], ["purple"], ["green"], [""]], dtype=object)
    expected_index, expected_name = session.run(["index", "name"], {"color": colors})
    assert expected_index.ravel().tolist() == [0, 2, -1, 1, -1], expected_index
    sent = np.array([[value.encode()] for value in colors.ravel()], dtype=object)
    for served in infer_both("colors", {"color": sent}, "BYTES"):
        assert np.array_equal(served.as_numpy("index"), expected_index), served.as_numpy("index")
        names = [value.decode() for value in served.as_numpy("name").ravel()]
        assert names == [str(value) for value in expected_name.ravel()], (names, expected_name)

    # A BYTES element that is not UTF-8 is the client's error, named, and the model serves on.
    bad = np.array([[b"red"], [b"\xff\xfe"]], dtype=object)
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        tensor = module.InferInput("color", [2, 1], "BYTES")
        tensor.set_data_from_numpy(bad)
        try:
            client.infer("colors", [tensor])
        except InferenceServerException as error:
            message = str(error)
            assert "color" in message and "element 1" in message and "UTF-8" in message, message
            # Refused as the request's fault before it joined a batch, not as the model failing.
            assert str(error.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), (error.status(), message)
        else:
            raise AssertionError("a non-UTF-8 string was accepted")
    (served, _) = infer_both("colors", {"color": sent[:1]}, "BYTES")
    assert served.as_numpy("index").ravel().tolist() == [0]
    print("all onnx checks passed")

else:
    sys.exit(f"unknown mode {mode!r}; expected make, check, make-typed or check-typed")
