#!/usr/bin/env bash
# The sweep benchmarks on this machine:
#
#   kiln bench tpe     Kiln's TPE and random search against Optuna's TPE (in a venv), Branin and Hartmann-6,
#                      SEEDS seeds × TPE_TRIALS trials: median regret ──► benches/out/tpe.json, tpe.png
#   kiln up --workers 1 --worker-cpus PARALLEL (one coordinator fsyncing every commit, one in-process worker)
#   kiln bench sweeps  a random sweep of TRIALS `command` trials of TRIAL_MS each, PARALLEL at a time, against
#                      the same commands run by a local pool ──► benches/out/sweeps.json
#
# Environment: SEEDS (10), TPE_TRIALS (50), TRIALS (1000), PARALLEL (4), TRIAL_MS (10),
# OPTUNA_VENV (default $HOME/.cache/kiln-bench-optuna), CARGO_TARGET_DIR (default $HOME/.cache/kiln-target).

set -euo pipefail

SEEDS="${SEEDS:-10}"
TPE_TRIALS="${TPE_TRIALS:-50}"
TRIALS="${TRIALS:-1000}"
PARALLEL="${PARALLEL:-4}"
TRIAL_MS="${TRIAL_MS:-10}"
OPTUNA_VENV="${OPTUNA_VENV:-$HOME/.cache/kiln-bench-optuna}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"

# shellcheck source=benches/lib.sh
source "$REPO_ROOT/benches/lib.sh"

build_kiln
mkdir -p "$OUT_DIR"
python_venv "$OPTUNA_VENV" "optuna==5.0.0" matplotlib
echo "commit $(git -C "$REPO_ROOT" rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(nproc) cores"

log "tpe: $SEEDS seeds × $TPE_TRIALS trials per function"
"$KILN" bench tpe --python "$PYTHON" --seeds "$SEEDS" --trials "$TPE_TRIALS" --out "$OUT_DIR/tpe.json"
"$PYTHON" - "$OUT_DIR/tpe.json" "$OUT_DIR/tpe.png" <<'PY'
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
functions = sorted({result["function"] for result in results})
figure, axes = plt.subplots(1, len(functions), figsize=(5 * len(functions), 4))
for axis, function in zip(axes, functions):
    for result in (r for r in results if r["function"] == function):
        curve = result["median_curve"]
        axis.plot(range(1, len(curve) + 1), curve, label=result["searcher"])
    axis.set_yscale("log")
    axis.set_title(f"{function}: median regret over {results[0]['seeds']} seeds")
    axis.set_xlabel("trial")
    axis.set_ylabel("regret (best so far − minimum)")
    axis.legend()
figure.tight_layout()
figure.savefig(sys.argv[2], dpi=100)
PY

log "sweeps: $TRIALS trials of $TRIAL_MS ms, $PARALLEL at a time"
kiln_up --workers 1 --worker-cpus "$PARALLEL"
"$KILN" bench sweeps --coordinator "$KILN_COORDINATOR" --tracking "$KILN_TRACKING" --trials "$TRIALS" \
  --parallel "$PARALLEL" --trial-ms "$TRIAL_MS" --out "$OUT_DIR/sweeps.json"
