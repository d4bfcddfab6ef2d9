"""The baselines of `kiln bench serving`: the same model behind the same Open Inference Protocol REST route.

Usage:
  serving_baselines.py export MODEL_DIR OUT.onnx [KILN_REST]
      Writes the Kiln model in MODEL_DIR (model.json and weights.bin, as `kiln task train` saves it) as an ONNX
      graph: the training normalization, the dense layers with ReLU, then softmax ("probabilities") and argmax
      ("label"). With KILN_REST (a `kiln serve` serving it as "digits" with input "pixels"), checks that
      onnxruntime's outputs on 64 seeded rows match Kiln's.
  serving_baselines.py fastapi MODEL.onnx PORT
      onnxruntime behind FastAPI, under uvicorn (UVICORN_WORKERS workers, default 1).
  serving_baselines.py ray MODEL.onnx PORT
      onnxruntime in a Ray Serve deployment (RAY_REPLICAS replicas, default 1) with Ray Serve's own dynamic
      batching (@serve.batch, up to 64 rows), behind Ray Serve's HTTP proxy.

Both servers answer POST /v2/models/{model}/infer with the protocol's JSON (FP32 input, outputs
"probabilities" and "label") and GET /v2/health/ready, so `kiln bench serving` drives them like Kiln.
"""

import json
import os
import signal
import sys
import time
import urllib.request

import numpy as np


def export(model_dir, out, kiln_rest=None):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    manifest = json.load(open(os.path.join(model_dir, "model.json")))
    assert manifest["format"] == "kiln-mlp-1" and manifest["model"] == "mlp", manifest["model"]
    weights = np.fromfile(os.path.join(model_dir, "weights.bin"), dtype="<f4")
    widths = [manifest["inputs"], *manifest["hidden"], manifest["classes"]]
    initializers = [
        numpy_helper.from_array(np.array(manifest["normalization"]["mean"], dtype=np.float32), "mean"),
        numpy_helper.from_array(np.array(manifest["normalization"]["std"], dtype=np.float32), "std"),
    ]
    nodes = [
        helper.make_node("Sub", ["pixels", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["h0"]),
    ]
    offset = 0
    for layer, (inputs, outputs) in enumerate(zip(widths, widths[1:])):
        # Each dense layer: its weight as [inputs, outputs], then its bias (the visiting order).
        weight = weights[offset : offset + inputs * outputs].reshape(inputs, outputs)
        offset += inputs * outputs
        bias = weights[offset : offset + outputs]
        offset += outputs
        initializers += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(bias, f"b{layer}")]
        last = layer == len(widths) - 2
        target = "logits" if last else f"z{layer + 1}"
        nodes.append(helper.make_node("Gemm", [f"h{layer}", f"w{layer}", f"b{layer}"], [target]))
        if not last:
            nodes.append(helper.make_node("Relu", [target], [f"h{layer + 1}"]))
    assert offset == len(weights), (offset, len(weights))
    nodes += [
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "kiln-digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", widths[0]])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", widths[-1]]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, out)
    print(f"wrote {out}: {'-'.join(map(str, widths))} MLP")
    if kiln_rest:
        import onnxruntime

        rows = np.random.default_rng(0).integers(0, 17, size=(64, widths[0])).astype(np.float32)
        session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
        probabilities, label = session.run(None, {"pixels": rows})
        request = {"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
        answer = post(f"http://{kiln_rest}/v2/models/digits/infer", request)
        outputs = {output["name"]: np.array(output["data"]) for output in answer["outputs"]}
        np.testing.assert_allclose(outputs["probabilities"].reshape(probabilities.shape), probabilities, atol=1e-5)
        agree = float((outputs["label"] == label).mean())
        assert agree >= 0.98, agree
        print(f"onnxruntime agrees with Kiln on 64 rows (labels {agree:.0%}, probabilities within 1e-5)")


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def answer(model, probabilities, label):
    return {
        "model_name": model,
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": list(probabilities.shape),
                "data": probabilities.ravel().tolist(),
            },
            {"name": "label", "datatype": "INT64", "shape": list(label.shape), "data": label.tolist()},
        ],
    }


def rows_of(request):
    (tensor,) = request["inputs"]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def session_of(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def fastapi_app(path):
    from fastapi import FastAPI

    app = FastAPI()
    session = session_of(path)

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: dict):
        probabilities, label = session.run(None, {"pixels": rows_of(request)})
        return answer(model, probabilities, label)

    return app


def serve_fastapi(path, port):
    import uvicorn

    os.environ["KILN_ONNX_PATH"] = path
    workers = int(os.environ.get("UVICORN_WORKERS", "1"))
    uvicorn.run(
        "serving_baselines:app_from_environment",
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
    )


def app_from_environment():
    return fastapi_app(os.environ["KILN_ONNX_PATH"])


def serve_ray(path, port):
    import ray
    from fastapi import FastAPI
    from ray import serve

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = FastAPI()

    # Up to 64 requests in flight per replica (Ray's default is 5), so @serve.batch can fill its batches.
    @serve.deployment(num_replicas=int(os.environ.get("RAY_REPLICAS", "1")), max_ongoing_requests=64)
    @serve.ingress(app)
    class Digits:
        def __init__(self, onnx_path):
            self.session = session_of(onnx_path)

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
        async def run(self, batches):
            rows = np.concatenate(batches)
            probabilities, label = self.session.run(None, {"pixels": rows})
            results, start = [], 0
            for batch in batches:
                end = start + len(batch)
                results.append((probabilities[start:end], label[start:end]))
                start = end
            return results

        @app.get("/v2/health/ready")
        async def ready(self):
            return {"ready": True}

        @app.post("/v2/models/{model}/infer")
        async def infer(self, model: str, request: dict):
            probabilities, label = await self.run(rows_of(request))
            return answer(model, probabilities, label)

    serve.run(Digits.bind(path), route_prefix="/")
    print(f"ray serve listening on 127.0.0.1:{port}", flush=True)

    # SIGTERM (the script stopping its baseline) shuts Ray down with its processes, as exiting does.
    def stop(*_):
        serve.shutdown()
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "export":
        export(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    elif mode == "fastapi":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        serve_fastapi(sys.argv[2], int(sys.argv[3]))
    elif mode == "ray":
        serve_ray(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode!r}; expected export, fastapi or ray")
