"""Checks the device code of the built batchless_kernels._C without a GPU (run by .ci/cuda_build.sh):

- a CUDA kernel registered for each kernel op (the training forward included);
- no kernel image spills: no local memory and no stack frame in cuobjdump --dump-resource-usage, and
  no STL / LDL (local stores and loads) in the SASS;
- every norm kernel instantiated for an access width W of 8 or 16 bytes (aligned data: W = V elements;
  a misaligned tensor: the widest W its alignment allows) moves its V elements with V / W instructions,
  for every tensor it streams, with kUnroll packs in flight: its SASS holds at least (kUnroll + 1) x V / W
  16- or 8-byte loads (LDG.E.128 / LDG.E.64) per streamed input (x; grad_y, and x when it computes dweight): kUnroll
  in the unrolled loop and one in the remainder loop, so a kernel where one input's loads are narrow, or
  the loop is not unrolled, fails. Where it writes an activation (y; dx when the backward computes it),
  at least kUnroll + 1 such stores (STG.E.128 / STG.E.64).

cuobjdump ships with the triton wheel (or comes from PATH).
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import torch
import triton

import batchless_kernels.ops as ops

ELEMENT_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}
# channels_{first,last}_kernel<ForwardOp<T, kStats>, V, W> or <BackwardOp<T, kDx, kDw, kDb>, V, W>
NORM_KERNEL = re.compile(r"channels_(?:first|last)_kernel<[^<]*(Forward|Backward)Op<(float|double|c10::Half|"
                         r"c10::BFloat16)((?:, (?:true|false))*)>, (\d+), (\d+)>")
CUDA_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "batchless_norm_kernels.cuh"
UNROLL = int(re.search(r"constexpr int kUnroll = (\d+);", CUDA_SOURCE.read_text()).group(1))


def fail(message: str) -> None:
    sys.exit(f"[cuda-build] {message}")


def main() -> None:
    kernel_ops = (ops.FORWARD_OP, ops.BACKWARD_OP, ops.NLL_OP, ops.NLL_BACKWARD_OP, ops.TRAIN_FORWARD_OP,
                  ops.TRAIN_BACKWARD_OP, ops.INFERENCE_OP)
    missing = [op for op in kernel_ops if not ops.has_kernel(op, "CUDA")]
    if missing:
        fail(f"no CUDA kernel registered for {missing}")
    print(f"[cuda-build] torch {torch.__version__} (CUDA {torch.version.cuda}): all {len(kernel_ops)} ops have CUDA kernels")

    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cuobjdump = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if cuobjdump is None:
        fail("cuobjdump not found (neither in the triton wheel nor on PATH)")
    # this Python's build (a carried GPU prebuild for another Python may lie beside it)
    library = pathlib.Path(ops.__file__).parent / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"

    def dump(flag: str) -> str:
        return subprocess.run([cuobjdump, flag, str(library)], capture_output=True, text=True, check=True).stdout

    kernels = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                         dump("--dump-resource-usage"))
    parts = re.split(r"\n\s+Function : (\S+)\n", dump("-sass"))
    names, bodies = parts[1::2], parts[2::2]
    local_access = {name for name, body in zip(names, bodies) if re.search(r"\b(STL|LDL)\b", body)}
    spilling = [name for name, _, stack, local in kernels if int(stack) or int(local)] + sorted(local_access)
    if not kernels or spilling:
        fail(f"{len(kernels)} kernel images found; with a stack frame, local memory or STL/LDL: {spilling[:5]}")
    print(f"[cuda-build] {len(kernels)} kernel images, at most {max(int(r) for _, r, _, _ in kernels)} registers, "
          "none spills (no stack frame, local memory, STL or LDL)")

    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    checked, narrow = 0, []
    for name, body in zip(demangled, bodies):
        match = NORM_KERNEL.search(name)
        if not match:
            continue
        pass_, dtype, vec, width = match.group(1), match.group(2), int(match.group(4)), int(match.group(5))
        flags = re.findall(r"true|false", match.group(3))
        bits = ELEMENT_BYTES[dtype] * width * 8
        if bits not in (64, 128):
            continue
        per_pack = vec // width  # instructions per pack
        checked += 1
        backward_dx, backward_dw = pass_ == "Backward" and flags[0] == "true", pass_ == "Backward" and flags[1] == "true"
        inputs = 1 + backward_dw  # x; or grad_y, and x for dweight
        writes = pass_ == "Forward" or backward_dx  # y, or dx when the backward computes it
        loads, stores = body.count(f"LDG.E.{bits}"), body.count(f"STG.E.{bits}")
        if loads < (UNROLL + 1) * per_pack * inputs or (writes and stores < (UNROLL + 1) * per_pack):
            narrow.append(f"{name} ({loads} loads, {stores} stores of {bits} bits)")
    if not checked or narrow:
        fail(f"{checked} norm kernel images of 8- or 16-byte accesses checked; {len(narrow)} with fewer than "
             f"({UNROLL} + 1) x V / W vector loads per streamed input (or stores): {narrow[:5]}")
    print(f"[cuda-build] {checked} norm kernel images move 8- or 16-byte accesses in one instruction each, "
          f">= ({UNROLL} + 1) x V / W loads per streamed input")


if __name__ == "__main__":
    main()
