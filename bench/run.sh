#!/usr/bin/env bash
# The main job (README): sets itself up on a fresh machine, then benchmarks batchless_norm against
# BatchNorm on the GPU if there is one, else on the CPU (bench/bench_batchless.py), and with
# --models the model-level benchmark after it (bench/bench_models.py).
#
#   bash bench/run.sh [ARGS...]                       kernel benchmark; ARGS go to bench_batchless.py (e.g. --full)
#   bash bench/run.sh [ARGS...] --models [MARGS...]   then the model benchmark; MARGS go to bench_models.py
#   bash bench/run.sh --models-only [MARGS...]        the model benchmark alone
#
# Results land in a new bench/runs/<device>/<time>/ folder each (--update-reference: bench/results/).
# The model benchmark needs torchvision and timm, which on the CPU machines need the CUDA build of
# torch (torch==2.14.1 + torchvision==0.29.1 from local wheels, timm from PyPI): it gets its own venv,
# .venv-models (~5.5 GB, ~3 minutes to set up, plus a build of the extension against that torch),
# which is why it is an option rather than part of the default job. Where `python3` has a GPU and
# torchvision (and timm) installed, that Python runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

kernel_args=() model_args=() kernel=1 models=0
while (( $# )); do
  case "$1" in
    --models) models=1; shift; model_args=("$@"); break ;;
    --models-only) models=1; kernel=0; shift; model_args=("$@"); break ;;
    *) kernel_args+=("$1"); shift ;;
  esac
done

if (( kernel )); then
  # a subshell each: setup_env exports the Python it prepared, and the two jobs may use two
  (source .ci/setup_env.sh && "$BATCHLESS_PYTHON" bench/bench_batchless.py "${kernel_args[@]}")
fi

if (( models )); then
  echo "[bench] the model-level benchmark (bench/bench_models.py)"
  _python="${PYTHON:-python3}"
  # (without timm, pass --models resnet18: EfficientNet-B0 comes from timm)
  if "$_python" -c "import torch, torchvision, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    (source .ci/setup_env.sh && "$BATCHLESS_PYTHON" bench/bench_models.py "${model_args[@]}")
  elif "$_python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[bench] $_python has a GPU but not torchvision, and this machine may have no package index:" \
         "install torchvision and timm builds that match $("$_python" -c 'import torch; print(torch.__version__)')" \
         "(e.g. from wheels carried here), then run again" >&2
    exit 1
  else
    # No GPU: the CPU run needs no CUDA kernels, so the extension is built for the CPU only.
    (export BATCHLESS_VENV=1 BATCHLESS_VENV_DIR="${BATCHLESS_MODELS_VENV_DIR:-.venv-models}" \
            BATCHLESS_TORCH="${BATCHLESS_MODELS_TORCH:-torch==2.14.1}" \
            BATCHLESS_EXTRA_PACKAGES="${BATCHLESS_MODELS_PACKAGES:-torchvision==0.29.1 timm}" \
            BATCHLESS_BUILD_CUDA="${BATCHLESS_BUILD_CUDA:-0}"
     source .ci/setup_env.sh && "$BATCHLESS_PYTHON" bench/bench_models.py "${model_args[@]}")
  fi
fi
