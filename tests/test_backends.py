"""The package without its compiled extension: it must import and run through the reference
backend, and say why when a compiled backend is asked for (checked in a fresh interpreter in which
importing batchless_kernels._C fails)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["batchless_kernels._C"] = None  # makes `from . import _C` raise ImportError
    import torch
    import batchless_kernels as bk

    available = bk.available_backends("cpu")  # (+ triton, where its interpreter is on)
    assert available[0] == "reference" and "cpu" not in available, available
    x = torch.randn(4, 3, 5, requires_grad=True)
    mean = torch.zeros(3, requires_grad=True)
    std_param = torch.zeros(3, requires_grad=True)
    y, nll = bk.batchless_norm(x, mean, std_param)  # auto -> reference
    ref_y, ref_nll = bk.reference.batchless_norm(x, mean, std_param)
    assert torch.equal(y, ref_y) and torch.equal(nll, ref_nll)
    (y.sum() + nll).backward()
    assert x.grad is not None and std_param.grad is not None
    try:
        bk.batchless_norm(x, mean, std_param, backend="cpu")
    except RuntimeError as error:
        assert "could not be loaded" in str(error), error
    else:
        raise SystemExit("backend='cpu' without the extension did not raise")
    layer = bk.BatchlessNorm2d(3)
    out = layer(torch.randn(2, 3, 4, 4))
    assert out.shape == (2, 3, 4, 4) and bk.nll_loss(layer).requires_grad
    print("ok")
    """
)


def test_works_without_the_extension():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_an_unbuilt_extension_is_named_with_the_way_to_build_it(tmp_path):
    """The package copied without its compiled library: the error said "cannot import name '_C' from
    partially initialized module ... (most likely due to a circular import)"."""
    import pathlib
    import shutil

    package = pathlib.Path(__file__).resolve().parents[1] / "batchless_kernels"
    shutil.copytree(package, tmp_path / "batchless_kernels", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    script = ("import torch, batchless_kernels as bk\n"
              "assert bk.available_backends('cpu')[0] == 'reference'\n"
              "bk.batchless_norm(torch.randn(2, 3), torch.zeros(3), torch.zeros(3), backend='cpu')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "batchless_kernels._C is not built" in result.stderr and "pip install --no-build-isolation -e ." in result.stderr, \
        result.stderr[-2000:]
