"""Source rewrite of the CUDA emulation: csrc/cuda/*.{cu,cuh,cpp} -> sources g++ compiles against
include/emu_cuda.h (see build.py for the whole picture). Only what g++ cannot parse or what must
point at CPU tensors changes; each substitution stays on its line (a ``#line`` directive keeps file
names and line numbers of the original in messages):

  k<<<grid, block, shmem, stream>>>(args)   ->  ::emu::launch(k, "k at file:line", grid, block, shmem, stream)(args)
  __shared__ T name[dims];                  ->  a reference into the block's shared memory (engine)
  extern __shared__ __align__(a) T name[];  ->  T* const name = ::emu::dynamic_shared<T>(a);
  __launch_bounds__(n) ... kernel(...) {    ->  kernel(...) { EMU_LAUNCH_BOUNDS(n);
  TORCH_LIBRARY_IMPL(batchless_kernels, CUDA, m)  ->  TORCH_LIBRARY_IMPL(<library>, CPU, m)
  x.is_cuda(), c10::DeviceType::CUDA        ->  x.is_cpu(), c10::DeviceType::CPU (the launchers'
                                                device checks, so that they accept CPU tensors)

csrc/ops.cpp gives the schemas: its TORCH_LIBRARY blocks are renamed to <library> (same schemas)
and its Python module init dropped.

MUTANTS are deliberate bugs for the mutation check (tests/test_cuda_emulation.py): with
``mutants=True`` each is compiled in behind a run-time switch (``::emu::mutant(id)``, off by default).

    python tests/cuda_emulation/rewrite.py OUT_DIR [--library NAME] [--mutants]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: int
    name: str
    file: str  # relative to csrc/cuda
    original: str  # exact text, must occur `occurrence`-th (0-based) in the file
    mutated: str  # the replacement when the mutant is active
    occurrence: int = 0
    what: str = ""
    sanitizer: str = ""  # "address": a bug only AddressSanitizer sees (the values stay right)


MUTANTS = (
    Mutant(1, "tail", "batchless_norm_kernels.cuh", "for (; k < count; ++k) {",
           "for (; k < count - (::emu::mutant(1) ? 1 : 0); ++k) {",
           what="run_strided drops the last element of its tail loop"),
    Mutant(2, "barrier", "block_reduce.cuh", "  if (lane == 0) scratch[warp] = v;\n  __syncthreads();",
           "  if (lane == 0) scratch[warp] = v;\n  if (!::emu::mutant(2)) __syncthreads();",
           what="block_sum reads the warps' sums without the barrier after writing them"),
    Mutant(3, "divergent_barrier", "batchless_norm_kernels.cuh", "  __syncthreads();\n  for (int j = threadIdx.x; j < c_len;",
           "  if (!::emu::mutant(3) || active) __syncthreads();\n  for (int j = threadIdx.x; j < c_len;",
           what="channels_last_kernel's barrier only in the threads that hold a row"),
    Mutant(4, "shuffle_mask", "block_reduce.cuh", "__shfl_down_sync(0xffffffffu,",
           "__shfl_down_sync(::emu::mutant(4) ? 0x0000ffffu : 0xffffffffu,",
           what="warp_sum's shuffle mask names half the warp"),
    Mutant(5, "reuse_barrier", "block_reduce.cuh", "  __syncthreads();  // a previous call",
           "  if (!::emu::mutant(5)) __syncthreads();  // a previous call",
           what="block_sum overwrites scratch while a previous call may still read it"),
    Mutant(6, "plane_tail", "batchless_norm_kernels.cuh", "  for (; k < count; k += kThreads) {",
           "  for (; k < count - (::emu::mutant(6) ? kThreads : 0); k += kThreads) {",
           what="run_planes drops each thread's last item of the channels-first remainder loop"),
    Mutant(7, "reduce_load", "batchless_norm_kernels.cuh", "        if (index[u] < 0) continue;",
           "        if (index[u] < 0 || (::emu::mutant(7) && u == 1)) continue;",
           what="reduce_partials_kernel drops the second of each lane's four loads"),
    Mutant(8, "nll_first_block", "batchless_norm_kernels.cuh",
           "    last_block = atomicAdd(epilogue.counter, 1u) == gridDim.x - 1;",
           "    last_block = atomicAdd(epilogue.counter, 1u) == (::emu::mutant(8) ? 0u : gridDim.x - 1);",
           what="the training op's NLL is added up by the first block of the second stage, not the last"),
    Mutant(9, "counter_not_zeroed", "batchless_norm_kernels.cuh",
           "  if (counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *counter = 0;",
           "  if (!::emu::mutant(9) && counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *counter = 0;",
           what="the channels-first kernel leaves the second stage's block counter as allocated"),
    Mutant(10, "grads_direct", "batchless_norm_kernels.cuh",
           "  const bool second_stage = reduce && epilogue.std_param != nullptr;",
           "  const bool second_stage = reduce && epilogue.std_param != nullptr && !(::emu::mutant(10) && epilogue.nll == nullptr);",
           what="the training backward skips its second stage when the tiles hold one partial per channel, "
                "leaving the NLL's gradients unwritten"),
    Mutant(11, "overread", "batchless_norm_kernels.cuh",
           "    const auto in = op.template load<V, W>(first + k * stride);",
           "    const auto in = op.template load<V, W>(first + k * stride);\n"
           "    if (::emu::mutant(11)) {  // one vector past the item: past the tensor's end for its last\n"
           "      const auto extra = op.template load<V, W>(first + k * stride + V);\n"
           "      __asm__ volatile(\"\" : : \"g\"(&extra) : \"memory\");\n"
           "    }",
           what="run_strided's remainder loop also reads the vector after each item (unused: every value "
                "stays right)", sanitizer="address"),
)
MUTANTS_BY_NAME = {m.name: m for m in MUTANTS}

_KERNEL = r"(?P<kernel>[A-Za-z_][\w:]*(?:\s*<(?:[^<>;]|<[^<>;]*>)*>)?)"
LAUNCH = re.compile(_KERNEL + r"\s*<<<(?P<config>.*?)>>>\s*\(", re.S)
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*(?P<align>\d+)\s*\)\s+)?(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
STATIC_SHARED = re.compile(r"__shared__\s+(?P<type>[^;\[\]{}()]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\])*)\s*;")
LIBRARY_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*batchless_kernels\s*,\s*CUDA\s*,")


class RewriteError(RuntimeError):
    pass


def _balanced(text: str, open_at: int) -> int:
    """Index just past the parenthesis that closes the one at open_at."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise RewriteError("unbalanced parentheses")


def _launch_bounds(text: str) -> tuple[str, int]:
    count = 0
    while (start := text.find("__launch_bounds__(")) != -1:
        args_end = _balanced(text, start + len("__launch_bounds__"))
        args = text[start + len("__launch_bounds__") + 1:args_end - 1]
        params_open = text.index("(", args_end)
        params_end = _balanced(text, params_open)
        brace = re.compile(r"\s*\{").match(text, params_end)
        if brace is None:
            raise RewriteError(f"no kernel body after __launch_bounds__({args})")
        body = brace.end()
        text = (text[:start] + text[args_end:body] + f" EMU_LAUNCH_BOUNDS({args});" + text[body:])
        count += 1
    return text, count


def apply_mutants(text: str, file: str, mutants: bool) -> tuple[str, list[str]]:
    applied = []
    if not mutants:
        return text, applied
    for m in MUTANTS:
        if m.file != file:
            continue
        parts = text.split(m.original)
        if len(parts) <= m.occurrence + 1:
            raise RewriteError(f"mutant {m.name}: {m.original!r} not found in csrc/cuda/{file}")
        text = m.original.join(parts[:m.occurrence + 1]) + m.mutated + m.original.join(parts[m.occurrence + 1:])
        applied.append(m.name)
    return text, applied


def rewrite_cuda(text: str, *, display_path: str, library: str) -> tuple[str, dict[str, int]]:
    """One .cu/.cuh file for g++; returns the text and how many of each substitution it made."""
    counts = {}

    def sub(pattern, repl, text, key):
        new, n = pattern.subn(repl, text)
        counts[key] = n
        return new

    text = sub(LAUNCH, lambda m: f'::emu::launch({m["kernel"]}, "{" ".join(m["kernel"].split())} at " __FILE__ ":" '
                                 f'EMU_STR(__LINE__), {m["config"]})(', text, "launches")
    text = sub(EXTERN_SHARED, lambda m: f'{m["type"]}* const {m["name"]} = ::emu::dynamic_shared<{m["type"]}>'
                                        f'({m["align"] or 0});', text, "extern_shared")
    text = sub(STATIC_SHARED, lambda m: (
        f'using emu_shared_type_{m["name"]} = {m["type"]}{m["dims"]}; emu_shared_type_{m["name"]}& {m["name"]} = '
        f'::emu::static_shared<emu_shared_type_{m["name"]}>(__FILE__ ":" EMU_STR(__LINE__) ":{m["name"]}");'),
        text, "static_shared")
    text, counts["launch_bounds"] = _launch_bounds(text)
    text = sub(LIBRARY_IMPL, f"TORCH_LIBRARY_IMPL({library}, CPU,", text, "library_impls")
    text = sub(re.compile(r"\.is_cuda\(\)"), ".is_cpu()", text, "device_checks")
    text = sub(re.compile(r"\bc10::DeviceType::CUDA\b"), "c10::DeviceType::CPU", text, "device_types")
    for leftover in ("<<<", "__shared__", "__launch_bounds__"):
        if leftover in text:
            line = text[:text.index(leftover)].count("\n") + 1
            raise RewriteError(f"{display_path}:{line}: {leftover} left after the rewrite")
    return f'#include "emu_cuda.h"\n#line 1 "{display_path}"\n' + text, counts


def rewrite_ops(text: str, library: str) -> str:
    """csrc/ops.cpp's schemas under `library` (the Python module is csrc/python_module.cpp's)."""
    text, n = re.subn(r"TORCH_LIBRARY(_FRAGMENT)?\(\s*batchless_kernels\s*,", rf"TORCH_LIBRARY\1({library},", text)
    if n == 0:
        raise RewriteError("csrc/ops.cpp: no TORCH_LIBRARY block")
    return '#line 1 "csrc/ops.cpp"\n' + text


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    """Keeps the timestamp of unchanged outputs, so that ninja recompiles only what changed."""
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def rewrite_tree(out_dir: pathlib.Path, library: str, mutants: bool = False) -> dict:
    """Writes out_dir/cuda/<file> for every csrc/cuda file (.cu as .cpp, for g++; the host side's .cpp
    for its registrations and device checks) and out_dir/ops.cpp; returns {"sources": [...],
    "counts": {file: counts}, "mutants": [...]}."""
    out_dir = pathlib.Path(out_dir)
    sources, report, applied = [], {}, []
    for src in sorted((CSRC / "cuda").iterdir()):
        if src.suffix not in (".cu", ".cuh", ".cpp"):
            continue
        text, names = apply_mutants(src.read_text(), src.name, mutants)
        applied += names
        text, counts = rewrite_cuda(text, display_path=f"csrc/cuda/{src.name}", library=library)
        report[src.name] = counts
        dest = out_dir / "cuda" / (src.stem + ".cpp" if src.suffix == ".cu" else src.name)
        _write_if_changed(dest, text)
        if src.suffix != ".cuh":
            sources.append(dest)
    if mutants and sorted(applied) != sorted(m.name for m in MUTANTS):
        raise RewriteError(f"mutants applied {applied}, expected {[m.name for m in MUTANTS]}")
    ops = out_dir / "ops.cpp"
    _write_if_changed(ops, rewrite_ops((CSRC / "ops.cpp").read_text(), library))
    return {"sources": sources + [ops], "counts": report, "mutants": applied}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--library", default="batchless_emulated")
    parser.add_argument("--mutants", action="store_true")
    args = parser.parse_args(argv)
    result = rewrite_tree(args.out_dir, args.library, args.mutants)
    for name, counts in result["counts"].items():
        print(name, counts)
    print("mutants:", result["mutants"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
