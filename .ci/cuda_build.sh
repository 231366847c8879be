#!/usr/bin/env bash
# CI without a GPU: compiles csrc/cuda against a CUDA build of torch (default 2.14.1, the newest
# supported, in .venv-cuda; .ci/run also runs it with 2.11, the oldest, which the GPU machines have)
# so that a compile error fails CI, checks the device code (.ci/check_cuda_code.py), and
# runs the test suite on that build (CPU tensors; the CUDA cases skip without a GPU).
# BATCHLESS_TORCH, BATCHLESS_TRITON and BATCHLESS_VENV_DIR choose the versions and the venv.
# Extra arguments go to pytest. Leaves the in-place extension built for that venv: the next
# `bash tests/run.sh` with .venv rebuilds it (the touch below makes every cached build look older
# than the sources).
set -euo pipefail
cd "$(dirname "$0")/.."
export BATCHLESS_VENV=1 BATCHLESS_VENV_DIR="${BATCHLESS_VENV_DIR:-.venv-cuda}"
export BATCHLESS_TORCH="${BATCHLESS_TORCH:-torch==2.14.1}" BATCHLESS_TRITON="${BATCHLESS_TRITON:-triton==3.8.0}"
export BATCHLESS_BUILD_CUDA=1
# A build of the CPU kernels alone must not pass for this one.
touch csrc/cuda/*.cu csrc/cuda/*.cpp
source .ci/setup_env.sh
"$BATCHLESS_PYTHON" .ci/check_cuda_code.py
exec "$BATCHLESS_PYTHON" -m pytest tests "${BATCHLESS_PYTEST_PARALLEL[@]}" "$@"
