"""What the Triton kernels compile to for a GPU, on a machine without one.

Every kernel variant that the triton backend launches for a set of shapes (the GPU benchmark's and
odd ones) is compiled offline for sm_<arch>, through Triton's own specialization of the launch
arguments (batchless_kernels.triton.norm.plan_launch, as a real launch). For each, ptxas gives the
registers and spills, and the PTX gives the width of every global access to the activations (x, y,
grad_y, dx). The parameters and partial sums are given the other float width in these compiles
(float64 beside 16/32-bit activations, float32 beside float64 ones), and the second pass's counter,
which the forward zeroes, the other integer width, so that their accesses are told apart by width.

A variant passes when it does not spill, every activation access is as wide as the shape allows:
min(16 bytes, VEC elements, the block's contiguous extent), VEC being the largest power of two that
divides the contiguous row (planes of S elements, or rows of C channels), and every pointer offset
is computed in 64 bits (in the TTIR: each tt.addptr offset is i64 and no 32-bit integer arithmetic
feeds it), which inputs of 2**31+ elements need and the interpreter cannot show (numpy computes in
int64 whatever the kernel says).

    python bench/triton_codegen.py [--arch 90] [--json FILE] [--quick]

Exits 1 when a variant fails. tests/test_triton_codegen.py runs it in CI (no GPU there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Compile for real, not for the interpreter (set before Triton decorates the kernels).
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batchless import GPU_TARGETS  # noqa: E402

from batchless_kernels._checks import accumulation_dtype  # noqa: E402

# Odd sizes: planes of 7x7 (odd S), 10 (S divisible by 2 only), 100 channels (by 4), 3 channels.
ODD_SHAPES = [(8, 24, 7, 7), (6, 100, 10), (1000, 3), (7, 100)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
QUICK_DTYPES = (torch.float32, torch.bfloat16)

_SSA = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)? = \"?([\w.]+)\"?(.*)$")  # %name[:n] = op operands : types
_ARITH_32 = re.compile(r"^arith\.(addi|subi|muli|divsi|divui|remsi|remui|shli)$")
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_WIDTH = re.compile(r"\.(?:v(\d))?\.?[bfsu](8|16|32|64)\b")


class _OfflineDriver:
    """Enough of a Triton driver for JITFunction.warmup to compile for `target` without a GPU."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _ptxas() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    found = str(bundled) if bundled.exists() else shutil.which("ptxas")
    if found is None:
        raise RuntimeError("ptxas not found (neither in the triton wheel nor on PATH)")
    return found


def _resources(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill store bytes) from ptxas -v."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "k.ptx"
        source.write_text(ptx)
        done = subprocess.run([_ptxas(), f"-arch={arch}", "-v", str(source), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    return registers, spills


def _access_widths(ptx: str, element_bits: int) -> dict[str, list[int]]:
    """Widths in bytes of the global loads and stores whose element width is element_bits (16-bit
    activations are packed by pairs into b32, so for them 16 and 32 count)."""
    bits = {16: (16, 32), 32: (32,), 64: (64,)}[element_bits]
    widths: dict[str, list[int]] = {"ld": [], "st": []}
    for kind, suffix in _ACCESS.findall(ptx):
        match = _WIDTH.search(suffix)
        if match and int(match.group(2)) in bits:
            widths[kind].append(int(match.group(1) or 1) * int(match.group(2)) // 8)
    return widths


def narrow_offsets(ttir: str) -> list[str]:
    """The 32-bit pointer offsets of a kernel's TTIR: each tt.addptr whose offset is not i64, or whose
    offset is computed (back through its operands: splats, broadcasts, extensions, arithmetic) by an
    i32 add, multiply, division or shift, which wraps before the extension to 64 bits (e.g. a plane
    index pid * BLOCK_P in i32). Loop bounds are not followed (scf ops), nor values of other regions."""
    defs: dict[str, tuple[str, str, list]] = {}  # SSA name -> (line, op, its operands' definitions)
    found = []

    def thirty_two_bit(node, seen) -> list[str]:
        if node is None or id(node) in seen or node[1].startswith("scf."):
            return []
        seen.add(id(node))
        line, op, operands = node
        own = [line] if _ARITH_32.match(op) and re.search(r"i32>?$", line.rsplit(" : ", 1)[-1]) else []
        return own + [bad for o in operands for bad in thirty_two_bit(o, seen)]

    for raw in ttir.splitlines():
        line = raw.split(" loc(")[0].strip()
        match = _SSA.match(line)
        if not match:
            continue
        name, op, rest = match.groups()
        # operands resolved to their latest definition (names repeat only across sibling regions)
        node = (line, op, [defs.get(o) for o in re.findall(r"%[\w.$-]+", rest.split(" : ")[0])])
        defs[name] = node
        if op == "tt.addptr":
            offset_type = line.rsplit(", ", 1)[-1]
            causes = thirty_two_bit(node[2][1], set())
            if not re.search(r"i64>?$", offset_type) or causes:
                found.append(line + "".join(f"\n    from {c}" for c in causes))
    return found


def _cases(quick: bool):
    """(shape, layout, dtype) the benchmark and the odd shapes run."""
    for shape in [*GPU_TARGETS, *ODD_SHAPES]:
        layouts = ["contiguous", "channels_last"] if len(shape) == 4 else ["rows" if len(shape) > 2 else "2d"]
        for layout in layouts:
            for dtype in (QUICK_DTYPES if quick else DTYPES):
                yield shape, layout, dtype


def inspect(arch: int = 90, quick: bool = False, cases=None) -> list[dict]:
    """A row per compiled variant of `cases` ((shape, layout, dtype); default: _cases(quick) and the
    partial sums' second pass, _sum_partials_rows)."""
    from batchless_kernels.triton import norm

    driver.set_active(_OfflineDriver(GPUTarget("cuda", arch, 32)))
    rows = []
    for shape, layout, dtype in cases or _cases(quick):
        batch, channels = shape[0], shape[1]
        numel = math.prod(shape)
        first = layout in ("contiguous", "rows")
        launch = norm.plan_launch(first, batch, channels, numel, dtype)
        side = torch.float32 if dtype == torch.float64 else torch.float64  # parameters, partials
        acc = norm.accumulator(accumulation_dtype(dtype))
        data = torch.empty(64, dtype=dtype)
        param = torch.empty(64, dtype=side)
        contiguous_extent = launch.meta["BLOCK_S"] if first else launch.meta["BLOCK_C"]
        expected = min(16, launch.meta["VEC"] * dtype.itemsize, contiguous_extent * dtype.itemsize)
        counter = torch.empty(1, dtype=torch.int32 if dtype == torch.float64 else torch.int64)  # told apart too
        forward = (data, data, param, param, param, param, param, param, counter)
        # after the sizes: kind, eps (its float64's bits), has_w, has_b (forward); has_w (backward)
        eps_bits = norm._eps_bits(1e-5)
        variants = {
            "fwd": (norm.FORWARD_KERNELS[first], forward, (1, eps_bits, 1, 1), dict(STATS=True)),
            "fwd-inference": (norm.FORWARD_KERNELS[first], forward, (1, eps_bits, 1, 1), dict(STATS=False)),
            "bwd": (norm.BACKWARD_KERNELS[first], (data, data, data, param, param, param, param, param), (1,),
                    dict(NEED_DX=True, NEED_DW=True, NEED_DB=True)),
            "bwd-dx": (norm.BACKWARD_KERNELS[first], (data, data, data, param, param, param, param, param), (1,),
                       dict(NEED_DX=True, NEED_DW=False, NEED_DB=False)),
        }
        for name, (kernel, tensors, scalars, flags) in variants.items():
            compiled = kernel.warmup(*tensors, *launch.sizes, *scalars, **launch.meta, **flags, ACC=acc,
                                     grid=launch.grid)
            ptx = compiled.asm["ptx"]
            registers, spills = _resources(ptx)
            widths = _access_widths(ptx, dtype.itemsize * 8)
            narrow = [w for w in widths["ld"] + widths["st"] if w != expected]
            offsets32 = narrow_offsets(compiled.asm["ttir"])
            rows.append(dict(
                kernel=name, shape="x".join(map(str, shape)), layout=layout, dtype=str(dtype).removeprefix("torch."),
                warps=compiled.metadata.num_warps, registers=registers, spill_bytes=spills,
                vec=launch.meta["VEC"], expected_bytes=expected,
                load_bytes=sorted(set(widths["ld"])), store_bytes=sorted(set(widths["st"])),
                offsets_32bit=offsets32,
                ok=spills == 0 and not narrow and bool(widths["ld"]) and bool(widths["st"]) and not offsets32,
            ))
    if cases is None:  # the whole sweep: the second pass's variants too
        rows += _sum_partials_rows()
    return rows


def _sum_partials_rows() -> list[dict]:
    """The second pass over the partial sums (norm._sum_partials_kernel), per accumulation dtype, at
    (C, K) = (1024, 528): summing two statistics or one, and the training's two NLL epilogues (forward:
    r, the NLL by the last program's ticket; backward: the NLL's gradients, beside two sums or none);
    and at (2, 70001), long rows of partials added in segments (blocks of 1024). Blocks as the
    launcher picks them (norm._second_pass_grid). No spill and 64-bit offsets (its loads run along K,
    a runtime length, so their width is not checked)."""
    from batchless_kernels.triton import norm

    variants = {"sum-partials": (2, 0, 1024, 528), "sum-partials-one": (1, 0, 1024, 528),
                "sum-partials-nll": (2, 1, 1024, 528), "sum-partials-nll-grads": (2, 2, 1024, 528),
                "nll-grads": (0, 2, 1024, 528), "sum-partials-segments": (2, 0, 2, 70001)}
    rows = []
    for acc in (torch.float32, torch.float64):
        partial = torch.empty(64, dtype=acc)
        counter = torch.empty(1, dtype=torch.int32)
        tensors = (partial,) * 8 + (counter,) + (partial,) * 5  # P1 .. BLOCK_SUMS, COUNTER, GRAD_NLL .. DPARAM
        for name, (nsum, epilogue, channels, k) in variants.items():
            programs, block_c, block_k, segment = norm._second_pass_grid(channels, k)
            # C, K, segment, count, kind, eps_bits, gauge
            compiled = norm._sum_partials_kernel.warmup(
                *tensors, channels, k, segment, 3136, 1, norm._eps_bits(1e-5), 1, BLOCK_C=block_c, BLOCK_K=block_k, NSUM=nsum,
                EPILOGUE=epilogue, ACC=norm.accumulator(acc), num_warps=4, grid=(programs,))
            registers, spills = _resources(compiled.asm["ptx"])
            widths = _access_widths(compiled.asm["ptx"], acc.itemsize * 8)
            offsets32 = narrow_offsets(compiled.asm["ttir"])
            rows.append(dict(
                kernel=name, shape=f"{channels}x{k}", layout="partials",
                dtype=str(acc).removeprefix("torch."), warps=compiled.metadata.num_warps, registers=registers,
                spill_bytes=spills, vec=1, expected_bytes=0, load_bytes=sorted(set(widths["ld"])),
                store_bytes=sorted(set(widths["st"])), offsets_32bit=offsets32,
                ok=spills == 0 and bool(widths["ld"]) and bool(widths["st"]) and not offsets32,
            ))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here too")
    parser.add_argument("--quick", action="store_true", help="float32 and bfloat16 only")
    args = parser.parse_args()
    rows = inspect(args.arch, args.quick)
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(f"{'kernel':<14}{'shape':<18}{'layout':<14}{'dtype':<9}{'warps':>5}{'regs':>5}{'spill':>6}"
          f"{'vec':>4}{'want':>5}  loads/stores (bytes)")
    for r in rows:
        print(f"{r['kernel']:<14}{r['shape']:<18}{r['layout']:<14}{r['dtype']:<9}{r['warps']:>5}{r['registers']:>5}"
              f"{r['spill_bytes']:>6}{r['vec']:>4}{r['expected_bytes']:>5}  {r['load_bytes']}/{r['store_bytes']}"
              f"{'' if r['ok'] else '  FAIL'}{'  32-bit offsets' if r['offsets_32bit'] else ''}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} variants pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
