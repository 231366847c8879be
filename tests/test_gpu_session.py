"""The GPU session script (.ci/gpu_session.sh all) dry-run on this machine: BATCHLESS_GPU_DRY_RUN=1
runs the same steps on CPU tensors, so that the selection, paths and outputs cannot rot between the
rare sessions that have a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_session_dry_run(tmp_path):
    # No CUDA emulation, as on the GPU machine: under BATCHLESS_CUDA_EMULATION=1 (CI) the session's
    # pytest steps would build it where stale, a minute of g++ past their time limits.
    # The steps' time limits are the H200 machine's: here 120 s each, since the dry run checks what
    # the steps run and write, not their time, and CI's two cores are shared with the other worker
    # (the sanitizer builds): there the host step's BatchNorm took 108 ms a step, and the 25 s limit
    # cut it off, and the 60 s one the tiny benchmark before it wrote a row.
    env = {**os.environ, "OUT": str(tmp_path), "BATCHLESS_GPU_DRY_RUN": "1", "PYTHON": sys.executable,
           "BATCHLESS_VENV": "0", "BATCHLESS_CUDA_EMULATION": "0", "GPU_SESSION_LIMITS": " ".join(["120"] * 9),
           "GPU_SESSION_DEADLINE": "3000"}
    done = subprocess.run(["bash", ".ci/gpu_session.sh", "all"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The device tool brings back at most 8 files: the logs come packed, the results as written.
    assert len([p for p in tmp_path.iterdir() if p.is_file()]) <= 8
    for name in ("gpu_session.tar.gz", "steps.log", "results.csv", "summary.md"):
        assert (tmp_path / name).is_file(), f"{name} missing; stdout: {done.stdout[-2000:]}"
    logs = tmp_path / "logs"
    with tarfile.open(tmp_path / "gpu_session.tar.gz") as archive:
        archive.extractall(logs, filter="data")
    for name in ("setup.log", "import.log", "tests-gpu.log", "tests-gpu.xml", "tests.log", "tests.xml",
                 "tests-correctness.log",
                 "sanitizer-memcheck.log", "bench.log", "ncu.log", "stages.log", "stages/stages.csv", "host.log",
                 "bench/results.csv", "steps.log"):
        assert (logs / name).is_file(), f"{name} missing from the archive; stdout: {done.stdout[-2000:]}"
    assert "backends on cpu" in (logs / "import.log").read_text()
    # -m gpu selects the GPU cases only: none runs here (deselected, or skipped for want of a GPU), and no
    # CPU case was run; test_correctness's run in a step of their own
    for name in ("tests.log", "tests-correctness.log"):
        tests = (logs / name).read_text()
        assert " passed" not in tests and any(w in tests for w in ("deselected", "skipped", "no tests ran")), \
            tests[-1000:]
    assert "test_correctness" not in (logs / "tests.xml").read_text()
    assert "batchless-cpu" in (tmp_path / "results.csv").read_text()
    assert "FAILED" not in done.stdout, done.stdout[-2000:]
    assert "done" in (tmp_path / "steps.log").read_text()


def test_gpu_session_shows_a_failed_setup(tmp_path):
    """setup_env.sh is sourced and ends its failures with exit: that ended the session past its
    `|| { cat setup.log; pack; }`, so a failed setup on the device printed nothing and brought back nothing."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "BATCHLESS_GPU_DRY_RUN": "1", "PYTHON": "false",
           "BATCHLESS_VENV": "1", "BATCHLESS_VENV_DIR": str(tmp_path / "no-venv")}
    done = subprocess.run(["bash", ".ci/gpu_session.sh", "all"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "setup: FAILED" in done.stdout and "creating" in done.stdout, done.stdout[-2000:]
    with tarfile.open(tmp_path / "out" / "gpu_session.tar.gz") as archive:
        assert "./setup.log" in archive.getnames()


def test_gpu_session_refuses_a_wrong_count_of_limits(tmp_path):
    """GPU_SESSION_LIMITS with fewer numbers left steps without a limit: each failed at once."""
    env = {**os.environ, "OUT": str(tmp_path), "BATCHLESS_GPU_DRY_RUN": "1", "GPU_SESSION_LIMITS": "90 60 60 30 45"}
    done = subprocess.run(["bash", ".ci/gpu_session.sh", "all"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "must hold 9 numbers" in done.stderr, done.stderr


def test_gpu_benchmark_arguments_are_accepted():
    """The GPU session's benchmark runs only on a GPU: its arguments, as the script writes them, must
    still parse here (bench_batchless.parse_args), so that an option renamed since cannot waste a session."""
    text = (ROOT / ".ci" / "gpu_session.sh").read_text()
    line = next(line for line in text.splitlines() if line.startswith("GPU_BENCH_ARGS=("))
    args = line[len("GPU_BENCH_ARGS=("):line.rindex(")")].split()
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_batchless
    finally:
        sys.path.remove(str(ROOT / "bench"))
    for extra in (["--update-reference"], ["--cuda-graphs", "--out", "somewhere"]):
        parsed = bench_batchless.parse_args(args + extra)
        assert parsed.budget == 0.05
        import batchless_kernels as bk

        for impl in parsed.impls.split(","):  # bench_batchless.implementations' names
            assert impl in ("batchnorm", "batchnorm-compiled") or impl.removeprefix("batchless-") in bk.BACKENDS[1:]
    assert '"${GPU_BENCH_ARGS[@]}" --update-reference' in text and '"${GPU_BENCH_ARGS[@]}" --cuda-graphs' in text
