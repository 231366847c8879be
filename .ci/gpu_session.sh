#!/usr/bin/env bash
# For a session lent a GPU (device tool): one call per stage, each under the 10-minute limit.
#   bash .ci/gpu_session.sh test    build, the whole test suite, compute-sanitizer memcheck/racecheck
#   bash .ci/gpu_session.sh bench   the benchmark (bench/run.sh) and auto's cuda/triton table
# Logs and results go to $OUT (default /tmp/gpu_out) for the device tool to bring back.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
# Sourced, not piped (a pipeline would run it in a subshell and lose BATCHLESS_PYTHON).
source .ci/setup_env.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -n 3 "$OUT/setup.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/setup.log" || true
sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
case "${1:-test}" in
  test)
    "$BATCHLESS_PYTHON" -m pytest tests -q -ra --maxfail=20 --durations=15 2>&1 | tail -80 > "$OUT/tests.log" || true
    for tool in memcheck racecheck; do
      "$sanitizer" --tool "$tool" --error-exitcode 1 "$BATCHLESS_PYTHON" .ci/sanitize_kernels.py \
        > "$OUT/sanitizer-$tool.log" 2>&1 && echo "$tool: clean" || echo "$tool: FAILED (see log)"
      tail -5 "$OUT/sanitizer-$tool.log"
    done
    tail -15 "$OUT/tests.log"
    ;;
  bench)
    bash bench/run.sh "${@:2}" 2>&1 | tail -60 > "$OUT/bench.log"
    tail -40 "$OUT/bench.log"
    dir=$(grep -o 'results in .*' "$OUT/bench.log" | tail -n 1 | cut -d' ' -f3)
    cp "$dir"/results.csv "$dir"/summary.md "$OUT/" && cp "$dir"/*.png "$dir"/gpu_choice.json "$OUT/" 2>/dev/null || true
    ;;
  *) echo "usage: $0 test|bench [bench args]" >&2; exit 2 ;;
esac
