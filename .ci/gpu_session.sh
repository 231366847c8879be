#!/usr/bin/env bash
# For a session lent a GPU (device tool, 15 minutes of device time in all, 10 a command):
#   bash .ci/gpu_session.sh all     one command, under 10 minutes: import check, the GPU tests and the
#                                   CUDA/Triton cases of the shared suite (-m gpu), the benchmark of the
#                                   GPU backends against BatchNorm (--update-reference), the same timed as
#                                   CUDA-graph replays (--cuda-graphs), each kernel stage's device time
#                                   (bench/bench_stages.py), the host's time per small step
#                                   (.ci/profile_host.py), compute-sanitizer memcheck, an ncu
#                                   profile of the training step (.ci/profile_kernels.py)
#   bash .ci/gpu_session.sh test    the whole test suite and memcheck + racecheck (longer)
#   bash .ci/gpu_session.sh bench   the benchmark (bench/run.sh, arguments passed on)
# Each step has a time limit (GPU_SESSION_LIMITS), so that one that hangs cannot take the later ones'
# time. The device tool brings back at most 8 files from $OUT (default /tmp/gpu_out): the logs go to
# $OUT/gpu_session.tar.gz, rewritten after every step (so a killed command still returns what ran),
# and the benchmark's committed outputs (results.csv, summary.md, fwd_bwd.png, gpu_choice.json) and
# steps.log are copied to $OUT as they are.
# BATCHLESS_GPU_DRY_RUN=1 runs the same steps on a machine without a GPU (CPU tensors, tiny benchmark
# into $OUT/bench instead of bench/results, sanitizer and ncu skipped where absent), so that CI checks
# the selection, paths and outputs (tests/test_gpu_session.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
DRY="${BATCHLESS_GPU_DRY_RUN:-0}"
LOGS="$(mktemp -d)"  # everything, packed into $OUT/gpu_session.tar.gz after each step
mkdir -p "$OUT"
step() { echo "[gpu-session $SECONDS s] $*" | tee -a "$LOGS/steps.log"; }
# (never fatal: a failed pack must not end the session's later steps)
pack() { tar czf "$OUT/gpu_session.tar.gz" -C "$LOGS" . && cp "$LOGS/steps.log" "$OUT/" || echo "pack: FAILED"; }
# Seconds each step may take (tests, eager benchmark, CUDA-graph benchmark, memcheck, ncu, stage costs, host
# time); with the setup (~25 s) and tests/test_gpu.py's 60 s their sum (~440 s) stays under the device
# tool's 10-minute command limit (on 2026-11-30 the whole ran in 368 s). GPU_SESSION_WORKERS: pytest-xdist workers (default 8);
# PROFILE_IMPLS: what the ncu step profiles (default cuda,triton,batchnorm).
read -r t_tests t_bench t_graphs t_memcheck t_ncu t_stages t_host <<< "${GPU_SESSION_LIMITS:-90 60 60 30 45 45 25}"
limit() { timeout -s INT -k 20 "$@"; }  # INT first: pytest still prints its summary
# The package is imported from this checkout (the GPU machines have no editable install of it).
export PYTHONPATH="$(pwd -P)${PYTHONPATH:+:$PYTHONPATH}"
# A library built for this machine by .ci/prebuild_gpu.sh and carried here: used unless the sources changed.
[[ -f build/prebuilt-gpu.sources ]] && export BATCHLESS_PREBUILT="$PWD/build/prebuilt-gpu.sources"
# Sourced, not piped (a pipeline would run it in a subshell and lose BATCHLESS_PYTHON). Its failures
# `exit 1`, which ends this script too, past an `||`: the trap shows and packs the log then (on fd 3,
# this script's stdout: the trap runs inside the source's redirection).
exec 3>&1
setup_failed() { { step "setup: FAILED"; cat "$LOGS/setup.log"; pack; } >&3 2>&3; }
trap setup_failed EXIT
source .ci/setup_env.sh > "$LOGS/setup.log" 2>&1 || exit 1
trap - EXIT
tail -n 3 "$LOGS/setup.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >> "$LOGS/setup.log" 2>&1 || true
find_tool() { command -v "$1" || ls "${CUDA_HOME:-/usr/local/cuda}/bin/$1" /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null | head -n 1 || true; }
sanitizer="$(find_tool compute-sanitizer)"
ncu="$(find_tool ncu)"
device=cuda
[[ "$DRY" == "1" ]] && device=cpu

check_import() {
  local rc=0
  step "import"
  "$BATCHLESS_PYTHON" - "$device" > "$LOGS/import.log" 2>&1 <<'PY' || rc=$?
import sys
import torch
import batchless_kernels as bk
device = sys.argv[1]
wanted = {"cuda": ["cuda", "triton"], "cpu": ["cpu"]}[device]
have = bk.available_backends(device)
print(f"torch {torch.__version__}, extension loaded: {bk.ops.extension_loaded()}, backends on {device}: {have}")
missing = [b for b in wanted if b not in have]
sys.exit(f"missing backends {missing}" if missing else 0)
PY
  cat "$LOGS/import.log"
  [[ $rc == 0 ]] || echo "import: FAILED (rc $rc)"
  pack
}

run_tests() {  # $1: name of the logs; $2: time limit; then pytest arguments (paths, selection)
  local name=$1 seconds=$2 rc=0 parallel=()
  shift 2
  step "$name: pytest $* (limit $seconds s)"
  # Triton compiles on the host: spread the cases over worker processes where pytest-xdist is installed.
  [[ "$DRY" != "1" ]] && "$BATCHLESS_PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n "${GPU_SESSION_WORKERS:-8}")
  # --junitxml: the record of every case's outcome (-q prints only the failures' names)
  limit "$seconds" "$BATCHLESS_PYTHON" -m pytest -q -ra --maxfail=50 --durations=15 "${parallel[@]}" \
    --junitxml="$LOGS/$name.xml" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  tail -15 "$LOGS/$name.log"
  # 5: nothing selected (a dry run without a GPU deselects every GPU case)
  [[ $rc == 0 || ($rc == 5 && "$DRY" == "1") ]] || echo "$name: FAILED (rc $rc, see $name.log)"
  pack
}

sanitize() {  # $1: time limit; then the tools
  local seconds=$1
  shift
  for tool in "$@"; do
    if [[ -z "$sanitizer" ]]; then
      echo "compute-sanitizer not found: $tool skipped" | tee "$LOGS/sanitizer-$tool.log"
      continue
    fi
    step "compute-sanitizer $tool (limit $seconds s)"
    limit "$seconds" "$sanitizer" --tool "$tool" --error-exitcode 1 "$BATCHLESS_PYTHON" .ci/sanitize_kernels.py \
      > "$LOGS/sanitizer-$tool.log" 2>&1 && echo "$tool: clean" || echo "$tool: FAILED or cut off (see log)"
    tail -5 "$LOGS/sanitizer-$tool.log"
  done
  pack
}

benchmark() {  # $1: time limit; $2: 1 to copy the results to $OUT as well as into the logs; then bench_batchless.py arguments
  local seconds=$1 to_out=$2 dir
  shift 2
  step "benchmark $* (limit $seconds s)"
  local log="$LOGS/bench$([[ $to_out == 1 ]] || echo -graphs).log"
  limit "$seconds" bash bench/run.sh "$@" > "$log" 2>&1 || echo "benchmark: FAILED or cut off (see $(basename "$log"))"
  tail -40 "$log"
  dir=$(sed -n 's/.*results will be written to //p' "$log" | tail -n 1)
  if [[ -n "$dir" && -d "$dir" ]]; then  # results.csv is rewritten after every case: a cut-off run keeps its rows
    mkdir -p "$LOGS/$(basename "$dir")" && cp "$dir"/* "$LOGS/$(basename "$dir")/" 2>/dev/null || true
    if [[ $to_out == 1 ]]; then
      cp "$dir"/results.csv "$dir"/summary.md "$dir"/*.png "$dir"/gpu_choice.json "$OUT/" 2>/dev/null || true
    fi
  else
    echo "benchmark: no results (see bench.log)"
  fi
  # --update-reference rewrites auto's table, package data
  if [[ "$*" == *--update-reference* ]]; then cp batchless_kernels/gpu_choice.json "$OUT/" 2>/dev/null || true; fi
  pack
}

stages() {  # $1: time limit. Each kernel stage's device time (bench/bench_stages.py), into the logs.
  local seconds=$1 args=()
  [[ "$DRY" == "1" ]] && args=(--device cpu --shapes 4x3x5x5 --dtypes float32)
  step "stage costs (limit $seconds s)"
  limit "$seconds" "$BATCHLESS_PYTHON" bench/bench_stages.py "${args[@]}" --out "$LOGS/stages" > "$LOGS/stages.log" 2>&1 \
    || echo "stages: FAILED or cut off (see stages.log)"
  tail -25 "$LOGS/stages.log"
  pack
}

host_time() {  # $1: time limit. The host's time per small eager step, and its ops (.ci/profile_host.py).
  local seconds=$1 args=()
  [[ "$DRY" == "1" ]] && args=(--device cpu --steps 3)
  step "host time (limit $seconds s)"
  limit "$seconds" "$BATCHLESS_PYTHON" .ci/profile_host.py "${args[@]}" > "$LOGS/host.log" 2>&1 \
    || echo "host: FAILED or cut off (see host.log)"
  grep "^## " "$LOGS/host.log" || true
  pack
}

profile() {  # $1: time limit
  local seconds=$1
  if [[ -z "$ncu" ]]; then
    echo "ncu not found: profile skipped" | tee "$LOGS/ncu.log"
    return
  fi
  step "ncu profile (limit $seconds s)"
  # --clock-control none: the card's clocks are left as they are (never changed here)
  limit "$seconds" "$ncu" --clock-control none --profile-from-start off --csv --page details \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
    --log-file "$LOGS/ncu.csv" "$BATCHLESS_PYTHON" .ci/profile_kernels.py > "$LOGS/ncu.log" 2>&1 \
    || echo "ncu: FAILED or cut off (see ncu.log)"
  tail -5 "$LOGS/ncu.log"
  "$BATCHLESS_PYTHON" bench/ncu_summary.py "$LOGS/ncu.csv" > "$LOGS/ncu_summary.md" 2>&1 \
    && cp "$LOGS/ncu_summary.md" "$OUT/" || echo "ncu_summary: FAILED"
  pack
}

case "${1:-all}" in
  all)
    check_import
    # What only a GPU checks (same bits, 2^31 elements, graphs, compile) first, then the shared suite's GPU cases.
    run_tests tests-gpu 60 tests/test_gpu.py -m gpu
    run_tests tests "$t_tests" tests -m gpu --ignore=tests/test_gpu.py
    if [[ "$DRY" == "1" ]]; then
      benchmark "$t_bench" 1 --device cpu --shapes 4x3x2x2 --dtypes float32 --layouts contiguous --budget 0.01 \
        --impls batchless-cpu,batchnorm --default-allocator --out "$OUT/bench"
    else
      benchmark "$t_bench" 1 --impls batchless-cuda,batchless-triton,batchnorm --budget 0.05 --update-reference
      # Device time without launch gaps, in a process of its own (a first attempt on the H200 ended
      # in an illegal memory access, which would have taken the eager results with it).
      benchmark "$t_graphs" 0 --impls batchless-cuda,batchless-triton,batchnorm --budget 0.05 --cuda-graphs \
        --out "$LOGS/graph-run"
    fi
    sanitize "$t_memcheck" memcheck
    stages "$t_stages"
    host_time "$t_host"
    profile "$t_ncu"
    step "done"
    pack
    ;;
  test)
    check_import
    run_tests tests 3000 tests
    sanitize 1200 memcheck racecheck
    ;;
  bench)
    benchmark 3000 1 "${@:2}"
    ;;
  *) echo "usage: $0 all|test|bench [bench args]" >&2; exit 2 ;;
esac
