#!/usr/bin/env bash
# The sweep benchmarks on this machine:
#
#   kiln bench tpe     Kiln's TPE and random search against Optuna's TPE (in a venv), Branin and Hartmann-6,
#                      SEEDS seeds × TPE_TRIALS trials: median regret ──► benches/out/tpe.json
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
python_venv "$OPTUNA_VENV" "optuna==5.0.0"
echo "commit $(git -C "$REPO_ROOT" rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(nproc) cores"

log "tpe: $SEEDS seeds × $TPE_TRIALS trials per function"
"$KILN" bench tpe --python "$PYTHON" --seeds "$SEEDS" --trials "$TPE_TRIALS" --out "$OUT_DIR/tpe.json"

log "sweeps: $TRIALS trials of $TRIAL_MS ms, $PARALLEL at a time"
kiln_up --workers 1 --worker-cpus "$PARALLEL"
"$KILN" bench sweeps --coordinator "$KILN_COORDINATOR" --tracking "$KILN_TRACKING" --trials "$TRIALS" \
  --parallel "$PARALLEL" --trial-ms "$TRIAL_MS" --out "$OUT_DIR/sweeps.json"
