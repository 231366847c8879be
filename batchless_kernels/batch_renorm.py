"""Batch Renormalization (Ioffe, NeurIPS 2017): the baseline of docs/method.md, in plain PyTorch.

Training, with the batch statistics mu_B, sigma_B = sqrt(var_B + eps) (biased variance) over every
dim but 1, and the moving statistics mu, sigma:

    r    = clip(sg(sigma_B / sigma), 1 / rmax_t, rmax_t)
    d    = clip(sg((mu_B - mu) / sigma), -dmax_t, dmax_t)
    xhat = (x - mu_B) / sigma_B * r + d,        y = gamma * xhat + beta

Gradients flow through mu_B and sigma_B (as in BN), not through r and d. Then, as in the paper,
mu += momentum * (mu_B - mu) and sigma += momentum * (sigma_B - sigma). Evaluation uses the moving
statistics: y = gamma * (x - mu) / sigma + beta, the function training converges to when r and d
are not clipped. rmax_t, dmax_t are 1 and 0 (plain BN) for the first ``warmup_steps`` training
steps, then grow linearly to rmax, dmax over ``relax_steps`` steps: at step t (counted from 0),
progress = clamp((t - warmup_steps) / relax_steps, 0, 1), so with relax_steps > 0 the ramp starts
from (1, 0) at step warmup_steps itself (one more plain-BN step).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ._checks import (accumulation_dtype, bool_option, check_eps_fits, check_layer_input, factory_kwargs,
                       int_option, real_option, refuse_jit_script)
from .functional import in_backward_pass
from .parametrization import check_eps


def _moving_normalize(x, running_mean, running_std, weight, bias, num_features: int) -> torch.Tensor:
    """y = gamma * (x - mu) / sigma + beta with the moving statistics: the eval-mode forward."""
    acc = accumulation_dtype(x.dtype)
    view = (1, num_features) + (1,) * (x.dim() - 2)
    xhat = (x.to(acc) - running_mean.to(acc).view(view)) / running_std.to(acc).view(view)
    return _affine(xhat, weight, bias, acc, view).to(x.dtype)


def _traced_moving_normalize(x, running_mean, running_std, weight, bias, accepted_dims, num_features: int,
                             layer: str) -> torch.Tensor:
    """_moving_normalize with the input checked: the node that torch.fx.symbolic_trace records for an
    eval-mode layer (torch.fx.wrap), whose graph has no layer to call _check_input_dim on."""
    check_layer_input(x, accepted_dims, num_features, layer)
    return _moving_normalize(x, running_mean, running_std, weight, bias, num_features)


torch.fx.wrap("_traced_moving_normalize")


def _affine(xhat: torch.Tensor, weight, bias, acc: torch.dtype, view) -> torch.Tensor:
    return xhat if weight is None else xhat * weight.to(acc).view(view) + bias.to(acc).view(view)


def _check_steps(name: str, value) -> int:
    # the schedule reads the int64 step counter as a float: exact up to 2^53
    return int_option(name, value, "an int in [0, 2^53]", lambda v: 0 <= v <= 2 ** 53)


def _check_float(name: str, value, low: float, high: float = math.inf) -> float:
    bounds = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
    return real_option(name, value, f"a finite float {bounds}", lambda v: low <= v <= high)


def _layer_doc(inputs: str) -> str:
    """The docstring of each public class (help() shows the class's own)."""
    return f"""Batch Renormalization over dim 1 (channels), modeled on nn.BatchNorm*d (module docstring:
    the formulas, from Ioffe, "Batch Renormalization", NeurIPS 2017). {inputs}

    Args:
        num_features: C, the channels of the inputs.
        eps: positive; added to the batch variance: sigma_B = sqrt(var_B + eps).
        momentum: in [0, 1]; the moving statistics' update mu += momentum * (mu_B - mu), sigma likewise.
        affine: learn a per-channel scale ``weight`` (gamma) and shift ``bias`` (beta).
        rmax, dmax: the clips of r (>= 1) and d (>= 0) after the schedule's ramp.
        warmup_steps: training steps with rmax_t = 1, dmax_t = 0 (plain BN) first (int >= 0).
        relax_steps: training steps over which rmax_t, dmax_t then grow linearly to rmax, dmax,
            from (1, 0) at step warmup_steps (int >= 0; 0: at once).
        device, dtype: of the parameters and buffers.

    Raises:
        ValueError / TypeError naming the argument, for invalid values; ValueError for an input of
        another rank or another number of channels, TypeError for a non-floating input.

    Buffers: ``running_mean`` (mu), ``running_std`` (sigma, the moving average of sqrt(var_B + eps):
    it already includes eps, so eval divides by it directly; unlike nn.BatchNorm there is no
    running_var and no unbiased correction), ``num_batches_tracked`` (the training step counter
    that drives the rmax/dmax schedule).

    A training batch with one value per channel (e.g. a (1, C) input) does not raise, unlike
    nn.BatchNorm: there x - mu_B = 0 and var_B = 0, so the output is gamma * d + beta (the moving
    statistics' normalization, clipped by dmax_t) and sigma moves toward sqrt(eps). That is what the
    formulas give; it is allowed so that small-batch comparisons can run, not recommended.
    An empty batch (N = 0) is normalized with the moving statistics and updates nothing.
    """


class _BatchRenorm(nn.Module):
    __doc__ = _layer_doc("For (N, C, *) inputs.")

    _accepted_dims: tuple[int, ...] = ()
    track_running_stats = True  # nn.BatchNorm's attribute, which code written for BN reads: always here

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        relax_steps: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_features = int_option("num_features", num_features, "a positive int", lambda v: v > 0)
        factory = factory_kwargs(device, dtype)
        self.num_features = num_features
        self.eps = check_eps(eps)
        check_eps_fits(self.eps, dtype)
        self.momentum = _check_float("momentum", momentum, 0.0, 1.0)
        self.affine = bool_option("affine", affine)
        self.rmax = _check_float("rmax", rmax, 1.0)
        self.dmax = _check_float("dmax", dmax, 0.0)
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps)
        self.relax_steps = _check_steps("relax_steps", relax_steps)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_std", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked",
            torch.tensor(0, dtype=torch.long, device=factory["device"]),
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """running_mean 0, running_std 1, num_batches_tracked 0 (the schedule starts again)."""
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """reset_running_stats, and weight 1, bias 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def current_limits(self) -> tuple[float, float]:
        """(rmax_t, dmax_t) for the next training step, from num_batches_tracked: (1, 0) during the
        warmup, then linear in the step up to (rmax, dmax) after relax_steps more steps."""
        rmax, dmax = self._limits(torch.float64)
        return float(rmax), float(dmax)

    def _limits(self, dtype: torch.dtype) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """current_limits as floats without a schedule, else as tensors of `dtype` on the counter's
        device: the forward reads no device value on the host (no sync per step on a GPU; traceable)."""
        if self.warmup_steps == 0 and self.relax_steps == 0:
            return self.rmax, self.dmax
        # The schedule in float64 whatever `dtype`: float32 holds the step exactly only up to 2^24 (the
        # warmup ended a step early beyond it; _check_steps promises steps exact up to 2^53).
        step = self.num_batches_tracked.to(torch.float64)
        if self.relax_steps == 0:
            progress = (step >= self.warmup_steps).to(torch.float64)
        else:
            progress = ((step - self.warmup_steps) / self.relax_steps).clamp(0.0, 1.0)
        return (1.0 + (self.rmax - 1.0) * progress).to(dtype), (self.dmax * progress).to(dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        check_layer_input(x, self._accepted_dims, self.num_features, type(self).__name__)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.BatchNorm's name: layer(input=x)
        """y of input's shape and dtype; in training mode the batch's renormalization, and the moving
        statistics' update. TypeError / ValueError for an input of another type, rank or width."""
        x = input
        if isinstance(x, torch.fx.Proxy):
            if self.training:
                raise TypeError(f"torch.fx.symbolic_trace cannot trace a {type(self).__name__} in training mode (its "
                                "step updates the moving statistics in place): trace the model in eval mode, or keep "
                                "the layer a leaf module (torch.fx.Tracer.is_leaf_module)")
            return _traced_moving_normalize(x, self.running_mean, self.running_std, self.weight, self.bias,
                                            self._accepted_dims, self.num_features, type(self).__name__)
        self._check_input_dim(x)  # a subclass's own rule, where it has one
        if not self.training or x.numel() == 0:
            return _moving_normalize(x, self.running_mean, self.running_std, self.weight, self.bias, self.num_features)
        if in_backward_pass():
            warnings.warn(
                f"{type(self).__name__} in training mode is being recomputed inside a backward pass (torch.utils."
                "checkpoint): its first forward has updated the moving statistics, so this recomputation takes "
                "other r and d (wrong gradients) and updates them a second time. Keep BatchRenorm layers out of "
                "checkpointed regions.", UserWarning, stacklevel=2)
        acc = accumulation_dtype(x.dtype)
        view = (1, self.num_features) + (1,) * (x.dim() - 2)
        xhat = self._renormalize(x.to(acc), self.running_mean.to(acc), self.running_std.to(acc), view, acc)
        return _affine(xhat, self.weight, self.bias, acc, view).to(x.dtype)

    # Run eagerly under torch.compile: AOTAutograd recomputed r and d in the backward from the buffers
    # after their in-place updates (the next step's limits and moving statistics): wrong gradients.
    @torch.compiler.disable(reason="BatchRenorm's training step updates the moving statistics in place, and "
                            "AOTAutograd would recompute r and d in the backward from the updated buffers (wrong "
                            "gradients): it runs eagerly, so a model training BatchRenorm cannot compile with "
                            "fullgraph=True")
    def _renormalize(self, xf, run_mu, run_sigma, view, acc) -> torch.Tensor:
        """xhat of a training batch (module docstring), and the updates of the moving statistics."""
        dims = [0] + list(range(2, xf.dim()))
        var_b, mu_b = torch.var_mean(xf, dims, correction=0)
        sigma_b = torch.sqrt(var_b + self.eps)
        rmax, dmax = self._limits(acc)
        with torch.no_grad():  # the stop-gradients: r and d are constants for autograd
            r = torch.clamp(sigma_b / run_sigma, 1.0 / rmax, rmax)
            d = torch.clamp((mu_b - run_mu) / run_sigma, -dmax, dmax)
        xhat = (xf - mu_b.view(view)) * (r / sigma_b).view(view) + d.view(view)
        with torch.no_grad():
            self.running_mean.add_(self.momentum * (mu_b - run_mu))
            self.running_std.add_(self.momentum * (sigma_b - run_sigma))
            self.num_batches_tracked.add_(1)
        return xhat

    __prepare_scriptable__ = refuse_jit_script

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, "
            f"relax_steps={self.relax_steps}"
        )


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _layer_doc("For (N, C) or (N, C, L) inputs, where nn.BatchNorm1d is used.")

    _accepted_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _layer_doc("For (N, C, H, W) inputs, where nn.BatchNorm2d is used.")

    _accepted_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _layer_doc("For (N, C, D, H, W) inputs, where nn.BatchNorm3d is used.")

    _accepted_dims = (5,)
