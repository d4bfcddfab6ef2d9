#!/usr/bin/env bash
# Two kiln binaries, taking turns, on the feature store's offline path: the point-in-time join over Flight and
# SQL statements over Flight SQL (adbc-driver-flightsql), with the server's CPU read from /proc. For changes that
# touch DataFusion or its build profile (benches/RESULTS.md, "Build times"):
#
#   bash benches/ab-sql.sh OLD_KILN NEW_KILN [ROUNDS]
#
# The tables are run-feast.sh's: `hourly` (DRIVERS × HOURS rows, 4 float64 features) and `lookup` (LOOKUP_ROWS
# rows, 10 features), written once by feast_bench.py make. One JSON line per binary and round goes to
# benches/out/ab-sql.jsonl. Environment: ENTITY_ROWS (100000), DRIVERS (10000), HOURS (100), LOOKUP_ROWS (100000),
# JOINS (7), STATEMENTS (40), KILN_CI_VENV (the Python with pyarrow and adbc-driver-flightsql; .ci/run's).

set -euo pipefail

OLD="$1"
NEW="$2"
ROUNDS="${3:-2}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/benches/out"
VENV="${KILN_CI_VENV:-$HOME/.cache/kiln-ci-venv}"
KILN="$OLD" # for lib.sh; each turn sets it
source "$REPO_ROOT/benches/lib.sh"
python_venv "$VENV" "pyarrow==26.0.1" "adbc-driver-manager==1.13.0" "adbc-driver-flightsql==1.13.0"
mkdir -p "$OUT_DIR"

DATA="$WORK/tables"
mkdir -p "$DATA"
log "writing the tables"
"$PYTHON" "$REPO_ROOT/benches/feast_bench.py" make "$DATA" "${ENTITY_ROWS:-100000}" "${DRIVERS:-10000}" \
  "${HOURS:-100}" "${LOOKUP_ROWS:-100000}"
feast_tables_toml >"$DATA/bench.toml"

cpu_s() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$UP_PID/stat"; }

turn() {
  local label="$1"
  KILN="$2"
  rm -rf "$WORK/data"
  local features="127.0.0.1:$(free_port)"
  kiln_up --featurestore-listen "$features"
  "$KILN" features apply "$DATA/bench.toml" >/dev/null
  for _ in $(seq 100); do
    "$KILN" features sql "SELECT count(*) FROM lookup" --featurestore "$features" >/dev/null 2>&1 && break
    sleep 0.2
  done
  local c0 c1 c2 join sql
  c0=$(cpu_s)
  join=$("$PYTHON" "$REPO_ROOT/benches/feast_bench.py" kiln-historical "$features" "$DATA" "${JOINS:-7}")
  c1=$(cpu_s)
  sql=$("$PYTHON" "$REPO_ROOT/benches/sql_bench.py" "$features" "${STATEMENTS:-40}")
  c2=$(cpu_s)
  echo "{\"binary\": \"$label\", \"round\": $round, \"join\": $join, \"join_cpu_s\": $(awk "BEGIN {print $c1 - $c0}")," \
    "\"sql\": $sql, \"sql_cpu_s\": $(awk "BEGIN {print $c2 - $c1}")}" | tee -a "$OUT_DIR/ab-sql.jsonl"
  stop_up
}

: >"$OUT_DIR/ab-sql.jsonl"
for round in $(seq "$ROUNDS"); do
  log "round $round of $ROUNDS"
  turn old "$OLD"
  turn new "$NEW"
done
