"""The model-level benchmark (bench/bench_models.py): a smoke run on a tiny ResNet at tiny sizes,
eager and compiled, with the memory-budget experiment, where torchvision and timm import (they need
the CUDA build of torch on the CPU machines: skipped, with the reason, on the CPU build); and its
report logic on made-up rows everywhere."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_models  # noqa: E402

import batchless_kernels as bk  # noqa: E402

MISSING = bench_models.have_model_libraries()
needs_models = pytest.mark.skipif(MISSING is not None, reason=f"torchvision/timm do not import here: {MISSING}")
TINY = ["--device", "cpu", "--models", "resnet-tiny", "--image-size", "16", "--batch-size", "2", "--budget", "0",
        "--min-steps", "1", "--warmup", "1"]


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@needs_models
def test_smoke_eager_and_memory_budget(tmp_path, capsys):
    rows = bench_models.main([*TINY, "--modes", "eager", "--memory-batches", "2", "4", "--memory-budget-mb", "1e6",
                              "--out", str(tmp_path)])
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    written = read_rows(tmp_path / "results.csv")
    assert len(written) == len(rows)
    steps = [r for r in written if r["experiment"] == "train_step"]
    variants = {(r["norm"], r["backend"]) for r in steps}
    assert ("batchnorm", "native") in variants
    assert {b for n, b in variants if n == "batchless"} == {b for b in bk.available_backends("cpu") if b != "triton"}
    for r in steps:
        assert float(r["imgs_per_s"]) > 0 and float(r["median_ms"]) > 0 and r["peak_step_mb"] != ""
        assert r["device_name"] and r["torchvision_version"] and r["timm_version"]
    memory = [r for r in written if r["experiment"] == "memory"]
    assert {(r["norm"], r["batch"], r["micro_batch"]) for r in memory} >= {
        ("batchnorm", "2", "0"), ("batchnorm", "4", "0"), ("batchless", "4", "1"), ("batchless", "4", "0")}
    summary = (tmp_path / "summary.md").read_text()
    assert "| resnet-tiny | batchnorm |" in summary and "## Memory budget" in summary
    assert "largest batch within 1000000 MB: **every measured batch, up to 4**" in summary
    assert f"results in {tmp_path}" in capsys.readouterr().out


@needs_models
def test_smoke_compiled_and_reference_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_models, "BENCH_DIR", tmp_path)
    backend = bk.available_backends("cpu")[0]
    rows = bench_models.main([*TINY, "--modes", "compiled", "--variants", "batchnorm", f"batchless-{backend}",
                              "--memory-batches", "--update-reference"])
    assert [(r["norm"], r["mode"]) for r in rows] == [("batchnorm", "compiled"), ("batchless", "compiled")]
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    written = list((tmp_path / "results").glob("*/models/results.csv"))
    assert len(written) == 1 and not (tmp_path / "runs").exists()
    assert "speedup_vs_batchnorm" in read_rows(written[0])[1]


@needs_models
def test_efficientnet_norm_act_unfused_same_function():
    """timm's BatchNormAct2d (BN + drop + act in one forward) is split so that convert_batchnorm
    converts it; the split model computes the same function, and no BatchNorm is left after."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        bench_models.unfuse_norm_act(model)
        assert torch.allclose(model(x), before, rtol=1e-5, atol=1e-6)
    converted = bench_models.build_model("efficientnet_b0", "reference")
    assert not [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert sum(isinstance(m, bk.BatchlessNorm2d) for m in converted.modules()) > 40


def test_budget_verdicts_and_summary_from_rows():
    class Args:
        image_size, batch_size, dtype, channels_last, micro_batch, memory_budget_mb = 64, 8, "float32", False, 1, 50.0

    def mem(norm, backend, batch, micro, peak):
        return dict(experiment="memory", model="resnet18", norm=norm, backend=backend, mode="eager", batch=batch,
                    micro_batch=micro, peak_step_mb=peak, imgs_per_s=10.0, unreliable="")

    rows = [
        dict(experiment="train_step", model="resnet18", norm="batchnorm", backend="native", mode="eager", batch=8,
             micro_batch=0, imgs_per_s=100.0, peak_step_mb=40.0, first_step_s=0.5, unreliable=""),
        dict(experiment="train_step", model="resnet18", norm="batchless", backend="cpu", mode="eager", batch=8,
             micro_batch=0, imgs_per_s=120.0, peak_step_mb=41.0, first_step_s=0.4, unreliable="other load 0.60 cores"),
        dict(experiment="train_step", model="resnet18", norm="batchless", backend="cpu", mode="compiled", batch=8,
             micro_batch=0, error="RuntimeError: boom", unreliable=""),
        mem("batchnorm", "native", 2, 0, 12.0), mem("batchnorm", "native", 4, 0, 24.0), mem("batchnorm", "native", 8, 0, 60.0),
        mem("batchless", "cpu", 2, 1, 7.0), mem("batchless", "cpu", 8, 1, 7.5),
    ]
    verdicts = bench_models.budget_verdicts(rows, 50.0)
    assert verdicts[0].startswith("- batchnorm, whole batch: largest batch within 50 MB: **4**")
    assert "micro-batches of 1: largest batch within 50 MB: **every measured batch, up to 8**" in verdicts[1]
    meta = dict(device_name="cpu", torch_version="2", torchvision_version="", timm_version="", cuda_version="",
                triton_version="", num_threads=2, git_commit="", timestamp="t", malloc_env="", cpu_isa="AVX2")
    summary = bench_models.summary_markdown(rows, meta, Args, 1.0)
    assert "| resnet18 | batchless-cpu | 120 (1.20x, 41 MB) | failed | 0.4 / - | other load 0.60 cores |" in summary
    assert "batchless-cpu compiled failed: RuntimeError: boom" in summary
    assert "| 8 | 60 MB, 10 img/s | 7.5 MB, 10 img/s |" in summary
