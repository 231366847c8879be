"""Smoke tests of the example scripts (examples/): each runs its `--smoke` setting (seconds) in this
process and writes its outputs to a temporary folder. The experiments themselves are not run here."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _script(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def _check_outputs(out: Path, records_len: int | None = None) -> dict:
    assert (out / "results.md").read_text().startswith("# ")
    payload = json.loads((out / "results.json").read_text())
    assert {"meta", "records"} <= set(payload)
    meta = payload["meta"]
    assert meta["env"]["torch"] and meta["env"]["device"] and meta["seeds"]
    if records_len is not None:
        assert len(payload["records"]) == records_len
    assert (out / "results.csv").exists()
    return payload


def test_spirals_smoke(tmp_path):
    res = _script("spirals").main(["--smoke", "--quiet", "--out", str(tmp_path)])
    # 6 norms x batch sizes (1, 8) x 1 seed, BN skipped at batch size 1
    payload = _check_outputs(tmp_path, records_len=11)
    for r in payload["records"]:
        assert {"norm", "batch_size", "seed", "val_loss", "val_acc", "conv_batches", "fluctuation"} <= set(r)
    assert not any(r["norm"] == "bn" and r["batch_size"] == 1 for r in payload["records"])
    md = res["markdown"]
    for section in ("Validation loss", "Batches to convergence", "Fluctuation"):
        assert section in md
    assert "| bln_inv |" in md


def test_spirals_convergence_metric():
    spirals = _script("spirals")
    # running median of 3: 5 (batch 3), 5, 4, 3, 2 (batch 7, the last new low), then 2 flat
    losses = [5, 5, 5, 4, 3, 2, 2, 2, 2.0, 2, 2, 2]
    assert spirals.batches_to_convergence(losses, window=3, tol=0.01) == 7
    import torch

    same = torch.full((4, 3, 2), 0.5)
    assert spirals.fluctuation(same) == pytest.approx(0.0, abs=1e-12)


def test_digits_cnn_smoke(tmp_path):
    pytest.importorskip("sklearn")
    _script("digits_cnn").main(["--smoke", "--quiet", "--out", str(tmp_path)])
    payload = _check_outputs(tmp_path, records_len=12)  # 6 norms x batch sizes (2, 64) x 1 seed
    for r in payload["records"]:
        assert {"best_val_loss", "best_val_acc", "curve", "epochs"} <= set(r)


def test_microbatch_smoke(tmp_path):
    res = _script("microbatch").main(["--smoke", "--quiet", "--out", str(tmp_path)])
    payload = _check_outputs(tmp_path)
    grads = {(r["norm"], r["dtype"]): r for r in payload["records"]}
    # batchless: micro-batches of 4 accumulate to the batch-16 gradient; BatchNorm: they do not
    assert grads["bln_log", "float64"]["m4"] < 1e-10
    assert grads["bn", "float64"]["m4"] > 1e-3
    assert str(grads["bn", "float64"]["m1"]).startswith("error")
    assert res["trajectories"]["bln_log"]["4"]["param_rel_diff"] < 1e-10
    assert {r["micro"] for r in payload["memory"]} == {16, 1, 4}


def test_dp_digits_smoke(tmp_path):
    pytest.importorskip("opacus", reason="opacus (the privacy feature's extra) is not installed")
    _script("dp_digits").main(["--smoke", "--quiet", "--out", str(tmp_path)])
    payload = _check_outputs(tmp_path, records_len=5)  # none, gn, three batchless parametrizations
    for r in payload["records"]:
        # the accountant spent the target budget (3) within its search tolerance, no more
        assert 2.5 < r["epsilon"] <= 3.0 + 1e-6 and r["noise_multiplier"] > 0, r["norm"]
        assert 0.0 <= r["final_val_acc"] <= 1.0


@pytest.mark.parametrize("script, argv, match", [
    ("spirals", ["--batch-sizes", "0"], "--batch-sizes: expected comma-separated positive ints"),
    ("spirals", ["--batch-sizes=-4"], "--batch-sizes: expected comma-separated positive ints"),
    ("microbatch", ["--micro", "0"], "--micro: expected comma-separated positive ints"),
    ("dp_digits", ["--batch-size", "0"], "argument --batch-size: '0' is not a positive int"),
    ("dp_digits", ["--delta", "2"], "argument --delta: '2' is not in (0, 1)"),
    ("dp_digits", ["--max-grad-norm=-1"], "argument --max-grad-norm: '-1' is not a positive float"),
    ("dp_digits", ["--norms", "bn"], "unknown norm 'bn'"),  # BatchNorm has no per-sample gradients
    ("dp_digits", ["--norms", ","], "--norms: expected comma-separated names"),
    ("spirals", ["--norms", ""], "--norms: expected comma-separated names"),
    # ran to exit 0 with empty tables, untrained models, a wrong split or a traceback naming nothing:
    ("spirals", ["--seeds", "0"], "argument --seeds: '0' is not a positive int"),
    ("spirals", ["--epochs", "-1"], "argument --epochs: '-1' is not a positive float"),
    ("spirals", ["--n-val", "0"], "argument --n-val: '0' is not a positive int"),
    ("spirals", ["--dropout", "2"], "argument --dropout: '2' is not in [0, 1)"),
    ("spirals", ["--noise", "nan"], "argument --noise: 'nan' is not in [0, inf)"),
    ("spirals", ["--workers", "0"], "argument --workers: '0' is not a positive int"),
    ("digits_cnn", ["--val-fraction", "-0.5"], "argument --val-fraction: '-0.5' is not in (0, 1)"),
    ("digits_cnn", ["--c1", "0"], "argument --c1: '0' is not a positive int"),
    ("microbatch", ["--image-size", "5"], "argument --image-size: '5' is not a multiple of 4"),
    ("microbatch", ["--train-steps", "-1"], "argument --train-steps: '-1' is not a positive int"),
    ("dp_digits", ["--epochs", "0"], "argument --epochs: '0' is not a positive int"),
])
def test_bad_flags_are_refused(tmp_path, script, argv, match, capsys):
    """A batch size of 0 raised ZeroDivisionError; -4 ran and reported a 'batch size -4' column; delta 2
    was reported as a privacy guarantee."""
    with pytest.raises(SystemExit) as exit_info:
        _script(script).main([*argv, "--quiet", "--out", str(tmp_path)])
    assert match in str(exit_info.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("script, argv, preset", [
    ("spirals", ["--smoke", "--epochs", "3", "--seeds", "2"], {"epochs": 3.0, "seeds": 2, "n_train": 200}),
    ("spirals", ["--full", "--batch-sizes", "4"], {"batch_sizes": "4", "seeds": 10, "epochs": 50}),
    ("digits_cnn", ["--smoke", "--c1", "6"], {"c1": 6, "c2": 8, "epochs": 1}),
    ("microbatch", ["--smoke", "--rss", "--norms", "bln_log"], {"rss": True, "norms": "bln_log", "seeds": 1}),
    ("dp_digits", ["--smoke", "--epochs", "2", "--workers", "2"], {"epochs": 2, "workers": 2, "seeds": 1}),
])
def test_presets_keep_explicit_options(script, argv, preset):
    """--smoke and --full overwrote options given with them (`--smoke --epochs 3` ran 1 epoch)."""
    args = _script(script).parse_args(argv)
    assert {k: getattr(args, k) for k in preset} == preset


def test_smoke_and_full_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        _script("spirals").parse_args(["--smoke", "--full"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["spirals", "digits_cnn", "microbatch", "dp_digits"])
def test_help_shows_every_default(script, capsys):
    """--help showed no default for options without a help text (--epochs, --width, ...), and a second
    "(default: None)" after those whose text gives it: every option but -h now says its default once."""
    with pytest.raises(SystemExit):
        _script(script).parse_args(["--help"])
    options = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    blocks = [" ".join(b.split()) for b in re.split(r"\n(?=  -)", options) if b.strip()]
    assert len(blocks) > 10
    for block in blocks:
        if not block.startswith("-h"):
            assert len(re.findall(r"\(default|default:", block)) == 1 and "(default: None)" not in block, block
