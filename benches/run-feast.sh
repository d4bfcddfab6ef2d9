#!/usr/bin/env bash
# Kiln's feature store against Feast (its defaults: the file/dask offline store and the SQLite online store)
# on the same Parquet files, in one run:
#
#   feast_bench.py make         ──► hourly.parquet (DRIVERS × HOURS rows, 4 float64 features, shuffled),
#                                   entities.parquet (ENTITY_ROWS random (id, time) rows),
#                                   lookup.parquet (LOOKUP_ROWS entities, 10 float64 features)
#   point-in-time join          ──► Feast get_historical_features(...).to_arrow()  against
#                                   Kiln's training set over Flight (DoGet, read into a pyarrow table)
#   online lookups, 1 entity,   ──► Feast get_online_features (SQLite, in process) and Feast's HTTP
#   10 features, sequential         feature server (`feast serve`, the same SQLite file)  against
#                                   Kiln over Flight (pyarrow.flight), over HTTP (the same Python client,
#                                   http.client, keep-alive, and request), and over Flight from Rust
#                                   (`kiln bench lookup`); and the same Rust client over HTTP
#                                   (`kiln bench lookup --over http`, one keep-alive connection, Feast's
#                                   request body) against both Kiln and `feast serve`
#   ──► one JSON line per measurement in benches/out/feast.jsonl
#
# Feast lives in its own virtual environment ($HOME/.cache/kiln-feast-venv), created when missing; it is
# not part of CI.
#
# Environment: ENTITY_ROWS (100000), DRIVERS (10000), HOURS (100), LOOKUP_ROWS (100000), LOOKUPS (2000),
# REPEATS (3), CARGO_TARGET_DIR.

set -euo pipefail

ENTITY_ROWS="${ENTITY_ROWS:-100000}"
DRIVERS="${DRIVERS:-10000}"
HOURS="${HOURS:-100}"
LOOKUP_ROWS="${LOOKUP_ROWS:-100000}"
LOOKUPS="${LOOKUPS:-2000}"
REPEATS="${REPEATS:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
KILN="$CARGO_TARGET_DIR/release/kiln"
VENV="${KILN_FEAST_VENV:-$HOME/.cache/kiln-feast-venv}"
STEP_TIMEOUT=1800

source "$REPO_ROOT/benches/lib.sh"
mkdir -p "$OUT_DIR"

build_kiln
python_venv "$VENV" "feast==0.67.0" "pyarrow==26.0.1"
BENCH="$REPO_ROOT/benches/feast_bench.py"
FEAST_VERSION=$("$PYTHON" -c 'import feast; print(feast.__version__)')

log "writing the data"
timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" make "$WORK" "$ENTITY_ROWS" "$DRIVERS" "$HOURS" "$LOOKUP_ROWS"

FEATURES="127.0.0.1:$(free_port)"
kiln_up --featurestore-listen "$FEATURES"
feast_tables_toml >"$WORK/bench.toml"
"$KILN" features apply "$WORK/bench.toml" >/dev/null
for _ in $(seq 100); do
  "$KILN" features sql "SELECT count(*) FROM lookup" --featurestore "$FEATURES" >/dev/null 2>&1 && break
  sleep 0.2
done

record() { echo "{\"side\": \"$1\", \"result\": $2}" | tee -a "$OUT_DIR/feast.jsonl"; }
: >"$OUT_DIR/feast.jsonl"
record "versions" "{\"feast\": \"$FEAST_VERSION\", \"commit\": \"$(git -C "$REPO_ROOT" rev-parse --short HEAD)\"}"

log "point-in-time join: Kiln, $REPEATS times"
record "kiln training set over Flight" \
  "$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" kiln-historical "$FEATURES" "$WORK" "$REPEATS")"
log "point-in-time join: Feast, $REPEATS times"
record "feast get_historical_features" \
  "$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" feast-historical "$WORK" "$REPEATS" 2>"$WORK/feast.log")"

log "online lookups: materializing $LOOKUP_ROWS entities into Kiln"
started=$(date +%s%N)
"$KILN" features materialize --view lookup --featurestore "$FEATURES" >/dev/null
record "kiln materialize" "{\"seconds\": $(( ($(date +%s%N) - started) / 1000000 ))e-3}"
record "kiln lookup over Flight (pyarrow)" \
  "$(timeout "$STEP_TIMEOUT" "$PYTHON" "$REPO_ROOT/benches/flight_bench.py" lookup "$FEATURES" lookup_service "$LOOKUP_ROWS" "$LOOKUPS")"
record "kiln lookup over HTTP (http.client)" \
  "$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" http "$FEATURES" "$LOOKUP_ROWS" "$LOOKUPS")"
record "kiln lookup over Flight (Rust, kiln bench lookup)" \
  "$(timeout "$STEP_TIMEOUT" "$KILN" bench lookup --featurestore "$FEATURES" --service lookup_service --key id \
      --keys "$LOOKUP_ROWS" --requests "$LOOKUPS" --json)"
# The same ten features by name, as Feast's feature server is asked for them.
LOOKUP_FEATURES=$(printf 'lookup:g%s,' 0 1 2 3 4 5 6 7 8 9)
LOOKUP_FEATURES="${LOOKUP_FEATURES%,}"
record "kiln lookup over HTTP (Rust, kiln bench lookup --over http)" \
  "$(timeout "$STEP_TIMEOUT" "$KILN" bench lookup --over http --featurestore "$FEATURES" \
      --lookup-features "$LOOKUP_FEATURES" --key id --keys "$LOOKUP_ROWS" --requests "$LOOKUPS" --json)"
log "online lookups: Feast (materialize, then $LOOKUPS lookups)"
record "feast get_online_features (sqlite)" \
  "$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" feast-online "$WORK" "$LOOKUP_ROWS" "$LOOKUPS" 2>>"$WORK/feast.log")"

log "online lookups: Feast's feature server (feast serve), $LOOKUPS lookups over HTTP"
FEAST_PORT=$(free_port)
start_baseline "$WORK/feast-serve.log" "http://127.0.0.1:$FEAST_PORT/health" \
  "$PYTHON" "$BENCH" feast-serve "$WORK" "$FEAST_PORT"
record "feast feature server over HTTP (feast serve, sqlite)" \
  "$(timeout "$STEP_TIMEOUT" "$PYTHON" "$BENCH" http "127.0.0.1:$FEAST_PORT" "$LOOKUP_ROWS" "$LOOKUPS")"
record "feast feature server over HTTP (Rust, kiln bench lookup --over http)" \
  "$(timeout "$STEP_TIMEOUT" "$KILN" bench lookup --over http --featurestore "127.0.0.1:$FEAST_PORT" \
      --lookup-features "$LOOKUP_FEATURES" --key id --keys "$LOOKUP_ROWS" --requests "$LOOKUPS" --json)"
log "done: $OUT_DIR/feast.jsonl"
