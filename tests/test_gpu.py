"""What only a GPU can check, for each GPU backend (cuda, triton): the same bits on every run,
agreement between the two backends, a tensor beyond 2^31 elements (64-bit offsets), CUDA-graph
capture, torch.compile on the device. Skipped cleanly on machines without a GPU; the shared
correctness suite (test_correctness.py) compares both backends with the float64 reference there."""

from __future__ import annotations

import pytest
import torch

import batchless_kernels as bk
from conftest import ALL_BACKENDS, assert_close_scaled, backend_params, loss_of, make_case, run_batchless

GPU_BACKENDS = [c for c in ALL_BACKENDS if c.device == "cuda" and c.name in ("cuda", "triton")]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPU_BACKENDS, reason="no GPU backend can run here (needs a CUDA GPU)"),
]

# Shapes that exercise every tiling: small and large planes, split planes, many row and channel
# blocks, odd sizes that defeat vector accesses, 2-D.
DETERMINISM_CASES = [
    ((64, 64, 28, 28), "contiguous"),
    ((8, 96, 7, 7), "contiguous"),
    ((2, 3, 517, 263), "contiguous"),
    ((32, 256, 14, 14), "channels_last"),
    ((4096, 1000), "contiguous"),
    ((97, 33, 5), "channels_innermost"),  # a transposed (N, L, C)
]


def _step(case, inputs):
    torch.manual_seed(1234)  # the same grad_y every time
    return run_batchless(*inputs, backend=case.name)


@pytest.mark.parametrize("case", backend_params(GPU_BACKENDS))
@pytest.mark.parametrize("shape, layout", DETERMINISM_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_bits_every_run(case, shape, layout, dtype):
    inputs = make_case(shape, layout, dtype, "cuda", "log")
    first, second = _step(case, inputs), _step(case, inputs)
    for name in ("y", "nll", "x", "mean", "std_param", "weight", "bias"):
        assert torch.equal(first[name], second[name]), f"{name} differs between runs"


@pytest.mark.skipif(len(GPU_BACKENDS) < 2, reason="needs both the cuda and the triton backend")
@pytest.mark.parametrize("shape, layout", DETERMINISM_CASES, ids=str)
def test_cuda_and_triton_agree(shape, layout):
    inputs = make_case(shape, layout, torch.float32, "cuda", "inv")
    cuda, triton = (_step(case, inputs) for case in GPU_BACKENDS[:2])
    # Sums over ~10^5 elements in two summation orders: absolute differences scale with the sums'
    # magnitude (a channel's dbias near 0 still carries the rounding of its ~300-sized partials).
    for name in ("y", "nll", "x", "mean", "std_param", "weight", "bias"):
        assert_close_scaled(cuda[name], triton[name], atol=1e-5, rtol=1e-5, what=name)


@pytest.mark.parametrize("case", backend_params(GPU_BACKENDS))
@pytest.mark.parametrize("layout", ["channels_last_2d", "contiguous"])
def test_beyond_2_pow_31_elements(case, layout):
    """64-bit offsets: a bf16 input of more than 2^31 elements (4.3 GB). y is checked at the far end,
    the sums against a chunked float64 computation."""
    channels = 64
    count = 2**31 // channels + 3  # elements per channel
    if layout == "contiguous":
        x = torch.randn(1, channels, count, device="cuda", dtype=torch.bfloat16)
        flat = x[0].t()  # (count, C) view for the checks
    else:
        flat = torch.randn(count, channels, device="cuda", dtype=torch.bfloat16)
        x = flat
    mean = torch.randn(channels, device="cuda") * 0.1
    std_param = torch.rand(channels, device="cuda") * 0.2
    with torch.no_grad():
        y, nll = bk.batchless_norm(x, mean, std_param, backend=case.name, need_nll=True)
    rstd = torch.exp(-std_param.double())
    y_flat = y[0].t() if layout == "contiguous" else y
    tail = (flat[-1000:].double() - mean.double()) * rstd
    torch.testing.assert_close(y_flat[-1000:].double(), tail.to(torch.bfloat16).double(), rtol=0, atol=0.02)
    s2 = torch.zeros(channels, dtype=torch.float64, device="cuda")
    for chunk in flat.split(1 << 24):
        s2 += ((chunk.double() - mean.double()) * rstd).square().sum(0)
    expected = (s2 / count).mean() / 2 - 0.5  # gauged NLL
    torch.testing.assert_close(nll.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", backend_params(GPU_BACKENDS))
def test_in_a_cuda_graph(case):
    """Forward and backward capture in a CUDA graph (no host syncs, no allocations outside the pool)
    and replay to the eager result."""
    inputs = [t.requires_grad_() for t in make_case((8, 16, 7, 7), "contiguous", torch.float32, "cuda", "log", True)]
    step = loss_of(case.name)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles and caches kernels outside the capture
        for _ in range(2):
            torch.autograd.grad(step(*inputs), inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(*inputs)
        grads = torch.autograd.grad(loss, inputs)
    with torch.no_grad():
        inputs[0].copy_(torch.randn_like(inputs[0]))
    graph.replay()
    eager = step(*inputs)
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, torch.autograd.grad(eager, inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", backend_params(GPU_BACKENDS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_under_torch_compile(case, layout):
    """fullgraph=True on the device: no graph break, the eager values and gradients."""
    inputs = [t.requires_grad_() for t in make_case((4, 24, 9, 10), layout, torch.float32, "cuda", "log", True)]
    eager = loss_of(case.name)(*inputs)
    compiled = torch.compile(loss_of(case.name), fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, inputs), torch.autograd.grad(eager, inputs)):
        torch.testing.assert_close(got, want)


def test_auto_picks_a_gpu_backend():
    x = torch.randn(4, 8, 5, 5, device="cuda")
    p = torch.zeros(8, device="cuda")
    expected = bk.backends.resolve_backend("auto", x.device)
    assert expected in ("cuda", "triton")
    y, _ = bk.batchless_norm(x, p, p)
    torch.testing.assert_close(y, x)


@pytest.mark.skipif(not any(c.name == "cuda" for c in GPU_BACKENDS), reason="needs the cuda backend")
@pytest.mark.parametrize("shape, layout", [((16, 64, 32, 32), "contiguous"), ((4096, 512), "contiguous")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_bits_do_not_depend_on_alignment(shape, layout, dtype):
    """The same values at a misaligned address (a view one element into a buffer) give the same bits:
    the vector width that groups the sums depends on the shape only."""
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, "cuda", "log")
    shifted = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")[1:].view(x.shape)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    case = next(c for c in GPU_BACKENDS if c.name == "cuda")
    aligned, misaligned = (_step(case, (t, mean, std_param, weight, bias)) for t in (x, shifted))
    for name in ("y", "nll", "x", "mean", "std_param", "weight", "bias"):
        assert torch.equal(aligned[name], misaligned[name]), f"{name} depends on the alignment"
