"""Every backend against the executable spec (bk.reference) run in float64 on the same inputs.

Checked for each case: y, nll and the gradients of x, mean, std_param, weight, bias; y's dtype,
shape and (for dense layouts) strides; nll's dtype; each gradient's dtype.

Tolerances:
  float32 / float64: assert_close vs float64 with (atol, rtol); atol is relative to the output's
    scale max(1, max|ref|), as the per-channel sums grow with the number of elements.
  bfloat16 / float16: inputs and outputs are rounded to a few significant bits, so a fixed
    tolerance would be either meaningless or flaky. The budget is relative to the executable spec
    run in the same low dtype (bk.reference computes in fp32 and rounds once, the best one can
    do): the backend's max error vs the float64 reference must be <= 2x the reference-in-the-same-
    dtype's max error (room for one extra rounding, e.g. an fma) + a floor of 1e-5 x scale for
    fp32 summation-order noise, which is far below a bf16/fp16 ulp (2^-8 / 2^-11).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import batchless_kernels as bk
from conftest import (
    ALL_BACKENDS,
    DTYPE_TOLS,
    GRAD_NAMES,
    LOW_PRECISION,
    TESTED_BACKENDS,
    TOLS,
    accumulation_dtype,
    assert_close_scaled,
    assert_within_budget,
    backend_params,
    is_dense_layout,
    layout_applies,
    make_case,
    make_params,
    make_x,
    run_batchless,
    run_reference64,
    same_strides,
)

BACKENDS = backend_params(TESTED_BACKENDS)
PARAMETRIZATIONS = ("abs", "log", "inv")
OUTPUT_NAMES = ("y", "nll") + GRAD_NAMES


def check_against_reference(case, x, mean, std_param, weight, bias, *, atol, rtol, dense=True,
                            grad_y=None, **kwargs):
    """Runs `case`'s backend and the float64 spec on the same inputs and compares everything."""
    dtype = x.dtype
    if grad_y is None:
        values = torch.randn(x.shape).to(dtype=dtype, device=x.device)
        # grad_y laid out like y (what autograd usually hands over); contiguous for strided x
        grad_y = torch.empty_like(x).copy_(values) if dense else values
    out = run_batchless(x, mean, std_param, weight, bias, backend=case.name, grad_y=grad_y, **kwargs)
    ref = run_reference64(x, mean, std_param, weight, bias, grad_y=grad_y, **kwargs)

    # Metadata: y like x, nll in the accumulation dtype, gradients like their inputs.
    y = out["y"]
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    if dense:
        assert same_strides(y, x), f"y strides {y.stride()} != x strides {x.stride()}"
    assert out["nll"] is not None and out["nll"].dim() == 0
    assert out["nll"].dtype == accumulation_dtype(x.dtype)
    assert out["x"].dtype == x.dtype and out["x"].shape == x.shape
    for name, t in zip(GRAD_NAMES[1:], (mean, std_param, weight, bias)):
        if t is None:
            assert out[name] is None, name
        else:
            assert out[name] is not None, f"no gradient for {name}"
            assert out[name].dtype == t.dtype, f"{name}.grad dtype {out[name].dtype} != {t.dtype}"
            assert out[name].shape == t.shape

    low = None
    low_outputs = [n for n in OUTPUT_NAMES if out[n] is not None and out[n].dtype in LOW_PRECISION]
    if dtype in LOW_PRECISION or low_outputs:
        # the spec run in the same (low) dtypes sets the budget; e.g. bf16 params give bf16 grads
        low = run_batchless(x, mean, std_param, weight, bias, fn=bk.reference.batchless_norm, grad_y=grad_y,
                            **{k: v for k, v in kwargs.items() if k != "need_nll"})
        low_atol = TOLS[torch.bfloat16][0]
    for name in OUTPUT_NAMES:
        if ref[name] is None:
            continue
        if dtype in LOW_PRECISION or name in low_outputs:
            assert_within_budget(out[name], low[name], ref[name], low_atol, what=name)
        elif out[name].dtype == torch.float32 and dtype == torch.float64:
            # e.g. the float32 gradient of a float32 parameter of float64 x: float32 rounding
            assert_close_scaled(out[name], ref[name], *TOLS[torch.float32], what=name)
        else:
            assert_close_scaled(out[name], ref[name], atol, rtol, what=name)
    return out, ref


# ------------------------------------------------------------------------------------------------
# The core matrix: parametrization x gauge x affine x dtype, on a channels-first and a 2-D shape
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("gauge", [True, False], ids=["gauge", "nogauge"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape", [(3, 5, 17), (7, 13)], ids=str)
def test_matrix(case, dtype, atol, rtol, parametrization, gauge, affine, shape):
    x, mean, std_param, weight, bias = make_case(shape, "contiguous", dtype, case.device, parametrization, affine)
    check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol,
                            parametrization=parametrization, gauge=gauge)


# ------------------------------------------------------------------------------------------------
# Shapes x layouts: ranks 2 to 5, odd/prime sizes, N = 1, C = 1, planes split along S (CPU: every 128
# vector chunks, 2048 elements with AVX2; CUDA and Triton tiles), channel blocking (C > 2048
# channels-innermost), narrow C with long columns. Parametrization / gauge / affine are cycled.
# ------------------------------------------------------------------------------------------------

SMALL_SHAPES = [(1, 1), (7, 13), (3, 5, 17), (2, 3, 5, 7), (1, 1, 3, 3), (2, 3, 2, 3, 5), (4, 17, 31),
                (5, 1, 19), (1, 7, 2, 3)]
BIG_SHAPES = [
    (2, 3, 131, 129),  # S = 16899: channels-first planes split along S on every backend
    (3, 2053),  # 2-D is channels-innermost: C > 2048 gives several channel blocks
    (300, 2100),
    (2, 2053, 3, 3),  # channels_last / channels_innermost with C > 2048
    (700, 2, 33),  # channels-first with several blocks of n per channel
    (5, 2, 4099),  # S = 4099: a vector body plus a 3-element tail; channels-innermost, 2 long columns
    (1, 1, 139264),  # 34 tiles on one channel (CUDA, 132 SMs): the second stage's warp has 32 lanes, 2 take 2
]
GAUGE_AFFINE = list(itertools.product((True, False), (True, False)))


def _shape_layout_cases():
    """Every shape x applicable layout x dtype, with one parametrization each, cycled so that every
    shape and layout sees the three (r's formula is per channel: the tiling and the layout do not
    change it; test_matrix crosses every parametrization with every dtype, gauge and affine).
    float32 always has gauge and affine (the sanitizers' selection, tests/test_cuda_emulation.py,
    runs float32 for weight's and bias's accesses); the other dtypes cycle through the four."""
    cases, group = [], 0
    for shape in SMALL_SHAPES + BIG_SHAPES:
        for layout in ("contiguous", "channels_last", "channels_innermost", "strided"):
            if not layout_applies(layout, len(shape)):
                continue
            if shape == (2, 2053, 3, 3) and layout == "contiguous":
                continue  # channels-first: nothing the other big shapes do not cover
            for i, dtype_param in enumerate(DTYPE_TOLS):
                dtype, atol, rtol = dtype_param.values
                parametrization = PARAMETRIZATIONS[(group + i) % len(PARAMETRIZATIONS)]
                gauge, affine = (True, True) if i == 0 else GAUGE_AFFINE[(group + i) % len(GAUGE_AFFINE)]
                cases.append(pytest.param(
                    shape, layout, dtype, atol, rtol, parametrization, gauge, affine,
                    id=f"{shape}-{layout}-{dtype_param.id}-{parametrization}-{'gauge' if gauge else 'nogauge'}"
                       f"-{'affine' if affine else 'noaffine'}".replace(" ", ""),
                ))
            group += 1
    return cases


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("shape, layout, dtype, atol, rtol, parametrization, gauge, affine", _shape_layout_cases())
def test_shapes_layouts(case, shape, layout, dtype, atol, rtol, parametrization, gauge, affine):
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, case.device, parametrization, affine)
    check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol,
                            dense=is_dense_layout(layout), parametrization=parametrization, gauge=gauge)


CPU_CASES = [c for c in BACKENDS if c.values[0].name == "cpu"]


@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("shape, layout", [((9, 600), "contiguous"), ((3, 1100, 2, 3), "channels_last")], ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_cpu_channels_last_row_groups(case, shape, layout, dtype, atol, rtol, affine):
    """The CPU kernels' channels-last rows by groups of 4 (tasks of >= 512 channels: the training
    forward, the backward for 32/64-bit elements): groups, a tail of rows (9 = 2 * 4 + 1; 18 = 4 * 4
    + 2) and a partial vector (600, 1100 channels), against the float64 spec."""
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, case.device, "log", affine)
    check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol, parametrization="log",
                            gauge=True)


# Inputs whose rows are narrower than a vector chunk of the CPU kernels (K = 16 float32, bfloat16 or
# float16 elements with AVX2, 8 float64; 32 and 16 with AVX-512): channels-last C < K, channels-first
# planes S < K. The CPU walks them as channels-last rows of P "wide channels" (WideRows in
# csrc/cpu/batchless_norm_cpu.cpp: P >= 256 a multiple of the row's R elements, and of K when R < K;
# e.g. 288 for C = 3 in float32), with a partial last row when P does not divide x (its tail shorter
# or longer than K). The numbers below are float32's with AVX2.
NARROW_ROW_SHAPES = [
    ((4099, 3), "contiguous"),  # 2-D is channels-last: C = 3, 42 rows of 288 and a tail of 201
    ((1923, 3), "contiguous"),  # a tail of 9 < K: masked chunks
    ((50021, 1), "contiguous"),  # C = 1, several row blocks
    ((37, 5, 11, 13), "channels_last"),
    ((1, 7, 61, 67), "channels_last"),  # one sample
    ((9, 15, 40, 41), "channels_last"),  # C = 15 < K in float32, >= K in float64 (its own path)
    ((9, 17, 20, 21), "channels_last"),  # with AVX-512 (K = 32): P = 544, row groups and a partial row
    ((5, 2, 4099), "channels_innermost"),
    ((700, 6, 2, 2), "contiguous"),  # planes of 4: samples of 24 elements, P = 264 holds 11, a tail
    ((409, 3, 1, 5), "contiguous"),  # planes of 5: samples of 15 < K elements, P = 480
    ((131, 5, 3, 3), "contiguous"),  # planes of 9: 45-element samples, P = 270
    ((97, 300, 2, 3), "contiguous"),  # P = 1800 >= 512: the row groups of the training forward and backward
    ((20, 700, 2, 2), "contiguous"),  # P = 2800 > 2048: tasks of two channel blocks
    ((7, 64, 3, 3), "contiguous"),  # 7 rows: below kMinWideRows, walked as they lie
]


@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("shape, layout", NARROW_ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_cpu_narrow_rows(case, shape, layout, dtype, atol, rtol):
    """Rows narrower than a chunk against the float64 spec (every output, sums folded from the wide
    channels back to the channels), and inference's y with the training y's bits."""
    i = NARROW_ROW_SHAPES.index((shape, layout))
    parametrization = PARAMETRIZATIONS[i % len(PARAMETRIZATIONS)]
    # affine: the backward's sums (dweight, dbias) folded too; without, test_partial_requires_grad
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, case.device, parametrization, affine=True)
    gauge = i % 2 == 0
    out, _ = check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol,
                                     dense=is_dense_layout(layout), parametrization=parametrization, gauge=gauge)
    with torch.no_grad():
        y, _ = bk.batchless_norm(x, mean, std_param, weight, bias, parametrization=parametrization, backend=case.name)
    assert torch.equal(y, out["y"])


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("x_layout, g_layout", [
    ("contiguous", "channels_last"),
    ("channels_last", "contiguous"),
    ("channels_innermost", "contiguous"),
    ("contiguous", "expanded"),
    ("channels_last", "expanded"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_grad_y_layout_differs_from_x(case, x_layout, g_layout, dtype, affine):
    """Autograd may hand backward a grad_y laid out unlike x (y.sum() gives an expanded one).
    Without affine, backward does not even keep x: only grad_y's layout is known there."""
    shape = (3, 6, 5, 7)
    x, mean, std_param, weight, bias = make_case(shape, x_layout, dtype, case.device, "log", affine)
    if g_layout == "expanded":
        grad_y = torch.tensor(0.625, dtype=dtype, device=case.device).expand(shape)
    else:
        grad_y = make_x(shape, g_layout, dtype, case.device)
    atol, rtol = TOLS[dtype]
    check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol, grad_y=grad_y)


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_innermost_in_another_order(case, dtype):
    """Channels innermost with N not outermost ((H, W, N, C) in memory): docs/api.md says it is
    copied, not read in place as (N, *, C) is; the values are the reference's either way, and the
    compiled backends return a contiguous y where the reference follows x's stride order."""
    shape = (3, 6, 5, 7)
    values = make_x((shape[2], shape[3], shape[0], shape[1]), "contiguous", dtype, case.device)
    x = values.permute(2, 3, 0, 1)  # (N, C, H, W) with strides (C, 1, 7 N C, N C)
    assert x.stride(1) == 1 and not x.movedim(1, -1).is_contiguous()
    _, mean, std_param, weight, bias = make_case(shape, "contiguous", dtype, case.device, "log", True)
    atol, rtol = TOLS[dtype]
    out, _ = check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol, dense=False,
                                     grad_y=make_x(shape, "contiguous", dtype, case.device))
    if case.name != "reference":
        assert out["y"].is_contiguous(), out["y"].stride()


# ------------------------------------------------------------------------------------------------
# Mixed dtypes, partial affine, partial requires_grad, edge values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("x_dtype, param_dtype", [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.float64, torch.float32),
], ids=str)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("shape, layout", [((4, 6, 3, 5), "channels_last"), ((9, 11), "contiguous")], ids=str)
def test_mixed_dtypes(case, x_dtype, param_dtype, parametrization, shape, layout):
    x, mean, std_param, weight, bias = make_case(shape, layout, x_dtype, case.device, parametrization,
                                                 param_dtype=param_dtype)
    # the kernels compute in the accumulation dtype of x (fp32, fp64 for fp64 x) whatever the
    # parameters' dtype: x's dtype sets the tolerance
    atol, rtol = TOLS[x_dtype]
    out, _ = check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol,
                                     parametrization=parametrization)
    assert out["nll"].dtype == accumulation_dtype(x_dtype)
    for name in ("mean", "std_param", "weight", "bias"):
        assert out[name].dtype == param_dtype


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("has_weight, has_bias", [(True, False), (False, True)])
@pytest.mark.parametrize("shape, layout", [((2, 5, 3, 7), "contiguous"), ((2, 5, 3, 7), "channels_last"),
                                           ((6, 9), "contiguous")], ids=str)
def test_weight_or_bias_only(case, has_weight, has_bias, shape, layout):
    x, mean, std_param, weight, bias = make_case(shape, layout, torch.float32, case.device, "abs")
    atol, rtol = TOLS[torch.float32]
    check_against_reference(case, x, mean, std_param, weight if has_weight else None, bias if has_bias else None,
                            atol=atol, rtol=rtol, parametrization="abs")


@pytest.mark.parametrize("case, shape", [
    *(pytest.param(*c.values, (3, 4, 5, 6), id=c.id, marks=c.marks) for c in BACKENDS),
    # the CPU's wide channels (test_cpu_narrow_rows), both layouts
    *(pytest.param(*c.values, (600, 3, 2, 2), id=f"{c.id}-narrow", marks=c.marks) for c in CPU_CASES),
])
@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "x,bias", "weight,bias", "x,weight", "mean",
                                    "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_partial_requires_grad(case, shape, wanted, layout):
    """Backward with only some of x, weight, bias wanted (the op's output_mask variations)."""
    x, mean, std_param, weight, bias = make_case(shape, layout, torch.float32, case.device, "log")
    wanted = set(wanted.split(","))
    leaves = {n: t.detach().requires_grad_(n in wanted) for n, t in
              zip(GRAD_NAMES, (x, mean, std_param, weight, bias))}
    y, nll = bk.batchless_norm(*leaves.values(), backend=case.name)
    grad_y = torch.randn(x.shape, device=case.device)
    ref = run_reference64(x, mean, std_param, weight, bias, grad_y=grad_y, nll_grad=1.0)
    if "mean" in wanted:
        assert nll is not None
        nll.backward()
    else:
        assert nll is None  # no parameter of the NLL requires grad
    assert y.requires_grad == bool(wanted & {"x", "weight", "bias"})
    if y.requires_grad:
        y.backward(grad_y)
    for name, leaf in leaves.items():
        if name in wanted:
            assert_close_scaled(leaf.grad, ref[name], 1e-5, 1e-5, what=name)
        else:
            assert leaf.grad is None, name


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
def test_y_of_frozen_inputs_needs_no_grad(case):
    """x, weight, bias frozen, the NLL's mean and std_param training: y has no gradient to take on any
    backend (the reference's y kept a StopGradient node to mean and std_param, requires_grad True)."""
    x = torch.randn(2, 3, 4, device=case.device)
    mean, std_param = (torch.zeros(3, device=case.device, requires_grad=True) for _ in range(2))
    y, nll = bk.batchless_norm(x, mean, std_param, torch.ones(3, device=case.device), None, backend=case.name)
    assert not y.requires_grad and nll.requires_grad


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("parametrization", ["abs", "inv"])
@pytest.mark.parametrize("shape, layout", [((4, 3, 5, 5), "contiguous"), ((4, 3, 5, 5), "channels_last"),
                                           ((17, 3), "contiguous")], ids=str)
def test_zero_std_param(case, dtype, parametrization, shape, layout):
    """std_param = 0 on some channels: abs gives sigma = eps (r = 1e5), inv gives r = 0 (y = beta,
    and the sums S1 = S2 = 0 that nll_from_sums divides by r0)."""
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, case.device, parametrization)
    std_param = std_param.clone()
    std_param[0] = 0.0
    std_param[-1] = 0.0
    eps = 1e-2 if parametrization == "abs" else 1e-5  # abs: keep r = 1/eps moderate for fp32
    atol, rtol = TOLS[dtype]
    out, _ = check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol,
                                     parametrization=parametrization, eps=eps)
    if parametrization == "inv":
        torch.testing.assert_close(out["y"][:, 0].cpu(), bias[0].expand_as(out["y"][:, 0]).cpu())


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("shape, layout", [((4, 5, 6, 7), "contiguous"), ((64, 24), "contiguous")], ids=str)
def test_large_offset_inputs(case, shape, layout):
    """Activations far from 0 with mean near them: xhat must be computed centred."""
    mu = torch.full((shape[1],), 1000.0) + torch.randn(shape[1])
    sigma = torch.rand(shape[1]) + 0.5
    x = make_x(shape, layout, torch.float32, case.device, mu=mu, sigma=sigma)
    mean, std_param, weight, bias = make_params(shape[1], "log", device=case.device, mu=mu, sigma=sigma)
    check_against_reference(case, x, mean, std_param, weight, bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("dtype, scale", [(torch.bfloat16, 4e-38), (torch.float16, 2e-4), (torch.float32, 4e-38)],
                         ids=str)
@pytest.mark.parametrize("shape, layout", [((4, 3, 5, 7), "contiguous"), ((64, 5), "contiguous")], ids=str)
def test_subnormal_inputs(case, dtype, scale, shape, layout):
    """Activations and statistics at the dtype's subnormal numbers (bf16 x ~ 1e-39, sigma ~ 1e-38): the
    Triton interpreter converted bf16 subnormals wrongly (9.2e-41 to 0, 4.6e-40 to 2.9e-39), so y and
    dmean were off by up to 6x; each backend must convert them as the reference does."""
    mu, sigma = torch.randn(shape[1]) * scale * 0.1, (torch.rand(shape[1]) + 1) * scale
    x = make_x(shape, layout, dtype, case.device, mu=mu, sigma=sigma * 0.2)  # r <= 1/scale: dx stays finite
    assert (x.abs() < torch.finfo(dtype).tiny).float().mean() > 0.5  # mostly subnormal
    mean, std_param, weight, bias = make_params(shape[1], "log", device=case.device, mu=mu, sigma=sigma)
    std_param = torch.log(sigma).to(case.device)  # make_params clamps sigma to [0.3, 3]
    check_against_reference(case, x, mean, std_param, weight, bias, atol=1e-5, rtol=1e-5)


# The shapes whose per-channel sums are longest in each backend: narrow channels-last (many rows per
# channel), one long plane, many small planes.
LONG_SUM_SHAPES = [((24000, 2), "contiguous"), ((5, 2, 4099), "channels_innermost"),
                   ((2, 2, 96, 96), "channels_last"), ((1, 1, 200, 200), "contiguous"), ((8000, 2, 3), "contiguous"),
                   # the CPU's blocks of 128 rows or samples (kNarrow), where rows and planes are not narrower
                   # than a chunk (narrower ones: wide channels, see NARROW_ROW_SHAPES)
                   ((4096, 16), "contiguous"), ((2000, 2, 17), "contiguous")]


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("shape, layout", LONG_SUM_SHAPES, ids=str)
def test_long_sums_stay_accurate(case, shape, layout):
    """n equal terms added one after another in float32 are off by about n * 6e-9 of their sum (5e-5
    at n = 8192, where torch.sum's cascade keeps 1e-7). x constant per channel makes the forward's
    sums s1 = sum xhat and s2 = sum xhat^2 such sums, and a constant grad_y the backward's dweight
    and dbias: with grad_y = 0, dmean is s1's (times per-channel factors) and, with the gauge, the
    NLL is s2's (sum_c s2_c / (2 n C) - 1/2, with xhat in [1.2, 1.6) so that the first term is 1.5 to
    3 times the NLL, which amplifies s2's error rather than hiding it); with grad_y =
    0.7, dweight and dbias. 5e-6 allows chains of a few hundred adds; the kernels' are shorter.
    Not for triton under the interpreter: its tl.sum is numpy's, which adds a tile's rows one after
    another where the compiled reduction is a tree (test_triton.py::test_sums_add_short_chains
    checks the plan instead)."""
    if case.name == "triton" and case.device == "cpu":
        pytest.skip("the interpreter's tl.sum adds rows in sequence, unlike the compiled kernels")
    channels = shape[1]
    mean, std_param, weight, bias = make_params(channels, "log")
    level = mean + (0.4 * torch.rand(channels) + 1.2) * torch.exp(std_param)  # xhat in about [1.2, 1.6)
    x = make_x(shape, layout, torch.float32, case.device, mu=level, sigma=torch.zeros(channels))
    mean, std_param, weight, bias = (t.to(case.device) for t in (mean, std_param, weight, bias))

    def relative_error(got, want):
        return ((got.cpu().double() - want.cpu()).abs() / want.cpu().abs()).max().item()

    for fill, names in ((0.0, ("nll", "mean")), (0.7, ("weight", "bias"))):
        grad_y = torch.empty_like(x).fill_(fill)
        out = run_batchless(x, mean, std_param, weight, bias, backend=case.name, grad_y=grad_y, gauge=True)
        ref = run_reference64(x, mean, std_param, weight, bias, grad_y=grad_y, gauge=True)
        for name in names:
            error = relative_error(out[name], ref[name])
            assert error <= 5e-6, f"{name} (grad_y = {fill}): relative error {error:.2e} (allowed 5e-6)"


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("gauge", [False, True], ids=["no-gauge", "gauge"])
def test_nll_over_many_channels_stays_accurate(case, gauge):
    """The NLL's totals over channels (mean log sigma, sum of s2): the CPU added them in one float32 chain,
    6e-4 off at C = 65537 (with gauge=False; the gauge cancels the log term's share)."""
    channels = 65537
    torch.manual_seed(0)
    x = torch.randn(2, channels, device=case.device)
    mean = torch.zeros(channels, device=case.device)
    std_param = torch.full((channels,), 1.1, device=case.device)
    grad_y = torch.ones_like(x)
    out = run_batchless(x, mean, std_param, None, None, backend=case.name, grad_y=grad_y, gauge=gauge)
    ref = run_reference64(x, mean, std_param, None, None, grad_y=grad_y, gauge=gauge)
    error = abs(out["nll"].double().item() - ref["nll"].item()) / abs(ref["nll"].item())
    assert error <= 2e-6, f"relative error {error:.2e}"


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t (same strides) that starts `offset` elements into a larger buffer."""
    size = t.untyped_storage().nbytes() // t.element_size()
    buffer = torch.empty(size + offset, dtype=t.dtype, device=t.device)
    view = buffer.as_strided(t.shape, t.stride(), offset)
    return view.copy_(t)


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("shape, layout", [((2, 3, 4, 8), "contiguous"), ((3, 16, 2, 3), "channels_last"),
                                           ((5, 24), "contiguous")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_misaligned_inputs(case, shape, layout, dtype):
    """x and grad_y starting 1, 2 or 4 elements into their buffers (16-byte vectors impossible; the
    CUDA kernels fall back to the widest access the alignment allows: 8, 4 or 2 bytes) give the
    reference's values, and the same bits as at offset 0 (the sums' grouping depends on the shape only)."""
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, case.device, "log")
    grad_y = torch.empty_like(x).copy_(torch.randn(shape))
    atol, rtol = TOLS[dtype]
    aligned, _ = check_against_reference(case, x, mean, std_param, weight, bias, atol=atol, rtol=rtol, grad_y=grad_y)
    for offset in (1, 2, 4):
        shifted_x, shifted_g = _at_offset(x, offset), _at_offset(grad_y, offset)
        assert shifted_x.storage_offset() == offset and torch.equal(shifted_x, x)
        out, _ = check_against_reference(case, shifted_x, mean, std_param, weight, bias, atol=atol, rtol=rtol,
                                         grad_y=shifted_g)
        for name in OUTPUT_NAMES:
            if aligned[name] is not None:
                assert torch.equal(out[name], aligned[name]), f"{name} at offset {offset} differs from offset 0"


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
def test_tiny_sigma_gradients_stay_finite(case, parametrization):
    """sigma = 1e-25 with activations of that scale (eps = 1e-30): in float32, r = 1e25 is
    representable but r^2 is not; every gradient is (dL/dstd_param ~ 1e23 for abs), so each must
    come out finite and equal to the float64 reference's."""
    eps = 1e-30
    x = make_x((4, 3, 5, 5), "contiguous", torch.float32, case.device) * 1e-25
    std = torch.tensor([1e-25, 2e-25, 5e-26], dtype=torch.float64)
    std_param = bk.parametrization.param_from_std(std, parametrization, eps).float().to(case.device)
    mean = (torch.randn(3) * 1e-26).to(case.device)
    weight, bias = torch.rand(3, device=case.device) + 0.5, torch.randn(3, device=case.device)
    out, _ = check_against_reference(case, x, mean, std_param, weight, bias, atol=1e-5, rtol=1e-4,
                                     parametrization=parametrization, eps=eps)
    assert out["std_param"].abs().max() > 1e20 or parametrization != "abs"


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("parametrization, bad", [("log", math.inf), ("abs", math.inf), ("abs", -math.inf),
                                                  ("log", math.nan), ("inv", math.nan)], ids=str)
@pytest.mark.parametrize("gauge", [True, False], ids=["gauge", "nogauge"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's inf - inf
def test_non_finite_sigma_gives_a_non_finite_nll(case, parametrization, bad, gauge):
    """A diverged std_param reaches the loss as inf or NaN on every backend, as in the reference (NaN
    with the gauge: log sigma - sg(log sigma)): with the gauge, the compiled backends cancelled mean
    log sigma analytically and returned a finite NLL."""
    x = make_x((2, 3, 4), "contiguous", torch.float32, case.device)
    std_param = torch.tensor([0.5, bad, 0.3], device=case.device)
    nlls = [bk.batchless_norm(x, torch.zeros(3, device=case.device), std_param.clone().requires_grad_(),
                              parametrization=parametrization, gauge=gauge, backend=backend)[1]
            for backend in (case.name, "reference")]
    assert not torch.isfinite(nlls[1])
    torch.testing.assert_close(nlls[0], nlls[1], equal_nan=True)


def _pinned_case(parametrization):
    """x = [[1], [3]] (N=2, C=1), mean 1, sigma 2 (r = 0.5), weight 3, bias -1: xhat = [0, 1],
    y = [-1, 2], S1 = 1, S2 = 1, n = 2. Values from docs/method.md by hand:
      nll (gauge off) = log 2 + S2 / (2n) = log 2 + 1/4;  with the gauge: 1/2 (S2/n - 1) = -1/4
      dnll/dmean = -r S1 / n = -1/4;  dnll/dsigma = (1 - S2/n) / sigma = 1/4
      dnll/dp: abs (p = 2 - eps) 1/4, log (p = log 2) sigma * 1/4 = 1/2,
               inv (p = 1/2) -1/(p + eps) + p * sum (x - mu)^2 / n = -2 + 1 = -1 (eps ~ 0)."""
    p = {"abs": 2.0 - 1e-12, "log": math.log(2.0), "inv": 0.5}[parametrization]
    dp = {"abs": 0.25, "log": 0.5, "inv": -1.0}[parametrization]
    return p, dp


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
@pytest.mark.parametrize("gauge", [False, True])
def test_pinned_values(case, parametrization, gauge):
    """A few values of y, the NLL and its gradients computed by hand, independently of reference.py."""
    p, dp = _pinned_case(parametrization)
    dev = case.device
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64, device=dev, requires_grad=True)
    mean = torch.tensor([1.0], dtype=torch.float64, device=dev, requires_grad=True)
    std_param = torch.tensor([p], dtype=torch.float64, device=dev, requires_grad=True)
    weight = torch.tensor([3.0], dtype=torch.float64, device=dev, requires_grad=True)
    bias = torch.tensor([-1.0], dtype=torch.float64, device=dev, requires_grad=True)
    y, nll = bk.batchless_norm(x, mean, std_param, weight, bias, parametrization=parametrization, eps=1e-12,
                               gauge=gauge, backend=case.name)
    close = lambda a, b: torch.testing.assert_close(a.detach().cpu(), torch.tensor(b, dtype=torch.float64),  # noqa: E731
                                                    rtol=1e-9, atol=1e-9)
    close(y, [[-1.0], [2.0]])
    close(nll, -0.25 if gauge else math.log(2.0) + 0.25)
    (y * torch.tensor([[1.0], [2.0]], dtype=torch.float64, device=dev)).sum().add(nll).backward()
    close(mean.grad, [-0.25])
    close(std_param.grad, [dp])
    close(x.grad, [[1.5], [3.0]])  # grad_y * weight * r
    close(weight.grad, [2.0])  # sum grad_y * xhat
    close(bias.grad, [3.0])  # sum grad_y


# ------------------------------------------------------------------------------------------------
# need_nll, no_grad
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("shape, layout", [((3, 5, 4, 6), "contiguous"), ((3, 5, 4, 6), "channels_last"),
                                           ((11, 7), "contiguous"), ((3, 5, 9), "strided")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("parametrization", ["inv", "log"])
def test_need_nll(case, shape, layout, dtype, parametrization):
    """The NLL only where asked for, and y with the same bits on every path: training (the training
    op), need_nll=False (the forward op), no_grad and frozen layers (the inference op)."""
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, case.device, parametrization)
    params = [t.detach().requires_grad_() for t in (mean, std_param, weight, bias)]
    kwargs = dict(parametrization=parametrization, backend=case.name)
    y_with, nll_with = bk.batchless_norm(x, *params, **kwargs)
    assert nll_with is not None  # default: grad mode on and mean/std_param require grad
    y_without, nll_without = bk.batchless_norm(x, *params, **kwargs, need_nll=False)
    assert nll_without is None
    assert torch.equal(y_with, y_without)

    with torch.no_grad():
        y_ng, nll_ng = bk.batchless_norm(x, *params, **kwargs)
        assert nll_ng is None and not y_ng.requires_grad
        assert torch.equal(y_ng, y_with)
        _, nll_forced = bk.batchless_norm(x, *params, **kwargs, need_nll=True)
        assert nll_forced is not None
        assert torch.equal(nll_forced, nll_with.detach())

    # parameters that do not require grad: no NLL by default, and y carries no graph
    y_frozen, nll_frozen = bk.batchless_norm(x.detach(), mean, std_param, weight, bias, **kwargs)
    assert nll_frozen is None and not y_frozen.requires_grad
    assert torch.equal(y_frozen, y_with)
    # need_nll=False with only mean and std_param requiring grad: they are constants of y (sg)
    y_sg, _ = bk.batchless_norm(x.detach(), params[0], params[1], weight, bias, **kwargs, need_nll=False)
    assert not y_sg.requires_grad and torch.equal(y_sg, y_with)


# ------------------------------------------------------------------------------------------------
# NLL gradients vs docs/method.md's closed forms, independently of the reference
# ------------------------------------------------------------------------------------------------


def closed_form(x, mean, std_param, parametrization, eps, gauge):
    """(nll, dL/dmean, dL/dstd_param) from docs/method.md "Gradients", in float64:
        xhat = (x - mu) r,  S1 = sum xhat,  S2 = sum xhat^2 per channel,  n elements per channel
        dL/dmu    = -(r / (C n)) S1
        dL/dsigma = (1 / (C sigma)) (1 - S2 / n),  dL/dp = dL/dsigma dsigma/dp  (abs, log)
        inv: L = mean_c [-log(|p| + eps) + 1/2 p^2 mean (x - mu)^2], differentiated in p directly
        L = mean_c [log sigma + S2 / (2n)]  (- mean_c log sigma - 1/2 with the gauge)."""
    x = x.double()
    mu = mean.double()
    p = std_param.double()
    C = x.shape[1]
    n = x.numel() // C
    xc = x.movedim(1, -1).reshape(-1, C) - mu  # (n, C)
    if parametrization == "abs":
        sigma = p.abs() + eps
        log_sigma = sigma.log()
        dsigma_dp = torch.sign(p)
    elif parametrization == "log":
        sigma = p.exp()
        log_sigma = p
        dsigma_dp = sigma
    else:
        sigma = 1.0 / p
        log_sigma = -(p.abs() + eps).log()
    r = 1.0 / sigma
    S1 = (xc * r).sum(0)
    S2 = (xc * r).square().sum(0)
    nll = (log_sigma + S2 / (2 * n)).mean()
    if gauge:
        nll = nll - log_sigma.mean() - 0.5
    dmu = -(r / (C * n)) * S1
    if parametrization == "inv":
        dp = (-torch.sign(p) / (p.abs() + eps) + p * xc.square().sum(0) / n) / C
    else:
        dsigma = (1.0 / (C * sigma)) * (1.0 - S2 / n)
        dp = dsigma * dsigma_dp
    return nll, dmu, dp


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("gauge", [True, False], ids=["gauge", "nogauge"])
@pytest.mark.parametrize("dtype, atol, rtol", [p for p in DTYPE_TOLS if p.values[0] in (torch.float32, torch.float64)])
@pytest.mark.parametrize("shape, layout", [((4, 6, 5, 7), "contiguous"), ((4, 6, 5, 7), "channels_last"),
                                           ((10, 3), "contiguous")], ids=str)
def test_nll_closed_form(case, parametrization, gauge, dtype, atol, rtol, shape, layout):
    eps = 1e-3
    x, mean, std_param, _, _ = make_case(shape, layout, dtype, case.device, parametrization, affine=False)
    m = mean.detach().requires_grad_()
    p = std_param.detach().requires_grad_()
    _, nll = bk.batchless_norm(x, m, p, parametrization=parametrization, eps=eps, gauge=gauge, backend=case.name)
    w = 1.7  # the loss weight lambda: every gradient scales with it
    (w * nll).backward()
    nll_cf, dmu_cf, dp_cf = closed_form(x.cpu(), mean.cpu(), std_param.cpu(), parametrization, eps, gauge)
    assert_close_scaled(nll, nll_cf, atol, rtol, what="nll")
    assert_close_scaled(m.grad, w * dmu_cf, atol, rtol, what="dmean")
    assert_close_scaled(p.grad, w * dp_cf, atol, rtol, what="dstd_param")
    if gauge:  # docs/method.md: with the gauge, L = mean_c 1/2 (mean_i xhat^2 - 1)
        C = x.shape[1]
        xhat = (x.double().movedim(1, -1).reshape(-1, C).cpu() - mean.double().cpu()) * \
            bk.parametrization.rstd_and_log_std(std_param.double().cpu(), parametrization, eps)[0]
        assert_close_scaled(nll, (0.5 * (xhat.square().mean(0) - 1)).mean(), atol, rtol, what="gauged nll")


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_gauge_changes_value_not_gradients(case, parametrization):
    x, mean, std_param, weight, bias = make_case((5, 4, 9), "contiguous", torch.float64, case.device, parametrization)
    grad_y = torch.randn(x.shape, dtype=torch.float64, device=case.device)
    on = run_batchless(x, mean, std_param, weight, bias, backend=case.name, grad_y=grad_y,
                       parametrization=parametrization, gauge=True)
    off = run_batchless(x, mean, std_param, weight, bias, backend=case.name, grad_y=grad_y,
                        parametrization=parametrization, gauge=False)
    _, log_sigma = bk.parametrization.rstd_and_log_std(std_param.double(), parametrization, 1e-5)
    torch.testing.assert_close(on["nll"], off["nll"] - log_sigma.mean() - 0.5, atol=1e-12, rtol=1e-12)
    for name in GRAD_NAMES:
        torch.testing.assert_close(on[name], off[name], atol=1e-13, rtol=1e-13)


# ------------------------------------------------------------------------------------------------
# Stop-gradients
# ------------------------------------------------------------------------------------------------


def _no_grad(t):
    return t.grad is None or torch.count_nonzero(t.grad).item() == 0


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("shape, layout", [((2, 3, 4, 5), "contiguous"), ((2, 3, 4, 5), "channels_last"),
                                           ((8, 5), "contiguous")], ids=str)
def test_stop_gradients(case, parametrization, shape, layout):
    x, mean, std_param, weight, bias = make_case(shape, layout, torch.float32, case.device, parametrization)
    leaves = [t.detach().requires_grad_() for t in (x, mean, std_param, weight, bias)]
    xl, ml, pl, wl, bl = leaves

    # task loss: gradients to x, weight, bias only; dx = weight * r (elementwise, no batch coupling)
    y, nll = bk.batchless_norm(*leaves, parametrization=parametrization, backend=case.name)
    y.sum().backward()
    assert _no_grad(ml) and _no_grad(pl), "the output must not train mean/std_param"
    r, _ = bk.parametrization.rstd_and_log_std(std_param.double(), parametrization, 1e-5)
    view = (1, -1) + (1,) * (x.dim() - 2)
    expected_dx = (weight.double() * r).view(view).expand(shape)
    assert_close_scaled(xl.grad, expected_dx, 1e-6, 1e-6, what="dx of y.sum()")
    assert_close_scaled(bl.grad, torch.full(bias.shape, x.numel() / x.shape[1], dtype=torch.float64), 1e-6, 1e-6,
                        what="dbias of y.sum()")
    assert wl.grad is not None and torch.count_nonzero(wl.grad) > 0

    # NLL: gradients to mean and std_param only
    for t in leaves:
        t.grad = None
    y, nll = bk.batchless_norm(*leaves, parametrization=parametrization, backend=case.name)
    nll.backward()
    assert _no_grad(xl) and _no_grad(wl) and _no_grad(bl), "the NLL must not train x/weight/bias"
    assert ml.grad is not None and torch.count_nonzero(ml.grad) > 0
    assert pl.grad is not None and torch.count_nonzero(pl.grad) > 0


# ------------------------------------------------------------------------------------------------
# Empty inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("shape, layout", [
    ((0, 5, 4, 4), "contiguous"),
    ((0, 5, 4, 4), "channels_last"),
    ((0, 5), "contiguous"),
    ((0, 3, 7), "contiguous"),
    ((0, 2, 3, 3, 3), "channels_last"),
    ((3, 0), "contiguous"),
    ((2, 0, 4, 4), "contiguous"),
    ((2, 3, 0), "contiguous"),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_empty_input(case, shape, layout, dtype, parametrization):
    C = shape[1]
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = torch.empty(shape, dtype=dtype, device=case.device, memory_format=fmt)
    else:
        x = torch.empty(shape, dtype=dtype, device=case.device)
    _, mean, std_param, weight, bias = make_case((2, C) if C else (2, 1), "contiguous", dtype, case.device,
                                                 parametrization)
    if C == 0:
        mean, std_param, weight, bias = (t[:0] for t in (mean, std_param, weight, bias))
    out = run_batchless(x, mean, std_param, weight, bias, backend=case.name, parametrization=parametrization)
    assert out["y"].shape == x.shape and out["y"].dtype == dtype
    assert out["nll"] is not None and out["nll"].dim() == 0
    assert out["nll"].dtype == accumulation_dtype(dtype)
    assert out["nll"].item() == 0.0  # not NaN (a mean over nothing)
    assert out["x"].shape == x.shape
    for name in ("mean", "std_param"):
        assert out[name] is not None and out[name].shape == (C,), name
        assert torch.count_nonzero(out[name]) == 0, name
        assert out[name].dtype == dtype
    for name in ("weight", "bias"):  # sums over no element: 0
        assert out[name] is None or (out[name].shape == (C,) and torch.count_nonzero(out[name]) == 0), name


# ------------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------------


def test_auto_picks_a_fused_backend_when_available():
    from conftest import KERNEL_BACKENDS

    names = bk.available_backends("cpu")
    # auto's candidates first, reference the last of them; then those auto never picks on the CPU
    # (triton under its interpreter)
    assert "reference" in names and set(names[names.index("reference") + 1:]) <= {"triton"}
    assert set(bk.available_backends()) <= set(bk.BACKENDS) - {"auto"}
    cpu_kernels = [b.name for b in KERNEL_BACKENDS if b.device == "cpu"]
    for name in names:
        if name != "reference":
            assert name in cpu_kernels, f"{name} is listed as available but cannot run"
    x, mean, std_param, weight, bias = make_case((4, 3, 5), "contiguous", torch.float32, "cpu", "log")
    y_auto, _ = bk.batchless_norm(x, mean, std_param, weight, bias)
    y_first, _ = bk.batchless_norm(x, mean, std_param, weight, bias, backend=names[0])
    assert torch.equal(y_auto, y_first)


def test_eps_is_used():
    """eps enters r for abs: a different eps gives a different y (and the same for the reference)."""
    x, mean, std_param, _, _ = make_case((4, 3), "contiguous", torch.float64, "cpu", "abs")
    std_param = std_param.abs() * 0 + 0.5
    y1, _ = bk.batchless_norm(x, mean, std_param, parametrization="abs", eps=1e-5)
    y2, _ = bk.batchless_norm(x, mean, std_param, parametrization="abs", eps=0.5)
    torch.testing.assert_close(y2, (x - mean) / 1.0)
    torch.testing.assert_close(y1, (x - mean) / (0.5 + 1e-5))
