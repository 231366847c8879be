"""batchless_norm: the public functional entry point. Validates, picks a backend, runs the fused
op, and turns its per-channel sums into the NLL term."""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch
import torch.utils.checkpoint
from torch.autograd import forward_ad

from . import backends, ops, reference
from ._checks import (accumulation_dtype, bool_option, check_eps_normal, check_inputs, per_channel_inputs,
                      refuse_expanded_weights)
from .backends import (device_type_of, fixed_auto_choice, inference_op, kernel_ops, resolve_backend_for, train_op,
                       unavailable_reason)
from .parametrization import check_eps, check_parametrization, rstd_and_log_std, rstd_ratio


def batchless_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    std_param: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    parametrization: str = "log",
    eps: float = 1e-5,
    gauge: bool = True,
    backend: str = "auto",
    need_nll: bool | None = None,
):
    """Batchless normalization of x over its channel dim 1; returns ``(y, nll)``.

    Args:
        x: (N, C, *) float16/bfloat16/float32/float64; contiguous, channels_last or any layout with
            channels innermost and the other dims in order ((N, *, C) in memory) runs without copies.
        mean, std_param: (C,) the learned Gaussian: mu and the raw sigma parameter; or, for
            Gaussians shared over other axes than the batch (docs/method.md, "Shared axes"), any
            shape of x.dim() - 1 dims that broadcasts to x.shape[1:], a size-1 dim being an axis the
            Gaussian shares: (C, 1, 1) is (C,) on 4-D x, (C, H, W) one Gaussian per position,
            (1, 1, 1) one for the layer. Any strides.
        weight, bias: optional affine output (gamma, beta), of the same shape as mean.
        parametrization: how std_param gives sigma: "abs" (BLN), "log" (BLNlog), "inv" (BLNinv).
        eps: positive, a normal number of the accumulation dtype (1.2e-38 to 3.4e38 for float32);
            keeps logs and divisions finite (see parametrization.py). A float or any real number
            (numpy's too; under torch.compile, not a numpy float32: float(eps)).
        gauge: subtract sg(mean_c log sigma_c) + 1/2 from the NLL (value only; same gradients).
        backend: "auto", "reference", "cpu", "triton" or "cuda".
        need_nll: compute the NLL? None (default): when grad mode is on and mean or std_param
            requires grad, or a torch.func transform runs the call with mean or std_param among its
            tensors (inside vmap, requires_grad reads False even where an ensemble's stacked
            parameters train); and, grad mode on or off, when mean or std_param carries a
            forward-mode tangent (a torch.autograd.forward_ad dual tensor). When False, nll is None.
            Where y needs no gradient either (no_grad, a frozen layer on a frozen input), the
            compiled backends run the inference op, without the sums; where y needs one (e.g. frozen
            mean and std_param, trainable x), they run the training op and drop its NLL, so that y
            has the same bits on every path: its sums cost arithmetic, not memory traffic, on the
            CPU, and a second small launch on CUDA.

    Returns:
        y: same shape, dtype and memory format as x; differentiable in x, weight, bias.
        nll: 0-dim tensor in the accumulation dtype (float32, float64 for float64 x), the mean
            over every element of x of the Gaussian NLL; differentiable in mean and std_param only.
            An empty x (N = 0 or C = 0) gives nll = 0 with zero gradients.

    Raises:
        TypeError: x or mean or std_param not a tensor (weight, bias: a tensor or None), a tensor
            of a non-floating dtype, or an option of the wrong type (parametrization not a str,
            eps not a real number, gauge not a bool, need_nll not a bool or None, backend not a str).
        ValueError: x of fewer than 2 dims; a parameter whose shape does not fit x, or on another
            device than x; an unknown parametrization or backend name; eps not positive and finite,
            or not a normal number of the dtype the call computes in (float32 for 16- and 32-bit x,
            float64 for float64 x): below the smallest 1/sigma would overflow, above the largest eps.
        RuntimeError: the backend asked for cannot run x here (the message says why: extension not
            built, no GPU, a CPU tensor for cuda).
    """
    if _fast is not None and not torch.compiler.is_compiling():
        # The common case (plain tensors, (C,) parameters, a backend that runs this library's kernels)
        # checked and dispatched in C++; None for anything else.
        out = _fast(x, mean, std_param, weight, bias, parametrization, eps, gauge, backend, need_nll)
        if out is not None:
            return out
    refuse_expanded_weights(mean, std_param, weight, bias)
    # (C,) parameters: the common case, checked fast; anything else is checked in full.
    per_channel = per_channel_inputs(x, mean, std_param, weight, bias)
    param_shape = None if per_channel else check_inputs(x, mean, std_param, weight, bias)
    check_parametrization(parametrization)
    eps = check_eps(eps)
    check_eps_normal(eps, x.dtype)
    gauge = bool_option("gauge", gauge)
    if need_nll is not None:
        need_nll = bool_option("need_nll", need_nll, "a bool or None")
    # torch.func transforms and forward-mode AD (dual tensors) differentiate the spec, not the ops.
    functorch = _under_functorch()
    dual = _has_tangent(x, mean, std_param, weight, bias)
    if need_nll is None:
        # Under torch.func transforms requires_grad may read False where the parameters train (plain
        # vmap of an ensemble; compile(vmap(grad(loss))) gave mean and std_param zero per-sample
        # gradients): the NLL is computed whatever it says where the transform holds the parameters
        # (not for a frozen model differentiated in its input).
        # A tangent on mean or std_param (forward-mode AD) asks for the NLL's, as torch.func.jvp does:
        # dual tensors made of plain (detached) tensors, as gradcheck's forward-AD check makes them.
        need_nll = (torch.is_grad_enabled() and (
            mean.requires_grad or std_param.requires_grad
            or (functorch and (torch.compiler.is_compiling() or _is_functorch_wrapped(mean)
                               or _is_functorch_wrapped(std_param))))) or (dual and _has_tangent(mean, std_param))
    device_type = device_type_of(x)
    name = resolve_backend_for(backend, device_type, x)
    if name != "reference" and (functorch or dual or exporting()):
        # torch.func (grad, vjp, jacrev, vmap) cannot see through the compiled ops' C++ autograd:
        # run the executable spec, which it differentiates and batches exactly (per-sample gradients).
        # torch.export (and torch.onnx.export, which uses it): standard ATen ops, which ONNX and other
        # runtimes know, where the compiled ops would need this library at load time.
        name = "reference"
    if name != "reference" and not per_channel:  # shared axes, or (C, 1, ..)
        grouped = _as_channels(x, param_shape)
        if grouped is None:  # no view of x puts the Gaussians on one axis: the tensor-op spec
            name = "reference"
        else:  # (which warns, below)
            flat = [t if t is None else t.reshape(grouped.shape[1]) for t in (mean, std_param, weight, bias)]
            y, nll = batchless_norm(grouped, *flat, parametrization=parametrization, eps=eps, gauge=gauge,
                                    backend=name, need_nll=need_nll)
            return y.view(x.shape), nll
    if need_nll:
        _warn_if_reentrant_checkpoint()
    if name == "reference":
        return reference.batchless_norm(
            x, mean, std_param, weight, bias,
            parametrization=parametrization, eps=eps, gauge=gauge, need_nll=need_nll,
        )

    # torch.jit.trace records the training op whatever the grad mode: its trace must run in either
    # mode (and its check retraces under no_grad, which would otherwise record the inference op).
    if not need_nll and not torch.jit.is_tracing():
        grad_mode = torch.is_grad_enabled()
        if not (grad_mode and (x.requires_grad or (weight is not None and weight.requires_grad)
                               or (bias is not None and bias.requires_grad))):
            # No gradient to y (no_grad, or a frozen layer on a frozen input): one op, r computed inside.
            if grad_mode:  # mean and std_param are constants of y (sg), as in the training op
                mean, std_param = mean.detach(), std_param.detach()
            return inference_op(name)(x, mean, std_param, weight, bias, parametrization, eps), None
    if _HAS_FUSED_NLL.get(device_type, False):
        # One autograd node for y and the NLL: the NLL's gradients are computed in the layer's own
        # backward (csrc/ops.cpp, batchless_norm_train), where FSDP and checkpointing expect them.
        # Without need_nll, y still comes from this op: its r is the training's (computed inside the
        # kernels on CUDA), so that y has the same bits on every path; the NLL is dropped.
        y, nll = train_op(name)(x, mean, std_param, weight, bias, parametrization, eps, gauge)
        return y, (nll if need_nll else None)
    forward_op, _ = kernel_ops(name)
    acc = accumulation_dtype(x.dtype)
    # Not detached where the NLL trains them: the op gives mean and rstd no gradient (sg), and y's
    # graph reaches them as the training op's does (reference.stop_gradient says why).
    link = need_nll and torch.is_grad_enabled()
    mean_in, std_in = (mean, std_param) if link else (mean.detach(), std_param.detach())
    rstd, _ = rstd_and_log_std(std_in.to(acc), parametrization, eps)
    y, s1, s2 = forward_op(x, mean_in.to(acc), rstd, weight, bias, need_nll)
    if not need_nll:
        return y, None
    if x.numel() == 0:
        return y, reference.empty_batch_nll(mean.to(acc), std_param.to(acc))
    # No compiled NLL kernel for this device (an extension built without CUDA, triton on a GPU).
    count = x.numel() // x.shape[1]  # elements per channel
    return y, nll_from_sums(s1, s2, count, mean, std_param, parametrization, eps, gauge)


def _as_channels(x: torch.Tensor, param_shape: tuple[int, ...]) -> torch.Tensor | None:
    """x viewed so that each Gaussian of `param_shape` is one channel of the kernels' layouts, or
    None where no view does it. Per channel ((C, 1, ..) on any layout x): x itself. On a contiguous x,
    parameters varying along the leading dims of x.shape[1:] only (e.g. (C, H, 1), (1, 1, 1)):
    (N, G, S) planes; along the trailing dims only (e.g. (1, H, W)): (N * prefix, G) rows."""
    rest = tuple(x.shape[1:])
    varying = [i for i, d in enumerate(param_shape) if d != 1]
    if all(i == 0 for i in varying) and param_shape[0] == rest[0]:
        return x
    if not x.is_contiguous():
        return None
    last = varying[-1] + 1 if varying else 0
    if list(param_shape[:last]) == list(rest[:last]):
        return x.view(x.shape[0], math.prod(rest[:last]), math.prod(rest[last:]))
    first = varying[0]
    if list(param_shape[first:]) == list(rest[first:]):
        return x.view(x.shape[0] * math.prod(rest[:first]), math.prod(rest[first:]))
    return None


def _has_tangent(*tensors) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad) runs and one of `tensors` is dual."""
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def exporting() -> bool:
    """Whether torch.export is tracing this call, strict (through Dynamo) or not (as torch.onnx.export
    does); not torch.compile. It reads the flag that torch.compiler.is_exporting() returns: torch 2.11's
    Dynamo folds that function to True while compiling (later ones read the flag too)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is None:  # a torch without the flag: non-strict export only
        return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()
    return flag


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _under_functorch() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap) is running this call, eagerly or
    inside torch.compile (Dynamo folds this query to its value at trace time)."""
    return torch._C._are_functorch_transforms_active()


def compiling_under_functorch() -> bool:
    """Whether torch.compile traces a torch.func transform (compile(vmap(grad(loss)))): Dynamo then
    reads requires_grad as False for the tensors grad traces, and AOTAutograd cannot return a
    tensor of the transform that a module keeps as an attribute."""
    return torch.compiler.is_compiling() and _under_functorch()


def in_backward_pass() -> bool:
    """Whether this eager call runs inside a backward pass (a torch.utils.checkpoint recomputation):
    one C call. False under torch.compile, whose Dynamo does not trace the query."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _warn_if_reentrant_checkpoint() -> None:
    """torch.utils.checkpoint(use_reentrant=True) runs the forward under no_grad (no NLL), then
    again inside the backward, where the NLL it computes reaches no loss: mean and std_param would
    get no NLL gradient without a word. Looked for only inside a backward pass."""
    if not in_backward_pass():
        return
    code = torch.utils.checkpoint.CheckpointFunction.backward.__code__
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    if frame is not None:
        warnings.warn(
            "batchless_norm is being recomputed by torch.utils.checkpoint(use_reentrant=True), whose first "
            "forward ran without gradients: the NLL term of this layer is not in the loss, so mean and "
            "std_param get no NLL gradient. Use torch.utils.checkpoint(..., use_reentrant=False), which gives "
            "the same gradients as no checkpointing.",
            UserWarning,
            stacklevel=3,
        )


# Devices whose compiled library has the one-loop NLL op; elsewhere nll_from_sums composes it from
# tensor ops. Looked up once: the dispatcher query cannot be traced by torch.compile.
_HAS_FUSED_NLL = {dev: ops.has_kernel(ops.NLL_OP, key) for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def _fast_path():
    """csrc/python_module.cpp's batchless_norm_fast, told where it picks the op this function would:
    the cpu / cuda backend runs (with the one-node training op), and "auto" always picks it. None
    without the extension."""
    if not ops.extension_loaded():
        return None
    from . import _C

    runs = [_HAS_FUSED_NLL[d] and unavailable_reason(d, d) is None for d in ("cpu", "cuda")]
    environ = backends._ENVIRON if backends._ENV_KEY is not None else None  # where _env_backend reads it
    try:
        _C.set_fast_path(*runs, *(fixed_auto_choice(d) == d for d in ("cpu", "cuda")), environ, backends._ENV_KEY,
                         os.environ.encodevalue("auto") if environ is not None else None)
    except TypeError as error:  # a library built from older sources: the general path runs every call
        warnings.warn(f"batchless_kernels._C is older than the package ({error}): rebuild it (docs/install.md)",
                      RuntimeWarning, stacklevel=2)
        return None
    return _C.batchless_norm_fast


_fast = _fast_path()


def nll_from_sums(s1, s2, count, mean, std_param, parametrization, eps, gauge):
    """The NLL term from the forward's per-channel sums S1 = sum xhat0, S2 = sum xhat0^2, taken at
    (mu0, r0) = the detached values of (mean, r). With d = mu0 - mu and q = r / r0 (1 in value),
    the NLL's sum of squares is
        sum_i ((x_i - mu) r)^2 = q^2 S2 + 2 r0 q^2 d S1 + n (r0 q d)^2,
    which equals S2 in value and, differentiated by autograd in (mean, std_param), gives exactly
    docs/method.md's gradients: dL/dmu = -(r / (C n)) S1, dL/dsigma = (1 - S2 / n) / (C sigma). q comes
    from rstd_ratio, so that no step of the autograd overflows where the gradient is representable."""
    acc = s1.dtype
    # Copies: the NLL's backward runs as soon as the loss's does, and must not read the parameters'
    # storage, which FSDP frees between a layer's forward and its backward.
    mu = mean.to(acc, copy=True)
    p = std_param.to(acc, copy=True)
    n = count
    r0 = rstd_and_log_std(p.detach(), parametrization, eps)[0]
    log_sigma = rstd_and_log_std(p, parametrization, eps)[1]
    q = rstd_ratio(p, p.detach(), parametrization, eps)
    d = mu.detach() - mu
    rq = r0 * q  # = r in value; its gradient in p is r0 dq/dp, never -r^2 (abs)
    sum_sq = q * q * s2 + 2 * (rq * q) * d * s1 + n * (rq * d).square()
    nll = (log_sigma + 0.5 * sum_sq / n).mean()
    if gauge:
        nll = nll - log_sigma.detach().mean() - 0.5
    return nll


def _nll_composite(s1, s2, mean, std_param, count, parametrization, eps, gauge):
    """NLL_COMPOSITE_OP: the NLL op's checks, then nll_from_sums (a public op: it broadcast (1,)
    sums and gave values for count <= 0 or eps < 0)."""
    ops.check_nll_op_args(ops.NLL_COMPOSITE_OP, s1, s2, mean, std_param, count, parametrization, eps)
    return nll_from_sums(s1, s2, count, mean, std_param, parametrization, eps, gauge)


if ops.extension_loaded():  # the differentiable twin of the NLL op, for its create_graph backward
    torch.library.impl(ops.NLL_COMPOSITE_OP, "CompositeImplicitAutograd")(_nll_composite)
