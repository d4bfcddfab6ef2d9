"""Kiln's serving tier through KServe's stock Python clients (kserve.InferenceRESTClient, V1 and V2, and
kserve.InferenceGRPCClient), unchanged.

Usage:
  kserve_clients.py HTTP_ADDRESS GRPC_ADDRESS MODEL DIGITS_CSV

Against a served digits classifier (inputs pixels FP32 [-1, 64]; outputs probabilities and label):
- V2 over REST, JSON and binary tensors, and over gRPC: health, model readiness, inference whose labels are
  right on the first 200 rows and agree across the three, and a wrong shape refused with the message that
  names it (HTTP 400; gRPC INVALID_ARGUMENT);
- V1 over REST (KServe's sklearn-style predictor protocol): liveness, model readiness, `:predict` with
  instances giving a prediction per row with both outputs by name, agreeing with V2, and bad instances
  refused naming what is wrong.
Prints "all kserve client checks passed" at the end.
"""

import asyncio
import sys

import grpc
import httpx
import digits_rows
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

http_address, grpc_address, model, dataset = sys.argv[1:5]
base = f"http://{http_address}"

x, y = digits_rows.load(dataset, 200)


def request(pixels, binary):
    tensor = InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [RequestedOutput("probabilities"), RequestedOutput("label")]
    return InferRequest(model_name=model, infer_inputs=[tensor], request_outputs=outputs)


async def v2_rest():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    assert await client.is_server_live(base)
    assert await client.is_server_ready(base)
    assert await client.is_model_ready(base, model)
    assert not await client.is_model_ready(base, "no-such-model")
    answers = []
    for binary in (False, True):
        response = await client.infer(base, request(x, binary), model_name=model)
        assert response.model_name == model, response
        probabilities = response.get_output_by_name("probabilities").as_numpy()
        label = response.get_output_by_name("label").as_numpy()
        assert probabilities.shape == (200, 10) and label.shape == (200,), (probabilities.shape, label.shape)
        assert (probabilities.argmax(axis=1) == label).all()
        answers.append((probabilities, label))
    assert np.allclose(answers[0][0], answers[1][0], atol=1e-6)
    assert (answers[0][1] == answers[1][1]).all()
    accuracy = (answers[0][1] == y).mean()
    assert accuracy >= 0.9, f"accuracy {accuracy} on the first 200 rows"
    try:
        await client.infer(base, request(x[:, :63].copy(), False), model_name=model)
        raise AssertionError("a 63-wide input was accepted")
    except httpx.HTTPStatusError as error:
        assert error.response.status_code == 400, error
        assert "input 'pixels' has shape [200, 63]; model 'digits' expects [-1, 64]" in str(error), str(error)
    await client.close()
    return answers[0]


async def v2_grpc(expected):
    client = InferenceGRPCClient(grpc_address, retries=0)
    assert await client.is_server_live()
    assert await client.is_server_ready()
    assert await client.is_model_ready(model)
    response = await client.infer(request(x, True))
    probabilities = response.get_output_by_name("probabilities").as_numpy()
    label = response.get_output_by_name("label").as_numpy()
    assert np.allclose(probabilities, expected[0], atol=1e-6)
    assert (label == expected[1]).all()
    try:
        await client.infer(request(x[:, :63].copy(), True))
        raise AssertionError("a 63-wide input was accepted over gRPC")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "input 'pixels' has shape [200, 63]" in error.details(), error.details()
    await client.close()


async def v1_rest(expected):
    client = InferenceRESTClient(RESTConfig(protocol="v1", retries=0))
    assert await client.is_server_live(base)
    assert await client.is_model_ready(base, model)
    answer = await client.infer(base, {"instances": x[:20].tolist()}, model_name=model)
    predictions = answer["predictions"]
    assert len(predictions) == 20, answer
    for index, prediction in enumerate(predictions):
        assert set(prediction) == {"probabilities", "label"}, prediction
        assert prediction["label"] == expected[1][index], (index, prediction)
        assert np.allclose(prediction["probabilities"], expected[0][index], atol=1e-6)
    for body, message in [
        ({"instances": [x[0, :63].tolist()]}, "input 'pixels' has shape [1, 63]; model 'digits' expects [-1, 64]"),
        ({"inputs": x[:1].tolist()}, "the body has no 'instances'"),
        ({"instances": [x[0].tolist(), x[1, :10].tolist()]}, "input 'pixels' of instance 1 has shape [10]"),
    ]:
        try:
            await client.infer(base, body, model_name=model)
            raise AssertionError(f"{body} was accepted")
        except httpx.HTTPStatusError as error:
            assert error.response.status_code == 400, error
            assert message in str(error), str(error)
    try:
        await client.infer(base, {"instances": x[:1].tolist()}, model_name="no-such-model")
        raise AssertionError("an unknown model answered")
    except httpx.HTTPStatusError as error:
        assert error.response.status_code == 404, error
        assert "no-such-model" in str(error), str(error)
    await client.close()


async def main():
    expected = await v2_rest()
    await v2_grpc(expected)
    await v1_rest(expected)


asyncio.run(main())
print("all kserve client checks passed")
