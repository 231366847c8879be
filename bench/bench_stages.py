"""Per-stage device time of the cuda backend's kernels, by CUDA-graph replay.

The forward's goal is >= 90% of the copy bandwidth. A training forward is the elementwise kernel
plus a second stage that reduces its per-channel partial sums (and, in train_forward, the NLL
epilogue); a backward with dweight/dbias has the same second stage. Each stage cannot be timed
alone, so every op is timed with and without it, and the difference is the second stage's cost:

    copy         dst.copy_(x)                                          bytes 2|x| (the ceiling)
    fwd_nostats  batchless_norm_forward(..., compute_stats=False)      2|x| (kernel alone)
    fwd_stats    batchless_norm_forward(..., compute_stats=True)       2|x| (kernel + second stage)
    train_fwd    batchless_norm_train_forward(..., "log", 1e-5, True)  2|x| (+ NLL epilogue)
    bwd_dx       batchless_norm_backward(..., [True, False, False])    2|x| (kernel alone)
    bwd_all      batchless_norm_backward(..., [True, True, True])      3|x| (kernel + second stage)
    train_bwd    batchless_norm_train_backward(..., [True] * 5)        3|x| (+ the NLL's gradients)

Where a tile covers a whole channel (small inputs: one partial per channel), fwd_stats writes its
sums without a second kernel while train_fwd always launches one: there "NLL epilogue" is that
kernel's launch and work, not the epilogue alone.

Each stage is one CUDA graph of --calls calls (inputs preallocated, rotated over up to 8 copies, enough
to exceed twice the L2 for inputs of more than a quarter of it), replayed --repeats times; reported per call: median, p20, p80. With --device
cpu the same ops run eagerly, timed with time.perf_counter (a dry run: tiny default shape).

    python bench/bench_stages.py [--device cpu|cuda] [--shapes 256x64x56x56 ...] [--dtypes float32 bfloat16]
        [--layouts contiguous channels_last] [--repeats N] [--calls N] [--out DIR]

Writes stages.csv (one row per case and stage) and stages.md into --out (default
bench/results/<device-slug>/stages/).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_batchless import BENCH_DIR, GPU_TARGETS, LAYOUTS, captured, last_level_cache_bytes, machine_info, sample

import batchless_kernels  # noqa: F401 - registers torch.ops.batchless_kernels
from batchless_kernels import _cli

OPS = torch.ops.batchless_kernels
STAGES = {"copy": 2, "fwd_nostats": 2, "fwd_stats": 2, "train_fwd": 2, "bwd_dx": 2, "bwd_all": 3,
          "train_bwd": 3}  # bytes / |x|
# bwd_all - bwd_dx is not the backward's second stage alone: bwd_all also reads x (for dweight).
DERIVED = {"2nd stage fwd": ("fwd_stats", "fwd_nostats"), "NLL epilogue": ("train_fwd", "fwd_stats"),
           "x read + sums bwd": ("bwd_all", "bwd_dx"), "NLL grads bwd": ("train_bwd", "bwd_all")}
META = ["device_name", "torch_version", "cuda_version", "triton_version", "git_commit", "timestamp"]
COLUMNS = META + ["shape", "dtype", "layout", "stage", "calls_per_graph", "median_ms", "p20_ms", "p80_ms",
                  "bytes", "gbps", "frac_of_copy", "error"]


def stage_bodies(shape, dtype, layout, device, n_sets, calls):
    """stage -> body(): `calls` of the stage's op, over n_sets rotating input sets."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def randn():
        return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

    sets = [(randn(), randn(), torch.empty(shape, device=device, dtype=dtype).contiguous(memory_format=fmt))
            for _ in range(n_sets)]  # (x, grad_y, copy destination)
    channels = shape[1]
    mean, std_param, weight, bias = (torch.randn(channels, device=device) for _ in range(4))
    rstd = torch.rand(channels, device=device) + 0.5
    # the training backward's other inputs: the forward's sums, the elements per channel, d loss / d nll
    s1, s2 = torch.randn(channels, device=device), torch.rand(channels, device=device) * math.prod(shape) / channels
    count, grad_nll = math.prod(shape) // channels, torch.ones((), device=device)
    ops = {
        "copy": lambda x, g, dst: dst.copy_(x),
        "fwd_nostats": lambda x, g, dst: OPS.batchless_norm_forward(x, mean, rstd, weight, bias, False),
        "fwd_stats": lambda x, g, dst: OPS.batchless_norm_forward(x, mean, rstd, weight, bias, True),
        "train_fwd": lambda x, g, dst: OPS.batchless_norm_train_forward(x, mean, std_param, weight, bias, "log",
                                                                        1e-5, True),
        "bwd_dx": lambda x, g, dst: OPS.batchless_norm_backward(g, x, mean, rstd, weight, [True, False, False]),
        "bwd_all": lambda x, g, dst: OPS.batchless_norm_backward(g, x, mean, rstd, weight, [True, True, True]),
        "train_bwd": lambda x, g, dst: OPS.batchless_norm_train_backward(
            g, grad_nll, x, mean, std_param, rstd, weight, s1, s2, count, "log", 1e-5, [True] * 5),
    }
    return {stage: (lambda op=op: [op(*s) for s in itertools.islice(itertools.cycle(sets), calls)])
            for stage, op in ops.items()}


def time_stage(body, calls, device, repeats) -> list[float]:
    """ms per replay of one graph of body (on the CPU: per eager run of body), after a warm-up."""
    if device.type == "cuda":
        (setup, run), _ = captured(body, calls)
    else:
        setup, run = (lambda: None), (lambda _: body())
    sample(setup, run, device, 2)
    return sample(setup, run, device, repeats)


def run_case(shape, dtype, layout, device, calls, repeats, cache_bytes) -> list[dict]:
    x_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    n_sets = min(8, max(1, math.ceil(2 * cache_bytes / x_bytes)))
    base = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."), "layout": layout,
            "calls_per_graph": calls}
    rows = []
    for stage, body in stage_bodies(shape, dtype, layout, device, n_sets, calls).items():
        row = {**base, "stage": stage, "bytes": STAGES[stage] * x_bytes}
        try:
            p20, median, p80 = np.percentile(time_stage(body, calls, device, repeats), [20, 50, 80]) / calls
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80, gbps=row["bytes"] / (median * 1e-3) / 1e9)
        except Exception as exc:  # noqa: BLE001 - e.g. a capture failure: record it, go on
            row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:200]
        rows.append(row)  # the graph went with time_stage's frame: one stage's memory at a time
    copy_gbps = rows[0].get("gbps")
    for row in rows:
        if copy_gbps and "gbps" in row:
            row["frac_of_copy"] = row["gbps"] / copy_gbps
    return rows


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(rows, meta) -> str:
    by_case = {}
    for r in rows:
        by_case.setdefault((r["shape"], r["dtype"], r["layout"]), {})[r["stage"]] = r

    def us(row):
        return row["median_ms"] * 1e3 if row and "median_ms" in row else None

    def cell(row):
        if us(row) is None:
            return "failed" if row and row.get("error") else ""
        share = f" ({100 * row['frac_of_copy']:.0f}%)" if "frac_of_copy" in row else ""
        return f"{us(row):.1f}{share}"

    lines = [f"# Per-stage device time: {meta['device_name']}", "",
             f"torch {meta['torch_version']}, CUDA {meta['cuda_version'] or '-'}, triton "
             f"{meta['triton_version'] or '-'}, commit {meta['git_commit'] or '-'}, {meta['timestamp']}.", "",
             "Median us per call (share of the copy bandwidth, bytes 2|x|, bwd_all 3|x|); the derived columns "
             "are differences of medians in us: 2nd stage fwd = fwd_stats - fwd_nostats, NLL epilogue = "
             "train_fwd - fwd_stats, x read + sums bwd = bwd_all - bwd_dx, NLL grads bwd = train_bwd - bwd_all.", "",
             "| shape | dtype | layout | " + " | ".join(STAGES) + " | " + " | ".join(DERIVED) + " |",
             "|---|---|---|" + "---:|" * (len(STAGES) + len(DERIVED))]
    for case, stages in by_case.items():
        cells = [cell(stages.get(s)) for s in STAGES]
        for a, b in DERIVED.values():
            ta, tb = us(stages.get(a)), us(stages.get(b))
            cells.append(f"{ta - tb:.2f}" if ta is not None and tb is not None else "")
        lines.append(f"| {' | '.join(case)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DTYPES = ("float32", "bfloat16", "float16", "float64")


def split(values):  # "a,b c" and ["a", "b"] alike
    return [v for value in values for v in value.split(",") if v]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", nargs="+", help="shapes such as 256x64x56x56 32x256 (default: the GPU "
                                                   "targets on cuda, 4x8x6x6 on cpu)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--repeats", type=_cli.positive(int), help="timed replays per stage (default 50 cuda, 5 cpu)")
    parser.add_argument("--calls", type=_cli.positive(int), default=20, help="calls of the op per graph")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device-slug>/stages/)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    try:
        shapes = ([_cli.shape(s) for s in split(args.shapes)] if args.shapes else
                  GPU_TARGETS if device.type == "cuda" else [(4, 8, 6, 6)])
    except argparse.ArgumentTypeError as error:
        parser.error(f"argument --shapes: {error}")
    if not set(split(args.dtypes)) <= set(DTYPES):
        parser.error(f"argument --dtypes: each one of {DTYPES}, got {split(args.dtypes)}")
    dtypes, layouts = [getattr(torch, d) for d in split(args.dtypes)], split(args.layouts)
    if not set(layouts) <= set(LAYOUTS):
        sys.exit(f"--layouts: one of {LAYOUTS}")
    repeats = args.repeats or (50 if device.type == "cuda" else 5)
    meta = machine_info(device)
    out = args.out or BENCH_DIR / "results" / meta["slug"] / "stages"
    out.mkdir(parents=True, exist_ok=True)
    cache_bytes = last_level_cache_bytes(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    start, rows = time.perf_counter(), []
    with torch.no_grad():
        for shape, dtype in itertools.product(shapes, dtypes):
            for layout in [lay for lay in layouts if len(shape) == 4 or lay == "contiguous"]:
                case_rows = run_case(shape, dtype, layout, device, args.calls, repeats, cache_bytes)
                rows += case_rows
                times = ", ".join(f"{r['stage']} {r['median_ms'] * 1e3:.1f}" if "median_ms" in r else
                                  f"{r['stage']} FAILED ({r['error']})" for r in case_rows)
                print(f"[{time.perf_counter() - start:6.1f} s] {case_rows[0]['shape']} {case_rows[0]['dtype']} "
                      f"{layout}: us/call {times}", flush=True)
                write(out, rows, meta)  # after every case: a run cut off keeps what it measured
    print("\n" + markdown(rows, meta) + f"\nresults in {out}", flush=True)
    return rows


def write(out: Path, rows, meta) -> None:
    with (out / "stages.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: fmt(v) for k, v in {**meta, **row}.items()} for row in rows)
    (out / "stages.md").write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()
