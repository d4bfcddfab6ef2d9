"""A sweep trial as any program can be one: `objective.py FUNCTION` reads its parameters from the JSON file
Kiln's worker writes for it (KILN_TRIAL_PARAMS_FILE; the same JSON is in KILN_TRIAL_PARAMS, and each value
in KILN_PARAM_<NAME>), computes a known test function and logs the value, under the function's name, through
the MLflow REST API into the trial's run (MLFLOW_TRACKING_URI, MLFLOW_RUN_ID). Standard library only: the
stock mlflow client would do the same with mlflow.start_run(); mlflow.log_metric("branin", value).

FUNCTION is `branin` (x in [-5, 10], y in [0, 15]; minimum 0.397887) or `hartmann6` (x0..x5 in [0, 1];
minimum -3.32237), the same as Kiln's searcher tests use."""

import json
import math
import os
import re
import sys
import time
import urllib.request


def branin(p):
    x, y = p["x"], p["y"]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (y - b * x * x + c * x - 6) ** 2 + 10 * (1 - t) * math.cos(x) + 10


def hartmann6(p):
    alpha = [1.0, 1.2, 3.0, 3.2]
    a = [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
    centre = [
        [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
        [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
        [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
        [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
    ]
    x = [p[f"x{j}"] for j in range(6)]
    return -sum(alpha[i] * math.exp(-sum(a[i][j] * (x[j] - centre[i][j]) ** 2 for j in range(6))) for i in range(4))


FUNCTIONS = {"branin": branin, "hartmann6": hartmann6}
name = sys.argv[1] if len(sys.argv) > 1 else "branin"
if name not in FUNCTIONS:
    sys.exit(f"objective.py: unknown function {name!r}; expected one of {', '.join(FUNCTIONS)}")

# The parameters as the JSON file the worker wrote (KILN_TRIAL_PARAMS holds the same JSON).
with open(os.environ["KILN_TRIAL_PARAMS_FILE"]) as file:
    params = json.load(file)
assert params == json.loads(os.environ["KILN_TRIAL_PARAMS"]), "the file and the variable disagree"
for key, value in params.items():
    variable = "KILN_PARAM_" + re.sub(r"[^A-Z0-9]", "_", key.upper())
    assert float(os.environ[variable]) == value, f"{variable} disagrees with the file"
value = FUNCTIONS[name]({key: float(value) for key, value in params.items()})

# A slower trial, for tests that need a sweep to be mid-way for a while.
time.sleep(float(os.environ.get("OBJECTIVE_SLEEP_S", "0")))

# A trial that should report nothing (to show how a sweep fails on a metric nobody reports).
metric = os.environ.get("OBJECTIVE_METRIC", name)
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
print(" ".join(f"{key}={value}" for key, value in params.items()), f"{metric}={value}")
