"""The triton backend's own ops: opcheck of the custom ops (fake kernels, autograd registration,
schema) on the device where triton runs here (the GPU, or CPU tensors under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, make_case

TRITON_CASES = [b for b in ALL_BACKENDS if b.name == "triton"]
pytestmark = pytest.mark.skipif(not TRITON_CASES, reason="the triton backend cannot run here")


def _device():
    return "cuda" if any(c.device == "cuda" for c in TRITON_CASES) else "cpu"


def _ops():
    from batchless_kernels.triton import kernel_ops

    return kernel_ops()


@pytest.mark.parametrize("shape, layout", [((3, 5, 7), "contiguous"), ((2, 4, 3, 5), "channels_last"),
                                           ((6, 9), "contiguous"), ((2, 3, 4, 5), "strided")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("compute_stats", [True, False])
def test_opcheck_triton_forward(shape, layout, dtype, compute_stats):
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, _device(), "log", True)
    x.requires_grad_()
    weight.requires_grad_()
    forward, _ = _ops()
    torch.library.opcheck(forward, (x, mean.detach(), torch.exp(-std_param.detach()), weight, bias, compute_stats))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]], ids=str)
@pytest.mark.parametrize("shape, layout", [((3, 5, 7), "contiguous"), ((2, 4, 3, 5), "channels_last")], ids=str)
def test_opcheck_triton_backward(mask, shape, layout):
    x, mean, std_param, weight, _ = make_case(shape, layout, torch.float32, _device(), "log", True)
    _, backward = _ops()
    grad_y = torch.randn_like(x)
    torch.library.opcheck(backward, (grad_y, x if mask[1] else None, mean, torch.exp(-std_param), weight, mask))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channels_last_2d", "contiguous"])
def test_triton_beyond_2_pow_31_elements(layout):
    """64-bit offsets: a bf16 input of more than 2^31 elements (4.3 GB). y is checked at the far end,
    the sums against a chunked float64 computation."""
    import batchless_kernels as bk

    if not any(c.device == "cuda" for c in TRITON_CASES):
        pytest.skip("needs the triton backend on a GPU")
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
        y, nll = bk.batchless_norm(x, mean, std_param, backend="triton", need_nll=True)
    rstd = torch.exp(-std_param.double())
    y_flat = y[0].t() if layout == "contiguous" else y
    tail = (flat[-1000:].double() - mean.double()) * rstd
    torch.testing.assert_close(y_flat[-1000:].double(), tail.to(torch.bfloat16).double(), rtol=0, atol=0.02)
    s2 = torch.zeros(channels, dtype=torch.float64, device="cuda")
    for chunk in flat.split(1 << 24):
        s2 += ((chunk.double() - mean.double()) * rstd).square().sum(0)
    expected = (s2 / count).mean() / 2 - 0.5  # gauged NLL
    torch.testing.assert_close(nll.double(), expected, rtol=1e-4, atol=1e-5)


def _loss(backend):
    import batchless_kernels as bk

    def loss(x, mean, std_param, weight, bias):
        y, nll = bk.batchless_norm(x, mean, std_param, weight, bias, backend=backend)
        return y.square().mean() + nll

    return loss


def test_triton_under_torch_compile():
    """fullgraph=True: the triton ops are opaque custom ops with fake kernels, no graph break."""
    inputs = [t.requires_grad_() for t in make_case((4, 3, 5, 6), "channels_last", torch.float32, _device(), "log", True)]
    eager = _loss("triton")(*inputs)
    compiled = torch.compile(_loss("triton"), fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, inputs), torch.autograd.grad(eager, inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_triton_in_a_cuda_graph():
    """Forward and backward capture in a CUDA graph (no host syncs, no allocations outside the pool)
    and replay to the eager result."""
    if not any(c.device == "cuda" for c in TRITON_CASES):
        pytest.skip("needs the triton backend on a GPU")
    inputs = [t.requires_grad_() for t in make_case((8, 16, 7, 7), "contiguous", torch.float32, "cuda", "log", True)]
    step = _loss("triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles the kernels outside the capture
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
