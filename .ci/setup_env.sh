# Sourced by tests/run.sh and bench/run.sh: prepares a Python with torch and a freshly built
# batchless_kernels._C, and exports BATCHLESS_PYTHON. Works on a fresh machine:
#   - where `python3` already has torch (the GPU machines: torch 2.11 preinstalled, offline), it
#     uses that torch and builds against it;
#   - otherwise it creates .venv/ and installs torch there (BATCHLESS_TORCH, default the local
#     CPU wheel torch==2.13.0; use torch==2.14.1 for the CUDA build) with BATCHLESS_TRITON (default
#     the local triton==3.8.0; torch 2.11 wants triton==3.6.0).
# Set BATCHLESS_VENV=1 to always use a venv, and BATCHLESS_VENV_DIR to name another one than .venv
# (.ci/cuda_build.sh keeps the CUDA build of torch in .venv-cuda).
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_python="${PYTHON:-python3}"
_venv="$_root/${BATCHLESS_VENV_DIR:-.venv}"

if [[ "${BATCHLESS_VENV:-0}" != "1" ]] && "$_python" -c "import torch" 2>/dev/null; then
  BATCHLESS_PYTHON="$(command -v "$_python")"
  echo "[setup] using the installed torch $("$_python" -c 'import torch; print(torch.__version__)') of $BATCHLESS_PYTHON"
else
  if [[ ! -x "$_venv/bin/python" ]]; then
    echo "[setup] creating $_venv"
    "$_python" -m venv "$_venv"
  fi
  BATCHLESS_PYTHON="$_venv/bin/python"
  # triton lets the tests run the triton backend under its interpreter;
  # scikit-learn ships the handwritten digits of examples/digits_cnn.py.
  if ! "$BATCHLESS_PYTHON" -c "import torch, triton, ninja, pytest, numpy, sklearn, matplotlib" 2>/dev/null; then
    echo "[setup] installing ${BATCHLESS_TORCH:-torch==2.13.0}, ${BATCHLESS_TRITON:-triton==3.8.0} and the tools into $_venv"
    "$BATCHLESS_PYTHON" -m pip install --quiet --upgrade pip setuptools wheel
    "$BATCHLESS_PYTHON" -m pip install --quiet "${BATCHLESS_TORCH:-torch==2.13.0}" "${BATCHLESS_TRITON:-triton==3.8.0}" \
      ninja numpy pytest pytest-benchmark matplotlib scikit-learn
  fi
fi
export BATCHLESS_PYTHON

# Build the extension unless it is newer than every source it comes from.
_so="$(ls "$_root"/batchless_kernels/_C*.so 2>/dev/null | head -n 1 || true)"
if [[ -z "$_so" || -n "$(find "$_root/csrc" "$_root/setup.py" -newer "$_so" -type f 2>/dev/null | head -n 1)" ]] \
   || ! "$BATCHLESS_PYTHON" -c "import batchless_kernels, sys; sys.exit(0 if batchless_kernels.ops.extension_loaded() else 1)" 2>/dev/null; then
  echo "[setup] building batchless_kernels._C"
  (cd "$_root" && "$BATCHLESS_PYTHON" -m pip install --quiet --no-build-isolation --no-deps -e .)
fi
"$BATCHLESS_PYTHON" -c "import batchless_kernels as bk; print('[setup] backends available:', bk.available_backends())"
