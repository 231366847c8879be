"""Python side of the ops (schemas in csrc/ops.cpp, autograd in csrc/autograd.cpp): fake kernels.

The ops are loaded from ``batchless_kernels._C`` when it was built; without it the package still
works through the reference backend (see backends.py).
"""

from __future__ import annotations

import math
import os

import torch

from ._checks import _NORMAL, FLOAT_DTYPES, accumulation_dtype
from .parametrization import PARAMETRIZATIONS

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    import importlib.machinery

    _here = os.path.dirname(os.path.abspath(__file__))
    if not any(os.path.exists(os.path.join(_here, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        # (ImportError's own text then blames a circular import)
        EXTENSION_ERROR = ("batchless_kernels._C is not built for this Python (no compiled extension next to the "
                           "package): build it with `pip install --no-build-isolation -e .` (docs/install.md)")
    else:
        EXTENSION_ERROR = f"batchless_kernels._C could not be loaded ({error})"
        # A build that is there but does not load (another torch, a CPU without its vector
        # instructions) is a mistake to show, not only a backend to skip.
        import warnings

        warnings.warn(f"{EXTENSION_ERROR}; backend 'auto' runs the reference implementation instead",
                      RuntimeWarning, stacklevel=2)

FORWARD_OP = "batchless_kernels::batchless_norm_forward"
BACKWARD_OP = "batchless_kernels::batchless_norm_backward"
NLL_OP = "batchless_kernels::batchless_nll"
NLL_BACKWARD_OP = "batchless_kernels::batchless_nll_backward"
NLL_COMPOSITE_OP = "batchless_kernels::batchless_nll_composite"
TRAIN_OP = "batchless_kernels::batchless_norm_train"
TRITON_TRAIN_OP = "batchless_kernels::triton_norm_train"
TRAIN_FORWARD_OP = "batchless_kernels::batchless_norm_train_forward"
TRAIN_BACKWARD_OP = "batchless_kernels::batchless_norm_train_backward"
INFERENCE_OP = "batchless_kernels::batchless_norm_inference"


def extension_loaded() -> bool:
    return EXTENSION_ERROR is None


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the loaded library registered a kernel of op_name for dispatch_key (CPU, CUDA)."""
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(op_name, dispatch_key)


POISON_ENV = "BATCHLESS_POISON_OUTPUTS"
# Read once at import, like csrc/batchless_host.h reads it once: tests set it before importing.
_POISON = os.environ.get(POISON_ENV) == "1"


def poisoned(t: torch.Tensor) -> torch.Tensor:
    """Tests set BATCHLESS_POISON_OUTPUTS=1: fresh outputs then start as NaN, so that an element a
    kernel fails to write shows (csrc/batchless_host.h does the same for the C++ kernels)."""
    if _POISON and t.numel() > 0:
        t.fill_(math.nan)
    return t


def output_like(x: torch.Tensor) -> torch.Tensor:
    """The output allocation every backend uses: x's strides when x is contiguous or
    channels-innermost (dense layouts the kernels read without copies), else contiguous."""
    if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
        return torch.empty_like(x)
    return x.new_empty(x.shape)


def _check_same_device(op: str, **tensors) -> None:
    """Mixed devices must fail here too: a meta-device argument routes a call to these fakes."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise RuntimeError(f"{op}: all tensors must be on one device, got {listed}")


def check_x(x: torch.Tensor, name: str = "x") -> None:
    """csrc/batchless_host.h's check_x, for the ops whose kernels are Python (Triton) and the fake
    kernels: an (N, C, *) floating tensor. RuntimeError, as TORCH_CHECK raises."""
    if x.dim() < 2:
        raise RuntimeError(f"batchless_norm: {name} must have shape (N, C, *), got {list(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"batchless_norm: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_channel_tensors(x: torch.Tensor, **tensors) -> None:
    """check_channel_tensor of csrc/batchless_host.h: each given tensor (None: absent) is a floating
    (C,) tensor on x's device; a kernel reads C elements of each."""
    channels = x.shape[1]
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise RuntimeError(f"batchless_norm: {name} must have shape ({channels},), got {list(t.shape)}")
        if not t.dtype.is_floating_point:
            raise RuntimeError(f"batchless_norm: {name} must have a floating dtype, got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"batchless_norm: {name} must be on {x.device} like the input, got {t.device}")


def check_forward_inputs(x, **tensors) -> None:
    """plan_forward's checks (csrc/batchless_host.h): x, and the per-channel tensors against it."""
    check_x(x)
    check_channel_tensors(x, **tensors)


def check_backward_inputs(op: str, grad_y, x, output_mask, **tensors) -> None:
    """plan_backward's checks (csrc/batchless_host.h): grad_y and x alike, x present for dweight."""
    check_x(grad_y, "grad_y")
    if x is not None:
        check_x(x, "x")
        for what, a, b in (("shape", list(grad_y.shape), list(x.shape)), ("dtype", grad_y.dtype, x.dtype),
                           ("device", grad_y.device, x.device)):
            if a != b:
                raise RuntimeError(f"{op}: grad_y has {what} {a} but x has {what} {b}")
    if output_mask[1] and x is None:
        raise RuntimeError(f"{op}: dweight needs x")
    check_channel_tensors(grad_y, **tensors)


def check_grad_nll(op: str, grad_nll: torch.Tensor, like: torch.Tensor) -> None:
    """nll::check_grad_nll (csrc/batchless_nll.h): one floating element, on the sums' device."""
    if grad_nll.numel() != 1 or grad_nll.device != like.device or not grad_nll.dtype.is_floating_point:
        raise RuntimeError(f"{op}: grad_nll must be a one-element floating tensor on {like.device}, got shape "
                           f"{list(grad_nll.shape)} of {grad_nll.dtype} on {grad_nll.device}")


def check_nll_args(op: str, s1: torch.Tensor, s2: torch.Tensor, count: int) -> None:
    """nll::check_nll_args (csrc/batchless_nll.h) beyond the (C,) shapes: float32 or float64 sums
    of one dtype, and count > 0 elements per channel (an empty input has no NLL to differentiate)."""
    if s1.dtype != s2.dtype or s1.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: s1 and s2 must both be float32 or float64, got {s1.dtype} and {s2.dtype}")
    if not count > 0:
        raise RuntimeError(f"{op}: needs count > 0 (an empty input has no NLL to compute), got count={count}")


def check_eps(op: str, eps, acc: torch.dtype) -> None:
    """nll::check_eps (csrc/batchless_nll.h): a normal number of the accumulation dtype `acc`, where
    1/eps and eps itself stay finite."""
    tiny, largest = _NORMAL[acc]
    if not (isinstance(eps, float) and tiny <= eps <= largest):
        raise RuntimeError(f"{op}: eps must be a positive finite float, a normal {str(acc)[6:]} number "
                           f"({tiny:.6g} to {largest:.6g}) where the op computes, got {eps!r}")


def check_nll_op_args(op: str, s1, s2, mean, std_param, count: int, parametrization: str, eps: float) -> None:
    """All of nll::check_nll_args (csrc/batchless_nll.h) and the parametrization's check, for the NLL
    ops written in Python: RuntimeError, as TORCH_CHECK raises."""
    if parametrization not in PARAMETRIZATIONS:
        raise RuntimeError(f"{op}: parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    tensors = {"s1": s1, "s2": s2, "mean": mean, "std_param": std_param}
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape == mean.shape for t in tensors.values()):
        shapes = ", ".join(f"{k} {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                           for k, t in tensors.items())
        raise RuntimeError(f"{op}: s1, s2, mean, std_param must all have shape (C,), got {shapes}")
    check_nll_args(op, s1, s2, count)
    if not (mean.dtype.is_floating_point and std_param.dtype.is_floating_point):
        raise RuntimeError(f"{op}: mean and std_param must have floating dtypes, got {mean.dtype} and "
                           f"{std_param.dtype}")
    check_eps(op, eps, s1.dtype)
    _check_same_device(op, s1=s1, s2=s2, mean=mean, std_param=std_param)


def _forward_fake(x, mean, rstd, weight, bias, compute_stats):
    _check_same_device(FORWARD_OP, x=x, mean=mean, rstd=rstd, weight=weight, bias=bias)
    check_forward_inputs(x, mean=mean, rstd=rstd, weight=weight, bias=bias)
    acc = accumulation_dtype(x.dtype)
    n = x.shape[1] if compute_stats else 0
    return output_like(x), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


def _backward_fake(grad_y, x, mean, rstd, weight, output_mask):
    _check_same_device(BACKWARD_OP, grad_y=grad_y, x=x, mean=mean, rstd=rstd, weight=weight)
    check_backward_inputs(BACKWARD_OP, grad_y, x, output_mask, mean=mean, rstd=rstd, weight=weight)
    acc = accumulation_dtype(grad_y.dtype)
    channels = grad_y.shape[1]
    dx = output_like(x if x is not None else grad_y) if output_mask[0] else grad_y.new_empty((0,))
    dw = grad_y.new_empty((channels if output_mask[1] else 0,), dtype=acc)
    db = grad_y.new_empty((channels if output_mask[2] else 0,), dtype=acc)
    return dx, dw, db


def _train_fake(x, mean, std_param, weight, bias, parametrization, eps, gauge):
    _check_same_device(TRAIN_OP, x=x, mean=mean, std_param=std_param, weight=weight, bias=bias)
    return output_like(x), x.new_empty((), dtype=accumulation_dtype(x.dtype))


def _train_forward_fake(x, mean, std_param, weight, bias, parametrization, eps, gauge):
    _check_same_device(TRAIN_FORWARD_OP, x=x, mean=mean, std_param=std_param, weight=weight, bias=bias)
    check_forward_inputs(x, mean=mean, std_param=std_param, weight=weight, bias=bias)
    acc = accumulation_dtype(x.dtype)
    check_eps(TRAIN_FORWARD_OP, eps, acc)
    channels = x.shape[1]
    sums = [x.new_empty((channels,), dtype=acc) for _ in range(3)]  # s1, s2, rstd
    return output_like(x), *sums, x.new_empty((), dtype=acc)


def _train_backward_fake(grad_y, grad_nll, x, mean, std_param, rstd, weight, s1, s2, count, parametrization, eps,
                         output_mask):
    _check_same_device(TRAIN_BACKWARD_OP, grad_y=grad_y, grad_nll=grad_nll, x=x, mean=mean, std_param=std_param,
                       rstd=rstd, weight=weight, s1=s1, s2=s2)
    check_backward_inputs(TRAIN_BACKWARD_OP, grad_y, x, output_mask, mean=mean, std_param=std_param, rstd=rstd,
                          weight=weight, s1=s1, s2=s2)
    check_grad_nll(TRAIN_BACKWARD_OP, grad_nll, s1)
    dx, dw, db = _backward_fake(grad_y, x, mean, rstd, weight, output_mask[:3])
    dmean = mean.new_empty(mean.shape) if output_mask[3] else mean.new_empty((0,))
    dparam = std_param.new_empty(std_param.shape) if output_mask[4] else std_param.new_empty((0,))
    return dx, dw, db, dmean, dparam


def _inference_fake(x, mean, std_param, weight, bias, parametrization, eps):
    _check_same_device(INFERENCE_OP, x=x, mean=mean, std_param=std_param, weight=weight, bias=bias)
    check_forward_inputs(x, mean=mean, std_param=std_param, weight=weight, bias=bias)
    check_eps(INFERENCE_OP, eps, accumulation_dtype(x.dtype))
    return output_like(x)


def _nll_fake(s1, s2, mean, std_param, count, parametrization, eps, gauge):
    _check_same_device(NLL_OP, s1=s1, s2=s2, mean=mean, std_param=std_param)
    return s1.new_empty(())


def _nll_backward_fake(grad_nll, s1, s2, mean, std_param, count, parametrization, eps):
    _check_same_device(NLL_BACKWARD_OP, grad_nll=grad_nll, s1=s1, s2=s2, mean=mean, std_param=std_param)
    return mean.new_empty(mean.shape), std_param.new_empty(std_param.shape)  # fresh, contiguous (C,)


if extension_loaded():
    torch.library.register_fake(NLL_OP)(_nll_fake)
    torch.library.register_fake(NLL_BACKWARD_OP)(_nll_backward_fake)
    torch.library.register_fake(FORWARD_OP)(_forward_fake)
    torch.library.register_fake(BACKWARD_OP)(_backward_fake)
    torch.library.register_fake(TRAIN_OP)(_train_fake)
    torch.library.register_fake(TRITON_TRAIN_OP)(_train_fake)
    torch.library.register_fake(TRAIN_FORWARD_OP)(_train_forward_fake)
    torch.library.register_fake(TRAIN_BACKWARD_OP)(_train_backward_fake)
    torch.library.register_fake(INFERENCE_OP)(_inference_fake)
    # The autograd of FORWARD_OP and NLL_OP is registered in C++ (csrc/autograd.cpp), tens of
    # microseconds less per call than a Python registration.
