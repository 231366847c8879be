"""auto's choice between the GPU backends: the table derived from benchmark rows, and its lookup."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from batchless_kernels import gpu_choice

_spec = importlib.util.spec_from_file_location(
    "derive_gpu_choice", Path(__file__).resolve().parents[1] / "bench" / "derive_gpu_choice.py")
derive_gpu_choice = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(derive_gpu_choice)


def _row(gpu, impl, shape, dtype, layout, ms, pass_name="fwd+bwd"):
    return {"device_name": gpu, "impl": impl, "pass": pass_name, "shape": shape, "dtype": dtype,
            "layout": layout, "median_ms": str(ms)}


@pytest.mark.parametrize("shape, contiguous, expected", [
    ((256, 64, 56, 56), True, "channels_first/bfloat16/large"),
    ((256, 64, 56, 56), False, "channels_last/bfloat16/large"),
    ((65536, 1024), True, "channels_last/bfloat16/large"),
    ((32, 256), True, "channels_last/bfloat16/small"),
    ((8, 3, 1, 1), True, "channels_last/bfloat16/small"),
    # the size boundary, SMALL_ELEMENTS = 2^20 elements: one below is small, exactly 2^20 is large
    ((1, 1, 1023, 1024), True, "channels_first/bfloat16/small"),
    ((1, 1, 1024, 1024), True, "channels_first/bfloat16/large"),
    ((1024, 1023), True, "channels_last/bfloat16/small"),
    ((1024, 1024), True, "channels_last/bfloat16/large"),
])
def test_case_key(shape, contiguous, expected):
    assert gpu_choice.case_key(shape, "bfloat16", contiguous) == expected


def test_derive_picks_the_faster_backend_per_case():
    rows = [
        # channels-first large: cuda faster on both shapes
        _row("H100", "batchless-cuda", "256x64x56x56", "float32", "contiguous", 1.0),
        _row("H100", "batchless-triton", "256x64x56x56", "float32", "contiguous", 1.2),
        _row("H100", "batchless-cuda", "256x256x28x28", "float32", "contiguous", 1.0),
        _row("H100", "batchless-triton", "256x256x28x28", "float32", "contiguous", 1.1),
        # channels-last large: triton faster by geometric mean though slower on one shape
        _row("H100", "batchless-cuda", "256x64x56x56", "float32", "channels_last", 1.0),
        _row("H100", "batchless-triton", "256x64x56x56", "float32", "channels_last", 1.1),
        _row("H100", "batchless-cuda", "65536x1024", "float32", "contiguous", 2.0),
        _row("H100", "batchless-triton", "65536x1024", "float32", "contiguous", 1.0),
        # measured with one backend only, or another pass: no evidence
        _row("H100", "batchless-cuda", "32x256", "float32", "contiguous", 0.01),
        _row("H100", "batchless-triton", "32x256", "float32", "contiguous", 0.001, pass_name="fwd"),
        _row("H100", "batchnorm", "256x64x56x56", "float32", "contiguous", 0.1),
    ]
    table = derive_gpu_choice.derive(rows)
    assert table["devices"] == {"H100": {"channels_first/float32/large": "cuda",
                                         "channels_last/float32/large": "triton"}}
    assert len(table["evidence"]["H100"]["channels_last/float32/large"]["cuda"]) == 2


def test_derive_writes_the_table(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(
        "device_name,impl,pass,shape,dtype,layout,median_ms\n"
        "H200,batchless-cuda,fwd+bwd,32x256,bfloat16,contiguous,0.02\n"
        "H200,batchless-triton,fwd+bwd,32x256,bfloat16,contiguous,0.03\n")
    out = tmp_path / "choice.json"
    derive_gpu_choice.main([str(csv_path), "--out", str(out)])
    assert gpu_choice.load_table(str(out)) == {"H200": {"channels_last/bfloat16/small": "cuda"}}
    with pytest.raises(SystemExit, match="nothing to derive"):
        derive_gpu_choice.main([str(_empty_csv(tmp_path)), "--out", str(out)])


def test_another_gpus_run_keeps_this_ones_entries(tmp_path):
    """A second GPU's run (--update-reference passes its own CSV alone) rewrote the table without the
    first GPU; and files of eager timings were dropped when another GPU's file had graph replays."""
    header = "device_name,impl,pass,shape,dtype,layout,median_ms,timing\n"
    h200, a100 = tmp_path / "h200.csv", tmp_path / "a100.csv"
    h200.write_text(header + "H200,batchless-cuda,fwd+bwd,32x256,bfloat16,contiguous,0.02,cuda-graph\n"
                             "H200,batchless-triton,fwd+bwd,32x256,bfloat16,contiguous,0.03,cuda-graph\n")
    a100.write_text(header + "A100,batchless-cuda,fwd+bwd,32x256,bfloat16,contiguous,0.05,eager\n"
                             "A100,batchless-triton,fwd+bwd,32x256,bfloat16,contiguous,0.04,eager\n")
    out = tmp_path / "choice.json"
    derive_gpu_choice.main([str(h200), str(a100), "--out", str(out)])
    both = {"H200": {"channels_last/bfloat16/small": "cuda"}, "A100": {"channels_last/bfloat16/small": "triton"}}
    assert gpu_choice.load_table(str(out)) == both
    h200.write_text(header + "H200,batchless-cuda,fwd+bwd,32x256,bfloat16,contiguous,0.04,cuda-graph\n"
                             "H200,batchless-triton,fwd+bwd,32x256,bfloat16,contiguous,0.03,cuda-graph\n")
    derive_gpu_choice.main([str(h200), "--out", str(out)])  # a new H200 run alone
    gpu_choice.load_table.cache_clear()
    assert gpu_choice.load_table(str(out)) == {**both, "H200": {"channels_last/bfloat16/small": "triton"}}


def _empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("device_name,impl,pass,shape,dtype,layout,median_ms\n")
    return path


def test_preferred_looks_up_this_gpu_then_any(monkeypatch):
    monkeypatch.setattr(gpu_choice, "_device_name", lambda device: "H100")
    x = torch.empty(32, 256, dtype=torch.bfloat16)
    table = {"A100": {"channels_last/bfloat16/small": "triton"},
             "H100": {"channels_last/bfloat16/small": "cuda"}}
    assert gpu_choice.preferred(x, table) == "cuda"
    assert gpu_choice.preferred(x, {"A100": table["A100"]}) == "triton"  # another GPU's data
    assert gpu_choice.preferred(x, {"H100": {"channels_first/bfloat16/small": "triton"}}) is None
    assert gpu_choice.preferred(x, {}) is None


def test_missing_table_means_no_preference(tmp_path):
    assert gpu_choice.load_table(str(tmp_path / "absent.json")) == {}


def test_preferred_traces_under_torch_compile():
    table = {"H100": {"channels_first/float32/small": "triton"}}

    def pick(x):
        return x + 1 if gpu_choice.preferred(x, table) == "triton" else x - 1

    x = torch.zeros(2, 3, 4)
    torch.testing.assert_close(torch.compile(pick, fullgraph=True)(x), x + 1)


@pytest.mark.parametrize("content", ['{"devices": {"H200": {"channels', "[]", '{"devices": [1]}',
                                     '{"devices": {"H200": {"channels_last/float32/small": "cpu"}}}'],
                         ids=["truncated", "list", "devices-list", "unknown-backend"])
def test_malformed_table_is_ignored_with_a_warning(tmp_path, content):
    """The table is read at import, on CPU-only machines too: a truncated file (an interrupted
    derive_gpu_choice.py) made `import batchless_kernels` fail with a JSONDecodeError naming no file."""
    path = tmp_path / "gpu_choice.json"
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match=f"ignoring {path}"):
        assert gpu_choice.load_table(str(path)) == {}

