"""Host time of one eager training step (forward with the NLL, backward) and of one inference call
(no_grad; BatchNorm in eval mode) of the GPU backends and of F.batch_norm at small shapes, where the
step is bound by the host's time to issue it
(.ci/gpu_session.sh, step "host"):

    python .ci/profile_host.py [--device cuda|cpu] [--steps N]

Per implementation and shape: the wall time per step over N steps issued back to back (the GPU
keeps up, so this is the host's time), then torch.profiler's CPU-side table (no CUDA activity
tracing) of the ops each step dispatches, by self CPU time.

Then a model's step, per layer: MODEL_LAYERS drop-in modules in a row (BatchlessNorm vs
nn.BatchNorm), one loss and one backward() (the loss adds bk.nll_loss), as training runs them: the
cost of torch.autograd.grad's Python wrapper, which a one-layer step pays per layer, is paid once
per model there. Implementations alternate over the repeats; the median is printed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import batchless_kernels as bk
from batchless_kernels import _cli

SHAPES = [(32, 256), (64, 256, 7, 7)]
MODEL_SHAPES = [(32, 256), (8, 64, 8, 8), (64, 256, 7, 7)]
MODEL_LAYERS = 8


def make_step(impl, x, grad_y, params, inference=False):
    """One training step (forward with the NLL, backward), or with inference one forward under
    no_grad (BatchNorm in eval mode)."""
    mean, std_param, weight, bias = params
    one = torch.ones((), device=x.device)
    running_mean, running_var = torch.zeros_like(mean), torch.ones_like(mean)
    if inference:
        @torch.no_grad()
        def step():
            if impl == "batchnorm":
                return F.batch_norm(x, running_mean, running_var, weight, bias, training=False)
            return bk.batchless_norm(x, mean, std_param, weight, bias, backend=impl)
    elif impl == "batchnorm":
        def step():
            y = F.batch_norm(x, running_mean, running_var, weight, bias, training=True)
            return torch.autograd.grad(y, (x, weight, bias), grad_y)
    else:
        def step():
            y, nll = bk.batchless_norm(x, mean, std_param, weight, bias, backend=impl)
            return torch.autograd.grad((y, nll), (x, mean, std_param, weight, bias), (grad_y, one))
    return step


def make_model_step(impl, shape, device):
    """One training step of MODEL_LAYERS normalization modules in a row: forward, loss, backward."""
    modules = {2: (bk.BatchlessNorm1d, torch.nn.BatchNorm1d), 4: (bk.BatchlessNorm2d, torch.nn.BatchNorm2d)}
    batchless, batchnorm = modules[len(shape)]
    layers = [batchnorm(shape[1]) if impl == "batchnorm" else batchless(shape[1], backend=impl)
              for _ in range(MODEL_LAYERS)]
    model = torch.nn.Sequential(*layers).to(device)
    x = torch.randn(shape, device=device).requires_grad_()

    def step():
        loss = model(x).sum()
        if impl != "batchnorm":
            loss = loss + bk.nll_loss(model)
        loss.backward()

    return step


def model_steps(impls, device, sync, steps: int) -> None:
    print(f"\n## A model's step: {MODEL_LAYERS} modules, one backward (host us per layer, median of 5 repeats)")
    print("| shape | " + " | ".join(impls) + " |\n|---|" + "---|" * len(impls))
    for shape in MODEL_SHAPES:
        step_of = {impl: make_model_step(impl, shape, device) for impl in impls}
        times = {impl: [] for impl in impls}
        for _ in range(5):
            for impl, step in step_of.items():  # alternating: the machine's noise hits every impl alike
                for _ in range(min(10, steps)):
                    step()
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                sync()
                times[impl].append((time.perf_counter() - t0) / steps / MODEL_LAYERS * 1e6)
        medians = [sorted(times[impl])[2] for impl in impls]
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(f"{t:.1f}" for t in medians) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=_cli.positive(int), default=300)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # The device's own backends (not triton's interpreter on the CPU: a dry run), then BatchNorm.
    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    impls = [b for b in wanted if b in bk.available_backends(device)] + ["batchnorm"]
    for shape in SHAPES:
        x = torch.randn(shape, device=device).requires_grad_()
        grad_y = torch.randn_like(x)
        params = [torch.randn(shape[1], device=device).requires_grad_() for _ in range(4)]
        for impl, inference in [(impl, inference) for inference in (False, True) for impl in impls]:
            step = make_step(impl, x, grad_y, params, inference)
            for _ in range(min(20, args.steps)):
                step()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            per_step_us = (time.perf_counter() - t0) / args.steps * 1e6
            what = "inference call (no_grad)" if inference else "training step"
            print(f"\n## {impl} {'x'.join(map(str, shape))}: {per_step_us:.1f} us per {what} (host, {args.steps} steps)")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(min(50, args.steps)):
                    step()
                sync()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))
    model_steps(impls, device, sync, max(1, args.steps // 4))


if __name__ == "__main__":
    main()
