"""The triton kernels as a GPU would run them, checked without one: bench/triton_codegen.py compiles
every kernel variant the backend launches for the benchmark's shapes and odd ones for sm_90, and
fails when one spills or accesses the activations narrower than the shape allows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    out = tmp_path_factory.mktemp("codegen") / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_codegen.py"), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return done, json.loads(out.read_text()) if out.exists() else []


def test_every_variant_compiles_vectorized_without_spills(codegen):
    done, rows = codegen
    assert done.returncode == 0, done.stdout + done.stderr
    failed = [r for r in rows if not r["ok"]]
    assert rows and not failed, failed


def test_codegen_covers_the_gpu_targets(codegen):
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_batchless import GPU_TARGETS

    _, rows = codegen
    shapes = {r["shape"] for r in rows}
    assert {"x".join(map(str, s)) for s in GPU_TARGETS} <= shapes
    assert {r["kernel"] for r in rows} == {"fwd", "fwd-inference", "bwd", "bwd-dx"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16", "float16", "float64"}


def test_planes_not_divisible_by_16_get_vector_accesses(codegen):
    """14x14 planes (S = 196 = 4 * 49): Triton only knows divisibility by 16 of an integer argument,
    so S went in as S_VEC * VEC; without that, every access was scalar."""
    _, rows = codegen
    case = {(r["kernel"], r["dtype"]): r for r in rows if r["shape"] == "256x1024x14x14" and r["layout"] == "contiguous"}
    for kernel in ("fwd", "bwd"):
        assert case[(kernel, "float32")]["load_bytes"] == [16]
        assert case[(kernel, "float32")]["store_bytes"] == [16]
        assert case[(kernel, "bfloat16")]["load_bytes"] == [8]
