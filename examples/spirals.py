"""Two interleaved spirals: the paper's first experiment (v1), for every normalization and batch size.

Data: two classes of 2-D points on two interleaved spirals (class 1 is class 0 turned by 180
degrees), angle theta = sqrt(u) * turns * 2 pi with u uniform in [0, 1], radius theta / (turns * 2 pi),
plus Gaussian noise; separate training and validation points (drawn once, from --data-seed).

Network: dense(width) -> norm -> ISRLU -> dropout -> dense(width) -> norm -> ISRLU -> dropout ->
dense(2) -> softmax (cross-entropy on the logits). ISRLU(x) = x for x >= 0, x / sqrt(1 + a x^2) for
x < 0. Weights Glorot-uniform (U(-l, l), l = sqrt(6 / (fan_in + fan_out)); the Keras default of the
author's code), biases 0. AMSGrad (torch.optim.Adam(amsgrad=True)) with the same learning rate for
every cell and L2 weight decay on the dense weights (not on biases nor on normalization parameters).
The loss of the BLN variants is cross-entropy + bk.nll_loss(model). Their mean/std start from
bk.init_from_data on 256 training points (the paper's data-dependent initialization; eval mode, so
without dropout); `--bln-init default` keeps the layer's defaults, mean 0 and std 1, instead.

Every (norm, batch size) cell trains for the same number of examples seen (--epochs passes over the
training set, as a stream of reshuffled epochs cut into full batches), so a batch size b makes
epochs * n_train / b steps. BN is skipped at batch size 1 (it cannot normalize one value per
channel); BRN runs there (it does not raise) but its batch statistics of one instance are degenerate.

Metrics per run (then mean ± std over --seeds seeds per cell):
- val_loss, val_acc: cross-entropy and accuracy on the validation points after training, eval mode.
- conv_batches: batches to convergence. Let l_t be the training cross-entropy of batch t (the batch
  mean, before the step, in training mode) and m_t the running median of l over the W batches
  t-W+1..t, with W = max(5, round(conv_window * T)) for T batches in all (default conv_window 0.05:
  5% of the run, the same share of training for every batch size). Batch t (>= W) sets a new low if
  m_t < (1 - conv_tol) * min_{W <= s < t} m_s (default conv_tol 0.01: a 1% improvement); t = W
  always does. conv_batches is the last batch that set a new low; conv_frac = conv_batches / T
  (near 1: still improving at the end of training).
- fluctuation: the softmax output at fixed probe points (a probe_grid x probe_grid grid over
  [-1.2, 1.2]^2) is recorded in eval mode at `snapshots` evenly spaced steps of the last fluct_frac
  (default 25%) of training; fluctuation = mean over snapshots k and probes j of
  KL(p_kj || mean_k p_kj) in nats. Eval mode for every norm (BN, BRN: running statistics), so it
  measures how much the deployable function moves from step to step, not batch-composition noise.

Default run: about 2 minutes on 2 CPU cores (more under load). `--full` runs the larger sweep (batch sizes 1 to 128 in
powers of 2, 10 seeds, 50 epochs). `--smoke` is a seconds-long check of the plumbing.
Outputs in examples/results/spirals/: results.md (tables), results.json and results.csv (every run,
with seeds, torch version, device), metrics.png, data.png, loss_curves.png.
"""

from __future__ import annotations

import bisect
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from batchless_kernels import _cli  # noqa: E402

NAME = "spirals"


# ------------------------------------------------------------------------------------------------
# Data and model
# ------------------------------------------------------------------------------------------------


def make_spirals(n: int, noise: float, turns: float, generator: torch.Generator):
    """n points (n // 2 per class) on two interleaved spirals; returns (x (n, 2) float32, y (n,))."""
    half = n // 2
    u = torch.rand(half, generator=generator)
    theta = u.sqrt() * turns * 2 * math.pi
    r = theta / (turns * 2 * math.pi)
    arm = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * half, 2, generator=generator)
    y = torch.cat([torch.zeros(half, dtype=torch.int64), torch.ones(half, dtype=torch.int64)])
    return x, y


def probe_points(k: int, lim: float = 1.2) -> torch.Tensor:
    g = torch.linspace(-lim, lim, k)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


class ISRLU(nn.Module):
    """Inverse square root linear unit: x for x >= 0, x / sqrt(1 + a x^2) for x < 0."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return torch.where(x >= 0, x, x * torch.rsqrt(1 + self.alpha * x * x))


def make_mlp(norm: str, width: int, dropout: float, alpha: float, **norm_kwargs) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(2, width), C.make_norm(norm, width, 1, **norm_kwargs), ISRLU(alpha), nn.Dropout(dropout),
        nn.Linear(width, width), C.make_norm(norm, width, 1, **norm_kwargs), ISRLU(alpha), nn.Dropout(dropout),
        nn.Linear(width, 2),
    )
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def batches_to_convergence(losses, window: int, tol: float) -> int:
    """The last batch (1-based) at which the running median of `window` batch losses set a new low
    (m_t < (1 - tol) * every earlier m_s); see the module docstring."""
    losses = [float(v) for v in losses]
    if len(losses) < window:
        return len(losses)
    win = sorted(losses[:window])
    best = win[(window - 1) // 2] if window % 2 else 0.5 * (win[window // 2 - 1] + win[window // 2])
    last = window
    for t in range(window, len(losses)):
        win.pop(bisect.bisect_left(win, losses[t - window]))
        bisect.insort(win, losses[t])
        m = win[(window - 1) // 2] if window % 2 else 0.5 * (win[window // 2 - 1] + win[window // 2])
        if m < (1 - tol) * best:
            last = t + 1
        best = min(best, m)
    return last


def fluctuation(probs: torch.Tensor) -> float:
    """probs (K snapshots, P probes, classes): mean over k, j of KL(p_kj || mean_k p_kj) in nats."""
    p = probs.double().clamp_min(1e-12)
    pbar = p.mean(0, keepdim=True)
    return float((p * (p.log() - pbar.log())).sum(-1).mean())


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


def run_one(job: dict) -> dict:
    a = job["args"]
    norm, bs, seed = job["norm"], job["batch_size"], job["seed"]
    device = torch.device(a["device"])
    data = job["data"]
    x_tr, y_tr, x_va, y_va, probes = (t.to(device) for t in data)
    n_tr = len(x_tr)
    steps = max(1, int(a["epochs"] * n_tr) // bs)
    C.set_seed(seed)
    model = make_mlp(norm, a["width"], a["dropout"], a["isrlu_alpha"], momentum=a["momentum"],
                     brn_warmup_steps=steps // 20, brn_relax_steps=steps // 4).to(device)
    C.init_bln(model, norm, a, x_tr, torch.Generator().manual_seed(seed + 104729))
    opt = C.make_adam(C.param_groups(model, a["weight_decay"]), lr=a["lr"], amsgrad=True)
    gen = torch.Generator().manual_seed(seed + 7919)

    n_snap = min(a["snapshots"], max(1, int(steps * a["fluct_frac"])))
    first = steps - max(1, int(steps * a["fluct_frac"]))
    snap_steps = set(np.linspace(first, steps - 1, n_snap).round().astype(int).tolist())
    snaps, losses = [], []
    order, pos = torch.randperm(n_tr, generator=gen), 0
    diverged = False
    t0 = time.time()
    model.train()
    for step in range(steps):
        if pos + bs > n_tr:  # next epoch: the rest of this one, then a fresh permutation
            order = torch.cat([order[pos:], torch.randperm(n_tr, generator=gen)])
            pos = 0
        idx = order[pos:pos + bs].to(device)
        pos += bs
        lv = C.train_step(model, opt, norm, x_tr[idx], y_tr[idx])
        losses.append(lv)
        if not math.isfinite(lv):
            diverged = True
            break
        if step in snap_steps:
            model.eval()
            with torch.no_grad():
                snaps.append(F.softmax(model(probes), -1).cpu())
            model.train()
    train_time = time.time() - t0

    val_loss, val_acc = C.evaluate(model, x_va, y_va, chunk=len(x_va))
    window = max(5, round(a["conv_window"] * steps))
    rec = {
        "norm": norm, "batch_size": bs, "seed": seed, "steps": steps, "examples": steps * bs,
        "val_loss": val_loss if not diverged else float("nan"),
        "val_acc": val_acc if not diverged else float("nan"),
        "conv_batches": batches_to_convergence(losses, window, a["conv_tol"]) if not diverged else None,
        "conv_window": window,
        "fluctuation": fluctuation(torch.stack(snaps)) if snaps and not diverged else float("nan"),
        "snapshots": len(snaps),
        "diverged": diverged, "train_time_s": round(train_time, 2),
    }
    rec["conv_frac"] = rec["conv_batches"] / steps if rec["conv_batches"] else None
    # the training-loss curve, thinned to at most 200 points of running means, for the plot
    k = max(1, len(losses) // 200)
    lc = np.asarray(losses[: len(losses) // k * k]).reshape(-1, k).mean(1)
    rec["loss_curve"] = [round(float(v), 5) for v in lc]
    rec["loss_curve_every"] = k
    if job.get("keep_model"):
        rec["_grid_probs"] = torch.stack(snaps)[-1] if snaps else None
    return rec


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = C.arg_parser(__doc__)
    p.add_argument("--batch-sizes", default="1,4,16,64,128")
    p.add_argument("--seeds", type=_cli.positive(int), default=3, help="seeds per cell")
    p.add_argument("--seed0", type=int, default=0, help="first seed (seeds seed0, seed0+1, ...)")
    p.add_argument("--epochs", type=_cli.positive(float), default=15, help="passes over the training set, every cell")
    p.add_argument("--n-train", type=_cli.positive(int), default=1000)
    p.add_argument("--n-val", type=_cli.positive(int), default=1000)
    p.add_argument("--noise", type=_cli.nonnegative(float), default=0.04, help="std of the Gaussian noise on the points")
    p.add_argument("--turns", type=_cli.positive(float), default=1.5, help="turns of each spiral")
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--width", type=_cli.positive(int), default=64)
    p.add_argument("--dropout", type=_cli.fraction(), default=0.1)
    p.add_argument("--isrlu-alpha", type=_cli.positive(float), default=1.0)
    p.add_argument("--bln-init", choices=("data", "default"), default="data",
                   help="BLN mean/std at the start: bk.init_from_data on --init-samples training points "
                        "(the paper's data-dependent initialization), or the layer's defaults (0, 1)")
    p.add_argument("--init-samples", type=_cli.positive(int), default=256)
    p.add_argument("--lr", type=_cli.positive(float), default=1e-2, help="AMSGrad learning rate (every cell)")
    p.add_argument("--weight-decay", type=_cli.nonnegative(float), default=1e-4, help="L2 on the dense weights")
    p.add_argument("--momentum", type=_cli.fraction(high_closed=True), default=0.1, help="BN/BRN running-statistics momentum")
    p.add_argument("--probe-grid", type=_cli.positive(int), default=20, help="probe points: a grid of this many squared")
    p.add_argument("--fluct-frac", type=_cli.fraction(high_closed=True, low_closed=False), default=0.25, help="share of training at the end with snapshots")
    p.add_argument("--snapshots", type=_cli.positive(int), default=50, help="snapshots of the probe outputs (at most)")
    p.add_argument("--conv-window", type=_cli.fraction(high_closed=True, low_closed=False), default=0.05, help="running-median window, share of the run")
    p.add_argument("--conv-tol", type=_cli.fraction(), default=0.01, help="relative improvement that counts as a new low")
    C.add_run_args(p, NAME, "the full sweep: batch sizes 1..128 (powers of 2), 10 seeds, 50 epochs")
    return C.parse_with_presets(
        p, argv, full=dict(batch_sizes="1,2,4,8,16,32,64,128", seeds=10, epochs=50),
        smoke=dict(batch_sizes="1,8", seeds=1, epochs=0.2, n_train=200, n_val=100, probe_grid=4, snapshots=5))


def main(argv=None) -> dict:
    args = parse_args(argv)
    sw = C.Sweep.from_args(NAME, args)
    norms, batch_sizes = sw.norms, sw.batch_sizes

    g = torch.Generator().manual_seed(args.data_seed)
    x_tr, y_tr = make_spirals(args.n_train, args.noise, args.turns, g)
    x_va, y_va = make_spirals(args.n_val, args.noise, args.turns, g)
    probes = probe_points(args.probe_grid)
    data = (x_tr, y_tr, x_va, y_va, probes)

    jobs = sw.jobs(data)
    for job in jobs:
        job["keep_model"] = job["batch_size"] in (batch_sizes[0], batch_sizes[-1])
    records, wall = sw.run(run_one, jobs)

    grids = {}
    for r in records:
        gp = r.pop("_grid_probs", None)
        if gp is not None and r["seed"] == sw.seeds[0]:
            grids[r["norm"], r["batch_size"]] = gp

    meta = sw.meta(wall)
    md = render_markdown(records, norms, batch_sizes, args, meta)
    return C.finish(sw.outdir, markdown=md, meta=meta, records=records, quiet=args.quiet,
                    plots=lambda: plots(sw.outdir, records, norms, batch_sizes, data, grids, args))


def render_markdown(records, norms, batch_sizes, args, meta) -> str:
    n_seeds = len(meta["seeds"])
    head = (f"Two spirals, {args.epochs:g} epochs of {args.n_train} training points per cell "
            f"(fixed examples seen), {n_seeds} seeds per cell (mean ± std over seeds), "
            f"AMSGrad lr {args.lr:g}, width {args.width}, BLN init: "
            f"{'bk.init_from_data on %d training points' % min(args.init_samples, args.n_train) if args.bln_init == 'data' else 'mean 0, std 1'}.\n")
    parts = ["# Two spirals\n", head, C.meta_markdown(meta)]
    parts += ["\n## Validation loss after training (lower is better; bold: best mean per batch size)\n\n",
              C.pivot_table(records, "val_loss", norms, batch_sizes, bold_best="min")]
    parts += ["\n## Validation accuracy after training\n\n",
              C.pivot_table(records, "val_acc", norms, batch_sizes, bold_best="max")]
    parts += ["\n## Batches to convergence (running-median training loss stops reaching new lows)\n\n",
              C.pivot_table(records, "conv_batches", norms, batch_sizes, digits=3)]
    parts += ["\nAs a share of the run's batches (near 1: still improving at the end):\n\n",
              C.pivot_table(records, "conv_frac", norms, batch_sizes, digits=2)]
    parts += ["\n## Fluctuation: mean KL of probe outputs to their mean over the last "
              f"{args.fluct_frac:.0%} of training (nats; lower is steadier)\n\n",
              C.pivot_table(records, "fluctuation", norms, batch_sizes, bold_best="min")]
    return "".join(parts)


def plots(outdir, records, norms, batch_sizes, data, grids, args) -> None:
    C.plot_metrics_vs_batch(
        outdir / "metrics.png", records, norms, batch_sizes,
        [("val_loss", "validation loss", True), ("conv_batches", "batches to convergence", True),
         ("fluctuation", "fluctuation (KL, nats)", True)],
        "Two spirals: mean over seeds, bars min..max")
    plt = C.plt_module()
    if plt is None:
        return
    x_tr, y_tr, x_va, y_va, probes = data
    # the data, and the last snapshot's P(class 1) on the probe grid for the first seed, at the
    # smallest and the largest batch size
    bss = [b for b in (batch_sizes[0], batch_sizes[-1])]
    bss = sorted(set(bss))
    fig, axes = plt.subplots(len(bss), len(norms) + 1, figsize=(2.6 * (len(norms) + 1), 2.6 * len(bss)),
                             squeeze=False)
    k = args.probe_grid
    for i, bs in enumerate(bss):
        ax = axes[i][0]
        ax.scatter(x_tr[:, 0], x_tr[:, 1], c=y_tr, s=3, cmap="coolwarm")
        ax.set_title("training points" if i == 0 else "")
        ax.set_ylabel(f"batch size {bs}")
        for j, norm in enumerate(norms):
            ax = axes[i][j + 1]
            gp = grids.get((norm, bs))
            if gp is not None:
                ax.imshow(gp[:, 1].reshape(k, k).numpy(), origin="lower", extent=(-1.2, 1.2, -1.2, 1.2),
                          cmap="coolwarm", vmin=0, vmax=1)
                ax.scatter(x_va[::5, 0], x_va[::5, 1], c=y_va[::5], s=1.5, cmap="coolwarm", vmin=-0.5,
                           vmax=1.5, edgecolors="none")
            else:
                ax.text(0, 0, "not run", ha="center", va="center")
            ax.set_title(norm if i == 0 else "")
        for ax in axes[i]:
            ax.set_xticks([]); ax.set_yticks([]); ax.set_xlim(-1.2, 1.2); ax.set_ylim(-1.2, 1.2)
    C.save_fig(fig, outdir / "data.png",
               title="Training data; P(class 1) at the probe grid at the end of training (first seed)")

    def loss_curve(norm, bs):  # the first seed's binned training loss against epochs
        rs = [r for r in records if r["norm"] == norm and r["batch_size"] == bs and r["seed"] == records[0]["seed"]]
        if not (rs and rs[0]["loss_curve"]):
            return None
        r = rs[0]
        xs = (np.arange(len(r["loss_curve"])) + 0.5) * r["loss_curve_every"] * bs / args.n_train
        return xs, r["loss_curve"]

    C.plot_by_batch_size(batch_sizes, norms, loss_curve, "training cross-entropy (binned mean)",
                         outdir / "loss_curves.png")


if __name__ == "__main__":
    main()
