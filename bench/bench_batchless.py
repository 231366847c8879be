"""Training benchmark of bk.batchless_norm (forward, backward, forward+backward, and inference under
no_grad) for every available backend, against F.batch_norm (eval mode for inference), torch.compile'd
F.batch_norm and a copy of the same bytes.

    python bench/bench_batchless.py [--full] [--device cpu|cuda] [--out DIR] [--shapes 256x64x32x32 ...]
        [--dtypes float32 bfloat16] [--layouts contiguous channels_last] [--budget SECONDS]

Writes results.csv, summary.md and fwd_bwd.png into a new bench/runs/<device-slug>/<time>/, or with
--update-reference into bench/results/<device-slug>/ (see docs/benchmarks.md and bench/README.md).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import importlib.metadata
import itertools
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

# CPU allocator regime. A training loop allocates the same large outputs every step. glibc returns
# blocks above its mmap threshold to the OS on free, so every step page-faults them in again (about
# 10 ms per 64 MB on the 2-core VM: more than the kernels themselves, for every implementation
# alike). PyTorch's CUDA allocator caches blocks; to time CPU kernels in that same steady state the
# benchmark re-executes itself with glibc tunables that keep freed blocks in the heap, unless
# GLIBC_TUNABLES is already set or --default-allocator is given. The CSV records the setting
# (malloc_env).
STEADY_STATE_MALLOC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
if __name__ == "__main__":
    from _allocator import reexec_with_glibc_tunables

    reexec_with_glibc_tunables(STEADY_STATE_MALLOC)

import numpy as np
import torch
import torch.nn.functional as F

import batchless_kernels as bk
from batchless_kernels import _cli

BENCH_DIR = Path(__file__).resolve().parent
PASSES = ("fwd", "bwd", "fwd+bwd", "infer")
# The bytes each pass must move at least, in units of x's size (the (C,) parameters are
# negligible): fwd reads x, writes y; bwd reads grad_y and x (x for dweight: the benchmark is
# affine), writes dx; fwd+bwd is the sum; infer (the forward under no_grad; BatchNorm in eval mode,
# with its running statistics) reads x, writes y; the copy reads and writes x once.
BYTES_PER_X = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "infer": 2, "copy": 2}

# (device type, --full) -> shapes. The CPU default must stay under 5 minutes on 2 cores; it holds the
# acceptance shape (256, 64, 32, 32) and the CPU targets of the training step's floor (issue 12:
# (64, 256, 14, 14) bfloat16, (4096, 1024) float32, and (32, 256) for the host's work per call); the
# CUDA default is the GPU target set. --full adds rows narrower than a vector (3 channels, as images
# have; planes of 2 x 2), which the CPU kernels walk as wide channels.
GPU_TARGETS = [(256, 64, 56, 56), (256, 256, 28, 28), (256, 1024, 14, 14), (65536, 1024), (32, 256),
               (64, 256, 7, 7)]
NARROW = [(32, 3, 128, 128), (4096, 64, 2, 2)]
SHAPES = {
    ("cpu", False): [(256, 64, 32, 32), (64, 256, 14, 14), (4096, 1024), (32, 256)],
    ("cpu", True): [(128, 64, 56, 56), (256, 64, 32, 32), (64, 256, 28, 28), (32, 1024, 14, 14),
                    (64, 128, 16, 16), (16384, 1024), (32, 256)] + NARROW,
    ("cuda", False): GPU_TARGETS,
    ("cuda", True): GPU_TARGETS + [(256, 64, 32, 32), (8192, 1024)] + NARROW,
}
DTYPES = {False: ("float32", "bfloat16"), True: ("float32", "bfloat16", "float16")}
LAYOUTS = ("contiguous", "channels_last")
MIN_REPS = 5  # slow baselines (the reference) get this few; p20/p80 still mean something
MAX_REPS = 500
ROUNDS = 3


# ---------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def cpu_isa() -> str:
    """The vector ISA of batchless_kernels' CPU kernels as built (csrc/ops.cpp): AVX512_BF16, AVX512,
    AVX2 or DEFAULT; "" without the extension. Their speed depends on it more than on the CPU model."""
    try:
        from batchless_kernels import _C
    except ImportError:
        return ""
    return getattr(_C, "cpu_capability", "")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_info(device: torch.device) -> dict:
    try:
        triton_version = importlib.metadata.version("triton")  # no import: CPU machines may lack it
    except importlib.metadata.PackageNotFoundError:
        triton_version = ""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    isa = cpu_isa()
    return {
        "device_name": name,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "cudnn_version": cudnn or "",
        "triton_version": triton_version,
        "num_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # On CPU the allocator decides whether each fresh output pays page faults (see bench/README.md).
        "malloc_env": " ".join(f"{k}={os.environ[k]}" for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if os.environ.get(k)),
        "cpu_isa": isa,
        # On CPU one folder per CPU model, kernel ISA and thread count.
        "slug": slug(name) if device.type == "cuda" else "-".join(
            filter(None, [slug(name), slug(isa), f"{torch.get_num_threads()}threads"])),
    }


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all cores spent busy, CPU seconds of this process and of its children waited for,
    such as torch.compile's compilers) so far; None off Linux."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system + own.children_user + own.children_system)


def other_load(before, after, wall_s) -> float | None:
    """Cores kept busy by other processes (and the hypervisor) over wall_s: on a shared machine
    anything well above 0 means the timings of that case are not to be trusted."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall_s)


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes) or 32 * 2**20


# ---------------------------------------------------------------- inputs and implementations


class Case:
    """One (shape, dtype, layout): rotating sets of (x, grad_y) so that tensors smaller than ~2x the
    last-level cache are not timed from cache (at most 8 sets: below a quarter of the cache they
    still are), and the (C,) parameters (fp32, as under AMP)."""

    def __init__(self, shape, dtype, layout, device, cache_bytes):
        self.shape, self.dtype, self.layout = shape, dtype, layout
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        self.x_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        n_sets = min(8, max(1, math.ceil(2 * cache_bytes / self.x_bytes)))

        def randn():
            return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

        self.sets = [(randn().requires_grad_(), randn()) for _ in range(n_sets)]
        channels = shape[1]

        def param():
            return torch.randn(channels, device=device).requires_grad_()

        self.mean, self.std_param, self.weight, self.bias = param(), param(), param(), param()
        self.running_mean = torch.zeros(channels, device=device)
        self.running_var = torch.ones(channels, device=device)
        self.one = torch.ones((), device=device)  # grad of the nll

    def cycle(self):
        return itertools.cycle(self.sets)


def batchless_forward(backend):
    def forward(x, case):
        y, nll = bk.batchless_norm(x, case.mean, case.std_param, case.weight, case.bias, backend=backend)
        return (y, nll), (x, case.weight, case.bias, case.mean, case.std_param)

    return forward


def batch_norm_training(x, running_mean, running_var, weight, bias):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training=True)


def batch_norm_eval(x, case):
    """BatchNorm's inference: the running statistics, no batch reduction."""
    return F.batch_norm(x, case.running_mean, case.running_var, case.weight, case.bias, training=False)


def batchnorm_forward(fn):
    def forward(x, case):
        return (fn(x, case.running_mean, case.running_var, case.weight, case.bias),), (x, case.weight, case.bias)

    return forward


@functools.cache
def compiled_batch_norm():
    # One compiled function with dynamic shapes: dynamo recompiles once per (dtype, layout, rank)
    # guard, not per shape. Raise the recompile limit so it never silently falls back to eager.
    torch._dynamo.config.recompile_limit = 64
    return torch.compile(batch_norm_training, dynamic=True)


def batchnorm_backend_used(case) -> str:
    """Which kernel F.batch_norm runs (cuDNN, MIOpen or native), as torch's own dispatch decides it
    (torch._C._select_batch_norm_backend, in torch 2.11 to 2.14). Not read off a profiler: the first
    --cuda-graphs run, which captured graphs after such a profiler run, ended in an illegal memory
    access, and profilers and CUDA graphs are known to fail together (pytorch/pytorch#75504)."""
    x = case.sets[0][0]
    if x.device.type != "cuda":
        return "native"
    backend = torch._C._select_batch_norm_backend(x, case.weight, case.bias, case.running_mean,
                                                  case.running_var, True, 1e-5)
    return str(backend).rsplit(".", 1)[-1].lower()  # _BatchNormBackend.Cudnn -> "cudnn"


def implementations(device: torch.device, case, wanted=None) -> dict:
    """impl name -> (backend_used, forward(x, case) -> (outputs, inputs to differentiate), infer(x, case)
    or None), for the names in `wanted` (None: all). A batchless layer infers with its training
    forward (the same function) under no_grad."""
    makers = {f"batchless-{name}": lambda name=name: (name, batchless_forward(name), batchless_forward(name))
              for name in bk.available_backends(device)}
    makers["batchnorm"] = lambda: (batchnorm_backend_used(case), batchnorm_forward(batch_norm_training),
                                   batch_norm_eval)
    makers["batchnorm-compiled"] = lambda: ("inductor", batchnorm_forward(compiled_batch_norm()), None)
    return {name: make() for name, make in makers.items() if wanted is None or name in wanted}


def pass_steps(forward, case, pass_name):
    """(setup, run) of a pass: setup is untimed and returns run's argument. The backward's setup
    runs a fresh forward, so the graph is never reused (no retain_graph). For "infer", forward is
    the implementation's inference function, run under no_grad."""
    sets = case.cycle()

    def grads(outputs, grad_y):
        return (grad_y,) + (case.one,) * (len(outputs) - 1)  # 1 for the nll

    def forward_and_grads():
        x, grad_y = next(sets)
        outputs, inputs = forward(x, case)
        return outputs, inputs, grads(outputs, grad_y)

    if pass_name == "fwd":
        return (lambda: next(sets)[0]), (lambda x: forward(x, case))
    if pass_name == "infer":
        return (lambda: next(sets)[0]), torch.no_grad()(lambda x: forward(x, case))
    if pass_name == "bwd":
        return forward_and_grads, (lambda state: torch.autograd.grad(*state))
    if pass_name == "fwd+bwd":
        return (lambda: None), (lambda _: torch.autograd.grad(*forward_and_grads()))
    raise ValueError(pass_name)


def stream_copy():
    """batchless_kernels._C.cpu_stream_copy, or None without the extension: x's bytes copied into a
    fresh output with the non-temporal stores the CPU kernels write outputs of the L3's size or more
    with. A plain store (copy_, clone) reads each line before it writes it, 3 passes of memory for the
    2 a copy counts: kernels that stream theirs would read as up to 150% of such a copy."""
    try:
        from batchless_kernels import _C
    except ImportError:
        return None
    return getattr(_C, "cpu_stream_copy", None)


def copy_steps(case, how):
    """The bandwidth ceiling, a copy of x's bytes: "copy_" into a preallocated dst; "clone", a fresh
    output (on CPU a fresh output costs page faults that every out-of-place implementation pays too);
    "stream", a fresh output written with non-temporal stores (stream_copy, CPU)."""
    pairs = itertools.cycle([(torch.empty_like(x), x.detach()) for x, _ in case.sets])
    if how == "clone":
        return (lambda: next(pairs)[1]), (lambda src: src.clone())
    if how == "stream":
        return (lambda: next(pairs)[1]), stream_copy()
    return (lambda: next(pairs)), (lambda pair: pair[0].copy_(pair[1]))


def captured(body, calls, stream=None):
    """((setup, run), calls): run replays one CUDA graph of body, which makes `calls` calls. Warm-up
    and capture run on `stream` (default: a new one), never on the default stream."""
    side = stream or torch.cuda.Stream()  # warm-up off the capture (compilation, workspaces, cuDNN plans)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        body()
    # The graph reads and writes the tensors body holds (inputs, saved forwards): run keeps them alive,
    # or the next capture's empty_cache() would hand their memory back to the driver.
    return ((lambda: None), (lambda _, keep=body: graph.replay())), calls


def graph_copy_steps(case):
    """The copy ceiling for graph replays: dst.copy_(src) for every input set in one graph."""
    pairs = [(torch.empty_like(x), x.detach()) for x, _ in case.sets]

    def body():
        for dst, src in pairs:
            dst.copy_(src)

    return captured(body, len(pairs))


def graph_steps(forward, case, pass_name):
    """(setup, run) replaying one CUDA graph that runs the pass once on every input set, and the
    number of sets it covers. Replays time the device work alone: eager calls also time the gaps
    while the host launches (autograd, dispatch), which hide behind other layers' kernels in a
    model but here would be counted as the kernels' time. The backward graph replays the backward
    of forwards run once before capture (retain_graph keeps their saved tensors)."""

    def grads(outputs, grad_y):
        return (grad_y,) + (case.one,) * (len(outputs) - 1)

    # Backward kernels run on the stream of their forward: the forwards of the backward graph run on
    # the capture stream, since a capture cannot take work from the default stream.
    stream = torch.cuda.Stream()
    if pass_name == "bwd":
        states = []
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for x, grad_y in case.sets:
                outputs, inputs = forward(x, case)
                states.append((outputs, inputs, grads(outputs, grad_y)))

        def body():
            for state in states:
                torch.autograd.grad(*state, retain_graph=True)
    elif pass_name in ("fwd", "infer"):
        @torch.no_grad() if pass_name == "infer" else (lambda f: f)
        def body():
            for x, _ in case.sets:
                forward(x, case)
    else:
        def body():
            for x, grad_y in case.sets:
                outputs, inputs = forward(x, case)
                torch.autograd.grad(outputs, inputs, grads(outputs, grad_y))

    return captured(body, len(case.sets), stream)


# ---------------------------------------------------------------- timing


def sample(setup, run, device, reps) -> list[float]:
    """Milliseconds of `reps` calls of run(setup()), setup untimed."""
    if device.type == "cuda":  # events time the GPU work of run only, not setup's
        events = []
        for _ in range(reps):
            state = setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(reps):
        state = setup()
        t0 = time.perf_counter()
        out = run(state)
        elapsed = time.perf_counter() - t0
        del out  # freed after the stop: the outputs' (and a forward's graph's) release is not the pass's time
        times.append(elapsed * 1e3)
    return times


def reps_for(setup, run, device, budget_s) -> int:
    """Warms up (first touch, compilation, allocator), then picks reps to take about budget_s."""
    sample(setup, run, device, 1)
    estimate = min(sample(setup, run, device, 2))
    return int(min(MAX_REPS, max(MIN_REPS, budget_s * 1e3 / max(estimate, 1e-3))))


def measure_all(tasks, device, budget_s) -> dict:
    """tasks: key -> (setup, run). Returns key -> list of ms, or the exception it raised. The reps
    are taken in ROUNDS interleaved rounds, so that a burst of load from other processes (a shared
    machine) hits every implementation alike instead of one."""
    reps, results = {}, {}
    for key, (setup, run) in tasks.items():
        try:
            reps[key], results[key] = reps_for(setup, run, device, budget_s), []
        except Exception as exc:  # noqa: BLE001 - e.g. a torch.compile failure: record, go on
            results[key] = exc
    for _ in range(ROUNDS):
        for key, n in reps.items():
            if isinstance(results[key], list):
                try:
                    results[key] += sample(*tasks[key], device, math.ceil(n / ROUNDS))
                except Exception as exc:  # noqa: BLE001
                    results[key] = exc
    return results


def error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:200]


def copy_ceilings(rows) -> dict[str, float]:
    """timing -> the bandwidth ceiling of a case's rows: the fastest of its copies (pass "copy"). Into a
    preallocated dst the copy writes memory last touched a rotation of input sets ago; a clone, like
    every implementation's fresh output, gets the block freed last, which may still be cached: on the
    CPU at sizes the L3 holds, 1.5-2x faster. Past them, the copy with non-temporal stores (stream_copy)
    is the fastest: 1.3-1.5x at (4096, 1024) float32 on the 2-core VM."""
    ceilings: dict[str, float] = {}
    for r in rows:
        if r["pass"] == "copy" and "gbps" in r:
            ceilings[r["timing"]] = max(ceilings.get(r["timing"], 0.0), r["gbps"])
    return ceilings


def run_case(case, device, budget_s, impls=None, cuda_graphs=False) -> list[dict]:
    """Rows of one case: the copies, then every implementation and pass, timed eagerly and, with
    cuda_graphs, as CUDA-graph replays (column timing: "eager" or "cuda-graph")."""
    base = {"shape": "x".join(map(str, case.shape)), "dtype": str(case.dtype).removeprefix("torch."),
            "layout": case.layout}
    # (impl, backend_used, pass, timing) -> (setup, run); per_call: calls of the pass in one run
    tasks = {("copy", "copy_", "copy", "eager"): copy_steps(case, "copy_"),
             ("alloc+copy", "clone", "copy", "eager"): copy_steps(case, "clone")}
    if device.type == "cpu" and stream_copy() is not None:
        tasks[("stream-copy", "cpu_stream_copy", "copy", "eager")] = copy_steps(case, "stream")
    graphs = {}  # key -> () -> ((setup, run), calls)
    if cuda_graphs:
        graphs[("copy", "copy_", "copy", "cuda-graph")] = lambda: graph_copy_steps(case)
    for impl, (backend_used, forward, infer) in implementations(device, case, impls).items():
        for pass_name in PASSES:
            fn = infer if pass_name == "infer" else forward
            if fn is None:
                continue
            tasks[(impl, backend_used, pass_name, "eager")] = pass_steps(fn, case, pass_name)
            if cuda_graphs:
                graphs[(impl, backend_used, pass_name, "cuda-graph")] = functools.partial(
                    graph_steps, fn, case, pass_name)
    results = measure_all(tasks, device, budget_s)
    per_call = {}
    # One graph at a time: captured, timed, released (each holds its own outputs and memory pool).
    for key, make in graphs.items():
        try:
            task, per_call[key] = make()
        except Exception as exc:  # noqa: BLE001 - an implementation that cannot be captured
            results[key] = exc
            continue
        results.update(measure_all({key: task}, device, budget_s))
        del task
    rows = []
    for (impl, backend_used, pass_name, timing), result in results.items():
        row = {**base, "impl": impl, "backend_used": backend_used, "pass": pass_name, "timing": timing,
               "bytes": BYTES_PER_X[pass_name] * case.x_bytes}
        if isinstance(result, Exception):
            row["error"] = error_text(result)
        else:
            calls = per_call.get((impl, backend_used, pass_name, timing), 1)
            p20, median, p80 = np.percentile(result, [20, 50, 80]) / calls
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80, reps=len(result) * calls,
                       gbps=row["bytes"] / (median * 1e-3) / 1e9)
        rows.append(row)
    copy_gbps = copy_ceilings(rows)
    batchnorm_ms = {(r["pass"], r["timing"]): r.get("median_ms") for r in rows if r["impl"] == "batchnorm"}
    for row in rows:
        if "median_ms" in row and row["timing"] in copy_gbps:
            row["frac_of_copy"] = row["gbps"] / copy_gbps[row["timing"]]
            if batchnorm_ms.get((row["pass"], row["timing"])):
                row["speedup_vs_batchnorm"] = batchnorm_ms[(row["pass"], row["timing"])] / row["median_ms"]
    return rows


# ---------------------------------------------------------------- output

META_COLUMNS = ["device_name", "torch_version", "cuda_version", "cudnn_version", "triton_version",
                "num_threads", "git_commit", "timestamp", "malloc_env", "cpu_isa"]
COLUMNS = META_COLUMNS + ["impl", "backend_used", "pass", "timing", "shape", "dtype", "layout", "median_ms",
                          "p20_ms", "p80_ms", "reps", "bytes", "gbps", "frac_of_copy",
                          "speedup_vs_batchnorm", "other_load", "unreliable", "error"]

# A case's timings are marked unreliable (table, CSV, plot) when other processes kept more than this
# many cores busy during it, or when an implementation beat the same-run copy of its bytes by more
# than the copy's own noise: then the copy, the denominator, was slowed down.
MAX_OTHER_LOAD = 0.25
MAX_FRAC_OF_COPY = 1.05


def unreliable_reason(case_rows) -> str:
    """Why a case's numbers should not be trusted, or "" (see MAX_OTHER_LOAD, MAX_FRAC_OF_COPY)."""
    reasons = []
    load = case_rows[0].get("other_load")
    if isinstance(load, float) and load > MAX_OTHER_LOAD:
        reasons.append(f"other load {load:.2f} cores")
    over = [r for r in case_rows if r.get("frac_of_copy", 0) > MAX_FRAC_OF_COPY]
    if over:
        best = max(r["frac_of_copy"] for r in over)
        reasons.append(f"{100 * best:.0f}% of the copy bandwidth: the copy was slowed")
    return "; ".join(reasons)


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_csv(path: Path, rows, meta) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(v) for k, v in {**meta, **row}.items()})


def summary_markdown(rows, meta, wall_s) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["pass"] != "copy"))
    copy_impls = list(dict.fromkeys(r["impl"] for r in rows if r["pass"] == "copy" and r["timing"] == "eager"))
    cases = list(dict.fromkeys((r["shape"], r["dtype"], r["layout"]) for r in rows))
    by_key = {(r["shape"], r["dtype"], r["layout"], r["impl"], r["pass"], r["timing"]): r for r in rows}

    def cell(row):
        if "median_ms" not in row:
            return "failed" if row.get("error") else ""
        speedup = row.get("speedup_vs_batchnorm")
        return f"{row['median_ms']:.3g} ms ({speedup:.2f}x, {100 * row['frac_of_copy']:.0f}%)" if speedup else \
            f"{row['median_ms']:.3g} ms ({100 * row['frac_of_copy']:.0f}%)"

    def device_cell(case, impl):  # fwd+bwd as cell(), then the fwd and bwd shares of the copy
        fwd, bwd = (by_key.get((*case, impl, p, "cuda-graph"), {}).get("frac_of_copy") for p in ("fwd", "bwd"))
        shares = f"; fwd {100 * fwd:.0f}%, bwd {100 * bwd:.0f}%" if fwd and bwd else ""
        return cell(by_key.get((*case, impl, "fwd+bwd", "cuda-graph"), {})) + shares

    def gbps(case, impl, timing="eager"):
        return f"{by_key.get((*case, impl, 'copy', timing), {}).get('gbps', float('nan')):.1f}"

    def head(*extra):
        return ["| shape | dtype | layout | " + " | ".join(impls + list(extra)) + " |",
                "|---|---|---|" + "---|" * (len(impls) + len(extra))]

    lines = [
        f"# batchless_norm training benchmark: {meta['device_name']}",
        "",
        f"torch {meta['torch_version']}, CUDA {meta['cuda_version'] or '-'}, cuDNN {meta['cudnn_version'] or '-'}, "
        f"triton {meta['triton_version'] or '-'}, {meta['num_threads']} threads, commit {meta['git_commit'] or '-'}, "
        f"{meta['timestamp']}, run took {wall_s:.0f} s, malloc env: {meta['malloc_env'] or 'none'}, CPU kernels "
        f"built for {meta['cpu_isa'] or '-'}.",
        "",
        "Forward+backward median time per implementation, called eagerly (on a GPU: device time from the "
        "first launch to the last, host launch gaps included); in brackets the speedup over batchnorm and the "
        "share of the copy bandwidth (bytes model: 5 x size of x; the fastest of the copies measured in the "
        "same run: into a preallocated tensor; with a fresh output, alloc+copy; on the CPU with non-temporal "
        "stores too, stream-copy, as the CPU kernels write large outputs). "
        "Other load: cores kept busy by other processes during the case. A case is marked unreliable when "
        f"that exceeds {MAX_OTHER_LOAD} cores, or when an implementation reached more than "
        f"{100 * MAX_FRAC_OF_COPY:.0f}% of the copy bandwidth (the copy itself was slowed).",
        "",
        *head(f"copy GB/s ({', '.join(copy_impls[1:])})", "other load", "unreliable"),
    ]
    for case in cases:
        cells = [cell(by_key.get((*case, impl, "fwd+bwd", "eager"), {})) for impl in impls]
        copies = f"{gbps(case, 'copy')} ({', '.join(gbps(case, impl) for impl in copy_impls[1:])})"
        load = by_key[(*case, "copy", "copy", "eager")].get("other_load", "")
        why = by_key[(*case, "copy", "copy", "eager")].get("unreliable", "")
        lines.append(f"| {' | '.join(case)} | " + " | ".join(cells) + f" | {copies} | {fmt(load)} | {why} |")
    def section(title, text, extra, row_cells):  # a table of its own: a row per case
        lines.extend(["", f"## {title}", "", text, "", *head(*extra)])
        lines.extend(f"| {' | '.join(case)} | " + " | ".join(row_cells(case)) + " |" for case in cases)

    if any(r["pass"] == "infer" for r in rows):
        section("Inference (no_grad)",
                "The forward under torch.no_grad(), called eagerly: batchless layers compute the same function as in "
                "training, batchnorm runs in eval mode (running statistics). Cells: median (speedup over batchnorm, "
                "share of the copy bandwidth; bytes model: 2 x size of x).", (),
                lambda case: [cell(by_key.get((*case, impl, "infer", "eager"), {})) for impl in impls])
    if any(r["timing"] == "cuda-graph" for r in rows):
        section("Device time (CUDA-graph replays)",
                "The same passes captured in a CUDA graph over every input set and replayed: the kernels' time "
                "alone, without the host's launch gaps. Cells: forward+backward median (speedup over batchnorm, "
                "share of the copy bandwidth); the forward's share (bytes: 2 x x) and the backward's (3 x x) "
                "of the graph-replayed copy's bandwidth.", ("copy GB/s",),
                lambda case: [device_cell(case, impl) for impl in impls] + [gbps(case, "copy", "cuda-graph")])
    errors = {(r["impl"], r["timing"], r["error"]) for r in rows if r.get("error")}
    lines += [""] + [f"- {impl} ({timing}) failed: {error}" for impl, timing, error in sorted(errors)]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv):
    # allow_abbrev=False: _allocator.py looks for --default-allocator before parsing, spelled out
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--full", action="store_true", help="wider sweep of shapes, float16 too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, help="output folder (default: a new bench/runs/<device-slug>/<time>/, "
                                                 "untracked)")
    parser.add_argument("--update-reference", action="store_true",
                        help="write the committed reference results, bench/results/<device-slug>/ (which the "
                             "docs quote), and on a GPU batchless_kernels/gpu_choice.json")
    parser.add_argument("--shapes", nargs="+", type=_cli.shape, help="shapes such as 256x64x32x32 32x256")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--impls", help="comma-separated implementations to time (default all available: "
                                             "batchless-<backend>, batchnorm, batchnorm-compiled); the copies "
                                             "are always timed, and speedups need batchnorm")
    parser.add_argument("--budget", type=_cli.positive(float), help="seconds per measurement (default 0.5 cpu, 0.2 cuda)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time every pass as CUDA-graph replays (device time without the host's launch "
                             "gaps; see docs/benchmarks.md)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep glibc's default malloc settings (see STEADY_STATE_MALLOC)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.cuda_graphs and args.device != "cuda":
        sys.exit("--cuda-graphs: CUDA graphs need --device cuda")
    device = torch.device(args.device)
    shapes = args.shapes or SHAPES[(device.type, args.full)]
    dtypes = [getattr(torch, d) for d in (args.dtypes or DTYPES[args.full])]
    budget = args.budget or (0.2 if device.type == "cuda" else 0.5)
    impls = None
    if args.impls:
        impls = set(args.impls.split(","))
        known = {f"batchless-{b}" for b in bk.available_backends(device)} | {"batchnorm", "batchnorm-compiled"}
        if not impls <= known:
            sys.exit(f"--impls: unknown or unavailable here: {sorted(impls - known)}; available: {sorted(known)}")
    cases = [(shape, dtype, layout) for shape, dtype in itertools.product(shapes, dtypes)
             for layout in args.layouts if len(shape) == 4 or layout == "contiguous"]
    if not cases:
        sys.exit(f"no case to measure: --layouts {' '.join(args.layouts)} applies to 4-D shapes only, and the "
                 f"shapes are {' '.join('x'.join(map(str, s)) for s in shapes)}")
    if args.update_reference and args.out:
        sys.exit("--update-reference writes bench/results/<device-slug>/: it takes no --out")
    meta = machine_info(device)
    if args.update_reference:
        out = BENCH_DIR / "results" / meta["slug"]
    else:
        out = args.out or BENCH_DIR / "runs" / meta["slug"] / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(f"[bench] results will be written to {out}", flush=True)
    cache_bytes = last_level_cache_bytes(device)
    torch.manual_seed(0)
    print(f"{meta['device_name']}: backends {bk.available_backends(device)}, {meta['num_threads']} threads", flush=True)

    start, rows = time.perf_counter(), []
    for shape, dtype, layout in cases:
        case_start, busy_before = time.perf_counter(), busy_seconds()
        case_rows = run_case(Case(shape, dtype, layout, device, cache_bytes), device, budget, impls,
                             args.cuda_graphs)
        load = other_load(busy_before, busy_seconds(), time.perf_counter() - case_start)
        for row in case_rows:
            row["other_load"] = round(load, 2) if load is not None else ""
        why = unreliable_reason(case_rows)
        for row in case_rows:
            row["unreliable"] = why
        rows += case_rows
        write_csv(out / "results.csv", rows, meta)  # after every case: a run cut off keeps its rows
        times = {p: ", ".join(f"{r['impl']}{' (graph)' * (r['timing'] == 'cuda-graph')} {r['median_ms']:.3g}"
                              for r in case_rows if r["pass"] == p and "median_ms" in r)
                 for p in ("fwd+bwd", "infer")}
        print(f"[{time.perf_counter() - start:6.1f} s] {case_rows[0]['shape']} {case_rows[0]['dtype']} {layout}: "
              f"fwd+bwd ms {times['fwd+bwd']}; infer ms {times['infer']}; copy {case_rows[0].get('gbps', float('nan')):.1f} GB/s; other load {fmt(load)}"
              + (f"; UNRELIABLE: {why}" if why else ""), flush=True)
    wall_s = time.perf_counter() - start

    write_csv(out / "results.csv", rows, meta)
    summary = summary_markdown(rows, meta, wall_s)
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    (out / "fwd_bwd.png").unlink(missing_ok=True)  # a skipped plot must not leave an older run's
    try:
        from plot import plot  # bench/ is on sys.path when run as a script
    except ImportError as exc:
        print(f"no plot: {exc}")
    else:
        plot(out / "results.csv")
    print(f"results in {out}")
    if device.type == "cuda" and all(b in bk.available_backends(device) for b in ("cuda", "triton")):
        from derive_gpu_choice import main as derive_gpu_choice  # auto's cuda/triton table

        # auto's table is package data: rewritten only with --update-reference
        table = [] if args.update_reference else ["--out", str(out / "gpu_choice.json")]
        derive_gpu_choice([str(out / "results.csv"), *table])


if __name__ == "__main__":
    main()
