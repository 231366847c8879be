#!/usr/bin/env bash
# For a session lent a GPU (device tool, 15 minutes of device time in all, 10 a command):
#   bash .ci/gpu_session.sh all     one command, under 8 minutes: import check, the GPU tests and the
#                                   CUDA/Triton cases of the shared suite (-m gpu), compute-sanitizer
#                                   memcheck, the benchmark of the GPU backends against BatchNorm
#   bash .ci/gpu_session.sh test    the whole test suite and memcheck + racecheck (longer)
#   bash .ci/gpu_session.sh bench   the benchmark (bench/run.sh, arguments passed on)
# Logs and results go to $OUT (default /tmp/gpu_out) for the device tool to bring back.
# BATCHLESS_GPU_DRY_RUN=1 runs the same steps on a machine without a GPU (CPU tensors, tiny benchmark,
# sanitizer skipped where absent), so that CI checks the selection, paths and outputs
# (tests/test_gpu_session.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
DRY="${BATCHLESS_GPU_DRY_RUN:-0}"
mkdir -p "$OUT"
step() { echo "[gpu-session $SECONDS s] $*" | tee -a "$OUT/steps.log"; }
# A library built for this machine by .ci/prebuild_gpu.sh and carried here: used unless the sources changed.
[[ -f build/prebuilt-gpu.sources ]] && export BATCHLESS_PREBUILT="$PWD/build/prebuilt-gpu.sources"
# Sourced, not piped (a pipeline would run it in a subshell and lose BATCHLESS_PYTHON).
source .ci/setup_env.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -n 3 "$OUT/setup.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/setup.log" 2>&1 || true
sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
device=cuda
[[ "$DRY" == "1" ]] && device=cpu

check_import() {
  step "import"
  "$BATCHLESS_PYTHON" - "$device" <<'EOF' 2>&1 | tee "$OUT/import.log"
import sys
import torch
import batchless_kernels as bk
device = sys.argv[1]
wanted = {"cuda": ["cuda", "triton"], "cpu": ["cpu"]}[device]
have = bk.available_backends(device)
print(f"torch {torch.__version__}, extension loaded: {bk.ops.extension_loaded()}, backends on {device}: {have}")
missing = [b for b in wanted if b not in have]
sys.exit(f"missing backends {missing}" if missing else 0)
EOF
}

run_tests() {  # $1: pytest selection arguments
  step "tests $*"
  local rc=0
  "$BATCHLESS_PYTHON" -m pytest tests -q -ra --maxfail=20 --durations=15 "$@" > "$OUT/tests.log" 2>&1 || rc=$?
  tail -15 "$OUT/tests.log"
  # 5: nothing selected (a dry run without a GPU deselects every GPU case)
  [[ $rc == 0 || ($rc == 5 && "$DRY" == "1") ]] || echo "tests: FAILED (rc $rc, see tests.log)"
}

sanitize() {  # $@: tools
  for tool in "$@"; do
    if [[ ! -x "$sanitizer" ]]; then
      echo "compute-sanitizer not found: $tool skipped" | tee "$OUT/sanitizer-$tool.log"
      continue
    fi
    step "compute-sanitizer $tool"
    "$sanitizer" --tool "$tool" --error-exitcode 1 "$BATCHLESS_PYTHON" .ci/sanitize_kernels.py \
      > "$OUT/sanitizer-$tool.log" 2>&1 && echo "$tool: clean" || echo "$tool: FAILED (see log)"
    tail -5 "$OUT/sanitizer-$tool.log"
  done
}

benchmark() {  # $@: bench_batchless.py arguments
  step "benchmark $*"
  bash bench/run.sh "$@" 2>&1 | tail -80 > "$OUT/bench.log" || true
  tail -40 "$OUT/bench.log"
  local dir
  dir=$(grep -o 'results in .*' "$OUT/bench.log" | tail -n 1 | cut -d' ' -f3)
  [[ -n "$dir" ]] || { echo "benchmark: no results (see bench.log)"; return; }
  cp "$dir"/results.csv "$dir"/summary.md "$OUT/"
  cp "$dir"/*.png "$dir"/gpu_choice.json "$OUT/" 2>/dev/null || true
}

case "${1:-all}" in
  all)
    check_import
    run_tests -m gpu
    sanitize memcheck
    if [[ "$DRY" == "1" ]]; then
      benchmark --device cpu --shapes 4x3x2x2 --dtypes float32 --layouts contiguous --budget 0.01 \
        --impls batchless-cpu,batchnorm --default-allocator --out "$OUT/bench"
    else
      benchmark --impls batchless-cuda,batchless-triton,batchnorm --budget 0.1 --out "$OUT/bench"
    fi
    step "done"
    ;;
  test)
    check_import
    run_tests
    sanitize memcheck racecheck
    ;;
  bench)
    benchmark "${@:2}"
    ;;
  *) echo "usage: $0 all|test|bench [bench args]" >&2; exit 2 ;;
esac
