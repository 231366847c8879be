#!/usr/bin/env bash
# The main job (README): sets itself up on a fresh machine, then benchmarks batchless_norm against
# BatchNorm on the GPU if there is one, else on the CPU. Arguments go to bench/bench_batchless.py
# (e.g. --full). Results land in bench/results/<device>/.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup_env.sh
exec "$BATCHLESS_PYTHON" bench/bench_batchless.py "$@"
