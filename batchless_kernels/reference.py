"""Pure-PyTorch batchless normalization: the executable spec of docs/method.md.

Written for clarity, not speed: autograd through ordinary torch ops, ``.detach()`` for the
stop-gradients (``stop_gradient`` where the parameter must stay in y's graph). Every fused backend is
tested against this function run in float64.

    y   = (x - sg(mu)) * sg(r) * gamma + beta                      (trains x, gamma, beta)
    nll = mean_c [ log sigma_c + 1/2 mean_i ((sg(x) - mu_c) r_c)^2 ]  (trains mu, sigma)
          - [ sg(mean_c log sigma_c) + 1/2 ]   when gauge=True

The mean runs over every element of x (instances, positions and channels). The parameters are (C,),
one Gaussian per channel, or of any shape of x.dim() - 1 dims that broadcasts to x.shape[1:]: a
size-1 dim is an axis the Gaussian shares (the author's shared_axes), e.g. (C, H, W) per position. An empty input
(N = 0 or C = 0) has no elements to average: its nll is defined as 0, with zero gradients.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from ._checks import accumulation_dtype, check_eps_normal, check_inputs
from .parametrization import check_eps, check_parametrization, normalize, rstd_and_log_std

__all__ = ["batchless_norm", "empty_batch_nll", "stop_gradient"]


class _StopGradient(torch.autograd.Function):
    """sg(t) as an autograd node: t's value, and no gradient (None, as the compiled ops give mean and
    std_param through y: an optimizer's weight decay skips a parameter whose .grad is None)."""

    @staticmethod
    def forward(t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> None:
        return None


def stop_gradient(t: torch.Tensor) -> torch.Tensor:
    """sg(t) that keeps t in the autograd graph of what uses it, unlike t.detach(): the y of a training
    forward reaches mean and std_param, as the compiled ops' y does. DistributedDataParallel with
    find_unused_parameters=True walks the graph from the module's outputs, marks the parameters it
    does not reach as unused, then fails when the NLL's gradient arrives for them. Under torch.func's
    transforms (no DDP there; per-sample gradients) and forward-mode AD, t.detach()."""
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return t.detach()
    return _StopGradient.apply(t)


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
    need_nll: bool = True,
):
    """Returns (y, nll); nll is None when need_nll is False. Computes in the accumulation dtype."""
    param_shape = check_inputs(x, mean, std_param, weight, bias)
    check_parametrization(parametrization)
    eps = check_eps(eps)
    check_eps_normal(eps, x.dtype)
    acc = accumulation_dtype(x.dtype)
    channel_view = (1,) + param_shape  # (1, C, 1, ...) per channel; size-1 dims: shared axes

    # Copies: the NLL's backward runs as soon as the loss's does, and must not read the parameters'
    # storage, which FSDP frees between a layer's forward and its backward.
    mu = mean.to(acc, copy=True)
    p = std_param.to(acc, copy=True)
    r, log_sigma = rstd_and_log_std(p, parametrization, eps)
    xf = x.to(acc)

    # y keeps mean and std_param in its graph only where it has a gradient at all (x, weight or bias
    # trains): the compiled ops mark a y of frozen x, weight, bias non-differentiable.
    y_needs_grad = x.requires_grad or any(t is not None and t.requires_grad for t in (weight, bias))
    sg = stop_gradient if need_nll and torch.is_grad_enabled() and y_needs_grad else torch.Tensor.detach
    y = (xf - sg(mu).view(channel_view)) * sg(r).view(channel_view)
    if weight is not None:
        y = y * weight.to(acc).view(channel_view)
    if bias is not None:
        y = y + bias.to(acc).view(channel_view)
    y = y.to(x.dtype)

    if not need_nll:
        return y, None
    if x.numel() == 0:
        return y, empty_batch_nll(mu, p)
    # = (sg(x) - mu) * r; `normalize` keeps autograd off dr/dp, which overflows for tiny sigma (abs)
    xhat = normalize(xf.detach() - mu.view(channel_view), p.view(channel_view), parametrization, eps)
    # the mean over every element of log sigma + xhat^2 / 2; each Gaussian covers as many elements
    nll = log_sigma.mean() + 0.5 * xhat.square().mean()
    if gauge:
        nll = nll - log_sigma.detach().mean() - 0.5
    return y, nll


def empty_batch_nll(mu: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The NLL of an empty input: 0, connected to mu and p so that their gradients are 0."""
    return (mu.sum() + p.sum()) * 0
