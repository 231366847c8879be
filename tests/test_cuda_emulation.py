"""The CUDA emulation stage (tests/cuda_emulation, documented in its build.py): the rewrite, the
engine's checks on small right and wrong kernels, that the emulated backends really run the CUDA
launchers with tilings that follow the simulated device, and the mutation check: copies of the
kernels with a bug (rewrite.MUTANTS) must make the shared correctness suite fail.

The correctness of the CUDA kernels themselves is tested by tests/test_correctness.py, where the
emulated backends (cuda_emu-sm132-cpu, cuda_emu-sm1-cpu) join the parametrization."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import EMULATED_BACKENDS, assert_close_scaled, make_case, run_batchless, run_reference64
from cuda_emulation import backend, build, rewrite

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_emulation = pytest.mark.skipif(not EMULATED_BACKENDS, reason=f"{backend.unavailable_reason()}")


def test_requested_build_succeeded():
    """BATCHLESS_CUDA_EMULATION=1 (CI) asks for the stage: a failed build must fail, not skip."""
    error = backend.build_error()
    if backend.setting() != "1":
        pytest.skip(f"{build.ENV} is not 1 (the build is not required here)")
    reason = build.impossible_reason()
    if reason is not None:
        pytest.skip(reason)
    assert error is None, f"the CUDA emulation failed to build:\n{error}"
    assert EMULATED_BACKENDS, backend.unavailable_reason()


# ------------------------------------------------------------------------------------------------
# The rewrite (no compiler needed)
# ------------------------------------------------------------------------------------------------


def test_rewrite_of_the_cuda_sources(tmp_path):
    result = rewrite.rewrite_tree(tmp_path, "batchless_emulated")
    counts = result["counts"]
    assert set(counts) == {p.name for p in (rewrite.CSRC / "cuda").iterdir() if p.suffix in (".cu", ".cuh", ".cpp")}
    # the ops' registrations (one per file that has them, the host side's) and every launch and
    # __launch_bounds__ (the kernels')
    assert {name for name, c in counts.items() if c["library_impls"]} == {"batchless_norm_cuda.cpp",
                                                                          "batchless_nll_cuda.cpp"}
    assert all(c["library_impls"] <= 1 for c in counts.values()), counts
    for name in ("batchless_norm_kernels.cuh", "batchless_nll_kernels.cu"):
        assert counts[name]["launches"] >= 1 and counts[name]["launch_bounds"] >= 1, (name, counts[name])
    for path in result["sources"]:
        text = path.read_text()
        assert "<<<" not in text and "__shared__" not in text and "batchless_kernels, CUDA" not in text
    ops = (tmp_path / "ops.cpp").read_text()
    assert "TORCH_LIBRARY(batchless_emulated," in ops and "PyInit" not in ops
    # line numbers are kept, so that messages point into csrc/
    original = (rewrite.CSRC / "cuda" / "batchless_norm_kernels.cuh").read_text().splitlines()
    rewritten = (tmp_path / "cuda" / "batchless_norm_kernels.cuh").read_text().splitlines()[2:]
    assert len(rewritten) == len(original)


def test_rewrite_forms():
    text, counts = rewrite.rewrite_cuda(
        "__global__ void __launch_bounds__(128, 2) k(float* p) {\n"
        "  __shared__ float a[4][8];\n"
        "  extern __shared__ __align__(16) unsigned char raw[];\n}\n"
        "void f(float* p) { k<<<dim3(2, 3), 128, 64, s>>>(p); g<T, 4><<<1, 2>>>(p); }\n",
        display_path="x.cu", library="lib")
    assert counts["launches"] == 2 and counts["static_shared"] == 1 and counts["extern_shared"] == 1
    assert 'k(float* p) { EMU_LAUNCH_BOUNDS(128, 2);' in text
    assert '::emu::launch(k, "k at " __FILE__ ":" EMU_STR(__LINE__), dim3(2, 3), 128, 64, s)(p)' in text
    assert '::emu::launch(g<T, 4>, ' in text
    assert "unsigned char* const raw = ::emu::dynamic_shared<unsigned char>(16);" in text
    with pytest.raises(rewrite.RewriteError, match="__shared__ left"):
        rewrite.rewrite_cuda("__shared__ float a[4] = {0};\n", display_path="x.cu", library="lib")


def test_mutants_apply_to_the_sources(tmp_path):
    """Every mutant still finds its place in csrc/cuda (a change there must update rewrite.MUTANTS)."""
    assert rewrite.rewrite_tree(tmp_path, "lib", mutants=True)["mutants"]


# ------------------------------------------------------------------------------------------------
# The engine, on small kernels (tests/cuda_emulation/selftest.cu)
# ------------------------------------------------------------------------------------------------

ENGINE_ERRORS = {
    "divergent_barrier": r"different __syncthreads\(\).*selftest.cu:35.*selftest.cu:37",
    "barrier_after_exit": r"63 threads wait at __syncthreads\(\).* after 1 threads exited",
    "shuffle_exited_lane": r"names lane 31, which has exited",
    "shuffle_caller_not_in_mask": r"__shfl_sync with mask 0x0000ffff, which does not name the calling lane 16",
    "shuffle_reads_outside_mask": r"reads lane 16, which is not in the mask",
    "shuffle_partial_warp": r"names lane 16, which the block \(48 threads\) does not have",
    "collective_mismatch": r"__shfl_xor_sync.*lane 1 of its mask waits at __shfl_down_sync",
    "too_much_dynamic_shared": r"65536 bytes of dynamic shared memory",
    "too_many_threads": r"invalid configuration argument: block dimensions",
    "grid_y_too_large": r"invalid configuration argument: grid dimensions",
    "launch_bounds": r"256 threads per block, more than its __launch_bounds__\(128\)",
    "unchecked_launch": r"not followed by C10_CUDA_KERNEL_LAUNCH_CHECK",
}


@pytest.fixture(scope="module")
def ext():
    if not EMULATED_BACKENDS:
        pytest.skip(backend.unavailable_reason())
    return backend.extension()


@pytest.mark.parametrize("name", sorted(ENGINE_ERRORS))
def test_engine_rejects(ext, name):
    with pytest.raises(RuntimeError, match=ENGINE_ERRORS[name]):
        ext.run_selftest(name)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "alternate"])
def test_engine_runs_right_kernels(ext, schedule):
    ext.configure(schedule=schedule)
    try:
        assert ext.run_selftest("block_sum") == [32640.0] * 3  # sum of 0..255 per block
        lanes = torch.tensor(ext.run_selftest("collectives")).view(32, 4)
        i = torch.arange(32, dtype=torch.float64)
        assert torch.equal(lanes[:, 0], torch.full((32,), 3.0, dtype=torch.float64))  # __shfl_sync(v, 3)
        assert torch.equal(lanes[:, 1], torch.where(i >= 1, i - 1, i))  # __shfl_up_sync(v, 1)
        assert torch.equal(lanes[:, 2], (i.long() ^ 1).double())  # __shfl_xor_sync(v, 1)
        assert lanes[:, 3].eq(1).all()  # __ballot_sync of the odd lanes
        # every built-in index of a 3-D grid of 3-D blocks
        assert ext.run_selftest("indices") == [float(b * 1000 + t) for b in range(12) for t in range(24)]
        assert ext.run_selftest("dynamic_shared")[0] == 2.5
    finally:
        ext.configure()


def test_shared_memory_is_fresh_and_poisoned(ext):
    """Block 0 writes buf[0]; block 1 must not see it, and no block sees what none of its threads wrote."""
    out = ext.run_selftest("stale_shared")
    assert out[0] == 1.0 and all(v != v for v in out[1:]), out  # NaN != NaN


# ------------------------------------------------------------------------------------------------
# The emulated backends run the CUDA launchers, with tilings that follow the device
# ------------------------------------------------------------------------------------------------


@needs_emulation
@pytest.mark.parametrize("shape, layout", [((8, 6, 33, 35), "contiguous"), ((8, 70, 5, 7), "channels_last")], ids=str)
def test_emulated_backends_run_the_cuda_launchers(ext, shape, layout):
    x, mean, std_param, weight, bias = make_case(shape, layout, torch.float32, "cpu", "log")
    grad_y = torch.randn(shape)
    ref = run_reference64(x, mean, std_param, weight, bias, grad_y=grad_y)
    grids = {}
    for case in EMULATED_BACKENDS:
        ext.reset_stats()
        with backend.activate(case) as mode:
            out = run_batchless(x, mean, std_param, weight, bias, backend=case.name, grad_y=grad_y)
        # a training step: the fused training forward, then the fused training backward
        assert set(mode.calls) == {"batchless_norm_train_forward", "batchless_norm_train_backward"}, mode.calls
        stats = ext.stats()
        assert stats["launches"] >= 4 and stats["barriers"] > 0 and stats["collectives"] > 0, stats
        grids[case.id] = [(kernel.split(" at ")[0], grid) for kernel, grid, *_ in ext.launch_log()]
        for name in ("y", "nll", "x", "mean", "std_param", "weight", "bias"):
            assert_close_scaled(out[name], ref[name], 1e-5, 1e-5, what=f"{case.id} {name}")
    # the simulated SM count reaches the launchers' tiling
    assert len(set(map(str, grids.values()))) == len(grids), grids


@needs_emulation
@pytest.mark.parametrize("shape, layout, kernel", [((2, 3, 4, 8), "contiguous", "channels_first_kernel"),
                                                   ((5, 24), "contiguous", "channels_last_kernel")], ids=str)
def test_misaligned_inputs_use_the_widest_access(ext, shape, layout, kernel):
    """bf16 x and grad_y 0, 1, 2 or 4 elements into their buffers: the kernels (V = 8 elements a pack)
    move them 8, 1, 2 and 4 elements (16, 2, 4 and 8 bytes) per access, and every result has the
    same bits (test_correctness.py::test_misaligned_inputs checks the values)."""
    import re
    from test_correctness import _at_offset

    x, mean, std_param, weight, bias = make_case(shape, layout, torch.bfloat16, "cpu", "log")
    grad_y = torch.randn(shape).to(torch.bfloat16)
    case = EMULATED_BACKENDS[0]
    results = {}
    for offset, width in ((0, 8), (1, 1), (2, 2), (4, 4)):
        ext.reset_stats()
        with backend.activate(case):
            results[offset] = run_batchless(_at_offset(x, offset), mean, std_param, weight, bias, backend=case.name,
                                            grad_y=_at_offset(grad_y, offset))
        instances = [record[4] for record in ext.launch_log() if record[4].startswith(f"void batchless_kernels::{{anonymous}}::{kernel}")]
        widths = {int(m.group(1)) for i in instances for m in [re.search(r"; int V = 8; int W = (\d+);", i)] if m}
        assert len(instances) >= 2 and widths == {width}, (offset, instances)
    for offset in (1, 2, 4):
        for name, value in results[offset].items():
            if value is not None:
                assert torch.equal(value, results[0][name]), (offset, name)


@needs_emulation
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape, layout", [((3, 5, 17), "contiguous"), ((7, 13), "contiguous"),
                                           ((4, 6, 3, 5), "channels_last"), ((700, 2, 33), "contiguous"),
                                           ((2, 3, 131, 129), "contiguous")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_schedules(ext, seed, shape, layout, dtype):
    """The kernels under thread orders drawn at random for every scheduler pass (the suite's
    alternating forward/reverse order shows a missing barrier; these show other interleavings)."""
    from test_correctness import check_against_reference
    from conftest import TOLS

    case = EMULATED_BACKENDS[seed % len(EMULATED_BACKENDS)]
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, "cpu", "abs")
    with backend.activate(case):
        ext.configure(sm_count=case.sm_count, blocks_per_sm=case.blocks_per_sm, schedule="random", seed=seed)
        check_against_reference(case, x, mean, std_param, weight, bias, atol=TOLS[dtype][0], rtol=TOLS[dtype][1],
                                parametrization="abs")
        assert ext.settings()["schedule"] == "random"


# ------------------------------------------------------------------------------------------------
# Mutation check: the suite must catch deliberate bugs in the CUDA kernels
# ------------------------------------------------------------------------------------------------

# What the child suite runs of test_correctness per mutant: -x stops at the first failure.
MUTANT_SELECTION = "cuda_emu-sm132 and (test_matrix or test_shapes_layouts)"
# Narrower for mutants that only the shapes with the most partials per channel show, which come last
# in it (reduce_load: ~50 s of CI into MUTANT_SELECTION, and caught by (1, 1, 139264)).
MUTANT_SELECTIONS = {"reduce_load": "cuda_emu-sm132 and test_shapes_layouts and 139264"}


def _run_correctness_suite(mutant: str, selection: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env[backend.MUTANT_ENV] = mutant
    env[backend.DEVICES_ENV] = "132:0"  # what `selection` names
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_correctness.py", "-x", "-q", "-p", "no:cacheprovider",
         "-k", selection],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("mutant", [m.name for m in rewrite.MUTANTS if not m.sanitizer])
def test_suite_catches_mutant(ext, mutant):
    """The suite fails on the kernels with the bug `mutant` (rewrite.MUTANTS says what it breaks)."""
    run = _run_correctness_suite(mutant, MUTANT_SELECTIONS.get(mutant, MUTANT_SELECTION))
    output = run.stdout + run.stderr
    failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", output, re.M)
    print(f"mutant {mutant} ({rewrite.MUTANTS_BY_NAME[mutant].what}): caught by {failed[:1]}")
    assert run.returncode == 1 and failed, f"mutant {mutant} was not caught:\n{output[-3000:]}"


def test_suite_passes_with_no_mutant(ext):
    """The same selection passes with every mutant off: the failures above come from the bugs, not
    from the switches or the child process."""
    run = _run_correctness_suite("none", "cuda_emu-sm132 and test_matrix and float32")
    assert run.returncode == 0 and " passed" in run.stdout, (run.stdout + run.stderr)[-3000:]


# ------------------------------------------------------------------------------------------------
# Sanitizers: AddressSanitizer (no access outside the tensors) and ThreadSanitizer (no race between
# the threads of a block), each on the mutant sources compiled with it, in a child process started
# with its runtime preloaded
# ------------------------------------------------------------------------------------------------

# Every shape and layout of test_shapes_layouts in float32 (once each, with weight and bias), and the
# misaligned inputs' narrower accesses, on the 132-SM device (under ASan the fibers run ~10x slower:
# the whole selection of the mutation check took 13 minutes); TSan also runs the options of
# test_matrix (~5 s there). Float32 and bfloat16 only: the dtypes these variants compile
# (build.SANITIZER_SKIPS). Without (300, 2100), the largest shape by far (630k elements, ~5x the
# next): its channel blocks (C > 2048) are covered by (3, 2053) and (2, 2053, 3, 3), and CI stays
# under 30 minutes.
ONE_PER_SHAPE = "(test_shapes_layouts and float32 and not 2100)"
SANITIZED_DTYPES = "(float32 or bfloat16)"
SANITIZER_SELECTION = f"cuda_emu-sm132 and ({ONE_PER_SHAPE} or (test_misaligned_inputs and {SANITIZED_DTYPES}))"
TSAN_SELECTION = (f"cuda_emu-sm132 and ({ONE_PER_SHAPE} or ((test_matrix or test_misaligned_inputs) "
                  f"and {SANITIZED_DTYPES}))")
SANITIZERS = {"asan": "address", "tsan": "thread"}


def _sanitizer_environment(variant: str) -> dict:
    if not EMULATED_BACKENDS:
        pytest.skip(backend.unavailable_reason())
    environment = build.sanitizer_environment(variant)
    if environment is None:
        pytest.skip(f"the C++ compiler has no {build.SANITIZER_RUNTIME[variant][0]} runtime")
    return environment


@pytest.fixture(scope="module")
def asan_environment():
    return _sanitizer_environment("asan")


@pytest.fixture(scope="module")
def tsan_environment():
    return _sanitizer_environment("tsan")


def _run_under_sanitizer(variant: str, environment: dict, mutant: str, log_dir: pathlib.Path,
                         schedule: str = "alternate", selection: str = SANITIZER_SELECTION) -> tuple[int, str, str]:
    """`selection` of the correctness suite on the sanitizer variant (built by the child
    where missing: it loads only into a process started with the sanitizer's runtime): (return code,
    pytest's output, the sanitizer's reports). The reports go to files: pytest's capture would
    swallow what a dying process wrote to its stderr."""
    options_variable = build.SANITIZER_RUNTIME[variant][1]
    env = {**os.environ, **environment, backend.SANITIZER_ENV: SANITIZERS[variant], backend.MUTANT_ENV: mutant,
           build.ENV: "1", backend.SCHEDULE_ENV: schedule,
           backend.DEVICES_ENV: "132:0",  # what the selections name
           "OMP_NUM_THREADS": "1"}  # a core each: the runs go two at a time (sanitizer_runs)
    env[options_variable] += f":log_path={log_dir / variant}"
    env.pop("PYTEST_ADDOPTS", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_correctness.py", "-x", "-q", "-p", "no:cacheprovider",
         "-k", selection],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    reports = "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob(f"{variant}*")))
    return run.returncode, run.stdout + run.stderr, reports


# Mutants whose race the values do not show in the forward order: block_sum's second call writes
# the warps' sums over the first call's, with no barrier after warp 0 read them; in index order warp
# 0 reads before the other warps write, so every value is right (the suite's alternating schedule,
# with a lagging warp, catches it by value: test_suite_catches_mutant).
RACE_MUTANTS = ("reuse_barrier",)
# Contiguous inputs of test_shapes_layouts: their second stages call block_sum twice.
RACE_SELECTION = "cuda_emu-sm132 and test_shapes_layouts and float32 and contiguous and not 2100"

# Every child run under a sanitizer: (the test that reads it, variant, mutant, schedule, selection),
# the clean runs first (the longest: each child builds its variant before it runs).
SANITIZER_RUNS = (
    [("test_kernels_clean_under_asan", "asan", "none", "alternate", SANITIZER_SELECTION),
     ("test_kernels_race_free_under_tsan", "tsan", "none", "alternate", TSAN_SELECTION)]
    + [("test_asan_catches_mutant", "asan", m.name, "alternate", SANITIZER_SELECTION)
       for m in rewrite.MUTANTS if m.sanitizer == "address"]
    + [("test_tsan_catches_race_the_values_miss", "tsan", m, "forward", RACE_SELECTION) for m in RACE_MUTANTS])


@pytest.fixture(scope="module")
def sanitizer_runs(request, tmp_path_factory):
    """The SANITIZER_RUNS of the selected tests, started together on first use, two child processes
    at a time, one per core of a CI machine (one after another, the clean runs took 185 + 112 s with
    their builds, and the mutants' runs then used one core). Started with the module's first test
    instead (for the builds to overlap the mutation check and the other worker's files), the two CI
    runs that tried it took 768 and 839 s of pytest in their first stage against 661 before (other
    changes came with it, and the VM's speed varies by the hour): not kept.
    Futures of _run_under_sanitizer's result by (variant, mutant); none where the sanitizer is
    missing (its tests then skip through their environment fixture)."""
    selected = {item.originalname for item in request.session.items}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    environments = {}
    runs = {}
    for test, variant, mutant, schedule, selection in SANITIZER_RUNS:
        if test not in selected or not EMULATED_BACKENDS:
            continue
        if variant not in environments:
            environments[variant] = build.sanitizer_environment(variant)
        if environments[variant] is not None:
            runs[variant, mutant] = pool.submit(_run_under_sanitizer, variant, environments[variant], mutant,
                                                tmp_path_factory.mktemp(f"{variant}-{mutant}"), schedule, selection)
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


def test_kernels_clean_under_asan(asan_environment, sanitizer_runs):
    """The kernel variants of every shape and layout, under AddressSanitizer: no access outside the
    tensors (the value checks cannot see a read past the end whose value goes unused)."""
    returncode, output, reports = sanitizer_runs["asan", "none"].result()
    print(output.strip().splitlines()[-1] if output.strip() else "(no output)")
    # (the reports hold ASan's warnings about fibers too: swapcontext and longjmp between stacks)
    assert returncode == 0 and " passed" in output and "ERROR: AddressSanitizer" not in reports, (
        output[-2000:], reports[:4000])


@pytest.mark.parametrize("mutant", [m.name for m in rewrite.MUTANTS if m.sanitizer == "address"])
def test_asan_catches_mutant(asan_environment, sanitizer_runs, mutant):
    """A read past a tensor's end whose value goes unused passes every value check; under
    AddressSanitizer it fails."""
    returncode, output, reports = sanitizer_runs["asan", mutant].result()
    assert returncode != 0 and "ERROR: AddressSanitizer: heap-buffer-overflow" in reports, (
        f"mutant {mutant} ({rewrite.MUTANTS_BY_NAME[mutant].what}) was not caught:\n{output[-2000:]}\n{reports[:2000]}")


def test_kernels_race_free_under_tsan(tsan_environment, sanitizer_runs):
    """The kernel variants of every shape and layout, under ThreadSanitizer: no two warps of a block
    touch the same byte, one of them writing, without a barrier between them (in the order CUDA
    defines, not the order the fibers happened to run; lanes of one warp share a TSan thread)."""
    returncode, output, reports = sanitizer_runs["tsan", "none"].result()
    print(output.strip().splitlines()[-1] if output.strip() else "(no output)")
    assert returncode == 0 and " passed" in output and "ThreadSanitizer" not in reports, (
        output[-2000:], reports[:4000])


@pytest.mark.parametrize("mutant", RACE_MUTANTS)
def test_tsan_catches_race_the_values_miss(tsan_environment, sanitizer_runs, mutant):
    """With the threads run in index order the values are right, and ThreadSanitizer reports the race."""
    returncode, output, reports = sanitizer_runs["tsan", mutant].result()
    what = rewrite.MUTANTS_BY_NAME[mutant].what
    assert " passed" in output and " failed" not in output, f"mutant {mutant}: the values changed:\n{output[-2000:]}"
    assert "WARNING: ThreadSanitizer: data race" in reports and "block_reduce.cuh" in reports, (
        f"mutant {mutant} ({what}) was not caught:\n{output[-2000:]}\n{reports[:2000]}")


def test_a_killed_builds_lock_is_removed(tmp_path, capsys):
    """torch's cpp_extension waits for ever on the `lock` a killed build leaves: an old one goes, with
    a word; a fresh one (a build running now) stays."""
    lock = tmp_path / "lock"
    lock.write_text("")
    build._remove_stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    build._remove_stale_lock(tmp_path)
    assert not lock.exists()
    assert "did not finish" in capsys.readouterr().err
