#!/usr/bin/env bash
# The C++ compiler of the CUDA emulation's sanitizer variants (build.py): torch's extension build gives
# every source the same flags, and this drops the sanitizer's (-fsanitize=..., --param=asan-...) from
# the compile of each source that BATCHLESS_EMU_INSTRUMENTED (file names, space-separated) does not
# name: the kernels and the engine are instrumented, the host side, the schemas and the Python
# bindings are not (what they do is torch's and pybind's, outside the sanitizers' subject; instrumented,
# they took ~60% of a variant's build). Links and other calls pass unchanged to BATCHLESS_EMU_CXX.
set -euo pipefail
compiler="${BATCHLESS_EMU_CXX:-c++}"
source_name=""
compiling=0
for arg in "$@"; do
  [[ "$arg" == "-c" ]] && compiling=1
  [[ "$arg" == *.cpp && -f "$arg" ]] && source_name="$(basename "$arg")"
done
if (( compiling )) && [[ -n "$source_name" && " ${BATCHLESS_EMU_INSTRUMENTED:-} " != *" $source_name "* ]]; then
  kept=()
  for arg in "$@"; do
    [[ "$arg" == -fsanitize=* || "$arg" == --param=asan-* ]] || kept+=("$arg")
  done
  exec "$compiler" "${kept[@]}"
fi
exec "$compiler" "$@"
