"""Gaussians shared over any set of the non-batch axes (the author's shared_axes): parameters of any
shape that broadcasts to x.shape[1:]. Every backend against the float64 reference, for each sharing
pattern and layout; the module bk.BatchlessNorm with nll_loss, init_from_data and fuse_for_inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import batchless_kernels as bk
from conftest import ALL_BACKENDS, TOLS, assert_close_scaled, backend_params, make_x, run_batchless, run_reference64

BACKENDS = backend_params(ALL_BACKENDS)

# (x shape, parameter shape): per position, one for the layer, leading axes, trailing axes, a mixed
# pattern that no view of x maps onto one axis (the reference runs it), 3-D and 2-D inputs.
PATTERNS = [
    ((3, 4, 5, 6), (4, 5, 6)),
    ((3, 4, 5, 6), (1, 1, 1)),
    ((3, 4, 5, 6), (4, 5, 1)),
    ((3, 4, 5, 6), (1, 5, 6)),
    ((3, 4, 5, 6), (4, 1, 6)),
    ((3, 4, 5, 6), (4, 1, 1)),
    ((2, 3, 7), (3, 7)),
    ((2, 3, 7), (1, 7)),
    ((7, 5), (1,)),
]


def _params(shape, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    mean = torch.randn(shape, generator=g) * 0.5
    std_param = torch.rand(shape, generator=g) + 0.5  # positive: a valid sigma for every parametrization
    weight = torch.randn(shape, generator=g)
    bias = torch.randn(shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (mean, std_param, weight, bias)]


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("x_shape, param_shape", PATTERNS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("parametrization", ["abs", "inv"])
def test_shared_axes_match_the_reference(case, x_shape, param_shape, layout, parametrization):
    if layout == "channels_last" and len(x_shape) != 4:
        pytest.skip("channels_last is a 4-D layout")
    x = make_x(x_shape, layout, torch.float32, case.device)
    params = _params(param_shape, case.device)
    grad_y = torch.randn(x_shape).to(case.device)
    out = run_batchless(x, *params, backend=case.name, grad_y=grad_y, parametrization=parametrization)
    ref = run_reference64(x, *params, grad_y=grad_y, parametrization=parametrization)
    atol, rtol = TOLS[torch.float32]
    assert out["y"].shape == x.shape and out["y"].stride() == x.stride()
    for name in ("y", "nll", "x", "mean", "std_param", "weight", "bias"):
        assert out[name].shape == ref[name].shape, name
        assert_close_scaled(out[name], ref[name], atol, rtol, what=name)


def test_per_channel_shapes_agree():
    """(C, 1, 1) on 4-D x is the per-channel (C,) of today, to the bit on the fused backends."""
    x = make_x((3, 4, 5, 6))
    flat = _params((4,), "cpu")
    y1, n1 = bk.batchless_norm(x, *flat, need_nll=True)
    y2, n2 = bk.batchless_norm(x, *[t.view(4, 1, 1) for t in flat], need_nll=True)
    assert torch.equal(y1, y2) and torch.equal(n1, n2)


def test_shape_errors_name_the_argument():
    x = torch.randn(2, 4, 5, 6)
    ok = torch.zeros(4, 5, 6)
    with pytest.raises(ValueError, match=r"std_param must have shape \(4,\) or a shape of 3 dims"):
        bk.batchless_norm(x, ok, torch.zeros(4, 3, 6))
    with pytest.raises(ValueError, match=r"weight has shape \(1, 1, 1\), unlike mean's \(4, 5, 6\)"):
        bk.batchless_norm(x, ok, ok, torch.ones(1, 1, 1))
    for bad in ((4, 0, 1), (), 0, (4, True), np.bool_(True), 2.0, "3"):
        with pytest.raises(ValueError, match="param_shape must be a positive int or a non-empty tuple of positive ints"):
            bk.BatchlessNorm(bad)
    # numpy's integers, as every int option takes them
    assert bk.BatchlessNorm(np.int64(3)).param_shape == (3,)
    assert bk.BatchlessNorm((np.int64(3), np.int32(1))).param_shape == (3, 1)
    with pytest.raises(ValueError, match=r"param_shape=\(4, 5, 6\), which does not broadcast"):
        bk.BatchlessNorm((4, 5, 6))(torch.randn(2, 4, 5, 7))


@pytest.mark.parametrize("param_shape", [(8, 1, 1), (8, 6, 6), (1, 1, 1), (1, 6, 6)], ids=str)
def test_module_with_toolkit(param_shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bk.BatchlessNorm(param_shape, parametrization="abs"),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 2)).double()
    layer = model[1]
    assert layer.param_shape == param_shape and layer.per_channel == (param_shape[1:] == (1, 1))
    assert f"param_shape={param_shape}" in repr(layer)
    x = torch.randn(10, 3, 6, 6, dtype=torch.float64)
    # init_from_data: mean and sigma per Gaussian, over the axes it shares
    bk.init_from_data(model, x)
    h = model[0](x).detach()
    dims = [0] + [1 + i for i, d in enumerate(param_shape) if d == 1]
    torch.testing.assert_close(layer.mean.detach(), h.mean(dims, keepdim=True)[0])
    std = (h.var(dims, keepdim=True, unbiased=False)[0] + layer.eps).sqrt()
    torch.testing.assert_close(layer.std.detach(), std)
    # training: the NLL reaches nll_loss and every parameter gets a gradient
    loss = model(x).square().mean() + bk.nll_loss(model)
    loss.backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in layer.parameters())
    # inference: folded into the conv when per channel, else a ChannelAffine of the same shape
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = bk.fuse_for_inference(model)
    kind = nn.Identity if param_shape == (8, 1, 1) else bk.ChannelAffine
    assert isinstance(fused[1], kind)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", BACKENDS)
def test_equivalent_shapes_may_be_mixed(case):
    """(C,) and (C, 1, 1) name the same Gaussians: mixing them works on every backend."""
    x = make_x((2, 3, 4, 5), device=case.device)
    mean, std_param, weight, bias = _params((3,), case.device)
    y, nll = bk.batchless_norm(x, mean, std_param, weight.view(3, 1, 1), bias, backend=case.name, need_nll=True)
    y_ref, nll_ref = bk.reference.batchless_norm(x, mean, std_param, weight, bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, nll_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("param_shape", [(5, 4, 1), (1, 4, 3), (5, 1, 1)], ids=str)
def test_compiles_with_dynamic_shapes_in_one_graph(param_shape):
    """torch.compile(dynamic=True, fullgraph=True) of a BatchlessNorm or of batchless_norm with shared-axes
    parameters: the broadcast checks' `d in (1, full)` with a symbolic size raised a false ValueError inside
    Dynamo ('does not broadcast to the input's (s81, s16, s31)'); without fullgraph, a graph break."""
    x = torch.randn(3, 5, 4, 3)
    layer = bk.BatchlessNorm(param_shape)
    with torch.no_grad():
        layer.mean.normal_()
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend="aot_eager")
    for batch in (3, 6):
        xb = torch.randn(batch, 5, 4, 3)
        torch.testing.assert_close(compiled(xb), layer(xb))
    p = torch.zeros(param_shape, requires_grad=True)
    y, nll = torch.compile(lambda x: bk.batchless_norm(x, p, p), dynamic=True, fullgraph=True, backend="aot_eager")(x)
    expected = bk.batchless_norm(x, p, p)
    torch.testing.assert_close(y, expected[0])
    torch.testing.assert_close(nll, expected[1])
