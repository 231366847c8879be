"""Data parallel training needs nothing beyond DDP's gradient all-reduce: 2 CPU processes (gloo), each
with half of every batch, follow exactly the parameters of one process trained on whole batches. There
is no SyncBatchNorm and no buffer: mean and sigma are ordinary parameters, and each layer's NLL term is
a mean over elements, so the average of the halves' gradients is the whole batch's gradient."""

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

WORLD = 2
STEPS = 3
BATCH = 8  # split in two halves of 4
DTYPES = {"float64": (torch.float64, 1e-12), "float32": (torch.float32, 1e-6)}


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), bk.BatchlessNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2), bk.BatchlessNorm2d(5, parametrization="abs"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(5, 3), bk.BatchlessNorm1d(3, parametrization="inv", nll_weight=0.5),
    ).to(dtype)


def _batch(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 3, 6, 6, generator=g) * 2 + 1
    return x.to(dtype), torch.randint(0, 3, (BATCH,), generator=g)


def _train(model, dtype, rank=0, world=1):
    """SGD on this rank's share of each batch; the parameters after every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inner = model.module if hasattr(model, "module") else model
    history = []
    for step in range(STEPS):
        x, target = _batch(step, dtype)
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = F.cross_entropy(model(x[share]), target[share]) + bk.nll_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append([p.detach().clone() for p in inner.parameters()])
    return history


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for name, (dtype, _) in DTYPES.items():
            ddp = nn.parallel.DistributedDataParallel(_model(dtype))
            results[name] = _train(ddp, dtype, rank, WORLD)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears its gloo pairs down: a rank destroying the group while
        # the other still talks to it aborts ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_equals_single_process_on_whole_batches():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    model = _model(torch.float64)
    assert not list(model.buffers()), "nothing to synchronize but gradients"
    with tempfile.TemporaryDirectory() as tmp:
        context = torch.multiprocessing.spawn(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD,
                                              join=False)
        deadline = time.monotonic() + 120
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.terminate()
                pytest.fail("the DDP workers did not finish in 120 s")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (dtype, tol) in DTYPES.items():
            single = _train(_model(dtype), dtype)
            initial = list(_model(dtype).parameters())
            for step in range(STEPS):
                for i, expected in enumerate(single[step]):
                    what = f"{name} step {step} parameter {i}"
                    assert torch.equal(ranks[0][name][step][i], ranks[1][name][step][i]), what
                    torch.testing.assert_close(ranks[0][name][step][i], expected, rtol=tol, atol=tol,
                                               msg=lambda m: f"{what}: {m}")
                    assert not torch.allclose(expected, initial[i]), f"{what} did not move"
    finally:
        torch.set_num_threads(threads)
