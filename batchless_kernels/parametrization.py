"""The three sigma parametrizations of docs/method.md (BLN, BLNlog, BLNinv).

The raw parameter ``p`` (``std_param``) is what the optimizer updates. Each parametrization
defines r = 1/sigma (used to normalize) and log sigma (used in the NLL) as functions of p:

    name   paper    r = 1/sigma            log sigma
    abs    BLN      1 / (abs(p) + eps)     log(abs(p) + eps)
    log    BLNlog   exp(-p)                p
    inv    BLNinv   p (signed, as is)      -log(abs(p) + eps)

With ``inv`` a negative p flips the sign of the normalized output (r = p, as the method defines
it); sigma, the Gaussian's standard deviation, is then 1/abs(p) (``std_from_param``).

Gradients in p are formed from d log r / dp and d log sigma / dp, never from dr/dp: for ``abs``,
dr/dp = -r^2 overflows float32 once sigma < ~1e-19, although the NLL's gradient, of order r,
is representable (``rstd_ratio`` and ``normalize`` below keep autograd on that path too).
"""

from __future__ import annotations

import math

import torch

from ._checks import real_option

PARAMETRIZATIONS = ("abs", "log", "inv")


def check_parametrization(parametrization: str) -> str:
    """`parametrization` if it is one of PARAMETRIZATIONS; TypeError for a non-str, ValueError else."""
    if not isinstance(parametrization, str):
        raise TypeError(f"parametrization must be a str, one of {PARAMETRIZATIONS}, got {type(parametrization).__name__}")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}"
        )
    return parametrization


def check_eps(eps: float) -> float:
    """eps as a float: TypeError unless a real number (numpy's too; not a bool), ValueError unless
    positive and finite."""
    return real_option("eps", eps, "a positive finite float", lambda v: v > 0)


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


def rstd_ratio(p: torch.Tensor, p0: torch.Tensor, parametrization: str, eps: float) -> torch.Tensor:
    """r(p) / r(p0), differentiable in p (p0 is a constant): 1 in value at p = p0, and its autograd
    never forms dr/dp = -r^2 (abs), which overflows where the gradient itself does not. p0 = 0 with
    inv (r0 = 0) gives 0: the sums that the ratio scales are then 0."""
    if parametrization == "abs":
        return (p0.abs() + eps) / (p.abs() + eps)
    if parametrization == "log":
        return torch.exp(p0 - p)
    if parametrization == "inv":
        return torch.where(p0 != 0, p / torch.where(p0 != 0, p0, torch.ones_like(p0)), torch.zeros_like(p))
    check_parametrization(parametrization)
    raise AssertionError("unreachable")


def normalize(centered: torch.Tensor, p: torch.Tensor, parametrization: str, eps: float) -> torch.Tensor:
    """centered * r(p) with p broadcast against centered, differentiable in both; divides by sigma
    for abs, so that autograd does not form dr/dp = -r^2 (see the module docstring)."""
    if parametrization == "abs":
        return centered / (p.abs() + eps)
    if parametrization == "log":
        return centered * torch.exp(-p)
    if parametrization == "inv":
        return centered * p
    check_parametrization(parametrization)
    raise AssertionError("unreachable")


def std_from_param(p: torch.Tensor, parametrization: str, eps: float) -> torch.Tensor:
    """sigma as a tensor, for inspection: 1/abs(r), so inv with p = 0 gives inf and a negative p
    (which flips the output's sign) still gives a positive sigma."""
    if parametrization == "abs":
        return p.abs() + eps
    if parametrization == "log":
        return torch.exp(p)
    if parametrization == "inv":
        return p.abs().reciprocal()
    check_parametrization(parametrization)
    raise AssertionError("unreachable")


def param_from_std(std, parametrization: str, eps: float) -> torch.Tensor:
    """Inverse of std_from_param: the raw parameter that gives the standard deviation ``std``
    (the positive one for inv).

    ``std`` is a float (computed in float64) or a tensor of positive values (computed in its dtype);
    for ``abs`` it must exceed ``eps``.
    """
    # A float on the CPU, whatever the default device (a layer built under `with torch.device("meta")`)
    std = std if isinstance(std, torch.Tensor) else torch.tensor(std, dtype=torch.float64, device="cpu")
    if not bool(((std > 0) & (std < math.inf)).all()):
        raise ValueError("std must be positive and finite to be expressed as a std_param")
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
