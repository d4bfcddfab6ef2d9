#!/usr/bin/env bash
# The serving benchmark on this machine: the digits MLP (64-256-256-10) trained on an embedded cluster and
# registered, then served by each server in turn and driven by the same closed-loop client, one row per
# request, CLIENTS concurrent clients for SECONDS_PER_LEVEL seconds each:
#
#   kiln serve                 the registered model, Open Inference Protocol REST, dynamic batching
#   kiln deploy (kiln-router)  the same model deployed on the cluster: one replica on the worker of kiln up,
#                              reached through kiln up's router (the hop a deployment adds), the cluster
#                              running beside it
#   onnxruntime + FastAPI      the same model exported to ONNX, under uvicorn (one worker)
#   Ray Serve                  the same ONNX model in a Ray Serve deployment with @serve.batch
#
# ──► benches/out/serving.json (every level of every server) and a table of ratios.
#
# Environment: CLIENTS (1,32), SECONDS_PER_LEVEL (20), EPOCHS (10), SERVING_VENV (default
# $HOME/.cache/kiln-bench-serving), CARGO_TARGET_DIR (default $HOME/.cache/kiln-target).

set -euo pipefail

CLIENTS="${CLIENTS:-1,32}"
SECONDS_PER_LEVEL="${SECONDS_PER_LEVEL:-20}"
EPOCHS="${EPOCHS:-10}"
SERVING_VENV="${SERVING_VENV:-$HOME/.cache/kiln-bench-serving}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"

# shellcheck source=benches/lib.sh
source "$REPO_ROOT/benches/lib.sh"

build_kiln
mkdir -p "$OUT_DIR"
python_venv "$SERVING_VENV" "numpy==2.4.6" "onnx==1.23.2" "onnxruntime==1.32.0" "fastapi==0.165.0" \
  "uvicorn==0.54.0" "ray[serve]==2.60.0"
echo "commit $(git -C "$REPO_ROOT" rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(nproc) cores"

log "training the digits MLP on an embedded cluster"
kiln_up --workers 1 --worker-cpus 2
sed -e "s|dataset = \"examples/data/digits.csv\"|dataset = \"$REPO_ROOT/examples/data/digits.csv\"|" \
  -e "s|epochs = 30|epochs = $EPOCHS|" "$REPO_ROOT/examples/jobs/digits-mlp.toml" >"$WORK/digits.toml"
job=$("$KILN" submit "$WORK/digits.toml")
"$KILN" jobs wait "$job" --max-wait 900s >/dev/null
"$KILN" models alias digits 1 champion

bench() {
  local server="$1" address="$2"
  log "$server: clients $CLIENTS, $SECONDS_PER_LEVEL s each"
  "$KILN" bench serving --inference "$address" --server "$server" --model digits --input-name pixels \
    --clients "$CLIENTS" --max-seconds "$SECONDS_PER_LEVEL" --out "$WORK/serving-$server.json"
}

log "kiln deploy: one replica behind the router"
cat >"$WORK/deployment.toml" <<'TOML'
kind = "deployment"
name = "digits"
model = "models:/digits@champion"
input_name = "pixels"

[replicas]
min = 1
max = 1

[resources]
cpus = 1
TOML
"$KILN" deploy "$WORK/deployment.toml" --wait 120s
for _ in $(seq 100); do curl -sf "http://$KILN_SERVING/v2/models/digits/ready" >/dev/null 2>&1 && break; sleep 0.1; done
bench kiln-router "$KILN_SERVING"
"$KILN" deployments delete digits

rest="127.0.0.1:$(free_port)"
"$KILN" serve --model models:/digits@champion --input-name pixels --cache-dir "$WORK/models" \
  --http-listen "$rest" --grpc-listen "127.0.0.1:$(free_port)" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill -TERM "$SERVE_PID" 2>/dev/null || true; stop_baseline; cleanup' EXIT
for _ in $(seq 600); do curl -sf "http://$rest/v2/health/ready" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://$rest/v2/health/ready" >/dev/null || { cat "$WORK/serve.log"; exit 1; }
# The cluster is only needed to fetch the model; stop it so it does not share the cores.
kill -TERM "$UP_PID"
wait "$UP_PID" 2>/dev/null || true
"$PYTHON" "$REPO_ROOT/benches/serving_baselines.py" export "$WORK/models/digits/1" "$WORK/digits.onnx" "$rest"
bench kiln "$rest"
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true

port=$(free_port)
start_baseline "$WORK/fastapi.log" "http://127.0.0.1:$port/v2/health/ready" \
  "$PYTHON" "$REPO_ROOT/benches/serving_baselines.py" fastapi "$WORK/digits.onnx" "$port"
bench onnxruntime-fastapi "127.0.0.1:$port"
stop_baseline

port=$(free_port)
start_baseline "$WORK/ray.log" "http://127.0.0.1:$port/v2/health/ready" \
  "$PYTHON" "$REPO_ROOT/benches/serving_baselines.py" ray "$WORK/digits.onnx" "$port"
bench ray-serve "127.0.0.1:$port"
stop_baseline

"$PYTHON" - "$WORK" "$OUT_DIR/serving.json" <<'PY'
import json
import sys

work, out = sys.argv[1], sys.argv[2]
results = []
for server in ["kiln", "kiln-router", "onnxruntime-fastapi", "ray-serve"]:
    results += json.load(open(f"{work}/serving-{server}.json"))
json.dump(results, open(out, "w"), indent=2)
print(f"{'server':<22}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
for result in results:
    print(
        f"{result['server']:<22}{result['clients']:>8}{result['requests_per_second']:>10.0f}"
        f"{result['p50_ms']:>10.3f}{result['p99_ms']:>10.3f}{result['errors']:>8}"
    )
for clients in sorted({result["clients"] for result in results}):
    level = {result["server"]: result for result in results if result["clients"] == clients}
    kiln = level["kiln"]
    routed = level["kiln-router"]
    print(
        f"clients {clients}: through the router, p99 {routed['p99_ms'] / kiln['p99_ms']:.2f}x and requests/s "
        f"{routed['requests_per_second'] / kiln['requests_per_second']:.2f}x of the replica served directly"
    )
    baselines = [result for server, result in level.items() if not server.startswith("kiln")]
    best_p99 = min(baselines, key=lambda result: result["p99_ms"])
    best_rate = max(baselines, key=lambda result: result["requests_per_second"])
    print(
        f"clients {clients}: p99 {kiln['p99_ms'] / best_p99['p99_ms']:.2f}x of the best baseline's "
        f"({best_p99['server']}), requests/s {kiln['requests_per_second'] / best_rate['requests_per_second']:.2f}x "
        f"of the best baseline's ({best_rate['server']})"
    )
PY
