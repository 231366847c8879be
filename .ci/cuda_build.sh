#!/usr/bin/env bash
# CI without a GPU: compiles csrc/cuda against a CUDA build of torch (default 2.14.1, the newest
# supported, in .venv-cuda; .ci/run also runs it with 2.11, the oldest, which the GPU machines have)
# so that a compile error fails CI, checks that the CUDA kernels registered and spill nothing, and
# runs the test suite on that build (CPU tensors; the CUDA cases skip without a GPU).
# BATCHLESS_TORCH, BATCHLESS_TRITON and BATCHLESS_VENV_DIR choose the versions and the venv.
# Extra arguments go to pytest. Leaves the in-place extension built for that venv: the next
# `bash tests/run.sh` with .venv rebuilds it.
set -euo pipefail
cd "$(dirname "$0")/.."
export BATCHLESS_VENV=1 BATCHLESS_VENV_DIR="${BATCHLESS_VENV_DIR:-.venv-cuda}"
export BATCHLESS_TORCH="${BATCHLESS_TORCH:-torch==2.14.1}" BATCHLESS_TRITON="${BATCHLESS_TRITON:-triton==3.8.0}"
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

# No kernel may spill to local memory: read from the built device code (cuobjdump ships with triton).
import pathlib, re, shutil, subprocess
import triton
bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
cuobjdump = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
if cuobjdump is None:
    raise SystemExit("[cuda-build] cuobjdump not found (neither in the triton wheel nor on PATH)")
(library,) = pathlib.Path(ops.__file__).parent.glob("_C*.so")
usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(library)], capture_output=True, text=True,
                       check=True).stdout
kernels = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)", usage)
spilling = [name for name, _, local in kernels if int(local)]
if not kernels or spilling:
    raise SystemExit(f"[cuda-build] {len(kernels)} kernels found; using local memory: {spilling}")
print(f"[cuda-build] {len(kernels)} kernel images, at most {max(int(r) for _, r, _ in kernels)} registers, "
      "none uses local memory")
PY
exec "$BATCHLESS_PYTHON" -m pytest tests "$@"
