"""Which GPU backend ``auto`` runs (cuda or triton), from measured data.

``bench/derive_gpu_choice.py`` turns a benchmark run (``bench/results/<gpu>/results.csv``) into
``gpu_choice.json`` next to this file: for each GPU, and each (kernel layout, dtype, size class),
the backend whose forward+backward was faster there. Lookups use the running GPU's entry, else
the entry of any measured GPU (the ranking of two memory-bound kernels rarely flips between
GPUs of one generation). Without a table, or for a case it does not cover, ``auto`` keeps the
static order of backends.AUTO_ORDER.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("gpu_choice.json")
GPU_BACKENDS = ("cuda", "triton")
# Inputs below this many elements are "small": launch overhead, not bandwidth, decides there.
SMALL_ELEMENTS = 1 << 20


def kernel_layout(shape, contiguous: bool) -> str:
    """The layout the kernels compute in (csrc/batchless_host.h choose_layout): channels_first for
    contiguous inputs with spatial dims, channels_last otherwise (channels_last, 2-D, transposed)."""
    spatial = math.prod(shape[2:]) if len(shape) > 2 else 1
    return "channels_first" if contiguous and spatial > 1 else "channels_last"


def case_key(shape, dtype: str, contiguous: bool) -> str:
    size = "small" if math.prod(shape) < SMALL_ELEMENTS else "large"
    return f"{kernel_layout(shape, contiguous)}/{dtype}/{size}"


@functools.lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_PATH)) -> dict:
    """{gpu name: {case key: backend}}; empty when no GPU has been measured. A file that cannot be
    read or is not such a table is ignored with a RuntimeWarning naming it (auto then keeps the static
    order): it is read when the package is imported, on CPU-only machines too."""
    try:
        with open(path) as f:
            devices = json.load(f).get("devices", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as error:  # unreadable, not JSON, not an object
        warnings.warn(f"ignoring {path}: not a GPU choice table ({error})", RuntimeWarning, stacklevel=2)
        return {}
    if not (isinstance(devices, dict) and all(
            isinstance(cases, dict) and all(isinstance(k, str) and v in GPU_BACKENDS for k, v in cases.items())
            for cases in devices.values())):
        warnings.warn(f"ignoring {path}: 'devices' must map GPU names to {{case: one of {GPU_BACKENDS}}}",
                      RuntimeWarning, stacklevel=2)
        return {}
    return devices


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def preferred(x: torch.Tensor, table: dict | None = None) -> str | None:
    """The measured-faster GPU backend for x, or None when the table has no entry for its case.
    Traceable by torch.compile (dict lookups only; the GPU's name is not asked for while compiling,
    so any measured GPU's entry serves)."""
    table = _TABLE if table is None else table
    if not table:
        return None
    key = case_key(tuple(x.shape), str(x.dtype).removeprefix("torch."), x.is_contiguous())
    name = None if torch.compiler.is_compiling() else _device_name(x.device)
    for entries in ([table[name]] if name in table else []) + list(table.values()):
        choice = entries.get(key)
        if choice in GPU_BACKENDS:
            return choice
    return None


_TABLE = load_table()  # read once, at import: lookups must stay traceable
