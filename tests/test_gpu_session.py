"""The GPU session script (.ci/gpu_session.sh all) dry-run on this machine: BATCHLESS_GPU_DRY_RUN=1
runs the same steps on CPU tensors, so that the selection, paths and outputs cannot rot between the
rare sessions that have a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_session_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "BATCHLESS_GPU_DRY_RUN": "1", "PYTHON": sys.executable,
           "BATCHLESS_VENV": "0"}
    done = subprocess.run(["bash", ".ci/gpu_session.sh", "all"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("setup.log", "import.log", "tests.log", "sanitizer-memcheck.log", "bench.log", "results.csv",
                 "summary.md", "steps.log"):
        assert (tmp_path / name).is_file(), f"{name} missing; stdout: {done.stdout[-2000:]}"
    assert "backends on cpu" in (tmp_path / "import.log").read_text()
    # -m gpu selects the GPU cases only: none runs here, and no CPU case was run
    tests = (tmp_path / "tests.log").read_text()
    assert " passed" not in tests and "deselected" in tests, tests[-1000:]
    assert "batchless-cpu" in (tmp_path / "results.csv").read_text()
    assert "FAILED" not in done.stdout, done.stdout[-2000:]
    assert "done" in (tmp_path / "steps.log").read_text()
