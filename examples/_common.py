"""Shared helpers of the example scripts (spirals.py, digits_cnn.py, microbatch.py).

- seeding (`set_seed`), device choice (`pick_device`), environment record (`env_info`);
- the normalizations compared (`NORMS`) and a factory that builds one layer of each (`make_norm`);
- the task loss plus the NLL of the batchless layers (`total_loss`), one training step
  (`train_step`), evaluation (`evaluate`), the BLN layers' data-dependent init (`init_bln`);
- the small CNN used by digits_cnn.py and microbatch.py (`DigitsCNN`) and the digits data;
- the options every script shares (`arg_parser`, `add_run_args`), the set-up of a
  (norm x batch size x seed) sweep (`Sweep`), and the end of every run (`finish`);
- a progress bar (tqdm when installed, else a small printer to stderr: no extra dependency);
- a pool that runs independent jobs in worker processes (`run_jobs`);
- markdown tables, mean +- std formatting, and writing results (markdown, JSON, CSV, plots).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import batchless_kernels as bk
from batchless_kernels import _cli

EXAMPLES_DIR = Path(__file__).resolve().parent
RESULTS_DIR = EXAMPLES_DIR / "results"

# name -> what it is (README and table legends)
NORMS = {
    "none": "no normalization",
    "bn": "nn.BatchNorm (batch statistics; eval: running statistics)",
    "brn": "bk.BatchRenorm (Batch Renormalization; eval: moving statistics)",
    "bln": 'bk.BatchlessNorm, parametrization="abs" (paper: BLN)',
    "bln_log": 'bk.BatchlessNorm, parametrization="log" (paper: BLNlog)',
    "bln_inv": 'bk.BatchlessNorm, parametrization="inv" (paper: BLNinv)',
}
BLN_PARAMETRIZATION = {"bln": "abs", "bln_log": "log", "bln_inv": "inv"}


def is_batchless(norm: str) -> bool:
    return norm in BLN_PARAMETRIZATION


def check_toolkit(need_brn: bool = False, need_init: bool = False) -> None:
    """Fails with a clear message when the toolkit lacks a piece the script needs."""
    missing = []
    if need_brn and not hasattr(bk, "BatchRenorm1d"):
        missing.append("batchless_kernels.BatchRenorm1d/2d")
    if need_init and not hasattr(bk, "init_from_data"):
        missing.append("batchless_kernels.init_from_data")
    if missing:
        raise SystemExit(f"this version of batchless_kernels lacks {', '.join(missing)}")


# ------------------------------------------------------------------------------------------------
# Seeds, device, environment
# ------------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given, else cuda when available, else cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=EXAMPLES_DIR, capture_output=True, text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def git_dirty() -> list[str] | None:
    """Files of the package (batchless_kernels/) with uncommitted changes when the run started."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "batchless_kernels"],
            cwd=EXAMPLES_DIR.parent, capture_output=True, text=True, timeout=10,
        )
        return [ln[3:] for ln in out.stdout.splitlines()] if out.returncode == 0 else None
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: torch.device, workers: int) -> dict:
    return {
        "torch": torch.__version__,
        "batchless_kernels": getattr(bk, "__version__", "?"),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads_per_worker": 1 if device.type == "cpu" else torch.get_num_threads(),
        "workers": workers,
        "backend_auto": bk.available_backends(device.type)[0] if bk.available_backends(device.type) else None,
        "git_commit": git_commit(),
        "package_uncommitted_changes": git_dirty(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ------------------------------------------------------------------------------------------------
# Normalizations and models
# ------------------------------------------------------------------------------------------------


def make_norm(norm: str, num_features: int, dim: int, *, momentum: float = 0.1,
              brn_warmup_steps: int = 0, brn_relax_steps: int = 0) -> nn.Module:
    """One normalization layer of kind `norm` for `dim`-d features (1: (N, C), 2: (N, C, H, W)).

    `momentum` is BN's and BRN's (torch convention: new = (1 - m) * old + m * batch value)."""
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim]
        return cls(num_features, momentum=momentum)
    if norm == "brn":
        cls = {1: bk.BatchRenorm1d, 2: bk.BatchRenorm2d}[dim]
        return cls(num_features, momentum=momentum, warmup_steps=brn_warmup_steps,
                   relax_steps=brn_relax_steps)
    if is_batchless(norm):
        cls = {1: bk.BatchlessNorm1d, 2: bk.BatchlessNorm2d}[dim]
        return cls(num_features, parametrization=BLN_PARAMETRIZATION[norm])
    raise ValueError(f"unknown norm {norm!r}; one of {list(NORMS)}")


def total_loss(model: nn.Module, task_loss: torch.Tensor, norm: str) -> torch.Tensor:
    """The training loss: the task loss, plus the batchless layers' NLL for the BLN variants."""
    if is_batchless(norm):
        return task_loss + bk.nll_loss(model).to(task_loss.dtype)
    return task_loss


def train_step(model: nn.Module, opt: torch.optim.Optimizer, norm: str, x: torch.Tensor,
               y: torch.Tensor) -> float:
    """One optimizer step on the batch (x, y) with the training loss (`total_loss` of the
    cross-entropy); returns the batch's cross-entropy."""
    task = F.cross_entropy(model(x), y)
    loss = total_loss(model, task, norm)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return task.item()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """(cross-entropy, accuracy) of the model on (x, y) in eval mode, in chunks of `chunk` inputs;
    leaves the model in training mode."""
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    model.train()
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def init_bln(model: nn.Module, norm: str, a: dict, x: torch.Tensor, generator: torch.Generator) -> None:
    """The paper's data-dependent initialization of the BLN layers, when `norm` is a BLN variant and
    a["bln_init"] == "data": bk.init_from_data on a["init_samples"] rows of x drawn with `generator`."""
    if is_batchless(norm) and a["bln_init"] == "data":
        sample = x[torch.randperm(len(x), generator=generator)[: a["init_samples"]].to(x.device)]
        bk.init_from_data(model, sample)


def norm_params(model: nn.Module) -> set[int]:
    """ids of the parameters that belong to normalization layers (excluded from weight decay)."""
    ids = set()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, bk.modules._BatchlessNorm)) or (
            hasattr(bk, "BatchRenorm1d") and "Renorm" in type(m).__name__
        ):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of dense/conv layers only; not on biases nor on any parameter of a
    normalization layer (decay would pull BLN's mean/sigma away from the activation statistics)."""
    skip = norm_params(model)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if id(p) in skip or p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adam(params, lr: float, amsgrad: bool = False) -> torch.optim.Adam:
    """torch.optim.Adam, fused where this torch has the fused kernel for the parameters' device (the
    same update; per-step overhead matters with the examples' small models and batches)."""
    try:
        return torch.optim.Adam(params, lr=lr, amsgrad=amsgrad, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, amsgrad=amsgrad)


class DigitsCNN(nn.Sequential):
    """A small CNN for 1x8x8 images, in the pattern of the paper's CIFAR-10 network
    (conv -> LeakyReLU -> norm -> dropout -> maxpool, twice; dense -> LeakyReLU -> norm -> dropout;
    dense 10): conv(c1, 3) -> s/2 x s/2, conv(c2, 3) -> s/4 x s/4, dense(hidden), dense(10), for
    s x s images (s = image_size, a multiple of 4; 8 for the digits)."""

    def __init__(self, norm: str, c1: int = 32, c2: int = 64, hidden: int = 64, dropout: float = 0.25,
                 classes: int = 10, image_size: int = 8, norm_factory=None, **norm_kwargs):
        factory = norm_factory or make_norm  # (norm, num_features, dim, **norm_kwargs) -> module

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1),
                    factory(norm, cout, 2, **norm_kwargs), nn.Dropout(dropout), nn.MaxPool2d(2)]
        super().__init__(
            *block(1, c1), *block(c1, c2), nn.Flatten(),
            nn.Linear(c2 * (image_size // 4) ** 2, hidden), nn.LeakyReLU(0.1), factory(norm, hidden, 1, **norm_kwargs),
            nn.Dropout(dropout), nn.Linear(hidden, classes),
        )


def load_digits_tensors(val_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes; no download), pixels
    scaled to [0, 1], split once (fixed seed) into training and validation sets, stratified by class.
    Returns (x_train, y_train, x_val, y_val) as float32/int64 CPU tensors."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("digits data needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(split_seed)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr, va = torch.cat(train_idx), torch.cat(val_idx)
    tr = tr[torch.randperm(len(tr), generator=g)]
    return x[tr], y[tr], x[va], y[va]


# ------------------------------------------------------------------------------------------------
# Command line and sweeps
# ------------------------------------------------------------------------------------------------


_SAYS_DEFAULT = re.compile(r"\(default|^default:")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, options without a help text too (argparse's formatter shows
    it only after one); not where the help text says it already (the None defaults)."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action = copy.copy(action)  # (argparse formats no help string for an option without help)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or _SAYS_DEFAULT.search(text):
            return text
        return f"{text} (default: %(default)s)"


def arg_parser(doc: str, norms=NORMS) -> argparse.ArgumentParser:
    """The parser of a script whose docstring is `doc`, with its first option, --norms (from `norms`)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--norms", default=",".join(norms), help="comma-separated, from " + ",".join(norms))
    return p


def add_run_args(p: argparse.ArgumentParser, name: str, full_help: str, workers: bool = True,
                 device_default: str = "cuda if available, else cpu") -> None:
    """The options at the end of every script's list: --device, --workers (`workers`), --out, --full,
    --smoke, --quiet."""
    p.add_argument("--device", default=None, help=f"default: {device_default}")
    if workers:
        p.add_argument("--workers", type=_cli.positive(int), default=None,
                       help="processes (default: one per CPU core, at most 4; 1 on GPU)")
    p.add_argument("--out", default=None, help=f"output folder (default examples/results/{name})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help=full_help)
    size.add_argument("--smoke", action="store_true", help="a seconds-long plumbing check (tiny settings)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def parse_with_presets(p: argparse.ArgumentParser, argv, full: dict, smoke: dict) -> argparse.Namespace:
    """`p.parse_args(argv)`, where --full and --smoke set the defaults of the options in `full` and
    `smoke`: options given on the command line keep their values (`--smoke --epochs 3` runs 3 epochs)."""
    args = p.parse_args(argv)
    preset = smoke if args.smoke else full if args.full else None
    if preset:
        p.set_defaults(**preset)
        args = p.parse_args(argv)
    return args


def parse_norms(spec: str, known=NORMS) -> list[str]:
    """The comma-separated normalizations of `spec` (--norms), at least one, each one of `known`."""
    norms = [n for n in spec.split(",") if n]
    if not norms:
        raise SystemExit(f"--norms: expected comma-separated names from {list(known)}, got {spec!r}")
    for n in norms:
        if n not in known:
            raise SystemExit(f"unknown norm {n!r}; one of {list(known)}")
    return norms


def parse_ints(spec: str, option: str) -> list[int]:
    """The comma-separated positive ints of `spec` (the value of `option`), else SystemExit naming it."""
    try:
        values = [int(v) for v in spec.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"{option}: expected comma-separated positive ints such as 1,4,16, got {spec!r}")
    return values


@dataclass
class Sweep:
    """A sweep over (norm, batch size, seed) cells (args: --norms, --batch-sizes, --seeds, --seed0,
    --device, --workers, --out, --smoke, --quiet, --bln-init), run in worker processes."""

    name: str
    args: argparse.Namespace
    norms: list[str]
    batch_sizes: list[int]
    device: torch.device
    workers: int
    seeds: list[int]
    outdir: Path

    @classmethod
    def from_args(cls, name: str, args: argparse.Namespace) -> "Sweep":
        norms = parse_norms(args.norms)
        check_toolkit(need_brn="brn" in norms,
                      need_init=args.bln_init == "data" and any(map(is_batchless, norms)))
        device = pick_device(args.device)
        return cls(name, args, norms, parse_ints(args.batch_sizes, "--batch-sizes"), device,
                   args.workers or (1 if args.smoke else default_workers(device)),
                   list(range(args.seed0, args.seed0 + args.seeds)), results_dir(name, args.out))

    def jobs(self, data) -> list[dict]:
        """One job per cell and seed (batch sizes outermost, then norms, then seeds); BN is skipped
        at batch size 1. A job: the options (device as a string), `data`, norm, batch_size, seed."""
        a = {**vars(self.args), "device": str(self.device)}
        return [{"args": a, "data": data, "norm": n, "batch_size": b, "seed": s}
                for b in self.batch_sizes for n in self.norms for s in self.seeds
                if not (n == "bn" and b == 1)]

    def run(self, fn, jobs: list[dict]) -> tuple[list, float]:
        """(fn(job) for every job, in order; the wall time in seconds)."""
        t0 = time.time()
        records = run_jobs(fn, jobs, self.workers, self.name, quiet=self.args.quiet)
        return records, time.time() - t0

    def meta(self, wall: float, **extra) -> dict:
        """The run's record: script, options, seeds, norms, batch sizes, `extra`, environment, wall time."""
        return {"script": self.name, "args": vars(self.args), "seeds": self.seeds, "norms": self.norms,
                "batch_sizes": self.batch_sizes, **extra, "env": env_info(self.device, self.workers),
                "wall_time_s": wall}


def finish(outdir: Path, *, markdown: str, meta: dict, records: list[dict], plots, quiet: bool,
           **write_kwargs) -> dict:
    """The end of a run: `write_results`, then `plots()`, then (unless `quiet`) the tables on stdout;
    returns {"records", "meta", "markdown", "outdir"}."""
    write_results(outdir, markdown=markdown, meta=meta, records=records, **write_kwargs)
    plots()
    if not quiet:
        print(markdown)
        print(f"results in {outdir}", file=sys.stderr)
    return {"records": records, "meta": meta, "markdown": markdown, "outdir": str(outdir)}


# ------------------------------------------------------------------------------------------------
# Progress, jobs
# ------------------------------------------------------------------------------------------------


class _Printer:
    """A minimal progress bar on stderr (used when tqdm is not installed): one line at most every
    `every` seconds, with count, percentage, elapsed time and an estimate of the time left."""

    def __init__(self, total: int, desc: str = "", every: float = 5.0, disable: bool = False):
        self.total, self.desc, self.every, self.disable = total, desc, every, disable
        self.n, self.t0, self.last, self.postfix = 0, time.time(), 0.0, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            self._print(now)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def _print(self, now: float) -> None:
        if self.disable:
            return
        el = now - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        print(f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%) elapsed {_hms(el)} eta {_hms(eta)}"
              f"{' | ' + self.postfix if self.postfix else ''}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


def progress(total: int, desc: str = "", disable: bool = False):
    """tqdm if it is installed, else the small stderr printer above."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Printer(total, desc, disable=disable)
    return tqdm(total=total, desc=desc, disable=disable, file=sys.stderr)


def _init_worker() -> None:
    torch.set_num_threads(1)


def default_workers(device: torch.device) -> int:
    """Worker processes: one per core (at most 4) on the CPU, where the small models of the examples
    run best single-threaded; 1 on the GPU."""
    return 1 if device.type == "cuda" else max(1, min(4, os.cpu_count() or 1))


def run_jobs(fn, jobs: list, workers: int, desc: str, quiet: bool = False) -> list:
    """Runs fn(job) for every job, in `workers` forked processes (1: in this process), with a progress
    bar; returns the results in the order of `jobs`."""
    bar = progress(len(jobs), desc, disable=quiet)
    results = [None] * len(jobs)
    t0 = time.time()
    if workers <= 1:
        threads = torch.get_num_threads()
        _init_worker()  # small models: one thread is fastest, and fair to the other processes
        for i, job in enumerate(jobs):
            results[i] = fn(job)
            bar.update(1)
        torch.set_num_threads(threads)
    else:
        ctx = mp.get_context("fork")
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            for i, res in pool.imap_unordered(_indexed, [(fn, i, j) for i, j in enumerate(jobs)]):
                results[i] = res
                bar.update(1)
    bar.close()
    if not quiet:
        print(f"{desc}: {len(jobs)} runs in {time.time() - t0:.0f} s", file=sys.stderr)
    return results


def _indexed(args):
    fn, i, job = args
    return i, fn(job)


# ------------------------------------------------------------------------------------------------
# Statistics and tables
# ------------------------------------------------------------------------------------------------


def mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_num(x: float, digits: int = 3) -> str:
    """`digits` significant digits; integers of more digits are written whole; tiny values in
    e-notation."""
    if x is None:
        return "nan"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax < 1e-3:
        return f"{x:.{max(digits - 1, 0)}e}"
    if ax >= 10 ** (digits - 1):
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def fmt_mean_std(values, digits: int = 3) -> str:
    """'mean ± std' over seeds (sample std, ddof=1); 'n/a' when there are no values."""
    vals = [x for x in values if x is not None]
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    if s <= 1e-9 * abs(m):  # identical values up to float rounding
        s = 0.0
    if not math.isfinite(m):
        return "diverged" if any(not math.isfinite(float(x)) for x in vals) else "nan"
    return f"{fmt_num(m, digits)} ± {fmt_num(s, 2)}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pivot_table(records: list[dict], metric: str, norms: list[str], batch_sizes: list[int],
                digits: int = 3, bold_best: str | None = None, fmt=None) -> str:
    """Rows: norms; columns: batch sizes; cells: mean ± std over seeds of records[metric].
    bold_best='min'|'max' marks the best mean of each column."""
    fmt = fmt or (lambda vals: fmt_mean_std(vals, digits))
    cells, means = {}, {}
    for norm in norms:
        for bs in batch_sizes:
            vals = [r[metric] for r in records if r["norm"] == norm and r["batch_size"] == bs]
            cells[norm, bs] = fmt(vals) if vals else "–"
            finite = [v for v in vals if v is not None and math.isfinite(v)]
            if vals and len(finite) == len(vals):
                means[norm, bs] = float(np.mean(finite))
    if bold_best:
        for bs in batch_sizes:
            col = {n: means[n, bs] for n in norms if (n, bs) in means}
            if col:
                best = (min if bold_best == "min" else max)(col.values())
                for n, v in col.items():
                    if v == best:
                        cells[n, bs] = f"**{cells[n, bs]}**"
    rows = [[norm] + [cells[norm, bs] for bs in batch_sizes] for norm in norms]
    return markdown_table(["norm \\ batch size"] + [str(b) for b in batch_sizes], rows)


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def results_dir(name: str, out: str | None = None) -> Path:
    d = Path(out) if out else RESULTS_DIR / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def write_results(outdir: Path, *, markdown: str, meta: dict, records: list[dict],
                  extra: dict | None = None, csv_fields: list[str] | None = None) -> None:
    """results.md (the tables), results.json (meta, every run's record, extra) and results.csv (one
    row per run with the scalar fields) in `outdir`."""
    (outdir / "results.md").write_text(markdown)
    payload = {"meta": meta, "records": records, **(extra or {})}
    (outdir / "results.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    if records:
        fields = csv_fields or [k for k, v in records[0].items() if not isinstance(v, (list, dict))]
        with open(outdir / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for r in records:
                w.writerow({k: _jsonable(r.get(k)) for k in fields})


def meta_markdown(meta: dict) -> str:
    env = meta["env"]
    return (f"torch {env['torch']}, device {env['device']} ({env['device_name']}), "
            f"{env['workers']} worker process(es), git {env['git_commit']}, {env['date']}; "
            f"wall time {meta['wall_time_s']:.0f} s.\n")


def plt_module():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


NORM_STYLE = {
    "none": dict(color="0.5", marker="x", ls=":"),
    "bn": dict(color="tab:blue", marker="s"),
    "brn": dict(color="tab:cyan", marker="D"),
    "bln": dict(color="tab:red", marker="o"),
    "bln_log": dict(color="tab:orange", marker="^"),
    "bln_inv": dict(color="tab:purple", marker="v"),
}


def plot_metrics_vs_batch(path: Path, records: list[dict], norms: list[str], batch_sizes: list[int],
                          metrics: list[tuple[str, str, bool]], title: str) -> None:
    """One panel per (metric, label, log_y): mean over seeds against batch size, one line per norm,
    error bars from the min to the max over seeds."""
    plt = plt_module()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for ax, (metric, label, log_y) in zip(axes[0], metrics):
        for norm in norms:
            xs, ms, lo, hi = [], [], [], []
            for bs in batch_sizes:
                vals = [r[metric] for r in records if r["norm"] == norm and r["batch_size"] == bs]
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                if not vals:
                    continue
                m = float(np.mean(vals))
                xs.append(bs); ms.append(m); lo.append(m - min(vals)); hi.append(max(vals) - m)
            if xs:
                ax.errorbar(xs, ms, yerr=[lo, hi], label=norm, capsize=3, **NORM_STYLE.get(norm, {}))
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_fig(fig, path, dpi=110, title=title)


def save_fig(fig, path: Path, dpi: int = 100, title: str | None = None, ylabel: str | None = None) -> None:
    """Saves and closes a figure: with `title` as its suptitle; with `ylabel`, the figure is a row of
    panels (fig.axes) and the first one gets the y label and the legend."""
    import matplotlib.pyplot as plt

    if ylabel is not None:
        fig.axes[0].set_ylabel(ylabel)
        fig.axes[0].legend(fontsize=7)
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_by_batch_size(batch_sizes: list[int], norms: list[str], curve, ylabel: str, path: Path, *,
                       panel_size: tuple[float, float] = (3.6, 3.2), xlabel: str = "epoch",
                       markers: bool = False) -> None:
    """One panel per batch size, one line per normalization (log y): `curve(norm, batch_size)` gives
    the line's (xs, ys), or None for no line; with `markers`, the norm's marker at each point."""
    plt = plt_module()
    if plt is None:
        return
    w, h = panel_size
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(w * len(batch_sizes), h), squeeze=False)
    for ax, bs in zip(axes[0], batch_sizes):
        for norm in norms:
            line = curve(norm, bs)
            if line is None:
                continue
            style = {"marker": NORM_STYLE[norm]["marker"], "ms": 3} if markers else {}
            ax.plot(*line, label=norm, color=NORM_STYLE[norm]["color"], lw=1, **style)
        ax.set_yscale("log"); ax.set_title(f"batch size {bs}"); ax.set_xlabel(xlabel); ax.grid(alpha=0.3)
    save_fig(fig, path, ylabel=ylabel)
