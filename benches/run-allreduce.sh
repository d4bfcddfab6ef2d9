#!/usr/bin/env bash
# All-reduce bus bandwidth, Kiln's ring beside torch.distributed (gloo), with loopback TCP measured by
# iperf3 in the same run:
#
#   cargo build --release -p kiln
#   kiln up --workers 4 --worker-cpus 1 ──► jobs of `kiln task allreduce` with 2 and 4 ranks ──► kiln-N.jsonl
#   torch.distributed gloo, 2 and 4 processes, same sizes and iterations           ──► gloo-N.jsonl
#   iperf3 on 127.0.0.1                                                             ──► iperf3.json
#   ──► benches/out/allreduce-report.md and benches/out/allreduce.png
#
# Environment:
#   SIZES        comma-separated sizes (default 1MiB,4MiB,16MiB,64MiB,256MiB)
#   ITERATIONS   timed all-reduces per size (default 5)
#   TORCH_PYTHON a python with torch installed; without it, torch goes into $HOME/.cache/kiln-bench-torch
#                (several GB: the PyPI wheel brings CUDA libraries even for CPU use)
#   CARGO_TARGET_DIR  where kiln is built (default $HOME/.cache/kiln-target)

set -euo pipefail

SIZES="${SIZES:-1MiB,4MiB,16MiB,64MiB,256MiB}"
ITERATIONS="${ITERATIONS:-5}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"
PLOT_VENV="$HOME/.cache/kiln-bench-venv"
TORCH_VENV="$HOME/.cache/kiln-bench-torch"
INSTALL_TIMEOUT_S=1800
JOB_TIMEOUT=600s


# shellcheck source=benches/lib.sh
source "$REPO_ROOT/benches/lib.sh"

(cd "$REPO_ROOT" && cargo build --release -p kiln --locked)
mkdir -p "$OUT_DIR"

if [ -z "${TORCH_PYTHON:-}" ]; then
  TORCH_PYTHON="$TORCH_VENV/bin/python"
  if ! "$TORCH_PYTHON" -c 'import torch' 2>/dev/null; then
    log "installing torch into $TORCH_VENV (once)"
    timeout "$INSTALL_TIMEOUT_S" python3 -m venv "$TORCH_VENV"
    timeout "$INSTALL_TIMEOUT_S" "$TORCH_VENV/bin/pip" install --quiet --disable-pip-version-check torch
  fi
fi
if ! "$PLOT_VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib into $PLOT_VENV"
  timeout "$INSTALL_TIMEOUT_S" python3 -m venv "$PLOT_VENV"
  timeout "$INSTALL_TIMEOUT_S" "$PLOT_VENV/bin/pip" install --quiet --disable-pip-version-check matplotlib
fi
if ! command -v iperf3 >/dev/null; then
  log "installing iperf3"
  timeout "$INSTALL_TIMEOUT_S" apt-get install -y -qq iperf3 >/dev/null
fi

SIZE_BYTES=$(python3 -c "
import sys
units = {'KiB': 1 << 10, 'MiB': 1 << 20, 'GiB': 1 << 30}
out = []
for size in '$SIZES'.split(','):
    number = size.rstrip('KMGiB')
    out.append(str(int(number) * units[size[len(number):]]))
print(','.join(out))")

log "loopback TCP with iperf3"
IPERF_PORT=$(free_port)
iperf3 -s -1 -p "$IPERF_PORT" >/dev/null 2>&1 &
sleep 0.5
timeout 60 iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -t 5 -J >"$OUT_DIR/iperf3.json"

log "starting kiln up --workers 4 --worker-cpus 1"
kiln_up --workers 4 --worker-cpus 1

for WORLD in 2 4; do
  log "kiln ring, $WORLD ranks"
  SPEC="$WORK/allreduce-$WORLD.toml"
  cat >"$SPEC" <<SPEC
name = "allreduce-$WORLD"
kind = "command"
command = "$KILN"
args = ["task", "allreduce", "--sizes", "$SIZES", "--iterations", "$ITERATIONS"]
[resources]
workers = $WORLD
cpus = 1
SPEC
  ID=$("$KILN" submit "$SPEC")
  "$KILN" jobs wait "$ID" --max-wait "$JOB_TIMEOUT"
  "$KILN" jobs logs "$ID" --rank 0 2>/dev/null | grep '^{' >"$OUT_DIR/kiln-$WORLD.jsonl"
  log "gloo, $WORLD ranks"
  timeout 900 "$TORCH_PYTHON" "$REPO_ROOT/benches/allreduce_gloo.py" "$WORLD" "$SIZE_BYTES" "$ITERATIONS" "$(free_port)" \
    >"$OUT_DIR/gloo-$WORLD.jsonl"
done

COMMIT=$(git -C "$REPO_ROOT" rev-parse --short HEAD)
"$PLOT_VENV/bin/python" - "$OUT_DIR" "$COMMIT" <<'PY'
import json, sys, datetime
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, commit = sys.argv[1], sys.argv[2]
iperf = json.load(open(f"{out}/iperf3.json"))["end"]["sum_received"]["bits_per_second"] / 8 / 1e9
lines = [f"# All-reduce bus bandwidth, {datetime.date.today()}, commit {commit}", "",
         f"Loopback TCP (iperf3, one stream): {iperf:.2f} GB/s", "",
         "| ranks | size | Kiln GB/s | gloo GB/s | Kiln/gloo | Kiln/iperf3 |", "|---:|---:|---:|---:|---:|---:|"]
fig, axis = plt.subplots(figsize=(7, 4))
for world in (2, 4):
    kiln = [json.loads(l) for l in open(f"{out}/kiln-{world}.jsonl")]
    gloo = {r["bytes"]: r for r in (json.loads(l) for l in open(f"{out}/gloo-{world}.jsonl"))}
    for r in kiln:
        g = gloo[r["bytes"]]
        lines.append(f"| {world} | {r['bytes'] >> 20} MiB | {r['bus_gbps']:.2f} | {g['bus_gbps']:.2f} | "
                     f"{r['bus_gbps'] / g['bus_gbps']:.2f}x | {100 * r['bus_gbps'] / iperf:.0f}% |")
    sizes = [r["bytes"] >> 20 for r in kiln]
    axis.plot(sizes, [r["bus_gbps"] for r in kiln], marker="o", label=f"Kiln ring, {world} ranks")
    axis.plot(sizes, [gloo[r["bytes"]]["bus_gbps"] for r in kiln], marker="x", linestyle="--", label=f"gloo, {world} ranks")
axis.axhline(iperf, color="grey", linestyle=":", label="iperf3 loopback")
axis.set_xscale("log", base=2); axis.set_xlabel("buffer MiB"); axis.set_ylabel("bus bandwidth GB/s")
axis.legend(); fig.tight_layout(); fig.savefig(f"{out}/allreduce.png", dpi=110)
open(f"{out}/allreduce-report.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
