"""Shared fixtures and helpers of the batchless_kernels test suite.

Backends are discovered, not listed: every name of ``bk.BACKENDS`` (but "auto") is probed on every
device type of this machine, so new backends (triton, cuda) join the parametrization by themselves.
CUDA cases carry ``@pytest.mark.gpu``. Every test gets fresh random inputs from a generator seeded
by its own test id, so a failure reproduces when the test is run alone.
"""

from __future__ import annotations

import importlib.util
import math
import os
import zlib
from dataclasses import dataclass

import torch

# The triton backend runs CPU tensors through Triton's interpreter where there is no GPU. Triton
# reads TRITON_INTERPRET when the package's kernels are decorated, i.e. when batchless_kernels is
# imported: set it before that import.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every kernel's fresh outputs start as NaN in tests, so that an element a kernel fails to write
# shows (batchless_kernels.ops.poisoned, csrc/batchless_host.h).
os.environ["BATCHLESS_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402

import batchless_kernels as bk  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE_TYPES = ("cpu", "cuda") if HAS_CUDA else ("cpu",)

# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendCase:
    """A backend and the device its test tensors live on."""

    name: str
    device: str

    @property
    def id(self) -> str:
        return f"{self.name}-{self.device}"


def _runs_on(name: str, device_type: str) -> bool:
    """Whether `name` runs tensors of `device_type`: the backend is asked explicitly with a tiny
    input. Only the documented refusal (RuntimeError "... cannot run here: <why>") means "not
    here"; any other failure leaves the backend in the suite, where its tests will fail loudly."""
    if name in bk.available_backends(device_type):
        return True
    x = torch.zeros(1, 1, device=device_type)
    p = torch.zeros(1, device=device_type)
    try:
        bk.batchless_norm(x, p, p, backend=name)
    except RuntimeError as error:
        if "cannot run here" in str(error):
            return False
    except Exception:  # noqa: BLE001 - a broken backend must still be tested
        pass
    return True


def _discover() -> list[BackendCase]:
    cases = []
    for name in bk.BACKENDS:
        if name == "auto":
            continue
        # A GPU backend is tested on the GPU; triton falls back to its CPU interpreter without one.
        for device_type in DEVICE_TYPES:
            if _runs_on(name, device_type):
                cases.append(BackendCase(name, device_type))
    return cases


ALL_BACKENDS: list[BackendCase] = _discover()
# Fused backends under test: everything but the executable spec itself.
KERNEL_BACKENDS: list[BackendCase] = [b for b in ALL_BACKENDS if b.name != "reference"]
# What the correctness tests compare with the float64 reference: the fused backends. Where none is
# built (no extension), the reference itself run in the input's (low) precision, so that the suite
# still checks something; beside fused backends those reference-vs-reference cases could not fail.
TESTED_BACKENDS: list[BackendCase] = KERNEL_BACKENDS or [b for b in ALL_BACKENDS if b.name == "reference"]
# CUDA emulation hook (tests/cuda_emulation/build.py documents it): where the CUDA kernels of
# csrc/cuda are built for the CPU through tests/cuda_emulation (BATCHLESS_CUDA_EMULATION=1 builds
# them; =0 leaves them out), the correctness suite also runs them as backends "cuda_emu-sm132-cpu"
# and "cuda_emu-sm1-cpu" (simulated GPUs of 132 SMs and of 1 SM). Such a case calls the cpu backend
# with its kernel ops redirected to the emulated CUDA launchers (fixture _cuda_emulation below).
from cuda_emulation import backend as cuda_emulation  # noqa: E402

EMULATED_BACKENDS: list[BackendCase] = cuda_emulation.discover(BackendCase)
TESTED_BACKENDS = TESTED_BACKENDS + EMULATED_BACKENDS
# Names of the backends that cannot run CPU tensors here (always includes "cuda").
NOT_ON_CPU: list[str] = [
    n for n in bk.BACKENDS if n != "auto" and BackendCase(n, "cpu") not in ALL_BACKENDS
]


def _marks(case: BackendCase):
    return [pytest.mark.gpu] if case.device == "cuda" else []


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """CUDA emulation hook: an emulated case's test runs on its simulated device, with the
    redirection of the kernel ops on (nothing for other tests)."""
    case = getattr(getattr(request.node, "callspec", None), "params", {}).get("case")
    with cuda_emulation.activate(case):
        yield


def backend_params(cases):
    """pytest.param list for a backend parametrization (ids like "cpu-cpu", "triton-cuda")."""
    return [pytest.param(c, id=c.id, marks=_marks(c)) for c in cases]


# ------------------------------------------------------------------------------------------------
# Dtypes and tolerances (Liger-Kernel style: parametrize over (dtype, atol, rtol))
# ------------------------------------------------------------------------------------------------

LOW_PRECISION = (torch.bfloat16, torch.float16)

# float32/float64: plain tolerances vs the float64 reference, relative to the output's scale.
# bfloat16/float16: a budget (see assert_matches_reference): atol is then the floor added to twice
# the error of the reference backend run in the same low dtype.
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="float32"),
    pytest.param(torch.float64, 1e-10, 1e-10, id="float64"),
    pytest.param(torch.bfloat16, 1e-5, 0.0, id="bfloat16"),
    pytest.param(torch.float16, 1e-5, 0.0, id="float16"),
]
TOLS = {p.values[0]: p.values[1:] for p in DTYPE_TOLS}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add synchronization (10-100x slower on a busy 2-core
    machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seed_from(text: str) -> int:
    return zlib.crc32(text.encode())


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Seeds torch's global generators from the test id: fresh inputs per test, reproducible."""
    seed = seed_from(request.node.nodeid)
    torch.manual_seed(seed)
    yield seed


# Triton's interpreter runs programs one by one in numpy: on CPU tensors the triton backend is
# tested on inputs up to this many elements; the larger cases run where triton has a GPU.
INTERPRETER_MAX_ELEMENTS = 50_000


def _largest_shape(item) -> int:
    params = getattr(getattr(item, "callspec", None), "params", {})
    shapes = [v for v in params.values()
              if isinstance(v, tuple) and len(v) >= 2 and all(isinstance(d, int) for d in v)]
    return max((math.prod(s) for s in shapes), default=0)


def pytest_collection_modifyitems(config, items):
    interpreted_large = [
        item for item in items
        if getattr(getattr(item, "callspec", None), "params", {}).get("case") == BackendCase("triton", "cpu")
        and _largest_shape(item) > INTERPRETER_MAX_ELEMENTS
    ]
    if interpreted_large:
        config.hook.pytest_deselected(items=interpreted_large)
        items[:] = [item for item in items if item not in interpreted_large]
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: ids may contain "gpu"
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "channels_last", "channels_innermost", "strided")
# contiguous, channels_last (4-D) / channels_last_3d (5-D), channels_innermost: (N, *S, C) stored
# contiguous and viewed as (N, C, *S), strided: x[..., 0] of a (*shape, 2) tensor (not dense).


def layout_applies(layout: str, rank: int) -> bool:
    """channels_last only for 4-D/5-D; channels_innermost (N, *S, C).movedim(-1, 1) differs from
    contiguous only when there are spatial dims; strided (a ::2 slice of the last dim) always."""
    if layout == "channels_last":
        return rank in (4, 5)
    if layout == "channels_innermost":
        return rank >= 3
    return layout in LAYOUTS


def is_dense_layout(layout: str) -> bool:
    return layout != "strided"


def make_x(shape, layout="contiguous", dtype=torch.float32, device="cpu", *, mu=None, sigma=None):
    """x ~ N(mu_c, sigma_c^2) per channel, in the requested memory layout (values drawn in fp32,
    then rounded to dtype, so the same data is seen by every dtype's reference)."""
    shape = tuple(shape)
    rank = len(shape)
    channels = shape[1]
    if mu is None:
        mu = torch.randn(channels)
    if sigma is None:
        sigma = torch.rand(channels) * 1.5 + 0.5
    view = (1, channels) + (1,) * (rank - 2)
    if layout == "contiguous":
        base = torch.randn(shape)
        x = base * sigma.view(view) + mu.view(view)
    elif layout == "channels_last":
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        x = (torch.randn(shape) * sigma.view(view) + mu.view(view)).contiguous(memory_format=fmt)
    elif layout == "channels_innermost":
        base = torch.randn((shape[0],) + shape[2:] + (channels,))
        x = (base * sigma + mu).movedim(-1, 1)
    elif layout == "strided":
        # every other element of a (*shape, 2) tensor (like x[..., ::2]): not dense, so the kernels
        # take their copy path
        full = torch.randn(shape + (2,)) * sigma.view(view + (1,)) + mu.view(view + (1,))
        x = full.to(dtype=dtype, device=device)[..., 0]  # slice after .to(), which would densify
        assert x.numel() <= 1 or not (x.is_contiguous() or x.movedim(1, -1).is_contiguous())
        return x
    else:
        raise ValueError(layout)
    x = x.to(dtype=dtype, device=device)
    return x


def make_params(channels, parametrization, *, affine=True, dtype=torch.float32, device="cpu", mu=None,
                sigma=None, eps=1e-5):
    """(mean, std_param, weight, bias) near the data's statistics but not on them, so that S1 != 0
    and S2 / n != 1. std_param gives sigma in [0.3, 3]; abs and inv also get negative raw values."""
    if mu is None:
        mu = torch.randn(channels)
    if sigma is None:
        sigma = torch.rand(channels) * 1.5 + 0.5
    mean = mu + 0.4 * sigma * torch.randn(channels)
    s = (sigma * torch.exp(0.3 * torch.randn(channels))).clamp(0.3, 3.0)
    sign = torch.where(torch.rand(channels) < 0.3, -1.0, 1.0)
    if parametrization == "abs":
        std_param = sign * (s - eps)
    elif parametrization == "log":
        std_param = s.log()
    elif parametrization == "inv":
        std_param = sign / s
    else:
        raise ValueError(parametrization)
    weight = bias = None
    if affine:
        weight = torch.randn(channels) * 0.5 + 1.0
        bias = torch.randn(channels) * 0.5
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(mean), cast(std_param), cast(weight), cast(bias)


def make_case(shape, layout="contiguous", dtype=torch.float32, device="cpu", parametrization="log",
              affine=True, param_dtype=None):
    """x and its parameters, drawn from the same per-channel statistics."""
    channels = shape[1]
    mu = torch.randn(channels)
    sigma = torch.rand(channels) * 1.5 + 0.5
    x = make_x(shape, layout, dtype, device, mu=mu, sigma=sigma)
    params = make_params(channels, parametrization, affine=affine, dtype=param_dtype or dtype, device=device,
                         mu=mu, sigma=sigma)
    return (x, *params)


# ------------------------------------------------------------------------------------------------
# Running forward + backward
# ------------------------------------------------------------------------------------------------

GRAD_NAMES = ("x", "mean", "std_param", "weight", "bias")
NLL_GRAD_WEIGHT = 0.75  # dLoss/dNLL used by run_batchless: not 1, so a dropped factor shows


def _leaf(t):
    # detach() keeps x's strides (clone() would make a strided view contiguous)
    return None if t is None else t.detach().requires_grad_(True)


def run_batchless(x, mean, std_param, weight=None, bias=None, *, backend="auto", grad_y=None,
                  nll_grad=NLL_GRAD_WEIGHT, fn=None, upcast=False, **kwargs):
    """Runs batchless_norm forward and backward on fresh leaves; backward seeds y with grad_y
    (random, in y's dtype, when None) and nll with nll_grad. Returns a dict with y, nll and the
    gradients of x, mean, std_param, weight, bias (None where the input is None).

    fn: the function to run (default bk.batchless_norm with `backend`; bk.reference.batchless_norm
    for the spec). upcast: convert every input (and grad_y) to float64 first."""
    inputs = [x, mean, std_param, weight, bias]
    if upcast:
        inputs = [None if t is None else t.detach().to(torch.float64) for t in inputs]
    leaves = [_leaf(t) for t in inputs]
    if fn is None:
        y, nll = bk.batchless_norm(*leaves, backend=backend, **kwargs)
    else:
        y, nll = fn(*leaves, **kwargs)
    if grad_y is None:
        grad_y = torch.randn(y.shape, dtype=y.dtype, device=y.device)
    grad_y = grad_y.to(y.dtype)
    outputs, seeds = [y], [grad_y]
    if nll is not None:
        outputs.append(nll)
        seeds.append(torch.tensor(nll_grad, dtype=nll.dtype, device=nll.device))
    torch.autograd.backward(outputs, seeds)
    result = {"y": y.detach(), "nll": None if nll is None else nll.detach(), "grad_y": grad_y}
    for name, leaf in zip(GRAD_NAMES, leaves):
        result[name] = None if leaf is None else leaf.grad
    return result


def run_reference64(x, mean, std_param, weight=None, bias=None, *, grad_y, nll_grad=NLL_GRAD_WEIGHT, **kwargs):
    """The executable spec in float64 on the upcast inputs."""
    kwargs.pop("backend", None)
    kwargs.pop("need_nll", None)
    return run_batchless(x, mean, std_param, weight, bias, grad_y=grad_y.to(torch.float64), nll_grad=nll_grad,
                         fn=bk.reference.batchless_norm, upcast=True, **kwargs)


def max_abs_err(actual, expected) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().to(torch.float64).cpu() - expected.detach().to(torch.float64).cpu()).abs().max().item()


def scale_of(t) -> float:
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0


def loss_of(backend):
    """A scalar loss of batchless_norm's outputs (task part and NLL), for compile / graph tests."""

    def loss(x, mean, std_param, weight, bias):
        y, nll = bk.batchless_norm(x, mean, std_param, weight, bias, backend=backend)
        return y.square().mean() + nll

    return loss


def assert_close_scaled(actual, expected, atol, rtol, what=""):
    """assert_close in float64 with atol relative to the expected tensor's scale (max(1, max|e|)):
    sums over many elements have absolute errors that grow with their magnitude."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values {a[~torch.isfinite(a)][:8].tolist()}"
    torch.testing.assert_close(a, e, atol=atol * scale_of(e), rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_within_budget(actual, low_ref, expected, floor, what=""):
    """Low-precision budget: the tested output's max error vs the float64 reference must not exceed
    twice the max error of the reference backend run in the same low dtype (the unavoidable
    rounding of inputs, outputs and fp32 accumulation), plus a floor of `floor` x scale for fp32
    summation-order noise (far below a bf16/fp16 ulp)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = max_abs_err(actual, expected)
    budget = 2.0 * max_abs_err(low_ref, expected) + floor * scale_of(expected)
    assert err <= budget, f"{what}: max error {err:.3g} vs float64 exceeds the budget {budget:.3g}"


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dim of size > 1 (size-1 dims' strides carry no layout)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1
    )
