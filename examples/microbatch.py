"""Micro-batching: with batchless normalization, a batch of 256 processed as micro-batches of 1, 8 or 64
with accumulated gradients gives the same gradients (and so the same training) as the batch of 256
in one go, with activation memory that scales with the micro-batch; with BatchNorm it does not.

Model: the digits CNN of `_common.DigitsCNN` without dropout (so that every pass is deterministic),
its BLN layers initialized by bk.init_from_data on a batch of other images, on --image-size x --image-size
images: sklearn's digits upsampled (bilinear) from 8x8 when scikit-learn is installed, else random
images and labels (results.json says which).

1. Gradients. For each normalization, a copy of the same initial model computes the gradient of
   loss = cross-entropy (mean over the batch) [+ bk.nll_loss(model) for BLN] on one batch of 256,
   (a) in one go, (b) as 256/m micro-batches of m (m = 1, 8, 64), each micro-batch's loss scaled by
   m/256 and its gradient accumulated. Both the batch-mean cross-entropy and BLN's NLL (a mean over
   every element) then sum to the batch-256 loss, so for BLN (b) equals (a) up to rounding.
   Reported: the max relative difference, max over parameter tensors of
   max|g_micro - g_full| / max|g_full|, in float64 and in float32. BatchNorm normalizes each
   micro-batch with its own statistics, so its gradients differ (and BatchNorm1d cannot take m = 1:
   reported as an error); BRN likewise. "none" (no normalization) is the control.
2. Training trajectories. --train-steps Adam steps (float64) on consecutive batches of 256, once in
   one go and once with micro-batches of each m: the per-step cross-entropies, and the max relative difference
   of the final parameters (max over tensors of max|p_micro - p_full| / max|p_full|).
3. Memory for one accumulated step of the batch of 256 at each micro-batch size, float32:
   - saved_mb: the largest total size of the tensors the autograd graph holds for backward at any
     time (torch.autograd.graph.saved_tensors_hooks; each storage counted once, parameters left
     out): the activation memory, which PyTorch's CPU allocator does not report;
   - rss_mb (CPU, --rss, default on): the growth of the peak resident set size (VmHWM in
     /proc/self/status on Linux, else getrusage's ru_maxrss) of a fresh Python process over its
     peak before the step (after a warm-up pass on 2 images), one process per (norm, micro-batch);
     it includes the allocator's transient buffers and the forward's temporaries, so it is coarser;
   - cuda_mb (GPU): torch.cuda.max_memory_allocated during the step minus the memory allocated before.

Default run: about 1 minute on 2 CPU cores; `--full`: image size 32, 20 training steps.
`--smoke`: a seconds-long plumbing check. Outputs in examples/results/microbatch/: results.md,
results.json, results.csv, trajectories.png, memory.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from batchless_kernels import _cli  # noqa: E402

NAME = "microbatch"


# ------------------------------------------------------------------------------------------------
# Data, model, one accumulated gradient
# ------------------------------------------------------------------------------------------------


def load_images(n: int, image_size: int, seed: int):
    """n images (1, s, s) and labels: the digits (upsampled) if scikit-learn is there, else random."""
    try:
        x, y, _, _ = C.load_digits_tensors(0.2, 0)
        source = "sklearn digits, bilinear upsampling from 8x8" if image_size != 8 else "sklearn digits"
        reps = -(-n // len(x))
        x, y = x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n]
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    except SystemExit:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 1, image_size, image_size, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        source = "random images and labels (scikit-learn not installed)"
    return x, y, source


def build(norm: str, a: dict, dtype, device, x_init=None) -> torch.nn.Module:
    """The initial model; BLN layers get bk.init_from_data on `x_init`."""
    C.set_seed(a["seed"])
    model = C.DigitsCNN(norm, c1=a["c1"], c2=a["c2"], hidden=a["hidden"], dropout=0.0,
                        image_size=a["image_size"], momentum=0.1)
    model = model.to(device=device, dtype=dtype)
    if C.is_batchless(norm) and x_init is not None:
        C.bk.init_from_data(model, x_init.to(device=device, dtype=dtype))
    return model.train()


def accumulate(model, norm: str, x, y, micro: int, memory: dict | None = None) -> float:
    """Accumulates into .grad the gradient of the batch loss over micro-batches of `micro`; returns
    the batch's cross-entropy. With `memory`, records the peak of the bytes saved for backward."""
    n = len(x)
    total = 0.0
    for i in range(0, n, micro):
        xb, yb = x[i:i + micro], y[i:i + micro]
        if memory is None:
            task = F.cross_entropy(model(xb), yb)
            loss = C.total_loss(model, task, norm) * (len(xb) / n)
        else:
            held, param_ptrs = {}, memory["param_ptrs"]

            def pack(t):
                # a tensor's own bytes (a view of a larger storage, e.g. the micro-batch slice of
                # the batch, counts its own elements only), each (address, size) once
                key = (t.data_ptr(), t.numel(), t.dtype)
                if t.data_ptr() not in param_ptrs and key not in held:
                    held[key] = t.numel() * t.element_size()
                    memory["saved"] = max(memory.get("saved", 0), sum(held.values()))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                task = F.cross_entropy(model(xb), yb)
                loss = C.total_loss(model, task, norm) * (len(xb) / n)
        loss.backward()
        total += task.item() * (len(xb) / n)
    return total


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def max_rel_diff(a, b) -> float:
    """max over tensors of max|a - b| / max|b| (tensors with b == 0 everywhere: max|a - b|)."""
    worst = 0.0
    for u, v in zip(a, b):
        scale = v.abs().max().item()
        d = (u - v).abs().max().item()
        worst = max(worst, d / scale if scale > 0 else d)
    return worst


# ------------------------------------------------------------------------------------------------
# The three measurements
# ------------------------------------------------------------------------------------------------


def gradient_check(norm, a, x, y, micros, dtype, device, x_init) -> dict:
    base = build(norm, a, dtype, device, x_init)
    xd, yd = x.to(device=device, dtype=dtype), y.to(device)
    full_model = copy.deepcopy(base)
    accumulate(full_model, norm, xd, yd, len(xd))
    g_full = grads_of(full_model)
    out = {}
    for m in micros:
        model = copy.deepcopy(base)
        try:
            accumulate(model, norm, xd, yd, m)
            out[m] = max_rel_diff(grads_of(model), g_full)
        except Exception as e:  # BatchNorm1d with one value per channel
            out[m] = f"error: {type(e).__name__}"
    return out


def trajectories(norm, a, x, y, micros, device, x_init) -> dict:
    """Per micro-batch size (and 'full'): per-step losses and the final parameters' difference."""
    base = build(norm, a, torch.float64, device, x_init)
    batch = a["batch"]
    xd, yd = x.to(device=device, dtype=torch.float64), y.to(device)
    result, final = {}, {}
    for m in ["full", *micros]:
        model = copy.deepcopy(base)
        opt = C.make_adam(model.parameters(), lr=a["lr"])
        losses = []
        try:
            for step in range(a["train_steps"]):
                xb = xd[step * batch:(step + 1) * batch]
                yb = yd[step * batch:(step + 1) * batch]
                opt.zero_grad(set_to_none=True)
                losses.append(accumulate(model, norm, xb, yb, batch if m == "full" else m))
                opt.step()
        except Exception as e:
            result[str(m)] = {"losses": losses, "error": type(e).__name__}
            continue
        final[m] = [p.detach().clone() for p in model.parameters()]
        result[str(m)] = {"losses": losses}
    for m in micros:
        if m in final:
            result[str(m)]["param_rel_diff"] = max_rel_diff(final[m], final["full"])
    return result


def memory_in_process(norm, a, x, y, micro, device) -> dict:
    model = build(norm, a, torch.float32, device, x[:8])
    xd, yd = x.to(device), y.to(device)
    mem = {"param_ptrs": {p.data_ptr() for p in model.parameters()}}
    res = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    try:
        accumulate(model, norm, xd, yd, micro, memory=mem)
    except Exception as e:
        return {"error": type(e).__name__}
    res["saved_mb"] = mem.get("saved", 0) / 2**20
    if device.type == "cuda":
        torch.cuda.synchronize()
        res["cuda_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return res


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: VmHWM of /proc/self/status on Linux (ru_maxrss
    would carry the parent's peak over fork + exec), else resource.getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def rss_child(spec: str) -> None:
    """Runs in a fresh process: one accumulated float32 step; prints the peak RSS growth as JSON."""
    cfg = json.loads(spec)
    torch.set_num_threads(1)
    a, norm, micro = cfg["args"], cfg["norm"], cfg["micro"]
    x, y, _ = load_images(a["batch"], a["image_size"], a["seed"])
    model = build(norm, a, torch.float32, torch.device("cpu"), x[:8])  # small: keep the peak low
    # warm up the code paths on a micro-batch of 2, then take the baseline peak
    accumulate(copy.deepcopy(model), norm, x[:2], y[:2], 2)
    before = peak_rss_mb()
    try:
        accumulate(model, norm, x, y, micro)
        print(json.dumps({"rss_mb": peak_rss_mb() - before, "rss_base_mb": before}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__}))


def rss_in_subprocess(norm, a, micro) -> dict:
    spec = json.dumps({"args": a, "norm": norm, "micro": micro})
    out = subprocess.run([sys.executable, __file__, "--rss-child", spec], capture_output=True, text=True,
                         timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _image_size(text: str) -> int:
    size = _cli.positive(int)(text)
    if size % 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of 4 (two 2x2 poolings)")
    return size


def parse_args(argv=None):
    p = C.arg_parser(__doc__)
    p.add_argument("--micro", default="1,8,64", help="micro-batch sizes")
    p.add_argument("--batch", type=_cli.positive(int), default=256, help="the (effective) batch size")
    p.add_argument("--image-size", type=_image_size, default=16, help="images are upsampled to this (multiple of 4)")
    p.add_argument("--c1", type=_cli.positive(int), default=32)
    p.add_argument("--c2", type=_cli.positive(int), default=64)
    p.add_argument("--hidden", type=_cli.positive(int), default=64)
    p.add_argument("--seed", type=int, default=0, help="initialization seed (every norm starts alike)")
    p.add_argument("--seeds", type=_cli.positive(int), default=2, help="initializations for the gradient check")
    p.add_argument("--train-steps", type=_cli.positive(int), default=6)
    p.add_argument("--lr", type=_cli.positive(float), default=1e-3, help="Adam learning rate of the trajectories")
    p.add_argument("--memory-norms", default="bln_log,bn", help="norms whose memory is measured")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure peak RSS in a fresh process per configuration (CPU)")
    C.add_run_args(p, NAME, "image size 32, 20 training steps, 3 seeds", workers=False)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    return C.parse_with_presets(
        p, argv, full=dict(image_size=32, train_steps=20, seeds=3),
        smoke=dict(image_size=8, c1=4, c2=8, hidden=8, batch=16, micro="1,4", train_steps=2, seeds=1,
                   rss=False, norms="bn,bln_log"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return {}
    norms = C.parse_norms(args.norms)
    mem_norms = [n for n in args.memory_norms.split(",") if n and n in norms]
    micros = C.parse_ints(args.micro, "--micro")
    for m in micros:
        if args.batch % m:
            raise SystemExit(f"micro-batch {m} does not divide the batch {args.batch}")
    C.check_toolkit(need_brn="brn" in norms, need_init=any(map(C.is_batchless, norms)))
    device = C.pick_device(args.device)
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    outdir = C.results_dir(NAME, args.out)
    a = {k: v for k, v in vars(args).items() if k != "rss_child"}
    # the training batches, then one more batch for the data-dependent init of the BLN layers
    x, y, source = load_images(args.batch * (max(args.train_steps, 1) + 1), args.image_size, args.seed)
    x_init = x[-args.batch:]
    seeds = list(range(args.seed, args.seed + args.seeds))

    t0 = time.time()
    n_tasks = len(norms) * len(seeds) * 2 + len(norms) + len(mem_norms) * (len(micros) + 1)
    bar = C.progress(n_tasks, NAME, disable=args.quiet)
    grad_records = []
    for norm in norms:
        for seed in seeds:
            for dtype in (torch.float64, torch.float32):
                diffs = gradient_check(norm, {**a, "seed": seed}, x[:args.batch], y[:args.batch], micros,
                                       dtype, device, x_init)
                grad_records.append({"norm": norm, "seed": seed, "dtype": str(dtype).replace("torch.", ""),
                                     **{f"m{m}": diffs[m] for m in micros}})
                bar.update(1)
    traj = {}
    for norm in norms:
        traj[norm] = trajectories(norm, a, x, y, micros, device, x_init)
        bar.update(1)
    mem_records = []
    for norm in mem_norms:
        for m in [args.batch, *micros]:
            rec = {"norm": norm, "micro": m, **memory_in_process(norm, a, x[:args.batch], y[:args.batch], m, device)}
            if args.rss and device.type == "cpu":
                rec.update({k if k != "error" else "rss_error": v for k, v in rss_in_subprocess(norm, a, m).items()})
            mem_records.append(rec)
            bar.update(1)
    bar.close()
    wall = time.time() - t0

    meta = {"script": NAME, "args": a, "seeds": seeds, "norms": norms, "micro": micros, "data": source,
            "env": C.env_info(device, 1), "wall_time_s": wall}
    md = render_markdown(grad_records, traj, mem_records, norms, micros, args, meta, device)
    with open(outdir / "memory.csv", "w") as f:
        keys = ["norm", "micro", "saved_mb", "rss_mb", "rss_base_mb", "cuda_mb", "error", "rss_error"]
        f.write(",".join(keys) + "\n")
        for r in mem_records:
            f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
    res = C.finish(outdir, markdown=md, meta=meta, records=grad_records, quiet=args.quiet,
                   plots=lambda: plots(outdir, traj, mem_records, norms, micros, args),
                   extra={"trajectories": traj, "memory": mem_records},
                   csv_fields=["norm", "seed", "dtype", *[f"m{m}" for m in micros]])
    return {**res, "trajectories": traj, "memory": mem_records}


def _cell(values) -> str:
    errs = [v for v in values if isinstance(v, str)]
    if errs:
        return errs[0].replace("error: ", "error (") + ")"
    return f"{max(values):.1e}"


def render_markdown(grad_records, traj, mem_records, norms, micros, args, meta, device) -> str:
    head = (f"CNN conv{args.c1}-conv{args.c2}-dense{args.hidden} (no dropout) on {args.image_size}x"
            f"{args.image_size} images ({meta['data']}); effective batch {args.batch}.\n")
    rows = []
    for norm in norms:
        row = [norm]
        for dt in ("float64", "float32"):
            for m in micros:
                vals = [r[f"m{m}"] for r in grad_records if r["norm"] == norm and r["dtype"] == dt]
                row.append(_cell(vals))
        rows.append(row)
    headers = ["norm"] + [f"{dt} m={m}" for dt in ("float64", "float32") for m in micros]
    grad_md = C.markdown_table(headers, rows)

    trows = []
    for norm in norms:
        t = traj[norm]
        row = [norm, " ".join(f"{v:.4f}" for v in t["full"]["losses"]) if "losses" in t["full"] else ""]
        for m in micros:
            tm = t[str(m)]
            row.append(f"error ({tm['error']})" if "error" in tm else f"{tm['param_rel_diff']:.1e}")
        trows.append(row)
    traj_md = C.markdown_table(["norm", f"cross-entropy per step, batch {args.batch} in one go"] + [f"params m={m}" for m in micros], trows)

    mem_md = ""
    if mem_records:
        cols = ["saved_mb"] + (["cuda_mb"] if device.type == "cuda" else []) + (
            ["rss_mb"] if args.rss and device.type == "cpu" else [])
        names = {"saved_mb": "saved for backward (MiB)", "cuda_mb": "CUDA peak growth (MiB)",
                 "rss_mb": "peak RSS growth (MiB)"}
        mrows = []
        for r in mem_records:
            label = f"{r['micro']}" + (" (one go)" if r["micro"] == args.batch else "")
            if "error" in r:
                mrows.append([r["norm"], label] + [f"error ({r['error']})"] * len(cols))
            else:
                mrows.append([r["norm"], label] + [
                    f"{r[c]:.1f}" if c in r else f"error ({r.get('rss_error', '?')})" for c in cols])
        mem_md = (f"\n## Memory of one step of the batch of {args.batch}, float32\n\n"
                  + C.markdown_table(["norm", "micro-batch"] + [names[c] for c in cols], mrows))

    return "".join([
        "# Micro-batching\n", head, C.meta_markdown(meta),
        f"\n## Gradient: micro-batches accumulated vs the batch of {args.batch} in one go\n\n"
        f"Max relative difference (max over parameter tensors of max|g_micro - g_full| / max|g_full|), "
        f"worst of {len(meta['seeds'])} initializations:\n\n", grad_md,
        f"\n## Training: {args.train_steps} Adam steps (lr {args.lr:g}, float64) on batches of {args.batch}\n\n"
        f"The batch cross-entropies of the run in one go, and the max relative difference of the final parameters "
        f"of the micro-batched runs from it:\n\n", traj_md, mem_md,
    ])


def plots(outdir, traj, mem_records, norms, micros, args) -> None:
    plt = C.plt_module()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(norms), figsize=(3.2 * len(norms), 3.0), squeeze=False, sharey=True)
    for ax, norm in zip(axes[0], norms):
        for m, style in zip(["full", *micros], ["-", "--", ":", "-."] * 3):
            t = traj[norm].get(str(m), {})
            if t.get("losses"):
                ax.plot(range(1, len(t["losses"]) + 1), t["losses"], style, marker="o", ms=3,
                        label="one go" if m == "full" else f"micro {m}")
        ax.set_title(norm); ax.set_xlabel("step"); ax.grid(alpha=0.3)
    C.save_fig(fig, outdir / "trajectories.png", ylabel="batch cross-entropy")
    if mem_records:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for norm in sorted({r["norm"] for r in mem_records}):
            rs = [r for r in mem_records if r["norm"] == norm and "saved_mb" in r]
            ax.plot([r["micro"] for r in rs], [r["saved_mb"] for r in rs], marker="o", label=f"{norm}: saved")
            rs = [r for r in rs if "rss_mb" in r]
            if rs:
                ax.plot([r["micro"] for r in rs], [r["rss_mb"] for r in rs], marker="s", ls="--",
                        label=f"{norm}: peak RSS growth")
        ax.set_xscale("log", base=2); ax.set_yscale("log")
        ax.set_xlabel("micro-batch size"); ax.set_ylabel("MiB"); ax.grid(alpha=0.3); ax.legend(fontsize=7)
        ax.set_title(f"Memory of one step of batch {args.batch} (float32)")
        C.save_fig(fig, outdir / "memory.png")


if __name__ == "__main__":
    main()
