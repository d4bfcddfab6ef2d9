#!/usr/bin/env bash
# The `jobs` benchmark suite on this machine:
#
#   cargo build --release -p kiln
#   kiln up --workers 2 --worker-cpus 2 (one coordinator, two workers of 2 slots, loopback, temp dir)
#   kiln bench jobs --jobs $JOBS ──► benches/out/jobs.json and a table on stdout
#
# Environment:
#   JOBS        jobs in the throughput phase (default 10000)
#   PACED_JOBS  jobs in the latency phase (default 2000)
#   RATE        submissions per second in the latency phase (default 200)
#   CARGO_TARGET_DIR  where kiln is built (default $HOME/.cache/kiln-target)

set -euo pipefail

JOBS="${JOBS:-10000}"
PACED_JOBS="${PACED_JOBS:-2000}"
RATE="${RATE:-200}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"


# shellcheck source=benches/lib.sh
source "$REPO_ROOT/benches/lib.sh"

(cd "$REPO_ROOT" && cargo build --release -p kiln --locked)
mkdir -p "$OUT_DIR"
kiln_up --workers 2 --worker-cpus 2
API="$KILN_COORDINATOR"
echo "commit $(git -C "$REPO_ROOT" rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(nproc) cores"
"$KILN" bench jobs --coordinator "$API" --jobs "$JOBS" --paced-jobs "$PACED_JOBS" --rate "$RATE" \
  --out "$OUT_DIR/jobs.json"
