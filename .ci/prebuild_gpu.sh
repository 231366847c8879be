#!/usr/bin/env bash
# Builds, on a CPU machine, the extension for the GPU machines (Python 3.12, torch 2.11.0+cu130 with
# CUDA 13.0, triton 3.6, Hopper sm_90; the CPU kernels for AVX2, which any such host has), so that a
# session's scarce device time is not spent compiling (~300 CPU-seconds). Then call the device with
#   carry: ["batchless_kernels/_C.cpython-312-x86_64-linux-gnu.so", "build/prebuilt-gpu.sources"]
# and `bash .ci/gpu_session.sh all`, which finds build/prebuilt-gpu.sources and uses the library as is
# when the sources it was built from are unchanged (BATCHLESS_PREBUILT in .ci/setup_env.sh).
# Needs python3.12 (PYTHON312, default the pyenv one) and downloads torch 2.11.0 (~3 GB) into .venv-gpu312.
set -euo pipefail
cd "$(dirname "$0")/.."
py312="${PYTHON312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python)}"
[[ -x .venv-gpu312/bin/python ]] || "$py312" -m venv .venv-gpu312
.venv-gpu312/bin/python -c "import torch, triton, ninja" 2>/dev/null \
  || .venv-gpu312/bin/python -m pip install --progress-bar off torch==2.11.0 triton==3.6.0 ninja numpy
export PATH="$PWD/.venv-gpu312/bin:$PATH" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
sources="$(.venv-gpu312/bin/python .ci/source_hash.py)"  # before the build: what it compiles
TORCH_CUDA_ARCH_LIST=9.0 BATCHLESS_BUILD_CUDA=1 BATCHLESS_CPU_ISA=avx2 \
  .venv-gpu312/bin/python -m pip install -v --no-build-isolation --no-deps -e . > build/prebuild-gpu.log 2>&1 \
  || { tail -40 build/prebuild-gpu.log; exit 1; }
so=batchless_kernels/_C.cpython-312-x86_64-linux-gnu.so
strip --strip-debug "$so"
if [[ "$(.venv-gpu312/bin/python .ci/source_hash.py)" != "$sources" ]]; then
  echo "prebuild_gpu: the sources changed during the build; run it again" >&2
  exit 1
fi
# The sources' hash, and the library's own: setup_env.sh uses exactly this file, not any older
# library of that name.
printf '%s\n%s\n' "$sources" "$(sha256sum "$so" | cut -d' ' -f1)" > build/prebuilt-gpu.sources
.venv-gpu312/bin/python -c "import batchless_kernels as bk; assert bk.ops.has_kernel(bk.ops.FORWARD_OP, 'CUDA'); print('loads, CUDA kernels:', bk.ops.extension_loaded())"
ls -la "$so" build/prebuilt-gpu.sources
