"""The triton backend's own ops: opcheck of the custom ops (fake kernels, autograd registration,
schema) on the device where triton runs here (the GPU, or CPU tensors under the interpreter); their
launchers (per-channel views, the device guard); and the launch plan (a few compiled variants for
inputs of varying size, every row covered)."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

import batchless_kernels as bk
from conftest import (ALL_BACKENDS, GRAD_NAMES, TOLS, assert_close_scaled, backend_params, loss_of, make_case,
                      run_batchless, run_reference64)

TRITON_CASES = [b for b in ALL_BACKENDS if b.name == "triton"]
pytestmark = pytest.mark.skipif(not TRITON_CASES, reason="the triton backend cannot run here")


def _device():
    return "cuda" if any(c.device == "cuda" for c in TRITON_CASES) else "cpu"


def _ops():
    return bk.backends.kernel_ops("triton")


@pytest.mark.parametrize("shape, layout", [((3, 5, 7), "contiguous"), ((2, 4, 3, 5), "channels_last"),
                                           ((6, 9), "contiguous"), ((2, 3, 4, 5), "strided")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("compute_stats", [True, False])
def test_opcheck_triton_forward(shape, layout, dtype, compute_stats):
    x, mean, std_param, weight, bias = make_case(shape, layout, dtype, _device(), "log", True)
    x.requires_grad_()
    weight.requires_grad_()
    forward, _ = _ops()
    torch.library.opcheck(forward, (x, mean.detach(), torch.exp(-std_param.detach()), weight, bias, compute_stats))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]], ids=str)
@pytest.mark.parametrize("shape, layout", [((3, 5, 7), "contiguous"), ((2, 4, 3, 5), "channels_last")], ids=str)
def test_opcheck_triton_backward(mask, shape, layout):
    x, mean, std_param, weight, _ = make_case(shape, layout, torch.float32, _device(), "log", True)
    _, backward = _ops()
    grad_y = torch.randn_like(x)
    torch.library.opcheck(backward, (grad_y, x if mask[1] else None, mean, torch.exp(-std_param), weight, mask))


@pytest.mark.parametrize("case", backend_params(TRITON_CASES))  # marked gpu on CUDA: the GPU session runs it
def test_triton_under_torch_compile(case):
    """fullgraph=True, no graph break, the values and gradients of eager mode. On a GPU inductor
    compiles the triton ops' own kernels into the step's code (test_compile_traces_the_triton_kernels
    checks the trace it compiles from); under the interpreter they stay ops with fake kernels."""
    from torch._inductor.utils import run_and_get_code

    inputs = [t.requires_grad_() for t in make_case((4, 3, 5, 6), "channels_last", torch.float32, case.device, "log",
                                                    True)]
    eager = loss_of("triton")(*inputs)
    want_grads = torch.autograd.grad(eager, inputs)
    compiled_loss = torch.compile(loss_of("triton"), fullgraph=True)

    def step():
        loss = compiled_loss(*inputs)
        return loss, torch.autograd.grad(loss, inputs)

    (compiled, grads), code = run_and_get_code(step)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)
    if case.device == "cuda":
        code = "\n".join(code)
        for kernel in ("_forward_columns_kernel", "_backward_columns_kernel", "_sum_partials_kernel"):
            assert kernel in code, kernel  # inductor names its copy of the kernel f"{kernel}_{i}"
        assert "batchless_kernels.triton" not in code


def _traced_graphs() -> dict:
    """tests/triton_trace.py's graphs: its own process, without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("triton_trace.py"))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", backend_params(TRITON_CASES))  # on a GPU: its own driver's analysis
def test_compile_traces_the_triton_kernels(case):
    """torch.compile's trace of the triton ops (AOTAutograd's: fake tensors, FunctionalTensorMode)
    holds their Triton kernels, which inductor then compiles with the rest of the graph, not opaque
    ops (issue 12, section 4): a training step is the four kernels of eager mode, channels-first and
    channels-last, static and dynamic shapes; inference is one. Each kernel writes only its outputs
    (torch's analysis of the TTIR), so no input is copied to stay unchanged (a copy of x would double
    the forward's traffic). torch.export keeps the ops, unlowered, as it keeps triton_op's."""
    graphs = _traced_graphs()
    layouts = {"planes": "rows", "channels_last": "columns", "rows_symbolic": "columns"}
    writes = {"forward": {"Y", "PS1", "PS2", "COUNTER"}, "backward": {"DX", "PW", "PB"},
              "sum": {"OUT1", "OUT2", "RSTD", "NLL", "BLOCK_SUMS", "COUNTER", "DMEAN", "DPARAM"}}
    for traced, layout in layouts.items():
        kernels = graphs[traced]["kernels"]
        assert [name for name, _ in kernels] == [f"_forward_{layout}_kernel", "_sum_partials_kernel",
                                                f"_backward_{layout}_kernel", "_sum_partials_kernel"], (traced, kernels)
        for name, written in kernels:
            assert set(written) <= writes[name.split("_")[1]], (traced, name, written)
        assert not [op for op in graphs[traced]["ops"] if op.startswith("batchless_kernels.")], (traced, graphs[traced])
    assert graphs["inference"]["kernels"] == [["_forward_rows_kernel", ["Y"]]]
    assert graphs["export"] == {"kernels": [], "ops": ["batchless_kernels.triton_inference.default"]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_nan_parameters_give_nan_outputs(dtype):
    """A float32 NaN of any payload in mean or r makes its channel's y and dx NaN: the interpreter's
    bf16 store rounded NaN 0x7FFFFFFF by its bits to -0.0 (the carry reached the sign)."""
    forward, backward = _ops()
    x = torch.randn(2, 3, 5, device=_device()).to(dtype)
    for payload in (0x7FFFFFFF, 0x7FC00000, 0xFFFFFFFF, 0x7F800001):
        nan = torch.tensor([payload], dtype=torch.int64).to(torch.int32).view(torch.float32).item()
        mean, r = torch.zeros(3, device=x.device), torch.ones(3, device=x.device)
        mean[1], r[2] = nan, nan
        y = forward(x, mean, r, None, None, True)[0]
        dx = backward(x, None, torch.zeros_like(mean), r, None, [True, False, False])[0]
        assert y[:, 1:].isnan().all() and not y[:, 0].isnan().any(), (hex(payload), y)
        assert dx[:, 2].isnan().all() and not dx[:, :2].isnan().any(), (hex(payload), dx)


def test_triton_ops_read_per_channel_views():
    """The ops themselves (rstd included, which batchless_norm computes itself) with mean, rstd,
    weight, bias as stride-2, stride-0 and offset stride-3 views: exactly the results of their
    contiguous copies, forward and backward, in both kernel layouts."""
    forward, backward = _ops()
    for layout in ("contiguous", "channels_last"):
        x, mean, std_param, weight, bias = make_case((4, 5, 3, 3), layout, torch.float32, _device(), "log", True)
        params = [mean, torch.exp(-std_param), weight, bias]
        views = [torch.stack([mean, torch.randn_like(mean)], dim=1)[:, 0],  # a column of a packed tensor
                 params[1][:1].clone().expand(5),  # stride 0
                 torch.randn(16, device=x.device).as_strided((5,), (3,), 1).copy_(weight),
                 torch.randn(10, device=x.device)[::2].copy_(bias)]
        dense = [v.contiguous() for v in views]
        assert not any(v.is_contiguous() for v in views)
        for got, want in zip(forward(x, *views, True), forward(x, *dense, True)):
            assert torch.equal(got, want), layout
        grad_y = torch.randn_like(x)
        for got, want in zip(backward(grad_y, x, *views[:3], [True, True, True]),
                             backward(grad_y, x, *dense[:3], [True, True, True])):
            assert torch.equal(got, want), layout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (x on cuda:1 while cuda:0 is current)")
def test_triton_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device: the ops must switch to x's, as the C++ ops do, and
    switch back. batchless_norm with cuda:0 current matches the float64 reference, and the ops
    called directly (autograd runs a backward on its device's own thread, with that device current)
    give what they give with cuda:1 current."""
    x, mean, std_param, weight, bias = inputs = make_case((4, 6, 5, 5), "contiguous", torch.float32, "cuda:1", "log",
                                                          True)
    grad_y = torch.randn_like(x)
    forward, backward = _ops()
    calls = {}
    for current in (0, 1):
        with torch.cuda.device(current):
            calls[current] = (run_batchless(*inputs, backend="triton", grad_y=grad_y),
                              forward(x, mean, torch.exp(-std_param), weight, bias, True),
                              backward(grad_y, x, mean, torch.exp(-std_param), weight, [True, True, True]))
            assert torch.cuda.current_device() == current
    got, forward_ops, backward_ops = calls[0]
    want = run_reference64(*inputs, grad_y=grad_y)
    for name in ("y", "nll", *GRAD_NAMES):
        assert got[name].device == x.device, name
        assert_close_scaled(got[name], want[name], *TOLS[torch.float32], what=name)
    for got_op, want_op in zip(forward_ops + backward_ops, calls[1][1] + calls[1][2]):
        assert torch.equal(got_op, want_op)


def test_launchers_make_the_device_of_their_tensors_current(monkeypatch):
    """The device guard of the launchers, checked without GPUs (the test above needs two): a CUDA
    tensor off the current device makes its device current for the launch, and the previous one
    current again after; a tensor on the current device or the CPU launches as it is."""
    from batchless_kernels.triton import norm

    current = [0]

    @contextlib.contextmanager
    def device(d):
        saved, current[0] = current[0], torch.device(d).index
        yield
        current[0] = saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    launch = norm._on_device_of_first(lambda t, *args: (current[0], args))
    on = lambda index: types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))  # noqa: E731
    assert launch(on(1), "x") == (1, ("x",)) and current[0] == 0
    assert launch(on(0), "x") == (0, ("x",))
    assert launch(torch.zeros(1), "x") == (0, ("x",))
    assert all(f.__wrapped__ for f in (norm.triton_forward, norm.triton_backward))


@pytest.mark.parametrize("eps", [1e-100, 1e-60, 1e-40, 1e-5, 1e300], ids=str)  # 1e-100: (x / eps)^2 / eps finite
def test_float64_eps_reaches_the_kernels_whole(monkeypatch, eps):
    """Triton types a Python float argument float32 on a GPU (the interpreter keeps the double): eps went
    in as two float32 halves, so a float64 eps below 1.4e-45 became 0 (abs with std_param 0: y = -inf
    where the reference gives -1e100) and one above 3.4e38 inf (nll NaN). No launch may carry a float,
    and the values must equal the float64 reference at the extremes of the accepted range."""
    from batchless_kernels.triton import norm

    floats = []

    class Recording:  # norm._launchable's kernel, recording the float arguments of each launch
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                floats.extend(a for a in (*args, *kwargs.values()) if isinstance(a, float))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(norm, "_launchable", Recording)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=_device())
    p = torch.zeros(4, dtype=torch.float64, device=x.device)  # abs: sigma = eps
    p[1:] = torch.tensor([0.5, 2.0, 1e-3], dtype=torch.float64)
    results = {}
    for backend in ("reference", "triton"):
        mean = torch.linspace(-1, 1, 4, dtype=torch.float64, device=x.device).requires_grad_()
        std = p.clone().requires_grad_()
        y, nll = bk.batchless_norm(x, mean, std, parametrization="abs", eps=eps, backend=backend)
        nll.backward()
        results[backend] = (y.detach(), nll.detach(), mean.grad, std.grad)
    assert not floats, f"float launch arguments (float32 on a GPU): {floats}"
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0, equal_nan=True)


# Token-packed inputs: (M, 1024) rows, M from 1k to 512k in steps of 512; channels-first: one plane
# of M elements (one plane a program: the most shares of different lengths).
VARYING_SIZES = range(1024, 512 * 1024 + 1, 512)
TILE_SHAPE = {"BLOCK_P", "BLOCK_S", "BLOCK_M", "BLOCK_C", "VEC", "num_warps"}


def _specialization(kernel, launch):
    """What Triton compiles a variant per, for a launch of kernel: the constexprs and, of each
    integer argument, Triton's own specialization (type, == 1, divisibility by 16) under the
    kernel's do_not_specialize options."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    options = getattr(kernel, "kwargs", None) or vars(kernel)  # InterpretedFunction / JITFunction
    names = list(inspect.signature(kernel.fn).parameters)
    names = names[names.index("P" if "P" in names else "M"):]  # the sizes, after the tensors
    ints = tuple(native_specialize_impl(BaseBackend, value, False, name not in (options.get("do_not_specialize") or ()),
                                        name not in (options.get("do_not_specialize_on_alignment") or ()))
                 for name, value in zip(names, launch.sizes))
    return tuple(sorted(launch.meta.items())), ints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_first", [True, False], ids=["channels_first", "channels_last"])
def test_varying_sizes_compile_a_few_variants(channels_first, dtype):
    """Over 1023 sizes, the kernels of one layout and dtype compile at most 8 variants (63
    channels-last and 10 channels-first when the rows or elements a program takes were constexprs):
    the constexprs are the tile's shape only, powers of two and VEC."""
    from batchless_kernels.triton import norm

    kernels = norm.FORWARD_KERNELS[channels_first], norm.BACKWARD_KERNELS[channels_first]
    variants = {kernel: set() for kernel in kernels}
    for m in VARYING_SIZES:
        batch, channels, numel = (1, 1, m) if channels_first else (m, 1024, m * 1024)
        launch = norm.plan_launch(channels_first, batch, channels, numel, dtype)
        assert set(launch.meta) <= TILE_SHAPE, launch.meta
        for kernel in kernels:
            variants[kernel].add(_specialization(kernel, launch))
    for kernel in kernels:
        assert 1 <= len(variants[kernel]) <= 8, sorted(variants[kernel])


@pytest.mark.parametrize("shape", [(4097, 4), (5000, 4), (1536, 4), (10000, 1), (1, 2, 9000), (3, 1, 5000)], ids=str)
def test_launch_covers_every_row(shape):
    """Shapes whose programs loop over several tiles, with a last program (or tile, or block of
    planes) that is partly past the end: every element of y and dx is written (outputs start as NaN
    in tests) and right, and so are the sums."""
    from batchless_kernels.triton import norm

    x, *params = make_case(shape, "contiguous", torch.float32, _device(), "log", True)
    launch = norm.plan_launch(x.dim() > 2, shape[0], shape[1], x.numel(), x.dtype)
    assert launch.sizes[-1] > 1, launch  # several tiles a program
    grad_y = torch.randn_like(x)
    got = run_batchless(x, *params, backend="triton", grad_y=grad_y)
    want = run_reference64(x, *params, grad_y=grad_y)
    for name in ("y", "nll", *GRAD_NAMES):
        assert_close_scaled(got[name], want[name], *TOLS[torch.float32], what=name)


@pytest.mark.parametrize("channels_first, batch, channels, numel", [
    (False, 1 << 22, 1024, 1 << 32), (False, 1 << 24, 2, 1 << 25), (False, 65536, 1024, 1 << 26),
    (True, 8, 1, 8 << 24), (True, 1 << 20, 2, 6 << 20), (True, 64, 256, 64 * 256 * 3136), (True, 60000, 2, 360000)],
    ids=str)
def test_sums_add_short_chains(channels_first, batch, channels, numel):
    """The adds an accumulator makes one after another stay near _MAX_CHAIN whatever the size (the
    rounding of each add accumulates along a chain; test_long_sums_stay_accurate measures it on
    moderate shapes): a program's tiles, then the second pass's blocks of partials, in segments.
    Checked on the plan, since the interpreter's tl.sum (numpy's) adds rows in sequence where the
    compiled reduction is a tree."""
    from batchless_kernels.triton import norm

    launch = norm.plan_launch(channels_first, batch, channels, numel, torch.float32)
    assert launch.sizes[-1] <= norm._MAX_CHAIN, launch
    _, _, block_k, segment = norm._second_pass_grid(channels, launch.slots[1])
    blocks = -(-launch.slots[1] // block_k)
    chain = segment + -(-blocks // segment) if segment > 1 else blocks
    assert chain <= 2 * norm._MAX_CHAIN, (launch.slots, block_k, segment)


@pytest.mark.parametrize("channels, k", [(3, 2), (5, 129), (2, 8193), (3, 70001), (1, 200003)], ids=str)
def test_second_pass_sums_in_segments(channels, k):
    """The second pass over (C, K) partials, in one block loop or (K > 64 blocks of 1024) in
    segments whose last one runs past K: the totals of positive terms, to float32's accuracy."""
    from batchless_kernels.triton import norm

    partials = [torch.rand(channels, k, device=_device()) for _ in range(2)]
    segment = norm._second_pass_grid(channels, k)[3]
    assert (segment > 1) == (k > 64 * 1024)
    for got, p in zip(norm._sum_partials(*partials), partials):
        want = p.double().sum(1)
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


# Tensor ops that would each be a launch of their own on a GPU (r, the NLL, reductions, stand-ins).
_COMPUTE_OPS = {f"aten::{name}" for name in (
    "exp", "neg", "abs", "reciprocal", "add", "sub", "mul", "div", "log", "sum", "mean", "full", "zeros",
    "ones", "clone", "where")}


def _counting_launches(monkeypatch):
    """Records every Triton launch of the backend's kernels, by kernel name."""
    from batchless_kernels.triton import norm

    launches = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel.fn.__name__)
            return self.kernel[grid]

    for table in (norm.FORWARD_KERNELS, norm.BACKWARD_KERNELS):
        for key, kernel in list(table.items()):
            monkeypatch.setitem(table, key, Counting(kernel))
    monkeypatch.setattr(norm, "_sum_partials_kernel", Counting(norm._sum_partials_kernel))
    return launches


@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
@pytest.mark.parametrize("shape, layout, affine", [((4, 6, 33), "contiguous", True), ((3000, 5), "contiguous", True),
                                                   ((4, 6, 40, 40), "channels_last", False), ((8, 6), "contiguous", True)],
                         ids=str)
def test_training_step_launches_four_kernels(shape, layout, affine, parametrization, monkeypatch):
    """A training step (forward and backward of y and the NLL) launches four Triton kernels and no
    tensor op: the forward kernel with r computed from std_param, the second pass with the NLL's
    epilogue (r, nll), the backward kernel and the second pass with the NLL's gradients. Every
    parametrization; several programs per channel or one; without weight and bias (no stand-in
    tensors to fill). Inference launches the forward kernel alone."""
    from torch.profiler import ProfilerActivity, profile

    launches = _counting_launches(monkeypatch)
    x, mean, std_param, weight, bias = make_case(shape, layout, torch.float32, _device(), parametrization, affine)
    leaves = [t.detach().requires_grad_() for t in (x, mean, std_param, weight, bias) if t is not None]
    grad_y = torch.randn_like(x)
    grad_nll = torch.tensor(0.75, device=x.device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y, nll = bk.batchless_norm(*leaves[:3], *(leaves[3:] or (None, None)), parametrization=parametrization,
                                   backend="triton")
        grads = torch.autograd.grad((y, nll), leaves, (grad_y, grad_nll))
    assert all(g is not None for g in grads)
    kinds = [name.split("_")[1] for name in launches]  # forward / backward / sum
    assert kinds == ["forward", "sum", "backward", "sum"], launches
    computed = sorted({e.name for e in prof.events()} & _COMPUTE_OPS)
    assert computed == [], computed
    launches.clear()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        bk.batchless_norm(x, mean, std_param, weight, bias, parametrization=parametrization, backend="triton")
    assert [name.split("_")[1] for name in launches] == ["forward"], launches
    assert sorted({e.name for e in prof.events()} & _COMPUTE_OPS) == []
