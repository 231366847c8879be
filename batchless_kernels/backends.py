"""Which backend runs a call: names, availability, and how ``auto`` chooses.

``auto`` takes the first available backend in the order of AUTO_ORDER for the tensor's device
(fastest first). On a GPU where both cuda and triton run, the measured table of gpu_choice.py
picks between them per layout, dtype and size, where it has data. The environment variable
BATCHLESS_BACKEND overrides ``auto``.
"""

from __future__ import annotations

import os

import torch

from . import gpu_choice, ops
from ._checks import device_option
from . import triton as triton_backend

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
ENV_VAR = "BATCHLESS_BACKEND"
# The triton backend runs CPU tensors only under Triton's interpreter, for tests: never auto there.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None when `backend` can run tensors of `device_type`, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors only, got a {device_type} tensor"
        if not ops.extension_loaded():
            return ops.EXTENSION_ERROR
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got a {device_type} tensor"
        if not ops.extension_loaded():
            return ops.EXTENSION_ERROR
        if not ops.has_kernel(ops.FORWARD_OP, "CUDA"):
            return "batchless_kernels._C was built without CUDA kernels"
        return None
    if backend == "triton":
        return triton_backend.unavailable_reason(device_type)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _device_types(device) -> list[str]:
    if device is not None:
        return [device_option("device", device).type]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def available_backends(device=None) -> list[str]:
    """Backends that can run here: for `device` (str, torch.device) or, when None, for any device
    of this machine. Ordered as ``auto`` prefers them, then those it never picks there (triton on
    CPU tensors under the interpreter). Raises TypeError when `device` is not a str, torch.device,
    int or None, ValueError when it names no device."""
    names: list[str] = []
    for device_type in _device_types(device):
        preferred = AUTO_ORDER.get(device_type, ("reference",))
        for name in preferred + tuple(b for b in BACKENDS[1:] if b not in preferred):
            if name not in names and _reason(name, device_type) is None:
                names.append(name)
    return names


# unavailable_reason for every backend on CPU and CUDA, looked up once at import: availability is
# fixed once the package is imported (the extension and triton load or not), and torch.compile
# cannot trace the lookups themselves (importlib, dispatcher queries; torch 2.11 breaks the graph
# on them even under functools.lru_cache, whose cache Dynamo ignores).
_REASONS = {(b, d): unavailable_reason(b, d) for b in BACKENDS[1:] for d in ("cpu", "cuda")}


def _reason(backend: str, device_type: str) -> str | None:
    key = (backend, device_type)
    return _REASONS[key] if key in _REASONS else unavailable_reason(backend, device_type)


def _usable_in_auto_order(device_type: str) -> tuple[str, ...]:
    return tuple(n for n in AUTO_ORDER.get(device_type, ()) if _reason(n, device_type) is None)


# Looked up once for CPU and CUDA (availability is fixed at import, as _REASONS says).
_AUTO_CANDIDATES = {d: _usable_in_auto_order(d) for d in ("cpu", "cuda")}
# Devices where auto consults the measured GPU table: both GPU backends run there.
_MEASURED_CHOICE = {d: all(n in usable for n in gpu_choice.GPU_BACKENDS) for d, usable in _AUTO_CANDIDATES.items()}


def fixed_auto_choice(device_type: str) -> str | None:
    """The backend ``auto`` picks for every tensor of device_type (BATCHLESS_BACKEND unset), or None
    where the pick depends on the tensor (the measured GPU table)."""
    usable = _auto_candidates(device_type)
    if not usable:
        return "reference"
    return None if _MEASURED_CHOICE.get(device_type, True) else usable[0]


def _auto_candidates(device_type: str) -> tuple[str, ...]:
    """AUTO_ORDER's backends that can run on device_type."""
    if device_type in _AUTO_CANDIDATES:
        return _AUTO_CANDIDATES[device_type]
    return _usable_in_auto_order(device_type)


# os.environ's own mapping, where CPython has one: os.environ.get of an unset variable raises and
# catches a KeyError inside, 0.7 us per call on the development VM against 0.06 us for this lookup.
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON is not None and hasattr(os.environ, "encodekey") else None


def _env_backend() -> str:
    """BATCHLESS_BACKEND, "auto" when unset or empty (``BATCHLESS_BACKEND= python train.py``, as shells
    treat it); read on every call, so that setting it at run time (os.environ, as tests do) takes effect.
    (The C++ fast path reads os.environ alike.)"""
    if _ENV_KEY is not None and _ENV_KEY not in _ENVIRON:
        return "auto"
    return os.environ.get(ENV_VAR) or "auto"


def device_type_of(x: torch.Tensor) -> str:
    """x.device.type, the cheap way for CPU and CUDA tensors: torch.device.type builds a new str on
    every call (0.7 us on the development VM), each of these flags costs 0.15 us."""
    if x.is_cpu:
        return "cpu"
    if x.is_cuda:
        return "cuda"
    return x.device.type


def resolve_backend(backend: str, device: torch.device, x: torch.Tensor | None = None) -> str:
    """The concrete backend for a call on `device` (with input `x`, when given, for the measured
    GPU choice); raises RuntimeError saying why when the requested one cannot run there."""
    return resolve_backend_for(backend, device_option("device", device).type, x)


def resolve_backend_for(backend: str, device_type: str, x: torch.Tensor | None = None) -> str:
    """resolve_backend for a device type (device_type_of(x) where x is at hand)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    source = "backend"
    if backend == "auto":
        backend = _env_backend()
        if backend != "auto":
            source = f"the environment variable {ENV_VAR}"
            if backend not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        usable = _auto_candidates(device_type)
        measured_choice = _MEASURED_CHOICE.get(device_type)
        if measured_choice is None:
            measured_choice = all(n in usable for n in gpu_choice.GPU_BACKENDS)
        if x is not None and measured_choice:
            measured = gpu_choice.preferred(x)
            if measured is not None:
                return measured
        return usable[0] if usable else "reference"
    reason = _reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"{source} asks for {backend!r}, which cannot run here: {reason}")
    return backend


# The ops of each family of compiled kernels (csrc/ops.cpp), by role: (cpu and cuda's, triton's).
_FAMILY_OPS = {
    "forward": ("batchless_norm_forward", "triton_forward"),
    "backward": ("batchless_norm_backward", "triton_backward"),
    "train": ("batchless_norm_train", "triton_norm_train"),
    "inference": ("batchless_norm_inference", "triton_inference"),
}


# (backend, role) -> op: the lookup through torch.ops costs ~0.3 us a call. torch.compile guards on
# this dict's keys, so an entry added by a compiled model's first training (or first inference) step
# recompiled it at the next: the C++ ops are looked up at import, and a backend's first use (triton's,
# which imports triton and registers its kernels; a layer built for it does that at construction)
# looks up all of its roles at once.
_OPS: dict[tuple[str, str], object] = {}


def _lookup_all(backend: str) -> None:
    if backend in ("cpu", "cuda"):
        column = 0
    elif backend == "triton":
        triton_backend.register_kernels()
        column = 1
    else:
        raise ValueError(f"backend {backend!r} has no compiled ops")
    for role, names in _FAMILY_OPS.items():
        _OPS[(backend, role)] = getattr(torch.ops.batchless_kernels, names[column]).default


if ops.extension_loaded():
    try:
        for _backend in ("cpu", "cuda"):
            _lookup_all(_backend)
    except (AttributeError, RuntimeError):  # an extension built from older sources: looked up on use, and fails there
        _OPS.clear()


def prepare(backend: str) -> None:
    """Looks up a compiled backend's ops ahead of their first call (a layer built for ``backend``), so
    that a torch.compile'd model does not recompile after its first step. No-op for the others."""
    if backend in ("cpu", "cuda", "triton") and (backend, "train") not in _OPS \
            and any(_reason(backend, d) is None for d in ("cpu", "cuda")):
        _lookup_all(backend)


def _op(backend: str, role: str):
    op = _OPS.get((backend, role))
    if op is None:
        _lookup_all(backend)
        op = _OPS[(backend, role)]
    return op


def kernel_ops(backend: str):
    """(forward_op, backward_op) of a compiled backend."""
    return _op(backend, "forward"), _op(backend, "backward")


def train_op(backend: str):
    """The training op of a compiled backend: y and the NLL as one autograd node (csrc/ops.cpp)."""
    return _op(backend, "train")


def inference_op(backend: str):
    """The inference op of a compiled backend: y alone, r computed inside (csrc/ops.cpp)."""
    return _op(backend, "inference")
