"""init_from_data: data-dependent initialization of every Batchless layer's mean and std (docs/method.md,
"Initialization").

Each layer gets mu = the per-channel mean of its input and sigma = sqrt(var + eps) (the per-channel
biased variance, over instances and positions; eps keeps constant channels finite), accumulated over
the batches in float64 (Chan's parallel merge of per-batch means and squared deviations: memory
stays one batch).

Order. A layer's input depends on the layers before it, so layers are done in dependency order:
- preserve_function=False: one pass over the data per layer, in execution order ("strata" of one
  layer). In a pass the target is the first not-yet-initialized layer that runs; the forward stops
  (an internal exception) as soon as another uninitialized layer is reached, so the target only sees
  inputs computed by initialized layers, and each pass costs a partial forward.
- preserve_function=True: weight and bias are adjusted so that every layer computes the same
  function as before; no layer's input changes, so one pass initializes every layer at once.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import bool_option, fits
from .modules import _BatchlessNorm
from .parametrization import param_from_std, rstd_and_log_std


class _StopForward(BaseException):
    """Raised by a hook to end a forward early. A BaseException so that a model's own
    ``except Exception`` cannot swallow it."""


class _ChannelStats:
    """Streaming mean and sum of squared deviations in float64 (Chan et al.) per Gaussian of a
    layer: per channel, or per group of its param_shape (the axes of size 1 are shared)."""

    def __init__(self, param_shape: tuple[int, ...]) -> None:
        self.param_shape = param_shape
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        full = self.param_shape + (1,) * (x.dim() - 1 - len(self.param_shape))  # (C,) -> (C, 1, ...)
        groups = math.prod(full)
        n = x.numel() // groups if groups and x.numel() else 0
        if n == 0:
            return
        dims = [0] + [1 + i for i, d in enumerate(full) if d == 1]
        xd = x.detach().to(torch.float64)
        mean = xd.mean(dims, keepdim=True)
        m2 = (xd - mean).square().sum(dims).reshape(self.param_shape)
        mean = mean.reshape(self.param_shape)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def mean_std(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, (self.m2 / self.count + eps).sqrt()


def _model_input(batch, index: int):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        f"data: batch {index} must be a tensor or a tuple/list whose first element is the input "
        f"tensor, got {type(batch).__name__}"
    )


def _batches(data, max_batches):
    """A re-iterable of model inputs (at most max_batches)."""
    if isinstance(data, torch.Tensor):
        return [data]
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(
            f"data must be a tensor or an iterable of batches, got {type(data).__name__}"
        ) from None
    if iterator is data:
        # A one-shot iterator (e.g. a generator) cannot be re-run per pass: keep its batches.
        return list(itertools.islice(iterator, max_batches))
    return data


def _set_layer(layer: _BatchlessNorm, mean: torch.Tensor, std: torch.Tensor, preserve_function: bool,
               name: str) -> None:
    """Writes mu, sigma into `layer`; with preserve_function, gamma' = gamma * r_old * sigma and
    beta' = beta + gamma * r_old * (mu - mu_old) keep y = (x - mu) / sigma * gamma' + beta' unchanged.
    Raises ValueError naming the layer, before writing anything, when the statistics cannot be its
    mean and std (non-finite input, a std not above eps for the 'abs' parametrization)."""
    bad = ~(torch.isfinite(mean) & torch.isfinite(std))
    if bool(bad.any()):
        raise ValueError(f"layer {name!r}: its input holds non-finite values (NaN or inf) in "
                         f"{int(bad.sum())} of its {bad.numel()} Gaussians (first at index "
                         f"{tuple(int(i) for i in bad.nonzero()[0])}): no mean and std to take")
    try:
        std_param = param_from_std(std, layer.parametrization, layer.eps)
    except ValueError as e:
        raise ValueError(f"layer {name!r}: {e} (its input's std is {float(std.min()):.3g} at least; "
                         "a smaller eps or parametrization='log' fits it)") from None
    new = {"mean": mean, "std_param": std_param}
    if preserve_function:
        r_old, _ = rstd_and_log_std(layer.std_param.detach().to(torch.float64), layer.parametrization, layer.eps)
        # 1 / sigma of std_param as stored (rounded to its dtype; in 16 bits log sigma = 5.7 is off by
        # up to 0.016, a 1.6% error in 1 / sigma), which the new weight makes up for.
        r_new, _ = rstd_and_log_std(std_param.to(layer.std_param.dtype).to(torch.float64), layer.parametrization,
                                    layer.eps)
        scale = layer.weight.detach().to(torch.float64) * r_old
        new["bias"] = layer.bias.detach().to(torch.float64) + scale * (mean - layer.mean.detach().to(torch.float64))
        new["weight"] = scale / r_new
    for what, value in new.items():  # float16 holds at most 65504
        param = getattr(layer, what)
        if not fits(value, param.dtype):
            raise ValueError(f"layer {name!r}: its new {what} (up to {float(value.abs().max()):.3g} in magnitude) "
                             f"overflows its dtype, {param.dtype}; keep the layer's parameters in float32")
    for what, value in new.items():
        getattr(layer, what).copy_(value)


def init_from_data(model: nn.Module, data, *, preserve_function: bool = False, max_batches: int | None = None,
                   train_mode: bool = False):
    """Sets mean and std of every BatchlessNorm layer of `model` to the per-channel mean and std of the
    input it sees on `data`, layer after layer in dependency order (module docstring); returns `model`.

    data: one batch (a tensor), or an iterable of batches, each a tensor or a tuple/list whose first
        element is the input (a DataLoader works). Inputs are moved to the model's device. A one-shot
        iterator is materialized (up to max_batches batches; an endless one needs max_batches); pass a
        re-iterable to keep memory at one batch. A single (input, target) pair is an iterable of two
        batches: pass it as [(input, target)]. An error of the model's forward on a batch gets a note
        (Python 3.11 and later) naming the batch and its shape.
    preserve_function: also adjust weight and bias so that the model's function is unchanged (needs
        layers with both, affine=True and bias=True); then one pass over the data suffices.
    max_batches: use at most this many batches per pass.
    train_mode: run the model in training mode (e.g. with dropout active); default eval mode. The
        modules' train/eval flags are restored afterwards, and so are the model's buffers (a
        BatchNorm's running statistics, which its training-mode passes update).

    Raises ValueError, naming the layer, with the model left as it was: empty data, a layer on the
    meta device, a layer no data reaches, a layer whose input holds NaN or inf, a std its
    parametrization cannot express (abs: not above eps), a new value that overflows its parameter's dtype (float16), a parameter it writes
    that is parametrized (torch.nn.utils.parametrize) or computed by a hook (the legacy
    torch.nn.utils.weight_norm). TypeError
    for data or options of the wrong type (a max_batches of 0 or less: ValueError).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)):
        raise TypeError(f"max_batches must be a positive int or None, got {type(max_batches).__name__}")
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    preserve_function = bool_option("preserve_function", preserve_function)
    train_mode = bool_option("train_mode", train_mode)
    names = {m: n or type(m).__name__ for n, m in model.named_modules() if isinstance(m, _BatchlessNorm)}
    if preserve_function:
        no_affine = [n for m, n in names.items() if m.weight is None or m.bias is None]
        if no_affine:
            raise ValueError("preserve_function=True needs layers with weight and bias (affine=True, bias=True) "
                             f"to absorb the change; without them: {no_affine}")
    written = ("mean", "std_param", "weight", "bias") if preserve_function else ("mean", "std_param")
    parametrized = [f"{n}.{p}" for m, n in names.items() for p in written if parametrize.is_parametrized(m, p)]
    if parametrized:  # the tensor a parametrization computes is recomputed at each access: a write is lost
        raise ValueError(f"init_from_data writes {', '.join(written)} but cannot write parametrized parameters "
                         f"(torch.nn.utils.parametrize): {parametrized}; register the parametrization after "
                         "init_from_data")
    # The legacy torch.nn.utils.weight_norm / spectral_norm: the name is a plain tensor a forward
    # pre-hook recomputes from other parameters, so a write is lost as well.
    computed = [f"{n}.{p}" for m, n in names.items() for p in written
                if p not in m._parameters and not parametrize.is_parametrized(m, p)]
    if computed:
        raise ValueError(f"init_from_data writes {', '.join(written)} but these are not parameters of their layers "
                         f"(computed from others, e.g. by the legacy torch.nn.utils.weight_norm or spectral_norm): "
                         f"{computed}; apply it after init_from_data")
    on_meta = [n for m, n in names.items() if m.mean.is_meta]
    if on_meta:  # torch's own error came from deep inside ("Tensor.item() cannot be called on meta tensors")
        raise ValueError(f"init_from_data: layers on the meta device hold no values to set: {on_meta}; "
                         "materialize the model first (model.to_empty(device=...))")
    batches = _batches(data, max_batches)
    if not names:
        return model
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = None if param is None else param.device

    remaining = list(names)  # in registration order; the execution order decides
    flags = {m: m.training for m in model.modules()}
    # An error in any pass leaves the model as it was: the layers of earlier strata are restored too.
    saved = [(p, p.detach().clone()) for m in names for p in (m.mean, m.std_param, m.weight, m.bias)
             if p is not None]
    # Buffers that training-mode passes update (BatchNorm's running statistics and counter, once per
    # pass: one per layer), restored whatever happens: the function sets only the Batchless layers.
    # Only those that changed: others may not be writable (expanded, made under inference_mode).
    buffers = [(b, b.clone()) for b in model.buffers()] if train_mode else []
    model.train(train_mode)
    try:
        with torch.no_grad():
            while remaining:
                done = _one_pass(model, batches, max_batches, device, remaining, preserve_function, names)
                remaining = [m for m in remaining if m not in done]
    except BaseException:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
        raise
    finally:
        with torch.no_grad():
            for b, value in buffers:
                if not torch.equal(b, value):
                    b.copy_(value)
        for m, flag in flags.items():
            m.training = flag
    return model


def _one_pass(model, batches, max_batches, device, remaining, preserve_function, names):
    """One pass over the data; initializes and returns the layers of this stratum."""
    stats: dict[nn.Module, _ChannelStats] = {}
    target: list[nn.Module] = []  # the stratum's layer (preserve_function=False)

    def pre_hook(layer, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return  # the layer's forward raises its own error
        layer._check_input_dim(x)  # its error, not _ChannelStats' reshape's
        if not preserve_function:
            if not target:
                target.append(layer)
            elif layer is not target[0]:
                raise _StopForward
        stats.setdefault(layer, _ChannelStats(tuple(layer.mean.shape))).add(x)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in remaining]
    seen = 0
    try:
        for i, batch in enumerate(itertools.islice(batches, max_batches)):
            x = _model_input(batch, i)
            if device is not None:
                x = x.to(device, non_blocking=True)
            seen += 1
            try:
                model(x)
            except _StopForward:
                pass
            except Exception as error:
                # The model's own error names no argument; a single (input, target) pair passed as
                # data, which iterates as two batches, sends the targets through the model.
                if hasattr(error, "add_note"):  # Python 3.11+
                    error.add_note(
                        f"init_from_data: raised by the model's forward of data's batch {i}, an input of "
                        f"shape {tuple(x.shape)} and dtype {x.dtype}. data is one batch (a tensor) or an "
                        "iterable of batches: pass a single (input, target) pair as [(input, target)].")
                raise
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("data is empty: no batch to take statistics from")
    ready = [m for m in remaining if m in stats and stats[m].count > 0]
    if not ready or (preserve_function and len(ready) < len(remaining)):
        missing = [names[m] for m in remaining if m not in ready]
        raise ValueError(f"BatchlessNorm layers {missing} never saw data (no element reached them)")
    for layer in ready:
        _set_layer(layer, *stats[layer].mean_std(layer.eps), preserve_function, names[layer])
    return set(ready)
