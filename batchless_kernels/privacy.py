"""Differentially private training (DP-SGD) with Batchless layers, through Opacus.

DP-SGD clips and noises each sample's gradient, so it needs per-sample gradients. BatchNorm mixes the
samples of a batch and has none (Opacus rejects it); Batchless layers never mix samples: the NLL is a
mean of per-sample terms. Importing this module registers an Opacus grad sampler for every Batchless
layer class:

    import batchless_kernels.privacy  # noqa: F401  (needs `pip install opacus`)
    model, optimizer, loader = PrivacyEngine().make_private(module=model, ...)
    loss = task_loss + bk.nll_loss(model)

Opacus' own hooks see a layer's input and the gradient of the loss with respect to its output only,
not the NLL, which reaches mean and std_param through a separate term of the loss: its functorch
fallback gives them zero per-sample gradients, so the DP optimizer would move them by noise alone
(and ghost clipping would train them on the data unclipped). The grad sampler here gives each sample i the gradient of its own share of the
loss, sum(y_i * dLoss/dy_i) + nll_weight * nll_i (nll_i: the layer's NLL over sample i's elements,
whose mean over the batch is the layer's NLL), for mean, std_param, weight and bias alike. That is the
per-sample gradient of ``task_loss + bk.nll_loss(model)`` with a mean-reduced task loss, as Opacus'
default loss_reduction="mean" assumes; with loss_reduction="sum" (a summed task loss) each sample gets
1/N of its own NLL's, so that the samples' gradients still add up to the loss's. A loss that scales the
NLL term differently needs nll_weight set to match (a loss without the layer's term from nll_loss,
e.g. a latest forward under no_grad before nll_loss, gives no NLL in its samples' gradients either;
a term nll_loss returned counts as in the loss: log ``layer.nll.detach()`` rather than nll_loss's
value, or the samples' gradients include an NLL the loss lacks). The layer's output must need a
gradient, or Opacus calls no grad sampler for it (an affine=False layer on an input that needs none,
e.g. a model's first layer): nll_loss refuses that, with the way out. A layer called more than once per forward is refused (ValueError): its ``nll`` holds
the last call's term only. So are Opacus' grad_sample_mode="ghost" (fast gradient clipping reweights
each sample's loss, but the NLL enters the loss once for the batch) and "functorch" (which never
calls the sampler; nll_loss refuses it), and "ew" (torch's Expanded Weights, which hold a per-sample
rule per op, none for the NLL term; the layer's forward refuses them). Subclasses of the layers get the sampler too.
"""

from __future__ import annotations

import sys

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from torch.func import grad, vmap

from . import modules, reference

__all__ = ["per_sample_grads"]
from .modules import (BatchlessNorm, BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d, BatchlessNormNd, _BatchlessNorm,
                      as_nll_weight, check_nll_weight)

_PARAMS = ("mean", "std_param", "weight", "bias")


def per_sample_grads(layer: _BatchlessNorm, x: torch.Tensor, grad_y: torch.Tensor,
                     nll_weight: float | None = None) -> dict:
    """{parameter: (N, *param_shape) per-sample gradients} of sum(y_i * grad_y_i) + nll_weight * nll_i
    for the parameters that require grad, x and grad_y being (N, ...) input and output gradient,
    nll_weight (a finite float >= 0 or a one-element floating tensor) the layer's unless given;
    computed with torch.func over the reference (docs/method.md), in the parameters' dtype.
    TypeError / ValueError for arguments of the wrong type or value."""
    if not isinstance(layer, _BatchlessNorm):
        raise TypeError(f"layer must be a Batchless layer, got {type(layer).__name__}")
    if not (isinstance(x, torch.Tensor) and isinstance(grad_y, torch.Tensor)):
        raise TypeError(f"x and grad_y must be tensors, got {type(x).__name__} and {type(grad_y).__name__}")
    layer._check_input_dim(x)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    if nll_weight is None:
        nll_weight = check_nll_weight(f"{type(layer).__name__}.nll_weight", layer.nll_weight)
    else:
        nll_weight = check_nll_weight("nll_weight", nll_weight)
    return _sample_grads(layer, x, grad_y, nll_weight)


def _sample_grads(layer: _BatchlessNorm, x: torch.Tensor, grad_y: torch.Tensor, nll_weight) -> dict:
    """per_sample_grads past its checks; nll_weight a float or the layer's one-element tensor."""
    present = {n: getattr(layer, n) for n in _PARAMS if getattr(layer, n) is not None}
    wanted = {n: p.detach() for n, p in present.items() if p.requires_grad}
    fixed = {n: p.detach() for n, p in present.items() if not p.requires_grad}
    if x.shape[0] == 0:  # an empty (Poisson-sampled) batch: no sample, no gradient
        return {present[n]: p.new_zeros((0, *p.shape)) for n, p in wanted.items()}

    def sample_loss(params, xi, gi):
        args = {**fixed, **params}
        y, nll = reference.batchless_norm(
            xi.unsqueeze(0), args["mean"], args["std_param"], args.get("weight"), args.get("bias"),
            parametrization=layer.parametrization, eps=layer.eps, gauge=layer.gauge, need_nll=True)
        return (y * gi.unsqueeze(0)).sum() + as_nll_weight(nll_weight, nll.dtype) * nll

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(wanted, x.detach(), grad_y.detach())
    return {present[n]: g.to(present[n].dtype) for n, g in grads.items()}


def _batchless_grad_sampler(layer: _BatchlessNorm, activations, backprops: torch.Tensor) -> dict:
    caller = sys._getframe(1).f_locals.get("self")
    if isinstance(caller, GradSampleModuleFastGradientClipping):
        raise ValueError(
            "batchless_kernels.privacy supports Opacus' grad_sample_mode='hooks' only: fast gradient (ghost) "
            "clipping reweights each sample's loss by its clipping factor, but the NLL term enters the loss "
            "once for the whole batch, so its per-sample gradients would escape clipping")
    if getattr(layer, "activations", None):  # Opacus pops one call's input per backward: more remain
        raise ValueError(
            f"{type(layer).__name__} was called more than once in one forward: its nll (which nll_loss adds) "
            "holds the last call's NLL only, so per-sample gradients would not match the loss. Use one layer "
            "per call under Opacus.")
    # The NLL is in the loss if nll_loss took the term of the training forward whose input Opacus
    # captured: not if the loss has no nll_loss, nor if the latest forward ran under no_grad before
    # nll_loss (it then adds none); still if a forward under no_grad ran after it (a metric).
    summed = layer.__dict__.get("_summed_stamp")
    nll_weight = layer.nll_weight if summed is not None and summed == layer.__dict__.get("_training_stamp") else 0.0
    x = activations[0]
    # loss_reduction="sum": Opacus hands over the unscaled backprops, and the loss's NLL term (nll_loss:
    # the batch's mean of the samples' NLLs) gives each sample 1/N of its own ("mean": backprops times N).
    if getattr(caller, "loss_reduction", "mean") == "sum" and x.shape[0] > 0:
        nll_weight = nll_weight / x.shape[0]
    # (the layer's nll_weight, checked by nll_loss, which summed its term: a float or a one-element tensor)
    return _sample_grads(layer, x, backprops, nll_weight)


def _register(cls: type) -> None:
    """Opacus looks grad samplers up by exact class: every Batchless class, and each subclass (through
    _BatchlessNorm's subclass hook; one defined before this import too)."""
    register_grad_sampler(cls)(_batchless_grad_sampler)
    for sub in cls.__subclasses__():
        _register(sub)


for _cls in (BatchlessNorm, BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d, BatchlessNormNd):
    _register(_cls)
_BatchlessNorm._subclass_hooks.append(_register)
modules.STAMPING = True  # forwards stamp their NLL terms for _batchless_grad_sampler from now on
