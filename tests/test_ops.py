"""The compiled ops themselves (opcheck, direct outputs with poisoned memory), gradcheck of
batchless_norm for every backend, and bitwise determinism of the cpu backend."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import batchless_kernels as bk
from conftest import (
    ALL_BACKENDS,
    KERNEL_BACKENDS,
    accumulation_dtype,
    assert_close_scaled,
    backend_params,
    make_case,
    make_x,
    run_batchless,
    same_strides,
)

HAS_OPS = bk.ops.extension_loaded()
OPS_DEVICES = [d for d in ("cpu", "cuda") if any(b.device == d and b.name in ("cpu", "cuda") for b in KERNEL_BACKENDS)]
# The compiled ops run where the cpu / cuda backends do (the extension's kernels).
needs_ops = pytest.mark.skipif(not HAS_OPS, reason=f"batchless_kernels._C not loaded: {bk.ops.EXTENSION_ERROR}")


def _device_params():
    return [pytest.param(d, id=d, marks=[pytest.mark.gpu] if d == "cuda" else []) for d in OPS_DEVICES]


def fwd_op():
    return torch.ops.batchless_kernels.batchless_norm_forward.default


def bwd_op():
    return torch.ops.batchless_kernels.batchless_norm_backward.default


def op_inputs(shape, layout, dtype, device, *, affine=True, param_dtype=None):
    """(x, mean, rstd, weight, bias) for the raw ops: rstd = 1 / sigma > 0, params in fp32 unless given."""
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, device, "log", affine,
                                                 param_dtype=param_dtype or torch.float32)
    rstd = torch.exp(-std_param)
    return x, mean, rstd, weight, bias


def poison_allocator(numel, dtype, device):
    """Fill and free a block of the size the op is about to allocate, so that an output element the
    kernel forgets to write most likely reads back as NaN instead of a lucky zero."""
    for _ in range(2):  # twice: glibc then serves this size from the heap, not fresh zeroed mmap pages
        junk = torch.full((max(numel, 1),), float("nan"), dtype=dtype, device=device)
        del junk


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------

OPCHECK_CASES = [
    # shape, layout, dtype, affine, compute_stats
    ((2, 3, 4, 5), "contiguous", torch.float32, True, True),
    ((2, 3, 4, 5), "channels_last", torch.float32, True, True),
    ((2, 3, 2, 3, 4), "channels_last", torch.float32, True, False),
    ((5, 7), "contiguous", torch.float32, True, True),
    ((5, 7), "contiguous", torch.float64, False, True),
    ((3, 4, 6), "contiguous", torch.bfloat16, True, True),
    ((3, 4, 6), "strided", torch.float32, True, False),
    ((3, 4, 6), "channels_innermost", torch.float16, False, True),
]


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("shape, layout, dtype, affine, compute_stats", OPCHECK_CASES, ids=str)
def test_opcheck_forward(device, shape, layout, dtype, affine, compute_stats):
    x, mean, rstd, weight, bias = op_inputs(shape, layout, dtype, device, affine=affine)
    x.requires_grad_()
    if weight is not None:
        weight.requires_grad_()
        bias.requires_grad_()
    torch.library.opcheck(fwd_op(), (x, mean, rstd, weight, bias, compute_stats))


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("shape, layout, dtype", [
    ((2, 3, 4, 5), "contiguous", torch.float32),
    ((2, 3, 4, 5), "channels_last", torch.float32),
    ((5, 7), "contiguous", torch.float64),
    ((3, 4, 6), "contiguous", torch.bfloat16),
    ((3, 4, 6), "strided", torch.float16),
], ids=str)
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (True, False, True), (False, False, False)], ids=str)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "noweight"])
def test_opcheck_backward(device, shape, layout, dtype, mask, with_weight):
    x, mean, rstd, weight, _ = op_inputs(shape, layout, dtype, device)
    grad_y = make_x(shape, layout, dtype, device)
    x_arg = x if mask[1] else None  # x is needed only for dweight
    torch.library.opcheck(bwd_op(), (grad_y, x_arg, mean, rstd, weight if with_weight else None, list(mask)))


# ------------------------------------------------------------------------------------------------
# Direct outputs of the ops vs float64 formulas, every element checked (poisoned allocations)
# ------------------------------------------------------------------------------------------------


def expected_forward(x, mean, rstd, weight, bias):
    view = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x.double() - mean.double().view(view)) * rstd.double().view(view)
    y = xhat
    if weight is not None:
        y = y * weight.double().view(view)
    if bias is not None:
        y = y + bias.double().view(view)
    dims = [0] + list(range(2, x.dim()))
    return y, xhat.sum(dims), xhat.square().sum(dims)


DIRECT_CASES = [
    ((1, 1), "contiguous"), ((7, 13), "contiguous"), ((7, 13), "strided"), ((3, 5, 17), "contiguous"),
    ((3, 5, 17), "channels_innermost"), ((2, 3, 5, 7), "channels_last"), ((2, 3, 5, 7), "strided"),
    ((2, 3, 2, 3, 5), "channels_last"), ((4, 17, 31), "contiguous"), ((2, 3, 131, 129), "contiguous"),
    ((3, 2053), "contiguous"), ((2, 2053, 3, 3), "channels_last"), ((2, 40, 3, 3), "channels_last"),
    # 120 planes, of 49 elements (a task's several samples) and of 196 (a task slot each): per-plane sums
    # reduced in batches of 8 or 16 planes (LaneSums) that span channels and samples, and a partial batch
    ((3, 40, 7, 7), "contiguous"), ((3, 40, 14, 14), "contiguous"),
]


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("shape, layout", DIRECT_CASES, ids=str)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 8e-3),
                                        (torch.float16, 1e-3)], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_ops_direct(device, shape, layout, dtype, tol, affine):
    x, mean, rstd, weight, bias = op_inputs(shape, layout, dtype, device, affine=affine)
    acc = accumulation_dtype(dtype)
    dense = layout != "strided"

    for compute_stats in (True, False):
        poison_allocator(x.numel(), dtype, device)
        y, s1, s2 = fwd_op()(x, mean, rstd, weight, bias, compute_stats)
        y_ref, s1_ref, s2_ref = expected_forward(x, mean, rstd, weight, bias)
        assert y.dtype == dtype and y.shape == x.shape
        assert same_strides(y, x) if dense else y.is_contiguous()
        assert torch.isfinite(y).all(), "unwritten or garbage elements in y"
        torch.testing.assert_close(y.double().cpu(), y_ref.cpu(), atol=tol * 4, rtol=tol)
        if compute_stats:
            n = x.numel() // x.shape[1]
            assert s1.dtype == acc and s2.dtype == acc and s1.shape == (x.shape[1],)
            stat_tol = 1e-5 if acc == torch.float32 else 1e-10
            torch.testing.assert_close(s1.double().cpu(), s1_ref.cpu(), atol=stat_tol * n, rtol=stat_tol)
            torch.testing.assert_close(s2.double().cpu(), s2_ref.cpu(), atol=stat_tol * n, rtol=stat_tol)
        else:
            assert s1.numel() == 0 and s2.numel() == 0

    grad_y = make_x(shape, layout, dtype, device)
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x.double() - mean.double().view(view)) * rstd.double().view(view)
    w = weight.double() if weight is not None else torch.ones_like(rstd, dtype=torch.float64)
    dx_ref = grad_y.double() * (w * rstd.double()).view(view)
    dw_ref = (grad_y.double() * xhat).sum(dims)
    db_ref = grad_y.double().sum(dims)
    n = x.numel() // x.shape[1]
    stat_tol = 1e-5 if acc == torch.float32 else 1e-10
    for mask in ([True, True, True], [True, False, False], [False, True, False], [False, False, True]):
        poison_allocator(x.numel(), dtype, device)
        dx, dw, db = bwd_op()(grad_y, x if mask[1] else None, mean, rstd, weight, mask)
        if mask[0]:
            assert dx.dtype == dtype and dx.shape == x.shape
            assert same_strides(dx, x) if dense else dx.is_contiguous()
            assert torch.isfinite(dx).all(), "unwritten or garbage elements in dx"
            torch.testing.assert_close(dx.double().cpu(), dx_ref.cpu(), atol=tol * 4, rtol=tol)
        else:
            assert dx.numel() == 0
        for wanted, got, ref in ((mask[1], dw, dw_ref), (mask[2], db, db_ref)):
            if wanted:
                assert got.dtype == acc and got.shape == (x.shape[1],)
                torch.testing.assert_close(got.double().cpu(), ref.cpu(), atol=stat_tol * n, rtol=stat_tol)
            else:
                assert got.numel() == 0


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("shape, layout", [((3, 5, 14, 14), "contiguous"), ((3, 5, 7, 7), "contiguous"),
                                           ((2, 3, 37), "contiguous"), ((4, 3, 5), "contiguous"),
                                           ((3, 40, 5, 7), "channels_last"), ((70, 19), "contiguous")], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ops_round_outputs_to_nearest_even(device, shape, layout, dtype):
    """y and dx are the exact products x * 1.5 and grad_y * 1.5 (float32 holds them) rounded once, to
    nearest even, as torch rounds: ties (a third of the elements: those with an odd last bit), half
    rounding to an odd neighbour, overflow to inf, inf, NaN, and the tails of planes and rows (the
    CPU kernels' bfloat16 planes convert in their own lane order)."""
    s = 1.5
    x = make_x(shape, layout, dtype, device)
    flat = x.view(-1) if x.is_contiguous() else x.permute(0, *range(2, x.dim()), 1).reshape(-1)
    specials = [float("inf"), float("-inf"), float("nan"), torch.finfo(dtype).max, -torch.finfo(dtype).max]
    with torch.no_grad():
        flat[-len(specials):] = torch.tensor(specials, dtype=dtype)
        if x.is_contiguous():
            x.copy_(flat.view(x.shape))
    C = x.shape[1]
    zeros = torch.zeros(C, device=device)
    rstd, weight = torch.ones(C, device=device), torch.full((C,), s, device=device)
    expected = (x.float() * s).to(dtype)
    for compute_stats in (True, False):
        poison_allocator(x.numel(), dtype, device)
        y = fwd_op()(x, zeros, rstd, weight, zeros, compute_stats)[0]
        torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    poison_allocator(x.numel(), dtype, device)
    dx = bwd_op()(x, x, zeros, rstd, weight, [True, True, True])[0]
    torch.testing.assert_close(dx, expected, rtol=0, atol=0, equal_nan=True)


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("shape", [(1, 2, 3, 3), (2, 2, 5, 5), (3, 2, 17)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_sums_ignore_lanes_beyond_a_short_plane(device, shape, dtype):
    """x = mean = 1e30, rstd = 1e10: every xhat is 0, so dweight is 0; a plane shorter than a vector
    chunk loads 0 beyond its end, where (0 - mean) * rstd overflows to inf, and 0 * inf made dweight
    NaN on the CPU."""
    x = torch.full(shape, 1e30, dtype=dtype, device=device)
    C = shape[1]
    mean, rstd = x[0, :, 0].float() if x.dim() == 3 else x[0, :, 0, 0].float(), torch.full((C,), 1e10, device=device)
    dx, dw, db = bwd_op()(torch.ones_like(x), x, mean, rstd, None, [True, True, True])
    assert torch.equal(dw, torch.zeros_like(dw)), dw
    torch.testing.assert_close(db, torch.full_like(db, x.numel() // C))


@needs_ops
@pytest.mark.parametrize("device", _device_params())
def test_ops_mixed_param_dtypes(device):
    """mean/rstd/weight/bias of any floating dtype are accepted (converted to the accumulation dtype)."""
    x, mean, rstd, weight, bias = op_inputs((3, 4, 5), "contiguous", torch.float32, device)
    y, s1, s2 = fwd_op()(x, mean.double(), rstd.half(), weight.bfloat16(), bias.double(), True)
    y_ref, s1_ref, _ = expected_forward(x, mean.double(), rstd.half(), weight.bfloat16(), bias.double())
    torch.testing.assert_close(y.double().cpu(), y_ref.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1.double().cpu(), s1_ref.cpu(), atol=1e-4, rtol=1e-5)


@needs_ops
@pytest.mark.parametrize("device", _device_params())
def test_ops_empty(device):
    for shape in ((0, 3, 4, 4), (0, 3), (2, 0, 5), (2, 3, 0)):
        C = shape[1]
        x = torch.empty(shape, device=device)
        p = torch.ones(C, device=device)
        y, s1, s2 = fwd_op()(x, p, p, p, p, True)
        assert y.shape == shape and s1.shape == (C,) and s2.shape == (C,)
        assert torch.count_nonzero(s1) == 0 and torch.count_nonzero(s2) == 0
        dx, dw, db = bwd_op()(x, x, p, p, p, [True, True, True])
        assert dx.shape == shape and dw.shape == (C,) and db.shape == (C,)
        assert torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


# ------------------------------------------------------------------------------------------------
# gradcheck of batchless_norm in float64, for every backend (reference included)
# ------------------------------------------------------------------------------------------------


# Small: the numerical Jacobian runs the op twice per input element.
GRADCHECK_SHAPES = [((2, 3, 2, 3), "contiguous"), ((2, 3, 2, 3), "channels_last"), ((5, 3), "contiguous"),
                    ((2, 3, 5), "strided")]


def _gradcheck_cases():
    """Every backend on every shape; triton under its interpreter (~15 ms a call, 2-3 s a case) on a
    channels-first and a strided one: its autograd is the compiled backends' (C++), and its kernels'
    values are checked against the float64 spec on every layout in test_correctness."""
    cases = []
    for param in backend_params(ALL_BACKENDS):
        case = param.values[0]
        interpreted = case.name == "triton" and case.device == "cpu"
        for shape, layout in [GRADCHECK_SHAPES[0], GRADCHECK_SHAPES[3]] if interpreted else GRADCHECK_SHAPES:
            cases.append(pytest.param(case, shape, layout, id=f"{shape}-{layout}-{case.id}".replace(" ", ""),
                                      marks=param.marks))
    return cases


@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
@pytest.mark.parametrize("case, shape, layout", _gradcheck_cases())
def test_gradcheck(case, parametrization, shape, layout):
    """The stop-gradients split the function: y is differentiable in (x, weight, bias) with mean,
    std_param held, the NLL in (mean, std_param) with x held. Each part is a true derivative.
    The NLL is checked without the gauge, whose sg(mean log sigma) term is (by design) a value
    without a derivative; test_correctness checks that the gauge leaves the gradients alone."""
    x, mean, std_param, weight, bias = make_case(shape, layout, torch.float64, case.device, parametrization)
    kw = dict(parametrization=parametrization, backend=case.name)

    def y_of(x_, w_, b_):
        return bk.batchless_norm(x_, mean, std_param, w_, b_, **kw)[0]

    def nll_of(m_, p_):
        return bk.batchless_norm(x, m_, p_, weight, bias, gauge=False, **kw)[1]

    # Under the interpreter, gradcheck's fast mode: the Jacobian checked along random directions (a few
    # calls) rather than column by column (two calls per input element; 20-27 s a case in CI).
    fast = case.name == "triton" and case.device == "cpu"
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(y_of, leaves, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=fast)
    leaves = [t.detach().requires_grad_() for t in (mean, std_param)]
    assert torch.autograd.gradcheck(nll_of, leaves, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=fast)


# ------------------------------------------------------------------------------------------------
# Determinism (cpu backend): same bits on reruns and whatever the number of threads
# ------------------------------------------------------------------------------------------------

CPU_KERNELS = [b for b in KERNEL_BACKENDS if b.name == "cpu"]

DETERMINISM_CASES = [
    ((4, 8, 64, 65), "contiguous", "log"),  # channels-first, several tasks per channel
    ((2, 3, 131, 129), "contiguous", "abs"),  # split-S tiles
    # a plane per task slot, 305 of them: 2 and 3 threads give tasks of 153 and 102 planes, so that the
    # batches of per-plane lane sums (LaneSums: 8 planes on AVX2, 16 on AVX-512) start at other planes
    # than with 1 thread
    ((5, 61, 14, 14), "contiguous", "log"),
    ((16, 40, 33, 31), "channels_last", "inv"),  # channels-last, many row blocks
    ((300, 2100), "contiguous", "log"),  # channel blocks
    ((50021, 3), "contiguous", "abs"),  # narrow rows: wide channels (CPU), several row blocks
    ((3001, 7, 2, 2), "contiguous", "inv"),  # planes smaller than a chunk: wide channels, several row blocks
]


def _run_all(case, inputs, parametrization):
    torch.manual_seed(1234)  # the same grad_y every time
    return run_batchless(*inputs, backend=case.name, parametrization=parametrization)


def _assert_bitwise_equal(a, b):
    for name in ("y", "nll", "x", "mean", "std_param", "weight", "bias"):
        assert torch.equal(a[name], b[name]), f"{name} differs between runs"
        assert a[name].stride() == b[name].stride()


@pytest.mark.parametrize("case", backend_params(CPU_KERNELS))
@pytest.mark.parametrize("shape, layout, parametrization", DETERMINISM_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_determinism(case, shape, layout, parametrization, dtype):
    inputs = make_case(shape, layout, dtype, case.device, parametrization)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        first = _run_all(case, inputs, parametrization)
        second = _run_all(case, inputs, parametrization)
        _assert_bitwise_equal(first, second)
        for threads_now in (1, 3):
            torch.set_num_threads(threads_now)
            _assert_bitwise_equal(first, _run_all(case, inputs, parametrization))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads


# ------------------------------------------------------------------------------------------------
# Second derivatives
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
def test_gradgradcheck_nll(case, parametrization):
    """The NLL is computed from S1, S2 by an exact expansion of sum((x - mu) r)^2 around the
    forward's (mu0, r0): every derivative in (mean, std_param) is exact, the second ones included."""
    x, mean, std_param, weight, bias = make_case((3, 4, 5), "channels_innermost", torch.float64, case.device,
                                                 parametrization)

    def nll_of(m_, p_):
        return bk.batchless_norm(x, m_, p_, weight, bias, parametrization=parametrization, gauge=False,
                                 backend=case.name)[1]

    leaves = [t.detach().requires_grad_() for t in (mean, std_param)]
    assert torch.autograd.gradgradcheck(nll_of, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def _double_backward_params():
    params = []
    for c in KERNEL_BACKENDS:  # the reference is what they are compared with
        marks = [pytest.mark.gpu] if c.device == "cuda" else []
        params.append(pytest.param(c, id=c.id, marks=marks))
    return params


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
@pytest.mark.parametrize("case", _double_backward_params())
def test_double_backward_through_output(case):
    """A gradient penalty differentiates dLoss/dx again (create_graph=True), and the NLL's gradient
    is differentiated again in (mean, std_param): both through the same autograd nodes as training
    (the forward op, and the training op that adds the NLL). Every backend supports it and must match
    the reference (the create_graph paths of csrc/autograd.cpp)."""
    x, mean, std_param, weight, bias = make_case((4, 3, 5), "contiguous", torch.float64, case.device, "log")

    def penalty_grads(backend, with_nll):
        xl, wl, bl = (t.detach().requires_grad_() for t in (x, weight, bias))
        ml, pl = (t.detach().requires_grad_(with_nll) for t in (mean, std_param))
        y, nll = bk.batchless_norm(xl, ml, pl, wl, bl, backend=backend)
        gx, = torch.autograd.grad(y.square().sum(), xl, create_graph=True)
        grads = torch.autograd.grad(gx.square().sum(), (xl, wl), retain_graph=with_nll)  # y and nll: one node
        if with_nll:
            gm, gp = torch.autograd.grad(nll, (ml, pl), create_graph=True)
            grads += torch.autograd.grad((gm.square() + gp.square()).sum(), (ml, pl))
        return grads

    for with_nll in (False, True):
        expected = penalty_grads("reference", with_nll)
        assert all(torch.count_nonzero(e) > 0 for e in expected)
        for g, e in zip(penalty_grads(case.name, with_nll), expected):
            torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------------------------
# The NLL op: one loop over channels, checked against the composite formulation and docs/method.md
# ------------------------------------------------------------------------------------------------


def _nll_inputs(device, parametrization, dtype, channels=7, count=13):
    """Sums of a real xhat, so s2 >= 0 and s1^2 <= count * s2 as for real data."""
    from batchless_kernels.parametrization import rstd_and_log_std

    x = torch.randn(count, channels, dtype=dtype, device=device) * 1.7 + 0.4
    mean = torch.randn(channels, dtype=dtype, device=device)
    std_param = torch.rand(channels, dtype=dtype, device=device) + 0.3
    if parametrization == "inv":
        std_param[0] = 0.0  # r = 0: xhat = 0, the division-free branch
        std_param[1] = -std_param[1]  # a signed r
    r, _ = rstd_and_log_std(std_param, parametrization, 1e-5)
    xhat = (x - mean) * r
    return xhat.sum(0), xhat.square().sum(0), mean, std_param, count


# The op families with a training op's two halves and an inference op: the compiled library's
# (batchless_norm_*, per device) and the triton backend's (triton_*, where it runs).
TRITON_DEVICES = [b.device for b in ALL_BACKENDS if b.name == "triton"]


def _family_params():
    return [pytest.param(("batchless_norm", d), id=d, marks=[pytest.mark.gpu] if d == "cuda" else [])
            for d in OPS_DEVICES] + [
        pytest.param(("triton", d), id=f"triton-{d}", marks=[pytest.mark.gpu] if d == "cuda" else [])
        for d in TRITON_DEVICES]


# Triton under its interpreter (CI time): every layout kind (channels_last, 2-D, strided, channels-innermost)
# and dtype (float32, float64, bfloat16, float16) once, and the empty x.
_INTERPRETED_TRITON_CASES = {1, 4, 5, 6, 7, 8}


def _family_op(prefix, name):
    """A family's op (batchless_norm_train_forward, triton_train_forward, ...), its kernels registered."""
    if prefix == "triton":
        from batchless_kernels.triton import register_kernels

        register_kernels()
    return getattr(torch.ops.batchless_kernels, f"{prefix}_{name}").default


def _each_train_op_case(test):
    """The cases of the training op's two halves and of the inference op: op families x the opcheck
    cases and an empty x x the parametrizations."""
    cases = OPCHECK_CASES + [((0, 3, 4), "contiguous", torch.float32, True, True)]
    params = [pytest.param(family.values[0], *case, id=f"{case}-{family.id}".replace(" ", ""), marks=family.marks)
              for family in _family_params() for i, case in enumerate(cases)
              if family.values[0] != ("triton", "cpu") or i in _INTERPRETED_TRITON_CASES]
    test = pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])(test)
    return needs_ops(pytest.mark.parametrize("family, shape, layout, dtype, affine, _", params)(test))


@_each_train_op_case
def test_opcheck_train_backward(family, shape, layout, dtype, affine, _, parametrization):
    """The training op's backward below autograd (dx, dweight, dbias, dmean, dstd_param; on CUDA and
    triton the NLL's gradients come from the backward's second stage): schema, fake kernel, and for
    every mask the same values as the backward op and the NLL's backward op."""
    prefix, device = family
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, device, parametrization, affine)
    op = _family_op(prefix, "train_backward")
    ops_ = torch.ops.batchless_kernels
    y, s1, s2, rstd, nll = _family_op(prefix, "train_forward")(x, mean, std_param, weight, bias, parametrization,
                                                               1e-5, True)
    grad_y, grad_nll = torch.randn_like(y), torch.rand((), device=device, dtype=s1.dtype) + 0.5
    count = x.numel() // x.shape[1] if x.numel() else 1
    masks = [(True, affine, affine, True, True), (False, affine, True, True, False), (True, False, False, True, True),
             (True, True, False, False, True)]
    for mask in masks:
        args = (grad_y, grad_nll, x, mean, std_param, rstd, weight, s1, s2, count, parametrization, 1e-5, list(mask))
        if mask == masks[0]:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        got = op(*args)
        want = _family_op(prefix, "backward")(grad_y, x, mean, rstd, weight, list(mask[:3]))
        if x.numel():
            want += ops_.batchless_nll_backward(grad_nll, s1, s2, mean, std_param, count, parametrization, 1e-5)
        else:
            want += (torch.zeros_like(mean), torch.zeros_like(std_param))
        for name, wanted, g, w in zip(("dx", "dweight", "dbias", "dmean", "dstd_param"), mask, got, want):
            if not wanted:
                assert g.numel() == 0, (name, mask)
            elif name == "dx":
                torch.testing.assert_close(g, w)
            elif x.numel() or name in ("dweight", "dbias"):
                assert_close_scaled(g, w, atol=1e-5, rtol=1e-5, what=f"{name} {mask}")


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
@pytest.mark.parametrize("gauge", [True, False])
def test_opcheck_nll(device, parametrization, gauge):
    s1, s2, mean, std_param, count = _nll_inputs(device, parametrization, torch.float32)
    mean.requires_grad_()
    std_param.requires_grad_()
    torch.library.opcheck(torch.ops.batchless_kernels.batchless_nll.default,
                          (s1, s2, mean, std_param, count, parametrization, 1e-5, gauge))


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("shape, layout, dtype, affine, _", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("parametrization", ["abs", "inv"])
def test_opcheck_train(device, shape, layout, dtype, affine, _, parametrization):
    """The training op (forward + NLL as one autograd node): schema, fake kernel, autograd
    registration and AOT tracing, with every input requiring grad and with only x."""
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, device, parametrization, affine)
    op = torch.ops.batchless_kernels.batchless_norm_train.default
    for leaves in ((x, mean, std_param, weight, bias), (x,)):
        args = [t.detach().requires_grad_(any(t is leaf for leaf in leaves)) if t is not None else None
                for t in (x, mean, std_param, weight, bias)]
        torch.library.opcheck(op, (*args, parametrization, 1e-5, True))


@_each_train_op_case
def test_opcheck_train_forward(family, shape, layout, dtype, affine, _, parametrization):
    """The training op's forward below autograd (y, s1, s2, rstd, nll; fused on CUDA and triton):
    schema (no output aliases an input, inv's r = p included), fake kernel, and the same values as
    the forward op, rstd by tensor ops and the NLL op."""
    prefix, device = family
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, device, parametrization, affine)
    op = _family_op(prefix, "train_forward")
    args = (x, mean, std_param, weight, bias, parametrization, 1e-5, True)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    y, s1, s2, rstd, nll = op(*args)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want_rstd, _ = bk.parametrization.rstd_and_log_std(std_param.to(acc), parametrization, 1e-5)
    want_y, want_s1, want_s2 = _family_op(prefix, "forward")(x, mean, want_rstd, weight, bias, True)
    torch.testing.assert_close(rstd, want_rstd, rtol=1e-6, atol=0)
    torch.testing.assert_close(y, want_y)
    assert_close_scaled(s1, want_s1, atol=1e-5, rtol=1e-5, what="s1")
    assert_close_scaled(s2, want_s2, atol=1e-5, rtol=1e-5, what="s2")
    if x.numel():
        count = x.numel() // x.shape[1]
        want_nll = torch.ops.batchless_kernels.batchless_nll(want_s1, want_s2, mean, std_param, count,
                                                             parametrization, 1e-5, True)
        torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-6)


@_each_train_op_case
def test_opcheck_inference(family, shape, layout, dtype, affine, _, parametrization):
    """The inference op (y alone, r computed inside): schema, fake kernel, and the same bits as the
    training op's y, so that training and inference compute one function."""
    prefix, device = family
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, device, parametrization, affine)
    op = _family_op(prefix, "inference")
    args = (x, mean, std_param, weight, bias, parametrization, 1e-5)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    y = op(*args)  # outputs start poisoned (conftest)
    want = _family_op(prefix, "train_forward")(x, mean, std_param, weight, bias, parametrization, 1e-5, True)[0]
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == want.stride()
    assert torch.equal(y, want)


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
@pytest.mark.parametrize("gauge", [True, False])
@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float32])
def test_nll_op_matches_composite(device, parametrization, gauge, param_dtype):
    """The fused NLL op and functional.nll_from_sums (the composite used where no fused NLL kernel
    exists) agree in value and in the gradients for mean and std_param."""
    from batchless_kernels.functional import nll_from_sums

    s1, s2, mean, std_param, count = _nll_inputs(device, parametrization, torch.float64)
    mean, std_param = (t.to(param_dtype).requires_grad_() for t in (mean, std_param))
    args = (s1, s2, count, mean, std_param, parametrization, 1e-5, gauge)
    fused = torch.ops.batchless_kernels.batchless_nll(s1, s2, mean, std_param, count, parametrization, 1e-5, gauge)
    composite = nll_from_sums(*args)
    assert fused.dtype == composite.dtype == torch.float64
    tol = dict(rtol=1e-12, atol=1e-12) if param_dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, composite, **tol)
    for got, want in zip(torch.autograd.grad(fused, (mean, std_param)),
                         torch.autograd.grad(composite, (mean, std_param))):
        assert got.dtype == param_dtype
        torch.testing.assert_close(got, want, **tol)


@needs_ops
def test_extension_names_the_cpu_isa_it_was_built_for():
    """_C.cpu_capability (what benchmarks record) names the vector ISA of the CPU kernels, one this CPU has."""
    from batchless_kernels import _C

    isa = _C.cpu_capability
    needs = {"AVX512_BF16": {"avx512f", "avx512bw", "avx512_bf16"}, "AVX512": {"avx512f", "avx512bw"},
             "AVX2": {"avx2", "fma"}, "DEFAULT": set()}
    assert isa in needs
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to check the ISA against")
    assert needs[isa] <= flags


@needs_ops
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="masks CPU features with glibc's hwcaps tunable (x86-64 glibc 2.33 on)")
def test_extension_refuses_a_cpu_without_its_vector_instructions():
    """A build for AVX-512 or AVX2 run on a CPU without them would die of SIGILL in its first kernel:
    instead _C's import raises ImportError naming the missing extension, and the package warns and
    runs the reference backend. The CPU loses the feature to glibc's glibc.cpu.hwcaps tunable, in a
    child process."""
    from batchless_kernels import _C

    isa = _C.cpu_capability
    if isa == "DEFAULT":
        pytest.skip("a build without vector extensions runs on every CPU")
    feature = "avx512f" if isa.startswith("AVX512") else "avx2"
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import batchless_kernels as bk\n"
        "print(bk.ops.EXTENSION_ERROR)\n"
        "print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])\n"
        "print(bk.available_backends('cpu'))\n"
        "y, nll = bk.batchless_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), None, None)\n"
        "print(bool(torch.isfinite(y).all()))\n")
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), f"glibc.cpu.hwcaps=-{feature.upper()}"]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    error, warned, backends, ran = result.stdout.splitlines()[-4:]
    assert f"compiled for the vector instructions {isa.removesuffix('_BF16')}" in error
    assert f"this CPU lacks {feature}" in error
    assert "reference implementation instead" in warned and f"lacks {feature}" in warned
    assert backends == "['reference']"
    assert ran == "True"


@needs_ops
@pytest.mark.parametrize("op", ["batchless_nll", "batchless_nll_composite"])
def test_nll_op_rejects_bad_input(op):
    """The composite twin (a public op too) checked nothing: (1,) sums broadcast, count <= 0 and eps < 0
    gave numbers."""
    s1, s2, mean, std_param, count = _nll_inputs("cpu", "log", torch.float32)
    nll = getattr(torch.ops.batchless_kernels, op)
    with pytest.raises(RuntimeError, match="parametrization"):
        nll(s1, s2, mean, std_param, count, "sqrt", 1e-5, True)
    with pytest.raises(RuntimeError, match="shape"):
        nll(s1[:3], s2, mean, std_param, count, "log", 1e-5, True)
    with pytest.raises(RuntimeError, match="shape"):
        nll(s1[:1], s2[:1], mean, std_param, count, "log", 1e-5, True)
    for bad_count in (0, -8):
        with pytest.raises(RuntimeError, match="count"):
            nll(s1, s2, mean, std_param, bad_count, "log", 1e-5, True)
    with pytest.raises(RuntimeError, match="eps"):
        nll(s1, s2, mean, std_param, count, "abs", -1.0, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        nll(s1, s2.double(), mean, std_param, count, "log", 1e-5, True)
    with pytest.raises(RuntimeError, match="floating"):
        nll(s1, s2, mean, std_param.to(torch.int64), count, "log", 1e-5, True)


# ------------------------------------------------------------------------------------------------
# Per-call cost of a training step: autograd nodes and dispatched ops
# ------------------------------------------------------------------------------------------------


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args, kwargs=None):
        self.ops.append(str(func.overloadpacket).split(".")[-1])
        return func(*args, **(kwargs or {}))


def _graph_nodes(*outputs):
    seen, stack = [], [o.grad_fn for o in outputs]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.append(node)
            stack += [next_fn for next_fn, _ in node.next_functions]
    return [type(n).__name__ for n in seen if type(n).__name__ != "AccumulateGrad"]


@needs_ops
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
def test_training_step_is_one_node_and_few_ops(device, parametrization):
    """A layer's training step (y and the NLL, all five inputs requiring grad) is one autograd node,
    as BatchNorm's is; forward dispatches one op, batchless_norm_train_forward (on CUDA two launches);
    backward one op, batchless_norm_train_backward (on CUDA two launches), and nothing else but
    autograd's own bookkeeping."""
    leaves = [t.detach().requires_grad_() for t in make_case((8, 16, 5, 5), "contiguous", torch.float32, device,
                                                               parametrization)]
    with _OpLog() as forward:
        y, nll = bk.batchless_norm(*leaves, parametrization=parametrization, backend=device)
    assert _graph_nodes(y, nll) == ["CppFunction"]
    assert forward.ops == ["batchless_norm_train_forward"], forward.ops
    with _OpLog() as backward:
        torch.autograd.backward([y, nll], [torch.ones_like(y), torch.ones_like(nll)])
    work = [op for op in backward.ops if op not in ("detach", "ones_like", "ones", "empty_like", "zeros_like")]
    assert work == ["batchless_norm_train_backward"], backward.ops


@needs_ops
@pytest.mark.parametrize("case", backend_params(KERNEL_BACKENDS))
def test_ops_without_a_gradient_formula_raise_in_backward(case):
    """The backward ops and the training op's halves (called below autograd by the nodes) had no Autograd
    registration: on inputs that require grad torch only warned, and backward left x.grad None. Now their
    outputs' backward raises, as the inference op's did."""
    prefix = {"cpu": "batchless_norm", "cuda": "batchless_norm", "triton": "triton"}[case.name]
    ops = torch.ops.batchless_kernels
    if case.name == "triton":
        bk.backends.prepare("triton")  # registers the triton ops' kernels
    device = case.device
    x = torch.randn(3, 2, 4, device=device, requires_grad=True)
    mean, p, w = (torch.zeros(2, device=device, requires_grad=True) for _ in range(3))
    train_forward = getattr(ops, f"{prefix}_train_forward" if prefix == "triton" else "batchless_norm_train_forward")
    y, s1, s2, rstd, nll = train_forward(x, mean, p, w, None, "log", 1e-5, True)
    grad_y = torch.randn_like(x, requires_grad=True)
    backward = getattr(ops, f"{prefix}_backward")
    train_backward = getattr(ops, "triton_train_backward" if prefix == "triton" else "batchless_norm_train_backward")
    calls = {
        "train_forward": lambda: (y.sum() + nll),
        "backward": lambda: backward(grad_y, x.detach(), mean.detach(), rstd.detach(), w.detach(), [True, True, True])[0].sum(),
        "train_backward": lambda: train_backward(
            grad_y, torch.ones((), device=device), x.detach(), mean.detach(), p.detach(), rstd.detach(), w.detach(),
            s1, s2, 12, "log", 1e-5, [True, True, True, True, True])[0].sum(),
        "nll_backward": lambda: ops.batchless_nll_backward(
            torch.ones((), device=device, requires_grad=True), s1, s2, mean.detach(), p.detach(), 12, "log", 1e-5)[0].sum(),
    }
    for name, loss in calls.items():
        out = loss()
        assert out.requires_grad, name
        with pytest.raises(RuntimeError, match="is not implemented"):
            out.backward()


@needs_ops
@pytest.mark.skipif("cpu" not in OPS_DEVICES, reason="the CPU kernels' store path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, layout, offset", [
    ((3, 5, 7, 9), "contiguous", 0), ((3, 40, 5, 7), "channels_last", 0), ((70, 19), "contiguous", 0),
    ((4, 33, 64), "contiguous", 1), ((64, 48), "contiguous", 3), ((2, 1, 3, 3), "contiguous", 0),
    ((5, 2, 3), "contiguous", 0), ((3, 64, 5, 7), "channels_last", 0), ((4, 3, 6, 8), "contiguous", 0),
    ((512, 3, 2, 2), "contiguous", 0), ((2, 3, 1000), "contiguous", 0), ((1, 2, 5001), "contiguous", 0)], ids=str)
def test_streaming_stores_write_what_plain_stores_write(shape, layout, offset, dtype):
    """Outputs of at least a quarter of the last-level cache are written with non-temporal stores where every
    chunk of the walk is full and aligned (streams_every_chunk); 32- and 64-bit channels-first outputs
    of other plane lengths through a buffer, in pieces, whose whole lines are streamed
    (for_each_output_chunk); the rest with plain stores. With the threshold at 0 every output takes
    that decision, and y, dx and the sums must have the plain stores' bits, every element written
    (poisoned allocator), and the inference op's y too. Streamed: rows and planes of 64 or 48
    elements (the last chunk overlapping the one before), (512, 3, 2, 2) as rows of wide channels
    with a partial last row; buffered: the odd
    plane lengths, in several pieces at (2, 3, 1000) and (1, 2, 5001) (several segments too); x at a
    storage offset reads misaligned (y and dx are fresh, aligned allocations)."""
    from batchless_kernels import _C

    x, mean, rstd, weight, bias = op_inputs(shape, layout, dtype, "cpu")
    if offset:
        x = torch.empty(x.numel() + offset, dtype=dtype)[offset:].view(x.shape).copy_(x)
    grad_y = torch.randn_like(x)
    results = []
    previous = _C.cpu_stream_threshold(0)
    try:
        for threshold in (0, 2**62):
            _C.cpu_stream_threshold(threshold)
            poison_allocator(x.numel(), dtype, "cpu")
            forward = [fwd_op()(x, mean, rstd, weight, bias, stats) for stats in (True, False)]
            poison_allocator(x.numel(), dtype, "cpu")
            backward = [bwd_op()(grad_y, x, mean, rstd, weight, mask) for mask in ([True, True, True], [True, False, False])]
            # The inference op streams from twice the threshold (0 here too).
            inference = torch.ops.batchless_kernels.batchless_norm_inference(x, mean, -rstd.log(), weight, bias, "log", 1e-5)
            results.append([t for out in forward + backward for t in out] + [inference])
    finally:
        _C.cpu_stream_threshold(previous)
    for streamed, plain in zip(*results):
        assert torch.equal(streamed, plain) and not streamed.isnan().any()


@needs_ops
@pytest.mark.skipif("cpu" not in OPS_DEVICES, reason="the CPU kernels' store path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.float64], ids=str)
@pytest.mark.parametrize("numel, offset", [(0, 0), (1, 0), (63, 1), (64, 0), (1000, 3), (16385, 5),
                                           (2 * 65536 + 7, 2)], ids=str)
def test_cpu_stream_copy_copies_every_byte(numel, offset, dtype):
    """The benchmark's ceiling for streamed outputs (bench/bench_batchless.py) copies src's bits: any
    dtype (NaN payloads too), sizes around the vector chunks and the tasks, src at an offset (a
    misaligned read; the fresh output is aligned past a head copied plainly)."""
    from batchless_kernels import _C

    bits = torch.randint(-2**31, 2**31 - 1, (numel * 8 // 4 + 8,), dtype=torch.int32)
    src = bits.view(torch.uint8).view(dtype)[offset:offset + numel]
    poison_allocator(-(-numel * src.element_size() // 4), torch.float32, "cpu")
    out = _C.cpu_stream_copy(src)
    assert out.shape == src.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), src.contiguous().view(torch.uint8))
    if numel == 1000:  # dense in another dim order: the same strides and bytes
        x = src[:990].view(3, 5, 6, 11).permute(0, 2, 3, 1)
        out = _C.cpu_stream_copy(x)
        back = (0, 3, 1, 2)  # the contiguous view again: its bytes in memory order
        assert out.stride() == x.stride()
        assert torch.equal(out.permute(back).view(torch.uint8), x.permute(back).view(torch.uint8))
    with pytest.raises(RuntimeError, match="dense CPU tensor for src"):
        _C.cpu_stream_copy(torch.zeros(3, 4)[:, :2])
    with pytest.raises(TypeError, match="Tensor for src"):
        _C.cpu_stream_copy([1.0])
