"""Runs every CUDA kernel variant once on small, odd shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python .ci/sanitize_kernels.py
    compute-sanitizer --tool racecheck python .ci/sanitize_kernels.py

Covers both layouts, every dtype, vector widths 1 to 8 (odd and aligned inner sizes, offset
views), with and without stats, and every backward output mask.
"""

import itertools
import math

import torch

import batchless_kernels as bk

SHAPES = [(3, 5, 7), (4, 8, 16, 16), (2, 3, 517), (64, 24), (33, 1000), (2, 16, 5, 5),
          # large enough for the partial buffers and the second reduction stage: split planes,
          # many row blocks, a thin channel count
          (2, 3, 131, 129), (700, 2, 33), (64, 64, 56, 56)]
LARGE = 1 << 20  # elements: larger shapes run in float32 and bfloat16 only (memcheck is slow)
MASKS = [m for m in itertools.product([True, False], repeat=3) if any(m)]


def variants(shape, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    yield x
    if x.dim() == 4:
        yield x.contiguous(memory_format=torch.channels_last)
    yield torch.randn((shape[0] * shape[1] * (x.numel() // (shape[0] * shape[1]))) + 1, device="cuda",
                      dtype=dtype)[1:].view(shape)  # misaligned start: scalar path


def main():
    fwd = torch.ops.batchless_kernels.batchless_norm_forward.default
    bwd = torch.ops.batchless_kernels.batchless_norm_backward.default
    runs = 0
    for shape, dtype in itertools.product(SHAPES, [torch.float32, torch.float64, torch.float16, torch.bfloat16]):
        if math.prod(shape) > LARGE and dtype not in (torch.float32, torch.bfloat16):
            continue
        channels = shape[1]
        mean, rstd, w, b = (torch.rand(channels, device="cuda") + 0.5 for _ in range(4))
        for x in variants(shape, dtype):
            for stats in (True, False):
                fwd(x, mean, rstd, w, b, stats)
                runs += 1
            for mask in MASKS:
                bwd(torch.randn_like(x), x, mean, rstd, w, list(mask))
                runs += 1
        std_param = torch.zeros(channels, device="cuda", requires_grad=True)
        mu = torch.zeros(channels, device="cuda", requires_grad=True)
        for backend in ("cuda", "triton"):  # the training op: forward, NLL, and their backward
            xg = torch.randn(shape, device="cuda", requires_grad=True)
            y, nll = bk.batchless_norm(xg, mu, std_param, backend=backend)
            torch.autograd.backward([y, nll], [torch.ones_like(y), torch.ones_like(nll)])
    torch.cuda.synchronize()
    print(f"sanitize_kernels: {runs} kernel calls done")


if __name__ == "__main__":
    main()
