#!/usr/bin/env bash
# The checks that need a GPU (issue 4's CUDA kernels, NCCL, GPU detection and a train job on a GPU rank), in
# two halves, because the machine with the GPU has no Rust toolchain:
#
#   benches/run-gpu.sh build [DIR]   here: builds the `cuda` test binaries, the kernels' bench and a release
#                                    kiln with `--features cuda` into DIR (default gpu-bin), xz-compressed
#   benches/run-gpu.sh check [DIR]   on the GPU machine, from the repository root: unpacks DIR and runs them;
#                                    output goes to $OUT (or a temporary folder) as gpu-check.log
#
# cudarc looks for unversioned libraries (libnccl.so, libnvrtc.so) or CUDA 12's names; CUDA 13 and NCCL's
# wheels ship only libnvrtc.so.13 and libnccl.so.2, so `check` links them under those names in a private
# folder on LD_LIBRARY_PATH, as a user of such an install would.
set -uo pipefail
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mode="${1:-}"
dir="${2:-gpu-bin}"

build() {
  set -e
  cd "$REPO_ROOT"
  mkdir -p "$dir"
  test_binary() { # PACKAGE [CARGO ARGS…]: the path of the package's test executable
    local package="$1"
    shift
    cargo test --release --locked -p "$package" --features cuda --no-run --message-format=json "$@" |
      python3 -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") and message["target"]["kind"] == ["lib"]:
        print(message["executable"])'
  }
  cp "$(test_binary kiln-kernels --lib)" "$dir/kernels-tests"
  cp "$(test_binary kiln-worker --lib)" "$dir/worker-tests"
  cargo bench --locked -p kiln-kernels --features cuda --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") and message["target"]["kind"] == ["bench"]:
        print(message["executable"])' | xargs -I{} cp {} "$dir/kernels-bench"
  cargo build --release --locked -p kiln --features cuda
  cp "${CARGO_TARGET_DIR:-target}/release/kiln" "$dir/kiln"
  for binary in "$dir"/kernels-tests "$dir"/worker-tests "$dir"/kernels-bench "$dir"/kiln; do
    strip "$binary"
    xz -T0 -6 -f "$binary"
  done
  ls -l "$dir"
}

# Links libNAME.so (and the CUDA 12 name) to the first versioned copy found, when the loader has no
# unversioned one.
link_cuda_libraries() {
  local libs="$1"
  mkdir -p "$libs"
  for name in nccl nvrtc; do
    if ldconfig -p | grep -q "lib$name\.so "; then
      echo "lib$name.so: on the loader's path"
      continue
    fi
    local found
    found="$(find /usr/local /usr/lib /opt -name "lib$name.so.[0-9]*" 2>/dev/null | sort -V | tail -1)"
    if [ -z "$found" ]; then
      echo "lib$name: not found on this machine"
      continue
    fi
    echo "lib$name.so -> $found"
    ln -sf "$found" "$libs/lib$name.so"
    LD_LIBRARY_PATH="$libs:$(dirname "$found"):${LD_LIBRARY_PATH:-}"
  done
  export LD_LIBRARY_PATH
}

check() {
  cd "$REPO_ROOT"
  local out="${OUT:-$(mktemp -d)}" failed=0
  exec > >(tee "$out/gpu-check.log") 2>&1
  step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
  run() { "$@" || { echo "FAILED: $*"; failed=1; }; }
  local bin
  bin="$(mktemp -d)"
  for packed in "$dir"/*.xz; do
    xz -dc "$packed" >"$bin/$(basename "$packed" .xz)" && chmod +x "$bin/$(basename "$packed" .xz)"
  done
  step "the machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  link_cuda_libraries /tmp/kiln-cuda-libs
  export KILN_REQUIRE_GPU=1

  step "CUDA kernels against the CPU reference"
  run "$bin/kernels-tests" cuda:: --nocapture
  step "GPU detection and NCCL"
  run "$bin/worker-tests" gpu:: nccl:: --nocapture
  step "CUDA kernels: GB/s beside a device-to-device copy"
  run "$bin/kernels-bench" --bench cuda/ --noplot

  step "a train job on a GPU rank through kiln up"
  KILN="$bin/kiln"
  # shellcheck source=benches/lib.sh
  source "$REPO_ROOT/benches/lib.sh"
  kiln_up --workers 1 --worker-cpus 4
  run "$KILN" workers list --json
  local job
  job="$("$KILN" submit examples/jobs/digits-gpu.toml)"
  echo "job $job"
  run "$KILN" jobs wait "$job" --max-wait 5m
  "$KILN" jobs logs "$job" --rank 0 | tee "$WORK/rank0.log"
  grep -q "all-reduce over NCCL" "$WORK/rank0.log" || {
    echo "FAILED: the GPU rank did not join its group over NCCL"
    failed=1
  }
  run "$KILN" jobs show "$job" --json
  step "done: $([ $failed = 0 ] && echo 'every check passed' || echo 'some checks FAILED')"
  return $failed
}

case "$mode" in
  build) build ;;
  check) check ;;
  *)
    echo "usage: benches/run-gpu.sh build|check [DIR]" >&2
    exit 2
    ;;
esac
