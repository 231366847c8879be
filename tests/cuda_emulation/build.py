"""CUDA emulation: the CUDA kernels of csrc/cuda, unmodified, compiled with g++ and run on CPU tensors.

Why: CI has no GPU. Compiling the CUDA sources (.ci/cuda_build.sh) proves they build, not that they
compute the right thing; this stage *executes* them, launchers included, in the shared correctness
suite (tests/test_correctness.py), like any other backend.

How:
  include/emu_cuda.h   what g++ needs of CUDA: __global__/__device__/__host__/__forceinline__,
                       threadIdx/blockIdx/blockDim/gridDim, dim3, vector types (uint4, float4, ...),
                       __syncthreads, __shfl_{,up_,down_,xor_}sync, __ballot/__any/__all_sync,
                       __syncwarp, cache-hint loads/stores (__ldg, __ldcs, __stcs, __stwb, ...),
                       __launch_bounds__, occupancy and device-property queries, kernel launches.
  include/ATen/cuda/CUDAContext.h, include/c10/cuda/{CUDAGuard,CUDAException,CUDAFunctions,CUDAStream}.h
                       stubs of the CUDA headers the launchers include: the current device is the
                       engine's simulated device (its SM count and blocks per SM are settings, so that
                       tests force different tilings), streams are dummies, C10_CUDA_CHECK works.
  engine.cpp           runs a launch: blocks one after another, each CUDA thread of a block a fiber
                       (ucontext makecontext/swapcontext), and checks what hardware would punish:
                       __syncthreads from different call sites or after threads exited, warp
                       collectives whose mask names exited/absent lanes or lanes elsewhere, shuffles
                       reading lanes outside the mask, deadlocks, block/grid/shared-memory limits,
                       __launch_bounds__, launches not followed by C10_CUDA_KERNEL_LAUNCH_CHECK.
                       Shared memory is fresh per block and starts as NaN bytes (0xFF), so a stale read
                       shows. The schedule runs a block's threads forwards, backwards, or with one warp
                       lagging behind the others, by turns from block to block (a missing barrier shows
                       in one order or another); "random" draws the order afresh for every pass.
  rewrite.py           the source rewrite for what g++ cannot parse or what must address CPU tensors:
                       <<<grid, block, shmem, stream>>> launches, __shared__ / extern __shared__,
                       __launch_bounds__, the TORCH_LIBRARY_IMPL namespace and dispatch key
                       (batchless_kernels/CUDA -> batchless_emulated/CPU, same schemas, taken from
                       csrc/ops.cpp) and the launchers' is_cuda()/DeviceType::CUDA checks. Mutants
                       (deliberate bugs behind a run-time switch) for the mutation check.
  selftest.cu          small right and wrong kernels that test the engine (tests/test_cuda_emulation.py).
  bindings.cpp         Python module: configure(sm_count, blocks_per_sm, shared_per_block, schedule),
                       stats(), launch_log(), set_mutant(), run_selftest().
  backend.py           the suite's side: discovery of the emulated backends (conftest.py) and the
                       redirection of the cpu backend's kernel ops to the emulated ones.

This module builds the extension with torch.utils.cpp_extension.load (g++, ninja, against the
installed torch) into tests/cuda_emulation/build/<variant>-torch<version>/ (git-ignored):
  variant "main"    library batchless_emulated: the kernels with rewrite.MUTANTS compiled in (a
                    mutant schema), each off until switched on (set_mutant) for the mutation check
                    of tests/test_cuda_emulation.py: a dropped tail element (channels-last and
                    channels-first remainder loops), each of block_sum's two barriers removed, a
                    barrier taken only by some threads, a shuffle mask naming half the warp, a load of
                    the second stage dropped, ... With every mutant off (the default) they compute
                    what csrc/cuda says; one build serves the suite and the mutation check (a
                    separate mutant variant at -O0 took ~90 CPU-seconds more of CI);
  variant "asan"    library batchless_emulated_asan: the same sources (the norm
                    kernels of float32 and bfloat16 only: SANITIZER_SKIPS) under AddressSanitizer (heap
                    accesses: an out-of-bounds read of a tensor fails), loaded
                    in a process started with the ASan runtime preloaded (sanitizer_environment();
                    BATCHLESS_CUDA_EMULATION_SANITIZER=address selects it, tests/test_cuda_emulation.py);
  variant "tsan"    library batchless_emulated_tsan: the same under ThreadSanitizer, each warp of a
                    block a TSan fiber, synchronized as __syncthreads synchronizes it: a race between
                    the warps of a block is reported even where the values come out right (the
                    lanes of one warp share a TSan thread: races between them are not seen)
                    (BATCHLESS_CUDA_EMULATION_SANITIZER=thread).
A build is current when the fingerprint (content hash) of its inputs, recorded in built.stamp,
matches csrc/cuda, csrc/ops.cpp, the host headers and this folder's sources.

    python tests/cuda_emulation/build.py            # build (or bring up to date) the main variant

Test integration (tests/conftest.py, tests/cuda_emulation/backend.py): where the main variant is
built and up to date for this torch, the correctness suite gets two more backends, cuda_emu-sm132-cpu
(a 132-SM H100-like device) and cuda_emu-sm1-cpu (1 SM, 1 block per SM: the largest tiles). Such a
case runs the cpu backend's public path (bk.batchless_norm(..., backend="cpu"), its C++ autograd
and training op) with a TorchDispatchMode that sends the kernel ops (batchless_norm_forward,
batchless_norm_backward, batchless_nll, batchless_nll_backward, batchless_norm_train_forward) to
batchless_emulated, i.e. to the CUDA launchers and kernels. Nothing is registered for batchless_kernels, and the package has no
test-only code path. BATCHLESS_CUDA_EMULATION=1 builds what is missing when the suite starts (CI);
=0 leaves the emulated backends out; unset uses a build that exists. Where the build is impossible
(no g++, no ninja, not Linux) the emulated tests skip with the reason.

Cost (2 shared cores, one compile job): building the main variant about 2 minutes; the emulated
backends add about 2 minutes to the correctness suite (most of it in the 2053-channel shapes:
thousands of small blocks), and tests/test_cuda_emulation.py about 2 minutes (the mutation check
runs the correctness suite in a subprocess per mutant, stopping at the first failure), the asan
variant about 2 minutes to build and 20 s to run its selection (62 s while the engine's switches
called __asan_handle_no_return), the tsan variant about 2 minutes to build and 50 s to run it (plus
15 s for the race mutant on the contiguous cases). MAX_JOBS sets the compile jobs (default: the
cores this process may use).

Out-of-bounds global accesses are checked by the asan variant only (heap: the tensors; the fibers'
stacks are not instrumented), races by the tsan variant only (within a block: blocks run one after
another).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import os
import pathlib
import platform
import shutil
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
BUILD_ROOT = HERE / "build"
ENV = "BATCHLESS_CUDA_EMULATION"

VARIANTS = {"main": "batchless_emulated", "asan": "batchless_emulated_asan", "tsan": "batchless_emulated_tsan"}
CFLAGS = ["-g0", "-Wno-unknown-pragmas", "-fno-strict-aliasing"]
# The main variant at -O1: its kernels compiled in 64 s against 83-104 s at -O2, and the suite's 1248
# emulated cases ran in the same time (51 s against 53 s, 2 workers); at -O0 (40 s) they took 81 s.
OPTIMIZE = {"main": "-O1", "asan": "-O1", "tsan": "-O1"}
# The asan variant: the main variant's sources under AddressSanitizer, for heap accesses only
# (asan-stack=0: the fibers switch stacks by jumps, which stack instrumentation would misread).
# The tsan variant: the same under ThreadSanitizer, the engine telling TSan the synchronization CUDA
# gives (engine.cpp, "Race detection"). Each process needs its runtime loaded first:
# sanitizer_environment().
SANITIZE = {"asan": ["-fsanitize=address", "-fno-omit-frame-pointer", "--param=asan-stack=0"],
            "tsan": ["-fsanitize=thread", "-fno-omit-frame-pointer", "-g1"]}  # -g1: file:line in reports
# The sanitizer variants leave out the norm kernels of float64 and float16 (their translation unit;
# sanitizer_dtypes.cpp stands in): their selections run float32 and bfloat16.
SANITIZER_SKIPS = {"batchless_norm_kernels_fp64_fp16.cpp": HERE / "sanitizer_dtypes.cpp"}
# The sanitizers' runtimes and options: leak checks off (Python and torch keep memory until exit);
# TSan looks only at instrumented code (the kernels; torch's own threads are not its subject) and
# reports races only (no lock-order or signal checks of the host libraries).
SANITIZER_RUNTIME = {
    "asan": ("libasan.so", "ASAN_OPTIONS", "detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0"),
    "tsan": ("libtsan.so", "TSAN_OPTIONS",
             "ignore_noninstrumented_modules=1:detect_deadlocks=0:report_signal_unsafe=0:report_thread_leaks=0"),
}

sys.path.insert(0, str(HERE))
import rewrite  # noqa: E402


class Unavailable(RuntimeError):
    """The emulation cannot be built or loaded here; str() says why."""


def library_of(variant: str) -> str:
    return VARIANTS[variant]


def module_name(variant: str) -> str:
    return f"{library_of(variant)}_ext"


def build_dir(variant: str) -> pathlib.Path:
    import torch

    return BUILD_ROOT / f"{variant}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"


def impossible_reason() -> str | None:
    """Why g++ cannot build the emulation here, or None."""
    if platform.system() != "Linux":
        return f"the CUDA emulation needs Linux (ucontext fibers), this is {platform.system()}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH"
    try:
        import torch.utils.cpp_extension as cpp
    except ImportError as error:
        return f"torch is not importable ({error})"
    if not cpp.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension needs it)"
    return None


def _inputs(variant: str) -> list[pathlib.Path]:
    """Every file the build reads: a build older than one of them is stale."""
    files = [p for p in (CSRC / "cuda").iterdir() if p.suffix in (".cu", ".cuh", ".cpp")]
    files += [CSRC / "ops.cpp"] + sorted(CSRC.glob("*.h"))  # the host headers
    files += [p for p in HERE.rglob("*") if p.suffix in (".h", ".cpp", ".cu") and BUILD_ROOT not in p.parents]
    return files + [HERE / "rewrite.py", HERE / "build.py"]


def _stamp(variant: str) -> pathlib.Path:
    """Written after each successful build with the fingerprint of its inputs."""
    return build_dir(variant) / "built.stamp"


def _library_path(variant: str) -> pathlib.Path | None:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for path in build_dir(variant).glob(f"{module_name(variant)}*"):
        if any(str(path).endswith(s) for s in suffixes):
            return path
    return None


def stale_reason(variant: str = "main") -> str | None:
    """None when the variant is built and newer than its inputs, else why not."""
    so = _library_path(variant)
    if so is None or not _stamp(variant).exists():
        return f"the CUDA emulation ({variant}) is not built for this torch: run python tests/cuda_emulation/build.py"
    if _stamp(variant).read_text() != _fingerprint(variant):
        return (f"the CUDA emulation ({variant}) was built from other sources (csrc/ or tests/cuda_emulation/ changed): "
                "run python tests/cuda_emulation/build.py")
    return None


def _fingerprint(variant: str) -> str:
    """Hash of every input's content and of the compile flags (what the stamp records)."""
    digest = hashlib.sha256(repr([OPTIMIZE[variant]] + CFLAGS + SANITIZE.get(variant, [])).encode())
    for path in sorted(_inputs(variant)):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


_LOADED: dict[str, object] = {}


def _import(variant: str):
    if variant in _LOADED:
        return _LOADED[variant]
    import torch  # noqa: F401  (the extension links against torch's libraries)

    so = _library_path(variant)
    spec = importlib.util.spec_from_file_location(module_name(variant), so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _LOADED[variant] = module
    return module


def build(variant: str = "main", verbose: bool = False):
    """Builds (or brings up to date) and loads the extension of `variant`; raises Unavailable
    where it cannot be built here, and the compiler's error where the build fails."""
    if variant in _LOADED:
        return _LOADED[variant]
    reason = impossible_reason()
    if reason is not None:
        raise Unavailable(reason)
    import torch.utils.cpp_extension as cpp

    out = build_dir(variant)
    src = out / "src"
    fingerprint = _fingerprint(variant)  # of the inputs this build reads
    library = library_of(variant)
    result = rewrite.rewrite_tree(src, library, mutants=True)
    selftest = src / "selftest.cpp"
    text, _ = rewrite.rewrite_cuda((HERE / "selftest.cu").read_text(), display_path="tests/cuda_emulation/selftest.cu",
                                   library=library)
    rewrite._write_if_changed(selftest, text)
    kernels = result["sources"]
    if variant in SANITIZE:
        missing = set(SANITIZER_SKIPS) - {p.name for p in kernels}
        if missing:
            raise RuntimeError(f"SANITIZER_SKIPS names {sorted(missing)}, which csrc/cuda no longer has")
        kernels = [SANITIZER_SKIPS.get(p.name, p) for p in kernels]
    sources = [str(p) for p in kernels] + [str(selftest), str(HERE / "engine.cpp"), str(HERE / "bindings.cpp")]
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0))))
    _remove_stale_lock(out)
    started = time.monotonic()
    module = cpp.load(
        name=module_name(variant),
        sources=sources,
        extra_include_paths=[str(HERE / "include"), str(src), str(CSRC)],
        extra_cflags=[OPTIMIZE[variant]] + CFLAGS + SANITIZE.get(variant, []),
        extra_ldflags=SANITIZE.get(variant, [])[:1],
        build_directory=str(out),
        verbose=verbose,
    )
    _stamp(variant).write_text(fingerprint)
    if verbose:
        print(f"[cuda-emulation] {variant}: built/loaded in {time.monotonic() - started:.1f}s ({out})")
    _LOADED[variant] = module
    return module


# A build takes minutes (the sanitizer variants ~2); torch's build lock older than this was left by a
# build that was killed.
STALE_LOCK_S = 30 * 60


def _remove_stale_lock(out: pathlib.Path) -> None:
    """torch.utils.cpp_extension takes the file `lock` in the build directory for the duration of a
    build and waits, silently and for ever, while it exists: a build killed mid-way (a timeout, ^C)
    leaves it behind and every later build hangs. One older than STALE_LOCK_S is removed, saying so."""
    lock = out / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        print(f"[cuda-emulation] removing {lock}, left {age / 60:.0f} min ago by a build that did not finish",
              file=sys.stderr)
        lock.unlink(missing_ok=True)


def sanitizer_environment(variant: str) -> dict[str, str] | None:
    """What a process loading the sanitizer variant `variant` ("asan", "tsan") needs in its
    environment: the runtime preloaded and its options (SANITIZER_RUNTIME), or None where g++ has
    no such runtime."""
    runtime, options_variable, options = SANITIZER_RUNTIME[variant]
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None
    import subprocess

    # libstdc++ with it: ASan's __cxa_throw interceptor fails ("CHECK failed: real___cxa_throw") when
    # the first C++ exception comes from a library loaded after it (triton's, at import).
    found = [subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
             for name in (runtime, "libstdc++.so")]
    if not all(os.path.isabs(path) and os.path.exists(path) for path in found):
        return None
    return {"LD_PRELOAD": " ".join(found), options_variable: options}


def load(variant: str = "main", build_if_needed: bool = False):
    """The extension of `variant`: built now when build_if_needed, else only where a current
    build exists. Raises Unavailable (why) otherwise."""
    if variant in _LOADED:
        return _LOADED[variant]
    if build_if_needed:
        return build(variant)
    reason = stale_reason(variant)
    if reason is not None:
        raise Unavailable(impossible_reason() or reason)
    return _import(variant)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Builds the CUDA emulation extension (see the module docstring).")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    reason = impossible_reason()
    if reason is not None:
        print(f"[cuda-emulation] cannot build here: {reason}")
        return 0
    started = time.monotonic()
    build("main", verbose=not args.quiet)
    print(f"[cuda-emulation] main ready in {time.monotonic() - started:.1f}s: {build_dir('main')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
