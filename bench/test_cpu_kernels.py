# Run: pytest bench/test_cpu_kernels.py --benchmark-only   (not collected by plain `pytest`: testpaths = tests)
"""pytest-benchmark suite of the fused CPU backend: training forward, backward and forward+backward
of bk.batchless_norm(backend="cpu") at a moderate shape, both layouts, float32 and bfloat16.
Reuses bench_batchless.py's inputs and passes, so the two measure the same thing."""

import pytest
import torch

import batchless_kernels as bk

pytest.importorskip("pytest_benchmark")
from bench_batchless import PASSES, Case, batchless_forward, last_level_cache_bytes, pass_steps  # noqa: E402

pytestmark = pytest.mark.skipif(
    "cpu" not in bk.available_backends("cpu"), reason="the cpu backend (batchless_kernels._C) is not built"
)

SHAPE = (32, 64, 32, 32)
CPU = torch.device("cpu")


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_backend(benchmark, pass_name, layout, dtype):
    case = Case(SHAPE, dtype, layout, CPU, last_level_cache_bytes(CPU))
    setup, run = pass_steps(batchless_forward("cpu"), case, pass_name)
    # setup (the fresh forward before a timed backward) stays out of the timing
    benchmark.pedantic(run, setup=lambda: ((setup(),), {}), rounds=50, warmup_rounds=2)
