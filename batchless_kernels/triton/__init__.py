"""The triton backend: fused Triton kernels (norm.py), imported on first use.

It runs CUDA tensors, and CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
import), which is how machines without a GPU test it; it is never chosen by ``auto`` on the CPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def unavailable_reason(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from .. import ops

    if not ops.extension_loaded():  # the ops' schemas and autograd live there (csrc/)
        return ops.EXTENSION_ERROR
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "the triton backend runs CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1)"
    return f"the triton backend does not run {device_type} tensors"


def register_kernels() -> None:
    """Registers the Triton launchers as the kernels of the batchless_kernels::triton_* ops (defined in
    csrc/ops.cpp, with the compiled backends' schemas; batchless_kernels.backends looks them up)."""
    from . import norm  # noqa: F401
