"""A small CNN on scikit-learn's bundled handwritten digits, for every normalization and batch size:
the paper's CIFAR-10 experiment (v2) scaled down to a data set that ships with a package.

Data: sklearn.datasets.load_digits (1797 8x8 grey images, 10 classes; bundled, no download; needs
scikit-learn), pixels scaled to [0, 1], split once (stratified, fixed seed) into 1438 training and
359 validation images.

Network (`_common.DigitsCNN`, the pattern of the paper's CIFAR network): conv(16, 3x3) -> LeakyReLU
-> norm -> dropout 0.25 -> maxpool 2; conv(32, 3x3) -> LeakyReLU -> norm -> dropout -> maxpool 2;
dense(64) -> LeakyReLU -> norm -> dropout; dense(10) (cross-entropy on the logits). PyTorch's default
initialization. Adam, the same learning rate for every cell; the BLN variants add bk.nll_loss(model)
to the loss, and their mean/std are first set by bk.init_from_data on --init-samples (256) training
images (the paper's data-dependent initialization; --bln-init default keeps mean 0, std 1).

Every cell trains for --epochs epochs (default 4), reshuffled each epoch, or for more epochs where
those make fewer than --min-steps optimizer steps (default 250: the large batches, e.g. 45 epochs at
batch size 256), so that every batch size gets a fair number of updates; the epochs each cell ran
are in results.json/csv. The last incomplete batch of an epoch is dropped when it has a single image
(BatchNorm cannot take it). BN is
skipped at batch size 1; BRN runs there (no error) but its one-instance batch statistics are degenerate
for the dense layer. After every epoch the model is evaluated (eval mode) on the validation set;
reported per cell: the best validation loss and the best validation accuracy over the epochs
(as the paper), mean ± std over --seeds seeds, and the final ones in results.json/csv.

Default run: about 2 minutes on 2 CPU cores (more under load). `--full`: batch sizes 1 to 1024 (powers of 4 and 1024),
5 seeds, 30 epochs, at least 600 steps, the CNN at 32/64 channels. `--smoke`: a seconds-long plumbing check.
Outputs in examples/results/digits_cnn/: results.md, results.json, results.csv, metrics.png,
curves.png.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from batchless_kernels import _cli  # noqa: E402

NAME = "digits_cnn"


def run_one(job: dict) -> dict:
    a = job["args"]
    norm, bs, seed = job["norm"], job["batch_size"], job["seed"]
    device = torch.device(a["device"])
    x_tr, y_tr, x_va, y_va = (t.to(device) for t in job["data"])
    n_tr = len(x_tr)
    steps_per_epoch = n_tr // bs + (1 if n_tr % bs > 1 else 0)
    epochs = max(a["epochs"], -(-a["min_steps"] // steps_per_epoch))
    total_steps = steps_per_epoch * epochs
    C.set_seed(seed)
    model = C.DigitsCNN(norm, c1=a["c1"], c2=a["c2"], hidden=a["hidden"], dropout=a["dropout"],
                        momentum=a["momentum"], brn_warmup_steps=total_steps // 20,
                        brn_relax_steps=total_steps // 4).to(device)
    gen = torch.Generator().manual_seed(seed + 7919)
    C.init_bln(model, norm, a, x_tr, gen)
    opt = C.make_adam(model.parameters(), lr=a["lr"])

    curve, diverged = [], False
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n_tr, generator=gen).to(device)
        tr_sum, tr_n = 0.0, 0
        for i in range(0, n_tr, bs):
            idx = order[i:i + bs]
            if len(idx) < 2 and bs > 1:
                continue
            tr_sum += C.train_step(model, opt, norm, x_tr[idx], y_tr[idx]) * len(idx)
            tr_n += len(idx)
        train_loss = tr_sum / max(tr_n, 1)
        val_loss, val_acc = C.evaluate(model, x_va, y_va)
        curve.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc})
        if not math.isfinite(train_loss) or not math.isfinite(val_loss):
            diverged = True
            break
    finite = [c for c in curve if math.isfinite(c["val_loss"])]
    return {
        "norm": norm, "batch_size": bs, "seed": seed, "epochs": epochs, "steps": total_steps,
        "best_val_loss": min(c["val_loss"] for c in finite) if finite else float("nan"),
        "best_val_acc": max(c["val_acc"] for c in finite) if finite else float("nan"),
        "best_epoch": min(finite, key=lambda c: c["val_loss"])["epoch"] if finite else None,
        "final_val_loss": curve[-1]["val_loss"], "final_val_acc": curve[-1]["val_acc"],
        "diverged": diverged, "train_time_s": round(time.time() - t0, 2), "curve": curve,
    }


def parse_args(argv=None):
    p = C.arg_parser(__doc__)
    p.add_argument("--batch-sizes", default="1,4,16,64,256")
    p.add_argument("--seeds", type=_cli.positive(int), default=5, help="seeds per cell")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--epochs", type=_cli.positive(int), default=4, help="epochs, every cell (see --min-steps)")
    p.add_argument("--min-steps", type=_cli.nonnegative(int), default=250,
                   help="cells whose epochs make fewer steps train for more epochs, up to this many steps")
    p.add_argument("--lr", type=_cli.positive(float), default=2e-3, help="Adam learning rate (every cell)")
    p.add_argument("--c1", type=_cli.positive(int), default=16)
    p.add_argument("--c2", type=_cli.positive(int), default=32)
    p.add_argument("--hidden", type=_cli.positive(int), default=64)
    p.add_argument("--dropout", type=_cli.fraction(), default=0.25)
    p.add_argument("--momentum", type=_cli.fraction(high_closed=True), default=0.1, help="BN/BRN running-statistics momentum")
    p.add_argument("--bln-init", choices=("data", "default"), default="data",
                   help="BLN mean/std: bk.init_from_data on --init-samples training images, or 0 and 1")
    p.add_argument("--init-samples", type=_cli.positive(int), default=256)
    p.add_argument("--val-fraction", type=_cli.number(float, 0, 1), default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    C.add_run_args(p, NAME, "batch sizes 1..1024, 5 seeds, 30 epochs, min 600 steps, 32/64 channels")
    return C.parse_with_presets(
        p, argv, full=dict(batch_sizes="1,4,16,64,256,1024", seeds=5, epochs=30, min_steps=600, c1=32, c2=64),
        smoke=dict(batch_sizes="2,64", seeds=1, epochs=1, min_steps=2, c1=4, c2=8, hidden=8, init_samples=32))


def main(argv=None) -> dict:
    args = parse_args(argv)
    sw = C.Sweep.from_args(NAME, args)

    x_tr, y_tr, x_va, y_va = C.load_digits_tensors(args.val_fraction, args.split_seed)
    if args.smoke:
        x_tr, y_tr, x_va, y_va = x_tr[:128], y_tr[:128], x_va[:64], y_va[:64]
    records, wall = sw.run(run_one, sw.jobs((x_tr, y_tr, x_va, y_va)))

    meta = sw.meta(wall, n_train=len(x_tr), n_val=len(x_va))
    md = render_markdown(records, sw.norms, sw.batch_sizes, args, meta)
    return C.finish(sw.outdir, markdown=md, meta=meta, records=records, quiet=args.quiet,
                    plots=lambda: plots(sw.outdir, records, sw.norms, sw.batch_sizes))


def render_markdown(records, norms, batch_sizes, args, meta) -> str:
    init = (f"bk.init_from_data on {args.init_samples} training images" if args.bln_init == "data"
            else "mean 0, std 1")
    head = (f"sklearn digits ({meta['n_train']} training / {meta['n_val']} validation 8x8 images), "
            f"CNN conv{args.c1}-conv{args.c2}-dense{args.hidden}, {args.epochs} epochs per cell or more "
            f"for at least {args.min_steps} steps, Adam lr "
            f"{args.lr:g}, BLN init: {init}; {len(meta['seeds'])} seeds per cell (mean ± std over seeds).\n")
    return "".join([
        "# Digits CNN\n", head, C.meta_markdown(meta),
        "\n## Best validation loss over the epochs (lower is better; bold: best mean per batch size)\n\n",
        C.pivot_table(records, "best_val_loss", norms, batch_sizes, bold_best="min"),
        "\n## Best validation accuracy over the epochs (bold: best mean per batch size)\n\n",
        C.pivot_table(records, "best_val_acc", norms, batch_sizes, bold_best="max"),
    ])


def plots(outdir, records, norms, batch_sizes) -> None:
    C.plot_metrics_vs_batch(
        outdir / "metrics.png", records, norms, batch_sizes,
        [("best_val_loss", "best validation loss", True), ("best_val_acc", "best validation accuracy", False)],
        "Digits CNN: mean over seeds, bars min..max")

    def val_curve(norm, bs):  # the validation loss per epoch, mean over seeds
        rs = [r for r in records if r["norm"] == norm and r["batch_size"] == bs]
        if not rs:
            return None
        n_ep = min(len(r["curve"]) for r in rs)
        mean = [sum(r["curve"][e]["val_loss"] for r in rs) / len(rs) for e in range(n_ep)]
        return list(range(1, n_ep + 1)), mean

    C.plot_by_batch_size(batch_sizes, norms, val_curve, "validation loss (mean over seeds)",
                         outdir / "curves.png", panel_size=(3.4, 3.0), markers=True)


if __name__ == "__main__":
    main()
