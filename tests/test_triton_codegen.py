"""The triton kernels as a GPU would run them, checked without one: bench/triton_codegen.py compiles
every kernel variant the backend launches for the benchmark's shapes and odd ones for sm_90, and
fails when one spills, accesses the activations narrower than the shape allows, or computes a
pointer offset in 32 bits (which the interpreter cannot show: numpy computes in int64)."""

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


def _compile(args, **kwargs):
    """Runs Python in a process of its own: the kernels compile for the GPU only where Triton's
    interpreter was off when they were decorated (this process has it on)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    out = tmp_path_factory.mktemp("codegen") / "codegen.json"
    done = _compile([str(ROOT / "bench" / "triton_codegen.py"), "--json", str(out)], timeout=600)
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
    assert {r["kernel"] for r in rows} == {"fwd", "fwd-inference", "bwd", "bwd-dx", "sum-partials", "sum-partials-one",
                                           "sum-partials-nll", "sum-partials-nll-grads", "nll-grads",
                                           "sum-partials-segments"}
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


def test_every_variant_computes_offsets_in_64_bits(codegen):
    _, rows = codegen
    assert rows and not [(r["kernel"], r["shape"], r["layout"], r["dtype"]) for r in rows if r["offsets_32bit"]]


# Each drops a .to(tl.int64) of batchless_kernels/triton/norm.py: (jit function, its 64-bit code, the
# 32-bit mutant, the layout whose kernels call it). The interpreter's tests pass on all of them.
MUTANTS = [
    ("_plane_block", "tl.program_id(0).to(tl.int64) * BLOCK_P", "tl.program_id(0) * BLOCK_P", "contiguous"),
    ("_plane_tile", "tl.program_id(1).to(tl.int64) * tiles", "tl.program_id(1) * tiles", "contiguous"),
    ("_column_tile", "tl.program_id(0).to(tl.int64) * tiles", "tl.program_id(0) * tiles", "channels_last"),
    ("_column_block", "tl.program_id(1).to(tl.int64) * BLOCK_C", "tl.program_id(1) * BLOCK_C", "channels_last"),
]
_MUTATE = """
import json, sys
import torch
sys.path.insert(0, "bench")
import triton_codegen  # turns the interpreter off before the kernels are decorated
from batchless_kernels.triton import norm

function, old, new, layout = sys.argv[1:]
jitted = getattr(norm, function)
assert jitted.src.count(old) == 1, (function, old)
jitted._unsafe_update_src(jitted.src.replace(old, new))  # before any compile: no caller has hashed it
print(json.dumps(triton_codegen.inspect(cases=[((8, 24, 7, 7), layout, torch.float32)])))
"""


@pytest.mark.parametrize("function, old, new, layout", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_the_offset_check_reports_a_32_bit_mutant(function, old, new, layout):
    """The kernels compiled from a mutated source, with one index computed in int32: every variant
    that calls the function fails, reporting 32-bit offsets."""
    done = _compile(["-c", _MUTATE, function, old, new, layout], timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.splitlines()[-1])
    assert len(rows) == 4
    for row in rows:
        assert row["offsets_32bit"] and not row["ok"], (function, row["kernel"])
