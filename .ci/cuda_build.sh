#!/usr/bin/env bash
# CI without a GPU: compiles csrc/cuda against the CUDA build of torch (2.14.1, in .venv-cuda) so
# that a compile error fails CI, checks that the CUDA kernels registered, and runs the test suite on
# that build (CPU tensors; the CUDA cases skip without a GPU), which also tests the newest torch.
# Extra arguments go to pytest. Leaves the in-place extension built for .venv-cuda: the next
# `bash tests/run.sh` with .venv rebuilds it.
set -euo pipefail
cd "$(dirname "$0")/.."
export BATCHLESS_VENV=1 BATCHLESS_VENV_DIR=.venv-cuda BATCHLESS_TORCH="${BATCHLESS_TORCH:-torch==2.14.1}"
export BATCHLESS_BUILD_CUDA=1
# A build of the CPU kernels alone must not pass for this one.
touch csrc/cuda/*.cu
source .ci/setup_env.sh
"$BATCHLESS_PYTHON" - <<'PY'
import torch
import batchless_kernels.ops as ops
ops_cuda = [op for op in (ops.FORWARD_OP, ops.BACKWARD_OP, ops.NLL_OP, ops.NLL_BACKWARD_OP)
            if not ops.has_kernel(op, "CUDA")]
if ops_cuda:
    raise SystemExit(f"[cuda-build] no CUDA kernel registered for {ops_cuda}")
print(f"[cuda-build] torch {torch.__version__} (CUDA {torch.version.cuda}): all 4 ops have CUDA kernels")
PY
exec "$BATCHLESS_PYTHON" -m pytest tests "$@"
