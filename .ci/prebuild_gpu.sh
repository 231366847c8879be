#!/usr/bin/env bash
# Builds, on a CPU machine, the extension for the GPU machines (Python 3.12, torch 2.11.0+cu130 with
# CUDA 13.0, triton 3.6, Hopper sm_90; the CPU kernels for AVX2, which any such host has), so that a
# session's scarce device time is not spent compiling (~300 CPU-seconds). Then call the device with
#   carry: ["batchless_kernels/_C.cpython-312-x86_64-linux-gnu.so", "build/prebuilt-gpu.sources"]
# and `bash .ci/gpu_session.sh all`, which finds build/prebuilt-gpu.sources and uses the library as is
# when the sources it was built from are unchanged (BATCHLESS_PREBUILT in .ci/setup_env.sh).
# Needs python3.12 (PYTHON312, default the pyenv one) and downloads torch 2.11.0 (~3 GB) into .venv-gpu312.
#   bash .ci/prebuild_gpu.sh --check   only checks that the carried files still match the sources (run it
#                                      right before the device call: a mismatch costs the session a rebuild)
set -euo pipefail
cd "$(dirname "$0")/.."
so=batchless_kernels/_C.cpython-312-x86_64-linux-gnu.so
if [[ "${1:-}" == --check ]]; then
  [[ -f build/prebuilt-gpu.sources && -f "$so" ]] || { echo "prebuild_gpu --check: no prebuilt library" >&2; exit 1; }
  [[ "$(sed -n 1p build/prebuilt-gpu.sources)" == "$(python3 .ci/source_hash.py)" ]] \
    || { echo "prebuild_gpu --check: csrc/ or setup.py changed since the build: run it again" >&2; exit 1; }
  [[ "$(sed -n 2p build/prebuilt-gpu.sources)" == "$(sha256sum "$so" | cut -d' ' -f1)" ]] \
    || { echo "prebuild_gpu --check: $so is not the library built" >&2; exit 1; }
  echo "prebuild_gpu --check: $so matches the sources"
  exit 0
fi
mkdir -p build
# The first Python 3.12 that runs (a pyenv shim is on PATH even where that version is not selected).
py312=""
for candidate in ${PYTHON312:-} python3.12 /root/.pyenv/versions/3.12*/bin/python; do
  if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; then
    py312="$candidate"
    break
  fi
done
[[ -n "$py312" ]] || { echo "prebuild_gpu: no Python 3.12 found (set PYTHON312)" >&2; exit 1; }
[[ -x .venv-gpu312/bin/python ]] || "$py312" -m venv .venv-gpu312
.venv-gpu312/bin/python -c "import torch, triton, ninja" 2>/dev/null \
  || .venv-gpu312/bin/python -m pip install --progress-bar off torch==2.11.0 triton==3.6.0 ninja numpy
# The GPU machines' torch is 2.11.0+cu130: the build must use CUDA 13.0's headers and ABI.
.venv-gpu312/bin/python -c "
import torch, triton
assert torch.__version__.split('+')[0] == '2.11.0' and torch.version.cuda == '13.0', (torch.__version__, torch.version.cuda)
assert triton.__version__ == '3.6.0', triton.__version__" \
  || { echo "prebuild_gpu: .venv-gpu312 must hold torch 2.11.0 for CUDA 13.0 and triton 3.6.0" >&2; exit 1; }
export PATH="$PWD/.venv-gpu312/bin:$PATH" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
sources="$(.venv-gpu312/bin/python .ci/source_hash.py)"  # before the build: what it compiles
TORCH_CUDA_ARCH_LIST=9.0 BATCHLESS_BUILD_CUDA=1 BATCHLESS_CPU_ISA=avx2 \
  .venv-gpu312/bin/python -m pip install -v --no-build-isolation --no-deps -e . > build/prebuild-gpu.log 2>&1 \
  || { tail -40 build/prebuild-gpu.log; exit 1; }
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
