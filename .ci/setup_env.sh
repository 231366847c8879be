# Sourced by tests/run.sh and bench/run.sh: prepares a Python with torch and a freshly built
# batchless_kernels._C, and exports BATCHLESS_PYTHON. Works on a fresh machine:
#   - where `python3` already has torch (the GPU machines: torch 2.11 preinstalled, offline), it
#     uses that torch and builds against it;
#   - otherwise it creates .venv/ and installs torch there (BATCHLESS_TORCH, default the local
#     CPU wheel torch==2.13.0; use torch==2.14.1 for the CUDA build) with BATCHLESS_TRITON (default
#     the local triton==3.8.0; torch 2.11 wants triton==3.6.0) and BATCHLESS_EXTRA_PACKAGES (e.g.
#     "torchvision==0.29.1 timm" for bench/run.sh --models).
# Set BATCHLESS_VENV=1 to always use a venv, and BATCHLESS_VENV_DIR to name another one than .venv
# (.ci/cuda_build.sh keeps the CUDA build of torch in .venv-cuda, bench/run.sh --models .venv-models).
# Every step prints a line with the seconds since the start. On a fresh 2-core machine the venv
# takes ~35 s (uv, local wheels; ~1.5 minutes with pip) and the extension's CPU build ~1-1.5 minutes (measured under load).
#
# The extension is built in place (batchless_kernels/_C*.so), which every venv of this checkout
# shares. build/_C.built-for names the Python and torch it was built for, and each build is kept in
# build/so-cache/<that key>/, so that switching between venvs (tests/run.sh, .ci/cuda_build.sh,
# bench/run.sh --models) copies a build back instead of compiling again when no source changed.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"  # -P: the editable install records the real path
_python="${PYTHON:-python3}"
_venv="$_root/${BATCHLESS_VENV_DIR:-.venv}"
_t0=$SECONDS
_say() { echo "[setup $((SECONDS - _t0)) s] $*"; }

# The venv's packages with uv (Astral's package installer, from PyPI), which installs them in ~35 s where pip
# spends ~100 CPU-seconds a venv (CI's two cores install three); uv does not read pip's configuration,
# so pip's package sources are passed on (.ci/uv_index_args.py). Where uv cannot be had or fails,
# pip installs them. BATCHLESS_UV=0: pip only.
_install_with_uv() {
  [[ "${BATCHLESS_UV:-1}" == "1" ]] || return 1
  _say "installing ${_pkgs[*]} into $_venv with uv (its own install first; log: $_piplog)"
  "$BATCHLESS_PYTHON" -m pip install --quiet --progress-bar off uv >> "$_piplog" 2>&1 || { _say "no uv: pip instead"; return 1; }
  local _args=() _env=() _line
  while IFS= read -r _line; do
    if [[ "$_line" == SSL_CERT_FILE=* ]]; then _env+=("$_line"); else _args+=("$_line"); fi
  done < <("$BATCHLESS_PYTHON" "$_root/.ci/uv_index_args.py" 2>> "$_piplog")
  # No bytecode compiled at install (pip compiles all of it): the venv's processes compile what they
  # import, once, into build/pycache (below).
  env "${_env[@]}" "$BATCHLESS_PYTHON" -m uv pip install --python "$BATCHLESS_PYTHON" "${_args[@]}" \
      --upgrade-package pip --upgrade-package setuptools --upgrade-package wheel pip setuptools wheel "${_pkgs[@]}" \
      2>&1 | tee -a "$_piplog" | { grep --line-buffered -E '^(Resolved|Prepared|Installed|Uninstalled|error)' || true; } \
      | sed -u 's/^/  /'
  local _status=${PIPESTATUS[0]}
  (( _status == 0 )) || _say "uv failed (log: $_piplog): pip instead"
  return "$_status"
}

if [[ "${BATCHLESS_VENV:-0}" != "1" ]] && "$_python" -c "import torch" 2>/dev/null; then
  BATCHLESS_PYTHON="$(command -v "$_python")"
  _say "using the installed torch $("$_python" -c 'import torch; print(torch.__version__)') of $BATCHLESS_PYTHON"
  if ! "$BATCHLESS_PYTHON" -c "import ninja" 2>/dev/null && ! command -v ninja >/dev/null; then
    _say "installing ninja (the build needs it)"
    "$BATCHLESS_PYTHON" -m pip install --progress-bar off ninja
  fi
else
  if [[ ! -x "$_venv/bin/python" ]]; then
    _say "creating $_venv"
    "$_python" -m venv "$_venv"
  fi
  BATCHLESS_PYTHON="$_venv/bin/python"
  # The bytecode of what the venv's processes import, compiled by the first that imports a module and
  # kept in build/pycache (PYTHONPYCACHEPREFIX: nothing written beside the sources), also where
  # PYTHONDONTWRITEBYTECODE is set (these machines): without a cache every process compiled torch's
  # modules again (6 s instead of 2.5 for `import torch`). Compiling all of a venv at install took 81
  # CPU-seconds (10618 modules); a test process's imports (torch with dynamo and inductor, triton,
  # onnx, onnxruntime, sklearn, matplotlib, opacus) compile 3889 of them in ~25.
  export PYTHONPYCACHEPREFIX="$_root/build/pycache"
  unset PYTHONDONTWRITEBYTECODE
  # triton lets the tests run the triton backend under its interpreter; ninja compiles the
  # extension's files in parallel; scikit-learn ships the handwritten digits of examples/digits_cnn.py;
  # opacus (differential privacy) and onnx, onnxscript, onnxruntime (ONNX export) are what the
  # optional features' tests need.
  _pkgs=("${BATCHLESS_TORCH:-torch==2.13.0}" "${BATCHLESS_TRITON:-triton==3.8.0}" ninja numpy pytest
         pytest-xdist pytest-benchmark matplotlib scikit-learn opacus onnx onnxscript onnxruntime)
  read -r -a _extra <<< "${BATCHLESS_EXTRA_PACKAGES:-}"
  _modules="torch, triton, ninja, pytest, xdist, numpy, sklearn, matplotlib, opacus, onnx, onnxscript, onnxruntime"
  if (( ${#_extra[@]} )); then
    _pkgs+=("${_extra[@]}")
    _modules+=", $(printf '%s\n' "${_extra[@]}" | sed 's/[=<>!~;[].*//' | paste -sd, | sed 's/,/, /g')"
  fi
  if ! "$BATCHLESS_PYTHON" -c "import $_modules" 2>/dev/null; then
    mkdir -p "$_root/build"
    _piplog="$_root/build/setup_env-pip-$(basename "$_venv").log"  # one per venv: .ci/run installs two at once
    : > "$_piplog"
    if _install_with_uv; then
      _say "installed (uv)"
    else
      _say "installing ${_pkgs[*]} into $_venv with pip (torch from local wheels: ~1.5 minutes for the CPU build, ~2 for the 5.5 GB CUDA build)"
      "$BATCHLESS_PYTHON" -m pip install --quiet --upgrade pip setuptools wheel
      if ! "$BATCHLESS_PYTHON" -m pip install --progress-bar off "${_pkgs[@]}" 2>&1 | tee -a "$_piplog" \
           | { grep --line-buffered -E '^(Collecting|Processing|Installing collected)' || true; } \
           | sed -u -E 's/^Collecting ([^ ]+).*/  collecting \1/; s|^Processing (.*/)?([^-/ ]+-[^-/ ]+)-.*|  collecting \2|; s/^Installing collected packages: .*/  unpacking them.../'; then
        tail -n 30 "$_piplog"
        _say "pip install FAILED (full log: $_piplog)"
        exit 1
      fi
      _say "installed"
    fi
  fi
fi
export BATCHLESS_PYTHON
# BATCHLESS_SETUP_PACKAGES_ONLY=1: the venv and its packages, no build (.ci/run prepares the CUDA
# stages' venvs in the background this way).
if [[ "${BATCHLESS_SETUP_PACKAGES_ONLY:-0}" == "1" ]]; then
  return 0 2>/dev/null || exit 0
fi
# torch's BuildExtension looks for `ninja` on PATH; a venv's ninja lies beside its python.
export PATH="$(dirname "$BATCHLESS_PYTHON"):$PATH"

# Build the extension unless the in-place one was built for this Python and torch, is newer than
# every source, and imports; or restore this Python's cached build when that one is.
_key="$("$BATCHLESS_PYTHON" -c 'import sys, torch; print(sys.executable, torch.__version__)') cuda=${BATCHLESS_BUILD_CUDA:-auto} isa=${BATCHLESS_CPU_ISA:-auto} arch=${TORCH_CUDA_ARCH_LIST:-} debug=${BATCHLESS_HOST_DEBUG:-0}"
_cache="$_root/build/so-cache/$(printf '%s' "$_key" | cksum | cut -d' ' -f1)"
_stamp="$_root/build/_C.built-for"
_newer_than_sources() {  # $1: a built library
  [[ -n "$1" && -f "$1" && -z "$(find "$_root/csrc" "$_root/setup.py" -newer "$1" -type f 2>/dev/null | head -n 1)" ]]
}
_loads() {  # the package of this checkout imports in BATCHLESS_PYTHON, with its extension
  (cd / && "$BATCHLESS_PYTHON" -c "
import sys, batchless_kernels as bk
sys.exit(0 if bk.__file__.startswith('$_root/') and bk.ops.extension_loaded() else 1)" 2>/dev/null)
}
# This Python's library (several Pythons' builds can lie side by side, e.g. a carried GPU prebuild).
_so="$_root/batchless_kernels/_C$("$BATCHLESS_PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
_built_for="$(cat "$_stamp" 2>/dev/null || true)"
_cached="$(ls "$_cache"/_C*.so 2>/dev/null | head -n 1 || true)"
# BATCHLESS_PREBUILT: a file holding the source hash (.ci/source_hash.py) of a library built on another
# machine for this one (.ci/prebuild_gpu.sh), and that library's sha256: used as is when the sources
# are those, the library is that one and it loads, since file times do not survive the transfer.
_prebuilt_matches() {
  [[ -n "${BATCHLESS_PREBUILT:-}" && -f "$_so" ]] || return 1
  [[ "$(sed -n 1p "$BATCHLESS_PREBUILT" 2>/dev/null)" == "$("$BATCHLESS_PYTHON" "$_root/.ci/source_hash.py")" ]] \
    || { _say "the prebuilt library's sources differ from these: building"; return 1; }
  [[ "$(sed -n 2p "$BATCHLESS_PREBUILT" 2>/dev/null)" == "$(sha256sum "$_so" | cut -d' ' -f1)" ]] \
    || { _say "$(basename "$_so") is not the library $BATCHLESS_PREBUILT names: building"; return 1; }
}
if _prebuilt_matches && _loads; then
  _say "using the prebuilt $(basename "$_so") (built elsewhere from these sources)"
elif _newer_than_sources "$_so" && [[ -z "$_built_for" || "$_built_for" == "$_key" ]] && _loads; then
  if [[ -z "$_built_for" ]]; then  # built before the stamps existed: adopt it, and keep a copy
    mkdir -p "$_cache" && printf '%s\n' "$_key" > "$_stamp" && cp -p "$_so" "$_cache/"
  fi
elif [[ "$_built_for" != "$_key" ]] && _newer_than_sources "$_cached" \
     && cp -p "$_cached" "$_root/batchless_kernels/" && printf '%s\n' "$_key" > "$_stamp" && _loads; then
  _say "restored batchless_kernels._C built earlier for this Python from $_cache"
else
  mkdir -p "$_root/build"
  _log="$_root/build/setup_env-build.log"
  export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
  _say "building batchless_kernels._C with $MAX_JOBS parallel jobs (the CPU build takes ~1-1.5 minutes on 2 cores, \
the CUDA sources add ~5; one line per compiled file; full log: $_log)"
  rm -f "$_stamp"
  _b0=$SECONDS
  # pip -v passes the build's output through; ninja prints "[n/N] <command>" as each file is done.
  (cd "$_root" && exec "$BATCHLESS_PYTHON" -m pip install -v --no-build-isolation --no-deps -e .) > "$_log" 2>&1 < /dev/null &
  _pid=$!
  _seen=0
  while kill -0 "$_pid" 2>/dev/null; do
    sleep 2
    _lines="$(grep -E '^ *\[[0-9]+/[0-9]+\] ' "$_log" 2>/dev/null || true)"
    _n="$(printf '%s' "$_lines" | grep -c . || true)"
    if (( _n > _seen )); then
      printf '%s\n' "$_lines" | sed -n "$((_seen + 1)),${_n}p" | while IFS= read -r _line; do
        _step="$(printf '%s' "$_line" | grep -oE '^ *\[[0-9]+/[0-9]+\]' | tr -d ' ')"
        _file="$(printf '%s' "$_line" | grep -oE '[^ ]*/csrc/[^ ]+\.(cpp|cu)( |$)' | head -n 1 | sed -E 's|.*/csrc/|csrc/|; s/ $//')"
        _say "  $_step compiled ${_file:-a file} (build $((SECONDS - _b0)) s)"
      done
      _seen=$_n
    fi
  done
  if ! wait "$_pid"; then
    tail -n 60 "$_log"
    _say "the build FAILED (full log: $_log)"
    exit 1
  fi
  printf '%s\n' "$_key" > "$_stamp"
  rm -rf "$_cache" && mkdir -p "$_cache" && cp -p "$_so" "$_cache/"
  _say "built batchless_kernels._C in $((SECONDS - _b0)) s"
fi
"$BATCHLESS_PYTHON" -c "import batchless_kernels as bk; print('[setup $((SECONDS - _t0)) s] backends available:', bk.available_backends())"
# pytest's arguments to spread the test files over the cores where pytest-xdist is installed (the
# venv has it), a file at a time per worker (--dist loadfile: a file's module fixtures, such as the
# CUDA emulation's builds and sanitizer runs, stay in one process); a later -n 0 runs in one process.
BATCHLESS_PYTEST_PARALLEL=()
if "$BATCHLESS_PYTHON" -c "import xdist" 2>/dev/null; then BATCHLESS_PYTEST_PARALLEL=(-n auto --dist loadfile); fi
