"""Argument validation shared by every entry point: clear Python exceptions, never asserts."""

from __future__ import annotations

import numbers
import sys

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:  # a private module of torch (2.11 to 2.14 have it), so looked up defensively
    from torch.nn.utils._expanded_weights import ExpandedWeight as _ExpandedWeight
except ImportError:  # pragma: no cover
    _ExpandedWeight = ()


def _unwrap_0d(value, convert=None):
    """A 0-dim numpy array as its Python scalar: under torch.compile Dynamo hands numpy scalars over as
    such arrays (np.float64(1e-5) failed the number check there, and the error's repr broke the graph).
    There `convert` (float), if given, takes the value, a constant for float64, where .item() is data
    (a numpy bool then passes as 0 or 1: Dynamo cannot trace its dtype). Numpy float32, integers and
    bools stay data there, which the checks cannot read (Dynamo's data-dependent guard error):
    docs/api.md asks for Python values."""
    if not (isinstance(value, np.ndarray) and value.ndim == 0):
        return value
    return convert(value) if convert is not None and torch.compiler.is_compiling() else value.item()


def real_option(name: str, value, expected: str, ok=lambda v: True) -> float:
    """A float option of a layer: TypeError unless a real number (a bool is not; numpy scalars are),
    ValueError unless finite and ok(value). `expected` completes "{name} must be ..."."""
    value = _unwrap_0d(value, float)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if isinstance(value, numbers.Integral) and abs(int(value)) > sys.float_info.max:  # float() would overflow
        raise ValueError(f"{name} must be {expected}, got an int of {int(value).bit_length()} bits")
    # Compared as a Python float: numpy's float32 compared with float_info.max casts that to inf
    # (np.float32('inf') passed, with overflow warnings for every value).
    try:
        as_float = float(value)
    except OverflowError:  # e.g. a Fraction beyond float's range
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if not (-sys.float_info.max <= as_float <= sys.float_info.max and ok(as_float)):  # NaN fails too
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return as_float


def nll_weight_option(name: str, value, expected: str = "a finite float >= 0") -> float:
    """The NLL term's multiplier (a layer's nll_weight, per_sample_grads' argument): a finite float >= 0."""
    return real_option(name, value, expected, lambda v: v >= 0)


def int_option(name: str, value, expected: str, ok) -> int:
    """An int option of a layer (numpy integers too): TypeError unless an integer, ValueError unless ok(value)."""
    value = _unwrap_0d(value)  # (not int(): under compile it would truncate a numpy float)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def device_option(name: str, value) -> torch.device:
    """A device argument as torch.device takes it (str, torch.device, or an int: the accelerator's
    index): TypeError for any other type, ValueError naming `name` for a string torch cannot read."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise TypeError(f"{name} must be a str, torch.device or int, got {type(value).__name__}")
    try:
        return torch.device(value if isinstance(value, str) else int(value))
    except RuntimeError as error:  # torch's "Expected one of cpu, cuda, ..." or "Invalid device string"
        raise ValueError(f"{name} must name a device, got {value!r}: {error}") from None


def factory_kwargs(device, dtype) -> dict:
    """A layer's device and dtype arguments (nn.BatchNorm's factory kwargs) checked, as the
    {"device", "dtype"} its parameters are made with: device as device_option reads it (None: the
    default), dtype a floating point torch.dtype or None. TypeError or ValueError naming the argument,
    where torch's own error for a device string names none."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating point torch.dtype or None, got {dtype!r}")
    return {"device": None if device is None else device_option("device", device), "dtype": dtype}


def bool_option(name: str, value, expected: str = "a bool") -> bool:
    """A bool option: a bool or a numpy bool (numpy's bool is not a subclass of bool); TypeError else."""
    value = _unwrap_0d(value)
    kind = type(value)
    if kind is bool or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")):
        return bool(value)
    got = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    shown = repr(value)
    if len(shown) <= 40:  # e.g. a parametrization passed positionally: "got str 'abs'"
        got += f" {shown}"
    raise TypeError(f"{name} must be {expected}, got {got}")


def refuse_jit_script(module) -> None:
    """A layer's __prepare_scriptable__, which torch.jit.script calls on every submodule first: one
    clear error where TorchScript's compiler failed on the layer's Python (type hints, imports)."""
    raise RuntimeError(
        f"{type(module).__name__} cannot be compiled by torch.jit.script (deprecated by PyTorch): train with "
        "eager or torch.compile; to deploy, script the model batchless_kernels.fuse_for_inference returns, "
        "or use torch.export / torch.onnx.export (docs/api.md)")


# The smallest normal and the largest number of each accumulation dtype.
_NORMAL = {t: (torch.finfo(t).tiny, torch.finfo(t).max) for t in (torch.float32, torch.float64)}


def check_eps_normal(eps: float, x_dtype: torch.dtype, what: str | None = None) -> None:
    """A batchless normalization's eps must be a normal number of the dtype it computes in (float32
    for 16- and 32-bit inputs, float64 for float64): sigma = |p| + eps ("abs") and 1/sigma must stay
    finite there (1/eps overflows below the smallest: a constant channel gave +-inf; above the
    largest, eps is inf there)."""
    acc = accumulation_dtype(x_dtype)
    what = f"the dtype batchless normalization of a {what or f'{x_dtype} input'} computes in"
    _check_eps_below_largest(eps, acc, what)
    if eps < _NORMAL[acc][0]:
        raise ValueError(f"eps={eps!r} is below the smallest normal {acc} number ({_NORMAL[acc][0]:.4g}), {what}: "
                         "it would not keep 1/sigma finite")


def _check_eps_below_largest(eps: float, acc: torch.dtype, what: str) -> None:
    """The upper bound both eps rules share: an eps above `acc`'s largest number is inf there."""
    if eps > _NORMAL[acc][1]:
        raise ValueError(f"eps={eps!r} is above the largest {acc} number ({_NORMAL[acc][1]:.4g}), {what}: "
                         "sigma would be inf there")


def check_eps_fits(eps: float, dtype: torch.dtype | None) -> None:
    """eps must neither round to 0 nor overflow where a layer of parameters of `dtype` computes (its
    accumulation dtype): it keeps sigma away from 0 there, and an infinite one made every output NaN."""
    acc = accumulation_dtype(dtype if dtype is not None else torch.get_default_dtype())
    if float(torch.tensor(eps, dtype=acc, device="cpu")) == 0.0:  # not the default device: meta has no values
        raise ValueError(f"eps={eps!r} rounds to 0 in {acc}, the dtype the layer computes in: it would not keep "
                         "sigma away from 0")
    _check_eps_below_largest(eps, acc, "the dtype the layer computes in")


def fits(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every element of `value` stays finite in `dtype` (float16 holds at most 65504); a meta
    tensor, which holds no values, does."""
    return value.is_meta or bool(torch.isfinite(value.to(dtype)).all())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_layer_input(x, accepted_dims: tuple[int, ...] | None, num_features: int | None = None,
                      layer: str = "the layer") -> None:
    """What a normalization layer checks of its input, as nn.BatchNorm*d does: a tensor of an
    accepted rank (None: any rank >= 2) and, when given, num_features channels in dim 1 (the error
    names the layer's num_features, not its parameters' shapes)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:  # nn.BatchNorm refuses them too; the math would truncate
        raise TypeError(f"input must have a floating dtype, got {x.dtype}")
    if accepted_dims is None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
    elif x.dim() not in accepted_dims:
        expected = " or ".join(f"{d}D" for d in accepted_dims)
        raise ValueError(f"expected {expected} input (got {x.dim()}D input)")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"{layer} has num_features={num_features}: expected an input with {num_features} channels in "
            f"dim 1, got {x.shape[1]} channels (input shape {tuple(x.shape)})"
        )


def refuse_expanded_weights(mean, std_param, weight, bias) -> None:
    """ValueError for a parameter wrapped as an Expanded Weight by torch's call_for_per_sample_grads
    (which Opacus' grad_sample_mode="ew" uses): it gives each op its own per-sample gradient rule, and
    the NLL term, which trains mean and std_param, has none; without this check its __torch_function__
    fails on the first attribute read ("Expanded Weights encountered but cannot handle function dim")."""
    for name, t in (("mean", mean), ("std_param", std_param), ("weight", weight), ("bias", bias)):
        if isinstance(t, _ExpandedWeight):
            raise ValueError(
                f"batchless_norm: {name} is an Expanded Weight (torch.nn.utils._per_sample_grad."
                "call_for_per_sample_grads, which Opacus' grad_sample_mode='ew' uses), which cannot carry the "
                "NLL term's per-sample gradients: use Opacus' grad_sample_mode='hooks' with "
                "batchless_kernels.privacy imported, or torch.func (docs/api.md, \"Differentially private training\")")


def per_channel_inputs(x, mean, std_param, weight, bias) -> bool:
    """True when the tensors are what check_inputs accepts with one Gaussian per channel: x a
    floating (N, C, *) tensor, mean and std_param (and weight, bias unless None) floating (C,) tensors
    on x's device. The common case, checked with fewer Python operations than check_inputs (this
    runs on every call); False says nothing: check_inputs then raises or returns the shared shape."""
    if not isinstance(x, torch.Tensor) or x.layout != torch.strided or x.is_nested or x.dtype not in FLOAT_DTYPES \
            or x.dim() < 2:
        return False
    # mean's torch.Size, compared with the others': x.shape[1:2] takes 0.5 us on the development VM,
    # a comparison of two torch.Size 0.2 us.
    if not isinstance(mean, torch.Tensor) or mean.dim() != 1 or mean.shape[0] != x.shape[1]:
        return False
    size, device = mean.shape, x.device
    for t in (mean, std_param, weight, bias):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != size or t.dtype not in FLOAT_DTYPES or t.device != device \
                or t.layout != torch.strided:
            return False
    return std_param is not None


def check_inputs(x, mean, std_param, weight, bias) -> tuple[int, ...]:
    """Validates the tensors of batchless_norm; raises TypeError/ValueError naming the argument.

    Returns the parameters' shape over x.shape[1:] (x.dim() - 1 dims): the per-channel (C,) as
    (C, 1, ..., 1); a size-1 dim is an axis the Gaussian shares (docs/method.md, "Shared axes")."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor, got {'a nested tensor' if x.is_nested else x.layout}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"x must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}"
        )
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    channels, rest = x.shape[1], tuple(x.shape[1:])

    def expected() -> str:  # formatted only for an error: this check runs on every call
        return (f"({channels},) or a shape of {len(rest)} dims that broadcasts to x.shape[1:] = {rest} "
                "(1 where the Gaussian is shared)")

    shape = None
    for name, t in (("mean", mean), ("std_param", std_param), ("weight", weight), ("bias", bias)):
        if t is None:
            if name in ("mean", "std_param"):
                raise TypeError(f"{name} must be a tensor of shape {expected()}, got None")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.is_nested or t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got "
                            f"{'a nested tensor' if t.is_nested else t.layout}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if tuple(t.shape) == (channels,):
            t_shape = (channels,) + (1,) * (len(rest) - 1)
        elif t.dim() == len(rest) and all(d == 1 or d == full for d, full in zip(t.shape, rest)):
            t_shape = tuple(t.shape)
        else:
            raise ValueError(f"{name} must have shape {expected()}, got shape {tuple(t.shape)}")
        if shape is not None and t_shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, unlike mean's {shape}: mean, std_param, weight "
                             "and bias share one shape")
        shape = t_shape
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must share a device")
    return shape
