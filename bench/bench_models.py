"""Model-level training benchmark: a full training step (forward, loss, backward, SGD step) of
torchvision's ResNet-18 and timm's EfficientNet-B0 (random weights, no download) with their
BatchNorm layers as built, against the same model converted by `bk.convert_batchnorm` to batchless
layers on each available backend, eager and `torch.compile`d; plus the paper's memory argument:
the largest batch whose training step fits a memory budget, with BatchNorm (the whole batch in
memory at once) against batchless normalization processing it as micro-batches (exact gradients).

    python bench/bench_models.py                    # CPU: 64x64 images, batch 8 (~3 min on 2 cores)
    python bench/bench_models.py --full             # CPU: compile every model and variant too
    python bench/bench_models.py --device cuda      # GPU: 224x224 images, batch 128, bf16 autocast
    python bench/bench_models.py --models resnet18 --modes eager --image-size 32 --batch-size 4
    python bench/bench_models.py --update-reference # write bench/results/<device-slug>/models/

Needs torchvision and timm, which need the CUDA build of torch on the CPU machines (see
bench/README.md; `bash bench/run.sh --models` sets up such a venv, .venv-models).

Measured per case (`train_step` rows of results.csv):
  - images per second: batch size / median step time, over steps taking about --budget seconds
    after --warmup steps (the first of which compiles, in compiled mode; its time is first_step_s);
  - peak_step_mb: the memory a training step allocates on top of what the process holds between
    steps (weights, optimizer state, the input): on CUDA max_memory_allocated() during the timed
    steps minus memory_allocated() before them; on the CPU the peak resident set size during the
    timed steps (reset through /proc/self/clear_refs) minus the resident set size before them, with
    glibc told to return every freed block of 64 KiB or more to the OS at once (GLIBC_TUNABLES,
    set by re-executing this script), so that the resident set follows the live tensors.
    Gradients are set to None between steps, so they count as step memory.
Memory budget (`memory` rows): one step of the first model, eager, at each batch size of
--memory-batches: BatchNorm on the whole batch, batchless on the whole batch, and batchless as
micro-batches of --micro-batch with the loss of each scaled by its share (the gradient of the
whole batch, as examples/microbatch.py checks). The summary names the largest batch whose step
fits --memory-budget-mb for each.

Writes results.csv (long format: one row per case and measurement, with the machine facts),
summary.md and models.png into a new bench/runs/<device-slug>/<time>-models/ (or --out), or with
--update-reference into bench/results/<device-slug>/models/.
"""

from __future__ import annotations

import os
import sys

# CPU memory is read from the resident set size: glibc must give freed tensors back to the OS at
# once (mmap for blocks >= 64 KiB, heap trimmed above 128 KiB free), or the peak would stay at
# the first step's. Set before torch allocates anything, so this process re-executes itself.
MEASURE_MALLOC = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072"
if __name__ == "__main__":
    from _allocator import reexec_with_glibc_tunables

    reexec_with_glibc_tunables(MEASURE_MALLOC)

import argparse  # noqa: E402
import csv  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import batchless_kernels as bk  # noqa: E402
from batchless_kernels import _cli  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from bench_batchless import MAX_OTHER_LOAD, busy_seconds, fmt, machine_info, other_load  # noqa: E402

MODELS = ("resnet18", "efficientnet_b0", "resnet-tiny")
DEFAULT_MODELS = ("resnet18", "efficientnet_b0")
MODES = ("eager", "compiled")
# (device type) -> defaults: CPU sizes that keep the default run near 3 minutes on 2 cores; GPU: ImageNet.
DEFAULTS = {
    "cpu": dict(image_size=64, batch_size=8, budget=2.0, memory_batches=[4, 8, 16, 32], memory_budget_mb=64.0,
                dtype="float32", channels_last=False),
    "cuda": dict(image_size=224, batch_size=128, budget=2.0, memory_batches=[16, 32, 64, 128, 256, 512],
                 memory_budget_mb=16384.0, dtype="bfloat16", channels_last=True),
}
NUM_CLASSES = 1000
MIN_STEPS, MAX_STEPS = 3, 200

COLUMNS = [
    "experiment", "model", "norm", "backend", "mode", "image_size", "batch", "micro_batch", "dtype", "memory_format",
    "steps", "median_ms", "p20_ms", "p80_ms", "imgs_per_s", "speedup_vs_batchnorm", "peak_step_mb", "first_step_s",
    "other_load", "unreliable", "error",
    "device_name", "torch_version", "torchvision_version", "timm_version", "cuda_version", "triton_version",
    "num_threads", "git_commit", "timestamp", "malloc_env", "cpu_isa",
]


# ---------------------------------------------------------------- models


def have_model_libraries(models=MODELS) -> str | None:
    """None when the libraries that build `models` import (torchvision for the ResNets, timm for
    EfficientNet), else why not."""
    try:
        import torchvision  # noqa: F401

        if "efficientnet_b0" in models:
            import timm  # noqa: F401
    except Exception as exc:  # torchvision's ops fail to register on the CPU build of torch
        return f"{type(exc).__name__}: {exc}"
    return None


def unfuse_norm_act(module: nn.Module) -> nn.Module:
    """timm's BatchNormAct2d is a BatchNorm2d whose forward also applies dropout and an activation,
    which convert_batchnorm leaves alone (a Batchless layer would drop them). Replace each by
    Sequential(BatchNorm2d, drop, act) with the same state: the same function, convertible."""
    from timm.layers import BatchNormAct2d

    for name, child in module.named_children():
        if isinstance(child, BatchNormAct2d):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats, device=child.weight.device, dtype=child.weight.dtype)
            bn.load_state_dict(child.state_dict(), strict=False)
            bn.train(child.training)
            setattr(module, name, nn.Sequential(bn, child.drop, child.act))
        else:
            unfuse_norm_act(child)
    return module


def build_model(name: str, batchless_backend: str | None) -> nn.Module:
    """The model with random weights; with batchless_backend, every BatchNorm converted."""
    if name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    elif name == "resnet-tiny":  # one block per stage: the smoke test's model
        from torchvision.models.resnet import BasicBlock, ResNet

        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    elif name == "efficientnet_b0":
        import timm

        model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=NUM_CLASSES)
        if batchless_backend is not None:
            unfuse_norm_act(model)
    else:
        raise ValueError(f"unknown model {name!r}; known: {MODELS}")
    if batchless_backend is not None:
        bk.convert_batchnorm(model, backend=batchless_backend)
        left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if left:
            raise RuntimeError(f"{name}: BatchNorm layers left after convert_batchnorm: {left[:3]}")
    return model


def variants(device: torch.device, wanted=None) -> list[tuple[str, str]]:
    """(norm, backend) pairs: BatchNorm, and batchless on every backend that runs natively here
    (not the triton backend under its CPU interpreter)."""
    found = [("batchnorm", "native")]
    for backend in bk.available_backends(device):
        if device.type == "cpu" and backend == "triton":
            continue
        found.append(("batchless", backend))
    if wanted:
        found = [v for v in found if v[0] in wanted or f"{v[0]}-{v[1]}" in wanted or v[1] in wanted]
    return found


# ---------------------------------------------------------------- memory


class MemoryMeter:
    """Peak memory over a stretch of steps, above the memory held when it starts (see module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = device.type == "cpu" and Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_ok:
            self.base = self._status_kb("VmRSS") * 1024
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                self.cpu_ok = False

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.cpu_ok:
            return (self._status_kb("VmHWM") * 1024 - self.base) / 2**20
        return None


# ---------------------------------------------------------------- one case


class Trainer:
    """A model, its SGD optimizer and a fixed random batch; step() is one training step, the batch
    in micro-batches of `micro` when given (each loss scaled by its share of the batch)."""

    def __init__(self, model_name, norm, backend, mode, image_size, batch, device, dtype, channels_last, seed=0):
        torch.manual_seed(seed)
        self.batchless = norm == "batchless"
        self.model = build_model(model_name, backend if self.batchless else None).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.device = device
        self.autocast = dtype != torch.float32
        self.dtype = dtype
        classes = self.model.fc.out_features if hasattr(self.model, "fc") else NUM_CLASSES
        self.x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=self.memory_format)
        self.y = torch.randint(0, classes, (batch,), device=device)
        loss_fn = self._loss
        self.loss_fn = torch.compile(loss_fn) if mode == "compiled" else loss_fn

    def _loss(self, x, y):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            loss = F.cross_entropy(self.model(x), y)
            if self.batchless:
                loss = loss + bk.nll_loss(self.model)
        return loss

    def step(self, micro: int | None = None) -> None:
        batch = self.x.shape[0]
        if micro is None or micro >= batch:
            self.loss_fn(self.x, self.y).backward()
        else:
            for xs, ys in zip(self.x.split(micro), self.y.split(micro)):
                (self.loss_fn(xs, ys) * (xs.shape[0] / batch)).backward()
        self.opt.step()
        # between steps no gradient is held: they count in the step's peak memory
        self.opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: Trainer, device, warmup: int, budget_s: float, min_steps: int, micro=None) -> dict:
    first = time.perf_counter()
    for i in range(max(1, warmup)):
        trainer.step(micro)
        sync(device)
        if i == 0:
            first_step_s = time.perf_counter() - first
    meter = MemoryMeter(device)
    meter.start()
    times = []
    start = time.perf_counter()
    while len(times) < min_steps or (time.perf_counter() - start < budget_s and len(times) < MAX_STEPS):
        t0 = time.perf_counter()
        trainer.step(micro)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = meter.peak_mb()
    times.sort()
    median = statistics.median(times)
    # "inclusive": within the measured times, as numpy's percentiles in bench_batchless.py (the default,
    # "exclusive", extrapolated past the fastest and slowest of 3 steps)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [median] * 4
    batch = trainer.x.shape[0]
    return {
        "steps": len(times), "median_ms": 1e3 * median, "p20_ms": 1e3 * q[0], "p80_ms": 1e3 * q[3],
        "imgs_per_s": batch / median, "peak_step_mb": peak if peak is not None else "",
        "first_step_s": first_step_s,
    }


def run_case(spec: dict, device, args) -> dict:
    row = dict(spec)
    busy_before, wall0 = busy_seconds(), time.perf_counter()
    try:
        trainer = Trainer(spec["model"], spec["norm"], spec["backend"], spec["mode"], spec["image_size"],
                          spec["batch"], device, getattr(torch, args.dtype), args.channels_last)
        row.update(measure(trainer, device, args.warmup if spec["experiment"] == "train_step" else 1,
                           args.budget if spec["experiment"] == "train_step" else 0.0,
                           args.min_steps if spec["experiment"] == "train_step" else 1,
                           micro=spec["micro_batch"] or None))
    except Exception as exc:  # recorded, not fatal: one variant failing must not lose the others
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if args.verbose:
            traceback.print_exc()
    finally:
        trainer = None
        gc.collect()
        if spec["mode"] == "compiled":
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    load = other_load(busy_before, busy_seconds(), time.perf_counter() - wall0)
    row["other_load"] = round(load, 2) if load is not None else ""
    row["unreliable"] = f"other load {load:.2f} cores" if load is not None and load > MAX_OTHER_LOAD else ""
    return row


# ---------------------------------------------------------------- report


def versions() -> dict:
    out = {}
    for name in ("torchvision", "timm"):
        try:
            out[f"{name}_version"] = __import__(name).__version__
        except Exception:
            out[f"{name}_version"] = ""
    return out


def write_csv(path: Path, rows, meta) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(v) for k, v in {**meta, **row}.items()})


def mb(value) -> str:
    """Megabytes, to 3 significant digits below 100."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def variant_name(row) -> str:
    return "batchnorm" if row["norm"] == "batchnorm" else f"batchless-{row['backend']}"


def budget_verdicts(rows, budget_mb: float) -> list[str]:
    """Per memory series: the largest measured batch whose step fits the budget."""
    lines = []
    series = {}
    for r in rows:
        if r["experiment"] == "memory" and isinstance(r.get("peak_step_mb"), float):
            series.setdefault(memory_series_name(r), []).append(r)
    for name, rs in series.items():
        fits = [r["batch"] for r in rs if r["peak_step_mb"] <= budget_mb]
        top = max(r["batch"] for r in rs)
        peaks = ", ".join(mb(r["peak_step_mb"]) for r in sorted(rs, key=lambda r: r["batch"]))
        if not fits:
            verdict = f"none of the measured batches (smallest {min(r['batch'] for r in rs)})"
        elif max(fits) == top:
            verdict = f"every measured batch, up to {top}"
        else:
            verdict = f"{max(fits)}"
        lines.append(f"- {name}: largest batch within {mb(budget_mb)} MB: **{verdict}** (step peaks {peaks} MB)")
    return lines


def memory_series_name(r) -> str:
    if r["micro_batch"]:
        return f"{variant_name(r)}, micro-batches of {r['micro_batch']}"
    return f"{variant_name(r)}, whole batch"


def summary_markdown(rows, meta, args, wall_s) -> str:
    lines = [
        f"# Model-level training benchmark: {meta['device_name']}",
        "",
        f"torch {meta['torch_version']}, torchvision {meta['torchvision_version'] or '-'}, timm "
        f"{meta['timm_version'] or '-'}, CUDA {meta['cuda_version'] or '-'}, triton {meta['triton_version'] or '-'}, "
        f"{meta['num_threads']} threads, commit {meta['git_commit'] or '-'}, {meta['timestamp']}, run took "
        f"{wall_s:.0f} s, malloc env: {meta['malloc_env'] or 'none'}, CPU kernels built for {meta['cpu_isa'] or '-'}.",
        "",
        f"One training step (forward, cross-entropy loss (+ `bk.nll_loss` for batchless), backward, SGD with "
        f"momentum) on random {args.image_size}x{args.image_size} images, batch {args.batch_size}, "
        f"{args.dtype}{' autocast' if args.dtype != 'float32' else ''}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}. Cells: images per second (median step), in "
        f"brackets the speedup over batchnorm in the same mode and the step's peak memory above what is "
        f"held between steps. First step: seconds of the first step (compiled: the compilation). A case "
        f"measured while other processes kept more than {MAX_OTHER_LOAD} cores busy is marked unreliable.",
        "",
        "| model | variant | eager img/s | compiled img/s | first step eager / compiled (s) | unreliable |",
        "|---|---|---|---|---|---|",
    ]
    steps = [r for r in rows if r["experiment"] == "train_step"]
    base = {(r["model"], r["mode"]): r for r in steps if r["norm"] == "batchnorm" and "imgs_per_s" in r}

    def cell(r):
        if r is None:
            return "-"
        if "imgs_per_s" not in r:
            return "failed"
        b = base.get((r["model"], r["mode"]))
        speed = f"{r['imgs_per_s'] / b['imgs_per_s']:.2f}x, " if b else ""
        peak = f"{mb(r['peak_step_mb'])} MB" if isinstance(r.get("peak_step_mb"), float) else "? MB"
        return f"{r['imgs_per_s']:.3g} ({speed}{peak})"

    keyed = {(r["model"], variant_name(r), r["mode"]): r for r in steps}
    for model in dict.fromkeys(r["model"] for r in steps):
        for variant in dict.fromkeys(variant_name(r) for r in steps if r["model"] == model):
            eager, comp = keyed.get((model, variant, "eager")), keyed.get((model, variant, "compiled"))
            firsts = " / ".join(f"{r['first_step_s']:.1f}" if r and "first_step_s" in r else "-" for r in (eager, comp))
            why = "; ".join(sorted({r["unreliable"] for r in (eager, comp) if r and r.get("unreliable")}))
            lines.append(f"| {model} | {variant} | {cell(eager)} | {cell(comp)} | {firsts} | {why} |")

    mem = [r for r in rows if r["experiment"] == "memory"]
    if mem:
        model = mem[0]["model"]
        batches = sorted({r["batch"] for r in mem})
        names = list(dict.fromkeys(memory_series_name(r) for r in mem))
        by = {(memory_series_name(r), r["batch"]): r for r in mem}

        def mcell(r):
            if r is None:
                return "-"
            if not isinstance(r.get("peak_step_mb"), float):
                return "failed" if r.get("error") else "?"
            return f"{mb(r['peak_step_mb'])} MB, {r['imgs_per_s']:.3g} img/s"

        lines += [
            "",
            f"## Memory budget: {model}, eager, {args.image_size}x{args.image_size}",
            "",
            "Peak memory of one training step above what is held between steps, and images per second, by "
            "batch size. BatchNorm needs the whole batch in memory at once; batchless normalization gives the "
            f"same gradient for the batch processed as micro-batches of {args.micro_batch} (losses scaled by "
            "their share), so its step memory stays that of the micro-batch at any batch size.",
            "",
            "| batch | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for b in batches:
            lines.append(f"| {b} | " + " | ".join(mcell(by.get((n, b))) for n in names) + " |")
        lines += ["", f"Budget {mb(args.memory_budget_mb)} MB (`--memory-budget-mb`):", ""]
        lines += budget_verdicts(rows, args.memory_budget_mb)
    errors = sorted({(variant_name(r), r["mode"], r["error"]) for r in rows if r.get("error")})
    if errors:
        lines += [""] + [f"- {v} {m} failed: {e}" for v, m, e in errors]
    return "\n".join(lines).rstrip() + "\n"


def plot(rows, png: Path, budget_mb: float) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    steps = [r for r in rows if r["experiment"] == "train_step" and "imgs_per_s" in r]
    mem = [r for r in rows if r["experiment"] == "memory" and isinstance(r.get("peak_step_mb"), float)]
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(13 if mem else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    labels = list(dict.fromkeys(f"{r['model']}\n{variant_name(r)}" for r in steps))
    modes = list(dict.fromkeys(r["mode"] for r in steps))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        vals, hatches = [], []
        for label in labels:
            r = next((r for r in steps if f"{r['model']}\n{variant_name(r)}" == label and r["mode"] == mode), None)
            vals.append(r["imgs_per_s"] if r else 0)
            hatches.append("//" if r and r.get("unreliable") else "")
        bars = ax.bar([i + j * width for i in range(len(labels))], vals, width, label=mode)
        for bar, hatch in zip(bars, hatches):
            bar.set_hatch(hatch)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("images / s (higher is better)")
    ax.set_title("training step throughput (hatched: unreliable)", fontsize=9)
    ax.legend(fontsize=8)
    if mem:
        ax = axes[0][1]
        for name in dict.fromkeys(memory_series_name(r) for r in mem):
            rs = sorted((r for r in mem if memory_series_name(r) == name), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rs], [r["peak_step_mb"] for r in rs], marker="o", label=name)
        ax.axhline(budget_mb, color="gray", linestyle="--", label=f"budget {mb(budget_mb)} MB")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak step memory (MB)")
        ax.set_title(f"{mem[0]['model']}: step memory by batch size", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---------------------------------------------------------------- main


def parse_args(argv):
    # allow_abbrev=False: _allocator.py looks for --default-allocator before parsing, spelled out
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    parser.add_argument("--variants", nargs="+",
                        help="batchnorm, batchless (every backend) or batchless-<backend> (default: all available)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--full", action="store_true",
                        help="compile every model and variant (the CPU default compiles only the first model with "
                             "batchnorm and the preferred batchless backend; a GPU run compiles all)")
    parser.add_argument("--image-size", type=_cli.positive(int), help="default 64 on cpu, 224 on cuda")
    parser.add_argument("--batch-size", type=_cli.positive(int), help="default 8 on cpu, 128 on cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="autocast dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on cuda")
    parser.add_argument("--warmup", type=_cli.nonnegative(int), default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--budget", type=_cli.positive(float), help="seconds of timed steps per case (default 2)")
    parser.add_argument("--min-steps", type=_cli.positive(int), default=MIN_STEPS)
    parser.add_argument("--memory-batches", type=_cli.positive(int), nargs="*",
                        help="batch sizes of the memory-budget experiment (none: skip it; default cpu 4..32, "
                             "cuda 16..512)")
    parser.add_argument("--micro-batch", type=_cli.positive(int), default=1, help="batchless micro-batch size there (default 1)")
    parser.add_argument("--memory-budget-mb", type=_cli.positive(float), help="the budget (default 64 MB cpu, 16384 MB cuda)")
    parser.add_argument("--out", type=Path, help="output folder (default: a new bench/runs/<device-slug>/<time>-models/)")
    parser.add_argument("--update-reference", action="store_true",
                        help="write the committed reference results, bench/results/<device-slug>/models/")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep glibc's malloc settings (CPU peak memory then reads low after the first step)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failing case")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.device]
    for key in ("image_size", "batch_size", "budget", "memory_batches", "memory_budget_mb", "dtype", "channels_last"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    every = variants(device)
    names = {"batchnorm", "batchless"} | {f"{n}-{b}" for n, b in every} | {b for _, b in every}
    unknown = sorted(set(args.variants or ()) - names)
    if unknown:  # a typo ran the BatchNorm memory rows alone
        sys.exit(f"--variants: unknown or unavailable here: {unknown}; available: {sorted(names)}")
    missing = have_model_libraries(args.models)
    if missing:
        sys.exit(f"[models] torchvision (and timm for efficientnet_b0) are needed ({missing}); on the CPU machines "
                 "they need the CUDA build of torch: `bash bench/run.sh --models` sets up .venv-models with them")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    meta = {**machine_info(device), **versions()}
    if args.update_reference:
        out = BENCH_DIR / "results" / meta["slug"] / "models"
    else:
        out = args.out or BENCH_DIR / "runs" / meta["slug"] / time.strftime("%Y%m%d-%H%M%S-models")
    out.mkdir(parents=True, exist_ok=True)
    print(f"[models] results will be written to {out}", flush=True)
    chosen = variants(device, args.variants)
    print(f"[models] {meta['device_name']}, {meta['num_threads']} threads; variants "
          f"{[f'{n}-{b}' for n, b in chosen]}; modes {args.modes}", flush=True)

    lead = [v for v in chosen if v[0] == "batchless"][:1]  # the backend auto prefers here
    # Compiling a model costs ~1 minute on 2 CPU cores: the CPU default compiles the first model with
    # batchnorm and the preferred batchless backend only; --full (and a GPU) compiles every case.
    compile_all = args.full or device.type == "cuda"
    specs = []
    for model in args.models:
        for norm, backend in chosen:
            for mode in args.modes:
                if mode == "compiled" and not compile_all and not (
                        model == args.models[0] and ((norm, backend) in lead or norm == "batchnorm")):
                    continue
                specs.append(dict(experiment="train_step", model=model, norm=norm, backend=backend, mode=mode,
                                  image_size=args.image_size, batch=args.batch_size, micro_batch=0))
    if args.memory_batches:
        for batch in args.memory_batches:
            for norm, backend, micro in [("batchnorm", "native", 0)] + [(n, b, m) for n, b in lead
                                                                         for m in (0, args.micro_batch)]:
                specs.append(dict(experiment="memory", model=args.models[0], norm=norm, backend=backend, mode="eager",
                                  image_size=args.image_size, batch=batch, micro_batch=micro))
    common = dict(dtype=args.dtype, memory_format="channels_last" if args.channels_last else "contiguous")
    start, rows = time.perf_counter(), []
    for i, spec in enumerate(specs):
        row = run_case({**spec, **common}, device, args)
        rows.append(row)
        what = (f"{row['experiment']} {row['model']} {variant_name(row)} {row['mode']} batch {row['batch']}"
                + (f" (micro-batches of {row['micro_batch']})" if row["micro_batch"] else ""))
        result = (f"{row['imgs_per_s']:.3g} img/s, peak {fmt(row['peak_step_mb'])} MB, first step "
                  f"{row['first_step_s']:.1f} s" if "imgs_per_s" in row else f"FAILED: {row.get('error')}")
        print(f"[models {time.perf_counter() - start:6.1f} s] {i + 1}/{len(specs)} {what}: {result}"
              + (f"; UNRELIABLE: {row['unreliable']}" if row["unreliable"] else ""), flush=True)
    wall_s = time.perf_counter() - start
    for r in rows:
        b = next((s for s in rows if s["experiment"] == "train_step" and s["norm"] == "batchnorm"
                  and s["model"] == r["model"] and s["mode"] == r["mode"] and "imgs_per_s" in s), None)
        if r["experiment"] == "train_step" and b and "imgs_per_s" in r:
            r["speedup_vs_batchnorm"] = r["imgs_per_s"] / b["imgs_per_s"]

    write_csv(out / "results.csv", rows, meta)
    summary = summary_markdown(rows, meta, args, wall_s)
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    plot(rows, out / "models.png", args.memory_budget_mb)
    print(f"results in {out}")
    return rows


if __name__ == "__main__":
    main()
