"""convert_batchnorm: migrate a trained BN (or Batch Renormalization) network to batchless normalization.

docs/method.md, "Migrating": mu = running_mean, sigma = sqrt(running_var + eps), gamma and beta copied. The
converted network then computes, in train and eval mode alike, the function the BN network computed
in eval mode, and training continues from there (add ``nll_loss(model)`` to the loss).
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, _BatchRenorm
from .inference import _OUTPUT_METHODS, _own_behaviour
from .modules import BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d, BatchlessNormNd, _BatchlessNorm
from .parametrization import param_from_std, rstd_and_log_std


# Checked in order: SyncBatchNorm derives from neither BatchNorm1d/2d/3d, Lazy* derive from them.
_TARGETS = (
    (nn.SyncBatchNorm, BatchlessNormNd),
    (nn.BatchNorm1d, BatchlessNorm1d),
    (nn.BatchNorm2d, BatchlessNorm2d),
    (nn.BatchNorm3d, BatchlessNorm3d),
    (BatchRenorm1d, BatchlessNorm1d),
    (BatchRenorm2d, BatchlessNorm2d),
    (BatchRenorm3d, BatchlessNorm3d),
)
# A BN subclass overriding _check_input_dim (called by BN's forward) accepts other input ranks.
_BN_METHODS = (*_OUTPUT_METHODS, "_check_input_dim")
# Keyword arguments of the Batchless layers that describe the new layer (the rest come from the BN).
_LAYER_KWARGS = ("parametrization", "nll_weight", "gauge", "backend", "eps")


def _match(module: nn.Module):
    """(the BN class of _TARGETS that `module` is an instance of, its Batchless class), or None."""
    return next(((source, target) for source, target in _TARGETS if isinstance(module, source)), None)


def _first_float_tensor(module: nn.Module) -> torch.Tensor | None:
    return next((t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()), None)


def _convert_layer(bn: nn.Module, target, layer_kwargs: dict, name: str, near: list[nn.Module],
                   notes: list[str]) -> _BatchlessNorm:
    """One BN/BRN layer -> the Batchless layer with the same eval-mode function. `near`: the layer's
    parents, innermost first, whose tensors give the device and dtype of a layer that holds none;
    `notes`: where to put what the user must be warned about."""
    if isinstance(bn, _BatchRenorm):
        # running_std is the moving average of sqrt(var_B + eps): it already includes eps
        stats = (bn.running_mean, bn.running_std)
    elif bn.running_mean is not None and bn.running_var is not None:
        stats = (bn.running_mean, (bn.running_var.to(torch.float64) + bn.eps).sqrt())
    else:
        stats = None
    like = bn.weight if bn.weight is not None else (stats[0] if stats is not None else None)
    if like is None:  # affine=False, track_running_stats=False: the model's tensors nearest to it
        like = next((t for t in map(_first_float_tensor, near) if t is not None), None)
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    kwargs = {"eps": bn.eps, **layer_kwargs}
    try:
        new = target(bn.num_features, affine=bn.affine, **kwargs, **factory)
    except ValueError as e:
        if "eps" in layer_kwargs or "eps" not in str(e):
            raise
        raise ValueError(f"{e} (the eps of the BN layer; convert_batchnorm(..., eps=1e-5) sets the new "
                         "layers' own: it enters only the std parametrization, sigma keeps the BN's)") from None
    with torch.no_grad():
        if stats is None:
            notes.append(
                f"module {name!r} ({type(bn).__name__}) has no running statistics "
                "(track_running_stats=False): its Batchless layer starts at mean 0, std 1; "
                "run batchless_kernels.init_from_data(model, data) to set them from data")
        elif new.mean.device.type != "meta":  # meta tensors have no values to copy
            mean, std = stats
            bad = (~torch.isfinite(mean)).nonzero().flatten().tolist()
            if bad:  # the std's own check is param_from_std's
                raise ValueError(f"running_mean is not finite at channels {bad[:8]}{' ...' if len(bad) > 8 else ''}")
            new.mean.copy_(mean)
            new.std_param.copy_(param_from_std(std.to(torch.float64), new.parametrization, new.eps))
        if bn.affine:
            weight = bn.weight
            if stats is not None and new.mean.device.type != "meta":
                # gamma * sigma' / sigma, sigma' the std that the stored (rounded) std_param gives: the
                # layer's gamma / sigma' is BN's gamma / sigma. In 16 bits a log sigma of 4.6 (sigma 100)
                # is off by up to 0.016, a 1.6% error in 1 / sigma: four times a bf16 rounding.
                r_stored, _ = rstd_and_log_std(new.std_param.to(torch.float64), new.parametrization, new.eps)
                weight = weight.to(torch.float64) * (r_stored * stats[1].to(torch.float64)).reciprocal()
            new.weight.copy_(weight)
            new.bias.copy_(bn.bias)
            new.weight.requires_grad_(bn.weight.requires_grad)
            new.bias.requires_grad_(bn.bias.requires_grad)
    new.train(bn.training)
    return new


def convert_batchnorm(module: nn.Module, **layer_kwargs) -> nn.Module:
    """Replaces every nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm and BatchRenorm1d/2d/3d of `module` by
    the Batchless layer that computes the BN layer's eval-mode function; returns `module`, changed
    in place (like nn.SyncBatchNorm.convert_sync_batchnorm), or the new layer when `module` is itself
    a BN layer.

    mean = running_mean, sigma = sqrt(running_var + eps) (BRN: running_std), weight and bias copied
    with their requires_grad (the weight times sigma' / sigma, sigma' the std the stored std_param
    gives: it makes up for std_param's rounding in 16 bits); device, dtype (of the nearest parent's
    tensors for a BN that holds none), eps and the training flag kept. BatchNorm*d maps to
    BatchlessNorm*d; SyncBatchNorm (any input rank) to BatchlessNormNd. A layer without running
    statistics (track_running_stats=False) starts at mean 0, std 1, with a warning. Every slot that
    holds a BN gets its layer: a BN registered several times (in one parent or several) becomes one
    shared Batchless layer.

    Not converted, left in place with a UserWarning naming each (qualified name and class): a BN
    whose class (or the instance) overrides the forward of the class it matched above (e.g. a BN
    followed by an activation in its forward, like timm's BatchNormAct2d; a subclass that only adds
    attributes or methods is converted) or its _check_input_dim, a _BatchNorm subclass of none of
    those classes, a BN with parametrized parameters, and a BN with hooks (forward, backward, or their
    pre-hooks), which a replacement would drop or show another module: remove them, convert, and
    register them on the new layer if they still apply.

    layer_kwargs: options of the new layers: parametrization, nll_weight, gauge, backend, and eps
    (default: each BN's own eps; it enters only the std parametrization, sigma keeps BN's eps).

    Raises:
        ValueError: naming the layer, with `module` left unchanged (every layer is converted before
            any is replaced), when a layer's statistics cannot be expressed (e.g. a dead channel's
            sigma = sqrt(eps) not above the new eps for parametrization="abs"; a BN's eps the layers
            refuse, such as 0, names eps= as the way out), for non-finite running statistics, or for
            a lazy BN layer that has not seen an input yet; an option of layer_kwargs out of range.
        TypeError: `module` not an nn.Module; a layer_kwargs name other than those above, or a value
            of the wrong type.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    unknown = sorted(set(layer_kwargs) - set(_LAYER_KWARGS))
    if unknown:
        raise TypeError(f"convert_batchnorm got unexpected layer_kwargs {unknown}; accepted: {_LAYER_KWARGS}")
    BatchlessNorm1d(1, **layer_kwargs)  # validates the values now, even for a model without BN
    memo: dict[int, nn.Module] = {}  # a BN in several slots (of one parent or several): one layer
    # The replacements are made once every layer has converted: an error leaves `module` as it was.
    swaps: list[tuple[nn.Module, str, nn.Module]] = []

    def convert(m: nn.Module, name: str) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        if isinstance(m, nn.modules.batchnorm._LazyNormBase):  # becomes BatchNorm*d at its first forward
            raise ValueError(f"module {name or type(m).__name__!r} is a lazy BN layer that has not seen "
                             "an input yet: run a forward first")
        match = _match(m)
        why = _own_behaviour(m, match[0], _BN_METHODS) if match else None
        if match and not why and parametrize.is_parametrized(m):  # copied as plain tensors: the constraint lost
            why = "its parameters are parametrized (torch.nn.utils.parametrize)"
        elif not match and isinstance(m, nn.modules.batchnorm._BatchNorm):
            why = "it subclasses _BatchNorm but none of BatchNorm1d/2d/3d, SyncBatchNorm: its accepted input ranks are its own"
        if match and not why:
            try:
                memo[id(m)] = _convert_layer(m, match[1], layer_kwargs, name or type(m).__name__, parents[::-1],
                                             notes)
            except ValueError as e:  # e.g. a std at or below eps for the 'abs' parametrization
                raise ValueError(f"module {name or type(m).__name__!r} ({type(m).__name__}): {e}; "
                                 "no layer was converted") from None
            return memo[id(m)]
        if why:
            notes.append(f"module {name or type(m).__name__!r} ({type(m).__name__}) is not converted: "
                         f"{why}, which a Batchless layer would not keep")
        memo[id(m)] = m
        parents.append(m)
        # _modules, not named_children(): that skips a module's second slot in the same parent
        for child_name, child in list(m._modules.items()):
            new = child if child is None else convert(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                swaps.append((m, child_name, new))
        parents.pop()
        return m

    parents: list[nn.Module] = []
    notes: list[str] = []  # warned at the caller's line once all is converted (not from the recursion)
    converted = convert(module, "")
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return converted
