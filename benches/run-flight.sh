#!/usr/bin/env bash
# Flight DoGet throughput: Kiln's feature server against a pyarrow.flight server serving the same table,
# with one loopback TCP stream as the ceiling, all in one run:
#
#   flight_bench.py make ROWS           ──► $WORK/wide.arrow (int64 id, f0..f7 float64, event_timestamp)
#   kiln up (release) + features apply  ──► DoGet {"sql": "SELECT id, f0, …, f7 FROM wide"} (DataFusion
#                                           reads the IPC file and streams it)
#   flight_bench.py serve               ──► DoGet of the same 9 columns, held in memory by pyarrow
#   flight_bench.py loopback            ──► one TCP stream over 127.0.0.1 (Python sendall/recv_into)
#   flight_bench.py lookup              ──► LOOKUPS sequential online lookups, one entity, 10 features, after
#                                           materializing LOOKUP_ROWS entities (p50/p99 through pyarrow.flight)
#   ──► one JSON line per side in benches/out/flight.jsonl; the client is pyarrow.flight for both servers
#
# Environment:
#   ROWS     rows of the table (default 10000000)
#   REPEATS  timed DoGets per server (default 5; the median is reported)
#   WARMUP   untimed DoGets of pyarrow's client first, on the same connection (default 2)
#   LOOKUP_ROWS, LOOKUPS  entities in the online store and lookups timed (default 100000 and 2000)
#   CARGO_TARGET_DIR  where kiln is built (default $HOME/.cache/kiln-target)

set -euo pipefail

ROWS="${ROWS:-10000000}"
REPEATS="${REPEATS:-5}"
WARMUP="${WARMUP:-2}"
LOOKUP_ROWS="${LOOKUP_ROWS:-100000}"
LOOKUPS="${LOOKUPS:-2000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"
VENV="${KILN_CI_VENV:-$HOME/.cache/kiln-ci-venv}"
STEP_TIMEOUT=900

source "$REPO_ROOT/benches/lib.sh"
mkdir -p "$OUT_DIR"

build_kiln
python_venv "$VENV" "pyarrow==26.0.1" numpy
BENCH="$REPO_ROOT/benches/flight_bench.py"

log "writing $ROWS rows"
timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" make "$ROWS" "$WORK/wide.arrow"
timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" make-lookup "$LOOKUP_ROWS" "$WORK/lookup.arrow"

FEATURES="127.0.0.1:$(free_port)"
kiln_up --featurestore-listen "$FEATURES"
cat >"$WORK/wide.toml" <<TOML
[[entity]]
name = "row"
join_keys = ["id"]

[[source]]
name = "wide_file"
path = "wide.arrow"
timestamp_field = "event_timestamp"

[[feature_view]]
name = "wide"
entities = ["row"]
source = "wide_file"
$(float64_features f 8)

$(lookup_view_toml lookup.arrow)
TOML
"$KILN" features apply "$WORK/wide.toml" >/dev/null
QUERY='{"sql": {"query": "SELECT id, f0, f1, f2, f3, f4, f5, f6, f7 FROM wide"}}'
for _ in $(seq 100); do
  "$KILN" features sql "SELECT count(*) FROM wide" --featurestore "$FEATURES" >/dev/null 2>&1 && break
  sleep 0.2
done

: >"$OUT_DIR/flight.jsonl"
log "Kiln: $REPEATS DoGets"
result=$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" fetch "$FEATURES" "@$QUERY" "$REPEATS" "$WARMUP")
echo "{\"side\": \"kiln\", \"result\": $result}" | tee -a "$OUT_DIR/flight.jsonl"
log "Kiln: $REPEATS DoGets from Rust (kiln bench doget)"
result=$(timeout "$STEP_TIMEOUT" "$KILN" bench doget --featurestore "$FEATURES" --ticket "$QUERY" --requests "$REPEATS" --json)
echo "{\"side\": \"kiln, Rust client\", \"result\": $result}" | tee -a "$OUT_DIR/flight.jsonl"

BASELINE_PORT=$(free_port)
"$PYTHON" "$BENCH" serve "$BASELINE_PORT" "$WORK/wide.arrow" >"$WORK/baseline.log" 2>&1 &
BASELINE_PID=$!
trap 'kill $BASELINE_PID 2>/dev/null || true; cleanup' EXIT
for _ in $(seq 600); do grep -q serving "$WORK/baseline.log" && break; sleep 0.1; done
log "pyarrow.flight: $REPEATS DoGets"
result=$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" fetch "127.0.0.1:$BASELINE_PORT" table "$REPEATS" "$WARMUP")
echo "{\"side\": \"pyarrow.flight\", \"result\": $result}" | tee -a "$OUT_DIR/flight.jsonl"
log "pyarrow.flight: $REPEATS DoGets from Rust (kiln bench doget)"
result=$(timeout "$STEP_TIMEOUT" "$KILN" bench doget --featurestore "127.0.0.1:$BASELINE_PORT" --ticket table --requests "$REPEATS" --json)
echo "{\"side\": \"pyarrow.flight, Rust client\", \"result\": $result}" | tee -a "$OUT_DIR/flight.jsonl"
kill "$BASELINE_PID" 2>/dev/null || true

log "loopback TCP reference"
result=$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" loopback $((4 << 30)) 3)
echo "{\"side\": \"loopback\", \"result\": $result}" | tee -a "$OUT_DIR/flight.jsonl"
log "online lookups: materializing $LOOKUP_ROWS entities"
/usr/bin/time -f "materialize: %e s" "$KILN" features materialize --view lookup --featurestore "$FEATURES"
result=$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" lookup "$FEATURES" lookup_service "$LOOKUP_ROWS" "$LOOKUPS")
echo "{\"side\": \"kiln online lookup over Flight\", \"result\": $result}" | tee -a "$OUT_DIR/flight.jsonl"
log "done: $OUT_DIR/flight.jsonl"
