"""The triton backend's own ops: opcheck of the custom ops (fake kernels, autograd registration,
schema) on the device where triton runs here (the GPU, or CPU tensors under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, loss_of, make_case

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


def test_triton_under_torch_compile():
    """fullgraph=True: the triton ops are opaque custom ops with fake kernels, no graph break."""
    inputs = [t.requires_grad_() for t in make_case((4, 3, 5, 6), "channels_last", torch.float32, _device(), "log", True)]
    eager = loss_of("triton")(*inputs)
    compiled = torch.compile(loss_of("triton"), fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, inputs), torch.autograd.grad(eager, inputs)):
        torch.testing.assert_close(got, want)
