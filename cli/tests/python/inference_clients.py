"""Kiln's serving tier through the stock Triton clients (tritonclient.http and tritonclient.grpc), unchanged.

Usage:
  inference_clients.py HTTP_ADDRESS GRPC_ADDRESS MODEL DIGITS_CSV [METRICS_ADDRESS or -]

Against a served digits classifier: server and model health, model metadata over both protocols, inference
over both (binary and JSON tensors over HTTP, raw contents over gRPC) agreeing with each other, softmax
probabilities whose argmax is the label, accuracy on the first 300 rows, protocol errors that name what is
wrong (a wrong shape, a wrong datatype, an unknown model, version or output), and the Prometheus metrics in
the OpenMetrics format. Prints "all inference checks passed" at the end.
"""

import sys
import urllib.request

import digits_rows
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

http_address, grpc_address, model, dataset = sys.argv[1:5]
# Where to read the Prometheus metrics ("-": not checked, as behind a router whose replicas count apart).
metrics_address = sys.argv[5] if len(sys.argv) > 5 else http_address

x, y = digits_rows.load(dataset, 300)

http = httpclient.InferenceServerClient(http_address)
grpc = grpcclient.InferenceServerClient(grpc_address)
for client in (http, grpc):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model)
    assert not client.is_model_ready("no-such-model")

metadata = http.get_model_metadata(model)
assert metadata["name"] == model and metadata["platform"] == "kiln_burn", metadata
(declared,) = metadata["inputs"]
assert declared["datatype"] == "FP32" and declared["shape"] == [-1, 64], declared
assert [output["name"] for output in metadata["outputs"]] == ["probabilities", "label"], metadata
assert metadata["outputs"][0]["shape"] == [-1, 10] and metadata["outputs"][1]["datatype"] == "INT64"
input_name = declared["name"]
version = metadata["versions"][0]
grpc_metadata = grpc.get_model_metadata(model)
assert grpc_metadata.name == model and list(grpc_metadata.versions) == [version]
assert grpc_metadata.inputs[0].name == input_name and list(grpc_metadata.inputs[0].shape) == [-1, 64]
assert [output.name for output in grpc_metadata.outputs] == ["probabilities", "label"]
server = http.get_server_metadata()
assert server["name"] == "kiln" and "binary_tensor_data" in server["extensions"], server


def http_infer(binary, outputs=True):
    tensor = httpclient.InferInput(input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    requested = None
    if outputs:
        requested = [
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("label", binary_data=binary),
        ]
    result = http.infer(model, [tensor], outputs=requested, request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_version"] == version
    return result.as_numpy("probabilities"), result.as_numpy("label")


binary_probabilities, binary_labels = http_infer(binary=True)
json_probabilities, json_labels = http_infer(binary=False)
default_probabilities, default_labels = http_infer(binary=True, outputs=False)
tensor = grpcclient.InferInput(input_name, list(x.shape), "FP32")
tensor.set_data_from_numpy(x)
result = grpc.infer(model, [tensor], model_version=version)
grpc_probabilities, grpc_labels = result.as_numpy("probabilities"), result.as_numpy("label")

assert binary_probabilities.shape == (300, 10) and binary_probabilities.dtype == np.float32
assert binary_labels.shape == (300,) and binary_labels.dtype == np.int64
for probabilities, predicted in [
    (json_probabilities, json_labels),
    (default_probabilities, default_labels),
    (grpc_probabilities, grpc_labels),
]:
    # JSON carries each float exactly (as the double of the float), so every path agrees bit for bit.
    assert np.array_equal(probabilities.astype(np.float32), binary_probabilities)
    assert np.array_equal(predicted, binary_labels)
np.testing.assert_allclose(binary_probabilities.sum(axis=1), 1.0, rtol=1e-5)
assert np.array_equal(binary_probabilities.argmax(axis=1), binary_labels)
accuracy = float((binary_labels == y).mean())
assert accuracy >= 0.85, accuracy

# One row per request, as a serving client sends them, gives the same answers as the batch.
for index in range(5):
    tensor = grpcclient.InferInput(input_name, [1, 64], "FP32")
    tensor.set_data_from_numpy(x[index : index + 1])
    single = grpc.infer(model, [tensor]).as_numpy("label")
    assert single[0] == binary_labels[index], (index, single, binary_labels[index])


def refused(call, *words, status=None):
    try:
        call()
    except InferenceServerException as error:
        message = str(error)
        for word in words:
            assert word in message, (word, message)
        if status is not None:
            assert error.status() == status, (error.status(), message)
        return
    raise AssertionError(f"expected an error containing {words}")


def with_shape(client_module, shape, datatype="FP32", numpy_type=np.float32):
    tensor = client_module.InferInput(input_name, list(shape), datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=numpy_type))
    return [tensor]


expected_shape = f"input '{input_name}' has shape [1, 63]; model '{model}' expects [-1, 64]"
refused(lambda: http.infer(model, with_shape(httpclient, (1, 63))), expected_shape, status="400")
refused(
    lambda: grpc.infer(model, with_shape(grpcclient, (1, 63))),
    expected_shape,
    status="StatusCode.INVALID_ARGUMENT",
)
refused(
    lambda: http.infer(model, with_shape(httpclient, (1, 64), "FP64", np.float64)),
    f"input '{input_name}' is FP64; model '{model}' expects FP32",
)
refused(lambda: http.infer("no-such-model", with_shape(httpclient, (1, 64))), "no model named 'no-such-model'")
refused(
    lambda: grpc.infer("no-such-model", with_shape(grpcclient, (1, 64))),
    "no model named 'no-such-model'",
    status="StatusCode.NOT_FOUND",
)
refused(lambda: http.get_model_metadata(model, model_version="999"), "version '999' is not served here")
refused(
    lambda: http.infer(model, with_shape(httpclient, (1, 64)), outputs=[httpclient.InferRequestedOutput("logits")]),
    f"model '{model}' has no output 'logits'; its outputs are probabilities, label",
)

if metrics_address != "-":
    with urllib.request.urlopen(f"http://{metrics_address}/metrics") as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text"), response.headers
        families = {family.name: family for family in text_string_to_metric_families(response.read().decode())}
    requests = {
        sample.labels["protocol"]: sample.value
        for sample in families["kiln_serving_requests"].samples
        if sample.name == "kiln_serving_requests_total"
        and sample.labels["model"] == model
        and sample.labels["version"] == version
    }
    assert requests["rest"] >= 5 and requests["grpc"] >= 7, requests
    reasons = {
        sample.labels["reason"]
        for sample in families["kiln_serving_errors"].samples
        if sample.name == "kiln_serving_errors_total"
    }
    assert "invalid_input" in reasons, reasons
    assert "kiln_serving_request_duration_seconds" in families and "kiln_serving_batch_size" in families
print("all inference checks passed")
