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


# shellcheck source=benches/lib.sh
source "$REPO_ROOT/benches/lib.sh"

"$TORCH_PYTHON" -c 'import torch' || { echo "TORCH_PYTHON=$TORCH_PYTHON has no torch (run benches/run-allreduce.sh once, or set it)"; exit 1; }
(cd "$REPO_ROOT" && cargo build --release -p kiln --locked)
mkdir -p "$OUT_DIR"
log "generating $ROWS synthetic rows"
python3 "$REPO_ROOT/benches/make_synthetic.py" "$WORK/synthetic.csv" "$ROWS" 64 10 1

UP_ENV="RAYON_NUM_THREADS=1" kiln_up --workers 2 --worker-cpus 1

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
log_every_steps = 0
[resources]
workers = $RANKS
cpus = 1
SPEC
  ID=$("$KILN" submit "$WORK/train-$RANKS.toml")
  "$KILN" jobs wait "$ID" --max-wait 1800s
  "$KILN" jobs logs "$ID" --rank 0 >"$OUT_DIR/train-kiln-$RANKS.log"
  median_rate <"$OUT_DIR/train-kiln-$RANKS.log" >"$OUT_DIR/train-kiln-$RANKS.txt"
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
