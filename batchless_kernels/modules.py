"""Drop-in replacements for nn.BatchNorm1d/2d/3d, and nll_loss to add their NLL terms to a loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_layer_input
from .backends import BACKENDS
from .functional import batchless_norm
from .parametrization import check_eps, check_parametrization, param_from_std, std_from_param


class _BatchlessNorm(nn.Module):
    """Batchless normalization over dim 1 (channels): learned mean and std, trained by the NLL term.

    The same function in train and eval mode. After each forward the layer keeps its (unweighted)
    NLL term in ``self.nll``; ``batchless_kernels.nll_loss(model)`` adds them up with nll_weight.
    """

    _accepted_dims: tuple[int, ...] | None = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        parametrization: str = "log",
        nll_weight: float = 1.0,
        gauge: bool = True,
        init_mean: float = 0.0,
        init_std: float = 1.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not (isinstance(nll_weight, (int, float)) and math.isfinite(nll_weight) and nll_weight >= 0):
            raise ValueError(f"nll_weight must be a finite float >= 0, got {nll_weight!r}")
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be a positive finite float, got {init_std!r}")
        if not (isinstance(init_mean, (int, float)) and math.isfinite(init_mean)):
            raise ValueError(f"init_mean must be a finite float, got {init_mean!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = check_eps(eps)
        self.affine = bool(affine)
        self.parametrization = check_parametrization(parametrization)
        self.nll_weight = float(nll_weight)
        self.gauge = bool(gauge)
        self.init_mean = float(init_mean)
        self.init_std = float(init_std)
        param_from_std(self.init_std, self.parametrization, self.eps)  # validates init_std vs eps
        self.backend = backend
        self.mean = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        self.std_param = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.nll: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mean.fill_(self.init_mean)
            self.std_param.fill_(float(param_from_std(self.init_std, self.parametrization, self.eps)))
            if self.affine:
                nn.init.ones_(self.weight)
                nn.init.zeros_(self.bias)
        self.nll = None

    def __getstate__(self):
        # The latest NLL belongs to the current step's autograd graph, not to the layer's state:
        # leave it out so that copy.deepcopy and pickling work after a forward.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "nll": None}

    @property
    def std(self) -> torch.Tensor:
        """sigma per channel, from std_param (read-only, no gradient): the standard deviation of the
        NLL's Gaussian, positive. With parametrization="inv" it is 1/abs(std_param); a negative
        std_param flips the sign of the output (r = std_param, docs/method.md), not of sigma."""
        with torch.no_grad():
            return std_from_param(self.std_param, self.parametrization, self.eps)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        check_layer_input(x, self._accepted_dims, self.num_features, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        y, self.nll = batchless_norm(
            x, self.mean, self.std_param, self.weight, self.bias,
            parametrization=self.parametrization, eps=self.eps, gauge=self.gauge, backend=self.backend,
        )
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"parametrization={self.parametrization!r}, nll_weight={self.nll_weight}, gauge={self.gauge}"
        )


class BatchlessNorm1d(_BatchlessNorm):
    """For (N, C) or (N, C, L) inputs, where nn.BatchNorm1d is used."""

    _accepted_dims = (2, 3)


class BatchlessNorm2d(_BatchlessNorm):
    """For (N, C, H, W) inputs, where nn.BatchNorm2d is used."""

    _accepted_dims = (4,)


class BatchlessNorm3d(_BatchlessNorm):
    """For (N, C, D, H, W) inputs, where nn.BatchNorm3d is used."""

    _accepted_dims = (5,)


class BatchlessNormNd(_BatchlessNorm):
    """For (N, C, *) inputs of any rank >= 2: what nn.SyncBatchNorm (which accepts any rank)
    converts to, since its rank is only known at run time."""

    _accepted_dims = None


def nll_loss(model: nn.Module) -> torch.Tensor:
    """Sum over the BatchlessNorm layers of `model` of nll_weight times the NLL of their latest
    forward; a zero tensor when there is none. ``loss = task_loss + nll_loss(model)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    total = None
    for module in model.modules():
        if isinstance(module, _BatchlessNorm) and module.nll is not None:
            term = module.nll_weight * module.nll
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        total = torch.zeros((), device=None if param is None else param.device)
    return total
