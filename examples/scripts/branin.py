"""A sweep trial as any program can be one: it reads its parameters from the JSON file Kiln's worker writes
for it (KILN_TRIAL_PARAMS_FILE; the same JSON is in KILN_TRIAL_PARAMS, and each value in KILN_PARAM_X and
KILN_PARAM_Y), computes the Branin function (minimum 0.397887) and logs the value through the MLflow REST
API into the trial's run (MLFLOW_TRACKING_URI, MLFLOW_RUN_ID). Standard library only: the stock mlflow client would do the same with
mlflow.start_run(); mlflow.log_metric("branin", value)."""

import json
import math
import os
import time
import urllib.request

# The parameters as the JSON file the worker wrote (KILN_TRIAL_PARAMS holds the same JSON).
with open(os.environ["KILN_TRIAL_PARAMS_FILE"]) as file:
    params = json.load(file)
assert params == json.loads(os.environ["KILN_TRIAL_PARAMS"]), "the file and the variable disagree"
x, y = float(params["x"]), float(params["y"])
assert (float(os.environ["KILN_PARAM_X"]), float(os.environ["KILN_PARAM_Y"])) == (x, y), "KILN_PARAM_* disagree"
b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
value = (y - b * x * x + c * x - 6) ** 2 + 10 * (1 - t) * math.cos(x) + 10

# A slower trial, for tests that need a sweep to be mid-way for a while.
time.sleep(float(os.environ.get("BRANIN_SLEEP_S", "0")))

# A trial that should report nothing (to show how a sweep fails on a metric nobody reports).
metric = os.environ.get("BRANIN_METRIC", "branin")
body = json.dumps(
    {"run_id": os.environ["MLFLOW_RUN_ID"], "key": metric, "value": value, "timestamp": int(time.time() * 1000), "step": 0}
).encode()
request = urllib.request.Request(
    os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/runs/log-metric",
    data=body,
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(request, timeout=30) as response:
    response.read()
print(f"x={x} y={y} {metric}={value}")
