"""Python side of the compiled ops (schemas in csrc/ops.cpp): fake kernels and autograd.

The ops are loaded from ``batchless_kernels._C`` when it was built; without it the package still
works through the reference backend (see backends.py).
"""

from __future__ import annotations

import math
import os

import torch

from ._checks import accumulation_dtype

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    EXTENSION_ERROR = f"batchless_kernels._C could not be loaded ({error})"

FORWARD_OP = "batchless_kernels::batchless_norm_forward"
BACKWARD_OP = "batchless_kernels::batchless_norm_backward"
NLL_OP = "batchless_kernels::batchless_nll"
NLL_BACKWARD_OP = "batchless_kernels::batchless_nll_backward"
NLL_COMPOSITE_OP = "batchless_kernels::batchless_nll_composite"


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


def _forward_fake(x, mean, rstd, weight, bias, compute_stats):
    _check_same_device(FORWARD_OP, x=x, mean=mean, rstd=rstd, weight=weight, bias=bias)
    acc = accumulation_dtype(x.dtype)
    n = x.shape[1] if compute_stats else 0
    return output_like(x), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


def _backward_fake(grad_y, x, mean, rstd, weight, output_mask):
    _check_same_device(BACKWARD_OP, grad_y=grad_y, x=x, mean=mean, rstd=rstd, weight=weight)
    acc = accumulation_dtype(grad_y.dtype)
    channels = grad_y.shape[1]
    dx = output_like(x if x is not None else grad_y) if output_mask[0] else grad_y.new_empty((0,))
    dw = grad_y.new_empty((channels if output_mask[1] else 0,), dtype=acc)
    db = grad_y.new_empty((channels if output_mask[2] else 0,), dtype=acc)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, mean, rstd, weight, bias, _ = inputs
    _, s1, s2 = output
    ctx.mark_non_differentiable(s1, s2)  # sg(x) in the NLL: the sums carry no gradient to x
    # x is needed only for dweight (dx = grad_y * weight * rstd does not read it).
    keep_x = weight is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(x if keep_x else None, mean, rstd, weight)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def make_backward(backward_op):
    """Autograd backward of a forward op with the batchless_norm_forward signature, computed by
    backward_op (batchless_norm_backward's signature): the triton backend's. (The C++ ops have the
    same in C++, csrc/autograd.cpp.)"""

    def backward(ctx, grad_y, _grad_s1, _grad_s2):
        x, mean, rstd, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[3] and weight is not None, needs[4] and ctx.bias_dtype is not None]
        if grad_y is None or not any(mask):
            return None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: differentiable (unfused) torch ops
            dx, dw, db = _differentiable_backward(grad_y, x, mean, rstd, weight, mask)
        else:
            dx, dw, db = backward_op(grad_y, x, mean, rstd, weight, mask)
        return (
            dx if mask[0] else None,
            None,
            None,
            dw.to(ctx.weight_dtype) if mask[1] else None,
            db.to(ctx.bias_dtype) if mask[2] else None,
            None,
        )

    return backward


def _differentiable_backward(grad_y, x, mean, rstd, weight, mask):
    """The backward op's formulas in plain torch ops, so that higher-order gradients (a gradient
    penalty, create_graph=True) flow through them. Not fused: used only when asked for."""
    acc = accumulation_dtype(grad_y.dtype)
    view = (1, grad_y.shape[1]) + (1,) * (grad_y.dim() - 2)
    dims = [0] + list(range(2, grad_y.dim()))
    g = grad_y.to(acc)
    r = rstd.to(acc).view(view)
    scale = r if weight is None else r * weight.to(acc).view(view)
    dx = (g * scale).to(grad_y.dtype) if mask[0] else None
    dw = (g * ((x.to(acc) - mean.to(acc).view(view)) * r)).sum(dims) if mask[1] else None
    db = g.sum(dims) if mask[2] else None
    return dx, dw, db


def _nll_fake(s1, s2, mean, std_param, count, parametrization, eps, gauge):
    _check_same_device(NLL_OP, s1=s1, s2=s2, mean=mean, std_param=std_param)
    return s1.new_empty(())


def _nll_backward_fake(grad_nll, s1, s2, mean, std_param, count, parametrization, eps):
    _check_same_device(NLL_BACKWARD_OP, grad_nll=grad_nll, s1=s1, s2=s2, mean=mean, std_param=std_param)
    return torch.empty_like(mean), torch.empty_like(std_param)


if extension_loaded():
    torch.library.register_fake(NLL_OP)(_nll_fake)
    torch.library.register_fake(NLL_BACKWARD_OP)(_nll_backward_fake)
    torch.library.register_fake(FORWARD_OP)(_forward_fake)
    torch.library.register_fake(BACKWARD_OP)(_backward_fake)
    # The autograd of FORWARD_OP and NLL_OP is registered in C++ (csrc/autograd.cpp), tens of
    # microseconds less per call than a Python registration.
