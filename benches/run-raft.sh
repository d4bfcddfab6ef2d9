#!/usr/bin/env bash
# The `raft` benchmark suite beside its baseline, in one go, on this machine:
#
#   cargo build --release -p kiln
#   3 kiln coordinators on loopback ──► kiln bench raft            ──► kiln.json ─┐
#   3 etcd members on loopback      ──► kiln bench raft --target etcd ─► etcd.json ─┴─► benches/out/raft-report.md
#                                                                                        benches/out/raft.png
#
# Both clusters run one at a time on the same machine with their defaults (both fsync every commit), and
# the same load generator drives each cluster's leader with the same value size and concurrencies.
#
# Environment:
#   REQUESTS   requests per concurrency level (default 4000)
#   CLIENTS    comma-separated client concurrencies (default 1,64)
#   CARGO_TARGET_DIR  where kiln is built (default $HOME/.cache/kiln-target)
#   KEEP_WORK=1       keep the temporary data directories and logs even after a successful run
#
# Needs: cargo, curl, python3 (with venv), and apt-get (root or sudo) the first time, to install Debian's
# etcd-server. matplotlib goes into a venv under $HOME/.cache/kiln-bench-venv.

set -euo pipefail

REQUESTS="${REQUESTS:-4000}"
CLIENTS="${CLIENTS:-1,64}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
VENV="$HOME/.cache/kiln-bench-venv"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"

# Bounds on every wait, in seconds.
CLUSTER_START_TIMEOUT_S=60
STOP_TIMEOUT_S=15
INSTALL_TIMEOUT_S=900

WORK=""
declare -a PIDS=()
declare -a COMMANDS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# Remembers a command line exactly as run, for the report.
record() {
  local argument line="" quoted
  for argument in "$@"; do
    if [[ "$argument" =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then
      quoted="$argument"
    else
      printf -v quoted '%q' "$argument"
    fi
    line+="${line:+ }$quoted"
  done
  COMMANDS+=("$line")
}

# Stops the given processes (TERM, then KILL after STOP_TIMEOUT_S), by PID only, and reaps them.
stop_pids() {
  local pid
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "process $pid did not stop after ${STOP_TIMEOUT_S}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  local remaining=()
  for pid in "${PIDS[@]}"; do
    if ! printf '%s\n' "$@" | grep -qx "$pid"; then
      remaining+=("$pid")
    fi
  done
  PIDS=("${remaining[@]}")
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if ((${#PIDS[@]} > 0)); then
    log "stopping ${#PIDS[@]} leftover process(es): ${PIDS[*]}"
    stop_pids "${PIDS[@]}"
  fi
  if [[ -n "$WORK" && -d "$WORK" ]]; then
    if ((status != 0)) || [[ "${KEEP_WORK:-}" == 1 ]]; then
      log "kept data directories and logs in $WORK"
    else
      rm -rf -- "$WORK"
    fi
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

tail_logs() {
  local file
  for file in "$@"; do
    if [[ -f "$file" ]]; then
      printf -- '--- last lines of %s ---\n' "$file" >&2
      tail -n 20 "$file" >&2 || true
    fi
  done
}

[[ "$REQUESTS" =~ ^[1-9][0-9]*$ ]] || die "REQUESTS must be a positive integer, got '$REQUESTS'"
[[ "$CLIENTS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] ||
  die "CLIENTS must be comma-separated positive integers such as 1,64, got '$CLIENTS'"
IFS=',' read -r -a CLIENT_LEVELS <<<"$CLIENTS"
for tool in cargo curl python3 ss; do
  command -v "$tool" >/dev/null || die "'$tool' is needed and not on PATH"
done

SUDO=""
if ((EUID != 0)); then
  command -v sudo >/dev/null || die "installing packages needs root or sudo"
  SUDO="sudo"
fi

# --- build ----------------------------------------------------------------------------------------------
log "building kiln (release) into $CARGO_TARGET_DIR"
record cargo build --release -p kiln
(cd "$REPO_ROOT" && cargo build --release -p kiln)
[[ -x "$KILN" ]] || die "the build did not produce $KILN"

# --- baseline and plotting tools --------------------------------------------------------------------------
ETCD="$(command -v etcd || true)"
if [[ -z "$ETCD" ]]; then
  log "installing Debian's etcd-server (the baseline)"
  if ! timeout "$INSTALL_TIMEOUT_S" $SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends etcd-server; then
    timeout "$INSTALL_TIMEOUT_S" $SUDO apt-get update
    timeout "$INSTALL_TIMEOUT_S" $SUDO env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y --no-install-recommends etcd-server
  fi
  ETCD="$(command -v etcd || true)"
  [[ -n "$ETCD" ]] || die "etcd-server is installed but 'etcd' is not on PATH"
fi
ETCD_VERSION="$("$ETCD" --version 2>/dev/null | sed -n 's/^etcd Version: //p' | head -n 1)"

if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib into $VENV"
  timeout "$INSTALL_TIMEOUT_S" python3 -m venv "$VENV"
  timeout "$INSTALL_TIMEOUT_S" "$VENV/bin/pip" install --quiet --disable-pip-version-check matplotlib
fi
PYTHON="$VENV/bin/python"

WORK="$(mktemp -d /tmp/kiln-raft-bench.XXXXXX)"
mkdir -p "$OUT_DIR"

# Free loopback ports below the kernel's ephemeral range, so client connections cannot take them.
read -r -a PORTS <<<"$("$PYTHON" - <<'EOF'
import random, socket
ports = []
candidates = random.sample(range(20000, 32000), 2000)
for port in candidates:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            continue
    ports.append(port)
    if len(ports) == 12:
        break
print(" ".join(map(str, ports)))
EOF
)"
((${#PORTS[@]} == 12)) || die "found only ${#PORTS[@]} free ports in 20000-32000"

BENCH_TIMEOUT_S=$((120 + ${#CLIENT_LEVELS[@]} * 90)) # kiln bench stops a level after 30 s itself

# --- kiln ---------------------------------------------------------------------------------------------------
KILN_RAFT=("${PORTS[@]:0:3}")
KILN_API=("${PORTS[@]:3:3}")
kiln_peers="1=127.0.0.1:${KILN_RAFT[0]},2=127.0.0.1:${KILN_RAFT[1]},3=127.0.0.1:${KILN_RAFT[2]}"
kiln_coordinators="127.0.0.1:${KILN_API[0]},127.0.0.1:${KILN_API[1]},127.0.0.1:${KILN_API[2]}"
declare -a KILN_PIDS=()
for n in 1 2 3; do
  args=(coordinator --id "$n" --peers "$kiln_peers" --listen "127.0.0.1:${KILN_API[n - 1]}"
    --data-dir "$WORK/k$n")
  record "$KILN" "${args[@]}"
  "$KILN" "${args[@]}" >"$WORK/kiln-$n.log" 2>&1 &
  KILN_PIDS+=("$!")
  PIDS+=("$!")
done
log "started kiln coordinators (pids ${KILN_PIDS[*]}) on $kiln_coordinators; waiting for a leader"

kiln_leader=""
deadline=$((SECONDS + CLUSTER_START_TIMEOUT_S))
while [[ -z "$kiln_leader" ]] && ((SECONDS < deadline)); do
  for pid in "${KILN_PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail_logs "$WORK"/kiln-*.log
      die "kiln coordinator $pid exited during start-up"
    fi
  done
  for api in "${KILN_API[@]}"; do
    kiln_leader="$(timeout 5 "$KILN" cluster status --coordinator "127.0.0.1:$api" --json 2>/dev/null |
      "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin).get("leader_id") or "")' 2>/dev/null ||
      true)"
    [[ -n "$kiln_leader" ]] && break
  done
  [[ -n "$kiln_leader" ]] || sleep 0.5
done
if [[ -z "$kiln_leader" ]]; then
  tail_logs "$WORK"/kiln-*.log
  die "no kiln leader after ${CLUSTER_START_TIMEOUT_S}s"
fi
log "kiln leader is node $kiln_leader"

bench_args=(bench raft --coordinator "$kiln_coordinators" --clients "$CLIENTS" --requests "$REQUESTS"
  --out "$WORK/kiln.json")
record "$KILN" "${bench_args[@]}"
log "running the raft suite against kiln"
timeout "$BENCH_TIMEOUT_S" "$KILN" "${bench_args[@]}" || {
  tail_logs "$WORK"/kiln-*.log
  die "kiln bench raft against kiln failed"
}
stop_pids "${KILN_PIDS[@]}"
log "stopped kiln"

# --- etcd ---------------------------------------------------------------------------------------------------
ETCD_CLIENT=("${PORTS[@]:6:3}")
ETCD_PEER=("${PORTS[@]:9:3}")
etcd_initial_cluster="e1=http://127.0.0.1:${ETCD_PEER[0]},e2=http://127.0.0.1:${ETCD_PEER[1]},e3=http://127.0.0.1:${ETCD_PEER[2]}"
# etcd reads ETCD_* variables as flags; none from the caller's environment may change the baseline.
while read -r name; do
  [[ -n "$name" ]] && unset "$name"
done < <(compgen -e | grep '^ETCD_' || true)
declare -a ETCD_PIDS=()
for n in 1 2 3; do
  client_url="http://127.0.0.1:${ETCD_CLIENT[n - 1]}"
  peer_url="http://127.0.0.1:${ETCD_PEER[n - 1]}"
  args=(--name "e$n" --data-dir "$WORK/e$n"
    --listen-client-urls "$client_url" --advertise-client-urls "$client_url"
    --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url"
    --initial-cluster "$etcd_initial_cluster" --initial-cluster-state new)
  record "$ETCD" "${args[@]}"
  "$ETCD" "${args[@]}" >"$WORK/etcd-$n.log" 2>&1 &
  ETCD_PIDS+=("$!")
  PIDS+=("$!")
done
log "started etcd members (pids ${ETCD_PIDS[*]}); waiting for health"

deadline=$((SECONDS + CLUSTER_START_TIMEOUT_S))
for n in 0 1 2; do
  until curl -fsS --max-time 2 "http://127.0.0.1:${ETCD_CLIENT[n]}/health" 2>/dev/null |
    grep -q '"health":"true"'; do
    kill -0 "${ETCD_PIDS[n]}" 2>/dev/null || {
      tail_logs "$WORK"/etcd-*.log
      die "etcd member e$((n + 1)) exited during start-up"
    }
    if ((SECONDS >= deadline)); then
      tail_logs "$WORK"/etcd-*.log
      die "etcd is not healthy after ${CLUSTER_START_TIMEOUT_S}s"
    fi
    sleep 0.5
  done
done

# The leader reports etcd_server_is_leader 1 on its client port's /metrics.
etcd_leader=""
deadline=$((SECONDS + CLUSTER_START_TIMEOUT_S))
while [[ -z "$etcd_leader" ]] && ((SECONDS < deadline)); do
  for port in "${ETCD_CLIENT[@]}"; do
    if curl -fsS --max-time 2 "http://127.0.0.1:$port/metrics" 2>/dev/null |
      grep -qE '^etcd_server_is_leader 1$'; then
      etcd_leader="127.0.0.1:$port"
      break
    fi
  done
  [[ -n "$etcd_leader" ]] || sleep 0.5
done
[[ -n "$etcd_leader" ]] || die "no etcd member reports itself leader after ${CLUSTER_START_TIMEOUT_S}s"
log "etcd leader is $etcd_leader"

bench_args=(bench raft --target etcd --etcd "$etcd_leader" --clients "$CLIENTS" --requests "$REQUESTS"
  --out "$WORK/etcd.json")
record "$KILN" "${bench_args[@]}"
log "running the raft suite against etcd"
timeout "$BENCH_TIMEOUT_S" "$KILN" "${bench_args[@]}" || {
  tail_logs "$WORK"/etcd-*.log
  die "kiln bench raft against etcd failed"
}
stop_pids "${ETCD_PIDS[@]}"
log "stopped etcd"

# --- report -------------------------------------------------------------------------------------------------
cp "$WORK/kiln.json" "$OUT_DIR/raft-kiln.json"
cp "$WORK/etcd.json" "$OUT_DIR/raft-etcd.json"

git_commit="$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$REPO_ROOT" status --porcelain 2>/dev/null)" ]]; then
  git_commit="$git_commit (working tree has uncommitted changes)"
fi
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
memory="$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
filesystem="$(df -T "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')"
commands_file="$WORK/commands.txt"
printf '%s\n' "${COMMANDS[@]}" >"$commands_file"

REPORT_DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
  REPORT_NPROC="$(nproc)" \
  REPORT_CPU="${cpu_model:-unknown}" \
  REPORT_MEMORY="$memory" \
  REPORT_KERNEL="$(uname -r)" \
  REPORT_FILESYSTEM="$filesystem" \
  REPORT_KILN_VERSION="$("$KILN" --version 2>/dev/null || echo unknown)" \
  REPORT_GIT="$git_commit" \
  REPORT_ETCD_VERSION="${ETCD_VERSION:-unknown}" \
  REPORT_REQUESTS="$REQUESTS" \
  "$PYTHON" - "$WORK/kiln.json" "$WORK/etcd.json" "$commands_file" "$OUT_DIR" <<'EOF'
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

kiln_path, etcd_path, commands_path, out_dir = sys.argv[1:5]
env = os.environ


def by_clients(path):
    with open(path) as handle:
        return {row["clients"]: row for row in json.load(handle)}


kiln = by_clients(kiln_path)
etcd = by_clients(etcd_path)
levels = sorted(set(kiln) & set(etcd))
if not levels:
    sys.exit("the kiln and etcd results share no client concurrency")
with open(commands_path) as handle:
    commands = handle.read().rstrip("\n")


def ratio(numerator, denominator):
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


summary = [
    "| clients | kiln ops/s | etcd ops/s | ops/s kiln/etcd | kiln p50 ms | etcd p50 ms "
    "| kiln p99 ms | etcd p99 ms | p99 kiln/etcd |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
details = []
notes = []
for clients in levels:
    k, e = kiln[clients], etcd[clients]
    summary.append(
        f"| {clients} | {k['ops_per_second']:.0f} | {e['ops_per_second']:.0f} "
        f"| {ratio(k['ops_per_second'], e['ops_per_second'])} "
        f"| {k['p50_ms']:.2f} | {e['p50_ms']:.2f} | {k['p99_ms']:.2f} | {e['p99_ms']:.2f} "
        f"| {ratio(k['p99_ms'], e['p99_ms'])} |"
    )
    details += [
        f"### {clients} client{'s' if clients != 1 else ''}",
        "",
        "| | kiln | etcd | kiln/etcd |",
        "|---|---:|---:|---:|",
        f"| ops/s | {k['ops_per_second']:.0f} | {e['ops_per_second']:.0f} "
        f"| {ratio(k['ops_per_second'], e['ops_per_second'])} |",
        f"| p50 ms | {k['p50_ms']:.2f} | {e['p50_ms']:.2f} | {ratio(k['p50_ms'], e['p50_ms'])} |",
        f"| p99 ms | {k['p99_ms']:.2f} | {e['p99_ms']:.2f} | {ratio(k['p99_ms'], e['p99_ms'])} |",
        f"| max ms | {k['max_ms']:.2f} | {e['max_ms']:.2f} | {ratio(k['max_ms'], e['max_ms'])} |",
        f"| completed requests | {k['requests']} | {e['requests']} | |",
        f"| errors | {k['errors']} | {e['errors']} | |",
        f"| seconds | {k['seconds']:.2f} | {e['seconds']:.2f} | |",
        "",
    ]
    for name, row in (("kiln", k), ("etcd", e)):
        if row["errors"]:
            notes.append(
                f"- {name} at {clients} client{'s' if clients != 1 else ''}: {row['errors']} requests failed."
            )
        if row["requests"] + row["errors"] < int(env["REPORT_REQUESTS"]):
            notes.append(
                f"- {name} at {clients} client{'s' if clients != 1 else ''}: stopped at the time limit after "
                f"{row['requests']} of {env['REPORT_REQUESTS']} requests."
            )

value_bytes = sorted({row["value_bytes"] for row in list(kiln.values()) + list(etcd.values())})
report = f"""# Raft suite: kiln against etcd

- Date: {env['REPORT_DATE']}
- Machine: {env['REPORT_NPROC']} CPUs ({env['REPORT_CPU']}), {env['REPORT_MEMORY']} memory, Linux {env['REPORT_KERNEL']}; data directories on {env['REPORT_FILESYSTEM']}
- kiln: {env['REPORT_KILN_VERSION']}, commit {env['REPORT_GIT']}, release build
- etcd: {env['REPORT_ETCD_VERSION']} (Debian etcd-server), default settings
- Load: {env['REPORT_REQUESTS']} requests per concurrency level (a level stops after 30 s, `kiln bench`'s
  `--max-seconds` default) after a warm-up of 10 per client, sent to the leader
  of a 3-node cluster on loopback; each request is one committed, fsynced write of {', '.join(map(str, value_bytes))} bytes
  (kiln: `SubmitJob` of `examples/jobs/hello.toml`; etcd: KV `Put` of the same bytes). The two clusters ran one
  after the other, never at the same time.
- Ratios are kiln / etcd: above 1 for ops/s means kiln is faster; below 1 for latency means kiln answers sooner.

## Summary

{chr(10).join(summary)}

![ops/s and p99 latency](raft.png)

## Per concurrency

{chr(10).join(details).rstrip()}

"""
if notes:
    report += "## Notes\n\n" + "\n".join(notes) + "\n\n"
report += f"""## Commands

Run by `benches/run-raft.sh` (REQUESTS={env['REPORT_REQUESTS']}), in this order; ports were picked free at run
time and data directories live in a temporary directory removed afterwards.

```
{commands}
```
"""
with open(os.path.join(out_dir, "raft-report.md"), "w") as handle:
    handle.write(report)

figure, (throughput_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
positions = range(len(levels))
width = 0.38
for axis, field, title, label_format in (
    (throughput_axis, "ops_per_second", "committed writes per second (higher is better)", "{:.0f}"),
    (latency_axis, "p99_ms", "p99 commit latency, ms (lower is better)", "{:.1f}"),
):
    for offset, (name, rows, color) in zip(
        (-width / 2, width / 2), (("kiln", kiln, "#d95f02"), ("etcd", etcd, "#1b9e77"))
    ):
        values = [rows[clients][field] for clients in levels]
        bars = axis.bar([p + offset for p in positions], values, width, label=name, color=color)
        axis.bar_label(bars, labels=[label_format.format(v) for v in values], fontsize=8)
    axis.set_xticks(list(positions), [f"{c} client{'s' if c != 1 else ''}" for c in levels])
    axis.set_title(title, fontsize=10)
    axis.legend()
    axis.margins(y=0.15)
figure.suptitle(
    f"Raft suite, 3 nodes on loopback, {env['REPORT_NPROC']} CPUs, {env['REPORT_REQUESTS']} requests per level",
    fontsize=11,
)
figure.tight_layout()
figure.savefig(os.path.join(out_dir, "raft.png"), dpi=120)

print("\n".join(summary))
print()
print("\n".join(details).rstrip())
if notes:
    print()
    print("\n".join(notes))
EOF

log "wrote $OUT_DIR/raft-report.md and $OUT_DIR/raft.png in $((SECONDS))s"
