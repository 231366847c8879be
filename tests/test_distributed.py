"""Data parallel training needs nothing beyond the engines' gradient reduction: 2 CPU processes (gloo),
each with a share of every batch, follow exactly the parameters of one process trained on whole
batches. There is no SyncBatchNorm and no buffer: mean and sigma are ordinary parameters, and each
layer's NLL term is a mean over elements, so the average of equal shares' gradients is the whole
batch's gradient. Unequal shares (n_r of N instances) need each rank's loss scaled by world * n_r / N.

Engines: DistributedDataParallel, and FSDP2 (`fully_shard`, default options: parameters gathered
around each unit's forward and backward and freed in between) with one unit for the whole model or
one per layer plus the root. FSDP needs the NLL's parameter gradients to be computed inside the
layer's backward (batchless_norm_train, csrc/ops.cpp) or from copies (the reference backend)."""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchless_kernels as bk
from conftest import ALL_BACKENDS, backend_params

WORLD = 2
STEPS = 3
BATCH = 8
DTYPES = {"float64": (torch.float64, 1e-12), "float32": (torch.float32, 1e-6)}
BACKENDS = ("auto", "reference")
# Engine -> the rank boundaries of each batch's shares.
# ddp-find-unused: DDP(find_unused_parameters=True), which walks the graph from the model's outputs.
ENGINES = {"ddp": (0, 4, 8), "ddp-unequal": (0, 5, 8), "ddp-find-unused": (0, 4, 8), "fsdp2-root": (0, 4, 8),
           "fsdp2-per-layer": (0, 4, 8)}


def _model(dtype, backend="auto"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), bk.BatchlessNorm2d(4, backend=backend), nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2), bk.BatchlessNorm2d(5, parametrization="abs", backend=backend), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(5, 3), bk.BatchlessNorm1d(3, parametrization="inv", nll_weight=0.5, backend=backend),
    ).to(dtype)


def _wrap(model, engine):
    if engine.startswith("ddp"):
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=engine == "ddp-find-unused")
    from torch.distributed.fsdp import fully_shard

    if engine == "fsdp2-per-layer":
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
    fully_shard(model)
    return model


def _batch(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 3, 6, 6, generator=g) * 2 + 1
    return x.to(dtype), torch.randint(0, 3, (BATCH,), generator=g)


def _train(model, dtype, bounds=(0, BATCH), rank=0):
    """SGD on this rank's share of each batch (bounds[rank]:bounds[rank + 1]), its loss scaled by
    world * n_r / N; the (whole) parameters after every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inner = model.module if hasattr(model, "module") else model
    world = len(bounds) - 1
    share = slice(bounds[rank], bounds[rank + 1])
    scale = world * (share.stop - share.start) / BATCH
    history = []
    for step in range(STEPS):
        x, target = _batch(step, dtype)
        loss = F.cross_entropy(model(x[share]), target[share]) + bk.nll_loss(model)
        opt.zero_grad()
        (loss * scale).backward()
        opt.step()
        history.append([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                        for p in inner.parameters()])
    return history


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for engine, bounds in ENGINES.items():
            for backend in BACKENDS:
                for name, (dtype, _) in DTYPES.items():
                    model = _wrap(_model(dtype, backend), engine)
                    results[engine, backend, name] = _train(model, dtype, bounds, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears its gloo pairs down: a rank destroying the group while
        # the other still talks to it aborts ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_data_parallel_equals_single_process_on_whole_batches():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    model = _model(torch.float64)
    assert not list(model.buffers()), "nothing to synchronize but gradients"
    with tempfile.TemporaryDirectory() as tmp:
        context = torch.multiprocessing.spawn(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD,
                                              join=False)
        deadline = time.monotonic() + 240
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.terminate()
                pytest.fail("the data-parallel workers did not finish in 240 s")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for (engine, backend, name), history in ranks[0].items():
            dtype, tol = DTYPES[name]
            single = _train(_model(dtype, backend), dtype)
            initial = list(_model(dtype).parameters())
            for step in range(STEPS):
                for i, expected in enumerate(single[step]):
                    what = f"{engine} {backend} {name} step {step} parameter {i}"
                    assert torch.equal(history[step][i], ranks[1][engine, backend, name][step][i]), what
                    torch.testing.assert_close(history[step][i], expected, rtol=tol, atol=tol,
                                               msg=lambda m: f"{what}: {m}")
                    assert not torch.allclose(expected, initial[i]), f"{what} did not move"
    finally:
        torch.set_num_threads(threads)


def _leaves_reached(t: torch.Tensor) -> set[int]:
    """ids of the leaf tensors t's autograd graph reaches, as DDP(find_unused_parameters=True) walks it."""
    seen, stack, leaves = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("fused_nll", [True, False], ids=["training-op", "forward-op"])
@pytest.mark.parametrize("param_shape", [(4, 1, 1), (4, 1, 5)], ids=["per-channel", "shared"])
def test_outputs_reach_mean_and_std_param(case, fused_nll, param_shape, monkeypatch):
    """With the reference's y (and the forward op's, where no fused NLL is compiled) computed from detached
    mean and r, DDP(find_unused_parameters=True) marked mean and std_param unused, then failed when their
    NLL gradient arrived ("Expected to mark a variable ready only once")."""
    from batchless_kernels import functional

    calls = []
    if not fused_nll:  # the forward op's path: no fused NLL op, nor the C++ fast path that assumes one
        monkeypatch.setitem(functional._HAS_FUSED_NLL, case.device, False)
        monkeypatch.setattr(functional, "_fast", None)
        monkeypatch.setattr(functional, "kernel_ops", lambda name: calls.append(name) or bk.backends.kernel_ops(name))
    layer = bk.BatchlessNorm(param_shape, backend=case.name).to(case.device)
    y = layer(torch.randn(3, 4, 6, 5, device=case.device))
    # (4, 1, 5) has no view with the Gaussians on one axis: the reference runs it on every backend
    assert len(calls) == (not fused_nll and case.name != "reference" and param_shape == (4, 1, 1))
    assert {id(layer.mean), id(layer.std_param)} <= _leaves_reached(y)
    (y.sum() + bk.nll_loss(layer)).backward()
    assert torch.count_nonzero(layer.mean.grad) > 0 and torch.count_nonzero(layer.std_param.grad) > 0
