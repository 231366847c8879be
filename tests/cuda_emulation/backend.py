"""The CUDA emulation as backends of the test suite (see build.py for the whole picture).

An emulated case runs the cpu backend's public path (bk.batchless_norm(..., backend="cpu"): its
training op and C++ autograd from csrc/autograd.cpp, as the cuda backend runs on a GPU) under
``Redirect``, a TorchDispatchMode that sends the kernel ops of batchless_kernels (KERNEL_OPS) to the same
ops of the emulated library, whose CPU kernels are the CUDA launchers of csrc/cuda run by the
engine. The mode sees ops below autograd only, so the production autograd stays in the path.

Environment:
  BATCHLESS_CUDA_EMULATION          1: build what is missing; 0: no emulated backends; unset: use a
                                    current build where one exists.
  BATCHLESS_CUDA_EMULATION_DEVICES  the simulated devices, SMS:BLOCKS_PER_SM,... (default 132:0,1:1).
  BATCHLESS_CUDA_EMULATION_MUTANT   name of a rewrite.MUTANTS entry: the emulated backends run
                                    with that bug switched on (the mutation check); "none" (or
                                    unset): every mutant off.
  BATCHLESS_CUDA_EMULATION_SANITIZER  address / thread: the asan / tsan variant (in a process started
                                    with build.sanitizer_environment() of that variant).
  BATCHLESS_CUDA_EMULATION_SCHEDULE the engine's thread order (default alternate; see engine.cpp).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import build

MUTANT_ENV = "BATCHLESS_CUDA_EMULATION_MUTANT"
# The kernel ops the launchers of csrc/cuda implement (TORCH_LIBRARY_IMPL(batchless_kernels, CUDA)).
KERNEL_OPS = ("batchless_norm_forward", "batchless_norm_backward", "batchless_nll", "batchless_nll_backward",
              "batchless_norm_train_forward", "batchless_norm_train_backward", "batchless_norm_inference")
DEVICES_ENV = "BATCHLESS_CUDA_EMULATION_DEVICES"
# The simulated devices of the emulated backends: (SM count, blocks per SM; 0 = from the block size).
# BATCHLESS_CUDA_EMULATION_DEVICES="132:0,1:1" (the default) chooses others, e.g. "132:0" for one.
DEFAULT_DEVICES = ((132, 0), (1, 1))


def devices() -> tuple[tuple[int, int], ...]:
    text = os.environ.get(DEVICES_ENV, "").strip()
    if not text:
        return DEFAULT_DEVICES
    try:
        parsed = tuple(tuple(int(v) for v in item.split(":")) for item in text.split(","))
    except ValueError:
        parsed = ()
    if not parsed or any(len(d) != 2 or d[0] < 1 or d[1] < 0 for d in parsed):
        raise ValueError(f"{DEVICES_ENV}={text!r}: expected comma-separated SMS:BLOCKS_PER_SM, e.g. 132:0,1:1")
    return parsed

_STATE = {"error": None}


def setting() -> str:
    return os.environ.get(build.ENV, "").strip()


def mutant_name() -> str | None:
    """The mutant to switch on ("none": every mutant off, as when None), or None."""
    name = os.environ.get(MUTANT_ENV, "").strip()
    if name and name != "none" and name not in build.rewrite.MUTANTS_BY_NAME:
        raise ValueError(f"{MUTANT_ENV}={name!r}: not 'none' nor one of {sorted(build.rewrite.MUTANTS_BY_NAME)}")
    return name or None


SANITIZER_ENV = "BATCHLESS_CUDA_EMULATION_SANITIZER"


SANITIZER_VARIANTS = {"address": "asan", "thread": "tsan"}


def variant() -> str:
    """"asan" / "tsan" where BATCHLESS_CUDA_EMULATION_SANITIZER=address / thread (a process started
    with build.sanitizer_environment() of that variant), else "main"."""
    sanitizer = os.environ.get(SANITIZER_ENV, "").strip()
    if sanitizer and sanitizer not in SANITIZER_VARIANTS:
        raise ValueError(f"{SANITIZER_ENV}={sanitizer!r}: expected one of {sorted(SANITIZER_VARIANTS)} or nothing")
    if sanitizer:
        return SANITIZER_VARIANTS[sanitizer]
    return "main"


SCHEDULE_ENV = "BATCHLESS_CUDA_EMULATION_SCHEDULE"
SCHEDULES = ("alternate", "forward", "reverse", "lagging", "random")


def schedule() -> str:
    """The engine's thread order (engine.cpp): BATCHLESS_CUDA_EMULATION_SCHEDULE, default "alternate"."""
    name = os.environ.get(SCHEDULE_ENV, "").strip() or "alternate"
    if name not in SCHEDULES:
        raise ValueError(f"{SCHEDULE_ENV}={name!r}: expected one of {SCHEDULES}")
    return name


def unavailable_reason() -> str | None:
    """Why the emulated backends are not in the suite, or None when they are."""
    if setting() == "0":
        return f"{build.ENV}=0"
    if not _production_ops_loaded():
        return "batchless_kernels._C is not loaded: no cpu backend to redirect"
    try:
        extension()
    except build.Unavailable as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - a failed build is reported by test_cuda_emulation.py
        _STATE["error"] = error
        return f"the CUDA emulation failed to build or load: {str(error).splitlines()[-1] if str(error) else error!r}"
    return None


def _production_ops_loaded() -> bool:
    import batchless_kernels.ops as ops

    return ops.extension_loaded()


def extension():
    """The emulation extension of the current variant (built here first under BATCHLESS_CUDA_EMULATION=1)."""
    name = variant()
    if setting() == "1" and name not in build._LOADED and build.stale_reason(name) is not None:
        # sys.__stderr__: shown while pytest captures output (the build runs at collection)
        print(f"[cuda-emulation] building the {name} variant (g++, a few minutes; {build.build_dir(name)})",
              file=sys.__stderr__, flush=True)
    return build.load(name, build_if_needed=setting() == "1")


def build_error():
    """The exception of a failed build at discovery, if any."""
    return _STATE["error"]


def discover(base):
    """The emulated backend cases (subclasses of conftest's BackendCase `base`), or [] where the
    emulation is not built, with unavailable_reason() saying why."""

    @dataclasses.dataclass(frozen=True)
    class EmulatedCase(base):
        """The cpu backend with its kernel ops redirected to the emulated CUDA launchers of a
        simulated device with sm_count SMs (blocks_per_sm resident blocks, 0: from the block)."""

        sm_count: int = 132
        blocks_per_sm: int = 0

        @property
        def id(self) -> str:
            extra = "" if self.blocks_per_sm == 0 or (self.sm_count, self.blocks_per_sm) == (1, 1) else f"b{self.blocks_per_sm}"
            return f"cuda_emu-sm{self.sm_count}{extra}-{self.device}"

    if unavailable_reason() is not None:
        return []
    return [EmulatedCase("cpu", "cpu", sm, bps) for sm, bps in devices()]


def is_emulated(case) -> bool:
    return hasattr(case, "sm_count") and hasattr(case, "blocks_per_sm")


class Redirect(TorchDispatchMode):
    """Sends batchless_kernels' kernel ops (CPU tensors) to `library`'s; counts the calls."""

    def __init__(self, library: str, ext):
        super().__init__()
        self.library = library
        self.ext = ext
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "batchless_kernels":
            return func(*args, **kwargs)
        name = func._opname
        if name in KERNEL_OPS:
            self.calls[name] += 1
            out = getattr(getattr(torch.ops, self.library), name).default(*args, **kwargs)
            if self.ext.take_unchecked():
                raise RuntimeError(f"CUDA emulation: {name} launched a kernel without C10_CUDA_KERNEL_LAUNCH_CHECK()")
            return out
        # Another op of the library below autograd (the training op without a graph): its own kernel,
        # with the redirection on for the kernel ops it calls.
        with self:
            return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)


@contextlib.contextmanager
def activate(case):
    """Runs the body with `case`'s simulated device and the redirection on (no-op for other cases)."""
    if not is_emulated(case):
        yield None
        return
    ext = extension()
    mutant = mutant_name()
    ext.configure(sm_count=case.sm_count, blocks_per_sm=case.blocks_per_sm, schedule=schedule())
    ext.set_mutant(build.rewrite.MUTANTS_BY_NAME[mutant].id if mutant and mutant != "none" else 0)
    mode = Redirect(build.library_of(variant()), ext)
    try:
        with mode:
            yield mode
    finally:
        ext.set_mutant(0)
        ext.configure()
