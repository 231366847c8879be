#!/usr/bin/env bash
# For a session lent a GPU (device tool, 15 minutes of device time in all, 10 a command):
#   bash .ci/gpu_session.sh all     one command, under 10 minutes: import check, the GPU tests, the
#                                   CUDA/Triton cases of the shared suite (-m gpu) but test_correctness's,
#                                   the benchmark of the GPU backends against BatchNorm (--update-reference),
#                                   test_correctness's GPU cases, the benchmark timed as CUDA-graph replays
#                                   (--cuda-graphs), compute-sanitizer memcheck, each kernel stage's device
#                                   time (bench/bench_stages.py), the host's time per small step
#                                   (.ci/profile_host.py), an ncu profile of the training step
#                                   (.ci/profile_kernels.py): the most wanted results first
#   bash .ci/gpu_session.sh test    the whole test suite and memcheck + racecheck (longer)
#   bash .ci/gpu_session.sh bench   the kernel benchmark (bench/bench_batchless.py, arguments passed on)
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
# (never fatal: a failed pack must not end the session's later steps). Written aside, then renamed: a
# command killed while packing still leaves the previous, whole archive.
pack() {
  { tar czf "$OUT/.gpu_session.tar.gz.part" -C "$LOGS" . && mv -f "$OUT/.gpu_session.tar.gz.part" "$OUT/gpu_session.tar.gz"     && cp "$LOGS/steps.log" "$OUT/"; } || echo "pack: FAILED"
}
# Seconds each step may take: tests/test_gpu.py, the suite's other GPU cases, eager benchmark,
# test_correctness's GPU cases, CUDA-graph benchmark, memcheck, ncu, stage costs, host time. Every step
# also ends by GPU_SESSION_DEADLINE (seconds since the start, default 520: with the machine's start the
# session's 15 minutes of device time hold one such command, and 600 s is the tool's limit): a step's
# limit is clipped to the time left, and a step with less than 5 s left is skipped. On 2026-11-30 the
# whole ran in 368 s, the suite's step cut off at 90 s. GPU_SESSION_WORKERS: pytest-xdist workers (default:
# the cores, at most 16: Triton compiles on the host); PROFILE_IMPLS: what the ncu step profiles (default
# cuda,triton,batchnorm).
limits="${GPU_SESSION_LIMITS:-60 60 60 90 60 30 75 45 25}"
read -ra seconds_each <<< "$limits"
[[ ${#seconds_each[@]} == 9 && "$limits" =~ ^[0-9\ ]+$ ]] \
  || { echo "GPU_SESSION_LIMITS must hold 9 numbers of seconds, got '$limits'" >&2; exit 2; }
read -r t_gpu_tests t_tests t_bench t_correctness t_graphs t_memcheck t_ncu t_stages t_host <<< "$limits"
deadline="${GPU_SESSION_DEADLINE:-$([[ "${1:-all}" == all ]] && echo 520 || echo 100000)}"
# INT first: pytest still prints its summary and writes its junit file. Exit status 124: cut off.
limit() {
  local seconds=$1 left=$(( deadline - SECONDS - 10 ))  # 10 s: the kill's grace and the packing
  shift
  (( left < seconds )) && seconds=$left
  if (( seconds < 5 )); then
    echo "skipped: the session's deadline (${deadline} s) is near"
    return 125
  fi
  timeout -s INT -k 5 "$seconds" "$@"
}
# What an exit status says, for the steps' lines.
outcome() {
  case $1 in
    0) echo "ok" ;;
    124) echo "cut off at its time limit (partial results kept)" ;;
    125) echo "skipped: the session's deadline was near" ;;
    137) echo "killed 5 s past its time limit" ;;
    *) echo "FAILED (rc $1)" ;;
  esac
}
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
step "setup done"
pack
find_tool() { command -v "$1" || ls "${CUDA_HOME:-/usr/local/cuda}/bin/$1" /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null | head -n 1 || true; }
sanitizer="$(find_tool compute-sanitizer)"
ncu="$(find_tool ncu)"
device=cuda
[[ "$DRY" == "1" ]] && device=cpu
# The GPU benchmark's selection (tests/test_gpu_session.py checks that bench_batchless.py accepts it).
GPU_BENCH_ARGS=(--impls batchless-cuda,batchless-triton,batchnorm --budget 0.05)

check_import() {
  local rc=0
  step "import"
  limit 60 "$BATCHLESS_PYTHON" - "$device" > "$LOGS/import.log" 2>&1 <<'PY' || rc=$?
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
  [[ $rc == 0 ]] || echo "import: $(outcome $rc)"
  pack
}

run_tests() {  # $1: name of the logs; $2: time limit; then pytest arguments (paths, selection)
  local name=$1 seconds=$2 rc=0 parallel=()
  shift 2
  step "$name: pytest $* (limit $seconds s)"
  # Triton compiles on the host: spread the cases over worker processes where pytest-xdist is installed.
  local cores
  cores=$(nproc)
  (( cores > 16 )) && cores=16
  [[ "$DRY" == "1" ]] && cores=2
  "$BATCHLESS_PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n "${GPU_SESSION_WORKERS:-$cores}")
  # --junitxml: the record of every case's outcome (-q prints only the failures' names)
  limit "$seconds" "$BATCHLESS_PYTHON" -m pytest -q -ra --maxfail=50 --durations=15 "${parallel[@]}" \
    --junitxml="$LOGS/$name.xml" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  tail -15 "$LOGS/$name.log"
  # 5: nothing selected (a dry run without a GPU deselects every GPU case)
  [[ $rc == 0 || ($rc == 5 && "$DRY" == "1") ]] || echo "$name: $(outcome $rc) (see $name.log)"
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
    local rc=0
    limit "$seconds" "$sanitizer" --tool "$tool" --error-exitcode 1 "$BATCHLESS_PYTHON" .ci/sanitize_kernels.py \
      > "$LOGS/sanitizer-$tool.log" 2>&1 || rc=$?
    [[ $rc == 0 ]] && echo "$tool: clean" || echo "$tool: $(outcome $rc) (see sanitizer-$tool.log)"
    tail -5 "$LOGS/sanitizer-$tool.log"
  done
  pack
}

benchmark() {  # $1: time limit; $2: 1 to copy the results to $OUT as well as into the logs; then bench_batchless.py arguments
  local seconds=$1 to_out=$2 dir rc=0 file
  shift 2
  step "benchmark $* (limit $seconds s)"
  local log="$LOGS/bench$([[ $to_out == 1 ]] || echo -graphs).log" started="$LOGS/.bench-started"
  touch "$started"
  # bench_batchless.py itself, not bench/run.sh, which would set the environment up again (22 s on the H200)
  limit "$seconds" "$BATCHLESS_PYTHON" bench/bench_batchless.py "$@" > "$log" 2>&1 || rc=$?
  [[ $rc == 0 ]] || echo "benchmark: $(outcome $rc) (see $(basename "$log"))"
  tail -40 "$log"
  dir=$(sed -n 's/.*results will be written to //p' "$log" | tail -n 1)
  if [[ -n "$dir" && -d "$dir" ]]; then  # results.csv is rewritten after every case: a cut-off run keeps its rows
    mkdir -p "$LOGS/$(basename "$dir")" && cp "$dir"/* "$LOGS/$(basename "$dir")/" 2>/dev/null || true
    # Only what this run wrote: --update-reference writes into bench/results/<device>/, which holds the
    # committed summary and plot that a cut-off run has not rewritten yet.
    for file in "$dir"/results.csv "$dir"/summary.md "$dir"/*.png "$dir"/gpu_choice.json \
                batchless_kernels/gpu_choice.json; do  # the last: auto's table, which --update-reference rewrites
      [[ $to_out == 1 && -f "$file" && "$file" -nt "$started" ]] && cp "$file" "$OUT/"
    done
  else
    echo "benchmark: no results (see $(basename "$log"))"
  fi
  pack
}

stages() {  # $1: time limit. Each kernel stage's device time (bench/bench_stages.py), into the logs.
  local seconds=$1 args=()
  [[ "$DRY" == "1" ]] && args=(--device cpu --shapes 4x3x5x5 --dtypes float32)
  step "stage costs (limit $seconds s)"
  local rc=0
  limit "$seconds" "$BATCHLESS_PYTHON" bench/bench_stages.py "${args[@]}" --out "$LOGS/stages" > "$LOGS/stages.log" 2>&1 \
    || rc=$?
  [[ $rc == 0 ]] || echo "stages: $(outcome $rc) (see stages.log)"
  tail -25 "$LOGS/stages.log"
  pack
}

host_time() {  # $1: time limit. The host's time per small eager step, and its ops (.ci/profile_host.py).
  local seconds=$1 args=()
  [[ "$DRY" == "1" ]] && args=(--device cpu --steps 3)
  step "host time (limit $seconds s)"
  local rc=0
  limit "$seconds" "$BATCHLESS_PYTHON" .ci/profile_host.py "${args[@]}" > "$LOGS/host.log" 2>&1 || rc=$?
  [[ $rc == 0 ]] || echo "host: $(outcome $rc) (see host.log)"
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
  local rc=0
  # --clock-control none: the card's clocks are left as they are (never changed here)
  limit "$seconds" "$ncu" --clock-control none --profile-from-start off --csv --page details \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
    --log-file "$LOGS/ncu.csv" "$BATCHLESS_PYTHON" .ci/profile_kernels.py > "$LOGS/ncu.log" 2>&1 || rc=$?
  [[ $rc == 0 ]] || echo "ncu: $(outcome $rc) (see ncu.log)"
  tail -5 "$LOGS/ncu.log"
  [[ -s "$LOGS/ncu.csv" ]] && limit 20 "$BATCHLESS_PYTHON" bench/ncu_summary.py "$LOGS/ncu.csv" \
    > "$LOGS/ncu_summary.md" 2>&1 && cp "$LOGS/ncu_summary.md" "$OUT/" || echo "ncu_summary: none"
  pack
}

case "${1:-all}" in
  all)
    check_import
    # What only a GPU checks (same bits, 2^31 elements, graphs, compile) first, then the shared suite's
    # GPU cases but test_correctness's (which alone did not finish in 90 s on 8 workers), the benchmark,
    # and test_correctness's with the time it is given.
    run_tests tests-gpu "$t_gpu_tests" tests/test_gpu.py -m gpu
    run_tests tests "$t_tests" tests -m gpu --ignore=tests/test_gpu.py --ignore=tests/test_correctness.py
    if [[ "$DRY" == "1" ]]; then
      benchmark "$t_bench" 1 --device cpu --shapes 4x3x2x2 --dtypes float32 --layouts contiguous --budget 0.01 \
        --impls batchless-cpu,batchnorm --default-allocator --out "$OUT/bench"
    else
      benchmark "$t_bench" 1 "${GPU_BENCH_ARGS[@]}" --update-reference
    fi
    run_tests tests-correctness "$t_correctness" tests/test_correctness.py -m gpu
    # Device time without launch gaps, in a process of its own (a first attempt on the H200 ended
    # in an illegal memory access, which would have taken the eager results with it).
    [[ "$DRY" == "1" ]] || benchmark "$t_graphs" 0 "${GPU_BENCH_ARGS[@]}" --cuda-graphs --out "$LOGS/graph-run"
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
