#!/usr/bin/env bash
# The test command (README): sets itself up on a fresh machine, then runs the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k modules -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup_env.sh
exec "$BATCHLESS_PYTHON" -m pytest tests "${BATCHLESS_PYTEST_PARALLEL[@]}" "$@"
