# Shared by the benchmark scripts: logging, free ports, and an embedded cluster (`kiln up`) that is
# stopped, with its temporary directory removed, when the script exits. Source it after setting KILN.

START_TIMEOUT_S="${START_TIMEOUT_S:-60}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-15}"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK="$(mktemp -d)"
UP_PID=""
# stop_up: stops the cluster of kiln_up (if it runs).
stop_up() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID" 2>/dev/null || true
    for _ in $(seq $((STOP_TIMEOUT_S * 10))); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$UP_PID" 2>/dev/null || true
  fi
  UP_PID=""
}
cleanup() {
  stop_up
  rm -rf "$WORK"
}
trap cleanup EXIT

# kiln_up ARGS…: `kiln up ARGS…` on free loopback ports in $WORK/data; waits until it is up and exports
# KILN_COORDINATOR, KILN_TRACKING and KILN_SERVING (the router's REST port). Extra environment for it
# (RAYON_NUM_THREADS=1, say) goes in UP_ENV.
kiln_up() {
  local api="127.0.0.1:$(free_port)" raft="127.0.0.1:$(free_port)" tracking="127.0.0.1:$(free_port)"
  local serving="127.0.0.1:$(free_port)"
  env ${UP_ENV:-} "$KILN" up "$@" --data-dir "$WORK/data" --listen "$api" --raft-listen "$raft" \
    --tracking-listen "$tracking" --serving-http-listen "$serving" \
    --serving-grpc-listen "127.0.0.1:$(free_port)" >"$WORK/up.log" 2>&1 &
  UP_PID=$!
  for _ in $(seq $((START_TIMEOUT_S * 10))); do
    grep -q "kiln is up" "$WORK/up.log" 2>/dev/null && break
    kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.log"; exit 1; }
    sleep 0.1
  done
  grep -q "kiln is up" "$WORK/up.log" || { echo "kiln up did not start within ${START_TIMEOUT_S} s"; cat "$WORK/up.log"; exit 1; }
  export KILN_COORDINATOR="$api" KILN_TRACKING="$tracking" KILN_SERVING="$serving"
}

# build_kiln: the release binary the scripts run ($KILN), built from $REPO_ROOT.
build_kiln() {
  log "building kiln (release)"
  (cd "$REPO_ROOT" && cargo build --release --locked -p kiln)
}

# python_venv DIR PACKAGES…: a virtual environment at DIR (created when missing) with PACKAGES installed;
# sets PYTHON to its interpreter.
python_venv() {
  local venv="$1"
  shift
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
  PYTHON="$venv/bin/python"
}

# start_baseline LOG HEALTH_URL COMMAND…: runs a baseline server (COMMAND, output in LOG) in the background,
# stops it when the script exits, and waits up to two minutes for HEALTH_URL to answer.
BASELINE_PID=""
stop_baseline() {
  if [ -n "$BASELINE_PID" ]; then
    kill -TERM "$BASELINE_PID" 2>/dev/null || true
    wait "$BASELINE_PID" 2>/dev/null || true
  fi
}
start_baseline() {
  local log="$1" url="$2"
  shift 2
  "$@" >"$log" 2>&1 &
  BASELINE_PID=$!
  trap 'stop_baseline; cleanup' EXIT
  for _ in $(seq 1200); do
    curl -sf "$url" >/dev/null 2>&1 && return 0
    kill -0 "$BASELINE_PID" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
  done
  echo "$1 did not answer $url within 120 s"
  cat "$log"
  exit 1
}

# float64_features PREFIX COUNT: the features PREFIX0 .. PREFIX{COUNT-1} of a feature view, all float64.
float64_features() {
  local i
  for ((i = 0; i < $2; i++)); do
    printf '\n[[feature_view.feature]]\nname = "%s%s"\ntype = "float64"\n' "$1" "$i"
  done
}

# lookup_view_toml FILE: the online-lookup table of feast_bench.py and flight_bench.py (written to FILE, Parquet or
# Arrow IPC): source `lookup_file`, view `lookup` (g0..g9 of entity `row`) and service `lookup_service`.
lookup_view_toml() {
  cat <<TOML
[[source]]
name = "lookup_file"
path = "$1"
timestamp_field = "event_timestamp"

[[feature_view]]
name = "lookup"
entities = ["row"]
source = "lookup_file"
$(float64_features g 10)

[[feature_service]]
name = "lookup_service"
features = ["lookup"]
TOML
}

# feast_tables_toml: the feature definitions of the tables feast_bench.py makes (run-feast.sh, ab-sql.sh): entity
# `row` (id), view `hourly` (f0..f3, TTL a day) and view `lookup` (g0..g9), each with its feature service.
feast_tables_toml() {
  cat <<TOML
[[entity]]
name = "row"
join_keys = ["id"]

[[source]]
name = "hourly_file"
path = "hourly.parquet"
timestamp_field = "event_timestamp"

[[feature_view]]
name = "hourly"
entities = ["row"]
source = "hourly_file"
ttl = "1day"
$(float64_features f 4)

[[feature_service]]
name = "hourly_service"
features = ["hourly"]

$(lookup_view_toml lookup.parquet)
TOML
}
