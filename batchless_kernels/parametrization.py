"""The three sigma parametrizations of PAPER.md (BLN, BLNlog, BLNinv).

The raw parameter ``p`` (``std_param``) is what the optimizer updates. Each parametrization
defines r = 1/sigma (used to normalize) and log sigma (used in the NLL) as functions of p:

    name   paper    r = 1/sigma            log sigma
    abs    BLN      1 / (abs(p) + eps)     log(abs(p) + eps)
    log    BLNlog   exp(-p)                p
    inv    BLNinv   p (signed, as is)      -log(abs(p) + eps)
"""

from __future__ import annotations

import math

import torch

PARAMETRIZATIONS = ("abs", "log", "inv")


def check_parametrization(parametrization: str) -> str:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}"
        )
    return parametrization


def check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite float, got {eps}")
    return float(eps)


def rstd_and_log_std(p: torch.Tensor, parametrization: str, eps: float):
    """Returns (r, log_sigma) per channel; differentiable in p through ordinary torch ops."""
    if parametrization == "abs":
        sigma = p.abs() + eps
        return sigma.reciprocal(), sigma.log()
    if parametrization == "log":
        return torch.exp(-p), p
    if parametrization == "inv":
        return p, -(p.abs() + eps).log()
    check_parametrization(parametrization)
    raise AssertionError("unreachable")


def std_from_param(p: torch.Tensor, parametrization: str, eps: float) -> torch.Tensor:
    """sigma as a tensor (for inspection; sigma = 1/r, so inv with p = 0 gives inf)."""
    if parametrization == "abs":
        return p.abs() + eps
    if parametrization == "log":
        return torch.exp(p)
    if parametrization == "inv":
        return p.reciprocal()
    check_parametrization(parametrization)
    raise AssertionError("unreachable")


def param_from_std(std, parametrization: str, eps: float) -> torch.Tensor:
    """Inverse of std_from_param: the raw parameter that gives the standard deviation ``std``.

    ``std`` is a float or tensor of positive values; for ``abs`` it must exceed ``eps``.
    """
    std = torch.as_tensor(std)
    if not bool((std > 0).all()):
        raise ValueError("std must be positive to be expressed as a std_param")
    if parametrization == "abs":
        if not bool((std > eps).all()):
            raise ValueError(f"std must exceed eps={eps} for the 'abs' parametrization")
        return std - eps
    if parametrization == "log":
        return std.log()
    if parametrization == "inv":
        return std.reciprocal()
    check_parametrization(parametrization)
    raise AssertionError("unreachable")
