#!/usr/bin/env bash
# Training throughput: Kiln's built-in trainer (MLP 64-256-256-10, batch 256, Adam) on 1 and 2 ranks,
# beside PyTorch on the same model, data and batch with one thread:
#
#   benches/make_synthetic.py ──► 50,000 rows × 64 features, 10 classes (CSV)
#   kiln up --workers 2 --worker-cpus 1, RAYON_NUM_THREADS=1 ──► train jobs with 1 and 2 ranks ──► samples/s
#   benches/train_torch.py (torch.set_num_threads(1))                                       ──► samples/s
#
# samples/s is the median over epochs 2.. of training rows per second (all ranks together), the
# validation pass excluded. Environment: ROWS (50000), EPOCHS (5), TORCH_PYTHON (a python with torch),
# CARGO_TARGET_DIR.

set -euo pipefail

ROWS="${ROWS:-50000}"
EPOCHS="${EPOCHS:-5}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"
TORCH_PYTHON="${TORCH_PYTHON:-$HOME/.cache/kiln-bench-torch/bin/python}"
START_TIMEOUT_S=60
STOP_TIMEOUT_S=15

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
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

"$TORCH_PYTHON" -c 'import torch' || { echo "TORCH_PYTHON=$TORCH_PYTHON has no torch (run benches/run-allreduce.sh once, or set it)"; exit 1; }
(cd "$REPO_ROOT" && cargo build --release -p kiln --locked)
mkdir -p "$OUT_DIR"
log "generating $ROWS synthetic rows"
python3 "$REPO_ROOT/benches/make_synthetic.py" "$WORK/synthetic.csv" "$ROWS" 64 10 1

API="127.0.0.1:$(free_port)"
RAFT="127.0.0.1:$(free_port)"
RAYON_NUM_THREADS=1 "$KILN" up --workers 2 --worker-cpus 1 --data-dir "$WORK/data" --listen "$API" \
  --raft-listen "$RAFT" >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq $((START_TIMEOUT_S * 10))); do
  grep -q "kiln is up" "$WORK/up.log" 2>/dev/null && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.log"; exit 1; }
  sleep 0.1
done
export KILN_COORDINATOR="$API"

median_rate() {
  python3 -c '
import re, statistics, sys
rates = [float(m.group(1)) for m in re.finditer(r"samples/s (\d+)", sys.stdin.read())]
print(statistics.median(rates[1:] or rates))'
}

for RANKS in 1 2; do
  log "kiln, $RANKS rank(s)"
  cat >"$WORK/train-$RANKS.toml" <<SPEC
name = "bench-train-$RANKS"
kind = "train"
[train]
model = "mlp"
dataset = "$WORK/synthetic.csv"
label = "label"
hidden = [256, 256]
optimizer = "adam"
epochs = $EPOCHS
batch_size = 256
learning_rate = 0.001
checkpoint_every = 1000
[resources]
workers = $RANKS
cpus = 1
SPEC
  ID=$("$KILN" submit "$WORK/train-$RANKS.toml")
  "$KILN" jobs wait "$ID" --max-wait 1800s
  "$KILN" jobs logs "$ID" --rank 0 | median_rate >"$OUT_DIR/train-kiln-$RANKS.txt"
done
log "pytorch, 1 thread"
"$TORCH_PYTHON" "$REPO_ROOT/benches/train_torch.py" "$WORK/synthetic.csv" label "$EPOCHS" 256 >"$OUT_DIR/train-torch.json"

python3 - "$OUT_DIR" <<'PY'
import json, sys
out = sys.argv[1]
one = float(open(f"{out}/train-kiln-1.txt").read())
two = float(open(f"{out}/train-kiln-2.txt").read())
torch = json.load(open(f"{out}/train-torch.json"))["samples_per_second"]
print(f"| trainer | samples/s | ratio |")
print(f"|---|---:|---:|")
print(f"| PyTorch, 1 thread | {torch:.0f} | 1.00x |")
print(f"| Kiln, 1 rank | {one:.0f} | {one / torch:.2f}x of PyTorch |")
print(f"| Kiln, 2 ranks | {two:.0f} | scaling efficiency {two / (2 * one) * 100:.0f}% |")
PY
