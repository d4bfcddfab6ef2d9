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
START_TIMEOUT_S=60
STOP_TIMEOUT_S=15

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK="$(mktemp -d)"
UP_PID=""
cleanup() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID" 2>/dev/null || true
    for _ in $(seq $((STOP_TIMEOUT_S * 10))); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$UP_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

(cd "$REPO_ROOT" && cargo build --release -p kiln --locked)
mkdir -p "$OUT_DIR"
API="127.0.0.1:$(free_port)"
RAFT="127.0.0.1:$(free_port)"
"$KILN" up --workers 2 --worker-cpus 2 --data-dir "$WORK/data" --listen "$API" --raft-listen "$RAFT" \
  >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq $((START_TIMEOUT_S * 10))); do
  grep -q "kiln is up" "$WORK/up.log" 2>/dev/null && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.log"; exit 1; }
  sleep 0.1
done
grep -q "kiln is up" "$WORK/up.log" || { echo "kiln up did not start within ${START_TIMEOUT_S} s"; cat "$WORK/up.log"; exit 1; }
echo "commit $(git -C "$REPO_ROOT" rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(nproc) cores"
"$KILN" bench jobs --coordinator "$API" --jobs "$JOBS" --paced-jobs "$PACED_JOBS" --rate "$RATE" \
  --out "$OUT_DIR/jobs.json"
