"""Differentially private training (DP-SGD, Opacus) of the digits CNN, at a fixed privacy budget:
no normalization, GroupNorm (what Opacus tells BatchNorm users to switch to), and each batchless
parametrization, which keeps a BatchNorm-like learned normalization under DP (BatchNorm itself has no
per-sample gradients: Opacus rejects it).

Data and network: as examples/digits_cnn.py (sklearn's 1438 training / 359 validation 8x8 digits;
conv-LeakyReLU-norm-dropout-maxpool twice, dense-LeakyReLU-norm-dropout, dense 10; dropout 0 unless
--dropout is given). GroupNorm uses
groups of 4 channels. The batchless layers start at mean 0, std 1: data-dependent initialization
(init_from_data) would read the private data outside the privacy accounting.

DP-SGD: Opacus' PrivacyEngine.make_private, with the noise make_private_with_epsilon computes, Poisson sampling (expected batch size
--batch-size), per-sample gradients clipped to --max-grad-norm, the noise set so that --epochs epochs
spend (--epsilon, --delta); the accountant's (RDP) epsilon at the end is reported. The batchless layers'
per-sample gradients, NLL term included (mean and std_param are trained on the data too, so they are
clipped and noised like every weight), come from batchless_kernels.privacy. Adam, the same learning
rate for every normalization.

Reported per normalization: the best and the final validation accuracy and loss, mean ± std over
--seeds seeds; in results.json every run's curve. Default run: a few minutes on 2 CPU cores. --smoke:
a seconds-long plumbing check. Outputs in examples/results/dp_digits/: results.md, results.json,
results.csv, curves.png.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from batchless_kernels import _cli  # noqa: E402

NAME = "dp_digits"
NORMS = {"none": "no normalization", "gn": "nn.GroupNorm (groups of 4 channels)",
         **{n: C.NORMS[n] for n in C.BLN_PARAMETRIZATION}}


def make_norm(norm: str, num_features: int, dim: int, **_) -> nn.Module:
    if norm == "gn":
        return nn.GroupNorm(max(1, num_features // 4), num_features)
    return C.make_norm(norm, num_features, dim)


def run_one(job: dict) -> dict:
    from opacus import PrivacyEngine

    import batchless_kernels.privacy  # noqa: F401  (registers the Batchless grad samplers)

    a, norm, seed = job["args"], job["norm"], job["seed"]
    x_tr, y_tr, x_va, y_va = job["data"]
    C.set_seed(seed)
    model = C.DigitsCNN(norm, c1=a["c1"], c2=a["c2"], hidden=a["hidden"], dropout=a["dropout"], norm_factory=make_norm)
    optimizer = C.make_adam(model.parameters(), lr=a["lr"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr, y_tr), batch_size=a["batch_size"],
                                         generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure RNG off: an experiment, not a deployment
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=job["noise_multiplier"],
            max_grad_norm=a["max_grad_norm"])
    curve, t0 = [], time.time()
    for epoch in range(a["epochs"]):
        model.train()
        # Poisson sampling can draw an empty batch: its step (noise only) runs too, as the accountant counts it
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # full backward hooks on modules whose inputs need no grad
                C.total_loss(model, F.cross_entropy(model(xb), yb), norm).backward()
            optimizer.step()
        val_loss, val_acc = C.evaluate(model, x_va, y_va)
        curve.append({"epoch": epoch + 1, "val_loss": val_loss, "val_acc": val_acc,
                      "epsilon": engine.get_epsilon(a["delta"])})
    finite = [c for c in curve if math.isfinite(c["val_loss"])]
    return {
        "norm": norm, "seed": seed, "epochs": a["epochs"], "noise_multiplier": optimizer.noise_multiplier,
        "epsilon": curve[-1]["epsilon"], "delta": a["delta"],
        "best_val_acc": max(c["val_acc"] for c in finite) if finite else float("nan"),
        "best_val_loss": min(c["val_loss"] for c in finite) if finite else float("nan"),
        "final_val_acc": curve[-1]["val_acc"], "final_val_loss": curve[-1]["val_loss"],
        "train_time_s": round(time.time() - t0, 2), "curve": curve,
    }


def parse_args(argv=None):
    p = C.arg_parser(__doc__, NORMS)
    p.add_argument("--epsilon", type=_cli.positive(float), default=3.0, help="privacy budget epsilon for the whole training")
    p.add_argument("--delta", type=_cli.number(float, 0, 1), default=1e-5, help="in (0, 1)")
    p.add_argument("--max-grad-norm", type=_cli.positive(float), default=1.0, help="per-sample gradient clipping norm")
    p.add_argument("--batch-size", type=_cli.positive(int), default=64, help="expected (Poisson) batch size")
    p.add_argument("--epochs", type=_cli.positive(int), default=15)
    p.add_argument("--seeds", type=_cli.positive(int), default=3)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--lr", type=_cli.positive(float), default=3e-3, help="Adam learning rate (every normalization)")
    p.add_argument("--c1", type=_cli.positive(int), default=16)
    p.add_argument("--c2", type=_cli.positive(int), default=32)
    p.add_argument("--hidden", type=_cli.positive(int), default=64)
    p.add_argument("--dropout", type=_cli.fraction(), default=0.0)
    C.add_run_args(p, NAME, "5 seeds, 30 epochs", device_default="cpu (Opacus' hooks on these tiny models)")
    args = C.parse_with_presets(p, argv, full=dict(seeds=5, epochs=30),
                                smoke=dict(seeds=1, epochs=1, c1=4, c2=8, hidden=8))
    args.norm_list = C.parse_norms(args.norms, NORMS)  # checked here, before any work
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    norms = args.norm_list
    device = C.pick_device(args.device or "cpu")  # Opacus' per-sample hooks on these tiny models: the CPU is enough
    workers = args.workers or (1 if args.smoke else C.default_workers(device))
    outdir = C.results_dir(NAME, args.out)
    data = C.load_digits_tensors()
    if args.smoke:
        data = (data[0][:128], data[1][:128], data[2][:64], data[3][:64])
    seeds = list(range(args.seed0, args.seed0 + args.seeds))
    # The noise that spends the budget over the run, as make_private_with_epsilon computes it (sample
    # rate 1 / batches per epoch), once for every job: the accountant's search took ~10 s a job.
    from opacus.accountants.utils import get_noise_multiplier

    noise_multiplier = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=args.delta,
                                            sample_rate=1 / math.ceil(len(data[0]) / args.batch_size),
                                            epochs=args.epochs, accountant="rdp")
    jobs = [{"args": vars(args), "data": data, "norm": n, "seed": s, "noise_multiplier": noise_multiplier}
            for n in norms for s in seeds]
    t0 = time.time()
    records = C.run_jobs(run_one, jobs, workers, NAME, quiet=args.quiet)
    meta = {"script": NAME, "args": vars(args), "seeds": seeds, "norms": norms, "n_train": len(data[0]),
            "n_val": len(data[2]), "env": C.env_info(device, workers), "wall_time_s": time.time() - t0}
    return C.finish(outdir, markdown=render_markdown(records, norms, args, meta), meta=meta, records=records,
                    quiet=args.quiet, plots=lambda: plots(outdir, records, norms))


def render_markdown(records, norms, args, meta) -> str:
    eps = [r["epsilon"] for r in records]
    rows = []
    for n in norms:
        rs = [r for r in records if r["norm"] == n]
        rows.append([f"{n} ({NORMS[n]})"] + [C.fmt_mean_std([r[k] for r in rs]) for k in
                                             ("best_val_acc", "final_val_acc", "best_val_loss", "final_val_loss")]
                    + [f"{rs[0]['noise_multiplier']:.3g}" if rs else ""])
    return "".join([
        "# DP-SGD on the digits CNN\n",
        f"sklearn digits ({meta['n_train']} training / {meta['n_val']} validation 8x8 images), CNN conv{args.c1}-"
        f"conv{args.c2}-dense{args.hidden}, Opacus DP-SGD: target (epsilon, delta) = ({args.epsilon:g}, "
        f"{args.delta:g}) over {args.epochs} epochs, expected batch {args.batch_size} (Poisson), clip "
        f"{args.max_grad_norm:g}, Adam lr {args.lr:g}; accountant's final epsilon {min(eps):.3g} to {max(eps):.3g}. "
        f"{len(meta['seeds'])} seeds per normalization (mean ± std).\n",
        C.meta_markdown(meta), "\n",
        C.markdown_table(["normalization", "best val acc", "final val acc", "best val loss", "final val loss",
                          "noise multiplier"], rows),
    ])


def plots(outdir, records, norms) -> None:
    plt = C.plt_module()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, n in enumerate(norms):
        rs = [r for r in records if r["norm"] == n]
        if not rs:
            continue
        epochs = min(len(r["curve"]) for r in rs)
        mean = [sum(r["curve"][e]["val_acc"] for r in rs) / len(rs) for e in range(epochs)]
        ax.plot(range(1, epochs + 1), mean, marker="o", markersize=3, label=n, color=f"C{i}")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    C.save_fig(fig, outdir / "curves.png", title="DP-SGD digits CNN: validation accuracy (mean over seeds)",
               ylabel="validation accuracy")


if __name__ == "__main__":
    main()
