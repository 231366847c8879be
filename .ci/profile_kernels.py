"""The training step (forward with the NLL sums, backward) of each GPU backend and of F.batch_norm,
once per case, for Nsight Compute (.ci/gpu_session.sh profile step):

    ncu --clock-control none --profile-from-start off ... python .ci/profile_kernels.py

Each step runs twice unprofiled first (compilation, caches), then once between
cudaProfilerStart/Stop, so ncu records exactly the kernels of that step. The order of cases is
printed, so that the kernels of ncu's report (in launch order) can be assigned to them.
PROFILE_IMPLS (comma-separated, default cuda,triton,batchnorm) names the implementations profiled.
"""

import os

import torch
import torch.nn.functional as F

import batchless_kernels as bk

CASES = [((256, 64, 56, 56), torch.bfloat16, "contiguous"), ((256, 64, 56, 56), torch.bfloat16, "channels_last"),
         ((256, 1024, 14, 14), torch.float32, "channels_last"), ((65536, 1024), torch.float32, "contiguous"),
         ((32, 256), torch.float32, "contiguous")]
IMPLS = os.environ.get("PROFILE_IMPLS", "cuda,triton,batchnorm").split(",")


def step(impl, x, grad_y, params):
    mean, std_param, weight, bias = params
    if impl == "batchnorm":
        y = F.batch_norm(x, torch.zeros_like(mean), torch.ones_like(mean), weight, bias, training=True)
        return torch.autograd.grad(y, (x, weight, bias), grad_y)
    y, nll = bk.batchless_norm(x, mean, std_param, weight, bias, backend=impl)
    return torch.autograd.grad((y, nll), (x, mean, std_param, weight, bias), (grad_y, torch.ones_like(nll)))


def main():
    order = 0
    for shape, dtype, layout in CASES:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        grad_y = torch.randn_like(x)
        params = [torch.randn(shape[1], device="cuda").requires_grad_() for _ in range(4)]
        for impl in IMPLS:
            for _ in range(2):
                step(impl, x, grad_y, params)
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            step(impl, x, grad_y, params)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"profiled step {order}: {impl} {'x'.join(map(str, shape))} {dtype} {layout}", flush=True)
            order += 1


if __name__ == "__main__":
    main()
