#!/usr/bin/env bash
# Kiln's tracking API against an MLflow tracking server with its default SQLite backend (`mlflow server
# --backend-store-uri sqlite:///…`, MLflow's own defaults otherwise), both on this machine, driven by the
# same client (`kiln bench tracking`) one after the other:
#
#   log-batch     CLIENTS clients, each logging batches of 1,000 metric points into its own run, for
#                 BATCHES batches in all (or MAX_SECONDS)                       ──► metric points per second
#   populate      RUNS runs, each with a param and a metric, CLIENTS at a time  ──► runs per second
#   search        SEARCHES (MLFLOW_SEARCHES for MLflow) sequential runs/search over those runs (a filter on
#                 a metric and a param, ordered by the metric, 100 per page)    ──► p50 and p99 latency
#   ──► one JSON line per server in benches/out/mlflow.jsonl
#
# MLflow lives in its own virtual environment ($HOME/.cache/kiln-mlflow-venv), created when missing; it is
# not part of CI.
#
# Environment: RUNS (100000), CLIENTS (8), BATCHES (2000), SEARCHES (200), MLFLOW_SEARCHES (5: each takes
# about 26 s at 100,000 runs on the 2-vCPU machine of RESULTS.md), MAX_SECONDS (120), CARGO_TARGET_DIR.
# Populating MLflow with 100,000 runs takes about half an hour there.

set -euo pipefail

RUNS="${RUNS:-100000}"
CLIENTS="${CLIENTS:-8}"
BATCHES="${BATCHES:-2000}"
SEARCHES="${SEARCHES:-200}"
MLFLOW_SEARCHES="${MLFLOW_SEARCHES:-5}"
MAX_SECONDS="${MAX_SECONDS:-120}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"
VENV="${KILN_MLFLOW_VENV:-$HOME/.cache/kiln-mlflow-venv}"
STEP_TIMEOUT=7200

source "$REPO_ROOT/benches/lib.sh"
mkdir -p "$OUT_DIR"

build_kiln
python_venv "$VENV" "mlflow==3.17.2"
MLFLOW_VERSION=$("$PYTHON" -c 'import mlflow; print(mlflow.__version__)')

record() { echo "{\"side\": \"$1\", \"result\": $2}" | tee -a "$OUT_DIR/mlflow.jsonl"; }
: >"$OUT_DIR/mlflow.jsonl"
record "versions" "{\"mlflow\": \"$MLFLOW_VERSION\", \"commit\": \"$(git -C "$REPO_ROOT" rev-parse --short HEAD)\", \"runs\": $RUNS, \"clients\": $CLIENTS}"

bench() {
  timeout "$STEP_TIMEOUT" "$KILN" bench tracking --tracking "$1" --clients "$CLIENTS" --requests "$BATCHES" \
    --max-seconds "$MAX_SECONDS" --runs "$RUNS" --searches "$2" --json
}

log "Kiln: kiln up, its MLflow API"
kiln_up --workers 0
record "kiln" "$(bench "$KILN_TRACKING" "$SEARCHES")"
cleanup
WORK="$(mktemp -d)"

log "MLflow: mlflow server on SQLite"
MLFLOW_PORT=$(free_port)
start_baseline "$WORK/mlflow.log" "http://127.0.0.1:$MLFLOW_PORT/health" \
  "$VENV/bin/mlflow" server --backend-store-uri "sqlite:///$WORK/mlflow.db" --default-artifact-root "$WORK/artifacts" \
  --host 127.0.0.1 --port "$MLFLOW_PORT"
record "mlflow server (sqlite)" "$(bench "127.0.0.1:$MLFLOW_PORT" "$MLFLOW_SEARCHES")"
log "done: $OUT_DIR/mlflow.jsonl"
