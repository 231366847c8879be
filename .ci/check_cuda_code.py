"""Checks the device code of the built batchless_kernels._C without a GPU (run by .ci/cuda_build.sh):

- every CUDA kernel registered for the four ops;
- no kernel image uses local memory (register spills), from cuobjdump --dump-resource-usage;
- every norm kernel instantiated for aligned data moves its V elements with one instruction: 16- and
  8-byte packs must show as LDG.E.128 / LDG.E.64 loads, and STG.E.128 / STG.E.64 stores where the
  kernel writes an activation (y; dx when the backward computes it), in the SASS.

cuobjdump ships with the triton wheel (or comes from PATH).
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import torch
import triton

import batchless_kernels.ops as ops

ELEMENT_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}
# channels_{first,last}_kernel<ForwardOp<T, ...>, V, kAligned> or <BackwardOp<T, kDx, ...>, V, kAligned>
NORM_KERNEL = re.compile(r"channels_(?:first|last)_kernel<[^<]*(Forward|Backward)Op<(float|double|c10::Half|"
                         r"c10::BFloat16)(?:, (true|false))?[^>]*>, (\d+), (true|false)>")


def fail(message: str) -> None:
    sys.exit(f"[cuda-build] {message}")


def main() -> None:
    missing = [op for op in (ops.FORWARD_OP, ops.BACKWARD_OP, ops.NLL_OP, ops.NLL_BACKWARD_OP)
               if not ops.has_kernel(op, "CUDA")]
    if missing:
        fail(f"no CUDA kernel registered for {missing}")
    print(f"[cuda-build] torch {torch.__version__} (CUDA {torch.version.cuda}): all 4 ops have CUDA kernels")

    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cuobjdump = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if cuobjdump is None:
        fail("cuobjdump not found (neither in the triton wheel nor on PATH)")
    (library,) = pathlib.Path(ops.__file__).parent.glob("_C*.so")

    def dump(flag: str) -> str:
        return subprocess.run([cuobjdump, flag, str(library)], capture_output=True, text=True, check=True).stdout

    kernels = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)", dump("--dump-resource-usage"))
    spilling = [name for name, _, local in kernels if int(local)]
    if not kernels or spilling:
        fail(f"{len(kernels)} kernel images found; using local memory: {spilling}")
    print(f"[cuda-build] {len(kernels)} kernel images, at most {max(int(r) for _, r, _ in kernels)} registers, "
          "none uses local memory")

    parts = re.split(r"\n\s+Function : (\S+)\n", dump("-sass"))
    names, bodies = parts[1::2], parts[2::2]
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    checked, narrow = 0, []
    for name, body in zip(demangled, bodies):
        match = NORM_KERNEL.search(name)
        if not match or match.group(5) != "true":
            continue
        pass_, dtype, first_flag, vec = match.group(1), match.group(2), match.group(3), int(match.group(4))
        bits = ELEMENT_BYTES[dtype] * vec * 8
        if bits not in (64, 128):
            continue
        checked += 1
        writes = pass_ == "Forward" or first_flag == "true"  # y, or dx when the backward computes it
        if f"LDG.E.{bits}" not in body or (writes and f"STG.E.{bits}" not in body):
            narrow.append(name)
    if not checked or narrow:
        fail(f"{checked} aligned norm kernel images checked; without {len(narrow)} vector accesses: {narrow[:5]}")
    print(f"[cuda-build] {checked} aligned norm kernel images move 8- or 16-byte packs in one instruction")


if __name__ == "__main__":
    main()
